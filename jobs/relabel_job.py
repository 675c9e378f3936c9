"""`hindsight relabel` and `hindsight relabelers`: attach relabeler column groups on Ray.

    hindsight relabel IN OUT --with returns:gamma=0.99 --with skill:levels=4 [--seed S]
    hindsight relabel --spec relabel.yaml [--address ray://HEAD:10001 | http://HEAD:8265]
    hindsight relabelers

The job, top to bottom (`run_relabel`):

1. open the parent version, create every relabeler (parameters validated), and check what
   each reads against the parent's schema plus the columns written earlier in this job:
   a missing column or a bad achieved-goal spec fails here, before anything is written;
2. `begin_version(OUT)`; then for each relabeler, in order:
   - pass one (only if it needs dataset-wide statistics): `summarize` on every part with
     `map_parts`, `combine` in the driver;
   - pass two: one task per part reads only the columns the relabeler reads (from the
     parent and the groups written earlier in this job), runs it, and writes its column
     group part (`<OUT>/<relabeler>/steps/part-i.parquet`, new columns only);
3. the manifest (parent groups inherited by reference, one new group per relabeler with
   name, version, parameters, seed and report) is committed last.

A task that finds bad data (NaNs, unknown values) reports the error; the job then removes
its staging output and raises, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine import storage
from engine.dataset import (
    LEVELS,
    Dataset,
    WrittenPart,
    assemble_group,
    begin_version,
    commit_version,
    fields_of,
    inherit_groups,
    new_manifest,
    open_dataset,
    write_group_part,
)
from relabelers import registry
from relabelers.base import Relabeler, RelabelError, Statistics, describe_params
from schemas import steps as cols
from schemas.manifest import ColumnGroup, Manifest, RelabelerInfo

# --------------------------------------------------------------------- options


class RelabelerSpec(BaseModel):
    """One relabeler to apply: its registered name and its parameters."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Registered relabeler name (see `hindsight relabelers`).")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Parameters, validated by the relabeler."
    )


class RelabelOptions(BaseModel):
    """Everything `hindsight relabel` needs; a YAML spec (`kind: relabel`) holds the same."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="The parent dataset version (local path or s3://).")
    output: str = Field(description="Where the new version is written; must not exist yet.")
    relabelers: list[RelabelerSpec] = Field(
        min_length=1,
        description="Relabelers applied in order; later ones see earlier ones' columns. "
        "Items are {name, params} or `name:key=value,...` strings as on the command line.",
    )
    seed: int = Field(0, description="Seed of every relabeler's randomness.")
    address: str | None = Field(
        None, description="Ray cluster address; default: an embedded local Ray."
    )
    llm_base_url: str | None = Field(
        None, description="Sets `base_url` on every relabeler that has that parameter."
    )
    retry_failed: bool = Field(
        False, description="Sets `retry_failed` on every relabeler that has that parameter."
    )
    command: str | None = Field(
        None, description="The command line recorded in the manifest (default: derived)."
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        """`relabeler: NAME` + `params: {...}` (one relabeler) and `NAME:k=v` strings."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "relabeler" in data:
            data.setdefault("relabelers", [])
            data["relabelers"] = [
                {"name": data.pop("relabeler"), "params": data.pop("params", {}) or {}}
            ] + list(data["relabelers"])
        items = []
        for item in data.get("relabelers") or []:
            if isinstance(item, str):
                name, params = registry.parse_with(item)
                item = {"name": name, "params": params}
            items.append(item)
        if "relabelers" in data:
            data["relabelers"] = items
        return data


# Generic options mapped onto relabeler parameters of the same meaning.
GENERIC_PARAMS = {"llm_base_url": "base_url", "retry_failed": "retry_failed"}


def create_relabelers(options: RelabelOptions) -> list[Relabeler]:
    """Instantiate (and so validate) every relabeler of the options, in order."""
    import engine.envs  # noqa: F401  registers hindsight/* gymnasium envs (reward functions)

    relabelers = []
    for spec in options.relabelers:
        relabeler_class = registry.get(spec.name)
        params = dict(spec.params)
        fields = relabeler_class.Params.model_fields
        for option, param in GENERIC_PARAMS.items():
            value = getattr(options, option)
            if param in fields and value not in (None, False) and param not in params:
                params[param] = value
        relabelers.append(relabeler_class(params, seed=options.seed))
    return relabelers


