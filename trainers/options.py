"""What a training run is asked to do: `TrainOptions`, one typed model, field by field.

The trainer (trainers/train.py) reads these fields and nothing else; a command adds only
where and how the run is launched (a Ray address, workers, `--resume`) by subclassing it, so
the command line, its help, a YAML spec and the recorded run all say the same thing.

A run records its options in `config.json` and in `checkpoint.pt` as plain JSON data
(`RunConfig.to_record`); `RunConfig.from_record` reads those back, including runs written
before the options moved here (fields `shards`/`run_dir`, command-level fields inside).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TrainOptions(BaseModel):
    """Every setting of the training loop."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="Shard directory (local or s3://) with an index.json.")
    output: str = Field(description="Run directory (local): config, checkpoint and metrics.")
    condition: list[str] = Field(
        default_factory=list,
        description="Conditioning columns of the shard index; none = behaviour cloning.",
    )
    model: Literal["mlp", "transformer"] = Field(
        default="mlp",
        description="An MLP on single steps (RvS), or a causal transformer over the window "
        "(Decision Transformer).",
    )
    window: int | None = Field(
        default=None,
        ge=1,
        description="Steps per training window, at most the shards' window; default: 1 for "
        "the MLP (it trains on single steps), the shards' window for the transformer.",
    )
    steps: int = Field(default=5000, ge=1, description="Optimizer steps (one batch each).")
    seed: int = Field(default=0, description="Seed of model initialization and shuffling.")
    batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Windows per batch (per worker); default 256 for the MLP, 64 for the "
        "transformer.",
    )
    lr: float | None = Field(
        default=None,
        gt=0,
        description="Peak learning rate (AdamW); default 1e-3 for the MLP, 3e-4 for the "
        "transformer.",
    )
    weight_decay: float = Field(default=1e-4, ge=0, description="AdamW weight decay.")
    warmup: int = Field(
        default=100, ge=0, description="Linear warmup steps (capped at 10 percent of the steps)."
    )
    grad_clip: float = Field(default=1.0, gt=0, description="Gradient norm clipping.")
    d_model: int = Field(default=128, ge=8, description="Width of embeddings and tokens.")
    n_layer: int | None = Field(
        default=None,
        ge=1,
        description="Hidden layers of the MLP (default 2) or blocks of the transformer (3).",
    )
    n_head: int = Field(default=4, ge=1, description="Attention heads.")
    hidden: int = Field(default=256, ge=8, description="MLP hidden width.")
    inputs: Literal["state+frames", "frames", "state"] | None = Field(
        default=None,
        description="What the policy sees of a step: its state vector, its camera frames, or "
        "both; default: both when the shards have frames (frames alone when they hold no state "
        "vector), the state otherwise.",
    )
    cameras: list[str] | None = Field(
        default=None,
        description="Cameras whose frames the policy sees; default: every camera of the shards.",
    )
    frame_encoder: Literal["nature", "resnet"] | None = Field(
        default=None,
        description="Image encoder per camera: the Nature DQN conv net (default) or IMPALA's "
        "small ResNet.",
    )
    augment_shift: int = Field(
        default=0,
        ge=0,
        description="Random-shift augmentation of frames (DrQ): each window's frames padded by "
        "N pixels (edges repeated) and cropped back at a seeded random offset; 0: off. Only for "
        "a policy that sees frames.",
    )
    text_encoder: Literal["tokens", "wordllama", "embeddings"] | None = Field(
        default=None,
        description="How text conditions are encoded: tokens (the default; learned word "
        "embeddings over the shard vocabulary; unseen words are <unk>), wordllama (a frozen pretrained sentence "
        "embedder shipped in the wordllama package; texts embedded once at train start), or "
        "embeddings (vectors the `embed` relabeler wrote; condition on its column). "
        "docs/trainer.md says which to pick.",
    )
    shuffle_buffer: int = Field(default=65536, ge=1, description="Loader shuffle buffer (windows).")
    frame_cache_mb: int = Field(
        default=1024,
        ge=0,
        description="Decoded frames the loader keeps for later batches and epochs (MiB per "
        "training worker); 0: decode every batch's frames afresh. Same batches either way.",
    )
    log_every: int = Field(default=50, ge=1, description="Steps between metrics lines.")
    checkpoint_every: int = Field(default=500, ge=1, description="Steps between checkpoints.")
    device: str | None = Field(default=None, description="cpu or cuda; CUDA when present.")

    @field_validator("condition", "cameras", mode="before")
    @classmethod
    def _columns(cls, value: Any) -> Any:
        # `none` (or nothing) is behaviour cloning; `a,b` is two columns, as on the CLI.
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            return value
        columns = [column.strip() for item in value for column in str(item).split(",")]
        return [column for column in columns if column and column != "none"]


