"""Damaged or foreign data never becomes a clean version (issue 17, class 3), and a tampered
shard index is one clear line (class 5): page CRCs on every read a written version comes
from, manifest entries that stay inside their version (or lead to its recorded parent),
`--verify` recomputing the dataset id, shard names inside the shard directory, and an index
whose window, window counts and shapes are checked against the shards."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from engine import storage
from engine.dataset import DatasetError, open_dataset
from engine.executor import InProcess
from engine.info import dataset_info
from engine.materialize import materialize
from engine.query import query, write_subset
from engine.shards import ShardSettings, write_shards
from schemas.manifest import content_id
from tests.synthetic import attach_group, make_episodes, write_synthetic_dataset
from trainers.loader import ShardError, read_index, shard_blocks, stream

CLI_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, env=CLI_ENV
    )


def assert_one_line_error(completed: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit status 2, one line on stderr naming what is wrong, no traceback."""
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in completed.stderr, completed.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def flip_observation_values(path: str) -> None:
    """Flip 4 bytes of observation values in the first row group: the file keeps its size
    and its footer, and a reader without page CRCs decodes other numbers (zstd stores
    incompressible floats raw)."""
    metadata = pq.read_metadata(path)
    chunk = next(
        metadata.row_group(0).column(j)
        for j in range(metadata.num_columns)
        if metadata.row_group(0).column(j).path_in_schema.startswith("observation")
    )
    with open(path, "r+b") as handle:
        handle.seek(chunk.data_page_offset + chunk.total_compressed_size - 8)
        value = handle.read(4)
        handle.seek(-4, 1)
        handle.write(bytes(b ^ 0x5A for b in value))


def rewrite_manifest(uri: str, change) -> None:
    path = os.path.join(uri, "manifest.json")
    manifest = json.loads(open(path).read())
    change(manifest)
    with open(path, "w") as handle:
        json.dump(manifest, handle)


# ---------------------------------------------------------------- page checksums


def test_a_damaged_part_never_becomes_a_new_version(tiny_dataset, tmp_path):
    dataset = open_dataset(tiny_dataset)
    victim = dataset.file_uris(dataset.manifest.group("base"), "steps")[0]
    before = pl.read_parquet(victim)["observation"].to_list()
    flip_observation_values(victim)
    # Precondition: Polars' own reader decodes the damaged page without a word.
    assert pl.read_parquet(victim)["observation"].to_list() != before

    out = str(tmp_path / "subset")
    with pytest.raises(DatasetError, match=r"part-00000.parquet: cannot read.*CRC"):
        write_subset(tiny_dataset, "noise >= 0", out, command="test")
    assert not os.path.exists(out)
    completed = run_cli("query", tiny_dataset, "--where", "noise >= 0", "--output", out)
    assert_one_line_error(completed, "part-00000.parquet: cannot read")
    assert not os.path.exists(out)

    # Plain queries check the pages they read too: no wrong rows, the file named.
    with pytest.raises(DatasetError, match=r"part-00000.parquet: cannot read.*CRC"):
        query(tiny_dataset, select=["episode_id", "observation"])
    with pytest.raises(DatasetError, match=r"part-00000.parquet: cannot read.*CRC"):
        materialize(dataset, str(tmp_path / "copy"), executor=InProcess(), command="test")
    assert not os.path.exists(tmp_path / "copy")
    with pytest.raises(ShardError, match=r"part-00000.parquet: cannot read.*CRC"):
        write_shards(
            dataset, ShardSettings(), str(tmp_path / "s"), executor=InProcess(), command="t"
        )
    assert not os.path.exists(tmp_path / "s")


def test_a_page_header_that_hides_its_rows_is_an_error(tiny_dataset, tmp_path):
    """The page CRC covers a page's data, not its header: a flipped bit that turns the
    data page into another page type reads in pyarrow as a column with no rows and no
    error. The readers count the rows they get (before: `query --select reward` printed
    an empty table; `view` of a video camera, an IndexError)."""
    dataset = open_dataset(tiny_dataset)
    victim = dataset.file_uris(dataset.manifest.group("base"), "steps")[0]
    metadata = pq.read_metadata(victim)
    names = [metadata.schema.column(j).path for j in range(metadata.num_columns)]
    chunk = metadata.row_group(0).column(names.index("reward"))
    with open(victim, "r+b") as handle:
        handle.seek(chunk.data_page_offset + 1)  # PageHeader field 1, the page type
        assert handle.read(1) == b"\x00"  # DATA_PAGE
        handle.seek(-1, 1)
        handle.write(b"\x02")  # INDEX_PAGE, which readers skip
    assert pq.read_table(victim, columns=["reward"]).num_rows == 0  # the precondition
    rows = rf"part-00000.parquet: cannot read: 0 rows read where the file holds {metadata.num_rows}"
    with pytest.raises(DatasetError, match=rows):
        query(tiny_dataset, select=["reward"])
    with pytest.raises(DatasetError, match=rows):
        dataset.read_part(0, "steps", ["reward"])
    completed = run_cli("query", tiny_dataset, "--select", "reward")
    assert_one_line_error(completed, "part-00000.parquet: cannot read: 0 rows read")