def check_options(options: RelabelOptions) -> None:
    """Cheap checks for job specs: relabeler names and parameters (no data read)."""
    create_relabelers(options)


# --------------------------------------------------------------------- checks before writing


def parent_schemas(dataset: Dataset) -> dict[str, pa.Schema]:
    """The Arrow schema of every column at each level, from part 0's file footers."""
    return {level: dataset.arrow_schema(level) for level in LEVELS}


def check_plan(dataset: Dataset, relabelers: list[Relabeler]) -> None:
    """Every read column exists (in the parent or written earlier in this job), no two
    relabelers write the same column, and each relabeler's own schema checks pass (for
    relabelers that read columns written in this job, `run_relabel` runs those checks
    once the columns exist)."""
    available = {level: set(dataset.columns(level)) for level in LEVELS}
    produced: set[str] = set()
    schemas = parent_schemas(dataset)
    groups = {g.name for g in dataset.manifest.groups}
    owner = {
        (level, f.name): g.name
        for g in dataset.manifest.groups
        for level in LEVELS
        for f in getattr(g, f"{level}_columns")
    }
    in_this_job: set[str] = set()
    for position, relabeler in enumerate(relabelers, start=1):
        where = f"relabeler {position} ({relabeler.name!r}) on {dataset.uri}"
        if relabeler.name in in_this_job:
            raise RelabelError(
                f"{where}: {relabeler.name!r} is given twice; a relabeler runs once per "
                "version (relabel the output again for a second run with other parameters)"
            )
        in_this_job.add(relabeler.name)
        if relabeler.name in groups:
            raise RelabelError(
                f"{where}: the dataset already has a column group {relabeler.name!r}; "
                "relabel its parent instead, or apply each relabeler once per version"
            )
        reads, writes = relabeler.reads(), relabeler.writes()
        read_heads = set()
        for level in LEVELS:
            for name in getattr(reads, level):
                read_heads.add(name.split(".")[0])
                if name.split(".")[0] not in available[level]:
                    raise RelabelError(
                        f"{where}: reads {level} column {name!r}, which the dataset does not "
                        f"have; available {level} columns: {', '.join(sorted(available[level]))}"
                    )
        if not read_heads & produced:
            check_relabeler_schema(relabeler, schemas, where)
        for level in LEVELS:
            clash = available[level] & set(getattr(writes, level))
            if clash:
                holders = sorted({owner.get((level, c), "an earlier relabeler") for c in clash})
                raise RelabelError(
                    f"{where}: would write {level} column(s) {sorted(clash)} that already "
                    f"exist (in {', '.join(map(repr, holders))}); every column belongs to "
                    "exactly one group. Relabel a version without them (for a `query --out` "
                    "or `materialize` copy: its parent, then query again)"
                )
            available[level] |= set(getattr(writes, level))
            produced |= set(getattr(writes, level))


def check_relabeler_schema(relabeler: Relabeler, schemas: dict[str, pa.Schema], where: str) -> None:
    """The relabeler's own `check_schema(steps_schema, episodes_schema)`."""
    try:
        relabeler.check_schema(schemas["steps"], schemas["episodes"])
    except KeyError as error:
        raise RelabelError(f"{where}: {error.args[0] if error.args else error}") from None


# --------------------------------------------------------------------- tasks (run on Ray)


def _task_relabeler(task: dict[str, Any]) -> tuple[Relabeler, Dataset]:
    import engine.envs  # noqa: F401  registers hindsight/* gymnasium envs for reward functions

    relabeler = registry.create(task["relabeler"], task["params"], seed=task["seed"])
    dataset = Dataset(task["dataset_uri"], Manifest.from_json(task["manifest"]))
    return relabeler, dataset


