"""Cutting whole tables into parts of whole episodes, and writing a small version from whole
tables in one process (tests, small data; jobs write part by part through the writer)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from engine.dataset import Dataset
from engine.writer import DEFAULT_PART_STEPS, VersionWriter, base_manifest
from schemas import steps as cols
from schemas.manifest import Manifest


def split_into_parts(episode_lengths: np.ndarray, part_steps: int) -> list[tuple[int, int]]:
    """Episode index ranges [start, stop) holding about `part_steps` steps each.

    Whole episodes only: a part may exceed `part_steps` by less than one episode.
    """
    ends = np.cumsum(episode_lengths)
    ranges = []
    start = 0
    while start < len(episode_lengths):
        offset = ends[start - 1] if start else 0
        stop = int(np.searchsorted(ends, offset + part_steps, side="left")) + 1
        stop = min(max(stop, start + 1), len(episode_lengths))
        ranges.append((start, stop))
        start = stop
    return ranges


def part_slices(
    steps: pa.Table, episodes: pa.Table, part_steps: int
) -> list[tuple[pa.Table, pa.Table]]:
    """(steps, episodes) slices of whole episodes, about `part_steps` steps each
    (`split_into_parts`); `steps` sorted by (episode_id, t), `episodes` by episode_id."""
    lengths = cols.arrow_to_numpy(episodes.column(cols.LENGTH))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return [
        (
            steps.slice(offsets[start], offsets[stop] - offsets[start]),
            episodes.slice(start, stop - start),
        )
        for start, stop in split_into_parts(lengths, part_steps)
    ]


def write_dataset(
    dataset_uri: str,
    steps: pa.Table,
    episodes: pa.Table,
    *,
    operation: str,
    command: str,
    metadata: dict[str, Any] | None = None,
    parent: Dataset | None = None,
    details: dict[str, Any] | None = None,
    part_steps: int = DEFAULT_PART_STEPS,
) -> Manifest:
    """Write a self-contained version with a single `base` group from whole tables, in this
    process (tests and small data; jobs write part by part). `steps` sorted by
    (episode_id, t), `episodes` by episode_id, with the same episodes."""
    with VersionWriter(dataset_uri) as writer:
        written = [
            writer.write_part(index, part_steps_table, part_episodes)
            for index, (part_steps_table, part_episodes) in enumerate(
                part_slices(steps, episodes, part_steps)
            )
        ]
        manifest = base_manifest(
            writer.uri,
            written,
            operation=operation,
            command=command,
            parent=parent,
            metadata=metadata,
            details=details,
        )
        writer.commit(manifest)
    return manifest
