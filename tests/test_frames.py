"""Camera frames: the codecs round-trip, and a frame that is not what its camera says is one
clear error naming where it was."""

from __future__ import annotations

import numpy as np
import pytest

from engine.frames import parse_size, resize_frame
from schemas.frames import (
    CameraInfo,
    FrameError,
    camera_of,
    decode_frame,
    decode_frames,
    encode_frames,
    frame_column,
    frames_table,
)


def frames(count: int, height: int = 12, width: int = 10, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(count, height, width, channels), dtype=np.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_png_is_lossless_and_lossy_codecs_stay_close(channels):
    raw = frames(3, channels=channels)
    ramp = np.add.outer(np.arange(12) * 9, np.arange(10) * 7).astype(
        np.uint8
    )  # a rendered scene is smooth
    smooth = np.repeat(ramp[None, :, :, None], 3, axis=0).repeat(channels, axis=3)
    png = CameraInfo(height=12, width=10, channels=channels)
    np.testing.assert_array_equal(decode_frames(encode_frames(raw, png), png), raw)
    for codec in ("jpeg", "webp"):
        camera = CameraInfo(height=12, width=10, channels=channels, codec=codec, quality=95)
        decoded = decode_frames(encode_frames(smooth, camera), camera)
        assert decoded.shape == smooth.shape and decoded.dtype == np.uint8
        assert np.abs(decoded.astype(int) - smooth).mean() < 4


@pytest.mark.parametrize("channels", [1, 3])
def test_webp_lossless_gives_back_every_pixel_of_a_noisy_frame(channels):
    raw = frames(4, channels=channels)  # uniform noise: nothing for a lossy codec to keep
    camera = CameraInfo(height=12, width=10, channels=channels, codec="webp-lossless")
    encoded = encode_frames(raw, camera)
    np.testing.assert_array_equal(decode_frames(encoded, camera), raw)
    # WebP's lossless bitstream (a VP8L chunk), not a lossy VP8 one at a high quality.
    assert all(data[:4] == b"RIFF" and data[8:16] == b"WEBPVP8L" for data in encoded)
    # Frames that are WebP either way decode under a lossy or a lossless WebP camera.
    lossy = CameraInfo(height=12, width=10, channels=channels, codec="webp")
    np.testing.assert_array_equal(decode_frames(encoded, lossy), raw)


def test_a_frame_unlike_its_camera_is_refused_naming_where():
    camera = CameraInfo(height=12, width=10)
    data = encode_frames(frames(1), camera)[0]
    with pytest.raises(FrameError, match="part-00000.parquet episode 3 step 7: frame is 10x12"):
        decode_frame(data, CameraInfo(height=10, width=10), "part-00000.parquet episode 3 step 7")
    with pytest.raises(FrameError, match="is PNG, the camera says jpeg"):
        decode_frame(data, CameraInfo(height=12, width=10, codec="jpeg"), "x")
    with pytest.raises(FrameError, match="does not decode"):
        decode_frame(data[:40], camera, "shard-000001.tar sample 4")
    with pytest.raises(FrameError, match="must be uint8"):
        encode_frames(frames(1).astype(np.float32), camera)


def test_names_sizes_and_the_frames_table():
    assert frame_column("wrist") == "frame_wrist" and camera_of("frame_wrist") == "wrist"
    assert camera_of("observation") is None
    with pytest.raises(ValueError, match="letters, digits and underscores"):
        frame_column("../x")
    assert parse_size("64x48") == (64, 48)
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        parse_size("64")
    table = frames_table({"render": [b"a", b"bc"]})
    assert table.column_names == ["frame_render"] and table.num_rows == 2
    big = frames(1, 100, 80)[0]
    assert resize_frame(big, 20, 16).shape == (20, 16, 3)
    np.testing.assert_array_equal(resize_frame(big, 20, 16), resize_frame(big, 20, 16))
