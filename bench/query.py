"""Benchmark: a query selecting ~1% of episodes by an episode attribute, next to a full scan.

    python -m bench.query --out bench/results/query.json              # 10M steps (issue size)
    python -m bench.query --steps 2000000 --out bench/results/query.json

The dataset is a relabeled version like a real one: a `base` group (obs 17, action 6) in
parts of `--part-steps`, plus a `labels` group with two episode attributes and a step column
`return_to_go`:

- `skill`: one label per collection run of `--run-episodes` consecutive episodes, 1% of runs
  'expert' (data from one policy is collected, and ingested, together);
- `flagged`: 1% of episodes drawn at random, scattered over the whole dataset (worst case
  for skipping row groups).

Measured in the same run, on the same files, taking turns, each the best of `--repeats`
(wall seconds, and the process CPU seconds of that run, which a shared machine disturbs less):
- full scan: `engine.scan(uri).collect()`, every step column of every row;
- naive: `engine.scan(uri)` semi-joined with the filtered `engine.scan_episodes(uri)`;
- query: `engine.query.query(uri, where)` (what `hindsight query` runs), all step columns.
- narrow scan: `episode_id` and `reward` of every row (what a relabel job reads);
- the same full scan, narrow scan and scattered query on a copy of the dataset whose step files have
  `--compare-row-group-rows` rows per Parquet row group (default: 65536, the earlier
  layout), to show what the row-group size costs a full scan and buys a query.
Bytes read are what the process read from files (`rchar` in /proc/self/io; the page cache is
warm for every variant alike), and for `query` also the Parquet bytes it planned to read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time

import numpy as np
import polars as pl
import pyarrow as pa

import engine
import engine.dataset
import engine.writer
from engine.dataset import open_dataset
from engine.query import query
from engine.writer import (
    VersionWriter,
    assemble_group,
    base_manifest,
    inherit_groups,
    new_manifest,
    split_into_parts,
)
from schemas import steps as cols

OBS_DIM = 17
ACTION_DIM = 6


def process_bytes_read() -> int:
    """Bytes this process has read through read() calls (Linux), 0 where unknown."""
    try:
        with open("/proc/self/io") as handle:
            for line in handle:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def generate_part(
    rng: np.random.Generator, first_episode: int, lengths: np.ndarray
) -> tuple[pa.Table, pa.Table]:
    """Random episodes, vectorized: no Python loop over steps or episodes."""
    total = int(lengths.sum())
    episode_ids = np.arange(first_episode, first_episode + len(lengths), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    t = (np.arange(total) - np.repeat(starts, lengths)).astype(np.int32)
    rewards = rng.normal(size=total).astype(np.float32)
    ends = np.cumsum(lengths) - 1
    terminated = np.zeros(total, dtype=bool)
    terminated[ends] = True
    steps = pa.table(
        {
            cols.EPISODE_ID: np.repeat(episode_ids, lengths),
            cols.T: t,
            cols.OBSERVATION: cols.vectors_to_arrow(
                rng.normal(size=(total, OBS_DIM)).astype(np.float32)
            ),
            cols.ACTION: cols.vectors_to_arrow(
                rng.uniform(-1, 1, size=(total, ACTION_DIM)).astype(np.float32)
            ),
            cols.REWARD: rewards,
            cols.TERMINATED: terminated,
            cols.TRUNCATED: np.zeros(total, dtype=bool),
        }
    )
    episodes = pa.table(
        {
            cols.EPISODE_ID: episode_ids,
            cols.LENGTH: lengths.astype(np.int64),
            cols.RETURN: np.add.reduceat(rewards.astype(np.float64), starts).astype(np.float32),
            cols.ENV_ID: ["Bench-v0"] * len(lengths),
            cols.SOURCE: ["bench"] * len(lengths),
        }
    )
    return steps, episodes


@contextlib.contextmanager
def step_row_groups(rows: int):
    """Write step files with `rows` rows per row group instead of the engine's default."""
    default = engine.writer.ROW_GROUP_ROWS
    engine.writer.ROW_GROUP_ROWS = {**default, "steps": rows}
    try:
        yield
    finally:
        engine.writer.ROW_GROUP_ROWS = default


