"""The command model: every `hindsight` command is one typed options model.

A command is a pydantic model (a subclass of `Command`) whose fields are its options, each
with a one-line description. From that one model come:

- the command line (`jobs/cli.py`, through pydantic-settings): positional arguments are the
  fields marked `CliPositionalArg`, every other field is `--kebab-case`, lists are
  comma-separated (or the option repeated), help and defaults come from the fields;
- the YAML job spec (`jobs/spec.py`): `kind: <command>` plus the same fields by name;
- the line recorded in a manifest's history (`history_line`), the same for a command line and
  a spec, with credentials stripped from URLs;
- the checks of inputs and outputs before any work starts (`check`): a field annotated
  `Dataset` must be a committed version, `NewDataset` must not be one yet, and so on.

`run()` does the work and returns a result; `report()` turns it into the lines a person
reads, `summary()` into the JSON a program reads (`--json`, `hindsight run`). Adding a
command is one new module in jobs/commands/ and one line in `jobs.commands.COMMANDS`.
"""

from __future__ import annotations

import enum
import json
import os
import shlex
import textwrap
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine import storage
from engine.executor import Executor
from schemas.manifest import printable, public_text, public_url


class UserError(RuntimeError):
    """An error whose message is all the user needs (no traceback)."""


class PathRole(enum.Enum):
    """What a path option names, and so what `Command.check` requires of it."""

    DATASET = "a committed dataset version"
    SOURCE = "files or a directory to read"
    SHARDS = "a committed set of shards"
    RUN = "a training run directory"
    NEW_DATASET = "a new dataset version"
    NEW_SHARDS = "a new set of shards"
    DIRECTORY = "a directory for results"


Dataset = Annotated[str, PathRole.DATASET]
Source = Annotated[str, PathRole.SOURCE]
Shards = Annotated[str, PathRole.SHARDS]
Run = Annotated[str, PathRole.RUN]
NewDataset = Annotated[str, PathRole.NEW_DATASET]
NewShards = Annotated[str, PathRole.NEW_SHARDS]
Directory = Annotated[str, PathRole.DIRECTORY]

# Options that shape how a command prints, not what it does: not part of a spec or of the
# recorded history line.
OUTPUT_ONLY = "output-only"


