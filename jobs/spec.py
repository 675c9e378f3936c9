"""Job specs: one YAML format for every pipeline command.

A spec names the command with `kind` and carries the fields of that command's pydantic
Options model, nothing else:

    kind: relabel
    input: s3://hindsight/pendulum
    output: s3://hindsight/pendulum-returns
    relabeler: returns
    params: {gamma: 0.99}

`load_spec` validates a spec completely (YAML syntax, unknown keys, wrong types, input
datasets that do not exist, outputs that are already committed) before anything runs or is
submitted; `run_spec` calls the same `run_<kind>(options)` function as the CLI command, so a
spec and a command line do exactly the same work.
"""

from __future__ import annotations

import importlib
import inspect
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

# kind -> (module, run function). Modules are imported lazily: `hindsight run` for a
# relabel spec never imports torch.
KINDS: dict[str, tuple[str, str]] = {
    "collect": ("jobs.ingest_job", "run_collect"),
    "ingest": ("jobs.ingest_job", "run_ingest"),
    "materialize": ("jobs.ingest_job", "run_materialize"),
    "relabel": ("jobs.relabel_job", "run_relabel"),
    "query": ("jobs.query_job", "run_query"),
    "shard": ("jobs.shard_job", "run_shard"),
    "train": ("jobs.train_job", "run_train"),
}

# Option fields that name an existing *dataset version* (must have a manifest.json) and
# fields that name raw input files or folders (must exist). Checked before submission.
DATASET_INPUT_FIELDS = ("input", "dataset", "parent", "source_dataset", "input_dataset")
RAW_INPUT_FIELDS = ("source", "path", "paths", "raw", "files", "shards")
# Option fields that name the version a job writes: it must not be committed already.
DATASET_OUTPUT_FIELDS = ("output", "out", "output_dataset")
# Commands whose `input` is raw files, not a dataset version.
RAW_INPUT_KINDS = ("ingest",)


class SpecError(ValueError):
    """A job spec that cannot run, with the file, the field and what was expected."""


@dataclass(frozen=True)
class Spec:
    """A validated spec: the command, its options and where it came from."""

    kind: str
    options: BaseModel
    source: str

    def to_yaml(self) -> str:
        """The spec as YAML text, with every option explicit (defaults filled in)."""
        fields = self.options.model_dump(mode="json", exclude_unset=False)
        return yaml.safe_dump({"kind": self.kind, **fields}, sort_keys=False)


def run_function(kind: str):
    """The `run_<kind>(options)` function of a command (imported on first use)."""
    if kind not in KINDS:
        raise SpecError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    module_name, function_name = KINDS[kind]
    module = importlib.import_module(module_name)
    function = getattr(module, function_name, None)
    if function is None:
        raise SpecError(
            f"kind {kind!r}: {module_name} has no {function_name}(options) yet; "
            "this command cannot run from a spec"
        )
    return function


def options_model(kind: str) -> type[BaseModel]:
    """The pydantic Options model of a command: the annotation of `run_<kind>`'s argument."""
    function = run_function(kind)
    hints = typing.get_type_hints(function)
    parameters = list(inspect.signature(function).parameters)
    model = hints.get(parameters[0]) if parameters else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        module = inspect.getmodule(function)
        candidates = [
            value
            for name, value in vars(module).items()
            if name.endswith("Options")
            and isinstance(value, type)
            and issubclass(value, BaseModel)
            and value.__module__ == module.__name__
        ]
        if len(candidates) != 1:
            raise SpecError(f"kind {kind!r}: cannot find the Options model of {function.__name__}")
        model = candidates[0]
    return model


