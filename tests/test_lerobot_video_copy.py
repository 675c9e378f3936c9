"""LeRobot video cameras copied at ingest (engine/sources/lerobot_video.py): each episode's
span of the source MP4 remuxed packet by packet, never decoded and encoded, so the stored
video decodes to exactly the pixels the source's span decodes to; an episode whose span
cannot stand alone is re-encoded and counted; `--codec` still transcodes; a source codec
hindsight does not store is decoded; and the copied cameras shard, load and view."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from engine.dataset import open_dataset
from engine.executor import InProcess
from engine.ingest import ingest, plan_ingest
from engine.shards import ShardSettings, write_shards
from engine.sources.lerobot_meta import read_meta
from engine.video import NotCopied, copy_video_span, decode_video_span
from jobs.cli import main
from schemas.frames import CameraInfo, decode_frames, frame_column
from schemas.video import decode_video
from tests import lerobot_datasets as lrd
from tests.test_frames_video import windows_show_frames

VIDEO_MAE = 8.0  # as tests/test_lerobot_ingest.py: the source codec's error, measured 2-5


def ingest_to(root: str, output, **options) -> dict:
    """Ingest in process; the camera's `frames_from` entry in the manifest."""
    ingest(plan_ingest(root, **options), str(output), executor=InProcess(), command="test")
    return open_dataset(str(output)).manifest.metadata["frames_from"]["top"]


def episode_videos(output) -> list[np.ndarray]:
    """Each episode's frames, decoded from the video the dataset stores for it."""
    dataset = open_dataset(str(output))
    info, column = dataset.cameras["top"], frame_column("top")
    table = dataset.read("episodes", ["episode_id", "length", column])
    return [
        decode_video(video, info, f"episode {episode}", length)
        for episode, length, video in zip(
            *(table.column(name).to_pylist() for name in table.column_names)
        )
    ]


def assert_copied_exactly(output, root: str, reencoded) -> None:
    """Every episode the dataset copied shows the source span's pixels exactly; those in
    `reencoded` (encoded a second time) are close, not equal."""
    for episode, (got, expected) in enumerate(zip(episode_videos(output), source_spans(root))):
        if episode in reencoded:
            assert np.abs(got.astype(np.int16) - expected).mean() < VIDEO_MAE
        else:
            np.testing.assert_array_equal(got, expected)


def source_spans(root: str) -> list[np.ndarray]:
    """Each episode's frames decoded from its span of the source (the decode path)."""
    meta = read_meta(root)
    return [
        decode_video_span(
            meta.uri(span.file), span.start_s, span.start_s + e.length / lrd.FPS, lrd.FPS
        )
        for e in meta.episodes
        for span in [dict(e.videos)[lrd.CAMERA]]
    ]


@pytest.mark.parametrize("vcodec", ["libsvtav1", "libx264", "hevc"])
def test_a_copied_span_decodes_to_the_source_spans_pixels(tmp_path, vcodec):
    """Episodes encoded apart and joined by stream copy (LeRobot v3.0), B-frames included
    for H.264 and HEVC (x265's open GOP too): each span copied alone decodes to the pixels
    of the source's span, and the same span gives the same bytes twice."""
    frames = lrd.scenes(20, 32, 32)
    lengths, starts = [5, 7, 8], [0, 5, 12]
    path = str(tmp_path / "joined.mp4")
    parts = []
    for i, (start, length) in enumerate(zip(starts, lengths)):
        parts.append(str(tmp_path / f"episode{i}.mp4"))
        lrd.write_video(parts[-1], frames[start : start + length], vcodec=vcodec)
    lrd.concatenate_videos(parts, path)
    codec = {"libsvtav1": "av1", "libx264": "h264"}.get(vcodec, vcodec)
    camera = CameraInfo(height=32, width=32, codec=codec, fps=lrd.FPS)
    for start, length in zip(starts, lengths):
        copied = copy_video_span(path, start / lrd.FPS, length, lrd.FPS)
        assert copy_video_span(path, start / lrd.FPS, length, lrd.FPS) == copied
        np.testing.assert_array_equal(
            decode_video(copied, camera, "copy", length),
            decode_video_span(path, start / lrd.FPS, (start + length) / lrd.FPS, lrd.FPS),
        )
    # A span that starts between keyframes (a keyframe every 2 frames) does not stand alone;
    # one read at another frame rate is not one frame per step.
    with pytest.raises(NotCopied, match="first frame is not a keyframe"):
        copy_video_span(parts[1], 0.1, 4, lrd.FPS)
    with pytest.raises(NotCopied, match="not one frame per step"):
        copy_video_span(parts[1], 0.0, 7, 2 * lrd.FPS)


