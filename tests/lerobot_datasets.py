"""LeRobot datasets written by hand, following the format (schemas/lerobot.py; LeRobot's own
writer is the spec: src/lerobot/datasets/dataset_metadata.py, video_utils.py), with
pyarrow and PyAV only: fast, and with nothing of lerobot installed.

    data = make_data([5, 7, 4], camera=(48, 64))      # the values, known exactly
    root = write_v30(tmp_path / "ds", data)           # or write_v21(...)

v3.0 puts every episode in one data Parquet file and one MP4 per camera (episodes back
to back, as LeRobot concatenates them: each episode encoded on its own, the files joined by
stream copy, so each episode starts on a keyframe; `one_encode=True` encodes the whole file
in one go instead, as a converter might, so an episode may start between keyframes); v2.1
writes one Parquet and one MP4 per episode.
Videos are encoded as LeRobot encodes them (libsvtav1, yuv420p, a keyframe every 2
frames, crf 30) where this PyAV has libsvtav1, else h264, else mpeg4.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CAMERA = "observation.images.top"
IMAGE_CAMERA = "observation.images.wrist"
FPS = 10


@dataclass
class LeRobotData:
    """The values of a dataset, one row per frame, episodes back to back."""

    lengths: list[int]
    state: np.ndarray  # (N, 3) float32
    action: np.ndarray  # (N, 2) float32
    reward: np.ndarray | None  # (N,) float32; None: no `next.reward` feature
    done: np.ndarray | None  # (N,) bool; None: no `next.done` feature
    tasks: list[str]  # the task table, by task_index
    task_index: np.ndarray  # (N,) int64
    video: np.ndarray | None = None  # (N, H, W, 3) uint8 frames of CAMERA
    images: np.ndarray | None = None  # (N, H, W, 3) uint8 frames of IMAGE_CAMERA (PNG)
    environment_state: np.ndarray | None = None  # (N, 4) float32: a second vector
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def episode_index(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.lengths)), self.lengths).astype(np.int64)

    @property
    def frame_index(self) -> np.ndarray:
        starts = np.repeat(np.cumsum([0, *self.lengths[:-1]]), self.lengths)
        return (np.arange(sum(self.lengths)) - starts).astype(np.int64)

    def episode_tasks(self, episode: int) -> list[str]:
        rows = self.task_index[self.episode_index == episode]
        return [self.tasks[i] for i in dict.fromkeys(rows.tolist()) if i < len(self.tasks)]


def scenes(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth moving frames (as a renderer draws them): a video codec keeps them close."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    out = np.empty((count, height, width, 3), np.uint8)
    for i in range(count):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        disc = ((y - cy) ** 2 + (x - cx) ** 2 < (height / 4) ** 2) * 150
        for c in range(3):
            out[i, :, :, c] = (disc + x * 60 / width + y * 30 / height + c * 25).astype(np.uint8)
    return out


def make_data(
    lengths: list[int],
    *,
    seed: int = 0,
    reward: bool = True,
    done: bool = True,
    camera: tuple[int, int] | None = None,
    image_camera: tuple[int, int] | None = None,
    environment_state: bool = False,
    several_tasks: bool = False,
) -> LeRobotData:
    """Random vectors, rewards, tasks (episode e has task e % 2; with `several_tasks` the
    second half of episode 0 has task 2), frames when a camera (height, width) is asked;
    episodes other than the last end with next.done."""
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    ends = np.cumsum(lengths) - 1
    data = LeRobotData(
        lengths=list(lengths),
        state=rng.normal(size=(n, 3)).astype(np.float32),
        action=rng.uniform(-1, 1, size=(n, 2)).astype(np.float32),
        reward=rng.normal(size=n).astype(np.float32) if reward else None,
        done=None,
        tasks=["push the T into place", "pick up the cube", "put the cube down"],
        task_index=np.zeros(n, np.int64),
    )
    data.task_index = (data.episode_index % 2).astype(np.int64)
    if several_tasks:
        data.task_index[lengths[0] // 2 : lengths[0]] = 2
    if done:
        data.done = np.zeros(n, bool)
        data.done[ends[:-1]] = True
    if camera is not None:
        data.video = scenes(n, *camera, seed=seed)
    if image_camera is not None:
        data.images = scenes(n, *image_camera, seed=seed + 1)
    if environment_state:
        data.environment_state = rng.normal(size=(n, 4)).astype(np.float32)
    return data


# ---------------------------------------------------------------- encoding


def video_codec() -> str:
    """The codec LeRobot writes (libsvtav1) if this PyAV can encode it, else h264, mpeg4."""
    import av

    for name in ("libsvtav1", "h264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # not built into this PyAV
            continue
    raise RuntimeError("PyAV has no video encoder")


def codec_name() -> str:
    """The codec `video_codec` writes, as info.json and FFmpeg's decoders name it."""
    return {"libsvtav1": "av1"}.get(video_codec(), video_codec())


