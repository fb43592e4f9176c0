"""Sequence packing for datasets and streams: plan globally in C++, write packed rows as Arrow.

``pack_sequences`` packs a pre-tokenized HF ``Dataset`` (or Arrow / numpy ragged tokens) into rows
of ``max_length`` tokens, like TRL's ``pack_dataset`` but over the whole dataset at once.
``PackingStream`` packs an iterable of examples online with a bounded buffer and a resumable state.
``PackedCollator`` turns packed rows (ours or TRL's) into training batches whose labels,
position_ids and attention inputs keep the documents apart. ``PackingStats`` measures a plan
against the lower bound ``ceil(tokens / C)``; ``stats_main`` is the ``mixtape pack-stats`` command.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import torch.utils.data

from mixtape.collate import (
    CollatorRegistry,
    Ragged,
    ReturnTensors,
    _as_ragged,
    _check_int,
    _check_same_lengths,
    _Columns,
    _columns,
    _example_of,
    _field,
    _is_sequence_column,
    _Output,
    _stack_other,
)
from mixtape.ops import (
    OVERFLOW_POLICIES,
    PACK_STRATEGIES,
    Int64Array,
    IntArray,
    PackPlan,
    as_offsets,
    block_causal_mask,
    check_choice,
    pack_fill,
    pack_plan,
    padded_length,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "PACKED_ATTENTION",
    "PACKED_FIELDS",
    "PackedCollator",
    "PackingStats",
    "PackingStream",
    "create_packed_collate",
    "dataset_lengths",
    "pack_sequences",
    "plan_dataset",
    "stats_main",
]


# Per-token fields written by the fill, and per-row lists built from the plan.
_TOKEN_FIELDS = ("input_ids", "labels", "position_ids", "seq_idx", "loss_mask")
_ROW_FIELDS = ("seq_lengths", "seq_starts", "doc_ids")
PACKED_FIELDS = _TOKEN_FIELDS + _ROW_FIELDS
_LAYOUTS = ("padded", "ragged")


# --------------------------------------------------------------------------------------------
# Reading ragged tokens from Arrow, HF datasets and numpy
# --------------------------------------------------------------------------------------------


def _int_values(values: npt.NDArray[Any], where: str) -> IntArray:
    """Token values as int32/int64 (narrower integer types are widened explicitly)."""
    if values.dtype in (np.int32, np.int64):
        return values
    if values.dtype.kind == "b" or (values.dtype.kind in "iu" and values.dtype.itemsize < 4):
        return values.astype(np.int32)
    if values.dtype.kind in "iu":  # uint32 / uint64
        if values.size and int(values.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"{where}: token id {int(values.max())} does not fit in int64")
        return values.astype(np.int64)
    raise TypeError(f"{where}: token ids must be integers, got dtype {values.dtype}")


def _ragged_from_arrow(arr: pa.Array | pa.ChunkedArray, where: str) -> tuple[IntArray, Int64Array]:
    """(values, offsets) of an Arrow list / large_list / fixed_size_list array, without a row loop.

    Chunks are combined (one copy of the tokens); a sliced array reads only its own rows.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.chunk(0) if arr.num_chunks == 1 else arr.combine_chunks()
    typ = arr.type
    if arr.null_count:
        valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False))
        raise ValueError(f"{where}: row {int(np.argmin(valid))} is null")
    if pa.types.is_fixed_size_list(typ):
        size = typ.list_size
        offsets = np.arange(len(arr) + 1, dtype=np.int64) * size
        child = arr.values.slice(arr.offset * size, len(arr) * size)
    elif pa.types.is_list(typ) or pa.types.is_large_list(typ):
        raw = np.asarray(arr.offsets)
        lo, hi = (int(raw[0]), int(raw[-1])) if raw.size else (0, 0)
        child = arr.values.slice(lo, hi - lo)
        offsets = as_offsets(raw if raw.size else np.zeros(1, np.int64), f"{where} offsets")
    else:
        raise TypeError(f"{where}: expected a list column of token ids, got Arrow type {typ}")
    if not pa.types.is_integer(child.type) and not pa.types.is_boolean(child.type):
        raise TypeError(f"{where}: token ids must be integers, got Arrow type {child.type}")
    if child.null_count:
        valid = np.asarray(child.is_valid().to_numpy(zero_copy_only=False))
        token = int(np.argmin(valid))
        row = int(np.searchsorted(offsets, token, side="right")) - 1
        raise ValueError(f"{where}: row {row} holds a null token id")
    values = np.asarray(child.to_numpy(zero_copy_only=not pa.types.is_boolean(child.type)))
    return _int_values(values, where), offsets


class _TableView:
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


def _arrow_table(data: Any) -> _TableView | None:
    """The Arrow columns behind an HF ``Dataset`` or a pyarrow Table; None for other inputs."""
    if isinstance(data, pa.Table):
        return _TableView(data)
    if isinstance(data, (pa.Array, pa.ChunkedArray, tuple, list, np.ndarray)):
        return None
    inner = getattr(data, "data", None)
    table = getattr(inner, "table", None)
    if isinstance(table, pa.Table) and hasattr(data, "_indices"):
        indices = data._indices  # set by select / shuffle / sort
        return _TableView(table, None if indices is None else indices.column(0))
    return None


def _is_hf_dataset(data: Any) -> bool:
    try:
        from datasets import Dataset
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(data, Dataset)


def _is_dataset_dict(data: Any) -> bool:
    try:
        from datasets import DatasetDict
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(data, DatasetDict)


def _ragged(data: Any, column: str) -> tuple[IntArray, Int64Array]:
    """(values, offsets) of the token column of any accepted input."""
    table = _arrow_table(data)
    if table is not None:
        if column not in table.column_names:
            raise ValueError(f"column {column!r} not found; columns are {table.column_names}")
        return _ragged_from_arrow(table.column(column), f"column {column!r}")
    if isinstance(data, (pa.Array, pa.ChunkedArray)):
        return _ragged_from_arrow(data, "tokens")
    if isinstance(data, tuple) and len(data) == 2:
        vals = np.asarray(data[0])
        if vals.ndim != 1:
            raise ValueError(f"values must be 1-D, got shape {vals.shape}")
        offs = as_offsets(np.asarray(data[1]), "offsets")
        if np.any(np.diff(offs) < 0) or offs[-1] > vals.size:
            raise ValueError(f"offsets must be non-decreasing and end at most at {vals.size}")
        return _int_values(vals, "values")[: offs[-1]], offs
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        return _ragged_from_arrow(pa.array(data), "sequences")
    raise TypeError(
        "expected an HF datasets.Dataset, a pyarrow Table / list array, a (values, offsets) "
        f"pair of numpy arrays or a list of token lists, got {type(data).__name__}"
    )


