"""A part's camera frames as relabelers read them: one encoded image per step, whatever
the camera's storage.

    frames = part_frames(dataset, index, ["frame_render"], steps, rows)   # rows None: all

An image camera's frames are its stored bytes (PNG, JPEG, WebP), read from the Parquet row
groups that hold the rows asked for. A video camera (one MP4 per episode,
schemas/video.py) has no image per step: the videos of the episodes that hold the rows
asked for are decoded one episode at a time, each only up to the last frame asked
(memory: one decoded frame), and each row asked gets its frame as a lossless PNG (zlib
level 1: made here, read once). The pixels are the ones `hindsight view` and the loader
show for those steps: the same decoder (`schemas.video.video_frames_at`: `decode_video`'s
values, turned into RGB only at the frames asked). Rows not asked for are null. A bad
video (none stored, a header whose frame count is not the episode's steps, a stream that
stops decoding) is a FrameError naming the file, episode and camera.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from engine.dataset import Dataset
from engine.query.read import read_part_rows
from engine.video import video_frame_count
from schemas import steps as cols
from schemas.frames import CameraInfo, FrameError, camera_of, encode_frame, frame_column
from schemas.video import video_frames_at

PNG_LEVEL = 1  # zlib's fastest: frames made per relabel, sent or decoded once


def image_cameras(cameras: dict[str, CameraInfo]) -> dict[str, CameraInfo]:
    """The cameras as relabelers see them: a video camera's frames arrive as PNG."""
    return {name: info.as_images() for name, info in cameras.items()}


def part_frames(
    dataset: Dataset,
    index: int,
    columns: Sequence[str],
    steps: pa.Table,
    rows: np.ndarray | None = None,
) -> pa.Table:
    """Frame columns `columns` of part `index`, a row per row of `steps` (the part's
    `episode_id` and `t`): every row's frames, or only those at `rows` (null elsewhere)."""
    cameras = dataset.cameras
    video = {c for c in columns if getattr(cameras.get(camera_of(c) or ""), "is_video", False)}
    images = [c for c in columns if c not in video]
    if not images:
        stored = pa.table({})
    elif rows is None:
        stored = dataset.read_part(index, "steps", images)
    else:
        stored = read_part_rows(dataset, index, "steps", images, rows, fill=steps.num_rows)
    fields, arrays = [], []
    for name in columns:
        if name in video:
            fields.append(pa.field(name, pa.binary()))
            camera = camera_of(name) or ""
            arrays.append(
                pa.chunked_array([video_step_frames(dataset, index, camera, steps, rows)])
            )
        else:
            fields.append(stored.schema.field(name))
            arrays.append(stored.column(name))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def video_step_frames(
    dataset: Dataset,
    index: int,
    camera: str,
    steps: pa.Table,
    rows: np.ndarray | None = None,
    png_level: int = PNG_LEVEL,
) -> pa.Array:
    """Video camera `camera`'s frames of part `index` at the rows `rows` of its steps
    (`steps`: the part's `episode_id` and `t`; None: every row), each a PNG of the frame
    the episode's video shows at step t; null at every other row."""
    info, column = dataset.cameras[camera], frame_column(camera)
    uri = dataset.file_uris(dataset.group_of(column, "episodes"), "episodes")[index]
    count = steps.num_rows
    asked = np.arange(count) if rows is None else np.unique(np.asarray(rows, np.int64))
    episode_of = steps.column(cols.EPISODE_ID).to_numpy()[asked]
    t_of = steps.column(cols.T).to_numpy()[asked].astype(np.int64)
    if not len(asked):
        return pa.nulls(count, pa.binary())
    episodes = dataset.read_part(index, "episodes", [cols.EPISODE_ID, cols.LENGTH])
    ids = episodes.column(cols.EPISODE_ID).to_numpy()
    episode_row = _rows_of(ids, episode_of, uri)
    needed = np.unique(episode_row)  # the episodes' rows whose videos are read, in order
    videos = read_part_rows(dataset, index, "episodes", [column], needed).column(column)
    lengths = episodes.column(cols.LENGTH).to_numpy()
    png = info.as_images()
    out: list[bytes | None] = [None] * count
    by_episode = np.argsort(episode_row, kind="stable")
    starts = np.searchsorted(episode_row[by_episode], needed)
    ends = np.append(starts[1:], len(by_episode))
    for k, row in enumerate(needed):
        episode_id, length = int(ids[row]), int(lengths[row])
        where = f"{uri}: episode {episode_id} camera {camera!r}"
        chosen = by_episode[starts[k] : ends[k]]  # positions in `asked`
        slot_of = dict(zip(t_of[chosen].tolist(), asked[chosen].tolist()))
        for frame_index, frame in _frames_up_to(videos[k].as_py(), info, where, length, slot_of):
            out[slot_of[frame_index]] = encode_frame(frame, png, png_level=png_level)
    return pa.array(out, pa.binary())


def _rows_of(ids: np.ndarray, episode_ids: np.ndarray, uri: str) -> np.ndarray:
    """The row of the part's episodes table of each of `episode_ids`."""
    order = np.argsort(ids, kind="stable")
    found = np.minimum(np.searchsorted(ids[order], episode_ids), max(len(ids) - 1, 0))
    unknown = episode_ids != ids[order][found] if len(ids) else np.ones(len(episode_ids), bool)
    if unknown.any():
        raise FrameError(f"{uri}: episode {episode_ids[unknown][0]} has no episodes row")
    return order[found]


def _frames_up_to(
    data: bytes | None, info: CameraInfo, where: str, length: int, wanted: dict[int, int]
) -> Iterator[tuple[int, np.ndarray]]:
    """(t, frame) for every t in `wanted` of one episode's video, decoded in order up to
    the last of them; the video's frame count checked against the episode's from its
    header first (nothing decoded past the last frame asked)."""
    if data is None:
        raise FrameError(f"{where}: no video")
    last = max(wanted)
    if min(wanted) < 0 or last >= length:
        raise FrameError(
            f"{where}: step {last if last >= length else min(wanted)} is not "
            f"one of the episode's {length} steps"
        )
    frames, _ = video_frame_count(io.BytesIO(data), where)
    if frames != length:
        raise FrameError(
            f"{where}: the video holds {frames} frames, the episode has {length} steps"
        )
    yield from video_frames_at(data, info, where, wanted)
