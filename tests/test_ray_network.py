"""The embedded Ray is private to its driver: every port it opens listens on loopback
only, and none of its processes outlives a killed driver for long.

Each test starts a real embedded Ray through `jobs.runtime.init_ray` in a driver
subprocess (so the session's own Ray does not interfere), with token auth off as in the
tests, and reads the kernel's socket and process tables, not Ray's configuration.
Only processes started here are ever killed, by PID; never `ray stop`.
"""

from __future__ import annotations

import ipaddress
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc"),
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 180.0  # a cold Ray start on two loaded cores
REAPED_WITHIN_S = 15.0  # Ray's own agents linger about 60 s (a publish to the dead GCS)

# A driver as a user's `hindsight relabel` is one: an embedded Ray, a few tasks, and then
# it waits (for the test to close its stdin, or to kill it).
DRIVER = """
import sys
import ray
from jobs.runtime import init_ray

init_ray(num_cpus=2)

@ray.remote
def plus_one(x):
    return x + 1

assert ray.get([plus_one.remote(i) for i in range(4)]) == [1, 2, 3, 4]
print("ready", flush=True)
sys.stdin.read()
"""


# ---------------------------------------------------------------- the process table


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def identity(pid: int) -> tuple[int, str] | None:
    """(pid, start time in clock ticks): a PID reused by another process does not match;
    None for a process that is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else (pid, fields[19])


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (parent := parent_of(int(entry))) is not None:
            children.setdefault(parent, []).append(int(entry))
    found, frontier = set(), [root]
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


# ---------------------------------------------------------------- the socket table


def listening_sockets() -> dict[str, tuple[str, int]]:
    """inode -> (address, port) of every listening TCP socket, IPv4 and IPv6."""
    sockets = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address_hex, port_hex = fields[1].split(":")
            sockets[fields[9]] = (decode_address(address_hex, width), int(port_hex, 16))
    return sockets


def decode_address(text: str, width: int) -> str:
    """/proc/net/tcp writes each 32-bit word of an address in host (little-endian) order."""
    words = [bytes.fromhex(text[i : i + 8])[::-1] for i in range(0, width, 8)]
    return str(ipaddress.ip_address(b"".join(words)))


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    except OSError:
        pass  # the process ended meanwhile
    return inodes


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()[-40:]
    except OSError:
        return "?"


# ---------------------------------------------------------------- a driver


@dataclass
class Driver:
    process: subprocess.Popen
    started: set[tuple[int, str]]  # identities of every process it started


@pytest.fixture
def driver() -> Iterator[Driver]:
    """A driver subprocess whose embedded Ray has run a few tasks; afterwards every
    process it started is gone (killed by PID if need be), its temp dir removed."""
    temp_dir = tempfile.mkdtemp(prefix="hs-net-")  # short: Ray's socket paths have a limit
    env = {**os.environ, "RAY_TMPDIR": temp_dir, "PYTHONPATH": str(PROJECT_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", DRIVER],
        cwd=PROJECT_ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started: set[tuple[int, str]] = set()
    try:
        wait_until_ready(process)
        started = {who for pid in descendants(process.pid) if (who := identity(pid))}
        yield Driver(process, started)
    finally:
        if process.poll() is None:
            process.stdin.close()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid, start in started:  # only what this driver started, by PID
            if identity(pid) == (pid, start):
                os.kill(pid, signal.SIGKILL)
        for pipe in (process.stdin, process.stdout, process.stderr):
            pipe.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_until_ready(process: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 1.0)
        if ready:
            line = process.stdout.readline()
            if line.strip() == "ready":
                return
            if not line:  # the driver ended
                raise AssertionError(f"driver failed:\n{process.stderr.read()[-3000:]}")
    process.kill()
    raise AssertionError(f"no embedded Ray within {READY_TIMEOUT_S:.0f} s")


# ---------------------------------------------------------------- the tests


def test_every_port_of_the_embedded_ray_listens_on_loopback_only(driver):
    listening = listening_sockets()
    bound = [
        (pid, process_name(pid), *listening[inode])
        for pid in {driver.process.pid} | descendants(driver.process.pid)
        for inode in socket_inodes(pid)
        if inode in listening
    ]
    # GCS, raylet (node and object manager), the driver, workers, the agents: not vacuous.
    assert len(bound) >= 5, bound
    exposed = [entry for entry in bound if not is_loopback(entry[2])]
    assert not exposed, f"listening beyond loopback (pid, process, address, port): {exposed}"


def test_no_process_of_the_embedded_ray_outlives_a_killed_driver(driver):
    started = driver.started
    assert len(started) >= 3, started  # GCS, raylet, agents, workers
    driver.process.kill()  # SIGKILL: no atexit, no ray.shutdown()
    driver.process.wait()
    deadline = time.monotonic() + REAPED_WITHIN_S
    while time.monotonic() < deadline:
        alive = [who for who in started if identity(who[0]) == who]
        if not alive:
            return
        time.sleep(0.25)
    names = [process_name(pid) for pid, _ in alive]
    raise AssertionError(
        f"{len(alive)} Ray processes outlived their driver by {REAPED_WITHIN_S:.0f} s: {names}"
    )
