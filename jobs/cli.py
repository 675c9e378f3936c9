"""`hindsight`: the command line. Each command group lives in its own module under jobs/
and adds its sub-commands with `add_commands(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys

from pydantic import ValidationError

# One module per command group; `hindsight --help` lists them all.
COMMAND_MODULES = (
    "jobs.ingest_job",  # collect, ingest, info, materialize
    "jobs.relabel_job",  # relabel, relabelers
    "jobs.query_job",  # query
    "jobs.shard_job",  # shard
    "jobs.train_job",  # train, ask
    "jobs.submit",  # run, submit, jobs
    "jobs.demo",  # demo
)


class UserError(RuntimeError):
    """An error whose message is all the user needs (no traceback)."""


def describe_validation_error(error: ValidationError) -> str:
    """Options that failed validation, one line each, without pydantic's internals."""
    lines = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        got = problem.get("input")
        shown = (
            f" (got {got!r})"
            if where and not isinstance(got, dict) and "got" not in message
            else ""
        )
        lines.append(f"{where}: {message}{shown}" if where else message)
    return "\n  ".join(lines)


class _CommandParser(argparse.ArgumentParser):
    """A command's parser: `--help` shows each option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hindsight",
        description="A data engine for hindsight-relabeled trajectory datasets.",
    )
    subparsers = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser
    )
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, KeyError, FileNotFoundError, RuntimeError) as error:
        if getattr(args, "debug", False):
            raise
        if isinstance(error, ValidationError):
            message = describe_validation_error(error)
        elif isinstance(error, KeyError) and error.args:
            message = error.args[0]
        else:
            message = error
        print(f"hindsight {args.command}: error: {message}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
