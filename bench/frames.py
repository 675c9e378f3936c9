"""Frame codecs against each other on the same frames: bytes per frame, pixel error, encode
and decode speed; and the same frames as video per episode (H.264, AV1 and HEVC through
PyAV, as LeRobot stores cameras).

    python -m bench.frames --out bench/results/frames.json [--frames 2000] [--sizes 64,84]
    python -m bench.frames --codecs webp_lossless --images-only --out ...   # png vs one codec
    python -m bench.frames --codecs png --video-codecs h264,av1,hevc --no-ingest --out ...

1. Render `--frames` Pendulum-v1 frames (episodes of 200 steps, the heuristic policy with
   half its actions random, so the pendulum swings) at each size with
   `engine.frames.render_frame`'s resize: the frames `collect --frames` stores. A noisy
   variant adds Gaussian noise (sigma 8, clipped): a real camera's sensor noise, which
   lossless codecs cannot squeeze out.
2. Image codecs, one frame at a time as the dataset stores them (schemas/frames.py):
   PNG, JPEG q90 and q75, WebP q90, and WebP lossless (`--codec webp-lossless`), each
   through `encode_frames` / `decode_frame` with its camera setting. Bytes per frame against raw uint8 (H x W x 3); for lossy codecs the mean
   absolute pixel error and PSNR; encode and decode frames/s on one core (decode checked as
   the loader decodes, `decode_frame`); decode speed also as a ratio against PNG's.
3. Video, one file per episode (PyAV): H.264 (libx264, yuv420p, CRF 23, the default GOP)
   and AV1 (libsvtav1, CRF 30, GOP 2: LeRobot's default settings); HEVC (libx265) as
   hindsight stores it (CRF 30, GOP 2, schemas/video.py's settings: x265's zerolatency tune,
   one thread). Bytes per frame, pixel
   error (chroma subsampling included), encode frames/s, decode frames/s reading whole
   episodes in order, and decode frames/s of single frames at random positions (seek to
   the keyframe before, decode up to the frame): what a loader drawing random windows pays.

4. Ingest against a bare encode loop: the largest size's clean frames in a D4RL-style HDF5
   file (whole-image observations, episodes of 200 steps), `hindsight ingest`'s path in
   one process (`plan_ingest` + `ingest` with `InProcess`, PNG; the first ingest in the
   process, cold, and a second, warm) against `schemas.frames.encode_frames` of the same
   frames in a loop, back to back.
5. With `--large-frames N` (e.g. 24): memory with 4K frames. A D4RL-style HDF5 file of N
   3840x2160 RGB frames (episodes of 4 steps; written a frame at a time) is ingested in a
   subprocess in one process (`InProcess`, the path of a small job), and its peak RSS
   (VmHWM) is compared with the raw frames' size: parts are cut to about 256 MiB of
   raw frames and read 32 MiB at a time, so memory must not grow with the file.

Speeds are single-process and single-threaded (PyAV's codecs get `thread_count=1`, SVT-AV1
`lp=1`), on the same frames in the same run, the best of 3 runs for image codecs and for
decoding video in order (a shared machine only ever slows a run down); the machine's load
average is recorded at start and end.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from typing import Any

import numpy as np

from bench import save_results

EPISODE_STEPS = 200
NOISE_SIGMA = 8.0
REPEATS = 3  # image encode/decode and video decode in order: the best of 3


# ---------------------------------------------------------------- frames


def render_frames(count: int, sizes: list[int], seed: int = 0) -> dict[int, np.ndarray]:
    """`count` Pendulum-v1 frames at each size (size x size), rendered once and resized."""
    from engine.collect import make_env, pendulum_heuristic
    from engine.frames import resize_frame

    env = make_env("Pendulum-v1", render_mode="rgb_array")
    env.action_space.seed(seed)  # the same frames in every run
    rng = np.random.default_rng(seed)
    frames = {size: np.empty((count, size, size, 3), np.uint8) for size in sizes}
    observation = None
    for i in range(count):
        if i % EPISODE_STEPS == 0:
            observation, _ = env.reset(seed=seed + i)
        full = np.asarray(env.render())[:, :, :3]
        for size in sizes:
            frames[size][i] = resize_frame(full, size, size)
        action = pendulum_heuristic(observation)
        if rng.uniform() < 0.5:
            action = env.action_space.sample()
        observation, *_ = env.step(action)
    env.close()
    return frames


def noisy(frames: np.ndarray, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, NOISE_SIGMA, frames.shape)
    return np.clip(frames + noise, 0, 255).astype(np.uint8)


def pixel_error(decoded: np.ndarray, frames: np.ndarray) -> dict[str, float]:
    difference = decoded.astype(np.float64) - frames.astype(np.float64)
    mse = float(np.mean(difference**2))
    return {
        "mean_abs_error": round(float(np.mean(np.abs(difference))), 3),
        "psnr_db": round(10 * np.log10(255**2 / mse), 2) if mse else float("inf"),
    }


# ---------------------------------------------------------------- image codecs


def best_of(work, repeats: int = REPEATS) -> tuple[float, Any]:
    """The least wall time of `repeats` runs of `work()` (a shared machine only ever
    slows a run down), and its result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = work()
        best = min(best, time.perf_counter() - started)
    return best, result


