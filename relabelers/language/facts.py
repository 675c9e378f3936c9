"""Facts: what each episode (or segment) did, computed from the data, vectorized per column.

A *unit* is an episode (per=episode) or `segment` consecutive steps of one (per=segment).
`units_of` finds the units of a part and their returns; `unit_facts` summarizes each unit
as a small JSON-able dict (env id, length, return and its percentile over the dataset, how
it ended, whether a goal was reached, action and state statistics, the skill label when
there is one): the only thing a describer sees. `part_returns` / `merge_quantiles` give the
dataset-wide return percentiles from one pass over every part.

A dataset ingested without rewards has null rewards: its units' returns are unknown (NaN
here), and their facts say `"reward": "unknown"` instead of a return, its percentile and
the reward range, so no description claims a return nobody measured.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from relabelers.base import RelabelError
from relabelers.language.params import LanguageParams
from schemas import steps as cols
from schemas.steps import arrow_to_numpy, episode_boundaries

SUCCESS_COLUMNS = ("goal_reached", "is_success", "success")
# Up to this many units a part sends its returns exactly; beyond, a quantile grid.
EXACT_RETURNS = 20_000
GRID_POINTS = 2_001


def units_of(steps: pa.Table, per: str, segment: int) -> dict[str, np.ndarray]:
    """Where each unit (episode or segment) starts and ends in the step table, and its return."""
    episode_ids = steps.column(cols.EPISODE_ID).to_numpy()
    bounds = episode_boundaries(episode_ids)
    lengths = np.diff(bounds)
    total = len(episode_ids)
    if per == "episode":
        starts = bounds[:-1]
        segment_index = np.zeros(len(starts), dtype=np.int32)
    else:
        position = np.arange(total) - np.repeat(bounds[:-1], lengths)
        starts = np.flatnonzero(position % segment == 0)
        segment_index = (position[starts] // segment).astype(np.int32)
    ends = np.append(starts[1:], total).astype(np.int64)
    reward = _rewards(steps)  # NaN where unknown
    unit_return = np.add.reduceat(reward, starts) if len(starts) else np.zeros(0)
    return {
        "start": starts.astype(np.int64),
        "end": ends,
        "length": ends - starts,
        "episode_id": episode_ids[starts] if len(starts) else episode_ids[:0],
        "segment": segment_index,
        "episode_end": np.isin(ends, bounds[1:]),
        "return": unit_return,
    }


def unit_facts(
    steps: pa.Table,
    episodes: pa.Table,
    units: dict[str, np.ndarray],
    return_quantiles: list[float],
    params: LanguageParams,
) -> list[dict[str, Any]]:
    """The factual summary of every unit, as small JSON-able dicts (vectorized per column)."""
    starts, ends, lengths = units["start"], units["end"], units["length"]
    count = len(starts)
    if count == 0:
        return []
    last = ends - 1
    reward = _rewards(steps)
    terminated = steps.column(cols.TERMINATED).to_numpy(zero_copy_only=False)[last]
    truncated = steps.column(cols.TRUNCATED).to_numpy(zero_copy_only=False)[last]
    percentile = np.interp(units["return"], return_quantiles, np.linspace(0, 100, 101))

    # Episode-level values, looked up by id (the episode table is the part's episodes).
    episode_ids = episodes.column(cols.EPISODE_ID).to_numpy()
    order = np.argsort(episode_ids, kind="stable")
    row = order[np.searchsorted(episode_ids, units["episode_id"], sorter=order)]
    if not np.array_equal(episode_ids[row], units["episode_id"]):
        missing = sorted(set(units["episode_id"].tolist()) - set(episode_ids.tolist()))[:5]
        raise RelabelError(
            f"language: episodes {missing} have steps but no row in the episodes table"
        )

    def episode_column(name: str) -> list[Any] | None:
        if name not in episodes.column_names:
            return None
        return episodes.column(name).take(pa.array(row)).to_pylist()

    env_id = episode_column(cols.ENV_ID)
    source = episode_column(cols.SOURCE)
    skill = episode_column("skill")
    if skill is None and "skill" in steps.column_names:
        skill = steps.column("skill").take(pa.array(starts)).to_pylist()

    goal_reached, goal_distance = _goal(steps, episodes, row, last, units, params)
    action = _action_stats(steps.column(cols.ACTION), starts, lengths)
    displacement = (
        _displacement(steps.column(cols.OBSERVATION), starts, last)
        if cols.OBSERVATION in steps.column_names
        else None
    )
    reward_min = np.minimum.reduceat(reward, starts)
    reward_max = np.maximum.reduceat(reward, starts)

    facts = []
    for i in range(count):
        ended = units["episode_end"][i]
        outcome = (
            "terminated"
            if ended and terminated[i]
            else "truncated"
            if ended and truncated[i]
            else "ended"
            if ended
            else "continues"
        )
        fact: dict[str, Any] = {"env_id": env_id[i] if env_id else None}
        if source and source[i] is not None:
            fact["source"] = source[i]
        fact["episode_id"] = int(units["episode_id"][i])
        if params.per == "segment":
            fact["segment"] = int(units["segment"][i])
            fact["first_step"] = int(units["segment"][i]) * params.segment
        fact["length"] = int(lengths[i])
        known = bool(np.isfinite(units["return"][i]))
        if known:
            fact["return"] = _round(units["return"][i])
            fact["return_percentile"] = int(round(float(percentile[i])))
        else:
            fact["reward"] = "unknown"
        fact["outcome"] = outcome
        if goal_reached is not None:
            fact["goal_reached"] = bool(goal_reached[i])
        if goal_distance is not None:
            fact["final_goal_distance"] = _round(goal_distance[i])
        if skill is not None and skill[i] is not None:
            fact["skill"] = skill[i]
        if known:
            fact["reward_min"] = _round(reward_min[i])
            fact["reward_max"] = _round(reward_max[i])
        fact["action"] = {k: v[i] for k, v in action.items()}
        if displacement is not None:
            fact["state_displacement"] = _round(displacement[i])
        facts.append(fact)
    return facts


def _goal(
    steps: pa.Table,
    episodes: pa.Table,
    row: np.ndarray,
    last: np.ndarray,
    units: dict[str, np.ndarray],
    params: LanguageParams,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Goal reached (and the final distance) from a success column or a GoalEnv observation."""
    reached = distance = None
    if cols.OBSERVATION not in steps.column_names:  # pixels only: no GoalEnv observation
        observation = None
    else:
        observation = steps.column(cols.OBSERVATION)
    if observation is not None and pa.types.is_struct(observation.type):
        names = {observation.type.field(i).name for i in range(observation.type.num_fields)}
        if {"achieved_goal", "desired_goal"} <= names:
            achieved = cols.struct_to_numpy(observation, "achieved_goal")[last]
            desired = cols.struct_to_numpy(observation, "desired_goal")[last]
            difference = np.asarray(achieved, float) - np.asarray(desired, float)
            distance = np.linalg.norm(difference.reshape(len(last), -1), axis=1)
            reached = distance <= params.goal_threshold
    for name in SUCCESS_COLUMNS:
        if name in steps.column_names:
            reached = arrow_to_numpy(steps.column(name))[last].astype(bool)
            break
        if name in episodes.column_names and params.per == "episode":
            reached = arrow_to_numpy(episodes.column(name))[row].astype(bool)
            break
    return reached, distance


