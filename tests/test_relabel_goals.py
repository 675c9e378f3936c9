"""`goals`: HER goals come from the right episode and time range, rewards match a loop."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relabelers.base import Part, RelabelError, TableInputs, relabel_tables
from relabelers.goals import GoalsRelabeler
from schemas import steps as cols
from tests.synthetic import make_episodes


def reward_sum(achieved_goal, desired_goal, info):
    """A reward function for the dotted-path form: minus the L1 distance."""
    return -np.abs(np.asarray(achieved_goal) - np.asarray(desired_goal)).sum(axis=-1)


def relabel(steps, episodes, **params):
    output = relabel_tables(GoalsRelabeler(params, seed=3), steps, episodes)
    return output.steps.to_pydict()


def per_step(steps: pa.Table):
    """(episode id, t, achieved goal, achieved goal after the step) per row, by loops."""
    ids = steps.column(cols.EPISODE_ID).to_pylist()
    ts = steps.column(cols.T).to_pylist()
    achieved = np.asarray(
        steps.column("observation").combine_chunks().field("achieved_goal").to_pylist()
    )
    rows = []
    for i in range(len(ids)):
        is_last = i + 1 == len(ids) or ids[i + 1] != ids[i]
        rows.append((ids[i], ts[i], achieved[i], achieved[i if is_last else i + 1]))
    return rows


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    strategy=st.sampled_from(["final", "future", "episode"]),
    k=st.integers(1, 4),
    max_length=st.integers(1, 12),
)
def test_goals_come_from_the_same_episode_and_the_right_steps(seed, strategy, k, max_length):
    steps, episodes = make_episodes(5, goal_dim=2, seed=seed, max_length=max_length)
    out = relabel(steps, episodes, strategy=strategy, k=k, threshold=0.3)
    rows = per_step(steps)
    by_step = {(e, t): a for e, t, a, _ in rows}
    lengths = dict(
        zip(episodes.column("episode_id").to_pylist(), episodes.column("length").to_pylist())
    )
    for i, (episode, t, _, after) in enumerate(rows):
        last = lengths[episode] - 1
        goals = np.asarray(out["hindsight_goal"][i]).reshape(k, 2)
        for j, source in enumerate(out["hindsight_goal_step"][i]):
            if strategy == "final":
                assert source == last
            elif strategy == "future":
                assert min(t + 1, last) <= source <= last
            else:
                assert 0 <= source <= last
            np.testing.assert_allclose(goals[j], by_step[(episode, source)], rtol=1e-6)
            reached = np.linalg.norm(goals[j] - after) <= 0.3
            assert out["hindsight_reached"][i][j] == reached
            assert out["hindsight_reward"][i][j] == float(reached)


def test_future_goal_of_the_next_step_is_reached():
    steps, episodes = make_episodes(4, goal_dim=3, seed=1, min_length=2, max_length=2)
    out = relabel(steps, episodes, strategy="future", k=2)
    # Two-step episodes: the future goal of t=0 is t=1, which is where the step leads.
    assert all(
        all(r) for r, t in zip(out["hindsight_reached"], steps.column("t").to_pylist()) if t == 0
    )


def test_random_goals_come_from_other_episodes_and_do_not_depend_on_parts():
    steps, episodes = make_episodes(9, goal_dim=2, seed=4, max_length=15)
    params = {"strategy": "random", "k": 3}
    one = GoalsRelabeler(params, seed=5)
    one.setup(TableInputs(steps, episodes))
    cut_steps = int(np.sum(episodes.column("length").to_numpy()[:4]))
    two = GoalsRelabeler(params, seed=5)
    two.setup(
        TableInputs.of_parts(
            [
                (steps.slice(0, cut_steps), episodes.slice(0, 4)),
                (steps.slice(cut_steps), episodes.slice(4)),
            ]
        )
    )
    assert np.array_equal(one.pool_episode_ids, two.pool_episode_ids)
    assert np.array_equal(one.pool_goals, two.pool_goals)
    whole = one.run(steps, episodes, Part(0, 1)).steps
    first = two.run(steps.slice(0, cut_steps), episodes.slice(0, 4), Part(0, 2)).steps
    assert whole.slice(0, cut_steps).equals(first)
    assert whole.column("hindsight_goal_step").null_count == steps.num_rows
    # Every goal is the pooled goal of an episode other than the step's own.
    pool = {tuple(np.float32(g)): e for e, g in zip(one.pool_episode_ids, one.pool_goals)}
    ids = steps.column("episode_id").to_pylist()
    for episode, goals in zip(ids, whole.column("hindsight_goal").to_pylist()):
        for goal in np.asarray(goals, dtype=np.float32).reshape(3, 2):
            assert pool[tuple(goal)] != episode


def test_achieved_goal_as_a_slice_of_the_observation():
    steps, episodes = make_episodes(3, obs_dim=5, seed=2)
    out = relabel(steps, episodes, strategy="final", k=1, achieved="observation[1:3]")
    observation = np.asarray(steps.column("observation").to_pylist())
    ids = steps.column("episode_id").to_numpy()
    for i, goal in enumerate(out["hindsight_goal"]):
        last = np.flatnonzero(ids == ids[i])[-1]
        # k=1 goal per step, stored as [k, goal_dim]
        np.testing.assert_allclose(goal, [observation[last, 1:3]], rtol=1e-6)


def test_reward_function_by_dotted_path_and_by_gymnasium_env():
    steps, episodes = make_episodes(3, goal_dim=2, seed=6)
    out = relabel(
        steps,
        episodes,
        strategy="future",
        k=2,
        reward_function="tests.test_relabel_goals:reward_sum",
    )
    rows = per_step(steps)
    for i, (_, _, _, after) in enumerate(rows):
        goals = np.asarray(out["hindsight_goal"][i]).reshape(2, 2)
        np.testing.assert_allclose(
            out["hindsight_reward"][i], reward_sum(after, goals, None), rtol=1e-5
        )
    out = relabel(
        steps, episodes, strategy="final", k=1, reward_function="engine.envs:hindsight/PointGoal-v0"
    )
    assert set(np.concatenate(out["hindsight_reward"])) <= {0.0, -1.0}


@pytest.mark.parametrize(
    ("achieved", "message"),
    [
        ("observation.nope", "has no field 'nope'"),
        ("observation.achieved_goal[0:5]", "does not fit"),
        ("missing_column", "no column 'missing_column'"),
        ("observation[0:2", "is not a column"),
    ],
)
def test_bad_achieved_specs_are_clear_errors(achieved, message):
    steps, episodes = make_episodes(2, goal_dim=2)
    with pytest.raises(RelabelError, match=message):
        GoalsRelabeler({"achieved": achieved}).setup(TableInputs(steps, episodes))


def test_nan_achieved_goal_names_the_episode():
    steps, episodes = make_episodes(2, obs_dim=2, seed=0, min_length=3)
    observation = np.asarray(steps.column("observation").to_pylist(), dtype=np.float32)
    observation[2, 0] = np.nan
    steps = steps.set_column(2, "observation", cols.vectors_to_arrow(observation))
    with pytest.raises(RelabelError, match="non-finite.*episode 7 step t=2"):
        relabel(steps, episodes, achieved="observation")


def test_bad_strategy_lists_valid_parameters():
    with pytest.raises(RelabelError, match="strategy.*valid parameters: strategy"):
        GoalsRelabeler({"strategy": "past"})


def test_step_uniforms_are_exactly_hash_uniform():
    from relabelers.base import hash_uniform
    from relabelers.goals import GoalDraws, step_uniforms

    steps, _ = make_episodes(6, seed=9, max_length=20)
    ids, t = steps.column("episode_id").to_numpy(), steps.column("t").to_numpy()
    bounds = cols.episode_boundaries(ids)
    for seed, stream in ((0, 0), (123, 1_003), (2**40 + 5, 7)):
        assert np.array_equal(
            step_uniforms(seed, ids, t, bounds, stream), hash_uniform(seed, ids, t, stream)
        )
    # The kernel draws k streams for a slice of rows at a time (slices cut episodes).
    draws = GoalDraws(5, ids, t, bounds, (1_000, 1_001, 1_002))
    for rows in (slice(0, 7), slice(7, 40), slice(40, len(t))):
        expected = [hash_uniform(5, ids[rows], t[rows], s) for s in (1_000, 1_001, 1_002)]
        assert np.array_equal(draws.uniforms(rows), np.stack(expected))


# ---------------------------------------------------------------- the state after the last step
#
# Stable-Baselines3's and TorchRL's HER reward a goal by the achieved goal of the NEXT
# state, the observation after the action. Where next observations are stored, the last
# step of an episode has one too (the state the episode ended in), and its reward must
# come from it, not from the last row's own achieved goal.

FAR = 1.0  # how far each stored final next state is from the last row's achieved goal


def with_next_observations(steps: pa.Table, achieved: str = "achieved_goal") -> pa.Table:
    """`next_observation`: the next row's observation inside an episode, and at the last
    step a state FAR (Euclidean) from the last row's achieved goal, so that "reached by
    the last step" differs from "reached at the last row" for goals from the last row."""
    observation = steps.column("observation").combine_chunks()
    ids = steps.column(cols.EPISODE_ID).to_numpy()
    last = np.append(ids[1:] != ids[:-1], True)
    after = np.minimum(np.arange(len(ids)) + 1, len(ids) - 1)
    fields = {}
    for name in ("observation", "achieved_goal", "desired_goal"):
        values = cols.arrow_to_numpy(observation.field(name))[after].copy()
        own = cols.arrow_to_numpy(observation.field(name))
        values[last] = own[last]
        if name == achieved:
            shift = np.zeros(values.shape[1], np.float32)
            shift[0] = FAR
            values[last] = own[last] + shift
        fields[name] = cols.vectors_to_arrow(values.astype(np.float32))
    next_observation = pa.StructArray.from_arrays(list(fields.values()), names=list(fields))
    return steps.append_column(cols.NEXT_OBSERVATION, next_observation)


