"""The on-disk contract: parts, groups aligned row for row, manifest last."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

import engine
from engine import storage
from engine.dataset import DatasetError, open_dataset
from engine.parts import split_into_parts
from engine.writer import VersionWriter, base_manifest
from tests.synthetic import attach_group, make_episodes, write_synthetic_dataset


def test_round_trip_equals_source(tmp_path):
    steps, episodes = make_episodes(num_episodes=12, seed=1)
    uri = str(tmp_path / "ds")
    manifest = write_synthetic_dataset(uri, steps, episodes, part_steps=40)
    assert manifest.steps == steps.num_rows and manifest.episodes == episodes.num_rows
    assert len(manifest.parts) > 1
    read = engine.scan(uri).collect()
    assert read["episode_id"].to_list() == steps.column("episode_id").to_pylist()
    np.testing.assert_array_equal(
        np.stack(read["observation"].to_list()), np.stack(steps.column("observation").to_pylist())
    )
    assert (
        engine.scan_episodes(uri).select(pl.col("length").sum()).collect().item() == steps.num_rows
    )


def test_parts_hold_whole_episodes():
    lengths = np.array([5, 1, 30, 2, 2, 7])
    ranges = split_into_parts(lengths, part_steps=6)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_uncommitted_version_is_not_a_dataset(tmp_path):
    writer = VersionWriter(str(tmp_path / "half")).begin()
    with pytest.raises(DatasetError, match="died before committing"):
        open_dataset(writer.uri)


def test_committed_version_is_immutable(tiny_dataset):
    with pytest.raises(DatasetError, match="immutable"):
        VersionWriter(tiny_dataset).begin()


def test_changed_file_is_detected(tiny_dataset):
    dataset = open_dataset(tiny_dataset)
    victim = dataset.file_uris(dataset.manifest.groups[0], "steps")[0]
    with open(victim, "ab") as handle:
        handle.write(b"x")
    with pytest.raises(DatasetError, match="changed"):
        open_dataset(tiny_dataset)


def test_a_damaged_file_of_the_same_size_fails_to_read_with_its_name(tiny_dataset):
    dataset = open_dataset(tiny_dataset)
    victim = dataset.file_uris(dataset.manifest.groups[0], "steps")[1]
    with open(victim, "r+b") as handle:  # the footer's length: unreadable, same size
        handle.seek(-8, 2)
        handle.write(b"\xff\xff\xff\x7f")
    with pytest.raises(DatasetError, match=r"part-00001.parquet: cannot read(.|\n)*--verify"):
        open_dataset(tiny_dataset).read_part(1)
    with pytest.raises(DatasetError, match="part-00001.parquet .* another sha256"):
        open_dataset(tiny_dataset, verify_checksums=True)
    # Schemas come from part 0's footers (query, relabel and shard plans read them).
    first = dataset.file_uris(dataset.manifest.groups[0], "steps")[0]
    with open(first, "r+b") as handle:
        handle.seek(-8, 2)
        handle.write(b"\xff\xff\xff\x7f")
    with pytest.raises(DatasetError, match=r"part-00000.parquet: cannot read"):
        open_dataset(tiny_dataset).arrow_schema("steps")


def test_a_flipped_byte_in_a_data_page_is_caught_by_the_page_crc(tiny_dataset):
    """Without page CRCs such a file reads fine and gives wrong numbers (zstd frames of
    incompressible floats are stored raw)."""
    from engine.query import PartReader, ReadStats

    dataset = open_dataset(tiny_dataset)
    victim = dataset.file_uris(dataset.manifest.groups[0], "steps")[0]
    metadata = pq.read_metadata(victim)
    chunk = next(
        metadata.row_group(0).column(j)
        for j in range(metadata.num_columns)
        if metadata.row_group(0).column(j).path_in_schema.startswith("observation")
    )
    with open(victim, "r+b") as handle:  # the last bytes of the chunk: values, not headers
        handle.seek(chunk.data_page_offset + chunk.total_compressed_size - 8)
        value = handle.read(4)
        handle.seek(-4, 1)
        handle.write(bytes(b ^ 0x5A for b in value))
    with pytest.raises(DatasetError, match=r"part-00000.parquet: cannot read.*CRC"):
        dataset.read_part(0)
    with pytest.raises(DatasetError, match=r"part-00000.parquet: cannot read.*CRC"):
        PartReader(dataset, "steps", ReadStats()).read(0, ["observation"], np.array([0, 1]))


def test_child_group_is_zipped_and_parent_not_copied(tiny_dataset, tmp_path):
    import pyarrow as pa

    def doubled(parent, index):
        steps = parent.read_part(index, columns=["reward"])
        return pa.table({"double_reward": pa.compute.multiply(steps.column("reward"), 2)}), None

    parent = open_dataset(tiny_dataset)
    child_uri = attach_group(tiny_dataset, str(tmp_path / "child"), "double", doubled)
    frame = engine.scan(child_uri).collect()
    np.testing.assert_allclose(frame["double_reward"], 2 * frame["reward"])
    assert not any("base" in f for f in storage.list_files(child_uri))
    saved = json.loads(open(storage.join(child_uri, "manifest.json")).read())
    assert [h["operation"] for h in saved["history"]] == ["ingest", "relabel"]
    assert saved["parent_id"] == parent.manifest.dataset_id


def test_a_tree_of_versions_can_be_moved_together(tmp_path):
    """Roots are stored relative to the version: a parent and its child copied elsewhere
    read their own copies; a child moved without its parent says where the parent was."""
    import pyarrow as pa

    steps, episodes = make_episodes(num_episodes=8, seed=4)
    write_synthetic_dataset(str(tmp_path / "data" / "base"), steps, episodes, part_steps=40)

    def labels(parent, index):
        n = parent.manifest.parts[index].steps
        return pa.table({"label": np.full(n, index, dtype=np.int32)}), None

    attach_group(str(tmp_path / "data" / "base"), str(tmp_path / "data" / "child"), "l", labels)
    saved = json.loads((tmp_path / "data" / "child" / "manifest.json").read_text())
    assert [g["root"] for g in saved["groups"]] == ["../base", "."]
    expected = engine.scan(str(tmp_path / "data" / "child")).collect()

    shutil.copytree(tmp_path / "data", tmp_path / "moved")
    shutil.rmtree(tmp_path / "data")
    moved = open_dataset(str(tmp_path / "moved" / "child"), verify_checksums=True)
    assert {g.root for g in moved.manifest.groups} == {
        str(tmp_path / "moved" / "base"),
        str(tmp_path / "moved" / "child"),
    }
    assert engine.scan(moved.uri).collect().equals(expected)

    # Written through a symlinked directory, opened through the real one (and back).
    link = tmp_path / "deeper" / "down" / "link"
    link.parent.mkdir(parents=True)
    link.symlink_to(tmp_path / "moved")
    attach_group(str(tmp_path / "moved" / "base"), str(link / "other"), "l", labels)
    for opened in (tmp_path / "moved" / "other", link / "other"):
        assert engine.scan(str(opened)).collect().equals(expected)

    shutil.move(tmp_path / "moved" / "child", tmp_path / "child-alone")
    with pytest.raises(DatasetError, match="inherited from the parent version at"):
        open_dataset(str(tmp_path / "child-alone"))


@pytest.mark.s3
def test_round_trip_on_s3(s3_bucket):
    steps, episodes = make_episodes(num_episodes=5, seed=2)
    uri = f"{s3_bucket}/datasets/small"
    write_synthetic_dataset(uri, steps, episodes)
    assert engine.scan(uri).select(pl.len()).collect().item() == steps.num_rows
    assert open_dataset(uri, verify_checksums=True).manifest.episodes == 5


def test_a_task_of_a_run_that_died_cannot_overwrite_the_rerun(tmp_path):
    """Ray workers can outlive a killed driver: their writes are fenced by the run token."""
    steps, episodes = make_episodes(num_episodes=3, seed=5)
    dead_run = VersionWriter(str(tmp_path / "ds")).begin()
    rerun = VersionWriter(dead_run.uri).begin()  # the leftovers go, a new token is written
    assert dead_run.token != rerun.token

    with pytest.raises(storage.StaleWriterError, match="another run"):
        dead_run.write_part(0, steps, episodes)
    assert storage.list_files(rerun.uri) == [storage.join(rerun.uri, "_staging")]  # no file

    written = rerun.write_part(0, steps, episodes)
    rerun.commit(base_manifest(rerun.uri, [written], operation="ingest", command="test"))
    assert open_dataset(rerun.uri).manifest.steps == steps.num_rows
    # Committed: not even the run's own token writes any more.
    with pytest.raises(storage.StaleWriterError):
        rerun.write_part(1, steps, episodes)


def test_a_failed_run_removes_its_directory_only_while_it_owns_it(tmp_path):
    first = VersionWriter(str(tmp_path / "ds")).begin()
    second = VersionWriter(first.uri).begin()  # another run takes the directory over
    first.abort()
    assert storage.exists(storage.join(first.uri, "_staging"))  # the new run's marker stays
    second.abort()
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_a_file_landing_while_its_run_is_discarded_is_taken_back(where, tmp_path, request):
    """A stopped job: its driver discards the staging while a task that passed its fence is
    still uploading. Whichever finishes last removes the file; what stays is never data
    without the marker (which a re-run would refuse as not written by hindsight)."""
    base = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    run = VersionWriter(f"{base}/stopped").begin()
    storage.write_bytes(storage.join(run.uri, "steps/a"), b"early", before_commit=run.check_fence)
    checks = []

    def fence_while_the_driver_discards() -> None:
        checks.append(1)
        if len(checks) == 1:  # passed before the stop; the driver discards during the upload
            run.check_fence()
            run.abort()
        else:
            run.check_fence()

    with pytest.raises(storage.StaleWriterError):
        storage.write_bytes(
            storage.join(run.uri, "steps/late"),
            b"late",
            before_commit=fence_while_the_driver_discards,
        )
    assert storage.list_files(run.uri) == []
    rerun = VersionWriter(run.uri).begin()  # the re-run is not refused
    rerun.abort()


def test_a_failure_inside_the_writer_leaves_nothing(tmp_path):
    steps, episodes = make_episodes(num_episodes=3, seed=5)
    with pytest.raises(RuntimeError, match="disk on fire"):
        with VersionWriter(str(tmp_path / "ds")) as writer:
            writer.write_part(0, steps, episodes)
            raise RuntimeError("disk on fire")
    assert not (tmp_path / "ds").exists()


def test_an_existing_file_or_foreign_directory_is_refused_before_any_work(tmp_path):
    from engine.writer import OutputExistsError, check_new_output

    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="existing file"):
        check_new_output(str(tmp_path / "file"))
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="not written by hindsight"):
        check_new_output(str(tmp_path / "theirs"))
    assert (tmp_path / "theirs" / "notes.txt").exists()
