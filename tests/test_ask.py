"""`hindsight ask`: a trained run rolls out in classic-control environments under each
conditioning type, and a sweep writes ask.json in the issue's format plus the PNG plot.

The runs are trained for a few steps on in-memory batches shaped like the environment's
(the rollout code is what is under test here; tests/test_demo.py covers the real pipeline).
"""

from __future__ import annotations

import json
import math
import shlex

import gymnasium as gym
import numpy as np
import pytest
import torch

from jobs.cli import main as cli_main
from jobs.commands.ask import Ask
from trainers import ask, sweep_report, train
from trainers.options import TrainOptions

PENDULUM_ACTION = {"kind": "continuous", "dim": 1, "low": [-2.0], "high": [2.0]}
CARTPOLE_ACTION = {"kind": "discrete", "n": 2}
RETURN = {"mean": -800.0, "std": 300.0, "min": -1500.0, "max": -150.0,
          "quantiles": {"0.05": -1400.0, "0.5": -800.0, "0.95": -200.0}}  # fmt: skip


def train_tiny_run(
    run_dir, obs_dim, action, conditions, model="transformer", window=4, metadata=None
):
    index = {
        "window": window,
        "observation": {"shape": [obs_dim], "dtype": "float32"},
        "action": action,
        "reward": {"mean": -5.0, "std": 2.0},
        "episode_return": RETURN,
        "conditions": conditions,
        "shards": [],
        "metadata": metadata or {},
    }
    options = TrainOptions(
        input="memory://",
        output=str(run_dir),
        condition=list(conditions),
        model=model,
        steps=3,
        d_model=16,
        n_layer=1,
        n_head=2,
        hidden=16,
        device="cpu",
    )
    config = train.new_run_config(index, options)
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
    report = Ask(
        input=run,
        env="Pendulum-v1",
        sweep="return_to_go=-1000,-150",
        episodes=2,
        seeds=[0, 1],
        output=str(out),
    ).run()
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
            "--output",
            str(tmp_path / "skill-report"),
        ]  # fmt: skip
    )
    assert code == 0
    written = json.loads((tmp_path / "skill-report" / "ask.json").read_text())
    assert [r["requested"] for r in written["results"]] == ["novice", "expert"]
    assert all(1 <= r["achieved_mean"] <= 500 for r in written["results"])
    assert written["reference"]["follows_request"] is not None  # labels rank as requested

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
    # Sentences have no order: a sweep over them reports no rank correlation and no warning.
    report = ask.sweep(run, "Pendulum-v1", "description", ["swung up", "fast"], episodes=1)
    assert report["reference"]["spearman"] is None and report["warning"] is None

    assert cli_main(["ask", run, "--env", "Pendulum-v1", "--request", "skill=expert"]) == 2
    assert "cannot ask for ['skill']" in capsys.readouterr().err
    condition = ["--request", "description=fast"]
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


# --- the sweep's references: dataset mean return, rank correlation, warning -----------------

RTG = {"return_to_go": {"type": "scalar", "level": "steps", "mean": -400.0, "std": 300.0}}


def test_spearman_matches_a_hand_computation():
    # No ties: rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)); ranks of [10, 30, 20, 40] are
    # [1, 3, 2, 4], d = [0, 1, 1, 0], so rho = 1 - 6 * 2 / 60 = 0.8.
    assert sweep_report.spearman([1.0, 2.0, 3.0, 4.0], [10.0, 30.0, 20.0, 40.0]) == pytest.approx(
        0.8
    )
    # Ties take the mean of their ranks: [5, 5, 7] -> [1.5, 1.5, 3]; Pearson of
    # [1, 2, 3] and [1.5, 1.5, 3] by hand: covariance 0.75, norms sqrt(2) and sqrt(1.5).
    assert sweep_report.ranks([5.0, 5.0, 7.0]).tolist() == [1.5, 1.5, 3.0]
    expected = 1.5 / (2**0.5 * 1.5**0.5)
    assert sweep_report.spearman([1.0, 2.0, 3.0], [5.0, 5.0, 7.0]) == pytest.approx(expected)
    assert sweep_report.spearman([1.0, 2.0, 3.0], [-3.0, -2.0, -1.0]) == pytest.approx(1.0)
    assert sweep_report.spearman([1.0, 2.0], [4.0, 4.0]) is None  # constant: undefined
    assert sweep_report.spearman([1.0], [4.0]) is None


def rows(requested, achieved):
    return [
        {"requested": r, "achieved_mean": a, "achieved_ci95": [a - 1, a + 1], "episodes": 2}
        for r, a in zip(requested, achieved, strict=True)
    ]


def test_sweep_reference_says_when_achieved_does_not_follow_requested():
    follows = sweep_report.sweep_reference(
        rows([-900.0, -500.0, -150.0], [-800.0, -600.0, -300.0]), -600.0
    )
    assert follows == {"dataset_mean_return": -600.0, "spearman": 1.0, "follows_request": True}
    assert sweep_report.follow_warning(follows, "return_to_go", "return") is None

    # Requested listed out of order: ranked by value, not by position (rho = 0.5 by hand:
    # requested ranks [3, 1, 2], achieved ranks [3, 2, 1], d = [0, -1, 1], 1 - 6*2/24).
    flat = sweep_report.sweep_reference(
        rows([-150.0, -900.0, -500.0], [-300.0, -600.0, -800.0]), None
    )
    assert flat["spearman"] == pytest.approx(0.5) and flat["follows_request"] is False
    warning = sweep_report.follow_warning(flat, "return_to_go", "return")
    assert warning.startswith("warning: the achieved return does not follow the requested")

    # Labels rank in the order requested; the highest achieving less than the lowest fails
    # even when the correlation is high elsewhere (2 rows: rho = -1).
    labels = sweep_report.sweep_reference(rows(["novice", "expert"], [-200.0, -900.0]), None)
    assert labels["spearman"] == pytest.approx(-1.0) and labels["follows_request"] is False
    constant = sweep_report.sweep_reference(rows([1.0, 2.0], [500.0, 500.0]), None)
    assert constant["spearman"] is None and constant["follows_request"] is False
    assert "undefined" in sweep_report.follow_warning(constant, "skill", "return")
    assert sweep_report.sweep_reference(rows([1.0], [5.0]), None)["follows_request"] is None


