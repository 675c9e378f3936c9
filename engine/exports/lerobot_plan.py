"""Planning a LeRobot export (engine/exports/lerobot.py): the features of the frames
table, the tasks and their indices, each part's first episode and step, all decided in the
driver before any part is written."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.dataset import Dataset
from engine.exports import (
    ExportError,
    divide_columns,
    is_text_type,
    is_vector_type,
    single_env_id,
)
from schemas import steps as cols
from schemas.lerobot import (
    CAMERA_PREFIX,
    DEFAULT_CHUNKS_SIZE,
    DEFAULT_FEATURES,
    EPISODES_PATH_V30,
    INFO_PATH,
)

COMMIT_FILE = INFO_PATH
# The driver writes all episodes' rows into one file of the episodes table.
EPISODES_PATH = EPISODES_PATH_V30.format(chunk_index=0, file_index=0)
DEFAULT_FPS = 30
TASK = "task"  # the task text column a LeRobot ingest writes (engine/sources/lerobot.py)
INDEX_COLUMNS = tuple(DEFAULT_FEATURES)


@dataclass(frozen=True)
class LeRobotOptions:
    fps: int | None = None
    task_column: str | None = None
    video_codec: str = "libsvtav1"


@dataclass(frozen=True)
class Feature:
    """One frame feature: its LeRobot key, where it comes from, its dtype and shape."""

    key: str
    source: str  # step column, `<column>.<field>` of a struct, or `episodes.<column>`
    dtype: str
    shape: tuple[int, ...]
    names: list | dict | None = None


@dataclass(frozen=True)
class Plan:
    """Everything a part task needs besides its own rows (plain data: it travels to Ray)."""

    dataset_uri: str
    fps: int
    features: tuple[Feature, ...]
    cameras: tuple[str, ...]
    video_codec: str
    task_column: str | None
    task_level: str | None
    default_task: str
    task_index: dict[str, int]
    step_offsets: tuple[int, ...]
    episode_offsets: tuple[int, ...]
    robot_type: str | None = None


def chunk_and_file(index: int) -> tuple[int, int]:
    return index // DEFAULT_CHUNKS_SIZE, index % DEFAULT_CHUNKS_SIZE


def video_key(camera: str) -> str:
    return CAMERA_PREFIX + camera


# ---------------------------------------------------------------- planning


def check_task_column(dataset: Dataset, column: str) -> str:
    """The level of a text column that can be the task ("steps" or "episodes"); a name at
    both levels (a LeRobot ingest's `task`) is read per step, the finer of the two."""
    for level in ("steps", "episodes"):
        schema = dataset.arrow_schema(level)
        if column in schema.names:
            if not is_text_type(schema.field(column).type):
                raise ExportError(
                    f"--task-column {column}: a {level} column of type "
                    f"{schema.field(column).type}; the task is a text column"
                )
            return level
    texts = [
        f.name
        for level in ("episodes", "steps")
        for f in dataset.arrow_schema(level)
        if is_text_type(f.type)
    ]
    raise ExportError(
        f"--task-column {column}: no such column in {dataset.uri}; its text columns: "
        f"{', '.join(texts) or 'none'}"
    )


def _task_column(dataset: Dataset) -> str | None:
    """Without --task-column, a text column named `task` (a LeRobot ingest's tasks) keeps
    its values: exported and ingested again, the tasks round-trip."""
    for level in ("steps", "episodes"):
        schema = dataset.arrow_schema(level)
        if TASK in schema.names and is_text_type(schema.field(TASK).type):
            return TASK
    return None


def plan_export(dataset: Dataset, options: LeRobotOptions) -> Plan:
    steps_schema = dataset.arrow_schema("steps")
    episodes_schema = dataset.arrow_schema("episodes")
    columns = divide_columns(dataset)
    features: list[Feature] = []
    if cols.OBSERVATION in steps_schema.names:
        kind = steps_schema.field(cols.OBSERVATION).type
        if pa.types.is_struct(kind):
            for f in kind:
                features.append(
                    numeric_feature(f"observation.{f.name}", f"observation.{f.name}", f.type)
                )
        else:
            features.append(numeric_feature("observation.state", cols.OBSERVATION, kind))
    if cols.ACTION in steps_schema.names:
        features.append(
            numeric_feature("action", cols.ACTION, steps_schema.field(cols.ACTION).type)
        )
    has_rewards = dataset.rewards_known
    if has_rewards:
        features.append(Feature("next.reward", cols.REWARD, "float32", (1,)))
    features.append(Feature("next.done", "done", "bool", (1,)))
    # LeRobot has one end flag; this one (ignored by LeRobot) tells a time limit from a
    # true end, so that a re-ingest gets `truncated` back (engine/sources/lerobot.py).
    features.append(Feature("next.truncated", cols.TRUNCATED, "bool", (1,)))
    taken = {f.key for f in features} | set(INDEX_COLUMNS)
    extras = [(name, steps_schema.field(name).type, name) for name in columns.numbers]
    extras += [
        (name, episodes_schema.field(name).type, f"episodes.{name}")
        for name in columns.episode_numbers
        # An unknown reward leaves every episode's return null: not a feature.
        if name not in columns.numbers and (has_rewards or name != cols.RETURN)
    ]
    for name, kind, source in extras:
        if name in INDEX_COLUMNS:
            # A dataset ingested from LeRobot keeps its `timestamp` and `frame_index`: the
            # export writes its own (frame_index / fps: where the frame is in the video).
            continue
        if name in taken:
            raise ExportError(f"column {name!r} would clash with LeRobot's own feature {name!r}")
        shape = (kind.list_size,) if is_vector_type(kind) else (1,)
        features.append(Feature(name, source, "float32", shape))
    task_column = options.task_column or _task_column(dataset)
    task_level = check_task_column(dataset, task_column) if task_column else None
    default_task = single_env_id(dataset) or "default"
    task_index: dict[str, int] = {}
    for part in range(dataset.num_parts):
        tasks = part_tasks(dataset, part, task_column, task_level, default_task)
        for task in pc.unique(tasks).to_pylist():  # in order of first appearance
            task_index.setdefault(task, len(task_index))
    if not task_index:
        task_index[default_task] = 0
    parts = dataset.manifest.parts
    # A dataset ingested from LeRobot keeps its info.json under metadata["lerobot"]: its
    # fps, robot type and the names of its features' dimensions carry over.
    source = dataset.manifest.metadata.get("lerobot") or {}
    fps = options.fps or int(
        dataset.manifest.metadata.get("fps") or source.get("fps") or DEFAULT_FPS
    )
    names = {
        key: feature["names"]
        for key, feature in (source.get("features") or {}).items()
        if isinstance(feature, dict) and feature.get("names") is not None
    }
    features = [
        replace(f, names=names[f.key])
        if f.key in names and list(f.shape) == list(source["features"][f.key].get("shape", []))
        else f
        for f in features
    ]
    return Plan(
        dataset_uri=dataset.uri,
        fps=fps,
        features=tuple(features),
        cameras=tuple(columns.cameras),
        video_codec=options.video_codec,
        task_column=task_column,
        task_level=task_level,
        default_task=default_task,
        task_index=task_index,
        robot_type=source.get("robot_type"),
        step_offsets=tuple(np.concatenate([[0], np.cumsum([p.steps for p in parts])]).tolist()),
        episode_offsets=tuple(
            np.concatenate([[0], np.cumsum([p.episodes for p in parts])]).tolist()
        ),
    )


def numeric_feature(key: str, source: str, kind: pa.DataType) -> Feature:
    """Observations and actions keep their type (float32 vectors, int64 discrete actions)."""
    if is_vector_type(kind):
        return Feature(key, source, dtype_name(kind.value_type), (kind.list_size,))
    return Feature(key, source, dtype_name(kind), (1,))


def dtype_name(kind: pa.DataType) -> str:
    """The NumPy name LeRobot's features use for an Arrow type (float, not float32, in Arrow)."""
    return str(np.dtype(kind.to_pandas_dtype()))


def part_tasks(
    dataset: Dataset, part: int, column: str | None, level: str | None, default: str
) -> pa.Array:
    """The task of every step of a part, as Arrow strings (a null text: the default task)."""
    steps = dataset.manifest.parts[part].steps
    if column is None:
        return pa.array([default], pa.string()).take(np.zeros(steps, dtype=np.int64))
    values = dataset.read_part(part, level, [column]).column(0).combine_chunks()
    values = pc.fill_null(pc.cast(values, pa.string()), default)
    if level == "steps":
        return values
    ids = dataset.read_part(part, "steps", [cols.EPISODE_ID]).column(0)
    lengths = np.diff(cols.episode_boundaries(cols.arrow_to_numpy(ids)))
    return values.take(np.repeat(np.arange(len(values)), lengths))
