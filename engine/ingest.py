"""Ingest trajectories from the formats people already have (engine/sources/, one module
per format: D4RL-style HDF5/NPZ arrays, Minari datasets, Parquet and JSON Lines step tables).

Ingest runs in two passes:

    plan = plan_ingest("logs.h5", on_error="skip")       # cheap pass: validate, cut parts
    manifest = ingest(plan, "data/pendulum", executor=InProcess(), command="...")

`plan_ingest` picks the format (`--format`, or the first source that recognizes the path),
lets its source read only what is cheap (episode boundaries, rewards, flags, info columns,
schemas), and fails with every problem found before anything is written, unless the user
asked to skip bad episodes. `ingest` then reads and writes each part in a task of the
executor (one Ray task per part in jobs) through the version writer, writes the skipped
report, and commits the manifest last; any failure removes what was staged.

Each task checks its part's tables as they will be stored (`check_stored_values`: the
observations, actions and rewards after their conversion to float32) before it writes
them: values are checked where they are stored, without a second read of the source. Its
problems come back to the driver as data: with `--on-error fail` the job then fails
listing all of them and leaves nothing; with `--on-error skip` the task has left those
episodes out and the report lists them.

Some problems only show when a part is read (a damaged video): a source's `read_part`
then returns a `PartRead`, its tables without those episodes and a problem for each, and
they join the stored values' problems (fail, or the report).

Images become frames, never flattened floats (engine/sources/images.py): a source names
its cameras in the plan (`IngestPlan.images`, `cameras`), its `read_part` returns their
encoded frames next to the base tables (raw uint8 frames encoded in the task, a chunk of
rows at a time; encoded ones as they came), each task checks the frames that came encoded
(decoded once: whole, of the camera's size and codec) and writes them as the `frames`
group's part next to its base part; the manifest records the cameras. A video the source
can hand over as it is (LeRobot's MP4s, `ImageColumn.copied`) comes as one video per
episode (`PartRead.videos`) and is written as it came; `frames_from` in the manifest counts
its episodes copied and re-encoded (`copy_summary`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.executor import Executor
from engine.sources import (
    FORMATS,
    IngestPlan,
    Part,
    PlanOptions,
    Source,
    detect_format,
    source_for,
)
from engine.sources.base import Frames, PartRead, Videos
from engine.sources.images import check_encoded_frames, step_camera
from engine.validate import Problem, ValidationError, check_stored_values
from engine.writer import DEFAULT_PART_STEPS, VersionWriter, WrittenPart, base_manifest
from schemas import steps as cols
from schemas.frames import (
    CODECS,
    FRAMES_GROUP,
    VIDEO_CODECS,
    CameraInfo,
    check_quality,
    decode_frames,
    frames_table,
)
from schemas.manifest import SKIPPED_REPORT_NAME, Manifest
from schemas.video import encode_video

ON_ERROR = ("fail", "skip")
SKIP_HINT = "Re-run with --on-error skip to ingest the other episodes and write a report."


def plan_ingest(
    source: str,
    *,
    format: str | None = None,
    env_id: str | None = None,
    on_error: str = "fail",
    part_steps: int = DEFAULT_PART_STEPS,
    column_map: Mapping[str, str] | None = None,
    codec: str | None = None,
    quality: int | None = None,
) -> IngestPlan:
    """Read boundaries, validate, and cut the source into parts (nothing is written).

    `column_map` (`--map`): hindsight's step column -> the source column that holds it,
    for formats that read columns by name (step tables). Raises ValidationError listing
    the problems: any problem with `on_error="fail"`, a problem of a whole file (which
    cannot be skipped) in any case."""
    if on_error not in ON_ERROR:
        raise ValueError(f"--on-error must be one of {ON_ERROR}, not {on_error!r}")
    if codec is not None and codec not in (*CODECS, *VIDEO_CODECS):
        raise ValueError(f"--codec must be one of {(*CODECS, *VIDEO_CODECS)}, not {codec!r}")
    check_quality(codec or "png", quality)
    reader = source_for(format or detect_format(source))
    if column_map and not reader.takes_column_map:
        takers = ", ".join(n for n in FORMATS if source_for(n).takes_column_map)
        raise ValueError(
            f"--map renames the columns of formats that read columns by name ({takers}); "
            f"format {reader.name!r} has its own layout"
        )
    options = PlanOptions(
        env_id=env_id,
        part_steps=part_steps,
        column_map=tuple((column_map or {}).items()),
        codec=codec,
        quality=quality,
    )
    plan = replace(reader.plan(source, options), on_error=on_error)
    fatal = [p for p in plan.skipped if p.episode is None]
    if fatal or (plan.skipped and on_error == "fail"):
        raise ValidationError.of(fatal or plan.skipped, "" if fatal else SKIP_HINT)
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
    file: str = ""  # what problems found in the part's values name
    on_error: str = "fail"


@dataclass(frozen=True)
class IngestedPart:
    """What one part's task sends back: the files written (None when nothing was: every
    episode had a problem, or one did under --on-error fail) and the problems found in the
    values to be stored."""

    written: WrittenPart | None
    problems: list[Problem]
    steps: int  # rows read: moves the progress bar
    frames: WrittenPart | None = None  # the part's frames (next to `written`), if any
    # Copied cameras: camera -> [episodes copied, episodes re-encoded], and why each of
    # those was (camera, episode, why); only episodes written count.
    copied: dict[str, list[int]] = field(default_factory=dict)
    reencoded: list[tuple[str, int, str]] = field(default_factory=list)


def part_tasks(plan: IngestPlan, writer: VersionWriter) -> list[IngestTask]:
    """The tasks of a plan: one per part, writing with `writer`."""
    source = source_for(plan.format)
    return [
        IngestTask(index, source, part, writer, part.file or plan.source, plan.on_error)
        for index, part in enumerate(plan.parts)
    ]


def ingest_part(task: IngestTask) -> IngestedPart:
    """Read, convert, check and write one part (runs in a Ray task), and its frames next
    to it. Episodes whose stored values or frames have problems are left out; under
    --on-error fail a part with problems writes nothing, since the job will fail."""
    read = part_read(task.source.read_part(task.part))
    if not read.episodes.num_rows:  # the source left every episode out while reading
        return IngestedPart(None, read.left_out, task.part.steps)
    steps, episodes, frames, copied = read.steps, read.episodes, read.frames, read.videos
    problems = [*read.left_out, *check_stored_values(task.file, steps, episodes)]
    problems += check_frames(task.file, task.part, steps, frames)
    if problems:
        if task.on_error == "fail":
            return IngestedPart(None, problems, task.part.steps)
        left_out = {p.episode for p in problems}
        frames = frames_without_episodes(steps, frames, left_out)
        copied = videos_without_episodes(episodes, copied, left_out)
        steps, episodes = without_episodes(steps, episodes, left_out)
    if not episodes.num_rows:
        return IngestedPart(None, problems, task.part.steps)
    written = task.writer.write_part(task.index, steps, episodes)
    frames_written = None
    if frames or copied:
        cameras = task.part.cameras
        videos = {name: data for name, data in frames.items() if cameras[name].is_video}
        images = {name: data for name, data in frames.items() if name not in videos}
        if videos:
            videos = episode_videos(steps, episodes, videos, cameras)
        videos |= copied
        frames_written = task.writer.write_part(
            task.index,
            frames_table(images) if images else None,
            frames_table(videos) if videos else None,
            group=FRAMES_GROUP,
        )
    kept = set(episodes.column(cols.EPISODE_ID).to_pylist())
    reencoded = [r for r in read.reencoded if r[1] in kept]
    counts = {}
    for name in copied:
        again = sum(camera == name for camera, _, _ in reencoded)
        counts[name] = [len(kept) - again, again]
    return IngestedPart(written, problems, task.part.steps, frames_written, counts, reencoded)


def episode_videos(
    steps: pa.Table, episodes: pa.Table, frames: Frames, cameras: Mapping[str, CameraInfo]
) -> Frames:
    """Video cameras' frames (one PNG per step, in step order) as one video per episode,
    in the order of the episodes table: decoded and encoded an episode at a time."""
    ids = steps.column(cols.EPISODE_ID).to_numpy()
    starts = np.concatenate([[0], np.flatnonzero(np.diff(ids)) + 1, [len(ids)]])
    row_of = {int(ids[start]): (start, end) for start, end in zip(starts[:-1], starts[1:])}
    out: Frames = {}
    for name, data in frames.items():
        camera, stepwise = cameras[name], step_camera(cameras[name])
        out[name] = []
        for episode_id in episodes.column(cols.EPISODE_ID).to_pylist():
            start, end = row_of[episode_id]
            raw = decode_frames(data[start:end], stepwise, f"episode {episode_id}")
            out[name].append(encode_video(raw, camera))
    return out


def part_read(read: tuple | PartRead) -> PartRead:
    """A source's `read_part` result as a PartRead (the tuple: nothing left out)."""
    if isinstance(read, PartRead):
        if any(problem.episode is None for problem in read.left_out):
            raise ValueError(f"left out without naming an episode: {read.left_out}")
        return read
    return PartRead(read[0], read[1], read[2] if len(read) > 2 else {})


