"""Reading a LeRobot dataset's metadata (schemas/lerobot.py has the layout): info.json, the
task table, where each episode's rows and video spans are, and whether the files agree.

Everything here is cheap: JSON and the small metadata Parquet files, the data files'
`episode_index` column (v3.0, many episodes per file: it places each episode's rows and
counts them) or their footers (v2.1, one file per episode), their `task_index` column
(checked against the task table) and, with videos, `timestamp` column (the frames an
episode's timestamps need), and the MP4 headers (frame counts). Disagreements become
`Problem`s naming the file and the episode.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ValidationError as PydanticError

from engine import storage
from engine.sources.lerobot_rows import (
    check_rows,
    last_timestamps,
    read_footer_and_columns,
    row_columns,
)
from engine.validate import Problem
from engine.video import video_frame_count
from schemas import lerobot as lr
from schemas.frames import FrameError

T = TypeVar("T")
IO_THREADS = 16  # S3 requests in flight at once while planning

_EPISODE_COLUMNS_V30 = (
    "episode_index",
    "tasks",
    "length",
    "data/chunk_index",
    "data/file_index",
    "dataset_from_index",
    "dataset_to_index",
)


@dataclass(frozen=True)
class VideoSpan:
    """Where one episode's frames of one camera are: a span of an MP4 file."""

    file: str  # relative to the dataset root
    start_s: float
    end_s: float


@dataclass(frozen=True)
class LeRobotEpisode:
    """One episode: its rows in a data file, its tasks and its video spans."""

    index: int
    length: int
    data_file: str  # relative to the dataset root
    row_start: int  # its first row in data_file (v2.1: 0)
    tasks: tuple[str, ...] = ()
    videos: tuple[tuple[str, VideoSpan], ...] = ()  # (video key, span)
    # Its largest `timestamp` and the step holding it: the last frame of its video spans
    # it needs (None: not read, the dataset has no videos).
    last_timestamp: float | None = None
    last_timestamp_step: int = 0


@dataclass
class LeRobotMeta:
    """A dataset's metadata as read, with the problems found in it."""

    root: str
    info: lr.LeRobotInfo
    tasks: dict[int, str]
    episodes: list[LeRobotEpisode] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def uri(self, relative: str) -> str:
        return storage.join(self.root, relative)


def read_info(root: str) -> lr.LeRobotInfo | Problem:
    """meta/info.json as the model, or the problem that makes the dataset unreadable."""
    uri = storage.join(root, lr.INFO_PATH)
    try:
        data = json.loads(storage.read_bytes(uri))
    except storage.StorageError:
        raise ValueError(f"{root}: not a LeRobot dataset ({lr.INFO_PATH} is missing)") from None
    except json.JSONDecodeError as error:
        return Problem(uri, "info.json", f"is not JSON ({error})")
    try:
        return lr.LeRobotInfo.model_validate(data)
    except PydanticError as error:
        first = error.errors()[0]
        column = ".".join(str(part) for part in first["loc"]) or "info.json"
        return Problem(uri, column, first["msg"].removeprefix("Value error, "))


def read_meta(root: str) -> LeRobotMeta | Problem:
    """Every episode of the dataset with its rows, tasks and video spans, checked against
    the data and video files."""
    root = storage.normalize(root)
    info = read_info(root)
    if isinstance(info, Problem):
        return info
    meta = LeRobotMeta(root, info, read_tasks(root, info))
    present = set(storage.list_files(root))
    if info.is_v30:
        rows = read_episodes_v30(root)
        episodes, problems = locate_v30(meta, rows, present)
    else:
        rows = read_jsonl(storage.join(root, lr.EPISODES_PATH_V21))
        episodes, problems = locate_v21(meta, rows, present)
    problems += check_videos(meta, episodes, present)
    meta.episodes = sorted(episodes, key=lambda e: e.index)
    meta.problems = problems
    return meta