def test_a_row_group_count_flipped_in_the_footer_is_an_error(tmp_path):
    """The footer is under no CRC either: a row group's count flipped there (1000 -> 936)
    placed the rows after it wrongly (rows 950 and 1500 read as 1014 and 1564)."""
    import struct

    import pyarrow as pa

    from engine.query.read import ReadStats, read_rows_arrow

    path = str(tmp_path / "f.parquet")
    table = pa.table({"reward": np.arange(2000, dtype=np.float64)})
    pq.write_table(table, path, write_page_checksum=True, row_group_size=1000)
    data = bytearray(open(path, "rb").read())
    footer = len(data) - 8 - struct.unpack("<I", data[-8:-4])[0]
    # 1000 as a Thrift varint (zigzag 2000) is the row group's count, and the value counts
    # of its column chunk and page: flip the one that is the row group's.
    for count in [i for i in range(footer, len(data) - 8) if data[i : i + 2] == b"\xd0\x0f"]:
        data[count + 1] ^= 1
        open(path, "wb").write(bytes(data))
        if pq.read_metadata(path).row_group(0).num_rows == 936:
            break
        data[count + 1] ^= 1
    assert pq.read_metadata(path).row_group(0).num_rows == 936  # the precondition
    with pytest.raises(
        DatasetError, match="f.parquet: cannot read: 1936 rows read where the file holds 2000"
    ):
        read_rows_arrow(path, ["reward"], np.array([950, 1500]), ReadStats())
    with pytest.raises(DatasetError, match="f.parquet: cannot read"):
        read_rows_arrow(path, ["reward"], None, ReadStats())


# ---------------------------------------------------------------- entries outside the version


def foreign_copy(tmp_path, uri: str, path: str) -> str:
    """A byte-identical copy of one of the version's files, outside the version."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    target = elsewhere / "part.parquet"
    shutil.copy(os.path.join(uri, path), target)
    return str(target)


@pytest.mark.parametrize("how", ["dot-dot", "absolute"])
def test_a_file_entry_that_leaves_its_version_is_refused(tiny_dataset, tmp_path, how):
    """Same bytes, same size and sha256 as the entry records: still refused, by name."""
    path = "base/steps/part-00001.parquet"
    target = foreign_copy(tmp_path, tiny_dataset, path)
    pointer = os.path.relpath(target, tiny_dataset) if how == "dot-dot" else target

    def point_away(manifest):
        manifest["groups"][0]["steps_files"][1]["path"] = pointer

    rewrite_manifest(tiny_dataset, point_away)
    with pytest.raises(DatasetError, match=rf"group 'base'.*{pointer}.*outside"):
        open_dataset(tiny_dataset)


def test_an_own_group_rooted_elsewhere_is_refused(tiny_dataset, tmp_path):
    shutil.copytree(tiny_dataset, tmp_path / "twin")

    def point_away(manifest):
        manifest["groups"][0]["root"] = str(tmp_path / "twin")

    rewrite_manifest(tiny_dataset, point_away)
    with pytest.raises(DatasetError, match=r"group 'base'.*twin.*not this version's directory"):
        open_dataset(tiny_dataset)


def labelled_child(tmp_path) -> tuple[str, str]:
    """data/base and its child data/child with one more group."""
    import pyarrow as pa

    steps, episodes = make_episodes(num_episodes=8, seed=4)
    base = str(tmp_path / "data" / "base")
    write_synthetic_dataset(base, steps, episodes, part_steps=40)

    def labels(parent, index):
        n = parent.manifest.parts[index].steps
        return pa.table({"label": np.full(n, index, dtype=np.int32)}), None

    child = attach_group(base, str(tmp_path / "data" / "child"), "l", labels)
    return base, child


def test_inherited_groups_lead_only_to_the_recorded_parent(tmp_path):
    base, child = labelled_child(tmp_path)
    # Another version with byte-identical files but another lineage: not the parent.
    shutil.copytree(base, tmp_path / "data" / "impostor")

    def impostor_parent_id(manifest):
        manifest["dataset_id"] = "0123456789abcdef"
        manifest["history"][-1]["dataset_id"] = "0123456789abcdef"

    rewrite_manifest(str(tmp_path / "data" / "impostor"), impostor_parent_id)

    def to_impostor(manifest):
        manifest["groups"][0]["root"] = "../impostor"

    rewrite_manifest(child, to_impostor)
    with pytest.raises(DatasetError, match=r"group 'base'.*impostor.*not the parent"):
        open_dataset(child)

    # A version without a parent has no inherited groups.
    def orphan(manifest):
        manifest["groups"][0]["root"] = "../base"
        manifest["parent_id"] = None
        manifest["parent_uri"] = None

    rewrite_manifest(child, orphan)
    with pytest.raises(DatasetError, match=r"group 'base'.*no parent"):
        open_dataset(child)


def test_an_inherited_group_must_be_the_parents_own(tmp_path):
    """The inherited entries must equal the parent's group (files, sizes, checksums, in
    order): entries reshuffled inside the parent's tree, each matching its file, are not
    the parent's group."""
    base, child = labelled_child(tmp_path)

    def swap_entries(manifest):
        files = manifest["groups"][0]["steps_files"]
        files[0], files[1] = files[1], files[0]

    rewrite_manifest(child, swap_entries)
    with pytest.raises(DatasetError, match=r"group 'base'.*not the parent's group"):
        open_dataset(child)