def check_frames(file: str, part: Part, steps: pa.Table, frames: Frames) -> list[Problem]:
    """Frames that came encoded from the source are whole and of their camera's size and
    codec (frames the part encoded itself are right by construction)."""
    if not any(image.encoded for image in part.images):
        return []
    episode_ids = cols.arrow_to_numpy(steps.column(cols.EPISODE_ID))
    t = cols.arrow_to_numpy(steps.column(cols.T))
    problems = []
    for image in part.images:
        if image.encoded:
            camera = part.cameras[image.camera]
            problems += check_encoded_frames(
                file, image.source, camera, frames[image.camera], episode_ids, t
            )
    return problems


def frames_without_episodes(
    steps: pa.Table, frames: Frames, episode_ids: set[int | None]
) -> Frames:
    """The frames of the rows of `steps` that are not in these episodes."""
    keep = ~np.isin(
        cols.arrow_to_numpy(steps.column(cols.EPISODE_ID)),
        np.array(sorted(e for e in episode_ids if e is not None), dtype=np.int64),
    )
    rows = np.flatnonzero(keep)
    return {camera: [data[row] for row in rows] for camera, data in frames.items()}


def videos_without_episodes(
    episodes: pa.Table, videos: Videos, episode_ids: set[int | None]
) -> Videos:
    """Copied cameras' videos (one per row of `episodes`) without these episodes'."""
    ids = episodes.column(cols.EPISODE_ID).to_pylist()
    rows = [row for row, episode in enumerate(ids) if episode not in episode_ids]
    return {camera: [data[row] for row in rows] for camera, data in videos.items()}


