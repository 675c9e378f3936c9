"""Reading only what a query needs: chosen columns of chosen rows of a part, whole Parquet
row groups at a time, with a count of what was read.

Episodes are contiguous runs of rows in every part (steps are sorted by episode_id, t), and
the episodes table gives each one's length, so the rows of an episode are a range and no
`episode_id` needs to be read from the step files to find them.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from engine import derived, storage
from engine.dataset import (
    Dataset,
    DatasetError,
    check_rows_read,
    open_dataset,
    read_schema,
    unreadable,
)
from schemas import steps as cols
from schemas.manifest import ColumnGroup

# Columns `episode_table` adds: each episode's part and first step row within the part.
# Double underscores: never a user's column.
PART = "__part"
START = "__start"

# Reads of several parts run in parallel on Polars' threads; their counts meet here.
_STATS_LOCK = threading.Lock()


def as_dataset(dataset: Dataset | str) -> Dataset:
    """The dataset itself, or the version at a URI, opened."""
    return dataset if isinstance(dataset, Dataset) else open_dataset(dataset)


@dataclass
class ReadStats:
    """What a query read: Parquet column chunks (compressed bytes, as stored) and footers."""

    files: int = 0
    row_groups: int = 0
    row_groups_skipped: int = 0
    bytes: int = 0
    parts_skipped: int = 0

    def add(self, **counts: int) -> None:
        with _STATS_LOCK:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def count_file(self, metadata: pq.FileMetaData, groups: np.ndarray, columns: list[str]) -> None:
        """Count a read of the row groups `groups` of `columns` from one file."""
        wanted = set(columns)
        chunk_bytes = 0
        for index in groups:
            row_group = metadata.row_group(int(index))
            for j in range(row_group.num_columns):
                chunk = row_group.column(j)
                if chunk.path_in_schema.split(".")[0] in wanted:
                    chunk_bytes += chunk.total_compressed_size
        self.add(
            files=1,
            row_groups=len(groups),
            row_groups_skipped=metadata.num_row_groups - len(groups),
            bytes=metadata.serialized_size + chunk_bytes,
        )

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def row_group_selection(
    rows: np.ndarray, row_group_offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For sorted row positions in a file whose row groups start at `row_group_offsets`
    (with the total row count last): the row groups that hold any of them, and each row's
    position in those row groups read one after another."""
    group_of_row = np.searchsorted(row_group_offsets, rows, side="right") - 1
    groups = np.unique(group_of_row)
    sizes = np.diff(row_group_offsets)[groups]
    first_row_read = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    slot = np.searchsorted(groups, group_of_row)
    positions = rows - row_group_offsets[group_of_row] + first_row_read[slot]
    return groups, positions


def _not_aligned(uri: str, num_rows: int, rows: np.ndarray) -> DatasetError:
    return DatasetError(
        f"{uri}: has {num_rows} rows, the episodes table says rows "
        f"{rows.min()}..{rows.max()}; the column groups of this version are not aligned"
    )


def read_rows(
    uri: str, columns: list[str], rows: np.ndarray | None, stats: ReadStats
) -> pl.DataFrame:
    """`columns` of one Parquet file at the sorted row positions `rows` (None: every row):
    the row groups that hold them, in one read, then the rows taken from those (see
    `row_group_selection`). Every page read is checked against its CRC, so a damaged file
    is a DatasetError naming it, never wrong rows.

    The footer is parsed here, not up front, so the footers of the parts a query reads
    together are parsed in parallel too (with small row groups they are not small)."""
    return pl.from_arrow(read_rows_arrow(uri, columns, rows, stats))