def image_codecs() -> dict[str, tuple[str, int | None]]:
    """Name -> the camera setting (codec, quality): frames are encoded and decoded exactly
    as a dataset stores them (`schemas.frames.encode_frames` / `decode_frame`)."""
    return {
        "png": ("png", None),
        "jpeg_q90": ("jpeg", 90),
        "jpeg_q75": ("jpeg", 75),
        "webp_q90": ("webp", 90),
        "webp_lossless": ("webp-lossless", None),
    }


def measure_image_codec(frames: np.ndarray, codec: str, quality: int | None) -> dict:
    from schemas.frames import LOSSLESS_CODECS, CameraInfo, decode_frame, encode_frames

    height, width = frames.shape[1:3]
    camera = CameraInfo(height=height, width=width, codec=codec, quality=quality)
    encode_seconds, encoded = best_of(lambda: encode_frames(frames, camera))
    decode_seconds, decoded = best_of(
        lambda: np.stack([decode_frame(data, camera) for data in encoded])
    )
    sizes = np.array([len(data) for data in encoded])
    result = {
        "bytes_per_frame": round(float(sizes.mean()), 1),
        "raw_over_encoded": round(frames[0].nbytes / float(sizes.mean()), 2),
        "encode_frames_per_s": round(len(frames) / encode_seconds),
        "decode_frames_per_s": round(len(frames) / decode_seconds),
    }
    if codec in LOSSLESS_CODECS:
        assert np.array_equal(decoded, frames), f"{codec} is not lossless"
        result["mean_abs_error"] = 0.0
    else:
        result |= pixel_error(decoded, frames)
    return result


# ---------------------------------------------------------------- video


def video_codecs() -> dict[str, dict[str, Any]]:
    from schemas.video import encoder_options

    hevc = encoder_options("hevc", gop=2, crf=30)  # hindsight's own, one thread
    return {
        "h264": {"codec": "libx264", "options": {"crf": "23"}, "gop": None},
        # lp=1: SVT-AV1 on one thread, like every other codec here.
        "av1": {"codec": "libsvtav1", "options": {"crf": "30", "svtav1-params": "lp=1"}, "gop": 2},
        "hevc": {"codec": "libx265", "options": hevc, "gop": 2},
    }


def encode_episode(frames: np.ndarray, codec: str, options: dict, gop: int | None) -> bytes:
    import av

    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=30)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = dict(options)
        if gop:
            stream.codec_context.gop_size = gop
        stream.codec_context.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def decode_episode(data: bytes) -> np.ndarray:
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])


