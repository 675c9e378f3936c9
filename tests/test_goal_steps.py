"""`goals:store=steps`: only goal steps are stored; every reader derives the goal vectors,
rewards and flags, byte for byte what `store=vectors` stores (checked against a loop)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from engine import storage
from engine.dataset import open_dataset, scan
from engine.executor import InProcess
from engine.query import query, read_part_rows, write_subset
from jobs import relabeling
from relabelers.base import RelabelError, relabel_tables
from relabelers.goals import GoalsRelabeler
from schemas import steps as cols
from schemas.goals import GoalsError, derive_goals
from schemas.manifest import RelabelerInfo
from tests.synthetic import attach_group, make_episodes, write_synthetic_dataset
from tests.test_relabel_goals import with_next_observations

GOAL_COLUMNS = ["hindsight_goal", "hindsight_goal_step", "hindsight_reward", "hindsight_reached"]
PARAMS = {"strategy": "future", "k": 3, "achieved": "observation.achieved_goal", "threshold": 0.8}


def relabel(parent: str, out: str, **params) -> None:
    relabeler = GoalsRelabeler(PARAMS | params, seed=7)
    relabeling.relabel(parent, out, [relabeler], executor=InProcess(), command="test")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same goal-env episodes (with stored next observations, several parts)
    relabeled with store=vectors and with store=steps."""
    root = tmp_path_factory.mktemp("goal-steps")
    steps, episodes = make_episodes(24, obs_dim=4, goal_dim=2, seed=5, max_length=20)
    base = str(root / "base")
    write_synthetic_dataset(base, with_next_observations(steps), episodes, part_steps=60)
    relabel(base, str(root / "vectors"), store="vectors")
    relabel(base, str(root / "steps"), store="steps")
    return base, str(root / "vectors"), str(root / "steps")


def by_loop(steps: pa.Table, goal_steps: list, threshold: float):
    """Goals (n, k, G) and reached (n, k) from goal steps, one step at a time: goal j is
    the achieved goal at step goal_steps[j] of the episode; reached after the step by
    the next row's achieved goal, at the last step by the stored next observation's."""
    rows = steps.to_pylist()
    goals, reached = [], []
    for i, row in enumerate(rows):
        episode = [r for r in rows if r["episode_id"] == row["episode_id"]]
        last = row["t"] == len(episode) - 1
        after = (
            row["next_observation"]["achieved_goal"]
            if last
            else rows[i + 1]["observation"]["achieved_goal"]
        )
        step_goals = [episode[s]["observation"]["achieved_goal"] for s in goal_steps[i]]
        goals.append(step_goals)
        reached.append(
            [
                float(np.sum((np.float64(g) - np.float64(after)) ** 2)) <= threshold**2
                for g in step_goals
            ]
        )
    return np.asarray(goals, np.float32), np.asarray(reached)


def test_steps_layout_stores_one_column_and_reads_as_the_vectors_layout(layouts):
    base, vectors, steps = layouts
    stored, kept = open_dataset(steps), open_dataset(vectors)
    group = stored.manifest.group("goals")
    assert [f.name for f in group.steps_columns] == ["hindsight_goal_step"]
    assert group.relabeler.version == "1.3" and group.relabeler.params["store"] == "steps"
    assert list(stored.derived) == ["hindsight_goal", "hindsight_reward", "hindsight_reached"]
    assert stored.columns() == kept.columns()
    assert stored.arrow_schema() == kept.arrow_schema()
    # The same draws: goal steps bit for bit; then every column, part by part.
    for index in range(stored.num_parts):
        assert stored.num_parts > 3
        assert stored.read_part(index).equals(kept.read_part(index))
        assert stored.read_part(index, columns=GOAL_COLUMNS[::-1]).equals(
            kept.read_part(index, columns=GOAL_COLUMNS[::-1])
        )
    assert stored.read_part(0, columns=["hindsight_reached"]).equals(
        kept.read_part(0, columns=["hindsight_reached"])
    )
    # Against a loop over the stored goal steps.
    table = stored.read(columns=["episode_id", "t", "observation", "next_observation"])
    goal_steps = stored.read(columns=["hindsight_goal_step"]).column(0).to_pylist()
    goals, reached = by_loop(table, goal_steps, PARAMS["threshold"])
    derived = stored.read(columns=["hindsight_goal", "hindsight_reward", "hindsight_reached"])
    values = {
        n: cols.arrow_to_numpy(derived.column(n).combine_chunks().flatten())
        for n in derived.column_names
    }
    np.testing.assert_array_equal(values["hindsight_goal"].reshape(goals.shape), goals)
    np.testing.assert_array_equal(values["hindsight_reached"].reshape(reached.shape), reached)
    np.testing.assert_array_equal(
        values["hindsight_reward"].reshape(reached.shape), reached.astype(np.float32)
    )
    assert 0 < reached.mean() < 1  # both outcomes occur: the comparison means something


