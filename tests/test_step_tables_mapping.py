"""Generic step tables as a LeRobot user has them: Parquet files nested under data/chunk-*/,
columns named `observation.state`, `episode_index`, `frame_index`, no reward. Recursive
discovery, `--map`, and a dataset whose rewards are unknown, end to end: ingested,
queried, sharded, trained (behaviour cloning), and refused by the relabelers that need
rewards, in one line, with nothing written."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.dataset import open_dataset, scan_episodes
from jobs.cli import main
from relabelers.base import relabel_tables
from relabelers.drex import DrexRelabeler
from schemas import steps as cols
from trainers.loader.shards import read_index

LEROBOT_MAP = "episode_id=episode_index,t=frame_index,observation=observation.state"
# Files of data/ in the order a sorted recursive search finds them, and their episodes.
FILES = {
    "chunk-000/file-000.parquet": (0, 1),
    "chunk-000/file-001.parquet": (2, 3),
    "chunk-001/file-000.parquet": (4,),
}


def lerobot_table(episodes: tuple[int, ...], seed: int, reward: bool = False) -> pa.Table:
    """One data file: rows shuffled, as nothing promises their order; episode e has 3 + e
    steps."""
    rng = np.random.default_rng(seed)
    ids = np.concatenate([np.full(3 + e, e) for e in episodes]).astype(np.int64)
    frames = np.concatenate([np.arange(3 + e) for e in episodes]).astype(np.int64)
    state = rng.normal(size=(len(ids), 2)).astype(np.float32)
    action = rng.normal(size=(len(ids), 3)).astype(np.float32)
    columns = {
        "observation.state": pa.FixedSizeListArray.from_arrays(pa.array(state.ravel()), 2),
        "action": pa.FixedSizeListArray.from_arrays(pa.array(action.ravel()), 3),
        "timestamp": pa.array(frames / 10, pa.float32()),
        "frame_index": pa.array(frames),
        "episode_index": pa.array(ids),
        "index": pa.array(np.arange(len(ids), dtype=np.int64) + 100 * seed),
        "task_index": pa.array(np.zeros(len(ids), np.int64)),
    }
    if reward:
        ends = np.r_[ids[1:] != ids[:-1], True]
        columns["next.reward"] = pa.array(rng.normal(size=len(ids)).astype(np.float32))
        columns["next.done"] = pa.array(ends)
    table = pa.table(columns)
    return table.take(pa.array(rng.permutation(len(ids))))


def write_lerobot_like(root, reward: bool = False) -> pa.Table:
    """A LeRobot v3.0-like directory: data/chunk-*/file-*.parquet, meta/ beside it, and
    hidden or underscore files a recursive search must skip. Returns every data row."""
    tables = []
    for seed, (name, episodes) in enumerate(FILES.items()):
        path = root / "data" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tables.append(lerobot_table(episodes, seed, reward))
        pq.write_table(tables[-1], path)
    (root / "meta").mkdir()
    (root / "meta" / "info.json").write_text(json.dumps({"codebase_version": "v3.0", "fps": 10}))
    pq.write_table(
        pa.table({"task_index": [0], "task": ["push the T"]}), root / "meta/tasks.parquet"
    )
    for junk in ("data/.cache/file-000.parquet", "data/_staging/file-000.parquet"):
        (root / junk).parent.mkdir(parents=True)
        pq.write_table(pa.table({"x": [1]}), root / junk)
    (root / "data" / "chunk-000" / "README.txt").write_text("not data")
    return pa.concat_tables(tables)


def sorted_rows(table: pa.Table, episode: str, step: str) -> pa.Table:
    return table.sort_by([(episode, "ascending"), (step, "ascending")])


def test_nested_parquet_ingested_with_map_matches_the_source(tmp_path, capsys):
    source = sorted_rows(write_lerobot_like(tmp_path / "pusht"), "episode_index", "frame_index")
    out = tmp_path / "ds"
    command = ["ingest", str(tmp_path / "pusht" / "data"), str(out), "--map", LEROBOT_MAP]
    assert main([*command, "--part-steps", "5"]) == 0  # the format is detected: parquet
    assert "reward: absent" in capsys.readouterr().out

    dataset = open_dataset(str(out))
    steps = dataset.read()
    assert steps.column(cols.EPISODE_ID).to_pylist() == source["episode_index"].to_pylist()
    assert steps.column(cols.T).to_pylist() == source["frame_index"].to_pylist()
    for name, source_name in ((cols.OBSERVATION, "observation.state"), ("action", "action")):
        np.testing.assert_array_equal(
            cols.arrow_to_numpy(steps.column(name)), cols.arrow_to_numpy(source[source_name])
        )
    # Unmapped columns are kept under their own names, values as they were.
    for name in ("timestamp", "index", "task_index"):
        assert steps.column(name).to_pylist() == source[name].to_pylist()
    assert "frame_index" not in steps.column_names
    # No reward: null (unknown), never zero; no flags: the last step of each episode is
    # truncated, none terminated.
    assert steps.column(cols.REWARD).null_count == steps.num_rows
    assert steps.schema.field(cols.REWARD).type == pa.float32()
    ids = source["episode_index"].to_numpy()
    last = np.r_[ids[1:] != ids[:-1], True]
    assert steps.column(cols.TRUNCATED).to_pylist() == last.tolist()
    assert not any(steps.column(cols.TERMINATED).to_pylist())
    episodes = scan_episodes(str(out)).collect()
    assert episodes[cols.LENGTH].to_list() == [3, 4, 5, 6, 7]
    assert episodes[cols.RETURN].null_count() == 5
    metadata = dataset.manifest.metadata
    assert (metadata["reward"], metadata["terminated"], metadata["truncated"]) == ("absent",) * 3

    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "reward: absent" in text and "nan" not in text


def test_mapped_rewards_and_done_flags(tmp_path):
    source = write_lerobot_like(tmp_path / "src", reward=True)
    source = sorted_rows(source, "episode_index", "frame_index")
    out = str(tmp_path / "ds")
    mapping = f"{LEROBOT_MAP},reward=next.reward,terminated=next.done"
    assert main(["ingest", str(tmp_path / "src" / "data"), out, "--map", mapping]) == 0
    steps = open_dataset(out).read()
    np.testing.assert_array_equal(
        steps.column(cols.REWARD).to_numpy(), source["next.reward"].to_numpy()
    )
    assert steps.column(cols.TERMINATED).to_pylist() == source["next.done"].to_pylist()
    assert not any(steps.column(cols.TRUNCATED).to_pylist())  # terminal, not cut off
    expected = [
        float(np.float32(source["next.reward"].to_numpy()[source["episode_index"].to_numpy() == e]
                         .astype(np.float64).sum()))
        for e in range(5)
    ]  # fmt: skip
    assert scan_episodes(out).collect()[cols.RETURN].to_list() == expected
    assert "reward" not in open_dataset(out).manifest.metadata


def test_the_dataset_root_names_the_meta_file_that_is_no_step_table(tmp_path, capsys):
    write_lerobot_like(tmp_path / "src")
    out = tmp_path / "ds"
    assert (
        main(
            ["ingest", str(tmp_path / "src"), str(out), "--format", "parquet", "--map", LEROBOT_MAP]
        )
        == 2
    )
    error = capsys.readouterr().err
    assert "this is a LeRobot dataset: ingest it with --format lerobot" in error
    assert not out.exists()
    # Without its info.json it is just a tree of Parquet files: the one that does not fit
    # is named.
    (tmp_path / "src" / "meta" / "info.json").unlink()
    arguments = ["ingest", str(tmp_path / "src"), str(out), "--format", "parquet"]
    assert main([*arguments, "--map", LEROBOT_MAP]) == 2
    error = capsys.readouterr().err
    assert (
        f"{tmp_path / 'src' / 'meta' / 'tasks.parquet'}: column 'episode_index': is not in" in error
    )
    assert "is this file a step table?" in error
    assert not out.exists()


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        (f"{LEROBOT_MAP},goal=observation.state", "'goal' is not a step column hindsight fills"),
        (
            "episode_id=episode_index,t=frame_index,observation=observation.stat",
            "column 'observation.stat': is not in the file (--map observation=observation.stat)",
        ),
        ("t=frame_index,observation=observation.state", "column 'episode_id': required column"),
        (f"{LEROBOT_MAP},action=index,reward=index", "source column 'index' is mapped to two"),
        ("observation", "expected NAME=SOURCE"),
    ],
)
def test_map_mistakes_fail_in_one_line_and_write_nothing(tmp_path, capsys, mapping, expected):
    write_lerobot_like(tmp_path / "src")
    out = tmp_path / "ds"
    assert (
        main(["ingest", str(tmp_path / "src" / "data" / "chunk-000"), str(out), "--map", mapping])
        == 2
    )
    error = capsys.readouterr().err
    assert expected in error
    if "file" in expected:
        assert str(tmp_path / "src" / "data" / "chunk-000" / "file-000.parquet") in error
    assert not out.exists()


def test_map_on_a_format_without_columns_names_the_formats_with(tmp_path, capsys):
    write_lerobot_like(tmp_path / "src")
    arguments = [str(tmp_path / "src"), str(tmp_path / "ds"), "--format", "minari"]
    assert main(["ingest", *arguments, "--map", "reward=next.reward"]) == 2
    assert capsys.readouterr().err.strip() == (
        "hindsight ingest: error: --map renames the columns of formats that read columns by "
        "name (lerobot, parquet, jsonl); format 'minari' has its own layout"
    )
    assert not (tmp_path / "ds").exists()


def test_problems_name_the_source_column_of_a_mapped_one(tmp_path, capsys):
    table = lerobot_table((0, 1), seed=0)
    frames = table.column("frame_index").to_numpy().copy()
    frames[frames == 2] = 1  # episode 0 and 1: step 1 twice
    table = table.set_column(3, "frame_index", pa.array(frames))
    pq.write_table(table, tmp_path / "steps.parquet")
    assert (
        main(
            ["ingest", str(tmp_path / "steps.parquet"), str(tmp_path / "ds"), "--map", LEROBOT_MAP]
        )
        == 2
    )
    assert (
        "column 'frame_index (--map t)': step 1 appears more than once" in capsys.readouterr().err
    )


def test_map_in_a_yaml_spec(tmp_path):
    from jobs.spec import read_spec

    write_lerobot_like(tmp_path / "src")
    data = tmp_path / "src" / "data"
    for value in (
        "{episode_id: episode_index, t: frame_index, observation: observation.state}",
        f"[{LEROBOT_MAP.replace(',', ', ')}]",
    ):
        path = tmp_path / "ingest.yaml"
        path.write_text(f"kind: ingest\ninput: {data}\noutput: {tmp_path / 'ds'}\nmap: {value}\n")
        command = read_spec(path).command
        assert command.map == {
            "episode_id": "episode_index",
            "t": "frame_index",
            "observation": "observation.state",
        }
    command.run()
    assert (
        "--map episode_id=episode_index,t=frame_index"
        in open_dataset(str(tmp_path / "ds")).manifest.command
    )


def test_nested_step_tables_on_s3(tmp_path, s3_bucket, ray_local):
    import pyarrow.fs as pafs

    source = write_lerobot_like(tmp_path / "src")
    fs = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], region="us-east-1")
    bucket = s3_bucket.removeprefix("s3://")
    for root, _, names in os.walk(tmp_path / "src"):
        for name in names:
            local = os.path.join(root, name)
            key = f"{bucket}/pusht/{os.path.relpath(local, tmp_path / 'src')}"
            pafs.copy_files(local, key, destination_filesystem=fs)
    out = f"{s3_bucket}/ds"
    assert (
        main(
            ["ingest", f"{s3_bucket}/pusht/data", out, "--format", "parquet", "--map", LEROBOT_MAP]
        )
        == 0
    )
    dataset = open_dataset(out)
    assert dataset.manifest.steps == source.num_rows
    assert dataset.manifest.metadata["reward"] == "absent"


@pytest.fixture
def rewardless(tmp_path):
    """A reward-less dataset ingested from nested Parquet files, with a noise level per
    episode (an episode info column) for drex."""
    write_lerobot_like(tmp_path / "src")
    out = str(tmp_path / "ds")
    assert main(["ingest", str(tmp_path / "src" / "data"), out, "--map", LEROBOT_MAP]) == 0
    return out


def test_a_rewardless_dataset_queries_shards_and_trains(tmp_path, rewardless, capsys, ray_local):
    subset = str(tmp_path / "subset")
    assert main(["query", rewardless, "--where", "episode_id >= 1", "--output", subset]) == 0
    assert open_dataset(subset).manifest.metadata["reward"] == "absent"
    assert main(["query", rewardless, "--where", "reward IS NULL", "--level", "steps"]) == 0
    assert "25 matching steps" in capsys.readouterr().out

    shards, run = str(tmp_path / "shards"), str(tmp_path / "run")
    assert main(["shard", subset, shards, "--window", "2", "--shard-steps", "10"]) == 0
    index = read_index(shards)
    assert index.reward is None and index.episode_return is None
    assert index.steps == 4 + 5 + 6 + 7
    args = [
        "train",
        shards,
        run,
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--hidden",
        "8",
        "--window",
        "2",
    ]
    assert main(args) == 0  # behaviour cloning: no condition
    assert os.path.exists(os.path.join(run, "checkpoint.pt"))


@pytest.mark.parametrize(
    ("relabeler", "why"),
    [
        ("returns", "needs rewards"),
        ("skill", "needs rewards to rank episodes by return"),
        ("returns:gamma=0.9", "needs rewards"),
    ],
)
def test_relabelers_that_need_rewards_refuse_in_one_line(
    tmp_path, rewardless, capsys, relabeler, why
):
    out = tmp_path / "relabeled"
    assert main(["relabel", rewardless, str(out), "--with", relabeler]) == 2
    error = capsys.readouterr().err.strip()
    name = relabeler.split(":")[0]
    assert error.startswith(f"hindsight relabel: error: relabeler '{name}' {why}")
    assert (
        f"{rewardless} has none (ingested without a reward column: give --map reward=COLUMN)"
        in error
    )
    assert len(error.splitlines()) == 1
    assert not out.exists()


def test_skill_by_another_column_and_language_run_without_rewards(
    tmp_path, rewardless, no_endpoint
):
    out = str(tmp_path / "relabeled")
    args = [
        "relabel",
        rewardless,
        out,
        "--with",
        "skill:source=length,levels=2",
        "--with",
        "language",
    ]
    assert main(args) == 0
    episodes = scan_episodes(out).collect()
    # Longer episodes, higher levels: skill ranks by the column it was given.
    levels = episodes.sort(cols.LENGTH)["skill_level"].to_list()
    assert levels == sorted(levels) and levels[0] < levels[-1]
    for text in episodes["description"].to_list():
        assert "return" not in text and "percentile" not in text and "nan" not in text
    report = open_dataset(out).manifest.group("language").relabeler.report
    assert report["rewards"].startswith("absent")


def test_drex_without_rewards_reports_the_noise_ranking_only():
    from tests.test_relabel_drex import PARAMS, noisy_rollouts

    steps, episodes = noisy_rollouts(num_episodes=40)
    steps = steps.set_column(
        steps.schema.get_field_index(cols.REWARD),
        cols.REWARD,
        pa.nulls(steps.num_rows, pa.float32()),
    )
    episodes = episodes.set_column(
        episodes.schema.get_field_index(cols.RETURN),
        cols.RETURN,
        pa.nulls(episodes.num_rows, pa.float32()),
    )
    report = relabel_tables(
        DrexRelabeler({**PARAMS, "pairs": 200, "epochs": 3}), steps, episodes
    ).report
    assert report["true_return"] == "absent"
    assert "spearman_return" not in report and np.isfinite(report["spearman_negative_noise"])


def test_an_image_column_mapped_to_observation_keeps_the_state_as_info(tmp_path):
    import io

    from PIL import Image

    def png(value: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    table = lerobot_table((0, 1), seed=0)
    images = [png(10 * i) for i in range(table.num_rows)]
    struct = pa.StructArray.from_arrays(
        [pa.array(images, pa.binary()), pa.nulls(table.num_rows, pa.string())],
        names=["bytes", "path"],
    )  # how LeRobot and Hugging Face datasets store an image feature
    (tmp_path / "data" / "chunk-000").mkdir(parents=True)
    pq.write_table(
        table.append_column("observation.image", struct), tmp_path / "data/chunk-000/f.parquet"
    )
    out = str(tmp_path / "ds")
    mapping = "episode_id=episode_index,t=frame_index,observation=observation.image"
    assert main(["ingest", str(tmp_path / "data"), out, "--map", mapping]) == 0
    dataset = open_dataset(out)
    assert set(dataset.cameras) == {"observation"}
    steps = dataset.read(columns=["episode_id", "t", "observation.state"])
    source = sorted_rows(table, "episode_index", "frame_index")
    np.testing.assert_array_equal(
        cols.arrow_to_numpy(steps.column("observation.state")),
        cols.arrow_to_numpy(source["observation.state"]),
    )


def test_nested_json_lines_take_the_same_path(tmp_path):
    table = sorted_rows(lerobot_table((0, 1, 2), seed=3), "episode_index", "frame_index")
    rows = table.drop_columns(["observation.state", "action"]).to_pylist()
    state, action = (
        cols.arrow_to_numpy(table[name]).tolist() for name in ("observation.state", "action")
    )
    (tmp_path / "logs" / "day-1").mkdir(parents=True)
    with open(tmp_path / "logs" / "day-1" / "steps.jsonl", "w") as handle:
        for row, s, a in zip(rows, state, action):
            handle.write(json.dumps({**row, "observation.state": s, "action": a}) + "\n")
    out = str(tmp_path / "ds")
    assert (
        main(["ingest", str(tmp_path / "logs"), out, "--format", "jsonl", "--map", LEROBOT_MAP])
        == 0
    )
    steps = open_dataset(out).read()
    np.testing.assert_array_equal(
        cols.arrow_to_numpy(steps.column(cols.OBSERVATION)), np.float32(state)
    )
    assert steps.column(cols.REWARD).null_count == steps.num_rows


def test_vector_info_columns_compare_like_their_json():
    """Whether a vector info column changes within an episode (so stays a step column):
    the vectorized comparison of equal-length rows agrees with comparing each row's JSON."""
    from engine.sources.step_scan import info_changes_within_episodes

    order = np.array([3, 0, 1, 2, 4, 5])
    starts = np.array([True, False, False, False, True, False])  # rows 3, 0, 1, 2 | 4, 5
    constant = [[1.0, 2.0]] * 4 + [[np.nan, 3.0]] * 2  # rows 4, 5: episode 2 with a NaN
    changing = [*constant[:5], [np.nan, 4.0]]
    for rows, kind, expected in [
        (constant, pa.list_(pa.float32()), False),
        (constant, pa.list_(pa.float64(), 2), False),
        (changing, pa.list_(pa.float32()), True),
        ([[1, 2], [1, 2], [1, 2], [1, 2], [7], [7]], pa.list_(pa.int64()), False),  # ragged
        ([[1, 2], [1, 3], [1, 2], [1, 2], [7], [7]], pa.list_(pa.int64()), True),
    ]:
        column = pa.chunked_array([pa.array(rows, kind)])
        assert info_changes_within_episodes(column, order, starts) is expected, rows
