"""The streaming loader: WebDataset shards (engine/shards.py) -> batches of training windows.

    from trainers.data import read_index, stream
    index = read_index("s3://bucket/shards/pendulum-v3")          # schemas.shard_index.ShardIndex
    loader = stream("s3://bucket/shards/pendulum-v3", batch_size=256, condition="return_to_go",
                    num_workers=2)
    for batch in loader: ...                                      # dict of torch tensors
    state = loader.state_dict()                                   # checkpoint it
    loader = stream(..., start_state=state)                       # resume exactly there

`stream(uri, batch_size, condition=None | "col" | ["col", ...], *, shuffle_buffer=65536,
seed=0, rank=0, world_size=1, num_workers=0, epochs=None (forever), start_state=None,
drop_last=False, on_error="raise" | "skip", pin_memory=False,
multiprocessing_context=None (DataLoader's; "forkserver" where the process has threads that
make fork unsafe))` returns a `ShardStream`; `read_index(uri)`
refuses a directory without a committed index.json.

A batch is a dict of torch tensors (B = batch size, W = window):
    observation  float32 [B, W, obs_dim]          (0 on padding)
    action       float32 [B, W, act_dim] (continuous) or int64 [B, W] (discrete)
    reward       float32 [B, W]
    timestep     int64   [B, W]                    t within the episode
    mask         bool    [B, W]                    False on left padding at episode start
    episode_id   int64   [B]                       the episode each window comes from
    one entry per requested condition column, named as the column:
      scalar      float32 [B, W]       raw (normalize with the index's mean/std)
      vector      float32 [B, W, D]    for k goals per step (hindsight_goal) one of the k is
                                       picked per window, seeded
      categorical int64   [B, W]       index into the index's vocabulary
      text        int64   [B, L]       token ids of the text at the window's last step (0-padded);
                                       for a list of texts one is picked per window, seeded
The last batch of an epoch of each (rank, worker) may be smaller unless drop_last.

The pipeline is a chain of small generator stages, each testable alone:
    epoch_shards (seeded shard order per epoch) -> split by rank and DataLoader worker
    -> open_shard (local file or a retrying boto3 streaming body, no temp copies)
    -> tar expansion (webdataset's tar_file_iterator + group_by_keys) -> checked_members
       (only .npy/.json/.txt, no path outside the shard) -> decode_block (np arrays, never
       unpickled) -> pools (the shuffle buffer: `shuffle_buffer` windows) -> pool_batches (a
       seeded permutation of the pool, windows cut vectorized with left padding and a mask).
Every consumer (rank r, worker w of W) reads the shards at positions r * W + w, (r * W + w) +
R * W, ... of the epoch's shard order, so across R ranks x W workers each window is seen
exactly once per epoch. Use at least R x W shards (fewer leaves some consumers idle).

Resuming: every batch carries its consumer's position (epoch, shard, offset = block within
the shard, window within the block, pool, batch within the pool); pools and their permutations
are deterministic, so `start_state` resumes at exactly the next batch each worker would have
produced. A state is valid for the same seed, world size, workers, batch and buffer sizes.

Errors: a truncated or corrupt shard, or one whose size and sha256 (checked when its last
block has been read) differ from the index's, is a `ShardError` naming the shard; with
on_error="skip" a warning, and `lost_windows` in the state counts what was lost. S3 reads
that drop are retried from the byte where they stopped. Pickle members and names outside the
shard are always refused.
"""

from __future__ import annotations

import ast
import hashlib
import io
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import torch
import webdataset as wds
from webdataset.gopen import gopen_schemes
from webdataset.tariterators import group_by_keys, tar_file_iterator

from engine import storage
from engine.shards import ALLOWED_SUFFIXES, ShardError, split_s3
from schemas.shard_index import INDEX_NAME, ShardIndex, ShardInfo

STATE_FORMAT = 1
STEP_MEMBERS = ("observation", "action", "reward", "timestep")
WINDOW_MEMBERS = ("window_end", "window_start", "episode_id")


