"""Encoded camera frames on their way into shards: the bytes stored in the dataset's frames
group, carried unchanged (never decoded or re-encoded) from a part into the blocks.

A camera's frames of a set of steps are one `EncodedFrames`: the encoded images
concatenated (`data`, uint8) and where each starts (`offsets`, int64 [n + 1]), the layout of
an Arrow binary column and of the block members `frame_<camera>.bin` +
`frame_<camera>.offsets.npy`. Steps are gathered by ranges (whole episodes, block
segments): one slice per range, never a loop or an index array over bytes; a task's
episodes and shards are views (`FrameRanges`) of its parts' frames, and only a block's
frames are ever copied.

A video camera (one video per episode) is the exception: its frames are decoded at shard
time and carried as PNG (`shard_camera`): a loader that reads random windows would
otherwise decode from each window's keyframe, over the whole episode file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from engine.dataset import Dataset
from schemas import steps as cols
from schemas.frames import CameraInfo, FrameError, encode_frames, frame_column
from schemas.shard_index import ShardError
from schemas.video import decode_video


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
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
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


def gather_ranges(
    sources: Sequence[EncodedFrames], which: np.ndarray, starts: np.ndarray, counts: np.ndarray
) -> EncodedFrames:
    """Rows [start, start + count) of `sources[which]` for every range, one after another,
    copied into one buffer: one slice of bytes and of offsets per range (an episode or a
    block segment), never a loop over frames."""
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

    sources: Sequence[EncodedFrames]
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


def concat_frames(chunks: Sequence[EncodedFrames]) -> FrameRanges:
    """Frames of several parts, one after another, not copied."""
    counts = [len(chunk) for chunk in chunks]
    return FrameRanges(list(chunks), np.arange(len(chunks)), np.zeros(len(chunks)), counts)


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


def shard_camera(camera: CameraInfo) -> CameraInfo:
    """The camera as shards store it: itself for an image codec; a video camera's frames
    are decoded at shard time and stored as PNG (lossless: the video's own pixels), so
    that the loader decodes any window alone at PNG's speed (docs/frames.md, "Video")."""
    if not camera.is_video:
        return camera
    return CameraInfo(
        height=camera.height, width=camera.width, channels=camera.channels, codec="png"
    )


def transcode_part_videos(
    dataset: Dataset, index: int, camera: str, info: CameraInfo
) -> EncodedFrames:
    """A video camera's frames of part `index` (one video per episode, episodes in the
    part's order), decoded and encoded as its `shard_camera`: one PNG per step. A video
    whose frame count is not its episode's steps, or that does not decode, is a ShardError
    naming the file, episode and camera (and step)."""
    column = frame_column(camera)
    group = dataset.group_of(column, "episodes")
    uri = dataset.file_uris(group, "episodes")[index]
    table = dataset.read_part(index, "episodes", [cols.EPISODE_ID, cols.LENGTH, column])
    png = shard_camera(info)
    encoded: list[bytes] = []
    for episode_id, length, video in zip(
        table.column(cols.EPISODE_ID).to_pylist(),
        table.column(cols.LENGTH).to_pylist(),
        table.column(column).to_pylist(),
    ):
        where = f"{uri}: episode {episode_id} camera {camera!r}"
        if video is None:
            raise ShardError(f"{where}: no video")
        try:
            encoded += encode_frames(decode_video(video, info, where, length), png)
        except FrameError as error:
            raise ShardError(str(error)) from None
    return EncodedFrames.from_arrow(pa.array(encoded, pa.binary()), uri)


def read_part_frames(
    dataset: Dataset, index: int, cameras: Sequence[str], steps: int
) -> dict[str, EncodedFrames]:
    """Part `index`'s encoded frames per camera (only the frames group's file is read),
    checked to hold one frame per step of the base part; a video camera's as PNG
    (`transcode_part_videos`)."""
    if not cameras:
        return {}
    infos = dataset.cameras
    images = [camera for camera in cameras if not infos[camera].is_video]
    table = (
        dataset.read_part(index, "steps", [frame_column(camera) for camera in images])
        if images
        else None
    )
    frames = {}
    for camera in cameras:
        where = f"{dataset.uri} part {index} column {frame_column(camera)!r}"
        if infos[camera].is_video:
            encoded = transcode_part_videos(dataset, index, camera, infos[camera])
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