def _action_stats(column: pa.ChunkedArray, starts: np.ndarray, lengths: np.ndarray) -> dict:
    """Discrete actions: the most common one and its share; continuous: mean |a| and std."""
    values = arrow_to_numpy(column)
    unit_of_step = np.repeat(np.arange(len(starts)), lengths)
    if values.ndim == 1 and np.issubdtype(values.dtype, np.integer):
        codes, index = np.unique(values, return_inverse=True)
        counts = np.bincount(unit_of_step * len(codes) + index, minlength=len(starts) * len(codes))
        counts = counts.reshape(len(starts), len(codes))
        top = counts.argmax(axis=1)
        share = counts.max(axis=1) / lengths
        return {
            "most_common": [int(codes[k]) for k in top],
            "most_common_share": [_round(s) for s in share],
        }
    values = np.asarray(values, np.float64).reshape(len(values), -1)
    mean = np.add.reduceat(values, starts, axis=0) / lengths[:, None]
    mean_square = np.add.reduceat(values**2, starts, axis=0) / lengths[:, None]
    std = np.sqrt(np.maximum(mean_square - mean**2, 0.0)).mean(axis=1)
    mean_abs = np.add.reduceat(np.abs(values), starts, axis=0).mean(axis=1) / lengths
    return {"mean_abs": [_round(x) for x in mean_abs], "std": [_round(x) for x in std]}


