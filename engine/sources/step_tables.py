"""`parquet` and `jsonl`: step tables, one row per step, in any row order.

Columns: an episode id and a step index (names configurable: `--episode-column`,
`--step-column`), `observation`, `action`, `reward`, `terminated`, `truncated`, optional
`next_observation`; every other column is kept as a per-step info column. A source is a
file, a directory of files or a glob, local or on S3. Each episode must be in one file.

A column of encoded images (binary PNG/JPEG/WebP bytes, or a `{bytes, path}` struct as
Hugging Face datasets and LeRobot store image features; recognized by the first frame's
magic number) is a camera named after the column (`observation.images.top` ->
`observation_images_top`; an image `observation` column is camera `observation` and the
steps table then has no `observation` column): its frames are stored as they came, never
decoded and re-encoded, and checked frame by frame in the part tasks.

Planning reads the cheap columns of each file (ids, step indices, rewards, flags, infos,
and the sizes of list vectors), checks them, and cuts each file into parts of episode id
ranges; a part reads its file with a filter on that range. Step indices are whole numbers;
flags are booleans or 0/1, set only on an episode's last step; rewards, observations and
actions hold numbers (a string or boolean column is refused, never cast).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.sources.base import (
    IngestPlan,
    Part,
    PlanOptions,
    Source,
    directory_names,
    file_name,
    part_ranges,
    source_label,
)
from engine.sources.images import image_part_steps
from engine.sources.step_files import (
    DIRECTORY_SUFFIXES,
    FILE_SUFFIXES,
    read_step_file,
    step_file_schema,
    step_table_files,
)
from engine.sources.step_images import image_bytes, image_columns
from engine.sources.tables import EpisodeLabels, build_tables, vector_column
from engine.validate import (
    Problem,
    as_flags,
    changes_within_episodes,
    check_columns,
    check_core_types,
    check_finite,
    check_flag_values,
    check_flags_at_episode_ends,
    check_not_null,
    check_row_shapes,
    check_same_schema,
    check_step_index,
    check_whole_numbers,
)
from schemas import steps as cols

VECTOR_COLUMNS = (cols.OBSERVATION, cols.ACTION, cols.NEXT_OBSERVATION)


@dataclass(frozen=True, kw_only=True)
class StepTablePart(Part):
    """The episodes with ids in [episode_min, episode_max] of one file, but the skipped."""

    path: str
    episode_column: str
    step_column: str
    episode_min: int
    episode_max: int
    skip_episodes: tuple[int, ...] = ()

    @property
    def file(self) -> str:
        return self.path


class StepTables(Source[StepTablePart]):
    """Step tables in one file format: `Parquet` and `JsonLines` below."""

    def detect(self, path: str) -> bool:
        if file_name(path).endswith(FILE_SUFFIXES[self.name]):
            return True
        return any(n.endswith(DIRECTORY_SUFFIXES[self.name]) for n in directory_names(path))

    def plan(self, path: str, options: PlanOptions) -> IngestPlan:
        files = step_table_files(path, self.name)
        schemas = {file: step_file_schema(file, self.name) for file in files}
        images, cameras, problems = image_columns(files[0], self.name, schemas[files[0]])
        columns = StepColumns.of(schemas[files[0]], options, tuple(i.source for i in images))
        problems += schema_problems(schemas, columns)
        if problems:
            return IngestPlan.refused(self.name, path, problems)
        options = replace(
            options, part_steps=image_part_steps(options.part_steps, list(cameras.values()))
        )
        scans: list[FileScan] = []  # the files whose episode ids are usable
        seen_in: dict[int, str] = {}  # episode id -> the first file that holds it
        for file in files:
            scan = scan_file(file, self.name, columns, scans[-1] if scans else None)
            problems += scan.problems
            if scan.episode_ids is not None:
                problems += episodes_in_two_files(file, scan.episode_ids, columns.episode, seen_in)
                scans.append(scan)
        # Episode ids name one episode across the whole source: an episode with a problem
        # in any file (or spread over two files) is left out everywhere.
        bad = np.fromiter({p.episode for p in problems if p.episode is not None}, np.int64)
        info_changes = scans[-1].info_changes if scans else {}
        episode_info_columns = [n for n in columns.infos if not info_changes.get(n, False)]
        env_id = options.env_id or "unknown"
        labels = EpisodeLabels(env_id, source_label(self.name, path), tuple(episode_info_columns))
        parts = [
            replace(part, images=tuple(images), cameras=cameras)
            for scan in scans
            for part in file_parts(scan, bad, columns, labels, options)
        ]
        # Parts in episode order, so that the dataset is sorted by episode id where the
        # source allows it.
        parts.sort(key=lambda part: part.episode_min)
        return IngestPlan(
            format=self.name,
            source=path,
            env_id=env_id,
            parts=parts,
            steps=sum(part.steps for part in parts),
            episodes=sum(int(scan.kept(bad).sum()) for scan in scans),
            skipped=problems,
            episode_info_columns=episode_info_columns,
            images=images,
            cameras=cameras,
        )

    def read_part(self, part: StepTablePart) -> tuple[pa.Table, pa.Table] | tuple:
        table = read_episode_range(part, self.name)
        frames = {image.camera: image_bytes(table.column(image.source)) for image in part.images}
        table = table.drop_columns([image.source for image in part.images])
        action = table.column(cols.ACTION)
        if pa.types.is_integer(action.type):
            action = action.combine_chunks().cast(pa.int64())
        else:
            action = vector_column(action)
        core = {part.episode_column, part.step_column, *VECTOR_COLUMNS, cols.REWARD}
        core |= {cols.TERMINATED, cols.TRUNCATED}
        infos = {
            name: table.column(name).combine_chunks()
            for name in table.column_names
            if name not in core
        }
        tables = build_tables(
            episode_ids=table.column(part.episode_column).to_numpy().astype(np.int64),
            t=table.column(part.step_column).to_numpy(),
            observation=(
                vector_column(table.column(cols.OBSERVATION))
                if cols.OBSERVATION in table.column_names
                else None
            ),
            action=action,
            reward=table.column(cols.REWARD).to_numpy(),
            terminated=as_flags(table.column(cols.TERMINATED).to_numpy(zero_copy_only=False)),
            truncated=as_flags(table.column(cols.TRUNCATED).to_numpy(zero_copy_only=False)),
            next_observation=(
                vector_column(table.column(cols.NEXT_OBSERVATION))
                if cols.NEXT_OBSERVATION in table.column_names
                else None
            ),
            infos=infos,
            labels=part.labels,
        )
        return (*tables, frames) if part.images else tables


class Parquet(StepTables):
    name = "parquet"


class JsonLines(StepTables):
    name = "jsonl"


# ---------------------------------------------------------------- files


def read_episode_range(part: StepTablePart, format: str) -> pa.Table:
    """The rows of a part's episodes, sorted by (episode, step)."""
    episode_column, step_column = part.episode_column, part.step_column
    filters = [(episode_column, ">=", part.episode_min), (episode_column, "<=", part.episode_max)]
    table = read_step_file(part.path, format, filters=filters if format == "parquet" else None)
    episode_ids = table.column(episode_column).cast(pa.int64())
    mask = pc.and_(
        pc.greater_equal(episode_ids, part.episode_min),
        pc.less_equal(episode_ids, part.episode_max),
    )
    if part.skip_episodes:
        mask = pc.and_(mask, pc.invert(pc.is_in(episode_ids, pa.array(part.skip_episodes))))
    table = table.filter(mask)
    return table.take(
        pc.sort_indices(table, [(episode_column, "ascending"), (step_column, "ascending")])
    )


