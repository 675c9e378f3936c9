"""Export to Minari (Farama's offline-RL format): a dataset directory that
`minari.load_dataset` opens, written with h5py alone (minari itself is not needed to write).

    OUTPUT/data/main_data.hdf5     one group `episode_<i>` per episode, i = 0..n-1
    OUTPUT/data/metadata.json      the commit file: spaces, counts, dataset id, env spec

The layout follows minari's own reader (minari/dataset/_storages/hdf5_storage.py): per
episode of n steps, `observations` holds n + 1 rows (the n observations, then the last
step's next observation; the last observation repeated, and the episode's attribute
`final_observation` saying so, when the source recorded none, as LeRobot logs do), `actions`, `rewards`, `terminations`, `truncations` n rows; a
struct (dict) observation is a group with one dataset per key. Step columns beyond the
trajectory (relabels such as `return_to_go`, `noise`, text such as `instruction`) go to
`infos` the way Minari's DataCollector stores infos: n + 1 rows, row 0 for the reset and
row t + 1 holding step t's value (the reset's row is NaN, 0, False or "" as the type
allows). Episode columns become the episode group's attributes (`episode_metadata`), the
source's episode id as `episode_id`. A dataset without rewards gets NaN rewards.

Minari finds a dataset at `$MINARI_DATASETS_PATH/<dataset id>`, so an export written to
`ROOT/hindsight/pendulum-rl-v0` loads with `MINARI_DATASETS_PATH=ROOT` as
`minari.load_dataset("hindsight/pendulum-rl-v0")`; anywhere else,
`minari.MinariDataset("OUTPUT/data")` opens it.
"""

from __future__ import annotations

import json
import os
import re
import uuid

import numpy as np
import pyarrow as pa

from engine import storage
from engine.dataset import Dataset
from engine.exports import (
    Columns,
    ExportError,
    ExportResult,
    column_values,
    divide_columns,
    episode_lengths,
    flags,
    is_text_type,
    is_vector_type,
    single_env_id,
)
from engine.writer import VersionWriter
from schemas import steps as cols
from schemas.frames import FRAME_PREFIX

COMMIT_FILE = "data/metadata.json"
DATA_FILE = "data/main_data.hdf5"
# The dataset format version written: minari 0.5.x reads it (minari.supported_dataset_versions).
MINARI_FORMAT_VERSION = "0.5.0"
_DATASET_ID = re.compile(r"^(?:[-_\w][-_\w/]*[-_\w]+/)?[-_.\w]+-v\d+$")


def default_dataset_id(output: str) -> str:
    """`hindsight/<name>-v0` from the output's last path component (its own `-vN` kept)."""
    name = storage.normalize(output).rstrip("/").rsplit("/", 1)[-1]
    return f"hindsight/{name}" if re.search(r"-v\d+$", name) else f"hindsight/{name}-v0"


