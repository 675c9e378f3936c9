"""Decoding camera streams stored as video (LeRobot's MP4 files) with PyAV.

A video holds frames at presentation times `pts * time_base`. A span [start_s, end_s) at
`fps` asks for the frames at start_s, start_s + 1/fps, ...: n = round((end_s - start_s)
* fps) of them. `decode_video_span` seeks to the keyframe at or before start_s, decodes
forward, and places each frame at the slot its time rounds to (the nearest frame by pts,
as LeRobot's own reader picks frames; a frame falls within half a period of its slot),
stopping once the span is covered: memory is the span's frames and one decoded frame.
A span the video does not cover is an error naming the file.

`copy_video_span` carries a span as it is: it copies the span's compressed packets into an
MP4 of its own (no decoding, no encoding: the same bitstream, the same pixels once decoded),
when the span can stand alone: its first frame a keyframe, one frame per slot of the grid.
LeRobot v3.0 concatenates per-episode videos by stream copy, so each episode's span starts
on a keyframe; a span that does not is refused (`NotCopied`) and its caller decodes it.

Sources open videos through engine/storage.py (`open_video`), so a local file and an S3
object are read the same way: PyAV reads a seekable pyarrow file, fetching only the byte
ranges it needs.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from engine import storage
from schemas.frames import FrameError
from schemas.video import video_stream


class VideoError(FrameError):
    """A video that does not hold what was asked of it (a FrameError, like a video that
    does not open: schemas/video.py `video_stream`)."""


class NotCopied(Exception):
    """A span that cannot be carried as it is (the message says why): decode it instead.
    `index`: which of several videos it is about (`join_videos`), where it is one."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


@dataclass(frozen=True)
class VideoFormat:
    """What a video's first stream holds, from its header."""

    codec: str  # FFmpeg's name of the format: av1, h264, hevc, ...
    pix_fmt: str | None
    height: int
    width: int


def open_video(uri: str) -> BinaryIO:
    """A seekable binary file over a local path or an S3 object, for `av.open`."""
    fs, path = storage.filesystem(uri)
    try:
        return fs.open_input_file(path)  # type: ignore[return-value]
    except (FileNotFoundError, OSError) as error:
        raise VideoError(f"{uri}: cannot open the video ({error})") from None


@contextmanager
def _open_stream(source: str | BinaryIO, name: str) -> Iterator[tuple[Any, Any]]:
    """A video's container and first stream over a URI (opened and closed here) or an open
    file."""
    with ExitStack() as stack:
        file = stack.enter_context(open_video(source)) if isinstance(source, str) else source
        yield stack.enter_context(video_stream(file, name))


def video_frame_count(source: str | BinaryIO, name: str = "") -> tuple[int, float]:
    """The frames of a video's first stream and its frame rate, from the header alone
    (MP4 stores both): what a plan checks a span against without decoding."""
    name = name or (source if isinstance(source, str) else "video")
    with _open_stream(source, name) as (container, stream):
        rate = float(stream.average_rate or stream.base_rate or 0)
        frames = int(stream.frames)
        if frames == 0 and stream.duration is not None and rate:  # a header without a count
            frames = int(round(float(stream.duration * stream.time_base) * rate))
        return frames, rate


def video_format(source: str | BinaryIO, name: str = "") -> VideoFormat:
    """The codec, pixel format and size of a video's first stream (its header alone)."""
    name = name or (source if isinstance(source, str) else "video")
    with _open_stream(source, name) as (container, stream):
        return _format(stream)


def _format(stream: Any) -> VideoFormat:
    context = stream.codec_context
    return VideoFormat(context.codec.canonical_name, context.pix_fmt, context.height, context.width)


def span_frames(start_s: float, end_s: float, fps: float) -> int:
    """How many frames a span [start_s, end_s) holds at `fps`."""
    return max(0, int(round((end_s - start_s) * fps)))


