"""Ingest frames/s of a one-camera LeRobot v3.0 dataset against PyAV's bare decode of the
same MP4 files (the ceiling), in the same run.

    python -m bench.lerobot_ingest --out bench/results/lerobot_ingest.json \
        [--episodes 20] [--steps 100] [--size 96x96] [--episodes-per-file 10]

1. Write a LeRobot v3.0 dataset by hand (tests/lerobot_datasets.py): one camera, smooth
   moving frames, episodes back to back in MP4 files encoded as LeRobot encodes them
   (libsvtav1, yuv420p, GOP 2, CRF 30).
2. Bare decode: PyAV decodes every frame of those files to RGB arrays (the same threading
   as ingest's decoder), nothing else: no ingest can beat it.
3. Decode + encode: the same, then each frame encoded with the ingest codec (PNG by
   default) as ingest stores it: the work ingest cannot avoid.
4. Ingest: `plan_ingest` + `ingest` with `InProcess` (one process, the path of a small
   job): plan (metadata, headers), per part the rows and each episode's video span, the
   frames encoded, every file written through the version writer.

Each is the best of `--repeats` runs (a shared machine only slows a run down); the load
average is recorded at start and end. Ratios are frames/s against the bare decode.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/lerobot_ingest.json")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100, help="Frames per episode.")
    parser.add_argument("--size", default="96x96", help="Frame HEIGHTxWIDTH.")
    parser.add_argument("--episodes-per-file", type=int, default=10)
    parser.add_argument("--codec", default="png", choices=["png", "jpeg", "webp"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", help="Where to write the dataset (a temp dir if unset).")
    args = parser.parse_args(argv)

    from engine.executor import InProcess
    from engine.ingest import ingest, plan_ingest
    from tests import lerobot_datasets as lrd

    height, width = (int(x) for x in args.size.lower().split("x"))
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
    camera = plan_ingest(source, codec=args.codec).cameras["top"]
    encode_s, _ = best_of(args.repeats, lambda: decode_and_encode(videos, camera))

    runs = iter(range(args.repeats))

    def run_ingest() -> int:
        output = str(workdir / f"ds-{next(runs)}")
        plan = plan_ingest(source, codec=args.codec)
        ingest(plan, output, executor=InProcess(), command="bench")
        return plan.steps

    ingest_s, ingested = best_of(args.repeats, run_ingest)
    assert decoded == total and ingested == total, (decoded, ingested, total)

    def rate(seconds: float) -> float:
        return round(total / seconds, 1)

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
            "video_codec": lrd.video_codec(),
            "write_seconds": round(write_seconds, 3),
        },
        "ingest_codec": args.codec,
        "repeats": args.repeats,
        "bare_decode_frames_per_second": rate(decode_s),
        "decode_and_encode_frames_per_second": rate(encode_s),
        "ingest_frames_per_second": rate(ingest_s),
        "ingest_vs_bare_decode": round(decode_s / ingest_s, 3),
        "ingest_vs_decode_and_encode": round(encode_s / ingest_s, 3),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    save_results(results, args.out)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
