"""The vectorized validation rules agree with a plain reference implementation, and
ingest refuses values the schema does not allow, where they are stored (issue 17, class 4)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import h5py
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import engine
from engine import storage
from engine.collect import Rollouts, collect, plan_collect
from engine.executor import InProcess
from engine.ingest import ingest, plan_ingest
from engine.validate import (
    ValidationError,
    changes_within_episodes,
    check_finite,
    check_flag_values,
    check_flags_at_episode_ends,
    check_step_index,
)
from jobs.cli import main
from schemas import steps as cols
from schemas.manifest import SKIPPED_REPORT_NAME
from tests.synthetic import make_episodes
from tests.test_ingest import d4rl_arrays, episode_lengths, write_hdf5


def reference_bad_episodes(episode_ids: list[int], t: list[int]) -> set[int]:
    """Episodes whose sorted steps are not exactly 0, 1, ..., n-1."""
    steps: dict[int, list[int]] = {}
    for episode, step in zip(episode_ids, t):
        steps.setdefault(episode, []).append(step)
    return {e for e, s in steps.items() if sorted(s) != list(range(len(s)))}


rows = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 6)), min_size=0, max_size=60)


@settings(max_examples=200, deadline=None)
@given(rows)
def test_step_index_rule_matches_reference(pairs):
    pairs = sorted(pairs)
    episode_ids = np.array([p[0] for p in pairs], dtype=np.int64)
    t = np.array([p[1] for p in pairs], dtype=np.int64)
    problems = check_step_index("f.parquet", episode_ids, t)
    assert {p.episode for p in problems} == reference_bad_episodes(episode_ids.tolist(), t.tolist())
    assert all(p.file == "f.parquet" and p.column == "t" for p in problems)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.sampled_from([0.0, 1.5, np.nan, np.inf])), max_size=40)
)
def test_finite_rule_matches_reference(pairs):
    pairs = sorted(pairs, key=lambda p: p[0])
    episode_ids = np.array([p[0] for p in pairs], dtype=np.int64)
    values = np.array([p[1] for p in pairs], dtype=np.float64)
    problems = check_finite("f.h5", "reward", values, episode_ids)
    expected = {e for e, v in pairs if not np.isfinite(v)}
    assert {p.episode for p in problems} == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2)), max_size=40))
def test_constant_within_episodes_matches_reference(pairs):
    pairs = sorted(pairs, key=lambda p: p[0])
    episode_ids = np.array([p[0] for p in pairs], dtype=np.int64)
    values = np.array([p[1] for p in pairs])
    starts = np.ones(len(pairs), bool)
    starts[1:] = episode_ids[1:] != episode_ids[:-1]
    by_episode: dict[int, set[int]] = {}
    for episode, value in pairs:
        by_episode.setdefault(episode, set()).add(value)
    expected = any(len(v) > 1 for v in by_episode.values())
    assert changes_within_episodes(values, starts) == expected


# ---------------------------------------------------------------- values checked where stored
#
# Each source below carries one bad value at a known (episode, step, column). Ingest must
# refuse it with one line naming the file, episode, step and column, write nothing, and
# under --on-error skip leave out exactly that episode and list it in skipped.json.

FORMATS = ("hdf5", "npz", "parquet", "jsonl", "minari")
D4RL_NAMES = {
    "observation": "observations",
    "action": "actions",
    "next_observation": "next_observations",
    "reward": "rewards",
    "terminated": "terminals",
    "truncated": "timeouts",
}
MINARI_NAMES = {
    "action": "actions",
    "reward": "rewards",
    "terminated": "terminations",
    "truncated": "truncations",
}


@dataclass
class Damaged:
    """A source with one bad value, and what ingest must say about it."""

    source: str  # what to ingest
    file: str  # the file problems name
    episode: int  # the episode id of the bad value
    step: int
    episode_ids: list[int]  # every episode of the source

    def line(self, column: str, message: str = "") -> str:
        return (
            f"{self.file}: episode {self.episode}, step {self.step}: column {column!r}: {message}"
        )


def damaged(tmp_path, format: str, column: str, value, episode: int = 1, step: int = 2) -> Damaged:
    """A small source in `format` whose `column` holds `value` at (episode, step) (the
    episode'th episode of the source); the column's dtype widens to hold the value."""
    if format in ("hdf5", "npz"):
        return _damaged_d4rl(tmp_path, format, column, value, episode, step)
    if format == "minari":
        return _damaged_minari(tmp_path, column, value, episode, step)
    return _damaged_step_table(tmp_path, format, column, value, episode, step)


def _widened(values: np.ndarray, value) -> np.ndarray:
    """A copy of `values` whose dtype holds `value` (strings stay strings)."""
    if isinstance(value, str):
        return values.astype(str)
    if isinstance(value, bool):
        return values.copy()
    if isinstance(value, float):
        return values.astype(np.float64)
    return values.astype(np.int64) if values.dtype == bool else values.copy()


def _damaged_d4rl(tmp_path, format, column, value, episode, step) -> Damaged:
    arrays = d4rl_arrays(num_steps=120, num_episodes=5, seed=1)
    lengths = episode_lengths(arrays)
    row = int(np.sum(lengths[:episode])) + step
    name = D4RL_NAMES[column]
    arrays[name] = _widened(arrays[name], value)
    if column == "observation":
        arrays[name][row, 1] = value
    elif arrays[name].ndim > 1:
        arrays[name][row, 0] = value
    else:
        arrays[name][row] = value
    path = tmp_path / f"logs.{'h5' if format == 'hdf5' else 'npz'}"
    if format == "hdf5":
        write_hdf5(path, arrays)
    else:
        np.savez(path, **arrays)
    return Damaged(str(path), str(path), episode, step, list(range(len(lengths))))


def minari_episodes(num_episodes: int = 4, length: int = 6) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [
        {
            "observations": rng.normal(size=(length + 1, 3)).astype(np.float32),
            "actions": rng.uniform(-1, 1, size=(length, 2)).astype(np.float32),
            "rewards": rng.normal(size=length),
            "terminations": np.arange(length) == length - 1,
            "truncations": np.zeros(length, bool),
        }
        for _ in range(num_episodes)
    ]


def write_minari(folder, episodes: list[dict[str, np.ndarray]]) -> str:
    """Minari's HDF5 layout (data/main_data.hdf5, one group per episode), by h5py."""
    data = folder / "data"
    data.mkdir(parents=True)
    with h5py.File(data / "main_data.hdf5", "w") as handle:
        for index, episode in enumerate(episodes):
            group = handle.create_group(f"episode_{index}")
            group.attrs["id"] = index
            for name, values in episode.items():
                group.create_dataset(name, data=values)
    (data / "metadata.json").write_text(json.dumps({"data_format": "hdf5"}))
    return str(folder)


def _damaged_minari(tmp_path, column, value, episode, step) -> Damaged:
    episodes = minari_episodes()
    target = episodes[episode]
    if column in ("observation", "next_observation"):  # n+1 stored observations
        observations = _widened(target["observations"], value)
        observations[step + (column == "next_observation"), 0] = value
        target["observations"] = observations
    else:
        name = MINARI_NAMES[column]
        values = _widened(target[name], value)
        if values.ndim > 1:
            values[step, 0] = value
        else:
            values[step] = value
        target[name] = values
    folder = write_minari(tmp_path / "minari", episodes)
    data_file = str(tmp_path / "minari" / "data" / "main_data.hdf5")
    return Damaged(folder, data_file, episode, step, list(range(len(episodes))))


def _damaged_step_table(tmp_path, format, column, value, episode, step) -> Damaged:
    steps, episodes = make_episodes(num_episodes=4, seed=7, min_length=5, max_length=8)
    ids = episodes.column("episode_id").to_pylist()
    row = int(np.sum(episodes.column("length").to_numpy()[:episode])) + step
    if column in ("observation", "action"):
        values = _widened(cols.arrow_to_numpy(steps.column(column)), value)
        values[row, 0] = value
        array = pa.array(
            values.tolist(), pa.list_(pa.string() if isinstance(value, str) else pa.float64())
        )
    else:
        values = _widened(steps.column(column).to_numpy(zero_copy_only=False), value)
        values[row] = value
        array = pa.array(values.tolist())
    steps = steps.set_column(steps.column_names.index(column), column, array)
    path = tmp_path / f"steps.{format}"
    if format == "parquet":
        pq.write_table(steps, path)
    else:
        with open(path, "w") as handle:
            for record in steps.to_pylist():
                handle.write(json.dumps(record) + "\n")
    return Damaged(str(path), str(path), ids[episode], step, ids)


def refusal(source: str, output) -> str:
    """The error of a default ingest (plan and parts, in this process); nothing written."""
    with pytest.raises(ValidationError) as caught:
        ingest(plan_ingest(source, part_steps=40), str(output), executor=InProcess(), command="t")
    assert not output.exists() or storage.list_files(str(output)) == []
    return str(caught.value)


def assert_skipped(case: Damaged, output, column: str) -> None:
    """--on-error skip: every episode but the bad one is written, the report names it."""
    plan = plan_ingest(case.source, on_error="skip", part_steps=40)
    manifest = ingest(plan, str(output), executor=InProcess(), command="t")
    written = engine.scan_episodes(str(output)).collect()["episode_id"].to_list()
    assert written == [e for e in case.episode_ids if e != case.episode]
    assert manifest.metadata["skipped_episodes"] == 1
    report = json.loads(storage.read_bytes(storage.join(str(output), SKIPPED_REPORT_NAME)))
    assert {"file": case.file, "column": column, "episode": case.episode, "step": case.step} in [
        {k: p[k] for k in ("file", "column", "episode", "step")} for p in report["skipped"]
    ]


@pytest.mark.parametrize(
    ("format", "column"),
    [
        ("npz", "reward"),
        ("hdf5", "observation"),
        ("hdf5", "action"),
        ("parquet", "reward"),
        ("parquet", "observation"),
        ("jsonl", "reward"),
        ("jsonl", "action"),
        ("minari", "reward"),
        ("minari", "observation"),
    ],
)
def test_a_float64_that_overflows_float32_is_refused(tmp_path, format, column):
    """1e39 is finite as float64 and infinite once stored as float32: checked after the cast."""
    case = damaged(tmp_path, format, column, 1e39)
    assert case.line(column, "non-finite value") in refusal(case.source, tmp_path / "ds")
    assert_skipped(case, tmp_path / "skip", column)


@pytest.mark.parametrize(
    ("format", "column", "value"),
    [
        ("hdf5", "observation", np.nan),
        ("npz", "action", np.inf),
        ("hdf5", "next_observation", -np.inf),
        ("parquet", "observation", np.nan),
        ("parquet", "action", -np.inf),
        ("minari", "observation", np.nan),
        ("minari", "next_observation", np.inf),
        ("minari", "action", np.nan),
    ],
)
def test_non_finite_observations_and_actions_are_refused(tmp_path, format, column, value):
    case = damaged(tmp_path, format, column, value)
    message = refusal(case.source, tmp_path / "ds")
    assert case.line(column, "non-finite value [") in message
    assert_skipped(case, tmp_path / "skip", column)


def test_non_finite_field_of_a_dict_observation_is_refused(tmp_path):
    steps, _ = make_episodes(num_episodes=3, seed=5, min_length=4, goal_dim=2)
    achieved = cols.struct_to_numpy(steps.column("observation"), "achieved_goal").copy()
    achieved[5, 1] = np.nan
    observation = steps.column("observation").combine_chunks()
    observation = pa.StructArray.from_arrays(
        [observation.field(0), cols.vectors_to_arrow(achieved), observation.field(2)],
        names=["observation", "achieved_goal", "desired_goal"],
    )
    steps = steps.set_column(2, "observation", observation)
    path = tmp_path / "steps.parquet"
    pq.write_table(steps, path)
    row_episode, row_step = steps.column("episode_id")[5].as_py(), steps.column("t")[5].as_py()
    expected = f"episode {row_episode}, step {row_step}: column 'observation.achieved_goal'"
    assert expected in refusal(str(path), tmp_path / "ds")


def test_an_episode_return_beyond_float32_is_refused(tmp_path):
    """Each reward fits float32, their sum does not: the stored return would be inf."""
    case = damaged(tmp_path, "parquet", "reward", 3e38, step=0)
    table = pq.read_table(case.source)
    rewards = table.column("reward").to_numpy().copy()
    rewards[np.flatnonzero(table.column("episode_id").to_numpy() == case.episode)[1]] = 3e38
    pq.write_table(table.set_column(3 + 1, "reward", pa.array(rewards)), case.source)
    message = refusal(case.source, tmp_path / "ds")
    assert f"{case.file}: episode {case.episode}: column 'return': is inf in float32" in message


@pytest.mark.parametrize("format", ["parquet", "jsonl"])
def test_fractional_step_index_is_refused_not_truncated(tmp_path, format):
    case = damaged(tmp_path, format, "t", 2.5)  # steps 0, 1, 2.5, 3, ...: no gap once truncated
    expected = f"{case.file}: episode {case.episode}: column 't': step index 2.5 is not a whole"
    assert expected in refusal(case.source, tmp_path / "ds")
    (tmp_path / "whole").mkdir()
    whole = damaged(tmp_path / "whole", format, "t", 2.0)  # a float column of whole numbers
    plan = plan_ingest(whole.source)
    ingest(plan, str(tmp_path / "whole-ds"), executor=InProcess(), command="t")
    assert engine.scan(str(tmp_path / "whole-ds")).collect()["t"].dtype == pl.Int32


@pytest.mark.parametrize(
    ("format", "column", "value", "name"),
    [
        ("hdf5", "terminated", 0.5, "terminals"),
        ("npz", "terminated", 7, "terminals"),
        ("hdf5", "truncated", 0.5, "timeouts"),
        ("parquet", "terminated", 0.5, "terminated"),
        ("jsonl", "truncated", 7, "truncated"),
        ("minari", "terminated", 7, "terminations"),
    ],
)
def test_flag_values_other_than_0_and_1_are_refused(tmp_path, format, column, value, name):
    """A cast reads 0.5 or 7 as true: in a D4RL file that would cut an episode in two."""
    case = damaged(tmp_path, format, column, value)
    expected = case.line(name, f"flag value {value} is neither 0 nor 1")
    assert expected in refusal(case.source, tmp_path / "ds")
    assert_skipped(case, tmp_path / "skip", name)


@pytest.mark.parametrize("format", ["parquet", "jsonl"])
def test_flags_given_as_0_and_1_are_accepted(tmp_path, format):
    steps, _ = make_episodes(num_episodes=3, seed=2, min_length=3)
    flags = steps.column("terminated").cast(pa.int64())
    steps = steps.set_column(steps.column_names.index("terminated"), "terminated", flags)
    path = tmp_path / f"steps.{format}"
    if format == "parquet":
        pq.write_table(steps, path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in steps.to_pylist()))
    ingest(plan_ingest(str(path)), str(tmp_path / "ds"), executor=InProcess(), command="t")
    stored = engine.scan(str(tmp_path / "ds")).collect()["terminated"].to_list()
    assert stored == [bool(f) for f in flags.to_pylist()]