def _read_inputs(relabeler: Relabeler, dataset: Dataset, index: int):
    reads = relabeler.reads()
    step_columns = [cols.EPISODE_ID, cols.T] + [c.split(".")[0] for c in reads.steps]
    episode_columns = [cols.EPISODE_ID] + [c.split(".")[0] for c in reads.episodes]
    extra = relabeler.report_episode_columns
    episode_columns += [c for c in extra if c in dataset.columns("episodes")]
    steps = dataset.read_part(index, "steps", step_columns)
    episodes = dataset.read_part(index, "episodes", episode_columns)
    return steps, episodes


def summarize_task(task: dict[str, Any]) -> dict[str, Any]:
    """Pass one on one part: the relabeler's small summary (or the error message)."""
    try:
        relabeler, dataset = _task_relabeler(task)
        steps, episodes = _read_inputs(relabeler, dataset, task["index"])
        return {"summary": relabeler.summarize(steps, episodes), "steps": steps.num_rows}
    except (ValueError, KeyError, RuntimeError, OSError) as error:  # reported by the driver
        return {"error": f"part {task['index']}: {error}", "steps": 0}


def relabel_task(task: dict[str, Any]) -> dict[str, Any]:
    """Pass two on one part: run the relabeler and write its column group part."""
    try:
        relabeler, dataset = _task_relabeler(task)
        index = task["index"]
        steps, episodes = _read_inputs(relabeler, dataset, index)
        statistics = Statistics(values=task["statistics"])
        where = f"{dataset.uri} part {index}"
        output = relabeler.run(steps, episodes, statistics, where)
        written = write_group_part(
            task["output_uri"],
            relabeler.name,
            index,
            output.steps,
            output.episodes,
            task["staging_token"],
        )
        result = {"written": written.to_dict(), "steps": steps.num_rows}
        if index == 0:
            result["fields"] = {
                "steps": [f.model_dump() for f in fields_of([output.steps])],
                "episodes": [f.model_dump() for f in fields_of([output.episodes])],
            }
        result["output_summary"] = relabeler.summarize_output(steps, episodes, output)
        return result
    except (ValueError, KeyError, RuntimeError, OSError) as error:  # reported by the driver
        return {"error": f"part {task['index']}: {error}", "steps": 0}


# --------------------------------------------------------------------- the job


def default_command(options: RelabelOptions) -> str:
    words = ["hindsight", "relabel", options.input, options.output]
    for spec in options.relabelers:
        params = ",".join(f"{k}={v}" for k, v in spec.params.items())
        words += ["--with", spec.name + (f":{params}" if params else "")]
    words += ["--seed", str(options.seed)]
    return shlex.join(words)


def _raise_errors(
    results: list[dict[str, Any]], relabeler: Relabeler, output_uri: str, token: str | None
) -> None:
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        storage.discard_staging(output_uri, token)  # nothing of a failed run stays behind
        more = f" (and {len(errors) - 1} more part(s))" if len(errors) > 1 else ""
        raise RelabelError(f"relabeler {relabeler.name!r}: {errors[0]}{more}; nothing was written")


