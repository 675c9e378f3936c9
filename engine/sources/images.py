"""Images in a source, for every ingest format: which arrays or columns are cameras, how
their frames are encoded (raw uint8 arrays) or checked (frames that arrive encoded), and
how large a part may be.

A camera's frames go to the dataset's `frames` group (schemas/frames.py), one encoded image
per step, never into the base tables as flattened floats:

- a raw array is a camera when it holds uint8 and each step is H x W or H x W x C
  (C = 1 or 3): the file's array is (N, H, W) or (N, H, W, C). Its frames are encoded with
  the codec the user chose (`--codec`, PNG by default) in the part tasks. A (N, H, W, C)
  array of another dtype (C = 1, 3 or 4) is refused as a non-uint8 image, as is a uint8
  one with 4 channels;
- encoded images (PNG, JPEG or WebP bytes: a Parquet binary column or a `{bytes, path}`
  struct as Hugging Face datasets and LeRobot store image features, or Minari's JPEG
  observations) are stored as they came: the codec is sniffed from the bytes, the shape
  read from the first frame, and every frame is decoded once in its part task to check
  it is whole and of the camera's size and codec.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.validate import Problem
from schemas.frames import (
    DEFAULT_QUALITY,
    LOSSLESS_CODECS,
    MAX_FRAME_PIXELS,
    VIDEO_CODECS,
    CameraInfo,
    FrameError,
    decode_frame,
    encode_frame,
    sniff_codec,  # noqa: F401  (re-exported: image sources sniff what they read)
    video_size_problem,
)

# Raw frames a part may hold in all (its parts are cut smaller when they would hold more;
# a part still holds at least one whole episode), and read from the source at once.
IMAGE_PART_BYTES = 256 * 2**20
IMAGE_CHUNK_BYTES = 32 * 2**20
_CODEC_OF_FORMAT = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}


@dataclass(frozen=True)
class ImageColumn:
    """A source array or column holding one camera's frames."""

    source: str  # the array or column in the source, e.g. `observations/pixels`, `image`
    camera: str  # the camera it becomes (its frames: column `frame_<camera>`)
    encoded: bool  # True: frames arrive encoded and are stored as they came
    copied: bool = False  # True: a video, each episode's packets copied as they came


def camera_name(name: str) -> str:
    """A source key or column name as a camera name: letters, digits and underscores
    (`observation.images.top` -> `observation_images_top`)."""
    return re.sub(r"[^0-9A-Za-z_]", "_", name).strip("_") or "image"


def is_image_array(dtype: np.dtype, shape: Sequence[int]) -> bool:
    """A raw per-step array of frames: uint8 of shape (N, H, W) or (N, H, W, C)."""
    return np.dtype(dtype) == np.uint8 and len(shape) in (3, 4)


def looks_like_image(shape: Sequence[int]) -> bool:
    """(N, H, W, C) with C = 1, 3 or 4: frames, whatever the dtype says."""
    return len(shape) == 4 and shape[-1] in (1, 3, 4)


def image_array_problems(
    file: str, column: str, dtype: np.dtype, shape: Sequence[int], episode: int | None = None
) -> list[Problem]:
    """What is wrong with an array that holds (or looks like it holds) frames."""
    if not looks_like_image(shape) and not is_image_array(dtype, shape):
        return []
    if np.dtype(dtype) != np.uint8:
        return [
            Problem(
                file,
                column,
                f"is an image array of shape {tuple(shape)} with dtype {np.dtype(dtype)}; "
                "frames must be uint8 (0..255): convert them, or reshape to (N, D) if this "
                "is not an image",
                episode,
            )
        ]
    if len(shape) == 4 and shape[-1] not in (1, 3):
        return [
            Problem(
                file,
                column,
                f"has frames of {shape[-1]} channels (shape {tuple(shape)}); a camera has 1 "
                "(grey) or 3 (RGB) channels",
                episode,
            )
        ]
    if shape[1] * shape[2] > MAX_FRAME_PIXELS:
        return [Problem(file, column, f"frames of {shape[2]}x{shape[1]} are too large", episode)]
    return []