@pytest.mark.parametrize("version", ["v3.0", "v2.1"])
def test_ingest_copies_every_episode_with_the_sources_pixels(tmp_path, capsys, version):
    data = lrd.make_data([5, 7, 4, 6], camera=(32, 48))
    write = lrd.write_v30 if version == "v3.0" else lrd.write_v21
    root = write(tmp_path / "src", data, **({"episodes_per_file": 3} if version == "v3.0" else {}))
    assert main(["ingest", root, str(tmp_path / "ds")]) == 0
    assert "cameras: top 32x48x3 " in capsys.readouterr().out
    dataset = open_dataset(str(tmp_path / "ds"))
    camera = dataset.cameras["top"]
    assert (camera.codec, camera.copied, camera.pix_fmt, camera.gop) == (
        lrd.codec_name(),
        True,
        "yuv420p",
        2,  # the writer's keyframe every 2 frames, as the packets show it
    )
    origin = dataset.manifest.metadata["frames_from"]["top"]
    assert origin == {
        "source": lrd.CAMERA,
        "encoded_at_ingest": False,
        "copied": True,
        "copied_episodes": 4,
        "reencoded_episodes": 0,
    }
    for stored, source, start, length in zip(
        episode_videos(tmp_path / "ds"),
        source_spans(root),
        np.cumsum([0, *data.lengths[:-1]]),
        data.lengths,
    ):
        np.testing.assert_array_equal(stored, source)  # lossless with respect to the source
        error = np.abs(stored.astype(np.int16) - data.video[start : start + length])
        assert error.mean(axis=(1, 2, 3)).max() < VIDEO_MAE
    assert main(["info", str(tmp_path / "ds")]) == 0
    assert "gop 2, yuv420p, copied from the source" in capsys.readouterr().out


def test_episodes_off_a_keyframe_are_reencoded_and_counted(tmp_path, capsys):
    """A v3.0 file encoded in one go (not LeRobot's way): episode 1 starts at frame 5, between
    keyframes 4 and 6. It alone is decoded and encoded in the camera's codec; the others are
    copied; the manifest and the command's line say so."""
    data = lrd.make_data([5, 7, 4], camera=(32, 32))
    root = lrd.write_v30(tmp_path / "src", data, one_encode=True)
    assert main(["ingest", root, str(tmp_path / "ds")]) == 0
    assert (
        f"top 32x32x3 {lrd.codec_name()} (copied: 2 episodes; 1 decoded and encoded, e.g. "
        "episode 1: the span's first frame is not a keyframe)" in capsys.readouterr().out
    )
    origin = open_dataset(str(tmp_path / "ds")).manifest.metadata["frames_from"]["top"]
    assert (origin["copied_episodes"], origin["reencoded_episodes"]) == (2, 1)
    assert origin["encoded_at_ingest"] is True  # one episode was
    assert origin["reencoded"] == [
        {"episode": 1, "why": "the span's first frame is not a keyframe"}
    ]
    stored, source = episode_videos(tmp_path / "ds"), source_spans(root)
    np.testing.assert_array_equal(stored[0], source[0])
    np.testing.assert_array_equal(stored[2], source[2])
    error = np.abs(stored[1].astype(np.int16) - source[1]).mean(axis=(1, 2, 3))
    assert 0 < error.max() < VIDEO_MAE  # encoded a second time: close, not equal


def test_codec_option_decodes_and_encodes_as_before(tmp_path):
    data = lrd.make_data([5, 4], camera=(32, 32))
    root = lrd.write_v30(tmp_path / "src", data)
    origin = ingest_to(root, tmp_path / "png", codec="png")
    assert origin == {"source": lrd.CAMERA, "encoded_at_ingest": True}
    png = open_dataset(str(tmp_path / "png"))
    assert png.cameras["top"].codec == "png" and not png.cameras["top"].copied
    frames = decode_frames(
        png.read("steps", [frame_column("top")]).column(frame_column("top")).to_pylist(),
        png.cameras["top"],
    )
    np.testing.assert_array_equal(frames, np.concatenate(source_spans(root)))  # PNG: lossless
    ingest_to(root, tmp_path / "h264", codec="h264")
    h264 = open_dataset(str(tmp_path / "h264")).cameras["top"]
    assert (h264.codec, h264.copied, h264.crf) == ("h264", None, 30)
    plan = plan_ingest(root, codec="h264")
    assert "(--codec)" in plan.metadata["lerobot"]["video_cameras"]["top"]


