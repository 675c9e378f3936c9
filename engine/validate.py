"""Validation of step data before anything is written.

Every rule is a vectorized check over NumPy (or Arrow) arrays that returns `Problem`s
naming the file, the episode and step (when the problem belongs to one) and the column.
Ingest collects the problems of a whole source first; it then either fails with all of
them, or, with `--on-error skip`, leaves out the episodes they name and writes a report.
A problem without an episode concerns the whole file and can never be skipped.

Two moments check values: a source's planning pass checks the cheap columns (step
indices, flags, rewards, schemas), and `check_stored_values` checks the tables a part
becomes, after every conversion to the stored types (a float64 that overflows float32 is
infinite only once stored), so observations and actions are checked where they are
stored, without a second read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas import steps as cols

MAX_PROBLEMS_SHOWN = 20


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, precise enough to find and fix it."""

    file: str
    column: str
    message: str
    episode: int | None = None
    step: int | None = None  # the step index `t` inside the episode, where one step is at fault

    def __str__(self) -> str:
        where = self.file
        if self.episode is not None:
            where += f": episode {self.episode}"
            if self.step is not None:
                where += f", step {self.step}"
        return f"{where}: column {self.column!r}: {self.message}"

    def to_dict(self) -> dict:
        return asdict(self)


class ValidationError(ValueError):
    """The input has problems; nothing was written.

    Built with `ValidationError.of(problems)`; the constructor takes the message alone, so
    that an error raised in a Ray task is rebuilt in the driver with its type and text
    (`problems` is then empty)."""

    problems: tuple[Problem, ...] = ()

    @classmethod
    def of(cls, problems: Sequence[Problem], hint: str = "") -> ValidationError:
        """The error listing `problems`, one line each (the first MAX_PROBLEMS_SHOWN)."""
        shown = "\n  ".join(str(p) for p in problems[:MAX_PROBLEMS_SHOWN])
        more = len(problems) - MAX_PROBLEMS_SHOWN
        text = f"{len(problems)} problem(s) in the input, nothing was written:\n  {shown}"
        if more > 0:
            text += f"\n  ... and {more} more"
        if hint:
            text += f"\n{hint}"
        error = cls(text)
        error.problems = tuple(problems)
        return error


def first_per_episode(
    file: str,
    column: str,
    episode_ids: np.ndarray,
    bad: np.ndarray,
    describe,
    steps: np.ndarray | None = None,
) -> list[Problem]:
    """One problem per episode with at least one bad row (the first bad row describes it,
    and names its step when `steps` gives the step index of every row)."""
    rows = np.flatnonzero(bad)
    if len(rows) == 0:
        return []
    _, first = np.unique(episode_ids[rows], return_index=True)
    return [
        Problem(
            file,
            column,
            describe(int(rows[i])),
            int(episode_ids[rows[i]]),
            None if steps is None else int(steps[rows[i]]),
        )
        for i in first
    ]


def check_step_index(
    file: str, episode_ids: np.ndarray, t: np.ndarray, step_column: str = cols.T
) -> list[Problem]:
    """Inside each episode the step index runs 0, 1, 2, ... without gaps or duplicates.

    `episode_ids` and `t` must already be sorted by (episode_id, t).
    """
    episode_ids = np.asarray(episode_ids)
    t = np.asarray(t).astype(np.int64)
    if len(t) == 0:
        return []
    starts = np.ones(len(t), dtype=bool)
    starts[1:] = episode_ids[1:] != episode_ids[:-1]
    previous = np.concatenate([[-1], t[:-1]])
    problems = first_per_episode(
        file,
        step_column,
        episode_ids,
        starts & (t != 0),
        lambda row: f"starts at step {t[row]}, expected 0 (missing steps)",
    )
    inside = ~starts
    problems += first_per_episode(
        file,
        step_column,
        episode_ids,
        inside & (t == previous),
        lambda row: f"step {t[row]} appears more than once",
    )
    problems += first_per_episode(
        file,
        step_column,
        episode_ids,
        inside & (t > previous + 1),
        lambda row: (
            f"steps {previous[row] + 1}..{t[row] - 1} are missing (gap after step {previous[row]})"
        ),
    )
    return problems


