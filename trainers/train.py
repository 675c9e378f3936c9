"""The training loop: plain PyTorch over batches streamed from shards.

One function, `train_loop`, does the work for a single process and for each Ray Train
worker alike (jobs/training.py launches those). Read it top to bottom:
  1. build the model from the run's config (`prepare_run`: the options plus the shard
     index facts);
  2. resume model, optimizer, step and loader position from the run's checkpoint, if any;
  3. stream batches (trainers.loader.stream), one optimizer step per batch, with bf16 autocast
     on CUDA, gradient clipping and a warmup + cosine learning rate that depends only on the
     step (so a resumed run follows the same schedule);
  4. progress (a bar on a terminal, a line every few seconds in a log: steps, loss,
     samples/s, ETA); every `log_every` steps one JSON line in `metrics.jsonl` (loss, lr,
     samples/s); every `checkpoint_every` steps and at the end a checkpoint;
  5. SIGINT (Ctrl-C) or SIGTERM: the step in flight finishes, a checkpoint is written and the
     loop returns with `stopped_by` set, so the command can say how to resume and exit with
     128 + the signal's number. A second Ctrl-C stops at once (the last checkpoint stays).

A run directory holds `config.json` (what was asked, plain JSON), `checkpoint.pt` (tensors
and plain containers only, loadable with `torch.load(..., weights_only=True)`) and
`metrics.jsonl`.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from types import FrameType
from typing import Any

import torch

from engine import storage
from engine.progress import Progress
from trainers.models import Policy, build_model, model_config
from trainers.options import (  # noqa: E402  (re-exported)
    CHECKPOINT,
    CONFIG,
    FIXED_ON_RESUME,
    METRICS,
    RESUMABLE,
    RunConfig,
    TrainOptions,
    trainer_options,
    with_model_defaults,
)

# The signals that stop a run cleanly, and the exit status a command then ends with.
STOP_EXIT_CODES = {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}

# A loader factory: (start_state, rank, world_size) -> iterable of batches with state_dict().
StreamFactory = Callable[[Any, int, int], Iterable[dict[str, torch.Tensor]]]


def learning_rate(step: int, options: TrainOptions) -> float:
    """Linear warmup, then cosine decay to 10% of the peak, as a pure function of the step."""
    peak, total = options.lr, max(1, options.steps)
    warmup = min(options.warmup, max(1, total // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- run directory: config, checkpoint, metrics ---------------------------------------------


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


def load_run_config(run_dir: str) -> RunConfig:
    """The config recorded in the run's checkpoint (also of runs written by older versions)."""
    return RunConfig.from_record(load_checkpoint(run_dir)["config"])


def load_policy(run_dir: str, device: str | torch.device = "cpu") -> tuple[Policy, RunConfig]:
    """The trained policy of a run (eval mode) and the run's config."""
    checkpoint = load_checkpoint(run_dir, map_location=device)
    config = RunConfig.from_record(checkpoint["config"])
    model = build_model(config.model)
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), config


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(run_dir, METRICS)
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def new_run_config(index: dict[str, Any], options: TrainOptions) -> RunConfig:
    """The run's config: the options plus the model config and the index facts that a
    rollout needs later without the shards (action space, conditions, return distribution)."""
    options = with_model_defaults(options)
    if options.text_encoder is None:  # recorded, so that the run says how it read text
        options = options.model_copy(update={"text_encoder": "tokens"})
    model = model_config(
        index,
        list(options.condition),
        kind=options.model,
        d_model=options.d_model,
        n_layer=options.n_layer,
        n_head=options.n_head,
        hidden=options.hidden,
        window=options.window,
        inputs=options.inputs,
        cameras=options.cameras,
        frame_encoder=options.frame_encoder,
        text_encoder=options.text_encoder,
    )
    if options.augment_shift and not model.get("frames"):
        raise ValueError(
            f"--augment-shift {options.augment_shift} shifts camera frames, but this policy sees "
            "none (its inputs are the state vector)"
        )
    facts = {key: value for key, value in index.items() if key != "shards"}
    return RunConfig(options=options, model=model, index=facts)


def resumed_config(previous: RunConfig, options: TrainOptions) -> RunConfig:
    """The recorded run, continued with `options`: what defines the model and its data must
    match; only the length, logging, device and frame cache may change (a clear error
    otherwise). The frame cache stays as recorded unless asked again (a run started with
    `--frame-cache-mb 0` to spare memory keeps it on a plain `--resume`)."""
    asked = trainer_options(options)
    given = options.model_fields_set  # what was asked; a default (model=mlp) was not
    for key in FIXED_ON_RESUME:
        before, now = getattr(previous.options, key), getattr(asked, key)
        if key in given and now is not None and before != now:  # else the recorded one stays
            raise ValueError(
                f"--resume: {key} was {before!r} in {asked.output}, now {now!r}; "
                "a resumed run must match"
            )
    changes = {
        key: getattr(asked, key)
        for key in (*RESUMABLE, "output")
        if key != "frame_cache_mb" or key in given
    }
    return previous.model_copy(update={"options": previous.options.model_copy(update=changes)})


