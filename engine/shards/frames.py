"""Encoded camera frames on their way into shards: the bytes stored in the dataset's frames
group, carried unchanged (never decoded or re-encoded) from a part into the blocks.

A camera's frames of a set of steps are one `EncodedFrames`: the encoded images
concatenated (`data`, uint8) and where each starts (`offsets`, int64 [n + 1]), the layout of
an Arrow binary column and of the block members `frame_<camera>.bin` +
`frame_<camera>.offsets.npy`. Steps are gathered by ranges (whole episodes, block
segments): one slice per range, never a loop or an index array over bytes; a task's
episodes and shards are views (`FrameRanges`) of its parts' frames, and only a block's
frames are ever copied.

A task whose parts hold more encoded frames than `FRAMES_IN_MEMORY_BYTES` (one huge part of
big frames) does not read them up front: its parts' frames are `StoredFrames`, rows of the
Parquet file not read yet, and each shard reads the rows of its own episodes when it is
built (`load_frames`), only the row groups that hold them (frames are written in ~1 MiB row
groups). The task then holds one shard's frames at a time, never the part's.

A video camera (one video per episode) is the exception: its frames are decoded at shard
time and carried as PNG (`CameraInfo.as_images`): a loader that reads random windows would
otherwise decode from each window's keyframe, over the whole episode file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from engine.dataset import Dataset, holds_frames
from engine.query.read import read_part_rows
from engine.step_frames import video_step_frames
from schemas import steps as cols
from schemas.frames import DEFAULT_PNG_LEVEL, CameraInfo, FrameError, frame_column
from schemas.shard_index import ShardError


@dataclass
class EncodedFrames:
    """n encoded frames: frame i is data[offsets[i]:offsets[i + 1]]."""

    data: np.ndarray  # uint8 [bytes]
    offsets: np.ndarray  # int64 [n + 1], offsets[0] == 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_arrow(cls, column: pa.ChunkedArray | pa.Array, where: str) -> EncodedFrames:
        """A binary column's bytes and offsets, without copying frame by frame."""
        if isinstance(column, pa.ChunkedArray):  # one chunk: no copy
            array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
        else:
            array = column
        if not (pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type)):
            raise ShardError(f"{where}: a frame column must be binary, not {array.type}")
        if array.null_count:
            raise ShardError(
                f"{where}: {array.null_count} steps have no frame (first at row "
                f"{int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])})"
            )
        width = np.int64 if pa.types.is_large_binary(array.type) else np.int32
        _, offsets_buffer, data_buffer = array.buffers()
        offsets = np.frombuffer(offsets_buffer, dtype=width)[
            array.offset : array.offset + len(array) + 1
        ].astype(np.int64)
        data = (
            np.frombuffer(data_buffer, dtype=np.uint8)
            if data_buffer is not None
            else np.zeros(0, np.uint8)
        )
        return cls(data[offsets[0] : offsets[-1]], offsets - offsets[0])

    def take_ranges(self, starts: np.ndarray, counts: np.ndarray) -> EncodedFrames:
        """The frames of row ranges [start, start + count), one after another (copied)."""
        return gather_ranges([self], np.zeros(len(counts), np.int64), starts, counts)

    def select(self, starts: np.ndarray, counts: np.ndarray) -> FrameRanges:
        """The frames of row ranges, not copied yet (see FrameRanges)."""
        return FrameRanges([self], np.zeros(len(counts), np.int64), starts, counts)


# Above this many bytes of encoded frames (the frames files of a task's parts), a shard
# task reads each shard's frames when it builds it instead of its parts' frames up front.
FRAMES_IN_MEMORY_BYTES = 256 * 2**20
# A shard holds about this many bytes of encoded frames at most (`plan_tasks` deals a task
# into more shards than `--shard-steps` asks if needed): what a task holds at a time.
MAX_SHARD_FRAME_BYTES = 128 * 2**20


@dataclass
class StoredFrames:
    """One camera's frames of a dataset part, left in its Parquet file: `take_ranges` reads
    the rows asked for (the row groups that hold them), nothing is held."""

    dataset: Dataset
    index: int
    camera: str
    rows: int
    kept: np.ndarray | None = None  # its row i is part row kept[i] (steps left out: none)

    def __len__(self) -> int:
        return self.rows if self.kept is None else len(self.kept)

    def keep(self, mask: np.ndarray) -> StoredFrames:
        """Only the rows where `mask` is True (the steps a shard filter keeps)."""
        return replace(self, kept=np.flatnonzero(mask).astype(np.int64))

    def take_ranges(self, starts: np.ndarray, counts: np.ndarray) -> EncodedFrames:
        """The frames of row ranges, one after another: the distinct rows read in one read
        (only their row groups), then copied range by range into the ranges' order."""
        from engine.shards.episodes import expand_ranges

        wanted = expand_ranges(starts, counts)
        if self.kept is not None:
            wanted = self.kept[wanted]
        distinct = np.unique(wanted)
        column = frame_column(self.camera)
        where = f"{self.dataset.uri} part {self.index} column {column!r}"
        table = read_part_rows(self.dataset, self.index, "steps", [column], distinct)
        read = EncodedFrames.from_arrow(table.column(column), where)
        del table
        if np.array_equal(distinct, wanted):
            return read
        # A range's rows are consecutive among the distinct rows read (kept rows too).
        heads = np.minimum(np.cumsum(counts) - counts, len(wanted) - 1)  # empty ranges: any
        firsts = np.searchsorted(distinct, wanted[heads])
        return read.take_ranges(firsts, np.asarray(counts, np.int64))

    def select(self, starts: np.ndarray, counts: np.ndarray) -> FrameRanges:
        return FrameRanges([self], np.zeros(len(counts), np.int64), starts, counts)


