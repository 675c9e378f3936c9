"""`hindsight demo`: the whole idea end to end, on the embedded defaults.

    collect   Pendulum-v1 with the heuristic policy at noise 0, 0.25, 0.5, 0.75, 1.0
    relabel   returns (return_to_go), skill (4 levels from returns), language (offline describer)
    shard     windows with return_to_go, skill and description
    train     behaviour cloning (condition none), return_to_go, skill
    ask       the BC policy; a high return and a sweep over the dataset's return range;
              "novice" vs "expert"
and prints one table: what asking buys over the data and over behaviour cloning.
`--small` is the reduced size the CI test runs (well under two minutes). The pipeline
functions here (`build_shards`, `train_run`) are what examples/experiment.py reuses.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Literal

from pydantic import Field

from jobs.command import RayCommand

DEMO_MARKER = ".hindsight-demo"
NOISE_LEVELS = [0.0, 0.25, 0.5, 0.75, 1.0]


class Demo(RayCommand):
    """Collect, relabel, shard, train and ask on Pendulum-v1, end to end, and print what
    asking buys over the data and over behaviour cloning.

        hindsight demo                  # about a minute on 2 CPU cores
        hindsight demo --small          # the reduced size CI runs
    """

    name = "demo"

    output: str = Field(default="demo-output", description="Directory for every artifact.")
    small: bool = Field(default=False, description="Reduced size (CI): fewer episodes and steps.")
    env: str = Field(default="Pendulum-v1", description="Environment to collect and ask in.")
    episodes: int | None = Field(default=None, description="Episodes to collect (default by size).")
    steps: int | None = Field(default=None, description="Training steps per run (default by size).")
    eval_episodes: int | None = Field(default=None, description="Episodes per asked value.")
    model: Literal["mlp", "transformer"] = Field(default="mlp", description="Policy architecture.")
    seed: int = Field(default=0, description="Seed of collection, shards and training.")

    def run(self) -> dict[str, Any]:
        return run_demo(self)

    def report(self, summary: dict[str, Any], seconds: float) -> str:
        return format_table(summary)


def _sizes(options: Demo) -> dict[str, int]:
    # Full size trains with the trainer's defaults (trainers/options.py: MODEL_DEFAULTS).
    small = {"episodes": 50, "steps": 300, "eval_episodes": 4, "batch_size": 64}
    full = {"episodes": 300, "steps": 5000, "eval_episodes": 20, "batch_size": None}
    sizes = dict(small if options.small else full)
    for key in ("episodes", "steps", "eval_episodes"):
        if getattr(options, key) is not None:
            sizes[key] = int(getattr(options, key))
    return sizes


def _fresh_output(out: str) -> None:
    # Re-running the demo replaces its own previous output, and nothing else.
    if os.path.exists(out) and os.listdir(out):
        if not os.path.exists(os.path.join(out, DEMO_MARKER)):
            raise ValueError(f"{out} exists and is not a demo output; choose another --output")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, DEMO_MARKER), "w").close()


def build_shards(
    env_id: str,
    out: str,
    *,
    episodes: int,
    noise: list[float],
    relabelers: list[str],
    conditions: list[str],
    window: int,
    seed: int = 0,
    shard_steps: int = 20_000,
    address: str | None = None,
) -> dict[str, str]:
    """collect -> relabel -> shard; returns the paths of the three artifacts."""
    from jobs.commands.collect import Collect
    from jobs.commands.relabel import Relabel
    from jobs.commands.shard import Shard

    raw, relabeled, shards = (os.path.join(out, name) for name in ("raw", "relabeled", "shards"))
    Collect(
        env=env_id,
        output=raw,
        episodes=episodes,
        noise=noise,
        seed=seed,
        episodes_per_part=max(10, episodes // 4),
        address=address,
    ).run()
    Relabel(input=raw, output=relabeled, relabelers=relabelers, seed=seed, address=address).run()
    Shard(
        input=relabeled,
        output=shards,
        condition=conditions,
        window=window,
        # Several shards even for the small demo, so `--workers 2` has one per rank.
        shard_steps=shard_steps,
        seed=seed,
        address=address,
    ).run()
    return {"raw": raw, "relabeled": relabeled, "shards": shards}


def train_run(shards: str, run_dir: str, condition: list[str], **options: Any) -> dict[str, Any]:
    from jobs.commands.train import Train

    print(f"train {os.path.basename(run_dir)}: {', '.join(condition) or 'behaviour cloning'}")
    return Train(input=shards, output=run_dir, condition=condition, **options).run()


def dataset_return(shards: str) -> dict[str, Any]:
    from trainers.loader import read_index

    return read_index(shards).episode_return.model_dump()


def high_return(returns: dict[str, Any]) -> float:
    """What 'asking for a high return' means here: the dataset's 95th-percentile return
    (fixed before looking at any result; the best episodes' return is luck of the start)."""
    quantiles = returns.get("quantiles") or {}
    return float(quantiles.get("0.95", returns["max"]))


def run_demo(options: Demo) -> dict[str, Any]:
    """Run the pipeline; returns the table rows and the report paths."""
    from trainers import ask

    started = time.perf_counter()
    sizes = _sizes(options)
    out = options.output
    _fresh_output(out)

    paths = build_shards(
        options.env,
        out,
        episodes=sizes["episodes"],
        noise=NOISE_LEVELS,
        relabelers=["returns", "skill:levels=4", "language"],
        conditions=["return_to_go", "skill", "description"],
        window=10,
        seed=options.seed,
        address=options.address,
    )
    returns = dataset_return(paths["shards"])
    common = {
        "model": options.model,
        "steps": sizes["steps"],
        "batch_size": sizes["batch_size"],
        "seed": options.seed,
        "log_every": max(10, sizes["steps"] // 20),
        "checkpoint_every": sizes["steps"],
    }
    runs = {name: os.path.join(out, "runs", name) for name in ("bc", "return_to_go", "skill")}
    for name, condition in (("bc", []), ("return_to_go", ["return_to_go"]), ("skill", ["skill"])):
        train_run(paths["shards"], runs[name], condition, **common)

    episodes, seeds = sizes["eval_episodes"], [options.seed]
    reports = os.path.join(out, "reports")
    bc = ask.ask(runs["bc"], options.env, {}, episodes, seeds)
    high = high_return(returns)
    quantiles = returns.get("quantiles") or {}
    sweep_values = sorted(
        {round(float(quantiles.get(q, returns["min"])), 1) for q in ("0.1", "0.5", "0.9")}
        | {round(high, 1)}
    )
    rtg_sweep = ask.sweep(
        runs["return_to_go"],
        options.env,
        "return_to_go",
        [str(v) for v in sweep_values],
        episodes,
        seeds,
        os.path.join(reports, "return_to_go"),
    )
    asked_high = next(r for r in rtg_sweep["results"] if r["requested"] == round(high, 1))
    skill_sweep = ask.sweep(
        runs["skill"],
        options.env,
        "skill",
        ["novice", "expert"],
        episodes,
        seeds,
        os.path.join(reports, "skill"),
    )
    novice, expert = skill_sweep["results"]

    rows = [
        ("dataset mean return", returns["mean"], None, None),
        ("behaviour cloning (condition none)", bc["achieved_mean"], bc["achieved_ci95"], bc["episodes"]),
        (f"ask return_to_go={high:.0f}", asked_high["achieved_mean"], asked_high["achieved_ci95"], asked_high["episodes"]),
        ('ask skill="novice"', novice["achieved_mean"], novice["achieved_ci95"], novice["episodes"]),
        ('ask skill="expert"', expert["achieved_mean"], expert["achieved_ci95"], expert["episodes"]),
    ]  # fmt: skip
    summary = {
        "env": options.env,
        "sizes": sizes,
        "model": options.model,
        "rows": [
            {"what": what, "return_mean": mean, "ci95": ci, "episodes": n}
            for what, mean, ci, n in rows
        ],
        "return_to_go_sweep": rtg_sweep["results"],
        "paths": {
            **paths,
            **{f"run_{name}": path for name, path in runs.items()},
            "return_to_go_report": os.path.join(reports, "return_to_go", "ask.json"),
            "return_to_go_plot": os.path.join(reports, "return_to_go", "ask.png"),
            "skill_report": os.path.join(reports, "skill", "ask.json"),
            "skill_plot": os.path.join(reports, "skill", "ask.png"),
        },
        "elapsed_s": time.perf_counter() - started,
    }
    with open(os.path.join(out, "demo.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    summary["paths"]["summary"] = os.path.join(out, "demo.json")
    return summary


def format_table(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['env']}: {summary['sizes']['episodes']} episodes at noise {NOISE_LEVELS}, "
        f"{summary['model']} policies, {summary['sizes']['steps']} steps each",
        f"{'':38} {'return':>9}   95% CI              episodes",
    ]
    for row in summary["rows"]:
        ci = row["ci95"]
        interval = f"[{ci[0]:8.1f}, {ci[1]:8.1f}]" if ci else " " * 20
        episodes = str(row["episodes"]) if row["episodes"] else ""
        lines.append(f"{row['what']:38} {row['return_mean']:9.1f}   {interval}  {episodes:>6}")
    lines.append("return_to_go sweep (requested -> achieved):")
    for row in summary["return_to_go_sweep"]:
        lines.append(f"    {row['requested']:9.1f} -> {row['achieved_mean']:9.1f}")
    lines.append("reports:")
    lines += [f"    {name:22} {path}" for name, path in summary["paths"].items()]
    lines.append(f"done in {summary['elapsed_s']:.0f} s")
    return "\n".join(lines)
