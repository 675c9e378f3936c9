"""Reading one shard: its index entry, its bytes through engine/storage, its tar members
checked, its blocks decoded, and its size and sha256 checked against the index at its end.

Stages (each a function over the previous one's output, testable alone):
    open_shard -> VerifyingReader -> tar_file_iterator (webdataset) -> checked_members
    -> group_by_keys (webdataset) -> decode_block
`shard_blocks` chains them for one shard.
"""

from __future__ import annotations

import ast
import hashlib
import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_iterator

from engine import storage
from schemas.shard_index import (
    ALLOWED_SUFFIXES,
    INDEX_NAME,
    REWARD,
    STEP_MEMBERS,
    WINDOW_END,
    WINDOW_MEMBERS,
    WINDOW_START,
    ShardError,
    ShardIndex,
    ShardInfo,
    condition_member,
    member_file,
    text_count_member,
    text_index_member,
    text_tokens_member,
)


class UnsafeShardError(ShardError):
    """A shard member that is never loaded (a pickle, a path outside the shard)."""


def read_index(uri: str) -> ShardIndex:
    """The committed index of a shard directory; without index.json it is not readable."""
    uri = storage.normalize(uri)
    index_uri = storage.join(uri, INDEX_NAME)
    if not storage.exists(index_uri):
        staging = storage.exists(storage.join(uri, storage.STAGING_MARKER))
        reason = (
            "the shard job is still writing it or died before committing"
            if staging
            else "there is no index.json there"
        )
        raise ShardError(f"{uri} holds no committed shards: {reason}")
    try:
        return ShardIndex.from_json(storage.read_bytes(index_uri))
    except ValueError as error:
        raise ShardError(f"{index_uri} is not a valid shard index: {error}") from error


def open_shard(uri: str) -> BinaryIO:
    """A binary stream of a shard (local file or S3 object), read front to back without a
    temporary copy; a dropped S3 connection resumes where it stopped (engine/storage)."""
    return storage.open_input(uri)


def read_shard_bytes(uri: str, chunk: int = 1 << 20) -> int:
    """Read a shard front to back and return its size (the raw-read baseline of bench/)."""
    total = 0
    with open_shard(uri) as handle:
        while data := handle.read(chunk):
            total += len(data)
    return total


class VerifyingReader(io.RawIOBase):
    """Passes a shard's bytes through, counting and hashing them, so that the end of the
    shard can be checked against the size and sha256 the index recorded."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.size = 0
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self.stream.readinto(buffer)
        self.digest.update(memoryview(buffer)[:count])
        self.size += count
        return count

    def verify(self, url: str, expected: ShardInfo) -> None:
        """Read what the tar reader left (end-of-archive padding), then compare."""
        while self.read(1 << 20):
            pass
        if (self.size, self.digest.hexdigest()) != (expected.bytes, expected.sha256):
            raise ShardError(
                f"{url}: {self.size} bytes with sha256 {self.digest.hexdigest()[:12]}..., but "
                f"the index records {expected.bytes} bytes with sha256 "
                f"{expected.sha256[:12]}...: the shard changed after the shard job wrote it "
                "(its windows were read before this could be known)"
            )


# ---------------------------------------------------------------- tar members and blocks


def checked_members(files: Iterator[dict[str, Any]], url: str) -> Iterator[dict[str, Any]]:
    """Refuse anything but .npy/.json/.txt members inside the shard (no pickles, no paths
    that leave the shard), and tag members with their shard for grouping."""
    for member in files:
        name = member["fname"]
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
            raise UnsafeShardError(f"{url}: member {name!r} points outside the shard; refused")
        if not name.endswith(ALLOWED_SUFFIXES):
            raise UnsafeShardError(
                f"{url}: member {name!r} is not .npy/.json/.txt (pickled or unknown data is "
                "never loaded); refused"
            )
        member["__url__"] = url
        yield member


def load_npy(data: bytes, where: str) -> np.ndarray:
    """An .npy member as a read-only array over the member's bytes; object dtypes refused."""
    if data[:6] != b"\x93NUMPY":
        raise ShardError(f"{where} is not an .npy array")
    major = data[6]
    if major == 1:
        header_length = int.from_bytes(data[8:10], "little")
        start = 10
    elif major in (2, 3):
        header_length = int.from_bytes(data[8:12], "little")
        start = 12
    else:
        raise ShardError(f"{where}: unknown .npy version {major}")
    header = ast.literal_eval(data[start : start + header_length].decode("latin1"))
    dtype = np.dtype(header["descr"])
    if dtype.hasobject:
        raise UnsafeShardError(f"{where}: object arrays (pickles) are refused")
    shape = tuple(header["shape"])
    count = math.prod(shape)
    offset = start + header_length
    if len(data) - offset < count * dtype.itemsize:
        raise ShardError(f"{where}: truncated array")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    order = "F" if header["fortran_order"] else "C"
    return array.reshape(shape, order=order)


