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
import re
import sys
import time
import typing
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pydantic import BaseModel, Field, ValidationError, create_model
from pydantic_settings import CliApp, CliSettingsSource, CliSubCommand, SettingsError

from jobs.command import (
    Command,
    RayCommand,
    UserError,
    describe_validation_error,
    has_cli_marker,
    printable_lines,
)
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


PLAIN_TYPES = ("int", "float", "str")
_DEFAULT_SUFFIX = re.compile(r" ?\(default(?: factory)?: [^()]*\)$")


def _metavar(flag: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Readable metavars, argparse's way: `--seed SEED`, `--noise NOISE,...`, rather than
    pydantic-settings' type names (`--seed int`, `--noise list[float]`)."""
    metavar = kwargs.get("metavar")
    name = flag.lstrip("-").replace("-", "_").upper()
    if metavar in PLAIN_TYPES:
        kwargs["metavar"] = name
    elif isinstance(metavar, str) and metavar.startswith("list["):
        kwargs["metavar"] = f"{name},..."
    return kwargs


def _help(text: Any) -> Any:
    """Field descriptions that state their default themselves keep only that; a default
    made by a factory is not shown as `(default factory: list)`."""
    if not isinstance(text, str):
        return text
    match = _DEFAULT_SUFFIX.search(text)
    if not match:
        return text
    described = text[: match.start()]
    if "default factory" in match.group(0) or "default" in described.lower():
        return described
    return text


def _add_argument(parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
    metavars = getattr(parser, "hindsight_metavars", {})
    flags = [a for a in args if isinstance(a, str) and a.startswith("--")]
    if "help" in kwargs:
        kwargs["help"] = _help(kwargs["help"])
    for flag in flags:
        if flag in metavars:
            kwargs["metavar"] = metavars[flag]
            break
    else:
        if flags:
            kwargs = _metavar(flags[0], kwargs)
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


def repeated_options(model: type[BaseModel], argv: list[str]) -> list[str]:
    """Options that take one value but appear more than once (argparse would silently keep
    the last); options whose value is a list may repeat."""
    single = set()
    for name, info in model.model_fields.items():
        kinds = [info.annotation, *typing.get_args(info.annotation)]  # `list[str] | None` too
        if any(typing.get_origin(kind) in (list, dict) for kind in kinds):
            continue
        single.add("--" + (info.alias or name).replace("_", "-"))
    seen = [arg.split("=", 1)[0] for arg in argv if arg.startswith("--")]
    return sorted({flag for flag in seen if flag in single and seen.count(flag) > 1})


def parse(argv: list[str]) -> Command:
    """The command a command line asks for, validated (argparse exits on usage errors)."""
    commands = {name: command_class(name) for name in COMMANDS}
    for name, model in commands.items():
        _register_progs(f"{PROGRAM} {name}", model)
    words = [arg for arg in argv if not arg.startswith("-")]
    model = _models_by_prog.get(" ".join([PROGRAM, *words[:2]])) or _models_by_prog.get(
        " ".join([PROGRAM, *words[:1]])
    )
    repeated = repeated_options(model, argv) if model else []
    if repeated:
        raise UserError(f"{', '.join(repeated)} is given twice; give it once")
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


def suggest(argv: list[str]) -> str | None:
    """`did you mean` for a mistyped command."""
    if not argv or argv[0].startswith("-") or argv[0] in COMMANDS:
        return None
    close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{PROGRAM}: unknown command {argv[0]!r}{hint} (commands: {', '.join(COMMANDS)})"


def execute(command: Command) -> int:
    """Check, then run (or submit) one command; print its report. Returns the exit status."""
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
    return command.exit_status(result)


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
        status = execute(command)
    except KeyboardInterrupt:
        print(f"{PROGRAM} {name}: interrupted", file=sys.stderr)
        return 130
    except (
        UserError,
        ValueError,
        KeyError,
        OSError,  # a full disk, a permission: the message names the file
        RuntimeError,
        SettingsError,
    ) as error:
        if debug:
            raise
        if isinstance(error, ValidationError):
            message = describe_validation_error(error, options=True)
        elif isinstance(error, KeyError) and error.args:
            message = error.args[0]
        else:
            message = str(error).removeprefix("error parsing CLI: ")
        # Messages quote data and URLs: no escape codes, no credentials reach the terminal.
        print(printable_lines(f"{PROGRAM} {name}: error: {message}"), file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
