"""Running a query: candidate episodes from the episodes table, the row condition on only
the columns it uses at only the candidate rows, then the selected columns at the rows
that matched; parts read together in batches, so Polars decodes them in parallel."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from engine.dataset import Dataset
from engine.query.plan import Plan, QueryError, plan_query
from engine.query.read import (
    PART,
    START,
    PartReader,
    ReadStats,
    as_dataset,
    episode_rows,
    episode_table,
)
from schemas import steps as cols

# Parts are read together (Polars decodes them in parallel) until their candidate rows add
# up to this many parts' worth: whole parts go 4 at a time, a sparse selection from many
# parts at once. Memory holds one batch; a `limit` is checked in between.
PARTS_PER_BATCH = 4


@dataclass
class QueryResult:
    frame: pl.DataFrame
    plan: Plan
    stats: ReadStats


@dataclass
class _PartMatch:
    """The matching rows of one part, which candidate episode owns each, and the step
    columns already read for the condition (at exactly those rows)."""

    index: int
    candidates: pl.DataFrame
    rows: np.ndarray
    owner: np.ndarray
    condition_steps: pl.DataFrame | None = None


def _cannot_evaluate(condition: pl.Expr, error: Exception) -> QueryError:
    """A condition that parses but does not fit the columns' types (`return > 'abc'`)."""
    return QueryError(f"--where: cannot evaluate {condition}: {str(error).splitlines()[0]}")


def _candidate_episodes(
    dataset: Dataset, plan: Plan, extra_columns: Sequence[str], stats: ReadStats
) -> pl.DataFrame:
    episode_columns = set(dataset.columns("episodes"))
    needed = [
        *(plan.episode_condition.meta.root_names() if plan.episode_condition is not None else []),
        *[c for c in extra_columns if c in episode_columns],
    ]
    episodes = episode_table(dataset, needed, stats, range(dataset.num_parts))
    if plan.episode_condition is not None and episodes.height:
        try:
            episodes = episodes.filter(plan.episode_condition)
        except pl.exceptions.PolarsError as error:
            raise _cannot_evaluate(plan.episode_condition, error) from None
    return episodes


def _match_parts(
    dataset: Dataset,
    plan: Plan,
    indices: Sequence[int],
    candidates: pl.DataFrame,
    reader: PartReader,
) -> list[_PartMatch]:
    """Apply the row condition to the candidate rows of some parts, read together."""
    matches = []
    for index in indices:
        part_candidates = candidates.filter(pl.col(PART) == index)
        if not part_candidates.height:
            reader.stats.parts_skipped += 1
            continue
        rows, owner = episode_rows(
            part_candidates[START].to_numpy(), part_candidates[cols.LENGTH].to_numpy()
        )
        matches.append(_PartMatch(index, part_candidates, rows, owner))
    if plan.row_condition is None:
        return matches
    whole_parts = plan.episode_condition is None
    if plan.row_step_columns:
        frames = reader.collect(
            [
                reader.scan(m.index, plan.row_step_columns, None if whole_parts else m.rows)
                for m in matches
            ]
        )
    else:
        frames = [pl.DataFrame() for _ in matches]
    for match, frame in zip(matches, frames):
        values = frame
        if plan.row_episode_columns:
            broadcast = match.candidates.select(plan.row_episode_columns)[match.owner]
            values = pl.concat([values, broadcast], how="horizontal") if values.width else broadcast
        if not values.width:
            values = pl.DataFrame({"__row": match.rows})
        try:
            keep = values.select(plan.row_condition.fill_null(False).alias("keep")).to_series()
        except pl.exceptions.PolarsError as error:
            raise _cannot_evaluate(plan.row_condition, error) from None
        keep_array = np.full(len(match.rows), bool(keep[0])) if keep.len() == 1 else keep.to_numpy()
        match.rows = match.rows[keep_array]
        match.owner = match.owner[keep_array]
        match.condition_steps = frame.filter(pl.Series(keep_array)) if frame.width else None
    return matches


def batches(
    dataset: Dataset, candidates: pl.DataFrame, limit: int | None = None
) -> list[list[int]]:
    """Every part, in order, cut into batches of at most PARTS_PER_BATCH largest parts'
    worth of candidate rows, or `limit` rows (a part with more is a batch of its own)."""
    rows = np.zeros(dataset.num_parts, dtype=np.int64)
    if candidates.height:
        per_part = candidates.group_by(PART).agg(pl.col(cols.LENGTH).sum())
        rows[per_part[PART].to_numpy()] = per_part[cols.LENGTH].to_numpy()
    budget = PARTS_PER_BATCH * max((part.steps for part in dataset.manifest.parts), default=0)
    if limit is not None:
        budget = min(budget, limit)
    cut: list[list[int]] = []
    total = 0
    for index, part_rows in enumerate(rows.tolist()):
        if not cut or (total + part_rows > budget and total > 0):
            cut.append([])
            total = 0
        cut[-1].append(index)
        total += part_rows
    return cut