@pytest.mark.parametrize(
    ("format", "column", "name"),
    [
        ("parquet", "terminated", "terminated"),
        ("jsonl", "truncated", "truncated"),
        ("minari", "terminated", "terminations"),
        ("minari", "truncated", "truncations"),
    ],
)
def test_a_flag_before_the_episode_end_is_refused(tmp_path, format, column, name):
    case = damaged(tmp_path, format, column, True, step=1)
    expected = case.line(name, "is set before the episode's last step")
    assert expected in refusal(case.source, tmp_path / "ds")
    assert_skipped(case, tmp_path / "skip", name)


@pytest.mark.parametrize(
    ("format", "column", "value", "stored"),
    [
        ("parquet", "reward", "1.5", "reward"),
        ("jsonl", "reward", "1.5", "reward"),
        ("parquet", "reward", True, "reward"),
        ("npz", "reward", "1.5", "rewards"),
        ("hdf5", "reward", True, "rewards"),
        ("parquet", "observation", "0.25", "observation"),
        ("npz", "action", "0.25", "actions"),
    ],
)
def test_rewards_and_vectors_that_are_not_numbers_are_refused(
    tmp_path, format, column, value, stored
):
    """Strings and booleans are never cast into rewards or observations: a whole-file
    problem (the column's type), so not skippable either."""
    case = damaged(tmp_path, format, column, value)
    if isinstance(value, bool):  # a column of booleans, not one boolean among numbers
        if format == "hdf5":
            arrays = d4rl_arrays(num_steps=120, num_episodes=5, seed=1)
            arrays["rewards"] = arrays["rewards"] > 0
            write_hdf5(case.source, arrays)
        else:
            table = pq.read_table(case.source)
            flags = pa.array(table.column("reward").to_numpy() > 0)
            pq.write_table(table.set_column(3 + 1, "reward", flags), case.source)
    expected = f"{case.file}: column {stored!r}: must hold numbers"
    assert expected in refusal(case.source, tmp_path / "ds")
    with pytest.raises(ValidationError, match="must hold numbers"):
        plan_ingest(case.source, on_error="skip")


