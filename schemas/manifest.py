"""The manifest: what a committed dataset version is made of.

A dataset version is a directory (local or `s3://bucket/prefix`) holding `manifest.json`,
written last and atomically. It lists column groups: `base` (written by ingest) and one
group per relabeler applied. Every group's files are aligned row for row with the base
files (same split into parts, same row order), so reading a version is a zip, not a join.
A child version references its parent's groups by URI and checksum and never copies them.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field

from schemas.frames import CameraInfo

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SKIPPED_REPORT_NAME = "skipped.json"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataFile(_Model):
    """One Parquet file of a column group, relative to the group's root URI."""

    path: str = Field(description="Path relative to the group's `root`.")
    bytes: int
    sha256: str
    rows: int


class PartInfo(_Model):
    """One part: the unit of alignment. Episodes are never split across parts."""

    steps: int
    episodes: int
    min_episode_id: int
    max_episode_id: int


class FieldInfo(_Model):
    name: str
    type: str


class RelabelerInfo(_Model):
    """Which relabeler made a group, so every derived column is traceable."""

    name: str
    version: str
    params: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None
    report: dict[str, Any] = Field(
        default_factory=dict,
        description="What the relabeler measured while running (e.g. D-REX held-out accuracy).",
    )


class ColumnGroup(_Model):
    """Columns that were written together, in files aligned with the base parts."""

    name: str
    root: str = Field(
        description="The dataset directory that holds this group's files: stored relative to "
        "this version's directory ('.' for its own files, '../parent' for a parent's) when "
        "both are on one filesystem, else a full URI; a full URI once opened."
    )
    steps_files: list[DataFile] = Field(default_factory=list)
    episodes_files: list[DataFile] = Field(default_factory=list)
    steps_columns: list[FieldInfo] = Field(default_factory=list)
    episodes_columns: list[FieldInfo] = Field(default_factory=list)
    relabeler: RelabelerInfo | None = None
    inherited: bool = Field(
        default=False, description="True when the files belong to a parent version."
    )
    cameras: dict[str, CameraInfo] = Field(
        default_factory=dict,
        exclude_if=lambda cameras: not cameras,  # groups without frames stay as they were
        description="The frames group's cameras: column frame_<camera> -> shape and codec "
        "(schemas/frames.py).",
    )


class HistoryEntry(_Model):
    """One operation in this version's lineage (oldest first)."""

    operation: Literal["ingest", "collect", "relabel", "query", "materialize"]
    dataset_id: str
    command: str
    created_at: str
    details: dict[str, Any] = Field(default_factory=dict)


class Manifest(_Model):
    format_version: int = FORMAT_VERSION
    dataset_id: str
    parent_id: str | None = None
    parent_uri: str | None = None
    created_at: str
    command: str = Field(description="The command line or spec that made this version.")
    steps: int
    episodes: int
    parts: list[PartInfo]
    groups: list[ColumnGroup]
    history: list[HistoryEntry] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Free-form facts: env ids, observation/action spaces."
    )

    def group(self, name: str) -> ColumnGroup:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(f"no column group {name!r}; groups: {[g.name for g in self.groups]}")

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        return cls.model_validate(json.loads(text))


def public_url(text: str) -> str:
    """`text` as a manifest may record it: a URL loses its user, password and query (they
    may hold credentials); anything else is kept."""
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    if not parts.scheme or not parts.netloc:
        return text
    host = parts.netloc.rpartition("@")[2]  # host and port as written ([::1]:8000 too)
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def public_params(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters as a manifest may record them: every URL among the values made public."""

    def public(value: Any) -> Any:
        if isinstance(value, str):
            return public_url(value)
        if isinstance(value, list):
            return [public(item) for item in value]
        if isinstance(value, dict):
            return {key: public(item) for key, item in value.items()}
        return value

    return {key: public(value) for key, value in params.items()}


# A URL inside free text (an error message): up to a space, a quote or a bracket.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{}]+")


def public_text(text: str) -> str:
    """`text` with every URL in it made public (`public_url`), for messages and logs."""
    return _URL_IN_TEXT.sub(lambda match: public_url(match.group()), text)


# C0 and C1 control characters (escape codes, carriage return, bell, newline) and the
# invisible bidirectional overrides that reorder what a terminal shows.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` safe to print on one line of a terminal: every control character is shown as
    its escape (`\\x1b`, `\\n`, `\\u202e`), so data can neither move the cursor, clear the
    screen, retitle the terminal nor break a line. Only for showing: data is stored as given."""
    return _UNPRINTABLE.sub(lambda match: match.group().encode("unicode_escape").decode(), text)


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def content_id(groups: list[ColumnGroup], parent_id: str | None) -> str:
    """A dataset id derived from content: the same input and spec give the same id."""
    digest = hashlib.sha256()
    digest.update((parent_id or "").encode())
    for group in groups:
        digest.update(group.name.encode())
        if group.relabeler is not None:
            digest.update(json.dumps(group.relabeler.params, sort_keys=True).encode())
        for data_file in group.steps_files + group.episodes_files:
            digest.update(data_file.sha256.encode())
    return digest.hexdigest()[:16]
