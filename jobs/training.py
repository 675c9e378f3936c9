"""Launching a training run: in this process, or data-parallel in Ray Train workers.

`run_training(options, workers=..., address=..., resume=...)` checks the run directory and
the shards (trainers.train.prepare_run), then runs trainers.train.train_loop here (one
process; Ctrl-C and SIGTERM stop it cleanly after a checkpoint) or in `workers` Ray Train
workers (TorchTrainer, DDP: gloo on CPU, NCCL on GPUs; embedded Ray by default, a cluster
with `address`), each streaming its rank's share of the shards. The loop itself lives in
trainers/ and knows nothing of Ray's launching APIs.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from trainers import train
from trainers.options import RunConfig, TrainOptions


def run_training(
    options: TrainOptions,
    *,
    workers: int = 1,
    address: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train (or resume) a run; returns the loop's summary (steps, loss, samples/s,
    `stopped_by` when a signal stopped it: see `trainers.train.stop_message`)."""
    config = train.prepare_run(options, resume=resume)
    if workers > 1 or address:
        return train_with_ray(config, workers, address)
    return train.train_loop(config, train.default_stream_factory(config))


def _ray_worker(record: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker: the same loop, on this worker's rank."""
    import ray.train
    import ray.train.torch

    config = RunConfig.from_record(record)
    context = ray.train.get_context()
    train.train_loop(
        config,
        train.default_stream_factory(config),
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=ray.train.torch.get_device(),
        report=lambda line: ray.train.report(line),
        catch_signals=False,  # Ray stops its workers; the driver sees Ctrl-C
    )


def train_with_ray(config: RunConfig, workers: int, address: str | None) -> dict[str, Any]:
    """Data-parallel training in `workers` Ray Train workers (embedded Ray by default)."""
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.runtime import init_ray

    init_ray(address)
    run_dir = config.options.output
    use_gpu = torch.cuda.is_available() and config.options.device != "cpu"
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config=config.to_record(),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RayRunConfig(
            name="ray-train",
            storage_path=os.path.abspath(os.path.join(run_dir, "ray")),
        ),
    )
    started = time.perf_counter()
    trainer.fit()
    elapsed = time.perf_counter() - started
    checkpoint = train.load_checkpoint(run_dir)
    metrics = train.read_metrics(run_dir)
    return {
        "run_dir": run_dir,
        "steps": int(checkpoint["step"]),
        "total_steps": config.options.steps,
        "final_loss": metrics[-1]["loss"] if metrics else float("nan"),
        "samples_per_s": metrics[-1]["samples_per_s"] if metrics else float("nan"),
        "elapsed_s": elapsed,
        "device": "cuda" if use_gpu else "cpu",
        "workers": workers,
        "stopped_by": None,
    }
