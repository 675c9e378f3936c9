"""Export to a LeRobotDataset v3.0 directory, following LeRobot's own writer
(lerobot/datasets/dataset_writer.py, dataset_metadata.py, utils.py):

    meta/info.json                                  the commit file, written last
    meta/stats.json                                 feature stats (lerobot_stats.py)
    meta/tasks.parquet                              task (index) -> task_index
    meta/episodes/chunk-000/file-000.parquet        one row per episode
    data/chunk-CCC/file-FFF.parquet                 one file per part of the source
    videos/observation.images.<camera>/chunk-CCC/file-FFF.mp4   that part's frames

Part p of the source becomes file p (chunk p // 1000, file p % 1000), its data Parquet and
its videos (the frames of its episodes one after another), written by one task of the
executor; the driver then writes the episodes table, tasks, stats and info.json.

Frame columns: `observation.state` (the observation vector; a struct observation gives
`observation.<field>` per field), `action`, `next.reward` (absent when the dataset has no
rewards), `next.done` (terminated or truncated), `next.truncated` (truncated: ours, so
a re-ingest tells the two apart), `timestamp` (frame_index / fps),
`frame_index`, `episode_index`, `index`, `task_index`, then every other numeric step
column (relabels: `return_to_go`, goals...) and every numeric episode column repeated on
its steps (`skill` codes, `episode_return`...), as float32 features (NaN where null).
Text columns are not features: `--task-column` makes one of them the task. The last
`next_observation` of an episode has no place in the format and is not exported.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine import storage
from engine.dataset import Dataset, open_dataset
from engine.executor import Executor
from engine.exports import (
    ExportError,
    ExportResult,
    broadcast_episodes,
    column_values,
    divide_columns,
    episode_lengths,
    flags,
)
from engine.exports import lerobot_stats as stats
from engine.exports.lerobot_plan import (
    COMMIT_FILE,
    EPISODES_PATH,
    Feature,
    LeRobotOptions,
    Plan,
    chunk_and_file,
    part_tasks,
    plan_export,
    video_key,
)
from engine.exports.video import CODECS, VideoSettings, camera_summary, encode_video
from engine.video import NotCopied, join_videos
from engine.writer import VersionWriter
from schemas import steps as cols
from schemas.frames import DEFAULT_GOP, FRAME_PREFIX, decode_frame
from schemas.lerobot import (
    DATA_PATH_V30,
    DEFAULT_FEATURES,
    STATS_PATH,
    TASKS_PATH_V30,
    VIDEO_PATH_V30,
    LeRobotInfo,
)
from schemas.video import PIX_FMT, video_frames


@dataclass(frozen=True)
class PartTask:
    index: int
    plan: Plan
    writer: VersionWriter


@dataclass
class PartResult:
    """What one part wrote: its episodes' rows of the episodes table, their stats."""

    index: int
    steps: int
    episodes: list[dict] = field(default_factory=list)
    episode_stats: list[dict[str, stats.Stats]] = field(default_factory=list)
    videos: dict[str, dict] = field(default_factory=dict)  # camera -> video info
    # camera -> None where its episodes' videos were joined by stream copy, else why not
    encoded: dict[str, str | None] = field(default_factory=dict)
    bytes: int = 0
    files: int = 0


# ---------------------------------------------------------------- one part