def export_minari(dataset: Dataset, output: str, *, dataset_id: str | None = None) -> ExportResult:
    """Write `dataset` as a Minari dataset at `output` (a local directory)."""
    import h5py

    if storage.is_s3(output):
        raise ExportError(f"{output}: minari reads local directories only; export to a path")
    dataset_id = dataset_id or default_dataset_id(output)
    if not _DATASET_ID.match(dataset_id):
        raise ExportError(
            f"--dataset-id {dataset_id!r}: Minari ids are (namespace/)name-vN, e.g. "
            "hindsight/pendulum-rl-v0"
        )
    steps_schema = dataset.arrow_schema("steps")
    for needed in (cols.OBSERVATION, cols.ACTION):
        if needed not in steps_schema.names:
            raise ExportError(f"{dataset.uri}: Minari needs the step column {needed!r}")
    columns = divide_columns(dataset)
    has_rewards = dataset.rewards_known
    info_columns = columns.numbers + columns.texts
    step_columns = [
        c for c in steps_schema.names if c in (*cols.STEP_CORE_COLUMNS, cols.NEXT_OBSERVATION)
    ] + info_columns
    episodes_schema = dataset.arrow_schema("episodes")
    attribute_columns = [
        f.name
        for f in episodes_schema
        if pa.types.is_integer(f.type)
        or pa.types.is_floating(f.type)
        or pa.types.is_boolean(f.type)
        or is_text_type(f.type)
    ]
    observation_space, action_space, env_spec = spaces_of(dataset, steps_schema)
    with VersionWriter(output, commit_file=COMMIT_FILE) as writer:
        data_path = storage.join(writer.uri, DATA_FILE)
        os.makedirs(os.path.dirname(data_path), exist_ok=True)
        # h5py writes a local file in place: under a temporary name in the staging
        # directory, renamed once whole (an abort removes it with the rest).
        temporary = f"{data_path}.tmp-{uuid.uuid4().hex[:8]}"
        next_index = 0
        final_observations_known = cols.NEXT_OBSERVATION in steps_schema.names
        total_steps = 0
        # track_order: groups listed in creation order, as minari writes them.
        with h5py.File(temporary, "w", track_order=True) as handle:
            for part in range(dataset.num_parts):
                writer.check_fence()
                steps = dataset.read_part(part, "steps", step_columns)
                episodes = dataset.read_part(part, "episodes", attribute_columns)
                next_index = write_episodes(
                    handle, steps, episodes, columns, info_columns, has_rewards, next_index
                )
                total_steps += steps.num_rows
        writer.check_fence()
        os.replace(temporary, data_path)
        data_bytes = os.path.getsize(data_path)
        metadata = {
            "dataset_id": dataset_id,
            "total_episodes": next_index,
            "total_steps": total_steps,
            "data_format": "hdf5",
            "jpeg_encoding": False,
            "observation_space": json.dumps(observation_space),
            "action_space": json.dumps(action_space),
            "minari_version": MINARI_FORMAT_VERSION,
            "dataset_size": round(data_bytes / 1e6, 1),
            "algorithm_name": "hindsight export",
            # Not the command line: it names the output, and a re-run elsewhere must
            # write the same bytes.
            "description": f"Exported by hindsight from {dataset.uri} "
            f"(dataset {dataset.manifest.dataset_id})",
            "author": ["hindsight"],
        }
        if env_spec is not None:
            metadata["env_spec"] = env_spec
        data = json.dumps(metadata, indent=2, sort_keys=True).encode()
        writer.commit(data)
    return ExportResult(
        format="minari",
        output=writer.uri,
        episodes=next_index,
        steps=total_steps,
        bytes=data_bytes + len(data),
        files=2,
        # Minari's image observations replace the state: camera frames have no place here.
        skipped_columns=columns.skipped + [FRAME_PREFIX + camera for camera in columns.cameras],
        details={
            "dataset_id": dataset_id,
            "info_keys": info_columns,
            "final_observation": "recorded" if final_observations_known else FINAL_REPEATED,
        },
    )


# What an episode's last observation row is when the data recorded none after its last step.
FINAL_REPEATED = "repeated: the source recorded no observation after the last step"


def write_episodes(
    handle,
    steps: pa.Table,
    episodes: pa.Table,
    columns: Columns,
    info_columns: list[str],
    has_rewards: bool,
    first_index: int,
) -> int:
    """One part's episodes as groups `episode_<first_index>`...; the next free index."""
    step_ids = cols.arrow_to_numpy(steps.column(cols.EPISODE_ID))
    episode_ids = cols.arrow_to_numpy(episodes.column(cols.EPISODE_ID))
    lengths = episode_lengths(step_ids, episode_ids)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    observation = leaf_arrays(steps.column(cols.OBSERVATION))
    # Logs such as LeRobot's record no observation after the last step: Minari's n + 1st
    # row then repeats the last one, and the episode says so (`final_observation`).
    known = cols.NEXT_OBSERVATION in steps.column_names
    next_observation = leaf_arrays(steps.column(cols.NEXT_OBSERVATION)) if known else observation
    action = column_values(steps.column(cols.ACTION))
    if has_rewards:
        reward = column_values(steps.column(cols.REWARD))
    else:
        reward = np.full(steps.num_rows, np.nan, np.float32)
    terminated = flags(steps, cols.TERMINATED)
    truncated = flags(steps, cols.TRUNCATED)
    infos = {name: info_values(steps.column(name)) for name in info_columns}
    attributes = episodes.to_pylist()
    for k, (start, end) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
        index = first_index + k
        group = handle.create_group(f"episode_{index}", track_order=True)
        group.attrs["id"] = index
        group.attrs["total_steps"] = int(end - start)
        if not known:
            group.attrs["final_observation"] = FINAL_REPEATED
        for name, value in attributes[k].items():
            if value is not None:  # h5py has no null attribute; absent means unknown
                group.attrs[name] = value
        write_leaves(
            group,
            "observations",
            {
                key: np.concatenate([values[start:end], next_observation[key][end - 1 : end]])
                for key, values in observation.items()
            },
        )
        group.create_dataset("actions", data=action[start:end])
        group.create_dataset("rewards", data=reward[start:end])
        group.create_dataset("terminations", data=terminated[start:end])
        group.create_dataset("truncations", data=truncated[start:end])
        if infos:
            info_group = group.create_group("infos", track_order=True)
            for name, (values, reset) in infos.items():
                with_reset = np.concatenate([reset, values[start:end]])
                # values.dtype: concatenate drops h5py's string marker from text dtypes
                info_group.create_dataset(name, data=with_reset, dtype=values.dtype)
    return first_index + len(lengths)


