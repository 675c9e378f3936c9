"""The relabel job: attach one column group per relabeler to a dataset version.

    manifest = relabel("data/pendulum", "data/pendulum-rl", relabelers,
                       executor=RayExecutor(), command="hindsight relabel ...")

Top to bottom (`relabel`):

1. `check_plan`, before anything is read or written: every column a relabeler reads exists
   (in the parent or written by an earlier relabeler of this job), no relabeler is given
   twice or writes a column that exists, and each relabeler's `setup` passes its checks on
   the parent's schema (run on a copy, up to its first `inputs.summarize`, which would read
   data; relabelers that read columns of this job are checked once those exist);
2. a `VersionWriter` stages OUT; then for each relabeler, in order:
   - `setup(inputs)` in the driver; `inputs.summarize(function)` runs `function` on every
     part through the executor, reading only the columns the relabeler reads;
   - one task per part reads those columns, camera frames only if the relabeler declares
     them in `Columns.frames` (from the parent and from the groups written
     earlier in this job: later relabelers see earlier ones' columns), runs the set-up
     relabeler (it travels with the task) and writes the group's part
     (`OUT/<relabeler>/steps|episodes/part-i.parquet`, new columns only);
   - `finish(reports)` in the driver: the report stored with the group;
3. the manifest (parent groups inherited by reference, one new group per relabeler with
   name, version, parameters, seed and report) is committed last.

An error anywhere (bad data in a part, a relabeler that cannot run) is raised naming the
relabeler and the part, and the writer removes everything staged: nothing stays behind.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa

from engine.dataset import LEVELS, Dataset, open_dataset
from engine.executor import Executor
from engine.step_frames import image_cameras, part_frames
from engine.storage import StaleWriterError
from engine.writer import (
    VersionWriter,
    WrittenPart,
    assemble_group,
    check_new_output,
    inherit_groups,
    new_manifest,
)
from relabelers import registry
from relabelers.base import Part, Relabeler, RelabelError, Summary
from schemas import steps as cols
from schemas.frames import CameraInfo, frame_column
from schemas.manifest import ColumnGroup, Manifest, RelabelerInfo, public_params

# --------------------------------------------------------------------- creating relabelers


class RelabelerChoice(Protocol):
    name: str
    params: dict[str, Any]


class RelabelChoices(Protocol):
    """What `create_relabelers` needs of a command's options."""

    relabelers: Sequence[RelabelerChoice]
    seed: int
    llm_base_url: str | None
    retry_failed: bool


# Generic options mapped onto relabeler parameters of the same meaning.
GENERIC_PARAMS = {"llm_base_url": "base_url", "retry_failed": "retry_failed"}


def create_relabelers(options: RelabelChoices) -> list[Relabeler]:
    """Every relabeler of the options, in order, created (so their parameters validated)
    with the options' seed; `llm_base_url` / `retry_failed` set the parameters `base_url` /
    `retry_failed` of the relabelers that have them, unless given explicitly."""
    import engine.envs  # noqa: F401  registers hindsight/* gymnasium envs (reward functions)

    relabelers = []
    for choice in options.relabelers:
        relabeler_class = registry.get(choice.name)
        params = dict(choice.params)
        fields = relabeler_class.Params.model_fields
        for option, param in GENERIC_PARAMS.items():
            value = getattr(options, option)
            if param in fields and value not in (None, False) and param not in params:
                params[param] = value
        relabelers.append(relabeler_class(params, seed=options.seed))
    return relabelers


# --------------------------------------------------------------------- checks before writing


class _NeedsData(Exception):
    """Raised by `SchemaInputs.summarize`: `setup`'s checks on the schema are done."""


@dataclass
class SchemaInputs:
    """`Inputs` with the schemas only, for `check_plan`: no data is read."""

    steps_schema: pa.Schema
    episodes_schema: pa.Schema
    parts: int
    cameras: dict[str, CameraInfo] = field(default_factory=dict)
    rewards_known: bool = True
    where: str = ""

    def summarize(
        self, function: Callable[[pa.Table, pa.Table, Part], Summary], frames: bool = True
    ) -> list[Summary]:
        raise _NeedsData


