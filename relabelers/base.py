"""The relabeler contract: a deterministic function from whole episodes to new columns.

A relabeler is a small class (docs/plugins.md walks through a complete one):

    name, version           registered name and version, recorded in the manifest
    Params                  a pydantic model: wrong parameters are errors listing the valid ones
    reads() / writes()      the columns it needs and the columns it adds; camera frames
                            (`frame_<camera>` step columns) only when declared in
                            `Columns.frames` (default: none, and the frames files stay
                            unopened)
    frame_rows(steps, episodes, part)
                            optional: the few rows whose declared frames it needs
                            (language keyframes); the others arrive null, unread
    setup(inputs)           optional, in the driver, once: check the input types
                            (inputs.steps_schema, inputs.episodes_schema, inputs.cameras)
                            and, if the
                            relabeler needs dataset-wide facts (quantiles, a trained reward
                            net), compute them with one pass: `inputs.summarize(function)`
                            runs function(steps, episodes, part) on every part (the columns
                            of `reads()`, declared frames included) and returns the results in part
                            order. Keep what `relabel` needs on `self`.
    relabel(steps, episodes, part) -> Output(steps=..., episodes=..., report={...})
                            per part, in a Ray task: the new columns for these whole
                            episodes, sorted by (episode_id, t); `part` says which part this
                            is; `report` holds small facts about this part.
    finish(reports)         optional, in the driver, after every part: the report stored in
                            the manifest, from the parts' reports (in part order).

The output must not depend on how episodes are split into parts, so randomness comes from
(seed, episode_id, t) through `hash_uniform`, never from a generator shared across
episodes, and `relabel` never changes `self` (parts run in any order, in this process or
in others, each with the relabeler as `setup` left it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, ValidationError

from schemas import steps as cols
from schemas.frames import CameraInfo, camera_of

Summary = TypeVar("Summary")


class RelabelError(ValueError):
    """A relabeler that cannot run on this input: names the column and what was expected."""


class Params(BaseModel):
    """Base class of every relabeler's parameters: unknown names are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Columns:
    """Column names at the step and episode level. `episodes_if_present` and
    `steps_if_present`: columns also handed to the relabeler when the dataset has them
    (optional facts, e.g. `skill`, or `next_observation.achieved_goal`).

    `frames`: camera frame columns (`schemas.frames.frame_column(camera)`, step level, one
    encoded image per step whatever the camera's storage: a video camera's steps arrive
    as lossless PNG, decoded by the job from its episodes' videos, and `inputs.cameras`
    describes it as PNG) the relabeler reads. Frames are read only for relabelers that
    declare them here (never through `steps` or `steps_if_present`): they weigh far more
    than every other column, and a relabeler that does not look at them must not pay for
    them. The job refuses, before writing anything, a dataset without those cameras.

    `steps_schema`: step columns whose type `setup` checks but whose values the relabeler
    never reads (goals:store=steps' achieved goals: readers derive from them later). The
    job checks that they exist, in the dataset or written earlier in the job, and never
    reads them."""

    steps: tuple[str, ...] = ()
    episodes: tuple[str, ...] = ()
    episodes_if_present: tuple[str, ...] = ()
    steps_if_present: tuple[str, ...] = ()
    frames: tuple[str, ...] = ()
    steps_schema: tuple[str, ...] = ()


@dataclass(frozen=True)
class Part:
    """Which part of the dataset a call runs on."""

    index: int
    count: int
    where: str = ""  # for messages: "data/pendulum part 3"

    def __str__(self) -> str:
        return self.where or f"part {self.index}"


@dataclass
class Output:
    """New columns for one part, rows aligned with the input steps / episodes, and small
    facts about this part for `finish`."""

    steps: pa.Table | None = None
    episodes: pa.Table | None = None
    report: dict[str, Any] = field(default_factory=dict)


class Inputs(Protocol):
    """What `setup` sees of the dataset: its schemas, its cameras (camera -> `CameraInfo`,
    {} without frames), whether its rewards are known, its name for messages, and one pass
    over its parts."""

    steps_schema: pa.Schema
    episodes_schema: pa.Schema
    parts: int
    cameras: dict[str, CameraInfo]
    # False for a dataset ingested without rewards: `reward` and `return` are all null.
    rewards_known: bool
    where: str  # the dataset, as messages name it

    def summarize(
        self, function: Callable[[pa.Table, pa.Table, Part], Summary], frames: bool = True
    ) -> list[Summary]:
        """`function(steps, episodes, part)` on every part (the columns of `reads()`, the
        frames it declares included unless `frames=False`: D-REX trains on them), in
        parallel; the results in part order. Keep them small: they come to the driver."""
        ...


