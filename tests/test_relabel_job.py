"""The relabel job on a real local Ray: new versions, lineage, determinism, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from engine import storage
from engine.dataset import open_dataset
from engine.executor import InProcess
from jobs import cli, relabeling
from jobs.commands.relabel import Relabel
from relabelers import registry
from relabelers.base import RelabelError, relabel_tables
from relabelers.goals import GoalsRelabeler
from relabelers.returns import ReturnsRelabeler
from relabelers.skill import SkillRelabeler
from schemas import steps as cols
from tests.synthetic import make_episodes, write_synthetic_dataset

pytestmark = pytest.mark.ray

EVERYTHING = [
    "returns:gamma=0.9",
    "skill:source=episode_return,levels=3",  # reads the column `returns` wrote just before
    "goals:strategy=future,k=2,achieved=observation.achieved_goal,threshold=0.5",
    "drex:features=observation.observation,pairs=40,epochs=1,snippet_length=4",
]


def relabel(input_uri, output_uri, relabelers, **options):
    return Relabel(
        input=str(input_uri), output=str(output_uri), relabelers=relabelers, **options
    ).run()


def data_files(uri: str) -> dict[str, str]:
    """Relative path -> sha256 of every Parquet file a version wrote itself."""
    root = Path(uri)
    return {
        str(p.relative_to(root)): storage.sha256_uri(str(p))
        for p in sorted(root.rglob("*.parquet"))
    }


@pytest.fixture
def goal_datasets(tmp_path):
    """The same 20 goal-env episodes written as 1 part and as many parts."""
    steps, episodes = make_episodes(20, obs_dim=4, goal_dim=2, seed=3, max_length=25)
    one = str(tmp_path / "one-part")
    many = str(tmp_path / "many-parts")
    write_synthetic_dataset(one, steps, episodes, part_steps=1_000_000)
    write_synthetic_dataset(many, steps, episodes, part_steps=60)
    return one, many


def test_same_output_whatever_the_partitioning_and_byte_identical_reruns(
    ray_local, goal_datasets, tmp_path
):
    one, many = goal_datasets
    assert open_dataset(many).num_parts > 3
    relabel(one, tmp_path / "a", EVERYTHING, seed=7)
    relabel(many, tmp_path / "b", EVERYTHING, seed=7)
    a, b = open_dataset(str(tmp_path / "a")), open_dataset(str(tmp_path / "b"))
    for level in ("steps", "episodes"):
        assert a.read(level).equals(b.read(level)), level
    # The same spec again: byte-identical data files and the same dataset id.
    manifest = relabel(many, tmp_path / "c", EVERYTHING, seed=7)
    assert data_files(str(tmp_path / "b")) == data_files(str(tmp_path / "c"))
    assert manifest.dataset_id == b.manifest.dataset_id
    # Each group holds only its own new columns: no observation was copied.
    for group in b.manifest.groups[1:]:
        names = {f.name for f in group.steps_columns + group.episodes_columns}
        assert "observation" not in names and "episode_id" not in names
    report = b.manifest.group("drex").relabeler.report
    assert {"heldout_pair_accuracy", "spearman_return"} <= set(report)


def test_two_successive_relabels_record_the_lineage(ray_local, tiny_dataset, tmp_path):
    first = relabel(tiny_dataset, tmp_path / "v1", ["returns:gamma=0.5"], seed=1)
    second = relabel(tmp_path / "v1", tmp_path / "v2", ["skill:levels=2"], seed=2)
    assert [h.operation for h in second.history] == ["ingest", "relabel", "relabel"]
    assert second.parent_id == first.dataset_id
    assert second.history[1].dataset_id == first.dataset_id
    assert [(g.name, g.inherited) for g in second.groups] == [
        ("base", True),
        ("returns", True),
        ("skill", False),
    ]
    assert second.group("returns").root == storage.normalize(str(tmp_path / "v1"))
    info = second.group("skill").relabeler
    assert (info.name, info.version, info.seed, info.params["levels"]) == ("skill", "1.0", 2, 2)
    assert second.group("returns").relabeler.params["gamma"] == 0.5

    # The values equal the relabelers run in memory on the whole table.
    parent = open_dataset(tiny_dataset)
    steps, episodes = parent.read("steps"), parent.read("episodes")
    version = open_dataset(str(tmp_path / "v2"))
    expected = relabel_tables(ReturnsRelabeler({"gamma": 0.5}), steps, episodes)
    assert version.read("steps", ["return_to_go"]).equals(expected.steps)
    expected = relabel_tables(SkillRelabeler({"levels": 2}), steps, episodes).episodes
    got = version.read("episodes", ["skill_level", "skill_percentile"])
    assert got.equals(expected.select(["skill_level", "skill_percentile"]))
    assert [c.name for c in version.manifest.group("skill").episodes_columns] == [
        "skill",
        "skill_level",
        "skill_percentile",
    ]


@pytest.mark.parametrize(
    ("relabelers", "message"),
    [
        (["returns:reward_column=score"], "reads steps column 'score'.*available steps columns"),
        (["goals:achieved=observation[0:9]"], "does not fit 'observation', which has 3 values"),
        (["goals:achieved=observation.achieved_goal"], "'observation' is fixed_size_list"),
        (["returns", "returns:gamma=0.5"], "'returns' is given twice"),
        (["returns:gama=0.5"], "valid parameters: gamma"),
        (["skill:source=noise,order=a;b"], "order= is for string"),
        (["nosuch"], "no relabeler named 'nosuch'; installed: .*returns"),
    ],
)
def test_bad_plans_fail_before_anything_is_written(tiny_dataset, tmp_path, relabelers, message):
    with pytest.raises(RelabelError, match=message):
        relabel(tiny_dataset, tmp_path / "out", relabelers)
    assert not (tmp_path / "out").exists()


def test_relabeling_a_column_a_flat_copy_already_has_says_what_to_do(tmp_path):
    """A `query --out` or `materialize` copy holds every column in one `base` group."""
    steps, episodes = make_episodes(num_episodes=4, seed=2)
    steps = steps.append_column("return_to_go", pa.array(np.zeros(steps.num_rows, np.float32)))
    write_synthetic_dataset(str(tmp_path / "flat"), steps, episodes)
    with pytest.raises(RelabelError, match=r"\['return_to_go'\] .*\(in 'base'\).*its parent"):
        relabel(tmp_path / "flat", tmp_path / "out", ["returns"])


def test_nan_rewards_fail_and_leave_nothing_behind(ray_local, tmp_path):
    steps, episodes = make_episodes(6, seed=1, min_length=5)
    rewards = steps.column("reward").to_numpy().copy()
    rewards[-2] = np.nan
    steps = steps.set_column(steps.schema.get_field_index("reward"), "reward", pa.array(rewards))
    write_synthetic_dataset(str(tmp_path / "in"), steps, episodes, part_steps=20)
    with pytest.raises(RelabelError, match=r"non-finite value.*episode 57.*nothing was written"):
        relabel(tmp_path / "in", tmp_path / "out", ["returns"])
    assert not (tmp_path / "out").exists()


def test_a_failure_in_the_middle_of_a_job_leaves_no_staging_and_no_version(tmp_path):
    """`returns` commits its whole group to the staging, then `goals` writes some parts and
    fails on a NaN in the last one: the error names the relabeler and the part, and the
    output directory is gone (parts run in order, in this process)."""
    steps, episodes = make_episodes(8, goal_dim=2, seed=4, min_length=5)
    observation = steps.column("observation").combine_chunks()
    achieved = np.asarray(observation.field("achieved_goal").to_pylist(), dtype=np.float32)
    achieved[-1, 0] = np.nan  # the last step of the last episode: the last part
    observation = pa.StructArray.from_arrays(
        [
            observation.field("observation"),
            cols.vectors_to_arrow(achieved),
            observation.field("desired_goal"),
        ],
        names=["observation", "achieved_goal", "desired_goal"],
    )
    steps = steps.set_column(
        steps.schema.get_field_index("observation"), "observation", observation
    )
    write_synthetic_dataset(str(tmp_path / "in"), steps, episodes, part_steps=20)
    parent = open_dataset(str(tmp_path / "in"))
    assert parent.num_parts >= 3
    output = tmp_path / "out"
    relabelers = [ReturnsRelabeler({}), GoalsRelabeler({"strategy": "final", "k": 1})]
    written: list[str] = []

    class Watching(InProcess):
        """Notes what the staging holds before each relabeler's parts run."""

        def map(self, function, tasks, **options):
            written.extend(str(p.relative_to(output)) for p in output.rglob("*.parquet"))
            return super().map(function, tasks, **options)

    last = parent.num_parts - 1
    with pytest.raises(RelabelError, match=rf"relabeler 'goals': .* part {last}: .*non-finite"):
        relabeling.relabel(
            str(tmp_path / "in"), str(output), relabelers, executor=Watching(), command="test"
        )
    assert any(path.startswith("returns/") for path in written)  # the middle of the job
    assert not output.exists()
    # The output is free: the same job on good data commits there.
    write_synthetic_dataset(str(tmp_path / "good"), *make_episodes(8, goal_dim=2, seed=4))
    relabeling.relabel(
        str(tmp_path / "good"), str(output), relabelers, executor=InProcess(), command="test"
    )
    assert open_dataset(str(output)).manifest.group("goals").relabeler.name == "goals"
    assert not (output / storage.STAGING_MARKER).exists()
    # A committed output is refused at once, before any work.
    with pytest.raises(ValueError, match="already committed"):
        relabeling.relabel(
            str(tmp_path / "good"), str(output), relabelers, executor=InProcess(), command="test"
        )


