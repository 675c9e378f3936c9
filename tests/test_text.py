"""Held-out conditioning values (`shard --exclude`) and text that generalizes (the trainer's
text encoders: learned tokens, a pretrained sentence embedder, endpoint embeddings).

The dataset is shaped as the `instructions` relabeler writes it: an episode column
`instruction` (null when the episode accomplished nothing) with `instruction_step`, and a
step column `instruction` holding the episode's instruction up to that step, null after it.
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch

from engine import shards
from engine.dataset import open_dataset
from engine.executor import InProcess
from jobs.cli import main as cli_main
from schemas.manifest import RelabelerInfo
from schemas.shard_index import ShardError, ShardIndex, encode_text
from tests.synthetic import attach_group, make_episodes, write_synthetic_dataset
from trainers import ask, encoders, text, train
from trainers.options import TrainOptions

COLOURS = ("red", "green", "blue", "purple")
OBJECTS = ("key", "ball", "box")
HELD_OUT = ("go to the red key", "go to the green ball")
EXCLUDE = "instruction IN ('go to the red key', 'go to the green ball')"


def instruction_dataset(
    uri: str, num_episodes: int = 40, seed: int = 0, column: str = "instruction"
) -> str:
    """CartPole-shaped episodes (4 numbers, 2 actions) with hindsight instructions (in
    `column`); every fifth episode accomplished nothing."""
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
                column: pa.array(texts, pa.string()),
                "instruction_step": pa.array(done_at, pa.int32()),
            }
        )
        return pa.table({column: pa.array(step_texts, pa.string())}), episode_columns

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
    with pytest.raises(ShardError, match="no step is left") as error:
        shards.write_shards(
            open_dataset(dataset), everything, out, executor=InProcess(), command="test"
        )
    # The counts, not the held-out values (up to 1,000 of them).
    total = step_frame(dataset).height
    assert f"--exclude 't >= 0' matched {total} step(s)" in str(error.value)
    assert "go to the" not in str(error.value)
    assert not (tmp_path / "bad").exists()


def test_a_struct_observation_part_with_every_step_left_out_is_empty_not_an_error():
    """A MiniGrid-like struct state: its width comes from the type, so a part whose steps
    were all excluded gives a (0, width) state instead of failing to reshape."""
    from engine.shards.episodes import _state_vector

    kind = pa.struct([("direction", pa.int64()), ("image", pa.list_(pa.uint8(), 147))])
    rows = pa.array([{"direction": 3, "image": [i % 11 for i in range(147)]}] * 2, kind)
    state = _state_vector(pa.chunked_array([rows]), "test")
    assert state.shape == (2, 148) and state[0, 0] == 3
    assert np.array_equal(state[1, 1:], np.arange(147) % 11)
    assert _state_vector(pa.chunked_array([rows.slice(0, 0)]), "test").shape == (0, 148)


# ---------------------------------------------------------------- text encoders


def shard_and_train(dataset: str, tmp_path, name: str, condition: str, encoder: str) -> str:
    shard_dir, run = str(tmp_path / f"{name}-shards"), str(tmp_path / f"{name}-run")
    argv = ["shard", dataset, shard_dir, "--condition", condition, "--window", "4"]
    assert cli_main([*argv, "--exclude", EXCLUDE]) == 0
    assert cli_main(
        ["train", shard_dir, run, "--condition", condition, "--text-encoder", encoder,
         "--steps", "12", "--model", "mlp", "--d-model", "16", "--hidden", "16", "--seed", "1"]
    ) == 0  # fmt: skip
    return run


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_token_encoder_maps_unseen_words_to_unknown_and_ask_says_so(dataset, tmp_path, capsys):
    run = shard_and_train(dataset, tmp_path, "tokens", "instruction", "tokens")
    _, config = train.load_policy(run)
    spec = config.model["conditions"]["instruction"]
    assert spec["encoder"] == "tokens"
    tokens = text.encode_request(spec, "Walk to the crimson KEY!", 3)
    vocabulary = spec["vocabulary"]
    expected = [1, vocabulary.index("to"), vocabulary.index("the"), 1, vocabulary.index("key")]
    assert spec["max_tokens"] == 5 and tokens.tolist() == [expected] * 3

    # In training, words are replaced by <unk> at the documented rate (so <unk> is learned).
    encoder = encoders.TextEncoder(spec, 8).train()
    torch.manual_seed(0)
    many = torch.full((4000, 4), 5, dtype=torch.long)
    seen = []
    encoder.embedding.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    encoder(many, 1)
    assert abs(float((seen[0] == 1).float().mean()) - encoders.TextEncoder.UNKNOWN_RATE) < 0.02
    encoder.eval()(many, 1)
    assert not (seen[1] == 1).any()  # never at ask time

    capsys.readouterr()
    assert cli_main(["ask", run, "--request", "instruction=walk up to the crimson key", "--episodes", "1"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "3 word(s) of the request were never in training (walk, up, crimson)" in err


def test_pretrained_embedder_end_to_end_with_a_synonym_request(dataset, tmp_path, capsys):
    run = shard_and_train(dataset, tmp_path, "wordllama", "instruction", "wordllama")
    policy, config = train.load_policy(run)
    spec = config.model["conditions"]["instruction"]
    embedder = text.load_embedder("wordllama")
    assert spec["embedder"] == {"name": "wordllama", "version": embedder.version, "dimensions": 256}
    # The table saved with the weights is the embedder's own batch call on the index's texts.
    table = policy.condition.encoders["instruction"]
    assert table.texts == spec["texts"] and not set(HELD_OUT) & set(table.texts)
    assert np.allclose(table.vectors.numpy(), embedder.embed(table.texts), atol=1e-6)
    # A training window's tokens find their own text's vector.
    tokens = torch.from_numpy(encode_text(table.texts, spec["vocabulary"], spec["max_tokens"]))
    looked_up = table.vectors[table.rows[torch.searchsorted(table.hashes, encoders.token_hashes(tokens))]]  # fmt: skip
    assert torch.allclose(looked_up, table.vectors)

    # Asked in words it never saw: the request's vector is the embedder's, near its meaning.
    request = text.encode_request(spec, "walk up to the crimson key", 2)
    assert request.shape == (2, 256) and request.dtype == torch.float32
    vectors = dict(zip(table.texts, embedder.embed(table.texts)))
    asked = request[0].numpy()
    assert cosine(asked, vectors["go to the red ball"]) > cosine(asked, vectors["go to the blue ball"])  # fmt: skip
    assert cosine(asked, vectors["go to the blue key"]) > cosine(asked, vectors["go to the blue ball"])  # fmt: skip
    capsys.readouterr()
    result = ask.ask(run, None, {"instruction": "walk up to the crimson key"}, episodes=2)
    assert result["episodes"] == 2 and "warnings" not in result
    assert "never in training" not in capsys.readouterr().err  # no <unk> with an embedder

    # A held-out request (or one containing it) is a one-line warning, not a crash.
    code = cli_main(["ask", run, "--request", "instruction=Please go to the red key now", "--episodes", "1"])  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    assert "ask: warning: instruction='Please go to the red key now' asks for 'go to the red key', which was held out of training" in err  # fmt: skip


def test_an_embedder_that_is_not_available_names_the_offline_option(monkeypatch, dataset, tmp_path, capsys):  # fmt: skip
    monkeypatch.setitem(sys.modules, "wordllama", None)  # as if not installed
    text.load_embedder.cache_clear()
    try:
        with pytest.raises(text.EmbedderUnavailable, match="--text-encoder tokens works offline"):
            text.load_embedder("wordllama")
        shard_dir = str(tmp_path / "shards")
        assert cli_main(["shard", dataset, shard_dir, "--condition", "instruction"]) == 0
        run = str(tmp_path / "run")
        code = cli_main(["train", shard_dir, run, "--condition", "instruction", "--text-encoder", "wordllama", "--steps", "2"])  # fmt: skip
        assert code == 2
        err = capsys.readouterr().err
        assert "needs the wordllama package" in err and "--text-encoder tokens works offline" in err
        assert err.count("\n") == 1 and not (tmp_path / "run").exists()
    finally:
        monkeypatch.delitem(sys.modules, "wordllama")
        text.load_embedder.cache_clear()


def test_endpoint_embeddings_through_the_loopback_server(dataset, tmp_path, server, monkeypatch, capsys):  # fmt: skip
    monkeypatch.setenv("OPENAI_API_KEY", "test-key-0123456789")
    monkeypatch.setenv("HOME", str(tmp_path))  # the answer cache of `ask` lands here
    embedded = str(tmp_path / "embedded")
    spec = f"embed:column=instruction,level=episodes,model=tiny-embed,cache={tmp_path / 'cache'}"
    assert (
        cli_main(["relabel", dataset, embedded, "--with", spec, "--llm-base-url", server.url]) == 0
    )
    run = shard_and_train(embedded, tmp_path, "endpoint", "instruction_embedding", "embeddings")
    _, config = train.load_policy(run)
    spec = config.model["conditions"]["instruction_embedding"]
    assert spec["type"] == "text" and spec["encoder"] == "embeddings"
    assert spec["embedding"]["model"] == "tiny-embed" and spec["embedding"]["endpoint"] == server.url.rstrip("/")  # fmt: skip
    assert "test-key" not in json.dumps(config.to_record())

    before = server.count("/v1/embeddings")
    capsys.readouterr()
    request = "walk up to the crimson key"
    result = ask.ask(run, None, {"instruction_embedding": request}, episodes=1)
    assert result["episodes"] == 1
    assert server.count("/v1/embeddings") == before + 1
    assert server.served[-1]["body"]["input"] == [request]
    assert server.served[-1]["body"]["model"] == "tiny-embed"
    vector = text.encode_request(spec, request, 1)[0].numpy()  # cached now: no request
    assert np.allclose(vector, server.embedding(request), atol=1e-6)
    # Held out by the predicate on the text column the vectors were embedded from.
    ask.ask(run, None, {"instruction_embedding": "go to the green ball"}, episodes=1)
    assert "held out of training" in capsys.readouterr().err

    server.stop()  # the endpoint is gone: one line naming what works offline
    code = cli_main(["ask", run, "--request", "instruction_embedding=go to the purple box"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--text-encoder wordllama" in err and "test-key" not in err
    with pytest.raises(ValueError, match="relabel with --with embed:column=instruction"):
        train.new_run_config(
            json.loads(open(str(tmp_path / "endpoint-shards") + "/index.json").read())
            | {"conditions": {"instruction": {"type": "text", "level": "steps", "vocabulary": []}}},
            TrainOptions(input="x", output="y", condition=["instruction"], text_encoder="embeddings"),
        )  # fmt: skip


def test_wordllama_loads_with_no_network_and_no_hub(tmp_path):
    """The model comes from the installed wheel: with the hub offline and every proxy
    pointing at a closed port, loading and embedding still work (a new process)."""
    import os
    import subprocess

    env = dict(os.environ, HF_HUB_OFFLINE="1", HOME=str(tmp_path), HF_HOME=str(tmp_path / "hf"))
    env |= {name: "http://127.0.0.1:9" for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")}
    code = (
        "from trainers.text import load_embedder; e = load_embedder('wordllama'); "
        "v = e.embed(['crimson', 'red', 'blue']); "
        "print(round(float(v[0] @ v[1]), 2), round(float(v[0] @ v[2]), 2), e.version)"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    red, blue, version = done.stdout.split(maxsplit=2)
    assert float(red) > float(blue) + 0.15 and version.startswith("0.4")
    assert not (tmp_path / "hf").exists() and not (tmp_path / ".cache").exists()


def test_pretrained_encoder_finds_every_paraphrase_of_a_list_column(tmp_path):
    """A list of paraphrases: the loader draws one per window; each finds its own vector."""
    from tests.test_shards import conditioned_dataset

    uri = conditioned_dataset(str(tmp_path / "ds"), num_episodes=12)
    settings = shards.ShardSettings(condition=("descriptions",), window=2)
    index = shards.write_shards(
        open_dataset(uri), settings, str(tmp_path / "shards"), executor=InProcess(), command="t"
    )
    info = index.conditions["descriptions"].model_dump()
    assert info["paraphrases"] == 3 and "a run" in info["texts"]
    specs = text.with_text_encoder({"descriptions": info}, "wordllama")
    encoder = encoders.PretrainedTextEncoder(specs["descriptions"], 8)
    encoder.embed_texts()
    embedder = text.load_embedder("wordllama")
    from trainers.loader import stream

    batch = next(iter(stream(str(tmp_path / "shards"), 64, "descriptions", seed=3)))
    words = [
        " ".join(info["vocabulary"][i] for i in row if i) for row in batch["descriptions"].tolist()
    ]
    assert len(set(words)) > 3  # several paraphrases drawn
    found = encoder.vectors[encoder.rows[torch.searchsorted(encoder.hashes, encoders.token_hashes(batch["descriptions"]))]]  # fmt: skip
    assert np.allclose(found.numpy(), embedder.embed(words), atol=1e-5)


def test_a_wordllama_run_resumes_without_repeating_its_text_encoder(dataset, tmp_path):
    run = shard_and_train(dataset, tmp_path, "resume", "instruction", "wordllama")
    shard_dir = str(tmp_path / "resume-shards")
    resume = ["train", shard_dir, run, "--resume", "--condition", "instruction", "--model", "mlp",
              "--d-model", "16", "--hidden", "16"]  # fmt: skip
    assert cli_main([*resume, "--steps", "14"]) == 0
    policy, config = train.load_policy(run)
    assert config.options.text_encoder == "wordllama" and config.options.steps == 14
    table = policy.condition.encoders["instruction"]
    assert np.allclose(table.vectors.numpy(), text.load_embedder("wordllama").embed(table.texts), atol=1e-6)  # fmt: skip
    assert cli_main([*resume, "--text-encoder", "tokens", "--steps", "16"]) == 2


@pytest.mark.ray
def test_exclusion_on_ray_gives_the_same_shards_as_in_process(dataset, tmp_path, ray_local):
    from jobs.runtime import RayExecutor

    settings = shards.ShardSettings(
        condition=("instruction",), window=4, shard_steps=100, block_steps=32, exclude=EXCLUDE
    )
    here = shards.write_shards(
        open_dataset(dataset), settings, str(tmp_path / "here"), executor=InProcess(), command="t"
    )
    there = shards.write_shards(
        open_dataset(dataset), settings, str(tmp_path / "ray"), executor=RayExecutor(), command="t"
    )
    assert len(here.shards) > 1
    assert [s.sha256 for s in here.shards] == [s.sha256 for s in there.shards]
    assert here.exclusions == there.exclusions and here.conditions == there.conditions


def test_a_label_column_with_missing_values_names_the_part_and_the_text_option(tmp_path, capsys):
    """A string column that is not a known text column is a label: missing labels stop the
    shard job naming the part and `--text`, which reads it as text and leaves out the steps
    with none (counted like the other steps with no text)."""
    uri = instruction_dataset(str(tmp_path / "labels"), column="mission")
    shards_dir = str(tmp_path / "shards")
    arguments = ["shard", uri, shards_dir, "--condition", "mission", "--window", "2"]
    assert cli_main(arguments) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert re.search(rf"{re.escape(uri)} part \d+: condition column 'mission' has \d+ null", error)
    assert "give --text mission to read it as text" in error
    assert cli_main([*arguments, "--text", "mission"]) == 0
    index = ShardIndex.model_validate_json(open(f"{shards_dir}/index.json").read())
    nulls = index.exclusions.null_steps["mission"]
    assert nulls > 0 and index.steps + nulls == sum(
        p.steps for p in open_dataset(uri).manifest.parts
    )
