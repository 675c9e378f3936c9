"""The command line as a whole: every command documents itself."""

from __future__ import annotations

import pytest

from jobs.cli import build_parser, main


def command_names() -> list[str]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    return sorted(subparsers.choices)


@pytest.mark.parametrize("command", command_names())
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: hindsight" in capsys.readouterr().out


def test_pipeline_commands_are_all_there():
    expected = {"collect", "ingest", "info", "materialize", "relabel", "relabelers", "query"}
    expected |= {"shard", "train", "ask", "demo", "run", "submit", "jobs"}
    assert expected <= set(command_names())
