"""Ingest trajectories from the formats people already have.

Formats (one reader each, chosen by `--format` or the file name):

- `d4rl`: flat arrays in HDF5 (h5py) or NPZ: `observations`, `actions`, `rewards`,
  `terminals`, optional `timeouts`, `next_observations`, `infos/*` (and `metadata/*`,
  recorded in the manifest). Episodes end at a terminal or a timeout; a tail with neither is
  kept as a truncated episode and reported.
- `minari`: a Minari dataset directory (`data/main_data.hdf5`, one HDF5 group per episode),
  read with h5py so that minari itself is not needed to ingest.
- `parquet` / `jsonl`: step tables, one row per step, with an episode id and a step index
  column (names configurable). A file, a directory of files, or a glob.

Ingest runs in two passes. `plan_ingest` reads only what is cheap (episode boundaries,
rewards, info columns), validates, and cuts the source into parts of whole episodes.
`ingest_part` (one Ray task per part, see jobs/ingest_job.py) then reads its rows, builds
the Arrow tables and writes them with `engine.dataset.write_base_part`. Nothing is written
when validation fails, unless the user asked to skip bad episodes.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from engine import storage
from engine.validate import (
    Problem,
    ValidationError,
    changes_within_episodes,
    check_columns,
    check_finite,
    check_not_null,
    check_row_shapes,
    check_same_schema,
    check_step_index,
)
from engine.writer import DEFAULT_PART_STEPS, VersionWriter, WrittenPart, split_into_parts
from schemas import steps as cols

FORMATS = ("d4rl", "minari", "parquet", "jsonl")
ON_ERROR = ("fail", "skip")
# Rows read at once in the planning pass: memory stays flat however large the file.
CHUNK_ROWS = 1 << 20
D4RL_REQUIRED = ("observations", "actions", "rewards", "terminals")
D4RL_OPTIONAL = ("timeouts", "next_observations")


# ---------------------------------------------------------------- Arrow tables from arrays


def observation_to_arrow(values: Any) -> pa.Array:
    """Observations as float32 fixed-size lists; a dict of arrays becomes a struct."""
    if isinstance(values, dict):
        names = sorted(values)
        return pa.StructArray.from_arrays(
            [observation_to_arrow(values[name]) for name in names], names=names
        )
    values = np.asarray(values)
    if values.ndim == 1:
        values = values.reshape(-1, 1)
    return cols.vectors_to_arrow(values.astype(np.float32, copy=False))


def action_to_arrow(values: np.ndarray) -> pa.Array:
    """Discrete actions (1-D integers) as int64; everything else float32 fixed-size lists."""
    values = np.asarray(values)
    if values.ndim == 1 and np.issubdtype(values.dtype, np.integer):
        return pa.array(values.astype(np.int64, copy=False))
    if values.ndim == 1:
        values = values.reshape(-1, 1)
    return cols.vectors_to_arrow(values.astype(np.float32, copy=False))


def info_to_arrow(values: np.ndarray) -> pa.Array:
    """A per-step info array with its own dtype; vectors become fixed-size lists."""
    values = np.asarray(values)
    if values.dtype.kind in "SO":
        return pa.array([v.decode() if isinstance(v, bytes) else str(v) for v in values])
    if values.ndim == 1:
        return pa.array(values)
    return cols.vectors_to_arrow(values, pa.from_numpy_dtype(values.dtype))


def build_tables(
    *,
    episode_ids: np.ndarray,
    observation: Any,
    action: np.ndarray | pa.Array,
    reward: np.ndarray,
    terminated: np.ndarray,
    truncated: np.ndarray,
    env_id: str,
    source: str,
    next_observation: Any = None,
    infos: dict[str, np.ndarray | pa.Array] | None = None,
    episode_info_columns: tuple[str, ...] | list[str] = (),
    t: np.ndarray | None = None,
) -> tuple[pa.Table, pa.Table]:
    """The base step and episode tables of whole episodes given in (episode_id, t) order.

    Array arguments are NumPy (or already-converted Arrow) columns, one row per step.
    `episode_info_columns` are info columns constant within every episode: they are
    copied to the episodes table too (e.g. the noise level of the policy).
    """
    episode_ids = np.asarray(episode_ids, dtype=np.int64)
    boundaries = cols.episode_boundaries(episode_ids)
    starts, lengths = boundaries[:-1], np.diff(boundaries)
    if t is None:
        t = np.arange(len(episode_ids), dtype=np.int64) - np.repeat(starts, lengths)
    reward = np.asarray(reward, dtype=np.float32)

    def arrow(values, convert):
        return values if isinstance(values, pa.Array | pa.ChunkedArray) else convert(values)

    steps = {
        cols.EPISODE_ID: pa.array(episode_ids),
        cols.T: pa.array(np.asarray(t, dtype=np.int32)),
        cols.OBSERVATION: arrow(observation, observation_to_arrow),
        cols.ACTION: arrow(action, action_to_arrow),
        cols.REWARD: pa.array(reward),
        cols.TERMINATED: pa.array(np.asarray(terminated, dtype=bool)),
        cols.TRUNCATED: pa.array(np.asarray(truncated, dtype=bool)),
    }
    if next_observation is not None:
        steps[cols.NEXT_OBSERVATION] = arrow(next_observation, observation_to_arrow)
    for name, values in (infos or {}).items():
        steps[name] = arrow(values, info_to_arrow)
    steps_table = pa.table(steps)

    returns = np.add.reduceat(reward.astype(np.float64), starts) if len(starts) else np.zeros(0)
    episodes = {
        cols.EPISODE_ID: pa.array(episode_ids[starts]),
        cols.LENGTH: pa.array(lengths.astype(np.int64)),
        cols.RETURN: pa.array(returns.astype(np.float32)),
        cols.ENV_ID: pa.array([env_id] * len(starts), type=pa.string()),
        cols.SOURCE: pa.array([source] * len(starts), type=pa.string()),
    }
    for name in episode_info_columns:
        episodes[name] = steps_table.column(name).take(pa.array(starts))
    return steps_table, pa.table(episodes)


# ---------------------------------------------------------------- the plan


@dataclass
class IngestPlan:
    """What the cheap first pass found: parts to write, and what was left out and why."""

    format: str
    source: str
    env_id: str
    parts: list[dict[str, Any]]
    steps: int
    episodes: int
    skipped: list[Problem] = field(default_factory=list)
    truncated_tails: list[dict[str, Any]] = field(default_factory=list)
    episode_info_columns: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def skipped_report(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "skipped_episodes": len({p.episode for p in self.skipped if p.episode is not None}),
            "skipped": [p.to_dict() for p in self.skipped],
            "truncated_tails": self.truncated_tails,
        }


def detect_format(source: str) -> str:
    """The format implied by a path: extension, or a Minari dataset directory."""
    path = source.rstrip("/")
    lower = path.lower()
    if lower.endswith((".h5", ".hdf5", ".npz")):
        if os.path.basename(lower) == "main_data.hdf5":
            return "minari"
        return "d4rl"
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if storage.is_s3(path):
        names = [os.path.basename(f) for f in storage.list_files(path)]
        if "main_data.hdf5" in names or "metadata.json" in names:
            raise ValueError(f"{source}: Minari datasets must be local directories")
        if any(n.endswith(".parquet") for n in names):
            return "parquet"
        if any(n.endswith((".jsonl", ".ndjson")) for n in names):
            return "jsonl"
    elif os.path.isdir(path):
        if any(
            os.path.exists(os.path.join(path, *parts))
            for parts in (
                ("data", "main_data.hdf5"),
                ("main_data.hdf5",),
                ("data", "metadata.json"),
            )
        ):
            return "minari"
        names = os.listdir(path)
        if any(n.endswith(".parquet") for n in names):
            return "parquet"
        if any(n.endswith((".jsonl", ".ndjson")) for n in names):
            return "jsonl"
    raise ValueError(
        f"cannot tell the format of {source}; pass --format one of {', '.join(FORMATS)}"
    )


def plan_ingest(
    source: str,
    *,
    format: str | None = None,
    env_id: str | None = None,
    on_error: str = "fail",
    part_steps: int = DEFAULT_PART_STEPS,
    episode_column: str = cols.EPISODE_ID,
    step_column: str = cols.T,
) -> IngestPlan:
    """Read boundaries, validate, and cut the source into parts (nothing is written)."""
    if on_error not in ON_ERROR:
        raise ValueError(f"--on-error must be one of {ON_ERROR}, not {on_error!r}")
    format = format or detect_format(source)
    if format == "d4rl":
        plan = plan_flat_arrays(source, env_id, part_steps)
    elif format == "minari":
        plan = plan_minari(source, env_id, part_steps)
    elif format in ("parquet", "jsonl"):
        plan = plan_step_tables(source, format, env_id, part_steps, episode_column, step_column)
    else:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    fatal = [p for p in plan.skipped if p.episode is None]
    if fatal or (plan.skipped and on_error == "fail"):
        hint = (
            ""
            if fatal
            else "Re-run with --on-error skip to ingest the other episodes and write a report."
        )
        raise ValidationError(fatal or plan.skipped, hint)
    if plan.steps == 0:
        raise ValueError(f"{source}: no episodes left to ingest")
    return plan


def _part_ranges(lengths: np.ndarray, part_steps: int) -> list[tuple[int, int]]:
    return split_into_parts(np.asarray(lengths, dtype=np.int64), max(1, int(part_steps)))


def _source_label(format: str, path: str) -> str:
    return f"{format}:{os.path.basename(path.rstrip('/'))}"


def write_part(task: dict[str, Any], steps: pa.Table, episodes: pa.Table) -> WrittenPart:
    """Write part `task["index"]` of the base group with the run's `task["writer"]`."""
    writer: VersionWriter = task["writer"]
    return writer.write_part(task["index"], steps, episodes)