def leaf_arrays(column: pa.ChunkedArray) -> dict[str | None, np.ndarray]:
    """An observation column as {None: array} or, for a struct, {field: array}."""
    if pa.types.is_struct(column.type):
        return {f.name: cols.struct_to_numpy(column, f.name) for f in column.type}
    return {None: column_values(column)}


def write_leaves(group, name: str, leaves: dict[str | None, np.ndarray]) -> None:
    if list(leaves) == [None]:
        group.create_dataset(name, data=leaves[None])
        return
    inner = group.create_group(name, track_order=True)
    for key, values in leaves.items():
        inner.create_dataset(key, data=values)


def info_values(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A step column as Minari info values and the reset's row before them."""
    import h5py

    if is_text_type(column.type):
        values = np.array(
            ["" if v is None else v for v in column.to_pylist()], dtype=h5py.string_dtype()
        )
        return values, np.array([""], dtype=h5py.string_dtype())
    values = column_values(column)
    if values.dtype.kind == "f":
        reset = np.full((1, *values.shape[1:]), np.nan, values.dtype)
    else:
        reset = np.zeros((1, *values.shape[1:]), values.dtype)
    return values, reset


# ---------------------------------------------------------------- spaces


def spaces_of(dataset: Dataset, schema: pa.Schema) -> tuple[dict, dict, str | None]:
    """The observation and action spaces in minari's serialized form, and the env spec:
    the env's own when its id is a registered gymnasium env whose spaces match the data's
    shapes, else Box spaces with infinite bounds (Discrete for integer actions)."""
    observation = space_of_type(schema.field(cols.OBSERVATION).type)
    action = space_of_type(schema.field(cols.ACTION).type, dataset)
    env_id = single_env_id(dataset)
    if env_id is None:
        return observation, action, None
    try:
        import gymnasium as gym

        import engine.envs  # noqa: F401  (registers hindsight's own envs: PointGoal)

        spec = gym.spec(env_id)
        env = gym.make(env_id)
    except Exception:  # not registered here (a custom env, a missing extra): no env spec
        return observation, action, None
    try:
        env_observation = serialized_space(env.observation_space)
        env_action = serialized_space(env.action_space)
    finally:
        env.close()
    if same_shape(env_observation, observation) and same_shape(env_action, action):
        observation, action = env_observation, env_action
    try:
        env_spec = spec.to_json()
    except (TypeError, ValueError):
        env_spec = None
    return observation, action, env_spec


def space_of_type(kind: pa.DataType, dataset: Dataset | None = None) -> dict:
    if pa.types.is_struct(kind):
        return {"type": "Dict", "subspaces": {f.name: space_of_type(f.type) for f in kind}}
    if is_vector_type(kind):
        return box(kind.value_type, [kind.list_size])
    if pa.types.is_integer(kind) and dataset is not None:
        high = max(
            int(np.max(column_values(dataset.read_part(i, "steps", [cols.ACTION]).column(0))))
            for i in range(dataset.num_parts)
        )
        return {"type": "Discrete", "dtype": "int64", "start": 0, "n": high + 1}
    return box(kind, [])


def box(value_type: pa.DataType, shape: list[int]) -> dict:
    dtype = np.dtype(value_type.to_pandas_dtype())
    size = int(np.prod(shape)) if shape else 1
    low = np.full(size, -np.inf).tolist()
    high = np.full(size, np.inf).tolist()
    return {
        "type": "Box",
        "dtype": str(dtype),
        "shape": shape,
        "low": low if shape else low[0],
        "high": high if shape else high[0],
    }


def serialized_space(space) -> dict:
    from gymnasium import spaces

    if isinstance(space, spaces.Dict):
        return {
            "type": "Dict",
            "subspaces": {k: serialized_space(s) for k, s in space.spaces.items()},
        }
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "dtype": "int64", "start": int(space.start), "n": int(space.n)}
    if isinstance(space, spaces.Box):
        return {
            "type": "Box",
            "dtype": str(space.dtype),
            "shape": list(space.shape),
            "low": space.low.tolist(),
            "high": space.high.tolist(),
        }
    return {"type": "unsupported"}


def same_shape(a: dict, b: dict) -> bool:
    if a["type"] != b["type"]:
        return False
    if a["type"] == "Dict":
        return a["subspaces"].keys() == b["subspaces"].keys() and all(
            same_shape(a["subspaces"][k], b["subspaces"][k]) for k in a["subspaces"]
        )
    if a["type"] == "Box":
        return list(a["shape"]) == list(b["shape"]) and a["dtype"] == b["dtype"]
    return a["type"] == "Discrete"
