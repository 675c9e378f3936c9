"""`language:keyframes=K`: a few camera frames per episode (or segment) sent to a vision
model as data-URI images, against a real OpenAI-compatible server on loopback; the relabel
job reads frames only for relabelers that declare them."""

from __future__ import annotations

import base64
import json
import logging
import shutil

import numpy as np
import pyarrow as pa
import pytest

import engine
from engine.collect import Rollouts, collect, plan_collect
from engine.dataset import open_dataset
from engine.executor import InProcess
from jobs.commands.relabel import Relabel
from jobs.relabeling import check_plan
from relabelers import endpoint
from relabelers.base import Columns, Output, Relabeler, RelabelError, relabel_tables
from relabelers.language import LanguageRelabeler
from relabelers.language.keyframes import keyframe_offsets
from schemas import steps as cols
from schemas.frames import FRAMES_GROUP, CameraInfo, encode_frames
from tests.llm_server import data_block, image_urls
from tests.synthetic import make_episodes

MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def expected_steps(length: int, k: int) -> list[int]:
    """Independently: k evenly spaced steps of `length`, first and last, halves rounded up."""
    if k == 1:
        return [length - 1]
    return sorted({int(j * (length - 1) / (k - 1) + 0.5) for j in range(k)})


def with_frames(codec: str, seed: int = 5) -> tuple[pa.Table, pa.Table, dict]:
    """Synthetic episodes with a `frame_render` column of random 8x8 frames in `codec`."""
    steps, episodes = make_episodes(6, seed=seed, min_length=1, max_length=14)
    camera = CameraInfo(height=8, width=8, codec=codec)
    pixels = np.random.default_rng(seed).integers(0, 256, (steps.num_rows, 8, 8, 3), np.uint8)
    steps = steps.append_column(
        "frame_render", pa.array(encode_frames(pixels, camera), pa.binary())
    )
    return steps, episodes, {"render": camera}


def replace_frames(steps: pa.Table, frames: list[bytes]) -> pa.Table:
    index = steps.schema.get_field_index("frame_render")
    return steps.set_column(index, "frame_render", pa.array(frames, pa.binary()))


def stored_frames(steps: pa.Table) -> dict[tuple[int, int], bytes]:
    ids = steps.column(cols.EPISODE_ID).to_pylist()
    t = steps.column(cols.T).to_pylist()
    return dict(zip(zip(ids, t), steps.column("frame_render").to_pylist()))


def stored_steps(uri: str) -> pa.Table:
    """A dataset's ids, steps and stored frames, read back through the engine."""
    columns = [cols.EPISODE_ID, cols.T, "frame_render"]
    return engine.scan(uri, frames=True).select(columns).collect().to_arrow().select(columns)


def check_requests(bodies: list[dict], steps: pa.Table, k: int, media: str, segment=None) -> int:
    """Every request's images are the stored bytes of its unit's keyframes, as data URIs of
    the right media type, in step order; the data block names the same steps."""
    stored = stored_frames(steps)
    lengths: dict[int, int] = {}
    for episode in steps.column(cols.EPISODE_ID).to_pylist():
        lengths[episode] = lengths.get(episode, 0) + 1
    for body in bodies:
        facts = data_block(body)
        episode = facts["episode_id"]
        first = facts.get("first_step", 0)
        length = lengths[episode] if segment is None else min(segment, lengths[episode] - first)
        chosen = [first + s for s in expected_steps(length, k)]
        assert facts["keyframes"] == {"camera": "render", "steps": chosen}
        urls = [u["url"] for u in image_urls(body)]
        assert len(urls) == len(chosen)
        for url, t in zip(urls, chosen):
            head, data = url.split(",", 1)
            assert head == f"data:{media};base64"
            assert base64.b64decode(data) == stored[(episode, t)]
    return len(bodies)


# ---------------------------------------------------------------- which frames


def test_keyframes_are_evenly_spaced_with_first_and_last():
    lengths = np.array([1, 2, 3, 5, 12, 50, 101])
    for k in (1, 2, 3, 4, 8):
        got = [o.tolist() for o in keyframe_offsets(lengths, k)]
        assert got == [expected_steps(int(n), k) for n in lengths]
    assert [o.tolist() for o in keyframe_offsets(np.array([12]), 3)] == [[0, 6, 11]]


