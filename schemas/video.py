"""A camera stored as video: one MP4 per episode (H.264, AV1 or HEVC through PyAV), the one place
such a video is encoded and decoded.

A video camera's frames live in the frames group's **episodes** table: one row per episode
of the base part, in its order, the column `frame_<camera>` holding that episode's whole
video (Arrow `binary`). Frame k of the video is step t = k of the episode, so a video holds
exactly as many frames as its episode has steps (checked on every decode).

Settings follow LeRobot's writer (lerobot/configs/video.py, engine/exports/video.py):
yuv420p, crf 30, a keyframe every `gop` frames (2 by default: any frame decodes from the one
before it), SVT-AV1 preset 12, x265's default preset. Encoding is deterministic: one encoder
thread, no B-frames (presentation order is decode order), x264's mbtree off and x265's
zerolatency tune (see `encoder_options`), bitexact muxing (no version or creation time
written) and explicit timestamps, so the same frames give the same bytes in any process, on
Ray or not (tests/test_frames_video.py checks it).
"""

from __future__ import annotations

import io
import os
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from fractions import Fraction
from typing import Any, BinaryIO

import numpy as np

from schemas.frames import (
    DEFAULT_CRF,
    DEFAULT_GOP,
    CameraInfo,
    FrameError,
    check_frame_array,
    video_size_problem,
)

# codec -> the PyAV encoder that writes it
ENCODERS = {"h264": "libx264", "av1": "libsvtav1", "hevc": "libx265"}
# x265: one thread and no thread pool (the frame threads x265 picks by itself depend on the
# machine's cores, and change the bytes); CTU 16, not 64 (x265 4.2 gave other bytes from run
# to run for one-CTU pictures: 64x64 at CTU 64; CTU 16 was also 4% smaller and faster from
# 32x32 to 320x240); no SEI with x265's version and options; errors only on stderr; an MD5
# of each decoded picture (hash=1, about 42 bytes a frame): FFmpeg's HEVC decoder conceals a
# damaged packet without an error, and checks only this kind of picture hash (x265's CRC,
# hash=2, it skips: one flipped bit in 80 gave wrong pixels without an error 41 times with
# the CRC, never with the MD5; tests/test_frames_video.py flips bits).
X265_PARAMS = "ctu=16:pools=none:frame-threads=1:info=0:log-level=error:hash=1"
PIX_FMT = "yuv420p"


def encoder_options(codec: str, gop: int = DEFAULT_GOP, crf: int = DEFAULT_CRF) -> dict[str, str]:
    """The encoder's options for a codec's settings (single-threaded: identical bytes)."""
    options = {"g": str(gop), "crf": str(crf)}
    if codec == "h264":
        # mbtree off: with it, x264 encoded the same small frames (16-32 pixels) to other
        # bytes from one run to the next; with a keyframe every 2 frames it gains nothing.
        options.update({"threads": "1", "bf": "0", "x264-params": "mbtree=0"})
    elif codec == "hevc":
        # zerolatency: no B-frames, no lookahead, no scene cuts (a keyframe every gop
        # exactly), no cutree: each frame's packet is written from it and the frames
        # before it only, so `CausalVideo` reproduces the stored video exactly.
        options.update({"tune": "zerolatency", "x265-params": X265_PARAMS})
    else:  # SVT-AV1: preset 12 as LeRobot; lp=1 one thread for identical bytes
        options.update({"preset": "12", "svtav1-params": "lp=1"})
    return options