def export_part(task: PartTask) -> PartResult:
    """Write part `task.index`: its data file and its videos; return its episodes' rows."""
    plan = task.plan
    dataset = open_dataset(plan.dataset_uri)
    steps = dataset.read_part(task.index, "steps", dataset.columns("steps", frames=False))
    episodes = dataset.read_part(task.index, "episodes")
    step_ids = cols.arrow_to_numpy(steps.column(cols.EPISODE_ID))
    episode_ids = cols.arrow_to_numpy(episodes.column(cols.EPISODE_ID))
    lengths = episode_lengths(step_ids, episode_ids)
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    frame_index = np.arange(len(step_ids), dtype=np.int64) - np.repeat(starts[:-1], lengths)
    first_episode = plan.episode_offsets[task.index]
    first_step = plan.step_offsets[task.index]
    tasks = part_tasks(dataset, task.index, plan.task_column, plan.task_level, plan.default_task)
    arrays: dict[str, np.ndarray | pa.Array] = {}
    for feature in plan.features:
        arrays[feature.key] = feature_values(feature, steps, episodes, lengths)
    arrays["timestamp"] = (frame_index / plan.fps).astype(np.float32)
    arrays["frame_index"] = frame_index
    arrays["episode_index"] = np.repeat(
        np.arange(len(lengths), dtype=np.int64) + first_episode, lengths
    )
    arrays["index"] = np.arange(len(step_ids), dtype=np.int64) + first_step
    known = pa.array(sorted(plan.task_index, key=plan.task_index.__getitem__), pa.string())
    arrays["task_index"] = pc.index_in(tasks, value_set=known).to_numpy().astype(np.int64)
    table = data_table(plan, arrays)
    chunk, file = chunk_and_file(task.index)
    result = PartResult(index=task.index, steps=len(step_ids))
    relative = DATA_PATH_V30.format(chunk_index=chunk, file_index=file)
    size, _ = storage.write_stream(
        storage.join(task.writer.uri, relative),
        lambda sink: pq.write_table(table, sink, compression="snappy"),
        task.writer.check_fence,
    )
    result.bytes += size
    result.files += 1
    per_feature = {
        key: stats.episode_stats(
            values if isinstance(values, np.ndarray) else column_values(values), starts
        )
        for key, values in arrays.items()
    }
    video_stats = {}
    for camera in plan.cameras:
        info, histograms, size, result.encoded[camera] = write_video(task, dataset, camera, starts)
        result.videos[camera] = info
        result.bytes += size
        result.files += 1
        video_stats[video_key(camera)] = histograms
    for k, length in enumerate(lengths):
        row = {
            "episode_index": first_episode + k,
            "tasks": pc.unique(tasks.slice(starts[k], length)).to_pylist(),
            "length": int(length),
            "data/chunk_index": chunk,
            "data/file_index": file,
            "dataset_from_index": first_step + int(starts[k]),
            "dataset_to_index": first_step + int(starts[k + 1]),
        }
        for camera in plan.cameras:
            key = video_key(camera)
            row[f"videos/{key}/chunk_index"] = chunk
            row[f"videos/{key}/file_index"] = file
            row[f"videos/{key}/from_timestamp"] = float(starts[k] / plan.fps)
            row[f"videos/{key}/to_timestamp"] = float(starts[k + 1] / plan.fps)
        result.episodes.append(row)
        episode = {key: values[k] for key, values in per_feature.items()}
        for key, histograms in video_stats.items():
            episode[key] = stats.image_stats(histograms[k], int(length))
        result.episode_stats.append(episode)
    return result


def feature_values(
    feature: Feature, steps: pa.Table, episodes: pa.Table, lengths: np.ndarray
) -> np.ndarray | pa.Array:
    if feature.key in ("next.done", "next.truncated"):
        terminated, truncated = flags(steps, cols.TERMINATED), flags(steps, cols.TRUNCATED)
        if steps.column(cols.TERMINATED).null_count or steps.column(cols.TRUNCATED).null_count:
            # Ends unrecorded: an episode ends at its end, by the data running out.
            truncated[np.cumsum(lengths) - 1] = ~terminated[np.cumsum(lengths) - 1]
        return truncated if feature.key == "next.truncated" else terminated | truncated
    if feature.source.startswith("episodes."):
        values = column_values(episodes.column(feature.source.removeprefix("episodes.")))
        return broadcast_episodes(values.astype(np.float32), lengths)
    values = column_values(cols.column_by_path(steps, feature.source))
    return values.astype(np.dtype(feature.dtype), copy=False)


def data_table(plan: Plan, arrays: dict[str, np.ndarray]) -> pa.Table:
    """The data file's table: vectors as fixed-size lists, scalars as plain columns (what
    LeRobot's HF features make of shape (n,) and (1,))."""
    columns = {}
    for key, values in arrays.items():
        values = np.asarray(values)
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]  # LeRobot stores shape (1,) features as scalars
        if values.ndim == 2:
            columns[key] = cols.vectors_to_arrow(values, pa.from_numpy_dtype(values.dtype))
        else:
            columns[key] = pa.array(values)
    return pa.table(columns)


