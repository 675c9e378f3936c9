"""Where a `goals` job spends its time on one part, in each stored layout, and what a
reader pays to derive goal vectors from goal steps.

    python -m bench.goals --out bench/results/goals.json [--repeats 5] [--skip-layouts]

One 1M-step part of bench.relabel's data (1000-step episodes, observation 17 floats),
`goals:strategy=future,k=4,achieved=observation[0:3]`, all in this process on one core
(Arrow's thread pools set to one thread: a job runs one part per core), each figure the
best of `--repeats`, the sides alternated:

1. the part as a job task runs it: read the columns the relabeler reads, relabel (the
   NumPy kernel, then the conversion to Arrow), write the group's part file (Parquet
   encode, zstd, page CRCs, sha256, fsync: `VersionWriter.write_part`), and each column
   written alone;
2. layouts of the goal vectors, each written by the job's writer
   (`engine.writer.write_parquet`, with the three other columns) and read back whole by
   pyarrow and by Polars: the nested `FixedSizeList<FixedSizeList<float32>[G]>[k]` the
   relabeler writes (goal j reads as [k, G] rows natively), the same with non-null items,
   version 1.1's flat `FixedSizeList<float32>[k*G]`, k*G plain float32 columns, and goal
   steps only (no vectors, which consumers would gather from the achieved goals);
3. write settings for the goal column alone (`pyarrow.parquet.write_table`): the writer's
   (zstd, statistics, page CRCs), then one change at a time;
4. pandas groupby-apply computing the same columns on the same part
   (`bench.relabel.pandas_goals`), in the same rounds, so that the part's cost reads as a
   ratio per core;
5. the part as a job task runs it with `store=steps` (read episode_id and t, draw the goal
   steps, write that one column), in the same rounds as 1 and 4: against pandas computing
   goal vectors, rewards and flags, the columns a reader of either layout gets;
6. what a reader then pays per part (`Dataset.read_part` of the three derived columns
   from a committed store=steps version: read the achieved goals' column, episode_id, t
   and the goal steps, derive) against reading the same three columns stored by a
   committed store=vectors version.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench import best_of, save_results
from bench.relabel import GOAL_SLICE, K, pandas_frame, pandas_goals, write_bench_dataset

PART_STEPS = 1_000_000
EPISODE_LENGTH = 1000
PARAMS = {"strategy": "future", "k": K, "achieved": "observation[0:3]"}
GOAL_COLUMNS = ("hindsight_goal", "hindsight_goal_step", "hindsight_reward", "hindsight_reached")
DERIVED = ("hindsight_goal", "hindsight_reward", "hindsight_reached")


# ---------------------------------------------------------------- 1: the part as the job runs it


def part_breakdown(data_uri: str, workdir: Path, repeats: int) -> tuple[dict, pa.Table]:
    """Seconds of one part's task (read, kernel, Arrow conversion, write, each column
    written alone) and of pandas computing the same columns on the same part."""
    from engine.dataset import open_dataset
    from engine.writer import ROW_GROUP_ROWS, VersionWriter, write_parquet
    from jobs.relabeling import PartReader
    from relabelers.base import TableInputs
    from relabelers.goals import GoalsRelabeler
    from schemas import steps as cols

    dataset = open_dataset(data_uri)
    relabeler = GoalsRelabeler(PARAMS)
    reader = PartReader.of(dataset, relabeler)
    part = reader.part(0)
    steps, episodes = reader.read(part)
    relabeler.setup(TableInputs(steps, episodes))
    output = relabeler.run(steps, episodes, part).steps
    # store=steps: the job reads episode_id and t, draws, writes the goal steps.
    steps_relabeler = GoalsRelabeler(PARAMS | {"store": "steps"})
    steps_reader = PartReader.of(dataset, steps_relabeler)
    ids_t, ids_episodes = steps_reader.read(part)
    steps_relabeler.setup(TableInputs(steps, episodes))
    steps_output = steps_relabeler.run(ids_t, ids_episodes, part).steps
    assert steps_output.column(0).equals(output.column("hindsight_goal_step"))
    arrays = {name: _values(output.column(name)) for name in GOAL_COLUMNS}

    def to_arrow() -> pa.Table:
        """The output columns built from the kernel's NumPy arrays, in the stored types."""
        return pa.table(
            {name: _from_values(arrays[name], output.schema.field(name).type) for name in arrays}
        )

    rewards = dataset.read_part(0, "steps", ["episode_id", "reward", "observation"])
    achieved = cols.arrow_to_numpy(rewards.column("observation"))[:, GOAL_SLICE]
    frame, achieved_columns = pandas_frame(rewards, achieved)
    per_episode = pandas_goals(achieved_columns, np.random.default_rng(0))
    writer = VersionWriter(str(workdir / "out")).begin()
    timed: dict[str, Callable[[], object]] = {
        "read": lambda: reader.read(part),
        "relabel": lambda: relabeler.run(steps, episodes, part),
        "arrow_conversion": to_arrow,
        "write": lambda: writer.write_part(0, output, None, group="goals"),
        "steps_read": lambda: steps_reader.read(part),
        "steps_relabel": lambda: steps_relabeler.run(ids_t, ids_episodes, part),
        "steps_write": lambda: writer.write_part(0, steps_output, None, group="goal-steps"),
        "pandas": lambda: frame.groupby("episode_id", sort=False)[achieved_columns].apply(
            per_episode
        ),
    }
    for name in GOAL_COLUMNS:
        table = output.select([name])
        path = str(workdir / f"{name}.parquet")
        timed[f"write_{name}"] = lambda t=table, p=path: write_parquet(
            p, t, ROW_GROUP_ROWS["steps"]
        )
    seconds = best_of(repeats, timed)
    writer.abort()
    for suffix in ("", "_cpu"):
        seconds[f"kernel{suffix}"] = round(
            seconds[f"relabel{suffix}"] - seconds[f"arrow_conversion{suffix}"], 4
        )
        for prefix in ("", "steps_"):
            seconds[f"{prefix}part{suffix}"] = round(
                sum(seconds[f"{prefix}{name}{suffix}"] for name in ("read", "relabel", "write")),
                4,
            )
    return seconds, output