# The defaults that depend on the model, for the options left unset (None). The MLP is RvS
# (Emmons et al. 2021: an MLP on single steps matches Decision Transformer on offline data):
# single steps, 2 hidden layers, 256 steps a batch, 1e-3. The transformer sees the shards'
# windows (`window` unset), 64 windows (of 20 steps, say) a batch, a lower rate for attention.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"window": 1, "n_layer": 2, "batch_size": 256, "lr": 1e-3},
    "transformer": {"n_layer": 3, "batch_size": 64, "lr": 3e-4},
}

# The files of a run directory.
CONFIG = "config.json"  # what was asked (RunConfig, plain JSON)
CHECKPOINT = "checkpoint.pt"  # tensors and plain containers (torch.load weights_only=True)
METRICS = "metrics.jsonl"  # one JSON line every log_every steps

# Settings a resumed run may change; every other setting is the recorded run's.
RESUMABLE = ("steps", "log_every", "checkpoint_every", "device", "frame_cache_mb")
# Settings that define the model and its data: a resumed run must ask for the same.
FIXED_ON_RESUME = (
    "input", "condition", "model", "window", "d_model", "n_layer", "n_head", "hidden",
    "inputs", "cameras", "frame_encoder", "text_encoder", "augment_shift",
)  # fmt: skip
# How runs written before this module recorded two fields.
_OLD_NAMES = {"shards": "input", "run_dir": "output"}


def trainer_options(options: TrainOptions) -> TrainOptions:
    """The trainer's own fields of `options` (a command's subclass drops its extra fields)."""
    if type(options) is TrainOptions:
        return options
    return TrainOptions.model_validate(options.model_dump(include=set(TrainOptions.model_fields)))


def with_model_defaults(options: TrainOptions) -> TrainOptions:
    """`options` with every unset option that depends on the model set to that model's
    default (`MODEL_DEFAULTS`); a run records its options this way."""
    options = trainer_options(options)
    unset = {
        key: value
        for key, value in MODEL_DEFAULTS[options.model].items()
        if getattr(options, key) is None
    }
    return options.model_copy(update=unset) if unset else options


class RunConfig(BaseModel):
    """A run: its options, the model it builds (trainers.models.model_config, plain data) and
    the shard index facts a rollout needs without the shards (action space, conditions,
    return distribution, dataset metadata such as `env_id`)."""

    model_config = ConfigDict(extra="forbid")

    options: TrainOptions
    model: dict[str, Any]
    index: dict[str, Any]

    def to_record(self) -> dict[str, Any]:
        """Plain JSON data: for config.json and for a `weights_only` checkpoint."""
        return self.model_dump(mode="json")

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RunConfig:
        """A recorded run, also one written before the options had their own model."""
        options = {_OLD_NAMES.get(key, key): value for key, value in record["options"].items()}
        known = {key: value for key, value in options.items() if key in TrainOptions.model_fields}
        return cls(options=TrainOptions(**known), model=record["model"], index=record["index"])

    @property
    def env_id(self) -> str | None:
        """The environment the shards' dataset was collected in, if recorded."""
        env_id = (self.index.get("metadata") or {}).get("env_id")
        return str(env_id) if env_id and env_id != "unknown" else None
