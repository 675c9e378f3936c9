"""Jobs on a real multi-node Ray cluster on loopback: a head and a worker node started with
the `ray start` CLI as separate process groups (no docker), data on moto's S3 server.

Only the processes started here are ever killed, by process group; never `ray stop`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]

VENV_BIN = Path(sys.executable).parent
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def node_ports() -> list[str]:
    """Every port a node listens on, chosen free, so we never meet another Ray here."""
    low = random.randrange(20000, 40000, 500)
    return [
        "--node-manager-port",
        str(free_port()),
        "--object-manager-port",
        str(free_port()),
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--dashboard-agent-grpc-port",
        str(free_port()),
        "--runtime-env-agent-port",
        str(free_port()),
        "--metrics-export-port",
        str(free_port()),
        f"--min-worker-port={low}",
        f"--max-worker-port={low + 499}",
    ]


class LocalCluster:
    """A Ray head (with the dashboard's Job Submission API) and one worker node."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.env = env
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.head: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None

    @property
    def jobs_address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, arguments: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.root / log_name, "ab")  # noqa: SIM115 (kept open for the process)
        return subprocess.Popen(
            [str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats", *arguments],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: we kill exactly this node
        )

    def start_head(self) -> None:
        self.head = self._start(
            [
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={self.gcs_port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
                f"--temp-dir={self.root / 'ray'}",
                "--num-cpus=1",
                "--object-store-memory=100000000",
                *node_ports(),
            ],
            "head.log",
        )

    def start_worker(self) -> None:
        self.worker = self._start(
            [
                f"--address=127.0.0.1:{self.gcs_port}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=1",
                "--object-store-memory=100000000",
                *node_ports(),
            ],
            "worker.log",
        )
        self.wait_for_nodes(2)

    def kill_worker(self) -> None:
        kill_group(self.worker)
        self.worker = None

    def alive_nodes(self) -> int:
        url = f"{self.jobs_address}/api/v0/nodes?limit=100"
        with urllib.request.urlopen(url, timeout=5) as response:
            payload = json.load(response)
        nodes = payload["data"]["result"]["result"]
        return sum(1 for node in nodes if node["state"] == "ALIVE")

    def wait_for_nodes(self, count: int, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            for process, name in ((self.head, "head"), (self.worker, "worker")):
                if process is not None and process.poll() is not None:
                    log = (self.root / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"ray {name} node exited early:\n{log}")
            try:
                if self.alive_nodes() >= count:
                    return
            except (OSError, KeyError, ValueError) as error:
                last_error = error
            time.sleep(0.5)
        raise RuntimeError(f"cluster did not reach {count} nodes in {timeout} s ({last_error})")

    def shutdown(self) -> None:
        kill_group(self.worker)
        kill_group(self.head)


def kill_group(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    root = tmp_path_factory.mktemp("cluster")
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="disabled",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(PROJECT_ROOT),
        TQDM_DISABLE="1",
    )
    env.pop("RAY_ADDRESS", None)
    local = LocalCluster(root, env)
    try:
        local.start_head()
        local.wait_for_nodes(1)
        local.start_worker()
        yield local
    finally:
        local.shutdown()


def test_cluster_runs_a_submitted_job(cluster):
    from jobs.submit import jobs_client, runtime_env, wait_for_job

    client = jobs_client(cluster.jobs_address)
    job_id = client.submit_job(
        entrypoint="python -c \"import ray, jobs.spec; ray.init(); print('nodes', len(ray.nodes()))\"",
        runtime_env=runtime_env("kind: relabel\n"),
    )
    assert wait_for_job(client, job_id, timeout=120) == "SUCCEEDED", client.get_job_logs(job_id)
    assert "nodes 2" in client.get_job_logs(job_id)
