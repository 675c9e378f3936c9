"""LeRobot's `video` features as cameras: copied as they are, or decoded and encoded.

Without `--codec`, a video feature whose MP4s hold H.264, AV1 or HEVC in yuv420p (LeRobot
writes AV1 by default, H.264 or HEVC on request) becomes a **copied** video camera: each
episode's span of its MP4 is copied packet by packet into an MP4 of its own (engine/video.py
`copy_video_span`: nothing decoded or encoded, the source's pixels exactly), which is what a
hindsight video camera stores (schemas/video.py: one video per episode, frame k = step k).
Every copied video is decoded once in its part task to check it is whole and holds one frame
per step (a damaged MP4 is a problem naming the video, the episode and the camera), which
costs a decode but no encode.

An episode's span is copied when it can stand alone and maps frame k to step k: its steps'
timestamps are 0, 1/fps, 2/fps, ...; its first frame is a keyframe (LeRobot v3.0 joins
per-episode videos by stream copy, so each episode starts on one); its frames are one per
step. Otherwise that episode alone is decoded (frames picked by timestamp, as below) and
encoded in the camera's codec with hindsight's settings (straight from the decoded frames, a
window at a time: `reencoded_video`), and the manifest counts it, with
why (`frames_from`, engine/ingest.py `copy_summary`): never silently different.

With `--codec X` (or a video that cannot be copied: another codec or pixel format), every
frame is decoded from the episode's span (the frame nearest `from_timestamp + timestamp`,
as LeRobot's reader picks it) and encoded with X (PNG by default), as before.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from engine import storage
from engine.sources.base import Frames, PlanOptions, Videos
from engine.sources.images import (
    ImageColumn,
    chunk_rows,
    encode_raw,
    raw_camera,
    step_camera,
)
from engine.sources.lerobot_meta import LeRobotEpisode, LeRobotMeta, VideoSpan, image_bytes
from engine.sources.lerobot_rows import flat_values
from engine.validate import Problem
from engine.video import (
    NotCopied,
    VideoFormat,
    copy_video_span,
    decode_video_span,
    keyframe_interval,
    video_format,
)
from schemas import steps as cols
from schemas.frames import (
    DEFAULT_CRF,
    VIDEO_CODECS,
    CameraInfo,
    FrameError,
    decode_frames,
    video_size_problem,
)
from schemas.video import PIX_FMT, check_video, write_video

# Episodes whose MP4 a plan tries for the codec, pixel format and GOP of a camera.
PROBED_EPISODES = 3


def video_camera(
    meta: LeRobotMeta, key: str, shape: tuple[int, int], options: PlanOptions
) -> tuple[CameraInfo, bool, str]:
    """A video feature's camera, whether it is copied, and what the plan says of it:
    copied (codec and pixel format as the first readable episode's MP4 has them, the GOP
    as the probed episodes' packets show it), or
    decoded and encoded with --codec (PNG without one), and why not copied."""
    height, width = shape
    encoded = raw_camera((0, height, width, 3), options.codec, options.quality)
    if options.codec is not None:
        return encoded, False, f"decoded and encoded as {options.codec} (--codec)"
    found, gops, lengths = None, [], []
    for episode in [e for e in meta.episodes if key in dict(e.videos)][:PROBED_EPISODES]:
        span = dict(episode.videos)[key]
        uri = meta.uri(span.file)
        try:
            video = video_format(uri)
            interval = keyframe_interval(uri, span.start_s, episode.length, meta.info.fps)
        except FrameError:  # that episode's problem is found again when its part reads it
            continue
        found = found or video
        gops.append(interval)
        lengths.append(episode.length)
    if found is None:
        return encoded, False, "decoded and encoded as png: no episode's video reads"
    # The longest keyframe interval of the probed episodes that stand alone (a short
    # episode shows less than its video's GOP); none standing alone, their length. Each
    # episode's own codec, pixel format and size are checked again when its part copies it.
    standalone = [gop for gop in gops if gop]
    gop = max(standalone) if standalone else max(lengths)
    why = None
    if found.codec not in VIDEO_CODECS:
        stored = f"{', '.join(VIDEO_CODECS[:-1])} and {VIDEO_CODECS[-1]}"
        why = f"its MP4s are {found.codec}; hindsight stores {stored} video"
    elif found.pix_fmt != PIX_FMT:
        why = f"its MP4s are {found.pix_fmt}; hindsight stores {PIX_FMT} video"
    elif (found.height, found.width) != (height, width) or height % 2 or width % 2:
        why = f"its MP4s are {found.width}x{found.height}, info.json says {width}x{height}"
    elif problem := video_size_problem(found.codec, height, width):
        # A copy encodes nothing, but an episode that cannot be copied is encoded again in
        # the camera's codec, which hindsight refuses below hevc's minimum size.
        why = f"an episode that cannot be copied would be encoded again, and {problem}"
    if why:
        return encoded, False, f"decoded and encoded as png: {why}"
    copied = CameraInfo(
        height=height,
        width=width,
        codec=found.codec,
        fps=meta.info.fps,
        gop=gop,
        copied=True,
        pix_fmt=found.pix_fmt,
    )
    return copied, True, f"copied ({found.codec}, {found.pix_fmt}, a keyframe every {gop})"


@dataclass
class FramesRead:
    """A part's cameras as read: frames per step, copied videos per episode, the
    episodes whose video did not decode (a problem each) and those re-encoded."""

    frames: Frames = field(default_factory=dict)
    videos: Videos = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    reencoded: list[tuple[str, int, str]] = field(default_factory=list)


def read_frames(
    root: str,
    fps: int,
    episodes: tuple[LeRobotEpisode, ...],
    images: tuple[ImageColumn, ...],
    cameras: dict[str, CameraInfo],
    table: pa.Table,
) -> FramesRead:
    """The cameras of these episodes (the rows of `table`, in episode order): image
    features as stored, copied video features one video per episode, other video features
    decoded from each episode's span (one episode's raw frames at a time). A step's frame
    is the video's frame nearest to `from_timestamp + timestamp`, as LeRobot's reader
    picks it: the frame grid slot its timestamp rounds to. An episode whose video does not
    decode (a damaged file, frames missing or of another size) has no frames here and a
    problem naming the video, the episode and the camera."""
    timestamps = flat_values(table.column("timestamp")).astype(np.float64)
    boundaries = cols.episode_boundaries(
        np.asarray(table.column("episode_index").to_numpy(), dtype=np.int64)
    )
    stored = {
        image.camera: image_bytes(table.column(image.source)).to_pylist()
        for image in images
        if image.encoded
    }
    out = FramesRead(
        frames={image.camera: [] for image in images if not image.copied},
        videos={image.camera: [] for image in images if image.copied},
    )
    for episode, first, stop in zip(episodes, boundaries[:-1], boundaries[1:]):
        decoded: Frames = {}
        videos: dict[str, bytes] = {}
        notes: list[tuple[str, int, str]] = []
        for image in images:
            if image.encoded:
                decoded[image.camera] = stored[image.camera][first:stop]
                continue
            span = dict(episode.videos)[image.source]
            uri = storage.join(root, span.file)
            slots = np.rint(timestamps[first:stop] * fps).astype(np.int64)
            camera = cameras[image.camera]
            try:
                if image.copied:
                    video, why = episode_video(uri, span, slots, fps, camera, episode.index)
                    videos[image.camera] = video
                    if why:
                        notes.append((image.camera, episode.index, why))
                else:
                    decoded[image.camera] = episode_frames(
                        uri, span.start_s, slots, fps, camera, episode.index
                    )
            except FrameError as error:  # engine.video's VideoError is one
                message = str(error).removeprefix(uri).removeprefix(":").strip()
                message = message.removeprefix(f"episode {episode.index}: ")
                out.problems.append(Problem(uri, image.source, message, episode.index))
                break
        else:
            for camera_name, data in decoded.items():
                out.frames[camera_name] += data
            for camera_name, video in videos.items():
                out.videos[camera_name].append(video)
            out.reencoded += notes
    return out


def episode_video(
    uri: str, span: VideoSpan, slots: np.ndarray, fps: int, camera: CameraInfo, episode: int
) -> tuple[bytes, str | None]:
    """A copied camera's video of one episode: its span copied as it is and checked by
    decoding it once, or, where the span cannot be copied, its frames decoded and encoded
    in the camera's codec; and why it was not copied (None: copied)."""
    steps = len(slots)
    try:
        if not np.array_equal(slots, np.arange(steps)):
            raise NotCopied("its steps' timestamps are not one frame apart from 0")
        # The camera's format is the first probed episode's: this one's must be the same.
        expected = VideoFormat(camera.codec, camera.pix_fmt, camera.height, camera.width)
        video = copy_video_span(uri, span.start_s, steps, fps, uri, expected)
    except NotCopied as error:
        return reencoded_video(uri, span.start_s, slots, fps, camera, episode), str(error)
    try:
        check_video(video, camera, uri, steps)
    except FrameError as error:  # the source's bitstream is damaged: so is the copy
        found = str(error).removeprefix(uri).lstrip(": ")
        raise FrameError(f"{uri}: the video does not decode (its span copied: {found})") from None
    return video, None


