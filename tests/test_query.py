"""Queries by conditioning attributes: results equal an independent Polars computation on
the raw Parquet files, locally and on S3; subsets are whole, valid dataset versions."""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

import engine
import engine.dataset
import engine.query.read
import engine.query.run
import engine.writer
from engine import storage
from engine.dataset import (
    DatasetError,
    open_dataset,
)
from engine.query import (
    PartReader,
    QueryError,
    ReadStats,
    across_rows,
    count,
    expression_tree,
    is_row_local,
    query,
    row_group_selection,
    write_subset,
)
from engine.writer import VersionWriter
from jobs.cli import main as cli_main
from jobs.commands.query import Query
from schemas import steps as cols
from tests.synthetic import attach_group, make_episodes, write_synthetic_dataset

SKILL_BY_NOISE = {0.0: "expert", 0.5: "intermediate", 1.0: "novice"}


def relabeled_dataset(root: str, num_episodes: int = 40, part_steps: int = 150) -> str:
    """A base version and a child with a `labels` group, as a relabeler would attach it:
    `skill` per episode (from the noise level) and `return_to_go` per step."""
    steps, episodes = make_episodes(num_episodes=num_episodes, seed=3, max_length=25)
    base_uri = storage.join(root, "base")
    write_synthetic_dataset(base_uri, steps, episodes, part_steps=part_steps)

    def labels(parent, index):
        part_steps_table = pl.from_arrow(parent.read_part(index, columns=["episode_id", "reward"]))
        return_to_go = part_steps_table.select(
            pl.col("reward").reverse().cum_sum().reverse().over("episode_id").alias("return_to_go")
        )
        part_episodes = pl.from_arrow(parent.read_part(index, "episodes", ["noise"]))
        skill = part_episodes.select(
            pl.col("noise").replace_strict(SKILL_BY_NOISE, return_dtype=pl.String).alias("skill")
        )
        return return_to_go.to_arrow(), skill.to_arrow()

    return attach_group(base_uri, storage.join(root, "labeled"), "labels", labels)


