"""`index.json`: what a directory of training shards holds, written last by the shard job,
and the names of the files and tar members in it (one place for the writer, engine/shards/,
and the reader, trainers/loader/).

A reader refuses a shard directory without index.json. Besides the shard list it
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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.frames import CameraInfo, frame_column

SHARD_FORMAT_VERSION = 1
INDEX_NAME = "index.json"
PAD_TOKEN = "<pad>"
UNKNOWN_TOKEN = "<unk>"
# Most distinct texts a text condition's index entry lists (`ConditionInfo.texts`).
MAX_INDEX_TEXTS = 100_000
WORD_PATTERN = re.compile(r"[a-z0-9]+")


class ShardError(RuntimeError):
    """Shards that cannot be written or read, with the shard and what to do."""


def describe_invalid(error: ValueError) -> str:
    """Why a JSON file of ours (index.json, manifest.json) did not load, on one line: each
    field that is wrong with what was expected, or where the JSON breaks."""
    if not isinstance(error, ValidationError):
        return str(error).replace("\n", " ")
    phrases = []
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        if not field:  # a check across fields: its message names them
            phrases.append(message)
            continue
        got = "" if problem["type"] == "missing" else f" (got {problem.get('input')!r:.40})"
        phrases.append(f"field {field}: {message}{got}")
    return "; ".join(phrases)


# ---------------------------------------------------------------- names in a shard directory


def shard_name(number: int) -> str:
    """The file name of shard `number` in its directory."""
    return f"shard-{number:05d}.tar"


# A tar sample (a block of steps, see engine/shards/) is the members `{key}.{member}.npy`
# with key `block_key(number)`; webdataset groups them by key.
BLOCK_PREFIX = "b"
NPY_SUFFIX = ".npy"
# Member suffixes a reader accepts at all: never a pickle. `.bin` holds encoded frames
# (PNG/JPEG/WebP bytes, only ever handed to the image decoder).
FRAME_DATA_SUFFIX = ".bin"
ALLOWED_SUFFIXES = (".npy", ".json", ".txt", FRAME_DATA_SUFFIX)

# Per step (one row per step of the block).
OBSERVATION = "observation"  # float32 [n, obs_dim]
ACTION = "action"  # float32 [n, act_dim] (continuous) or int64 [n] (discrete)
REWARD = "reward"  # float32 [n]
TIMESTEP = "timestep"  # int32 [n], t within the episode
# Per window (one row per window that ends in the block).
WINDOW_END = "window_end"  # int32 [m], block row of the window's last step
WINDOW_START = "window_start"  # int32 [m], block row of the window's first valid step
EPISODE_ID = "episode_id"  # int64 [m]
STEP_MEMBERS = (OBSERVATION, ACTION, REWARD, TIMESTEP)
WINDOW_MEMBERS = (WINDOW_END, WINDOW_START, EPISODE_ID)
CONDITION_PREFIX = "cond."


def block_key(number: int) -> str:
    """The tar key of block `number` of a shard."""
    return f"{BLOCK_PREFIX}{number:06d}"


def member_file(member: str) -> str:
    """A member's name after its block key: the array `member` as an .npy file."""
    return member + NPY_SUFFIX


def frame_data_file(camera: str) -> str:
    """Per step: a camera's encoded frames of the block's steps, concatenated as stored in
    the dataset (`frame_<camera>.bin`, never re-encoded)."""
    return frame_column(camera) + FRAME_DATA_SUFFIX


def frame_offsets_member(camera: str) -> str:
    """int64 [n + 1]: frame i of the block is bytes [offsets[i], offsets[i + 1]) of the
    camera's `.bin` member (`frame_<camera>.offsets.npy`)."""
    return frame_column(camera) + ".offsets"


def condition_member(column: str) -> str:
    """Per step: the values of a scalar, vector or categorical condition column."""
    return f"{CONDITION_PREFIX}{column}"


def text_index_member(column: str) -> str:
    """Per window: the row of the block's text table holding the window's text(s)."""
    return f"{CONDITION_PREFIX}{column}.index"


def text_tokens_member(column: str) -> str:
    """The block's text table: int32 [u, P, L] token ids (P texts per row, 0-padded)."""
    return f"{CONDITION_PREFIX}{column}.tokens"


def text_count_member(column: str) -> str:
    """The block's text table: int32 [u], how many of the P texts of a row are real."""
    return f"{CONDITION_PREFIX}{column}.count"


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

    @field_validator("name")
    @classmethod
    def _plain_file_name(cls, name: str) -> str:
        """A shard is a file of the shard directory: never a path that leads elsewhere."""
        if not name or name in (".", "..") or any(c in name for c in "/\\:"):
            raise ValueError("must be a plain file name inside the shard directory")
        return name


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
    texts: list[str] | None = Field(
        None,
        description="text: the distinct texts of the shards (each paraphrase apart), sorted, "
        f"when there are at most {MAX_INDEX_TEXTS:,}; a pretrained text encoder embeds them "
        "once at train start.",
    )
    embedding: dict[str, Any] | None = Field(
        None,
        description="vector written by the `embed` relabeler: its embedder, model, endpoint "
        "(public form) and dimensions, so `ask` can embed a request the same way.",
    )