def test_a_codec_hindsight_does_not_store_is_decoded_to_png(tmp_path, monkeypatch, capsys):
    """An MPEG-4 camera is decoded and stored as PNG; the manifest and the command's line
    say why."""
    monkeypatch.setattr(lrd, "video_codec", lambda: "mpeg4")
    data = lrd.make_data([5, 4], camera=(32, 32))
    root = lrd.write_v21(tmp_path / "src", data)
    why = (
        "decoded and encoded as png: its MP4s are mpeg4; hindsight stores h264, av1 and hevc video"
    )
    assert plan_ingest(root).metadata["lerobot"]["video_cameras"]["top"] == why
    assert main(["ingest", root, str(tmp_path / "ds")]) == 0
    assert f"cameras: top 32x32x3 png ({why})" in capsys.readouterr().out
    origin = open_dataset(str(tmp_path / "ds")).manifest.metadata["frames_from"]["top"]
    assert origin["encoded_at_ingest"] is True
    assert open_dataset(str(tmp_path / "ds")).cameras["top"].codec == "png"


def test_a_damaged_copied_video_is_named_and_the_others_kept(tmp_path, capsys):
    data = lrd.make_data([3, 4, 5], camera=(16, 16))
    root = lrd.write_v21(tmp_path / "src", data)
    video = os.path.join(root, "videos/chunk-000", lrd.CAMERA, "episode_000001.mp4")
    source = source_spans(root)  # before the damage
    lrd.damage_video(video)
    assert main(["ingest", root, str(tmp_path / "ds")]) != 0
    line = capsys.readouterr().err.splitlines()[1]
    assert line.startswith(f"  {video}: episode 1: column '{lrd.CAMERA}': the video does not ")
    assert not (tmp_path / "ds").exists()
    assert main(["ingest", root, str(tmp_path / "skip"), "--on-error", "skip"]) == 0
    report = json.loads((tmp_path / "skip" / "skipped.json").read_text())
    assert [(p["episode"], p["file"]) for p in report["skipped"]] == [(1, video)]
    stored = episode_videos(tmp_path / "skip")
    np.testing.assert_array_equal(stored[0], source[0])
    np.testing.assert_array_equal(stored[1], source[2])


def test_copied_cameras_shard_load_and_view(tmp_path):
    """ingest (copied) -> shard --frame-stack 2 -> loader batches: every window's frames are
    the source's pixels; `hindsight view` draws an episode."""
    data = lrd.make_data([6, 9, 7], camera=(32, 32))
    root = lrd.write_v30(tmp_path / "src", data)
    assert ingest_to(root, tmp_path / "ds")["copied_episodes"] == 3
    settings = ShardSettings(window=4, shard_steps=12, block_steps=8, frame_stack=2, seed=0)
    out = str(tmp_path / "shards")
    index = write_shards(
        open_dataset(str(tmp_path / "ds")), settings, out, executor=InProcess(), command="t"
    )
    windows = windows_show_frames(out, "top", source_spans(root), batch_size=4)
    assert windows == index.windows > 0
    sheet = tmp_path / "sheet.png"
    assert main(["view", str(tmp_path / "ds"), "--episode", "1", "--output", str(sheet)]) == 0
    assert sheet.stat().st_size > 0


