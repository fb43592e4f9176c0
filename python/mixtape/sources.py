"""Data sources: one small interface over every kind of data the mixer and the loader read.

A :class:`Source` is a named sequence of examples (dicts). Map-style sources know their length
(``num_rows``) and give any rows in any order (``take``: Python dicts; ``take_arrow``: the same
rows as an Arrow table, whose list columns the packer reads as values + offsets without a Python
object per token). Streaming sources (``num_rows is None``) only give one pass in their own order,
from any starting ordinal (``stream(start)``), so a resumed run skips what it already read.

:func:`as_source` wraps every kind: HF ``Dataset`` / ``IterableDataset``, pyarrow tables, torch
map-style and iterable datasets, plain lists of dicts or of token lists, and (through
:mod:`mixtape.source_files`) data files, ``.npy`` token files and ``DatasetMixture`` entries.
:class:`CompositeShardedSource` puts sources one after another. Sources are picklable, so
DataLoader workers can hold them; memory-mapped data is reopened, not copied, when unpickled.

Guarantees of every source (tested per kind): ``take(r)`` equals ``[stream()[i] for i in r]``
and ``take_arrow(r).to_pylist()`` equals ``take(r)`` for plain columns (HF features that decode,
such as images, are decoded by ``take`` and stored form in ``take_arrow``); rows keep the given
order, repeats allowed; ``list(stream(s)) == list(stream())[s:]``; a source with no rows is a
``ValueError`` naming it (streaming sources: when a pass from 0 yields nothing); rows out of range,
a missing ``text_field`` and malformed records are errors naming the source and the row.
"""

from __future__ import annotations

import abc
import copy
import hashlib
import itertools
import numbers
import operator
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import torch.utils.data

from mixtape.gather import ArrowRows, list_array
from mixtape.ops import Int64Array, PieceReader

__all__ = [
    "ArrowTableSource",
    "BaseSource",
    "CompositeShardedSource",
    "HFDatasetSource",
    "HFIterableSource",
    "ListSource",
    "Source",
    "TorchIterableSource",
    "TorchMapSource",
    "as_source",
    "check_source_name",
    "hf_source",
]

_STREAM_CHUNK = 1024  # rows per take() when a map-style source is read as a stream
_ACCEPTED = (
    "a Source, a DatasetMixture, datasets.Dataset / IterableDataset, a pyarrow Table, a path, glob "
    "or list of paths (.parquet, .jsonl, .json, .csv, .arrow, .txt, a save_to_disk directory, or "
    ".npy tokens with offsets=...), a torch map-style Dataset (__len__ + __getitem__) or "
    "IterableDataset, or a list of dicts / token lists"
)


@runtime_checkable
class Source(Protocol):
    """What the mixer and the loader need from a source of examples.

    ``num_rows`` is the row count of a map-style source and ``None`` for a streaming one (no
    random access, length unknown). ``fingerprint`` identifies the data (None when unknown), so a
    resumed run can check it reads what it read before.
    """

    name: str
    num_rows: int | None
    fingerprint: str | None

    def take(self, rows: npt.ArrayLike) -> list[dict[str, Any]]:
        """The examples at ``rows`` (ints in [0, num_rows), any order, repeats allowed)."""
        ...

    def take_arrow(self, rows: npt.ArrayLike) -> pa.Table:
        """The same rows as one Arrow table (one chunk), in the given order."""
        ...

    def stream(self, start: int = 0) -> Iterator[dict[str, Any]]:
        """One pass in the source's own order from ordinal ``start``."""
        ...


# --------------------------------------------------------------------------------------------
# Shared helpers: names, rows, records
# --------------------------------------------------------------------------------------------


