"""`goals`: hindsight experience replay (HER) goal relabeling.

For every step, `k` goals are drawn from goals that were actually achieved:

- `final`:   the achieved goal at the last step of the same episode;
- `future`:  the achieved goal at a uniformly drawn later step t' in [t + 1, T - 1] of the
             same episode (t' = T - 1 at the last step);
- `episode`: the achieved goal at a uniformly drawn step t' in [0, T - 1] of the episode;
- `random`:  the achieved goal of a step of another episode, from a dataset-wide pool built
             in `setup` (bottom-k by a hash of the episode id, so it does not depend on
             how the dataset is split into parts).

The achieved-goal source (`achieved`) is a column (`achieved_goal`), a struct field
(`observation.achieved_goal`) or a slice of a vector column (`observation[0:2]`,
`observation.observation[3:5]`).

Columns written (step level), with G = goal_dim:

- `hindsight_goal`:      FixedSizeList<float32>[k * G]: goal j is items [j*G, (j+1)*G)
                         (reshape a batch with `.reshape(-1, k, G)`);
- `hindsight_goal_step`: FixedSizeList<int32>[k]: the step t' each goal came from (the whole
                         entry is null for `random`, whose goals come from other episodes);
- `hindsight_reward`:    FixedSizeList<float32>[k]: the relabeled reward under each goal;
- `hindsight_reached`:   FixedSizeList<bool>[k]: whether the goal is reached after the step.

"Reached after step t" compares the goal with the achieved goal of the state after the
action, as Stable-Baselines3's and TorchRL's HER do: the achieved goal at row t + 1 of the
same episode; at the last step, the same field or slice of the stored `next_observation`
(the state the episode ended in) when achieved goals come from `observation` and the
dataset has next observations, else the last row's own achieved goal (the final next
state is then nowhere in the table). Reached means Euclidean distance <= `threshold`; the
reward is 1.0 / 0.0 for reached / not, or, with `reward_function`, whatever that function
returns for (achieved, goal):

- a gymnasium environment id (`hindsight/PointGoal-v0`, or `module:Env-v0` to import the
  module that registers it): its `compute_reward(achieved_goal, desired_goal, info)`;
- a dotted path `package.module:function` taking (achieved_goal, desired_goal, info).
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from relabelers.base import (
    Columns,
    Inputs,
    Output,
    Params,
    Part,
    Relabeler,
    RelabelError,
    hash_uniform,
    splitmix64,
)
from schemas import steps as cols

HINDSIGHT_GOAL = "hindsight_goal"
HINDSIGHT_GOAL_STEP = "hindsight_goal_step"
HINDSIGHT_REWARD = "hindsight_reward"
HINDSIGHT_REACHED = "hindsight_reached"

# hash_uniform streams, so different uses of randomness never correlate.
_STREAM_GOAL = 1_000
_STREAM_POOL = 7

_SLICE = re.compile(r"^(?P<path>[A-Za-z_][\w.]*)(\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")


@dataclass(frozen=True)
class AchievedSpec:
    """Where achieved goals live: a column path plus an optional slice of its vector."""

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
            raise RelabelError(
                f"relabeler 'goals': achieved={text!r} is not a column, a struct field "
                "(observation.achieved_goal) or a slice (observation[0:2])"
            )
        start, stop = match.group("start"), match.group("stop")
        return cls(
            match.group("path"),
            int(start) if start else None,
            int(stop) if stop else None,
        )

    def field_type(self, schema: pa.Schema) -> pa.DataType:
        """The Arrow type at `path` in `schema`; a clear error when there is none."""
        head, *rest = self.path.split(".")
        if head not in schema.names:
            raise RelabelError(
                f"relabeler 'goals': achieved={self.path!r}: the dataset has no column {head!r}; "
                f"columns: {', '.join(schema.names)}"
            )
        data_type = schema.field(head).type
        walked = head
        for name in rest:
            if not pa.types.is_struct(data_type):
                raise RelabelError(
                    f"relabeler 'goals': achieved={self.path!r}: {walked!r} is {data_type}, "
                    f"not a struct with a field {name!r}"
                )
            names = [data_type.field(i).name for i in range(data_type.num_fields)]
            if name not in names:
                raise RelabelError(
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
            raise RelabelError(
                f"relabeler 'goals': achieved={self.path!r} is {data_type}; expected a "
                "fixed-size list of numbers (a vector per step) or a number"
            )
        if self.start is None and self.stop is None:
            return width
        indices = range(width)[slice(self.start, self.stop)]
        if len(indices) == 0 or (self.stop is not None and self.stop > width):
            raise RelabelError(
                f"relabeler 'goals': achieved slice [{self.start}:{self.stop}] does not fit "
                f"{self.path!r}, which has {width} values per step"
            )
        return len(indices)

    def read(self, steps: pa.Table) -> np.ndarray:
        """The achieved goals of every step as contiguous float32 (rows, goal_dim)."""
        self.goal_dim(steps.schema)
        values = cols.arrow_to_numpy(cols.column_by_path(steps, self.path))
        if values.ndim == 1:
            values = values[:, None]
        # Slice first, then convert: never a float64 copy of a whole observation.
        return np.ascontiguousarray(values[:, slice(self.start, self.stop)], dtype=np.float32)


def step_uniforms(
    seed: int, episode_ids: np.ndarray, t: np.ndarray, bounds: np.ndarray, stream: int
) -> np.ndarray:
    """Exactly `hash_uniform(seed, episode_ids, t, stream)` for a sorted step column, about
    twice as fast: the episode-level half of the hash is computed once per episode and the
    step-level half in place."""
    starts, lengths = bounds[:-1], np.diff(bounds)
    with np.errstate(over="ignore"):
        key = splitmix64(
            np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
            ^ np.uint64(stream * 0x632BE59BD9B4E019 & 0xFFFFFFFFFFFFFFFF)
        )
        per_episode = splitmix64(key ^ episode_ids[starts].astype(np.uint64))
    x = np.repeat(per_episode, lengths)
    x ^= t.astype(np.uint64)
    scratch = np.empty_like(x)
    x += np.uint64(0x9E3779B97F4A7C15)
    for shift, multiplier in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        np.right_shift(x, np.uint64(shift), out=scratch)
        x ^= scratch
        x *= np.uint64(multiplier)
    np.right_shift(x, np.uint64(31), out=scratch)
    x ^= scratch
    x >>= np.uint64(11)
    uniform = x.astype(np.float64)
    uniform *= 1.0 / (1 << 53)
    return uniform


@functools.lru_cache(maxsize=16)
def resolve_reward_function(name: str) -> Callable[[np.ndarray, np.ndarray, Any], np.ndarray]:
    """A batched reward function (achieved_goal, desired_goal, info) -> reward from a
    gymnasium env id (`[module:]ns/Env-v0`) or a dotted path (`package.module:function`).
    Kept per process: every part a worker runs uses the same environment."""
    module_name, sep, attribute = name.rpartition(":")
    if sep and "/" not in attribute and "-v" not in attribute:
        try:
            module = importlib.import_module(module_name)
            function = getattr(module, attribute)
        except (ImportError, AttributeError) as error:
            raise RelabelError(
                f"relabeler 'goals': reward_function={name!r} could not be loaded: {error}"
            ) from None
        if not callable(function):
            raise RelabelError(f"relabeler 'goals': reward_function={name!r} is not callable")
        return function
    import gymnasium

    env_id = attribute if sep else name
    if sep:
        try:
            importlib.import_module(module_name)
        except ImportError as error:
            raise RelabelError(
                f"relabeler 'goals': reward_function={name!r}: cannot import {module_name!r}: {error}"
            ) from None
    if env_id not in gymnasium.registry:
        raise RelabelError(
            f"relabeler 'goals': reward_function={name!r}: no gymnasium environment {env_id!r} is "
            "registered; write `module:Env-v0` to import the module that registers it, or give "
            "a function as `package.module:function`"
        )
    env = gymnasium.make(env_id).unwrapped
    if not hasattr(env, "compute_reward"):
        raise RelabelError(
            f"relabeler 'goals': environment {env_id!r} has no compute_reward(achieved_goal, "
            "desired_goal, info) method"
        )
    return env.compute_reward


class GoalsParams(Params):
    strategy: Literal["final", "future", "episode", "random"] = Field(
        "future", description="Where hindsight goals come from (HER strategies)."
    )
    k: int = Field(4, ge=1, le=64, description="Goals per step.")
    achieved: str = Field(
        "observation.achieved_goal",
        description="Achieved-goal source: a column, a struct field or a slice (observation[0:2]).",
    )
    threshold: float = Field(
        0.05, gt=0.0, description="A goal is reached within this Euclidean distance."
    )
    reward_function: str | None = Field(
        None,
        description="Gymnasium env id with compute_reward ([module:]ns/Env-v0) or "
        "package.module:function; default: 1.0 reached / 0.0 not.",
    )
    pool_size: int = Field(
        4096, ge=2, description="Goals kept in the dataset-wide pool for strategy=random."
    )


class GoalsRelabeler(Relabeler):
    """Hindsight goals per step (HER final/future/episode/random) and their rewards."""

    name = "goals"
    # 1.1: the last step's goal is reached by the stored next observation's achieved goal
    # (1.0 compared it with the last row's own, so a final goal was always reached there).
    version = "1.1"
    Params = GoalsParams

    def __init__(self, params=None, seed: int = 0):
        super().__init__(params, seed)
        self.achieved = AchievedSpec.parse(self.params.achieved)
        # Where the state after the last step is, when the dataset stores next observations.
        self.achieved_next = self.achieved.after_step()
        # Set by `setup` for strategy=random: the dataset-wide goal pool, one goal per episode.
        self.pool_episode_ids: np.ndarray | None = None
        self.pool_goals: np.ndarray | None = None

    def reads(self) -> Columns:
        return Columns(
            steps=(cols.EPISODE_ID, cols.T, self.achieved.path),
            steps_if_present=(self.achieved_next.path,) if self.achieved_next else (),
        )

    def writes(self) -> Columns:
        return Columns(
            steps=(HINDSIGHT_GOAL, HINDSIGHT_GOAL_STEP, HINDSIGHT_REWARD, HINDSIGHT_REACHED)
        )

    def setup(self, inputs: Inputs) -> None:
        """The achieved-goal spec must fit the schema and the reward function load; for
        strategy=random, one pass builds the goal pool."""
        goal_dim = self.achieved.goal_dim(inputs.steps_schema)
        next_spec = self.achieved_next
        if next_spec and next_spec.column in inputs.steps_schema.names:
            if next_spec.goal_dim(inputs.steps_schema) != goal_dim:
                raise RelabelError(
                    f"relabeler 'goals': {next_spec} has another size than {self.achieved}; "
                    "next_observation must have the layout of observation"
                )
        if self.params.reward_function:
            resolve_reward_function(self.params.reward_function)
        if self.params.strategy == "random":
            self.pool_episode_ids, self.pool_goals = merge_pools(
                inputs.summarize(self.part_pool), self.params.pool_size
            )

    def finish(self, reports: list[dict[str, Any]]) -> dict[str, Any]:
        if self.pool_episode_ids is None:
            return {}
        return {"pool_size": int(len(self.pool_episode_ids))}

    # ------------------------------------------------------------ the pool (random only)

    def part_pool(self, steps: pa.Table, episodes: pa.Table, part: Part) -> dict[str, np.ndarray]:
        """One achieved goal per episode, keeping the `pool_size` smallest hashes."""
        episode_ids = steps.column(cols.EPISODE_ID).to_numpy()
        t = steps.column(cols.T).to_numpy()
        achieved = self._read_checked(self.achieved, steps, episode_ids, t)
        bounds = cols.episode_boundaries(episode_ids)
        starts, lengths = bounds[:-1], np.diff(bounds)
        ids = episode_ids[starts]
        rows = starts + np.minimum(
            (hash_uniform(self.seed, ids, 0, _STREAM_POOL + 1) * lengths).astype(np.int64),
            lengths - 1,
        )
        keys = hash_uniform(self.seed, ids, 0, _STREAM_POOL)
        keep = np.argsort(keys, kind="stable")[: self.params.pool_size]
        return {"keys": keys[keep], "episode_ids": ids[keep], "goals": achieved[rows[keep]]}

    # ------------------------------------------------------------ per part

    def _read_checked(
        self, spec: AchievedSpec, steps: pa.Table, episode_ids: np.ndarray, t: np.ndarray
    ) -> np.ndarray:
        """Achieved goals at `spec` of these rows (with their episode ids and steps), all
        finite."""
        achieved = spec.read(steps)
        if np.isfinite(achieved.sum()):  # the cheap check first: a sum with NaN/inf is not finite
            return achieved
        bad = ~np.isfinite(achieved).all(axis=1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise RelabelError(
                f"relabeler 'goals': achieved goals ({spec}) hold "
                f"{int(bad.sum())} non-finite row(s), the first at episode "
                f"{int(episode_ids[row])} step t={int(t[row])}"
            )
        return achieved

    def achieved_after(
        self, steps: pa.Table, achieved: np.ndarray, bounds: np.ndarray
    ) -> np.ndarray:
        """The achieved goal of the state after each step's action (n, G): row t + 1 of the
        episode; at the last step, the stored next observation's when the part has it
        (the SB3 / TorchRL HER convention), else the last row's own."""
        last = bounds[1:] - 1
        after = np.arange(len(achieved)) + 1
        after[last] = last
        achieved_after = achieved[after]
        spec = self.achieved_next
        if spec is not None and spec.column in steps.column_names and len(last):
            final = steps.select([spec.column]).take(pa.array(last))
            episode_ids = steps.column(cols.EPISODE_ID).to_numpy()[last]
            t = steps.column(cols.T).to_numpy()[last]
            achieved_after[last] = self._read_checked(spec, final, episode_ids, t)
        return achieved_after

    def goal_rows(self, episode_ids: np.ndarray, t: np.ndarray, bounds: np.ndarray) -> np.ndarray:
        """Row index (within the part) of the source step of each of the k goals: (n, k)."""
        n, k = len(episode_ids), self.params.k
        starts, lengths = bounds[:-1], np.diff(bounds)
        episode_start = np.repeat(starts, lengths)
        last = np.repeat(starts + lengths - 1, lengths)  # row of the episode's last step
        rows = np.empty((n, k), dtype=np.int64)
        if self.params.strategy == "final":
            rows[:] = last[:, None]
            return rows
        if self.params.strategy == "episode":
            low = episode_start
        else:  # future: t' in [t + 1, T - 1], or T - 1 at the last step
            low = np.minimum(np.arange(1, n + 1), last)
        span = last - low + 1
        for j in range(k):
            uniform = step_uniforms(self.seed, episode_ids, t, bounds, _STREAM_GOAL + j)
            offset = (uniform * span).astype(np.int64)
            np.minimum(offset, span - 1, out=offset)  # u * span may round up to span
            rows[:, j] = low + offset
        return rows

    def relabel(self, steps: pa.Table, episodes: pa.Table, part: Part) -> Output:
        episode_ids = steps.column(cols.EPISODE_ID).to_numpy()
        t = steps.column(cols.T).to_numpy()
        achieved = self._read_checked(self.achieved, steps, episode_ids, t)
        n, goal_dim, k = len(episode_ids), achieved.shape[1], self.params.k
        bounds = cols.episode_boundaries(episode_ids)

        if self.params.strategy == "random":
            if self.pool_episode_ids is None or self.pool_goals is None:
                raise RelabelError(
                    f"{part}: relabeler 'goals' with strategy=random needs the goal pool from "
                    "setup(); for tables in memory use relabelers.base.relabel_tables"
                )
            pool_ids, pool_goals = self.pool_episode_ids, self.pool_goals
            if pool_goals.shape[1] != goal_dim:
                raise RelabelError("relabeler 'goals': the random-goal pool has another goal_dim")
            uniform = np.stack(
                [
                    step_uniforms(self.seed, episode_ids, t, bounds, _STREAM_GOAL + j)
                    for j in range(k)
                ],
                axis=1,
            )
            picks = np.minimum((uniform * len(pool_ids)).astype(np.int64), len(pool_ids) - 1)
            # A pick from the step's own episode moves to the next pool entry; the pool
            # holds one goal per episode, so the next one is from another episode.
            same = pool_ids[picks] == episode_ids[:, None]
            picks = np.where(same, (picks + 1) % len(pool_ids), picks)
            goals = pool_goals[picks]  # (n, k, G)
            goal_steps = pa.nulls(n, type=pa.list_(pa.field("item", pa.int32()), k))
        else:
            rows = self.goal_rows(episode_ids, t, bounds)  # (n, k)
            goals = _take_rows(achieved, rows)
            goal_steps = _fixed_lists(t[rows].astype(np.int32), pa.int32())

        achieved_after = self.achieved_after(steps, achieved, bounds)
        # Squared Euclidean distance, one goal dimension at a time, in float64.
        squared = np.zeros((n, k))
        for g in range(goal_dim):
            difference = np.subtract(goals[:, :, g], achieved_after[:, g, None], dtype=np.float64)
            squared += difference * difference
        reached = squared <= self.params.threshold**2
        if self.params.reward_function:
            reward_function = resolve_reward_function(self.params.reward_function)
            reward = np.asarray(
                reward_function(
                    np.repeat(achieved_after, k, axis=0),
                    goals.reshape(n * k, goal_dim),
                    None,
                ),
                dtype=np.float32,
            ).reshape(n, k)
        else:
            reward = reached.astype(np.float32)

        return Output(
            steps=pa.table(
                {
                    HINDSIGHT_GOAL: _fixed_lists(goals.reshape(n, k * goal_dim), pa.float32()),
                    HINDSIGHT_GOAL_STEP: goal_steps,
                    HINDSIGHT_REWARD: _fixed_lists(reward, pa.float32()),
                    HINDSIGHT_REACHED: _fixed_lists(reached, pa.bool_()),
                }
            )
        )


