"""Camera frames: the column type, what the manifest and the shard index record per camera,
and the image codecs (the one place frames are encoded and decoded).

A dataset stores frames in a column group of its own, `frames`, aligned row for row with the
base parts like any other group: one step-level column per camera, `frame_<camera>`, holding
one encoded image per step (Arrow `binary`). Scans, queries and relabelers that do not ask for
a frame column never read these files. The group's `cameras` entry in the manifest says, per
camera, the frame shape, dtype (uint8) and codec with its settings (`CameraInfo`).

A video camera (codec h264, av1 or hevc) is the exception: one video per episode, in the group's
episodes table, aligned with the base episodes (schemas/video.py encodes and decodes it).
Encoded here with hindsight's settings, or `copied` from a source that stores video (a
LeRobot camera: each episode's packets copied as they came, engine/video.py).

Frames are H x W x C uint8 (C = 1 or 3), in the order a gymnasium `render()` returns them.
Encoded frames that arrive encoded (JPEG from a Minari source, PNG from a LeRobot image
feature) are stored as they came, never decoded and re-encoded.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

FRAMES_GROUP = "frames"
FRAME_PREFIX = "frame_"
DEFAULT_CAMERA = "render"  # the camera `collect --frames` records: the env's own render()

# "webp-lossless" is WebP's lossless bitstream (VP8L), a codec of its own rather than a
# quality: it has no quality setting, and it decodes to exactly the frame it was given.
Codec = Literal["png", "jpeg", "webp", "webp-lossless", "h264", "av1", "hevc"]
CODECS: tuple[str, ...] = ("png", "jpeg", "webp", "webp-lossless")  # one image per step
LOSSLESS_CODECS: tuple[str, ...] = ("png", "webp-lossless")  # no quality setting
VIDEO_CODECS: tuple[str, ...] = ("h264", "av1", "hevc")  # one video per episode (schemas/video.py)
# x265 (4.2) gives other bytes from one run to the next for pictures under 32 pixels a side
# (measured: 16x16, 16x32, 32x16 at CTU 16; larger pictures gave the same bytes every run).
MIN_HEVC_SIDE = 32
DEFAULT_QUALITY = {"jpeg": 90, "webp": 90}  # lossy codecs only
# Video settings by default (LeRobot's): 30 fps, a keyframe every 2 frames, crf 30.
DEFAULT_FPS = 30
DEFAULT_GOP = 2
DEFAULT_CRF = 30
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "webp-lossless": "WEBP"}
# A decoded frame larger than this is refused before decoding (a decompression bomb, a 4K
# frame where the camera says 84x84): checked against the header's size.
MAX_FRAME_PIXELS = 4096 * 4096


class FrameError(ValueError):
    """A frame that is not what its camera says (size, channels, codec) or does not decode."""


def _absent(value: object) -> bool:
    return value is None


class CameraInfo(BaseModel):
    """One camera: the shape of its frames and how they are encoded."""

    model_config = ConfigDict(extra="forbid")

    height: int = Field(ge=1)
    width: int = Field(ge=1)
    channels: Literal[1, 3] = 3
    dtype: Literal["uint8"] = "uint8"
    codec: Codec = "png"
    quality: int | None = Field(
        default=None, ge=1, le=100, description="JPEG/WebP quality; None for the lossless codecs."
    )
    # Video cameras only (absent from an image camera's manifest entry):
    fps: int | None = Field(
        default=None, ge=1, exclude_if=_absent, description="Video: frames per second."
    )
    gop: int | None = Field(
        default=None, ge=1, exclude_if=_absent, description="Video: a keyframe every gop frames."
    )
    crf: int | None = Field(
        default=None, ge=0, le=63, exclude_if=_absent, description="Video: constant rate factor."
    )
    copied: bool | None = Field(
        default=None,
        exclude_if=_absent,
        description="Video: the source's bitstream copied per episode, not encoded here "
        "(gop and pix_fmt as the source has them; crf unknown).",
    )
    pix_fmt: str | None = Field(
        default=None, exclude_if=_absent, description="Video copied: the source's pixel format."
    )

    @model_validator(mode="after")
    def _video_settings(self) -> CameraInfo:
        if self.is_video:
            if self.quality is not None:
                raise ValueError(f"{self.codec} video has no quality setting (it has crf)")
            problem = video_size_problem(self.codec, self.height, self.width)
            if problem:
                raise ValueError(problem)
            if self.codec == "hevc" and self.crf is not None and self.crf > 51:
                raise ValueError(f"hevc's crf is 0-51, got {self.crf}")
            self.fps = self.fps or DEFAULT_FPS
            self.gop = self.gop or DEFAULT_GOP
            if not self.copied:  # a copied bitstream's crf is the source's, unknown
                self.crf = DEFAULT_CRF if self.crf is None else self.crf
        elif (self.fps, self.gop, self.crf, self.copied, self.pix_fmt) != (None,) * 5:
            raise ValueError(
                f"fps, gop, crf, copied and pix_fmt are video settings, not {self.codec}'s"
            )
        return self

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    @property
    def is_video(self) -> bool:
        """One video per episode (its frames group's episodes table), not an image per step."""
        return self.codec in VIDEO_CODECS

    def as_images(self) -> CameraInfo:
        """The camera as one image per step: itself for an image codec; a video camera's
        frames decoded and stored as PNG (lossless: the video's own pixels), as shards
        carry them and relabelers read them (engine/shards/frames.py, engine/step_frames.py)."""
        if not self.is_video:
            return self
        return CameraInfo(height=self.height, width=self.width, channels=self.channels, codec="png")


def video_size_problem(codec: str, height: int, width: int) -> str | None:
    """Why frames of this size cannot be a video camera's in `codec` (None: they can)."""
    if height % 2 or width % 2:
        return f"{codec} video (yuv420p) needs an even height and width, got {height}x{width}"
    if codec == "hevc" and min(height, width) < MIN_HEVC_SIDE:
        return (
            f"hevc video needs frames of at least {MIN_HEVC_SIDE}x{MIN_HEVC_SIDE} (x265 does not "
            f"encode smaller ones the same way twice), got {height}x{width}"
        )
    return None


def check_quality(codec: str, quality: int | None) -> None:
    """`--quality` only with a lossy image codec (collect and ingest refuse it alike)."""
    if quality is not None and codec in (*LOSSLESS_CODECS, *VIDEO_CODECS):
        kind = "lossless" if codec in LOSSLESS_CODECS else "video (it has crf)"
        raise ValueError(f"--quality is for jpeg and webp; {codec} is {kind}")


def frame_column(camera: str) -> str:
    """The step column that holds a camera's frames."""
    if not camera or not camera.replace("_", "").isalnum():
        raise ValueError(f"a camera name is letters, digits and underscores, got {camera!r}")
    return FRAME_PREFIX + camera


def camera_of(column: str) -> str | None:
    """The camera a column holds frames of, or None for any other column."""
    return column[len(FRAME_PREFIX) :] if column.startswith(FRAME_PREFIX) else None


def sniff_codec(data: bytes) -> str | None:
    """The codec of encoded image bytes, from their magic number (None: not an image)."""
    head = bytes(data[:12])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def _image_camera(camera: CameraInfo, where: str = "") -> None:
    """Images are one per step; a video camera's frames go through schemas/video.py."""
    if camera.is_video:
        raise FrameError(
            f"{where}: the camera is {camera.codec} video (one per episode), not an image per "
            "step (schemas.video.decode_video)".lstrip(": ")
        )


DEFAULT_PNG_LEVEL = 6  # zlib's default: what collect, ingest and shards write


def encode_frame(
    frame: np.ndarray, camera: CameraInfo, png_level: int = DEFAULT_PNG_LEVEL
) -> bytes:
    """One H x W x C uint8 frame in the camera's codec (`png_level`: PNG's zlib level; 1
    for frames made on the fly, read once: engine/step_frames.py)."""
    from PIL import Image

    _image_camera(camera)
    check_frame_array(frame, camera)
    image = Image.fromarray(frame[:, :, 0] if camera.channels == 1 else frame)
    out = io.BytesIO()
    options: dict = {}
    if camera.codec == "png":
        options = {"compress_level": png_level}
    elif camera.codec == "jpeg":
        options = {"quality": camera.quality or DEFAULT_QUALITY["jpeg"], "subsampling": 0}
    elif camera.codec == "webp-lossless":
        options = {"lossless": True, "method": 4}
    else:
        options = {"quality": camera.quality or DEFAULT_QUALITY["webp"], "method": 4}
    image.save(out, format=_PIL_FORMAT[camera.codec], **options)
    return out.getvalue()


def encode_frames(frames: np.ndarray, camera: CameraInfo) -> list[bytes]:
    """N frames (N x H x W x C uint8), each encoded on its own: any step decodes alone."""
    return [encode_frame(frame, camera) for frame in frames]


def decode_frame(data: bytes, camera: CameraInfo, where: str = "") -> np.ndarray:
    """One encoded frame as H x W x C uint8, checked against the camera: size, channels and
    codec must match, or a FrameError names `where` (file, episode, step or shard, sample)."""
    from PIL import Image

    _image_camera(camera, where)
    try:
        image = Image.open(io.BytesIO(data))
        if image.format != _PIL_FORMAT[camera.codec]:
            raise FrameError(f"is {image.format or 'not an image'}, the camera says {camera.codec}")
        if image.width * image.height > MAX_FRAME_PIXELS or image.size != (
            camera.width,
            camera.height,
        ):
            raise FrameError(
                f"is {image.width}x{image.height}, the camera says {camera.width}x{camera.height}"
            )
        mode = "L" if camera.channels == 1 else "RGB"
        array = np.asarray(image if image.mode == mode else image.convert(mode))
    except FrameError as error:
        raise FrameError(f"{where}: frame {error}") from None
    except Exception as error:  # PIL raises many types for damaged data
        raise FrameError(f"{where}: frame does not decode ({error})") from None
    return array.reshape(camera.shape)


def decode_frames(data: Sequence[bytes], camera: CameraInfo, where: str = "") -> np.ndarray:
    """Frames as N x H x W x C uint8."""
    out = np.empty((len(data), *camera.shape), dtype=np.uint8)
    for i, item in enumerate(data):
        out[i] = decode_frame(item, camera, f"{where} frame {i}" if where else f"frame {i}")
    return out


def check_frame_array(frames: np.ndarray, camera: CameraInfo, where: str = "") -> None:
    """Raw frames (H x W x C or N x H x W x C) must be uint8 of the camera's shape."""
    if frames.dtype != np.uint8:
        raise FrameError(f"{where}: frames must be uint8, got {frames.dtype}".lstrip(": "))
    if tuple(frames.shape[-3:]) != camera.shape:
        raise FrameError(
            f"{where}: frames of shape {tuple(frames.shape[-3:])}, the camera says "
            f"{camera.shape}".lstrip(": ")
        )


def frames_table(columns: dict[str, Sequence[bytes]]) -> pa.Table:
    """The steps table of a frames part: camera -> encoded frames, one per step of the base
    part, in its row order."""
    return pa.table(
        {
            frame_column(camera): pa.array(list(data), pa.binary())
            for camera, data in columns.items()
        }
    )
