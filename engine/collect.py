"""Roll out gymnasium environments into datasets, at several epsilon-noise levels.

A policy is the random policy, a built-in heuristic (`HEURISTICS`), or a user function
`module:function` called as `function(observation) -> action`. At noise level eps each
step takes a uniformly random action with probability eps instead of the policy's: the
noise-injected rollouts that D-REX ranks. Episode `e` uses noise level
`noise_levels[e % len(noise_levels)]` and is seeded from (seed, e) alone, so the output
does not depend on how episodes are spread over parts or workers.

The environment step loop is Python by nature (gymnasium steps one transition at a time);
everything after it is array code (`engine.sources.tables.build_tables`).

Like ingest, collect runs in two steps: `plan_collect` fails early (an unknown env id, a
bad policy, an env that cannot render) and cuts the episodes into parts; `collect` rolls
out and writes each part in a task of the executor through the version writer and commits
the manifest last.

With frames (`Rollouts.frames`), the env is made with render_mode="rgb_array" and each
step's frame is the observation at t (rendered after reset, then after each step but the
last), resized by `engine.frames.render_frame` and encoded at once in the part's task: a
part holds only encoded frames in memory (a video camera: an episode's raw frames until
the episode ends, then its one video, in the frames group's episodes table). They are written as the `frames` group next to
the base part, the camera recorded in the manifest. With `pixels_only` the base steps have
no `observation` / `next_observation` column (as ingest of an image-only observation): the
frames are the observation, and metadata says `pixels_only: true`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import pyarrow as pa

import engine.envs  # noqa: F401  (registers hindsight/* envs)
from engine import minigrid
from engine.executor import Executor
from engine.frames import camera_frame
from engine.sources.tables import EpisodeLabels, build_tables
from engine.validate import ValidationError, check_stored_values
from engine.writer import VersionWriter, WrittenParts, base_manifest
from schemas.frames import DEFAULT_CAMERA, FRAMES_GROUP, CameraInfo, encode_frame, frames_table
from schemas.manifest import Manifest
from schemas.video import encode_video

Policy = Callable[[Any], Any]
NOISE_COLUMN = "noise"


# ---------------------------------------------------------------- built-in heuristics


def pendulum_heuristic(observation: np.ndarray) -> np.ndarray:
    """Swing up by pumping energy, then balance with a PD controller near the top."""
    cos_theta, sin_theta, velocity = (float(v) for v in observation)
    theta = np.arctan2(sin_theta, cos_theta)
    if cos_theta > 0.8:
        torque = -(8.0 * theta + 1.5 * velocity)
    else:
        energy = velocity * velocity / 6.0 + 5.0 * cos_theta  # 5 at rest upright
        direction = np.sign(velocity) if velocity != 0 else 1.0
        torque = 2.0 * direction * (1.0 if energy < 5.0 else -1.0)
    return np.array([np.clip(torque, -2.0, 2.0)], dtype=np.float32)


def cartpole_heuristic(observation: np.ndarray) -> int:
    """Push the cart under the pole (lean plus angular velocity)."""
    x, x_velocity, angle, angular_velocity = (float(v) for v in observation)
    return int(angle + 0.5 * angular_velocity + 0.01 * x + 0.1 * x_velocity > 0)


def mountain_car_heuristic(observation: np.ndarray) -> np.ndarray:
    """Push in the direction of motion to build up momentum."""
    return np.array([1.0 if observation[1] >= 0 else -1.0], dtype=np.float32)


def acrobot_heuristic(observation: np.ndarray) -> int:
    """Torque along the second joint's velocity pumps energy into the swing."""
    return 2 if observation[5] > 0 else 0


HEURISTICS: dict[str, Policy] = {
    "Pendulum": pendulum_heuristic,
    "hindsight/PendulumNoArrow": pendulum_heuristic,
    "CartPole": cartpole_heuristic,
    "MountainCarContinuous": mountain_car_heuristic,
    "Acrobot": acrobot_heuristic,
    "hindsight/PointGoal": engine.envs.heuristic_policy,
}


def heuristic_for(env_id: str) -> Policy:
    """The built-in heuristic of an environment id (any version)."""
    name = env_id.rsplit("-v", 1)[0]
    if name not in HEURISTICS:
        raise ValueError(
            f"no built-in heuristic policy for {env_id}; available for "
            f"{', '.join(HEURISTICS)}; use --policy random or --policy module:function"
        )
    return HEURISTICS[name]


