"""Rendering camera frames from a gymnasium environment: the one function `collect --frames`
and `ask` both call, so a policy is asked with frames made exactly as its data's were.
(Codecs and the column type are schemas/frames.py.)"""

from __future__ import annotations

from typing import Any

import numpy as np

from schemas.frames import CameraInfo


def parse_size(text: str) -> tuple[int, int]:
    """'64x64' or '84x96' (HEIGHTxWIDTH) as (height, width)."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a frame size is HEIGHTxWIDTH, e.g. 64x64; got {text!r}") from None
    if not (1 <= height <= 4096 and 1 <= width <= 4096):
        raise ValueError(f"a frame size is between 1x1 and 4096x4096; got {text!r}")
    return height, width


def resize_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """An H x W x 3 uint8 frame at (height, width): Pillow's area-averaging reduce and
    bilinear resampling (deterministic, the same on every machine)."""
    from PIL import Image

    if frame.shape[:2] == (height, width):
        return np.ascontiguousarray(frame, dtype=np.uint8)
    image = Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8))
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=2.0))


def render_frame(env: Any, height: int, width: int) -> np.ndarray:
    """The environment's `render()` (render_mode="rgb_array") at (height, width), uint8 RGB."""
    frame = env.render()
    if frame is None:
        raise ValueError(
            f"{env.spec.id if env.spec else env}: render() returned nothing; make the "
            "environment with render_mode='rgb_array' (classic-control envs need pygame)"
        )
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] not in (3, 4) or frame.dtype != np.uint8:
        raise ValueError(f"render() gave {frame.dtype} {frame.shape}; expected H x W x 3 uint8")
    return resize_frame(frame[:, :, :3], height, width)


def to_channels(frame: np.ndarray, channels: int) -> np.ndarray:
    """An H x W x 3 frame as a camera of `channels` stores it: itself, or H x W x 1
    grayscale (Pillow's ITU-R 601-2 luma, the conversion decoding a gray frame also uses)."""
    if channels == 3:
        return frame
    from PIL import Image

    return np.asarray(Image.fromarray(frame).convert("L"))[:, :, None]


def camera_frame(env: Any, camera: CameraInfo) -> np.ndarray:
    """The environment's frame as `camera` records it: its size and its channels."""
    return to_channels(render_frame(env, camera.height, camera.width), camera.channels)
