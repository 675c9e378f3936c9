"""`lerobot`: a LeRobotDataset directory, v3.0 or v2.1, local or on S3 (the layout is in
schemas/lerobot.py; metadata and its checks in engine/sources/lerobot_meta.py).

Each frame row becomes a step of its episode (`episode_index` -> episode_id,
`frame_index` order):

- `observation`: `observation.state`, or the one vector `observation.*` feature; several
  become a struct (`observation.state` -> field `state`, `observation.environment_state`
  -> `environment_state`); none (a camera-only dataset): no observation column;
- `action`; `next.reward` -> reward (a dataset without it has unknown rewards:
  `reward=None`); `next.done` -> terminated on the episode's last step, else the last
  step is truncated;
- `timestamp` and `frame_index` stay step columns; `task_index` becomes the step column
  `task` (the task's text) and the episode column `task` (its first step's), with the
  episode column `tasks` (every task of the episode, from its metadata) where some
  episode has several; other non-camera features stay step columns under their names;
- cameras (`observation.images.top` -> camera `top`, engine/sources/images.py):
  a `video` feature's episodes are copied from its MP4s as they are (no --codec; H.264 or
  AV1), or its frames decoded from the episode's span with PyAV and encoded with
  `--codec` (engine/sources/lerobot_video.py); an `image` feature's encoded frames are
  stored as they came from the Parquet.

`plan` reads only metadata (lerobot_meta.py; the data files' rows it checks:
lerobot_rows.py) and cuts whole episodes into parts (smaller with cameras:
`image_part_steps`); `read_part` reads its episodes' rows (the row range, only the
columns it maps) and their video spans, and leaves out, with a problem each, the episodes
whose video does not decode (a damaged MP4 has a readable header: only decoding finds it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from itertools import groupby
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine import storage
from engine.sources.base import (
    IngestPlan,
    Part,
    PartRead,
    PlanOptions,
    Source,
    part_ranges,
    source_label,
)
from engine.sources.images import (
    ImageColumn,
    camera_name,
    encoded_camera,
    image_part_steps,
)
from engine.sources.lerobot_meta import (
    LeRobotEpisode,
    LeRobotMeta,
    first_image,
    read_meta,
)
from engine.sources.lerobot_rows import (
    action_column,
    check_rows,
    flat_values,
    observation_column,
    read_row_range,
    step_column,
)
from engine.sources.lerobot_video import FramesRead, read_frames, video_camera
from engine.sources.tables import EpisodeLabels, build_tables, strings_to_arrow
from engine.validate import Problem
from schemas import lerobot as lr
from schemas import steps as cols
from schemas.frames import CameraInfo, FrameError

STATE = "observation.state"
REWARD = "next.reward"
DONE = "next.done"
# Not LeRobot's own: hindsight's export writes it so that a time-limit end (next.done and
# next.truncated) comes back truncated, not terminated.
TRUNCATED = "next.truncated"
TASK = "task"  # the step and episode column of the task text
TASKS = "tasks"  # the episode column of every task, where some episode has several
KEPT_COLUMNS = ("timestamp", "frame_index")  # LeRobot's own columns kept as steps columns
DROPPED_COLUMNS = ("episode_index", "index", "task_index")
# What `--map NAME=FEATURE` may point elsewhere (a dataset that stores its reward under
# another name, a chosen observation feature).
MAPPABLE = (cols.OBSERVATION, cols.ACTION, cols.REWARD, cols.TERMINATED)


@dataclass(frozen=True)
class LeRobotLayout:
    """Which features go where: what the plan decided for every part."""

    root: str
    fps: int
    observation: tuple[str, ...]  # features making up the observation (several: a struct)
    action: str
    reward: str | None
    done: str | None
    truncated: str | None
    infos: tuple[str, ...]  # features kept as step columns under their names
    tasks: tuple[tuple[int, str], ...]  # task_index -> text
    several_tasks: bool  # some episode has several: the episode column `tasks`
    sizes: tuple[tuple[str, int], ...] = ()  # observation/action feature -> values per frame


@dataclass(frozen=True, kw_only=True)
class LeRobotPart(Part):
    """Whole episodes of a LeRobot dataset, in episode order."""

    layout: LeRobotLayout
    episodes: tuple[LeRobotEpisode, ...]

    @property
    def file(self) -> str:
        return storage.join(self.layout.root, self.episodes[0].data_file)


class LeRobot(Source[LeRobotPart]):
    name = "lerobot"
    takes_column_map = True  # --map observation=, action=, reward=, terminated=

    def detect(self, path: str) -> bool:
        if storage.is_s3(path):
            return "." not in file_name_of(path) and storage.exists(
                storage.join(path, lr.INFO_PATH)
            )
        return os.path.isfile(os.path.join(path, lr.INFO_PATH))

    def plan(self, path: str, options: PlanOptions) -> IngestPlan:
        meta = read_meta(path)
        if isinstance(meta, Problem):
            return IngestPlan.refused(self.name, path, [meta])
        info = meta.info
        layout, problems = plan_layout(meta, dict(options.column_map))
        images, cameras, found, copying = plan_cameras(meta, options)
        problems += found
        if any(p.episode is None for p in problems):
            return IngestPlan.refused(self.name, path, problems)
        episodes = meta.episodes
        labels = EpisodeLabels(
            options.env_id or "unknown",  # a robot type is no environment: kept in metadata
            source_label(self.name, path),
            (TASK,) if layout.tasks else (),
        )
        lengths = np.asarray([e.length for e in episodes], dtype=np.int64)
        part_steps = image_part_steps(options.part_steps, list(cameras.values()))
        parts: list[Part] = [
            LeRobotPart(
                layout=layout,
                episodes=tuple(episodes[start:stop]),
                steps=int(lengths[start:stop].sum()),
                labels=labels,
                images=tuple(images),
                cameras=cameras,
            )
            for start, stop in part_ranges(lengths, part_steps)
        ]
        return IngestPlan(
            format=self.name,
            source=path,
            env_id=labels.env_id,
            parts=parts,
            steps=int(lengths.sum()),
            episodes=len(episodes),
            skipped=meta.problems + problems,
            episode_info_columns=list(labels.episode_info_columns),
            metadata={
                "lerobot": {
                    "codebase_version": info.codebase_version,
                    "fps": info.fps,
                    "robot_type": info.robot_type,
                    "features": {k: f.model_dump(mode="json") for k, f in info.features.items()},
                    **({"video_cameras": copying} if copying else {}),
                },
                **({} if layout.reward else {cols.REWARD: cols.ABSENT}),
            },
            images=images,
            cameras=cameras,
        )

    def read_part(self, part: LeRobotPart) -> PartRead:
        """The part's tables without the episodes whose rows or videos turn out bad once
        read (plan checks what it can cheaply; a damaged video only fails to decode), and
        a problem for each of those."""
        table = read_rows(part)
        # What plan checked of the rows, again: the files may have changed since (a
        # timestamp matters only for the video frame it picks).
        videos = any(not image.encoded for image in part.images)
        checked = table.drop_columns([] if videos else ["timestamp"])
        left_out = [
            replace(problem, file=storage.join(part.layout.root, data_file))
            for problem in check_rows(
                part.file, checked, dict(part.layout.tasks), dict(part.layout.sizes)
            )
            for data_file in [episode_file(part, problem.episode)]
        ]
        part, table = without_episodes(part, table, {p.episode for p in left_out})
        cameras = FramesRead()
        if part.images:
            layout = part.layout
            cameras = read_frames(
                layout.root, layout.fps, part.episodes, part.images, part.cameras, table
            )
            undecoded = cameras.problems
            part, table = without_episodes(part, table, {p.episode for p in undecoded})
            left_out = sorted([*left_out, *undecoded], key=lambda p: p.episode or 0)
        if not part.episodes:  # every episode left out
            nothing = pa.table({cols.EPISODE_ID: pa.array([], pa.int64())})
            return PartRead(nothing, nothing, {}, left_out)
        steps, episodes = base_tables(part, table)
        return PartRead(
            steps, episodes, cameras.frames, left_out, cameras.videos, cameras.reencoded
        )


def base_tables(part: LeRobotPart, table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """The steps and episodes tables of the part's rows (sorted by episode and frame)."""
    layout = part.layout
    episode_ids = np.asarray(table.column("episode_index").to_numpy(), dtype=np.int64)
    boundaries = cols.episode_boundaries(episode_ids)
    last = boundaries[1:] - 1
    terminated = np.zeros(len(episode_ids), bool)
    if layout.done:
        done = flat_values(table.column(layout.done)).astype(bool)
        if layout.truncated:
            done &= ~flat_values(table.column(layout.truncated)).astype(bool)
        terminated[last] = done[last]
    truncated = np.zeros(len(episode_ids), bool)
    truncated[last] = ~terminated[last]
    infos: dict[str, Any] = {
        name: step_column(table.column(name)) for name in (*KEPT_COLUMNS, *layout.infos)
    }
    if layout.tasks:
        infos[TASK] = task_texts(part, table)
    steps, episodes = build_tables(
        episode_ids=episode_ids,
        observation=observation_column(table, layout.observation),
        action=action_column(table.column(layout.action)),
        reward=flat_values(table.column(layout.reward)) if layout.reward else None,
        terminated=terminated,
        truncated=truncated,
        infos=infos,
        labels=part.labels,
    )
    if layout.several_tasks:
        tasks = pa.array([list(e.tasks) for e in part.episodes], pa.list_(pa.string()))
        episodes = episodes.append_column(TASKS, tasks)
    return steps, episodes