def write_video(path: str, frames: np.ndarray, fps: int = FPS, vcodec: str | None = None) -> None:
    """Frames as an MP4 with LeRobot's settings: yuv420p, g=2, crf=30 (libsvtav1, hevc)."""
    import av

    vcodec = vcodec or video_codec()
    options = {"g": "2"}
    if vcodec in ("libsvtav1", "h264", "hevc"):  # hevc: x265 as LeRobot runs it (crf 30)
        options["crf"] = "18" if vcodec == "h264" else "30"
    if vcodec == "hevc":  # x265 logs to stderr by itself (its bitstream is the same)
        options["x265-params"] = "log-level=error"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream(vcodec, fps, options=options)
        stream.pix_fmt = "yuv420p"
        stream.height, stream.width = frames.shape[1:3]
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def concatenate_videos(paths: list[str], path: str) -> None:
    """MP4 files joined by stream copy, as LeRobot's `concatenate_video_files` joins each
    episode's video into a v3.0 file (FFmpeg's concat demuxer, packets remuxed)."""
    import tempfile

    import av

    with tempfile.NamedTemporaryFile("w", suffix=".ffconcat", delete=False) as listing:
        listing.write("ffconcat version 1.0\n")
        listing.writelines(f"file '{os.path.abspath(p)}'\n" for p in paths)
    try:
        with av.open(listing.name, "r", format="concat", options={"safe": "0"}) as source:
            with av.open(path, "w", options={"movflags": "faststart"}) as out:
                stream = source.streams.video[0]
                copy = out.add_stream_from_template(template=stream, opaque=True)
                copy.time_base = stream.time_base
                for packet in source.demux(stream):
                    if packet.dts is None:
                        continue
                    packet.stream = copy
                    out.mux(packet)
    finally:
        os.remove(listing.name)


def write_episode_videos(
    path: str, frames: np.ndarray, lengths: list[int], fps: int = FPS, one_encode: bool = False
) -> None:
    """One MP4 holding episodes back to back: each encoded on its own and joined by stream
    copy (LeRobot v3.0), or, `one_encode`, all encoded in one go."""
    if one_encode or len(lengths) == 1:
        write_video(path, frames, fps)
        return
    starts = np.cumsum([0, *lengths[:-1]])
    parts = [f"{path}.episode{i}.mp4" for i in range(len(lengths))]
    for part, start, length in zip(parts, starts, lengths, strict=True):
        write_video(part, frames[start : start + length], fps)
    concatenate_videos(parts, path)
    for part in parts:
        os.remove(part)


def png(frame: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="PNG")
    return out.getvalue()


# ---------------------------------------------------------------- the files


def features(data: LeRobotData, height_width: dict[str, tuple[int, int]] | None = None) -> dict:
    """info.json's `features` of the data, as LeRobot writes them."""
    out: dict = {
        "observation.state": {"dtype": "float32", "shape": [3], "names": ["x", "y", "z"]},
        "action": {"dtype": "float32", "shape": [2], "names": ["vx", "vy"]},
    }
    if data.environment_state is not None:
        out["observation.environment_state"] = {"dtype": "float32", "shape": [4], "names": None}
    if data.reward is not None:
        out["next.reward"] = {"dtype": "float32", "shape": [1], "names": None}
    if data.done is not None:
        out["next.done"] = {"dtype": "bool", "shape": [1], "names": None}
    for name, values in data.extra.items():
        out[name] = {"dtype": str(values.dtype), "shape": [1], "names": None}
    for key, frames, dtype in ((CAMERA, data.video, "video"), (IMAGE_CAMERA, data.images, "image")):
        if frames is None:
            continue
        height, width = frames.shape[1:3]
        out[key] = {
            "dtype": dtype,
            "shape": [height, width, 3],
            "names": ["height", "width", "channels"],
        }
        if dtype == "video":
            out[key]["info"] = {
                "video.height": height,
                "video.width": width,
                "video.codec": codec_name(),
                "video.pix_fmt": "yuv420p",
                "video.is_depth_map": False,
                "video.fps": FPS,
                "video.channels": 3,
                "has_audio": False,
            }
    for name, dtype in (
        ("timestamp", "float32"),
        ("frame_index", "int64"),
        ("episode_index", "int64"),
        ("index", "int64"),
        ("task_index", "int64"),
    ):
        out[name] = {"dtype": dtype, "shape": [1], "names": None}
    return out


