"""`python -m bench [NAME ...]`: run the benchmarks one after another, each in its own
process (so peak memory and Ray state are its own), writing bench/results/NAME.json.

Extra arguments after `--` go to every benchmark, e.g. `python -m bench relabel -- --steps 2000000`.
"""

from __future__ import annotations

import subprocess
import sys
import time

BENCHMARKS = (
    "small",
    "ingest",
    "lerobot_ingest",
    "lerobot_plan",
    "relabel",
    "returns",
    "goals",
    "instructions",
    "language",
    "text",
    "query",
    "shards",
    "frames",
    "collect_frames",
    "frames_loader",
    "train",
    "frames_train",
    "frames_train_shards",
    "rvs",
    "scale",
    "export",
    "lerobot",
)


def main(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    names, extra = argv[:split], argv[split + 1 :]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(
            f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr
        )
        return 2
    failed = []
    for name in names or BENCHMARKS:
        started = time.perf_counter()
        print(f"== bench.{name}", flush=True)
        code = subprocess.call([sys.executable, "-m", f"bench.{name}", *extra])
        print(
            f"== bench.{name}: exit {code} after {time.perf_counter() - started:.0f} s", flush=True
        )
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
