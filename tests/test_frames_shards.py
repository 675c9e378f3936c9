"""Camera frames through shards and the loader: `hindsight shard` carries the dataset's
encoded frames unchanged, the loader decodes the frames each batch needs, stacks the
previous k and yields uint8 [B, W, C * k, H, W]; every frame's pixels encode its (episode,
t) so each window's frames are checked against an independent computation."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.dataset import open_dataset
from engine.writer import VersionWriter, assemble_group, inherit_groups, new_manifest
from schemas.frames import (
    FRAMES_GROUP,
    CameraInfo,
    decode_frame,
    encode_frames,
    frame_column,
    frames_table,
)
from schemas.shard_index import ShardError
from tests.synthetic import make_episodes, write_synthetic_dataset
from trainers.loader import read_index, stream

HEIGHT, WIDTH = 8, 6
CAMERAS = {
    "render": CameraInfo(height=HEIGHT, width=WIDTH, channels=3, codec="png"),
    "wrist": CameraInfo(height=HEIGHT, width=WIDTH, channels=1, codec="png"),
}


def frame_pixels(camera: str, episode: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The frames of steps (episode number, t): N x H x W x C uint8. render: channel 0 the
    episode number, 1 the step t (mod 256), 2 a pattern of the pixel's position; wrist:
    gray (7 * episode + t) mod 256 plus the position pattern."""
    episode = np.asarray(episode, dtype=np.int64)[:, None, None]
    t = np.asarray(t, dtype=np.int64)[:, None, None]
    position = (np.arange(HEIGHT)[:, None] * 16 + np.arange(WIDTH)[None, :])[None]
    if camera == "wrist":
        gray = (7 * episode + t + position) % 256
        return gray[..., None].astype(np.uint8)
    shape = (len(episode), HEIGHT, WIDTH)
    return np.stack(
        [
            np.broadcast_to(episode % 256, shape),
            np.broadcast_to(t % 256, shape),
            np.broadcast_to(position, shape),
        ],
        axis=-1,
    ).astype(np.uint8)


def episode_number(episode_id) -> np.ndarray:
    """tests.synthetic numbers episodes 7, 17, 27, ...: their position."""
    return (np.asarray(episode_id, dtype=np.int64) - 7) // 10


def frames_dataset(
    uri: str, num_episodes=12, max_length=40, part_steps=100, cameras=CAMERAS, encode=None
):
    """A base dataset plus a child version with a frames group (one PNG per step and camera,
    pixels encoding (episode, t); or `encode(camera, episode number, t)`'s bytes), written
    as any frames writer would."""
    steps, episodes = make_episodes(
        num_episodes=num_episodes, obs_dim=3, action_dim=2, seed=1, max_length=max_length
    )
    write_synthetic_dataset(uri + "-base", steps, episodes, part_steps=part_steps)
    parent = open_dataset(uri + "-base")
    with VersionWriter(uri) as writer:
        written = []
        for index in range(parent.num_parts):
            part = parent.read_part(index, columns=["episode_id", "t"])
            number = episode_number(part.column("episode_id").to_numpy())
            t = part.column("t").to_numpy()
            table = frames_table(
                {
                    camera: encode(camera, number, t)
                    if encode
                    else encode_frames(frame_pixels(camera, number, t), info)
                    for camera, info in cameras.items()
                }
            )
            written.append(writer.write_part(index, table, None, group=FRAMES_GROUP))
        group = assemble_group(writer.uri, FRAMES_GROUP, written, cameras=dict(cameras))
        manifest = new_manifest(
            groups=inherit_groups(parent, [group]),
            parts=parent.manifest.parts,
            operation="relabel",
            command="tests.test_frames_shards",
            parent=parent,
            metadata={"env_id": "Synthetic-v0"},
        )
        writer.commit(manifest)
    return writer.uri