def decode_video_span(
    source: str | BinaryIO, start_s: float, end_s: float, fps: float, name: str = ""
) -> np.ndarray:
    """The frames of [start_s, end_s) as uint8 [n, H, W, 3] RGB (n = `span_frames`).

    `source` is a URI (local or s3://) or an open seekable file; `name` is what errors say
    (the URI by default). Frames are placed by their pts; a slot no frame falls in (the
    video ends early, or has a hole) is a VideoError naming the file and the time."""
    name = name or (source if isinstance(source, str) else "video")
    count = span_frames(start_s, end_s, fps)
    with _open_stream(source, name) as (container, stream):
        stream.thread_type = "AUTO"
        out = np.empty((count, stream.height, stream.width, 3), np.uint8)
        if count == 0:
            return out
        filled = np.zeros(count, bool)
        time_base = float(stream.time_base)
        if start_s > 0:
            # The keyframe at or before the span's first frame (one tick early: a frame
            # exactly at start_s must not be skipped by rounding).
            container.seek(
                max(0, int(start_s / time_base) - 1), stream=stream, backward=True, any_frame=False
            )
        last_time = None
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                last_time = frame.pts * time_base
                slot = int(round((last_time - start_s) * fps))
                if slot >= count:
                    break
                if slot >= 0:
                    out[slot] = frame.to_ndarray(format="rgb24")
                    filled[slot] = True
        except VideoError:
            raise
        except Exception as error:  # a damaged stream
            raise VideoError(f"{name}: the video does not decode ({error})") from None
    if not filled.all():
        missing = int(np.flatnonzero(~filled)[0])
        ends = "" if last_time is None else f" (its last frame is at {last_time:.3f}s)"
        raise VideoError(
            f"{name}: has no frame at {start_s + missing / fps:.3f}s{ends}; the span "
            f"{start_s:.3f}s..{end_s:.3f}s needs {count} frames at {fps:g} fps: the video is "
            "shorter than its episode"
        )
    return out


def _span_packets(
    container: Any, stream: Any, start_s: float, steps: int, fps: float
) -> tuple[list, list[int]]:
    """The packets of a span's frames in decode order, demuxed (not decoded), and the
    slot of the frame grid each falls in. NotCopied where a frame of the span before is
    decoded after this one's first (an open GOP: the span does not stand alone)."""
    time_base = float(stream.time_base)
    if start_s > 0:  # the keyframe at or before the span's first frame (as decode_video_span)
        container.seek(
            max(0, int(start_s / time_base) - 1), stream=stream, backward=True, any_frame=False
        )
    packets, slots = [], []
    after_span = False  # a frame shown after the span has been decoded
    for packet in container.demux(stream):
        if packet.pts is None:
            if packet.dts is None:  # the demuxer's flush packet
                continue
            raise NotCopied("a packet of the span has no presentation time")
        if packet.dts is not None and round((packet.dts * time_base - start_s) * fps) >= steps:
            break  # decoded after the span: so is every later packet (pts >= dts)
        slot = int(round((packet.pts * time_base - start_s) * fps))
        if slot >= steps and packet.dts is None:
            break
        if 0 <= slot < steps:
            if after_span:  # B-frames across the span's end refer to a frame it does not hold
                raise NotCopied(
                    "a frame after the span is decoded before one of the span's own (B-frames "
                    "across its end)"
                )
            packets.append(packet)
            slots.append(slot)
        elif slot < 0 and packets:
            if not packets[0].is_keyframe:
                raise NotCopied("the span's first frame is not a keyframe")
            raise NotCopied("a frame before the span is decoded after its first (an open GOP)")
        elif slot >= steps:
            after_span = True
    return packets, slots


def keyframe_interval(source: str | BinaryIO, start_s: float, steps: int, fps: float) -> int | None:
    """The longest run of frames from one keyframe to the next in a span (the span's
    length when it holds one keyframe): the video's GOP as its packets show it; None for
    a span that cannot stand alone."""
    name = source if isinstance(source, str) else "video"
    with _open_stream(source, name) as (container, stream):
        try:
            packets, slots = _span_packets(container, stream, start_s, steps, fps)
        except NotCopied:
            return None
        except Exception as error:  # a damaged container
            raise VideoError(f"{name}: the video does not read ({error})") from None
    keys = sorted(slot for packet, slot in zip(packets, slots) if packet.is_keyframe)
    ends = [*keys, steps]
    return max([b - a for a, b in zip(ends[:-1], ends[1:])], default=steps) or steps