def read_rows_arrow(
    uri: str, columns: list[str], rows: np.ndarray | None, stats: ReadStats
) -> pa.Table:
    """`read_rows` as an Arrow table."""
    fs, path = storage.filesystem(uri)
    try:
        # Pre-buffering coalesces the reads of scattered row groups (on S3: fewer GETs);
        # a whole local file reads faster without its extra copy.
        with pq.ParquetFile(
            path,
            filesystem=fs,
            pre_buffer=rows is not None or storage.is_s3(uri),
            page_checksum_verification=True,
        ) as parquet:
            metadata = parquet.metadata
            if rows is None:
                groups = np.arange(metadata.num_row_groups)
                stats.count_file(metadata, groups, columns)
                table = parquet.read(columns=columns)
                check_rows_read(uri, table.num_rows, metadata.num_rows)
                return table
            sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
            offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
            # The footer is under no CRC: a row group's count that disagrees with the
            # file's would place every later row wrongly.
            check_rows_read(uri, int(offsets[-1]), metadata.num_rows)
            if len(rows) and rows[-1] >= offsets[-1]:
                raise _not_aligned(uri, int(offsets[-1]), rows)
            groups, positions = row_group_selection(rows, offsets)
            stats.count_file(metadata, groups, columns)
            table = parquet.read_row_groups(groups.tolist(), columns=columns)
            check_rows_read(uri, table.num_rows, int(np.sum(np.diff(offsets)[groups])))
    except (OSError, pa.ArrowException) as error:
        raise unreadable(uri, error) from error
    return table.take(pa.array(positions, pa.int64()))