def ingest_part(task: dict[str, Any]) -> WrittenPart:
    """Read, convert and write one part (runs in a Ray task); returns the WrittenPart."""
    readers = {
        "d4rl": read_flat_arrays_part,
        "minari": read_minari_part,
        "parquet": read_step_table_part,
        "jsonl": read_step_table_part,
    }
    steps, episodes = readers[task["format"]](task)
    return write_part(task, steps, episodes)


# ---------------------------------------------------------------- D4RL flat arrays


class FlatArrays:
    """Named arrays of a D4RL-style file (HDF5 or NPZ), read by row range."""

    def __init__(self, path: str):
        self.path = path
        self.is_hdf5 = not path.lower().endswith(".npz")
        # On S3 both h5py and NumPy read through a seekable pyarrow file (range requests).
        self._stream = None
        target: Any = path
        try:
            if storage.is_s3(path):
                fs, key = storage.filesystem(path)
                self._stream = fs.open_input_file(key)
                target = self._stream
            if self.is_hdf5:
                import h5py

                self._file = h5py.File(target, "r")
                self._arrays: dict[str, Any] = {}
                self._file.visititems(self._collect)
            else:
                self._file = np.load(target, allow_pickle=False)
                self._arrays = {name: None for name in self._file.files}
        except FileNotFoundError:
            raise
        except Exception as error:
            raise ValueError(
                f"{path}: cannot read it as {'HDF5' if self.is_hdf5 else 'NPZ'} "
                f"(truncated or corrupt file?): {error}"
            ) from error
        self._loaded: dict[str, np.ndarray] = {}

    def _collect(self, name: str, item: Any) -> None:
        import h5py

        if isinstance(item, h5py.Dataset):
            self._arrays[name] = item

    @property
    def names(self) -> list[str]:
        return sorted(self._arrays)

    def _npz(self, name: str) -> np.ndarray:
        if name not in self._loaded:
            self._loaded[name] = self._file[name]
        return self._loaded[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._arrays[name].shape) if self.is_hdf5 else self._npz(name).shape

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        try:
            if self.is_hdf5:
                dataset = self._arrays[name]
                return dataset[start:stop] if dataset.shape else dataset[()]
            return self._npz(name)[start:stop]
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{self.path}: cannot read array {name!r} rows {start}..{stop} "
                f"(truncated or corrupt file?): {error}"
            ) from error

    def chunks(self, name: str, total: int):
        for start in range(0, total, CHUNK_ROWS):
            yield start, self.read(name, start, min(total, start + CHUNK_ROWS))

    def close(self) -> None:
        self._file.close()
        if self._stream is not None:
            self._stream.close()


