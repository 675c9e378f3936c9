"""`hindsight train`: a conditional policy from shards."""

from __future__ import annotations

import sys
from typing import Any

from pydantic import Field
from pydantic_settings import CliPositionalArg

from jobs.command import RayCommand, Run, Shards
from trainers.options import TrainOptions

_trainer = TrainOptions.model_fields


class Train(RayCommand, TrainOptions):
    """Train a policy p(action | state, condition) on shards, in plain PyTorch; Ctrl-C stops
    it cleanly after a checkpoint and says how to resume.

        hindsight train data/shards/pendulum runs/pend-rtg --condition return_to_go --model mlp --steps 3000
        hindsight train data/shards/pendulum runs/pend-rtg --resume --steps 6000
    """

    name = "train"
    job = True

    # The trainer's own fields, marked for the command line (same descriptions).
    input: CliPositionalArg[Shards] = Field(description=_trainer["input"].description)
    output: CliPositionalArg[Run] = Field(description=_trainer["output"].description)
    condition: list[str] = Field(
        default=[],
        description=_trainer["condition"].description,
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

    def exit_status(self, summary: dict[str, Any]) -> int:
        from trainers.train import STOP_EXIT_CODES, stop_message

        if not summary.get("stopped_by"):
            return 0
        resume = self.model_copy(update={"resume": True}).history_line()
        print(stop_message(summary, resume), file=sys.stderr)
        return STOP_EXIT_CODES[summary["stopped_by"]]

    def report(self, summary: dict[str, Any], seconds: float) -> str:
        line = ", ".join(
            f"{key} {value:,.4g}" if isinstance(value, float) else f"{key} {value}"
            for key, value in summary.items()
            if isinstance(value, (int, float, str)) and not isinstance(value, bool)
        )
        return f"{'stopped' if summary.get('stopped_by') else 'trained'}: {line}"
