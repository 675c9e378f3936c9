"""WebDataset shards of training windows: pure functions from whole episodes to tar bytes.

Layout of a shard directory at URI `S` (local directory or `s3://bucket/prefix`):

    S/index.json          written last (schemas/shard_index.py): readers refuse S without it
    S/_staging            present only while the shard job works
    S/shard-00000.tar     WebDataset tar files

A tar sample is a *block* of consecutive steps (about `block_steps`, whole episodes packed
together; an episode longer than a block is cut into chunks that carry the `window - 1`
steps before them as context), not one window: a tar member costs ~20 us and an .npy header
~25 us, so one window per sample would stream at a few thousand windows/s. The loader cuts
the windows. Members of block `bNNNNNN` (all .npy, no pickle, allow_pickle=False readable):

    observation.npy   float32 [n, obs_dim]
    action.npy        float32 [n, act_dim] (continuous) or int64 [n] (discrete)
    reward.npy        float32 [n]
    timestep.npy      int32 [n]               t within the episode
    window_end.npy    int32 [m]               block row of each window's last step
    window_start.npy  int32 [m]               block row of each window's first valid step
    episode_id.npy    int64 [m]               the episode of each window
    cond.C.npy        per conditioning column C, one row per step:
                      scalar float32 [n]; vector float32 [n, D] or [n, k, D];
                      categorical int32 [n] (index into the index's vocabulary)
    cond.C.index.npy  text column C: int32 [m], the row of cond.C.tokens for each window
    cond.C.tokens.npy text column C: int32 [u, P, L] token ids (P texts per row, 0-padded)
    cond.C.count.npy  text column C: int32 [u], how many of the P texts are real

A window ends at every `stride`-th step counted back from the episode's last step (with
stride 1: at every step), so each step is the last step of at most one window and the last
step of an episode always is; windows at the episode start are shorter (left padding, masked
by the loader).

Tars are written with a fixed mtime, owner and mode in plain ustar format (no PAX headers):
the same input and seed give byte-identical shards.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine import storage
from schemas import steps as cols
from schemas.shard_index import (
    PAD_TOKEN,
    UNKNOWN_TOKEN,
    ConditionInfo,
    encode_text,
    words,
)

TAR_MTIME = 0
BLOCK_PREFIX = "b"
ALLOWED_SUFFIXES = (".npy", ".json", ".txt")
# Names of string columns that hold free text rather than labels.
TEXT_COLUMNS = ("description", "descriptions", "instruction", "instructions")
RETURN_QUANTILES = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
MULTIPART_BYTES = 64 << 20


class ShardError(RuntimeError):
    """Shards that cannot be written or read, with the shard and what to do."""


# ---------------------------------------------------------------- condition columns


@dataclass(frozen=True)
class ConditionColumn:
    """How one conditioning column is read from the dataset and stored in the shards."""

    name: str
    type: str  # scalar | vector | categorical | text
    level: str  # steps | episodes
    dim: int | None = None
    count: int | None = None  # goals per step for vector columns holding k goals

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "level": self.level,
            "dim": self.dim,
            "count": self.count,
        }


def classify_condition(
    name: str,
    data_type: pa.DataType,
    level: str,
    *,
    text: bool = False,
    goals_per_step: int | None = None,
) -> ConditionColumn:
    """The condition type of a column from its Arrow type.

    Strings are categorical unless `text` (free text such as `description`); lists of strings
    are text. `goals_per_step` (k) splits a flat vector of k * G values into k goals.
    """
    if pa.types.is_dictionary(data_type):
        data_type = data_type.value_type
    if pa.types.is_string(data_type) or pa.types.is_large_string(data_type):
        return ConditionColumn(name, "text" if text else "categorical", level)
    if (pa.types.is_list(data_type) or pa.types.is_large_list(data_type)) and (
        pa.types.is_string(data_type.value_type) or pa.types.is_large_string(data_type.value_type)
    ):
        return ConditionColumn(name, "text", level)
    if pa.types.is_fixed_size_list(data_type):
        inner = data_type.value_type
        if pa.types.is_fixed_size_list(inner) and _is_number(inner.value_type):
            return ConditionColumn(
                name, "vector", level, dim=inner.list_size, count=data_type.list_size
            )
        if _is_number(inner):
            size = data_type.list_size
            if goals_per_step and goals_per_step > 1 and size % goals_per_step == 0:
                return ConditionColumn(
                    name, "vector", level, dim=size // goals_per_step, count=goals_per_step
                )
            return ConditionColumn(name, "vector", level, dim=size)
    if _is_number(data_type) or pa.types.is_boolean(data_type):
        return ConditionColumn(name, "scalar", level)
    raise ShardError(
        f"column {name!r} ({data_type}) cannot be a condition: expected a number, a fixed-size "
        "list of numbers, a string/dictionary label, a text or a list of texts"
    )


def _is_number(data_type: pa.DataType) -> bool:
    return pa.types.is_floating(data_type) or pa.types.is_integer(data_type)


TEXT_SEPARATOR = "\x1f"


def _joined_texts(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A text column as one string per row: a list of texts joined by TEXT_SEPARATOR."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.cast(pa.string())
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return pc.binary_join(column, TEXT_SEPARATOR)
    return column


def _text_rows(column: pa.Array) -> list[list[str]]:
    """Every distinct joined text as its list of texts (None: no text)."""
    return [[] if value is None else value.split(TEXT_SEPARATOR) for value in column.to_pylist()]


def summarize_vocabulary(column: pa.ChunkedArray, condition: ConditionColumn) -> dict[str, Any]:
    """Pass one over a part: label counts of a categorical, word counts of a text column."""
    if condition.type == "categorical":
        if column.null_count:
            raise ShardError(
                f"condition column {condition.name!r} has {column.null_count} null labels; "
                "fill them (e.g. with a relabeler) before sharding"
            )
        counts = pc.value_counts(
            column.cast(pa.string()) if pa.types.is_dictionary(column.type) else column
        )
        return {"labels": {str(item["values"]): int(item["counts"]) for item in counts.to_pylist()}}
    # Text: count words over distinct texts only (episode descriptions repeat on steps).
    unique = pc.unique(_joined_texts(column))
    word_counts: dict[str, int] = {}
    longest = 0
    paraphrases = 1
    for texts in _text_rows(unique.cast(pa.string())):
        paraphrases = max(paraphrases, len(texts))
        for text in texts:
            text_words = words(text)
            longest = max(longest, len(text_words))
            for word in text_words:
                word_counts[word] = word_counts.get(word, 0) + 1
    return {"words": word_counts, "longest": longest, "paraphrases": paraphrases}


def combine_vocabulary(
    summaries: Sequence[dict[str, Any]],
    condition: ConditionColumn,
    *,
    ordered_labels: Sequence[str] | None = None,
    max_words: int = 20000,
    max_tokens: int = 64,
) -> ConditionInfo:
    """The index entry of a categorical or text column from every part's summary.

    Labels keep `ordered_labels` order (e.g. skill levels from novice to expert, recorded
    by the relabeler) when they cover every label seen, else sorted order. Words are ordered
    by frequency, then alphabetically, after <pad> and <unk>.
    """
    if condition.type == "categorical":
        seen: set[str] = set()
        for summary in summaries:
            seen.update(summary["labels"])
        if ordered_labels and seen <= set(ordered_labels):
            vocabulary = list(ordered_labels)
        else:
            vocabulary = sorted(seen)
        return ConditionInfo(type="categorical", level=condition.level, vocabulary=vocabulary)
    totals: dict[str, int] = {}
    for summary in summaries:
        for word, count in summary["words"].items():
            totals[word] = totals.get(word, 0) + count
    ranked = sorted(totals, key=lambda word: (-totals[word], word))[: max(0, max_words - 2)]
    longest = max([s["longest"] for s in summaries] + [1])
    return ConditionInfo(
        type="text",
        level=condition.level,
        vocabulary=[PAD_TOKEN, UNKNOWN_TOKEN, *ranked],
        max_tokens=min(longest, max_tokens),
        paraphrases=max([s["paraphrases"] for s in summaries] + [1]),
    )


# ---------------------------------------------------------------- episodes as arrays


@dataclass
class EpisodeArrays:
    """Whole episodes as NumPy arrays, steps sorted by (episode, t) within each episode.

    `conditions` holds one array per conditioning column with one row per step (episode
    columns already broadcast; categoricals as vocabulary indices; text as row indices into
    `texts[name]`, a (tokens [u, P, L], count [u]) pair).
    """

    episode_ids: np.ndarray  # [E] int64
    lengths: np.ndarray  # [E] int64
    returns: np.ndarray  # [E] float64
    timestep: np.ndarray  # [N] int32
    observation: np.ndarray  # [N, obs_dim] float32
    action: np.ndarray  # [N, act_dim] float32 or [N] int64
    reward: np.ndarray  # [N] float32
    conditions: dict[str, np.ndarray] = field(default_factory=dict)
    texts: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)


def expand_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated aranges [start, start + length) without a Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shifts = np.repeat(np.asarray(starts, dtype=np.int64) - np.cumsum(lengths) + lengths, lengths)
    return np.arange(total, dtype=np.int64) + shifts


def condition_values(
    condition: ConditionColumn,
    column: pa.ChunkedArray,
    vocabulary: ConditionInfo | None,
    where: str,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """One row per input row: floats, vocabulary indices, or text row ids (+ token table)."""
    if column.null_count and condition.type != "text":
        raise ShardError(
            f"{where}: condition column {condition.name!r} has {column.null_count} null values; "
            "every step needs a value"
        )
    if condition.type == "scalar":
        return cols.arrow_to_numpy(column.cast(pa.float32())).astype(np.float32), None
    if condition.type == "vector":
        flat = column.combine_chunks()
        while pa.types.is_fixed_size_list(flat.type):
            flat = flat.flatten()
        values = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        shape = (
            (len(column), condition.count, condition.dim)
            if condition.count
            else (
                len(column),
                condition.dim,
            )
        )
        return values.reshape(shape), None
    assert vocabulary is not None and vocabulary.vocabulary is not None
    if condition.type == "categorical":
        labels = column.cast(pa.string()) if pa.types.is_dictionary(column.type) else column
        encoded = pc.dictionary_encode(labels.combine_chunks())
        lookup = {label: i for i, label in enumerate(vocabulary.vocabulary)}
        dictionary = encoded.dictionary.to_pylist()
        unknown = [label for label in dictionary if label not in lookup]
        if unknown:
            raise ShardError(
                f"{where}: labels {unknown[:5]} of {condition.name!r} are not in the vocabulary"
            )
        mapping = np.array([lookup[label] for label in dictionary], dtype=np.int32)
        return mapping[encoded.indices.to_numpy(zero_copy_only=False)], None
    # Text: distinct rows tokenized once; a missing text becomes zero texts (count 0).
    encoded = pc.dictionary_encode(_joined_texts(column))
    rows = _text_rows(encoded.dictionary)
    width = vocabulary.paraphrases or 1
    tokens = np.zeros((len(rows), width, vocabulary.max_tokens or 1), dtype=np.int32)
    count = np.zeros(len(rows), dtype=np.int32)
    for row, texts in enumerate(rows):
        texts = texts[:width]
        count[row] = len(texts)
        if texts:
            tokens[row, : len(texts)] = encode_text(
                texts, vocabulary.vocabulary, vocabulary.max_tokens or 1
            )
    indices = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
    if np.any(indices < 0):
        # A null text: an extra row with no texts.
        tokens = np.concatenate([tokens, np.zeros((1, *tokens.shape[1:]), np.int32)])
        count = np.concatenate([count, np.zeros(1, np.int32)])
        indices = np.where(indices < 0, len(rows), indices)
    return indices, (tokens, count)


def concat_episodes(chunks: Sequence[EpisodeArrays]) -> EpisodeArrays:
    """Episodes of several parts as one set (text tables are renumbered)."""
    if len(chunks) == 1:
        return chunks[0]
    conditions: dict[str, np.ndarray] = {}
    texts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in chunks[0].conditions:
        if name in chunks[0].texts:
            shift = np.cumsum([0] + [len(c.texts[name][1]) for c in chunks[:-1]])
            conditions[name] = np.concatenate(
                [c.conditions[name] + s for c, s in zip(chunks, shift)]
            ).astype(np.int32)
            width = max(c.texts[name][0].shape[1] for c in chunks)
            tokens = np.concatenate(
                [
                    np.pad(
                        c.texts[name][0], ((0, 0), (0, width - c.texts[name][0].shape[1]), (0, 0))
                    )
                    for c in chunks
                ]
            )
            texts[name] = (tokens, np.concatenate([c.texts[name][1] for c in chunks]))
        else:
            conditions[name] = np.concatenate([c.conditions[name] for c in chunks])
    return EpisodeArrays(
        episode_ids=np.concatenate([c.episode_ids for c in chunks]),
        lengths=np.concatenate([c.lengths for c in chunks]),
        returns=np.concatenate([c.returns for c in chunks]),
        timestep=np.concatenate([c.timestep for c in chunks]),
        observation=np.concatenate([c.observation for c in chunks]),
        action=np.concatenate([c.action for c in chunks]),
        reward=np.concatenate([c.reward for c in chunks]),
        conditions=conditions,
        texts=texts,
    )


def select_episodes(episodes: EpisodeArrays, order: np.ndarray) -> EpisodeArrays:
    """The episodes at positions `order` (in that order), steps gathered vectorized."""
    rows = expand_ranges(episodes.offsets[order], episodes.lengths[order])
    return EpisodeArrays(
        episode_ids=episodes.episode_ids[order],
        lengths=episodes.lengths[order],
        returns=episodes.returns[order],
        timestep=episodes.timestep[rows],
        observation=episodes.observation[rows],
        action=episodes.action[rows],
        reward=episodes.reward[rows],
        conditions={name: values[rows] for name, values in episodes.conditions.items()},
        texts=episodes.texts,
    )


def split_for_shards(lengths: np.ndarray, shards: int) -> list[tuple[int, int]]:
    """Episode ranges [start, stop) of `shards` groups with about equal step counts."""
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    cuts = [0]
    for j in range(1, shards):
        cut = int(np.searchsorted(ends, total * j / shards, side="left")) + 1
        cuts.append(min(max(cut, cuts[-1]), len(lengths)))
    cuts.append(len(lengths))
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:])]


def shuffled_shards(
    episodes: EpisodeArrays, shards: int, seed: int, task: int
) -> list[EpisodeArrays]:
    """Episodes permuted (seeded by seed and task) and dealt into `shards` groups."""
    order = np.random.default_rng([seed, task]).permutation(len(episodes.lengths))
    permuted = select_episodes(episodes, order)
    groups = []
    for start, stop in split_for_shards(permuted.lengths, shards):
        groups.append(select_episodes(permuted, np.arange(start, stop)))
    return groups


# ---------------------------------------------------------------- blocks and tars


@dataclass(frozen=True)
class Segment:
    """Steps [first, stop) of episode `episode` (positions within the episode) as the window
    ends of one block, with `context` earlier steps before them."""

    episode: int
    first: int
    stop: int
    context: int

    @property
    def rows(self) -> int:
        return self.stop - self.first + self.context


def plan_blocks(lengths: np.ndarray, window: int, block_steps: int) -> list[list[Segment]]:
    """Whole episodes packed into blocks of at most `block_steps` rows; a longer episode is
    cut into chunks of `block_steps` window ends, each with up to `window - 1` context steps.

    Loops over episodes (not steps): block boundaries only.
    """
    blocks: list[list[Segment]] = []
    current: list[Segment] = []
    rows = 0
    for episode, length in enumerate(lengths.tolist()):
        if length <= block_steps:
            pieces = [Segment(episode, 0, length, 0)]
        else:
            pieces = [
                Segment(episode, first, min(first + block_steps, length), min(window - 1, first))
                for first in range(0, length, block_steps)
            ]
        for piece in pieces:
            if current and rows + piece.rows > block_steps:
                blocks.append(current)
                current, rows = [], 0
            current.append(piece)
            rows += piece.rows
    if current:
        blocks.append(current)
    return blocks


def block_arrays(
    episodes: EpisodeArrays, segments: list[Segment], window: int, stride: int
) -> dict[str, np.ndarray]:
    """The member arrays of one block (see the module docstring)."""
    episode = np.array([s.episode for s in segments], dtype=np.int64)
    first = np.array([s.first for s in segments], dtype=np.int64)
    stop = np.array([s.stop for s in segments], dtype=np.int64)
    context = np.array([s.context for s in segments], dtype=np.int64)
    offsets = episodes.offsets
    seg_rows = stop - first + context
    rows = expand_ranges(offsets[episode] + first - context, seg_rows)
    # Position of every block row within its episode, and whether it ends a window.
    seg_of_row = np.repeat(np.arange(len(segments)), seg_rows)
    position = rows - offsets[episode][seg_of_row]
    length = episodes.lengths[episode][seg_of_row]
    is_end = (position >= first[seg_of_row]) & ((length - 1 - position) % stride == 0)
    window_end = np.flatnonzero(is_end)
    window_start = window_end - np.minimum(position[window_end], window - 1)
    arrays = {
        "observation": episodes.observation[rows],
        "action": episodes.action[rows],
        "reward": episodes.reward[rows],
        "timestep": episodes.timestep[rows].astype(np.int32),
        "window_end": window_end.astype(np.int32),
        "window_start": window_start.astype(np.int32),
        "episode_id": episodes.episode_ids[episode][seg_of_row[window_end]].astype(np.int64),
    }
    for name, values in episodes.conditions.items():
        if name in episodes.texts:
            table_rows = values[rows[window_end]]
            unique, inverse = np.unique(table_rows, return_inverse=True)
            tokens, count = episodes.texts[name]
            arrays[f"cond.{name}.index"] = inverse.astype(np.int32).reshape(-1)
            arrays[f"cond.{name}.tokens"] = tokens[unique]
            arrays[f"cond.{name}.count"] = count[unique]
        else:
            arrays[f"cond.{name}"] = values[rows]
    return arrays


def npy_bytes(array: np.ndarray) -> bytes:
    """An .npy file (format 1.0, never pickled)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A ustar archive with fixed mtime/owner/mode: equal members give equal bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = TAR_MTIME
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@dataclass
class BuiltShard:
    data: bytes
    windows: int
    episodes: int
    steps: int
    blocks: int


