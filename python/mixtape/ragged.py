"""The one input layer: every batch or dataset form -> ragged batches (values + int64 offsets).

Collation, packing and the stages after them read their inputs here, so every form a PyTorch + HF
user has (a list of example dicts, Python lists / numpy arrays / tensors of ids, an Arrow
``RecordBatch``/``Table`` or list array, an HF ``Dataset``, a dict of columns, ``(values,
offsets)`` numpy pairs) follows one dtype rule and one message style:

- token ids are int32 or int64, kept as they are; narrower integers are widened to int32,
  uint32/uint64 to int64 (a uint64 beyond the int64 range is an error); anything else (floats,
  bools, strings) is a ``TypeError`` naming the field and the example;
- errors read ``"<field>: example <i> ..."``, counting examples (rows) from 0.

Arrow list columns are read as their flat values and offsets, with no Python object per token or
per sequence; Python lists of ids go through ``ops.ints_from_lists`` (one C++ loop over the items,
which rejects floats, strings and ints beyond int64).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from mixtape import ops
from mixtape.ops import Int64Array, IntArray, as_offsets

_INT64_MAX = np.iinfo(np.int64).max

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
        return ragged_from_rows(sequences, name)

    @classmethod
    def from_arrow(cls, column: Any, name: str = "input_ids") -> Ragged:
        """Zero-copy view of an Arrow list / large_list / fixed_size_list column (or chunked)."""
        return arrow_ragged(column, name)


def offsets_from_lengths(lengths: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def example_of(offsets: npt.NDArray[np.integer[Any]], position: int) -> int:
    """The example whose values hold flat index ``position``."""
    return int(np.searchsorted(offsets, position, side="right")) - 1


def normalise_values(
    values: npt.NDArray[Any],
    offsets: npt.NDArray[np.integer[Any]],
    name: str,
    what: str,
    first_example: int = 0,
) -> IntArray:
    """Token ids by the one dtype rule (module docstring): int32/int64 kept, others widened.

    Errors name the example, counting from ``first_example`` (for one row of a larger batch).
    """
    dt = values.dtype
    if dt in ops.INDEX_DTYPES:
        return values
    if dt.kind in "iu" and dt.itemsize < 4:
        return values.astype(np.int32)
    if dt.kind == "u" and dt.itemsize == 8 and values.size:
        big = np.flatnonzero(values > _INT64_MAX)
        if big.size:
            i = first_example + example_of(offsets, int(big[0]))
            raise ValueError(
                f"{name}: example {i} has a token id out of the int64 range "
                f"({int(values[big[0]])})"
            )
    if dt.kind in "iu":  # uint32 / uint64
        return values.astype(np.int64)
    if values.size == 0 and dt.kind == "f":  # np.asarray([]) is float64
        return np.zeros(0, dtype=np.int64)
    i = first_example + (example_of(offsets, 0) if values.size else 0)
    raise TypeError(f"{name}: token ids must be integers, got {what} (example {i})")


def row_array(row: Any, name: str, i: int) -> IntArray:
    """One example's ids as a 1-D int32/int64 array; errors name the field and example."""
    if isinstance(row, list | tuple):
        return ids_from_list(row if isinstance(row, list) else list(row), name, i)
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
    return normalise_values(arr, offs, name, f"dtype {arr.dtype}", first_example=i)


def ids_from_list(row: list[Any], name: str, i: int) -> npt.NDArray[np.int64]:
    return ops.ints_from_lists([row], name, first=i)[0]


def ragged_from_rows(rows: Sequence[Any], name: str) -> Ragged:
    """Flatten per-example sequences: one C-level conversion per example, no per-token Python."""
    n = len(rows)
    if isinstance(rows, list) and all(type(r) is list for r in rows):
        # Fast path (Python lists of ints): one C++ pass that also rejects floats, strings and
        # ints beyond int64, which np.fromiter / slice assignment accept.
        return Ragged(*ops.ints_from_lists(rows, name))
    parts = [row_array(r, name, i) for i, r in enumerate(rows)]
    lengths = np.fromiter(map(len, parts), dtype=np.int64, count=n)
    if not parts:
        return Ragged(np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64))
    joined: IntArray = np.concatenate(parts)  # type: ignore[assignment]  # int32 iff all are
    return Ragged(joined, offsets_from_lengths(lengths))


