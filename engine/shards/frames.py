"""Encoded camera frames on their way into shards: the bytes stored in the dataset's frames
group, carried unchanged (never decoded or re-encoded) from a part into the blocks.

A camera's frames of a set of steps are one `EncodedFrames`: the encoded images
concatenated (`data`, uint8) and where each starts (`offsets`, int64 [n + 1]), the layout of
an Arrow binary column and of the block members `frame_<camera>.bin` +
`frame_<camera>.offsets.npy`. Steps are gathered by ranges (whole episodes, block
segments): one slice per range, never a loop or an index array over bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from engine.dataset import Dataset
from schemas.frames import CameraInfo, frame_column
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
        """The frames of row ranges [start, start + count), one after another."""
        starts = np.asarray(starts, dtype=np.int64)
        counts = np.asarray(counts, dtype=np.int64)
        total = int(counts.sum())
        if total == 0:
            return EncodedFrames(np.zeros(0, np.uint8), np.zeros(1, np.int64))
        first, stop = self.offsets[starts], self.offsets[starts + counts]
        data = np.concatenate([self.data[a:b] for a, b in zip(first.tolist(), stop.tolist())])
        # The rows of the ranges (episodes.expand_ranges, which imports this module) and
        # their sizes give the new offsets.
        rows = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(total)
        offsets = np.concatenate([[0], np.cumsum(np.diff(self.offsets)[rows])]).astype(np.int64)
        return EncodedFrames(data, offsets)


def concat_frames(chunks: Sequence[EncodedFrames]) -> EncodedFrames:
    """Frames of several parts, one after another."""
    if len(chunks) == 1:
        return chunks[0]
    shifts = np.cumsum([0] + [len(chunk.data) for chunk in chunks[:-1]])
    offsets = np.concatenate(
        [[0]] + [chunk.offsets[1:] + shift for chunk, shift in zip(chunks, shifts)]
    ).astype(np.int64)
    return EncodedFrames(np.concatenate([chunk.data for chunk in chunks]), offsets)


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


def read_part_frames(
    dataset: Dataset, index: int, cameras: Sequence[str], steps: int
) -> dict[str, EncodedFrames]:
    """Part `index`'s encoded frames per camera (only the frames group's file is read),
    checked to hold one frame per step of the base part."""
    if not cameras:
        return {}
    table = dataset.read_part(index, "steps", [frame_column(camera) for camera in cameras])
    frames = {}
    for camera in cameras:
        where = f"{dataset.uri} part {index} column {frame_column(camera)!r}"
        encoded = EncodedFrames.from_arrow(table.column(frame_column(camera)), where)
        if len(encoded) != steps:
            raise ShardError(f"{where}: {len(encoded)} frames for {steps} steps")
        frames[camera] = encoded
    return frames


def frame_members(
    frames: Mapping[str, EncodedFrames], starts: np.ndarray, counts: np.ndarray
) -> dict[str, EncodedFrames]:
    """Per camera, the frames of one block's rows (its segments' row ranges)."""
    return {camera: encoded.take_ranges(starts, counts) for camera, encoded in frames.items()}
