"""`hindsight collect`: roll out a gymnasium environment into a new dataset version."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import CliPositionalArg

from jobs.command import NewDataset, RayCommand, version_line
from schemas.manifest import Manifest


class Collect(RayCommand):
    """Roll out a gymnasium environment at several epsilon-noise levels into a new dataset,
    so that it holds good and bad episodes.

        hindsight collect Pendulum-v1 data/pendulum --episodes 200 --noise 0,0.25,0.5,0.75,1.0
        hindsight collect hindsight/PointGoal-v0 data/point --policy random
    """

    name = "collect"
    job = True

    env: CliPositionalArg[str] = Field(description="Gymnasium environment id, e.g. Pendulum-v1.")
    output: CliPositionalArg[NewDataset] = Field(
        description="New dataset directory (local path or s3://bucket/prefix)."
    )
    episodes: int = Field(100, ge=1, description="Number of episodes to roll out.")
    noise: list[float] = Field(
        default=[0.0],
        description="Epsilon-noise levels; episode e uses noise[e mod len(noise)].",
        json_schema_extra={"metavar": "LEVEL,..."},
    )
    policy: str = Field(
        "heuristic",
        description="random, heuristic (built-in for classic control and PointGoal) or "
        "module:function called as function(observation) -> action.",
    )
    seed: int = Field(0, description="Base seed; episode e is seeded from (seed, e).")
    max_steps: int | None = Field(None, ge=1, description="Override the env's time limit.")
    episodes_per_part: int = Field(
        50, ge=1, description="Episodes per part (one Ray task and one file per part)."
    )

    @field_validator("noise")
    @classmethod
    def _noise_is_a_probability(cls, noise: list[float]) -> list[float]:
        if not noise or any(not 0.0 <= level <= 1.0 for level in noise):
            raise ValueError(f"noise levels are probabilities in [0, 1], got {noise}")
        return noise

    def run(self) -> Manifest:
        from engine.collect import Rollouts, collect, plan_collect

        rollouts = Rollouts(
            env_id=self.env,
            policy=self.policy,
            noise_levels=tuple(self.noise),
            seed=self.seed,
            max_steps=self.max_steps,
        )
        # An unknown env id or policy fails here, before Ray starts.
        plan = plan_collect(rollouts, self.episodes, self.episodes_per_part)
        return collect(plan, self.output, executor=self.executor(), command=self.history_line())

    def report(self, manifest: Manifest, seconds: float) -> str:
        return version_line("collected", manifest, self.output, seconds)
