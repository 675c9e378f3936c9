"""The small client layer under the `language` and `embed` relabelers.

One job: send many requests to an OpenAI-compatible endpoint fast, safely and only once.

- Bounded concurrency: an asyncio semaphore keeps `concurrency` requests in flight.
- Retries: 429, 5xx, 408/409, timeouts, connection resets and answers that are not JSON or
  empty are retried `max_retries` times with the project's one retry policy
  (schemas/retry.py: exponential backoff with jitter, through tenacity), waiting at least
  as long as a server's Retry-After asks. Other 4xx answers are not retried (a bad request
  stays bad); errors that retrying cannot fix (a bad key, an unknown model) stop the run
  with `LLMError`.
- Budget: `max_requests` / `max_tokens` per run; when spent, the remaining requests are not
  sent and come back with status "budget" and a clear message.
- Cache: one JSON file per answer, keyed by a hash of (endpoint, request kind, request
  body with the model), the endpoint in its public form (`endpoint_id`: the base URL without
  user, password or query), so answers and failures of one server are never served for
  another, while new credentials for the same server find its answers again. Written
  atomically, so a killed job resumes without repeating finished requests. Failures are never
  cached as answers; a small failure marker lets the next run skip (or, with retry_failed,
  redo) exactly the requests that failed. A connection that could not be made says nothing
  about the request, so it leaves no marker: the next run asks again.

The API key comes only from the environment (OPENAI_API_KEY); a base URL may carry
credentials too. None of them is stored, logged or put in a message: every message goes
through `redact`, every answer through `redact_answer` before it is cached or returned
(relabelers/endpoint.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, TypeVar

import tenacity
from pydantic import Field

from relabelers.base import Params, RelabelError
from relabelers.endpoint import (
    API_KEY_VARIABLE,
    client_options,
    endpoint_id,
    redact,
    redact_answer,
)
from schemas import retry

DEFAULT_CACHE = "~/.cache/hindsight/llm"
# Local servers (vLLM, llama.cpp, Ollama) ignore the key, but the client needs one.
NO_KEY = "no-key-set"

T = TypeVar("T")


class LLMError(RelabelError):
    """A configuration problem that retrying cannot fix (bad key, unknown model, bad URL)."""


class InvalidAnswer(ValueError):
    """The endpoint answered, but not with what the caller asked for: retried."""


def request_key(kind: str, body: dict[str, Any], endpoint: str) -> str:
    """The cache key: a hash of the endpoint (`endpoint_id`: without credentials), the
    request kind and the full request body (model included)."""
    canonical = json.dumps(
        {"endpoint": endpoint, "kind": kind, "body": body}, sort_keys=True, ensure_ascii=True
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------- cache
class ResponseCache:
    """Answers on local disk, one file per request: `<dir>/<key[:2]>/<key>.json`.

    Files are written to a temporary name and renamed, so a kill leaves either the whole
    answer or nothing. A failure leaves `<key>.failed` (the reason, never the answer).
    """

    def __init__(self, directory: str | os.PathLike[str] | None):
        self.directory = Path(os.path.expanduser(str(directory or DEFAULT_CACHE)))

    def _path(self, key: str, suffix: str) -> Path:
        return self.directory / key[:2] / f"{key}{suffix}"

    def get(self, key: str) -> Any | None:
        path = self._path(key, ".json")
        try:
            return json.loads(path.read_text())["answer"]
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, KeyError):
            return None  # a damaged entry is simply asked again

    def put(self, key: str, answer: Any, meta: dict[str, Any]) -> None:
        self._write(self._path(key, ".json"), {"answer": answer, **meta})
        self._path(key, ".failed").unlink(missing_ok=True)

    def failure(self, key: str) -> str | None:
        try:
            return json.loads(self._path(key, ".failed").read_text())["reason"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None

    def put_failure(self, key: str, reason: str) -> None:
        self._write(self._path(key, ".failed"), {"reason": redact(reason)})

    def _write(self, path: Path, payload: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(handle, "w") as file:
                json.dump(payload, file)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


# ---------------------------------------------------------------- budget
@dataclass
class Budget:
    """Requests and tokens one run may spend (None: unlimited). Retries count as requests.

    Tokens are known only once an answer arrives, so requests already in flight when the
    token budget runs out still finish (at most `concurrency` of them).
    """

    max_requests: int | None = None
    max_tokens: int | None = None
    requests: int = 0
    tokens: int = 0
    # How the limits read in messages, e.g. "max_requests=12 for the job, 5 for this part".
    requests_note: str | None = None
    tokens_note: str | None = None

    def take_request(self) -> str | None:
        """Count one request, or return why the budget does not allow it."""
        if self.max_requests is not None and self.requests >= self.max_requests:
            note = self.requests_note or f"max_requests={self.max_requests}"
            return f"request budget exhausted ({note})"
        if self.max_tokens is not None and self.tokens >= self.max_tokens:
            note = self.tokens_note or f"max_tokens_budget={self.max_tokens}"
            return f"token budget exhausted ({note})"
        self.requests += 1
        return None


class EndpointParams(Params):
    """The parameters of every relabeler that calls an OpenAI-compatible endpoint."""

    base_url: str | None = Field(
        None, description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"
    )
    timeout: float = Field(60.0, gt=0, description="seconds per request")
    max_retries: int = Field(
        retry.ATTEMPTS - 1, ge=0, description="retries per request (schemas/retry.py's backoff)"
    )
    cache: str | None = Field(None, description=f"answer cache directory ({DEFAULT_CACHE})")


# ---------------------------------------------------------------- requests
@dataclass(frozen=True)
class Settings:
    """How to talk to the endpoint; the key is not here (it is read from the environment)."""

    base_url: str | None = None
    concurrency: int = 16
    timeout: float = 60.0
    max_retries: int = retry.ATTEMPTS - 1
    retry_failed: bool = False


@dataclass
class Result:
    """What became of one request. status: ok, failed, budget."""

    status: str
    answer: Any = None
    error: str | None = None
    cached: bool = False
    requests: int = 0


@dataclass
class Request:
    """One call: `kind` is "chat" or "embeddings", `body` the JSON body (model included),
    `parse` turns the SDK's response into the answer to cache (raise InvalidAnswer to retry).
    Its cache key is `request_key` of these and the endpoint it is sent to."""

    kind: str
    body: dict[str, Any]
    parse: Callable[[Any], Any]
    store: bool = True  # False: the caller caches the answer itself (e.g. per text)


@dataclass
class RunSummary:
    requests: int = 0
    tokens: int = 0
    cached: int = 0
    failed: int = 0
    first_error: str | None = None  # of the first failed request, in request order
    budget_stopped: int = 0
    budget_message: str | None = None


def run_requests(
    requests: list[Request], settings: Settings, cache: ResponseCache, budget: Budget
) -> tuple[list[Result], RunSummary]:
    """Answer every request (cache first), in order; blocking, with its own event loop.
    Answers come back (and are cached) with the key and the URL's credentials redacted."""
    return run_sync(_run_all(requests, settings, cache, budget))


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, also from code that already runs inside an event loop (notebooks)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coroutine)
        except BaseException as error:  # re-raised in the caller's thread
            box["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


async def _run_all(
    requests: list[Request], settings: Settings, cache: ResponseCache, budget: Budget
) -> tuple[list[Result], RunSummary]:
    summary = RunSummary()
    endpoint = endpoint_id(settings.base_url)
    keys = [request_key(r.kind, r.body, endpoint) for r in requests]
    results: list[Result | None] = [None] * len(requests)
    pending: list[int] = []
    for index, request in enumerate(requests):
        if not request.store:
            pending.append(index)
            continue
        answer = cache.get(keys[index])
        if answer is not None:
            answer = redact_answer(answer, settings.base_url)
            results[index] = Result("ok", answer=answer, cached=True)
            summary.cached += 1
            continue
        reason = None if settings.retry_failed else cache.failure(keys[index])
        if reason is not None:
            results[index] = Result(
                "failed", error=f"{reason} (failed in an earlier run; use --retry-failed)"
            )
            continue
        pending.append(index)
    if pending:
        import openai

        client = openai.AsyncOpenAI(
            api_key=os.environ.get(API_KEY_VARIABLE) or NO_KEY,
            **client_options(settings.base_url),
            timeout=settings.timeout,
            max_retries=0,  # retries are ours: counted, budgeted, honouring Retry-After
        )
        semaphore = asyncio.Semaphore(max(1, settings.concurrency))
        try:
            answers = await asyncio.gather(
                *(
                    _one(client, requests[i], keys[i], settings, cache, budget, semaphore)
                    for i in pending
                )
            )
        finally:
            await client.close()
        for index, result in zip(pending, answers):
            results[index] = result
    for result in results:
        assert result is not None
        summary.failed += result.status == "failed"
        if result.status == "failed" and summary.first_error is None:
            summary.first_error = result.error
        if result.status == "budget":
            summary.budget_stopped += 1
            summary.budget_message = result.error
    summary.requests = budget.requests
    summary.tokens = budget.tokens
    return [r for r in results if r is not None], summary


class _Failure(Exception):
    """One attempt that failed: `transient` ones are tried again, after at least
    `retry_after` seconds when the server asked for that; a last one that is `remembered`
    leaves a failure marker in the cache."""

    def __init__(
        self,
        reason: str,
        transient: bool = True,
        retry_after: float | None = None,
        remembered: bool = True,
    ):
        super().__init__(reason)
        self.transient = transient
        self.retry_after = retry_after
        self.remembered = remembered


def _wait(policy: tenacity.wait.wait_base) -> Callable[[tenacity.RetryCallState], float]:
    """The shared backoff, or longer when the server's Retry-After asks for longer."""

    def wait(state: tenacity.RetryCallState) -> float:
        delay = policy(state)
        failure = state.outcome.exception() if state.outcome else None
        asked = getattr(failure, "retry_after", None)
        return max(delay, asked) if asked is not None else delay

    return wait


async def _one(
    client: Any,
    request: Request,
    key: str,
    settings: Settings,
    cache: ResponseCache,
    budget: Budget,
    semaphore: asyncio.Semaphore,
) -> Result:
    sent = 0

    async def attempt() -> Result:
        nonlocal sent
        async with semaphore:  # held while a request is in flight, never while waiting
            refusal = budget.take_request()
            if refusal is not None:
                return Result("budget", error=refusal, requests=sent)
            sent += 1
            answer = redact_answer(await _ask(client, request, settings, budget), settings.base_url)
        if request.store:
            meta = {
                "endpoint": endpoint_id(settings.base_url),
                "kind": request.kind,
                "model": request.body.get("model"),
            }
            cache.put(key, answer, meta)
        return Result("ok", answer=answer, requests=sent)

    retrying = tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(settings.max_retries + 1),
        wait=_wait(retry.wait_policy()),
        retry=tenacity.retry_if_exception(lambda e: isinstance(e, _Failure) and e.transient),
        reraise=True,
    )
    try:
        return await retrying(attempt)
    except _Failure as failure:
        reason = redact(f"{failure} (after {sent} attempts)", settings.base_url)
        if request.store and failure.remembered:
            cache.put_failure(key, reason)
        return Result("failed", error=reason, requests=sent)


