"""The rows of a LeRobot dataset's data files: what plan reads of them (footers, the
`task_index` and `timestamp` columns) and checks, and how a part's columns become
hindsight's (scalars stored as lists of one, vectors, discrete actions)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine import storage
from engine.sources.tables import vector_column
from engine.validate import Problem, first_per_episode
from schemas import lerobot as lr
from schemas.steps import episode_boundaries


def read_footer_and_columns(uri: str, columns: list[str]) -> tuple[int, pa.Table]:
    """A data file's row count (from its footer) and, with `episode_index`, the columns
    (one open file: the footer is read once)."""
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as handle:
        file = pq.ParquetFile(handle)
        count = file.metadata.num_rows
        table = file.read(columns=["episode_index", *columns]) if columns else None
    if table is None:
        table = pa.table({"episode_index": pa.array([], pa.int64())})
    return count, table


# ---------------------------------------------------------------- the rows plan reads


def row_columns(info: lr.LeRobotInfo, tasks: dict[int, str]) -> list[str]:
    """The data files' columns plan reads besides `episode_index`: `task_index` (checked
    against the task table, where there is one) and, with videos, `timestamp` (the frames
    it needs)."""
    features = info.features
    wanted = [("task_index", bool(tasks)), ("timestamp", bool(info.video_keys))]
    return [name for name, needed in wanted if needed and name in features]


def flat_values(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A per-frame scalar stored as a value or as a list of one (shape [1])."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_list(array.type) or pa.types.is_fixed_size_list(array.type):
        array = array.flatten()
    return array.to_numpy(zero_copy_only=False)


def _row_steps(episode_ids: np.ndarray) -> np.ndarray:
    """Each row's place in its episode (rows grouped by episode, in frame order)."""
    boundaries = episode_boundaries(episode_ids)
    return np.arange(len(episode_ids)) - np.repeat(boundaries[:-1], np.diff(boundaries))


def check_rows(
    file: str, table: pa.Table, tasks: dict[int, str], sizes: Mapping[str, int] | None = None
) -> list[Problem]:
    """Rows grouped by episode (`episode_index`, and `task_index` or `timestamp` where
    present): every task index is in the task table, every timestamp is a time >= 0, every
    vector feature of `sizes` (name -> values per frame, from info.json) has that many values.
    One problem per bad episode, at its first bad row, in episode order."""
    episode_ids = np.asarray(table.column("episode_index").to_numpy(), dtype=np.int64)
    steps = _row_steps(episode_ids)
    problems = []
    for name, size in (sizes or {}).items():
        if name not in table.column_names:
            continue
        counts = _values_per_row(table.column(name))
        problems += first_per_episode(
            file,
            name,
            episode_ids,
            counts != size,
            lambda row, counts=counts, size=size: (
                "is null"
                if counts[row] < 0
                else f"has {counts[row]} values, {lr.INFO_PATH} says {size}"
            ),
            steps,
        )
    if "task_index" in table.column_names:
        index = flat_values(table.column("task_index")).astype(np.int64)
        problems += first_per_episode(
            file,
            "task_index",
            episode_ids,
            ~np.isin(index, list(tasks)),
            lambda row: f"task {index[row]} is not in the dataset's task table",
            steps,
        )
    if "timestamp" in table.column_names:
        stamps = flat_values(table.column("timestamp")).astype(np.float64)
        problems += first_per_episode(
            file,
            "timestamp",
            episode_ids,
            ~(stamps >= 0),  # NaN too
            lambda row: f"timestamp {stamps[row]} is not a time >= 0",
            steps,
        )
    first = {}
    for problem in problems:  # one per episode: its first bad row of either column
        known = first.get(problem.episode)
        if known is None or (problem.step or 0) < (known.step or 0):
            first[problem.episode] = problem
    return [first[e] for e in sorted(first)]


def _values_per_row(column: pa.ChunkedArray) -> np.ndarray:
    """How many values each row of a vector (or scalar) feature holds; -1 for a null row.
    A ragged list would otherwise be cut into rows at the wrong places."""
    array = column.combine_chunks()
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        counts = pc.list_value_length(array).fill_null(-1)
        return np.asarray(counts.to_numpy(zero_copy_only=False), dtype=np.int64)
    width = array.type.list_size if pa.types.is_fixed_size_list(array.type) else 1
    counts = np.full(len(array), width, np.int64)
    counts[np.asarray(array.is_null().to_numpy(zero_copy_only=False), bool)] = -1
    return counts


def last_timestamps(table: pa.Table) -> dict[int, dict[str, Any]]:
    """episode -> its largest timestamp and the step holding it (LeRobotEpisode's fields);
    empty without a `timestamp` column."""
    if "timestamp" not in table.column_names or table.num_rows == 0:
        return {}
    episode_ids = np.asarray(table.column("episode_index").to_numpy(), dtype=np.int64)
    stamps = flat_values(table.column("timestamp")).astype(np.float64)
    boundaries = episode_boundaries(episode_ids)
    out = {}
    for start, stop in zip(boundaries[:-1], boundaries[1:], strict=True):
        step = int(np.argmax(stamps[start:stop]))
        out[int(episode_ids[start])] = {
            "last_timestamp": float(stamps[start + step]),
            "last_timestamp_step": step,
        }
    return out


# ---------------------------------------------------------------- a part's columns


def read_row_range(uri: str, start: int, stop: int, columns: list[str]) -> pa.Table:
    """Rows [start, stop) of a Parquet file: only the row groups holding them are read."""
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as handle:
        file = pq.ParquetFile(handle)
        groups, first, offset = [], None, 0
        for group in range(file.metadata.num_row_groups):
            rows = file.metadata.row_group(group).num_rows
            if offset < stop and offset + rows > start:
                groups.append(group)
                first = offset if first is None else first
            offset += rows
        table = file.read_row_groups(groups, columns=columns)
    return table.slice(start - (first or 0), stop - start)


def step_column(column: pa.ChunkedArray) -> pa.Array:
    """A feature kept as a step column: scalars as they are, vectors as fixed-size lists."""
    array = column.combine_chunks()
    if pa.types.is_list(array.type) or pa.types.is_fixed_size_list(array.type):
        value_type = array.type.value_type
        if pa.types.is_list(array.type) and (
            len(array) == 0 or pc.min(pc.list_value_length(array)).as_py() != 1
        ):
            return vector_column(array, value_type)
        if pa.types.is_fixed_size_list(array.type) and array.type.list_size != 1:
            return vector_column(array, value_type)
        return array.flatten()
    return array


def observation_column(table: pa.Table, features: tuple[str, ...]) -> pa.Array | None:
    if not features:
        return None
    if len(features) == 1:
        return vector_column(table.column(features[0]))
    names = [f.removeprefix("observation.").replace(".", "_") for f in features]
    return pa.StructArray.from_arrays(
        [vector_column(table.column(f)) for f in features], names=names
    )


def action_column(column: pa.ChunkedArray) -> pa.Array:
    """Float actions as float32 fixed-size lists; integer scalars (discrete) as int64."""
    array = column.combine_chunks()
    if pa.types.is_integer(array.type):
        return array.cast(pa.int64())
    return vector_column(array)
