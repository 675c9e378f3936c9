"""Ingest formats: one module per format, registered here, one line each.

`ls engine/sources/` is the list of what `hindsight ingest` reads; base.py is the
interface every format implements (docs/ingest.md, "Adding an ingest format").
"""

from __future__ import annotations

from engine.sources.base import IngestPlan, Part, PlanOptions, Source
from engine.sources.d4rl import D4RL
from engine.sources.lerobot import LeRobot
from engine.sources.minari import Minari
from engine.sources.step_tables import JsonLines, Parquet

# Format name -> source. Detection asks them in this order and the first that recognizes
# a path wins: a format recognized by a directory layout goes before the generic step
# tables (whose detection takes any directory holding .parquet or .jsonl files).
SOURCES: dict[str, Source] = {
    source.name: source
    for source in (
        D4RL(),
        Minari(),
        LeRobot(),
        Parquet(),
        JsonLines(),
    )
}
FORMATS = tuple(SOURCES)


def source_for(format: str) -> Source:
    """The registered source of a format name."""
    if format not in SOURCES:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    return SOURCES[format]


def detect_format(path: str) -> str:
    """The format of a path: the first registered source that recognizes it."""
    for name, source in SOURCES.items():
        if source.detect(path):
            return name
    raise ValueError(f"cannot tell the format of {path}; pass --format one of {', '.join(FORMATS)}")


__all__ = [
    "FORMATS",
    "SOURCES",
    "IngestPlan",
    "Part",
    "PlanOptions",
    "Source",
    "detect_format",
    "source_for",
]
