"""The training loop: plain PyTorch over batches streamed from shards.

One function, `train_loop`, does the work for a single process and for each Ray Train
worker alike. Read it top to bottom:
  1. build the model from the shard index and the requested condition columns;
  2. resume model, optimizer, step and loader position from the run's checkpoint, if any;
  3. stream batches (trainers.data.stream), one optimizer step per batch, with bf16 autocast
     on CUDA, gradient clipping and a warmup + cosine learning rate that depends only on the
     step (so a resumed run follows the same schedule);
  4. every `log_every` steps one JSON line in `metrics.jsonl` (loss, lr, samples/s);
     every `checkpoint_every` steps and at the end a checkpoint.

A run directory holds `config.json` (what was asked, plain JSON), `checkpoint.pt` (tensors
and plain containers only, loadable with `torch.load(..., weights_only=True)`) and
`metrics.jsonl`. `--workers N` runs the same loop in N Ray Train workers
(data-parallel with DDP, gloo on CPU); worker r streams its rank's share of the shards.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from tqdm import tqdm

from engine import storage
from trainers.models import Policy, build_model, model_config

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"

# A loader factory: (start_state, rank, world_size) -> iterable of batches with state_dict().
StreamFactory = Callable[[Any, int, int], Iterable[dict[str, torch.Tensor]]]


def learning_rate(step: int, options: dict[str, Any]) -> float:
    """Linear warmup, then cosine decay to 10% of the peak, as a pure function of the step."""
    peak, total = options["lr"], max(1, options["steps"])
    warmup = min(options["warmup"], max(1, total // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def save_checkpoint(run_dir: str, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes(storage.join(run_dir, CHECKPOINT), buffer.getvalue())


def load_checkpoint(run_dir: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The run's checkpoint; only tensors and plain containers (weights_only=True)."""
    uri = storage.join(run_dir, CHECKPOINT)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri} does not exist: is {run_dir} a `hindsight train` run?")
    stream = io.BytesIO(storage.read_bytes(uri))
    return torch.load(stream, map_location=map_location, weights_only=True)


def load_policy(run_dir: str, device: str | torch.device = "cpu") -> tuple[Policy, dict[str, Any]]:
    """The trained policy of a run (eval mode) and the run's config."""
    checkpoint = load_checkpoint(run_dir, map_location=device)
    config = checkpoint["config"]
    model = build_model(config["model"])
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), config


def default_stream_factory(config: dict[str, Any]) -> StreamFactory:
    """Batches from the run's shards through trainers.data.stream."""
    from trainers import data

    options = config["options"]

    def make(start_state: Any, rank: int, world_size: int):
        return data.stream(
            options["shards"],
            options["batch_size"],
            list(options["condition"]) or None,
            shuffle_buffer=options["shuffle_buffer"],
            seed=options["seed"],
            rank=rank,
            world_size=world_size,
            start_state=start_state,
        )

    return make


