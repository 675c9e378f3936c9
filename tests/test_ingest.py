"""Ingest: every format round-trips exactly; bad input fails before anything is written."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

import h5py
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import engine
from engine import sources, storage
from engine.dataset import DatasetError, open_dataset
from engine.executor import InProcess
from engine.ingest import ingest, ingest_part, part_tasks, plan_ingest
from engine.materialize import materialize
from engine.sources.base import IngestPlan, Part, PlanOptions, Source, part_ranges, source_label
from engine.sources.tables import EpisodeLabels, build_tables
from engine.validate import ValidationError, check_finite
from engine.writer import VersionWriter
from jobs.cli import main
from jobs.commands.info import Info
from jobs.commands.ingest import Ingest
from jobs.commands.materialize import Materialize
from jobs.runtime import RayExecutor
from schemas import steps as cols
from schemas.manifest import SKIPPED_REPORT_NAME
from tests.synthetic import attach_group, make_episodes, write_synthetic_dataset

# ---------------------------------------------------------------- D4RL-style source files


def d4rl_arrays(
    num_steps: int = 600, seed: int = 0, tail: bool = False, num_episodes: int = 9
) -> dict[str, np.ndarray]:
    """Flat arrays with episodes ending at terminals or timeouts; `noise` is constant per
    episode, `qpos` is not. With `tail`, the last steps have neither flag."""
    rng = np.random.default_rng(seed)
    terminals = np.zeros(num_steps, bool)
    timeouts = np.zeros(num_steps, bool)
    ends = np.sort(rng.choice(np.arange(5, num_steps - 10), size=num_episodes - 1, replace=False))
    terminals[ends[::2]] = True
    timeouts[ends[1::2]] = True
    if not tail:
        timeouts[-1] = True
    lengths = np.diff(np.concatenate([[0], np.flatnonzero(terminals | timeouts) + 1, [num_steps]]))
    lengths = lengths[lengths > 0]
    observations = rng.normal(size=(num_steps, 5)).astype(np.float32)
    return {
        "observations": observations,
        "actions": rng.uniform(-1, 1, size=(num_steps, 2)).astype(np.float32),
        "rewards": rng.normal(size=num_steps).astype(np.float32),
        "terminals": terminals,
        "timeouts": timeouts,
        "next_observations": np.roll(observations, -1, axis=0),
        "infos/noise": np.repeat(rng.uniform(size=len(lengths)), lengths),
        "infos/qpos": rng.normal(size=(num_steps, 2)),
    }


def write_hdf5(path, arrays: dict[str, np.ndarray]) -> str:
    with h5py.File(path, "w") as handle:
        for name, values in arrays.items():
            handle.create_dataset(name, data=values)
    return str(path)


def episode_lengths(arrays: dict[str, np.ndarray]) -> np.ndarray:
    ends = np.flatnonzero(arrays["terminals"] | arrays["timeouts"])
    if len(ends) == 0 or ends[-1] != len(arrays["rewards"]) - 1:
        ends = np.append(ends, len(arrays["rewards"]) - 1)
    return np.diff(np.concatenate([[-1], ends]))


def assert_matches_d4rl(uri: str, arrays: dict[str, np.ndarray]) -> None:
    steps = engine.scan(uri).collect()
    episodes = engine.scan_episodes(uri).collect()
    lengths = episode_lengths(arrays)
    np.testing.assert_array_equal(episodes["length"].to_numpy(), lengths)
    np.testing.assert_array_equal(
        steps["episode_id"].to_numpy(), np.repeat(np.arange(len(lengths)), lengths)
    )
    np.testing.assert_array_equal(
        steps["t"].to_numpy(), np.concatenate([np.arange(n) for n in lengths])
    )
    np.testing.assert_array_equal(steps["observation"].to_numpy(), arrays["observations"])
    np.testing.assert_array_equal(steps["next_observation"].to_numpy(), arrays["next_observations"])
    np.testing.assert_array_equal(steps["action"].to_numpy(), arrays["actions"])
    np.testing.assert_array_equal(steps["reward"].to_numpy(), arrays["rewards"])
    np.testing.assert_array_equal(steps["terminated"].to_numpy(), arrays["terminals"])
    np.testing.assert_array_equal(steps["qpos"].to_numpy(), arrays["infos/qpos"])
    np.testing.assert_array_equal(steps["noise"].to_numpy(), arrays["infos/noise"])
    # noise is constant within episodes, so it is on the episodes table too; qpos is not.
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    np.testing.assert_array_equal(episodes["noise"].to_numpy(), arrays["infos/noise"][starts])
    assert "qpos" not in episodes.columns
    expected_returns = np.add.reduceat(arrays["rewards"].astype(np.float64), starts)
    np.testing.assert_allclose(episodes["return"].to_numpy(), expected_returns, rtol=1e-6)


def test_d4rl_hdf5_round_trip(ray_local, tmp_path):
    arrays = d4rl_arrays()
    source = write_hdf5(tmp_path / "logs.h5", arrays)
    uri = str(tmp_path / "ds")
    manifest = Ingest(input=source, output=uri, env="Toy-v0", format="d4rl", part_steps=150).run()
    assert len(manifest.parts) > 1
    assert_matches_d4rl(uri, arrays)
    info = Info(input=uri).run()
    assert info["steps"] == len(arrays["rewards"])
    assert info["episodes"] == len(episode_lengths(arrays))
    assert info["env_ids"] == ["Toy-v0"]
    assert not storage.exists(storage.join(uri, SKIPPED_REPORT_NAME))


def test_d4rl_npz_round_trip(ray_local, tmp_path):
    arrays = d4rl_arrays(seed=3)
    source = tmp_path / "logs.npz"
    np.savez(source, **arrays)
    uri = str(tmp_path / "ds")
    Ingest(input=str(source), output=uri, part_steps=200).run()
    assert_matches_d4rl(uri, arrays)
    with pytest.raises(ValueError, match="versions are immutable"):
        Ingest(input=str(source), output=uri).run()


def test_tail_without_flags_is_kept_truncated_and_reported(ray_local, tmp_path):
    arrays = d4rl_arrays(tail=True, seed=5)
    uri = str(tmp_path / "ds")
    manifest = Ingest(input=write_hdf5(tmp_path / "logs.h5", arrays), output=uri).run()
    lengths = episode_lengths(arrays)
    steps = engine.scan(uri).collect()
    assert steps["truncated"][-1] is True
    # every other flag is exactly the source's
    np.testing.assert_array_equal(steps["truncated"].to_numpy()[:-1], arrays["timeouts"][:-1])
    report = json.loads(storage.read_bytes(storage.join(uri, SKIPPED_REPORT_NAME)))
    assert report["truncated_tails"][0]["episode"] == len(lengths) - 1
    assert report["truncated_tails"][0]["steps"] == lengths[-1]
    assert manifest.metadata["skipped_report"] == SKIPPED_REPORT_NAME
    assert manifest.episodes == len(lengths)


# ---------------------------------------------------------------- step tables


def to_source_table(steps: pa.Table) -> pa.Table:
    """A user's step table: other column names, shuffled rows, plain lists."""
    table = steps.rename_columns(
        ["episode" if n == "episode_id" else "step" if n == "t" else n for n in steps.column_names]
    )
    order = np.random.default_rng(0).permutation(table.num_rows)
    return table.take(pa.array(order))