def run_relabel(options: RelabelOptions) -> Manifest:
    """Apply the relabelers of `options` to `options.input` and commit `options.output`."""
    from jobs.runtime import init_ray, map_parts

    parent = open_dataset(options.input)
    relabelers = create_relabelers(options)
    check_plan(parent, relabelers)
    init_ray(options.address)

    output_uri = begin_version(options.output)
    token = storage.staging_token(output_uri)  # this run's: tasks of another run cannot write
    manifest_so_far = parent.manifest.model_copy(deep=True)
    new_groups: list[ColumnGroup] = []
    for relabeler in relabelers:
        try:  # cheap, repeated now that the columns of earlier relabelers exist
            check_relabeler_schema(
                relabeler, parent_schemas(Dataset(parent.uri, manifest_so_far)), relabeler.name
            )
        except RelabelError:
            storage.discard_staging(output_uri, token)
            raise
        base_task = {
            "relabeler": relabeler.name,
            "params": relabeler.params.model_dump(mode="json"),
            "seed": relabeler.seed,
            "dataset_uri": parent.uri,
            "manifest": manifest_so_far.to_json(),
            "output_uri": output_uri,
            "staging_token": token,
        }
        tasks = [{**base_task, "index": i} for i in range(parent.num_parts)]

        statistics = Statistics()
        if relabeler.needs_statistics:
            results = map_parts(
                summarize_task,
                tasks,
                description=f"{relabeler.name} (statistics)",
                total=parent.manifest.steps,
            )
            _raise_errors(results, relabeler, output_uri, token)
            try:
                statistics = relabeler.combine([r["summary"] for r in results])
            except RelabelError:
                storage.discard_staging(output_uri, token)
                raise

        results = map_parts(
            relabel_task,
            [{**task, "statistics": statistics.values} for task in tasks],
            description=relabeler.name,
            total=parent.manifest.steps,
        )
        _raise_errors(results, relabeler, output_uri, token)

        report = dict(statistics.report)
        report.update(relabeler.finish_report(statistics, [r["output_summary"] for r in results]))
        fields = results[0]["fields"] if results else {"steps": [], "episodes": []}
        group = assemble_group(
            output_uri,
            relabeler.name,
            [WrittenPart.from_dict(r["written"]) for r in results],
            [_field(f) for f in fields["steps"]],
            [_field(f) for f in fields["episodes"]],
            relabeler=RelabelerInfo(
                name=relabeler.name,
                version=relabeler.version,
                params=relabeler.params.model_dump(mode="json"),
                seed=relabeler.seed,
                report=report,
            ),
        )
        new_groups.append(group)
        # Later relabelers read this group's columns through the manifest so far.
        manifest_so_far.groups.append(group)

    manifest = new_manifest(
        output_uri,
        groups=inherit_groups(parent, new_groups),
        parts=list(parent.manifest.parts),
        operation="relabel",
        command=options.command or default_command(options),
        parent=parent.manifest,
        parent_uri=parent.uri,
        details={"relabelers": [g.relabeler.model_dump(mode="json") for g in new_groups]},
    )
    storage.check_staging(output_uri, token)  # still this run's directory: commit
    return commit_version(output_uri, manifest)


def _field(data: dict[str, Any]):
    from schemas.manifest import FieldInfo

    return FieldInfo(**data)


# --------------------------------------------------------------------- listing relabelers


def describe_relabelers() -> list[dict[str, Any]]:
    """Every installed relabeler: name, version, parameters, and (with default parameters)
    the columns it reads and writes."""
    rows = []
    for name, entry_point in sorted(registry.available().items()):
        row: dict[str, Any] = {"name": name, "entry_point": entry_point.value}
        try:
            relabeler_class = registry.get(name)
        except Exception as error:  # a broken plugin must not hide the others
            row["error"] = f"cannot load: {error}"
            rows.append(row)
            continue
        row["version"] = relabeler_class.version
        row["params"] = describe_params(relabeler_class.Params)
        try:
            relabeler = relabeler_class({})
            reads, writes = relabeler.reads(), relabeler.writes()
            row["reads"] = {"steps": list(reads.steps), "episodes": list(reads.episodes)}
            row["writes"] = {"steps": list(writes.steps), "episodes": list(writes.episodes)}
        except (RelabelError, ValueError):
            row["reads"] = row["writes"] = "depends on required parameters"
        rows.append(row)
    return rows


