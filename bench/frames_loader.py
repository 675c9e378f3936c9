"""Camera frames through the loader, against a bare decode loop of the same codec on the
same bytes (the ceiling), measured in the same run.

    .venv/bin/python -m bench.frames_loader --out bench/results/frames_loader.json [--steps 4000]

Data: synthetic episodes of 200 steps with one camera of 64x64x3 frames (a smooth moving
scene with a little noise, like a resized render), PNG by default (`--codec`), written as a
frames group; sharded with `--window 8 --frame-stack 3`.

Measured:
- ceiling: `np.asarray(Image.open(BytesIO(frame)))` over every stored frame, frames per
  CPU-second (one core);
- the loader (`trainers.loader.stream`, batches of 64 windows, one epoch): frames decoded
  per CPU-second (this process, its threads and finished DataLoader workers), for the full
  window and stack and for single steps with k = 1 (the RvS MLP's case); the ratio
  ceiling / loader is the goal's number (within 1.25x), also against the ceiling measured
  right before and after each run (`ceiling_next_to_it_over_loader_per_cpu_s`: on a
  shared machine the per-core rate drifts with the load during the minutes of the runs);
- windows/s (wall) with 0 workers, 0 workers and 2 decode threads, 1 and 2 DataLoader
  workers, and the loader's frame decoder alone with 0 and 2 threads (frames/s, wall);
  the machine's load average before and after.
A frame the loader decodes is one (episode, step) a batch needs: its windows' steps and the
k - 1 steps before each, each decoded once per batch (counted from the batch itself).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import tempfile

import numpy as np

from bench.shards import Clock

SIZE = 64
EPISODE_STEPS = 200
WINDOW, STACK, BATCH = 8, 3, 64


def scene(episode: int, steps: int, rng: np.random.Generator) -> np.ndarray:
    """`steps` frames of a disc moving over a gradient, with a little noise: uint8 N x H x W x 3."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    t = np.arange(steps)[:, None, None]
    cx = SIZE / 2 + SIZE / 3 * np.cos(0.05 * t + episode)
    cy = SIZE / 2 + SIZE / 3 * np.sin(0.05 * t + episode)
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < 40
    frames = np.empty((steps, SIZE, SIZE, 3), dtype=np.uint8)
    frames[..., 0] = (xx * 3 + episode * 7) % 256
    frames[..., 1] = yy * 3
    frames[..., 2] = 128
    frames[disc] = (230, 60, 40)
    noise = rng.integers(0, 4, size=frames.shape, dtype=np.uint8)
    return frames + noise


