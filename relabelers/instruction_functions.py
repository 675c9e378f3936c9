"""Hindsight instructions from a plugin function, for environments other than MiniGrid.

    hindsight relabel IN OUT --with instructions:function=my_pkg.labels:first_goal

The function takes one episode, `(steps, episode)`: `steps` a pa.Table of its steps sorted
by t (episode_id, t, the columns below that the dataset has, and the relabeler's `columns`),
`episode` its episode row as a dict; it returns `(instruction, step)`: the text of what the
episode accomplished and the t of the step whose action accomplished it, or `(None, None)`.
It is called once per episode (a plugin: per-episode Python is acceptable there); anything
else it returns, or an exception it raises, stops the job with one line naming the episode
and the function.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from relabelers.base import RelabelError
from schemas import steps as cols

# What a function sees of the data when the dataset has it.
STEP_COLUMNS_IF_PRESENT = (
    cols.OBSERVATION,
    cols.ACTION,
    cols.REWARD,
    cols.TERMINATED,
    cols.TRUNCATED,
    cols.NEXT_OBSERVATION,
)
EPISODE_COLUMNS_IF_PRESENT = (cols.LENGTH, cols.RETURN, cols.ENV_ID, cols.SOURCE, "mission")

InstructionFunction = Callable[[pa.Table, dict[str, Any]], Any]


@functools.lru_cache(maxsize=16)
def load_function(name: str) -> InstructionFunction:
    """`package.module:function`, imported (once per process)."""
    module_name, sep, attribute = name.partition(":")
    if not sep or not module_name or not attribute:
        raise RelabelError(
            f"relabeler 'instructions': function={name!r} is not of the form module:function"
        )
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise RelabelError(
            f"relabeler 'instructions': function={name!r} could not be loaded: {error}"
        ) from None
    if not callable(function):
        raise RelabelError(f"relabeler 'instructions': function={name!r} is not callable")
    return function


def episode_instructions(
    name: str,
    steps: pa.Table,
    rows: list[dict[str, Any]],
    bounds: np.ndarray,
    where: str,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The distinct instructions, and per episode run (rows `bounds[i]:bounds[i+1]` of
    `steps`, episode row `rows[i]`) the index of its instruction among them and its step
    (-1, -1: none)."""
    function = load_function(name)
    vocab: dict[str, int] = {}
    run_code = np.full(len(rows), -1, np.int64)
    run_step = np.full(len(rows), -1, np.int64)
    for i, (start, stop) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        episode_steps = steps.slice(start, stop - start)
        episode_id = episode_steps.column(cols.EPISODE_ID)[0].as_py()
        said = f"{where}: relabeler 'instructions': function {name!r} on episode {episode_id}"
        try:
            answer = function(episode_steps, rows[i])
        except Exception as error:  # whatever a plugin raises, named with the episode
            detail = " ".join(str(error).split())  # a plugin's message, on the one line
            raise RelabelError(f"{said} raised {type(error).__name__}: {detail}") from None
        text, step = checked_answer(answer, said, stop - start)
        if text is None:
            continue
        run_code[i] = vocab.setdefault(text, len(vocab))
        run_step[i] = step
    return list(vocab), run_code, run_step


def checked_answer(answer: Any, said: str, length: int) -> tuple[str | None, int | None]:
    """`(instruction, step)`: a non-empty string and a step in [0, length), or both None."""
    expected = "expected (instruction: str, step: int) or (None, None)"
    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        raise RelabelError(f"{said} returned {type(answer).__name__} {answer!r:.80}; {expected}")
    text, step = answer
    if text is None and step is None:
        return None, None
    if not isinstance(text, str) or not text.strip():
        raise RelabelError(f"{said} returned instruction {text!r:.80}; {expected}")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise RelabelError(f"{said} returned step {step!r:.80}; {expected}")
    if not 0 <= int(step) < length:
        raise RelabelError(
            f"{said} returned step {int(step)}, outside the episode's steps 0..{length - 1}"
        )
    return text, int(step)
