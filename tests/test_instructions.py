"""The `instructions` relabeler: hindsight instructions from MiniGrid views (built by hand,
and from real BabyAI rollouts checked against BabyAI's own verifiers), and plugin functions."""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pyarrow as pa
import pytest

from relabelers import registry
from relabelers.base import RelabelError, relabel_tables
from relabelers.instructions import (
    COLOR_NAMES,
    OBJECT_TO_IDX,
    InstructionsRelabeler,
)

EMPTY = (OBJECT_TO_IDX["empty"], 0, 0)
HAS_MINIGRID = importlib.util.find_spec("minigrid") is not None


def view_type() -> pa.DataType:
    return pa.struct(
        [pa.field("image", pa.list_(pa.field("item", pa.uint8()), 147)), ("direction", pa.int64())]
    )


def views_to_arrow(images: np.ndarray, directions: np.ndarray) -> pa.StructArray:
    flat = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1).astype(np.uint8)), 147)
    return pa.StructArray.from_arrays(
        [flat, pa.array(directions.astype(np.int64))], names=["image", "direction"]
    )


def tables(episode_views: list[np.ndarray], missions: list[str | None] | None = None):
    """Steps and episodes tables in the MiniGrid layout from each episode's views
    (length + 1, 7, 7, 3): observation t is views[t], next_observation views[t + 1]."""
    ids, t, obs, nxt, actions = [], [], [], [], []
    for episode, views in enumerate(episode_views):
        length = len(views) - 1
        ids += [episode] * length
        t += list(range(length))
        obs.append(views[:-1])
        nxt.append(views[1:])
        actions += [episode % 7] * length
    obs_images, next_images = np.concatenate(obs), np.concatenate(nxt)
    n = len(ids)
    steps = pa.table(
        {
            "episode_id": pa.array(ids, pa.int64()),
            "t": pa.array(t, pa.int64()),
            "observation": views_to_arrow(obs_images, np.zeros(n)),
            "action": pa.array(actions, pa.int64()),
            "reward": pa.array(np.zeros(n)),
            "terminated": pa.array(np.zeros(n, bool)),
            "truncated": pa.array(np.zeros(n, bool)),
            "next_observation": views_to_arrow(next_images, np.zeros(n)),
        }
    )
    lengths = [len(v) - 1 for v in episode_views]
    episodes = {
        "episode_id": pa.array(range(len(lengths)), pa.int64()),
        "length": pa.array(lengths, pa.int64()),
        "return": pa.array(np.zeros(len(lengths))),
        "env_id": pa.array(["BabyAI-GoToLocal-v0"] * len(lengths)),
    }
    if missions is not None:
        episodes["mission"] = pa.array(missions, pa.string())
    return steps, pa.table(episodes)


def random_episodes(count: int, seed: int) -> list[np.ndarray]:
    """Episodes of empty views in which objects appear in front of the agent and in its
    hands at random steps (often none at all)."""
    rng = np.random.default_rng(seed)
    episodes = []
    for _ in range(count):
        length = int(rng.integers(1, 12))
        views = np.zeros((length + 1, 7, 7, 3), np.uint8)
        views[..., 0] = OBJECT_TO_IDX["empty"]
        views[:, :, 0, 0] = OBJECT_TO_IDX["wall"]  # a far wall: never an instruction
        for s in range(length + 1):
            if rng.random() < 0.15:  # something in front
                obj = rng.choice(["key", "ball", "box", "door", "wall", "goal"])
                views[s, 3, 5] = (OBJECT_TO_IDX[obj], rng.integers(0, 6), 0)
        if rng.random() < 0.4:  # carried from some step on
            start = int(rng.integers(0, length + 1))
            obj = rng.choice(["key", "ball", "box"])
            views[start:, 3, 6] = (OBJECT_TO_IDX[obj], rng.integers(0, 6), 0)
        episodes.append(views)
    return episodes


