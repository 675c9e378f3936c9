"""`language`: sentences written after the fact about what each episode (or segment) did.

    hindsight relabel IN OUT --with language:model=gpt-4o-mini,per=episode,n=3
    hindsight relabel IN OUT --with language          # no endpoint configured: offline

For every episode (or every `segment` steps of it with per=segment) we compute a compact,
factual summary from the data (env id, length, return and its percentile over the whole
dataset, how it ended, whether a goal was reached, action and state statistics, the skill
label when there is one) and turn it into `n` short descriptions:

- with an endpoint configured (the `base_url` parameter, or OPENAI_API_KEY / OPENAI_BASE_URL
  in the environment) an OpenAI-compatible chat model writes them from a versioned prompt
  template (relabelers/prompts/describe_v1.txt) in which the summary is quoted JSON data,
  never instructions; requests go through relabelers/llm.py (concurrency, retries, budget,
  cache);
- otherwise a deterministic template describer writes varied sentences from the same facts.

Columns: `description` (the first), `descriptions` (all n), `description_status` (ok, failed,
budget) and `description_error` (why, or null) on episodes; with per=segment the same on
steps, plus `description_segment` (the segment's index within its episode).
The manifest's report says which describer wrote them, the model and the prompt version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import string
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from relabelers import llm
from relabelers.base import (
    Columns,
    Output,
    Params,
    Relabeler,
    RelabelError,
    Statistics,
    hash_uniform,
    require_columns,
)
from schemas import steps as cols
from schemas.steps import arrow_to_numpy, episode_boundaries

PROMPTS = Path(__file__).parent / "prompts"
DEFAULT_PROMPT = PROMPTS / "describe_v1.txt"
SUCCESS_COLUMNS = ("goal_reached", "is_success", "success")
# Up to this many units a part sends its returns exactly; beyond, a quantile grid.
EXACT_RETURNS = 20_000
GRID_POINTS = 2_001
log = logging.getLogger("hindsight.language")


class LanguageParams(Params):
    model: str = Field("gpt-4o-mini", description="chat model name at the endpoint")
    per: Literal["episode", "segment"] = Field(
        "episode", description="describe whole episodes, or segments of `segment` steps"
    )
    n: int = Field(3, ge=1, le=16, description="descriptions per episode/segment")
    segment: int = Field(50, ge=1, description="steps per segment (per=segment)")
    describer: Literal["auto", "llm", "template"] = Field(
        "auto", description="auto: the LLM when an endpoint is configured, else the template"
    )
    base_url: str | None = Field(
        None, description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"
    )
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="sampling temperature")
    max_tokens: int = Field(400, ge=16, description="max tokens per answer")
    concurrency: int = Field(16, ge=1, description="requests in flight per part")
    timeout: float = Field(60.0, gt=0, description="seconds per request")
    max_retries: int = Field(4, ge=0, description="retries per request")
    max_requests: int | None = Field(None, ge=0, description="request budget for the job")
    max_tokens_budget: int | None = Field(None, ge=0, description="token budget for the job")
    cache: str | None = Field(None, description=f"answer cache directory ({llm.DEFAULT_CACHE})")
    retry_failed: bool = Field(False, description="ask again for requests that failed before")
    prompt: str | None = Field(None, description="prompt template file (default describe_v1)")
    goal_threshold: float = Field(
        0.05, ge=0.0, description="achieved-desired goal distance that counts as reached"
    )


class LanguageRelabeler(Relabeler):
    name: ClassVar[str] = "language"
    version: ClassVar[str] = "1"
    Params: ClassVar[type[Params]] = LanguageParams
    needs_statistics: ClassVar[bool] = True
    # Optional episode columns the job also reads when the dataset has them.
    report_episode_columns: ClassVar[tuple[str, ...]] = (cols.SOURCE, "skill", *SUCCESS_COLUMNS)

    def __init__(self, params: Any = None, seed: int = 0):
        super().__init__(params, seed)
        self._last_run: dict[str, Any] = {}

    def reads(self) -> Columns:
        return Columns(
            steps=(
                cols.EPISODE_ID,
                cols.T,
                cols.OBSERVATION,
                cols.ACTION,
                cols.REWARD,
                cols.TERMINATED,
                cols.TRUNCATED,
            ),
            episodes=(cols.EPISODE_ID, cols.ENV_ID),
        )

    def writes(self) -> Columns:
        names = ("description", "descriptions", "description_status", "description_error")
        if self.params.per == "segment":
            return Columns(steps=(*names[:2], "description_segment", *names[2:]))
        return Columns(episodes=names)

    # ------------------------------------------------------------ pass one: statistics
    def summarize(self, steps: pa.Table, episodes: pa.Table) -> dict[str, Any]:
        """Returns of this part's units: all of them, or a fine quantile grid when many."""
        units = _units(steps, self.params.per, self.params.segment)
        ids, returns = units["episode_id"], units["return"]
        if len(returns) > EXACT_RETURNS:
            returns = np.quantile(returns, np.linspace(0, 1, GRID_POINTS))
        return {
            "units": len(ids),
            "unit_returns": returns.tolist(),
            "first_episode": int(ids[0]) if len(ids) else None,
        }

    def combine(self, summaries: list[dict[str, Any]]) -> Statistics:
        p = self.params
        quantiles = _merge_quantiles(summaries)
        use_llm = p.describer == "llm" or (
            p.describer == "auto" and llm.endpoint_configured(p.base_url)
        )
        prompt_path = Path(p.prompt) if p.prompt else DEFAULT_PROMPT
        prompt_text = _read_prompt(prompt_path)
        values: dict[str, Any] = {
            "return_quantiles": quantiles,
            "describer": "llm" if use_llm else "template",
            "base_url": llm.resolve_base_url(p.base_url),
            "prompt_text": prompt_text,
            "budgets": _split_budget(p, summaries),
        }
        report: dict[str, Any] = {"describer": values["describer"], "per": p.per, "n": p.n}
        if use_llm:
            report.update(
                model=p.model,
                prompt=prompt_path.stem,
                prompt_sha256=hashlib.sha256(prompt_text.encode()).hexdigest(),
                base_url=_public_url(values["base_url"]) or "OpenAI default",
                temperature=p.temperature,
            )
        else:
            report.update(model=None, prompt="template_v1")
        return Statistics(values=values, report=report)

    # ------------------------------------------------------------ pass two: descriptions
    def relabel(self, steps: pa.Table, episodes: pa.Table, statistics: Statistics) -> Output:
        p = self.params
        where = f"episodes {_id_range(steps)}"
        require_columns(steps, self.reads().steps, "steps", self.name, where)
        require_columns(episodes, self.reads().episodes, "episodes", self.name, where)
        if not statistics.values:  # called on one table directly: that table is the dataset
            statistics = self.combine([self.summarize(steps, episodes)])
        values = statistics.values
        units = _units(steps, p.per, p.segment)
        facts = unit_facts(steps, episodes, units, values["return_quantiles"], p)
        self._last_run = {"requests": 0, "tokens": 0, "cached": 0, "budget_message": None}
        if values["describer"] == "llm":
            texts, status, errors = self._ask_llm(facts, values)
        else:
            texts = template_descriptions(facts, self.seed, p.n)
            status, errors = ["ok"] * len(facts), [None] * len(facts)
        self._last_run["status"] = {s: status.count(s) for s in sorted(set(status))}
        table = pa.table(
            {
                "description": pa.array([t[0] if t else None for t in texts], pa.string()),
                "descriptions": pa.array(texts, pa.list_(pa.string())),
                "description_status": pa.array(status, pa.string()),
                "description_error": pa.array(errors, pa.string()),
            }
        )
        if p.per == "episode":
            return Output(episodes=table)
        step_unit = np.repeat(np.arange(len(facts)), units["length"])
        table = table.take(pa.array(step_unit))
        table = table.add_column(
            2, "description_segment", pa.array(np.repeat(units["segment"], units["length"]))
        )
        return Output(steps=table)

    # ------------------------------------------------------------ what the run did (manifest)
    def summarize_output(self, steps: pa.Table, episodes: pa.Table, output: Output) -> dict:
        """Per part: descriptions by status, requests sent, answers from the cache."""
        return dict(self._last_run)

    def finish_report(self, statistics: Statistics, summaries: list[dict]) -> dict[str, Any]:
        status: dict[str, int] = {}
        for summary in summaries:
            for key, count in summary.get("status", {}).items():
                status[key] = status.get(key, 0) + count
        report: dict[str, Any] = {"descriptions_by_status": status}
        if statistics.values.get("describer") == "llm":
            report["requests"] = sum(s.get("requests", 0) for s in summaries)
            report["tokens"] = sum(s.get("tokens", 0) for s in summaries)
            report["cached"] = sum(s.get("cached", 0) for s in summaries)
            messages = [s["budget_message"] for s in summaries if s.get("budget_message")]
            if messages:
                p = self.params
                limits = [f"max_requests={p.max_requests}"] if p.max_requests is not None else []
                if p.max_tokens_budget is not None:
                    limits.append(f"max_tokens_budget={p.max_tokens_budget}")
                report["budget"] = (
                    f"budget exhausted ({', '.join(limits)}): "
                    f"{status.get('budget', 0)} descriptions were not requested "
                    "(status 'budget'); re-run the same command to continue"
                )
            if status.get("failed"):
                report["failed"] = (
                    f"{status['failed']} descriptions failed after retries (see "
                    "description_error); re-run with --retry-failed to ask only for those"
                )
        return report

    def _ask_llm(
        self, facts: list[dict[str, Any]], values: dict[str, Any]
    ) -> tuple[list[list[str] | None], list[str], list[str | None]]:
        p = self.params
        template = PromptTemplate(values["prompt_text"])
        requests = [
            llm.Request(
                "chat",
                {
                    "model": p.model,
                    "messages": template.messages(fact, p.n, p.per),
                    "temperature": p.temperature,
                    "max_tokens": p.max_tokens,
                },
                parse=_descriptions_parser(p.n),
            )
            for fact in facts
        ]
        first = str(facts[0]["episode_id"]) if facts else None
        share = values.get("budgets", {}).get(first, {})
        budget = llm.Budget(
            max_requests=share.get("requests", p.max_requests),
            max_tokens=share.get("tokens", p.max_tokens_budget),
        )
        if "requests" in share:
            budget.requests_note = (
                f"max_requests={p.max_requests} for the job, {share['requests']} for this part"
            )
        if "tokens" in share:
            budget.tokens_note = (
                f"max_tokens_budget={p.max_tokens_budget} for the job, "
                f"{share['tokens']} for this part"
            )
        settings = llm.Settings(
            base_url=values.get("base_url"),
            concurrency=p.concurrency,
            timeout=p.timeout,
            max_retries=p.max_retries,
            retry_failed=p.retry_failed,
        )
        results, summary = llm.run_requests(requests, settings, llm.ResponseCache(p.cache), budget)
        self._last_run.update(
            requests=summary.requests,
            tokens=summary.tokens,
            cached=summary.cached,
            budget_message=summary.budget_message,
        )
        if summary.budget_stopped:
            log.warning(
                "language: %s; %d of %d descriptions not requested (status 'budget'); "
                "re-run the same job to continue where it stopped",
                summary.budget_message,
                summary.budget_stopped,
                len(requests),
            )
        texts = [r.answer if r.status == "ok" else None for r in results]
        return texts, [r.status for r in results], [r.error for r in results]


