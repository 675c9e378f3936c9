"""Reading one shard: its index entry, its bytes through engine/storage, its tar members
checked, its blocks decoded, and its size and sha256 checked against the index at its end.

Stages (each a function over the previous one's output, testable alone):
    open_shard -> VerifyingReader -> tar_members -> checked_members
    -> group_by_keys (webdataset) -> decode_block (-> check_against_index)
`shard_blocks` chains them for one shard.

The index is checked against the data as it is read, since a trainer builds its model from
it: no member is read into memory beyond the size the index allows (`member_limit`), and
every block's window lengths, observation and action shapes and condition values must be
what the index says (`check_against_index`, an `IndexMismatchError`).
"""

from __future__ import annotations

import ast
import hashlib
import io
import math
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
from webdataset.tariterators import group_by_keys

from engine import storage
from schemas.shard_index import (
    ACTION,
    ALLOWED_SUFFIXES,
    INDEX_NAME,
    OBSERVATION,
    REWARD,
    STEP_MEMBERS,
    TIMESTEP,
    WINDOW_END,
    WINDOW_MEMBERS,
    WINDOW_START,
    ConditionInfo,
    ShardError,
    ShardIndex,
    ShardInfo,
    condition_member,
    describe_invalid,
    frame_data_file,
    frame_offsets_member,
    member_file,
    text_count_member,
    text_index_member,
    text_tokens_member,
)


class UnsafeShardError(ShardError):
    """A shard member that is never loaded (a pickle, a path outside the shard)."""


class IndexMismatchError(ShardError):
    """A shard whose data is not what its (intact) index describes: the index is wrong for
    the whole directory, so this is never skipped as one corrupt shard."""


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
    except ValueError as error:  # bad JSON, a field of the wrong type, totals that disagree
        raise ShardError(
            f"{index_uri} is not a valid shard index: {describe_invalid(error)}"
        ) from error


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

    def __init__(self, stream: BinaryIO, url: str = "", limit: int | None = None):
        self.stream = stream
        self.url = url
        self.limit = limit  # the size the index records: nothing past it is read
        self.size = 0
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.limit is not None:
            buffer = memoryview(buffer)[: max(self.limit + 1 - self.size, 0)]
        count = self.stream.readinto(buffer)
        if self.limit is not None and self.size + count > self.limit:
            raise ShardError(
                f"{self.url}: more than the {self.limit:,} bytes the index records for this "
                "shard; not read further"
            )
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

# Room for an .npy header (ours take 128 bytes; format 1.0 would allow up to 64 KiB).
NPY_HEADER_BYTES = 4096


