"""The cold path of a small command: `hindsight ingest` of a small Minari set loads only
what it uses, reads each episode once, and converts between NumPy and Arrow without
pandas; none of that changes a byte of what it writes."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from engine.executor import InProcess
from engine.ingest import ingest, plan_ingest
from engine.sources import minari
from engine.sources.tables import strings_to_arrow
from schemas import steps as cols

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Libraries `hindsight ingest` of a small Minari set has no use for (each costs 0.1-2 s).
UNUSED = ("ray", "torch", "polars", "pandas", "gymnasium")
LENGTHS = (7, 12, 5, 9, 30, 3)


@pytest.fixture
def minari_source(tmp_path) -> str:
    """Minari's HDF5 layout by h5py: dict observations, discrete actions, nested infos, a
    string info, and episode names that sort differently as text and as numbers."""
    rng = np.random.default_rng(4)
    data = tmp_path / "minari" / "data"
    data.mkdir(parents=True)
    with h5py.File(data / "main_data.hdf5", "w") as handle:
        for episode, length in enumerate(LENGTHS):
            group = handle.create_group(f"episode_{episode * 5}")
            group.attrs["id"] = episode * 5
            observations = group.create_group("observations")
            observations["position"] = rng.normal(size=(length + 1, 2))
            observations["speed"] = rng.normal(size=length + 1).astype(np.float32)
            group["actions"] = rng.integers(0, 4, size=length)
            group["rewards"] = rng.normal(size=length)
            group["terminations"] = np.arange(length) == length - 1
            group["truncations"] = np.zeros(length, bool)
            infos = group.create_group("infos")
            infos["level"] = np.full(length + 1, episode % 3)
            infos["tag"] = np.array([[b"even", b"odd"][episode % 2]] * length)
            infos.create_group("nested")["noise"] = rng.normal(size=(length + 1, 2))
    (data / "metadata.json").write_text(json.dumps({"data_format": "hdf5"}))
    return str(tmp_path / "minari")


def version_files(uri: str) -> dict[str, str]:
    """sha256 of every file of a version but the manifest (which records when and how)."""
    root = Path(uri)
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != "manifest.json"
    }


def test_ingest_of_a_small_minari_set_loads_none_of_the_libraries_it_does_not_use(
    minari_source, tmp_path
):
    script = (
        "import sys; from jobs.cli import main; "
        f"code = main(['ingest', {minari_source!r}, {str(tmp_path / 'out')!r}]); "
        f"print(code, [name for name in {UNUSED!r} if name in sys.modules])"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True
    )
    assert done.stdout.splitlines()[-1] == "0 []", done.stderr[-2000:]


def test_the_parts_build_their_tables_from_what_the_plan_read(minari_source, monkeypatch):
    opened = []
    real_file = h5py.File
    monkeypatch.setattr(
        h5py, "File", lambda *args, **kw: opened.append(args) or real_file(*args, **kw)
    )
    plan = plan_ingest(minari_source, part_steps=20)
    assert len(opened) == 1 and len(plan.parts) > 2
    source = minari.Minari()
    rows = [source.read_part(part)[0].num_rows for part in plan.parts]
    assert len(opened) == 1  # the plan's read was the only one
    assert sum(rows) == sum(LENGTHS)


@pytest.mark.parametrize(
    "keeps_bytes, kept", [(0, "none"), (2_000, "some"), (minari.PLAN_KEEPS_BYTES, "all")]
)
def test_what_the_plan_keeps_changes_no_byte(
    minari_source, tmp_path, monkeypatch, keeps_bytes, kept
):
    """Nothing kept (every part reads the file, as before parts took episodes from the
    plan), some episodes kept (parts partly read), every episode kept: the same files."""

    def ingested(name: str) -> tuple[dict[str, str], int]:
        plan = plan_ingest(minari_source, part_steps=20)
        uri = str(tmp_path / name)
        ingest(plan, uri, executor=InProcess(), command="test")
        return version_files(uri), sum(len(part.kept) for part in plan.parts)

    monkeypatch.setattr(minari, "PLAN_KEEPS_BYTES", 0)
    reference, none_kept = ingested("read-by-parts")
    monkeypatch.setattr(minari, "PLAN_KEEPS_BYTES", keeps_bytes)
    files, episodes_kept = ingested("kept")
    assert files == reference and len(files) > 4 and none_kept == 0
    expected = {"none": {0}, "some": set(range(1, len(LENGTHS))), "all": {len(LENGTHS)}}
    assert episodes_kept in expected[kept]


def test_a_part_sent_to_a_ray_task_travels_without_the_episodes_the_plan_kept(minari_source):
    part = plan_ingest(minari_source).parts[0]
    assert len(part.kept) == len(LENGTHS)
    sent = pickle.loads(pickle.dumps(part))
    assert sent == part and sent.kept == {}
    source = minari.Minari()
    for here, there in zip(source.read_part(part), source.read_part(sent)):
        assert here.equals(there)


# ---------------------------------------------------------------- NumPy <-> Arrow, no pandas

NUMBER_TYPES = [
    np.bool_,
    np.int8,
    np.int32,
    np.int64,
    np.uint16,
    np.float16,
    np.float32,
    np.float64,
]


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from(NUMBER_TYPES),
        shape=st.integers(0, 40),
        elements={"allow_nan": True, "allow_infinity": True},
    ),
    st.integers(0, 9),
)
def test_numpy_to_arrow_makes_what_pa_array_makes(values, start):
    values = values[start:]  # an offset into the buffer
    ours, theirs = cols.numpy_to_arrow(values), pa.array(values)
    ours.validate(full=True)
    assert ours.type == theirs.type and ours.null_count == 0
    np.testing.assert_array_equal(ours.to_numpy(zero_copy_only=False), values)
    # And back: arrow_to_numpy agrees with to_numpy, on a slice of the array too.
    for array in (ours, ours.slice(min(start, len(ours)))):
        back = cols.arrow_to_numpy(array)
        expected = array.to_numpy(zero_copy_only=False)
        assert back.dtype == expected.dtype
        np.testing.assert_array_equal(back, expected)


def test_arrow_to_numpy_reads_vectors_chunks_and_missing_values_as_to_numpy_does():
    vectors = cols.vectors_to_arrow(np.arange(24, dtype=np.float32).reshape(8, 3)).slice(2, 4)
    np.testing.assert_array_equal(
        cols.arrow_to_numpy(vectors), np.arange(24, dtype=np.float32).reshape(8, 3)[2:6]
    )
    chunked = pa.chunked_array([pa.array([1, 2]), pa.array([3])])
    np.testing.assert_array_equal(cols.arrow_to_numpy(chunked), [1, 2, 3])
    np.testing.assert_array_equal(cols.arrow_to_numpy(pa.array([1.0, None])), [1.0, np.nan])


def test_strings_to_arrow_makes_what_pa_array_makes():
    values = ["Pendulum-v1", "", "minari:é-data", "Pendulum-v1"]
    assert strings_to_arrow(values).equals(pa.array(values, type=pa.string()))
    assert strings_to_arrow([]).equals(pa.array([], type=pa.string()))
