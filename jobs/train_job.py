"""`hindsight train` and `hindsight ask`: train a conditional policy on shards, then ask it.

hindsight train SHARDS RUN_DIR --condition return_to_go --model transformer --steps 20000
hindsight ask RUN_DIR --env Pendulum-v1 --condition return_to_go=-150 --episodes 20
hindsight ask RUN_DIR --env Pendulum-v1 --sweep return_to_go=-1000,-600,-300,-150 --out reports/pend
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine import storage


class TrainOptions(BaseModel):
    """Options of `hindsight train`."""

    model_config = ConfigDict(extra="forbid")

    shards: str = Field(description="Shard directory (local or s3://) with an index.json.")
    run_dir: str = Field(description="Local directory for config, checkpoint and metrics.")
    condition: list[str] = Field(
        default_factory=list,
        description="Conditioning columns of the shard index; empty (`none`) = behaviour cloning.",
    )
    model: Literal["transformer", "mlp"] = Field(
        default="transformer", description="Causal transformer over the window, or an MLP."
    )
    steps: int = Field(default=2000, ge=1, description="Optimizer steps (one batch each).")
    seed: int = Field(default=0, description="Seed of model initialization and shuffling.")
    batch_size: int = Field(default=64, ge=1, description="Windows per batch (per worker).")
    lr: float = Field(default=3e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(default=1e-4, ge=0, description="AdamW weight decay.")
    warmup: int = Field(
        default=100, ge=0, description="Linear warmup steps (capped at 10 percent of the steps)."
    )
    grad_clip: float = Field(default=1.0, gt=0, description="Gradient norm clipping.")
    d_model: int = Field(default=128, ge=8, description="Width of embeddings and tokens.")
    n_layer: int = Field(default=3, ge=1, description="Transformer blocks.")
    n_head: int = Field(default=4, ge=1, description="Attention heads.")
    hidden: int = Field(default=256, ge=8, description="MLP hidden width.")
    shuffle_buffer: int = Field(default=65536, ge=1, description="Loader shuffle buffer (windows).")
    log_every: int = Field(default=50, ge=1, description="Steps between metrics lines.")
    checkpoint_every: int = Field(default=500, ge=1, description="Steps between checkpoints.")
    workers: int = Field(default=1, ge=1, description="Data-parallel Ray Train workers.")
    address: str | None = Field(default=None, description="Ray cluster address; embedded if unset.")
    device: str | None = Field(default=None, description="cpu or cuda; CUDA when present.")
    resume: bool = Field(default=False, description="Continue the run in RUN_DIR.")


def run_train(options: TrainOptions) -> dict[str, Any]:
    """Train (or resume) a run; returns a summary with steps, loss and samples/s."""
    from trainers import train
    from trainers.data import read_index

    condition = [c for c in options.condition if c and c != "none"]
    options = options.model_copy(update={"condition": condition})
    if storage.is_s3(options.run_dir):
        raise ValueError("RUN_DIR must be a local directory (checkpoints and metrics live there)")
    has_checkpoint = os.path.exists(os.path.join(options.run_dir, train.CHECKPOINT))
    config_path = os.path.join(options.run_dir, train.CONFIG)
    if has_checkpoint and not options.resume:
        raise ValueError(
            f"{options.run_dir} already holds a trained run; pass --resume to continue it "
            "or choose a new RUN_DIR"
        )
    if has_checkpoint:
        config = train.load_checkpoint(options.run_dir)["config"]
        previous = config["options"]
        for key in ("shards", "condition", "model", "d_model", "n_layer", "n_head", "hidden"):
            if previous[key] != options.model_dump()[key]:
                raise ValueError(
                    f"--resume: {key} was {previous[key]!r} in {options.run_dir}, "
                    f"now {options.model_dump()[key]!r}; a resumed run must match"
                )
        # Only the length, logging and placement may change on resume.
        for key in ("steps", "log_every", "checkpoint_every", "workers", "address", "device"):
            previous[key] = options.model_dump()[key]
    else:
        index = read_index(options.shards).model_dump(mode="json")
        config = train.new_run_config(index, options.model_dump())
    os.makedirs(options.run_dir, exist_ok=True)  # only once the shards and options check out
    with open(config_path, "w") as handle:
        json.dump(config, handle, indent=2)
    if options.workers > 1 or options.address:
        return train.train_with_ray(config, options.workers, options.address)
    return train.train_loop(config, train.default_stream_factory(config))


class AskOptions(BaseModel):
    """Options of `hindsight ask`."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field(description="A run directory written by `hindsight train`.")
    env: str = Field(description="Gymnasium environment id (e.g. Pendulum-v1).")
    condition: dict[str, str] = Field(
        default_factory=dict, description="Requested value per column (col=value)."
    )
    sweep: tuple[str, list[str]] | None = Field(
        default=None, description="One column and the values to ask for in turn."
    )
    episodes: int = Field(default=10, ge=1, description="Episodes per seed and value.")
    seeds: list[int] = Field(default_factory=lambda: [0], description="Environment seeds.")
    out: str | None = Field(default=None, description="Directory for ask.json and ask.png.")
    device: str = Field(default="cpu", description="Device for the rollout.")


