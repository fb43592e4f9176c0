"""Output buffers of the collators (one block per batch, pinned on request) and the one rule for
the fields a collator does not own (see :func:`split_fields`): per-token number columns are laid
out like the ids, per-example numbers and equal-shape arrays are stacked, labels stacked as
``DataCollatorWithPadding`` does, anything else passed through unchanged.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt

from mixtape.collate.sources import NO_SOURCE, SOURCE_IDS, SOURCE_KEY, column_list
from mixtape.ops import Int64Array
from mixtape.ragged import (
    Columns,
    arrow_ragged,
    is_arrow,
    is_sequence,
    is_sequence_column,
    numeric_ragged,
)
from mixtape.validation import check_int  # noqa: F401  (re-exported for the collators)

if TYPE_CHECKING:
    import torch


ReturnTensors = bool | Literal["pt", "np"]
# Label fields transformers' DataCollatorWithPadding renames to "labels".
LABEL_ALIASES = ("labels", "label", "label_ids")
# Pad values of per-token fields besides ids/mask/labels (as a transformers tokenizer pads them);
# any other integer per-token field pads with 0, a float one with 0.0.
DEFAULT_PAD_VALUES: Mapping[str, int] = {"token_type_ids": 0, "special_tokens_mask": 1}

# --------------------------------------------------------------------------------------------
# The one rule for the fields a collator does not own
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TokenColumn:
    """A per-token field, flat: int64 (integers and bools) or float32 (any float), + offsets."""

    name: str
    values: npt.NDArray[Any]
    offsets: Int64Array
    pad: int | float

    @property
    def is_float(self) -> bool:
        return bool(self.values.dtype.kind == "f")


def split_fields(
    c: Columns,
    ids_offsets: Int64Array,
    skip: Collection[str],
    pad_values: Mapping[str, int | float],
    input_key: str = "input_ids",
) -> tuple[list[TokenColumn], dict[str, Any]]:
    """The fields not in ``skip``, split by the one rule every collator follows.

    A column of 1-D number sequences with the ids' lengths is per-token: integers and bools become
    int64 padded with ``pad_values[name]`` (default 0; -1 for ``source_ids``, since 0 names a
    source), floats become float32 padded with
    ``pad_values[name]`` (default 0.0) whatever their input dtype, so an HF ``Dataset`` (floats
    stored as float64) gives the same batch as lists of Python floats. A field named in
    ``pad_values`` must be per-token (else ValueError naming the example). Everything else is
    returned as is, for :func:`stack_other` (per-example numbers stacked, the rest passed through).
    """
    lengths = np.diff(ids_offsets)
    tokens: list[TokenColumn] = []
    other: dict[str, Any] = {}
    for key, col in c.cols.items():
        if key in skip:
            continue
        got = numeric_ragged(col, key) if is_sequence_column(col) else None
        if got is not None:
            vals, offs = got
            got_lengths = np.diff(offs)
            if got_lengths.shape == lengths.shape and np.array_equal(got_lengths, lengths):
                if vals.dtype.kind == "f":
                    tokens.append(TokenColumn(key, vals.astype(np.float32, copy=False), offs,
                                              float(pad_values.get(key, 0.0))))  # fmt: skip
                else:
                    default = NO_SOURCE if key == SOURCE_IDS else 0
                    tokens.append(TokenColumn(key, as_int64(vals, key), offs,
                                              int(pad_values.get(key, default))))  # fmt: skip
                continue
            if key in pad_values:
                i = int(np.flatnonzero(got_lengths != lengths)[0]) if (
                    got_lengths.shape == lengths.shape) else 0  # fmt: skip
                raise ValueError(f"{key}: example {i} has {int(got_lengths[i])} tokens but its "
                                 f"{input_key} has {int(lengths[i])}")  # fmt: skip
        elif key in pad_values and is_sequence_column(col):
            raise TypeError(f"{key}: a per-token field (in pad_values) must hold numbers, got "
                            f"{type(col).__name__}")  # fmt: skip
        other[key] = col
    return tokens, other


def as_int64(arr: npt.NDArray[Any], name: str) -> npt.NDArray[np.int64]:
    """Integers (or bools) as int64; a uint64 beyond the int64 range is an error, never wrapped."""
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name}: value {int(arr.max())} is beyond the int64 range")
    return arr.astype(np.int64, copy=False)


def gather_layout(index: npt.NDArray[np.int64], col: TokenColumn) -> npt.NDArray[Any]:
    """``col`` laid out as ``index`` says (a flat position per output cell, -1 for padding).

    Lets any dtype follow the layout an integer kernel computed for the ids (pad, truncation,
    packing) without a kernel per dtype.
    """
    out = np.full(index.shape, col.pad, dtype=col.values.dtype)
    used = index >= 0
    out[used] = col.values[index[used]]
    return out

# --------------------------------------------------------------------------------------------
# Output buffers (optionally pinned) and fields that are stacked or passed through
# --------------------------------------------------------------------------------------------


def want_tensors(return_tensors: ReturnTensors) -> bool:
    if return_tensors is True or return_tensors == "pt":
        return True
    if return_tensors is False or return_tensors == "np":
        return False
    raise ValueError(f"return_tensors must be True/'pt' or False/'np', got {return_tensors!r}")


class Output:
    """Allocates output buffers (pinned when asked and possible) and wraps them as tensors."""

    _pin_warned: ClassVar[bool] = False

    def __init__(self, return_tensors: ReturnTensors, pin_memory: bool) -> None:
        self.tensors = want_tensors(return_tensors)
        self.pin_memory = bool(pin_memory)
        self._pin: bool | None = None  # decided at the first call (in the collating process)
        self._into: Any = None  # a uint8 block the next arena is carved from (see into())

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pin"] = None  # re-decide in the worker that unpickles us
        state["_into"] = None
        return state

    @contextlib.contextmanager
    def into(self, block: npt.NDArray[np.uint8]) -> Iterator[None]:
        """Within the block: the next :meth:`arena` is carved from ``block`` (a loader's shared
        ring slot) when it fits, else allocated as usual."""
        self._into = block
        try:
            yield
        finally:
            self._into = None

    def pin(self) -> bool:
        if self._pin is None:
            import torch

            self._pin = self.pin_memory and torch.cuda.is_available()
            if self.pin_memory and not self._pin and not Output._pin_warned:
                Output._pin_warned = True
                warnings.warn(
                    "pin_memory=True but CUDA is not available: mixtape collators return "
                    "ordinary (unpinned) memory", stacklevel=3,
                )  # fmt: skip
        return self._pin

    def empty(self, shape: tuple[int, ...], dtype: npt.DTypeLike = np.int64) -> Any:
        """A fresh C-contiguous numpy buffer; with pinning, the numpy view of a pinned tensor."""
        if self.pin():
            t = pinned_empty(shape, np.dtype(dtype))
            if t is not None:
                return t.numpy()
        return np.empty(shape, dtype=dtype)

    def arena(
        self, count: int, shape: tuple[int, ...], dtype: npt.DTypeLike = np.int64
    ) -> Arena:
        """``count`` buffers of one shape carved from one block.

        Several MB-sized buffers allocated and freed separately make glibc trim the heap and
        page-fault them again on every batch; one block per batch avoids that (as ops.pad does).
        """
        block, self._into = self._into, None
        dt = np.dtype(dtype)
        nbytes = count * int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if block is not None and nbytes <= block.nbytes:
            return Arena(list(block[:nbytes].view(dt).reshape((count, *shape))))
        return Arena(list(self.empty((count, *shape), dtype)))

    def wrap(self, arr: Any) -> Any:
        """``arr`` as returned: a tensor sharing its memory (so still pinned), or numpy."""
        if not self.tensors:
            return arr
        import torch

        return torch.from_numpy(arr)


class Arena:
    """Hands out the slots of one output block in order."""

    def __init__(self, slots: list[Any]) -> None:
        self._slots = slots

    def take(self) -> Any:
        return self._slots.pop(0)


def pinned_empty(shape: tuple[int, ...], dtype: np.dtype[Any]) -> torch.Tensor | None:
    """A pinned host tensor, or None when pinning fails (e.g. in a forked DataLoader worker)."""
    import torch

    tdtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    try:
        return torch.empty(shape, dtype=tdtype, pin_memory=True)
    except RuntimeError:
        if not Output._pin_warned:
            Output._pin_warned = True
            warnings.warn("pinning host memory failed: returning unpinned memory", stacklevel=4)
        return None


def stack_other(col: Any, name: str, tensors: bool) -> Any:
    """A non-padded field: numbers / equal-shape arrays are stacked, anything else passed through.

    Python numbers follow ``torch.tensor`` (ints → int64, floats → float32), as transformers does.
    ``__source__`` (left when the collator has no ``source_names``) is always a plain list.
    """
    if name == SOURCE_KEY:
        return column_list(col)
    if is_arrow(col):
        return stack_arrow(col, tensors, name)
    if isinstance(col, np.ndarray) and col.dtype.kind in "biuf":
        return tensor_or_array(col, tensors)
    if isinstance(col, np.ndarray) and col.dtype != object:
        return col.tolist()  # strings, dates: passed through
    if hasattr(col, "detach") and hasattr(col, "numpy"):
        return col if tensors else col.detach().cpu().numpy()
    if isinstance(col, np.ndarray):
        col = list(col)
    if not isinstance(col, list | tuple) or not col:
        return col
    first = col[0]
    if isinstance(first, int | float | np.number | np.bool_) and all(
        isinstance(v, int | float | np.number | np.bool_) for v in col
    ):
        import torch

        t = torch.tensor(list(col))
        return t if tensors else t.numpy()
    if isinstance(first, np.ndarray) and first.dtype.kind in "biuf" and all(
        isinstance(v, np.ndarray) and v.shape == first.shape and v.dtype == first.dtype
        for v in col
    ):
        return tensor_or_array(np.stack(col), tensors)
    if hasattr(first, "detach") and hasattr(first, "shape"):
        import torch

        if all(isinstance(v, torch.Tensor) and v.shape == first.shape and v.dtype == first.dtype
               for v in col):  # fmt: skip
            t = torch.stack(list(col))
            return t if tensors else t.numpy()
    return list(col)


def is_float_rows(col: Any) -> bool:
    """Whether a column of sequences holds floats (class scores / multi-hot targets, not ids)."""
    if is_arrow(col):
        import pyarrow as pa

        vt = getattr(col.type, "value_type", None)
        return vt is not None and bool(pa.types.is_floating(vt))
    if hasattr(col, "is_floating_point") and hasattr(col, "dim"):
        return bool(col.is_floating_point())
    if isinstance(col, np.ndarray) and col.dtype != object:
        return bool(col.dtype.kind == "f")
    for row in col:
        if row is None:
            continue
        if hasattr(row, "is_floating_point"):
            return bool(row.is_floating_point())
        if isinstance(row, np.ndarray):
            return bool(row.dtype.kind == "f")
        if isinstance(row, list | tuple) and len(row):
            return isinstance(row[0], float | np.floating)
    return False


def stack_labels(col: Any, key: str, tensors: bool) -> Any:
    """One label per example (a number, or an equal-length row of class scores), stacked as
    ``DataCollatorWithPadding`` does (Python ints → int64, floats → float32).

    A column of only None (an unlabelled split) gives None, as ``DataCollatorForSeq2Seq`` does;
    a None, null or non-numeric label among others is an error naming the example, never a list
    passed through to the model.
    """
    if is_arrow(col):
        if col.null_count == 0 and not is_sequence_column(col):
            return stack_other(col, key, tensors)
        col = col.to_pylist()
    if hasattr(col, "detach") and hasattr(col, "numpy"):
        return col if tensors else col.detach().cpu().numpy()
    if isinstance(col, np.ndarray) and col.dtype != object:
        return stack_other(col, key, tensors)
    rows = list(col)
    missing = [i for i, v in enumerate(rows) if v is None]
    if len(missing) == len(rows):
        return None
    if missing:
        raise ValueError(f"{key}: example {missing[0]} has no label (None)")
    if not is_sequence(rows[0]):
        out = stack_other(rows, key, tensors)
        if isinstance(out, list):  # not all numbers
            i = next(i for i, v in enumerate(rows) if is_sequence(v) or
                     np.asarray(host_array(v)).dtype.kind not in "biuf")  # fmt: skip
            raise TypeError(f"{key}: example {i} has label {rows[i]!r}, expected a number")
        return out
    width = len(rows[0])
    arrays = []
    for i, r in enumerate(rows):
        arr = np.asarray(host_array(r)) if is_sequence(r) else np.zeros(())
        if arr.ndim != 1 or arr.dtype.kind not in "biuf":
            raise TypeError(f"{key}: example {i} has label {r!r}, expected a row of numbers "
                            f"like example 0")  # fmt: skip
        if arr.size != width:
            raise ValueError(f"{key}: example {i} has {arr.size} values but example 0 has {width} "
                             "(one row of class scores per example)")  # fmt: skip
        arrays.append(arr)
    if all(isinstance(r, list | tuple) for r in rows):  # Python floats → float32, as torch.tensor
        return tensor_or_array(np.asarray(rows, dtype=np.float32), tensors)
    return tensor_or_array(np.stack(arrays), tensors)


def all_none(col: Any) -> bool:
    """Whether a column holds no value at all (None in every example, or all Arrow nulls)."""
    if is_arrow(col):
        return bool(col.null_count == len(col))
    if isinstance(col, list | tuple) or (isinstance(col, np.ndarray) and col.dtype == object):
        return all(v is None for v in col)
    return False


def host_array(x: Any) -> Any:
    """A torch tensor as numpy (on the host); anything else unchanged."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") and hasattr(x, "numpy") else x


def tensor_or_array(arr: npt.NDArray[Any], tensors: bool) -> Any:
    if not tensors:
        return arr
    import torch

    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr)


def stack_arrow(col: Any, tensors: bool, name: str = "field") -> Any:
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    t = col.type
    if col.null_count == 0:
        # Arrow stores an HF Dataset's Python numbers: they follow the Python-number rule (ints
        # int64, floats float32), so a batch is the same from the Arrow columns or the rows.
        if pa.types.is_integer(t) or pa.types.is_floating(t):
            arr = col.to_numpy(zero_copy_only=False)
            if pa.types.is_floating(t):
                return tensor_or_array(arr.astype(np.float32, copy=False), tensors)
            return tensor_or_array(as_int64(arr, str(name)), tensors)
        if pa.types.is_boolean(t):
            return tensor_or_array(col.to_numpy(zero_copy_only=False), tensors)
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            try:
                r = arrow_ragged(col, "field")
            except (TypeError, ValueError):
                return col.to_pylist()
            lengths = r.lengths
            if lengths.size and np.all(lengths == lengths[0]):
                return tensor_or_array(r.values.reshape(len(r), int(lengths[0])), tensors)
    return col.to_pylist()