def test_scan_query_and_subsets_derive_the_same_columns(layouts, tmp_path):
    _, vectors, steps = layouts
    assert scan(steps).collect().equals(scan(vectors).collect())
    for frame in (
        lambda uri: scan(uri).filter(pl.col("t") > 2).select("hindsight_goal"),
        lambda uri: scan(uri).select("t", "hindsight_reached").slice(30, 25),
        lambda uri: scan(uri).filter(pl.col("hindsight_reached").arr.get(1)).select("t"),
    ):
        assert frame(steps).collect().equals(frame(vectors).collect())
    where = "noise > 0.2 AND array_contains(CAST(hindsight_reached AS BOOLEAN[]), true)"
    found, expected = query(steps, where=where), query(vectors, where=where)
    assert 0 < found.frame.height < open_dataset(steps).manifest.steps
    assert found.frame.equals(expected.frame)
    selected = ["episode_id", "t", "hindsight_goal", "hindsight_reward"]
    assert query(steps, where="t >= 3", select=selected).frame.equals(
        query(vectors, where="t >= 3", select=selected).frame
    )
    # A few rows of a part (the query engine's row reader): derived from the whole part.
    rows = np.array([0, 5, 17, 41])
    names = ["t", "hindsight_reward", "hindsight_goal"]
    assert read_part_rows(open_dataset(steps), 1, "steps", names, rows).equals(
        read_part_rows(open_dataset(vectors), 1, "steps", names, rows)
    )
    # A subset stores every column it reads: the derived ones as plain columns.
    write_subset(steps, "noise > 0.2", str(tmp_path / "a"), command="test")
    write_subset(vectors, "noise > 0.2", str(tmp_path / "b"), command="test")
    a, b = open_dataset(str(tmp_path / "a")), open_dataset(str(tmp_path / "b"))
    assert a.read().equals(b.read())


def test_query_command_where_on_hindsight_reached(layouts):
    _, vectors, steps = layouts
    where = "array_sum(CAST(hindsight_reward AS FLOAT[])) >= 2"
    outputs = []
    for uri in (steps, vectors):
        done = subprocess.run(
            [sys.executable, "-m", "jobs.cli", "query", uri, "--where", where]
            + ["--select", "episode_id,t,hindsight_reached", "--format", "json"],
            capture_output=True,
            text=True,
            check=True,
        )
        outputs.append(done.stdout)
    rows = [json.loads(line) for line in outputs[0].splitlines()]
    assert outputs[0] == outputs[1] and rows
    assert all(sum(row["hindsight_reached"]) >= 2 for row in rows)


def test_raw_polars_gathers_goal_j_as_the_docs_show(layouts):
    """Outside hindsight the files hold goal steps: the docs' Polars expression gathers
    goal j from the achieved goals, and it equals what hindsight derives."""
    base, _, steps = layouts
    frame = pl.concat(
        [
            pl.scan_parquet(f"{base}/base/steps/*.parquet"),
            pl.scan_parquet(f"{steps}/goals/steps/*.parquet"),
        ],
        how="horizontal",
    )
    j = 2
    row_of_goal = pl.int_range(pl.len()) - pl.col("t") + pl.col("hindsight_goal_step").arr.get(j)
    goal_j = frame.select(
        pl.col("observation").struct.field("achieved_goal").gather(row_of_goal).alias("goal")
    ).collect()
    derived = scan(steps).select(pl.col("hindsight_goal").arr.get(j).alias("goal")).collect()
    assert goal_j.equals(derived)


