"""The files of a step-table source (Parquet or JSON Lines): a file, a directory (searched
recursively) or a glob, local or on S3, read with a clear error when one is truncated or
corrupt, and with the columns renamed by `--map`.

A directory is searched the way Arrow datasets and Spark read one: every file with the
format's extension below it, in sorted path order, except under names that start with `.`
or `_` (hidden files, `_SUCCESS`, `_delta_log/`, `.cache/`). That finds LeRobot's
`data/chunk-000/file-000.parquet`; its `meta/` Parquet files are found too when pointed at
the dataset's root, and refused with their missing columns: point at `data/`.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Mapping
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from engine import storage
from engine.validate import Problem
from schemas import steps as cols

# File names a format reads, and the ones that make a directory of that format.
FILE_SUFFIXES = {"parquet": (".parquet",), "jsonl": (".jsonl", ".ndjson", ".json")}
DIRECTORY_SUFFIXES = {"parquet": (".parquet",), "jsonl": (".jsonl", ".ndjson")}
# Path components a directory search skips, as pyarrow.dataset does by default.
IGNORED_PREFIXES = (".", "_")


def step_table_files(source: str, format: str) -> list[str]:
    """A file, every file of the format below a directory (recursively), or a glob;
    sorted. Local or S3."""
    suffixes = FILE_SUFFIXES[format]
    if any(ch in source for ch in "*?["):
        if storage.is_s3(source):
            first = min(source.index(ch) for ch in "*?[" if ch in source)
            parent = source[: source.rindex("/", 0, first)]
            files = [f for f in storage.list_files(parent) if fnmatch.fnmatch(f, source)]
        else:
            files = sorted(glob.glob(source))
    elif storage.is_s3(source):
        fs, key = storage.filesystem(source)
        if fs.get_file_info(key).type == pafs.FileType.File:
            files = [source]
        else:
            files = files_below(source, suffixes)
    elif os.path.isdir(source):
        files = files_below(source, suffixes)
    elif os.path.exists(source):
        files = [source]
    else:
        raise FileNotFoundError(f"{source}: no such file or directory")
    if not files:
        raise FileNotFoundError(f"{source}: no {format} files found (searched recursively)")
    return files


def files_below(directory: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files with one of `suffixes` anywhere below a local or S3 directory, sorted by path;
    none under a name starting with `.` or `_`."""
    top = storage.normalize(directory).rstrip("/")
    if not storage.is_s3(top):
        top = os.path.abspath(top)
    found = []
    for file in storage.list_files(top):
        below = file[len(top) :].lstrip("/").split("/") if file.startswith(top) else [file]
        if file.lower().endswith(suffixes) and not any(
            part.startswith(IGNORED_PREFIXES) for part in below
        ):
            found.append(file)
    return sorted(found)


# Hindsight's step columns that `--map` may fill from a source column.
MAPPABLE = cols.TRANSITION_COLUMNS


@dataclass(frozen=True)
class ColumnMap:
    """`--map NAME=SOURCE,...`: hindsight's step column NAME is the source's column SOURCE.

    Files are read through the map: the columns asked for and the filters are in
    hindsight's names, the table comes back with them. Unmapped columns keep their names."""

    pairs: tuple[tuple[str, str], ...] = ()  # (hindsight name, source column)

    @classmethod
    def of(cls, mapping: Mapping[str, str] | None) -> ColumnMap:
        """A map from NAME -> SOURCE; ValueError for a name hindsight has no use for."""
        mapping = dict(mapping or {})
        unknown = sorted(set(mapping) - set(MAPPABLE))
        if unknown:
            raise ValueError(
                f"--map {unknown[0]}={mapping[unknown[0]]}: {unknown[0]!r} is not a step "
                f"column hindsight fills from a source; map one of {', '.join(MAPPABLE)} "
                "(other columns are kept as info columns under their own names)"
            )
        sources = list(mapping.values())
        twice = sorted({s for s in sources if sources.count(s) > 1})
        if twice:
            raise ValueError(f"--map: source column {twice[0]!r} is mapped to two names")
        return cls(tuple((name, source) for name, source in mapping.items() if name != source))

    def source(self, name: str) -> str:
        """The source column that holds hindsight's column `name`."""
        return dict(self.pairs).get(name, name)

    def describe(self, name: str) -> str:
        """A column as the user knows it: `frame_index (--map t)` for a mapped one."""
        source = self.source(name)
        return name if source == name else f"{source} (--map {name})"

    def renamed(self, names: list[str]) -> list[str]:
        """A file's column names as hindsight sees them."""
        back = {source: name for name, source in self.pairs}
        return [back.get(n, n) for n in names]

    def problems(self, path: str, names: list[str]) -> list[Problem]:
        """Each mapped source column is in the file, and no unmapped column of the file
        already has the name it is mapped to."""
        present = set(names)
        mapped_sources = {source for _, source in self.pairs}
        problems = [
            Problem(
                path,
                source,
                f"is not in the file (--map {name}={source}); its columns: "
                f"{', '.join(sorted(present))}",
            )
            for name, source in self.pairs
            if source not in present
        ]
        problems += [
            Problem(
                path,
                name,
                f"is a column of the file and --map {name}={source} maps another onto it; "
                f"map {name} to it, or rename one of them in the source",
            )
            for name, source in self.pairs
            if name in present and name not in mapped_sources
        ]
        return problems


def read_step_file(
    path: str,
    format: str,
    columns: list[str] | None = None,
    filters: list | None = None,
    column_map: ColumnMap = ColumnMap(),
) -> pa.Table:
    """One step-table file as Arrow, with a clear error for a truncated or corrupt file.
    `columns` and `filters` name columns as hindsight does; `column_map` says which source
    column holds each, and the table comes back with hindsight's names."""
    fs, key = storage.filesystem(path)
    wanted = [column_map.source(name) for name in columns] if columns is not None else None
    if filters is not None:
        filters = [(column_map.source(name), op, value) for name, op, value in filters]
    try:
        if format == "parquet":
            table = pq.read_table(key, filesystem=fs, columns=wanted, filters=filters)
        else:
            with fs.open_input_stream(key) as stream:
                table = pajson.read_json(stream)
            table = table.select(wanted) if wanted is not None else table
    except (pa.ArrowInvalid, OSError) as error:
        raise ValueError(
            f"{path}: cannot read it as {format} (truncated or corrupt file?): {error}"
        ) from error
    return table.rename_columns(column_map.renamed(table.column_names))


def step_file_schema(path: str, format: str) -> pa.Schema:
    """The schema of one file as stored (source names): Parquet's footer; a JSON Lines
    file is read whole."""
    if format == "parquet":
        fs, key = storage.filesystem(path)
        try:
            return pq.read_schema(key, filesystem=fs)
        except (pa.ArrowInvalid, OSError) as error:
            raise ValueError(
                f"{path}: cannot read it as parquet (truncated or corrupt file?): {error}"
            ) from error
    return read_step_file(path, format).schema
