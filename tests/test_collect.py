"""Collect: rollouts at noise levels, seeded per episode; the PointGoal environment."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pyarrow as pa
import pytest

import engine
from engine import storage
from engine.collect import (
    Rollouts,
    collect,
    collect_tables,
    heuristic_for,
    load_policy,
    plan_collect,
)
from engine.dataset import DatasetError, open_dataset
from engine.envs import ENV_ID, PointGoalEnv, heuristic_policy
from engine.executor import InProcess
from jobs.cli import main
from jobs.commands.collect import Collect
from jobs.runtime import RayExecutor
from schemas import steps as cols


def always_push_left(observation):
    """A user policy for CartPole, loaded as tests.test_collect:always_push_left."""
    return 0


def broken_policy(observation):
    """A user policy that fails, loaded as tests.test_collect:broken_policy."""
    raise ValueError("the policy failed")


def test_output_does_not_depend_on_how_episodes_are_split():
    whole, whole_episodes = collect_tables("Pendulum-v1", "heuristic", range(6), [0.0, 0.5], 3, 30)
    first, first_episodes = collect_tables(
        "Pendulum-v1", "heuristic", range(0, 2), [0.0, 0.5], 3, 30
    )
    rest, rest_episodes = collect_tables("Pendulum-v1", "heuristic", range(2, 6), [0.0, 0.5], 3, 30)
    assert pa.concat_tables([first, rest]).equals(whole)
    assert pa.concat_tables([first_episodes, rest_episodes]).equals(whole_episodes)


def test_noise_recorded_per_episode_and_steps_are_consistent():
    steps, episodes = collect_tables("CartPole-v1", "heuristic", range(6), [0.0, 1.0], 0)
    assert episodes.column("noise").to_pylist() == [0.0, 1.0] * 3
    lengths = episodes.column(cols.LENGTH).to_numpy()
    np.testing.assert_array_equal(
        steps.column("noise").to_numpy(), np.repeat(episodes.column("noise").to_numpy(), lengths)
    )
    # next_observation[t] == observation[t + 1] inside each episode
    observation = cols.arrow_to_numpy(steps.column(cols.OBSERVATION))
    next_observation = cols.arrow_to_numpy(steps.column(cols.NEXT_OBSERVATION))
    inside = np.ones(len(observation) - 1, bool)
    inside[np.cumsum(lengths)[:-1] - 1] = False
    np.testing.assert_array_equal(next_observation[:-1][inside], observation[1:][inside])
    assert steps.schema.field(cols.ACTION).type == pa.int64()
    # each episode ends exactly once, at its last step
    done = steps.column(cols.TERMINATED).to_numpy() | steps.column(cols.TRUNCATED).to_numpy()
    np.testing.assert_array_equal(np.flatnonzero(done), np.cumsum(lengths) - 1)


@pytest.mark.parametrize(
    "env_id, max_steps",
    [
        ("Pendulum-v1", 200),
        ("CartPole-v1", 500),
        ("MountainCarContinuous-v0", 999),
        ("Acrobot-v1", 500),
    ],
)
def test_heuristics_beat_random(env_id, max_steps):
    _, heuristic = collect_tables(env_id, "heuristic", range(3), [0.0], 0, max_steps)
    _, random = collect_tables(env_id, "random", range(3), [0.0], 0, max_steps)
    assert np.mean(heuristic.column("return")) > np.mean(random.column("return")) + 10


def test_user_policy_and_bad_specs():
    _, episodes = collect_tables(
        "CartPole-v1", "tests.test_collect:always_push_left", range(2), [0.0], 0
    )
    assert max(episodes.column("length").to_pylist()) < 20  # always left falls over fast
    with pytest.raises(ValueError, match="module:function"):
        load_policy("nonsense", "CartPole-v1")
    with pytest.raises(ValueError, match="cannot import"):
        load_policy("no_such_module:f", "CartPole-v1")
    # A mistyped bot mode is not a module named `bot`: the message says what the bot's are.
    with pytest.raises(ValueError, match="BabyAI's bot is bot or bot:play"):
        load_policy("bot:wander", "BabyAI-GoToLocal-v0")
    with pytest.raises(ValueError, match="bot, bot:play"):
        load_policy("nonsense", "CartPole-v1")
    with pytest.raises(ValueError, match="no built-in heuristic"):
        heuristic_for("LunarLander-v3")


def test_a_mistyped_env_id_is_named_before_the_policy(tmp_path):
    command = Collect(env="Pendulm-v1", output=str(tmp_path / "out"), episodes=2)
    with pytest.raises(ValueError, match="Did you mean: `Pendulum`"):
        command.run()
    assert not (tmp_path / "out").exists()


def test_point_goal_env_rewards_match_compute_reward():
    steps, episodes = collect_tables(ENV_ID, "heuristic", range(4), [0.0], 0)
    observation = steps.column(cols.OBSERVATION)
    assert pa.types.is_struct(observation.type)
    next_observation = steps.column(cols.NEXT_OBSERVATION)
    achieved = cols.struct_to_numpy(next_observation, "achieved_goal")
    desired = cols.struct_to_numpy(next_observation, "desired_goal")
    env = gym.make(ENV_ID)
    np.testing.assert_array_equal(
        env.unwrapped.compute_reward(achieved, desired, None),
        steps.column(cols.REWARD).to_numpy(),
    )
    assert steps.column("is_success").to_pylist()[-1] is True
    assert set(episodes.column("length").to_pylist()) == {50}
    # the heuristic reaches every goal well before the time limit
    assert np.all(episodes.column("return").to_numpy() > -30)


def test_point_goal_heuristic_is_vectorized():
    env = PointGoalEnv()
    batch = {
        "achieved_goal": np.zeros((3, 2), np.float32),
        "desired_goal": np.array([[1, 0], [0, 0.05], [-0.5, -2]], np.float32),
    }
    np.testing.assert_array_equal(
        heuristic_policy(batch), np.array([[1, 0], [0, 0.5], [-1, -1]], np.float32)
    )
    assert env.compute_reward(batch["achieved_goal"], batch["desired_goal"]).tolist() == [
        -1.0,
        0.0,
        -1.0,
    ]


def test_collect_writes_a_committed_dataset_independent_of_parallelism(ray_local, tmp_path):
    options = dict(env="Pendulum-v1", episodes=6, noise=[0.0, 0.5, 1.0], max_steps=40, seed=1)
    first = Collect(output=str(tmp_path / "a"), episodes_per_part=2, **options).run()
    again = Collect(output=str(tmp_path / "b"), episodes_per_part=2, **options).run()
    assert first.dataset_id == again.dataset_id
    assert first.steps == 240 and first.episodes == 6 and len(first.parts) == 3
    episodes = engine.scan_episodes(str(tmp_path / "a")).collect()
    assert episodes["noise"].to_list() == [0.0, 0.5, 1.0] * 2
    assert first.metadata["noise_levels"] == [0.0, 0.5, 1.0]
    assert first.history[0].operation == "collect"
    # one part for everything: same rows, other files
    single = Collect(output=str(tmp_path / "c"), episodes_per_part=6, **options).run()
    assert len(single.parts) == 1
    assert (
        engine.scan(str(tmp_path / "c"))
        .collect()
        .equals(engine.scan(str(tmp_path / "a")).collect())
    )


def test_collect_cli(ray_local, tmp_path, capsys):
    output = tmp_path / "goals"
    code = main(
        [
            "collect",
            ENV_ID,
            str(output),
            "--episodes",
            "4",
            "--noise",
            "0,0.5",
            "--policy",
            "engine.envs:heuristic_policy",
        ]
    )
    assert code == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("collected 4 episodes, 200 steps into")
    assert main(["collect", "CartPole-v1", str(tmp_path / "x"), "--policy", "bad"]) == 2
    assert "module:function" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["collect", "CartPole-v1", str(tmp_path / "y"), "--noise", "0,1.5"]) == 2
    assert "noise levels are probabilities" in capsys.readouterr().err


@pytest.mark.parametrize("executor", ["in-process", "ray"])
def test_a_part_failing_mid_collect_leaves_no_staging_and_no_version(executor, request, tmp_path):
    # At noise 1.0 every action is random and the policy is never called: only episode 5,
    # in the last of three parts, calls it (the parts before it are written first).
    rollouts = Rollouts(
        "Pendulum-v1",
        policy="tests.test_collect:broken_policy",
        noise_levels=(1.0,) * 5 + (0.0,),
        max_steps=5,
    )
    plan = plan_collect(rollouts, episodes=6, episodes_per_part=2)
    assert len(plan.parts) == 3
    if executor == "ray":
        request.getfixturevalue("ray_local")
    output = str(tmp_path / "collected")
    with pytest.raises(ValueError, match="the policy failed"):
        collect(
            plan,
            output,
            executor=InProcess() if executor == "in-process" else RayExecutor(),
            command="test",
        )
    assert storage.list_files(output) == []
    with pytest.raises(DatasetError):
        open_dataset(output)
    # the same output can be written by a run that succeeds
    working = plan_collect(
        Rollouts("Pendulum-v1", policy="random", max_steps=5), episodes=6, episodes_per_part=2
    )
    manifest = collect(working, output, executor=InProcess(), command="test")
    assert open_dataset(output).manifest.dataset_id == manifest.dataset_id
