"""`drex`: a reward learned from noise rankings ranks held-out episodes correctly."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from relabelers.base import Part, RelabelError, TableInputs, relabel_tables
from relabelers.drex import DrexRelabeler, spearman
from schemas import steps as cols

NOISE_LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)


def noisy_rollouts(num_episodes: int = 100, length: int = 30, seed: int = 0):
    """A 1-D point that a scripted policy steers to 0, with injected action noise:
    the true reward is -|x|, so more noise means a lower return."""
    rng = np.random.default_rng(seed)
    noise = np.asarray(NOISE_LEVELS)[np.arange(num_episodes) % len(NOISE_LEVELS)]
    x = rng.uniform(-1, 1, size=num_episodes)
    positions = np.zeros((num_episodes, length))
    for t in range(length):  # a loop over time, vectorized over episodes
        positions[:, t] = x
        action = (1 - noise) * (-0.3 * x) + noise * rng.uniform(-0.5, 0.5, size=num_episodes)
        x = x + action
    rewards = -np.abs(positions)
    ids = np.arange(num_episodes, dtype=np.int64)
    steps = pa.table(
        {
            cols.EPISODE_ID: np.repeat(ids, length),
            cols.T: np.tile(np.arange(length, dtype=np.int32), num_episodes),
            cols.OBSERVATION: cols.vectors_to_arrow(positions.reshape(-1, 1).astype(np.float32)),
            cols.REWARD: rewards.reshape(-1).astype(np.float32),
        }
    )
    episodes = pa.table({cols.EPISODE_ID: ids, cols.RETURN: rewards.sum(axis=1), "noise": noise})
    return steps, episodes


def run_two_parts(relabeler, steps, episodes, cut=50, length=30):
    parts = [
        (steps.slice(0, cut * length), episodes.slice(0, cut)),
        (steps.slice(cut * length), episodes.slice(cut)),
    ]
    relabeler.setup(TableInputs.of_parts(parts))
    outputs = [relabeler.run(s, e, Part(i, 2)) for i, (s, e) in enumerate(parts)]
    report = relabeler.finish([o.report for o in outputs])
    return relabeler.reward_net, outputs, report


PARAMS = {"pairs": 800, "epochs": 15, "snippet_length": 10, "hidden": 16}


def test_drex_ranks_heldout_episodes_and_extrapolates():
    steps, episodes = noisy_rollouts()
    _, outputs, report = run_two_parts(DrexRelabeler(PARAMS, seed=1), steps, episodes)
    assert report["heldout_pair_accuracy"] >= 0.8
    assert report["spearman_return_heldout"] >= 0.6
    # drex_return is the per-episode sum of drex_reward.
    reward = outputs[0].steps.column("drex_reward").to_numpy().reshape(50, 30)
    np.testing.assert_allclose(
        outputs[0].episodes.column("drex_return").to_numpy(), reward.sum(axis=1), rtol=1e-4
    )
    # Extrapolation: the least noisy level is never trained on, yet ranks above the rest.
    _, _, report = run_two_parts(
        DrexRelabeler({**PARAMS, "extrapolate": True}, seed=1), steps, episodes
    )
    assert report["heldout_best_above_rest"] >= 0.7


def test_drex_is_deterministic_and_independent_of_partitioning():
    steps, episodes = noisy_rollouts(num_episodes=40)
    params = {**PARAMS, "epochs": 2}
    relabeler = DrexRelabeler(params, seed=3)
    whole = relabel_tables(relabeler, steps, episodes).steps.column("drex_reward")
    one = relabeler.reward_net
    _, outputs, _ = run_two_parts(DrexRelabeler(params, seed=3), steps, episodes, cut=17)
    again = DrexRelabeler(params, seed=3)
    again.setup(TableInputs(steps, episodes))
    assert one.weights == again.reward_net.weights
    split = pa.concat_tables([o.steps for o in outputs]).column("drex_reward")
    assert whole.equals(split)


def test_one_noise_level_is_a_clear_error():
    steps, episodes = noisy_rollouts(num_episodes=10)
    episodes = episodes.set_column(2, "noise", pa.array(np.zeros(10)))
    relabeler = DrexRelabeler(PARAMS)
    with pytest.raises(RelabelError, match="at least two noise levels"):
        relabeler.setup(TableInputs(steps, episodes))


def test_spearman_matches_pearson_of_ranks():
    assert spearman(np.array([1, 2, 3, 4.0]), np.array([10, 20, 25, 100.0])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3.0]), np.array([3, 2, 1.0])) == pytest.approx(-1.0)
