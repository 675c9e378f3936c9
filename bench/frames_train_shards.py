"""Training from pixels through the frames loader: `hindsight train` from real shards against
the same model on in-memory uint8 batches (issue 14).

    PYTHONPATH=. nice -n 5 .venv/bin/python -m bench.frames_train_shards \\
        --out bench/results/frames_train_shards.json [--work DIR] [--rounds 3]

Data, made once in `--work` (reused by a rerun): `hindsight collect Pendulum-v1 --frames
64x64` (`--episodes`, 64 by default: 12,800 steps of PNG frames, 50 MLP batches of 256),
`relabel --with returns`, `shard --condition return_to_go --window 10 --frame-stack 3
--shard-steps 3200` (4 shards, so that 2 DataLoader workers each read their own), run as the
CLI in subprocesses (so this process never starts Ray and DataLoader workers fork from a
process without its threads).

Per model with its trainer defaults (`mlp`: single steps, batch 256; `transformer`: windows of
10, batch 64; the Nature CNN on the frames, the state vector and return_to_go), arms:
  bare        the same model (built from the run's config) and AdamW in the few lines everyone
              writes (bench.frames_train.bare_step_function), on 4 batches the loader made,
              held in memory: uint8 frames [B, W, 9, 64, 64], no loading at all
  trainer     trainers.train.train_loop as `hindsight train` runs it (the default stream: 0
              DataLoader workers, decoding in a background thread 2 batches ahead, a frame
              cache of 1 GiB)
  no-cache    the same without the frame cache (`frame_cache_mb=0`: each frame decoded once
              per window that shows it)
  small-cache a dataset larger than the cache: 100 MiB (8,500 of the 12,800 frames) and
              pools of 4,096 windows, so that a frame is decoded about once per epoch
  threads-2   the same, 2 decode threads in that loader thread (`decode_threads=2`)
  workers-1   the loader in 1 DataLoader worker process
  workers-2   in 2 (each reads its own shards and decodes its own batches)
The arms run in turn, `--rounds` times, the order rotated each round (load drift on this
shared machine hits every arm alike). A segment is one fresh run. The MLP's is two epochs
(the default shuffle buffer holds the whole epoch, so an epoch is one pool): the first is
untimed (model and loader start up, workers fork, and the frame cache fills), the second
timed whole, from reading its shards to its last batch: what every later epoch of a run
costs (with the default cache these 12,800 frames fit: nothing is decoded in it; the
small-cache arm shows a dataset that does not fit). The transformer's is
`--transformer-steps` steps, a quarter and one untimed: the first batches of a run, where
the cache has kept least (its goal was met without one). A segment's rate is the timed steps' samples over their
wall time (a loader that cannot keep up shows as waits); its CPU-seconds are those of this
process and its live children (the workers) over the same steps, read from /proc. An arm's
figure is the median over rounds; `over_bare` the median over rounds of the arm's rate over
that round's bare rate. The goal (issue 14): the whole trainer at >= 0.9x the bare loop.
On a GPU box (`device` is cuda when torch sees one) the same command measures the same arms.

Also measured: what the loader does per batch over an epoch after the first (frames decoded
per sample, CPU-seconds of decoding per batch against all of its CPU-seconds), with the
trainer's frame cache and without it (`frame_cache_mb=0`), and PNG decode per frame on these frames:
schemas.frames.decode_frame (Image.open) against the loader's decode_plain_png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

from bench import save_results, torch_machine

ARMS = {  # arm -> loader settings beyond the trainer's own (trainers.train)
    "trainer": {},
    "no-cache": {"frame_cache_mb": 0},
    "small-cache": {"frame_cache_mb": 100, "shuffle_buffer": 4096},
    "threads-2": {"decode_threads": 2},
    "workers-1": {"num_workers": 1},
    "workers-2": {"num_workers": 2},
}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def build_shards(work: str, episodes: int) -> str:
    """collect -> relabel -> shard with the CLI, once per work directory."""
    shards = os.path.join(work, "shards")
    if os.path.exists(os.path.join(shards, "index.json")):
        return shards
    raw, relabeled = os.path.join(work, "raw"), os.path.join(work, "relabeled")
    cli = [sys.executable, "-m", "jobs.cli"]
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    for command in (
        ["collect", "Pendulum-v1", raw, "--episodes", str(episodes), "--frames", "64x64",
         "--noise", "0,0.5,1.0", "--episodes-per-part", str(max(1, episodes // 4))],
        ["relabel", raw, relabeled, "--with", "returns"],
        ["shard", relabeled, shards, "--condition", "return_to_go", "--window", "10",
         "--frame-stack", "3", "--shard-steps", str(max(1, episodes * 200 // 4))],
    ):  # fmt: skip
        if not os.path.exists(os.path.join(work, command[2], "manifest.json")):
            subprocess.run([*cli, *command], check=True, env=env, cwd=work)
    return shards


def cpu_seconds(children: list[int]) -> float:
    """CPU seconds of this process (all its threads) and of the `children` still alive."""
    total = time.process_time()
    for pid in children:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def child_pids() -> list[int]:
    """Processes whose parent is this one (DataLoader workers)."""
    me, found = str(os.getpid()), []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as handle:
                    if handle.read().rsplit(")", 1)[1].split()[1] == me:
                        found.append(int(name))
            except OSError:
                continue
    return found


def segment_figures(ends: list[float], cpu: tuple[float, float], warm: int, batch: int) -> dict:
    """Rate and CPU of the steps after the first `warm` + 1 of a segment: `ends[i]` is when
    step i (from 0) ended, `cpu` the CPU-seconds read at ends[warm] and at the last end."""
    steps = np.diff(np.asarray(ends[warm:]))
    wall = float(ends[-1] - ends[warm])
    return {
        "timed_steps": len(steps),
        "wall_s": wall,
        "samples_per_s": batch * len(steps) / wall,
        "median_step_s": float(np.median(steps)),
        "cpu_s": cpu[1] - cpu[0],
        "samples_per_cpu_s": batch * len(steps) / max(cpu[1] - cpu[0], 1e-9),
    }


def bare_segment(step, steps: int, warm: int, batch: int) -> dict:
    ends, cpu = [], []
    for number in range(steps):
        step(number)
        ends.append(time.perf_counter())
        if number + 1 in (warm + 1, steps):  # as trainer_segment: when step warm + 1 ends
            cpu.append(cpu_seconds([]))
    return segment_figures(ends, (cpu[0], cpu[1]), warm, batch)


def trainer_segment(config, settings: dict[str, int], steps: int, warm: int, batch: int) -> dict:
    """One fresh `hindsight train` run of `steps` steps (its own run directory)."""
    from trainers import train

    ends: list[float] = []
    cpu: list[float] = []
    children: list[int] = []

    def report(line: dict[str, Any]) -> None:
        ends.append(time.perf_counter())
        if len(ends) == warm + 1:  # step `warm` (from 0) ended: the timed steps start
            children.extend(child_pids() if settings.get("num_workers") else [])
            cpu.append(cpu_seconds(children))
        elif len(ends) == steps:
            cpu.append(cpu_seconds(children))

    train.train_loop(
        config, train.default_stream_factory(config, settings), report=report, catch_signals=False
    )
    return segment_figures(ends, (cpu[0], cpu[1]), warm, batch)


def loader_profile(config, skip: int, batches: int, settings: dict[str, int]) -> dict[str, Any]:
    """Per batch of the trainer's stream with `settings` (0 workers, no prefetch thread: CPU
    in this thread), over `batches` batches after the first `skip`: frames decoded, decode
    CPU-seconds, all of the loader's CPU-seconds."""
    from trainers import train
    from trainers.loader import frames as loader_frames

    spent = {"decode_s": 0.0, "frames": 0}
    decode = loader_frames.FrameDecoder.decode

    def timed(self, frames, rows, out=None):
        started = time.thread_time()
        result = decode(self, frames, rows, out)
        spent["decode_s"] += time.thread_time() - started
        spent["frames"] += len(rows)
        return result

    options = config.options
    iterator = iter(train.default_stream_factory(config, {**settings, "prefetch": 0})(None, 0, 1))
    for _ in range(skip):  # the shuffle buffer fills (and, for an MLP, the first epoch)
        next(iterator)
    loader_frames.FrameDecoder.decode = timed
    try:
        started = time.thread_time()
        for _ in range(batches):
            next(iterator)
        total = time.thread_time() - started
    finally:
        loader_frames.FrameDecoder.decode = decode
        iterator.close()
    window = int(config.model["window"])
    samples = batches * int(options.batch_size) * window
    return {
        "frames_decoded_per_batch": spent["frames"] / batches,
        "frames_decoded_per_step": spent["frames"] / samples,
        "frames_per_batch": int(options.batch_size) * window * int(config.index["frame_stack"]),
        "cpu_s_per_batch": total / batches,
        "decode_cpu_s_per_batch": spent["decode_s"] / batches,
        "decode_share": spent["decode_s"] / total,
    }


