"""`hindsight info`: what a dataset version holds, as a dict (JSON) and as text.

Counts, the schema of every column group (and which relabeler made it), the cameras of
its frames, the return distribution overall and per value of each low-cardinality episode
column (noise level, skill, ...), and the provenance: the history of operations that
produced the version. All numbers come from the episodes table through Polars, never from
the step files; a camera's bytes per frame from the Parquet footers of its files.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from engine import derived, storage
from engine.dataset import Dataset, open_dataset, scan_episodes, unreadable
from schemas import steps as cols
from schemas.frames import frame_column
from schemas.manifest import SKIPPED_REPORT_NAME, printable, public_text

HISTOGRAM_BINS = 10
MAX_GROUP_VALUES = 20
BAR_WIDTH = 30


def _histogram(values: np.ndarray, edges: np.ndarray) -> list[int]:
    counts, _ = np.histogram(values, bins=edges)
    return counts.astype(int).tolist()


def _stats(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"count": 0}
    return {
        "count": int(len(values)),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def _grouping_columns(episodes: pl.DataFrame) -> list[str]:
    """Episode columns worth a per-value breakdown: scalar, few distinct values."""
    skip = {cols.EPISODE_ID, cols.LENGTH, cols.RETURN}
    names = []
    for name, dtype in episodes.schema.items():
        if name in skip or not (dtype.is_numeric() or dtype == pl.String or dtype == pl.Boolean):
            continue
        if 1 < episodes[name].n_unique() <= MAX_GROUP_VALUES:
            names.append(name)
    return names


def _ordered_values(episodes: pl.DataFrame, name: str) -> list:
    """A column's values in order: by their `<name>_level` where the skill relabeler wrote
    one (novice before expert), else sorted."""
    level = f"{name}_level"
    if level in episodes.columns:
        by_level = episodes.group_by(name).agg(pl.col(level).min()).sort(level, name)
        return by_level[name].to_list()
    return episodes[name].unique().sort().to_list()


def stored_bytes(dataset: Dataset, columns: list[str], level: str = "steps") -> dict[str, int]:
    """Bytes each column of `level` takes on disk (its Parquet column chunks, compressed), from the
    footers of its group's files: no data page is read."""
    totals = dict.fromkeys(columns, 0)
    for column in columns:
        group = dataset.group_of(column, level)
        for uri in dataset.file_uris(group, level):
            fs, path = storage.filesystem(uri)
            try:
                metadata = pq.read_metadata(path, filesystem=fs)
            except (OSError, pa.ArrowException) as error:
                raise unreadable(uri, error) from error
            for i in range(metadata.num_row_groups):
                row_group = metadata.row_group(i)
                for j in range(row_group.num_columns):
                    if row_group.column(j).path_in_schema == column:
                        totals[column] += row_group.column(j).total_compressed_size
    return totals


def cameras_info(dataset: Dataset) -> list[dict[str, Any]]:
    """Per camera: its shape, codec (and quality) and the mean bytes a frame takes stored."""
    cameras = dataset.cameras
    sizes = {}
    for level, video in (("steps", False), ("episodes", True)):  # video: one per episode
        names = [frame_column(camera) for camera, info in cameras.items() if info.is_video == video]
        sizes.update(stored_bytes(dataset, names, level))
    steps = max(dataset.manifest.steps, 1)
    return [
        {
            "camera": camera,
            "column": frame_column(camera),
            **info.model_dump(),
            "bytes_per_frame": sizes[frame_column(camera)] / steps,
            "raw_bytes_per_frame": info.height * info.width * info.channels,
        }
        for camera, info in cameras.items()
    ]


