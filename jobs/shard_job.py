"""`hindsight shard`: a dataset version -> WebDataset shards of training windows.

    hindsight shard data/pendulum-rl s3://bucket/shards/pendulum-v3 \\
        --condition return_to_go,skill,description --window 20 --shard-steps 200000 --seed 0

Two passes on Ray (embedded by default, `--address` for a cluster), both through
`map_parts`:
1. (only with categorical or text conditions) every part counts its labels / words; the
   driver builds the vocabularies.
2. every task (consecutive parts holding about `--shard-steps` steps or more) reads its
   episodes, shuffles them (seeded), deals them into shards, cuts blocks and writes the tars;
   it returns the shard sizes and the numeric statistics.
The driver writes `index.json` last. Same dataset, options and seed -> byte-identical shards.
"""

from __future__ import annotations

import functools
import shlex
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engine import shards, storage
from engine.dataset import Dataset, DatasetError, open_dataset, read_schema
from schemas.manifest import MANIFEST_NAME, now_iso
from schemas.shard_index import (
    INDEX_NAME,
    ActionInfo,
    ConditionInfo,
    ObservationInfo,
    ReturnInfo,
    RewardInfo,
    ShardIndex,
    ShardInfo,
)

STAGING_MARKER = storage.STAGING_MARKER


class ShardOptions(BaseModel):
    """Options of `hindsight shard` (and of a `shard` step in a job spec)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="Dataset version to shard (local path or s3://).")
    out: str = Field(description="Shard directory to create (local path or s3://); must be new.")
    condition: list[str] = Field(
        default_factory=list,
        description="Conditioning columns (step or episode level) to store with each window.",
    )
    window: int = Field(20, ge=1, description="Steps per training window.")
    stride: int = Field(
        1, ge=1, description="A window ends every `stride` steps, counted back from the last."
    )
    shard_steps: int = Field(200_000, ge=1, description="About this many steps per shard.")
    block_steps: int = Field(
        2048, ge=1, description="About this many steps per tar sample (block of episodes)."
    )
    seed: int = Field(0, description="Seed of the episode shuffle across shards.")
    text: list[str] | None = Field(
        None,
        description="String columns holding free text (default: description(s), "
        "instruction(s) and columns written by the `language` relabeler).",
    )
    max_tokens: int = Field(64, ge=1, description="Most tokens kept per text.")
    max_words: int = Field(20000, ge=3, description="Largest text vocabulary (with pad/unk).")
    address: str | None = Field(None, description="Ray cluster address (default: embedded Ray).")
    command: str | None = Field(None, description="Command line recorded in the index.")


# ---------------------------------------------------------------- planning (driver)


def resolve_conditions(dataset: Dataset, options: ShardOptions) -> list[shards.ConditionColumn]:
    """Type and level of each requested conditioning column, from the Parquet schemas."""
    resolved = []
    for name in options.condition:
        head, _, rest = name.partition(".")
        for level in ("steps", "episodes"):
            if head in dataset.columns(level):
                break
        else:
            raise KeyError(
                f"{dataset.uri}: no column {name!r} to condition on; step columns: "
                f"{', '.join(dataset.columns('steps'))}; episode columns: "
                f"{', '.join(dataset.columns('episodes'))}"
            )
        group = dataset.group_of(head, level)
        data_type = read_schema(dataset.file_uris(group, level)[0]).field(head).type
        for part in rest.split(".") if rest else []:
            data_type = data_type.field(part).type
        relabeler = group.relabeler
        is_text = (
            name in options.text
            if options.text is not None
            else name in shards.TEXT_COLUMNS
            or (relabeler is not None and relabeler.name == "language")
        )
        goals = None
        if relabeler is not None and relabeler.name == "goals" and name == "hindsight_goal":
            goals = int(relabeler.params.get("k", 1))
        resolved.append(
            shards.classify_condition(name, data_type, level, text=is_text, goals_per_step=goals)
        )
    return resolved


def plan_tasks(dataset: Dataset, shard_steps: int) -> list[dict[str, Any]]:
    """Consecutive parts grouped until each group holds >= shard_steps steps; each group is
    dealt into round(steps / shard_steps) shards (at least one)."""
    groups: list[list[int]] = []
    steps: list[int] = []
    for index, part in enumerate(dataset.manifest.parts):
        if not groups or steps[-1] >= shard_steps:
            groups.append([])
            steps.append(0)
        groups[-1].append(index)
        steps[-1] += part.steps
    if len(groups) > 1 and steps[-1] < shard_steps / 2:
        groups[-2].extend(groups.pop())
        steps[-2] += steps.pop()
    tasks, first_shard = [], 0
    for task, (parts, total) in enumerate(zip(groups, steps)):
        count = max(1, round(total / shard_steps))
        tasks.append({"index": task, "parts": parts, "first_shard": first_shard, "shards": count})
        first_shard += count
    return tasks


def begin_shards(uri: str) -> str:
    """Prepare a new shard directory: refuse a committed one or a foreign non-empty one."""
    uri = storage.normalize(uri)
    if storage.exists(storage.join(uri, INDEX_NAME)):
        raise ValueError(f"{uri} already holds committed shards (index.json); write to a new path")
    leftovers = storage.list_files(uri)
    if leftovers and storage.join(uri, STAGING_MARKER) not in leftovers:
        raise ValueError(f"{uri} exists and is not empty; choose a new output path for shards")
    storage.delete_tree(uri)
    storage.start_staging(uri)
    return uri


# ---------------------------------------------------------------- Ray tasks


def _task_context(task: dict[str, Any]):
    dataset = open_dataset(task["dataset"])
    conditions = [shards.ConditionColumn(**c) for c in task["conditions"]]
    infos = {name: ConditionInfo(**info) for name, info in task["infos"].items()}
    return dataset, conditions, infos


def vocabulary_task(task: dict[str, Any]) -> dict[str, Any]:
    """Pass one: label and word counts of one part's categorical and text conditions."""
    dataset, conditions, _ = _task_context(task)
    summaries = {}
    for condition in conditions:
        head = condition.name.partition(".")[0]
        table = dataset.read_part(task["part"], condition.level, [head])
        column = shards.cols.column_by_path(table, condition.name)
        summaries[condition.name] = shards.summarize_vocabulary(column, condition)
    return {"summaries": summaries, "steps": dataset.manifest.parts[task["part"]].steps}


