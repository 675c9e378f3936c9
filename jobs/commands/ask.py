"""`hindsight ask`: roll a trained policy out under the conditions you ask for."""

from __future__ import annotations

import json
import os
import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import CliPositionalArg, NoDecode

from jobs.command import Command, Directory, Run

# Where a new `COLUMN=` pair starts inside a `--request` value (columns may be dotted paths).
_NEXT_PAIR = re.compile(r",\s*(?=[A-Za-z_][A-Za-z0-9_.]*=)")


class Ask(Command):
    """Roll out a trained policy, conditioned on the values you ask for.

    One request, or a sweep over one column with a report of achieved against requested,
    with references: the dataset's mean return, the rank correlation of achieved against
    requested, and (with --baseline) another run asked the same way, e.g. behaviour cloning.

        hindsight ask runs/pend-rtg --request return_to_go=-150 --episodes 20
        hindsight ask runs/pend-rtg --sweep return_to_go=-1000,-600,-300,-150 --baseline runs/pend-bc
        hindsight ask runs/babyai --request "instruction=walk up to the crimson key" \\
            --mission "go to the red key" --metric success --episodes 50
    """

    name = "ask"

    input: CliPositionalArg[Run] = Field(
        description="A run directory written by `hindsight train`."
    )
    env: str | None = Field(
        None,
        description="Gymnasium environment id (default: the one the run's data was collected in).",
    )
    # NoDecode: the command line hands the text over whole (repeated options joined by
    # commas), so a sentence may hold commas; `_pairs` splits it only where `COLUMN=` starts.
    request: Annotated[dict[str, str], NoDecode] = Field(
        default={},
        description="The value asked for per condition column, COLUMN=VALUE (repeat for several).",
        json_schema_extra={"metavar": "COLUMN=VALUE"},
    )
    sweep: str | None = Field(
        default=None,
        description="One column and the values to ask for in turn: COLUMN=V1,V2,...",
        json_schema_extra={"metavar": "COLUMN=V1,V2,..."},
    )
    episodes: int = Field(default=10, ge=1, description="Episodes per seed and value.")
    seeds: list[int] = Field(default=[0], description="Environment seeds.")
    output: Directory | None = Field(
        default=None,
        description="Directory for ask.json (and ask.png for a sweep); default for a sweep: "
        "INPUT/ask-COLUMN.",
    )
    device: str = Field(default="cpu", description="Device for the rollout.")
    mission: str | None = Field(
        default=None,
        description="MiniGrid/BabyAI: the mission the env is set to and scored on, e.g. 'go "
        "to the red key' (default: the requested text itself); the condition may word it "
        "differently. With --sweep: one for every value, or one per value (M1,M2,...).",
    )
    metric: Literal["auto", "return", "success"] = Field(
        default="auto",
        description="What 'achieved' is: the env's success rate (95% Wilson interval, the "
        "return next to it), the return, or auto (success for goal conditions, else return).",
    )
    actions: Literal["greedy", "sample"] = Field(
        default="greedy",
        description="Discrete actions: the policy's most likely one, or drawn from its "
        "distribution (seeded by --seeds; breaks the loops a memoryless greedy policy falls "
        "into, e.g. on MiniGrid).",
    )
    baseline: Run | None = Field(
        default=None,
        description="Another run asked the same way with no condition (e.g. behaviour "
        "cloning: trained with --condition none), reported as a reference.",
    )

    @field_validator("request", mode="before")
    @classmethod
    def _pairs(cls, value: Any) -> Any:
        """`COLUMN=VALUE` strings (the command line) into a mapping."""
        if isinstance(value, str):
            value = _NEXT_PAIR.split(value) if value.strip() else []
        if isinstance(value, list):
            pairs = {}
            for pair in value:
                column, sep, text = str(pair).partition("=")
                if not sep:
                    raise ValueError(f"expected COLUMN=VALUE, got {pair!r}")
                pairs[column.strip()] = text.strip()
            return pairs
        return value

    @field_validator("sweep")
    @classmethod
    def _sweep(cls, value: str | None) -> str | None:
        if value is not None:
            column, sep, values = value.partition("=")
            if not sep or not column.strip() or not values.strip(","):
                raise ValueError(f"expected COLUMN=V1,V2,..., got {value!r}")
        return value

    def sweep_values(self) -> tuple[str, list[str]]:
        """The swept column and its values."""
        column, _, values = str(self.sweep).partition("=")
        return column.strip(), [v.strip() for v in values.split(",") if v.strip()]

    def sweep_missions(self, count: int) -> str | list[str] | None:
        """--mission of a sweep: one for every value, or M1,M2,... one per value."""
        if self.mission is None or "," not in self.mission:
            return self.mission
        missions = [m.strip() for m in self.mission.split(",")]
        if len(missions) != count:
            raise ValueError(f"--mission: {len(missions)} missions for {count} swept values")
        return missions

    @model_validator(mode="after")
    def _one_or_the_other(self) -> Ask:
        if self.sweep and self.request:
            raise ValueError("give --request or --sweep, not both")
        return self

    def run(self) -> dict[str, Any]:
        from trainers import ask

        if self.sweep:
            column, values = self.sweep_values()
            output = self.output or os.path.join(self.input, f"ask-{column}")
            report = ask.sweep(
                self.input, self.env, column, values, self.episodes, self.seeds, output,
                self.device, mission=self.sweep_missions(len(values)), metric=self.metric,
                sample=self.actions == "sample",
            )  # fmt: skip
            if self.baseline:
                report["reference"]["baseline"] = self.ask_baseline(report["env"])
                with open(os.path.join(output, "ask.json"), "w") as handle:
                    json.dump(report, handle, indent=2)
            return {**report, "output": output}
        result = ask.ask(
            self.input, self.env, self.request, self.episodes, self.seeds, self.device,
            mission=self.mission, metric=self.metric, sample=self.actions == "sample",
        )  # fmt: skip
        result = {"condition": self.request, **result}
        if self.baseline:
            result["baseline"] = self.ask_baseline(result["env"])
        if self.output:
            os.makedirs(self.output, exist_ok=True)
            with open(os.path.join(self.output, "ask.json"), "w") as handle:
                json.dump(result, handle, indent=2)
        return result

    def ask_baseline(self, env: str) -> dict[str, Any]:
        """The baseline run, asked with no condition in the same environment and seeds."""
        from trainers import ask

        outcome = ask.ask(
            self.baseline, env, {}, self.episodes, self.seeds, self.device,
            mission=self.mission, metric=self.metric, sample=self.actions == "sample",
        )  # fmt: skip
        return {
            "run": self.baseline,
            "achieved_mean": outcome["achieved_mean"],
            "achieved_ci95": outcome["achieved_ci95"],
            "episodes": outcome["episodes"],
        }

    def report(self, result: dict[str, Any], seconds: float) -> str:
        from trainers.sweep_report import format_sweep

        if self.sweep:
            lines = format_sweep(result)
            baseline = result["reference"].get("baseline")
            if baseline:
                low, high = baseline["achieved_ci95"]
                best = max(row["achieved_mean"] for row in result["results"])
                lines.append(
                    f"baseline {baseline['run']}: {baseline['achieved_mean']:.2f} "
                    f"[{low:.2f}, {high:.2f}]; the best request achieved "
                    f"{best - baseline['achieved_mean']:+.2f} over it"
                )
            output = result["output"]
            lines.append(
                f"wrote {os.path.join(output, 'ask.json')} and {os.path.join(output, 'ask.png')}"
            )
            return "\n".join(lines)
        return json.dumps(result, indent=2)
