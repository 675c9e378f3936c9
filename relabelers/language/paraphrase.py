"""Paraphrases: `language:source=instruction,paraphrases=3` rewrites each text of a column.

    hindsight relabel IN OUT --with instructions --with language:source=instruction,paraphrases=3

Writes `<source>_paraphrases` (list<string>: the text first, then `paraphrases` rewrites;
null where the text is null) at each level named by `at` (both, episodes or steps).
Work is done once per distinct text of the whole dataset (a BabyAI dataset has a few dozen):
`setup` gathers them in one pass and rewrites them in the driver, then each part maps its
rows onto them with Arrow (`pc.index_in` + `take`).

- With an endpoint, the chat model rewrites each text (one request per distinct text,
  through relabelers/llm.py: cached, retried, budgeted) from prompts/paraphrase_v1.txt.
  An answer that drops or changes a colour or object word of the text (`KEPT_WORDS`) is
  invalid and asked again: held-out colour words must never leak into training.
- Offline, `offline_paraphrases` rewrites with a small table of verb synonyms and
  word-order templates, keeping colours and objects as they are; the choice is seeded by
  (seed, text), so the same text always gets the same rewrites.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from relabelers import endpoint, llm
from relabelers.base import RelabelError
from relabelers.language.params import LanguageParams
from relabelers.language.prompt import PromptTemplate

# Verb phrases and their synonyms, with the form that takes "it" ("pick it up").
VERBS: dict[str, tuple[tuple[str, str], ...]] = {
    "go to": (
        ("go to", "go to it"),
        ("walk to", "walk to it"),
        ("head to", "head to it"),
        ("move to", "move to it"),
        ("navigate to", "navigate to it"),
        ("get to", "get to it"),
        ("go over to", "go over to it"),
    ),
    "pick up": (
        ("pick up", "pick it up"),
        ("grab", "grab it"),
        ("take", "take it"),
        ("lift", "lift it"),
        ("collect", "collect it"),
        ("fetch", "fetch it"),
    ),
    "open": (("open", "open it"), ("unlatch", "unlatch it"), ("swing open", "swing it open")),
}
# Word orders for "<verb> the <color> <type>"; {it}: the verb's form with "it".
OBJECT_TEMPLATES = (
    "{verb} {np}",
    "{np}: {it}",
    "{verb} the {type} that is {color}",
    "find {np} and {it}",
    "your task is to {verb} {np}",
    "{verb} {np}, please",
)
# For any other text: the text itself in a few frames (verbs swapped when known).
GENERIC_TEMPLATES = (
    "{text}",
    "please {text}",
    "{text}, please",
    "your task: {text}",
    "try to {text}",
)
_INSTRUCTION = re.compile(
    r"^(?P<verb>" + "|".join(VERBS) + r") (?P<np>(?:the|a) (?:(?P<color>\w+) )?(?P<type>\w+))$"
)
# Words a paraphrase must keep exactly (MiniGrid's colours and objects).
KEPT_WORDS = frozenset(
    ("red", "green", "blue", "purple", "yellow", "grey", "key", "ball", "box", "door", "wall")
)


def offline_paraphrases(text: str, n: int, seed: int = 0) -> list[str]:
    """`n` rewrites of `text` (never the text itself, distinct while candidates last, then
    repeated), chosen by a generator seeded with (seed, text)."""
    text = " ".join(text.split())
    candidates = [c for c in dict.fromkeys(candidate_rewrites(text)) if c.lower() != text.lower()]
    if not candidates:
        candidates = [f"{text} ."]
    digest = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    order = np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(len(candidates))
    return [candidates[order[i % len(candidates)]] for i in range(n)]


def candidate_rewrites(text: str) -> list[str]:
    """Every rewrite the tables allow: for an instruction in BabyAI's grammar, each verb
    synonym in each word order; else each verb synonym in place, in each generic frame."""
    match = _INSTRUCTION.match(text.lower())
    if match:
        out = []
        for verb, it in VERBS[match["verb"]]:
            for template in OBJECT_TEMPLATES:
                if "{color}" in template and not match["color"]:
                    continue
                out.append(
                    template.format(
                        verb=verb, it=it, np=match["np"], type=match["type"], color=match["color"]
                    )
                )
        return out
    variants = [text]
    for phrase, synonyms in VERBS.items():
        pattern = re.compile(rf"\b{phrase}\b")
        if pattern.search(text):
            variants += [pattern.sub(verb, text) for verb, _ in synonyms[1:]]
    return [template.format(text=v) for template in GENERIC_TEMPLATES for v in variants]


def kept_words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower())) & KEPT_WORDS


def paraphrases_parser(text: str, n: int) -> Callable[[Any], list[str]]:
    """Parses `{"paraphrases": [...]}`, keeping rewrites that keep the text's colour and
    object words and bring in no other; fewer than `n` of them is an invalid answer."""
    keep = kept_words(text)

    def parse(response: Any) -> list[str]:
        answer_text = llm.chat_text(response).strip()
        if answer_text.startswith("```"):
            answer_text = answer_text.strip("`").removeprefix("json").strip()
        try:
            answer = json.loads(answer_text)
        except json.JSONDecodeError:
            raise llm.InvalidAnswer(f"not JSON: {answer_text[:80]!r}") from None
        answer = answer.get("paraphrases") if isinstance(answer, dict) else None
        if not isinstance(answer, list):
            raise llm.InvalidAnswer('expected {"paraphrases": [...]}')
        found = [" ".join(str(a).split())[:300] for a in answer if str(a).strip()]
        valid = [a for a in dict.fromkeys(found) if a != text and kept_words(a) == keep]
        if len(valid) < n:
            raise llm.InvalidAnswer(
                f"asked for {n} paraphrases keeping {sorted(keep)}, got {len(valid)} that do"
            )
        return valid[:n]

    return parse


# ---------------------------------------------------------------- the relabeler's mode
@dataclass
class ParaphraseTable:
    """What `setup` decided: every distinct text and its list (text first, then rewrites)."""

    texts: list[str]
    lists: list[list[str]]
    report: dict[str, Any] = field(default_factory=dict)

    def column(self, values: pa.ChunkedArray | pa.Array, where: str) -> pa.Array:
        """The lists of `values`' texts, null where the text is null (Arrow, no loop)."""
        index = pc.index_in(values, value_set=pa.array(self.texts, pa.string()))
        missing = pc.sum(pc.and_(pc.is_null(index), pc.is_valid(values))).as_py()
        if missing:
            raise RelabelError(
                f"{where}: relabeler 'language': {missing} texts were not seen by setup's pass; "
                "the data changed while the job ran"
            )
        lists = pa.array(self.lists, pa.list_(pa.string()))
        index = index.combine_chunks() if isinstance(index, pa.ChunkedArray) else index
        return lists.take(index)


