"""MiniGrid / BabyAI environments: their views as stored observations, BabyAI's bot as a
built-in policy, and missions set on demand.

Stored layout (the contract bb-instr and bb-text rely on): the steps' `observation` and
`next_observation` are structs {`image`: fixed_size_list<uint8>[147] (the 7x7x3 encoded
egocentric view, (x, y, channel) order = `obs["image"].reshape(-1)`, channels OBJECT_IDX,
COLOR_IDX, STATE), `direction`: int64}; the manifest's metadata records
`observation_shapes = {"image": [7, 7, 3], "direction": []}` and `observation_dtypes`;
the episodes table has `mission` (the env's mission at reset), `success` (the env's own
success: BabyAI rewards > 0 only when the mission is done) and `bot_goal` (the instruction
the bot pursued, null for other policies); the steps table has `success` too (true on the
step whose action accomplished the mission).

Policies (`--policy`): `bot` is BabyAI's own bot (minigrid.utils.baby_ai_bot.BabyAIBot)
pursuing the env's mission; `bot:play` the same bot pursuing a randomly chosen object of the
room ("go to the <colour> <type>"), while the recorded mission stays the env's own: the
play regime whose recorded label is usually not what happened. A `bot:play` episode ends
when the bot has reached its own goal (truncated) or at the env's time limit. Noise takes a
uniformly random action with probability eps; the bot is told which action was taken and
replans from the env's state (a bot that cannot, e.g. after a random pickup of its target,
is recreated). Everything is seeded from (seed, episode).
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import pyarrow as pa

from schemas import steps as cols
from schemas.minigrid import (  # noqa: F401  (OBSERVATION_*: collect reads them here)
    OBJECT_TYPES,
    OBSERVATION_DTYPES,
    OBSERVATION_SHAPES,
)

BOT_POLICIES = ("bot", "bot:play")
# "go to the red key", "go to a red key", "pick up the blue ball" (BabyAI's own grammar).
MISSION_PATTERN = re.compile(
    r"^\s*(?P<verb>go to|pick up)\s+(?:the|a)\s+(?:(?P<color>[a-z]+)\s+)?(?P<type>[a-z]+)\s*$"
)


def is_minigrid_id(env_id: str) -> bool:
    """An environment id of the minigrid package (importing it registers them)."""
    name = env_id.split(":")[-1]
    return name.startswith(("MiniGrid-", "BabyAI-"))


def register() -> None:
    """Register MiniGrid and BabyAI ids with gymnasium (the package does it on import)."""
    import minigrid  # noqa: F401


def is_minigrid(env: gym.Env) -> bool:
    from minigrid.minigrid_env import MiniGridEnv

    return isinstance(env.unwrapped, MiniGridEnv)


def reset(env: gym.Env, seed: int) -> dict[str, Any]:
    """`env.reset(seed=seed)`, quiet: BabyAI prints every layout it rejects while sampling."""
    with contextlib.redirect_stdout(io.StringIO()):
        observation, _ = env.reset(seed=seed)
    return observation


def horizon(env: gym.Env) -> int:
    """The steps an episode may last: MiniGrid counts them itself (`max_steps`)."""
    return int(env.spec.max_episode_steps or env.unwrapped.max_steps)


# ---------------------------------------------------------------- observations


def view(observation: dict[str, Any]) -> dict[str, np.ndarray]:
    """The stored part of a MiniGrid observation: the flat uint8 view and the direction
    (the mission string is stored once per episode, not per step)."""
    return {
        "image": np.asarray(observation["image"], dtype=np.uint8).reshape(-1),
        "direction": np.int64(observation["direction"]),
    }


def view_vector(observation: dict[str, Any]) -> np.ndarray:
    """A MiniGrid observation as the float vector the shards hold: the struct's fields in
    their stored order (`direction`, then the 147 view numbers; engine/shards/episodes.py)."""
    stored = view(observation)
    return np.concatenate([[stored["direction"]], stored["image"]]).astype(np.float32)


def views_to_arrow(images: np.ndarray, directions: np.ndarray) -> pa.StructArray:
    """Views [N, 147] uint8 and directions [N] as the stored struct observation."""
    image = pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(images, dtype=np.uint8).reshape(-1)), images.shape[1]
    )
    direction = cols.numpy_to_arrow(np.asarray(directions, dtype=np.int64))
    return pa.StructArray.from_arrays([direction, image], names=["direction", "image"])


# ---------------------------------------------------------------- missions


def parse_mission(text: str, *, given: bool = False) -> tuple[str, str | None, str]:
    """(verb, colour or None, object type) of a BabyAI GoTo / PickUp mission, or a
    ValueError that says which missions can be set (and, for a requested text rather than a
    `given` --mission, that --mission sets the mission apart from the words)."""
    from minigrid.core.constants import COLOR_TO_IDX

    match = MISSION_PATTERN.match(text.lower())
    if (
        not match
        or match["type"] not in OBJECT_TYPES
        or (match["color"] is not None and match["color"] not in COLOR_TO_IDX)
    ):
        hint = (
            ""
            if given
            else "; to condition on other words, give the mission the env is scored on with "
            "--mission"
        )
        raise ValueError(
            f"{'--mission: ' if given else ''}mission {text!r} is not one a BabyAI env can be "
            f"set to: write 'go to the <colour> <type>' or 'pick up the <colour> <type>' "
            f"(colours {', '.join(COLOR_TO_IDX)}; types {', '.join(OBJECT_TYPES)}){hint}"
        )
    return match["verb"], match["color"], match["type"]


def instruction_for(verb: str, color: str | None, kind: str) -> Any:
    from minigrid.envs.babyai.core.verifier import GoToInstr, ObjDesc, PickupInstr

    description = ObjDesc(kind, color)
    return GoToInstr(description) if verb == "go to" else PickupInstr(description)


def reset_with_mission(
    env: gym.Env, mission: str, seed: int, attempts: int = 1000
) -> tuple[dict[str, Any], int]:
    """Reset with seeds seed, seed + 1, ... until the room holds an object the mission
    names, then make it the env's mission (instrs, its verifier, the mission string): the
    env then scores the episode on it. Returns the observation and the seed used."""
    verb, color, kind = parse_mission(mission)
    for offset in range(attempts):
        observation = reset(env, seed + offset)
        base = env.unwrapped
        instrs = instruction_for(verb, color, kind)
        objects, _ = instrs.desc.find_matching_objs(base)
        if not objects:
            continue
        instrs.reset_verifier(base)
        base.instrs = instrs
        base.mission = instrs.surface(base)
        observation = dict(observation, mission=base.mission)
        return observation, seed + offset
    raise ValueError(f"{env.spec.id}: no room in {attempts} resets holds {mission!r}")


def room_objects(env: gym.Env) -> list[tuple[str, str, tuple[int, int]]]:
    """(type, colour, position) of every key, ball and box on the grid, in grid order."""
    grid = env.unwrapped.grid
    found = []
    for j in range(grid.height):
        for i in range(grid.width):
            cell = grid.get(i, j)
            if cell is not None and cell.type in OBJECT_TYPES:
                found.append((cell.type, cell.color, (i, j)))
    return found


# ---------------------------------------------------------------- the bot


class Bot:
    """BabyAI's bot for one episode, pursuing the env's mission or `goal` (an instruction
    of its own, which the env knows nothing about)."""

    def __init__(self, env: gym.Env, goal: Any = None):
        self.env = env
        self.goal = goal
        self.bot = self._new()

    def _new(self) -> Any:
        from minigrid.utils.baby_ai_bot import BabyAIBot

        bot = BabyAIBot(self.env)
        if self.goal is not None:
            self.goal.reset_verifier(self.env.unwrapped)  # finds the objects it names
            bot.stack = []
            bot._process_instr(self.goal)
        return bot

    def act(self, taken: int | None) -> int | None:
        """The bot's next action, told the action taken last (None: the one it suggested);
        None once it holds its goal done."""
        done = self.env.unwrapped.actions.done
        try:
            action = self.bot.replan(taken)
        except Exception:  # noqa: BLE001 - BabyAIBot asserts on states noise made; replan anew
            self.bot = self._new()
            try:
                action = self.bot.replan()
            except Exception:  # noqa: BLE001 - e.g. its target was picked up: nothing to do
                return None
        return None if action == done else int(action)


def play_goal(env: gym.Env, rng: np.random.Generator) -> tuple[Any, str] | None:
    """A GoTo instruction for a random object of the room (not the one the agent already
    faces: that would be an empty episode), with its text; None if there is none."""
    front = tuple(int(v) for v in env.unwrapped.front_pos)
    objects = [o for o in room_objects(env) if o[2] != front]
    if not objects:
        return None
    kind, color, _ = objects[int(rng.integers(len(objects)))]
    instruction = instruction_for("go to", color, kind)
    return instruction, f"go to the {color} {kind}"


def rollout(
    env: gym.Env,
    policy_spec: str,
    policy: Callable[[Any], Any] | None,
    noise: float,
    seed: int,
    episode: int,
) -> dict[str, Any]:
    """One MiniGrid episode with epsilon-noise `noise`, seeded by (seed, episode), with
    `bot`, `bot:play`, random (`policy` None) or a user function `policy(observation)`."""
    rng = np.random.default_rng([seed, episode])
    env_seed, space_seed = (int(s) for s in rng.integers(0, 2**31 - 1, size=2))
    observation = reset(env, env_seed)
    env.action_space.seed(space_seed)
    mission = str(env.unwrapped.mission)
    bot, goal_text = None, None
    if policy_spec == "bot":
        bot = Bot(env)
    elif policy_spec == "bot:play":
        chosen = play_goal(env, rng)
        if chosen is not None:
            bot, goal_text = Bot(env, chosen[0]), chosen[1]
    record: dict[str, list] = {k: [] for k in ("obs", "next", "action", "reward", "term", "trunc")}
    taken = None
    while True:
        suggested = bot.act(taken) if bot is not None else None
        if bot is not None and suggested is None and policy_spec == "bot:play" and record["obs"]:
            record["trunc"][-1] = True  # the bot holds its own goal done: the episode ends
            break
        if rng.random() < noise or (bot is None and policy is None) or suggested is None:
            action = int(env.action_space.sample())
        elif bot is not None:
            action = suggested
        else:
            action = int(policy(observation))
        next_observation, reward, terminated, truncated, _ = env.step(action)
        record["obs"].append(view(observation))
        record["next"].append(view(next_observation))
        record["action"].append(action)
        record["reward"].append(float(reward))
        record["term"].append(bool(terminated))
        record["trunc"].append(bool(truncated))
        taken, observation = action, next_observation
        if terminated or truncated:
            break
    reward = np.asarray(record["reward"], dtype=np.float64)
    terminated = np.asarray(record["term"], dtype=bool)
    length = len(reward)
    return {
        "image": np.stack([o["image"] for o in record["obs"]]),
        "direction": np.asarray([o["direction"] for o in record["obs"]], dtype=np.int64),
        "next_image": np.stack([o["image"] for o in record["next"]]),
        "next_direction": np.asarray([o["direction"] for o in record["next"]], dtype=np.int64),
        "action": np.asarray(record["action"], dtype=np.int64),
        "reward": reward,
        "terminated": terminated,
        "truncated": np.asarray(record["trunc"], dtype=bool),
        "success": terminated & (reward > 0),
        "noise": np.full(length, noise, dtype=np.float32),
        "episode_id": np.full(length, episode, dtype=np.int64),
        "mission": mission,
        "bot_goal": goal_text,
    }


def episode_tables(
    runs: list[dict[str, Any]], env_id: str, policy_spec: str
) -> tuple[pa.Table, pa.Table]:
    """The base step and episode tables of MiniGrid rollouts (the layout above)."""
    from engine.sources.tables import EpisodeLabels, build_tables, strings_to_arrow

    def cat(key: str) -> np.ndarray:
        return np.concatenate([run[key] for run in runs])

    success = cat("success")
    steps, episodes = build_tables(
        episode_ids=cat("episode_id"),
        observation=views_to_arrow(cat("image"), cat("direction")),
        next_observation=views_to_arrow(cat("next_image"), cat("next_direction")),
        action=cat("action"),
        reward=cat("reward"),
        terminated=cat("terminated"),
        truncated=cat("truncated"),
        infos={"noise": cat("noise"), "success": success},
        labels=EpisodeLabels(env_id, f"collect:{policy_spec}", ("noise",)),
    )
    goals = [run["bot_goal"] for run in runs]
    episodes = episodes.append_column("mission", strings_to_arrow([r["mission"] for r in runs]))
    episodes = episodes.append_column(
        "success", pa.array([bool(run["success"].any()) for run in runs], pa.bool_())
    )
    episodes = episodes.append_column("bot_goal", pa.array(goals, pa.string()))
    return steps, episodes
