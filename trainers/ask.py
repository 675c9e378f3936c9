"""Asking a trained policy: roll it out in a gymnasium environment, conditioned on a value.

- return-to-go columns (a scalar column whose name contains "return_to_go") start at the
  requested value and are decremented by every received reward, as in Decision Transformer;
  other scalars (an episode's return, a D-REX score) stay at the requested value;
- goal columns (vectors) follow the environment's own `desired_goal` when the observation
  is a goal dict (hindsight/PointGoal-v0), or a requested goal that is set into the
  environment; the achieved value is then the success rate;
- categorical columns take a label of the index's vocabulary ("expert");
- text columns take a sentence, encoded as the run's text encoder encoded training text
  (trainers/text.py: tokens of the shard-time vocabulary, or the sentence vector of the
  recorded embedder or endpoint); a request the shards held out (`shard --exclude`), or
  with words a `tokens` run never saw, gets a one-line warning on stderr.

The episodes of one seed run side by side in one batch through the model (one forward
per environment step), the last `window` steps as context, left-padded like training.
A policy trained on frames is asked from pixels (`RolloutFrames`): the environment renders
every step with the function `collect --frames` used (engine.frames.render_frame), the
frame goes through the camera's codec (a JPEG-trained policy sees JPEG artifacts, as in
training) and the last K frames are stacked as the loader stacks them.
The environment defaults to the one the run's shards were collected in (`env_id` in the
dataset metadata the run recorded). Progress (episodes done, ETA) goes to stderr.

`sweep` asks for each value in turn and reports achieved vs requested with two references:
the dataset's mean return, and the Spearman rank correlation of achieved against requested
(numbers by value; labels and sentences in the order they were listed). When achieved does
not follow requested (correlation at most 0.5, or the highest request achieving no more than
the lowest) the report carries a warning. It writes ask.json and ask.png (achieved vs
requested, with the dataset's own return distribution marked); the statistics and the plot
are trainers/sweep_report.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Any

import numpy as np
import torch

import engine.envs  # noqa: F401  (registers hindsight/* envs)
from engine import minigrid
from engine.collect import make_env
from engine.progress import Progress
from schemas.shard_index import encode_text
from trainers.ask_frames import RolloutFrames, as_stored, check_renderable  # noqa: F401
from trainers.options import RunConfig
from trainers.sweep_report import (
    follow_warning,
    is_return_to_go,
    mean_ci95,
    plot_sweep,
    sweep_reference,
    wilson_ci95,
)
from trainers.text import encode_request, request_warnings
from trainers.train import load_policy


def tokenize(text: str, vocabulary: list[str], max_tokens: int) -> list[int]:
    """Token ids of `text` exactly as the shard writer encoded training text."""
    return [int(i) for i in encode_text([text], vocabulary, max_tokens)[0]]


def return_to_go_range(spec: dict[str, Any]) -> tuple[float, float]:
    """The return-to-go values a rollout may ask for: the range the data holds (the shard
    index's min and max of the column). A request above it starts at the data's best, and
    once an episode has earned more than was asked the policy is asked for the data's best
    from there on, never for a return-to-go no trajectory had (off the data the policy's
    answer is arbitrary: asked past the top, achieved return falls instead of rising)."""
    low, high = spec.get("min"), spec.get("max")
    return (
        -math.inf if low is None else float(low),
        math.inf if high is None else float(high),
    )


def parse_value(spec: dict[str, Any], column: str, text: str) -> Any:
    """A requested value from the command line, checked against the column's index entry."""
    kind = spec["type"]
    if kind == "scalar":
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"condition {column!r} is a number; got {text!r}") from None
    if kind == "vector":
        if text in ("", "env", "desired_goal"):
            return None  # the environment's own goal
        parts = [float(part) for part in re.split(r"[:;/ ]", text) if part]
        if len(parts) != int(spec["dim"]):
            raise ValueError(
                f"condition {column!r} is a {spec['dim']}-vector; write it as "
                f"{':'.join(['0.5'] * int(spec['dim']))} (or 'env' for the env's goal), got {text!r}"
            )
        return parts
    if kind == "categorical":
        if text not in spec["vocabulary"]:
            raise ValueError(f"condition {column!r} has labels {spec['vocabulary']}; got {text!r}")
        return text
    return text