@pytest.mark.ray
def test_shards_conditioned_on_derived_goals_are_byte_identical(layouts, tmp_path, ray_local):
    from jobs.commands.shard import Shard

    _, vectors, steps = layouts
    for name, uri in (("steps", steps), ("vectors", vectors)):
        options = dict(condition=["hindsight_goal", "hindsight_reward"], window=3, seed=1)
        Shard(input=uri, output=str(tmp_path / name), shard_steps=100, **options).run()
    a, b = (sorted(Path(tmp_path / name).rglob("*.tar")) for name in ("steps", "vectors"))
    assert len(a) == len(b) > 1
    for x, y in zip(a, b):
        assert storage.sha256_uri(str(x)) == storage.sha256_uri(str(y))
    index = json.loads((tmp_path / "steps" / "index.json").read_text())
    goal = index["conditions"]["hindsight_goal"]
    assert (goal["type"], goal["count"], goal["dim"]) == ("vector", 3, 2)


def test_info_lists_the_derived_columns(layouts):
    from engine.info import dataset_info, format_info

    _, _, steps = layouts
    info = dataset_info(steps)
    group = next(g for g in info["groups"] if g["name"] == "goals")
    assert list(group["steps_columns"]) == ["hindsight_goal_step"]
    assert list(group["derived_steps_columns"]) == [
        "hindsight_goal",
        "hindsight_reward",
        "hindsight_reached",
    ]
    assert "hindsight_reached: fixed_size_list<item: bool not null>[3] (derived at read" in (
        format_info(info)
    )


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"strategy": "random"}, "store=steps cannot hold strategy=random.*use store=vectors"),
        (
            {"reward_function": "tests.test_relabel_goals:reward_sum"},
            "store=steps cannot use reward_function.*use store=vectors",
        ),
    ],
)
def test_store_steps_refuses_random_goals_and_reward_functions(params, message):
    with pytest.raises(RelabelError, match=message):
        GoalsRelabeler(PARAMS | {"store": "steps"} | params)


def test_a_wrong_achieved_spec_fails_before_anything_is_written(layouts, tmp_path):
    base, _, _ = layouts
    out = tmp_path / "out"
    with pytest.raises(RelabelError, match="struct 'observation' has no field 'goal'"):
        relabel(base, str(out), store="steps", achieved="observation.goal")
    assert not out.exists()


def test_a_version_1_2_goals_group_still_reads(tmp_path):
    """A 1.2 manifest (no `store` parameter) stores its vectors: nothing is derived."""
    steps, episodes = make_episodes(6, obs_dim=3, goal_dim=2, seed=2, max_length=9)
    base, old = str(tmp_path / "base"), str(tmp_path / "old")
    write_synthetic_dataset(base, steps, episodes)
    params = {k: v for k, v in GoalsRelabeler(PARAMS).params.model_dump().items() if k != "store"}
    output = relabel_tables(GoalsRelabeler(params, seed=7), steps, episodes).steps
    attach_group(
        base,
        old,
        "goals",
        lambda parent, index: (output, None),
        RelabelerInfo(name="goals", version="1.2", params=params, seed=7),
    )
    dataset = open_dataset(old)
    assert dataset.derived == {}
    assert dataset.read(columns=GOAL_COLUMNS).equals(output.select(GOAL_COLUMNS))
    assert scan(old).select(GOAL_COLUMNS).collect().equals(pl.from_arrow(output))


def test_goal_steps_outside_their_episode_are_an_error():
    achieved = np.arange(10, dtype=np.float32).reshape(5, 2)
    t = np.array([0, 1, 2, 0, 1])
    bounds = np.array([0, 3, 5])
    goal_steps = np.array([[2], [2], [2], [1], [2]], dtype=np.int32)  # row 4: t'=2 of 2 steps
    with pytest.raises(GoalsError, match="step t=1 .*outside its episode"):
        derive_goals(achieved, achieved, t, bounds, goal_steps, 0.1, "part 0")


def test_scan_derives_once_per_recipe_and_only_when_selected(layouts, monkeypatch):
    """All three derived columns come from one derivation; a scan without them none."""
    from schemas.goals import GoalRecipe

    _, vectors, steps = layouts
    calls = []
    derive = GoalRecipe.derive

    def counted(self, table, names, where=""):
        calls.append(list(names))
        return derive(self, table, names, where)

    monkeypatch.setattr(GoalRecipe, "derive", counted)
    assert scan(steps).collect().equals(scan(vectors).collect())
    assert calls == [["hindsight_goal", "hindsight_reward", "hindsight_reached"]]
    calls.clear()
    assert scan(steps).select("t", "hindsight_goal_step").collect().height > 0
    assert scan(steps).filter(pl.col("t") > 2).select("episode_id").collect().height > 0
    assert calls == []
    frame = scan(steps).filter(pl.col("hindsight_reached").arr.get(0)).select("hindsight_reward")
    assert frame.collect().equals(
        scan(vectors)
        .filter(pl.col("hindsight_reached").arr.get(0))
        .select("hindsight_reward")
        .collect()
    )
    assert len(calls) == 1


