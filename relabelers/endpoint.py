"""Where LLM requests go, and what of it may be shown.

The endpoint is a base URL (the `base_url` parameter, else OPENAI_BASE_URL, else OpenAI's
own); the key comes only from the environment (OPENAI_API_KEY). A base URL may carry
credentials as well: a user and password (`http://user:password@host/v1`, sent as basic
auth) or a query (`...?api-key=...`, sent with every request). None of them may be recorded,
printed or stored: `endpoint_id` is the endpoint as the manifest, messages and the answer
cache name it (no user, password or query), `redact` cleans a message and `redact_answer`
an answer (a model may repeat what it was sent).
"""

from __future__ import annotations

import os
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from schemas.manifest import public_text, public_url

API_KEY_VARIABLE = "OPENAI_API_KEY"
BASE_URL_VARIABLE = "OPENAI_BASE_URL"
# Where the openai client sends requests when no base URL is configured.
OPENAI_URL = "https://api.openai.com/v1"
REDACTED = "<redacted>"
# Shorter values are no secrets (vLLM's docs say OPENAI_API_KEY=EMPTY): replacing them
# would only mangle words of messages and answers.
MIN_SECRET_LENGTH = 8

T = TypeVar("T")


def endpoint_configured(base_url: str | None) -> bool:
    """An endpoint is configured by a base_url parameter or the OpenAI environment variables."""
    return bool(base_url or os.environ.get(API_KEY_VARIABLE) or os.environ.get(BASE_URL_VARIABLE))


def resolve_base_url(base_url: str | None) -> str | None:
    return base_url or os.environ.get(BASE_URL_VARIABLE) or None


def endpoint_id(base_url: str | None) -> str:
    """The endpoint requests go to, as recorded, printed and keyed: the base URL (the
    parameter, or OPENAI_BASE_URL) without user, password or query, or OpenAI's own."""
    url = resolve_base_url(base_url)
    return public_url(url).rstrip("/") if url else OPENAI_URL


def client_options(base_url: str | None) -> dict[str, Any]:
    """`base_url` and `default_query` for the openai client: a query in the base URL
    (`...?api-key=...`) is sent with every request, where the client would otherwise append
    the request's path after it. A user and password stay in the URL (sent as basic auth)."""
    url = resolve_base_url(base_url)
    if not url or "?" not in url:
        return {"base_url": url}
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    return {"base_url": urlunsplit(parts._replace(query="", fragment="")), "default_query": query}


def secrets(base_url: str | None = None) -> list[str]:
    """What must never be shown or stored: the API key of the environment, and the user,
    password and query values of the base URL (the parameter, or OPENAI_BASE_URL)."""
    found = [os.environ.get(API_KEY_VARIABLE) or ""]
    url = resolve_base_url(base_url)
    if url:
        try:
            parts = urlsplit(url)
            found += [unquote(parts.username or ""), unquote(parts.password or "")]
            found += [value for _, value in parse_qsl(parts.query)]
        except ValueError:
            pass
    # Longest first, so that a secret holding another is replaced whole.
    return sorted({s for s in found if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)


def redact(text: str, base_url: str | None = None) -> str:
    """`text` as it may be shown or stored: every URL in it without credentials, and the
    key and the base URL's credentials replaced, for every message that may be shown."""
    text = public_text(text)
    for secret in secrets(base_url):
        text = text.replace(secret, REDACTED)
    return text


def redact_answer(answer: T, base_url: str | None = None) -> T:
    """An answer with the key and the base URL's credentials replaced in every string of it
    (a model may repeat what it was sent), before it is cached or stored."""
    hidden = secrets(base_url)
    if not hidden:
        return answer

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            for secret in hidden:
                value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, list):
            if value and isinstance(value[0], (int, float)):
                return value  # a vector: no words in it
            return [clean(item) for item in value]
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        return value

    return clean(answer)