def _observation_vector(observation: Any) -> np.ndarray:
    if isinstance(observation, dict) and "image" in observation and "direction" in observation:
        return minigrid.view_vector(observation)  # as the shards flatten the stored struct
    if isinstance(observation, dict):
        return np.asarray(observation["observation"], dtype=np.float32).reshape(-1)
    return np.asarray(observation, dtype=np.float32).reshape(-1)


@torch.no_grad()
def rollout(
    policy: torch.nn.Module,
    config: RunConfig,
    env_id: str,
    condition: dict[str, Any],
    episodes: int,
    seed: int,
    device: str = "cpu",
    progress: Progress | None = None,
    mission: str | None = None,
    sample: bool = False,
) -> dict[str, list[float]]:
    """Run `episodes` episodes side by side; returns per-episode returns (and successes).
    A MiniGrid/BabyAI env is set to `mission` (engine.minigrid.reset_with_mission) and
    succeeds when it is done (terminated with a reward). `sample`: discrete actions are
    drawn from the policy's distribution (seeded by `seed`) instead of its argmax."""
    draws = torch.Generator().manual_seed(seed) if sample else None
    model = config.model
    specs = model["conditions"]
    window = 1 if model["kind"] == "mlp" else model["window"]
    discrete = model["action"]["kind"] == "discrete"
    frames = RolloutFrames(model["frames"], episodes, window) if model.get("frames") else None
    render_mode = "rgb_array" if frames is not None else None
    envs = [make_env(env_id, render_mode=render_mode) for _ in range(episodes)]
    observations = []
    grid = minigrid.is_minigrid(envs[0])
    for i, env in enumerate(envs):
        # A requested goal goes to the environment the gymnasium way: reset options.
        goals = [v for c, v in condition.items() if specs[c]["type"] == "vector" and v is not None]
        options = {"goal": goals[0]} if goals else None
        if grid and mission:  # seeds far apart: a mission may skip a few resets
            observation, _ = minigrid.reset_with_mission(env, mission, (seed * 100_003 + i) * 1000)
        elif grid:
            observation = minigrid.reset(env, seed * 100_003 + i)
        else:
            observation, _ = env.reset(seed=seed * 100_003 + i, options=options)
        observations.append(observation)
    horizon = max(
        minigrid.horizon(env) if grid else int(env.spec.max_episode_steps or 1000) for env in envs
    )
    obs_dim = model["observation_dim"]
    uses_state = frames is None or model["frames"]["inputs"] != "frames"
    env_obs_dim = _observation_vector(observations[0]).size
    if uses_state and env_obs_dim != obs_dim:
        raise ValueError(
            f"{env_id} observations have {env_obs_dim} numbers, the policy was trained on "
            f"{obs_dim}: ask in the environment its shards came from"
        )
    act_shape = () if discrete else (int(model["action"]["dim"]),)

    history_obs = np.zeros((episodes, horizon, obs_dim), np.float32)
    history_act = np.zeros((episodes, horizon, *act_shape), np.int64 if discrete else np.float32)
    history_cond: dict[str, np.ndarray] = {}
    for column, spec in specs.items():
        if spec["type"] == "scalar":
            history_cond[column] = np.zeros((episodes, horizon), np.float32)
        elif spec["type"] == "vector":
            history_cond[column] = np.zeros((episodes, horizon, int(spec["dim"])), np.float32)
        elif spec["type"] == "categorical":
            history_cond[column] = np.zeros((episodes, horizon), np.int64)
    # Token ids or a sentence vector, as the run's text encoder saw training text.
    text_tokens = {
        column: encode_request(spec, str(condition[column]), episodes)
        for column, spec in specs.items()
        if spec["type"] == "text"
    }
    scalar_now = {
        column: np.full(episodes, float(condition[column]), np.float32)
        for column, spec in specs.items()
        if spec["type"] == "scalar"
    }
    # Return-to-go is kept within the range the data holds (see `return_to_go_range`).
    ranges = {
        column: return_to_go_range(specs[column])
        for column in scalar_now
        if is_return_to_go(column)
    }
    returns = np.zeros(episodes)
    success = np.zeros(episodes, dtype=bool)
    has_success = False
    done = np.zeros(episodes, dtype=bool)
    for t in range(horizon):
        if uses_state:
            history_obs[:, t] = np.stack([_observation_vector(o) for o in observations])
        if frames is not None:
            frames.observe(envs, done)
        for column, spec in specs.items():
            if spec["type"] == "scalar":
                if column in ranges:
                    np.clip(scalar_now[column], *ranges[column], out=scalar_now[column])
                history_cond[column][:, t] = scalar_now[column]
            elif spec["type"] == "vector":
                if isinstance(observations[0], dict) and "desired_goal" in observations[0]:
                    history_cond[column][:, t] = np.stack([o["desired_goal"] for o in observations])
                else:
                    history_cond[column][:, t] = np.asarray(condition[column], np.float32)
            elif spec["type"] == "categorical":
                history_cond[column][:, t] = spec["vocabulary"].index(condition[column])
        start = max(0, t + 1 - window)
        length = t + 1 - start
        pad = window - length

        def context(array: np.ndarray, start: int = start, stop: int = t + 1) -> torch.Tensor:
            part = array[:, start:stop]
            padding = np.zeros((episodes, window - part.shape[1], *array.shape[2:]), array.dtype)
            return torch.from_numpy(np.concatenate([padding, part], axis=1)).to(device)

        batch = {
            "observation": context(history_obs),
            "action": context(history_act),
            "timestep": context(np.broadcast_to(np.arange(horizon), (episodes, horizon)).copy()),
            "mask": torch.from_numpy(
                np.broadcast_to(np.arange(window) >= pad, (episodes, window)).copy()
            ).to(device),
        }
        for column in history_cond:
            batch[column] = context(history_cond[column])
        batch.update({column: tokens.to(device) for column, tokens in text_tokens.items()})
        if frames is not None:
            batch.update(frames.batch(device))
        prediction = policy(batch)[:, -1].float()
        if draws is not None and discrete:
            probabilities = torch.softmax(prediction, -1).cpu()
            actions = torch.multinomial(probabilities, 1, generator=draws)[:, 0].numpy()
        else:
            actions = policy.actions.to_env(prediction).cpu().numpy()
        history_act[:, t] = actions

        for i, env in enumerate(envs):
            if done[i]:
                continue
            observation, reward, terminated, truncated, info = env.step(actions[i])
            returns[i] += reward
            for column in scalar_now:
                if is_return_to_go(column):
                    scalar_now[column][i] -= reward
            if "is_success" in info:
                has_success = True
                success[i] = bool(info["is_success"])
            elif grid:  # BabyAI rewards only a mission done
                has_success = True
                success[i] = bool(terminated and reward > 0)
            observations[i] = observation
            done[i] = terminated or truncated
            if done[i] and progress is not None:
                progress.advance(1)
        if done.all():
            break
    if progress is not None:
        progress.advance(int((~done).sum()))  # episodes the horizon cut short
    for env in envs:
        env.close()
    result = {"returns": returns.tolist()}
    if has_success:
        result["successes"] = success.astype(float).tolist()
    return result


