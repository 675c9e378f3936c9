"""Paraphrases (`language:source=instruction,paraphrases=N`): the offline rewriter, the
mapping onto rows, the loopback LLM server (cached), and the whole job with `instructions`."""

from __future__ import annotations

import json
import re
import types

import numpy as np
import pyarrow as pa
import pytest

from engine.dataset import open_dataset
from engine.executor import InProcess
from jobs import relabeling
from relabelers import endpoint, llm
from relabelers.base import RelabelError, relabel_tables
from relabelers.instructions import COLOR_NAMES, InstructionsRelabeler
from relabelers.language import LanguageRelabeler
from relabelers.language.paraphrase import (
    KEPT_WORDS,
    offline_paraphrases,
    paraphrases_parser,
)
from tests.synthetic import write_synthetic_dataset
from tests.test_instructions import random_episodes, tables

INSTRUCTIONS = [
    f"{verb} the {color} {obj}"
    for verb in ("go to", "pick up")
    for color in COLOR_NAMES
    for obj in ("key", "ball", "box")
]


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def with_instructions(count: int = 40, seed: int = 1) -> tuple[pa.Table, pa.Table]:
    """MiniGrid-view tables with the `instructions` columns attached."""
    steps, episodes = tables(random_episodes(count, seed))
    output = relabel_tables(InstructionsRelabeler({}), steps, episodes)
    for name in output.steps.column_names:
        steps = steps.append_column(name, output.steps.column(name))
    for name in output.episodes.column_names:
        episodes = episodes.append_column(name, output.episodes.column(name))
    return steps, episodes


# ---------------------------------------------------------------- offline rewriter
def test_offline_rewrites_are_deterministic_distinct_and_keep_colours_and_objects():
    for text in INSTRUCTIONS:
        rewrites = offline_paraphrases(text, 5)
        assert rewrites == offline_paraphrases(text, 5)  # seeded by the text
        assert len(set(rewrites)) == 5 and text not in rewrites
        for rewrite in rewrites:
            # Colours and objects as they are: the same ones, and no other colour word.
            assert words(rewrite) & KEPT_WORDS == words(text) & KEPT_WORDS, rewrite
    # The wording does vary across texts and seeds.
    firsts = {offline_paraphrases(text, 1)[0].split(" the ")[0] for text in INSTRUCTIONS}
    assert len(firsts) > 3
    assert offline_paraphrases("go to the red key", 4, seed=1) != offline_paraphrases(
        "go to the red key", 4, seed=2
    )
    # Any other text still gets n rewrites that contain it.
    other = offline_paraphrases("describe the run", 3)
    assert len(other) == 3 and all("describe the run" in r for r in other)


def test_paraphrase_columns_map_every_row_to_its_texts_rewrites(no_endpoint):
    steps, episodes = with_instructions()
    relabeler = LanguageRelabeler({"source": "instruction", "paraphrases": 2})
    output = relabel_tables(relabeler, steps, episodes, parts=3)
    for level, table in (("episodes", episodes), ("steps", steps)):
        got = getattr(output, level).column("instruction_paraphrases").to_pylist()
        for text, lists in zip(table.column("instruction").to_pylist(), got):
            assert lists == (None if text is None else [text, *offline_paraphrases(text, 2)])
    assert output.report["paraphraser"] == "offline"
    assert output.report["distinct_texts"] == len(
        set(episodes.column("instruction").drop_null().to_pylist())
    )
    assert output.steps.equals(relabel_tables(relabeler, steps, episodes).steps)


def test_paraphrase_mode_parameters():
    assert LanguageRelabeler({"paraphrases": 3}).params.source == "instruction"
    assert LanguageRelabeler({"source": "instruction"}).params.paraphrases == 3
    only_episodes = LanguageRelabeler({"source": "task", "at": "episodes"})
    assert only_episodes.writes().episodes == ("task_paraphrases",)
    assert only_episodes.writes().steps == ()
    # Descriptions unchanged without them.
    assert LanguageRelabeler({}).writes().episodes[0] == "description"
    with pytest.raises(RelabelError, match="per=segment"):
        LanguageRelabeler({"source": "instruction", "per": "segment"})


def test_a_missing_or_non_text_source_is_one_line(no_endpoint):
    steps, episodes = tables(random_episodes(3, 0))
    with pytest.raises(
        RelabelError, match="source='instruction' is not a column of the episodes table"
    ):
        relabel_tables(LanguageRelabeler({"paraphrases": 2}), steps, episodes)
    with pytest.raises(RelabelError, match="source='length' is int64 at episodes, not text"):
        relabel_tables(LanguageRelabeler({"source": "length", "at": "episodes"}), steps, episodes)


