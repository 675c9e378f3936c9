"""A camera stored as video (H.264, AV1 or HEVC, one MP4 per episode in the frames group's
episodes table): encode and decode round trip within a PSNR bound, identical bytes in any
process and on Ray, collect / info / view / scan / shard / loader, and bad videos (a frame
count that is not the episode's steps, a damaged stream) named by file, episode and camera."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest

import engine
from engine.collect import Rollouts, collect, plan_collect
from engine.dataset import open_dataset
from engine.executor import InProcess
from engine.view import ViewError, episode_frames
from engine.writer import VersionWriter, assemble_group, inherit_groups, new_manifest
from jobs.cli import main
from jobs.commands.collect import Collect
from schemas.frames import (
    FRAMES_GROUP,
    CameraInfo,
    FrameError,
    decode_frame,
    frame_column,
    frames_table,
)
from schemas.shard_index import ShardError
from schemas.video import CausalVideo, decode_video, encode_video, video_frames
from tests.synthetic import make_episodes, write_synthetic_dataset
from trainers.loader import read_index, stream

SIZE = 16
HEVC_SIZE = 32  # x265 is not deterministic under 32x32 (schemas/frames.py MIN_HEVC_SIDE)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / max(mse, 1e-12)))


def moving_frames(steps: int, channels: int = 3, shift: int = 0) -> np.ndarray:
    """Smooth frames that change with t (video codecs smear 1-pixel detail and colour)."""
    t = np.arange(steps)[:, None, None] + shift
    y = np.arange(SIZE)[None, :, None]
    x = np.arange(SIZE)[None, None, :]
    planes = [(8 * x + 4 * t) % 256 + 0 * y, 8 * y + 0 * x + 0 * t, 128 + 4 * t + 0 * x + 0 * y]
    frames = np.stack([np.broadcast_to(p, (steps, SIZE, SIZE)) for p in planes], -1)
    frames = frames.astype(np.uint8)
    return frames[..., :1] if channels == 1 else frames


def tiled(frames: np.ndarray, size: int) -> np.ndarray:
    """`moving_frames` repeated to size x size (a multiple of SIZE)."""
    return np.tile(frames, (1, size // SIZE, size // SIZE, 1))


@pytest.mark.parametrize("codec", ["h264", "av1", "hevc"])
@pytest.mark.parametrize("channels", [3, 1])
def test_a_video_round_trips_within_a_psnr_bound_with_its_frame_count(codec, channels):
    size = HEVC_SIZE if codec == "hevc" else SIZE
    camera = CameraInfo(height=size, width=size, channels=channels, codec=codec)
    assert (camera.fps, camera.gop, camera.crf) == (30, 2, 30)  # LeRobot's settings
    frames = tiled(moving_frames(20, channels), size)
    data = encode_video(frames, camera)
    assert data == encode_video(frames, camera)  # deterministic
    decoded = decode_video(data, camera, "here", steps=20)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert psnr(decoded, frames) > 30
    with pytest.raises(FrameError, match="here: the video holds 20 frames, the episode has 21"):
        decode_video(data, camera, "here", steps=21)
    other = CameraInfo(height=size, width=size + 2, channels=channels, codec=codec)
    with pytest.raises(FrameError, match=f"the camera says {size + 2}x{size}"):
        decode_video(data, other, "here")
    # a frame at a time (the export's image stats): the same frames, the same checks
    np.testing.assert_array_equal(np.stack(list(video_frames(data, camera, "here", 20))), decoded)
    with pytest.raises(FrameError, match="here: the video holds 20 frames, the episode has 21"):
        list(video_frames(data, camera, "here", steps=21))


@pytest.mark.parametrize("codec", ["h264", "av1", "hevc"])
@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("gop", [2, 3])
@pytest.mark.parametrize("size", [SIZE, 64])
def test_frames_given_a_step_at_a_time_come_back_as_the_whole_video_shows_them(
    codec, channels, gop, size
):
    if codec == "av1" and size > SIZE:
        pytest.skip("SVT-AV1 keyframes at 64x64 depend on later frames (docs/frames.md)")
    size = max(size, HEVC_SIZE) if codec == "hevc" else size
    camera = CameraInfo(height=size, width=size, channels=channels, codec=codec, gop=gop)
    frames = tiled(moving_frames(13, channels), size)
    whole = decode_video(encode_video(frames, camera), camera, "here", steps=13)
    causal = CausalVideo(camera)
    given = np.stack([causal(frame) for frame in frames])
    assert not np.array_equal(whole, frames)  # lossy: the check has something to see
    if codec == "av1" and gop > 2:  # SVT-AV1 codes a keyframe group out of order: close
        error = np.abs(given.astype(int) - whole).mean()
        assert error < np.abs(frames.astype(int) - whole).mean() / 4
    else:  # pixel for pixel
        for t in range(len(frames)):
            assert np.array_equal(given[t], whole[t]), t
    with pytest.raises(FrameError, match="not a video codec"):
        CausalVideo(CameraInfo(height=SIZE, width=SIZE))


def test_camera_settings_are_checked():
    with pytest.raises(ValueError, match="even height and width"):
        CameraInfo(height=15, width=16, codec="h264")
    with pytest.raises(ValueError, match="no quality"):
        CameraInfo(height=16, width=16, codec="av1", quality=80)
    with pytest.raises(ValueError, match="hevc video needs frames of at least 32x32"):
        CameraInfo(height=16, width=64, codec="hevc")
    with pytest.raises(ValueError, match="hevc's crf is 0-51"):
        CameraInfo(height=32, width=32, codec="hevc", crf=52)
    with pytest.raises(ValueError, match="video settings"):
        CameraInfo(height=16, width=16, codec="png", gop=2)
    # An image camera's manifest entry is what it was before video cameras existed.
    assert "gop" not in CameraInfo(height=16, width=16).model_dump_json()
    for bad in (["--codec", "h264", "--quality", "80"], ["--gop", "4"]):
        with pytest.raises(ValueError):
            Collect(env="Pendulum-v1", output="x", frames="16x16", **_options(bad))


def _options(flags: list[str]) -> dict:
    return {flags[i].lstrip("-"): flags[i + 1] for i in range(0, len(flags), 2)}


def damage(data: bytes, step: int) -> bytes:
    """The video with the last three quarters of step `step`'s packet overwritten."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        packet = [p for p in container.demux(stream) if p.size][step]
        start, end = packet.pos + packet.size // 4, packet.pos + packet.size
    damaged = bytearray(data)
    damaged[start:end] = np.random.default_rng(step).bytes(end - start)
    return bytes(damaged)