def prepare_run(options: TrainOptions, *, resume: bool = False) -> RunConfig:
    """Check the run directory and the shards, then write config.json; the run's config.

    A directory that holds a checkpoint is continued only with `resume`; a new run reads the
    shard index first, so a run that cannot start leaves no directory behind."""
    from trainers import loader

    run_dir = options.output
    if storage.is_s3(run_dir):
        raise ValueError("the run directory must be local (checkpoints and metrics live there)")
    has_checkpoint = os.path.exists(os.path.join(run_dir, CHECKPOINT))
    if has_checkpoint and not resume:
        raise ValueError(
            f"{run_dir} already holds a trained run; pass --resume to continue it "
            "or choose a new run directory"
        )
    if has_checkpoint:
        config = resumed_config(load_run_config(run_dir), options)
    else:
        index = loader.read_index(options.input).model_dump(mode="json")
        config = new_run_config(index, options)
    os.makedirs(run_dir, exist_ok=True)  # only once the shards and options check out
    with open(os.path.join(run_dir, CONFIG), "w") as handle:
        json.dump(config.to_record(), handle, indent=2)
    return config


def default_stream_factory(
    config: RunConfig, settings: dict[str, Any] | None = None
) -> StreamFactory:
    """Batches from the run's shards through trainers.loader.stream; `settings`: more
    loader arguments, or others in place of the run's (num_workers, decode_threads: the
    benchmarks' loader arms)."""
    from trainers import loader

    options = config.options

    def make(start_state: Any, rank: int, world_size: int):
        arguments = dict(
            shuffle_buffer=options.shuffle_buffer,
            seed=options.seed,
            rank=rank,
            world_size=world_size,
            start_state=start_state,
            window=int(config.model["window"]),
            # Decode only the cameras the model sees (none for a state-only run).
            cameras=sorted((config.model.get("frames") or {}).get("cameras") or {}),
            augment_shift=options.augment_shift,
            prefetch=loader_prefetch(config.model),
            frame_cache_mb=options.frame_cache_mb,
        )
        return loader.stream(
            options.input,
            options.batch_size,
            list(options.condition) or None,
            **arguments | dict(settings or {}),
        )

    return make


def loader_prefetch(model: dict[str, Any]) -> int:
    """Batches the loader makes ahead in a background thread: 2 for a policy on frames
    (decoding them takes longer than a step and releases the GIL, so it overlaps); none for
    one on state vectors. Their batches take ~0.1 ms of NumPy and Python to cut, next to a
    step whose kernels already keep every core busy: in a thread that work still competes
    for the cores, and for the GIL at every hand-off between ops: on 2 loaded cores (1 torch
    thread, median of 50-step chunks) the MLP streamed at 0.61x a bare loop with the thread
    and 0.98x without it (docs/trainer.md, Benchmarks). The batches are the same either way."""
    return 2 if model.get("frames") else 0


# --- stopping on a signal --------------------------------------------------------------------


