"""`hindsight run`: run a YAML job spec here (embedded Ray) or on a cluster's Ray."""

from __future__ import annotations

import json
import os
from typing import Any

from pydantic import Field
from pydantic_settings import CliPositionalArg

from jobs.command import Command, RayCommand


class RunSpec(Command):
    """Run a YAML job spec (collect, ingest, materialize, relabel, query, shard, train).

    The spec is validated by the same model as the command line, then runs exactly as the
    command would. The last line printed is `hindsight-result: {...}` (JSON), which
    `hindsight submit --follow` reads back from a cluster job's log.

        hindsight run jobs/examples/relabel.yaml
        hindsight run jobs/examples/relabel.yaml --address ray://HEAD:10001
    """

    name = "run"

    spec: CliPositionalArg[str] = Field(
        description="The YAML spec file (or env:NAME: spec text in an environment variable)."
    )
    address: str | None = Field(
        None,
        description="Ray address (ray://HOST:10001, HOST:6379, auto); default: the cluster of a "
        "submitted job, else the spec's own address, else this process for a small job and "
        "an embedded local Ray for a larger one.",
    )

    def run(self) -> dict[str, Any]:
        import time

        from jobs.spec import read_spec
        from jobs.submit import RESULT_PREFIX

        spec = read_spec(self.spec)
        command = spec.command
        if isinstance(command, RayCommand):
            command = command.model_copy(update={"address": ray_address(self.address, command)})
        started = time.perf_counter()
        result = command.run()
        summary = {"kind": command.name, **command.summary(result)}
        summary["seconds"] = round(time.perf_counter() - started, 3)
        summary["exit_status"] = command.exit_status(result)
        # One machine-readable line: `hindsight submit` reads it back from the job's logs.
        print(RESULT_PREFIX + json.dumps(summary, default=str), flush=True)
        return summary

    def report(self, result: Any, seconds: float) -> str:
        return ""  # the result line is the report

    def exit_status(self, summary: dict[str, Any]) -> int:
        return int(summary["exit_status"])


def ray_address(address: str | None, command: RayCommand) -> str | None:
    """--address, else the cluster of a submitted job (Ray sets RAY_ADDRESS for its
    drivers), else the spec's own address, else an embedded Ray."""
    if address:
        return address
    if os.environ.get("RAY_ADDRESS"):
        return "auto"
    return command.address
