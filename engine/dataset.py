"""Dataset versions: opening, reading and scanning a committed version (writing one is
engine/writer.py).

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

Opening a version checks where its files are before reading any (`check_entries`,
`check_parent`): its own groups' files lie inside its directory (plain relative paths, no
`..`, no absolute path or URL), and inherited groups are exactly the groups of the parent
the manifest records (`parent_id`), found where their roots lead, whose own groups are
checked the same way up the chain. Anything else is refused, naming the entry.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from engine import derived as derived_columns
from engine import storage
from schemas.frames import FRAMES_GROUP, CameraInfo
from schemas.manifest import MANIFEST_NAME, ColumnGroup, Manifest, content_id
from schemas.shard_index import describe_invalid
from schemas.steps import ABSENT, REWARD

if TYPE_CHECKING:
    import polars as pl

BASE_GROUP = "base"
LEVELS = ("steps", "episodes")
# The Arrow types a frames group's columns may have, by the name the manifest records: its
# schema is known without opening a file (scans and relabelers never touch frames files).
_FRAME_TYPES = {str(pa.binary()): pa.binary(), str(pa.large_binary()): pa.large_binary()}


class DatasetError(RuntimeError):
    """A dataset that cannot be opened or written, with the URI and what to do."""


def read_schema(uri: str) -> pa.Schema:
    """The Arrow schema of one data file, from its footer."""
    fs, path = storage.filesystem(uri)
    try:
        return pq.read_schema(path, filesystem=fs)
    except (OSError, pa.ArrowException) as error:
        raise unreadable(uri, error) from error


def holds_frames(group: ColumnGroup) -> bool:
    """Whether a column group holds camera frames: read only when a frame column is asked for."""
    return group.name == FRAMES_GROUP or bool(group.cameras)


def unreadable(uri: str, error: Exception) -> DatasetError:
    """A file of a committed version that fails to read: it may have changed since."""
    return DatasetError(
        f"{uri}: cannot read: {error} (`hindsight info DATASET --verify` checks every "
        "file against the manifest's sha256)"
    )


def check_rows_read(uri: str, rows: int, expected: int) -> None:
    """A DatasetError unless `rows` (read, or counted in a footer) is the `expected` count.
    Neither a page header nor the footer is under the page CRC: a flipped bit that makes a
    data page another page type, or its value count 0, reads as a column with fewer rows
    and no error (pyarrow 26), and a row group's count flipped in the footer shifts every
    row after it."""
    if rows != expected:
        message = f"{rows} rows read where the file holds {expected}"
        raise unreadable(uri, ValueError(message))


# ---------------------------------------------------------------- reading


class Dataset:
    """A committed, immutable dataset version."""

    def __init__(self, uri: str, manifest: Manifest):
        self.uri = uri
        self.manifest = manifest

    @property
    def num_parts(self) -> int:
        return len(self.manifest.parts)

    def columns(self, level: str = "steps", frames: bool = True) -> list[str]:
        """The columns of a level, every group's (a group's derived ones among its stored
        ones, in the order `store=vectors` would store them); without the frame columns if
        not `frames`."""
        derived = self.derived if level == "steps" else {}
        names = []
        for group in self.manifest.groups:
            if frames or not holds_frames(group):
                stored = [f.name for f in getattr(group, f"{level}_columns")]
                names += derived_columns.group_columns(group, stored) if derived else stored
        return names

    @functools.cached_property
    def derived(self) -> dict[str, derived_columns.DerivedColumn]:
        """The step columns this version derives at read (engine/derived.py): name ->
        where from. From the manifest alone: no file is opened."""
        return derived_columns.derived_columns(self.manifest.groups, self.uri)

    @property
    def rewards_known(self) -> bool:
        """False for a version whose source had no rewards (versions made from it inherit
        the manifest's `reward: absent`)."""
        return self.manifest.metadata.get(REWARD) != ABSENT

    @property
    def cameras(self) -> dict[str, CameraInfo]:
        """The cameras of the version's frames (camera -> shape and codec); {} without frames."""
        return {name: info for g in self.manifest.groups for name, info in g.cameras.items()}

    def arrow_schema(self, level: str = "steps") -> pa.Schema:
        """The Arrow schema of a level, all groups together, from the first part's footers
        (a frames group's from the manifest: its files are not opened), a group's derived
        columns among its stored ones, in the order `store=vectors` would store them."""
        by_group: list[list[pa.Field]] = []
        for group in self.manifest.groups:
            files = getattr(group, f"{level}_files")
            columns = getattr(group, f"{level}_columns")
            if holds_frames(group) and all(f.type in _FRAME_TYPES for f in columns):
                by_group.append([pa.field(f.name, _FRAME_TYPES[f.type]) for f in columns])
            elif files:
                by_group.append(list(read_schema(storage.join(group.root, files[0].path))))
            else:
                by_group.append([])
        derived = self.derived if level == "steps" else {}
        if derived:
            stored = pa.schema([f for fields in by_group for f in fields])
            by_group = [
                derived_columns.group_fields(group, fields, stored)
                for group, fields in zip(self.manifest.groups, by_group)
            ]
        return pa.schema([f for fields in by_group for f in fields])

    def group_of(self, column: str, level: str = "steps") -> ColumnGroup:
        """The group that holds `column` (or derives it at read)."""
        if level == "steps" and column in self.derived:
            return self.derived[column].group
        for group in self.manifest.groups:
            if column in {f.name for f in getattr(group, f"{level}_columns")}:
                return group
        raise KeyError(
            f"{self.uri}: no {level} column {column!r}; available: {', '.join(self.columns(level))}"
        )

    def field(self, column: str, level: str = "steps") -> pa.Field:
        """The Arrow field of one column, from its group's first footer (a derived
        column's from the schema of its sources)."""
        if level == "steps" and column in self.derived:
            return self.arrow_schema(level).field(column)
        group = self.group_of(column, level)
        return read_schema(self.file_uris(group, level)[0]).field(column)

    def file_uris(self, group: ColumnGroup, level: str) -> list[str]:
        return [storage.join(group.root, f.path) for f in getattr(group, f"{level}_files")]

    def read_part(
        self, index: int, level: str = "steps", columns: Sequence[str] | None = None
    ) -> pa.Table:
        """Part `index` with the columns of every group (or only `columns`), zipped;
        derived columns (engine/derived.py) computed from their stored sources."""
        wanted = None if columns is None else list(dict.fromkeys(columns))
        derived = self.derived if level == "steps" else {}
        asked = [c for c in (self.columns(level) if wanted is None else wanted) if c in derived]
        if asked:
            stored = [c for c in self.columns(level) if c not in derived]
            sources = derived_columns.sources(derived, asked, stored)
            read = [c for c in (stored if wanted is None else wanted) if c not in derived]
            table = self._read_stored(index, level, list(dict.fromkeys(read + sources)))
            made = derived_columns.derive(derived, table, asked, f"{self.uri} part {index}")
            for name in asked:
                table = table.append_column(made.schema.field(name), made.column(name))
            return table.select(self.columns(level) if wanted is None else wanted)
        return self._read_stored(index, level, wanted)

    def _read_stored(self, index: int, level: str, wanted: list[str] | None) -> pa.Table:
        """Part `index` with the stored columns `wanted` (None: all), zipped."""
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
            check_rows_read(uri, part.num_rows, data_file.rows)
            if table is None:
                table = part
            else:
                for name in part.column_names:
                    table = table.append_column(part.schema.field(name), part.column(name))
        if table is None:
            raise KeyError(f"{self.uri}: none of the columns {wanted} exist at level {level}")
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
        if len(problems) == 1:
            raise DatasetError(
                f"{self.uri}: a file changed since the version was committed: {problems[0]}"
            )
        if problems:
            raise DatasetError(
                f"{self.uri}: {len(problems)} file(s) changed since the version was committed:\n  "
                + "\n  ".join(problems)
            )
        return checked

    def verify(self) -> int:
        """Every file's sha256 against the manifest (`check_files`), then the dataset id
        recomputed from the manifest's groups and checksums (a manifest edited to match
        changed files keeps its old id); the number of files checked."""
        checked = self.check_files(checksums=True)
        recomputed = content_id(self.manifest.groups, self.manifest.parent_id)
        if recomputed != self.manifest.dataset_id:
            raise DatasetError(
                f"{self.uri}: the manifest's dataset id {self.manifest.dataset_id} is not the "
                f"id recomputed from its groups and checksums ({recomputed}): the manifest "
                "was edited after the version was committed"
            )
        return checked


def open_dataset(uri: str, verify_checksums: bool = False) -> Dataset:
    """Open a committed version; a missing manifest, an entry outside the version (or its
    parent's), or a changed file is a clear error. `verify_checksums` also checks every
    file's sha256 and the dataset id (`Dataset.verify`)."""
    dataset = _load(storage.normalize(uri), ())
    if verify_checksums:
        dataset.verify()
    else:
        dataset.check_files()
    return dataset


def _load(uri: str, descendants: tuple[str, ...]) -> Dataset:
    """The version at `uri` with its roots resolved and its entries checked (up its parent
    chain), no data file touched. `descendants`: the versions that led here (a cycle stops)."""
    manifest_uri = storage.join(uri, MANIFEST_NAME)
    if not storage.exists(manifest_uri):
        staging = storage.exists(storage.join(uri, storage.STAGING_MARKER))
        reason = (
            "a writer is working on it or died before committing (no manifest.json yet)"
            if staging
            else "there is no manifest.json there"
        )
        raise DatasetError(f"{uri} is not a hindsight dataset: {reason}")
    try:
        manifest = Manifest.from_json(storage.read_bytes(manifest_uri))
    except ValueError as error:  # bad JSON, or a field of the wrong type
        raise DatasetError(
            f"{manifest_uri} is not a valid manifest: {describe_invalid(error)}"
        ) from error
    groups = [g.model_copy(update={"root": storage.resolve(uri, g.root)}) for g in manifest.groups]
    dataset = Dataset(uri, manifest.model_copy(update={"groups": groups}))
    check_entries(dataset)
    if any(group.inherited for group in groups):
        check_parent(dataset, descendants)
    return dataset


def _same_place(first: str, second: str) -> bool:
    """Two directory URIs name one place (local paths with symlinks resolved)."""
    if storage.is_s3(first) or storage.is_s3(second):
        return first.rstrip("/") == second.rstrip("/")
    return os.path.realpath(first) == os.path.realpath(second)


def is_inside(path: str) -> bool:
    """A relative path that stays below the directory it is relative to: no `..`, no
    absolute path, no URL, no backslash, no empty or `.` component."""
    if not path or "\\" in path or "://" in path or os.path.isabs(path):
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def check_entries(dataset: Dataset) -> None:
    """Every file entry is a plain path inside its group's root; a group of this version's
    own lies in its directory; an inherited one needs a recorded parent. Names the entry."""
    where = storage.join(dataset.uri, MANIFEST_NAME)
    own = storage.resolve(dataset.uri, ".")
    for group in dataset.manifest.groups:
        for level in LEVELS:
            for data_file in getattr(group, f"{level}_files"):
                if not is_inside(data_file.path):
                    raise DatasetError(
                        f"{where}: column group {group.name!r} lists the {level} file "
                        f"{data_file.path!r}, which points outside the group's directory "
                        f"{group.root}; refused (a version reads only its own files and its "
                        "parent's)"
                    )
        if not group.inherited and not _same_place(group.root, own):
            raise DatasetError(
                f"{where}: column group {group.name!r} has its files at {group.root}, not "
                "this version's directory; refused (only groups inherited from the parent "
                "may live elsewhere)"
            )
        if group.inherited and dataset.manifest.parent_id is None:
            raise DatasetError(
                f"{where}: column group {group.name!r} is inherited from {group.root}, but "
                "the version records no parent; refused"
            )


def _comparable(group: ColumnGroup) -> ColumnGroup:
    return group.model_copy(update={"root": "", "inherited": False})


def check_parent(dataset: Dataset, descendants: tuple[str, ...]) -> None:
    """The inherited groups are exactly the groups of the recorded parent (same names,
    places, files, sizes and checksums, in order), and the parent checks out in turn.

    The parent is found where the last inherited group's root leads (a parent's own group:
    roots are stored relative, so a tree of versions moves together), and must have the
    dataset id this version records as `parent_id`."""
    where = storage.join(dataset.uri, MANIFEST_NAME)
    manifest = dataset.manifest
    inherited = [group for group in manifest.groups if group.inherited]
    place = inherited[-1].root
    if any(_same_place(place, uri) for uri in (dataset.uri, *descendants)):
        raise DatasetError(
            f"{where}: column group {inherited[-1].name!r} is inherited from {place}, which "
            "is this version or one made from it; refused"
        )
    if not storage.exists(storage.join(place, MANIFEST_NAME)):
        raise DatasetError(
            f"{dataset.uri}: column group {inherited[-1].name!r} is inherited from the parent "
            f"version at {place}, and there is no committed version there: move versions "
            "that share files together"
        )
    parent = _load(place, (*descendants, dataset.uri))
    if parent.manifest.dataset_id != manifest.parent_id:
        raise DatasetError(
            f"{where}: column group {inherited[-1].name!r} is inherited from {place}, which is "
            f"not the parent this version was made from (parent {manifest.parent_id}, made "
            f"at {manifest.parent_uri}; the version there is {parent.manifest.dataset_id}); "
            "refused"
        )
    expected = parent.manifest.groups
    for position, group in enumerate(inherited):
        match = expected[position] if position < len(expected) else None
        if (
            match is None
            or not _same_place(group.root, match.root)
            or _comparable(group) != _comparable(match)
        ):
            raise DatasetError(
                f"{where}: column group {group.name!r} (at {group.root}) is not the parent's "
                f"group as the parent's manifest at {place} records it; refused"
            )
    if len(inherited) != len(expected):
        raise DatasetError(
            f"{where}: inherits {len(inherited)} column group(s), its parent at {place} has "
            f"{len(expected)}; refused"
        )


def _scan_level(uri: str, level: str, frames: bool = False) -> pl.LazyFrame:
    import polars as pl  # here: a job that writes a version (ingest) never loads Polars

    dataset = open_dataset(uri)
    scans = []
    for group in dataset.manifest.groups:
        files = dataset.file_uris(group, level)
        if files and (frames or not holds_frames(group)):
            scans.append(
                pl.scan_parquet(files, storage_options=storage.polars_storage_options(files[0]))
            )
    if not scans:
        raise DatasetError(f"{uri}: no {level} files")
    frame = scans[0] if len(scans) == 1 else pl.concat(scans, how="horizontal")
    if level == "steps" and dataset.derived:  # every part, in order: whole episodes
        stored = pa.schema(
            [f for f in dataset.arrow_schema(level) if f.name not in dataset.derived]
        )
        frame = derived_columns.with_derived(
            frame, dataset.derived, stored, f"{dataset.uri} (engine.scan)"
        )
        frame = frame.select(dataset.columns(level, frames=frames))
    return frame


def scan(uri: str, frames: bool = False) -> pl.LazyFrame:
    """All step columns of every group as one Polars LazyFrame; the camera frames
    (`frame_<camera>`: encoded images, `schemas.frames.decode_frames`) only with `frames`,
    else their files are never opened."""
    return _scan_level(uri, "steps", frames)


def scan_episodes(uri: str, frames: bool = False) -> pl.LazyFrame:
    """All episode columns of every group as one Polars LazyFrame; with `frames`, a video
    camera's `frame_<camera>` too (one video per episode: `schemas.video.decode_video`)."""
    return _scan_level(uri, "episodes", frames)