def gather_ranges(
    sources: Sequence[EncodedFrames | StoredFrames],
    which: np.ndarray,
    starts: np.ndarray,
    counts: np.ndarray,
) -> EncodedFrames:
    """Rows [start, start + count) of `sources[which]` for every range, one after another,
    copied into one buffer: one slice of bytes and of offsets per range (an episode or a
    block segment), never a loop over frames. Ranges of `StoredFrames` are read first, one
    read per source."""
    which, starts, counts = (np.asarray(v, dtype=np.int64) for v in (which, starts, counts))
    if len(sources) == 1 and isinstance(sources[0], StoredFrames):  # one read, in order
        return sources[0].take_ranges(starts, counts)
    if any(isinstance(source, StoredFrames) for source in sources):
        loaded: list[EncodedFrames | StoredFrames] = list(sources)
        starts = starts.copy()
        for number, source in enumerate(sources):
            mine = which == number
            if isinstance(source, StoredFrames) and mine.any():
                loaded[number] = source.take_ranges(starts[mine], counts[mine])
                starts[mine] = np.cumsum(counts[mine]) - counts[mine]  # where each landed
        sources = loaded
    sizes, pieces = [np.zeros(1, np.int64)], []
    for source, start, count in zip(
        np.asarray(which).tolist(), np.asarray(starts).tolist(), np.asarray(counts).tolist()
    ):
        offsets = sources[source].offsets[start : start + count + 1]
        pieces.append(sources[source].data[offsets[0] : offsets[-1]])
        sizes.append(np.diff(offsets))
    data = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
    return EncodedFrames(data, np.cumsum(np.concatenate(sizes)).astype(np.int64))