def episode_file(part: LeRobotPart, episode: int | None) -> str:
    """The data file (relative) holding an episode of the part."""
    return next(e.data_file for e in part.episodes if e.index == episode)


def without_episodes(
    part: LeRobotPart, table: pa.Table, episodes: set[int | None]
) -> tuple[LeRobotPart, pa.Table]:
    """The part and its rows without these episodes."""
    if not episodes:
        return part, table
    ids = pa.array(sorted(e for e in episodes if e is not None), pa.int64())
    table = table.filter(pc.invert(pc.is_in(table.column("episode_index"), ids)))
    kept = tuple(e for e in part.episodes if e.index not in episodes)
    return replace(part, episodes=kept), table


def file_name_of(path: str) -> str:
    return os.path.basename(path.rstrip("/"))


# ---------------------------------------------------------------- the plan


def plan_layout(
    meta: LeRobotMeta, column_map: dict[str, str] | None = None
) -> tuple[LeRobotLayout, list[Problem]]:
    """Which features become the observation, action, reward, flags and step columns;
    `column_map` (`--map reward=FEATURE,...`) names other features for MAPPABLE ones."""
    info, features = meta.info, meta.info.features
    info_uri = meta.uri(lr.INFO_PATH)
    column_map = dict(column_map or {})
    problems = [
        Problem(info_uri, name, f"--map {name}=: lerobot maps {', '.join(MAPPABLE)}")
        for name in column_map
        if name not in MAPPABLE
    ]
    problems += [
        Problem(info_uri, "features", f"has no feature {feature!r} (--map {name}={feature})")
        for name, feature in column_map.items()
        if name in MAPPABLE and feature not in features
    ]
    vectors = [
        key
        for key, feature in features.items()
        if key.startswith("observation.") and not feature.is_camera
    ]
    observation = (STATE,) if vectors == [STATE] else tuple(vectors)
    if cols.OBSERVATION in column_map:
        observation = (column_map[cols.OBSERVATION],)
    action = column_map.get(cols.ACTION, "action")
    reward = column_map.get(cols.REWARD, REWARD)
    done = column_map.get(cols.TERMINATED, DONE)
    problems += [
        Problem(info_uri, "features", f"has no `{name}` feature")
        for name in (action, "episode_index", *KEPT_COLUMNS)
        if name not in features
    ]
    truncated = column_map.get(cols.TRUNCATED, TRUNCATED)
    mapped = {*observation, action, reward, done, truncated, *KEPT_COLUMNS, *DROPPED_COLUMNS}
    infos = tuple(
        key
        for key, feature in features.items()
        if key not in mapped and not feature.is_camera and feature.dtype != "string"
    )
    several = any(len(e.tasks) > 1 for e in meta.episodes)
    layout = LeRobotLayout(
        root=meta.root,
        fps=info.fps,
        observation=observation,
        action=action,
        reward=reward if reward in features else None,
        done=done if done in features else None,
        truncated=truncated if truncated in features else None,
        infos=infos,
        tasks=tuple(sorted(meta.tasks.items())) if "task_index" in features else (),
        several_tasks=several,
        sizes=tuple((k, features[k].size) for k in (*observation, action) if k in features),
    )
    return layout, problems


