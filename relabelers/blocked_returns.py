"""Return-to-go of long episodes by a blocked scan: SIMD across blocks instead of one chain.

The backward loop `y[t] = r[t] + gamma * y[t + 1]` is one chain of dependent operations, so a
compiled loop over a long episode (`lfilter`, `np.add.accumulate`) runs at the latency of a
multiply and an add per step, whatever the CPU's vector width. Here every episode is cut into
blocks of BLOCK_STEPS steps counted from its end (its first block padded with zeros in front),
and the blocks are laid side by side as the columns of a (BLOCK_STEPS, TILE_BLOCKS) tile that
fits the CPU's cache:

1. a backward sweep over the tile's rows (`row[j] += gamma * row[j + 1]`, one vectorized
   operation per row across thousands of blocks) gives each block's return-to-go as if the
   episode ended at the block's end;
2. the blocks' first values chain backwards within each episode, `R[b] = v[b] + gamma^L *
   R[b + 1]`, a recursion over blocks (1/BLOCK_STEPS of the steps) through `lfilter`;
3. each block gets its carry: `+ gamma^(L - j) * R[b + 1]` at row j, one multiply-add.

Tiles go from the last to the first, so a tile's carry comes from the tile after it while both
are in cache; the transposes in and out are the only passes over memory.

Not the backward loop's bits: steps 2 and 3 round in another order (a step's value is a
block-local sum plus a rounded carry). The error is of the loop's own size, a few units in the
last place of the episode's largest |return-to-go| (bench/results/returns.json records it
against an exact reference, tests bound it at 1e-12). Each step's arithmetic depends only on
its episode (blocks are counted from the episode's end), never on which other episodes share
the part or the tile, so results are identical however a dataset is cut into parts.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import lfilter

try:
    # The compiled loop behind `lfilter`, without its per-call checks (see returns.py).
    from scipy.signal._sigtools import _linear_filter as compiled_lfilter
except ImportError:  # a SciPy that moved it: the public function, same results
    compiled_lfilter = None

# Steps per block (L): short blocks make the transposes cheap (a block is two cache lines);
# the chain over blocks then has 1/16 of the steps. Blocks per tile: a tile of 16 x 4096
# float64 (512 KiB) stays in a core's L2 cache, and each row operation spans 4096 blocks, so
# NumPy's per-call cost is small against the work.
BLOCK_STEPS = 16
TILE_BLOCKS = 4096


def blocked_return_to_go(
    values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, gamma: float, out: np.ndarray
) -> None:
    """Return-to-go of the episodes (`starts`, `lengths`, in order) into `out`, in float64.

    `values` may be float32 (as stored) or float64; it is widened as it is laid out."""
    if len(lengths) == 0:
        return
    blocks = -(-lengths // BLOCK_STEPS)
    first_block = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(blocks, out=first_block[1:])
    # Where each episode's block 0 would start, its padding included (at most L - 1 before).
    origins = starts + lengths - blocks * BLOCK_STEPS
    powers = np.power(gamma, np.arange(BLOCK_STEPS, 0, -1, dtype=np.float64))  # gamma^(L-j)
    total = int(first_block[-1])
    # No wider than the blocks need: a lone episode does not pay for a whole tile's pages.
    tile = np.empty((BLOCK_STEPS, min(TILE_BLOCKS, total)), dtype=np.float64)
    spread = np.empty_like(tile) if gamma != 1.0 else tile
    carry = 0.0  # R of the first block of the tile after this one
    for low in range((total - 1) // TILE_BLOCKS * TILE_BLOCKS, -1, -TILE_BLOCKS):
        high = min(low + TILE_BLOCKS, total)
        pieces = tile_pieces(first_block, origins, low, high)
        block = tile[:, : high - low]
        lay_out(values, starts, pieces, low, block)
        sweep_rows_backward(block, gamma)
        carries, carry = chain_blocks(block[0], pieces, low, float(powers[0]), carry)
        if gamma == 1.0:
            np.add(block, carries, out=block)
        else:
            np.multiply(powers[:, None], carries, out=spread[:, : high - low])
            np.add(block, spread[:, : high - low], out=block)
        gather_back(starts, pieces, low, block, out)


# A piece: (episode, its first block in the tile, end block, whether it holds the episode's
# block 0, whether the episode goes on past the tile, where the first block's steps start).
Piece = tuple[int, int, int, bool, bool, int]


def tile_pieces(first_block: np.ndarray, origins: np.ndarray, low: int, high: int) -> list[Piece]:
    """The episodes overlapping blocks [low, high), each as a Piece."""
    first = int(np.searchsorted(first_block, low, side="right")) - 1
    last = int(np.searchsorted(first_block, high, side="left"))
    pieces = []
    for episode in range(first, last):
        begin, end = int(first_block[episode]), int(first_block[episode + 1])
        source = int(origins[episode]) + (max(begin, low) - begin) * BLOCK_STEPS
        pieces.append((episode, max(begin, low), min(end, high), begin >= low, end > high, source))
    return pieces


def lay_out(
    values: np.ndarray, starts: np.ndarray, pieces: list[Piece], low: int, block: np.ndarray
) -> None:
    """Column b of the tile <- the steps of block b. An episode's block 0, short by its
    padding, gets zeros in front: they add nothing to the steps after them."""
    for episode, begin, end, holds_first, _, source in pieces:
        if holds_first:
            padding = int(starts[episode]) - source
            block[:padding, begin - low] = 0.0
            block[padding:, begin - low] = values[source + padding : source + BLOCK_STEPS]
            begin, source = begin + 1, source + BLOCK_STEPS
        if begin < end:
            steps = values[source : source + (end - begin) * BLOCK_STEPS]
            block[:, begin - low : end - low] = steps.reshape(end - begin, BLOCK_STEPS).T


def gather_back(
    starts: np.ndarray, pieces: list[Piece], low: int, block: np.ndarray, out: np.ndarray
) -> None:
    """The inverse of `lay_out`, padding left out."""
    for episode, begin, end, holds_first, _, source in pieces:
        if holds_first:
            padding = int(starts[episode]) - source
            out[source + padding : source + BLOCK_STEPS] = block[padding:, begin - low]
            begin, source = begin + 1, source + BLOCK_STEPS
        if begin < end:
            steps = out[source : source + (end - begin) * BLOCK_STEPS]
            steps.reshape(end - begin, BLOCK_STEPS)[...] = block[:, begin - low : end - low].T


def sweep_rows_backward(block: np.ndarray, gamma: float) -> None:
    """In place, row j += gamma * row j+1 from the last row up: each column becomes its
    block's return-to-go as if the episode ended at the block's end."""
    scratch = np.empty(block.shape[1], dtype=np.float64)
    for j in range(len(block) - 2, -1, -1):
        if gamma == 1.0:
            np.add(block[j], block[j + 1], out=block[j])
        else:
            np.multiply(block[j + 1], gamma, out=scratch)
            np.add(block[j], scratch, out=block[j])


def chain_blocks(
    firsts: np.ndarray, pieces: list[Piece], low: int, jump: float, carry: float
) -> tuple[np.ndarray, float]:
    """Each block's carry (the return-to-go at the next block's first step, 0 at the
    episode's last block), from the blocks' local first values `firsts` by R[b] = firsts[b] +
    jump * R[b + 1] within each episode; `carry` is R of the next tile's first block. Returns
    the carries (one per block) and R of this tile's first block."""
    carries = np.empty(len(firsts), dtype=np.float64)
    first_return = 0.0
    for _, begin, end, _, goes_on, _ in pieces:
        incoming = carry if goes_on else 0.0
        chained = chain_backwards(firsts[begin - low : end - low], jump, incoming)
        carries[begin - low : end - low - 1] = chained[1:]
        carries[end - low - 1] = incoming
        if begin == low:
            first_return = float(chained[0])
    return carries, first_return


def chain_backwards(firsts: np.ndarray, jump: float, incoming: float) -> np.ndarray:
    """R[b] = firsts[b] + jump * R[b + 1], R past the end = `incoming`: a compiled loop over
    the reversed values, the same roundings whether or not a tile cuts the chain (lfilter's
    initial state is jump * incoming, the product the loop would form)."""
    if jump == 1.0:  # plain sums: the accumulate loop, faster than a filter
        chained = np.empty(len(firsts) + 1, dtype=np.float64)
        chained[0] = incoming
        chained[1:] = firsts[::-1]
        return np.add.accumulate(chained, out=chained)[:0:-1]
    numerator, denominator = np.array([1.0]), np.array([1.0, -jump])
    initial = np.array([jump * incoming])
    if compiled_lfilter is not None:
        chained = compiled_lfilter(numerator, denominator, firsts[::-1], -1, initial)[0]
    else:
        chained = lfilter(numerator, denominator, firsts[::-1], zi=initial)[0]
    return chained[::-1]
