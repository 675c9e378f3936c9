"""`hindsight jobs list|logs|stop`: jobs on a Ray cluster."""

from __future__ import annotations

import sys
import time

from pydantic import BaseModel, Field
from pydantic_settings import CliPositionalArg, CliSubCommand

from jobs.command import Command
from jobs.commands.submit import default_jobs_address


class _OnCluster(Command):
    address: str = Field(
        default_factory=default_jobs_address,
        description="Ray Job Submission (dashboard) address (default: $RAY_API_SERVER_ADDRESS "
        "or http://127.0.0.1:8265).",
    )

    def report(self, result: int, seconds: float) -> str:
        return ""


class JobsList(_OnCluster):
    """All jobs on the cluster and their status."""

    name = "jobs list"

    def run(self) -> int:
        from jobs.submit import jobs_client

        client = jobs_client(self.address)
        jobs = sorted(client.list_jobs(), key=lambda job: job.start_time or 0)
        print(f"{'JOB ID':44} {'STATUS':10} {'STARTED':19} ENTRYPOINT / MESSAGE")
        for job in jobs:
            started = (
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000))
                if job.start_time
                else "-"
            )
            kind = (job.metadata or {}).get("kind", "")
            detail = f"{kind} {job.metadata.get('spec', '')}".strip() if kind else job.entrypoint
            if job.status.value == "FAILED" and job.message:
                detail += f" / {job.message.splitlines()[-1][:80]}"
            print(
                f"{job.submission_id or job.job_id:44} {job.status.value:10} {started:19} {detail}"
            )
        return 0


class JobsLogs(_OnCluster):
    """A job's logs (with --follow: streamed until it ends, then its status)."""

    name = "jobs logs"

    job_id: CliPositionalArg[str] = Field(description="The job's submission id.")
    follow: bool = Field(False, description="Stream the logs until the job ends.")

    def run(self) -> int:
        from jobs.submit import follow_logs, jobs_client, report_job

        client = jobs_client(self.address)
        if self.follow:
            logs = follow_logs(client, self.job_id)
            return report_job(client, self.job_id, logs)
        sys.stdout.write(client.get_job_logs(self.job_id))
        return 0


class JobsStop(_OnCluster):
    """Stop a running job and wait until it has stopped."""

    name = "jobs stop"

    job_id: CliPositionalArg[str] = Field(description="The job's submission id.")
    timeout: float = Field(60.0, gt=0, description="Seconds to wait for it to stop.")

    def run(self) -> int:
        from jobs.submit import jobs_client, wait_for_job

        client = jobs_client(self.address)
        stopped = client.stop_job(self.job_id)
        status = wait_for_job(client, self.job_id, timeout=self.timeout)
        print(f"job {self.job_id} {status}" + ("" if stopped else " (it had already ended)"))
        return 0


class Jobs(BaseModel):
    """List, follow or stop jobs on a Ray cluster."""

    list: CliSubCommand[JobsList] = Field(description="All jobs and their status.")
    logs: CliSubCommand[JobsLogs] = Field(description="A job's logs.")
    stop: CliSubCommand[JobsStop] = Field(description="Stop a running job.")
