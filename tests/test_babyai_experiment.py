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
    protocol = babyai_experiment.PROTOCOLS["run4"]  # the default: the final run's pairs
    trained, held = len(protocol["trained"]), len(protocol["held_out"])
    assert arms["a"]["episodes"] == trained and arms["b"]["episodes"] == held
    assert arms["c"]["episodes"] == len(protocol["paraphrases"])
    assert report["view_match"] == "factored" and report["protocol"] == "run4"
    assert set(report["per_request"]["b"]) == {f"go to the {p}" for p in protocol["held_out"]}
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


def test_the_protocols_hold_pairs_out_as_documented():
    """Run 4 holds out pairs no earlier run held out; development (`dev`) holds out only
    spent pairs and keeps run 4's in training; every asked trained pair and paraphrase is
    trained in its protocol, and no paraphrase word is in BabyAI's colour names."""
    spent = {
        "red key", "green ball", "blue box", "purple key",  # run 1
        "yellow key", "grey ball", "purple box", "green key",  # run 2
        "grey key", "yellow box", "blue ball", "red box",  # run 3
    }  # fmt: skip
    final = set(babyai_experiment.PROTOCOLS["run4"]["held_out"])
    development = set(babyai_experiment.PROTOCOLS["dev"]["held_out"])
    assert len(final) == 4 and not final & spent
    assert development <= spent and not development & final
    for protocol in babyai_experiment.PROTOCOLS.values():
        held = set(protocol["held_out"])
        assert not set(protocol["trained"]) & held
        assert {pair for _, pair in protocol["paraphrases"]} <= set(protocol["trained"])
        for words, pair in protocol["paraphrases"]:
            assert pair.split()[0] not in words.split() and pair.split()[1] in words.split()
