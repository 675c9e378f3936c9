"""`index.json`: what a directory of training shards holds, written last by the shard job.

A reader (trainers/data.py) refuses a shard directory without it. Besides the shard list it
carries everything a trainer needs to build its model without touching the dataset: the
observation shape, the action space, reward and return statistics, and for every
conditioning column its type and statistics (mean/std of scalars, vocabularies of
categoricals, a word vocabulary for text).

Text is encoded with `encode_text` (here, so the writer and the trainer's `ask` share one
tokenizer): lower-cased words of letters and digits, index 0 = padding, 1 = unknown word.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

SHARD_FORMAT_VERSION = 1
INDEX_NAME = "index.json"
PAD_TOKEN = "<pad>"
UNKNOWN_TOKEN = "<unk>"
WORD_PATTERN = re.compile(r"[a-z0-9]+")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShardInfo(_Model):
    """One tar file of the shard directory."""

    name: str = Field(description="File name relative to the shard directory.")
    windows: int = Field(description="Training windows (samples) in this shard.")
    episodes: int
    steps: int
    blocks: int = Field(description="Tar samples (blocks of consecutive steps) in the shard.")
    bytes: int
    sha256: str


class ObservationInfo(_Model):
    shape: list[int]
    dtype: str = "float32"
    mean: list[float] | None = Field(None, description="Per-dimension mean over all steps.")
    std: list[float] | None = Field(None, description="Per-dimension std over all steps.")


class ActionInfo(_Model):
    kind: Literal["continuous", "discrete"]
    dim: int | None = Field(None, description="Continuous: action dimension.")
    low: list[float] | None = Field(None, description="Continuous: smallest value seen per dim.")
    high: list[float] | None = Field(None, description="Continuous: largest value seen per dim.")
    n: int | None = Field(None, description="Discrete: number of actions (max seen + 1).")


class RewardInfo(_Model):
    mean: float
    std: float


class ReturnInfo(_Model):
    mean: float
    std: float
    min: float
    max: float
    quantiles: dict[str, float] = Field(
        default_factory=dict, description="Quantiles of the episode return, keyed '0.1' etc."
    )


class ConditionInfo(_Model):
    """One conditioning column as stored in the shards."""

    type: Literal["scalar", "vector", "categorical", "text"]
    level: Literal["steps", "episodes"] = Field(
        description="Where the column lives in the dataset; episode columns are broadcast."
    )
    dim: int | None = Field(None, description="vector: values per goal.")
    count: int | None = Field(
        None, description="vector: goals per step (k for hindsight_goal); the loader picks one."
    )
    mean: float | list[float] | None = None
    std: float | list[float] | None = None
    min: float | None = None
    max: float | None = None
    vocabulary: list[str] | None = Field(
        None,
        description="categorical: ordered labels; text: words, 0 = <pad>, 1 = <unk>.",
    )
    max_tokens: int | None = Field(None, description="text: tokens per text (0-padded).")
    paraphrases: int | None = Field(
        None, description="text: texts per row for list columns (1 for a plain string)."
    )


class ShardIndex(_Model):
    format_version: int = SHARD_FORMAT_VERSION
    source_dataset_id: str
    source_uri: str
    source_manifest_sha256: str
    seed: int
    window: int
    stride: int
    block_steps: int
    created_at: str
    command: str
    windows: int
    episodes: int
    steps: int
    shards: list[ShardInfo]
    observation: ObservationInfo
    action: ActionInfo
    reward: RewardInfo
    episode_return: ReturnInfo
    conditions: dict[str, ConditionInfo] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> ShardIndex:
        return cls.model_validate(json.loads(text))


def words(text: str) -> list[str]:
    """The words of a text as the text vocabulary sees them."""
    return WORD_PATTERN.findall(text.lower())


def encode_text(texts: list[str], vocabulary: list[str], max_tokens: int) -> np.ndarray:
    """Token ids [len(texts), max_tokens] (int32, 0-padded, 1 for unknown words)."""
    lookup = {word: i for i, word in enumerate(vocabulary)}
    tokens = np.zeros((len(texts), max_tokens), dtype=np.int32)
    for row, text in enumerate(texts):
        ids = [lookup.get(word, 1) for word in words(text)][:max_tokens]
        tokens[row, : len(ids)] = ids
    return tokens
