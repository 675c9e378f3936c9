"""`hindsight materialize`: a self-contained copy of a version, all columns in one group."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import CliPositionalArg

from jobs.command import Dataset, NewDataset, RayCommand, version_line
from schemas.manifest import Manifest


class Materialize(RayCommand):
    """Write a self-contained copy of a dataset version: every column of every group in a
    single `base` group, no references to a parent (to move it alone, or to read it fast).

        hindsight materialize data/pendulum-rl data/pendulum-rl-flat
    """

    name = "materialize"
    job = True

    input: CliPositionalArg[Dataset] = Field(
        description="Dataset version to copy (with all its column groups)."
    )
    output: CliPositionalArg[NewDataset] = Field(
        description="New self-contained dataset with a single column group."
    )

    def run(self) -> Manifest:
        from engine.dataset import open_dataset
        from engine.materialize import materialize

        return materialize(
            open_dataset(self.input),
            self.output,
            executor=self.executor(),
            command=self.history_line(),
        )

    def report(self, manifest: Manifest, seconds: float) -> str:
        return version_line("materialized", manifest, self.output, seconds)
