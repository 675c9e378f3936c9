"""Benchmark of the `language` relabeler against a loopback OpenAI-compatible server.

    .venv/bin/python -m bench.language --out bench/results/language.json [--episodes 400]

The server (tests/llm_server.py, in its own process so it does not compete with the client
for the GIL) answers every request after a fixed latency (200 ms), like a hosted model.
We measure descriptions per second at the default concurrency and, in the same run, the
sequential rate (concurrency 1, the baseline: a loop around the API). Goal: at least
0.8 x concurrency x the sequential rate. Also reported: other concurrencies, and the rate of
a re-run served entirely from the cache (zero requests).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from relabelers.base import Part, TableInputs
from relabelers.language import LanguageParams, LanguageRelabeler
from tests.synthetic import make_episodes


class ServerProcess:
    """tests/llm_server.py in a subprocess; `count()` asks it how many chats it served."""

    def __init__(self, latency: float):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.llm_server", "--latency", str(latency)],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.url = self.process.stdout.readline().strip()

    def count(self) -> int:
        with urllib.request.urlopen(self.url + "/_stats") as answer:
            return json.load(answer)["requests"].get("/v1/chat/completions", 0)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


def describe(server: ServerProcess, episodes: int, concurrency: int, cache: str) -> dict:
    """Describe `episodes` episodes with a cold cache; descriptions/s and requests sent."""
    steps, table = make_episodes(episodes, seed=episodes, min_length=20, max_length=60)
    relabeler = LanguageRelabeler(
        {"base_url": server.url, "cache": cache, "concurrency": concurrency, "n": 3}
    )
    relabeler.setup(TableInputs(steps, table))  # percentiles of the returns: not timed
    before = server.count()
    start, cpu = time.perf_counter(), time.process_time()
    output = relabeler.run(steps, table, Part(0, 1, "bench")).episodes
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    ok = output.column("description_status").to_pylist().count("ok")
    assert ok == episodes, f"only {ok} of {episodes} described"
    return {
        "concurrency": concurrency,
        "episodes": episodes,
        "seconds": round(seconds, 3),
        "descriptions_per_s": round(episodes / seconds, 2),
        "requests": server.count() - before,
        # The client's own CPU per description: what caps the rate when latency does not.
        "client_cpu_ms_per_description": round(1000 * cpu / episodes, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--out", default="bench/results/language.json")
    parser.add_argument("--episodes", type=int, default=400, help="episodes per concurrent run")
    parser.add_argument(
        "--sequential-episodes", type=int, default=25, help="episodes of the sequential baseline"
    )
    parser.add_argument("--latency", type=float, default=0.2, help="server latency, seconds")
    parser.add_argument(
        "--sweep", default="4,64", help="other concurrencies to measure (comma separated)"
    )
    args = parser.parse_args()
    os.environ.pop("OPENAI_API_KEY", None)  # a loopback server needs no key

    default = LanguageParams.model_fields["concurrency"].default
    server = ServerProcess(args.latency)
    try:
        with tempfile.TemporaryDirectory(prefix="hs-bench-llm-") as root:
            describe(server, 4, 1, f"{root}/warm-up")  # imports and first connection, untimed
            sequential = describe(server, args.sequential_episodes, 1, f"{root}/seq")
            concurrent = describe(server, args.episodes, default, f"{root}/default")
            sweep = [
                describe(server, args.episodes, int(c), f"{root}/c{c}")
                for c in filter(None, args.sweep.split(","))
            ]
            # A re-run of the default run: every answer from the cache, zero requests.
            cached = describe(server, args.episodes, default, f"{root}/default")
    finally:
        server.stop()

    ideal = default * sequential["descriptions_per_s"]
    result = {
        "benchmark": "language relabeler, loopback OpenAI-compatible server",
        "server_latency_s": args.latency,
        "default_concurrency": default,
        "sequential": sequential,
        "default": concurrent,
        "sweep": sweep,
        "cached_rerun": cached,
        "speedup_vs_sequential": round(
            concurrent["descriptions_per_s"] / sequential["descriptions_per_s"], 2
        ),
        "goal_descriptions_per_s": round(0.8 * ideal, 2),
        "efficiency": round(concurrent["descriptions_per_s"] / ideal, 3),
        "goal_met": concurrent["descriptions_per_s"] >= 0.8 * ideal,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average_1min": round(os.getloadavg()[0], 1),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
