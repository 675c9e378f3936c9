"""Training throughput: the whole trainer against a bare PyTorch loop (issue 18, goal 4).

    .venv/bin/python -m bench.train --out bench/results/train.json [--threads 1]

On the same shards (Pendulum-v1, heuristic policy at mixed noise, return_to_go, window 20),
for each model with its defaults (`mlp`: single steps, batch 256; `transformer`: windows of
20 steps, batch 64), in the same process:
  bare     a bare PyTorch loop: the same model (built from the run's config), AdamW with the
           run's learning rate and weight decay (otherwise torch's defaults), and
           `loss = policy.loss(batch); zero_grad(); backward(); step()` over batches already
           on the device (read once from the loader, then cycled)
  trainer  trainers.train.train_loop as `hindsight train` runs it: batches streamed from the
           shards, warmup + cosine learning rate, gradient clipping, progress, metrics lines
  loader   windows/s of trainers.loader.stream alone (no model), at the model's window, over
           1000 batches (shard reads included)
Each side runs `--steps` optimizer steps; the rate counts the steps after the first
`--warm` (so neither side is charged for its first batches; the trainer's time to its first
step, which fills the shuffle buffer, is reported apart). The sides alternate `--repeats`
times and the best rate of each is kept: `trainer_over_bare` is the ratio of samples/s
(a sample is one window: one step for the MLP). Device: CUDA if present, else CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from itertools import islice
from typing import Any

import torch

from bench import save_results, torch_machine

WINDOW = 20


def measure_loader(shards: str, batch_size: int, window: int, batches: int) -> dict[str, float]:
    from trainers.loader import stream

    iterator = iter(stream(shards, batch_size, "return_to_go", seed=0, window=window))
    next(iterator)  # first batch: opening files, shuffle buffer fill
    started = time.perf_counter()
    count = sum(int(batch["mask"].shape[0]) for batch in islice(iterator, batches))
    elapsed = time.perf_counter() - started
    return {"windows_per_s": count / elapsed, "windows": count, "seconds": elapsed}


def run_config(shards: str, run_dir: str, model: str, steps: int, warm: int, device: str):
    """The run's config with the model's defaults; metrics every `warm` steps."""
    from trainers import train
    from trainers.loader import read_index
    from trainers.options import TrainOptions

    options = TrainOptions(
        input=shards,
        output=run_dir,
        condition=["return_to_go"],
        model=model,
        steps=steps,
        log_every=warm,
        checkpoint_every=steps + 1,
        device=device,
    )
    return train.new_run_config(read_index(shards).model_dump(mode="json"), options)


def bare_loop(config, batches: list[dict[str, torch.Tensor]], steps: int, warm: int) -> dict:
    """The baseline: the same model and optimizer in the few lines everyone writes."""
    from trainers.models import build_model

    device = torch.device(config.options.device)
    torch.manual_seed(0)
    policy = build_model(config.model).to(device)
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=config.options.lr, weight_decay=config.options.weight_decay
    )
    started = 0.0
    for step in range(steps):
        if step == warm:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        loss = policy.loss(batches[step % len(batches)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    samples = (steps - warm) * int(batches[0]["mask"].shape[0])
    return {"samples_per_s": samples / elapsed, "seconds": elapsed, "timed_steps": steps - warm}


def trainer_loop(config, steps: int, warm: int) -> dict:
    """The whole trainer, streaming from the shards; timed from step `warm` to the end."""
    from trainers import train

    lines: list[dict[str, Any]] = []
    started = time.perf_counter()
    train.train_loop(config, train.default_stream_factory(config), report=lines.append)
    first, last = lines[0], lines[-1]  # metrics at step `warm` and at the last step
    elapsed = last["elapsed_s"] - first["elapsed_s"]
    # Each line's rate covers the steps since the line before (exact sample counts).
    samples = sum(
        line["samples_per_s"] * (line["elapsed_s"] - before["elapsed_s"])
        for before, line in zip(lines, lines[1:])
    )
    return {
        "samples_per_s": samples / elapsed,
        "seconds": elapsed,
        "timed_steps": last["step"] - first["step"],
        "wall_seconds_with_start_and_checkpoint": time.perf_counter() - started,
        "seconds_to_step_warm": first["elapsed_s"],
    }


def train_prefetch(config) -> int:
    """Batches the trainer's loader makes ahead in a thread (0: cut between steps)."""
    from trainers.train import loader_prefetch

    return loader_prefetch(config.model)