class UnsafeShardError(ShardError):
    """A shard member that is never loaded (a pickle, a path outside the shard)."""


__all__ = ["ShardError", "UnsafeShardError", "ShardStream", "read_index", "stream", "open_shard"]


# ---------------------------------------------------------------- index and opening shards


def read_index(uri: str) -> ShardIndex:
    """The committed index of a shard directory; without index.json it is not readable."""
    uri = storage.normalize(uri)
    index_uri = storage.join(uri, INDEX_NAME)
    if not storage.exists(index_uri):
        staging = storage.exists(storage.join(uri, "_staging"))
        reason = (
            "the shard job is still writing it or died before committing"
            if staging
            else "there is no index.json there"
        )
        raise ShardError(f"{uri} holds no committed shards: {reason}")
    try:
        return ShardIndex.from_json(storage.read_bytes(index_uri))
    except ValueError as error:
        raise ShardError(f"{index_uri} is not a valid shard index: {error}") from error


class S3Reader(io.RawIOBase):
    """A boto3 streaming body that survives dropped connections: a failed read reopens the
    object with a Range request from the byte where it stopped (up to `attempts` times)."""

    RETRYABLE: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, OSError)

    def __init__(self, uri: str, attempts: int = 6):
        from botocore.exceptions import BotoCoreError

        from engine.shards import _s3_client

        self.uri = uri
        self.bucket, self.key = split_s3(uri)
        self.client = _s3_client()
        self.attempts = attempts
        self.position = 0
        self.retries = 0
        self.retryable = (*self.RETRYABLE, BotoCoreError)
        self.body = self._open()

    def _open(self):
        kwargs = {"Bucket": self.bucket, "Key": self.key}
        if self.position:
            kwargs["Range"] = f"bytes={self.position}-"
        return self.client.get_object(**kwargs)["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        for attempt in range(self.attempts):
            try:
                data = self.body.read(len(buffer))
                buffer[: len(data)] = data
                self.position += len(data)
                return len(data)
            except self.retryable as error:
                if attempt == self.attempts - 1:
                    raise ShardError(
                        f"reading {self.uri} failed at byte {self.position} after "
                        f"{self.attempts} attempts: {error}"
                    ) from error
                self.retries += 1
                time.sleep(min(0.2 * 2**attempt, 5.0))
                try:
                    self.body.close()
                except Exception:
                    pass
                self.body = self._open()
        return 0

    def close(self) -> None:
        try:
            self.body.close()
        finally:
            super().close()


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 1 << 20, **_: Any):
    if mode != "rb":
        raise ValueError(f"{url}: shards are opened read-only")
    return io.BufferedReader(S3Reader(url), buffer_size=max(bufsize, 1 << 20))


# webdataset has no s3:// opener; ours streams through boto3 (no temp copies).
gopen_schemes["s3"] = _gopen_s3


def open_shard(uri: str):
    """A binary stream of a shard (local file or S3 object), read front to back."""
    if storage.is_s3(uri):
        return wds.gopen(uri, "rb", bufsize=1 << 20)
    return open(uri, "rb", buffering=1 << 20)


# ---------------------------------------------------------------- tar members and blocks


def checked_members(files: Iterator[dict[str, Any]], url: str) -> Iterator[dict[str, Any]]:
    """Refuse anything but .npy/.json/.txt members inside the shard (no pickles, no paths
    that leave the shard), and tag members with their shard for grouping."""
    for member in files:
        name = member["fname"]
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
            raise UnsafeShardError(f"{url}: member {name!r} points outside the shard; refused")
        if not name.endswith(ALLOWED_SUFFIXES):
            raise UnsafeShardError(
                f"{url}: member {name!r} is not .npy/.json/.txt (pickled or unknown data is "
                "never loaded); refused"
            )
        member["__url__"] = url
        yield member


