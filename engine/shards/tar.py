"""Episodes -> blocks -> tar bytes: pure functions, the same input gives the same bytes.

A tar sample is a *block* of consecutive steps (about `block_steps`, whole episodes packed
together; an episode longer than a block is cut into chunks that carry the `window - 1`
steps before them as context), not one window: a tar member costs ~20 us and an .npy header
~25 us, so one window per sample would stream at a few thousand windows/s. The loader cuts
the windows. The members of a block are named in schemas/shard_index.py (all .npy, never
pickled):

    observation, action, reward, timestep   per step
    window_end, window_start, episode_id    per window
    cond.C                                  per step, for each scalar/vector/categorical C
    cond.C.index, cond.C.tokens, cond.C.count   for each text column C
    frame_<camera>.bin, frame_<camera>.offsets   per step, for each camera: the encoded
                                            frames as stored in the dataset, concatenated,
                                            and where each starts (int64 [n + 1])

A window ends at every `stride`-th step counted back from the episode's last step (with
stride 1: at every step), so each step is the last step of at most one window and the last
step of an episode always is; windows at the episode start are shorter (left padding, masked
by the loader).

Tars are written with a fixed mtime, owner and mode in plain ustar format (no PAX headers):
the same input and seed give byte-identical shards.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from engine.shards.episodes import EpisodeArrays, expand_ranges
from engine.shards.frames import frame_members
from schemas.shard_index import (
    ACTION,
    EPISODE_ID,
    OBSERVATION,
    REWARD,
    TIMESTEP,
    WINDOW_END,
    WINDOW_START,
    block_key,
    condition_member,
    frame_data_file,
    frame_offsets_member,
    member_file,
    text_count_member,
    text_index_member,
    text_tokens_member,
)

TAR_MTIME = 0


@dataclass(frozen=True)
class Segment:
    """Steps [first, stop) of episode `episode` (positions within the episode) as the window
    ends of one block, with `context` earlier steps before them."""

    episode: int
    first: int
    stop: int
    context: int

    @property
    def rows(self) -> int:
        return self.stop - self.first + self.context


def plan_blocks(lengths: np.ndarray, window: int, block_steps: int) -> list[list[Segment]]:
    """Whole episodes packed into blocks of at most `block_steps` rows; a longer episode is
    cut into chunks of `block_steps` window ends, each with up to `window - 1` context steps.

    Loops over episodes (not steps): block boundaries only.
    """
    blocks: list[list[Segment]] = []
    current: list[Segment] = []
    rows = 0
    for episode, length in enumerate(lengths.tolist()):
        if length <= block_steps:
            pieces = [Segment(episode, 0, length, 0)]
        else:
            pieces = [
                Segment(episode, first, min(first + block_steps, length), min(window - 1, first))
                for first in range(0, length, block_steps)
            ]
        for piece in pieces:
            if current and rows + piece.rows > block_steps:
                blocks.append(current)
                current, rows = [], 0
            current.append(piece)
            rows += piece.rows
    if current:
        blocks.append(current)
    return blocks


def block_arrays(
    episodes: EpisodeArrays, segments: list[Segment], window: int, stride: int
) -> dict[str, np.ndarray]:
    """The member arrays of one block, by member name (see the module docstring)."""
    episode = np.array([s.episode for s in segments], dtype=np.int64)
    first = np.array([s.first for s in segments], dtype=np.int64)
    stop = np.array([s.stop for s in segments], dtype=np.int64)
    context = np.array([s.context for s in segments], dtype=np.int64)
    offsets = episodes.offsets
    seg_rows = stop - first + context
    rows = expand_ranges(offsets[episode] + first - context, seg_rows)
    # Position of every block row within its episode, and whether it ends a window.
    seg_of_row = np.repeat(np.arange(len(segments)), seg_rows)
    position = rows - offsets[episode][seg_of_row]
    length = episodes.lengths[episode][seg_of_row]
    is_end = (position >= first[seg_of_row]) & ((length - 1 - position) % stride == 0)
    window_end = np.flatnonzero(is_end)
    window_start = window_end - np.minimum(position[window_end], window - 1)
    arrays = {
        OBSERVATION: episodes.observation[rows],
        ACTION: episodes.action[rows],
        REWARD: episodes.reward[rows],
        TIMESTEP: episodes.timestep[rows].astype(np.int32),
        WINDOW_END: window_end.astype(np.int32),
        WINDOW_START: window_start.astype(np.int32),
        EPISODE_ID: episodes.episode_ids[episode][seg_of_row[window_end]].astype(np.int64),
    }
    for name, values in episodes.conditions.items():
        if name in episodes.texts:
            table_rows = values[rows[window_end]]
            unique, inverse = np.unique(table_rows, return_inverse=True)
            tokens, count = episodes.texts[name]
            arrays[text_index_member(name)] = inverse.astype(np.int32).reshape(-1)
            arrays[text_tokens_member(name)] = tokens[unique]
            arrays[text_count_member(name)] = count[unique]
        else:
            arrays[condition_member(name)] = values[rows]
    return arrays


def npy_bytes(array: np.ndarray) -> bytes:
    """An .npy file (format 1.0, never pickled)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def tar_bytes(members: Iterable[tuple[str, bytes | np.ndarray]]) -> bytes:
    """A ustar archive with fixed mtime/owner/mode: equal members give equal bytes.

    The bytes `tarfile` writes (header, data, NUL padding to 512-byte blocks, two zero
    blocks, padding to a 10240-byte record), joined once: member data (bytes or uint8
    arrays, e.g. a block's encoded frames) is copied only into the result."""
    pieces: list[bytes | np.ndarray] = []
    size = 0
    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = TAR_MTIME
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        header = info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
        padding = -len(data) % tarfile.BLOCKSIZE
        pieces += [header, data, tarfile.NUL * padding]
        size += len(header) + len(data) + padding
    size += 2 * tarfile.BLOCKSIZE
    pieces.append(tarfile.NUL * (2 * tarfile.BLOCKSIZE + -size % tarfile.RECORDSIZE))
    return b"".join(pieces)