# ---------------------------------------------------------------- requests with images


@pytest.mark.parametrize("codec", ["png", "jpeg", "webp"])
def test_images_are_the_stored_bytes_of_the_keyframes_as_data_uris(server, tmp_path, codec):
    steps, episodes, cameras = with_frames(codec)
    relabeler = LanguageRelabeler(
        {"base_url": server.url, "cache": str(tmp_path / "cache"), "keyframes": 3, "n": 2}
    )
    assert relabeler.reads().frames == ("frame_render",)
    output = relabel_tables(relabeler, steps, episodes, parts=2, cameras=cameras)
    rows = output.episodes.to_pylist()
    assert [r["description_status"] for r in rows] == ["ok"] * episodes.num_rows
    assert output.report["keyframes"] == {"k": 3, "camera": "render", "detail": None}
    bodies = [r["body"] for r in server.served]
    assert check_requests(bodies, steps, 3, MEDIA[codec]) == episodes.num_rows
    # Text first (the prompt, then the note about the images), images after; no detail.
    content = bodies[0]["messages"][-1]["content"]
    assert [p["type"] for p in content[:2]] == ["text", "text"]
    assert "<data>" in content[0]["text"] and "keyframes" in content[1]["text"]
    assert all("detail" not in u for u in image_urls(bodies[0]))