@dataclass
class Block:
    """One tar sample: consecutive steps and the windows that end in them, by member name."""

    steps: dict[str, np.ndarray]  # per step: observation, action, reward, timestep, cond.C
    windows: dict[str, np.ndarray]  # per window: window_end, window_start, episode_id, text index
    texts: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def num_windows(self) -> int:
        return len(self.windows[WINDOW_END])


def decode_block(
    sample: dict[str, Any], url: str, index: ShardIndex, conditions: Sequence[str]
) -> Block:
    """A grouped tar sample as a Block, checked for consistency."""
    where = f"{url} sample {sample.get('__key__')}"
    is_text = {name: index.conditions[name].type == "text" for name in conditions}
    needed = [*STEP_MEMBERS, *WINDOW_MEMBERS]
    for name in conditions:
        if is_text[name]:
            needed += [text_index_member(name), text_tokens_member(name), text_count_member(name)]
        else:
            needed.append(condition_member(name))
    arrays: dict[str, np.ndarray] = {}
    for name in needed:
        data = sample.get(member_file(name))
        if data is None:
            raise ShardError(
                f"{where}: member {member_file(name)} is missing (truncated or foreign shard)"
            )
        arrays[name] = load_npy(data, f"{where} member {member_file(name)}")
    block = Block(
        steps={name: arrays[name] for name in STEP_MEMBERS},
        windows={name: arrays[name] for name in WINDOW_MEMBERS},
    )
    for name in conditions:
        if is_text[name]:
            block.windows[text_index_member(name)] = arrays[text_index_member(name)]
            block.texts[name] = (arrays[text_tokens_member(name)], arrays[text_count_member(name)])
        else:
            block.steps[condition_member(name)] = arrays[condition_member(name)]
    rows = len(block.steps[REWARD])
    end, start = block.windows[WINDOW_END], block.windows[WINDOW_START]
    bad_steps = [n for n, a in block.steps.items() if len(a) != rows]
    bad_windows = [n for n, a in block.windows.items() if len(a) != len(end)]
    if (
        bad_steps
        or bad_windows
        or (len(end) and (end.max() >= rows or start.min() < 0))
        or np.any(start > end)
        or np.any(end - start >= index.window)
    ):
        raise ShardError(f"{where}: inconsistent arrays {bad_steps + bad_windows} (corrupt shard)")
    return block


def shard_blocks(
    url: str,
    index: ShardIndex,
    conditions: Sequence[str],
    skip_blocks: int = 0,
    expected: ShardInfo | None = None,
) -> Iterator[Block]:
    """The blocks of one shard in order, from block `skip_blocks` on (earlier ones are read
    but not decoded). With `expected` (the index's entry), the whole shard's size and sha256
    are checked once its last block has been read."""
    with open_shard(url) as raw:
        source = VerifyingReader(raw) if expected else raw
        files = tar_file_iterator(source)
        for number, sample in enumerate(group_by_keys(checked_members(files, url))):
            if number >= skip_blocks:
                yield decode_block(sample, url, index, conditions)
        if expected:
            source.verify(url, expected)
