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
# The columns of a transition: what every format has a place for (a relabel column is not).
TRANSITION_COLUMNS = (*STEP_CORE_COLUMNS, NEXT_OBSERVATION)

# What a version's manifest metadata says of an optional core column its source lacked
# (`metadata["reward"] == ABSENT`: every reward and return is null, i.e. unknown).
ABSENT = "absent"

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


def numpy_to_arrow(values: np.ndarray, value_type: pa.DataType | None = None) -> pa.Array:
    """A 1-D NumPy array as an Arrow array, as `pa.array` makes it (no nulls: NaN stays a
    value). Numbers and booleans of a native dtype are built from their buffers (numbers
    without a copy): `pa.array` imports pandas, a fifth of a second of a cold command, to
    look for pandas objects. Anything else goes through `pa.array`."""
    values = np.asarray(values)
    if (
        values.ndim == 1
        and values.dtype.kind in "biuf"
        and values.dtype.isnative
        and (value_type is None or value_type == pa.from_numpy_dtype(values.dtype))
    ):
        if values.dtype.kind == "b":
            data = np.packbits(values, bitorder="little")
        else:
            data = np.ascontiguousarray(values)
        buffers = [None, pa.py_buffer(data)]
        return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), buffers)
    return pa.array(values, type=value_type)


def vectors_to_arrow(values: np.ndarray, value_type: pa.DataType = pa.float32()) -> pa.Array:
    """A 2-D array (rows, dim) as a FixedSizeListArray, without copying when possible.

    A 1-D array is stored as a plain scalar column (discrete actions, scalar states).
    Higher-rank arrays (images) are flattened per row; the shape is the reader's business.
    """
    values = np.asarray(values)
    if values.ndim == 1:
        return numpy_to_arrow(values, value_type)
    flat = np.ascontiguousarray(values.reshape(len(values), -1), dtype=value_type.to_pandas_dtype())
    dim = flat.shape[1]
    return pa.FixedSizeListArray.from_arrays(numpy_to_arrow(flat.reshape(-1), value_type), dim)


def arrow_to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The inverse of `vectors_to_arrow`: (rows, dim) for vectors, (rows,) for scalars."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_fixed_size_list(column.type):
        dim = column.type.list_size
        flat = _values_to_numpy(column.flatten())
        return flat.reshape(len(column), dim)
    return _values_to_numpy(column)


def _values_to_numpy(array: pa.Array) -> np.ndarray:
    """`array.to_numpy(zero_copy_only=False)`. Numbers and booleans without nulls are read
    from their buffers (numbers without a copy): `to_numpy` imports pandas, as `pa.array`
    does (`numpy_to_arrow`)."""
    kind = array.type
    numbers = pa.types.is_integer(kind) or pa.types.is_floating(kind)
    data = array.buffers()[1] if array.null_count == 0 and (numbers or kind == pa.bool_()) else None
    if data is None:
        return array.to_numpy(zero_copy_only=False)
    if numbers:
        dtype = np.dtype(kind.to_pandas_dtype())
        offset = array.offset * dtype.itemsize
        return np.frombuffer(data, dtype=dtype, count=len(array), offset=offset)
    bits = np.frombuffer(data, dtype=np.uint8)
    flags = np.unpackbits(bits, count=array.offset + len(array), bitorder="little")
    return flags[array.offset :].astype(bool)


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
