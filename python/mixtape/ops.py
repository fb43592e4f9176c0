"""Typed wrappers over the compiled kernels: validate, pick CPU or CUDA by device, allocate.

The only importer of ``mixtape._C``. Host arrays are numpy (torch CPU tensors are viewed as numpy
without a copy); CUDA tensors go to the CUDA kernels as device pointers plus the current stream.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from mixtape import _C

if TYPE_CHECKING:
    import torch

__all__ = [
    "INDEX_DTYPES",
    "as_offsets",
    "build_info",
    "cuda_available",
    "pad",
    "padded_length",
]

IntArray = npt.NDArray[np.int32] | npt.NDArray[np.int64]
Side = Literal["left", "right"]
INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


@functools.cache
def cuda_available() -> bool:
    """True when the CUDA kernels were compiled and the CUDA runtime sees a GPU now."""
    return bool(_C.cuda_compiled) and _C.cuda_device_count() > 0


def build_info() -> dict[str, Any]:
    """Compiler, flags and CUDA status of the compiled extension, and whether a GPU is usable."""
    info = dict(_C.build_info())
    info["cuda_device_count"] = _C.cuda_device_count()
    info["cuda_usable"] = cuda_available()
    return info


def _check_side(name: str, side: str) -> bool:
    if side not in ("left", "right"):
        raise ValueError(f"{name} must be 'left' or 'right', got {side!r}")
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


def padded_length(
    longest: int, max_length: int | None = None, pad_to_multiple_of: int | None = None
) -> int:
    """Row length for a batch: the longest sequence, capped at max_length, rounded up.

    As in ``transformers``: ``max_length`` truncates, ``pad_to_multiple_of`` rounds the result up
    (so the row may exceed ``max_length`` when it is not itself a multiple).
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
    kernel). ``length`` fixes the row length; otherwise it is :func:`padded_length` of the longest
    sequence. Labels are the ids unless ``labels``/``label_offsets`` give a ragged batch of the same
    lengths; ``out`` supplies buffers (numpy arrays or CPU tensors, e.g. pinned) to write into.
    Returns ``{"input_ids", "attention_mask"?, "labels"?}`` as numpy arrays (tensors on CUDA).
    """
    pad_left = _check_side("padding_side", padding_side)
    truncate_left = _check_side("truncation_side", truncation_side)
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
    lab_vals: IntArray | None = None
    lab_offs: npt.NDArray[np.int64] | None = None
    if labels is not None:
        if label_offsets is None:
            raise ValueError("labels given without label_offsets")
        lab_vals = _check_ids("labels", _host(labels))
        if lab_vals.dtype != vals.dtype:  # the kernel reads both with one type
            lab_vals = _check_ids("labels", lab_vals.astype(vals.dtype))
        lab_offs = as_offsets(_host(label_offsets), "labels offsets")
        return_labels = True
    out_dtype = np.dtype(dtype)
    if out_dtype not in INDEX_DTYPES:
        raise TypeError(f"dtype must be int32 or int64, got {out_dtype}")
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
        vals, offs, lab_vals, lab_offs, length=length, pad_left=pad_left,
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


def _is_cuda_tensor(x: Any) -> bool:
    return getattr(x, "is_cuda", False) is True


def _host(x: Any) -> Any:
    """A numpy view of a CPU tensor (no copy); anything else unchanged."""
    if hasattr(x, "numpy") and hasattr(x, "is_cuda") and not x.is_cuda:
        return x.numpy()
    return x


def _check_kept_ids_cuda(
    values: torch.Tensor, offs: npt.NDArray[np.int64], length: int, truncate_left: bool, name: str
) -> None:
    """The CPU kernel's fused check on CUDA: raise naming the first example whose kept ids include
    a negative value (one device pass; only the few negative positions come to the host)."""
    pos = (values < 0).nonzero().flatten().cpu().numpy()
    if pos.size == 0:
        return
    ex = np.searchsorted(offs, pos, side="right") - 1
    begin, end = offs[ex], offs[ex + 1]
    keep = np.minimum(end - begin, length)
    src = end - keep if truncate_left else begin
    kept = (pos >= src) & (pos < src + keep)
    if kept.any():
        first = int(np.argmax(kept))
        raise ValueError(
            f"{name}: example {int(ex[first])} has a negative token id "
            f"({int(values[int(pos[first])])}); token ids must be >= 0"
        )


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

    if not _C.cuda_compiled:
        raise RuntimeError("mixtape was built without CUDA kernels (MIXTAPE_CUDA=OFF or no nvcc)")
    dev = values.device
    if values.dtype not in (torch.int32, torch.int64) or values.dim() != 1:
        raise TypeError(f"{name}: CUDA values must be a 1-D int32/int64 tensor, got {values.dtype}")
    # Offsets are checked on the host: the kernel trusts them.
    offs_host = as_offsets(torch.as_tensor(offsets).cpu().numpy(), f"{name} offsets")
    n = offs_host.size - 1
    if n > 0 and (np.any(np.diff(offs_host) < 0) or offs_host[-1] != values.numel()):
        raise ValueError(f"{name}: offsets must be non-decreasing and end at {values.numel()}")
    if length is None:
        longest = int(np.max(np.diff(offs_host))) if n > 0 else 0
        length = padded_length(longest, max_length, pad_to_multiple_of)
    if check_ids:
        _check_kept_ids_cuda(values, offs_host, length, truncate_left, name)
    offs = torch.from_numpy(offs_host).to(dev, non_blocking=True)
    lab_v = lab_o = None
    if labels is not None:
        lab_v = torch.as_tensor(labels, device=dev).to(values.dtype).contiguous()
        lo = as_offsets(torch.as_tensor(label_offsets).cpu().numpy(), "labels offsets")
        if not np.array_equal(np.diff(lo), np.diff(offs_host)):
            bad = int(np.argmax(np.diff(lo) != np.diff(offs_host)))
            raise ValueError(f"labels of example {bad} differ in length from its {name}")
        lab_o = torch.from_numpy(lo).to(dev)
    tdtype = torch.int64 if np.dtype(dtype) == np.int64 else torch.int32
    result: dict[str, Any] = {}
    for key, want in (("input_ids", True), ("attention_mask", return_mask),
                      ("labels", return_labels)):  # fmt: skip
        if want:
            given = (out or {}).get(key)
            result[key] = given if given is not None else torch.empty(
                (n, length), dtype=tdtype, device=dev
            )

    def ptr(t: Any) -> int:
        return int(t.data_ptr()) if t is not None else 0

    _C.pad_cuda(
        ptr(values.contiguous()), ptr(offs), n, ptr(lab_v), ptr(lab_o),
        32 if values.dtype == torch.int32 else 64, 32 if tdtype == torch.int32 else 64,
        length, pad_left, truncate_left, pad_value, label_pad_value, shift_labels,
        ptr(result["input_ids"]), ptr(result.get("attention_mask")), ptr(result.get("labels")),
        torch.cuda.current_stream(dev).cuda_stream,
    )  # fmt: skip
    return result