def as_stored(values: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Numbers as the store keeps them (float32 by default): what checks must look at,
    since a float64 beyond float32's range is finite before the cast and infinite after."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(values).astype(dtype, copy=False)


def check_finite(
    file: str,
    column: str,
    values: np.ndarray,
    episode_ids: np.ndarray,
    steps: np.ndarray | None = None,
    stored: type | None = np.float32,
) -> list[Problem]:
    """Every value of a numeric column is finite (no NaN, no infinity) once cast to the
    `stored` type (None: as given). Non-numeric values are `check_numeric`'s to refuse."""
    values = np.asarray(values)
    if values.dtype.kind not in "iuf":
        return []
    if stored is not None:
        values = as_stored(values, stored)
    if not np.issubdtype(values.dtype, np.floating):
        return []
    bad = ~np.isfinite(values)
    if bad.ndim > 1:
        bad = bad.reshape(len(bad), -1).any(axis=1)
    return first_per_episode(
        file,
        column,
        episode_ids,
        bad,
        lambda row: f"non-finite value {values[row].tolist()}",
        steps,
    )


def check_numeric(file: str, column: str, dtype: np.dtype) -> list[Problem]:
    """A column of numbers: integers or floats. Strings and booleans are refused, never
    coerced ("1.5" or True is not a reward)."""
    if np.dtype(dtype).kind in "iuf":
        return []
    return [Problem(file, column, f"must hold numbers (integers or floats), has {dtype}")]


def check_not_null(
    file: str, column: str, valid: np.ndarray, episode_ids: np.ndarray
) -> list[Problem]:
    """No missing values in a required column."""
    return first_per_episode(
        file, column, episode_ids, ~np.asarray(valid, dtype=bool), lambda row: "missing value"
    )


def check_row_shapes(
    file: str, column: str, lengths: np.ndarray, expected: int, episode_ids: np.ndarray
) -> list[Problem]:
    """Every row of a vector column has the same number of values."""
    lengths = np.asarray(lengths)
    return first_per_episode(
        file,
        column,
        episode_ids,
        lengths != expected,
        lambda row: f"has {lengths[row]} values, expected {expected} like the first row",
    )


def check_columns(
    file: str,
    names: Sequence[str],
    required: Sequence[str],
    reserved: Sequence[str] = (cols.LENGTH, cols.RETURN, cols.ENV_ID, cols.SOURCE),
) -> list[Problem]:
    """Required columns are present; step columns do not take episode-level names."""
    present = set(names)
    problems = [
        Problem(file, name, f"required column is missing; columns found: {sorted(present)}")
        for name in required
        if name not in present
    ]
    problems += [
        Problem(file, name, "is a reserved episode-table column name; rename it in the source")
        for name in names
        if name in reserved
    ]
    return problems


def check_same_schema(
    reference_file: str, reference: dict[str, str], file: str, schema: dict[str, str]
) -> list[Problem]:
    """Every file of a source has the same columns with the same types as the first."""
    problems = [
        Problem(file, name, f"is missing here but present in {reference_file}")
        for name in reference
        if name not in schema
    ]
    problems += [
        Problem(file, name, f"is not in {reference_file}; every file needs the same columns")
        for name in schema
        if name not in reference
    ]
    problems += [
        Problem(file, name, f"has type {schema[name]}, but {reference[name]} in {reference_file}")
        for name in reference
        if name in schema and schema[name] != reference[name]
    ]
    return problems


def changes_within_episodes(values: np.ndarray, episode_starts: np.ndarray) -> bool:
    """True when some row differs from the previous row of the same episode.

    `episode_starts` marks the first row of each episode. A column that never changes
    inside an episode (a policy's noise level) also belongs on the episodes table.
    """
    values = np.asarray(values)
    if len(values) < 2:
        return False
    same = values[1:] == values[:-1]
    if np.issubdtype(values.dtype, np.floating):
        same |= np.isnan(values[1:]) & np.isnan(values[:-1])
    if same.ndim > 1:
        same = same.reshape(len(same), -1).all(axis=1)
    return bool(np.any(~same & ~np.asarray(episode_starts[1:], dtype=bool)))


# ---------------------------------------------------------------- step indices and flags


def check_whole_numbers(
    file: str, column: str, values: np.ndarray, episode_ids: np.ndarray
) -> list[Problem]:
    """Every value is a whole number (a step index of 2.5 is refused, never truncated to 2)."""
    values = np.asarray(values)
    if values.dtype.kind != "f":
        return []
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(values) | (values != np.floor(values))
    return first_per_episode(
        file,
        column,
        episode_ids,
        bad,
        lambda row: f"step index {values[row]} is not a whole number",
    )


def as_flags(values: np.ndarray) -> np.ndarray:
    """A terminal or truncation flag column as booleans: True where the value is True or
    exactly 1. Values `check_flag_values` refuses (0.5, 7) are never read as an end, so
    they cannot cut an episode in two before they are reported."""
    values = np.asarray(values)
    if values.dtype == bool:
        return values
    return values == 1


def check_flag_values(
    file: str,
    column: str,
    values: np.ndarray,
    episode_ids: np.ndarray,
    steps: np.ndarray | None = None,
) -> list[Problem]:
    """A flag is a boolean, or a number that is 0 or 1; any other value is refused (a
    NumPy cast would read 0.5 or 7 as true). A non-numeric array is a problem of the file."""
    values = np.asarray(values)
    if values.dtype == bool:
        return []
    if values.dtype.kind not in "iuf":
        return [Problem(file, column, f"must hold booleans or 0/1, has {values.dtype}")]
    bad = (values != 0) & (values != 1)  # NaN is neither
    return first_per_episode(
        file,
        column,
        episode_ids,
        bad,
        lambda row: f"flag value {values[row].item()} is neither 0 nor 1 (nor true/false)",
        steps,
    )


def check_flags_at_episode_ends(
    file: str, column: str, flags: np.ndarray, episode_ids: np.ndarray, steps: np.ndarray
) -> list[Problem]:
    """A terminal or truncation flag is set only on the last step of its episode: an
    episode ends at its terminal step. Rows sorted by (episode_id, t)."""
    flags = as_flags(flags)
    if len(flags) == 0:
        return []
    last = np.ones(len(flags), bool)
    last[:-1] = episode_ids[1:] != episode_ids[:-1]
    bounds = cols.episode_boundaries(episode_ids)
    last_step = np.repeat(np.asarray(steps)[bounds[1:] - 1], np.diff(bounds))
    return first_per_episode(
        file,
        column,
        episode_ids,
        flags & ~last,
        lambda row: (
            f"is set before the episode's last step ({last_step[row]}); an episode ends at "
            "its terminal step: split the episode there or clear the flag"
        ),
        steps,
    )


# ---------------------------------------------------------------- types and stored values


def is_numeric_type(data_type: pa.DataType, vectors: bool = True) -> bool:
    """Integers or floats; with `vectors`, also lists of them and structs of those."""
    if pa.types.is_integer(data_type) or pa.types.is_floating(data_type):
        return True
    if not vectors:
        return False
    if pa.types.is_struct(data_type):
        return all(is_numeric_type(data_type.field(i).type) for i in range(data_type.num_fields))
    if pa.types.is_list(data_type) or pa.types.is_large_list(data_type):
        return is_numeric_type(data_type.value_type, vectors=False)
    if pa.types.is_fixed_size_list(data_type):
        return is_numeric_type(data_type.value_type, vectors=False)
    return False


def check_numeric_type(
    file: str, column: str, data_type: pa.DataType, vectors: bool = True
) -> list[Problem]:
    """An Arrow column of numbers (with `vectors`: or of number vectors, or structs of
    them); strings and booleans are refused, never coerced by a cast."""
    if is_numeric_type(data_type, vectors):
        return []
    kind = "numbers or vectors of numbers" if vectors else "numbers (integers or floats)"
    return [Problem(file, column, f"must hold {kind}, has type {data_type}")]


def check_core_types(
    file: str,
    schema: pa.Schema,
    numbers: Sequence[str],
    vectors: Sequence[str],
    flags: Sequence[str],
) -> list[Problem]:
    """The columns of `schema` have types the engine stores without coercion: `numbers`
    hold integers or floats, `vectors` numbers or vectors (or structs) of numbers, `flags`
    booleans or numbers (whose values `check_flag_values` checks row by row)."""
    problems = []
    for names, allow_vectors in ((numbers, False), (vectors, True)):
        for name in names:
            if name in schema.names:
                data_type = schema.field(name).type
                problems += check_numeric_type(file, name, data_type, allow_vectors)
    for name in flags:
        if name in schema.names:
            data_type = schema.field(name).type
            if not (pa.types.is_boolean(data_type) or is_numeric_type(data_type, False)):
                message = f"must hold booleans or 0/1, has type {data_type}"
                problems.append(Problem(file, name, message))
    return problems


# Step columns the engine computes on or trains on, checked as stored (float32).
STORED_NUMBERS = (cols.OBSERVATION, cols.NEXT_OBSERVATION, cols.ACTION, cols.REWARD)


def check_stored_values(file: str, steps: pa.Table, episodes: pa.Table) -> list[Problem]:
    """The base tables of a part as they will be stored: observations, next observations,
    actions and rewards are present and finite in every row (every field of a struct),
    and so is each episode's return (a sum of float32 rewards may overflow float32).
    Rewards null in every row are unknown (a source without rewards), not missing: the
    returns are then null too, and neither is checked."""
    episode_ids = cols.arrow_to_numpy(steps.column(cols.EPISODE_ID))
    t = cols.arrow_to_numpy(steps.column(cols.T))
    problems: list[Problem] = []
    unknown = rewards_unknown(steps)
    for name in STORED_NUMBERS:
        if name in steps.column_names and not (name == cols.REWARD and unknown):
            for path, array in _leaves(name, steps.column(name)):
                problems += _check_stored_array(file, path, array, episode_ids, t)
    if unknown:
        return problems
    returns = cols.arrow_to_numpy(episodes.column(cols.RETURN))
    for row in np.flatnonzero(~np.isfinite(returns)):
        problems.append(
            Problem(
                file,
                cols.RETURN,
                f"is {returns[row]} in float32: the episode's rewards sum beyond its range",
                int(episodes.column(cols.EPISODE_ID)[int(row)].as_py()),
            )
        )
    return problems


def rewards_unknown(steps: pa.Table) -> bool:
    """Whether a steps table's rewards are unknown: every one null (engine/sources/tables.py,
    `build_tables(reward=None)`)."""
    reward = steps.column(cols.REWARD)
    return steps.num_rows > 0 and reward.null_count == steps.num_rows


def _leaves(name: str, column: pa.ChunkedArray | pa.Array) -> list[tuple[str, pa.Array]]:
    """(dotted path, array) of every non-struct field of a column."""
    array = column
    if isinstance(column, pa.ChunkedArray):  # one chunk (what build_tables makes): no copy
        array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    if not pa.types.is_struct(array.type):
        return [(name, array)]
    return [
        leaf
        for i in range(array.type.num_fields)
        for leaf in _leaves(f"{name}.{array.type.field(i).name}", array.field(i))
    ]


def _check_stored_array(
    file: str, column: str, array: pa.Array, episode_ids: np.ndarray, t: np.ndarray
) -> list[Problem]:
    """Missing rows, and rows with a non-finite float (in any item of a vector)."""
    problems: list[Problem] = []
    valid = np.ones(len(array), bool)
    if array.null_count:
        valid = pc.is_valid(array).to_numpy(zero_copy_only=False)
        problems += first_per_episode(
            file, column, episode_ids, ~valid, lambda row: "missing value", t
        )
    vector = pa.types.is_fixed_size_list(array.type)
    size = array.type.list_size if vector else 1
    # The child values of exactly these rows (slots under a missing row included).
    items = array.values.slice(array.offset * size, len(array) * size) if vector else array
    if not pa.types.is_floating(items.type):
        return problems
    values = cols.arrow_to_numpy(items)  # a missing item becomes NaN
    finite = np.isfinite(values)
    if finite.all():  # the common case: one pass, no per-row work
        return problems
    rows = values.reshape(len(array), size)
    bad = ~finite.reshape(len(array), size).all(axis=1) & valid
    return problems + first_per_episode(
        file,
        column,
        episode_ids,
        bad,
        lambda row: f"non-finite value {(rows[row] if vector else rows[row, 0]).tolist()}",
        t,
    )