def write_video(
    frames: Iterable[np.ndarray],
    file: str | BinaryIO,
    codec: str,
    fps: int,
    gop: int = DEFAULT_GOP,
    crf: int = DEFAULT_CRF,
) -> tuple[int, int, int]:
    """Encode `frames` (each H x W x C uint8, C = 1 or 3, one at a time: memory is one
    frame) into one MP4 at `file` (a local path or a writable binary file), one video frame
    per array at `fps`; the number of frames written, their height and width. The one
    encoder of the repo: video cameras (`encode_video`) and the LeRobot export use it."""
    try:
        import av
    except ImportError:
        raise FrameError("video needs PyAV: pip install 'hindsight[video]'") from None

    if codec not in ENCODERS:
        raise FrameError(f"video codec {codec!r}: choose one of {sorted(ENCODERS)}")
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its configuration otherwise
    count = height = width = 0
    with av.open(file, "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = None
        for frame in frames:
            if frame.ndim == 3 and frame.shape[2] == 1:  # grayscale: RGB with equal channels
                frame = np.repeat(frame, 3, axis=2)
            if stream is None:
                height, width = frame.shape[:2]
                problem = video_size_problem(codec, height, width)
                if problem:
                    raise FrameError(problem)
                try:
                    stream = container.add_stream(
                        ENCODERS[codec], fps, options=encoder_options(codec, gop, crf)
                    )
                except (av.FFmpegError, ValueError) as error:
                    raise FrameError(f"PyAV cannot encode {codec}: {error}") from None
                stream.pix_fmt = PIX_FMT
                stream.width, stream.height = width, height
                stream.codec_context.flags |= av.codec.context.Flags.bitexact
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            # Frame k is shown at k / fps (timestamps are part of the bytes written).
            picture.pts, picture.time_base = count, Fraction(1, fps)
            container.mux(stream.encode(picture))
            count += 1
        if stream is None:
            raise FrameError("no frames: an empty video is not written")
        container.mux(stream.encode())
    return count, height, width


def encode_video(frames: np.ndarray, camera: CameraInfo) -> bytes:
    """An episode's frames (N x H x W x C uint8, N >= 1) as one MP4 in the camera's codec,
    one video frame per step at the camera's fps."""
    check_frame_array(frames, camera)
    if len(frames) == 0:
        raise FrameError("an episode with no frames has no video")
    out = io.BytesIO()
    crf = DEFAULT_CRF if camera.crf is None else camera.crf  # None: a copied camera's
    write_video(iter(frames), out, camera.codec, camera.fps, camera.gop, crf)
    return out.getvalue()


@contextmanager
def video_stream(file: str | BinaryIO, where: str) -> Iterator[tuple[Any, Any]]:
    """An MP4's open container and its first video stream (closed on exit); a FrameError
    naming `where` for a file PyAV cannot read or one with no video stream."""
    import av

    try:
        container = av.open(file, "r")
    except Exception as error:  # PyAV raises its own error types for damaged files
        raise FrameError(f"{where}: not a video PyAV can read ({error})") from None
    with container:
        if not container.streams.video:
            raise FrameError(f"{where}: holds no video stream")
        stream = container.streams.video[0]
        if stream.codec_context is None:  # a damaged sample description: no codec to open
            raise FrameError(f"{where}: its video stream names no codec PyAV can decode")
        yield container, stream


def _decoded(data: bytes, camera: CameraInfo, where: str) -> Iterator[Any]:
    """The decoded pictures (PyAV frames) of one episode's video, checked against the
    camera (codec, size); a FrameError names `where` and, for a video that stops decoding,
    the step."""
    with video_stream(io.BytesIO(data), where) as (container, stream):
        if stream.codec_context.name not in (camera.codec, ENCODERS[camera.codec], "libdav1d"):
            raise FrameError(
                f"{where}: the video is {stream.codec_context.name}, the camera says {camera.codec}"
            )
        if (stream.height, stream.width) != (camera.height, camera.width):
            raise FrameError(
                f"{where}: the video is {stream.width}x{stream.height}, the camera says "
                f"{camera.width}x{camera.height}"
            )
        # A damaged packet raises instead of being concealed: the error names its step
        # (HEVC: also a picture whose MD5, written by hindsight's x265, does not match).
        detect = "crccheck+explode" if camera.codec == "hevc" else "explode"
        stream.codec_context.options = {"err_detect": detect}
        step = 0
        try:
            for packet in container.demux(stream):
                if packet.pts is not None:  # the step of the packet (for the error)
                    step = int(round(float(packet.pts * stream.time_base) * camera.fps))
                yield from packet.decode()
        except Exception as error:  # a damaged stream
            raise FrameError(f"{where} step {step}: the video does not decode ({error})") from None


def _check_count(count: int, where: str, steps: int | None) -> None:
    if steps is not None and count != steps:
        raise FrameError(f"{where}: the video holds {count} frames, the episode has {steps} steps")
    if not count:
        raise FrameError(f"{where}: the video holds no frame")


def decode_video(
    data: bytes, camera: CameraInfo, where: str, steps: int | None = None
) -> np.ndarray:
    """Every frame of one episode's video as N x H x W x C uint8, checked against the
    camera (codec, size) and, given `steps`, the episode's step count. A FrameError names
    `where` (file, episode, camera) and, for a video that stops decoding, the step."""
    frames = [frame.to_ndarray(format="rgb24") for frame in _decoded(data, camera, where)]
    _check_count(len(frames), where, steps)
    video = np.stack(frames)
    if camera.channels == 1:  # stored as RGB with equal channels: their mean
        video = np.round(video.mean(axis=3, keepdims=True)).astype(np.uint8)
    return video


def video_frames(
    data: bytes, camera: CameraInfo, where: str, steps: int | None = None
) -> Iterator[np.ndarray]:
    """`decode_video`'s frames one at a time (each H x W x C uint8, the same values):
    memory is one frame. The count is checked once the video ends, so a consumer has seen
    the frames before a video of the wrong length raises."""
    count = 0
    for picture in _decoded(data, camera, where):
        frame = picture.to_ndarray(format="rgb24")
        if camera.channels == 1:  # as decode_video: the mean of the equal channels
            frame = np.round(frame.mean(axis=2, keepdims=True)).astype(np.uint8)
        count += 1
        yield frame
    _check_count(count, where, steps)


def video_frames_at(
    data: bytes, camera: CameraInfo, where: str, wanted: Collection[int]
) -> Iterator[tuple[int, np.ndarray]]:
    """(k, frame k) for each k of `wanted`, in order: `decode_video`'s values (tested),
    decoded up to the last k and turned into RGB only at those k (with one reformatter for
    the video: 3.5x faster than a frame's own `to_ndarray` at 32x32). Memory is one frame.
    The frame count is not checked (the video is not read to its end): the caller checks
    it against the header (engine/step_frames.py)."""
    from av.video.reformatter import VideoReformatter

    last, rgb, count = max(wanted, default=-1), VideoReformatter(), 0
    for count, picture in enumerate(_decoded(data, camera, where) if last >= 0 else (), 1):
        if count - 1 in wanted:
            frame = rgb.reformat(picture, format="rgb24").to_ndarray()
            if camera.channels == 1:  # as decode_video: the mean of the equal channels
                frame = np.round(frame.mean(axis=2, keepdims=True)).astype(np.uint8)
            yield count - 1, frame
        if count - 1 == last:
            return
    if last >= 0:
        raise FrameError(f"{where}: the video holds {count} frames; step {last} was asked")


class CausalVideo:
    """One episode's frames through a video camera's codec a step at a time, each given
    back as the episode's stored video shows it, before the next frame exists (a rollout
    acts on frame t first: `hindsight ask` for a policy trained on a video camera).

    - h264: one encoder and one decoder stay open for the episode. The stored video's x264
      holds each frame back one step (its lookahead); without the lookahead (and with
      constant frame rate, as the stored timestamps are) it gives out every frame's packet
      at once, and the decoded pixels equal the whole-episode video's (tested).
    - hevc: the stored video's x265 settings (zerolatency) already give out each frame's
      packet as it comes; the same encoder, kept open, gives the same pixels (tested).
    - av1: SVT-AV1 holds frames back for many steps, so the frames given since the last
      keyframe (at most `gop`) are encoded anew each step. This is only approximate:
      SVT-AV1 decides how to code a keyframe group from the frames after it, which a
      rollout does not have yet. Small frames (16x16, a keyframe every 2) come back pixel
      for pixel; at 64x64 the pixels differ from the stored video's by about as much as
      the compression itself (measured: mean 0.04-1.6 levels against 0.4-4 for the raw
      frame). Pick h264 or hevc for a camera a policy is asked from."""

    def __init__(self, camera: CameraInfo):
        if not camera.is_video:
            raise FrameError(f"camera codec {camera.codec} is not a video codec")
        if camera.copied:  # its encoder's settings are the source's, unknown here
            raise FrameError("a copied video camera's compression cannot be reproduced")
        self.camera = camera
        self.frames: list[np.ndarray] = []  # av1: the frames since the last keyframe
        self.encoder: Any = None  # h264, hevc: the open encoder and decoder
        self.decoder: Any = None
        self.steps = 0

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """This step's frame (H x W x C uint8, C as the camera's) as the video shows it."""
        check_frame_array(frame[None], self.camera)
        if self.camera.codec in ("h264", "hevc"):
            shown = self._streamed(frame)
        else:
            if len(self.frames) == self.camera.gop:
                self.frames.clear()
            self.frames.append(frame)
            video = encode_video(np.stack(self.frames), self.camera)
            shown = decode_video(video, self.camera, "a rollout's frame", len(self.frames))[-1]
        self.steps += 1
        return shown

    def _streamed(self, frame: np.ndarray) -> np.ndarray:
        import av

        camera = self.camera
        if self.encoder is None:
            options = encoder_options(camera.codec, camera.gop, camera.crf)
            if camera.codec == "h264":
                options["x264-params"] += ":rc-lookahead=0:sync-lookahead=0:force-cfr=1"
            self.encoder = av.CodecContext.create(ENCODERS[camera.codec], "w")
            self.encoder.width, self.encoder.height = camera.width, camera.height
            self.encoder.pix_fmt = PIX_FMT
            self.encoder.time_base = Fraction(1, camera.fps)
            self.encoder.framerate = camera.fps
            self.encoder.options = options
            self.encoder.flags |= av.codec.context.Flags.bitexact
            self.decoder = av.CodecContext.create(camera.codec, "r")
            self.decoder.flags |= av.codec.context.Flags.low_delay
        rgb = np.repeat(frame, 3, axis=2) if frame.shape[2] == 1 else frame
        picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        picture.pts = self.steps
        decoded = [
            shown.to_ndarray(format="rgb24")
            for packet in self.encoder.encode(picture)
            for shown in self.decoder.decode(packet)
        ]
        if len(decoded) != 1:  # never seen: the settings above give one frame per frame
            raise FrameError(
                f"{camera.codec} gave {len(decoded)} frames for step {self.steps}, not 1"
            )
        shown = decoded[0]
        if camera.channels == 1:  # as decode_video: the mean of the equal channels
            shown = np.round(shown.mean(axis=2, keepdims=True)).astype(np.uint8)
        return shown


def check_video(data: bytes, camera: CameraInfo, where: str, steps: int) -> None:
    """What `decode_video` checks (codec, size, every packet decodes, one frame per step),
    without keeping or converting the frames: memory is one picture."""
    count = 0
    for _ in _decoded(data, camera, where):
        count += 1
    _check_count(count, where, steps)
