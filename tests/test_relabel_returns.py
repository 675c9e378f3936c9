"""`returns`: return-to-go, episode return and normalized return against plain loops."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relabelers.base import RelabelError, relabel_tables
from relabelers.returns import ReturnsRelabeler, discounted_reverse_cumsum
from schemas import steps as cols


def reference_return_to_go(rewards: list[list[float]], gamma: float) -> list[float]:
    """The textbook backward loop, one episode at a time."""
    out = []
    for episode in rewards:
        values, running = [], 0.0
        for reward in reversed(episode):
            running = reward + gamma * running
            values.append(running)
        out.extend(reversed(values))
    return out


def tables(rewards: list[list[float]]) -> tuple[pa.Table, pa.Table]:
    lengths = [len(r) for r in rewards]
    ids = np.repeat(np.arange(len(rewards), dtype=np.int64) * 3 + 1, lengths)
    steps = pa.table(
        {
            cols.EPISODE_ID: ids,
            cols.T: np.concatenate([np.arange(n, dtype=np.int32) for n in lengths]),
            cols.REWARD: np.concatenate(rewards).astype(np.float32),
        }
    )
    episodes = pa.table({cols.EPISODE_ID: np.arange(len(rewards), dtype=np.int64) * 3 + 1})
    return steps, episodes


episodes_strategy = st.lists(
    st.lists(
        st.floats(-10, 10, allow_nan=False, width=32),
        min_size=1,
        max_size=40,
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(rewards=episodes_strategy, gamma=st.floats(0.0, 1.0))
def test_return_to_go_matches_backward_loop(rewards, gamma):
    steps, episodes = tables(rewards)
    output = relabel_tables(ReturnsRelabeler({"gamma": gamma}), steps, episodes)
    float32_rewards = [list(np.asarray(r, dtype=np.float32).astype(float)) for r in rewards]
    expected = reference_return_to_go(float32_rewards, gamma)
    got = output.steps.column("return_to_go").to_numpy()
    np.testing.assert_allclose(got, np.float32(expected), rtol=1e-5, atol=1e-4)
    returns = output.episodes.column("episode_return").to_numpy()
    np.testing.assert_allclose(returns, [sum(r) for r in float32_rewards], rtol=1e-9, atol=1e-9)


def test_long_episode_is_exact_to_float32_precision():
    """100k steps with gamma < 1: no gamma^t scaling, so nothing overflows or drifts."""
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=100_000)
    ends = np.zeros(len(rewards), dtype=bool)
    ends[[29_999, 99_999]] = True
    got = discounted_reverse_cumsum(rewards, ends, 0.999)
    expected = np.array(
        reference_return_to_go([list(rewards[:30_000]), list(rewards[30_000:])], 0.999)
    )
    assert np.abs(got - expected).max() <= 2e-6 * np.abs(expected).max()


def test_normalized_return_follows_d4rl():
    steps, episodes = tables([[1.0, 2.0], [5.0]])
    relabeler = ReturnsRelabeler({"reference_random": -1.0, "reference_expert": 9.0})
    output = relabel_tables(relabeler, steps, episodes)
    np.testing.assert_allclose(output.episodes.column("normalized_return").to_numpy(), [40, 60])


def test_nan_reward_is_a_clear_error():
    steps, episodes = tables([[1.0, float("nan")]])
    with pytest.raises(RelabelError, match=r"non-finite.*episode 1 step t=1"):
        relabel_tables(ReturnsRelabeler({}), steps, episodes)


def test_bad_parameters_list_the_valid_ones():
    with pytest.raises(RelabelError, match=r"valid parameters: gamma .*reference_random"):
        ReturnsRelabeler({"gama": 0.9})
    with pytest.raises(RelabelError, match="gamma"):
        ReturnsRelabeler({"gamma": 1.5})
