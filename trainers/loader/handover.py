"""Frames from DataLoader workers to the main process, in shared memory that is recycled.

A batch of frames is tens of MB (uint8 [B, W, C * k, H, W]: 18.9 MB for 64 windows of 8
steps of 3 stacked 64x64 RGB frames). A worker gathers a batch's frames straight into
shared memory (`SharedFrames.empty`) and hands that tensor over as it is: no copy into
another buffer. Fresh shared memory costs the kernel a zeroed page per 4 KB on first
touch (about 10 ms of CPU per 19 MB: 8% of decoding those frames), so buffers are reused:
each worker has SLOTS of them, and a board in shared memory (int8 [workers, SLOTS], made
by the main process) says which are lent. The main process frees a slot once nothing of
the batch it carried is left (`Lent.release`: the storage's use count is back to the one
reference it keeps itself: the consumer has dropped every view of it), and the worker
only writes into a free slot. Without a board (or on a torch without the use count),
every batch gets fresh shared memory, as torch's own collate does. The rest of a batch
goes as one packed buffer (`pack_batch` / `unpack_batch`).
"""

from __future__ import annotations

import numpy as np
import torch

SLOTS = 8  # buffers per worker: batches queued (prefetch) + in the consumer's hands, x cameras
FREE, LENT = 0, 1


def _use_count(storage: torch.UntypedStorage) -> int | None:
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return None if use_count is None else int(use_count(storage._cdata))


def new_board(workers: int) -> torch.Tensor | None:
    """The lent/free board of `workers` workers, in shared memory (None: no recycling)."""
    probe = torch.UntypedStorage(1)
    if _use_count(probe) is None:
        return None
    return torch.zeros((workers, SLOTS), dtype=torch.int8).share_memory_()


class SharedFrames:
    """A worker's frame arrays in shared memory, from its free slots when it can."""

    def __init__(self, board: torch.Tensor | None = None, worker: int = 0):
        self.board = board
        self.worker = worker
        self.buffers: list[torch.Tensor | None] = [None] * SLOTS  # flat uint8, by slot
        self.given: dict[int, tuple[torch.Tensor, int]] = {}  # data address -> tensor, slot

    def _slot(self, size: int) -> int:
        """A free slot with a buffer of `size` bytes (made if need be), or -1."""
        if self.board is None:
            return -1
        flags = self.board[self.worker]
        taken = {slot for _, slot in self.given.values()}
        free = [s for s in range(SLOTS) if int(flags[s]) == FREE and s not in taken]
        for slot in free:
            buffer = self.buffers[slot]
            if buffer is not None and buffer.numel() == size:
                return slot
        # An empty slot first, else a free buffer of another size (a last, smaller batch).
        spare = next((s for s in free if self.buffers[s] is None), free[0] if free else -1)
        if spare >= 0:
            self.buffers[spare] = None  # freed here; the main process let go of it already
            storage = torch.UntypedStorage._new_shared(size)
            self.buffers[spare] = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (size,))
        return spare

    def empty(self, shape: tuple[int, ...]) -> np.ndarray:
        """Uninitialized uint8 of `shape` in shared memory."""
        size = max(int(np.prod(shape)), 1)
        slot = self._slot(size)
        if slot >= 0:
            flat = self.buffers[slot]
        else:
            storage = torch.UntypedStorage._new_shared(size)
            flat = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (size,))
        tensor = flat[: int(np.prod(shape))].view(shape)
        array = tensor.numpy()
        self.given[array.ctypes.data] = (tensor, slot)
        return array

    def hand_over(self, array: np.ndarray) -> tuple[torch.Tensor, int] | None:
        """The shared tensor that is exactly `array` and its slot (marked lent), if it is
        one of ours."""
        found = self.given.get(array.ctypes.data)
        if found is None or tuple(found[0].shape) != array.shape or array.dtype != np.uint8:
            return None
        tensor, slot = found
        if slot >= 0:
            self.board[self.worker, slot] = LENT
        return tensor, slot

    def clear(self) -> None:
        """After a batch: what was not handed over is free again."""
        self.given.clear()


class Lent:
    """In the main process: the slots whose frames the consumer may still hold."""

    def __init__(self, board: torch.Tensor | None):
        self.board = board
        self.out: list[tuple[int, int, torch.UntypedStorage]] = []

    def add(self, worker: int, slots: dict[str, int], tensors: dict[str, torch.Tensor]) -> None:
        for name, slot in slots.items():
            if slot >= 0 and self.board is not None:
                self.out.append((worker, slot, tensors[name].untyped_storage()))

    def release(self) -> None:
        """Free the slots nothing refers to any more but this list."""
        kept = []
        for worker, slot, storage in self.out:
            if _use_count(storage) == 1:
                self.board[worker, slot] = FREE
            else:
                kept.append((worker, slot, storage))
        self.out = kept


def pack_batch(
    batch: dict[str, np.ndarray], memory: SharedFrames | None = None
) -> tuple[torch.Tensor, list[tuple], dict[str, torch.Tensor], dict[str, int]]:
    """A batch as one uint8 tensor plus its layout: a DataLoader worker hands the main
    process one shared-memory buffer per batch instead of one per array (~10x cheaper).
    The buffer is allocated in shared memory (as torch's default_collate does in workers):
    handing it over copies nothing more. Frame arrays already in shared memory (`memory`)
    go as their own tensors, with their slots, not copied (handover.py)."""
    shared, slots = {}, {}
    for name, value in batch.items():
        found = memory.hand_over(value) if memory is not None else None
        if found is not None:
            shared[name], slots[name] = found
    if memory is not None:
        memory.clear()
    small = {name: value for name, value in batch.items() if name not in shared}
    layout, offset = [], 0
    for name, value in small.items():
        layout.append((name, value.dtype.str, value.shape, offset))
        offset += -(-value.nbytes // 8) * 8  # 8-byte aligned views
    storage = torch.UntypedStorage._new_shared(offset)
    packed = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (offset,), (1,))
    buffer = packed.numpy()
    for (_, _, _, start), value in zip(layout, small.values()):
        buffer[start : start + value.nbytes] = (
            np.ascontiguousarray(value).reshape(-1).view(np.uint8)
        )
    return packed, layout, shared, slots


def unpack_batch(
    buffer: torch.Tensor,
    layout: list[tuple],
    shared: dict[str, torch.Tensor] | None = None,
    slots: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of a packed batch, as views of the buffer (no copies), and the frame
    tensors handed over as they were."""
    batch = {}
    for name, dtype, shape, start in layout:
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        torch_dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        batch[name] = buffer[start : start + size].view(torch_dtype).view(tuple(shape))
    return {**batch, **(shared or {})}