def check_plan(parent: Dataset, relabelers: Sequence[Relabeler]) -> None:
    """Every read column exists (in the parent or written earlier in this job), no two
    relabelers write the same column, no relabeler is given twice or already applied, and
    each relabeler's `setup` passes its checks on the parent's schema (for relabelers that
    read columns written in this job, `relabel` runs those checks once the columns exist).
    Reads only the schemas; raises RelabelError naming the relabeler and what to do.
    Frame columns are available only to relabelers that declare them in `Columns.frames`."""
    available = {level: set(parent.columns(level, frames=False)) for level in LEVELS}
    # Every camera's frames are a step column to relabelers, a video camera's too.
    frame_columns = set(parent.columns("steps")) - available["steps"]
    frame_columns |= {frame_column(camera) for camera in parent.cameras}
    produced: set[str] = set()
    schema_inputs = SchemaInputs(
        parent.arrow_schema("steps"),
        parent.arrow_schema("episodes"),
        parent.num_parts,
        image_cameras(parent.cameras),
        parent.rewards_known,
        parent.uri,
    )
    groups = {g.name for g in parent.manifest.groups}
    owner = {
        (level, f.name): g.name
        for g in parent.manifest.groups
        for level in LEVELS
        for f in getattr(g, f"{level}_columns")
    }
    in_this_job: set[str] = set()
    for position, relabeler in enumerate(relabelers, start=1):
        where = _where(position, relabeler, parent)
        if relabeler.name in in_this_job:
            raise RelabelError(
                f"{where}: {relabeler.name!r} is given twice; a relabeler runs once per "
                "version (relabel the output again for a second run with other parameters)"
            )
        in_this_job.add(relabeler.name)
        if relabeler.name in groups:
            raise RelabelError(
                f"{where}: the dataset already has a column group {relabeler.name!r}; "
                "relabel its parent instead, or apply each relabeler once per version"
            )
        reads, writes = relabeler.reads(), relabeler.writes()
        read_heads = set()
        for level in LEVELS:
            # A column only looked up in the schema must exist all the same.
            schema_only = reads.steps_schema if level == "steps" else ()
            for name in (*getattr(reads, level), *schema_only):
                read_heads.add(name.split(".")[0])
                if name.split(".")[0] in frame_columns:
                    raise RelabelError(
                        f"{where}: reads the frame column {name!r} as a {level} column; "
                        "a relabeler declares the frames it reads in Columns.frames"
                    )
                if name.split(".")[0] not in available[level]:
                    raise RelabelError(
                        f"{where}: reads {level} column {name!r}, which the dataset does not "
                        f"have; {_pixels_only_hint(name, parent)}available {level} columns: "
                        f"{', '.join(sorted(available[level]))}"
                    )
        _check_frames(reads.frames, frame_columns, where)
        if not read_heads & produced:
            _check_setup(relabeler, schema_inputs, where)
        for level in LEVELS:
            clash = available[level] & set(getattr(writes, level))
            if clash:
                holders = sorted({owner.get((level, c), "an earlier relabeler") for c in clash})
                raise RelabelError(
                    f"{where}: would write {level} column(s) {sorted(clash)} that already "
                    f"exist (in {', '.join(map(repr, holders))}); every column belongs to "
                    "exactly one group. Relabel a version without them (for a `query --out` "
                    "or `materialize` copy: its parent, then query again)"
                )
            available[level] |= set(getattr(writes, level))
            produced |= set(getattr(writes, level))


def _check_frames(wanted: Sequence[str], frame_columns: set[str], where: str) -> None:
    """Every frame column a relabeler reads exists (an image or a video camera's: both
    are read as one image per step), or one line saying which there are."""
    for name in wanted:
        if name in frame_columns:
            continue
        if not frame_columns:
            raise RelabelError(
                f"{where}: reads camera frames ({name!r}), but the dataset has none; record "
                "them with `hindsight collect --frames HxW`, or ingest a source with images"
            )
        raise RelabelError(
            f"{where}: reads frame column {name!r}, which the dataset does not have; "
            f"its frame columns: {', '.join(sorted(frame_columns))}"
        )


def _check_setup(relabeler: Relabeler, inputs: SchemaInputs, where: str) -> None:
    """`setup` on a (shallow) copy, against the schemas, up to its first `inputs.summarize`:
    what it sets is not kept, and members it cannot copy (clients, locks) are shared."""
    try:
        copy.copy(relabeler).setup(inputs)
    except _NeedsData:
        pass
    except KeyError as error:  # a schema lookup of a column or field that is not there
        raise RelabelError(f"{where}: {_message(error)}") from None


