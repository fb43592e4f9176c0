"""Typed wrappers over the compiled kernels: validate, pick CPU or CUDA by device, allocate.

The only importer of ``mixtape._C``. Host arrays are numpy (torch CPU tensors are viewed as numpy
without a copy); CUDA tensors go to the CUDA kernels as device pointers plus the current stream.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import functools
import math
import operator
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from mixtape import _C

if TYPE_CHECKING:
    import torch

__all__ = [
    "INDEX_DTYPES",
    "OVERFLOW_POLICIES",
    "PACK_FIELDS",
    "PACK_LAYOUTS",
    "PACK_STRATEGIES",
    "PackBatch",
    "PackPlan",
    "PieceReader",
    "as_offsets",
    "block_causal_mask",
    "build_info",
    "check_choice",
    "check_cuda_errors",
    "cuda_available",
    "get_num_threads",
    "ints_from_lists",
    "is_left",
    "pack_batch",
    "pack_fill",
    "pack_plan",
    "pack_rows",
    "pad",
    "padded_length",
    "set_num_threads",
]

# Shared type aliases of the Python layer.
IntArray = npt.NDArray[np.int32] | npt.NDArray[np.int64]
Int64Array = npt.NDArray[np.int64]
Side = Literal["left", "right"]
INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


@functools.cache
def cuda_available() -> bool:
    """True when the CUDA kernels were compiled and the CUDA runtime sees a GPU now."""
    return bool(_C.cuda_compiled) and _C.cuda_device_count() > 0


# --- threads -----------------------------------------------------------------------------------
# The kernels share one pool of threads per process (csrc/common/parallel.h). In a DataLoader
# worker it is 1 thread unless the user asked otherwise (MIXTAPE_NUM_THREADS, or set_num_threads
# called in that worker, e.g. from worker_init_fn): N workers each starting all cores' threads
# oversubscribe the node, as torch's own intra-op threads would (torch sets 1 there too).
_threads_decided = False  # this process applied its default (reset in a forked child)
_threads_explicit = False  # set_num_threads was called in this process


def _reset_threads_after_fork() -> None:
    global _threads_decided, _threads_explicit
    _threads_decided = _threads_explicit = False


os.register_at_fork(after_in_child=_reset_threads_after_fork)


def _decide_threads() -> None:
    """Once per process, before its first kernel: 1 thread in a DataLoader worker."""
    global _threads_decided
    env = os.environ.get("MIXTAPE_NUM_THREADS")
    if env is not None and not (env.isdigit() and int(env) >= 1):
        raise ValueError(f"MIXTAPE_NUM_THREADS must be an integer >= 1, got {env!r}")
    _threads_decided = True
    if _threads_explicit or env is not None:
        return
    data = sys.modules.get("torch.utils.data")  # only if torch is imported already: no import
    if data is not None and data.get_worker_info() is not None:
        _C.set_num_threads(1)


def _threads_ready() -> None:
    """This process's thread default applied before a parallel kernel (1 in a DataLoader
    worker): every kernel wrapper calls it, or N workers would each start all cores' threads."""
    if not _threads_decided:
        _decide_threads()


def set_num_threads(n: int) -> None:
    """Threads the CPU kernels may use in this process (the caller's included; >= 1).

    Overrides ``MIXTAPE_NUM_THREADS`` and the default (the CPUs of the affinity mask, capped by
    the cgroup CPU quota; 1 in a DataLoader worker). A forked child starts from the default again:
    call it in ``worker_init_fn`` to give DataLoader workers more than one thread.
    """
    global _threads_explicit, _threads_decided
    n = operator.index(n)
    if not 1 <= n <= _C.MAX_THREADS:
        raise ValueError(f"set_num_threads: n must be in [1, {_C.MAX_THREADS}], got {n}")
    _C.set_num_threads(n)
    _threads_explicit = _threads_decided = True


def get_num_threads() -> int:
    """Threads the CPU kernels may use in this process (see :func:`set_num_threads`)."""
    _threads_ready()
    return int(_C.get_num_threads())


def build_info() -> dict[str, Any]:
    """Compiler, flags and CUDA status of the compiled extension, and whether a GPU is usable."""
    info = dict(_C.build_info())
    info["cuda_device_count"] = _C.cuda_device_count()
    info["cuda_usable"] = cuda_available()
    return info


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Raise ValueError naming the option, the valid choices and the value given."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def is_left(name: str, side: str) -> bool:
    """Validate a padding/truncation side; True for "left"."""
    check_choice(name, side, ("left", "right"))
    return side == "left"