def _episode_ends(terminals: np.ndarray, timeouts: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.asarray(terminals, bool) | np.asarray(timeouts, bool))


def plan_flat_arrays(path: str, env_id: str | None, part_steps: int) -> IngestPlan:
    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    arrays = FlatArrays(path)
    try:
        return _plan_flat_arrays(arrays, path, env_id, part_steps)
    finally:
        arrays.close()


def _plan_flat_arrays(
    arrays: FlatArrays, path: str, env_id: str | None, part_steps: int
) -> IngestPlan:
    names = arrays.names
    problems = check_columns(path, names, D4RL_REQUIRED, reserved=())
    known = set(D4RL_REQUIRED) | set(D4RL_OPTIONAL)
    info_names = [n for n in names if n.startswith("infos/")]
    metadata_names = [n for n in names if n.startswith("metadata/")]
    problems += [
        Problem(
            path,
            name,
            "unknown array; expected observations, actions, rewards, terminals, timeouts, "
            "next_observations, infos/*, metadata/*",
        )
        for name in names
        if name not in known and name not in info_names and name not in metadata_names
    ]
    if problems:
        return IngestPlan("d4rl", path, env_id or "", [], 0, 0, skipped=problems)
    total = arrays.shape("rewards")[0] if arrays.shape("rewards") else 0
    row_arrays = [n for n in names if n in known or n in info_names]
    for name in row_arrays:
        shape = arrays.shape(name)
        if not shape or shape[0] != total:
            problems.append(
                Problem(path, name, f"has {shape[0] if shape else 0} rows, but rewards has {total}")
            )
    for name in ("rewards", "terminals", "timeouts"):
        if name in names and len(arrays.shape(name)) != 1:
            problems.append(Problem(path, name, f"must be 1-D, has shape {arrays.shape(name)}"))
    if problems:
        return IngestPlan("d4rl", path, env_id or "", [], 0, 0, skipped=problems)

    terminals = arrays.read("terminals").astype(bool)
    timeouts = (
        arrays.read("timeouts").astype(bool) if "timeouts" in names else np.zeros(total, bool)
    )
    ends = _episode_ends(terminals, timeouts)
    truncated_tails = []
    if total and (len(ends) == 0 or ends[-1] != total - 1):
        tail_start = int(ends[-1]) + 1 if len(ends) else 0
        truncated_tails.append(
            {
                "file": path,
                "episode": len(ends),
                "steps": total - tail_start,
                "reason": "the last steps have neither a terminal nor a timeout; "
                "kept as a truncated episode",
            }
        )
        ends = np.concatenate([ends, [total - 1]])
    boundaries = np.concatenate([[0], ends + 1]).astype(np.int64)
    lengths = np.diff(boundaries)
    episode_of_row = np.repeat(np.arange(len(lengths)), lengths)

    for start, chunk in arrays.chunks("rewards", total):
        problems += check_finite(
            path, cols.REWARD, chunk, episode_of_row[start : start + len(chunk)]
        )
    starts_mask = np.zeros(total, bool)
    starts_mask[boundaries[:-1]] = True
    episode_info_columns = []
    for name in info_names:
        changes = False
        previous = None
        for start, chunk in arrays.chunks(name, total):
            joined = chunk if previous is None else np.concatenate([previous, chunk])
            offset = start - (0 if previous is None else 1)
            if changes_within_episodes(joined, starts_mask[offset : offset + len(joined)]):
                changes = True
                break
            previous = chunk[-1:]
        if not changes:
            episode_info_columns.append(_info_column_name(name))

    metadata = {}
    for name in metadata_names:
        value = arrays.read(name)
        if np.ndim(value) == 0:
            value = value.item() if isinstance(value, np.generic | np.ndarray) else value
            metadata[name.removeprefix("metadata/")] = (
                value.decode() if isinstance(value, bytes) else value
            )

    bad_episodes = sorted({p.episode for p in problems if p.episode is not None})
    keep = np.ones(len(lengths), bool)
    keep[bad_episodes] = False
    kept = np.flatnonzero(keep)
    parts = []
    for start, stop in _part_ranges(lengths[kept], part_steps):
        first, last = int(kept[start]), int(kept[stop - 1])
        parts.append(
            {
                "format": "d4rl",
                "path": path,
                "row_start": int(boundaries[first]),
                "row_stop": int(boundaries[last + 1]),
                "first_episode": first,
                "skip_episodes": [int(e) for e in bad_episodes if first <= e <= last],
                "episode_info_columns": episode_info_columns,
                "steps": int(lengths[kept[start:stop]].sum()),
            }
        )
    return IngestPlan(
        format="d4rl",
        source=path,
        env_id=env_id or str(metadata.get("env_id", metadata.get("env", "")) or "unknown"),
        parts=parts,
        steps=int(lengths[kept].sum()),
        episodes=len(kept),
        skipped=problems,
        truncated_tails=truncated_tails,
        episode_info_columns=episode_info_columns,
        metadata={"source_metadata": metadata} if metadata else {},
    )