def edited_copy(steps: str, name: str, change) -> str:
    """A copy of the store=steps version (beside it: its parent is found relative to it)
    whose goals group's manifest entry `change` edits (no checksum covers params)."""
    from tests.test_damaged_data import rewrite_manifest

    uri = str(Path(steps).parent / name)
    shutil.copytree(steps, uri)

    def edit(manifest):
        change(next(g for g in manifest["groups"] if g["name"] == "goals")["relabeler"])

    rewrite_manifest(uri, edit)
    return uri


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda info: info["params"].pop("achieved"), "store=steps needs achieved=COLUMN"),
        (
            lambda info: info["params"].update(
                reward_function="tests.test_relabel_goals:reward_sum"
            ),
            "store=steps cannot use reward_function='tests.test_relabel_goals:reward_sum'",
        ),
        (
            lambda info: info["params"].update(strategy="random"),
            "store=steps cannot hold strategy=random",
        ),
        (lambda info: info.update(version="2.0"), "store=steps written by goals 2.0"),
        (
            lambda info: info["params"].update(achieved="observation.goal"),
            "achieved='observation.goal': struct 'observation' has no field 'goal'",
        ),
    ],
)
def test_a_manifest_it_cannot_derive_from_fails_only_where_derived_columns_are_used(
    layouts, tmp_path, change, message
):
    from engine.info import dataset_info

    _, vectors, steps = layouts
    uri = edited_copy(steps, tmp_path.name, change)
    dataset, good = open_dataset(uri), open_dataset(steps)
    error = re.escape(f"{dataset.uri}: goals group 'goals': {message}")
    # What never touches a derived column works as before.
    assert dataset.columns() == good.columns()
    assert dataset.arrow_schema().field("hindsight_goal").type == pa.null()
    stored = ["t", "reward", "hindsight_goal_step"]
    assert dataset.read_part(1, columns=stored).equals(good.read_part(1, columns=stored))
    assert scan(uri).select(stored).collect().equals(scan(steps).select(stored).collect())
    selected = ["episode_id", "t", "reward"]
    assert query(uri, where="t >= 3", select=selected).frame.equals(
        query(steps, where="t >= 3", select=selected).frame
    )
    info = next(g for g in dataset_info(uri)["groups"] if g["name"] == "goals")
    assert info["derived_steps_columns"]["hindsight_reward"].startswith(f"null: cannot: {message}")
    # A derived column used: one line naming the version, the group and the reason.
    with pytest.raises(GoalsError, match=error):
        dataset.read_part(0, columns=["t", "hindsight_reward"])
    with pytest.raises(Exception, match=error):
        scan(uri).select("hindsight_goal").collect()
    with pytest.raises(Exception, match=error):
        query(uri, where="t >= 3", select=["t", "hindsight_reached"])


def test_the_command_line_names_what_the_manifest_lacks(layouts, tmp_path):
    _, _, steps = layouts
    uri = edited_copy(steps, tmp_path.name, lambda info: info["params"].pop("achieved"))

    def run(select: str) -> subprocess.CompletedProcess:
        command = ["query", uri, "--where", "t = 0", "--select", select, "--format", "json"]
        return subprocess.run(
            [sys.executable, "-m", "jobs.cli", *command], capture_output=True, text=True
        )

    assert run("episode_id,reward").returncode == 0
    failed = run("episode_id,hindsight_reward")
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == [
        f"hindsight query: error: {open_dataset(uri).uri}: goals group 'goals': store=steps "
        "needs achieved=COLUMN (where its goal steps' achieved goals are); the manifest has "
        "achieved=None"
    ]


def test_k_is_read_from_the_stored_goal_steps(layouts, tmp_path):
    """A manifest whose k disagrees with the stored lists: the stored size wins."""
    _, vectors, steps = layouts
    uri = edited_copy(steps, tmp_path.name, lambda info: info["params"].update(k=5))
    assert open_dataset(uri).arrow_schema() == open_dataset(vectors).arrow_schema()
    assert open_dataset(uri).read_part(2).equals(open_dataset(vectors).read_part(2))
    assert scan(uri).collect().equals(scan(vectors).collect())


