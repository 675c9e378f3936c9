"""Exports: a dataset version written in another tool's format (one exporter per module:
`lerobot`, `minari`), so that a relabeled dataset goes back to the trainers people use.

Every exporter writes through `VersionWriter` with the format's own commit file (LeRobot's
`meta/info.json`, Minari's `data/metadata.json`), written last: an export is all there or
not there, a failure leaves nothing, and a committed export is refused as an output. The
input is any committed version (a relabeled one with its column groups, a `query --output`
subset); it is read part by part, so memory holds one part (and its frames) at a time.

This module holds what both formats share: how the columns of a version divide into the
core trajectory, camera frames, extra numeric columns (relabels such as `return_to_go`,
`skill`, goals) and text, and the result a command reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.dataset import Dataset
from schemas import steps as cols
from schemas.frames import camera_of

FORMATS = ("lerobot", "minari")

# Step columns with a place of their own in every format.
STEP_CORE = frozenset(cols.TRANSITION_COLUMNS)
# Episode columns that are bookkeeping, not something a trainer conditions on.
EPISODE_CORE = frozenset((cols.EPISODE_ID, cols.LENGTH))


class ExportError(ValueError):
    """A dataset that cannot be written in the asked format, with what to do."""


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote (the command's report and `--json`)."""

    format: str
    output: str
    episodes: int
    steps: int
    bytes: int
    files: int
    # Columns the format has no place for (lists of variable length, nested structs...).
    skipped_columns: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)


def is_number_type(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


def is_vector_type(kind: pa.DataType) -> bool:
    """A fixed-length vector of numbers per row (an observation, a goal, an embedding)."""
    return pa.types.is_fixed_size_list(kind) and is_number_type(kind.value_type)


def is_text_type(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


@dataclass(frozen=True)
class Columns:
    """How the columns of a version divide for an export."""

    numbers: list[str]  # extra step columns: scalars or fixed-length vectors of numbers
    episode_numbers: list[str]  # extra episode columns of scalars or vectors of numbers
    texts: list[str]  # step-level text columns
    episode_texts: list[str]  # episode-level text columns
    cameras: list[str]  # cameras of the frames group
    skipped: list[str]  # columns no format has a place for


def divide_columns(dataset: Dataset) -> Columns:
    steps = dataset.arrow_schema("steps")
    episodes = dataset.arrow_schema("episodes")
    numbers, texts, cameras, skipped = [], [], [], []
    for f in steps:
        if f.name in STEP_CORE:
            continue
        # A camera's frames are `frame_<camera>` of a camera the manifest knows (a LeRobot
        # ingest's `frame_index` is a number, not camera "index").
        if camera_of(f.name) in dataset.cameras:
            cameras.append(camera_of(f.name))
        elif is_number_type(f.type) or is_vector_type(f.type):
            numbers.append(f.name)
        elif is_text_type(f.type):
            texts.append(f.name)
        else:
            skipped.append(f.name)
    episode_numbers, episode_texts = [], []
    for f in episodes:
        if f.name in EPISODE_CORE:
            continue
        if camera_of(f.name) in dataset.cameras:  # a video camera: one video per episode
            cameras.append(camera_of(f.name))
        elif is_number_type(f.type) or is_vector_type(f.type):
            episode_numbers.append(f.name)
        elif is_text_type(f.type):
            episode_texts.append(f.name)
        else:
            skipped.append(f"episodes.{f.name}")
    return Columns(numbers, episode_numbers, texts, episode_texts, cameras, skipped)


def column_values(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A numeric column as NumPy: (rows,) for scalars, (rows, dim) for vectors; nulls
    become NaN (floats) so that a value is never invented."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    kind = column.type
    if is_vector_type(kind):
        flat = column_values(column.flatten())
        return flat.reshape(len(column), kind.list_size)
    if column.null_count:
        if pa.types.is_boolean(kind) or pa.types.is_integer(kind):
            column = pc.cast(column, pa.float64())
        return column.to_numpy(zero_copy_only=False).astype(
            column.type.to_pandas_dtype(), copy=False
        )
    return cols.arrow_to_numpy(column)


def broadcast_episodes(episode_values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per-episode values repeated over each episode's steps."""
    return np.repeat(episode_values, lengths, axis=0)


def episode_lengths(steps_episode_ids: np.ndarray, episode_ids: np.ndarray) -> np.ndarray:
    """Steps of each episode of `episode_ids` (sorted like the steps)."""
    bounds = cols.episode_boundaries(steps_episode_ids)
    found = steps_episode_ids[bounds[:-1]]
    if len(found) != len(episode_ids) or not np.array_equal(found, episode_ids):
        raise ExportError("the steps and episodes tables of a part hold different episodes")
    return np.diff(bounds)


def single_env_id(dataset: Dataset) -> str | None:
    """The env id every episode shares, or None (none recorded, or several)."""
    if cols.ENV_ID not in dataset.columns("episodes"):
        return None
    ids: set = set()
    for part in range(dataset.num_parts):
        column = dataset.read_part(part, "episodes", [cols.ENV_ID]).column(0)
        ids |= set(column.unique().to_pylist())
    ids.discard(None)
    return ids.pop() if len(ids) == 1 else None


def flags(table: pa.Table, column: str) -> np.ndarray:
    """A bool column as NumPy, an unknown (null) flag as False: a source without
    `terminated`/`truncated` records no episode end but the last step."""
    return cols.arrow_to_numpy(pc.fill_null(table.column(column), False)).astype(bool)
