"""`hindsight export`: a collected dataset with frames, relabeled with returns, written as
LeRobot v3.0 and as Minari, checked by independent reads (pyarrow, PyAV, h5py through the
real `minari.load_dataset`) against the source, stats recomputed with NumPy."""

from __future__ import annotations

import json
import os
import shutil

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from engine.dataset import open_dataset
from jobs.cli import main
from schemas import steps as cols
from schemas.frames import decode_frame

QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
# Mean absolute pixel error of the decoded video against the source frames (0..255):
# LeRobot's AV1 settings (crf 30) on tiny 32x32 renders of Pendulum (measured: 1.0).
VIDEO_MEAN_ERROR = 3.0


@pytest.fixture(scope="module")
def relabeled(tmp_path_factory):
    """Pendulum, 4 episodes of 30 steps in 2 parts, 32x32 frames, relabeled with returns."""
    root = tmp_path_factory.mktemp("export")
    raw, labeled = str(root / "raw"), str(root / "rl")
    collect = ["collect", "Pendulum-v1", raw, "--episodes", "4", "--max-steps", "30",
               "--noise", "0,0.5", "--frames", "32x32", "--episodes-per-part", "2"]  # fmt: skip
    assert main(collect) == 0
    assert main(["relabel", raw, labeled, "--with", "returns"]) == 0
    return labeled


def source_tables(uri: str) -> tuple[pa.Table, pa.Table]:
    dataset = open_dataset(uri)
    return dataset.read("steps"), dataset.read("episodes")


def source_frames(uri: str) -> np.ndarray:
    dataset = open_dataset(uri)
    camera = dataset.cameras["render"]
    if camera.is_video:  # a LeRobot camera ingested without --codec: copied, one per episode
        from schemas.video import decode_video

        table = dataset.read("episodes", ["length", "frame_render"])
        return np.concatenate(
            [decode_video(v, camera, "render", n) for n, v in zip(*table.to_pydict().values())]
        )
    data = dataset.read("steps", ["frame_render"]).column(0).to_pylist()
    return np.stack([decode_frame(d, camera) for d in data])


def read_data(root: str) -> pa.Table:
    files = sorted(
        os.path.join(d, f) for d, _, names in os.walk(os.path.join(root, "data")) for f in names
    )
    return pa.concat_tables([pq.read_table(f) for f in files])