def new_run_config(index: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The run's config: the options plus the model config and the index facts that a
    rollout needs later without the shards (action space, conditions, return distribution)."""
    model = model_config(
        index,
        list(options["condition"]),
        kind=options["model"],
        d_model=options["d_model"],
        n_layer=options["n_layer"],
        n_head=options["n_head"],
        hidden=options["hidden"],
    )
    facts = {key: value for key, value in index.items() if key != "shards"}
    return {"options": dict(options), "model": model, "index": facts}


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


class _Loss(torch.nn.Module):
    # DDP only synchronizes gradients of what runs through its forward; the loss does.
    def __init__(self, policy: Policy):
        super().__init__()
        self.policy = policy

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.policy.loss(batch)


def train_loop(
    config: dict[str, Any],
    make_stream: StreamFactory,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train until `options["steps"]`, resuming from the run's checkpoint if present.

    Returns a summary (steps, final loss, samples/s). Rank 0 alone writes files.
    """
    options = config["options"]
    run_dir = options["run_dir"]
    os.makedirs(run_dir, exist_ok=True)
    device = device or pick_device(options["device"])
    torch.manual_seed(options["seed"])

    # --- model, optimizer, resume -----------------------------------------------------
    policy = build_model(config["model"]).to(device)
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=options["lr"], weight_decay=options["weight_decay"]
    )
    step, loader_states = 0, None
    fitted = bool(config["model"].get("observation_mean"))
    if storage.exists(storage.join(run_dir, CHECKPOINT)):
        checkpoint = load_checkpoint(run_dir, map_location=device)
        policy.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, loader_states, fitted = int(checkpoint["step"]), checkpoint["loader"], True
        torch.set_rng_state(checkpoint["rng"].cpu())
    loader_state = loader_states[rank] if loader_states and rank < len(loader_states) else None

    module: torch.nn.Module = _Loss(policy)
    if world_size > 1:
        module = torch.nn.parallel.DistributedDataParallel(module)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    stream = make_stream(loader_state, rank, world_size)
    batches = iter(stream)
    metrics_path = os.path.join(run_dir, METRICS)
    bar = tqdm(
        total=options["steps"],
        initial=step,
        desc="train",
        unit=" steps",
        disable=True if rank else None,
    )

    def checkpoint_now() -> None:
        states = [stream.state_dict()]
        if world_size > 1:
            gathered: list[Any] = [None] * world_size
            torch.distributed.all_gather_object(gathered, states[0])
            states = gathered
        if rank == 0:
            save_checkpoint(
                run_dir,
                {
                    "model": policy.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "loader": states,
                    "rng": torch.get_rng_state(),
                    "config": config,
                },
            )

    # --- the loop -----------------------------------------------------------------------
    loss: torch.Tensor | None = None
    window_samples, window_start = 0, time.perf_counter()
    started, samples_total = time.perf_counter(), 0
    while step < options["steps"]:
        try:
            batch = next(batches)
        except StopIteration:
            break
        batch = _to_device(batch, device)
        if not fitted:
            policy.fit_observation_normalizer(batch)
            fitted = True
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, options)
        with autocast:
            loss = module(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), options["grad_clip"])
        optimizer.step()
        step += 1
        size = int(batch["mask"].shape[0]) * world_size
        window_samples += size
        samples_total += size

        if step % options["log_every"] == 0 or step == options["steps"]:
            loss_value = float(loss.detach())
            now = time.perf_counter()
            record = {
                "step": step,
                "loss": loss_value,
                "lr": learning_rate(step - 1, options),
                "samples_per_s": window_samples / max(now - window_start, 1e-9),
                "elapsed_s": now - started,
            }
            window_samples, window_start = 0, now
            if rank == 0:
                with open(metrics_path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                bar.set_postfix(
                    loss=f"{loss_value:.4f}", samples_s=f"{record['samples_per_s']:.0f}"
                )
            if report is not None:
                report(record)
        bar.update(1)
        if step % options["checkpoint_every"] == 0 and step < options["steps"]:
            checkpoint_now()
    checkpoint_now()
    bar.close()
    elapsed = time.perf_counter() - started
    return {
        "run_dir": run_dir,
        "steps": step,
        "final_loss": float(loss.detach()) if loss is not None else float("nan"),
        "samples_per_s": samples_total / max(elapsed, 1e-9),
        "elapsed_s": elapsed,
        "device": str(device),
        "workers": world_size,
    }


def _ray_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker: the same loop, on this worker's rank."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    train_loop(
        config,
        default_stream_factory(config),
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=ray.train.torch.get_device(),
        report=lambda record: ray.train.report(record),
    )


def train_with_ray(config: dict[str, Any], workers: int, address: str | None) -> dict[str, Any]:
    """Data-parallel training in `workers` Ray Train workers (embedded Ray by default)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.runtime import init_ray

    init_ray(address)
    run_dir = config["options"]["run_dir"]
    use_gpu = torch.cuda.is_available() and config["options"]["device"] != "cpu"
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name="ray-train",
            storage_path=os.path.abspath(os.path.join(run_dir, "ray")),
        ),
    )
    started = time.perf_counter()
    trainer.fit()
    elapsed = time.perf_counter() - started
    checkpoint = load_checkpoint(run_dir)
    metrics = read_metrics(run_dir)
    return {
        "run_dir": run_dir,
        "steps": int(checkpoint["step"]),
        "final_loss": metrics[-1]["loss"] if metrics else float("nan"),
        "samples_per_s": metrics[-1]["samples_per_s"] if metrics else float("nan"),
        "elapsed_s": elapsed,
        "device": "cuda" if use_gpu else "cpu",
        "workers": workers,
    }


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(run_dir, METRICS)
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]