def merge_pools(
    summaries: list[dict[str, np.ndarray]], pool_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The dataset-wide pool from every part's: (episode ids, goals as float32 rows)."""
    keys = np.concatenate([np.asarray(s["keys"], dtype=np.float64) for s in summaries])
    ids = np.concatenate([np.asarray(s["episode_ids"], dtype=np.int64) for s in summaries])
    goals = np.concatenate([np.asarray(s["goals"], dtype=np.float32) for s in summaries])
    if len(np.unique(ids)) < 2:
        raise RelabelError(
            "relabeler 'goals': strategy=random draws goals from other episodes, "
            "but the dataset has fewer than two episodes"
        )
    # Order by (hash, episode id): the same pool whatever the partitioning.
    order = np.lexsort((ids, keys))[:pool_size]
    return ids[order], goals[order].reshape(len(order), -1)


def _take_rows(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """values[rows] for a (n, G) float32 array, moving each row as one G*4-byte item
    (several times faster than fancy indexing over two axes)."""
    values = np.ascontiguousarray(values)
    row_type = np.dtype((np.void, values.shape[1] * values.itemsize))
    taken = np.take(values.view(row_type).reshape(-1), rows)
    return taken.view(values.dtype).reshape(*rows.shape, values.shape[1])


def _fixed_lists(values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """(rows, width) -> FixedSizeList<value_type>[width]."""
    rows, width = values.shape
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, width)
