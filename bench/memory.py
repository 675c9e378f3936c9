"""Peak memory and CPU time of this process and everything it started (Ray workers), from
/proc: what the benchmarks report as their memory figures."""

from __future__ import annotations

import os
import threading


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class TreeMemory:
    """Peak RSS (and CPU time) of this process and all its descendants, sampled in a thread.

    CPU seconds are a fairer "per core" measure than wall time on a shared machine.
    """

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak_tree = 0
        self.peak_single = 0  # the largest process, this one included
        self.peak_single_child = 0  # the largest process this one started
        self._ticks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        children = _children_by_parent()
        stack, tree = [os.getpid()], []
        while stack:
            pid = stack.pop()
            tree.append(pid)
            stack.extend(children.get(pid, []))
        sizes = [_rss_bytes(pid) for pid in tree]
        for pid in tree:
            self._ticks[pid] = max(self._ticks.get(pid, 0), _cpu_ticks(pid))
        self.peak_tree = max(self.peak_tree, sum(sizes))
        self.peak_single = max([self.peak_single, *sizes])
        self.peak_single_child = max([self.peak_single_child, *sizes[1:]])

    def cpu_seconds(self) -> float:
        """CPU time used so far by the process tree (processes that exited count up to
        their last sample)."""
        self._sample()
        return sum(self._ticks.values()) / os.sysconf("SC_CLK_TCK")

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