def dataset_info(uri: str, bins: int = HISTOGRAM_BINS, verify: bool = False) -> dict[str, Any]:
    """Everything `hindsight info` shows, as plain JSON-able data. `verify` first checks
    every file's sha256 against the manifest and recomputes the dataset id from them
    (`Dataset.verify`: a DatasetError lists the files that differ, or the two ids)."""
    dataset = open_dataset(uri)
    verified_files = dataset.verify() if verify else None
    manifest = dataset.manifest
    episodes = scan_episodes(uri).collect()
    # Null returns are unknown (a dataset ingested without rewards): left out of the stats.
    returns = episodes[cols.RETURN].cast(pl.Float64).drop_nulls().to_numpy()
    if len(returns) and returns.min() < returns.max():
        edges = np.linspace(returns.min(), returns.max(), bins + 1)
    else:
        center = float(returns[0]) if len(returns) else 0.0
        edges = np.linspace(center - 0.5, center + 0.5, bins + 1)
    by_value: dict[str, list[dict[str, Any]]] = {}
    for name in _grouping_columns(episodes) if len(returns) else []:
        rows = []
        for value in _ordered_values(episodes, name):
            selected = (
                episodes.filter(pl.col(name) == value)
                if value is not None
                else (episodes.filter(pl.col(name).is_null()))
            )
            group_returns = selected[cols.RETURN].cast(pl.Float64).drop_nulls().to_numpy()
            rows.append(
                {
                    "value": value,
                    **_stats(group_returns),
                    "histogram": _histogram(group_returns, edges),
                }
            )
        by_value[name] = rows
    schema = dataset.arrow_schema("steps") if dataset.derived else pa.schema([])
    stored = pa.schema([f for f in schema if f.name not in dataset.derived])
    derived_types = {}
    for name, column in dataset.derived.items():
        why = derived.problem(column, stored)  # a manifest it cannot derive from: say why
        derived_types[name] = str(schema.field(name).type) + (f": cannot: {why}" if why else "")
    return {
        "uri": dataset.uri,
        "dataset_id": manifest.dataset_id,
        "parent_id": manifest.parent_id,
        "created_at": manifest.created_at,
        "command": manifest.command,
        "steps": manifest.steps,
        "episodes": manifest.episodes,
        "parts": len(manifest.parts),
        "verified_files": verified_files,
        "episode_length": _stats(episodes[cols.LENGTH].cast(pl.Float64).to_numpy()),
        "cameras": cameras_info(dataset),
        # Pixels only (collect --pixels-only, ingest of an image-only observation): no state.
        "pixels_only": bool(dataset.cameras)
        and cols.OBSERVATION not in dataset.columns("steps", frames=False),
        "env_ids": sorted(str(v) for v in episodes[cols.ENV_ID].unique().to_list())
        if cols.ENV_ID in episodes.columns
        else [],
        "groups": [
            {
                "name": group.name,
                "inherited": group.inherited,
                "relabeler": group.relabeler.model_dump() if group.relabeler else None,
                "steps_columns": {f.name: f.type for f in group.steps_columns},
                # Not stored: hindsight's readers derive them (engine/derived.py).
                "derived_steps_columns": {
                    name: derived_types[name]
                    for name, column in dataset.derived.items()
                    if column.group.name == group.name
                },
                "episodes_columns": {f.name: f.type for f in group.episodes_columns},
                "files": len(group.steps_files) + len(group.episodes_files),
                "bytes": sum(f.bytes for f in group.steps_files + group.episodes_files),
            }
            for group in manifest.groups
        ],
        # "absent": the source had no rewards, every reward and return is null (unknown).
        "reward": manifest.metadata.get(cols.REWARD, "present"),
        "returns": {
            **_stats(returns),
            "histogram": {"edges": edges.tolist(), "counts": _histogram(returns, edges)},
            "by": by_value,
        },
        "metadata": manifest.metadata,
        "history": [entry.model_dump() for entry in manifest.history],
    }


def _bar(count: int, largest: int) -> str:
    return "#" * (round(BAR_WIDTH * count / largest) if largest else 0)


