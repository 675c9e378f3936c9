"""hindsight's own gymnasium environments: `hindsight/PointGoal-v0` and
`hindsight/PendulumNoArrow-v1` (at the end of this file).

`hindsight/PointGoal-v0`, a tiny goal-conditioned environment.

A point in the square [-1, 1]^2 moves by `STEP_SIZE * action` per step (action in
[-1, 1]^2). Observations are gymnasium-robotics style dicts: `observation` (position and
velocity), `achieved_goal` (position), `desired_goal` (the target). The reward is sparse:
0 when the point is within `DISTANCE_THRESHOLD` of the goal, -1 otherwise, and
`compute_reward(achieved_goal, desired_goal, info)` recomputes it for any (batched) goals,
which is exactly what hindsight relabeling of goals needs. Episodes never terminate; the
time limit (50 steps) truncates them.

Importing this module registers the environments; `engine.collect` and `trainers.ask`
import it, so `hindsight collect hindsight/PointGoal-v0 ...` works out of the box.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.envs.classic_control.pendulum import PendulumEnv

ENV_ID = "hindsight/PointGoal-v0"
STEP_SIZE = 0.1
DISTANCE_THRESHOLD = 0.1
MAX_EPISODE_STEPS = 50


def goal_distance(achieved_goal: np.ndarray, desired_goal: np.ndarray) -> np.ndarray:
    """Euclidean distance over the last axis; works on single goals and batches."""
    return np.linalg.norm(np.asarray(achieved_goal) - np.asarray(desired_goal), axis=-1)


class PointGoalEnv(gym.Env):
    """2-D point reaching a goal; sparse reward; dict observation."""

    metadata = {"render_modes": []}

    def __init__(self, distance_threshold: float = DISTANCE_THRESHOLD):
        self.distance_threshold = distance_threshold
        box = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.observation_space = spaces.Dict(
            {
                "observation": spaces.Box(-np.inf, np.inf, shape=(4,), dtype=np.float32),
                "achieved_goal": box,
                "desired_goal": box,
            }
        )
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self._position = np.zeros(2, dtype=np.float32)
        self._velocity = np.zeros(2, dtype=np.float32)
        self._goal = np.zeros(2, dtype=np.float32)

    def compute_reward(
        self, achieved_goal: np.ndarray, desired_goal: np.ndarray, info: Any = None
    ) -> np.ndarray:
        """0 within the distance threshold, -1 otherwise (float32, batched or not)."""
        distance = goal_distance(achieved_goal, desired_goal)
        return np.where(distance > self.distance_threshold, -1.0, 0.0).astype(np.float32)

    def _observation(self) -> dict[str, np.ndarray]:
        return {
            "observation": np.concatenate([self._position, self._velocity]).astype(np.float32),
            "achieved_goal": self._position.copy(),
            "desired_goal": self._goal.copy(),
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """`options={"goal": [x, y]}` commands a goal; otherwise one is drawn at random."""
        super().reset(seed=seed)
        self._position = self.np_random.uniform(-0.8, 0.8, size=2).astype(np.float32)
        self._goal = self.np_random.uniform(-0.8, 0.8, size=2).astype(np.float32)
        if options and options.get("goal") is not None:
            goal = np.asarray(options["goal"], dtype=np.float32).reshape(-1)
            if goal.shape != (2,):
                raise ValueError(f"PointGoal-v0: a goal is 2 numbers, got {options['goal']!r}")
            self._goal = np.clip(goal, -1.0, 1.0)
        self._velocity = np.zeros(2, dtype=np.float32)
        return self._observation(), {"is_success": False}

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
        previous = self._position
        self._position = np.clip(previous + STEP_SIZE * action, -1.0, 1.0).astype(np.float32)
        self._velocity = (self._position - previous).astype(np.float32)
        observation = self._observation()
        reward = float(self.compute_reward(observation["achieved_goal"], self._goal))
        info = {"is_success": reward == 0.0}
        return observation, reward, False, False, info


def heuristic_policy(observation: dict[str, np.ndarray]) -> np.ndarray:
    """Steer straight at the goal at full speed, slowing down on arrival.

    Accepts a single dict observation or a batch (arrays with a leading axis).
    """
    direction = np.asarray(observation["desired_goal"]) - np.asarray(observation["achieved_goal"])
    return np.clip(direction / STEP_SIZE, -1.0, 1.0).astype(np.float32)


# ------------------------------------------------- hindsight/PendulumNoArrow-v1

PENDULUM_NO_ARROW_ID = "hindsight/PendulumNoArrow-v1"


class HideTorqueArrow(gym.Wrapper):
    """Pendulum-v1 whose `render()` leaves out the torque arrow; nothing else differs.

    Pendulum-v1 draws the torque of the step before as an arrow around the pivot, so every
    frame shows the previous action, which predicts the next action in the data but says
    nothing about the state: a policy cloned from frames can learn to repeat it (the
    "copycat" causal confusion of de Haan et al. 2019, Wen et al. 2020). In the pixel
    experiment (docs/trainer.md, Pixels), on the same 200 episodes, asking for a high
    return went from below the dataset mean with the arrow to above it without.
    Dynamics, rewards, observations, seeding and the 200-step limit are Pendulum-v1's,
    step for step (tested)."""

    def render(self):
        pendulum = self.env.unwrapped
        last_torque, pendulum.last_u = pendulum.last_u, None  # None: nothing drawn
        try:
            return self.env.render()
        finally:
            pendulum.last_u = last_torque


def pendulum_no_arrow(**kwargs: Any) -> gym.Env:
    """gymnasium's entry point of `hindsight/PendulumNoArrow-v1`."""
    return HideTorqueArrow(PendulumEnv(**kwargs))


def register() -> None:
    """Register hindsight's environments with gymnasium (idempotent)."""
    if ENV_ID not in gym.registry:
        gym.register(
            id=ENV_ID,
            entry_point="engine.envs:PointGoalEnv",
            max_episode_steps=MAX_EPISODE_STEPS,
        )
    if PENDULUM_NO_ARROW_ID not in gym.registry:
        gym.register(
            id=PENDULUM_NO_ARROW_ID,
            entry_point="engine.envs:pendulum_no_arrow",
            max_episode_steps=gym.spec("Pendulum-v1").max_episode_steps,
        )


register()
