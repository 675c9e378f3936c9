"""Validation of step data before anything is written.

Every rule is a vectorized check over NumPy arrays that returns `Problem`s naming the file,
the episode (when the problem belongs to one) and the column. Ingest collects the problems
of a whole source first; it then either fails with all of them, or, with `--on-error skip`,
leaves out the episodes they name and writes a report. A problem without an episode
concerns the whole file and can never be skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from schemas import steps as cols

MAX_PROBLEMS_SHOWN = 20


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, precise enough to find and fix it."""

    file: str
    column: str
    message: str
    episode: int | None = None

    def __str__(self) -> str:
        where = self.file if self.episode is None else f"{self.file}: episode {self.episode}"
        return f"{where}: column {self.column!r}: {self.message}"

    def to_dict(self) -> dict:
        return asdict(self)


class ValidationError(ValueError):
    """The input has problems; nothing was written."""

    def __init__(self, problems: Sequence[Problem], hint: str = ""):
        self.problems = list(problems)
        shown = "\n  ".join(str(p) for p in self.problems[:MAX_PROBLEMS_SHOWN])
        more = len(self.problems) - MAX_PROBLEMS_SHOWN
        text = f"{len(self.problems)} problem(s) in the input, nothing was written:\n  {shown}"
        if more > 0:
            text += f"\n  ... and {more} more"
        if hint:
            text += f"\n{hint}"
        super().__init__(text)


def _first_per_episode(
    file: str, column: str, episode_ids: np.ndarray, bad: np.ndarray, describe
) -> list[Problem]:
    """One problem per episode with at least one bad row (the first bad row describes it)."""
    rows = np.flatnonzero(bad)
    if len(rows) == 0:
        return []
    _, first = np.unique(episode_ids[rows], return_index=True)
    return [Problem(file, column, describe(int(rows[i])), int(episode_ids[rows[i]])) for i in first]


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
    problems = _first_per_episode(
        file,
        step_column,
        episode_ids,
        starts & (t != 0),
        lambda row: f"starts at step {t[row]}, expected 0 (missing steps)",
    )
    inside = ~starts
    problems += _first_per_episode(
        file,
        step_column,
        episode_ids,
        inside & (t == previous),
        lambda row: f"step {t[row]} appears more than once",
    )
    problems += _first_per_episode(
        file,
        step_column,
        episode_ids,
        inside & (t > previous + 1),
        lambda row: (
            f"steps {previous[row] + 1}..{t[row] - 1} are missing (gap after step {previous[row]})"
        ),
    )
    return problems


def check_finite(
    file: str, column: str, values: np.ndarray, episode_ids: np.ndarray
) -> list[Problem]:
    """Every value of a numeric column is finite (no NaN, no infinity)."""
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.floating):
        return []
    bad = ~np.isfinite(values)
    if bad.ndim > 1:
        bad = bad.reshape(len(bad), -1).any(axis=1)
    return _first_per_episode(
        file, column, episode_ids, bad, lambda row: f"non-finite value {values[row].tolist()}"
    )


def check_not_null(
    file: str, column: str, valid: np.ndarray, episode_ids: np.ndarray
) -> list[Problem]:
    """No missing values in a required column."""
    return _first_per_episode(
        file, column, episode_ids, ~np.asarray(valid, dtype=bool), lambda row: "missing value"
    )


def check_row_shapes(
    file: str, column: str, lengths: np.ndarray, expected: int, episode_ids: np.ndarray
) -> list[Problem]:
    """Every row of a vector column has the same number of values."""
    lengths = np.asarray(lengths)
    return _first_per_episode(
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
