"""Collators: examples → batches of tensors, on top of the one-pass pad kernel.

Every collator accepts a batch in any of the forms a PyTorch + HF ``datasets`` user meets:

- a list of example dicts (ids as Python lists, numpy arrays or tensors), what a map-style
  ``Dataset`` gives a ``DataLoader``;
- a ``pyarrow.RecordBatch`` / ``Table`` (``Dataset.with_format("arrow")``; list or large_list
  columns, sliced or chunked), the fast path: the column's flattened values and offsets go to the
  kernel as they are, with no Python object per token or per sequence;
- a dict of columns (``ds[i:j]`` in the default, numpy or torch formats, or :class:`Ragged`);
- a list of Arrow tables / record batches (concatenated once, in C++).

Python lists of ids are read by ``ops.ints_from_lists`` (a C++ loop over the list items, ~4x
faster than ``array.array.fromlist``); unlike ``np.fromiter`` / slice assignment it rejects
floats, strings and ints beyond int64 instead of silently truncating or parsing them.

Outputs are written once, into buffers we allocate (optionally pinned) and hand to torch with
``torch.from_numpy``: no copy after the kernel.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from mixtape import ops

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_PAD_VALUES",
    "IMAGE_NORMALIZATION",
    "CausalLMCollator",
    "CollatorInfo",
    "CollatorRegistry",
    "FlatteningCollator",
    "PaddingCollator",
    "Ragged",
    "Seq2SeqCollator",
    "VisionCollator",
    "create_causal_lm_collate",
    "create_collate_fn",
    "create_flattening_collate",
    "create_seq2seq_collate",
    "get_collator",
    "list_collators",
]

IntArray = ops.IntArray
Side = ops.Side
Padding = Literal["longest", "max_length"]
ReturnTensors = bool | Literal["pt", "np"]
_INT64_MAX = np.iinfo(np.int64).max
# Label fields transformers' DataCollatorWithPadding renames to "labels".
_LABEL_ALIASES = ("labels", "label", "label_ids")
# Ragged fields the padding collators pad besides ids/mask/labels, with their pad value
# (as a transformers tokenizer pads them).
DEFAULT_PAD_VALUES: Mapping[str, int] = {"token_type_ids": 0, "special_tokens_mask": 1}


# --------------------------------------------------------------------------------------------
# The ragged batch and its construction from every input form
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Ragged:
    """A ragged batch: sequence i is ``values[offsets[i]:offsets[i + 1]]`` (the kernels' currency).

    ``values`` is 1-D int32/int64; ``offsets`` int64 with n + 1 entries. Offsets may start above 0
    (a window into a larger ``values``, as an Arrow slice is); collators check and rebase them.
    """

    values: IntArray
    offsets: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.offsets.size) - 1

    @property
    def lengths(self) -> npt.NDArray[np.int64]:
        """Length of every sequence."""
        return np.diff(self.offsets)

    @classmethod
    def from_sequences(cls, sequences: Sequence[Any], name: str = "input_ids") -> Ragged:
        """Flatten lists / numpy arrays / tensors of ids; errors name ``name`` and the example."""
        return _ragged_from_rows(sequences, name)

    @classmethod
    def from_arrow(cls, column: Any, name: str = "input_ids") -> Ragged:
        """Zero-copy view of an Arrow list / large_list / fixed_size_list column (or chunked)."""
        return _ragged_from_arrow(column, name)


def _offsets_from_lengths(lengths: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _example_of(offsets: npt.NDArray[np.integer[Any]], position: int) -> int:
    """The example whose values hold flat index ``position``."""
    return int(np.searchsorted(offsets, position, side="right")) - 1


def _normalise_values(
    values: npt.NDArray[Any],
    offsets: npt.NDArray[np.integer[Any]],
    name: str,
    what: str,
    first_example: int = 0,
) -> IntArray:
    """Integer token ids as int32 or int64 (other integer widths widened); else a TypeError.

    Errors name the example, counting from ``first_example`` (for one row of a larger batch).
    """
    dt = values.dtype
    if dt in ops.INDEX_DTYPES:
        return values
    if dt.kind == "u" and dt.itemsize == 8 and values.size:
        big = np.flatnonzero(values > _INT64_MAX)
        if big.size:
            i = first_example + _example_of(offsets, int(big[0]))
            raise ValueError(
                f"{name}: example {i} has a token id out of the int64 range "
                f"({int(values[big[0]])})"
            )
    if dt.kind in "iu":
        return values.astype(np.int64)
    if values.size == 0 and dt.kind == "f":  # np.asarray([]) is float64
        return np.zeros(0, dtype=np.int64)
    i = first_example + (_example_of(offsets, 0) if values.size else 0)
    raise TypeError(f"{name}: token ids must be integers, got {what} (example {i})")


def _row_array(row: Any, name: str, i: int) -> IntArray:
    """One example's ids as a 1-D int32/int64 array; errors name the field and example."""
    if isinstance(row, list | tuple):
        return _ids_from_list(row if isinstance(row, list) else list(row), name, i)
    if row is None:
        raise ValueError(f"{name}: example {i} is None")
    if isinstance(row, str | bytes | Mapping):
        raise TypeError(f"{name}: example {i} must be a sequence of ids, got {type(row).__name__}")
    if hasattr(row, "detach") and hasattr(row, "numpy"):  # torch tensor
        row = row.detach().cpu().numpy()
    arr = np.asarray(row)
    if arr.ndim != 1:
        raise ValueError(f"{name}: example {i} must be 1-D, got shape {arr.shape}")
    offs = np.array([0, arr.size], dtype=np.int64)
    return _normalise_values(arr, offs, name, f"dtype {arr.dtype}", first_example=i)


def _ids_from_list(row: list[Any], name: str, i: int) -> npt.NDArray[np.int64]:
    return ops.ints_from_lists([row], name, first=i)[0]


def _ragged_from_rows(rows: Sequence[Any], name: str) -> Ragged:
    """Flatten per-example sequences: one C-level conversion per example, no per-token Python."""
    n = len(rows)
    if isinstance(rows, list) and all(type(r) is list for r in rows):
        # Fast path (Python lists of ints): one C++ pass that also rejects floats, strings and
        # ints beyond int64, which np.fromiter / slice assignment accept.
        return Ragged(*ops.ints_from_lists(rows, name))
    parts = [_row_array(r, name, i) for i, r in enumerate(rows)]
    lengths = np.fromiter(map(len, parts), dtype=np.int64, count=n)
    if not parts:
        return Ragged(np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64))
    joined: IntArray = np.concatenate(parts)  # type: ignore[assignment]  # int32 iff all are
    return Ragged(joined, _offsets_from_lengths(lengths))


