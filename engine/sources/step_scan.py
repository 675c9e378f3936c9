"""The planning pass over one step-table file (engine/sources/step_tables.py): read its
cheap columns (ids, step indices, rewards, flags, infos, the sizes of list vectors) and
check them. Columns are named as hindsight names them, after `--map`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.sources.step_files import ColumnMap, read_step_file
from engine.validate import (
    Problem,
    changes_within_episodes,
    check_finite,
    check_flag_values,
    check_flags_at_episode_ends,
    check_not_null,
    check_row_shapes,
    check_step_index,
    check_whole_numbers,
)
from schemas import steps as cols

VECTOR_COLUMNS = (cols.OBSERVATION, cols.ACTION, cols.NEXT_OBSERVATION)
# Core columns a source may lack: what their absence means is in the module's docstring.
OPTIONAL_COLUMNS = (cols.REWARD, cols.TERMINATED, cols.TRUNCATED)


@dataclass(frozen=True)
class StepColumns:
    """The columns a planning pass reads, named as hindsight does (after `--map`)."""

    infos: tuple[str, ...]  # every column that is not a core column
    list_vectors: tuple[str, ...]  # vectors stored as lists of any size: sizes are checked
    images: tuple[str, ...] = ()  # columns of encoded images: cameras
    absent: tuple[str, ...] = ()  # optional core columns the source lacks

    required = (cols.EPISODE_ID, cols.T, cols.OBSERVATION, cols.ACTION)

    @property
    def flags(self) -> list[str]:
        return [n for n in (cols.TERMINATED, cols.TRUNCATED) if n not in self.absent]

    @property
    def boundary_columns(self) -> list[str]:
        """What the planning pass reads: everything but vectors of a fixed size."""
        reward = [] if cols.REWARD in self.absent else [cols.REWARD]
        return [cols.EPISODE_ID, cols.T, *reward, *self.flags, *self.infos, *self.list_vectors]

    @classmethod
    def of(cls, schema: pa.Schema, images: tuple[str, ...] = ()) -> StepColumns:
        """The columns of a source whose files all have `schema`, with these image columns."""
        core = {*cls.required, *OPTIONAL_COLUMNS, cols.NEXT_OBSERVATION, *images}
        list_types = (pa.types.is_list, pa.types.is_large_list)
        return cls(
            infos=tuple(n for n in schema.names if n not in core),
            list_vectors=tuple(
                n
                for n in VECTOR_COLUMNS
                if n in schema.names
                and n not in images
                and any(is_list(schema.field(n).type) for is_list in list_types)
            ),
            images=images,
            absent=tuple(n for n in OPTIONAL_COLUMNS if n not in schema.names),
        )


@dataclass
class FileScan:
    """What the planning pass found in one file, and what it knows from the files before."""

    path: str
    problems: list[Problem] = field(default_factory=list)
    episode_ids: np.ndarray | None = None  # unique, sorted; None when the ids are unusable
    steps_per_episode: np.ndarray | None = None
    # Since the first file: does each info column change inside some episode?
    info_changes: dict[str, bool] = field(default_factory=dict)
    # Since the first file: values per row of each list vector (the first row sets it).
    vector_sizes: dict[str, int] = field(default_factory=dict)

    def kept(self, bad: np.ndarray) -> np.ndarray:
        """Which of the file's episodes are ingested (a mask over `episode_ids`)."""
        return ~np.isin(self.episode_ids, bad)


