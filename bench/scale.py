"""Scaling of a relabel job: 1 vs 2 Ray workers on this machine, and a capacity plan.

    python -m bench.scale --out bench/results/scale.json [--steps 10000000] [--repeats 3]

The same relabel job spec (`returns:gamma=0.99` by default) runs on a local Ray with
`num_cpus` = 1 and then 2 (one Ray task per part, so one busy worker per CPU), on the
same synthetic dataset. Reported: steps/s of each, the speed-up and the per-worker
efficiency (speed-up / workers). From the measured single-worker throughput and the bytes
each step moves, the capacity plan estimates nodes and hours for 1 billion steps and where
the bottleneck moves: CPU, then S3 bandwidth / request rates, and for the `language`
relabeler the LLM endpoint's rate limits. The plan's outside figures (NIC bandwidth, S3
limits, LLM rate limits) are assumptions with flags of their own, printed with the result.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

BILLION = 1_000_000_000


def build_dataset(root: Path, steps: int, parts: int, obs_dim: int = 17, seed: int = 0) -> str:
    """A synthetic dataset (MuJoCo-sized by default: obs 17, action 6) of about `steps`
    steps in ~500-step episodes."""
    from tests.synthetic import make_episodes, write_synthetic_dataset

    mean_length = 500
    num_episodes = max(parts, steps // mean_length)
    steps_table, episodes = make_episodes(
        num_episodes=num_episodes,
        obs_dim=obs_dim,
        action_dim=min(6, obs_dim),
        seed=seed,
        min_length=mean_length // 2,
        max_length=mean_length * 3 // 2,
    )
    uri = str(root / "parent")
    write_synthetic_dataset(
        uri, steps_table, episodes, part_steps=-(-steps_table.num_rows // parts)
    )
    return uri


def relabel_once(parent: str, output: str, relabeler: str, params: dict[str, Any]) -> float:
    """Seconds of one relabel job (jobs/relabeling.py on the Ray that is running)."""
    from jobs.relabeling import relabel
    from jobs.runtime import RayExecutor
    from relabelers import registry

    started = time.perf_counter()
    relabel(
        parent,
        output,
        [registry.create(relabeler, params)],
        executor=RayExecutor(),
        command=f"bench.scale {relabeler}",
    )
    return time.perf_counter() - started


def measure_once(parent: str, root: Path, workers: int, run: int, relabeler: str, params: dict):
    """Seconds of one timed job on a fresh local Ray with `workers` CPUs, after a warm-up
    job that starts the worker processes."""
    import ray

    from jobs.runtime import init_ray

    init_ray(num_cpus=workers, object_store_memory=256 * 1024 * 1024)
    try:
        relabel_once(parent, str(root / f"warmup-{workers}-{run}"), relabeler, params)
        return relabel_once(parent, str(root / f"out-{workers}-{run}"), relabeler, params)
    finally:
        ray.shutdown()


def measure(
    parent: str, root: Path, repeats: int, relabeler: str, params: dict
) -> list[dict[str, Any]]:
    """1 and 2 workers in alternating rounds (so both see the same background load);
    the best of `repeats` runs of each."""
    times: dict[int, list[float]] = {1: [], 2: []}
    for run in range(repeats):
        for workers in (1, 2):
            times[workers].append(measure_once(parent, root, workers, run, relabeler, params))
    return [{"workers": w, "seconds": min(times[w]), "all_seconds": times[w]} for w in (1, 2)]


def bytes_per_step(parent: str, output: str, relabeler: str) -> dict[str, float]:
    """Bytes read (the columns the relabeler reads) and written per step, from the files."""
    import pyarrow.parquet as pq

    from engine import storage
    from engine.dataset import open_dataset
    from relabelers import registry

    dataset = open_dataset(parent)
    reads = registry.create(relabeler).reads()
    wanted = {"episode_id", "t", *(c.split(".")[0] for c in reads.steps)}
    read = 0
    for uri in dataset.file_uris(dataset.manifest.group("base"), "steps"):
        metadata = pq.read_metadata(uri)
        for row_group in range(metadata.num_row_groups):
            group = metadata.row_group(row_group)
            for column in range(group.num_columns):
                chunk = group.column(column)
                if chunk.path_in_schema.split(".")[0] in wanted:
                    read += chunk.total_compressed_size
    written = sum(storage.size(f) or 0 for f in storage.list_files(f"{output}/{relabeler}"))
    steps = dataset.manifest.steps
    return {
        "read_bytes_per_step": read / steps,
        "written_bytes_per_step": written / steps,
        "base_bytes_per_step": sum(f.bytes for f in dataset.manifest.group("base").steps_files)
        / steps,
    }


def capacity_plan(
    per_core_steps_per_s: float,
    efficiency: float,
    io: dict[str, float],
    *,
    cores_per_node: int,
    node_gbit: float,
    s3_gbyte_per_s: float,
    part_steps: int,
    s3_requests_per_s: float,
    episode_length: int,
    llm_requests_per_minute: float,
    llm_tokens_per_minute: float,
    llm_tokens_per_request: float,
) -> dict[str, Any]:
    """Nodes and hours for 1 billion steps, and which resource runs out first."""
    node_steps_per_s = per_core_steps_per_s * cores_per_node * efficiency
    moved_per_step = io["read_bytes_per_step"] + io["written_bytes_per_step"]
    # Per node: the NIC caps steps/s; for the cluster: the S3 service (MinIO box or the
    # bucket's request-rate limits: ~4 requests per part read+written).
    nic_steps_per_s = node_gbit * 1e9 / 8 / moved_per_step
    s3_bandwidth_steps_per_s = s3_gbyte_per_s * 1e9 / moved_per_step
    s3_request_steps_per_s = s3_requests_per_s / 4 * part_steps
    cluster_cap = min(s3_bandwidth_steps_per_s, s3_request_steps_per_s)
    rows = []
    for nodes in (1, 2, 4, 8, 16, 32, 64, 128):
        cpu = node_steps_per_s * nodes
        node_limited = min(node_steps_per_s, nic_steps_per_s) * nodes
        rate = min(node_limited, cluster_cap)
        bottleneck = (
            "cpu"
            if rate == cpu
            else "node network"
            if rate == node_limited
            else "s3 bandwidth"
            if cluster_cap == s3_bandwidth_steps_per_s
            else "s3 request rate"
        )
        rows.append(
            {
                "nodes": nodes,
                "cores": nodes * cores_per_node,
                "steps_per_s": rate,
                "hours_for_1e9_steps": BILLION / rate / 3600,
                "bottleneck": bottleneck,
            }
        )
    saturating_nodes = cluster_cap / min(node_steps_per_s, nic_steps_per_s)
    episodes = BILLION / episode_length
    llm_minutes = max(
        episodes / llm_requests_per_minute,
        episodes * llm_tokens_per_request / llm_tokens_per_minute,
    )
    return {
        "per_core_steps_per_s": per_core_steps_per_s,
        "efficiency_used": efficiency,
        "node_steps_per_s": node_steps_per_s,
        "core_hours_for_1e9_steps": BILLION / per_core_steps_per_s / 3600,
        "bytes_moved_per_step": moved_per_step,
        "nodes_until_s3_saturates": saturating_nodes,
        "cluster_cap_steps_per_s": cluster_cap,
        "table": rows,
        "language_relabeler": {
            "episodes": episodes,
            "hours_at_llm_rate_limits": llm_minutes / 60,
            "bound_by": (
                "requests per minute"
                if episodes / llm_requests_per_minute
                >= episodes * llm_tokens_per_request / llm_tokens_per_minute
                else "tokens per minute"
            ),
        },
        "assumptions": {
            "cores_per_node": cores_per_node,
            "node_network_gbit_per_s": node_gbit,
            "s3_gbyte_per_s": s3_gbyte_per_s,
            "s3_requests_per_s": s3_requests_per_s,
            "part_steps": part_steps,
            "episode_length": episode_length,
            "llm_requests_per_minute": llm_requests_per_minute,
            "llm_tokens_per_minute": llm_tokens_per_minute,
            "llm_tokens_per_request": llm_tokens_per_request,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/scale.json", help="JSON result file")
    parser.add_argument("--steps", type=int, default=10_000_000, help="dataset size in steps")
    parser.add_argument("--parts", type=int, default=32, help="parts (Ray tasks) of the dataset")
    parser.add_argument(
        "--obs-dim",
        type=int,
        default=1,
        help="observation size (17: MuJoCo-sized rows, for relabelers that read observations)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration")
    parser.add_argument("--relabeler", default="returns", help="registered relabeler to run")
    parser.add_argument("--params", default='{"gamma": 0.99}', help="its parameters (JSON)")
    plan = parser.add_argument_group("capacity plan assumptions")
    plan.add_argument("--cores-per-node", type=int, default=16)
    plan.add_argument("--node-gbit", type=float, default=10.0, help="NIC per node, Gbit/s")
    plan.add_argument("--s3-gbyte-per-s", type=float, default=5.0, help="S3/MinIO aggregate")
    plan.add_argument("--s3-requests-per-s", type=float, default=3500.0, help="PUT/s per prefix")
    plan.add_argument("--plan-part-steps", type=int, default=1_000_000)
    plan.add_argument("--episode-length", type=int, default=1000)
    plan.add_argument("--llm-rpm", type=float, default=10_000.0, help="LLM requests/minute")
    plan.add_argument("--llm-tpm", type=float, default=2_000_000.0, help="LLM tokens/minute")
    plan.add_argument("--llm-tokens-per-request", type=float, default=600.0)
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TQDM_DISABLE", "1")
    params = json.loads(args.params)
    with tempfile.TemporaryDirectory(prefix="hs-bench-scale-") as tmp:
        root = Path(tmp)
        os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="hsb-", dir="/tmp"))
        parent = build_dataset(root, args.steps, args.parts, obs_dim=args.obs_dim)
        from engine.dataset import open_dataset

        steps = open_dataset(parent).manifest.steps
        runs = measure(parent, root, args.repeats, args.relabeler, params)
        io = bytes_per_step(parent, str(root / "out-1-0"), args.relabeler)

    for run in runs:
        run["steps_per_s"] = steps / run["seconds"]
    one, two = runs
    speedup = two["steps_per_s"] / one["steps_per_s"]
    efficiency = speedup / 2
    result = {
        "benchmark": "scale",
        "relabeler": args.relabeler,
        "params": params,
        "steps": steps,
        "parts": args.parts,
        "obs_dim": args.obs_dim,
        "machine_cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "runs": runs,
        "speedup_2_vs_1": speedup,
        "per_worker_efficiency": efficiency,
        "io": io,
        "capacity_plan": capacity_plan(
            one["steps_per_s"],
            min(1.0, efficiency),
            io,
            cores_per_node=args.cores_per_node,
            node_gbit=args.node_gbit,
            s3_gbyte_per_s=args.s3_gbyte_per_s,
            part_steps=args.plan_part_steps,
            s3_requests_per_s=args.s3_requests_per_s,
            episode_length=args.episode_length,
            llm_requests_per_minute=args.llm_rpm,
            llm_tokens_per_minute=args.llm_tpm,
            llm_tokens_per_request=args.llm_tokens_per_request,
        ),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{args.relabeler} on {steps:,} steps in {args.parts} parts: "
        f"1 worker {one['steps_per_s']:,.0f} steps/s, 2 workers {two['steps_per_s']:,.0f} "
        f"steps/s (x{speedup:.2f}, {efficiency:.0%} per worker; load {result['load_average_1m']:.1f})"
    )
    plan_result = result["capacity_plan"]
    print(
        f"1e9 steps: {plan_result['core_hours_for_1e9_steps']:.1f} core-hours; "
        f"S3 saturates at ~{plan_result['nodes_until_s3_saturates']:.0f} nodes of "
        f"{args.cores_per_node} cores"
    )
    for row in plan_result["table"]:
        print(
            f"  {row['nodes']:4d} nodes: {row['steps_per_s']:12,.0f} steps/s "
            f"{row['hours_for_1e9_steps']:8.3f} h  ({row['bottleneck']})"
        )
    language = plan_result["language_relabeler"]
    print(
        f"language relabeler: {language['episodes']:,.0f} episodes -> "
        f"{language['hours_at_llm_rate_limits']:.1f} h at the LLM rate limits "
        f"({language['bound_by']})"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