# ---------------------------------------------------------------- tasks and episodes tables


def read_jsonl(uri: str) -> list[dict[str, Any]]:
    try:
        text = storage.read_bytes(uri).decode()
    except storage.StorageError:
        raise ValueError(f"{uri}: is missing (a LeRobot v2.1 dataset has it)") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{uri}: line {number} is not JSON ({error})") from None
    return rows


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.filesystem(uri)
    try:
        return pq.read_table(path, filesystem=fs, columns=columns)
    except (FileNotFoundError, OSError, pa.ArrowInvalid) as error:
        raise ValueError(f"{uri}: cannot read ({error})") from None


def read_tasks(root: str, info: lr.LeRobotInfo) -> dict[int, str]:
    """task_index -> task text. v3.0 keeps the text as the pandas index of tasks.parquet
    (column `task`, or `__index_level_0__` when the index was not named)."""
    uri = storage.join(root, info.tasks_path)
    if not info.is_v30:
        return {int(row["task_index"]): str(row["task"]) for row in read_jsonl(uri)}
    table = read_parquet(uri)
    text = next((c for c in ("task", "__index_level_0__") if c in table.column_names), None)
    if text is None or "task_index" not in table.column_names:
        raise ValueError(f"{uri}: has no task text and task_index columns ({table.column_names})")
    return dict(
        zip(
            (int(i) for i in table.column("task_index").to_pylist()),
            (str(t) for t in table.column(text).to_pylist()),
            strict=True,
        )
    )


def read_episodes_v30(root: str) -> list[dict[str, Any]]:
    """The rows of meta/episodes/*/*.parquet, without the per-episode statistics."""
    directory = storage.join(root, lr.EPISODES_DIR_V30)
    files = [f for f in storage.list_files(directory) if f.endswith(".parquet")]
    if not files:
        raise ValueError(f"{directory}: holds no episodes Parquet file")
    rows: list[dict[str, Any]] = []
    for uri in files:
        fs, path = storage.filesystem(uri)
        names = pq.read_schema(path, filesystem=fs).names
        wanted = [c for c in names if c in _EPISODE_COLUMNS_V30 or c.startswith("videos/")]
        rows += read_parquet(uri, wanted).to_pylist()
    return rows


# ---------------------------------------------------------------- where the rows are


def _tasks_of(row: dict[str, Any]) -> tuple[str, ...]:
    tasks = row.get("tasks") or ()
    return tuple(str(t) for t in ([tasks] if isinstance(tasks, str) else tasks))


def _problem(meta: LeRobotMeta, relative: str, column: str, message: str, episode: int) -> Problem:
    return Problem(meta.uri(relative), column, message, episode)


