"""A camera stored as video (`collect --codec h264|av1`) against the same frames stored as
PNG, and the shard decision: decode the videos at shard time into PNG (what `shard` does)
or carry the video and decode each window in the loader.

    .venv/bin/python -m bench.frames_video --out bench/results/frames_video.json [--episodes 8]

Data: Pendulum-v1 rendered at 64x64 by `collect --frames 64x64` (noise 0, 0.5, 1; episodes
of `--steps` steps), once per codec, in this process (one core). Measured, per codec:
- stored bytes per frame (the frames column's Parquet chunks over the steps, as `info`);
- collect seconds (rendering dominates: the ratio to PNG is what the codec costs);
- shard seconds (`--window 8 --frame-stack 3`, in process) and shard bytes per frame: a
  video camera's shard time includes decoding every video and encoding each frame as PNG;
- the shard decision, on the same episodes: frames/s (per CPU-second) of
  (a) the loader's frame decoder over random windows of the PNG shards (each window's 8
      steps and 2 before them: `schemas.frames.decode_frame`, what the loader runs),
  (b) a bare PyAV loop decoding the same windows from the episode videos (open the MP4,
      seek to the keyframe at or before the window's first step, decode forward: what a
      loader carrying video would have to do), and
  (c) whole-episode sequential decoding of the videos (`schemas.video.decode_video`, what
      `shard` does once per frame).
The machine's load average before and after goes with the numbers.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time

import numpy as np

from bench import save_results

SIZE = 64
WINDOW, STACK = 8, 3


def collect_codec(out: str, codec: str, episodes: int, steps: int) -> float:
    from engine.collect import Rollouts, collect, plan_collect
    from engine.executor import InProcess
    from schemas.frames import CameraInfo

    camera = CameraInfo(height=SIZE, width=SIZE, codec=codec)
    rollouts = Rollouts("Pendulum-v1", noise_levels=(0.0, 0.5, 1.0), max_steps=steps, frames=camera)
    plan = plan_collect(rollouts, episodes, episodes_per_part=episodes)
    start = time.perf_counter()
    collect(plan, out, executor=InProcess(), command="bench.frames_video")
    return time.perf_counter() - start


def shard_codec(dataset: str, out: str) -> tuple[float, int]:
    from engine.dataset import open_dataset
    from engine.executor import InProcess
    from engine.shards import ShardSettings, write_shards

    settings = ShardSettings(window=WINDOW, frame_stack=STACK, seed=0)
    start = time.perf_counter()
    write_shards(open_dataset(dataset), settings, out, executor=InProcess(), command="bench")
    seconds = time.perf_counter() - start
    size = sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(out)
        for name in names
        if name.endswith(".tar")
    )
    return seconds, size


def windows(lengths: list[int], count: int, seed: int = 0) -> list[tuple[int, int]]:
    """`count` random (episode, first step) windows of WINDOW steps and the STACK - 1 before."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        episode = int(rng.integers(len(lengths)))
        out.append((episode, int(rng.integers(0, lengths[episode] - WINDOW + 1))))
    return out


def window_steps(start: int) -> range:
    return range(max(start - (STACK - 1), 0), start + WINDOW)


def png_windows(images: list[list[bytes]], chosen, camera) -> int:
    from schemas.frames import decode_frame

    frames = 0
    for episode, start in chosen:
        for t in window_steps(start):
            decode_frame(images[episode][t], camera)
            frames += 1
    return frames


