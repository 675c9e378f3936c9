"""jobs.runtime.map_parts: parts run side by side on Ray Data; results and errors return."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from jobs.runtime import map_parts


def meet_another(task: dict) -> dict:
    """Mark this task started, then wait (at most `wait_s`) until another one started."""
    folder = Path(task["folder"])
    (folder / f"started-{task['index']}").touch()
    deadline = time.monotonic() + task["wait_s"]
    while len(list(folder.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"saw_another": len(list(folder.iterdir())) >= 2}


def test_two_parts_run_at_the_same_time_from_the_start(ray_local, tmp_path):
    from ray.data import DataContext

    before = DataContext.get_current().get_config("backpressure_policies.enabled", None)
    tasks = [{"index": i, "folder": str(tmp_path), "wait_s": 10.0} for i in range(4)]
    results = map_parts(meet_another, tasks, description="meet")
    # One at a time, each task would wait 10 s in vain. (Ray Data's object-store budget
    # policy, which map_parts turns off, held back the second task in jobs of heavy parts.)
    assert all(r["saw_another"] for r in results)
    assert DataContext.get_current().get_config("backpressure_policies.enabled", None) == before


def refuse(task: dict) -> dict:
    if task["index"] == 1:
        raise ValueError(f"part {task['index']}: bad input")
    return {"index_seen": task["index"]}


def test_results_come_back_in_task_order_and_our_errors_keep_their_type(ray_local):
    tasks = [{"index": i} for i in (2, 0)]
    assert [r["index_seen"] for r in map_parts(refuse, tasks, description="x")] == [2, 0]
    with pytest.raises(ValueError, match="part 1: bad input"):
        map_parts(refuse, [{"index": i} for i in range(3)], description="x")
