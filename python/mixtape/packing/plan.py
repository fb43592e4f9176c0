"""Planning a dataset's packing from its lengths (8 bytes a document; no token is read).

:class:`ListColumn` reads an Arrow list column chunk by chunk in a dataset's row order (an HF
``select`` / ``shuffle`` mapping included): lengths from the offsets, tokens gathered only for the
rows asked, so a memory-mapped dataset is never copied whole into RAM.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from mixtape.ops import Int64Array, IntArray, PackPlan, pack_plan
from mixtape.ragged import arrow_table, normalise_values, offsets_from_lengths, ragged_column

logger = logging.getLogger("mixtape.packing")

# Per-token fields written by the fill, and per-row lists built from the plan.
TOKEN_FIELDS = ("input_ids", "labels", "position_ids", "seq_idx", "loss_mask")
ROW_FIELDS = ("seq_lengths", "seq_starts", "doc_ids")
PACKED_FIELDS = TOKEN_FIELDS + ROW_FIELDS
_LAYOUTS = ("padded", "ragged")
_INT64_MAX = np.iinfo(np.int64).max


class ListColumn:
    """An Arrow list column (chunked or not) read chunk by chunk, row ``i`` being table row
    ``indices[i]`` when an HF indices mapping is given.

    Lengths come from the offsets (8 bytes a row); :meth:`gather` copies only the rows asked, from
    zero-copy (memory-mapped) views of each chunk. Token ids follow ``ragged.py``'s dtype rule.
    """

    def __init__(self, column: pa.Array | pa.ChunkedArray, name: str,
                 indices: pa.ChunkedArray | pa.Array | None = None) -> None:  # fmt: skip
        self.name = name
        chunks = list(column.chunks) if isinstance(column, pa.ChunkedArray) else [column]
        t = column.type
        if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
            raise TypeError(f"{name}: expected a list column of token ids, got Arrow type {t}")
        if not pa.types.is_integer(t.value_type):
            raise TypeError(f"{name}: token ids must be integers, got Arrow type {t} (example 0)")
        self.type = t
        self.value_dtype = np.dtype(t.value_type.to_pandas_dtype())
        self.rows: Int64Array | None = None
        if indices is not None:
            self.rows = np.asarray(indices.to_numpy()).astype(np.int64)
        children: list[pa.Array] = []
        self._offsets: list[npt.NDArray[Any]] = []
        sizes = np.zeros(len(chunks) + 1, dtype=np.int64)
        for k, chunk in enumerate(chunks):
            if pa.types.is_fixed_size_list(t):
                child = chunk.flatten()  # respects the slice
                offs: npt.NDArray[Any] = np.arange(len(chunk) + 1, dtype=np.int64) * t.list_size
            else:
                offs = np.asarray(chunk.offsets.to_numpy())  # a view; respects the slice
                child = chunk.values.slice(int(offs[0]), int(offs[-1] - offs[0])) \
                    if len(chunk) else chunk.values.slice(0, 0)  # fmt: skip
                offs = offs - offs[0] if len(chunk) and offs[0] else offs
            sizes[k + 1] = len(chunk)
            self._offsets.append(offs)
            children.append(child)
        self._starts: Int64Array = np.cumsum(sizes)
        for k, chunk in enumerate(chunks):  # nulls: rows first, then token ids
            if chunk.null_count:
                i = int(self._starts[k]) + int(np.argmax(
                    np.asarray(chunk.is_null().to_numpy(zero_copy_only=False))))  # fmt: skip
                raise ValueError(f"{name}: example {self._dataset_row(i)} is null")
        self._values: list[npt.NDArray[Any]] = []
        for k, child in enumerate(children):
            if child.null_count:
                pos = int(np.argmax(np.asarray(child.is_null().to_numpy(zero_copy_only=False))))
                local = int(np.searchsorted(self._offsets[k], pos, side="right")) - 1
                i = self._dataset_row(int(self._starts[k]) + local)
                raise ValueError(f"{name}: example {i} has a null token id")
            self._values.append(np.asarray(child.to_numpy(zero_copy_only=False)))

    def _dataset_row(self, table_row: int) -> int:
        if self.rows is None:
            return table_row
        hit = np.flatnonzero(self.rows == table_row)
        return int(hit[0]) if hit.size else table_row

    def __len__(self) -> int:
        return int(self._starts[-1]) if self.rows is None else int(self.rows.size)

    @property
    def num_chunks(self) -> int:
        return len(self._values)

    def table_lengths(self) -> Int64Array:
        """Length of every row of the table (before the indices mapping)."""
        if not self._offsets:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.diff(o).astype(np.int64) for o in self._offsets])

    def lengths(self) -> Int64Array:
        """Length of every row, in the dataset's order."""
        lengths = self.table_lengths()
        return lengths if self.rows is None else lengths[self.rows]

    def gather(self, docs: Int64Array) -> tuple[IntArray, Int64Array]:
        """Rows ``docs`` (dataset order), in that order, as a compact ragged (values, offsets)."""
        rows = docs if self.rows is None else self.rows[docs]
        chunk = np.searchsorted(self._starts, rows, side="right") - 1
        local = rows - self._starts[chunk]
        # One slice per row: ~1 us each, no index array as large as the tokens.
        parts = [self._values[c][self._offsets[c][i]:self._offsets[c][i + 1]]
                 for c, i in zip(chunk.tolist(), local.tolist(), strict=True)]  # fmt: skip
        values = np.concatenate(parts) if parts else np.zeros(0, self.value_dtype)
        offsets = offsets_from_lengths(np.fromiter(map(len, parts), np.int64, len(parts)))
        if values.dtype == np.uint64 and values.size and int(values.max()) > _INT64_MAX:
            bad = int(np.searchsorted(offsets, int(np.argmax(values > _INT64_MAX)), "right")) - 1
            raise ValueError(f"{self.name}: example {int(docs[bad])} has a token id out of the "
                             f"int64 range")  # fmt: skip
        return normalise_values(values, offsets, self.name, f"Arrow type {self.type}"), offsets