def _info_column_name(name: str) -> str:
    """`infos/goal` -> `goal`; nested paths keep their inner slashes as dots."""
    return name.removeprefix("infos/").replace("/", ".")


def read_flat_arrays_part(task: dict[str, Any]) -> tuple[pa.Table, pa.Table]:
    arrays = FlatArrays(task["path"])
    try:
        start, stop = task["row_start"], task["row_stop"]
        total = arrays.shape("rewards")[0]
        terminals = arrays.read("terminals", start, stop).astype(bool)
        timeouts = (
            arrays.read("timeouts", start, stop).astype(bool)
            if "timeouts" in arrays.names
            else np.zeros(stop - start, bool)
        )
        truncated = timeouts.copy()
        if stop == total and not (terminals[-1] or timeouts[-1]):
            truncated[-1] = True  # the reported tail: kept as a truncated episode
        ends = _episode_ends(terminals, truncated)
        lengths = np.diff(np.concatenate([[0], ends + 1]))
        episode_ids = np.repeat(task["first_episode"] + np.arange(len(lengths)), lengths)
        rows = (
            ~np.isin(episode_ids, task["skip_episodes"]) if task["skip_episodes"] else slice(None)
        )
        infos = {
            _info_column_name(name): arrays.read(name, start, stop)[rows]
            for name in arrays.names
            if name.startswith("infos/")
        }
        return build_tables(
            episode_ids=episode_ids[rows],
            observation=arrays.read("observations", start, stop)[rows],
            action=arrays.read("actions", start, stop)[rows],
            reward=arrays.read("rewards", start, stop)[rows],
            terminated=terminals[rows],
            truncated=truncated[rows],
            next_observation=(
                arrays.read("next_observations", start, stop)[rows]
                if "next_observations" in arrays.names
                else None
            ),
            infos=infos,
            episode_info_columns=task["episode_info_columns"],
            env_id=task["env_id"],
            source=task["source"],
        )
    finally:
        arrays.close()


# ---------------------------------------------------------------- Minari


@dataclass(frozen=True)
class MinariSource:
    """Where a Minari dataset's data lives and in which of Minari's storage formats."""

    data_dir: str
    data_format: str  # "hdf5" (read with h5py) or "arrow" (read with minari's API)
    env_id: str | None


def minari_source(path: str) -> MinariSource:
    """A Minari dataset directory (or its `data` folder, or `main_data.hdf5`)."""
    path = path.rstrip("/")
    if os.path.isfile(path):
        path = os.path.dirname(path)
    for data_dir in (os.path.join(path, "data"), path):
        metadata_file = os.path.join(data_dir, "metadata.json")
        hdf5_file = os.path.join(data_dir, "main_data.hdf5")
        if os.path.isfile(metadata_file) or os.path.isfile(hdf5_file):
            metadata = {}
            if os.path.isfile(metadata_file):
                with open(metadata_file) as handle:
                    metadata = json.load(handle)
            spec = metadata.get("env_spec")
            if isinstance(spec, str):
                spec = json.loads(spec)
            return MinariSource(
                data_dir=data_dir,
                data_format=metadata.get("data_format", "hdf5"),
                env_id=(spec or {}).get("id"),
            )
    raise FileNotFoundError(
        f"{path}: not a Minari dataset directory (no data/metadata.json or data/main_data.hdf5)"
    )