def format_info(info: dict[str, Any]) -> str:
    """The human-readable form of `dataset_info`. Data strings (env ids, values, commands)
    are shown with control characters escaped and URLs without credentials."""
    lines = [
        f"dataset {info['dataset_id']}  ({info['uri']})",
        f"  created {info['created_at']} by: {info['command']}",
        f"  {info['steps']:,} steps, {info['episodes']:,} episodes, {info['parts']} part(s); "
        f"envs: {', '.join(info['env_ids']) or '-'}",
    ]
    length = info["episode_length"]
    if length.get("count"):
        lines.append(
            f"  episode length: mean {length['mean']:.1f}, min {length['min']:.0f}, "
            f"max {length['max']:.0f}"
        )
    lines.append("")
    lines.append("column groups:")
    for group in info["groups"]:
        made_by = (
            f" (relabeler {group['relabeler']['name']} {group['relabeler']['version']})"
            if group["relabeler"]
            else ""
        )
        inherited = ", inherited" if group["inherited"] else ""
        lines.append(f"  {group['name']}{made_by}: {group['bytes']:,} bytes{inherited}")
        for level in ("steps", "episodes"):
            for name, type_name in group[f"{level}_columns"].items():
                lines.append(f"    {level:8s} {name}: {type_name}")
        for name, type_name in group.get("derived_steps_columns", {}).items():
            lines.append(f"    {'steps':8s} {name}: {type_name} (derived at read, not stored)")
    if info.get("cameras"):
        lines += ["", "cameras:"]
        if info.get("pixels_only"):
            lines.append("  pixels only: no state vector, the frames are the observation")
        for camera in info["cameras"]:
            quality = f" quality {camera['quality']}" if camera["quality"] else ""
            if camera.get("fps"):  # a video per episode; copied: the source's crf is unknown
                quality = f" video, {camera['fps']} fps, gop {camera['gop']}, " + (
                    f"{camera['pix_fmt']}, copied from the source"
                    if camera.get("copied")
                    else f"crf {camera['crf']}"
                )
            ratio = camera["raw_bytes_per_frame"] / max(camera["bytes_per_frame"], 1e-9)
            lines.append(
                f"  {camera['camera']} ({camera['column']}): {camera['height']}x{camera['width']}"
                f"x{camera['channels']} {camera['dtype']}, {camera['codec']}{quality}, "
                f"{camera['bytes_per_frame']:,.0f} bytes per frame stored "
                f"({ratio:.1f}x smaller than raw)"
            )
    returns = info["returns"]
    if info.get("reward") == cols.ABSENT:
        lines += ["", "reward: absent (the source had none: rewards and returns are null)"]
    if returns.get("count"):
        lines += [
            "",
            f"returns: mean {returns['mean']:.3f}, std {returns['std']:.3f}, "
            f"min {returns['min']:.3f}, max {returns['max']:.3f}",
        ]
        edges, counts = returns["histogram"]["edges"], returns["histogram"]["counts"]
        largest = max(counts)
        for low, high, count in zip(edges[:-1], edges[1:], counts):
            lines.append(f"  [{low:10.3f}, {high:10.3f})  {count:6d} {_bar(count, largest)}")
        for name, rows in returns["by"].items():
            lines += ["", f"returns by {name}:"]
            for row in rows:
                lines.append(
                    f"  {name}={row['value']}: {row['count']} episodes, mean {row['mean']:.3f}, "
                    f"min {row['min']:.3f}, max {row['max']:.3f}"
                )
                spark = " ".join(f"{c}" for c in row["histogram"])
                lines.append(f"    histogram (same bins): {spark}")
    if info["metadata"].get("skipped_report"):
        lines += [
            "",
            f"skipped: {info['metadata'].get('skipped_episodes', 0)} episode(s), see "
            f"{info['metadata'].get('skipped_report', SKIPPED_REPORT_NAME)}",
        ]
    lines += ["", "history:"]
    for entry in info["history"]:
        lines.append(
            f"  {entry['created_at']}  {entry['operation']:11s} {entry['dataset_id']}  "
            f"{entry['command']}"
        )
    # A value may hold terminal escape codes or a line break: each line is shown as one line.
    return "\n".join(printable(public_text(line)) for line in lines)