def check_source_name(name: object) -> str:
    """``name`` if it is a non-empty string (sources are told apart by name), else ValueError."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a source name must be a non-empty string, got {name!r}")
    return name


def _row_array(rows: npt.ArrayLike, where: str, num_rows: int) -> Int64Array:
    """``rows`` as int64, checked to lie in [0, num_rows) before any cast that could wrap."""
    given_array = isinstance(rows, np.ndarray)
    arr = rows if isinstance(rows, np.ndarray) else np.asarray(rows)
    if arr.ndim != 1:
        raise ValueError(f"{where}: rows must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    kind = arr.dtype.kind
    if kind in "fO" and not given_array:  # a Python list with huge or negative ints, or floats
        values = []
        for i, v in enumerate(list(rows)):  # type: ignore[arg-type]  # the values as given
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{where}: row at position {i} is {v!r}, not an integer")
            values.append(operator.index(v))
        for i, v in enumerate(values):
            if not 0 <= v < num_rows:
                raise ValueError(f"{where}: row {v} (position {i}) is out of range [0, {num_rows})")
        return np.asarray(values, dtype=np.int64)
    if kind == "u" and arr.dtype.itemsize == 8:
        big = arr >= num_rows
        if big.any():
            i = int(np.argmax(big))
            raise ValueError(f"{where}: row {int(arr[i])} (position {i}) is out of range "
                             f"[0, {num_rows})")  # fmt: skip
        arr = arr.astype(np.int64)
    elif kind in "iu":
        arr = arr.astype(np.int64, copy=False)
    else:
        raise TypeError(f"{where}: rows must be integers, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= num_rows)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{where}: row {int(arr[i])} (position {i}) is out of range "
                         f"[0, {num_rows})")  # fmt: skip
    return arr


def _is_tensor(x: object) -> bool:
    return isinstance(x, torch.Tensor)


def _is_token_sequence(x: object) -> bool:
    if isinstance(x, np.ndarray) or _is_tensor(x):
        return int(x.ndim) == 1  # type: ignore[attr-defined]
    return isinstance(x, (list, tuple)) and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in x[:1]
    )


def _as_record(obj: object, where: str, row: int, column: str) -> dict[str, Any]:
    """An example as a fresh dict: a mapping is copied (callers may add keys such as
    ``__source__``), a token sequence becomes ``{column: tokens}``."""
    if isinstance(obj, Mapping):
        return dict(obj)
    if _is_token_sequence(obj):
        return {column: obj}
    raise TypeError(f"{where}: row {row} is a {type(obj).__name__}; expected a dict or a 1-D "
                    f"sequence of token ids")  # fmt: skip


def _column_to_arrow(values: list[Any], where: str) -> pa.Array:
    """One column of Python/numpy/torch values as an Arrow array (1-D numeric arrays without a
    per-row Python conversion: one concatenate and an offsets array)."""
    values = [v.detach().cpu().numpy() if _is_tensor(v) else v for v in values]
    first = values[0]
    if (isinstance(first, np.ndarray) and first.ndim == 1 and first.dtype.kind in "biuf"
            and all(isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype == first.dtype
                    for v in values)):  # fmt: skip
        offsets = np.zeros(len(values) + 1, dtype=np.int64)
        np.cumsum([v.size for v in values], out=offsets[1:])
        return list_array(offsets, np.concatenate(values))
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise TypeError(f"{where}: cannot make an Arrow column: {e}") from e


def _records_to_arrow(records: list[dict[str, Any]], where: str) -> pa.Table:
    """Example dicts as one Arrow table; a key missing from a record is null there."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    columns = {k: _column_to_arrow([r.get(k) for r in records], f"{where}, column {k!r}")
               for k in keys}  # fmt: skip
    if not columns and records:
        raise ValueError(f"{where}: the examples have no fields")
    return pa.table(columns)


# --------------------------------------------------------------------------------------------
# The base class: validation and the text_field check shared by every kind
# --------------------------------------------------------------------------------------------


def ragged_column(table: pa.Table, column: str, where: str,
                  rows: Int64Array) -> tuple[npt.NDArray[Any], Int64Array]:  # fmt: skip
    """The list-of-numbers ``column`` of ``table`` (the source's ``rows``) as (values, offsets
    from 0); ValueError / TypeError naming the source, column and row when it is not one."""
    if column not in table.column_names:
        raise ValueError(f"{where}: no column {column!r} (columns: {table.column_names})")
    col = table.column(column).combine_chunks()
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        raise TypeError(f"{where}: column {column!r} must hold token lists, got {col.type}")
    if col.null_count:
        valid = np.asarray(col.is_valid().to_numpy(zero_copy_only=False))
        raise ValueError(f"{where}: row {int(rows[int(np.argmin(valid))])} has {column!r} = None")
    offsets = np.asarray(col.offsets.to_numpy(), dtype=np.int64)
    values = np.asarray(col.values.to_numpy(zero_copy_only=False))[offsets[0]: offsets[-1]]
    return values, offsets - offsets[0]


