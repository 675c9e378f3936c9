"""The demo end to end at the reduced size CI runs: collect, relabel, shard, train, ask."""

from __future__ import annotations

import json

import pytest

from jobs.cli import main as cli_main


@pytest.mark.slow
def test_demo_small_runs_end_to_end(tmp_path, ray_local, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--small", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    for line in (
        "dataset mean return",
        "behaviour cloning",
        "ask return_to_go=",
        'ask skill="expert"',
    ):
        assert line in printed
    summary = json.loads((out / "demo.json").read_text())
    assert [row["what"][:10] for row in summary["rows"]][:2] == ["dataset me", "behaviour "]
    for key in ("return_to_go_report", "skill_report"):
        report = json.loads(open(summary["paths"][key]).read())
        assert report["results"] and all(r["episodes"] > 0 for r in report["results"])
    assert open(summary["paths"]["return_to_go_plot"], "rb").read(4) == b"\x89PNG"
    # Pendulum returns live in [-16.3 * 200, 0]; the table reports real rollouts.
    assert all(-3300 <= row["return_mean"] <= 0 for row in summary["rows"])

    # Re-running replaces the demo's own output; a foreign directory is refused.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    assert cli_main(["demo", "--small", "--output", str(tmp_path / "other")]) == 2
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
