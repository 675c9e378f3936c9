"""`skill`: levels and percentiles against a counting loop, from returns or metadata."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relabelers.base import Part, RelabelError, TableInputs, relabel_tables
from relabelers.skill import SkillRelabeler


def reference(scores: list[float], levels: int) -> tuple[list[float], list[int]]:
    """Mid-rank percentile by counting, level by its definition."""
    percentiles, level = [], []
    for score in scores:
        lower = sum(1 for other in scores if other < score)
        same = sum(1 for other in scores if other == score)
        percentile = (lower + 0.5 * same) / len(scores)
        percentiles.append(percentile)
        level.append(min(int(percentile * levels), levels - 1))
    return percentiles, level


def tables(values, name="return", lengths=None):
    lengths = lengths or [2] * len(values)
    ids = np.arange(len(values), dtype=np.int64)
    episodes = pa.table({"episode_id": ids, name: values})
    steps = pa.table(
        {
            "episode_id": np.repeat(ids, lengths),
            "t": np.concatenate([np.arange(n) for n in lengths]),
        }
    )
    return steps, episodes


def run_in_parts(relabeler, steps, episodes, cut):
    """Two parts, as the job would see them."""
    cut_steps = 2 * cut
    parts = [
        (steps.slice(0, cut_steps), episodes.slice(0, cut)),
        (steps.slice(cut_steps), episodes.slice(cut)),
    ]
    relabeler.setup(TableInputs.of_parts(parts))
    outputs = [relabeler.run(s, e, Part(i, 2)) for i, (s, e) in enumerate(parts)]
    return pa.concat_tables([o.episodes for o in outputs]), pa.concat_tables(
        [o.steps for o in outputs]
    )


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.integers(-5, 5).map(float), min_size=2, max_size=30),
    levels=st.integers(2, 6),
    data=st.data(),
)
def test_levels_and_percentiles_match_counting(values, levels, data):
    cut = data.draw(st.integers(1, len(values) - 1))
    steps, episodes = tables(values)
    episode_out, step_out = run_in_parts(SkillRelabeler({"levels": levels}), steps, episodes, cut)
    percentiles, level = reference(values, levels)
    np.testing.assert_allclose(
        episode_out.column("skill_percentile").to_numpy(), percentiles, rtol=1e-6
    )
    assert episode_out.column("skill_level").to_pylist() == level
    assert step_out.column("skill_level").to_pylist() == list(np.repeat(level, 2))
    labels = episode_out.column("skill").to_pylist()
    assert labels == [_label(levels, x) for x in level]


def _label(levels, level):
    from relabelers.skill import level_labels

    return level_labels(levels)[level]


def test_less_noise_is_more_skill():
    steps, episodes = tables([0.0, 0.5, 1.0, 0.0, 0.5, 1.0], name="noise")
    episode_out, _ = run_in_parts(
        SkillRelabeler({"source": "noise", "levels": 3}), steps, episodes, 2
    )
    assert episode_out.column("skill").to_pylist() == ["expert", "intermediate", "novice"] * 2


def test_policy_ids_with_an_order():
    steps, episodes = tables(["random", "bc", "expert", "bc"], name="policy")
    relabeler = SkillRelabeler({"source": "policy", "levels": 3, "order": "random;bc;expert"})
    episode_out, _ = run_in_parts(relabeler, steps, episodes, 1)
    assert episode_out.column("skill_level").to_pylist() == [0, 1, 2, 1]
    with pytest.raises(RelabelError, match="order"):
        SkillRelabeler({"source": "policy"}).setup(TableInputs(steps, episodes))


def test_unknown_policy_id_is_a_clear_error():
    steps, episodes = tables(["random", "mystery"], name="policy")
    relabeler = SkillRelabeler({"source": "policy", "order": "random;expert"})
    with pytest.raises(RelabelError, match="mystery"):
        relabeler.setup(TableInputs(steps, episodes))


def test_large_datasets_use_a_quantile_grid_close_to_exact():
    rng = np.random.default_rng(0)
    values = rng.normal(size=3000)
    steps, episodes = tables(list(values))
    relabeler = SkillRelabeler({"exact_limit": 500})
    episode_out, _ = run_in_parts(relabeler, steps, episodes, 1700)
    exact, _ = reference(list(values), 4)
    assert np.abs(episode_out.column("skill_percentile").to_numpy() - exact).max() < 0.01
    report = relabel_tables(relabeler, steps, episodes).report
    assert report["exact"] is False and len(relabeler.sorted_scores) == 500


def test_labels_are_ordered_in_the_report():
    steps, episodes = tables([1.0, 2.0])
    output = relabel_tables(SkillRelabeler({"levels": 2}), steps, episodes)
    assert output.report["labels"] == ["novice", "expert"]
    assert output.episodes.column("skill").to_pylist() == ["novice", "expert"]
