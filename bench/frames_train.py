"""Training from pixels: the whole trainer against a bare PyTorch loop (issue 14).

    .venv/bin/python -m bench.frames_train --out bench/results/frames_train.json [--threads 2]

A pixel policy (64x64 RGB frames of one camera, a stack of 3, the state vector and
return_to_go; the Nature CNN by default, `--encoder resnet` for the ResNet), for each model
with its defaults (`mlp`: single steps, batch 256; `transformer`: windows of `--window`
steps, batch 64), on the same in-memory uint8 batches in the loader's format
(`frame_render`: uint8 [B, W, 9, 64, 64]), in the same process:
  bare     the same model (built from the run's config), AdamW with the run's rate and weight
           decay, `loss = policy.loss(batch); zero_grad(); backward(); step()` (bench.train)
  trainer  trainers.train.train_loop as `hindsight train` runs it (warmup + cosine learning
           rate, gradient clipping, autocast context, progress, metrics lines), fed the same
           batches from memory
The two run interleaved, step by step: the trainer's stream runs one bare step (timed)
before it hands over each batch, so each trainer step has a bare step next to it under the
same load (this machine is shared: a burst of load slows some steps of both sides). A side's
rate is the batch size over its median step; `trainer_over_bare` is the ratio (goal: at
least 0.9), `paired_median_ratio` the median of the step-by-step ratios. The loader's share (decoding frames from shards)
is not in this measurement (the frames loader alone: bench/frames_loader.py).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch

from bench import save_results, torch_machine
from bench.train import print_ratios

SIZE, STACK, OBS_DIM = 64, 3, 3


def pixel_index(window: int) -> dict[str, Any]:
    """A shard index as the loader describes shards of Pendulum-like data with frames."""
    return {
        "window": window,
        "observation": {"shape": [OBS_DIM], "dtype": "float32",
                        "mean": [0.0] * OBS_DIM, "std": [1.0] * OBS_DIM},
        "action": {"kind": "continuous", "dim": 1, "low": [-2.0], "high": [2.0]},
        "reward": {"mean": -3.0, "std": 2.0},
        "episode_return": {"mean": -600.0, "std": 300.0, "min": -1500.0, "max": -100.0},
        "conditions": {"return_to_go": {"type": "scalar", "level": "steps",
                                        "mean": -300.0, "std": 250.0}},
        "cameras": {"render": {"height": SIZE, "width": SIZE, "channels": 3, "codec": "png"}},
        "frame_stack": STACK,
        "shards": [],
        "metadata": {"env_id": "Pendulum-v1"},
    }  # fmt: skip


def pixel_batches(batch_size: int, window: int, count: int, seed: int = 0) -> list[dict]:
    """Batches in the loader's format, frames of smooth noise (what a codec would give)."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        coarse = rng.integers(0, 256, size=(batch_size, window, 3 * STACK, 8, 8), dtype=np.uint8)
        frames = coarse.repeat(SIZE // 8, axis=3).repeat(SIZE // 8, axis=4)
        mask = np.ones((batch_size, window), dtype=bool)
        batch = {
            "observation": rng.normal(size=(batch_size, window, OBS_DIM)).astype(np.float32),
            "action": rng.uniform(-2, 2, size=(batch_size, window, 1)).astype(np.float32),
            "reward": rng.normal(size=(batch_size, window)).astype(np.float32),
            "timestep": np.tile(np.arange(window), (batch_size, 1)),
            "mask": mask,
            "return_to_go": rng.uniform(-1500, -100, size=(batch_size, window)).astype(np.float32),
            "frame_render": np.ascontiguousarray(frames),
        }
        batches.append({key: torch.as_tensor(value) for key, value in batch.items()})
    return batches


class PairedCycle:
    """The loader's interface (iterable, state_dict) over batches already in memory, which
    runs one step of the bare loop (timed) before it hands the trainer each batch: every
    trainer step has a bare step next to it, under the same load."""

    def __init__(self, batches: list[dict], bare_step):
        self.batches, self.bare_step, self.position = batches, bare_step, 0
        self.bare_seconds: list[float] = []

    def __iter__(self):
        while True:
            # Not the trainer's batch: neither side finds the other's batch in the cache.
            self.bare_seconds.append(self.bare_step(self.position + 2))
            yield self.batches[self.position % len(self.batches)]
            self.position += 1

    def state_dict(self) -> dict:
        return {"position": self.position}


def bare_step_function(config, batches: list[dict]):
    """The baseline: the same model and optimizer in the few lines everyone writes (as
    bench.train's bare loop); returns a function that runs and times one step."""
    from trainers.models import build_model

    torch.manual_seed(0)
    policy = build_model(config.model).to(config.options.device)
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=config.options.lr, weight_decay=config.options.weight_decay
    )

    def step(number: int) -> float:
        started = time.perf_counter()
        loss = policy.loss(batches[number % len(batches)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - started

    return step


def measure(model: str, encoder: str, window: int, steps: int, warm: int, device: str,
            work: str) -> dict[str, Any]:  # fmt: skip
    """One paired run: the trainer's step k is the time between its metrics lines k-1 and k
    (a line after every step) less bare step k, which ran inside the trainer's `next(batches)`."""
    from trainers import train
    from trainers.models import build_model
    from trainers.options import TrainOptions

    options = TrainOptions(
        input="memory://", output=os.path.join(work, model), condition=["return_to_go"],
        model=model, steps=steps, log_every=1, checkpoint_every=steps + 1, device=device,
        frame_encoder=encoder,
    )  # fmt: skip
    config = train.new_run_config(pixel_index(window), options)
    batch_size, model_window = int(config.options.batch_size), int(config.model["window"])
    batches = [
        {key: value.to(device) for key, value in batch.items()}
        for batch in pixel_batches(batch_size, model_window, 4)
    ]
    stream = PairedCycle(batches, bare_step_function(config, batches))
    lines: list[dict[str, Any]] = []
    train.train_loop(config, lambda state, rank, world: stream, report=lines.append)
    ends = [0.0] + [line["elapsed_s"] for line in lines]
    bare = stream.bare_seconds[warm:steps]
    trainer = [after - before - bare_seconds for before, after, bare_seconds in
               zip(ends[warm:steps], ends[warm + 1:], bare, strict=True)]  # fmt: skip
    policy = build_model(config.model)
    bare_median, trainer_median = float(np.median(bare)), float(np.median(trainer))
    return {
        "encoder": encoder,
        "frames": f"{SIZE}x{SIZE}x3, stack {STACK}",
        "batch_size": batch_size,
        "window": model_window,
        "frames_per_batch": batch_size * model_window * STACK,
        "parameters": sum(p.numel() for p in policy.parameters()),
        "frame_encoder_parameters": sum(p.numel() for p in policy.frames.parameters()),
        "timed_steps": len(bare),
        "bare": {"median_step_s": bare_median, "samples_per_s": batch_size / bare_median},
        "trainer": {"median_step_s": trainer_median, "samples_per_s": batch_size / trainer_median},
        "trainer_over_bare": bare_median / trainer_median,
        "paired_median_ratio": float(np.median(np.asarray(bare) / np.asarray(trainer))),
        "step_seconds": {"bare": bare, "trainer": trainer},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/frames_train.json")
    parser.add_argument("--encoder", default="nature", choices=["nature", "resnet"])
    parser.add_argument("--window", type=int, default=10, help="Transformer window (steps).")
    parser.add_argument("--mlp-steps", type=int, default=40, help="Steps of the MLP run.")
    parser.add_argument("--transformer-steps", type=int, default=16, help="Of the transformer.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads.")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HINDSIGHT_PROGRESS_SECONDS", "0")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    load_before = os.getloadavg()
    models = {}
    with tempfile.TemporaryDirectory(prefix="hs-bench-frames-train-") as work:
        for model, steps in (("mlp", args.mlp_steps), ("transformer", args.transformer_steps)):
            warm = max(2, steps // 10)  # untimed: the first steps allocate
            models[model] = measure(model, args.encoder, args.window, steps, warm, device, work)
            print(model, json.dumps(models[model]), flush=True)
    report = {
        "benchmark": "frames_train",
        **torch_machine(device),
        "load_average_1min_before": load_before[0],
        "models": models,
        "loader": "not measured here (the frames loader alone: bench/frames_loader.py)",
        "load_average_1min_after": os.getloadavg()[0],
    }  # fmt: skip
    save_results(report, args.out, echo=False)
    print_ratios(models)
    return report


if __name__ == "__main__":
    main()
