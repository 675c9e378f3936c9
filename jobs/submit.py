"""Submitting job specs to a Ray cluster through Ray's Job Submission API.

`submit_spec` validates nothing itself (the spec is validated where it is read) and hands
the spec to the cluster with a runtime environment that uploads this project
(working_dir), so the cluster runs exactly the code you have; the entrypoint on the cluster
is `python -m jobs.cli run env:HINDSIGHT_JOB_SPEC`, the same command as a local run.
Credentials are never sent with the job: the cluster's nodes get S3 and LLM keys from their
own environment (see docker-compose.yml).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from jobs.command import Command, UserError
from jobs.spec import Spec, spec_kinds
from schemas.manifest import public_text

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# What never travels to the cluster: environments, data, outputs, caches, VCS.
UPLOAD_EXCLUDES = [
    ".venv",
    ".git",
    "data",
    "runs",
    "reports",
    "build",
    "bench/results",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    ".env",
]
SPEC_ENV_VAR = "HINDSIGHT_JOB_SPEC"
RESULT_PREFIX = "hindsight-result: "
DEFAULT_JOBS_ADDRESS = "http://127.0.0.1:8265"
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")


# ---------------------------------------------------------------- cluster jobs


def jobs_client(address: str):
    from ray.job_submission import JobSubmissionClient

    if not address.startswith(("http://", "https://")):
        raise ValueError(
            f"--address {address}: the Job Submission API is the dashboard's HTTP address, "
            "e.g. http://127.0.0.1:8265"
        )
    try:
        return JobSubmissionClient(address)
    except ConnectionError as error:
        raise UserError(
            f"cannot reach the Ray dashboard at {address}: {error}. Is the cluster up "
            "(`docker compose ps`)? With token auth, export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN."
        ) from None


def runtime_env(spec_text: str, upload: bool = True) -> dict[str, Any]:
    """The job's runtime environment: this project as working_dir, the spec as an env var."""
    env: dict[str, Any] = {
        "env_vars": {SPEC_ENV_VAR: spec_text, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    }
    if upload:
        env["working_dir"] = str(PROJECT_ROOT)
        env["excludes"] = UPLOAD_EXCLUDES
    return env


def submit_spec(
    spec: Spec,
    address: str,
    *,
    submission_id: str | None = None,
    upload: bool = True,
    client=None,
) -> str:
    """Submit a validated spec through the Job Submission API; returns the job id.

    A spec is visible in Ray's job table and dashboard (it travels as an environment
    variable), so one that holds credentials in a URL is refused: the cluster's nodes take
    keys from their own environment."""
    text = spec.to_yaml()
    if public_text(text) != text:
        raise UserError(
            f"{spec.source}: the spec holds credentials in a URL (user, password or query); "
            "give the cluster its keys through its environment (OPENAI_API_KEY, AWS_*) and "
            "the URL without them"
        )
    client = client or jobs_client(address)
    job_id = (
        submission_id
        or f"hindsight-{spec.kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    )
    return client.submit_job(
        entrypoint=f"python -m jobs.cli run env:{SPEC_ENV_VAR}",
        submission_id=job_id,
        runtime_env=runtime_env(text, upload=upload),
        metadata={"kind": spec.kind, "spec": Path(spec.source).name},
    )


def follow_logs(client, job_id: str, out=None) -> str:
    """Stream the job's logs until it ends; returns the full log text."""
    out = out if out is not None else sys.stdout
    collected: list[str] = []

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            collected.append(chunk)
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    return "".join(collected)


def wait_for_job(client, job_id: str, timeout: float | None = None, poll: float = 0.5) -> str:
    """Poll until the job reaches a terminal status; returns it."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL_STATUSES:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} still {status} after {timeout:.0f} s")
        time.sleep(poll)


def result_from_logs(logs: str) -> dict[str, Any] | None:
    """The summary line `hindsight run` printed last, if any."""
    for line in reversed(logs.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    return None


def report_job(client, job_id: str, logs: str | None = None) -> int:
    """Print the final status and the job's output; exit status 0 only if it succeeded."""
    status = wait_for_job(client, job_id)
    info = client.get_job_info(job_id)
    result = result_from_logs(logs if logs is not None else client.get_job_logs(job_id))
    if status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED", file=sys.stderr)
        if result:
            print(json.dumps(result))
        return 0
    print(f"job {job_id} {status}: {info.message or ''}".rstrip(), file=sys.stderr)
    return 1


def submit_command(command: Command) -> int:
    """Submit one command, given with an http:// `--address`, as a job; print its id."""
    address = command.address  # type: ignore[attr-defined]
    if not command.job:  # the cluster's `hindsight run` would refuse it
        raise UserError(
            f"--address {address}: {command.name} does not run as a cluster job (jobs: "
            f"{', '.join(spec_kinds())}); give a Ray address (ray://HOST:10001) to run it on "
            "the cluster from here"
        )
    spec = Spec(command=command.model_copy(update={"address": None}), source=command.name)
    job_id = submit_spec(spec, address)
    print(
        f"submitted {job_id}; follow it: hindsight jobs logs {job_id} --follow --address {address}",
        file=sys.stderr,
    )
    print(job_id)
    return 0