def query(
    dataset: Dataset | str,
    where: str | None = None,
    *,
    level: str = "steps",
    select: Sequence[str] | None = None,
    limit: int | None = None,
) -> QueryResult:
    """Rows of `level` matching `where` (Polars SQL), with the `select` columns.

    On steps, a condition on episode columns keeps all steps of the matching episodes
    (a semi-join on episode_id); episode columns in `select` are repeated on every step.
    `limit` stops reading as soon as enough rows matched (in episode_id, t order).
    """
    dataset = as_dataset(dataset)
    plan = plan_query(dataset, where, level, select)
    stats = ReadStats()
    if level == "episodes":
        frame = _candidate_episodes(dataset, plan, plan.select, stats)
        frame = frame.select(plan.select) if frame.height else _empty(dataset, plan)
        return QueryResult(frame.head(limit) if limit is not None else frame, plan, stats)

    candidates = _candidate_episodes(
        dataset, plan, [*plan.row_episode_columns, *plan.select_episode_columns], stats
    )
    reader = PartReader(dataset, "steps", stats)
    step_select = [c for c in plan.select if c not in plan.select_episode_columns]
    pieces: list[pl.DataFrame] = []
    found = 0
    # Only when the episodes decide alone are candidate rows the rows a limit counts.
    rows_limit = limit if plan.row_condition is None else None
    for batch in batches(dataset, candidates, rows_limit):
        if (limit is not None and found >= limit) or not candidates.height:
            stats.parts_skipped += len(batch)
            continue
        matches = _match_parts(dataset, plan, batch, candidates, reader)
        scans = []
        for match in matches:
            if limit is not None:
                keep = max(limit - found, 0)
                match.rows, match.owner = match.rows[:keep], match.owner[:keep]
                if match.condition_steps is not None:
                    match.condition_steps = match.condition_steps.head(keep)
            found += len(match.rows)
            already = match.condition_steps.columns if match.condition_steps is not None else []
            to_read = [c for c in step_select if c not in already]
            whole = len(match.rows) == dataset.manifest.parts[match.index].steps
            if to_read and len(match.rows):
                scans.append(reader.scan(match.index, to_read, None if whole else match.rows))
            else:
                scans.append(pl.LazyFrame())
        for match, frame in zip(matches, reader.collect(scans)):
            if not len(match.rows):
                continue
            already = match.condition_steps.columns if match.condition_steps is not None else []
            columns = [frame] if frame.width else []
            if match.condition_steps is not None:
                columns.append(match.condition_steps.select(c for c in already if c in step_select))
            if plan.select_episode_columns:
                columns.append(match.candidates.select(plan.select_episode_columns)[match.owner])
            columns = [c for c in columns if c.width]
            piece = pl.concat(columns, how="horizontal") if len(columns) > 1 else columns[0]
            pieces.append(piece.select(plan.select))
    frame = pl.concat(pieces) if pieces else _empty(dataset, plan)
    return QueryResult(frame, plan, stats)


def _empty(dataset: Dataset, plan: Plan) -> pl.DataFrame:
    """A zero-row frame with the right schema (columns of the level win over the other)."""
    other = "episodes" if plan.level == "steps" else "steps"
    schema = {f.name: f.type for f in dataset.arrow_schema(other)}
    schema.update({f.name: f.type for f in dataset.arrow_schema(plan.level)})
    return pl.from_arrow(pa.schema([(c, schema[c]) for c in plan.select]).empty_table())


def count(dataset: Dataset | str, where: str | None = None, *, level: str = "steps") -> int:
    """How many rows match, reading only the columns the condition uses."""
    dataset = as_dataset(dataset)
    plan = plan_query(dataset, where, level, [cols.EPISODE_ID])
    if level == "episodes" or plan.row_condition is None:
        candidates = _candidate_episodes(dataset, plan, [], ReadStats())
        if level == "episodes":
            return candidates.height
        return int(candidates[cols.LENGTH].sum()) if candidates.height else 0
    return matching_episodes(dataset, where, with_counts=True)[1]


def matching_episodes(
    dataset: Dataset | str, where: str | None, *, with_counts: bool = False
) -> pl.DataFrame | tuple[pl.DataFrame, int]:
    """Episodes (episode_id) with at least one step matching `where`, in order; with
    `with_counts` also the number of matching steps."""
    dataset = as_dataset(dataset)
    plan = plan_query(dataset, where, "steps", [cols.EPISODE_ID])
    stats = ReadStats()
    candidates = _candidate_episodes(dataset, plan, plan.row_episode_columns, stats)
    if plan.row_condition is None or not candidates.height:
        steps = int(candidates[cols.LENGTH].sum()) if candidates.height else 0
        selected = candidates.select(cols.EPISODE_ID) if candidates.height else pl.DataFrame()
        return (selected, steps) if with_counts else selected
    reader = PartReader(dataset, "steps", stats)
    kept = []
    steps = 0
    for batch in batches(dataset, candidates):
        for match in _match_parts(dataset, plan, batch, candidates, reader):
            steps += len(match.rows)
            kept.append(match.candidates[np.unique(match.owner)].select(cols.EPISODE_ID))
    selected = pl.concat(kept) if kept else pl.DataFrame()
    return (selected, steps) if with_counts else selected