def png_decode(shards: str, frames: int = 2000, rounds: int = 3) -> dict[str, float]:
    """CPU microseconds per frame, best of `rounds` (in turn): Image.open as
    schemas.frames.decode_frame does, and the loader's decode_plain_png; same pixels."""
    from schemas.frames import decode_frame
    from trainers.loader import read_index
    from trainers.loader.frames import decode_plain_png
    from trainers.loader.shards import shard_blocks

    index = read_index(shards)
    camera = index.cameras["render"]
    block = next(shard_blocks(os.path.join(shards, index.shards[0].name), index, [],
                               cameras=["render"]))  # fmt: skip
    data, offsets = block.frames["render"]
    encoded = [data[offsets[i] : offsets[i + 1]] for i in range(min(frames, len(offsets) - 1))]
    for item in encoded[:50]:
        assert np.array_equal(decode_plain_png(item, camera), decode_frame(item, camera))
    best = {"decode_frame_us": float("inf"), "decode_plain_png_us": float("inf")}
    for _ in range(rounds):
        for name, function in (("decode_frame_us", lambda item: decode_frame(item, camera)),
                                ("decode_plain_png_us", lambda item: decode_plain_png(item, camera))):  # fmt: skip
            started = time.process_time()
            for item in encoded:
                function(item)
            best[name] = min(best[name], (time.process_time() - started) / len(encoded) * 1e6)
    return {**best, "bytes_per_frame": float(np.mean([len(item) for item in encoded]))}