def take_ragged(source: Source, rows: Int64Array,
                column: str) -> tuple[npt.NDArray[Any], Int64Array]:  # fmt: skip
    """``source.take_ragged`` for built-in sources; through ``take_arrow`` for foreign ones."""
    if isinstance(source, BaseSource):
        return source.take_ragged(rows, column)
    return ragged_column(source.take_arrow(rows), column, f"source {source.name!r}", rows)


def piece_reader(source: Source, column: str) -> PieceReader | None:
    """``source.piece_reader(column)`` for built-in sources; None (read through
    :func:`take_ragged`) for foreign ones."""
    return source.piece_reader(column) if isinstance(source, BaseSource) else None


class BaseSource(abc.ABC):
    """Shared behaviour of the built-in sources; subclasses implement ``_take`` and ``_stream``
    (``_take_arrow`` when they have a faster path than converting ``_take``'s records).

    ``text_field``: every record read must have this field, not None (``ValueError`` naming the
    source and the row otherwise), so a mis-configured source fails at its first read instead of
    feeding empty text.
    """

    num_rows: int | None
    fingerprint: str | None = None

    def __init__(self, name: str, *, text_field: str | None = None) -> None:
        self.name = check_source_name(name)
        if text_field is not None and (not isinstance(text_field, str) or not text_field):
            raise ValueError(f"source {name!r}: text_field must be a non-empty string, "
                             f"got {text_field!r}")  # fmt: skip
        self.text_field = text_field

    # -- what subclasses implement ------------------------------------------------------------

    def _take(self, rows: Int64Array) -> list[dict[str, Any]]:
        raise NotImplementedError  # pragma: no cover - map-style subclasses override

    def _take_arrow(self, rows: Int64Array) -> pa.Table:
        return _records_to_arrow(self._take(rows), self._where)

    @abc.abstractmethod
    def _stream(self, start: int) -> Iterator[dict[str, Any]]: ...

    def _stream_rows(self, start: int) -> Iterator[dict[str, Any]]:
        """A map-style source's pass: ``_take`` over consecutive chunks of rows."""
        assert self.num_rows is not None
        for lo in range(start, self.num_rows, _STREAM_CHUNK):
            yield from self._take(np.arange(lo, min(lo + _STREAM_CHUNK, self.num_rows)))

    # -- the public interface -----------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"source {self.name!r}"

    @property
    def is_streaming(self) -> bool:
        """True when the source has no random access (``num_rows is None``)."""
        return self.num_rows is None

    def _rows(self, rows: npt.ArrayLike) -> Int64Array:
        if self.num_rows is None:
            raise TypeError(f"{self._where} is streaming (num_rows=None): it has no random "
                            f"access; read it with stream(start)")  # fmt: skip
        return _row_array(rows, self._where, self.num_rows)

    def take(self, rows: npt.ArrayLike) -> list[dict[str, Any]]:
        """The examples at ``rows`` as fresh dicts, in the given order (repeats allowed)."""
        r = self._rows(rows)
        if r.size == 0:
            return []
        records = self._take(r)
        if self.text_field is not None:
            for row, rec in zip(r.tolist(), records, strict=True):
                self._check_record(rec, row)
        return records

    def take_arrow(self, rows: npt.ArrayLike) -> pa.Table:
        """The rows of :meth:`take` as one Arrow table (one chunk), in the given order."""
        r = self._rows(rows)
        table = self._take_arrow(r)
        if self.text_field is not None and r.size:
            if self.text_field not in table.column_names:
                raise ValueError(f"{self._where}: row {int(r[0])} has no field "
                                 f"{self.text_field!r} (fields: {table.column_names})")  # fmt: skip
            col = table.column(self.text_field)
            if col.null_count:
                valid = np.asarray(col.is_valid().to_numpy(zero_copy_only=False))
                row = int(r[int(np.argmin(valid))])
                raise ValueError(f"{self._where}: row {row} has {self.text_field!r} = None")
        return table

    def take_ragged(self, rows: npt.ArrayLike,
                    column: str) -> tuple[npt.NDArray[Any], Int64Array]:  # fmt: skip
        """One list-of-numbers ``column`` of ``rows`` as (values, offsets), offsets starting at 0:
        the packing loader's read (only that column is copied where the source allows)."""
        r = self._rows(rows)
        fast = self._take_ragged(r, column)
        if fast is not None:
            return fast
        return ragged_column(self.take_arrow(r), column, self._where, r)

    def _take_ragged(self, rows: Int64Array,
                     column: str) -> tuple[npt.NDArray[Any], Int64Array] | None:  # fmt: skip
        """A faster :meth:`take_ragged` where the source has one, else None."""
        return None

    def piece_reader(self, column: str) -> PieceReader | None:
        """The list-of-numbers ``column`` as a :class:`~mixtape.ops.PieceReader` (the packing
        loader copies its pieces straight from it) where the source reads it as
        :meth:`take_ragged` does, else None. Rows given to it are not checked by :meth:`_rows`
        (the reader checks every row against its own range)."""
        return None

    def stream(self, start: int = 0) -> Iterator[dict[str, Any]]:
        """One pass in the source's own order from ordinal ``start`` (past the end: nothing)."""
        if isinstance(start, bool) or not isinstance(start, numbers.Integral) or start < 0:
            raise ValueError(f"{self._where}: stream start must be an int >= 0, got {start!r}")
        return self._checked_stream(int(start))

    def _checked_stream(self, start: int) -> Iterator[dict[str, Any]]:
        row = start - 1
        for row, rec in enumerate(self._stream(start), start):
            if self.text_field is not None:
                self._check_record(rec, row)
            yield rec
        if start == 0 and row < 0:
            raise ValueError(f"{self._where} is empty: a pass over it gave no examples")

    def _check_record(self, rec: Mapping[str, Any], row: int) -> None:
        assert self.text_field is not None
        if self.text_field not in rec:
            raise ValueError(f"{self._where}: row {row} has no field {self.text_field!r} "
                             f"(fields: {sorted(rec)})")  # fmt: skip
        if rec[self.text_field] is None:
            raise ValueError(f"{self._where}: row {row} has {self.text_field!r} = None")

    def _check_not_empty(self) -> None:
        if self.num_rows == 0:
            raise ValueError(f"{self._where} is empty (0 rows)")

    def with_name(self, name: str) -> BaseSource:
        """A shallow copy under another name (the data is shared)."""
        other = copy.copy(self)
        other.name = check_source_name(name)
        return other

    def __repr__(self) -> str:
        rows = "streaming" if self.num_rows is None else f"num_rows={self.num_rows}"
        return f"{type(self).__name__}(name={self.name!r}, {rows})"