def achieved_metric(config: RunConfig, columns: list[str]) -> str:
    """What 'achieved' means: success rate for goal conditions, the return otherwise."""
    specs = config.model["conditions"]
    return "success" if any(specs[c]["type"] == "vector" for c in columns) else "return"


def resolve_env(config: RunConfig, env_id: str | None, run_dir: str) -> str:
    """The environment to ask in: the one given, else the one the run's data came from."""
    if env_id:
        return env_id
    if config.env_id is None:
        raise ValueError(
            f"{run_dir} does not record its environment (its shards' dataset has no env_id); "
            "pass --env ENV_ID"
        )
    return config.env_id


def dataset_mean_return(config: RunConfig) -> float | None:
    """The mean episode return of the dataset the run was trained on (shard index facts)."""
    returns = config.index.get("episode_return") or {}
    return float(returns["mean"]) if "mean" in returns else None


def ask(
    run_dir: str,
    env_id: str | None,
    condition: dict[str, str],
    episodes: int = 10,
    seeds: list[int] | None = None,
    device: str = "cpu",
    mission: str | None = None,
    metric: str = "auto",
    sample: bool = False,
) -> dict[str, Any]:
    """Roll the run's policy out under one condition over seeds; returns achieved stats.

    `env_id` None asks in the environment the run's data was collected in; `mission`,
    `metric` and `sample`: see `ask_policy`."""
    policy, config = load_policy(run_dir, device)
    env_id = resolve_env(config, env_id, run_dir)
    seeds = seeds or [0]
    with Progress(f"ask {env_id}", episodes * len(seeds), "episodes") as progress:
        return ask_policy(
            policy, config, run_dir, env_id, condition, episodes, seeds, device, progress,
            mission=mission, metric=metric, sample=sample,
        )  # fmt: skip


