"""Asking as well as the simplest reference: hindsight's trainer with its defaults against a
60-line RvS script, on the same shards (issue 18, goal 5).

    .venv/bin/python -m bench.rvs --out bench/results/rvs.json [--seeds 0 1 2]

Data: Pendulum-v1 from the heuristic policy (a good one: about -150 per episode) at
epsilon-noise 0, 0.1, 0.2, 0.3, 0.4 (each step a uniformly random action with that
probability), relabeled with `returns` and sharded with return_to_go (window 20).
Learners, per seed, on those shards:
  reference  `rvs_reference` below, plain PyTorch: an MLP on single steps (state and
             return-to-go in, standardized; 2 hidden layers of 256, ReLU), 5000 steps of
             batch 256, Adam 1e-3, MSE on the action scaled to [-1, 1]; every step of the
             shards read once through the loader into tensors
  hindsight  `hindsight train SHARDS RUN --condition return_to_go --seed S`: every other
             setting its default
Both are asked for each requested return (each noise level's mean return, then the
dataset's top return) on the same environment seeds, the same way: the return-to-go starts
at the request, drops by every reward and stays within the data's range (trainers/ask.py).
Normalized return = (achieved - noisiest level's mean) / (best level's mean - noisiest
level's mean): 0 is the noisiest data, 1 the best. Reported per seed and as a mean with a
95% t-interval over seeds, with the paired difference hindsight - reference; training time
of both (wall, same process, same threads) and the machine's load.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import tempfile
import time
from typing import Any

import numpy as np
import torch

NOISE = [0.0, 0.1, 0.2, 0.3, 0.4]
ENV = "Pendulum-v1"
# Two-sided 95% Student t critical values by degrees of freedom.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}


# --- the reference: RvS in plain PyTorch (about 60 lines) -------------------------------------


def read_steps(shards: str) -> dict[str, np.ndarray]:
    """Every step of the shards once (windows of one step, one epoch)."""
    from trainers.loader import stream

    parts = list(stream(shards, 4096, "return_to_go", window=1, epochs=1, seed=0))
    return {
        key: torch.cat([batch[key][:, 0] for batch in parts]).numpy()
        for key in ("observation", "return_to_go", "action")
    }


def rvs_reference(steps: dict[str, np.ndarray], seed: int, train_steps: int = 5000):
    """An MLP on (state, return-to-go) -> action, trained with MSE; returns act(obs, rtg)."""
    torch.manual_seed(seed)
    observation = torch.as_tensor(steps["observation"])
    rtg = torch.as_tensor(steps["return_to_go"]).float()[:, None]
    action = torch.as_tensor(steps["action"]).reshape(len(rtg), -1)
    scale = action.abs().max(0).values.clamp(min=1e-6)  # Pendulum: torque in [-2, 2]
    obs_mean, obs_std = observation.mean(0), observation.std(0)
    rtg_mean, rtg_std = rtg.mean(), rtg.std()
    inputs = torch.cat([(observation - obs_mean) / obs_std, (rtg - rtg_mean) / rtg_std], 1)
    targets = action / scale
    network = torch.nn.Sequential(
        torch.nn.Linear(inputs.shape[1], 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, targets.shape[1]),
    )  # fmt: skip
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    for _ in range(train_steps):
        index = torch.randint(0, len(inputs), (256,))
        loss = ((network(inputs[index]) - targets[index]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def act(obs: np.ndarray, return_to_go: np.ndarray) -> np.ndarray:
        x = torch.cat(
            [
                (torch.as_tensor(obs, dtype=torch.float32) - obs_mean) / obs_std,
                (torch.as_tensor(return_to_go, dtype=torch.float32)[:, None] - rtg_mean) / rtg_std,
            ],
            1,
        )
        return (network(x).clamp(-1, 1) * scale).numpy()

    return act, (float(rtg.min()), float(rtg.max()))


def reference_rollout(act, rtg_range, requested: float, episodes: int, seed: int) -> list[float]:
    """Episodes side by side; environment seeds as trainers.ask.rollout's."""
    import gymnasium as gym

    envs = [gym.make(ENV) for _ in range(episodes)]
    obs = np.stack([env.reset(seed=seed * 100_003 + i)[0] for i, env in enumerate(envs)])
    return_to_go = np.full(episodes, requested)
    returns, done = np.zeros(episodes), np.zeros(episodes, dtype=bool)
    while not done.all():
        return_to_go = np.clip(return_to_go, *rtg_range)
        actions = act(obs, return_to_go)
        for i, env in enumerate(envs):
            if done[i]:
                continue
            obs[i], reward, terminated, truncated, _ = env.step(actions[i])
            returns[i] += reward
            return_to_go[i] -= reward
            done[i] = terminated or truncated
    return returns.tolist()


# --- the benchmark ---------------------------------------------------------------------------


