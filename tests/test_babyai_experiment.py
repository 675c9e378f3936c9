"""The BabyAI experiment's script end to end at toy sizes (examples/babyai_experiment.py):
every command runs, every arm is asked, the report holds every arm and goal. The numbers
at these sizes mean nothing; docs/trainer.md has the real run."""

from __future__ import annotations

import json

from examples import babyai_experiment


def test_the_experiment_runs_end_to_end_at_toy_size(tmp_path, capsys):
    out = tmp_path / "report.json"
    args = ["--out", str(out), "--work", str(tmp_path / "work"), "--seeds", "0",
            "--episodes", "60", "--steps", "3", "--eval-episodes", "1", "--quiet"]  # fmt: skip
    report = babyai_experiment.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    arms = report["arms"]
    assert set(arms) == {"a", "b", "c", "d", "e", "a_greedy", "random"}
    trained, held = len(babyai_experiment.TRAINED), len(babyai_experiment.HELD_OUT)
    assert arms["a"]["episodes"] == trained and arms["b"]["episodes"] == held
    assert arms["c"]["episodes"] == len(babyai_experiment.PARAPHRASES)
    assert arms["e"]["episodes"] == trained
    for row in arms.values():
        assert 0.0 <= row["ci95"][0] <= row["rate"] <= row["ci95"][1] <= 1.0
    assert report["data"]["episodes"] == 60
    assert 0.0 <= report["data"]["mission_is_what_happened"] <= 1.0
    assert set(report["goals"]) == {
        "a >= 0.8", "a above d and e (intervals apart)", "b >= 0.7 x a", "c >= 0.5 x a",
    }  # fmt: skip
    printed = capsys.readouterr().out
    assert "(c) hindsight, unseen paraphrases" in printed
