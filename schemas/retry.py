"""The one retry policy, shared by every floor (tenacity).

Transient failures (a dropped S3 connection mid-read, an LLM server's 429 or 5xx, a
timeout) are retried the same way everywhere: at most `ATTEMPTS` tries, waiting
exponentially from 0.5 s to at most 8 s with jitter between tries. Callers say what is
transient; everything else fails at once. S3 requests themselves are also retried inside
pyarrow's S3 client (AWS's standard retry strategy, engine/storage.py).
"""

from __future__ import annotations

from collections.abc import Callable

import tenacity

ATTEMPTS = 5
FIRST_WAIT_S = 0.5
LONGEST_WAIT_S = 8.0


def wait_policy() -> tenacity.wait.wait_base:
    return tenacity.wait_exponential_jitter(initial=FIRST_WAIT_S, max=LONGEST_WAIT_S)


def retrying(
    is_transient: Callable[[BaseException], bool], attempts: int = ATTEMPTS
) -> tenacity.Retrying:
    """`for attempt in retrying(is_transient): with attempt: ...`, or `retrying(...)(f, *a)`;
    the last error is raised as itself once the attempts are spent."""
    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=wait_policy(),
        retry=tenacity.retry_if_exception(is_transient),
        reraise=True,
    )
