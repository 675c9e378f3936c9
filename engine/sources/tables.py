"""The base step and episode tables, built from arrays: one place for every source (and
for `collect`).

A source reads its rows as NumPy arrays (or Arrow columns), in (episode_id, t) order, and
hands them to `build_tables`, which converts them to the base schema (schemas/steps.py):
observations and actions as float32 fixed-size lists (dict observations as structs,
discrete actions as int64), per-step info columns with their own types, and the
episodes table (length, return, env id, source, and the info columns that are constant
within every episode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from schemas import steps as cols


@dataclass(frozen=True)
class EpisodeLabels:
    """What the episodes table says about every episode of a part besides its rows."""

    env_id: str
    source: str  # e.g. "d4rl:logs.h5", "collect:heuristic"
    # Info columns constant within every episode (a noise level, a skill): copied to the
    # episodes table too.
    episode_info_columns: tuple[str, ...] = ()


def observation_to_arrow(values: Any) -> pa.Array:
    """Observations as float32 fixed-size lists; a dict of arrays becomes a struct."""
    if isinstance(values, dict):
        names = sorted(values)
        return pa.StructArray.from_arrays(
            [observation_to_arrow(values[name]) for name in names], names=names
        )
    values = np.asarray(values)
    if values.ndim == 1:
        values = values.reshape(-1, 1)
    return cols.vectors_to_arrow(values.astype(np.float32, copy=False))


def action_to_arrow(values: np.ndarray) -> pa.Array:
    """Discrete actions (1-D integers) as int64; everything else float32 fixed-size lists."""
    values = np.asarray(values)
    if values.ndim == 1 and np.issubdtype(values.dtype, np.integer):
        return cols.numpy_to_arrow(values.astype(np.int64, copy=False))
    if values.ndim == 1:
        values = values.reshape(-1, 1)
    return cols.vectors_to_arrow(values.astype(np.float32, copy=False))


def info_to_arrow(values: np.ndarray) -> pa.Array:
    """A per-step info array with its own dtype; vectors become fixed-size lists."""
    values = np.asarray(values)
    if values.dtype.kind in "SO":
        return strings_to_arrow([v.decode() if isinstance(v, bytes) else str(v) for v in values])
    if values.ndim == 1:
        return cols.numpy_to_arrow(values)
    return cols.vectors_to_arrow(values, pa.from_numpy_dtype(values.dtype))


def strings_to_arrow(values: list[str]) -> pa.Array:
    """Strings as an Arrow string array, built from its buffers (`pa.array` would import
    pandas: see `schemas.steps.numpy_to_arrow`)."""
    encoded = [value.encode() for value in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(value) for value in encoded], out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:  # beyond a string array's 32-bit offsets
        return pa.array(values, type=pa.string())
    buffers = [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(encoded))]
    return pa.Array.from_buffers(pa.string(), len(encoded), buffers)


def vector_column(
    column: pa.Array | pa.ChunkedArray, value_type: pa.DataType = pa.float32()
) -> pa.Array:
    """A list, fixed-size list or scalar Arrow column as a fixed-size list of `value_type`
    (a struct of such columns stays a struct): vectors read from Parquet or JSON."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_struct(array.type):
        names = [array.type.field(i).name for i in range(array.type.num_fields)]
        return pa.StructArray.from_arrays(
            [vector_column(array.field(n), value_type) for n in names], names=names
        )
    if pa.types.is_fixed_size_list(array.type):
        return pa.FixedSizeListArray.from_arrays(
            array.flatten().cast(value_type), array.type.list_size
        )
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        size = len(array.flatten()) // len(array) if len(array) else 0
        return pa.FixedSizeListArray.from_arrays(array.flatten().cast(value_type), size)
    return pa.FixedSizeListArray.from_arrays(array.cast(value_type), 1)


def reward_to_arrow(reward: np.ndarray | None, rows: int) -> pa.Array:
    """Rewards as stored: float32; all null when the source has none (unknown)."""
    if reward is None:
        return pa.nulls(rows, pa.float32())
    return cols.numpy_to_arrow(np.asarray(reward, dtype=np.float32))