def accomplished(
    views: np.ndarray, kinds=("goto", "pickup"), objects=("key", "ball", "box", "door")
) -> list[str | None]:
    """What each step's action accomplished, step by step (the independent reference)."""
    name = {v: k for k, v in OBJECT_TO_IDX.items()}
    done: list[str | None] = []
    for t in range(len(views) - 1):
        done.append(None)
        for kind in kinds:
            if kind == "goto":
                obj, color, _ = views[t + 1, 3, 5]
                if name[obj] in objects:
                    done[t] = f"go to the {COLOR_NAMES[color]} {name[obj]}"
                    break
            else:
                obj, color, _ = views[t + 1, 3, 6]
                before = tuple(views[t, 3, 6][:2])
                if name[obj] in ("key", "ball", "box") and name[obj] in objects:
                    if before != (obj, color):
                        done[t] = f"pick up the {COLOR_NAMES[color]} {name[obj]}"
                        break
    return done


def expected(views: np.ndarray, **kinds) -> tuple[str | None, int | None]:
    """The episode's first instruction and its step."""
    for t, text in enumerate(accomplished(views, **kinds)):
        if text is not None:
            return text, t
    return None, None


def check_against_reference(episode_views, output, steps, **kinds):
    texts = output.episodes.column("instruction").to_pylist()
    steps_at = output.episodes.column("instruction_step").to_pylist()
    step_text = output.steps.column("instruction").to_pylist()
    ids, t = steps.column("episode_id").to_pylist(), steps.column("t").to_pylist()
    for episode, views in enumerate(episode_views):
        text, step = expected(views, **kinds)
        assert (texts[episode], steps_at[episode]) == (text, step), episode
        for row in np.flatnonzero(np.asarray(ids) == episode):
            want = text if text is not None and t[row] <= step else None
            assert step_text[row] == want, (episode, t[row])


def test_registered_by_name():
    assert registry.get("instructions") is InstructionsRelabeler


@pytest.mark.parametrize(
    "params",
    [{}, {"kinds": "pickup;goto"}, {"kinds": "pickup"}, {"kinds": "goto", "objects": "ball;key"}],
)
def test_first_instruction_and_step_match_a_step_by_step_reference(params):
    episode_views = random_episodes(300, seed=1)
    steps, episodes = tables(episode_views)
    output = relabel_tables(InstructionsRelabeler(params), steps, episodes)
    reference = {}
    if "kinds" in params:
        reference["kinds"] = tuple(params["kinds"].split(";"))
    if "objects" in params:
        reference["objects"] = tuple(params["objects"].split(";"))
    check_against_reference(episode_views, output, steps, **reference)
    assert output.episodes.schema.field("instruction_step").type == pa.int32()
    assert output.episodes.column("instruction").null_count > 0  # some accomplished nothing
    # However the dataset is cut into parts, the same columns.
    parts = relabel_tables(InstructionsRelabeler(params), steps, episodes, parts=4)
    assert parts.steps.equals(output.steps) and parts.episodes.equals(output.episodes)
    assert parts.report == output.report


def test_steps_next_labels_every_step_with_the_next_accomplishment():
    episode_views = random_episodes(200, seed=6)
    steps, episodes = tables(episode_views)
    output = relabel_tables(InstructionsRelabeler({"steps": "next"}), steps, episodes, parts=3)
    first = relabel_tables(InstructionsRelabeler({}), steps, episodes)
    assert output.episodes.equals(first.episodes)  # the episode columns do not change
    want = []
    for views in episode_views:
        done = accomplished(views)
        want += [next((d for d in done[t:] if d is not None), None) for t in range(len(done))]
    assert output.steps.column("instruction").to_pylist() == want
    assert sum(w is not None for w in want) > first.steps.column("instruction").drop_null().length()
    with pytest.raises(RelabelError, match="built-in kinds only"):
        InstructionsRelabeler({"steps": "next", "function": "a:b"})


def test_goto_door_and_pickup_on_the_same_step_follow_the_kinds_order():
    views = np.zeros((3, 7, 7, 3), np.uint8)
    views[..., 0] = OBJECT_TO_IDX["empty"]
    views[2, 3, 5] = (OBJECT_TO_IDX["door"], 2, 0)  # a blue door in front after step 1
    views[2, 3, 6] = (OBJECT_TO_IDX["ball"], 4, 0)  # and a yellow ball in hand
    steps, episodes = tables([views])
    first = relabel_tables(InstructionsRelabeler({}), steps, episodes).episodes.to_pylist()
    assert first == [{"instruction": "go to the blue door", "instruction_step": 1}]
    pickup_first = relabel_tables(InstructionsRelabeler({"kinds": "pickup;goto"}), steps, episodes)
    assert pickup_first.episodes.to_pylist() == [
        {"instruction": "pick up the yellow ball", "instruction_step": 1}
    ]
    assert pickup_first.steps.column("instruction").to_pylist() == ["pick up the yellow ball"] * 2