def test_command_line_and_spec(ray_local, tiny_dataset, tmp_path, capsys):
    assert (
        cli.main(["relabel", tiny_dataset, str(tmp_path / "cli"), "--with", "returns:gamma=0.9"])
        == 0
    )
    manifest = open_dataset(str(tmp_path / "cli")).manifest
    assert f"(dataset {manifest.dataset_id})" in capsys.readouterr().out.splitlines()[-1]
    assert manifest.command.startswith("hindsight")
    assert (
        cli.main(["relabel", tiny_dataset, str(tmp_path / "json"), "--with", "returns", "--json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["steps"] == manifest.steps

    spec = tmp_path / "relabel.yaml"
    spec.write_text(
        f"kind: relabel\ninput: {tiny_dataset}\noutput: {tmp_path / 'spec'}\n"
        "relabelers:\n  - name: skill\n    params: {levels: 3, source: noise}\n"
    )
    assert cli.main(["run", str(spec)]) == 0
    episodes = open_dataset(str(tmp_path / "spec")).read("episodes", ["noise", "skill"])
    by_noise = dict(zip(episodes.column("noise").to_pylist(), episodes.column("skill").to_pylist()))
    assert by_noise == {0.0: "expert", 0.5: "intermediate", 1.0: "novice"}

    assert cli.main(["relabel", tiny_dataset, str(tmp_path / "bad"), "--with", "goals:k=0"]) == 2
    assert "valid parameters: strategy" in capsys.readouterr().err

    assert cli.main(["relabelers"]) == 0
    listing = capsys.readouterr().out
    assert "returns 1.1" in listing and "writes: steps: return_to_go" in listing


def test_generic_llm_options_reach_relabelers_that_have_them():
    from jobs.relabeling import create_relabelers

    options = Relabel(
        input="x", output="y", relabelers=["returns"], llm_base_url="http://127.0.0.1:9/v1"
    )
    (relabeler,) = create_relabelers(options)  # returns has no base_url: left alone
    assert "base_url" not in relabeler.params.model_dump()


@pytest.fixture
def progress_plugin(tmp_path):
    """The example plugin package (examples/plugin), pip-installed into this environment
    (visible to Ray workers too). Without setuptools to build it offline, its dist-info is
    put on sys.path instead (visible to this process only). Yields which of the two."""
    import importlib.util

    source = tmp_path / "plugin"
    shutil.copytree(Path(__file__).parents[1] / "examples" / "plugin", source)
    if importlib.util.find_spec("setuptools") is not None:
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
        subprocess.run(
            pip + ["install", "--no-deps", "--no-build-isolation", "--no-index", str(source)],
            check=True,
        )
        yield "installed"
        subprocess.run(pip + ["uninstall", "-y", "hindsight-progress"], check=True)
        return
    dist_info = source / "hindsight_progress-0.1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: hindsight-progress\n")
    (dist_info / "entry_points.txt").write_text(
        "[hindsight.relabelers]\nprogress = hindsight_progress:ProgressRelabeler\n"
    )
    sys.path.insert(0, str(source))
    yield "sys.path"
    sys.path.remove(str(source))
    sys.modules.pop("hindsight_progress", None)


def test_entry_point_plugin_is_discovered_and_runs(
    ray_local, progress_plugin, tiny_dataset, tmp_path
):
    assert "progress" in registry.available()
    if progress_plugin == "installed":
        relabel(tiny_dataset, tmp_path / "out", ["progress:scale=2"])
        steps = open_dataset(str(tmp_path / "out")).read("steps", ["episode_id", "t", "progress"])
    else:
        parent = open_dataset(tiny_dataset)
        steps = parent.read("steps", ["episode_id", "t"])
        output = relabel_tables(
            registry.create("progress", {"scale": "2"}),
            steps,
            parent.read("episodes", ["episode_id"]),
        )
        steps = steps.append_column("progress", output.steps.column("progress"))
    lengths = {}
    for episode in steps.column("episode_id").to_pylist():
        lengths[episode] = lengths.get(episode, 0) + 1
    expected = [
        2 * t / max(lengths[e] - 1, 1)
        for e, t in zip(steps.column("episode_id").to_pylist(), steps.column("t").to_pylist())
    ]
    np.testing.assert_allclose(steps.column("progress").to_numpy(), expected, rtol=1e-6)


@pytest.mark.s3
def test_relabel_on_s3(ray_local, s3_bucket):
    steps, episodes = make_episodes(8, goal_dim=2, seed=5)
    write_synthetic_dataset(f"{s3_bucket}/in", steps, episodes, part_steps=50)
    relabel(f"{s3_bucket}/in", f"{s3_bucket}/out", ["returns", "goals:strategy=final,k=1"])
    version = open_dataset(f"{s3_bucket}/out", verify_checksums=True)
    assert version.manifest.group("goals").root == f"{s3_bucket}/out"
    got = version.read("steps", ["episode_id", "t", "hindsight_goal_step"])
    lengths = dict(
        zip(episodes.column("episode_id").to_pylist(), episodes.column("length").to_pylist())
    )
    assert [g[0] for g in got.column("hindsight_goal_step").to_pylist()] == [
        lengths[e] - 1 for e in got.column("episode_id").to_pylist()
    ]


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("returns", {"gamma": 0.9}),
        ("skill", {"levels": 3}),
        ("goals", {"strategy": "future", "k": 2}),
        ("goals", {"strategy": "random", "k": 2}),
    ],
)
def test_built_in_relabelers_do_not_depend_on_how_episodes_are_split(name, params):
    """What docs/plugins.md asks of every relabeler, checked with the helper it names."""
    from relabelers import registry
    from relabelers.base import relabel_tables
    from tests.synthetic import make_episodes

    steps, episodes = make_episodes(num_episodes=13, goal_dim=2, seed=11)
    whole = relabel_tables(registry.create(name, params, seed=4), steps, episodes)
    cut = relabel_tables(registry.create(name, params, seed=4), steps, episodes, parts=3)
    for level in ("steps", "episodes"):
        expected, got = getattr(whole, level), getattr(cut, level)
        assert (expected is None and got is None) or expected.equals(got)
