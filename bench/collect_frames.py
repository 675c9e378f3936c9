"""Collect with frames against the env's own render loop (render is the ceiling).

    python -m bench.collect_frames --out bench/results/collect_frames.json [--episodes 20]

Same env (Pendulum-v1, 200 steps), same heuristic policy, same episodes, one core (in
process), rounds alternating between the sides; the median of `--repeats` rounds:

- render loop (the ceiling): `env.step` with the policy and `env.render()` at every step,
  nothing kept: what any recorder of this env pays at least;
- render + resize: the same loop with each frame resized to HxW (`engine.frames.render_frame`);
- collect --frames: `engine.collect.collect` writing a committed version with the frames
  group (rendered, resized, encoded in the part's task, written as Parquet), for each codec;
- collect without frames, for what the rest of collect costs.

Reported as frames per second and as the ratio collect / render loop (1.0 would be free
frames; from the medians, and from each side's fastest round, the least disturbed on a
loaded machine), with the bytes per stored frame (Parquet, zstd over the encoded images)
and the machine's load average.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench import save_results
from engine.collect import Rollouts, collect, heuristic_for, make_env, plan_collect
from engine.dataset import open_dataset
from engine.executor import InProcess
from engine.frames import render_frame
from schemas.frames import DEFAULT_QUALITY, CameraInfo

ENV_ID = "Pendulum-v1"


def render_loop(episodes: int, size: tuple[int, int] | None) -> int:
    """The env's own loop with a render at every step (resized to `size` if given)."""
    policy = heuristic_for(ENV_ID)
    env = make_env(ENV_ID, render_mode="rgb_array")
    frames = 0
    for episode in range(episodes):
        observation, _ = env.reset(seed=episode)
        done = False
        while not done:
            if size is None:
                env.render()
            else:
                render_frame(env, *size)
            frames += 1
            observation, _, terminated, truncated, _ = env.step(policy(observation))
            done = terminated or truncated
    env.close()
    return frames


def collect_once(directory: Path, episodes: int, camera: CameraInfo | None) -> tuple[int, int]:
    """Collect `episodes` into a new version (frames with `camera`); steps and frame bytes."""
    output = directory / "collected"
    shutil.rmtree(output, ignore_errors=True)
    rollouts = Rollouts(ENV_ID, frames=camera)
    plan = plan_collect(rollouts, episodes, episodes_per_part=max(1, episodes // 2))
    manifest = collect(plan, str(output), executor=InProcess(), command="bench")
    frame_bytes = 0
    if camera is not None:
        group = open_dataset(str(output)).manifest.group("frames")
        frame_bytes = sum(f.bytes for f in group.steps_files)
    return manifest.steps, frame_bytes


def collect_vs_render(episodes: int = 20, size: str = "64x64", repeats: int = 3) -> dict:
    """Frames/s of collect --frames (each codec) against the env's own render loop."""
    height, width = (int(v) for v in size.split("x"))
    cameras = {
        codec: CameraInfo(
            height=height, width=width, codec=codec, quality=DEFAULT_QUALITY.get(codec)
        )
        for codec in ("png", "jpeg", "webp")
    }
    sides = {
        "render_loop": lambda d: (render_loop(episodes, None), 0),
        "render_and_resize": lambda d: (render_loop(episodes, (height, width)), 0),
        "collect_without_frames": lambda d: collect_once(d, episodes, None),
        **{
            f"collect_frames_{c}": (lambda d, c=c: collect_once(d, episodes, cameras[c]))
            for c in cameras
        },
    }
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    counts: dict[str, tuple[int, int]] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-collect-frames-") as directory:
        for _ in range(repeats):
            for name, run in sides.items():
                started = time.perf_counter()
                counts[name] = run(Path(directory))
                seconds[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    best = {name: min(values) for name, values in seconds.items()}
    frames_per_second = {name: counts[name][0] / median[name] for name in sides}
    ceiling = frames_per_second["render_loop"]
    return {
        "env": ENV_ID,
        "episodes": episodes,
        "steps": counts["render_loop"][0],
        "frame_size": size,
        "repeats": repeats,
        "seconds_median": median,
        "seconds_all": seconds,
        "frames_per_second": frames_per_second,
        "ratio_to_render_loop": {name: fps / ceiling for name, fps in frames_per_second.items()},
        # On a loaded machine the fastest round is the least disturbed one of each side.
        "ratio_to_render_loop_fastest_rounds": {
            name: best["render_loop"] / best[name] for name in sides
        },
        "stored_bytes_per_frame": {
            name: counts[name][1] / counts[name][0]
            for name in sides
            if name.startswith("collect_frames")
        },
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/collect_frames.json")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    save_results(collect_vs_render(args.episodes, args.size, args.repeats), args.out)


if __name__ == "__main__":
    main()
