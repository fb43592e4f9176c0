"""Offline packing: an HF ``Dataset`` (or Arrow / numpy tokens) in, a packed ``Dataset`` out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from mixtape.ops import (
    OVERFLOW_POLICIES,
    PACK_STRATEGIES,
    Int64Array,
    IntArray,
    PackPlan,
    check_choice,
    pack_fill,
    pack_plan,
)
from mixtape.packing.plan import _LAYOUTS, PACKED_FIELDS, ROW_FIELDS, TOKEN_FIELDS, check_no_empty
from mixtape.ragged import (
    TableView,
    arrow_ragged,
    arrow_table,
    is_dataset_dict,
    is_hf_dataset,
    ragged_column,
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
    table: TableView | None, column: str, columns: Sequence[str] | None, offsets: Int64Array
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
        carried = arrow_ragged(table.column(name), f"column {name!r}")
        vals, offs = carried.values, carried.offsets
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
    if is_dataset_dict(dataset):
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

    values, offsets = ragged_column(dataset, column)
    table = arrow_table(dataset)
    extra = _extra_columns(table, column, columns, offsets)
    clash = sorted(set(extra) & ({"labels", "position_ids", "seq_idx", "loss_mask"} & set(fields)
                                 | set(ROW_FIELDS) & set(fields)))  # fmt: skip
    if clash:
        raise ValueError(
            f"columns {clash} exist in the data and are also asked for in fields; drop them "
            "from fields or from columns"
        )
    lengths = np.diff(offsets)
    check_no_empty(lengths, column)
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
    token_fields = [f for f in TOKEN_FIELDS if f in fields]
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
    if is_hf_dataset(dataset):
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