def _from_values(values: np.ndarray, data_type: pa.DataType) -> pa.Array:
    """A NumPy array (rows, k[, G]) as a column of `data_type` (nested fixed-size lists)."""
    item_types = []
    while pa.types.is_fixed_size_list(data_type):
        item_types.append(data_type)
        data_type = data_type.value_type
    array = pa.array(np.ascontiguousarray(values).reshape(-1), type=data_type)
    for list_type in reversed(item_types):
        array = pa.FixedSizeListArray.from_arrays(array, type=list_type)
    return array


def _values(column: pa.ChunkedArray) -> np.ndarray:
    """A nested fixed-size list column as a NumPy array of shape (rows, k[, G])."""
    array = column.combine_chunks()
    shape = [len(array)]
    while pa.types.is_fixed_size_list(array.type):
        shape.append(array.type.list_size)
        array = array.flatten()
    return array.to_numpy(zero_copy_only=False).reshape(shape)


# ---------------------------------------------------------------- 6: what a reader pays


def reader_costs(data_uri: str, workdir: Path, repeats: int) -> dict:
    """Seconds to read the three derived columns of part 0 from committed store=steps and
    store=vectors versions of the data (the same params and seed), and of each piece."""
    from engine.dataset import open_dataset
    from engine.executor import InProcess
    from jobs.relabeling import relabel
    from relabelers.goals import GoalsRelabeler

    versions = {}
    for store in ("vectors", "steps"):
        uri = str(workdir / f"relabeled-{store}")
        shutil.rmtree(uri, ignore_errors=True)
        relabeler = GoalsRelabeler(PARAMS | {"store": store})
        relabel(data_uri, uri, [relabeler], executor=InProcess(), command="bench.goals")
        versions[store] = open_dataset(uri)
    vectors, steps = versions["vectors"], versions["steps"]
    assert steps.read_part(0, "steps", DERIVED).equals(vectors.read_part(0, "steps", DERIVED))
    recipe = next(iter(steps.derived.values())).recipe
    stored = [c for c in steps.columns() if c not in steps.derived]
    sources = steps.read_part(0, "steps", recipe.sources(stored))
    seconds = best_of(
        repeats,
        {
            "read_stored_vectors": lambda: vectors.read_part(0, "steps", DERIVED),
            "read_derived": lambda: steps.read_part(0, "steps", DERIVED),
            "read_sources": lambda: steps.read_part(0, "steps", recipe.sources(stored)),
            "derive": lambda: recipe.derive(sources, DERIVED),
        },
    )
    return {
        "steps": steps.manifest.parts[0].steps,
        "sources_read": recipe.sources(stored),
        "seconds": seconds,
        # Above 1: deriving costs the reader more than reading stored vectors.
        "derived_vs_stored_read": round(
            seconds["read_derived"] / seconds["read_stored_vectors"], 2
        ),
        "derived_vs_stored_read_cpu": round(
            seconds["read_derived_cpu"] / seconds["read_stored_vectors_cpu"], 2
        ),
    }