def assert_matches_steps(uri: str, steps: pa.Table, episodes: pa.Table) -> None:
    read = engine.scan(uri).collect()
    read_episodes = engine.scan_episodes(uri).collect()
    for name in ("episode_id", "t", "reward", "terminated", "truncated", "noise"):
        np.testing.assert_array_equal(read[name].to_numpy(), steps.column(name).to_numpy())
    np.testing.assert_array_equal(
        read["observation"].to_numpy(), np.stack(steps.column("observation").to_pylist())
    )
    np.testing.assert_array_equal(
        read["action"].to_numpy(), np.stack(steps.column("action").to_pylist())
    )
    for name in ("episode_id", "length", "return", "noise"):
        np.testing.assert_allclose(
            read_episodes[name].to_numpy(), episodes.column(name).to_numpy(), rtol=1e-6
        )


def test_parquet_round_trip_several_files(ray_local, tmp_path):
    steps, episodes = make_episodes(num_episodes=9, seed=2)
    source = to_source_table(steps)
    folder = tmp_path / "logs"
    folder.mkdir()
    # Episodes split by id over two files; rows shuffled inside each.
    ids = source.column("episode").to_numpy()
    pq.write_table(source.filter(pa.array(ids < 40)), folder / "a.parquet")
    pq.write_table(source.filter(pa.array(ids >= 40)), folder / "b.parquet")
    uri = str(tmp_path / "ds")
    Ingest(
        input=str(folder),
        output=uri,
        map={"episode_id": "episode", "t": "step"},
        part_steps=50,
    ).run()
    assert_matches_steps(uri, steps, episodes)


