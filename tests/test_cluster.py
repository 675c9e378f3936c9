"""Jobs on a real multi-node Ray cluster on loopback: a head and a worker node started with
the `ray start` CLI as separate process groups (no docker), data on moto's S3 server.

Only the processes started here are ever killed, by process group; never `ray stop`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]

VENV_BIN = Path(sys.executable).parent
PROJECT_ROOT = Path(__file__).resolve().parent.parent


_GIVEN_PORTS: set[int] = set()


def distinct_free_port() -> int:
    """A free port not handed out before in this session: a port freed by `free_port`
    can come back from the next call, and Ray refuses two components on one port."""
    while (port := free_port()) in _GIVEN_PORTS:
        pass
    _GIVEN_PORTS.add(port)
    return port


def node_ports() -> list[str]:
    """Every port a node listens on, chosen free, so we never meet another Ray here."""
    low = random.randrange(20000, 32000, 500)  # below the ephemeral range of free_port()
    names = [
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    ]
    return [
        *(item for name in names for item in (name, str(distinct_free_port()))),
        f"--min-worker-port={low}",
        f"--max-worker-port={low + 499}",
    ]


class LocalCluster:
    """A Ray head (with the dashboard's Job Submission API) and one worker node."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.env = env
        # Ray's Unix sockets live under the temp dir and must stay under 107 bytes, so a
        # short directory of ours in /tmp rather than pytest's long tmp paths.
        self.temp_dir = tempfile.mkdtemp(prefix="hsray-", dir="/tmp")
        self.gcs_port = distinct_free_port()
        self.dashboard_port = distinct_free_port()
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
                f"--ray-client-server-port={distinct_free_port()}",
                f"--temp-dir={self.temp_dir}",
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
                f"--temp-dir={self.temp_dir}",
                "--num-cpus=1",
                "--object-store-memory=100000000",
                *node_ports(),
            ],
            "worker.log",
        )
        self.wait_for_nodes(2)

    def ensure_worker(self) -> None:
        if self.worker is None:
            self.start_worker()

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
        shutil.rmtree(self.temp_dir, ignore_errors=True)


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
    # Notice a killed node within ~2 s instead of the default ~30 s.
    env.update(RAY_health_check_period_ms="500", RAY_health_check_failure_threshold="4")
    local = LocalCluster(root, env)
    try:
        local.start_head()
        local.wait_for_nodes(1)
        local.start_worker()
        yield local
    finally:
        local.shutdown()


# ---------------------------------------------------------------- data and helpers

PARTS = 16


@pytest.fixture(scope="module")
def bucket(s3_server):
    import boto3

    name = f"hs-cluster-{free_port()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def parent_dataset(bucket):
    """A committed synthetic dataset on S3, in many small parts (one Ray task each)."""
    from tests.synthetic import make_episodes, write_synthetic_dataset

    steps, episodes = make_episodes(num_episodes=PARTS * 3, obs_dim=4, action_dim=2, seed=3)
    uri = f"{bucket}/pendulum"
    manifest = write_synthetic_dataset(uri, steps, episodes, part_steps=40)
    assert len(manifest.parts) >= PARTS // 2
    return uri


def relabel_spec(tmp_path: Path, parent: str, output: str, **params) -> Path:
    params = {"gamma": 0.99, **params}
    path = tmp_path / "relabel.yaml"
    path.write_text(
        "kind: relabel\n"
        f"input: {parent}\n"
        f"output: {output}\n"
        "relabelers:\n"
        "  - name: returns\n"
        f"    params: {json.dumps(params)}\n"
    )
    return path


def group_bytes(uri: str, group: str = "returns") -> dict[str, bytes]:
    """Every data file of one column group, by path relative to the version."""
    from engine import storage

    files = [f for f in storage.list_files(f"{uri}/{group}") if f.endswith(".parquet")]
    return {storage.relative_to(uri, f): storage.read_bytes(f) for f in files}


@pytest.fixture(scope="module")
def embedded_output(parent_dataset, bucket, cluster, tmp_path_factory):
    """The reference: the same spec run with `hindsight run` on an embedded Ray, as a user
    runs it (a fresh process, so its Ray workers see the loopback S3 settings)."""
    output = f"{bucket}/embedded"
    spec = relabel_spec(tmp_path_factory.mktemp("embedded"), parent_dataset, output)
    env = {**cluster.env, "RAY_TMPDIR": cluster.temp_dir + "-embedded"}
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "run", str(spec)],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"dataset_id"' in done.stdout
    files = group_bytes(output)
    assert len(files) == 2 * len(open_manifest(parent_dataset).parts)
    return files


def open_manifest(uri: str):
    from engine.dataset import open_dataset

    return open_dataset(uri).manifest