def dataset_lengths(data: Any, column: str = "input_ids") -> Int64Array:
    """Token count of every sequence (int64), read from the Arrow offsets; no token is touched."""
    table = _arrow_table(data)
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
        return np.diff(_ragged(data, column)[1])
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        return np.diff(_ragged_from_arrow(arr, f"column {column!r}")[1])
    if arr.null_count:
        valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False))
        raise ValueError(f"column {column!r}: row {int(np.argmin(valid))} is null")
    offsets: Int64Array = np.asarray(arr.offsets).astype(np.int64)
    return np.diff(offsets)


# --------------------------------------------------------------------------------------------
# Offline packing
# --------------------------------------------------------------------------------------------


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
    _check_no_empty(lengths, column)
    return pack_plan(
        lengths, max_length, strategy=strategy, overflow=overflow,
        max_docs_per_row=max_docs_per_row, align=align, rows_multiple_of=rows_multiple_of,
        shuffle_seed=shuffle_seed,
    )  # fmt: skip


def _check_no_empty(lengths: Int64Array, column: str) -> None:
    """A row without tokens cannot be packed (it would be a document of no tokens): say which."""
    if lengths.size and not np.all(lengths):
        empty = np.flatnonzero(lengths == 0)
        raise ValueError(
            f"column {column!r}: row {int(empty[0])} is empty ({empty.size} empty rows); every "
            "document needs at least one token: filter them out first "
            f"(dataset.filter(lambda e: len(e[{column!r}]) > 0))"
        )


def _check_plan_matches(plan: PackPlan, lengths: Int64Array, max_length: int) -> None:
    """A loaded plan must index this data: same documents, same lengths, same capacity."""
    if plan.capacity != max_length:
        raise ValueError(f"plan has capacity {plan.capacity}, but max_length is {max_length}")
    if plan.num_docs != lengths.size or plan.num_tokens != int(lengths.sum()):
        raise ValueError(
            f"plan was made for {plan.num_docs} documents / {plan.num_tokens} tokens, "
            f"the data has {lengths.size} documents / {int(lengths.sum())} tokens"
        )
    if plan.doc.size and (int(plan.doc.min()) < 0 or int(plan.doc.max()) >= lengths.size):
        raise ValueError(f"plan pieces index documents {int(plan.doc.min())}.."
                         f"{int(plan.doc.max())}, the data has {lengths.size}")  # fmt: skip
    if plan.doc.size:
        over = plan.start + plan.length > lengths[plan.doc]
        if np.any(over):
            piece = int(np.argmax(over))
            raise ValueError(
                f"plan piece {piece} reads tokens {int(plan.start[piece])}.."
                f"{int(plan.start[piece] + plan.length[piece])} of document "
                f"{int(plan.doc[piece])}, which has {int(lengths[plan.doc[piece]])}"
            )
    # Every document is placed whole, or (longer than the capacity) truncated to it or dropped:
    # equal totals can hide documents of other lengths (a truncated plan on other data).
    covered = np.bincount(plan.doc, weights=plan.length, minlength=lengths.size).astype(np.int64)
    cut = (lengths > max_length) & ((covered == 0) | (covered == max_length))
    wrong = np.flatnonzero((covered != lengths) & ~cut)
    if wrong.size:
        d = int(wrong[0])
        raise ValueError(
            f"plan places {int(covered[d])} tokens of document {d}, which has "
            f"{int(lengths[d])} (capacity {max_length}): the plan was made for other data"
        )


def _list_array(offsets: Int64Array, values: npt.NDArray[Any]) -> pa.Array:
    """A list array (large_list when the values outgrow int32 offsets), no copy of the values."""
    flat = pa.array(values)
    if offsets[-1] <= np.iinfo(np.int32).max:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), flat)
    return pa.LargeListArray.from_arrays(pa.array(offsets), flat)


def _token_column(
    arr: npt.NDArray[Any], layout: str, capacity: int, row_tok_offsets: Int64Array
) -> pa.Array:
    if layout == "padded":
        return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), capacity)
    return _list_array(row_tok_offsets, arr.reshape(-1))


def _extra_columns(
    table: _TableView | None, column: str, columns: Sequence[str] | None, offsets: Int64Array
) -> dict[str, tuple[IntArray, npt.DTypeLike]]:
    """Other list columns packed along with the tokens (TRL packs every column the same way)."""
    if table is None:
        if columns:
            raise ValueError(f"columns={list(columns)} needs a Dataset or a pyarrow Table input")
        return {}
    names = [c for c in table.column_names if c != column] if columns is None else list(columns)
    out: dict[str, tuple[IntArray, npt.DTypeLike]] = {}
    for name in names:
        if name not in table.column_names:
            raise ValueError(f"column {name!r} not found; columns are {table.column_names}")
        typ = table.schema.field(name).type
        if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)
                or pa.types.is_fixed_size_list(typ)):  # fmt: skip
            raise TypeError(
                f"column {name!r} ({typ}) is not a list column and cannot be packed; remove it "
                f"(dataset.remove_columns) or pass columns=[...] naming the columns to keep"
            )
        child_type = typ.value_type
        if not (pa.types.is_integer(child_type) or pa.types.is_boolean(child_type)):
            raise TypeError(
                f"column {name!r} holds {child_type} values; only integer list columns are "
                "packed along with the tokens: remove it (dataset.remove_columns) or pass "
                "columns=[...] naming the columns to keep"
            )
        vals, offs = _ragged_from_arrow(table.column(name), f"column {name!r}")
        if not np.array_equal(offs, offsets):
            row = int(np.argmax(np.diff(offs) != np.diff(offsets)))
            raise ValueError(
                f"column {name!r} row {row} has {int(offs[row + 1] - offs[row])} values but "
                f"{column!r} has {int(offsets[row + 1] - offsets[row])}; packed columns must "
                "have the same lengths"
            )
        child = table.schema.field(name).type.value_type
        out[name] = (vals, child.to_pandas_dtype())
    return out