# ---------------------------------------------------------------- planning


@dataclass(frozen=True)
class StepColumns:
    """The columns a planning pass reads, named as in the source."""

    episode: str
    step: str
    infos: tuple[str, ...]  # every column that is not a core column
    list_vectors: tuple[str, ...]  # vectors stored as lists of any size: sizes are checked
    images: tuple[str, ...] = ()  # columns of encoded images: cameras

    @property
    def required(self) -> list[str]:
        return [
            self.episode,
            self.step,
            cols.OBSERVATION,
            cols.ACTION,
            cols.REWARD,
            cols.TERMINATED,
            cols.TRUNCATED,
        ]

    @property
    def boundary_columns(self) -> list[str]:
        """What the planning pass reads: everything but vectors of a fixed size."""
        return [
            self.episode,
            self.step,
            cols.REWARD,
            cols.TERMINATED,
            cols.TRUNCATED,
            *self.infos,
            *self.list_vectors,
        ]

    @classmethod
    def of(
        cls, schema: pa.Schema, options: PlanOptions, images: tuple[str, ...] = ()
    ) -> StepColumns:
        """The columns of a source whose files all have `schema`, with these image columns."""
        required = cls(options.episode_column, options.step_column, (), ()).required
        core = {*required, cols.NEXT_OBSERVATION, *images}
        list_types = (pa.types.is_list, pa.types.is_large_list)
        return cls(
            episode=options.episode_column,
            step=options.step_column,
            infos=tuple(n for n in schema.names if n not in core),
            list_vectors=tuple(
                n
                for n in VECTOR_COLUMNS
                if n in schema.names
                and n not in images
                and any(is_list(schema.field(n).type) for is_list in list_types)
            ),
            images=images,
        )