def load_policy(spec: str, env_id: str) -> Policy | None:
    """`random` (None), `heuristic`, or a user function `module:function`; `bot` and
    `bot:play` (None here: engine.minigrid runs BabyAI's bot) for MiniGrid/BabyAI envs."""
    if spec == "random":
        return None
    if spec in minigrid.BOT_POLICIES:
        if not minigrid.is_minigrid_id(env_id):
            raise ValueError(f"--policy {spec}: BabyAI's bot plays MiniGrid/BabyAI envs only")
        return None
    if spec == "heuristic":
        return heuristic_for(env_id)
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValueError(
            f"--policy {spec!r}: expected random, heuristic, "
            f"{', '.join(minigrid.BOT_POLICIES)} (MiniGrid/BabyAI) or module:function"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        also = (  # `bot:wander`: a mistyped bot mode, not a module named bot
            f"; BabyAI's bot is {' or '.join(minigrid.BOT_POLICIES)}"
            if module_name == "bot"
            else ""
        )
        raise ValueError(
            f"--policy {spec!r}: cannot import {module_name}: {error}{also}"
        ) from error
    if not hasattr(module, function_name):
        raise ValueError(f"--policy {spec!r}: module {module_name} has no {function_name}")
    return getattr(module, function_name)


# ---------------------------------------------------------------- rollouts


def make_env(env_id: str, max_steps: int | None = None, render_mode: str | None = None) -> gym.Env:
    """A gymnasium environment; `render_mode="rgb_array"` where frames are rendered
    (`engine.frames.render_frame`)."""
    options: dict[str, Any] = {}
    if minigrid.is_minigrid_id(env_id):
        minigrid.register()
    if max_steps:
        options["max_episode_steps"] = max_steps
    if render_mode:
        # SDL (pygame, which draws classic control) needs no display for rgb_array.
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
        os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
        options["render_mode"] = render_mode
    try:
        return gym.make(env_id, **options)
    except gym.error.Error as error:
        raise ValueError(f"cannot make gymnasium environment {env_id!r}: {error}") from error


def scalar_info_keys(env_id: str, max_steps: int | None = None) -> dict[str, str]:
    """Info entries of one step that are scalars (recorded as step columns), with kinds."""
    env = make_env(env_id, max_steps)
    env.reset(seed=0)
    env.action_space.seed(0)
    _, _, _, _, info = env.step(env.action_space.sample())
    env.close()
    keys = {}
    for key, value in sorted(info.items()):
        if key == NOISE_COLUMN:
            continue
        if isinstance(value, bool | np.bool_):
            keys[key] = "bool"
        elif isinstance(value, int | float | np.integer | np.floating):
            keys[key] = "float"
    return keys


def _stack(values: list) -> Any:
    if isinstance(values[0], dict):
        return {key: np.stack([v[key] for v in values]) for key in values[0]}
    return np.stack([np.asarray(v) for v in values])


def rollout(
    env: gym.Env,
    policy: Policy | None,
    noise: float,
    seed: int,
    episode: int,
    info_keys: dict[str, str],
    frames: CameraInfo | None = None,
) -> dict[str, Any]:
    """One episode with epsilon-noise `noise`, seeded by (seed, episode); with `frames`,
    also each step's encoded frame of the observation at t (the env renders rgb_array)."""
    rng = np.random.default_rng([seed, episode])
    env_seed, space_seed = (int(s) for s in rng.integers(0, 2**31 - 1, size=2))
    observation, _ = env.reset(seed=env_seed)
    env.action_space.seed(space_seed)
    record: dict[str, list] = {
        k: [] for k in ("obs", "next_obs", "action", "reward", "term", "trunc", "frames")
    }
    infos: dict[str, list] = {key: [] for key in info_keys}
    while True:
        if frames is not None:  # the frame of `observation`, before the step leaves it
            frame = camera_frame(env, frames)  # a video camera encodes the episode at its end
            record["frames"].append(frame if frames.is_video else encode_frame(frame, frames))
        if policy is None or rng.random() < noise:
            action = env.action_space.sample()
        else:
            action = policy(observation)
        next_observation, reward, terminated, truncated, info = env.step(action)
        record["obs"].append(observation)
        record["next_obs"].append(next_observation)
        record["action"].append(action)
        record["reward"].append(reward)
        record["term"].append(terminated)
        record["trunc"].append(truncated)
        for key, kind in info_keys.items():
            infos[key].append(info.get(key, False if kind == "bool" else np.nan))
        observation = next_observation
        if terminated or truncated:
            break
    length = len(record["reward"])
    action = np.asarray(record["action"])
    if isinstance(env.action_space, gym.spaces.Discrete):
        action = action.astype(np.int64).reshape(length)
    return {
        "observation": _stack(record["obs"]),
        "next_observation": _stack(record["next_obs"]),
        "action": action,
        "reward": np.asarray(record["reward"], dtype=np.float64),
        "terminated": np.asarray(record["term"], dtype=bool),
        "truncated": np.asarray(record["trunc"], dtype=bool),
        "infos": {
            key: np.asarray(values, dtype=bool if info_keys[key] == "bool" else np.float64)
            for key, values in infos.items()
        },
        "noise": np.full(length, noise, dtype=np.float32),
        "episode_id": np.full(length, episode, dtype=np.int64),
        "frames": [encode_video(np.stack(record["frames"]), frames)]
        if frames is not None and frames.is_video
        else record["frames"],
    }


def noise_of(episode: int, noise_levels: list[float]) -> float:
    return float(noise_levels[episode % len(noise_levels)])


def collect_tables(
    env_id: str,
    policy_spec: str,
    episodes: range,
    noise_levels: list[float],
    seed: int,
    max_steps: int | None = None,
    info_keys: dict[str, str] | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Roll out `episodes` (episode indices) and return the base step and episode tables."""
    steps, episodes_table, _ = collect_part_tables(
        env_id, policy_spec, episodes, noise_levels, seed, max_steps, info_keys
    )
    return steps, episodes_table


def collect_part_tables(
    env_id: str,
    policy_spec: str,
    episodes: range,
    noise_levels: list[float],
    seed: int,
    max_steps: int | None = None,
    info_keys: dict[str, str] | None = None,
    frames: CameraInfo | None = None,
    pixels_only: bool = False,
) -> tuple[pa.Table, pa.Table, list[bytes]]:
    """`collect_tables`, and with `frames` every step's encoded frame in row order (a
    video camera: every episode's video, in episode order);
    `pixels_only`: the steps table has no `observation` / `next_observation` columns (the
    frames are the observation; the policy still acts on the env's state)."""
    policy = load_policy(policy_spec, env_id)
    env = make_env(env_id, max_steps, render_mode="rgb_array" if frames else None)
    if minigrid.is_minigrid_id(env_id):  # struct views, missions, the bot
        runs = [
            minigrid.rollout(env, policy_spec, policy, noise_of(e, noise_levels), seed, e)
            for e in episodes
        ]
        env.close()
        return (*minigrid.episode_tables(runs, env_id, policy_spec), [])
    info_keys = scalar_info_keys(env_id, max_steps) if info_keys is None else info_keys
    runs = [
        rollout(env, policy, noise_of(e, noise_levels), seed, e, info_keys, frames)
        for e in episodes
    ]
    env.close()

    def cat(key: str) -> Any:
        values = [run[key] for run in runs]
        if isinstance(values[0], dict):
            return {k: np.concatenate([v[k] for v in values]) for k in values[0]}
        return np.concatenate(values)

    infos = {NOISE_COLUMN: cat("noise"), **cat("infos")}
    encoded = [frame for run in runs for frame in run["frames"]]
    steps, episodes_table = build_tables(
        episode_ids=cat("episode_id"),
        observation=None if pixels_only else cat("observation"),
        next_observation=None if pixels_only else cat("next_observation"),
        action=cat("action"),
        reward=cat("reward"),
        terminated=cat("terminated"),
        truncated=cat("truncated"),
        infos=infos,
        labels=EpisodeLabels(env_id, f"collect:{policy_spec}", (NOISE_COLUMN,)),
    )
    return steps, episodes_table, encoded


def describe_spaces(env_id: str, max_steps: int | None = None) -> dict[str, str]:
    """Observation and action spaces as text, for the manifest metadata."""
    env = make_env(env_id, max_steps)
    spaces = {
        "observation_space": str(env.observation_space),
        "action_space": str(env.action_space),
    }
    env.close()
    return spaces


# ---------------------------------------------------------------- the collect job


@dataclass(frozen=True)
class Rollouts:
    """How every episode is rolled out."""

    env_id: str  # a gymnasium environment id
    policy: str = "heuristic"  # random, heuristic or module:function
    noise_levels: tuple[float, ...] = (0.0,)  # episode e uses noise_levels[e % len]
    seed: int = 0  # episode e is seeded from (seed, e)
    max_steps: int | None = None  # overrides the environment's time limit
    frames: CameraInfo | None = None  # record env.render() at this size and codec
    camera: str = DEFAULT_CAMERA  # the frames' camera name (column frame_<camera>)
    pixels_only: bool = False  # store no state vector: the frames are the observation


@dataclass(frozen=True)
class CollectPlan:
    """The rollouts, the episode ranges of the parts, and what the first step showed."""

    rollouts: Rollouts
    parts: list[range]  # episode indices of each part
    info_keys: dict[str, str]  # scalar info entries recorded as step columns, with kinds
    spaces: dict[str, str]  # observation and action spaces as text

    @property
    def episodes(self) -> int:
        return sum(len(part) for part in self.parts)


def plan_collect(rollouts: Rollouts, episodes: int, episodes_per_part: int) -> CollectPlan:
    """Check the environment and the policy (an unknown env id first: gymnasium suggests
    the near miss) and cut `episodes` episodes into parts; nothing is rolled out."""
    info_keys = scalar_info_keys(rollouts.env_id, rollouts.max_steps)
    load_policy(rollouts.policy, rollouts.env_id)
    if rollouts.frames is not None and minigrid.is_minigrid_id(rollouts.env_id):
        raise ValueError("--frames is not supported for MiniGrid/BabyAI: the 7x7 view is stored")
    if rollouts.pixels_only and rollouts.frames is None:
        raise ValueError("--pixels-only needs --frames HxW: the frames are the observation")
    if rollouts.frames is not None:
        check_rendering(rollouts.env_id, rollouts.frames, rollouts.max_steps)
    parts = [
        range(start, min(start + episodes_per_part, episodes))
        for start in range(0, episodes, episodes_per_part)
    ]
    spaces = describe_spaces(rollouts.env_id, rollouts.max_steps)
    return CollectPlan(rollouts, parts, info_keys, spaces)


def check_rendering(env_id: str, camera: CameraInfo, max_steps: int | None = None) -> None:
    """The env renders an rgb_array frame that encodes in the camera's codec, or a
    ValueError says why (no rgb_array render mode, pygame missing)."""
    plain = make_env(env_id, max_steps)
    modes = list(plain.metadata.get("render_modes") or [])
    plain.close()
    if "rgb_array" not in modes:
        raise ValueError(
            f"{env_id} cannot render frames: its render modes are {modes or 'none'}; "
            "--frames needs an env with render_mode='rgb_array'"
        )
    env = make_env(env_id, max_steps, render_mode="rgb_array")
    try:
        env.reset(seed=0)
        frame = camera_frame(env, camera)
        encode_video(frame[None], camera) if camera.is_video else encode_frame(frame, camera)
    except (ImportError, gym.error.Error) as error:  # pygame missing, no rgb_array mode
        raise ValueError(f"{env_id}: cannot render frames: {error}") from error
    finally:
        env.close()


@dataclass(frozen=True)
class CollectTask:
    """Roll out `episodes` and write them as part `index` (a task of the executor)."""

    index: int
    rollouts: Rollouts
    episodes: range
    info_keys: dict[str, str]
    writer: VersionWriter


def collect_part(task: CollectTask) -> WrittenParts:
    """Roll out, check and write one part (runs in a Ray task), with its frames part when
    frames are recorded. A policy or environment that produced a non-finite observation,
    action or reward fails the job: such steps are never stored."""
    rollouts = task.rollouts
    steps, episodes, frames = collect_part_tables(
        rollouts.env_id,
        rollouts.policy,
        task.episodes,
        list(rollouts.noise_levels),
        rollouts.seed,
        rollouts.max_steps,
        task.info_keys,
        rollouts.frames,
        rollouts.pixels_only,
    )
    problems = check_stored_values(f"collect {rollouts.env_id}", steps, episodes)
    if problems:
        raise ValidationError.of(
            problems, f"The policy {rollouts.policy!r} or the env is at fault."
        )
    written = [task.writer.write_part(task.index, steps, episodes)]
    if rollouts.frames is not None:
        table = frames_table({rollouts.camera: frames})
        levels = (None, table) if rollouts.frames.is_video else (table, None)
        written.append(task.writer.write_part(task.index, *levels, group=FRAMES_GROUP))
    return WrittenParts(tuple(written))


def collect(plan: CollectPlan, output: str, *, executor: Executor, command: str) -> Manifest:
    """Roll out a plan's parts into a new committed version at `output`; its manifest.

    The bytes depend on the plan alone (each episode is seeded from (seed, episode)), not
    on the executor or the part size. On any failure nothing is left: no staged files, no
    version."""
    rollouts = plan.rollouts
    metadata = {
        "env_id": rollouts.env_id,
        "policy": rollouts.policy,
        "noise_levels": list(rollouts.noise_levels),
        "seed": rollouts.seed,
        **plan.spaces,
    }
    if rollouts.pixels_only:
        metadata["pixels_only"] = True
    if minigrid.is_minigrid_id(rollouts.env_id):
        metadata["observation_shapes"] = minigrid.OBSERVATION_SHAPES
        metadata["observation_dtypes"] = minigrid.OBSERVATION_DTYPES
    with VersionWriter(output) as writer:
        tasks = [
            CollectTask(index, rollouts, episodes, plan.info_keys, writer)
            for index, episodes in enumerate(plan.parts)
        ]
        written = executor.map(
            collect_part,
            tasks,
            description=f"collect {rollouts.env_id}",
            total=plan.episodes,
            unit="episodes with frames" if rollouts.frames else "episodes",
        )
        manifest = base_manifest(
            writer.uri,
            written,
            operation="collect",
            command=command,
            metadata=metadata,
            details={"episodes": plan.episodes, "noise": list(rollouts.noise_levels)},
            cameras={rollouts.camera: rollouts.frames} if rollouts.frames else None,
        )
        writer.commit(manifest)
    return manifest
