"""Clustering a subset: its episodes stored in the order of chosen episode columns, so that
a later selection on those columns reads a few neighbouring Parquet row groups instead of
whole row groups all over the dataset (`hindsight query ... --output NEW --cluster-by COL`).

Steps are stored sorted by (episode_id, t) in every version (relabelers, shards and the
query planner rely on it), so episodes can only be stored in another order under new ids:
the clustered version numbers its episodes 0, 1, 2, ... in the order of the columns (ties
by the parent's id) and keeps each episode's id from before its first clustering in
ORIGINAL_EPISODE_ID.

A bucket sort, so memory stays flat in the subset's size: the source is read in its own
order, one batch of parts at a time (`iter_episodes`), and each chosen row is sent to the
output part its episode falls in, spilled to a local Arrow IPC file per batch (bucket by
bucket, sorted); then each output part gathers its slices of every spill file, sorts them
by the new ids and is written. Every byte is read from the source once, with its page CRCs
checked, and written twice (the spill, then the version); the spill needs local disk of
about the subset's size, uncompressed (`spill_dir`, else the system's temporary directory).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from engine.dataset import Dataset
from engine.parts import split_into_parts
from engine.progress import Progress
from engine.query.plan import QueryError
from engine.query.read import ReadStats, episode_table
from engine.writer import VersionWriter, WrittenParts
from schemas import steps as cols

# The id an episode had before `--cluster-by` first renumbered it; kept by later clusterings.
ORIGINAL_EPISODE_ID = "original_episode_id"


def check_cluster_columns(dataset: Dataset, cluster_by: Sequence[str]) -> list[str]:
    """The columns to cluster by, checked before anything is read: episode columns of a
    type that sorts (numbers, strings, booleans, dates; not vectors or structs)."""
    names = list(dict.fromkeys(cluster_by))
    if not names:
        raise QueryError("--cluster-by needs at least one episode column")
    schema = dataset.arrow_schema("episodes")
    episode_columns = ", ".join(schema.names)
    for name in names:
        if name not in schema.names:
            what = "a step column" if name in dataset.columns("steps") else "not a column"
            raise QueryError(
                f"--cluster-by {name!r}: {what}; --cluster-by orders whole episodes by "
                f"episode columns: {episode_columns}"
            )
        kind = schema.field(name).type
        if pa.types.is_nested(kind):
            raise QueryError(
                f"--cluster-by {name!r}: a column of type {kind} has no order; choose "
                f"numbers, strings, booleans or dates among: {episode_columns}"
            )
    return names


@dataclass(frozen=True)
class ClusterOrder:
    """Where each chosen episode goes: its new id (its rank in the clustered order) and its
    output part, looked up by the parent's id."""

    sorted_parent_ids: np.ndarray  # the chosen episodes' parent ids, ascending
    new_id_of_sorted: np.ndarray  # the new id of each of those
    part_of_new_id: np.ndarray  # output part of each new id
    num_parts: int

    def new_ids(self, parent_ids: np.ndarray) -> np.ndarray:
        return self.new_id_of_sorted[np.searchsorted(self.sorted_parent_ids, parent_ids)]


def cluster_order(
    dataset: Dataset,
    episode_ids: np.ndarray,
    cluster_by: Sequence[str],
    part_steps: int,
    stats: ReadStats,
) -> ClusterOrder:
    """The clustered order of the chosen episodes: by `cluster_by` ascending, nulls last,
    ties by the parent's episode_id; cut into output parts of about `part_steps` steps."""
    episodes = episode_table(dataset, cluster_by, stats, range(dataset.num_parts))
    episodes = episodes.filter(pl.col(cols.EPISODE_ID).is_in(pl.Series(episode_ids).implode()))
    try:
        ordered = episodes.sort([*cluster_by, cols.EPISODE_ID], nulls_last=True)
    except pl.exceptions.PolarsError as error:
        raise QueryError(f"--cluster-by {','.join(cluster_by)}: {error}") from None
    parent_ids = ordered[cols.EPISODE_ID].to_numpy()
    ranges = split_into_parts(ordered[cols.LENGTH].to_numpy(), part_steps)
    part_of_new_id = np.repeat(
        np.arange(len(ranges), dtype=np.int64), [stop - start for start, stop in ranges]
    )
    by_parent = np.argsort(parent_ids, kind="stable")
    return ClusterOrder(parent_ids[by_parent], by_parent, part_of_new_id, len(ranges))


