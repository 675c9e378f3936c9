"""MiniGrid/BabyAI in collect and ask: BabyAI's bot as a policy (`bot`, `bot:play`), the
stored layout (struct views, missions, success), missions set on demand, and `--metric
success` with a Wilson interval, end to end on a tiny run.

What was reached is read back from the stored views alone (the cell in front of the agent,
image[3, 5], at the last step), independently of the bot and the env's verifier.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX

from engine import minigrid
from engine.collect import collect_part_tables, make_env
from engine.dataset import open_dataset
from jobs.cli import main as cli_main
from trainers.sweep_report import wilson_ci95

ENV = "BabyAI-GoToLocal-v0"
IDX_TO_OBJECT = {v: k for k, v in OBJECT_TO_IDX.items()}
IDX_TO_COLOR = {v: k for k, v in COLOR_TO_IDX.items()}


def views(column: pa.ChunkedArray) -> np.ndarray:
    """Stored views as [N, 7, 7, 3] uint8."""
    image = column.combine_chunks().field("image")
    return image.flatten().to_numpy().reshape(len(image), 7, 7, 3)


def reached(steps: pa.Table, episodes: pa.Table) -> list[str]:
    """'go to the <colour> <type>' of the object in front of the agent after each
    episode's last step, from the stored next_observation view ('' for none)."""
    last = np.cumsum(episodes.column("length").to_numpy()) - 1
    front = views(steps.column("next_observation"))[last, 3, 5]
    return [
        f"go to the {IDX_TO_COLOR[int(c)]} {IDX_TO_OBJECT[int(o)]}"
        if IDX_TO_OBJECT[int(o)] in minigrid.OBJECT_TYPES
        else ""
        for o, c, _ in front
    ]


def canonical(mission: str) -> str:
    return mission.replace("go to a ", "go to the ")


def test_bot_does_its_mission_and_the_layout_is_the_contract():
    steps, episodes, _ = collect_part_tables(ENV, "bot", range(16), [0.0, 0.2], seed=3)
    observation = steps.schema.field("observation").type
    assert observation == pa.struct(
        [("direction", pa.int64()), ("image", pa.list_(pa.uint8(), 147))]
    )
    assert steps.schema.field("next_observation").type == observation
    assert steps.schema.field("action").type == pa.int64()
    # Each step's next view is the following step's view, within episodes.
    image, following = views(steps.column("observation")), views(steps.column("next_observation"))
    same_episode = np.diff(steps.column("episode_id").to_numpy()) == 0
    assert np.array_equal(image[1:][same_episode], following[:-1][same_episode])
    assert set(np.unique(steps.column("observation").combine_chunks().field("direction"))) <= {
        0, 1, 2, 3,
    }  # fmt: skip
    # The bot does its mission nearly always (measured: 200 of 200 at noise 0 and 0.2), and
    # the view shows the mission's object in front of it at the end.
    success = episodes.column("success").to_numpy(zero_copy_only=False)
    assert success.mean() >= 0.9
    missions = [canonical(m) for m in episodes.column("mission").to_pylist()]
    ends = reached(steps, episodes)
    assert all(end == mission for end, mission, ok in zip(ends, missions, success) if ok)
    step_success = steps.column("success").to_numpy(zero_copy_only=False)
    assert step_success.sum() == success.sum()
    assert np.all(steps.column("reward").to_numpy()[step_success] > 0)
    assert episodes.column("bot_goal").null_count == len(episodes)


def test_bot_play_reaches_its_own_goal_not_the_recorded_mission():
    steps, episodes, _ = collect_part_tables(ENV, "bot:play", range(40), [0.2], seed=0)
    goals = episodes.column("bot_goal").to_pylist()
    missions = [canonical(m) for m in episodes.column("mission").to_pylist()]
    ends = reached(steps, episodes)
    last = np.cumsum(episodes.column("length").to_numpy()) - 1
    truncated = steps.column("truncated").to_numpy(zero_copy_only=False)[last]
    # An episode the bot ended itself (truncated) ends facing its goal ...
    assert truncated.mean() >= 0.6
    assert all(end == goal for end, goal, cut in zip(ends, goals, truncated) if cut)
    # ... which is not what the recorded mission says, most of the time (measured on 200
    # episodes: the bot's goal is the mission's object in 12%).
    differs = np.mean([end != mission for end, mission in zip(ends, missions)])
    assert differs >= 0.6


