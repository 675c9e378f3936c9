"""The relabeler contract: a deterministic function from whole episodes to new columns.

A relabeler declares its name, version, parameters (a pydantic model: wrong parameters are
a clear error listing the valid ones), the columns it reads and the columns it writes.
The job hands it one part at a time: whole episodes, sorted by (episode_id, t). Its output
must not depend on how episodes are split into parts, so randomness is derived from
(seed, episode_id, t) with `hash_uniform`, never from a generator shared across episodes.

Relabelers that need a dataset-wide statistic (quantiles, a trained reward model) set
`needs_statistics` and implement two passes: `summarize` runs on every part, `combine`
merges the small summaries in the driver, and `relabel` receives the result.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, ValidationError


class RelabelError(ValueError):
    """A relabeler that cannot run on this input: names the column and what was expected."""


class Params(BaseModel):
    """Base class of every relabeler's parameters: unknown names are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Columns:
    """Column names at the step and episode level."""

    steps: tuple[str, ...] = ()
    episodes: tuple[str, ...] = ()


@dataclass
class Output:
    """New columns for one part: rows aligned with the input steps / episodes."""

    steps: pa.Table | None = None
    episodes: pa.Table | None = None


@dataclass
class Statistics:
    """What `combine` made of every part's summary; `report` goes into the manifest."""

    values: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


class Relabeler(ABC):
    """Subclass this, set the class attributes, and register it under an entry point.

    Entry point group `hindsight.relabelers`, e.g. in your pyproject.toml:

        [project.entry-points."hindsight.relabelers"]
        my_labels = "my_package.labels:MyLabelsRelabeler"
    """

    name: ClassVar[str]
    version: ClassVar[str]
    Params: ClassVar[type[Params]] = Params
    needs_statistics: ClassVar[bool] = False
    # Episode columns the job also hands to `relabel`/`summarize_output` when the dataset
    # has them (optional facts such as `skill`), beyond what `reads()` requires.
    report_episode_columns: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: dict[str, Any] | Params | None = None, seed: int = 0):
        if isinstance(params, Params):
            self.params = params
        else:
            try:
                self.params = self.Params(**(params or {}))
            except ValidationError as error:
                raise RelabelError(
                    f"relabeler {self.name!r}: invalid parameters: {_describe(error)}; "
                    f"valid parameters: {describe_params(self.Params)}"
                ) from None
        self.seed = int(seed)

    @abstractmethod
    def reads(self) -> Columns:
        """The input columns this relabeler needs (dotted paths for struct fields)."""

    @abstractmethod
    def writes(self) -> Columns:
        """The columns this relabeler adds."""

    def check_schema(self, steps: pa.Schema, episodes: pa.Schema) -> None:
        """Before anything runs: raise RelabelError (or KeyError) if the input cannot work,
        e.g. an achieved-goal slice that does not fit the observation."""
        return None

    def summarize(self, steps: pa.Table, episodes: pa.Table) -> dict[str, Any]:
        """Pass one, per part: a small summary (e.g. episode returns) for `combine`."""
        return {}

    def combine(self, summaries: list[dict[str, Any]]) -> Statistics:
        """Pass one, in the driver: merge summaries of all parts (in part order)."""
        return Statistics()

    @abstractmethod
    def relabel(self, steps: pa.Table, episodes: pa.Table, statistics: Statistics) -> Output:
        """Pass two, per part: the new columns for these whole episodes."""

    def summarize_output(
        self, steps: pa.Table, episodes: pa.Table, output: Output
    ) -> dict[str, Any]:
        """After `relabel`, per part: a small summary of what was written, for `finish_report`."""
        return {}

    def finish_report(
        self, statistics: Statistics, summaries: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """In the driver, after pass two: facts for the manifest (merged into `report`)."""
        return {}

    def run(
        self, steps: pa.Table, episodes: pa.Table, statistics: Statistics, where: str
    ) -> Output:
        """`relabel`, checked against the declared contract."""
        output = self.relabel(steps, episodes, statistics)
        declared = self.writes()
        for level, table, rows in (
            ("steps", output.steps, steps.num_rows),
            ("episodes", output.episodes, episodes.num_rows),
        ):
            names = tuple(table.column_names) if table is not None else ()
            if set(names) != set(getattr(declared, level)):
                raise RelabelError(
                    f"{where}: relabeler {self.name!r} wrote {level} columns {list(names)} "
                    f"but declares {list(getattr(declared, level))}"
                )
            if table is not None and table.num_rows != rows:
                raise RelabelError(
                    f"{where}: relabeler {self.name!r} returned {table.num_rows} {level} rows for {rows}"
                )
        return output

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "params": self.params.model_dump(mode="json"),
        }


def describe_params(params_model: type[BaseModel]) -> str:
    parts = []
    for name, info in params_model.model_fields.items():
        default = "required" if info.is_required() else f"default {info.default!r}"
        parts.append(f"{name} ({default})" + (f": {info.description}" if info.description else ""))
    return "; ".join(parts) or "none"


def _describe(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}" for e in error.errors()
    )


# ---------------------------------------------------------------- helpers for relabelers

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 mixer, elementwise on uint64 (the core of `hash_uniform`)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def hash_uniform(
    seed: int, episode_id: np.ndarray, t: np.ndarray | int = 0, stream: int = 0
) -> np.ndarray:
    """Uniform [0, 1) numbers that depend only on (seed, episode_id, t, stream).

    Counter-based, so the same step gets the same number however episodes are batched.
    """
    with np.errstate(over="ignore"):
        key = splitmix64(
            np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
            ^ np.uint64(stream * 0x632BE59BD9B4E019 & 0xFFFFFFFFFFFFFFFF)
        )
        x = splitmix64(key ^ np.asarray(episode_id).astype(np.uint64))
        x = splitmix64(x ^ np.asarray(t).astype(np.uint64))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def require_columns(
    table: pa.Table, names: tuple[str, ...], level: str, relabeler: str, where: str
) -> None:
    """A clear error when a column a relabeler reads is missing."""
    for name in names:
        head = name.split(".")[0]
        if head not in table.column_names:
            raise RelabelError(
                f"{where}: relabeler {relabeler!r} reads {level} column {name!r}, which the dataset "
                f"does not have; available: {', '.join(table.column_names)}"
            )
