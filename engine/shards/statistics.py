"""Numeric statistics for the shard index: each task sums what it wrote, the driver combines.

Sums and sums of squares (float64) combine exactly across tasks in any grouping; episode
returns are kept whole for their quantiles (one float per episode). Unknown rewards and
returns (NaN: a dataset ingested without rewards) are left out; with none known, the
index's `reward` and `episode_return` are null.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.shards.conditions import ConditionColumn
from engine.shards.episodes import EpisodeArrays
from schemas.shard_index import condition_member

RETURN_QUANTILES = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


def numeric_summary(episodes: EpisodeArrays, conditions: Sequence[ConditionColumn]) -> dict:
    """Sums for mean/std, extremes and returns of one set of episodes (JSON-able)."""
    observation = episodes.observation.astype(np.float64)
    reward = episodes.reward.astype(np.float64)
    reward = reward[np.isfinite(reward)]
    returns = episodes.returns.astype(np.float64)
    summary: dict[str, Any] = {
        "steps": len(episodes.reward),
        "observation_sum": observation.sum(axis=0).tolist(),
        "observation_sumsq": np.square(observation).sum(axis=0).tolist(),
        "reward_steps": len(reward),
        "reward_sum": float(reward.sum()),
        "reward_sumsq": float(np.square(reward).sum()),
        "returns": returns[np.isfinite(returns)].tolist(),
    }
    if len(episodes.action):
        if episodes.action.ndim == 1:
            summary["action_max"] = int(episodes.action.max())
        else:
            summary["action_low"] = episodes.action.min(axis=0).tolist()
            summary["action_high"] = episodes.action.max(axis=0).tolist()
    for condition in conditions:
        if condition.type not in ("scalar", "vector"):
            continue
        values = episodes.conditions[condition.name].astype(np.float64)
        values = values.reshape(-1, condition.dim if condition.type == "vector" else 1)
        summary[condition_member(condition.name)] = {
            "count": len(values),
            "sum": values.sum(axis=0).tolist(),
            "sumsq": np.square(values).sum(axis=0).tolist(),
            "min": float(values.min()) if len(values) else None,
            "max": float(values.max()) if len(values) else None,
        }
    return summary


def _mean_std(total: float | np.ndarray, total_sq, count: int):
    count = max(count, 1)
    mean = np.asarray(total, dtype=np.float64) / count
    var = np.maximum(np.asarray(total_sq, dtype=np.float64) / count - mean**2, 0.0)
    return mean, np.sqrt(var)


def combine_numeric(summaries: Sequence[dict], conditions: Sequence[ConditionColumn]) -> dict:
    """Dataset-wide statistics for the index from every shard task's `numeric_summary`."""
    steps = sum(s["steps"] for s in summaries)
    obs_mean, obs_std = _mean_std(
        np.sum([s["observation_sum"] for s in summaries], axis=0),
        np.sum([s["observation_sumsq"] for s in summaries], axis=0),
        steps,
    )
    reward_steps = sum(s["reward_steps"] for s in summaries)
    reward_mean, reward_std = _mean_std(
        sum(s["reward_sum"] for s in summaries),
        sum(s["reward_sumsq"] for s in summaries),
        reward_steps,
    )
    returns = np.concatenate([np.asarray(s["returns"], dtype=np.float64) for s in summaries])
    known = reward_steps > 0 or not steps  # no steps at all: zeros, as before
    result: dict[str, Any] = {
        "observation": {"mean": obs_mean.tolist(), "std": obs_std.tolist()},
        "reward": {"mean": float(reward_mean), "std": float(reward_std)} if known else None,
        "episode_return": {
            "mean": float(returns.mean()) if len(returns) else 0.0,
            "std": float(returns.std()) if len(returns) else 0.0,
            "min": float(returns.min()) if len(returns) else 0.0,
            "max": float(returns.max()) if len(returns) else 0.0,
            "quantiles": {
                str(q): float(np.quantile(returns, q)) if len(returns) else 0.0
                for q in RETURN_QUANTILES
            },
        }
        if known
        else None,
    }
    with_actions = [s for s in summaries if "action_max" in s or "action_low" in s]
    if with_actions and "action_max" in with_actions[0]:
        result["action"] = {"kind": "discrete", "n": max(s["action_max"] for s in with_actions) + 1}
    elif with_actions:
        low = np.min([s["action_low"] for s in with_actions], axis=0)
        high = np.max([s["action_high"] for s in with_actions], axis=0)
        result["action"] = {
            "kind": "continuous",
            "dim": len(low),
            "low": low.tolist(),
            "high": high.tolist(),
        }
    for condition in conditions:
        key = condition_member(condition.name)
        if condition.type not in ("scalar", "vector"):
            continue
        parts = [s[key] for s in summaries if s[key]["count"]]
        count = sum(p["count"] for p in parts)
        mean, std = _mean_std(
            np.sum([p["sum"] for p in parts], axis=0) if parts else 0.0,
            np.sum([p["sumsq"] for p in parts], axis=0) if parts else 0.0,
            count,
        )
        entry = {
            "mean": mean.tolist(),
            "std": std.tolist(),
            "min": min(p["min"] for p in parts) if parts else None,
            "max": max(p["max"] for p in parts) if parts else None,
        }
        if condition.type == "scalar":
            entry["mean"], entry["std"] = float(mean[0]), float(std[0])
        result[key] = entry
    return result
