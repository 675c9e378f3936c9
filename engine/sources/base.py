"""The interface of an ingest format: a `Source` plans parts and reads a part into Arrow.

A format is one module in engine/sources/ holding one `Source` subclass and the frozen
dataclass that describes one of its parts:

    @dataclass(frozen=True, kw_only=True)
    class LeRobotPart(Part):
        path: str
        episodes: tuple[int, ...]

    class LeRobot(Source[LeRobotPart]):
        name = "lerobot"                          # the --format value
        def detect(self, path) -> bool: ...       # is this path in my format? (cheap)
        def plan(self, path, options) -> IngestPlan: ...   # in the driver: validate, cut
        def read_part(self, part) -> tuple[pa.Table, pa.Table]: ...   # in a task

plus one line in engine/sources/__init__.py that registers it. Ingest (engine/ingest.py)
does the rest: format detection, --on-error, the version writer, the skipped report.

`plan` reads only what is cheap (episode boundaries, rewards, flags, schemas), reports
every problem it finds as a `Problem` naming the file, the episode, the step and the
column (a problem without an episode fails the whole ingest; one with an episode can be
skipped), and cuts the episodes that are left into parts of about `options.part_steps`
steps, whole episodes only. `read_part` runs in a Ray task: it reads the part's rows and
returns the base step and episode tables through `engine.sources.tables.build_tables`.
Its output must depend on the part alone, so that a re-run writes the same bytes. Ingest
checks those tables as they will be stored (observations, actions, rewards: finite
float32), so a source need not read its observations in `plan`.

A source with images (engine/sources/images.py) lists them in the plan and in each part
(`images`, `cameras`; `plan` refuses non-uint8 image arrays and frames of another size
where it can see them cheaply, and cuts parts with `image_part_steps`), and its
`read_part` returns a third value: camera -> one encoded frame per row of the steps table.
A camera whose source stores video it can copy as it is (`ImageColumn.copied`: LeRobot's
MP4s) comes back in a `PartRead`'s `videos` instead: one video per episode.

Some bad input only shows once a part is read (a damaged video that fails to decode). A
source that finds such episodes returns a `PartRead` instead of the tuple: the tables
without those episodes (no rows, any columns, when none is left), and one `Problem` per
episode left out, naming it, in episode order (so that the report does not depend on
the part sizes). Ingest treats them like the problems of the stored values:
`--on-error fail` fails the job naming them, `--on-error skip` lists them in the report.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import pyarrow as pa

from engine import storage
from engine.parts import split_into_parts
from engine.sources.images import ImageColumn
from engine.sources.tables import EpisodeLabels
from engine.validate import Problem
from engine.writer import DEFAULT_PART_STEPS
from schemas.frames import CameraInfo

# What a source's `read_part` may return besides the base tables: camera -> one encoded
# frame per row of the steps table, in its order.
Frames = dict[str, list[bytes]]
# A video camera copied from the source (`ImageColumn.copied`): camera -> one video per
# row of the episodes table, in its order.
Videos = dict[str, list[bytes]]


@dataclass(frozen=True)
class PartRead:
    """What a `read_part` that can leave episodes out returns: the part's tables without
    them (and their frames), and why each was left out."""

    steps: pa.Table
    episodes: pa.Table
    frames: Frames = field(default_factory=dict)
    left_out: list[Problem] = field(default_factory=list)  # one per episode, by episode
    videos: Videos = field(default_factory=dict)  # copied cameras' videos, per episode
    # Episodes of a copied camera whose span could not be copied and was decoded and
    # encoded instead: (camera, episode, why).
    reencoded: list[tuple[str, int, str]] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class Part:
    """One part of a source: whole episodes that one task reads and writes. Each source
    adds where its rows are (a row range, a list of episode ids, ...)."""

    steps: int  # steps the part holds once read (progress, part sizes)
    labels: EpisodeLabels  # env id, source label and episode info columns of its episodes
    # The source's image arrays or columns, and their cameras (engine/sources/images.py).
    images: tuple[ImageColumn, ...] = ()
    cameras: dict[str, CameraInfo] = field(default_factory=dict, compare=False)

    @property
    def file(self) -> str:
        """The file that problems found in the part's values name (ingest checks each
        part's tables as stored); empty: the source path as given. A source whose parts
        each come from one file returns it."""
        return ""


PartType = TypeVar("PartType", bound=Part)


@dataclass(frozen=True)
class PlanOptions:
    """What the user said about a source; each format uses the fields that apply to it."""

    env_id: str | None = None  # recorded per episode; else the source's own, else "unknown"
    part_steps: int = DEFAULT_PART_STEPS  # steps per part (whole episodes)
    # Step tables: hindsight column -> the source column holding it (`--map`).
    column_map: tuple[tuple[str, str], ...] = ()
    # Raw image arrays and decoded videos: the codec their frames are encoded with. None
    # (no --codec): PNG, and a LeRobot video camera copied as it is where it can be.
    codec: str | None = None
    quality: int | None = None  # JPEG/WebP quality (None: the codec's default)


@dataclass(frozen=True)
class IngestPlan:
    """What the cheap first pass found: parts to write, and what was left out and why."""

    format: str
    source: str
    env_id: str
    parts: list[Part]
    steps: int
    episodes: int
    skipped: list[Problem] = field(default_factory=list)
    truncated_tails: list[dict[str, Any]] = field(default_factory=list)
    episode_info_columns: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    # Image arrays or columns of the source and their cameras: the `frames` group.
    images: list[ImageColumn] = field(default_factory=list)
    cameras: dict[str, CameraInfo] = field(default_factory=dict)
    on_error: str = "fail"  # set by plan_ingest: what to do with problems found in parts

    @classmethod
    def refused(cls, format: str, source: str, problems: list[Problem]) -> IngestPlan:
        """A plan with nothing to write: problems of whole files found early."""
        return cls(format, source, "unknown", [], 0, 0, skipped=problems)

    def skipped_report(self) -> dict[str, Any]:
        """The contents of the skipped report (`skipped.json`)."""
        return {
            "source": self.source,
            "skipped_episodes": len({p.episode for p in self.skipped if p.episode is not None}),
            "skipped": [p.to_dict() for p in self.skipped],
            "truncated_tails": self.truncated_tails,
        }


class Source(ABC, Generic[PartType]):
    """An ingest format: recognize a path, plan its parts, read one part into Arrow.

    Sources are plain objects: the one that planned a part travels with it to the Ray task
    that reads it."""

    name: ClassVar[str]  # the --format value, recorded in the manifest
    takes_column_map: ClassVar[bool] = False  # whether it reads `PlanOptions.column_map`

    @abstractmethod
    def detect(self, path: str) -> bool:
        """True when `path` (a file, a directory or a glob; local or S3) holds this format.
        Cheap: a file name or a directory listing, never the data."""

    @abstractmethod
    def plan(self, path: str, options: PlanOptions) -> IngestPlan:
        """Validate the source and cut it into parts of whole episodes; nothing is written.
        Problems go into `IngestPlan.skipped`; an unreadable file raises ValueError."""

    @abstractmethod
    def read_part(
        self, part: PartType
    ) -> tuple[pa.Table, pa.Table] | tuple[pa.Table, pa.Table, Frames] | PartRead:
        """The base (steps, episodes) tables of one part, sorted by (episode_id, t); a
        source with cameras (`part.images`) adds their encoded frames, one per step row;
        a source that left episodes out while reading returns a `PartRead`."""


# ---------------------------------------------------------------- helpers for sources


def part_ranges(lengths: np.ndarray | list[int], part_steps: int) -> list[tuple[int, int]]:
    """Index ranges [start, stop) of episodes (with these lengths) making up each part."""
    return split_into_parts(np.asarray(lengths, dtype=np.int64), max(1, int(part_steps)))


def source_label(format: str, path: str) -> str:
    """The `source` of every episode in the episodes table, e.g. `d4rl:logs.h5`."""
    return f"{format}:{os.path.basename(path.rstrip('/'))}"


def file_name(path: str) -> str:
    """The last component of a path, lower case: what a format is recognized by."""
    return os.path.basename(path.rstrip("/")).lower()


def directory_names(path: str) -> list[str]:
    """Names of the files in a local directory, or of every file below an S3 prefix;
    empty when there is no such directory."""
    if storage.is_s3(path):
        return [os.path.basename(f) for f in storage.list_files(path)]
    if os.path.isdir(path):
        return os.listdir(path)
    return []