def _pixels_only_hint(name: str, parent: Dataset) -> str:
    """Why a state column is missing from pixels-only data (collect --pixels-only, ingest of
    an image-only observation): there is no state vector, the frames are the observation."""
    if name.split(".")[0] not in (cols.OBSERVATION, cols.NEXT_OBSERVATION) or not parent.cameras:
        return ""
    camera = sorted(parent.cameras)[0]
    return (
        f"the dataset is pixels only (no state vector: its frames, camera(s) "
        f"{', '.join(sorted(parent.cameras))}, are the observation): relabelers that need "
        "observations (goals, achieved goals) do not apply to it, drex ranks it from its "
        f"frames with --with drex:features={frame_column(camera)}; "
    )


def _where(position: int, relabeler: Relabeler, parent: Dataset) -> str:
    return f"relabeler {position} ({relabeler.name!r}) on {parent.uri}"


def _message(error: BaseException) -> str:
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


# --------------------------------------------------------------------- reading parts


@dataclass(frozen=True)
class PartReader:
    """Reads, for one relabeler, only the columns it reads from a part of the version so
    far (the parent's groups and those written earlier in this job): frame columns only
    when it declares them (`Columns.frames`), one image per step whatever the camera's
    storage (engine/step_frames.py)."""

    dataset: Dataset
    steps_columns: tuple[str, ...]
    episodes_columns: tuple[str, ...]
    frame_columns: tuple[str, ...] = ()

    @classmethod
    def of(cls, dataset: Dataset, relabeler: Relabeler) -> PartReader:
        reads = relabeler.reads()
        present = set(dataset.columns("episodes"))
        steps_columns = [cols.EPISODE_ID, cols.T] + [c.split(".")[0] for c in reads.steps]
        steps_present = set(dataset.columns("steps", frames=False))
        steps_columns += [
            c.split(".")[0] for c in reads.steps_if_present if c.split(".")[0] in steps_present
        ]
        episodes_columns = [cols.EPISODE_ID] + [c.split(".")[0] for c in reads.episodes]
        episodes_columns += [c for c in reads.episodes_if_present if c in present]
        return cls(
            dataset,
            tuple(dict.fromkeys(steps_columns)),
            tuple(dict.fromkeys(episodes_columns)),
            tuple(dict.fromkeys(reads.frames)),
        )

    def part(self, index: int) -> Part:
        return Part(index, self.dataset.num_parts, f"{self.dataset.uri} part {index}")

    def read(
        self, part: Part, frames: bool = True, relabeler: Relabeler | None = None
    ) -> tuple[pa.Table, pa.Table]:
        """The part's columns; with `frames`, the declared frame columns too (last): every
        row's, or only those at `relabeler.frame_rows` (null elsewhere), read from the
        Parquet row groups that hold them (a video camera's: from its episodes' videos)."""
        steps = self.dataset.read_part(part.index, "steps", self.steps_columns)
        episodes = self.dataset.read_part(part.index, "episodes", self.episodes_columns)
        if not (frames and self.frame_columns):
            return steps, episodes
        rows = None if relabeler is None else relabeler.frame_rows(steps, episodes, part)
        frame_table = part_frames(self.dataset, part.index, self.frame_columns, steps, rows)
        for name in self.frame_columns:
            steps = steps.append_column(frame_table.schema.field(name), frame_table[name])
        return steps, episodes


@dataclass(frozen=True)
class Summarized:
    """One part's summary for `setup`; `steps` moves the progress bar."""

    summary: Any
    steps: int


@dataclass(frozen=True)
class RelabeledPart:
    """What one part's task sends back: the files written and the part's report."""

    written: WrittenPart
    report: dict[str, Any]
    steps: int


def _in_task(relabeler: Relabeler, part: Part, work: Callable[[], Any]) -> Any:
    """Run a task's work; bad data or a relabeler that cannot run is raised as a
    RelabelError naming the relabeler and the part."""
    import engine.envs  # noqa: F401  registers hindsight/* gymnasium envs for reward functions

    try:
        return work()
    except StaleWriterError:
        raise  # another run owns the output now: its own message says so
    except (ValueError, KeyError, RuntimeError, OSError) as error:
        message = _message(error)
        if not message.startswith(f"{part}: "):  # relabelers' own errors name the part already
            named = f"relabeler {relabeler.name!r}: "
            message = f"{named}{part}: {message.removeprefix(named)}"
        raise RelabelError(message) from error


def summarize_part(
    reader: PartReader,
    relabeler: Relabeler,
    function: Callable[[pa.Table, pa.Table, Part], Any],
    frames: bool,
    index: int,
) -> Summarized:
    """A task of `setup`'s pass: `function` on one part's columns (`frames`: and frames)."""
    part = reader.part(index)

    def work() -> Summarized:
        steps, episodes = reader.read(part, frames, relabeler)
        return Summarized(function(steps, episodes, part), steps.num_rows)

    return _in_task(relabeler, part, work)


