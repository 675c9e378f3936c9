"""The vectorized validation rules agree with a plain reference implementation."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.validate import changes_within_episodes, check_finite, check_step_index


def reference_bad_episodes(episode_ids: list[int], t: list[int]) -> set[int]:
    """Episodes whose sorted steps are not exactly 0, 1, ..., n-1."""
    steps: dict[int, list[int]] = {}
    for episode, step in zip(episode_ids, t):
        steps.setdefault(episode, []).append(step)
    return {e for e, s in steps.items() if sorted(s) != list(range(len(s)))}


rows = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 6)), min_size=0, max_size=60)


@settings(max_examples=200, deadline=None)
@given(rows)
def test_step_index_rule_matches_reference(pairs):
    pairs = sorted(pairs)
    episode_ids = np.array([p[0] for p in pairs], dtype=np.int64)
    t = np.array([p[1] for p in pairs], dtype=np.int64)
    problems = check_step_index("f.parquet", episode_ids, t)
    assert {p.episode for p in problems} == reference_bad_episodes(episode_ids.tolist(), t.tolist())
    assert all(p.file == "f.parquet" and p.column == "t" for p in problems)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.sampled_from([0.0, 1.5, np.nan, np.inf])), max_size=40)
)
def test_finite_rule_matches_reference(pairs):
    pairs = sorted(pairs, key=lambda p: p[0])
    episode_ids = np.array([p[0] for p in pairs], dtype=np.int64)
    values = np.array([p[1] for p in pairs], dtype=np.float64)
    problems = check_finite("f.h5", "reward", values, episode_ids)
    expected = {e for e, v in pairs if not np.isfinite(v)}
    assert {p.episode for p in problems} == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2)), max_size=40))
def test_constant_within_episodes_matches_reference(pairs):
    pairs = sorted(pairs, key=lambda p: p[0])
    episode_ids = np.array([p[0] for p in pairs], dtype=np.int64)
    values = np.array([p[1] for p in pairs])
    starts = np.ones(len(pairs), bool)
    starts[1:] = episode_ids[1:] != episode_ids[:-1]
    by_episode: dict[int, set[int]] = {}
    for episode, value in pairs:
        by_episode.setdefault(episode, set()).add(value)
    expected = any(len(v) > 1 for v in by_episode.values())
    assert changes_within_episodes(values, starts) == expected