def list_column(data: Any, column: str) -> ListColumn | None:
    """The token column of an HF Dataset / pyarrow Table / Arrow array; None for numpy/Python."""
    table = arrow_table(data)
    if table is not None:
        if column not in table.column_names:
            raise ValueError(f"column {column!r} not found; columns are {table.column_names}")
        return ListColumn(table.table.column(column), f"column {column!r}", table.indices)
    if isinstance(data, (pa.Array, pa.ChunkedArray)):
        return ListColumn(data, "tokens")
    return None


def dataset_lengths(data: Any, column: str = "input_ids") -> Int64Array:
    """Token count of every sequence (int64), read from the Arrow offsets chunk by chunk (an HF
    indices mapping applied to the lengths); no token is touched, no chunk combined."""
    col = list_column(data, column)
    if col is None:
        return np.diff(ragged_column(data, column)[1])
    return col.lengths()


def plan_lengths(
    lengths: Int64Array, max_length: int, column: str, drop_empty: bool, **options: Any
) -> PackPlan:
    """``pack_plan`` of ``lengths``; empty rows refused, or (``drop_empty``) left out of every row
    and counted in ``dropped_docs`` (doc ids still index ``lengths``)."""
    empty = np.flatnonzero(lengths == 0)
    if not empty.size:
        return pack_plan(lengths, max_length, **options)
    if not drop_empty:
        check_no_empty(lengths, column)
    kept = np.flatnonzero(lengths)
    plan = pack_plan(lengths[kept], max_length, **options)
    logger.warning("column %r: %d empty rows dropped (drop_empty=True), first at row %d",
                   column, empty.size, int(empty[0]))  # fmt: skip
    return PackPlan(
        capacity=plan.capacity, strategy=plan.strategy, row_offsets=plan.row_offsets,
        doc=kept[plan.doc], start=plan.start, length=plan.length, column=plan.column,
        num_docs=int(lengths.size), num_tokens=plan.num_tokens,
        truncated_tokens=plan.truncated_tokens, dropped_docs=plan.dropped_docs + int(empty.size),
        dropped_tokens=plan.dropped_tokens, split_docs=plan.split_docs,
    )  # fmt: skip


def plan_dataset(
    dataset: Any,
    max_length: int,
    *,
    strategy: str = "bfd",
    overflow: str = "split",
    column: str = "input_ids",
    max_docs_per_row: int | None = None,
    align: int = 1,
    rows_multiple_of: int | None = None,
    shuffle_seed: int | None = None,
    drop_empty: bool = False,
) -> PackPlan:
    """Plan the packing of ``dataset`` (any input :func:`pack_sequences` takes) from its lengths.

    Empty rows are refused, or with ``drop_empty=True`` left out and counted in the plan's
    ``dropped_docs`` (with the documents ``overflow="drop"`` dropped); ``doc`` indexes the input.
    """
    return plan_lengths(
        dataset_lengths(dataset, column), max_length, column, drop_empty, strategy=strategy,
        overflow=overflow, max_docs_per_row=max_docs_per_row, align=align,
        rows_multiple_of=rows_multiple_of, shuffle_seed=shuffle_seed,
    )  # fmt: skip


def check_no_empty(lengths: Int64Array, column: str) -> None:
    """A row without tokens cannot be packed (it would be a document of no tokens): say which."""
    if lengths.size and not np.all(lengths):
        empty = np.flatnonzero(lengths == 0)
        raise ValueError(
            f"column {column!r}: row {int(empty[0])} is empty ({empty.size} empty rows); every "
            "document needs at least one token: filter them out first "
            f"(dataset.filter(lambda e: len(e[{column!r}]) > 0))"
        )


def synthetic_lengths(n: int, mean: float = 300.0, sigma: float = 1.0, maximum: int = 8192,
                      seed: int = 0) -> Int64Array:  # fmt: skip
    """Lognormal lengths with the given mean (before clipping to 1..maximum), seeded."""
    mu = math.log(mean) - sigma * sigma / 2
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.lognormal(mu, sigma, n)), 1, maximum).astype(np.int64)