def member_limit(index: ShardIndex) -> int:
    """The most bytes one member of a block may hold, from the index: a block has at most
    `block_steps + window - 1` rows (a chunk of a long episode carries `window - 1` steps of
    context), each member at most 8 bytes per value and the widest row the index records
    (observation, action, vector goals, text tokens; a frame counts as twice its raw
    size plus 1 KiB over 8 bytes, room for PNG's worst case)."""
    widths = [math.prod(index.observation.shape), index.action.dim or 1]
    for camera in index.cameras.values():
        widths.append((2 * math.prod(camera.shape) + 1024) // 8)
    for info in index.conditions.values():
        widths.append((info.dim or 1) * (info.count or 1))
        widths.append((info.paraphrases or 1) * (info.max_tokens or 1))
    rows = index.block_steps + index.window + index.frame_stack
    return NPY_HEADER_BYTES + 8 * rows * max(widths)


def tar_members(stream: BinaryIO, url: str, limit: int) -> Iterator[dict[str, Any]]:
    """The regular files of a tar stream in order as {"fname", "data"} (what webdataset's
    tar_file_iterator yields), each member's size checked against `limit` from its header
    before its bytes are read into memory."""
    archive = tarfile.open(fileobj=stream, mode="r|*")
    for member in archive:
        if not member.isreg():
            continue
        if member.size > limit:  # a wrong index for an intact shard, or a corrupt shard
            raise IndexMismatchError(
                f"{url}: member {member.name!r} holds {member.size:,} bytes, more than the "
                f"{limit:,} bytes a member may hold by the index (block_steps, window and "
                "shapes in index.json); not read"
            )
        data = archive.extractfile(member).read()
        yield {"fname": member.name, "data": data}
        archive.members = []  # stream mode: keep no list of every member seen


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


# The header numpy's writer gives an array (engine/shards/tar.py writes them all so): read
# with a regular expression, ~10x cheaper than a literal_eval per member (a tenth of the
# loader's time per batch of single steps); any other header goes through literal_eval.
NPY_HEADER = re.compile(
    r"\{'descr': '([<>|=][a-zA-Z]\d*)', 'fortran_order': (True|False), "
    r"'shape': \(((?:\d+, ?)*\d*)\), \} *\n?"
)


def npy_header(text: str) -> dict[str, Any]:
    """An .npy header's descr, fortran_order and shape."""
    match = NPY_HEADER.fullmatch(text)
    if match is None:
        return ast.literal_eval(text)
    shape = tuple(int(size) for size in match[3].split(",") if size.strip())
    return {"descr": match[1], "fortran_order": match[2] == "True", "shape": shape}


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
    header = npy_header(data[start : start + header_length].decode("latin1"))
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
    # per camera: the encoded frames of the block's steps (the `.bin` member) and offsets
    frames: dict[str, tuple[bytes, np.ndarray]] = field(default_factory=dict)
    where: str = ""  # "shard URL sample KEY", for errors about its frames

    @property
    def num_windows(self) -> int:
        return len(self.windows[WINDOW_END])


def decode_block(
    sample: dict[str, Any],
    url: str,
    index: ShardIndex,
    conditions: Sequence[str],
    cameras: Sequence[str] = (),
) -> Block:
    """A grouped tar sample as a Block, checked for consistency; with the encoded frames of
    `cameras` (kept encoded: the loader decodes only the frames a batch needs)."""
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
        where=where,
    )
    for camera in cameras:
        block.frames[camera] = block_frames(sample, camera, where)
    for name in conditions:
        if is_text[name]:
            block.windows[text_index_member(name)] = arrays[text_index_member(name)]
            block.texts[name] = (arrays[text_tokens_member(name)], arrays[text_count_member(name)])
        else:
            block.steps[condition_member(name)] = arrays[condition_member(name)]
    rows = len(block.steps[REWARD])
    end, start = block.windows[WINDOW_END], block.windows[WINDOW_START]
    bad_steps = [n for n, a in block.steps.items() if len(a) != rows]
    bad_steps += [frame_data_file(c) for c, (_, o) in block.frames.items() if len(o) != rows + 1]
    bad_windows = [n for n, a in block.windows.items() if len(a) != len(end)]
    if (
        bad_steps
        or bad_windows
        or (len(end) and (end.max() >= rows or start.min() < 0))
        or np.any(start > end)
    ):
        raise ShardError(f"{where}: inconsistent arrays {bad_steps + bad_windows} (corrupt shard)")
    check_against_index(block, index, conditions, where)
    return block


def block_frames(sample: dict[str, Any], camera: str, where: str) -> tuple[bytes, np.ndarray]:
    """A camera's encoded frames in a sample: the `.bin` bytes and offsets checked to cut
    them into frames (non-decreasing from 0 to the member's size)."""
    names = (frame_data_file(camera), member_file(frame_offsets_member(camera)))
    data, offsets_data = (sample.get(name.lower()) for name in names)  # webdataset lowercases
    if data is None or offsets_data is None:
        missing = names[0] if data is None else names[1]
        raise ShardError(f"{where}: member {missing} is missing (truncated or foreign shard)")
    offsets = load_npy(offsets_data, f"{where} member {names[1]}")
    if (
        offsets.dtype != np.int64
        or offsets.ndim != 1
        or len(offsets) < 1
        or offsets[0] != 0
        or offsets[-1] != len(data)
        or np.any(np.diff(offsets) < 0)
    ):
        raise ShardError(f"{where}: member {names[1]} does not cut {names[0]} into frames")
    return data, offsets


def _mismatch(where: str, field: str, recorded: Any, found: str) -> IndexMismatchError:
    return IndexMismatchError(
        f"{where}: index.json field {field} is {recorded}, but {found}; the index does not "
        "describe these shards (rewrite them with `hindsight shard`)"
    )


