"""`parquet` and `jsonl`: step tables, one row per step, in any row order.

Columns: `episode_id`, `t` (the step index), `observation`, `action`, and optionally
`reward`, `terminated`, `truncated`, `next_observation`; every other column is kept as a
per-step info column. `--map NAME=SOURCE,...` says which source column holds each of
these (`--map episode_id=episode_index,t=frame_index,observation=observation.state`):
files are read through the map (engine/sources/step_files.py). A source is a file, a
directory searched recursively, or a glob, local or on S3. Each episode must be in one file.

Without a `reward` column the rewards are unknown: the `reward` column is stored with
every value null, the episodes' `return` too, and the manifest says `reward: absent`
(relabelers that need rewards refuse such a dataset in one line). Without `terminated`
no step is terminal; without `truncated` the last step of each episode is truncated.

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

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine import storage
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
    ColumnMap,
    files_below,
    read_step_file,
    step_file_schema,
    step_table_files,
)
from engine.sources.step_images import image_bytes, image_columns
from engine.sources.step_scan import (
    OPTIONAL_COLUMNS,
    VECTOR_COLUMNS,
    FileScan,
    StepColumns,
    scan_file,
)
from engine.sources.tables import EpisodeLabels, build_tables, vector_column
from engine.validate import (
    Problem,
    as_flags,
    check_columns,
    check_core_types,
    check_same_schema,
)
from schemas import lerobot as lr
from schemas import steps as cols


@dataclass(frozen=True, kw_only=True)
class StepTablePart(Part):
    """The episodes with ids in [episode_min, episode_max] of one file, but the skipped."""

    path: str
    column_map: ColumnMap
    absent: tuple[str, ...]  # the optional core columns the source lacks
    episode_min: int
    episode_max: int
    skip_episodes: tuple[int, ...] = ()

    @property
    def file(self) -> str:
        return self.path


class StepTables(Source[StepTablePart]):
    """Step tables in one file format: `Parquet` and `JsonLines` below."""

    takes_column_map = True

    def detect(self, path: str) -> bool:
        if file_name(path).endswith(FILE_SUFFIXES[self.name]):
            return True
        if os.path.isdir(path):  # searched as `plan` will search it: recursively
            return bool(files_below(path, DIRECTORY_SUFFIXES[self.name]))
        return any(n.endswith(DIRECTORY_SUFFIXES[self.name]) for n in directory_names(path))

    def plan(self, path: str, options: PlanOptions) -> IngestPlan:
        if storage.exists(storage.join(path, lr.INFO_PATH)):
            # Its meta/ tables are Parquet too, and no step tables: say what works.
            return IngestPlan.refused(self.name, path, [Problem(
                storage.join(path, lr.INFO_PATH), "format",
                "this is a LeRobot dataset: ingest it with --format lerobot (or give "
                f"--format {self.name} its data/ directory and --map)",
            )])  # fmt: skip
        files = step_table_files(path, self.name)
        column_map = ColumnMap.of(options.column_map)
        stored = {file: step_file_schema(file, self.name) for file in files}
        problems = map_problems(files, stored, column_map)
        if problems:
            return IngestPlan.refused(self.name, path, problems)
        schemas = {file: renamed(schema, column_map) for file, schema in stored.items()}
        images, cameras, problems = image_columns(
            files[0], self.name, schemas[files[0]], column_map
        )
        columns = StepColumns.of(schemas[files[0]], tuple(i.source for i in images))
        problems += schema_problems(schemas, columns)
        if problems:
            return IngestPlan.refused(self.name, path, described(problems, column_map))
        options = replace(
            options, part_steps=image_part_steps(options.part_steps, list(cameras.values()))
        )
        scans: list[FileScan] = []  # the files whose episode ids are usable
        seen_in: dict[int, str] = {}  # episode id -> the first file that holds it
        for file in files:
            scan = scan_file(file, self.name, columns, column_map, scans[-1] if scans else None)
            problems += scan.problems
            if scan.episode_ids is not None:
                problems += episodes_in_two_files(file, scan.episode_ids, seen_in)
                scans.append(scan)
        problems = described(problems, column_map)
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
            for part in file_parts(scan, bad, columns, column_map, labels, options)
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
            metadata=absent_metadata(columns.absent),
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
        core = {cols.EPISODE_ID, cols.T, *VECTOR_COLUMNS, *OPTIONAL_COLUMNS}
        infos = {
            name: table.column(name).combine_chunks()
            for name in table.column_names
            if name not in core
        }

        def flags(name: str) -> np.ndarray | None:
            if name in part.absent:
                return None
            return as_flags(table.column(name).to_numpy(zero_copy_only=False))

        tables = build_tables(
            episode_ids=table.column(cols.EPISODE_ID).to_numpy().astype(np.int64),
            t=table.column(cols.T).to_numpy(),
            observation=(
                vector_column(table.column(cols.OBSERVATION))
                if cols.OBSERVATION in table.column_names
                else None
            ),
            action=action,
            reward=None if cols.REWARD in part.absent else table.column(cols.REWARD).to_numpy(),
            terminated=flags(cols.TERMINATED),
            truncated=flags(cols.TRUNCATED),
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
    episode_column, step_column = cols.EPISODE_ID, cols.T
    filters = [(episode_column, ">=", part.episode_min), (episode_column, "<=", part.episode_max)]
    table = read_step_file(
        part.path,
        format,
        filters=filters if format == "parquet" else None,
        column_map=part.column_map,
    )
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


def map_problems(
    files: list[str], schemas: Mapping[str, pa.Schema], column_map: ColumnMap
) -> list[Problem]:
    """What is wrong with `--map` in the first file it does not fit (the others have the
    first's columns, or a problem later); a file other than the first that lacks the
    mapped columns is likely no step table (LeRobot's meta/ next to its data/)."""
    for file in files:
        problems = column_map.problems(file, schemas[file].names)
        if problems and file != files[0]:
            hint = f"; {files[0]} has them: is this file a step table?"
            return [replace(p, message=p.message + hint) for p in problems]
        if problems:
            return problems
    return []


def renamed(schema: pa.Schema, column_map: ColumnMap) -> pa.Schema:
    """A file's schema with hindsight's names (`--map`)."""
    names = column_map.renamed(schema.names)
    return pa.schema([f.with_name(n) for f, n in zip(schema, names)], schema.metadata)


def described(problems: list[Problem], column_map: ColumnMap) -> list[Problem]:
    """Problems naming a mapped column by its name in the source, as the user knows it."""
    return [replace(p, column=column_map.describe(p.column)) for p in problems]


def absent_metadata(absent: tuple[str, ...]) -> dict[str, Any]:
    """What the manifest says about the optional core columns a source lacks."""
    return dict.fromkeys(absent, cols.ABSENT)


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
    numbers = (cols.REWARD, cols.T)
    flags = (cols.TERMINATED, cols.TRUNCATED)
    vectors = [name for name in VECTOR_COLUMNS if name not in columns.images]
    return problems + check_core_types(files[0], schemas[files[0]], numbers, vectors, flags)


def episodes_in_two_files(
    path: str, episode_ids: np.ndarray, seen_in: dict[int, str]
) -> list[Problem]:
    """Episodes of this file that an earlier file holds too; records this file's."""
    problems = [
        Problem(
            path,
            cols.EPISODE_ID,
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
    column_map: ColumnMap,
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
                column_map=column_map,
                absent=columns.absent,
                episode_min=low,
                episode_max=high,
                skip_episodes=tuple(int(e) for e in scan.episode_ids[inside]),
                steps=int(kept_counts[start:stop].sum()),
                labels=labels,
            )
        )
    return parts
