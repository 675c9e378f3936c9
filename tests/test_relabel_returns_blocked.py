"""The blocked scan for long episodes (relabelers/blocked_returns.py) against an exact
reference, and its results' independence from parts and tiles."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.signal import lfilter

from relabelers import blocked_returns, returns
from relabelers.returns import discounted_reverse_cumsum

L = blocked_returns.BLOCK_STEPS
# Lengths around the block size (1, L - 1, L, L + 1), past BLOCKED_FROM, and over a tile.
LENGTHS = np.array([1, L - 1, L, L + 1, 4_096, 5_003, 2, 40_000, L * 4_096 + 7])


def exact_return_to_go(rewards: np.ndarray, lengths: np.ndarray, gamma: float) -> np.ndarray:
    """The backward recursion in 80-bit extended precision (64-bit mantissa), per episode:
    11 more bits than float64, so exact for these figures."""
    assert np.finfo(np.longdouble).nmant >= 63, "needs x86 extended precision"
    values = rewards.astype(np.longdouble)
    out = np.empty(len(values), dtype=np.longdouble)
    one = np.array([1.0], dtype=np.longdouble)
    denominator = np.array([1.0, -gamma], dtype=np.longdouble)
    for start, end in zip(np.cumsum(lengths) - lengths, np.cumsum(lengths)):
        out[start:end] = lfilter(one, denominator, values[start:end][::-1])[::-1]
    return out


def float64_loop(rewards: np.ndarray, lengths: np.ndarray, gamma: float) -> np.ndarray:
    """The textbook backward loop in Python floats."""
    values, out = rewards.astype(np.float64).tolist(), []
    for start, end in zip(np.cumsum(lengths) - lengths, np.cumsum(lengths)):
        running, episode = 0.0, []
        for reward in reversed(values[start:end]):
            running = reward + gamma * running
            episode.append(running)
        out.extend(reversed(episode))
    return np.array(out)


def error_of_largest(got: np.ndarray, reference: np.ndarray, lengths: np.ndarray) -> float:
    """The largest |error|, each relative to its episode's largest |return-to-go|."""
    bounds = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    largest = np.maximum.reduceat(np.abs(reference), bounds).astype(np.float64)
    error = np.abs(got - reference).astype(np.float64)
    return float((error / np.repeat(largest, lengths)).max())


def ends_of(lengths: np.ndarray) -> np.ndarray:
    ends = np.zeros(int(lengths.sum()), dtype=bool)
    ends[np.cumsum(lengths) - 1] = True
    return ends


def stored_rewards(seed: int, lengths: np.ndarray) -> np.ndarray:
    """float32 rewards as stored, spanning eight orders of magnitude (large and small)."""
    rng = np.random.default_rng(seed)
    steps = int(lengths.sum())
    scale = rng.choice([1e-4, 1.0, 1e4], steps)
    return (rng.normal(size=steps) * scale + rng.choice([0.0, 0.5], steps)).astype(np.float32)


@pytest.mark.parametrize("gamma", [0.9, 0.99, 1.0])
def test_blocked_scan_is_within_1e_12_of_the_exact_return_to_go(monkeypatch, gamma):
    """Every length, 1 step included, through the blocked scan (BLOCKED_FROM = 1)."""
    monkeypatch.setattr(returns, "BLOCKED_FROM", 1)
    rewards = stored_rewards(0, LENGTHS)
    got = discounted_reverse_cumsum(rewards, ends_of(LENGTHS), gamma)
    exact = exact_return_to_go(rewards, LENGTHS, gamma)
    assert error_of_largest(got, exact, LENGTHS) <= 1e-12
    # The float64 loop, computed independently, agrees to the same bound.
    assert error_of_largest(got, float64_loop(rewards, LENGTHS, gamma), LENGTHS) <= 1e-12
    # A one-step episode is its reward; a block-long one has no carry to add.
    first = np.cumsum(LENGTHS) - LENGTHS
    assert got[first[0]] == np.float64(rewards[0])


@pytest.mark.parametrize("gamma", [0.0, 0.99, 1.0])
def test_blocked_results_do_not_depend_on_parts_tiles_or_neighbours(monkeypatch, gamma):
    """Identical bits whole, in parts cut at episode ends, with any tile width, and next to
    short episodes (which take the exact ways)."""
    rewards = stored_rewards(1, LENGTHS)
    ends = ends_of(LENGTHS)
    whole = discounted_reverse_cumsum(rewards, ends, gamma)
    cuts = np.cumsum(LENGTHS)
    for parts in ([0, 5, 8, 9], [0, 1, 7, 9], [0, 4, 6, 9]):
        pieces = [
            discounted_reverse_cumsum(
                rewards[cuts[a] - LENGTHS[a] : cuts[b - 1]],
                ends[cuts[a] - LENGTHS[a] : cuts[b - 1]],
                gamma,
            )
            for a, b in zip(parts[:-1], parts[1:])
        ]
        np.testing.assert_array_equal(np.concatenate(pieces), whole)
    for tile in (1, 3, 64):
        monkeypatch.setattr(blocked_returns, "TILE_BLOCKS", tile)
        np.testing.assert_array_equal(discounted_reverse_cumsum(rewards, ends, gamma), whole)
    monkeypatch.setattr(blocked_returns, "compiled_lfilter", None)  # the public lfilter
    np.testing.assert_array_equal(discounted_reverse_cumsum(rewards, ends, gamma), whole)
    # float64 rewards of the same values: the same bits (widening is exact).
    wide = discounted_reverse_cumsum(rewards.astype(np.float64), ends, gamma)
    np.testing.assert_array_equal(wide, whole)


def test_integer_rewards_are_widened():
    lengths = np.array([5_000, 3])
    rewards = np.arange(int(lengths.sum())) % 7 - 3
    got = discounted_reverse_cumsum(rewards, ends_of(lengths), 1.0)
    # Small integers: every sum is exact in float64, whatever the order.
    np.testing.assert_array_equal(got, float64_loop(rewards, lengths, 1.0))


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 3 * L + 1), min_size=1, max_size=12),
    tile=st.integers(1, 9),
    gamma=st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_any_lengths_and_tile_widths_through_the_blocked_scan(lengths, tile, gamma, seed):
    """Every way episodes and tiles can meet (an episode inside one block, across tiles,
    several per tile), against the float64 loop."""
    lengths = np.array(lengths)
    rewards = stored_rewards(seed, lengths)
    got = np.full(int(lengths.sum()), np.nan)
    starts = np.cumsum(lengths) - lengths
    original = blocked_returns.TILE_BLOCKS
    try:
        blocked_returns.TILE_BLOCKS = tile
        blocked_returns.blocked_return_to_go(rewards, starts, lengths, gamma, got)
    finally:
        blocked_returns.TILE_BLOCKS = original
    assert error_of_largest(got, float64_loop(rewards, lengths, gamma), lengths) <= 1e-12
