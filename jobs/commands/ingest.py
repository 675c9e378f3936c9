"""`hindsight ingest`: trajectories you already have into a new dataset version."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import CliPositionalArg

from engine import storage
from engine.sources import FORMATS
from engine.writer import DEFAULT_PART_STEPS
from jobs.command import NewDataset, RayCommand, Source, version_line
from schemas.manifest import SKIPPED_REPORT_NAME, Manifest


class Ingest(RayCommand):
    """Validate trajectories (nothing is written if any episode is bad, unless
    --on-error skip), then write them part by part as a new dataset version.

        hindsight ingest my_logs.h5 data/logs --format d4rl --env Pendulum-v1
        hindsight ingest s3://bucket/raw/ data/robot --format parquet --on-error skip
        hindsight ingest atari_logs.h5 data/pong --codec webp --quality 90   # uint8 frames

    uint8 image observations (and Parquet image columns) become cameras in the dataset's
    frames group, never flattened floats (docs/frames.md, "Ingesting images").
    """

    name = "ingest"
    job = True

    input: CliPositionalArg[Source] = Field(
        description="A D4RL .h5/.hdf5/.npz file, a Minari dataset directory, or Parquet/JSONL "
        "step tables (a file, a directory or a glob)."
    )
    output: CliPositionalArg[NewDataset] = Field(
        description="New dataset directory (local path or s3://bucket/prefix)."
    )
    format: Literal[FORMATS] | None = Field(  # type: ignore[valid-type]
        None, description="Input format; guessed from the path if unset."
    )
    env: str | None = Field(None, description="Environment id recorded per episode.")
    on_error: Literal["fail", "skip"] = Field(
        "fail",
        description="fail: write nothing if any episode is bad; skip: ingest the others and "
        f"write {SKIPPED_REPORT_NAME} saying what was skipped and why.",
    )
    part_steps: int = Field(
        DEFAULT_PART_STEPS, ge=1, description="Steps per part (whole episodes; one Ray task each)."
    )
    episode_column: str = Field("episode_id", description="Episode id column of step tables.")
    step_column: str = Field("t", description="Step index column of step tables.")
    codec: Literal["png", "jpeg", "webp"] = Field(
        "png",
        description="Codec of the frames of raw uint8 image arrays (docs/frames.md); "
        "images that arrive encoded (PNG/JPEG/WebP) are stored as they came.",
    )
    quality: int | None = Field(
        None, ge=1, le=100, description="JPEG/WebP quality (default 90); PNG is lossless."
    )

    def run(self) -> Manifest:
        from engine.ingest import ingest, plan_ingest

        # Reads boundaries and validates every episode before Ray starts or anything is written.
        plan = plan_ingest(
            self.input,
            format=self.format,
            env_id=self.env,
            on_error=self.on_error,
            part_steps=self.part_steps,
            episode_column=self.episode_column,
            step_column=self.step_column,
            codec=self.codec,
            quality=self.quality,
        )
        return ingest(plan, self.output, executor=self.executor(), command=self.history_line())

    def report(self, manifest: Manifest, seconds: float) -> str:
        line = version_line("ingested", manifest, self.output, seconds)
        cameras = {
            name: camera for group in manifest.groups for name, camera in group.cameras.items()
        }
        if cameras:
            line += "; cameras: " + ", ".join(
                f"{name} {c.height}x{c.width}x{c.channels} {c.codec}" for name, c in cameras.items()
            )
        if manifest.metadata.get("skipped_report"):
            line += (
                f"; skipped {manifest.metadata['skipped_episodes']} episode(s), "
                f"{manifest.metadata['truncated_tails']} truncated tail(s): see "
                f"{storage.join(storage.normalize(self.output), SKIPPED_REPORT_NAME)}"
            )
        return line