def _is_arrow(x: Any) -> bool:
    return type(x).__module__.startswith("pyarrow")


def _ragged_from_arrow(column: Any, name: str) -> Ragged:
    """Values and offsets of an Arrow list column, without copying (chunks are combined)."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    if not isinstance(column, pa.Array):
        raise TypeError(f"{name}: expected an Arrow array, got {type(column).__name__}")
    t = column.type
    n = len(column)
    if column.null_count:
        i = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"{name}: example {i} is null")
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        raw = column.offsets.to_numpy()  # respects the slice: n + 1 entries
        start, end = int(raw[0]), int(raw[-1])
        child = column.values.slice(start, end - start)
        offsets = raw.astype(np.int64)
        if start:
            offsets -= start
    elif pa.types.is_fixed_size_list(t):
        child = column.flatten()
        offsets = np.arange(n + 1, dtype=np.int64) * t.list_size
    else:
        raise TypeError(f"{name}: expected a list column of token ids, got Arrow type {t}")
    vt = child.type
    if not pa.types.is_integer(vt):
        raise TypeError(
            f"{name}: token ids must be integers, got Arrow type {t} (example 0)"
        )
    if child.null_count:
        pos = int(np.flatnonzero(child.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"{name}: example {_example_of(offsets, pos)} has a null token id")
    values = child.to_numpy(zero_copy_only=False)
    return Ragged(_normalise_values(values, offsets, name, f"Arrow type {t}"), offsets)


def _check_ragged(r: Ragged, name: str) -> Ragged:
    """Validate a user-given Ragged (dtypes, monotonic offsets) and rebase it to start at 0."""
    values = np.asarray(r.values)
    offsets = np.asarray(r.offsets)
    if offsets.ndim != 1 or offsets.size < 1:
        raise ValueError(
            f"{name}: offsets must be 1-D with n + 1 >= 1 entries, got shape {offsets.shape}"
        )
    if offsets.dtype.kind not in "iu":
        raise TypeError(f"{name}: offsets must be integers, got dtype {offsets.dtype}")
    if values.ndim != 1:
        raise ValueError(f"{name}: values must be 1-D, got shape {values.shape}")
    offsets = offsets.astype(np.int64, copy=False)
    steps = np.diff(offsets)
    if steps.size and steps.min() < 0:
        i = int(np.flatnonzero(steps < 0)[0])
        raise ValueError(
            f"{name}: offsets must be non-decreasing, but offsets[{i + 1}] = {offsets[i + 1]} < "
            f"offsets[{i}] = {offsets[i]} (example {i})"
        )
    start, end = int(offsets[0]), int(offsets[-1])
    if start < 0 or end > values.size:
        raise ValueError(
            f"{name}: offsets span [{start}, {end}) but there are {values.size} values"
        )
    if start or end != values.size:
        values = values[start:end]
        offsets = offsets - start
    vals = _normalise_values(values, offsets, name, f"dtype {values.dtype}")
    contiguous: IntArray = np.ascontiguousarray(vals)  # type: ignore[assignment]
    return Ragged(contiguous, np.ascontiguousarray(offsets))


def _is_sequence(x: Any) -> bool:
    """Whether one example's field value is a sequence (of ids) rather than a scalar."""
    if isinstance(x, list | tuple):
        return True
    if isinstance(x, np.ndarray):
        return x.ndim >= 1
    if hasattr(x, "dim") and hasattr(x, "detach"):
        return int(x.dim()) >= 1
    return False


def _is_sequence_column(col: Any) -> bool:
    """Whether a column holds one sequence per example (so it is padded, not stacked)."""
    if isinstance(col, Ragged):
        return True
    if _is_arrow(col):
        import pyarrow as pa

        t = col.type
        return bool(pa.types.is_list(t) or pa.types.is_large_list(t)
                    or pa.types.is_fixed_size_list(t))  # fmt: skip
    if isinstance(col, np.ndarray):
        return col.ndim == 2 or (col.dtype == object and col.size > 0 and _is_sequence(col[0]))
    if hasattr(col, "dim") and hasattr(col, "detach"):
        return int(col.dim()) == 2
    if isinstance(col, list | tuple):
        first = next((x for x in col if x is not None), None)
        return _is_sequence(first)
    return False


def _as_ragged(col: Any, name: str) -> Ragged:
    """A column of sequences, in any supported form, as a validated ragged batch."""
    if isinstance(col, Ragged):
        return _check_ragged(col, name)
    if _is_arrow(col):
        return _ragged_from_arrow(col, name)
    if hasattr(col, "dim") and hasattr(col, "detach") and int(col.dim()) == 2:
        col = col.detach().cpu().numpy()
    if isinstance(col, np.ndarray) and col.ndim == 2:
        n, width = col.shape
        offsets = np.arange(n + 1, dtype=np.int64) * width
        values = _normalise_values(np.ascontiguousarray(col).reshape(-1), offsets, name,
                                   f"dtype {col.dtype}")  # fmt: skip
        return Ragged(values, offsets)
    if isinstance(col, np.ndarray) and col.ndim == 1 and col.dtype == object:
        return _ragged_from_rows(list(col), name)
    if isinstance(col, list | tuple):
        return _ragged_from_rows(col, name)
    raise TypeError(f"{name}: cannot read a column of sequences from {type(col).__name__}")


# --------------------------------------------------------------------------------------------
# Batches: normalise the input form to columns
# --------------------------------------------------------------------------------------------


@dataclass
class _Columns:
    n: int
    cols: dict[str, Any]