# --------------------------------------------------------------------------------------------
# HF datasets and Arrow tables
# --------------------------------------------------------------------------------------------


def _hf_types() -> tuple[Any, Any, Any, Any]:
    import datasets

    return (datasets.Dataset, datasets.IterableDataset, datasets.DatasetDict,
            datasets.IterableDatasetDict)  # fmt: skip


class ArrowTableSource(BaseSource):
    """A pyarrow ``Table`` (or ``RecordBatch``): ``take_arrow`` is an Arrow gather per batch."""

    def __init__(self, table: pa.Table | pa.RecordBatch, name: str, *,
                 text_field: str | None = None) -> None:  # fmt: skip
        super().__init__(name, text_field=text_field)
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if not isinstance(table, pa.Table):
            raise TypeError(f"{self._where}: expected a pyarrow Table, got {type(table).__name__}")
        self._arrow = ArrowRows(table)
        self.num_rows = table.num_rows
        self._check_not_empty()

    def _take_arrow(self, rows: Int64Array) -> pa.Table:
        return self._arrow.gather(rows)

    def _take_ragged(self, rows: Int64Array,
                     column: str) -> tuple[npt.NDArray[Any], Int64Array] | None:  # fmt: skip
        return None if self.text_field is not None else self._arrow.gather_ragged(rows, column)

    def piece_reader(self, column: str) -> PieceReader | None:
        return None if self.text_field is not None else self._arrow.piece_reader(column)

    def _take(self, rows: Int64Array) -> list[dict[str, Any]]:
        return list(self._arrow.gather(rows).to_pylist())

    def _stream(self, start: int) -> Iterator[dict[str, Any]]:
        return self._stream_rows(start)


