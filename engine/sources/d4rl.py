"""`d4rl`: flat arrays in HDF5 (h5py) or NPZ, as D4RL and many logging tools write them.

Arrays: `observations` (or `observations/<key>` for a dict observation), `actions`,
`rewards`, `terminals`, optional `timeouts`, `next_observations` (or
`next_observations/<key>`), `infos/*` (per-step info columns) and `metadata/*` (scalars,
recorded in the manifest). A uint8 observation array of shape (N, H, W) or (N, H, W, C) is a
camera (engine/sources/images.py): camera `observation` when it is the whole observation
(the steps table then has no `observation` column), camera `<key>` for a dict observation's
key; its frames are encoded in the part tasks, read a chunk at a time. Image arrays of the
next observations are not stored (a step's next frame is the next step's frame).

Episodes end at a terminal or a timeout (a flag is a boolean or 0/1;
any other value is refused, never read as an end); a tail with neither is kept as a
truncated episode and reported. Episode ids are 0, 1, 2, ... in file order. HDF5 files are
read in row ranges (local or S3, through seekable range requests); NPZ members are read
whole by each part.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from engine import storage
from engine.sources.base import (
    IngestPlan,
    Part,
    PlanOptions,
    Source,
    file_name,
    part_ranges,
    source_label,
)
from engine.sources.images import (
    ImageColumn,
    camera_name,
    encode_rows,
    image_array_problems,
    image_part_steps,
    is_image_array,
    raw_camera,
)
from engine.sources.tables import EpisodeLabels, build_tables
from engine.validate import (
    Problem,
    as_flags,
    changes_within_episodes,
    check_columns,
    check_finite,
    check_flag_values,
    check_numeric,
)
from schemas import steps as cols

REQUIRED = ("observations", "actions", "rewards", "terminals")
OPTIONAL = ("timeouts", "next_observations")
OBSERVATION_ARRAYS = ("observations", "next_observations")  # or groups of `<name>/<key>`
SUFFIXES = (".h5", ".hdf5", ".npz")
MINARI_DATA_FILE = "main_data.hdf5"  # HDF5 too, but one group per episode: the minari format
# Rows read at once in the planning pass: memory stays flat however large the file.
CHUNK_ROWS = 1 << 20


@dataclass(frozen=True, kw_only=True)
class FlatArraysPart(Part):
    """Rows [row_start, row_stop) of the file: whole episodes, the first one `first_episode`."""

    path: str
    row_start: int
    row_stop: int
    first_episode: int
    skip_episodes: tuple[int, ...] = ()  # episodes in the range left out (--on-error skip)

    @property
    def file(self) -> str:
        return self.path


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

    def dtype(self, name: str) -> np.dtype:
        return self._arrays[name].dtype if self.is_hdf5 else self._npz(name).dtype

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

    def chunks(self, name: str, total: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, total, CHUNK_ROWS):
            yield start, self.read(name, start, min(total, start + CHUNK_ROWS))

    def close(self) -> None:
        self._file.close()
        if self._stream is not None:
            self._stream.close()


class D4RL(Source[FlatArraysPart]):
    name = "d4rl"

    def detect(self, path: str) -> bool:
        name = file_name(path)
        return name.endswith(SUFFIXES) and name != MINARI_DATA_FILE

    def plan(self, path: str, options: PlanOptions) -> IngestPlan:
        if not storage.exists(path):
            raise FileNotFoundError(f"{path}: no such file")
        arrays = FlatArrays(path)
        try:
            return plan_flat_arrays(arrays, options)
        finally:
            arrays.close()

    def read_part(self, part: FlatArraysPart) -> tuple[pa.Table, pa.Table]:
        arrays = FlatArrays(part.path)
        try:
            return read_rows(arrays, part)
        finally:
            arrays.close()


# ---------------------------------------------------------------- planning


def plan_flat_arrays(arrays: FlatArrays, options: PlanOptions) -> IngestPlan:
    """Check the arrays, find the episodes, check rewards, cut into parts."""
    path = arrays.path
    problems = array_name_problems(path, arrays.names)
    if problems:
        return IngestPlan.refused(D4RL.name, path, problems)
    total = arrays.shape("rewards")[0] if arrays.shape("rewards") else 0
    problems = array_shape_problems(arrays, total) + array_type_problems(arrays)
    for name in observation_arrays(arrays.names, "observations") + observation_arrays(
        arrays.names, "next_observations"
    ):
        problems += image_array_problems(path, name, arrays.dtype(name), arrays.shape(name))
    if problems:
        return IngestPlan.refused(D4RL.name, path, problems)
    images = image_arrays(arrays)
    cameras = {
        image.camera: raw_camera(arrays.shape(image.source), options.codec, options.quality)
        for image in images
    }
    part_steps = image_part_steps(options.part_steps, list(cameras.values()))

    flags = read_flags(arrays, total)
    boundaries, truncated_tails = episode_boundaries(flags, path, total)
    lengths = np.diff(boundaries)
    episode_of_row = np.repeat(np.arange(len(lengths)), lengths)
    for start, chunk in arrays.chunks("rewards", total):
        # Episode and step of each row of the chunk: memory stays flat however large the file.
        rows = slice(start, start + len(chunk))
        episodes_here = episode_of_row[rows]
        steps_here = np.arange(start, rows.stop) - boundaries[episodes_here]
        problems += check_finite(path, cols.REWARD, chunk, episodes_here, steps_here)
        for name, values in flags.items():
            problems += check_flag_values(path, name, values[rows], episodes_here, steps_here)
    del flags
    episode_info_columns = constant_info_columns(arrays, boundaries)
    metadata = source_metadata(arrays)
    env_id = options.env_id or str(metadata.get("env_id", metadata.get("env", "")) or "unknown")

    bad_episodes = sorted({p.episode for p in problems if p.episode is not None})
    keep = np.ones(len(lengths), bool)
    keep[bad_episodes] = False
    kept = np.flatnonzero(keep)
    labels = EpisodeLabels(env_id, source_label(D4RL.name, path), tuple(episode_info_columns))
    parts: list[Part] = []
    for start, stop in part_ranges(lengths[kept], part_steps):
        first, last = int(kept[start]), int(kept[stop - 1])
        parts.append(
            FlatArraysPart(
                path=path,
                row_start=int(boundaries[first]),
                row_stop=int(boundaries[last + 1]),
                first_episode=first,
                skip_episodes=tuple(int(e) for e in bad_episodes if first <= e <= last),
                steps=int(lengths[kept[start:stop]].sum()),
                labels=labels,
                images=tuple(images),
                cameras=cameras,
            )
        )
    return IngestPlan(
        format=D4RL.name,
        source=path,
        env_id=env_id,
        parts=parts,
        steps=int(lengths[kept].sum()),
        episodes=len(kept),
        skipped=problems,
        truncated_tails=truncated_tails,
        episode_info_columns=episode_info_columns,
        metadata={"source_metadata": metadata} if metadata else {},
        images=images,
        cameras=cameras,
    )


def _info_names(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith("infos/")]


def _metadata_names(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith("metadata/")]


def observation_arrays(names: list[str], name: str) -> list[str]:
    """The arrays of `observations` (or `next_observations`): the array itself, or one
    `<name>/<key>` array per key of a dict observation."""
    if name in names:
        return [name]
    return [n for n in names if n.startswith(name + "/")]


def per_step_arrays(names: list[str]) -> list[str]:
    """Every array with one row per step."""
    observations = [n for name in OBSERVATION_ARRAYS for n in observation_arrays(names, name)]
    return [n for n in names if n in REQUIRED or n in OPTIONAL or n.startswith("infos/")] + [
        n for n in observations if n not in OBSERVATION_ARRAYS
    ]


def array_name_problems(path: str, names: list[str]) -> list[Problem]:
    """The required arrays are there and no array is unknown."""
    present = [*names, *(n for n in OBSERVATION_ARRAYS if observation_arrays(names, n))]
    problems = check_columns(path, present, REQUIRED, reserved=())
    known = {*REQUIRED, *OPTIONAL, *_info_names(names), *_metadata_names(names)}
    known |= {n for name in OBSERVATION_ARRAYS for n in observation_arrays(names, name)}
    return problems + [
        Problem(
            path,
            name,
            "unknown array; expected observations (or observations/<key>), actions, rewards, "
            "terminals, timeouts, next_observations, infos/*, metadata/*",
        )
        for name in names
        if name not in known
    ]


def image_arrays(arrays: FlatArrays) -> list[ImageColumn]:
    """The observation arrays that are cameras: uint8 (N, H, W[, C])."""
    return [
        ImageColumn(
            name,
            "observation" if name == "observations" else camera_name(name.partition("/")[2]),
            encoded=False,
        )
        for name in observation_arrays(arrays.names, "observations")
        if is_image_array(arrays.dtype(name), arrays.shape(name))
    ]


def array_shape_problems(arrays: FlatArrays, total: int) -> list[Problem]:
    """Every per-step array has one row per reward; rewards and flags are 1-D."""
    names = arrays.names
    problems = []
    for name in per_step_arrays(names):
        shape = arrays.shape(name)
        if not shape or shape[0] != total:
            problems.append(
                Problem(
                    arrays.path,
                    name,
                    f"has {shape[0] if shape else 0} rows, but rewards has {total}",
                )
            )
    for name in ("rewards", "terminals", "timeouts"):
        if name in names and len(arrays.shape(name)) != 1:
            problems.append(
                Problem(arrays.path, name, f"must be 1-D, has shape {arrays.shape(name)}")
            )
    return problems


def array_type_problems(arrays: FlatArrays) -> list[Problem]:
    """Rewards, observations and actions hold numbers (a string or boolean array is
    refused, not cast); flags hold booleans or numbers (their values are checked later)."""
    problems = []
    observations = [
        n for name in OBSERVATION_ARRAYS for n in observation_arrays(arrays.names, name)
    ]
    for name in ("rewards", "actions", *observations):
        if name in arrays.names:
            problems += check_numeric(arrays.path, name, arrays.dtype(name))
    for name in ("terminals", "timeouts"):
        if name in arrays.names and arrays.dtype(name).kind not in "biuf":
            problems.append(
                Problem(arrays.path, name, f"must hold booleans or 0/1, has {arrays.dtype(name)}")
            )
    return problems


def read_flags(arrays: FlatArrays, total: int) -> dict[str, np.ndarray]:
    """The flag arrays as stored in the file (`timeouts` all false when absent)."""
    flags = {"terminals": arrays.read("terminals")}
    flags["timeouts"] = (
        arrays.read("timeouts") if "timeouts" in arrays.names else np.zeros(total, bool)
    )
    return flags


def _episode_ends(terminals: np.ndarray, timeouts: np.ndarray) -> np.ndarray:
    return np.flatnonzero(as_flags(terminals) | as_flags(timeouts))


def episode_boundaries(
    flags: dict[str, np.ndarray], path: str, total: int
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """First rows of the episodes and the end of the file ([0, ..., total]), and the tail
    kept as a truncated episode (reported) when the last steps have no flag. Only true
    or 1 ends an episode."""
    ends = _episode_ends(flags["terminals"], flags["timeouts"])
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
    return np.concatenate([[0], ends + 1]).astype(np.int64), truncated_tails


def info_name(name: str) -> str:
    """`infos/goal` -> `goal`; nested paths keep their inner slashes as dots."""
    return name.removeprefix("infos/").replace("/", ".")


def constant_info_columns(arrays: FlatArrays, boundaries: np.ndarray) -> list[str]:
    """The info columns that never change inside an episode, read chunk by chunk."""
    total = int(boundaries[-1])
    starts_mask = np.zeros(total, bool)
    starts_mask[boundaries[:-1]] = True
    constant = []
    for name in _info_names(arrays.names):
        changes = False
        previous = None
        for start, chunk in arrays.chunks(name, total):
            # The last row of the previous chunk joins this one: a change at the seam counts.
            joined = chunk if previous is None else np.concatenate([previous, chunk])
            offset = start - (0 if previous is None else 1)
            if changes_within_episodes(joined, starts_mask[offset : offset + len(joined)]):
                changes = True
                break
            previous = chunk[-1:]
        if not changes:
            constant.append(info_name(name))
    return constant


def source_metadata(arrays: FlatArrays) -> dict[str, Any]:
    """The scalar `metadata/*` entries (an env id, a policy name), for the manifest."""
    metadata = {}
    for name in _metadata_names(arrays.names):
        value = arrays.read(name)
        if np.ndim(value) == 0:
            value = value.item() if isinstance(value, np.generic | np.ndarray) else value
            metadata[name.removeprefix("metadata/")] = (
                value.decode() if isinstance(value, bytes) else value
            )
    return metadata


# ---------------------------------------------------------------- reading a part


def read_rows(arrays: FlatArrays, part: FlatArraysPart) -> tuple[pa.Table, pa.Table]:
    """The part's rows as base tables, without its skipped episodes."""
    start, stop = part.row_start, part.row_stop
    total = arrays.shape("rewards")[0]
    terminals = as_flags(arrays.read("terminals", start, stop))
    timeouts = (
        as_flags(arrays.read("timeouts", start, stop))
        if "timeouts" in arrays.names
        else np.zeros(stop - start, bool)
    )
    truncated = timeouts.copy()
    if stop == total and not (terminals[-1] or timeouts[-1]):
        truncated[-1] = True  # the reported tail: kept as a truncated episode
    ends = _episode_ends(terminals, truncated)
    lengths = np.diff(np.concatenate([[0], ends + 1]))
    episode_ids = np.repeat(part.first_episode + np.arange(len(lengths)), lengths)
    rows = ~np.isin(episode_ids, part.skip_episodes) if part.skip_episodes else slice(None)
    infos = {
        info_name(name): arrays.read(name, start, stop)[rows] for name in _info_names(arrays.names)
    }
    images = {image.source for image in part.images}

    def observation(name: str):
        """The observation's arrays that are not cameras: one array, a dict, or None."""
        names = observation_arrays(arrays.names, name)
        kept = [n for n in names if n not in images and n.replace("next_", "", 1) not in images]
        if names == [name]:
            return arrays.read(name, start, stop)[rows] if kept else None
        values = {n.partition("/")[2]: arrays.read(n, start, stop)[rows] for n in kept}
        return values or None

    tables = build_tables(
        episode_ids=episode_ids[rows],
        observation=observation("observations"),
        action=arrays.read("actions", start, stop)[rows],
        reward=arrays.read("rewards", start, stop)[rows],
        terminated=terminals[rows],
        truncated=truncated[rows],
        next_observation=observation("next_observations"),
        infos=infos,
        labels=part.labels,
    )
    if not part.images:
        return tables
    keep = np.ones(stop - start, bool) if isinstance(rows, slice) else rows
    frames = {
        image.camera: encode_rows(
            lambda first, last, name=image.source: arrays.read(name, first, last),
            start,
            keep,
            part.cameras[image.camera],
        )
        for image in part.images
    }
    return (*tables, frames)