def format_relabelers(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        lines.append(f"{row['name']} {row.get('version', '?')}  ({row['entry_point']})")
        if "error" in row:
            lines.append(f"  {row['error']}")
            continue
        lines.append(f"  params: {row['params']}")
        for key in ("reads", "writes"):
            value = row[key]
            if isinstance(value, dict):
                value = "; ".join(f"{level}: {', '.join(v)}" for level, v in value.items() if v)
            lines.append(f"  {key}: {value}")
    return "\n".join(lines)


# --------------------------------------------------------------------- command line


def relabel_command(args: argparse.Namespace) -> int:
    if args.spec:
        from jobs.spec import read_spec

        spec = read_spec(args.spec)
        if spec.kind != "relabel":
            raise ValueError(f"{args.spec}: kind is {spec.kind!r}, expected 'relabel'")
        overrides = {
            key: value
            for key, value in (
                ("address", args.address),
                ("llm_base_url", args.llm_base_url),
                ("seed", args.seed),
            )
            if value is not None
        }
        if args.retry_failed:
            overrides["retry_failed"] = True
        options = spec.options.model_copy(update=overrides)
    else:
        if not (args.input and args.output and args.with_):
            raise ValueError("give IN OUT and at least one --with NAME[:k=v,...], or --spec FILE")
        options = RelabelOptions(
            input=args.input,
            output=args.output,
            relabelers=args.with_,
            seed=args.seed or 0,
            address=args.address,
            llm_base_url=args.llm_base_url,
            retry_failed=args.retry_failed,
            command=shlex.join(["hindsight", *sys.argv[1:]]) if sys.argv[1:2] else None,
        )
    if options.address and options.address.startswith(("http://", "https://")):
        from jobs.spec import Spec
        from jobs.submit import submit_spec

        job_id = submit_spec(
            Spec("relabel", options.model_copy(update={"address": None}), "relabel"),
            options.address,
        )
        print(
            f"submitted {job_id}; follow it: hindsight jobs logs {job_id} --follow "
            f"--address {options.address}",
            file=sys.stderr,
        )
        print(job_id)
        return 0
    started = time.perf_counter()
    manifest = run_relabel(options)
    summary = {
        "output": storage.normalize(options.output),
        "dataset_id": manifest.dataset_id,
        "steps": manifest.steps,
        "episodes": manifest.episodes,
        "groups": {
            g.name: g.relabeler.report for g in manifest.groups if not g.inherited and g.relabeler
        },
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for name, report in summary["groups"].items():
        if report:
            print(f"  {name}: {json.dumps(report, default=str)[:300]}")
    seconds = time.perf_counter() - started
    print(
        f"relabeled {manifest.steps:,} steps, {manifest.episodes:,} episodes with "
        f"{', '.join(summary['groups'])} into {summary['output']} "
        f"(dataset {manifest.dataset_id}) in {seconds:.1f} s, {manifest.steps / seconds:,.0f} steps/s"
    )
    return 0


def relabelers_command(args: argparse.Namespace) -> int:
    rows = describe_relabelers()
    print(json.dumps(rows, indent=2) if args.json else format_relabelers(rows))
    return 0


def add_commands(subparsers) -> None:
    relabel = subparsers.add_parser(
        "relabel",
        help="attach relabeler column groups to a dataset version (a new version)",
        description="Apply relabelers in order; writes a new version OUT that references IN.",
    )
    relabel.add_argument("input", nargs="?", help="parent dataset version")
    relabel.add_argument("output", nargs="?", help="new dataset version to write")
    relabel.add_argument(
        "--with",
        dest="with_",
        action="append",
        metavar="NAME[:k=v,...]",
        help="a relabeler and its parameters (repeatable; list values separated by ';')",
    )
    relabel.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    relabel.add_argument(
        "--address",
        default=None,
        help="Ray address (ray://HOST:10001, HOST:6379, auto), or a dashboard http:// "
        "address to submit the job; default: embedded Ray",
    )
    relabel.add_argument("--spec", default=None, help="a YAML spec (kind: relabel)")
    relabel.add_argument(
        "--llm-base-url", default=None, help="base_url of relabelers that call an LLM"
    )
    relabel.add_argument(
        "--retry-failed",
        action="store_true",
        help="retry_failed=true on relabelers that support it",
    )
    relabel.add_argument(
        "--json", action="store_true", help="print the summary (with relabeler reports) as JSON"
    )
    relabel.add_argument("--debug", action="store_true", help="show tracebacks")
    relabel.set_defaults(handler=relabel_command)

    listing = subparsers.add_parser(
        "relabelers", help="list installed relabelers with their parameters and columns"
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=relabelers_command)
