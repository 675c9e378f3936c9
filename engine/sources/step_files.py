"""The files of a step-table source (Parquet or JSON Lines): a file, a directory or a glob,
local or on S3, read with a clear error when one is truncated or corrupt."""

from __future__ import annotations

import fnmatch
import glob
import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from engine import storage

# File names a format reads, and the ones that make a directory of that format.
FILE_SUFFIXES = {"parquet": (".parquet",), "jsonl": (".jsonl", ".ndjson", ".json")}
DIRECTORY_SUFFIXES = {"parquet": (".parquet",), "jsonl": (".jsonl", ".ndjson")}


def step_table_files(source: str, format: str) -> list[str]:
    """A file, every file of the format in a directory, or a glob; sorted. Local or S3."""
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
            files = [f for f in storage.list_files(source) if f.endswith(suffixes)]
    elif os.path.isdir(source):
        files = sorted(os.path.join(source, n) for n in os.listdir(source) if n.endswith(suffixes))
    elif os.path.exists(source):
        files = [source]
    else:
        raise FileNotFoundError(f"{source}: no such file or directory")
    if not files:
        raise FileNotFoundError(f"{source}: no {format} files found")
    return files


def read_step_file(
    path: str, format: str, columns: list[str] | None = None, filters: list | None = None
) -> pa.Table:
    """One step-table file as Arrow, with a clear error for a truncated or corrupt file."""
    fs, key = storage.filesystem(path)
    try:
        if format == "parquet":
            return pq.read_table(key, filesystem=fs, columns=columns, filters=filters)
        with fs.open_input_stream(key) as stream:
            table = pajson.read_json(stream)
        return table.select(columns) if columns else table
    except (pa.ArrowInvalid, OSError) as error:
        raise ValueError(
            f"{path}: cannot read it as {format} (truncated or corrupt file?): {error}"
        ) from error


def step_file_schema(path: str, format: str) -> pa.Schema:
    """The schema of one file: Parquet's footer; a JSON Lines file is read whole."""
    if format == "parquet":
        fs, key = storage.filesystem(path)
        try:
            return pq.read_schema(key, filesystem=fs)
        except (pa.ArrowInvalid, OSError) as error:
            raise ValueError(
                f"{path}: cannot read it as parquet (truncated or corrupt file?): {error}"
            ) from error
    return read_step_file(path, format).schema