def test_report_counts_kinds_and_missions_that_differ():
    episode_views = random_episodes(60, seed=2)
    steps, _ = tables(episode_views)
    found = [expected(v)[0] for v in episode_views]
    missions = [
        None
        if i % 10 == 0
        else (text.replace("the", "a") if text and i % 3 == 0 else "go to the red key")
        for i, text in enumerate(found)
    ]
    steps, episodes = tables(episode_views, missions)
    report = relabel_tables(InstructionsRelabeler({}), steps, episodes, parts=3).report
    both = [(f, m) for f, m in zip(found, missions) if f is not None and m is not None]
    same = sum(f == m.replace(" a ", " the ") for f, m in both)
    assert report["episodes"] == 60
    assert report["instructed"] == sum(f is not None for f in found)
    assert report["by_kind"]["goto"] == sum(bool(f) and f.startswith("go to") for f in found)
    assert report["with_mission"] == len(both)
    assert report["differs_from_mission"] == len(both) - same
    assert report["differs_from_mission_share"] == round((len(both) - same) / len(both), 4)


def test_data_that_is_not_a_minigrid_view_is_refused_in_setup():
    from tests.synthetic import make_episodes

    steps, episodes = make_episodes(3, seed=0)
    with pytest.raises(RelabelError) as error:
        relabel_tables(InstructionsRelabeler({}), steps, episodes)
    message = str(error.value)
    assert "observation" in message and "function=module:function" in message
    assert "\n" not in message
    # A view of the wrong size is named too.
    views = random_episodes(2, seed=0)
    steps, episodes = tables(views)
    small = pa.StructArray.from_arrays(
        [pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(steps.num_rows * 12, np.uint8)), 12)],
        names=["image"],
    )
    steps = steps.set_column(
        steps.schema.get_field_index("next_observation"), "next_observation", small
    )
    with pytest.raises(RelabelError, match="next_observation.image"):
        relabel_tables(InstructionsRelabeler({}), steps, episodes)


def test_bad_colour_index_names_episode_and_step():
    views = random_episodes(3, seed=5)
    bad = np.zeros((4, 7, 7, 3), np.uint8)
    bad[..., 0] = OBJECT_TO_IDX["empty"]
    bad[3, 3, 5] = (OBJECT_TO_IDX["key"], 9, 0)
    steps, episodes = tables([*views, bad])
    with pytest.raises(RelabelError, match=r"episode 3 step t=2: next_observation.image\[3, 5\]"):
        relabel_tables(InstructionsRelabeler({}), steps, episodes)


def test_wrong_parameters_list_the_valid_ones():
    with pytest.raises(RelabelError, match="kinds"):
        InstructionsRelabeler({"kinds": "goto;fly"})
    with pytest.raises(RelabelError, match="objects"):
        InstructionsRelabeler({"kinds": "goto", "objects": "wall"})


# ---------------------------------------------------------------- plugin functions
def install_module(monkeypatch, **functions):
    module = types.ModuleType("instruction_plugin_for_tests")
    for name, function in functions.items():
        setattr(module, name, function)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    from relabelers.instruction_functions import load_function

    load_function.cache_clear()
    return module.__name__


def first_big_reward(steps: pa.Table, episode: dict):
    """An instruction from the data: "reach reward N" at the first step with reward >= 0.5."""
    reward = steps.column("reward").to_numpy()
    hits = np.flatnonzero(reward >= 0.5)
    if not len(hits):
        return None, None
    return f"reach reward {round(float(reward[hits[0]]))} in {episode['env_id']}", int(
        steps.column("t")[int(hits[0])].as_py()
    )


