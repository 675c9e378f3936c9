"""Ingesting LeRobot datasets (v3.0 and v2.1, written by hand: tests/lerobot_datasets.py):
vectors exactly, rewards and flags, task texts, camera frames within the codec's error;
unknown rewards stay unknown; S3 reads like a directory; a dataset whose metadata
disagrees with its files is one line per problem naming file and episode, and nothing is
written, or with --on-error skip a report."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine import storage
from engine.dataset import open_dataset
from engine.executor import InProcess
from engine.ingest import ingest, plan_ingest
from engine.sources import detect_format
from engine.sources.lerobot_meta import read_meta
from engine.validate import ValidationError
from engine.video import VideoError, decode_video_span
from jobs.cli import main
from schemas import lerobot as lr
from schemas.frames import FRAMES_GROUP, decode_frames, frame_column
from schemas.manifest import SKIPPED_REPORT_NAME
from schemas.video import decode_video
from tests import lerobot_datasets as lrd

WRITERS = {"v3.0": lrd.write_v30, "v2.1": lrd.write_v21}
# Mean absolute error of a frame through the video codec (yuv420p chroma subsampling and
# crf 30 on small, smooth frames) and back: measured ~2-5 here; PNG after it is lossless.
VIDEO_MAE = 8.0


def ingested(root: str, output: str, **options) -> tuple[pa.Table, pa.Table]:
    plan = plan_ingest(root, **options)
    ingest(plan, output, executor=InProcess(), command="test")
    dataset = open_dataset(output)
    return dataset.read("steps"), dataset.read("episodes")


def stored_frames(output, camera: str = "top") -> np.ndarray:
    """Every frame of a camera as stored, in step order: decoded from one video per episode
    (a video camera, copied or encoded here) or from one image per step."""
    dataset = open_dataset(str(output))
    info, column = dataset.cameras[camera], frame_column(camera)
    if not info.is_video:
        return decode_frames(dataset.read("steps", [column]).column(column).to_pylist(), info)
    episodes = dataset.read("episodes", ["episode_id", "length", column])
    return np.concatenate(
        [
            decode_video(video, info, f"episode {e}", n)
            for e, n, video in zip(*(episodes.column(c).to_pylist() for c in episodes.column_names))
        ]
    )


def source_span_frames(root: str, data: lrd.LeRobotData) -> np.ndarray:
    """The source's frames of every episode, decoded from its span by the decode path
    (engine/video.py `decode_video_span`): what a copy must reproduce exactly."""
    meta = read_meta(root)
    return np.concatenate(
        [
            decode_video_span(
                meta.uri(span.file), span.start_s, span.start_s + e.length / lrd.FPS, lrd.FPS
            )
            for e in meta.episodes
            for span in [dict(e.videos)[lrd.CAMERA]]
        ]
    )


def vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.flatten().to_numpy().reshape(len(array), -1)


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("version", ["v3.0", "v2.1"])
def test_values_tasks_and_frames_round_trip(tmp_path, version):
    data = lrd.make_data(
        [5, 7, 4],
        camera=(48, 64),
        image_camera=(24, 32),
        environment_state=True,
        several_tasks=True,
    )
    root = WRITERS[version](tmp_path / "src", data)
    assert detect_format(root) == "lerobot"
    steps, episodes = ingested(root, str(tmp_path / "ds"))

    assert steps.column("episode_id").to_pylist() == data.episode_index.tolist()
    assert steps.column("t").to_pylist() == data.frame_index.tolist()
    observation = steps.column("observation").combine_chunks()
    np.testing.assert_array_equal(vectors(observation.field("state")), data.state)
    np.testing.assert_array_equal(
        vectors(observation.field("environment_state")), data.environment_state
    )
    np.testing.assert_array_equal(vectors(steps.column("action")), data.action)
    np.testing.assert_array_equal(steps.column("reward").to_numpy(), data.reward)
    # next.done on the last step: terminated; the last episode has none: truncated.
    ends = np.cumsum(data.lengths) - 1
    terminated = np.zeros(sum(data.lengths), bool)
    terminated[ends[:-1]] = True
    truncated = np.zeros(sum(data.lengths), bool)
    truncated[ends[-1]] = True
    assert steps.column("terminated").to_pylist() == terminated.tolist()
    assert steps.column("truncated").to_pylist() == truncated.tolist()
    np.testing.assert_allclose(
        steps.column("timestamp").to_numpy(), data.frame_index / lrd.FPS, rtol=1e-6
    )
    assert steps.column("frame_index").to_pylist() == data.frame_index.tolist()
    assert steps.column("task").to_pylist() == [data.tasks[i] for i in data.task_index]

    starts = np.cumsum([0, *data.lengths[:-1]])
    returns = [
        data.reward[s : s + n].astype(np.float64).sum() for s, n in zip(starts, data.lengths)
    ]
    np.testing.assert_allclose(episodes.column("return").to_numpy(), returns, rtol=1e-6)
    assert episodes.column("length").to_pylist() == data.lengths
    assert episodes.column("task").to_pylist() == [data.tasks[0], data.tasks[1], data.tasks[0]]
    assert episodes.column("tasks").to_pylist() == [data.episode_tasks(e) for e in range(3)]

    dataset = open_dataset(str(tmp_path / "ds"))
    cameras = next(g for g in dataset.manifest.groups if g.name == FRAMES_GROUP).cameras
    assert set(cameras) == {"top", "wrist"}
    # The video is copied (no --codec): the source's codec, each episode's packets as
    # they came, so the same pixels as decoding the source's spans.
    assert cameras["top"].copied and cameras["top"].codec == lrd.codec_name()
    assert cameras["top"].crf is None and cameras["top"].pix_fmt == "yuv420p"
    origin = dataset.manifest.metadata["frames_from"]["top"]
    assert (origin["copied_episodes"], origin["reencoded_episodes"]) == (3, 0)
    decoded = stored_frames(tmp_path / "ds")
    np.testing.assert_array_equal(decoded, source_span_frames(root, data))
    error = np.abs(decoded.astype(np.int16) - data.video).mean(axis=(1, 2, 3))
    assert error.max() < VIDEO_MAE, error
    # Each step has its own frame: the nearest of all the source frames, not a neighbour.
    every = np.abs(decoded[:, None].astype(np.int16) - data.video[None]).mean(axis=(2, 3, 4))
    assert every.argmin(axis=1).tolist() == list(range(len(decoded)))
    wrist = dataset.read("steps", [frame_column("wrist")]).column(frame_column("wrist"))
    assert wrist.to_pylist() == [lrd.png(frame) for frame in data.images]  # stored as they came
    assert dataset.manifest.metadata["lerobot"]["codebase_version"] == version


def test_one_vector_observation_no_reward_no_done(tmp_path):
    data = lrd.make_data([3, 6], reward=False, done=False)
    steps, episodes = ingested(lrd.write_v30(tmp_path / "src", data), str(tmp_path / "ds"))
    np.testing.assert_array_equal(vectors(steps.column("observation")), data.state)
    assert steps.column("reward").null_count == steps.num_rows  # unknown, not zero
    assert episodes.column("return").null_count == 2
    assert steps.column("terminated").to_pylist() == [False] * 9
    assert np.flatnonzero(steps.column("truncated").to_numpy()).tolist() == [2, 8]
    assert "tasks" not in episodes.column_names  # every episode has one task
    assert open_dataset(str(tmp_path / "ds")).manifest.metadata["reward"] == "absent"


def test_several_files_and_parts_in_ray_tasks(ray_local, tmp_path):
    from jobs.runtime import RayExecutor

    data = lrd.make_data([4, 9, 3, 6, 5], camera=(32, 32))
    root = lrd.write_v30(tmp_path / "src", data, episodes_per_file=2)  # 3 data and MP4 files
    plan = plan_ingest(root, part_steps=10)
    assert len(plan.parts) > 1
    assert [e.index for p in plan.parts for e in p.episodes] == [0, 1, 2, 3, 4]
    assert {e.data_file for p in plan.parts for e in p.episodes} == {
        f"data/chunk-000/file-00{i}.parquet" for i in range(3)
    }
    ingest(plan, str(tmp_path / "ray"), executor=RayExecutor(), command="test")
    in_process = ingested(root, str(tmp_path / "local"), part_steps=10)
    ray = open_dataset(str(tmp_path / "ray"))
    assert ray.read("steps").equals(in_process[0])  # the same bytes either way
    assert ray.read("episodes").equals(open_dataset(str(tmp_path / "local")).read("episodes"))
    np.testing.assert_array_equal(vectors(in_process[0].column("action")), data.action)
    frames = stored_frames(tmp_path / "local")
    np.testing.assert_array_equal(frames, source_span_frames(root, data))
    assert np.abs(frames.astype(np.int16) - data.video).mean(axis=(1, 2, 3)).max() < VIDEO_MAE


def test_ingest_from_s3(s3_bucket, tmp_path):
    data = lrd.make_data([5, 4], camera=(32, 32))
    local = lrd.write_v30(tmp_path / "src", data)
    uri = lrd.upload(local, f"{s3_bucket}/lerobot/pusht")
    assert detect_format(uri) == "lerobot"
    assert main(["ingest", uri, str(tmp_path / "ds"), "--format", "lerobot"]) == 0
    assert main(["ingest", local, str(tmp_path / "local")]) == 0
    from_s3, local_copy = open_dataset(str(tmp_path / "ds")), open_dataset(str(tmp_path / "local"))
    for table in ("steps", "episodes"):
        columns = [c for c in local_copy.read(table).column_names if c != "source"]
        assert from_s3.read(table, columns).equals(local_copy.read(table, columns))


def test_decode_video_span_is_frame_accurate(tmp_path):
    frames = lrd.scenes(12, 32, 48)
    path = str(tmp_path / "v.mp4")
    lrd.write_video(path, frames, fps=10)
    span = decode_video_span(path, 0.3, 0.8, 10)
    assert span.shape == (5, 32, 48, 3)
    errors = [np.abs(span[i].astype(int) - frames[j]).mean() for i in range(5) for j in range(12)]
    nearest = np.asarray(errors).reshape(5, 12).argmin(axis=1)
    assert nearest.tolist() == [3, 4, 5, 6, 7]
    with pytest.raises(VideoError, match=r"v\.mp4: has no frame at 1\.200s"):
        decode_video_span(path, 1.0, 1.4, 10)


def test_info_model_templates():
    info = lr.LeRobotInfo.new(30, {"action": {"dtype": "float32", "shape": [2]}})
    assert info.data_file(chunk_index=1, file_index=12) == "data/chunk-001/file-012.parquet"
    assert "task_index" in info.features and info.video_path is None
    old = lr.LeRobotInfo.new(
        30, {"observation.images.top": {"dtype": "video", "shape": [8, 8, 3]}}, version="v2.1"
    )
    assert old.data_file(episode_index=1234) == "data/chunk-001/episode_001234.parquet"
    assert (
        old.video_file("observation.images.top", episode_index=7)
        == "videos/chunk-000/observation.images.top/episode_000007.mp4"
    )
    assert lr.format_path("a/{x:02d}/{y}", x=3, y="b", unused=1) == "a/03/b"
    with pytest.raises(ValueError, match="needs y"):
        lr.format_path("{x}{y}", x=1)


# ---------------------------------------------------------------- bad input


def _fails(root: str, output, capsys) -> list[str]:
    assert main(["ingest", root, str(output)]) != 0
    assert not os.path.exists(output)
    return capsys.readouterr().err.strip().splitlines()


def test_unknown_codebase_version(tmp_path, capsys):
    root = lrd.write_v30(tmp_path / "src", lrd.make_data([3]))
    info_path = os.path.join(root, lr.INFO_PATH)
    info = json.load(open(info_path))
    json.dump(info | {"codebase_version": "v1.6"}, open(info_path, "w"))
    lines = _fails(root, tmp_path / "ds", capsys)
    assert lines[1] == (
        f"  {info_path}: column 'codebase_version': unsupported codebase_version 'v1.6'; "
        "hindsight reads v3.0 and v2.1"
    )


def test_missing_data_file(tmp_path, capsys):
    root = lrd.write_v21(tmp_path / "src", lrd.make_data([3, 4, 5]))
    missing = os.path.join(root, "data/chunk-000/episode_000001.parquet")
    os.remove(missing)
    lines = _fails(root, tmp_path / "ds", capsys)
    assert lines[1] == f"  {missing}: episode 1: column 'data': is missing"
    assert len(lines) == 3  # the header, the problem, the --on-error skip hint


def test_frame_count_disagrees(tmp_path, capsys):
    root = lrd.write_v30(tmp_path / "src", lrd.make_data([3, 4, 5]))
    episodes_file = os.path.join(root, "meta/episodes/chunk-000/file-000.parquet")
    table = pq.read_table(episodes_file)
    lengths = table.column("length").to_pylist()
    lengths[2] = 6
    pq.write_table(table.set_column(2, "length", pa.array(lengths)), episodes_file)
    lines = _fails(root, tmp_path / "ds", capsys)
    data_file = os.path.join(root, "data/chunk-000/file-000.parquet")
    assert lines[1] == (
        f"  {data_file}: episode 2: column 'episode_index': has 5 rows of the episode, "
        "meta/episodes says length 6"
    )


@pytest.mark.parametrize("version", ["v3.0", "v2.1"])
def test_video_shorter_than_its_episode(tmp_path, capsys, version):
    data = lrd.make_data([3, 4, 5], camera=(16, 16))
    root = WRITERS[version](tmp_path / "src", data)
    if version == "v3.0":
        video = os.path.join(root, "videos", lrd.CAMERA, "chunk-000/file-000.mp4")
        lrd.write_video(video, data.video[:10])  # the last episode needs frames 7..11
        message = (
            "holds 10 frames, the episode's span needs frames up to 1.200s (7 + 5): the video "
            "is shorter than its episode"
        )
    else:
        video = os.path.join(root, "videos/chunk-000", lrd.CAMERA, "episode_000002.mp4")
        lrd.write_video(video, data.video[7:10])
        message = (
            "holds 3 frames, the episode's span needs frames up to 0.500s (0 + 5): the video "
            "is shorter than its episode"
        )
    lines = _fails(root, tmp_path / "ds", capsys)
    assert lines[1] == f"  {video}: episode 2: column '{lrd.CAMERA}': {message}"

    assert main(["ingest", root, str(tmp_path / "ds"), "--on-error", "skip"]) == 0
    report = json.loads(storage.read_bytes(str(tmp_path / "ds" / SKIPPED_REPORT_NAME)))
    assert report["skipped_episodes"] == 1
    assert report["skipped"][0]["episode"] == 2 and report["skipped"][0]["file"] == video
    steps = open_dataset(str(tmp_path / "ds")).read("steps", ["episode_id", "action"])
    assert steps.column("episode_id").to_pylist() == [0] * 3 + [1] * 4
    np.testing.assert_array_equal(vectors(steps.column("action")), data.action[:7])


def test_missing_video_file_is_skipped_with_a_report(tmp_path, capsys):
    data = lrd.make_data([3, 4], camera=(16, 16))
    root = lrd.write_v21(tmp_path / "src", data)
    video = os.path.join(root, "videos/chunk-000", lrd.CAMERA, "episode_000000.mp4")
    os.remove(video)
    lines = _fails(root, tmp_path / "ds", capsys)
    assert lines[1] == f"  {video}: episode 0: column '{lrd.CAMERA}': is missing"
    assert main(["ingest", root, str(tmp_path / "ds"), "--on-error", "skip"]) == 0
    steps = open_dataset(str(tmp_path / "ds")).read("steps", ["episode_id"])
    assert steps.column("episode_id").to_pylist() == [1] * 4
    assert len(stored_frames(tmp_path / "ds")) == 4


def test_not_a_lerobot_dataset(tmp_path):
    os.makedirs(tmp_path / "empty" / "meta")
    with pytest.raises(ValueError, match=r"not a LeRobot dataset \(meta/info.json is missing\)"):
        plan_ingest(str(tmp_path / "empty"), format="lerobot")
    shutil.rmtree(tmp_path / "empty")


def _skipped(root: str, output, *options: str) -> tuple[dict, pa.Table]:
    """Ingest with --on-error skip: the skipped report and the steps written."""
    assert main(["ingest", root, str(output), "--on-error", "skip", *options]) == 0
    report = json.loads(storage.read_bytes(str(output / SKIPPED_REPORT_NAME)))
    return report, open_dataset(str(output)).read("steps")


def _data_file(root: str, version: str, episode: int) -> str:
    """Episode `episode`'s data file: v2.1 one per episode; v3.0 written with
    episodes_per_file=1 (one per episode too, so one can be damaged alone)."""
    if version == "v2.1":
        return os.path.join(root, f"data/chunk-000/episode_{episode:06d}.parquet")
    return os.path.join(root, f"data/chunk-000/file-{episode:03d}.parquet")


def _video_file(root: str, version: str, episode: int) -> str:
    if version == "v2.1":
        return os.path.join(root, "videos/chunk-000", lrd.CAMERA, f"episode_{episode:06d}.mp4")
    return os.path.join(root, "videos", lrd.CAMERA, f"chunk-000/file-{episode:03d}.mp4")


def _write(version: str, root, data: lrd.LeRobotData) -> str:
    if version == "v2.1":
        return lrd.write_v21(root, data)
    return lrd.write_v30(root, data, episodes_per_file=1)


@pytest.mark.parametrize("version", ["v3.0", "v2.1"])
def test_unknown_task_index_fails_or_skips_the_episode(tmp_path, capsys, version):
    data = lrd.make_data([3, 4, 2])
    root = _write(version, tmp_path / "src", data)
    data_file = _data_file(root, version, 1)
    lrd.set_task_index(data_file, {1: 9})  # episode 1, step 1
    lines = _fails(root, tmp_path / "ds", capsys)
    assert lines[1] == (
        f"  {data_file}: episode 1, step 1: column 'task_index': task 9 is not in the "
        "dataset's task table"
    )
    report, steps = _skipped(root, tmp_path / "skip")
    assert [(p["episode"], p["step"], p["column"]) for p in report["skipped"]] == [
        (1, 1, "task_index")
    ]
    assert steps.column("episode_id").to_pylist() == [0] * 3 + [2] * 2
    np.testing.assert_array_equal(vectors(steps.column("action")), data.action[[0, 1, 2, 7, 8]])


def test_a_task_index_changed_after_the_plan_is_left_out_by_its_part(tmp_path):
    data = lrd.make_data([3, 4, 2])
    root = lrd.write_v21(tmp_path / "src", data)
    plan = plan_ingest(root, on_error="skip", part_steps=100)
    lrd.set_task_index(_data_file(root, "v2.1", 2), {0: 7})  # seen only when read
    ingest(plan, str(tmp_path / "ds"), executor=InProcess(), command="test")
    report = json.loads(storage.read_bytes(str(tmp_path / "ds" / SKIPPED_REPORT_NAME)))
    assert [(p["episode"], p["step"], p["column"]) for p in report["skipped"]] == [
        (2, 0, "task_index")
    ]
    steps = open_dataset(str(tmp_path / "ds")).read("steps", ["episode_id"])
    assert steps.column("episode_id").to_pylist() == [0] * 3 + [1] * 4
    with pytest.raises(ValidationError, match="episode 2, step 0: column 'task_index'"):
        plan = replace(plan, on_error="fail")
        ingest(plan, str(tmp_path / "fail"), executor=InProcess(), command="test")
    assert not (tmp_path / "fail").exists()


@pytest.mark.parametrize("version", ["v3.0", "v2.1"])
def test_timestamps_past_the_videos_end(tmp_path, capsys, version):
    data = lrd.make_data([3, 4, 5], camera=(16, 16))
    root = _write(version, tmp_path / "src", data)
    data_file = _data_file(root, version, 1)
    lrd.set_timestamps(data_file, {3: 0.5})  # step 3 asks for frame 5 of a 4-frame video
    lines = _fails(root, tmp_path / "ds", capsys)
    video = _video_file(root, version, 1)
    assert lines[1] == (
        f"  {data_file}: episode 1, step 3: column 'timestamp': 0.500s needs frame 5 of "
        f"{video} ({lrd.CAMERA}), which holds 4 frames: the video is shorter than the "
        "episode's timestamps"
    )
    report, steps = _skipped(root, tmp_path / "skip")
    assert [(p["episode"], p["file"]) for p in report["skipped"]] == [(1, data_file)]
    assert steps.column("episode_id").to_pylist() == [0] * 3 + [2] * 5
    # A negative timestamp is refused the same way.
    lrd.set_timestamps(data_file, {3: 0.3, 2: -0.1})
    lines = _fails(root, tmp_path / "neg", capsys)
    assert lines[1] == (
        f"  {data_file}: episode 1, step 2: column 'timestamp': timestamp "
        f"{np.float32(-0.1).item()} is not a time >= 0"
    )


@pytest.mark.parametrize("version", ["v3.0", "v2.1"])
def test_damaged_video_fails_or_skips_its_episode_whatever_the_part_size(tmp_path, capsys, version):
    data = lrd.make_data([3, 4, 5, 4], camera=(16, 16))
    root = _write(version, tmp_path / "src", data)
    video = _video_file(root, version, 2)
    lrd.damage_video(video)
    plan_ingest(root, on_error="fail")  # its header reads: only decoding finds it
    lines = _fails(root, tmp_path / "ds", capsys)
    assert lines[1].startswith(f"  {video}: episode 2: column '{lrd.CAMERA}': ")
    assert "the video does not decode" in lines[1] or "has no frame at" in lines[1]
    assert len(lines) == 3  # the header, the problem, the --on-error skip hint

    runs = {}
    for part_steps in ("1", "5", "1000"):
        runs[part_steps] = _skipped(
            root, tmp_path / f"skip{part_steps}", "--part-steps", part_steps
        )
    report, steps = runs["1000"]
    assert report["skipped_episodes"] == 1
    assert report["skipped"][0]["file"] == video and report["skipped"][0]["episode"] == 2
    assert report["skipped"][0]["column"] == lrd.CAMERA
    assert steps.column("episode_id").to_pylist() == [0] * 3 + [1] * 4 + [3] * 4
    kept = np.r_[0:7, 12:16]
    np.testing.assert_array_equal(vectors(steps.column("action")), data.action[kept])
    decoded = stored_frames(tmp_path / "skip1000")
    error = np.abs(decoded.astype(np.int16) - data.video[kept]).mean(axis=(1, 2, 3))
    assert error.max() < VIDEO_MAE
    for other_report, other_steps in runs.values():  # the same rows and report
        assert other_steps.equals(steps)
        assert other_report == report


def test_bad_episodes_on_s3_are_skipped_with_a_report(s3_bucket, tmp_path, capsys):
    data = lrd.make_data([3, 4, 5, 4], camera=(16, 16))
    local = lrd.write_v21(tmp_path / "src", data)
    lrd.damage_video(_video_file(local, "v2.1", 1))  # found when its part is decoded
    lrd.set_task_index(_data_file(local, "v2.1", 3), {2: 5})  # found by the plan
    uri = lrd.upload(local, f"{s3_bucket}/lerobot/bad")
    lines = _fails(uri, tmp_path / "ds", capsys)
    assert lines[1] == (
        f"  {uri}/data/chunk-000/episode_000003.parquet: episode 3, step 2: column "
        "'task_index': task 5 is not in the dataset's task table"
    )
    report, steps = _skipped(uri, tmp_path / "skip", "--format", "lerobot")
    assert [(p["episode"], p["column"]) for p in report["skipped"]] == [
        (3, "task_index"),
        (1, lrd.CAMERA),
    ]
    assert report["skipped"][1]["file"] == _video_file(uri, "v2.1", 1)
    assert steps.column("episode_id").to_pylist() == [0] * 3 + [2] * 5
    np.testing.assert_array_equal(vectors(steps.column("action")), data.action[np.r_[0:3, 7:12]])


def test_a_steps_frame_is_the_one_nearest_its_timestamp(tmp_path):
    data = lrd.make_data([5, 3], camera=(32, 32))
    root = lrd.write_v21(tmp_path / "src", data)
    path = os.path.join(root, "data/chunk-000/episode_000000.parquet")
    table = pq.read_table(path)
    stamps = pa.array([0.0, 0.1, 0.2, 0.21, 0.4], pa.float32())  # step 3 repeats frame 2
    pq.write_table(
        table.set_column(table.schema.get_field_index("timestamp"), "timestamp", stamps), path
    )
    for codec in ("png", None):  # decoded per step; or, copying, that episode re-encoded
        ingested(root, str(tmp_path / f"ds-{codec}"), codec=codec)
        decoded = stored_frames(tmp_path / f"ds-{codec}")[:5]
        every = np.abs(decoded[:, None].astype(np.int16) - data.video[None, :5]).mean(
            axis=(2, 3, 4)
        )
        assert every.argmin(axis=1).tolist() == [0, 1, 2, 2, 4]
    origin = open_dataset(str(tmp_path / "ds-None")).manifest.metadata["frames_from"]["top"]
    assert origin["copied_episodes"] == 1 and origin["reencoded"] == [
        {"episode": 0, "why": "its steps' timestamps are not one frame apart from 0"}
    ]


def test_long_episodes_are_decoded_a_window_at_a_time(tmp_path, monkeypatch):
    import engine.sources.lerobot_video as source

    data = lrd.make_data([11, 7], camera=(32, 32))
    root = lrd.write_v30(tmp_path / "src", data)
    whole, _ = ingested(root, str(tmp_path / "whole"), codec="png")
    monkeypatch.setattr(source, "chunk_rows", lambda camera: 3)  # windows of 3 frames
    windows, _ = ingested(root, str(tmp_path / "windows"), codec="png")
    column = frame_column("top")
    assert windows.column(column).to_pylist() == whole.column(column).to_pylist()


def test_map_names_the_reward_feature(tmp_path, capsys):
    data = lrd.make_data([3, 4], reward=False)
    data.extra["complementary_info.reward"] = np.arange(7, dtype=np.float32) / 2
    root = lrd.write_v30(tmp_path / "src", data)
    steps, episodes = ingested(
        root, str(tmp_path / "ds"), column_map={"reward": "complementary_info.reward"}
    )
    assert steps.column("reward").to_pylist() == (np.arange(7) / 2).tolist()
    assert episodes.column("return").to_pylist() == [1.5, 9.0]
    assert "complementary_info.reward" not in steps.column_names
    # Without --map the feature is a step column of its own and the reward is unknown.
    steps, _ = ingested(root, str(tmp_path / "plain"))
    assert steps.column("reward").null_count == 7
    assert steps.column("complementary_info.reward").to_pylist() == (np.arange(7) / 2).tolist()
    assert main(["ingest", root, str(tmp_path / "bad"), "--map", "reward=next.rewards"]) != 0
    info = os.path.join(root, lr.INFO_PATH)
    assert capsys.readouterr().err.splitlines()[1] == (
        f"  {info}: column 'features': has no feature 'next.rewards' (--map reward=next.rewards)"
    )


def test_several_observation_vectors_shard_side_by_side(tmp_path):
    """LeRobot's `observation.state` and `observation.environment_state` become a struct
    without an `observation` member: the shards' state vector is both, in field order."""
    data = lrd.make_data([5, 7], environment_state=True)
    src = lrd.write_v30(tmp_path / "src", data)
    assert main(["ingest", src, str(tmp_path / "ds"), "--format", "lerobot"]) == 0
    out = str(tmp_path / "shards")
    assert main(["shard", str(tmp_path / "ds"), out, "--window", "2"]) == 0
    with open(f"{out}/index.json") as file:
        index = json.load(file)
    both = np.concatenate([data.state, data.environment_state], axis=1).astype(np.float64)
    assert index["observation"]["shape"] == [7]
    np.testing.assert_allclose(index["observation"]["mean"], both.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(index["observation"]["std"], both.std(axis=0), rtol=1e-5)


def test_ingest_help_names_lerobot(capsys):
    with pytest.raises(SystemExit):
        main(["ingest", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--format lerobot" in out and "a LeRobot dataset directory" in out
    assert "LeRobot: observation, action, reward, terminated name other features" in out


@pytest.mark.parametrize("version", ["v3.0", "v2.1"])
def test_a_vector_of_the_wrong_size_fails_or_skips_its_episode(tmp_path, capsys, version):
    """A ragged `observation.state` row (2 values of 3; another with 4 so that the values
    still divide evenly into rows) would be cut into rows at the wrong places: the row is
    named, and with --on-error skip its episode is left out."""
    data = lrd.make_data([3, 4, 2])
    root = _write(version, tmp_path / "src", data)
    data_file = _data_file(root, version, 1)
    table = pq.read_table(data_file)
    rows = table.column("observation.state").to_pylist()
    rows[2], rows[3] = rows[2][:2], [*rows[3], 0.0]  # episode 1, steps 2 and 3
    index = table.schema.get_field_index("observation.state")
    table = table.set_column(index, "observation.state", pa.array(rows, pa.list_(pa.float32())))
    pq.write_table(table, data_file)
    lines = _fails(root, tmp_path / "ds", capsys)
    assert lines[1] == (
        f"  {data_file}: episode 1, step 2: column 'observation.state': has 2 values, "
        f"{lr.INFO_PATH} says 3"
    )
    report, steps = _skipped(root, tmp_path / "skip")
    assert [(p["episode"], p["step"], p["column"]) for p in report["skipped"]] == [
        (1, 2, "observation.state")
    ]
    keep = np.r_[0:3, 7:9]
    np.testing.assert_array_equal(vectors(steps.column("observation")), data.state[keep])
