"""`skill`: an ordered skill level per episode, copied onto its steps.

The score of an episode is its return (`source=return`, the default) or an episode-level
metadata column: a noise level (less noise = more skill), a rating, or a policy id with an
explicit `order` from worst to best. Percentiles are over the whole dataset (two passes:
`setup` gathers every part's episode scores, the driver sorts them):

    skill_percentile = (#episodes scoring lower + 0.5 * #episodes scoring the same) / #episodes
    skill_level      = min(floor(skill_percentile * levels), levels - 1)      (0 = least skilled)
    skill            = the level's label, a string column (dictionary-encoded in Parquet;
                       Parquet does not keep a dictionary's order, so order by skill_level,
                       or in Polars cast to `pl.Enum(labels)` with the labels of the report)

Labels: levels=2 novice, expert; 3 novice, intermediate, expert; 4 novice, intermediate,
advanced, expert; 5 novice, beginner, intermediate, advanced, expert; otherwise level-0 ...
level-(levels-1). Past `exact_limit` episodes, percentiles come from an evenly spaced grid
of that many sorted scores (error below 1 / exact_limit).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from relabelers.base import (
    Columns,
    Inputs,
    Output,
    Params,
    Part,
    Relabeler,
    RelabelError,
    require_rewards,
)
from schemas import steps as cols

SKILL = "skill"
SKILL_LEVEL = "skill_level"
SKILL_PERCENTILE = "skill_percentile"

NAMED_LEVELS = {
    2: ("novice", "expert"),
    3: ("novice", "intermediate", "expert"),
    4: ("novice", "intermediate", "advanced", "expert"),
    5: ("novice", "beginner", "intermediate", "advanced", "expert"),
}


def level_labels(levels: int) -> tuple[str, ...]:
    return NAMED_LEVELS.get(levels) or tuple(f"level-{i}" for i in range(levels))


def percentiles(scores: np.ndarray, sorted_reference: np.ndarray, total: int) -> np.ndarray:
    """Mid-rank percentile of each score among `sorted_reference` (of `total` episodes)."""
    lower = np.searchsorted(sorted_reference, scores, side="left")
    upper = np.searchsorted(sorted_reference, scores, side="right")
    scale = total / len(sorted_reference)
    return (lower + 0.5 * (upper - lower)) * scale / total


class SkillParams(Params):
    levels: int = Field(4, ge=2, le=100, description="Number of ordered skill levels.")
    source: str = Field(
        cols.RETURN,
        description="Episode column scoring skill: return (default), a noise level, a rating, a policy id.",
    )
    higher_is_better: bool | None = Field(
        None,
        description="Whether a higher score means more skill; default: False when the source "
        "name contains 'noise', else True.",
    )
    order: list[str] | None = Field(
        None,
        description="For a string source (policy ids): its values from least to most skilled "
        "(on the command line separated by ';').",
    )
    exact_limit: int = Field(
        100_000, ge=100, description="Up to this many episodes, percentiles are exact."
    )


def _as_list(value: Any) -> Any:
    return value.split(";") if isinstance(value, str) else value


class SkillRelabeler(Relabeler):
    """Skill levels from dataset-wide quantiles of returns or of a metadata column."""

    name = "skill"
    version = "1.0"
    Params = SkillParams

    def __init__(self, params=None, seed: int = 0):
        if isinstance(params, dict) and "order" in params:
            params = {**params, "order": _as_list(params["order"])}
        super().__init__(params, seed)
        # Set by `setup`: every episode's score sorted (or a grid of them), and the report.
        self.sorted_scores: np.ndarray | None = None
        self.report: dict[str, Any] = {}

    @property
    def higher_is_better(self) -> bool:
        if self.params.higher_is_better is not None:
            return self.params.higher_is_better
        return "noise" not in self.params.source.lower()

    def reads(self) -> Columns:
        return Columns(episodes=(cols.EPISODE_ID, self.params.source))

    def writes(self) -> Columns:
        names = (SKILL, SKILL_LEVEL, SKILL_PERCENTILE)
        return Columns(steps=names, episodes=names)

    def setup(self, inputs: Inputs) -> None:
        """Check the source's type, then sort the scores of every episode of the dataset."""
        if self.params.source == cols.RETURN:
            why = " to rank episodes by return (or rank by another column: skill:source=COLUMN)"
            require_rewards(self.name, inputs, why)
        self.check_source(inputs.episodes_schema)
        summaries = inputs.summarize(self.part_scores)
        self.sorted_scores, total, exact = merge_scores(summaries, self.params.exact_limit)
        self.report = {
            "episodes": total,
            "exact": exact,
            "labels": list(level_labels(self.params.levels)),
            "higher_is_better": self.higher_is_better,
        }

    def check_source(self, episodes: pa.Schema) -> None:
        data_type = episodes.field(self.params.source).type
        if pa.types.is_string(data_type) or pa.types.is_large_string(data_type):
            if not self.params.order:
                raise RelabelError(
                    f"relabeler 'skill': source {self.params.source!r} holds strings; give "
                    "order=worst;...;best to rank its values"
                )
        elif not (pa.types.is_integer(data_type) or pa.types.is_floating(data_type)):
            raise RelabelError(
                f"relabeler 'skill': source {self.params.source!r} is {data_type}; expected "
                "numbers, or strings with an order"
            )
        elif self.params.order:
            raise RelabelError(
                f"relabeler 'skill': source {self.params.source!r} holds numbers, ranked by "
                "value; order= is for string sources (drop it, or choose a string source)"
            )

    def scores(self, episodes: pa.Table) -> np.ndarray:
        """Higher = more skilled, as float64; clear errors for missing or unknown values."""
        column = episodes.column(self.params.source)
        ids = episodes.column(cols.EPISODE_ID).to_numpy()
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise RelabelError(
                f"relabeler 'skill': episode {int(ids[row])} has no {self.params.source!r} value"
            )
        if self.params.order:
            values = np.asarray(column.to_pylist(), dtype=object)
            rank = {value: i for i, value in enumerate(self.params.order)}
            unknown = [v for v in np.unique(values.astype(str)) if v not in rank]
            if unknown:
                raise RelabelError(
                    f"relabeler 'skill': {self.params.source!r} values {unknown[:5]} are not in "
                    f"order={self.params.order}"
                )
            scores = np.array([rank[v] for v in values.astype(str)], dtype=np.float64)
        else:
            scores = np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)
        bad = ~np.isfinite(scores)
        if bad.any():
            raise RelabelError(
                f"relabeler 'skill': {self.params.source!r} is not finite for episode "
                f"{int(ids[np.flatnonzero(bad)[0]])}"
            )
        return scores if self.higher_is_better else -scores

    def part_scores(self, steps: pa.Table, episodes: pa.Table, part: Part) -> dict[str, Any]:
        """One part's scores, sorted (a grid of `exact_limit` of them when more)."""
        scores = np.sort(self.scores(episodes))
        limit = self.params.exact_limit
        if len(scores) > limit:
            scores = scores[np.linspace(0, len(scores) - 1, limit).round().astype(np.int64)]
        return {"scores": scores, "episodes": int(episodes.num_rows)}

    def relabel(self, steps: pa.Table, episodes: pa.Table, part: Part) -> Output:
        if self.sorted_scores is None:
            raise RelabelError(
                f"{part}: relabeler 'skill' needs the dataset's scores from setup(); for "
                "tables in memory use relabelers.base.relabel_tables"
            )
        levels = self.params.levels
        reference = self.sorted_scores
        percentile = percentiles(self.scores(episodes), reference, len(reference))
        level = np.minimum((percentile * levels).astype(np.int64), levels - 1)
        episode_ids = episodes.column(cols.EPISODE_ID).to_numpy()
        step_ids = steps.column(cols.EPISODE_ID).to_numpy()
        # Steps are sorted by episode: each step's episode row by binary search.
        step_rows = np.searchsorted(episode_ids, step_ids)
        if len(step_ids) and (
            step_rows.max() >= len(episode_ids) or np.any(episode_ids[step_rows] != step_ids)
        ):
            raise RelabelError("relabeler 'skill': steps belong to episodes missing from the part")
        return Output(
            steps=self._table(level[step_rows], percentile[step_rows]),
            episodes=self._table(level, percentile),
        )

    def finish(self, reports: list[dict[str, Any]]) -> dict[str, Any]:
        return dict(self.report)

    def _table(self, level: np.ndarray, percentile: np.ndarray) -> pa.Table:
        labels = pa.array(level_labels(self.params.levels), type=pa.string())
        return pa.table(
            {
                SKILL: labels.take(pa.array(level, type=pa.int64())),
                SKILL_LEVEL: pa.array(level, type=pa.int8()),
                SKILL_PERCENTILE: pa.array(percentile, type=pa.float32()),
            }
        )


def merge_scores(summaries: list[dict[str, Any]], exact_limit: int) -> tuple[np.ndarray, int, bool]:
    """Every part's sorted scores merged: (sorted scores or a grid of `exact_limit` of them,
    the number of episodes, whether the scores are exact)."""
    total = sum(s["episodes"] for s in summaries)
    if total == 0:
        raise RelabelError("relabeler 'skill': the dataset has no episodes")
    # Parts sampled down to a grid weigh as many episodes as they stand for.
    weights = np.concatenate(
        [np.full(len(s["scores"]), s["episodes"] / max(len(s["scores"]), 1)) for s in summaries]
    )
    scores = np.concatenate([np.asarray(s["scores"], dtype=np.float64) for s in summaries])
    order = np.argsort(scores, kind="stable")
    scores, weights = scores[order], weights[order]
    exact = bool(np.all(weights == 1.0)) and total <= exact_limit
    if not exact:
        cumulative = np.cumsum(weights) - weights / 2
        scores = np.interp((np.arange(exact_limit) + 0.5) / exact_limit * total, cumulative, scores)
    return scores, total, exact
