"""Dataset versions: writing parts, committing a manifest last, opening and scanning.

Layout of a version at URI `D` (local directory or `s3://bucket/prefix`):

    D/manifest.json                          written last, atomically: the commit
    D/_staging                               present only while a writer works; holds the
                                             run's token, which its tasks check before
                                             each file appears (storage.check_staging)
    D/<group>/steps/part-00000.parquet       one file per part and group
    D/<group>/episodes/part-00000.parquet

Part `i` of every group holds the same rows in the same order as part `i` of `base`, so
a version is read by zipping columns. A child version lists its parent's groups with the
parent's URI as their `root` and adds its own groups under its own URI.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from engine import storage
from schemas import steps as cols
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
)

STAGING_MARKER = storage.STAGING_MARKER
BASE_GROUP = "base"
LEVELS = ("steps", "episodes")
# Parquet row groups are the unit a reader can skip. Step files: small enough that a query
# for 1% of episodes scattered at random skips ~80% of a file, large enough that a full
# scan stays within ~10% of 64k-row groups (bench/results/query.json; 1024 rows made it 30%
# slower, query-compare-1024-rows.json). Episode files are small and read whole.
ROW_GROUP_ROWS: Mapping[str, int] = MappingProxyType({"steps": 4096, "episodes": 64 * 1024})
DEFAULT_PART_STEPS = 1_000_000


class DatasetError(RuntimeError):
    """A dataset that cannot be opened or written, with the URI and what to do."""


def read_schema(uri: str) -> pa.Schema:
    """The Arrow schema of one data file, from its footer."""
    fs, path = storage.filesystem(uri)
    try:
        return pq.read_schema(path, filesystem=fs)
    except (OSError, pa.ArrowException) as error:
        raise unreadable(uri, error) from error


def unreadable(uri: str, error: Exception) -> DatasetError:
    """A file of a committed version that fails to read: it may have changed since."""
    return DatasetError(
        f"{uri}: cannot read: {error}\n  (`hindsight info DATASET --verify` checks every "
        "file against the manifest's sha256)"
    )


# ---------------------------------------------------------------- writing files


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
    episode_ids = steps.column(cols.EPISODE_ID).to_numpy()
    t = steps.column(cols.T).to_numpy()
    order_ok = np.all(
        (episode_ids[1:] > episode_ids[:-1])
        | ((episode_ids[1:] == episode_ids[:-1]) & (t[1:] > t[:-1]))
    )
    if not order_ok:
        raise DatasetError(f"{where}: steps are not sorted by (episode_id, t)")


@dataclass(frozen=True)
class WrittenPart:
    """What writing one part of one group produced; returned from Ray tasks to the driver."""

    group: str
    index: int
    steps_file: DataFile | None
    episodes_file: DataFile | None
    part: PartInfo | None = None

    def to_dict(self) -> dict:
        return {
            "group": self.group,
            "index": self.index,
            "steps_file": self.steps_file.model_dump() if self.steps_file else None,
            "episodes_file": self.episodes_file.model_dump() if self.episodes_file else None,
            "part": self.part.model_dump() if self.part else None,
        }

    @classmethod
    def from_dict(cls, data: dict) -> WrittenPart:
        return cls(
            group=data["group"],
            index=data["index"],
            steps_file=DataFile(**data["steps_file"]) if data["steps_file"] else None,
            episodes_file=DataFile(**data["episodes_file"]) if data["episodes_file"] else None,
            part=PartInfo(**data["part"]) if data["part"] else None,
        )


def write_base_part(
    dataset_uri: str,
    index: int,
    steps: pa.Table,
    episodes: pa.Table,
    staging_token: str | None = None,
) -> WrittenPart:
    """Write part `index` of the base group: whole episodes, sorted by (episode_id, t)."""
    check_sorted(steps, f"{dataset_uri} part {index}")
    episode_ids = episodes.column(cols.EPISODE_ID).to_numpy()
    step_files = write_group_part(dataset_uri, BASE_GROUP, index, steps, episodes, staging_token)
    part = PartInfo(
        steps=steps.num_rows,
        episodes=episodes.num_rows,
        min_episode_id=int(episode_ids.min()) if len(episode_ids) else 0,
        max_episode_id=int(episode_ids.max()) if len(episode_ids) else -1,
    )
    return WrittenPart(BASE_GROUP, index, step_files.steps_file, step_files.episodes_file, part)


def write_group_part(
    dataset_uri: str,
    group: str,
    index: int,
    steps: pa.Table | None,
    episodes: pa.Table | None,
    staging_token: str | None = None,
) -> WrittenPart:
    """Write part `index` of a column group; either level may be absent.

    Ray tasks pass their run's `staging_token` (`begin_version`): a task of a run that
    died then cannot overwrite the files of the run that redoes the work.
    """
    guard = (
        functools.partial(storage.check_staging, dataset_uri, staging_token)
        if staging_token
        else None
    )
    written: dict[str, DataFile | None] = {"steps": None, "episodes": None}
    for level, table in (("steps", steps), ("episodes", episodes)):
        if table is None or table.num_columns == 0:
            continue
        relative_path = part_path(group, level, index)
        data_file = write_parquet(
            storage.join(dataset_uri, relative_path), table, ROW_GROUP_ROWS[level], guard
        )
        written[level] = data_file.model_copy(update={"path": relative_path})
    return WrittenPart(group, index, written["steps"], written["episodes"])


# ---------------------------------------------------------------- staging and commit


def begin_version(dataset_uri: str) -> str:
    """Prepare `dataset_uri` for a new version and return its normalized URI.

    A committed version is immutable: writing onto one is an error. Leftovers of a writer
    that died (marked by `_staging`) are removed so the re-run redoes the work cleanly.
    The new `_staging` marker holds this run's token (`storage.staging_token`).
    """
    uri = storage.normalize(dataset_uri)
    if storage.exists(storage.join(uri, MANIFEST_NAME)):
        raise DatasetError(
            f"{uri} is already a committed dataset version; versions are immutable, "
            "write to a new path"
        )
    leftovers = storage.list_files(uri)
    if leftovers and storage.join(uri, STAGING_MARKER) not in leftovers:
        raise DatasetError(
            f"{uri} exists, is not empty and is not a hindsight dataset; choose another output path"
        )
    storage.delete_tree(uri)
    storage.start_staging(uri)
    return uri


def commit_version(dataset_uri: str, manifest: Manifest) -> Manifest:
    """Write the manifest last and atomically: from now on readers see the version.

    Group roots are stored relative to the version (its own files: "."; a parent's:
    "../parent"), so a tree of versions can be moved, copied or synced to S3 together."""
    stored = manifest.model_copy(
        update={
            "groups": [
                group.model_copy(update={"root": storage.relative_to(dataset_uri, group.root)})
                for group in manifest.groups
            ]
        }
    )
    storage.write_bytes(storage.join(dataset_uri, MANIFEST_NAME), stored.to_json().encode())
    storage.end_staging(dataset_uri)
    return manifest


def fields_of(tables: Iterable[pa.Table | None]) -> list[FieldInfo]:
    for table in tables:
        if table is not None and table.num_columns:
            return [FieldInfo(name=f.name, type=str(f.type)) for f in table.schema]
    return []


def assemble_group(
    dataset_uri: str,
    name: str,
    written: Sequence[WrittenPart],
    steps_fields: list[FieldInfo],
    episodes_fields: list[FieldInfo],
    relabeler: RelabelerInfo | None = None,
) -> ColumnGroup:
    """A column group from the parts written for it (in any order)."""
    ordered = sorted(written, key=lambda w: w.index)
    return ColumnGroup(
        name=name,
        root=dataset_uri,
        steps_files=[w.steps_file for w in ordered if w.steps_file is not None],
        episodes_files=[w.episodes_file for w in ordered if w.episodes_file is not None],
        steps_columns=steps_fields,
        episodes_columns=episodes_fields,
        relabeler=relabeler,
    )


def new_manifest(
    dataset_uri: str,
    *,
    groups: list[ColumnGroup],
    parts: list[PartInfo],
    operation: str,
    command: str,
    parent: Manifest | None = None,
    parent_uri: str | None = None,
    metadata: dict | None = None,
    details: dict | None = None,
) -> Manifest:
    """The manifest of a new version, with its lineage appended to the parent's history."""
    parent_id = parent.dataset_id if parent else None
    dataset_id = content_id(groups, parent_id)
    created_at = now_iso()
    history = list(parent.history) if parent else []
    history.append(
        HistoryEntry(
            operation=operation,
            dataset_id=dataset_id,
            command=command,
            created_at=created_at,
            details=details or {},
        )
    )
    return Manifest(
        dataset_id=dataset_id,
        parent_id=parent_id,
        parent_uri=parent_uri,
        created_at=created_at,
        command=command,
        steps=sum(p.steps for p in parts),
        episodes=sum(p.episodes for p in parts),
        parts=parts,
        groups=groups,
        history=history,
        metadata={**(parent.metadata if parent else {}), **(metadata or {})},
    )


