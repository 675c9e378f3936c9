"""`returns`: return-to-go per step, the episode return, and a D4RL-normalized return.

Return-to-go is the discounted sum of the rewards from step t to the end of the episode:

    return_to_go[t] = reward[t] + gamma * return_to_go[t + 1],   0 at the episode's end.

It is computed for the whole part at once with a segmented reverse scan in float64
(`discounted_reverse_cumsum`): a log-step (Hillis-Steele) doubling scan whose carry is
reset at episode boundaries. It never scales rewards by gamma^t, so it stays exact for
100k-step episodes (the gamma^t trick loses precision past a few thousand steps and
overflows past t ~ 70k).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from relabelers.base import Columns, Inputs, Output, Params, Part, Relabeler, RelabelError
from schemas import steps as cols

RETURN_TO_GO = "return_to_go"
EPISODE_RETURN = "episode_return"
NORMALIZED_RETURN = "normalized_return"


def discounted_reverse_cumsum(
    rewards: np.ndarray, episode_ends: np.ndarray, gamma: float
) -> np.ndarray:
    """Segmented discounted reverse cumulative sum, in float64.

    `episode_ends[i]` is True where step i is the last step of its episode. The scan
    solves y[i] = r[i] + c[i] * y[i + 1] with c[i] = gamma, or 0 at an episode end, by
    doubling: after the pass with offset d, y[i] holds the sum over the next 2d steps
    and c[i] the product of their factors (0 once the window crosses an episode end).
    ceil(log2(longest episode)) passes, each a few vectorized array operations.
    """
    values = np.asarray(rewards, dtype=np.float64).copy()
    n = len(values)
    if n == 0:
        return values
    factors = np.where(np.asarray(episode_ends, dtype=bool), 0.0, float(gamma))
    ends = np.flatnonzero(episode_ends)
    starts = np.concatenate([[0], ends[:-1] + 1])
    longest = int((ends - starts + 1).max()) if len(ends) else n
    scratch = np.empty(n, dtype=np.float64)
    offset = 1
    while offset < longest:
        m = n - offset
        # The products go to scratch first: the shifted views overlap the outputs.
        np.multiply(factors[:m], values[offset:], out=scratch[:m])
        values[:m] += scratch[:m]
        np.multiply(factors[:m], factors[offset:], out=scratch[:m])
        factors[:m] = scratch[:m]
        factors[m:] = 0.0
        offset *= 2
    return values


def episode_ends_of(episode_ids: np.ndarray) -> np.ndarray:
    """True at the last step of every episode of a (episode_id, t)-sorted step column."""
    ends = np.ones(len(episode_ids), dtype=bool)
    if len(episode_ids) > 1:
        ends[:-1] = episode_ids[1:] != episode_ids[:-1]
    return ends


class ReturnsParams(Params):
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount factor of return_to_go.")
    reference_random: float | None = Field(
        None, description="Return of a random policy, for normalized_return (D4RL)."
    )
    reference_expert: float | None = Field(
        None, description="Return of an expert policy, for normalized_return (D4RL)."
    )
    reward_column: str = Field(cols.REWARD, description="The step column holding rewards.")

    @model_validator(mode="after")
    def _references_together(self) -> ReturnsParams:
        given = (self.reference_random is None, self.reference_expert is None)
        if given[0] != given[1]:
            raise ValueError("give both reference_random and reference_expert, or neither")
        if self.reference_random is not None and self.reference_random == self.reference_expert:
            raise ValueError("reference_random and reference_expert must differ")
        return self


class ReturnsRelabeler(Relabeler):
    """Return-to-go (discounted), episode return (undiscounted) and normalized return."""

    name = "returns"
    version = "1.0"
    Params = ReturnsParams

    @property
    def normalized(self) -> bool:
        return self.params.reference_random is not None

    def reads(self) -> Columns:
        return Columns(steps=(cols.EPISODE_ID, cols.T, self.params.reward_column))

    def writes(self) -> Columns:
        episodes = (EPISODE_RETURN, NORMALIZED_RETURN) if self.normalized else (EPISODE_RETURN,)
        return Columns(steps=(RETURN_TO_GO,), episodes=episodes)

    def setup(self, inputs: Inputs) -> None:
        data_type = inputs.steps_schema.field(self.params.reward_column).type
        if not (pa.types.is_integer(data_type) or pa.types.is_floating(data_type)):
            raise RelabelError(
                f"relabeler 'returns': reward_column {self.params.reward_column!r} is "
                f"{data_type}; rewards must be numbers (one per step)"
            )

    def relabel(self, steps: pa.Table, episodes: pa.Table, part: Part) -> Output:
        episode_ids = steps.column(cols.EPISODE_ID).to_numpy()
        rewards = steps.column(self.params.reward_column).to_numpy(zero_copy_only=False)
        rewards = np.asarray(rewards, dtype=np.float64)
        bad = ~np.isfinite(rewards)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise RelabelError(
                f"relabeler 'returns': column {self.params.reward_column!r} has "
                f"{int(bad.sum())} non-finite value(s), the first at episode "
                f"{int(episode_ids[row])} step t={steps.column(cols.T)[row].as_py()}"
            )
        return_to_go = discounted_reverse_cumsum(
            rewards, episode_ends_of(episode_ids), self.params.gamma
        )
        bounds = cols.episode_boundaries(episode_ids)
        if len(episode_ids):
            episode_return = np.add.reduceat(rewards, bounds[:-1])
        else:
            episode_return = np.zeros(0)
        # Steps and episodes come in the same order: check rather than assume.
        expected = episodes.column(cols.EPISODE_ID).to_numpy()
        if len(expected) != len(bounds) - 1 or not np.array_equal(
            expected, episode_ids[bounds[:-1]]
        ):
            raise RelabelError(
                "relabeler 'returns': the steps and episodes tables do not hold the same "
                "episodes in the same order"
            )
        episode_columns = {EPISODE_RETURN: pa.array(episode_return, type=pa.float64())}
        if self.normalized:
            low, high = self.params.reference_random, self.params.reference_expert
            episode_columns[NORMALIZED_RETURN] = pa.array(
                100.0 * (episode_return - low) / (high - low), type=pa.float64()
            )
        return Output(
            steps=pa.table({RETURN_TO_GO: pa.array(return_to_go.astype(np.float32))}),
            episodes=pa.table(episode_columns),
        )
