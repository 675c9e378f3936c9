"""Describers: from the facts of each unit to `n` sentences.

- `template_descriptions`: offline and deterministic; varied sentences from the facts, the
  choices drawn with `hash_uniform` of (seed, episode id, segment), so they never depend on
  how episodes are split into parts.
- `LLMDescriber`: an OpenAI-compatible chat model writes them from the prompt template,
  through relabelers/llm.py (concurrency, retries, budget, cache). The job's request and
  token budgets are split over parts in proportion to their units (`split_budget`), since
  parts run in parallel: part `i` spends at most its share.

Each returns, per unit: the sentences (None when there are none), a status (ok, failed,
budget) and the reason for a status other than ok.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from relabelers import llm
from relabelers.base import Part, hash_uniform
from relabelers.language.keyframes import KEYFRAMES_NOTE, with_images
from relabelers.language.params import LanguageParams
from relabelers.language.prompt import PromptTemplate, descriptions_parser

log = logging.getLogger("hindsight.language")

Descriptions = tuple[list[list[str] | None], list[str], list[str | None]]


# ---------------------------------------------------------------- the LLM describer
@dataclass(frozen=True)
class LLMDescriber:
    """Asks the model for every unit of a part; `budgets[i]` is part i's share of the job's
    budget (`split_budget`), `prompt_text` the checked template."""

    params: LanguageParams
    prompt_text: str
    base_url: str | None
    budgets: tuple[dict[str, int], ...] = ()

    def describe(
        self,
        facts: list[dict[str, Any]],
        part: Part,
        images: list[list[tuple[str, bytes]]] | None = None,
    ) -> tuple[Descriptions, dict]:
        """The descriptions of every unit, and what it cost: requests, tokens, answers
        from the cache, and why the budget stopped it (or None). `images[i]`: unit i's
        keyframes (media type, stored bytes), sent as image parts of its request; the
        request body holds them, so the cache key does too."""
        p = self.params
        template = PromptTemplate(self.prompt_text)
        note = KEYFRAMES_NOTE.format(unit=p.per, camera=p.camera)
        requests = []
        for i, fact in enumerate(facts):
            messages = template.messages(fact, p.n, p.per)
            if images is not None:
                messages = with_images(messages, images[i], note, p.detail)
            body = {
                "model": p.model,
                "messages": messages,
                "temperature": p.temperature,
                "max_tokens": p.max_tokens,
            }
            requests.append(llm.Request("chat", body, parse=descriptions_parser(p.n)))
        results, summary = llm.run_requests(
            requests, self._settings(), llm.ResponseCache(p.cache), self._budget(part)
        )
        if summary.budget_stopped:
            log.warning(
                "language: %s; %d of %d descriptions not requested (status 'budget'); "
                "re-run the same job to continue where it stopped",
                summary.budget_message,
                summary.budget_stopped,
                len(requests),
            )
        usage = {
            "requests": summary.requests,
            "tokens": summary.tokens,
            "cached": summary.cached,
            "budget_message": summary.budget_message,
        }
        texts = [r.answer if r.status == "ok" else None for r in results]
        return (texts, [r.status for r in results], [r.error for r in results]), usage

    def _settings(self) -> llm.Settings:
        p = self.params
        return llm.Settings(
            base_url=self.base_url,
            concurrency=p.concurrency,
            timeout=p.timeout,
            max_retries=p.max_retries,
            retry_failed=p.retry_failed,
        )

    def _budget(self, part: Part) -> llm.Budget:
        """This part's share of the job's budget; the message names both when split."""
        p = self.params
        share = self.budgets[part.index] if part.index < len(self.budgets) else {}
        budget = llm.Budget(
            max_requests=share.get("requests", p.max_requests),
            max_tokens=share.get("tokens", p.max_tokens_budget),
        )
        if len(self.budgets) > 1 and "requests" in share:
            budget.requests_note = (
                f"max_requests={p.max_requests} for the job, {share['requests']} for this part"
            )
        if len(self.budgets) > 1 and "tokens" in share:
            budget.tokens_note = (
                f"max_tokens_budget={p.max_tokens_budget} for the job, "
                f"{share['tokens']} for this part"
            )
        return budget


def split_budget(params: LanguageParams, units: list[int]) -> tuple[dict[str, int], ...]:
    """The job's request/token budget split over parts in proportion to their units
    (`units[i]`: part i's), as `{"requests": r, "tokens": t}` per part (only the limits
    that are set). The shares add up to the job's budget; parts without units get none."""
    counts = np.asarray(units, dtype=np.int64)
    total = max(int(counts.sum()), 1)
    shares: list[dict[str, int]] = [{} for _ in counts]
    for key, limit in (("requests", params.max_requests), ("tokens", params.max_tokens_budget)):
        if limit is None:
            continue
        amounts = limit * counts // total
        # The remainder, one each, to the first parts that have units.
        with_units = np.flatnonzero(counts > 0)[: limit - int(amounts.sum())]
        amounts[with_units] += 1
        for share, amount in zip(shares, amounts):
            share[key] = int(amount)
    return tuple(shares)


# ---------------------------------------------------------------- the offline describer
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
# For units whose rewards are unknown (a dataset ingested without rewards): no return.
_TEMPLATES_NO_REWARD = (
    "{Unit} in {env}: {length} steps; it {outcome}{goal}.",
    "In {env}, the agent {outcome} after {length} steps{goal}.",
    "{Length}-step {unit} of {env} that {outcome}{goal}.",
    "Over {length} steps of {env} the agent {outcome}{goal}.",
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
            templates = _TEMPLATES if "return" in fact else _TEMPLATES_NO_REWARD
            template = templates[(first[i] + k) % len(templates)]
            sentences.append(_fill(template, fact, pick))
        out.append(sentences)
    return out


def _fill(template: str, fact: dict[str, Any], pick: int) -> str:
    pct = int(fact.get("return_percentile", 50))  # unused by the templates without return
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
        Unit=unit.capitalize(),
        env=fact.get("env_id") or "the environment",
        length=fact["length"],
        Length=fact["length"],
        ret=f"{fact.get('return', float('nan')):.4g}",
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