def expected_by_loop(steps: pa.Table, out: dict, k: int, threshold: float):
    """(reached, reward) per step and goal, by a plain loop over episodes: reward =
    distance(achieved_goal(next_observation[t]), goal) <= threshold."""
    ids = steps.column(cols.EPISODE_ID).to_pylist()
    next_achieved = [o["achieved_goal"] for o in steps.column(cols.NEXT_OBSERVATION).to_pylist()]
    reached, rewards = [], []
    for i in range(len(ids)):
        goals = np.asarray(out["hindsight_goal"][i], dtype=np.float64).reshape(k, -1)
        row = [bool(np.linalg.norm(np.float32(next_achieved[i]) - g) <= threshold) for g in goals]
        reached.append(row)
        rewards.append([float(r) for r in row])
    return reached, rewards


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    strategy=st.sampled_from(["final", "future", "episode", "random"]),
    k=st.integers(1, 4),
    max_length=st.integers(1, 10),
)
def test_reached_and_reward_follow_the_stored_next_observation(seed, strategy, k, max_length):
    steps, episodes = make_episodes(6, goal_dim=2, seed=seed, max_length=max_length)
    steps = with_next_observations(steps)
    out = relabel(steps, episodes, strategy=strategy, k=k, threshold=0.3)
    reached, rewards = expected_by_loop(steps, out, k, threshold=0.3)
    assert out["hindsight_reached"] == reached
    assert out["hindsight_reward"] == rewards