# ---------------------------------------------------------------- 2: layouts


def layout_tables(output: pa.Table) -> dict[str, pa.Table]:
    """The relabeler's output columns stored in each candidate layout."""
    values = {name: _values(output.column(name)) for name in GOAL_COLUMNS}
    goals = values["hindsight_goal"].reshape(output.num_rows, K, -1)  # (rows, k, G)
    rows, k, goal_dim = goals.shape

    def lists(array: np.ndarray, sizes: tuple[int, ...], nullable: bool) -> pa.Array:
        column = pa.array(np.ascontiguousarray(array).reshape(-1))
        for size in reversed(sizes):
            item = pa.field("item", column.type, nullable=nullable)
            column = pa.FixedSizeListArray.from_arrays(column, type=pa.list_(item, size))
        return column

    def table(goal_sizes: tuple[int, ...] | None, nullable: bool) -> pa.Table:
        columns = (
            {} if goal_sizes is None else {"hindsight_goal": lists(goals, goal_sizes, nullable)}
        )
        for name in GOAL_COLUMNS[1:]:
            columns[name] = lists(values[name], (k,), nullable)
        return pa.table(columns)

    rest = table(None, nullable=False)
    flat_columns = {
        f"hindsight_goal_{j}_{d}": goals[:, j, d] for j in range(k) for d in range(goal_dim)
    } | {name: rest.column(name) for name in rest.column_names}
    return {
        "nested [k][G], non-null items (v1.2)": table((k, goal_dim), nullable=False),
        "nested [k][G], nullable items": table((k, goal_dim), nullable=True),
        "flat [k*G], nullable items (v1.1)": table((k * goal_dim,), nullable=True),
        "flat [k*G], non-null items": table((k * goal_dim,), nullable=False),
        "k*G float32 columns": pa.table(flat_columns),
        "goal steps only (vectors gathered when consumed)": rest,
    }


def compare_layouts(output: pa.Table, workdir: Path, repeats: int) -> dict:
    import polars as pl

    from engine.writer import ROW_GROUP_ROWS, write_parquet

    tables = layout_tables(output)
    paths = {name: str(workdir / f"layout-{i}.parquet") for i, name in enumerate(tables)}
    writes = best_of(
        repeats,
        {
            name: lambda t=table, p=paths[name]: write_parquet(p, t, ROW_GROUP_ROWS["steps"])
            for name, table in tables.items()
        },
    )
    reads = best_of(
        repeats, {name: lambda p=path: pq.read_table(p) for name, path in paths.items()}
    )
    polars = best_of(
        repeats, {name: lambda p=path: pl.read_parquet(p) for name, path in paths.items()}
    )
    return {
        name: {
            "write_s": writes[name],
            "write_cpu_s": writes[f"{name}_cpu"],
            "read_pyarrow_s": reads[name],
            "read_polars_s": polars[name],
            "bytes": os.path.getsize(paths[name]),
        }
        for name in tables
    }


# ---------------------------------------------------------------- 3: write settings