def read_part_rows(
    dataset: Dataset,
    index: int,
    level: str,
    columns: Sequence[str],
    rows: np.ndarray,
    stats: ReadStats | None = None,
    fill: int | None = None,
) -> pa.Table:
    """`columns` (of any groups) of part `index` at the row positions `rows`, sorted: only
    the Parquet row groups that hold them are read (`read_rows`), so a few rows of a column
    of big camera frames cost a few row groups, not the whole column (a derived column
    reads its sources for the whole part). With `fill` (the part's row count),
    full-length columns instead, null at every row not in `rows`."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if len(rows) and (rows[0] < 0 or (fill is not None and rows[-1] >= fill)):
        raise ValueError(f"{dataset.uri} part {index}: rows {rows[0]}..{rows[-1]} out of range")
    stats = stats if stats is not None else ReadStats()
    read: dict[str, pa.ChunkedArray] = {}
    derived = [c for c in columns if level == "steps" and c in dataset.derived]
    if derived:  # derived from whole episodes (engine/derived.py): the part's sources are read
        whole = dataset.read_part(index, level, derived)
        read |= {name: whole.column(name).take(pa.array(rows)) for name in derived}
    for group in dataset.manifest.groups:
        names = [f.name for f in getattr(group, f"{level}_columns") if f.name in columns]
        if names:
            data_file = getattr(group, f"{level}_files")[index]
            part = read_rows_arrow(storage.join(group.root, data_file.path), names, rows, stats)
            read |= {name: part.column(name) for name in part.column_names}
    missing = [c for c in columns if c not in read]
    if missing:
        raise KeyError(f"{dataset.uri}: no column {missing} at level {level}")
    table = pa.table({name: read[name] for name in columns})
    if fill is None:
        return table
    # Row r of the result is row slot[r] of `table`, or null: `take` of a null index.
    slot = np.full(fill, -1, dtype=np.int64)
    slot[rows] = np.arange(len(rows))
    return table.take(pa.array(slot, mask=slot < 0))


class PartReader:
    """Reads chosen columns of one part at one level, from whichever groups hold them.

    Every read goes through pyarrow with page CRCs checked (`read_rows`): Polars' own
    Parquet reader skips them and would decode a damaged page into wrong rows, which
    `query --output` would then commit with fresh checksums. On bench/query.py's data
    whole-part reads this way take the CPU time of Polars' reader within 5%. Chosen rows
    are read as whole Parquet row groups (the smallest unit a Parquet reader can skip),
    only those that hold a chosen row, and the rows are then taken from them: one read per
    file, however scattered the rows are.
    Those reads are Python functions that Polars runs on its threads (`pl.defer`); an
    exception must not cross Polars' threads (the process can abort at exit while other
    reads still run), so each read keeps its error and `collect` raises it afterwards.
    """

    def __init__(self, dataset: Dataset, level: str, stats: ReadStats):
        self.dataset = dataset
        self.level = level
        self.stats = stats
        self.group_of = {
            f.name: group
            for group in dataset.manifest.groups
            for f in getattr(group, f"{level}_columns")
        }
        # Columns derived at read (engine/derived.py): from whole parts, then the rows.
        self.derived = dataset.derived if level == "steps" else {}
        self._schemas: dict[str, pl.Schema] = {}
        self._errors: list[Exception] = []
        self._files_of: dict[int, list[str]] = {}  # id of a frame from `scan` -> its files

    def scan(
        self, index: int, columns: Sequence[str], rows: np.ndarray | None = None
    ) -> pl.LazyFrame:
        """`columns` of part `index` at the sorted row positions `rows` (None: all rows)."""
        derived = [c for c in dict.fromkeys(columns) if c in self.derived]
        by_group: dict[str, list[str]] = {}
        for column in dict.fromkeys(columns):
            if column not in self.derived:
                by_group.setdefault(self.group_of[column].name, []).append(column)
        frames, uris = [], []
        for group_columns in by_group.values():
            group = self.group_of[group_columns[0]]
            data_file = getattr(group, f"{self.level}_files")[index]
            uris.append(storage.join(group.root, data_file.path))
            frames.append(self._scan(uris[-1], data_file.rows, group, group_columns, rows))
        if derived:
            frames.append(self._scan_derived(index, derived, rows))
        frame = pl.concat(frames, how="horizontal") if len(frames) > 1 else frames[0]
        frame = frame.select(list(dict.fromkeys(columns)))
        self._files_of[id(frame)] = uris
        return frame

    def collect(self, frames: Sequence[pl.LazyFrame]) -> list[pl.DataFrame]:
        """Collect scans of several parts in one call, so Polars runs them in parallel;
        then raise the first error any read met, naming its files."""
        try:
            collected = pl.collect_all(frames)
        except pl.exceptions.PolarsError as error:
            raise self._locate(frames, error) from error
        if self._errors:
            error, self._errors = self._errors[0], []
            raise error
        return collected

    def _locate(self, frames: Sequence[pl.LazyFrame], error: Exception) -> DatasetError:
        """Polars does not say which file a failed read came from: read the frames one by
        one (only after a failure) to name the files of the part that fails."""
        for frame in frames:
            try:
                frame.collect()
            except pl.exceptions.PolarsError:
                files = self._files_of.get(id(frame), [self.dataset.uri])
                return unreadable(", ".join(files), error)
        return unreadable(self.dataset.uri, error)

    def read(
        self, index: int, columns: Sequence[str], rows: np.ndarray | None = None
    ) -> pl.DataFrame:
        return self.collect([self.scan(index, columns, rows)])[0]

    def _schema(self, group: ColumnGroup) -> pl.Schema:
        """The Polars schema of a group's files at this level (all its parts share it).

        Read from the first part's footer once per reader; like the manifest, this is the
        version's description, not counted in `stats`."""
        if group.name not in self._schemas:
            first = getattr(group, f"{self.level}_files")[0]
            empty = read_schema(storage.join(group.root, first.path)).empty_table()
            self._schemas[group.name] = pl.from_arrow(empty).schema
        return self._schemas[group.name]

    def _scan(
        self,
        uri: str,
        num_rows: int,
        group: ColumnGroup,
        columns: list[str],
        rows: np.ndarray | None,
    ) -> pl.LazyFrame:
        if rows is not None and len(rows) and (rows.min() < 0 or rows.max() >= num_rows):
            raise _not_aligned(uri, num_rows, rows)
        schema = pl.Schema({name: self._schema(group)[name] for name in columns})
        if rows is not None and not len(rows):
            return pl.LazyFrame(schema=schema)

        def read() -> pl.DataFrame:
            try:
                return read_rows(uri, columns, rows, self.stats)
            except Exception as error:  # raised by `collect`, on the caller's thread
                self._errors.append(error)
                return pl.DataFrame(schema=schema).clear(num_rows if rows is None else len(rows))

        return pl.defer(read, schema=schema, validate_schema=True)

    def _scan_derived(self, index: int, names: list[str], rows: np.ndarray | None) -> pl.LazyFrame:
        """Derived columns of part `index` at `rows`: their sources read for the whole
        part (whole episodes), derived, then the rows taken."""
        schema = self._derived_schema(names)
        if rows is not None and not len(rows):
            return pl.LazyFrame(schema=schema)
        stored = [c for c in self.dataset.columns("steps") if c not in self.derived]
        sources = derived.sources(self.derived, names, stored)
        num_rows = self.dataset.manifest.parts[index].steps

        def read() -> pl.DataFrame:
            try:
                table = None
                for group in self.dataset.manifest.groups:
                    wanted = [f.name for f in group.steps_columns if f.name in sources]
                    if not wanted:
                        continue
                    uri = storage.join(group.root, group.steps_files[index].path)
                    part = read_rows_arrow(uri, wanted, None, self.stats)
                    table = part if table is None else _zip(table, part)
                where = f"{self.dataset.uri} part {index}"
                made = derived.derive(self.derived, table, names, where)
                return pl.from_arrow(made if rows is None else made.take(pa.array(rows)))
            except Exception as error:  # raised by `collect`, on the caller's thread
                self._errors.append(error)
                return pl.DataFrame(schema=schema).clear(num_rows if rows is None else len(rows))

        return pl.defer(read, schema=schema, validate_schema=True)

    def _derived_schema(self, names: list[str]) -> pl.Schema:
        if "" not in self._schemas:  # the derived columns' schema, once per reader
            fields = [f for f in self.dataset.arrow_schema("steps") if f.name in self.derived]
            self._schemas[""] = pl.from_arrow(pa.schema(fields).empty_table()).schema
        return pl.Schema({name: self._schemas[""][name] for name in names})