def decode_one(data: bytes, index: int) -> np.ndarray:
    """Frame `index` of an episode's video: seek to the keyframe at or before it, decode
    up to it (what a random window's first frame costs)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        ticks = int(index / (stream.average_rate * stream.time_base))
        container.seek(ticks, stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if frame.pts is not None and frame.pts >= ticks:
                return frame.to_ndarray(format="rgb24")
    raise ValueError(f"frame {index} not found")


def measure_video_codec(frames: np.ndarray, codec: str, options: dict, gop: int | None) -> dict:
    episodes = [frames[i : i + EPISODE_STEPS] for i in range(0, len(frames), EPISODE_STEPS)]
    started = time.perf_counter()
    videos = [encode_episode(episode, codec, options, gop) for episode in episodes]
    encode_seconds = time.perf_counter() - started
    decode_seconds, decoded = best_of(
        lambda: np.concatenate([decode_episode(video) for video in videos])
    )
    if len(decoded) != len(frames):
        raise ValueError(f"{codec}: decoded {len(decoded)} frames of {len(frames)}")
    rng = np.random.default_rng(0)
    picks = [(int(rng.integers(len(videos))), int(rng.integers(EPISODE_STEPS))) for _ in range(50)]
    picks = [(e, min(i, len(episodes[e]) - 1)) for e, i in picks]
    started = time.perf_counter()
    for episode, index in picks:
        one = decode_one(videos[episode], index)
        if not np.array_equal(one, decoded[episode * EPISODE_STEPS + index]):
            raise ValueError(f"{codec}: random access gave another frame than a full decode")
    random_seconds = time.perf_counter() - started
    total = sum(len(video) for video in videos)
    return {
        "bytes_per_frame": round(total / len(frames), 1),
        "raw_over_encoded": round(frames[0].nbytes * len(frames) / total, 2),
        "encode_frames_per_s": round(len(frames) / encode_seconds),
        "decode_frames_per_s_in_order": round(len(frames) / decode_seconds),
        "decode_frames_per_s_random_access": round(len(picks) / random_seconds),
        **pixel_error(decoded, frames),
    }


# ---------------------------------------------------------------- ingest against a bare loop


def ingest_vs_encode(frames: np.ndarray) -> dict[str, Any]:
    import tempfile

    import h5py

    from engine.executor import InProcess
    from engine.ingest import ingest, plan_ingest
    from schemas.frames import CameraInfo, encode_frames

    camera = CameraInfo(height=frames.shape[1], width=frames.shape[2])
    started = time.perf_counter()
    encode_frames(frames, camera)
    bare_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="bench-frames-") as folder:
        source = os.path.join(folder, "frames.h5")
        terminals = np.zeros(len(frames), bool)
        terminals[EPISODE_STEPS - 1 :: EPISODE_STEPS] = True
        terminals[-1] = True
        with h5py.File(source, "w") as handle:
            handle["observations"] = frames
            handle["actions"] = np.zeros((len(frames), 1), np.float32)
            handle["rewards"] = np.zeros(len(frames), np.float32)
            handle["terminals"] = terminals
        seconds = []
        for run in ("cold", "warm"):  # the first in this process pays its lazy imports
            started = time.perf_counter()
            output = os.path.join(folder, run)
            ingest(plan_ingest(source), output, executor=InProcess(), command="bench")
            seconds.append(time.perf_counter() - started)
    return {
        "frames": len(frames),
        "bare_encode_frames_per_s": round(len(frames) / bare_seconds),
        "ingest_frames_per_s_cold": round(len(frames) / seconds[0]),
        "ingest_frames_per_s_warm": round(len(frames) / seconds[1]),
        "ingest_over_bare_cold": round(bare_seconds / seconds[0], 2),
        "ingest_over_bare_warm": round(bare_seconds / seconds[1], 2),
    }


# ---------------------------------------------------------------- memory with 4K frames


def write_large_frames(path: str, count: int, height: int = 2160, width: int = 3840) -> int:
    """A D4RL-style file of `count` smooth 4K frames, written one at a time; its raw bytes."""
    import h5py

    y, x = np.mgrid[0:height, 0:width]
    terminals = np.zeros(count, bool)
    terminals[3::4] = True
    terminals[-1] = True
    with h5py.File(path, "w") as handle:
        frames = handle.create_dataset(
            "observations", (count, height, width, 3), np.uint8, chunks=(1, height, width, 3)
        )
        for i in range(count):
            disc = ((y - height / 2) ** 2 + (x - i * width / count) ** 2 < (height / 5) ** 2) * 150
            frames[i] = np.repeat((disc + x * 60 // width).astype(np.uint8)[..., None], 3, axis=2)
        handle["actions"] = np.zeros((count, 1), np.float32)
        handle["rewards"] = np.zeros(count, np.float32)
        handle["terminals"] = terminals
    return count * height * width * 3


def ingest_peak_rss(source: str, output: str) -> dict[str, Any]:
    """Ingest `source` in this process and report the peak RSS (run in a subprocess)."""
    from engine.executor import InProcess
    from engine.ingest import ingest, plan_ingest

    started = time.perf_counter()
    plan = plan_ingest(source)
    manifest = ingest(plan, output, executor=InProcess(), command="bench.frames")
    frames_group = next(g for g in manifest.groups if g.cameras)
    return {
        "seconds": round(time.perf_counter() - started, 2),
        "parts": len(manifest.parts),
        "peak_rss_mib": round(_peak_rss_kib() / 1024, 1),
        "stored_frame_bytes": sum(f.bytes for f in frames_group.steps_files),
    }


def _peak_rss_kib() -> int:
    """This process's peak RSS: VmHWM, which starts afresh at exec (ru_maxrss keeps the
    parent's peak across fork and exec, which would count the benchmark's own frames)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def large_frames(count: int) -> dict[str, Any]:
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-frames-") as folder:
        source = os.path.join(folder, "frames-4k.h5")
        raw = write_large_frames(source, count)
        code = (
            "import json, sys; from bench.frames import ingest_peak_rss; "
            "print(json.dumps(ingest_peak_rss(sys.argv[1], sys.argv[2])))"
        )
        output = os.path.join(folder, "ds")
        result = subprocess.run(
            [sys.executable, "-c", code, source, output], capture_output=True, text=True
        )
        if result.returncode:
            raise RuntimeError(result.stderr)
        measured = json.loads(result.stdout.strip().splitlines()[-1])
    return {
        "frames": count,
        "frame_shape": [2160, 3840, 3],
        "raw_mib": round(raw / 2**20, 1),
        **measured,
    }