def frame_table(data: LeRobotData, rows: slice | np.ndarray, fps: int = FPS) -> pa.Table:
    """The data Parquet's rows, typed as Hugging Face datasets stores them (vectors as
    lists, scalars as values, images as {bytes, path} structs)."""
    index = np.arange(sum(data.lengths))[rows]
    columns = {
        "observation.state": pa.array(list(data.state[rows]), pa.list_(pa.float32())),
        "action": pa.array(list(data.action[rows]), pa.list_(pa.float32())),
    }
    if data.environment_state is not None:
        columns["observation.environment_state"] = pa.array(
            list(data.environment_state[rows]), pa.list_(pa.float32())
        )
    if data.reward is not None:
        columns["next.reward"] = pa.array(data.reward[rows], pa.float32())
    if data.done is not None:
        columns["next.done"] = pa.array(data.done[rows], pa.bool_())
    for name, values in data.extra.items():
        columns[name] = pa.array(values[rows])
    if data.images is not None:
        columns[IMAGE_CAMERA] = pa.array(
            [{"bytes": png(frame), "path": None} for frame in data.images[rows]],
            pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        )
    columns |= {
        "timestamp": pa.array(data.frame_index[rows] / fps, pa.float32()),
        "frame_index": pa.array(data.frame_index[rows], pa.int64()),
        "episode_index": pa.array(data.episode_index[rows], pa.int64()),
        "index": pa.array(index, pa.int64()),
        "task_index": pa.array(data.task_index[rows], pa.int64()),
    }
    return pa.table(columns)


def _write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(value, handle, indent=4)


def _stats(data: LeRobotData) -> dict:
    def of(values: np.ndarray) -> dict:
        values = values.reshape(len(values), -1).astype(np.float64)
        return {
            "mean": values.mean(0).tolist(),
            "std": values.std(0).tolist(),
            "min": values.min(0).tolist(),
            "max": values.max(0).tolist(),
            "count": [len(values)],
        }

    return {"observation.state": of(data.state), "action": of(data.action)}


