"""`hindsight ask`: a trained run rolls out in classic-control environments under each
conditioning type, and a sweep writes ask.json in the issue's format plus the PNG plot.

The runs are trained for a few steps on in-memory batches shaped like the environment's
(the rollout code is what is under test here; tests/test_demo.py covers the real pipeline).
"""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

from jobs.cli import main as cli_main
from jobs.train_job import AskOptions, TrainOptions, run_ask
from trainers import ask, train

PENDULUM_ACTION = {"kind": "continuous", "dim": 1, "low": [-2.0], "high": [2.0]}
CARTPOLE_ACTION = {"kind": "discrete", "n": 2}
RETURN = {"mean": -800.0, "std": 300.0, "min": -1500.0, "max": -150.0,
          "quantiles": {"0.05": -1400.0, "0.5": -800.0, "0.95": -200.0}}  # fmt: skip


def train_tiny_run(run_dir, obs_dim, action, conditions, model="transformer", window=4):
    index = {
        "window": window,
        "observation": {"shape": [obs_dim], "dtype": "float32"},
        "action": action,
        "reward": {"mean": -5.0, "std": 2.0},
        "episode_return": RETURN,
        "conditions": conditions,
        "shards": [],
        "metadata": {},
    }
    options = TrainOptions(
        shards="memory://",
        run_dir=str(run_dir),
        condition=list(conditions),
        model=model,
        steps=3,
        d_model=16,
        n_layer=1,
        n_head=2,
        hidden=16,
        device="cpu",
    )
    config = train.new_run_config(index, options.model_dump())
    rng = np.random.default_rng(0)
    batch = {
        "observation": torch.as_tensor(rng.normal(size=(8, window, obs_dim)), dtype=torch.float32),
        "reward": torch.zeros(8, window),
        "timestep": torch.arange(window).repeat(8, 1),
        "mask": torch.ones(8, window, dtype=torch.bool),
    }
    if action["kind"] == "discrete":
        batch["action"] = torch.as_tensor(rng.integers(0, action["n"], size=(8, window)))
    else:
        batch["action"] = torch.as_tensor(rng.uniform(-2, 2, size=(8, window, action["dim"])), dtype=torch.float32)  # fmt: skip
    for column, spec in conditions.items():
        if spec["type"] == "scalar":
            batch[column] = torch.full((8, window), -500.0)
        elif spec["type"] == "vector":
            batch[column] = torch.zeros(8, window, spec["dim"])
        elif spec["type"] == "categorical":
            batch[column] = torch.zeros(8, window, dtype=torch.long)
        else:
            batch[column] = torch.zeros(8, spec["max_tokens"], dtype=torch.long)

    class Repeat:
        def __init__(self, state):
            self.position = 0

        def __iter__(self):
            while True:
                self.position += 1
                yield batch

        def state_dict(self):
            return {"position": self.position}

    train.train_loop(config, lambda state, rank, world: Repeat(state))
    return str(run_dir)


