"""`language`: sentences written after the fact about what each episode (or segment) did.

    hindsight relabel IN OUT --with language:model=gpt-4o-mini,per=episode,n=3
    hindsight relabel IN OUT --with language          # no endpoint configured: offline

For every episode (or every `segment` steps of it with per=segment) we compute a compact,
factual summary from the data (facts.py: env id, length, return and its percentile over the
whole dataset, how it ended, whether a goal was reached, action and state statistics, the
skill label when there is one) and turn it into `n` short descriptions (describers.py):

- with an endpoint configured (the `base_url` parameter, or OPENAI_API_KEY / OPENAI_BASE_URL
  in the environment) an OpenAI-compatible chat model writes them from a versioned prompt
  template (prompt.py, prompts/describe_v1.txt) in which the summary is quoted JSON data,
  never instructions; requests go through relabelers/llm.py (concurrency, retries, budget,
  cache);
- otherwise a deterministic template describer writes varied sentences from the same facts.

With `keyframes=K` (and an endpoint) the model also sees K camera frames of each unit
(keyframes.py: which ones, as data-URI images of the stored bytes); only then does the job
read the dataset's frames. The template describer ignores frames (and says so once).

Columns: `description` (the first), `descriptions` (all n), `description_status` (ok, failed,
budget) and `description_error` (why, or null) on episodes; with per=segment the same on
steps, plus `description_segment` (the segment's index within its episode).
The manifest's report says which describer wrote them, the model and the prompt version,
how many descriptions ended in each status, and the requests, tokens and cached answers.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from relabelers import endpoint
from relabelers.base import (
    Columns,
    Inputs,
    Output,
    Params,
    Part,
    Relabeler,
    RelabelError,
    require_columns,
)
from relabelers.language import paraphrase
from relabelers.language.describers import LLMDescriber, split_budget, template_descriptions
from relabelers.language.facts import (
    SUCCESS_COLUMNS,
    id_range,
    merge_quantiles,
    part_returns,
    unit_facts,
    units_of,
)
from relabelers.language.keyframes import keyframe_rows, unit_keyframes
from relabelers.language.params import LanguageParams
from relabelers.language.prompt import DEFAULT_PROMPT, PROMPTS, PromptTemplate, read_prompt
from schemas import steps as cols
from schemas.frames import frame_column

log = logging.getLogger("hindsight.language")

PARAPHRASE_PROMPT = PROMPTS / "paraphrase_v1.txt"

__all__ = ["DEFAULT_PROMPT", "LanguageParams", "LanguageRelabeler", "PromptTemplate"]


@dataclass(frozen=True)
class Plan:
    """What `setup` decided for every part: the dataset's return percentiles (101 points),
    the LLM describer (None: the template describer), and the report's fixed facts."""

    return_quantiles: list[float]
    llm_describer: LLMDescriber | None
    report: dict[str, Any]