class ExclusionInfo(_Model):
    """What the shard job left out (`--exclude`, and steps with a null text condition)."""

    predicate: str | None = Field(None, description="The --exclude predicate (Polars SQL).")
    excluded_steps: int = Field(0, description="Steps the predicate matched.")
    excluded_episodes: int = Field(0, description="Episodes with a step it matched.")
    null_steps: dict[str, int] = Field(
        default_factory=dict,
        description="By text condition: steps dropped because the text is null (not excluded).",
    )
    dropped_episodes: int = Field(0, description="Episodes left with no step, for any reason.")
    values: dict[str, list[str]] = Field(
        default_factory=dict,
        description="By text or categorical condition: its distinct values on excluded steps "
        "(each paraphrase apart), sorted; `ask` warns when a request is one of them.",
    )
    values_truncated: list[str] = Field(
        default_factory=list, description="Conditions with more distinct values than recorded."
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
    # None: the dataset's rewards are unknown (ingested without rewards; reward.npy holds NaN).
    reward: RewardInfo | None = None
    episode_return: ReturnInfo | None = None
    conditions: dict[str, ConditionInfo] = Field(default_factory=dict)
    cameras: dict[str, CameraInfo] = Field(
        default_factory=dict,
        description="Cameras whose encoded frames the blocks carry (the dataset's frames group).",
    )
    frame_stack: int = Field(
        1, ge=1, description="Frames the loader stacks per step (the step's and k - 1 before)."
    )
    camera_sources: dict[str, CameraInfo] = Field(
        default_factory=dict,
        description="Cameras the shards store otherwise than the dataset (a video camera's "
        "frames decoded to PNG): the dataset's camera, whose compression `ask` reproduces.",
    )
    exclusions: ExclusionInfo | None = Field(
        None, description="Steps left out: --exclude and null text conditions (none: all kept)."
    )
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> ShardIndex:
        """Totals that are the sum of the shards', sizes that can hold data (the loader
        checks the rest against the shards themselves)."""
        for total in ("windows", "episodes", "steps"):
            summed = sum(getattr(shard, total) for shard in self.shards)
            if getattr(self, total) != summed:
                raise ValueError(
                    f"field {total} is {getattr(self, total)}, the shards' {total} add up to "
                    f"{summed}"
                )
        small = [f for f in ("window", "stride", "block_steps") if getattr(self, f) < 1]
        shape = self.observation.shape
        if not self.has_state and shape == [0] and self.cameras:
            pass  # pixels only: no state vector, the frames are the observation
        elif not shape or min(shape) < 1:  # [0] only for shards with cameras
            small.append("observation.shape")
        if small:
            raise ValueError(f"field(s) {small} must be at least 1 (each dimension)")
        names = [shard.name for shard in self.shards]
        if len(set(names)) != len(names):
            raise ValueError("field shards lists a shard name twice")
        return self

    @property
    def has_state(self) -> bool:
        """Whether the steps carry a state vector; False for pixels-only shards (observation
        shape [0]: the loader yields a zero-width `observation`, the policy sees frames)."""
        return bool(self.observation.shape) and min(self.observation.shape) > 0

    def to_json(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        if not self.cameras:  # shards without frames keep the index they always had
            del data["cameras"], data["frame_stack"]
        if not self.camera_sources:  # nor do shards of image cameras
            del data["camera_sources"]
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> ShardIndex:
        return cls.model_validate(json.loads(text))


def words(text: str) -> list[str]:
    """The words of a text as the text vocabulary sees them."""
    return WORD_PATTERN.findall(text.lower())


def normalized_text(text: str) -> str:
    """A text's words, lower case, one space apart: the form a pretrained sentence embedder
    embeds, in training and in `ask` (all its words; a training window finds the text by its
    token row, which holds the first max_tokens)."""
    return " ".join(words(text))


def encode_text(texts: list[str], vocabulary: list[str], max_tokens: int) -> np.ndarray:
    """Token ids [len(texts), max_tokens] (int32, 0-padded, 1 for unknown words)."""
    lookup = {word: i for i, word in enumerate(vocabulary)}
    tokens = np.zeros((len(texts), max_tokens), dtype=np.int32)
    for row, text in enumerate(texts):
        ids = [lookup.get(word, 1) for word in words(text)][:max_tokens]
        tokens[row, : len(ids)] = ids
    return tokens