def test_parquet_struct_observations_and_discrete_actions(ray_local, tmp_path):
    steps, episodes = make_episodes(num_episodes=6, seed=8, goal_dim=2, discrete_actions=4)
    path = step_file(tmp_path, steps)
    uri = str(tmp_path / "ds")
    Ingest(input=path, output=uri).run()
    read = open_dataset(uri).read()
    assert read.schema.field("action").type == pa.int64()
    assert read.column("action").equals(steps.column("action"))
    for field in ("observation", "achieved_goal", "desired_goal"):
        np.testing.assert_array_equal(
            cols.struct_to_numpy(read.column("observation"), field),
            cols.struct_to_numpy(steps.column("observation"), field),
        )
    assert (
        engine.scan_episodes(uri).collect()["length"].to_list()
        == episodes.column("length").to_pylist()
    )


def test_jsonl_round_trip_with_variable_lists(ray_local, tmp_path):
    steps, episodes = make_episodes(num_episodes=5, seed=4)
    source = tmp_path / "logs.jsonl"
    with open(source, "w") as handle:
        for row in to_source_table(steps).to_pylist():
            handle.write(json.dumps(row) + "\n")
    uri = str(tmp_path / "ds")
    # The deprecated spelling of --map episode_id=episode,t=step still works.
    Ingest(input=str(source), output=uri, episode_column="episode", step_column="step").run()
    # JSON numbers are parsed as float64 and stored as float32: equal to the float32 source.
    assert_matches_steps(uri, steps, episodes)


# ---------------------------------------------------------------- Minari


@pytest.mark.parametrize("data_format", ["hdf5", "arrow"])
def test_minari_round_trip(ray_local, tmp_path, monkeypatch, data_format):
    minari = pytest.importorskip("minari")
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    rng = np.random.default_rng(0)
    buffers, lengths = [], [7, 12, 5, 9]

    def noise_shape(rows: int) -> tuple[int, ...]:
        # minari 0.5.4's arrow storage cannot decode scalar infos (it writes an empty
        # shape it then fails to parse), so that variant stores the noise as 1-vectors.
        return (rows,) if data_format == "hdf5" else (rows, 1)

    for episode, length in enumerate(lengths):
        buffers.append(
            EpisodeBuffer(
                id=episode,
                observations=rng.normal(size=(length + 1, 3)).astype(np.float32),
                actions=rng.uniform(-2, 2, size=(length, 1)).astype(np.float32),
                rewards=list(rng.normal(size=length)),
                terminations=[False] * (length - 1) + [episode % 2 == 0],
                truncations=[False] * (length - 1) + [episode % 2 == 1],
                infos={"noise": np.full(noise_shape(length + 1), 0.25 * episode)},
            )
        )
    with pytest.warns(UserWarning):
        dataset = minari.create_dataset_from_buffers(
            "test/pendulum-noisy-v0",
            buffers,
            env="Pendulum-v1",
            algorithm_name="scripted",
            data_format=data_format,
        )
    directory = tmp_path / "minari" / "test" / "pendulum-noisy-v0"
    uri = str(tmp_path / "ds")
    manifest = Ingest(input=str(directory), output=uri, part_steps=15).run()
    assert manifest.metadata["source_format"] == "minari"
    assert manifest.metadata["minari_data_format"] == data_format
    steps = engine.scan(uri).collect()
    episodes = engine.scan_episodes(uri).collect()
    assert episodes["length"].to_list() == lengths
    assert episodes["env_id"].unique().to_list() == ["Pendulum-v1"]
    np.testing.assert_array_equal(
        np.asarray(episodes["noise"].to_list()).reshape(-1), [0.0, 0.25, 0.5, 0.75]
    )
    for read_episode, source in zip(steps.partition_by("episode_id"), dataset.iterate_episodes()):
        np.testing.assert_array_equal(
            read_episode["observation"].to_numpy(), source.observations[:-1]
        )
        np.testing.assert_array_equal(
            read_episode["next_observation"].to_numpy(), source.observations[1:]
        )
        np.testing.assert_array_equal(read_episode["action"].to_numpy(), source.actions)
        np.testing.assert_array_equal(
            read_episode["reward"].to_numpy(), source.rewards.astype(np.float32)
        )
        np.testing.assert_array_equal(read_episode["terminated"].to_numpy(), source.terminations)
        np.testing.assert_array_equal(read_episode["truncated"].to_numpy(), source.truncations)