def build_tables(
    *,
    episode_ids: np.ndarray,
    observation: Any,
    action: np.ndarray | pa.Array,
    reward: np.ndarray | None,
    terminated: np.ndarray | None,
    truncated: np.ndarray | None,
    labels: EpisodeLabels,
    next_observation: Any = None,
    infos: dict[str, np.ndarray | pa.Array] | None = None,
    t: np.ndarray | None = None,
) -> tuple[pa.Table, pa.Table]:
    """The base step and episode tables of whole episodes given in (episode_id, t) order.

    Array arguments are NumPy (or already-converted Arrow) columns, one row per step; `t`
    defaults to 0, 1, 2, ... within each episode. `observation` is None when the whole
    observation is an image (its frames are the camera `observation`): the steps table
    then has no `observation` column. `labels` names the environment and the
    source of every episode and the info columns that are constant within episodes.

    `reward` is None when the source has no rewards: they are unknown, so the `reward`
    column and the episodes' `return` hold nulls (never zeros, which would be a claim).
    `terminated` None: no step is terminal; `truncated` None: the last step of each
    episode is, unless it is terminal.
    """
    # A value beyond float32's range becomes inf in these casts, as it would be stored;
    # ingest and collect check the tables built (engine.validate.check_stored_values).
    with np.errstate(over="ignore", invalid="ignore"):
        episode_ids = np.asarray(episode_ids, dtype=np.int64)
        boundaries = cols.episode_boundaries(episode_ids)
        starts, lengths = boundaries[:-1], np.diff(boundaries)
        if t is None:
            t = np.arange(len(episode_ids), dtype=np.int64) - np.repeat(starts, lengths)
        ends = np.zeros(len(episode_ids), dtype=bool)
        ends[boundaries[1:] - 1] = True
        terminated = np.zeros(len(episode_ids), bool) if terminated is None else terminated
        truncated = ends & ~np.asarray(terminated, dtype=bool) if truncated is None else truncated

        def arrow(values, convert):
            return values if isinstance(values, pa.Array | pa.ChunkedArray) else convert(values)

        steps = {
            cols.EPISODE_ID: cols.numpy_to_arrow(episode_ids),
            cols.T: cols.numpy_to_arrow(np.asarray(t, dtype=np.int32)),
        }
        if observation is not None:
            steps[cols.OBSERVATION] = arrow(observation, observation_to_arrow)
        steps |= {
            cols.ACTION: arrow(action, action_to_arrow),
            cols.REWARD: reward_to_arrow(reward, len(episode_ids)),
            cols.TERMINATED: cols.numpy_to_arrow(np.asarray(terminated, dtype=bool)),
            cols.TRUNCATED: cols.numpy_to_arrow(np.asarray(truncated, dtype=bool)),
        }
        if next_observation is not None:
            steps[cols.NEXT_OBSERVATION] = arrow(next_observation, observation_to_arrow)
        for name, values in (infos or {}).items():
            steps[name] = arrow(values, info_to_arrow)
        steps_table = pa.table(steps)

        if reward is None:
            returns = pa.nulls(len(starts), pa.float32())
        else:
            sums = np.zeros(0)
            if len(starts):
                sums = np.add.reduceat(np.asarray(reward, np.float32).astype(np.float64), starts)
            returns = cols.numpy_to_arrow(sums.astype(np.float32))
        episodes = {
            cols.EPISODE_ID: cols.numpy_to_arrow(episode_ids[starts]),
            cols.LENGTH: cols.numpy_to_arrow(lengths.astype(np.int64)),
            cols.RETURN: returns,
            cols.ENV_ID: strings_to_arrow([labels.env_id] * len(starts)),
            cols.SOURCE: strings_to_arrow([labels.source] * len(starts)),
        }
        for name in labels.episode_info_columns:
            episodes[name] = steps_table.column(name).take(cols.numpy_to_arrow(starts))
        return steps_table, pa.table(episodes)