def test_the_final_goal_is_not_reached_when_the_episode_ends_elsewhere():
    """Goal = the last row's achieved goal; the stored state after the last action is FAR
    from it: not reached (the old code said reached at every last step)."""
    steps, episodes = make_episodes(8, goal_dim=2, seed=5, min_length=2, max_length=6)
    steps = with_next_observations(steps)
    out = relabel(steps, episodes, strategy="final", k=1, threshold=0.5)
    ids = steps.column(cols.EPISODE_ID).to_numpy()
    last = np.append(ids[1:] != ids[:-1], True)
    assert not any(r[0] for r, is_last in zip(out["hindsight_reached"], last) if is_last)
    assert all(w == [0.0] for w, is_last in zip(out["hindsight_reward"], last) if is_last)


def test_reward_function_sees_the_stored_next_achieved_goal():
    steps, episodes = make_episodes(4, goal_dim=2, seed=6)
    steps = with_next_observations(steps)
    out = relabel(
        steps,
        episodes,
        strategy="final",
        k=2,
        reward_function="tests.test_relabel_goals:reward_sum",
    )
    next_achieved = [o["achieved_goal"] for o in steps.column(cols.NEXT_OBSERVATION).to_pylist()]
    for i, after in enumerate(next_achieved):
        goals = np.asarray(out["hindsight_goal"][i]).reshape(2, 2)
        expected = reward_sum(np.float32(after), goals, None)
        np.testing.assert_allclose(out["hindsight_reward"][i], expected, rtol=1e-5)


def test_a_slice_of_a_vector_observation_uses_the_same_slice_of_the_next_one():
    steps, episodes = make_episodes(5, obs_dim=4, seed=8, min_length=2)
    observation = cols.arrow_to_numpy(steps.column("observation"))
    ids = steps.column(cols.EPISODE_ID).to_numpy()
    last = np.append(ids[1:] != ids[:-1], True)
    next_observation = observation[np.minimum(np.arange(len(ids)) + 1, len(ids) - 1)].copy()
    next_observation[last] = observation[last] + np.array([0, FAR, 0, 0], np.float32)
    steps = steps.append_column(cols.NEXT_OBSERVATION, cols.vectors_to_arrow(next_observation))
    out = relabel(
        steps, episodes, strategy="final", k=1, achieved="observation[1:3]", threshold=0.5
    )
    for i in range(len(ids)):
        goal = np.asarray(out["hindsight_goal"][i])
        reached = np.linalg.norm(next_observation[i, 1:3] - goal) <= 0.5
        assert out["hindsight_reached"][i] == [bool(reached)]
    assert not any(r[0] for r, is_last in zip(out["hindsight_reached"], last) if is_last)


