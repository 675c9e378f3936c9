"""`hindsight export --format lerobot` against LeRobot's own writer, on the same data.

    python -m bench.lerobot --out bench/results/lerobot.json [--episodes 4] [--size 64x64]

One dataset (Pendulum-v1, `--episodes` x 200 steps, frames at `--size` stored as PNG,
relabeled with returns). Its steps (observation, action, reward, return_to_go), decoded frames,
episode lengths and tasks are handed to LeRobot 0.4.4's writer (tests/lerobot_env/
write_dataset.py --data, in the side environment of tests/lerobot_env/make_env.sh:
LeRobotDataset.create, add_frame per step, save_episode per episode, finalize; AV1 by
SVT-AV1, LeRobot's default), and the same version is exported by hindsight in process with
the same codec. Rounds alternate between the two; the median of `--repeats` rounds.

- seconds: LeRobot's from create to finalize as timed inside its process (imports and
  interpreter start excluded, reported apart as `lerobot_process_seconds`); hindsight's
  export_lerobot call (plan, parts, statistics, videos, metadata).
- steps/s of each and their ratio (export / LeRobot writer);
- bytes on disk of each output (and of its data/, videos/, meta/) and of the source version
  (its groups, PNG frames included), and the features each wrote: the export carries every
  numeric column (episode ones too, next.done), the LeRobot side only the four arrays.

Ingest frames/s against PyAV's bare decode is bench/ingest's (lr-ingest), export against
materialize and a bare encode is bench/export.py's: not repeated here. Without the side
environment (pip cannot reach the pinned packages) the LeRobot side is reported as missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import save_results
from bench.export import directory_bytes, make_source, source_bytes
from engine.dataset import open_dataset
from engine.executor import InProcess
from engine.exports.lerobot import export_lerobot
from engine.exports.lerobot_plan import LeRobotOptions
from schemas.frames import decode_frames, frame_column

SIDE = Path(__file__).resolve().parent.parent / "tests" / "lerobot_env"


def dump_arrays(uri: str, path: Path) -> None:
    """The version's data as write_dataset.py --data reads them (frames decoded from PNG)."""
    dataset = open_dataset(uri)
    steps, episodes = dataset.read("steps"), dataset.read("episodes")

    def vectors(name: str) -> np.ndarray:
        array = steps.column(name).combine_chunks()
        flat = array.flatten() if hasattr(array, "flatten") else array
        return flat.to_numpy(zero_copy_only=False).reshape(len(array), -1).astype(np.float32)

    column = frame_column("render")
    frames = decode_frames(
        dataset.read("steps", [column]).column(column).to_pylist(), dataset.cameras["render"]
    )
    env_id = dataset.manifest.metadata.get("env_id") or "Pendulum-v1"
    np.savez(
        path,
        lengths=np.asarray(episodes.column("length").to_pylist()),
        tasks=np.asarray([env_id] * episodes.num_rows),
        frames=frames,
        **{
            "observation.state": vectors("observation"),
            "action": vectors("action"),
            "next.reward": vectors("reward"),
            "return_to_go": vectors("return_to_go"),
        },
    )


def lerobot_env() -> Path | None:
    made = subprocess.run(
        ["bash", str(SIDE / "make_env.sh")],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
    )
    if made.returncode == 3:
        return None
    if made.returncode != 0:
        raise SystemExit(f"tests/lerobot_env/make_env.sh failed:\n{made.stderr[-2000:]}")
    return Path(made.stdout.strip().splitlines()[-1])


def lerobot_write(env: Path, data: Path, output: Path, hf_home: Path) -> tuple[dict, float]:
    started = time.perf_counter()
    done = subprocess.run(
        [str(env / "run"), str(SIDE / "write_dataset.py"), str(output), "--data", str(data)],
        env={**os.environ, "HF_HOME": str(hf_home), "PYTHONPATH": ""},
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"LeRobot's writer failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall


def bytes_by_kind(root: Path) -> dict[str, int]:
    """data/ (frame Parquet), videos/ (MP4), meta/ (info, stats, tasks, episodes)."""
    return {kind: directory_bytes(root / kind) for kind in ("data", "videos", "meta")}


def features(root: Path) -> list[str]:
    return sorted(json.loads((root / "meta" / "info.json").read_text())["features"])


def run(episodes: int, size: str, repeats: int) -> dict:
    env = lerobot_env()
    with tempfile.TemporaryDirectory(prefix="bench-lerobot-") as temporary:
        directory = Path(temporary)
        source = make_source(directory, episodes, size)
        dataset = open_dataset(source)
        steps = dataset.manifest.steps
        data = directory / "data.npz"
        dump_arrays(source, data)
        seconds: dict[str, list[float]] = {"hindsight_export": [], "lerobot_writer": []}
        process_seconds: list[float] = []
        load_before = os.getloadavg()
        for _ in range(repeats):
            export = directory / "export"
            shutil.rmtree(export, ignore_errors=True)
            started = time.perf_counter()
            export_lerobot(dataset, str(export), LeRobotOptions(), executor=InProcess())
            seconds["hindsight_export"].append(time.perf_counter() - started)
            if env is not None:
                written = directory / "lerobot"
                shutil.rmtree(written, ignore_errors=True)
                summary, wall = lerobot_write(env, data, written, directory / "hf")
                seconds["lerobot_writer"].append(summary["timing"]["total_s"])
                process_seconds.append(wall)
        load_after = os.getloadavg()
        sizes = {
            "source_version": source_bytes(source),
            "hindsight_export": directory_bytes(export),
        }
        written_features = {"hindsight_export": features(export)}
        kinds = {"hindsight_export": bytes_by_kind(export)}
        if env is not None:
            sizes["lerobot_writer"] = directory_bytes(written)
            kinds["lerobot_writer"] = bytes_by_kind(written)
            written_features["lerobot_writer"] = features(written)
    median = {name: statistics.median(v) for name, v in seconds.items() if v}
    rate = {name: steps / s for name, s in median.items()}
    results = {
        "env": "Pendulum-v1",
        "episodes": episodes,
        "steps": steps,
        "frame_size": size,
        "video_codec": "libsvtav1",
        "repeats": repeats,
        "lerobot": "lerobot 0.4.4 (tests/lerobot_env/pins.txt)" if env else "missing",
        "seconds_median": median,
        "seconds_all": seconds,
        "lerobot_process_seconds": process_seconds,
        "steps_per_second": rate,
        "bytes": sizes,
        "bytes_by_kind": kinds,
        "features": written_features,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "cpu_count": os.cpu_count(),
    }
    if env is not None:
        results["export_speed_ratio_to_lerobot_writer"] = (
            rate["hindsight_export"] / rate["lerobot_writer"]
        )
        results["export_bytes_ratio_to_lerobot_writer"] = (
            sizes["hindsight_export"] / sizes["lerobot_writer"]
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/lerobot.json")
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    save_results(run(args.episodes, args.size, args.repeats), args.out)


if __name__ == "__main__":
    main()
