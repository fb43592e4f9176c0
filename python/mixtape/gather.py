"""Row gathers for random access: ragged numpy arrays and chunked Arrow tables.

A source asked for rows ``r`` (any order, repeats) answers with one Arrow table whose list
columns are contiguous values + offsets. ``pa.Table.take`` would concatenate every chunk of a
chunked column first (a copy of the whole column per call), and Arrow's list take builds an index
per token. Here rows are grouped by the record batch holding them, and each list column of
numbers is copied straight into its output place by ``ops.gather_rows`` (one memcpy per row in
C++, no index per token); other columns use Arrow's take within each batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from mixtape.ops import Int64Array, PieceReader, gather_rows

__all__ = ["ArrowRows", "list_array", "ragged_gather"]

_INT32_MAX = np.iinfo(np.int32).max


def ragged_gather(values: npt.NDArray[Any], offsets: npt.NDArray[Any],
                  rows: Int64Array) -> tuple[npt.NDArray[Any], Int64Array]:  # fmt: skip
    """Rows ``rows`` of the ragged array (values, offsets) as new (values, offsets)."""
    starts = np.asarray(offsets[rows], dtype=np.int64)
    lengths = np.asarray(offsets[rows + 1], dtype=np.int64) - starts
    out_offsets = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=out_offsets[1:])
    out = np.empty(int(out_offsets[-1]), dtype=values.dtype)
    gather_rows(values, starts, lengths, out_offsets[:-1], out)  # one memcpy per row, in C++
    return out, out_offsets


def list_array(offsets: Int64Array, values: npt.NDArray[Any],
               type: pa.DataType | None = None) -> pa.Array:  # fmt: skip
    """A list array over (values, offsets): ``type`` if given, else 32-bit offsets (HF's
    ``List``) when they fit and 64-bit ones otherwise."""
    large = type is not None and pa.types.is_large_list(type)
    if not large and offsets[-1] > _INT32_MAX:
        if type is not None:
            raise ValueError(f"{int(offsets[-1])} values do not fit in a list column with 32-bit "
                             f"offsets ({type}); take fewer rows at once")  # fmt: skip
        large = True
    if large:
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values), type=type)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values),
                                    type=type)  # fmt: skip


def _numeric(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t))


def _numpy_view(arr: pa.Array) -> npt.NDArray[Any] | None:
    """A zero-copy numpy view of a numeric Arrow array without nulls, else None."""
    if not _numeric(arr.type) or arr.null_count:
        return None
    return np.asarray(arr.to_numpy(zero_copy_only=True))


class _Column:
    """One column of a chunked table, with numpy views for the fast paths."""

    def __init__(self, chunks: list[pa.Array]) -> None:
        self.chunks = chunks
        self.type = chunks[0].type
        self.kind = "arrow"
        self.views: list[tuple[npt.NDArray[Any], npt.NDArray[Any]]] = []
        self.flat: list[npt.NDArray[Any]] = []
        is_list = pa.types.is_list(self.type) or pa.types.is_large_list(self.type)
        if is_list and _numeric(self.type.value_type) and not any(c.null_count for c in chunks):
            views = [(_numpy_view(c.values), np.asarray(c.offsets.to_numpy())) for c in chunks]
            if all(v is not None for v, _ in views):
                self.kind, self.views = "list", [(v, o) for v, o in views if v is not None]
        elif _numeric(self.type):
            flat = [_numpy_view(c) for c in chunks]
            if all(f is not None for f in flat):
                self.kind, self.flat = "flat", [f for f in flat if f is not None]


class ArrowRows:
    """Random row access to a pyarrow Table, optionally through a row mapping (the indices
    HF's ``select`` / ``shuffle`` leave): ``gather(rows)`` is one table of one chunk.

    Per-batch views are built on first use and dropped when pickled (a memory-mapped HF table
    pickles by file path; views would pickle the data).
    """

    def __init__(self, table: pa.Table, indices: pa.ChunkedArray | None = None) -> None:
        self.table = table
        self.mapping = None if indices is None else ArrowRows(pa.table({"i": indices}))
        self._index: tuple[Int64Array, list[_Column]] | None = None
        self._readers: dict[str, PieceReader | None] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_index": None, "_readers": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_readers", {})

    def _columns(self) -> tuple[Int64Array, list[_Column]]:
        if self._index is None:
            batches = [b for b in self.table.to_batches() if b.num_rows]
            starts = np.zeros(len(batches) + 1, dtype=np.int64)
            np.cumsum([b.num_rows for b in batches], out=starts[1:])
            columns = [_Column([b.column(i) for b in batches])
                       for i in range(self.table.num_columns)]  # fmt: skip
            self._index = (starts, columns)
        return self._index

    def gather(self, rows: Int64Array) -> pa.Table:
        """Rows ``rows`` (int64, checked by the caller) in the given order."""
        if self.mapping is not None:
            rows = np.asarray(self.mapping.gather(rows).column(0).to_numpy(), dtype=np.int64)
        starts, columns = self._columns()
        if rows.size == 0 or not columns or not columns[0].chunks:
            return self.table.schema.empty_table()
        groups, local = _groups(starts, rows)
        arrays = [_gather_column(c, groups, local, rows.size) for c in columns]
        return pa.Table.from_arrays(arrays, schema=self.table.schema)

    def gather_ragged(self, rows: Int64Array,
                      column: str) -> tuple[npt.NDArray[Any], Int64Array] | None:  # fmt: skip
        """Rows ``rows`` of one list-of-numbers ``column`` as (values, offsets), copying only that
        column; None when the column is missing, has nulls or is not a list of numbers."""
        if column not in self.table.column_names:
            return None
        if self.mapping is not None:
            rows = np.asarray(self.mapping.gather(rows).column(0).to_numpy(), dtype=np.int64)
        starts, columns = self._columns()
        col = columns[self.table.column_names.index(column)]
        if col.kind != "list":
            return None
        if rows.size == 0:
            return np.zeros(0, dtype=col.views[0][0].dtype), np.zeros(1, dtype=np.int64)
        groups, local = _groups(starts, rows)
        return _gather_list(col, groups, local, rows.size)

    def piece_reader(self, column: str) -> PieceReader | None:
        """The buffers of one list-of-numbers ``column`` (every record batch, through the row
        mapping) as a :class:`~mixtape.ops.PieceReader`, built once and cached (not pickled);
        None where :meth:`gather_ragged` would be None, or for a mapping with nulls."""
        if column not in self._readers:
            self._readers[column] = self._piece_reader(column)
        return self._readers[column]

    def _piece_reader(self, column: str) -> PieceReader | None:
        if column not in self.table.column_names or not self.table.num_rows:
            return None
        _, columns = self._columns()
        col = columns[self.table.column_names.index(column)]
        if col.kind != "list":
            return None
        mapping = None
        if self.mapping is not None:
            if not self.mapping.table.num_rows:
                return None
            mcol = self.mapping._columns()[1][0]
            if mcol.kind != "flat":
                return None
            mapping = mcol.flat[0] if len(mcol.flat) == 1 else np.concatenate(mcol.flat)
        return PieceReader([v for v, _ in col.views], [o for _, o in col.views], mapping)

def _groups(starts: Int64Array, rows: Int64Array) -> tuple[list[tuple[int, npt.NDArray[np.intp]]],
                                                           Int64Array]:  # fmt: skip
    """Rows grouped by the record batch holding them: [(batch, output positions)], local rows."""
    batch_of = np.searchsorted(starts, rows, side="right") - 1
    local = rows - starts[batch_of]
    if starts.size == 2:  # one record batch: no grouping to do
        return [(0, np.arange(rows.size))], local
    order = np.argsort(batch_of, kind="stable")
    cuts = np.flatnonzero(np.diff(batch_of[order])) + 1
    return [(int(batch_of[g[0]]), g) for g in np.split(order, cuts)], local


def _gather_list(col: _Column, groups: list[tuple[int, npt.NDArray[np.intp]]],
                 local: Int64Array, n: int) -> tuple[npt.NDArray[Any], Int64Array]:  # fmt: skip
    """The rows of a list-of-numbers column as (values, offsets): one memcpy per row, in C++."""
    starts = np.empty(n, dtype=np.int64)
    lengths = np.empty(n, dtype=np.int64)
    for b, pos in groups:
        offsets = col.views[b][1]
        starts[pos] = offsets[local[pos]]
        lengths[pos] = offsets[local[pos] + 1] - starts[pos]
    out_offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=out_offsets[1:])
    values = np.empty(int(out_offsets[-1]), dtype=col.views[0][0].dtype)
    for b, pos in groups:
        gather_rows(col.views[b][0], starts[pos], lengths[pos], out_offsets[pos], values)
    return values, out_offsets


def _gather_column(col: _Column, groups: list[tuple[int, npt.NDArray[np.intp]]],
                   local: Int64Array, n: int) -> pa.Array:  # fmt: skip
    """The rows of one column: group g holds the output positions whose rows are in batch b."""
    if col.kind == "flat":
        out = np.empty(n, dtype=col.flat[0].dtype)
        for b, pos in groups:
            out[pos] = col.flat[b][local[pos]]
        return pa.array(out, type=col.type)
    if col.kind == "list":
        values, out_offsets = _gather_list(col, groups, local, n)
        return list_array(out_offsets, values, col.type)
    parts = [col.chunks[b].take(pa.array(local[pos])) for b, pos in groups]
    positions = np.concatenate([pos for _, pos in groups])
    inverse = np.empty(n, dtype=np.int64)
    inverse[positions] = np.arange(n)
    return pa.concat_arrays(parts).take(pa.array(inverse))