def renumber(table: pa.Table, new_ids: np.ndarray) -> pa.Table:
    """`table` with its episode_id replaced by `new_ids` (same type), rows sorted by them
    (stable: the steps of an episode keep their order)."""
    index = table.schema.get_field_index(cols.EPISODE_ID)
    kind = table.schema.field(index).type
    table = table.set_column(index, cols.EPISODE_ID, pa.array(new_ids, type=kind))
    return table.take(pa.array(np.argsort(new_ids, kind="stable")))


@dataclass(frozen=True)
class _Spill:
    """One source batch's chosen rows, sorted by new id, and where each output part's
    rows start in it (steps and episodes)."""

    steps_path: str
    episodes_path: str
    steps_offsets: np.ndarray
    episodes_offsets: np.ndarray


def _write_ipc(path: str, table: pa.Table) -> None:
    with pa.ipc.new_file(path, table.schema) as sink:
        sink.write_table(table)


def _spill(
    directory: str, number: int, order: ClusterOrder, steps: pa.Table, episodes: pa.Table
) -> _Spill:
    parent_ids = episodes.column(cols.EPISODE_ID).to_numpy()
    new_ids = order.new_ids(parent_ids)
    if ORIGINAL_EPISODE_ID not in episodes.column_names:
        episodes = episodes.append_column(
            ORIGINAL_EPISODE_ID, pa.array(parent_ids, type=pa.int64())
        )
    step_new_ids = np.repeat(new_ids, episodes.column(cols.LENGTH).to_numpy())
    steps, episodes = renumber(steps, step_new_ids), renumber(episodes, new_ids)
    bounds = np.arange(order.num_parts + 1)

    def offsets(ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(order.part_of_new_id[np.sort(ids)], bounds, side="left")

    spill = _Spill(
        os.path.join(directory, f"steps-{number:05d}.arrow"),
        os.path.join(directory, f"episodes-{number:05d}.arrow"),
        offsets(step_new_ids),
        offsets(new_ids),
    )
    _write_ipc(spill.steps_path, steps)
    _write_ipc(spill.episodes_path, episodes)
    return spill


def _gather(paths: list[str], offsets: list[np.ndarray], part: int) -> pa.Table:
    """Output part `part`'s rows from every spill file, sorted by the new ids."""
    pieces = []
    for path, starts in zip(paths, offsets):
        if starts[part + 1] > starts[part]:
            with pa.memory_map(path) as source:
                table = pa.ipc.open_file(source).read_all()
                pieces.append(table.slice(starts[part], starts[part + 1] - starts[part]))
    table = pa.concat_tables(pieces)
    ids = table.column(cols.EPISODE_ID).to_numpy()
    return table.take(pa.array(np.argsort(ids, kind="stable"))).combine_chunks()


def write_clustered(
    batches_of_episodes: Iterable[tuple[pa.Table, pa.Table]],
    order: ClusterOrder,
    writer: VersionWriter,
    *,
    total_episodes: int,
    spill_dir: str | None = None,
) -> list[WrittenParts]:
    """Write the chosen episodes (`batches_of_episodes`: (steps, episodes) Arrow tables in
    the source's order, as `iter_episodes` yields them) as parts of `writer` in the
    clustered `order`, through spill files in a temporary directory under `spill_dir`."""
    with tempfile.TemporaryDirectory(prefix="hindsight-cluster-", dir=spill_dir) as directory:
        spills = []
        with Progress("query --output: ordering", total_episodes, "episodes") as progress:
            for steps, episodes in batches_of_episodes:
                spills.append(_spill(directory, len(spills), order, steps, episodes))
                progress.advance(episodes.num_rows)
        written = []
        with Progress("query --output: writing", order.num_parts, "parts") as progress:
            for part in range(order.num_parts):
                steps = _gather(
                    [s.steps_path for s in spills], [s.steps_offsets for s in spills], part
                )
                episodes = _gather(
                    [s.episodes_path for s in spills], [s.episodes_offsets for s in spills], part
                )
                written.append(writer.write_base_part(part, steps, episodes))
                progress.advance()
    return written