def _h5_tree(item: Any, shapes_only: bool = False) -> Any:
    """An HDF5 group as a dict of its datasets (nested groups as nested dicts)."""
    import h5py

    if isinstance(item, h5py.Dataset):
        return np.empty(item.shape, dtype=bool) if shapes_only else item[()]
    return {name: _h5_tree(item[name], shapes_only) for name in item}


def minari_episodes(
    source: MinariSource, episode_ids: list[int] | None = None, shapes_only: bool = False
):
    """Episodes as dicts (id, observations, actions, rewards, terminations, truncations,
    infos) in Minari's own layout: n+1 observations and infos, n of everything else.

    HDF5 datasets are read with h5py (minari is not needed; `shapes_only` reads no
    observation or action data); other formats with minari's storage API.
    """
    if source.data_format == "hdf5":
        import h5py

        data_file = os.path.join(source.data_dir, "main_data.hdf5")
        try:
            handle = h5py.File(data_file, "r")
        except OSError as error:
            raise ValueError(
                f"{data_file}: cannot read it as HDF5 (truncated or corrupt file?): {error}"
            ) from error
        with handle:
            names = (
                _minari_episode_names(handle)
                if episode_ids is None
                else [f"episode_{e}" for e in episode_ids]
            )
            for name in names:
                group = handle[name]
                episode = {"id": int(group.attrs.get("id", int(name.removeprefix("episode_"))))}
                try:
                    for key in group:
                        lazy = shapes_only and key in ("observations", "actions")
                        episode[key] = _h5_tree(group[key], shapes_only=lazy)
                except (OSError, KeyError) as error:
                    episode["error"] = f"cannot read episode (truncated file?): {error}"
                yield episode
        return
    try:
        from minari.dataset.minari_storage import MinariStorage
    except ImportError as error:
        raise ValueError(
            f"{source.data_dir}: Minari datasets in the {source.data_format!r} format are read "
            "with minari's API; install it with `pip install hindsight-engine[minari]`"
        ) from error
    storage = MinariStorage.read(source.data_dir)
    ids = list(range(storage.total_episodes)) if episode_ids is None else episode_ids
    for episode in storage.get_episodes(ids):
        yield {**episode, "id": int(episode["id"])}


def _minari_step_infos(infos: dict[str, Any], length: int) -> dict[str, np.ndarray]:
    """Minari stores n+1 infos (reset, then one per step): keep the one of each step."""
    flat = {}
    for name, values in infos.items():
        if isinstance(values, dict):
            for inner, inner_values in _minari_step_infos(values, length).items():
                flat[f"{name}.{inner}"] = inner_values
            continue
        values = np.asarray(values)
        flat[name] = values[1:] if len(values) == length + 1 else values
    return flat


def _minari_episode_names(handle: Any) -> list[str]:
    names = [n for n in handle if n.startswith("episode_")]
    return sorted(names, key=lambda n: int(n.removeprefix("episode_")))


def _check_minari_episode(file: str, episode: dict[str, Any]) -> list[Problem]:
    """Lengths of one episode's arrays agree (n+1 observations, n of the rest)."""
    episode_id = episode["id"]
    if "error" in episode:
        return [Problem(file, "episode", episode["error"], episode_id)]
    problems = [
        Problem(file, column, "is missing", episode_id)
        for column in ("observations", "actions", "rewards", "terminations", "truncations")
        if column not in episode
    ]
    if problems:
        return problems
    length = len(episode["rewards"])
    for column in ("actions", "terminations", "truncations"):
        actual = len(_first_leaf(episode[column]))
        if actual != length:
            problems.append(
                Problem(file, column, f"has {actual} rows, rewards has {length}", episode_id)
            )
    observations = episode["observations"]
    for key, values in (
        observations.items() if isinstance(observations, dict) else [("", observations)]
    ):
        if len(values) != length + 1:
            problems.append(
                Problem(
                    file,
                    f"observations{'/' + key if key else ''}",
                    f"has {len(values)} rows, expected {length + 1} (steps + 1)",
                    episode_id,
                )
            )
    return problems


def _first_leaf(values: Any) -> Any:
    while isinstance(values, dict):
        values = next(iter(values.values()))
    return values


def plan_minari(path: str, env_id: str | None, part_steps: int) -> IngestPlan:
    source = minari_source(path)
    file = (
        os.path.join(source.data_dir, "main_data.hdf5")
        if source.data_format == "hdf5"
        else source.data_dir
    )
    problems: list[Problem] = []
    episode_ids, lengths = [], []
    info_changes: dict[str, bool] = {}
    for episode in minari_episodes(source, shapes_only=True):
        found = _check_minari_episode(file, episode)
        problems += found
        if found:
            continue
        episode_id = episode["id"]
        rewards = np.asarray(episode["rewards"])
        length = len(rewards)
        problems += check_finite(file, cols.REWARD, rewards, np.full(length, episode_id))
        starts = np.zeros(length, bool)
        starts[:1] = True
        for name, values in _minari_step_infos(episode.get("infos", {}), length).items():
            if len(values) != length:
                problems.append(
                    Problem(
                        file,
                        f"infos/{name}",
                        f"has {len(values)} rows, expected {length}",
                        episode_id,
                    )
                )
                continue
            info_changes[name] = info_changes.get(name, False) or changes_within_episodes(
                values, starts
            )
        episode_ids.append(episode_id)
        lengths.append(length)
    bad = {p.episode for p in problems}
    kept = [i for i, e in enumerate(episode_ids) if e not in bad]
    kept_lengths = np.asarray([lengths[i] for i in kept], dtype=np.int64)
    episode_info_columns = sorted(n for n, changes in info_changes.items() if not changes)
    parts = [
        {
            "format": "minari",
            "path": path,
            "episodes": [episode_ids[i] for i in kept[start:stop]],
            "episode_info_columns": episode_info_columns,
            "steps": int(kept_lengths[start:stop].sum()),
        }
        for start, stop in _part_ranges(kept_lengths, part_steps)
    ]
    return IngestPlan(
        format="minari",
        source=path,
        env_id=env_id or source.env_id or "unknown",
        parts=parts,
        steps=int(kept_lengths.sum()),
        episodes=len(kept),
        skipped=problems,
        episode_info_columns=episode_info_columns,
        metadata={"minari_data_format": source.data_format},
    )


