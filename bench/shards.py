"""Shard writing and streaming speed, against baselines measured in the same run.

    .venv/bin/python -m bench.shards --out bench/results/shards.json [--steps 1000000]

Data: synthetic episodes of 1000 steps, observation 17 floats, action 6, one step-level
scalar condition (`noise`), window 20, stride 1 (a window per step).

Measured:
- writing: `write_shards` on the embedded Ray (2 CPUs), steps/s; and the pure shard
  functions (read a part, shuffle, cut blocks, build the tar) in this process, steps/s per
  core;
- reading, windows/s into batches of 256 (torch tensors):
  (a) raw: reading the same shard bytes front to back (no parsing), as windows/s and MB/s;
  (b) memory: windows cut from the same data held in memory as torch tensors (random
      windows, gathered with torch indexing, with the mask), one process;
  the loader (`trainers.loader.stream`) from local disk and from a loopback S3 server (moto),
  with 0 and 2 DataLoader workers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time

import numpy as np
import torch

WINDOW = 20
BATCH = 256
OBS, ACT = 17, 6


def make_dataset(uri: str, steps: int, seed: int = 0) -> str:
    from tests.synthetic import make_episodes, write_synthetic_dataset

    episodes = max(1, steps // 1000)
    step_table, episode_table = make_episodes(
        num_episodes=episodes,
        obs_dim=OBS,
        action_dim=ACT,
        seed=seed,
        min_length=1000,
        max_length=1000,
    )
    write_synthetic_dataset(uri, step_table, episode_table, part_steps=max(1000, steps // 4))
    return uri


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers): a rate per
    CPU-second is a rate per core, and survives a machine shared with other jobs."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Clock:
    """Wall and CPU seconds of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *_):
        self.wall = time.perf_counter() - self.wall
        self.cpu = cpu_seconds() - self.cpu

    def rates(self, count: int, unit: str) -> dict:
        return {
            unit: count,
            "wall_seconds": self.wall,
            "cpu_seconds": self.cpu,
            f"{unit}_per_s": count / self.wall,
            f"{unit}_per_cpu_s": count / max(self.cpu, 1e-9),
        }


def loader_rate(uri: str, workers: int) -> dict:
    from trainers.loader import stream

    loader = stream(
        uri, BATCH, "noise", shuffle_buffer=65536, num_workers=workers, epochs=1, seed=0
    )
    windows = 0
    with Clock() as clock:
        for batch in loader:
            windows += int(batch["mask"].shape[0])
    return clock.rates(windows, "windows")


def memory_rate(index, shard_dir: str) -> dict:
    """Baseline (b): the same steps as torch tensors in memory; random windows cut with
    torch indexing (the left-padding mask included), batch by batch."""
    from trainers.loader import LostWindows, Position, epoch_blocks, pool_arrays, pools

    start = Position()
    blocks = epoch_blocks(index.shards, shard_dir, index, ["noise"], start, "raise", LostWindows())
    arrays = [pool_arrays(pool) for pool in pools(blocks, start, 10**12, len(index.shards))]
    data = arrays[0]
    # The steps as torch tensors (with pool_arrays' trailing zero row for padding).
    tensors = {
        name: torch.from_numpy(np.ascontiguousarray(data.steps[key]))
        for name, key in (
            ("observation", "observation"),
            ("action", "action"),
            ("reward", "reward"),
            ("timestep", "timestep"),
            ("noise", "cond.noise"),
        )
    }
    tensors["timestep"] = tensors["timestep"].long()
    zero_row = len(tensors["reward"]) - 1
    end = torch.from_numpy(data.end)
    start_row = torch.from_numpy(data.start)
    offsets = torch.arange(1 - WINDOW, 1)
    order = torch.randperm(len(end), generator=torch.Generator().manual_seed(0))
    windows = 0
    clock = Clock().__enter__()
    for first in range(0, len(order), BATCH):
        selected = order[first : first + BATCH]
        rows = end[selected, None] + offsets
        mask = rows >= start_row[selected, None]
        flat = torch.where(mask, rows, zero_row).reshape(-1)
        batch = {
            name: torch.index_select(value, 0, flat).reshape(*rows.shape, *value.shape[1:])
            for name, value in tensors.items()
        }
        batch["mask"] = mask
        windows += int(mask.shape[0])
    clock.__exit__()
    return clock.rates(windows, "windows")


def raw_rate(index, shard_dir: str) -> dict:
    from trainers.loader import read_shard_bytes

    with Clock() as clock:
        total = sum(read_shard_bytes(f"{shard_dir}/{s.name}") for s in index.shards)
    return {
        **clock.rates(index.windows, "windows"),
        "bytes": total,
        "mb_per_s": total / clock.wall / 1e6,
    }


