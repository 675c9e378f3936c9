"""Relabelers that read frames read video cameras too: the relabel job decodes a video
camera's episodes and gives each asked step its frame as a PNG (engine/step_frames.py),
with the pixels `hindsight view` and the loader show. Checked with language keyframes
against a real OpenAI-compatible server on loopback (the images it receives), with drex
on frame features (against drex on the decoded frames, computed apart), on collected
H.264 / AV1 cameras and a copied LeRobot camera; a bad video is one line."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from engine.collect import Rollouts, collect, plan_collect
from engine.dataset import open_dataset
from engine.executor import InProcess
from engine.step_frames import video_step_frames
from engine.view import episode_frames
from jobs.cli import main
from jobs.commands.relabel import Relabel
from relabelers.base import relabel_tables
from relabelers.drex import DrexRelabeler
from schemas import steps as cols
from schemas.frames import CameraInfo, FrameError, encode_frames, frame_column
from schemas.video import decode_video, encode_video, video_frames_at
from tests import lerobot_datasets as lrd
from tests.llm_server import data_block, image_urls
from tests.test_frames_video import bad_video_dataset, moving_frames
from tests.test_language_keyframes import expected_steps
from tests.test_lerobot_video_copy import ingest_to, source_spans


@pytest.mark.parametrize("codec", ["h264", "av1"])
@pytest.mark.parametrize("channels", [3, 1])
def test_frames_at_chosen_steps_are_decode_videos(codec, channels):
    camera = CameraInfo(height=16, width=16, channels=channels, codec=codec)
    data = encode_video(moving_frames(20, channels), camera)
    whole = decode_video(data, camera, "here", 20)
    for wanted in ([0], [3, 7, 19], list(range(20)), [19]):
        got = list(video_frames_at(data, camera, "here", set(wanted)))
        assert [k for k, _ in got] == wanted
        np.testing.assert_array_equal(np.stack([f for _, f in got]), whole[wanted])
    assert list(video_frames_at(data, camera, "here", ())) == []
    with pytest.raises(FrameError, match="here: the video holds 20 frames; step 20 was asked"):
        list(video_frames_at(data, camera, "here", {2, 20}))


def collect_pixels(out: str, codec: str) -> str:
    """4 Pendulum episodes of 12 steps, noise 0 and 1, a 16x16 camera in `codec`, 2 parts."""
    camera = CameraInfo(height=16, width=16, codec=codec)
    rollouts = Rollouts("Pendulum-v1", noise_levels=(0.0, 1.0), seed=3, max_steps=12, frames=camera)
    collect(plan_collect(rollouts, 4, 2), out, executor=InProcess(), command="test")
    return out


@pytest.fixture(scope="module", params=["h264", "av1"])
def video(request, tmp_path_factory) -> str:
    return collect_pixels(str(tmp_path_factory.mktemp("video") / request.param), request.param)


def received_keyframes(bodies: list[dict], lengths: dict[int, int], k: int) -> dict:
    """(episode, t) -> the pixels of every image the server received, each request's
    images at its unit's keyframes (k evenly spaced steps, first and last), as PNG."""
    got = {}
    for body in bodies:
        facts = data_block(body)
        episode = facts["episode_id"]
        chosen = expected_steps(lengths[episode], k)
        assert facts["keyframes"]["steps"] == chosen
        urls = [u["url"] for u in image_urls(body)]
        assert len(urls) == len(chosen)
        for url, t in zip(urls, chosen):
            head, data = url.split(",", 1)
            assert head == "data:image/png;base64"  # lossless: the decoded pixels
            image = Image.open(io.BytesIO(base64.b64decode(data)))
            assert image.format == "PNG"
            got[(episode, t)] = np.asarray(image.convert("RGB"))
    return got


def episode_lengths(uri: str) -> dict[int, int]:
    table = open_dataset(uri).read("episodes", [cols.EPISODE_ID, cols.LENGTH])
    return dict(zip(*(table.column(c).to_pylist() for c in (cols.EPISODE_ID, cols.LENGTH))))


def test_keyframes_of_a_video_camera_are_the_frames_view_shows(video, server, tmp_path):
    manifest = Relabel(
        input=video,
        output=str(tmp_path / "described"),
        relabelers=[f"language:keyframes=3,n=2,cache={tmp_path / 'cache'}"],
        llm_base_url=server.url,
    ).run()
    report = manifest.group("language").relabeler.report
    assert report["descriptions_by_status"] == {"ok": 4}
    lengths = episode_lengths(video)
    got = received_keyframes([r["body"] for r in server.served], lengths, 3)
    assert len(got) == 4 * 3
    for (episode, t), pixels in got.items():
        np.testing.assert_array_equal(pixels, episode_frames(video, episode).frames[t])