# ---------------------------------------------------------------- validation (no Ray needed)


def step_file(tmp_path, steps: pa.Table, name: str = "steps.parquet") -> str:
    path = tmp_path / name
    pq.write_table(steps, path)
    return str(path)


def problems_of(source: str, **kwargs) -> str:
    with pytest.raises(ValidationError) as caught:
        plan_ingest(source, **kwargs)
    return str(caught.value)


@pytest.fixture
def clean_steps():
    steps, _ = make_episodes(num_episodes=4, seed=7, min_length=5, max_length=8)
    return steps


def test_gap_in_steps_names_file_episode_and_column(tmp_path, clean_steps):
    rows = np.ones(clean_steps.num_rows, bool)
    rows[2] = False  # episode 7 loses step 2
    path = step_file(tmp_path, clean_steps.filter(pa.array(rows)))
    message = problems_of(path)
    assert f"{path}: episode 7: column 't': steps 2..2 are missing" in message


def test_duplicate_step(tmp_path, clean_steps):
    path = step_file(tmp_path, pa.concat_tables([clean_steps, clean_steps.slice(3, 1)]))
    assert "episode 7: column 't': step 3 appears more than once" in problems_of(path)


def test_episode_not_starting_at_zero(tmp_path, clean_steps):
    path = step_file(tmp_path, clean_steps.slice(1))
    assert "episode 7: column 't': starts at step 1, expected 0" in problems_of(path)


def test_non_finite_reward(tmp_path, clean_steps):
    rewards = clean_steps.column("reward").to_numpy().copy()
    rewards[-1] = np.nan
    table = clean_steps.set_column(3 + 1, "reward", pa.array(rewards))
    path = step_file(tmp_path, table)
    last_episode = clean_steps.column("episode_id")[-1].as_py()
    last_step = clean_steps.column("t")[-1].as_py()
    expected = f"episode {last_episode}, step {last_step}: column 'reward': non-finite value nan"
    assert expected in problems_of(path)


def test_non_finite_reward_in_hdf5(tmp_path):
    arrays = d4rl_arrays()
    arrays["rewards"][3] = np.inf
    path = write_hdf5(tmp_path / "bad.h5", arrays)
    assert f"{path}: episode 0, step 3: column 'reward': non-finite value inf" in problems_of(path)


def test_missing_and_reserved_columns(tmp_path, clean_steps):
    # reward, terminated and truncated are optional (tests/test_step_tables_mapping.py).
    table = clean_steps.drop_columns(["action"]).append_column(
        "return", pa.array(np.zeros(clean_steps.num_rows))
    )
    message = problems_of(step_file(tmp_path, table))
    assert "column 'action': required column is missing" in message
    assert "column 'return': is a reserved episode-table column name" in message


def test_schema_differs_between_files(tmp_path, clean_steps):
    first = clean_steps.filter(pa.array(clean_steps.column("episode_id").to_numpy() < 20))
    second = clean_steps.filter(pa.array(clean_steps.column("episode_id").to_numpy() >= 20))
    second = second.set_column(
        second.column_names.index("noise"), "noise", second.column("noise").cast(pa.float64())
    )
    step_file(tmp_path, first, "a.parquet")
    step_file(tmp_path, second, "b.parquet")
    message = problems_of(str(tmp_path))
    assert "b.parquet: column 'noise': has type double, but float in" in message


def test_inconsistent_vector_sizes(tmp_path, clean_steps):
    observations = clean_steps.column("observation").to_pylist()
    observations[4] = observations[4][:2]
    table = clean_steps.set_column(
        2, "observation", pa.array(observations, type=pa.list_(pa.float32()))
    )
    assert "column 'observation': has 2 values, expected 3" in problems_of(
        step_file(tmp_path, table)
    )


