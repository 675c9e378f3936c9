"""`hindsight shard`: a dataset version -> WebDataset shards of training windows."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import CliPositionalArg

from engine import storage
from jobs.command import Dataset, NewShards, RayCommand, rate
from schemas.shard_index import ShardIndex


class Shard(RayCommand):
    """Cut a dataset version into WebDataset shards of training windows with the
    conditioning columns the trainer will use (local or s3://). Same dataset, options and
    seed: byte-identical shards.

        hindsight shard data/pendulum-rl data/shards/pendulum --condition return_to_go,skill --window 20
        hindsight shard data/babyai-rl data/shards/babyai --condition instruction --exclude "instruction IN ('go to the red key')"
    """

    name = "shard"
    job = True

    input: CliPositionalArg[Dataset] = Field(
        description="Dataset version to shard (local path or s3://)."
    )
    output: CliPositionalArg[NewShards] = Field(
        description="Shard directory to create (local path or s3://); must be new."
    )
    condition: list[str] = Field(
        default=[],
        description="Conditioning columns (step or episode level) to store with each window.",
        json_schema_extra={"metavar": "COLUMN,..."},
    )
    window: int = Field(20, ge=1, description="Steps per training window.")
    stride: int = Field(
        1, ge=1, description="A window ends every `stride` steps, counted back from the last."
    )
    shard_steps: int = Field(200_000, ge=1, description="About this many steps per shard.")
    block_steps: int = Field(
        2048, ge=1, description="About this many steps per tar sample (block of episodes)."
    )
    seed: int = Field(0, description="Seed of the episode shuffle across shards.")
    text: list[str] | None = Field(
        None,
        description="String columns holding free text (default: description(s), "
        "instruction(s) and columns written by the `language` relabeler).",
        json_schema_extra={"metavar": "COLUMN,..."},
    )
    max_tokens: int = Field(64, ge=1, description="Most tokens kept per text.")
    max_words: int = Field(20000, ge=3, description="Largest text vocabulary (with pad/unk).")
    frame_stack: int = Field(
        1,
        ge=1,
        description="Camera frames the loader stacks per step (the step's and k - 1 before); "
        "needs a dataset with frames.",
    )
    cameras: list[str] | None = Field(
        None,
        description="Cameras whose encoded frames the shards carry (default: every camera of "
        "the dataset's frames group; '' for none).",
        json_schema_extra={"metavar": "CAMERA,..."},
    )

    exclude: str | None = Field(
        None,
        description="Polars SQL predicate over step (and episode) columns: matching steps stay "
        "out of the shards, recorded in the index (held-out values; `ask` warns on them).",
        json_schema_extra={"metavar": "SQL"},
    )

    def check(self) -> None:
        super().check()
        from engine.dataset import open_dataset
        from engine.shards import checked_cameras, resolve_conditions
        from engine.shards.exclude import plan_exclusion

        if self.text and not self.condition:
            raise ValueError("--text names text columns among --condition; give --condition too")
        # An unknown conditioning column or camera fails here, before Ray starts.
        dataset = open_dataset(self.input)
        resolve_conditions(dataset, tuple(self.condition), self.text_columns())
        checked_cameras(dataset, self.settings())
        plan_exclusion(dataset, self.exclude)

    def text_columns(self) -> tuple[str, ...] | None:
        return None if self.text is None else tuple(self.text)

    def settings(self):
        from engine.shards import ShardSettings

        return ShardSettings(
            condition=tuple(self.condition),
            window=self.window,
            stride=self.stride,
            shard_steps=self.shard_steps,
            block_steps=self.block_steps,
            seed=self.seed,
            text=self.text_columns(),
            max_tokens=self.max_tokens,
            max_words=self.max_words,
            cameras=None if self.cameras is None else tuple(c for c in self.cameras if c),
            frame_stack=self.frame_stack,
            exclude=self.exclude,
        )

    def run(self) -> ShardIndex:
        from engine.dataset import open_dataset
        from engine.shards import write_shards

        return write_shards(
            open_dataset(self.input),
            self.settings(),
            self.output,
            executor=self.executor(),
            command=self.history_line(),
        )

    def summary(self, index: ShardIndex) -> dict:
        return {
            "output": storage.normalize(self.output),
            "shards": len(index.shards),
            "windows": index.windows,
            "episodes": index.episodes,
            "steps": index.steps,
            "bytes": sum(s.bytes for s in index.shards),
            "cameras": sorted(index.cameras),
            "frame_stack": index.frame_stack,
            "exclusions": index.exclusions.model_dump() if index.exclusions else None,
        }

    def report(self, index: ShardIndex, seconds: float) -> str:
        left_out = ""
        if index.exclusions is not None:
            found = index.exclusions
            nulls = sum(found.null_steps.values())
            left_out = (
                f"; left out {found.excluded_steps:,} excluded steps and {nulls:,} steps with "
                f"no text ({found.dropped_episodes:,} episodes lost every step to one or the "
                "other)"
            )
        return (
            f"wrote {len(index.shards)} shards ({index.windows:,} windows, {index.steps:,} steps, "
            f"{sum(s.bytes for s in index.shards) / 1e6:.1f} MB) to "
            f"{storage.normalize(self.output)} in {rate(index.steps, seconds)}{left_out}"
        )
