"""`returns`: return-to-go, episode return and normalized return against plain loops."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relabelers import returns
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


def episode_ends(lengths: np.ndarray) -> np.ndarray:
    ends = np.zeros(int(lengths.sum()), dtype=bool)
    ends[np.cumsum(lengths) - 1] = True
    return ends


def backward_loop(rewards: np.ndarray, lengths: np.ndarray, gamma: float) -> np.ndarray:
    episodes = np.split(np.asarray(rewards, dtype=np.float64), np.cumsum(lengths)[:-1])
    return np.array(reference_return_to_go([e.tolist() for e in episodes], gamma))


def lengths_of(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Episode lengths that take each way: many short (side by side, over several chunks),
    a fixed horizon (the transpose), short and long mixed, and 100k-step episodes."""
    return {
        "short": lambda: rng.integers(1, 50, 12_000),
        "fixed horizon": lambda: np.full(6_000, 50),
        "mixed": lambda: rng.permutation(
            np.concatenate([rng.integers(1, 60, 3_000), [3_000, 20_000]])
        ),
        "long": lambda: np.array([100_000, 30_000, 100_000]),
    }[kind]()


@pytest.mark.parametrize("kind", ["short", "fixed horizon", "mixed", "long"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.99, 0.999, 1.0])
def test_kernel_is_the_backward_loop_bit_for_bit(monkeypatch, kind, gamma):
    """The exact ways (side by side, alone; the blocked scan turned off for every length):
    the loop's two roundings per step in its order, identical bits, not only close."""
    monkeypatch.setattr(returns, "BLOCKED_FROM", 1 << 62)
    rng = np.random.default_rng(len(kind))
    lengths = lengths_of(kind, rng)
    rewards = rng.normal(size=int(lengths.sum())) * rng.choice([1e-3, 1.0, 1e3], int(lengths.sum()))
    got = discounted_reverse_cumsum(rewards, episode_ends(lengths), gamma)
    np.testing.assert_array_equal(got, backward_loop(rewards, lengths, gamma))


@pytest.mark.parametrize("gamma", [0.0, 0.9, 0.99, 1.0])
def test_only_episodes_from_blocked_from_steps_leave_the_loops_bits(gamma):
    """By default episodes shorter than BLOCKED_FROM keep the loop's bits; longer ones take
    the blocked scan, within 1e-12 of their largest |return-to-go|."""
    rng = np.random.default_rng(3)
    lengths = lengths_of("mixed", rng)
    rewards = rng.normal(size=int(lengths.sum())) * rng.choice([1e-3, 1.0, 1e3], int(lengths.sum()))
    got = discounted_reverse_cumsum(rewards, episode_ends(lengths), gamma)
    expected = backward_loop(rewards, lengths, gamma)
    long = np.repeat(lengths >= returns.BLOCKED_FROM, lengths)
    assert long.any() and not long.all()
    np.testing.assert_array_equal(got[~long], expected[~long])
    assert np.abs(got[long] - expected[long]).max() <= 1e-12 * np.abs(expected[long]).max()


def test_short_episodes_go_side_by_side_and_long_ones_alone():
    lengths = lengths_of("mixed", np.random.default_rng(7))
    for undiscounted in (True, False):
        side_by_side = returns.episodes_side_by_side(lengths, undiscounted)
        assert side_by_side[lengths < 60].all() and not side_by_side[lengths >= 3_000].any()


@pytest.mark.parametrize("gamma", [0.99, 1.0])
def test_both_ways_and_the_public_lfilter_give_the_same_bits(monkeypatch, gamma):
    monkeypatch.setattr(returns, "BLOCKED_FROM", 1 << 62)
    rng = np.random.default_rng(7)
    lengths = lengths_of("mixed", rng)
    rewards = rng.normal(size=int(lengths.sum()))
    expected = backward_loop(rewards, lengths, gamma)
    ends = episode_ends(lengths)
    for side_by_side in (True, False):
        monkeypatch.setattr(
            returns,
            "episodes_side_by_side",
            lambda lengths, _, way=side_by_side: np.full(len(lengths), way),
        )
        np.testing.assert_array_equal(discounted_reverse_cumsum(rewards, ends, gamma), expected)
    monkeypatch.setattr(returns, "compiled_lfilter", None)
    np.testing.assert_array_equal(discounted_reverse_cumsum(rewards, ends, gamma), expected)


@pytest.mark.parametrize("gamma", [0.99, 0.999])
def test_long_episodes_in_the_relabeler_round_the_kernels_float64(gamma):
    """100k-step episodes: float64 within 1e-12 of the loop's largest |return-to-go|, and
    the stored float32 column is the kernel's float64 rounded once."""
    rng = np.random.default_rng(1)
    rewards = [rng.normal(size=n).astype(np.float32) for n in (100_000, 1_000, 100_000)]
    steps, episodes = tables(rewards)
    lengths = np.array([len(r) for r in rewards])
    expected = backward_loop(np.concatenate(rewards), lengths, gamma)
    got = discounted_reverse_cumsum(np.concatenate(rewards), episode_ends(lengths), gamma)
    assert np.abs(got - expected).max() <= 1e-12 * np.abs(expected).max()
    output = relabel_tables(ReturnsRelabeler({"gamma": gamma}), steps, episodes)
    stored = output.steps.column("return_to_go").to_numpy()
    assert stored.dtype == np.float32
    np.testing.assert_array_equal(stored, got.astype(np.float32))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_infinite_reward_names_episode_and_step(bad):
    rewards = [[1.0] * 5, [2.0] * 9, [3.0] * 4]
    rewards[1][7] = bad
    steps, episodes = tables(rewards)
    with pytest.raises(
        RelabelError, match=r"1 non-finite value\(s\), the first at episode 4 step t=7"
    ):
        relabel_tables(ReturnsRelabeler({"gamma": 0.99}), steps, episodes)


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
