"""Pixels in the policy: an image encoder per camera, and what a run records about frames.

The loader yields, per camera, `frame_<camera>`: uint8 [B, W, C * K, H, W] (channels first,
the K stacked frames oldest first, C channels each). Each camera gets its own encoder; the
uint8 frames become floats here, on the model's device (the loader never normalizes):
divided by 255, then, in runs whose config says `normalize: mean_frame` (every run since
the pixel experiment's diagnosis), the camera's mean frame subtracted and the result divided
by one standard deviation, both fitted on the first training batch (`FrameNormalizer`).
Every step of every window is encoded on its own, and the features of all cameras are
concatenated: [B, W, cameras * d_model]. trainers/models.py joins them with the state
vector.

Why the mean frame: Pendulum renders a thin rod on a white page, 4% of the pixels at
32x32. Divided by 255 alone, every input is ~1.0 and the signal is a small dip in a large
constant; the Nature CNN then learned the rod's angle but hardly its velocity (the
difference between stacked frames; R^2 0.44 after 300 steps), and the pixel policies acted
at random. With the background subtracted the same encoder reaches R^2 0.995 on the
velocity in the same steps (bench/pixel_probe.py, docs/trainer.md "Pixels"). On a black
page (the synthetic frames of tests/test_frames_train.py) / 255 already left the background
at 0; the fitted mean frame does that for any page.

Encoders (`--frame-encoder`):
  nature  the Nature DQN conv net (Mnih et al. 2015): conv 8x8/4 32, 4x4/2 64, 3x3/1 64,
          then a linear layer to d_model; below 64 pixels a side the strides shrink (2, 2, 1
          at 32x32) so that the last conv still sees at least 3x3 positions
  resnet  the small ResNet of IMPALA (Espeholt et al. 2018): three stages of conv 3x3,
          max-pool 3x3/2 and two residual blocks (16, 32, 32 channels), then a linear layer
          to d_model; each stage halves the frame, so any frame of 8x8 or more works

A run's model config holds the frames entry as plain data (`frames_config`): the cameras
with their CameraInfo, the frame stack, the encoder and what the policy sees (`inputs`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from schemas.frames import CameraInfo, frame_column

NATURE, RESNET = "nature", "resnet"
FRAME_ENCODERS = (NATURE, RESNET)
# What the policy sees of a step: the state vector, the frames, or both.
STATE, FRAMES, BOTH = "state", "frames", "state+frames"
INPUTS = (BOTH, FRAMES, STATE)
# How frames are normalized: the mean frame of the first training batch subtracted.
MEAN_FRAME = "mean_frame"


def frames_config(
    index: dict[str, Any],
    *,
    inputs: str | None = None,
    cameras: list[str] | None = None,
    encoder: str | None = None,
) -> dict[str, Any] | None:
    """The `frames` entry of a model config, or None when the policy sees no frames (then
    the model is exactly the one a dataset without frames gives).

    `inputs` None: both when the shards have cameras (frames alone when they hold no state
    vector), the state otherwise. `cameras` empty: every camera of the shards."""
    available = {name: camera_info(info) for name, info in (index.get("cameras") or {}).items()}
    has_state = math.prod((index.get("observation") or {}).get("shape") or [0]) > 0
    if inputs is None:
        inputs = (BOTH if has_state else FRAMES) if available else STATE
    if inputs not in INPUTS:
        raise ValueError(f"--inputs must be one of {list(INPUTS)}, got {inputs!r}")
    if inputs == STATE:
        if not has_state:
            raise ValueError("--inputs state: the shards hold no state vector, only frames")
        return None
    if not available:
        raise ValueError(
            f"--inputs {inputs}: the shards have no camera frames (shard a dataset that has a "
            "frames group, e.g. collected with --frames 64x64)"
        )
    if inputs == BOTH and not has_state:
        raise ValueError("--inputs state+frames: the shards hold no state vector; use --inputs frames")  # fmt: skip
    unknown = sorted(set(cameras or []) - set(available))
    if unknown:
        raise ValueError(
            f"camera(s) {unknown} are not in the shard index; available: {sorted(available)}"
        )
    encoder = encoder or NATURE
    if encoder not in FRAME_ENCODERS:
        raise ValueError(f"--frame-encoder must be one of {list(FRAME_ENCODERS)}, got {encoder!r}")
    chosen = cameras or sorted(available)
    frame_stack = int(index.get("frame_stack") or 1)
    for name in chosen:
        info = available[name]
        check_frame_size(encoder, info.height, info.width, name)
    entry = {
        "cameras": {name: available[name].model_dump(mode="json") for name in chosen},
        "frame_stack": frame_stack,
        "encoder": encoder,
        "inputs": inputs,
        # A frames entry without this key (runs before it existed) divides by 255 only.
        "normalize": MEAN_FRAME,
    }
    # A video camera's frames reach the shards decoded (as PNG): the dataset's camera says
    # which compression training saw, for `ask` to reproduce (trainers/ask_frames.py).
    sources = index.get("camera_sources") or {}
    collected = {
        name: camera_info(sources[name]).model_dump(mode="json")
        for name in chosen
        if name in sources
    }
    if collected:
        entry["collected_as"] = collected
    return entry


def camera_info(info: dict[str, Any]) -> CameraInfo:
    """A camera as the shard index describes it; facts beyond CameraInfo's (a byte count, say)
    are the index's business, not the model's, and are left out of the run's config."""
    return CameraInfo.model_validate(
        {k: v for k, v in info.items() if k in CameraInfo.model_fields}
    )


