"""Camera frames in the loader: the encoded frames of a pool's blocks -> the decoded,
stacked (and optionally shifted) uint8 frames of one batch's windows.

For a batch of B windows of W steps and a frame stack of k, camera `c` gives
`frame_<c>`: uint8 [B, W, C * k, H, W] (channels first; the k frames oldest first, each C
channels). Only the frames the batch needs are decoded, each once: the windows' steps and
the k - 1 steps before each (`stack_rows`); before an episode's first step its first frame
repeats, and left-padded window positions are zeros. Decoding is PIL through
`schemas.frames.decode_frame`, checked against the camera; a plain PNG (8 bits, RGB or grey
as the camera, not interlaced: what collect and ingest write) goes straight to PIL's PNG
decoder (`decode_plain_png`: the same pixels, a third less CPU per small frame). PIL
releases the GIL while it decodes, so a `FrameDecoder` with threads decodes a batch's frames
in parallel (and DataLoader workers each run their own). A `FrameCache` per camera keeps
decoded frames by block for later batches and epochs: windows overlap (each step ends one,
and a window needs W + k - 1 frames) and every epoch shows the same frames, so without it a
frame would be decoded once per window that shows it, every epoch.
"""

from __future__ import annotations

import struct
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from schemas.frames import CameraInfo, FrameError, decode_frame, frame_column


@dataclass
class PoolFrames:
    """One camera's encoded frames of a pool's blocks: pool row r is row
    r - first_rows[b] of block b = searchsorted(first_rows, r, "right") - 1."""

    camera: CameraInfo
    data: list[bytes]  # per block: the `.bin` member
    offsets: list[np.ndarray]  # per block: int64 [rows + 1]
    where: list[str]  # per block: "shard URL sample KEY"
    first_rows: np.ndarray  # int64 [blocks]: the pool row of each block's first row

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Block and row within it of pool rows."""
        block = np.searchsorted(self.first_rows, rows, side="right") - 1
        return block, rows - self.first_rows[block]


def stack_rows(rows: np.ndarray, mask: np.ndarray, timestep: np.ndarray, k: int) -> np.ndarray:
    """Pool rows of the k stacked frames of every window position, oldest first: int64
    [B, W, k], the row `lag` steps back clamped to the episode's first step (whose frame
    repeats), -1 at padded positions. `rows`/`mask` [B, W]; `timestep` per pool row."""
    safe = np.where(mask, rows, 0)
    t = timestep[safe].astype(np.int64)
    lags = np.arange(k - 1, -1, -1, dtype=np.int64)  # k - 1, ..., 0: oldest first
    stacked = safe[..., None] - np.minimum(lags, t[..., None])
    return np.where(mask[..., None], stacked, -1)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOR_TYPE = {3: 2, 1: 0}  # camera channels -> PNG colour type: 8-bit RGB, 8-bit grey
PNG_MODE = {3: "RGB", 1: "L"}


def decode_plain_png(data: bytes, camera: CameraInfo) -> np.ndarray | None:
    """A plain PNG frame of the camera's size (8 bits, the camera's RGB or grey, not
    interlaced, no palette) as H x W x C uint8, or None for any other data, or data that
    does not decode: `decode_frame` then decodes it or names the error.

    Its IDAT chunks go to PIL's own PNG decoder ("zip": inflate and unfilter, the same C
    code `Image.open` runs, so the same pixels) without `Image.open`'s Python around it
    (plugin probing, chunk streams, the ImageFile machinery): for 64x64 frames that is
    about a third of the decode's CPU (docs/shards.md, training from pixels)."""
    if len(data) < 45 or data[:8] != PNG_SIGNATURE:
        return None
    length, kind, width, height, depth, color, compression, filtering, interlace = (
        struct.unpack_from(">I4sIIBBBBB", data, 8)
    )
    if (
        kind != b"IHDR"
        or length != 13
        or zlib.crc32(data[12:29]) != struct.unpack_from(">I", data, 29)[0]
        or (height, width) != (camera.height, camera.width)
        or (depth, compression, filtering, interlace) != (8, 0, 0, 0)
        or color != PNG_COLOR_TYPE.get(camera.channels)
    ):
        return None
    view, chunks, position = memoryview(data), [], 33
    while True:
        if position + 12 > len(data):
            return None  # no IEND: truncated
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind == b"IDAT":
            chunks.append(view[position + 8 : position + 8 + length])
        elif kind == b"IEND" or chunks:
            break  # image data ends at the first chunk after it: PIL reads no further
        elif not kind[0] & 0x20:
            return None  # a critical chunk other than these (PLTE): Image.open knows it
        position += 12 + length
    mode = PNG_MODE[camera.channels]
    try:
        image = Image.frombytes(mode, (width, height), b"".join(chunks), "zip", mode, 0)
    except (ValueError, OSError):
        return None
    return np.asarray(image).reshape(camera.shape)


