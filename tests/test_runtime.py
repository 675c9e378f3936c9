"""jobs.runtime.RayExecutor: parts run side by side as Ray tasks; results and errors return."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from engine.executor import InProcess
from jobs.runtime import RayExecutor


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