def locate_v30(
    meta: LeRobotMeta, rows: list[dict[str, Any]], present: set[str]
) -> tuple[list[LeRobotEpisode], list[Problem]]:
    """Each episode's data file (from its chunk and file index) and its first row there,
    found in the file's `episode_index` column; its row count checked against `length`."""
    info, problems, episodes = meta.info, [], []
    by_file: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        relative = info.data_file(
            chunk_index=int(row["data/chunk_index"]), file_index=int(row["data/file_index"])
        )
        by_file[relative].append(row)
    for relative, file_rows in sorted(by_file.items()):
        if meta.uri(relative) not in present:
            problems += [
                _problem(meta, relative, "data", "is missing", int(r["episode_index"]))
                for r in file_rows
            ]
            continue
        table = read_parquet(
            meta.uri(relative), ["episode_index", *row_columns(meta.info, meta.tasks)]
        )
        index = np.asarray(table.column("episode_index").to_numpy(), dtype=np.int64)
        found, first, counts = np.unique(index, return_index=True, return_counts=True)
        where = {int(e): (int(f), int(c)) for e, f, c in zip(found, first, counts, strict=True)}
        bad_rows = {p.episode: p for p in check_rows(meta.uri(relative), table, meta.tasks)}
        last = last_timestamps(table)
        for row in file_rows:
            episode, length = int(row["episode_index"]), int(row["length"])
            if episode in bad_rows:
                problems.append(bad_rows[episode])
                continue
            start, count = where.get(episode, (0, 0))
            if count != length:
                problems.append(
                    _problem(
                        meta,
                        relative,
                        "episode_index",
                        f"has {count} rows of the episode, {lr.EPISODES_DIR_V30} says "
                        f"length {length}",
                        episode,
                    )
                )
                continue
            if count and not (index[start : start + count] == episode).all():
                problems.append(
                    _problem(meta, relative, "episode_index", "rows are not contiguous", episode)
                )
                continue
            videos = tuple(
                (key, _span_v30(info, row, key)) for key in info.video_keys if _has_span(row, key)
            )
            missing = [k for k in info.video_keys if not _has_span(row, k)]
            if missing:
                problems.append(
                    _problem(
                        meta,
                        lr.EPISODES_DIR_V30,
                        f"videos/{missing[0]}/from_timestamp",
                        "is missing: the episode has no span in its camera's videos",
                        episode,
                    )
                )
                continue
            episodes.append(
                LeRobotEpisode(
                    index=episode,
                    length=length,
                    data_file=relative,
                    row_start=start,
                    tasks=_tasks_of(row),
                    videos=videos,
                    **last.get(episode, {}),
                )
            )
    return episodes, problems


def _has_span(row: dict[str, Any], key: str) -> bool:
    columns = lr.episodes_columns_v30(key).values()
    return all(row.get(c) is not None for c in columns)


def _span_v30(info: lr.LeRobotInfo, row: dict[str, Any], key: str) -> VideoSpan:
    columns = lr.episodes_columns_v30(key)
    return VideoSpan(
        info.video_file(
            key,
            chunk_index=int(row[columns["chunk_index"]]),
            file_index=int(row[columns["file_index"]]),
        ),
        float(row[columns["from_timestamp"]]),
        float(row[columns["to_timestamp"]]),
    )


def locate_v21(
    meta: LeRobotMeta, rows: list[dict[str, Any]], present: set[str]
) -> tuple[list[LeRobotEpisode], list[Problem]]:
    """One data file and one MP4 per episode; the file's row count (from its footer)
    checked against the episode's `length` in episodes.jsonl."""
    info, problems, episodes = meta.info, [], []
    columns = row_columns(info, meta.tasks)

    def read(uri: str) -> tuple[int, pa.Table] | str:
        if uri not in present:
            return "is missing"
        try:
            return read_footer_and_columns(uri, columns)
        except (OSError, pa.ArrowInvalid) as error:
            return f"cannot be read ({error})"

    files = [info.data_file(episode_index=int(row["episode_index"])) for row in rows]
    for row, relative, found in zip(
        rows, files, map_io(read, [meta.uri(f) for f in files], meta.root), strict=True
    ):
        episode, length = int(row["episode_index"]), int(row["length"])
        if isinstance(found, str):
            problems.append(_problem(meta, relative, "data", found, episode))
            continue
        count, table = found
        if count != length:
            problems.append(
                _problem(
                    meta,
                    relative,
                    "episode_index",
                    f"has {count} rows, {lr.EPISODES_PATH_V21} says length {length}",
                    episode,
                )
            )
            continue
        found = check_rows(meta.uri(relative), table, meta.tasks)
        if found:
            problems += found
            continue
        videos = tuple(
            (key, VideoSpan(info.video_file(key, episode_index=episode), 0.0, length / info.fps))
            for key in info.video_keys
        )
        episodes.append(
            LeRobotEpisode(
                index=episode,
                length=length,
                data_file=relative,
                row_start=0,
                tasks=_tasks_of(row),
                videos=videos,
                **last_timestamps(table).get(episode, {}),
            )
        )
    return episodes, problems