@pytest.mark.parametrize(("codec", "step"), [("h264", "6"), ("av1", r"\d+"), ("hevc", "6")])
def test_a_damaged_video_names_the_step_it_stops_at(codec, step):
    # H.264 fails at the damaged step; dav1d decodes a few frames ahead, so AV1 may name
    # a later one.
    size = HEVC_SIZE if codec == "hevc" else SIZE
    camera = CameraInfo(height=size, width=size, codec=codec)
    data = damage(encode_video(tiled(moving_frames(20), size), camera), 6)
    with pytest.raises(FrameError, match=rf"^file: episode 3 step {step}: the video does not"):
        decode_video(data, camera, "file: episode 3", steps=20)
    with pytest.raises(FrameError, match="not a video"):
        decode_video(b"\x00" * 100, camera, "file: episode 3")


def test_one_flipped_bit_in_an_hevc_video_is_an_error_or_changes_nothing():
    """hindsight's x265 writes an MD5 of every picture, which FFmpeg checks: a flipped bit
    that would change pixels is an error naming the video, never wrong frames."""
    import av

    camera = CameraInfo(height=HEVC_SIZE, width=HEVC_SIZE, codec="hevc")
    data = encode_video(tiled(moving_frames(20), HEVC_SIZE), camera)
    whole = decode_video(data, camera, "file", steps=20)
    with av.open(io.BytesIO(data)) as container:
        packets = [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size]
    rng, outcomes = np.random.default_rng(1), []
    for _ in range(30):
        position, size = packets[int(rng.integers(len(packets)))]
        flipped = bytearray(data)
        flipped[position + 4 + int(rng.integers(size - 4))] ^= 1 << int(rng.integers(8))
        try:
            same = np.array_equal(decode_video(bytes(flipped), camera, "file", steps=20), whole)
            outcomes.append("same" if same else "WRONG PIXELS")
        except FrameError as error:
            assert str(error).startswith("file")
            outcomes.append("error")
    assert "WRONG PIXELS" not in outcomes and outcomes.count("error") >= 20


