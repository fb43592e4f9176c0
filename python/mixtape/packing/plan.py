"""Planning a dataset's packing from its lengths (8 bytes a document; no token is read).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa

from mixtape.ops import Int64Array, PackPlan, pack_plan
from mixtape.ragged import arrow_ragged, arrow_table, ragged_column

# Per-token fields written by the fill, and per-row lists built from the plan.
TOKEN_FIELDS = ("input_ids", "labels", "position_ids", "seq_idx", "loss_mask")
ROW_FIELDS = ("seq_lengths", "seq_starts", "doc_ids")
PACKED_FIELDS = TOKEN_FIELDS + ROW_FIELDS
_LAYOUTS = ("padded", "ragged")


def dataset_lengths(data: Any, column: str = "input_ids") -> Int64Array:
    """Token count of every sequence (int64), read from the Arrow offsets; no token is touched."""
    table = arrow_table(data)
    if table is not None:
        if column not in table.column_names:
            raise ValueError(f"column {column!r} not found; columns are {table.column_names}")
        arr = table.column(column)
        arr = arr.chunk(0) if arr.num_chunks == 1 else arr.combine_chunks()
    elif isinstance(data, (pa.Array, pa.ChunkedArray)):
        arr = data
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.chunk(0) if arr.num_chunks == 1 else arr.combine_chunks()
    else:
        return np.diff(ragged_column(data, column)[1])
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        return np.diff(arrow_ragged(arr, f"column {column!r}").offsets)
    if arr.null_count:
        valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False))
        raise ValueError(f"column {column!r}: row {int(np.argmin(valid))} is null")
    offsets: Int64Array = np.asarray(arr.offsets).astype(np.int64)
    return np.diff(offsets)


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
) -> PackPlan:
    """Plan the packing of ``dataset`` (any input :func:`pack_sequences` takes) from its lengths."""
    lengths = dataset_lengths(dataset, column)
    check_no_empty(lengths, column)
    return pack_plan(
        lengths, max_length, strategy=strategy, overflow=overflow,
        max_docs_per_row=max_docs_per_row, align=align, rows_multiple_of=rows_multiple_of,
        shuffle_seed=shuffle_seed,
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