def copy_video_span(
    source: str | BinaryIO,
    start_s: float,
    steps: int,
    fps: float,
    name: str = "",
    expected: VideoFormat | None = None,
) -> bytes:
    """The `steps` frames of a video from `start_s` (one per 1/fps) as an MP4 of their own,
    their compressed packets copied unchanged (nothing decoded or encoded) and their times
    moved to start at 0: frame k of the result is step k. NotCopied says why a span cannot
    stand alone (it does not start on a keyframe, its frames are not one per step, its
    stream is not in the `expected` format); a VideoError that the file does not read. The
    output is deterministic (bitexact)."""
    import av

    name = name or (source if isinstance(source, str) else "video")
    if steps <= 0:
        raise NotCopied("an empty span")
    out = io.BytesIO()
    with _open_stream(source, name) as (container, stream):
        found = _format(stream)
        if expected is not None and found != expected:
            raise NotCopied(
                f"its MP4 is {found.codec} {found.pix_fmt} {found.width}x{found.height}, the "
                f"camera {expected.codec} {expected.pix_fmt} {expected.width}x{expected.height}"
            )
        try:
            packets, slots = _span_packets(container, stream, start_s, steps, fps)
        except NotCopied:
            raise
        except Exception as error:  # a damaged container
            raise VideoError(f"{name}: the video does not read ({error})") from None
        if sorted(slots) != list(range(steps)):
            raise NotCopied(
                f"the span holds {len(slots)} frames at {len(set(slots))} of its {steps} "
                f"steps' times at {fps:g} fps: not one frame per step"
            )
        if not packets[0].is_keyframe or slots[0] != 0:
            raise NotCopied("the span's first frame is not a keyframe")
        with av.open(out, "w", format="mp4", options={"fflags": "+bitexact"}) as output:
            copy = output.add_stream_from_template(template=stream, opaque=True)
            copy.time_base = stream.time_base
            shift = packets[0].pts
            for packet in packets:
                packet.pts -= shift
                if packet.dts is not None:
                    packet.dts -= shift
                packet.stream = copy
                output.mux(packet)
    return out.getvalue()


def join_videos(videos: list[bytes], lengths: list[int], path: str | BinaryIO, fps: float) -> None:
    """Episodes' MP4s (each `lengths[k]` frames from 0, one per 1/fps) joined back to back
    into one MP4 at `path` by stream copy, as LeRobot v3.0 joins its episodes' videos:
    episode k's frames shifted by the frames before it (its `from_timestamp` is that
    count / fps). Nothing is decoded or encoded. NotCopied, with nothing written, when
    the videos cannot share one stream as they are (other codec parameters: extradata,
    size, time base), e.g. a copied camera with an episode re-encoded by hindsight; its
    `index` is the first video that differs from video 0."""
    import av

    if not videos:
        raise NotCopied("no videos")
    with ExitStack() as stack:
        inputs = [stack.enter_context(av.open(io.BytesIO(v), "r")) for v in videos]
        streams = [container.streams.video[0] for container in inputs]
        first = streams[0]

        def parameters(stream: Any) -> tuple:
            context = stream.codec_context
            extradata = bytes(context.extradata or b"")
            return context.name, context.width, context.height, stream.time_base, extradata

        for k, stream in enumerate(streams[1:], 1):
            if parameters(stream) != parameters(first):
                raise NotCopied(f"video {k} has other codec parameters than video 0", index=k)
        output = stack.enter_context(
            av.open(path, "w", format="mp4", options={"fflags": "+bitexact"})
        )
        copy = output.add_stream_from_template(template=first, opaque=True)
        copy.time_base = first.time_base
        frames = 0
        for container, stream, length in zip(inputs, streams, lengths, strict=True):
            shift = int(round(frames / fps / float(stream.time_base)))
            for packet in container.demux(stream):
                if packet.dts is None and packet.pts is None:
                    continue
                packet.pts = None if packet.pts is None else packet.pts + shift
                packet.dts = None if packet.dts is None else packet.dts + shift
                packet.stream = copy
                output.mux(packet)
            frames += length