def wait_for_files(uri: str, count: int, timeout: float = 60.0) -> None:
    """Until at least `count` part files of the job's new group are on S3."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(group_bytes(uri)) >= count:
            return
        time.sleep(0.05)
    raise TimeoutError(f"no {count} part files under {uri} after {timeout} s")


# ---------------------------------------------------------------- tests


def test_submitted_job_writes_the_same_bytes_as_the_embedded_run(
    cluster, parent_dataset, bucket, embedded_output, tmp_path, capsys
):
    from jobs.cli import main

    output = f"{bucket}/submitted"
    spec = relabel_spec(tmp_path, parent_dataset, output)
    status = main(["submit", str(spec), "--address", cluster.jobs_address, "--follow"])
    captured = capsys.readouterr()
    assert status == 0, captured.err + captured.out
    manifest = open_manifest(output)
    # The job reports the dataset id of the version it committed.
    assert f'"dataset_id": "{manifest.dataset_id}"' in captured.out
    assert group_bytes(output) == embedded_output
    assert manifest.group("returns").relabeler.params["gamma"] == 0.99

    # The job is listed, and its logs hold the same result line.
    job_id = re.search(r"submitted (\S+)", captured.err).group(1)
    assert main(["jobs", "list", "--address", cluster.jobs_address]) == 0
    assert re.search(rf"{job_id}\s+SUCCEEDED", capsys.readouterr().out)
    assert main(["jobs", "logs", job_id, "--address", cluster.jobs_address]) == 0
    assert manifest.dataset_id in capsys.readouterr().out


def test_a_command_with_a_dashboard_address_is_submitted_as_a_job(
    cluster, parent_dataset, bucket, embedded_output, capsys
):
    """`hindsight relabel IN OUT --with ... --address http://HEAD:8265` is the same job as
    its spec submitted with `hindsight submit`."""
    from jobs.cli import main
    from jobs.submit import jobs_client, wait_for_job

    cluster.ensure_worker()
    output = f"{bucket}/command-line"
    arguments = ["relabel", parent_dataset, output, "--with", "returns:gamma=0.99"]
    status = main([*arguments, "--address", cluster.jobs_address])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    job_id = captured.out.strip().splitlines()[-1]
    assert f"hindsight jobs logs {job_id} --follow" in captured.err
    client = jobs_client(cluster.jobs_address)
    assert wait_for_job(client, job_id, timeout=120) == "SUCCEEDED", client.get_job_logs(job_id)
    assert group_bytes(output) == embedded_output
    assert open_manifest(output).command == "hindsight " + " ".join(arguments)


def test_job_survives_a_worker_node_killed_mid_job(
    cluster, parent_dataset, bucket, embedded_output, tmp_path
):
    from jobs.spec import read_spec
    from jobs.submit import jobs_client, submit_spec, wait_for_job

    cluster.ensure_worker()
    output = f"{bucket}/node-killed"
    client = jobs_client(cluster.jobs_address)
    job_id = submit_spec(
        read_spec(relabel_spec(tmp_path, parent_dataset, output)), cluster.jobs_address
    )
    wait_for_files(output, 1)
    cluster.kill_worker()
    killed_mid_job = not _committed(output)
    status = wait_for_job(client, job_id, timeout=120)
    assert status == "SUCCEEDED", client.get_job_logs(job_id)[-3000:]
    assert killed_mid_job, "the job had already finished when the worker node was killed"
    assert group_bytes(output) == embedded_output


def test_stopped_job_leaves_no_version_and_a_rerun_is_identical(
    cluster, parent_dataset, bucket, embedded_output, tmp_path, capsys
):
    from engine.dataset import DatasetError, open_dataset
    from jobs.cli import main
    from jobs.spec import read_spec
    from jobs.submit import jobs_client, submit_spec, wait_for_job

    cluster.ensure_worker()
    output = f"{bucket}/stopped"
    spec = read_spec(relabel_spec(tmp_path, parent_dataset, output))
    client = jobs_client(cluster.jobs_address)
    job_id = submit_spec(spec, cluster.jobs_address)
    wait_for_files(output, 1)
    assert main(["jobs", "stop", job_id, "--address", cluster.jobs_address]) == 0
    assert f"job {job_id} STOPPED" in capsys.readouterr().out
    # Half a version is never visible: readers get a clear error, not partial data. The
    # writer removes its staging when the stop reaches it in time (Ray signals the driver,
    # then kills it); what a kill leaves behind says it is unfinished.
    assert not _committed(output)
    with pytest.raises(DatasetError, match="died before committing|no manifest.json"):
        open_dataset(output)

    rerun = submit_spec(spec, cluster.jobs_address)
    assert wait_for_job(client, rerun, timeout=120) == "SUCCEEDED", client.get_job_logs(rerun)
    assert group_bytes(output) == embedded_output


def test_bad_specs_fail_fast_with_a_clear_message_and_no_output(
    cluster, parent_dataset, bucket, tmp_path, capsys
):
    from engine import storage
    from jobs.cli import main
    from jobs.submit import jobs_client

    client = jobs_client(cluster.jobs_address)
    jobs_before = len(client.list_jobs())
    output = f"{bucket}/never-written"

    # Caught on this machine, before anything is submitted.
    bad_path = relabel_spec(tmp_path, f"{bucket}/no-such-dataset", output)
    assert main(["submit", str(bad_path), "--address", cluster.jobs_address]) == 2
    assert "does not exist; expected a committed dataset version" in capsys.readouterr().err
    bad_gamma = relabel_spec(tmp_path, parent_dataset, output, gamma=2.0)
    assert main(["submit", str(bad_gamma), "--address", cluster.jobs_address]) == 2
    assert "gamma" in capsys.readouterr().err
    assert len(client.list_jobs()) == jobs_before

    # Caught by the job on the cluster (the column is checked against the data), before
    # it writes anything.
    bad_column = relabel_spec(tmp_path, parent_dataset, output, reward_column="rewardz")
    assert main(["submit", str(bad_column), "--address", cluster.jobs_address, "--follow"]) == 1
    captured = capsys.readouterr()
    assert "rewardz" in captured.out + captured.err
    assert storage.list_files(output) == []


def _committed(uri: str) -> bool:
    from engine import storage

    return storage.exists(f"{uri}/manifest.json")
