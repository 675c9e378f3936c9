"""`hindsight train`: a conditional policy from shards."""

from __future__ import annotations

import sys
from typing import Any

from pydantic import Field
from pydantic_settings import CliPositionalArg

from jobs.command import RayCommand, Run, Shards
from trainers.options import TrainOptions


class Train(RayCommand, TrainOptions):
    """Train a policy p(action | state, condition) on shards, in plain PyTorch; Ctrl-C stops
    it cleanly after a checkpoint and says how to resume.

        hindsight train data/shards/pendulum runs/pend-rtg --condition return_to_go --model mlp --steps 3000
        hindsight train data/shards/pendulum runs/pend-rtg --resume --steps 6000
    """

    name = "train"

    input: CliPositionalArg[Shards] = Field(
        description="Shard directory (local or s3://) with an index.json."
    )
    output: CliPositionalArg[Run] = Field(
        description="Run directory (local): config, checkpoint and metrics."
    )
    condition: list[str] = Field(
        default_factory=list,
        description="Conditioning columns of the shard index; none = behaviour cloning.",
        json_schema_extra={"metavar": "COLUMN,..."},
    )
    workers: int = Field(1, ge=1, description="Data-parallel Ray Train workers (1: this process).")
    resume: bool = Field(False, description="Continue the run in OUTPUT.")

    def run(self) -> dict[str, Any]:
        from jobs.training import run_training

        return run_training(
            self,
            workers=self.workers,
            address=None if self.submits() else self.address,
            resume=self.resume,
        )

    def report(self, summary: dict[str, Any], seconds: float) -> str:
        from trainers.train import STOP_EXIT_CODES, stop_message

        if summary.get("stopped_by"):
            resume = self.model_copy(update={"resume": True}).history_line()
            print(stop_message(summary, resume), file=sys.stderr)
            raise SystemExit(STOP_EXIT_CODES[summary["stopped_by"]])
        line = ", ".join(
            f"{key} {value:,.4g}" if isinstance(value, float) else f"{key} {value}"
            for key, value in summary.items()
            if isinstance(value, (int, float, str)) and not isinstance(value, bool)
        )
        return f"trained: {line}"
