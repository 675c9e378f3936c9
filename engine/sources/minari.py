"""`minari`: a Minari dataset directory (`data/metadata.json` and `data/main_data.hdf5`, one
HDF5 group per episode; or Minari's `arrow` storage format).

The default HDF5 format is read with h5py, so minari itself is not needed to ingest (and
the planning pass reads no observations or actions); other storage formats go through
minari's storage API. Minari stores n+1 observations and infos per episode of n steps
(the reset first): `observation` and `next_observation` come from the n+1 observations,
and the infos are the ones returned by each step. The env id comes from Minari's metadata.
Minari datasets must be local directories.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from engine import storage
from engine.sources.base import (
    IngestPlan,
    Part,
    PlanOptions,
    Source,
    directory_names,
    file_name,
    part_ranges,
    source_label,
)
from engine.sources.tables import EpisodeLabels, build_tables
from engine.validate import (
    Problem,
    as_flags,
    changes_within_episodes,
    check_finite,
    check_flag_values,
    check_flags_at_episode_ends,
    check_numeric,
)
from schemas import steps as cols

DATA_FILE = "main_data.hdf5"
METADATA_FILE = "metadata.json"
EPISODE_ARRAYS = ("observations", "actions", "rewards", "terminations", "truncations")


@dataclass(frozen=True, kw_only=True)
class MinariPart(Part):
    """Whole episodes of a Minari dataset, by id."""

    path: str
    episodes: tuple[int, ...]

    @property
    def file(self) -> str:
        return minari_dataset(self.path).file


@dataclass(frozen=True)
class MinariDataset:
    """Where a Minari dataset's data lives and in which of Minari's storage formats."""

    data_dir: str
    data_format: str  # "hdf5" (read with h5py) or "arrow" (read with minari's API)
    env_id: str | None

    @property
    def file(self) -> str:
        """What problems name: the HDF5 file, or the data directory of other formats."""
        if self.data_format == "hdf5":
            return os.path.join(self.data_dir, DATA_FILE)
        return self.data_dir


class Minari(Source[MinariPart]):
    name = "minari"

    def detect(self, path: str) -> bool:
        if file_name(path) == DATA_FILE:
            return True
        if storage.is_s3(path):
            # A Minari dataset on S3 is recognized, to be refused by `plan` with a clear
            # message; a path with a suffix names a file of another format (no listing).
            return "." not in file_name(path) and bool(
                {DATA_FILE, METADATA_FILE} & set(directory_names(path))
            )
        return os.path.isdir(path) and any(
            os.path.exists(os.path.join(path, *parts))
            for parts in (("data", DATA_FILE), (DATA_FILE,), ("data", METADATA_FILE))
        )

    def plan(self, path: str, options: PlanOptions) -> IngestPlan:
        dataset = minari_dataset(path)
        problems: list[Problem] = []
        episode_ids, lengths = [], []
        info_changes: dict[str, bool] = {}
        for episode in minari_episodes(dataset, shapes_only=True):
            found = check_episode(dataset.file, episode)
            if not found:
                found = check_rewards_and_infos(dataset.file, episode, info_changes)
                episode_ids.append(episode["id"])
                lengths.append(len(episode["rewards"]))
            problems += found
        bad = {p.episode for p in problems}
        kept = [i for i, e in enumerate(episode_ids) if e not in bad]
        kept_lengths = np.asarray([lengths[i] for i in kept], dtype=np.int64)
        episode_info_columns = sorted(n for n, changes in info_changes.items() if not changes)
        env_id = options.env_id or dataset.env_id or "unknown"
        labels = EpisodeLabels(env_id, source_label(self.name, path), tuple(episode_info_columns))
        parts: list[Part] = [
            MinariPart(
                path=path,
                episodes=tuple(episode_ids[i] for i in kept[start:stop]),
                steps=int(kept_lengths[start:stop].sum()),
                labels=labels,
            )
            for start, stop in part_ranges(kept_lengths, options.part_steps)
        ]
        return IngestPlan(
            format=self.name,
            source=path,
            env_id=env_id,
            parts=parts,
            steps=int(kept_lengths.sum()),
            episodes=len(kept),
            skipped=problems,
            episode_info_columns=episode_info_columns,
            metadata={"minari_data_format": dataset.data_format},
        )

    def read_part(self, part: MinariPart) -> tuple[pa.Table, pa.Table]:
        columns: dict[str, list] = {
            k: [] for k in ("episode_ids", "obs", "next_obs", "actions", "rewards", "term", "trunc")
        }
        infos: dict[str, list] = {}
        for episode in minari_episodes(minari_dataset(part.path), sorted(part.episodes)):
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
            terminated = as_flags(episode["terminations"])
            truncated = as_flags(episode["truncations"]).copy()
            if length and not (truncated[-1] or terminated[-1]):
                truncated[-1] = True  # an episode cut off without a flag: truncated
            columns["term"].append(terminated)
            columns["trunc"].append(truncated)
            for name, values in step_infos(episode.get("infos", {}), length).items():
                infos.setdefault(name, []).append(values)
        return build_tables(
            episode_ids=_concat(columns["episode_ids"]),
            observation=_concat(columns["obs"]),
            next_observation=_concat(columns["next_obs"]),
            action=_concat(columns["actions"]),
            reward=_concat(columns["rewards"]),
            terminated=_concat(columns["term"]),
            truncated=_concat(columns["trunc"]),
            infos={name: _concat(values) for name, values in infos.items()},
            labels=part.labels,
        )


# ---------------------------------------------------------------- reading Minari's layout


def minari_dataset(path: str) -> MinariDataset:
    """A Minari dataset directory (or its `data` folder, or `main_data.hdf5`)."""
    if storage.is_s3(path):
        raise ValueError(f"{path}: Minari datasets must be local directories")
    path = path.rstrip("/")
    if os.path.isfile(path):
        path = os.path.dirname(path)
    for data_dir in (os.path.join(path, "data"), path):
        metadata_file = os.path.join(data_dir, METADATA_FILE)
        hdf5_file = os.path.join(data_dir, DATA_FILE)
        if os.path.isfile(metadata_file) or os.path.isfile(hdf5_file):
            metadata = {}
            if os.path.isfile(metadata_file):
                with open(metadata_file) as handle:
                    metadata = json.load(handle)
            spec = metadata.get("env_spec")
            if isinstance(spec, str):
                spec = json.loads(spec)
            return MinariDataset(
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
        # Shape and type without the data (NumPy does not touch an empty array's pages).
        return np.empty(item.shape, dtype=item.dtype) if shapes_only else item[()]
    return {name: _h5_tree(item[name], shapes_only) for name in item}


def minari_episodes(
    dataset: MinariDataset, episode_ids: list[int] | None = None, shapes_only: bool = False
) -> Iterator[dict[str, Any]]:
    """Episodes as dicts (id, observations, actions, rewards, terminations, truncations,
    infos) in Minari's own layout: n+1 observations and infos, n of everything else.

    HDF5 datasets are read with h5py (minari is not needed; `shapes_only` reads no
    observation or action data); other formats with minari's storage API.
    """
    if dataset.data_format == "hdf5":
        yield from _hdf5_episodes(dataset.file, episode_ids, shapes_only)
        return
    try:
        from minari.dataset.minari_storage import MinariStorage
    except ImportError as error:
        raise ValueError(
            f"{dataset.data_dir}: Minari datasets in the {dataset.data_format!r} format are "
            "read with minari's API; install it with `pip install hindsight-engine[minari]`"
        ) from error
    minari_storage = MinariStorage.read(dataset.data_dir)
    ids = list(range(minari_storage.total_episodes)) if episode_ids is None else episode_ids
    for episode in minari_storage.get_episodes(ids):
        yield {**episode, "id": int(episode["id"])}


def _hdf5_episodes(
    data_file: str, episode_ids: list[int] | None, shapes_only: bool
) -> Iterator[dict[str, Any]]:
    import h5py

    try:
        handle = h5py.File(data_file, "r")
    except OSError as error:
        raise ValueError(
            f"{data_file}: cannot read it as HDF5 (truncated or corrupt file?): {error}"
        ) from error
    with handle:
        names = (
            _episode_names(handle) if episode_ids is None else [f"episode_{e}" for e in episode_ids]
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


def _episode_names(handle: Any) -> list[str]:
    names = [n for n in handle if n.startswith("episode_")]
    return sorted(names, key=lambda n: int(n.removeprefix("episode_")))


def step_infos(infos: dict[str, Any], length: int) -> dict[str, np.ndarray]:
    """Minari stores n+1 infos (reset, then one per step): keep the one of each step.
    Nested infos become `outer.inner` columns."""
    flat = {}
    for name, values in infos.items():
        if isinstance(values, dict):
            for inner, inner_values in step_infos(values, length).items():
                flat[f"{name}.{inner}"] = inner_values
            continue
        values = np.asarray(values)
        flat[name] = values[1:] if len(values) == length + 1 else values
    return flat


def _concat(pieces: list) -> Any:
    if pieces and isinstance(pieces[0], dict):
        return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
    return np.concatenate(pieces)


def _first_leaf(values: Any) -> Any:
    while isinstance(values, dict):
        values = next(iter(values.values()))
    return values


def _leaves(values: Any) -> list[Any]:
    if isinstance(values, dict):
        return [leaf for inner in values.values() for leaf in _leaves(inner)]
    return [values]


# ---------------------------------------------------------------- validation


def check_episode(file: str, episode: dict[str, Any]) -> list[Problem]:
    """One episode was read and its arrays agree in length (n+1 observations, n of the
    rest)."""
    episode_id = episode["id"]
    if "error" in episode:
        return [Problem(file, "episode", episode["error"], episode_id)]
    problems = [
        Problem(file, column, "is missing", episode_id)
        for column in EPISODE_ARRAYS
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


def check_values(file: str, episode: dict[str, Any]) -> list[Problem]:
    """Rewards, observations and actions hold numbers, rewards are finite as stored
    (float32), flags are booleans or 0/1 and set only on the last step."""
    episode_id = episode["id"]
    rewards = np.asarray(episode["rewards"])
    ids, steps = np.full(len(rewards), episode_id), np.arange(len(rewards))
    problems = []
    for column in ("rewards", "observations", "actions"):
        for values in _leaves(episode[column]):
            problems += check_numeric(file, column, np.asarray(values).dtype)
    problems = [replace(p, episode=episode_id) for p in problems]
    problems += check_finite(file, cols.REWARD, rewards, ids, steps)
    for column in ("terminations", "truncations"):
        flags = np.asarray(episode[column])
        found = check_flag_values(file, column, flags, ids, steps)
        problems += [replace(p, episode=episode_id) for p in found]
        if not found:
            problems += check_flags_at_episode_ends(file, column, flags, ids, steps)
    return problems


def check_rewards_and_infos(
    file: str, episode: dict[str, Any], info_changes: dict[str, bool]
) -> list[Problem]:
    """The episode's values (`check_values`), and every info has one row per step.
    Records in `info_changes` whether each info changes inside this episode (or did in an
    earlier one)."""
    episode_id = episode["id"]
    length = len(episode["rewards"])
    problems = check_values(file, episode)
    starts = np.zeros(length, bool)
    starts[:1] = True
    for name, values in step_infos(episode.get("infos", {}), length).items():
        if len(values) != length:
            problems.append(
                Problem(
                    file, f"infos/{name}", f"has {len(values)} rows, expected {length}", episode_id
                )
            )
            continue
        info_changes[name] = info_changes.get(name, False) or changes_within_episodes(
            values, starts
        )
    return problems
