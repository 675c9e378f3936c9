"""Ray, embedded by default: with no address a local Ray starts in-process; with an
address (`ray://host:10001`, `host:6379` or `auto`) the same code runs on a cluster.

The engine's jobs run their parts through an `engine.executor.Executor`; `RayExecutor`
is Ray's: one plain Ray task per part, scheduled by Ray as CPUs free up, results in task
order, progress as parts finish. There are no home-made pools. `SizedExecutor` (what
commands use) runs a small job here instead, without starting Ray at all.

The embedded Ray is private to its driver: every port it opens listens on loopback, and
a watchdog process ends whatever Ray processes are left when the driver dies, even by
SIGKILL (tests/test_ray_network.py checks both in the kernel's tables).
"""

from __future__ import annotations

import importlib
import ipaddress
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from engine.executor import InProcess, Result, Task, work_done
from engine.progress import Progress


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
) -> None:
    """Connect to a Ray cluster at `address`, or start an embedded local Ray that only
    this machine can reach (every port on loopback) and that ends with this process."""
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
        start_embedded_ray(num_cpus, object_store_memory)
    else:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)


LOOPBACK = "127.0.0.1"
# Each watchdog and the write end of its pipe: a plain descriptor, which only the kernel
# closes when this process ends (a pipe object would be closed as the interpreter shuts
# down, while Ray is still shutting down, and its processes and the driver still live).
_watchdogs: list[tuple[subprocess.Popen, int]] = []