def test_a_non_numeric_minari_reward_skips_only_its_episode(tmp_path):
    episodes = minari_episodes()
    episodes[2]["rewards"] = episodes[2]["rewards"] > 0
    source = write_minari(tmp_path / "minari", episodes)
    data_file = str(tmp_path / "minari" / "data" / "main_data.hdf5")
    expected = f"{data_file}: episode 2: column 'rewards': must hold numbers"
    assert expected in refusal(source, tmp_path / "ds")
    plan = plan_ingest(source, on_error="skip")
    ingest(plan, str(tmp_path / "skip"), executor=InProcess(), command="t")
    assert engine.scan_episodes(str(tmp_path / "skip")).collect()["episode_id"].to_list() == [
        0,
        1,
        3,
    ]


def test_cli_refuses_a_non_finite_observation_in_one_line_per_problem(ray_local, tmp_path, capsys):
    """The refusal found while parts are written, through the command line: exit status
    2, the problem on one line, no traceback, no files left."""
    case = damaged(tmp_path, "hdf5", "observation", np.nan)
    output = tmp_path / "ds"
    assert main(["ingest", case.source, str(output), "--part-steps", "30"]) == 2
    error = capsys.readouterr().err
    assert case.line("observation", "non-finite value [") in error
    assert "Traceback" not in error
    assert not output.exists() or storage.list_files(str(output)) == []


