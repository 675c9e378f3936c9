"""Ingest trajectories from the formats people already have (engine/sources/, one module
per format: D4RL-style HDF5/NPZ arrays, Minari datasets, Parquet and JSON Lines step tables).

Ingest runs in two passes:

    plan = plan_ingest("logs.h5", on_error="skip")       # cheap pass: validate, cut parts
    manifest = ingest(plan, "data/pendulum", executor=InProcess(), command="...")

`plan_ingest` picks the format (`--format`, or the first source that recognizes the path),
lets its source read only what is cheap (episode boundaries, rewards, info columns,
schemas), and fails with every problem found before anything is written, unless the user
asked to skip bad episodes. `ingest` then reads and writes each part in a task of the
executor (one Ray task per part in jobs) through the version writer, writes the skipped
report, and commits the manifest last; any failure removes what was staged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine.executor import Executor
from engine.sources import IngestPlan, Part, PlanOptions, Source, detect_format, source_for
from engine.validate import ValidationError
from engine.writer import DEFAULT_PART_STEPS, VersionWriter, WrittenPart, base_manifest
from schemas import steps as cols
from schemas.manifest import SKIPPED_REPORT_NAME, Manifest

ON_ERROR = ("fail", "skip")


def plan_ingest(
    source: str,
    *,
    format: str | None = None,
    env_id: str | None = None,
    on_error: str = "fail",
    part_steps: int = DEFAULT_PART_STEPS,
    episode_column: str = cols.EPISODE_ID,
    step_column: str = cols.T,
) -> IngestPlan:
    """Read boundaries, validate, and cut the source into parts (nothing is written).

    Raises ValidationError listing the problems: any problem with `on_error="fail"`, a
    problem of a whole file (which cannot be skipped) in any case."""
    if on_error not in ON_ERROR:
        raise ValueError(f"--on-error must be one of {ON_ERROR}, not {on_error!r}")
    reader = source_for(format or detect_format(source))
    options = PlanOptions(
        env_id=env_id,
        part_steps=part_steps,
        episode_column=episode_column,
        step_column=step_column,
    )
    plan = reader.plan(source, options)
    fatal = [p for p in plan.skipped if p.episode is None]
    if fatal or (plan.skipped and on_error == "fail"):
        hint = (
            ""
            if fatal
            else "Re-run with --on-error skip to ingest the other episodes and write a report."
        )
        raise ValidationError(fatal or plan.skipped, hint)
    if plan.steps == 0:
        raise ValueError(f"{source}: no episodes left to ingest")
    return plan


# ---------------------------------------------------------------- writing parts


@dataclass(frozen=True)
class IngestTask:
    """One part to read with its source and write as part `index` (a task of the executor)."""

    index: int
    source: Source
    part: Part
    writer: VersionWriter


def part_tasks(plan: IngestPlan, writer: VersionWriter) -> list[IngestTask]:
    """The tasks of a plan: one per part, writing with `writer`."""
    source = source_for(plan.format)
    return [IngestTask(index, source, part, writer) for index, part in enumerate(plan.parts)]


def ingest_part(task: IngestTask) -> WrittenPart:
    """Read, convert and write one part (runs in a Ray task)."""
    steps, episodes = task.source.read_part(task.part)
    return task.writer.write_part(task.index, steps, episodes)


def ingest_metadata(plan: IngestPlan) -> dict[str, Any]:
    """What the manifest records about the source, and where the skipped report is."""
    metadata: dict[str, Any] = {
        "env_id": plan.env_id,
        "source_format": plan.format,
        "source": plan.source,
        "episode_info_columns": plan.episode_info_columns,
        **plan.metadata,
    }
    if plan.skipped or plan.truncated_tails:
        metadata.update(
            skipped_report=SKIPPED_REPORT_NAME,
            skipped_episodes=plan.skipped_report()["skipped_episodes"],
            truncated_tails=len(plan.truncated_tails),
        )
    return metadata


def write_skipped_report(writer: VersionWriter, plan: IngestPlan) -> None:
    """`skipped.json`: the episodes left out and why, and the tails kept as truncated."""
    report = json.dumps(plan.skipped_report(), indent=2, default=str) + "\n"
    writer.write_file(SKIPPED_REPORT_NAME, report.encode())


def ingest(plan: IngestPlan, output: str, *, executor: Executor, command: str) -> Manifest:
    """Write a plan's parts as a new committed version at `output` and return its manifest.

    Parts are read and written by `executor`, the skipped report (if anything was skipped
    or kept truncated) is written next, the manifest last. On any failure nothing is left:
    no staged files, no version."""
    with VersionWriter(output) as writer:
        written = executor.map(
            ingest_part,
            part_tasks(plan, writer),
            description=f"ingest {plan.format}",
            total=plan.steps,
        )
        if plan.skipped or plan.truncated_tails:
            write_skipped_report(writer, plan)
        manifest = base_manifest(
            writer.uri,
            written,
            operation="ingest",
            command=command,
            metadata=ingest_metadata(plan),
            details={"format": plan.format, "source": plan.source},
        )
        writer.commit(manifest)
    return manifest
