"""`returns`: return-to-go per step, the episode return, and a D4RL-normalized return.

Return-to-go is the discounted sum of the rewards from step t to the end of the episode:

    return_to_go[t] = reward[t] + gamma * return_to_go[t + 1],   0 at the episode's end.

`discounted_reverse_cumsum` computes it for a whole part in float64, with no gamma^t
scaling (which loses precision past a few thousand steps and overflows past t ~ 70k). Each
episode takes one of three ways:

- episodes shorter than BLOCKED_FROM steps take one of two exact ways, which use the
  textbook backward loop's operations in its order, so their results are the loop's to the
  last bit; per length class (lengths in [2^c, 2^(c+1))), the cheaper by a cost estimate:
  - side by side: laid out time-major (row k holds step k-from-the-end of every episode of
    the class), a backward sweep over the rows does y = r + gamma * y with two vectorized
    operations per row, so NumPy's per-call cost is paid once per row, not once per
    episode; in chunks of CHUNK_STEPS steps, so the layout stays in the CPU's cache; a chunk
    of episodes all of one length (a fixed horizon) is laid out by a plain transpose;
  - alone, through a compiled sequential loop: `np.add.accumulate` on the reversed episode
    for gamma = 1, SciPy's `lfilter` (y[i] = x[i] + gamma * y[i-1] reversed) for gamma < 1;
- longer episodes take the blocked scan (relabelers/blocked_returns.py): a compiled loop
  runs at the speed of its chain of dependent operations, and nothing exact can beat it on
  one long episode; the blocked scan cuts the chain into 16-step blocks swept side by side
  and adds each block's carry, about twice as fast, rounding in another order (within a few
  units in the last place of the episode's largest |return-to-go|).

Which way an episode takes depends on its length alone (the side-by-side and alone ways give
the same bits), so results do not depend on how a dataset is cut into parts.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator
from scipy.signal import lfilter

try:
    # The compiled loop behind `lfilter`, without its per-call checks and array-API
    # dispatch (about 2 us, as much as 500 steps of filtering). Arguments are checked here.
    from scipy.signal._sigtools import _linear_filter as compiled_lfilter
except ImportError:  # a SciPy that moved it: the public function, same results
    compiled_lfilter = None

from relabelers.base import (
    Columns,
    Inputs,
    Output,
    Params,
    Part,
    Relabeler,
    RelabelError,
    require_rewards,
)
from relabelers.blocked_returns import blocked_return_to_go
from schemas import steps as cols

RETURN_TO_GO = "return_to_go"
EPISODE_RETURN = "episode_return"
NORMALIZED_RETURN = "normalized_return"

CHUNK_STEPS = 1 << 18
# Episodes at least this long take the blocked scan (relabelers/blocked_returns.py): past a
# few thousand steps it beats the compiled loops; below, the exact ways are as fast.
BLOCKED_FROM = 4096
# Cost estimates in nanoseconds, keyed by gamma == 1 (one operation per row and step, or
# two), fitted to timings of each way on each length class (2 shared x86 cores). They only
# steer which way a length class goes, never a result.
SIDE_BY_SIDE_PER_STEP = {True: 8.2, False: 8.7}  # lay out, sweep, gather back
SIDE_BY_SIDE_PER_EPISODE = 40.0
SIDE_BY_SIDE_PER_ROW = {True: 560.0, False: 920.0}  # per row of a class, per chunk
PASSING_THROUGH_PER_STEP = 4.0  # a step of an episode alone inside a chunk that sweeps
ALONE_PER_EPISODE = {True: 720.0, False: 1_300.0}  # an accumulate call, or a filter call
ALONE_PER_STEP = {True: 2.2, False: 4.0}


def discounted_reverse_cumsum(
    rewards: np.ndarray, episode_ends: np.ndarray, gamma: float
) -> np.ndarray:
    """Return-to-go of every step, in float64: bit-identical to the backward loop for
    episodes shorter than BLOCKED_FROM steps, within a few units in the last place of the
    episode's largest |return-to-go| for longer ones (see relabelers/blocked_returns.py).

    `episode_ends[i]` is True where step i is the last step of its episode (the last step
    of the array always ends one). `rewards` may be float32 (as stored): it is widened to
    float64 as each way reads it.
    """
    rewards = np.ascontiguousarray(rewards)
    if rewards.dtype not in (np.float32, np.float64):
        rewards = rewards.astype(np.float64)
    out = np.empty(len(rewards), dtype=np.float64)
    if len(rewards) == 0:
        return out
    ends = np.flatnonzero(episode_ends)
    if len(ends) == 0 or ends[-1] != len(rewards) - 1:
        ends = np.append(ends, len(rewards) - 1)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    gamma = float(gamma)
    # Whether an episode is blocked depends on its length alone, so its bits do not depend
    # on which other episodes share its part.
    blocked = lengths >= BLOCKED_FROM
    if not blocked.all():
        values = np.ascontiguousarray(rewards, dtype=np.float64)
        side_by_side = np.zeros(len(lengths), dtype=bool)
        side_by_side[~blocked] = episodes_side_by_side(lengths[~blocked], gamma == 1.0)
        if side_by_side.any():  # first: it writes over other episodes' steps in its chunks
            sweep_side_by_side(values, starts, lengths, side_by_side, gamma, out)
        alone = ~side_by_side & ~blocked
        one_at_a_time(values, starts[alone], lengths[alone], gamma, out)
    blocked_return_to_go(rewards, starts[blocked], lengths[blocked], gamma, out)
    return out


def one_at_a_time(
    values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, gamma: float, out: np.ndarray
) -> None:
    """Each episode by a compiled sequential loop over its reversed steps."""
    numerator = np.array([1.0])
    denominator = np.array([1.0, -gamma])
    for start, end in zip(starts.tolist(), (starts + lengths).tolist()):
        reversed_rewards = values[start:end][::-1]
        if gamma == 1.0:
            np.add.accumulate(reversed_rewards, out=out[start:end][::-1])
        elif compiled_lfilter is not None:
            out[start:end] = compiled_lfilter(numerator, denominator, reversed_rewards, -1)[::-1]
        else:
            out[start:end] = lfilter(numerator, denominator, reversed_rewards)[::-1]


def length_classes(lengths: np.ndarray) -> np.ndarray:
    """c such that 2^c <= length < 2^(c+1)."""
    return np.frexp(lengths)[1] - 1


def episodes_side_by_side(lengths: np.ndarray, undiscounted: bool) -> np.ndarray:
    """True for the episodes to sweep side by side: those of the length classes up to the
    one that minimizes the estimated cost of both ways together."""
    classes = length_classes(lengths)
    counts = np.bincount(classes)
    present = np.flatnonzero(counts)
    counts = counts[present]
    steps = np.bincount(classes, weights=lengths)[present]
    chunks = -(-int(steps.sum()) // CHUNK_STEPS)
    rows = (2.0 ** (present + 1)) * np.minimum(counts, chunks)
    # The cost when the classes present[:j] go side by side and the others alone, each j.
    swept_steps = np.concatenate([[0.0], np.cumsum(steps)])
    swept_count = np.concatenate([[0], np.cumsum(counts)])
    swept_rows = np.concatenate([[0.0], np.cumsum(rows)])
    alone_steps = swept_steps[-1] - swept_steps
    alone_count = swept_count[-1] - swept_count
    cost = (
        ALONE_PER_EPISODE[undiscounted] * alone_count
        + ALONE_PER_STEP[undiscounted] * alone_steps
        + SIDE_BY_SIDE_PER_EPISODE * swept_count
        + SIDE_BY_SIDE_PER_STEP[undiscounted] * swept_steps
        + SIDE_BY_SIDE_PER_ROW[undiscounted] * swept_rows
        + PASSING_THROUGH_PER_STEP * np.where(swept_steps > 0, alone_steps, 0.0)
    )
    swept_classes = np.zeros(int(present[-1]) + 1, dtype=bool)
    swept_classes[present[: int(np.argmin(cost))]] = True
    return swept_classes[classes]


def sweep_side_by_side(
    values: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    selected: np.ndarray,
    gamma: float,
    out: np.ndarray,
) -> None:
    """Return-to-go of the `selected` episodes into `out`, chunk by chunk (the steps of the
    other episodes within a chunk get values to be overwritten)."""
    total = int(starts[-1] + lengths[-1])
    cuts = np.searchsorted(starts, np.arange(CHUNK_STEPS, total, CHUNK_STEPS))
    for first, end in zip([0, *cuts.tolist()], [*cuts.tolist(), len(starts)]):
        chosen = np.flatnonzero(selected[first:end]) + first
        if len(chosen) == 0:
            continue
        first, end = int(chosen[0]), int(chosen[-1]) + 1
        low, high = int(starts[first]), int(starts[end - 1] + lengths[end - 1])
        sweep_chunk(
            values[low:high],
            starts[first:end] - low,
            lengths[first:end],
            selected[first:end],
            gamma,
            out[low:high],
        )


def sweep_chunk(
    values: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    selected: np.ndarray,
    gamma: float,
    out: np.ndarray,
) -> None:
    """One chunk: each length class is a block of `rows x width` slots, slot (k, i) holding
    step k-from-the-end of the class's i-th episode (in order, so neighbours in memory stay
    neighbours). A step's slot falls by `width` from one step to the next within an episode,
    so one cumulative sum places every step; the other episodes' steps share a spare slot.
    Episodes all of one length (a fixed horizon) are a plain transpose."""
    if selected.all() and lengths.min() == lengths.max():
        episodes = values.reshape(len(lengths), int(lengths[0]))
        block = np.ascontiguousarray(episodes[:, ::-1].T)
        sweep_rows(block, gamma)
        out.reshape(episodes.shape)[:, ::-1] = block.T
        return
    classes = np.where(selected, length_classes(lengths), -1)
    slope = np.zeros(len(lengths), dtype=np.int64)
    last_slot = np.zeros(len(lengths), dtype=np.int64)
    blocks = []  # (first slot, rows, width)
    size = 0
    for length_class in np.flatnonzero(np.bincount(classes[selected])).tolist():
        members = np.flatnonzero(classes == length_class)
        rows, width = int(lengths[members].max()), len(members)
        slope[members] = -width
        last_slot[members] = size + np.arange(width)
        blocks.append((size, rows, width))
        size += rows * width
    last_slot[~selected] = size  # the spare slot
    first_slot = last_slot - slope * (lengths - 1)
    slot = np.repeat(slope, lengths)
    slot[0] = first_slot[0]
    slot[starts[1:]] = first_slot[1:] - last_slot[:-1]
    np.cumsum(slot, out=slot)

    grid = np.zeros(size + 1, dtype=np.float64)
    grid[slot] = values
    for first, rows, width in blocks:
        # Slots past an episode's first step hold zeros and feed nothing that is read back.
        sweep_rows(grid[first : first + rows * width].reshape(rows, width), gamma)
    # mode="clip" (every slot is in range): with out=, the default mode buffers a copy.
    grid.take(slot, out=out, mode="clip")


def sweep_rows(block: np.ndarray, gamma: float) -> None:
    """In place, row k = row k + gamma * row k-1: the loop's two roundings, in its order."""
    scratch = np.empty(block.shape[1], dtype=np.float64)
    for k in range(1, len(block)):
        if gamma == 1.0:
            np.add(block[k], block[k - 1], block[k])
        else:
            np.multiply(block[k - 1], gamma, scratch)
            np.add(block[k], scratch, block[k])


