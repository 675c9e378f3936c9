"""`instructions`: the instruction each episode actually accomplished, in hindsight.

    hindsight relabel data/babyai data/babyai-rl --with instructions
    hindsight relabel data/babyai data/babyai-rl --with instructions:kinds=pickup
    hindsight relabel data/other data/other-rl --with instructions:function=my_pkg.labels:first_goal

Built in for MiniGrid/BabyAI data (the layout `collect` writes for MiniGrid envs: a step
column `observation` / `next_observation` struct whose `image` is the encoded 7x7x3
egocentric view, flattened in (x, y, channel) order; the agent stands at (3, 6) facing
(3, 5)), in BabyAI's own grammar:

- `go to the <color> <type>`: after the step's action, the cell in front of the agent
  (`next_observation.image[3, 5]`) holds that object: BabyAI's GoToInstr succeeds then;
- `pick up the <color> <type>`: after the step's action, the agent's own cell
  (`next_observation.image[3, 6]`, where MiniGrid draws what it carries) shows a carried
  object that was not carried before the action (`observation.image[3, 6]`).

The first accomplished instruction wins (the earliest step; on the same step, the kind
listed first in `kinds`). The relabeled episode ends there: the step column `instruction`
holds it on steps t <= instruction_step and is null after, so shards built with
`--condition instruction` keep only the steps that led to it. With `steps=next`, every step
is labeled with the first instruction accomplished at or after it instead (each
accomplishment of the episode a segment of its own; null only after the last one).

Columns: episodes `instruction` (string, null when the episode accomplished nothing) and
`instruction_step` (int32, the t of the step whose action accomplished it, or null); steps
`instruction` (string). The report counts instructions by kind and, when the episodes have
a `mission`, how often the hindsight instruction differs from it (BabyAI writes "a red key"
where several match: articles are compared as "the").

Any other environment plugs in a function, `function=module:function`, from one episode
(a pa.Table of its steps, its episode row as a dict) to `(instruction, step)` or
`(None, None)`: see relabelers/instruction_functions.py.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator

from relabelers.base import Columns, Inputs, Output, Params, Part, Relabeler, RelabelError
from relabelers.instruction_functions import (
    EPISODE_COLUMNS_IF_PRESENT,
    STEP_COLUMNS_IF_PRESENT,
    episode_instructions,
    load_function,
)
from schemas import steps as cols
from schemas.minigrid import COLOR_NAMES, FRONT, OBJECT_TO_IDX, OBJECT_TYPES, OWN, VIEW_SHAPE

INSTRUCTION = "instruction"
INSTRUCTION_STEP = "instruction_step"
MISSION = "mission"
IMAGE = "image"

# MiniGrid's stored view (schemas/minigrid.py); CARRIABLE: what PickUp can name.
CARRIABLE = OBJECT_TYPES
VERBS = {"goto": "go to", "pickup": "pick up"}


def _as_list(value: Any) -> Any:
    """`kinds=goto;pickup` on the command line (';' separates list items)."""
    return [v.strip() for v in value.split(";") if v.strip()] if isinstance(value, str) else value


class InstructionsParams(Params):
    kinds: list[str] = Field(
        ["goto", "pickup"],
        description="built-in kinds, in priority order on the same step: goto, pickup "
        "(on the command line separated by ';')",
    )
    objects: list[str] = Field(
        ["key", "ball", "box", "door"],
        description="object types an instruction may name (door: go to only; ';'-separated)",
    )
    function: str | None = Field(
        None,
        description="module:function(steps, episode) -> (instruction, step) for any other "
        "environment, instead of the built-in MiniGrid kinds",
    )
    steps: Literal["first", "next"] = Field(
        "first",
        description="the step column: first = the episode's instruction up to its step, null "
        "after; next = every step labeled with the first instruction accomplished at or after "
        "it (built-in kinds only)",
    )
    columns: list[str] = Field(
        [],
        description="with function: more step columns it needs beyond those read when present "
        f"({', '.join(STEP_COLUMNS_IF_PRESENT)}; ';'-separated)",
    )

    @field_validator("kinds", "objects", "columns", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return _as_list(value)

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, kinds: list[str]) -> list[str]:
        unknown = [k for k in kinds if k not in VERBS]
        if unknown or not kinds or len(set(kinds)) != len(kinds):
            raise ValueError(f"kinds must be distinct names among {', '.join(VERBS)}")
        return kinds

    @field_validator("objects")
    @classmethod
    def _known_objects(cls, objects: list[str]) -> list[str]:
        unknown = [o for o in objects if o not in (*CARRIABLE, "door")]
        if unknown or not objects:
            raise ValueError(f"objects must be among key, ball, box, door; not {unknown}")
        return objects

    @model_validator(mode="after")
    def _next_needs_built_in(self) -> InstructionsParams:
        if self.function and self.steps == "next":
            raise ValueError("steps=next labels every accomplishment: built-in kinds only")
        return self


def vocabulary() -> list[str]:
    """Every built-in instruction, indexed by `code(kind, object, color)`."""
    kinds, objects = list(VERBS), list(OBJECT_TO_IDX)
    return [
        f"{VERBS[kind]} the {color} {obj}"
        for kind in kinds
        for obj in objects
        for color in COLOR_NAMES
    ]


def code(kind: int, obj: np.ndarray, color: np.ndarray) -> np.ndarray:
    """Index into `vocabulary()` of (kind index, object index, colour index)."""
    return (kind * len(OBJECT_TO_IDX) + obj.astype(np.int64)) * len(COLOR_NAMES) + color


class InstructionsRelabeler(Relabeler):
    """Hindsight instructions: the first thing each episode accomplished, and when."""

    name: ClassVar[str] = "instructions"
    version: ClassVar[str] = "1"
    Params: ClassVar[type[Params]] = InstructionsParams

    def reads(self) -> Columns:
        if self.params.function:
            return Columns(
                steps=(cols.EPISODE_ID, cols.T, *self.params.columns),
                steps_if_present=STEP_COLUMNS_IF_PRESENT,
                episodes=(cols.EPISODE_ID,),
                episodes_if_present=EPISODE_COLUMNS_IF_PRESENT,
            )
        observed = (f"{cols.OBSERVATION}.{IMAGE}",) if "pickup" in self.params.kinds else ()
        return Columns(
            steps=(cols.EPISODE_ID, cols.T, f"{cols.NEXT_OBSERVATION}.{IMAGE}", *observed),
            episodes=(cols.EPISODE_ID,),
            episodes_if_present=(MISSION,),
        )

    def writes(self) -> Columns:
        return Columns(steps=(INSTRUCTION,), episodes=(INSTRUCTION, INSTRUCTION_STEP))

    def setup(self, inputs: Inputs) -> None:
        """A plugin function must load; built in, the views must be MiniGrid's."""
        if self.params.function:
            load_function(self.params.function)
            return
        for column in self.reads().steps[2:]:
            check_view(inputs.steps_schema, column)

    def finish(self, reports: list[dict[str, Any]]) -> dict[str, Any]:
        """The parts' counts added up; with missions, the share that differs."""
        total: dict[str, Any] = {}
        for report in reports:
            for key, value in report.items():
                if isinstance(value, dict):
                    into = total.setdefault(key, {})
                    for k, v in value.items():
                        into[k] = into.get(k, 0) + v
                else:
                    total[key] = total.get(key, 0) + value
        total["function"] = self.params.function
        if total.get("with_mission"):
            differs = total["with_mission"] - total["equals_mission"]
            total["differs_from_mission"] = differs
            total["differs_from_mission_share"] = round(differs / total["with_mission"], 4)
        return total

    # ------------------------------------------------------------ per part
    def relabel(self, steps: pa.Table, episodes: pa.Table, part: Part) -> Output:
        episode_ids = cols.arrow_to_numpy(steps.column(cols.EPISODE_ID))
        t = cols.arrow_to_numpy(steps.column(cols.T)).astype(np.int64)
        bounds = cols.episode_boundaries(episode_ids)
        run_ids = episode_ids[bounds[:-1]]  # one run of rows per episode, in order
        if self.params.function:
            rows = episode_rows(episodes, run_ids)
            vocab, run_code, run_step = episode_instructions(
                self.params.function, steps, rows, bounds, str(part)
            )
            hits = None
        else:
            vocab = vocabulary()
            hits = self.row_instructions(steps, t, part)
            run_code, run_step = first_per_episode(hits, t, bounds)
        vocab_array = pa.array(vocab, pa.string())
        lengths = np.diff(bounds)
        if self.params.steps == "next" and hits is not None:
            # Each step: the first instruction accomplished at or after it.
            following = next_hit_rows(hits, bounds)
            row_code = np.where(following >= 0, hits[np.maximum(following, 0)], -1)
            keep = row_code >= 0
        else:  # the episode's instruction on steps t <= its step, null after
            row_code, row_step = np.repeat(run_code, lengths), np.repeat(run_step, lengths)
            keep = (row_code >= 0) & (t <= row_step)
        step_instruction = vocab_array.take(pa.array(np.where(keep, row_code, 0), mask=~keep))
        # The episode columns, in the episodes table's order (an episode without steps: null).
        run_of_episode = pc.index_in(episodes.column(cols.EPISODE_ID), pa.array(run_ids))
        found = cols.arrow_to_numpy(pc.fill_null(run_of_episode, -1)).astype(np.int64)
        # Index -1 (no run) picks the appended "none".
        episode_code = np.append(run_code, -1)[found]
        episode_step = np.append(run_step, -1)[found]
        has = episode_code >= 0
        instruction = vocab_array.take(pa.array(np.where(has, episode_code, 0), mask=~has))
        instruction_step = pa.array(np.where(has, episode_step, 0).astype(np.int32), mask=~has)
        return Output(
            steps=pa.table({INSTRUCTION: step_instruction}),
            episodes=pa.table({INSTRUCTION: instruction, INSTRUCTION_STEP: instruction_step}),
            report=part_report(instruction, episodes, self.params.function is None),
        )

    def row_instructions(self, steps: pa.Table, t: np.ndarray, part: Part) -> np.ndarray:
        """Per row: the `vocabulary()` index of the instruction its action accomplished
        (-1: none). Vectorised: two cells of every row decoded."""
        # (object, colour) of the front and own cells after the action, and of the own
        # cell before it: a contiguous copy of the few bytes used, one strided pass each.
        after = read_cells(steps, f"{cols.NEXT_OBSERVATION}.{IMAGE}", (FRONT, OWN))
        n = len(after)
        row_code = np.full(n, -1, np.int64)
        kinds = list(VERBS)
        # Later kinds first, so that on the same row the kind listed first wins.
        for kind in reversed(self.params.kinds):
            wanted = np.zeros(256, bool)
            if kind == "goto":
                obj, color = after[:, 0], after[:, 1]
                wanted[[OBJECT_TO_IDX[o] for o in self.params.objects]] = True
                hit = wanted[obj]
            else:
                obj, color = after[:, 2], after[:, 3]
                before = read_cells(steps, f"{cols.OBSERVATION}.{IMAGE}", (OWN,))
                wanted[[OBJECT_TO_IDX[o] for o in self.params.objects if o in CARRIABLE]] = True
                hit = wanted[obj] & ((before[:, 0] != obj) | (before[:, 1] != color))
            check_colors(color, hit, steps, t, kind, part)
            row_code = np.where(hit, code(kinds.index(kind), obj, color), row_code)
        return row_code