def is_arrow(x: Any) -> bool:
    return type(x).__module__.startswith("pyarrow")


def arrow_ragged(column: Any, name: str) -> Ragged:
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
        raise TypeError(f"{name}: token ids must be integers, got Arrow type {t} (example 0)")
    if child.null_count:
        pos = int(np.flatnonzero(child.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"{name}: example {example_of(offsets, pos)} has a null token id")
    values = np.asarray(child.to_numpy(zero_copy_only=False))
    return Ragged(normalise_values(values, offsets, name, f"Arrow type {t}"), offsets)


def check_ragged(r: Ragged, name: str) -> Ragged:
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
    vals = normalise_values(values, offsets, name, f"dtype {values.dtype}")
    contiguous: IntArray = np.ascontiguousarray(vals)  # type: ignore[assignment]
    return Ragged(contiguous, np.ascontiguousarray(offsets))


def is_sequence(x: Any) -> bool:
    """Whether one example's field value is a sequence (of ids) rather than a scalar."""
    if isinstance(x, list | tuple):
        return True
    if isinstance(x, np.ndarray):
        return x.ndim >= 1
    if hasattr(x, "dim") and hasattr(x, "detach"):
        return int(x.dim()) >= 1
    return False


def is_sequence_column(col: Any) -> bool:
    """Whether a column holds one sequence per example (so it is padded, not stacked)."""
    if isinstance(col, Ragged):
        return True
    if is_arrow(col):
        import pyarrow as pa

        t = col.type
        return bool(pa.types.is_list(t) or pa.types.is_large_list(t)
                    or pa.types.is_fixed_size_list(t))  # fmt: skip
    if isinstance(col, np.ndarray):
        return col.ndim == 2 or (col.dtype == object and col.size > 0 and is_sequence(col[0]))
    if hasattr(col, "dim") and hasattr(col, "detach"):
        return int(col.dim()) == 2
    if isinstance(col, list | tuple):
        first = next((x for x in col if x is not None), None)
        return is_sequence(first)
    return False


def as_ragged(col: Any, name: str) -> Ragged:
    """A column of sequences, in any supported form, as a validated ragged batch."""
    if isinstance(col, Ragged):
        return check_ragged(col, name)
    if is_arrow(col):
        return arrow_ragged(col, name)
    if hasattr(col, "dim") and hasattr(col, "detach") and int(col.dim()) == 2:
        col = col.detach().cpu().numpy()
    if isinstance(col, np.ndarray) and col.ndim == 2:
        n, width = col.shape
        offsets = np.arange(n + 1, dtype=np.int64) * width
        values = normalise_values(np.ascontiguousarray(col).reshape(-1), offsets, name,
                                   f"dtype {col.dtype}")  # fmt: skip
        return Ragged(values, offsets)
    if isinstance(col, np.ndarray) and col.ndim == 1 and col.dtype == object:
        return ragged_from_rows(list(col), name)
    if isinstance(col, list | tuple):
        return ragged_from_rows(col, name)
    raise TypeError(f"{name}: cannot read a column of sequences from {type(col).__name__}")


# --------------------------------------------------------------------------------------------
# Batches: normalise the input form to columns
# --------------------------------------------------------------------------------------------


@dataclass
class Columns:
    n: int
    cols: dict[str, Any]


def is_id_row(x: Any) -> bool:
    """Whether one example is a bare sequence of token ids (not a dict of fields)."""
    if isinstance(x, list | tuple):
        return True
    if isinstance(x, np.ndarray):
        return x.ndim == 1
    return hasattr(x, "dim") and hasattr(x, "detach") and int(x.dim()) == 1


def batch_columns(batch: Any, input_key: str = "input_ids") -> Columns:
    """Columns of a batch (list of dicts, Arrow record batch / table, or dict of columns).

    A list of bare id sequences (lists, numpy arrays or tensors, as
    ``DataCollatorForLanguageModeling`` accepts), or a 2-D array / tensor, is the ``input_key``
    column alone.
    """
    if (isinstance(batch, np.ndarray) and batch.ndim == 2) or (
        hasattr(batch, "dim") and hasattr(batch, "detach") and int(batch.dim()) == 2
    ):
        if len(batch) == 0:
            raise ValueError("empty batch: no examples")
        return Columns(len(batch), {input_key: batch})
    if is_arrow(batch) and hasattr(batch, "column_names"):
        n = int(batch.num_rows)
        if n == 0:
            raise ValueError("empty batch: the Arrow record batch has no rows")
        return Columns(n, {k: batch.column(k) for k in batch.column_names})
    if isinstance(batch, Mapping):
        if not batch:
            raise ValueError("empty batch: the dict of columns has no fields")
        lengths = {k: column_len(k, v) for k, v in batch.items()}
        n = next(iter(lengths.values()))
        for k, m in lengths.items():
            if m != n:
                first = next(iter(lengths))
                raise ValueError(
                    f"inconsistent batch: field {k!r} has {m} examples but {first!r} has {n}"
                )
        if n == 0:
            raise ValueError("empty batch: the columns have no examples")
        return Columns(n, dict(batch))
    if isinstance(batch, Sequence) and not isinstance(batch, str | bytes):
        if len(batch) == 0:
            raise ValueError("empty batch: no examples")
        first = batch[0]
        if is_arrow(first) and hasattr(first, "column_names"):  # Arrow rows / batches
            return batch_columns(concat_arrow(batch))
        if is_id_row(first):  # bare token ids: the input_key column
            for i, ex in enumerate(batch):
                if not is_id_row(ex):
                    raise TypeError(f"example {i} must be a sequence of ids like example 0, got "
                                    f"{type(ex).__name__}")  # fmt: skip
            return Columns(len(batch), {input_key: list(batch)})
        if not isinstance(first, Mapping):
            raise TypeError(f"example 0 must be a dict of fields or a sequence of ids, got "
                            f"{type(first).__name__}")  # fmt: skip
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
        return Columns(len(batch), {k: list(map(operator.itemgetter(k), batch)) for k in keys})
    raise TypeError(
        "a batch must be a list of example dicts or of id sequences, a dict of columns or a "
        f"pyarrow RecordBatch/Table, got {type(batch).__name__}"
    )


def numeric_ragged(col: Any, name: str) -> tuple[npt.NDArray[Any], Int64Array] | None:
    """(values, offsets) of a column of 1-D number sequences of any numeric dtype (ints, floats,
    bools), or None when the column is something else (strings, nested, None, ...).

    Empty rows take the dtype of the others, so ``[]`` (numpy's float64) does not turn int rows
    into floats.
    """
    if isinstance(col, Ragged):
        r = check_ragged(col, name)
        return r.values, r.offsets
    if is_arrow(col):
        import pyarrow as pa

        if isinstance(col, pa.ChunkedArray):
            col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        t = col.type
        if not (pa.types.is_list(t) or pa.types.is_large_list(t)
                or pa.types.is_fixed_size_list(t)) or col.null_count:  # fmt: skip
            return None
        vt = t.value_type
        if not (pa.types.is_integer(vt) or pa.types.is_floating(vt) or pa.types.is_boolean(vt)):
            return None
        if pa.types.is_fixed_size_list(t):
            child = col.flatten()
            offsets = np.arange(len(col) + 1, dtype=np.int64) * t.list_size
        else:
            raw = col.offsets.to_numpy()
            child = col.values.slice(int(raw[0]), int(raw[-1] - raw[0]))
            offsets = raw.astype(np.int64) - int(raw[0])
        if child.null_count:
            return None
        return np.asarray(child.to_numpy(zero_copy_only=False)), offsets
    if hasattr(col, "dim") and hasattr(col, "detach"):
        if int(col.dim()) != 2:
            return None
        col = col.detach().cpu().numpy()
    if isinstance(col, np.ndarray) and col.dtype != object:
        if col.ndim != 2 or col.dtype.kind not in "biuf":
            return None
        n, width = col.shape
        return np.ascontiguousarray(col).reshape(-1), np.arange(n + 1, dtype=np.int64) * width
    if not isinstance(col, list | tuple | np.ndarray):
        return None
    rows = list(col)
    if rows and all(type(r) is list for r in rows):
        try:  # ints (the common case): one C++ pass
            return ops.ints_from_lists(rows, name)
        except (TypeError, ValueError, OverflowError):
            pass
    parts = []
    for r in rows:
        if hasattr(r, "detach") and hasattr(r, "numpy"):
            r = r.detach().cpu().numpy()
        if not isinstance(r, list | tuple | np.ndarray):
            return None
        arr = np.asarray(r)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "biuf"):
            return None
        parts.append(arr)
    typed = [p for p in parts if p.size]
    dtype = np.result_type(*typed) if typed else np.dtype(np.int64)
    lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    values = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
    return values, offsets_from_lengths(lengths)


