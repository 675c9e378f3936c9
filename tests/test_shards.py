"""The shard writer and `hindsight shard`: windows, statistics, determinism, tar format."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pytest

from engine import shards, storage
from engine.dataset import (
    open_dataset,
)
from schemas.manifest import RelabelerInfo
from schemas.shard_index import encode_text
from tests.synthetic import attach_group, make_episodes, write_synthetic_dataset

SKILL_LABELS = ["novice", "intermediate", "expert"]  # relabeler order, not alphabetical
GOALS, GOAL_DIM = 2, 3


def conditioned_dataset(uri: str, num_episodes: int = 30, part_steps: int = 150, seed: int = 0):
    """A base dataset plus a `cond` column group: step-level return_to_go and hindsight_goal
    (k=2 goals of 3 values), episode-level skill (dictionary), description (text) and
    descriptions (a list of paraphrases)."""
    steps, episodes = make_episodes(
        num_episodes=num_episodes, obs_dim=3, action_dim=2, seed=seed, max_length=45
    )
    base = uri + "-base"
    write_synthetic_dataset(base, steps, episodes, part_steps=part_steps)

    def conditions(parent, index):
        step_part = parent.read_part(index, columns=["episode_id", "t", "reward"])
        episode_part = parent.read_part(index, "episodes", columns=["episode_id", "noise"])
        ids = step_part.column("episode_id").to_numpy()
        reward = step_part.column("reward").to_numpy().astype(np.float64)
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(ids)) + 1, [len(ids)]])
        rtg = np.concatenate(
            [np.cumsum(reward[a:b][::-1])[::-1] for a, b in zip(bounds[:-1], bounds[1:])]
        ).astype(np.float32)
        t = step_part.column("t").to_numpy()
        goal = np.stack([ids * 1.0 + j + t / 100.0 for j in range(GOALS * GOAL_DIM)], axis=1)
        noise = episode_part.column("noise").to_numpy()
        episode_ids = episode_part.column("episode_id").to_numpy()
        level = (2 - np.round(noise * 2)).astype(np.int8)  # noise 0 -> expert
        step_columns = pa.table(
            {
                "return_to_go": rtg,
                "hindsight_goal": pa.FixedSizeListArray.from_arrays(
                    pa.array(goal.astype(np.float32).reshape(-1)), GOALS * GOAL_DIM
                ),
            }
        )
        episode_columns = pa.table(
            {
                "skill": pa.DictionaryArray.from_arrays(pa.array(level), pa.array(SKILL_LABELS)),
                "description": [
                    f"episode {e} with noise {v:.1f}" for e, v in zip(episode_ids, noise)
                ],
                "descriptions": [
                    [f"run {e}", f"noisy {v:.1f} run", "a run"][: 1 + int(e) % 3]
                    for e, v in zip(episode_ids, noise)
                ],
            }
        )
        return step_columns, episode_columns

    relabeler = RelabelerInfo(
        name="goals", version="1", params={"k": GOALS}, report={"labels": SKILL_LABELS}
    )
    return attach_group(base, uri, "cond", conditions, relabeler, {"env_id": "Synthetic-v0"})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return conditioned_dataset(str(tmp_path_factory.mktemp("shards") / "ds"))


def shard_options(dataset: str, out: str, **overrides):
    from jobs.commands.shard import Shard

    values = dict(
        input=dataset,
        output=out,
        condition=["return_to_go", "skill", "description", "descriptions", "hindsight_goal"],
        window=5,
        shard_steps=200,
        block_steps=64,
        seed=0,
    )
    values.update(overrides)
    return Shard(**values)


def read_blocks(path: str) -> list[dict[str, np.ndarray]]:
    """Every block of a local shard as arrays, with plain tarfile and np.load."""
    blocks: dict[str, dict[str, np.ndarray]] = {}
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            key, _, name = member.name.partition(".")
            data = archive.extractfile(member).read()
            blocks.setdefault(key, {})[name[: -len(".npy")]] = np.load(
                io.BytesIO(data), allow_pickle=False
            )
    return [blocks[key] for key in sorted(blocks)]


@pytest.mark.ray
def test_shard_job_index_statistics_and_windows(dataset, tmp_path, ray_local):
    out = str(tmp_path / "shards")
    index = shard_options(dataset, out).run()
    steps = open_dataset(dataset).read()
    episodes = open_dataset(dataset).read("episodes")
    assert index.windows == index.steps == steps.num_rows  # stride 1: a window per step
    assert index.episodes == episodes.num_rows and len(index.shards) >= 4
    assert sorted(storage.list_files(out))[-1].endswith(f"shard-{len(index.shards) - 1:05d}.tar")
    assert not storage.exists(storage.join(out, "_staging"))

    rtg = steps.column("return_to_go").to_numpy().astype(np.float64)
    info = index.conditions["return_to_go"]
    assert (info.type, info.level) == ("scalar", "steps")
    np.testing.assert_allclose([info.mean, info.std], [rtg.mean(), rtg.std()], rtol=1e-5)
    assert index.conditions["skill"].vocabulary == SKILL_LABELS
    assert index.conditions["skill"].level == "episodes"
    assert index.conditions["description"].type == "text"
    assert index.conditions["descriptions"].paraphrases == 3
    goal = index.conditions["hindsight_goal"]
    assert (goal.type, goal.count, goal.dim) == ("vector", GOALS, GOAL_DIM)
    action = steps.column("action").combine_chunks().flatten().to_numpy().reshape(-1, 2)
    np.testing.assert_allclose(index.action.low, action.min(0))
    assert index.action.kind == "continuous" and index.action.dim == 2
    returns = episodes.column("return").to_numpy().astype(np.float64)
    assert index.episode_return.max == pytest.approx(returns.max(), rel=1e-6)
    assert index.episode_return.quantiles["0.5"] == pytest.approx(np.median(returns), rel=1e-5)
    observation = steps.column("observation").combine_chunks().flatten().to_numpy()
    np.testing.assert_allclose(
        index.observation.mean, observation.reshape(-1, 3).mean(0), atol=1e-6
    )
    assert index.metadata["env_id"] == "Synthetic-v0"

    # Every block of every shard: windows end at each step once, and the stored step rows
    # equal the dataset rows of that episode (checked independently with tarfile + np.load).
    ids = steps.column("episode_id").to_numpy()
    t = steps.column("t").to_numpy()
    row_of = {(int(e), int(s)): i for i, (e, s) in enumerate(zip(ids, t))}
    labels = episodes.column("skill").cast(pa.string()).to_pylist()
    skill_of = dict(zip(episodes.column("episode_id").to_pylist(), labels))
    seen = []
    for shard in index.shards:
        blocks = read_blocks(storage.join(out, shard.name))
        assert len(blocks) == shard.blocks
        assert sum(len(b["window_end"]) for b in blocks) == shard.windows
        for block in blocks:
            end, start = block["window_end"], block["window_start"]
            rows = np.array(
                [
                    row_of[(int(e), int(s))]
                    for e, s in zip(block["episode_id"], block["timestep"][end])
                ]
            )
            seen.extend(rows.tolist())
            np.testing.assert_array_equal(end - start, np.minimum(block["timestep"][end], 4))
            for back in range(5):  # the steps before each window end, where they are valid
                valid = end - back >= start
                np.testing.assert_array_equal(
                    block["observation"][(end - back)[valid]],
                    observation.reshape(-1, 3)[rows[valid] - back],
                )
            np.testing.assert_array_equal(
                block["cond.return_to_go"][end], rtg[rows].astype(np.float32)
            )
            labels = [SKILL_LABELS[i] for i in block["cond.skill"][end]]
            assert labels == [skill_of[int(e)] for e in block["episode_id"]]
    assert sorted(seen) == list(range(steps.num_rows))


@pytest.mark.ray
def test_same_input_and_seed_give_byte_identical_shards(dataset, tmp_path, ray_local):
    first = shard_options(dataset, str(tmp_path / "a")).run()
    second = shard_options(dataset, str(tmp_path / "b")).run()
    other_seed = shard_options(dataset, str(tmp_path / "c"), seed=1).run()
    assert [s.sha256 for s in first.shards] == [s.sha256 for s in second.shards]
    for shard in first.shards:
        a = open(tmp_path / "a" / shard.name, "rb").read()
        assert a == open(tmp_path / "b" / shard.name, "rb").read()
        assert storage.sha256_bytes(a) == shard.sha256
    assert [s.sha256 for s in first.shards] != [s.sha256 for s in other_seed.shards]
    # Plain ustar: fixed mtime/owner, no PAX headers, only .npy members.
    with tarfile.open(tmp_path / "a" / first.shards[0].name) as archive:
        for member in archive.getmembers():
            assert (member.mtime, member.uid, member.uname, member.pax_headers) == (0, 0, "", {})
            assert member.name.endswith(".npy")
    # A committed shard directory is immutable.
    with pytest.raises(ValueError, match="already committed"):
        shard_options(dataset, str(tmp_path / "a")).run()


def test_long_episodes_are_chunked_with_context_and_stride():
    """Pure functions: an episode longer than a block is cut into chunks that carry the
    window-1 steps before them; with stride 3 windows end at L-1, L-4, ..."""
    lengths = np.array([50, 7, 1, 12])
    n = int(lengths.sum())
    t = np.concatenate([np.arange(length) for length in lengths]).astype(np.int32)
    episodes = shards.EpisodeArrays(
        episode_ids=np.array([5, 6, 7, 8]),
        lengths=lengths,
        returns=np.zeros(4),
        timestep=t,
        observation=np.arange(n, dtype=np.float32)[:, None],
        action=np.zeros((n, 1), np.float32),
        reward=np.zeros(n, np.float32),
    )
    window, stride = 6, 3
    built = shards.build_shard(episodes, window, stride, block_steps=16)
    blocks = []
    with tarfile.open(fileobj=io.BytesIO(built.data)) as archive:
        grouped: dict[str, dict[str, np.ndarray]] = {}
        for member in archive.getmembers():
            key, _, name = member.name.partition(".")
            grouped.setdefault(key, {})[name[:-4]] = np.load(
                io.BytesIO(archive.extractfile(member).read())
            )
        blocks = [grouped[k] for k in sorted(grouped)]
    assert all(len(b["reward"]) <= 16 + window - 1 for b in blocks) and len(blocks) > 4
    ends = []
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for block in blocks:
        for end, start, episode in zip(
            block["window_end"], block["window_start"], block["episode_id"]
        ):
            e = int(episode) - 5
            position = int(block["timestep"][end])
            ends.append((e, position))
            assert end - start == min(position, window - 1)
            expected = offsets[e] + np.arange(position - (end - start), position + 1)
            np.testing.assert_array_equal(block["observation"][start : end + 1, 0], expected)
    expected_ends = [
        (e, p)
        for e, length in enumerate(lengths)
        for p in range(length)
        if (length - 1 - p) % stride == 0
    ]
    assert sorted(ends) == sorted(expected_ends)
    assert built.windows == len(expected_ends)


def test_text_encoding_and_unknown_columns(dataset, tmp_path):
    assert encode_text(["Reach the RED block!"], ["<pad>", "<unk>", "the", "red"], 6).tolist() == [
        [1, 2, 3, 1, 0, 0]
    ]
    options = shard_options(dataset, "x")
    resolved = shards.resolve_conditions(open_dataset(dataset), options.condition, options.text)
    assert [c.type for c in resolved] == ["scalar", "categorical", "text", "text", "vector"]
    with pytest.raises(KeyError, match="no column 'return_to_goal'"):
        shard_options(dataset, str(tmp_path / "s"), condition=["return_to_goal"]).run()
    with pytest.raises(shards.ShardError, match="cannot be a condition"):
        shards.classify_condition("x", pa.struct([("a", pa.int8())]), "steps")


@pytest.mark.ray
def test_cli_shard_command(dataset, tmp_path, ray_local, capsys):
    from jobs.cli import main

    out = str(tmp_path / "cli")
    code = main(
        [
            "shard",
            dataset,
            out,
            "--condition",
            "return_to_go,skill",
            "--window",
            "4",
            "--stride",
            "2",
            "--shard-steps",
            "10000",
        ]
    )
    assert code == 0 and "wrote 1 shards" in capsys.readouterr().out
    index = json.loads(open(f"{out}/index.json").read())
    assert index["stride"] == 2 and index["command"].startswith("hindsight shard")
    steps = open_dataset(dataset).read("episodes").column("length").to_numpy()
    assert index["windows"] == int(((steps - 1) // 2 + 1).sum())
    assert main(["shard", dataset, out]) == 2  # committed: refused with a clean error


@pytest.mark.ray
def test_nan_rewards_are_a_clear_error_naming_part_episode_and_column(tmp_path, ray_local):
    from jobs.commands.shard import Shard

    steps, episodes = make_episodes(num_episodes=4, seed=1)
    reward = steps.column("reward").to_numpy().copy()
    reward[5] = np.nan
    steps = steps.set_column(steps.schema.get_field_index("reward"), "reward", pa.array(reward))
    write_synthetic_dataset(str(tmp_path / "nan"), steps, episodes)
    episode = steps.column("episode_id")[5].as_py()
    with pytest.raises(shards.ShardError, match=f"part 0: column 'reward'.*episode {episode}"):
        Shard(input=str(tmp_path / "nan"), output=str(tmp_path / "s")).run()
    assert not storage.exists(str(tmp_path / "s" / "index.json"))


@pytest.mark.ray
def test_a_failed_shard_job_leaves_no_staging_and_no_partial_shards(tmp_path, ray_local):
    """The last part has a NaN reward: the tasks before it have written their shards when it
    fails, and all of it goes (in this process, and on Ray through `hindsight shard`)."""
    from engine.executor import InProcess
    from jobs.commands.shard import Shard

    steps, episodes = make_episodes(num_episodes=12, seed=2)
    reward = steps.column("reward").to_numpy().copy()
    reward[-1] = np.nan
    steps = steps.set_column(steps.schema.get_field_index("reward"), "reward", pa.array(reward))
    write_synthetic_dataset(str(tmp_path / "nan"), steps, episodes, part_steps=40)
    dataset = open_dataset(str(tmp_path / "nan"))
    settings = shards.ShardSettings(shard_steps=40)
    tasks = shards.plan_tasks(dataset, settings.shard_steps)
    assert len(tasks) >= 3  # shards are written before the failing last task runs

    out = str(tmp_path / "in-process")
    with pytest.raises(shards.ShardError, match="column 'reward'"):
        shards.write_shards(dataset, settings, out, executor=InProcess(), command="test")
    assert storage.list_files(out) == [] and not storage.exists(out)

    out = str(tmp_path / "ray")
    with pytest.raises(shards.ShardError, match="column 'reward'"):
        Shard(input=dataset.uri, output=out, shard_steps=40).run()
    assert storage.list_files(out) == []