def _columns(batch: Any) -> _Columns:
    """Columns of a batch (list of dicts, Arrow record batch / table, or dict of columns)."""
    if _is_arrow(batch) and hasattr(batch, "column_names"):
        n = int(batch.num_rows)
        if n == 0:
            raise ValueError("empty batch: the Arrow record batch has no rows")
        return _Columns(n, {k: batch.column(k) for k in batch.column_names})
    if isinstance(batch, Mapping):
        if not batch:
            raise ValueError("empty batch: the dict of columns has no fields")
        lengths = {k: _column_len(k, v) for k, v in batch.items()}
        n = next(iter(lengths.values()))
        for k, m in lengths.items():
            if m != n:
                first = next(iter(lengths))
                raise ValueError(
                    f"inconsistent batch: field {k!r} has {m} examples but {first!r} has {n}"
                )
        if n == 0:
            raise ValueError("empty batch: the columns have no examples")
        return _Columns(n, dict(batch))
    if isinstance(batch, Sequence) and not isinstance(batch, str | bytes):
        if len(batch) == 0:
            raise ValueError("empty batch: no examples")
        first = batch[0]
        if _is_arrow(first) and hasattr(first, "column_names"):  # Arrow rows / batches
            return _columns(_concat_arrow(batch))
        if not isinstance(first, Mapping):
            raise TypeError(f"example 0 must be a dict of fields, got {type(first).__name__}")
        keys = first.keys()
        for i, ex in enumerate(batch):
            if not isinstance(ex, Mapping):
                raise TypeError(f"example {i} must be a dict of fields, got {type(ex).__name__}")
            if ex.keys() != keys:
                missing = sorted(set(keys) - set(ex.keys()))
                if missing:
                    raise ValueError(
                        f"example {i} is missing field {missing[0]!r} (present in example 0)"
                    )
                extra = sorted(set(ex.keys()) - set(keys))
                raise ValueError(f"example {i} has field {extra[0]!r} that example 0 lacks")
        return _Columns(len(batch), {k: list(map(operator.itemgetter(k), batch)) for k in keys})
    raise TypeError(
        "a batch must be a list of example dicts, a dict of columns or a pyarrow "
        f"RecordBatch/Table, got {type(batch).__name__}"
    )


def _concat_arrow(parts: Sequence[Any]) -> Any:
    """One table from a list of Arrow tables / record batches (one C++ concatenation)."""
    import pyarrow as pa

    tables: list[Any] = []
    for i, p in enumerate(parts):
        if isinstance(p, pa.RecordBatch):
            p = pa.Table.from_batches([p])
        if not isinstance(p, pa.Table):
            raise TypeError(f"example {i} must be an Arrow table like example 0, got "
                            f"{type(p).__name__}")  # fmt: skip
        if tables and p.schema != tables[0].schema:
            raise ValueError(f"example {i} has schema {p.schema} but example 0 has "
                             f"{tables[0].schema}")  # fmt: skip
        tables.append(p)
    return pa.concat_tables(tables)


def _column_len(name: str, col: Any) -> int:
    if isinstance(col, Ragged):
        return len(col)
    try:
        return len(col)
    except TypeError:
        raise TypeError(f"field {name!r}: a column must be a sequence, got {type(col).__name__}")\
            from None


def _field(c: _Columns, key: str) -> Any:
    if key not in c.cols:
        raise ValueError(f"batch has no field {key!r} (fields: {sorted(c.cols)})")
    return c.cols[key]


def _check_same_lengths(a: Ragged, b: Ragged, name: str, ref: str) -> None:
    la, lb = a.lengths, b.lengths
    if la.shape != lb.shape or not np.array_equal(la, lb):
        i = int(np.flatnonzero(la != lb)[0])
        raise ValueError(
            f"{name}: example {i} has {int(la[i])} tokens but its {ref} has {int(lb[i])}"
        )


# --------------------------------------------------------------------------------------------
# Output buffers (optionally pinned) and fields that are stacked or passed through
# --------------------------------------------------------------------------------------------


def _want_tensors(return_tensors: ReturnTensors) -> bool:
    if return_tensors is True or return_tensors == "pt":
        return True
    if return_tensors is False or return_tensors == "np":
        return False
    raise ValueError(f"return_tensors must be True/'pt' or False/'np', got {return_tensors!r}")