def _displacement(
    column: pa.ChunkedArray, starts: np.ndarray, last: np.ndarray
) -> np.ndarray | None:
    """Distance between the first and last state of each unit (the plain state vector)."""
    if pa.types.is_struct(column.type):
        if column.type.get_field_index("observation") < 0:
            return None
        values = cols.struct_to_numpy(column, "observation")
    else:
        values = arrow_to_numpy(column)
    if not np.issubdtype(values.dtype, np.number):
        return None
    values = values.reshape(len(values), -1)
    return np.linalg.norm(values[last].astype(float) - values[starts].astype(float), axis=1)


def _rewards(steps: pa.Table) -> np.ndarray:
    """Rewards as float64, NaN where null (unknown: a dataset ingested without rewards)."""
    return pc.fill_null(steps.column(cols.REWARD).cast(pa.float64()), np.nan).to_numpy()


def _round(value: Any) -> float:
    return float(f"{float(value):.4g}")


def id_range(steps: pa.Table) -> str:
    if steps.num_rows == 0:
        return "(none)"
    ids = steps.column(cols.EPISODE_ID)
    return f"{pc.min(ids).as_py()}..{pc.max(ids).as_py()}"


# ---------------------------------------------------------------- dataset-wide percentiles
def part_returns(steps: pa.Table, per: str, segment: int) -> dict[str, Any]:
    """One part's unit returns: all of them, or a fine quantile grid when many."""
    units = units_of(steps, per, segment)
    returns = units["return"]
    returns = returns[np.isfinite(returns)]  # unknown returns have no percentile
    if len(returns) > EXACT_RETURNS:
        returns = np.quantile(returns, np.linspace(0, 1, GRID_POINTS))
    return {"units": len(units["start"]), "unit_returns": returns}


def merge_quantiles(summaries: list[dict[str, Any]]) -> list[float]:
    """The 101-point return quantile grid of the whole dataset from every part's summary.

    A part's returns are exact (weight 1 each) or a quantile grid standing for `units`
    returns (weight units / points each); a weighted quantile merges both kinds.
    """
    values, weights = [], []
    for summary in summaries:
        returns = np.asarray(summary["unit_returns"], float)
        if len(returns):
            values.append(returns)
            weights.append(np.full(len(returns), summary.get("units", len(returns)) / len(returns)))
    if not values:
        return [0.0] * 101
    order = np.argsort(np.concatenate(values), kind="stable")
    sorted_values = np.concatenate(values)[order]
    cumulative = np.cumsum(np.concatenate(weights)[order])
    # Position of each value as a fraction of the whole, as np.quantile's linear method does.
    position = (cumulative - cumulative[0]) / max(cumulative[-1] - cumulative[0], 1e-12)
    return np.interp(np.linspace(0, 1, 101), position, sorted_values).tolist()
