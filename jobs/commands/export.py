"""`hindsight export`: a dataset version written as a LeRobot v3.0 or a Minari dataset."""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import Field
from pydantic_settings import CliPositionalArg

from engine import storage
from jobs.command import Dataset, RayCommand, UserError, is_inside, rate


class Export(RayCommand):
    """Write a dataset version (relabeled, or a `query --output` subset) in another tool's
    format, relabel columns included: a LeRobotDataset v3.0 directory (Parquet frames, MP4
    cameras, statistics, tasks) or a Minari dataset (`minari.load_dataset`). The format's
    own commit file is written last: a failed export leaves nothing.

        hindsight export data/pendulum-rl exports/pendulum-rl --format lerobot
        hindsight export data/pusht-rl exports/pusht-rl --format lerobot --task-column description
        hindsight export data/pendulum-rl ~/.minari/datasets/hindsight/pendulum-rl-v0 --format minari
    """

    name = "export"
    job = True

    input: CliPositionalArg[Dataset] = Field(
        description="Dataset version to export (local path or s3://)."
    )
    output: CliPositionalArg[str] = Field(
        description="New directory to write (LeRobot: local path or s3://; Minari: local)."
    )
    format: Literal["lerobot", "minari"] = Field(description="lerobot (v3.0) or minari.")
    fps: int | None = Field(
        None,
        ge=1,
        description="LeRobot: frames per second of the timestamps and videos (default: the "
        "dataset's recorded fps, else 30).",
    )
    task_column: str | None = Field(
        None,
        description="LeRobot: a text column (episode or step level) whose values become the "
        "tasks (default: a `task` text column, as a LeRobot ingest writes; else the env "
        "id, else 'default').",
    )
    video_codec: Literal["libsvtav1", "h264", "hevc"] = Field(
        "libsvtav1",
        description="LeRobot: codec of the camera videos (LeRobot's default AV1, H.264 or HEVC).",
    )
    dataset_id: str | None = Field(
        None,
        description="Minari: the dataset id, (namespace/)name-vN (default: hindsight/ and "
        "the output's last path component, with -v0 unless it has a version).",
    )

    def commit_file(self) -> str:
        from engine.exports.lerobot_plan import COMMIT_FILE as LEROBOT_COMMIT
        from engine.exports.minari import COMMIT_FILE as MINARI_COMMIT

        return LEROBOT_COMMIT if self.format == "lerobot" else MINARI_COMMIT

    def check(self) -> None:
        super().check()
        from engine.writer import OutputExistsError, check_new_output

        if self.format == "minari" and storage.is_s3(self.output):
            raise UserError(f"output {self.output}: minari reads local directories only")
        if self.format != "lerobot" and (self.fps or self.task_column):
            raise UserError("--fps and --task-column are options of --format lerobot")
        if self.format != "minari" and self.dataset_id:
            raise UserError("--dataset-id is an option of --format minari")
        if is_inside(self.output, self.input):
            raise UserError(
                f"output {self.output} is inside input {self.input}; write it somewhere else"
            )
        try:
            check_new_output(self.output, self.commit_file())
        except OutputExistsError as error:
            raise UserError(f"output {error}") from error
        if self.task_column:
            from engine.dataset import open_dataset
            from engine.exports.lerobot_plan import check_task_column

            check_task_column(open_dataset(self.input), self.task_column)

    def run(self):
        from engine.dataset import open_dataset

        dataset = open_dataset(self.input)
        if self.format == "minari":
            from engine.exports.minari import export_minari

            return export_minari(dataset, self.output, dataset_id=self.dataset_id)
        from engine.exports.lerobot import export_lerobot
        from engine.exports.lerobot_plan import LeRobotOptions

        options = LeRobotOptions(
            fps=self.fps, task_column=self.task_column, video_codec=self.video_codec
        )
        return export_lerobot(
            dataset,
            self.output,
            options,
            executor=self.executor(),
            command=self.history_line(),
        )

    def summary(self, result) -> dict:
        return dataclasses.asdict(result)

    def report(self, result, seconds: float) -> str:
        lines = [
            f"exported {result.episodes:,} episodes, {result.steps:,} steps as {result.format} "
            f"to {result.output} ({result.files} files, {result.bytes / 1e6:.1f} MB) in "
            f"{rate(result.steps, seconds)}"
        ]
        if result.skipped_columns:
            lines.append(
                f"  not exported (no place in {result.format}): "
                + ", ".join(result.skipped_columns)
            )
        if result.details.get("texts_not_exported"):
            lines.append(
                "  text columns not exported (one can be the task: --task-column NAME): "
                + ", ".join(result.details["texts_not_exported"])
            )
        if result.details.get("videos"):
            from engine.exports.video import camera_note

            codec = result.details["video_codec"]
            lines.append(
                "  cameras: "
                + "; ".join(
                    camera_note(camera, entry, codec)
                    for camera, entry in result.details["videos"].items()
                )
            )
        if result.format == "minari":
            lines.append(
                f"  load with: minari.MinariDataset({storage.join(result.output, 'data')!r}), "
                f"or MINARI_DATASETS_PATH=<root> minari.load_dataset("
                f"{result.details['dataset_id']!r}) with the export at <root>/"
                f"{result.details['dataset_id']}"
            )
        return "\n".join(lines)
