"""Job specs: one YAML format for every command.

A spec names the command with `kind` and holds that command's options by field name; it is
validated by the same model as the command line, so a spec and a command line do exactly
the same work:

    kind: relabel
    input: s3://hindsight/pendulum
    output: s3://hindsight/pendulum-rl
    relabelers: [returns:gamma=0.99, skill:levels=4]

`read_spec` validates a spec completely before anything runs or is submitted: YAML syntax
(with the line), unknown or missing fields (with the known ones), wrong types, and the
command's own checks of inputs and outputs (a missing input dataset, an output that is
already committed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from jobs.command import Command, UserError, describe_validation_error
from jobs.commands import COMMANDS, command_class


def spec_kinds() -> list[str]:
    """The commands that can run as a job spec (`Command.job`)."""
    return [name for name in COMMANDS if getattr(command_class(name), "job", False)]


class SpecError(UserError, ValueError):
    """A job spec that cannot run, with the file, the field and what was expected."""


@dataclass(frozen=True)
class Spec:
    """A validated spec: the command (its options) and where it came from."""

    command: Command
    source: str

    @property
    def kind(self) -> str:
        return self.command.name

    def to_yaml(self) -> str:
        """The spec as YAML, every option explicit (defaults filled in)."""
        return yaml.safe_dump(self.command.to_spec(), sort_keys=False)


def parse_spec_text(text: str, source: str) -> tuple[str, dict[str, Any]]:
    """YAML text -> (kind, fields), with errors that name the file and line."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise SpecError(f"{source}:{where}: not valid YAML: {problem}") from error
    if not isinstance(data, dict):
        raise SpecError(
            f"{source}: a job spec is a YAML mapping with `kind:` and the command's options, "
            f"got {type(data).__name__}"
        )
    fields = dict(data)
    kind = fields.pop("kind", None)
    if kind is None:
        raise SpecError(f"{source}: missing `kind:` (one of {', '.join(spec_kinds())})")
    if kind not in spec_kinds():
        known = f"; {kind!r} is a command, not a job" if kind in COMMANDS else ""
        raise SpecError(
            f"{source}: unknown kind {kind!r}; expected one of {', '.join(spec_kinds())}{known}"
        )
    return kind, fields


def load_spec_text(text: str, source: str = "<spec>", check_inputs: bool = True) -> Spec:
    """Validate spec text completely; `check_inputs=False` skips the storage look-ups (for a
    client that cannot see the cluster's storage)."""
    kind, fields = parse_spec_text(text, source)
    model = command_class(kind)
    try:
        command = model.model_validate(fields)
    except ValidationError as error:
        raise SpecError(
            f"{source}: invalid {kind} spec: {describe_validation_error(error, model)}"
        ) from None
    if check_inputs:
        try:
            command.check()
        except (UserError, ValueError, KeyError) as error:
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            raise SpecError(f"{source}: invalid {kind} spec: {message}") from None
    return Spec(command=command, source=source)


def read_spec(path: str | Path, check_inputs: bool = True) -> Spec:
    """A spec file, or `env:NAME` for spec text in an environment variable (how a submitted
    job receives its spec on the cluster)."""
    text = str(path)
    if text.startswith("env:"):
        name = text[len("env:") :]
        value = os.environ.get(name)
        if value is None:
            raise SpecError(f"environment variable {name} holds no job spec")
        return load_spec_text(value, source=f"${name}", check_inputs=check_inputs)
    if not Path(text).is_file():
        raise SpecError(f"{text}: no such job spec file")
    return load_spec_text(Path(text).read_text(), source=text, check_inputs=check_inputs)