def mission_of(env_id: str, specs: dict[str, Any], values: dict[str, Any], mission: str | None):
    """The mission a MiniGrid/BabyAI env is set to: the one given, else the requested text
    itself (a text or label condition); None for other envs or without either (the env's
    own mission)."""
    if not minigrid.is_minigrid_id(env_id):
        if mission:
            raise ValueError(f"--mission is for MiniGrid/BabyAI envs, not {env_id}")
        return None
    kinds = ("text", "categorical")
    texts = [v for c, v in values.items() if specs[c]["type"] in kinds and v is not None]
    if mission:
        minigrid.parse_mission(mission, given=True)  # one the env cannot be set to fails here
        return mission
    mission = str(texts[0]) if texts else None
    if mission:
        minigrid.parse_mission(mission)
    return mission


def ask_policy(
    policy: torch.nn.Module,
    config: RunConfig,
    run_dir: str,
    env_id: str,
    condition: dict[str, str],
    episodes: int,
    seeds: list[int],
    device: str = "cpu",
    progress: Progress | None = None,
    *,
    mission: str | None = None,
    metric: str = "auto",
    sample: bool = False,
) -> dict[str, Any]:
    """`ask` for a policy already loaded (a sweep loads it once). `mission`: the mission a
    MiniGrid/BabyAI env is set to and scored on (`mission_of`); `metric`: what "achieved"
    is: auto (`achieved_metric`), return, or success (the env's success rate, with a Wilson
    interval); `sample`: draw discrete actions from the policy instead of its argmax."""
    check_renderable(config, run_dir)
    specs = config.model["conditions"]
    unknown = sorted(set(condition) - set(specs))
    if unknown:
        raise KeyError(
            f"{run_dir} was trained on condition columns {sorted(specs) or ['none']}; "
            f"cannot ask for {unknown}"
        )
    missing = sorted(
        set(specs) - set(condition) - {c for c, s in specs.items() if s["type"] == "vector"}
    )
    if missing:
        raise ValueError(f"{run_dir} is conditioned on {sorted(specs)}; give a value for {missing}")
    values = {
        column: parse_value(specs[column], column, text) for column, text in condition.items()
    }
    for column in specs:
        values.setdefault(column, None)  # goals default to the environment's own
    mission = mission_of(env_id, specs, values, mission)  # a bad request fails before warnings
    warnings = request_warnings(config.index, specs, values)
    for line in warnings:
        print(f"ask: warning: {line}", file=sys.stderr)
    metric = achieved_metric(config, list(specs)) if metric == "auto" else metric
    returns, successes = [], []
    for seed in seeds:
        result = rollout(
            policy, config, env_id, values, episodes, seed, device, progress, mission, sample
        )
        returns += result["returns"]
        successes += result.get("successes", [])
    if metric == "success" and not successes:
        raise ValueError(f"--metric success: {env_id} reports no success (no is_success info)")
    achieved = successes if metric == "success" else returns
    mean, low, high = (wilson_ci95 if achieved is successes else mean_ci95)(achieved)
    return_mean, return_low, return_high = mean_ci95(returns)
    result = {
        "env": env_id,
        "metric": metric if achieved is successes else "return",
        "achieved_mean": mean,
        "achieved_ci95": [low, high],
        "episodes": len(achieved),
        "return_mean": return_mean,
        "return_ci95": [return_low, return_high],
        "dataset_mean_return": dataset_mean_return(config),
    }
    if mission:
        result["mission"] = mission
    if warnings:
        result["warnings"] = warnings
    if successes:  # goal environments report success whatever the policy is conditioned on
        result["success_mean"], *interval = wilson_ci95(successes)
        result["success_ci95"] = interval
    return result