def load_npy(data: bytes, where: str) -> np.ndarray:
    """An .npy member as a read-only array over the member's bytes; object dtypes refused."""
    if data[:6] != b"\x93NUMPY":
        raise ShardError(f"{where} is not an .npy array")
    major = data[6]
    if major == 1:
        header_length = int.from_bytes(data[8:10], "little")
        start = 10
    elif major in (2, 3):
        header_length = int.from_bytes(data[8:12], "little")
        start = 12
    else:
        raise ShardError(f"{where}: unknown .npy version {major}")
    header = ast.literal_eval(data[start : start + header_length].decode("latin1"))
    dtype = np.dtype(header["descr"])
    if dtype.hasobject:
        raise UnsafeShardError(f"{where}: object arrays (pickles) are refused")
    shape = tuple(header["shape"])
    count = math.prod(shape)
    offset = start + header_length
    if len(data) - offset < count * dtype.itemsize:
        raise ShardError(f"{where}: truncated array")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    order = "F" if header["fortran_order"] else "C"
    return array.reshape(shape, order=order)


@dataclass
class Block:
    """One tar sample: consecutive steps and the windows that end in them."""

    steps: dict[str, np.ndarray]  # per step: observation, action, reward, timestep, cond.C
    windows: dict[str, np.ndarray]  # per window: window_end, window_start, episode_id, text index
    texts: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def num_windows(self) -> int:
        return len(self.windows["window_end"])


def decode_block(sample: dict[str, Any], url: str, index: ShardIndex, conditions: Sequence[str]):
    """A grouped tar sample as a Block, checked for consistency."""
    where = f"{url} sample {sample.get('__key__')}"
    arrays: dict[str, np.ndarray] = {}
    needed = [*STEP_MEMBERS, *WINDOW_MEMBERS]
    for name in conditions:
        if index.conditions[name].type == "text":
            needed += [f"cond.{name}.index", f"cond.{name}.tokens", f"cond.{name}.count"]
        else:
            needed.append(f"cond.{name}")
    for name in needed:
        data = sample.get(f"{name}.npy")
        if data is None:
            raise ShardError(f"{where}: member {name}.npy is missing (truncated or foreign shard)")
        arrays[name] = load_npy(data, f"{where} member {name}.npy")
    rows = len(arrays["reward"])
    block = Block(steps={}, windows={})
    for name in [*STEP_MEMBERS, *(f"cond.{c}" for c in conditions)]:
        if name in arrays:
            block.steps[name] = arrays[name]
    for name in WINDOW_MEMBERS:
        block.windows[name] = arrays[name]
    for name in conditions:
        if index.conditions[name].type == "text":
            block.windows[f"cond.{name}.index"] = arrays[f"cond.{name}.index"]
            block.texts[name] = (arrays[f"cond.{name}.tokens"], arrays[f"cond.{name}.count"])
    end, start = block.windows["window_end"], block.windows["window_start"]
    bad_steps = [n for n, a in block.steps.items() if len(a) != rows]
    bad_windows = [n for n, a in block.windows.items() if len(a) != len(end)]
    if (
        bad_steps
        or bad_windows
        or (len(end) and (end.max() >= rows or start.min() < 0))
        or np.any(start > end)
        or np.any(end - start >= index.window)
    ):
        raise ShardError(f"{where}: inconsistent arrays {bad_steps + bad_windows} (corrupt shard)")
    return block