class StopRequest:
    """Set by SIGINT or SIGTERM; the loop stops once the step in flight is done."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def __call__(self, signal_number: int, frame: FrameType | None) -> None:
        if self.signal_name == "SIGINT" and signal_number == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, keep the last checkpoint
        self.signal_name = signal.Signals(signal_number).name


@contextmanager
def stop_on_signals(enabled: bool = True) -> Iterator[StopRequest]:
    """Catch SIGINT and SIGTERM while the block runs (main thread only: Python delivers
    signals there; a Ray Train worker is stopped by Ray instead)."""
    request = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {
        number: signal.signal(number, request) for number in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield request
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def stop_message(summary: dict[str, Any], resume_command: str) -> str:
    """One line for a run stopped by a signal: where it stopped and how to continue."""
    what = {"SIGINT": "interrupted", "SIGTERM": "terminated (SIGTERM)"}[summary["stopped_by"]]
    return (
        f"train {what} after step {summary['steps']:,} of {summary['total_steps']:,}; "
        f"checkpoint saved in {summary['run_dir']}. Resume with: {resume_command}"
    )


# --- the loop --------------------------------------------------------------------------------


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":  # the loader's tensors are there already; `.to` still costs
        return batch
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def clip_gradients(parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_(parameters, max_norm)` with the same kernels in the
    same order (bit-identical gradients), minus its per-call grouping of the tensors by
    device and dtype: `parameters` share one device and dtype (`_one_device_and_dtype`).
    On the CPU the multiply by a clamped coefficient of exactly 1.0 (no clipping) is left
    out: it changes no bit, and reading the coefficient there costs no device sync. On a
    small MLP this is most of the trainer's own per-step overhead over a bare loop."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    with torch.no_grad():
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if grads[0].device.type != "cpu" or float(coefficient) != 1.0:
            torch._foreach_mul_(grads, coefficient)
    return total


def _one_device_and_dtype(parameters: list[torch.Tensor]) -> bool:
    """Whether `clip_gradients` may skip the grouping clip_grad_norm_ does."""
    return len({(p.device, p.dtype) for p in parameters}) <= 1


class _Loss(torch.nn.Module):
    # DDP only synchronizes gradients of what runs through its forward; the loss does.
    def __init__(self, policy: Policy):
        super().__init__()
        self.policy = policy

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.policy.loss(batch)


def train_loop(
    config: RunConfig,
    make_stream: StreamFactory,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    report: Callable[[dict[str, Any]], None] | None = None,
    catch_signals: bool = True,
) -> dict[str, Any]:
    """Train until `options.steps`, resuming from the run's checkpoint if present.

    Returns a summary (steps, final loss, samples/s, `stopped_by`: None, or "SIGINT" /
    "SIGTERM" when a signal stopped the run after a checkpoint). Rank 0 alone writes files.
    """
    options = config.options
    run_dir = options.output
    os.makedirs(run_dir, exist_ok=True)
    device = device or pick_device(options.device)
    torch.manual_seed(options.seed)

    # --- model, optimizer, resume -----------------------------------------------------
    policy = build_model(config.model).to(device)
    parameters = list(policy.parameters())
    # foreach: one kernel per step for all parameters, not a Python loop over them (on a
    # small MLP the per-parameter loop is a sixth of the step on CPU).
    optimizer = torch.optim.AdamW(
        parameters, lr=options.lr, weight_decay=options.weight_decay, foreach=True
    )
    step, loader_states = 0, None
    fitted = bool(config.model.get("observation_mean"))
    if storage.exists(storage.join(run_dir, CHECKPOINT)):
        checkpoint = load_checkpoint(run_dir, map_location=device)
        policy.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, loader_states, fitted = int(checkpoint["step"]), checkpoint["loader"], True
        torch.set_rng_state(checkpoint["rng"].cpu())
    else:  # a new run: a pretrained text encoder embeds the index's texts, once
        policy.condition.embed_texts()
    loader_state = loader_states[rank] if loader_states and rank < len(loader_states) else None

    # DDP needs a module around the loss; a single process calls the loss directly.
    loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor] = policy.loss
    if world_size > 1:
        loss_of = torch.nn.parallel.DistributedDataParallel(_Loss(policy))
    # bf16 autocast on CUDA; elsewhere no context at all (a disabled one still costs a step).
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    )
    if _one_device_and_dtype(parameters):
        clip = clip_gradients
    else:
        clip = torch.nn.utils.clip_grad_norm_

    stream = make_stream(loader_state, rank, world_size)
    batches = iter(stream)
    metrics_path = os.path.join(run_dir, METRICS)
    record = config.to_record()

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
                    "config": record,
                },
            )

    def optimizer_step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        nonlocal fitted
        if not fitted:
            policy.fit_observation_normalizer(batch)
            fitted = True
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, options)
        with autocast:
            loss = loss_of(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip(parameters, options.grad_clip)
        optimizer.step()
        return loss

    # --- the loop -----------------------------------------------------------------------
    loss: torch.Tensor | None = None
    window_samples, window_start = 0, time.perf_counter()
    started, samples_total = time.perf_counter(), 0
    progress_bar = Progress("train", options.steps, "steps", initial=step) if rank == 0 else None
    with stop_on_signals(catch_signals) as stop, progress_bar or nullcontext() as progress:
        while step < options.steps and stop.signal_name is None:
            try:
                batch = _to_device(next(batches), device)
            except StopIteration:
                break
            loss = optimizer_step(batch)
            step += 1
            size = int(batch["mask"].shape[0]) * world_size
            window_samples += size
            samples_total += size

            if step % options.log_every == 0 or step == options.steps:
                now = time.perf_counter()
                line = {
                    "step": step,
                    "loss": float(loss.detach()),
                    "lr": learning_rate(step - 1, options),
                    "samples_per_s": window_samples / max(now - window_start, 1e-9),
                    "elapsed_s": now - started,
                }
                window_samples, window_start = 0, now
                if rank == 0:
                    with open(metrics_path, "a") as handle:
                        handle.write(json.dumps(line) + "\n")
                    progress.set_postfix(
                        f"loss {line['loss']:.4f}, {line['samples_per_s']:,.0f} samples/s"
                    )
                if report is not None:
                    report(line)
            if progress is not None:
                progress.advance(1)
            if step % options.checkpoint_every == 0 and step < options.steps:
                checkpoint_now()
        checkpoint_now()
    elapsed = time.perf_counter() - started
    return {
        "run_dir": run_dir,
        "steps": step,
        "total_steps": options.steps,
        "final_loss": float(loss.detach()) if loss is not None else float("nan"),
        "samples_per_s": samples_total / max(elapsed, 1e-9),
        "elapsed_s": elapsed,
        "device": str(device),
        "workers": world_size,
        # A signal that came with the last step changes nothing: the run is complete.
        "stopped_by": stop.signal_name if step < options.steps else None,
    }