def test_every_goals_version_that_writes_steps_is_one_readers_derive():
    from schemas.goals import STEPS_VERSIONS

    assert GoalsRelabeler.version in STEPS_VERSIONS


def test_a_non_finite_achieved_goal_at_read_names_the_version_part_episode_and_step(tmp_path):
    """Goal steps whose achieved goals turned non-finite (a hand-attached group): the
    error says where, for every reader."""
    from schemas.goals import fixed_lists

    steps, episodes = make_episodes(8, obs_dim=3, goal_dim=2, seed=4, max_length=9)
    rows = steps.to_pylist()
    bad = 40
    rows[bad]["observation"]["achieved_goal"][1] = float("nan")
    steps = pa.Table.from_pylist(rows, schema=steps.schema)
    base, uri = str(tmp_path / "base"), str(tmp_path / "steps")
    write_synthetic_dataset(base, steps, episodes, part_steps=20)

    def goal_steps(parent, index):  # goal j of every step: step 0 of its episode
        part = parent.read_part(index, columns=["t"])
        return pa.table(
            {"hindsight_goal_step": fixed_lists(np.zeros((part.num_rows, 3), np.int32))}
        ), None

    params = PARAMS | {"store": "steps", "reward_function": None}
    attach_group(
        base,
        uri,
        "goals",
        goal_steps,
        RelabelerInfo(name="goals", version="1.3", params=params, seed=7),
    )
    dataset = open_dataset(uri)
    index = next(
        i
        for i in range(dataset.num_parts)
        if bad < sum(p.steps for p in dataset.manifest.parts[: i + 1])
    )
    episode, t = rows[bad]["episode_id"], rows[bad]["t"]
    tail = (
        ": goals derived at read: achieved goals (observation.achieved_goal) hold 1 "
        f"non-finite row(s), the first at episode {episode} step t={t}"
    )
    assert index > 0
    with pytest.raises(GoalsError, match=re.escape(f"{dataset.uri} part {index}{tail}")):
        dataset.read()
    with pytest.raises(Exception, match=re.escape(f"{dataset.uri} part {index}{tail}")):
        query(uri, where="t >= 0", select=["t", "hindsight_reached"])
    with pytest.raises(Exception, match=re.escape(f"{dataset.uri} (engine.scan){tail}")):
        scan(uri).select("hindsight_goal").collect()
    assert dataset.read(columns=["t", "hindsight_goal_step"]).num_rows == steps.num_rows


def test_store_steps_derives_from_an_achieved_column_written_earlier_in_the_job(layouts, tmp_path):
    """`--with returns --with goals:store=steps,achieved=return_to_go`: the goals
    relabeler only checks the column's type (it never reads it), so the plan accepts a
    column an earlier relabeler writes, and readers derive what store=vectors stores."""
    from relabelers.returns import ReturnsRelabeler

    base, _, _ = layouts
    params = {"achieved": "return_to_go", "threshold": 0.5}
    versions = {}
    for store in ("vectors", "steps"):
        relabelers = [
            ReturnsRelabeler({"gamma": 0.9}),
            GoalsRelabeler(PARAMS | params | {"store": store}, seed=7),
        ]
        uri = str(tmp_path / store)
        relabeling.relabel(base, uri, relabelers, executor=InProcess(), command="test")
        versions[store] = open_dataset(uri)
    steps, vectors = versions["steps"], versions["vectors"]
    assert steps.read(columns=GOAL_COLUMNS).equals(vectors.read(columns=GOAL_COLUMNS))
    assert steps.arrow_schema().field("hindsight_goal").type == pa.list_(
        pa.field("item", pa.list_(pa.field("item", pa.float32(), False), 1), False), 3
    )
    assert scan(str(tmp_path / "steps")).collect().equals(scan(str(tmp_path / "vectors")).collect())
    # A column nobody writes is refused before anything runs, as with store=vectors.
    with pytest.raises(
        RelabelError, match="reads steps column 'return_to_go', which the dataset does not have"
    ):
        relabel(base, str(tmp_path / "none"), store="steps", achieved="return_to_go")
    assert not (tmp_path / "none").exists()
