"""Frames, the data side: `collect --frames` records each step's rendered frame in a frames
group; scans, queries and relabelers never read it unless asked; query --output and
materialize carry it; info shows the cameras; view draws an episode's contact sheet."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import engine
from engine.collect import Rollouts, collect, make_env, plan_collect
from engine.dataset import DatasetError, open_dataset
from engine.executor import InProcess
from engine.frames import render_frame
from engine.info import dataset_info
from engine.materialize import materialize
from engine.query import count, query, write_subset
from engine.view import MIN_TILE_WIDTH, ViewError, episode_frames
from jobs.cli import main
from jobs.commands.relabel import Relabel
from jobs.runtime import RayExecutor
from schemas import steps as cols
from schemas.frames import FRAMES_GROUP, CameraInfo, decode_frames

CAMERA = CameraInfo(height=16, width=16, codec="png")
EPISODES = 6


def collect_frames(
    output: Path, executor=None, episodes_per_part: int = 2, env_id: str = "Pendulum-v1", **frames
) -> None:
    rollouts = Rollouts(
        env_id,
        noise_levels=(0.0, 1.0),
        seed=3,
        max_steps=12,
        frames=CameraInfo(**{**CAMERA.model_dump(), **frames}),
    )
    plan = plan_collect(rollouts, EPISODES, episodes_per_part)
    collect(plan, str(output), executor=executor or InProcess(), command="test")


@pytest.fixture(scope="module")
def pixels(tmp_path_factory) -> str:
    """6 Pendulum episodes of 12 steps with 16x16 PNG frames, in 3 parts."""
    output = tmp_path_factory.mktemp("frames") / "pix"
    collect_frames(output)
    return str(output)


def frames_of(uri: str, camera: str = "render") -> np.ndarray:
    """Every stored frame of a camera, decoded, in row order."""
    column = f"frame_{camera}"
    data = engine.scan(uri, frames=True).select(column).collect()[column].to_list()
    return decode_frames(data, open_dataset(uri).cameras[camera])


def sha256s(uri: str, group: str) -> list[str]:
    return [f.sha256 for f in open_dataset(uri).manifest.group(group).steps_files]


# ---------------------------------------------------------------- collect --frames


def test_each_frame_is_the_render_of_the_observation_at_its_step(pixels):
    steps = engine.scan(pixels).collect()
    frames = frames_of(pixels)
    assert frames.shape == (steps.height, 16, 16, 3) and frames.dtype == np.uint8
    # Independently: put the env in each stored state (angle from cos/sin, the previous
    # step's torque drawn as the arrow) and render it the same way.
    env = make_env("Pendulum-v1", render_mode="rgb_array")
    env.reset(seed=0)
    observation = np.stack(steps[cols.OBSERVATION].to_numpy())
    next_observation = np.stack(steps[cols.NEXT_OBSERVATION].to_numpy())
    actions = np.stack(steps[cols.ACTION].to_numpy())[:, 0]
    t = steps[cols.T].to_numpy()

    def render(states: np.ndarray, arrows: list) -> np.ndarray:
        rendered = []
        for state, arrow in zip(states, arrows):
            env.unwrapped.state = np.array([np.arctan2(state[1], state[0]), state[2]])
            env.unwrapped.last_u = arrow
            rendered.append(render_frame(env, 16, 16))
        return np.stack(rendered).astype(int)

    at_t = render(observation, [None if t[i] == 0 else actions[i - 1] for i in range(len(t))])
    after_t = render(next_observation, list(actions))
    env.close()
    error_at_t = np.abs(at_t - frames).mean(axis=(1, 2, 3))
    error_after_t = np.abs(after_t - frames).mean(axis=(1, 2, 3))
    assert np.mean(error_at_t == 0) > 0.9 and error_at_t.max() < 1.0
    assert error_after_t.mean() > 10 * max(error_at_t.mean(), 0.01)


def test_pendulum_no_arrow_is_pendulum_without_the_previous_torque_in_its_frames(pixels, tmp_path):
    """`hindsight/PendulumNoArrow-v1` collects the same steps as Pendulum-v1 (same seeds,
    policy and noise), and each frame is Pendulum-v1's render of the same state with no
    torque arrow, where Pendulum-v1's frames show the step before's torque."""
    collect_frames(tmp_path / "plain", env_id="hindsight/PendulumNoArrow-v1")
    arrow, plain = engine.scan(pixels).collect(), engine.scan(str(tmp_path / "plain")).collect()
    for column in (cols.OBSERVATION, cols.ACTION, cols.REWARD, cols.NEXT_OBSERVATION):
        assert arrow[column].to_list() == plain[column].to_list()
    env = make_env("Pendulum-v1", render_mode="rgb_array")
    env.reset(seed=0)
    expected = []
    for state in np.stack(plain[cols.OBSERVATION].to_numpy()):
        env.unwrapped.state = np.array([np.arctan2(state[1], state[0]), state[2]])
        env.unwrapped.last_u = None
        expected.append(render_frame(env, 16, 16))
    env.close()
    no_arrow = frames_of(str(tmp_path / "plain"))
    assert np.abs(no_arrow.astype(int) - np.stack(expected)).max() <= 1  # resize rounding
    moved = plain[cols.T].to_numpy() > 0  # after reset Pendulum-v1 draws no arrow either
    assert np.array_equal(no_arrow[~moved], frames_of(pixels)[~moved])
    assert (no_arrow[moved] != frames_of(pixels)[moved]).any(axis=(1, 2, 3)).mean() > 0.9


def test_a_grayscale_camera_stores_the_luma_of_the_rgb_frames(pixels, tmp_path, capsys):
    """`collect --channels 1`: the same renders, one channel each (Pillow's luma of the
    RGB frame, computed here independently with the ITU-R 601-2 weights)."""
    assert main(["collect", "Pendulum-v1", str(tmp_path / "gray"), "--episodes", "6",
                 "--noise", "0,1", "--seed", "3", "--max-steps", "12", "--frames", "16x16",
                 "--channels", "1", "--episodes-per-part", "2"]) == 0  # fmt: skip
    gray = str(tmp_path / "gray")
    assert open_dataset(gray).cameras["render"].channels == 1
    stored, rgb = frames_of(gray), frames_of(pixels).astype(np.float64)
    assert stored.shape == (72, 16, 16, 1)
    luma = rgb[..., 0] * 299 / 1000 + rgb[..., 1] * 587 / 1000 + rgb[..., 2] * 114 / 1000
    assert np.abs(stored[..., 0] - luma).max() <= 1.0
    assert main(["collect", "Pendulum-v1", str(tmp_path / "x"), "--channels", "1"]) == 2
    assert "--channels need --frames HxW" in capsys.readouterr().err


def test_frames_group_is_aligned_and_the_manifest_records_the_camera(pixels):
    dataset = open_dataset(pixels)
    group = dataset.manifest.group(FRAMES_GROUP)
    assert group.cameras == {"render": CAMERA}
    assert [f.name for f in group.steps_columns] == ["frame_render"]
    assert not group.episodes_files
    base = dataset.manifest.group("base")
    assert [f.rows for f in group.steps_files] == [f.rows for f in base.steps_files]
    assert [p.steps for p in dataset.manifest.parts] == [24, 24, 24]
    assert "frame_render" not in dataset.columns("steps", frames=False)


def test_collect_with_frames_is_deterministic_on_any_executor_and_part_size(
    pixels, tmp_path, ray_local
):
    collect_frames(tmp_path / "again")
    assert sha256s(str(tmp_path / "again"), FRAMES_GROUP) == sha256s(pixels, FRAMES_GROUP)
    assert sha256s(str(tmp_path / "again"), "base") == sha256s(pixels, "base")
    collect_frames(tmp_path / "ray", executor=RayExecutor())
    assert sha256s(str(tmp_path / "ray"), FRAMES_GROUP) == sha256s(pixels, FRAMES_GROUP)
    collect_frames(tmp_path / "one-part", episodes_per_part=EPISODES)
    np.testing.assert_array_equal(frames_of(str(tmp_path / "one-part")), frames_of(pixels))


def test_collect_with_frames_weighs_more_when_choosing_where_to_run(tmp_path, monkeypatch):
    from engine.collect import CollectTask, collect_part
    from engine.executor import work_done
    from engine.writer import VersionWriter
    from jobs import runtime

    monkeypatch.setattr(runtime, "ray_is_running", lambda: False)
    monkeypatch.delenv(runtime.IN_PROCESS_STEPS_VARIABLE, raising=False)
    assert runtime.runs_in_process(None, 6, 300, "episodes")
    assert not runtime.runs_in_process(None, 6, 300, "episodes with frames")
    assert runtime.runs_in_process(None, 2, 4, "episodes with frames")
    # the progress bar counts the episodes of a part's result
    rollouts = Rollouts("Pendulum-v1", max_steps=3, frames=CAMERA)
    with VersionWriter(str(tmp_path / "part")) as writer:
        written = collect_part(CollectTask(0, rollouts, range(2), {}, writer))
    assert work_done(written, "episodes with frames") == 2 and written.steps == 6


def test_collect_cli_frames_options(tmp_path, capsys):
    output = tmp_path / "jpeg"
    options = "--episodes 2 --max-steps 5 --frames 24x32 --camera front --codec jpeg --quality 80"
    assert main(["collect", "CartPole-v1", str(output), *options.split()]) == 0
    cameras = open_dataset(str(output)).cameras
    assert cameras == {"front": CameraInfo(height=24, width=32, codec="jpeg", quality=80)}
    assert frames_of(str(output), "front").shape == (10, 24, 32, 3)
    capsys.readouterr()
    lossless = tmp_path / "webp-lossless"
    options = "--episodes 2 --max-steps 5 --frames 24x32 --codec webp-lossless"
    assert main(["collect", "CartPole-v1", str(lossless), *options.split()]) == 0
    cameras = open_dataset(str(lossless)).cameras
    assert cameras == {"render": CameraInfo(height=24, width=32, codec="webp-lossless")}
    manifest = json.loads((lossless / "manifest.json").read_text())
    frames_group = next(g for g in manifest["groups"] if g["name"] == FRAMES_GROUP)
    assert frames_group["cameras"]["render"]["codec"] == "webp-lossless"
    assert frames_group["cameras"]["render"]["quality"] is None
    png = tmp_path / "png"
    assert main(["collect", "CartPole-v1", str(png), *options.split()[:-2]]) == 0
    np.testing.assert_array_equal(frames_of(str(lossless)), frames_of(str(png)))  # every pixel
    capsys.readouterr()
    refused = {
        "--quality is for jpeg and webp": ["--frames", "8x8", "--quality", "50"],
        "webp-lossless is lossless": ["--frames", "8x8", "--codec", "webp-lossless"]
        + ["--quality", "50"],
        "need --frames": ["--codec", "webp"],
        "HEIGHTxWIDTH": ["--frames", "64"],
        "letters, digits and underscores": ["--frames", "8x8", "--camera", "a/b"],
    }
    refused["cannot render frames: its render modes are none"] = ["--frames", "8x8"]
    for message, options in refused.items():
        env = "hindsight/PointGoal-v0" if "render modes" in message else "CartPole-v1"
        assert main(["collect", env, str(tmp_path / "no"), *options]) == 2
        error = capsys.readouterr().err
        assert message in error and len(error.strip().splitlines()) == 1, error
        assert not (tmp_path / "no").exists()


# ---------------------------------------------------------------- frames are read only when asked


@pytest.fixture
def damaged_frames(pixels, tmp_path) -> str:
    """A copy of the dataset whose frames files are garbage of the same size: any read of
    them fails, while the version still opens (sizes match the manifest)."""
    copy = tmp_path / "damaged"
    shutil.copytree(pixels, copy)
    for path in (copy / FRAMES_GROUP / "steps").glob("*.parquet"):
        path.write_bytes(b"\0" * path.stat().st_size)
    return str(copy)


def test_scans_queries_and_relabelers_never_open_the_frames_files(damaged_frames, tmp_path):
    steps = engine.scan(damaged_frames).collect()
    assert "frame_render" not in steps.columns and steps.height == 72
    assert engine.scan_episodes(damaged_frames).collect().height == EPISODES
    result = query(damaged_frames, where="reward > -1 AND noise = 0")
    assert "frame_render" not in result.frame.columns and result.frame.height > 0
    assert count(damaged_frames, "reward > -1") > 0
    child = tmp_path / "relabeled"
    Relabel(input=damaged_frames, output=str(child), relabelers=["returns:gamma=0.9"]).run()
    assert not (child / FRAMES_GROUP).exists()
    assert engine.scan(str(child)).select("return_to_go").collect().height == 72
    # Asked for, the frames are read: the damage shows, naming the file.
    with pytest.raises(DatasetError, match=r"frames/steps/part-0000\d.parquet"):
        query(damaged_frames, where="episode_id = 1", select=["frame_render"])
    with pytest.raises(Exception, match="parquet|Parquet"):
        engine.scan(damaged_frames, frames=True).collect()


def test_relabel_inherits_the_frames_group_by_reference(pixels, tmp_path):
    child = tmp_path / "rl"
    manifest = Relabel(input=pixels, output=str(child), relabelers=["returns"]).run()
    group = manifest.group(FRAMES_GROUP)
    assert group.inherited and group.cameras == {"render": CAMERA}
    assert not (child / FRAMES_GROUP).exists()
    assert open_dataset(str(child)).cameras == {"render": CAMERA}
    np.testing.assert_array_equal(frames_of(str(child)), frames_of(pixels))


# ---------------------------------------------------------------- subsets and copies carry frames


def frames_by_episode(uri: str, id_column: str = cols.EPISODE_ID) -> dict[int, np.ndarray]:
    frame = engine.scan(uri, frames=True).select(id_column, "frame_render").collect()
    frames = decode_frames(frame["frame_render"].to_list(), open_dataset(uri).cameras["render"])
    ids = frame[id_column].to_numpy()
    return {int(e): frames[ids == e] for e in np.unique(ids)}


@pytest.mark.parametrize("cluster_by", [None, ["return"]])
def test_query_output_carries_the_frames_of_the_chosen_episodes(pixels, tmp_path, cluster_by):
    output = str(tmp_path / "subset")
    manifest, _ = write_subset(
        pixels,
        "episode_id IN (1, 2, 4)",
        output,
        command="test",
        part_steps=20,
        cluster_by=cluster_by,
    )
    assert manifest.group(FRAMES_GROUP).cameras == {"render": CAMERA}
    assert "frame_render" not in [f.name for f in manifest.group("base").steps_columns]
    base = manifest.group("base").steps_files
    assert [f.rows for f in manifest.group(FRAMES_GROUP).steps_files] == [f.rows for f in base]
    parent = frames_by_episode(pixels)
    if cluster_by is None:
        subset = frames_by_episode(output)
        assert sorted(subset) == [1, 2, 4]
    else:  # renumbered: frames follow their episode to its new id
        originals = engine.scan_episodes(output).collect()
        new_to_old = dict(zip(originals[cols.EPISODE_ID], originals["original_episode_id"]))
        subset = {new_to_old[new]: frames for new, frames in frames_by_episode(output).items()}
    for episode in (1, 2, 4):
        np.testing.assert_array_equal(subset[episode], parent[episode])


def test_materialize_keeps_frames_in_their_own_group(pixels, tmp_path):
    relabeled = tmp_path / "rl"
    Relabel(input=pixels, output=str(relabeled), relabelers=["returns"]).run()
    flat = str(tmp_path / "flat")
    manifest = materialize(open_dataset(str(relabeled)), flat, executor=InProcess(), command="test")
    assert [g.name for g in manifest.groups] == ["base", FRAMES_GROUP]
    assert not any(g.inherited for g in manifest.groups)
    assert "return_to_go" in [f.name for f in manifest.group("base").steps_columns]
    np.testing.assert_array_equal(frames_of(flat), frames_of(pixels))


# ---------------------------------------------------------------- info and view


def test_info_shows_cameras_with_bytes_per_frame(pixels, capsys):
    info = dataset_info(pixels)
    (camera,) = info["cameras"]
    assert camera["camera"] == "render" and camera["codec"] == "png"
    assert (camera["height"], camera["width"], camera["channels"]) == (16, 16, 3)
    # against the stored column chunks, summed independently from the footers
    stored = 0
    for path in sorted(Path(pixels, FRAMES_GROUP, "steps").glob("*.parquet")):
        metadata = pq.read_metadata(path)
        for i in range(metadata.num_row_groups):
            stored += metadata.row_group(i).column(0).total_compressed_size
    assert camera["bytes_per_frame"] == pytest.approx(stored / 72)
    encoded = engine.scan(pixels, frames=True).collect()["frame_render"].bin.size().mean()
    assert 0.5 * encoded < camera["bytes_per_frame"] < 1.5 * encoded
    assert main(["info", pixels, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cameras"][0]["column"] == "frame_render"
    assert main(["info", pixels]) == 0
    assert "render (frame_render): 16x16x3 uint8, png" in capsys.readouterr().out


def test_episode_frames_reads_one_episode_as_uint8(pixels):
    episode = episode_frames(pixels, 4, columns=["noise"], every=5)
    assert episode.steps[cols.T].to_list() == [0, 5, 10]
    np.testing.assert_array_equal(episode.frames, frames_by_episode(pixels)[4][::5])
    assert episode.steps["noise"].to_list() == [0.0] * 3
    with pytest.raises(ViewError, match=r"no episode 99 \(episode ids 0..5, 6 episodes\)"):
        episode_frames(pixels, 99)
    with pytest.raises(ViewError, match="no camera 'wrist'; cameras: render"):
        episode_frames(pixels, 1, camera="wrist")


def test_view_writes_a_contact_sheet_of_the_episode(pixels, tmp_path, capsys):
    from PIL import Image

    output = tmp_path / "ep3.png"
    code = main(
        [
            "view",
            pixels,
            "--episode",
            "3",
            "--output",
            str(output),
            "--every",
            "2",
            "--columns",
            "noise",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "6 frames (steps 0..10 every 2)" in capsys.readouterr().out
    sheet = np.asarray(Image.open(output).convert("RGB"))
    # Each tile is its frame scaled up by a whole factor (nearest neighbour): find them all.
    scale = MIN_TILE_WIDTH // 16
    frames = frames_by_episode(pixels)[3][::2]
    for frame in frames:
        tile = frame.repeat(scale, axis=0).repeat(scale, axis=1)
        assert _contains(sheet, tile)
    assert sheet.shape[1] == 6 * (16 * scale + 8)  # six tiles in one row, margins of 4


def _contains(sheet: np.ndarray, tile: np.ndarray) -> bool:
    height, width = tile.shape[:2]
    for y in range(sheet.shape[0] - height + 1):
        row = sheet[y]
        for x in np.flatnonzero((row[:, :] == tile[0, 0]).all(axis=1)):
            if x + width <= sheet.shape[1] and np.array_equal(
                sheet[y : y + height, x : x + width], tile
            ):
                return True
    return False


def test_view_refuses_a_missing_episode_or_a_dataset_without_frames(pixels, tmp_path, capsys):
    assert main(["view", pixels, "--episode", "40", "--output", str(tmp_path / "x.png")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith("has no episode 40 (episode ids 0..5, 6 episodes)")
    assert len(error.splitlines()) == 1
    plain = tmp_path / "plain"
    assert main(["collect", "Pendulum-v1", str(plain), "--episodes", "1", "--max-steps", "3"]) == 0
    capsys.readouterr()
    assert main(["view", str(plain), "--episode", "0", "--output", str(tmp_path / "y.png")]) == 2
    error = capsys.readouterr().err.strip()
    assert "has no camera frames (collect --frames HxW records them)" in error
    assert len(error.splitlines()) == 1 and not (tmp_path / "y.png").exists()


def test_frames_on_s3_collect_read_and_view(pixels, s3_bucket, tmp_path):
    from PIL import Image

    from engine import storage

    uri = f"{s3_bucket}/pix"
    collect_frames(uri)
    assert sha256s(uri, FRAMES_GROUP) == sha256s(pixels, FRAMES_GROUP)
    np.testing.assert_array_equal(episode_frames(uri, 2).frames, frames_by_episode(pixels)[2])
    assert main(["view", uri, "--episode", "2", "--output", f"{s3_bucket}/sheets/ep2.png"]) == 0
    local = tmp_path / "ep2.png"
    local.write_bytes(storage.read_bytes(f"{s3_bucket}/sheets/ep2.png"))
    assert Image.open(local).format == "PNG"


def test_a_corrupt_frame_is_one_line_naming_episode_step_and_column(tmp_path, capsys):
    from engine.collect import collect_part_tables
    from engine.writer import VersionWriter, base_manifest
    from schemas.frames import frames_table

    steps, episodes, frames = collect_part_tables(
        "Pendulum-v1", "heuristic", range(2), [0.0], 0, 4, None, CAMERA
    )
    frames[5] = frames[5][:30]  # episode 1, step 1: a truncated PNG
    uri = str(tmp_path / "bad")
    with VersionWriter(uri) as writer:
        written = [
            writer.write_part(0, steps, episodes),
            writer.write_part(0, frames_table({"render": frames}), None, FRAMES_GROUP),
        ]
        manifest = base_manifest(
            writer.uri, written, operation="collect", command="test", cameras={"render": CAMERA}
        )
        writer.commit(manifest)
    assert main(["view", uri, "--episode", "0", "--output", str(tmp_path / "fine.png")]) == 0
    capsys.readouterr()
    assert main(["view", uri, "--episode", "1", "--output", str(tmp_path / "x.png")]) == 2
    error = capsys.readouterr().err.strip()
    assert "bad episode 1 step 1 column frame_render: frame does not decode" in error
    assert len(error.splitlines()) == 1 and not (tmp_path / "x.png").exists()
