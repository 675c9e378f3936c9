"""Write a small LeRobot v3.0 dataset with LeRobot's own writer; print a JSON summary.

Runs in the LeRobot side environment (make_env.sh), never in hindsight's process:
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $ENV/run write_dataset.py OUT_DIR --frames-out F.npz

With `--data D.npz` (bench/lerobot.py) it writes those arrays instead: `lengths` (steps per
episode), `tasks` (one string per episode), `frames` (N, H, W, 3) uint8 for the camera, and
every other array (N, d) or (N,) as a float32 feature of that name.

Otherwise the data are a pure function of the arguments (seeded), so a test can check an
ingest against the summary: state (4), action (2) and next.reward (1) vectors exactly (float32 values printed
as the doubles they are), camera frames against F.npz (the uint8 frames given to add_frame,
one array per episode, before the codec). `timing` is what bench/lerobot.py compares against.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import side

side.prepare()

import numpy as np  # noqa: E402
from lerobot.datasets.lerobot_dataset import CODEBASE_VERSION, LeRobotDataset  # noqa: E402

TASKS = ("push the block to the left", "open the top drawer")
CAMERA = "observation.images.front"


def episode_data(episode: int, length: int, size: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, episode])
    y, x = np.mgrid[0:size, 0:size]
    t = np.arange(length)[:, None, None]
    # Smooth content (gradients and a moving square) that a video codec keeps within a few
    # levels; every frame differs from the previous one.
    frames = np.empty((length, size, size, 3), dtype=np.uint8)
    frames[..., 0] = (x[None] * 3 + t * 5 + episode * 40) % 256
    frames[..., 1] = (y[None] * 3 + t * 3) % 256
    frames[..., 2] = 80 + episode * 50
    for i in range(length):
        c = (i * 3) % (size - 16)
        frames[i, c : c + 16, c : c + 16] = (250, 250, 250)
    return {
        "observation.state": rng.normal(size=(length, 4)).astype(np.float32),
        "action": rng.uniform(-1, 1, size=(length, 2)).astype(np.float32),
        "next.reward": rng.normal(size=(length, 1)).astype(np.float32),
        CAMERA: frames,
    }


def load_given(path: Path) -> dict:
    """The arrays of `--data`: features from their shapes, a function slicing one episode."""
    with np.load(path) as saved:
        arrays = {key: saved[key] for key in saved.files}
    lengths = [int(n) for n in arrays.pop("lengths")]
    tasks = [str(t) for t in arrays.pop("tasks")]
    frames = arrays.pop("frames")
    values = {key: np.asarray(v, dtype=np.float32).reshape(len(v), -1) for key, v in arrays.items()}
    features = {
        key: {"dtype": "float32", "shape": (v.shape[1],), "names": None}
        for key, v in values.items()
    }
    features[CAMERA] = {
        "dtype": "video",
        "shape": tuple(frames.shape[1:]),
        "names": ["height", "width", "channels"],
    }
    starts = np.concatenate([[0], np.cumsum(lengths)])

    def episode(index: int) -> dict[str, np.ndarray]:
        span = slice(starts[index], starts[index + 1])
        return {**{key: v[span] for key, v in values.items()}, CAMERA: frames[span]}

    return {"lengths": lengths, "tasks": tasks, "features": features, "episode": episode}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path, help="dataset directory to create (must not exist)")
    parser.add_argument("--lengths", default="7,11,5", help="steps per episode")
    parser.add_argument("--size", type=int, default=64, help="camera height and width")
    parser.add_argument("--fps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vcodec", default="libsvtav1", help="LeRobot's default codec")
    parser.add_argument("--frames-out", type=Path, help="save the frames given to add_frame (.npz)")
    parser.add_argument("--repo-id", default="hindsight/lerobot-real")
    parser.add_argument("--data", type=Path, help="write these arrays (.npz, see above)")
    args = parser.parse_args()
    given = load_given(args.data) if args.data is not None else None
    if given is not None:
        lengths, features = given["lengths"], given["features"]
    else:
        lengths = [int(n) for n in args.lengths.split(",")]
        features = {
            "observation.state": {
                "dtype": "float32",
                "shape": (4,),
                "names": ["x", "y", "vx", "vy"],
            },
            "action": {"dtype": "float32", "shape": (2,), "names": ["ax", "ay"]},
            "next.reward": {"dtype": "float32", "shape": (1,), "names": None},
            CAMERA: {
                "dtype": "video",
                "shape": (args.size, args.size, 3),
                "names": ["height", "width", "channels"],
            },
        }
    timing = {"create_s": 0.0, "add_frame_s": 0.0, "save_episode_s": 0.0, "finalize_s": 0.0}
    start = time.perf_counter()
    dataset = LeRobotDataset.create(
        repo_id=args.repo_id,
        fps=args.fps,
        features=features,
        root=args.root,
        robot_type="simulated",
        use_videos=True,
        vcodec=args.vcodec,
    )
    timing["create_s"] = time.perf_counter() - start
    summary_episodes, vectors, frames_out = [], {}, {}
    for episode, length in enumerate(lengths):
        if given is not None:
            data, task = given["episode"](episode), given["tasks"][episode]
        else:
            data = episode_data(episode, length, args.size, args.seed)
            task = TASKS[episode % len(TASKS)]
        start = time.perf_counter()
        for i in range(length):
            dataset.add_frame({**{k: v[i] for k, v in data.items()}, "task": task})
        timing["add_frame_s"] += time.perf_counter() - start
        start = time.perf_counter()
        dataset.save_episode()
        timing["save_episode_s"] += time.perf_counter() - start
        summary_episodes.append({"episode_index": episode, "length": length, "task": task})
        if given is None:
            for key in ("observation.state", "action", "next.reward"):
                vectors.setdefault(key, []).append(data[key].astype(np.float64).tolist())
            frames_out[f"episode_{episode}"] = data[CAMERA]
    start = time.perf_counter()
    dataset.finalize()
    timing["finalize_s"] = time.perf_counter() - start
    timing["total_s"] = sum(timing.values())
    if args.frames_out is not None:
        np.savez_compressed(args.frames_out, **frames_out)
    info = json.loads((args.root / "meta" / "info.json").read_text())
    json.dump(
        {
            "root": str(args.root),
            "repo_id": args.repo_id,
            "codebase_version": CODEBASE_VERSION,
            "info": info,
            "camera": CAMERA,
            "episodes": summary_episodes,
            "tasks": sorted({e["task"] for e in summary_episodes}),
            "vectors": vectors,
            "timing": timing,
            "bytes": sum(p.stat().st_size for p in args.root.rglob("*") if p.is_file()),
        },
        sys.stdout,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