def test_episode_in_two_files(tmp_path, clean_steps):
    step_file(tmp_path, clean_steps.slice(0, 3), "a.parquet")
    step_file(tmp_path, clean_steps.slice(3), "b.parquet")
    assert "episode also appears in" in problems_of(str(tmp_path))
    # Skipping leaves the split episode out of both files, not half of it in.
    plan = plan_ingest(str(tmp_path), on_error="skip")
    first_episode = clean_steps.column("episode_id")[0].as_py()
    assert all(first_episode < part.episode_min for part in plan.parts)
    assert plan.episodes == len(set(clean_steps.column("episode_id").to_pylist())) - 1


def test_unknown_and_misaligned_hdf5_arrays(tmp_path):
    arrays = d4rl_arrays()
    arrays["extra"] = np.zeros(3)
    assert "column 'extra': unknown array" in problems_of(write_hdf5(tmp_path / "a.h5", arrays))
    arrays = d4rl_arrays()
    arrays["actions"] = arrays["actions"][:-1]
    message = problems_of(write_hdf5(tmp_path / "b.h5", arrays))
    assert "column 'actions': has 599 rows, but rewards has 600" in message


def test_truncated_hdf5_is_a_clear_error(tmp_path):
    path = write_hdf5(tmp_path / "logs.h5", d4rl_arrays())
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"logs.h5.*truncated or corrupt"):
        plan_ingest(path)


def test_truncated_parquet_is_a_clear_error(tmp_path, clean_steps):
    path = step_file(tmp_path, clean_steps)
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"steps.parquet.*truncated or corrupt"):
        plan_ingest(path)


def test_errors_write_nothing_and_cli_exits_2(tmp_path, clean_steps, capsys):
    path = step_file(tmp_path, clean_steps.slice(1))
    output = tmp_path / "ds"
    assert main(["ingest", path, str(output)]) == 2
    assert "starts at step 1" in capsys.readouterr().err
    assert not output.exists()


# ---------------------------------------------------------------- skipping, killed writers


def test_on_error_skip_ingests_the_rest_and_reports(ray_local, tmp_path):
    arrays = d4rl_arrays(seed=9)
    arrays["rewards"][0] = np.nan  # episode 0
    lengths = episode_lengths(arrays)
    arrays["rewards"][lengths[:3].sum()] = -np.inf  # first step of episode 3
    source = write_hdf5(tmp_path / "logs.h5", arrays)
    uri = str(tmp_path / "ds")
    with pytest.raises(ValidationError, match="--on-error skip"):
        Ingest(input=source, output=uri).run()
    assert not (tmp_path / "ds").exists()
    manifest = Ingest(input=source, output=uri, on_error="skip", part_steps=120).run()
    episodes = engine.scan_episodes(uri).collect()
    kept = [e for e in range(len(lengths)) if e not in (0, 3)]
    assert episodes["episode_id"].to_list() == kept
    assert manifest.metadata["skipped_episodes"] == 2
    report = json.loads(storage.read_bytes(storage.join(uri, SKIPPED_REPORT_NAME)))
    assert [(p["episode"], p["column"]) for p in report["skipped"]] == [
        (0, "reward"),
        (3, "reward"),
    ]
    steps = engine.scan(uri).collect()
    keep_rows = np.isin(np.repeat(np.arange(len(lengths)), lengths), kept)
    np.testing.assert_array_equal(steps["reward"].to_numpy(), arrays["rewards"][keep_rows])
    np.testing.assert_array_equal(
        steps["observation"].to_numpy(), arrays["observations"][keep_rows]
    )


def test_killed_ingest_leaves_no_dataset_and_rerun_succeeds(ray_local, tmp_path):
    arrays = d4rl_arrays()
    source = write_hdf5(tmp_path / "logs.h5", arrays)
    uri = str(tmp_path / "ds")
    # A writer that died after its first part: staged files, no manifest.
    plan = plan_ingest(source, part_steps=150)
    staged = VersionWriter(uri).begin()
    ingest_part(part_tasks(plan, staged)[0])
    with pytest.raises(DatasetError, match="died before committing"):
        open_dataset(uri)
    rerun = Ingest(input=source, output=uri, part_steps=150).run()
    assert_matches_d4rl(uri, arrays)
    # the re-run's output is identical to an ingest that never died
    clean = Ingest(input=source, output=str(tmp_path / "clean"), part_steps=150).run()
    assert rerun.dataset_id == clean.dataset_id


