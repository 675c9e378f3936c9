"""`hindsight`: the command line, derived from the commands' options models.

Every command in `jobs.commands.COMMANDS` becomes a sub-command; pydantic-settings turns
each model's fields into arguments (positional fields, `--kebab-case` options, lists
comma-separated, help with defaults from the field descriptions). `main` then runs one
command the same way for every command: check inputs and outputs, run (or submit to a
cluster), print the report (or `--json`); an error is one line unless `--debug`.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pydantic import BaseModel, Field, ValidationError, create_model
from pydantic_settings import CliApp, CliSettingsSource, CliSubCommand, SettingsError

from jobs.command import Command, RayCommand, UserError, has_cli_marker
from jobs.commands import COMMANDS, command_class

PROGRAM = "hindsight"
DESCRIPTION = "A data engine for hindsight-relabeled trajectory datasets."


def package_version() -> str:
    try:
        return version("hindsight-engine")
    except PackageNotFoundError:
        return "unknown"


def _summary_line(command: type[BaseModel]) -> str:
    """The first sentence of a command's docstring, for `hindsight --help`."""
    paragraph = inspect.cleandoc(command.__doc__ or "").split("\n\n", 1)[0]
    return " ".join(paragraph.split()).split(". ", 1)[0].rstrip(".")


def root_model(commands: dict[str, type[BaseModel]]) -> type[BaseModel]:
    """A model with one sub-command field per command (what pydantic-settings parses)."""
    fields: dict[str, Any] = {
        name: (CliSubCommand[model], Field(description=_summary_line(model)))
        for name, model in commands.items()
    }
    return create_model(PROGRAM, __doc__=DESCRIPTION, **fields)


def _metavar(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Readable metavars: `A,B,...` for lists rather than pydantic-settings' type names."""
    metavar = kwargs.get("metavar")
    if isinstance(metavar, str) and metavar.startswith("list["):
        kwargs["metavar"] = metavar[len("list[") : -1].upper() + ",..."
        if kwargs["metavar"] == "JSON,...":
            kwargs["metavar"] = "VALUE"
    return kwargs


def _add_argument(parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
    metavars = getattr(parser, "hindsight_metavars", {})
    flags = [a for a in args if isinstance(a, str) and a.startswith("--")]
    for flag in flags:
        if flag in metavars:
            kwargs["metavar"] = metavars[flag]
            break
    else:
        kwargs = _metavar(kwargs)
    return parser.add_argument(*args, **kwargs)


def _add_parser(subparsers: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A command's parser, which remembers the metavars its model's fields declare."""
    child = argparse._SubParsersAction.add_parser(subparsers, name, **kwargs)
    model = _models_by_prog.get(child.prog)
    child.hindsight_metavars = _declared_metavars(model) if model else {}  # type: ignore[attr-defined]
    return child


_models_by_prog: dict[str, type[BaseModel]] = {}


def _declared_metavars(model: type[BaseModel]) -> dict[str, str]:
    metavars = {}
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if "metavar" in extra:
            metavars["--" + (info.alias or name).replace("_", "-")] = str(extra["metavar"])
    return metavars


def _register_progs(prefix: str, model: type[BaseModel]) -> None:
    """Remember which model each sub-parser's `prog` belongs to (nested commands too)."""
    _models_by_prog[prefix] = model
    # `--help` shows the docstring as written, not indented as in the class body.
    model.__doc__ = inspect.cleandoc(model.__doc__ or "")
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if has_cli_marker(info, "_CliSubCommand"):
                _register_progs(f"{prefix} {name}", annotation)


def parse(argv: list[str]) -> Command:
    """The command a command line asks for, validated (argparse exits on usage errors)."""
    commands = {name: command_class(name) for name in COMMANDS}
    for name, model in commands.items():
        _register_progs(f"{PROGRAM} {name}", model)
    source = CliSettingsSource(
        root_model(commands),
        cli_prog_name=PROGRAM,
        cli_kebab_case=True,
        cli_implicit_flags="toggle",  # --json, not --json/--no-json
        cli_hide_none_type=True,
        cli_avoid_json=True,
        cli_enforce_required=True,
        add_argument_method=_add_argument,
        add_parser_method=_add_parser,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parsed = CliApp.run(root_model(commands), cli_args=argv, cli_settings_source=source)
    return innermost_command(parsed)


def innermost_command(model: BaseModel) -> Command:
    """The chosen sub-command (and its chosen sub-command, for nested ones)."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel) and has_cli_marker(
            type(model).model_fields[name], "_CliSubCommand"
        ):
            return innermost_command(value)
    if not isinstance(model, Command):
        raise UserError(f"choose a sub-command of {type(model).__name__.lower()} (see --help)")
    return model


def describe_validation_error(error: ValidationError) -> str:
    """Options that failed validation, one line each, named as on the command line."""
    lines = []
    for problem in error.errors():
        location = [str(part) for part in problem["loc"] if str(part) not in COMMANDS]
        where = "--" + ".".join(location).replace("_", "-") if location else ""
        message = problem["msg"].removeprefix("Value error, ")
        got = problem.get("input")
        # A value from the command line is shown as typed (-5, not '-5').
        typed = got if isinstance(got, str) and got else repr(got)
        shown = (
            f" (got {typed})"
            if where and not isinstance(got, dict) and "got" not in message
            else ""
        )
        lines.append(f"{where}: {message}{shown}" if where else message)
    return "\n  ".join(lines)


def suggest(argv: list[str]) -> str | None:
    """`did you mean` for a mistyped command."""
    if not argv or argv[0].startswith("-") or argv[0] in COMMANDS:
        return None
    close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{PROGRAM}: unknown command {argv[0]!r}{hint} (commands: {', '.join(COMMANDS)})"


def execute(command: Command) -> Any:
    """Check, then run (or submit) one command; print its report. Returns the result."""
    command.check()
    if isinstance(command, RayCommand) and command.submits():
        from jobs.submit import submit_command

        return submit_command(command)
    started = time.perf_counter()
    result = command.run()
    seconds = time.perf_counter() - started
    if command.json_output:
        print(json.dumps(command.summary(result), indent=2, default=str))
    else:
        text = command.report(result, seconds)
        if text:
            print(text)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["--version"], ["-V"]):
        print(f"{PROGRAM} {package_version()}")
        return 0
    unknown = suggest(argv)
    if unknown:
        print(unknown, file=sys.stderr)
        return 2
    debug = "--debug" in argv
    name = argv[0] if argv else PROGRAM
    try:
        command = parse(argv)
        name = command.name
        result = execute(command)
    except KeyboardInterrupt:
        print(f"{PROGRAM} {name}: interrupted", file=sys.stderr)
        return 130
    except (
        UserError,
        ValueError,
        KeyError,
        FileNotFoundError,
        RuntimeError,
        SettingsError,
    ) as error:
        if debug:
            raise
        if isinstance(error, ValidationError):
            message = describe_validation_error(error)
        elif isinstance(error, KeyError) and error.args:
            message = error.args[0]
        else:
            message = str(error).removeprefix("error parsing CLI: ")
        print(f"{PROGRAM} {name}: error: {message}", file=sys.stderr)
        return 2
    return exit_status(result)


def exit_status(result: Any) -> int:
    """A command may say that it failed without raising (e.g. a followed job that failed)."""
    return int(result) if isinstance(result, int) and not isinstance(result, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
