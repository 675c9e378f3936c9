"""`hindsight submit`: a YAML job spec to a Ray cluster (Job Submission API)."""

from __future__ import annotations

import os
import sys

from pydantic import Field
from pydantic_settings import CliPositionalArg

from jobs.command import Command


def default_jobs_address() -> str:
    from jobs.submit import DEFAULT_JOBS_ADDRESS

    return os.environ.get("RAY_API_SERVER_ADDRESS", DEFAULT_JOBS_ADDRESS)


class Submit(Command):
    """Submit a YAML job spec to a Ray cluster through the Job Submission API.

    The spec is validated here first (unless --skip-input-check), then runs on the cluster
    as `hindsight run` would, with this project uploaded as the job's working directory.

        hindsight submit jobs/examples/relabel.yaml --address http://127.0.0.1:8265 --follow
    """

    name = "submit"

    spec: CliPositionalArg[str] = Field(description="The YAML spec file.")
    address: str = Field(
        default_factory=default_jobs_address,
        description="Ray Job Submission (dashboard) address (default: $RAY_API_SERVER_ADDRESS "
        "or http://127.0.0.1:8265).",
    )
    follow: bool = Field(False, description="Stream the job's logs until it ends.")
    job_id: str | None = Field(None, description="Submission id (default: generated).")
    no_upload: bool = Field(
        False,
        description="Use the project installed in the cluster's image instead of uploading this one.",
    )
    skip_input_check: bool = Field(
        False,
        description="Do not look up input/output paths from here (storage only the cluster sees).",
    )

    def run(self) -> int:
        from jobs.spec import read_spec
        from jobs.submit import follow_logs, jobs_client, report_job, submit_spec

        spec = read_spec(self.spec, check_inputs=not self.skip_input_check)
        for field, path in spec.command.path_fields():
            if "://" not in path:
                print(
                    f"warning: {field} {path!r} is a local path: every Ray node must see it at "
                    "that path (a shared volume); use s3:// for data the cluster reads and writes",
                    file=sys.stderr,
                )
        client = jobs_client(self.address)
        job_id = submit_spec(
            spec, self.address, submission_id=self.job_id, upload=not self.no_upload, client=client
        )
        print(f"submitted {job_id} ({spec.kind}) to {self.address}", file=sys.stderr)
        if not self.follow:
            print(job_id)
            print(
                f"follow it: hindsight jobs logs {job_id} --follow --address {self.address}",
                file=sys.stderr,
            )
            return 0
        logs = follow_logs(client, job_id)
        return report_job(client, job_id, logs)

    def report(self, result: int, seconds: float) -> str:
        return ""
