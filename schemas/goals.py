"""Hindsight goals from goal steps: the one derivation behind both layouts of `goals`.

The `goals` relabeler (relabelers/goals.py) draws, for every step, the steps t' its k goals
come from (`hindsight_goal_step`). Everything else follows from those and the achieved
goals: goal j of step t is the achieved goal at step t' of the same episode, and it is
reached after step t when the achieved goal of the state after the action is within
`threshold`. With `store=vectors` the relabeler derives and writes the goal vectors,
rewards and flags; with `store=steps` it writes the goal steps alone, and hindsight's
readers (engine/derived.py) derive the same columns here when they are asked for, from the
same code, so the two layouts cannot drift apart.

Rows of an episode are contiguous and `t` counts up by one from the episode's first row,
so the row of goal j of row r is `r - t[r] + hindsight_goal_step[r, j]`.

Pure NumPy / Arrow: the relabeler (relabelers/) and the readers (engine/) both import it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from schemas import steps as cols

HINDSIGHT_GOAL = "hindsight_goal"
HINDSIGHT_GOAL_STEP = "hindsight_goal_step"
HINDSIGHT_REWARD = "hindsight_reward"
HINDSIGHT_REACHED = "hindsight_reached"
# The columns of a goals group, in the order `store=vectors` writes them.
GOAL_COLUMNS = (HINDSIGHT_GOAL, HINDSIGHT_GOAL_STEP, HINDSIGHT_REWARD, HINDSIGHT_REACHED)
# What a reader derives from the goal steps of a `store=steps` group.
DERIVED_COLUMNS = (HINDSIGHT_GOAL, HINDSIGHT_REWARD, HINDSIGHT_REACHED)

# Rows handled at a time: the (rows, k) arrays of a chunk stay in the CPU cache.
CHUNK_ROWS = 1 << 14

_SLICE = re.compile(r"^(?P<path>[A-Za-z_][\w.]*)(\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")


class GoalsError(ValueError):
    """Goals that cannot be derived: names the column, the episode and the step."""


# ---------------------------------------------------------------- where achieved goals are


@dataclass(frozen=True)
class AchievedSpec:
    """Where achieved goals live: a column (`achieved_goal`), a struct field
    (`observation.achieved_goal`) or a slice of a vector column (`observation[0:2]`)."""

    path: str
    start: int | None = None
    stop: int | None = None

    @property
    def column(self) -> str:
        return self.path.split(".")[0]

    def __str__(self) -> str:
        """As written in `achieved=`: `observation.achieved_goal`, `observation[0:2]`."""
        if self.start is None and self.stop is None:
            return self.path
        start, stop = ("" if i is None else i for i in (self.start, self.stop))
        return f"{self.path}[{start}:{stop}]"

    def after_step(self) -> AchievedSpec | None:
        """The same field or slice of `next_observation` (the state after each step's
        action) when achieved goals are read from `observation`; else None."""
        if self.column != cols.OBSERVATION:
            return None
        path = cols.NEXT_OBSERVATION + self.path.removeprefix(cols.OBSERVATION)
        return AchievedSpec(path, self.start, self.stop)

    @classmethod
    def parse(cls, text: str) -> AchievedSpec:
        match = _SLICE.match(text.strip())
        if not match:
            raise GoalsError(
                f"relabeler 'goals': achieved={text!r} is not a column, a struct field "
                "(observation.achieved_goal) or a slice (observation[0:2])"
            )
        start, stop = match.group("start"), match.group("stop")
        return cls(match.group("path"), int(start) if start else None, int(stop) if stop else None)

    def field_type(self, schema: pa.Schema) -> pa.DataType:
        """The Arrow type at `path` in `schema`; a clear error when there is none."""
        head, *rest = self.path.split(".")
        if head not in schema.names:
            raise GoalsError(
                f"relabeler 'goals': achieved={self.path!r}: the dataset has no column {head!r}; "
                f"columns: {', '.join(schema.names)}"
            )
        data_type = schema.field(head).type
        walked = head
        for name in rest:
            if not pa.types.is_struct(data_type):
                raise GoalsError(
                    f"relabeler 'goals': achieved={self.path!r}: {walked!r} is {data_type}, "
                    f"not a struct with a field {name!r}"
                )
            names = [data_type.field(i).name for i in range(data_type.num_fields)]
            if name not in names:
                raise GoalsError(
                    f"relabeler 'goals': achieved={self.path!r}: struct {walked!r} has no "
                    f"field {name!r}; fields: {', '.join(names)}"
                )
            data_type = data_type.field(name).type
            walked += "." + name
        return data_type

    def goal_dim(self, schema: pa.Schema) -> int:
        """Check the spec against a schema and return the goal dimension."""
        data_type = self.field_type(schema)
        if pa.types.is_fixed_size_list(data_type):
            width = data_type.list_size
        elif pa.types.is_floating(data_type) or pa.types.is_integer(data_type):
            width = 1
        else:
            raise GoalsError(
                f"relabeler 'goals': achieved={self.path!r} is {data_type}; expected a "
                "fixed-size list of numbers (a vector per step) or a number"
            )
        if self.start is None and self.stop is None:
            return width
        indices = range(width)[slice(self.start, self.stop)]
        if len(indices) == 0 or (self.stop is not None and self.stop > width):
            raise GoalsError(
                f"relabeler 'goals': achieved slice [{self.start}:{self.stop}] does not fit "
                f"{self.path!r}, which has {width} values per step"
            )
        return len(indices)

    def read(self, steps: pa.Table) -> np.ndarray:
        """The achieved goals of every step as contiguous float32 (rows, goal_dim)."""
        goal_dim = self.goal_dim(steps.schema)
        column = cols.column_by_path(steps, self.path)
        achieved = np.empty((len(column), goal_dim), dtype=np.float32)
        row = 0
        # Chunk by chunk, sliced first: never a copy of a whole observation column.
        for chunk in column.chunks:
            values = cols.arrow_to_numpy(chunk)
            values = values[:, None] if values.ndim == 1 else values
            achieved[row : row + len(values)] = values[:, slice(self.start, self.stop)]
            row += len(values)
        return achieved

    def read_finite(
        self,
        steps: pa.Table,
        episode_ids: np.ndarray,
        t: np.ndarray,
        where: str = "relabeler 'goals'",
    ) -> np.ndarray:
        """`read`, all finite: else an error naming the first bad episode and step, after
        `where` (a reader's: `data/x part 2: goals derived at read`)."""
        achieved = self.read(steps)
        if np.isfinite(achieved.sum()):  # the cheap check first: a sum with NaN/inf is not finite
            return achieved
        bad = ~np.isfinite(achieved).all(axis=1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise GoalsError(
                f"{where}: achieved goals ({self}) hold {int(bad.sum())} non-finite "
                f"row(s), the first at episode {int(episode_ids[row])} step t={int(t[row])}"
            )
        return achieved


def achieved_after_step(
    steps: pa.Table,
    achieved: np.ndarray,
    bounds: np.ndarray,
    spec: AchievedSpec | None,
    where: str = "relabeler 'goals'",
) -> np.ndarray:
    """The achieved goal of the state after each step's action (n, G): row t + 1 of the
    episode; at the last step, `spec` (the same field of `next_observation`) when the table
    has that column (the SB3 / TorchRL HER convention), else the last row's own."""
    last = bounds[1:] - 1
    after = np.empty_like(achieved)
    after[:-1] = achieved[1:]  # row t + 1, a shifted copy (no gather)
    after[last] = achieved[last]
    if spec is not None and spec.column in steps.column_names and len(last):
        final = steps.select([spec.column]).take(pa.array(last))
        episode_ids = cols.arrow_to_numpy(steps.column(cols.EPISODE_ID))[last]
        t = cols.arrow_to_numpy(steps.column(cols.T))[last]
        after[last] = spec.read_finite(final, episode_ids, t, where)
    return after


# ---------------------------------------------------------------- the kernel


def compare_goals(
    k: int,
    achieved_after: np.ndarray,
    threshold: float,
    fill: Callable[[slice, np.ndarray], None],
) -> tuple[np.ndarray, np.ndarray]:
    """Goals (n, k, G) float32 and whether each is reached (n, k), in chunks of rows:
    `fill(rows, out)` writes the goals of `rows` into `out` (rows, k, G); each is reached
    when its squared distance (float64) to the achieved goal after the step is within
    threshold**2."""
    n, goal_dim = achieved_after.shape
    goals = np.empty((n, k, goal_dim), dtype=np.float32)
    reached = np.empty((n, k), dtype=bool)
    squared = np.empty((min(n, CHUNK_ROWS), k))
    for start in range(0, n, CHUNK_ROWS):
        rows = slice(start, min(start + CHUNK_ROWS, n))
        fill(rows, goals[rows])
        chunk = squared[: rows.stop - rows.start]
        _squared_distances(goals[rows], achieved_after[rows], out=chunk)
        np.less_equal(chunk, threshold**2, out=reached[rows])
    return goals, reached


def derive_goals(
    achieved: np.ndarray,
    achieved_after: np.ndarray,
    t: np.ndarray,
    bounds: np.ndarray,
    goal_steps: np.ndarray,
    threshold: float,
    where: str = "",
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Goals (n, k, G) and reached flags (n, k) of whole episodes from their goal steps
    (n, k): goal j of row r is the achieved goal at row r - t[r] + goal_steps[r, j]. A
    goal step outside its episode is an error naming the episode and step. `rows`: the
    goals' rows (n, k), as the relabeler has just drawn them (then taken as they are)."""
    n, k = goal_steps.shape
    lengths = np.diff(bounds)
    episode_of_row = np.repeat(np.arange(len(lengths)), lengths)
    first_row = np.arange(n, dtype=np.int64) - t  # the row of the episode's t = 0, per row
    row_type = np.dtype((np.void, achieved.shape[1] * achieved.itemsize))
    items = np.ascontiguousarray(achieved).view(row_type).reshape(-1)

    drawn = rows

    def fill(rows: slice, out: np.ndarray) -> None:
        if drawn is not None:
            np.take(items, drawn[rows], out=out.view(row_type).reshape(drawn[rows].shape))
            return
        source = goal_steps[rows].astype(np.int64)
        source += first_row[rows, None]
        episode = episode_of_row[rows, None]
        outside = (source < bounds[:-1][episode]) | (source >= bounds[1:][episode])
        if outside.any():
            row = rows.start + int(np.flatnonzero(outside.any(axis=1))[0])
            raise GoalsError(
                f"{where or 'goals'}: {HINDSIGHT_GOAL_STEP} at step t={int(t[row])} (row "
                f"{row}) points outside its episode ({goal_steps[row].tolist()}; the episode "
                f"has {int(lengths[episode_of_row[row]])} steps): goal steps are read with "
                "their whole episodes"
            )
        np.take(items, source, out=out.view(row_type).reshape(source.shape))

    return compare_goals(k, achieved_after, threshold, fill)


def _squared_distances(goals: np.ndarray, achieved: np.ndarray, out: np.ndarray) -> None:
    """out[i, j] = squared Euclidean distance of goals[i, j] (rows, k, G) to achieved[i]
    (rows, G), in float64, summed one goal dimension at a time."""
    term = np.empty_like(out)
    for g in range(goals.shape[2]):
        target = out if g == 0 else term
        np.subtract(goals[:, :, g], achieved[:, g, None], out=target, dtype=np.float64)
        target *= target
        if g:
            out += term


# ---------------------------------------------------------------- Arrow columns


def list_type(item: pa.DataType, size: int) -> pa.DataType:
    # Non-null items: Parquet stores one definition level less per value (faster to read).
    return pa.list_(pa.field("item", item, nullable=False), size)


def fixed_lists(values: np.ndarray) -> pa.Array:
    """(rows, d1, ..., dm) -> FixedSizeList<...FixedSizeList<value>[dm]...>[d1] on the
    array's buffer: row i is values[i], with its shape."""
    array = cols.numpy_to_arrow(np.ascontiguousarray(values).reshape(-1))
    for size in reversed(values.shape[1:]):
        array = pa.FixedSizeListArray.from_arrays(array, type=list_type(array.type, size))
    return array


def goal_types(k: int, goal_dim: int) -> dict[str, pa.DataType]:
    """The Arrow type of each goals column."""
    return {
        HINDSIGHT_GOAL: list_type(list_type(pa.float32(), goal_dim), k),
        HINDSIGHT_GOAL_STEP: list_type(pa.int32(), k),
        HINDSIGHT_REWARD: list_type(pa.float32(), k),
        HINDSIGHT_REACHED: list_type(pa.bool_(), k),
    }


def goal_steps_of(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A `hindsight_goal_step` column as (rows, k) int32."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return cols.arrow_to_numpy(column).astype(np.int32, copy=False)


# ---------------------------------------------------------------- a store=steps group


def _reason(error: GoalsError) -> str:
    """An achieved-spec error without its relabeler prefix (a reader names the group)."""
    return str(error).removeprefix("relabeler 'goals': ")


# The `goals` versions whose store=steps layout this reader derives: a later version may
# derive differently, so its groups are refused (clearly, when read) rather than misread.
STEPS_VERSIONS = ("1.3",)


@dataclass(frozen=True)
class GoalRecipe:
    """How a reader derives the goal vectors, rewards and flags of a `goals` group stored
    as goal steps (`store=steps`): the parameters its manifest records. `k` is not one of
    them: it is the size of the stored `hindsight_goal_step` lists. A manifest this reader
    cannot derive from (no `achieved`, a `reward_function`, ...) still lists the derived
    columns; `problem` says why, and using one of them raises it (`check`), so commands
    that never touch them work."""

    achieved: AchievedSpec | None
    threshold: float
    label: str = "goals group"
    problem: str | None = None

    @classmethod
    def of(
        cls,
        relabeler: str,
        params: Mapping[str, Any],
        version: str | None = None,
        label: str = "goals group",
    ) -> GoalRecipe | None:
        """The recipe of a group made by relabeler `relabeler` (at `version`) with `params`;
        None unless it is a `goals` group that stored goal steps only (versions before 1.3
        never did). `label` names the group in errors (`data/x: goals group 'goals'`)."""
        if relabeler != "goals" or params.get("store") != "steps":
            return None

        def broken(problem: str) -> GoalRecipe:
            return cls(None, 0.0, label, f"{label}: {problem}")

        if version is not None and version not in STEPS_VERSIONS:
            return broken(
                f"store=steps written by goals {version}; this hindsight derives the goals "
                f"of {', '.join(STEPS_VERSIONS)} only (upgrade hindsight)"
            )
        if params.get("reward_function") is not None:
            return broken(
                f"store=steps cannot use reward_function={params['reward_function']!r}: "
                "readers derive the default rewards only (relabel with store=vectors)"
            )
        if params.get("strategy") == "random":
            return broken("store=steps cannot hold strategy=random (relabel with store=vectors)")
        if not isinstance(params.get("achieved"), str):
            return broken(
                "store=steps needs achieved=COLUMN (where its goal steps' achieved goals "
                f"are); the manifest has achieved={params.get('achieved')!r}"
            )
        threshold = params.get("threshold")
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            return broken(f"store=steps needs a number threshold=; the manifest has {threshold!r}")
        try:
            achieved = AchievedSpec.parse(params["achieved"])
        except GoalsError as error:
            return broken(_reason(error))
        return cls(achieved, float(threshold), label)

    def _spec(self) -> AchievedSpec:
        """The achieved-goal spec; the recipe's problem, if any, raised."""
        if self.problem is not None or self.achieved is None:
            raise GoalsError(self.problem)
        return self.achieved

    def check(self, schema: pa.Schema) -> tuple[int, int]:
        """(k, goal_dim) for a dataset of step schema `schema` (holding the stored goal
        steps and the achieved goals); a GoalsError naming the group when the recipe or the
        columns do not fit."""
        achieved = self._spec()
        try:
            goal_dim = achieved.goal_dim(schema)
        except GoalsError as error:
            raise GoalsError(f"{self.label}: {_reason(error)}") from None
        steps_type = (
            schema.field(HINDSIGHT_GOAL_STEP).type
            if HINDSIGHT_GOAL_STEP in schema.names
            else pa.null()
        )
        if not (
            pa.types.is_fixed_size_list(steps_type) and pa.types.is_integer(steps_type.value_type)
        ):
            raise GoalsError(
                f"{self.label}: store=steps needs a stored {HINDSIGHT_GOAL_STEP} column of "
                f"fixed-size integer lists; it is {steps_type}"
            )
        return steps_type.list_size, goal_dim

    def sources(self, columns: Sequence[str]) -> list[str]:
        """The stored step columns a derivation reads, of a dataset with `columns`."""
        achieved = self._spec()
        wanted = [cols.EPISODE_ID, cols.T, achieved.column, HINDSIGHT_GOAL_STEP]
        after = achieved.after_step()
        if after is not None and after.column in columns:
            wanted.append(after.column)
        return list(dict.fromkeys(wanted))

    def types(self, schema: pa.Schema) -> dict[str, pa.DataType]:
        """Name -> Arrow type of the derived columns, for a dataset of this step schema."""
        types = goal_types(*self.check(schema))
        return {name: types[name] for name in DERIVED_COLUMNS}

    def derive(self, steps: pa.Table, names: Sequence[str], where: str = "") -> pa.Table:
        """The columns `names` (of DERIVED_COLUMNS) for `steps`: whole episodes, sorted by
        (episode_id, t), with the columns of `sources`."""
        self.check(steps.schema)
        spec = self._spec()
        episode_ids = cols.arrow_to_numpy(steps.column(cols.EPISODE_ID))
        t = cols.arrow_to_numpy(steps.column(cols.T))
        bounds = cols.episode_boundaries(episode_ids)
        reading = f"{where or self.label}: goals derived at read"
        achieved = spec.read_finite(steps, episode_ids, t, reading)
        after = achieved_after_step(steps, achieved, bounds, spec.after_step(), reading)
        goal_steps = goal_steps_of(steps.column(HINDSIGHT_GOAL_STEP))
        goals, reached = derive_goals(achieved, after, t, bounds, goal_steps, self.threshold, where)
        values = {
            HINDSIGHT_GOAL: goals,
            HINDSIGHT_REWARD: reached.astype(np.float32),  # the default reward: 1 reached, 0 not
            HINDSIGHT_REACHED: reached,
        }
        return pa.table({name: fixed_lists(values[name]) for name in names})