def interval(values: list[float]) -> dict[str, Any]:
    """Mean over seeds with a 95% t-interval."""
    array = np.asarray(values, dtype=float)
    mean = float(array.mean())
    half = 0.0
    if len(array) > 1:
        half = T95.get(len(array) - 1, 1.96) * float(array.std(ddof=1)) / math.sqrt(len(array))
    return {"mean": mean, "ci95": [mean - half, mean + half], "per_seed": array.tolist()}


def level_returns(raw: str) -> dict[float, float]:
    """Mean episode return of each noise level (the collected episodes' table)."""
    import pyarrow.parquet as pq

    tables = [pq.read_table(path) for path in sorted(glob.glob(f"{raw}/base/episodes/*.parquet"))]
    noise = np.concatenate([t["noise"].to_numpy() for t in tables])
    returns = np.concatenate([t["return"].to_numpy() for t in tables])
    return {round(float(n), 3): float(returns[noise == n].mean()) for n in np.unique(noise)}


def hindsight_run(shards: str, run: str, seed: int) -> float:
    """`hindsight train SHARDS RUN --condition return_to_go --seed S`; the wall seconds."""
    from jobs.commands.train import Train

    started = time.perf_counter()
    Train(input=shards, output=run, condition=["return_to_go"], seed=seed).run()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/rvs.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=300, help="Episodes to collect.")
    parser.add_argument("--eval-episodes", type=int, default=100, help="Per request and seed.")
    parser.add_argument("--work", default=None, help="Directory for data and runs (temp).")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from jobs.commands.demo import build_shards
    from trainers import ask
    from trainers.loader import read_index
    from trainers.train import load_run_config

    load_before = os.getloadavg()
    work = args.work or tempfile.mkdtemp(prefix="hs-bench-rvs-")
    paths = build_shards(
        ENV,
        os.path.join(work, "data"),
        episodes=args.episodes,
        noise=NOISE,
        relabelers=["returns"],
        conditions=["return_to_go"],
        window=20,
    )
    levels = level_returns(paths["raw"])
    noisiest, best = levels[max(levels)], levels[min(levels)]
    top = float(read_index(paths["shards"]).episode_return.max)
    requested = sorted(levels.values()) + [top]

    def normalized(value: float) -> float:
        return (value - noisiest) / (best - noisiest)

    steps = read_steps(paths["shards"])
    per_seed = []
    for seed in args.seeds:
        eval_seed = 1000 + seed
        started = time.perf_counter()
        act, rtg_range = rvs_reference(steps, seed)
        reference_seconds = time.perf_counter() - started
        run = os.path.join(work, "runs", f"hindsight-{seed}")
        hindsight_seconds = hindsight_run(paths["shards"], run, seed)
        row: dict[str, Any] = {
            "seed": seed,
            "train_seconds": {"reference": reference_seconds, "hindsight": hindsight_seconds},
            "reference": [],
            "hindsight": [],
        }
        for value in requested:
            returns = reference_rollout(act, rtg_range, value, args.eval_episodes, eval_seed)
            row["reference"].append(normalized(float(np.mean(returns))))
            asked = ask.ask(run, ENV, {"return_to_go": str(value)}, args.eval_episodes, [eval_seed])
            row["hindsight"].append(normalized(asked["achieved_mean"]))
        per_seed.append(row)
        print(json.dumps(row), flush=True)

    defaults = load_run_config(os.path.join(work, "runs", f"hindsight-{args.seeds[0]}"))
    learners = ("reference", "hindsight")
    sweep = {
        name: [interval([row[name][i] for row in per_seed]) for i in range(len(requested))]
        for name in learners
    }
    report = {
        "benchmark": "rvs",
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "device": "cpu",
        },
        "load_average_1min_before": load_before[0],
        "data": {
            "env": ENV,
            "episodes": args.episodes,
            "noise_levels": NOISE,
            "level_mean_return": {str(k): v for k, v in levels.items()},
            "top_return": top,
        },
        "requested_return_to_go": requested,
        "eval_episodes_per_request_and_seed": args.eval_episodes,
        "hindsight_defaults": {
            key: value
            for key, value in defaults.options.model_dump().items()
            if key not in ("input", "output", "condition", "seed")
        },
        "hindsight_model": {k: defaults.model[k] for k in ("kind", "window", "n_layer", "hidden")},
        "normalized_return_at_top": {name: sweep[name][-1] for name in learners},
        "difference_at_top": interval(
            [row["hindsight"][-1] - row["reference"][-1] for row in per_seed]
        ),
        "normalized_return_by_request": sweep,
        "train_seconds": {
            name: interval([row["train_seconds"][name] for row in per_seed]) for name in learners
        },
        "per_seed": per_seed,
        "load_average_1min_after": os.getloadavg()[0],
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    for name in learners:
        at_top = report["normalized_return_at_top"][name]
        print(
            f"{name:10} normalized return asked for the top ({top:.1f}): {at_top['mean']:.3f} "
            f"[{at_top['ci95'][0]:.3f}, {at_top['ci95'][1]:.3f}]; by request "
            + ", ".join(f"{r:.0f}: {s['mean']:.2f}" for r, s in zip(requested, sweep[name]))
        )
    return report


if __name__ == "__main__":
    main()