def plan_cameras(
    meta: LeRobotMeta, options: PlanOptions
) -> tuple[list[ImageColumn], dict[str, CameraInfo], list[Problem], dict[str, str]]:
    """The cameras: video features (copied as they are, or decoded and encoded with
    --codec: lerobot_video.py; what became of each in the last value) and image features
    (encoded frames stored as they came; the first frame tells the codec and size)."""
    images, cameras, problems, copying = [], {}, [], {}
    info_uri = meta.uri(lr.INFO_PATH)
    for key, feature in meta.info.features.items():
        if not feature.is_camera:
            continue
        camera = camera_name(key.removeprefix(lr.CAMERA_PREFIX))
        if feature.dtype == "video":
            video = feature.video_info
            try:
                height, width, channels = feature.image_hwc
            except ValueError as error:
                problems.append(Problem(info_uri, key, str(error)))
                continue
            if video.get("video.is_depth_map") or channels != 3:
                problems.append(
                    Problem(info_uri, key, "is a depth or non-RGB video; hindsight reads RGB ones")
                )
                continue
            cameras[camera], copied, copying[camera] = video_camera(
                meta, key, (height, width), options
            )
            images.append(ImageColumn(key, camera, encoded=False, copied=copied))
        elif meta.episodes:
            episode = meta.episodes[0]
            data = first_image(meta, episode, key)
            where = (
                f"{meta.uri(episode.data_file)}: episode {episode.index}, step 0: column {key!r}"
            )
            try:
                if data is None:
                    raise FrameError(f"{where}: has no image bytes")
                cameras[camera] = encoded_camera(data, where)
            except FrameError as error:
                problems.append(Problem(meta.uri(episode.data_file), key, str(error)))
                continue
            images.append(ImageColumn(key, camera, encoded=True))
    return images, cameras, problems, copying


