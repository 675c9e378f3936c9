"""Job specs are validated completely, with clear errors, before anything runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import Field
from pydantic_settings import CliPositionalArg

from jobs import commands
from jobs import spec as specs
from jobs.command import Command, Dataset, NewDataset
from jobs.spec import SpecError, read_spec

EXAMPLES = Path(__file__).resolve().parent.parent / "jobs" / "examples"


class Duplicate(Command):
    """A stand-in command with the shape of every pipeline command, so the spec machinery
    is tested on its own."""

    name = "duplicate"
    job = True
    input: CliPositionalArg[Dataset] = Field(description="The dataset version to read.")
    output: CliPositionalArg[NewDataset] = Field(description="Where the new version is written.")
    part_steps: int = Field(1000, description="Steps per part.")

    def run(self) -> dict:
        return {"dataset_id": "copied", "output": self.output}


@pytest.fixture
def duplicate_kind(monkeypatch):
    monkeypatch.setitem(commands.COMMANDS, "duplicate", "tests.test_spec:Duplicate")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_valid_spec_loads_options(duplicate_kind, tiny_dataset, tmp_path):
    path = write(tmp_path, f"kind: duplicate\ninput: {tiny_dataset}\noutput: {tmp_path / 'out'}\n")
    spec = read_spec(path)
    assert spec.kind == "duplicate"
    assert isinstance(spec.command, Duplicate)
    assert spec.command.part_steps == 1000
    assert spec.command.run() == {"dataset_id": "copied", "output": str(tmp_path / "out")}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kind: duplicate\ninput: x\noutput: y\ngamma: 0.9\n", "unknown field 'gamma'"),
        ("kind: duplicate\ninput: x\noutput: y\npart_steps: many\n", "field 'part_steps'"),
        ("kind: duplicate\noutput: y\n", "missing required field 'input': The dataset version"),
        ("input: x\n", "missing `kind:`"),
        ("kind: teleport\n", "unknown kind 'teleport'"),
        ("kind: info\n", "'info' is a command, not a job"),
        ("kind: duplicate\ninput: [x\n", "not valid YAML"),
        ("- kind: duplicate\n", "a job spec is a YAML mapping"),
    ],
)
def test_bad_specs_fail_with_a_clear_message(duplicate_kind, tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(SpecError, match=expected) as error:
        read_spec(path, check_inputs=False)
    assert str(path) in str(error.value)


def test_missing_input_dataset_fails_before_running(duplicate_kind, tmp_path):
    missing = tmp_path / "no-such-dataset"
    path = write(tmp_path, f"kind: duplicate\ninput: {missing}\noutput: {tmp_path / 'out'}\n")
    with pytest.raises(SpecError, match="input .*does not exist; expected a committed dataset"):
        read_spec(path)
    assert not (tmp_path / "out").exists()


def test_committed_output_is_refused(duplicate_kind, tiny_dataset, tmp_path):
    path = write(tmp_path, f"kind: duplicate\ninput: {tiny_dataset}\noutput: {tiny_dataset}\n")
    with pytest.raises(SpecError, match="already committed.*immutable"):
        read_spec(path)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="no such job spec file"):
        read_spec(tmp_path / "nope.yaml")


def test_spec_round_trips_through_yaml(duplicate_kind, tiny_dataset, tmp_path):
    path = write(tmp_path, f"kind: duplicate\ninput: {tiny_dataset}\noutput: {tmp_path / 'out'}\n")
    spec = read_spec(path)
    again = specs.load_spec_text(spec.to_yaml(), source="again")
    assert again.kind == spec.kind and again.command == spec.command


def test_run_command_prints_the_result_line(
    duplicate_kind, tiny_dataset, tmp_path, capsys, ray_local
):
    from jobs.cli import main

    path = write(tmp_path, f"kind: duplicate\ninput: {tiny_dataset}\noutput: {tmp_path / 'out'}\n")
    assert main(["run", str(path)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("hindsight-result: ")
    assert '"dataset_id": "copied"' in line


def test_run_command_reports_a_bad_spec_as_a_user_error(duplicate_kind, tmp_path, capsys):
    from jobs.cli import main

    path = write(tmp_path, "kind: duplicate\ninput: x\noutput: y\ncolour: red\n")
    assert main(["run", str(path)]) == 2
    assert "unknown field 'colour'" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_specs_are_valid(path):
    assert read_spec(path, check_inputs=False).kind == path.stem


def test_compose_file_is_valid(tmp_path):
    """`docker-compose config` (Debian's docker-compose, or the compose plugin) accepts the
    file with the example env file, and refuses it when the secrets are missing."""
    import shutil
    import subprocess

    root = EXAMPLES.parent.parent
    if shutil.which("docker-compose"):
        compose = ["docker-compose"]
    elif shutil.which("docker") and (
        subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        compose = ["docker", "compose"]
    else:
        pytest.skip("no docker-compose client on this machine")
    args = [*compose, "-f", str(root / "docker-compose.yml")]
    valid = subprocess.run(
        [*args, "--env-file", str(root / ".env.example"), "--profile", "llm", "config", "-q"],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert valid.returncode == 0, valid.stderr
    empty = tmp_path / "empty.env"
    empty.write_text("")
    missing = subprocess.run(
        [*args, "--env-file", str(empty), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    assert missing.returncode != 0
    assert "RAY_AUTH_TOKEN" in missing.stderr or "MINIO_ROOT" in missing.stderr
