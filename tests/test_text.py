"""Held-out conditioning values (`shard --exclude`) and text that generalizes (the trainer's
text encoders: learned tokens, a pretrained sentence embedder, endpoint embeddings).

The dataset is shaped as the `instructions` relabeler writes it: an episode column
`instruction` (null when the episode accomplished nothing) with `instruction_step`, and a
step column `instruction` holding the episode's instruction up to that step, null after it.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pytest

from engine import shards
from engine.dataset import open_dataset
from engine.executor import InProcess
from jobs.cli import main as cli_main
from schemas.manifest import RelabelerInfo
from schemas.shard_index import ShardError, ShardIndex
from tests.synthetic import attach_group, make_episodes, write_synthetic_dataset

COLOURS = ("red", "green", "blue", "purple")
OBJECTS = ("key", "ball", "box")
HELD_OUT = ("go to the red key", "go to the green ball")
EXCLUDE = "instruction IN ('go to the red key', 'go to the green ball')"


def instruction_dataset(uri: str, num_episodes: int = 40, seed: int = 0) -> str:
    """CartPole-shaped episodes (4 numbers, 2 actions) with hindsight instructions; every
    fifth episode accomplished nothing."""
    steps, episodes = make_episodes(
        num_episodes=num_episodes, obs_dim=4, seed=seed, min_length=3, max_length=25,
        discrete_actions=2,
    )  # fmt: skip
    base = uri + "-base"
    write_synthetic_dataset(base, steps, episodes, part_steps=200)

    def columns(parent, index):
        episode_part = parent.read_part(index, "episodes", ["episode_id", "length"])
        ids = episode_part.column("episode_id").to_numpy()
        lengths = episode_part.column("length").to_numpy()
        texts = [
            None
            if (i // 10) % 5 == 4
            else f"go to the {COLOURS[(i // 10) % 4]} {OBJECTS[(i // 10) % 3]}"
            for i in ids
        ]
        done_at = [None if text is None else int(n) // 2 for text, n in zip(texts, lengths)]
        step_texts = [
            text if at is not None and t <= at else None
            for text, at, n in zip(texts, done_at, lengths)
            for t in range(int(n))
        ]
        episode_columns = pa.table(
            {
                "instruction": pa.array(texts, pa.string()),
                "instruction_step": pa.array(done_at, pa.int32()),
            }
        )
        return pa.table({"instruction": pa.array(step_texts, pa.string())}), episode_columns

    relabeler = RelabelerInfo(name="instructions", version="1", params={})
    return attach_group(base, uri, "instructions", columns, relabeler, {"env_id": "CartPole-v1"})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return instruction_dataset(str(tmp_path_factory.mktemp("text") / "babyai-like"))


def step_frame(uri: str) -> pl.DataFrame:
    """Every step with its instruction (steps) and its episode's noise (episodes), by Polars."""
    dataset = open_dataset(uri)
    steps = pl.concat(
        pl.from_arrow(dataset.read_part(i, "steps", ["episode_id", "t", "instruction"]))
        for i in range(dataset.num_parts)
    )
    episodes = pl.concat(
        pl.from_arrow(dataset.read_part(i, "episodes", ["episode_id", "noise"]))
        for i in range(dataset.num_parts)
    )
    return steps.join(episodes, on="episode_id")


def test_shard_exclude_is_applied_and_recorded(dataset, tmp_path, capsys):
    out = str(tmp_path / "held-out")
    argv = ["shard", dataset, out, "--condition", "instruction", "--window", "4"]
    assert cli_main([*argv, "--exclude", EXCLUDE]) == 0
    assert "excluded steps" in capsys.readouterr().out
    index = ShardIndex.from_json(open(f"{out}/index.json").read())

    frame = step_frame(dataset)
    excluded = frame.filter(pl.col("instruction").is_in(HELD_OUT))
    kept = frame.filter(
        pl.col("instruction").is_not_null() & ~pl.col("instruction").is_in(HELD_OUT)
    )
    null = frame.filter(pl.col("instruction").is_null())
    found = index.exclusions
    assert found is not None and found.predicate == EXCLUDE
    assert found.excluded_steps == excluded.height > 0
    assert found.null_steps == {"instruction": null.height}
    assert index.steps == kept.height == frame.height - excluded.height - null.height
    assert index.episodes == kept["episode_id"].n_unique()
    assert found.excluded_episodes == excluded["episode_id"].n_unique()
    assert found.values == {"instruction": sorted(HELD_OUT)}
    # Training never sees a held-out text, nor a word only they hold.
    info = index.conditions["instruction"]
    assert set(info.texts) == set(kept["instruction"].unique()) and not set(info.texts) & set(HELD_OUT)  # fmt: skip
    assert "red" in info.vocabulary  # "go to the red ball" is kept

    # Without --exclude: only the null steps are dropped, and counted.
    plain = shards.write_shards(
        open_dataset(dataset), shards.ShardSettings(condition=("instruction",), window=4),
        str(tmp_path / "plain"), executor=InProcess(), command="test",
    )  # fmt: skip
    assert plain.steps == frame.height - null.height
    assert plain.exclusions.predicate is None and plain.exclusions.excluded_steps == 0


def test_shard_exclude_on_an_episode_column_and_bad_predicates(dataset, tmp_path, capsys):
    settings = shards.ShardSettings(condition=("instruction",), window=4, exclude="noise >= 1.0")
    index = shards.write_shards(
        open_dataset(dataset), settings, str(tmp_path / "noisy"), executor=InProcess(),
        command="test",
    )  # fmt: skip
    frame = step_frame(dataset).filter(pl.col("instruction").is_not_null())
    assert index.steps == frame.filter(pl.col("noise") < 1.0).height
    assert index.exclusions.excluded_steps == step_frame(dataset).filter(pl.col("noise") >= 1).height  # fmt: skip

    out = str(tmp_path / "bad")
    assert cli_main(["shard", dataset, out, "--condition", "instruction", "--exclude", "nosuch = 1"]) == 2  # fmt: skip
    assert "unknown column(s) ['nosuch']" in capsys.readouterr().err
    assert cli_main(["shard", dataset, out, "--condition", "instruction", "--exclude", "t >"]) == 2
    assert "--exclude" in capsys.readouterr().err
    assert cli_main(["shard", dataset, out, "--exclude", "reward > avg(reward)"]) == 2
    assert "not row-local" in capsys.readouterr().err
    everything = shards.ShardSettings(condition=("instruction",), exclude="t >= 0")
    with pytest.raises(ShardError, match="no step is left"):
        shards.write_shards(
            open_dataset(dataset), everything, out, executor=InProcess(), command="test"
        )
    assert not (tmp_path / "bad").exists()