def measure_model(
    shards: str, model: str, steps: int, warm: int, repeats: int, device: str, work: str
) -> dict[str, Any]:
    from trainers.loader import stream
    from trainers.models import build_model

    config = run_config(shards, os.path.join(work, model), model, steps, warm, device)
    batch_size, window = int(config.options.batch_size), int(config.model["window"])
    batches = [
        {key: value.to(device) for key, value in batch.items()}
        for batch in islice(
            iter(stream(shards, batch_size, "return_to_go", seed=1, window=window)), 32
        )
    ]
    sides: dict[str, list[dict]] = {"bare": [], "trainer": []}
    for _ in range(repeats):  # alternate, so load changes hit both sides alike
        sides["bare"].append(bare_loop(config, batches, steps, warm))
        shutil.rmtree(config.options.output, ignore_errors=True)
        sides["trainer"].append(trainer_loop(config, steps, warm))
    best = {name: max(runs, key=lambda r: r["samples_per_s"]) for name, runs in sides.items()}
    return {
        "batch_size": batch_size,
        "window": window,
        "lr": config.options.lr,
        "parameters": sum(p.numel() for p in build_model(config.model).parameters()),
        "bare": best["bare"],
        "trainer": best["trainer"],
        "trainer_over_bare": best["trainer"]["samples_per_s"] / best["bare"]["samples_per_s"],
        "all_rates": {name: [r["samples_per_s"] for r in runs] for name, runs in sides.items()},
        # 1000 batches: several pools, so the shard reads that refill them are counted too.
        "loader": measure_loader(shards, batch_size, window, 1000),
        "trainer_loader_prefetch": train_prefetch(config),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/train.json")
    parser.add_argument("--episodes", type=int, default=400, help="Pendulum episodes to shard.")
    parser.add_argument("--mlp-steps", type=int, default=1500, help="Steps per MLP run.")
    parser.add_argument("--transformer-steps", type=int, default=150, help="Per transformer run.")
    parser.add_argument("--warm", type=int, default=None, help="Untimed steps (10 percent).")
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each side (best kept).")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: its own)."
    )
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from jobs.commands.demo import build_shards

    load_before = os.getloadavg()
    models = {}
    with tempfile.TemporaryDirectory(prefix="hs-bench-train-") as work:
        started = time.perf_counter()
        paths = build_shards(
            "Pendulum-v1",
            work,
            episodes=args.episodes,
            noise=[0.0, 0.25, 0.5, 0.75, 1.0],
            relabelers=["returns"],
            conditions=["return_to_go"],
            window=WINDOW,
        )
        build_seconds = time.perf_counter() - started
        for model, steps in (("mlp", args.mlp_steps), ("transformer", args.transformer_steps)):
            warm = args.warm or max(1, steps // 10)
            steps = warm * max(2, -(-steps // warm))  # a multiple of warm: metrics at the end
            models[model] = measure_model(
                paths["shards"], model, steps, warm, args.repeats, device, work
            )
            print(model, json.dumps(models[model]), flush=True)
    report = {
        "benchmark": "train",
        **torch_machine(device),
        "load_average_1min_before": load_before[0],
        "size": {"episodes": args.episodes, "shard_window": WINDOW, "repeats": args.repeats},
        "shard_build_seconds": build_seconds,
        "models": models,
        "load_average_1min_after": os.getloadavg()[0],
    }  # fmt: skip
    save_results(report, args.out, echo=False)
    print_ratios(models)
    return report


def print_ratios(models: dict[str, dict[str, Any]]) -> None:
    """One line per model: the trainer's rate, the bare loop's and their ratio."""
    for model, result in models.items():
        print(
            f"{model:12} trainer {result['trainer']['samples_per_s']:,.0f} samples/s, bare loop "
            f"{result['bare']['samples_per_s']:,.0f}: {result['trainer_over_bare']:.2f}x"
        )


if __name__ == "__main__":
    main()
