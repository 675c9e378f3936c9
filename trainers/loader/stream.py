"""The stream: shards -> batches for one consumer (a rank, and a DataLoader worker in it),
with a position after every batch so that training resumes at exactly the next batch.

Stages per epoch:
    epoch_shards (seeded shard order, split by rank and worker)
    -> epoch_blocks (each shard's blocks, trainers/loader/shards.py; a bad shard raises or
       is skipped and counted)
    -> pools -> pool_batches (trainers/loader/windows.py)
`WindowDataset` chains them as a torch IterableDataset; `ShardStream` runs it in this
process or in DataLoader workers and keeps every worker's position; `stream()` checks the
arguments and builds one.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from engine import storage
from schemas.shard_index import ShardError, ShardIndex, ShardInfo
from trainers.loader.frames import FrameDecoder
from trainers.loader.handover import Lent, SharedFrames, new_board, pack_batch, unpack_batch
from trainers.loader.shards import (
    IndexMismatchError,
    UnsafeShardError,
    read_index,
    shard_blocks,
    shard_is_intact,
)
from trainers.loader.windows import (
    FrameOptions,
    LostWindows,
    PlacedBlock,
    Position,
    pool_batches,
    pools,
)

STATE_FORMAT = 1
# The settings a saved state is only valid with.
STATE_KEYS = ("seed", "rank", "world_size", "num_workers", "batch_size", "shuffle_buffer")


@dataclass(frozen=True)
class StreamOptions:
    """What `stream()` was asked for (see its docstring); the same in every worker."""

    batch_size: int
    conditions: tuple[str, ...]
    shuffle_buffer: int
    seed: int
    rank: int
    world_size: int
    num_workers: int
    epochs: int | None
    drop_last: bool
    on_error: str
    pin_memory: bool = False
    multiprocessing_context: str | None = None
    prefetch_factor: int = 4
    window: int | None = None  # steps per window cut; None: the index's window
    prefetch: int = 0  # batches made ahead in a background thread (num_workers=0 only)
    cameras: tuple[str, ...] = ()  # cameras whose frames batches carry
    frame_stack: int = 1  # frames stacked per step (at most the index's)
    augment_shift: int = 0  # DrQ random shift in pixels, seeded; 0: off
    decode_threads: int = 0  # threads decoding frames per consumer; 0: in the loader's thread
    frame_cache_mb: int = 1024  # decoded frames kept per rank (split among its workers)

    @property
    def consumers(self) -> int:
        """Ranks x workers: every consumer reads its own share of the shards."""
        return self.world_size * max(1, self.num_workers)

    @property
    def frame_cache_bytes(self) -> int:
        """Each consumer's share of the rank's frame cache (its workers split it)."""
        return (self.frame_cache_mb << 20) // max(1, self.num_workers)

    @property
    def pool_windows(self) -> int:
        """Windows per pool: the shuffle buffer rounded up to whole batches."""
        return max(self.batch_size, -(-self.shuffle_buffer // self.batch_size) * self.batch_size)


# ---------------------------------------------------------------- shards of an epoch


def epoch_shards(
    index: ShardIndex, seed: int, epoch: int, consumer: int, consumers: int
) -> list[ShardInfo]:
    """This consumer's shards for `epoch`: a seeded permutation (the same in every
    process) split by rank and worker."""
    order = np.random.default_rng([seed, epoch]).permutation(len(index.shards))
    return [index.shards[i] for i in order[consumer::consumers]]


def epoch_blocks(
    shards: Sequence[ShardInfo],
    root: str,
    index: ShardIndex,
    conditions: Sequence[str],
    start: Position,
    on_error: str,
    lost: LostWindows,
    cameras: Sequence[str] = (),
) -> Iterator[PlacedBlock]:
    """The blocks of `shards` in order from `start` (shard, block), each shard checked
    against its index entry (block and window counts, size, sha256). A truncated or corrupt
    shard raises ShardError naming it, or with on_error="skip" warns and adds its unread
    windows to `lost`; an unsafe member always raises, and so does an intact shard that its
    index does not describe (IndexMismatchError: the index is wrong, not the shard)."""
    for position in range(start.shard, len(shards)):
        info = shards[position]
        url = storage.join(root, info.name)
        first_block = start.offset if position == start.shard else 0
        seen_blocks, seen_windows = first_block, 0
        try:
            for number, block in enumerate(
                shard_blocks(url, index, conditions, first_block, expected=info, cameras=cameras),
                start=first_block,
            ):
                seen_blocks += 1
                seen_windows += block.num_windows
                yield PlacedBlock(position, number, block)
            if seen_blocks != info.blocks:
                raise ShardError(
                    f"{url} ends after {seen_blocks} of {info.blocks} blocks (truncated shard)"
                )
            if first_block == 0 and seen_windows != info.windows:
                raise IndexMismatchError(
                    f"{url}: index.json records windows={info.windows} for this shard, but "
                    f"the shard (its sha256 as recorded) holds {seen_windows}; the index does "
                    "not describe these shards"
                )
        except UnsafeShardError:
            raise
        except Exception as error:
            if isinstance(error, IndexMismatchError) and shard_is_intact(url, info):
                raise  # the index is wrong for an intact shard: no shard to skip
            message = f"shard {url} is truncated or corrupt: {error}"
            if on_error != "skip":
                raise ShardError(message) from error
            windows = max(0, info.windows - seen_windows) if first_block == 0 else 0
            lost.count += windows
            warnings.warn(f"{message}; skipped, {windows} windows lost", stacklevel=2)


# ---------------------------------------------------------------- the dataset and the stream


class WindowDataset(torch.utils.data.IterableDataset):
    """Batches of one consumer (a rank, and a DataLoader worker within it), each with the
    consumer's position after it."""

    def __init__(
        self,
        root: str,
        index: ShardIndex,
        options: StreamOptions,
        start_positions: Sequence[dict[str, int] | None] | None = None,
        board: torch.Tensor | None = None,
    ):
        super().__init__()
        self.root = root
        self.index = index
        self.options = options
        self.start_positions = start_positions
        self.board = board  # the workers' frame buffers: lent or free (handover.py)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        o = self.options
        consumer = o.rank * max(1, o.num_workers) + worker
        saved = dict((self.start_positions or [None] * (worker + 1))[worker] or {})
        lost = LostWindows(int(saved.pop("lost_windows", 0)))
        position = Position(**saved)
        frames = None
        # In a DataLoader worker, frames are gathered straight into shared memory.
        memory = SharedFrames(self.board, worker) if info is not None else None
        if o.cameras:
            cameras = {camera: self.index.cameras[camera] for camera in o.cameras}
            frames = FrameOptions(
                cameras=cameras,
                frame_stack=o.frame_stack,
                augment_shift=o.augment_shift,
                decoder=FrameDecoder(o.decode_threads, o.frame_cache_bytes, cameras),
                on_error=o.on_error,
                lost=lost,
                allocate=memory.empty if memory is not None else None,
            )
        try:
            yield from self._batches(consumer, worker, position, lost, frames, memory)
        finally:
            if frames is not None:
                frames.decoder.close()

    def _batches(
        self,
        consumer: int,
        worker: int,
        position: Position,
        lost: LostWindows,
        frames: FrameOptions | None,
        memory: SharedFrames | None,
    ):
        o = self.options
        epoch = position.epoch
        while o.epochs is None or epoch < o.epochs:
            if epoch != position.epoch:
                position = Position(epoch=epoch)
            shards = epoch_shards(self.index, o.seed, epoch, consumer, o.consumers)
            if not shards:
                return  # fewer shards than consumers: this one has none (stream() warned)
            from_start = position == Position(epoch=epoch)
            produced = 0
            blocks = epoch_blocks(
                shards, self.root, self.index, o.conditions, position, o.on_error, lost, o.cameras
            )
            for pool in pools(blocks, position, o.pool_windows, len(shards)):
                first = position.batch if pool.start == position.pool_start() else 0
                for batch, after in pool_batches(
                    pool,
                    self.index,
                    o.conditions,
                    batch_size=o.batch_size,
                    seed=o.seed,
                    consumer=consumer,
                    drop_last=o.drop_last,
                    first_batch=first,
                    window=o.window,
                    frames=frames,
                ):
                    state = {**after.to_dict(), "worker": worker, "lost_windows": lost.count}
                    produced += 1
                    if memory is None:
                        yield {k: torch.from_numpy(v) for k, v in batch.items()}, state
                    else:
                        yield pack_batch(batch, memory), state
            if from_start and not produced:
                return  # a whole epoch without a window (every shard skipped): stop, not spin
            epoch += 1