def test_plugin_function_labels_any_environment(monkeypatch):
    from tests.synthetic import make_episodes

    module = install_module(monkeypatch, first_big_reward=first_big_reward)
    steps, episodes = make_episodes(20, seed=3)
    output = relabel_tables(
        InstructionsRelabeler({"function": f"{module}:first_big_reward"}), steps, episodes, parts=3
    )
    ids = steps.column("episode_id").to_numpy()
    for row, episode in enumerate(episodes.to_pylist()):
        mine = steps.filter(pa.array(ids == episode["episode_id"]))
        text, step = first_big_reward(mine, episode)
        got = output.episodes.slice(row, 1).to_pylist()[0]
        assert (got["instruction"], got["instruction_step"]) == (text, step)
        step_text = output.steps.column("instruction").filter(
            pa.array(ids == episode["episode_id"])
        )
        t = mine.column("t").to_numpy()
        assert step_text.to_pylist() == [
            text if step is not None and s <= step else None for s in t
        ]
    assert output.report["function"] == f"{module}:first_big_reward"


def raise_two_lines(steps: pa.Table, episode: dict):
    raise ValueError("bad view at t=3\n  expected a key")


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (lambda steps, episode: 1 / 0, "raised ZeroDivisionError"),
        (lambda steps, episode: "go to it", "returned str"),
        (lambda steps, episode: (3, 0), "returned instruction 3"),
        (lambda steps, episode: ("go", "0"), "returned step '0'"),
        (lambda steps, episode: ("go", 10_000), "returned step 10000, outside"),
        (raise_two_lines, "raised ValueError: bad view at t=3 expected a key"),
    ],
)
def test_plugin_function_that_raises_or_returns_a_wrong_type_names_episode_and_function(
    monkeypatch, answer, words
):
    from tests.synthetic import make_episodes

    module = install_module(monkeypatch, bad=answer)
    steps, episodes = make_episodes(4, seed=0)
    with pytest.raises(RelabelError) as error:
        relabel_tables(InstructionsRelabeler({"function": f"{module}:bad"}), steps, episodes)
    message = str(error.value)
    first = episodes.column("episode_id")[0].as_py()
    assert f"function '{module}:bad' on episode {first}" in message and words in message
    assert "\n" not in message


def test_plugin_function_that_cannot_load_fails_in_setup():
    from tests.synthetic import make_episodes

    steps, episodes = make_episodes(2, seed=0)
    for name, words in (
        ("nowhere.at_all:f", "could not be loaded"),
        ("no_colon", "module:function"),
    ):
        with pytest.raises(RelabelError, match=words):
            relabel_tables(InstructionsRelabeler({"function": name}), steps, episodes)


# ---------------------------------------------------------------- real BabyAI rollouts
def rollout(env_id: str, seed: int, actions: tuple[int, ...], steps: int, kind: str):
    """One episode of random `actions`, its views, and per (type, colour) the first step at
    which BabyAI's own verifier (GoToInstr / PickupInstr) says success."""
    import gymnasium
    import minigrid  # noqa: F401  registers the BabyAI envs
    from minigrid.envs.babyai.core.verifier import GoToInstr, ObjDesc, PickupInstr

    env = gymnasium.make(env_id)
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    types_ = ("key", "ball", "box", "door") if kind == "goto" else ("key", "ball", "box")
    verifiers = {}
    for obj in types_:
        for color in COLOR_NAMES:
            instr = (GoToInstr if kind == "goto" else PickupInstr)(ObjDesc(obj, color))
            instr.reset_verifier(env.unwrapped)
            verifiers[f"{'go to' if kind == 'goto' else 'pick up'} the {color} {obj}"] = instr
    views, first = [obs["image"]], {}
    for t in range(steps):
        action = int(rng.choice(actions))
        obs, _, terminated, truncated, _ = env.step(action)
        views.append(obs["image"])
        for text, instr in verifiers.items():
            if text not in first and instr.verify(env.unwrapped.actions(action)) == "success":
                first[text] = t
        if terminated or truncated:
            break
    env.close()
    return np.stack(views), first


@pytest.mark.skipif(not HAS_MINIGRID, reason="minigrid is not installed")
@pytest.mark.parametrize(
    ("env_id", "kind", "actions"),
    [
        ("BabyAI-GoToLocal-v0", "goto", (0, 1, 2, 2)),
        ("BabyAI-PickupLoc-v0", "pickup", (0, 1, 2, 3)),
    ],
)
def test_real_rollouts_agree_with_babyai_verifiers(env_id, kind, actions):
    episodes_views, firsts = [], []
    for seed in range(12):
        views, first = rollout(env_id, seed, actions, 40, kind)
        episodes_views.append(views)
        firsts.append(first)
    steps, episodes = tables(episodes_views)
    output = relabel_tables(InstructionsRelabeler({"kinds": kind}), steps, episodes)
    found = 0
    for row, first in enumerate(firsts):
        got = output.episodes.slice(row, 1).to_pylist()[0]
        if not first:
            assert got == {"instruction": None, "instruction_step": None}
            continue
        step = min(first.values())
        assert [text for text, t in first.items() if t == step] == [got["instruction"]]
        assert got["instruction_step"] == step
        found += 1
    assert found >= 3  # the check saw real accomplishments