def start_embedded_ray(num_cpus: int | None, object_store_memory: int | None) -> None:
    """A local Ray on loopback only, whose processes a watchdog ends with this one."""
    import ray
    from ray._private import ray_constants

    # Nothing listens beyond loopback, so token auth would only get in the way (Ray 2.60
    # turns it on after the first ray.init() and keeps a token in ~/.ray); a user who
    # shares the machine with others sets RAY_AUTH_MODE=token and keeps it.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray turns a loopback node address into the machine's own IP, and then its GCS,
    # raylet, workers and agents listen on every interface, unless this is a local-only
    # Ray: the switch Ray itself uses on macOS and Windows (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER,
    # read when Ray is imported). Flipped for this start only: in the environment it would
    # reach `ray start` run from here, and afterwards it would give a later connection to
    # a cluster from this process a loopback address.
    cluster_switch = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        context = ray.init(
            num_cpus=num_cpus,
            object_store_memory=object_store_memory,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            _temp_dir=os.environ.get("RAY_TMPDIR"),
            _node_ip_address=LOOPBACK,
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_switch
    node_ip = ray.util.get_node_ip_address()
    if not is_loopback(node_ip) and os.environ["RAY_AUTH_MODE"] != "token":
        ray.shutdown()  # fail closed: never a Ray without auth that the network reaches
        raise RuntimeError(
            f"the embedded Ray would listen on {node_ip}, not on loopback; set "
            "RAY_AUTH_MODE=token to run it with token auth"
        )
    watch_for_death(context.address_info["session_dir"])


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


# The watchdog blocks on a pipe from this process, which the kernel closes however this
# process ends; then it ends every process that holds a file of the Ray session open (each
# Ray process writes its logs there). Ray's own reaping leaves the dashboard and
# runtime-env agents running, and listening, for a minute after a SIGKILL of the driver
# (they first try to report to the dead GCS), and their environment cannot mark them:
# Ray's process titles overwrite it.
WATCHDOG = r"""
import os, signal, sys, time

session = os.path.realpath(sys.argv[1]) + os.sep
driver = os.getppid()
sys.stdin.buffer.read()  # returns once the driver is gone (or closed its end)
while os.getppid() == driver:  # orphaned: the driver has ended
    time.sleep(0.05)


def session_processes():
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            if any(os.readlink(f"/proc/{entry}/fd/{fd}").startswith(session) for fd in fds):
                pids.append(int(entry))
        except OSError:  # gone meanwhile, or not ours
            pass
    return pids


def signal_all(signal_number):
    for pid in session_processes():
        try:
            os.kill(pid, signal_number)
        except OSError:
            pass


signal_all(signal.SIGTERM)
deadline = time.monotonic() + 2.0
while session_processes() and time.monotonic() < deadline:
    time.sleep(0.1)
signal_all(signal.SIGKILL)
"""


def watch_for_death(session_dir: str) -> None:
    """Start the watchdog of the Ray session in `session_dir` (on Linux: it reads /proc)."""
    if not sys.platform.startswith("linux"):
        return
    read_end, write_end = os.pipe()  # neither is inherited by other children
    watchdog = subprocess.Popen(
        [sys.executable, "-c", WATCHDOG, session_dir],
        stdin=read_end,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C at the terminal stops the driver, not this
    )
    os.close(read_end)
    _watchdogs.append((watchdog, write_end))


RUNNING_WAIT_S = 120.0  # how long a failed job waits for its running parts to end
OUR_PACKAGES = ("engine", "relabelers", "jobs", "schemas", "trainers")


def is_ours(error: BaseException) -> bool:
    """Errors meant for people (ours, plain ValueError/KeyError, and I/O errors such as a
    full disk, whose message names the file) rather than bugs."""
    module = type(error).__module__.split(".")[0]
    return (
        module in OUR_PACKAGES
        or type(error) in (ValueError, KeyError)
        or isinstance(error, OSError)
    )


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


# ---------------------------------------------------------------- small jobs run here

# Jobs of at most this many steps run in this process without starting Ray (a single part
# always does; nothing does at 0). Measured on 2 cores (bench/small.py, docs/cluster.md):
# starting the embedded Ray costs 3-12 s, while the engine's parts run at 0.3-2M steps/s
# per core, so below about a million steps Ray's other cores never win its start back
# (1M steps in 4 parts: ingest, relabel and shard ran 3.1-8.1x faster here than on a cold
# Ray, bench/results/small.json).
IN_PROCESS_STEPS = 1_000_000
IN_PROCESS_STEPS_VARIABLE = "HINDSIGHT_IN_PROCESS_STEPS"  # read at each job: tests, benchmarks
# An episode to roll out (collect: a job sized in episodes) weighs as much as this many
# stored steps: stepping an environment costs ~30 us a step, a stored step 1-2 us a job.
# So 500 episodes run here: 300 of Pendulum's 200 steps take 2 s, and 500 of a 1000-step
# environment about as long as Ray takes to start and share them over 2 cores.
EPISODE_WEIGHT = 2_000
# An episode rolled out with camera frames (`collect --frames`) weighs 100 times more:
# rendering, resizing and encoding a frame take ~3 ms, a hundred steps' worth, so 300
# Pendulum episodes take ~200 s on one core: any such job beyond a few episodes uses Ray.
FRAMES_EPISODE_WEIGHT = 100 * EPISODE_WEIGHT


def in_process_steps() -> int:
    """The in-process limit now: HINDSIGHT_IN_PROCESS_STEPS, or IN_PROCESS_STEPS."""
    value = os.environ.get(IN_PROCESS_STEPS_VARIABLE, "").strip()
    try:
        return int(value) if value else IN_PROCESS_STEPS
    except ValueError:
        raise ValueError(
            f"{IN_PROCESS_STEPS_VARIABLE}={value!r}: expected a whole number of steps"
        ) from None


def ray_is_running() -> bool:
    """Whether this process is connected to a Ray (without importing Ray to find out)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def runs_in_process(address: str | None, parts: int, total: int | None, unit: str) -> bool:
    """Whether a job of `parts` parts and `total` `unit`s runs here rather than on Ray:
    never with an address or when this process already runs a Ray; a single part always
    (Ray could only run it elsewhere, later); else when its size in steps is at most the
    in-process limit (an episode weighs EPISODE_WEIGHT steps; an unknown size,
    never)."""
    limit = in_process_steps()
    if address is not None or ray_is_running() or limit <= 0:
        return False
    if parts <= 1:
        return True
    per_unit = {
        "steps": 1,
        "episodes": EPISODE_WEIGHT,
        "episodes with frames": FRAMES_EPISODE_WEIGHT,
    }.get(unit)
    return total is not None and per_unit is not None and total * per_unit <= limit


class SizedExecutor:
    """The executor of a command: each `map` runs in this process when the job is small
    (`runs_in_process`), else on Ray, started (or joined at `address`) on first need.
    Same function, same tasks, so the same output bytes either way."""

    def __init__(self, address: str | None = None):
        self.address = address

    def map(
        self,
        function: Callable[[Task], Result],
        tasks: Sequence[Task],
        *,
        description: str,
        total: int | None = None,
        unit: str = "steps",
    ) -> list[Result]:
        executor: InProcess | RayExecutor = InProcess()
        if not runs_in_process(self.address, len(tasks), total, unit):
            init_ray(self.address)
            executor = RayExecutor()
        return executor.map(function, tasks, description=description, total=total, unit=unit)