def test_segments_send_their_own_keyframes_with_detail(server, tmp_path):
    steps, episodes, cameras = with_frames("png", seed=8)
    relabeler = LanguageRelabeler(
        {
            "base_url": server.url,
            "cache": str(tmp_path / "cache"),
            "keyframes": 2,
            "per": "segment",
            "segment": 5,
            "detail": "low",
            "n": 1,
        }
    )
    output = relabel_tables(relabeler, steps, episodes, cameras=cameras)
    assert set(output.steps.column("description_status").to_pylist()) == {"ok"}
    bodies = [r["body"] for r in server.served]
    segments = sum(-(-n // 5) for n in episodes.column("length").to_pylist())
    assert check_requests(bodies, steps, 2, "image/png", segment=5) == segments
    assert {u["detail"] for b in bodies for u in image_urls(b)} == {"low"}


def test_the_cache_is_keyed_by_the_images(server, tmp_path):
    steps, episodes, cameras = with_frames("png", seed=11)
    params = {"base_url": server.url, "cache": str(tmp_path / "cache"), "keyframes": 3, "n": 1}

    def run(table: pa.Table) -> dict:
        return relabel_tables(LanguageRelabeler(params), table, episodes, cameras=cameras).report

    first = run(steps)
    assert first["requests"] == episodes.num_rows and first["cached"] == 0
    again = run(steps)
    assert again["requests"] == 0 and again["cached"] == episodes.num_rows
    # Change one stored frame: a keyframe of the second episode, then a step none sends.
    ids = steps.column(cols.EPISODE_ID).to_numpy()
    second = int(np.unique(ids)[1])
    rows = np.flatnonzero(ids == second)
    frames = steps.column("frame_render").to_pylist()
    changed = list(frames)
    changed[rows[-1]] = frames[rows[-1]] + b"\0"  # the last step is always sent
    server.reset()
    report = run(replace_frames(steps, changed))
    assert report["requests"] == 1 and report["cached"] == episodes.num_rows - 1
    assert data_block(server.served[0]["body"])["episode_id"] == second
    lengths = episodes.column("length").to_numpy()
    long_episode = int(np.flatnonzero(lengths >= 5)[0])
    middle = np.flatnonzero(ids == int(episodes.column(cols.EPISODE_ID)[long_episode].as_py()))
    sent = {int(middle[0] + o) for o in keyframe_offsets(np.array([len(middle)]), 3)[0]}
    unsent = next(r for r in middle if int(r) not in sent)
    untouched = list(frames)
    untouched[unsent] = frames[unsent] + b"\0"
    server.reset()
    report = run(replace_frames(steps, untouched))
    assert report["requests"] == 0


def test_faults_are_retried_with_images_as_before(server, tmp_path):
    steps, episodes, cameras = with_frames("jpeg", seed=2)
    server.faults.extend(["500", "429", "reset", "nonjson"])
    relabeler = LanguageRelabeler(
        {
            "base_url": server.url,
            "cache": str(tmp_path / "cache"),
            "keyframes": 2,
            "n": 1,
            "concurrency": 4,
        }
    )
    output = relabel_tables(relabeler, steps, episodes, cameras=cameras)
    assert set(output.episodes.column("description_status").to_pylist()) == {"ok"}
    assert output.report["requests"] == episodes.num_rows + 4
    check_requests([r["body"] for r in server.served], steps, 2, "image/jpeg")
    # The budget counts requests as before.
    budget = LanguageRelabeler(
        {
            "base_url": server.url,
            "cache": str(tmp_path / "other-cache"),
            "keyframes": 2,
            "n": 1,
            "max_requests": 2,
        }
    )
    report = relabel_tables(budget, steps, episodes, cameras=cameras).report
    assert report["requests"] == 2 and report["descriptions_by_status"]["budget"] == 4


def test_a_frame_that_is_not_an_image_is_one_line(server, tmp_path):
    steps, episodes, cameras = with_frames("png", seed=4)
    frames = steps.column("frame_render").to_pylist()
    frames[0] = b"not an image"
    steps = replace_frames(steps, frames)
    first = steps.column(cols.EPISODE_ID)[0].as_py()
    relabeler = LanguageRelabeler({"base_url": server.url, "cache": str(tmp_path), "keyframes": 2})
    with pytest.raises(RelabelError, match=rf"episode {first}, step 0, column 'frame_render'"):
        relabel_tables(relabeler, steps, episodes, cameras=cameras)
    assert server.count() == 0  # the frames are checked before any request


# ---------------------------------------------------------------- the job


@pytest.fixture(scope="module")
def pixels(tmp_path_factory) -> str:
    """4 Pendulum episodes of 12 steps with 16x16 PNG frames, in 2 parts."""
    output = tmp_path_factory.mktemp("keyframes") / "pix"
    rollouts = Rollouts(
        "Pendulum-v1",
        noise_levels=(0.0, 1.0),
        seed=3,
        max_steps=12,
        frames=CameraInfo(height=16, width=16, codec="png"),
    )
    collect(plan_collect(rollouts, 4, 2), str(output), executor=InProcess(), command="test")
    return str(output)


def test_relabel_job_sends_the_stored_keyframes(pixels, server, tmp_path, monkeypatch):
    monkeypatch.setenv(endpoint.API_KEY_VARIABLE, "sk-test-keyframes-0123456789")
    child = tmp_path / "described"
    manifest = Relabel(
        input=pixels,
        output=str(child),
        relabelers=[f"language:keyframes=3,n=2,cache={tmp_path / 'cache'}"],
        llm_base_url=server.url,
    ).run()
    steps = stored_steps(pixels)
    assert check_requests([r["body"] for r in server.served], steps, 3, "image/png") == 4
    report = manifest.group("language").relabeler.report
    assert report["keyframes"]["k"] == 3 and report["descriptions_by_status"] == {"ok": 4}
    assert manifest.group(FRAMES_GROUP).inherited and not (child / FRAMES_GROUP).exists()
    cache_text = "".join(p.read_text() for p in (tmp_path / "cache").rglob("*.json"))
    assert "base64" not in cache_text  # the cache holds answers, not requests
    for path in [*child.rglob("*"), *(tmp_path / "cache").rglob("*")]:
        assert not path.is_file() or b"sk-test-keyframes" not in path.read_bytes(), path


def test_offline_ignores_frames_says_so_once_and_never_opens_them(
    pixels, tmp_path, no_endpoint, caplog
):
    damaged = tmp_path / "damaged"
    shutil.copytree(pixels, damaged)
    for path in (damaged / FRAMES_GROUP / "steps").glob("*.parquet"):
        path.write_bytes(b"\0" * path.stat().st_size)
    assert LanguageRelabeler({"keyframes": 3}).reads().frames == ()
    with caplog.at_level(logging.WARNING, logger="hindsight.language"):
        manifest = Relabel(
            input=str(damaged), output=str(tmp_path / "out"), relabelers=["language:keyframes=3"]
        ).run()
    warnings = [r for r in caplog.records if "keyframes=3 ignored" in r.getMessage()]
    assert len(warnings) == 1
    report = manifest.group("language").relabeler.report
    assert report["describer"] == "template" and "ignored" in report["keyframes"]


def test_keyframes_on_a_dataset_without_frames_is_refused(tiny_dataset, pixels, server, tmp_path):
    for name, uri, params, message in (
        ("llm", tiny_dataset, "keyframes=2", "reads camera frames .* but the dataset has none"),
        ("offline", tiny_dataset, "keyframes=2,describer=template", "does not have .*none"),
        (
            "camera",
            pixels,
            "keyframes=2,camera=wrist",
            "does not have; its frame columns: frame_render",
        ),
    ):
        out = tmp_path / name
        with pytest.raises(RelabelError, match=message) as error:
            Relabel(
                input=uri,
                output=str(out),
                relabelers=[f"language:{params}"],
                llm_base_url=server.url,
            ).run()
        assert "\n" not in str(error.value) and not out.exists()
    assert server.count() == 0


class _ReadsFramesAsSteps(Relabeler):
    name = "frames_as_steps"
    version = "1"

    def reads(self) -> Columns:
        return Columns(steps=(cols.EPISODE_ID, "frame_render"))

    def writes(self) -> Columns:
        return Columns()

    def relabel(self, steps, episodes, part) -> Output:
        return Output()


def test_frames_are_read_only_through_columns_frames(pixels):
    with pytest.raises(RelabelError, match="declares the frames it reads in Columns.frames"):
        check_plan(open_dataset(pixels), [_ReadsFramesAsSteps()])


def test_keyframe_parameters_are_checked():
    relabeler = LanguageRelabeler({"keyframes": 2, "detail": "high", "camera": "wrist"})
    assert json.loads(relabeler.params.model_dump_json())["detail"] == "high"
    for bad in ({"camera": "bad name"}, {"keyframes": 17}, {"detail": "medium"}):
        with pytest.raises(RelabelError, match="invalid parameters"):
            LanguageRelabeler({"keyframes": 2, **bad})


@pytest.mark.ray
def test_keyframes_are_read_in_ray_tasks(ray_local, pixels, server, tmp_path, monkeypatch):
    from jobs.relabeling import relabel
    from jobs.runtime import RayExecutor

    monkeypatch.setenv(endpoint.API_KEY_VARIABLE, "sk-test-keyframes-0123456789")
    params = {"base_url": server.url, "cache": str(tmp_path / "cache"), "keyframes": 2, "n": 1}
    manifest = relabel(
        pixels,
        str(tmp_path / "ray"),
        [LanguageRelabeler(params)],
        executor=RayExecutor(),
        command="test",
    )
    assert manifest.group("language").relabeler.report["descriptions_by_status"] == {"ok": 4}
    steps = stored_steps(pixels)
    assert check_requests([r["body"] for r in server.served], steps, 2, "image/png") == 4


# ---------------------------------------------------------------- only the keyframes are read


@pytest.fixture(scope="module")
def pixels_small_row_groups(tmp_path_factory) -> str:
    """As `pixels`, 4 episodes of 15 steps in 1 part, with frame row groups of at most 400
    bytes: 2-3 of these frames each (as ~1 MiB row groups hold big frames)."""
    import engine.writer

    output = tmp_path_factory.mktemp("keyframes-rows") / "pix"
    rollouts = Rollouts(
        "Pendulum-v1",
        noise_levels=(0.0, 1.0),
        seed=3,
        max_steps=15,
        frames=CameraInfo(height=16, width=16, codec="png"),
    )
    saved = engine.writer.FRAME_ROW_GROUP_BYTES
    engine.writer.FRAME_ROW_GROUP_BYTES = 400
    try:
        collect(plan_collect(rollouts, 4, 4), str(output), executor=InProcess(), command="t")
    finally:
        engine.writer.FRAME_ROW_GROUP_BYTES = saved
    return str(output)


def test_frames_are_written_in_row_groups_of_bounded_bytes(pixels_small_row_groups):
    import pyarrow.parquet as pq

    frames = f"{pixels_small_row_groups}/{FRAMES_GROUP}/steps/part-00000.parquet"
    metadata = pq.ParquetFile(frames).metadata
    sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    column = open_dataset(pixels_small_row_groups).read_part(0, "steps", ["frame_render"])
    per_frame = column.column("frame_render").nbytes / 60  # 16x16 PNG: ~140-200 bytes
    assert sizes[:-1] == [int(400 // per_frame)] * (len(sizes) - 1) and sum(sizes) == 60
    base = pq.ParquetFile(f"{pixels_small_row_groups}/base/steps/part-00000.parquet").metadata
    assert base.num_row_groups == 1  # other columns keep ROW_GROUP_ROWS


def test_the_job_reads_only_the_keyframes_row_groups(pixels_small_row_groups, server, tmp_path):
    import pyarrow.parquet as pq

    from engine.query import ReadStats, read_part_rows
    from jobs.relabeling import PartReader

    dataset = open_dataset(pixels_small_row_groups)
    params = {"base_url": server.url, "cache": str(tmp_path / "cache"), "keyframes": 2}
    relabeler = LanguageRelabeler(params)
    reader = PartReader.of(dataset, relabeler)
    part = reader.part(0)
    steps, _ = reader.read(part, relabeler=relabeler)
    whole = dataset.read_part(0, "steps", ["frame_render"]).column("frame_render").to_pylist()
    seen = steps.column("frame_render").to_pylist()
    # Keyframes of 2: each episode's first and last step; every other frame null, unread.
    ends = np.flatnonzero(np.diff(steps.column(cols.EPISODE_ID).to_numpy(), append=-1))
    chosen = sorted({0, *(ends + 1)[:-1].tolist(), *ends.tolist()})
    assert [i for i, f in enumerate(seen) if f is not None] == chosen
    assert all(seen[i] == whole[i] for i in chosen)
    stats, all_rows = ReadStats(), ReadStats()
    read_part_rows(dataset, 0, "steps", ["frame_render"], np.array(chosen), stats)
    read_part_rows(dataset, 0, "steps", ["frame_render"], np.arange(60), all_rows)
    per_group = pq.ParquetFile(dataset.uri + "/frames/steps/part-00000.parquet").metadata
    rows_per_group = per_group.row_group(0).num_rows
    assert stats.row_groups == len({r // rows_per_group for r in chosen}) < all_rows.row_groups
    assert stats.bytes < all_rows.bytes  # the footer (~12 KB here) is read either way
    # The job, on any executor, reads those row groups and no other: in a copy whose
    # other row groups of frames are zeroed (a read would fail its page CRC), it succeeds
    # and sends exactly the stored keyframes; setup's pass reads no frame at all.
    damaged = tmp_path / "damaged"
    shutil.copytree(pixels_small_row_groups, damaged)
    path = damaged / FRAMES_GROUP / "steps" / "part-00000.parquet"
    data = bytearray(path.read_bytes())
    for i in range(per_group.num_row_groups):
        if i not in {r // rows_per_group for r in chosen}:
            chunk = per_group.row_group(i).column(0)
            start = chunk.dictionary_page_offset or chunk.data_page_offset
            data[start : start + chunk.total_compressed_size] = bytes(chunk.total_compressed_size)
    path.write_bytes(bytes(data))
    Relabel(
        input=str(damaged),
        output=str(tmp_path / "described"),
        relabelers=[f"language:keyframes=2,n=1,cache={tmp_path / 'cache2'}"],
        llm_base_url=server.url,
    ).run()
    with pytest.raises(Exception, match="part-00000.parquet"):
        open_dataset(str(damaged)).read_part(0, "steps", ["frame_render"])  # whole: fails
    bodies = [r["body"] for r in server.served]
    assert check_requests(bodies[-4:], stored_steps(pixels_small_row_groups), 2, "image/png") == 4