def write_task(task: dict[str, Any]) -> dict[str, Any]:
    """Pass two: read the task's parts, shuffle its episodes into shards, write the tars."""
    dataset, conditions, infos = _task_context(task)
    episodes = shards.concat_episodes(
        [shards.read_part_episodes(dataset, part, conditions, infos) for part in task["parts"]]
    )
    written = []
    groups = shards.shuffled_shards(episodes, task["shards"], task["seed"], task["index"])
    for offset, group in enumerate(groups):
        built = shards.build_shard(group, task["window"], task["stride"], task["block_steps"])
        name = f"shard-{task['first_shard'] + offset:05d}.tar"
        # A task of a shard run that died must not overwrite the re-run's shards.
        shards.put_object(
            storage.join(task["out"], name),
            built.data,
            before_commit=functools.partial(
                storage.check_staging, task["out"], task["staging_token"]
            ),
        )
        written.append(
            ShardInfo(
                name=name,
                windows=built.windows,
                episodes=built.episodes,
                steps=built.steps,
                blocks=built.blocks,
                bytes=len(built.data),
                sha256=storage.sha256_bytes(built.data),
            ).model_dump()
        )
    return {
        "shards": written,
        "statistics": shards.numeric_summary(episodes, conditions),
        "steps": int(episodes.lengths.sum()),
    }


# ---------------------------------------------------------------- the job


def _run_tasks(function, tasks: list[dict[str, Any]], description: str, total: int):
    """map_parts, with a dataset or key error inside a task reported as a ShardError."""
    from jobs.runtime import map_parts

    try:
        return map_parts(function, tasks, description=description, total=total)
    except (DatasetError, KeyError) as error:
        raise shards.ShardError(str(error)) from error