def _zip(table: pa.Table, other: pa.Table) -> pa.Table:
    for name in other.column_names:
        table = table.append_column(other.schema.field(name), other.column(name))
    return table


def episode_table(
    dataset: Dataset, columns: Sequence[str], stats: ReadStats, parts: Sequence[int]
) -> pl.DataFrame:
    """Episodes of `parts` with `columns`, their part (PART) and first step row within the
    part (START), sorted by episode_id within each part."""
    reader = PartReader(dataset, "episodes", stats)
    wanted = list(dict.fromkeys([cols.EPISODE_ID, cols.LENGTH, *columns]))
    parts = list(parts)
    frames = reader.collect([reader.scan(index, wanted) for index in parts])
    with_rows = []
    for index, frame in zip(parts, frames):
        frame = frame.sort(cols.EPISODE_ID)
        lengths = frame[cols.LENGTH].to_numpy()
        expected = dataset.manifest.parts[index].steps
        if int(lengths.sum()) != expected:
            raise DatasetError(
                f"{dataset.uri}: part {index} holds {expected} steps but its episodes' lengths "
                f"add up to {int(lengths.sum())}; validate the dataset"
            )
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        with_rows.append(
            frame.with_columns(pl.lit(index, dtype=pl.Int64).alias(PART), pl.Series(START, starts))
        )
    return pl.concat(with_rows) if with_rows else pl.DataFrame()


def episode_rows(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every row of the given episodes (sorted ranges) and, per row, which episode it is."""
    lengths = lengths.astype(np.int64)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    first_row_of_owner = np.repeat(starts.astype(np.int64) - np.cumsum(lengths) + lengths, lengths)
    rows = first_row_of_owner + np.arange(int(lengths.sum()), dtype=np.int64)
    return rows, owner
