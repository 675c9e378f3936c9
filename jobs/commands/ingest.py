"""`hindsight ingest`: trajectories you already have into a new dataset version."""

from __future__ import annotations

import re
import sys
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import CliPositionalArg, NoDecode

from engine import storage
from engine.sources import FORMATS
from engine.writer import DEFAULT_PART_STEPS
from jobs.command import NewDataset, RayCommand, Source, version_line
from schemas.frames import Codec
from schemas.manifest import SKIPPED_REPORT_NAME, Manifest

# Where the next NAME= pair of `--map` starts (a source column may hold a comma).
_NEXT_PAIR = re.compile(r",\s*(?=[A-Za-z_][A-Za-z0-9_]*=)")


class Ingest(RayCommand):
    """Validate trajectories (nothing is written if any episode is bad, unless
    --on-error skip), then write them part by part as a new dataset version.

        hindsight ingest my_logs.h5 data/logs --format d4rl --env Pendulum-v1
        hindsight ingest s3://bucket/raw/ data/robot --format parquet --on-error skip
        hindsight ingest atari_logs.h5 data/pong --codec webp --quality 90   # uint8 frames
        hindsight ingest ~/lerobot/pusht data/pusht --format lerobot   # v3.0/v2.1, or s3://
        hindsight ingest logs/ data/logs --map observation=obs.state,episode_id=episode

    uint8 image observations (and Parquet image columns) become cameras in the dataset's
    frames group, never flattened floats (docs/frames.md, "Ingesting images").
    """

    name = "ingest"
    job = True

    input: CliPositionalArg[Source] = Field(
        description="A D4RL .h5/.hdf5/.npz file, a Minari dataset directory, a LeRobot "
        "dataset directory (v3.0 or v2.1: meta/info.json), or Parquet/JSONL step tables "
        "(a file, a directory searched recursively, or a glob)."
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
    # NoDecode: the command line hands the text over whole (repeated options joined by
    # commas); `_pairs` splits it where the next `NAME=` starts.
    map: Annotated[dict[str, str], NoDecode] = Field(
        default={},
        description="Step tables: which source column holds each of hindsight's columns, "
        "NAME=SOURCE (comma-separated or repeated): episode_id, t, observation, action, "
        "reward, terminated, truncated, next_observation. LeRobot: observation, action, "
        "reward, terminated name other features (default observation.state, action, "
        "next.reward, next.done).",
        json_schema_extra={"metavar": "NAME=SOURCE,..."},
    )
    episode_column: str | None = Field(None, description="Deprecated: use --map episode_id=COLUMN.")
    step_column: str | None = Field(None, description="Deprecated: use --map t=COLUMN.")
    codec: Codec | None = Field(
        None,
        description="Codec of the frames of raw uint8 image arrays (docs/frames.md): an "
        "image per step, or h264/av1/hevc one video per episode (default png). Images that "
        "arrive encoded (PNG/JPEG/WebP) are stored as they came; LeRobot H.264/AV1/HEVC videos "
        "are copied as they came unless --codec is given (then decoded and encoded).",
    )
    quality: int | None = Field(
        None,
        ge=1,
        le=100,
        description="JPEG/WebP quality (default 90); not for png and webp-lossless.",
    )

    @field_validator("map", mode="before")
    @classmethod
    def _pairs(cls, value: Any) -> Any:
        """`NAME=SOURCE` strings (the command line, or a list in a spec) into a mapping."""
        if isinstance(value, str):
            value = _NEXT_PAIR.split(value) if value.strip() else []
        if isinstance(value, list):
            pairs: dict[str, str] = {}
            for pair in value:
                name, sep, source = str(pair).partition("=")
                if not sep or not name.strip() or not source.strip():
                    raise ValueError(f"expected NAME=SOURCE, got {pair!r}")
                if name.strip() in pairs:
                    raise ValueError(f"{name.strip()!r} is mapped twice")
                pairs[name.strip()] = source.strip()
            return pairs
        return value

    @model_validator(mode="after")
    def _old_column_options(self) -> Ingest:
        """--episode-column / --step-column are `--map episode_id=` / `--map t=`."""
        for option, name in (("episode_column", "episode_id"), ("step_column", "t")):
            column = getattr(self, option)
            if column is None:
                continue
            if self.map.get(name, column) != column:
                raise ValueError(f"--{option.replace('_', '-')} and --map {name}= disagree")
            self.map = {**self.map, name: column}
        return self

    def run(self) -> Manifest:
        from engine.ingest import ingest, plan_ingest

        if self.episode_column or self.step_column:
            print(
                "ingest: --episode-column and --step-column are deprecated; use "
                f"--map {','.join(f'{k}={v}' for k, v in self.map.items())}",
                file=sys.stderr,
            )

        # Reads boundaries and validates every episode before Ray starts or anything is written.
        plan = plan_ingest(
            self.input,
            format=self.format,
            env_id=self.env,
            on_error=self.on_error,
            part_steps=self.part_steps,
            column_map=self.map,
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
            origins = manifest.metadata.get("frames_from", {})
            plans = manifest.metadata.get("lerobot", {}).get("video_cameras", {})
            line += "; cameras: " + ", ".join(
                f"{name} {c.height}x{c.width}x{c.channels} {c.codec}"
                + copied_note(origins.get(name, {}), plans.get(name))
                for name, c in cameras.items()
            )
        absent = [n for n in ("reward", "terminated", "truncated") if manifest.metadata.get(n)]
        if absent:
            line += "; " + ", ".join(f"{name}: {manifest.metadata[name]}" for name in absent)
        if manifest.metadata.get("skipped_report"):
            line += (
                f"; skipped {manifest.metadata['skipped_episodes']} episode(s), "
                f"{manifest.metadata['truncated_tails']} truncated tail(s): see "
                f"{storage.join(storage.normalize(self.output), SKIPPED_REPORT_NAME)}"
            )
        return line


def copied_note(origin: dict[str, Any], planned: str | None = None) -> str:
    """How a copied camera's episodes were stored: copied, or decoded and encoded (why);
    for a LeRobot video camera that could not be copied, why (`planned`: the plan's
    `lerobot.video_cameras` entry; not said when --codec asked for it)."""
    if not origin.get("copied"):
        if planned and not planned.startswith("copied") and not planned.endswith("(--codec)"):
            return f" ({planned})"
        return ""
    note = f" (copied: {origin['copied_episodes']} episodes"
    if origin.get("reencoded_episodes"):
        first = origin["reencoded"][0]
        note += (
            f"; {origin['reencoded_episodes']} decoded and encoded, e.g. episode "
            f"{first['episode']}: {first['why']}"
        )
    return note + ")"