def shard(dataset: str, out: str, **settings):
    """write_shards in this process (no Ray): window 5, small shards and blocks."""
    from engine.executor import InProcess
    from engine.shards import ShardSettings, write_shards

    values = dict(window=5, shard_steps=120, block_steps=32, frame_stack=3, seed=0)
    values.update(settings)
    return write_shards(
        open_dataset(dataset), ShardSettings(**values), out, executor=InProcess(), command="test"
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return frames_dataset(str(tmp_path_factory.mktemp("frames") / "ds"))


@pytest.fixture(scope="module")
def written(dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("frame-shards") / "shards")
    return out, shard(dataset, out)


def tar_members(path: str) -> dict[str, dict[str, bytes]]:
    """Every member of a local shard by block key and name, read with plain tarfile."""
    blocks: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            key, _, name = member.name.partition(".")
            blocks.setdefault(key, {})[name] = archive.extractfile(member).read()
    return blocks


def check_batch_frames(batch, k: int, cameras=CAMERAS, shifted: bool = False) -> int:
    """Every window's stacked frames against (episode, t) computed from the batch's own
    episode_id and timestep: frame j of step t shows step max(t - (k - 1 - j), 0); padded
    positions are 0. Returns the number of windows checked."""
    episode = episode_number(batch["episode_id"].numpy())
    t = batch["timestep"].numpy()
    mask = batch["mask"].numpy()
    batch_size, window = mask.shape
    for camera, info in cameras.items():
        got = batch[frame_column(camera)].numpy()
        channels = info.channels
        assert got.dtype == np.uint8
        assert got.shape == (batch_size, window, channels * k, HEIGHT, WIDTH)
        lags = np.arange(k - 1, -1, -1)
        shown = np.maximum(t[:, :, None] - lags, 0)  # [B, W, k]
        expected = frame_pixels(camera, np.repeat(episode, window * k), shown.reshape(-1)).reshape(
            batch_size, window, k, HEIGHT, WIDTH, channels
        )
        expected = expected.transpose(0, 1, 2, 5, 3, 4).reshape(got.shape)
        expected[~mask] = 0
        if not shifted:
            np.testing.assert_array_equal(got, expected)
    return batch_size


def test_encoded_frames_are_cut_and_gathered_by_ranges_without_decoding():
    import pyarrow as pa

    from engine.shards import EncodedFrames
    from engine.shards.frames import concat_frames

    items = [bytes([i]) * (i % 5) for i in range(30)]  # empty frames too
    column = pa.chunked_array([pa.array(items[:12], pa.binary()), pa.array(items[12:])])
    sliced = column.slice(3, 20)  # an Arrow slice: offsets that do not start at 0
    frames = EncodedFrames.from_arrow(sliced, "x")
    assert len(frames) == 20 and frames.offsets[0] == 0
    taken = frames.take_ranges(np.array([15, 0, 7]), np.array([3, 2, 0]))
    got = [bytes(taken.data[a:b]) for a, b in zip(taken.offsets[:-1], taken.offsets[1:])]
    assert got == items[18:21] + items[3:5]
    # Views: parts one after another, episodes of them, a block segment within an episode.
    both = concat_frames([taken, frames.take_ranges(np.array([1]), np.array([2]))])
    view = both.select(np.array([5, 1]), np.array([2, 3]))  # rows 5-6, then 1-3
    assert len(view) == 5
    block = view.take_ranges(np.array([3, 0]), np.array([2, 2]))  # view rows 3-4, then 0-1
    got = [bytes(block.data[a:b]) for a, b in zip(block.offsets[:-1], block.offsets[1:])]
    assert got == items[20:21] + items[3:4] + items[4:6]
    with pytest.raises(ShardError, match="x: 1 steps have no frame"):
        EncodedFrames.from_arrow(pa.array([b"a", None]), "x")


def test_shards_carry_the_stored_frame_bytes_unchanged_and_the_index_records_cameras(
    dataset, written
):
    out, index = written
    assert index.cameras == CAMERAS and index.frame_stack == 3
    assert read_index(out).cameras == CAMERAS  # index.json round trip
    steps = open_dataset(dataset).read(columns=["episode_id", "t", *map(frame_column, CAMERAS)])
    stored = {
        camera: {
            (int(e), int(t)): data
            for e, t, data in zip(
                episode_number(steps.column("episode_id").to_numpy()),
                steps.column("t").to_numpy(),
                steps.column(frame_column(camera)).to_pylist(),
            )
        }
        for camera in CAMERAS
    }
    rows = 0
    for info in index.shards:
        blocks = tar_members(f"{out}/{info.name}")
        assert len(blocks) == info.blocks
        for members in blocks.values():
            timestep = np.load(io.BytesIO(members["timestep.npy"]))
            frames = {}
            for camera in CAMERAS:
                data = members[f"frame_{camera}.bin"]
                offsets = np.load(io.BytesIO(members[f"frame_{camera}.offsets.npy"]))
                assert offsets.dtype == np.int64 and len(offsets) == len(timestep) + 1
                frames[camera] = [data[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
            for row, t in enumerate(timestep):
                # What the render frame shows (decoded independently) says which step it is.
                pixels = decode_frame(frames["render"][row], CAMERAS["render"])
                episode = int(pixels[0, 0, 0])
                assert int(pixels[0, 0, 1]) == t
                for camera in CAMERAS:  # the very bytes the dataset stores for that step
                    assert frames[camera][row] == stored[camera][(episode, int(t))]
            rows += len(timestep)
    assert rows >= index.steps  # blocks may repeat context steps of chunked episodes
    assert all(name.endswith((".npy", ".bin")) for m in blocks.values() for name in m)


def test_every_window_gets_its_own_frames_stacked_with_the_first_repeated(written):
    out, index = written
    windows = 0
    for batch in stream(out, batch_size=16, shuffle_buffer=64, epochs=1):
        windows += check_batch_frames(batch, k=3)
    assert windows == index.windows
    # A smaller stack and one camera: [B, W, C * k, H, W] with k = 1.
    batch = next(iter(stream(out, batch_size=8, epochs=1, frame_stack=1, cameras=["wrist"])))
    assert frame_column("render") not in batch
    check_batch_frames(batch, k=1, cameras={"wrist": CAMERAS["wrist"]})
    batch = next(iter(stream(out, batch_size=8, epochs=1, cameras=[])))
    assert not [name for name in batch if name.startswith("frame_")]


def test_a_relabeled_child_shards_its_parents_frames_aligned_with_its_conditions(dataset, tmp_path):
    """The usual flow: frames collected, then relabeled (a child version that inherits the
    frames group by reference), then sharded with a condition: each step's condition and
    frame must be of the same (episode, t)."""
    import pyarrow as pa

    from tests.synthetic import attach_group

    def label(parent, index):
        part = parent.read_part(index, columns=["episode_id", "t"])
        code = episode_number(part.column("episode_id").to_numpy()) * 1000
        return pa.table({"code": (code + part.column("t").to_numpy()).astype(np.float32)}), None

    child = attach_group(dataset, str(tmp_path / "child"), "codes", label)
    assert open_dataset(child).group_of("frame_render").name == FRAMES_GROUP
    index = shard(child, str(tmp_path / "shards"), condition=("code",))
    assert index.cameras == CAMERAS
    windows = 0
    for batch in stream(str(tmp_path / "shards"), batch_size=16, condition="code", epochs=1):
        windows += check_batch_frames(batch, k=3)
        mask = batch["mask"].numpy()
        code = batch["code"].numpy()[mask]
        render = batch["frame_render"].numpy()[:, :, -3:][mask]  # the step's own frame
        np.testing.assert_array_equal(code // 1000, render[:, 0, 0, 0])
        np.testing.assert_array_equal(code % 1000, render[:, 1, 0, 0])
    assert windows == index.windows


def test_long_episodes_cut_into_chunks_carry_the_stack_history(tmp_path):
    dataset = frames_dataset(str(tmp_path / "long"), num_episodes=3, max_length=150)
    index = shard(dataset, str(tmp_path / "shards"), frame_stack=4, block_steps=24, window=6)
    assert index.shards[0].blocks > 3
    windows = 0
    for batch in stream(str(tmp_path / "shards"), batch_size=32, epochs=1, window=6):
        windows += check_batch_frames(batch, k=4)
    assert windows == index.windows == index.steps


def test_workers_and_threads_decode_the_same_frames(written):
    out, index = written
    plain = list(stream(out, batch_size=16, shuffle_buffer=64, epochs=1))
    threaded = list(stream(out, batch_size=16, shuffle_buffer=64, epochs=1, decode_threads=2))
    assert len(plain) == len(threaded)
    for a, b in zip(plain, threaded):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name
    windows = 0
    for batch in stream(out, batch_size=16, epochs=1, num_workers=2, decode_threads=2):
        windows += check_batch_frames(batch, k=3)
    assert windows == index.windows
    # Workers hand frames over in recycled shared memory: batches a consumer keeps are
    # never written over (every one still right after the whole epoch).
    kept = list(stream(out, batch_size=16, epochs=1, num_workers=2, augment_shift=0))
    assert sum(check_batch_frames(batch, k=3) for batch in kept) == index.windows


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for name in x:
            assert torch.equal(x[name], y[name]), name


def test_the_frame_cache_changes_no_byte_of_any_batch(written):
    out, index = written
    for settings in (
        dict(window=1),  # single steps: 3 frames per sample, ~1 per pool row
        dict(window=5, augment_shift=2),
        dict(window=1, shuffle_buffer=40),  # many small pools, blocks cut between them
        dict(window=1, num_workers=2),  # each worker its half of the rank's cache
    ):
        cached = list(stream(out, batch_size=16, epochs=2, seed=3, **settings))
        uncached = list(stream(out, batch_size=16, epochs=2, seed=3, frame_cache_mb=0, **settings))
        assert_same_batches(cached, uncached)
        assert (
            sum(check_batch_frames(batch, k=3, shifted=True) for batch in cached)
            == 2 * index.windows
        )
    with pytest.raises(ValueError, match="frame_cache_mb >= 0"):
        stream(out, batch_size=4, frame_cache_mb=-1)


def test_a_small_frame_cache_and_a_skipped_corrupt_frame_change_no_byte(
    written, tmp_path, monkeypatch
):
    from trainers.loader.stream import StreamOptions

    out, index = written
    settings = dict(batch_size=16, epochs=2, seed=3, window=1)
    uncached = list(stream(out, frame_cache_mb=0, **settings))
    # ~3 blocks of each camera kept (32 steps of 144 / 48 bytes a block) of the shards'
    # ~15: blocks are dropped and decoded again all the time.
    budget = property(lambda options: 20_000 if options.frame_cache_mb else 0)
    monkeypatch.setattr(StreamOptions, "frame_cache_bytes", budget)
    assert sum(shard.blocks for shard in index.shards) > 10
    assert_same_batches(list(stream(out, **settings)), uncached)
    copy, _ = corrupt_one_frame(out, tmp_path)
    with pytest.warns(UserWarning, match="windows with frames that do not decode skipped"):
        cached = list(stream(copy, on_error="skip", **settings))
    with pytest.warns(UserWarning, match="windows with frames that do not decode skipped"):
        assert_same_batches(
            cached, list(stream(copy, on_error="skip", frame_cache_mb=0, **settings))
        )


def block_frames(out: str, index, blocks: int = 1, camera: str = "render"):
    """The first `blocks` blocks of the first shard as a pool's frames (read afresh: another
    PoolFrames of the same blocks)."""
    from trainers.loader.frames import PoolFrames
    from trainers.loader.shards import shard_blocks

    read = shard_blocks(f"{out}/{index.shards[0].name}", index, [], cameras=[camera])
    taken = [next(read) for _ in range(blocks)]
    sizes = [len(block.frames[camera][1]) - 1 for block in taken]
    return PoolFrames(
        index.cameras[camera],
        [block.frames[camera][0] for block in taken],
        [block.frames[camera][1] for block in taken],
        [block.where for block in taken],
        np.cumsum([0, *sizes[:-1]]),
    )


def test_the_frame_cache_decodes_each_frame_once_and_keeps_blocks_within_budget(written):
    from trainers.loader.frames import FrameDecoder

    out, index = written
    frames = block_frames(out, index, blocks=2)
    first, rows_in_pool = (
        int(frames.first_rows[1]),
        int(frames.first_rows[1]) + len(frames.offsets[1]) - 1,
    )
    frame_bytes = HEIGHT * WIDTH * 3
    plain = FrameDecoder()
    rng = np.random.default_rng(0)
    requests = [np.unique(rng.integers(0, rows_in_pool, 9)) for _ in range(40)]
    asked = sum(map(len, requests))
    distinct = len(np.unique(np.concatenate(requests)))

    def run(budget: int):
        decoder = FrameDecoder(cache_bytes=budget, cameras={"render": frames.camera})
        for rows in requests:
            got, errors = decoder.frames_at("render", frames, rows)
            np.testing.assert_array_equal(got, plain.decode(frames, rows)[0])
            assert not any(errors)
        cache = decoder.caches["render"]
        assert cache.decoded + cache.reused == asked and cache.used <= budget
        return decoder, cache

    # Both blocks fit: each frame decoded once, and kept for another pool of the same blocks
    # (the next epoch's, or the next pool of a block cut between two).
    decoder, cache = run(rows_in_pool * frame_bytes)
    assert cache.decoded == distinct
    decoder.frames_at("render", block_frames(out, index, blocks=2), requests[0])
    assert cache.decoded == distinct
    # Room for the larger block only: the least recently used one goes, frames come again.
    larger = max(first, rows_in_pool - first)
    assert distinct < run(larger * frame_bytes)[1].decoded < asked
    # Less than a block: nothing kept, every frame decoded as without a cache.
    assert run(min(first, rows_in_pool - first) * frame_bytes - 1)[1].decoded == asked


def test_a_frame_that_does_not_decode_is_never_cached(written, tmp_path):
    from trainers.loader.frames import FrameDecoder

    out, index = written
    copy, row = corrupt_one_frame(out, tmp_path)
    frames = block_frames(copy, read_index(copy))
    decoder = FrameDecoder(cache_bytes=1 << 20, cameras={"render": frames.camera})
    assert row < len(frames.offsets[0]) - 2  # the corrupted row and its neighbours: block 0
    rows = np.array([row - 1, row, row + 1])
    for _ in range(2):  # the second time too: the same error, the good frames from the cache
        got, errors = decoder.frames_at("render", frames, rows)
        assert [bool(e) for e in errors] == [False, True, False]
        assert f"row {row}: frame" in errors[1]
        assert not got[1].any()
    assert decoder.caches["render"].decoded == 4  # 3, then only the bad one again


def test_worker_frame_buffers_are_reused_only_once_released():
    from trainers.loader.handover import FREE, LENT, Lent, SharedFrames, new_board

    board = new_board(1)
    # The worker's side: a lent slot is not written again until the board says free.
    worker = SharedFrames(board, 0)
    first = worker.empty((4, 8))
    address = first.ctypes.data
    _, slot = worker.hand_over(first)
    worker.clear()
    assert board[0, slot] == LENT
    second = worker.empty((4, 8)).ctypes.data  # another buffer, not handed over
    assert second != address
    worker.clear()
    assert worker.empty((4, 8)).ctypes.data == second  # free again: reused
    worker.clear()
    board[0, slot] = FREE
    assert {worker.empty((4, 8)).ctypes.data, worker.empty((4, 8)).ctypes.data} == {
        address,
        second,
    }  # both reused, no third buffer made
    assert sum(buffer is not None for buffer in worker.buffers) == 2
    # The main process's side (its own mapping of the buffer): free once no view is left.
    lent = Lent(board)
    board[0, 3] = LENT
    received = torch.zeros((4, 8), dtype=torch.uint8).share_memory_()
    lent.add(0, {"frame_render": 3}, {"frame_render": received})
    view = received[1:3]  # the consumer keeps a view of the batch
    del received
    lent.release()
    assert board[0, 3] == LENT
    del view
    lent.release()
    assert board[0, 3] == FREE and lent.out == []


def test_random_shift_is_seeded_and_shifts_each_window_as_a_whole(written):
    out, _ = written
    still = next(iter(stream(out, batch_size=32, epochs=1, seed=3)))
    shifted = next(iter(stream(out, batch_size=32, epochs=1, seed=3, augment_shift=2)))
    again = next(iter(stream(out, batch_size=32, epochs=1, seed=3, augment_shift=2)))
    other = next(iter(stream(out, batch_size=32, epochs=1, seed=4, augment_shift=2)))
    for name in still:  # the shift changes frames only
        if not name.startswith("frame_"):
            assert torch.equal(still[name], shifted[name])
        assert torch.equal(shifted[name], again[name])
    assert not torch.equal(shifted["frame_render"], other["frame_render"][: len(shifted)])
    # Each window is its unshifted frames moved by one (dy, dx) in [-2, 2], border replicated.
    image, moved = still["frame_render"].numpy(), shifted["frame_render"].numpy()
    offsets = set()
    for b in range(len(image)):
        matches = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if np.array_equal(moved[b], shift_by(image[b], dy, dx))
        ]
        assert matches, f"window {b} is not a shift of its frames"
        offsets.add(matches[0])
    assert len(offsets) > 1  # random per window


def test_resume_with_frames_and_shift_gives_the_very_same_batches(written):
    out, _ = written
    settings = dict(batch_size=16, shuffle_buffer=48, epochs=1, seed=2, augment_shift=3)
    full = list(stream(out, **settings))
    loader = stream(out, **settings)
    iterator = iter(loader)
    head = [next(iterator) for _ in range(5)]
    state = loader.state_dict()
    del iterator
    tail = list(stream(out, start_state=state, **settings))
    assert len(head) + len(tail) == len(full)
    for a, b in zip(full, head + tail):
        assert torch.equal(a["frame_render"], b["frame_render"])
        assert torch.equal(a["frame_wrist"], b["frame_wrist"])


def shift_by(frames: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Pad by replication and crop at (dy, dx): the independent version of the shift."""
    height, width = frames.shape[-2:]
    padded = np.pad(frames, [(0, 0)] * (frames.ndim - 2) + [(2, 2), (2, 2)], mode="edge")
    return padded[..., 2 + dy : 2 + dy + height, 2 + dx : 2 + dx + width]


def corrupt_one_frame(out: str, tmp_path) -> tuple[str, int]:
    """A copy of the shards whose first shard has one frame replaced by garbage of the same
    length (offsets intact; the index's size and sha256 updated: only the frame is bad).
    Returns the copy and the corrupted row's block-row number."""
    import hashlib
    import shutil

    from engine.shards.tar import tar_bytes

    copy = str(tmp_path / "corrupt")
    shutil.copytree(out, copy)
    index = json.loads(open(f"{copy}/index.json").read())
    name = index["shards"][0]["name"]
    with tarfile.open(f"{copy}/{name}") as archive:
        members = [(m.name, archive.extractfile(m).read()) for m in archive.getmembers()]
    key = members[0][0].partition(".")[0]
    position = [n for n, _ in members].index(f"{key}.frame_render.bin")
    offsets = np.load(io.BytesIO(dict(members)[f"{key}.frame_render.offsets.npy"]))
    row = 3
    data = bytearray(members[position][1])
    data[offsets[row] : offsets[row + 1]] = b"\x00" * int(offsets[row + 1] - offsets[row])
    members[position] = (members[position][0], bytes(data))
    shard_data = tar_bytes(members)
    open(f"{copy}/{name}", "wb").write(shard_data)
    index["shards"][0].update(bytes=len(shard_data), sha256=hashlib.sha256(shard_data).hexdigest())
    open(f"{copy}/index.json", "w").write(json.dumps(index))
    return copy, row


def test_a_corrupt_frame_names_shard_and_sample_or_is_skipped_and_counted(written, tmp_path):
    out, index = written
    copy, row = corrupt_one_frame(out, tmp_path)
    with pytest.raises(ShardError, match=rf"shard-00000.tar sample b000000 row {row}: frame"):
        for _ in stream(copy, batch_size=16, epochs=1):
            pass
    loader = stream(copy, batch_size=16, epochs=1, on_error="skip")
    windows = 0
    with pytest.warns(UserWarning, match="windows with frames that do not decode skipped"):
        for batch in loader:
            windows += check_batch_frames(batch, k=3)
    # The windows whose steps or stacks hold block row `row`: with window 5 and k = 3 they
    # end at rows row..row + 6 of the same episode (at most 7 windows).
    assert 1 <= loader.lost_windows <= 7
    assert windows + loader.lost_windows == index.windows


def test_frame_options_are_checked(dataset, written, tmp_path):
    from tests.synthetic import make_episodes as episodes_of

    out, _ = written
    with pytest.raises(KeyError, match=r"no camera\(s\) \['top'\]; the dataset has render, wrist"):
        shard(dataset, str(tmp_path / "a"), cameras=("top",))
    steps, episodes = episodes_of(num_episodes=3, seed=2)
    plain = write_synthetic_dataset(str(tmp_path / "plain"), steps, episodes)
    with pytest.raises(ValueError, match="has no camera frames: --frame-stack 2"):
        shard(str(tmp_path / "plain"), str(tmp_path / "b"), frame_stack=2)
    assert plain is not None
    with pytest.raises(KeyError, match=r"no frames of camera\(s\) \['top'\]"):
        stream(out, batch_size=4, cameras=["top"])
    with pytest.raises(ValueError, match="frame_stack <= the shards' frame stack 3"):
        stream(out, batch_size=4, frame_stack=4)
    # Shards without frames: an index without cameras, batches without frames.
    index = shard(str(tmp_path / "plain"), str(tmp_path / "c"), frame_stack=1)
    text = open(str(tmp_path / "c" / "index.json")).read()
    assert index.cameras == {} and "cameras" not in text and "frame_stack" not in text
    batch = next(iter(stream(str(tmp_path / "c"), batch_size=4, epochs=1)))
    assert not [name for name in batch if name.startswith("frame_")]


@pytest.mark.ray
def test_cli_shard_with_frame_stack_and_cameras(dataset, tmp_path, ray_local, capsys):
    from jobs.cli import main

    out = str(tmp_path / "cli")
    argv = ["shard", dataset, out, "--window", "4", "--frame-stack", "2", "--cameras", "render"]
    assert main([*argv, "--shard-steps", "200", "--json"]) == 0
    output = capsys.readouterr().out
    summary = json.loads(output[output.index("{") :])
    assert summary["cameras"] == ["render"] and summary["frame_stack"] == 2
    index = read_index(out)
    assert list(index.cameras) == ["render"] and index.frame_stack == 2
    windows = 0
    for batch in stream(out, batch_size=32, epochs=1):
        windows += check_batch_frames(batch, k=2, cameras={"render": CAMERAS["render"]})
    assert windows == index.windows
    assert main(["shard", dataset, str(tmp_path / "x"), "--cameras", "top"]) == 2
    assert "no camera(s) ['top']" in capsys.readouterr().err
    assert main(["shard", dataset, str(tmp_path / "none"), "--cameras", ""]) == 0
    assert read_index(str(tmp_path / "none")).cameras == {}


@pytest.mark.s3
def test_frames_shards_on_s3_stream_the_same_frames(dataset, s3_server):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="hs-frames")
    index = shard(dataset, "s3://hs-frames/shards/v1")
    windows = 0
    for batch in stream("s3://hs-frames/shards/v1", batch_size=32, epochs=1, decode_threads=2):
        windows += check_batch_frames(batch, k=3)
    assert windows == index.windows


# ---------------------------------------------------------------- a huge part, streamed


def shard_bytes(out: str) -> list[bytes]:
    index = read_index(out)
    return [(Path(out) / info.name).read_bytes() for info in index.shards]


@pytest.mark.parametrize("exclude", [None, "t % 7 = 3"])
def test_a_part_of_many_frames_is_read_shard_by_shard_into_the_same_shards(
    tmp_path, monkeypatch, exclude
):
    import engine.writer
    from engine.shards import frames as shard_frames

    # One part of ~400 steps; frames in row groups of ~5 frames, shards of ~16 KB of frames.
    monkeypatch.setattr(engine.writer, "FRAME_ROW_GROUP_BYTES", 5 * 160)
    uri = frames_dataset(str(tmp_path / "ds"), num_episodes=14, max_length=60, part_steps=10**6)
    assert len(open_dataset(uri).manifest.parts) == 1
    monkeypatch.setattr(shard_frames, "MAX_SHARD_FRAME_BYTES", 16 * 2**10)
    settings = dict(shard_steps=10**6, exclude=exclude)
    held = shard(uri, str(tmp_path / "held"), **settings)
    monkeypatch.setattr(shard_frames, "FRAMES_IN_MEMORY_BYTES", 0)
    reads = []
    original = shard_frames.StoredFrames.take_ranges

    def counted(self, starts, counts):
        reads.append(int(np.sum(counts)))
        return original(self, starts, counts)

    monkeypatch.setattr(shard_frames.StoredFrames, "take_ranges", counted)
    streamed = shard(uri, str(tmp_path / "streamed"), **settings)
    # Many shards (the frames' bytes cap them), each reading only its own steps' frames,
    # once per camera; and the very same shard bytes as when the part's frames are held.
    assert len(streamed.shards) >= 4 and streamed.shards == held.shards
    filled = [info for info in streamed.shards if info.steps]
    assert len(reads) == 2 * len(filled) and sum(reads) == 2 * streamed.steps
    assert shard_bytes(str(tmp_path / "streamed")) == shard_bytes(str(tmp_path / "held"))
    if exclude:  # t is renumbered over the kept steps: the frames show the original t
        return
    windows = 0
    for batch in stream(str(tmp_path / "streamed"), batch_size=32, epochs=1):
        windows += check_batch_frames(batch, k=3)
    assert windows == streamed.windows


def big_frames_dataset(uri: str, steps: int, frame_bytes: int) -> str:
    """One part of `steps` steps whose one camera holds incompressible frames of
    `frame_bytes` bytes (a PNG signature, then random bytes: the shard writer carries
    frames unchanged and never decodes them, so only their size matters here)."""
    camera = {"render": CameraInfo(height=256, width=256, codec="png")}
    return frames_dataset(
        uri,
        num_episodes=steps // 50,
        max_length=50,
        part_steps=10**7,
        cameras=camera,
        encode=lambda camera, number, t: [
            b"\x89PNG\r\n\x1a\n" + np.random.default_rng([int(n), int(s)]).bytes(frame_bytes)
            for n, s in zip(number, t)
        ],
    )


PEAK_SCRIPT = """
import json, sys, tracemalloc
import pyarrow as pa
from engine.dataset import open_dataset
from engine.executor import InProcess
from engine.shards import ShardSettings, frames, write_shards

frames.FRAMES_IN_MEMORY_BYTES = int(sys.argv[3])
frames.MAX_SHARD_FRAME_BYTES = 2 * 2**20
dataset = open_dataset(sys.argv[1])
tracemalloc.start()
# First without frames: what importing and the other columns take is not counted.
settings = ShardSettings(window=5, shard_steps=10**6, cameras=())
write_shards(dataset, settings, sys.argv[2] + "-warm", executor=InProcess(), command="t")
tracemalloc.reset_peak()
before, arrow_before = tracemalloc.get_traced_memory()[0], pa.total_allocated_bytes()
settings = ShardSettings(window=5, shard_steps=10**6)
write_shards(dataset, settings, sys.argv[2], executor=InProcess(), command="t")
print(json.dumps({"numpy_python": tracemalloc.get_traced_memory()[1] - before,
                  "arrow": pa.default_memory_pool().max_memory() - arrow_before}))
"""


def shard_peak(dataset: str, out: str, in_memory_bytes: int) -> int:
    """Peak bytes allocated while sharding, in a fresh process: Arrow's pool (what the
    Parquet reader holds) plus Python and NumPy (tracemalloc: frame buffers, tars)."""
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root}
    result = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, dataset, out, str(in_memory_bytes)],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        check=True,
    )
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    return peaks["numpy_python"] + peaks["arrow"]


def test_a_huge_part_is_sharded_in_bounded_memory(tmp_path, monkeypatch):
    import engine.writer

    # ~2,000 frames of 20 KB: a ~40 MB part in row groups of 64 KiB, shards of <= ~2 MiB of
    # frames (the defaults, 1 MiB and 128 MiB, scaled down to keep the test small).
    monkeypatch.setattr(engine.writer, "FRAME_ROW_GROUP_BYTES", 64 * 2**10)
    uri = big_frames_dataset(str(tmp_path / "big"), steps=4000, frame_bytes=20_000)
    part = open_dataset(uri).manifest.groups[-1].steps_files[0].bytes
    streamed = shard_peak(uri, str(tmp_path / "streamed"), in_memory_bytes=0)
    held = shard_peak(uri, str(tmp_path / "held"), in_memory_bytes=10**12)
    # Held whole, the part's frames are in memory (twice: Parquet's read, then the copy);
    # streamed, a few shards' worth, however large the part.
    assert held > part > 30 * 2**20, (held, part)
    assert streamed < 12 * 2 * 2**20 < part, (streamed, held, part)  # measured: 16.7 MB
    assert shard_bytes(str(tmp_path / "streamed")) == shard_bytes(str(tmp_path / "held"))
