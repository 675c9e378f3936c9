"""Benchmarks: each module runs as `python -m bench.<name> --out bench/results/<name>.json`.

Speeds are reported as ratios against a baseline measured in the same run on the same data.
"""

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def save_results(results: dict[str, Any], out: str | Path, echo: bool = True) -> None:
    """Write a benchmark's results as JSON at `out` (folders made), and print them."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2) + "\n"
    out.write_text(text)
    print(text if echo else f"wrote {out}", end="" if echo else "\n")


def torch_machine(device: str) -> dict[str, Any]:
    """What a torch benchmark ran on: device, its name, torch's threads and the cores."""
    import torch  # only the torch benchmarks pay for it

    name = torch.cuda.get_device_name() if device == "cuda" else ""
    return {
        "device": device,
        "device_name": name or platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def best_of(repeats: int, timed: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Wall seconds of each callable, the best of `repeats` rounds; within a round they run
    in turn, so a burst of load on the machine hits every side alike. With `cpu`, also
    the best CPU seconds of this process (`name_cpu`), which other processes on the
    machine disturb less (but which leave out waiting for the disk)."""
    best = dict.fromkeys(timed, float("inf"))
    cpu = dict.fromkeys(timed, float("inf"))
    for _ in range(repeats):
        for name, function in timed.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            function()
            best[name] = min(best[name], time.perf_counter() - start)
            cpu[name] = min(cpu[name], time.process_time() - start_cpu)
    return {name: round(seconds, 4) for name, seconds in best.items()} | {
        f"{name}_cpu": round(seconds, 4) for name, seconds in cpu.items()
    }
