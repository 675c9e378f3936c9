"""`hindsight relabel`: attach relabeler column groups to a dataset version."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import CliPositionalArg

from engine import storage
from jobs.command import Dataset, NewDataset, RayCommand, rate, wrap_report
from schemas.manifest import Manifest, public_url

# `k=v` before any `:` — a parameter of the relabeler named before it, not a new one.
_PARAMETER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


class RelabelerSpec(BaseModel):
    """One relabeler to apply: its registered name and its parameters."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Registered relabeler name (see `hindsight relabelers`).")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Parameters, validated by the relabeler."
    )

    def as_option(self) -> str:
        """`returns:gamma=0.99,reference_random=-1200`, as `--with` takes it."""
        params = ",".join(f"{k}={_option_value(v)}" for k, v in self.params.items())
        return self.name + (f":{params}" if params else "")


def _option_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ";".join(public_url(str(v)) for v in value)  # list values use ';' in --with
    return public_url(str(value))


def join_parameters(items: list[Any]) -> list[Any]:
    """`--with returns:gamma=1,reference_random=-1200` arrives split at its commas (lists
    on the command line are comma-separated): rejoin each `k=v` piece with the relabeler
    named before it."""
    joined: list[Any] = []
    for item in items:
        if isinstance(item, str) and joined and isinstance(joined[-1], str):
            if _PARAMETER.match(item.strip()):
                joined[-1] = f"{joined[-1]},{item.strip()}"
                continue
        joined.append(item)
    return joined


class Relabel(RayCommand):
    """Apply relabelers in order; write a new version OUTPUT that references INPUT's files
    and adds one column group per relabeler (nothing is copied).

        hindsight relabel data/pendulum data/pendulum-rl --with returns:gamma=0.99 --with skill:levels=4
        hindsight relabel data/maze data/maze-her --with goals:strategy=future,k=4
    """

    name = "relabel"
    job = True

    input: CliPositionalArg[Dataset] = Field(
        description="The parent dataset version (local path or s3://)."
    )
    output: CliPositionalArg[NewDataset] = Field(
        description="Where the new version is written; must not exist yet."
    )
    relabelers: list[RelabelerSpec] = Field(
        alias="with",
        min_length=1,
        description="A relabeler and its parameters, NAME[:k=v,...] (repeat for several; "
        "applied in order, later ones see earlier ones' columns; list values use ';').",
        json_schema_extra={"metavar": "NAME[:k=v,...]"},
    )
    seed: int = Field(0, description="Seed of every relabeler's randomness.")
    llm_base_url: str | None = Field(
        None, description="Sets `base_url` on every relabeler that has that parameter."
    )
    retry_failed: bool = Field(
        False, description="Sets `retry_failed=true` on every relabeler that has that parameter."
    )

    @model_validator(mode="before")
    @classmethod
    def _one_relabeler_shorthand(cls, data: Any) -> Any:
        """A spec may say `relabeler: NAME` + `params: {...}` for a single relabeler."""
        if isinstance(data, dict) and "relabeler" in data:
            data = dict(data)
            single = {"name": data.pop("relabeler"), "params": data.pop("params", {}) or {}}
            key = "with" if "with" in data else "relabelers"
            data[key] = [single, *(data.get(key) or [])]
        return data

    @field_validator("relabelers", mode="before")
    @classmethod
    def _parse_options(cls, items: Any) -> Any:
        """`NAME:k=v,...` strings (command line or spec) into {name, params}."""
        from relabelers import registry

        if not isinstance(items, list):
            return items
        parsed = []
        for item in join_parameters(items):
            if isinstance(item, str):
                name, params = registry.parse_with(item)
                item = {"name": name, "params": params}
            parsed.append(item)
        return parsed

    def check(self) -> None:
        super().check()
        from jobs.relabeling import create_relabelers

        create_relabelers(self)  # names and parameters, before any data is read

    def run(self) -> Manifest:
        from jobs.relabeling import create_relabelers, relabel

        return relabel(
            self.input,
            self.output,
            create_relabelers(self),
            executor=self.executor(),
            command=self.history_line(),
        )

    def summary(self, manifest: Manifest) -> dict[str, Any]:
        return {
            "output": storage.normalize(self.output),
            "dataset_id": manifest.dataset_id,
            "steps": manifest.steps,
            "episodes": manifest.episodes,
            "groups": {
                g.name: g.relabeler.report
                for g in manifest.groups
                if not g.inherited and g.relabeler
            },
        }

    def report(self, manifest: Manifest, seconds: float) -> str:
        summary = self.summary(manifest)
        lines = [wrap_report(name, report) for name, report in summary["groups"].items() if report]
        lines.append(
            f"relabeled {manifest.steps:,} steps, {manifest.episodes:,} episodes with "
            f"{', '.join(summary['groups'])} into {summary['output']} "
            f"(dataset {manifest.dataset_id}) in {rate(manifest.steps, seconds)}"
        )
        return "\n".join(lines)