def test_a_damaged_mp4_header_is_one_frame_error():
    """Bits flipped in the MP4's moov box (the sample description, the tables): a FrameError
    naming the video, never another exception (a damaged codec entry left PyAV's stream
    without a codec context: an AttributeError and a traceback, ~3% of such flips)."""
    camera = CameraInfo(height=SIZE, width=SIZE, codec="h264")
    data = encode_video(tiled(moving_frames(6), SIZE), camera)
    moov = data.find(b"moov") - 4
    length = int.from_bytes(data[moov : moov + 4], "big")
    rng, messages = np.random.default_rng(0), []
    for _ in range(300):
        flipped = bytearray(data)
        flipped[moov + int(rng.integers(length))] ^= 1 << int(rng.integers(8))
        try:
            decode_video(bytes(flipped), camera, "file", steps=6)
        except FrameError as error:
            assert str(error).startswith("file")
            messages.append(str(error))
    assert any("names no codec PyAV can decode" in message for message in messages)


@pytest.mark.parametrize("codec", ["h264", "hevc"])
def test_the_same_frames_give_the_same_bytes_in_another_process(codec):
    size = HEVC_SIZE if codec == "hevc" else SIZE
    camera = CameraInfo(height=size, width=size, codec=codec)
    here = hashlib.sha256(encode_video(tiled(moving_frames(12), size), camera)).hexdigest()
    script = (
        "import hashlib; from schemas.frames import CameraInfo; from schemas.video import "
        "encode_video; from tests.test_frames_video import moving_frames, tiled; print(hashlib."
        f"sha256(encode_video(tiled(moving_frames(12), {size}), CameraInfo(height={size}, "
        f"width={size}, codec='{codec}'))).hexdigest())"
    )
    there = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert there.stdout.strip() == here, there.stderr


# ---------------------------------------------------------------- collect and its readers


def collect_video(out: str, codec: str = "h264", executor=None, episodes: int = 4) -> str:
    camera = CameraInfo(height=SIZE, width=SIZE, codec=codec)
    rollouts = Rollouts("Pendulum-v1", noise_levels=(0.0, 1.0), max_steps=24, frames=camera)
    plan = plan_collect(rollouts, episodes, episodes_per_part=2)
    collect(plan, out, executor=executor or InProcess(), command="test")
    return out


@pytest.fixture(scope="module")
def pendulum(tmp_path_factory):
    """Pendulum-v1 collected with h264 frames and with PNG (lossless: the raw renders)."""
    root = tmp_path_factory.mktemp("video")
    raw = str(root / "png")
    camera = CameraInfo(height=SIZE, width=SIZE, codec="png")
    rollouts = Rollouts("Pendulum-v1", noise_levels=(0.0, 1.0), max_steps=24, frames=camera)
    collect(plan_collect(rollouts, 4, 2), raw, executor=InProcess(), command="test")
    return collect_video(str(root / "h264")), raw


def test_collect_stores_one_video_per_episode_and_the_manifest_its_settings(pendulum):
    video, raw = pendulum
    dataset = open_dataset(video)
    camera = dataset.cameras["render"]
    assert (camera.codec, camera.fps, camera.gop, camera.crf) == ("h264", 30, 2, 30)
    manifest = json.loads(open(f"{video}/manifest.json").read())
    frames_group = next(g for g in manifest["groups"] if g["name"] == FRAMES_GROUP)
    assert frames_group["steps_files"] == [] and len(frames_group["episodes_files"]) == 2
    assert frames_group["cameras"]["render"]["gop"] == 2
    # Scans never see it unless asked; scan_episodes(frames=True) has one video per episode.
    assert frame_column("render") not in engine.scan(video).collect_schema().names()
    assert frame_column("render") not in engine.scan_episodes(video).collect_schema().names()
    episodes = engine.scan_episodes(video, frames=True).collect()
    assert episodes.height == 4
    for episode_id, length, data in episodes.select("episode_id", "length", "frame_render").rows():
        frames = decode_video(data, camera, "test", steps=length)
        renders = episode_frames(raw, episode_id).frames
        assert psnr(frames, renders) > 30  # 16x16 renders: 32-33 dB measured


def test_view_decodes_the_episodes_video(pendulum, tmp_path, capsys):
    video, raw = pendulum
    every = episode_frames(video, 2, every=5)
    assert every.steps["t"].to_list() == [0, 5, 10, 15, 20]
    whole = episode_frames(video, 2)
    np.testing.assert_array_equal(every.frames, whole.frames[::5])
    assert psnr(whole.frames, episode_frames(raw, 2).frames) > 30
    with pytest.raises(ViewError, match="no episode 9"):
        episode_frames(video, 9)
    out = str(tmp_path / "sheet.png")
    assert main(["view", video, "--episode", "1", "--output", out]) == 0
    assert main(["info", video]) == 0
    assert "h264 video, 30 fps, gop 2, crf 30" in capsys.readouterr().out