def build_shard(episodes: EpisodeArrays, window: int, stride: int, block_steps: int) -> BuiltShard:
    """The tar bytes of one shard holding `episodes` (in their order)."""
    members: list[tuple[str, bytes]] = []
    windows = 0
    plan = plan_blocks(episodes.lengths, window, block_steps)
    for number, segments in enumerate(plan):
        arrays = block_arrays(episodes, segments, window, stride)
        windows += len(arrays["window_end"])
        key = f"{BLOCK_PREFIX}{number:06d}"
        members.extend((f"{key}.{name}.npy", npy_bytes(value)) for name, value in arrays.items())
    return BuiltShard(
        data=tar_bytes(members),
        windows=windows,
        episodes=len(episodes.lengths),
        steps=int(episodes.lengths.sum()),
        blocks=len(plan),
    )


# ---------------------------------------------------------------- statistics


def numeric_summary(episodes: EpisodeArrays, conditions: Sequence[ConditionColumn]) -> dict:
    """Sums for mean/std, extremes and returns of one set of episodes (JSON-able)."""
    observation = episodes.observation.astype(np.float64)
    summary: dict[str, Any] = {
        "steps": len(episodes.reward),
        "observation_sum": observation.sum(axis=0).tolist(),
        "observation_sumsq": np.square(observation).sum(axis=0).tolist(),
        "reward_sum": float(episodes.reward.astype(np.float64).sum()),
        "reward_sumsq": float(np.square(episodes.reward.astype(np.float64)).sum()),
        "returns": episodes.returns.astype(np.float64).tolist(),
    }
    if len(episodes.action):
        if episodes.action.ndim == 1:
            summary["action_max"] = int(episodes.action.max())
        else:
            summary["action_low"] = episodes.action.min(axis=0).tolist()
            summary["action_high"] = episodes.action.max(axis=0).tolist()
    for condition in conditions:
        if condition.type not in ("scalar", "vector"):
            continue
        values = episodes.conditions[condition.name].astype(np.float64)
        values = values.reshape(-1, condition.dim if condition.type == "vector" else 1)
        summary[f"cond.{condition.name}"] = {
            "count": len(values),
            "sum": values.sum(axis=0).tolist(),
            "sumsq": np.square(values).sum(axis=0).tolist(),
            "min": float(values.min()) if len(values) else None,
            "max": float(values.max()) if len(values) else None,
        }
    return summary


