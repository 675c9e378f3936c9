"""Camera frames as an MP4 video for a LeRobot export, with LeRobot's own writer's settings
(lerobot/datasets/video_utils.py `encode_video_frames`, lerobot/configs/video.py): AV1 by
SVT-AV1 (`libsvtav1`, preset 12), H.264 (`libx264`) or HEVC (`libx265`), pixel format
yuv420p, a keyframe every 2 frames (g=2: LeRobot seeks to any frame cheaply), crf 30.
Encoding is schemas/video.py's `write_video`, the one encoder of the repo (the same one video
cameras use): deterministic, so a re-run export writes the same bytes. This module only
names the codec as the export's option does and says what info.json records per video
feature.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from schemas.frames import DEFAULT_CRF, DEFAULT_GOP
from schemas.video import PIX_FMT, write_video

# the export's --video-codec (LeRobot's names) -> the codec schemas/video.py encodes
CODECS = {"libsvtav1": "av1", "h264": "h264", "hevc": "hevc"}


@dataclass(frozen=True)
class VideoSettings:
    """What LeRobot records per video feature in info.json (`video.*` keys)."""

    codec: str  # the canonical codec name a decoder reports: "av1", "h264" or "hevc"
    height: int
    width: int
    fps: int
    pix_fmt: str = PIX_FMT
    g: int = DEFAULT_GOP
    crf: int | None = DEFAULT_CRF  # None: a copied camera's videos, their crf unknown

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


def encode_video(
    frames: Iterable[np.ndarray], path: str, fps: int, codec: str = "libsvtav1"
) -> tuple[VideoSettings, int]:
    """Encode `frames` (each H x W x C uint8, C = 1 or 3) into the local MP4 file `path`,
    one video frame per array at `fps`; the settings and the number of frames written.
    Bad frames or codec: a FrameError (schemas/frames.py)."""
    if codec not in CODECS:
        raise ValueError(f"video codec {codec!r}: choose one of {sorted(CODECS)}")
    count, height, width = write_video(frames, path, CODECS[codec], fps)
    return VideoSettings(codec=CODECS[codec], height=height, width=width, fps=fps), count


def camera_summary(parts: list[dict[str, str | None]]) -> dict[str, dict]:
    """Per camera, over the parts (each camera -> None where its episodes' videos were
    joined by stream copy, else why its frames were encoded): `joined` (the parts joined)
    and `encoded` (`{"part", "why"}` each): what the export's line and hindsight.json say."""
    out: dict[str, dict] = {}
    for part, cameras in enumerate(parts):
        for camera, why in cameras.items():
            entry = out.setdefault(camera, {"joined": [], "encoded": []})
            if why is None:
                entry["joined"].append(part)
            else:
                entry["encoded"].append({"part": part, "why": why})
    return out


def camera_note(camera: str, entry: dict, codec: str) -> str:
    """One camera's clause of the export's line: which parts were joined by stream copy,
    which encoded (into `codec`), and why (parts grouped by reason, the first two)."""
    notes = []
    if entry["joined"]:
        notes.append(f"joined by stream copy ({_parts(entry['joined'])})")
    reasons: dict[str, list[int]] = {}
    for encoded in entry["encoded"]:
        reasons.setdefault(encoded["why"], []).append(encoded["part"])
    if reasons:
        shown = [f"{_parts(parts)}: {why}" for why, parts in list(reasons.items())[:2]]
        more = "; ..." if len(reasons) > 2 else ""
        notes.append(f"encoded as {codec} ({'; '.join(shown)}{more})")
    return f"{camera} " + ", ".join(notes)


def _parts(parts: list[int]) -> str:
    shown = ", ".join(str(p) for p in parts[:5])
    return ("part " if len(parts) == 1 else "parts ") + shown + (", ..." if len(parts) > 5 else "")