def run_shard(options: ShardOptions) -> ShardIndex:
    """Write the shards of `options.dataset` to `options.out` and commit index.json last."""
    from jobs.runtime import init_ray

    if not options.condition and options.text:
        raise ValueError("--text names text columns among --condition; give --condition too")
    dataset = open_dataset(options.dataset)
    conditions = resolve_conditions(dataset, options)
    init_ray(options.address)
    out = begin_shards(options.out)
    token = storage.staging_token(out)  # this run's: tasks of another run cannot write
    common = {
        "dataset": dataset.uri,
        "conditions": [c.to_dict() for c in conditions],
    }

    # Pass one: vocabularies of categorical and text columns.
    infos: dict[str, ConditionInfo] = {}
    labelled = [c for c in conditions if c.type in ("categorical", "text")]
    if labelled:
        results = _run_tasks(
            vocabulary_task,
            [
                {
                    **common,
                    "conditions": [c.to_dict() for c in labelled],
                    "infos": {},
                    "index": i,
                    "part": i,
                }
                for i in range(dataset.num_parts)
            ],
            "shard vocabularies",
            dataset.manifest.steps,
        )
        for condition in labelled:
            group = dataset.group_of(condition.name.partition(".")[0], condition.level)
            report = group.relabeler.report if group.relabeler else {}
            infos[condition.name] = shards.combine_vocabulary(
                [r["summaries"][condition.name] for r in results],
                condition,
                ordered_labels=report.get("labels"),
                max_words=options.max_words,
                max_tokens=options.max_tokens,
            )

    # Pass two: shards.
    tasks = [
        {
            **common,
            **task,
            "infos": {name: info.model_dump() for name, info in infos.items()},
            "out": out,
            "staging_token": token,
            "seed": options.seed,
            "window": options.window,
            "stride": options.stride,
            "block_steps": options.block_steps,
        }
        for task in plan_tasks(dataset, options.shard_steps)
    ]
    results = _run_tasks(write_task, tasks, "shard", dataset.manifest.steps)
    shard_infos = [ShardInfo(**s) for r in results for s in r["shards"]]
    statistics = shards.combine_numeric([r["statistics"] for r in results], conditions)
    for condition in conditions:
        if condition.type in ("scalar", "vector"):
            infos[condition.name] = ConditionInfo(
                type=condition.type,
                level=condition.level,
                dim=condition.dim,
                count=condition.count,
                **statistics[f"cond.{condition.name}"],
            )
    observation_dim = len(statistics["observation"]["mean"])
    manifest_bytes = storage.read_bytes(storage.join(dataset.uri, MANIFEST_NAME))
    index = ShardIndex(
        source_dataset_id=dataset.manifest.dataset_id,
        source_uri=dataset.uri,
        source_manifest_sha256=storage.sha256_bytes(manifest_bytes),
        seed=options.seed,
        window=options.window,
        stride=options.stride,
        block_steps=options.block_steps,
        created_at=now_iso(),
        command=options.command or "run_shard " + options.model_dump_json(exclude={"command"}),
        windows=sum(s.windows for s in shard_infos),
        episodes=sum(s.episodes for s in shard_infos),
        steps=sum(s.steps for s in shard_infos),
        shards=shard_infos,
        observation=ObservationInfo(shape=[observation_dim], **statistics["observation"]),
        action=ActionInfo(**statistics.get("action", {"kind": "continuous", "dim": 0})),
        reward=RewardInfo(**statistics["reward"]),
        episode_return=ReturnInfo(**statistics["episode_return"]),
        conditions={c.name: infos[c.name] for c in conditions},
        metadata=dataset.manifest.metadata,
    )
    storage.check_staging(out, token)  # still this run's directory: commit
    storage.write_bytes(storage.join(out, INDEX_NAME), index.to_json().encode())
    storage.end_staging(out)
    return index


# ---------------------------------------------------------------- command line


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "shard",
        help="write WebDataset shards of training windows (local or s3://)",
        description=__doc__.split("\n\n")[0],
    )
    fields = ShardOptions.model_fields
    parser.add_argument("dataset", help=fields["dataset"].description)
    parser.add_argument("out", help=fields["out"].description)
    parser.add_argument(
        "--condition", default="", help=fields["condition"].description + " Comma-separated."
    )
    for name in (
        "window",
        "stride",
        "shard_steps",
        "block_steps",
        "seed",
        "max_tokens",
        "max_words",
    ):
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=fields[name].default,
            help=fields[name].description,
        )
    parser.add_argument(
        "--text", default=None, help=fields["text"].description + " Comma-separated."
    )
    parser.add_argument("--address", default=None, help=fields["address"].description)
    parser.set_defaults(handler=_handle)


def _command_line(args) -> str:
    words = ["hindsight", "shard", args.dataset, args.out]
    if args.condition:
        words += ["--condition", args.condition]
    for name in ("window", "stride", "shard_steps", "block_steps", "seed"):
        words += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if args.text is not None:
        words += ["--text", args.text]
    return shlex.join(words)


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [item.strip() for item in text.split(",") if item.strip()]


def _handle(args) -> int:
    options = ShardOptions(
        dataset=args.dataset,
        out=args.out,
        condition=_split(args.condition) or [],
        window=args.window,
        stride=args.stride,
        shard_steps=args.shard_steps,
        block_steps=args.block_steps,
        seed=args.seed,
        text=_split(args.text),
        max_tokens=args.max_tokens,
        max_words=args.max_words,
        address=args.address,
        command=_command_line(args),
    )
    index = run_shard(options)
    print(
        f"wrote {len(index.shards)} shards ({index.windows} windows, {index.steps} steps, "
        f"{sum(s.bytes for s in index.shards) / 1e6:.1f} MB) to {storage.normalize(options.out)}"
    )
    return 0