# --- the Nature CNN ---------------------------------------------------------------------------

_NATURE_LAYERS = ((32, 8), (64, 4), (64, 3))  # (channels, kernel) of the three convs
_NATURE_STRIDES = ((4, 2, 1), (2, 2, 1), (2, 1, 1), (1, 1, 1))  # from 84x84 down to 15x15


def _conv_size(size: int, strides: tuple[int, ...]) -> int:
    for (_, kernel), stride in zip(_NATURE_LAYERS, strides, strict=True):
        size = (size - kernel) // stride + 1 if size >= kernel else 0
    return size


def nature_strides(height: int, width: int) -> tuple[int, int, int]:
    """The Nature strides (4, 2, 1) where the frame is big enough that the last conv sees at
    least 3x3 positions (64x64 and up), smaller strides for smaller frames."""
    for strides in _NATURE_STRIDES:
        if min(_conv_size(height, strides), _conv_size(width, strides)) >= 3:
            return strides  # type: ignore[return-value]
    raise ValueError(f"frames of {height}x{width} are too small for the nature encoder (15x15 at least)")  # fmt: skip


class NatureCNN(nn.Module):
    """Conv 8x8 32, 4x4 64, 3x3 64 (ReLU after each), then linear to `features` and ReLU."""

    def __init__(self, channels: int, height: int, width: int, features: int):
        super().__init__()
        strides = nature_strides(height, width)
        layers: list[nn.Module] = []
        for (out_channels, kernel), stride in zip(_NATURE_LAYERS, strides, strict=True):
            layers += [nn.Conv2d(channels, out_channels, kernel, stride), nn.ReLU()]
            channels = out_channels
        self.convs = nn.Sequential(*layers, nn.Flatten())
        flat = channels * _conv_size(height, strides) * _conv_size(width, strides)
        self.project = nn.Sequential(nn.Linear(flat, features), nn.ReLU())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.convs(images))


# --- the IMPALA ResNet ------------------------------------------------------------------------

_RESNET_STAGES = (16, 32, 32)


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(torch.relu(x))))


class ResNetEncoder(nn.Module):
    """IMPALA's small ResNet: per stage conv 3x3, max-pool 3x3/2, two residual blocks; then
    ReLU, linear to `features` and ReLU."""

    def __init__(self, channels: int, height: int, width: int, features: int):
        super().__init__()
        layers: list[nn.Module] = []
        for out_channels in _RESNET_STAGES:
            layers += [
                nn.Conv2d(channels, out_channels, 3, padding=1),
                nn.MaxPool2d(3, stride=2, padding=1),
                _ResidualBlock(out_channels),
                _ResidualBlock(out_channels),
            ]
            channels = out_channels
            height, width = (height + 1) // 2, (width + 1) // 2
        self.stages = nn.Sequential(*layers, nn.ReLU(), nn.Flatten())
        self.project = nn.Sequential(nn.Linear(channels * height * width, features), nn.ReLU())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.stages(images))