def run_ask(options: AskOptions) -> dict[str, Any]:
    """One condition (printed) or a sweep (ask.json + ask.png under --out)."""
    from trainers import ask

    if options.sweep:
        column, values = options.sweep
        out = options.out or os.path.join(options.run_dir, f"ask-{column}")
        return ask.sweep(
            options.run_dir,
            options.env,
            column,
            values,
            options.episodes,
            options.seeds,
            out,
            options.device,
        )
    result = ask.ask(
        options.run_dir,
        options.env,
        options.condition,
        options.episodes,
        options.seeds,
        options.device,
    )
    result = {"env": options.env, "condition": options.condition, **result}
    if options.out:
        os.makedirs(options.out, exist_ok=True)
        with open(os.path.join(options.out, "ask.json"), "w") as handle:
            json.dump(result, handle, indent=2)
    return result


def _parse_pairs(pairs: list[str]) -> dict[str, str]:
    parsed = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--condition takes COLUMN=VALUE, got {pair!r}")
        column, value = pair.split("=", 1)
        parsed[column.strip()] = value.strip()
    return parsed


def _train_handler(args) -> int:
    condition = [c for part in args.condition for c in part.split(",") if c]
    values = {k: v for k, v in vars(args).items() if k in TrainOptions.model_fields}
    summary = run_train(TrainOptions(**{**values, "condition": condition}))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    line = ", ".join(
        f"{key} {value:,.4g}" if isinstance(value, float) else f"{key} {value}"
        for key, value in summary.items()
        if isinstance(value, (int, float, str)) and not isinstance(value, bool)
    )
    print(f"trained: {line}")
    return 0


def _ask_handler(args) -> int:
    sweep = None
    if args.sweep:
        column, _, values = args.sweep.partition("=")
        if not values:
            raise ValueError(f"--sweep takes COLUMN=V1,V2,..., got {args.sweep!r}")
        sweep = (column.strip(), [v.strip() for v in values.split(",") if v.strip()])
    result = run_ask(
        AskOptions(
            run_dir=args.run_dir,
            env=args.env,
            condition=_parse_pairs(args.condition),
            sweep=sweep,
            episodes=args.episodes,
            seeds=args.seeds,
            out=args.out,
            device=args.device,
        )
    )
    if sweep:
        print(f"{'requested':>12} {'achieved':>10}  95% CI")
        for row in result["results"]:
            low, high = row["achieved_ci95"]
            print(
                f"{row['requested']!s:>12} {row['achieved_mean']:>10.2f}  [{low:.2f}, {high:.2f}]"
            )
        out = args.out or os.path.join(args.run_dir, f"ask-{sweep[0]}")
        print(f"wrote {os.path.join(out, 'ask.json')} and {os.path.join(out, 'ask.png')}")
    else:
        print(json.dumps(result, indent=2))
    return 0


def add_commands(subparsers) -> None:
    fields = TrainOptions.model_fields
    train = subparsers.add_parser("train", help="train a conditional policy on shards")
    train.add_argument("shards", help=fields["shards"].description)
    train.add_argument("run_dir", help=fields["run_dir"].description)
    train.add_argument("--json", action="store_true", help="print the summary as JSON")
    train.add_argument(
        "--condition",
        action="append",
        default=[],
        help="Conditioning column(s), repeat or comma-separate; 'none' = behaviour cloning.",
    )
    train.add_argument("--model", choices=["transformer", "mlp"], default="transformer")
    for name in (
        "steps",
        "seed",
        "batch_size",
        "lr",
        "weight_decay",
        "warmup",
        "grad_clip",
        "d_model",
        "n_layer",
        "n_head",
        "hidden",
        "shuffle_buffer",
        "log_every",
        "checkpoint_every",
        "workers",
    ):
        field = fields[name]
        train.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=type(field.default),
            default=field.default,
            help=field.description,
        )
    train.add_argument("--address", default=None, help=fields["address"].description)
    train.add_argument("--device", default=None, help=fields["device"].description)
    train.add_argument("--resume", action="store_true", help=fields["resume"].description)
    train.set_defaults(handler=_train_handler)

    ask_fields = AskOptions.model_fields
    ask = subparsers.add_parser("ask", help="roll out a trained policy conditioned on a value")
    ask.add_argument("run_dir", help=ask_fields["run_dir"].description)
    ask.add_argument("--env", required=True, help=ask_fields["env"].description)
    group = ask.add_mutually_exclusive_group()
    group.add_argument(
        "--condition", action="append", default=[], help="COLUMN=VALUE (repeat for several)."
    )
    group.add_argument("--sweep", default=None, help="COLUMN=V1,V2,...: one rollout set per value.")
    ask.add_argument("--episodes", type=int, default=10, help=ask_fields["episodes"].description)
    ask.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help=ask_fields["seeds"].description
    )
    ask.add_argument("--out", default=None, help=ask_fields["out"].description)
    ask.add_argument("--device", default="cpu", help=ask_fields["device"].description)
    ask.set_defaults(handler=_ask_handler)