async def _ask(client: Any, request: Request, settings: Settings, budget: Budget) -> Any:
    """One request and its parsed answer; `_Failure` says what went wrong and whether
    another attempt may help; LLMError when no attempt can (a bad key or model)."""
    import openai

    try:
        response = await _call(client, request)
        budget.tokens += _total_tokens(response)
        return request.parse(response)
    except openai.RateLimitError as failure:
        raise _Failure(
            f"HTTP 429 rate limited: {_body_excerpt(failure)}", retry_after=_retry_after(failure)
        ) from None
    except openai.APIStatusError as failure:
        if failure.status_code in (401, 403, 404):
            raise LLMError(
                redact(
                    f"the endpoint {endpoint_id(settings.base_url)} refused the request with "
                    f"HTTP {failure.status_code} ({_body_excerpt(failure)}); check "
                    f"{API_KEY_VARIABLE}, the base URL and the model name "
                    f"{request.body.get('model')!r}",
                    settings.base_url,
                )
            ) from None
        status = failure.status_code
        raise _Failure(
            f"HTTP {status}: {_body_excerpt(failure)}",
            transient=status >= 500 or status in (408, 409),  # a bad request stays bad
        ) from None
    except openai.APITimeoutError:
        raise _Failure(f"timed out after {settings.timeout:g} s") from None
    except openai.APIConnectionError as failure:
        # Nothing reached a server: not a fact about this request, so not remembered.
        raise _Failure(
            f"connection error: {type(failure.__cause__ or failure).__name__}", remembered=False
        ) from None
    except InvalidAnswer as failure:
        raise _Failure(f"invalid answer: {failure}") from None
    except (openai.APIResponseValidationError, json.JSONDecodeError, ValueError) as failure:
        raise _Failure(f"invalid answer: {type(failure).__name__}: {str(failure)[:200]}") from None


