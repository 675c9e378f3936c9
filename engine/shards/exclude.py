"""Which steps of a part go into the shards: `--exclude` and null conditioning values.

Held out by design: `shard --exclude "instruction IN ('go to the red key')"` keeps every
step the predicate matches out of the shards. The predicate is Polars SQL, read as
`hindsight query --where` reads it: step columns first, an episode-only column broadcast to
its episode's steps, and only row-local operations (it is evaluated part by part). A step
whose text condition is null (or the `embed` relabeler's vector of a null text) has nothing
to condition on and is dropped as well (counted per column); an episode left with no step
is dropped whole. Both passes of the shard job (the vocabulary and the shards) apply the
same filter, so a held-out text adds no word to the
vocabulary. The index records the predicate, the counts and the distinct values of the
conditioning columns (and of the predicate's string columns) on the excluded steps (`ask`
warns when asked for one of them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from engine.dataset import Dataset
from engine.query.plan import QueryError, parse_where
from engine.query.row_local import across_rows
from engine.shards.conditions import TEXT_SEPARATOR, ConditionColumn, joined_texts
from schemas import steps as cols
from schemas.shard_index import ExclusionInfo, ShardError

# Most distinct excluded values recorded per condition column.
MAX_EXCLUDED_VALUES = 1000


@dataclass(frozen=True)
class Exclusion:
    """A checked `--exclude` predicate and the columns it reads at each level."""

    predicate: str
    step_columns: tuple[str, ...]
    episode_columns: tuple[str, ...]

    @property
    def expression(self) -> pl.Expr:
        return pl.sql_expr(self.predicate)


def plan_exclusion(dataset: Dataset, predicate: str | None) -> Exclusion | None:
    """The predicate checked against the dataset's columns (ShardError naming what is wrong:
    a syntax error, an unknown column, an operation that is not row-local)."""
    if predicate is None or not predicate.strip():
        return None
    try:
        expression = parse_where(predicate)
    except QueryError as error:
        raise ShardError(str(error).replace("--where", "--exclude")) from None
    step_columns, episode_columns = dataset.columns("steps"), dataset.columns("episodes")
    names = list(dict.fromkeys(expression.meta.root_names()))
    unknown = [name for name in names if name not in step_columns + episode_columns]
    if unknown:
        raise ShardError(
            f"{dataset.uri}: --exclude {predicate!r} names unknown column(s) {unknown}; step "
            f"columns: {', '.join(step_columns)}; episode columns: {', '.join(episode_columns)}"
        )
    if what := across_rows(expression):
        raise ShardError(
            f"--exclude {predicate!r}: {what} is not row-local; the predicate is evaluated part "
            "by part, so it may use only per-row operations (docs/query.md lists them)"
        )
    return Exclusion(
        predicate,
        tuple(name for name in names if name in step_columns),
        tuple(name for name in names if name not in step_columns),
    )


@dataclass
class StepFilter:
    """The steps of one part that go into the shards, and why the others do not."""

    keep: np.ndarray  # bool [steps of the part]
    keep_episodes: np.ndarray | None = None  # bool [episodes of the part]: any step kept
    kept_lengths: np.ndarray | None = None  # int64 [episodes of the part]: steps kept
    excluded_steps: int = 0  # matched by the predicate
    excluded_episodes: int = 0  # with a step the predicate matched
    null_steps: dict[str, int] = field(default_factory=dict)  # by text condition (not excluded)
    dropped_episodes: int = 0  # left with no step at all
    values: dict[str, set[str]] = field(default_factory=dict)  # condition values excluded


def needs_filter(conditions: Sequence[ConditionColumn], exclusion: Exclusion | None) -> bool:
    """Whether any step can be dropped: an exclusion, or a text condition (nulls)."""
    return exclusion is not None or any(c.type == "text" or c.embedded_text for c in conditions)


def read_filter(
    dataset: Dataset,
    part: int,
    conditions: Sequence[ConditionColumn],
    exclusion: Exclusion | None,
) -> StepFilter | None:
    """The filter of part `part` (None: every step is kept, nothing to check)."""
    if not needs_filter(conditions, exclusion):
        return None
    labelled = [c for c in conditions if c.type in ("text", "categorical") or c.embedded_text]
    step_heads = {c.name.partition(".")[0] for c in labelled if c.level == "steps"}
    episode_heads = {c.name.partition(".")[0] for c in labelled if c.level == "episodes"}
    if exclusion is not None:
        step_heads |= set(exclusion.step_columns)
        episode_heads |= set(exclusion.episode_columns)
    steps = dataset.read_part(part, "steps", [cols.EPISODE_ID, *sorted(step_heads)])
    episodes = dataset.read_part(part, "episodes", [cols.LENGTH, *sorted(episode_heads)])
    lengths = episodes.column(cols.LENGTH).to_numpy().astype(np.int64)
    if int(lengths.sum()) != steps.num_rows:
        raise ShardError(
            f"{dataset.uri} part {part}: the steps do not match the episode lengths "
            f"({steps.num_rows} steps, lengths add up to {int(lengths.sum())})"
        )
    episode_of_step = pa.array(np.repeat(np.arange(len(lengths)), lengths))

    def step_column(name: str, level: str) -> pa.ChunkedArray | pa.Array:
        if level == "steps":
            return cols.column_by_path(steps, name)
        return cols.column_by_path(episodes, name).take(episode_of_step)

    excluded = np.zeros(steps.num_rows, dtype=bool)
    if exclusion is not None:
        frame = pl.from_arrow(
            pa.table(
                {name: step_column(name, "steps") for name in exclusion.step_columns}
                | {name: step_column(name, "episodes") for name in exclusion.episode_columns}
            )
        )
        try:
            matched = frame.select(exclusion.expression.fill_null(False).alias("excluded"))
        except pl.exceptions.PolarsError as error:
            raise ShardError(
                f"{dataset.uri} part {part}: --exclude {exclusion.predicate!r} cannot be "
                f"evaluated: {str(error).splitlines()[0]}"
            ) from None
        series = matched.to_series()
        if series.dtype != pl.Boolean:
            raise ShardError(
                f"--exclude {exclusion.predicate!r} gives {series.dtype} values, not true/false"
            )
        excluded = series.to_numpy().astype(bool) if steps.num_rows else excluded
    keep = ~excluded
    result = StepFilter(keep=keep, excluded_steps=int(excluded.sum()))
    if exclusion is not None and excluded.any():
        # String columns of the predicate too: an `embed` vector condition is asked for in
        # the words of the column it was embedded from.
        for name in exclusion.step_columns + exclusion.episode_columns:
            level = "steps" if name in exclusion.step_columns else "episodes"
            column = step_column(name, level)
            if _is_text_type(column.type):
                chunk = pa.chunked_array([column]) if isinstance(column, pa.Array) else column
                result.values[name] = distinct_texts(
                    chunk.combine_chunks().filter(pa.array(excluded))
                )
    for condition in labelled:
        column = step_column(condition.name, condition.level)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if excluded.any() and not condition.embedded_text:
            result.values[condition.name] = distinct_texts(column.filter(pa.array(excluded)))
        if condition.type == "text" or condition.embedded_text:
            null = _is_null_text(column) & keep
            result.null_steps[condition.name] = int(null.sum())
            keep &= ~null
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    kept_per_episode = _sum_per_episode(keep, starts, lengths)
    result.excluded_episodes = int((_sum_per_episode(excluded, starts, lengths) > 0).sum())
    result.dropped_episodes = int((kept_per_episode == 0).sum())
    result.keep = keep
    result.keep_episodes = kept_per_episode > 0
    result.kept_lengths = kept_per_episode
    return result


def kept_rows(column: pa.ChunkedArray, level: str, found: StepFilter | None) -> pa.ChunkedArray:
    """The rows of a step or episode column that go into the shards."""
    if found is None:
        return column
    mask = found.keep if level == "steps" else found.keep_episodes
    return column.filter(pa.array(mask))


def _sum_per_episode(flags: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    totals = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    return totals[starts + lengths] - totals[starts]


def _is_text_type(data_type: pa.DataType) -> bool:
    if pa.types.is_dictionary(data_type):
        data_type = data_type.value_type
    if pa.types.is_list(data_type) or pa.types.is_large_list(data_type):
        data_type = data_type.value_type
    return pa.types.is_string(data_type) or pa.types.is_large_string(data_type)


def _is_null_text(column: pa.Array) -> np.ndarray:
    """A step with no text: a null, or an empty list of paraphrases."""
    null = column.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        null |= pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False) == 0
    return null


def distinct_texts(column: pa.Array) -> set[str]:
    """The distinct strings of a label or text column (each paraphrase of a list apart)."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(pa.string())
    unique = pc.unique(joined_texts(column)).drop_null().to_pylist()
    return {text for joined in unique for text in str(joined).split(TEXT_SEPARATOR)}


def combine_filters(
    exclusion: Exclusion | None, filters: Sequence[StepFilter | None]
) -> ExclusionInfo | None:
    """The index's record of what was left out, over every part (None: nothing could be)."""
    present = [f for f in filters if f is not None]
    if exclusion is None and not present:
        return None
    null_steps: dict[str, int] = {}
    values: dict[str, set[str]] = {}
    for found in present:
        for name, count in found.null_steps.items():
            null_steps[name] = null_steps.get(name, 0) + count
        for name, texts in found.values.items():
            values.setdefault(name, set()).update(texts)
    return ExclusionInfo(
        predicate=exclusion.predicate if exclusion else None,
        excluded_steps=sum(f.excluded_steps for f in present),
        excluded_episodes=sum(f.excluded_episodes for f in present),
        null_steps=null_steps,
        dropped_episodes=sum(f.dropped_episodes for f in present),
        values={name: sorted(texts)[:MAX_EXCLUDED_VALUES] for name, texts in values.items()},
        values_truncated=sorted(n for n, t in values.items() if len(t) > MAX_EXCLUDED_VALUES),
    )
