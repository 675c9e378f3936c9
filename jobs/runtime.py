"""Ray, embedded by default: with no address a local Ray starts in-process; with an
address (`ray://host:10001`, `host:6379` or `auto`) the same code runs on a cluster.

All parallel work goes through Ray Data (`map_parts`); there are no home-made pools.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

if TYPE_CHECKING:
    from ray.data import DataContext


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
    from ray.data import DataContext

    # Our own tqdm bar reports steps/s; Ray Data's bars and per-dataset INFO lines would
    # only repeat it on stderr.
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def map_parts(
    function: Callable[[dict[str, Any]], dict[str, Any]],
    tasks: list[dict[str, Any]],
    *,
    description: str,
    unit: str = "steps",
    total: int | None = None,
    num_cpus: float = 1.0,
) -> list[dict[str, Any]]:
    """Run `function` on every task dict with Ray Data, one task per block, and return the
    results in task order. Each task needs an integer "index"; each result may carry a
    count under `unit` that drives the progress bar (steps/s).

    Tasks and results cross process boundaries as JSON strings, so they stay plain data.
    """
    import ray.data

    def run_one(row: dict[str, Any]) -> dict[str, Any]:
        task = json.loads(row["task"])
        try:
            result = function(task)
        except Exception as error:
            if not is_ours(error):
                raise
            # Ray Data keeps only the text of a task's exception; send ours back as data
            # so the driver re-raises the same type with the same message.
            result = {ERROR_KEY: [type(error).__module__, type(error).__qualname__, str(error)]}
        return {"index": task["index"], "result": json.dumps(result)}

    if not tasks:
        return []
    rows = [{"task": json.dumps(task)} for task in tasks]
    items = ray.data.from_items(rows, override_num_blocks=len(rows))
    run_without_object_store_budget(items.context)  # this dataset's own copy of the context
    dataset = items.map(run_one, num_cpus=num_cpus)
    results: dict[int, dict[str, Any]] = {}
    with tqdm(total=total, desc=description, unit=f" {unit}", unit_scale=True, disable=None) as bar:
        for row in dataset.iter_rows():
            result = json.loads(row["result"])
            if ERROR_KEY in result:
                raise rebuild_error(*result[ERROR_KEY])
            results[int(row["index"])] = result
            bar.update(int(result.get(unit, 0)))
    return [results[int(task["index"])] for task in tasks]


def run_without_object_store_budget(context: DataContext) -> None:
    """Turn off Ray Data's object-store budget backpressure in one dataset's context.

    That policy starts a single task until it has seen one task's output size, so on 2
    CPUs one part ran alone for a whole task's time (8 tasks of 0.9 s: 4.9 s instead of
    3.7 s). Our tasks write their data to files and return a few hundred bytes of JSON,
    so there is no object-store budget to protect. The other policies stay on.
    """
    try:  # internal names: if Ray moves them, run with Ray's defaults
        from ray.data._internal.execution.backpressure_policy import (
            ENABLED_BACKPRESSURE_POLICIES,
            ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
            ResourceBudgetBackpressurePolicy,
        )
    except ImportError:
        logging.getLogger(__name__).debug("Ray Data's backpressure policies moved; defaults kept")
        return
    policies = context.get_config(
        ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, ENABLED_BACKPRESSURE_POLICIES
    )
    context.set_config(
        ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
        [policy for policy in policies if policy is not ResourceBudgetBackpressurePolicy],
    )


ERROR_KEY = "__hindsight_error__"
OUR_PACKAGES = ("engine", "relabelers", "jobs", "schemas", "trainers")


def is_ours(error: BaseException) -> bool:
    """Errors meant for people (ours, and plain ValueError/KeyError) rather than bugs."""
    module = type(error).__module__.split(".")[0]
    return module in OUR_PACKAGES or type(error) in (ValueError, KeyError)


def rebuild_error(module: str, name: str, message: str) -> Exception:
    """The exception a task raised, as the same type where it can be rebuilt."""
    try:
        error_type = getattr(importlib.import_module(module), name)
        return error_type(message)
    except Exception:
        return RuntimeError(message)
