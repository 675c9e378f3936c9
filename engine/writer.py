"""Writing versions: one writer for every job that commits a directory.

Shaped like a Ray Data Datasink (`on_write_start`, `write`, `on_write_complete`,
`on_write_failed`):

    with VersionWriter("data/pendulum-rl") as writer:     # begin(): stage the directory
        written = [writer.write_part(i, steps, episodes) for ...]   # in the driver or in
                                                          # Ray tasks (the writer travels)
        writer.commit(manifest)                           # the commit file, last
    # any exception inside the block: abort(), nothing stays behind

The directory holds `_staging` while a run writes; the marker holds the run's token, and
every file of the run is written only after checking that the marker still holds it
(`storage.check_staging`), so a Ray task outliving its killed driver cannot overwrite the
files of the re-run, nor add files to a committed directory. The commit file
(`manifest.json` for a dataset version, `index.json` for shards) is written last and
atomically: readers never see half a version. A committed directory is immutable:
`check_new_output` refuses it at once, before any work, with the same message everywhere.

Also here: the Parquet layout of data files and the manifest of a new version (parts,
column groups, lineage).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine import storage
from engine.dataset import BASE_GROUP, LEVELS, Dataset, DatasetError
from schemas import steps as cols
from schemas.frames import FRAMES_GROUP, CameraInfo, camera_of
from schemas.manifest import (
    MANIFEST_NAME,
    ColumnGroup,
    DataFile,
    FieldInfo,
    HistoryEntry,
    Manifest,
    PartInfo,
    RelabelerInfo,
    content_id,
    now_iso,
    public_params,
    public_text,
)
from schemas.retry import retrying

# Parquet row groups are the unit a reader can skip. Step files: small enough that a query
# for 1% of episodes scattered at random skips ~80% of a file, large enough that a full
# scan stays within ~10% of 64k-row groups (bench/results/query.json; 1024 rows made it 30%
# slower, query-compare-1024-rows.json). Episode files are small and read whole.
ROW_GROUP_ROWS = MappingProxyType({"steps": 4096, "episodes": 64 * 1024})
# Frames' row groups hold ~1 MiB, so that a few frames (language keyframes) or a part read a
# row group at a time (shard writer) hold a MiB, not 4096 frames (48 MB of noisy 84x84 PNG).
FRAME_ROW_GROUP_BYTES = 2**20


def row_group_rows(table: pa.Table, level: str) -> int:
    """Rows per Parquet row group: ROW_GROUP_ROWS, fewer for big camera frames."""
    frames = [n for n in table.column_names if camera_of(n) is not None]
    rows = ROW_GROUP_ROWS[level]
    if frames and table.num_rows:
        per_row = sum(table.column(n).nbytes for n in frames) / table.num_rows
        rows = int(min(rows, max(1, FRAME_ROW_GROUP_BYTES // max(per_row, 1))))
    return rows


DEFAULT_PART_STEPS = 1_000_000


class OutputExistsError(DatasetError, ValueError):
    """The output is committed already (immutable) or holds something that is not ours:
    a wrong value given by the user (ValueError), about a dataset (DatasetError)."""


def check_new_output(uri: str, commit_file: str = MANIFEST_NAME) -> str:
    """The normalized `uri`, if a new version may be written there: refuse a committed one
    (it holds `commit_file`) or a non-empty directory that is not a dead run's staging.
    Cheap: commands call it before any work starts, and `VersionWriter.begin` again."""
    uri = storage.normalize(uri)
    if storage.exists(storage.join(uri, commit_file)):
        raise OutputExistsError(
            f"{uri} is already committed ({commit_file}); versions are immutable, write to "
            "a new path"
        )
    if storage.is_s3(uri) or _is_directory(uri):
        leftovers = storage.list_files(uri)
        if leftovers and storage.join(uri, storage.STAGING_MARKER) not in leftovers:
            raise OutputExistsError(
                f"{uri} exists, is not empty and was not written by hindsight; choose "
                "another output path"
            )
    elif storage.exists(uri):
        raise OutputExistsError(f"{uri} is an existing file; choose another output path")
    return uri


def _is_directory(path: str) -> bool:
    import os

    return os.path.isdir(path)


# ---------------------------------------------------------------- data files


def part_path(group: str, level: str, index: int) -> str:
    return f"{group}/{level}/part-{index:05d}.parquet"


def write_parquet(
    uri: str,
    table: pa.Table,
    row_group_rows: int,
    before_commit: Callable[[], None] | None = None,
) -> DataFile:
    """Write one Parquet file (zstd, dictionary only for ids and strings, a CRC per page)
    and checksum it. Readers through pyarrow check the page CRCs, so a file damaged on disk
    fails to read instead of giving wrong numbers."""
    dictionary_columns = [
        name
        for name in table.column_names
        if name in cols.DICTIONARY_COLUMNS or pa.types.is_string(table.schema.field(name).type)
    ]

    def produce(sink) -> None:
        pq.write_table(
            table,
            sink,
            compression="zstd",
            row_group_size=row_group_rows,
            use_dictionary=dictionary_columns,
            write_statistics=True,
            write_page_checksum=True,
        )

    # Streamed to the file and hashed on the way: no in-memory copy of the file, no re-read.
    size, sha256 = storage.write_stream(uri, produce, before_commit)
    return DataFile(path="", bytes=size, sha256=sha256, rows=table.num_rows)


def check_sorted(steps: pa.Table, where: str) -> None:
    """Steps must be sorted by (episode_id, t): episodes are contiguous runs."""
    episode_ids = cols.arrow_to_numpy(steps.column(cols.EPISODE_ID))
    t = cols.arrow_to_numpy(steps.column(cols.T))
    order_ok = np.all(
        (episode_ids[1:] > episode_ids[:-1])
        | ((episode_ids[1:] == episode_ids[:-1]) & (t[1:] > t[:-1]))
    )
    if not order_ok:
        raise DatasetError(f"{where}: steps are not sorted by (episode_id, t)")


def fields_of(table: pa.Table | pa.Schema | None) -> list[FieldInfo]:
    """The column names and type names a manifest records for a table."""
    if table is None:
        return []
    schema = table if isinstance(table, pa.Schema) else table.schema
    return [FieldInfo(name=f.name, type=str(f.type)) for f in schema]


@dataclass(frozen=True)
class WrittenPart:
    """What writing one part of one group produced (returned from Ray tasks to the driver)."""

    group: str
    index: int
    steps_file: DataFile | None
    episodes_file: DataFile | None
    steps_fields: list[FieldInfo] = field(default_factory=list)
    episodes_fields: list[FieldInfo] = field(default_factory=list)
    part: PartInfo | None = None  # the base group's rows: counts and episode id range

    @property
    def steps(self) -> int:
        """Rows of steps written (drives progress bars)."""
        return self.steps_file.rows if self.steps_file else 0

    @property
    def episodes(self) -> int:
        """Rows of episodes written (drives progress bars)."""
        return self.episodes_file.rows if self.episodes_file else 0


@dataclass(frozen=True)
class WrittenParts:
    """Part `index` of a self-contained version: its base part and, with frames, the frames
    part next to it (`VersionWriter.write_base_part`)."""

    parts: tuple[WrittenPart, ...]

    @property
    def steps(self) -> int:
        return sum(w.steps for w in self.parts if w.group == BASE_GROUP)

    @property
    def episodes(self) -> int:
        return sum(w.episodes for w in self.parts if w.group == BASE_GROUP)


def flatten(written: Sequence[WrittenPart | WrittenParts]) -> list[WrittenPart]:
    return [
        w for item in written for w in (item.parts if isinstance(item, WrittenParts) else [item])
    ]


# ---------------------------------------------------------------- the writer


class VersionWriter:
    """Stages, writes and commits one new directory: a dataset version or a set of shards.

    `begin()` in the driver; `write_part` / `write_file` in the driver or in Ray tasks (the
    writer is plain data and travels with a task); `commit()` or `abort()` in the driver.
    As a context manager it begins on entry and aborts on any exception.
    """

    def __init__(self, uri: str, *, commit_file: str = MANIFEST_NAME):
        self.uri = storage.normalize(uri)
        self.commit_file = commit_file
        self.token: str | None = None
        self.committed = False

    # -- on_write_start
    def begin(self) -> VersionWriter:
        """Refuse a committed or foreign output, clear a dead run's leftovers, and stage."""
        check_new_output(self.uri, self.commit_file)
        storage.delete_tree(self.uri)
        self.token = storage.start_staging(self.uri)
        return self

    def __enter__(self) -> VersionWriter:
        return self.begin()

    def __exit__(
        self,
        error_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error_type is not None and not self.committed:
            self.abort()

    # -- write
    def check_fence(self) -> None:
        """Raise StaleWriterError unless this run still owns the directory."""
        if self.token is None:
            raise DatasetError(f"{self.uri}: the writer was not begun")
        storage.check_staging(self.uri, self.token)

    def write_file(self, relative_path: str, data: bytes) -> DataFile:
        """One whole object (a shard, a report), atomically, only while this run owns the
        directory."""
        uri = storage.join(self.uri, relative_path)
        storage.write_bytes(uri, data, before_commit=self.check_fence)
        return DataFile(
            path=relative_path, bytes=len(data), sha256=storage.sha256_bytes(data), rows=0
        )

    def write_part(
        self,
        index: int,
        steps: pa.Table | None,
        episodes: pa.Table | None,
        group: str = BASE_GROUP,
    ) -> WrittenPart:
        """Part `index` of a column group: whole episodes, rows aligned with the base part.
        The base group's steps must be sorted by (episode_id, t); either level of another
        group may be absent."""
        part = None
        if group == BASE_GROUP:
            if steps is None or episodes is None:
                raise DatasetError(f"{self.uri} part {index}: the base group needs both levels")
            check_sorted(steps, f"{self.uri} part {index}")
            episode_ids = cols.arrow_to_numpy(episodes.column(cols.EPISODE_ID))
            part = PartInfo(
                steps=steps.num_rows,
                episodes=episodes.num_rows,
                min_episode_id=int(episode_ids.min()) if len(episode_ids) else 0,
                max_episode_id=int(episode_ids.max()) if len(episode_ids) else -1,
            )
        files: dict[str, DataFile | None] = {"steps": None, "episodes": None}
        for level, table in (("steps", steps), ("episodes", episodes)):
            if table is None or table.num_columns == 0:
                continue
            relative_path = part_path(group, level, index)
            data_file = write_parquet(
                storage.join(self.uri, relative_path),
                table,
                row_group_rows(table, level),
                self.check_fence,
            )
            files[level] = data_file.model_copy(update={"path": relative_path})
        return WrittenPart(
            group=group,
            index=index,
            steps_file=files["steps"],
            episodes_file=files["episodes"],
            steps_fields=fields_of(steps) if files["steps"] else [],
            episodes_fields=fields_of(episodes) if files["episodes"] else [],
            part=part,
        )

    def write_base_part(self, index: int, steps: pa.Table, episodes: pa.Table) -> WrittenParts:
        """Part `index` of a self-contained version from tables holding every column: the
        frame columns (`frame_<camera>`) go to the frames group, the rest to the base group,
        same rows in the same order; a video camera's (one video per episode) from the
        episodes table to the frames group's episodes table."""
        frame_columns = [name for name in steps.column_names if camera_of(name) is not None]
        videos = [name for name in episodes.column_names if camera_of(name) is not None]
        parts = [
            self.write_part(index, steps.drop_columns(frame_columns), episodes.drop_columns(videos))
        ]
        if frame_columns or videos:
            frames = (steps.select(frame_columns) if frame_columns else None,)
            frames += (episodes.select(videos) if videos else None,)
            parts.append(self.write_part(index, *frames, FRAMES_GROUP))
        return WrittenParts(tuple(parts))

    # -- on_write_complete
    def commit(self, content: Manifest | bytes) -> Manifest | None:
        """Write the commit file last and atomically; from now on readers see the version.

        A manifest's group roots are stored relative to the version (its own files: ".";
        a parent's: "../parent"), so a tree of versions can be moved, copied or synced to
        S3 together. Returns the manifest as given (roots as full URIs)."""
        if isinstance(content, Manifest):
            stored = content.model_copy(
                update={
                    "groups": [
                        group.model_copy(update={"root": storage.relative_to(self.uri, group.root)})
                        for group in content.groups
                    ]
                }
            )
            data = stored.to_json().encode()
        else:
            data = content
        self.check_fence()  # still this run's directory: commit
        storage.write_bytes(storage.join(self.uri, self.commit_file), data)
        # Committed from here on: readers may already see it, so no error below may abort
        # (remove) it. A marker left behind is harmless: the commit file is what counts.
        self.committed = True
        try:
            storage.end_staging(self.uri)
        except OSError as error:
            logging.getLogger(__name__).warning(
                "%s: committed, but the staging marker stays (%s)", self.uri, error
            )
        return content if isinstance(content, Manifest) else None

    # -- on_write_failed
    def abort(self) -> None:
        """Remove what this run staged, unless another run has taken the directory over."""
        if self.token is not None and not self.committed:
            # A task of this run interrupted mid-write may still add a file for a moment
            # (its next fence check stops it): try again rather than leave files behind.
            retrying(lambda error: isinstance(error, OSError), attempts=3)(
                storage.discard_staging, self.uri, self.token
            )


# ---------------------------------------------------------------- manifests


def assemble_group(
    dataset_uri: str,
    name: str,
    written: Sequence[WrittenPart],
    relabeler: RelabelerInfo | None = None,
    cameras: dict[str, CameraInfo] | None = None,
) -> ColumnGroup:
    """A column group from the parts written for it (in any order); `cameras` for the frames
    group (schemas/frames.py)."""
    ordered = sorted(written, key=lambda w: w.index)
    return ColumnGroup(
        cameras=cameras or {},
        name=name,
        root=storage.normalize(dataset_uri),
        steps_files=[w.steps_file for w in ordered if w.steps_file is not None],
        episodes_files=[w.episodes_file for w in ordered if w.episodes_file is not None],
        steps_columns=next((w.steps_fields for w in ordered if w.steps_fields), []),
        episodes_columns=next((w.episodes_fields for w in ordered if w.episodes_fields), []),
        relabeler=relabeler,
    )


def new_manifest(
    *,
    groups: list[ColumnGroup],
    parts: list[PartInfo],
    operation: str,
    command: str,
    parent: Dataset | None = None,
    metadata: dict[str, Any] | None = None,
    details: dict[str, Any] | None = None,
) -> Manifest:
    """The manifest of a new version, with its lineage appended to the parent's history.
    Commands, details and metadata are recorded with URLs made public (no credentials),
    also those copied from a parent written before that rule."""
    parent_manifest = parent.manifest if parent else None
    parent_id = parent_manifest.dataset_id if parent_manifest else None
    dataset_id = content_id(groups, parent_id)
    created_at = now_iso()
    command = public_text(command)
    history = [
        entry.model_copy(
            update={"command": public_text(entry.command), "details": public_params(entry.details)}
        )
        for entry in (parent_manifest.history if parent_manifest else [])
    ]
    history.append(
        HistoryEntry(
            operation=operation,
            dataset_id=dataset_id,
            command=command,
            created_at=created_at,
            details=public_params(details or {}),
        )
    )
    return Manifest(
        dataset_id=dataset_id,
        parent_id=parent_id,
        parent_uri=parent.uri if parent else None,
        created_at=created_at,
        command=command,
        steps=sum(p.steps for p in parts),
        episodes=sum(p.episodes for p in parts),
        parts=parts,
        groups=groups,
        history=history,
        metadata=public_params(
            {**(parent_manifest.metadata if parent_manifest else {}), **(metadata or {})}
        ),
    )


def base_manifest(
    dataset_uri: str,
    written: Sequence[WrittenPart | WrittenParts],
    *,
    operation: str,
    command: str,
    parent: Dataset | None = None,
    metadata: dict[str, Any] | None = None,
    details: dict[str, Any] | None = None,
    cameras: dict[str, CameraInfo] | None = None,
) -> Manifest:
    """The manifest of a self-contained version: the `base` group, and the `frames` group
    when parts of it were written (with its `cameras`)."""
    written = flatten(written)
    group = assemble_group(dataset_uri, BASE_GROUP, [w for w in written if w.group == BASE_GROUP])
    frames = [w for w in written if w.group == FRAMES_GROUP]
    groups = [group]
    if frames:
        columns = {camera_of(f.name) for w in frames for f in [*w.steps_fields, *w.episodes_fields]}
        if not cameras or columns - set(cameras):
            raise DatasetError(
                f"{dataset_uri}: frames of camera(s) {sorted(columns - set(cameras or {}))} "
                "were written without their CameraInfo"
            )
        present = {camera: info for camera, info in cameras.items() if camera in columns}
        groups.append(assemble_group(dataset_uri, FRAMES_GROUP, frames, cameras=present))
    ordered = sorted(written, key=lambda w: w.index)
    return new_manifest(
        groups=groups,
        parts=[w.part for w in ordered if w.part is not None],
        operation=operation,
        command=command,
        parent=parent,
        metadata=metadata,
        details=details,
    )


def inherit_groups(parent: Dataset, new_groups: Sequence[ColumnGroup]) -> list[ColumnGroup]:
    """A child's groups: the parent's (by reference, never copied) and the new ones.

    A new column that already exists in the version is an error: columns are traceable to
    exactly one group.
    """
    existing = {level: set(parent.columns(level)) for level in LEVELS}
    for group in new_groups:
        for level in LEVELS:
            clash = existing[level] & {f.name for f in getattr(group, f"{level}_columns")}
            if clash:
                raise DatasetError(
                    f"{parent.uri}: group {group.name!r} would add {level} column(s) "
                    f"{sorted(clash)} that the dataset already has; rename the output columns"
                )
    inherited = [g.model_copy(update={"inherited": True}) for g in parent.manifest.groups]
    return inherited + list(new_groups)