Decode = Callable[..., tuple[np.ndarray, list[str]]]  # FrameDecoder.decode


def by_block(block: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """Each block number in `block` with the positions that hold it: one sort, not a pass
    over `block` per block (a shuffled batch touches dozens)."""
    order = np.argsort(block, kind="stable")
    ordered = block[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(block) else []
    for start, stop in zip(starts, [*starts[1:], len(order)]):
        yield int(ordered[start]), order[start:stop]


@dataclass
class CachedBlock:
    """A block's decoded frames (rows x C x H x W; only those in `done` are filled)."""

    frames: np.ndarray
    done: np.ndarray  # bool [rows]


class FrameCache:
    """One camera's decoded frames, kept by block across batches, pools and epochs.

    Why: single steps with a stack of 3 need ~2.9 distinct frames per sample, windows of W
    steps W + 2, and every epoch shows the same frames again; a frame decoded once and
    kept is what keeps PNG decoding from bounding an MLP on a few cores (docs/shards.md).

    A block (trainers.loader.shards.Block, named by its `where`: shard URL and sample key)
    gets an array of its decoded frames the first time one of them is asked for, filled
    as its frames are decoded. Blocks past `budget` bytes are dropped least recently used
    first; a block larger than the budget is not kept. The budget charges whole blocks
    (what is allocated), so memory stays within it. In one consumer (no DataLoader
    workers: how `hindsight train` reads), a dataset whose frames fit decodes each frame
    once in the whole run, a larger one a frame about once per pass over its block. With
    DataLoader workers each holds its share of the budget and gets other shards each epoch
    (`epoch_shards`), so it keeps what it read before only for the shards it gets again.
    Frames that did not decode are never kept: they fail again, with the same message.
    Cached or not, a batch holds the same bytes."""

    def __init__(self, camera: CameraInfo, budget: int):
        height, width, channels = camera.shape
        self.shape = (channels, height, width)
        self.frame_bytes = height * width * channels
        self.budget = budget
        self.used = 0
        self.blocks: OrderedDict[str, CachedBlock] = OrderedDict()  # least recent first
        self.decoded = 0  # frames decoded through the cache (misses), for tests and benches
        self.reused = 0  # frames served from it

    def frames_at(
        self, frames: PoolFrames, rows: np.ndarray, decode: Decode, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[str]]:
        """As `FrameDecoder.decode` (into `out` if given), decoding only the frames not kept."""
        block, local = frames.locate(rows)
        out = np.empty((len(rows), *self.shape), dtype=np.uint8) if out is None else out
        hit = np.zeros(len(rows), dtype=bool)
        for b, mine in by_block(block):
            kept = self.blocks.get(frames.where[b])
            if kept is not None:
                self.blocks.move_to_end(frames.where[b])
                found = mine[kept.done[local[mine]]]
                out[found] = kept.frames[local[found]]
                hit[found] = True
        miss = np.flatnonzero(~hit)
        self.reused += len(rows) - len(miss)
        self.decoded += len(miss)
        errors = [""] * len(rows)
        if not len(miss):
            return out, errors
        if len(miss) == len(rows):  # nothing kept (a first epoch): decode in place
            decoded, missed_errors = decode(frames, rows, out)
        else:
            decoded, missed_errors = decode(frames, rows[miss])
            out[miss] = decoded
        good = np.ones(len(miss), dtype=bool)  # by position in `miss` (and in `decoded`)
        if any(missed_errors):
            for i, error in enumerate(missed_errors):
                errors[int(miss[i])] = error
                good[i] = not error
        good = np.flatnonzero(good)
        for b, mine in by_block(block[miss[good]]):
            kept = self.keep(frames.where[b], len(frames.offsets[b]) - 1)
            if kept is not None:
                at = local[miss[good[mine]]]
                kept.frames[at] = decoded[good[mine]]
                kept.done[at] = True
        return out, errors

    def keep(self, where: str, rows: int) -> CachedBlock | None:
        """The block's entry, made (dropping the least recently used past the budget) if
        it has none; None for a block larger than the whole budget."""
        kept = self.blocks.get(where)
        if kept is not None:
            return kept
        size = rows * self.frame_bytes
        if size > self.budget:
            return None
        while self.used + size > self.budget:
            _, dropped = self.blocks.popitem(last=False)
            self.used -= dropped.frames.nbytes
        kept = CachedBlock(np.empty((rows, *self.shape), np.uint8), np.zeros(rows, bool))
        self.blocks[where] = kept
        self.used += size
        return kept


class FrameDecoder:
    """Decodes a pool's frames at given rows, in `threads` threads (0: this thread), keeping
    up to `cache_bytes` of decoded frames (`FrameCache` per camera of `cameras`; 0: none)."""

    def __init__(
        self,
        threads: int = 0,
        cache_bytes: int = 0,
        cameras: Mapping[str, CameraInfo] | None = None,
    ):
        self.threads = threads
        self.executor = ThreadPoolExecutor(threads, "hindsight-frames") if threads > 0 else None
        # The budget split among the cameras by frame size: the same steps of each fit.
        cameras = dict(cameras or {})
        step_bytes = sum(info.height * info.width * info.channels for info in cameras.values())
        self.caches = {
            name: FrameCache(info, cache_bytes * info.height * info.width * info.channels // step_bytes)
            for name, info in cameras.items()
        } if cache_bytes > 0 else {}  # fmt: skip

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None

    def frames_at(
        self, camera: str, frames: PoolFrames, rows: np.ndarray, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[str]]:
        """`decode` of the camera's frames at distinct pool `rows`, through its cache."""
        cache = self.caches.get(camera)
        if cache is None:
            return self.decode(frames, rows, out)
        return cache.frames_at(frames, rows, self.decode, out)

    def decode(
        self, frames: PoolFrames, rows: np.ndarray, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[str]]:
        """The frames at pool `rows`, channels first (N x C x H x W uint8: the transpose
        rides on the copy out of PIL's buffer; into `out` if given), and by position the
        FrameError message of each that did not decode ("" for those that did; a failed
        frame is 0)."""
        camera = frames.camera
        height, width, channels = camera.shape
        if out is None:
            out = np.empty((len(rows), channels, height, width), dtype=np.uint8)
        block, local = frames.locate(rows)
        errors: list[str] = [""] * len(rows)
        plain_png = camera.codec == "png"

        def run(span: range) -> None:
            for i in span:
                b, r = int(block[i]), int(local[i])
                data = frames.data[b][frames.offsets[b][r] : frames.offsets[b][r + 1]]
                decoded = decode_plain_png(data, camera) if plain_png else None
                if decoded is None:
                    try:
                        decoded = decode_frame(data, camera, f"{frames.where[b]} row {r}")
                    except FrameError as error:
                        errors[i] = str(error)
                        out[i] = 0
                        continue
                out[i] = decoded.transpose(2, 0, 1)

        if self.executor is None or len(rows) < 2 * self.threads:
            run(range(len(rows)))
        else:
            bounds = np.linspace(0, len(rows), self.threads + 1).astype(int)
            spans = [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
            list(self.executor.map(run, spans))
        return out, errors


Allocate = Callable[[tuple[int, ...]], np.ndarray]  # uint8 of that shape: the batch's frames


def window_frames(
    frames: dict[str, PoolFrames],
    rows: np.ndarray,
    mask: np.ndarray,
    timestep: np.ndarray,
    k: int,
    decoder: FrameDecoder,
    allocate: Allocate | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """Per camera `frame_<camera>` uint8 [B, W, C * k, H, W] of the windows at pool `rows`
    [B, W] (`mask` False on padding), plus which windows hold a frame that did not decode
    (bool [B]) and the first such error per camera. The frames are gathered straight into
    `allocate(shape)` (a DataLoader worker's shared memory: no copy to hand them over)."""
    allocate = allocate or _empty
    stacked = stack_rows(rows, mask, timestep, k)
    needed, inverse = np.unique(stacked[stacked >= 0], return_inverse=True)
    positions = np.full(stacked.shape, len(needed), dtype=np.int64)  # padding: a zero frame
    positions[stacked >= 0] = inverse.reshape(-1)
    batch, messages = {}, []
    bad = np.zeros(len(rows), dtype=bool)
    for camera, pool_frames in frames.items():
        height, width, channels = pool_frames.camera.shape
        # The needed frames, then one zero frame that padded positions gather.
        with_zero = np.empty((len(needed) + 1, channels, height, width), np.uint8)
        with_zero[-1] = 0
        _, errors = decoder.frames_at(camera, pool_frames, needed, with_zero[:-1])
        # One gather: [B, W, k, C, H, W], i.e. [B, W, k * C, H, W] without another copy
        # (mode "clip": the positions are valid, and "raise" would buffer the output).
        taken = allocate((*rows.shape, k * channels, height, width))
        np.take(
            with_zero,
            positions,
            axis=0,
            out=taken.reshape(*positions.shape, *with_zero.shape[1:]),
            mode="clip",
        )
        batch[frame_column(camera)] = taken
        if any(errors):
            failed = np.flatnonzero([bool(e) for e in errors])
            messages.append(errors[int(failed[0])])
            failed_mask = np.zeros(len(needed) + 1, dtype=bool)
            failed_mask[failed] = True
            bad |= failed_mask[positions].reshape(len(rows), -1).any(axis=1)
    return batch, bad, messages


def random_shift(
    frames: np.ndarray, shift: int, rng: np.random.Generator, allocate: Allocate | None = None
) -> np.ndarray:
    """DrQ's random shift: every window's frames [W, C * k, H, W] padded by `shift` pixels
    (replicating the border) and cropped back at a random offset, the same for all of the
    window's steps and stacked frames. Seeded by `rng`."""
    if shift <= 0:
        return frames
    count, height, width = frames.shape[0], frames.shape[-2], frames.shape[-1]
    dy, dx = (rng.integers(0, 2 * shift + 1, size=(2, count)) - shift).tolist()
    out = (allocate or _empty)(frames.shape)
    for i in range(count):  # a slice copy per window, not per step or pixel
        ys = np.clip(np.arange(height) + dy[i], 0, height - 1)
        xs = np.clip(np.arange(width) + dx[i], 0, width - 1)
        out[i] = frames[i][..., ys[:, None], xs[None, :]]
    return out


def _empty(shape: tuple[int, ...]) -> np.ndarray:
    return np.empty(shape, dtype=np.uint8)


def pool_frames(
    blocks: Sequence, first_rows: np.ndarray, cameras: dict[str, CameraInfo]
) -> dict[str, PoolFrames]:
    """The encoded frames of a pool's blocks (trainers.loader.shards.Block), per camera."""
    return {
        camera: PoolFrames(
            camera=info,
            data=[block.frames[camera][0] for block in blocks],
            offsets=[block.frames[camera][1] for block in blocks],
            where=[block.where for block in blocks],
            first_rows=np.asarray(first_rows, dtype=np.int64),
        )
        for camera, info in cameras.items()
    }