def split_into_parts(episode_lengths: np.ndarray, part_steps: int) -> list[tuple[int, int]]:
    """Episode index ranges [start, stop) holding about `part_steps` steps each.

    Whole episodes only: a part may exceed `part_steps` by less than one episode.
    """
    ends = np.cumsum(episode_lengths)
    ranges = []
    start = 0
    while start < len(episode_lengths):
        offset = ends[start - 1] if start else 0
        stop = int(np.searchsorted(ends, offset + part_steps, side="left")) + 1
        stop = min(max(stop, start + 1), len(episode_lengths))
        ranges.append((start, stop))
        start = stop
    return ranges


def part_slices(
    steps: pa.Table, episodes: pa.Table, part_steps: int
) -> list[tuple[pa.Table, pa.Table]]:
    """(steps, episodes) slices of whole episodes, about `part_steps` steps each
    (`split_into_parts`); `steps` sorted by (episode_id, t), `episodes` by episode_id."""
    lengths = episodes.column(cols.LENGTH).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return [
        (
            steps.slice(offsets[start], offsets[stop] - offsets[start]),
            episodes.slice(start, stop - start),
        )
        for start, stop in split_into_parts(lengths, part_steps)
    ]


def write_dataset(
    dataset_uri: str,
    steps: pa.Table,
    episodes: pa.Table,
    *,
    operation: str,
    command: str,
    metadata: dict | None = None,
    parent: Manifest | None = None,
    parent_uri: str | None = None,
    details: dict | None = None,
    part_steps: int = DEFAULT_PART_STEPS,
) -> Manifest:
    """Write a self-contained version with a single `base` group, in this process.

    For tests, `materialize` and query subsets; ingest of large inputs runs part by part
    on Ray instead (jobs/). `steps` must be sorted by (episode_id, t) and `episodes` by
    episode_id, with the same episodes.
    """
    uri = begin_version(dataset_uri)
    written = [
        write_base_part(uri, index, part_steps_table, part_episodes)
        for index, (part_steps_table, part_episodes) in enumerate(
            part_slices(steps, episodes, part_steps)
        )
    ]
    fields = {"steps": fields_of([steps]), "episodes": fields_of([episodes])}
    return commit_base_version(
        uri,
        written,
        fields,
        operation=operation,
        command=command,
        metadata=metadata,
        details=details,
        parent=parent,
        parent_uri=parent_uri,
    )


