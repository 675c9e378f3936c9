"""`hindsight collect`: roll out a gymnasium environment into a new dataset version."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator
from pydantic_settings import CliPositionalArg

from jobs.command import NewDataset, RayCommand, version_line
from schemas.frames import (
    DEFAULT_CAMERA,
    DEFAULT_QUALITY,
    VIDEO_CODECS,
    CameraInfo,
    Codec,
    check_quality,
    frame_column,
)
from schemas.manifest import Manifest


class Collect(RayCommand):
    """Roll out a gymnasium environment at several epsilon-noise levels into a new dataset,
    so that it holds good and bad episodes.

        hindsight collect Pendulum-v1 data/pendulum --episodes 200 --noise 0,0.25,0.5,0.75,1.0
        hindsight collect hindsight/PointGoal-v0 data/point --policy random
        hindsight collect Pendulum-v1 data/pend-pix --episodes 300 --frames 64x64
        hindsight collect CartPole-v1 data/cart-pix --frames 64x64 --pixels-only
        hindsight collect BabyAI-GoToLocal-v0 data/babyai --policy bot:play --noise 0.2
    """

    name = "collect"
    job = True

    env: CliPositionalArg[str] = Field(description="Gymnasium environment id, e.g. Pendulum-v1.")
    output: CliPositionalArg[NewDataset] = Field(
        description="New dataset directory (local path or s3://bucket/prefix)."
    )
    episodes: int = Field(100, ge=1, description="Number of episodes to roll out.")
    noise: list[float] = Field(
        default=[0.0],
        description="Epsilon-noise levels; episode e uses noise[e mod len(noise)].",
        json_schema_extra={"metavar": "LEVEL,..."},
    )
    policy: str = Field(
        "heuristic",
        description="random, heuristic (built-in for classic control and PointGoal), bot, "
        "bot:play (BabyAI's bot on MiniGrid/BabyAI: pursues the mission, or a random object "
        "of the room) or module:function called as function(observation) -> action.",
    )
    seed: int = Field(0, description="Base seed; episode e is seeded from (seed, e).")
    max_steps: int | None = Field(None, ge=1, description="Override the env's time limit.")
    episodes_per_part: int = Field(
        50, ge=1, description="Episodes per part (one Ray task and one file per part)."
    )
    frames: str | None = Field(
        None,
        description="Also record the env's rendered frames at HEIGHTxWIDTH (e.g. 64x64), "
        "one per step, as camera frames.",
        json_schema_extra={"metavar": "HxW"},
    )
    camera: str = Field(DEFAULT_CAMERA, description="Name of the camera --frames records.")
    codec: Codec = Field(
        "png",
        description="Frame codec: png or webp-lossless (lossless), jpeg or webp (lossy), an "
        "image per step; or h264, av1 or hevc (one video per episode; even height and width, "
        "hevc at least 32x32).",
    )
    gop: int | None = Field(
        None, ge=1, description="Video: a keyframe every GOP frames (default 2, LeRobot's)."
    )
    quality: int | None = Field(
        None,
        ge=1,
        le=100,
        description="JPEG/WebP quality (default 90); not for the lossless codecs.",
    )
    channels: int = Field(
        3, description="Frame channels: 3 (RGB) or 1 (grayscale, a third of the pixels)."
    )
    pixels_only: bool = Field(
        False,
        description="Store no state vector: the frames are the observation (needs --frames; "
        "the policy still acts on the env's state).",
    )

    @field_validator("noise")
    @classmethod
    def _noise_is_a_probability(cls, noise: list[float]) -> list[float]:
        if not noise or any(not 0.0 <= level <= 1.0 for level in noise):
            raise ValueError(f"noise levels are probabilities in [0, 1], got {noise}")
        return noise

    @model_validator(mode="after")
    def _frame_options_go_with_frames(self) -> Collect:
        if self.channels not in (1, 3):
            raise ValueError(f"--channels is 1 (grayscale) or 3 (RGB), got {self.channels}")
        if self.pixels_only and self.frames is None:
            raise ValueError("--pixels-only needs --frames HxW: the frames are the observation")
        if self.frames is not None:
            self.camera_info()  # a bad size or camera name is an error before any work
        elif (self.codec, self.quality, self.camera, self.channels, self.gop) != (
            "png",
            None,
            DEFAULT_CAMERA,
            3,
            None,
        ):
            raise ValueError("--camera, --codec, --quality, --gop and --channels need --frames HxW")
        return self

    def camera_info(self) -> CameraInfo | None:
        """The camera --frames records, or None without frames."""
        from engine.frames import parse_size

        if self.frames is None:
            return None
        frame_column(self.camera)  # letters, digits and underscores
        check_quality(self.codec, self.quality)
        if self.gop is not None and self.codec not in VIDEO_CODECS:
            raise ValueError(f"--gop is for h264, av1 and hevc video, not {self.codec}")
        height, width = parse_size(self.frames)
        quality = self.quality or DEFAULT_QUALITY.get(self.codec)
        return CameraInfo(
            height=height,
            width=width,
            channels=self.channels,
            codec=self.codec,
            quality=quality,
            gop=self.gop,
        )

    def run(self) -> Manifest:
        from engine.collect import Rollouts, collect, plan_collect

        rollouts = Rollouts(
            env_id=self.env,
            policy=self.policy,
            noise_levels=tuple(self.noise),
            seed=self.seed,
            max_steps=self.max_steps,
            frames=self.camera_info(),
            camera=self.camera,
            pixels_only=self.pixels_only,
        )
        # An unknown env id or policy fails here, before Ray starts.
        plan = plan_collect(rollouts, self.episodes, self.episodes_per_part)
        return collect(plan, self.output, executor=self.executor(), command=self.history_line())

    def report(self, manifest: Manifest, seconds: float) -> str:
        return version_line("collected", manifest, self.output, seconds)