def schema_problems(schemas: Mapping[str, pa.Schema], columns: StepColumns) -> list[Problem]:
    """Every file has the required columns, and the same columns and types as the first;
    the first file's core columns have types the engine can store without coercion."""
    files = list(schemas)
    reference = {f.name: str(f.type) for f in schemas[files[0]]}
    problems: list[Problem] = []
    for file in files:
        problems += check_columns(file, schemas[file].names, columns.required)
        if file != files[0]:
            types = {f.name: str(f.type) for f in schemas[file]}
            problems += check_same_schema(files[0], reference, file, types)
    # The other files have the same types, or a problem above.
    numbers = (cols.REWARD, columns.step)
    flags = (cols.TERMINATED, cols.TRUNCATED)
    vectors = [name for name in VECTOR_COLUMNS if name not in columns.images]
    return problems + check_core_types(files[0], schemas[files[0]], numbers, vectors, flags)


@dataclass
class FileScan:
    """What the planning pass found in one file, and what it knows from the files before."""

    path: str
    problems: list[Problem] = field(default_factory=list)
    episode_ids: np.ndarray | None = None  # unique, sorted; None when the ids are unusable
    steps_per_episode: np.ndarray | None = None
    # Since the first file: does each info column change inside some episode?
    info_changes: dict[str, bool] = field(default_factory=dict)
    # Since the first file: values per row of each list vector (the first row sets it).
    vector_sizes: dict[str, int] = field(default_factory=dict)

    def kept(self, bad: np.ndarray) -> np.ndarray:
        """Which of the file's episodes are ingested (a mask over `episode_ids`)."""
        return ~np.isin(self.episode_ids, bad)