def commit_base_version(
    dataset_uri: str,
    written: Sequence[WrittenPart],
    fields: dict[str, list[FieldInfo]],
    *,
    operation: str,
    command: str,
    metadata: dict | None = None,
    details: dict | None = None,
    parent: Manifest | None = None,
    parent_uri: str | None = None,
) -> Manifest:
    """Commit a self-contained version whose only group is `base`, from its written parts."""
    group = assemble_group(dataset_uri, BASE_GROUP, written, fields["steps"], fields["episodes"])
    manifest = new_manifest(
        dataset_uri,
        groups=[group],
        parts=[w.part for w in sorted(written, key=lambda w: w.index)],
        operation=operation,
        command=command,
        parent=parent,
        parent_uri=parent_uri,
        metadata=metadata,
        details=details,
    )
    return commit_version(dataset_uri, manifest)


# ---------------------------------------------------------------- reading


class Dataset:
    """A committed, immutable dataset version."""

    def __init__(self, uri: str, manifest: Manifest):
        self.uri = uri
        self.manifest = manifest

    @property
    def num_parts(self) -> int:
        return len(self.manifest.parts)

    def columns(self, level: str = "steps") -> list[str]:
        return [f.name for g in self.manifest.groups for f in getattr(g, f"{level}_columns")]

    def arrow_schema(self, level: str = "steps") -> pa.Schema:
        """The Arrow schema of a level, all groups together, from the first part's footers."""
        fields: list[pa.Field] = []
        for group in self.manifest.groups:
            files = getattr(group, f"{level}_files")
            if files:
                fields.extend(read_schema(storage.join(group.root, files[0].path)))
        return pa.schema(fields)

    def group_of(self, column: str, level: str = "steps") -> ColumnGroup:
        for group in self.manifest.groups:
            if column in {f.name for f in getattr(group, f"{level}_columns")}:
                return group
        raise KeyError(
            f"{self.uri}: no {level} column {column!r}; available: {', '.join(self.columns(level))}"
        )

    def file_uris(self, group: ColumnGroup, level: str) -> list[str]:
        return [storage.join(group.root, f.path) for f in getattr(group, f"{level}_files")]

    def read_part(
        self, index: int, level: str = "steps", columns: Sequence[str] | None = None
    ) -> pa.Table:
        """Part `index` with the columns of every group (or only `columns`), zipped."""
        wanted = None if columns is None else list(dict.fromkeys(columns))
        table: pa.Table | None = None
        for group in self.manifest.groups:
            group_columns = [f.name for f in getattr(group, f"{level}_columns")]
            selected = (
                group_columns if wanted is None else [c for c in group_columns if c in wanted]
            )
            if not selected:
                continue
            data_file = getattr(group, f"{level}_files")[index]
            uri = storage.join(group.root, data_file.path)
            fs, path = storage.filesystem(uri)
            try:
                part = pq.read_table(
                    path, filesystem=fs, columns=selected, page_checksum_verification=True
                )
            except (OSError, pa.ArrowException) as error:
                raise unreadable(uri, error) from error
            if table is None:
                table = part
            else:
                for name in part.column_names:
                    table = table.append_column(part.schema.field(name), part.column(name))
        if table is None:
            raise KeyError(f"{self.uri}: none of the columns {columns} exist at level {level}")
        if wanted is not None:
            missing = [c for c in wanted if c not in table.column_names]
            if missing:
                raise KeyError(
                    f"{self.uri}: no {level} column(s) {missing}; available: {', '.join(self.columns(level))}"
                )
            table = table.select(wanted)
        return table

    def read(self, level: str = "steps", columns: Sequence[str] | None = None) -> pa.Table:
        """The whole table in memory: for small datasets and tests."""
        return pa.concat_tables([self.read_part(i, level, columns) for i in range(self.num_parts)])

    def check_files(self, checksums: bool = False) -> int:
        """Every referenced file exists with the recorded size (and sha256 if asked); the
        number of files checked. The error lists every missing or changed file."""
        problems = []
        checked = 0
        for group in self.manifest.groups:
            for level in LEVELS:
                for data_file in getattr(group, f"{level}_files"):
                    uri = storage.join(group.root, data_file.path)
                    checked += 1
                    actual = storage.size(uri)
                    if actual is None:
                        where = (
                            f", inherited from the parent version at {group.root}: move "
                            "versions that share files together"
                            if group.inherited
                            else ""
                        )
                        problems.append(f"{uri} (column group {group.name!r}{where}) is missing")
                    elif actual != data_file.bytes:
                        problems.append(
                            f"{uri} (column group {group.name!r}) has {actual} bytes, "
                            f"the manifest says {data_file.bytes}"
                        )
                    elif checksums and storage.sha256_uri(uri) != data_file.sha256:
                        problems.append(
                            f"{uri} (column group {group.name!r}) has another sha256 "
                            "than the manifest records"
                        )
        if problems:
            raise DatasetError(
                f"{self.uri}: {len(problems)} file(s) changed since the version was committed:\n  "
                + "\n  ".join(problems)
            )
        return checked


