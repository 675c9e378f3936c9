"""Ingest of a one-camera LeRobot v3.0 dataset: its video copied (the default) against
decoded and encoded (`--codec png`, `--codec av1`), and against PyAV's bare decode of the
same MP4 files (the ceiling of any decoding ingest), in the same run on the same files.

    python -m bench.lerobot_ingest --out bench/results/lerobot_ingest.json \
        [--episodes 20] [--steps 100] [--size 96x96] [--episodes-per-file 10] [--codecs png,av1]
        [--source-codec hevc]   # the source written as LeRobot's vcodec="hevc" writes it

1. Write a LeRobot v3.0 dataset by hand (tests/lerobot_datasets.py): one camera, smooth
   moving frames, each episode encoded as LeRobot encodes it (libsvtav1, yuv420p, GOP 2,
   CRF 30; `--source-codec hevc`: x265 with its defaults, B-frames included) and joined
   into files by stream copy, as LeRobot joins them.
2. Bare decode: PyAV decodes every frame of those files to RGB arrays (the same threading
   as ingest's decoder), nothing else.
3. Decode + encode: the same, then each frame encoded as PNG: the work a PNG ingest
   cannot avoid.
4. Ingest, `plan_ingest` + `ingest` with `InProcess` (one process, the path of a small
   job): copied (no --codec: each episode's packets copied, then decoded once to check),
   and with each of `--codecs` (every frame decoded and encoded).
5. Export back to LeRobot (the source's codec, `InProcess`) of the copied dataset (its
   episodes' videos joined as they are) and of the `--codec png` one (decoded and encoded).

For each ingest: steps/s, stored bytes per frame (`hindsight info`'s figure) and the pixel
error of what is stored against the source's own pixels (each episode's span decoded by
the decode path): the largest absolute difference and the mean. Each time is the best of
`--repeats` runs (a shared machine only slows a run down); the load average is recorded at
start and end. Ratios: steps/s of the copy against each other path.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import save_results


def bare_decode(files: list[str]) -> int:
    """Every frame of the files decoded to RGB (as engine/video.py decodes them)."""
    import av

    frames = 0
    for path in files:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                frame.to_ndarray(format="rgb24")
                frames += 1
    return frames


def decode_and_encode(files: list[str], camera) -> int:
    """Bare decode, then every frame encoded in the camera's codec."""
    import av

    from schemas.frames import encode_frame

    frames = 0
    for path in files:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                encode_frame(frame.to_ndarray(format="rgb24"), camera)
                frames += 1
    return frames


def best_of(repeats: int, run) -> tuple[float, int]:
    """The shortest wall time of `repeats` runs, and what the run returned."""
    best, result = float("inf"), 0
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result


def source_pixels(root: str):
    """Every episode's frames as the source's span decodes them (the decode path)."""
    import numpy as np

    from engine.sources.lerobot_meta import read_meta
    from engine.video import decode_video_span

    meta = read_meta(root)
    fps = meta.info.fps
    spans = [(e, dict(e.videos)[next(iter(meta.info.video_keys))]) for e in meta.episodes]
    return np.concatenate(
        [
            decode_video_span(meta.uri(s.file), s.start_s, s.start_s + e.length / fps, fps)
            for e, s in spans
        ]
    )


def stored_pixels(output: str):
    """Every frame the dataset stores for camera `top`, in step order."""
    import numpy as np

    from engine.dataset import open_dataset
    from schemas.frames import decode_frames, frame_column
    from schemas.video import decode_video

    dataset = open_dataset(output)
    info, column = dataset.cameras["top"], frame_column("top")
    if not info.is_video:
        return decode_frames(dataset.read("steps", [column]).column(column).to_pylist(), info)
    table = dataset.read("episodes", ["length", column])
    return np.concatenate(
        [
            decode_video(video, info, "bench", length)
            for length, video in zip(
                table.column("length").to_pylist(), table.column(column).to_pylist()
            )
        ]
    )