def decode_mp4(path: str) -> np.ndarray:
    import av

    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def numpy_stats(values: np.ndarray, starts: np.ndarray) -> dict[str, np.ndarray]:
    """The dataset stats LeRobot's aggregation gives, recomputed from all values: exact
    min/max/mean/std, quantiles the min (q <= 50) or max over episodes' exact quantiles."""
    values = values.astype(np.float64).reshape(len(values), -1)
    episodes = [values[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
    expected = {
        "min": values.min(0),
        "max": values.max(0),
        "mean": values.mean(0),
        "std": values.std(0),
        "count": np.array([len(values)]),
    }
    for key, q in QUANTILES.items():
        per_episode = np.stack([np.quantile(e, q, axis=0) for e in episodes])
        expected[key] = per_episode.min(0) if q <= 0.5 else per_episode.max(0)
    return expected


def test_lerobot_export_matches_the_source(relabeled, tmp_path, capsys):
    out = str(tmp_path / "lerobot")
    assert main(["export", relabeled, out, "--format", "lerobot", "--fps", "20"]) == 0
    assert "exported 4 episodes, 120 steps as lerobot" in capsys.readouterr().out
    steps, episodes = source_tables(relabeled)

    info = json.loads(open(os.path.join(out, "meta/info.json")).read())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 20
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (4, 120, 1)
    features = info["features"]
    assert features["observation.state"] == {"dtype": "float32", "shape": [3], "names": None}
    assert features["return_to_go"]["dtype"] == "float32"
    video = features["observation.images.render"]
    assert video["dtype"] == "video" and video["shape"] == [32, 32, 3]
    assert video["info"]["video.codec"] == "av1" and video["info"]["video.pix_fmt"] == "yuv420p"
    assert "instruction" not in features  # text is never a feature

    data = read_data(out)
    assert data.num_rows == 120
    assert set(features) - {"observation.images.render"} == set(data.column_names)
    np.testing.assert_array_equal(
        cols.arrow_to_numpy(data["observation.state"]), cols.arrow_to_numpy(steps["observation"])
    )
    np.testing.assert_array_equal(
        data["action"].to_numpy(), cols.arrow_to_numpy(steps["action"])[:, 0]
    )
    np.testing.assert_array_equal(data["next.reward"].to_numpy(), steps["reward"].to_numpy())
    np.testing.assert_array_equal(data["return_to_go"].to_numpy(), steps["return_to_go"].to_numpy())
    done = steps["terminated"].to_numpy() | steps["truncated"].to_numpy()
    np.testing.assert_array_equal(data["next.done"].to_numpy(), done)
    lengths = episodes["length"].to_numpy()
    starts = np.concatenate([[0], np.cumsum(lengths)])
    np.testing.assert_array_equal(
        data["episode_return"].to_numpy(),
        np.repeat(episodes["episode_return"].to_numpy().astype(np.float32), lengths),
    )
    np.testing.assert_array_equal(data["index"].to_numpy(), np.arange(120))
    np.testing.assert_array_equal(data["episode_index"].to_numpy(), np.repeat(np.arange(4), 30))
    np.testing.assert_array_equal(data["frame_index"].to_numpy(), steps["t"].to_numpy())
    np.testing.assert_allclose(data["timestamp"].to_numpy(), steps["t"].to_numpy() / 20)
    assert set(data["task_index"].to_pylist()) == {0}

    meta = pq.read_table(os.path.join(out, "meta/episodes/chunk-000/file-000.parquet"))
    assert meta["episode_index"].to_pylist() == [0, 1, 2, 3]
    assert meta["length"].to_pylist() == [30] * 4
    assert meta["tasks"].to_pylist() == [["Pendulum-v1"]] * 4
    assert meta["dataset_from_index"].to_pylist() == starts[:-1].tolist()
    assert meta["dataset_to_index"].to_pylist() == starts[1:].tolist()
    assert meta["data/file_index"].to_pylist() == [0, 0, 1, 1]  # one file per source part
    key = "videos/observation.images.render"
    assert meta[f"{key}/from_timestamp"].to_pylist() == [0.0, 1.5, 0.0, 1.5]
    assert meta[f"{key}/to_timestamp"].to_pylist() == [1.5, 3.0, 1.5, 3.0]
    tasks = pd.read_parquet(os.path.join(out, "meta/tasks.parquet"))
    assert tasks.index.name == "task" and tasks.loc["Pendulum-v1", "task_index"] == 0

    # Videos: every source frame, in order, within the codec's error.
    frames = source_frames(relabeled)
    decoded = np.concatenate(
        [
            decode_mp4(os.path.join(out, f"videos/observation.images.render/chunk-000/{f}"))
            for f in ("file-000.mp4", "file-001.mp4")
        ]
    )
    assert decoded.shape == frames.shape
    error = np.abs(decoded.astype(np.int16) - frames.astype(np.int16)).mean()
    assert error < VIDEO_MEAN_ERROR, error

    # Stats, recomputed with NumPy from the source.
    stats = json.loads(open(os.path.join(out, "meta/stats.json")).read())
    checks = {
        "observation.state": cols.arrow_to_numpy(steps["observation"]),
        "action": cols.arrow_to_numpy(steps["action"]),
        "next.reward": steps["reward"].to_numpy(),
        "return_to_go": steps["return_to_go"].to_numpy(),
        "index": np.arange(120),
    }
    for feature, values in checks.items():
        for name, value in numpy_stats(values, starts).items():
            np.testing.assert_allclose(
                stats[feature][name], value, rtol=1e-6, atol=1e-6, err_msg=f"{feature} {name}"
            )
    pixels = frames.reshape(-1, 3).astype(np.float64) / 255
    image = stats["observation.images.render"]
    np.testing.assert_allclose(np.array(image["mean"]).ravel(), pixels.mean(0), rtol=1e-9)
    np.testing.assert_allclose(np.array(image["std"]).ravel(), pixels.std(0), rtol=1e-9)
    assert np.array(image["q50"]).shape == (3, 1, 1) and image["count"] == [120]
    per_episode = [
        np.quantile(frames[a:b].reshape(-1, 3) / 255, 0.01, axis=0)
        for a, b in zip(starts[:-1], starts[1:], strict=True)
    ]
    np.testing.assert_allclose(np.array(image["q01"]).ravel(), np.min(per_episode, 0))
    # Per-episode stats in the episodes table: episode 1's return-to-go mean.
    np.testing.assert_allclose(
        meta["stats/return_to_go/mean"].to_pylist()[1],
        [steps["return_to_go"].to_numpy()[30:60].astype(np.float64).mean()],
        rtol=1e-6,
    )


def test_lerobot_export_round_trips_and_reruns_identically(relabeled, tmp_path):
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    back = str(tmp_path / "back")
    for out in (first, second):
        arguments = ["export", relabeled, out, "--format", "lerobot", "--task-column", "source"]
        assert main(arguments) == 0
    for directory, _, names in os.walk(first):
        for name in names:
            path = os.path.join(directory, name)
            if name != "hindsight.json":  # records the command, with its output path
                other = path.replace(first, second, 1)
                assert open(path, "rb").read() == open(other, "rb").read(), path
    tasks = pd.read_parquet(os.path.join(first, "meta/tasks.parquet"))
    assert list(tasks.index) == ["collect:heuristic"]
    assert main(["export", relabeled, first, "--format", "lerobot"]) == 2  # committed

    # Back in through `ingest --format lerobot`: vectors exactly, frames within the codec.
    assert main(["ingest", first, back, "--format", "lerobot"]) == 0
    steps, _ = source_tables(relabeled)
    again, _ = source_tables(back)
    for column in ("observation", "action", "reward", "return_to_go", "terminated", "truncated"):
        np.testing.assert_array_equal(
            cols.arrow_to_numpy(again[column]), cols.arrow_to_numpy(steps[column]), column
        )
    assert cols.arrow_to_numpy(steps["truncated"]).sum() > 0  # time limits stay time limits
    error = np.abs(source_frames(back).astype(np.int16) - source_frames(relabeled)).mean()
    assert error < VIDEO_MEAN_ERROR


def test_minari_export_loads_with_minari(relabeled, tmp_path, monkeypatch, capsys):
    minari = pytest.importorskip("minari")
    out = str(tmp_path / "datasets" / "hindsight" / "pendulum-rl-v0")
    assert main(["export", relabeled, out, "--format", "minari"]) == 0
    assert "not exported (no place in minari): frame_render" in capsys.readouterr().out
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "datasets"))
    loaded = minari.load_dataset("hindsight/pendulum-rl-v0")
    assert loaded.total_episodes == 4 and loaded.total_steps == 120
    assert loaded.env_spec.id == "Pendulum-v1"
    steps, episodes = source_tables(relabeled)
    observation = cols.arrow_to_numpy(steps["observation"])
    next_observation = cols.arrow_to_numpy(steps["next_observation"])
    for k, episode in enumerate(loaded.iterate_episodes()):
        rows = slice(30 * k, 30 * (k + 1))
        np.testing.assert_array_equal(
            episode.observations,
            np.concatenate([observation[rows], next_observation[rows][-1:]]),
        )
        np.testing.assert_array_equal(episode.actions, cols.arrow_to_numpy(steps["action"])[rows])
        np.testing.assert_array_equal(episode.rewards, steps["reward"].to_numpy()[rows])
        np.testing.assert_array_equal(episode.terminations, steps["terminated"].to_numpy()[rows])
        np.testing.assert_array_equal(episode.truncations, steps["truncated"].to_numpy()[rows])
        # Infos as Minari's collector stores them: the reset's row, then one per step.
        np.testing.assert_array_equal(
            episode.infos["return_to_go"][1:], steps["return_to_go"].to_numpy()[rows]
        )
        assert np.isnan(episode.infos["return_to_go"][0])
    metadata = list(loaded.storage.get_episode_metadata([2]))[0]
    assert metadata["episode_id"] == episodes["episode_id"].to_pylist()[2]
    assert metadata["episode_return"] == episodes["episode_return"].to_pylist()[2]

    # Exported again: the same bytes.
    again = str(tmp_path / "again" / "hindsight" / "pendulum-rl-v0")
    assert main(["export", relabeled, again, "--format", "minari"]) == 0
    for name in ("main_data.hdf5", "metadata.json"):
        assert open(os.path.join(out, "data", name), "rb").read() == (
            open(os.path.join(again, "data", name), "rb").read()
        )