def read_minari_part(task: dict[str, Any]) -> tuple[pa.Table, pa.Table]:
    source = minari_source(task["path"])
    columns: dict[str, list] = {
        k: [] for k in ("episode_ids", "obs", "next_obs", "actions", "rewards", "term", "trunc")
    }
    infos: dict[str, list] = {}
    for episode in minari_episodes(source, sorted(task["episodes"])):
        rewards = np.asarray(episode["rewards"])
        length = len(rewards)
        observations = episode["observations"]
        if isinstance(observations, dict):
            columns["obs"].append({k: np.asarray(v)[:-1] for k, v in observations.items()})
            columns["next_obs"].append({k: np.asarray(v)[1:] for k, v in observations.items()})
        else:
            columns["obs"].append(np.asarray(observations)[:-1])
            columns["next_obs"].append(np.asarray(observations)[1:])
        columns["episode_ids"].append(np.full(length, episode["id"], dtype=np.int64))
        columns["actions"].append(np.asarray(episode["actions"]))
        columns["rewards"].append(rewards)
        terminated = np.asarray(episode["terminations"], dtype=bool)
        truncated = np.asarray(episode["truncations"], dtype=bool).copy()
        if length and not (truncated[-1] or terminated[-1]):
            truncated[-1] = True  # an episode cut off without a flag: truncated
        columns["term"].append(terminated)
        columns["trunc"].append(truncated)
        for name, values in _minari_step_infos(episode.get("infos", {}), length).items():
            infos.setdefault(name, []).append(values)

    def concat(pieces):
        if pieces and isinstance(pieces[0], dict):
            return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
        return np.concatenate(pieces)

    return build_tables(
        episode_ids=concat(columns["episode_ids"]),
        observation=concat(columns["obs"]),
        next_observation=concat(columns["next_obs"]),
        action=concat(columns["actions"]),
        reward=concat(columns["rewards"]),
        terminated=concat(columns["term"]),
        truncated=concat(columns["trunc"]),
        infos={name: concat(values) for name, values in infos.items()},
        episode_info_columns=task["episode_info_columns"],
        env_id=task["env_id"],
        source=task["source"],
    )


# ---------------------------------------------------------------- Parquet / JSON Lines step tables

STEP_TABLE_VECTOR_COLUMNS = (cols.OBSERVATION, cols.ACTION, cols.NEXT_OBSERVATION)


def step_table_files(source: str, format: str) -> list[str]:
    """A file, every file of the format in a directory, or a glob; sorted. Local or S3."""
    suffixes = (".parquet",) if format == "parquet" else (".jsonl", ".ndjson", ".json")
    if any(ch in source for ch in "*?["):
        if storage.is_s3(source):
            first = min(source.index(ch) for ch in "*?[" if ch in source)
            parent = source[: source.rindex("/", 0, first)]
            files = [f for f in storage.list_files(parent) if fnmatch.fnmatch(f, source)]
        else:
            files = sorted(glob.glob(source))
    elif storage.is_s3(source):
        fs, key = storage.filesystem(source)
        if fs.get_file_info(key).type == pafs.FileType.File:
            files = [source]
        else:
            files = [f for f in storage.list_files(source) if f.endswith(suffixes)]
    elif os.path.isdir(source):
        files = sorted(os.path.join(source, n) for n in os.listdir(source) if n.endswith(suffixes))
    elif os.path.exists(source):
        files = [source]
    else:
        raise FileNotFoundError(f"{source}: no such file or directory")
    if not files:
        raise FileNotFoundError(f"{source}: no {format} files found")
    return files


def read_step_file(
    path: str, format: str, columns: list[str] | None = None, filters: Any = None
) -> pa.Table:
    """One step-table file as Arrow, with a clear error for a truncated or corrupt file."""
    fs, key = storage.filesystem(path)
    try:
        if format == "parquet":
            return pq.read_table(key, filesystem=fs, columns=columns, filters=filters)
        with fs.open_input_stream(key) as stream:
            table = pajson.read_json(stream)
        return table.select(columns) if columns else table
    except (pa.ArrowInvalid, OSError) as error:
        raise ValueError(
            f"{path}: cannot read it as {format} (truncated or corrupt file?): {error}"
        ) from error