def test_sweep_report_carries_the_references_and_the_env_recorded_with_the_run(tmp_path, capsys):
    run = train_tiny_run(
        tmp_path / "run", 3, PENDULUM_ACTION, RTG, model="mlp", metadata={"env_id": "Pendulum-v1"}
    )
    out = tmp_path / "report"
    # No --env: the run's own environment (the dataset's env_id, recorded in the index facts).
    args = ["ask", run, "--sweep", "return_to_go=-1000,-500,-150", "--episodes", "2",
            "--output", str(out)]  # fmt: skip
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    written = json.loads((out / "ask.json").read_text())
    assert written["env"] == "Pendulum-v1"
    achieved = [row["achieved_mean"] for row in written["results"]]
    # Independent: requested is already increasing, so rho is the rank correlation of the
    # achieved means with [1, 2, 3]; 1 - 6 * sum(d^2) / (n (n^2 - 1)) with n = 3.
    achieved_ranks = [sorted(achieved).index(value) + 1 for value in achieved]
    expected = 1 - 6 * sum((r - i) ** 2 for i, r in enumerate(achieved_ranks, 1)) / 24
    reference = written["reference"]
    assert reference["spearman"] == pytest.approx(expected)
    assert reference["dataset_mean_return"] == RETURN["mean"]
    follows = expected > 0.5 and achieved[2] > achieved[0]
    assert reference["follows_request"] is follows
    assert "dataset mean return: -800.00" in printed
    assert f"rank correlation of achieved vs requested (Spearman): {expected:.2f}" in printed
    assert ("warning: the achieved return does not follow" in printed) is (not follows)
    assert (written["warning"] is None) is follows
    assert (out / "ask.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    single = ask.ask(run, None, {"return_to_go": "-200"}, episodes=1)
    assert single["env"] == "Pendulum-v1" and single["dataset_mean_return"] == RETURN["mean"]


def test_without_a_recorded_env_ask_needs_env(tmp_path, capsys):
    run = train_tiny_run(tmp_path / "run", 3, PENDULUM_ACTION, RTG, model="mlp")
    assert cli_main(["ask", run, "--request", "return_to_go=-200", "--episodes", "1"]) == 2
    error = capsys.readouterr().err
    assert "does not record its environment" in error and "pass --env ENV_ID" in error


def test_a_requested_sentence_may_hold_commas_on_the_command_line():
    """`--request` takes the text after `COLUMN=` whole (as before the command model): a new
    pair starts only where `COLUMN=` follows a comma; the recorded line parses back the same."""
    from jobs.cli import parse

    command = parse(["ask", "R", "--request", "description=held it upright, wobbly"])
    assert command.request == {"description": "held it upright, wobbly"}
    command = parse(["ask", "R", "--request", "a=1", "--request", "observation.goal=0.5:-0.5"])
    assert command.request == {"a": "1", "observation.goal": "0.5:-0.5"}
    assert parse(shlex.split(command.history_line())[1:]).request == command.request


def test_a_baseline_run_is_asked_the_same_way_and_reported(tmp_path, capsys):
    metadata = {"env_id": "Pendulum-v1"}
    run = train_tiny_run(tmp_path / "run", 3, PENDULUM_ACTION, RTG, model="mlp", metadata=metadata)
    bc = train_tiny_run(tmp_path / "bc", 3, PENDULUM_ACTION, {}, model="mlp", metadata=metadata)
    out = tmp_path / "report"
    args = ["ask", run, "--sweep", "return_to_go=-1000,-150", "--episodes", "2",
            "--baseline", bc, "--output", str(out)]  # fmt: skip
    assert cli_main(args) == 0
    written = json.loads((out / "ask.json").read_text())
    baseline = written["reference"]["baseline"]
    # Independent: the same baseline asked directly, same env, seeds and episodes.
    direct = ask.ask(bc, "Pendulum-v1", {}, episodes=2, seeds=[0])
    assert baseline["achieved_mean"] == pytest.approx(direct["achieved_mean"])
    assert baseline["run"] == bc and baseline["episodes"] == 2
    best = max(row["achieved_mean"] for row in written["results"])
    printed = capsys.readouterr().out
    assert f"the best request achieved {best - direct['achieved_mean']:+.2f} over it" in printed


def test_return_to_go_is_asked_within_the_range_the_data_holds(tmp_path):
    """A request above the data's best return asks for the best; below its worst, for the
    worst; off the data the policy's answer would be arbitrary."""
    spec = {"type": "scalar", "level": "steps", "mean": -400.0, "std": 300.0}
    run = train_tiny_run(
        tmp_path / "run",
        3,
        PENDULUM_ACTION,
        {"return_to_go": {**spec, "min": -900.0, "max": -150.0}},
        model="mlp",
    )
    policy, config = train.load_policy(run)

    def returns(requested: float) -> list[float]:
        condition = {"return_to_go": requested}
        return ask.rollout(policy, config, "Pendulum-v1", condition, 2, seed=4)["returns"]

    assert returns(-20.0) == returns(-150.0)
    assert returns(-5000.0) == returns(-900.0)
    assert ask.return_to_go_range({"min": None, "max": None}) == (-math.inf, math.inf)