def write_video(
    task: PartTask, dataset: Dataset, camera: str, starts: np.ndarray
) -> tuple[dict, np.ndarray, int, str | None]:
    """The part's frames of one camera as one MP4 (episodes one after another), its
    info.json entry, each episode's (3, 256) pixel counts, the file's size and why its
    frames were encoded (None: its episodes' videos joined by stream copy)."""
    episodes = len(starts) - 1
    histograms = np.zeros((episodes, 3, 256), dtype=np.int64)
    episode_of_step = np.repeat(np.arange(episodes), np.diff(starts))

    def frames() -> Iterator[np.ndarray]:
        for step, frame in enumerate(part_frames(dataset, task.index, camera)):
            yield count_pixels(histograms[episode_of_step[step]], frame)

    chunk, file = chunk_and_file(task.index)
    relative = VIDEO_PATH_V30.format(
        video_key=video_key(camera), chunk_index=chunk, file_index=file
    )
    # The MP4 muxer seeks back to finish the file: encode to a local temporary file, then
    # copy it into the output (local or S3) atomically and fenced like every other file.
    scratch = tempfile.mkdtemp(prefix="hindsight-video-")
    try:
        local = os.path.join(scratch, "video.mp4")
        settings, why = join_part_videos(task, dataset, camera, local, histograms)
        if settings is None:
            settings, count = encode_video(frames(), local, task.plan.fps, task.plan.video_codec)
            if count != int(starts[-1]):
                raise ExportError(f"part {task.index} camera {camera}: {count} frames encoded")

        def copy(sink) -> None:
            with open(local, "rb") as source:
                shutil.copyfileobj(source, sink, 1 << 20)

        size, _ = storage.write_stream(
            storage.join(task.writer.uri, relative), copy, task.writer.check_fence
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return video_info(settings), histograms, size, why


def count_pixels(counts: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """Add a frame's pixel values to its episode's (3, 256) counts (LeRobot's image
    stats); the frame as RGB (grey repeated)."""
    if frame.shape[2] == 1:
        frame = np.repeat(frame, 3, axis=2)
    for channel in range(3):
        counts[channel] += np.bincount(frame[:, :, channel].ravel(), minlength=256)
    return frame


def join_part_videos(
    task: PartTask, dataset: Dataset, camera: str, path: str, histograms: np.ndarray
) -> tuple[VideoSettings | None, str | None]:
    """A video camera already in the export's codec, fps and pixel format (a LeRobot
    camera copied at ingest, a collected AV1 camera): the part's episode videos joined
    as they are into the MP4 at `path` (engine/video.py `join_videos`: no second lossy
    pass), each decoded a frame at a time for the image stats (`histograms`). (None, why)
    where it is not, or its videos cannot share one stream (an episode encoded with other
    parameters): the caller encodes the part's frames, and the export says why."""
    info, column = dataset.cameras[camera], FRAME_PREFIX + camera
    plan = task.plan
    wanted = CODECS[plan.video_codec]
    if not info.is_video:
        return None, f"its frames are {info.codec} images"
    if (info.codec, info.fps) != (wanted, plan.fps):
        return None, f"stored as {info.codec} at {info.fps} fps, exported as {wanted} at {plan.fps}"
    if (info.pix_fmt or PIX_FMT) != PIX_FMT:
        return None, f"stored as {info.pix_fmt}, exported as {PIX_FMT}"
    uri = dataset.file_uris(dataset.group_of(column, "episodes"), "episodes")[task.index]
    table = dataset.read_part(task.index, "episodes", [cols.EPISODE_ID, cols.LENGTH, column])
    ids, lengths, videos = (c.to_pylist() for c in table.columns)
    if any(video is None for video in videos):
        return None, "an episode has no video"
    try:
        join_videos(videos, lengths, path, plan.fps)
    except NotCopied as error:
        if error.index is None:
            return None, str(error)
        origin = dataset.manifest.metadata.get("frames_from", {}).get(camera, {})
        again = {entry["episode"] for entry in origin.get("reencoded", [])}
        ingested = [i for i in (ids[error.index], ids[0]) if i in again]
        return None, (
            f"episode {ids[error.index]}'s video was encoded with other parameters than "
            f"episode {ids[0]}'s"
            + (f" (episode {ingested[0]} re-encoded at ingest)" if ingested else "")
        )
    for k, (episode_id, length, video) in enumerate(zip(ids, lengths, videos)):
        where = f"{uri}: episode {episode_id} camera {camera!r}"
        for frame in video_frames(video, info, where, length):  # one frame at a time
            count_pixels(histograms[k], frame)
    return VideoSettings(
        codec=info.codec,
        height=info.height,
        width=info.width,
        fps=plan.fps,
        pix_fmt=info.pix_fmt or PIX_FMT,
        g=info.gop or DEFAULT_GOP,
        crf=info.crf,
    ), None


def part_frames(dataset: Dataset, index: int, camera: str) -> Iterator[np.ndarray]:
    """Part `index`'s frames of one camera, one per step in the part's order, decoded one
    at a time (an image camera) or one episode's video at a time (a video camera)."""
    info, column = dataset.cameras[camera], FRAME_PREFIX + camera
    if not info.is_video:
        data = dataset.read_part(index, "steps", [column]).column(0)
        for step, image in enumerate(data.to_pylist()):
            where = f"{dataset.uri} part {index} step row {step} camera {camera}"
            yield decode_frame(image, info, where)
        return
    uri = dataset.file_uris(dataset.group_of(column, "episodes"), "episodes")[index]
    table = dataset.read_part(index, "episodes", [cols.EPISODE_ID, cols.LENGTH, column])
    for episode_id, length, video in zip(*(c.to_pylist() for c in table.columns)):
        where = f"{uri}: episode {episode_id} camera {camera!r}"
        if video is None:
            raise ExportError(f"{where}: no video")
        yield from video_frames(video, info, where, length)


def video_info(settings: VideoSettings) -> dict:
    return {
        "dtype": "video",
        "shape": [settings.height, settings.width, 3],
        "names": ["height", "width", "channels"],
        "info": settings.info(),
    }


# ---------------------------------------------------------------- the whole export


def export_lerobot(
    dataset: Dataset,
    output: str,
    options: LeRobotOptions,
    *,
    executor: Executor,
    command: str = "",
) -> ExportResult:
    """Write `dataset` as a LeRobot v3.0 dataset at `output`; nothing stays on failure."""
    plan = plan_export(dataset, options)
    with VersionWriter(output, commit_file=COMMIT_FILE) as writer:
        tasks = [PartTask(index, plan, writer) for index in range(dataset.num_parts)]
        results = executor.map(
            export_part, tasks, description="export lerobot", total=dataset.manifest.steps
        )
        results.sort(key=lambda r: r.index)
        written = [
            writer.write_file(EPISODES_PATH, parquet_bytes(episodes_table(results))),
            writer.write_file(TASKS_PATH_V30, parquet_bytes(tasks_table(plan))),
        ]
        all_stats = [s for r in results for s in r.episode_stats]
        dataset_stats = {
            key: stats.as_lists(stats.aggregate([s[key] for s in all_stats]))
            for key in (all_stats[0] if all_stats else {})
        }
        written.append(writer.write_file(STATS_PATH, json.dumps(dataset_stats, indent=4).encode()))
        # Where the export came from (LeRobot warns about unknown keys in info.json).
        provenance = {
            "source": dataset.uri,
            "dataset_id": dataset.manifest.dataset_id,
            "command": command,
            "videos": camera_summary([r.encoded for r in results]),
        }
        written.append(
            writer.write_file("meta/hindsight.json", json.dumps(provenance, indent=4).encode())
        )
        info = info_json(plan, results)
        data = json.dumps(info, indent=4).encode()
        writer.commit(data)
    # Text columns are never features: say which ones the export leaves out.
    columns = divide_columns(dataset)
    texts = [t for t in columns.texts if t != plan.task_column]
    texts += [f"episodes.{t}" for t in columns.episode_texts if t != plan.task_column]
    return ExportResult(
        format="lerobot",
        output=writer.uri,
        episodes=info["total_episodes"],
        steps=info["total_frames"],
        bytes=sum(r.bytes for r in results) + sum(w.bytes for w in written) + len(data),
        files=sum(r.files for r in results) + len(written) + 1,
        skipped_columns=columns.skipped,
        details={
            "fps": plan.fps,
            "tasks": len(plan.task_index),
            "cameras": list(plan.cameras),
            "videos": provenance["videos"],
            "video_codec": CODECS[plan.video_codec],
            "texts_not_exported": texts,
        },
    )


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="snappy")
    return sink.getvalue().to_pybytes()


def episodes_table(results: list[PartResult]) -> pa.Table:
    """meta/episodes: LeRobot's per-episode fields, then `stats/<feature>/<stat>`."""
    rows = []
    for result in results:
        for row, episode in zip(result.episodes, result.episode_stats, strict=True):
            flat = dict(row)
            for key, feature_stats in episode.items():
                for name, value in feature_stats.items():
                    flat[f"stats/{key}/{name}"] = np.asarray(value).tolist()
            flat["meta/episodes/chunk_index"] = 0
            flat["meta/episodes/file_index"] = 0
            rows.append(flat)
    return pa.Table.from_pylist(rows)


def tasks_table(plan: Plan) -> pa.Table:
    """meta/tasks.parquet as LeRobot writes it: a pandas frame indexed by `task` with a
    `task_index` column (LeRobot reads it with pandas and looks tasks up by index)."""
    import pandas as pd

    tasks = sorted(plan.task_index, key=plan.task_index.__getitem__)
    frame = pd.DataFrame(
        {"task_index": [plan.task_index[t] for t in tasks]}, index=pd.Index(tasks, name="task")
    )
    return pa.Table.from_pandas(frame)


def info_json(plan: Plan, results: list[PartResult]) -> dict:
    """meta/info.json through the shared format model (schemas/lerobot.py)."""
    features: dict[str, dict] = {
        feature.key: {"dtype": feature.dtype, "shape": list(feature.shape), "names": feature.names}
        for feature in plan.features
    }
    for camera in plan.cameras:
        info = next((r.videos[camera] for r in results if camera in r.videos), None)
        if info is not None:
            features[video_key(camera)] = info
    features.update(DEFAULT_FEATURES)
    episodes = sum(len(r.episodes) for r in results)
    info = LeRobotInfo.new(plan.fps, features, robot_type=plan.robot_type).model_copy(
        update={
            "total_episodes": episodes,
            "total_frames": sum(r.steps for r in results),
            "total_tasks": len(plan.task_index),
            "splits": {"train": f"0:{episodes}"},
        }
    )
    return info.to_json_dict()
