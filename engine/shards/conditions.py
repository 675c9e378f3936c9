"""Conditioning columns: what type each is, its vocabulary, and its values as arrays.

A condition column is read from the dataset (step or episode level; episode columns are
broadcast to their steps) and stored in the shards as one of four types:

    scalar       a number per step                         float32 [n]
    vector       a fixed-size list of numbers per step     float32 [n, D] or [n, k, D]
    categorical  a label (string or dictionary)            int32 [n], index into the vocabulary
    text         a text, or a list of paraphrases          int32 row ids into a token table

Categorical and text columns need a vocabulary over the whole dataset first: every part
summarizes its labels or words (`summarize_vocabulary`), the driver combines the summaries
(`combine_vocabulary`) into the index's `ConditionInfo`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas import steps as cols
from schemas.shard_index import (
    MAX_INDEX_TEXTS,
    PAD_TOKEN,
    UNKNOWN_TOKEN,
    ConditionInfo,
    ShardError,
    encode_text,
    words,
)

if TYPE_CHECKING:
    from engine.dataset import Dataset

# Names of string columns that hold free text rather than labels.
TEXT_COLUMNS = ("description", "descriptions", "instruction", "instructions")
# Joins the paraphrases of one row into one string, so that distinct rows are found by Arrow.
TEXT_SEPARATOR = "\x1f"

ConditionType = Literal["scalar", "vector", "categorical", "text"]
Level = Literal["steps", "episodes"]


@dataclass(frozen=True)
class ConditionColumn:
    """How one conditioning column is read from the dataset and stored in the shards."""

    name: str
    type: ConditionType
    level: Level
    dim: int | None = None
    count: int | None = None  # goals per step for vector columns holding k goals
    embedded_text: bool = False  # a vector the `embed` relabeler wrote (null: no text)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "level": self.level,
            "dim": self.dim,
            "count": self.count,
            "embedded_text": self.embedded_text,
        }


def classify_condition(
    name: str,
    data_type: pa.DataType,
    level: Level,
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


def joined_texts(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A text column as one string per row: a list of texts joined by TEXT_SEPARATOR."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.cast(pa.string())
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return pc.binary_join(column, TEXT_SEPARATOR)
    return column


def text_rows(column: pa.Array) -> list[list[str]]:
    """Every joined text as its list of texts (None: no text)."""
    return [[] if value is None else value.split(TEXT_SEPARATOR) for value in column.to_pylist()]


def embedding_info(dataset: Dataset, condition: ConditionColumn) -> dict[str, Any] | None:
    """How the `embed` relabeler wrote a vector column (None for any other column): what
    `ask` needs to embed a request the same way. Never a credential (the endpoint's public
    form; the key stays in the environment)."""
    if condition.type != "vector":
        return None
    relabeler = dataset.group_of(condition.name.partition(".")[0], condition.level).relabeler
    if relabeler is None or relabeler.name != "embed":
        return None
    report, params = relabeler.report or {}, relabeler.params or {}
    return {
        "relabeler": f"embed {relabeler.version}",
        "column": params.get("column"),
        "embedder": report.get("embedder"),
        "model": report.get("model"),
        "dimensions": report.get("dimensions"),
        "requested_dimensions": params.get("dimensions"),
        "endpoint": report.get("endpoint"),
    }


# ---------------------------------------------------------------- vocabularies


def summarize_vocabulary(
    column: pa.ChunkedArray, condition: ConditionColumn, where: str = ""
) -> dict[str, Any]:
    """Pass one over a part (`where` names it): label counts of a categorical, word counts
    of a text column."""
    if condition.type == "categorical":
        if column.null_count:
            raise ShardError(
                f"{where}: condition column {condition.name!r} has {column.null_count} null "
                f"labels; fill them (e.g. with a relabeler), or give --text {condition.name} "
                "to read it as text (steps with no text are left out)"
            )
        counts = pc.value_counts(
            column.cast(pa.string()) if pa.types.is_dictionary(column.type) else column
        )
        return {"labels": {str(item["values"]): int(item["counts"]) for item in counts.to_pylist()}}
    # Text: count words over distinct texts only (episode descriptions repeat on steps).
    unique = pc.unique(joined_texts(column))
    word_counts: dict[str, int] = {}
    longest = 0
    paraphrases = 1
    distinct: set[str] = set()
    for texts in text_rows(unique.cast(pa.string())):
        paraphrases = max(paraphrases, len(texts))
        if len(distinct) <= MAX_INDEX_TEXTS:
            distinct.update(texts)
        for text in texts:
            text_words = words(text)
            longest = max(longest, len(text_words))
            for word in text_words:
                word_counts[word] = word_counts.get(word, 0) + 1
    return {
        "words": word_counts,
        "longest": longest,
        "paraphrases": paraphrases,
        "texts": sorted(distinct),
    }


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
    texts: set[str] = set()
    for summary in summaries:
        texts.update(summary.get("texts", ()))
    return ConditionInfo(
        type="text",
        level=condition.level,
        vocabulary=[PAD_TOKEN, UNKNOWN_TOKEN, *ranked],
        max_tokens=min(longest, max_tokens),
        paraphrases=max([s["paraphrases"] for s in summaries] + [1]),
        # Listed for a pretrained text encoder, which embeds each once at train start.
        texts=sorted(texts) if len(texts) <= MAX_INDEX_TEXTS else None,
    )


# ---------------------------------------------------------------- values


TextTable = tuple[np.ndarray, np.ndarray]  # tokens int32 [u, P, L], count int32 [u]


def condition_values(
    condition: ConditionColumn,
    column: pa.ChunkedArray,
    vocabulary: ConditionInfo | None,
    where: str,
) -> tuple[np.ndarray, TextTable | None]:
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
        if condition.count:
            return values.reshape(len(column), condition.count, condition.dim), None
        return values.reshape(len(column), condition.dim), None
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
    encoded = pc.dictionary_encode(joined_texts(column))
    rows = text_rows(encoded.dictionary)
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
