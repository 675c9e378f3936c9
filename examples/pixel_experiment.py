"""The pixel experiment of issue 14: "just ask" from frames alone, measured.

    .venv/bin/python -m examples.pixel_experiment --out bench/results/pixel-experiment.json

Pendulum-v1 from rendered frames, where one frame hides the velocity (by default
`hindsight/PendulumNoArrow-v1`, whose frames leave out the arrow that shows the previous
action, see ENV_ID; `--env Pendulum-v1` keeps it): collect with the
heuristic policy at noise 0, 0.25, 0.5, 0.75, 1.0 and `--frames 32x32 --channels 1` (the
env's render, resized and made grayscale by the function `ask` uses too), relabel returns, shard with return_to_go and a
frame stack of 3, then for every seed train two MLP policies (single steps, the trainer's
defaults but fewer steps) that see the pixels alone (`--inputs frames --frame-encoder
nature`: the angular velocity can only come from the stack): behaviour cloning (condition
none) and return-to-go. Then ask, from frames rendered during the rollout:
  - BC, unconditioned;
  - return-to-go at the dataset's 10/50/90/95th-percentile returns ("high" = 95th, fixed
    in advance, not tuned).
Claims (as examples/experiment.py): ask high return > dataset mean, ask high return > BC,
achieved rises with requested (Spearman over the sweep), each a 95% t-interval of the
per-seed difference over seeds, holding when the interval is above zero. Every step runs
as a user would: the command classes of `hindsight collect / relabel / shard / train` and
`trainers.ask.ask` (what `hindsight ask` calls). The data set is collected once (seed 0);
the seeds vary the model initialization, the loader's shuffling and the evaluation episodes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from typing import Any

from examples.experiment import asking_claims, interval, spearman, trained_steps

# Pendulum-v1's frames also draw the previous step's torque as an arrow, which behaviour
# cloned from frames learns to copy (causal confusion: engine/envs.py HideTorqueArrow); the
# default env is the same task without the arrow, `--env Pendulum-v1` the env as gymnasium has it.
ENV_ID = "hindsight/PendulumNoArrow-v1"
NOISE = [0.0, 0.25, 0.5, 0.75, 1.0]


def build_pixel_shards(work: str, args: argparse.Namespace) -> dict[str, str]:
    """collect --frames -> relabel returns -> shard --frame-stack; skipped when the shards
    are already in `work` (a rerun with other training settings reuses the data)."""
    from jobs.commands.collect import Collect
    from jobs.commands.relabel import Relabel
    from jobs.commands.shard import Shard

    raw, relabeled, shards = (os.path.join(work, name) for name in ("raw", "relabeled", "shards"))
    if os.path.exists(os.path.join(shards, "index.json")):
        return {"raw": raw, "relabeled": relabeled, "shards": shards}
    if not os.path.exists(os.path.join(raw, "manifest.json")):
        Collect(
            env=args.env,
            output=raw,
            episodes=args.episodes,
            noise=NOISE,
            seed=0,
            episodes_per_part=max(10, args.episodes // 4),
            frames=args.size,
            channels=args.channels,
            max_steps=args.max_steps,
        ).run()
    Relabel(input=raw, output=relabeled, relabelers=["returns"], seed=0).run()
    Shard(
        input=relabeled,
        output=shards,
        condition=["return_to_go"],
        window=10,
        frame_stack=args.frame_stack,
        seed=0,
    ).run()
    return {"raw": raw, "relabeled": relabeled, "shards": shards}


def train_pixel_policy(shards: str, run: str, condition: list[str], seed: int, args) -> float:
    """One pixel policy, trained the same way for every arm; returns the seconds it took."""
    from jobs.commands.demo import train_run

    started = time.perf_counter()
    # A finished run has a checkpoint of the last step. A run stopped on its way (no
    # checkpoint, or one `train` saved when it was stopped) is trained again from the start.
    done = trained_steps(run)
    if done is None or done < args.steps:
        shutil.rmtree(run, ignore_errors=True)
        train_run(
            shards,
            run,
            condition,
            model="mlp",
            inputs="frames",
            frame_encoder="nature",
            steps=args.steps,
            seed=seed,
            augment_shift=args.augment_shift,
            log_every=max(10, args.steps // 10),
            checkpoint_every=args.steps,
        )
    return time.perf_counter() - started


def run_experiment(work: str, args: argparse.Namespace) -> dict[str, Any]:
    from jobs.commands.demo import dataset_return, high_return
    from trainers import ask

    started = time.perf_counter()
    paths = build_pixel_shards(work, args)
    data_seconds = time.perf_counter() - started
    returns = dataset_return(paths["shards"])
    quantiles = returns.get("quantiles") or {}
    mean = float(returns["mean"])
    high = high_return(returns)
    requested = [float(quantiles[q]) for q in ("0.1", "0.5", "0.9") if q in quantiles] + [high]
    per_seed: list[dict[str, Any]] = []
    for seed in args.seeds:
        runs = {name: os.path.join(work, "runs", f"{name}-{seed}") for name in ("bc", "rtg")}
        train_seconds = {
            "bc": train_pixel_policy(paths["shards"], runs["bc"], [], seed, args),
            "rtg": train_pixel_policy(paths["shards"], runs["rtg"], ["return_to_go"], seed, args),
        }
        eval_seeds = [1000 + seed]
        asked = time.perf_counter()
        bc = ask.ask(runs["bc"], args.env, {}, args.episodes_eval, eval_seeds)
        sweep = [
            ask.ask(runs["rtg"], args.env, {"return_to_go": str(v)}, args.episodes_eval, eval_seeds)
            for v in requested
        ]
        achieved = [s["achieved_mean"] for s in sweep]
        per_seed.append(
            {
                "seed": seed,
                "bc": bc["achieved_mean"],
                "sweep": achieved,
                "high": achieved[-1],
                "sweep_spearman": spearman(requested, achieved),
                "train_seconds": train_seconds,
                "ask_seconds": time.perf_counter() - asked,
            }
        )
        print(f"{args.env} pixels seed {seed}: {json.dumps(per_seed[-1])}", flush=True)
        with open(os.path.join(work, "per_seed.json"), "w") as handle:  # a long run's progress
            json.dump({"requested": requested, "dataset_mean": mean, "per_seed": per_seed}, handle)

    column = {key: [row[key] for row in per_seed] for key in ("bc", "high", "sweep_spearman")}
    high_interval, bc_interval = interval(column["high"]), interval(column["bc"])
    return {
        "env": args.env,
        "inputs": "frames (no state vector)",
        "dataset_return": returns,
        "requested_return_to_go": requested,
        "achieved": {
            "bc": bc_interval,
            "ask_high_return": high_interval,
            "sweep": [
                interval([row["sweep"][i] for row in per_seed]) for i in range(len(requested))
            ],
            "sweep_spearman": interval(column["sweep_spearman"]),
        },
        "claims": asking_claims(column, mean, high),
        # The wording: the high-return interval wholly above the other's (unpaired).
        "intervals_apart": {
            "ask high return above behaviour cloning": high_interval["ci95"][0]
            > bc_interval["ci95"][1],
            "ask high return above dataset mean": high_interval["ci95"][0] > mean,
        },
        "per_seed": per_seed,
        "data_seconds": data_seconds,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/pixel-experiment.json")
    parser.add_argument("--work", default=None, help="Directory for data and runs (default: temp).")
    parser.add_argument(
        "--env", default=ENV_ID, help="hindsight/PendulumNoArrow-v1 or Pendulum-v1."
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=120, help="Episodes to collect.")
    parser.add_argument("--max-steps", type=int, default=None, help="Collected episode length.")
    parser.add_argument("--size", default="32x32", help="Frame size HxW.")
    parser.add_argument("--channels", type=int, default=1, help="1 (grayscale) or 3 (RGB).")
    parser.add_argument("--frame-stack", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000, help="Training steps per policy.")
    parser.add_argument("--episodes-eval", type=int, default=10, help="Episodes per asked value.")
    parser.add_argument(
        "--augment-shift", type=int, default=0, help="train --augment-shift (DrQ), pixels."
    )
    args = parser.parse_args(argv)

    import tempfile

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from jobs.runtime import init_ray

    init_ray()
    work = args.work or tempfile.mkdtemp(prefix="hs-pixel-experiment-")
    load_before = os.getloadavg()
    result = run_experiment(work, args)
    report = {
        "experiment": "ask for a high return from pixels alone (issue 14)",
        "size": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
        "policy": "mlp on single steps, trainer defaults (batch 256), --inputs frames, "
        f"--frame-encoder nature, --augment-shift {args.augment_shift}",
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "load_1min_before_after": [load_before[0], os.getloadavg()[0]],
        },
        "results": [result],
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    for item in result["claims"]:
        d = item["difference"]
        print(
            f"{item['claim']:46} {'HOLDS' if item['holds'] else 'does not hold':14}"
            f" diff {d['mean']:9.2f} [{d['ci95'][0]:.2f}, {d['ci95'][1]:.2f}]"
        )
    for name, apart in result["intervals_apart"].items():
        print(f"95% intervals: {name:40} {'apart' if apart else 'overlap'}")
    return report


if __name__ == "__main__":
    main()