def test_shards_hold_the_videos_frames_as_png_and_the_loader_yields_them(pendulum, tmp_path):
    from engine.shards import ShardSettings, write_shards

    video, _ = pendulum
    out = str(tmp_path / "shards")
    settings = ShardSettings(window=4, shard_steps=60, block_steps=16, frame_stack=2, seed=0)
    index = write_shards(open_dataset(video), settings, out, executor=InProcess(), command="t")
    assert index.cameras["render"].codec == "png" and not index.cameras["render"].is_video
    # The dataset's camera is recorded: a policy trained on these shards is asked through it.
    assert index.camera_sources == {"render": open_dataset(video).cameras["render"]}
    assert read_index(out).camera_sources["render"].codec == "h264"
    decoded = {e: episode_frames(video, e).frames for e in range(4)}
    assert windows_show_frames(out, "render", decoded, batch_size=8) == index.windows


def windows_show_frames(out: str, camera: str, frames, batch_size: int) -> int:
    """Every window the loader yields from shards `out` (RGB, a stack of 2) holds each
    step's previous and own frame of `frames[episode]` (H x W x 3 per step), the first
    repeated before step 0; the windows counted."""
    windows = 0
    for batch in stream(out, batch_size=batch_size, epochs=1):
        got = batch[frame_column(camera)].numpy()  # [B, W, 3 * 2, H, W]
        for b, (episode, ts, mask) in enumerate(
            zip(batch["episode_id"].numpy(), batch["timestep"].numpy(), batch["mask"].numpy())
        ):
            for w in np.flatnonzero(mask):
                for j, lag in enumerate((1, 0)):
                    expected = frames[int(episode)][max(int(ts[w]) - lag, 0)].transpose(2, 0, 1)
                    np.testing.assert_array_equal(got[b, w, 3 * j : 3 * j + 3], expected)
            windows += 1
    return windows


def test_query_output_and_materialize_keep_each_episodes_video(pendulum, tmp_path, capsys):
    video, _ = pendulum
    subset, copy = str(tmp_path / "noisy"), str(tmp_path / "copy")
    assert main(["query", video, "--where", "noise = 1", "--output", subset]) == 0
    assert main(["materialize", video, copy]) == 0
    for out, episodes in ((subset, [1, 3]), (copy, [0, 1, 2, 3])):
        dataset = open_dataset(out)
        assert dataset.cameras["render"].codec == "h264"
        assert dataset.manifest.episodes == len(episodes)
        for episode in episodes:  # the very same video bytes: same frames
            np.testing.assert_array_equal(
                episode_frames(out, episode).frames, episode_frames(video, episode).frames
            )


def test_collect_on_ray_writes_the_same_bytes(ray_local, pendulum, tmp_path):
    from jobs.runtime import RayExecutor

    video, _ = pendulum
    again = collect_video(str(tmp_path / "ray"), executor=RayExecutor())
    assert open_dataset(again).manifest.dataset_id == open_dataset(video).manifest.dataset_id


@pytest.mark.parametrize("codec", ["av1", "hevc"])
def test_collect_av1_from_the_cli(codec, tmp_path, capsys):
    out = str(tmp_path / codec)
    size = HEVC_SIZE if codec == "hevc" else SIZE
    flags = ["--episodes", "2", "--max-steps", "10", "--frames", f"{size}x{size}", "--gop", "4"]
    assert main(["collect", "Pendulum-v1", out, *flags, "--codec", codec]) == 0
    camera = open_dataset(out).cameras["render"]
    assert (camera.codec, camera.gop) == (codec, 4)
    assert episode_frames(out, 1).frames.shape == (10, size, size, 3)


# ---------------------------------------------------------------- bad videos