def reencoded_video(
    uri: str, start_s: float, slots: np.ndarray, fps: int, camera: CameraInfo, episode: int
) -> bytes:
    """An episode's frames at these slots decoded from its span and encoded in the copied
    camera's codec, straight from the decoded frames a window of `chunk_rows` at a time
    (steps in time order, as LeRobot's are); steps out of order go through
    `episode_frames` (PNG per step) first. The same video either way (PNG is lossless)."""
    if len(slots) and slots[0] >= 0 and np.all(np.diff(slots) >= 0):
        frames = raw_frames(uri, start_s, slots, fps, camera, episode)
    else:
        encoded = episode_frames(uri, start_s, slots, fps, camera, episode)
        frames = iter(decode_frames(encoded, step_camera(camera), f"{uri}: episode {episode}"))
    out = io.BytesIO()
    crf = DEFAULT_CRF if camera.crf is None else camera.crf  # None: a copied camera's
    write_video(frames, out, camera.codec, camera.fps, camera.gop, crf)
    return out.getvalue()


def raw_frames(
    uri: str, start_s: float, slots: np.ndarray, fps: int, camera: CameraInfo, episode: int
) -> Iterator[np.ndarray]:
    """The frames at these slots (non-decreasing) of the frame grid from `start_s`, in
    order, decoded a window of `chunk_rows` frames at a time."""
    window = chunk_rows(camera)
    for first in range(int(slots[0]) - int(slots[0]) % window, int(slots[-1]) + 1, window):
        stop = first + window
        rows = np.flatnonzero((slots >= first) & (slots < stop))
        if not len(rows):
            continue
        end = int(slots[rows[-1]]) + 1
        decoded = decode_video_span(uri, start_s + first / fps, start_s + end / fps, fps)
        yield from check_shape(decoded, camera, uri, episode)[slots[rows] - first]


