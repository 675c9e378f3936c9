"""WebDataset shards of training windows: a dataset version -> a directory of tar files.

Layout of a shard directory at URI `S` (local directory or `s3://bucket/prefix`):

    S/index.json          written last (schemas/shard_index.py): readers refuse S without it
    S/_staging            present only while the shard job works
    S/shard-00000.tar     WebDataset tar files; a sample is a block of steps (tar.py)

The package, along its seams:
    conditions.py   condition columns: their types, vocabularies and values as arrays
    frames.py       encoded camera frames, carried unchanged from the frames group
    episodes.py     whole episodes of dataset parts as NumPy arrays, shuffled into shards
    tar.py          episodes -> blocks -> tar bytes (pure, byte-identical for equal input)
    statistics.py   numeric summaries per task, combined for the index
    driver.py       the job: plan, the vocabulary pass, the write pass, commit (`write_shards`)

Member and file names live in schemas/shard_index.py, shared with the loader
(trainers/loader/). All object I/O goes through engine/storage.
"""

from engine.shards.conditions import (
    TEXT_COLUMNS,
    ConditionColumn,
    classify_condition,
    combine_vocabulary,
    condition_values,
    summarize_vocabulary,
)
from engine.shards.driver import (
    ShardSettings,
    ShardTask,
    checked_cameras,
    plan_tasks,
    resolve_conditions,
    write_shards,
)
from engine.shards.episodes import (
    EpisodeArrays,
    concat_episodes,
    expand_ranges,
    read_part_episodes,
    select_episodes,
    shuffled_shards,
    split_for_shards,
)
from engine.shards.frames import EncodedFrames, dataset_cameras, resolve_cameras
from engine.shards.statistics import combine_numeric, numeric_summary
from engine.shards.tar import BuiltShard, Segment, block_arrays, build_shard, plan_blocks
from schemas.shard_index import ShardError

__all__ = [
    "TEXT_COLUMNS",
    "BuiltShard",
    "ConditionColumn",
    "EncodedFrames",
    "EpisodeArrays",
    "Segment",
    "ShardError",
    "ShardSettings",
    "ShardTask",
    "block_arrays",
    "build_shard",
    "checked_cameras",
    "classify_condition",
    "combine_numeric",
    "combine_vocabulary",
    "concat_episodes",
    "dataset_cameras",
    "condition_values",
    "expand_ranges",
    "numeric_summary",
    "plan_blocks",
    "plan_tasks",
    "read_part_episodes",
    "resolve_cameras",
    "resolve_conditions",
    "select_episodes",
    "shuffled_shards",
    "split_for_shards",
    "summarize_vocabulary",
    "write_shards",
]