class Command(BaseModel):
    """Base of every command's options."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: ClassVar[str]
    # A job reads and writes data, not the terminal: it can also run from a YAML spec
    # (`hindsight run`, `hindsight submit`).
    job: ClassVar[bool] = False

    json_output: Annotated[bool, OUTPUT_ONLY] = Field(
        False, alias="json", description="Print the result as JSON."
    )
    debug: Annotated[bool, OUTPUT_ONLY] = Field(
        False, description="Show the traceback of an error."
    )

    # ------------------------------------------------------------ what subclasses give
    def run(self) -> Any:
        """Do the work and return its result."""
        raise NotImplementedError

    def report(self, result: Any, seconds: float) -> str:
        """What a person reads when the command is done (one summary line, or a table)."""
        return json.dumps(self.summary(result), indent=2, default=str)

    def exit_status(self, result: Any) -> int:
        """0, or the status of a command that ended without doing all it was asked (a
        training run stopped by Ctrl-C, a followed cluster job that failed); it may print
        one line to stderr saying what to do."""
        return int(result) if isinstance(result, int) and not isinstance(result, bool) else 0

    def summary(self, result: Any) -> Any:
        """What a program reads: plain JSON facts of the result."""
        return plain_summary(result)

    # ------------------------------------------------------------ derived from the fields
    def check(self) -> None:
        """Cheap checks before any work: inputs exist, outputs are new and not inside an
        input (where they would change what they are made from)."""
        paths = dict(self.path_fields())
        for name, value in paths.items():
            check_path(name, value, self.path_role(name))
        output, source = paths.get("output"), paths.get("input")
        # ask writes its report into the run by default: a report is not a version.
        if output and source and type(self).path_role("output") is not PathRole.DIRECTORY:
            if is_inside(output, source):
                raise UserError(
                    f"output {output} is inside input {source}; write it somewhere else "
                    "(what a command writes must not change what it reads)"
                )

    @classmethod
    def path_role(cls, field_name: str) -> PathRole | None:
        for item in cls.model_fields[field_name].metadata:
            if isinstance(item, PathRole):
                return item
        return None

    def path_fields(self) -> list[tuple[str, str]]:
        """(field, path) of every path option that is set."""
        return [
            (name, str(getattr(self, name)))
            for name in type(self).model_fields
            if self.path_role(name) is not None and getattr(self, name) is not None
        ]

    @classmethod
    def spec_fields(cls) -> list[str]:
        return [name for name, info in cls.model_fields.items() if OUTPUT_ONLY not in info.metadata]

    def to_spec(self) -> dict[str, Any]:
        """The job spec of this command: `kind` and every option, defaults included."""
        values = self.model_dump(mode="json", include=set(self.spec_fields()))
        return {"kind": self.name, **values}

    def history_line(self) -> str:
        """The command line that makes this result, as recorded in a manifest: positional
        arguments, then the options that differ from their defaults; URLs lose credentials."""
        words = ["hindsight", self.name]
        options: list[str] = []
        for name in self.spec_fields():
            info = type(self).model_fields[name]
            value = getattr(self, name)
            if is_positional(info):
                words.append(command_word(value))
                continue
            if value == info.get_default(call_default_factory=True):
                continue
            flag = "--" + (info.alias or name).replace("_", "-")
            if isinstance(value, bool):
                options.append(flag if value else f"--no-{flag[2:]}")
            elif isinstance(value, list) and not all(is_plain(item) for item in value):
                for item in value:  # one option per item: items may hold commas
                    options += [flag, command_word(item)]
            else:
                options += [flag, command_word(value)]
        return shlex.join(words + options)


class RayCommand(Command):
    """A command whose work runs in parallel on Ray: an embedded local Ray by default (a
    small job runs in this process without one), a cluster with `--address`; an `http://`
    address submits the command as a Ray job."""

    address: str | None = Field(
        None,
        description="Ray address (ray://HOST:10001, HOST:6379, auto) to run on a cluster, or "
        "a dashboard http://HOST:8265 to submit it as a job; default: this machine (a small job "
        "in this process, a larger one on an embedded local Ray).",
    )

    def submits(self) -> bool:
        return bool(self.address and self.address.startswith(("http://", "https://")))

    def executor(self) -> Executor:
        """Where the parts run, decided per job by its size: a small job runs in this
        process without starting Ray; a larger one on Ray (started, or joined at
        `--address`, on first need). See `jobs.runtime.SizedExecutor`."""
        from jobs.runtime import SizedExecutor

        return SizedExecutor(self.address)

    def history_line(self) -> str:
        """As `Command.history_line`, without `--address`: where the parts ran does not
        change what they computed, so a spec records the same line here and on a cluster
        (where `hindsight run` sets the address to the job's own cluster)."""
        return Command.history_line(self.model_copy(update={"address": None}))

    def to_spec(self) -> dict[str, Any]:
        spec = super().to_spec()
        if self.submits():
            spec["address"] = None  # on the cluster, the job runs on the cluster's own Ray
        return spec


def is_inside(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or below it (local paths resolved, or S3 prefixes)."""
    path, directory = storage.normalize(path), storage.normalize(directory)
    if storage.is_s3(path) != storage.is_s3(directory):
        return False
    if not storage.is_s3(path):
        path, directory = os.path.realpath(path), os.path.realpath(directory)
        if "*" in directory or "?" in directory:  # a glob of source files: its folder
            directory = os.path.dirname(directory)
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def has_cli_marker(info: Any, marker: str) -> bool:
    """Whether a field is marked by pydantic-settings (`CliPositionalArg`, `CliSubCommand`
    put their marker class itself, not an instance, in the field's metadata)."""
    return any(
        (item if isinstance(item, type) else type(item)).__name__ == marker
        for item in info.metadata
    )


def is_positional(info: Any) -> bool:
    return has_cli_marker(info, "_CliPositionalArg")


def is_plain(value: Any) -> bool:
    """A value that can stand in a comma-separated list."""
    return isinstance(value, (int, float, str)) and "," not in str(value)


def command_word(value: Any) -> str:
    """One value as typed on a command line (URLs without credentials)."""
    if hasattr(value, "as_option"):  # e.g. a relabeler spec: returns:gamma=0.99
        return value.as_option()  # its values are made public by as_option
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, dict):
        return ",".join(f"{k}={command_word(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(command_word(v) for v in value)
    return public_url(str(value))


# ---------------------------------------------------------------- checks of paths


def check_path(field: str, value: str, role: PathRole | None) -> None:
    """Raise UserError if `value` cannot be what `role` says."""
    from engine.writer import check_new_output
    from schemas.manifest import MANIFEST_NAME
    from schemas.shard_index import INDEX_NAME

    if role is None:
        return
    uri = storage.normalize(value)
    if role is PathRole.DATASET:
        if not storage.exists(storage.join(uri, MANIFEST_NAME)):
            raise UserError(f"{field} {value}: {what_is_there(uri)}; expected {role.value}")
    elif role is PathRole.SHARDS:
        if not storage.exists(storage.join(uri, INDEX_NAME)):
            found = what_is_there(uri)
            # Name the missing index.json; "not a dataset (no manifest.json)" would mislead.
            found = "" if found.startswith("not a hindsight dataset") else f"{found}, "
            raise UserError(
                f"{field} {value}: {found}no {INDEX_NAME}; expected {role.value} "
                "(written by hindsight shard)"
            )
    elif role is PathRole.SOURCE:
        if "://" in value and not storage.is_s3(value):
            return  # a generator such as gym://, not files
        if not (storage.exists(uri) or storage.list_files(uri)):
            raise UserError(f"{field} {value}: does not exist")
    elif role is PathRole.RUN:
        if storage.is_s3(value):
            raise UserError(f"{field} {value}: a run directory is local (checkpoints live there)")
    elif role is PathRole.NEW_DATASET:
        check_new_output(uri)
    elif role is PathRole.NEW_SHARDS:
        check_new_output(uri, INDEX_NAME)


PATH_KINDS = {
    "dataset": "a dataset version",
    "shards": "a set of shards (hindsight shard)",
    "staging": "an unfinished version (a writer is at work or died before committing)",
    "run": "a training run (hindsight train)",
    "file": "a file, not a dataset directory",
    "missing": "does not exist",
    "other": "not a hindsight dataset (no manifest.json)",
}


def path_kind(uri: str) -> str:
    """What a path holds: one of PATH_KINDS (looked up by the files each kind commits)."""
    from schemas.manifest import MANIFEST_NAME
    from schemas.shard_index import INDEX_NAME
    from trainers.options import CONFIG

    if storage.exists(storage.join(uri, MANIFEST_NAME)):
        return "dataset"
    if storage.exists(storage.join(uri, INDEX_NAME)):
        return "shards"
    if storage.exists(storage.join(uri, storage.STAGING_MARKER)):
        return "staging"
    if not storage.is_s3(uri) and os.path.isfile(os.path.join(uri, CONFIG)):
        return "run"
    if not storage.is_s3(uri) and os.path.isfile(uri):
        return "file"
    if not storage.exists(uri) and not storage.list_files(uri):
        return "missing"
    return "other"


def what_is_there(uri: str) -> str:
    """A short description of what a path holds, for messages."""
    return PATH_KINDS[path_kind(uri)]


# ---------------------------------------------------------------- errors as text


def describe_validation_error(
    error: ValidationError, model: type[BaseModel] | None = None, *, options: bool = False
) -> str:
    """What failed validation, one phrase per problem, named as the user wrote it: an
    option (`--episodes`, `options=True`: one line each) or a spec field (`field
    'episodes'`, joined on one line), with what was expected and what was given."""
    from jobs.commands import COMMANDS

    phrases = []
    for problem in error.errors():
        location = [str(part) for part in problem["loc"] if str(part) not in COMMANDS]
        dotted = ".".join(location)
        name = ("--" + dotted.replace("_", "-")) if options else f"field {dotted!r}"
        message = problem["msg"].removeprefix("Value error, ")
        got = problem.get("input")
        if problem["type"] == "extra_forbidden":
            known = f" (known fields: {', '.join(model.model_fields)})" if model else ""
            phrases.append(f"unknown {name}{known}")
        elif problem["type"] == "missing":
            info = model.model_fields.get(location[0]) if model and location else None
            hint = f": {info.description}" if info and info.description else ""
            phrases.append(f"missing required {name}{hint}")
        elif not location:
            phrases.append(message)
        else:
            # A value from the command line is shown as typed (-5, not '-5').
            typed = got if options and isinstance(got, str) and got else repr(got)
            shown = "" if isinstance(got, dict) or "got" in message else f" (got {typed})"
            phrases.append(f"{name}: {message}{shown}")
    return ("\n  " if options else "; ").join(phrases)


# ---------------------------------------------------------------- results as text and JSON


def plain_summary(result: Any) -> dict[str, Any]:
    """The facts of a result as plain JSON: a manifest's id and counts, a dict as it is."""
    from schemas.manifest import Manifest

    if isinstance(result, Manifest):
        return {
            "dataset_id": result.dataset_id,
            "steps": result.steps,
            "episodes": result.episodes,
            "parts": len(result.parts),
        }
    if isinstance(result, BaseModel):
        return result.model_dump(mode="json")
    if isinstance(result, dict):
        return json.loads(json.dumps(result, default=str))
    return {"result": str(result)} if result is not None else {}


def printable_lines(text: str) -> str:
    """`text` as it may be printed: URLs without credentials, and control characters
    (terminal escape codes) shown escaped on every line, which stay the lines they were."""
    return "\n".join(printable(public_text(line)) for line in text.split("\n"))


def wrap_report(name: str, report: dict[str, Any], width: int = 100) -> str:
    """A relabeler's (or any) report as indented `key: value` lines, wrapped at words;
    its strings (a server's words, data) are printable (`printable_lines`), one line each."""
    lines = [f"  {printable_lines(name)}:"]
    for key, value in report.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        lines.extend(
            textwrap.wrap(
                printable(public_text(f"{key}: {text}")),
                width=width,
                initial_indent="    ",
                subsequent_indent="      ",
                break_long_words=False,
                break_on_hyphens=False,
            )
        )
    return "\n".join(lines)


def rate(count: int, seconds: float, unit: str = "steps") -> str:
    return f"{seconds:.1f} s, {count / seconds:,.0f} {unit}/s" if seconds > 0 else "0.0 s"


def version_line(verb: str, manifest: Any, output: str, seconds: float) -> str:
    """`collected 200 episodes, 40,000 steps into data/x (dataset ..., 4 part(s)) in ...`."""
    return (
        f"{verb} {manifest.episodes:,} episodes, {manifest.steps:,} steps into "
        f"{storage.normalize(output)} (dataset {manifest.dataset_id}, {len(manifest.parts)} "
        f"part(s)) in {rate(manifest.steps, seconds)}"
    )