class Relabeler(ABC):
    """Subclass this, set the class attributes, and register it under an entry point.

    Entry point group `hindsight.relabelers`, e.g. in your pyproject.toml:

        [project.entry-points."hindsight.relabelers"]
        my_labels = "my_package.labels:MyLabelsRelabeler"
    """

    name: ClassVar[str]
    version: ClassVar[str]
    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: dict[str, Any] | Params | None = None, seed: int = 0):
        if isinstance(params, Params):
            self.params = params
        else:
            try:
                self.params = self.Params(**(params or {}))
            except ValidationError as error:
                raise RelabelError(
                    f"relabeler {self.name!r}: invalid parameters: {_describe(error)}; "
                    f"valid parameters: {describe_params(self.Params)}"
                ) from None
        self.seed = int(seed)

    @abstractmethod
    def reads(self) -> Columns:
        """The input columns this relabeler needs (dotted paths for struct fields)."""

    @abstractmethod
    def writes(self) -> Columns:
        """The columns this relabeler adds."""

    def setup(self, inputs: Inputs) -> None:
        """In the driver, before any part: raise RelabelError if the input types cannot
        work; compute dataset-wide facts with `inputs.summarize` if needed."""
        return None

    @abstractmethod
    def relabel(self, steps: pa.Table, episodes: pa.Table, part: Part) -> Output:
        """Per part: the new columns for these whole episodes."""

    def frame_rows(self, steps: pa.Table, episodes: pa.Table, part: Part) -> np.ndarray | None:
        """Optional, for a relabeler that declares frames but looks at a few of them: the
        sorted, distinct rows of the part whose frames it needs, from the part's other
        columns (`steps` and `episodes` without frames). The job then reads only the
        Parquet row groups that hold those rows, and the frame columns it hands over are
        null at every other row. None (the default): every row's frames."""
        return None

    def finish(self, reports: list[dict[str, Any]]) -> dict[str, Any]:
        """In the driver, after every part: the report stored in the manifest."""
        return {}

    def run(self, steps: pa.Table, episodes: pa.Table, part: Part) -> Output:
        """`relabel`, checked against the declared contract."""
        output = self.relabel(steps, episodes, part)
        declared = self.writes()
        for level, table, rows in (
            ("steps", output.steps, steps.num_rows),
            ("episodes", output.episodes, episodes.num_rows),
        ):
            names = tuple(table.column_names) if table is not None else ()
            if set(names) != set(getattr(declared, level)):
                raise RelabelError(
                    f"{part}: relabeler {self.name!r} wrote {level} columns {list(names)} "
                    f"but declares {list(getattr(declared, level))}"
                )
            if table is not None and table.num_rows != rows:
                raise RelabelError(
                    f"{part}: relabeler {self.name!r} returned {table.num_rows} {level} rows "
                    f"for {rows}"
                )
        return output


class TableInputs:
    """`Inputs` over in-memory tables: one (steps, episodes) pair as the whole dataset, or
    several pairs (`of_parts`) as the job would see a dataset's parts. Frame columns, if
    any, are columns of `steps`; `cameras` describes them."""

    def __init__(
        self,
        steps: pa.Table,
        episodes: pa.Table,
        where: str = "in memory",
        cameras: dict[str, CameraInfo] | None = None,
    ):
        self.tables = [(steps, episodes)]
        self.where = where
        self.cameras = dict(cameras or {})

    @property
    def rewards_known(self) -> bool:
        """Unknown when every reward is null, as ingest stores a source without rewards."""
        return not all(
            cols.REWARD in s.column_names
            and s.num_rows
            and s.column(cols.REWARD).null_count == s.num_rows
            for s, _ in self.tables
        )

    @classmethod
    def of_parts(
        cls,
        tables: Sequence[tuple[pa.Table, pa.Table]],
        where: str = "in memory",
        cameras: dict[str, CameraInfo] | None = None,
    ) -> TableInputs:
        inputs = cls(*tables[0], where=where, cameras=cameras)
        inputs.tables = list(tables)
        return inputs

    @property
    def parts(self) -> int:
        return len(self.tables)

    @property
    def steps_schema(self) -> pa.Schema:
        return self.tables[0][0].schema

    @property
    def episodes_schema(self) -> pa.Schema:
        return self.tables[0][1].schema

    def part(self, index: int) -> Part:
        return Part(index, self.parts, f"{self.where} part {index}")

    def summarize(
        self, function: Callable[[pa.Table, pa.Table, Part], Summary], frames: bool = True
    ) -> list[Summary]:
        tables = self.tables if frames else [(_without_frames(s), e) for s, e in self.tables]
        return [function(s, e, self.part(i)) for i, (s, e) in enumerate(tables)]


