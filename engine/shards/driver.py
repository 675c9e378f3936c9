"""The shard job's driver: a dataset version -> a committed directory of shards.

    index = write_shards(open_dataset("data/pendulum-rl"), ShardSettings(condition=("skill",)),
                         "s3://bucket/shards/pendulum-v3", executor=InProcess(), command="...")

Two passes, each one `executor.map` over typed tasks (plain Ray tasks on a cluster, or this
process):
1. (only with categorical or text conditions) every part counts its labels / words
   (`vocabulary_task`); the driver builds the vocabularies.
2. every task (consecutive parts holding about `shard_steps` steps or more, `plan_tasks`)
   reads its episodes, shuffles them (seeded), deals them into shards, cuts blocks and
   writes the tars through the version writer (`write_task`); it returns the shard sizes and
   the numeric statistics.
The driver commits `index.json` last (`VersionWriter(..., commit_file=INDEX_NAME)`): a job
that fails leaves nothing behind, a committed directory is refused before any work. Same
dataset, settings and seed -> byte-identical shards, whichever executor runs the tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from engine import storage
from engine.dataset import Dataset, DatasetError, open_dataset
from engine.executor import Executor
from engine.shards import frames as frames_module
from engine.shards.conditions import (
    TEXT_COLUMNS,
    ConditionColumn,
    classify_condition,
    combine_vocabulary,
    embedding_info,
    summarize_vocabulary,
)
from engine.shards.episodes import concat_episodes, read_part_episodes, shuffled_shards
from engine.shards.exclude import (
    Exclusion,
    StepFilter,
    combine_filters,
    kept_rows,
    plan_exclusion,
    read_filter,
)
from engine.shards.frames import (
    load_frames,
    resolve_cameras,
    stored_frame_bytes,
)
from engine.shards.statistics import combine_numeric, numeric_summary
from engine.shards.tar import build_shard
from engine.writer import VersionWriter, check_new_output
from schemas import steps as cols
from schemas.frames import CameraInfo
from schemas.manifest import MANIFEST_NAME, now_iso
from schemas.shard_index import (
    INDEX_NAME,
    ActionInfo,
    ConditionInfo,
    ObservationInfo,
    ReturnInfo,
    RewardInfo,
    ShardError,
    ShardIndex,
    ShardInfo,
    condition_member,
    shard_name,
)


@dataclass(frozen=True)
class ShardSettings:
    """How to cut a dataset into shards (the engine's side of `hindsight shard`)."""

    condition: tuple[str, ...] = ()
    """Conditioning columns (step or episode level, or a struct field) stored per window."""
    window: int = 20
    """Steps per training window."""
    stride: int = 1
    """A window ends every `stride` steps, counted back from the episode's last step."""
    shard_steps: int = 200_000
    """About this many steps per shard."""
    block_steps: int = 2048
    """About this many steps per tar sample (block of episodes)."""
    seed: int = 0
    """Seed of the episode shuffle across shards."""
    text: tuple[str, ...] | None = None
    """String columns holding free text (None: description(s), instruction(s) and columns
    of the `language` relabeler)."""
    max_tokens: int = 64
    """Most tokens kept per text."""
    max_words: int = 20000
    """Largest text vocabulary (with pad/unk)."""
    cameras: tuple[str, ...] | None = None
    """Cameras whose frames the shards carry (None: every camera of the dataset)."""
    frame_stack: int = 1
    """Frames the loader stacks per step (recorded in the index; chunks of long episodes
    carry the history it needs)."""
    exclude: str | None = None
    """Polars SQL predicate: matching steps stay out of the shards (engine/shards/exclude.py)."""

    def __post_init__(self) -> None:
        small = {
            name: getattr(self, name)
            for name in (
                "window",
                "stride",
                "shard_steps",
                "block_steps",
                "max_tokens",
                "frame_stack",
            )
            if getattr(self, name) < 1
        }
        if small or self.max_words < 3:
            raise ValueError(
                f"shard settings out of range: {small or {'max_words': self.max_words}} "
                "(window, stride, shard steps, block steps, max tokens and frame stack >= 1; "
                "max words >= 3)"
            )
        if self.text and not self.condition:
            raise ValueError("--text names text columns among --condition; give --condition too")


# ---------------------------------------------------------------- planning


def resolve_conditions(
    dataset: Dataset, names: Sequence[str], text: Sequence[str] | None = None
) -> list[ConditionColumn]:
    """Type and level of each requested conditioning column, from the Parquet schemas.

    Raises KeyError naming the column and the dataset's columns for an unknown one."""
    resolved = []
    for name in names:
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
        data_type = dataset.field(head, level).type  # derived columns too (engine/derived.py)
        for part in rest.split(".") if rest else []:
            data_type = data_type.field(part).type
        relabeler = group.relabeler
        is_text = (
            name in text
            if text is not None
            else name in TEXT_COLUMNS or (relabeler is not None and relabeler.name == "language")
        )
        goals = None
        if relabeler is not None and relabeler.name == "goals" and name == "hindsight_goal":
            goals = int(relabeler.params.get("k", 1))
        condition = classify_condition(name, data_type, level, text=is_text, goals_per_step=goals)
        if condition.type == "vector" and relabeler is not None and relabeler.name == "embed":
            condition = replace(condition, embedded_text=True)
        resolved.append(condition)
    return resolved


@dataclass(frozen=True)
class ShardTask:
    """One write task's share: dataset parts `parts`, dealt into shards `first_shard`,
    `first_shard + 1`, ... (`shards` of them). `index` seeds its shuffle."""

    index: int
    parts: tuple[int, ...]
    first_shard: int
    shards: int


def plan_tasks(dataset: Dataset, shard_steps: int, frames: bool = False) -> list[ShardTask]:
    """Consecutive parts grouped until each group holds >= shard_steps steps; each group is
    dealt into round(steps / shard_steps) shards (at least one), and with `frames` into
    enough that none holds much more than MAX_SHARD_FRAME_BYTES of them."""
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
        last = steps.pop()  # not `steps[-2] += steps.pop()`: that stores past the popped end
        steps[-1] += last
    tasks, first_shard = [], 0
    for task, (parts, total) in enumerate(zip(groups, steps)):
        count = max(1, round(total / shard_steps))
        if frames:
            frame_bytes = stored_frame_bytes(dataset, parts)
            count = max(count, -(-frame_bytes // frames_module.MAX_SHARD_FRAME_BYTES))
        tasks.append(ShardTask(task, tuple(parts), first_shard, count))
        first_shard += count
    return tasks


# ---------------------------------------------------------------- pass one: vocabularies


@dataclass(frozen=True)
class VocabularyTask:
    """Count the labels / words of the categorical and text `conditions` in one part."""

    dataset: str
    part: int
    conditions: tuple[ConditionColumn, ...]
    exclusion: Exclusion | None = None


@dataclass(frozen=True)
class VocabularyResult:
    summaries: dict[str, dict[str, Any]]  # by condition name: summarize_vocabulary's output
    steps: int  # the part's steps (moves the progress bar)


def vocabulary_task(task: VocabularyTask) -> VocabularyResult:
    """Pass one: label and word counts of one part's categorical and text conditions."""
    dataset = open_dataset(task.dataset)
    # The steps the shards will hold: a held-out text adds no word to the vocabulary.
    kept = read_filter(dataset, task.part, task.conditions, task.exclusion)
    summaries = {}
    for condition in task.conditions:
        head = condition.name.partition(".")[0]
        table = dataset.read_part(task.part, condition.level, [head])
        column = kept_rows(cols.column_by_path(table, condition.name), condition.level, kept)
        where = f"{dataset.uri} part {task.part}"
        summaries[condition.name] = summarize_vocabulary(column, condition, where)
    return VocabularyResult(summaries, dataset.manifest.parts[task.part].steps)


def vocabularies(
    dataset: Dataset,
    conditions: Sequence[ConditionColumn],
    settings: ShardSettings,
    executor: Executor,
    exclusion: Exclusion | None = None,
) -> dict[str, ConditionInfo]:
    """The index entries of the categorical and text conditions (one pass over the parts)."""
    labelled = tuple(c for c in conditions if c.type in ("categorical", "text"))
    if not labelled:
        return {}
    tasks = [
        VocabularyTask(dataset.uri, part, labelled, exclusion) for part in range(dataset.num_parts)
    ]
    results = _run(executor, vocabulary_task, tasks, "shard vocabularies", dataset.manifest.steps)
    infos = {}
    for condition in labelled:
        group = dataset.group_of(condition.name.partition(".")[0], condition.level)
        report = group.relabeler.report if group.relabeler else {}
        infos[condition.name] = combine_vocabulary(
            [result.summaries[condition.name] for result in results],
            condition,
            ordered_labels=report.get("labels"),
            max_words=settings.max_words,
            max_tokens=settings.max_tokens,
        )
    return infos


# ---------------------------------------------------------------- pass two: shards


@dataclass(frozen=True)
class WriteTask:
    """Write the shards of one `ShardTask` through `writer` (which travels with the task)."""

    dataset: str
    plan: ShardTask
    conditions: tuple[ConditionColumn, ...]
    infos: Mapping[str, ConditionInfo]
    settings: ShardSettings
    writer: VersionWriter
    cameras: tuple[str, ...] = ()
    exclusion: Exclusion | None = None


@dataclass(frozen=True)
class WriteResult:
    shards: list[ShardInfo]
    statistics: dict[str, Any]  # numeric_summary of the task's episodes
    steps: int  # moves the progress bar
    filters: tuple[StepFilter | None, ...] = ()  # per part: what was left out


def write_task(task: WriteTask) -> WriteResult:
    """Pass two: read the task's parts, shuffle its episodes into shards, write the tars."""
    dataset = open_dataset(task.dataset)
    plan, settings = task.plan, task.settings
    # More frames than fit comfortably, dealt into several shards: each shard reads its own.
    stream = (
        bool(task.cameras)
        and plan.shards > 1
        and stored_frame_bytes(dataset, plan.parts) > frames_module.FRAMES_IN_MEMORY_BYTES
    )
    parts = [
        read_part_episodes(
            dataset, part, task.conditions, task.infos, task.cameras, task.exclusion, stream
        )
        for part in plan.parts
    ]
    filters = tuple(part.filtered for part in parts)
    episodes = concat_episodes(parts)
    written = []
    for offset, group in enumerate(
        shuffled_shards(episodes, plan.shards, settings.seed, plan.index)
    ):
        group.frames = load_frames(group.frames)
        built = build_shard(
            group, settings.window, settings.stride, settings.block_steps, settings.frame_stack
        )
        name = shard_name(plan.first_shard + offset)
        # pyarrow's S3 client retries each request (engine/storage.py); the writer's fence
        # keeps a task of a dead run from writing at all.
        data_file = task.writer.write_file(name, built.data)
        written.append(
            ShardInfo(
                name=name,
                windows=built.windows,
                episodes=built.episodes,
                steps=built.steps,
                blocks=built.blocks,
                bytes=data_file.bytes,
                sha256=data_file.sha256,
            )
        )
        del built, group  # one shard in memory at a time, not two
    return WriteResult(
        shards=written,
        statistics=numeric_summary(episodes, task.conditions),
        steps=sum(dataset.manifest.parts[part].steps for part in plan.parts),
        filters=filters,
    )


# ---------------------------------------------------------------- the job


def write_shards(
    dataset: Dataset,
    settings: ShardSettings,
    output: str,
    *,
    executor: Executor,
    command: str,
) -> ShardIndex:
    """Write the shards of `dataset` to `output` and commit its index.json last.

    Refuses a committed or foreign `output` before any work (`check_new_output`); on any
    error nothing stays at `output` (no staging, no partial shards). `command` is recorded
    in the index. Returns the committed index."""
    output = check_new_output(output, INDEX_NAME)
    conditions = tuple(resolve_conditions(dataset, settings.condition, settings.text))
    cameras = checked_cameras(dataset, settings)
    exclusion = plan_exclusion(dataset, settings.exclude)
    with VersionWriter(output, commit_file=INDEX_NAME) as writer:
        infos = vocabularies(dataset, conditions, settings, executor, exclusion)
        tasks = [
            WriteTask(
                dataset.uri, plan, conditions, infos, settings, writer, tuple(cameras), exclusion
            )
            for plan in plan_tasks(dataset, settings.shard_steps, bool(cameras))
        ]
        results = _run(executor, write_task, tasks, "shard", dataset.manifest.steps)
        index = shard_index(dataset, settings, conditions, infos, results, command, cameras)
        index.exclusions = combine_filters(
            exclusion, [found for result in results for found in result.filters]
        )
        if index.steps == 0 and index.exclusions is not None:
            found = index.exclusions  # the counts, not the held-out values (up to 1,000)
            matched = (
                f"--exclude {found.predicate!r} matched {found.excluded_steps} step(s), "
                if found.predicate
                else ""
            )
            raise ShardError(
                f"{dataset.uri}: no step is left to shard ({matched}steps with no text: "
                f"{found.null_steps}); check --exclude and the conditioning columns"
            )
        writer.commit(index.to_json().encode())
    return index


def checked_cameras(dataset: Dataset, settings: ShardSettings) -> dict[str, CameraInfo]:
    """The cameras to shard, as the shards store them (`CameraInfo.as_images`: video as PNG);
    KeyError for an unknown one; a frame stack needs frames."""
    cameras = resolve_cameras(dataset, settings.cameras)
    if not cameras and "observation" not in dataset.columns("steps", frames=False):
        chosen = f"--cameras {','.join(settings.cameras)} leaves" if settings.cameras else "has"
        raise ValueError(
            f"{dataset.uri} has no state vector (no 'observation' column: its frames are the "
            f"observation) and {chosen} no camera to shard; cameras: {sorted(dataset.cameras)}"
        )
    if settings.frame_stack > 1 and not cameras:
        raise ValueError(
            f"{dataset.uri} has no camera frames: --frame-stack {settings.frame_stack} needs a "
            "dataset with a frames group (collect --frames, or ingest of image observations)"
        )
    return {name: info.as_images() for name, info in cameras.items()}


def shard_index(
    dataset: Dataset,
    settings: ShardSettings,
    conditions: Sequence[ConditionColumn],
    vocabularies: Mapping[str, ConditionInfo],
    results: Sequence[WriteResult],
    command: str,
    cameras: Mapping[str, CameraInfo] | None = None,
) -> ShardIndex:
    """The index of the written shards: the shard list in order, and the statistics."""
    shard_infos = [shard for result in results for shard in result.shards]
    statistics = combine_numeric([result.statistics for result in results], conditions)
    infos = dict(vocabularies)
    for condition in conditions:
        if condition.type in ("scalar", "vector"):
            infos[condition.name] = ConditionInfo(
                type=condition.type,
                level=condition.level,
                dim=condition.dim,
                count=condition.count,
                embedding=embedding_info(dataset, condition),
                **statistics[condition_member(condition.name)],
            )
    observation_dim = len(statistics["observation"]["mean"])
    manifest_bytes = storage.read_bytes(storage.join(dataset.uri, MANIFEST_NAME))
    return ShardIndex(
        source_dataset_id=dataset.manifest.dataset_id,
        source_uri=dataset.uri,
        source_manifest_sha256=storage.sha256_bytes(manifest_bytes),
        seed=settings.seed,
        window=settings.window,
        stride=settings.stride,
        block_steps=settings.block_steps,
        created_at=now_iso(),
        command=command,
        windows=sum(s.windows for s in shard_infos),
        episodes=sum(s.episodes for s in shard_infos),
        steps=sum(s.steps for s in shard_infos),
        shards=shard_infos,
        observation=ObservationInfo(shape=[observation_dim], **statistics["observation"]),
        action=ActionInfo(**statistics.get("action", {"kind": "continuous", "dim": 0})),
        reward=RewardInfo(**statistics["reward"]) if statistics["reward"] else None,
        episode_return=(
            ReturnInfo(**statistics["episode_return"]) if statistics["episode_return"] else None
        ),
        conditions={c.name: infos[c.name] for c in conditions},
        cameras=dict(cameras or {}),
        frame_stack=settings.frame_stack,
        camera_sources={
            name: info
            for name, info in dataset.cameras.items()
            if name in (cameras or {}) and cameras[name] != info
        },
        metadata=dataset.manifest.metadata,
    )


Task = TypeVar("Task")
Result = TypeVar("Result")


def _run(
    executor: Executor,
    function: Callable[[Task], Result],
    tasks: Sequence[Task],
    description: str,
    total: int,
) -> list[Result]:
    """`executor.map`, with a dataset or key error inside a task reported as a ShardError."""
    try:
        return executor.map(function, tasks, description=description, total=total)
    except (DatasetError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        raise ShardError(str(message)) from error