def write_v30(
    root,
    data: LeRobotData,
    *,
    fps: int = FPS,
    episodes_per_file: int = 0,
    one_encode: bool = False,
) -> str:
    """A v3.0 dataset: episodes back to back in data/chunk-000/file-NNN.parquet and one
    MP4 per camera and file (`episodes_per_file` episodes in each; 0: all in one; each
    episode encoded on its own and joined, or `one_encode`: the file in one go), with the
    episodes metadata (one file per data file), tasks and stats."""
    root = str(root)
    n, count = sum(data.lengths), len(data.lengths)
    per_file = episodes_per_file or count
    starts = np.cumsum([0, *data.lengths[:-1]])
    info = {
        "codebase_version": "v3.0",
        "robot_type": "so100",
        "total_episodes": count,
        "total_frames": n,
        "total_tasks": len(data.tasks),
        "chunks_size": 1000,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 200,
        "fps": fps,
        "splits": {"train": f"0:{count}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": (
            "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
            if data.video is not None
            else None
        ),
        "features": features(data),
    }
    _write_json(os.path.join(root, "meta/info.json"), info)
    _write_json(os.path.join(root, "meta/stats.json"), _stats(data))
    tasks = pa.table(
        {"task_index": pa.array(range(len(data.tasks)), pa.int64()), "task": data.tasks}
    )
    os.makedirs(os.path.join(root, "meta/episodes/chunk-000"))
    pq.write_table(tasks, os.path.join(root, "meta/tasks.parquet"))
    os.makedirs(os.path.join(root, "data/chunk-000"))
    for file_index, first in enumerate(range(0, count, per_file)):
        episodes_here = list(range(first, min(count, first + per_file)))
        begin = int(starts[first])
        end = int(starts[episodes_here[-1]] + data.lengths[episodes_here[-1]])
        name = f"chunk-000/file-{file_index:03d}"
        pq.write_table(
            frame_table(data, slice(begin, end)), os.path.join(root, f"data/{name}.parquet")
        )
        here_starts = starts[episodes_here]
        here_lengths = np.asarray([data.lengths[e] for e in episodes_here])
        episodes: dict[str, list] = {
            "episode_index": episodes_here,
            "tasks": [data.episode_tasks(e) for e in episodes_here],
            "length": here_lengths.tolist(),
            "data/chunk_index": [0] * len(episodes_here),
            "data/file_index": [file_index] * len(episodes_here),
            "dataset_from_index": here_starts.tolist(),
            "dataset_to_index": (here_starts + here_lengths).tolist(),
        }
        if data.video is not None:
            key = CAMERA
            video = os.path.join(root, f"videos/{key}/{name}.mp4")
            write_episode_videos(
                video, data.video[begin:end], here_lengths.tolist(), fps, one_encode
            )
            in_file = here_starts - begin  # the episode's first frame in its video file
            episodes |= {
                f"videos/{key}/chunk_index": [0] * len(episodes_here),
                f"videos/{key}/file_index": [file_index] * len(episodes_here),
                f"videos/{key}/from_timestamp": (in_file / fps).tolist(),
                f"videos/{key}/to_timestamp": ((in_file + here_lengths) / fps).tolist(),
            }
        episodes |= {
            "meta/episodes/chunk_index": [0] * len(episodes_here),
            "meta/episodes/file_index": [file_index] * len(episodes_here),
            "stats/action/mean": [
                data.action[s : s + length].mean(0).tolist()
                for s, length in zip(here_starts, here_lengths, strict=True)
            ],
        }
        pq.write_table(pa.table(episodes), os.path.join(root, f"meta/episodes/{name}.parquet"))
    return root


def write_v21(root, data: LeRobotData, *, fps: int = FPS) -> str:
    """A v2.1 dataset: one data Parquet and one MP4 per episode, JSON Lines metadata."""
    root = str(root)
    starts = np.cumsum([0, *data.lengths[:-1]])
    info = {
        "codebase_version": "v2.1",
        "robot_type": "koch",
        "total_episodes": len(data.lengths),
        "total_frames": sum(data.lengths),
        "total_tasks": len(data.tasks),
        "total_videos": len(data.lengths) if data.video is not None else 0,
        "total_chunks": 1,
        "chunks_size": 1000,
        "fps": fps,
        "splits": {"train": f"0:{len(data.lengths)}"},
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": (
            "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
            if data.video is not None
            else None
        ),
        "features": features(data),
    }
    _write_json(os.path.join(root, "meta/info.json"), info)
    _write_json(os.path.join(root, "meta/stats.json"), _stats(data))
    os.makedirs(os.path.join(root, "data/chunk-000"))
    lines = {"episodes": [], "tasks": [], "episodes_stats": []}
    for episode, (start, length) in enumerate(zip(starts, data.lengths, strict=True)):
        rows = slice(int(start), int(start + length))
        path = os.path.join(root, f"data/chunk-000/episode_{episode:06d}.parquet")
        pq.write_table(frame_table(data, rows), path)
        if data.video is not None:
            video = os.path.join(root, f"videos/chunk-000/{CAMERA}/episode_{episode:06d}.mp4")
            write_video(video, data.video[rows], fps)
        lines["episodes"].append(
            {"episode_index": episode, "tasks": data.episode_tasks(episode), "length": length}
        )
        lines["episodes_stats"].append({"episode_index": episode, "stats": {}})
    lines["tasks"] = [{"task_index": i, "task": task} for i, task in enumerate(data.tasks)]
    for name, rows in lines.items():
        with open(os.path.join(root, f"meta/{name}.jsonl"), "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    return root


def upload(local_root: str, uri: str) -> str:
    """Copy a dataset directory to an S3 prefix (through engine.storage)."""
    from engine import storage

    for directory, _, names in os.walk(local_root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                storage.write_bytes(
                    storage.join(uri, os.path.relpath(path, local_root)), handle.read()
                )
    return uri


def damage_video(path: str) -> None:
    """Overwrite the second quarter of an MP4's frame data (its `mdat` box) with noise:
    the header (frame count, rate) still reads, decoding the frames fails."""
    data = bytearray(open(path, "rb").read())
    payload = data.find(b"mdat") + 4
    size = int.from_bytes(data[payload - 8 : payload - 4], "big") - 8
    start, stop = payload + size // 4, payload + size // 2
    data[start:stop] = np.random.default_rng(0).integers(0, 256, stop - start, np.uint8).tobytes()
    with open(path, "wb") as handle:
        handle.write(data)


def set_timestamps(path: str, rows: dict[int, float]) -> None:
    """Rewrite some rows' `timestamp` in a data Parquet file (row -> seconds)."""
    table = pq.read_table(path)
    stamps = table.column("timestamp").to_numpy().copy()
    for row, value in rows.items():
        stamps[row] = value
    column = table.schema.get_field_index("timestamp")
    pq.write_table(table.set_column(column, "timestamp", pa.array(stamps, pa.float32())), path)


def set_task_index(path: str, rows: dict[int, int]) -> None:
    """Rewrite some rows' `task_index` in a data Parquet file (row -> task index)."""
    table = pq.read_table(path)
    index = table.column("task_index").to_numpy().copy()
    for row, value in rows.items():
        index[row] = value
    column = table.schema.get_field_index("task_index")
    pq.write_table(table.set_column(column, "task_index", pa.array(index, pa.int64())), path)