def export_runs(
    workdir: Path, names: list[str], repeats: int, video_codec: str = "libsvtav1"
) -> dict[str, dict]:
    """`export --format lerobot` (`video_codec`: the source's) of the datasets ingested as
    `names`: the copied one has its episodes' videos joined as they are, the PNG one is
    decoded and encoded."""
    from engine.dataset import open_dataset
    from engine.executor import InProcess
    from engine.exports.lerobot import export_lerobot
    from engine.exports.lerobot_plan import LeRobotOptions

    runs: dict[str, dict] = {}
    for name in names:
        counter = iter(range(repeats))

        def run(name: str = name, counter=counter) -> int:
            output = str(workdir / f"export-{name}-{next(counter)}")
            shutil.rmtree(output, ignore_errors=True)
            dataset = open_dataset(str(workdir / f"ds-{name}-0"))
            options = LeRobotOptions(video_codec=video_codec)
            export_lerobot(dataset, output, options, executor=InProcess())
            return 0

        seconds, _ = best_of(repeats, run)
        runs[name] = {"seconds": seconds, "root": str(workdir / f"export-{name}-0")}
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/lerobot_ingest.json")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100, help="Frames per episode.")
    parser.add_argument("--size", default="96x96", help="Frame HEIGHTxWIDTH.")
    parser.add_argument("--episodes-per-file", type=int, default=10)
    parser.add_argument("--codecs", default="png,av1", help="--codec values to compare.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--source-codec",
        default="libsvtav1",
        choices=["libsvtav1", "h264", "hevc"],
        help="The codec LeRobot writes the source's videos in (its vcodec).",
    )
    parser.add_argument("--workdir", help="Where to write the dataset (a temp dir if unset).")
    args = parser.parse_args(argv)

    import numpy as np

    from engine.dataset import open_dataset
    from engine.executor import InProcess
    from engine.info import cameras_info
    from engine.ingest import ingest, plan_ingest
    from tests import lerobot_datasets as lrd

    height, width = (int(x) for x in args.size.lower().split("x"))
    lrd.video_codec = lambda: args.source_codec  # what the source's writer encodes with
    load_at_start = os.getloadavg()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="hs-bench-lerobot-"))
    source = str(workdir / "lerobot")
    shutil.rmtree(source, ignore_errors=True)
    data = lrd.make_data([args.steps] * args.episodes, camera=(height, width))
    started = time.perf_counter()
    lrd.write_v30(source, data, episodes_per_file=args.episodes_per_file)
    write_seconds = time.perf_counter() - started
    videos = sorted(str(p) for p in Path(source, "videos").rglob("*.mp4"))
    total = args.episodes * args.steps

    decode_s, decoded = best_of(args.repeats, lambda: bare_decode(videos))
    camera = plan_ingest(source, codec="png").cameras["top"]
    encode_s, _ = best_of(args.repeats, lambda: decode_and_encode(videos, camera))
    reference = source_pixels(source)

    def rate(seconds: float) -> float:
        return round(total / seconds, 1)

    ingests: dict[str, dict] = {}
    for codec in [None, *args.codecs.split(",")]:
        name = codec or "copy"

        def run_ingest(
            codec: str | None = codec, name: str = name, runs=iter(range(args.repeats))
        ) -> int:
            output = str(workdir / f"ds-{name}-{next(runs)}")
            shutil.rmtree(output, ignore_errors=True)
            plan = plan_ingest(source, codec=codec)
            ingest(plan, output, executor=InProcess(), command="bench")
            return plan.steps

        seconds, ingested = best_of(args.repeats, run_ingest)
        assert ingested == total, (name, ingested, total)
        output = str(workdir / f"ds-{name}-0")
        dataset = open_dataset(output)
        stored = stored_pixels(output)
        error = np.abs(stored.astype(np.int16) - reference.astype(np.int16))
        origin = dataset.manifest.metadata["frames_from"]["top"]
        ingests[name] = {
            "codec": dataset.cameras["top"].codec,
            "copied_episodes": origin.get("copied_episodes", 0),
            "steps_per_second": rate(seconds),
            "bytes_per_frame": round(cameras_info(dataset)[0]["bytes_per_frame"], 1),
            "max_abs_pixel_error_vs_source": int(error.max()),
            "mean_abs_pixel_error_vs_source": round(float(error.mean()), 4),
        }
    assert decoded == total, (decoded, total)
    copy_rate = ingests["copy"]["steps_per_second"]
    exported_names = [n for n in ("copy", "png") if n in ingests]
    # export's --video-codec names are LeRobot's vcodec names: the source's joins by copy
    exports = export_runs(workdir, exported_names, args.repeats, args.source_codec)
    for run in exports.values():
        run["steps_per_second"] = rate(run.pop("seconds"))
        exported = source_pixels(run.pop("root"))
        error = np.abs(exported.astype(np.int16) - reference.astype(np.int16))
        run["max_abs_pixel_error_vs_source"] = int(error.max())
        run["mean_abs_pixel_error_vs_source"] = round(float(error.mean()), 4)

    results = {
        "benchmark": "lerobot_ingest",
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "load_average_at_start": [round(x, 2) for x in load_at_start],
        "dataset": {
            "codebase_version": "v3.0",
            "episodes": args.episodes,
            "frames": total,
            "frame_size": [height, width, 3],
            "mp4_files": len(videos),
            "mp4_bytes": sum(os.path.getsize(v) for v in videos),
            "mp4_bytes_per_frame": round(sum(os.path.getsize(v) for v in videos) / total, 1),
            "video_codec": lrd.video_codec(),
            "write_seconds": round(write_seconds, 3),
        },
        "repeats": args.repeats,
        "bare_decode_frames_per_second": rate(decode_s),
        "decode_and_png_encode_frames_per_second": rate(encode_s),
        "ingest": ingests,
        "copy_vs": {
            name: round(copy_rate / run["steps_per_second"], 2)
            for name, run in ingests.items()
            if name != "copy"
        },
        "copy_vs_bare_decode": round(copy_rate / rate(decode_s), 3),
        f"export_to_lerobot_{lrd.codec_name()}": exports,
        **(
            {
                "export_joined_vs_encoded": round(
                    exports["copy"]["steps_per_second"] / exports["png"]["steps_per_second"], 2
                )
            }
            if len(exports) == 2
            else {}
        ),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    save_results(results, args.out)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