def first_per_episode(
    hits: np.ndarray, t: np.ndarray, bounds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per episode run (rows `bounds[i]:bounds[i+1]`): the code of its first hit and that
    row's t (-1, -1: none), by `np.minimum.reduceat` over the hit rows."""
    n = len(hits)
    if len(bounds) < 2:
        return hits[:0], hits[:0]
    rows = np.where(hits >= 0, np.arange(n), n)
    first = np.minimum.reduceat(rows, bounds[:-1])
    has = first < n
    first = np.minimum(first, n - 1)
    return np.where(has, hits[first], -1), np.where(has, t[first], -1)


def next_hit_rows(hits: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Per row: the row of the first hit at or after it in its episode (-1: none), by a
    reversed running minimum cut at the episode's end."""
    n = len(hits)
    rows = np.where(hits >= 0, np.arange(n), n)
    following = np.minimum.accumulate(rows[::-1])[::-1]
    end = np.repeat(bounds[1:], np.diff(bounds))
    return np.where(following < end, following, -1)


def read_cells(steps: pa.Table, path: str, cells: tuple[tuple[int, int], ...]) -> np.ndarray:
    """(object, colour) of each of `cells` (x, y) of the views at `path`
    (`next_observation.image`, 147 values a row): an (n, 2 * len(cells)) integer array."""
    column = cols.column_by_path(steps, path)
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    size = int(np.prod(VIEW_SHAPE))
    if pa.types.is_fixed_size_binary(column.type):  # 147 bytes a row: no list levels to decode
        buffer = column.buffers()[1]
        values = np.frombuffer(buffer, np.uint8, len(column) * size, column.offset * size)
    else:
        values = cols.arrow_to_numpy(pc.list_flatten(column))
    if len(values) != size * len(column) or column.null_count:
        raise RelabelError(
            f"relabeler 'instructions': column {path!r} holds views that are null or not "
            f"{size} values long (MiniGrid's {VIEW_SHAPE} encoded view)"
        )
    offsets = [
        (x * VIEW_SHAPE[1] + y) * VIEW_SHAPE[2] + channel for x, y in cells for channel in (0, 1)
    ]
    used = values.reshape(len(column), size)[:, offsets]
    if used.dtype != np.uint8:  # MiniGrid's indices are bytes; other integer types are checked
        if len(used) and (used.min() < 0 or used.max() > 255):
            raise RelabelError(
                f"relabeler 'instructions': column {path!r} holds values outside 0..255, "
                "which no MiniGrid object or colour index is"
            )
        used = used.astype(np.uint8)
    return used


def check_colors(
    color: np.ndarray, hit: np.ndarray, steps: pa.Table, t: np.ndarray, kind: str, part: Part
) -> None:
    """An object whose colour index is not one of MiniGrid's is bad data, named."""
    bad = hit & (color >= len(COLOR_NAMES))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        episode = steps.column(cols.EPISODE_ID)[row].as_py()
        cell_name = "image[3, 5]" if kind == "goto" else "image[3, 6]"
        raise RelabelError(
            f"{part}: relabeler 'instructions': episode {episode} step t={int(t[row])}: "
            f"next_observation.{cell_name} has colour index {int(color[row])}, not one of "
            f"MiniGrid's {len(COLOR_NAMES)} ({', '.join(COLOR_NAMES)})"
        )


def check_view(schema: pa.Schema, path: str) -> None:
    """`path` (`observation.image`) must be MiniGrid's encoded view: integer values, 147
    per row when the list has a fixed size (or 147 bytes a row, `fixed_size_binary(147)`,
    which Parquet reads ~30x faster). One line naming the column otherwise."""
    head, _, field = path.partition(".")
    hint = (
        "the instructions relabeler reads MiniGrid's encoded 7x7x3 view there (collect a "
        "MiniGrid/BabyAI env); for other data give instructions:function=module:function"
    )
    if head not in schema.names:
        raise RelabelError(f"relabeler 'instructions': no step column {head!r}; {hint}")
    kind = schema.field(head).type
    if not pa.types.is_struct(kind) or kind.get_field_index(field) < 0:
        raise RelabelError(
            f"relabeler 'instructions': step column {head!r} ({kind}) has no field {field!r}; {hint}"
        )
    view = kind.field(field).type
    if pa.types.is_fixed_size_binary(view) and view.byte_width == int(np.prod(VIEW_SHAPE)):
        return
    is_list = (
        pa.types.is_list(view) or pa.types.is_large_list(view) or pa.types.is_fixed_size_list(view)
    )
    size = int(np.prod(VIEW_SHAPE))
    if (
        not is_list
        or not pa.types.is_integer(view.value_type)
        or (pa.types.is_fixed_size_list(view) and view.list_size != size)
    ):
        raise RelabelError(
            f"relabeler 'instructions': column {path!r} is {view}, not a list of {size} "
            f"integers; {hint}"
        )


def episode_rows(episodes: pa.Table, run_ids: np.ndarray) -> list[dict[str, Any]]:
    """Each run's episode row as a dict ({} for a run without one), in run order."""
    records = episodes.to_pylist()
    position = {row[cols.EPISODE_ID]: i for i, row in enumerate(records)}
    return [records[position[i]] if i in position else {} for i in run_ids.tolist()]


def normalize_mission(mission: pa.ChunkedArray | pa.Array) -> pa.Array:
    """BabyAI writes "a red key" where several objects match, "the red key" otherwise."""
    return pc.replace_substring_regex(mission, r"\ba\b", "the")


def part_report(instruction: pa.Array, episodes: pa.Table, built_in: bool) -> dict[str, Any]:
    """Counts per part: episodes, with an instruction, by kind, and against the mission."""
    has = instruction.is_valid()
    report: dict[str, Any] = {
        "episodes": len(instruction),
        "instructed": int(pc.sum(has).as_py() or 0),
    }
    if built_in:
        verbs = pc.utf8_slice_codeunits(instruction, 0, 5)  # "go to" / "pick "
        report["by_kind"] = {
            kind: int(pc.sum(pc.equal(verbs, VERBS[kind][:5])).as_py() or 0) for kind in VERBS
        }
    if MISSION in episodes.column_names:
        mission = normalize_mission(pc.cast(episodes.column(MISSION), pa.string()))
        both = pc.and_(has, mission.is_valid())
        same = pc.and_(both, pc.fill_null(pc.equal(instruction, mission), False))
        report["with_mission"] = int(pc.sum(both).as_py() or 0)
        report["equals_mission"] = int(pc.sum(same).as_py() or 0)
    return report