def test_export_joins_copied_videos_without_a_second_lossy_pass(tmp_path):
    """source -> ingest (copied) -> export --format lerobot (AV1, the camera's codec: the
    episodes' videos joined by stream copy) -> ingest again: the source's pixels at every
    step, and a re-run export writes the same bytes."""
    data = lrd.make_data([5, 7, 4], camera=(32, 48))
    root = lrd.write_v30(tmp_path / "src", data)
    if lrd.codec_name() != "av1":
        pytest.skip("this PyAV cannot write AV1")
    ingest_to(root, tmp_path / "ds")
    for name in ("export", "again"):
        command = ["export", str(tmp_path / "ds"), str(tmp_path / name), "--format", "lerobot"]
        assert main(command) == 0
    video = "videos/observation.images.top/chunk-000/file-000.mp4"
    assert (tmp_path / "export" / video).read_bytes() == (tmp_path / "again" / video).read_bytes()
    info = json.loads((tmp_path / "export/meta/info.json").read_text())
    assert info["features"]["observation.images.top"]["info"]["video.crf"] is None  # unknown
    source = np.concatenate(source_spans(root))
    np.testing.assert_array_equal(np.concatenate(source_spans(str(tmp_path / "export"))), source)
    assert ingest_to(str(tmp_path / "export"), tmp_path / "back")["copied_episodes"] == 3
    np.testing.assert_array_equal(np.concatenate(episode_videos(tmp_path / "back")), source)


def test_an_episode_left_out_for_its_values_takes_its_copied_video_with_it(tmp_path):
    """A NaN reward (found when the part's values are checked as stored, after the videos
    were copied) leaves episode 1 out under --on-error skip: the videos kept are the other
    episodes', each still the source's pixels, and the count is theirs."""
    data = lrd.make_data([4, 5, 6], camera=(16, 16))
    data.reward[6] = np.nan  # episode 1, step 2
    root = lrd.write_v30(tmp_path / "src", data)
    assert main(["ingest", root, str(tmp_path / "ds"), "--on-error", "skip"]) == 0
    dataset = open_dataset(str(tmp_path / "ds"))
    assert dataset.read("episodes", ["episode_id"]).column(0).to_pylist() == [0, 2]
    assert dataset.manifest.metadata["frames_from"]["top"]["copied_episodes"] == 2
    stored, source = episode_videos(tmp_path / "ds"), source_spans(root)
    np.testing.assert_array_equal(stored[0], source[0])
    np.testing.assert_array_equal(stored[1], source[2])


def write_h264_with_b_frames(path: str, frames: np.ndarray, fps: int = lrd.FPS, vcodec=None):
    """One H.264 MP4 in one go, a keyframe every 10 frames and 3 B-frames between
    references: an episode ending inside a group has B-frames that refer to a frame after
    its end."""
    import av

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream(
            "libx264", fps, options={"g": "10", "bf": "3", "x264-params": "scenecut=0"}
        )
        stream.pix_fmt = "yuv420p"
        stream.height, stream.width = frames.shape[1:3]
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_b_frames_across_an_episodes_end_are_reencoded_not_copied(tmp_path, monkeypatch):
    """Episodes of 10, 7 and 13 frames in one H.264 encode with B-frames: a span whose last
    B-frames refer to the next episode's frame cannot stand alone (copied, it would decode
    to concealed, wrong pixels): it is re-encoded and counted; what is copied is exact."""
    monkeypatch.setattr(lrd, "write_video", write_h264_with_b_frames)
    monkeypatch.setattr(lrd, "video_codec", lambda: "h264")
    data = lrd.make_data([10, 7, 13], camera=(32, 32))
    root = lrd.write_v30(tmp_path / "src", data, one_encode=True)
    origin = ingest_to(root, tmp_path / "ds")
    reasons = {entry["episode"]: entry["why"] for entry in origin.get("reencoded", [])}
    assert any("B-frames across its end" in why for why in reasons.values()), reasons
    assert_copied_exactly(tmp_path / "ds", root, reasons)


def test_an_episode_in_another_format_than_the_camera_is_reencoded(tmp_path, monkeypatch):
    """v2.1, one MP4 per episode: episode 1's is H.264 where the camera (the first
    episode's) is AV1. It is decoded and encoded in the camera's codec, and counted."""
    original = lrd.write_video
    if lrd.video_codec() != "libsvtav1":
        pytest.skip("needs an AV1 encoder for the camera's codec")

    def mixed(path, frames, fps=lrd.FPS, vcodec=None):
        other = "libx264" if path.endswith("episode_000001.mp4") else vcodec
        original(path, frames, fps, vcodec=other)

    monkeypatch.setattr(lrd, "write_video", mixed)
    data = lrd.make_data([4, 5, 6], camera=(32, 32))
    root = lrd.write_v21(tmp_path / "src", data)
    origin = ingest_to(root, tmp_path / "ds")
    assert (origin["copied_episodes"], origin["reencoded_episodes"]) == (2, 1)
    assert origin["reencoded"][0]["episode"] == 1
    assert "its MP4 is h264 yuv420p 32x32, the camera av1" in origin["reencoded"][0]["why"]
    stored, source = episode_videos(tmp_path / "ds"), source_spans(root)
    assert open_dataset(str(tmp_path / "ds")).cameras["top"].codec == "av1"
    np.testing.assert_array_equal(stored[0], source[0])
    np.testing.assert_array_equal(stored[2], source[2])
    assert np.abs(stored[1].astype(np.int16) - source[1]).mean() < VIDEO_MAE