# ---------------------------------------------------------------- videos


def map_io(function: Callable[[str], T], uris: list[str], root: str) -> list[T]:
    """`function` over files, results in order: on S3 by a bounded pool of threads (each
    call mostly waits on the network: footers and MP4 headers of one file per episode in
    v2.1), locally one after another. Threads for I/O only, inside plan; the parts'
    work goes through the executor (Ray)."""
    if not storage.is_s3(root) or len(uris) < 2:
        return [function(uri) for uri in uris]
    with ThreadPoolExecutor(max_workers=min(IO_THREADS, len(uris))) as pool:
        return list(pool.map(function, uris))


def check_videos(
    meta: LeRobotMeta, episodes: list[LeRobotEpisode], present: set[str]
) -> list[Problem]:
    """Every episode's MP4 files exist and, by their headers, hold the frames of its span
    (the span itself holds at least the episode's frames). The episodes with a problem are
    taken out of `episodes`."""
    fps = meta.info.fps

    def frame_count(uri: str) -> int | str:  # the video's frames, or why it has none
        if uri not in present:
            return "is missing"
        try:
            return video_frame_count(uri)[0]
        except FrameError as error:  # a VideoError, or a file that is not a video
            return str(error).removeprefix(f"{uri}: ")

    files = list(dict.fromkeys(span.file for e in episodes for _, span in e.videos))
    frames_of = dict(zip(files, map_io(frame_count, [meta.uri(f) for f in files], meta.root)))
    problems: list[Problem] = []
    bad: set[int] = set()
    for episode in episodes:
        for key, span in episode.videos:
            uri = meta.uri(span.file)
            frames = frames_of[span.file]
            message = None
            if isinstance(frames, str):
                message = frames
            elif round((span.end_s - span.start_s) * fps) < episode.length:
                message = (
                    f"the episode's span {span.start_s:.3f}s..{span.end_s:.3f}s holds "
                    f"{round((span.end_s - span.start_s) * fps)} frames at {fps} fps, the "
                    f"episode has {episode.length}"
                )
            elif round(span.start_s * fps) + episode.length > frames:
                message = (
                    f"holds {frames} frames, the episode's span needs frames up to "
                    f"{span.start_s + episode.length / fps:.3f}s ({round(span.start_s * fps)} + "
                    f"{episode.length}): the video is shorter than its episode"
                )
            if message is None and episode.last_timestamp is not None:
                needed = round(span.start_s * fps) + round(episode.last_timestamp * fps) + 1
                if needed > frames:
                    problems.append(
                        Problem(
                            meta.uri(episode.data_file),
                            "timestamp",
                            f"{episode.last_timestamp:.3f}s needs frame {needed - 1} of "
                            f"{uri} ({key}), which holds {frames} frames: the video is "
                            "shorter than the episode's timestamps",
                            episode.index,
                            episode.last_timestamp_step,
                        )
                    )
                    bad.add(episode.index)
                    break
            if message is not None:
                problems.append(Problem(uri, key, message, episode.index))
                bad.add(episode.index)
                break
    episodes[:] = [e for e in episodes if e.index not in bad]
    return problems


def first_image(meta: LeRobotMeta, episode: LeRobotEpisode, key: str) -> bytes | None:
    """The encoded bytes of an `image` feature's first frame (an HF Image struct)."""
    uri = meta.uri(episode.data_file)
    fs, path = storage.filesystem(uri)
    batch = next(
        pq.ParquetFile(path, filesystem=fs).iter_batches(batch_size=1, columns=[key]), None
    )
    if batch is None or batch.num_rows == 0:
        return None
    return image_bytes(batch.column(0)).to_pylist()[0]


def image_bytes(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The encoded images of an HF Image column ({bytes, path} structs, or plain binary)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_struct(array.type):
        array = pc.struct_field(array, "bytes")
    return array
