"""LeRobot HEVC cameras (`vcodec="hevc"`: x265 as LeRobot runs it, B-frames and open GOPs
included) copied at ingest pixel for pixel as H.264 and AV1 ones are, re-encoded as HEVC
where an episode cannot stand alone, and joined back by stream copy at export; and the
hindsight-encoded HEVC camera (`--codec hevc`) of a LeRobot source and of raw arrays."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from engine.dataset import open_dataset
from engine.executor import InProcess
from engine.shards import ShardSettings, write_shards
from jobs.cli import main
from schemas.frames import CameraInfo
from schemas.video import encode_video
from tests import lerobot_datasets as lrd
from tests.test_frames_video import windows_show_frames
from tests.test_lerobot_video_copy import (
    VIDEO_MAE,
    assert_copied_exactly,
    episode_videos,
    ingest_to,
    source_spans,
)

# x265 wrote other bytes from run to run under 32 pixels a side, and corrupted its heap
# writing 32x48 with its defaults (schemas/frames.py MIN_HEVC_SIDE): 32x64 sources here.
CAMERA = (32, 64)


@pytest.fixture
def hevc_source(monkeypatch):
    """LeRobot's writer with vcodec="hevc" (yuv420p, g=2, crf 30, x265's defaults)."""
    monkeypatch.setattr(lrd, "video_codec", lambda: "hevc")


def test_hevc_cameras_are_copied_pixel_for_pixel_and_exported_by_stream_copy(
    tmp_path, capsys, hevc_source
):
    """v3.0, episodes encoded apart and joined (LeRobot's way) -> ingest: every episode
    copied, the source's pixels; shards and the loader show them; view draws them; export
    --video-codec hevc joins the copies by stream copy (same bytes twice), and the export
    ingests again to the same pixels."""
    data = lrd.make_data([5, 7, 4, 6], camera=CAMERA)
    root = lrd.write_v30(tmp_path / "src", data, episodes_per_file=3)
    assert main(["ingest", root, str(tmp_path / "ds")]) == 0
    assert "cameras: top 32x64x3 hevc (copied: 4 episodes)" in capsys.readouterr().out
    camera = open_dataset(str(tmp_path / "ds")).cameras["top"]
    assert (camera.codec, camera.copied, camera.pix_fmt, camera.gop) == ("hevc", True, "yuv420p", 2)
    origin = open_dataset(str(tmp_path / "ds")).manifest.metadata["frames_from"]["top"]
    assert (origin["copied_episodes"], origin["reencoded_episodes"]) == (4, 0)
    source = source_spans(root)
    for stored, expected, start, length in zip(
        episode_videos(tmp_path / "ds"), source, np.cumsum([0, *data.lengths[:-1]]), data.lengths
    ):
        np.testing.assert_array_equal(stored, expected)
        error = np.abs(stored.astype(np.int16) - data.video[start : start + length])
        assert error.mean(axis=(1, 2, 3)).max() < VIDEO_MAE
    assert main(["info", str(tmp_path / "ds")]) == 0
    assert "hevc video, 10 fps, gop 2, yuv420p, copied from the source" in capsys.readouterr().out

    settings = ShardSettings(window=4, shard_steps=12, block_steps=8, frame_stack=2, seed=0)
    shards = str(tmp_path / "shards")
    index = write_shards(
        open_dataset(str(tmp_path / "ds")), settings, shards, executor=InProcess(), command="t"
    )
    assert windows_show_frames(shards, "top", source, batch_size=4) == index.windows > 0
    sheet = tmp_path / "sheet.png"
    assert main(["view", str(tmp_path / "ds"), "--episode", "1", "--output", str(sheet)]) == 0
    assert sheet.stat().st_size > 0

    for name in ("export", "again"):
        command = ["export", str(tmp_path / "ds"), str(tmp_path / name), "--format", "lerobot"]
        assert main([*command, "--video-codec", "hevc"]) == 0
    assert "top joined by stream copy (part 0)" in capsys.readouterr().out
    video = "videos/observation.images.top/chunk-000/file-000.mp4"
    assert (tmp_path / "export" / video).read_bytes() == (tmp_path / "again" / video).read_bytes()
    info = json.loads((tmp_path / "export/meta/info.json").read_text())
    assert info["features"]["observation.images.top"]["info"]["video.codec"] == "hevc"
    exported = source_spans(str(tmp_path / "export"))
    np.testing.assert_array_equal(np.concatenate(exported), np.concatenate(source))
    assert ingest_to(str(tmp_path / "export"), tmp_path / "back")["copied_episodes"] == 4
    np.testing.assert_array_equal(
        np.concatenate(episode_videos(tmp_path / "back")), np.concatenate(source)
    )


def write_hevc_in_one_go(open_gop: bool):
    """LeRobot's writer replaced by one x265 encode of the whole file, a keyframe every 10
    frames and 3 B-frames between references (x265's default B-frames): an episode ending
    inside a group has B-frames that refer to a frame after its end; with an open GOP (x265's
    default), frames before a keyframe are decoded after it."""

    def write(path: str, frames: np.ndarray, fps: int = lrd.FPS, vcodec=None) -> None:
        import av

        params = f"bframes=3:scenecut=0:open-gop={int(open_gop)}:log-level=error"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with av.open(path, "w") as container:
            stream = container.add_stream(
                "libx265", fps, options={"g": "10", "x265-params": params}
            )
            stream.pix_fmt = "yuv420p"
            stream.height, stream.width = frames.shape[1:3]
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())

    return write


@pytest.mark.parametrize("open_gop", [False, True])
def test_b_frames_across_an_episodes_end_are_reencoded_as_hevc_not_copied(
    tmp_path, monkeypatch, hevc_source, open_gop
):
    """Episodes of 10, 7 and 13 frames in one x265 encode: episode 1's last B-frames refer
    to episode 2's frames (open GOP: episode 0's last frames are decoded after episode 1's
    keyframe, so neither stands alone); episode 2 starts between keyframes: those spans
    cannot stand alone; they are decoded, encoded as
    HEVC with hindsight's settings and counted; what is copied is exact."""
    monkeypatch.setattr(lrd, "write_video", write_hevc_in_one_go(open_gop))
    data = lrd.make_data([10, 7, 13], camera=CAMERA)
    root = lrd.write_v30(tmp_path / "src", data, one_encode=True)
    origin = ingest_to(root, tmp_path / "ds")
    reasons = {entry["episode"]: entry["why"] for entry in origin.get("reencoded", [])}
    assert "first frame is not a keyframe" in reasons[2], reasons
    if open_gop:
        assert "B-frames across its end" in reasons[0]
        assert "a frame before the span is decoded after its first (an open GOP)" in reasons[1]
    else:
        assert 0 not in reasons
        assert "B-frames across its end" in reasons[1]
    assert origin["copied_episodes"] == 3 - len(reasons)
    assert open_dataset(str(tmp_path / "ds")).cameras["top"].codec == "hevc"
    assert_copied_exactly(tmp_path / "ds", root, reasons)


def test_codec_hevc_decodes_and_encodes_with_hindsights_settings(tmp_path, capsys):
    """--codec hevc: a LeRobot camera (here AV1 or H.264, whatever this PyAV writes) decoded
    and encoded as HEVC, crf 30, not copied; raw arrays likewise, each episode's video the
    one its frames encode to; frames under 32x32 are refused with one line."""
    from tests.test_frames_ingest import flat_arrays, scenes, write_hdf5

    data = lrd.make_data([5, 4], camera=CAMERA)
    root = lrd.write_v30(tmp_path / "src", data)
    origin = ingest_to(root, tmp_path / "lerobot", codec="hevc")
    camera = open_dataset(str(tmp_path / "lerobot")).cameras["top"]
    assert (camera.codec, camera.copied, camera.crf, origin["encoded_at_ingest"]) == (
        "hevc", None, 30, True,
    )  # fmt: skip
    for stored, expected in zip(episode_videos(tmp_path / "lerobot"), source_spans(root)):
        assert np.abs(stored.astype(np.int16) - expected).mean() < VIDEO_MAE

    frames = scenes(20, 32, 32)
    source = write_hdf5(tmp_path / "pixels.h5", flat_arrays(20, [9, 19], frames))
    assert main(["ingest", source, str(tmp_path / "raw"), "--codec", "hevc"]) == 0
    dataset = open_dataset(str(tmp_path / "raw"))
    table = dataset.read("episodes", ["frame_observation"])
    camera = dataset.cameras["observation"]
    assert table.column(0).to_pylist() == [encode_video(frames[:10], camera),
                                           encode_video(frames[10:], camera)]  # fmt: skip
    small = write_hdf5(tmp_path / "small.h5", flat_arrays(10, [9], scenes(10, 16, 32)))
    assert main(["ingest", small, str(tmp_path / "small"), "--codec", "hevc"]) != 0
    assert "hevc video needs frames of at least 32x32" in capsys.readouterr().err
    assert CameraInfo(height=32, width=32, codec="hevc").crf == 30