def scan_file(
    path: str, format: str, columns: StepColumns, column_map: ColumnMap, before: FileScan | None
) -> FileScan:
    """Read the boundary columns of one file and check them; `before` is the scan of the
    previous file with usable episode ids (vector sizes and info changes so far)."""
    table = read_step_file(path, format, columns.boundary_columns, column_map=column_map)
    scan = FileScan(
        path,
        info_changes=dict(before.info_changes) if before else dict.fromkeys(columns.infos, False),
        vector_sizes=dict(before.vector_sizes) if before else {},
    )
    episode_ids, scan.problems = usable_episode_ids(path, table)
    if episode_ids is None:
        return scan
    t_column = table.column(cols.T)
    t_values = pc.fill_null(t_column, -1).to_numpy(zero_copy_only=False)
    t = t_values.astype(np.int64)  # fractional indices are refused below, never truncated
    order = np.lexsort((t, episode_ids))
    sorted_ids = episode_ids[order]
    problems = scan.problems
    problems += check_not_null(path, cols.T, _valid(t_column), episode_ids)
    problems += check_whole_numbers(path, cols.T, t_values, episode_ids)
    problems += check_step_index(path, sorted_ids, t[order])
    if cols.REWARD not in columns.absent:
        problems += reward_problems(path, table.column(cols.REWARD), episode_ids, t)
    problems += flag_problems(path, table, columns.flags, sorted_ids, t[order], order)
    for name in columns.list_vectors:
        problems += vector_size_problems(
            path, name, table.column(name), episode_ids, scan.vector_sizes
        )
    starts = np.ones(len(sorted_ids), bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    for name in columns.infos:
        # Once a column changed in some episode it is a step column: no need to look again.
        if not scan.info_changes[name]:
            scan.info_changes[name] = info_changes_within_episodes(
                table.column(name), order, starts
            )
    scan.episode_ids, scan.steps_per_episode = np.unique(sorted_ids, return_counts=True)
    return scan


def _valid(column: pa.ChunkedArray) -> np.ndarray:
    return pc.is_valid(column).to_numpy(zero_copy_only=False)


def usable_episode_ids(path: str, table: pa.Table) -> tuple[np.ndarray | None, list[Problem]]:
    """The episode id of every row as int64; None, with a problem of the whole file, when
    the column does not hold integers or some rows have none."""
    episode_column = cols.EPISODE_ID
    column = table.column(episode_column)
    if not pa.types.is_integer(column.type):
        return None, [Problem(path, episode_column, f"must hold integers, has type {column.type}")]
    valid = _valid(column)
    if not valid.all():
        missing = int((~valid).sum())
        return None, [Problem(path, episode_column, f"{missing} row(s) have no episode id")]
    return column.to_numpy().astype(np.int64), []


def reward_problems(
    path: str, reward: pa.ChunkedArray, episode_ids: np.ndarray, t: np.ndarray
) -> list[Problem]:
    """Rewards are present and finite as stored (float32); their type was checked with the
    schema, so the cast below converts numbers only."""
    problems = check_not_null(path, cols.REWARD, _valid(reward), episode_ids)
    values = pc.fill_null(reward.cast(pa.float64()), 0.0).to_numpy()
    return problems + check_finite(path, cols.REWARD, values, episode_ids, t)


def flag_problems(
    path: str,
    table: pa.Table,
    names: list[str],
    sorted_ids: np.ndarray,
    sorted_t: np.ndarray,
    order: np.ndarray,
) -> list[Problem]:
    """The flag columns `names` (`terminated`, `truncated`, those the source has) are
    present, booleans or 0/1, and set only on the last step of their episode. Rows in
    (episode, step) `order`."""
    problems = []
    for name in names:
        column = table.column(name)
        problems += check_not_null(path, name, _valid(column)[order], sorted_ids)
        fill = False if pa.types.is_boolean(column.type) else 0  # missing: reported above
        values = pc.fill_null(column, fill).to_numpy(zero_copy_only=False)[order]
        problems += check_flag_values(path, name, values, sorted_ids, sorted_t)
        problems += check_flags_at_episode_ends(path, name, values, sorted_ids, sorted_t)
    return problems


def vector_size_problems(
    path: str,
    name: str,
    column: pa.ChunkedArray,
    episode_ids: np.ndarray,
    expected_sizes: dict[str, int],
) -> list[Problem]:
    """Every row of a list vector has a value and as many values as the first row that
    has one (in this file or an earlier one; recorded in `expected_sizes`)."""
    valid = _valid(column)
    problems = check_not_null(path, name, valid, episode_ids)
    sizes = pc.fill_null(pc.list_value_length(column), -1).to_numpy()
    if valid.any():
        expected_sizes.setdefault(name, int(sizes[np.argmax(valid)]))
    expected = expected_sizes.get(name, 0)
    sizes = np.where(valid, sizes, expected)  # missing rows are reported above
    return problems + check_row_shapes(path, name, sizes, expected, episode_ids)


def info_changes_within_episodes(
    column: pa.ChunkedArray, order: np.ndarray, starts: np.ndarray
) -> bool:
    """Whether an info column changes inside some episode (rows in `order`, episodes
    starting where `starts` is set). Nested values are compared as JSON."""
    rows_of_numbers = _number_rows(column)
    if rows_of_numbers is not None:  # vectors of one length: compared whole, vectorized
        return changes_within_episodes(rows_of_numbers[order], starts)
    if pa.types.is_nested(column.type):
        # By index: np.asarray of equal-length lists (a vector info column such as
        # LeRobot's observation.state next to an image observation) would make it 2-D.
        rows = column.to_pylist()
        values = np.asarray([json.dumps(rows[i], default=_json_bytes) for i in order.tolist()])
    else:
        values = column.to_numpy(zero_copy_only=False)[order]
    return changes_within_episodes(values, starts)


def _number_rows(column: pa.ChunkedArray) -> np.ndarray | None:
    """A list column of numbers without nulls whose rows all hold as many values, as a
    (rows, length) array; None for anything else (compared row by row as JSON)."""
    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind)):
        return None
    value = kind.value_type
    if not (pa.types.is_integer(value) or pa.types.is_floating(value)) or column.null_count:
        return None
    array = column.combine_chunks()
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    if len(array) == 0 or lengths.min() != lengths.max():
        return None
    flat = array.flatten()
    if flat.null_count:
        return None
    return flat.to_numpy(zero_copy_only=False).reshape(len(array), int(lengths[0]))


def _json_bytes(value: object) -> str:
    """Bytes inside a nested info value, comparable as JSON."""
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
