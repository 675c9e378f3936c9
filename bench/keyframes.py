"""What `language:keyframes=K` reads of a part with big frames: only its keyframes' Parquet
row groups, against the whole frame column it read before.

    python -m bench.keyframes --out bench/results/keyframes.json [--steps 1000] [--size 192]

One part of `--steps` steps (episodes of 200) of noisy `--size`x`--size` PNG frames (sigma 8
Gaussian noise on smooth scenes: a real camera, ~80 KB per frame at 192 px), written as
the writer writes frames (row groups of ~1 MiB, `engine.writer.FRAME_ROW_GROUP_BYTES`) and,
for comparison, as it wrote them before (4096-row groups, `ROW_GROUP_ROWS`). Per layout:
the bytes read (column chunks and footer, `ReadStats`) and wall/CPU seconds (best of 3)
of (a) the whole frame column, what the job read for a relabeler declaring frames, and
(b) the keyframes' rows only (`read_part_rows` of `keyframe_rows`: what it reads now).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa

from bench import best_of, save_results

EPISODE_STEPS = 200


def noisy_frames(count: int, size: int, seed: int = 0) -> list[bytes]:
    from schemas.frames import CameraInfo, encode_frames

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    camera = CameraInfo(height=size, width=size)
    out: list[bytes] = []
    for start in range(0, count, 100):  # 100 raw frames at a time in memory
        n = min(100, count - start)
        scene = (x * 200 // size + y * 40 // size)[None, :, :, None] + np.arange(n)[
            :, None, None, None
        ]
        frames = np.clip(scene + rng.normal(0, 8, (n, size, size, 3)), 0, 255).astype(np.uint8)
        out += encode_frames(frames, camera)
    return out


def run(steps: int, size: int, k: int) -> dict[str, Any]:
    import engine.writer
    from engine.query.read import ReadStats, read_rows_arrow
    from relabelers.language.facts import units_of
    from relabelers.language.keyframes import keyframe_rows
    from schemas import steps as cols

    load = os.getloadavg()
    episode_id = np.repeat(np.arange(steps // EPISODE_STEPS), EPISODE_STEPS)
    table = pa.table({"frame_render": pa.array(noisy_frames(len(episode_id), size), pa.binary())})
    keys = pa.table(
        {
            cols.EPISODE_ID: episode_id,
            cols.T: np.tile(np.arange(EPISODE_STEPS), steps // EPISODE_STEPS),
            cols.REWARD: np.zeros(len(episode_id), np.float32),
        }
    )
    rows = np.sort(keyframe_rows(units_of(keys, "episode", 0), k))
    layouts = {
        "frame_row_groups": engine.writer.row_group_rows(table, "steps"),
        "4096_row_groups": engine.writer.ROW_GROUP_ROWS["steps"],
    }
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-keyframes-") as folder:
        for name, group_rows in layouts.items():
            path = os.path.join(folder, f"{name}.parquet")
            engine.writer.write_parquet(path, table, group_rows)
            whole, chosen = ReadStats(), ReadStats()
            read_rows_arrow(path, ["frame_render"], None, whole)
            read_rows_arrow(path, ["frame_render"], rows, chosen)
            times = best_of(
                3,
                {
                    "whole_column": lambda p=path: read_rows_arrow(
                        p, ["frame_render"], None, ReadStats()
                    ),
                    "keyframes_only": lambda p=path: read_rows_arrow(
                        p, ["frame_render"], rows, ReadStats()
                    ),
                },
            )
            results[name] = {
                "rows_per_row_group": group_rows,
                "file_bytes": os.path.getsize(path),
                "whole_column": {"bytes_read": whole.bytes, "row_groups": whole.row_groups},
                "keyframes_only": {"bytes_read": chosen.bytes, "row_groups": chosen.row_groups},
                "seconds": times,
                "bytes_ratio_whole_over_keyframes": round(whole.bytes / chosen.bytes, 1),
                "time_ratio_whole_over_keyframes": round(
                    times["whole_column"] / times["keyframes_only"], 1
                ),
            }
    return {
        "benchmark": "keyframes",
        "steps": steps,
        "episode_steps": EPISODE_STEPS,
        "frame": f"{size}x{size}x3 png, noisy",
        "bytes_per_frame": round(table.column("frame_render").nbytes / steps),
        "keyframes_per_episode": k,
        "keyframes": len(rows),
        "machine": {"cpus": os.cpu_count()},
        "load_average_at_start": [round(x, 2) for x in load],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "layouts": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/keyframes.json")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--keyframes", type=int, default=4)
    args = parser.parse_args(argv)
    save_results(run(args.steps, args.size, args.keyframes), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