def check_against_index(
    block: Block, index: ShardIndex, conditions: Sequence[str], where: str
) -> None:
    """What the trainer takes from the index must hold for the block's data: every window
    is `min(t + 1, window)` steps long (t: its last step within the episode), observations
    have the recorded shape, actions the recorded dim or range, conditions their recorded
    shapes and vocabularies. Vectorized; an IndexMismatchError names the field."""
    end, start = block.windows[WINDOW_END], block.windows[WINDOW_START]
    timestep = block.steps[TIMESTEP]
    lengths = end.astype(np.int64) - start + 1
    expected = np.minimum(timestep[end].astype(np.int64) + 1, index.window)
    if np.any(lengths != expected):
        bad = int(np.flatnonzero(lengths != expected)[0])
        raise _mismatch(
            where,
            "window",
            index.window,
            f"the window ending at step t={int(timestep[end[bad]])} has {int(lengths[bad])} steps",
        )
    observation = block.steps[OBSERVATION]
    if list(observation.shape[1:]) != list(index.observation.shape):
        raise _mismatch(
            where,
            "observation.shape",
            index.observation.shape,
            f"the observations are {list(observation.shape[1:])}",
        )
    action = block.steps[ACTION]
    if index.action.kind == "continuous":
        if action.ndim != 2 or action.shape[1] != index.action.dim:
            raise _mismatch(
                where, "action.dim", index.action.dim, f"the actions are {list(action.shape[1:])}"
            )
    elif action.ndim != 1 or (
        len(action) and not 0 <= action.min() <= action.max() < (index.action.n or 0)
    ):
        raise _mismatch(where, "action.n", index.action.n, "the actions hold other values")
    for name in conditions:
        _check_condition(block, name, index.conditions[name], where)


def _check_condition(block: Block, name: str, info: ConditionInfo, where: str) -> None:
    """One condition column's shape (vectors) or value range (categorical, text) against
    its index entry: a value out of range would index past an embedding table."""
    field = f"conditions.{name}"
    entries = len(info.vocabulary or [])
    if info.type == "text":
        tokens, _ = block.texts[name]
        if tokens.ndim != 3 or tokens.shape[2] != info.max_tokens:
            raise _mismatch(
                where, f"{field}.max_tokens", info.max_tokens, f"the texts are {tokens.shape}"
            )
        if tokens.size and not 0 <= tokens.min() <= tokens.max() < entries:
            found = f"the shard stores word {int(tokens.max())}"
            raise _mismatch(where, f"{field}.vocabulary", f"{entries} words long", found)
        return
    values = block.steps[condition_member(name)]
    if info.type == "vector":
        shape = [info.count, info.dim] if info.count else [info.dim]
        if list(values.shape[1:]) != shape:
            found = f"the values are {list(values.shape[1:])}"
            raise _mismatch(where, f"{field}.count/dim", shape, found)
    elif info.type == "categorical" and len(values):
        if not 0 <= values.min() <= values.max() < entries:
            found = f"the shard stores label {int(values.max())}"
            raise _mismatch(where, f"{field}.vocabulary", f"{entries} labels long", found)


def shard_is_intact(url: str, expected: ShardInfo) -> bool:
    """Whether the shard has the size and sha256 its index entry records (read through)."""
    try:
        with open_shard(url) as raw:
            VerifyingReader(raw, url, expected.bytes).verify(url, expected)
    except (ShardError, storage.StorageError, OSError):
        return False
    return True


def shard_blocks(
    url: str,
    index: ShardIndex,
    conditions: Sequence[str],
    skip_blocks: int = 0,
    expected: ShardInfo | None = None,
    cameras: Sequence[str] = (),
) -> Iterator[Block]:
    """The blocks of one shard in order, from block `skip_blocks` on (earlier ones are read
    but not decoded). With `expected` (the index's entry), the whole shard's size and sha256
    are checked once its last block has been read, and nothing past its size is read."""
    limit = member_limit(index)
    with open_shard(url) as raw:
        source = raw
        if expected:
            source = VerifyingReader(raw, url, expected.bytes)
            limit = min(limit, expected.bytes)
        files = tar_members(source, url, limit)
        for number, sample in enumerate(group_by_keys(checked_members(files, url))):
            if number >= skip_blocks:
                yield decode_block(sample, url, index, conditions, cameras)
        if expected:
            source.verify(url, expected)
