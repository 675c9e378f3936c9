"""The streaming loader: exactly-once windows across ranks and workers, values equal to the
dataset rows, exact resume, refusal of unsafe members, truncated shards, S3 drops."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import torch

from engine import storage
from engine.dataset import open_dataset
from schemas.shard_index import encode_text
from tests.test_shards import GOAL_DIM, GOALS, conditioned_dataset, shard_options
from trainers.loader import ShardError, UnsafeShardError, read_index, stream

CONDITIONS = ["return_to_go", "skill", "description", "descriptions", "hindsight_goal"]


@pytest.fixture(scope="module")
def written(tmp_path_factory, s3_server, ray_local):
    """One dataset, sharded to the loopback S3 server and to a local directory."""
    import boto3

    root = tmp_path_factory.mktemp("loader")
    dataset = conditioned_dataset(str(root / "ds"), num_episodes=24)
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="hs-loader")
    s3 = "s3://hs-loader/shards/v1"
    shard_options(dataset, s3, shard_steps=100).run()
    local = str(root / "shards")
    shard_options(dataset, local, shard_steps=100).run()
    return {"dataset": dataset, "s3": s3, "local": local}


def dataset_rows(dataset: str):
    steps = open_dataset(dataset).read()
    episodes = open_dataset(dataset).read("episodes")
    ids, t = steps.column("episode_id").to_numpy(), steps.column("t").to_numpy()
    row_of = {(int(e), int(s)): i for i, (e, s) in enumerate(zip(ids, t))}
    return steps, episodes, row_of


def window_keys(batches) -> list[tuple[int, int]]:
    """(episode, t of the last step) of every window: its identity."""
    keys = []
    for batch in batches:
        keys += list(zip(batch["episode_id"].tolist(), batch["timestep"][:, -1].tolist()))
    return keys


@pytest.mark.s3
@pytest.mark.ray
def test_every_window_once_across_two_ranks_and_two_workers_from_s3(written):
    index = read_index(written["s3"])
    assert len(index.shards) >= 4
    batches = []
    for rank in range(2):
        loader = stream(
            written["s3"],
            16,
            CONDITIONS,
            shuffle_buffer=240,
            rank=rank,
            world_size=2,
            num_workers=2,
            epochs=1,
            seed=3,
        )
        batches += list(loader)
    keys = window_keys(batches)
    steps, episodes, row_of = dataset_rows(written["dataset"])
    assert len(keys) == len(set(keys)) == steps.num_rows == index.windows
    assert set(keys) == set(row_of)
    # Batches mix episodes (shuffle buffer across blocks), not one episode per batch.
    assert np.mean([len(set(b["episode_id"].tolist())) for b in batches]) > 4

    # Values equal the dataset rows they came from (independent lookups per window).
    observation = steps.column("observation").combine_chunks().flatten().to_numpy().reshape(-1, 3)
    action = steps.column("action").combine_chunks().flatten().to_numpy().reshape(-1, 2)
    reward = steps.column("reward").to_numpy()
    rtg = steps.column("return_to_go").to_numpy()
    goal = steps.column("hindsight_goal").combine_chunks().flatten().to_numpy()
    goal = goal.reshape(-1, GOALS, GOAL_DIM)
    skill = dict(
        zip(
            episodes.column("episode_id").to_pylist(),
            episodes.column("skill").cast(pa.string()).to_pylist(),
        )
    )
    description = dict(
        zip(episodes.column("episode_id").to_pylist(), episodes.column("description").to_pylist())
    )
    paraphrases = dict(
        zip(episodes.column("episode_id").to_pylist(), episodes.column("descriptions").to_pylist())
    )
    info = index.conditions
    for batch in batches[::3]:
        assert (
            batch["observation"].shape[1:] == (5, 3)
            and batch["skill"].dtype.is_floating_point is False
        )
        for i, (episode, last) in enumerate(window_keys([batch])):
            valid = batch["mask"][i].numpy()
            assert (
                valid.sum() == min(last + 1, 5) and valid[-1] and not valid[: 5 - valid.sum()].any()
            )
            rows = row_of[(episode, last)] - np.arange(valid.sum())[::-1]
            np.testing.assert_array_equal(batch["observation"][i][valid].numpy(), observation[rows])
            np.testing.assert_array_equal(batch["action"][i][valid].numpy(), action[rows])
            np.testing.assert_array_equal(batch["reward"][i][valid].numpy(), reward[rows])
            np.testing.assert_array_equal(batch["return_to_go"][i][valid].numpy(), rtg[rows])
            assert (batch["observation"][i][~valid] == 0).all()
            np.testing.assert_array_equal(
                batch["timestep"][i][valid].numpy(), np.arange(last + 1 - valid.sum(), last + 1)
            )
            labels = {info["skill"].vocabulary[j] for j in batch["skill"][i][valid].tolist()}
            assert labels == {skill[episode]}
            expected = encode_text(
                [description[episode]],
                info["description"].vocabulary,
                info["description"].max_tokens,
            )[0]
            np.testing.assert_array_equal(batch["description"][i].numpy(), expected)
            options = encode_text(
                paraphrases[episode],
                info["descriptions"].vocabulary,
                info["descriptions"].max_tokens,
            )
            assert any((batch["descriptions"][i].numpy() == o).all() for o in options)
            picked = batch["hindsight_goal"][i][valid].numpy()
            assert any(np.array_equal(picked, goal[rows, j]) for j in range(GOALS))


def test_resume_continues_exactly_where_it_stopped(written):
    index = read_index(written["local"])
    for workers in (0, 2):
        settings = dict(shuffle_buffer=40, num_workers=workers, epochs=2, seed=1)
        full = list(stream(written["local"], 16, "return_to_go", **settings))
        loader = stream(written["local"], 16, "return_to_go", **settings)
        iterator = iter(loader)
        head = [next(iterator) for _ in range(7)]
        state = loader.state_dict()
        del iterator
        resumed = stream(written["local"], 16, "return_to_go", start_state=state, **settings)
        tail = list(resumed)
        # Each window once per epoch over both epochs, the interruption included.
        keys = Counter(window_keys(head + tail))
        assert sum(keys.values()) == 2 * index.windows and set(keys.values()) == {2}
        if workers == 0:  # one consumer: the very same batches in the same order
            assert window_keys(head + tail) == window_keys(full)
            for a, b in zip(full, head + tail):
                assert (a["return_to_go"] == b["return_to_go"]).all()
    with pytest.raises(ValueError, match="batch_size=16"):
        stream(written["local"], 32, start_state=state, shuffle_buffer=40, num_workers=2, seed=1)


def test_read_index_refuses_a_directory_without_a_committed_index(written, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(written["local"], copy)
    os.remove(copy / "index.json")
    with pytest.raises(ShardError, match="no index.json"):
        stream(str(copy), 8)
    (copy / "_staging").write_text("now")
    with pytest.raises(ShardError, match="still writing"):
        read_index(str(copy))


def rewrite_first_shard(source: str, target, extra_name: str, extra_data: bytes) -> str:
    """A copy of the shards whose first shard gains one more member."""
    shutil.copytree(source, target)
    name = read_index(str(target)).shards[0].name
    with tarfile.open(target / name) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    with tarfile.open(target / name, "w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo(extra_name)
        info.size = len(extra_data)
        archive.addfile(info, io.BytesIO(extra_data))
        for member, data in members:
            archive.addfile(member, io.BytesIO(data))
    return str(target)


@pytest.mark.parametrize(
    "member", ["b000000.payload.pyd", "b000000.payload.pickle", "../b000000.evil.npy", "/etc/b.npy"]
)
def test_pickle_members_and_paths_outside_the_shard_are_refused(written, tmp_path, member):
    import pickle

    shards = rewrite_first_shard(written["local"], tmp_path / "bad", member, pickle.dumps({"x": 1}))
    for on_error in ("raise", "skip"):
        with pytest.raises(UnsafeShardError, match="refused"):
            list(stream(shards, 8, epochs=1, on_error=on_error))


def test_object_arrays_are_refused(written, tmp_path):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    shards = rewrite_first_shard(
        written["local"], tmp_path / "obj", "b000000.reward.npy", buffer.getvalue()
    )
    with pytest.raises(ShardError):
        list(stream(shards, 8, epochs=1))


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((2133, 3), np.float32),
        np.arange(5, dtype=">i8"),
        np.float64(2.5),
        np.zeros(0, bool),
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        np.array([["go", "left"]]),
    ],
)
def test_npy_members_read_back_as_numpy_wrote_them(array):
    """load_npy reads numpy's own headers without literal_eval (a regular expression) and
    anything else through it; both give the array numpy wrote."""
    from trainers.loader.shards import load_npy, npy_header

    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asanyarray(array), allow_pickle=False)
    loaded = load_npy(buffer.getvalue(), "member")
    assert loaded.dtype == np.asanyarray(array).dtype and np.array_equal(loaded, array)
    header = "{'shape': (2, 3), 'fortran_order': False, 'descr': '<f4'}"  # keys reordered
    assert npy_header(header) == {"descr": "<f4", "fortran_order": False, "shape": (2, 3)}


def test_truncated_shard_is_an_error_or_skipped_with_a_count(written, tmp_path):
    copy = tmp_path / "cut"
    shutil.copytree(written["local"], copy)
    index = read_index(str(copy))
    victim = index.shards[1]
    with open(copy / victim.name, "r+b") as handle:
        handle.truncate(victim.bytes // 2)
    with pytest.raises(ShardError, match=victim.name):
        list(stream(str(copy), 8, epochs=1))
    with pytest.warns(UserWarning, match=f"{victim.name}.*windows lost"):
        loader = stream(str(copy), 8, epochs=1, on_error="skip")
        seen = len(window_keys(loader))
    assert 0 < loader.lost_windows < victim.windows
    assert seen + loader.lost_windows == index.windows
    # Cut exactly at a member boundary: tarfile sees a clean end, the block count does not.
    with tarfile.open(written["local"] + "/" + victim.name) as archive:
        members = archive.getmembers()
        last_block = members[-1].name.split(".")[0]
        boundary = next(m.offset for m in members if m.name.startswith(last_block))
    shutil.copy(written["local"] + "/" + victim.name, copy / victim.name)
    with open(copy / victim.name, "r+b") as handle:
        handle.truncate(boundary)
    with pytest.raises(ShardError, match="truncated"):
        list(stream(str(copy), 8, epochs=1))


def test_a_shard_replaced_by_another_valid_shard_fails_its_checksum(written, tmp_path):
    """A well-formed tar that is not the shard the index describes (a stale writer, a copy
    mistake) is caught by the size and sha256 check at the end of the shard."""
    copy = tmp_path / "swapped"
    shutil.copytree(written["local"], copy)
    index = read_index(str(copy))
    first, second = index.shards[0], index.shards[1]
    shutil.copy(copy / first.name, copy / second.name)
    with pytest.raises(ShardError, match=f"{second.name}.*sha256"):
        list(stream(str(copy), 8, epochs=1))
    # The untouched shards read as before.
    assert len(window_keys(stream(written["local"], 8, epochs=1))) == index.windows


@pytest.mark.s3
def test_a_dropped_s3_read_is_resumed_from_where_it_stopped(written):
    """The S3 object is real (loopback server); the connection drop is injected once."""

    class DroppingInput(storage.ResumableInput):
        dropped = False

        def _open(self):
            source = super()._open()
            if DroppingInput.dropped:
                return source
            DroppingInput.dropped = True
            position = self

            class Dropping:
                """The object as read through a connection that drops after 3000 bytes."""

                def readinto(self, buffer):
                    if position.position > 3000:
                        raise ConnectionError("connection reset by peer")
                    return source.readinto(memoryview(buffer)[:1000])

                def close(self):
                    source.close()

            return Dropping()

    name = read_index(written["s3"]).shards[0].name
    reader = io.BufferedReader(DroppingInput(f"{written['s3']}/{name}"), buffer_size=1000)
    data = reader.read()
    assert reader.raw.retries == 1
    assert data == open(f"{written['local']}/{name}", "rb").read()


@pytest.mark.ray
def test_discrete_actions_and_goal_env_observations(tmp_path, ray_local):
    """Discrete actions stream as int64 [B, W]; a struct observation streams its
    `observation` field, and a goal field is a vector condition."""
    from jobs.commands.shard import Shard
    from tests.synthetic import make_episodes, write_synthetic_dataset

    steps, episodes = make_episodes(
        num_episodes=8, obs_dim=4, seed=5, discrete_actions=3, goal_dim=2, max_length=20
    )
    write_synthetic_dataset(str(tmp_path / "ds"), steps, episodes)
    out = str(tmp_path / "shards")
    index = Shard(
        input=str(tmp_path / "ds"),
        output=out,
        condition=["observation.desired_goal"],
        window=3,
        shard_steps=1000,
    ).run()
    assert index.action.kind == "discrete" and index.action.n == 3
    assert index.observation.shape == [4]
    assert index.conditions["observation.desired_goal"].dim == 2
    batches = list(stream(out, 7, "observation.desired_goal", epochs=1))
    ids, t = steps.column("episode_id").to_numpy(), steps.column("t").to_numpy()
    row_of = {(int(e), int(s)): i for i, (e, s) in enumerate(zip(ids, t))}
    action = steps.column("action").to_numpy()
    goal = steps.column("observation").combine_chunks().field("desired_goal").flatten()
    goal = goal.to_numpy().reshape(-1, 2)
    for batch in batches:
        assert batch["action"].dtype == torch.int64 and batch["action"].shape[1] == 3
        for i, key in enumerate(window_keys([batch])):
            row = row_of[key]
            assert batch["action"][i, -1].item() == action[row]
            np.testing.assert_array_equal(
                batch["observation.desired_goal"][i, -1].numpy(), goal[row]
            )
    assert len(window_keys(batches)) == steps.num_rows


def test_pools_stage_alone_cuts_consecutive_windows_and_resumes_at_a_pool_end():
    """The pool stage over hand-made blocks (no shards): every window once and in order,
    pools of the asked size, and starting at a pool's end position gives the pools after it."""
    from trainers.loader import Block, PlacedBlock, Position, pools

    def block(windows: int) -> Block:
        return Block(steps={}, windows={"window_end": np.arange(windows)})

    placed = [PlacedBlock(0, 0, block(5)), PlacedBlock(0, 1, block(3)), PlacedBlock(2, 0, block(9))]
    keys = [(p.shard, p.number, w) for p in placed for w in range(p.block.num_windows)]

    def windows_of(pool_list):
        found = []
        for pool in pool_list:
            for piece, first, stop in pool.pieces:
                where = next(p for p in placed if p.block is piece)
                found += [(where.shard, where.number, w) for w in range(first, stop)]
        return found

    every = list(pools(placed, Position(epoch=1), 4, shards=3))
    assert [pool.windows for pool in every] == [4, 4, 4, 4, 1]
    assert windows_of(every) == keys
    assert every[0].start == Position(epoch=1) and every[-1].end == Position(1, 3, 0, 0, 5)
    assert every[1].end == Position(1, 0, 1, 3, 2)  # pool 2 starts at window 3 of block 1
    resume_at = every[2].end  # inside the last block: shard 2, block 0, window 4
    assert resume_at == Position(1, 2, 0, 4, 3)
    rest = list(pools([p for p in placed if p.shard >= resume_at.shard], resume_at, 4, shards=3))
    assert windows_of(rest) == windows_of(every[3:])
    assert [(pool.start, pool.end) for pool in rest] == [
        (pool.start, pool.end) for pool in every[3:]
    ]