def _mean_std(total: float | np.ndarray, total_sq, count: int):
    count = max(count, 1)
    mean = np.asarray(total, dtype=np.float64) / count
    var = np.maximum(np.asarray(total_sq, dtype=np.float64) / count - mean**2, 0.0)
    return mean, np.sqrt(var)


def combine_numeric(summaries: Sequence[dict], conditions: Sequence[ConditionColumn]) -> dict:
    """Dataset-wide statistics for the index from every shard task's `numeric_summary`."""
    steps = sum(s["steps"] for s in summaries)
    obs_mean, obs_std = _mean_std(
        np.sum([s["observation_sum"] for s in summaries], axis=0),
        np.sum([s["observation_sumsq"] for s in summaries], axis=0),
        steps,
    )
    reward_mean, reward_std = _mean_std(
        sum(s["reward_sum"] for s in summaries), sum(s["reward_sumsq"] for s in summaries), steps
    )
    returns = np.concatenate([np.asarray(s["returns"], dtype=np.float64) for s in summaries])
    result: dict[str, Any] = {
        "observation": {"mean": obs_mean.tolist(), "std": obs_std.tolist()},
        "reward": {"mean": float(reward_mean), "std": float(reward_std)},
        "episode_return": {
            "mean": float(returns.mean()) if len(returns) else 0.0,
            "std": float(returns.std()) if len(returns) else 0.0,
            "min": float(returns.min()) if len(returns) else 0.0,
            "max": float(returns.max()) if len(returns) else 0.0,
            "quantiles": {
                str(q): float(np.quantile(returns, q)) if len(returns) else 0.0
                for q in RETURN_QUANTILES
            },
        },
    }
    with_actions = [s for s in summaries if "action_max" in s or "action_low" in s]
    if with_actions and "action_max" in with_actions[0]:
        result["action"] = {"kind": "discrete", "n": max(s["action_max"] for s in with_actions) + 1}
    elif with_actions:
        low = np.min([s["action_low"] for s in with_actions], axis=0)
        high = np.max([s["action_high"] for s in with_actions], axis=0)
        result["action"] = {
            "kind": "continuous",
            "dim": len(low),
            "low": low.tolist(),
            "high": high.tolist(),
        }
    for condition in conditions:
        key = f"cond.{condition.name}"
        if condition.type not in ("scalar", "vector"):
            continue
        parts = [s[key] for s in summaries if s[key]["count"]]
        count = sum(p["count"] for p in parts)
        mean, std = _mean_std(
            np.sum([p["sum"] for p in parts], axis=0) if parts else 0.0,
            np.sum([p["sumsq"] for p in parts], axis=0) if parts else 0.0,
            count,
        )
        entry = {
            "mean": mean.tolist(),
            "std": std.tolist(),
            "min": min(p["min"] for p in parts) if parts else None,
            "max": max(p["max"] for p in parts) if parts else None,
        }
        if condition.type == "scalar":
            entry["mean"], entry["std"] = float(mean[0]), float(std[0])
        result[key] = entry
    return result