def episode_ends_of(episode_ids: np.ndarray) -> np.ndarray:
    """True at the last step of every episode of a (episode_id, t)-sorted step column."""
    ends = np.ones(len(episode_ids), dtype=bool)
    if len(episode_ids) > 1:
        ends[:-1] = episode_ids[1:] != episode_ids[:-1]
    return ends


class ReturnsParams(Params):
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount factor of return_to_go.")
    reference_random: float | None = Field(
        None, description="Return of a random policy, for normalized_return (D4RL)."
    )
    reference_expert: float | None = Field(
        None, description="Return of an expert policy, for normalized_return (D4RL)."
    )
    reward_column: str = Field(cols.REWARD, description="The step column holding rewards.")

    @model_validator(mode="after")
    def _references_together(self) -> ReturnsParams:
        given = (self.reference_random is None, self.reference_expert is None)
        if given[0] != given[1]:
            raise ValueError("give both reference_random and reference_expert, or neither")
        if self.reference_random is not None and self.reference_random == self.reference_expert:
            raise ValueError("reference_random and reference_expert must differ")
        return self


class ReturnsRelabeler(Relabeler):
    """Return-to-go (discounted), episode return (undiscounted) and normalized return."""

    name = "returns"
    # 1.1: episodes of BLOCKED_FROM steps or more by the blocked scan (not the loop's bits).
    version = "1.1"
    Params = ReturnsParams

    @property
    def normalized(self) -> bool:
        return self.params.reference_random is not None

    def reads(self) -> Columns:
        return Columns(steps=(cols.EPISODE_ID, cols.T, self.params.reward_column))

    def writes(self) -> Columns:
        episodes = (EPISODE_RETURN, NORMALIZED_RETURN) if self.normalized else (EPISODE_RETURN,)
        return Columns(steps=(RETURN_TO_GO,), episodes=episodes)

    def setup(self, inputs: Inputs) -> None:
        if self.params.reward_column == cols.REWARD:
            require_rewards(self.name, inputs)
        data_type = inputs.steps_schema.field(self.params.reward_column).type
        if not (pa.types.is_integer(data_type) or pa.types.is_floating(data_type)):
            raise RelabelError(
                f"relabeler 'returns': reward_column {self.params.reward_column!r} is "
                f"{data_type}; rewards must be numbers (one per step)"
            )

    def relabel(self, steps: pa.Table, episodes: pa.Table, part: Part) -> Output:
        episode_ids = steps.column(cols.EPISODE_ID).to_numpy()
        stored = steps.column(self.params.reward_column).to_numpy(zero_copy_only=False)
        rewards = np.asarray(stored, dtype=np.float64)
        bad = ~np.isfinite(rewards)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise RelabelError(
                f"relabeler 'returns': column {self.params.reward_column!r} has "
                f"{int(bad.sum())} non-finite value(s), the first at episode "
                f"{int(episode_ids[row])} step t={steps.column(cols.T)[row].as_py()}"
            )
        # The stored column as it is (float32, usually): the blocked scan widens it as it
        # lays it out, which reads half the bytes; the values, so the results, are the same.
        return_to_go = discounted_reverse_cumsum(
            stored, episode_ends_of(episode_ids), self.params.gamma
        )
        bounds = cols.episode_boundaries(episode_ids)
        if len(episode_ids):
            episode_return = np.add.reduceat(rewards, bounds[:-1])
        else:
            episode_return = np.zeros(0)
        # Steps and episodes come in the same order: check rather than assume.
        expected = episodes.column(cols.EPISODE_ID).to_numpy()
        if len(expected) != len(bounds) - 1 or not np.array_equal(
            expected, episode_ids[bounds[:-1]]
        ):
            raise RelabelError(
                "relabeler 'returns': the steps and episodes tables do not hold the same "
                "episodes in the same order"
            )
        episode_columns = {EPISODE_RETURN: pa.array(episode_return, type=pa.float64())}
        if self.normalized:
            low, high = self.params.reference_random, self.params.reference_expert
            episode_columns[NORMALIZED_RETURN] = pa.array(
                100.0 * (episode_return - low) / (high - low), type=pa.float64()
            )
        return Output(
            steps=pa.table({RETURN_TO_GO: pa.array(return_to_go.astype(np.float32))}),
            episodes=pa.table(episode_columns),
        )
