"""The frames a rollout of a policy trained on pixels feeds (`hindsight ask`): each step
rendered by the function `collect --frames` used, through the camera's codec, stacked and
windowed as the loader feeds them in training."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engine.frames import render_frame, to_channels
from schemas.frames import DEFAULT_CAMERA, CameraInfo, decode_frame, encode_frame, frame_column
from schemas.video import CausalVideo
from trainers.options import RunConfig


def check_renderable(config: RunConfig, run_dir: str) -> None:
    """A run trained on frames can be asked only if its cameras are the environment's own
    render (the camera `collect --frames` records): nothing else can be rendered here."""
    cameras = sorted((config.model.get("frames") or {}).get("cameras") or {})
    others = [camera for camera in cameras if camera != DEFAULT_CAMERA]
    if others:
        raise ValueError(
            f"{run_dir} was trained on camera(s) {others}; ask renders only the environment's "
            f"own camera {DEFAULT_CAMERA!r} (train with --cameras {DEFAULT_CAMERA} "
            "or --inputs state to ask this way)"
        )


def as_stored(frame: np.ndarray, camera: CameraInfo) -> np.ndarray:
    """A rendered H x W x 3 frame as training saw it after storage and decoding: grayscale
    for a 1-channel camera, and through the camera's codec (PNG is lossless: its round trip
    is the identity and is skipped)."""
    frame = to_channels(frame, camera.channels)
    if camera.codec == "png":
        return frame
    return decode_frame(encode_frame(frame, camera), camera, f"ask: camera {DEFAULT_CAMERA}")


class RolloutFrames:
    """The frames a rollout feeds, as the loader feeds them in training: per episode, each
    step's render (`as_stored`), channels first; the last K stacked, oldest first, the
    episode's first frame repeated before its first step; over the last `window` steps,
    zeros where the window reaches before the episode (left padding)."""

    def __init__(self, frames: dict[str, Any], episodes: int, window: int):
        cameras = frames["cameras"]
        if set(cameras) != {DEFAULT_CAMERA}:
            raise ValueError(f"ask renders only the {DEFAULT_CAMERA!r} camera, not {sorted(cameras)}")  # fmt: skip
        self.camera = CameraInfo.model_validate(cameras[DEFAULT_CAMERA])
        # Training saw a video camera's frames through its video codec (the shards hold
        # them decoded): the rollout's frames go through it too.
        collected = (frames.get("collected_as") or {}).get(DEFAULT_CAMERA)
        source = CameraInfo.model_validate(collected) if collected else None
        self.videos = (
            [CausalVideo(source) for _ in range(episodes)]
            if source and source.is_video and not source.copied
            else None
        )
        self.stack = int(frames["frame_stack"])
        channels, height, width = self.camera.channels, self.camera.height, self.camera.width
        self.recent = np.zeros((episodes, self.stack, channels, height, width), np.uint8)
        self.context = np.zeros((episodes, window, self.stack * channels, height, width), np.uint8)
        self.steps = 0

    def observe(self, envs: list[Any], done: np.ndarray) -> None:
        """Render this step of every episode still running (a finished one keeps its last)."""
        frames = self.recent[:, -1].copy()
        for i, env in enumerate(envs):
            if not done[i]:
                rendered = render_frame(env, self.camera.height, self.camera.width)
                if self.videos is not None:
                    seen = self.videos[i](to_channels(rendered, self.camera.channels))
                else:
                    seen = as_stored(rendered, self.camera)
                frames[i] = seen.transpose(2, 0, 1)
        if self.steps == 0:
            self.recent[:] = frames[:, None]  # before the first step, the first frame repeats
        else:
            self.recent[:, :-1] = self.recent[:, 1:]
            self.recent[:, -1] = frames
        self.context[:, :-1] = self.context[:, 1:]
        self.context[:, -1] = self.recent.reshape(self.context.shape[0], *self.context.shape[2:])
        self.steps += 1

    def batch(self, device: str) -> dict[str, torch.Tensor]:
        return {frame_column(DEFAULT_CAMERA): torch.from_numpy(self.context.copy()).to(device)}