def relabel_part(
    writer: VersionWriter, reader: PartReader, relabeler: Relabeler, index: int
) -> RelabeledPart:
    """A task of the relabel pass: run the relabeler on one part and write its group part."""
    part = reader.part(index)

    def work() -> RelabeledPart:
        steps, episodes = reader.read(part, relabeler=relabeler)
        output = relabeler.run(steps, episodes, part)
        written = writer.write_part(index, output.steps, output.episodes, group=relabeler.name)
        return RelabeledPart(written, output.report, steps.num_rows)

    return _in_task(relabeler, part, work)


@dataclass
class VersionInputs:
    """`Inputs` over the version so far, for one relabeler's `setup`: its schemas and a
    pass over every part through the executor."""

    reader: PartReader
    relabeler: Relabeler
    executor: Executor

    @functools.cached_property
    def steps_schema(self) -> pa.Schema:
        return self.reader.dataset.arrow_schema("steps")

    @functools.cached_property
    def episodes_schema(self) -> pa.Schema:
        return self.reader.dataset.arrow_schema("episodes")

    @property
    def parts(self) -> int:
        return self.reader.dataset.num_parts

    @property
    def cameras(self) -> dict[str, CameraInfo]:
        return image_cameras(self.reader.dataset.cameras)

    @property
    def rewards_known(self) -> bool:
        return self.reader.dataset.rewards_known

    @property
    def where(self) -> str:
        return self.reader.dataset.uri

    def summarize(
        self, function: Callable[[pa.Table, pa.Table, Part], Summary], frames: bool = True
    ) -> list[Summary]:
        results = self.executor.map(
            functools.partial(summarize_part, self.reader, self.relabeler, function, frames),
            list(range(self.parts)),
            description=f"{self.relabeler.name} (setup)",
            total=self.reader.dataset.manifest.steps,
        )
        return [result.summary for result in results]


# --------------------------------------------------------------------- the job


def relabel(
    parent: str,
    output: str,
    relabelers: Sequence[Relabeler],
    *,
    executor: Executor,
    command: str,
) -> Manifest:
    """Apply `relabelers` in order to the version at `parent` and commit the new version
    `output` (parts run through `executor`); `command` is recorded in the manifest.

    Nothing is written when a check fails; a failure later removes what was staged."""
    check_new_output(output)
    dataset = open_dataset(parent)
    check_plan(dataset, relabelers)
    try:
        with VersionWriter(output) as writer:
            new_groups: list[ColumnGroup] = []
            so_far = dataset
            for position, relabeler in enumerate(relabelers, start=1):
                group = _apply(
                    writer, executor, so_far, relabeler, _where(position, relabeler, dataset)
                )
                new_groups.append(group)
                # Later relabelers read this group's columns through the manifest so far.
                so_far = Dataset(
                    dataset.uri,
                    so_far.manifest.model_copy(update={"groups": [*so_far.manifest.groups, group]}),
                )
            manifest = new_manifest(
                groups=inherit_groups(dataset, new_groups),
                parts=list(dataset.manifest.parts),
                operation="relabel",
                command=command,
                parent=dataset,
                details={"relabelers": [g.relabeler.model_dump(mode="json") for g in new_groups]},
            )
            writer.commit(manifest)
    except RelabelError as error:  # the writer has removed the staging by now
        raise RelabelError(f"{error}; nothing was written") from error
    return manifest


def _apply(
    writer: VersionWriter, executor: Executor, dataset: Dataset, relabeler: Relabeler, where: str
) -> ColumnGroup:
    """One relabeler: setup, every part, finish; its column group."""
    reader = PartReader.of(dataset, relabeler)
    try:
        relabeler.setup(VersionInputs(reader, relabeler, executor))
    except KeyError as error:  # a schema lookup of a column or field that is not there
        raise RelabelError(f"{where}: {_message(error)}") from None
    results = executor.map(
        functools.partial(relabel_part, writer, reader, relabeler),
        list(range(dataset.num_parts)),
        description=relabeler.name,
        total=dataset.manifest.steps,
    )
    report = relabeler.finish([result.report for result in results])
    return assemble_group(
        writer.uri,
        relabeler.name,
        [result.written for result in results],
        relabeler=RelabelerInfo(
            name=relabeler.name,
            version=relabeler.version,
            params=public_params(relabeler.params.model_dump(mode="json")),
            seed=relabeler.seed,
            report=report,
        ),
    )