@dataclass
class BuiltShard:
    """The bytes of one shard and what it holds (for the index)."""

    data: bytes
    windows: int
    episodes: int
    steps: int
    blocks: int


def block_frame_members(
    episodes: EpisodeArrays, segments: list[Segment]
) -> list[tuple[str, bytes | np.ndarray]]:
    """The frame members of one block (names after the block key): per camera the encoded
    frames of the block's rows, bytes unchanged, and their offsets."""
    if not episodes.frames:
        return []
    episode = np.array([s.episode for s in segments], dtype=np.int64)
    starts = episodes.offsets[episode] + [s.first - s.context for s in segments]
    counts = np.array([s.rows for s in segments], dtype=np.int64)
    members = []
    for camera, frames in frame_members(episodes.frames, starts, counts).items():
        members.append((frame_data_file(camera), frames.data))
        members.append((member_file(frame_offsets_member(camera)), npy_bytes(frames.offsets)))
    return members


def build_shard(
    episodes: EpisodeArrays, window: int, stride: int, block_steps: int, frame_stack: int = 1
) -> BuiltShard:
    """The tar bytes of one shard holding `episodes` (in their order). With frames, a chunk
    of a long episode carries `frame_stack - 1` more steps of context: the frames stacked
    before its first window's first step."""
    members: list[tuple[str, bytes | np.ndarray]] = []
    windows = 0
    context_window = window + (frame_stack - 1 if episodes.frames else 0)
    plan = plan_blocks(episodes.lengths, context_window, block_steps)
    for number, segments in enumerate(plan):
        arrays = block_arrays(episodes, segments, window, stride)
        windows += len(arrays[WINDOW_END])
        key = block_key(number)
        members.extend(
            (f"{key}.{member_file(name)}", npy_bytes(value)) for name, value in arrays.items()
        )
        members.extend(
            (f"{key}.{name}", data) for name, data in block_frame_members(episodes, segments)
        )
    return BuiltShard(
        data=tar_bytes(members),
        windows=windows,
        episodes=len(episodes.lengths),
        steps=int(episodes.lengths.sum()),
        blocks=len(plan),
    )