def compare_settings(output: pa.Table, workdir: Path, repeats: int) -> dict:
    """The goal column alone, the writer's settings and one change at a time."""
    table = output.select(["hindsight_goal"])
    writer = {
        "compression": "zstd",
        "row_group_size": 4096,
        "use_dictionary": False,
        "write_statistics": True,
        "write_page_checksum": True,
    }
    leaf, data_type = "hindsight_goal", table.schema.field("hindsight_goal").type
    while pa.types.is_fixed_size_list(data_type):  # Parquet's path to the float values
        leaf, data_type = leaf + ".list.element", data_type.value_type
    settings = {
        "writer's (zstd level 1, statistics, page CRCs)": {},
        "no statistics": {"write_statistics": False},
        "no page CRCs": {"write_page_checksum": False},
        "zstd level -1": {"compression_level": -1},
        "lz4": {"compression": "lz4"},
        "snappy": {"compression": "snappy"},
        "no compression": {"compression": "none"},
        "BYTE_STREAM_SPLIT + zstd": {"column_encoding": {leaf: "BYTE_STREAM_SPLIT"}},
    }
    path = str(workdir / "settings.parquet")
    sizes: dict[str, int] = {}

    def write(name: str) -> None:
        pq.write_table(table, path, **(writer | settings[name]))
        sizes[name] = os.path.getsize(path)

    seconds = best_of(repeats, {name: lambda n=name: write(n) for name in settings})
    return {
        name: {
            "write_s": seconds[name],
            "write_cpu_s": seconds[f"{name}_cpu"],
            "bytes": sizes[name],
        }
        for name in settings
    }


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default=None, help="where the data goes (default: temp)")
    parser.add_argument("--out", default="bench/results/goals.json")
    parser.add_argument(
        "--skip-layouts",
        action="store_true",
        help="leave out sections 2 and 3 (layouts and write settings of the goal vectors)",
    )
    args = parser.parse_args()
    earlier = _earlier_results(args.out)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="hs-bench-goals-"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = str(workdir / "data")
    shutil.rmtree(data, ignore_errors=True)
    write_bench_dataset(data, PART_STEPS, EPISODE_LENGTH, PART_STEPS)

    from relabelers.goals import GoalsRelabeler

    breakdown, output = part_breakdown(data, workdir, args.repeats)
    results = {
        "config": {
            "steps": output.num_rows,
            "episode_length": EPISODE_LENGTH,
            "goals": PARAMS,
            "goals_version": GoalsRelabeler.version,
            "repeats": args.repeats,
            "arrow_threads": 1,
        },
        "part_seconds": breakdown,
        # The part as a job task runs it (read, relabel, write) against pandas computing
        # the same columns in memory (no read, no write), both on one core; then the kernel
        # alone against pandas. store=vectors (the default) first, then store=steps.
        "part_vs_pandas_per_core": round(breakdown["pandas"] / breakdown["part"], 2),
        "part_vs_pandas_per_core_cpu": round(breakdown["pandas_cpu"] / breakdown["part_cpu"], 2),
        "relabel_vs_pandas_per_core": round(breakdown["pandas"] / breakdown["relabel"], 2),
        "store_steps_part_vs_pandas_per_core": round(
            breakdown["pandas"] / breakdown["steps_part"], 2
        ),
        "store_steps_part_vs_pandas_per_core_cpu": round(
            breakdown["pandas_cpu"] / breakdown["steps_part_cpu"], 2
        ),
        "reader_per_part": reader_costs(data, workdir, args.repeats),
    }
    if not args.skip_layouts:
        results["layouts"] = compare_layouts(output, workdir, args.repeats)
        results["goal_column_write_settings"] = compare_settings(output, workdir, args.repeats)
    results["load_average_1min"] = round(os.getloadavg()[0], 1)
    if earlier:
        results["earlier_runs"] = earlier
    shutil.rmtree(workdir, ignore_errors=True)
    save_results(results, args.out)


def _earlier_results(out: str) -> dict:
    """The figures already at `out`, kept under `earlier_runs` (by goals version and
    date) so that a new run does not lose the layouts measured before."""
    import json

    path = Path(out)
    if not path.exists():
        return {}
    previous = json.loads(path.read_text())
    earlier = previous.pop("earlier_runs", {})
    version = previous.get("config", {}).get("goals_version", "unknown")
    key = f"goals {version}, load {previous.get('load_average_1min')}"
    return earlier | {key: previous}


if __name__ == "__main__":
    main()
