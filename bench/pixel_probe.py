"""Can the trainer's frame encoder see what a pixel policy needs? A probe on real shards.

    PYTHONPATH=. .venv/bin/python -m bench.pixel_probe --out bench/results/pixel-probe.json

Pendulum-v1 frames collected, relabeled and sharded as examples/pixel_experiment.py does
(`collect --frames`, `shard --frame-stack 3`), read through `trainers.loader.stream` (what
the trainer reads, single steps). The trainer's `FrameEncoder` (the Nature CNN) and a linear
head are trained to regress the stored state of the same step (cos theta, sin theta and the
angular velocity / 8) from the stack of frames, on the even episodes, and scored (R^2 per
target) on the odd ones. The angle is in one frame; the velocity only in the difference of
the stacked frames. Two normalizations of the same encoder, same seed and batches:
  divide_by_255  what runs before the fix did (the frames entry without `normalize`)
  mean_frame     the mean frame of the first batch subtracted, divided by the pixels'
                 standard deviation (trainers.frames.FrameNormalizer; every new run)
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import time
from typing import Any

import torch

from bench import save_results

VELOCITY_SCALE = 8.0  # Pendulum's max speed: the velocity target lies in [-1, 1]


def probe_batches(shards: str, config: dict[str, Any], count: int, seed: int) -> dict[str, Any]:
    """`count` loader batches of single steps: frames, state targets, episode parity."""
    from trainers import loader

    camera = next(iter(config["frames"]["cameras"]))
    stream = loader.stream(shards, 256, None, seed=seed, window=1, cameras=[camera])
    batches = list(itertools.islice(stream, count))
    frames = torch.cat([b[f"frame_{camera}"][:, 0] for b in batches])  # single steps
    target = torch.cat([b["observation"][:, 0] for b in batches])
    target = target / torch.tensor([1.0, 1.0, VELOCITY_SCALE])
    even = torch.cat([b["episode_id"] % 2 == 0 for b in batches])
    return {"camera": camera, "frames": frames, "target": target, "train": even}


def probe(frames_config: dict[str, Any], data: dict[str, Any], steps: int, seed: int) -> dict:
    """Train encoder + linear head on the even episodes; R^2 on the odd ones."""
    from trainers.frames import FrameEncoder

    torch.manual_seed(seed)
    encoder = FrameEncoder(frames_config, 128)
    head = torch.nn.Linear(encoder.output_dim, 3)
    optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=1e-3)
    column = f"frame_{data['camera']}"
    train_frames, train_target = data["frames"][data["train"]], data["target"][data["train"]]
    test_frames, test_target = data["frames"][~data["train"]], data["target"][~data["train"]]
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _ in range(steps):
        rows = torch.randint(0, len(train_frames), (256,), generator=generator)
        features = encoder({column: train_frames[rows][:, None]})[:, 0]
        loss = ((head(features) - train_target[rows]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    encoder.eval()
    with torch.no_grad():
        predicted = head(encoder({column: test_frames[:, None]})[:, 0])
    r2 = 1 - ((predicted - test_target) ** 2).mean(0) / test_target.var(0)
    return {
        "r2": dict(zip(("cos", "sin", "velocity"), [round(float(v), 4) for v in r2], strict=True)),
        "final_train_loss": float(loss.detach()),
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/pixel-probe.json")
    parser.add_argument("--work", default=None, help="Data directory (reused when present).")
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--size", default="32x32")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="Probe training steps.")
    parser.add_argument("--batches", type=int, default=24, help="Loader batches of 256.")
    args = parser.parse_args(argv)

    import tempfile

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from examples.pixel_experiment import build_pixel_shards
    from jobs.runtime import init_ray
    from trainers import loader
    from trainers.frames import frames_config

    init_ray()
    work = args.work or tempfile.mkdtemp(prefix="hs-pixel-probe-")
    data_args = argparse.Namespace(
        episodes=args.episodes, size=args.size, channels=args.channels, max_steps=None,
        frame_stack=3,
    )  # fmt: skip
    shards = build_pixel_shards(work, data_args)["shards"]
    index = loader.read_index(shards).model_dump(mode="json")
    config = {"frames": frames_config(index, inputs="frames")}
    data = probe_batches(shards, config, args.batches, seed=0)
    load_before = os.getloadavg()
    old = {k: v for k, v in config["frames"].items() if k != "normalize"}
    results = {
        "divide_by_255": probe(old, data, args.steps, seed=0),
        "mean_frame": probe(config["frames"], data, args.steps, seed=0),
    }
    report = {
        "benchmark": "pixel probe: regress Pendulum's state from a frame stack (trainers.frames)",
        "size": {**vars(args), "samples": len(data["target"]), "train": int(data["train"].sum())},
        "frames": {
            **config["frames"],
            "pixels_not_background": float((data["frames"] < 250).float().mean()),
        },
        "results": results,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "load_1min_before_after": [load_before[0], os.getloadavg()[0]],
        },
    }
    save_results(report, args.out)
    return report


if __name__ == "__main__":
    main()