def concat_arrow(parts: Sequence[Any]) -> Any:
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


def column_len(name: str, col: Any) -> int:
    if isinstance(col, Ragged):
        return len(col)
    try:
        return len(col)
    except TypeError:
        raise TypeError(f"field {name!r}: a column must be a sequence, got {type(col).__name__}")\
            from None


def field_of(c: Columns, key: str) -> Any:
    if key not in c.cols:
        raise ValueError(f"batch has no field {key!r} (fields: {sorted(c.cols)})")
    return c.cols[key]


def check_same_lengths(a: Ragged, b: Ragged, name: str, ref: str) -> None:
    la, lb = a.lengths, b.lengths
    if la.shape != lb.shape or not np.array_equal(la, lb):
        i = int(np.flatnonzero(la != lb)[0])
        raise ValueError(
            f"{name}: example {i} has {int(la[i])} tokens but its {ref} has {int(lb[i])}"
        )



# --------------------------------------------------------------------------------------------
# Datasets: the Arrow table behind an HF Dataset, and its token column
# --------------------------------------------------------------------------------------------


class TableView:
    """The columns of a pyarrow Table or HF ``Dataset``, each read in the dataset's row order.

    An HF ``select`` / ``shuffle`` keeps the table and adds a row mapping; only the columns
    actually packed are gathered through it.
    """

    def __init__(self, table: pa.Table, indices: pa.ChunkedArray | None = None) -> None:
        self.table, self.indices = table, indices
        self.column_names: list[str] = table.column_names
        self.schema = table.schema

    def column(self, name: str) -> pa.ChunkedArray:
        col = self.table.column(name)
        return col if self.indices is None else col.take(self.indices)