@pytest.mark.s3
def test_an_entry_in_another_bucket_is_refused(s3_bucket, s3_server):
    import boto3

    steps, episodes = make_episodes(num_episodes=5, seed=2)
    uri = f"{s3_bucket}/datasets/small"
    write_synthetic_dataset(uri, steps, episodes)
    client = boto3.client("s3", endpoint_url=s3_server)
    other = s3_bucket.removeprefix("s3://") + "-other"
    client.create_bucket(Bucket=other)
    for level in ("steps", "episodes"):  # byte-identical copies: only the place differs
        key = f"datasets/small/base/{level}/part-00000.parquet"
        source = {"Bucket": s3_bucket.removeprefix("s3://"), "Key": key}
        client.copy_object(Bucket=other, Key=key, CopySource=source)
    manifest = json.loads(storage.read_bytes(f"{uri}/manifest.json"))
    manifest["groups"][0]["root"] = f"s3://{other}/datasets/small"
    storage.write_bytes(f"{uri}/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(DatasetError, match=rf"group 'base'.*s3://{other}"):
        open_dataset(uri)


def test_a_child_and_its_parent_still_move_together(tmp_path):
    base, child = labelled_child(tmp_path)
    shutil.copytree(tmp_path / "data", tmp_path / "moved")
    moved = open_dataset(str(tmp_path / "moved" / "child"))
    assert {g.root for g in moved.manifest.groups} == {
        str(tmp_path / "moved" / "base"),
        str(tmp_path / "moved" / "child"),
    }


# ---------------------------------------------------------------- --verify and the dataset id


def test_verify_recomputes_the_dataset_id(tiny_dataset, tmp_path):
    manifest = open_dataset(tiny_dataset).manifest
    assert content_id(manifest.groups, manifest.parent_id) == manifest.dataset_id
    assert dataset_info(tiny_dataset, verify=True)["verified_files"] > 0

    # A file rewritten (the same rows, other bytes), its size and sha256 updated in the
    # manifest but not the id: every file matches its entry, the id does not match them.
    path = os.path.join(tiny_dataset, "base/steps/part-00000.parquet")
    before = storage.sha256_uri(path)
    pq.write_table(pq.read_table(path), path, compression="snappy", write_page_checksum=True)
    sha256 = storage.sha256_uri(path)
    assert sha256 != before

    def update_entry(saved):
        entry = saved["groups"][0]["steps_files"][0]
        entry["bytes"], entry["sha256"] = os.path.getsize(path), sha256

    rewrite_manifest(tiny_dataset, update_entry)
    open_dataset(tiny_dataset)  # opening checks sizes, not the id
    with pytest.raises(DatasetError, match=rf"dataset id {manifest.dataset_id}.*recomputed"):
        dataset_info(tiny_dataset, verify=True)
    completed = run_cli("info", tiny_dataset, "--verify")
    assert_one_line_error(completed, manifest.dataset_id, "recomputed")


# ---------------------------------------------------------------- shard indexes


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    from tests.test_shards import conditioned_dataset

    root = tmp_path_factory.mktemp("damaged-shards")
    dataset = open_dataset(conditioned_dataset(str(root / "ds"), num_episodes=12))
    settings = ShardSettings(
        condition=("return_to_go", "skill"), window=5, shard_steps=100, block_steps=64
    )
    out = str(root / "shards")
    write_shards(dataset, settings, out, executor=InProcess(), command="test")
    return out


def tampered(shard_dir: str, target, change) -> str:
    shutil.copytree(shard_dir, target)
    path = os.path.join(target, "index.json")
    index = json.loads(open(path).read())
    change(index)
    with open(path, "w") as handle:
        json.dump(index, handle)
    return str(target)


@pytest.mark.parametrize(
    "name", ["../shard-00000.tar", "/tmp/shard-00000.tar", "s3://other/shard.tar", "a/b.tar", ""]
)
def test_shard_names_must_be_files_inside_the_shard_directory(shard_dir, tmp_path, name):
    def rename(index):
        index["shards"][0]["name"] = name

    shards = tampered(shard_dir, tmp_path / "named", rename)
    with pytest.raises(ShardError, match=r"index.json.*shards\.0\.name"):
        read_index(shards)


def read_all(shards: str, **options) -> int:
    loader = stream(shards, 16, ["return_to_go", "skill"], epochs=1, **options)
    return sum(len(batch["episode_id"]) for batch in loader)


@pytest.mark.parametrize(
    "field, change",
    [
        ("window", lambda index: index.update(window=index["window"] + 3)),
        ("window", lambda index: index.update(window=index["window"] - 2)),
        ("observation.shape", lambda index: index["observation"].update(shape=[4])),
        ("action.dim", lambda index: index["action"].update(dim=5)),
        (
            "conditions.skill.vocabulary",
            lambda index: index["conditions"]["skill"].update(vocabulary=["novice"]),
        ),
    ],
)
def test_index_fields_are_checked_against_the_shards(shard_dir, tmp_path, field, change):
    shards = tampered(shard_dir, tmp_path / "changed", change)
    with pytest.raises(ShardError, match=rf"shard-0000\d\.tar.*{field}"):
        read_all(shards)
    # Not a corrupt shard to skip: the index is wrong for every shard.
    with pytest.raises(ShardError, match=field):
        read_all(shards, on_error="skip")


def test_window_counts_are_checked_against_the_shards(shard_dir, tmp_path):
    def more_windows(index):
        index["shards"][0]["windows"] += 7
        index["windows"] += 7

    shards = tampered(shard_dir, tmp_path / "counts", more_windows)
    name = read_index(shards).shards[0].name
    with pytest.raises(ShardError, match=rf"{name}.*windows"):
        read_all(shards)

    def total_only(index):
        index["windows"] += 1

    shards = tampered(shard_dir, tmp_path / "total", total_only)
    with pytest.raises(ShardError, match=r"index.json.*windows"):
        read_index(shards)


def test_a_member_larger_than_the_index_allows_is_not_read(shard_dir, tmp_path):
    copy = tmp_path / "big"
    shutil.copytree(shard_dir, copy)
    index = read_index(str(copy))
    name = index.shards[0].name
    with tarfile.open(copy / name) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    huge = np.zeros(64 << 20, dtype=np.uint8)  # 64 MiB of rewards for a 64-step block
    buffer = io.BytesIO()
    np.save(buffer, huge)
    with tarfile.open(copy / name, "w", format=tarfile.USTAR_FORMAT) as archive:
        for member, data in members:
            if member.name.endswith(".reward.npy") and member.name.startswith("b000000"):
                data = buffer.getvalue()
                member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    with pytest.raises(ShardError, match=rf"{name}.*b000000.reward.npy.*bytes"):
        read_all(str(copy))
    # Refused from the member's tar header alone, without the shard's recorded size.
    with pytest.raises(ShardError, match=r"b000000.reward.npy.* bytes, more than"):
        list(shard_blocks(str(copy / name), index, []))
    # The shard is not the one the index describes (its sha256 differs): a corrupt shard,
    # skipped on request.
    with pytest.warns(UserWarning, match=rf"{name}.*skipped"):
        assert read_all(str(copy), on_error="skip") == index.windows - index.shards[0].windows


@pytest.mark.parametrize(
    "change, needle",
    [
        ("{not json", "index.json"),
        ('{"window": "five"}', "window"),
    ],
)
def test_a_tampered_index_is_one_line_from_the_cli(shard_dir, tmp_path, change, needle):
    copy = tmp_path / "bad-index"
    shutil.copytree(shard_dir, copy)
    if change.startswith("{not"):
        (copy / "index.json").write_text(change)
    else:
        index = json.loads((copy / "index.json").read_text())
        index.update(json.loads(change))
        index["shards"][0]["bytes"] = "many"
        (copy / "index.json").write_text(json.dumps(index))
    completed = run_cli("train", str(copy), str(tmp_path / "run"), "--steps", "1")
    assert_one_line_error(completed, "index.json", needle)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda manifest: manifest.update(steps="many"), "field steps"),
        (lambda manifest: manifest["groups"][0]["steps_files"][0].update(bytes=None), "bytes"),
    ],
)
def test_a_tampered_manifest_is_one_line_from_the_cli(tiny_dataset, change, needle):
    rewrite_manifest(tiny_dataset, change)
    assert_one_line_error(run_cli("info", tiny_dataset), "manifest.json", needle)