def make_dataset(uri: str, steps: int, codec: str) -> str:
    from engine.dataset import open_dataset
    from engine.writer import VersionWriter, assemble_group, inherit_groups, new_manifest
    from schemas.frames import FRAMES_GROUP, CameraInfo, encode_frames, frames_table
    from tests.synthetic import make_episodes, write_synthetic_dataset

    episodes = max(1, steps // EPISODE_STEPS)
    step_table, episode_table = make_episodes(
        num_episodes=episodes, seed=0, min_length=EPISODE_STEPS, max_length=EPISODE_STEPS
    )
    write_synthetic_dataset(uri + "-base", step_table, episode_table, part_steps=steps // 2)
    parent = open_dataset(uri + "-base")
    camera = CameraInfo(height=SIZE, width=SIZE, codec=codec)
    rng = np.random.default_rng(0)
    with VersionWriter(uri) as writer:
        written = []
        for index in range(parent.num_parts):
            ids = parent.read_part(index, columns=["episode_id"]).column("episode_id").to_numpy()
            frames = np.concatenate(
                [scene(int(e), int((ids == e).sum()), rng) for e in np.unique(ids)]
            )
            table = frames_table({"render": encode_frames(frames, camera)})
            written.append(writer.write_part(index, table, None, group=FRAMES_GROUP))
        group = assemble_group(writer.uri, FRAMES_GROUP, written, cameras={"render": camera})
        writer.commit(
            new_manifest(
                groups=inherit_groups(parent, [group]),
                parts=parent.manifest.parts,
                operation="relabel",
                command="bench.frames_loader",
                parent=parent,
            )
        )
    return uri


def ceiling(dataset_uri: str) -> dict:
    """The bare decode loop over the stored bytes (twice; the second pass is timed)."""
    from PIL import Image

    from engine.dataset import open_dataset

    data = open_dataset(dataset_uri).read(columns=["frame_render"]).column(0).to_pylist()
    for frame in data[:200]:
        np.asarray(Image.open(io.BytesIO(frame)))
    with Clock() as clock:
        for frame in data:
            np.asarray(Image.open(io.BytesIO(frame)))
    return {**clock.rates(len(data), "frames"), "bytes_per_frame": sum(map(len, data)) / len(data)}


def decoder_threads(dataset_uri: str, threads: int) -> dict:
    """The loader's FrameDecoder alone over every stored frame (wall): does decoding scale
    with threads on this machine (PIL releases the GIL while it decodes)?"""
    from engine.dataset import open_dataset
    from trainers.loader import FrameDecoder, PoolFrames

    column = open_dataset(dataset_uri).read(columns=["frame_render"]).column(0).to_pylist()
    offsets = np.concatenate([[0], np.cumsum([len(frame) for frame in column])])
    dataset = open_dataset(dataset_uri)
    camera = next(group.cameras["render"] for group in dataset.manifest.groups if group.cameras)
    frames = PoolFrames(camera, [b"".join(column)], [offsets], ["bench"], np.zeros(1, np.int64))
    decoder = FrameDecoder(threads)
    rows = np.arange(len(column))
    decoder.decode(frames, rows[:200])
    with Clock() as clock:
        decoder.decode(frames, rows)
    decoder.close()
    return clock.rates(len(rows), "frames")


def decoded_frames(batch, stack: int) -> int:
    """The distinct (episode, step) frames a batch needed: what the loader decoded."""
    episode = batch["episode_id"].numpy()[:, None, None]
    t = batch["timestep"].numpy()[..., None]
    mask = np.broadcast_to(batch["mask"].numpy()[..., None], (*t.shape[:2], stack))
    shown = np.maximum(t - np.arange(stack)[None, None, :], 0)
    pairs = np.stack([np.broadcast_to(episode, shown.shape)[mask], shown[mask]], axis=1)
    return len(np.unique(pairs, axis=0))


def loader_rate(shards: str, workers: int = 0, threads: int = 0, **options) -> dict:
    from trainers.loader import stream

    stack = options.get("frame_stack") or STACK
    loader = stream(
        shards,
        BATCH,
        num_workers=workers,
        decode_threads=threads,
        # Every batch's frames decoded afresh, as the ceiling decodes each frame: this bench
        # measures decoding; the frame cache (fewer decodes) in bench.frames_train_shards.
        frame_cache_mb=0,
        epochs=1,
        seed=0,
        shuffle_buffer=4096,
        **options,
    )
    windows = frames = 0
    with Clock() as clock:
        for batch in loader:
            windows += int(batch["mask"].shape[0])
            frames += decoded_frames(batch, stack)
    return {**clock.rates(windows, "windows"), **clock.rates(frames, "frames")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/frames_loader.json")
    parser.add_argument("--steps", type=int, default=4000, help="dataset size in steps")
    parser.add_argument("--codec", default="png", choices=["png", "jpeg", "webp"])
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from engine.dataset import open_dataset
    from engine.executor import InProcess
    from engine.shards import ShardSettings, write_shards

    results: dict = {
        "config": {
            "steps": args.steps,
            "frame": f"{SIZE}x{SIZE}x3",
            "codec": args.codec,
            "window": WINDOW,
            "frame_stack": STACK,
            "batch": BATCH,
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "load_average_before": os.getloadavg(),
        }
    }
    work = tempfile.mkdtemp(prefix="bench-frames-")
    try:
        dataset = make_dataset(f"{work}/ds", args.steps, args.codec)
        shards = f"{work}/shards"
        settings = ShardSettings(
            window=WINDOW, frame_stack=STACK, shard_steps=max(1, args.steps // 4)
        )
        index = write_shards(
            open_dataset(dataset), settings, shards, executor=InProcess(), command="bench"
        )
        results["shards"] = {
            "windows": index.windows,
            "shards": len(index.shards),
            "bytes": sum(s.bytes for s in index.shards),
        }
        results["ceiling_bare_decode"] = ceiling(dataset)
        for threads in (0, 2):
            results[f"decoder_alone_{threads}_threads"] = decoder_threads(dataset, threads)
        runs = {
            "loader_window8_stack3_0_workers": dict(),
            "loader_window1_stack1_0_workers": dict(window=1, frame_stack=1),
            "loader_window8_stack3_0_workers_2_threads": dict(threads=2),
            "loader_window8_stack3_1_worker": dict(workers=1),
            "loader_window8_stack3_2_workers": dict(workers=2),
        }
        adjacent = {}
        for name, options in runs.items():
            before = ceiling(dataset)["frames_per_cpu_s"]
            results[name] = loader_rate(shards, **options)
            after = ceiling(dataset)["frames_per_cpu_s"]
            # The ceiling measured right before and after this run: on a shared machine
            # the per-core rate drifts with the load over the minutes the runs take.
            adjacent[name] = (before + after) / 2 / results[name]["frames_per_cpu_s"]
            results[name]["ceiling_next_to_it_frames_per_cpu_s"] = (before + after) / 2
            print(name, json.dumps(results[name]), flush=True)
        bare = results["ceiling_bare_decode"]["frames_per_cpu_s"]
        results["ceiling_over_loader_per_cpu_s"] = {
            name: bare / results[name]["frames_per_cpu_s"] for name in runs
        }
        results["ceiling_next_to_it_over_loader_per_cpu_s"] = adjacent
        results["config"]["load_average_after"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)
    for key in ("ceiling_bare_decode", "decoder_alone_0_threads", "decoder_alone_2_threads"):
        print(key, json.dumps(results[key]))
    for key in (
        "ceiling_over_loader_per_cpu_s",
        "ceiling_next_to_it_over_loader_per_cpu_s",
        "config",
    ):
        print(key, json.dumps(results[key]))


if __name__ == "__main__":
    main()