def levels(params: LanguageParams) -> tuple[str, ...]:
    return ("episodes", "steps") if params.at == "both" else (params.at,)


def output_column(params: LanguageParams) -> str:
    return f"{params.source}_paraphrases"


def check_source(params: LanguageParams, schemas: dict[str, pa.Schema]) -> None:
    """The source must be a string column at every level it is read from."""
    for level in levels(params):
        schema = schemas[level]
        name = params.source
        if name not in schema.names:
            raise RelabelError(
                f"language: source={name!r} is not a column of the {level} table (it has "
                f"{', '.join(schema.names)}); relabel with the relabeler that writes it "
                "first (--with instructions) or choose the level with at=episodes|steps"
            )
        kind = schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise RelabelError(f"language: source={name!r} is {kind} at {level}, not text")


def distinct_texts(params: LanguageParams, steps: pa.Table, episodes: pa.Table) -> list[str]:
    """One part's distinct non-null texts of the source, at every level it is read from."""
    tables = {"episodes": episodes, "steps": steps}
    found: set[str] = set()
    for level in levels(params):
        found.update(pc.unique(tables[level].column(params.source).drop_null()).to_pylist())
    return sorted(found)


def paraphrase_texts(
    params: LanguageParams, texts: list[str], seed: int, use_llm: bool, prompt_text: str
) -> ParaphraseTable:
    """Every distinct text with its rewrites: the model's (failures keep the text alone,
    counted in the report) or the offline rewriter's."""
    n = params.paraphrases
    report: dict[str, Any] = {
        "mode": "paraphrases",
        "source": params.source,
        "paraphrases": n,
        "distinct_texts": len(texts),
    }
    if not use_llm:
        report.update(paraphraser="offline", version=OFFLINE_VERSION)
        return ParaphraseTable(
            texts, [[t, *offline_paraphrases(t, n, seed)] for t in texts], report
        )
    template = PromptTemplate(prompt_text)
    base_url = endpoint.resolve_base_url(params.base_url)
    requests = []
    for text in texts:
        body = {
            "model": params.model,
            "messages": template.messages({"text": text}, n, params.source),
            "temperature": params.temperature,
            "max_tokens": params.max_tokens,
        }
        requests.append(llm.Request("chat", body, parse=paraphrases_parser(text, n)))
    settings = llm.Settings(
        base_url=base_url,
        concurrency=params.concurrency,
        timeout=params.timeout,
        max_retries=params.max_retries,
        retry_failed=params.retry_failed,
    )
    budget = llm.Budget(max_requests=params.max_requests, max_tokens=params.max_tokens_budget)
    results, summary = llm.run_requests(requests, settings, llm.ResponseCache(params.cache), budget)
    lists = [[t, *r.answer] if r.status == "ok" else [t] for t, r in zip(texts, results)]
    ok = sum(r.status == "ok" for r in results)
    report.update(
        paraphraser="llm",
        model=params.model,
        base_url=endpoint.endpoint_id(base_url),
        requests=summary.requests,
        tokens=summary.tokens,
        cached=summary.cached,
        texts_by_status={
            s: sum(r.status == s for r in results) for s in ("ok", "failed", "budget")
        },
    )
    if texts and not ok and summary.failed:  # over budget only: a re-run continues
        first = summary.first_error or summary.budget_message
        raise RelabelError(
            f"language: no paraphrase of {len(texts)} texts was written at "
            f"{endpoint.endpoint_id(base_url)} (model {params.model!r}); first error: {first}"
        )
    if ok < len(texts):
        report["incomplete"] = (
            f"{len(texts) - ok} texts kept without paraphrases (failed or over budget); "
            "re-run the same command to ask again (--retry-failed for those that failed)"
        )
    return ParaphraseTable(texts, lists, report)


# The offline rewriter's tables, as recorded in the report: bump when they change.
OFFLINE_VERSION = "paraphrase_offline_v1"
