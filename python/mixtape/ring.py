"""Shared-memory slots that DataLoader workers collate packed batches into.

A worker's batch normally reaches the main process by pickling (its tensors each through a fresh
shared-memory segment: open, map, a page fault per 4 KB at both ends), and the packing loader
used to ship the pieces and collate in the main process instead. With a ring, the main process
owns a block of shared memory cut into slots (made before the workers start, so they inherit or
receive it once), hands a free slot to each batch request it plans, the worker collates the batch
straight into that slot and returns only a small descriptor, and the main process wraps the
slot's memory as the batch's tensors without a copy.

A slot is reused only after every tensor (and every view of one) of the batch it holds is gone:
the tensors share one storage made by ``torch.frombuffer`` on a fresh ``memoryview`` of the slot,
and a finaliser on that memoryview puts the slot back on the free list. A batch the user keeps
keeps its slot; when none is free a request goes without one and its batch takes the ordinary
path (correct, only slower).
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import shutil
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["SLOT_ALIGN", "Filled", "InSlot", "Ring"]

SLOT_ALIGN = 4096  # slots start on page boundaries
_NUMPY_DTYPES: dict[torch.dtype, np.dtype[Any]] = {
    torch.int64: np.dtype(np.int64), torch.int32: np.dtype(np.int32),
    torch.bool: np.dtype(np.bool_), torch.float32: np.dtype(np.float32),
}  # fmt: skip


@dataclass(frozen=True)
class InSlot:
    """An array of a filled slot: its bytes at ``offset`` within the slot, shape, dtype, and
    whether the batch holds it as a tensor (else as numpy)."""

    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    tensor: bool


@dataclass(frozen=True)
class Filled:
    """A worker's answer to a request that carried a slot: the batch's fields (``InSlot`` for
    arrays in the slot, other tensors as numpy arrays named in ``tensors``, anything else as is;
    ``alias`` maps a field to the earlier field holding the same object), or ``None`` with the
    ``fallback`` the main process finishes itself (the batch did not fit the slot)."""

    ring: int  # Ring.token of the ring the slot belongs to
    slot: int
    generation: int  # Ring.generation when the slot was handed out
    fields: dict[str, Any] | None
    alias: dict[str, str] = field(default_factory=dict)
    tensors: frozenset[str] = frozenset()
    fallback: Any = None

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Plain tuples across the pipe (a dtype pickles slowly): pickled in the worker's queue
        thread, unpickled in the main process, once per batch."""
        fields = None if self.fields is None else tuple(
            (k, (v.offset, v.shape, v.dtype.str, v.tensor)) if isinstance(v, InSlot) else (k, v)
            for k, v in self.fields.items())  # fmt: skip
        slotted = None if self.fields is None else frozenset(
            k for k, v in self.fields.items() if isinstance(v, InSlot))  # fmt: skip
        return (_filled, (self.ring, self.slot, self.generation, fields, slotted,
                          tuple(self.alias.items()), self.tensors, self.fallback))  # fmt: skip


def _filled(ring: int, slot: int, generation: int, fields: Any, slotted: Any, alias: Any,
            tensors: frozenset[str], fallback: Any) -> Filled:  # fmt: skip
    out = None if fields is None else {
        k: InSlot(v[0], v[1], _dtype(v[2]), v[3]) if k in slotted else v for k, v in fields}
    return Filled(ring, slot, generation, out, dict(alias), tensors, fallback)


@functools.cache
def _dtype(s: str) -> np.dtype[Any]:
    return np.dtype(s)


