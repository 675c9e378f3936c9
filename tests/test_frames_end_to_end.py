"""Pixels through the whole pipeline as a user runs it: collect --frames, relabel, shard with
a frame stack, train from the streamed frames, ask from rendered frames."""

from __future__ import annotations

import json

import pytest

from jobs.cli import main


@pytest.mark.slow
def test_collect_shard_train_and_ask_from_pixels(tmp_path, capsys):
    raw, labeled, shards, run = (str(tmp_path / name) for name in ("raw", "rl", "shards", "run"))
    commands = [
        ["collect", "Pendulum-v1", raw, "--episodes", "4", "--max-steps", "30", "--noise", "0,1",
         "--frames", "16x16", "--codec", "jpeg"],
        ["relabel", raw, labeled, "--with", "returns"],
        ["shard", labeled, shards, "--condition", "return_to_go", "--window", "4",
         "--frame-stack", "2"],
        ["train", shards, run, "--condition", "return_to_go", "--model", "transformer",
         "--steps", "4", "--batch-size", "8", "--d-model", "16", "--n-layer", "1"],
    ]  # fmt: skip
    for arguments in commands:
        assert main(arguments) == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    frames = config["model"]["frames"]
    assert sorted(frames["cameras"]) == ["render"] and frames["inputs"] == "state+frames"
    assert config["model"]["frames"]["frame_stack"] == 2
    capsys.readouterr()

    asked = ["ask", run, "--request", "return_to_go=-20", "--episodes", "2", "--json"]
    assert main(asked) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["episodes"] == 2 and result["return_mean"] < 0
