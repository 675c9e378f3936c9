"""Every failure a user can cause is one line that says what to do, exits non-zero and
leaves nothing behind (issue 17, class 5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import main
from tests.synthetic import make_episodes, write_synthetic_dataset

ROOT = Path(__file__).resolve().parent.parent


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_an_output_inside_the_input_is_refused_before_any_work(tiny_dataset, capsys):
    inside = os.path.join(tiny_dataset, "child")
    assert main(["relabel", tiny_dataset, inside, "--with", "returns"]) == 2
    assert "is inside input" in one_error_line(capsys)
    assert not os.path.exists(inside)


def test_a_relabeler_parameter_given_twice_is_refused(tiny_dataset, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["relabel", tiny_dataset, out, "--with", "returns:gamma=1,gamma=0.5"]) == 2
    assert "'gamma' is given twice" in one_error_line(capsys)
    assert not os.path.exists(out)


def test_an_option_given_twice_is_refused(tiny_dataset, tmp_path, capsys):
    out = str(tmp_path / "out")
    args = ["relabel", tiny_dataset, out, "--with", "returns", "--seed", "1", "--seed", "2"]
    assert main(args) == 2
    assert "--seed is given twice" in one_error_line(capsys)
    assert not os.path.exists(out)


@pytest.mark.parametrize(
    "command",
    [
        ["materialize", "{source}", "{out}"],
        ["query", "{source}", "--output", "{out}"],
        ["shard", "{source}", "{out}", "--shard-steps", "2000"],
    ],
    ids=["materialize", "query --output", "shard"],
)
def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, command):
    """A real full disk: a 1 MiB tmpfs (needs the right to mount; CI machines here run as
    root in their sandbox)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        steps, episodes = make_episodes(num_episodes=400, obs_dim=64, seed=1, max_length=60)
        source = str(tmp_path / "source")
        write_synthetic_dataset(source, steps, episodes, part_steps=2000)
        out = disk / "out"
        args = [word.format(source=source, out=out) for word in command]
        # A subprocess, as a user runs it.
        result = subprocess.run(
            [sys.executable, "-m", "jobs.cli", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
        )
        assert result.returncode == 2, result.stderr
        errors = [line for line in result.stderr.splitlines() if ": error: " in line]
        assert len(errors) == 1 and "No space left on device" in errors[0], result.stderr
        assert str(disk) in errors[0] and "Traceback" not in result.stderr
        assert not out.exists()
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_list_options_may_repeat():
    from jobs.cli import parse

    assert parse(["query", "data/x", "--select", "a", "--select", "b,c"]).select == ["a", "b", "c"]