def _call(client: Any, request: Request) -> Awaitable[Any]:
    if request.kind == "chat":
        return client.chat.completions.create(**request.body)
    if request.kind == "embeddings":
        return client.embeddings.create(**request.body)
    raise ValueError(f"unknown request kind {request.kind!r}")


def _total_tokens(response: Any) -> int:
    usage = getattr(response, "usage", None)
    return int(getattr(usage, "total_tokens", 0) or 0) if usage is not None else 0


def _body_excerpt(failure: Any) -> str:
    body = getattr(failure, "body", None)
    if isinstance(body, dict):
        body = body.get("message", body)
    return redact(str(body if body is not None else failure)[:200])


def _retry_after(failure: Any) -> float | None:
    """Seconds the server asked us to wait (Retry-After: seconds or an HTTP date)."""
    response = getattr(failure, "response", None)
    if response is None:
        return None
    headers = response.headers
    if headers.get("retry-after-ms"):
        try:
            return min(float(headers["retry-after-ms"]) / 1000.0, 300.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return min(float(value), 300.0)
    except ValueError:
        pass
    try:
        import datetime

        moment = parsedate_to_datetime(value)
        now = datetime.datetime.now(moment.tzinfo)
        return max(0.0, min((moment - now).total_seconds(), 300.0))
    except (TypeError, ValueError):
        return None


def chat_text(response: Any) -> str:
    """The assistant's text; InvalidAnswer when the answer is not a chat completion or empty."""
    if isinstance(response, (str, bytes)):
        raise InvalidAnswer("the endpoint answered with something that is not JSON")
    choices = getattr(response, "choices", None) or []
    if not choices:
        raise InvalidAnswer("the answer has no choices")
    content = getattr(choices[0].message, "content", None)
    if not content or not content.strip():
        raise InvalidAnswer("the answer is empty")
    return content