def test_failing_part_removes_the_staged_version(ray_local, tmp_path):
    source = write_hdf5(tmp_path / "logs.h5", d4rl_arrays())
    uri = str(tmp_path / "ds")
    plan = plan_ingest(source, part_steps=150)
    # the source disappears mid-run: its last part reads a file that is gone
    vanished = replace(plan.parts[-1], path=str(tmp_path / "vanished.h5"))
    plan = replace(plan, parts=[*plan.parts[:-1], vanished])
    with pytest.raises(Exception, match="vanished.h5"):
        ingest(plan, uri, executor=RayExecutor(), command="t")
    assert storage.list_files(uri) == []
    with pytest.raises(DatasetError):
        open_dataset(uri)


# ---------------------------------------------------------------- info, materialize


def test_info_json_parses(ray_local, tiny_dataset, capsys):
    assert main(["info", tiny_dataset, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    episodes = engine.scan_episodes(tiny_dataset).collect()
    assert info["steps"] == episodes["length"].sum()
    assert info["episodes"] == episodes.height
    by_noise = {row["value"]: row for row in info["returns"]["by"]["noise"]}
    for noise, group in episodes.group_by("noise"):
        assert by_noise[noise[0]]["count"] == group.height
        assert by_noise[noise[0]]["mean"] == pytest.approx(group["return"].mean(), rel=1e-5)
        assert sum(by_noise[noise[0]]["histogram"]) == group.height
    assert info["history"][0]["operation"] == "ingest"
    assert main(["info", tiny_dataset]) == 0
    assert "returns by noise" in capsys.readouterr().out


def test_info_orders_skill_labels_by_their_level():
    from engine.info import _ordered_values

    episodes = pl.DataFrame(
        {"skill": ["expert", "novice", "intermediate", "novice"], "skill_level": [2, 0, 1, 0]}
    )
    assert _ordered_values(episodes, "skill") == ["novice", "intermediate", "expert"]
    assert _ordered_values(episodes.drop("skill_level"), "skill") == [
        "expert",
        "intermediate",
        "novice",
    ]


def test_info_verify_names_every_file_whose_sha256_differs(tiny_dataset, capsys):
    assert main(["info", tiny_dataset, "--verify"]) == 0
    dataset = open_dataset(tiny_dataset)
    files = [
        uri
        for group in dataset.manifest.groups
        for level in ("steps", "episodes")
        for uri in dataset.file_uris(group, level)
    ]
    assert f"verified: all {len(files)} files match their sha256" in capsys.readouterr().out
    for victim in (files[0], files[-1]):  # same size, other bytes: only a checksum sees it
        with open(victim, "r+b") as handle:
            handle.seek(10)
            byte = handle.read(1)
            handle.seek(10)
            handle.write(bytes([byte[0] ^ 0xFF]))
    assert main(["info", tiny_dataset, "--verify"]) == 2
    error = capsys.readouterr().err
    assert "2 file(s) changed" in error
    assert files[0] in error and files[-1] in error


def test_materialize_zips_all_groups_into_one(ray_local, tmp_path):
    steps, episodes = make_episodes(num_episodes=10, seed=11)
    parent_uri = str(tmp_path / "parent")
    write_synthetic_dataset(parent_uri, steps, episodes, part_steps=60)

    def double_reward(parent, index):
        reward = parent.read_part(index, columns=["reward"]).column("reward")
        return pa.table({"double_reward": pa.compute.multiply(reward, 2)}), None

    child_uri = attach_group(parent_uri, str(tmp_path / "child"), "double", double_reward)
    output = str(tmp_path / "flat")
    manifest = Materialize(input=child_uri, output=output).run()
    assert [g.name for g in manifest.groups] == ["base"]
    assert all(g.root == manifest.groups[0].root for g in manifest.groups)
    flat = engine.scan(output).collect()
    expected = engine.scan(child_uri).collect()
    assert flat.columns == expected.columns
    assert flat.equals(expected)
    assert engine.scan_episodes(output).collect().equals(engine.scan_episodes(child_uri).collect())
    assert [h.operation for h in manifest.history] == ["ingest", "relabel", "materialize"]
    np.testing.assert_allclose(
        flat["double_reward"].to_numpy(), 2 * flat["reward"].to_numpy(), rtol=0
    )
    assert flat.select(pl.len()).item() == steps.num_rows


@pytest.mark.parametrize("executor", ["in-process", "ray"])
def test_a_part_failing_mid_materialize_leaves_no_staging_and_no_version(
    executor, request, tmp_path
):
    steps, episodes = make_episodes(num_episodes=10, seed=11)
    parent_uri = str(tmp_path / "parent")
    write_synthetic_dataset(parent_uri, steps, episodes, part_steps=40)

    def double_reward(parent, index):
        reward = parent.read_part(index, columns=["reward"]).column("reward")
        return pa.table({"double_reward": pa.compute.multiply(reward, 2)}), None

    child = open_dataset(attach_group(parent_uri, str(tmp_path / "child"), "double", double_reward))
    assert child.num_parts > 2
    # The last part of the relabeled group is damaged on disk (same size, other bytes):
    # the parts before it are copied, then its read fails.
    damaged = child.file_uris(child.manifest.groups[-1], "steps")[-1]
    with open(damaged, "r+b") as handle:
        handle.seek(10)
        byte = handle.read(1)
        handle.seek(10)
        handle.write(bytes([byte[0] ^ 0xFF]))
    if executor == "ray":
        request.getfixturevalue("ray_local")
    output = str(tmp_path / "flat")
    with pytest.raises(DatasetError, match="part-.*cannot read"):
        materialize(
            child,
            output,
            executor=InProcess() if executor == "in-process" else RayExecutor(),
            command="test",
        )
    assert storage.list_files(output) == []
    with pytest.raises(DatasetError):
        open_dataset(output)


@pytest.mark.slow
def test_ingest_killed_mid_run_leaves_no_dataset(ray_local, tmp_path):
    """A real `hindsight ingest` process (with its own embedded Ray) killed while it
    writes parts: no dataset is visible, and a re-run writes the complete version."""
    import os
    import signal
    import subprocess
    import sys
    import time

    # One part per episode, hundreds of them: the writer is still busy when it is killed.
    arrays = d4rl_arrays(num_steps=3000, num_episodes=400)
    source = write_hdf5(tmp_path / "logs.h5", arrays)
    uri = tmp_path / "ds"
    # RAY_TMPDIR stays conftest's short directory: Ray's socket paths must stay short.
    env = {**os.environ, "TQDM_DISABLE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "ingest", source, str(uri), "--part-steps", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(uri.glob("base/steps/*.parquet")):
            assert process.poll() is None, "the ingest finished before it could be killed"
            time.sleep(0.05)
        assert list(uri.glob("base/steps/*.parquet")), "no part was written within 120 s"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (uri / "manifest.json").exists()
    with pytest.raises(DatasetError, match="died before committing"):
        open_dataset(str(uri))
    Ingest(input=source, output=str(uri), part_steps=150).run()
    assert_matches_d4rl(str(uri), arrays)


def test_ingest_from_and_to_s3(ray_local, s3_bucket, tmp_path):
    arrays = d4rl_arrays(seed=12)
    local = write_hdf5(tmp_path / "logs.h5", arrays)
    storage.write_bytes(f"{s3_bucket}/raw/logs.h5", open(local, "rb").read())
    uri = f"{s3_bucket}/pendulum"
    Ingest(input=f"{s3_bucket}/raw/logs.h5", output=uri, part_steps=200).run()
    assert_matches_d4rl(uri, arrays)
    assert Info(input=uri).run()["steps"] == len(arrays["rewards"])

    steps, episodes = make_episodes(num_episodes=6, seed=13)
    ids = steps.column("episode_id").to_numpy()
    for name, rows in (("a", ids < 30), ("b", ids >= 30)):
        local = step_file(tmp_path, steps.filter(pa.array(rows)), f"{name}.parquet")
        storage.write_bytes(f"{s3_bucket}/steps/{name}.parquet", open(local, "rb").read())
    Ingest(input=f"{s3_bucket}/steps/*.parquet", output=str(tmp_path / "ds")).run()
    assert_matches_steps(str(tmp_path / "ds"), steps, episodes)


# ---------------------------------------------------------------- a new format: one file, one line


@dataclass(frozen=True, kw_only=True)
class EpisodeFilesPart(Part):
    files: tuple[str, ...]  # episode_<id>.npz files, by id


class EpisodeFiles(Source[EpisodeFilesPart]):
    """The example of docs/ingest.md: a directory with one `episode_<id>.npz` per episode
    (observations, actions, rewards, terminals, timeouts)."""

    name = "episode-npz"

    def detect(self, path: str) -> bool:
        return os.path.isdir(path) and any(n.startswith("episode_") for n in os.listdir(path))

    def plan(self, path: str, options: PlanOptions) -> IngestPlan:
        files = sorted(
            (os.path.join(path, n) for n in os.listdir(path) if n.startswith("episode_")),
            key=episode_id_of,
        )
        problems = []
        for file in files:
            rewards = np.load(file)["rewards"]
            problems += check_finite(
                file, "reward", rewards, np.full(len(rewards), episode_id_of(file))
            )
        bad = {p.episode for p in problems}
        kept = [file for file in files if episode_id_of(file) not in bad]
        lengths = [len(np.load(file)["rewards"]) for file in kept]
        labels = EpisodeLabels(options.env_id or "unknown", source_label(self.name, path))
        parts = [
            EpisodeFilesPart(
                files=tuple(kept[start:stop]), steps=sum(lengths[start:stop]), labels=labels
            )
            for start, stop in part_ranges(lengths, options.part_steps)
        ]
        return IngestPlan(self.name, path, labels.env_id, parts, sum(lengths), len(kept), problems)

    def read_part(self, part: EpisodeFilesPart) -> tuple[pa.Table, pa.Table]:
        episodes = [np.load(file) for file in part.files]
        lengths = [len(episode["rewards"]) for episode in episodes]

        def concatenated(name: str) -> np.ndarray:
            return np.concatenate([episode[name] for episode in episodes])

        return build_tables(
            episode_ids=np.repeat([episode_id_of(file) for file in part.files], lengths),
            observation=concatenated("observations"),
            action=concatenated("actions"),
            reward=concatenated("rewards"),
            terminated=concatenated("terminals"),
            truncated=concatenated("timeouts"),
            labels=part.labels,
        )


def episode_id_of(file: str) -> int:
    return int(os.path.basename(file).removeprefix("episode_").removesuffix(".npz"))


def test_a_new_format_is_one_source_and_one_registration(tmp_path, monkeypatch):
    monkeypatch.setitem(sources.SOURCES, EpisodeFiles.name, EpisodeFiles())  # the one line
    arrays = d4rl_arrays(num_steps=200, seed=21)
    lengths = episode_lengths(arrays)
    folder = tmp_path / "episodes"
    folder.mkdir()
    arrays["rewards"][lengths[0] + 1] = np.nan  # episode 1 is skipped
    for episode, (start, stop) in enumerate(zip(np.cumsum(lengths) - lengths, np.cumsum(lengths))):
        np.savez(
            folder / f"episode_{episode}.npz",
            **{
                name: arrays[name][start:stop]
                for name in ("observations", "actions", "rewards", "terminals", "timeouts")
            },
        )
    with pytest.raises(ValidationError, match=r"episode_1.npz: episode 1: column 'reward'"):
        plan_ingest(str(folder))
    plan = plan_ingest(str(folder), on_error="skip", part_steps=60, env_id="Toy-v0")
    assert plan.format == "episode-npz" and len(plan.parts) > 1
    uri = str(tmp_path / "ds")
    manifest = ingest(plan, uri, executor=InProcess(), command="test")
    assert manifest.metadata["skipped_episodes"] == 1
    kept = np.repeat(np.arange(len(lengths)), lengths) != 1
    steps = engine.scan(uri).collect()
    np.testing.assert_array_equal(steps["observation"].to_numpy(), arrays["observations"][kept])
    np.testing.assert_array_equal(steps["reward"].to_numpy(), arrays["rewards"][kept])
    episodes = engine.scan_episodes(uri).collect()
    assert episodes["episode_id"].to_list() == [e for e in range(len(lengths)) if e != 1]
    assert episodes["source"].unique().to_list() == ["episode-npz:episodes"]
