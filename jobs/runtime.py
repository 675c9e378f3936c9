"""Ray, embedded by default: with no address a local Ray starts in-process; with an
address (`ray://host:10001`, `host:6379` or `auto`) the same code runs on a cluster.

The engine's jobs run their parts through an `engine.executor.Executor`; `RayExecutor`
is Ray's: one plain Ray task per part, scheduled by Ray as CPUs free up, results in task
order, progress as parts finish. There are no home-made pools.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from engine.executor import Result, Task, work_done
from engine.progress import Progress


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
) -> None:
    """Connect to a Ray cluster at `address`, or start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    if address and address.startswith(("http://", "https://")):
        raise ValueError(
            f"--address {address} is a job-submission (dashboard) address; use "
            "`hindsight submit SPEC --address ...` for that, or a Ray address "
            "(ray://HOST:10001, HOST:6379, auto) to run this command on the cluster"
        )
    if address is None:
        # An embedded Ray lives on loopback inside this process tree; token auth only
        # gets in the way there (Ray 2.60 turns it on after the first ray.init()).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            num_cpus=num_cpus,
            object_store_memory=object_store_memory,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            _temp_dir=os.environ.get("RAY_TMPDIR"),
        )
    else:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)


RUNNING_WAIT_S = 120.0  # how long a failed job waits for its running parts to end
OUR_PACKAGES = ("engine", "relabelers", "jobs", "schemas", "trainers")


def is_ours(error: BaseException) -> bool:
    """Errors meant for people (ours, and plain ValueError/KeyError) rather than bugs."""
    module = type(error).__module__.split(".")[0]
    return module in OUR_PACKAGES or type(error) in (ValueError, KeyError)


@dataclass(frozen=True)
class TaskFailure:
    """An error of ours raised in a task, sent back as data: Ray cannot deserialize every
    exception (one whose __init__ takes other arguments than its message), and the user
    must see the same type and message as in-process."""

    module: str
    name: str
    message: str

    def rebuild(self) -> Exception:
        """The same type with the same message where the type is made from a message
        alone; else a RuntimeError that names the type."""
        try:
            error_type = getattr(importlib.import_module(self.module), self.name)
        except Exception:
            error_type = None
        if isinstance(error_type, type) and takes_a_message(error_type):
            return error_type(self.message)
        return RuntimeError(f"{self.name}: {self.message}")


def takes_a_message(error_type: type) -> bool:
    """Whether `error_type(message)` rebuilds the error: no class of ours in its lineage
    defines another __init__ (builtin exceptions all take a message)."""
    return all(
        "__init__" not in vars(cls) or cls.__module__ == "builtins"
        for cls in error_type.__mro__
        if cls is not object
    )


def _run_task(function: Callable[[Task], Result], task: Task) -> Result | TaskFailure:
    try:
        return function(task)
    except Exception as error:
        if not is_ours(error):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        return TaskFailure(type(error).__module__, type(error).__qualname__, str(message))


class RayExecutor:
    """One Ray task per part (`num_cpus` each) on the Ray that `init_ray` connected to.

    At most a few tasks per CPU of the cluster are submitted at a time, and more as they
    finish (Ray's documented pattern for limiting pending tasks with `ray.wait`): every
    CPU stays busy, and when a part fails no further part starts. The job then waits for
    the parts still running before it raises, so that none writes a file while the
    version writer removes the staging directory. (Cancelling them instead hits a Ray bug:
    a task cancelled as its reply arrives aborts the driver, "Tried to complete task that
    was not pending".)
    """

    def __init__(self, num_cpus: float = 1.0, tasks_per_cpu: int = 2):
        self.num_cpus = num_cpus
        self.tasks_per_cpu = tasks_per_cpu

    def in_flight(self) -> int:
        """How many tasks are submitted at a time: a few per CPU of the cluster."""
        import ray

        cpus = ray.cluster_resources().get("CPU", 1.0)
        return max(1, int(cpus / self.num_cpus) * self.tasks_per_cpu)

    def map(
        self,
        function: Callable[[Task], Result],
        tasks: Sequence[Task],
        *,
        description: str,
        total: int | None = None,
        unit: str = "steps",
    ) -> list[Result]:
        import ray

        if not tasks:
            return []
        remote = ray.remote(num_cpus=self.num_cpus)(_run_task)
        function_ref = ray.put(function)  # shipped once, not once per task
        limit = self.in_flight()
        waiting = iter(enumerate(tasks))
        running: dict[Any, int] = {}
        results: dict[int, Any] = {}

        def submit() -> None:
            for index, task in waiting:
                running[remote.remote(function_ref, task)] = index
                if len(running) >= limit:
                    return

        with Progress(description, total, unit) as progress:
            submit()
            try:
                while running:
                    done, _ = ray.wait(list(running), num_returns=1)
                    for ref in done:
                        index = running.pop(ref)
                        result = ray.get(ref)
                        if isinstance(result, TaskFailure):
                            raise result.rebuild()
                        results[index] = result
                        progress.advance(work_done(result, unit))
                    submit()
            except Exception:
                if running:  # let the parts already running finish; start no other
                    ray.wait(list(running), num_returns=len(running), timeout=RUNNING_WAIT_S)
                raise
        return [results[index] for index in range(len(tasks))]
