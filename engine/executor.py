"""Running one function over many tasks: the seam between the engine and Ray.

The engine's jobs (ingest, collect, materialize, shards, relabel passes) are written as
`executor.map(function, tasks)` and never import Ray. jobs/runtime.py provides the Ray
executor (plain Ray tasks on the embedded Ray or on a cluster); `InProcess` runs the same
function over the same tasks one after another in this process (tests, small jobs, a
debugger). Either way the output bytes are the same: they depend on the tasks only.

A task is any picklable value; a result that has a count of the progress unit (`steps`
by default: an attribute or a key of that name) moves the progress bar by that much. A
unit's first word names that count, the rest qualifies it: "episodes with frames" counts
`episodes`, and where a job runs (jobs/runtime.py) weighs them heavier than "episodes".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from engine.progress import Progress

Task = TypeVar("Task")
Result = TypeVar("Result")


class Executor(Protocol):
    def map(
        self,
        function: Callable[[Task], Result],
        tasks: Sequence[Task],
        *,
        description: str,
        total: int | None = None,
        unit: str = "steps",
    ) -> list[Result]:
        """`[function(task) for task in tasks]`, in task order, with progress; the first
        error raised by a task is raised here (with its own type and message)."""
        ...


def work_done(result: Any, unit: str = "steps") -> int:
    """How far a result moves the progress bar: its count of `unit` (of the unit's first
    word), else 0."""
    name = unit.split()[0] if unit.strip() else unit
    if isinstance(result, dict):
        return int(result.get(name, 0) or 0)
    return int(getattr(result, name, 0) or 0)


class InProcess:
    """Every task here, one after another."""

    def map(
        self,
        function: Callable[[Task], Result],
        tasks: Sequence[Task],
        *,
        description: str,
        total: int | None = None,
        unit: str = "steps",
    ) -> list[Result]:
        results = []
        with Progress(description, total, unit) as progress:
            for task in tasks:
                result = function(task)
                results.append(result)
                progress.advance(work_done(result, unit))
        return results