class LanguageRelabeler(Relabeler):
    name: ClassVar[str] = "language"
    version: ClassVar[str] = "1"
    Params: ClassVar[type[Params]] = LanguageParams

    def __init__(self, params: Any = None, seed: int = 0):
        super().__init__(params, seed)
        self.plan: Plan | None = None  # set by `setup`
        # Paraphrase mode (`source=`): every distinct text and its rewrites, set by `setup`.
        self.paraphrases: paraphrase.ParaphraseTable | None = None

    def uses_llm(self) -> bool:
        """Whether the model writes the descriptions (else the template describer)."""
        p = self.params
        return p.describer == "llm" or (
            p.describer == "auto" and endpoint.endpoint_configured(p.base_url)
        )

    def reads(self) -> Columns:
        p = self.params
        if p.paraphrase_mode:
            at = paraphrase.levels(p)
            return Columns(
                steps=(cols.EPISODE_ID, cols.T, p.source) if "steps" in at else (),
                episodes=(cols.EPISODE_ID, p.source) if "episodes" in at else (),
            )
        # The frames only when the model will see them: the template describer never does.
        frames = (frame_column(self.params.camera),) if self.keyframes_sent() else ()
        return Columns(
            steps=(
                cols.EPISODE_ID,
                cols.T,
                cols.ACTION,
                cols.REWARD,
                cols.TERMINATED,
                cols.TRUNCATED,
            ),
            # Absent from pixels-only data: the facts that need a state are left out.
            steps_if_present=(cols.OBSERVATION,),
            episodes=(cols.EPISODE_ID, cols.ENV_ID),
            # Optional facts, used when the dataset has them.
            episodes_if_present=(cols.SOURCE, "skill", *SUCCESS_COLUMNS),
            frames=frames,
        )

    def keyframes_sent(self) -> bool:
        return self.params.keyframes > 0 and self.uses_llm()

    def frame_rows(self, steps: pa.Table, episodes: pa.Table, part: Part) -> np.ndarray | None:
        """Only the keyframes' rows: the job reads no other frame of the part."""
        if not self.keyframes_sent():
            return None
        return keyframe_rows(
            units_of(steps, self.params.per, self.params.segment), self.params.keyframes
        )

    def writes(self) -> Columns:
        if self.params.paraphrase_mode:
            written = (paraphrase.output_column(self.params),)
            return Columns(**{level: written for level in paraphrase.levels(self.params)})
        names = ("description", "descriptions", "description_status", "description_error")
        if self.params.per == "segment":
            return Columns(steps=(*names[:2], "description_segment", *names[2:]))
        return Columns(episodes=names)

    # ------------------------------------------------------------ in the driver, before
    def setup(self, inputs: Inputs) -> None:
        """Check the prompt template, choose the describer, split the budget over parts,
        and find the dataset's return percentiles (one pass over every part)."""
        p = self.params
        default_prompt = PARAPHRASE_PROMPT if p.paraphrase_mode else DEFAULT_PROMPT
        prompt_path = Path(p.prompt) if p.prompt else default_prompt
        prompt_text = read_prompt(prompt_path)
        if p.paraphrase_mode:
            return self.setup_paraphrases(inputs, prompt_path, prompt_text)
        if p.keyframes and p.camera not in inputs.cameras:
            has = ", ".join(sorted(inputs.cameras)) or "none: record them with `collect --frames`"
            raise RelabelError(
                f"language: keyframes={p.keyframes} needs frames of camera {p.camera!r}, "
                f"which the dataset does not have (its cameras: {has})"
            )
        summaries = inputs.summarize(self.part_returns, frames=False)  # returns need no pixels
        use_llm = self.uses_llm()
        report: dict[str, Any] = {
            "describer": "llm" if use_llm else "template",
            "per": p.per,
            "n": p.n,
        }
        if not inputs.rewards_known:
            report["rewards"] = "absent: facts and descriptions leave out return and reward"
        if p.keyframes and use_llm:
            report["keyframes"] = {"k": p.keyframes, "camera": p.camera, "detail": p.detail}
        elif p.keyframes:
            report["keyframes"] = "ignored: the template describer does not see frames"
            log.warning(
                "language: keyframes=%d ignored: no endpoint is configured, and the offline "
                "template describer does not see frames (set --llm-base-url or "
                "OPENAI_BASE_URL / OPENAI_API_KEY for a vision model)",
                p.keyframes,
            )
        describer = None
        if use_llm:
            describer = LLMDescriber(
                params=p,
                prompt_text=prompt_text,
                base_url=endpoint.resolve_base_url(p.base_url),
                budgets=split_budget(p, [s["units"] for s in summaries]),
            )
            report.update(
                model=p.model,
                prompt=prompt_path.stem,
                prompt_sha256=hashlib.sha256(prompt_text.encode()).hexdigest(),
                base_url=endpoint.endpoint_id(describer.base_url),
                temperature=p.temperature,
            )
        else:
            report.update(model=None, prompt="template_v1")
        self.plan = Plan(merge_quantiles(summaries), describer, report)

    def setup_paraphrases(self, inputs: Inputs, prompt_path: Path, prompt_text: str) -> None:
        """Check the source column, gather its distinct texts (one pass) and rewrite them."""
        p = self.params
        schemas = {"steps": inputs.steps_schema, "episodes": inputs.episodes_schema}
        paraphrase.check_source(p, schemas)
        found = inputs.summarize(
            lambda steps, episodes, part: paraphrase.distinct_texts(p, steps, episodes)
        )
        texts = sorted(set().union(*found)) if found else []
        use_llm = self.uses_llm()
        table = paraphrase.paraphrase_texts(p, texts, self.seed, use_llm, prompt_text)
        if use_llm:
            table.report.update(
                prompt=prompt_path.stem,
                prompt_sha256=hashlib.sha256(prompt_text.encode()).hexdigest(),
                temperature=p.temperature,
            )
        self.paraphrases = table

    def part_returns(self, steps: pa.Table, episodes: pa.Table, part: Part) -> dict[str, Any]:
        """One part's unit count and unit returns (for percentiles and budget shares)."""
        return part_returns(steps, self.params.per, self.params.segment)

    # ------------------------------------------------------------ per part
    def relabel(self, steps: pa.Table, episodes: pa.Table, part: Part) -> Output:
        p = self.params
        where = f"{part} (episodes {id_range(steps)})"
        if p.paraphrase_mode:
            return self.relabel_paraphrases(steps, episodes, where)
        require_columns(steps, self.reads().steps, "steps", self.name, where)
        require_columns(episodes, self.reads().episodes, "episodes", self.name, where)
        if self.plan is None:
            raise RelabelError(
                f"{where}: relabeler 'language' needs the dataset's return percentiles from "
                "setup(); for tables in memory use relabelers.base.relabel_tables"
            )
        units = units_of(steps, p.per, p.segment)
        facts = unit_facts(steps, episodes, units, self.plan.return_quantiles, p)
        report: dict[str, Any] = {"requests": 0, "tokens": 0, "cached": 0, "budget_message": None}
        if self.plan.llm_describer is not None:
            images = None
            if p.keyframes:
                column = frame_column(p.camera)
                require_columns(steps, (column,), "frames", self.name, where)
                keyframes = unit_keyframes(steps, column, units, p.keyframes, where)
                for fact, keyframe_steps in zip(facts, keyframes.steps):
                    fact["keyframes"] = {"camera": p.camera, "steps": keyframe_steps}
                images = keyframes.images
            (texts, status, errors), usage = self.plan.llm_describer.describe(facts, part, images)
            report.update(usage)
        else:
            texts = template_descriptions(facts, self.seed, p.n)
            status, errors = ["ok"] * len(facts), [None] * len(facts)
        report["status"] = {s: status.count(s) for s in sorted(set(status))}
        report["first_error"] = next((e for s, e in zip(status, errors) if s == "failed"), None)
        table = pa.table(
            {
                "description": pa.array([t[0] if t else None for t in texts], pa.string()),
                "descriptions": pa.array(texts, pa.list_(pa.string())),
                "description_status": pa.array(status, pa.string()),
                "description_error": pa.array(errors, pa.string()),
            }
        )
        if p.per == "episode":
            return Output(episodes=table, report=report)
        step_unit = np.repeat(np.arange(len(facts)), units["length"])
        table = table.take(pa.array(step_unit))
        table = table.add_column(
            2, "description_segment", pa.array(np.repeat(units["segment"], units["length"]))
        )
        return Output(steps=table, report=report)

    def relabel_paraphrases(self, steps: pa.Table, episodes: pa.Table, where: str) -> Output:
        """Each level's texts mapped onto setup's lists (Arrow index_in + take)."""
        if self.paraphrases is None:
            raise RelabelError(
                f"{where}: relabeler 'language' needs setup()'s paraphrases; for tables in "
                "memory use relabelers.base.relabel_tables"
            )
        name = paraphrase.output_column(self.params)
        tables = {"steps": steps, "episodes": episodes}
        out = {
            level: pa.table(
                {name: self.paraphrases.column(tables[level].column(self.params.source), where)}
            )
            for level in paraphrase.levels(self.params)
        }
        return Output(steps=out.get("steps"), episodes=out.get("episodes"))

    # ------------------------------------------------------------ in the driver, after
    def finish(self, reports: list[dict[str, Any]]) -> dict[str, Any]:
        """The describer, model and prompt; descriptions by status; what the model cost."""
        if self.paraphrases is not None:
            return self.paraphrases.report
        assert self.plan is not None
        status: dict[str, int] = {}
        for part_report in reports:
            for key, count in part_report.get("status", {}).items():
                status[key] = status.get(key, 0) + count
        report: dict[str, Any] = {**self.plan.report, "descriptions_by_status": status}
        if self.plan.llm_describer is None:
            return report
        report["requests"] = sum(r.get("requests", 0) for r in reports)
        report["tokens"] = sum(r.get("tokens", 0) for r in reports)
        report["cached"] = sum(r.get("cached", 0) for r in reports)
        if any(r.get("budget_message") for r in reports):
            p = self.params
            limits = [f"max_requests={p.max_requests}"] if p.max_requests is not None else []
            if p.max_tokens_budget is not None:
                limits.append(f"max_tokens_budget={p.max_tokens_budget}")
            report["budget"] = (
                f"budget exhausted ({', '.join(limits)}): "
                f"{status.get('budget', 0)} descriptions were not requested "
                "(status 'budget'); re-run the same command to continue"
            )
        if status.get("failed") and not status.get("ok"):
            raise RelabelError(self._all_failed(status, reports))
        if status.get("failed"):
            report["failed"] = (
                f"{status['failed']} descriptions failed after retries (see "
                "description_error); re-run with --retry-failed to ask only for those"
            )
        return report

    def _all_failed(self, status: dict[str, int], reports: list[dict[str, Any]]) -> str:
        """One line for a run in which no description was written and some failed."""
        assert self.plan is not None
        first = next((r["first_error"] for r in reports if r.get("first_error")), None)
        budget = status.get("budget")
        stopped = f" ({budget} more not requested: budget)" if budget else ""
        return (
            f"language: all {status['failed']} descriptions failed{stopped} at "
            f"{self.plan.report['base_url']} (model {self.params.model!r}); first error: {first}"
        )
