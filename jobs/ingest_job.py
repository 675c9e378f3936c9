"""Make datasets: `hindsight collect`, `ingest`, `info` and `materialize`.

Each command is one pydantic Options model and one plain function `run_<command>(options)`
that the CLI and YAML job specs both call. Collect, ingest and materialize write a new
dataset version part by part on Ray (`jobs.runtime.map_parts`: an embedded local Ray by
default, a cluster with `--address`) and commit it last; if anything fails, the staged
files are removed and nothing that looks like a dataset is left.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine import storage
from engine.dataset import open_dataset
from engine.ingest import write_part
from engine.writer import (
    DEFAULT_PART_STEPS,
    VersionWriter,
    WrittenPart,
    base_manifest,
    check_new_output,
)
from jobs.runtime import RayExecutor, init_ray
from schemas.manifest import SKIPPED_REPORT_NAME, Manifest


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CollectOptions(_Options):
    env_id: str = Field(description="Gymnasium environment id, e.g. Pendulum-v1.")
    output: str = Field(description="New dataset directory (local path or s3://bucket/prefix).")
    episodes: int = Field(100, ge=1, description="Number of episodes to roll out.")
    noise: list[float] = Field(
        default_factory=lambda: [0.0],
        description="Epsilon-noise levels; episode e uses noise[e mod len(noise)].",
    )
    policy: str = Field(
        "heuristic",
        description="random, heuristic (built-in for classic control and PointGoal) or "
        "module:function called as function(observation) -> action.",
    )
    seed: int = Field(0, description="Base seed; episode e is seeded from (seed, e).")
    max_steps: int | None = Field(None, ge=1, description="Override the env's time limit.")
    episodes_per_part: int = Field(
        50, ge=1, description="Episodes per part (one Ray task and one file per part)."
    )
    address: str | None = Field(None, description="Ray address; embedded local Ray if unset.")

    @field_validator("noise")
    @classmethod
    def _noise_is_a_probability(cls, noise: list[float]) -> list[float]:
        if not noise or any(not 0.0 <= level <= 1.0 for level in noise):
            raise ValueError(f"noise levels are probabilities in [0, 1], got {noise}")
        return noise


class IngestOptions(_Options):
    source: str = Field(
        description="Input: a D4RL .h5/.hdf5/.npz file, a Minari dataset directory, or "
        "Parquet/JSONL step tables (a file, a directory or a glob)."
    )
    output: str = Field(description="New dataset directory (local path or s3://bucket/prefix).")
    format: Literal["d4rl", "minari", "parquet", "jsonl"] | None = Field(
        None, description="Input format; guessed from the path if unset."
    )
    env_id: str | None = Field(None, description="Environment id recorded per episode.")
    on_error: Literal["fail", "skip"] = Field(
        "fail",
        description="fail: write nothing if any episode is bad; skip: ingest the others and "
        f"write {SKIPPED_REPORT_NAME} saying what was skipped and why.",
    )
    part_steps: int = Field(
        DEFAULT_PART_STEPS, ge=1, description="Steps per part (whole episodes; one Ray task each)."
    )
    episode_column: str = Field("episode_id", description="Episode id column of step tables.")
    step_column: str = Field("t", description="Step index column of step tables.")
    address: str | None = Field(None, description="Ray address; embedded local Ray if unset.")


class InfoOptions(_Options):
    dataset: str = Field(description="Dataset directory (local path or s3://bucket/prefix).")
    json_output: bool = Field(False, description="Print JSON instead of text.")
    bins: int = Field(10, ge=1, description="Bins of the return histograms.")
    verify: bool = Field(
        False,
        description="Also check every file's sha256 against the manifest (reads every byte).",
    )


class MaterializeOptions(_Options):
    dataset: str = Field(description="Dataset version to copy (with all its column groups).")
    output: str = Field(description="New self-contained dataset with a single column group.")
    address: str | None = Field(None, description="Ray address; embedded local Ray if unset.")


def command_line(name: str, options: BaseModel) -> str:
    """A readable record of the command for the manifest (never holds secrets)."""
    return f"hindsight {name} " + json.dumps(
        options.model_dump(exclude_defaults=True), sort_keys=True
    )


def refuse_committed_output(output: str) -> None:
    """Fail before any work when the output is already a committed version (immutable)."""
    check_new_output(output)


def _write_version(
    writer: VersionWriter,
    tasks: list[dict[str, Any]],
    part_function: Callable[[dict[str, Any]], WrittenPart],
    *,
    description: str,
    total: int | None,
    finish: Callable[[list[WrittenPart]], Manifest],
) -> Manifest:
    """Write all parts of a new version on Ray, then `finish` (the manifest) and commit.
    On any failure the staged files are removed, so no half-written version is left."""
    with writer:
        tasks = [{**task, "writer": writer} for task in tasks]
        parts = RayExecutor().map(part_function, tasks, description=description, total=total)
        manifest = finish(parts)
        writer.commit(manifest)
    return manifest


# ---------------------------------------------------------------- collect


def run_collect(options: CollectOptions, command: str | None = None) -> Manifest:
    """Roll out a gymnasium environment at each noise level into a committed dataset."""
    from engine.collect import collect_part, describe_spaces, load_policy, scalar_info_keys

    refuse_committed_output(options.output)
    # Fail early: an unknown env id first (gymnasium suggests the near miss), then the policy.
    info_keys = scalar_info_keys(options.env_id, options.max_steps)
    load_policy(options.policy, options.env_id)
    init_ray(options.address)
    writer = VersionWriter(options.output)
    tasks = [
        {
            "index": index,
            "env_id": options.env_id,
            "policy": options.policy,
            "episode_start": start,
            "episode_stop": min(start + options.episodes_per_part, options.episodes),
            "noise_levels": options.noise,
            "seed": options.seed,
            "max_steps": options.max_steps,
            "info_keys": info_keys,
        }
        for index, start in enumerate(range(0, options.episodes, options.episodes_per_part))
    ]
    metadata = {
        "env_id": options.env_id,
        "policy": options.policy,
        "noise_levels": options.noise,
        "seed": options.seed,
        **describe_spaces(options.env_id, options.max_steps),
    }
    return _write_version(
        writer,
        tasks,
        collect_part,
        description=f"collect {options.env_id}",
        total=None,
        finish=lambda parts: base_manifest(
            writer.uri,
            parts,
            operation="collect",
            command=command or command_line("collect", options),
            metadata=metadata,
            details={"episodes": options.episodes, "noise": options.noise},
        ),
    )


# ---------------------------------------------------------------- ingest


def run_ingest(options: IngestOptions, command: str | None = None) -> Manifest:
    """Validate a source (nothing written on errors unless skipping), then write it in
    parts on Ray and commit."""
    from engine.ingest import ingest_part, part_tasks, plan_ingest, write_skipped_report

    refuse_committed_output(options.output)
    plan = plan_ingest(
        options.source,
        format=options.format,
        env_id=options.env_id,
        on_error=options.on_error,
        part_steps=options.part_steps,
        episode_column=options.episode_column,
        step_column=options.step_column,
    )
    init_ray(options.address)
    writer = VersionWriter(options.output)
    metadata: dict[str, Any] = {
        "env_id": plan.env_id,
        "source_format": plan.format,
        "source": plan.source,
        "episode_info_columns": plan.episode_info_columns,
        **plan.metadata,
    }
    if plan.skipped or plan.truncated_tails:
        metadata.update(
            skipped_report=SKIPPED_REPORT_NAME,
            skipped_episodes=plan.skipped_report()["skipped_episodes"],
            truncated_tails=len(plan.truncated_tails),
        )

    def finish(parts: list[WrittenPart]) -> Manifest:
        if plan.skipped or plan.truncated_tails:
            write_skipped_report(writer, plan, SKIPPED_REPORT_NAME)
        return base_manifest(
            writer.uri,
            parts,
            operation="ingest",
            command=command or command_line("ingest", options),
            metadata=metadata,
            details={"format": plan.format, "source": plan.source},
        )

    return _write_version(
        writer,
        part_tasks(plan, writer),
        ingest_part,
        description=f"ingest {plan.format}",
        total=plan.steps,
        finish=finish,
    )


# ---------------------------------------------------------------- info


def run_info(options: InfoOptions) -> dict[str, Any]:
    """The dataset summary as a JSON-able dict (see engine.info)."""
    from engine.info import dataset_info

    return dataset_info(options.dataset, bins=options.bins, verify=options.verify)


# ---------------------------------------------------------------- materialize


def materialize_part(task: dict[str, Any]) -> WrittenPart:
    """Zip every group of one part into a single base part of the new dataset."""
    source = open_dataset(task["source"])
    steps = source.read_part(task["index"], "steps")
    episodes = source.read_part(task["index"], "episodes")
    return write_part(task, steps, episodes)


def run_materialize(options: MaterializeOptions, command: str | None = None) -> Manifest:
    """A self-contained copy of a version with all its columns in one `base` group."""
    refuse_committed_output(options.output)
    source = open_dataset(options.dataset)
    init_ray(options.address)
    writer = VersionWriter(options.output)
    tasks = [{"index": i, "source": source.uri} for i in range(source.num_parts)]
    metadata = {
        **source.manifest.metadata,
        "materialized_from": {
            "uri": source.uri,
            "dataset_id": source.manifest.dataset_id,
            "groups": [
                {
                    "name": g.name,
                    "relabeler": g.relabeler.model_dump() if g.relabeler else None,
                }
                for g in source.manifest.groups
            ],
        },
    }
    return _write_version(
        writer,
        tasks,
        materialize_part,
        description="materialize",
        total=source.manifest.steps,
        finish=lambda parts: base_manifest(
            writer.uri,
            parts,
            operation="materialize",
            command=command or command_line("materialize", options),
            metadata=metadata,
            parent=source,
        ),
    )


# ---------------------------------------------------------------- command line


def _noise_levels(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"--noise: expected numbers like 0,0.5,1 ({error})"
        ) from error


def _summary(verb: str, manifest: Manifest, uri: str, seconds: float) -> str:
    rate = manifest.steps / seconds if seconds > 0 else 0.0
    return (
        f"{verb} {manifest.episodes:,} episodes, {manifest.steps:,} steps into {uri} "
        f"(dataset {manifest.dataset_id}, {len(manifest.parts)} part(s)) in {seconds:.1f} s, "
        f"{rate:,.0f} steps/s"
    )


def _cli_command(args: argparse.Namespace) -> str:
    import sys

    return " ".join(["hindsight", *sys.argv[1:]]) if sys.argv[1:] else f"hindsight {args.command}"


def _collect(args: argparse.Namespace) -> int:
    options = CollectOptions(
        env_id=args.env_id,
        output=args.output,
        episodes=args.episodes,
        noise=args.noise,
        policy=args.policy,
        seed=args.seed,
        max_steps=args.max_steps,
        episodes_per_part=args.episodes_per_part,
        address=args.address,
    )
    started = time.perf_counter()
    manifest = run_collect(options, _cli_command(args))
    print(_summary("collected", manifest, options.output, time.perf_counter() - started))
    return 0


def _ingest(args: argparse.Namespace) -> int:
    options = IngestOptions(
        source=args.source,
        output=args.output,
        format=args.format,
        env_id=args.env_id,
        on_error=args.on_error,
        part_steps=args.part_steps,
        episode_column=args.episode_column,
        step_column=args.step_column,
        address=args.address,
    )
    started = time.perf_counter()
    manifest = run_ingest(options, _cli_command(args))
    line = _summary("ingested", manifest, options.output, time.perf_counter() - started)
    if manifest.metadata.get("skipped_report"):
        line += (
            f"; skipped {manifest.metadata['skipped_episodes']} episode(s), "
            f"{manifest.metadata['truncated_tails']} truncated tail(s): see "
            f"{storage.join(options.output, SKIPPED_REPORT_NAME)}"
        )
    print(line)
    return 0


def _info(args: argparse.Namespace) -> int:
    from engine.info import format_info

    options = InfoOptions(
        dataset=args.dataset, json_output=args.json, bins=args.bins, verify=args.verify
    )
    info = run_info(options)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_info(info))
        print(
            f"\n{info['dataset_id']}: {info['steps']:,} steps, {info['episodes']:,} episodes, "
            f"{len(info['groups'])} column group(s)"
        )
        if info["verified_files"] is not None:
            print(f"verified: all {info['verified_files']} files match their sha256")
    return 0


def _materialize(args: argparse.Namespace) -> int:
    options = MaterializeOptions(dataset=args.dataset, output=args.output, address=args.address)
    started = time.perf_counter()
    manifest = run_materialize(options, _cli_command(args))
    print(_summary("materialized", manifest, options.output, time.perf_counter() - started))
    return 0


def _help(model: type[BaseModel], name: str) -> str:
    return model.model_fields[name].description or ""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    collect = subparsers.add_parser(
        "collect", help="roll out a gymnasium environment into a new dataset"
    )
    collect.add_argument("env_id", help=_help(CollectOptions, "env_id"))
    collect.add_argument("output", help=_help(CollectOptions, "output"))
    collect.add_argument(
        "--episodes", type=int, default=100, help=_help(CollectOptions, "episodes")
    )
    collect.add_argument(
        "--noise", type=_noise_levels, default=[0.0], help=_help(CollectOptions, "noise")
    )
    collect.add_argument("--policy", default="heuristic", help=_help(CollectOptions, "policy"))
    collect.add_argument("--seed", type=int, default=0, help=_help(CollectOptions, "seed"))
    collect.add_argument("--max-steps", type=int, help=_help(CollectOptions, "max_steps"))
    collect.add_argument(
        "--episodes-per-part",
        type=int,
        default=50,
        help=_help(CollectOptions, "episodes_per_part"),
    )
    collect.add_argument("--address", help=_help(CollectOptions, "address"))
    collect.set_defaults(handler=_collect)

    ingest = subparsers.add_parser("ingest", help="ingest trajectories into a new dataset")
    ingest.add_argument("source", help=_help(IngestOptions, "source"))
    ingest.add_argument("output", help=_help(IngestOptions, "output"))
    ingest.add_argument(
        "--format",
        choices=["d4rl", "minari", "parquet", "jsonl"],
        help=_help(IngestOptions, "format"),
    )
    ingest.add_argument("--env-id", help=_help(IngestOptions, "env_id"))
    ingest.add_argument(
        "--on-error",
        choices=["fail", "skip"],
        default="fail",
        help=_help(IngestOptions, "on_error"),
    )
    ingest.add_argument(
        "--part-steps",
        type=int,
        default=DEFAULT_PART_STEPS,
        help=_help(IngestOptions, "part_steps"),
    )
    ingest.add_argument(
        "--episode-column", default="episode_id", help=_help(IngestOptions, "episode_column")
    )
    ingest.add_argument("--step-column", default="t", help=_help(IngestOptions, "step_column"))
    ingest.add_argument("--address", help=_help(IngestOptions, "address"))
    ingest.set_defaults(handler=_ingest)

    info = subparsers.add_parser("info", help="counts, schema, returns and history of a dataset")
    info.add_argument("dataset", help=_help(InfoOptions, "dataset"))
    info.add_argument("--json", action="store_true", help=_help(InfoOptions, "json_output"))
    info.add_argument("--bins", type=int, default=10, help=_help(InfoOptions, "bins"))
    info.add_argument("--verify", action="store_true", help=_help(InfoOptions, "verify"))
    info.set_defaults(handler=_info)

    materialize = subparsers.add_parser(
        "materialize", help="write a self-contained single-group copy of a dataset"
    )
    materialize.add_argument("dataset", help=_help(MaterializeOptions, "dataset"))
    materialize.add_argument("output", help=_help(MaterializeOptions, "output"))
    materialize.add_argument("--address", help=_help(MaterializeOptions, "address"))
    materialize.set_defaults(handler=_materialize)