_ENCODERS: dict[str, type[nn.Module]] = {NATURE: NatureCNN, RESNET: ResNetEncoder}


def check_frame_size(encoder: str, height: int, width: int, camera: str) -> None:
    """A clear error, before any training, for frames too small for the encoder."""
    if encoder == NATURE:
        try:
            nature_strides(height, width)
        except ValueError as error:
            raise ValueError(f"camera {camera!r}: {error}; try --frame-encoder resnet") from None
    elif min(height, width) < 8:
        raise ValueError(f"camera {camera!r}: frames of {height}x{width} are below 8x8")


class FrameNormalizer(nn.Module):
    """x / 255, minus the camera's mean frame, divided by one standard deviation (the
    pixels' spread around that mean); both fitted on the first batch seen in training and
    saved with the weights, so that `ask` normalizes exactly as training did. Before it is
    fitted (mean 0, std 1) it is x / 255."""

    def __init__(self, channels: int, height: int, width: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels, height, width))
        self.register_buffer("std", torch.ones(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.known_fitted = False  # read `fitted` (a device sync) only until it is True

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> None:
        """From uint8 [N, C, H, W], the frames of real steps (not left padding)."""
        if len(images) < 2:
            return
        scaled = images.float() / 255.0
        self.mean.copy_(scaled.mean(0))
        self.std.copy_((scaled - self.mean).std().clamp(min=1e-3))
        self.fitted.fill_(True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255.0 - self.mean) / self.std


class FrameEncoder(nn.Module):
    """Every camera's frames, uint8 [B, W, C * K, H, W], to features [B, W, cameras * d_model]
    (one encoder per camera; normalized on the device: `FrameNormalizer`, or /255 in runs
    from before it)."""

    def __init__(self, frames: dict[str, Any], d_model: int):
        super().__init__()
        stack = int(frames["frame_stack"])
        self.shapes = {}
        encoders = {}
        for camera, info in frames["cameras"].items():
            shape = camera_info(info)
            channels = shape.channels * stack
            self.shapes[camera] = (channels, shape.height, shape.width)
            encoders[camera] = _ENCODERS[frames["encoder"]](
                channels, shape.height, shape.width, d_model
            )
        self.encoders = nn.ModuleDict(encoders)
        self.output_dim = len(encoders) * d_model
        self.normalizers = (
            nn.ModuleDict({camera: FrameNormalizer(*self.shapes[camera]) for camera in encoders})
            if frames.get("normalize") == MEAN_FRAME
            else None
        )

    def normalized(self, camera: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A camera's frames as the conv net sees them: float [B * W, C * K, H, W]. The first
        call in training fits the normalizer on the batch's real steps (mask True)."""
        frames = batch[frame_column(camera)]
        images = frames.reshape(-1, *frames.shape[2:])
        if self.normalizers is None:
            return images.float() / 255.0
        normalizer = self.normalizers[camera]
        if self.training and not normalizer.known_fitted:
            if not bool(normalizer.fitted):
                mask = batch.get("mask")
                normalizer.fit(images if mask is None else images[mask.reshape(-1)])
            normalizer.known_fitted = bool(normalizer.fitted)
        return normalizer(images)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        features = []
        for camera, encoder in self.encoders.items():
            column = frame_column(camera)
            if column not in batch:
                raise KeyError(f"batch has no frames of camera {camera!r} (key {column!r})")
            frames = batch[column]
            if frames.dtype != torch.uint8 or tuple(frames.shape[2:]) != self.shapes[camera]:
                raise ValueError(
                    f"{column}: expected uint8 [B, W, {', '.join(map(str, self.shapes[camera]))}]"
                    f", got {str(frames.dtype).removeprefix('torch.')} {list(frames.shape)}"
                )
            batch_size, window = frames.shape[:2]
            images = self.normalized(camera, batch)
            features.append(encoder(images).reshape(batch_size, window, -1))
        return features[0] if len(features) == 1 else torch.cat(features, dim=-1)
