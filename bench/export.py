"""Export speed and size: `hindsight export` against baselines measured in the same run.

    python -m bench.export --out bench/results/export.json [--episodes 10] [--size 64x64]

One dataset (Pendulum-v1, `--episodes` x 200 steps, frames at `--size` PNG, relabeled with
returns), exported in process, rounds alternating between the sides; the median of
`--repeats` rounds:

- materialize: hindsight writing the same steps and frames as its own self-contained
  version (the cost of reading the version and writing Parquet, no video);
- bare video encode (the video ceiling): the same frames decoded from PNG and encoded by
  PyAV with the export's settings, nothing else;
- export lerobot (AV1 by SVT-AV1, LeRobot's default) and export lerobot --video-codec h264;
- export minari (no frames: Minari has no camera group).

Reported as steps per second, ratios to materialize and to the bare encode, and the bytes
on disk of each output against the source version's own files (its groups, frames
included), with the machine's load average. LeRobot's own writer as a side is
bench/lerobot.py's (it needs the `lerobot` package).
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
from engine.dataset import open_dataset
from engine.executor import InProcess
from engine.exports.lerobot import export_lerobot
from engine.exports.lerobot_plan import LeRobotOptions
from engine.exports.minari import export_minari
from engine.exports.video import encode_video
from engine.materialize import materialize
from schemas.frames import decode_frame


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def source_bytes(uri: str) -> int:
    """The bytes of every file the version reads (its groups, inherited ones included)."""
    dataset = open_dataset(uri)
    return sum(
        f.bytes
        for group in dataset.manifest.groups
        for level in ("steps_files", "episodes_files")
        for f in getattr(group, level)
    )


def make_source(directory: Path, episodes: int, size: str) -> str:
    from jobs.cli import main

    raw, labeled = str(directory / "raw"), str(directory / "rl")
    collect = ["collect", "Pendulum-v1", raw, "--episodes", str(episodes), "--frames", size,
               "--noise", "0,0.5,1", "--episodes-per-part", str(max(1, episodes // 2))]  # fmt: skip
    if main(collect) or main(["relabel", raw, labeled, "--with", "returns"]):
        raise SystemExit("could not build the benchmark's dataset")
    return labeled


def bare_encode(uri: str, output: Path) -> int:
    """Every frame decoded from PNG and encoded to one AV1 MP4 per part: the ceiling."""
    dataset = open_dataset(uri)
    camera = dataset.cameras["render"]
    frames = 0
    for part in range(dataset.num_parts):
        data = dataset.read_part(part, "steps", ["frame_render"]).column(0).to_pylist()
        _, count = encode_video(
            (decode_frame(d, camera) for d in data), str(output / f"{part}.mp4"), 30
        )
        frames += count
    return frames


def run(episodes: int, size: str, repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-export-") as temporary:
        directory = Path(temporary)
        source = make_source(directory, episodes, size)
        dataset = open_dataset(source)
        steps = dataset.manifest.steps

        def fresh(name: str) -> Path:
            path = directory / name
            shutil.rmtree(path, ignore_errors=True)
            return path

        def bare(name: str) -> None:
            path = fresh(name)
            path.mkdir()
            bare_encode(source, path)

        sides = {
            "materialize": lambda n: materialize(
                dataset, str(fresh(n)), executor=InProcess(), command="bench"
            ),
            "bare_video_encode": bare,
            "export_lerobot_av1": lambda n: export_lerobot(
                dataset, str(fresh(n)), LeRobotOptions(), executor=InProcess()
            ),
            "export_lerobot_h264": lambda n: export_lerobot(
                dataset, str(fresh(n)), LeRobotOptions(video_codec="h264"), executor=InProcess()
            ),
            "export_minari": lambda n: export_minari(dataset, str(fresh(n))),
        }
        seconds: dict[str, list[float]] = {name: [] for name in sides}
        load_before = os.getloadavg()
        for _ in range(repeats):
            for name, side in sides.items():
                started = time.perf_counter()
                side(name)
                seconds[name].append(time.perf_counter() - started)
        sizes = {name: directory_bytes(directory / name) for name in sides}
        source_size = source_bytes(source)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    rate = {name: steps / median[name] for name in sides}
    return {
        "env": "Pendulum-v1",
        "episodes": episodes,
        "steps": steps,
        "frame_size": size,
        "repeats": repeats,
        "seconds_median": median,
        "seconds_all": seconds,
        "steps_per_second": rate,
        "ratio_to_materialize": {name: r / rate["materialize"] for name, r in rate.items()},
        "ratio_to_bare_video_encode": {
            name: r / rate["bare_video_encode"] for name, r in rate.items()
        },
        "bytes": {"source_version": source_size, **sizes},
        "bytes_ratio_to_source": {name: sizes[name] / source_size for name in sides},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/export.json")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    save_results(run(args.episodes, args.size, args.repeats), args.out)


if __name__ == "__main__":
    main()