def raw_camera(shape: Sequence[int], codec: str | None, quality: int | None) -> CameraInfo:
    """The camera of a raw (N, H, W[, C]) uint8 array, encoded with `codec` (None: PNG)."""
    codec = codec or "png"
    channels = shape[3] if len(shape) == 4 else 1
    problem = video_size_problem(codec, int(shape[1]), int(shape[2]))
    if codec in VIDEO_CODECS and problem:
        other = "png, jpeg or webp" if shape[1] % 2 or shape[2] % 2 else "h264 or av1"
        raise FrameError(f"{problem}: choose --codec {other}")
    if codec in (*LOSSLESS_CODECS, *VIDEO_CODECS):
        quality = None
    elif quality is None:
        quality = DEFAULT_QUALITY[codec]
    return CameraInfo(
        height=int(shape[1]), width=int(shape[2]), channels=channels, codec=codec, quality=quality
    )


def encoded_camera(data: bytes, where: str) -> CameraInfo:
    """The camera of frames that arrive encoded, from the first one: its codec sniffed from
    the bytes, its size and channels from the header (quality unknown: None)."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(bytes(data)))
    except Exception as error:  # PIL raises many types for damaged data
        raise FrameError(f"{where}: not an image PIL can read ({error})") from None
    codec = _CODEC_OF_FORMAT.get(image.format or "")
    if codec is None:
        raise FrameError(f"{where}: is {image.format}; frames must be PNG, JPEG or WebP")
    if image.mode in ("I", "I;16", "I;16B", "F"):
        raise FrameError(f"{where}: has pixels of mode {image.mode}; frames must be uint8")
    channels = 1 if image.mode in ("L", "1", "LA") else 3
    return CameraInfo(height=image.height, width=image.width, channels=channels, codec=codec)


def frame_bytes(camera: CameraInfo) -> int:
    """Bytes of one raw frame."""
    return camera.height * camera.width * camera.channels


def image_part_steps(part_steps: int, cameras: Sequence[CameraInfo]) -> int:
    """Steps per part so that a part's raw frames stay within IMAGE_PART_BYTES."""
    per_step = sum(frame_bytes(camera) for camera in cameras)
    if not per_step:
        return part_steps
    return max(1, min(part_steps, IMAGE_PART_BYTES // per_step))


def chunk_rows(camera: CameraInfo) -> int:
    """Rows of raw frames to read from a source at once (IMAGE_CHUNK_BYTES)."""
    return max(1, IMAGE_CHUNK_BYTES // frame_bytes(camera))


def encode_raw(frames: np.ndarray, camera: CameraInfo) -> list[bytes]:
    """(N, H, W[, C]) uint8 frames, each encoded on its own in the camera's codec; a video
    camera's as PNG (lossless) until the part task makes each episode's video of them
    (engine/ingest.py `episode_videos`): a chunk of rows is not an episode."""
    if frames.ndim == 3:
        frames = frames[..., None]
    camera = step_camera(camera)
    return [encode_frame(frame, camera) for frame in frames]


def step_camera(camera: CameraInfo) -> CameraInfo:
    """How a camera's frames are held one per step: itself, or PNG for a video camera."""
    if not camera.is_video:
        return camera
    return CameraInfo(
        height=camera.height, width=camera.width, channels=camera.channels, codec="png"
    )


def encode_rows(
    read: Callable[[int, int], np.ndarray], start: int, keep: np.ndarray, camera: CameraInfo
) -> list[bytes]:
    """The frames of source rows [start, start + len(keep)) where `keep`, read with
    `read(first, last)` and encoded a chunk of rows at a time: a task never holds more
    than one chunk of raw frames."""
    step = chunk_rows(camera)
    encoded: list[bytes] = []
    for offset in range(0, len(keep), step):
        mask = keep[offset : offset + step]
        if mask.any():
            chunk = read(start + offset, start + offset + len(mask))
            encoded += encode_raw(chunk[mask], camera)
    return encoded


def check_encoded_frames(
    file: str,
    column: str,
    camera: CameraInfo,
    frames: Sequence[bytes | None],
    episode_ids: np.ndarray,
    t: np.ndarray,
) -> list[Problem]:
    """Every frame is there, decodes whole, and has the camera's codec and size: one
    problem per episode, at its first bad frame (naming the step)."""
    problems: list[Problem] = []
    bad_episode = None
    for row, data in enumerate(frames):
        episode = int(episode_ids[row])
        if episode == bad_episode:
            continue
        try:
            if data is None:
                raise FrameError("missing frame")
            decode_frame(bytes(data), camera, "")
        except FrameError as error:
            message = str(error).removeprefix(": ")
            if "camera says" in message:
                message += " (every frame of a camera has the size and codec of its first)"
            problems.append(Problem(file, column, message, episode, int(t[row])))
            bad_episode = episode
    return problems