@pytest.mark.parametrize("model", ["transformer", "mlp"])
def test_return_to_go_sweep_writes_ask_json_and_plot(tmp_path, model):
    run = train_tiny_run(
        tmp_path / "run",
        3,
        PENDULUM_ACTION,
        {"return_to_go": {"type": "scalar", "level": "steps", "mean": -400.0, "std": 300.0}},
        model=model,
    )
    out = tmp_path / "report"
    report = run_ask(
        AskOptions(
            run_dir=run,
            env="Pendulum-v1",
            sweep=("return_to_go", ["-1000", "-150"]),
            episodes=2,
            seeds=[0, 1],
            out=str(out),
        )
    )
    written = json.loads((out / "ask.json").read_text())
    assert written["env"] == "Pendulum-v1" and written["condition"] == "return_to_go"
    assert [r["requested"] for r in written["results"]] == [-1000.0, -150.0]
    for row in written["results"]:
        assert set(row) == {"requested", "achieved_mean", "achieved_ci95", "episodes"}
        assert row["episodes"] == 4
        low, high = row["achieved_ci95"]
        assert low <= row["achieved_mean"] <= high
        # Pendulum's reward is in [-16.3, 0] per step over 200 steps.
        assert -16.3 * 200 <= row["achieved_mean"] <= 0
    assert report["results"] == written["results"]
    assert (out / "ask.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rollout_return_matches_an_independent_replay(tmp_path):
    """The returns ask reports are the environment's: replaying the same actions in a fresh
    environment with the same seed gives the same sum of rewards."""
    run = train_tiny_run(
        tmp_path / "run",
        3,
        PENDULUM_ACTION,
        {"return_to_go": {"type": "scalar", "level": "steps", "mean": -400.0, "std": 300.0}},
        model="mlp",
    )
    policy, config = train.load_policy(run)
    result = ask.rollout(policy, config, "Pendulum-v1", {"return_to_go": -200.0}, 1, seed=3)

    env = gym.make("Pendulum-v1")
    observation, _ = env.reset(seed=3 * 100_003)
    total, rtg = 0.0, -200.0
    for _ in range(200):
        batch = {
            "observation": torch.as_tensor(observation, dtype=torch.float32).view(1, 1, 3),
            "action": torch.zeros(1, 1, 1),
            "timestep": torch.zeros(1, 1, dtype=torch.long),
            "mask": torch.ones(1, 1, dtype=torch.bool),
            "return_to_go": torch.tensor([[rtg]]),
        }
        with torch.no_grad():
            action = policy.actions.to_env(policy(batch)[:, -1]).numpy()[0]
        observation, reward, terminated, truncated, _ = env.step(action)
        total += reward
        rtg -= reward
        if terminated or truncated:
            break
    assert result["returns"][0] == pytest.approx(total, rel=1e-5)


def test_skill_on_cartpole_and_text_through_the_cli(tmp_path, capsys):
    skill = {
        "skill": {"type": "categorical", "level": "episodes", "vocabulary": ["novice", "expert"]}
    }
    run = train_tiny_run(tmp_path / "skill", 4, CARTPOLE_ACTION, skill)
    code = cli_main(
        [
            "ask",
            run,
            "--env",
            "CartPole-v1",
            "--sweep",
            "skill=novice,expert",
            "--episodes",
            "2",
            "--out",
            str(tmp_path / "skill-report"),
        ]  # fmt: skip
    )
    assert code == 0
    written = json.loads((tmp_path / "skill-report" / "ask.json").read_text())
    assert [r["requested"] for r in written["results"]] == ["novice", "expert"]
    assert all(1 <= r["achieved_mean"] <= 500 for r in written["results"])

    text = {
        "description": {
            "type": "text",
            "level": "episodes",
            "vocabulary": ["<pad>", "<unk>", "swung", "up", "fast"],
            "max_tokens": 6,
        }
    }
    run = train_tiny_run(tmp_path / "text", 3, PENDULUM_ACTION, text, model="mlp")
    result = ask.ask(run, "Pendulum-v1", {"description": "Swung up, fast!"}, episodes=1)
    assert result["episodes"] == 1

    assert cli_main(["ask", run, "--env", "Pendulum-v1", "--condition", "skill=expert"]) == 2
    assert "cannot ask for ['skill']" in capsys.readouterr().err
    condition = ["--condition", "description=fast"]
    assert cli_main(["ask", run, "--env", "CartPole-v1", *condition]) == 2
    assert "CartPole-v1 observations have 4 numbers, the policy was trained on 3" in (
        capsys.readouterr().err
    )
    assert cli_main(["ask", run, "--env", "Pendulm-v1", *condition]) == 2
    assert "Did you mean: `Pendulum`" in capsys.readouterr().err


def test_goal_conditioned_rollout_reports_success_on_point_goal(tmp_path):
    goal = {"hindsight_goal": {"type": "vector", "level": "steps", "dim": 2,
                               "mean": [0.0, 0.0], "std": [0.5, 0.5]}}  # fmt: skip
    run = train_tiny_run(
        tmp_path / "goal",
        4,
        {"kind": "continuous", "dim": 2, "low": [-1, -1], "high": [1, 1]},
        goal,
    )
    result = ask.ask(run, "hindsight/PointGoal-v0", {}, episodes=3)
    assert result["metric"] == "success" and result["episodes"] == 3
    assert result["success_mean"] == result["achieved_mean"]
    assert 0.0 <= result["achieved_mean"] <= 1.0
    commanded = ask.ask(run, "hindsight/PointGoal-v0", {"hindsight_goal": "0.5:-0.5"}, episodes=2)
    assert commanded["episodes"] == 2


def test_tokenize_matches_the_vocabulary():
    vocabulary = ["<pad>", "<unk>", "held", "it", "upright"]
    assert ask.tokenize("Held it UPRIGHT, wobbly", vocabulary, 6) == [2, 3, 4, 1, 0, 0]