def pure_write_rate(dataset_uri: str, window: int) -> dict:
    """One part through the shard functions in this process (one core)."""
    from engine import shards
    from engine.dataset import open_dataset

    dataset = open_dataset(dataset_uri)
    conditions = [shards.ConditionColumn("noise", "scalar", "steps")]
    with Clock() as clock:
        episodes = shards.read_part_episodes(dataset, 0, conditions, {})
        groups = shards.shuffled_shards(episodes, 2, 0, 0)
        built = [shards.build_shard(g, window, 1, 2048) for g in groups]
    steps = int(episodes.lengths.sum())
    return {**clock.rates(steps, "steps"), "bytes": sum(len(b.data) for b in built)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/shards.json")
    parser.add_argument("--steps", type=int, default=1_000_000, help="dataset size in steps")
    parser.add_argument("--s3", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    # One thread per process: the machine's cores are the workers' (and torch's default
    # thread pool collapses under contention: 4-10x slower gathers on a busy 2-core box).
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TQDM_DISABLE", "1")
    work = tempfile.mkdtemp(prefix="hs-bench-shards-")
    os.environ.setdefault("RAY_TMPDIR", os.path.join(work, "ray"))
    results: dict = {
        "config": {
            "load_average_before": os.getloadavg(),
            "steps": args.steps,
            "window": WINDOW,
            "batch_size": BATCH,
            "observation": OBS,
            "action": ACT,
            "condition": "noise (scalar, steps)",
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
        }
    }
    s3_server = None
    try:
        if args.s3:
            # Before Ray starts, so its workers see the endpoint.
            from moto.server import ThreadedMotoServer

            from tests.conftest import free_port

            port = free_port()
            s3_server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            s3_server.start()
            os.environ.update(
                AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
                AWS_ACCESS_KEY_ID="bench",
                AWS_SECRET_ACCESS_KEY="bench",
                AWS_DEFAULT_REGION="us-east-1",
            )
        from engine.dataset import open_dataset
        from engine.shards import ShardSettings, write_shards
        from jobs.runtime import RayExecutor, init_ray

        dataset = make_dataset(os.path.join(work, "ds"), args.steps)
        init_ray(num_cpus=2)
        local = os.path.join(work, "shards")
        settings = ShardSettings(
            condition=("noise",), window=WINDOW, shard_steps=max(1000, args.steps // 8)
        )

        def shard(output: str):
            return write_shards(
                open_dataset(dataset),
                settings,
                output,
                executor=RayExecutor(),
                command="bench.shards",
            )

        with Clock() as clock:
            index = shard(local)
        results["write_ray_2cpu"] = {
            "steps": index.steps,
            "wall_seconds": clock.wall,
            "steps_per_s": index.steps / clock.wall,
            "shards": len(index.shards),
            "bytes": sum(s.bytes for s in index.shards),
        }
        # The same job again on the now-warm Ray (workers started, modules imported): the
        # first run pays worker start-up that a long job or a second job does not.
        with Clock() as clock:
            shard(os.path.join(work, "shards-warm"))
        results["write_ray_2cpu_warm"] = {
            "steps": index.steps,
            "wall_seconds": clock.wall,
            "steps_per_s": index.steps / clock.wall,
        }
        results["write_one_core_pure"] = pure_write_rate(dataset, WINDOW)

        results["read_raw_local"] = raw_rate(index, local)
        results["read_memory_torch"] = memory_rate(index, local)
        for workers in (0, 2):
            results[f"loader_local_{workers}_workers"] = loader_rate(local, workers)
        if args.s3:
            import boto3

            from engine import storage

            boto3.client("s3").create_bucket(Bucket="bench")  # the fake server's set-up
            remote = "s3://bench/shards"
            for name in [s.name for s in index.shards] + ["index.json"]:
                with open(os.path.join(local, name), "rb") as handle:
                    storage.write_bytes(storage.join(remote, name), handle.read())
            results["read_raw_s3"] = raw_rate(index, remote)
            for workers in (0, 2):
                results[f"loader_s3_{workers}_workers"] = loader_rate(remote, workers)
        memory = results["read_memory_torch"]
        results["ratios_vs_memory"] = {
            key: {
                "wall": results[key]["windows_per_s"] / memory["windows_per_s"],
                "per_cpu": results[key]["windows_per_cpu_s"] / memory["windows_per_cpu_s"],
            }
            for key in results
            if key.startswith(("loader_", "read_raw"))
        }
        results["config"]["load_average_after"] = os.getloadavg()
    finally:
        if s3_server is not None:
            s3_server.stop()
        import ray

        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)
    for key, value in results.items():
        if key != "config":
            print(key, json.dumps(value))


if __name__ == "__main__":
    main()
