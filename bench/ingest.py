"""Ingest throughput and memory against a bare pyarrow/Parquet write of the same arrays.

    python -m bench.ingest --out bench/results/ingest.json [--steps 2000000]

1. Generate a D4RL-style HDF5 file (obs 17 floats, action 6, episodes of up to 1000 steps
   ending at terminals or timeouts), written chunk by chunk.
2. Baseline, in one process: read the arrays from the HDF5 file chunk by chunk and write
   one Parquet file with pyarrow (zstd, no dictionary on floats): the practical ceiling.
3. Ingest of the same file on the embedded local Ray, as `hindsight ingest` runs it
   (`engine.ingest.plan_ingest`: planning pass and validation; `engine.ingest.ingest` with
   `RayExecutor`: parts written in parallel, commit).

Each measurement runs in its own subprocess, so that peak memory is its own: the peak
RSS of the process (ru_maxrss) and, sampled every 0.2 s from /proc, the peak RSS of its
whole process tree (Ray's raylet, GCS and workers) and of the largest single process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import save_results
from bench.memory import TreeMemory

OBS_DIM = 17
ACTION_DIM = 6
CHUNK = 1 << 18


def _peak_self_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------- the source file


def generate_d4rl(path: str, steps: int, seed: int = 0) -> dict:
    """A D4RL-style HDF5 file written in chunks (memory independent of `steps`)."""
    import h5py

    rng = np.random.default_rng(seed)
    lengths = []
    with h5py.File(path, "w") as handle:
        datasets = {
            "observations": handle.create_dataset("observations", (steps, OBS_DIM), "f4"),
            "next_observations": handle.create_dataset("next_observations", (steps, OBS_DIM), "f4"),
            "actions": handle.create_dataset("actions", (steps, ACTION_DIM), "f4"),
            "rewards": handle.create_dataset("rewards", (steps,), "f4"),
            "terminals": handle.create_dataset("terminals", (steps,), "?"),
            "timeouts": handle.create_dataset("timeouts", (steps,), "?"),
        }
        # Episodes: 1000 steps (timeout) or ended early by a terminal.
        ends, position = [], 0
        while position < steps:
            length = 1000 if rng.random() < 0.7 else int(rng.integers(50, 1000))
            position = min(steps, position + length)
            ends.append(position - 1)
        ends = np.asarray(ends)
        lengths = np.diff(np.concatenate([[-1], ends]))
        for start in range(0, steps, CHUNK):
            stop = min(steps, start + CHUNK)
            n = stop - start
            observations = rng.normal(size=(n, OBS_DIM)).astype(np.float32)
            datasets["observations"][start:stop] = observations
            datasets["next_observations"][start:stop] = observations + 0.01
            datasets["actions"][start:stop] = rng.uniform(-1, 1, (n, ACTION_DIM)).astype(np.float32)
            datasets["rewards"][start:stop] = rng.normal(size=n).astype(np.float32)
            local = ends[(ends >= start) & (ends < stop)] - start
            flags = np.zeros(n, bool)
            flags[local] = True
            full = np.isin(local + start, ends[lengths == 1000])
            terminals = flags.copy()
            terminals[local[full]] = False
            datasets["terminals"][start:stop] = terminals
            datasets["timeouts"][start:stop] = flags & ~terminals
    return {"steps": steps, "episodes": len(lengths), "bytes": os.path.getsize(path)}


# ---------------------------------------------------------------- the two measurements


def run_baseline(source: str, output: str) -> dict:
    """Read the HDF5 arrays in chunks and write one Parquet file: no Ray, no validation."""
    import h5py
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.writer import ROW_GROUP_ROWS
    from schemas import steps as cols

    started = time.perf_counter()
    with TreeMemory() as memory, h5py.File(source, "r") as handle:
        total = handle["rewards"].shape[0]
        writer = None
        episode_offset = 0
        for start in range(0, total, 1 << 20):
            stop = min(total, start + (1 << 20))
            ends = handle["terminals"][start:stop] | handle["timeouts"][start:stop]
            episode_ids = episode_offset + np.concatenate([[0], np.cumsum(ends[:-1])])
            episode_offset = int(episode_ids[-1]) + int(ends[-1])
            table = pa.table(
                {
                    "episode_id": episode_ids.astype(np.int64),
                    "observation": cols.vectors_to_arrow(handle["observations"][start:stop]),
                    "action": cols.vectors_to_arrow(handle["actions"][start:stop]),
                    "reward": handle["rewards"][start:stop],
                    "terminated": handle["terminals"][start:stop],
                    "truncated": handle["timeouts"][start:stop],
                    "next_observation": cols.vectors_to_arrow(
                        handle["next_observations"][start:stop]
                    ),
                }
            )
            if writer is None:
                writer = pq.ParquetWriter(
                    output, table.schema, compression="zstd", use_dictionary=["episode_id"]
                )
            # The same row-group size as the dataset's step files.
            writer.write_table(table, row_group_size=ROW_GROUP_ROWS["steps"])
        writer.close()
    seconds = time.perf_counter() - started
    cpu = memory.cpu_seconds()
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "steps_per_second": total / seconds,
        "steps_per_cpu_second": total / cpu,
        "cpus": 1,
        "peak_rss_driver_bytes": _peak_self_bytes(),
        "peak_rss_tree_bytes": memory.peak_tree,
        "output_bytes": os.path.getsize(output),
    }


def run_ingest_measurement(source: str, output: str, part_steps: int) -> dict:
    """Ingest (planning pass, then parts as Ray tasks, commit) on the embedded local Ray,
    twice: cold (a fresh Ray whose workers still import everything, as a one-off command
    on a laptop) and warm (workers already started, as on a long-lived cluster). Ray's own
    start-up is timed separately."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import ray

    from engine.ingest import ingest, plan_ingest
    from jobs.runtime import RayExecutor, init_ray

    measured = {}
    with TreeMemory() as memory:
        started = time.perf_counter()
        init_ray()
        ray_started = time.perf_counter()
        for run in ("cold", "warm"):
            cpu_before = memory.cpu_seconds()
            began = time.perf_counter()
            plan = plan_ingest(source, env_id="Bench-v0", part_steps=part_steps)
            manifest = ingest(
                plan, f"{output}-{run}", executor=RayExecutor(), command="bench.ingest"
            )
            seconds = time.perf_counter() - began
            cpu = memory.cpu_seconds() - cpu_before
            measured[run] = {
                "seconds": seconds,
                "cpu_seconds": cpu,
                "steps_per_second": manifest.steps / seconds,
                "steps_per_cpu_second": manifest.steps / cpu,
            }
        cpus = int(ray.cluster_resources().get("CPU", 1))
    ray.shutdown()
    output_bytes = sum(f.stat().st_size for f in Path(f"{output}-cold").rglob("*.parquet"))
    return {
        **measured["cold"],
        "warm": measured["warm"],
        "ray_start_seconds": ray_started - started,
        "cpus": cpus,
        "parts": len(manifest.parts),
        "part_steps": part_steps,
        "episodes": manifest.episodes,
        "peak_rss_driver_bytes": _peak_self_bytes(),
        "peak_rss_tree_bytes": memory.peak_tree,
        "peak_rss_largest_child_bytes": memory.peak_single_child,
        "output_bytes": output_bytes,
    }