@dataclass
class FrameRanges:
    """Row ranges of encoded frames in `sources` (the parts of a write task), one after
    another, not copied: a shard's episodes hold their frames this way and each block
    copies only its own, so the encoded bytes are copied once between the dataset part and
    the tar. Ranges asked of it must each lie within one of its ranges (a block segment
    within an episode, an episode within a part)."""

    sources: Sequence[EncodedFrames | StoredFrames]
    which: np.ndarray  # int64 per range: its source
    starts: np.ndarray  # int64 per range: the source row of its first row
    counts: np.ndarray  # int64 per range: its rows

    def __post_init__(self) -> None:
        self.which, self.starts, self.counts = (
            np.asarray(values, dtype=np.int64) for values in (self.which, self.starts, self.counts)
        )

    def __len__(self) -> int:
        return int(self.counts.sum())

    def _locate(self, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Source and source row of rows of this view."""
        ends = np.cumsum(self.counts)
        ranges = np.searchsorted(ends, np.asarray(starts, np.int64), side="right")
        return self.which[ranges], self.starts[ranges] + starts - (ends - self.counts)[ranges]

    def select(self, starts: np.ndarray, counts: np.ndarray) -> FrameRanges:
        return FrameRanges(self.sources, *self._locate(starts), counts)

    def take_ranges(self, starts: np.ndarray, counts: np.ndarray) -> EncodedFrames:
        return gather_ranges(self.sources, *self._locate(starts), counts)

    def load(self) -> EncodedFrames:
        """All of its frames, copied into one buffer (read, for `StoredFrames`)."""
        return gather_ranges(self.sources, self.which, self.starts, self.counts)


def load_frames(frames: Mapping[str, EncodedFrames | FrameRanges]) -> dict:
    """A shard's frames in memory, per camera: views of stored frames are read now (once
    per shard, only their rows); frames in memory stay views."""
    return {
        camera: data.load()
        if isinstance(data, FrameRanges) and any(isinstance(s, StoredFrames) for s in data.sources)
        else data
        for camera, data in frames.items()
    }


def concat_frames(chunks: Sequence[EncodedFrames | StoredFrames | FrameRanges]) -> FrameRanges:
    """Frames of several parts, one after another, not copied (views are flattened)."""
    sources: list[EncodedFrames | StoredFrames] = []
    which, starts, counts = [], [], []
    for chunk in chunks:
        if isinstance(chunk, FrameRanges):
            which.append(chunk.which + len(sources))
            starts.append(chunk.starts)
            counts.append(chunk.counts)
            sources.extend(chunk.sources)
        else:
            which.append([len(sources)])
            starts.append([0])
            counts.append([len(chunk)])
            sources.append(chunk)
    return FrameRanges(sources, *(np.concatenate(v) if v else v for v in (which, starts, counts)))


def dataset_cameras(dataset: Dataset) -> dict[str, CameraInfo]:
    """Every camera of a dataset version (its frames group, own or inherited)."""
    cameras: dict[str, CameraInfo] = {}
    for group in dataset.manifest.groups:
        cameras.update(group.cameras)
    return cameras


def resolve_cameras(dataset: Dataset, names: Sequence[str] | None) -> dict[str, CameraInfo]:
    """The cameras to shard: `names` (None: all the dataset's cameras), in that order.

    Raises KeyError naming the dataset's cameras for an unknown one."""
    available = dataset_cameras(dataset)
    if names is None:
        return available
    unknown = [name for name in names if name not in available]
    if unknown:
        raise KeyError(
            f"{dataset.uri}: no camera(s) {unknown}; the dataset has "
            f"{', '.join(available) or 'no frames group'}"
        )
    return {name: available[name] for name in names}


def transcode_part_videos(dataset: Dataset, index: int, camera: str) -> EncodedFrames:
    """A video camera's frames of part `index`, decoded and encoded as
    `CameraInfo.as_images`: one PNG per step, as relabelers read them
    (engine/step_frames.py), at PNG's default level (shards are kept). A video whose frame
    count is not its episode's steps, or that does not decode, is a ShardError naming the
    file, episode and camera (and step)."""
    steps = dataset.read_part(index, "steps", [cols.EPISODE_ID, cols.T])
    try:
        encoded = video_step_frames(dataset, index, camera, steps, png_level=DEFAULT_PNG_LEVEL)
    except FrameError as error:
        raise ShardError(str(error)) from None
    uri = dataset.file_uris(dataset.group_of(frame_column(camera), "episodes"), "episodes")[index]
    return EncodedFrames.from_arrow(encoded, uri)


def stored_frame_bytes(dataset: Dataset, parts: Sequence[int]) -> int:
    """Bytes of the image frames files of `parts` (from the manifest: nothing is read)."""
    return sum(
        group.steps_files[index].bytes
        for group in dataset.manifest.groups
        if holds_frames(group) and group.steps_files
        for index in parts
    )


def read_part_frames(
    dataset: Dataset, index: int, cameras: Sequence[str], steps: int, stream: bool = False
) -> dict[str, EncodedFrames | StoredFrames]:
    """Part `index`'s encoded frames per camera (only the frames group's file is read),
    checked to hold one frame per step of the base part; a video camera's as PNG
    (`transcode_part_videos`). With `stream`, an image camera's frames are not read yet:
    `StoredFrames` that read their rows when a shard asks for them."""
    if not cameras:
        return {}
    infos = dataset.cameras
    images = [camera for camera in cameras if not infos[camera].is_video]
    frames: dict[str, EncodedFrames | StoredFrames] = {}
    if stream:
        for group in dataset.manifest.groups:
            names = {f.name for f in group.steps_columns}
            if names & {frame_column(c) for c in images} and group.steps_files[index].rows != steps:
                raise ShardError(
                    f"{dataset.uri} part {index} group {group.name!r}: "
                    f"{group.steps_files[index].rows} frames for {steps} steps"
                )
        frames = {camera: StoredFrames(dataset, index, camera, steps) for camera in images}
        images = []  # read by each shard, not now
    table = (
        dataset.read_part(index, "steps", [frame_column(camera) for camera in images])
        if images
        else None
    )
    for camera in cameras:
        if camera in frames:  # stored, read by each shard
            continue
        where = f"{dataset.uri} part {index} column {frame_column(camera)!r}"
        if infos[camera].is_video:
            encoded = transcode_part_videos(dataset, index, camera)
        else:
            assert table is not None
            encoded = EncodedFrames.from_arrow(table.column(frame_column(camera)), where)
        if len(encoded) != steps:
            raise ShardError(f"{where}: {len(encoded)} frames for {steps} steps")
        frames[camera] = encoded
    return frames


def frame_members(
    frames: Mapping[str, EncodedFrames | FrameRanges], starts: np.ndarray, counts: np.ndarray
) -> dict[str, EncodedFrames]:
    """Per camera, the frames of one block's rows (its segments' row ranges)."""
    return {camera: encoded.take_ranges(starts, counts) for camera, encoded in frames.items()}
