"""The loader's PNG fast path (trainers.loader.frames.decode_plain_png): the very pixels of
`schemas.frames.decode_frame` for the PNGs collect and ingest write, and for any other PNG,
or data that is not one, no answer (the loader then decodes through decode_frame, which names
the error exactly as before)."""

from __future__ import annotations

import io
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from schemas.frames import CameraInfo, FrameError, decode_frame, encode_frame
from trainers.loader.frames import FrameDecoder, PoolFrames, decode_plain_png


def scenes(count: int, height: int, width: int, channels: int) -> np.ndarray:
    """Noise (filters on every row differ) and smooth ramps (what a renderer gives)."""
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, size=(count, height, width, channels), dtype=np.uint8)
    ramp = np.add.outer(np.arange(height) * 5, np.arange(width) * 3).astype(np.uint8)
    smooth = np.broadcast_to(ramp[None, :, :, None], (count, height, width, channels))
    return np.concatenate([noise, smooth + noise // 16])


def unaddressed(message: str) -> str:
    return re.sub(r" at 0x[0-9a-f]+", "", message)


def png(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", **options)
    return out.getvalue()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(12, 10), (64, 64), (1, 33)])
def test_plain_pngs_decode_to_the_very_pixels_of_decode_frame(channels, size):
    camera = CameraInfo(height=size[0], width=size[1], channels=channels)
    for frame in scenes(3, *size, channels):
        data = encode_frame(frame, camera)
        fast = decode_plain_png(data, camera)
        assert fast is not None and fast.dtype == np.uint8 and fast.shape == camera.shape
        np.testing.assert_array_equal(fast, decode_frame(data, camera))
        np.testing.assert_array_equal(fast, frame)
    # Ancillary chunks (text, gamma) change no pixel; several IDAT chunks are joined.
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "a camera")
    frame = scenes(1, *size, channels)[0]
    image = Image.fromarray(frame[:, :, 0] if channels == 1 else frame)
    for data in (png(image, pnginfo=info), png(image, compress_level=0, optimize=False)):
        np.testing.assert_array_equal(decode_plain_png(data, camera), frame)


def test_other_pngs_and_bad_data_are_left_to_decode_frame():
    camera = CameraInfo(height=12, width=10, channels=3)
    frame = scenes(1, 12, 10, 3)[0]
    rgb = Image.fromarray(frame)
    good = encode_frame(frame, camera)
    others = {
        "palette": png(rgb.convert("P")),
        "rgba": png(rgb.convert("RGBA")),
        "grey": png(rgb.convert("L")),
        "16-bit grey": png(Image.fromarray(frame[:, :, 0].astype(np.uint16) * 257)),
        "other size": encode_frame(frame[:11], CameraInfo(height=11, width=10)),
        "jpeg": encode_frame(frame, CameraInfo(height=12, width=10, codec="jpeg")),
        "truncated": good[:-20],
        "garbage": b"\x00" * len(good),
        "no IEND": good[:-12],
        "bad IDAT": good[:41] + bytes(len(good) - 53) + good[-12:],
    }
    # Refused by decode_frame too: a header whose CRC is wrong, image data split by another chunk.
    bad_header = bytearray(good)
    bad_header[29] ^= 1
    others["bad IHDR CRC"] = bytes(bad_header)
    idat = good.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", good[idat : idat + 4])
    body, half = good[idat + 8 : idat + 8 + length], length // 2
    split = chunk(b"IDAT", body[:half]) + chunk(b"tEXt", b"a\x00b") + chunk(b"IDAT", body[half:])
    others["IDAT split by tEXt"] = good[:idat] + split + good[idat + 12 + length :]
    for name, data in others.items():
        assert decode_plain_png(data, camera) is None, name
    # PIL writes no interlaced PNG: a header that says so is refused before decoding.
    interlaced = bytearray(good)
    interlaced[28] = 1
    interlaced[29:33] = struct.pack(">I", zlib.crc32(bytes(interlaced[12:29])))
    assert decode_plain_png(bytes(interlaced), camera) is None


def chunk(kind: bytes, body: bytes) -> bytes:
    """A PNG chunk: length, type, data and the CRC of type and data."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_the_decoder_falls_back_with_the_same_pixels_and_the_same_errors():
    camera = CameraInfo(height=12, width=10, channels=3)
    frames = scenes(2, 12, 10, 3)
    palette = png(Image.fromarray(frames[0]).convert("P"))
    good = encode_frame(frames[1], camera)
    data = [palette, good, good[:30], b"not an image at all, not at all, not at all..."]
    offsets = np.cumsum([0, *map(len, data)]).astype(np.int64)
    pool = PoolFrames(camera, [b"".join(data)], [offsets], ["shard-00000.tar sample b0"],
                      np.zeros(1, np.int64))  # fmt: skip
    for threads in (0, 2):
        decoder = FrameDecoder(threads)
        out, errors = decoder.decode(pool, np.arange(4))
        decoder.close()
        assert out.shape == (4, 3, 12, 10)
        np.testing.assert_array_equal(out[0], decode_frame(palette, camera).transpose(2, 0, 1))
        np.testing.assert_array_equal(out[1], frames[1].transpose(2, 0, 1))
        assert errors[:2] == ["", ""] and not out[2:].any()
        for row in (2, 3):
            with pytest.raises(FrameError) as expected:
                decode_frame(data[row], camera, f"shard-00000.tar sample b0 row {row}")
            # The same message, but for PIL's address of its file object.
            assert unaddressed(errors[row]) == unaddressed(str(expected.value))