def without_episodes(
    steps: pa.Table, episodes: pa.Table, episode_ids: set[int | None]
) -> tuple[pa.Table, pa.Table]:
    """The base tables without the rows of these episodes."""
    left_out = cols.numpy_to_arrow(
        np.array(sorted(e for e in episode_ids if e is not None), dtype=np.int64)
    )

    def keep(table: pa.Table) -> pa.Table:
        return table.filter(pc.invert(pc.is_in(table.column(cols.EPISODE_ID), left_out)))

    return keep(steps), keep(episodes)


def ingest_metadata(plan: IngestPlan) -> dict[str, Any]:
    """What the manifest records about the source, and where the skipped report is."""
    metadata: dict[str, Any] = {
        "env_id": plan.env_id,
        "source_format": plan.format,
        "source": plan.source,
        "episode_info_columns": plan.episode_info_columns,
        **plan.metadata,
    }
    if plan.images:  # where each camera's frames came from, and whether they were encoded here
        metadata["frames_from"] = {
            image.camera: {
                "source": image.source,
                "encoded_at_ingest": not (image.encoded or image.copied),
                **({"copied": True} if image.copied else {}),
            }
            for image in plan.images
        }
    if plan.skipped or plan.truncated_tails:
        metadata.update(
            skipped_report=SKIPPED_REPORT_NAME,
            skipped_episodes=plan.skipped_report()["skipped_episodes"],
            truncated_tails=len(plan.truncated_tails),
        )
    return metadata


# The re-encoded episodes (and why) a manifest lists per copied camera; the count is whole.
REENCODED_LISTED = 20


def copy_summary(metadata: dict[str, Any], parts: list[IngestedPart]) -> None:
    """Per copied camera, in `frames_from`: how many episodes were copied as they came and
    how many were decoded and encoded instead, with why (the first REENCODED_LISTED);
    `encoded_at_ingest` is true when any episode was."""
    for camera, origin in metadata.get("frames_from", {}).items():
        if not origin.get("copied"):
            continue
        origin["copied_episodes"] = sum(p.copied.get(camera, [0, 0])[0] for p in parts)
        origin["reencoded_episodes"] = sum(p.copied.get(camera, [0, 0])[1] for p in parts)
        # Encoded here: true as soon as one episode's video was (the others are copied).
        origin["encoded_at_ingest"] = origin["reencoded_episodes"] > 0
        reencoded = [
            {"episode": episode, "why": why}
            for part in parts
            for name, episode, why in part.reencoded
            if name == camera
        ]
        if reencoded:
            origin["reencoded"] = sorted(reencoded, key=lambda r: r["episode"])[:REENCODED_LISTED]


def write_skipped_report(writer: VersionWriter, plan: IngestPlan) -> None:
    """`skipped.json`: the episodes left out and why, and the tails kept as truncated."""
    report = json.dumps(plan.skipped_report(), indent=2, default=str) + "\n"
    writer.write_file(SKIPPED_REPORT_NAME, report.encode())


def ingest(plan: IngestPlan, output: str, *, executor: Executor, command: str) -> Manifest:
    """Write a plan's parts as a new committed version at `output` and return its manifest.

    Parts are read, checked as stored and written by `executor`, the skipped report (if
    anything was skipped or kept truncated) is written next, the manifest last. Problems
    the parts found raise ValidationError under the plan's --on-error fail, or join the
    skipped report. On any failure nothing is left: no staged files, no version."""
    with VersionWriter(output) as writer:
        parts = executor.map(
            ingest_part,
            part_tasks(plan, writer),
            description=f"ingest {plan.format}",
            total=plan.steps,
        )
        found = [problem for part in parts for problem in part.problems]
        if found and plan.on_error == "fail":
            raise ValidationError.of(found, SKIP_HINT)
        written = [part.written for part in parts if part.written is not None]
        frames = [part.frames for part in parts if part.frames is not None]
        if not written:
            raise ValueError(f"{plan.source}: no episodes left to ingest")
        plan = replace(plan, skipped=[*plan.skipped, *found])
        if plan.skipped or plan.truncated_tails:
            write_skipped_report(writer, plan)
        metadata = ingest_metadata(plan)
        copy_summary(metadata, parts)
        manifest = base_manifest(
            writer.uri,
            written + frames,
            operation="ingest",
            command=command,
            metadata=metadata,
            details={"format": plan.format, "source": plan.source},
            cameras=plan.cameras,
        )
        writer.commit(manifest)
    return manifest
