"""The command line as a whole: derived from the commands' models, one vocabulary, clear
errors."""

from __future__ import annotations

import pytest

from jobs.cli import main, parse
from jobs.commands import COMMANDS, command_class


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: hindsight" in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_examples_keep_their_line_breaks(command):
    """A `\\` ending an example's line in a docstring must be escaped, else Python joins
    the lines and --help shows one line with a run of spaces inside."""
    import re

    doc = command_class(command).__doc__ or ""
    assert not re.search(r"\S {4,}--", doc), doc


def test_pipeline_commands_are_all_there():
    expected = {"collect", "ingest", "info", "materialize", "relabel", "relabelers", "query"}
    expected |= {"shard", "train", "ask", "demo", "run", "submit", "jobs"}
    assert expected <= set(COMMANDS)


def test_help_comes_from_the_model(capsys):
    with pytest.raises(SystemExit):
        main(["relabel", "--help"])
    text = capsys.readouterr().out
    assert "Seed of every relabeler's randomness. (default: 0)" in text
    assert "--with NAME[:k=v,...]" in text
    assert "INPUT" in text and "OUTPUT" in text  # required positionals, not options


def test_a_mistyped_command_gets_a_suggestion(capsys):
    assert main(["relabl", "x", "y"]) == 2
    assert "did you mean 'relabel'?" in capsys.readouterr().err


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("hindsight ")


def test_an_invalid_option_is_one_line_naming_it(capsys):
    assert main(["collect", "Pendulum-v1", "out", "--episodes", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hindsight collect: error: --episodes: ")
    assert "Traceback" not in err


def test_lists_are_comma_separated_everywhere():
    relabel = parse(
        ["relabel", "a", "b", "--with", "returns:gamma=0.5,reference_random=-1", "--with", "skill"]
    )
    assert [(r.name, r.params) for r in relabel.relabelers] == [
        ("returns", {"gamma": "0.5", "reference_random": "-1"}),
        ("skill", {}),
    ]
    assert parse(["collect", "Pendulum-v1", "out", "--noise", "0,0.5"]).noise == [0.0, 0.5]
    assert parse(["shard", "a", "b", "--condition", "return_to_go,skill"]).condition == [
        "return_to_go",
        "skill",
    ]


def test_the_history_line_is_derived_from_the_options():
    relabel = parse(["relabel", "data/a", "data/b", "--with", "returns:gamma=0.5", "--seed", "3"])
    line = relabel.history_line()
    assert line == "hindsight relabel data/a data/b --with returns:gamma=0.5 --seed 3"
    assert parse(line.split()[1:]).to_spec() == relabel.to_spec()


def test_credentials_never_reach_the_history_line():
    relabel = parse(
        [
            "relabel", "a", "b", "--with", "language",
            "--llm-base-url", "http://user:secret@127.0.0.1:9/v1?api-key=secret",
        ]
    )  # fmt: skip
    assert "secret" not in relabel.history_line()
    assert "http://127.0.0.1:9/v1" in relabel.history_line()


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - {"jobs"}))
def test_input_and_output_have_the_same_names_in_every_command(name):
    fields = command_class(name).model_fields
    paths = [n for n in fields if command_class(name).path_role(n) is not None]
    assert set(paths) <= {"input", "output"}, f"{name}: {paths}"