# ---------------------------------------------------------------- the run


def run(
    count: int,
    sizes: list[int],
    large: int = 0,
    codecs: list[str] | None = None,
    video: bool = True,
    ingest: bool = True,
    video_names: list[str] | None = None,
) -> dict[str, Any]:
    codecs = ["png", *(c for c in codecs or image_codecs() if c != "png")]  # png: the baseline
    load_at_start = os.getloadavg()
    started = time.perf_counter()
    rendered = render_frames(count, sizes)
    render_seconds = time.perf_counter() - started
    try:
        import av

        video_available = f"PyAV {av.__version__}"
    except ImportError:
        video_available = None
    variants: dict[str, Any] = {}
    for size in sizes:
        for variant, frames in (("clean", rendered[size]), ("noisy", noisy(rendered[size]))):
            results: dict[str, Any] = {
                "raw_bytes_per_frame": frames[0].nbytes,
                "frames": len(frames),
            }
            for name in codecs:
                results[name] = measure_image_codec(frames, *image_codecs()[name])
            png_decode = results["png"]["decode_frames_per_s"]
            for name in codecs:
                results[name]["decode_speed_over_png"] = round(
                    results[name]["decode_frames_per_s"] / png_decode, 2
                )
            if video_available and video:
                for name, settings in video_codecs().items():
                    if video_names and name not in video_names:
                        continue
                    results[f"video_{name}"] = measure_video_codec(
                        frames, settings["codec"], settings["options"], settings["gop"]
                    )
            variants[f"{size}x{size}_{variant}"] = results
            print(f"{size}x{size} {variant}: done", file=sys.stderr, flush=True)
    return {
        "benchmark": "frames",
        "env": "Pendulum-v1",
        "frames": count,
        "episode_steps": EPISODE_STEPS,
        "noise_sigma": NOISE_SIGMA,
        "render_seconds": round(render_seconds, 2),
        "video": video_available
        or "PyAV is not installed: `pip install hindsight-engine[video]` for the video rows",
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "load_average_at_start": [round(x, 2) for x in load_at_start],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "results": variants,
        "ingest_vs_bare_encode": ingest_vs_encode(rendered[max(sizes)]) if ingest else None,
        "large_frames": large_frames(large) if large else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/frames.json")
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--sizes", default="64,84", help="square frame sizes, comma-separated")
    parser.add_argument(
        "--large-frames", type=int, default=0, help="also ingest this many 4K frames (memory)"
    )
    parser.add_argument(
        "--codecs",
        default=",".join(image_codecs()),
        help="image codecs to measure, comma-separated (png, the baseline, always is)",
    )
    parser.add_argument(
        "--images-only", action="store_true", help="leave out the video and ingest rows"
    )
    parser.add_argument(
        "--video-codecs",
        default=",".join(video_codecs()),
        help="video rows to measure, comma-separated",
    )
    parser.add_argument("--no-ingest", action="store_true", help="leave out the ingest row")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    codecs = args.codecs.split(",")
    unknown = sorted(set(codecs) - set(image_codecs()))
    if unknown:
        parser.error(f"unknown codecs {unknown}; choose from {list(image_codecs())}")
    only_images = args.images_only
    ingest = not (only_images or args.no_ingest)
    results = run(
        args.frames,
        sizes,
        args.large_frames,
        codecs,
        not only_images,
        ingest,
        args.video_codecs.split(","),
    )
    save_results(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