def step_file_schema(path: str, format: str) -> pa.Schema:
    if format == "parquet":
        fs, key = storage.filesystem(path)
        try:
            return pq.read_schema(key, filesystem=fs)
        except (pa.ArrowInvalid, OSError) as error:
            raise ValueError(
                f"{path}: cannot read it as parquet (truncated or corrupt file?): {error}"
            ) from error
    return read_step_file(path, format).schema


def plan_step_tables(
    source: str,
    format: str,
    env_id: str | None,
    part_steps: int,
    episode_column: str,
    step_column: str,
) -> IngestPlan:
    files = step_table_files(source, format)
    required = [
        episode_column,
        step_column,
        cols.OBSERVATION,
        cols.ACTION,
        cols.REWARD,
        cols.TERMINATED,
        cols.TRUNCATED,
    ]
    problems: list[Problem] = []
    reference: dict[str, str] | None = None
    schemas = {}
    for path in files:
        schema = step_file_schema(path, format)
        schemas[path] = schema
        types = {f.name: str(f.type) for f in schema}
        problems += check_columns(path, schema.names, required)
        if reference is None:
            reference, reference_file = types, path
        else:
            problems += check_same_schema(reference_file, reference, path, types)
    if problems:
        return IngestPlan(format, source, env_id or "unknown", [], 0, 0, skipped=problems)

    info_names = [
        n for n in schemas[files[0]].names if n not in required and n != cols.NEXT_OBSERVATION
    ]
    vector_names = [n for n in STEP_TABLE_VECTOR_COLUMNS if n in schemas[files[0]].names]
    expected_sizes: dict[str, int] = {}
    seen_in: dict[int, str] = {}
    info_changes = dict.fromkeys(info_names, False)
    file_plans = []
    for path in files:
        list_vectors = [
            n
            for n in vector_names
            if pa.types.is_list(schemas[path].field(n).type)
            or pa.types.is_large_list(schemas[path].field(n).type)
        ]
        table = read_step_file(
            path,
            format,
            [
                episode_column,
                step_column,
                cols.REWARD,
                cols.TERMINATED,
                cols.TRUNCATED,
                *info_names,
                *list_vectors,
            ],
        )
        episode_ids = table.column(episode_column)
        if not pa.types.is_integer(episode_ids.type):
            problems.append(
                Problem(path, episode_column, f"must hold integers, has type {episode_ids.type}")
            )
            continue
        valid_ids = pc.is_valid(episode_ids).to_numpy(zero_copy_only=False)
        if not valid_ids.all():
            problems.append(
                Problem(
                    path, episode_column, f"{int((~valid_ids).sum())} row(s) have no episode id"
                )
            )
            continue
        episode_ids = episode_ids.to_numpy().astype(np.int64)
        t_column = table.column(step_column)
        t = pc.fill_null(t_column, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        order = np.lexsort((t, episode_ids))
        sorted_ids = episode_ids[order]
        problems += check_not_null(
            path, step_column, pc.is_valid(t_column).to_numpy(zero_copy_only=False), episode_ids
        )
        problems += check_step_index(path, sorted_ids, t[order], step_column)
        reward_column = table.column(cols.REWARD)
        problems += check_not_null(
            path,
            cols.REWARD,
            pc.is_valid(reward_column).to_numpy(zero_copy_only=False),
            episode_ids,
        )
        problems += check_finite(
            path,
            cols.REWARD,
            pc.fill_null(reward_column.cast(pa.float64()), 0.0).to_numpy(),
            episode_ids,
        )
        for name in (cols.TERMINATED, cols.TRUNCATED):
            column = table.column(name)
            if not pa.types.is_boolean(column.type):
                problems.append(Problem(path, name, f"must be boolean, has type {column.type}"))
            problems += check_not_null(
                path, name, pc.is_valid(column).to_numpy(zero_copy_only=False), episode_ids
            )
        for name in list_vectors:
            column = table.column(name)
            valid = pc.is_valid(column).to_numpy(zero_copy_only=False)
            problems += check_not_null(path, name, valid, episode_ids)
            sizes = pc.fill_null(pc.list_value_length(column), -1).to_numpy()
            if valid.any():
                expected_sizes.setdefault(name, int(sizes[np.argmax(valid)]))
            expected = expected_sizes.get(name, 0)
            sizes = np.where(valid, sizes, expected)  # missing rows are reported above
            problems += check_row_shapes(path, name, sizes, expected, episode_ids)
        starts = np.ones(len(sorted_ids), bool)
        starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
        for name in info_names:
            column = table.column(name)
            if pa.types.is_nested(column.type):
                values = np.asarray(column.to_pylist(), dtype=object)
                values = np.asarray([json.dumps(v) for v in values[order]])
            else:
                values = column.to_numpy(zero_copy_only=False)[order]
            info_changes[name] = info_changes[name] or changes_within_episodes(values, starts)
        unique_ids, first_rows, counts = np.unique(
            sorted_ids, return_index=True, return_counts=True
        )
        for episode in unique_ids.tolist():
            if episode in seen_in:
                problems.append(
                    Problem(
                        path,
                        episode_column,
                        f"episode also appears in {seen_in[episode]}; each episode must be "
                        "in one file",
                        episode,
                    )
                )
        for episode in unique_ids.tolist():
            seen_in.setdefault(episode, path)
        file_plans.append((path, unique_ids, counts))

    # Episode ids name one episode across the whole source: an episode with a problem in
    # any file (or spread over two files) is left out everywhere.
    bad = {p.episode for p in problems if p.episode is not None}
    episode_info_columns = [n for n, changes in info_changes.items() if not changes]
    parts: list[dict[str, Any]] = []
    steps = episodes = 0
    for path, unique_ids, counts in file_plans:
        keep = ~np.isin(unique_ids, np.fromiter(bad, dtype=np.int64, count=len(bad)))
        kept_ids, kept_counts = unique_ids[keep], counts[keep]
        steps += int(kept_counts.sum())
        episodes += len(kept_ids)
        for start, stop in _part_ranges(kept_counts, part_steps):
            low, high = int(kept_ids[start]), int(kept_ids[stop - 1])
            inside = (unique_ids >= low) & (unique_ids <= high) & ~keep
            parts.append(
                {
                    "format": format,
                    "path": path,
                    "episode_column": episode_column,
                    "step_column": step_column,
                    "episode_min": low,
                    "episode_max": high,
                    "skip_episodes": [int(e) for e in unique_ids[inside]],
                    "episode_info_columns": episode_info_columns,
                    "steps": int(kept_counts[start:stop].sum()),
                }
            )
    # Parts in episode order, so that the dataset is sorted by episode id where the
    # source allows it.
    parts.sort(key=lambda part: part["episode_min"])
    return IngestPlan(
        format=format,
        source=source,
        env_id=env_id or "unknown",
        parts=parts,
        steps=steps,
        episodes=episodes,
        skipped=problems,
        episode_info_columns=episode_info_columns,
    )


def _vector_column(column: pa.ChunkedArray, value_type: pa.DataType = pa.float32()) -> pa.Array:
    """A list, fixed-size list or scalar column as a fixed-size list of `value_type`."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_struct(array.type):
        names = [array.type.field(i).name for i in range(array.type.num_fields)]
        return pa.StructArray.from_arrays(
            [_vector_column(array.field(n), value_type) for n in names], names=names
        )
    if pa.types.is_fixed_size_list(array.type):
        return pa.FixedSizeListArray.from_arrays(
            array.flatten().cast(value_type), array.type.list_size
        )
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        size = len(array.flatten()) // len(array) if len(array) else 0
        return pa.FixedSizeListArray.from_arrays(array.flatten().cast(value_type), size)
    return pa.FixedSizeListArray.from_arrays(array.cast(value_type), 1)


def read_step_table_part(task: dict[str, Any]) -> tuple[pa.Table, pa.Table]:
    episode_column, step_column = task["episode_column"], task["step_column"]
    filters = [
        (episode_column, ">=", task["episode_min"]),
        (episode_column, "<=", task["episode_max"]),
    ]
    table = read_step_file(
        task["path"], task["format"], filters=filters if task["format"] == "parquet" else None
    )
    episode_ids = table.column(episode_column).cast(pa.int64())
    mask = pc.and_(
        pc.greater_equal(episode_ids, task["episode_min"]),
        pc.less_equal(episode_ids, task["episode_max"]),
    )
    if task["skip_episodes"]:
        mask = pc.and_(mask, pc.invert(pc.is_in(episode_ids, pa.array(task["skip_episodes"]))))
    table = table.filter(mask)
    table = table.take(
        pc.sort_indices(table, [(episode_column, "ascending"), (step_column, "ascending")])
    )
    action = table.column(cols.ACTION)
    if pa.types.is_integer(action.type):
        action = action.combine_chunks().cast(pa.int64())
    else:
        action = _vector_column(action)
    core = {episode_column, step_column, *STEP_TABLE_VECTOR_COLUMNS, cols.REWARD}
    core |= {cols.TERMINATED, cols.TRUNCATED}
    infos = {
        name: table.column(name).combine_chunks() for name in table.column_names if name not in core
    }
    return build_tables(
        episode_ids=table.column(episode_column).to_numpy().astype(np.int64),
        t=table.column(step_column).to_numpy(),
        observation=_vector_column(table.column(cols.OBSERVATION)),
        action=action,
        reward=table.column(cols.REWARD).to_numpy(),
        terminated=table.column(cols.TERMINATED).to_numpy(zero_copy_only=False),
        truncated=table.column(cols.TRUNCATED).to_numpy(zero_copy_only=False),
        next_observation=(
            _vector_column(table.column(cols.NEXT_OBSERVATION))
            if cols.NEXT_OBSERVATION in table.column_names
            else None
        ),
        infos=infos,
        episode_info_columns=task["episode_info_columns"],
        env_id=task["env_id"],
        source=task["source"],
    )


def part_tasks(plan: IngestPlan, writer: VersionWriter) -> list[dict[str, Any]]:
    """The Ray tasks of a plan: one per part, writing with `writer`."""
    source = _source_label(plan.format, plan.source)
    return [
        {
            **part,
            "index": index,
            "writer": writer,
            "env_id": plan.env_id,
            "source": source,
        }
        for index, part in enumerate(plan.parts)
    ]


def write_skipped_report(writer: VersionWriter, plan: IngestPlan, name: str) -> None:
    writer.write_file(name, (json.dumps(plan.skipped_report(), indent=2, default=str) + "\n").encode())
