"""Materialize: a self-contained copy of a version, every column group zipped into one
`base` group (camera frames, if any, in a `frames` group next to it), for tools that read
Parquet files directly.

The copy is a child of the version it copies (its history goes on), and its metadata
records under `materialized_from` the version and the relabeler of every group, so the
columns stay traceable after their groups are gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.dataset import Dataset, open_dataset
from engine.executor import Executor
from engine.writer import VersionWriter, WrittenParts, base_manifest
from schemas.manifest import Manifest


@dataclass(frozen=True)
class MaterializeTask:
    """Copy part `index` of the version at `dataset_uri` (a task of the executor)."""

    index: int
    dataset_uri: str
    writer: VersionWriter


def materialize_part(task: MaterializeTask) -> WrittenParts:
    """Zip every group of one part into a single base part of the new version (and its
    frames part: frames stay in a group of their own)."""
    dataset = open_dataset(task.dataset_uri)
    steps = dataset.read_part(task.index, "steps")
    episodes = dataset.read_part(task.index, "episodes")
    return task.writer.write_base_part(task.index, steps, episodes)


def materialized_metadata(dataset: Dataset) -> dict[str, Any]:
    """The copied version's metadata, and where its columns came from."""
    return {
        **dataset.manifest.metadata,
        "materialized_from": {
            "uri": dataset.uri,
            "dataset_id": dataset.manifest.dataset_id,
            "groups": [
                {
                    "name": group.name,
                    "relabeler": group.relabeler.model_dump() if group.relabeler else None,
                }
                for group in dataset.manifest.groups
            ],
        },
    }


def materialize(dataset: Dataset, output: str, *, executor: Executor, command: str) -> Manifest:
    """Copy every part of `dataset` with all its columns into a new committed version at
    `output` with a single `base` group (and a `frames` group with its frames); its manifest. On any failure nothing is left: no
    staged files, no version."""
    with VersionWriter(output) as writer:
        tasks = [MaterializeTask(index, dataset.uri, writer) for index in range(dataset.num_parts)]
        written = executor.map(
            materialize_part, tasks, description="materialize", total=dataset.manifest.steps
        )
        manifest = base_manifest(
            writer.uri,
            written,
            operation="materialize",
            command=command,
            metadata=materialized_metadata(dataset),
            parent=dataset,
            cameras=dataset.cameras,
        )
        writer.commit(manifest)
    return manifest