# ---------------------------------------------------------------- through an endpoint
def test_llm_paraphrases_one_request_per_distinct_text_then_cached(server, tmp_path, monkeypatch):
    monkeypatch.setenv(endpoint.API_KEY_VARIABLE, "sk-test-paraphrases-0123")
    steps, episodes = with_instructions()
    distinct = set(episodes.column("instruction").drop_null().to_pylist())
    params = {"paraphrases": 3, "base_url": server.url, "cache": str(tmp_path / "cache")}
    output = relabel_tables(LanguageRelabeler(params), steps, episodes, parts=3)
    assert server.count() == len(distinct)
    asked = sorted(
        re.search(r'"text": "([^"]*)"', r["body"]["messages"][-1]["content"]).group(1)
        for r in server.requests
    )
    assert asked == sorted(distinct)
    for text, lists in zip(
        episodes.column("instruction").to_pylist(),
        output.episodes.column("instruction_paraphrases").to_pylist(),
    ):
        assert lists == (
            None if text is None else [text] + [f"{text} (rewrite {i})" for i in range(3)]
        )
    assert output.report["paraphraser"] == "llm" and output.report["prompt"] == "paraphrase_v1"
    assert output.report["texts_by_status"]["ok"] == len(distinct)
    again = relabel_tables(LanguageRelabeler(params), steps, episodes)
    assert server.count() == len(distinct)  # every answer from the cache
    assert again.report["cached"] == len(distinct) and again.report["requests"] == 0
    assert again.episodes.equals(output.episodes)


def test_llm_answers_that_change_a_colour_or_object_are_invalid():
    def answer(*rewrites):
        message = types.SimpleNamespace(content=json.dumps({"paraphrases": list(rewrites)}))
        return types.SimpleNamespace(choices=[types.SimpleNamespace(message=message)])

    parse = paraphrases_parser("go to the red key", 2)
    assert parse(answer("walk up to the red key", "the red key: head to it")) == [
        "walk up to the red key",
        "the red key: head to it",
    ]
    for bad in (
        ("walk up to the crimson key", "head to the red key"),  # red dropped
        ("walk to the red ball", "head to the red key"),  # another object
        ("go to the red key", "head to the red key"),  # the text itself
    ):
        with pytest.raises(llm.InvalidAnswer):
            parse(answer(*bad))


def test_all_requests_failing_is_one_line(server, tmp_path, monkeypatch):
    monkeypatch.setenv(endpoint.API_KEY_VARIABLE, "sk-test-paraphrases-0123")
    server.fail_when = lambda body: True
    steps, episodes = with_instructions(8)
    params = {
        "paraphrases": 2,
        "base_url": server.url,
        "cache": str(tmp_path / "c"),
        "max_retries": 0,
    }
    with pytest.raises(RelabelError, match="no paraphrase of .* texts was written"):
        relabel_tables(LanguageRelabeler(params), steps, episodes)


def test_a_request_budget_leaves_the_rest_unparaphrased_and_says_so(server, tmp_path, monkeypatch):
    monkeypatch.setenv(endpoint.API_KEY_VARIABLE, "sk-test-paraphrases-0123")
    steps, episodes = with_instructions()
    params = {"paraphrases": 2, "base_url": server.url, "cache": str(tmp_path / "c")}
    output = relabel_tables(LanguageRelabeler({**params, "max_requests": 2}), steps, episodes)
    assert server.count() == 2
    lists = [x for x in output.episodes.column("instruction_paraphrases").to_pylist() if x]
    assert {len(x) for x in lists} == {1, 3}  # the text alone, or with its 2 rewrites
    assert "re-run" in output.report["incomplete"]
    assert output.report["texts_by_status"]["ok"] == 2
    rerun = relabel_tables(LanguageRelabeler(params), steps, episodes)  # continues
    assert rerun.report["cached"] == 2 and "incomplete" not in rerun.report
    assert {len(x) for x in rerun.episodes.column(0).to_pylist() if x} == {3}


# ---------------------------------------------------------------- the job, as a user runs it
def test_instructions_then_paraphrases_in_one_job(tmp_path, no_endpoint):
    steps, episodes = tables(random_episodes(50, 3), ["go to the red key"] * 50)
    write_synthetic_dataset(str(tmp_path / "babyai"), steps, episodes, part_steps=90)
    relabelers = [InstructionsRelabeler({}), LanguageRelabeler({"paraphrases": 3})]
    relabeling.relabel(
        str(tmp_path / "babyai"),
        str(tmp_path / "babyai-rl"),
        relabelers,
        executor=InProcess(),
        command="test",
    )
    data = open_dataset(str(tmp_path / "babyai-rl"))
    assert data.num_parts > 1
    got = data.read("episodes", ["instruction", "instruction_step", "instruction_paraphrases"])
    direct = relabel_tables(InstructionsRelabeler({}), steps, episodes).episodes
    assert got.select(["instruction", "instruction_step"]).equals(direct)
    for text, lists in zip(got.column("instruction").to_pylist(), got.column(2).to_pylist()):
        assert lists == (None if text is None else [text, *offline_paraphrases(text, 3)])
    step_lists = data.read("steps", ["instruction", "instruction_paraphrases"])
    nulls = np.asarray(step_lists.column("instruction").is_null())
    assert (np.asarray(step_lists.column(1).is_null()) == nulls).all() and nulls.any()