@pytest.mark.s3
def test_a_missing_shard_object_fails_at_once_naming_it(written):
    """Not found is not transient: no retries, a StorageError with the URI."""
    import time

    uri = f"{written['s3']}/shard-99999.tar"
    began = time.monotonic()
    with pytest.raises(storage.StorageError, match="shard-99999.tar"):
        storage.open_input(uri)
    assert time.monotonic() - began < 5


def test_a_shorter_window_is_the_last_steps_and_window_1_is_every_step_once(written):
    local = written["local"]
    steps, _, row_of = dataset_rows(written["dataset"])
    observation = steps.column("observation").combine_chunks().flatten().to_numpy()
    observation = observation.reshape(steps.num_rows, -1)

    def by_key(**options) -> dict[tuple[int, int], np.ndarray]:
        batches = list(stream(local, 16, ["return_to_go"], epochs=1, seed=5, **options))
        keys = window_keys(batches)
        assert len(keys) == len(set(keys))  # each window once per epoch
        stacked = np.concatenate([batch["observation"].numpy() for batch in batches])
        return dict(zip(keys, stacked))

    full, two, single = by_key(), by_key(window=2), by_key(window=1)
    assert set(single) == set(two) == set(full) == set(row_of)  # every step once
    for key, window in single.items():
        assert window.shape[0] == 1
        np.testing.assert_array_equal(window[0], observation[row_of[key]])
        np.testing.assert_array_equal(two[key], full[key][-2:])
    with pytest.raises(ValueError, match="window must be between 1 and"):
        stream(local, 16, ["return_to_go"], window=read_index(local).window + 1)


def test_batches_made_in_the_background_are_the_same_and_errors_arrive_in_order():
    import threading

    from trainers.loader.stream import in_background

    assert list(in_background(iter(range(50)), 2)) == list(range(50))

    def three_then_fail():
        yield from range(3)
        raise OSError("shard gone")

    received = []
    with pytest.raises(OSError, match="shard gone"):
        for item in in_background(three_then_fail(), 2):
            received.append(item)
    assert received == [0, 1, 2]

    def forever():
        while True:
            yield 1

    background = in_background(forever(), 2)
    next(background)
    background.close()  # the consumer stops: the thread stops with it
    assert not any(t.name == "hindsight-loader" and t.is_alive() for t in threading.enumerate())


def test_prefetching_changes_no_batch(written):
    def batches(prefetch: int) -> list[dict[str, torch.Tensor]]:
        return list(
            stream(written["local"], 16, ["return_to_go"], epochs=1, seed=2, prefetch=prefetch)
        )

    for plain, ahead in zip(batches(0), batches(2), strict=True):
        assert plain.keys() == ahead.keys()
        assert all(torch.equal(plain[key], ahead[key]) for key in plain)