@pytest.mark.parametrize("fmt", ["lerobot", "minari"])
def test_a_failure_mid_export_leaves_nothing(relabeled, tmp_path, fmt, capsys):
    """Part 1's files damaged on disk (same size: the version still opens): part 0 is
    written, part 1 fails to read, and the output is gone."""
    source = os.path.dirname(relabeled)
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    damaged = copy / "raw" / "base" / "steps" / "part-00001.parquet"
    data = bytearray(damaged.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    damaged.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert main(["export", str(copy / "rl"), str(out), "--format", fmt]) != 0
    assert "part-00001.parquet" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_lerobot_export_to_s3_on_ray(relabeled, s3_bucket, ray_local):
    """Parts written by Ray tasks into a bucket (the loopback S3 server)."""
    from pyarrow import fs

    from engine import storage
    from engine.exports.lerobot import export_lerobot
    from engine.exports.lerobot_plan import LeRobotOptions
    from jobs.runtime import RayExecutor

    out = f"{s3_bucket}/exports/pendulum"
    result = export_lerobot(
        open_dataset(relabeled), out, LeRobotOptions(video_codec="h264"), executor=RayExecutor()
    )
    assert (result.episodes, result.steps, result.files) == (4, 120, 9)
    info = json.loads(storage.read_bytes(f"{out}/meta/info.json"))
    assert info["features"]["observation.images.render"]["info"]["video.codec"] == "h264"
    s3, path = storage.filesystem(f"{out}/data/chunk-000/file-001.parquet")
    assert isinstance(s3, fs.S3FileSystem)
    assert pq.read_table(path, filesystem=s3)["index"].to_pylist() == list(range(60, 120))
    assert not storage.exists(f"{out}/_staging")


def step_table_without_rewards(tmp_path) -> str:
    """Ingested from a Parquet step table with no reward and no episode ends, with a
    step-level text column that changes within an episode."""
    steps = pa.table(
        {
            "episode_id": np.repeat([0, 1], 5),
            "t": np.tile(np.arange(5), 2),
            "observation": pa.FixedSizeListArray.from_arrays(
                pa.array(np.arange(20, dtype=np.float32)), 2
            ),
            "action": pa.array(np.arange(10) % 3, pa.int64()),
            "instruction": ["pick", "pick", "place", "place", "place"] + ["pick"] * 5,
        }
    )
    (tmp_path / "table").mkdir()
    pq.write_table(steps, tmp_path / "table" / "steps.parquet")
    uri = str(tmp_path / "norewards")
    assert main(["ingest", str(tmp_path / "table"), uri, "--format", "parquet"]) == 0
    return uri


def test_export_without_rewards_with_a_step_level_task(tmp_path, capsys):
    source = step_table_without_rewards(tmp_path)
    out = str(tmp_path / "lerobot")
    assert main(["export", source, out, "--format", "lerobot", "--task-column", "instruction"]) == 0
    info = json.loads(open(os.path.join(out, "meta/info.json")).read())
    assert "next.reward" not in info["features"] and "return" not in info["features"]
    assert info["features"]["action"] == {"dtype": "int64", "shape": [1], "names": None}
    data = read_data(out)
    assert data["action"].to_pylist() == (np.arange(10) % 3).tolist()
    # No recorded episode ends: each episode is done at its last step.
    assert data["next.done"].to_pylist() == ([False] * 4 + [True]) * 2
    tasks = pd.read_parquet(os.path.join(out, "meta/tasks.parquet"))
    assert tasks["task_index"].to_dict() == {"pick": 0, "place": 1}
    assert data["task_index"].to_pylist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    meta = pq.read_table(os.path.join(out, "meta/episodes/chunk-000/file-000.parquet"))
    assert meta["tasks"].to_pylist() == [["pick", "place"], ["pick"]]
    assert "video_path" in info and info["video_path"] is None

    # Minari keeps n + 1 observations; a log without the observation after the last step
    # (LeRobot's) repeats the last one, and each episode says so.
    minari_out = tmp_path / "minari"
    assert main(["export", source, str(minari_out), "--format", "minari"]) == 0
    import minari

    episodes = list(minari.MinariDataset(str(minari_out / "data")).iterate_episodes())
    observations = np.arange(20, dtype=np.float32).reshape(2, 5, 2)
    for k, episode in enumerate(episodes):
        expected = np.concatenate([observations[k], observations[k][-1:]])
        np.testing.assert_array_equal(episode.observations, expected)
        assert np.isnan(episode.rewards).all() and list(episode.infos["instruction"][1:3]) in (
            [b"pick", b"pick"],
            ["pick", "pick"],
        )
    with h5py.File(minari_out / "data" / "main_data.hdf5") as handle:
        assert handle["episode_0"].attrs["final_observation"].startswith("repeated")


def test_export_options_are_checked_before_any_work(relabeled, tmp_path, capsys):
    out = str(tmp_path / "x")
    cases = {
        ("--format", "lerobot", "--task-column", "noise"): "the task is a text column",
        ("--format", "lerobot", "--task-column", "nope"): "text columns: env_id, source",
        ("--format", "minari", "--fps", "10"): "options of --format lerobot",
        ("--format", "minari", "--dataset-id", "bad id"): "Minari ids are",
        ("--format", "lerobot", "--dataset-id", "a/b-v0"): "option of --format minari",
    }
    for options, message in cases.items():
        assert main(["export", relabeled, out, *options]) != 0
        assert message in capsys.readouterr().err, options
    assert not os.path.exists(out)
    inside = os.path.join(relabeled, "export")
    assert main(["export", relabeled, inside, "--format", "lerobot"]) == 2
    assert "inside input" in capsys.readouterr().err


def test_a_query_subset_exports_with_its_own_episodes(relabeled, tmp_path):
    subset, out = str(tmp_path / "noisy"), str(tmp_path / "lerobot")
    assert main(["query", relabeled, "--where", "noise > 0", "--output", subset]) == 0
    assert main(["export", subset, out, "--format", "lerobot"]) == 0
    steps, _ = source_tables(relabeled)
    noisy = steps.filter(pc.greater(steps["noise"], 0))
    data = read_data(out)
    assert data.num_rows == noisy.num_rows == 60
    np.testing.assert_array_equal(data["return_to_go"].to_numpy(), noisy["return_to_go"].to_numpy())
    np.testing.assert_array_equal(data["episode_index"].to_numpy(), np.repeat([0, 1], 30))
    np.testing.assert_array_equal(data["index"].to_numpy(), np.arange(60))


def test_a_lerobot_dataset_relabeled_goes_back_to_lerobot(tmp_path):
    """The issue's user story: ingest a LeRobot dataset (written by hand following the
    format, tests/lerobot_datasets.py), relabel it, export it: fps, robot type, feature
    names and tasks (without --task-column) carry over, the relabel column is a new feature."""
    from tests.lerobot_datasets import make_data, write_v30

    data = make_data([6, 4, 5], camera=(16, 16), several_tasks=True)
    source = write_v30(tmp_path / "lerobot-in", data, fps=10)
    raw, labeled = str(tmp_path / "raw"), str(tmp_path / "rl")
    out = str(tmp_path / "lerobot-out")
    assert main(["ingest", source, raw, "--format", "lerobot"]) == 0
    assert main(["relabel", raw, labeled, "--with", "returns"]) == 0
    assert main(["export", labeled, out, "--format", "lerobot"]) == 0  # tasks by default
    before = json.loads(open(os.path.join(source, "meta/info.json")).read())
    after = json.loads(open(os.path.join(out, "meta/info.json")).read())
    assert after["fps"] == 10 and after["robot_type"] == before["robot_type"]
    for key in ("observation.state", "action"):
        assert after["features"][key] == before["features"][key], key
    assert after["features"]["return_to_go"]["shape"] == [1]
    frames_in = read_data(source)
    frames_out = read_data(out)
    for key in ("observation.state", "action", "next.reward", "timestamp", "frame_index"):
        assert frames_out[key].to_pylist() == frames_in[key].to_pylist(), key
    tasks_in = pd.read_parquet(os.path.join(source, "meta/tasks.parquet"))
    tasks_out = pd.read_parquet(os.path.join(out, "meta/tasks.parquet"))
    # The hand-written input keeps `task` as a column; LeRobot's writer (and the export)
    # as the pandas index.
    texts_in = tasks_in["task"] if "task" in tasks_in.columns else tasks_in.index
    task_of = dict(zip(tasks_in["task_index"], texts_in, strict=True))
    text_of = dict(zip(tasks_out["task_index"], tasks_out.index, strict=True))
    assert [text_of[i] for i in frames_out["task_index"].to_pylist()] == [
        task_of[i] for i in frames_in["task_index"].to_pylist()
    ]


def test_lerobot_export_names_the_text_columns_it_leaves_out(relabeled, tmp_path, capsys):
    """Text columns are never LeRobot features: the ones that are not the task are listed."""
    out = str(tmp_path / "lerobot")
    assert main(["export", relabeled, out, "--format", "lerobot", "--task-column", "source"]) == 0
    assert (
        "  text columns not exported (one can be the task: --task-column NAME): episodes.env_id"
        in capsys.readouterr().out.splitlines()
    )
