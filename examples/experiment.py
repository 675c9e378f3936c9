"""The experiment of issue 7: does "just ask" work? Measured, not assumed.

    .venv/bin/python -m examples.experiment --out bench/results/experiment.json [--seeds 0 1 2]

For Pendulum-v1 (continuous actions) and CartPole-v1 (discrete): collect mixed-quality
data with the heuristic policy at noise 0, 0.25, 0.5, 0.75, 1.0, relabel returns and skill
(4 levels from returns), shard, and for every seed train three policies on the same data:
behaviour cloning (condition none), return-to-go, skill. Then ask:
  - BC, unconditioned;
  - return-to-go at the dataset's 10/50/90/95th-percentile returns ("high" = 95th, fixed
    in advance, not tuned);
  - skill "novice" vs "expert".
For hindsight/PointGoal-v0: undirected data (uniformly random actions), relabeled with
hindsight goals (strategy future, k=4); a policy conditioned on hindsight_goal vs BC,
both asked to reach the environment's own commanded goal; achieved = success rate.

Every claim is checked over seeds: the per-seed means give a mean and a t-interval
(95%, n-1 degrees of freedom). A claim holds when the interval of the difference is above
zero. The data set is collected once per environment (seed 0); the seeds vary the model
initialization, the loader's shuffling and the evaluation episodes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any

import numpy as np

# Two-sided 95% Student t critical values by degrees of freedom.
T95 = {  # two-sided 95% quantiles of Student's t by degrees of freedom (1.96 past 30)
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
    10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
    18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
    26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042,
}  # fmt: skip


def trained_steps(run: str) -> int | None:
    """The step of a run's checkpoint (a run of an earlier invocation in --work), or None."""
    path = os.path.join(run, "checkpoint.pt")
    if not os.path.exists(path):
        return None
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


def interval(values: list[float]) -> dict[str, Any]:
    """Mean over seeds with a 95% t-interval."""
    array = np.asarray(values, dtype=float)
    mean = float(array.mean())
    if len(array) < 2:
        return {"mean": mean, "ci95": [mean, mean], "per_seed": array.tolist()}
    half = T95.get(len(array) - 1, 1.96) * float(array.std(ddof=1)) / math.sqrt(len(array))
    return {"mean": mean, "ci95": [mean - half, mean + half], "per_seed": array.tolist()}


def claim(name: str, differences: list[float], detail: str) -> dict[str, Any]:
    stats = interval(differences)
    return {
        "claim": name,
        "holds": stats["ci95"][0] > 0,
        "difference": stats,
        "detail": detail,
    }


def asking_claims(column: dict[str, list[float]], mean: float, high: float) -> list[dict[str, Any]]:
    """The return-to-go claims, from per-seed columns `high`, `bc` and `sweep_spearman`:
    asking a high return beats the dataset mean and behaviour cloning, and achieved return
    rises with requested return (the last of the three)."""
    return [
        claim(
            "ask high return > dataset mean",
            [h - mean for h in column["high"]],
            f"requested return_to_go={high:.1f} (dataset 95th percentile)",
        ),
        claim(
            "ask high return > behaviour cloning",
            [h - b for h, b in zip(column["high"], column["bc"])],
            "same data, same seeds",
        ),
        claim(
            "achieved return rises with requested return",
            column["sweep_spearman"],
            "Spearman rank correlation of achieved vs requested over the 10/50/90/95th percentiles",
        ),
    ]  # fmt: skip


def spearman(x: list[float], y: list[float]) -> float:
    rank_x = np.argsort(np.argsort(x)).astype(float)
    rank_y = np.argsort(np.argsort(y)).astype(float)
    if rank_x.std() == 0 or rank_y.std() == 0:
        return 0.0
    return float(np.corrcoef(rank_x, rank_y)[0, 1])