def test_the_relabel_job_reads_next_observations_when_the_dataset_has_them(tmp_path):
    from engine.dataset import open_dataset
    from engine.executor import InProcess
    from jobs import relabeling
    from tests.synthetic import write_synthetic_dataset

    steps, episodes = make_episodes(7, goal_dim=2, seed=3, min_length=2, max_length=9)
    steps = with_next_observations(steps)
    write_synthetic_dataset(str(tmp_path / "in"), steps, episodes, part_steps=15)
    goals = GoalsRelabeler({"strategy": "final", "k": 1, "threshold": 0.5})
    relabeling.relabel(
        str(tmp_path / "in"), str(tmp_path / "out"), [goals], executor=InProcess(), command="t"
    )
    written = open_dataset(str(tmp_path / "out")).read(
        columns=["hindsight_goal", "hindsight_reached"]
    )
    reached, _ = expected_by_loop(steps, written.to_pydict(), k=1, threshold=0.5)
    assert written.column("hindsight_reached").to_pylist() == reached


# ---------------------------------------------------------------- the stored layout (1.2)


def test_goals_read_as_k_by_goal_dim_in_polars_the_engine_scan_and_the_shards(tmp_path):
    """Each step's k goals are a [k, goal_dim] array wherever they are read: Polars on the
    group's files, `engine.scan`, and the shard writer (index count/dim, shard values),
    each goal equal to the achieved goal of the step it came from (a loop)."""
    import polars as pl

    import engine
    from engine.executor import InProcess
    from jobs import relabeling
    from jobs.commands.shard import Shard
    from schemas.shard_index import EPISODE_ID, TIMESTEP, condition_member
    from tests.synthetic import write_synthetic_dataset
    from tests.test_shards import read_blocks

    k = 3
    steps, episodes = make_episodes(7, goal_dim=2, seed=3, min_length=2, max_length=9)
    write_synthetic_dataset(str(tmp_path / "in"), steps, episodes, part_steps=15)
    goals = GoalsRelabeler({"strategy": "future", "k": k}, seed=2)
    out = str(tmp_path / "out")
    relabeling.relabel(str(tmp_path / "in"), out, [goals], executor=InProcess(), command="t")

    files = pl.scan_parquet(str(tmp_path / "out" / "goals" / "steps" / "*.parquet"))
    assert files.collect_schema()["hindsight_goal"] == pl.Array(pl.Float32, (k, 2))
    stored = files.collect()["hindsight_goal"].to_numpy()
    assert stored.shape == (steps.num_rows, k, 2)
    scanned = engine.scan(out).collect()
    np.testing.assert_array_equal(scanned["hindsight_goal"].to_numpy(), stored)
    for j in range(k):  # goal j without slicing by hand
        goal_j = engine.scan(out).select(pl.col("hindsight_goal").arr.get(j)).collect()
        np.testing.assert_array_equal(goal_j.to_series().to_numpy(), stored[:, j])

    achieved = {(e, t): a for e, t, a, _ in per_step(steps)}
    goal_steps = scanned["hindsight_goal_step"].to_list()
    ids, ts = scanned["episode_id"].to_list(), scanned["t"].to_list()
    for i, (episode, t) in enumerate(zip(ids, ts)):
        for j, source in enumerate(goal_steps[i]):
            assert t < source or source == t == max(s for e, s in achieved if e == episode)
            np.testing.assert_array_equal(stored[i, j], np.float32(achieved[(episode, source)]))

    shards = str(tmp_path / "shards")
    index = Shard(
        input=out, output=shards, condition=["hindsight_goal"], window=1, shard_steps=40, seed=0
    ).run()
    info = index.conditions["hindsight_goal"]
    assert (info.type, info.count, info.dim) == ("vector", k, 2)
    by_step = {(e, t): stored[i] for i, (e, t) in enumerate(zip(ids, ts))}
    seen = 0
    for shard in sorted((tmp_path / "shards").glob("*.tar")):
        for block in read_blocks(str(shard)):
            # window=1: every block row is a window of its own, with its episode id.
            for episode, t, goal in zip(
                block[EPISODE_ID], block[TIMESTEP], block[condition_member("hindsight_goal")]
            ):
                np.testing.assert_array_equal(goal, by_step[(int(episode), int(t))])
                seen += 1
    assert seen == steps.num_rows
