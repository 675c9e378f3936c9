"""A stored video camera damaged on disk is caught by the Parquet page CRC before a decoder
sees its bytes, whatever the codec and whether or not the bitstream carries picture hashes
(a LeRobot HEVC camera copied at ingest carries none): single bits flipped inside the data
page of the video column of the frames group's episodes file are a read error naming the
file (one line from `hindsight view`), never other frames.

The page *header* is not under the CRC: most of it is the page's min/max statistics (for
videos under 4 KiB, both whole videos), which no reader uses; see the last test for its
structural fields (engine/dataset.py check_rows_read)."""

from __future__ import annotations

import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.collect import Rollouts, collect, plan_collect
from engine.dataset import DatasetError, open_dataset
from engine.executor import InProcess
from engine.view import episode_frames
from jobs.cli import main
from schemas.frames import FRAMES_GROUP, CameraInfo, frame_column
from tests import lerobot_datasets as lrd
from tests.test_lerobot_video_copy import ingest_to

FLIPS = 20


def video_dataset(root, source: str, monkeypatch) -> str:
    """Two or three episodes with a video camera: collected as h264 or hevc (hindsight's
    x265 writes an MD5 of each picture), or a LeRobot HEVC camera copied at ingest."""
    out = str(root / source)
    if source == "lerobot-hevc":
        monkeypatch.setattr(lrd, "video_codec", lambda: "hevc")
        data = lrd.make_data([5, 7, 4], camera=(32, 64))
        origin = ingest_to(lrd.write_v30(root / "src", data, episodes_per_file=3), out)
        assert origin["copied_episodes"] == 3  # the source's bitstream, stored as it came
        return out
    camera = CameraInfo(height=32, width=32, codec=source)
    rollouts = Rollouts("Pendulum-v1", noise_levels=(0.0,), max_steps=12, frames=camera)
    collect(plan_collect(rollouts, 2, 2), out, executor=InProcess(), command="test")
    return out


def video_chunk(uri: str) -> tuple[str, str, int, int]:
    """The camera, its episodes file, and where the video column's chunk lies in it."""
    dataset = open_dataset(uri)
    (camera,) = dataset.cameras
    path = dataset.file_uris(dataset.manifest.group(FRAMES_GROUP), "episodes")[0]
    metadata = pq.read_metadata(path)
    assert metadata.num_row_groups == 1
    names = [metadata.schema.column(j).path for j in range(metadata.num_columns)]
    chunk = metadata.row_group(0).column(names.index(frame_column(camera)))
    return camera, path, chunk.data_page_offset, chunk.total_compressed_size


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        value |= (data[at] & 0x7F) << shift
        shift, at = shift + 7, at + 1
        if not data[at - 1] & 0x80:
            return value, at


def compressed_page_size(header: bytes) -> int:
    """Field 3 of a Parquet PageHeader (Thrift compact: three i32 fields, each a 0x15 byte
    and a zigzag varint: the page type, its uncompressed and its compressed size)."""
    at, values = 0, []
    for _ in range(3):
        assert header[at] == 0x15, header[:16].hex()
        value, at = _varint(header, at + 1)
        values.append((value >> 1) ^ -(value & 1))
    return values[2]


def flipped(path: str, original: bytes, position: int, bit: int) -> None:
    damaged = bytearray(original)
    damaged[position] ^= 1 << bit
    with open(path, "wb") as handle:
        handle.write(damaged)


@pytest.mark.parametrize("source", ["h264", "hevc", "lerobot-hevc"])
def test_a_flipped_bit_in_a_stored_video_is_a_read_error_naming_the_file(
    source, tmp_path, monkeypatch, capsys
):
    uri = video_dataset(tmp_path, source, monkeypatch)
    camera, path, start, size = video_chunk(uri)
    original = open(path, "rb").read()
    # The chunk's one data page is its last bytes; before them, the page header.
    page = compressed_page_size(original[start : start + 32])
    assert 0 < page < size
    episodes = open_dataset(uri).read("episodes", ["episode_id"]).column(0).to_pylist()
    undamaged = {episode: episode_frames(uri, episode).frames for episode in episodes}
    rng = np.random.default_rng(0)
    sheet = str(tmp_path / "sheet.png")
    for _ in range(FLIPS):
        position = start + size - page + int(rng.integers(page))
        flipped(path, original, position, int(rng.integers(8)))
        for episode in episodes:  # every episode: one page holds them all
            with pytest.raises(DatasetError, match=rf"^{re.escape(path)}: cannot read: .*CRC"):
                episode_frames(uri, episode)
        assert main(["view", uri, "--episode", str(episodes[-1]), "--output", sheet]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{path}: cannot read" in err[0], err
    with open(path, "wb") as handle:
        handle.write(original)
    for episode in episodes:  # the precondition: the undamaged file reads its frames
        np.testing.assert_array_equal(episode_frames(uri, episode).frames, undamaged[episode])


def test_a_flipped_bit_in_the_page_headers_fields_is_an_error_or_changes_nothing(
    tmp_path, monkeypatch
):
    """Every bit of the first 20 header bytes (type, sizes, CRC, value count, encodings;
    the statistics follow): a read error naming the file or the same frames, never others.
    A page turned into another page type, or its value count into 0, reads in pyarrow as
    a column with no rows and no error: the readers count the rows they get."""
    uri = video_dataset(tmp_path, "hevc", monkeypatch)
    _, path, start, _ = video_chunk(uri)
    original = open(path, "rb").read()
    undamaged = episode_frames(uri, 1).frames
    errors = []
    try:
        for position in range(start, start + 20):
            for bit in range(8):
                flipped(path, original, position, bit)
                try:
                    frames = episode_frames(uri, 1).frames
                except DatasetError as error:
                    assert str(error).startswith(f"{path}: cannot read"), error
                    errors.append(str(error))
                    continue
                np.testing.assert_array_equal(frames, undamaged)
    finally:
        with open(path, "wb") as handle:
            handle.write(original)
    # 8 of these 160 bits read as no rows (7 in the page type, 1 in the value count).
    assert sum("0 rows read where the file holds 2" in error for error in errors) == 8
