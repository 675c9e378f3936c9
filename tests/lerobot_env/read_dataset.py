"""Open a LeRobot dataset with the real LeRobotDataset and print what LeRobot sees, as JSON.

Runs in the LeRobot side environment (make_env.sh), never in hindsight's process:
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $ENV/run read_dataset.py ROOT [--frames-out F.npz]

Checks the metadata against the files (LeRobotDatasetMetadata), then reads every frame through
LeRobot's __getitem__ (camera frames decoded by LeRobot's video backend) with a torch DataLoader
and prints: the first batch's keys, shapes and dtypes; every non-camera feature's values in
index order; per-episode lengths and tasks from the metadata and from the frames; the task
strings; feature names. Camera frames go to F.npz as uint8 (T, H, W, C) per episode.
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
import torch  # noqa: E402
from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: E402


def jsonable(value):
    if isinstance(value, torch.Tensor):
        value = value.numpy()
    if isinstance(value, np.ndarray):
        return value.astype(np.float64).tolist() if value.dtype.kind == "f" else value.tolist()
    return value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--repo-id", default="hindsight/export")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--frames-out", type=Path, help="save decoded camera frames (.npz)")
    args = parser.parse_args()

    start = time.perf_counter()
    dataset = LeRobotDataset(args.repo_id, root=args.root)
    open_s = time.perf_counter() - start
    meta = dataset.meta
    if dataset.num_frames != meta.total_frames or dataset.num_episodes != meta.total_episodes:
        raise SystemExit(
            f"{args.root}: {dataset.num_frames} frames in {dataset.num_episodes} episodes, "
            f"info.json says {meta.total_frames} in {meta.total_episodes}"
        )
    cameras = list(meta.camera_keys)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
    first, columns, frames, tasks_per_frame = None, {}, {c: [] for c in cameras}, []
    start = time.perf_counter()
    for batch in loader:
        if first is None:
            first = {
                key: {"shape": list(value.shape), "dtype": str(value.dtype)}
                if isinstance(value, torch.Tensor)
                else {"type": type(value).__name__, "len": len(value)}
                for key, value in batch.items()
            }
        for key, value in batch.items():
            if key in cameras:
                # LeRobot hands cameras out as float32 (C, H, W) in [0, 1].
                as_uint8 = (value.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
                frames[key].append(as_uint8.numpy())
            elif key == "task":
                tasks_per_frame.extend(value)
            elif isinstance(value, torch.Tensor):
                columns.setdefault(key, []).extend(jsonable(value))
    read_s = time.perf_counter() - start

    episode_index = np.asarray(columns["episode_index"], dtype=np.int64)
    episodes = []
    for row in meta.episodes:
        ep = int(row["episode_index"])
        mask = episode_index == ep
        episodes.append(
            {
                "episode_index": ep,
                "length": int(row["length"]),
                "frames": int(mask.sum()),
                "tasks": list(row["tasks"]),
                "frame_tasks": sorted({tasks_per_frame[i] for i in np.flatnonzero(mask)}),
            }
        )
    if args.frames_out is not None and cameras:
        arrays = {}
        for camera in cameras:
            stacked = np.concatenate(frames[camera])
            for ep in episodes:
                mask = episode_index == ep["episode_index"]
                arrays[f"{camera}/episode_{ep['episode_index']}"] = stacked[mask]
        np.savez_compressed(args.frames_out, **arrays)
    json.dump(
        {
            "root": str(args.root),
            "codebase_version": meta.info["codebase_version"],
            "fps": meta.fps,
            "total_episodes": meta.total_episodes,
            "total_frames": meta.total_frames,
            "features": {
                k: {"dtype": v["dtype"], "shape": list(v["shape"]), "names": v.get("names")}
                for k, v in meta.features.items()
            },
            "camera_keys": cameras,
            "tasks": list(meta.tasks.index),
            "stats_keys": sorted(meta.stats) if meta.stats else [],
            "batch": first,
            "columns": columns,
            "episodes": episodes,
            "timing": {"open_s": open_s, "read_s": read_s},
        },
        sys.stdout,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
