"""`hindsight info`: what a path holds, in a few lines."""

from __future__ import annotations

import json
import os
from typing import Any

from pydantic import Field
from pydantic_settings import CliPositionalArg

from engine import storage
from jobs.command import PATH_KINDS, Command, UserError, path_kind, printable_lines
from schemas.manifest import MANIFEST_NAME
from schemas.shard_index import INDEX_NAME


class Info(Command):
    """Counts, schema, returns per noise level or skill, and history of a dataset version.

    Also says what any other path is: a set of shards, a training run, an unfinished
    version, or a folder of datasets (listed). Never starts Ray.

        hindsight info data/pendulum-rl
        hindsight info data/pendulum-rl --verify      # every file's sha256 against the manifest
        hindsight info data/                          # the datasets in a folder
    """

    name = "info"

    input: CliPositionalArg[str] = Field(
        description="A dataset version, shards, a run directory or a folder (local or s3://)."
    )
    bins: int = Field(10, ge=1, description="Bins of the return histograms.")
    verify: bool = Field(
        False, description="Also check every file's sha256 against the manifest (reads every byte)."
    )

    def run(self) -> dict[str, Any]:
        from engine.info import dataset_info

        uri = storage.normalize(self.input)
        kind = path_kind(uri)
        if kind == "dataset":
            return {"kind": kind, **dataset_info(uri, bins=self.bins, verify=self.verify)}
        if kind == "shards":
            return {"kind": kind, **shards_info(uri)}
        if kind == "run":
            return {"kind": kind, **run_info(uri)}
        inside = datasets_below(uri) if kind == "other" else []
        if inside:
            return {"kind": "folder", "uri": uri, "contents": inside}
        raise UserError(f"{self.input}: {PATH_KINDS[kind]}")

    def report(self, result: dict[str, Any], seconds: float) -> str:
        return printable_lines(self.text(result))

    def text(self, result: dict[str, Any]) -> str:
        from engine.info import format_info

        kind = result["kind"]
        if kind == "dataset":
            lines = [format_info(result), ""]
            lines.append(
                f"{result['dataset_id']}: {result['steps']:,} steps, {result['episodes']:,} "
                f"episodes, {len(result['groups'])} column group(s)"
            )
            if result["verified_files"] is not None:
                lines.append(
                    f"verified: all {result['verified_files']} files match their sha256, "
                    "and the dataset id matches their checksums"
                )
            return "\n".join(lines)
        if kind == "shards":
            return (
                f"{result['uri']}: shards of dataset {result['source_dataset_id']} "
                f"({result['source_uri']}): {result['shards']} shard(s), {result['windows']:,} "
                f"windows of {result['window']} steps, conditions "
                f"{', '.join(result['conditions']) or 'none'}"
            )
        if kind == "run":
            return (
                f"{result['uri']}: a training run ({result['model']}, condition "
                f"{', '.join(result['condition']) or 'none'}) on {result['shards']}: "
                f"{result['steps_done']} of {result['steps']} steps"
            )
        lines = [f"{result['uri']}: a folder holding"]
        lines += [f"  {entry['kind']:8} {entry['path']}" for entry in result["contents"]]
        return "\n".join(lines)


def shards_info(uri: str) -> dict[str, Any]:
    from schemas.shard_index import ShardIndex, describe_invalid

    index_uri = storage.join(uri, INDEX_NAME)
    try:
        index = ShardIndex.from_json(storage.read_bytes(index_uri))
    except ValueError as error:  # bad JSON, a wrong type, totals that disagree: one line
        raise UserError(
            f"{index_uri} is not a valid shard index: {describe_invalid(error)}"
        ) from error
    return {
        "uri": uri,
        "source_dataset_id": index.source_dataset_id,
        "source_uri": index.source_uri,
        "shards": len(index.shards),
        "windows": index.windows,
        "window": index.window,
        "conditions": list(index.conditions),
    }


def run_info(path: str) -> dict[str, Any]:
    from trainers.options import CONFIG, METRICS

    with open(os.path.join(path, CONFIG)) as handle:
        config = json.load(handle)
    options = config.get("options", {})
    metrics = os.path.join(path, METRICS)
    steps_done = 0
    if os.path.exists(metrics):
        with open(metrics) as handle:
            lines = [line for line in handle if line.strip()]
        steps_done = json.loads(lines[-1]).get("step", 0) if lines else 0
    return {
        "uri": path,
        "model": options.get("model"),
        "condition": list(options.get("condition") or []),
        "shards": options.get("shards") or options.get("input"),
        "steps": options.get("steps"),
        "steps_done": steps_done,
    }


def datasets_below(uri: str, limit: int = 200) -> list[dict[str, str]]:
    """Datasets, shards, runs and unfinished versions one level below a folder."""
    if storage.is_s3(uri):
        markers = {
            MANIFEST_NAME: "dataset",
            INDEX_NAME: "shards",
            storage.STAGING_MARKER: "staging",
        }
        found = []
        for file in storage.list_files(uri):
            parts = file[len(uri) + 1 :].split("/")
            if len(parts) == 2 and parts[1] in markers:
                found.append({"kind": markers[parts[1]], "path": storage.join(uri, parts[0])})
        return found[:limit]
    if not os.path.isdir(uri):
        return []
    found = []
    for name in sorted(os.listdir(uri))[:limit]:
        path = os.path.join(uri, name)
        kind = path_kind(path)
        if kind in ("dataset", "shards", "staging", "run"):
            found.append({"kind": kind, "path": path})
    return found