def test_collect_is_deterministic_by_seed_and_episode():
    whole, whole_episodes, _ = collect_part_tables(ENV, "bot:play", range(6), [0.0, 0.5], 1)
    first, _, _ = collect_part_tables(ENV, "bot:play", range(3), [0.0, 0.5], 1)
    rest, _, _ = collect_part_tables(ENV, "bot:play", range(3, 6), [0.0, 0.5], 1)
    assert pa.concat_tables([first, rest]).equals(whole)
    other, _, _ = collect_part_tables(ENV, "bot:play", range(6), [0.0, 0.5], 2)
    assert not other.equals(whole)


def test_a_mission_set_on_demand_is_what_the_env_scores():
    env = make_env(ENV)
    observation, used = minigrid.reset_with_mission(env, "go to the red key", seed=5)
    assert used >= 5
    assert canonical(env.unwrapped.mission) == "go to the red key"
    assert observation["mission"] == env.unwrapped.mission
    bot, reward, done = minigrid.Bot(env), 0.0, False
    for _ in range(64):  # BabyAI's bot, pursuing the env's (set) mission, is scored on it
        action = bot.act(None)
        _, reward, done, _, _ = env.step(action)
        if done:
            break
    assert done and reward > 0
    with pytest.raises(ValueError, match="give the mission the env is scored on with --mission"):
        minigrid.parse_mission("walk up to the crimson key")


def test_wilson_interval_matches_the_formula():
    rate, low, high = wilson_ci95([1.0] * 8 + [0.0] * 2)
    assert rate == 0.8
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_ci95([0.0] * 5)[1:] == (0.0, pytest.approx(0.4345, abs=1e-4))