def train_policy(shards: str, run: str, condition: list[str], seed: int, args) -> None:
    """One policy, trained the same way for every arm of the experiment."""
    from jobs.commands.demo import train_run

    train_run(
        shards,
        run,
        condition,
        model=args.model,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=1e-3,
        seed=seed,
        log_every=max(10, args.steps // 10),
        checkpoint_every=args.steps,
    )


def return_experiment(env_id: str, work: str, args: argparse.Namespace) -> dict[str, Any]:
    from jobs.commands.demo import build_shards, dataset_return, high_return
    from trainers import ask

    started = time.perf_counter()
    paths = build_shards(
        env_id,
        os.path.join(work, env_id),
        episodes=args.episodes,
        noise=[0.0, 0.25, 0.5, 0.75, 1.0],
        relabelers=["returns", "skill:levels=4"],
        conditions=["return_to_go", "skill"],
        window=10,
    )
    returns = dataset_return(paths["shards"])
    quantiles = returns.get("quantiles") or {}
    high = high_return(returns)
    requested = [float(quantiles[q]) for q in ("0.1", "0.5", "0.9") if q in quantiles] + [high]
    per_seed: list[dict[str, Any]] = []
    for seed in args.seeds:
        runs = {}
        for name, condition in (
            ("bc", []),
            ("return_to_go", ["return_to_go"]),
            ("skill", ["skill"]),
        ):
            runs[name] = os.path.join(work, env_id, "runs", f"{name}-{seed}")
            train_policy(paths["shards"], runs[name], condition, seed, args)
        eval_seeds = [1000 + seed]
        bc = ask.ask(runs["bc"], env_id, {}, args.episodes_eval, eval_seeds)
        sweep = [
            ask.ask(
                runs["return_to_go"],
                env_id,
                {"return_to_go": str(v)},
                args.episodes_eval,
                eval_seeds,
            )
            for v in requested
        ]
        skills = {
            label: ask.ask(runs["skill"], env_id, {"skill": label}, args.episodes_eval, eval_seeds)
            for label in ("novice", "expert")
        }
        per_seed.append(
            {
                "seed": seed,
                "bc": bc["achieved_mean"],
                "sweep": [s["achieved_mean"] for s in sweep],
                "high": sweep[-1]["achieved_mean"],
                "novice": skills["novice"]["achieved_mean"],
                "expert": skills["expert"]["achieved_mean"],
                "sweep_spearman": spearman(requested, [s["achieved_mean"] for s in sweep]),
            }
        )
        print(f"{env_id} seed {seed}: {json.dumps(per_seed[-1])}", flush=True)

    mean = returns["mean"]
    column = {
        key: [row[key] for row in per_seed]
        for key in ("bc", "high", "novice", "expert", "sweep_spearman")
    }
    asking = asking_claims(column, mean, high)
    return {
        "env": env_id,
        "dataset_return": returns,
        "requested_return_to_go": requested,
        "achieved": {
            "bc": interval(column["bc"]),
            "ask_high_return": interval(column["high"]),
            "ask_novice": interval(column["novice"]),
            "ask_expert": interval(column["expert"]),
            "sweep": [
                interval([row["sweep"][i] for row in per_seed]) for i in range(len(requested))
            ],
            "sweep_spearman": interval(column["sweep_spearman"]),
        },
        "claims": [
            *asking[:2],
            claim(
                'ask "expert" > ask "novice"',
                [e - n for e, n in zip(column["expert"], column["novice"])],
                "skill from return quartiles",
            ),
            asking[2],
        ],
        "per_seed": per_seed,
        "seconds": time.perf_counter() - started,
    }


def goal_experiment(work: str, args: argparse.Namespace) -> dict[str, Any]:
    from jobs.commands.demo import build_shards
    from trainers import ask

    env_id = "hindsight/PointGoal-v0"
    started = time.perf_counter()
    paths = build_shards(
        env_id,
        os.path.join(work, "pointgoal"),
        episodes=args.goal_episodes,
        noise=[1.0],  # undirected: every action uniformly random
        relabelers=["goals:strategy=future,k=4,achieved=observation.achieved_goal,threshold=0.1"],
        conditions=["hindsight_goal"],
        window=10,
    )
    per_seed = []
    for seed in args.seeds:
        runs = {}
        for name, condition in (("bc", []), ("hindsight_goal", ["hindsight_goal"])):
            runs[name] = os.path.join(work, "pointgoal", "runs", f"{name}-{seed}")
            train_policy(paths["shards"], runs[name], condition, seed, args)
        eval_seeds = [1000 + seed]
        bc = ask.ask(runs["bc"], env_id, {}, args.episodes_eval, eval_seeds)
        goal = ask.ask(runs["hindsight_goal"], env_id, {}, args.episodes_eval, eval_seeds)
        per_seed.append(
            {"seed": seed, "bc": bc["success_mean"], "hindsight_goal": goal["success_mean"]}
        )
        print(f"{env_id} seed {seed}: {json.dumps(per_seed[-1])}", flush=True)
    bc = [row["bc"] for row in per_seed]
    goal = [row["hindsight_goal"] for row in per_seed]
    return {
        "env": env_id,
        "metric": "success rate (within 0.1 of the commanded goal at the last step)",
        "achieved": {"bc": interval(bc), "hindsight_goal": interval(goal)},
        "claims": [
            claim(
                "hindsight-goal policy reaches commanded goals more often than BC",
                [g - b for g, b in zip(goal, bc)],
                "data: uniformly random actions",
            ),
        ],  # fmt: skip
        "per_seed": per_seed,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/experiment.json")
    parser.add_argument("--work", default=None, help="Directory for data and runs (default: temp).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=300, help="Episodes per return env.")
    parser.add_argument("--goal-episodes", type=int, default=400, help="PointGoal episodes.")
    parser.add_argument("--steps", type=int, default=3000, help="Training steps per policy.")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--episodes-eval", type=int, default=20, help="Episodes per asked value.")
    parser.add_argument("--model", default="mlp", choices=["mlp", "transformer"])
    parser.add_argument("--envs", nargs="+", default=["Pendulum-v1", "CartPole-v1", "PointGoal"])
    args = parser.parse_args(argv)

    import tempfile

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from jobs.runtime import init_ray

    init_ray()
    work = args.work or tempfile.mkdtemp(prefix="hs-experiment-")
    started = time.perf_counter()
    results = []
    report: dict[str, Any] = {}
    for env_id in args.envs:
        try:
            if env_id == "PointGoal":
                results.append(goal_experiment(work, args))
            else:
                results.append(return_experiment(env_id, work, args))
        except Exception as error:  # one environment failing must not lose the others
            results.append(
                {"env": env_id, "error": f"{type(error).__name__}: {error}", "claims": []}
            )
        report = {
            "experiment": "ask for generalization (issue 7)",
            "size": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
            "results": results,
            "seconds": time.perf_counter() - started,
        }
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=2)
    for result in results:
        for item in result["claims"]:
            d = item["difference"]
            print(
                f"{result['env']:24} {item['claim']:50} {'HOLDS' if item['holds'] else 'does not hold':14}"
                f" diff {d['mean']:9.2f} [{d['ci95'][0]:.2f}, {d['ci95'][1]:.2f}]"
            )
    return report


if __name__ == "__main__":
    main()