def test_export_says_which_parts_were_joined_and_which_encoded_again(tmp_path, capsys, monkeypatch):
    """An H.264 source (x264's defaults, crf 18) whose episode 2 is re-encoded at ingest
    (it starts off a keyframe) with hindsight's x264 settings, which its SPS shows: part 0's
    videos (episodes 0-2) cannot share one stream, so that part is decoded and encoded
    again; part 1 (episode 3) is joined by stream copy (the source's pixels). The export's
    line and meta/hindsight.json (its result's `videos` too) say which and why."""
    monkeypatch.setattr(lrd, "video_codec", lambda: "h264")
    data = lrd.make_data([5, 7, 4, 6], camera=(32, 32))
    root = lrd.write_v30(tmp_path / "src", data, one_encode=True)
    assert main(["ingest", root, str(tmp_path / "ds"), "--part-steps", "16"]) == 0
    dataset = open_dataset(str(tmp_path / "ds"))
    assert dataset.num_parts == 2  # episodes 0-2 | episode 3
    assert dataset.manifest.metadata["frames_from"]["top"]["reencoded"][0]["episode"] == 2
    capsys.readouterr()
    out = str(tmp_path / "export")
    command = ["export", str(tmp_path / "ds"), out, "--format", "lerobot"]
    assert main([*command, "--video-codec", "h264"]) == 0
    why = (
        "episode 2's video was encoded with other parameters than episode 0's (episode 2 "
        "re-encoded at ingest)"
    )
    assert (
        f"  cameras: top joined by stream copy (part 1), encoded as h264 (part 0: {why})"
        in capsys.readouterr().out
    )
    videos = json.loads((tmp_path / "export/meta/hindsight.json").read_text())["videos"]
    assert videos == {"top": {"joined": [1], "encoded": [{"part": 0, "why": why}]}}
    source, exported = source_spans(root), source_spans(out)
    np.testing.assert_array_equal(exported[3], source[3])  # joined: exact
    error = np.abs(exported[0].astype(np.int16) - source[0]).mean()
    assert 0 < error < VIDEO_MAE  # encoded a second time: close, not equal


@pytest.mark.parametrize("window", [3, 100])
def test_a_reencoded_episode_is_encoded_straight_from_its_decoded_frames(
    tmp_path, monkeypatch, window
):
    """The fallback of a copied camera encodes the decoded frames a window at a time: the
    same bytes as decoding to PNG per step, decoding those and encoding the episode whole
    (the path before), whether the episode is one window or several."""
    from engine.sources import lerobot_video
    from engine.sources.images import step_camera
    from schemas.video import encode_video

    data = lrd.make_data([5, 7, 4], camera=(32, 32))
    root = lrd.write_v30(tmp_path / "src", data, one_encode=True)
    camera = plan_ingest(root).cameras["top"]
    meta = read_meta(root)
    episode = meta.episodes[1]
    span = dict(episode.videos)[lrd.CAMERA]
    uri, slots = meta.uri(span.file), np.arange(episode.length)
    monkeypatch.setattr(lerobot_video, "chunk_rows", lambda camera: window)
    for steps in (slots, np.array([0, 0, 2, 3, 3, 5, 6])):  # repeated and skipped slots too
        encoded = lerobot_video.episode_frames(uri, span.start_s, steps, lrd.FPS, camera, 1)
        before = encode_video(decode_frames(encoded, step_camera(camera)), camera)
        now = lerobot_video.reencoded_video(uri, span.start_s, steps, lrd.FPS, camera, 1)
        assert now == before
