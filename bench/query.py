"""Benchmark: a query selecting ~1% of episodes by an episode attribute, next to a full scan.

    python -m bench.query --out bench/results/query.json              # 10M steps (issue size)
    python -m bench.query --steps 2000000 --out bench/results/query.json

The dataset is a relabeled version like a real one: a `base` group (obs 17, action 6) in
parts of `--part-steps`, plus a `labels` group with two episode attributes and a step column
`return_to_go`:

- `skill`: one label per collection run of `--run-episodes` consecutive episodes, 1% of runs
  'expert' (data from one policy is collected, and ingested, together);
- `flagged`: 1% of episodes drawn at random, scattered over the whole dataset (worst case
  for skipping row groups);
- `task`: one of 100 values ('task-00'...) drawn at random per episode, so `task = 'task-NN'`
  is a random 1% selection too, and the column a clustered copy is ordered by.

Measured in the same run, on the same files, taking turns, each the best of `--repeats`
(wall seconds, and the process CPU seconds of that run, which a shared machine disturbs less):
- full scan: `engine.scan(uri).collect()`, every step column of every row;
- naive: `engine.scan(uri)` semi-joined with the filtered `engine.scan_episodes(uri)`;
- query: `engine.query.query(uri, where)` (what `hindsight query` runs), all step columns.
- narrow scan: `episode_id` and `reward` of every row (what a relabel job reads);
- the same full scan, narrow scan and scattered query on a copy of the dataset whose step files have
  `--compare-row-group-rows` rows per Parquet row group (default: 65536, the earlier
  layout), to show what the row-group size costs a full scan and buys a query;
- clustering: a copy written by `write_subset(..., cluster_by=["task"])` (what
  `hindsight query ... --output NEW --cluster-by task` runs) and its random-1% `task`
  query, next to the same query on the dataset as stored; the copy's write time against
  a plain `--output` copy of the same episodes (one run each, not best-of);
- page-level reads (`--page-probe`): the base group's step files rewritten with a Parquet
  page index and 512-row pages, read for the `flagged` rows by the readers there are:
  Polars with a row filter (the only reader here with a row-level selection; it does not
  check page CRCs) and pyarrow's whole row groups (which checks them), against Polars'
  full read of the original files.
Bytes read are what the process read from files (`rchar` in /proc/self/io; the page cache is
warm for every variant alike), and for `query` also the Parquet bytes it planned to read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import tempfile
import time

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

import engine
import engine.dataset
import engine.writer
from engine import storage
from engine.dataset import open_dataset
from engine.query import ReadStats, query, read_rows, write_subset
from engine.query.read import PART, START, episode_rows, episode_table
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
PAGE_ROWS = 512  # rows per data page in the page-index copy: ~25 episodes' worth per row group


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
    task = np.char.add("task-", np.char.zfill(rng.integers(0, 100, num_episodes).astype(str), 2))
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
                {
                    "skill": skill[start:stop].tolist(),
                    "flagged": flagged[start:stop],
                    "task": task[start:stop].tolist(),
                }
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


def clustered_copy(uri: str, root: str, column: str, repeats: int = 2) -> tuple[str, dict]:
    """A copy of every episode clustered by `column` (`--output NEW --cluster-by column`),
    and its write time against a plain copy (`--output NEW`): best of `repeats`, taking
    turns; the last copy of each is kept (and reused with --data)."""
    paths = {
        "plain_copy": (os.path.join(root, "plain-copy"), None),
        "clustered_copy": (os.path.join(root, f"clustered-by-{column}"), [column]),
    }
    if os.path.exists(os.path.join(paths["clustered_copy"][0], "manifest.json")):
        return paths["clustered_copy"][0], {}
    seconds: dict[str, float] = {}
    for _ in range(repeats):
        for name, (path, cluster_by) in paths.items():
            shutil.rmtree(path, ignore_errors=True)
            start = time.perf_counter()
            write_subset(uri, None, path, command="bench", cluster_by=cluster_by)
            elapsed = round(time.perf_counter() - start, 2)
            key = f"{name}_write_seconds"
            seconds[key] = min(seconds.get(key, elapsed), elapsed)
    seconds["clustered_write_vs_plain_copy"] = round(
        seconds["clustered_copy_write_seconds"] / seconds["plain_copy_write_seconds"], 2
    )
    return paths["clustered_copy"][0], seconds


def page_index_files(dataset: engine.dataset.Dataset, root: str) -> tuple[list[str], list[str]]:
    """The base group's step files, and copies of them with a page index and PAGE_ROWS-row
    pages (same row groups, compression and CRCs as the engine writes)."""
    base = dataset.manifest.groups[0]
    originals = [storage.join(base.root, f.path) for f in base.steps_files]
    copies = [os.path.join(root, "page-index", os.path.basename(path)) for path in originals]
    os.makedirs(os.path.join(root, "page-index"), exist_ok=True)
    for original, copy in zip(originals, copies):
        if not os.path.exists(copy):
            pq.write_table(
                pq.read_table(original),
                copy,
                compression="zstd",
                row_group_size=engine.writer.ROW_GROUP_ROWS["steps"],
                use_dictionary=[cols.EPISODE_ID],
                write_statistics=True,
                write_page_checksum=True,
                write_page_index=True,
                max_rows_per_page=PAGE_ROWS,
            )
    return originals, copies


def page_probe_variants(dataset: engine.dataset.Dataset, root: str, where: pl.Expr) -> dict:
    """Reading the rows of the episodes matching `where` from the base step files, by each
    reader at the finest grain it offers, against Polars' full read of the same files."""
    originals, copies = page_index_files(dataset, root)
    episodes = episode_table(dataset, ["flagged", "task"], ReadStats(), range(dataset.num_parts))
    chosen = episodes.filter(where)
    ids = chosen[cols.EPISODE_ID]
    rows = {
        index: episode_rows(part[START].to_numpy(), part[cols.LENGTH].to_numpy())[0]
        for (index,), part in chosen.group_by(PART)
    }
    columns = pq.read_schema(originals[0]).names

    def polars_full() -> dict:
        return {"rows": pl.scan_parquet(originals).collect().height}

    def polars_filter(files: list[str]) -> dict:
        frame = pl.scan_parquet(files).filter(pl.col(cols.EPISODE_ID).is_in(ids.implode()))
        return {"rows": frame.collect().height}

    def pyarrow_row_groups(files: list[str]) -> dict:
        return {
            "rows": sum(
                read_rows(files[index], columns, part_rows, ReadStats()).height
                for index, part_rows in sorted(rows.items())
            )
        }

    return {
        "page_probe_polars_full_read": polars_full,
        "page_probe_polars_row_filter": lambda: polars_filter(originals),
        "page_probe_polars_row_filter_page_index": lambda: polars_filter(copies),
        "page_probe_pyarrow_row_groups": lambda: pyarrow_row_groups(originals),
        "page_probe_pyarrow_row_groups_page_index": lambda: pyarrow_row_groups(copies),
    }


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

    task = f"task-{np.random.default_rng(args.seed).integers(100):02d}"
    queries = {
        "clustered": ("skill = 'expert'", pl.col("skill") == "expert"),
        "scattered": ("flagged", pl.col("flagged")),
        "random_task": (f"task = '{task}'", pl.col("task") == task),
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
    clustered_uri, write_seconds = clustered_copy(uri, root, "task")
    variants["full_scan_clustered_by_task"] = lambda: full_scan(clustered_uri)
    variants["random_task_query_clustered_by_task"] = lambda: ours(
        queries["random_task"][0], uri=clustered_uri
    )
    variants["scattered_query_clustered_by_task"] = lambda: ours(
        queries["scattered"][0], uri=clustered_uri
    )
    if args.page_probe:
        variants.update(page_probe_variants(dataset, root, pl.col("flagged")))
    results = measure(variants, args.repeats)
    for name in queries:
        assert results[f"{name}_query"]["rows"] == results[f"{name}_naive"]["rows"]
    for name in variants:
        for query_name in queries:
            if name.startswith(f"{query_name}_query_"):
                assert results[name]["rows"] == results[f"{query_name}_naive"]["rows"], name
        if name.startswith("page_probe_") and name != "page_probe_polars_full_read":
            assert results[name]["rows"] == results["scattered_naive"]["rows"], name
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
    # Against the full scan of the same files: the clustered copy's own, Polars' full read
    # of the base step files for the page-level probe.
    own_full_scan = {"_clustered_by_task": "full_scan_clustered_by_task"}
    for key, value in results.items():
        baseline = next((own_full_scan[s] for s in own_full_scan if key.endswith(s)), None)
        if key.startswith("page_probe_"):
            baseline = "page_probe_polars_full_read"
        if baseline and key != baseline:
            value["speedup_vs_same_files_full_read"] = round(
                results[baseline]["seconds"] / value["seconds"], 1
            )
            value["cpu_speedup_vs_same_files_full_read"] = round(
                results[baseline]["cpu_seconds"] / max(value["cpu_seconds"], 1e-6), 1
            )
            value["bytes_fraction_of_same_files_full_read"] = round(
                value["bytes_read"] / max(results[baseline]["bytes_read"], 1), 4
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
        "page_probe_rows_per_page": PAGE_ROWS if args.page_probe else None,
        "clustering": write_seconds,
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
    parser.add_argument(
        "--page-probe",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure row selections on step files with a Parquet page index",
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