def nan_policy(observation):
    """A policy that fails: NaN actions (collect must refuse to store them)."""
    return np.array([np.nan], dtype=np.float32)


@pytest.mark.filterwarnings("ignore::UserWarning")  # gymnasium's checker sees the NaN too
def test_collect_refuses_non_finite_values_from_a_policy(tmp_path):
    rollouts = Rollouts("Pendulum-v1", policy="tests.test_ingest_validate:nan_policy")
    plan = plan_collect(rollouts, episodes=2, episodes_per_part=1)
    output = tmp_path / "ds"
    with pytest.raises(ValidationError, match=r"episode 0, step 0: column 'action': non-finite"):
        collect(plan, str(output), executor=InProcess(), command="t")
    assert not output.exists() or storage.list_files(str(output)) == []


# ---------------------------------------------------------------- the flag rules, by loops


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from([0, 1, 0.5, 7, True])), max_size=30))
def test_flag_rules_match_a_loop(pairs):
    pairs = sorted(pairs, key=lambda p: p[0])
    episode_ids = np.array([p[0] for p in pairs], dtype=np.int64)
    values = np.array([float(p[1]) for p in pairs])
    steps = np.zeros(len(pairs), dtype=np.int64)
    for i in range(1, len(pairs)):
        steps[i] = steps[i - 1] + 1 if episode_ids[i] == episode_ids[i - 1] else 0
    bad_value, early = set(), set()
    for i, (episode, value) in enumerate(pairs):
        is_last = i + 1 == len(pairs) or pairs[i + 1][0] != episode
        if value not in (0, 1):
            bad_value.add(episode)
        if value == 1 and not is_last:
            early.add(episode)
    found = check_flag_values("f", "terminated", values, episode_ids, steps)
    assert {p.episode for p in found} == bad_value
    found = check_flags_at_episode_ends("f", "terminated", values, episode_ids, steps)
    assert {p.episode for p in found} == early