# ---------------------------------------------------------------- loading and validation


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
        raise SpecError(f"{source}: missing `kind:` (one of {', '.join(KINDS)})")
    if kind not in KINDS:
        raise SpecError(f"{source}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    return kind, fields


def describe_validation_error(error: ValidationError, model: type[BaseModel]) -> str:
    """One line per problem: the field, what was wrong, and what was expected."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(spec)"
        if item["type"] == "extra_forbidden":
            known = ", ".join(model.model_fields)
            lines.append(f"unknown field {field!r} (known fields: {known})")
        elif item["type"] == "missing":
            description = model.model_fields.get(str(item["loc"][0]))
            hint = f": {description.description}" if description and description.description else ""
            lines.append(f"missing required field {field!r}{hint}")
        else:
            lines.append(f"field {field!r}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(lines)


def validate_options(kind: str, fields: dict[str, Any], source: str) -> BaseModel:
    model = options_model(kind)
    try:
        return model.model_validate(fields)
    except ValidationError as error:
        raise SpecError(
            f"{source}: invalid {kind} spec: {describe_validation_error(error, model)}"
        ) from None


def _uris(value: Any) -> list[str]:
    if isinstance(value, (str, Path)):
        return [str(value)]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if isinstance(v, (str, Path))]
    return []


def check_paths(kind: str, options: BaseModel, source: str) -> None:
    """Fail before any work when an input is missing or the output is already committed."""
    from engine import storage
    from schemas.manifest import MANIFEST_NAME

    values = options.model_dump()
    dataset_fields = () if kind in RAW_INPUT_KINDS else DATASET_INPUT_FIELDS
    raw_fields = RAW_INPUT_FIELDS + (DATASET_INPUT_FIELDS if kind in RAW_INPUT_KINDS else ())
    for field in dataset_fields:
        for uri in _uris(values.get(field)):
            if not storage.exists(storage.join(storage.normalize(uri), MANIFEST_NAME)):
                raise SpecError(
                    f"{source}: field {field!r}: {uri} is not a committed hindsight dataset "
                    "(no manifest.json there); check the path and the S3 endpoint/credentials"
                )
    for field in raw_fields:
        for uri in _uris(values.get(field)):
            if "://" in uri and not uri.startswith("s3://"):
                continue  # e.g. gym:// or minari:// sources name generators, not files
            if not (storage.exists(uri) or storage.list_files(uri)):
                raise SpecError(f"{source}: field {field!r}: {uri} does not exist")
    for field in DATASET_OUTPUT_FIELDS:
        for uri in _uris(values.get(field)):
            if storage.exists(storage.join(storage.normalize(uri), MANIFEST_NAME)):
                raise SpecError(
                    f"{source}: field {field!r}: {uri} is already a committed dataset version; "
                    "versions are immutable, choose a new output path"
                )


def local_paths(spec: Spec) -> list[tuple[str, str]]:
    """The (field, path) pairs of a spec's inputs and outputs that are not URIs (s3://...)."""
    values = spec.options.model_dump()
    fields = DATASET_INPUT_FIELDS + RAW_INPUT_FIELDS + DATASET_OUTPUT_FIELDS + ("run_dir",)
    return [
        (field, uri) for field in fields for uri in _uris(values.get(field)) if "://" not in uri
    ]


def check_command(kind: str, options: BaseModel, source: str) -> None:
    """The command's own cheap checks (e.g. relabeler name and parameters), when it has them."""
    module = importlib.import_module(KINDS[kind][0])
    check = getattr(module, "check_options", None) or getattr(module, "validate_options", None)
    if check is None:
        return
    try:
        check(options)
    except (ValueError, KeyError, LookupError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise SpecError(f"{source}: invalid {kind} spec: {message}") from None


def load_spec_text(text: str, source: str = "<spec>", check_inputs: bool = True) -> Spec:
    """Validate spec text completely; `check_inputs=False` skips the storage look-ups (for a
    client that cannot see the cluster's storage)."""
    kind, fields = parse_spec_text(text, source)
    options = validate_options(kind, fields, source)
    check_command(kind, options, source)
    if check_inputs:
        check_paths(kind, options, source)
    return Spec(kind=kind, options=options, source=source)


def load_spec(path: str | Path, check_inputs: bool = True) -> tuple[str, BaseModel]:
    """Read and validate a YAML job spec; returns (kind, options)."""
    spec = read_spec(path, check_inputs=check_inputs)
    return spec.kind, spec.options


def read_spec(path: str | Path, check_inputs: bool = True) -> Spec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such job spec file")
    return load_spec_text(path.read_text(), source=str(path), check_inputs=check_inputs)


# ---------------------------------------------------------------- running


def run_spec(kind: str, options: BaseModel) -> Any:
    """Run a validated spec in this process (on the Ray that `init_ray` connected to)."""
    return run_function(kind)(options)


def describe_result(kind: str, options: BaseModel, result: Any) -> dict[str, Any]:
    """What a job produced, as plain JSON: the output location and the dataset id."""
    summary: dict[str, Any] = {"kind": kind}
    values = options.model_dump(mode="json")
    for field in DATASET_OUTPUT_FIELDS + ("run_dir", "output_dir"):
        if values.get(field):
            summary["output"] = values[field]
            break
    if isinstance(result, BaseModel):
        result = result.model_dump(mode="json")
    if isinstance(result, dict):
        for key in (
            "dataset_id",
            "output",
            "out",
            "uri",
            "steps",
            "episodes",
            "shards",
            "checkpoint",
        ):
            value = result.get(key)
            if isinstance(value, (str, int, float, bool)):
                summary[key] = value
    elif isinstance(result, (str, Path)):
        summary.setdefault("output", str(result))
    elif hasattr(result, "manifest"):  # an opened Dataset
        summary["dataset_id"] = result.manifest.dataset_id
    json.dumps(summary)
    return summary