def in_background(source: Iterator[Any], depth: int) -> Iterator[Any]:
    """The items of `source`, made up to `depth` ahead by a daemon thread: the loader's file
    reads and NumPy gathers overlap the model's step (PyTorch releases the GIL while it
    computes). An error in `source` is raised here, after the items before it; closing
    this generator stops the thread."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                if not put((item, None)):
                    return
        except BaseException as error:  # handed to the consumer, raised there
            put((end, error))
            return
        put((end, None))

    thread = threading.Thread(target=produce, name="hindsight-loader", daemon=True)
    thread.start()
    try:
        while True:
            item, error = items.get()
            if item is end:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


class ShardStream:
    """An iterable of batches (dicts of torch tensors) with a resumable position.

    Iterating again continues from the current position (the state of the last batch
    handed out); `state_dict()` is JSON-able and goes into a checkpoint.
    """

    def __init__(
        self,
        uri: str,
        index: ShardIndex,
        options: StreamOptions,
        start_positions: Sequence[dict[str, Any] | None] | None = None,
    ):
        self.uri = uri
        self.index = index
        self.options = options
        workers = max(1, options.num_workers)
        self.positions: list[dict[str, Any] | None] = list(start_positions or [None] * workers)

    @property
    def lost_windows(self) -> int:
        return sum(int((p or {}).get("lost_windows", 0)) for p in self.positions)

    def state_dict(self) -> dict[str, Any]:
        settings = asdict(self.options)
        return {
            "format": STATE_FORMAT,
            **{key: settings[key] for key in STATE_KEYS},
            "workers": [dict(p) if p else None for p in self.positions],
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        o = self.options
        board = new_board(o.num_workers) if o.num_workers and o.cameras else None
        lent = Lent(board)
        dataset = WindowDataset(self.uri, self.index, o, list(self.positions), board)
        if o.num_workers == 0 and o.prefetch > 0:
            source = in_background(iter(dataset), o.prefetch)
        elif o.num_workers == 0:
            source = iter(dataset)
        else:
            source = iter(
                torch.utils.data.DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=o.num_workers,
                    prefetch_factor=o.prefetch_factor,
                    pin_memory=o.pin_memory,
                    persistent_workers=False,
                    multiprocessing_context=o.multiprocessing_context,
                )
            )
        try:
            for batch, state in source:
                worker = int(state.pop("worker"))
                lent.release()  # frame buffers the consumer is done with go back
                if isinstance(batch, (tuple, list)):
                    lent.add(worker, batch[3], batch[2])
                    batch = unpack_batch(*batch)
                self.positions[worker] = {k: int(v) for k, v in state.items()}
                yield batch
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()  # a background thread stops with its consumer


def stream(
    uri: str,
    batch_size: int,
    condition: str | Sequence[str] | None = None,
    *,
    shuffle_buffer: int = 65536,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    epochs: int | None = None,
    start_state: dict[str, Any] | None = None,
    drop_last: bool = False,
    on_error: str = "raise",
    pin_memory: bool = False,
    multiprocessing_context: str | None = None,
    window: int | None = None,
    prefetch: int = 0,
    cameras: Sequence[str] | None = None,
    frame_stack: int | None = None,
    augment_shift: int = 0,
    decode_threads: int = 0,
    frame_cache_mb: int = 1024,
) -> ShardStream:
    """Batches of windows from the shards at `uri` (see trainers/loader/__init__.py).

    Raises ShardError for a directory without a committed index, KeyError for a condition
    the shards do not hold, ValueError for bad arguments or a `start_state` saved with other
    settings."""
    uri = storage.normalize(uri)
    index = read_index(uri)
    conditions = (condition,) if isinstance(condition, str) else tuple(condition or ())
    missing = [c for c in conditions if c not in index.conditions]
    if missing:
        raise KeyError(
            f"{uri}: the shards hold no condition column(s) {missing}; they hold "
            f"{sorted(index.conditions) or 'none'} (choose them with `hindsight shard --condition`)"
        )
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    if window is not None and not 1 <= window <= index.window:
        raise ValueError(
            f"{uri}: window must be between 1 and the shards' window {index.window}, got {window}"
        )
    cameras = tuple(index.cameras) if cameras is None else tuple(cameras)
    unknown = [camera for camera in cameras if camera not in index.cameras]
    if unknown:
        raise KeyError(
            f"{uri}: the shards hold no frames of camera(s) {unknown}; they hold "
            f"{sorted(index.cameras) or 'none'}"
        )
    frame_stack = index.frame_stack if frame_stack is None else frame_stack
    if (
        not 1 <= frame_stack <= index.frame_stack
        or min(augment_shift, decode_threads, frame_cache_mb) < 0
    ):
        raise ValueError(
            f"{uri}: need 1 <= frame_stack <= the shards' frame stack {index.frame_stack} "
            f"(`hindsight shard --frame-stack`), and augment_shift, decode_threads and "
            f"frame_cache_mb >= 0 (got {frame_stack}, {augment_shift}, {decode_threads}, "
            f"{frame_cache_mb})"
        )
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need batch_size >= 1 and 0 <= rank < world_size (got {batch_size}, {rank}, {world_size})"
        )
    options = StreamOptions(
        batch_size=batch_size,
        conditions=conditions,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        epochs=epochs,
        drop_last=drop_last,
        on_error=on_error,
        pin_memory=pin_memory,
        multiprocessing_context=multiprocessing_context,
        window=window,
        prefetch=prefetch,
        cameras=cameras,
        frame_stack=frame_stack,
        augment_shift=augment_shift,
        decode_threads=decode_threads,
        frame_cache_mb=frame_cache_mb,
    )
    if len(index.shards) < options.consumers:
        warnings.warn(
            f"{uri} has {len(index.shards)} shards for {world_size} ranks x "
            f"{max(1, num_workers)} workers: some consumers get no data; write more shards "
            "(smaller --shard-steps)",
            stacklevel=2,
        )
    start_positions = None
    if start_state is not None:
        settings = asdict(options)
        for key in STATE_KEYS:
            if start_state.get(key) != settings[key]:
                raise ValueError(
                    f"start_state was saved with {key}={start_state.get(key)!r}, this stream has "
                    f"{key}={settings[key]!r}; resume with the same loader settings"
                )
        start_positions = start_state["workers"]
    return ShardStream(uri, index, options, start_positions)
