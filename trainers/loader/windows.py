"""Pools and windows: blocks -> pools of about `shuffle_buffer` windows -> batches.

Stages (pure: no I/O, each testable alone with hand-made blocks):
    pools (blocks placed in the epoch -> Pool, with the position where it starts and ends)
    -> pool_arrays (a pool's blocks concatenated, plus one zero row for padding)
    -> pool_batches (a seeded permutation of the pool, cut into batches by `cut_windows`;
       with cameras, each batch's frames decoded and stacked by trainers/loader/frames.py)
Positions make resume exact: pools and their permutations depend only on the seed, the
epoch, the consumer and the pool number.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from schemas.frames import CameraInfo
from schemas.shard_index import (
    ACTION,
    EPISODE_ID,
    OBSERVATION,
    REWARD,
    TIMESTEP,
    WINDOW_END,
    WINDOW_START,
    ShardError,
    ShardIndex,
    condition_member,
    text_index_member,
)
from trainers.loader.frames import (
    Allocate,
    FrameDecoder,
    PoolFrames,
    pool_frames,
    random_shift,
    window_frames,
)
from trainers.loader.shards import Block

MASK = "mask"  # the batch entry that marks real (not padded) steps


class LostWindows:
    """Windows of skipped shards and of windows with a frame that did not decode
    (on_error="skip"), counted across epochs."""

    def __init__(self, count: int = 0) -> None:
        self.count = count


@dataclass(frozen=True)
class FrameOptions:
    """What the loader does with camera frames (see `stream()`)."""

    cameras: Mapping[str, CameraInfo]
    frame_stack: int = 1
    augment_shift: int = 0
    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    on_error: str = "raise"
    lost: LostWindows = field(default_factory=LostWindows)
    allocate: Allocate | None = None  # where a batch's frames go (None: np.empty)


@dataclass(frozen=True)
class Position:
    """Where a consumer is: the next window is window `window` of block `offset` of the
    `shard`-th shard of this consumer's share of epoch `epoch`'s shard order; `batch` is the
    next batch of pool `pool`."""

    epoch: int = 0
    shard: int = 0
    offset: int = 0
    window: int = 0
    pool: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    def pool_start(self) -> Position:
        """The start of the pool this position is in (batch 0)."""
        return Position(**{**self.to_dict(), "batch": 0})


@dataclass(frozen=True)
class PlacedBlock:
    """A block and where it is: block `number` of the `shard`-th shard of the epoch."""

    shard: int
    number: int
    block: Block


@dataclass
class Pool:
    """The shuffle buffer: about `shuffle_buffer` windows, as (block, first, stop) pieces."""

    pieces: list[tuple[Block, int, int]]
    start: Position
    end: Position  # where the next pool starts

    @property
    def windows(self) -> int:
        return sum(stop - first for _, first, stop in self.pieces)


def pools(
    blocks: Iterable[PlacedBlock], start: Position, pool_windows: int, shards: int
) -> Iterator[Pool]:
    """Pools of `pool_windows` consecutive windows of `blocks` (an epoch's, from `start` on;
    `shards` in the epoch), the last one smaller."""
    pieces: list[tuple[Block, int, int]] = []
    count = 0
    pool_start, pool_number = start.pool_start(), start.pool
    for placed in blocks:
        block = placed.block
        lo = start.window if (placed.shard, placed.number) == (start.shard, start.offset) else 0
        while lo < block.num_windows:
            take = min(block.num_windows - lo, pool_windows - count)
            pieces.append((block, lo, lo + take))
            count += take
            lo += take
            if count == pool_windows:
                end = Position(start.epoch, placed.shard, placed.number, lo, pool_number + 1)
                yield Pool(pieces, pool_start, end)
                pieces, count = [], 0
                pool_start, pool_number = end, pool_number + 1
    if pieces:
        end = Position(start.epoch, shards, 0, 0, pool_number + 1)
        yield Pool(pieces, pool_start, end)


@dataclass
class PoolArrays:
    """A pool's blocks concatenated: step arrays plus the pool's windows."""

    steps: dict[str, np.ndarray]
    end: np.ndarray
    start: np.ndarray
    episode_id: np.ndarray
    text_index: dict[str, np.ndarray]
    texts: dict[str, tuple[np.ndarray, np.ndarray]]
    frames: dict[str, PoolFrames] = field(default_factory=dict)


def pool_arrays(pool: Pool, cameras: Mapping[str, CameraInfo] | None = None) -> PoolArrays:
    """The blocks of a pool as one set of arrays, window rows renumbered into it; the
    encoded frames of `cameras` stay in their blocks (only a batch's are decoded)."""
    blocks = []
    seen: dict[int, int] = {}
    for block, _, _ in pool.pieces:
        if id(block) not in seen:
            seen[id(block)] = len(blocks)
            blocks.append(block)
    row_offsets = np.cumsum([0] + [len(b.steps[REWARD]) for b in blocks])
    # One zero row after the steps: padded window positions gather it (no mask multiply).
    steps = {
        name: np.concatenate(
            [
                *(b.steps[name] for b in blocks),
                np.zeros((1, *blocks[0].steps[name].shape[1:]), blocks[0].steps[name].dtype),
            ]
        )
        for name in blocks[0].steps
    }
    ends, starts, episodes = [], [], []
    text_index: dict[str, list[np.ndarray]] = {name: [] for name in blocks[0].texts}
    text_offsets = {
        name: np.cumsum([0] + [len(b.texts[name][1]) for b in blocks]) for name in blocks[0].texts
    }
    for block, first, stop in pool.pieces:
        number = seen[id(block)]
        ends.append(block.windows[WINDOW_END][first:stop] + row_offsets[number])
        starts.append(block.windows[WINDOW_START][first:stop] + row_offsets[number])
        episodes.append(block.windows[EPISODE_ID][first:stop])
        for name in text_index:
            text_index[name].append(
                block.windows[text_index_member(name)][first:stop] + text_offsets[name][number]
            )
    texts = {}
    for name in blocks[0].texts:
        width = max(b.texts[name][0].shape[1] for b in blocks)
        tokens = np.concatenate(
            [
                np.pad(b.texts[name][0], ((0, 0), (0, width - b.texts[name][0].shape[1]), (0, 0)))
                for b in blocks
            ]
        )
        texts[name] = (tokens, np.concatenate([b.texts[name][1] for b in blocks]))
    return PoolArrays(
        steps=steps,
        end=np.concatenate(ends).astype(np.int64),
        start=np.concatenate(starts).astype(np.int64),
        episode_id=np.concatenate(episodes),
        text_index={name: np.concatenate(parts) for name, parts in text_index.items()},
        texts=texts,
        frames=pool_frames(blocks, row_offsets[:-1], dict(cameras or {})),
    )


def cut_windows(
    arrays: PoolArrays,
    selected: np.ndarray,
    window: int,
    index: ShardIndex,
    conditions: Sequence[str],
    rng: np.random.Generator | None,
    frames: FrameOptions | None = None,
) -> dict[str, np.ndarray]:
    """The windows `selected` (pool positions) as batch arrays, left-padded with a mask.
    `rng` draws the text, goal and shift picks; None where nothing is drawn (`draws`).

    Every per-step array is one `np.take` of [B * W] rows; padded positions take the pool's
    trailing zero row, so padding is 0 everywhere. With `frames`, the windows' camera frames
    too (`frame_<camera>` uint8 [B, W, C * k, H, W]); windows with a frame that does not
    decode raise a ShardError naming the shard and sample, or with on_error="skip" are left
    out of the batch and counted.
    """
    end = arrays.end[selected]
    start = arrays.start[selected]
    rows = end[:, None] + np.arange(1 - window, 1)[None, :]
    mask = rows >= start[:, None]
    zero_row = len(arrays.steps[REWARD]) - 1
    flat = np.where(mask, rows, zero_row).reshape(-1)
    shape = rows.shape

    def gather(values: np.ndarray, positions: np.ndarray = flat) -> np.ndarray:
        taken = np.take(values, positions, axis=0)
        return taken.reshape(*shape, *values.shape[1:])

    batch = {
        OBSERVATION: gather(arrays.steps[OBSERVATION]),
        ACTION: gather(arrays.steps[ACTION]),
        REWARD: gather(arrays.steps[REWARD]),
        TIMESTEP: gather(arrays.steps[TIMESTEP]).astype(np.int64),
        MASK: mask,
        EPISODE_ID: arrays.episode_id[selected].astype(np.int64),
    }
    if batch[ACTION].dtype != np.float32:
        batch[ACTION] = batch[ACTION].astype(np.int64)
    for name in conditions:
        info = index.conditions[name]
        if info.type == "text":
            rows_of_text = arrays.text_index[name][selected]
            tokens, count = arrays.texts[name]
            pick = np.floor(rng.random(len(selected)) * np.maximum(count[rows_of_text], 1))
            batch[name] = tokens[rows_of_text, pick.astype(np.int64)].astype(np.int64)
            continue
        values = arrays.steps[condition_member(name)]
        if info.type == "vector" and info.count:
            # One of the k goals per window: row * k + goal in the [n * k, D] view.
            goal = rng.integers(0, info.count, size=len(selected))
            positions = (flat.reshape(shape) * info.count + goal[:, None]).reshape(-1)
            batch[name] = gather(values.reshape(-1, values.shape[-1]), positions)
        elif info.type == "categorical":
            batch[name] = gather(values).astype(np.int64)
        else:
            batch[name] = gather(values).astype(np.float32, copy=False)
    if frames is not None and frames.cameras:
        batch = add_frames(batch, arrays, rows, mask, frames, rng)
    return batch


def draws(index: ShardIndex, conditions: Sequence[str], frames: FrameOptions | None) -> bool:
    """Whether cutting a batch draws random numbers: a text (one of its paraphrases), one of
    k goals per step, or frames (a random shift)."""
    infos = [index.conditions[name] for name in conditions]
    picks = any(info.type == "text" or (info.type == "vector" and info.count) for info in infos)
    return picks or frames is not None


def add_frames(
    batch: dict[str, np.ndarray],
    arrays: PoolArrays,
    rows: np.ndarray,
    mask: np.ndarray,
    frames: FrameOptions,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """The batch with its windows' decoded, stacked (and shifted) frames; see cut_windows."""
    decoded, bad, messages = window_frames(
        arrays.frames,
        rows,
        mask,
        arrays.steps[TIMESTEP],
        frames.frame_stack,
        frames.decoder,
        frames.allocate,
    )
    for name, values in decoded.items():  # one shift per window, drawn after the conditions'
        batch[name] = random_shift(values, frames.augment_shift, rng, frames.allocate)
    if not bad.any():
        return batch
    if frames.on_error != "skip":
        raise ShardError(f"{messages[0]} (corrupt shard)")
    frames.lost.count += int(bad.sum())
    warnings.warn(
        f"{messages[0]}; {int(bad.sum())} windows with frames that do not decode skipped",
        stacklevel=2,
    )
    keep = ~bad
    return {name: values[keep] for name, values in batch.items()}


def pool_batches(
    pool: Pool,
    index: ShardIndex,
    conditions: Sequence[str],
    *,
    batch_size: int,
    seed: int,
    consumer: int,
    drop_last: bool,
    first_batch: int = 0,
    window: int | None = None,
    frames: FrameOptions | None = None,
) -> Iterator[tuple[dict[str, np.ndarray], Position]]:
    """The batches of a pool from batch `first_batch` on, each with the position after it:
    a seeded permutation of the pool's windows, `batch_size` at a time (the last one
    smaller unless `drop_last`), each window its last `window` steps (default: the
    index's window; 1: single steps), with `frames` their camera frames (cut_windows).
    Seeds: (seed, epoch, consumer, pool[, batch])."""
    arrays = pool_arrays(pool, frames.cameras if frames else None)
    total = len(arrays.end)
    epoch, number_of_pool = pool.start.epoch, pool.start.pool
    order = np.random.default_rng([seed, epoch, consumer, number_of_pool]).permutation(total)
    batches = total // batch_size if drop_last else -(-total // batch_size)
    # A generator per batch (seeded by its position, for exact resume) costs ~15 us to
    # build, a tenth of cutting a batch of single steps: built only where a batch draws.
    random = draws(index, conditions, frames)
    for number in range(first_batch, batches):
        selected = order[number * batch_size : (number + 1) * batch_size]
        rng = None
        if random:
            rng = np.random.default_rng([seed, epoch, consumer, number_of_pool, number])
        batch = cut_windows(
            arrays, selected, window or index.window, index, conditions, rng, frames
        )
        after = (
            Position(**{**pool.start.to_dict(), "batch": number + 1})
            if number + 1 < batches
            else pool.end
        )
        yield batch, after