def _without_frames(steps: pa.Table) -> pa.Table:
    return steps.drop_columns([n for n in steps.column_names if camera_of(n) is not None])


def split_parts(steps: pa.Table, episodes: pa.Table, parts: int) -> list[tuple[pa.Table, pa.Table]]:
    """(steps, episodes) cut into `parts` parts of whole episodes (about equal episode
    counts); `steps` sorted by (episode_id, t), `episodes` by episode_id."""
    lengths = np.asarray(episodes.column(cols.LENGTH).to_numpy(), dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    bounds = np.linspace(0, len(lengths), min(parts, max(len(lengths), 1)) + 1).round()
    bounds = bounds.astype(np.int64)
    return [
        (steps.slice(offsets[a], offsets[b] - offsets[a]), episodes.slice(a, b - a))
        for a, b in zip(bounds[:-1], bounds[1:])
    ]


def relabel_tables(
    relabeler: Relabeler,
    steps: pa.Table,
    episodes: pa.Table,
    where: str = "in memory",
    parts: int = 1,
    cameras: dict[str, CameraInfo] | None = None,
) -> Output:
    """setup, relabel and finish on whole tables in this process, as the job would (tests,
    notebooks, small data): the tables are the whole dataset, cut into `parts` parts of
    whole episodes. `Output.report` is what the job would store in the manifest. A
    relabeler's output must not depend on `parts`: comparing parts=1 with parts=3 is a
    one-line test of that. `cameras` describes the frame columns of `steps`, if any."""
    tables = split_parts(steps, episodes, parts) if parts > 1 else [(steps, episodes)]
    inputs = TableInputs.of_parts(tables, where, cameras)
    relabeler.setup(inputs)
    outputs = [relabeler.run(s, e, inputs.part(i)) for i, (s, e) in enumerate(tables)]

    def joined(level: str) -> pa.Table | None:
        chunks = [getattr(o, level) for o in outputs if getattr(o, level) is not None]
        return pa.concat_tables(chunks) if chunks else None

    return Output(
        steps=joined("steps"),
        episodes=joined("episodes"),
        report=relabeler.finish([o.report for o in outputs]),
    )


def describe_params(params_model: type[BaseModel]) -> str:
    parts = []
    for name, info in params_model.model_fields.items():
        default = "required" if info.is_required() else f"default {info.default!r}"
        parts.append(f"{name} ({default})" + (f": {info.description}" if info.description else ""))
    return "; ".join(parts) or "none"


def _describe(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}" for e in error.errors()
    )


# ---------------------------------------------------------------- helpers for relabelers

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 mixer, elementwise on uint64 (the core of `hash_uniform`)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def hash_uniform(
    seed: int, episode_id: np.ndarray, t: np.ndarray | int = 0, stream: int = 0
) -> np.ndarray:
    """Uniform [0, 1) numbers that depend only on (seed, episode_id, t, stream).

    Counter-based, so the same step gets the same number however episodes are batched.
    """
    with np.errstate(over="ignore"):
        key = splitmix64(
            np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
            ^ np.uint64(stream * 0x632BE59BD9B4E019 & 0xFFFFFFFFFFFFFFFF)
        )
        x = splitmix64(key ^ np.asarray(episode_id).astype(np.uint64))
        x = splitmix64(x ^ np.asarray(t).astype(np.uint64))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def require_rewards(relabeler: str, inputs: Inputs, why: str = "") -> None:
    """For `setup`: one line refusing a dataset whose rewards are unknown (ingested without
    a reward column), before anything is read or written. `why` adds what needs them."""
    if not inputs.rewards_known:
        raise RelabelError(
            f"relabeler {relabeler!r} needs rewards{why}; {inputs.where} has none (ingested "
            "without a reward column: give --map reward=COLUMN)"
        )


def require_columns(
    table: pa.Table, names: tuple[str, ...], level: str, relabeler: str, where: str
) -> None:
    """A clear error when a column a relabeler reads is missing."""
    for name in names:
        head = name.split(".")[0]
        if head not in table.column_names:
            raise RelabelError(
                f"{where}: relabeler {relabeler!r} reads {level} column {name!r}, which the dataset "
                f"does not have; available: {', '.join(table.column_names)}"
            )
