"""`minari`: a Minari dataset directory (`data/metadata.json` and `data/main_data.hdf5`, one
HDF5 group per episode; or Minari's `arrow` storage format).

The default HDF5 format is read with h5py, so minari itself is not needed to ingest; other
storage formats go through minari's storage API. The plan keeps the episodes it reads, up
to `PLAN_KEEPS_BYTES`, and hands them to its parts, so a small dataset is read once; past
that the plan reads no observations or actions and each part reads its own episodes.
Minari stores n+1 observations and infos per episode of n steps (the reset first):
`observation` and `next_observation` come from the n+1 observations, and the infos are
the ones returned by each step. The env id comes from Minari's metadata. Minari datasets
must be local directories.

Image observations (the whole observation, or a key of a dict observation) become cameras
(engine/sources/images.py): Minari's default HDF5 storage keeps image spaces as JPEG
(`jpeg_encoding` in its metadata, for uint8 Box spaces of at least 32x32 with bounds
0..255), and those frames are stored as they came; raw uint8 (n+1, H, W[, C]) arrays (a
dataset written with `jpeg_encoding=False`, smaller images, the `arrow` format, which
minari decodes) are encoded with `--codec`. A step's frame is its observation's (the
first n of the n+1), camera `observation` for a whole-image observation (the steps table
then has no `observation` column) or `<key>` for a dict key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
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
from engine.sources.images import ImageColumn, encode_raw, image_part_steps
from engine.sources.minari_hdf5 import hdf5_episodes, leaves
from engine.sources.minari_images import (
    check_images,
    episode_images,
    image_key,
    jpeg_keys,
    observation_leaves,
    without_images,
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
from schemas.frames import CameraInfo

DATA_FILE = "main_data.hdf5"
METADATA_FILE = "metadata.json"
EPISODE_ARRAYS = ("observations", "actions", "rewards", "terminations", "truncations")
# The plan keeps the episodes it reads, up to this many bytes in all, for `read_part` to
# build their tables without reading them again; memory stays bounded past it.
PLAN_KEEPS_BYTES = 64 * 2**20


@dataclass(frozen=True, kw_only=True)
class MinariPart(Part):
    """Whole episodes of a Minari dataset, by id."""

    path: str
    episodes: tuple[int, ...]
    # Episodes of the part the plan kept (by id, as read): this process builds their
    # tables from them; a part sent to a Ray task travels without them and reads its own.
    kept: dict[int, dict[str, Any]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def file(self) -> str:
        return minari_dataset(self.path).file

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "kept": {}}


@dataclass(frozen=True)
class MinariDataset:
    """Where a Minari dataset's data lives and in which of Minari's storage formats."""

    data_dir: str
    data_format: str  # "hdf5" (read with h5py) or "arrow" (read with minari's API)
    env_id: str | None
    # Observation keys ("" for the whole observation) that Minari stored as JPEG bytes.
    jpeg_keys: tuple[str, ...] = ()

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
        kept: dict[int, dict[str, Any]] = {}
        images: list[ImageColumn] | None = None  # from the first episode read
        cameras: dict[str, CameraInfo] = {}
        for episode, whole in minari_episodes(dataset, whole_up_to=PLAN_KEEPS_BYTES):
            found = check_episode(dataset.file, episode)
            if not found and images is None:
                images, cameras = episode_images(dataset.file, dataset.jpeg_keys, episode, options)
            if not found:
                found = check_rewards_and_infos(dataset, episode, info_changes)
                found += check_images(dataset.file, episode, images or [], cameras)
                episode_ids.append(episode["id"])
                lengths.append(len(episode["rewards"]))
            if whole and not found:
                kept[episode["id"]] = episode
            problems += found
        bad = {p.episode for p in problems}
        good = [i for i, e in enumerate(episode_ids) if e not in bad]
        good_lengths = np.asarray([lengths[i] for i in good], dtype=np.int64)
        episode_info_columns = sorted(n for n, changes in info_changes.items() if not changes)
        env_id = options.env_id or dataset.env_id or "unknown"
        labels = EpisodeLabels(env_id, source_label(self.name, path), tuple(episode_info_columns))
        parts: list[Part] = []
        part_steps = image_part_steps(options.part_steps, list(cameras.values()))
        for start, stop in part_ranges(good_lengths, part_steps):
            episodes = tuple(episode_ids[i] for i in good[start:stop])
            parts.append(
                MinariPart(
                    path=path,
                    episodes=episodes,
                    steps=int(good_lengths[start:stop].sum()),
                    labels=labels,
                    kept={e: kept[e] for e in episodes if e in kept},
                    images=tuple(images or []),
                    cameras=cameras,
                )
            )
        return IngestPlan(
            format=self.name,
            source=path,
            env_id=env_id,
            parts=parts,
            steps=int(good_lengths.sum()),
            episodes=len(good),
            skipped=problems,
            episode_info_columns=episode_info_columns,
            metadata={"minari_data_format": dataset.data_format},
            images=images or [],
            cameras=cameras,
        )

    def read_part(self, part: MinariPart) -> tuple[pa.Table, pa.Table] | tuple:
        columns: dict[str, list] = {
            k: [] for k in ("episode_ids", "obs", "next_obs", "actions", "rewards", "term", "trunc")
        }
        infos: dict[str, list] = {}
        frames: dict[str, list[bytes]] = {image.camera: [] for image in part.images}
        for episode in part_episodes(part):
            rewards = np.asarray(episode["rewards"])
            length = len(rewards)
            observations = episode["observations"]
            for image in part.images:
                values = observation_leaves(observations)[image_key(image)][:-1]
                if image.encoded:
                    frames[image.camera] += [np.asarray(row).tobytes() for row in values]
                else:
                    frames[image.camera] += encode_raw(values, part.cameras[image.camera])
            observations = without_images(observations, part.images)
            if observations is None:
                pass
            elif isinstance(observations, dict):
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
        tables = build_tables(
            episode_ids=_concat(columns["episode_ids"]),
            observation=_concat(columns["obs"]) if columns["obs"] else None,
            next_observation=_concat(columns["next_obs"]) if columns["next_obs"] else None,
            action=_concat(columns["actions"]),
            reward=_concat(columns["rewards"]),
            terminated=_concat(columns["term"]),
            truncated=_concat(columns["trunc"]),
            infos={name: _concat(values) for name, values in infos.items()},
            labels=part.labels,
        )
        return (*tables, frames) if part.images else tables


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
                jpeg_keys=jpeg_keys(metadata),
            )
    raise FileNotFoundError(
        f"{path}: not a Minari dataset directory (no data/metadata.json or data/main_data.hdf5)"
    )


def part_episodes(part: MinariPart) -> Iterator[dict[str, Any]]:
    """The episodes of a part in id order: those the plan kept, the others read now."""
    ids = sorted(part.episodes)
    missing = [e for e in ids if e not in part.kept]
    read = (episode for episode, _ in minari_episodes(minari_dataset(part.path), missing))
    for episode_id in ids:
        yield part.kept[episode_id] if episode_id in part.kept else next(read)


def minari_episodes(
    dataset: MinariDataset, episode_ids: list[int] | None = None, whole_up_to: int | None = None
) -> Iterator[tuple[dict[str, Any], bool]]:
    """Episodes as dicts (id, observations, actions, rewards, terminations, truncations,
    infos) in Minari's own layout: n+1 observations and infos, n of everything else; each
    with whether it is whole. Episodes are whole while the bytes of those read stay within
    `whole_up_to` (None: always); after that, HDF5 episodes are read without observation
    and action data (empty arrays of their shape and type).

    HDF5 datasets are read with h5py (minari is not needed); other formats with minari's
    storage API.
    """
    budget = float("inf") if whole_up_to is None else whole_up_to
    if dataset.data_format == "hdf5":
        yield from hdf5_episodes(dataset.file, episode_ids, budget)
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
        size = sum(np.asarray(leaf).nbytes for leaf in leaves(dict(episode)))
        budget = budget - size if size <= budget else -1
        yield {**episode, "id": int(episode["id"])}, budget >= 0


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


def check_values(
    file: str, episode: dict[str, Any], jpeg_keys: tuple[str, ...] = ()
) -> list[Problem]:
    """Rewards, observations and actions hold numbers (but the observations stored as
    JPEG), rewards are finite as stored (float32), flags are booleans or 0/1 and set only
    on the last step."""
    episode_id = episode["id"]
    rewards = np.asarray(episode["rewards"])
    ids, steps = np.full(len(rewards), episode_id), np.arange(len(rewards))
    problems = []
    observations = observation_leaves(episode["observations"])
    numbers = {
        "rewards": leaves(episode["rewards"]),
        "observations": [v for key, v in observations.items() if key not in jpeg_keys],
        "actions": leaves(episode["actions"]),
    }
    for column, arrays in numbers.items():
        for values in arrays:
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
    dataset: MinariDataset, episode: dict[str, Any], info_changes: dict[str, bool]
) -> list[Problem]:
    """The episode's values (`check_values`), and every info has one row per step.
    Records in `info_changes` whether each info changes inside this episode (or did in an
    earlier one)."""
    file = dataset.file
    episode_id = episode["id"]
    length = len(episode["rewards"])
    problems = check_values(file, episode, dataset.jpeg_keys)
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