# ---------------------------------------------------------------- reading a part


def read_rows(part: LeRobotPart) -> pa.Table:
    """The part's rows with the columns the layout maps: for each run of episodes in one
    data file, the row groups covering their rows, sliced to them."""
    layout = part.layout
    columns = [
        "episode_index",
        *KEPT_COLUMNS,
        *layout.observation,
        layout.action,
        *[c for c in (layout.reward, layout.done, layout.truncated) if c],
        *layout.infos,
        *(["task_index"] if layout.tasks else []),
        *[image.source for image in part.images if image.encoded],
    ]
    tables = []
    for relative, run in groupby(part.episodes, key=lambda e: e.data_file):
        run = list(run)
        start = min(e.row_start for e in run)
        stop = max(e.row_start + e.length for e in run)
        tables.append(read_row_range(storage.join(layout.root, relative), start, stop, columns))
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    wanted = np.isin(
        np.asarray(table.column("episode_index").to_numpy(), dtype=np.int64),
        [e.index for e in part.episodes],
    )
    if not wanted.all():  # rows of other episodes between the part's (v3.0, skipped ones)
        table = table.filter(pa.array(wanted))
    # Steps in (episode, frame) order whatever the order of the files' rows.
    return table.sort_by([("episode_index", "ascending"), ("frame_index", "ascending")])


def task_texts(part: LeRobotPart, table: pa.Table) -> pa.Array:
    """Each step's task text, from its task_index (`check_rows` left out the episodes
    with an index the task table lacks)."""
    index = flat_values(table.column("task_index")).astype(np.int64)
    known = dict(part.layout.tasks)
    order = np.asarray(sorted(known), dtype=np.int64)
    texts = [known[i] for i in order]
    positions = np.searchsorted(order, index)
    return strings_to_arrow(texts).take(pa.array(positions))