def bad_video_dataset(uri: str, fault: str) -> str:
    """A synthetic dataset with an h264 camera whose episode 17 has one frame too few
    (`short`) or a damaged stream (`damaged`)."""
    steps, episodes = make_episodes(num_episodes=3, obs_dim=2, action_dim=1, seed=0)
    write_synthetic_dataset(uri + "-base", steps, episodes, part_steps=1000)
    parent = open_dataset(uri + "-base")
    camera = CameraInfo(height=SIZE, width=SIZE, codec="h264")
    table = parent.read_part(0, "episodes", ["episode_id", "length"])
    videos = []
    for episode_id, length in zip(*(table.column(c).to_pylist() for c in ("episode_id", "length"))):
        short = fault == "short" and episode_id == 17
        data = encode_video(moving_frames(length - short, shift=episode_id), camera)
        if fault == "damaged" and episode_id == 17:
            data = damage(data, 5)
        videos.append(data)
    with VersionWriter(uri) as writer:
        written = [writer.write_part(0, None, frames_table({"cam": videos}), group=FRAMES_GROUP)]
        group = assemble_group(writer.uri, FRAMES_GROUP, written, cameras={"cam": camera})
        writer.commit(
            new_manifest(
                groups=inherit_groups(parent, [group]),
                parts=parent.manifest.parts,
                operation="relabel",
                command="test",
                parent=parent,
            )
        )
    return uri


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("short", r"episode 17 camera 'cam': the video holds \d+ frames, the episode has \d+"),
        ("damaged", r"episode 17 camera 'cam' step 5: the video does not decode"),
    ],
)
def test_a_bad_video_is_named_by_file_episode_and_camera(fault, message, tmp_path):
    from engine.shards import ShardSettings, write_shards

    uri = bad_video_dataset(str(tmp_path / fault), fault)
    file = r"frames/episodes/part-00000\.parquet: "
    with pytest.raises(ShardError, match=file + message):
        write_shards(
            open_dataset(uri),
            ShardSettings(window=2, seed=0),
            str(tmp_path / "shards"),
            executor=InProcess(),
            command="t",
        )
    assert not (tmp_path / "shards").exists()
    with pytest.raises(FrameError, match=file + message):
        episode_frames(uri, 17)
    assert episode_frames(uri, 7).frames.shape[1:] == (SIZE, SIZE, 3)  # the others are fine


# ---------------------------------------------------------------- ingest


def test_ingest_stores_raw_image_arrays_as_one_video_per_episode(tmp_path, capsys):
    from tests.test_frames_ingest import flat_arrays, scenes, write_hdf5

    frames = scenes(40, 16, 16)
    source = write_hdf5(tmp_path / "pixels.h5", flat_arrays(40, [9, 24, 39], frames))
    uri = str(tmp_path / "ds")
    # Parts of 12 steps: chunks and parts cut across episodes; videos are whole episodes.
    flags = ["--codec", "h264", "--part-steps", "12"]
    assert main(["ingest", source, uri, *flags]) == 0, capsys.readouterr().err
    dataset = open_dataset(uri)
    camera = dataset.cameras["observation"]
    assert (camera.codec, camera.gop, camera.quality) == ("h264", 2, None)
    episodes = engine.scan_episodes(uri, frames=True).collect()
    assert episodes["length"].to_list() == [10, 15, 15]
    # Each episode's video is the one its raw frames encode to (PNG in between is lossless).
    bounds = [(0, 10), (10, 25), (25, 40)]
    stored = episodes["frame_observation"].to_list()
    assert stored == [encode_video(frames[a:b], camera) for a, b in bounds]
    assert decode_video(stored[1], camera, "t", 15).shape == (15, 16, 16, 3)
    odd = write_hdf5(tmp_path / "odd.h5", flat_arrays(10, [9], scenes(10, 15, 16)))
    assert main(["ingest", odd, str(tmp_path / "odd"), "--codec", "av1"]) != 0
    assert "needs an even height and width" in capsys.readouterr().err


def test_lerobot_export_holds_the_videos_frames_and_reruns_identically(pendulum, tmp_path):
    """A video camera is exported (it was once left out, 'no place in lerobot'): each part's
    MP4 holds every step, close to the raw renders; exported twice (h264, the codec whose
    bytes once differed from run to run), the same bytes."""
    import av

    video, raw = pendulum
    outs = [str(tmp_path / name) for name in ("a", "b")]
    for out in outs:
        assert main(["export", video, out, "--format", "lerobot", "--video-codec", "h264"]) == 0
    info = json.loads(open(f"{outs[0]}/meta/info.json").read())
    assert info["features"]["observation.images.render"]["shape"] == [SIZE, SIZE, 3]
    raw_set = open_dataset(raw)
    for part in range(raw_set.num_parts):
        name = f"videos/observation.images.render/chunk-000/file-{part:03d}.mp4"
        files = [open(f"{out}/{name}", "rb").read() for out in outs]
        assert files[0] == files[1]
        with av.open(io.BytesIO(files[0])) as container:
            exported = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        camera = raw_set.cameras["render"]
        column = raw_set.read_part(part, "steps", ["frame_render"]).column(0).to_pylist()
        source = np.stack([decode_frame(data, camera) for data in column])
        assert exported.shape == source.shape
        assert psnr(exported, source) > 25  # stored h264, decoded, encoded again: two losses