def measure(
    model: str, shards: str, steps: int | None, rounds: int, device: str, work: str
) -> dict:
    """The arms for one model: segments of `steps` steps, or (None) of two epochs, the
    second timed."""
    from bench.frames_train import bare_step_function
    from trainers import loader, train
    from trainers.options import MODEL_DEFAULTS, TrainOptions

    def config_for(name: str):
        options = TrainOptions(
            input=shards, output=os.path.join(work, "runs", f"{model}-{name}-{time.time_ns()}"),
            condition=["return_to_go"], model=model, steps=steps, log_every=1,
            checkpoint_every=steps + 1, device=device, frame_encoder="nature",
        )  # fmt: skip
        return train.new_run_config(loader.read_index(shards).model_dump(mode="json"), options)

    batch = int(MODEL_DEFAULTS[model]["batch_size"])  # the trainer's default for the model
    epoch = -(-loader.read_index(shards).windows // batch)  # steps per epoch (one pool)
    whole_epochs = steps is None
    warm = epoch - 1 if whole_epochs else max(2, steps // 4)
    steps = 2 * epoch if whole_epochs else steps
    config = config_for("bare")
    assert int(config.options.batch_size) == batch
    held = iter(train.default_stream_factory(config)(None, 0, 1))
    batches = [{k: v.clone().to(device) for k, v in next(held).items()} for _ in range(4)]
    held.close()
    bare_step = bare_step_function(config, batches)
    arms = ["bare", *ARMS]
    segments: dict[str, list[dict]] = {arm: [] for arm in arms}
    for round_number in range(rounds):
        for arm in arms[round_number % len(arms) :] + arms[: round_number % len(arms)]:
            if arm == "bare":
                figures = bare_segment(bare_step, steps, warm, batch)
            else:
                figures = trainer_segment(config_for(arm), ARMS[arm], steps, warm, batch)
            figures["load_1min"] = os.getloadavg()[0]
            segments[arm].append(figures)
            print(model, round_number, arm, json.dumps(figures), flush=True)
    summary = {}
    for arm in arms:
        rates = [s["samples_per_s"] for s in segments[arm]]
        per_cpu = [s["samples_per_cpu_s"] for s in segments[arm]]
        over = [s["samples_per_s"] / b["samples_per_s"] for s, b in zip(segments[arm], segments["bare"])]  # fmt: skip
        summary[arm] = {
            "loader": ARMS.get(arm, "none: batches in memory"),
            "samples_per_s": float(np.median(rates)),
            "samples_per_cpu_s": float(np.median(per_cpu)),
            "over_bare": float(np.median(over)),
            "over_bare_per_cpu_s": float(np.median(
                 [s["samples_per_cpu_s"] / b["samples_per_cpu_s"]
                  for s, b in zip(segments[arm], segments["bare"])])),
        }  # fmt: skip
    return {
        "batch_size": batch,
        "window": int(config.model["window"]),
        "steps_per_segment": steps,
        "untimed_steps_per_segment": warm,
        "arms": summary,
        "loader_per_batch": {
            name: loader_profile(
                config, epoch if whole_epochs else 1, epoch if whole_epochs else 12, settings
            )
            for name, settings in (
                ("cached", {}),
                *((arm, ARMS[arm]) for arm in ("no-cache", "small-cache")),
            )
        },
        "segments": segments,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/frames_train_shards.json")
    parser.add_argument("--work", default=None, help="Data directory (kept; default: a temp).")
    parser.add_argument(
        "--episodes",
        type=int,
        default=64,
        help="Pendulum episodes (a multiple of 64: whole MLP batches).",
    )
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of all arms, in turn.")
    parser.add_argument(
        "--mlp-steps",
        type=int,
        default=None,
        help="Steps per MLP segment (default: 2 epochs, 1 timed).",
    )
    parser.add_argument("--transformer-steps", type=int, default=8, help="Per transformer one.")
    parser.add_argument("--models", default="mlp,transformer")
    args = parser.parse_args(argv)
    if args.mlp_steps is None and args.episodes % 64:
        parser.error(
            "--episodes must be a multiple of 64 (whole MLP batches in each worker's epoch)"
        )

    os.environ.setdefault("HINDSIGHT_PROGRESS_SECONDS", "0")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="hs-bench-frames-train-shards-") as temporary:
        work = args.work or temporary
        shards = build_shards(work, args.episodes)
        steps = {"mlp": args.mlp_steps, "transformer": args.transformer_steps}
        models = {
            model: measure(model, shards, steps[model], args.rounds, device, work)
            for model in args.models.split(",")
        }
        decode = png_decode(shards)
    report = {
        "benchmark": "frames_train_shards",
        **torch_machine(device),
        "data": f"Pendulum-v1, {args.episodes} episodes, 64x64 RGB PNG, frame stack 3, 4 shards",
        "load_average_1min_before": load_before[0],
        "models": models,
        "png_decode": decode,
        "load_average_1min_after": os.getloadavg()[0],
    }  # fmt: skip
    save_results(report, args.out, echo=False)
    for model, result in models.items():
        for arm, figures in result["arms"].items():
            print(f"{model:12} {arm:10} {figures['samples_per_s']:8,.0f} samples/s "
                   f"({figures['over_bare']:.2f}x bare), {figures['samples_per_cpu_s']:6,.0f} "
                   f"samples per CPU-second ({figures['over_bare_per_cpu_s']:.2f}x)")  # fmt: skip
    return report


if __name__ == "__main__":
    main()