class HFDatasetSource(BaseSource):
    """A HF ``datasets.Dataset``, read through its Arrow table.

    ``take_arrow`` gathers from the underlying (memory-mapped) table, through the row mapping
    ``select`` / ``shuffle`` leave, and keeps the columns chosen by ``with_format(columns=...)``.
    ``take`` gives plain Python dicts with HF's feature decoding, as ``ds[i]`` does without a
    format (a ``torch`` / ``numpy`` format is not applied). A custom ``with_transform`` is applied
    to ``take``, and ``take_arrow`` is then built from its output. ``fingerprint`` is HF's.
    """

    def __init__(self, dataset: Any, name: str, *, text_field: str | None = None,
                 fingerprint: str | None = None) -> None:  # fmt: skip
        super().__init__(name, text_field=text_field)
        dataset_type = _hf_types()[0]
        if not isinstance(dataset, dataset_type):
            raise TypeError(f"{self._where}: expected datasets.Dataset, "
                            f"got {type(dataset).__name__}")  # fmt: skip
        self.dataset = dataset
        self.num_rows = len(dataset)
        self._check_not_empty()
        self.fingerprint = fingerprint or getattr(dataset, "_fingerprint", None)
        fmt = dataset.format
        self._custom = fmt["type"] == "custom"
        selected = fmt["columns"]
        all_columns = fmt["output_all_columns"] or selected is None
        self._columns: list[str] | None = None
        if not all_columns and set(selected) != set(dataset.column_names):
            keep = set(selected)
            self._columns = [c for c in dataset.column_names if c in keep]
            if self.fingerprint is not None:  # HF's fingerprint does not cover the format
                self.fingerprint = f"{self.fingerprint}:{','.join(self._columns)}"
        self._arrow = self._rows_of(dataset)

    def _rows_of(self, dataset: Any) -> ArrowRows:
        table = dataset.data.table
        if self._columns is not None:
            table = table.select(self._columns)
        indices = dataset._indices  # the row mapping of select / shuffle (None: identity)
        return ArrowRows(table, None if indices is None else indices.column(0))

    def __getstate__(self) -> dict[str, Any]:
        # The raw pa.Table would pickle every row; the Dataset pickles memory-mapped files by path.
        return {k: v for k, v in self.__dict__.items() if k != "_arrow"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._arrow = self._rows_of(self.dataset)

    def _take_arrow(self, rows: Int64Array) -> pa.Table:
        if self._custom:
            return _records_to_arrow(self._take(rows), self._where)
        return self._arrow.gather(rows)

    def _take_ragged(self, rows: Int64Array,
                     column: str) -> tuple[npt.NDArray[Any], Int64Array] | None:  # fmt: skip
        if self._custom or self.text_field is not None:  # the transform / checks of take_arrow
            return None
        return self._arrow.gather_ragged(rows, column)

    def piece_reader(self, column: str) -> PieceReader | None:
        if self._custom or self.text_field is not None:
            return None
        return self._arrow.piece_reader(column)

    def _take(self, rows: Int64Array) -> list[dict[str, Any]]:
        if self._custom:
            batch = self.dataset[rows.tolist()]
        else:
            from datasets.formatting import format_table, get_formatter

            table = self._arrow.gather(rows)
            formatter = get_formatter(None, features=self.dataset.features)
            batch = format_table(table, range(rows.size), formatter=formatter)
        keys = list(batch)
        if not keys:
            return [{} for _ in range(rows.size)]
        return [dict(zip(keys, values, strict=True))
                for values in zip(*(batch[k] for k in keys), strict=True)]  # fmt: skip

    def _stream(self, start: int) -> Iterator[dict[str, Any]]:
        return self._stream_rows(start)


class HFIterableSource(BaseSource):
    """A HF ``datasets.IterableDataset`` (streaming): ``stream(start)`` is ``ds.skip(start)``."""

    num_rows = None

    def __init__(self, dataset: Any, name: str, *, text_field: str | None = None,
                 fingerprint: str | None = None) -> None:  # fmt: skip
        super().__init__(name, text_field=text_field)
        if not isinstance(dataset, _hf_types()[1]):
            raise TypeError(f"{self._where}: expected datasets.IterableDataset, "
                            f"got {type(dataset).__name__}")  # fmt: skip
        self.dataset = dataset
        self.fingerprint = fingerprint

    def _stream(self, start: int) -> Iterator[dict[str, Any]]:
        ds = self.dataset.skip(start) if start else self.dataset
        for row, rec in enumerate(ds, start):
            yield _as_record(rec, self._where, row, "input_ids")

    def split_by_node(self, rank: int, world_size: int) -> HFIterableSource:
        """This source's share for ``rank`` of ``world_size`` (``datasets.distributed``)."""
        from datasets.distributed import split_dataset_by_node

        part = split_dataset_by_node(self.dataset, rank=rank, world_size=world_size)
        fp = None if self.fingerprint is None else f"{self.fingerprint}:{rank}/{world_size}"
        return HFIterableSource(part, self.name, text_field=self.text_field, fingerprint=fp)


def hf_source(ds: Any, name: str, *, text_field: str | None = None,
              fingerprint: str | None = None, split: str | None = None) -> BaseSource:  # fmt: skip
    """Any ``datasets`` object as a source; a ``DatasetDict`` / ``IterableDatasetDict`` needs
    ``split`` (its absence is a ValueError listing the splits)."""
    dataset_t, iterable_t, dict_t, iter_dict_t = _hf_types()
    if isinstance(ds, (dict_t, iter_dict_t)):
        splits = list(ds)
        if split is None:
            raise ValueError(f"source {name!r}: a {type(ds).__name__} holds the splits "
                             f"{splits}; pass one (ds['train'] or split='train')")  # fmt: skip
        if split not in ds:
            raise ValueError(f"source {name!r}: split {split!r} not found; splits are {splits}")
        ds = ds[split]
    if isinstance(ds, dataset_t):
        return HFDatasetSource(ds, name, text_field=text_field, fingerprint=fingerprint)
    if isinstance(ds, iterable_t):
        return HFIterableSource(ds, name, text_field=text_field, fingerprint=fingerprint)
    raise TypeError(f"source {name!r}: expected a datasets object, got {type(ds).__name__}")


# --------------------------------------------------------------------------------------------
# Python and torch sources
# --------------------------------------------------------------------------------------------


class ListSource(BaseSource):
    """A Python list of example dicts or of token lists (``{column: tokens}``)."""

    def __init__(self, items: Sequence[Any], name: str, *, column: str = "input_ids",
                 text_field: str | None = None) -> None:  # fmt: skip
        super().__init__(name, text_field=text_field)
        self.items, self.column = items, column
        self.num_rows = len(items)
        self._check_not_empty()

    def _take(self, rows: Int64Array) -> list[dict[str, Any]]:
        items, where, col = self.items, self._where, self.column
        return [_as_record(items[r], where, r, col) for r in rows.tolist()]

    def _stream(self, start: int) -> Iterator[dict[str, Any]]:
        return self._stream_rows(start)


class TorchMapSource(BaseSource):
    """A map-style dataset (``__len__`` + ``__getitem__``; batched ``__getitems__`` when it has
    one, as torch's DataLoader uses). Items are dicts or token sequences."""

    def __init__(self, dataset: Any, name: str, *, column: str = "input_ids",
                 text_field: str | None = None) -> None:  # fmt: skip
        super().__init__(name, text_field=text_field)
        self.dataset, self.column = dataset, column
        self.num_rows = len(dataset)
        self._check_not_empty()

    def _take(self, rows: Int64Array) -> list[dict[str, Any]]:
        idx = rows.tolist()
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(idx) if getitems is not None else [self.dataset[i] for i in idx]
        if len(items) != len(idx):
            raise ValueError(f"{self._where}: __getitems__ gave {len(items)} items for "
                             f"{len(idx)} rows")  # fmt: skip
        return [_as_record(x, self._where, r, self.column) for r, x in zip(idx, items, strict=True)]

    def _stream(self, start: int) -> Iterator[dict[str, Any]]:
        return self._stream_rows(start)


class TorchIterableSource(BaseSource):
    """A torch ``IterableDataset`` (streaming): ``stream(start)`` iterates and skips ``start``."""

    num_rows = None

    def __init__(self, dataset: Any, name: str, *, column: str = "input_ids",
                 text_field: str | None = None) -> None:  # fmt: skip
        super().__init__(name, text_field=text_field)
        self.dataset, self.column = dataset, column

    def _stream(self, start: int) -> Iterator[dict[str, Any]]:
        for row, x in enumerate(itertools.islice(iter(self.dataset), start, None), start):
            yield _as_record(x, self._where, row, self.column)


# --------------------------------------------------------------------------------------------
# Concatenation
# --------------------------------------------------------------------------------------------


class CompositeShardedSource(BaseSource):
    """Sources one after another, without weights (shards of one dataset, say).

    Map-style when every part is: row ``i`` is the part's row ``i - start(part)``. With a streaming
    part, ``num_rows`` is None and only ``stream`` is available; a streaming part before ``start``
    is read through to count its rows. ``take_arrow`` unifies the parts' schemas (same column
    names required; ``int32`` and ``int64`` lists widen to ``int64``).
    """

    def __init__(self, sources: Sequence[Any], name: str | None = None, *,
                 text_field: str | None = None) -> None:  # fmt: skip
        if isinstance(sources, (str, bytes)) or not isinstance(sources, Sequence) or not sources:
            raise ValueError(f"CompositeShardedSource needs a non-empty list of sources, "
                             f"got {sources!r}")  # fmt: skip
        parts = [as_source(s, None if _is_named(s) else f"part{i}") for i, s in enumerate(sources)]
        super().__init__(name or "+".join(p.name for p in parts), text_field=text_field)
        self.sources = parts
        sizes = [p.num_rows for p in parts]
        self.num_rows = None if any(n is None for n in sizes) else sum(int(n or 0) for n in sizes)
        self.starts: Int64Array | None = None
        if self.num_rows is not None:
            starts = np.zeros(len(parts) + 1, dtype=np.int64)
            np.cumsum(np.asarray(sizes, dtype=np.int64), out=starts[1:])
            self.starts = starts
        fps = [p.fingerprint for p in parts]
        if all(f is not None for f in fps):
            self.fingerprint = hashlib.sha256("\0".join(map(str, fps)).encode()).hexdigest()[:32]

    def _split(self, rows: Int64Array) -> list[tuple[int, Int64Array, Int64Array]]:
        """[(part, positions in rows, local rows)] for the parts the rows fall in."""
        assert self.starts is not None
        part_of = np.searchsorted(self.starts, rows, side="right") - 1
        groups = []
        for p in np.unique(part_of).tolist():
            pos = np.flatnonzero(part_of == p)
            groups.append((p, pos, rows[pos] - self.starts[p]))
        return groups

    def _take(self, rows: Int64Array) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{}] * rows.size
        for p, pos, local in self._split(rows):
            for i, rec in zip(pos.tolist(), self.sources[p].take(local), strict=True):
                out[i] = rec
        return out

    def _take_arrow(self, rows: Int64Array) -> pa.Table:
        if rows.size == 0:
            return self.sources[0].take_arrow(rows)
        groups = self._split(rows)
        tables = [self.sources[p].take_arrow(local) for p, _, local in groups]
        names = [set(t.column_names) for t in tables]
        for (p, _, _), t in zip(groups[1:], tables[1:], strict=True):
            if set(t.column_names) != names[0]:
                raise ValueError(f"{self._where}: parts {self.sources[groups[0][0]].name!r} and "
                                 f"{self.sources[p].name!r} have different fields: "
                                 f"{sorted(names[0])} vs {sorted(t.column_names)}")  # fmt: skip
        try:
            schema = pa.unify_schemas([t.schema for t in tables], promote_options="permissive")
            table = pa.concat_tables([t.select(schema.names).cast(schema) for t in tables])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise TypeError(f"{self._where}: the parts' column types do not agree: {e}") from e
        positions = np.concatenate([pos for _, pos, _ in groups])
        inverse = np.empty_like(positions)
        inverse[positions] = np.arange(positions.size)
        return ArrowRows(table).gather(inverse)  # back to the order asked for

    def _stream(self, start: int) -> Iterator[dict[str, Any]]:
        skip = start
        for part in self.sources:
            if part.num_rows is not None:
                if skip >= part.num_rows:
                    skip -= part.num_rows
                    continue
                yield from part.stream(skip)
                skip = 0
            else:
                seen = 0
                for rec in part.stream(0):
                    if seen >= skip:
                        yield rec
                    seen += 1
                skip = max(0, skip - seen)