def sweep(
    run_dir: str,
    env_id: str | None,
    column: str,
    values: list[str],
    episodes: int = 10,
    seeds: list[int] | None = None,
    out_dir: str | None = None,
    device: str = "cpu",
    mission: str | list[str] | None = None,
    metric: str = "auto",
    sample: bool = False,
) -> dict[str, Any]:
    """Ask for each value of one column; returns the report (rows, references, warning)
    and writes it as ask.json, with the plot ask.png, under `out_dir`. On MiniGrid/BabyAI
    each value is also the mission, unless `mission` gives one for every value or a list
    with one per value (a paraphrase and the mission it means)."""
    missions = mission if isinstance(mission, list) else [mission] * len(values)
    if len(missions) != len(values):
        raise ValueError(
            f"--mission: give one mission or one per swept value ({len(values)}), "
            f"got {len(missions)}"
        )
    policy, config = load_policy(run_dir, device)
    env_id = resolve_env(config, env_id, run_dir)
    seeds = seeds or [0]
    results, achieved_as = [], "return"
    total = len(values) * len(seeds) * episodes
    with Progress(f"ask {column} sweep", total, "episodes") as progress:
        for value, value_mission in zip(values, missions):
            outcome = ask_policy(
                policy, config, run_dir, env_id, {column: value}, episodes, seeds, device,
                progress, mission=value_mission, metric=metric, sample=sample,
            )  # fmt: skip
            achieved_as = outcome["metric"]
            requested: Any = value
            try:
                requested = float(value)
            except ValueError:
                pass
            results.append(
                {
                    "requested": requested,
                    "achieved_mean": outcome["achieved_mean"],
                    "achieved_ci95": outcome["achieved_ci95"],
                    "episodes": outcome["episodes"],
                }
            )
            if "mission" in outcome:
                results[-1]["mission"] = outcome["mission"]
            if achieved_as == "success":  # the return next to the success rate
                results[-1]["return_mean"] = outcome["return_mean"]
                results[-1]["return_ci95"] = outcome["return_ci95"]
    reference = sweep_reference(results, dataset_mean_return(config))
    # Sentences (free text, missions) have no order, so no rank correlation; labels
    # (skill levels) are ranked in the order they were requested.
    unordered = config.model["conditions"].get(column, {}).get("type") == "text"
    if unordered or minigrid.is_minigrid_id(env_id):
        reference["follows_request"] = reference["spearman"] = None
    report = {
        "env": env_id,
        "condition": column,
        "metric": achieved_as,
        "results": results,
        "reference": reference,
        "warning": follow_warning(reference, column, achieved_as),
    }
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "ask.json"), "w") as handle:
            json.dump(report, handle, indent=2)
        plot_sweep(report, config.index.get("episode_return"), os.path.join(out_dir, "ask.png"))
    return report
