"""Whole episodes as NumPy arrays: read from dataset parts, concatenated, shuffled, dealt
into shards. Steps are gathered with vectorized index arithmetic, never a loop over steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.dataset import Dataset
from engine.shards.conditions import ConditionColumn, TextTable, condition_values
from engine.shards.exclude import Exclusion, StepFilter, read_filter
from engine.shards.frames import (
    EncodedFrames,
    FrameRanges,
    StoredFrames,
    concat_frames,
    read_part_frames,
)
from schemas import steps as cols
from schemas.shard_index import ConditionInfo, ShardError


@dataclass
class EpisodeArrays:
    """Whole episodes as NumPy arrays, steps sorted by (episode, t) within each episode.

    `conditions` holds one array per conditioning column with one row per step (episode
    columns already broadcast; categoricals as vocabulary indices; text as row indices into
    `texts[name]`, a (tokens [u, P, L], count [u]) pair). `frames` holds each sharded
    camera's encoded frames, one per step, as stored in the dataset.
    """

    episode_ids: np.ndarray  # [E] int64
    lengths: np.ndarray  # [E] int64
    returns: np.ndarray  # [E] float64
    timestep: np.ndarray  # [N] int32
    observation: np.ndarray  # [N, obs_dim] float32
    action: np.ndarray  # [N, act_dim] float32 or [N] int64
    reward: np.ndarray  # [N] float32
    conditions: dict[str, np.ndarray] = field(default_factory=dict)
    texts: dict[str, TextTable] = field(default_factory=dict)
    frames: dict[str, EncodedFrames | StoredFrames | FrameRanges] = field(default_factory=dict)
    filtered: StepFilter | None = None  # what `read_part_episodes` left out, if it could

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)


def expand_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated aranges [start, start + length) without a Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shifts = np.repeat(np.asarray(starts, dtype=np.int64) - np.cumsum(lengths) + lengths, lengths)
    return np.arange(total, dtype=np.int64) + shifts


def _state_vector(column: pa.ChunkedArray, where: str) -> np.ndarray:
    """The state the trainer sees, float32 (rows,) or (rows, d). A struct observation gives
    its `observation` member (goal-conditioned data: the goals are conditions), else its
    members side by side in field order (LeRobot's `state` and `environment_state`; a
    MiniGrid view's `direction` and `image`, as engine.minigrid.view_vector gives ask)."""
    if not pa.types.is_struct(column.type):
        return cols.arrow_to_numpy(column).astype(np.float32, copy=False)
    names = [column.type.field(i).name for i in range(column.type.num_fields)]
    if cols.OBSERVATION in names:
        names = [cols.OBSERVATION]
    members = []
    for name in names:
        kind = column.type.field(name).type
        value = kind.value_type if pa.types.is_fixed_size_list(kind) else kind
        if not (pa.types.is_integer(value) or pa.types.is_floating(value)):
            raise ShardError(
                f"{where}: column 'observation.{name}' is {kind}, not a number or a "
                "fixed-size vector of numbers: the state vector cannot hold it"
            )
        values = cols.arrow_to_numpy(pa.chunked_array([c.field(name) for c in column.chunks], kind))
        # The width from the type: a part whose steps were all excluded has none to infer it.
        width = kind.list_size if pa.types.is_fixed_size_list(kind) else 1
        members.append(values.astype(np.float32, copy=False).reshape(len(values), width))
    return members[0] if len(members) == 1 else np.concatenate(members, axis=1)


def read_part_episodes(
    dataset: Dataset,
    index: int,
    conditions: Sequence[ConditionColumn],
    infos: Mapping[str, ConditionInfo],
    cameras: Sequence[str] = (),
    exclusion: Exclusion | None = None,
    stream_frames: bool = False,
) -> EpisodeArrays:
    """Part `index` of a dataset version as EpisodeArrays (episode columns broadcast), with
    the encoded frames of `cameras` (read from the frames group's file of this part only),
    without the steps `exclusion` matches or whose text condition is null (exclude.py).
    With `stream_frames`, the frames are not read yet (`StoredFrames`, frames.py).

    Raises ShardError naming the part (and episode) for steps that do not match the episode
    lengths, NaN/inf/null rewards, and condition values that cannot be stored. Rewards null
    in every row are unknown (a dataset ingested without rewards), not bad: they become
    NaN, as do the episodes' (null) returns."""
    where = f"{dataset.uri} part {index}"
    step_conditions = [c.name for c in conditions if c.level == "steps"]
    episode_conditions = [c.name for c in conditions if c.level == "episodes"]
    heads = {name.partition(".")[0] for name in step_conditions}
    # Pixels-only data (no `observation` column: the frames are the observation) shards a
    # zero-width state vector, [N, 0], and the index says observation shape [0].
    has_state = cols.OBSERVATION in dataset.columns("steps", frames=False)
    step_columns = [cols.EPISODE_ID, cols.T, cols.ACTION, cols.REWARD]
    step_columns += [cols.OBSERVATION] if has_state else []
    steps = dataset.read_part(index, "steps", list(dict.fromkeys(step_columns + sorted(heads))))
    episodes = dataset.read_part(
        index,
        "episodes",
        list(dict.fromkeys([cols.EPISODE_ID, cols.LENGTH, cols.RETURN, *episode_conditions])),
    )
    found = read_filter(dataset, index, conditions, exclusion)
    part_steps = steps.num_rows
    if found is not None and not found.keep.all():
        # Left out before anything is converted: the kept steps of an episode become its
        # steps (t renumbered from 0), an episode with none left is dropped.
        steps = steps.filter(pa.array(found.keep))
        kept = pa.array(found.kept_lengths, pa.int64())
        episodes = episodes.set_column(
            episodes.schema.get_field_index(cols.LENGTH), cols.LENGTH, kept
        ).filter(pa.array(found.keep_episodes))
    lengths = episodes.column(cols.LENGTH).to_numpy().astype(np.int64)
    boundaries = cols.episode_boundaries(steps.column(cols.EPISODE_ID).to_numpy())
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    if len(boundaries) != len(offsets) or not np.array_equal(boundaries, offsets):
        raise ShardError(
            f"{where}: the steps do not match the episode lengths (steps sorted by "
            "(episode_id, t) with one episodes row per episode expected)"
        )
    if has_state:
        observation = _state_vector(steps.column(cols.OBSERVATION), where)
    else:
        observation = np.zeros((steps.num_rows, 0), np.float32)
    reward = steps.column(cols.REWARD)
    unknown = steps.num_rows > 0 and reward.null_count == steps.num_rows
    if unknown:
        reward = pa.chunked_array([pa.array(np.full(steps.num_rows, np.nan, np.float32))])
    elif reward.null_count or not np.all(np.isfinite(reward.to_numpy(zero_copy_only=False))):
        bad = np.flatnonzero(~np.isfinite(reward.fill_null(np.nan).to_numpy(zero_copy_only=False)))
        episode_id = steps.column(cols.EPISODE_ID)[int(bad[0])].as_py()
        raise ShardError(
            f"{where}: column 'reward' has {len(bad)} NaN/inf/null values (first in episode "
            f"{episode_id}); fix the dataset before sharding"
        )
    action = cols.arrow_to_numpy(steps.column(cols.ACTION))
    arrays = EpisodeArrays(
        episode_ids=episodes.column(cols.EPISODE_ID).to_numpy().astype(np.int64),
        lengths=lengths,
        returns=pc.fill_null(episodes.column(cols.RETURN).cast(pa.float64()), np.nan).to_numpy(),
        timestep=steps.column(cols.T).to_numpy().astype(np.int32)
        if found is None or found.keep.all()
        # Renumbered from 0: the loader cuts a window ending at t from t + 1 steps.
        else (np.arange(steps.num_rows) - np.repeat(offsets[:-1], lengths)).astype(np.int32),
        observation=observation,
        action=action.astype(np.int64 if action.ndim == 1 else np.float32, copy=False),
        reward=reward.to_numpy(zero_copy_only=False).astype(np.float32, copy=False),
    )
    if arrays.observation.ndim == 1:
        arrays.observation = arrays.observation[:, None]
    if arrays.action.ndim == 1 and np.issubdtype(action.dtype, np.floating):
        arrays.action = action.astype(np.float32)[:, None]
    for condition in conditions:
        table = steps if condition.level == "steps" else episodes
        column = cols.column_by_path(table, condition.name)
        values, text_table = condition_values(condition, column, infos.get(condition.name), where)
        if condition.level == "episodes":
            values = np.repeat(values, lengths, axis=0)
        arrays.conditions[condition.name] = values
        if text_table is not None:
            arrays.texts[condition.name] = text_table
    frames = read_part_frames(dataset, index, cameras, part_steps, stream_frames)
    if found is not None and not found.keep.all() and frames:
        # Runs of consecutive kept steps: frames are copied range by range, not one by one
        # (stored frames are not read: they keep the rows to read later).
        edges = np.diff(np.concatenate([[0], found.keep.astype(np.int8), [0]]))
        starts = np.flatnonzero(edges == 1)
        counts = np.flatnonzero(edges == -1) - starts
        frames = {
            camera: data.keep(found.keep)
            if isinstance(data, StoredFrames)
            else data.take_ranges(starts, counts)
            for camera, data in frames.items()
        }
    arrays.frames = frames
    arrays.filtered = found
    return arrays


def concat_episodes(chunks: Sequence[EpisodeArrays]) -> EpisodeArrays:
    """Episodes of several parts as one set (text tables are renumbered)."""
    if len(chunks) == 1:
        return chunks[0]
    conditions: dict[str, np.ndarray] = {}
    texts: dict[str, TextTable] = {}
    for name in chunks[0].conditions:
        if name in chunks[0].texts:
            shift = np.cumsum([0] + [len(c.texts[name][1]) for c in chunks[:-1]])
            conditions[name] = np.concatenate(
                [c.conditions[name] + s for c, s in zip(chunks, shift)]
            ).astype(np.int32)
            texts[name] = concat_text_tables([c.texts[name] for c in chunks])
        else:
            conditions[name] = np.concatenate([c.conditions[name] for c in chunks])
    return EpisodeArrays(
        episode_ids=np.concatenate([c.episode_ids for c in chunks]),
        lengths=np.concatenate([c.lengths for c in chunks]),
        returns=np.concatenate([c.returns for c in chunks]),
        timestep=np.concatenate([c.timestep for c in chunks]),
        observation=np.concatenate([c.observation for c in chunks]),
        action=np.concatenate([c.action for c in chunks]),
        reward=np.concatenate([c.reward for c in chunks]),
        conditions=conditions,
        texts=texts,
        frames={
            camera: concat_frames([c.frames[camera] for c in chunks]) for camera in chunks[0].frames
        },
    )


def concat_text_tables(tables: Sequence[TextTable]) -> TextTable:
    """Token tables one after another, padded to the widest paraphrase count."""
    width = max(tokens.shape[1] for tokens, _ in tables)
    tokens = np.concatenate(
        [np.pad(tokens, ((0, 0), (0, width - tokens.shape[1]), (0, 0))) for tokens, _ in tables]
    )
    return tokens, np.concatenate([count for _, count in tables])


def select_episodes(episodes: EpisodeArrays, order: np.ndarray) -> EpisodeArrays:
    """The episodes at positions `order` (in that order), steps gathered vectorized."""
    rows = expand_ranges(episodes.offsets[order], episodes.lengths[order])
    return EpisodeArrays(
        episode_ids=episodes.episode_ids[order],
        lengths=episodes.lengths[order],
        returns=episodes.returns[order],
        timestep=episodes.timestep[rows],
        observation=episodes.observation[rows],
        action=episodes.action[rows],
        reward=episodes.reward[rows],
        conditions={name: values[rows] for name, values in episodes.conditions.items()},
        texts=episodes.texts,
        frames={  # ranges of the task's frames: each block copies its own (tar.py)
            camera: frames.select(episodes.offsets[order], episodes.lengths[order])
            for camera, frames in episodes.frames.items()
        },
    )


def split_for_shards(lengths: np.ndarray, shards: int) -> list[tuple[int, int]]:
    """Episode ranges [start, stop) of `shards` groups with about equal step counts."""
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    cuts = [0]
    for j in range(1, shards):
        cut = int(np.searchsorted(ends, total * j / shards, side="left")) + 1
        cuts.append(min(max(cut, cuts[-1]), len(lengths)))
    cuts.append(len(lengths))
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:])]


def shuffled_shards(
    episodes: EpisodeArrays, shards: int, seed: int, task: int
) -> Iterator[EpisodeArrays]:
    """Episodes permuted (seeded by seed and task) and dealt into `shards` groups, one
    group at a time: each is gathered from the task's episodes when it is needed (no
    permuted copy of them all, one shard's copy of encoded frames at a time)."""
    order = np.random.default_rng([seed, task]).permutation(len(episodes.lengths))
    for start, stop in split_for_shards(episodes.lengths[order], shards):
        yield select_episodes(episodes, order[start:stop])
