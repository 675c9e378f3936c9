"""Camera frames as an MP4 video, encoded with PyAV the way LeRobot's own writer does
(lerobot/datasets/video_utils.py `encode_video_frames`, lerobot/configs/video.py): AV1 by
SVT-AV1 (`libsvtav1`, preset 12) or H.264 (`libx264`), pixel format yuv420p, a keyframe
every 2 frames (g=2: LeRobot seeks to any frame cheaply), crf 30. Frames arrive as
H x W x 3 uint8 arrays; a grayscale camera (C = 1) is stored as RGB with equal channels.

Given the same frames and settings both encoders write the same bytes (checked by the
export tests), so a re-run export is identical.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

CODECS = {"libsvtav1": "libsvtav1", "h264": "libx264"}
PIX_FMT = "yuv420p"
GOP = 2
CRF = 30
SVTAV1_PRESET = 12


class VideoError(ValueError):
    """Frames that cannot be encoded (odd size for yuv420p, a codec missing from PyAV)."""


@dataclass(frozen=True)
class VideoSettings:
    """What LeRobot records per video feature in info.json (`video.*` keys)."""

    codec: str  # the canonical codec name a decoder reports: "av1" or "h264"
    height: int
    width: int
    fps: int
    pix_fmt: str = PIX_FMT
    g: int = GOP
    crf: int = CRF

    def info(self) -> dict:
        return {
            "video.height": self.height,
            "video.width": self.width,
            "video.codec": self.codec,
            "video.pix_fmt": self.pix_fmt,
            "video.is_depth_map": False,
            "video.fps": self.fps,
            "video.channels": 3,
            "video.g": self.g,
            "video.crf": self.crf,
            "has_audio": False,
        }


def codec_options(codec: str) -> dict[str, str]:
    options = {"g": str(GOP), "crf": str(CRF)}
    if codec == "libsvtav1":
        options["preset"] = str(SVTAV1_PRESET)
    return options


def encode_video(
    frames: Iterable[np.ndarray], path: str, fps: int, codec: str = "libsvtav1"
) -> tuple[VideoSettings, int]:
    """Encode `frames` (each H x W x C uint8, C = 1 or 3) into the local MP4 file `path`,
    one video frame per array at `fps`; the settings and the number of frames written."""
    try:
        import av
    except ImportError as error:
        raise VideoError(
            "exporting camera frames as video needs PyAV: pip install 'hindsight[video]'"
        ) from error

    # SVT-AV1 prints its whole configuration on stderr unless told otherwise.
    os.environ.setdefault("SVT_LOG", "1")
    if codec not in CODECS:
        raise VideoError(f"video codec {codec!r}: choose one of {sorted(CODECS)}")
    count = 0
    settings: VideoSettings | None = None
    with av.open(path, "w", format="mp4") as container:
        stream = None
        for frame in frames:
            if frame.ndim == 3 and frame.shape[2] == 1:
                frame = np.repeat(frame, 3, axis=2)
            if stream is None:
                height, width = frame.shape[:2]
                if height % 2 or width % 2:
                    raise VideoError(
                        f"frames of {height}x{width}: yuv420p video needs an even height and width"
                    )
                try:
                    stream = container.add_stream(CODECS[codec], fps, options=codec_options(codec))
                except (av.FFmpegError, ValueError) as error:
                    raise VideoError(f"PyAV cannot encode {codec}: {error}") from error
                stream.pix_fmt = PIX_FMT
                stream.width, stream.height = width, height
                settings = VideoSettings(
                    codec=stream.codec_context.codec.canonical_name
                    if hasattr(stream.codec_context.codec, "canonical_name")
                    else ("av1" if codec == "libsvtav1" else "h264"),
                    height=height,
                    width=width,
                    fps=fps,
                )
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in stream.encode(video_frame):
                container.mux(packet)
            count += 1
        if stream is not None:
            for packet in stream.encode():
                container.mux(packet)
    if settings is None:
        raise VideoError(f"{path}: no frames to encode")
    return settings, count


def decode_video(path: str) -> np.ndarray:
    """Every frame of a local MP4 as N x H x W x 3 uint8 (for tests and checks)."""
    import av

    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
