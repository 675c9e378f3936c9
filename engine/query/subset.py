"""Writing a subset: the whole episodes a query matched, with every column of every group,
as a new self-contained version (one `base` group, and a `frames` group aligned with it
when the dataset has camera frames) written through `VersionWriter`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from engine.dataset import LEVELS, Dataset
from engine.parts import part_slices
from engine.progress import Progress
from engine.query.cluster import check_cluster_columns, cluster_order, write_clustered
from engine.query.plan import QueryError
from engine.query.read import (
    PART,
    START,
    PartReader,
    ReadStats,
    as_dataset,
    episode_rows,
    episode_table,
)
from engine.query.run import batches, matching_episodes
from engine.writer import (
    DEFAULT_PART_STEPS,
    OutputExistsError,
    VersionWriter,
    WrittenParts,
    base_manifest,
    check_new_output,
)
from schemas import steps as cols
from schemas.manifest import Manifest


def iter_episodes(
    dataset: Dataset | str, episode_ids: Sequence[int] | np.ndarray, stats: ReadStats | None = None
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Every step and episode column of the given whole episodes, one source part at a time
    (sorted by episode_id, with the dataset's Arrow types). Memory holds one batch (see
    PARTS_PER_BATCH) of chosen rows, read together, plus the row groups of the files being
    decoded at that moment (one file per Polars thread).

    Parts whose [min_episode_id, max_episode_id] in the manifest holds none of the ids are
    not opened.
    """
    dataset = as_dataset(dataset)
    stats = stats if stats is not None else ReadStats()
    wanted = np.unique(np.asarray(episode_ids, dtype=np.int64))
    schemas = {level: dataset.arrow_schema(level) for level in LEVELS}
    parts = []
    for index, part in enumerate(dataset.manifest.parts):
        low, high = np.searchsorted(wanted, [part.min_episode_id, part.max_episode_id + 1])
        if low == high:
            stats.parts_skipped += 1
        else:
            parts.append(index)
    chosen = episode_table(dataset, [], stats, parts)
    if chosen.height:
        chosen = chosen.filter(pl.col(cols.EPISODE_ID).is_in(pl.Series(wanted).implode()))
    step_reader = PartReader(dataset, "steps", stats)
    episode_reader = PartReader(dataset, "episodes", stats)
    for batch in batches(dataset, chosen):
        step_scans, episode_frames = [], []
        for index in batch:
            part_chosen = chosen.filter(pl.col(PART) == index) if chosen.height else chosen
            if not part_chosen.height:
                continue
            rows, _ = episode_rows(
                part_chosen[START].to_numpy(), part_chosen[cols.LENGTH].to_numpy()
            )
            whole = len(rows) == dataset.manifest.parts[index].steps
            step_scans.append(
                step_reader.scan(index, dataset.columns("steps"), None if whole else rows)
            )
            episodes = episode_reader.read(index, dataset.columns("episodes"))
            ids = part_chosen[cols.EPISODE_ID].implode()
            episode_frames.append(
                episodes.filter(pl.col(cols.EPISODE_ID).is_in(ids)).sort(cols.EPISODE_ID)
            )
        for steps, episodes in zip(step_reader.collect(step_scans), episode_frames):
            yield (
                steps.to_arrow().cast(schemas["steps"]),
                episodes.to_arrow().cast(schemas["episodes"]),
            )


def write_subset(
    dataset: Dataset | str,
    where: str | None,
    out_uri: str,
    *,
    command: str,
    limit_episodes: int | None = None,
    part_steps: int = DEFAULT_PART_STEPS,
    cluster_by: Sequence[str] | None = None,
    spill_dir: str | None = None,
) -> tuple[Manifest, ReadStats]:
    """A new self-contained version (one `base` group, every column) of the whole episodes
    with at least one step matching `where`; its history records the query and the parent.

    Written part by part as the episodes are read, in parts of about `part_steps` steps, so
    memory stays bounded however large the subset is. A failure leaves nothing behind. An
    output that is already a version (or holds other files) is a QueryError at once.

    With `cluster_by` (episode columns), the episodes are stored in the order of those
    columns under new ids, the old ones kept in `original_episode_id` (`engine.query.cluster`;
    spill files under `spill_dir`), so that selections on them read few row groups.
    """
    dataset = as_dataset(dataset)
    try:
        check_new_output(out_uri)  # at once, before any reading
    except OutputExistsError as error:  # a query's mistakes are QueryErrors; same message
        raise QueryError(str(error)) from error
    if cluster_by is not None:
        cluster_by = check_cluster_columns(dataset, cluster_by)
    selected = matching_episodes(dataset, where)
    if not selected.height:
        raise QueryError(
            f"{dataset.uri}: no episode matches --where {where!r}; nothing written to {out_uri}"
        )
    episode_ids = selected[cols.EPISODE_ID].to_numpy()
    if limit_episodes is not None:
        episode_ids = episode_ids[:limit_episodes]
    if not len(episode_ids):
        raise QueryError(f"--limit {limit_episodes} keeps no episode; nothing written to {out_uri}")
    stats = ReadStats()
    with VersionWriter(out_uri) as writer:
        if cluster_by:
            order = cluster_order(dataset, episode_ids, cluster_by, part_steps, stats)
            written = write_clustered(
                iter_episodes(dataset, episode_ids, stats),
                order,
                writer,
                total_episodes=len(episode_ids),
                spill_dir=spill_dir,
            )
        else:
            written = _write_in_order(dataset, episode_ids, writer, stats, part_steps)
        steps_count = sum(w.steps for w in written)
        episodes_count = sum(w.episodes for w in written)
        manifest = base_manifest(
            writer.uri,
            written,
            operation="query",
            command=command,
            parent=dataset,
            cameras=dataset.cameras,
            details={
                "where": where,
                "limit_episodes": limit_episodes,
                "parent_uri": dataset.uri,
                "parent_id": dataset.manifest.dataset_id,
                "episodes": episodes_count,
                "steps": steps_count,
                "groups_merged": [g.name for g in dataset.manifest.groups],
                **({"cluster_by": cluster_by} if cluster_by else {}),
            },
        )
        writer.commit(manifest)
    return manifest, stats


def _write_in_order(
    dataset: Dataset,
    episode_ids: np.ndarray,
    writer: VersionWriter,
    stats: ReadStats,
    part_steps: int,
) -> list[WrittenParts]:
    """The chosen episodes as parts of `writer`, in the source's order, as they are read."""
    with Progress("query --output", len(episode_ids), "episodes") as progress:
        written: list[WrittenParts] = []
        pending: tuple[pa.Table, pa.Table] | None = None
        for steps, episodes in iter_episodes(dataset, episode_ids, stats):
            progress.advance(episodes.num_rows)
            first_id = episodes.column(cols.EPISODE_ID)[0].as_py()
            if pending is not None and first_id <= pending[1].column(cols.EPISODE_ID)[-1].as_py():
                # Source parts whose episode ids interleave: a part is sorted, not the
                # dataset, so what waits becomes a part of its own.
                written.append(writer.write_base_part(len(written), *pending))
                pending = None
            if pending is not None:
                steps = pa.concat_tables([pending[0], steps])
                episodes = pa.concat_tables([pending[1], episodes])
            # Whole parts of `part_steps` (as write_dataset cuts them); the rest waits.
            *full, last = part_slices(steps, episodes, part_steps)
            for part_steps_table, part_episodes in full:
                written.append(
                    writer.write_base_part(len(written), part_steps_table, part_episodes)
                )
            pending = last
        if pending is not None:
            written.append(writer.write_base_part(len(written), *pending))
    return written