class VerifyingReader(io.RawIOBase):
    """Passes a shard's bytes through, counting and hashing them, so that the end of the
    shard can be checked against the size and sha256 the index recorded."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.size = 0
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self.stream.readinto(buffer)
        self.digest.update(memoryview(buffer)[:count])
        self.size += count
        return count

    def verify(self, url: str, expected: ShardInfo) -> None:
        """Read what the tar reader left (end-of-archive padding), then compare."""
        while self.read(1 << 20):
            pass
        if (self.size, self.digest.hexdigest()) != (expected.bytes, expected.sha256):
            raise ShardError(
                f"{url}: {self.size} bytes with sha256 {self.digest.hexdigest()[:12]}..., but "
                f"the index records {expected.bytes} bytes with sha256 "
                f"{expected.sha256[:12]}...: the shard changed after the shard job wrote it "
                "(its windows were read before this could be known)"
            )


def shard_blocks(
    url: str,
    index: ShardIndex,
    conditions: Sequence[str],
    skip_blocks: int = 0,
    expected: ShardInfo | None = None,
) -> Iterator[Block]:
    """The blocks of one shard in order, from block `skip_blocks` on (earlier ones are read
    but not decoded). With `expected` (the index's entry), the whole shard's size and sha256
    are checked once its last block has been read."""
    with open_shard(url) as raw:
        stream_ = VerifyingReader(raw) if expected else raw
        files = tar_file_iterator(stream_)
        for number, sample in enumerate(group_by_keys(checked_members(files, url))):
            if number >= skip_blocks:
                yield decode_block(sample, url, index, conditions)
        if expected:
            stream_.verify(url, expected)


# ---------------------------------------------------------------- positions and pools


@dataclass(frozen=True)
class Position:
    """Where a consumer is: the next window is window `window` of block `offset` of the
    `shard`-th shard of this consumer's share of epoch `epoch`'s shard order."""

    epoch: int = 0
    shard: int = 0
    offset: int = 0
    window: int = 0
    pool: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def epoch_shards(index: ShardIndex, seed: int, epoch: int, consumer: int, consumers: int):
    """This consumer's shards for `epoch`: a seeded permutation (the same in every
    process) split by rank and worker."""
    order = np.random.default_rng([seed, epoch]).permutation(len(index.shards))
    return [index.shards[i] for i in order[consumer::consumers]]


@dataclass
class Pool:
    """The shuffle buffer: about `shuffle_buffer` windows, as (block, first, stop) pieces."""

    pieces: list[tuple[Block, int, int]]
    start: Position
    end: Position  # where the next pool starts

    @property
    def windows(self) -> int:
        return sum(stop - first for _, first, stop in self.pieces)


class _Counter:
    def __init__(self) -> None:
        self.lost_windows = 0


def pools(
    shard_list,
    root: str,
    index: ShardIndex,
    conditions: Sequence[str],
    start: Position,
    pool_windows: int,
    on_error: str,
    counter: _Counter,
) -> Iterator[Pool]:
    """Pools of `pool_windows` consecutive windows from `start` to the end of the epoch."""
    pieces: list[tuple[Block, int, int]] = []
    count = 0
    pool_start, pool_number = _without_batch(start), start.pool
    for shard_position in range(start.shard, len(shard_list)):
        info = shard_list[shard_position]
        url = storage.join(root, info.name)
        first_block = start.offset if shard_position == start.shard else 0
        seen_blocks, seen_windows = first_block, 0
        try:
            for block_number, block in enumerate(
                shard_blocks(url, index, conditions, first_block, expected=info),
                start=first_block,
            ):
                seen_blocks += 1
                seen_windows += block.num_windows
                lo = (
                    start.window
                    if (shard_position, block_number) == (start.shard, start.offset)
                    else 0
                )
                while lo < block.num_windows:
                    take = min(block.num_windows - lo, pool_windows - count)
                    pieces.append((block, lo, lo + take))
                    count += take
                    lo += take
                    if count == pool_windows:
                        end = Position(
                            start.epoch, shard_position, block_number, lo, pool_number + 1
                        )
                        yield Pool(pieces, pool_start, end)
                        pieces, count = [], 0
                        pool_start, pool_number = end, pool_number + 1
            if seen_blocks != info.blocks:
                raise ShardError(
                    f"{url} ends after {seen_blocks} of {info.blocks} blocks (truncated shard)"
                )
        except Exception as error:
            if isinstance(error, UnsafeShardError):
                raise
            message = f"shard {url} is truncated or corrupt: {error}"
            if on_error != "skip":
                raise ShardError(message) from error
            lost = max(0, info.windows - seen_windows) if first_block == 0 else 0
            counter.lost_windows += lost
            warnings.warn(f"{message}; skipped, {lost} windows lost", stacklevel=2)
    if pieces:
        end = Position(start.epoch, len(shard_list), 0, 0, pool_number + 1)
        yield Pool(pieces, pool_start, end)


# ---------------------------------------------------------------- cutting windows


@dataclass
class PoolArrays:
    """A pool's blocks concatenated: step arrays plus the pool's windows."""

    steps: dict[str, np.ndarray]
    end: np.ndarray
    start: np.ndarray
    episode_id: np.ndarray
    text_index: dict[str, np.ndarray]
    texts: dict[str, tuple[np.ndarray, np.ndarray]]


def pool_arrays(pool: Pool) -> PoolArrays:
    blocks = []
    seen: dict[int, int] = {}
    for block, _, _ in pool.pieces:
        if id(block) not in seen:
            seen[id(block)] = len(blocks)
            blocks.append(block)
    row_offsets = np.cumsum([0] + [len(b.steps["reward"]) for b in blocks])
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
        ends.append(block.windows["window_end"][first:stop] + row_offsets[number])
        starts.append(block.windows["window_start"][first:stop] + row_offsets[number])
        episodes.append(block.windows["episode_id"][first:stop])
        for name in text_index:
            text_index[name].append(
                block.windows[f"cond.{name}.index"][first:stop] + text_offsets[name][number]
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
    )


def cut_windows(
    arrays: PoolArrays,
    selected: np.ndarray,
    window: int,
    index: ShardIndex,
    conditions: Sequence[str],
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """The windows `selected` (pool positions) as batch arrays, left-padded with a mask.

    Every per-step array is one `np.take` of [B * W] rows; padded positions take the pool's
    trailing zero row, so padding is 0 everywhere.
    """
    end = arrays.end[selected]
    start = arrays.start[selected]
    rows = end[:, None] + np.arange(1 - window, 1)[None, :]
    mask = rows >= start[:, None]
    zero_row = len(arrays.steps["reward"]) - 1
    flat = np.where(mask, rows, zero_row).reshape(-1)
    shape = rows.shape

    def gather(values: np.ndarray, positions: np.ndarray = flat) -> np.ndarray:
        taken = np.take(values, positions, axis=0)
        return taken.reshape(*shape, *values.shape[1:])

    batch = {
        "observation": gather(arrays.steps["observation"]),
        "action": gather(arrays.steps["action"]),
        "reward": gather(arrays.steps["reward"]),
        "timestep": gather(arrays.steps["timestep"]).astype(np.int64),
        "mask": mask,
        "episode_id": arrays.episode_id[selected].astype(np.int64),
    }
    if batch["action"].dtype != np.float32:
        batch["action"] = batch["action"].astype(np.int64)
    for name in conditions:
        info = index.conditions[name]
        if info.type == "text":
            rows_of_text = arrays.text_index[name][selected]
            tokens, count = arrays.texts[name]
            pick = np.floor(rng.random(len(selected)) * np.maximum(count[rows_of_text], 1))
            batch[name] = tokens[rows_of_text, pick.astype(np.int64)].astype(np.int64)
            continue
        values = arrays.steps[f"cond.{name}"]
        if info.type == "vector" and info.count:
            # One of the k goals per window: row * k + goal in the [n * k, D] view.
            goal = rng.integers(0, info.count, size=len(selected))
            positions = (flat.reshape(shape) * info.count + goal[:, None]).reshape(-1)
            batch[name] = gather(values.reshape(-1, values.shape[-1]), positions)
        elif info.type == "categorical":
            batch[name] = gather(values).astype(np.int64)
        else:
            batch[name] = gather(values).astype(np.float32, copy=False)
    return batch


# ---------------------------------------------------------------- the dataset and the stream


class WindowDataset(torch.utils.data.IterableDataset):
    """Batches of one consumer (a rank, and a DataLoader worker within it), each with the
    consumer's position after it."""

    def __init__(self, root: str, index: ShardIndex, options: dict[str, Any]):
        super().__init__()
        self.root = root
        self.index = index
        self.options = options

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        o = self.options
        workers = max(1, o["num_workers"])
        consumer = o["rank"] * workers + worker
        starts = o["start_positions"]
        saved = dict(starts[worker]) if starts and starts[worker] else {}
        saved.pop("lost_windows", None)
        position = Position(**saved)
        counter = _Counter()
        counter.lost_windows = int((starts[worker] or {}).get("lost_windows", 0)) if starts else 0
        batch_size, window = o["batch_size"], self.index.window
        pool_windows = max(batch_size, -(-o["shuffle_buffer"] // batch_size) * batch_size)
        conditions = o["conditions"]
        epoch = position.epoch
        while o["epochs"] is None or epoch < o["epochs"]:
            if epoch != position.epoch:
                position = Position(epoch=epoch)
            shard_list = epoch_shards(self.index, o["seed"], epoch, consumer, o["consumers"])
            if not shard_list:
                return  # fewer shards than consumers: this one has none (stream() warned)
            from_start = position == Position(epoch=epoch)
            produced = 0
            for pool in pools(
                shard_list,
                self.root,
                self.index,
                conditions,
                position,
                pool_windows,
                o["on_error"],
                counter,
            ):
                arrays = pool_arrays(pool)
                total = len(arrays.end)
                rng = np.random.default_rng([o["seed"], epoch, consumer, pool.start.pool])
                order = rng.permutation(total)
                batches = -(-total // batch_size)
                if o["drop_last"]:
                    batches = total // batch_size
                first = position.batch if pool.start == _without_batch(position) else 0
                for number in range(first, batches):
                    selected = order[number * batch_size : (number + 1) * batch_size]
                    batch_rng = np.random.default_rng(
                        [o["seed"], epoch, consumer, pool.start.pool, number]
                    )
                    batch = cut_windows(arrays, selected, window, self.index, conditions, batch_rng)
                    after = (
                        Position(**{**pool.start.to_dict(), "batch": number + 1})
                        if number + 1 < batches
                        else pool.end
                    )
                    state = {
                        **after.to_dict(),
                        "worker": worker,
                        "lost_windows": counter.lost_windows,
                    }
                    produced += 1
                    if info is None:
                        yield {k: torch.from_numpy(v) for k, v in batch.items()}, state
                    else:
                        yield pack_batch(batch), state
            if from_start and not produced:
                return  # a whole epoch without a window (every shard skipped): stop, not spin
            epoch += 1


def pack_batch(batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, list[tuple]]:
    """A batch as one uint8 tensor plus its layout: a DataLoader worker hands the main
    process one shared-memory buffer per batch instead of one per array (~10x cheaper)."""
    layout, offset = [], 0
    for name, value in batch.items():
        layout.append((name, value.dtype.str, value.shape, offset))
        offset += -(-value.nbytes // 8) * 8  # 8-byte aligned views
    buffer = np.empty(offset, dtype=np.uint8)
    for (_, _, _, start), value in zip(layout, batch.values()):
        buffer[start : start + value.nbytes] = (
            np.ascontiguousarray(value).reshape(-1).view(np.uint8)
        )
    return torch.from_numpy(buffer), layout


def unpack_batch(buffer: torch.Tensor, layout: list[tuple]) -> dict[str, torch.Tensor]:
    """The tensors of a packed batch, as views of the buffer (no copies)."""
    batch = {}
    for name, dtype, shape, start in layout:
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        torch_dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        batch[name] = buffer[start : start + size].view(torch_dtype).view(tuple(shape))
    return batch


def _without_batch(position: Position) -> Position:
    return Position(**{**position.to_dict(), "batch": 0})


class ShardStream:
    """An iterable of batches (dicts of torch tensors) with a resumable position.

    Iterating again continues from the current position (the state of the last batch
    handed out); `state_dict()` is JSON-able and goes into a checkpoint.
    """

    def __init__(self, uri: str, index: ShardIndex, options: dict[str, Any]):
        self.uri = uri
        self.index = index
        self.options = options
        workers = max(1, options["num_workers"])
        self.positions: list[dict[str, Any] | None] = list(
            options["start_positions"] or [None] * workers
        )

    @property
    def lost_windows(self) -> int:
        return sum(int((p or {}).get("lost_windows", 0)) for p in self.positions)

    def state_dict(self) -> dict[str, Any]:
        o = self.options
        return {
            "format": STATE_FORMAT,
            "seed": o["seed"],
            "rank": o["rank"],
            "world_size": o["world_size"],
            "num_workers": o["num_workers"],
            "batch_size": o["batch_size"],
            "shuffle_buffer": o["shuffle_buffer"],
            "workers": [dict(p) if p else None for p in self.positions],
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        options = {**self.options, "start_positions": list(self.positions)}
        dataset = WindowDataset(self.uri, self.index, options)
        if options["num_workers"] == 0:
            source = iter(dataset)
        else:
            source = iter(
                torch.utils.data.DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=options["num_workers"],
                    prefetch_factor=options.get("prefetch_factor", 4),
                    pin_memory=options.get("pin_memory", False),
                    persistent_workers=False,
                    multiprocessing_context=options.get("multiprocessing_context"),
                )
            )
        for batch, state in source:
            if isinstance(batch, (tuple, list)):
                batch = unpack_batch(*batch)
            worker = int(state.pop("worker"))
            self.positions[worker] = {k: int(v) for k, v in state.items()}
            yield batch


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
) -> ShardStream:
    """Batches of windows from the shards at `uri` (see the module docstring)."""
    uri = storage.normalize(uri)
    index = read_index(uri)
    conditions = [condition] if isinstance(condition, str) else list(condition or [])
    missing = [c for c in conditions if c not in index.conditions]
    if missing:
        raise KeyError(
            f"{uri}: the shards hold no condition column(s) {missing}; they hold "
            f"{sorted(index.conditions) or 'none'} (choose them with `hindsight shard --condition`)"
        )
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need batch_size >= 1 and 0 <= rank < world_size (got {batch_size}, {rank}, {world_size})"
        )
    consumers = world_size * max(1, num_workers)
    if len(index.shards) < consumers:
        warnings.warn(
            f"{uri} has {len(index.shards)} shards for {world_size} ranks x "
            f"{max(1, num_workers)} workers: some consumers get no data; write more shards "
            "(smaller --shard-steps)",
            stacklevel=2,
        )
    options = {
        "batch_size": batch_size,
        "conditions": conditions,
        "shuffle_buffer": shuffle_buffer,
        "seed": seed,
        "rank": rank,
        "world_size": world_size,
        "num_workers": num_workers,
        "consumers": consumers,
        "epochs": epochs,
        "drop_last": drop_last,
        "on_error": on_error,
        "pin_memory": pin_memory,
        "multiprocessing_context": multiprocessing_context,
        "start_positions": None,
    }
    if start_state is not None:
        for key in ("seed", "rank", "world_size", "num_workers", "batch_size", "shuffle_buffer"):
            if start_state.get(key) != options[key]:
                raise ValueError(
                    f"start_state was saved with {key}={start_state.get(key)!r}, this stream has "
                    f"{key}={options[key]!r}; resume with the same loader settings"
                )
        options["start_positions"] = start_state["workers"]
    return ShardStream(uri, index, options)


def read_shard_bytes(uri: str, chunk: int = 1 << 20) -> int:
    """Read a shard front to back and return its size (the raw-read baseline of bench/)."""
    total = 0
    with open_shard(uri) as handle:
        while data := handle.read(chunk):
            total += len(data)
    return total