def video_windows(videos: list[bytes], chosen) -> int:
    """A loader that carries video: per window, open the MP4, seek to the keyframe at or
    before its first step, decode forward to its last."""
    import av

    frames = 0
    for episode, start in chosen:
        steps = window_steps(start)
        with av.open(io.BytesIO(videos[episode])) as container:
            stream = container.streams.video[0]
            first = steps.start / float(stream.average_rate)
            container.seek(int(first / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                t = int(round(float(frame.pts * stream.time_base) * float(stream.average_rate)))
                if t >= steps.stop:
                    break
                if t >= steps.start:
                    frame.to_ndarray(format="rgb24")
                    frames += 1
    return frames


def cpu_rate(work) -> float:
    start = time.process_time()
    frames = work()
    return round(frames / max(time.process_time() - start, 1e-9), 1)


def run(episodes: int, steps: int, count: int) -> dict:
    from engine.dataset import open_dataset
    from engine.info import cameras_info
    from schemas.video import decode_video

    results: dict = {
        "machine": platform.node(),
        "load_before": os.getloadavg(),
        "frames": f"Pendulum-v1 {SIZE}x{SIZE}, {episodes} episodes x {steps} steps",
        "codecs": {},
    }
    with tempfile.TemporaryDirectory() as root:
        for codec in ("png", "h264", "av1"):  # warm-up: imports and first calls, not timed
            collect_codec(os.path.join(root, "warm-" + codec), codec, 1, 4)
        for codec in ("png", "h264", "av1"):
            data, shards = os.path.join(root, codec), os.path.join(root, codec + "-shards")
            collect_seconds = collect_codec(data, codec, episodes, steps)
            shard_seconds, shard_bytes = shard_codec(data, shards)
            dataset = open_dataset(data)
            total = dataset.manifest.steps
            results["codecs"][codec] = {
                "stored_bytes_per_frame": round(cameras_info(dataset)[0]["bytes_per_frame"], 1),
                "collect_seconds": round(collect_seconds, 2),
                "shard_seconds": round(shard_seconds, 2),
                "shard_bytes_per_frame": round(shard_bytes / total, 1),
            }
        png = open_dataset(os.path.join(root, "png"))
        camera = png.cameras["render"]
        steps_table = png.read_part(0, "steps", ["episode_id", "frame_render"])
        ids = steps_table.column("episode_id").to_numpy()
        column = steps_table.column("frame_render").to_pylist()
        bounds = np.flatnonzero(np.diff(ids)) + 1
        images = [list(chunk) for chunk in np.split(np.array(column, dtype=object), bounds)]
        lengths = [len(chunk) for chunk in images]
        chosen = windows(lengths, count)
        decision: dict = {
            "windows": count,
            "png_loader_decode": cpu_rate(lambda: png_windows(images, chosen, camera)),
        }
        for codec in ("h264", "av1"):
            dataset = open_dataset(os.path.join(root, codec))
            info = dataset.cameras["render"]
            videos = dataset.read_part(0, "episodes", ["frame_render"]).column(0).to_pylist()
            decision[f"{codec}_window_decode"] = cpu_rate(
                lambda videos=videos: video_windows(videos, chosen)
            )
            decision[f"{codec}_sequential_decode"] = cpu_rate(
                lambda videos=videos, info=info: sum(
                    len(decode_video(v, info, "bench")) for v in videos
                )
            )
        for codec in ("h264", "av1"):
            decision[f"png_over_{codec}_windows"] = round(
                decision["png_loader_decode"] / decision[f"{codec}_window_decode"], 2
            )
        results["shard_decision_frames_per_cpu_second"] = decision
    for codec in ("h264", "av1"):
        entry, base = results["codecs"][codec], results["codecs"]["png"]
        entry["png_bytes_over_it"] = round(
            base["stored_bytes_per_frame"] / entry["stored_bytes_per_frame"], 2
        )
        entry["collect_vs_png"] = round(entry["collect_seconds"] / base["collect_seconds"], 2)
        entry["shard_vs_png"] = round(entry["shard_seconds"] / base["shard_seconds"], 2)
    results["load_after"] = os.getloadavg()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/frames_video.json")
    parser.add_argument("--episodes", type=int, default=6)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--windows", type=int, default=200)
    args = parser.parse_args(argv)
    save_results(run(args.episodes, args.steps, args.windows), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