def scan_file(path: str, format: str, columns: StepColumns, before: FileScan | None) -> FileScan:
    """Read the boundary columns of one file and check them; `before` is the scan of the
    previous file with usable episode ids (vector sizes and info changes so far)."""
    table = read_step_file(path, format, columns.boundary_columns)
    scan = FileScan(
        path,
        info_changes=dict(before.info_changes) if before else dict.fromkeys(columns.infos, False),
        vector_sizes=dict(before.vector_sizes) if before else {},
    )
    episode_ids, scan.problems = usable_episode_ids(path, columns.episode, table)
    if episode_ids is None:
        return scan
    t_column = table.column(columns.step)
    t_values = pc.fill_null(t_column, -1).to_numpy(zero_copy_only=False)
    t = t_values.astype(np.int64)  # fractional indices are refused below, never truncated
    order = np.lexsort((t, episode_ids))
    sorted_ids = episode_ids[order]
    problems = scan.problems
    problems += check_not_null(path, columns.step, _valid(t_column), episode_ids)
    problems += check_whole_numbers(path, columns.step, t_values, episode_ids)
    problems += check_step_index(path, sorted_ids, t[order], columns.step)
    problems += reward_problems(path, table.column(cols.REWARD), episode_ids, t)
    problems += flag_problems(path, table, sorted_ids, t[order], order)
    for name in columns.list_vectors:
        problems += vector_size_problems(
            path, name, table.column(name), episode_ids, scan.vector_sizes
        )
    starts = np.ones(len(sorted_ids), bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    for name in columns.infos:
        # Once a column changed in some episode it is a step column: no need to look again.
        if not scan.info_changes[name]:
            scan.info_changes[name] = info_changes_within_episodes(
                table.column(name), order, starts
            )
    scan.episode_ids, scan.steps_per_episode = np.unique(sorted_ids, return_counts=True)
    return scan


def _valid(column: pa.ChunkedArray) -> np.ndarray:
    return pc.is_valid(column).to_numpy(zero_copy_only=False)


def usable_episode_ids(
    path: str, episode_column: str, table: pa.Table
) -> tuple[np.ndarray | None, list[Problem]]:
    """The episode id of every row as int64; None, with a problem of the whole file, when
    the column does not hold integers or some rows have none."""
    column = table.column(episode_column)
    if not pa.types.is_integer(column.type):
        return None, [Problem(path, episode_column, f"must hold integers, has type {column.type}")]
    valid = _valid(column)
    if not valid.all():
        missing = int((~valid).sum())
        return None, [Problem(path, episode_column, f"{missing} row(s) have no episode id")]
    return column.to_numpy().astype(np.int64), []


def reward_problems(
    path: str, reward: pa.ChunkedArray, episode_ids: np.ndarray, t: np.ndarray
) -> list[Problem]:
    """Rewards are present and finite as stored (float32); their type was checked with the
    schema, so the cast below converts numbers only."""
    problems = check_not_null(path, cols.REWARD, _valid(reward), episode_ids)
    values = pc.fill_null(reward.cast(pa.float64()), 0.0).to_numpy()
    return problems + check_finite(path, cols.REWARD, values, episode_ids, t)


def flag_problems(
    path: str, table: pa.Table, sorted_ids: np.ndarray, sorted_t: np.ndarray, order: np.ndarray
) -> list[Problem]:
    """`terminated` and `truncated` are present, booleans or 0/1, and set only on the last
    step of their episode. Rows in (episode, step) `order`."""
    problems = []
    for name in (cols.TERMINATED, cols.TRUNCATED):
        column = table.column(name)
        problems += check_not_null(path, name, _valid(column)[order], sorted_ids)
        fill = False if pa.types.is_boolean(column.type) else 0  # missing: reported above
        values = pc.fill_null(column, fill).to_numpy(zero_copy_only=False)[order]
        problems += check_flag_values(path, name, values, sorted_ids, sorted_t)
        problems += check_flags_at_episode_ends(path, name, values, sorted_ids, sorted_t)
    return problems


def vector_size_problems(
    path: str,
    name: str,
    column: pa.ChunkedArray,
    episode_ids: np.ndarray,
    expected_sizes: dict[str, int],
) -> list[Problem]:
    """Every row of a list vector has a value and as many values as the first row that
    has one (in this file or an earlier one; recorded in `expected_sizes`)."""
    valid = _valid(column)
    problems = check_not_null(path, name, valid, episode_ids)
    sizes = pc.fill_null(pc.list_value_length(column), -1).to_numpy()
    if valid.any():
        expected_sizes.setdefault(name, int(sizes[np.argmax(valid)]))
    expected = expected_sizes.get(name, 0)
    sizes = np.where(valid, sizes, expected)  # missing rows are reported above
    return problems + check_row_shapes(path, name, sizes, expected, episode_ids)


def info_changes_within_episodes(
    column: pa.ChunkedArray, order: np.ndarray, starts: np.ndarray
) -> bool:
    """Whether an info column changes inside some episode (rows in `order`, episodes
    starting where `starts` is set). Nested values are compared as JSON."""
    if pa.types.is_nested(column.type):
        values = np.asarray(column.to_pylist(), dtype=object)
        values = np.asarray([json.dumps(v, default=_json_bytes) for v in values[order]])
    else:
        values = column.to_numpy(zero_copy_only=False)[order]
    return changes_within_episodes(values, starts)


def _json_bytes(value: object) -> str:
    """Bytes inside a nested info value, comparable as JSON."""
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def episodes_in_two_files(
    path: str, episode_ids: np.ndarray, episode_column: str, seen_in: dict[int, str]
) -> list[Problem]:
    """Episodes of this file that an earlier file holds too; records this file's."""
    problems = [
        Problem(
            path,
            episode_column,
            f"episode also appears in {seen_in[episode]}; each episode must be in one file",
            episode,
        )
        for episode in episode_ids.tolist()
        if episode in seen_in
    ]
    for episode in episode_ids.tolist():
        seen_in.setdefault(episode, path)
    return problems


def file_parts(
    scan: FileScan,
    bad: np.ndarray,
    columns: StepColumns,
    labels: EpisodeLabels,
    options: PlanOptions,
) -> list[StepTablePart]:
    """One file's kept episodes cut into parts; each part names an episode id range and
    the skipped episodes inside it."""
    keep = scan.kept(bad)
    kept_ids, kept_counts = scan.episode_ids[keep], scan.steps_per_episode[keep]
    parts = []
    for start, stop in part_ranges(kept_counts, options.part_steps):
        low, high = int(kept_ids[start]), int(kept_ids[stop - 1])
        inside = (scan.episode_ids >= low) & (scan.episode_ids <= high) & ~keep
        parts.append(
            StepTablePart(
                path=scan.path,
                episode_column=columns.episode,
                step_column=columns.step,
                episode_min=low,
                episode_max=high,
                skip_episodes=tuple(int(e) for e in scan.episode_ids[inside]),
                steps=int(kept_counts[start:stop].sum()),
                labels=labels,
            )
        )
    return parts