class Ring:
    """``slots`` slots of ``slot_bytes`` (rounded up to ``SLOT_ALIGN``) in one shared block.

    The block is a ``memfd`` (Linux): anonymous shared memory, reserved up front with
    ``posix_fallocate`` so a lack of memory is an ``OSError`` here rather than a SIGBUS at the
    first write, and outside ``/dev/shm`` (64 MB by default in Docker and Kubernetes, where the
    DataLoader's own tensors already live). Workers inherit the mapping on fork and get the
    descriptor on spawn / forkserver. Elsewhere a torch shared tensor serves, if ``/dev/shm``
    has four times the room. ``OSError`` when neither can be had.
    """

    _tokens = 0

    def __init__(self, slots: int, slot_bytes: int) -> None:
        if slots < 1 or slot_bytes < 1:
            raise ValueError(f"a ring needs slots >= 1 and slot_bytes >= 1, got {slots}, "
                             f"{slot_bytes}")  # fmt: skip
        self.slots = int(slots)
        self.slot_bytes = -(-int(slot_bytes) // SLOT_ALIGN) * SLOT_ALIGN
        self._fd: int | None = None
        self.block: Any = None
        memfd = getattr(os, "memfd_create", None)
        if memfd is not None:
            fd = memfd("mixtape-ring", getattr(os, "MFD_CLOEXEC", 0))
            try:
                os.posix_fallocate(fd, 0, self.nbytes)
                self.block = mmap.mmap(fd, self.nbytes)
            except OSError:
                os.close(fd)
                raise
            self._fd = fd
            weakref.finalize(self, os.close, fd)
        else:  # pragma: no cover - not Linux
            room = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else 0
            if room and self.nbytes * 4 > room:
                raise OSError(f"/dev/shm has {room} bytes free, too few for a {self.nbytes}-byte "
                              "ring")  # fmt: skip
            self.block = torch.empty(self.nbytes, dtype=torch.uint8)
            self.block.share_memory_()
        Ring._tokens += 1
        self.token = Ring._tokens
        self._main_state()

    def _main_state(self) -> None:
        if isinstance(self.block, torch.Tensor):
            self._view: np.ndarray[Any, np.dtype[np.uint8]] = self.block.numpy()
        else:
            self._view = np.frombuffer(self.block, dtype=np.uint8)
        self._addr = int(self._view.ctypes.data)
        self._free = list(range(self.slots - 1, -1, -1))  # main process: pop() gives slot 0 first
        self._inflight: set[int] = set()  # handed to a request, not yet back
        self.generation = 0

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = {"slots": self.slots, "slot_bytes": self.slot_bytes,
                                 "token": self.token}  # fmt: skip
        if self._fd is not None:  # a worker started by spawn / forkserver maps the same memfd
            from multiprocessing.reduction import DupFd

            state["fd"] = DupFd(self._fd)
        else:
            state["block"] = self.block  # torch sends the shared tensor's descriptor
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        fd = state.pop("fd", None)
        self.__dict__.update(state)
        self._fd = None
        if fd is not None:
            fd = fd.detach()
            try:
                self.block = mmap.mmap(fd, self.nbytes)
            finally:
                os.close(fd)  # the mapping keeps the memory
        self._main_state()

    @property
    def nbytes(self) -> int:
        return self.slots * self.slot_bytes

    # --- main process ---------------------------------------------------------------------

    def take(self) -> tuple[int, int] | None:
        """(slot, generation) for a request about to be sent, or None when every slot is taken."""
        if not self._free:
            return None
        slot = self._free.pop()
        self._inflight.add(slot)
        return slot, self.generation

    def reclaim(self) -> None:
        """Slots handed to requests whose answers will never come (the workers that had them
        finished or stopped: a new epoch after torch drained them, or workers shut down). A new
        generation: an answer of the old one reaching :meth:`receive` is refused."""
        self._free.extend(sorted(self._inflight, reverse=True))
        self._inflight.clear()
        self.generation += 1

    def _release(self, slot: int) -> None:
        self._free.append(slot)

    def receive(self, filled: Filled) -> dict[str, Any] | None:
        """The batch of a filled slot as tensors on the slot's memory (the slot comes back when
        they are all gone); None when the worker fell back (the slot is free again)."""
        if filled.ring != self.token:
            raise RuntimeError(f"a batch from ring {filled.ring} reached ring {self.token}")
        if filled.generation != self.generation:  # its slot may be another batch's by now
            raise RuntimeError("a packed batch of an earlier iteration of this loader: iterate "
                               "one iterator of a loader at a time")  # fmt: skip
        if filled.slot not in self._inflight:  # never: answers of reclaimed slots cannot come
            raise RuntimeError(f"ring slot {filled.slot} came back but was not handed out")
        self._inflight.discard(filled.slot)
        if filled.fields is None:
            self._release(filled.slot)
            return None
        start = filled.slot * self.slot_bytes
        lease = memoryview(self._view)[start: start + self.slot_bytes]  # type: ignore[arg-type]
        weakref.finalize(lease, self._release, filled.slot)
        # One storage holding `lease` (torch.frombuffer keeps the object it was given; numpy's
        # frombuffer would keep the block instead), seen through numpy (cheaper views than
        # torch's): every field is a view of it, so the slot is free when all of them are gone.
        base = torch.frombuffer(lease, dtype=torch.uint8).numpy()
        del lease
        out: dict[str, Any] = {}
        for key, val in filled.fields.items():
            if isinstance(val, InSlot):
                size = math.prod(val.shape) * val.dtype.itemsize
                arr = base[val.offset: val.offset + size].view(val.dtype).reshape(val.shape)
                out[key] = torch.from_numpy(arr) if val.tensor else arr
            elif key in filled.tensors:
                out[key] = torch.from_numpy(val)
            else:
                out[key] = val
        for key, first in filled.alias.items():
            out[key] = out[first]
        return out

    # --- worker ---------------------------------------------------------------------------

    def slot_view(self, slot: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
        start = slot * self.slot_bytes
        return self._view[start: start + self.slot_bytes]

    def describe(self, ticket: tuple[int, int], batch: dict[str, Any]) -> Filled:
        """``batch`` (collated into ``slot_view`` of the ticket's slot) as the descriptor the
        main process receives: arrays inside the slot by offset, other tensors by value."""
        slot, generation = ticket
        lo = self._addr + slot * self.slot_bytes
        hi = lo + self.slot_bytes
        fields: dict[str, Any] = {}
        alias: dict[str, str] = {}
        tensors: set[str] = set()
        seen: dict[int, str] = {}
        for key, val in batch.items():
            if isinstance(val, (torch.Tensor, np.ndarray)):
                if id(val) in seen:
                    alias[key] = seen[id(val)]
                    continue
                seen[id(val)] = key
            if isinstance(val, torch.Tensor):
                ptr, nbytes = val.data_ptr(), val.numel() * val.element_size()
                if (val.device.type == "cpu" and nbytes and lo <= ptr and ptr + nbytes <= hi
                        and val.is_contiguous()):  # fmt: skip
                    dtype = _NUMPY_DTYPES.get(val.dtype) or val[:0].numpy().dtype
                    fields[key] = InSlot(ptr - lo, tuple(val.shape), dtype, True)
                else:
                    fields[key] = val.numpy(force=True)
                    tensors.add(key)
            elif isinstance(val, np.ndarray) and val.nbytes and val.flags.c_contiguous and (
                    lo <= val.ctypes.data and val.ctypes.data + val.nbytes <= hi):  # fmt: skip
                fields[key] = InSlot(val.ctypes.data - lo, val.shape, val.dtype, False)
            else:
                fields[key] = val
        return Filled(self.token, slot, generation, fields, alias, frozenset(tensors))
