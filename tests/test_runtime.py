"""jobs.runtime: RayExecutor runs parts side by side as Ray tasks, results and errors
return; a command's SizedExecutor runs a small job in this process without starting Ray,
and it writes the same bytes as on Ray."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.executor import InProcess
from jobs.runtime import IN_PROCESS_STEPS_VARIABLE, RayExecutor, runs_in_process

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def meet_another(task: dict) -> dict:
    """Mark this task started, then wait (at most `wait_s`) until another one started."""
    folder = Path(task["folder"])
    (folder / f"started-{task['index']}").touch()
    deadline = time.monotonic() + task["wait_s"]
    while len(list(folder.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"saw_another": len(list(folder.iterdir())) >= 2}


def test_two_parts_run_at_the_same_time_from_the_start(ray_local, tmp_path):
    tasks = [{"index": i, "folder": str(tmp_path), "wait_s": 10.0} for i in range(4)]
    results = RayExecutor().map(meet_another, tasks, description="meet")
    # One at a time, each task would wait 10 s in vain.
    assert all(r["saw_another"] for r in results)


def refuse(task: dict) -> dict:
    if task["index"] == 1:
        raise ValueError(f"part {task['index']}: bad input")
    if task["index"] == 3:
        raise KeyError("part 3: no column 'x'")
    return {"index_seen": task["index"]}


@pytest.mark.parametrize("executor", [RayExecutor(), InProcess()], ids=["ray", "in-process"])
def test_results_come_back_in_task_order_and_errors_keep_type_and_message(ray_local, executor):
    tasks = [{"index": i} for i in (2, 0)]
    assert [r["index_seen"] for r in executor.map(refuse, tasks, description="x")] == [2, 0]
    with pytest.raises(ValueError, match="part 1: bad input"):
        executor.map(refuse, [{"index": i} for i in range(3)], description="x")
    with pytest.raises(KeyError, match="part 3: no column 'x'"):
        executor.map(refuse, [{"index": 3}], description="x")


def fail_first_or_work(task: dict) -> dict:
    """Part 0 fails at once; every other part marks its start, works 0.5 s, marks its end."""
    if task["index"] == 0:
        raise ValueError("part 0: bad input")
    folder = Path(task["folder"])
    (folder / f"started-{task['index']}").touch()
    time.sleep(0.5)
    (folder / f"ended-{task['index']}").touch()
    return {"index_seen": task["index"]}


def test_a_failed_part_starts_no_other_and_waits_for_the_running_ones(ray_local, tmp_path):
    executor = RayExecutor()
    tasks = [{"index": i, "folder": str(tmp_path)} for i in range(40)]
    with pytest.raises(ValueError, match="part 0: bad input"):
        executor.map(fail_first_or_work, tasks, description="x")
    started = {p.name.split("-")[1] for p in tmp_path.glob("started-*")}
    ended = {p.name.split("-")[1] for p in tmp_path.glob("ended-*")}
    # Only the first window of parts was submitted, and none is still running: nothing
    # could write into a directory the version writer is about to remove.
    assert len(started) < executor.in_flight() and started == ended


# ---------------------------------------------------------------- small jobs run here

# A user's session of commands, in a fresh process: what it made, and whether Ray started.
SESSION = """
import json, sys
from jobs.cli import main

source, out = sys.argv[1], sys.argv[2]
codes = [
    main(["ingest", source, out + "/raw", "--part-steps", "150"]),
    main(["relabel", out + "/raw", out + "/relabeled", "--with", "returns", "--with", "skill"]),
    main(["info", out + "/relabeled", "--verify"]),
]
ray = sys.modules.get("ray")
print(json.dumps({"codes": codes, "ray_imported": ray is not None,
                  "ray_started": ray is not None and ray.is_initialized()}))
"""


def run_session(source: Path, out: Path, in_process_steps: str | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop(IN_PROCESS_STEPS_VARIABLE, None)
    if in_process_steps is not None:
        env[IN_PROCESS_STEPS_VARIABLE] = in_process_steps
    done = subprocess.run(
        [sys.executable, "-c", SESSION, str(source), str(out)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def version_bytes(uri: Path) -> dict[str, str]:
    """The dataset id and the sha256 of every file a version holds, but its manifest
    (which records where and when it was written)."""
    files = {
        str(path.relative_to(uri)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(uri.rglob("*"))
        if path.is_file() and path.name != "manifest.json"
    }
    return {"dataset_id": json.loads((uri / "manifest.json").read_text())["dataset_id"], **files}


@pytest.fixture
def d4rl_npz(tmp_path) -> Path:
    """600 steps in 6 episodes of 100 (obs 3, action 2), as a D4RL .npz file."""
    rng = np.random.default_rng(0)
    steps = 600
    path = tmp_path / "source.npz"
    np.savez(
        path,
        observations=rng.normal(size=(steps, 3)).astype(np.float32),
        actions=rng.uniform(-1, 1, size=(steps, 2)).astype(np.float32),
        rewards=rng.normal(size=steps).astype(np.float32),
        terminals=np.zeros(steps, bool),
        timeouts=np.arange(1, steps + 1) % 100 == 0,
    )
    return path


@pytest.mark.ray
@pytest.mark.slow
def test_a_small_job_runs_here_without_ray_and_writes_what_ray_writes(d4rl_npz, tmp_path):
    small = run_session(d4rl_npz, tmp_path / "here", in_process_steps=None)
    # 600 steps in 3 parts is above a limit of 100 steps: the same session on Ray.
    large = run_session(d4rl_npz, tmp_path / "ray", in_process_steps="100")

    assert small == {"codes": [0, 0, 0], "ray_imported": False, "ray_started": False}
    assert large["codes"] == [0, 0, 0] and large["ray_started"]
    for version in ("raw", "relabeled"):
        here = version_bytes(tmp_path / "here" / version)
        on_ray = version_bytes(tmp_path / "ray" / version)
        assert len(here) > 4 and here == on_ray, version


def test_info_never_starts_ray_even_when_every_job_would(tiny_dataset):
    script = (
        "import sys; from jobs.cli import main; "
        f"code = main(['info', {tiny_dataset!r}, '--verify']); "
        "print(code, 'ray' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), IN_PROCESS_STEPS_VARIABLE: "0"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True
    )
    assert done.stdout.split()[-2:] == ["0", "False"], done.stderr[-2000:]


@pytest.mark.parametrize(
    ("address", "parts", "total", "unit"),
    [
        (None, 1, 10, "steps"),  # the smallest job: still on the Ray already running
        (None, 4, 100, "steps"),
        (None, 6, 300, "episodes"),
        ("127.0.0.1:6379", 1, 10, "steps"),
    ],
)
def test_with_a_ray_running_here_or_an_address_every_job_runs_on_ray(
    ray_local, address, parts, total, unit
):
    assert not runs_in_process(address, parts, total, unit)


def test_the_in_process_limit_comes_from_the_environment_at_each_job(monkeypatch):
    from jobs.runtime import in_process_steps

    monkeypatch.setenv(IN_PROCESS_STEPS_VARIABLE, "250")
    assert in_process_steps() == 250
    monkeypatch.setenv(IN_PROCESS_STEPS_VARIABLE, "many")
    with pytest.raises(ValueError, match="HINDSIGHT_IN_PROCESS_STEPS='many': expected a whole"):
        in_process_steps()