def raw_tables(uri: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Steps and episodes straight from every group's Parquet files (the independent way)."""
    manifest = open_dataset(uri).manifest
    tables = {}
    for level in ("steps", "episodes"):
        frames = []
        for group in manifest.groups:
            files = [storage.join(group.root, f.path) for f in getattr(group, f"{level}_files")]
            frames.append(
                pl.concat(
                    [
                        pl.read_parquet(f, storage_options=storage.polars_storage_options(f))
                        for f in files
                    ]
                )
            )
        tables[level] = pl.concat(frames, how="horizontal")
    return tables["steps"], tables["episodes"]


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    # Small row groups, so that skipping row groups is exercised on a tiny dataset.
    mp = pytest.MonkeyPatch()
    mp.setattr(engine.writer, "ROW_GROUP_ROWS", {"steps": 16, "episodes": 16})
    try:
        uri = relabeled_dataset(str(tmp_path_factory.mktemp("query")))
    finally:
        mp.undo()
    return uri


@pytest.fixture(scope="module")
def raw(labeled):
    return raw_tables(labeled)


def fail_writing_the_second_part(monkeypatch) -> None:
    """The second part the writer writes fails as a full disk would."""
    write_part = VersionWriter.write_part
    calls = []

    def fail_on_the_second_part(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise OSError("disk full")
        return write_part(*args, **kwargs)

    monkeypatch.setattr(VersionWriter, "write_part", fail_on_the_second_part)


def test_episode_condition_keeps_every_step_of_matching_episodes(labeled, raw):
    steps, episodes = raw
    result = query(labeled, "skill = 'expert' AND return > -3")
    chosen = episodes.filter((pl.col("skill") == "expert") & (pl.col("return") > -3))
    expected = steps.join(chosen.select("episode_id"), on="episode_id", how="semi")
    assert 0 < chosen.height < episodes.height
    assert_frame_equal(result.frame, expected)
    assert result.plan.row_condition is None
    assert count(labeled, "skill = 'expert' AND return > -3") == expected.height


@pytest.mark.parametrize(
    ("where", "expected_filter"),
    [
        ("return_to_go > 1.5", pl.col("return_to_go") > 1.5),
        (
            "return_to_go > 0 AND skill <> 'novice' AND t BETWEEN 2 AND 9",
            (pl.col("return_to_go") > 0)
            & (pl.col("skill") != "novice")
            & pl.col("t").is_between(2, 9),
        ),
        ("reward > return / 10", pl.col("reward") > pl.col("return") / 10),
        (
            "skill = 'novice' OR reward > 1.5",
            (pl.col("skill") == "novice") | (pl.col("reward") > 1.5),
        ),
        (
            "episode_id IN (17, 57, 397) AND t < 3",
            pl.col("episode_id").is_in([17, 57, 397]) & (pl.col("t") < 3),
        ),
    ],
)
def test_step_and_mixed_conditions_equal_an_independent_join(
    labeled, raw, where, expected_filter, monkeypatch
):
    monkeypatch.setattr(engine.query.run, "PARTS_PER_BATCH", 3)
    steps, episodes = raw
    joined = steps.join(episodes.select("episode_id", "return", "skill"), on="episode_id")
    expected = joined.filter(expected_filter).select(steps.columns)
    result = query(labeled, where)
    assert expected.height > 0
    assert_frame_equal(result.frame, expected)
    assert count(labeled, where) == expected.height


def test_select_repeats_episode_columns_on_steps(labeled, raw):
    steps, episodes = raw
    result = query(
        labeled, "skill = 'intermediate'", select=["episode_id", "t", "return_to_go", "skill"]
    )
    expected = (
        steps.join(episodes.select("episode_id", "skill"), on="episode_id")
        .filter(pl.col("skill") == "intermediate")
        .select("episode_id", "t", "return_to_go", "skill")
    )
    assert_frame_equal(result.frame, expected)


def test_episodes_query(labeled, raw):
    _, episodes = raw
    result = query(
        labeled,
        "skill = 'expert' AND return > -3",
        level="episodes",
        select=["episode_id", "return", "skill"],
    )
    expected = episodes.filter((pl.col("skill") == "expert") & (pl.col("return") > -3)).select(
        "episode_id", "return", "skill"
    )
    assert_frame_equal(result.frame, expected)
    assert result.stats.bytes > 0 and result.stats.files == 2 * open_dataset(labeled).num_parts


def test_limit_stops_reading_early(labeled, raw, monkeypatch):
    monkeypatch.setattr(engine.query.run, "PARTS_PER_BATCH", 1)
    steps, _ = raw
    result = query(labeled, "reward > 0", limit=5)
    assert_frame_equal(result.frame, steps.filter(pl.col("reward") > 0).head(5))
    assert result.stats.parts_skipped > 0


def test_no_match_gives_an_empty_frame_with_the_schema(labeled):
    result = query(labeled, "skill = 'nobody'", select=["episode_id", "observation", "skill"])
    assert result.frame.height == 0
    assert result.frame.columns == ["episode_id", "observation", "skill"]
    assert isinstance(result.frame.schema["observation"], pl.Array)


def test_selective_query_reads_only_needed_row_groups_and_columns(labeled):
    full = query(labeled)
    selective = query(labeled, "episode_id < 60", select=["episode_id", "t", "return_to_go"])
    assert selective.stats.row_groups_skipped > 0
    assert selective.stats.bytes * 4 < full.stats.bytes
    # Why engine.scan alone cannot do this: Polars stops a filter at a horizontal concat.
    plan = engine.scan(labeled).filter(pl.col("episode_id") < 60).explain()
    assert "HCONCAT" in plan


def test_row_group_selection_positions_rows_in_the_groups_read():
    offsets = np.array([0, 10, 20, 30, 35])
    rows = np.array([3, 4, 25, 26, 34])
    groups, positions = row_group_selection(rows, offsets)
    assert groups.tolist() == [0, 2, 3]
    # Groups 0, 2 and 3 read one after another: rows 0-9, then 20-29 at 10-19, 30-34 at 20-24.
    assert positions.tolist() == [3, 4, 15, 16, 24]


def test_part_reader_takes_the_right_rows_across_row_groups(labeled):
    dataset = open_dataset(labeled)
    whole = pl.read_parquet(dataset.file_uris(dataset.manifest.groups[0], "steps")[0])
    rows = np.array([0, 3, 15, 16, 17, 40, 41, 42, whole.height - 1])
    stats = ReadStats()
    frame = PartReader(dataset, "steps", stats).read(0, ["t", "return_to_go", "episode_id"], rows)
    labels = pl.read_parquet(dataset.file_uris(dataset.manifest.groups[1], "steps")[0])
    expected = pl.concat([whole, labels], how="horizontal")[rows]
    assert_frame_equal(frame, expected.select("t", "return_to_go", "episode_id"))
    assert stats.row_groups_skipped > 0


def test_parts_are_batched_by_their_candidate_rows(labeled, monkeypatch):
    """Whole parts are read PARTS_PER_BATCH at a time; a few episodes from every part are
    read in one batch, so all parts are decoded in parallel."""
    monkeypatch.setattr(engine.query.run, "PARTS_PER_BATCH", 2)
    dataset = open_dataset(labeled)
    steps = [part.steps for part in dataset.manifest.parts]
    assert len(steps) >= 4
    everything = engine.query.read.episode_table(dataset, [], ReadStats(), range(len(steps)))
    batches = engine.query.run.batches(dataset, everything)
    assert [index for batch in batches for index in batch] == list(range(len(steps)))
    for batch in batches:
        assert len(batch) == 1 or sum(steps[i] for i in batch) <= 2 * max(steps)
    assert len(batches) >= len(steps) // 3
    one_episode_per_part = everything.group_by("__part", maintain_order=True).head(1)
    assert engine.query.run.batches(dataset, one_episode_per_part) == [list(range(len(steps)))]
    # With a limit, parts are read only until their candidate rows could fill it.
    limited = engine.query.run.batches(dataset, everything, limit=1)
    assert limited == [[index] for index in range(len(steps))]


def test_chosen_rows_read_as_row_groups_have_the_types_of_a_whole_scan(tmp_path, monkeypatch):
    """Struct observations and bool lists come back typed as Polars' own reader types them."""
    monkeypatch.setattr(engine.writer, "ROW_GROUP_ROWS", {"steps": 8, "episodes": 8})
    steps, episodes = make_episodes(num_episodes=12, goal_dim=2, seed=3)
    base = str(tmp_path / "base")
    write_synthetic_dataset(base, steps, episodes)

    def flags(parent, index):
        n = parent.manifest.parts[index].steps
        values = pa.array(np.arange(n * 2) % 3 == 0)
        return pa.table({"reached": pa.FixedSizeListArray.from_arrays(values, 2)}), None

    child = attach_group(base, str(tmp_path / "child"), "flags", flags)
    dataset = open_dataset(child)
    columns = ["observation", "reached", "t"]
    reader = PartReader(dataset, "steps", ReadStats())
    whole = reader.read(0, columns)
    rows = np.array([1, 2, 9, 30, whole.height - 1])
    assert_frame_equal(reader.read(0, columns, rows), whole[rows])
    assert reader.read(0, columns, np.array([], dtype=np.int64)).schema == whole.schema
    with pytest.raises(DatasetError, match="not aligned"):
        reader.read(0, columns, np.array([whole.height]))


def test_a_file_that_breaks_after_opening_fails_with_its_name(tmp_path, monkeypatch):
    """Reads run on Polars' threads; their errors come back on the caller's thread as a
    DatasetError naming the file, and the CLI exits cleanly with status 2."""
    monkeypatch.setattr(engine.writer, "ROW_GROUP_ROWS", {"steps": 16, "episodes": 16})
    uri = relabeled_dataset(str(tmp_path))
    dataset = open_dataset(uri)
    labels = dataset.manifest.group("labels")
    broken = storage.join(labels.root, labels.steps_files[2].path)
    with open(broken, "r+b") as handle:  # the footer length, file size unchanged
        handle.seek(-8, io.SEEK_END)
        handle.write(b"\xff\xff\xff\x7f")
    with pytest.raises(DatasetError, match="part-00002.parquet: cannot read"):
        query(dataset, "episode_id % 3 = 0")
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.cli",
            "query",
            uri,
            "--where",
            "episode_id % 3 = 0",
            "--format",
            "csv",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    assert completed.returncode == 2, completed.stderr
    assert "part-00002.parquet: cannot read" in completed.stderr

    # Damaged data pages in a whole-part read (Polars' own scan) name the part's files.
    base = dataset.manifest.group("base")
    damaged = storage.join(base.root, base.steps_files[3].path)
    size = os.path.getsize(damaged)
    with open(damaged, "r+b") as handle:
        handle.seek(4)
        handle.write(np.random.default_rng(0).bytes(size // 2))
    with pytest.raises(DatasetError, match=r"steps/part-00003.parquet.*cannot read"):
        query(dataset, select=["t", "observation"])  # base files only: part 2 is fine

    # A file with fewer rows than the episodes say: the alignment error, not an IndexError.
    short = storage.join(labels.root, labels.steps_files[1].path)
    table = pq.read_table(short)
    pq.write_table(table.slice(0, table.num_rows - 5), short, row_group_size=16)
    reader = PartReader(dataset, "steps", ReadStats())
    with pytest.raises(DatasetError, match="not aligned"):
        reader.read(1, ["return_to_go"], np.array([0, table.num_rows - 1]))


def test_unknown_column_lists_the_available_ones(labeled):
    with pytest.raises(QueryError) as error:
        query(labeled, "skil = 'expert'")
    message = str(error.value)
    assert "'skil'" in message and "return_to_go" in message and "skill" in message


@pytest.mark.parametrize(
    "where, expected",
    [
        ("reward > avg(reward)", "an aggregate"),
        ("count(*) > 3", "an aggregate"),
        ("reward > lag(reward) OVER (ORDER BY t)", "a window over more than one episode"),
        ("rank() OVER (ORDER BY reward) < 3", "a function of other rows"),
        ("reward > quantile_cont(reward, 0.5)", "a function of other rows"),
    ],
)
def test_conditions_across_step_rows_are_refused(labeled, where, expected):
    """Steps are filtered part by part: an aggregate over them would be per part."""
    with pytest.raises(QueryError, match=f"{expected}.*not supported"):
        query(labeled, where)


def test_aggregates_over_episodes_and_windows_within_an_episode_work(labeled, raw):
    steps, episodes = raw
    result = query(labeled, "return > avg(return)", level="episodes")
    mean = episodes["return"].mean()
    assert_frame_equal(result.frame, episodes.filter(pl.col("return") > mean))
    per_episode_best = "reward = max(reward) OVER (PARTITION BY episode_id) AND skill = 'expert'"
    expected = (
        steps.join(episodes.select("episode_id", "skill"), on="episode_id")
        .filter(
            (pl.col("reward") == pl.col("reward").max().over("episode_id"))
            & (pl.col("skill") == "expert")
        )
        .select(steps.columns)
    )
    assert_frame_equal(query(labeled, per_episode_best).frame, expected)


def test_row_local_step_conditions_run_part_by_part(labeled, raw, monkeypatch):
    """Functions on the allow-list (per value: abs, casts, coalesce, string functions, IN,
    arithmetic over step and episode columns) give what Polars gives on the whole table."""
    monkeypatch.setattr(engine.query.run, "PARTS_PER_BATCH", 1)
    steps, episodes = raw
    where = (
        "abs(reward) < 1 AND CAST(t AS DOUBLE) / 2 >= 1 AND coalesce(return_to_go, 0) > -100 "
        "AND (lower(skill) LIKE 'ex%' OR t IN (3, 5, 7)) "
        "AND reward * 2 < return_to_go + length(skill)"
    )
    expected = (
        steps.join(episodes.select("episode_id", "skill"), on="episode_id")
        .filter(
            (pl.col("reward").abs() < 1)
            & (pl.col("t") / 2 >= 1)
            & (pl.col("return_to_go").fill_null(0) > -100)
            & (
                pl.col("skill").str.to_lowercase().str.starts_with("ex")
                | pl.col("t").is_in([3, 5, 7])
            )
            & (pl.col("reward") * 2 < pl.col("return_to_go") + pl.col("skill").str.len_chars())
        )
        .select(steps.columns)
    )
    result = query(labeled, where)
    assert 0 < expected.height < steps.height
    assert result.plan.row_condition is not None
    assert_frame_equal(result.frame, expected)
    # Whatever a window partitioned by episode_id computes stays within one episode.
    rising = query(labeled, "reward > lag(reward) OVER (PARTITION BY episode_id ORDER BY t)")
    previous = pl.col("reward").shift().over("episode_id", order_by="t")
    assert_frame_equal(rising.frame, steps.filter(pl.col("reward") > previous))


def test_an_operation_not_on_the_allow_list_is_refused_by_name(labeled):
    """Whatever is not known to be row-local is refused, naming it: `unnest` (which the
    earlier deny-list let through), and a function Polars might add tomorrow."""
    with pytest.raises(QueryError, match=r"\(Explode: .*not supported.*engine\.scan"):
        query(labeled, "unnest(observation) > 0")
    # hash() is per value but not on the list: refused until someone checks and lists it.
    refusal = across_rows(pl.col("reward").hash() > 3)
    assert refusal is not None
    assert refusal.startswith("an operation not known to be row-local (Hash: ")
    assert not is_row_local("Function.SomeFunctionOfAFuturePolars")
    assert is_row_local("Function.Pow.Sqrt") and not is_row_local("Function.Boolean.Any")
    assert across_rows(pl.col("reward").sqrt().is_between(0, 1) & pl.col("t").is_in([1])) is None


def test_polars_serialized_expressions_read_as_the_allow_list_expects():
    """The allow-list reads Polars' serialized expressions, which Polars may change: if
    this fails after a Polars upgrade, update `expression_tree` (engine/query/row_local.py)
    until these names come back."""
    expression = pl.sql_expr(
        "abs(reward) < 1 AND lower(skill) LIKE 'ex%' AND skill IN ('a', 'b') "
        "AND CAST(t AS DOUBLE) > 2 AND reward = max(reward) OVER (PARTITION BY episode_id)"
    )
    tree = expression_tree(expression)
    assert {node.name for node in tree.walk()} == {
        "BinaryExpr.And",
        "BinaryExpr.Lt",
        "BinaryExpr.Gt",
        "BinaryExpr.Eq",
        "Function.Abs",
        "Function.StringExpr.Lowercase",
        "Function.StringExpr.StartsWith",
        "Function.Sql.IsIn",
        "Literal.Series",
        "Literal.Dyn",
        "Literal.Scalar",
        "Cast",
        "Column",
        "Over.GroupsToRows",
        "Agg.Max",
    }
    (window,) = [node for node in tree.walk() if node.name.startswith("Over")]
    assert window.partition_by == ("episode_id",)
    assert [node.name for node in window.scoped] == ["Agg.Max"]
    assert across_rows(expression) is None
    assert expression_tree(pl.col("reward").rank()).name == "Function.Rank"


def test_a_condition_that_does_not_fit_the_types_is_a_query_error(labeled):
    with pytest.raises(QueryError, match="cannot evaluate.*cannot compare string"):
        query(labeled, "return > 'abc'", level="episodes")
    with pytest.raises(QueryError, match="cannot evaluate"):
        query(labeled, "observation > 1")


def test_syntax_error_shows_where(labeled):
    with pytest.raises(QueryError) as error:
        query(labeled, "return > > 3")
    message = str(error.value)
    assert "column 10" in message
    assert message.splitlines()[-1] == "  " + " " * 9 + "^"


def test_step_column_in_an_episodes_query_is_explained(labeled):
    with pytest.raises(QueryError, match="step column"):
        query(labeled, "reward > 0", level="episodes")


def test_a_directory_without_manifest_is_not_a_dataset(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DatasetError, match="not a hindsight dataset"):
        query(str(tmp_path / "nothing"), "reward > 0")


def assert_valid_subset(uri: str, expected_steps: pl.DataFrame, expected_episodes: pl.DataFrame):
    """A self-contained version: one base group, every column, whole sorted episodes."""
    dataset = open_dataset(uri, verify_checksums=True)
    assert [g.name for g in dataset.manifest.groups] == ["base"]
    assert dataset.manifest.steps == expected_steps.height
    assert dataset.manifest.episodes == expected_episodes.height
    steps, episodes = raw_tables(uri)
    assert_frame_equal(steps, expected_steps)
    assert_frame_equal(episodes, expected_episodes)
    lengths = steps.group_by("episode_id", maintain_order=True).len()
    assert lengths["len"].to_list() == episodes["length"].to_list()
    try:
        from engine.validate import check_step_index
    except ImportError:
        assert steps.select((pl.col("t") == pl.int_range(pl.len()).over("episode_id")).all()).item()
    else:
        assert check_step_index(uri, steps["episode_id"].to_numpy(), steps["t"].to_numpy()) == []


def test_out_writes_a_self_contained_version_of_whole_episodes(labeled, raw, tmp_path):
    steps, episodes = raw
    out = str(tmp_path / "experts")
    where = "skill = 'expert' AND return_to_go > 2"
    summary = Query(input=labeled, where=where, output=out).run(stdout=io.StringIO())
    matched = (
        steps.join(episodes.select("episode_id", "skill"), on="episode_id")
        .filter((pl.col("skill") == "expert") & (pl.col("return_to_go") > 2))["episode_id"]
        .unique()
    )
    expected_episodes = episodes.filter(pl.col("episode_id").is_in(matched.implode()))
    expected_steps = steps.filter(pl.col("episode_id").is_in(matched.implode()))
    assert summary["episodes"] == expected_episodes.height > 0
    assert_valid_subset(out, expected_steps, expected_episodes)
    manifest = open_dataset(out).manifest
    parent = open_dataset(labeled).manifest
    assert manifest.parent_id == parent.dataset_id
    assert manifest.parent_uri == storage.normalize(labeled)
    assert [h.operation for h in manifest.history] == ["ingest", "relabel", "query"]
    assert manifest.history[-1].details["where"] == where
    # The subset is queryable like any version, and immutable.
    assert query(out, "skill = 'novice'").frame.height == 0
    with pytest.raises(QueryError, match="immutable"):
        Query(input=labeled, where=where, output=out).run(stdout=io.StringIO())


def test_the_recorded_command_line_holds_only_the_options_given(labeled, tmp_path):
    """A format derived from the other options is not recorded as if it had been typed."""
    out = str(tmp_path / "experts")
    Query(input=labeled, where="skill = 'expert'", output=out).run(stdout=io.StringIO())
    assert open_dataset(out).manifest.history[-1].command == shlex.join(
        ["hindsight", "query", labeled, "--where", "skill = 'expert'", "--output", out]
    )
    to_file = Query(input=labeled, output_file=str(tmp_path / "slice.csv"))
    assert to_file.output_format() == "csv" and "--format" not in to_file.history_line()


def test_out_is_written_part_by_part_and_a_failure_leaves_nothing(
    labeled, raw, tmp_path, monkeypatch
):
    steps, episodes = raw
    where = "skill = 'expert'"
    out = str(tmp_path / "parts")
    manifest, _ = write_subset(labeled, where, out, command="test", part_steps=40)
    chosen = episodes.filter(pl.col("skill") == "expert")
    expected_steps = steps.join(chosen.select("episode_id"), on="episode_id", how="semi")
    assert_valid_subset(out, expected_steps, chosen)
    # Whole episodes per part; a part passes 40 steps by less than one episode.
    assert len(manifest.parts) > 1
    longest = int(chosen["length"].max())
    assert all(part.steps < 40 + longest for part in manifest.parts)

    fail_writing_the_second_part(monkeypatch)
    broken = tmp_path / "broken"
    with pytest.raises(OSError, match="disk full"):
        write_subset(labeled, where, str(broken), command="test", part_steps=40)
    assert not broken.exists()


def test_out_with_a_limit_of_zero_writes_nothing(labeled, tmp_path):
    with pytest.raises(QueryError, match="keeps no episode"):
        write_subset(
            labeled, "skill = 'expert'", str(tmp_path / "none"), command="t", limit_episodes=0
        )
    assert not (tmp_path / "none").exists()


def test_out_from_parts_whose_episode_ids_interleave(tmp_path):
    """One part per source file, ids interleaved across files: each part is sorted, the
    dataset is not; the subset still has sorted parts of whole episodes."""
    from engine.writer import base_manifest

    steps, episodes = make_episodes(num_episodes=6, seed=9)
    ids = episodes.column("episode_id").to_numpy()
    writer = VersionWriter(str(tmp_path / "interleaved")).begin()
    uri = writer.uri
    written = []
    for index, chosen in enumerate((ids[0::2], ids[1::2])):
        keep_steps = pc.is_in(steps.column("episode_id"), pa.array(chosen))
        keep_episodes = pc.is_in(episodes.column("episode_id"), pa.array(chosen))
        written.append(
            writer.write_part(index, steps.filter(keep_steps), episodes.filter(keep_episodes))
        )
    writer.commit(base_manifest(uri, written, operation="ingest", command="t"))

    out = str(tmp_path / "all")
    manifest, _ = write_subset(uri, "return > -1000", out, command="t")
    assert manifest.episodes == 6 and manifest.steps == steps.num_rows
    subset = pl.concat(
        pl.from_arrow(open_dataset(out).read_part(i)) for i in range(len(manifest.parts))
    )
    assert sorted(subset["episode_id"].unique().to_list()) == sorted(ids.tolist())


def test_cli_formats(labeled, raw, tmp_path, capsys):
    steps, episodes = raw
    where = "skill = 'expert'"
    expected = steps.join(
        episodes.filter(pl.col("skill") == "expert").select("episode_id"),
        on="episode_id",
        how="semi",
    )

    assert cli_main(["query", labeled, "--where", where]) == 0
    table = capsys.readouterr().out
    assert f"showing 20 of {expected.height:,} matching steps" in table

    args = ["query", labeled, "--where", where, "--select", "episode_id,t,return_to_go,observation"]
    assert cli_main([*args, "--format", "csv"]) == 0
    csv = pl.read_csv(io.StringIO(capsys.readouterr().out))
    assert csv.height == expected.height
    assert csv["return_to_go"].to_list() == pytest.approx(expected["return_to_go"].to_list())
    first_observation = json.loads(csv["observation"][0])
    assert first_observation == pytest.approx(expected["observation"][0].to_list())

    assert cli_main([*args, "--format", "json", "--limit", "7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["t"] for line in lines] == expected["t"].head(7).to_list()

    parquet_file = tmp_path / "slice.parquet"
    assert cli_main([*args, "--format", "parquet", "--output-file", str(parquet_file)]) == 0
    assert_frame_equal(
        pl.read_parquet(parquet_file),
        expected.select("episode_id", "t", "return_to_go", "observation"),
    )

    experts = f"{episodes.filter(pl.col('skill') == 'expert').height} matching episodes"
    assert cli_main(["query", labeled, "--where", "skill = 'expert'", "--level", "episodes"]) == 0
    assert experts in capsys.readouterr().out
    assert cli_main(["query", labeled, "--where", "skill = 'expert'", "--episodes"]) == 0
    assert experts in capsys.readouterr().out  # --episodes is --level episodes

    assert cli_main(["query", labeled, "--where", "nope > 1"]) == 2
    assert "step columns:" in capsys.readouterr().err

    # --output-file alone: the format is the file's extension; an unknown one is an error.
    csv_file = tmp_path / "slice.csv"
    assert cli_main([*args, "--output-file", str(csv_file)]) == 0
    assert pl.read_csv(csv_file).height == expected.height
    assert cli_main([*args, "--output-file", str(tmp_path / "slice.txt")]) == 2
    assert "give --format csv|json|parquet" in capsys.readouterr().err
    assert cli_main([*args, "--limit", "-5"]) == 2
    assert "limit: Input should be greater than or equal to 0 (got -5)" in capsys.readouterr().err


@pytest.mark.s3
def test_query_and_out_on_s3(s3_bucket, labeled):
    uri = relabeled_dataset(f"{s3_bucket}/datasets", num_episodes=30, part_steps=120)
    steps, episodes = raw_tables(uri)
    where = "skill = 'novice' AND return_to_go > 0"
    expected = (
        steps.join(episodes.select("episode_id", "skill"), on="episode_id")
        .filter((pl.col("skill") == "novice") & (pl.col("return_to_go") > 0))
        .select(steps.columns)
    )
    assert_frame_equal(query(uri, where).frame, expected)
    assert_frame_equal(
        query(uri, "skill = 'novice'", level="episodes").frame,
        episodes.filter(pl.col("skill") == "novice"),
    )
    out = f"{s3_bucket}/datasets/novices"
    Query(input=uri, where="skill = 'novice'", output=out).run(stdout=io.StringIO())
    chosen = episodes.filter(pl.col("skill") == "novice")
    assert_valid_subset(
        out,
        steps.join(chosen.select("episode_id"), on="episode_id", how="semi"),
        chosen,
    )
    assert not any(f.startswith(f"{s3_bucket}/datasets/labeled") for f in storage.list_files(out))
    by_return = f"{s3_bucket}/datasets/novices-by-return"
    Query(input=uri, where="skill = 'novice'", output=by_return, cluster_by=["return"]).run(
        stdout=io.StringIO()
    )
    expected_steps, expected_episodes = clustered_expectation(
        (steps, episodes), chosen["episode_id"].to_list(), ["return"]
    )
    assert_valid_subset(by_return, expected_steps, expected_episodes)


def test_pyarrow_types_survive_the_subset(labeled, tmp_path):
    out = str(tmp_path / "sub")
    Query(input=labeled, where="episode_id < 100", output=out).run(stdout=io.StringIO())
    schema = open_dataset(out).read_part(0).schema
    assert pa.types.is_fixed_size_list(schema.field(cols.OBSERVATION).type)


# ---------------------------------------------------------------- --cluster-by


def clustered_expectation(
    raw: tuple[pl.DataFrame, pl.DataFrame], chosen_ids: list[int], by: list[str]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """What a clustered subset must hold, computed independently: the chosen episodes sorted
    by `by` then id, numbered 0..n-1, the old id kept; their steps under the new ids."""
    steps, episodes = raw
    chosen = episodes.filter(pl.col("episode_id").is_in(chosen_ids))
    ordered = chosen.sort([*by, "episode_id"], nulls_last=True)
    mapping = ordered.select(
        pl.col("episode_id").alias("old"), pl.int_range(pl.len(), dtype=pl.Int64).alias("new")
    )
    expected_episodes = ordered.with_columns(
        pl.int_range(pl.len(), dtype=pl.Int64).alias("episode_id"),
        pl.col("episode_id").alias("original_episode_id"),
    )
    expected_steps = (
        steps.join(mapping, left_on="episode_id", right_on="old")
        .sort("new", "t")
        .with_columns(pl.col("new").alias("episode_id"))
        .drop("new")
    )
    return expected_steps, expected_episodes


def test_cluster_by_orders_episodes_under_new_ids(labeled, raw, tmp_path, monkeypatch):
    steps, episodes = raw
    where = "return > -10"
    chosen = episodes.filter(pl.col("return") > -10)["episode_id"].to_list()
    spill = tmp_path / "spill"
    spill.mkdir()
    manifest, _ = write_subset(
        labeled,
        where,
        str(tmp_path / "by-skill"),
        command="t",
        cluster_by=["skill", "return"],
        part_steps=40,
        spill_dir=str(spill),
    )
    expected_steps, expected_episodes = clustered_expectation(raw, chosen, ["skill", "return"])
    assert 0 < len(chosen) < episodes.height
    assert_valid_subset(str(tmp_path / "by-skill"), expected_steps, expected_episodes)
    # Several source parts into several output parts, whole episodes each; spill removed.
    assert len(open_dataset(labeled).manifest.parts) > 1 and len(manifest.parts) > 1
    longest = int(expected_episodes["length"].max())
    assert all(part.steps < 40 + longest for part in manifest.parts)
    assert list(spill.iterdir()) == []
    assert manifest.history[-1].details["cluster_by"] == ["skill", "return"]

    # Same bytes on a re-run.
    again, _ = write_subset(
        labeled,
        where,
        str(tmp_path / "again"),
        command="t",
        cluster_by=["skill", "return"],
        part_steps=40,
    )
    for group, other in zip(manifest.groups, again.groups):
        for level in ("steps", "episodes"):
            assert [f.sha256 for f in getattr(group, f"{level}_files")] == [
                f.sha256 for f in getattr(other, f"{level}_files")
            ]


def test_a_selection_on_the_clustered_column_reads_neighbouring_row_groups(
    labeled, raw, tmp_path, monkeypatch
):
    """`skill` is every third episode: scattered as stored, one run of rows once clustered."""
    steps, episodes = raw
    monkeypatch.setattr(engine.writer, "ROW_GROUP_ROWS", {"steps": 16, "episodes": 16})
    out = str(tmp_path / "by-skill")
    write_subset(labeled, None, out, command="t", cluster_by=["skill"], part_steps=10_000)
    as_stored = query(labeled, "skill = 'expert'")
    clustered = query(out, "skill = 'expert'")
    expected_steps, expected_episodes = clustered_expectation(
        raw, episodes["episode_id"].to_list(), ["skill"]
    )
    experts = expected_episodes.filter(pl.col("skill") == "expert")["episode_id"]
    assert_frame_equal(
        clustered.frame, expected_steps.filter(pl.col("episode_id").is_in(experts.implode()))
    )
    # The steps' row groups that hold the run (one more where it straddles a boundary),
    # and the episodes file, read whole.
    least = -(-clustered.frame.height // 16) + 1 + -(-episodes.height // 16)
    assert clustered.stats.row_groups <= least < as_stored.stats.row_groups
    # Clustering again keeps the ids from before the first clustering.
    twice = str(tmp_path / "by-return")
    write_subset(out, None, twice, command="t", cluster_by=["return"])
    again = engine.scan_episodes(twice).collect()
    assert again["original_episode_id"].to_list() == (
        episodes.sort("return", "episode_id")["episode_id"].to_list()
    )


def test_a_clustered_write_that_fails_leaves_nothing(labeled, tmp_path, monkeypatch):
    fail_writing_the_second_part(monkeypatch)
    spill = tmp_path / "spill"
    spill.mkdir()
    out = tmp_path / "broken"
    with pytest.raises(OSError, match="disk full"):
        write_subset(
            labeled,
            None,
            str(out),
            command="t",
            cluster_by=["skill"],
            part_steps=40,
            spill_dir=str(spill),
        )
    assert not out.exists() and list(spill.iterdir()) == []


@pytest.mark.parametrize(
    ("cluster_by", "message"),
    [
        (["reward"], "'reward': a step column; --cluster-by orders whole episodes"),
        (["nope"], "'nope': not a column"),
        ([], "at least one episode column"),
    ],
)
def test_cluster_by_needs_episode_columns_that_sort(labeled, tmp_path, cluster_by, message):
    out = tmp_path / "x"
    with pytest.raises(QueryError, match=message):
        write_subset(labeled, None, str(out), command="t", cluster_by=cluster_by)
    assert not out.exists()


def test_cluster_by_a_column_without_order_is_refused(tmp_path):
    steps, episodes = make_episodes(num_episodes=4, seed=2)
    uri = str(tmp_path / "vectors")
    episodes = episodes.append_column(
        "goal", cols.vectors_to_arrow(np.ones((episodes.num_rows, 2), dtype=np.float32))
    )
    write_synthetic_dataset(uri, steps, episodes)
    with pytest.raises(QueryError, match="'goal': a column of type fixed_size_list"):
        write_subset(uri, None, str(tmp_path / "x"), command="t", cluster_by=["goal"])


def test_cli_cluster_by(labeled, raw, tmp_path, capsys):
    steps, episodes = raw
    out = str(tmp_path / "by-skill")
    args = ["query", labeled, "--output", out, "--cluster-by", "skill,return"]
    assert cli_main(args) == 0
    _, expected_episodes = clustered_expectation(
        raw, episodes["episode_id"].to_list(), ["skill", "return"]
    )
    assert_frame_equal(engine.scan_episodes(out).collect(), expected_episodes)
    assert cli_main(["query", labeled, "--cluster-by", "skill"]) == 2
    assert "--cluster-by orders the episodes of a new version: give --output" in (
        capsys.readouterr().err
    )
