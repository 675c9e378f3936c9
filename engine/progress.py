"""Progress of long work: a bar on a terminal, a line every few seconds in a log.

Every long step (collect, ingest, relabel, shard, query --output, train, ask) reports
through `Progress`, so a user always sees a sign of life, a rate and an ETA. On a terminal
it is a tqdm bar (TQDM_DISABLE=1 hides it); anywhere else (a file, a pipe, a Ray job's
log) it is a plain line every `HINDSIGHT_PROGRESS_SECONDS` seconds (default 10; 0 turns the
lines off), because a bar's carriage returns make a log unreadable.
"""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType
from typing import TextIO

from tqdm import tqdm


def _interval() -> float:
    try:
        return float(os.environ.get("HINDSIGHT_PROGRESS_SECONDS", "10"))
    except ValueError:
        return 10.0


def format_count(value: float) -> str:
    """12,345 or 1.2M: short enough for a progress line."""
    if value >= 10_000_000:
        return f"{value / 1e6:.1f}M"
    return f"{value:,.0f}"


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """`with Progress("relabel returns", total=steps) as progress: progress.advance(n)`."""

    def __init__(
        self,
        description: str,
        total: float | None = None,
        unit: str = "steps",
        *,
        initial: float = 0,
        stream: TextIO | None = None,
    ):
        self.description = description
        self.total = total
        self.unit = unit
        self.done = float(initial)
        self.initial = float(initial)
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.monotonic()
        self.interval = _interval()
        self.last_line = self.started
        self.postfix = ""
        is_terminal = getattr(self.stream, "isatty", lambda: False)()
        self.bar = (
            tqdm(
                total=total,
                initial=initial,
                desc=description,
                unit=f" {unit}",
                unit_scale=True,
                file=self.stream,
                disable=None,
                dynamic_ncols=True,
            )
            if is_terminal
            else None
        )

    def advance(self, amount: float = 1) -> None:
        self.done += amount
        if self.bar is not None:
            self.bar.update(amount)
            return
        now = time.monotonic()
        if self.interval > 0 and now - self.last_line >= self.interval:
            self.last_line = now
            print(self.line(now), file=self.stream, flush=True)

    def set_postfix(self, text: str) -> None:
        """A short status after the counts (a loss, a failure count)."""
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def line(self, now: float | None = None) -> str:
        """`relabel returns: 45% 450,000/1,000,000 steps, 2.1M steps/s, 12s, ETA 15s`."""
        elapsed = (now if now is not None else time.monotonic()) - self.started
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        counts = f"{format_count(self.done)}"
        share = ""
        eta = ""
        if self.total:
            counts += f"/{format_count(self.total)}"
            share = f"{100 * self.done / self.total:.0f}% "
            if rate > 0:
                eta = f", ETA {format_seconds((self.total - self.done) / rate)}"
        text = (
            f"{self.description}: {share}{counts} {self.unit}, {format_count(rate)} {self.unit}/s, "
            f"{format_seconds(elapsed)}{eta}"
        )
        return f"{text}, {self.postfix}" if self.postfix else text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.interval > 0 and time.monotonic() - self.started >= self.interval:
            print(self.line(), file=self.stream, flush=True)  # how a long step ended

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        error_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