def arrow_table(data: Any) -> TableView | None:
    """The Arrow columns behind an HF ``Dataset`` or a pyarrow Table; None for other inputs."""
    if isinstance(data, pa.Table):
        return TableView(data)
    if isinstance(data, (pa.Array, pa.ChunkedArray, tuple, list, np.ndarray)):
        return None
    inner = getattr(data, "data", None)
    table = getattr(inner, "table", None)
    if isinstance(table, pa.Table) and hasattr(data, "_indices"):
        indices = data._indices  # set by select / shuffle / sort
        return TableView(table, None if indices is None else indices.column(0))
    return None


def is_hf_dataset(data: Any) -> bool:
    try:
        from datasets import Dataset
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(data, Dataset)


def is_dataset_dict(data: Any) -> bool:
    try:
        from datasets import DatasetDict
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(data, DatasetDict)


def ragged_column(data: Any, column: str) -> tuple[IntArray, Int64Array]:
    """(values, offsets) of the token column of any accepted input."""
    table = arrow_table(data)
    if table is not None:
        if column not in table.column_names:
            raise ValueError(f"column {column!r} not found; columns are {table.column_names}")
        r = arrow_ragged(table.column(column), f"column {column!r}")
        return r.values, r.offsets
    if isinstance(data, (pa.Array, pa.ChunkedArray)):
        r = arrow_ragged(data, "tokens")
        return r.values, r.offsets
    if isinstance(data, tuple) and len(data) == 2:
        vals = np.asarray(data[0])
        if vals.ndim != 1:
            raise ValueError(f"values must be 1-D, got shape {vals.shape}")
        offs = as_offsets(np.asarray(data[1]), "offsets")
        if np.any(np.diff(offs) < 0) or offs[-1] > vals.size:
            raise ValueError(f"offsets must be non-decreasing and end at most at {vals.size}")
        vals = normalise_values(vals[: offs[-1]], offs, "values", f"dtype {vals.dtype}")
        return vals, offs
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        r = arrow_ragged(pa.array(data), "sequences")
        return r.values, r.offsets
    raise TypeError(
        "expected an HF datasets.Dataset, a pyarrow Table / list array, a (values, offsets) "
        f"pair of numpy arrays or a list of token lists, got {type(data).__name__}"
    )