def check_shape(decoded: np.ndarray, camera: CameraInfo, uri: str, episode: int) -> np.ndarray:
    """Decoded frames of the size info.json gives the camera, or a FrameError."""
    if decoded.shape[1:] != camera.shape:
        raise FrameError(
            f"{uri}: episode {episode}: frames of {decoded.shape[2]}x{decoded.shape[1]}, "
            f"info.json says {camera.width}x{camera.height}"
        )
    return decoded


def episode_frames(
    uri: str, start_s: float, slots: np.ndarray, fps: int, camera: CameraInfo, episode: int
) -> list[bytes]:
    """The encoded frames at these slots of the frame grid from `start_s`, decoded a window
    of `chunk_rows` frames at a time (a long episode never holds all its raw frames)."""
    window = chunk_rows(camera)
    count = int(slots.max()) + 1 if len(slots) else 0
    out: list[bytes | None] = [None] * len(slots)
    for first in range(0, count, window):
        stop = min(count, first + window)
        rows = np.flatnonzero((slots >= first) & (slots < stop))
        if not len(rows):
            continue
        decoded = decode_video_span(uri, start_s + first / fps, start_s + stop / fps, fps)
        check_shape(decoded, camera, uri, episode)
        for row, data in zip(rows, encode_raw(decoded[slots[rows] - first], camera)):
            out[row] = data
    return out  # type: ignore[return-value]