def open_dataset(uri: str, verify_checksums: bool = False) -> Dataset:
    """Open a committed version; a missing manifest or changed file is a clear error."""
    uri = storage.normalize(uri)
    manifest_uri = storage.join(uri, MANIFEST_NAME)
    if not storage.exists(manifest_uri):
        staging = storage.exists(storage.join(uri, STAGING_MARKER))
        reason = (
            "a writer is working on it or died before committing (no manifest.json yet)"
            if staging
            else "there is no manifest.json there"
        )
        raise DatasetError(f"{uri} is not a hindsight dataset: {reason}")
    try:
        manifest = Manifest.from_json(storage.read_bytes(manifest_uri))
    except (ValueError, json.JSONDecodeError) as error:
        raise DatasetError(f"{manifest_uri} is not a valid manifest: {error}") from error
    groups = [g.model_copy(update={"root": storage.resolve(uri, g.root)}) for g in manifest.groups]
    dataset = Dataset(uri, manifest.model_copy(update={"groups": groups}))
    dataset.check_files(checksums=verify_checksums)
    return dataset


def _scan_level(uri: str, level: str) -> pl.LazyFrame:
    dataset = open_dataset(uri)
    frames = []
    for group in dataset.manifest.groups:
        files = dataset.file_uris(group, level)
        if files:
            frames.append(
                pl.scan_parquet(files, storage_options=storage.polars_storage_options(files[0]))
            )
    if not frames:
        raise DatasetError(f"{uri}: no {level} files")
    return frames[0] if len(frames) == 1 else pl.concat(frames, how="horizontal")


def scan(uri: str) -> pl.LazyFrame:
    """All step columns of every group as one Polars LazyFrame."""
    return _scan_level(uri, "steps")


def scan_episodes(uri: str) -> pl.LazyFrame:
    """All episode columns of every group as one Polars LazyFrame."""
    return _scan_level(uri, "episodes")


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
                    f"{parent.uri}: group {group.name!r} would add {level} column(s) {sorted(clash)} "
                    "that the dataset already has; rename the output columns"
                )
    inherited = [g.model_copy(update={"inherited": True}) for g in parent.manifest.groups]
    return inherited + list(new_groups)
