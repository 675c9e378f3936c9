"""Training throughput: is the loader the bottleneck?

    .venv/bin/python -m bench.train --out bench/results/train.json [--episodes 400 --steps 300]

On the same shards (Pendulum-v1, heuristic policy at mixed noise, return_to_go, window 20):
  loader      windows/s of trainers.loader.stream alone (no model)
  in-memory   training samples/s of each model on batches already in memory (the model's
              own speed: the ceiling a perfect loader would allow)
  streamed    training samples/s of the same loop fed by the loader
For each model `streamed / in-memory` near 1 means the loader keeps up; `loader / in-memory`
says how much headroom it has. A sample is one window. Device: CUDA if present, else CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from itertools import islice
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from trainers.options import RunConfig


def measure_loader(shards: str, batch_size: int, batches: int) -> dict[str, float]:
    from trainers.loader import stream

    loader = stream(shards, batch_size, "return_to_go", seed=0)
    iterator = iter(loader)
    next(iterator)  # first batch: opening files, shuffle buffer fill
    started = time.perf_counter()
    count = sum(int(batch["mask"].shape[0]) for batch in islice(iterator, batches))
    elapsed = time.perf_counter() - started
    return {"windows_per_s": count / elapsed, "windows": count, "seconds": elapsed}


def train_config(shards: str, run_dir: str, model: str, steps: int, batch_size: int) -> RunConfig:
    from trainers import train
    from trainers.loader import read_index
    from trainers.options import TrainOptions

    options = TrainOptions(
        input=shards,
        output=run_dir,
        condition=["return_to_go"],
        model=model,
        steps=steps,
        batch_size=batch_size,
        log_every=max(1, steps),
        checkpoint_every=steps + 1,
    )
    index = read_index(shards).model_dump(mode="json")
    return train.new_run_config(index, options)


def measure_model(shards: str, model: str, steps: int, batch_size: int, work: str) -> dict:
    from trainers import train

    warmup = max(5, steps // 10)
    # In memory: batches read once up front, then the same loop cycles over them.
    from trainers.loader import stream

    cached = list(islice(iter(stream(shards, batch_size, "return_to_go", seed=1)), 32))

    class Cycle:
        def __init__(self):
            self.position = 0

        def __iter__(self):
            while True:
                self.position += 1
                yield cached[self.position % len(cached)]

        def state_dict(self):
            return {"position": self.position}

    results = {}
    for name, factory in (
        ("in_memory", lambda config: lambda state, rank, world: Cycle()),
        ("streamed", train.default_stream_factory),
    ):
        # Time only the steps after a warmup run of the same length of loop.
        for phase, count in (("warmup", warmup), ("timed", steps)):
            run_dir = os.path.join(work, f"{model}-{name}-{phase}")
            config = train_config(shards, run_dir, model, count, batch_size)
            summary = train.train_loop(config, factory(config))
        results[name] = {
            "samples_per_s": summary["samples_per_s"],
            "steps": summary["steps"],
            "seconds": summary["elapsed_s"],
        }
    results["parameters"] = sum(p.numel() for p in train.load_policy(run_dir)[0].parameters())
    results["streamed_over_in_memory"] = (
        results["streamed"]["samples_per_s"] / results["in_memory"]["samples_per_s"]
    )
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/train.json")
    parser.add_argument("--episodes", type=int, default=400, help="Pendulum episodes to shard.")
    parser.add_argument("--steps", type=int, default=300, help="Timed training steps per model.")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--loader-batches", type=int, default=200)
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from jobs.commands.demo import build_shards
    from jobs.runtime import init_ray

    init_ray()
    with tempfile.TemporaryDirectory(prefix="hs-bench-train-") as work:
        started = time.perf_counter()
        paths = build_shards(
            "Pendulum-v1",
            work,
            episodes=args.episodes,
            noise=[0.0, 0.25, 0.5, 0.75, 1.0],
            relabelers=["returns"],
            conditions=["return_to_go"],
            window=20,
        )
        build_seconds = time.perf_counter() - started
        loader = measure_loader(paths["shards"], args.batch_size, args.loader_batches)
        models = {
            model: measure_model(paths["shards"], model, args.steps, args.batch_size, work)
            for model in ("mlp", "transformer")
        }
    for result in models.values():
        result["loader_over_in_memory"] = (
            loader["windows_per_s"] / result["in_memory"]["samples_per_s"]
        )
    report = {
        "benchmark": "train",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "size": {
            "episodes": args.episodes,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "window": 20,
        },
        "shard_build_seconds": build_seconds,
        "loader": loader,
        "models": models,
    }  # fmt: skip
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