# ---------------------------------------------------------------- facts
def _units(steps: pa.Table, per: str, segment: int) -> dict[str, np.ndarray]:
    """Where each unit (episode or segment) starts and ends in the step table, and its return."""
    episode_ids = steps.column(cols.EPISODE_ID).to_numpy()
    bounds = episode_boundaries(episode_ids)
    lengths = np.diff(bounds)
    total = len(episode_ids)
    if per == "episode":
        starts = bounds[:-1]
        segment_index = np.zeros(len(starts), dtype=np.int32)
    else:
        position = np.arange(total) - np.repeat(bounds[:-1], lengths)
        starts = np.flatnonzero(position % segment == 0)
        segment_index = (position[starts] // segment).astype(np.int32)
    ends = np.append(starts[1:], total).astype(np.int64)
    reward = steps.column(cols.REWARD).to_numpy().astype(np.float64)
    unit_return = np.add.reduceat(reward, starts) if len(starts) else np.zeros(0)
    return {
        "start": starts.astype(np.int64),
        "end": ends,
        "length": ends - starts,
        "episode_id": episode_ids[starts] if len(starts) else episode_ids[:0],
        "segment": segment_index,
        "episode_end": np.isin(ends, bounds[1:]),
        "return": unit_return,
    }


def unit_facts(
    steps: pa.Table,
    episodes: pa.Table,
    units: dict[str, np.ndarray],
    return_quantiles: list[float],
    params: LanguageParams,
) -> list[dict[str, Any]]:
    """The factual summary of every unit, as small JSON-able dicts (vectorized per column)."""
    starts, ends, lengths = units["start"], units["end"], units["length"]
    count = len(starts)
    if count == 0:
        return []
    last = ends - 1
    reward = steps.column(cols.REWARD).to_numpy().astype(np.float64)
    terminated = steps.column(cols.TERMINATED).to_numpy(zero_copy_only=False)[last]
    truncated = steps.column(cols.TRUNCATED).to_numpy(zero_copy_only=False)[last]
    percentile = np.interp(units["return"], return_quantiles, np.linspace(0, 100, 101))

    # Episode-level values, looked up by id (the episode table is the part's episodes).
    episode_ids = episodes.column(cols.EPISODE_ID).to_numpy()
    order = np.argsort(episode_ids, kind="stable")
    row = order[np.searchsorted(episode_ids, units["episode_id"], sorter=order)]
    if not np.array_equal(episode_ids[row], units["episode_id"]):
        missing = sorted(set(units["episode_id"].tolist()) - set(episode_ids.tolist()))[:5]
        raise RelabelError(
            f"language: episodes {missing} have steps but no row in the episodes table"
        )

    def episode_column(name: str) -> list[Any] | None:
        if name not in episodes.column_names:
            return None
        return episodes.column(name).take(pa.array(row)).to_pylist()

    env_id = episode_column(cols.ENV_ID)
    source = episode_column(cols.SOURCE)
    skill = episode_column("skill")
    if skill is None and "skill" in steps.column_names:
        skill = steps.column("skill").take(pa.array(starts)).to_pylist()

    goal_reached, goal_distance = _goal(steps, episodes, row, last, units, params)
    action = _action_stats(steps.column(cols.ACTION), starts, lengths)
    displacement = _displacement(steps.column(cols.OBSERVATION), starts, last)
    reward_min = np.minimum.reduceat(reward, starts)
    reward_max = np.maximum.reduceat(reward, starts)

    facts = []
    for i in range(count):
        ended = units["episode_end"][i]
        outcome = (
            "terminated"
            if ended and terminated[i]
            else "truncated"
            if ended and truncated[i]
            else "ended"
            if ended
            else "continues"
        )
        fact: dict[str, Any] = {"env_id": env_id[i] if env_id else None}
        if source and source[i] is not None:
            fact["source"] = source[i]
        fact["episode_id"] = int(units["episode_id"][i])
        if params.per == "segment":
            fact["segment"] = int(units["segment"][i])
            fact["first_step"] = int(units["segment"][i]) * params.segment
        fact.update(
            length=int(lengths[i]),
            **{"return": _round(units["return"][i])},
            return_percentile=int(round(float(percentile[i]))),
            outcome=outcome,
        )
        if goal_reached is not None:
            fact["goal_reached"] = bool(goal_reached[i])
        if goal_distance is not None:
            fact["final_goal_distance"] = _round(goal_distance[i])
        if skill is not None and skill[i] is not None:
            fact["skill"] = skill[i]
        fact["reward_min"] = _round(reward_min[i])
        fact["reward_max"] = _round(reward_max[i])
        fact["action"] = {k: v[i] for k, v in action.items()}
        if displacement is not None:
            fact["state_displacement"] = _round(displacement[i])
        facts.append(fact)
    return facts


def _goal(
    steps: pa.Table,
    episodes: pa.Table,
    row: np.ndarray,
    last: np.ndarray,
    units: dict[str, np.ndarray],
    params: LanguageParams,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Goal reached (and the final distance) from a success column or a GoalEnv observation."""
    reached = distance = None
    observation = steps.column(cols.OBSERVATION)
    if pa.types.is_struct(observation.type):
        names = {observation.type.field(i).name for i in range(observation.type.num_fields)}
        if {"achieved_goal", "desired_goal"} <= names:
            achieved = cols.struct_to_numpy(observation, "achieved_goal")[last]
            desired = cols.struct_to_numpy(observation, "desired_goal")[last]
            difference = np.asarray(achieved, float) - np.asarray(desired, float)
            distance = np.linalg.norm(difference.reshape(len(last), -1), axis=1)
            reached = distance <= params.goal_threshold
    for name in SUCCESS_COLUMNS:
        if name in steps.column_names:
            reached = arrow_to_numpy(steps.column(name))[last].astype(bool)
            break
        if name in episodes.column_names and params.per == "episode":
            reached = arrow_to_numpy(episodes.column(name))[row].astype(bool)
            break
    return reached, distance


def _action_stats(column: pa.ChunkedArray, starts: np.ndarray, lengths: np.ndarray) -> dict:
    """Discrete actions: the most common one and its share; continuous: mean |a| and std."""
    values = arrow_to_numpy(column)
    unit_of_step = np.repeat(np.arange(len(starts)), lengths)
    if values.ndim == 1 and np.issubdtype(values.dtype, np.integer):
        codes, index = np.unique(values, return_inverse=True)
        counts = np.bincount(unit_of_step * len(codes) + index, minlength=len(starts) * len(codes))
        counts = counts.reshape(len(starts), len(codes))
        top = counts.argmax(axis=1)
        share = counts.max(axis=1) / lengths
        return {
            "most_common": [int(codes[k]) for k in top],
            "most_common_share": [_round(s) for s in share],
        }
    values = np.asarray(values, np.float64).reshape(len(values), -1)
    mean = np.add.reduceat(values, starts, axis=0) / lengths[:, None]
    mean_square = np.add.reduceat(values**2, starts, axis=0) / lengths[:, None]
    std = np.sqrt(np.maximum(mean_square - mean**2, 0.0)).mean(axis=1)
    mean_abs = np.add.reduceat(np.abs(values), starts, axis=0).mean(axis=1) / lengths
    return {"mean_abs": [_round(x) for x in mean_abs], "std": [_round(x) for x in std]}


def _displacement(
    column: pa.ChunkedArray, starts: np.ndarray, last: np.ndarray
) -> np.ndarray | None:
    """Distance between the first and last state of each unit (the plain state vector)."""
    if pa.types.is_struct(column.type):
        if column.type.get_field_index("observation") < 0:
            return None
        values = cols.struct_to_numpy(column, "observation")
    else:
        values = arrow_to_numpy(column)
    if not np.issubdtype(values.dtype, np.number):
        return None
    values = values.reshape(len(values), -1)
    return np.linalg.norm(values[last].astype(float) - values[starts].astype(float), axis=1)


def _round(value: Any) -> float:
    return float(f"{float(value):.4g}")


def _id_range(steps: pa.Table) -> str:
    if steps.num_rows == 0:
        return "(none)"
    ids = steps.column(cols.EPISODE_ID)
    return f"{pc.min(ids).as_py()}..{pc.max(ids).as_py()}"


def _merge_quantiles(summaries: list[dict[str, Any]]) -> list[float]:
    """The 101-point return quantile grid of the whole dataset from every part's summary.

    A part's returns are exact (weight 1 each) or a quantile grid standing for `units`
    returns (weight units / points each); a weighted quantile merges both kinds.
    """
    values, weights = [], []
    for summary in summaries:
        returns = np.asarray(summary["unit_returns"], float)
        if len(returns):
            values.append(returns)
            weights.append(np.full(len(returns), summary.get("units", len(returns)) / len(returns)))
    if not values:
        return [0.0] * 101
    order = np.argsort(np.concatenate(values), kind="stable")
    sorted_values = np.concatenate(values)[order]
    cumulative = np.cumsum(np.concatenate(weights)[order])
    # Position of each value as a fraction of the whole, as np.quantile's linear method does.
    position = (cumulative - cumulative[0]) / max(cumulative[-1] - cumulative[0], 1e-12)
    return np.interp(np.linspace(0, 1, 101), position, sorted_values).tolist()


def _split_budget(p: LanguageParams, summaries: list[dict[str, Any]]) -> dict[str, dict]:
    """The job's request/token budget split over parts in proportion to their units.

    Parts run in parallel Ray tasks, so each gets a fixed share; keyed by the part's first
    episode id, which `relabel` sees too. The shares add up to the job's budget.
    """
    units = np.array([s.get("units", len(s["unit_returns"])) for s in summaries], dtype=np.int64)
    total = max(int(units.sum()), 1)
    shares: dict[str, dict[str, int]] = {}
    for key, limit in (("requests", p.max_requests), ("tokens", p.max_tokens_budget)):
        if limit is None:
            continue
        part = limit * units // total
        part[: limit - int(part.sum())] += 1  # the remainder to the first parts
        for summary, amount in zip(summaries, part):
            if summary["first_episode"] is not None:
                shares.setdefault(str(summary["first_episode"]), {})[key] = int(amount)
    return shares


def _public_url(url: str | None) -> str | None:
    """A base URL without user info or query, safe for a manifest."""
    if not url:
        return None
    parts = urlsplit(url)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


# ---------------------------------------------------------------- prompt
def _read_prompt(path: Path) -> str:
    try:
        text = path.read_text()
    except OSError as error:
        raise RelabelError(f"language: cannot read prompt template {path}: {error}") from None
    PromptTemplate(text, str(path))  # validate now, in the driver, before any part runs
    return text


class PromptTemplate:
    """`[system]` / `[user]` sections with $n, $unit and $facts; `#` lines are comments."""

    def __init__(self, text: str, origin: str = "prompt"):
        sections: dict[str, list[str]] = {}
        current: list[str] | None = None
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            if line.strip() in ("[system]", "[user]"):
                current = sections.setdefault(line.strip()[1:-1], [])
                continue
            if current is not None:
                current.append(line)
        if "user" not in sections or "$facts" not in "\n".join(sections["user"]):
            raise RelabelError(
                f"language: prompt template {origin} needs a [user] section containing $facts"
            )
        self.sections = {k: string.Template("\n".join(v).strip()) for k, v in sections.items()}
        try:
            self.messages({"episode_id": 0}, 1, "episode")
        except (KeyError, ValueError) as error:
            raise RelabelError(
                f"language: prompt template {origin}: unknown placeholder {error}; "
                "available: $n, $unit, $facts"
            ) from None

    def messages(self, facts: dict[str, Any], n: int, unit: str) -> list[dict[str, str]]:
        values = {"n": str(n), "unit": unit, "facts": quote_facts(facts)}
        return [
            {"role": role, "content": template.substitute(values)}
            for role, template in self.sections.items()
        ]


def quote_facts(facts: dict[str, Any]) -> str:
    """Facts as JSON that cannot break out of its <data> block: < > & are escaped."""
    text = json.dumps(facts, ensure_ascii=False, sort_keys=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _descriptions_parser(n: int):
    def parse(response: Any) -> list[str]:
        text = llm.chat_text(response).strip()
        if text.startswith("```"):  # a code fence despite the instructions
            text = text.strip("`").removeprefix("json").strip()
        try:
            answer = json.loads(text)
        except json.JSONDecodeError:
            raise llm.InvalidAnswer(f"not JSON: {text[:80]!r}") from None
        if isinstance(answer, dict):
            answer = answer.get("descriptions")
        if not isinstance(answer, list):
            raise llm.InvalidAnswer('expected {"descriptions": [...]}')
        found = [" ".join(str(a).split())[:500] for a in answer if str(a).strip()]
        if len(found) < n:
            raise llm.InvalidAnswer(f"asked for {n} descriptions, got {len(found)}")
        return found[:n]

    return parse


# ---------------------------------------------------------------- offline describer
_QUALITY = (
    (10, "a very poor"),
    (30, "a poor"),
    (45, "a below-average"),
    (60, "an average"),
    (80, "a good"),
    (95, "a strong"),
    (101, "a top"),
)
_OUTCOME = {
    "terminated": ("reached a terminal state", "ended in a terminal state", "was terminated"),
    "truncated": ("was cut off at the time limit", "ran until the time limit", "was truncated"),
    "ended": ("ended", "came to an end", "finished"),
    "continues": ("kept going", "carried on", "was still running"),
}
_TEMPLATES = (
    "{Quality} {unit} in {env}: {length} steps, return {ret} ({pct} percentile); it {outcome}{goal}.",
    "In {env}, the agent {outcome} after {length} steps with a return of {ret}, {quality} {unit}{goal}.",
    "{Length}-step {unit} of {env} that {outcome}; its return of {ret} is at the {pct} percentile{goal}.",
    "The agent scored {ret} over {length} steps in {env} ({quality} {unit}) and {outcome}{goal}.",
    "{Quality} {unit}: return {ret} in {length} steps of {env}, better than {better}% of the data; it {outcome}{goal}.",
    "Over {length} steps of {env} the agent collected {ret} in reward, {quality} result, and {outcome}{goal}.",
)
_GOAL = {
    True: (", reaching the goal", ", and got to the goal", " with the goal reached"),
    False: (", never reaching the goal", ", and missed the goal", " without reaching the goal"),
}


def template_descriptions(facts: list[dict[str, Any]], seed: int, n: int) -> list[list[str]]:
    """Deterministic, varied sentences from the facts: choices come from `hash_uniform` of
    (seed, episode id, segment), so they never depend on how episodes are partitioned."""
    if not facts:
        return []
    ids = np.array([f["episode_id"] for f in facts], dtype=np.int64)
    segments = np.array([f.get("segment", 0) for f in facts], dtype=np.int64)
    first = (hash_uniform(seed, ids, segments, stream=0) * len(_TEMPLATES)).astype(int)
    words = [hash_uniform(seed, ids, segments, stream=1 + k) for k in range(n)]
    out = []
    for i, fact in enumerate(facts):
        sentences = []
        for k in range(n):
            pick = int(words[k][i] * 3)
            template = _TEMPLATES[(first[i] + k) % len(_TEMPLATES)]
            sentences.append(_fill(template, fact, pick))
        out.append(sentences)
    return out


def _fill(template: str, fact: dict[str, Any], pick: int) -> str:
    pct = int(fact["return_percentile"])
    quality = next(words for limit, words in _QUALITY if pct < limit)
    unit = "segment" if "segment" in fact else "episode"
    goal = ""
    if "goal_reached" in fact:
        goal = _GOAL[bool(fact["goal_reached"])][pick]
        if not fact["goal_reached"] and "final_goal_distance" in fact:
            goal += f" (final distance {fact['final_goal_distance']:g})"
    sentence = template.format(
        Quality=quality[0].upper() + quality[1:],
        quality=quality,
        unit=unit,
        env=fact.get("env_id") or "the environment",
        length=fact["length"],
        Length=fact["length"],
        ret=f"{fact['return']:.4g}",
        pct=_ordinal(pct),
        better=pct,
        outcome=_OUTCOME[fact["outcome"]][pick],
        goal=goal,
    )
    extras = []
    if fact.get("skill") is not None:
        extras.append(f"Skill level: {fact['skill']}.")
    action = fact.get("action", {})
    if "most_common" in action:
        extras.append(
            f"It mostly chose action {action['most_common']} "
            f"({round(100 * action['most_common_share'])}% of steps)."
        )
    elif "mean_abs" in action:
        strength = (
            "gentle"
            if action["mean_abs"] < 0.25
            else ("moderate" if action["mean_abs"] < 0.6 else "forceful")
        )
        extras.append(f"Its actions were {strength} (mean |a| {action['mean_abs']:g}).")
    return " ".join([sentence, *extras[: 1 + pick % 2]])


def _ordinal(value: int) -> str:
    suffix = "th" if 10 <= value % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(value % 10, "th")
    return f"{value}{suffix}"