def pack_sequences(
    dataset: Any,
    max_length: int,
    strategy: str = "bfd",
    *,
    overflow: str = "split",
    column: str = "input_ids",
    fields: Sequence[str] = ("input_ids", "position_ids", "seq_lengths"),
    columns: Sequence[str] | None = None,
    max_docs_per_row: int | None = None,
    align: int = 1,
    rows_multiple_of: int | None = None,
    shuffle_seed: int | None = None,
    layout: str = "padded",
    pad_value: int = 0,
    label_pad_value: int = -100,
    position_start: int = 0,
    plan: PackPlan | str | Path | None = None,
    save_plan: str | Path | None = None,
) -> Any:
    """Pack every sequence of ``dataset`` into rows of ``max_length`` tokens, planned globally.

    Input: an HF ``datasets.Dataset`` (or ``DatasetDict``: each split packed alone), a pyarrow
    Table (``column`` is read) or list array, a ``(values, offsets)`` numpy pair, or a list of
    token lists. Output: a packed HF ``Dataset`` for HF input, else a ``pyarrow.Table``.

    Columns: the tokens under ``column``'s name; ``labels`` (the ids, ``label_pad_value`` at each
    document start and on padding), ``position_ids`` (restart at ``position_start`` per document),
    ``seq_idx``, ``loss_mask`` as asked in ``fields``; per-row lists ``seq_lengths`` (as TRL's
    ``pack_dataset`` emits: lengths of the documents in the row), ``seq_starts`` (their first
    columns; not contiguous when ``align`` > 1) and ``doc_ids`` (their input row indices).
    ``layout="padded"`` gives fixed-size rows of ``max_length`` (padded with ``pad_value``);
    ``"ragged"`` gives rows of their used length, as TRL does.

    Other list columns (``columns``; default every other column, each must have the token
    column's lengths, as TRL requires) are packed the same way, padded with 0; a carried
    ``labels`` column gets ``label_pad_value`` at document starts and on padding. ``plan`` reuses
    a saved plan (a :class:`PackPlan` or a path of ``PackPlan.save``; the planning options are
    then the plan's, and it is checked against the data's lengths); ``save_plan`` writes the plan
    used. To get the plan itself, call :func:`plan_dataset` and pass it here.
    """
    if _is_dataset_dict(dataset):
        if plan is not None or save_plan is not None:
            raise ValueError("plan / save_plan need a single split, not a DatasetDict")
        from datasets import DatasetDict

        options: dict[str, Any] = {
            "overflow": overflow, "column": column, "fields": fields, "columns": columns,
            "max_docs_per_row": max_docs_per_row, "align": align,
            "rows_multiple_of": rows_multiple_of, "shuffle_seed": shuffle_seed, "layout": layout,
            "pad_value": pad_value, "label_pad_value": label_pad_value,
            "position_start": position_start,
        }  # fmt: skip
        return DatasetDict({split: pack_sequences(ds, max_length, strategy, **options)
                            for split, ds in dataset.items()})  # fmt: skip
    check_choice("layout", layout, _LAYOUTS)
    if layout == "ragged" and align != 1:
        raise ValueError(f"align={align} places documents at aligned columns: use layout='padded'")
    for f in fields:
        check_choice("field", f, PACKED_FIELDS)
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)):
        raise TypeError(f"max_length must be an int, got {max_length!r}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    check_choice("strategy", strategy, PACK_STRATEGIES)
    check_choice("overflow", overflow, OVERFLOW_POLICIES)

    values, offsets = _ragged(dataset, column)
    table = _arrow_table(dataset)
    extra = _extra_columns(table, column, columns, offsets)
    clash = sorted(set(extra) & ({"labels", "position_ids", "seq_idx", "loss_mask"} & set(fields)
                                 | set(_ROW_FIELDS) & set(fields)))  # fmt: skip
    if clash:
        raise ValueError(
            f"columns {clash} exist in the data and are also asked for in fields; drop them "
            "from fields or from columns"
        )
    lengths = np.diff(offsets)
    _check_no_empty(lengths, column)
    if plan is None:
        the_plan = pack_plan(
            lengths, max_length, strategy=strategy, overflow=overflow,
            max_docs_per_row=max_docs_per_row, align=align, rows_multiple_of=rows_multiple_of,
            shuffle_seed=shuffle_seed,
        )  # fmt: skip
    else:
        the_plan = plan if isinstance(plan, PackPlan) else PackPlan.load(plan)
        _check_plan_matches(the_plan, lengths, max_length)
    if save_plan is not None:
        the_plan.save(save_plan)

    fill_layout = "padded" if layout == "padded" else "flat"
    token_fields = [f for f in _TOKEN_FIELDS if f in fields]
    filled = pack_fill(
        the_plan, values, offsets, layout=fill_layout, pad_value=pad_value,
        label_pad_value=label_pad_value, position_start=position_start, fields=token_fields,
        dtype=values.dtype,
    ) if token_fields else {}  # fmt: skip
    # Token offsets of the rows in the ragged layout: pieces back to back, row after row.
    piece_ends = np.concatenate([np.zeros(1, np.int64), np.cumsum(the_plan.length)])
    row_tok_offsets = piece_ends[the_plan.row_offsets]

    def fill_extra(name: str) -> npt.NDArray[Any]:
        vals = extra[name][0]
        kind = "labels" if name == "labels" else "input_ids"
        # pad_value is a token id; other columns (attention_mask, token_type_ids, ...) pad with 0.
        got: npt.NDArray[Any] = pack_fill(
            the_plan, vals, offsets, layout=fill_layout, pad_value=0,
            label_pad_value=label_pad_value, fields=(kind,), dtype=vals.dtype,
        )[kind]  # fmt: skip
        return got

    packed_extra: dict[str, npt.NDArray[Any]] = {}
    if "loss_mask" in filled and "labels" in extra:
        # The mask follows the carried labels (prompt tokens masked there), not the ids.
        packed_extra["labels"] = fill_extra("labels")
        filled["loss_mask"] = packed_extra["labels"] != label_pad_value
    names: list[str] = []
    arrays: list[pa.Array] = []
    for f in token_fields:
        names.append(column if f == "input_ids" else f)
        arrays.append(_token_column(filled[f], layout, max_length, row_tok_offsets))
    extra_names = tuple(extra)
    for name, (_, dtype) in extra.items():
        got = packed_extra[name] if name in packed_extra else fill_extra(name)
        names.append(name)
        arrays.append(_token_column(got.astype(dtype, copy=False), layout, max_length,
                                    row_tok_offsets))  # fmt: skip
    if "seq_lengths" in fields:
        names.append("seq_lengths")
        arrays.append(_list_array(the_plan.row_offsets, the_plan.length.astype(np.int32)))
    if "seq_starts" in fields:
        names.append("seq_starts")
        starts = the_plan.column if layout == "padded" else piece_ends[:-1] - np.repeat(
            row_tok_offsets[:-1], np.diff(the_plan.row_offsets))  # fmt: skip
        arrays.append(_list_array(the_plan.row_offsets, starts.astype(np.int32)))
    if "doc_ids" in fields:
        names.append("doc_ids")
        arrays.append(_list_array(the_plan.row_offsets, the_plan.doc))
    out = pa.Table.from_arrays(arrays, names=names)
    if _is_hf_dataset(dataset):
        from datasets import Dataset

        # A fingerprint from the input's and the plan's, not from hashing every packed token.
        digest = hashlib.sha256(str(getattr(dataset, "_fingerprint", "")).encode())
        digest.update(repr((column, tuple(fields), extra_names, layout, pad_value,
                            label_pad_value, position_start, max_length)).encode())  # fmt: skip
        for name in ("row_offsets", "doc", "start", "length", "column"):
            digest.update(np.ascontiguousarray(getattr(the_plan, name)).tobytes())
        packed = Dataset(out, split=dataset.split, fingerprint=digest.hexdigest()[:16])
        fmt = dataset.format
        if fmt.get("type") is not None:
            packed = packed.with_format(fmt["type"], **fmt.get("format_kwargs", {}))
        return packed
    return out


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackingStats:
    """How well a plan packs: rows against the lower bound ``ceil(packed_tokens / capacity)``."""

    capacity: int
    strategy: str
    documents: int
    tokens: int  # input tokens
    packed_tokens: int  # tokens placed in rows (tokens - truncated - dropped)
    rows: int
    slots: int  # rows * capacity
    efficiency: float  # packed_tokens / slots
    lower_bound: int
    gap_rows: int  # rows - lower_bound
    gap_percent: float  # 100 * gap_rows / lower_bound
    pieces: int
    docs_per_row_mean: float
    docs_per_row_max: int
    truncated_tokens: int
    dropped_docs: int
    dropped_tokens: int
    split_docs: int

    @classmethod
    def from_plan(cls, plan: PackPlan) -> PackingStats:
        """Statistics of ``plan`` (all numbers exact; no tokens needed)."""
        c = int(plan.capacity)
        rows = int(plan.num_rows)
        packed = int(plan.packed_tokens)
        per_row = np.diff(plan.row_offsets)
        bound = -(-packed // c)
        gap = rows - bound
        return cls(
            capacity=c, strategy=str(plan.strategy), documents=int(plan.num_docs),
            tokens=int(plan.num_tokens), packed_tokens=packed, rows=rows, slots=rows * c,
            efficiency=packed / (rows * c) if rows else 1.0, lower_bound=bound, gap_rows=gap,
            gap_percent=100.0 * gap / bound if bound else 0.0, pieces=int(plan.doc.size),
            docs_per_row_mean=float(per_row.mean()) if rows else 0.0,
            docs_per_row_max=int(per_row.max()) if rows else 0,
            truncated_tokens=int(plan.truncated_tokens), dropped_docs=int(plan.dropped_docs),
            dropped_tokens=int(plan.dropped_tokens), split_docs=int(plan.split_docs),
        )  # fmt: skip

    @classmethod
    def from_lengths(cls, lengths: Any, capacity: int, **plan_kwargs: Any) -> PackingStats:
        """Plan ``lengths`` into rows of ``capacity`` (``pack_plan`` options) and measure it."""
        return cls.from_plan(pack_plan(lengths, capacity, **plan_kwargs))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lost = self.truncated_tokens + self.dropped_tokens
        lines = [
            f"packing ({self.strategy}, capacity {self.capacity:,})",
            f"  documents      {self.documents:>14,}   pieces {self.pieces:,} "
            f"({self.split_docs:,} documents split)",
            f"  tokens         {self.tokens:>14,}   packed {self.packed_tokens:,}",
            f"  rows           {self.rows:>14,}   slots {self.slots:,}",
            f"  efficiency     {100 * self.efficiency:>13.3f}%",
            f"  lower bound    {self.lower_bound:>14,}   gap {self.gap_rows:,} rows "
            f"({self.gap_percent:.4f}%)",
            f"  docs per row   {self.docs_per_row_mean:>14.2f}   max {self.docs_per_row_max}",
            f"  lost tokens    {lost:>14,}   truncated {self.truncated_tokens:,}, dropped "
            f"{self.dropped_tokens:,} in {self.dropped_docs:,} documents",
        ]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Online packing
# --------------------------------------------------------------------------------------------


def _take_rows(plan: PackPlan, rows: Int64Array) -> PackPlan:
    """The plan restricted to ``rows`` (in that order), pieces gathered without a row loop."""
    counts = np.diff(plan.row_offsets)[rows]
    firsts = plan.row_offsets[:-1][rows]
    new_offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(counts)])
    idx = np.repeat(firsts - new_offsets[:-1], counts) + np.arange(new_offsets[-1])
    return dataclasses.replace(
        plan, row_offsets=new_offsets, doc=plan.doc[idx], start=plan.start[idx],
        length=plan.length[idx], column=plan.column[idx],
    )  # fmt: skip


