"""Run a job spec here or on a Ray cluster.

    hindsight run SPEC.yaml [--address RAY_ADDRESS]           # embedded Ray (or a cluster)
    hindsight submit SPEC.yaml --address http://HEAD:8265 [--follow]
    hindsight jobs list|logs ID|stop ID --address http://HEAD:8265

`submit` validates the spec on this machine first, then hands it to Ray's Job Submission
API with a runtime environment that uploads this project (working_dir), so the cluster runs
exactly the code you have; the entrypoint on the cluster is `python -m jobs.cli run`, the
same command as a local run. Credentials are never sent with the job: the cluster's nodes
get S3 and LLM keys from their own environment (see docker-compose.yml).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from jobs.spec import (
    Spec,
    SpecError,
    describe_result,
    load_spec_text,
    local_paths,
    read_spec,
    run_spec,
)

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


# ---------------------------------------------------------------- local run


def read_spec_argument(argument: str, check_inputs: bool = True) -> Spec:
    """A spec file path, or `env:NAME` for spec text in an environment variable (how a
    submitted job receives its spec on the cluster)."""
    if argument.startswith("env:"):
        name = argument[len("env:") :]
        text = os.environ.get(name)
        if text is None:
            raise SpecError(f"environment variable {name} holds no job spec")
        return load_spec_text(text, source=f"${name}", check_inputs=check_inputs)
    return read_spec(argument, check_inputs=check_inputs)


def ray_address_for_run(address: str | None, spec: Spec) -> str | None:
    """Where `hindsight run` runs: --address, else the cluster of a submitted job (Ray sets
    RAY_ADDRESS for its drivers), else the spec's own `address`, else an embedded Ray."""
    if address:
        return address
    if os.environ.get("RAY_ADDRESS"):
        return "auto"
    return getattr(spec.options, "address", None)


def run_command(args) -> int:
    from jobs.runtime import init_ray

    spec = read_spec_argument(args.spec)
    init_ray(ray_address_for_run(args.address, spec))
    started = time.perf_counter()
    result = run_spec(spec.kind, spec.options)
    summary = describe_result(spec.kind, spec.options, result)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    # One machine-readable line: `hindsight submit` reads it back from the job's logs.
    print(RESULT_PREFIX + json.dumps(summary), flush=True)
    return 0


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
        raise RuntimeError(
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
    """Submit a validated spec through the Job Submission API; returns the job id."""
    client = client or jobs_client(address)
    job_id = (
        submission_id
        or f"hindsight-{spec.kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    )
    return client.submit_job(
        entrypoint=f"python -m jobs.cli run env:{SPEC_ENV_VAR}",
        submission_id=job_id,
        runtime_env=runtime_env(spec.to_yaml(), upload=upload),
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


def submit_command(args) -> int:
    spec = read_spec_argument(args.spec, check_inputs=not args.skip_input_check)
    for field, path in local_paths(spec):
        print(
            f"warning: {field} {path!r} is a local path: every Ray node must see it at that "
            "path (a shared volume); use s3:// for data the cluster reads and writes",
            file=sys.stderr,
        )
    client = jobs_client(args.address)
    job_id = submit_spec(
        spec, args.address, submission_id=args.job_id, upload=not args.no_upload, client=client
    )
    print(f"submitted {job_id} ({spec.kind}) to {args.address}", file=sys.stderr)
    if not args.follow:
        print(job_id)
        print(
            f"follow it: hindsight jobs logs {job_id} --follow --address {args.address}",
            file=sys.stderr,
        )
        return 0
    logs = follow_logs(client, job_id)
    return report_job(client, job_id, logs)


def jobs_list_command(args) -> int:
    client = jobs_client(args.address)
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
        print(f"{job.submission_id or job.job_id:44} {job.status.value:10} {started:19} {detail}")
    return 0


def jobs_logs_command(args) -> int:
    client = jobs_client(args.address)
    if args.follow:
        logs = follow_logs(client, args.job_id)
        return report_job(client, args.job_id, logs)
    sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def jobs_stop_command(args) -> int:
    client = jobs_client(args.address)
    stopped = client.stop_job(args.job_id)
    status = wait_for_job(client, args.job_id, timeout=args.timeout)
    print(f"job {args.job_id} {status}" + ("" if stopped else " (it had already ended)"))
    return 0


# ---------------------------------------------------------------- argparse


def add_address(parser, default: str | None) -> None:
    parser.add_argument(
        "--address",
        default=default,
        help="Ray Job Submission (dashboard) address"
        if default
        else "Ray cluster address (ray://HOST:10001, HOST:6379, auto); default: embedded Ray",
    )


def add_commands(subparsers) -> None:
    jobs_address = os.environ.get("RAY_API_SERVER_ADDRESS", DEFAULT_JOBS_ADDRESS)

    run = subparsers.add_parser(
        "run", help="run a YAML job spec (ingest, relabel, query, shard, train) on Ray"
    )
    run.add_argument("spec", help="the YAML spec file (or env:NAME: spec text in a variable)")
    add_address(run, None)
    run.set_defaults(handler=run_command)

    submit = subparsers.add_parser(
        "submit", help="submit a YAML job spec to a Ray cluster (Job Submission API)"
    )
    submit.add_argument("spec", help="the YAML spec file")
    add_address(submit, jobs_address)
    submit.add_argument("--follow", action="store_true", help="stream logs until the job ends")
    submit.add_argument("--job-id", default=None, help="submission id (default: generated)")
    submit.add_argument(
        "--no-upload",
        action="store_true",
        help="use the project installed in the cluster's image instead of uploading this one",
    )
    submit.add_argument(
        "--skip-input-check",
        action="store_true",
        help="do not look up input/output paths from here (storage only the cluster can see)",
    )
    submit.set_defaults(handler=submit_command)

    jobs = subparsers.add_parser("jobs", help="list, follow or stop jobs on a Ray cluster")
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="all jobs and their status")
    add_address(listing, jobs_address)
    listing.set_defaults(handler=jobs_list_command)
    logs = actions.add_parser("logs", help="a job's logs")
    logs.add_argument("job_id")
    logs.add_argument("--follow", action="store_true", help="stream until the job ends")
    add_address(logs, jobs_address)
    logs.set_defaults(handler=jobs_logs_command)
    stop = actions.add_parser("stop", help="stop a running job")
    stop.add_argument("job_id")
    stop.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for it to stop")
    add_address(stop, jobs_address)
    stop.set_defaults(handler=jobs_stop_command)
