"""Pixels-only data end to end: datasets whose observation is only an image (collect
--pixels-only, ingest of an image-only observation) relabel, shard with a zero-width state
vector, train from frames alone and ask from rendered frames; what needs a state refuses."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from engine.dataset import open_dataset
from jobs.cli import main
from relabelers.base import RelabelError
from relabelers.drex import frame_features
from schemas.frames import CameraInfo, encode_frames
from schemas.shard_index import ShardIndex
from tests.test_frames_ingest import flat_arrays, scenes
from trainers.loader import stream


def run(capsys, *arguments: str) -> None:
    assert main(list(arguments)) == 0, capsys.readouterr().err
    capsys.readouterr()


def fails(capsys, *arguments: str) -> str:
    assert main(list(arguments)) != 0
    return capsys.readouterr().err


@pytest.mark.slow
def test_collect_pixels_only_relabel_shard_train_and_ask(tmp_path, capsys):
    raw, labeled, shards, out = (str(tmp_path / n) for n in ("raw", "rl", "shards", "run"))
    run(capsys, "collect", "Pendulum-v1", raw, "--episodes", "4", "--max-steps", "30",
        "--noise", "0,1", "--frames", "16x16", "--pixels-only")  # fmt: skip
    dataset = open_dataset(raw)
    steps = dataset.columns("steps")
    assert "observation" not in steps and "next_observation" not in steps
    assert "frame_render" in steps and dataset.manifest.metadata["pixels_only"] is True
    assert dataset.read("steps", ["reward"]).num_rows == 4 * 30
    assert main(["info", raw, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pixels_only"] is True

    run(capsys, "relabel", raw, labeled, "--with", "returns", "--with", "language")
    descriptions = open_dataset(labeled).read("episodes", ["description"]).column(0).to_pylist()
    assert len(descriptions) == 4 and all(descriptions)  # described without a state vector
    run(capsys, "shard", labeled, shards, "--condition", "return_to_go", "--window", "4",
        "--frame-stack", "2")  # fmt: skip
    index = ShardIndex.from_json((tmp_path / "shards" / "index.json").read_text())
    assert index.observation.shape == [0] and not index.has_state
    assert sorted(index.cameras) == ["render"] and index.steps == 120

    # The loader yields a zero-width observation next to the frames.
    batch = next(iter(stream(shards, batch_size=8, condition="return_to_go", epochs=1)))
    assert tuple(batch["observation"].shape) == (8, 4, 0)
    assert tuple(batch["frame_render"].shape) == (8, 4, 6, 16, 16)

    run(capsys, "train", shards, out, "--condition", "return_to_go", "--model", "transformer",
        "--steps", "3", "--batch-size", "8", "--d-model", "16", "--n-layer", "1")  # fmt: skip
    model = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert model["frames"]["inputs"] == "frames" and model["observation_dim"] == 0
    error = fails(capsys, "train", shards, str(tmp_path / "r2"), "--condition", "return_to_go",
                  "--inputs", "state", "--steps", "1")  # fmt: skip
    assert "the shards hold no state vector" in error

    assert main(["ask", out, "--request", "return_to_go=-20", "--episodes", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["episodes"] == 2 and result["return_mean"] < 0


def test_image_only_npz_ingest_shards_and_trains(tmp_path, capsys):
    frames = scenes(60, 16, 16)
    arrays = flat_arrays(60, [19, 39, 59], frames)
    np.savez(tmp_path / "pixels.npz", **arrays)
    ds, labeled, shards = (str(tmp_path / n) for n in ("ds", "rl", "shards"))
    run(capsys, "ingest", str(tmp_path / "pixels.npz"), ds)
    run(capsys, "relabel", ds, labeled, "--with", "returns,skill")
    run(capsys, "shard", labeled, shards, "--condition", "return_to_go", "--window", "3")
    index = ShardIndex.from_json((tmp_path / "shards" / "index.json").read_text())
    assert index.observation.shape == [0] and list(index.cameras) == ["observation"]
    assert index.action.dim == 2 and index.steps == 60

    batch = next(iter(stream(shards, batch_size=60, condition="return_to_go", epochs=1)))
    assert tuple(batch["observation"].shape) == (60, 3, 0)
    # Each window's last frame is the ingested image of its step (PNG: lossless).
    last = batch["frame_observation"][:, -1].permute(0, 2, 3, 1).numpy()
    episode_starts = np.array([0, 20, 40])
    rows = episode_starts[batch["episode_id"].numpy()] + batch["timestep"][:, -1].numpy()
    np.testing.assert_array_equal(last, frames[rows])

    out = str(tmp_path / "run")
    run(capsys, "train", shards, out, "--condition", "return_to_go", "--steps", "2",
        "--batch-size", "8", "--frame-encoder", "resnet")  # fmt: skip
    model = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert model["frames"]["inputs"] == "frames"
    assert list(model["frames"]["cameras"]) == ["observation"]


def test_what_needs_a_state_refuses_pixels_only_data(tmp_path, capsys):
    error = fails(capsys, "collect", "Pendulum-v1", str(tmp_path / "x"), "--pixels-only")
    assert "--pixels-only needs --frames HxW" in error and not (tmp_path / "x").exists()

    raw = str(tmp_path / "raw")
    run(capsys, "collect", "Pendulum-v1", raw, "--episodes", "4", "--max-steps", "10",
        "--noise", "0,1", "--frames", "16x16", "--pixels-only")  # fmt: skip
    for relabeler in ("goals", "drex"):
        error = fails(capsys, "relabel", raw, str(tmp_path / relabeler), "--with", relabeler)
        assert len(error.strip().splitlines()) == 1, error
        assert "the dataset is pixels only (no state vector" in error
        assert "camera(s) render" in error and not (tmp_path / relabeler).exists()
        assert "--with drex:features=frame_render" in error
    # drex ranks pixels-only data from its frames.
    labeled = str(tmp_path / "drex")
    run(capsys, "relabel", raw, labeled, "--with", "drex:features=frame_render,epochs=2")
    rewards = open_dataset(labeled).read("steps", ["drex_reward"]).column(0).to_numpy()
    assert rewards.shape == (40,) and np.isfinite(rewards).all()

    error = fails(capsys, "shard", raw, str(tmp_path / "s"), "--cameras", "nope")
    assert "nope" in error and not (tmp_path / "s").exists()


def test_drex_frame_features_are_grey_8x8_block_means(tmp_path):
    frames = scenes(5, 16, 32)
    column = pa.chunked_array([encode_frames(frames, CameraInfo(height=16, width=32))])
    steps = pa.table({"episode_id": np.zeros(5, np.int64), "t": np.arange(5, dtype=np.int32)})
    features = frame_features(column, "frame_render", steps)
    # ITU-R 601 luma (PIL's "L"), then the mean of each 2 x 4 block.
    grey = frames.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    expected = grey.reshape(5, 8, 2, 8, 4).mean(axis=(2, 4)).reshape(5, 64) / 255.0
    np.testing.assert_allclose(features, expected, atol=1.5 / 255)

    broken = pa.chunked_array([[b"not an image"] * 5])
    with pytest.raises(
        RelabelError, match="episode 0 step t=0: column 'frame_render': frame does not decode"
    ):
        frame_features(broken, "frame_render", steps)


def test_the_index_allows_no_state_vector_only_with_cameras(tmp_path, capsys):
    raw, shards = str(tmp_path / "raw"), str(tmp_path / "shards")
    run(capsys, "collect", "Pendulum-v1", raw, "--episodes", "1", "--max-steps", "5",
        "--frames", "16x16", "--pixels-only")  # fmt: skip
    error = fails(capsys, "shard", raw, shards, "--cameras", "")
    assert "has no state vector" in error and not (tmp_path / "shards").exists()
    run(capsys, "shard", raw, shards)
    data = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert ShardIndex.model_validate(data).has_state is False
    del data["cameras"]
    with pytest.raises(ValueError, match=r"\['observation.shape'\] must be at least 1"):
        ShardIndex.model_validate(data)
