"""Ingesting images: uint8 image arrays and encoded image columns become cameras in the
`frames` group (never flattened floats); frames that arrive encoded keep their bytes; bad
frames are one line naming file, episode, step and column."""

from __future__ import annotations

import io
import json

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine import storage
from engine.dataset import open_dataset
from engine.executor import InProcess
from engine.ingest import ingest, plan_ingest
from engine.sources import images
from engine.validate import ValidationError
from jobs.cli import main
from jobs.commands.ingest import Ingest
from jobs.runtime import RayExecutor
from schemas.frames import FRAMES_GROUP, CameraInfo, decode_frames, frame_column
from schemas.manifest import SKIPPED_REPORT_NAME

# ---------------------------------------------------------------- source data


def scenes(count: int, height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth frames (as a renderer draws them), each different: lossy codecs stay close."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    out = np.empty((count, height, width, channels), np.uint8)
    for i in range(count):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        disc = ((y - cy) ** 2 + (x - cx) ** 2 < (height / 4) ** 2) * 160
        for c in range(channels):
            out[i, :, :, c] = (disc + x * 40 / width + c * 20).astype(np.uint8)
    return out


def encode(frame: np.ndarray, format: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(frame.squeeze()).save(out, format=format)
    return out.getvalue()


def flat_arrays(num_steps: int, ends: list[int], observations) -> dict[str, np.ndarray]:
    """D4RL-style arrays with these observations and episodes ending at `ends`."""
    rng = np.random.default_rng(1)
    terminals = np.zeros(num_steps, bool)
    terminals[ends] = True
    arrays = {
        "actions": rng.uniform(-1, 1, size=(num_steps, 2)).astype(np.float32),
        "rewards": rng.normal(size=num_steps).astype(np.float32),
        "terminals": terminals,
    }
    if isinstance(observations, dict):
        arrays |= {f"observations/{key}": values for key, values in observations.items()}
    else:
        arrays["observations"] = observations
    return arrays


def write_hdf5(path, arrays: dict[str, np.ndarray]) -> str:
    with h5py.File(path, "w") as handle:
        for name, values in arrays.items():
            handle.create_dataset(name, data=values)
    return str(path)


def frames_of(uri: str, camera: str) -> tuple[list[bytes], CameraInfo]:
    dataset = open_dataset(uri)
    group = next(g for g in dataset.manifest.groups if g.name == FRAMES_GROUP)
    column = dataset.read("steps", [frame_column(camera)]).column(frame_column(camera))
    return column.to_pylist(), group.cameras[camera]


# ---------------------------------------------------------------- D4RL-style arrays


def test_a_uint8_observation_array_is_camera_observation(ray_local, tmp_path):
    frames = scenes(40, 24, 32)
    arrays = flat_arrays(40, [9, 24, 39], frames)
    arrays["next_observations"] = np.roll(frames, -1, axis=0)
    plan = plan_ingest(write_hdf5(tmp_path / "pixels.h5", arrays), part_steps=12)
    uri = str(tmp_path / "ds")
    manifest = ingest(plan, uri, executor=RayExecutor(), command="t")  # encoded in Ray tasks

    dataset = open_dataset(uri)
    base, frame_group = dataset.manifest.groups
    assert frame_group.name == FRAMES_GROUP and len(manifest.parts) == 2
    assert len(frame_group.steps_files) == len(base.steps_files)  # one frames part per part
    assert frame_group.cameras == {"observation": CameraInfo(height=24, width=32)}
    # The image is the whole observation: no flattened floats anywhere in the base tables.
    assert "observation" not in dataset.columns() and "next_observation" not in dataset.columns()
    data, camera = frames_of(uri, "observation")
    np.testing.assert_array_equal(decode_frames(data, camera), frames)  # PNG: lossless
    assert manifest.metadata["frames_from"] == {
        "observation": {"source": "observations", "encoded_at_ingest": True}
    }


def test_webp_lossless_ingest_keeps_every_pixel_and_refuses_a_quality(tmp_path):
    frames = scenes(20, 24, 32, seed=3)
    frames[5:] = np.random.default_rng(2).integers(0, 256, frames[5:].shape, dtype=np.uint8)
    source = write_hdf5(tmp_path / "pixels.h5", flat_arrays(20, [9, 19], frames))
    uri = str(tmp_path / "ds")
    ingest(plan_ingest(source, codec="webp-lossless"), uri, executor=InProcess(), command="t")
    data, camera = frames_of(uri, "observation")
    assert camera == CameraInfo(height=24, width=32, codec="webp-lossless", quality=None)
    np.testing.assert_array_equal(decode_frames(data, camera), frames)
    with pytest.raises(ValueError, match="--quality is for jpeg and webp; webp-lossless is"):
        plan_ingest(source, codec="webp-lossless", quality=90)


def test_dict_observation_image_keys_are_cameras_the_rest_the_state(tmp_path):
    grey = scenes(30, 16, 20, channels=1)[..., 0]  # (N, H, W): one channel
    state = np.random.default_rng(2).normal(size=(30, 4)).astype(np.float32)
    arrays = flat_arrays(30, [14, 29], {"pixels": grey, "state": state})
    source = tmp_path / "logs.npz"
    np.savez(source, **arrays)
    uri = str(tmp_path / "ds")
    Ingest(input=str(source), output=uri, codec="jpeg", quality=95).run()

    data, camera = frames_of(uri, "pixels")
    assert camera == CameraInfo(height=16, width=20, channels=1, codec="jpeg", quality=95)
    assert all(frame[:3] == b"\xff\xd8\xff" for frame in data)
    decoded = decode_frames(data, camera)[..., 0]
    assert np.abs(decoded.astype(int) - grey).mean() < 2
    steps = open_dataset(uri).read("steps", ["observation"])
    assert steps.schema.field("observation").type.names == ["state"]
    np.testing.assert_array_equal(
        np.stack(steps.column("observation").combine_chunks().field("state").to_pylist()), state
    )


def test_skipped_episodes_take_their_frames_with_them(tmp_path):
    frames = scenes(30, 12, 12)
    arrays = flat_arrays(30, [9, 19, 29], {"cam": frames})
    arrays["rewards"][14] = np.nan  # episode 1, step 4
    uri = str(tmp_path / "ds")
    Ingest(input=write_hdf5(tmp_path / "x.h5", arrays), output=uri, on_error="skip").run()
    steps = open_dataset(uri).read("steps", ["episode_id", "frame_cam"])
    assert steps.column("episode_id").to_pylist() == [0] * 10 + [2] * 10
    data, camera = frames_of(uri, "cam")
    np.testing.assert_array_equal(
        decode_frames(data, camera), np.concatenate([frames[:10], frames[20:]])
    )


def test_non_uint8_or_four_channel_images_are_refused(tmp_path, capsys):
    frames = scenes(20, 16, 16)
    floats = write_hdf5(tmp_path / "f.h5", flat_arrays(20, [19], frames.astype(np.float32)))
    assert main(["ingest", floats, str(tmp_path / "a")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[1].startswith(
        f"  {floats}: column 'observations': is an image array of shape (20, 16, 16, 3) with "
        "dtype float32; frames must be uint8"
    )
    rgba = np.concatenate([frames, frames[..., :1]], axis=3)
    rgba_file = write_hdf5(tmp_path / "rgba.h5", flat_arrays(20, [19], {"cam": rgba}))
    with pytest.raises(ValidationError, match="'observations/cam': has frames of 4 channels"):
        plan_ingest(rgba_file)
    assert not (tmp_path / "a").exists()


def test_parts_hold_bounded_frames_and_encoding_reads_a_chunk_at_a_time(monkeypatch, tmp_path):
    frames = scenes(60, 20, 20)
    arrays = flat_arrays(60, list(range(4, 60, 5)), frames)  # 12 episodes of 5 steps
    monkeypatch.setattr(images, "IMAGE_PART_BYTES", 12 * 20 * 20 * 3)  # 12 frames a part
    plan = plan_ingest(write_hdf5(tmp_path / "p.h5", arrays))
    # Whole episodes of about 12 frames: a part passes the budget by less than one episode.
    assert [part.steps for part in plan.parts] == [15] * 4
    camera = plan.cameras["observation"]

    reads = []

    def read(first: int, last: int) -> np.ndarray:
        reads.append((first, last))
        return frames[first:last]

    monkeypatch.setattr(images, "IMAGE_CHUNK_BYTES", 7 * 20 * 20 * 3)
    keep = np.ones(30, bool)
    keep[5:10] = False  # an episode left out (--on-error skip)
    encoded = images.encode_rows(read, 20, keep, camera)
    assert max(last - first for first, last in reads) == 7
    expected = np.concatenate([frames[20:25], frames[30:50]])
    np.testing.assert_array_equal(decode_frames(encoded, camera), expected)


# ---------------------------------------------------------------- Minari


def minari_image_dataset(
    tmp_path, monkeypatch, jpeg: bool, dict_observation: bool, data_format: str = "hdf5"
):
    minari = pytest.importorskip("minari")
    import gymnasium as gym
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    rng = np.random.default_rng(0)
    image_space = gym.spaces.Box(0, 255, (40, 48, 3), np.uint8)
    buffers, lengths = [], [6, 9, 4]
    for episode, length in enumerate(lengths):
        pixels = scenes(length + 1, 40, 48, seed=episode)
        observations = (
            {"pixels": pixels, "state": rng.normal(size=(length + 1, 3)).astype(np.float32)}
            if dict_observation
            else pixels
        )
        buffers.append(
            EpisodeBuffer(
                id=episode,
                observations=observations,
                actions=rng.uniform(-1, 1, size=(length, 2)).astype(np.float32),
                rewards=list(rng.normal(size=length)),
                terminations=[False] * (length - 1) + [True],
                truncations=[False] * length,
                infos={},
            )
        )
    space = image_space
    if dict_observation:
        state = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
        space = gym.spaces.Dict({"pixels": image_space, "state": state})
    with pytest.warns(UserWarning):
        minari.create_dataset_from_buffers(
            "test/pixels-v0",
            buffers,
            observation_space=space,
            action_space=gym.spaces.Box(-1, 1, (2,), np.float32),
            jpeg_encoding=jpeg,
            data_format=data_format,
        )
    return tmp_path / "minari" / "test" / "pixels-v0", lengths


@pytest.mark.parametrize("dict_observation", [False, True])
def test_minari_jpeg_frames_are_stored_as_they_came(tmp_path, monkeypatch, dict_observation):
    directory, lengths = minari_image_dataset(tmp_path, monkeypatch, True, dict_observation)
    uri = str(tmp_path / "ds")
    Ingest(input=str(directory), output=uri, part_steps=8).run()
    camera_name = "pixels" if dict_observation else "observation"
    data, camera = frames_of(uri, camera_name)
    assert camera == CameraInfo(height=40, width=48, channels=3, codec="jpeg")
    key = "observations/pixels" if dict_observation else "observations"
    with h5py.File(directory / "data" / "main_data.hdf5") as handle:
        stored = [
            np.asarray(row).tobytes()
            for episode in range(len(lengths))
            for row in handle[f"episode_{episode}/{key}"][:-1]  # the n observations of n steps
        ]
    assert data == stored  # the JPEG bytes Minari wrote, not decoded and re-encoded
    columns = open_dataset(uri).columns()
    assert ("observation" in columns) == dict_observation


def test_a_corrupt_minari_jpeg_names_file_episode_step_and_column(tmp_path, monkeypatch):
    directory, _ = minari_image_dataset(tmp_path, monkeypatch, True, False)
    data_file = directory / "data" / "main_data.hdf5"
    with h5py.File(data_file, "r+") as handle:
        observations = handle["episode_1/observations"]
        assert h5py.check_vlen_dtype(observations.dtype) == np.uint8  # JPEGs of any length
        observations[4] = np.frombuffer(b"\xff\xd8\xff not a whole JPEG", np.uint8)
    with pytest.raises(ValidationError) as caught:
        Ingest(input=str(directory), output=str(tmp_path / "ds")).run()
    assert (
        str(caught.value)
        .splitlines()[1]
        .startswith(
            f"  {data_file}: episode 1, step 4: column 'observations': frame does not decode"
        )
    )
    assert not (tmp_path / "ds").exists()


def test_minari_raw_frames_are_encoded(tmp_path, monkeypatch):
    directory, lengths = minari_image_dataset(tmp_path, monkeypatch, False, False)
    uri = str(tmp_path / "ds")
    Ingest(input=str(directory), output=uri).run()
    data, camera = frames_of(uri, "observation")
    assert camera.codec == "png"
    expected = np.concatenate([scenes(n + 1, 40, 48, seed=e)[:-1] for e, n in enumerate(lengths)])
    np.testing.assert_array_equal(decode_frames(data, camera), expected)


def test_minari_arrow_frames_arrive_decoded_and_are_encoded(tmp_path, monkeypatch):
    minari = pytest.importorskip("minari")
    directory, _ = minari_image_dataset(tmp_path, monkeypatch, True, False, "arrow")
    uri = str(tmp_path / "ds")
    Ingest(input=str(directory), output=uri).run()
    data, camera = frames_of(uri, "observation")
    assert camera.codec == "png"
    expected = np.concatenate(
        [e.observations[:-1] for e in minari.load_dataset("test/pixels-v0").iterate_episodes()]
    )
    np.testing.assert_array_equal(decode_frames(data, camera), expected)  # minari's decoding


def test_minari_frames_of_another_size_name_the_episode(tmp_path):
    data = tmp_path / "mini" / "data"
    data.mkdir(parents=True)
    (data / "metadata.json").write_text(json.dumps({"data_format": "hdf5"}))
    with h5py.File(data / "main_data.hdf5", "w") as handle:
        for episode, size in enumerate([(16, 16), (16, 16), (12, 16)]):
            group = handle.create_group(f"episode_{episode}")
            group["observations"] = np.zeros((5, *size, 3), np.uint8)
            group["actions"] = np.zeros((4, 1), np.float32)
            group["rewards"] = np.zeros(4)
            group["terminations"] = [False, False, False, True]
            group["truncations"] = np.zeros(4, bool)
    with pytest.raises(ValidationError) as caught:
        plan_ingest(str(tmp_path / "mini"))
    assert str(caught.value).splitlines()[1].strip() == (
        f"{data / 'main_data.hdf5'}: episode 2: column 'observations': frames of shape "
        "(12, 16, 3), but the first episode's are (16, 16, 3); every frame of a camera has one size"
    )


# ---------------------------------------------------------------- Parquet image columns


def image_step_table(frames: list[bytes], struct: bool, episodes: int = 4) -> pa.Table:
    length = len(frames) // episodes
    t = np.tile(np.arange(length), episodes)
    rng = np.random.default_rng(3)
    image = (
        pa.array([{"bytes": f, "path": f"frame-{i}.jpg"} for i, f in enumerate(frames)])
        if struct
        else pa.array(frames, pa.binary())
    )
    return pa.table(
        {
            "episode_id": np.repeat(np.arange(episodes), length),
            "t": t,
            "observation": rng.normal(size=(len(frames), 3)).astype(np.float32).tolist(),
            "observation.images.top": image,
            "action": rng.normal(size=(len(frames), 2)).astype(np.float32).tolist(),
            "reward": rng.normal(size=len(frames)),
            "terminated": t == length - 1,
            "truncated": np.zeros(len(frames), bool),
            "blob": pa.array([b"not an image"] * len(frames), pa.binary()),
            "attachment": pa.array([{"bytes": b"\x00\x01", "path": "a.bin"}] * len(frames)),
        }
    )


@pytest.mark.parametrize(("struct", "format"), [(True, "JPEG"), (False, "PNG")])
def test_parquet_image_columns_keep_their_bytes(tmp_path, struct, format):
    frames = [encode(frame, format) for frame in scenes(24, 18, 30)]
    source = tmp_path / "steps.parquet"
    table = image_step_table(frames, struct)
    pq.write_table(table.take(np.random.default_rng(0).permutation(24)), source)  # any order
    uri = str(tmp_path / "ds")
    manifest = Ingest(input=str(source), output=uri, codec="webp").run()  # --codec: raw only
    data, camera = frames_of(uri, "observation_images_top")
    assert data == frames
    assert camera == CameraInfo(height=18, width=30, channels=3, codec=format.lower())
    assert manifest.metadata["frames_from"]["observation_images_top"] == {
        "source": "observation.images.top",
        "encoded_at_ingest": False,
    }
    # Binary columns that are not images stay info columns (a struct of bytes too).
    steps = open_dataset(uri).read("steps", ["observation", "blob", "attachment"])
    assert steps.column("blob").to_pylist() == [b"not an image"] * 24
    assert steps.column("attachment")[0].as_py() == {"bytes": b"\x00\x01", "path": "a.bin"}


def test_an_image_observation_column_is_camera_observation(tmp_path):
    frames = [encode(frame, "PNG") for frame in scenes(12, 10, 10)]
    table = image_step_table(frames, struct=True)
    table = table.drop_columns(["observation", "observation.images.top"])
    table = table.append_column("observation", pa.array(frames, pa.binary()))
    pq.write_table(table, tmp_path / "steps.parquet")
    uri = str(tmp_path / "ds")
    Ingest(input=str(tmp_path / "steps.parquet"), output=uri).run()
    assert "observation" not in open_dataset(uri).columns()
    assert frames_of(uri, "observation")[0] == frames


def test_bad_frames_name_file_episode_step_and_column(tmp_path, capsys):
    frames = [encode(frame, "PNG") for frame in scenes(24, 18, 30)]
    frames[8] = frames[8][: len(frames[8]) // 2]  # episode 1, step 2: cut short
    frames[15] = encode(scenes(1, 12, 30)[0], "PNG")  # episode 2, step 3: another size
    frames[21] = encode(scenes(1, 18, 30)[0], "JPEG")  # episode 3, step 3: another codec
    source = str(tmp_path / "steps.parquet")
    pq.write_table(image_step_table(frames, struct=False), source)
    output = tmp_path / "ds"
    assert main(["ingest", source, str(output)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    column = "column 'observation.images.top'"
    assert lines[1:4] == [
        f"  {source}: episode 1, step 2: {column}: frame does not decode (image file is truncated)",
        f"  {source}: episode 2, step 3: {column}: frame is 30x12, the camera says 30x18 "
        "(every frame of a camera has the size and codec of its first)",
        f"  {source}: episode 3, step 3: {column}: frame is JPEG, the camera says png "
        "(every frame of a camera has the size and codec of its first)",
    ]
    assert not output.exists()

    assert main(["ingest", source, str(output), "--on-error", "skip"]) == 0
    report = json.loads(storage.read_bytes(storage.join(str(output), SKIPPED_REPORT_NAME)))
    assert [(p["episode"], p["step"]) for p in report["skipped"]] == [(1, 2), (2, 3), (3, 3)]
    steps = open_dataset(str(output)).read("steps", ["episode_id", "frame_observation_images_top"])
    assert steps.column("episode_id").to_pylist() == [0] * 6  # the frames stay aligned
    assert steps.column("frame_observation_images_top").to_pylist() == frames[:6]


# ---------------------------------------------------------------- pieces


def test_camera_names_and_codec_sniffing():
    assert images.camera_name("observation.images.top") == "observation_images_top"
    assert images.camera_name("wrist-cam") == "wrist_cam"
    frame = scenes(1, 8, 8)[0]
    assert images.sniff_codec(encode(frame, "PNG")) == "png"
    assert images.sniff_codec(encode(frame, "JPEG")) == "jpeg"
    assert images.sniff_codec(encode(frame, "WEBP")) == "webp"
    assert images.sniff_codec(b"not an image") is None


def test_in_process_and_ray_write_the_same_frames(ray_local, tmp_path):
    arrays = flat_arrays(30, [9, 19, 29], scenes(30, 12, 12))
    plan = plan_ingest(write_hdf5(tmp_path / "x.h5", arrays), part_steps=10, codec="webp")
    ingest(plan, str(tmp_path / "a"), executor=InProcess(), command="t")
    ingest(plan, str(tmp_path / "b"), executor=RayExecutor(), command="t")
    assert frames_of(str(tmp_path / "a"), "observation") == frames_of(
        str(tmp_path / "b"), "observation"
    )
