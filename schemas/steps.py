"""Arrow schemas of the two base tables: one row per step, one row per episode.

The column names here are a contract: relabelers, queries, shards and trainers use them.
Observations and actions are fixed-size lists of float32 (discrete actions are int64
scalars); a dict observation (gymnasium GoalEnv style) is a struct of such lists.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

# Step table columns.
EPISODE_ID = "episode_id"
T = "t"
OBSERVATION = "observation"
ACTION = "action"
REWARD = "reward"
TERMINATED = "terminated"
TRUNCATED = "truncated"
NEXT_OBSERVATION = "next_observation"

STEP_CORE_COLUMNS = (EPISODE_ID, T, OBSERVATION, ACTION, REWARD, TERMINATED, TRUNCATED)

# Episode table columns.
LENGTH = "length"
RETURN = "return"
ENV_ID = "env_id"
SOURCE = "source"

EPISODE_CORE_COLUMNS = (EPISODE_ID, LENGTH, RETURN, ENV_ID, SOURCE)

# Columns where Parquet dictionary encoding pays off; on float columns it made files
# ~45% larger and writes ~6x slower, so everything else is written plain.
DICTIONARY_COLUMNS = (EPISODE_ID, ENV_ID, SOURCE)


def vector_type(dim: int, value_type: pa.DataType = pa.float32()) -> pa.DataType:
    """The Arrow type of a fixed-length vector per row (an observation, a goal)."""
    return pa.list_(pa.field("item", value_type), dim)


def vectors_to_arrow(values: np.ndarray, value_type: pa.DataType = pa.float32()) -> pa.Array:
    """A 2-D array (rows, dim) as a FixedSizeListArray, without copying when possible.

    A 1-D array is stored as a plain scalar column (discrete actions, scalar states).
    Higher-rank arrays (images) are flattened per row; the shape is the reader's business.
    """
    values = np.asarray(values)
    if values.ndim == 1:
        return pa.array(values, type=value_type)
    flat = np.ascontiguousarray(values.reshape(len(values), -1), dtype=value_type.to_pandas_dtype())
    dim = flat.shape[1]
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=value_type), dim)


def arrow_to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The inverse of `vectors_to_arrow`: (rows, dim) for vectors, (rows,) for scalars."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_fixed_size_list(column.type):
        dim = column.type.list_size
        flat = column.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(column), dim)
    return column.to_numpy(zero_copy_only=False)


def struct_to_numpy(column: pa.Array | pa.ChunkedArray, field: str) -> np.ndarray:
    """One field of a struct column (e.g. `observation.achieved_goal`) as a NumPy array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return arrow_to_numpy(column.field(field))


def episode_boundaries(episode_ids: np.ndarray) -> np.ndarray:
    """Start offsets of each run of equal episode ids, plus the total length at the end.

    Step tables are sorted by (episode_id, t), so the runs are the episodes.
    """
    episode_ids = np.asarray(episode_ids)
    if len(episode_ids) == 0:
        return np.zeros(1, dtype=np.int64)
    starts = np.flatnonzero(np.diff(episode_ids)) + 1
    return np.concatenate([[0], starts, [len(episode_ids)]]).astype(np.int64)


def column_by_path(table: pa.Table, path: str) -> pa.ChunkedArray:
    """A column or a struct field addressed as `observation.achieved_goal`."""
    head, _, rest = path.partition(".")
    if head not in table.column_names:
        raise KeyError(path)
    column = table.column(head)
    for part in rest.split(".") if rest else []:
        column = pa.chunked_array(
            [chunk.field(part) for chunk in column.chunks], type=column.type.field(part).type
        )
    return column