def build_dataset(root: str, num_steps: int, part_steps: int, run_episodes: int, seed: int) -> str:
    """A base version and a relabeled child (skill, flagged, return_to_go)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(100, 301, size=max(num_steps // 200, 1))
    ranges = split_into_parts(lengths, part_steps)
    with VersionWriter(os.path.join(root, "base")) as writer:
        written = []
        for index, (start, stop) in enumerate(ranges):
            steps, episodes = generate_part(rng, start, lengths[start:stop])
            written.append(writer.write_part(index, steps, episodes))
        writer.commit(base_manifest(writer.uri, written, operation="ingest", command="bench"))
    parent = open_dataset(writer.uri)

    # Labels as a relabeler would attach them.
    num_episodes = len(lengths)
    num_runs = -(-num_episodes // run_episodes)
    expert_runs = rng.choice(num_runs, size=max(num_runs // 100, 1), replace=False)
    run_skill = np.full(num_runs, "novice", dtype=object)
    run_skill[expert_runs] = "expert"
    skill = run_skill[np.arange(num_episodes) // run_episodes]
    flagged = rng.random(num_episodes) < 0.01
    with VersionWriter(os.path.join(root, "labeled")) as writer:
        label_parts = []
        for index, (start, stop) in enumerate(ranges):
            part = parent.read_part(index, columns=[cols.EPISODE_ID, cols.REWARD])
            return_to_go = (
                pl.from_arrow(part)
                .select(
                    pl.col(cols.REWARD)
                    .reverse()
                    .cum_sum()
                    .reverse()
                    .over(cols.EPISODE_ID)
                    .alias("return_to_go")
                )
                .to_arrow()
            )
            episode_labels = pa.table(
                {"skill": skill[start:stop].tolist(), "flagged": flagged[start:stop]}
            )
            label_parts.append(
                writer.write_part(index, return_to_go, episode_labels, group="labels")
            )
        labels = assemble_group(writer.uri, "labels", label_parts)
        writer.commit(
            new_manifest(
                groups=inherit_groups(parent, [labels]),
                parts=parent.manifest.parts,
                operation="relabel",
                command="bench",
                parent=parent,
            )
        )
    return writer.uri


def measure(variants: dict, repeats: int) -> dict:
    """Best wall time (and the CPU time and bytes read of that run) of each variant.

    Variants take turns within each repeat, so a machine shared with other work slows
    them alike.
    """
    best: dict[str, dict] = {}
    for _ in range(repeats):
        for name, function in variants.items():
            before = process_bytes_read()
            cpu = time.process_time()
            start = time.perf_counter()
            outcome = function()
            seconds = time.perf_counter() - start
            cpu_seconds = time.process_time() - cpu
            read = process_bytes_read() - before
            if name not in best or seconds < best[name]["seconds"]:
                best[name] = {
                    "seconds": round(seconds, 4),
                    "cpu_seconds": round(cpu_seconds, 4),
                    "bytes_read": read,
                    **outcome,
                }
    return best


def run(args: argparse.Namespace) -> dict:
    root = args.data or tempfile.mkdtemp(prefix="hs-bench-query-")
    start = time.perf_counter()
    uri = os.path.join(root, "labeled")
    reused = os.path.exists(os.path.join(uri, "manifest.json"))
    if reused:
        print(f"reusing {uri}")
    else:
        uri = build_dataset(root, args.steps, args.part_steps, args.run_episodes, args.seed)
    build_seconds = time.perf_counter() - start
    compare_rows = args.compare_row_group_rows
    compare_uri = os.path.join(root, f"rows-{compare_rows}", "labeled")
    if compare_rows and not os.path.exists(os.path.join(compare_uri, "manifest.json")):
        with step_row_groups(compare_rows):
            compare_uri = build_dataset(
                os.path.dirname(compare_uri),
                args.steps,
                args.part_steps,
                args.run_episodes,
                args.seed,
            )
    dataset = open_dataset(uri)
    stored_step_bytes = sum(f.bytes for g in dataset.manifest.groups for f in g.steps_files)

    def full_scan(uri: str = uri) -> dict:
        frame = engine.scan(uri).collect()
        return {"rows": frame.height}

    def narrow_scan(uri: str = uri) -> dict:
        """Two scalar columns of every row: what a relabel job reads."""
        frame = engine.scan(uri).select(cols.EPISODE_ID, cols.REWARD).collect()
        return {"rows": frame.height}

    def naive(where: pl.Expr) -> dict:
        chosen = engine.scan_episodes(uri).filter(where).select(cols.EPISODE_ID)
        frame = engine.scan(uri).join(chosen, on=cols.EPISODE_ID, how="semi").collect()
        return {"rows": frame.height}

    def ours(where: str, level: str = "steps", uri: str = uri) -> dict:
        result = query(uri, where, level=level)
        return {
            "rows": result.frame.height,
            "planned_bytes": result.stats.bytes,
            "row_groups_read": result.stats.row_groups,
            "row_groups_skipped": result.stats.row_groups_skipped,
            "parts_skipped": result.stats.parts_skipped,
        }

    queries = {
        "clustered": ("skill = 'expert'", pl.col("skill") == "expert"),
        "scattered": ("flagged", pl.col("flagged")),
    }
    variants = {"full_scan": full_scan, "narrow_scan": narrow_scan}
    for name, (sql, expression) in queries.items():
        variants[f"{name}_naive"] = lambda e=expression: naive(e)
        variants[f"{name}_query"] = lambda s=sql: ours(s)
        variants[f"{name}_episodes_query"] = lambda s=sql: ours(s, "episodes")
    if compare_rows:
        label = f"{compare_rows}_row_groups"
        variants[f"full_scan_{label}"] = lambda: full_scan(compare_uri)
        variants[f"narrow_scan_{label}"] = lambda: narrow_scan(compare_uri)
        variants[f"scattered_query_{label}"] = lambda: ours(
            queries["scattered"][0], uri=compare_uri
        )
    results = measure(variants, args.repeats)
    for name in queries:
        assert results[f"{name}_query"]["rows"] == results[f"{name}_naive"]["rows"]
    for name in variants:
        if name.startswith("scattered_query_"):
            assert results[name]["rows"] == results["scattered_naive"]["rows"]
    full = results["full_scan"]
    for key, value in results.items():
        if key != "full_scan":
            value["speedup_vs_full_scan"] = round(full["seconds"] / value["seconds"], 1)
            value["cpu_speedup_vs_full_scan"] = round(
                full["cpu_seconds"] / max(value["cpu_seconds"], 1e-6), 1
            )
            value["bytes_fraction_of_full_scan"] = round(
                value["bytes_read"] / max(full["bytes_read"], 1), 4
            )
    if compare_rows:
        # The compared layout's time for the same work, as a multiple of the default's.
        suffix = f"_{compare_rows}_row_groups"
        for key, value in results.items():
            if key.endswith(suffix):
                default = results[key.removesuffix(suffix)]
                value["time_vs_default_layout"] = round(value["seconds"] / default["seconds"], 2)
    return {
        "benchmark": "query",
        "steps": dataset.manifest.steps,
        "episodes": dataset.manifest.episodes,
        "parts": dataset.num_parts,
        "obs_dim": OBS_DIM,
        "action_dim": ACTION_DIM,
        "stored_step_bytes": stored_step_bytes,
        "build_seconds": None if reused else round(build_seconds, 1),
        "step_row_group_rows": engine.writer.ROW_GROUP_ROWS["steps"],
        "compare_row_group_rows": compare_rows,
        "repeats": args.repeats,
        "load_average_1min": round(os.getloadavg()[0], 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared",
        "queries": {name: sql for name, (sql, _) in queries.items()},
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000_000, help="steps in the dataset")
    parser.add_argument("--part-steps", type=int, default=1_000_000, help="steps per part")
    parser.add_argument(
        "--run-episodes", type=int, default=50, help="episodes per collection run (skill)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument(
        "--compare-row-group-rows",
        type=int,
        default=65536,
        help="also measure a copy with this many step rows per row group (0: do not)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data",
        help="directory for the dataset, reused when it holds one (default: a temporary one)",
    )
    parser.add_argument("--out", default="bench/results/query.json", help="JSON result file")
    args = parser.parse_args()
    report = run(args)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