def test_views_stored_as_147_bytes_give_the_same_instructions():
    episode_views = random_episodes(40, seed=4)
    steps, episodes = tables(episode_views)
    as_lists = relabel_tables(InstructionsRelabeler({}), steps, episodes)
    for name in ("observation", "next_observation"):
        column = steps.column(name).combine_chunks()
        images = column.field("image").flatten().to_numpy()
        as_bytes = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(147), len(column), [None, pa.py_buffer(images.tobytes())]
        )
        struct = pa.StructArray.from_arrays(
            [as_bytes, column.field("direction")], names=["image", "direction"]
        )
        steps = steps.set_column(steps.schema.get_field_index(name), name, struct)
    as_binary = relabel_tables(InstructionsRelabeler({}), steps, episodes, parts=3)
    assert as_binary.episodes.equals(as_lists.episodes) and as_binary.steps.equals(as_lists.steps)


def test_views_of_another_integer_type_are_read_and_checked():
    episode_views = random_episodes(30, seed=7)
    steps, episodes = tables(episode_views)
    as_uint8 = relabel_tables(InstructionsRelabeler({}), steps, episodes)

    def widened(table: pa.Table, value: int | None = None) -> pa.Table:
        for name in ("observation", "next_observation"):
            column = table.column(name).combine_chunks()
            images = column.field("image").flatten().to_numpy().astype(np.int64)
            if value is not None and name == "next_observation":
                images[(3 * 7 + 5) * 3] = value  # the first row's front cell
            wide = pa.ListArray.from_arrays(
                pa.array(np.arange(0, len(images) + 1, 147, dtype=np.int32)), pa.array(images)
            )
            struct = pa.StructArray.from_arrays([wide], names=["image"])
            table = table.set_column(table.schema.get_field_index(name), name, struct)
        return table

    as_int64 = relabel_tables(InstructionsRelabeler({}), widened(steps), episodes)
    assert as_int64.episodes.equals(as_uint8.episodes) and as_int64.steps.equals(as_uint8.steps)
    with pytest.raises(RelabelError, match="outside 0..255"):
        relabel_tables(InstructionsRelabeler({}), widened(steps, 261), episodes)


def test_a_plugin_error_in_the_relabel_job_names_the_part_once(monkeypatch, tmp_path):
    """The job adds "relabeler X: part:" only to messages that do not name the part yet."""
    from engine.executor import InProcess
    from jobs.relabeling import relabel
    from tests.synthetic import make_episodes, write_synthetic_dataset

    module = install_module(monkeypatch, bad=raise_two_lines)
    steps, episodes = make_episodes(4, seed=0)
    write_synthetic_dataset(str(tmp_path / "in"), steps, episodes)
    with pytest.raises(RelabelError) as error:
        relabel(  # in this process, where the test's plugin module is installed
            str(tmp_path / "in"),
            str(tmp_path / "out"),
            [InstructionsRelabeler({"function": f"{module}:bad"})],
            executor=InProcess(),
            command="test",
        )
    message = str(error.value)
    assert message.count("part 0") == 1 and message.count("relabeler 'instructions'") == 1
    assert "raised ValueError: bad view at t=3 expected a key" in message
    assert "\n" not in message and not (tmp_path / "out").exists()
    # A message that names the relabeler but not the part (a plugin that fails to load in
    # a worker): the part goes in, the relabeler's name stays once.
    from jobs.relabeling import _in_task

    def fails():
        raise RelabelError("relabeler 'instructions': function 'm:f' could not be loaded")

    with pytest.raises(RelabelError) as error:
        _in_task(InstructionsRelabeler({"function": "m:f"}), "data part 2", fails)
    assert str(error.value) == (
        "relabeler 'instructions': data part 2: function 'm:f' could not be loaded"
    )