def _check_int(
    name: str, value: Any, *, minimum: int | None = None, optional: bool = False
) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not -_INT64_MAX - 1 <= value <= _INT64_MAX:  # else the kernel call fails, at collate time
        raise ValueError(f"{name} must fit in int64, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


class _Output:
    """Allocates output buffers (pinned when asked and possible) and wraps them as tensors."""

    _pin_warned: ClassVar[bool] = False

    def __init__(self, return_tensors: ReturnTensors, pin_memory: bool) -> None:
        self.tensors = _want_tensors(return_tensors)
        self.pin_memory = bool(pin_memory)
        self._pin: bool | None = None  # decided at the first call (in the collating process)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pin"] = None  # re-decide in the worker that unpickles us
        return state

    def pin(self) -> bool:
        if self._pin is None:
            import torch

            self._pin = self.pin_memory and torch.cuda.is_available()
            if self.pin_memory and not self._pin and not _Output._pin_warned:
                _Output._pin_warned = True
                warnings.warn(
                    "pin_memory=True but CUDA is not available: mixtape collators return "
                    "ordinary (unpinned) memory", stacklevel=3,
                )  # fmt: skip
        return self._pin

    def empty(self, shape: tuple[int, ...], dtype: npt.DTypeLike = np.int64) -> Any:
        """A fresh C-contiguous numpy buffer; with pinning, the numpy view of a pinned tensor."""
        if self.pin():
            t = _pinned_empty(shape, np.dtype(dtype))
            if t is not None:
                return t.numpy()
        return np.empty(shape, dtype=dtype)

    def arena(
        self, count: int, shape: tuple[int, ...], dtype: npt.DTypeLike = np.int64
    ) -> _Arena:
        """``count`` buffers of one shape carved from one block.

        Several MB-sized buffers allocated and freed separately make glibc trim the heap and
        page-fault them again on every batch; one block per batch avoids that (as ops.pad does).
        """
        return _Arena(list(self.empty((count, *shape), dtype)))

    def wrap(self, arr: Any) -> Any:
        """``arr`` as returned: a tensor sharing its memory (so still pinned), or numpy."""
        if not self.tensors:
            return arr
        import torch

        return torch.from_numpy(arr)


class _Arena:
    """Hands out the slots of one output block in order."""

    def __init__(self, slots: list[Any]) -> None:
        self._slots = slots

    def take(self) -> Any:
        return self._slots.pop(0)


def _pinned_empty(shape: tuple[int, ...], dtype: np.dtype[Any]) -> torch.Tensor | None:
    """A pinned host tensor, or None when pinning fails (e.g. in a forked DataLoader worker)."""
    import torch

    tdtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    try:
        return torch.empty(shape, dtype=tdtype, pin_memory=True)
    except RuntimeError:
        if not _Output._pin_warned:
            _Output._pin_warned = True
            warnings.warn("pinning host memory failed: returning unpinned memory", stacklevel=4)
        return None


def _stack_other(col: Any, name: str, tensors: bool) -> Any:
    """A non-padded field: numbers / equal-shape arrays are stacked, anything else passed through.

    Python numbers follow ``torch.tensor`` (ints → int64, floats → float32), as transformers does.
    """
    if _is_arrow(col):
        return _stack_arrow(col, tensors)
    if isinstance(col, np.ndarray) and col.dtype.kind in "biuf":
        return _tensor_or_array(col, tensors)
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
        return _tensor_or_array(np.stack(col), tensors)
    if hasattr(first, "detach") and hasattr(first, "shape"):
        import torch

        if all(isinstance(v, torch.Tensor) and v.shape == first.shape and v.dtype == first.dtype
               for v in col):  # fmt: skip
            t = torch.stack(list(col))
            return t if tensors else t.numpy()
    return list(col)


def _is_float_rows(col: Any) -> bool:
    """Whether a column of sequences holds floats (class scores / multi-hot targets, not ids)."""
    if _is_arrow(col):
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


def _stack_labels(col: Any, key: str, tensors: bool) -> Any:
    """One label per example (a number, or an equal-length row of class scores), stacked as
    ``DataCollatorWithPadding`` does (Python ints → int64, floats → float32).

    A column of only None (an unlabelled split) gives None, as ``DataCollatorForSeq2Seq`` does;
    a None, null or non-numeric label among others is an error naming the example, never a list
    passed through to the model.
    """
    if _is_arrow(col):
        if col.null_count == 0 and not _is_sequence_column(col):
            return _stack_other(col, key, tensors)
        col = col.to_pylist()
    if hasattr(col, "detach") and hasattr(col, "numpy"):
        return col if tensors else col.detach().cpu().numpy()
    if isinstance(col, np.ndarray) and col.dtype != object:
        return _stack_other(col, key, tensors)
    rows = list(col)
    missing = [i for i, v in enumerate(rows) if v is None]
    if len(missing) == len(rows):
        return None
    if missing:
        raise ValueError(f"{key}: example {missing[0]} has no label (None)")
    if not _is_sequence(rows[0]):
        out = _stack_other(rows, key, tensors)
        if isinstance(out, list):  # not all numbers
            i = next(i for i, v in enumerate(rows) if _is_sequence(v) or
                     np.asarray(_host_array(v)).dtype.kind not in "biuf")  # fmt: skip
            raise TypeError(f"{key}: example {i} has label {rows[i]!r}, expected a number")
        return out
    width = len(rows[0])
    arrays = []
    for i, r in enumerate(rows):
        arr = np.asarray(_host_array(r)) if _is_sequence(r) else np.zeros(())
        if arr.ndim != 1 or arr.dtype.kind not in "biuf":
            raise TypeError(f"{key}: example {i} has label {r!r}, expected a row of numbers "
                            f"like example 0")  # fmt: skip
        if arr.size != width:
            raise ValueError(f"{key}: example {i} has {arr.size} values but example 0 has {width} "
                             "(one row of class scores per example)")  # fmt: skip
        arrays.append(arr)
    if all(isinstance(r, list | tuple) for r in rows):  # Python floats → float32, as torch.tensor
        return _tensor_or_array(np.asarray(rows, dtype=np.float32), tensors)
    return _tensor_or_array(np.stack(arrays), tensors)


def _all_none(col: Any) -> bool:
    """Whether a column holds no value at all (None in every example, or all Arrow nulls)."""
    if _is_arrow(col):
        return bool(col.null_count == len(col))
    if isinstance(col, list | tuple) or (isinstance(col, np.ndarray) and col.dtype == object):
        return all(v is None for v in col)
    return False


def _host_array(x: Any) -> Any:
    """A torch tensor as numpy (on the host); anything else unchanged."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") and hasattr(x, "numpy") else x


def _tensor_or_array(arr: npt.NDArray[Any], tensors: bool) -> Any:
    if not tensors:
        return arr
    import torch

    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr)


def _stack_arrow(col: Any, tensors: bool) -> Any:
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    t = col.type
    if col.null_count == 0:
        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
            return _tensor_or_array(col.to_numpy(zero_copy_only=False), tensors)
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            try:
                r = _ragged_from_arrow(col, "field")
            except (TypeError, ValueError):
                return col.to_pylist()
            lengths = r.lengths
            if lengths.size and np.all(lengths == lengths[0]):
                return _tensor_or_array(r.values.reshape(len(r), int(lengths[0])), tensors)
    return col.to_pylist()


# --------------------------------------------------------------------------------------------
# Padding collators
# --------------------------------------------------------------------------------------------


class PaddingCollator:
    """Pads ``input_ids`` (+ ``attention_mask``, ragged ``labels``) of a batch in one kernel pass.

    Like transformers' ``DataCollatorWithPadding``: ids padded with ``pad_token_id``, a mask of 1
    over each example's tokens (from lengths), integer token ``labels`` padded with
    ``label_pad_token_id``; a scalar ``label``/``label_ids``, or a float row of class scores
    (multi-label), is stacked as ``labels`` (all None: ``labels`` is None). Fields in
    ``pad_values`` (default ``token_type_ids`` → 0, ``special_tokens_mask`` → 1) are padded too;
    other fields are stacked when they are numbers or equal-shape arrays, else passed through as
    lists. Differences from transformers: ``max_length`` truncates (at ``truncation_side``), and
    the examples' own ``attention_mask`` is recomputed from lengths unless
    ``keep_attention_mask=True`` (pad it instead, for masks holding zeros).

    ``pin_memory=True`` allocates outputs in pinned memory when CUDA is available; otherwise (no
    GPU, or a forked worker that cannot pin) it warns once and returns ordinary memory.
    """

    def __init__(
        self,
        pad_token_id: int,
        label_pad_token_id: int = -100,
        padding_side: Side = "right",
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        return_tensors: ReturnTensors = True,
        pin_memory: bool = False,
        truncation_side: Side = "right",
        *,
        padding: Padding = "longest",
        return_attention_mask: bool = True,
        keep_attention_mask: bool = False,
        pad_values: Mapping[str, int] | None = None,
        input_key: str = "input_ids",
    ) -> None:
        _check_int("pad_token_id", pad_token_id)
        _check_int("label_pad_token_id", label_pad_token_id)
        _check_int("max_length", max_length, minimum=1, optional=True)
        _check_int("pad_to_multiple_of", pad_to_multiple_of, minimum=1, optional=True)
        ops.is_left("padding_side", padding_side)
        ops.is_left("truncation_side", truncation_side)
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        self.pad_token_id = int(pad_token_id)
        self.label_pad_token_id = int(label_pad_token_id)
        self.padding_side: Side = padding_side
        self.truncation_side: Side = truncation_side
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding: Padding = padding
        self.return_attention_mask = return_attention_mask
        self.keep_attention_mask = keep_attention_mask
        self.pad_values = dict(DEFAULT_PAD_VALUES if pad_values is None else pad_values)
        self.input_key = input_key
        self._out = _Output(return_tensors, pin_memory)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(pad_token_id={self.pad_token_id}, "
            f"padding_side={self.padding_side!r}, max_length={self.max_length}, "
            f"pad_to_multiple_of={self.pad_to_multiple_of})"
        )

    def row_length(self, lengths: npt.NDArray[np.int64], max_length: int | None = None) -> int:
        """Columns of the padded batch for sequences of these lengths (and this max_length)."""
        if self.padding == "max_length" and max_length is not None:
            return ops.padded_length(max_length, None, self.pad_to_multiple_of)
        longest = int(lengths.max()) if lengths.size else 0
        return ops.padded_length(longest, max_length, self.pad_to_multiple_of)

    def _pad(
        self,
        ids: Ragged,
        labels: Ragged | None,
        *,
        length: int,
        name: str,
        pad_value: int,
        mask: bool,
        max_length: int | None = None,
        return_labels: bool = False,
        shift_labels: bool = False,
        check_ids: bool = True,
        arena: _Arena | None = None,
    ) -> dict[str, Any]:
        """One kernel call writing ids (+ mask, labels) into buffers from ``arena`` (or fresh)."""
        n = len(ids)
        values = ids.values
        lab_values = None if labels is None else labels.values
        if lab_values is not None and lab_values.dtype != values.dtype:
            values, lab_values = values.astype(np.int64), lab_values.astype(np.int64)
        want_labels = return_labels or labels is not None
        if arena is None:
            arena = self._out.arena(1 + mask + want_labels, (n, length))
        out: dict[str, Any] = {"input_ids": arena.take()}
        if mask:
            out["attention_mask"] = arena.take()
        if want_labels:
            out["labels"] = arena.take()
        return ops.pad(
            values, ids.offsets,
            labels=lab_values, label_offsets=None if labels is None else labels.offsets,
            length=length, max_length=max_length, padding_side=self.padding_side,
            truncation_side=self.truncation_side,
            pad_value=pad_value, label_pad_value=self.label_pad_token_id,
            return_attention_mask=mask, return_labels=want_labels, shift_labels=shift_labels,
            out=out, check_ids=check_ids, name=name,
        )  # fmt: skip

    def _labels(self, c: _Columns) -> tuple[str | None, Any]:
        """The label field (``labels``, ``label`` or ``label_ids``) and its column, if any."""
        present = [k for k in _LABEL_ALIASES if k in c.cols]
        if len(present) > 1:
            raise ValueError(f"batch has several label fields {present}: keep one")
        return (present[0], c.cols[present[0]]) if present else (None, None)

    def _collate_inputs(
        self, c: _Columns, labels: Ragged | None, *, return_labels: bool, shift_labels: bool
    ) -> tuple[dict[str, Any], Ragged, int]:
        """Pad ids, mask, labels and ``pad_values`` fields: numpy results, the ids, the width."""
        ids = _as_ragged(_field(c, self.input_key), self.input_key)
        if labels is not None:
            _check_same_lengths(labels, ids, "labels", self.input_key)
        length = self.row_length(ids.lengths, self.max_length)
        given_mask = self.keep_attention_mask and "attention_mask" in c.cols
        extras = [k for k in self.pad_values
                  if k in c.cols and k not in (self.input_key, "attention_mask")]  # fmt: skip
        want_labels = return_labels or labels is not None
        slots = 1 + self.return_attention_mask + want_labels + len(extras)
        arena = self._out.arena(slots, (len(ids), length))
        res = self._pad(
            ids, labels, length=length, max_length=self.max_length, name=self.input_key,
            pad_value=self.pad_token_id, mask=self.return_attention_mask and not given_mask,
            return_labels=return_labels,
            shift_labels=shift_labels, arena=arena,
        )  # fmt: skip
        out: dict[str, Any] = {self.input_key: res["input_ids"]}
        if given_mask and self.return_attention_mask:
            out["attention_mask"] = self._pad_field(c, "attention_mask", 0, ids, length, arena)
        elif "attention_mask" in res:
            out["attention_mask"] = res["attention_mask"]
        for key in extras:
            out[key] = self._pad_field(c, key, self.pad_values[key], ids, length, arena)
        if "labels" in res:
            out["labels"] = res["labels"]
        return out, ids, length

    def _pad_field(
        self, c: _Columns, key: str, value: int, ids: Ragged, length: int, arena: _Arena
    ) -> Any:
        r = _as_ragged(c.cols[key], key)
        _check_same_lengths(r, ids, key, self.input_key)
        res = self._pad(r, None, length=length, max_length=self.max_length, name=key,
                        pad_value=value, mask=False, arena=arena)  # fmt: skip
        return res["input_ids"]

    def _finish(self, out: dict[str, Any], c: _Columns, done: Iterable[str]) -> dict[str, Any]:
        """Wrap padded numpy buffers as tensors, then stack / pass through the other fields."""
        result = {k: self._out.wrap(v) for k, v in out.items()}
        skip = set(done) | set(out) | {"attention_mask"}
        for key, col in c.cols.items():
            if key not in skip:
                result[key] = _stack_other(col, key, self._out.tensors)
        return result

    def __call__(self, batch: Any) -> dict[str, Any]:
        c = _columns(batch)
        label_key, label_col = self._labels(c)
        labels = None
        if (label_key is not None and _is_sequence_column(label_col)
                and not _is_float_rows(label_col)):  # fmt: skip
            labels = _as_ragged(label_col, label_key)  # token labels: padded like the ids
        out, _, _ = self._collate_inputs(c, labels, return_labels=False, shift_labels=False)
        done = {self.input_key}
        if label_key is not None and labels is None:  # one label (or score row) per example
            out_t = self._finish(out, c, done | {label_key})
            out_t["labels"] = _stack_labels(label_col, label_key, self._out.tensors)
            return out_t
        return self._finish(out, c, done | ({label_key} if label_key else set()))


class CausalLMCollator(PaddingCollator):
    """Causal-LM batches: labels are the ids (or the examples' own ``labels``), −100 on padding.

    Padding is found by length, never by comparing to ``pad_token_id``, so with pad == eos the real
    EOS tokens keep their labels (transformers' ``DataCollatorForLanguageModeling(mlm=False)``
    masks every token equal to the pad id). ``shift_labels=True`` stores at position k the label
    of token k + 1 (the last token of each example gets −100), for models that do not shift.
    """

    def __init__(self, pad_token_id: int, shift_labels: bool = False, **kwargs: Any) -> None:
        super().__init__(pad_token_id, **kwargs)
        self.shift_labels = shift_labels

    def __call__(self, batch: Any) -> dict[str, Any]:
        c = _columns(batch)
        labels = None
        if "labels" in c.cols:
            labels = _as_ragged(c.cols["labels"], "labels")
        out, _, _ = self._collate_inputs(
            c, labels, return_labels=True, shift_labels=self.shift_labels
        )
        return self._finish(out, c, {self.input_key, "labels"})


class Seq2SeqCollator(PaddingCollator):
    """Encoder-decoder batches: encoder ids + mask; ``labels`` padded on their own with −100.

    With ``decoder_start_token_id``, also ``decoder_input_ids``: the padded labels shifted right
    by one with the start token in front and −100 replaced by ``pad_token_id`` (what transformers'
    ``shift_tokens_right`` / ``prepare_decoder_input_ids_from_labels`` compute). The labels may
    be named ``label`` (output as ``labels``); labels None in every example give ``labels`` None
    and no ``decoder_input_ids``, as ``DataCollatorForSeq2Seq``. Labels are cut to
    ``max_label_length`` (at ``truncation_side``) when given; with ``padding="max_length"`` they
    are padded to ``max_label_length`` (or ``max_length``).
    """

    def __init__(
        self,
        pad_token_id: int,
        decoder_start_token_id: int | None = None,
        label_pad_token_id: int = -100,
        *,
        max_label_length: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(pad_token_id, label_pad_token_id, **kwargs)
        _check_int("decoder_start_token_id", decoder_start_token_id, optional=True)
        _check_int("max_label_length", max_label_length, minimum=1, optional=True)
        self.decoder_start_token_id = decoder_start_token_id
        self.max_label_length = max_label_length

    def __call__(self, batch: Any) -> dict[str, Any]:
        c = _columns(batch)
        out, _, _ = self._collate_inputs(c, None, return_labels=False, shift_labels=False)
        label_key, label_col = self._labels(c)  # "label" too, as DataCollatorForSeq2Seq reads it
        unlabelled = label_key is not None and _all_none(label_col)
        if label_key is not None and not unlabelled:
            labels = _as_ragged(label_col, label_key)
            max_len = self.max_label_length
            if max_len is None and self.padding == "max_length":
                max_len = self.max_length
            length = self.row_length(labels.lengths, max_len)
            start = self.decoder_start_token_id
            want_dec = start is not None
            arena = self._out.arena(1 + want_dec, (len(labels), length))
            lab = self._pad(
                labels, None, length=length, max_length=max_len, name="labels",
                pad_value=self.label_pad_token_id, mask=False, check_ids=False, arena=arena,
            )["input_ids"]  # fmt: skip
            out["labels"] = lab
            if start is not None:
                out["decoder_input_ids"] = self._shift_right(lab, start, arena.take())
        result = self._finish(out, c, {self.input_key, "labels", label_key or "labels"})
        if unlabelled:  # every example's labels are None (a test split): labels=None, as HF
            result["labels"] = None
        return result

    def _shift_right(
        self, labels: npt.NDArray[np.int64], start: int, dec: npt.NDArray[np.int64]
    ) -> Any:
        """Labels shifted right after ``start``, -100 → pad (transformers' shift_tokens_right)."""
        if labels.shape[1]:
            dec[:, 0] = start
            dec[:, 1:] = labels[:, :-1]
            np.putmask(dec, dec == -100, self.pad_token_id)
        return dec


# --------------------------------------------------------------------------------------------
# Padding-free flattening
# --------------------------------------------------------------------------------------------


class FlatteningCollator:
    """Padding-free batches in the exact format of transformers' ``DataCollatorWithFlattening``.

    All examples concatenated into ``input_ids`` [1, T] (int64); ``labels`` [1, T] (the examples'
    ``labels`` or the ids) with ``separator_id`` at each document start; ``position_ids`` [1, T]
    restarting at ``position_ids_start``; optionally ``seq_idx`` [1, T] (int32) and the flash
    attention kwargs ``cu_seq_lens_q/k`` (int32, n + 1) and ``max_length_q/k`` (Python ints).
    Vectorised: no Python loop per sequence. The examples' ``attention_mask`` is dropped (there
    is no padding); other ragged fields with the ids' lengths are flattened to [1, T], other
    fields stacked or passed through (transformers drops them).
    """

    def __init__(
        self,
        return_position_ids: bool = True,
        separator_id: int = -100,
        return_flash_attn_kwargs: bool = False,
        return_seq_idx: bool = False,
        position_ids_start: int = 0,
        return_tensors: ReturnTensors = True,
        pin_memory: bool = False,
        *,
        input_key: str = "input_ids",
    ) -> None:
        _check_int("separator_id", separator_id)
        _check_int("position_ids_start", position_ids_start)
        self.return_position_ids = return_position_ids
        self.separator_id = int(separator_id)
        self.return_flash_attn_kwargs = return_flash_attn_kwargs
        self.return_seq_idx = return_seq_idx
        self.position_ids_start = int(position_ids_start)
        self.input_key = input_key
        self._out = _Output(return_tensors, pin_memory)

    def __call__(self, batch: Any) -> dict[str, Any]:
        c = _columns(batch)
        ids = _as_ragged(_field(c, self.input_key), self.input_key)
        labels = None
        if "labels" in c.cols:
            labels = _as_ragged(c.cols["labels"], "labels")
            _check_same_lengths(labels, ids, "labels", self.input_key)
        n, total = len(ids), int(ids.values.size)
        lengths = ids.lengths
        starts = ids.offsets[:-1]
        if total and int(ids.values.min()) < 0:
            pos = int(np.flatnonzero(ids.values < 0)[0])
            raise ValueError(
                f"{self.input_key}: example {_example_of(ids.offsets, pos)} has a negative "
                f"token id ({int(ids.values[pos])}); token ids must be >= 0"
            )
        out: dict[str, Any] = {}
        arena = self._out.arena(2 + self.return_position_ids, (1, total))
        flat = arena.take()
        np.copyto(flat[0], ids.values)
        out[self.input_key] = flat
        lab = arena.take()
        np.copyto(lab[0], ids.values if labels is None else labels.values)
        lab[0, starts[lengths > 0]] = self.separator_id
        out["labels"] = lab
        if self.return_position_ids:
            pos_ids = arena.take()
            first = np.repeat(starts - self.position_ids_start, lengths)
            np.subtract(np.arange(total, dtype=np.int64), first, out=pos_ids[0])
            out["position_ids"] = pos_ids
        if self.return_seq_idx:
            seq = self._out.empty((1, total), np.int32)
            seq[0] = np.repeat(np.arange(n, dtype=np.int32), lengths)
            out["seq_idx"] = seq
        result = {k: self._out.wrap(v) for k, v in out.items()}
        if self.return_flash_attn_kwargs:
            if total > np.iinfo(np.int32).max:
                raise ValueError(f"{total} tokens overflow the int32 cu_seq_lens")
            for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
                cu = self._out.empty((n + 1,), np.int32)
                np.copyto(cu, ids.offsets, casting="unsafe")
                result[key] = self._out.wrap(cu)
            longest = int(lengths.max())
            result["max_length_q"] = result["max_length_k"] = longest
        for key, col in c.cols.items():
            if key in (self.input_key, "labels", "attention_mask"):
                continue
            if _is_sequence_column(col):
                r = _as_ragged(col, key)
                _check_same_lengths(r, ids, key, self.input_key)
                buf = self._out.empty((1, total))
                np.copyto(buf[0], r.values)
                result[key] = self._out.wrap(buf)
            else:
                result[key] = _stack_other(col, key, self._out.tensors)
        return result


# --------------------------------------------------------------------------------------------
# Vision
# --------------------------------------------------------------------------------------------

#: Per-channel (mean, std) presets, for images scaled to [0, 1].
IMAGE_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "mnist": ((0.1307,), (0.3081,)),
}


class VisionCollator:
    """Stacks images into float32 ``pixel_values`` [B, C, H, W], normalised per channel.

    Images: HWC or HW numpy arrays (uint8 0..255 or float 0..1; PIL images via ``np.asarray``),
    or CHW tensors (``layout="auto"``: numpy is HWC, tensors CHW; or force "HWC" / "CHW").
    uint8 images are scaled by 1/255. ``normalization``: a preset name ("imagenet", "cifar10",
    "mnist"), a ``(mean, std)`` pair of per-channel tuples, or None (no normalisation).
    Grayscale images with RGB statistics are an error unless ``num_channels=3`` (the gray channel
    is repeated). ``labels`` / ``label`` become an int64 ``labels`` tensor; other fields are stacked
    or passed through.
    """

    def __init__(
        self,
        normalization: str | tuple[Sequence[float], Sequence[float]] | None = "imagenet",
        *,
        image_key: str = "pixel_values",
        num_channels: int | None = None,
        layout: Literal["auto", "HWC", "CHW"] = "auto",
        return_tensors: ReturnTensors = True,
        pin_memory: bool = False,
    ) -> None:
        if isinstance(normalization, str):
            if normalization not in IMAGE_NORMALIZATION:
                raise ValueError(
                    f"unknown normalization preset {normalization!r}; "
                    f"presets: {sorted(IMAGE_NORMALIZATION)} or a (mean, std) pair"
                )
            mean, std = IMAGE_NORMALIZATION[normalization]
        elif normalization is None:
            mean, std = (0.0,), (1.0,)
        else:
            mean, std = (tuple(float(v) for v in x) for x in normalization)
        if len(mean) != len(std) or not mean:
            raise ValueError(f"mean {mean} and std {std} must have the same, non-zero length")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be > 0, got {std}")
        if num_channels not in (None, 1, 3, 4):
            raise ValueError(f"num_channels must be 1, 3 or 4, got {num_channels}")
        if layout not in ("auto", "HWC", "CHW"):
            raise ValueError(f"layout must be 'auto', 'HWC' or 'CHW', got {layout!r}")
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.normalize = normalization is not None
        self.image_key = image_key
        self.num_channels = num_channels
        self.layout = layout
        self._out = _Output(return_tensors, pin_memory)

    def _chw(self, img: Any, i: int) -> npt.NDArray[Any]:
        """One image as a CHW numpy array (a view when possible)."""
        is_tensor = hasattr(img, "detach") and hasattr(img, "numpy")
        arr = img.detach().cpu().numpy() if is_tensor else np.asarray(img)
        if arr.dtype.kind not in "uif" and arr.dtype.kind != "b":
            raise TypeError(f"{self.image_key}: example {i} has dtype {arr.dtype}, not numeric")
        if arr.ndim == 2:
            return arr[None]
        if arr.ndim != 3:
            raise ValueError(f"{self.image_key}: example {i} must be HW, HWC or CHW, got shape "
                             f"{arr.shape}")  # fmt: skip
        layout = self.layout
        if layout == "auto":
            chans = (1, 3, 4)
            if arr.shape[0] in chans and arr.shape[2] not in chans:
                layout = "CHW"
            elif arr.shape[2] in chans and arr.shape[0] not in chans:
                layout = "HWC"
            else:
                layout = "CHW" if is_tensor else "HWC"
        return arr.transpose(2, 0, 1) if layout == "HWC" else arr

    def __call__(self, batch: Any) -> dict[str, Any]:
        c = _columns(batch)
        col = _field(c, self.image_key)
        if _is_arrow(col):
            col = col.to_pylist()
        images = list(col)  # a list, or the rows of a stacked array / tensor
        chw = [self._chw(img, i) for i, img in enumerate(images)]
        shape = chw[0].shape
        for i, a in enumerate(chw):
            if a.shape != shape:
                raise ValueError(f"{self.image_key}: example {i} has shape {a.shape} (as CHW) but "
                                 f"example 0 has {shape}")  # fmt: skip
        kinds = {a.dtype for a in chw}
        if len(kinds) > 1:
            raise TypeError(f"{self.image_key}: images mix dtypes {sorted(map(str, kinds))}")
        chans, height, width = shape
        target = self.num_channels or chans
        if chans != target:
            if chans == 1:
                chw = [np.broadcast_to(a, (target, height, width)) for a in chw]
            else:
                raise ValueError(f"{self.image_key}: images have {chans} channels, num_channels "
                                 f"is {target}")  # fmt: skip
        nstats = self.mean.size
        if self.normalize and nstats not in (1, target):
            raise ValueError(
                f"{self.image_key}: normalization has {nstats} channels but images have {target}"
                + (" (pass num_channels=3 to repeat the gray channel)" if target == 1 else "")
            )
        scale = np.float32(1 / 255) if chw[0].dtype == np.uint8 else np.float32(1)
        mul = np.broadcast_to((scale / self.std)[:, None, None], (target, 1, 1)).astype(np.float32)
        sub = np.broadcast_to((self.mean / self.std)[:, None, None], (target, 1, 1))
        out = self._out.empty((len(chw), target, height, width), np.float32)
        for i, a in enumerate(chw):  # one vectorised op per image, writing its slot
            np.multiply(a, mul, out=out[i], casting="unsafe")
        if self.normalize:
            out -= sub.astype(np.float32)
        result = {self.image_key: self._out.wrap(out)}
        present = [k for k in _LABEL_ALIASES if k in c.cols]
        if len(present) > 1:
            raise ValueError(f"batch has several label fields {present}: keep one")
        for key, value in c.cols.items():
            if key == self.image_key:
                continue
            if key in present:
                labels = _stack_labels(value, key, False)  # errors name the example
                if labels is None:  # an unlabelled split
                    result["labels"] = None
                    continue
                arr = np.asarray(labels)
                if arr.dtype.kind not in "iu" or arr.ndim != 1:
                    raise TypeError(f"{key}: expected one integer label per example, got "
                                    f"dtype {arr.dtype} shape {arr.shape}")  # fmt: skip
                result["labels"] = self._out.wrap(arr.astype(np.int64))
            else:
                result[key] = _stack_other(value, key, self._out.tensors)
        return result


# --------------------------------------------------------------------------------------------
# Factories
# --------------------------------------------------------------------------------------------


def create_collate_fn(
    pad_token_id: int,
    label_pad_token_id: int = -100,
    padding_side: Side = "right",
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
    return_tensors: ReturnTensors = True,
    pin_memory: bool = False,
    truncation_side: Side = "right",
    **kwargs: Any,
) -> PaddingCollator:
    """A picklable padding collator (``DataCollatorWithPadding`` semantics); see PaddingCollator."""
    return PaddingCollator(
        pad_token_id, label_pad_token_id, padding_side, max_length, pad_to_multiple_of,
        return_tensors, pin_memory, truncation_side, **kwargs,
    )  # fmt: skip


def create_causal_lm_collate(
    pad_token_id: int, shift_labels: bool = False, **kwargs: Any
) -> CausalLMCollator:
    """Causal-LM collator: labels from the ids, −100 on padding by length; see CausalLMCollator."""
    return CausalLMCollator(pad_token_id, shift_labels=shift_labels, **kwargs)


def create_seq2seq_collate(
    pad_token_id: int,
    decoder_start_token_id: int | None = None,
    label_pad_token_id: int = -100,
    **kwargs: Any,
) -> Seq2SeqCollator:
    """Encoder-decoder collator (``DataCollatorForSeq2Seq`` semantics); see Seq2SeqCollator."""
    return Seq2SeqCollator(pad_token_id, decoder_start_token_id, label_pad_token_id, **kwargs)


def create_flattening_collate(**kwargs: Any) -> FlatteningCollator:
    """Padding-free collator (``DataCollatorWithFlattening`` format); see FlatteningCollator."""
    return FlatteningCollator(**kwargs)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class CollatorInfo:
    """A registered collator factory."""

    name: str
    modality: str
    description: str
    factory: Callable[..., Any]


class CollatorRegistry:
    """Process-wide registry of collator factories, selectable by name or by modality.

    ``CollatorRegistry()`` is always the same object. Register with the decorator
    ``@CollatorRegistry.register(name, modality=..., description=...)`` on a class or factory
    function; ``get_collator(name=...)`` or ``get_collator(modality=...)`` (the first registered
    for that modality, or the one registered with ``default=True``) builds one with ``**kwargs``.
    """

    _instance: ClassVar[CollatorRegistry | None] = None
    _entries: ClassVar[dict[str, CollatorInfo]] = {}
    _defaults: ClassVar[dict[str, str]] = {}

    def __new__(cls) -> CollatorRegistry:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    @classmethod
    def register(
        cls,
        name: str,
        *,
        modality: str = "text",
        description: str = "",
        default: bool = False,
        overwrite: bool = False,
    ) -> Callable[[F], F]:
        """Decorator registering a collator class or factory under ``name``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"collator name must be a non-empty string, got {name!r}")

        def deco(factory: F) -> F:
            if not callable(factory):
                raise TypeError(f"collator {name!r}: {factory!r} is not callable")
            if name in cls._entries and not overwrite:
                raise ValueError(f"a collator named {name!r} is already registered")
            cls._entries[name] = CollatorInfo(name, modality, description, factory)
            if default or modality not in cls._defaults:
                cls._defaults[modality] = name
            return factory

        return deco

    @classmethod
    def unregister(cls, name: str) -> None:
        """Remove a registered collator (and its modality default)."""
        info = cls._entries.pop(name, None)
        if info is None:
            raise KeyError(f"no collator named {name!r}")
        if cls._defaults.get(info.modality) == name:
            rest = [e.name for e in cls._entries.values() if e.modality == info.modality]
            if rest:
                cls._defaults[info.modality] = rest[0]
            else:
                del cls._defaults[info.modality]

    @classmethod
    def get_collator(
        cls, name: str | None = None, *, modality: str | None = None, **kwargs: Any
    ) -> Any:
        """Build the collator registered as ``name``, or the default one for ``modality``."""
        if name is None and modality is None:
            raise ValueError("get_collator needs name=... or modality=...")
        if name is None:
            assert modality is not None
            if modality not in cls._defaults:
                raise ValueError(
                    f"no collator for modality {modality!r}; modalities: {sorted(cls._defaults)}"
                )
            name = cls._defaults[modality]
        info = cls._entries.get(name)
        if info is None:
            raise ValueError(f"no collator named {name!r}; registered: {sorted(cls._entries)}")
        if modality is not None and info.modality != modality:
            raise ValueError(
                f"collator {name!r} is for modality {info.modality!r}, not {modality!r}"
            )
        return info.factory(**kwargs)

    @classmethod
    def list_collators(cls, modality: str | None = None) -> list[CollatorInfo]:
        """Registered collators (of one modality, if given), in registration order."""
        return [e for e in cls._entries.values() if modality is None or e.modality == modality]


def get_collator(name: str | None = None, *, modality: str | None = None, **kwargs: Any) -> Any:
    """Build a registered collator by name or modality (see CollatorRegistry.get_collator)."""
    return CollatorRegistry.get_collator(name, modality=modality, **kwargs)


def list_collators(modality: str | None = None) -> list[CollatorInfo]:
    """The registered collators (see CollatorRegistry.list_collators)."""
    return CollatorRegistry.list_collators(modality)


CollatorRegistry.register(
    "padding", modality="text", description="pad ids, mask and labels (DataCollatorWithPadding)"
)(create_collate_fn)
CollatorRegistry.register(
    "causal_lm", modality="text", description="causal LM: labels = ids, -100 on padding by length"
)(create_causal_lm_collate)
CollatorRegistry.register(
    "seq2seq", modality="text", description="encoder ids/mask, labels, decoder_input_ids"
)(create_seq2seq_collate)
CollatorRegistry.register(
    "flattening", modality="text",
    description="padding-free [1, T] batches (DataCollatorWithFlattening format)",
)(create_flattening_collate)  # fmt: skip
CollatorRegistry.register(
    "vision", modality="vision", description="stack and normalise images, int64 labels"
)(VisionCollator)