def _check_ids(name: str, values: Any) -> IntArray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name}: values must be 1-D, got shape {arr.shape}")
    if arr.dtype not in INDEX_DTYPES:
        if arr.size == 0 and arr.dtype == np.float64:  # np.asarray([]) is float64
            return np.zeros(0, dtype=np.int64)
        raise TypeError(f"{name}: token ids must be int32 or int64, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr)


def as_offsets(offsets: Any, name: str = "offsets") -> npt.NDArray[np.int64]:
    """Offsets as contiguous int64 rebased to start at 0 (Arrow slices start elsewhere)."""
    arr = np.asarray(offsets)
    if arr.ndim != 1 or arr.size < 1:
        raise ValueError(f"{name} must be 1-D with n + 1 >= 1 entries, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    out = np.ascontiguousarray(arr, dtype=np.int64)
    if out[0] != 0:
        out = out - out[0]
    return out


def ints_from_lists(
    rows: list[list[int]], name: str = "input_ids", first: int = 0
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Python lists of Python ints as a ragged int64 batch ``(values, offsets)``, read in C++.

    Rejects non-integers (TypeError) and ids beyond int64 (ValueError), naming the example
    (counted from ``first``) and position; integer-like items (numpy scalars) go through
    ``__index__``.
    """
    if not isinstance(rows, list):
        raise TypeError(f"{name}: expected a list of lists, got {type(rows).__name__}")
    return _C.ints_from_lists(rows, name, first)


def padded_length(
    longest: int, max_length: int | None = None, pad_to_multiple_of: int | None = None
) -> int:
    """Row length for a batch: the longest sequence, capped at max_length, rounded up.

    As a ``transformers`` tokenizer with truncation: at most ``max_length`` tokens are kept and
    the row is then rounded up to ``pad_to_multiple_of`` (so it may be longer than ``max_length``).
    """
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    length = longest if max_length is None else min(longest, max_length)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    return int(length)


def pad(
    values: Any,
    offsets: Any,
    *,
    labels: Any | None = None,
    label_offsets: Any | None = None,
    length: int | None = None,
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
    padding_side: Side = "right",
    truncation_side: Side = "right",
    pad_value: int = 0,
    label_pad_value: int = -100,
    return_attention_mask: bool = True,
    return_labels: bool = False,
    shift_labels: bool = False,
    dtype: npt.DTypeLike = np.int64,
    out: dict[str, Any] | None = None,
    check_ids: bool = True,
    name: str = "input_ids",
    _elementwise: bool = False,
) -> dict[str, Any]:
    """Pad a ragged batch into dense rows; ids, attention mask and labels in one pass.

    ``values``/``offsets`` are the ragged ids (numpy, or torch tensors: CUDA tensors run the CUDA
    kernel). ``max_length`` caps the tokens kept per row; ``length`` fixes the row length,
    otherwise it is :func:`padded_length` of the longest sequence. Labels are the ids unless
    ``labels``/``label_offsets`` give a ragged batch of the same lengths; ``out`` supplies
    buffers (numpy arrays or CPU tensors, e.g. pinned) to write into.
    Returns ``{"input_ids", "attention_mask"?, "labels"?}`` as numpy arrays (tensors on CUDA).
    """
    _threads_ready()
    pad_left = is_left("padding_side", padding_side)
    truncate_left = is_left("truncation_side", truncation_side)
    if _is_cuda_tensor(values):
        return _pad_cuda(
            values, offsets, labels, label_offsets, length, max_length, pad_to_multiple_of,
            pad_left, truncate_left, pad_value, label_pad_value, return_attention_mask,
            return_labels or labels is not None, shift_labels, dtype, out, name, check_ids,
        )  # fmt: skip
    vals = _check_ids(name, _host(values))
    offs = as_offsets(_host(offsets), f"{name} offsets")
    n = offs.size - 1
    if length is None:
        longest = int(np.max(np.diff(offs))) if n > 0 else 0
        length = padded_length(longest, max_length, pad_to_multiple_of)
    elif length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    max_tokens = _max_tokens(max_length)
    lab_vals: IntArray | None = None
    lab_offs: npt.NDArray[np.int64] | None = None
    if labels is not None:
        if label_offsets is None:
            raise ValueError("labels given without label_offsets")
        lab_vals = _check_ids("labels", _host(labels))
        if lab_vals.dtype != vals.dtype:  # the kernel reads both with one type: the wider
            vals, lab_vals = vals.astype(np.int64), lab_vals.astype(np.int64)
        lab_offs = as_offsets(_host(label_offsets), "labels offsets")
        return_labels = True
    out_dtype = np.dtype(dtype)
    if out_dtype not in INDEX_DTYPES:
        raise TypeError(f"dtype must be int32 or int64, got {out_dtype}")
    if out_dtype == np.int32:  # the kernel's C cast would wrap wider values silently
        _check_fits_int32(name, vals, offs, pad_value, "pad_value")
        if return_labels:
            _check_fits_int32("labels", lab_vals, lab_offs, label_pad_value, "label_pad_value")
    wanted = {"input_ids": True, "attention_mask": return_attention_mask, "labels": return_labels}
    result: dict[str, Any] = {}
    buffers: dict[str, Any] = {}
    # Outputs not given share one fresh block: freeing two or three separate MB-sized buffers
    # makes glibc trim the heap and page-fault them all again on the next batch (~9x slower).
    fresh = [k for k, want in wanted.items() if want and (out or {}).get(k) is None]
    block = np.empty((len(fresh), n, length), dtype=out_dtype)
    for key, want in wanted.items():
        if not want:
            continue
        given = (out or {}).get(key)
        if given is None:
            arr = block[fresh.index(key)]
            result[key] = arr
        else:
            arr = _host(given)
            if not isinstance(arr, np.ndarray) or arr.dtype != out_dtype:
                raise TypeError(f"out[{key!r}] must be a {out_dtype} array, got {type(given)}")
            if arr.shape != (n, length) or not arr.flags.c_contiguous:
                raise ValueError(
                    f"out[{key!r}] must be a contiguous array of shape {(n, length)}, "
                    f"got shape {arr.shape}"
                )
            result[key] = given
        buffers[key] = arr
    bad = _C.pad(
        vals, offs, lab_vals, lab_offs, length=length, max_tokens=max_tokens, pad_left=pad_left,
        truncate_left=truncate_left, pad_value=pad_value, label_pad_value=label_pad_value,
        shift_labels=shift_labels, out_ids=buffers["input_ids"],
        out_mask=buffers.get("attention_mask"), out_labels=buffers.get("labels"),
        check_negative=check_ids, elementwise=_elementwise,
    )  # fmt: skip
    if bad >= 0:
        row = vals[offs[bad] : offs[bad + 1]]
        keep = min(row.size, length)
        row = row[row.size - keep :] if truncate_left else row[:keep]
        raise ValueError(
            f"{name}: example {bad} has a negative token id ({int(row[row < 0][0])}); "
            "token ids must be >= 0"
        )
    return result


_INT32 = np.iinfo(np.int32)


def _check_fill_fits_int32(fill: int, fill_name: str) -> None:
    if not _INT32.min <= fill <= _INT32.max:
        raise ValueError(f"{fill_name} = {fill} does not fit the int32 output dtype")


def _unfit_message(name: str, example: int, value: int) -> str:
    return (
        f"{name}: example {example} has a value ({value}) that does not fit the int32 output "
        "dtype; use dtype=int64"
    )


def _check_fits_int32(
    name: str,
    values: npt.NDArray[Any] | None,
    offsets: npt.NDArray[np.int64] | None,
    fill: int,
    fill_name: str,
) -> None:
    """Raise ValueError naming the example when int32 outputs cannot hold a value or the fill
    (host arrays; ``values`` is checked only when it is int64)."""
    _check_fill_fits_int32(fill, fill_name)
    if values is None or offsets is None or values.dtype != np.int64:
        return
    bad = (values > _INT32.max) | (values < _INT32.min)
    if not bad.any():
        return
    pos = int(np.argmax(bad))
    ex = int(np.searchsorted(offsets, pos, side="right")) - 1
    raise ValueError(_unfit_message(name, ex, int(values[pos])))


def _max_tokens(max_length: int | None) -> int:
    """The kernel's cap on kept tokens: max_length, or -1 for none."""
    if max_length is None:
        return -1
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    return max_length


def _is_cuda_tensor(x: Any) -> bool:
    return getattr(x, "is_cuda", False) is True


def _host(x: Any) -> Any:
    """A numpy view of a CPU tensor (no copy); anything else unchanged."""
    if hasattr(x, "numpy") and hasattr(x, "is_cuda") and not x.is_cuda:
        return x.numpy()
    return x


# --- CUDA ----------------------------------------------------------------------------------------
# The CUDA paths never wait for the GPU (given host offsets): what can be checked without reading
# the tokens is checked on the host before anything is uploaded; what needs the tokens is checked
# by the kernel, which records the first offender for the host to read later.
#
# On the host, before the launch: offsets (non-decreasing, ending at the number of values), label
# lengths, the row length, caller-given outputs (shape, dtype, device, contiguity), a pack plan
# against the offsets (pack_check), pad_value / label_pad_value against an int32 output; the
# binding then checks every buffer's size, dtype and device (DeviceArray). The small host arrays
# (offsets, plan, per-piece fields) reach the device in one copy from pinned memory, asynchronous
# on the caller's stream (a pageable copy would wait for the stream's earlier work).
# On the device, in the kernel: negative kept ids (pad, check_ids) and ids / labels that do not fit
# an int32 output (every value for pad, as on the CPU; the written tokens for pack_fill). The
# kernel records the first offender and its value in a small device array, copied back
# asynchronously; check_cuda_errors() raises the ValueError the CPU path raises at once (and each
# later CUDA call raises it, without waiting, once that kernel has finished; verdicts still unread
# at exit are printed). Offsets given as CUDA tensors are read back to the host, which waits: pass
# host offsets (numpy, CPU tensors).

_CUDA_BUILD_HINT = (
    "this build of mixtape has no CUDA kernels (built with MIXTAPE_CUDA=OFF or without nvcc; see "
    "mixtape.build_info()): pass numpy arrays or CPU tensors, or reinstall with nvcc on PATH "
    "(MIXTAPE_CUDA=ON pip install --no-build-isolation --force-reinstall --no-deps .)"
)


def _require_cuda(op: str, device: Any) -> None:
    """Raise RuntimeError saying why the CUDA kernels cannot run here, before any launch."""
    if not _C.cuda_compiled:
        raise RuntimeError(f"{op}: the inputs are on {device}, but {_CUDA_BUILD_HINT}")
    if not cuda_available():
        status = _C.cuda_status()
        why = status["message"] or "the CUDA runtime of mixtape sees no GPU"
        raise RuntimeError(f"{op}: the inputs are on {device}, but {why}")


def _device_array(
    t: torch.Tensor | None,
    what: str,
    device: torch.device,
    dtypes: Sequence[torch.dtype],
    size: int | None = None,
) -> Any:
    """A tensor as the DeviceArray a CUDA binding takes (None stays None), after checking it is a
    contiguous tensor on `device` of one of `dtypes` and (if given) `size` elements: the one place
    tensors are taken apart into addresses for a launch."""
    if t is None:
        return None
    import torch

    if not (
        isinstance(t, torch.Tensor) and t.device == device and t.dtype in dtypes
        and t.is_contiguous() and (size is None or t.numel() == size)
    ):  # fmt: skip
        names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        count = "" if size is None else f" of {size} elements"
        raise ValueError(
            f"{what} must be a contiguous {names} tensor{count} on {device}, got "
            f"{type(t).__name__} {getattr(t, 'dtype', '')} {tuple(getattr(t, 'shape', ()))} "
            f"on {getattr(t, 'device', None)}"
        )
    index = t.device.index
    return _C.DeviceArray(
        ptr=int(t.data_ptr()), size=int(t.numel()), dtype=str(t.dtype).removeprefix("torch."),
        device=-1 if index is None else int(index),
    )  # fmt: skip


def _upload(arrays: Sequence[npt.NDArray[Any]], device: torch.device) -> list[torch.Tensor]:
    """Host integer arrays as device tensors of their dtype, through one pinned staging buffer
    and one asynchronous copy on the current stream."""
    import torch

    sizes = [int(a.size) for a in arrays]
    staging = torch.empty(max(1, sum(sizes)), dtype=torch.int64, pin_memory=True)
    host = staging.numpy()
    at = 0
    for a, size in zip(arrays, sizes, strict=True):
        host[at : at + size] = a.reshape(-1)
        at += size
    # The caching host allocator keeps the staging block until this copy has run.
    dev = staging.to(device, non_blocking=True)
    out, at = [], 0
    for a, size in zip(arrays, sizes, strict=True):
        t = dev[at : at + size]
        at += size
        out.append(t if a.dtype == np.int64 else t.to(torch.int32))  # int64 or int32 arrays
    return out


def _on_device(device: torch.device) -> Any:
    """A context in which `device` is the current CUDA device."""
    import torch

    return torch.cuda.device(device)


def _launch_stream(device: torch.device) -> Any:
    """The caller's current stream on `device` (a torch.cuda.Stream): kernels go there."""
    import torch

    return torch.cuda.current_stream(device)


@dataclass
class _DeviceCheck:
    event: Any  # torch.cuda.Event recorded after the flags' copy
    flags: Any  # pinned host tensor the flags are copied into
    report: Any  # Callable[[Int64Array], str | None]


_pending_checks: collections.deque[_DeviceCheck] = collections.deque()
_pending_lock = threading.Lock()


def _watch(errors: torch.Tensor, stream: Any, report: Any) -> None:
    """Copy a kernel's error flags back asynchronously (on `stream`, the launch's current
    stream); check_cuda_errors reads them later."""
    import torch

    flags = torch.empty(errors.numel(), dtype=torch.int64, pin_memory=True)
    flags.copy_(errors, non_blocking=True)
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(stream)
    global _exit_check_registered
    with _pending_lock:
        _pending_checks.append(_DeviceCheck(event, flags, report))
        if not _exit_check_registered:
            atexit.register(_check_at_exit)
            _exit_check_registered = True


_exit_check_registered = False


def _check_at_exit() -> None:
    """At exit, print the verdicts nobody read (e.g. of the last batch) instead of losing them."""
    while True:
        try:
            check_cuda_errors()
            return
        except ValueError as e:
            print(f"mixtape: {e}", file=sys.stderr)
        except Exception:  # a CUDA context already torn down: nothing left to report from
            return


def check_cuda_errors(wait: bool = True) -> None:
    """Raise the ValueError of the first earlier CUDA ``pad`` / ``pack_fill`` call whose kernel
    found bad inputs (a negative kept id; an id or label that does not fit an int32 output).

    The CUDA paths check those on the device without waiting for it; call this where an error
    must surface (e.g. once per step, or before using the outputs). ``wait=False`` reads only the
    calls whose kernels have finished (every CUDA call does that first).
    """
    while True:
        with _pending_lock:
            if not _pending_checks:
                return
            check = _pending_checks[0]
            if not wait and not check.event.query():
                return
            _pending_checks.popleft()
        if wait:
            check.event.synchronize()
        message = check.report(check.flags.numpy())
        if message is not None:
            raise ValueError(message)


_PAD_ERROR_SLOTS = 3  # csrc/pad/pad.h PadErrorSlot: negative id, unfit id, unfit label


def _found_on_device(op: str, device: Any, message: str) -> str:
    return (
        f"{message} (found on {device} by the kernel of an earlier mixtape {op} call, whose "
        "outputs hold wrapped or unchecked values)"
    )


def _pad_device_report(
    flags: Int64Array,
    offsets: Int64Array,
    label_offsets: Int64Array | None,
    name: str,
) -> str | None:
    """The CPU path's error for the flags a CUDA pad kernel recorded: positions (-1: none) in
    PadErrorSlot order, then the values at them; unfit values first, as the CPU path checks them
    before its kernel runs."""
    pos, val = flags[:_PAD_ERROR_SLOTS], flags[_PAD_ERROR_SLOTS:]

    def example(p: int, offs: Int64Array) -> int:
        return int(np.searchsorted(offs, p, side="right")) - 1

    if pos[1] >= 0:
        return _unfit_message(name, example(int(pos[1]), offsets), int(val[1]))
    if pos[2] >= 0 and label_offsets is not None:
        return _unfit_message("labels", example(int(pos[2]), label_offsets), int(val[2]))
    if pos[0] >= 0:
        return (
            f"{name}: example {example(int(pos[0]), offsets)} has a negative token id "
            f"({int(val[0])}); token ids must be >= 0"
        )
    return None


def _host_offsets(offsets: Any, name: str) -> Int64Array:
    """Offsets on the host (a CUDA tensor is copied back: the one wait of the CUDA paths)."""
    if _is_cuda_tensor(offsets):
        offsets = offsets.cpu()
    return as_offsets(_host(offsets), name)


def _pad_cuda(
    values: torch.Tensor,
    offsets: Any,
    labels: Any,
    label_offsets: Any,
    length: int | None,
    max_length: int | None,
    pad_to_multiple_of: int | None,
    pad_left: bool,
    truncate_left: bool,
    pad_value: int,
    label_pad_value: int,
    return_mask: bool,
    return_labels: bool,
    shift_labels: bool,
    dtype: npt.DTypeLike,
    out: dict[str, Any] | None,
    name: str,
    check_ids: bool = True,
) -> dict[str, Any]:
    import torch

    dev = values.device
    _require_cuda("pad", dev)
    check_cuda_errors(wait=False)
    if values.dtype not in (torch.int32, torch.int64) or values.dim() != 1:
        raise TypeError(f"{name}: CUDA values must be a 1-D int32/int64 tensor, got {values.dtype}")
    # Host checks: the kernel trusts the offsets.
    offs_host = _host_offsets(offsets, f"{name} offsets")
    n = offs_host.size - 1
    if n > 0 and (np.any(np.diff(offs_host) < 0) or offs_host[-1] != values.numel()):
        raise ValueError(f"{name}: offsets must be non-decreasing and end at {values.numel()}")
    if length is None:
        longest = int(np.max(np.diff(offs_host))) if n > 0 else 0
        length = padded_length(longest, max_length, pad_to_multiple_of)
    elif length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    lab_v: torch.Tensor | None = None
    lo: Int64Array | None = None
    if labels is not None:
        lab_v = torch.as_tensor(labels, device=dev)  # host labels: a (waiting) pageable copy
        if lab_v.dtype != values.dtype:  # the kernel reads both with one type: the wider
            values, lab_v = values.to(torch.int64), lab_v.to(torch.int64)
        lab_v = lab_v.contiguous()
        lo = _host_offsets(label_offsets, "labels offsets")
        if lo.size != offs_host.size or lo[-1] != lab_v.numel():  # the kernel trusts them
            raise ValueError(
                f"labels: offsets have {lo.size} entries ending at {int(lo[-1])} for "
                f"{lab_v.numel()} values; expected {offs_host.size} entries (as {name})"
            )
        if not np.array_equal(np.diff(lo), np.diff(offs_host)):
            bad = int(np.argmax(np.diff(lo) != np.diff(offs_host)))
            raise ValueError(f"labels of example {bad} differ in length from its {name}")
    tdtype = torch.int64 if np.dtype(dtype) == np.int64 else torch.int32
    if tdtype == torch.int32:  # the values are checked by the kernel
        _check_fill_fits_int32(pad_value, "pad_value")
        if return_labels:
            _check_fill_fits_int32(label_pad_value, "label_pad_value")
    result: dict[str, Any] = {}
    for key, want in (("input_ids", True), ("attention_mask", return_mask),
                      ("labels", return_labels)):  # fmt: skip
        if want:
            given = (out or {}).get(key)
            if given is not None and not (  # the kernel writes n * length through its pointer
                isinstance(given, torch.Tensor) and given.device == dev
                and given.dtype == tdtype and given.shape == (n, length) and given.is_contiguous()
            ):  # fmt: skip
                raise ValueError(
                    f"out[{key!r}] must be a contiguous {tdtype} tensor of shape {(n, length)} "
                    f"on {dev}, got {type(given).__name__} {getattr(given, 'dtype', '')} "
                    f"{tuple(getattr(given, 'shape', ()))} on {getattr(given, 'device', None)}"
                )
            result[key] = given if given is not None else torch.empty(
                (n, length), dtype=tdtype, device=dev
            )
    # The launch: nothing below waits for the device.
    narrows = tdtype == torch.int32 and values.dtype == torch.int64
    watch = check_ids or narrows
    vals = values.contiguous()  # held until the launch (a temporary would be freed before)
    with _on_device(dev):  # launch on the tensors' GPU, not the current one
        uploads = _upload([offs_host] + ([lo] if lo is not None else []), dev)
        errors = torch.empty(2 * _PAD_ERROR_SLOTS, dtype=torch.int64, device=dev) if watch else None
        stream = _launch_stream(dev)
        ints = (torch.int32, torch.int64)
        _C.pad_cuda(
            values=_device_array(vals, "values", dev, ints),
            offsets=_device_array(uploads[0], "offsets", dev, (torch.int64,)),
            label_values=_device_array(lab_v, "labels", dev, ints),
            label_offsets=_device_array(uploads[1] if lo is not None else None,
                                        "label offsets", dev, (torch.int64,)),
            out_ids=_device_array(result["input_ids"], "out['input_ids']", dev, (tdtype,)),
            out_mask=_device_array(result.get("attention_mask"), "out['attention_mask']", dev,
                                   (tdtype,)),
            out_labels=_device_array(result.get("labels"), "out['labels']", dev, (tdtype,)),
            errors=_device_array(errors, "errors", dev, (torch.int64,)),
            length=length, max_tokens=_max_tokens(max_length), pad_left=pad_left,
            truncate_left=truncate_left, pad_value=pad_value, label_pad_value=label_pad_value,
            shift_labels=shift_labels, check_negative=check_ids, stream=int(stream.cuda_stream),
        )  # fmt: skip
        if errors is not None:
            label_offs = lo if lab_v is not None else None
            _watch(errors, stream, lambda flags: (
                None if (m := _pad_device_report(flags, offs_host, label_offs, name)) is None
                else _found_on_device("pad", dev, m)
            ))  # fmt: skip
    return result


# --- packing -----------------------------------------------------------------------------------

PACK_STRATEGIES = ("bfd", "ffd", "next_fit", "wrapped")
OVERFLOW_POLICIES = ("split", "truncate", "drop", "error")
PACK_LAYOUTS = ("padded", "flat")
PACK_FIELDS = (
    "input_ids",
    "labels",
    "position_ids",
    "seq_idx",
    "loss_mask",
    "cu_seqlens",
    "cu_seqlens_padded",
    "max_seqlen",
    "doc_lens",
    "doc_ids",
)
_TOKEN_FIELDS = ("input_ids", "labels", "position_ids", "seq_idx", "loss_mask")
_PLAN_ARRAYS = ("row_offsets", "doc", "start", "length", "column")
_PLAN_COUNTS = (
    "num_docs",
    "num_tokens",
    "truncated_tokens",
    "dropped_docs",
    "dropped_tokens",
    "split_docs",
)


@dataclass(frozen=True, eq=False)
class PackPlan:
    """Rows of capacity C as pieces (doc, start, length, column); row r holds pieces
    ``row_offsets[r]:row_offsets[r + 1]`` at increasing columns.

    The counters describe the planned input (kept unchanged by :meth:`select_rows`, since
    ``doc`` still indexes the same sequences).
    """

    capacity: int
    strategy: str
    row_offsets: Int64Array
    doc: Int64Array
    start: Int64Array
    length: Int64Array
    column: Int64Array
    num_docs: int
    num_tokens: int
    truncated_tokens: int = 0
    dropped_docs: int = 0
    dropped_tokens: int = 0
    split_docs: int = 0

    __hash__ = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        for name in _PLAN_ARRAYS:
            arr = np.ascontiguousarray(getattr(self, name), dtype=np.int64)
            if arr.ndim != 1:
                raise ValueError(f"PackPlan.{name} must be 1-D, got shape {arr.shape}")
            object.__setattr__(self, name, arr)
        if self.row_offsets.size < 1:
            raise ValueError("PackPlan.row_offsets needs num_rows + 1 >= 1 entries")
        sizes = {name: getattr(self, name).size for name in _PLAN_ARRAYS[1:]}
        if len(set(sizes.values())) != 1 or int(self.row_offsets[-1]) != sizes["doc"]:
            raise ValueError(
                f"PackPlan: doc/start/length/column sizes {sizes} must agree with "
                f"row_offsets[-1] = {int(self.row_offsets[-1])}"
            )

    @property
    def num_rows(self) -> int:
        """Rows, including empty rows appended by ``rows_multiple_of``."""
        return int(self.row_offsets.size - 1)

    @property
    def num_pieces(self) -> int:
        return int(self.doc.size)

    @property
    def packed_tokens(self) -> int:
        """Tokens placed in rows (the flat layout's length)."""
        return int(self.length.sum())

    def row_lengths(self) -> Int64Array:
        """Used columns per row: end of its last piece (alignment gaps included), 0 if empty."""
        out = np.zeros(self.num_rows, dtype=np.int64)
        counts = np.diff(self.row_offsets)
        nonempty = counts > 0
        last = self.row_offsets[1:][nonempty] - 1
        out[nonempty] = self.column[last] + self.length[last]
        return out

    def select_rows(self, start: int, stop: int) -> PackPlan:
        """Rows ``start:stop`` as a plan of their own (row_offsets rebased to 0; views, no copy)."""
        if not 0 <= start <= stop <= self.num_rows:
            raise ValueError(
                f"select_rows({start}, {stop}): need 0 <= start <= stop <= {self.num_rows}"
            )
        a, b = int(self.row_offsets[start]), int(self.row_offsets[stop])
        return dataclasses.replace(
            self,
            row_offsets=self.row_offsets[start : stop + 1] - a,
            doc=self.doc[a:b],
            start=self.start[a:b],
            length=self.length[a:b],
            column=self.column[a:b],
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan to an ``.npz`` file (exact round trip with :meth:`load`)."""
        scalars = {name: np.int64(getattr(self, name)) for name in ("capacity", *_PLAN_COUNTS)}
        arrays = {name: getattr(self, name) for name in _PLAN_ARRAYS}
        np.savez(path, strategy=np.str_(self.strategy), **scalars, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PackPlan:
        """Read a plan written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("capacity", "strategy", *_PLAN_COUNTS, *_PLAN_ARRAYS)
                       if k not in z.files]  # fmt: skip
            if missing:
                raise ValueError(f"{path}: not a saved PackPlan (missing {missing})")
            counts = {name: int(z[name]) for name in ("capacity", *_PLAN_COUNTS)}
            arrays = {name: np.array(z[name], dtype=np.int64) for name in _PLAN_ARRAYS}
            return cls(strategy=str(z["strategy"]), **counts, **arrays)  # type: ignore[arg-type]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PackPlan):
            return NotImplemented
        return (
            self.capacity == other.capacity
            and self.strategy == other.strategy
            and all(getattr(self, k) == getattr(other, k) for k in _PLAN_COUNTS)
            and all(np.array_equal(getattr(self, k), getattr(other, k)) for k in _PLAN_ARRAYS)
        )


def _check_lengths(lengths: Any) -> IntArray:
    arr = np.asarray(_host(lengths))
    if arr.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"lengths must be integers, got dtype {arr.dtype}")
    if arr.dtype not in INDEX_DTYPES:
        if arr.dtype == np.uint64 and int(arr.max()) > np.iinfo(np.int64).max:
            bad = int(np.argmax(arr > np.iinfo(np.int64).max))
            raise ValueError(f"lengths[{bad}] = {int(arr[bad])} is too large")
        arr = arr.astype(np.int64)
    return np.ascontiguousarray(arr)


def pack_plan(
    lengths: Any,
    capacity: int,
    *,
    strategy: str = "bfd",
    overflow: str = "split",
    max_docs_per_row: int | None = None,
    align: int = 1,
    rows_multiple_of: int | None = None,
    shuffle_seed: int | None = None,
) -> PackPlan:
    """Assign sequences of the given lengths to rows of ``capacity`` tokens (deterministic).

    ``strategy``: ``bfd`` (best-fit decreasing, O(n log C)), ``ffd``, ``next_fit`` (input order
    kept) or ``wrapped`` (concatenate and cut every C tokens; ``overflow`` then does not apply).
    ``overflow`` for sequences longer than C: ``split`` into C-token pieces, ``truncate``,
    ``drop`` or ``error``. Each piece starts at a multiple of ``align``; ``max_docs_per_row``
    caps the pieces per row; ``rows_multiple_of`` appends empty rows; ``shuffle_seed`` permutes
    the rows (before those empty rows are appended) with a platform-independent RNG.
    """
    check_choice("strategy", strategy, PACK_STRATEGIES)
    check_choice("overflow", overflow, OVERFLOW_POLICIES)
    capacity = operator.index(capacity)
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    align = operator.index(align)
    if align < 1 or capacity % align != 0:
        raise ValueError(f"align must be >= 1 and divide capacity={capacity}, got {align}")
    if max_docs_per_row is not None and max_docs_per_row < 1:
        raise ValueError(f"max_docs_per_row must be >= 1 or None, got {max_docs_per_row}")
    if rows_multiple_of is not None and rows_multiple_of < 1:
        raise ValueError(f"rows_multiple_of must be >= 1 or None, got {rows_multiple_of}")
    if shuffle_seed is not None and not 0 <= shuffle_seed < 2**64:
        raise ValueError(f"shuffle_seed must be in [0, 2**64), got {shuffle_seed}")
    arr = _check_lengths(lengths)
    _threads_ready()
    r = _C.pack_plan(
        arr, capacity=capacity, strategy=strategy, overflow=overflow,
        max_docs_per_row=max_docs_per_row or 0, align=align,
        rows_multiple_of=rows_multiple_of or 1, shuffle_seed=shuffle_seed,
    )  # fmt: skip
    return PackPlan(
        capacity=capacity,
        strategy=strategy,
        row_offsets=r["row_offsets"],
        doc=r["doc"],
        start=r["start"],
        length=r["length"],
        column=r["column"],
        num_docs=int(arr.size),
        num_tokens=r["num_tokens"],
        truncated_tokens=r["truncated_tokens"],
        dropped_docs=r["dropped_docs"],
        dropped_tokens=r["dropped_tokens"],
        split_docs=r["split_docs"],
    )


class PackBatch(NamedTuple):
    """One packed batch of :func:`pack_batch`: the kept rows' pieces (row by row, CSR over
    ``row_offsets``) and the pieces carried to the next batch (``carry``, [n, 4])."""

    sources: npt.NDArray[np.int32]
    rows: Int64Array
    starts: Int64Array
    lengths: Int64Array
    row_offsets: Int64Array
    carry: Int64Array  # [n, 4]: source, row, start, length
    num_rows: int  # rows of the plan; min(batch_size, num_rows) were kept
    carry_tokens: int  # tokens of the carried pieces


def pack_batch(
    carry: Any,
    doc_sources: Any,
    doc_rows: Any,
    doc_lengths: Any,
    *,
    capacity: int,
    batch_size: int,
    strategy: str = "bfd",
) -> PackBatch:
    """One batch of the packing loader's planner, in one C++ call.

    The carried pieces ([n, 4]: source, row, start, length), then each document cut into pieces
    of at most ``capacity`` tokens (empty documents give none), are packed by :func:`pack_plan`
    (``strategy``); the ``batch_size`` rows holding the most tokens (ties: the earlier row) are
    the batch, in plan order, and the pieces of the other rows are carried, in plan order.
    """
    check_choice("strategy", strategy, PACK_STRATEGIES)
    c = np.ascontiguousarray(carry, dtype=np.int64)
    if c.size == 0:
        c = c.reshape(0, 4)
    if c.ndim != 2 or c.shape[1] != 4:
        raise ValueError(f"pack_batch: carry must have shape (n, 4), got {c.shape}")
    src = _index_array(doc_sources)
    rows = _index_array(doc_rows)
    for name, arr, top in (("doc_sources", src, np.iinfo(np.int32).max),
                           ("doc_rows", rows, np.iinfo(np.int64).max)):  # fmt: skip
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > top):
            bad = int(arr.min()) if int(arr.min()) < 0 else int(arr.max())
            raise ValueError(f"pack_batch: {name} holds {bad}, outside [0, {top}]")
    return _pack_batch(c, src.astype(np.int32), rows, _index_array(doc_lengths),
                       operator.index(capacity), operator.index(batch_size), strategy)


def _index_array(a: Any) -> Int64Array:
    arr = np.asarray(a)
    if arr.dtype.kind not in "iu" and arr.size:
        raise TypeError(f"pack_batch: expected integers, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"pack_batch: value {int(arr.max())} does not fit int64")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _pack_batch(carry: Int64Array, doc_sources: npt.NDArray[np.int32], doc_rows: Int64Array,
                doc_lengths: Int64Array, capacity: int, batch_size: int,
                strategy: str) -> PackBatch:  # fmt: skip
    """:func:`pack_batch` on arrays already of the kernel's dtypes and shapes (the loader's
    planner builds them so; the kernel checks sizes and values, not conversions)."""
    _threads_ready()
    return PackBatch(*_C.pack_batch(carry, doc_sources, doc_rows, doc_lengths, capacity=capacity,
                                    batch_size=batch_size, strategy=strategy))  # fmt: skip


def _padded_cu_seqlens(plan: PackPlan) -> Int64Array:
    """Boundaries over the rows * C flattened tokens: every piece and every padding run is one
    segment (a row start, then each piece's start and end; repeated boundaries removed)."""
    rows, pieces, cap = plan.num_rows, plan.num_pieces, plan.capacity
    counts = np.diff(plan.row_offsets)
    piece_row = np.repeat(np.arange(rows, dtype=np.int64), counts)
    points = np.empty(2 * pieces + rows + 1, dtype=np.int64)
    row_at = 2 * plan.row_offsets[:-1] + np.arange(rows, dtype=np.int64)
    points[row_at] = np.arange(rows, dtype=np.int64) * cap
    piece_at = 2 * np.arange(pieces, dtype=np.int64) + piece_row + 1
    begin = piece_row * cap + plan.column
    points[piece_at] = begin
    points[piece_at + 1] = begin + plan.length
    points[-1] = rows * cap
    keep = np.ones(points.size, dtype=bool)
    keep[1:] = points[1:] != points[:-1]
    return points[keep]


def _piece_fields(
    plan: PackPlan, wanted: set[str], flat: bool, cu_seqlens_size: int | None
) -> dict[str, Any]:
    """The per-piece fields (numpy; O(pieces))."""
    out: dict[str, Any] = {}
    want_cu = bool({"cu_seqlens", "cu_seqlens_padded"} & wanted)
    # max_seqlen is the longest segment of cu_seqlens: in the padded layout padding runs (and
    # rows without pieces) are segments too, and a varlen kernel given less skips their queries
    padded_max = "max_seqlen" in wanted and not flat and plan.num_rows > 0
    cu = np.zeros(1, dtype=np.int64)
    if want_cu or padded_max:
        if flat:
            cu = np.zeros(plan.num_pieces + 1, dtype=np.int64)
            np.cumsum(plan.length, out=cu[1:])
        else:
            cu = _padded_cu_seqlens(plan)
    if want_cu:
        if cu[-1] > np.iinfo(np.int32).max:
            raise ValueError(f"cu_seqlens: {int(cu[-1])} tokens do not fit int32; fill fewer rows")
        if "cu_seqlens" in wanted:
            out["cu_seqlens"] = cu.astype(np.int32)
        if "cu_seqlens_padded" in wanted:
            if cu_seqlens_size is None or cu_seqlens_size < cu.size:
                raise ValueError(
                    f"cu_seqlens_padded needs cu_seqlens_size >= {cu.size} (the cu_seqlens of "
                    f"these rows), got {cu_seqlens_size}"
                )
            padded = np.full(cu_seqlens_size, cu[-1], dtype=np.int32)
            padded[: cu.size] = cu
            out["cu_seqlens_padded"] = padded
    if "max_seqlen" in wanted:
        longest = int(plan.length.max()) if plan.num_pieces else 0
        out["max_seqlen"] = max(longest, int(np.diff(cu).max())) if padded_max else longest
    if "doc_lens" in wanted:
        out["doc_lens"] = plan.length.astype(np.int32)
    if "doc_ids" in wanted:
        out["doc_ids"] = plan.doc.copy()
    return out


def pack_fill(
    plan: PackPlan,
    values: Any,
    offsets: Any,
    *,
    layout: str = "padded",
    pad_value: int = 0,
    label_pad_value: int = -100,
    position_start: int = 0,
    fields: Sequence[str] = ("input_ids", "labels", "position_ids"),
    cu_seqlens_size: int | None = None,
    dtype: npt.DTypeLike = np.int64,
    out: dict[str, Any] | None = None,
    _elementwise: bool = False,
) -> dict[str, Any]:
    """Materialise the rows of ``plan`` from the ragged tokens ``values``/``offsets``.

    ``offsets`` has ``plan.num_docs + 1`` entries (``plan.doc`` indexes it). ``layout``:
    ``padded`` gives ``[rows, C]`` token fields, ``flat`` gives ``[1, T]`` (pieces back to back).
    Labels are ``label_pad_value`` at the first token of every piece and on padding, as in
    transformers' ``DataCollatorWithFlattening``. CUDA tensors run the CUDA kernel. Returns the
    requested ``fields`` (numpy, or tensors on the values' device; ``max_seqlen`` as int).
    ``out`` supplies token-field buffers to write into (host only; e.g. pinned, reused between
    batches: a fresh 240 MB output costs more in page faults than the fill itself).
    """
    _threads_ready()
    check_choice("layout", layout, PACK_LAYOUTS)
    if isinstance(fields, str):
        raise TypeError(f"fields must be a sequence of names, got the string {fields!r}")
    wanted = set(fields)
    unknown = sorted(wanted - set(PACK_FIELDS))
    if unknown:
        raise ValueError(f"unknown pack_fill fields {unknown}; valid fields: {PACK_FIELDS}")
    out_dtype = np.dtype(dtype)
    if out_dtype not in INDEX_DTYPES:
        raise TypeError(f"dtype must be int32 or int64, got {out_dtype}")
    flat = layout == "flat"
    if out_dtype == np.int32:  # the token values themselves are checked by the kernel
        if "input_ids" in wanted:
            _check_fill_fits_int32(pad_value, "pad_value")
        if "labels" in wanted:
            _check_fill_fits_int32(label_pad_value, "label_pad_value")
    if _is_cuda_tensor(values):
        if out:
            raise ValueError("pack_fill: out= buffers are supported for host (CPU) fills only")
        return _pack_fill_cuda(
            plan, values, offsets, wanted, flat, pad_value, label_pad_value, position_start,
            cu_seqlens_size, out_dtype,
        )  # fmt: skip
    vals = _check_ids("pack_fill values", _host(values))
    offs = as_offsets(_host(offsets), "pack_fill offsets")
    if offs.size != plan.num_docs + 1:
        raise ValueError(
            f"offsets has {offs.size} entries but the plan indexes {plan.num_docs} documents "
            f"(expected {plan.num_docs + 1} entries)"
        )
    result = _piece_fields(plan, wanted, flat, cu_seqlens_size)
    shape = (1, plan.packed_tokens) if flat else (plan.num_rows, plan.capacity)
    dtypes = {"input_ids": out_dtype, "labels": out_dtype, "position_ids": np.dtype(np.int64),
              "seq_idx": np.dtype(np.int32), "loss_mask": np.dtype(bool)}  # fmt: skip
    buf: dict[str, Any] = {}
    for key in _TOKEN_FIELDS:
        if key not in wanted:
            continue
        given = (out or {}).get(key)
        if given is None:
            buf[key] = np.empty(shape, dtype=dtypes[key])
            result[key] = buf[key]
            continue
        arr = _host(given)
        if not isinstance(arr, np.ndarray) or arr.dtype != dtypes[key]:
            raise TypeError(
                f"out[{key!r}] must be a {dtypes[key]} array, got {type(given).__name__} "
                f"of dtype {getattr(given, 'dtype', None)}"
            )
        if arr.shape != shape or not arr.flags.c_contiguous:
            raise ValueError(
                f"out[{key!r}] must be a contiguous array of shape {shape}, got shape {arr.shape}"
            )
        buf[key] = arr
        result[key] = given
    unfit = _C.pack_fill(
        vals, offs, plan.row_offsets, plan.doc, plan.start, plan.length, plan.column,
        capacity=plan.capacity, flat=flat, pad_value=pad_value, label_pad_value=label_pad_value,
        position_start=position_start, out_ids=buf.get("input_ids"),
        out_labels=buf.get("labels"), out_positions=buf.get("position_ids"),
        out_seq_idx=buf.get("seq_idx"), out_loss_mask=buf.get("loss_mask"),
        elementwise=_elementwise,
    )  # fmt: skip
    if unfit >= 0:
        raise ValueError(_pack_unfit_message(wanted, offs, unfit, int(vals[unfit])))
    return {k: result[k] for k in PACK_FIELDS if k in wanted}


PACK_ROWS_FIELDS = ("input_ids", "labels", "position_ids", "seq_idx", "tags", "cu_seqlens")


def pack_rows(
    values: Any,
    lengths: Any,
    row_offsets: Any,
    piece_tag: Any = None,
    *,
    capacity: int,
    pad_value: int = 0,
    label_pad_value: int = -100,
    position_start: int = 0,
    tag_pad: int = -1,
    fields: Sequence[str] = ("input_ids", "labels", "position_ids"),
    out: dict[str, npt.NDArray[Any]] | None = None,
    name: str = "input_ids",
) -> dict[str, Any]:
    """Rows of pieces laid back to back (piece ``k`` holds the next ``lengths[k]`` of ``values``,
    row ``r`` the pieces ``row_offsets[r]:row_offsets[r + 1]``) in :func:`pack_fill`'s padded
    layout, every field in one pass: the packing loader's collate, without a plan to build.

    ``fields``: of ``PACK_ROWS_FIELDS``; ``tags`` lays ``piece_tag`` out per token (``tag_pad`` on
    padding), ``cu_seqlens`` (int32) bounds every piece and padding run as pack_fill's does and
    adds ``max_seqlen``. ``out`` supplies ``[rows, capacity]`` buffers by field name (int64;
    ``seq_idx`` int32). ``name`` is the ids' field in error messages.
    """
    wanted = set(fields)
    unknown = sorted(wanted - set(PACK_ROWS_FIELDS))
    if unknown:
        raise ValueError(f"unknown pack_rows fields {unknown}; valid fields: {PACK_ROWS_FIELDS}")
    vals = _check_ids("pack_rows values", values)
    lens = np.ascontiguousarray(lengths, dtype=np.int64)
    offs = np.ascontiguousarray(row_offsets, dtype=np.int64)
    tag = None if piece_tag is None else np.ascontiguousarray(piece_tag, dtype=np.int64)
    if "tags" in wanted and tag is None:
        raise ValueError("pack_rows: the tags field needs piece_tag")
    if offs.ndim != 1 or offs.size < 1:
        raise ValueError(f"pack_rows: row_offsets must be 1-D with rows + 1 entries, got shape "
                         f"{offs.shape}")  # fmt: skip
    shape = (offs.size - 1, int(capacity))
    result: dict[str, Any] = {}
    for key in ("input_ids", "labels", "position_ids", "seq_idx", "tags"):
        if key in wanted:
            dt = np.dtype(np.int32 if key == "seq_idx" else np.int64)
            given = (out or {}).get(key)
            if given is None:
                given = np.empty(shape, dtype=dt)
            elif given.dtype != dt or given.shape != shape or not given.flags.c_contiguous:
                raise ValueError(f"pack_rows: out[{key!r}] must be a contiguous {dt} array of "
                                 f"shape {shape}, got {given.dtype} {given.shape}")  # fmt: skip
            result[key] = given
    cu = np.empty(2 * lens.size + shape[0] + 1, dtype=np.int32) if "cu_seqlens" in wanted else None
    _threads_ready()
    n_cu, longest, negative = _C.pack_rows(
        vals, lens, offs, tag, capacity=int(capacity), pad_value=pad_value,
        label_pad_value=label_pad_value, position_start=position_start, tag_pad=tag_pad,
        out_ids=result.get("input_ids"), out_labels=result.get("labels"),
        out_positions=result.get("position_ids"), out_seq_idx=result.get("seq_idx"),
        out_tags=result.get("tags"), out_cu_seqlens=cu,
    )  # fmt: skip
    if negative >= 0:
        starts = np.cumsum(lens) - lens
        piece = int(np.searchsorted(starts, negative, side="right")) - 1
        raise ValueError(f"{name}: piece {piece} has a negative token id "
                         f"({int(vals[negative])}); token ids must be >= 0")  # fmt: skip
    if cu is not None:
        result["cu_seqlens"] = cu[:n_cu]
        result["max_seqlen"] = int(longest)
    return result


def _pack_unfit_message(wanted: set[str], offsets: Int64Array, pos: int, value: int) -> str:
    """pack_fill's error for a token (index `pos` into the values) that an int32 output cannot
    hold: the field, the document, the position in it and the value."""
    doc = int(np.searchsorted(offsets, pos, side="right")) - 1
    field = "input_ids" if "input_ids" in wanted else "labels"
    return (
        f"pack_fill {field}: document {doc} has a token id ({value}) at position "
        f"{pos - int(offsets[doc])} that does not fit the int32 output dtype; use dtype=int64"
    )


def _pack_fill_cuda(
    plan: PackPlan,
    values: torch.Tensor,
    offsets: Any,
    wanted: set[str],
    flat: bool,
    pad_value: int,
    label_pad_value: int,
    position_start: int,
    cu_seqlens_size: int | None,
    out_dtype: np.dtype[Any],
) -> dict[str, Any]:
    import torch

    dev = values.device
    _require_cuda("pack_fill", dev)
    check_cuda_errors(wait=False)
    if values.dtype not in (torch.int32, torch.int64) or values.dim() != 1:
        raise TypeError(
            f"pack_fill: CUDA values must be a 1-D int32/int64 tensor, got {values.dtype} "
            f"with shape {tuple(values.shape)}"
        )
    offs_host = _host_offsets(offsets, "pack_fill offsets")
    if offs_host.size != plan.num_docs + 1:
        raise ValueError(
            f"offsets has {offs_host.size} entries but the plan indexes {plan.num_docs} "
            f"documents (expected {plan.num_docs + 1} entries)"
        )
    if np.any(np.diff(offs_host) < 0) or offs_host[-1] != values.numel():
        raise ValueError(f"pack_fill: offsets must be non-decreasing and end at {values.numel()}")
    # The kernel trusts the plan: check it on the host first.
    tokens = _C.pack_check(
        offs_host, plan.row_offsets, plan.doc, plan.start, plan.length, plan.column,
        capacity=plan.capacity,
    )  # fmt: skip
    host = _piece_fields(plan, wanted, flat, cu_seqlens_size)
    shape = (1, tokens) if flat else (plan.num_rows, plan.capacity)
    tdtype = torch.int64 if out_dtype == np.int64 else torch.int32
    dtypes = {"input_ids": tdtype, "labels": tdtype, "position_ids": torch.int64,
              "seq_idx": torch.int32, "loss_mask": torch.bool}  # fmt: skip
    # The launch: nothing below waits for the device.
    narrows = tdtype == torch.int32 and values.dtype == torch.int64
    watch = narrows and bool(wanted & {"input_ids", "labels"})
    vals = values.contiguous()  # held until the launch
    with _on_device(dev):  # launch on the tensors' GPU, not the current one
        small = [offs_host] + [getattr(plan, k) for k in _PLAN_ARRAYS]
        if flat:
            fo = np.zeros(plan.num_pieces + 1, dtype=np.int64)
            np.cumsum(plan.length, out=fo[1:])
            small.append(fo)
        arrays = {k: v for k, v in host.items() if isinstance(v, np.ndarray)}
        uploaded = _upload(small + list(arrays.values()), dev)
        d_offs, d_plan = uploaded[0], dict(zip(_PLAN_ARRAYS, uploaded[1:6], strict=True))
        d_flat = uploaded[6] if flat else None
        result: dict[str, Any] = dict(host)
        result.update(zip(arrays, uploaded[len(small) :], strict=True))
        buf = {k: torch.empty(shape, dtype=dtypes[k], device=dev) for k in _TOKEN_FIELDS
               if k in wanted}  # fmt: skip
        errors = torch.empty(2, dtype=torch.int64, device=dev) if watch else None
        stream = _launch_stream(dev)
        i64 = (torch.int64,)

        def arg(key: str, t: torch.Tensor | None, dtypes: Sequence[torch.dtype] = i64) -> Any:
            return _device_array(t, key, dev, dtypes)

        _C.pack_fill_cuda(
            values=arg("values", vals, (torch.int32, torch.int64)), offsets=arg("offsets", d_offs),
            row_offsets=arg("row_offsets", d_plan["row_offsets"]), doc=arg("doc", d_plan["doc"]),
            start=arg("start", d_plan["start"]), length=arg("length", d_plan["length"]),
            column=arg("column", d_plan["column"]), flat_offsets=arg("flat_offsets", d_flat),
            out_ids=arg("input_ids", buf.get("input_ids"), (tdtype,)),
            out_labels=arg("labels", buf.get("labels"), (tdtype,)),
            out_positions=arg("position_ids", buf.get("position_ids")),
            out_seq_idx=arg("seq_idx", buf.get("seq_idx"), (torch.int32,)),
            out_loss_mask=arg("loss_mask", buf.get("loss_mask"), (torch.bool,)),
            errors=arg("errors", errors), capacity=plan.capacity, tokens=tokens, flat=flat,
            pad_value=pad_value, label_pad_value=label_pad_value, position_start=position_start,
            stream=int(stream.cuda_stream),
        )  # fmt: skip
        if errors is not None:

            def report(flags: Int64Array) -> str | None:
                if flags[0] < 0:
                    return None
                message = _pack_unfit_message(wanted, offs_host, int(flags[0]), int(flags[1]))
                return _found_on_device("pack_fill", dev, message)

            _watch(errors, stream, report)
    # The device copies of the plan may be freed on return: the caching allocator reuses them only
    # for work ordered after this kernel on the same stream.
    result.update(buf)
    return {k: result[k] for k in PACK_FIELDS if k in wanted}


def block_causal_mask(
    seq_idx: Any, *, additive: bool = False, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Block-diagonal causal attention mask ``[rows, 1, C, C]`` from ``seq_idx`` ``[rows, C]``.

    True where query q may attend key k: same piece and k <= q. A padding query (seq_idx < 0)
    attends only to itself, so SDPA rows are never fully masked (no NaN). ``additive=True`` gives
    a float mask (0 where allowed, ``finfo(dtype).min`` elsewhere) for eager attention. The mask
    is O(rows * C^2): build it per batch, never for a whole dataset. A piece's tokens must be
    contiguous in its row (as pack_fill writes them). CPU tensors are written by a C++ kernel at
    memset speed; CUDA tensors use torch ops on the device.
    """
    import torch

    _threads_ready()
    s = torch.as_tensor(seq_idx)
    if s.dim() != 2:
        raise ValueError(f"seq_idx must be [rows, C], got shape {tuple(s.shape)}")
    if s.dtype.is_floating_point or s.dtype == torch.bool or s.dtype.is_complex:
        raise TypeError(f"seq_idx must be an integer tensor, got {s.dtype}")
    mask_dtype = torch.bool
    if additive:
        mask_dtype = dtype or torch.float32
        if not mask_dtype.is_floating_point:
            raise TypeError(f"additive masks need a floating dtype, got {mask_dtype}")
    rows, length = s.shape
    itemsize = torch.empty(0, dtype=mask_dtype).element_size()
    # The kernel writes raw elements of 1, 2 or 4 bytes: any mask dtype through an integer view.
    bits_view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
    if s.device.type != "cpu" or itemsize not in bits_view:
        return _block_causal_mask_torch(s, additive, mask_dtype)
    out = torch.empty((rows, 1, length, length), dtype=mask_dtype)
    view = bits_view[itemsize]
    if additive:
        blocked = torch.tensor([torch.finfo(mask_dtype).min], dtype=mask_dtype)
        blocked_bits = int(blocked.view(view).item()) & ((1 << (8 * itemsize)) - 1)
        allowed_bits = 0  # +0.0 in every IEEE format
    else:
        allowed_bits, blocked_bits = 1, 0
    ids = s.numpy() if s.dtype in (torch.int32, torch.int64) else s.to(torch.int64).numpy()
    bad = _C.block_causal_mask(
        np.ascontiguousarray(ids), out.view(view).numpy(), allowed_bits, blocked_bits
    )
    if bad >= 0:
        raise ValueError(
            f"seq_idx row {bad}: the tokens of a piece must be contiguous and pieces in order "
            f"(got {s[bad].tolist()[:64]}{'...' if length > 64 else ''})"
        )
    return out


def _block_causal_mask_torch(s: torch.Tensor, additive: bool, dtype: torch.dtype) -> torch.Tensor:
    """The mask by torch ops (CUDA tensors, float64): the reference the C++ kernel is tested on."""
    import torch

    length = s.shape[1]
    q, k = s[:, :, None], s[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=s.device).tril_()
    eye = torch.eye(length, dtype=torch.bool, device=s.device)
    mask = (((q == k) & (q >= 0) & causal) | ((q < 0) & eye))[:, None]
    if not additive:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=s.device).masked_fill_(
        ~mask, torch.finfo(dtype).min
    )


# --- sample ---
# The source sampler's kernels (csrc/sample): weights -> integer weights, one segment's range of
# positions from an anchor state, and the per-source row permutation. SourceSampler
# (sampler.py) keeps the state and the weight timeline; these wrappers validate and call.

SAMPLE_MODES = ("greedy", "random", "block")
GREEDY_PATHS = ("auto", "scalar", "vector", "tree")
MAX_SOURCES = 1 << 24
MAX_BLOCK_SIZE = 1 << 28
MAX_POSITION = 1 << 62


def _source_label(i: int, names: Sequence[str] | None) -> str:
    return f"source {i} ({names[i]!r})" if names is not None and i < len(names) else f"source {i}"


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def check_int(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as a Python int in [low, high], else TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    v = int(value)
    if not low <= v <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {v}")
    return v


def normalize_weights(
    weights: Any, names: Sequence[str] | None = None, num_sources: int | None = None
) -> npt.NDArray[np.float64]:
    """Mixture weights as float64 summing to 1 (scaled by the largest first, so huge values do
    not overflow). Any non-negative finite numbers, at least one positive; a zero pauses its
    source. Errors name the source (index and name) and the value."""
    if isinstance(weights, (str, bytes, dict)):
        raise TypeError(f"weights must be a sequence of numbers, got {type(weights).__name__}")
    if not isinstance(weights, np.ndarray) and hasattr(weights, "__len__"):
        for i, v in enumerate(weights):  # before numpy turns [1, "a"] into strings
            if isinstance(v, (bool, np.bool_)) or not isinstance(
                v, (int, float, np.integer, np.floating)
            ):
                raise TypeError(
                    f"weights: {_source_label(i, names)} has weight {_short(v)} "
                    f"({type(v).__name__}); weights must be numbers"
                )
    try:
        arr = np.asarray(weights)
    except (TypeError, ValueError) as e:
        raise TypeError(f"weights must be a sequence of numbers: {e}") from None
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"weights must be a non-empty 1-D sequence, got shape {arr.shape}")
    if num_sources is not None and arr.size != num_sources:
        raise ValueError(f"expected {num_sources} weights (one per source), got {arr.size}")
    if arr.size > MAX_SOURCES:
        raise ValueError(f"at most {MAX_SOURCES} sources, got {arr.size}")
    if arr.dtype.kind == "b":
        raise TypeError("weights must be numbers, got booleans")
    if arr.dtype.kind not in "iufO":
        raise TypeError(f"weights must be numbers, got dtype {arr.dtype}")
    values = arr.tolist()
    try:
        w = arr.astype(np.float64)
    except OverflowError:
        w = np.array([float("inf") if abs(v) > 1e308 else v for v in values], dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(w) | (w < 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"weights: {_source_label(i, names)} has weight {_short(values[i])}; "
            "weights must be finite and >= 0 (0 pauses a source)"
        )
    if not np.any(w > 0):
        raise ValueError(f"weights: all {w.size} weights are zero; at least one must be positive")
    out: npt.NDArray[np.float64] = w / w.max()
    out /= out.sum()
    lost = np.flatnonzero((w > 0) & (out == 0))
    if lost.size:
        i = int(lost[0])
        raise ValueError(
            f"weights: {_source_label(i, names)} has weight {_short(values[i])}, below 2^-1074 of "
            "the total: too small to represent; pass 0 to pause the source"
        )
    return out


def sample_weights(weights: npt.NDArray[np.float64]) -> tuple[Int64Array, int]:
    """The kernel's integer weights W (summing to D) for float weights: every mode is exact
    integer arithmetic on these (see csrc/sample/sample.h)."""
    w, d = _C.sample_weights(np.ascontiguousarray(weights, dtype=np.float64))
    return w, int(d)


def block_counts(weights: npt.NDArray[np.float64], block_size: int) -> Int64Array:
    """Picks of each source in every full block of block mode (largest remainder of W * B / D)."""
    check_int("block_size", block_size, 1, MAX_BLOCK_SIZE)
    out: Int64Array = _C.block_counts(np.ascontiguousarray(weights, dtype=np.float64), block_size)
    return out


@dataclass
class SampleRange:
    """One kernel call's result: the range's sources and ordinals (None when only counted), and
    the state moved to ``anchor`` (the last state the kernel can resume from at or before the
    range's end) plus ``end_counts``, the global counts before the range's end."""

    sources: npt.NDArray[np.int32] | None
    ordinals: Int64Array | None
    anchor: int
    counts: Int64Array
    segment_counts: Int64Array
    end_counts: Int64Array


def sample_sources(
    weights: npt.NDArray[np.float64],
    counts: Int64Array,
    segment_counts: Int64Array,
    *,
    mode: str,
    seed: int,
    block_size: int,
    shuffle: bool,
    segment: int,
    segment_start: int,
    anchor: int,
    start: int,
    count: int,
    want_output: bool = True,
    out_sources: npt.NDArray[np.int32] | None = None,
    out_ordinals: Int64Array | None = None,
    greedy_path: str = "auto",
) -> SampleRange:
    """Sources and ordinals of positions [start, start + count) of one weight segment, from the
    state at ``anchor`` (global ``counts`` and ``segment_counts`` before it). Inputs are not
    modified; see csrc/sample/sample.h for the contract of each mode."""
    check_choice("mode", mode, SAMPLE_MODES)
    check_choice("greedy_path", greedy_path, GREEDY_PATHS)
    seed = check_int("seed", seed, 0, (1 << 64) - 1)
    count = check_int("count", count, 0, MAX_POSITION)
    w = np.ascontiguousarray(weights, dtype=np.float64)
    c = np.array(counts, dtype=np.int64, copy=True)
    sc = np.array(segment_counts, dtype=np.int64, copy=True)
    if c.shape != w.shape or sc.shape != w.shape:
        raise ValueError(
            f"counts and segment_counts must have one entry per source {w.shape}, got "
            f"{c.shape} and {sc.shape}"
        )
    if want_output:
        if out_sources is None:
            out_sources = np.empty(count, dtype=np.int32)
        if out_ordinals is None:
            out_ordinals = np.empty(count, dtype=np.int64)
    end = np.empty(w.size, dtype=np.int64)
    _threads_ready()
    new_anchor = _C.sample_sources(
        w,
        c,
        sc,
        mode=mode,
        seed=seed,
        block_size=int(block_size),
        shuffle=bool(shuffle),
        segment=int(segment),
        segment_start=int(segment_start),
        anchor=int(anchor),
        start=int(start),
        count=count,
        out_sources=out_sources if want_output else None,
        out_ordinals=out_ordinals if want_output else None,
        end_counts=end,
        greedy_path=greedy_path,
    )
    return SampleRange(
        out_sources if want_output else None,
        out_ordinals if want_output else None,
        int(new_anchor),
        c,
        sc,
        end,
    )


def permute_rows(
    ordinals: Any, length: Any, *, seed: int, source: Any, shuffle: bool = True
) -> Int64Array:
    """Row of each ordinal of a source with ``length`` rows: pass = ordinal // length reads every
    row once, in the order of a keyed bijection of (seed, source, pass) (a Feistel network,
    O(1) memory per element); ``shuffle=False`` gives ordinal % length. ``length`` and
    ``source`` are one int or one per ordinal (e.g. ``lengths[sources]`` and ``sources``)."""
    seed = check_int("seed", seed, 0, (1 << 64) - 1)
    ords = np.asarray(ordinals)
    if ords.ndim != 1:
        raise ValueError(f"permute_rows: ordinals must be 1-D, got shape {ords.shape}")
    if ords.dtype.kind not in "iu" and not (ords.size == 0 and ords.dtype == np.float64):
        raise TypeError(f"permute_rows: ordinals must be integers, got dtype {ords.dtype}")
    if ords.dtype == np.uint64 and ords.size and int(ords.max()) > np.iinfo(np.int64).max:
        raise ValueError("permute_rows: ordinals beyond int64")
    ords = np.ascontiguousarray(ords, dtype=np.int64)

    def per_element(name: str, value: Any) -> Int64Array:
        arr = np.asarray(value)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"permute_rows: {name} must be integers, got dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr.reshape(-1) if arr.ndim == 0 else arr, dtype=np.int64)
        if arr.ndim != 1 or arr.size not in (1, ords.size) or (arr.size == 0 and ords.size):
            raise ValueError(
                f"permute_rows: {name} must be one int or one per ordinal ({ords.size}), "
                f"got shape {np.shape(value)}"
            )
        return arr if arr.size else np.ones(1, dtype=np.int64)

    lengths = per_element("length", length)
    sources = per_element("source", source)
    out = np.empty(ords.size, dtype=np.int64)
    _threads_ready()
    _C.permute_rows(ords, lengths, sources, seed=seed, shuffle=bool(shuffle), out=out)
    return out


__all__ += [
    "GREEDY_PATHS",
    "SAMPLE_MODES",
    "SampleRange",
    "block_counts",
    "check_int",
    "normalize_weights",
    "permute_rows",
    "sample_sources",
    "sample_weights",
]


# --- gather --------------------------------------------------------------------------------------


def gather_rows(
    values: npt.NDArray[Any],
    starts: Any,
    lengths: Any,
    out_offsets: Any,
    out: npt.NDArray[Any],
) -> None:
    """Copy ``values[starts[k]:starts[k] + lengths[k]]`` to ``out[out_offsets[k]:...]`` for every
    row k, in C++ (one memcpy per row, GIL released, threads for many rows). Any numeric dtype;
    ``out`` must have the dtype of ``values``. Ranges are checked before anything is written."""
    vals = np.ascontiguousarray(values)
    if vals.ndim != 1:
        raise ValueError(f"gather_rows: values must be 1-D, got shape {vals.shape}")
    if vals.dtype.kind not in "biufc":  # object pointers copied bytewise skip their refcounts
        raise TypeError(f"gather_rows: values must be numbers, got dtype {vals.dtype}")
    cols = [np.ascontiguousarray(a, dtype=np.int64) for a in (starts, lengths, out_offsets)]
    _threads_ready()
    _C.gather_rows(vals, cols[0], cols[1], cols[2], out)


class PieceReader:
    """A chunked list-of-numbers column (an Arrow list column's buffers: per record batch, values
    and offsets; optionally a row mapping) from which pieces of rows are copied into a flat
    output in one C++ pass (the packing loader's read: no copy of whole documents first).

    ``values[c]`` / ``offsets[c]``: chunk ``c``'s values (1-D numeric, one dtype for all chunks)
    and offsets (int32 or int64, ``rows + 1`` entries, into that chunk's values); ``mapping``:
    the table row of every row (HF's ``select`` / ``shuffle`` indices), or None. The buffers are
    held, not copied. ``name`` prefixes error messages (the source's name).
    """

    def __init__(self, values: Sequence[npt.NDArray[Any]], offsets: Sequence[npt.NDArray[Any]],
                 mapping: npt.NDArray[Any] | None = None, *, name: str = "") -> None:  # fmt: skip
        vals = [np.ascontiguousarray(v) for v in values]
        for c, v in enumerate(vals):
            if v.dtype.kind not in "biuf" or v.dtype.kind == "b":
                raise TypeError(f"PieceReader: chunk {c} values must be numeric, got {v.dtype}")
        offs = [np.ascontiguousarray(o) for o in offsets]
        m = None
        if mapping is not None:
            arr = np.asarray(mapping)
            if arr.dtype.kind not in "iu":
                raise TypeError(f"PieceReader: mapping must hold integers, got {arr.dtype}")
            # uint64 rows past int64 become negative here: the kernel rejects them by range.
            m = arr.view(np.int64) if arr.dtype == np.uint64 else arr.astype(np.int64, copy=False)
            m = np.ascontiguousarray(m)
        self.name = name
        self._reader = _C.PieceReader(vals, offs, m)
        self.dtype: np.dtype[Any] = np.dtype(self._reader.dtype)
        self.num_rows = int(self._reader.num_rows)

    def gather(self, rows: Int64Array, starts: Int64Array, lengths: Int64Array,
               out_offsets: Int64Array, out: npt.NDArray[Any], *,
               sources: npt.NDArray[np.int32] | None = None, source: int = 0) -> int:  # fmt: skip
        """Copy piece ``k`` (``lengths[k]`` elements of row ``rows[k]`` from its element
        ``starts[k]``) to ``out[out_offsets[k]:]``; with ``sources``, only the pieces whose
        ``sources[k] == source``. Arrays are taken as they are (int64, ``sources`` int32,
        contiguous; ``out`` of this column's dtype): TypeError otherwise. Everything is checked
        before anything is written (ValueError naming the piece and its row). Returns the number
        of pieces copied."""
        try:
            return int(self._reader.gather(sources, source, rows, starts, lengths, out_offsets,
                                           out))  # fmt: skip
        except ValueError as e:
            raise ValueError(f"source {self.name!r}: {e}" if self.name else str(e)) from None


# --- datainf -----------------------------------------------------------------------------------

__all__ += ["DataInfResult", "datainf", "layer_key", "projection_matrix"]


@dataclass(frozen=True)
class DataInfResult:
    """What :func:`datainf` computed: numpy arrays for host input, torch tensors for CUDA input.

    ``influence`` ([n] float32) and ``lambdas`` ([L] float64) are None with ``stats_only``;
    ``per_layer`` ([L, n]) only on request. ``a`` = g_i . v_l, ``q`` = |g_i|^2 ([L, n] float32)
    and ``probe_sq`` = |v_l|^2 ([L] float64) are those of the projected layer when it was projected.
    """

    influence: Any
    per_layer: Any
    a: Any
    q: Any
    probe_sq: Any
    lambdas: Any


def layer_key(name: str) -> int:
    """The projection stream of a layer: a 64-bit hash of its name, the same in every process."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def projection_matrix(name: str | int, d: int, k: int, seed: int = 0) -> npt.NDArray[np.float32]:
    """The [k, d] projection :func:`datainf` applies to layer ``name`` (entries +-1/sqrt(k)).

    Materialised here for tests and inspection; the kernel generates it tile by tile instead.
    ``name`` may be the layer's integer key (see :func:`layer_key`).
    """
    key = name if isinstance(name, int) else layer_key(name)
    return _C.projection_matrix(_u64(seed, "seed"), _u64(key, "layer key"), k, d)


def _u64(x: int, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or not 0 <= x < 2**64:
        raise ValueError(f"{what} must be an integer in [0, 2**64), got {x!r}")
    return int(x)


def _grad_host(name: str, g: Any) -> np.ndarray[Any, Any]:
    """A layer's [n, d] gradients as a float32 or uint16 (bfloat16 bits) numpy view, no copy
    unless its rows are not contiguous."""
    arr: np.ndarray[Any, Any]
    if hasattr(g, "detach") and hasattr(g, "is_cuda"):
        import torch

        t = g.detach()
        if t.dtype == torch.bfloat16:
            arr = t.view(torch.int16).numpy().view(np.uint16)
        elif t.dtype == torch.float32:
            arr = t.numpy()
        else:
            raise TypeError(
                f"datainf: layer {name!r}: gradients must be float32 or bfloat16, got {t.dtype} "
                "(convert explicitly, e.g. .float())"
            )
    else:
        arr = np.asarray(g)
        if arr.dtype.name == "bfloat16":  # ml_dtypes' numpy bfloat16
            arr = arr.view(np.uint16)
        if arr.dtype not in (np.float32, np.uint16):
            raise TypeError(
                f"datainf: layer {name!r}: gradients must be float32 or bfloat16 (numpy: uint16 "
                f"bits), got {arr.dtype}"
            )
    if arr.ndim != 2:
        raise ValueError(f"datainf: layer {name!r}: gradients must be [n, d], got {arr.shape}")
    n, d = arr.shape
    item = arr.itemsize
    if (d > 1 and arr.strides[1] != item) or (n > 1 and arr.strides[0] < d * item):
        arr = np.ascontiguousarray(arr)
    return arr


def _probe_host(name: str, v: Any, d: int) -> npt.NDArray[np.float32]:
    t = v.detach().cpu().numpy() if hasattr(v, "detach") and hasattr(v, "is_cuda") else v
    arr = np.ascontiguousarray(np.asarray(t), dtype=np.float32)
    if arr.shape != (d,):
        raise ValueError(
            f"datainf: layer {name!r}: probe gradient has shape {arr.shape}, the layer has d = {d}"
        )
    if not np.isfinite(arr).all():
        j = int(np.argmin(np.isfinite(arr)))
        raise ValueError(f"datainf: layer {name!r}: probe gradient entry {j} is {arr[j]}")
    return arr


def _datainf_lambdas(lambdas: Any, names: Sequence[str]) -> npt.NDArray[np.float64]:
    """Per-layer fixed lambda (0: the damping rule) from None, one float, or one per layer."""
    count = len(names)
    if lambdas is None:
        return np.zeros(count)
    seq = [lambdas] * count if isinstance(lambdas, (int, float)) else list(lambdas)
    if len(seq) != count:
        raise ValueError(f"datainf: {len(seq)} lambdas for {count} layers")
    out = np.zeros(count)
    for i, lam in enumerate(seq):
        if lam is None:
            continue
        if isinstance(lam, bool) or not (math.isfinite(lam) and lam > 0):
            raise ValueError(
                f"datainf: layer {names[i]!r}: lambda must be a finite float > 0, got {lam!r}"
            )
        out[i] = float(lam)
    return out


def datainf(
    grads: Sequence[Any],
    probes: Sequence[Any],
    *,
    names: Sequence[str] | None = None,
    damping: float = 0.1,
    lambdas: float | Sequence[float | None] | None = None,
    projection_dim: int | None = None,
    seed: int = 0,
    per_layer: bool = False,
    stats_only: bool = False,
    _cpu_isa: int = -1,
    _elementwise: bool = False,
) -> DataInfResult:
    """DataInf influence of n training samples on a probe set, all layers in one kernel call.

    ``grads[l]`` is layer l's per-sample gradients [n, d_l] (float32 or bfloat16; numpy, or torch
    CPU tensors viewed without a copy, or CUDA tensors), ``probes[l]`` the probe-mean gradient
    [d_l]. Positive influence = up-weighting the sample raises the probe loss (harmful). lambda_l
    is ``damping`` * mean_i |g_i|^2 / d_l unless ``lambdas`` fixes it (one float, or one per
    layer with None for the rule). ``projection_dim`` k projects layers with d_l > k by the
    seeded matrix :func:`projection_matrix` (keyed by the layer's name). ``names`` (default
    "layer l") name layers in errors and key their projections. See csrc/datainf/datainf.h.
    """
    count = len(grads)
    if count == 0:
        raise ValueError("datainf: no layers")
    names = [f"layer {i}" for i in range(count)] if names is None else [str(x) for x in names]
    if len(names) != count or len(probes) != count:
        raise ValueError(
            f"datainf: {count} gradient layers, {len(probes)} probe gradients, {len(names)} names"
        )
    if isinstance(damping, bool) or not (math.isfinite(damping) and damping > 0):
        raise ValueError(f"datainf: damping must be a finite float > 0, got {damping!r}")
    k = 0
    if projection_dim is not None:
        if isinstance(projection_dim, bool) or not isinstance(projection_dim, (int, np.integer)):
            raise TypeError(f"datainf: projection_dim must be an int, got {projection_dim!r}")
        if projection_dim < 1:
            raise ValueError(f"datainf: projection_dim must be >= 1, got {projection_dim}")
        k = int(projection_dim)
    fixed = _datainf_lambdas(lambdas, names)
    keys = np.array([layer_key(x) for x in names], dtype=np.uint64)
    cuda = [_is_cuda_tensor(g) for g in grads]
    if any(cuda):
        if not all(cuda):
            where = names[cuda.index(False)]
            raise ValueError(f"datainf: layer {where!r} is not on CUDA while others are")
        return _datainf_cuda(
            grads, probes, names, damping, fixed, keys, k, _u64(seed, "seed"), per_layer,
            stats_only,
        )  # fmt: skip
    host = [_grad_host(name, g) for name, g in zip(names, grads, strict=True)]
    n = host[0].shape[0]
    for name, g in zip(names, host, strict=True):
        if g.shape[0] != n:
            raise ValueError(
                f"datainf: layer {name!r} has {g.shape[0]} samples, layer {names[0]!r} has {n}"
            )
    if n == 0:
        raise ValueError("datainf: no training samples (n == 0)")
    vs = [_probe_host(name, v, g.shape[1]) for name, v, g in zip(names, probes, host, strict=True)]
    a = np.empty((count, n), dtype=np.float32)
    q = np.empty((count, n), dtype=np.float32)
    probe_sq = np.empty(count)
    influence = None if stats_only else np.empty(n, dtype=np.float32)
    lam = None if stats_only else np.empty(count)
    layer_scores = np.empty((count, n), dtype=np.float32) if per_layer and not stats_only else None
    _threads_ready()
    bad_layer, bad_row = _C.datainf(
        host, vs, keys, fixed, damping=damping, projection_dim=k, seed=_u64(seed, "seed"),
        stats_only=stats_only, out_influence=influence, out_per_layer=layer_scores, out_a=a,
        out_q=q, out_lambdas=lam, out_probe_sq=probe_sq, cpu_isa=_cpu_isa,
        elementwise=_elementwise,
    )  # fmt: skip
    if bad_layer >= 0:
        _raise_not_finite(names[bad_layer], bad_row)
    if influence is not None and not np.isfinite(influence).all():  # e.g. a damping so small
        row = int(np.argmax(~np.isfinite(influence)))  # that 1 / lambda overflows
        raise ValueError(f"datainf: the influence of sample {row} is not finite "
                         f"({influence[row]}): damping={damping} or lambda_ is too small for "
                         "these gradients")  # fmt: skip
    return DataInfResult(influence, layer_scores, a, q, probe_sq, lam)


def _raise_not_finite(name: str, row: int) -> None:
    raise ValueError(
        f"datainf: layer {name!r}: the gradient of sample {row} is not finite (NaN or inf, or "
        "its squared norm overflows float32)"
    )


def _datainf_cuda(
    grads: Sequence[Any],
    probes: Sequence[Any],
    names: Sequence[str],
    damping: float,
    fixed: npt.NDArray[np.float64],
    keys: npt.NDArray[np.uint64],
    k: int,
    seed: int,
    per_layer: bool,
    stats_only: bool,
) -> DataInfResult:
    """The CUDA kernel: layers with d > k are projected first (tiles of the projection written by
    a kernel, applied by a GEMM), then one datainf_cuda call enqueues every layer."""
    import torch

    if not _C.cuda_compiled:
        raise RuntimeError("mixtape was built without CUDA kernels (MIXTAPE_CUDA=OFF or no nvcc)")
    dev = grads[0].device
    n = grads[0].shape[0] if grads[0].dim() == 2 else -1
    if n == 0:
        raise ValueError("datainf: no training samples (n == 0)")
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        mats: list[torch.Tensor] = []
        vecs: list[torch.Tensor] = []
        for li, (name, g, v) in enumerate(zip(names, grads, probes, strict=True)):
            if g.device != dev:
                raise ValueError(f"datainf: layer {name!r} is on {g.device}, layer 0 on {dev}")
            if g.dim() != 2 or g.shape[0] != n:
                raise ValueError(f"datainf: layer {name!r}: gradients must be [{n}, d], got "
                                 f"{tuple(g.shape)}")  # fmt: skip
            if g.dtype not in (torch.float32, torch.bfloat16):
                raise TypeError(f"datainf: layer {name!r}: gradients must be float32 or "
                                f"bfloat16, got {g.dtype}")  # fmt: skip
            d = g.shape[1]
            pv = torch.as_tensor(_probe_host(name, v, d), device=dev)
            g = g.detach()
            if g.stride(1) != 1 or (n > 1 and g.stride(0) < d):
                g = g.contiguous()
            if 0 < k < d:
                g, pv = _project_cuda(g, pv, int(keys[li]), k, seed, stream)
            mats.append(g)
            vecs.append(pv)
        count = len(mats)
        max_d = max(m.shape[1] for m in mats)
        f32 = {"dtype": torch.float32, "device": dev}
        a = torch.empty((count, n), **f32)
        q = torch.empty((count, n), **f32)
        influence = None if stats_only else torch.empty(n, **f32)
        lam = None if stats_only else torch.empty(count, dtype=torch.float64, device=dev)
        scores = torch.empty((count, n), **f32) if per_layer and not stats_only else None
        b = torch.empty(n, **f32)
        u = torch.empty(max_d, **f32)
        u_partial = torch.empty(8 * max_d, **f32)  # kDataInfColChunks rows of max_d
        bad = torch.full((count,), n, dtype=torch.int64, device=dev)

        def ptr(t: torch.Tensor | None) -> int:
            return int(t.data_ptr()) if t is not None else 0

        _C.datainf_cuda(
            [ptr(m) for m in mats], [1 if m.dtype == torch.bfloat16 else 0 for m in mats],
            [m.shape[1] for m in mats], [m.stride(0) if n > 1 else m.shape[1] for m in mats],
            [ptr(v) for v in vecs], [float(x) for x in fixed], n=n, damping=damping,
            stats_only=stats_only, influence=ptr(influence), per_layer=ptr(scores), a=ptr(a),
            q=ptr(q), lambdas_out=ptr(lam), b=ptr(b), u=ptr(u), u_partial=ptr(u_partial),
            bad=ptr(bad), stream=stream,
        )  # fmt: skip
        probe_sq = torch.stack([v.double().square().sum() for v in vecs])
        bad_host = bad.cpu().numpy()
    if (bad_host < n).any():
        first = int(np.argmax(bad_host < n))
        _raise_not_finite(names[first], int(bad_host[first]))
    return DataInfResult(influence, scores, a, q, probe_sq, lam)


def _project_cuda(
    g: torch.Tensor, v: torch.Tensor, key: int, k: int, seed: int, stream: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """P g_i and P v with P = projection_matrix(key, d, k, seed), P made on the device a tile of
    columns at a time (at most 2**24 entries), never whole."""
    import torch

    n, d = g.shape
    cols = max(1, min(d, (1 << 24) // k))
    tile = torch.empty(k * cols, dtype=torch.float32, device=g.device)
    pg = torch.zeros((n, k), dtype=torch.float32, device=g.device)
    pv = torch.zeros(k, dtype=torch.float32, device=g.device)
    for c0 in range(0, d, cols):
        c = min(cols, d - c0)
        p = tile[: k * c].view(k, c)
        _C.projection_matrix_cuda(int(p.data_ptr()), seed, key, k, d, c0, c, stream)
        pg.addmm_(g[:, c0 : c0 + c].float(), p.T)
        pv.addmv_(p, v[c0 : c0 + c])
    return pg, pv