def test_collect_shard_train_ask_for_a_mission(tmp_path, capsys):
    data, shards, run = (str(tmp_path / name) for name in ("data", "shards", "run"))
    assert cli_main(["collect", ENV, data, "--episodes", "40", "--policy", "bot:play", "--noise", "0.2"]) == 0  # fmt: skip
    capsys.readouterr()
    manifest = open_dataset(data).manifest
    assert manifest.metadata["observation_shapes"]["image"] == [7, 7, 3]
    assert manifest.metadata["observation_dtypes"]["image"] == "uint8"
    assert cli_main(["query", data, "--where", "mission LIKE '%key%'", "--level", "episodes", "--format", "csv"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "mission" in printed.splitlines()[0]
    assert cli_main(["shard", data, shards, "--condition", "mission", "--text", "mission", "--window", "4"]) == 0  # fmt: skip
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["observation"]["shape"] == [148]  # direction, then the 147 view numbers
    assert cli_main(["train", shards, run, "--condition", "mission", "--steps", "5", "--hidden", "16"]) == 0  # fmt: skip
    capsys.readouterr()
    code = cli_main(
        ["ask", run, "--request", "mission=walk up to the crimson key", "--mission",
         "go to the red key", "--metric", "success", "--episodes", "4", "--json"]
    )  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mission"] == "go to the red key" and result["metric"] == "success"
    assert result["episodes"] == 4
    rate, low, high = wilson_ci95([1.0] * round(4 * result["achieved_mean"]) + [0.0] * (4 - round(4 * result["achieved_mean"])))  # fmt: skip
    assert result["achieved_ci95"] == pytest.approx([low, high])
    assert "return_mean" in result
    # Drawn actions are seeded: the same request twice, the same episodes.
    drawn = ["ask", run, "--request", "mission=go to the red key", "--actions", "sample", "--episodes", "3", "--seeds", "4", "--json"]  # fmt: skip
    assert cli_main(drawn) == 0
    first = json.loads(capsys.readouterr().out)
    assert cli_main(drawn) == 0
    assert json.loads(capsys.readouterr().out) == first
    # A text request for a BabyAI env is its mission, unless the words are not BabyAI's.
    assert cli_main(["ask", run, "--request", "mission=walk up to the crimson key", "--episodes", "1"]) == 2  # fmt: skip
    assert "--mission" in capsys.readouterr().err
    # A bad --mission itself: named as such, without the advice to give --mission.
    assert cli_main(["ask", run, "--request", "mission=go to the red key", "--mission", "go to the reddish key", "--episodes", "1"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "--mission: mission 'go to the reddish key'" in err and "with --mission" not in err
    assert len(err.strip().splitlines()) == 1  # the error only: no warning before it
    # --mission on another env fails before any warning about the request.
    assert cli_main(["ask", run, "--env", "CartPole-v1", "--request", "mission=go to the red key", "--mission", "go to the red key"]) == 2  # fmt: skip
    assert capsys.readouterr().err.strip().splitlines() == [
        "hindsight ask: error: --mission is for MiniGrid/BabyAI envs, not CartPole-v1"
    ]
    sweep = ["ask", run, "--sweep", "mission=go to the red key,go to the blue ball", "--metric", "success", "--episodes", "2"]  # fmt: skip
    assert cli_main(sweep) == 0
    table = capsys.readouterr().out
    assert "go to the blue ball" in table and "return" in table and "warning" not in table
    # Missions have no order: no rank correlation; the numbers line up under "achieved".
    assert "Spearman" not in table
    header, *rows = table.splitlines()[:3]
    assert {row.index("  [") for row in rows} == {header.index("  95% CI")}
    # A sweep over paraphrases, each with the mission it means.
    sweep = ["ask", run, "--sweep", "mission=approach the crimson key,go to the blue ball", "--mission", "go to the red key,go to the blue ball", "--metric", "success", "--episodes", "2"]  # fmt: skip
    assert cli_main(sweep) == 0
    assert "(mission: go to the red key)" in capsys.readouterr().out
    assert cli_main([*sweep[:4], "--mission", "a,b,c", "--episodes", "1"]) == 2
    assert "3 missions for 2 swept values" in capsys.readouterr().err


def test_bot_policies_are_for_minigrid_only(tmp_path, capsys):
    assert cli_main(["collect", "CartPole-v1", str(tmp_path / "c"), "--policy", "bot"]) == 2
    assert "MiniGrid/BabyAI envs only" in capsys.readouterr().err


def test_a_minigrid_view_goes_in_one_hot_and_other_states_as_before():
    from trainers.minigrid_view import (
        MINIGRID_ONE_HOT_DIM,
        is_minigrid_view,
        minigrid_layout,
        minigrid_one_hot,
    )
    from trainers.models import build_model, model_config

    rng = np.random.default_rng(0)
    view = np.stack(
        [rng.integers(0, 11, 49), rng.integers(0, 6, 49), rng.integers(0, 3, 49)], axis=-1
    )  # (49 cells, 3 channels) in (x, y) order
    direction = 2
    vector = torch.tensor(np.concatenate([[direction], view.reshape(-1)]), dtype=torch.float32)
    encoded = minigrid_one_hot(vector[None])[0].numpy()
    assert encoded.shape == (MINIGRID_ONE_HOT_DIM,) and encoded.sum() == 1 + 49 * 3
    assert encoded[:4].tolist() == [0, 0, 1, 0]
    cells = encoded[4:].reshape(49, 20)
    for cell, (kind, color, state) in zip(cells, view):  # independent of the encoder
        expected = np.zeros(20)
        expected[[kind, 11 + color, 17 + state]] = 1
        assert np.array_equal(cell, expected)

    index = {
        "window": 1,
        "observation": {"shape": [148]},
        "action": {"kind": "discrete", "n": 7},
        "conditions": {},
        "metadata": {"observation_shapes": minigrid.OBSERVATION_SHAPES},
    }
    assert is_minigrid_view(index)
    config = model_config(index, [], kind="mlp", d_model=8, hidden=8)
    assert config["observation_encoding"] == "minigrid_relational"
    # The layout the network sees next to the match maps: kinds with key/ball/box as one
    # "object", states, no colours.
    layout = minigrid_layout(torch.as_tensor(encoded)[None])[0].numpy()
    assert layout.shape == (4 + 49 * 12,) and layout[:4].tolist() == [0, 0, 1, 0]
    kinds = [0, 1, 2, 3, 4, 8, 9, 10]
    for cell, (kind, _, state) in zip(layout[4:].reshape(49, 12), view):
        expected = np.zeros(12)
        expected[kinds.index(kind) if kind in kinds else 8] = 1
        expected[9 + state] = 1
        assert np.array_equal(cell, expected)
    policy = build_model(config)
    batch = {"observation": vector.reshape(1, 1, 148), "mask": torch.ones(1, 1, dtype=torch.bool)}
    assert policy(batch).shape == (1, 1, 7)
    plain = dict(index, metadata={})  # no recorded view shape: floats, as before
    assert not is_minigrid_view(plain)
    assert "observation_encoding" not in model_config(plain, [], kind="mlp")