def _is_named(obj: object) -> bool:
    from mixtape.source_files import DatasetMixture

    return isinstance(obj, (BaseSource, DatasetMixture)) or (
        isinstance(obj, Source) and not isinstance(obj, _hf_types())
    )


# --------------------------------------------------------------------------------------------
# as_source
# --------------------------------------------------------------------------------------------


def _paths(obj: Any) -> list[str] | None:
    if isinstance(obj, (str, os.PathLike)):
        return [os.fspath(obj)]
    if (isinstance(obj, (list, tuple)) and obj
            and all(isinstance(p, (str, os.PathLike)) for p in obj)):  # fmt: skip
        return [os.fspath(p) for p in obj]
    return None


def as_source(obj: Any, name: str | None = None, **options: Any) -> BaseSource:
    """``obj`` as a :class:`Source` named ``name``.

    ``name`` may be omitted for a Source or a ``DatasetMixture`` (their own name is kept; a
    different one renames). Options: ``text_field`` (every kind); ``column`` (where token
    sequences of lists, torch datasets and numpy files go, default ``input_ids``); ``split``
    (a ``DatasetDict``, files); ``streaming``, ``offsets`` (a ``.npy`` token file) and
    ``load_dataset`` keywords (paths). Paths must exist locally (builder and Hub names go
    through ``DatasetMixture(path=...)``). Anything else is a ``TypeError`` listing the kinds.
    """
    from mixtape import source_files

    if isinstance(obj, source_files.DatasetMixture):
        if options:
            raise TypeError(f"as_source: options {sorted(options)} do not apply to a "
                            f"DatasetMixture; set them on the mixture")  # fmt: skip
        src = obj.load()
        return src if name is None or name == src.name else src.with_name(name)
    hf = _hf_types()
    if isinstance(obj, BaseSource) or (isinstance(obj, Source) and not isinstance(obj, hf)):
        if options:
            raise TypeError(f"as_source: options {sorted(options)} do not apply to the existing "
                            f"source {obj.name!r}")  # fmt: skip
        if name is None or name == obj.name:
            return obj  # type: ignore[return-value]
        if isinstance(obj, BaseSource):
            return obj.with_name(name)
        raise TypeError(f"as_source: cannot rename the foreign source {obj.name!r} to {name!r}")
    if name is None:
        raise TypeError(f"as_source: a name is needed for a {type(obj).__name__}")
    name = check_source_name(name)
    text_field = options.pop("text_field", None)
    if isinstance(obj, hf):
        _no_options(options, name, "split")
        return hf_source(obj, name, text_field=text_field, split=options.get("split"))
    paths = _paths(obj)
    if paths is not None:
        if len(paths) == 1:
            return source_files.open_path(paths[0], name, text_field=text_field, **options)
        return source_files.open_files(paths, name, text_field=text_field, **options)
    if isinstance(obj, (pa.Table, pa.RecordBatch)):
        _no_options(options, name)
        return ArrowTableSource(obj, name, text_field=text_field)
    column = options.pop("column", "input_ids")
    _no_options(options, name)
    if isinstance(obj, torch.utils.data.IterableDataset):
        return TorchIterableSource(obj, name, column=column, text_field=text_field)
    if isinstance(obj, (list, tuple)):
        return ListSource(obj, name, column=column, text_field=text_field)
    if hasattr(obj, "__len__") and hasattr(obj, "__getitem__") and not isinstance(
        obj, (str, bytes, Mapping, np.ndarray)
    ):
        return TorchMapSource(obj, name, column=column, text_field=text_field)
    raise TypeError(f"source {name!r}: cannot read a {type(obj).__name__}; accepted: {_ACCEPTED}")


def _no_options(options: Mapping[str, Any], name: str, *allowed: str) -> None:
    extra = sorted(set(options) - set(allowed))
    if extra:
        raise TypeError(f"source {name!r}: unknown options {extra} for this kind of source")