def _plan_state(plan: PackPlan) -> dict[str, Any]:
    return {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}


def _concat_ragged(
    parts: list[npt.NDArray[Any]], dtype: npt.DTypeLike, width: int = 1
) -> tuple[npt.NDArray[Any], Int64Array]:
    """Documents stored as [width, n] (token ids, then labels when carried) joined along n."""
    lengths = np.fromiter((p.shape[-1] for p in parts), dtype=np.int64, count=len(parts))
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
    if not parts:
        return np.zeros((width, 0), dtype), offsets
    return np.concatenate(parts, axis=1).astype(dtype, copy=False), offsets


class PackingStream(torch.utils.data.IterableDataset[dict[str, Any]]):
    """Online packing of an iterable of examples into batches of packed rows.

    Documents are read into a buffer of ``buffer_size``; each full buffer is planned with
    ``strategy`` (plus the pieces carried from the previous plan). Rows filled below ``min_fill``
    (the least-filled first, at most ``buffer_size // 2`` pieces) and rows that would not make a
    whole batch of ``batch_size`` go back into the next buffer instead of being emitted, so little
    space is wasted while memory stays bounded. At the end of the source everything is emitted
    (the last batch may be short unless ``drop_last``). Iterating again after the end starts a
    new pass over the source (a new epoch; the counters restart).

    Each batch is ``pack_fill``'s output for ``batch_size`` rows: a dict of numpy arrays
    ``[rows, capacity]`` (``fields``). When the examples are mappings holding ``label_column``
    (e.g. prompt tokens masked with -100), those labels are packed with the ids (still
    ``label_pad_value`` at each document start and on padding) instead of being made from the
    ids. ``state_dict()`` / ``load_state_dict()`` hold the buffer, the rows not yet emitted and
    the counters; a resumed stream yields exactly the batches the uninterrupted one would. The
    source is fast-forwarded by the number of examples consumed, or restored with its own
    ``state_dict`` when it has one.

    It is a torch ``IterableDataset`` yielding whole batches: use ``DataLoader(stream,
    batch_size=None)`` (numpy arrays become tensors) with ``num_workers`` 0 or 1; more workers
    would each pack the whole source, so they are refused.
    """

    def __init__(
        self,
        source: Iterable[Any],
        capacity: int,
        *,
        batch_size: int = 1,
        buffer_size: int = 1024,
        strategy: str = "bfd",
        overflow: str = "split",
        column: str = "input_ids",
        fields: Sequence[str] = ("input_ids", "labels", "position_ids"),
        min_fill: float = 0.99,
        max_docs_per_row: int | None = None,
        align: int = 1,
        pad_value: int = 0,
        label_pad_value: int = -100,
        drop_last: bool = False,
        dtype: npt.DTypeLike = np.int64,
        label_column: str | None = "labels",
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if not 0.0 <= min_fill <= 1.0:
            raise ValueError(f"min_fill must be in [0, 1], got {min_fill}")
        check_choice("strategy", strategy, PACK_STRATEGIES)
        check_choice("overflow", overflow, OVERFLOW_POLICIES)
        self.source = source
        self.capacity = int(capacity)
        self.batch_size = int(batch_size)
        self.buffer_size = int(buffer_size)
        self.strategy = strategy
        self.overflow = overflow
        self.column = column
        self.fields = tuple(fields)
        self.min_fill = float(min_fill)
        self.max_docs_per_row = max_docs_per_row
        self.align = int(align)
        self.pad_value = int(pad_value)
        self.label_pad_value = int(label_pad_value)
        self.drop_last = bool(drop_last)
        self.dtype = np.dtype(dtype)
        self.label_column = label_column
        self._reset()

    def _reset(self) -> None:
        self._consumed = 0  # source examples read
        self._carry: list[npt.NDArray[Any]] = []  # pieces of carried rows, planned again
        self._pending: PackPlan | None = None  # rows planned, not yet emitted
        self._labels: bool | None = None  # examples carry label_column (set by the first)
        self._finished = False  # a pass ended: the next iter() starts a new one
        self._pending_values: npt.NDArray[Any] = np.zeros((1, 0), self.dtype)
        self._pending_offsets: Int64Array = np.zeros(1, np.int64)
        self._cursor = 0  # rows of _pending already emitted
        self._exhausted = False
        self._source_state: Any = None
        self.counters = {
            "documents": 0, "tokens": 0, "rows": 0, "batches": 0, "plans": 0,
            "truncated_tokens": 0, "dropped_docs": 0, "dropped_tokens": 0, "split_docs": 0,
        }  # fmt: skip

    # ---- documents ------------------------------------------------------------------------

    def _tokens(self, example: Any) -> npt.NDArray[Any]:
        where = f"example {self._consumed}"
        if isinstance(example, Mapping):
            if self.column not in example:
                raise ValueError(f"{where}: no {self.column!r} column; it has {list(example)}")
            item = example[self.column]
        else:
            item = example
        if hasattr(item, "numpy") and hasattr(item, "is_cuda"):
            item = item.cpu().numpy()
        arr = np.asarray(item)
        if arr.ndim != 1:
            raise ValueError(f"{where}: {self.column!r} must be 1-D, got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError(f"{where}: {self.column!r} is empty; every document needs a token")
        if arr.dtype.kind not in "iub":
            raise TypeError(f"{where}: {self.column!r} must hold integers, got dtype {arr.dtype}")
        lab_key = self.label_column
        has = lab_key is not None and isinstance(example, Mapping) and lab_key in example
        if self._labels is None:
            self._labels = has
        elif has != self._labels:
            raise ValueError(
                f"{where}: {'has' if has else 'has no'} {lab_key!r} column but the earlier "
                "examples of the stream do" + ("n't" if has else "")
            )
        if not has:
            return arr.reshape(1, -1)
        lab = example[lab_key]
        if hasattr(lab, "numpy") and hasattr(lab, "is_cuda"):
            lab = lab.cpu().numpy()
        lab = np.asarray(lab)
        if lab.shape != arr.shape or lab.dtype.kind not in "iub":
            raise ValueError(
                f"{where}: {lab_key!r} must be integers of the shape of {self.column!r} "
                f"{arr.shape}, got {lab.dtype} {lab.shape}"
            )
        return np.stack([arr.astype(np.int64), lab.astype(np.int64)])

    def _read(self, it: Iterator[Any], count: int) -> list[npt.NDArray[Any]]:
        docs: list[npt.NDArray[Any]] = []
        for example in itertools.islice(it, count):
            tokens = self._tokens(example)
            docs.append(tokens)
            self._consumed += 1
            self.counters["documents"] += 1
            self.counters["tokens"] += int(tokens.shape[1])
        if len(docs) < count:
            self._exhausted = True
        return docs

    # ---- planning -------------------------------------------------------------------------

    def _plan(self, segments: list[npt.NDArray[Any]]) -> None:
        """Plan the buffer; keep the rows to emit in _pending and carry the rest."""
        values, offsets = _concat_ragged(segments, self.dtype, 2 if self._labels else 1)
        plan = pack_plan(
            np.diff(offsets), self.capacity, strategy=self.strategy, overflow=self.overflow,
            max_docs_per_row=self.max_docs_per_row, align=self.align,
        )  # fmt: skip
        self.counters["plans"] += 1
        for key in ("truncated_tokens", "dropped_docs", "dropped_tokens", "split_docs"):
            self.counters[key] += int(getattr(plan, key))
        rows = plan.num_rows
        carried = np.zeros(rows, dtype=bool)
        if not self._exhausted and rows:
            ends = np.concatenate([np.zeros(1, np.int64), np.cumsum(plan.length)])
            used = ends[plan.row_offsets[1:]] - ends[plan.row_offsets[:-1]]
            order = np.lexsort((np.arange(rows), used))  # least filled first, then row index
            under = order[used[order] < self.min_fill * self.capacity]
            pieces = np.diff(plan.row_offsets)[under]
            under = under[np.cumsum(pieces) <= self.buffer_size // 2]
            carried[under] = True
            extra = int((~carried).sum()) % self.batch_size  # rows short of a whole batch
            if extra:
                kept = order[~carried[order]]
                carried[kept[:extra]] = True
        emit = np.flatnonzero(~carried)
        self._pending = _take_rows(plan, emit)
        self._pending_values, self._pending_offsets = values, offsets
        self._cursor = 0
        keep = _take_rows(plan, np.flatnonzero(carried))
        self._carry = [
            values[:, offsets[d] + s : offsets[d] + s + n]
            for d, s, n in zip(keep.doc.tolist(), keep.start.tolist(), keep.length.tolist(),
                               strict=True)
        ]

    def _next_batch(self) -> dict[str, Any] | None:
        plan = self._pending
        if plan is None or self._cursor >= plan.num_rows:
            return None
        stop = min(self._cursor + self.batch_size, plan.num_rows)
        if stop - self._cursor < self.batch_size and (not self._exhausted or self.drop_last):
            if self._exhausted:
                self._cursor = plan.num_rows
            return None
        rows = plan.select_rows(self._cursor, stop)
        carried = self._pending_values.shape[0] == 2 and "labels" in self.fields
        fields = [f for f in self.fields if f != "labels"] if carried else self.fields
        batch = pack_fill(
            rows, self._pending_values[0], self._pending_offsets, layout="padded",
            pad_value=self.pad_value, label_pad_value=self.label_pad_value, fields=fields,
            dtype=self.dtype,
        )  # fmt: skip
        if carried:
            batch["labels"] = pack_fill(
                rows, self._pending_values[1], self._pending_offsets, layout="padded",
                label_pad_value=self.label_pad_value, fields=("labels",), dtype=self.dtype,
            )["labels"]  # fmt: skip
            if "loss_mask" in batch:  # follows the examples' labels, prompt masking included
                batch["loss_mask"] = batch["labels"] != self.label_pad_value
            batch = {f: batch[f] for f in self.fields}
        self.counters["rows"] += stop - self._cursor
        self.counters["batches"] += 1
        self._cursor = stop
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.num_workers > 1:
            raise ValueError(
                f"PackingStream cannot be split across {worker.num_workers} DataLoader workers "
                "(each would pack the whole source): use num_workers=0 or 1"
            )
        if self._finished:
            self._reset()
        it = iter(self.source)
        if self._source_state is not None and hasattr(self.source, "load_state_dict"):
            self.source.load_state_dict(self._source_state)
            it = iter(self.source)
        elif self._consumed:
            for _ in itertools.islice(it, self._consumed):
                pass
        while True:
            batch = self._next_batch()
            if batch is not None:
                yield batch
                continue
            if self._exhausted and not self._carry:
                self._finished = True
                return
            new = [] if self._exhausted else self._read(it, self.buffer_size)
            segments = self._carry + new
            self._carry = []
            if not segments:
                self._pending = None
                self._finished = True
                return
            self._plan(segments)

    # ---- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the stream bit for bit (numpy arrays and ints)."""
        width = self._pending_values.shape[0] if self._labels is None else 1 + self._labels
        carry_values, carry_offsets = _concat_ragged(self._carry, self.dtype, width)
        state: dict[str, Any] = {
            "capacity": self.capacity, "strategy": self.strategy,
            "consumed": self._consumed, "exhausted": self._exhausted,
            "carry_values": carry_values, "carry_offsets": carry_offsets,
            "pending": None if self._pending is None else _plan_state(self._pending),
            "pending_values": self._pending_values.copy(),
            "pending_offsets": self._pending_offsets.copy(), "cursor": self._cursor,
            "counters": dict(self.counters), "labels": self._labels,
        }  # fmt: skip
        state_fn: Callable[[], Any] | None = getattr(self.source, "state_dict", None)
        if state_fn is not None:
            state["source"] = state_fn()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next ``iter()`` continues where the state was taken."""
        if state["capacity"] != self.capacity or state["strategy"] != self.strategy:
            raise ValueError(
                f"state is for capacity {state['capacity']} / {state['strategy']!r}, this stream "
                f"packs capacity {self.capacity} / {self.strategy!r}"
            )
        self._reset()
        self._consumed = int(state["consumed"])
        self._exhausted = bool(state["exhausted"])
        self._labels = state.get("labels")
        cv = np.asarray(state["carry_values"], dtype=self.dtype)
        cv = cv.reshape(1, -1) if cv.ndim == 1 else cv  # states of 1-D (ids only) buffers
        co = np.asarray(state["carry_offsets"], dtype=np.int64)
        self._carry = [cv[:, co[i] : co[i + 1]].copy() for i in range(co.size - 1)]
        pend = state["pending"]
        if pend is not None:
            pend = {k: np.asarray(v, dtype=np.int64) if isinstance(v, (list, np.ndarray)) else v
                    for k, v in pend.items()}  # fmt: skip
        self._pending = None if pend is None else PackPlan(**pend)
        pv = np.asarray(state["pending_values"], dtype=self.dtype)
        self._pending_values = (pv.reshape(1, -1) if pv.ndim == 1 else pv).copy()
        self._pending_offsets = np.asarray(state["pending_offsets"], dtype=np.int64).copy()
        self._cursor = int(state["cursor"])
        self.counters = dict(state["counters"])
        self._source_state = state.get("source")


# --------------------------------------------------------------------------------------------
# Packed rows -> training batches
# --------------------------------------------------------------------------------------------

#: ``attention`` choices of :class:`PackedCollator`; transformers' ``attn_implementation`` names
#: of flash attention are accepted as aliases of ``"flash"``.
PACKED_ATTENTION = ("flash", "sdpa", "eager", "none")
_ATTENTION_ALIASES = {"flash_attention_2": "flash", "flash_attention_3": "flash"}
# Columns a packed row carries that describe the packing; the collator consumes them (the
# examples' attention_mask too: it would make flash attention unpad across documents).
_PACKING_COLUMNS = ("labels", "position_ids", "attention_mask", "seq_lengths", "seq_starts",
                    "seq_idx", "loss_mask", "doc_ids")  # fmt: skip


def _row_documents(c: _Columns, ids: Ragged, key: str) -> tuple[Int64Array, ...]:
    """Documents of every row as (row_offsets, row, start, length), vectorised over the batch.

    From ``seq_lengths`` (documents back to back from column 0, or at ``seq_starts``), else from
    the resets of ``position_ids`` (a token whose position is not the previous one + 1 starts a
    document), else one document per row. Zero-length documents are skipped.
    """
    rows = len(ids)
    row_len = ids.lengths
    if "seq_lengths" in c.cols:
        sl = _as_ragged(c.cols["seq_lengths"], "seq_lengths")
        counts = sl.lengths
        row = np.repeat(np.arange(rows, dtype=np.int64), counts)
        length = sl.values.astype(np.int64)
        if length.size and int(length.min()) < 0:
            i = int(np.argmax(length < 0))
            raise ValueError(f"seq_lengths: example {int(row[i])} has a negative document length "
                             f"({int(length[i])})")  # fmt: skip
        if "seq_starts" in c.cols:
            ss = _as_ragged(c.cols["seq_starts"], "seq_starts")
            _check_same_lengths(ss, sl, "seq_starts", "seq_lengths")
            start = ss.values.astype(np.int64)
            prev_end = start[:-1] + length[:-1]
            bad = np.flatnonzero((row[1:] == row[:-1]) & (start[1:] < prev_end)) + 1
            if start.size and int(start.min()) < 0:
                bad = np.concatenate([np.flatnonzero(start < 0), bad])
            if bad.size:
                i = int(bad.min())
                raise ValueError(
                    f"seq_starts: example {int(row[i])} has a document at column "
                    f"{int(start[i])}, before the end of the previous one or negative; documents "
                    "must be in increasing, non-overlapping columns"
                )
        else:
            ends = np.zeros(length.size + 1, dtype=np.int64)
            np.cumsum(length, out=ends[1:])
            start = ends[:-1] - np.repeat(ends[sl.offsets[:-1]], counts)
        over = np.flatnonzero(start + length > row_len[row])
        if over.size:
            i = int(over[0])
            r = int(row[i])
            raise ValueError(
                f"seq_lengths: example {r} has a document ending at token "
                f"{int(start[i] + length[i])} but its {key!r} has {int(row_len[r])} tokens"
            )
        if length.size and not np.all(length):
            keep = length > 0
            row, start, length = row[keep], start[keep], length[keep]
            counts = np.bincount(row, minlength=rows).astype(np.int64)
    elif "position_ids" in c.cols:
        pos = _as_ragged(c.cols["position_ids"], "position_ids")
        _check_same_lengths(pos, ids, "position_ids", key)
        p = pos.values
        first = np.zeros(p.size, dtype=bool)
        first[ids.offsets[:-1][row_len > 0]] = True
        first[1:] |= p[1:] != p[:-1] + 1
        at = np.flatnonzero(first)
        length = np.diff(np.append(at, p.size))
        row = np.searchsorted(ids.offsets, at, side="right") - 1
        start = at - ids.offsets[row]
        counts = np.bincount(row, minlength=rows).astype(np.int64)
    else:
        row = np.flatnonzero(row_len > 0)
        start = np.zeros(row.size, dtype=np.int64)
        length = row_len[row]
        counts = (row_len > 0).astype(np.int64)
    row_offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(counts, out=row_offsets[1:])
    return row_offsets, row, start, length


class PackedCollator:
    """Batches of packed rows (``pack_sequences`` output or TRL's ``pack_dataset``) for training.

    Input: a list of packed example dicts, a ``pyarrow.RecordBatch`` / ``Table``
    (``Dataset.with_format("arrow")``) or a dict of columns, in either layout: fixed-size rows
    (``pack_sequences(layout="padded")``: ``input_ids``, ``position_ids``, ``seq_lengths``) or
    rows of their used length (``layout="ragged"``, or TRL: ``input_ids``, ``seq_lengths``).
    Document boundaries come from ``seq_lengths`` (documents back to back from column 0, or at
    ``seq_starts`` when present), else from the resets of ``position_ids``, else each row is one
    document (TRL's ``wrapped``). Tokens of a row outside every document are padding.

    Output (torch tensors, or numpy with ``return_tensors=False``): ``input_ids`` [B, L]
    (rows padded with ``pad_token_id`` to the longest row, rounded up to ``pad_to_multiple_of``);
    ``labels`` (the ids, or the rows' own ``labels``) with ``label_pad_token_id`` at the first
    token of every document and on padding, so nothing is predicted across a document boundary;
    ``position_ids`` restarting at ``position_ids_start`` per document (0 on padding). Then, by
    ``attention`` (set it to the model's attention implementation):

    - ``"flash"`` (also ``"flash_attention_2"``/``"_3"``): transformers' padding-free kwargs
      ``cu_seq_lens_q``/``cu_seq_lens_k`` (int32 boundaries over the flattened ``B * L`` tokens;
      every document and every run of padding is one segment) and ``max_length_q``/``_k`` (int);
      no ``attention_mask``, which would make flash attention ignore them.
    - ``"sdpa"``: ``attention_mask`` bool [B, 1, L, L], block-diagonal causal (True = attend).
    - ``"eager"``: the same mask additive (0 or ``finfo(mask_dtype).min``, float32 by default).
    - ``"none"``: no attention fields.

    ``position_ids`` alone do not keep documents apart under ``sdpa``/``eager``: a model run with
    the wrong ``attention`` attends across documents. ``padding_free=True`` drops all padding and
    returns [1, T] (pieces back to back), as TRL's ``padding_free`` collator does. The rows'
    ``attention_mask``, ``position_ids``, ``seq_lengths``, ``seq_starts``, ``doc_ids``,
    ``seq_idx`` and ``loss_mask`` are consumed; other token columns of the rows' lengths are laid
    out like ``input_ids`` (padding 0), other fields stacked or passed through. No Python loop
    per document or token: the rows become a pack plan that the fill kernel writes in one pass.
    With transformers' ``Trainer`` pass ``remove_unused_columns=False``: it would drop
    ``seq_lengths`` (not a model argument), leaving only ``position_ids`` resets, or nothing for
    TRL's rows, to find the documents by.
    """

    def __init__(
        self,
        pad_token_id: int = 0,
        label_pad_token_id: int = -100,
        attention: str = "flash",
        return_tensors: ReturnTensors = True,
        pin_memory: bool = False,
        *,
        pad_to_multiple_of: int | None = None,
        padding_free: bool = False,
        position_ids_start: int = 0,
        mask_dtype: torch.dtype | None = None,
        input_key: str = "input_ids",
    ) -> None:
        _check_int("pad_token_id", pad_token_id)
        _check_int("label_pad_token_id", label_pad_token_id)
        _check_int("pad_to_multiple_of", pad_to_multiple_of, minimum=1, optional=True)
        _check_int("position_ids_start", position_ids_start)
        if not isinstance(attention, str):
            raise TypeError(f"attention must be a string, got {attention!r}")
        attention = _ATTENTION_ALIASES.get(attention, attention)
        check_choice("attention", attention, PACKED_ATTENTION)
        if mask_dtype is not None and (attention != "eager" or not mask_dtype.is_floating_point):
            raise ValueError(f"mask_dtype={mask_dtype} needs attention='eager' and a float dtype")
        self.pad_token_id = int(pad_token_id)
        self.label_pad_token_id = int(label_pad_token_id)
        self.attention = attention
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_free = bool(padding_free)
        self.position_ids_start = int(position_ids_start)
        self.mask_dtype = mask_dtype
        self.input_key = input_key
        self._out = _Output(return_tensors, pin_memory)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(pad_token_id={self.pad_token_id}, "
            f"attention={self.attention!r}, padding_free={self.padding_free}, "
            f"pad_to_multiple_of={self.pad_to_multiple_of})"
        )

    def plan(self, batch: Any) -> PackPlan:
        """The rows of ``batch`` as a :class:`PackPlan` (one piece per document, doc = row)."""
        return self._plan(_columns(batch))[0]

    def _plan(self, c: _Columns) -> tuple[PackPlan, Ragged]:
        key = self.input_key
        ids = _as_ragged(_field(c, key), key)
        if ids.values.size and int(ids.values.min()) < 0:
            pos = int(np.argmax(ids.values < 0))
            raise ValueError(
                f"{key}: example {_example_of(ids.offsets, pos)} has a negative token id "
                f"({int(ids.values[pos])}); token ids must be >= 0"
            )
        row_offsets, row, start, length = _row_documents(c, ids, key)
        longest = int(ids.lengths.max()) if len(ids) else 0
        width = padded_length(longest, None, self.pad_to_multiple_of)
        plan = PackPlan(
            capacity=width, strategy="packed_rows", row_offsets=row_offsets, doc=row,
            start=start, length=length, column=start, num_docs=len(ids),
            num_tokens=int(ids.values.size),
        )  # fmt: skip
        return plan, ids

    def __call__(self, batch: Any) -> dict[str, Any]:
        c = _columns(batch)
        plan, ids = self._plan(c)
        shape = (1, plan.packed_tokens) if self.padding_free else (plan.num_rows, plan.capacity)
        labels = None
        if "labels" in c.cols:
            labels = _as_ragged(c.cols["labels"], "labels")
            _check_same_lengths(labels, ids, "labels", self.input_key)
        arena = self._out.arena(3, shape)
        out = {"input_ids": arena.take(), "labels": arena.take(), "position_ids": arena.take()}
        fields = ["input_ids", "position_ids"] + (["labels"] if labels is None else [])
        if self.attention in ("sdpa", "eager"):
            fields.append("seq_idx")
        if self.attention == "flash":
            fields.append("cu_seqlens")
        got = self._fill(plan, ids, fields, out, self.pad_token_id)
        if labels is not None:
            self._fill(plan, labels, ("labels",), {"labels": out["labels"]}, 0)
        result: dict[str, Any] = {self.input_key: self._out.wrap(out["input_ids"]),
                                  "labels": self._out.wrap(out["labels"]),
                                  "position_ids": self._out.wrap(out["position_ids"])}  # fmt: skip
        if self.attention == "flash":
            cu = got["cu_seqlens"]
            cu_t = self._out.wrap(cu)
            result["cu_seq_lens_q"] = result["cu_seq_lens_k"] = cu_t
            result["max_length_q"] = result["max_length_k"] = (
                int(np.diff(cu).max()) if cu.size > 1 else 0
            )
        elif self.attention != "none":
            result["attention_mask"] = self._mask(got["seq_idx"])
        for name, col in c.cols.items():
            if name == self.input_key or name in _PACKING_COLUMNS:
                continue
            if _is_sequence_column(col):
                r = _as_ragged(col, name)
                _check_same_lengths(r, ids, name, self.input_key)
                buf = self._out.empty(shape)
                self._fill(plan, r, ("input_ids",), {"input_ids": buf}, 0)
                result[name] = self._out.wrap(buf)
            else:
                result[name] = _stack_other(col, name, self._out.tensors)
        return result

    def _fill(self, plan: PackPlan, rows: Ragged, fields: Sequence[str], out: dict[str, Any],
              pad_value: int) -> dict[str, Any]:  # fmt: skip
        """One fill of ``rows`` (ids, labels or another token column) along ``plan``."""
        return pack_fill(
            plan, rows.values, rows.offsets, layout="flat" if self.padding_free else "padded",
            pad_value=pad_value, label_pad_value=self.label_pad_token_id,
            position_start=self.position_ids_start, fields=fields, dtype=np.int64, out=out,
        )  # fmt: skip

    def _mask(self, seq_idx: npt.NDArray[np.int32]) -> Any:
        import torch

        mask = block_causal_mask(torch.from_numpy(seq_idx), additive=self.attention == "eager",
                                 dtype=self.mask_dtype)  # fmt: skip
        if self._out.pin():
            mask = mask.pin_memory()
        return mask if self._out.tensors else mask.numpy()


def create_packed_collate(
    pad_token_id: int = 0,
    label_pad_token_id: int = -100,
    attention: str = "flash",
    return_tensors: ReturnTensors = True,
    pin_memory: bool = False,
    **kwargs: Any,
) -> PackedCollator:
    """Collator of packed rows into training batches (see :class:`PackedCollator`); picklable."""
    return PackedCollator(pad_token_id, label_pad_token_id, attention, return_tensors,
                          pin_memory, **kwargs)  # fmt: skip


# Registered here, not in collate.py: packing imports collate, so collate cannot import us.
CollatorRegistry.register(
    "packed", modality="text",
    description="packed rows (pack_sequences / TRL pack_dataset): labels and position_ids per "
    "document, flash-attention kwargs or a block-diagonal causal mask",
)(create_packed_collate)  # fmt: skip


# --------------------------------------------------------------------------------------------
# mixtape pack-stats
# --------------------------------------------------------------------------------------------


def synthetic_lengths(n: int, mean: float = 300.0, sigma: float = 1.0, maximum: int = 8192,
                      seed: int = 0) -> Int64Array:  # fmt: skip
    """Lognormal lengths with the given mean (before clipping to 1..maximum), seeded."""
    mu = math.log(mean) - sigma * sigma / 2
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.lognormal(mu, sigma, n)), 1, maximum).astype(np.int64)


def _load_lengths(args: argparse.Namespace) -> tuple[Int64Array, str]:
    if args.synthetic is not None:
        if args.synthetic < 1:
            raise ValueError(f"--synthetic must be >= 1, got {args.synthetic}")
        return synthetic_lengths(args.synthetic, seed=args.seed), f"synthetic {args.synthetic:,}"
    if args.lengths is not None:
        path = Path(args.lengths)
        if not path.exists():
            raise ValueError(f"--lengths: {path} does not exist")
        try:
            raw = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, ndmin=1)
        except ValueError as exc:
            raise ValueError(f"--lengths: {path}: {exc}") from exc
        arr = np.asarray(raw)
        if arr.dtype.kind == "f" and arr.ndim == 1 and np.array_equal(arr, np.rint(arr)):
            arr = arr.astype(np.int64)  # a text file of lengths, e.g. from np.savetxt
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise ValueError(f"--lengths: {path} must hold a 1-D integer array, got "
                             f"{arr.dtype} {arr.shape}")  # fmt: skip
        return arr.astype(np.int64), str(path)
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(args.dataset)
    if isinstance(ds, DatasetDict):
        split = args.split or (next(iter(ds)) if len(ds) == 1 else None)
        if split not in ds:
            raise ValueError(f"--dataset {args.dataset} has splits {list(ds)}; choose with --split")
        ds = ds[split]
    return dataset_lengths(ds, args.column), f"{args.dataset} [{args.column}]"


def stats_main(argv: list[str]) -> int:
    """``mixtape pack-stats``: plan a dataset, a lengths file or synthetic lengths; print stats."""
    parser = argparse.ArgumentParser(
        prog="mixtape pack-stats",
        description="Packing statistics (rows vs the lower bound ceil(tokens / C)).",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="a dataset saved with Dataset.save_to_disk")
    src.add_argument("--lengths", help="a .npy or .txt file of sequence lengths")
    src.add_argument("--synthetic", type=int, metavar="N",
                     help="N lognormal lengths (mean about 300, clipped to 1..8192)")  # fmt: skip
    parser.add_argument("--column", default="input_ids", help="token column (with --dataset)")
    parser.add_argument("--split", default=None, help="split of a saved DatasetDict")
    parser.add_argument("--seed", type=int, default=0, help="seed of --synthetic")
    parser.add_argument("--max-length", type=int, default=4096, help="row capacity C")
    parser.add_argument("--strategy", default="bfd", choices=(*PACK_STRATEGIES, "all"))
    parser.add_argument("--overflow", default="split", choices=OVERFLOW_POLICIES)
    parser.add_argument("--align", type=int, default=1)
    parser.add_argument("--max-docs-per-row", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on errors
        return int(exc.code or 0)
    try:
        lengths, name = _load_lengths(args)
        strategies = PACK_STRATEGIES if args.strategy == "all" else (args.strategy,)
        results = []
        for strategy in strategies:
            t0 = time.perf_counter()
            plan = pack_plan(
                lengths, args.max_length, strategy=strategy, overflow=args.overflow,
                align=args.align, max_docs_per_row=args.max_docs_per_row,
            )  # fmt: skip
            seconds = time.perf_counter() - t0
            results.append((PackingStats.from_plan(plan), seconds))
    except (ValueError, TypeError, OSError) as exc:
        print(f"mixtape pack-stats: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out = [{"source": name, **s.to_dict(), "plan_seconds": sec} for s, sec in results]
        print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    else:
        print(f"source: {name}")
        for s, sec in results:
            print(f"{s}\n  planned in     {sec * 1e3:>13.1f} ms")
    return 0