# ---------------------------------------------------------------- writing objects


def _s3_client():
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": 10, "mode": "standard"}, connect_timeout=10, read_timeout=60
    )
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint or None, config=config)


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def put_object(
    uri: str, data: bytes, attempts: int = 5, before_commit: Callable[[], None] | None = None
) -> None:
    """Write a whole object: locally atomically (rename), on S3 with boto3 (multipart above
    64 MiB, botocore's standard retries plus our own on a failed transfer). `before_commit`
    runs just before the object appears (the rename) or, on S3, before the upload starts."""
    if not storage.is_s3(uri):
        storage.write_bytes(uri, data, before_commit)
        return
    if before_commit:
        before_commit()
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    config = TransferConfig(
        multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES
    )
    client = _s3_client()
    for attempt in range(attempts):
        try:
            client.upload_fileobj(io.BytesIO(data), bucket, key, Config=config)
            return
        except (BotoCoreError, ClientError, ConnectionError) as error:
            code = getattr(error, "response", {}).get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId") or (
                attempt == attempts - 1
            ):
                raise ShardError(f"cannot write {uri}: {error}") from error
            time.sleep(min(2**attempt * 0.5, 8))


# ---------------------------------------------------------------- reading dataset parts


def read_part_episodes(
    dataset,
    index: int,
    conditions: Sequence[ConditionColumn],
    infos: dict[str, ConditionInfo],
) -> EpisodeArrays:
    """Part `index` of a dataset version as EpisodeArrays (episode columns broadcast)."""
    where = f"{dataset.uri} part {index}"
    step_conditions = [c.name for c in conditions if c.level == "steps"]
    episode_conditions = [c.name for c in conditions if c.level == "episodes"]
    heads = {name.partition(".")[0] for name in step_conditions}
    step_columns = [cols.EPISODE_ID, cols.T, cols.OBSERVATION, cols.ACTION, cols.REWARD]
    steps = dataset.read_part(index, "steps", list(dict.fromkeys(step_columns + sorted(heads))))
    episodes = dataset.read_part(
        index,
        "episodes",
        list(dict.fromkeys([cols.EPISODE_ID, cols.LENGTH, cols.RETURN, *episode_conditions])),
    )
    lengths = episodes.column(cols.LENGTH).to_numpy().astype(np.int64)
    boundaries = cols.episode_boundaries(steps.column(cols.EPISODE_ID).to_numpy())
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    if len(boundaries) != len(offsets) or not np.array_equal(boundaries, offsets):
        raise ShardError(
            f"{where}: the steps do not match the episode lengths (steps sorted by "
            "(episode_id, t) with one episodes row per episode expected)"
        )
    observation = steps.column(cols.OBSERVATION)
    if pa.types.is_struct(observation.type):
        observation = cols.column_by_path(steps, f"{cols.OBSERVATION}.{cols.OBSERVATION}")
    reward = steps.column(cols.REWARD)
    if reward.null_count or not np.all(np.isfinite(reward.to_numpy(zero_copy_only=False))):
        bad = np.flatnonzero(~np.isfinite(reward.fill_null(np.nan).to_numpy(zero_copy_only=False)))
        episode_id = steps.column(cols.EPISODE_ID)[int(bad[0])].as_py()
        raise ShardError(
            f"{where}: column 'reward' has {len(bad)} NaN/inf/null values (first in episode "
            f"{episode_id}); fix the dataset before sharding"
        )
    action = cols.arrow_to_numpy(steps.column(cols.ACTION))
    arrays = EpisodeArrays(
        episode_ids=episodes.column(cols.EPISODE_ID).to_numpy().astype(np.int64),
        lengths=lengths,
        returns=episodes.column(cols.RETURN).to_numpy(zero_copy_only=False).astype(np.float64),
        timestep=steps.column(cols.T).to_numpy().astype(np.int32),
        observation=cols.arrow_to_numpy(observation).astype(np.float32, copy=False),
        action=action.astype(np.int64 if action.ndim == 1 else np.float32, copy=False),
        reward=reward.to_numpy(zero_copy_only=False).astype(np.float32, copy=False),
    )
    if arrays.observation.ndim == 1:
        arrays.observation = arrays.observation[:, None]
    if arrays.action.ndim == 1 and np.issubdtype(action.dtype, np.floating):
        arrays.action = action.astype(np.float32)[:, None]
    for condition in conditions:
        table = steps if condition.level == "steps" else episodes
        column = cols.column_by_path(table, condition.name)
        values, text_table = condition_values(condition, column, infos.get(condition.name), where)
        if condition.level == "episodes":
            values = np.repeat(values, lengths, axis=0)
        arrays.conditions[condition.name] = values
        if text_table is not None:
            arrays.texts[condition.name] = text_table
    return arrays
