"""The prompt: versioned templates (package data in prompts/), quoting the facts as data, and
parsing the model's answer.

A template has `[system]` and `[user]` sections; `$facts` (in the user message) becomes the
unit's facts as JSON inside `<data>...</data>`, with `<`, `>` and `&` escaped so that no
value can close the block: whatever a value says, the model sees it as data, never as
instructions. The answer must be JSON, `{"descriptions": [...]}`; anything else is an
`llm.InvalidAnswer`, which is retried.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relabelers import llm
from relabelers.base import RelabelError

PROMPTS = Path(__file__).parent / "prompts"
DEFAULT_PROMPT = PROMPTS / "describe_v1.txt"


def read_prompt(path: Path) -> str:
    """The template's text, checked (sections, placeholders): a bad template fails in the
    driver, before any part runs."""
    try:
        text = path.read_text()
    except OSError as error:
        raise RelabelError(f"language: cannot read prompt template {path}: {error}") from None
    PromptTemplate(text, str(path))
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


def descriptions_parser(n: int) -> Callable[[Any], list[str]]:
    """A parser of answers holding `n` descriptions (more are cut, fewer are invalid)."""

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