def test_drex_on_a_video_camera_is_drex_on_its_decoded_frames(video, tmp_path):
    labeled = str(tmp_path / "drex")
    params = "features=frame_render,epochs=2"
    assert main(["relabel", video, labeled, "--with", f"drex:{params}", "--seed", "4"]) == 0
    got = open_dataset(labeled).read("steps", ["drex_reward"]).column(0).to_numpy()

    # Independently: the frames `view` decodes, as PNG images in a step column, through
    # the relabeler on in-memory tables cut as the dataset's parts.
    dataset = open_dataset(video)
    steps = dataset.read("steps", dataset.columns("steps", frames=False))
    episodes = dataset.read("episodes", dataset.columns("episodes", frames=False))
    png = CameraInfo(height=16, width=16, codec="png")
    frames = [
        encode_frames(episode_frames(video, episode).frames, png)
        for episode in episodes.column(cols.EPISODE_ID).to_pylist()
    ]
    steps = steps.append_column("frame_render", pa.array(sum(frames, []), pa.binary()))
    drex = DrexRelabeler({"features": "frame_render", "epochs": 2}, seed=4)
    expected = relabel_tables(drex, steps, episodes, parts=2, cameras={"render": png})
    np.testing.assert_array_equal(got, expected.steps.column("drex_reward").to_numpy())
    assert np.isfinite(got).all() and len(np.unique(got)) > 1


def test_a_copied_lerobot_camera_sends_the_sources_pixels(server, tmp_path):
    data = lrd.make_data([6, 9, 7], camera=(32, 32))
    root = lrd.write_v30(tmp_path / "src", data)
    assert ingest_to(root, tmp_path / "ds")["copied_episodes"] == 3
    uri = str(tmp_path / "ds")
    assert open_dataset(uri).cameras["top"].copied
    Relabel(
        input=uri,
        output=str(tmp_path / "described"),
        relabelers=[f"language:keyframes=2,camera=top,n=2,cache={tmp_path / 'cache'}"],
        llm_base_url=server.url,
    ).run()
    got = received_keyframes([r["body"] for r in server.served], episode_lengths(uri), 2)
    spans = source_spans(root)  # episodes 0, 1, 2
    assert len(got) == 3 * 2
    for (episode, t), pixels in got.items():
        np.testing.assert_array_equal(pixels, episode_frames(uri, episode, "top").frames[t])
        np.testing.assert_array_equal(pixels, spans[episode][t])


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("short", r"episode 17 camera 'cam': the video holds \d+ frames, the episode has \d+"),
        ("damaged", r"episode 17 camera 'cam' step 5: the video does not decode"),
    ],
)
def test_a_bad_video_is_one_line_naming_file_episode_and_camera(
    fault, message, server, tmp_path, capsys
):
    uri = bad_video_dataset(str(tmp_path / fault), fault)
    out = tmp_path / "out"
    keyframes = f"language:keyframes=2,camera=cam,n=1,cache={tmp_path / 'cache'}"
    arguments = ["relabel", uri, str(out), "--with", keyframes, "--llm-base-url", server.url]
    assert main(arguments) != 0
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert "relabeler 'language'" in error and "part 0" in error
    file = r"frames/episodes/part-00000\.parquet: "
    assert re.search(file + message, error), error
    assert not out.exists()


def test_relabelers_see_a_video_camera_as_png_images(video):
    from jobs.relabeling import PartReader, VersionInputs

    dataset = open_dataset(video)
    drex = DrexRelabeler({"features": frame_column("render")})
    reader = PartReader.of(dataset, drex)
    assert dataset.cameras["render"].is_video
    inputs = VersionInputs(reader, drex, InProcess())
    assert inputs.cameras["render"] == CameraInfo(height=16, width=16, codec="png")
    steps, _ = reader.read(reader.part(1))
    first = int(steps.column(cols.EPISODE_ID)[0].as_py())
    column = steps.column("frame_render").to_pylist()
    assert steps.column("frame_render").null_count == 0
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in column])
    np.testing.assert_array_equal(decoded[:12], episode_frames(video, first).frames)
    # Asked rows only: the others are null, the asked ones the same PNG pixels.
    some = video_step_frames(dataset, 1, "render", steps, np.array([5, 2])).to_pylist()
    assert [i for i, d in enumerate(some) if d is not None] == [2, 5]
    for row in (2, 5):
        pixels = np.asarray(Image.open(io.BytesIO(some[row])).convert("RGB"))
        np.testing.assert_array_equal(pixels, decoded[row])