def _in_subprocess(kind: str, source: str, output: str, part_steps: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "bench.ingest",
        "--measure",
        kind,
        "--source",
        source,
        "--output",
        output,
        "--part-steps",
        str(part_steps),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{kind} measurement failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _mib(value: int) -> float:
    return round(value / 2**20, 1)


def markdown_table(results: dict) -> str:
    """The README's performance table."""
    lines = [
        "| steps | bare pyarrow, 1 process | ingest, cold Ray | ingest, warm Ray "
        "| warm ingest per core / bare | steps per CPU-second, warm ingest / bare "
        "| peak RSS: bare | ingest driver | largest Ray worker |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in results["runs"]:
        base, ingest = run["baseline"], run["ingest"]
        lines.append(
            f"| {run['source']['steps']:,} | {base['steps_per_second']:,.0f} steps/s "
            f"| {ingest['steps_per_second']:,.0f} steps/s ({ingest['cpus']} CPUs) "
            f"| {ingest['warm']['steps_per_second']:,.0f} steps/s "
            f"| {run['warm_ingest_per_core_vs_baseline']:.2f} "
            f"| {run['warm_ingest_per_cpu_second_vs_baseline']:.2f} "
            f"| {_mib(base['peak_rss_driver_bytes'])} MiB "
            f"| {_mib(ingest['peak_rss_driver_bytes'])} MiB "
            f"| {_mib(ingest['peak_rss_largest_child_bytes'])} MiB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/ingest.json", help="JSON results file.")
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[500_000, 2_000_000],
        help="Source sizes in steps (several sizes show whether memory grows with the file).",
    )
    parser.add_argument("--part-steps", type=int, default=250_000, help="Steps per ingest part.")
    parser.add_argument("--workdir", help="Where to put the generated files (a temp dir if unset).")
    parser.add_argument("--measure", choices=["baseline", "ingest"], help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure == "baseline":
        print(json.dumps(run_baseline(args.source, args.output)))
        return 0
    if args.measure == "ingest":
        print(json.dumps(run_ingest_measurement(args.source, args.output, args.part_steps)))
        return 0

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="hs-bench-ingest-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_TMPDIR", str(workdir / "ray"))
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    runs = []
    for steps in args.steps:
        source = str(workdir / f"d4rl-{steps}.h5")
        print(f"generating {steps:,} steps -> {source}", file=sys.stderr)
        generated = generate_d4rl(source, steps)
        baseline = _in_subprocess("baseline", source, str(workdir / f"bare-{steps}.parquet"), 0)
        ingest = _in_subprocess("ingest", source, str(workdir / f"ds-{steps}"), args.part_steps)
        per_core = ingest["steps_per_second"] / ingest["cpus"]
        run = {
            "source": generated,
            "baseline": baseline,
            "ingest": ingest,
            "ingest_vs_baseline": ingest["steps_per_second"] / baseline["steps_per_second"],
            "ingest_per_core_vs_baseline": per_core / baseline["steps_per_second"],
            "ingest_per_cpu_second_vs_baseline": ingest["steps_per_cpu_second"]
            / baseline["steps_per_cpu_second"],
            "warm_ingest_per_core_vs_baseline": ingest["warm"]["steps_per_second"]
            / ingest["cpus"]
            / baseline["steps_per_second"],
            "warm_ingest_per_cpu_second_vs_baseline": ingest["warm"]["steps_per_cpu_second"]
            / baseline["steps_per_cpu_second"],
        }
        runs.append(run)
        print(
            f"{steps:>10,} steps | bare pyarrow: {baseline['steps_per_second']:>10,.0f} steps/s, "
            f"peak {_mib(baseline['peak_rss_driver_bytes'])} MiB | ingest ({ingest['cpus']} CPUs): "
            f"{ingest['steps_per_second']:>10,.0f} steps/s, driver peak "
            f"{_mib(ingest['peak_rss_driver_bytes'])} MiB, largest worker "
            f"{_mib(ingest['peak_rss_largest_child_bytes'])} MiB, tree "
            f"{_mib(ingest['peak_rss_tree_bytes'])} MiB | per core vs bare: "
            f"{run['ingest_per_core_vs_baseline']:.2f}x (per CPU-second: "
            f"{run['ingest_per_cpu_second_vs_baseline']:.2f}x)",
            file=sys.stderr,
        )
    marginal = []
    for small, large in zip(runs[:-1], runs[1:]):
        # Between two sizes the fixed costs (Ray start of the job, worker imports, planning)
        # cancel out: what is left is the cost of each additional step.
        extra = large["source"]["steps"] - small["source"]["steps"]
        rates = {}
        for kind in ("baseline", "ingest"):
            wall = large[kind]["seconds"] - small[kind]["seconds"]
            cpu = large[kind]["cpu_seconds"] - small[kind]["cpu_seconds"]
            rates[kind] = {
                "steps_per_second": extra / wall if wall > 0 else None,
                "steps_per_cpu_second": extra / cpu if cpu > 0 else None,
            }
        marginal.append(
            {"from_steps": small["source"]["steps"], "to_steps": large["source"]["steps"], **rates}
        )
    results = {
        "benchmark": "ingest",
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "obs_dim": OBS_DIM,
        "action_dim": ACTION_DIM,
        "part_steps": args.part_steps,
        "runs": runs,
        "marginal": marginal,
        "load_average_at_end": os.getloadavg(),
    }
    print(markdown_table(results), file=sys.stderr)
    save_results(results, args.out, echo=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
