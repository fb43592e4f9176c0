"""Offline packing: an HF ``Dataset`` (or Arrow / numpy tokens) in, a packed ``Dataset`` out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from mixtape.collate.sources import DOC_SOURCE_IDS, SOURCE_KEY, check_source_names
from mixtape.ops import (
    OVERFLOW_POLICIES,
    PACK_STRATEGIES,
    Int64Array,
    IntArray,
    PackPlan,
    check_choice,
    pack_fill,
)
from mixtape.packing.plan import (
    _LAYOUTS,
    PACKED_FIELDS,
    ROW_FIELDS,
    TOKEN_FIELDS,
    ListColumn,
    check_no_empty,
    list_column,
    plan_lengths,
)
from mixtape.ragged import (
    TableView,
    arrow_ragged,
    arrow_table,
    is_dataset_dict,
    is_hf_dataset,
    ragged_column,
)

# Output (and gathered input) per written batch: bounds the resident memory of a packing run.
_BATCH_BYTES = 64 << 20
_INT32_MAX = int(np.iinfo(np.int32).max)


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


def _list_array(offsets: Int64Array, values: npt.NDArray[Any], large: bool) -> pa.Array:
    """A list array, no copy of the values; ``large`` (large_list) when the whole output's
    offsets outgrow int32, decided once so that every written batch has the same type."""
    flat = pa.array(values)
    if not large:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), flat)
    return pa.LargeListArray.from_arrays(pa.array(offsets), flat)


def _token_column(
    arr: npt.NDArray[Any], layout: str, capacity: int, row_tok_offsets: Int64Array, large: bool
) -> pa.Array:
    if layout == "padded":
        return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), capacity)
    return _list_array(row_tok_offsets, arr.reshape(-1), large)


def _carried_columns(
    table: TableView | None,
    column: str,
    columns: Sequence[str] | None,
    lengths: Int64Array,
    source: str | None = None,
) -> dict[str, ListColumn]:
    """Other list columns packed along with the tokens (TRL packs every column the same way);
    ``source`` (the documents' source column, written as ``doc_source_ids``) is not one."""
    if table is None:
        if columns:
            raise ValueError(f"columns={list(columns)} needs a Dataset or a pyarrow Table input")
        return {}
    if columns is None:
        names = [c for c in table.column_names if c not in (column, source)]
    else:
        names = list(columns)
    out: dict[str, ListColumn] = {}
    for name in names:
        if name not in table.column_names:
            raise ValueError(f"column {name!r} not found; columns are {table.column_names}")
        if name == source:
            raise ValueError(f"column {name!r} is the documents' source column (written per row "
                             f"as {DOC_SOURCE_IDS!r}): leave it out of columns")  # fmt: skip
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
        carried = ListColumn(table.table.column(name), f"column {name!r}", table.indices)
        theirs = carried.lengths()
        if not np.array_equal(theirs, lengths):
            row = int(np.argmax(theirs != lengths))
            raise ValueError(
                f"column {name!r} row {row} has {int(theirs[row])} values but {column!r} has "
                f"{int(lengths[row])}; packed columns must have the same lengths"
            )
        out[name] = carried
    return out


def _doc_sources(
    table: TableView | None,
    source_column: str | None,
    source_names: tuple[str, ...] | None,
    num_docs: int,
    features: Any = None,
) -> tuple[str | None, npt.NDArray[np.int32] | None]:
    """The source column used (given, or ``__source__`` when the data has one) and the source id
    of every document (int32): a name's index in ``source_names``, or the column's integer ids.

    Names need ``source_names``: ids numbered by first appearance would mean another source in
    another dataset or split. An HF ``ClassLabel`` column holds names too (its ids index its own
    names, e.g. sorted by ``class_encode_column``): with ``source_names`` they are re-mapped.
    """
    if table is None:
        if source_column is not None or source_names is not None:
            raise ValueError("source_column / source_names need a Dataset or a pyarrow Table "
                             "input (with a column naming each document's source)")  # fmt: skip
        return None, None
    name = source_column
    if name is None:
        if SOURCE_KEY not in table.column_names:
            if source_names is not None:
                raise ValueError(f"source_names given but the data has no {SOURCE_KEY!r} column; "
                                 "name the documents' source column with source_column=")
            return None, None
        name = SOURCE_KEY
    if name not in table.column_names:
        raise ValueError(f"source_column {name!r} not found; columns are {table.column_names}")
    import pyarrow.compute as pc

    col = table.column(name)
    where = f"source column {name!r}"
    if col.null_count:
        nulls = np.concatenate([c.is_null().to_numpy(zero_copy_only=False) for c in col.chunks])
        raise ValueError(f"{where}: row {int(np.argmax(nulls))} has no source (null)")
    typ = col.type
    if pa.types.is_dictionary(typ):
        col = col.cast(typ.value_type)
        typ = typ.value_type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        if source_names is None:
            raise ValueError(
                f"{where} holds source names: pass source_names (the mixture's names, in order; "
                "a name's id is its index) so that ids never depend on which names the data has"
            )
        found = pc.index_in(col, value_set=pa.array(source_names, type=typ))
        if found.null_count:
            missing = np.concatenate([c.is_null().to_numpy(zero_copy_only=False)
                                      for c in found.chunks])  # fmt: skip
            row = int(np.argmax(missing))
            raise ValueError(f"{where}: row {row} has source {col[row].as_py()!r}, which is not "
                             f"in source_names {list(source_names)}")  # fmt: skip
        ids = np.asarray(found.to_numpy(), dtype=np.int64)
    elif pa.types.is_integer(typ):
        ids = np.asarray(col.to_numpy(), dtype=np.int64)  # a wrapped uint64 is < 0: refused
        label_names = getattr((features or {}).get(name), "names", None)
        if label_names is not None and source_names is not None:  # ClassLabel: by its names
            index = {n: i for i, n in enumerate(source_names)}
            lut = np.array([index.get(n, -1) for n in label_names] + [-1], dtype=np.int64)
            in_range = (ids >= 0) & (ids < len(label_names))
            mapped = lut[np.where(in_range, ids, len(label_names))]
            bad = np.flatnonzero(mapped < 0)
            if bad.size:
                row = int(bad[0])
                got = label_names[ids[row]] if in_range[row] else int(ids[row])
                raise ValueError(f"{where}: row {row} has source {got!r} (a ClassLabel), which is "
                                 f"not in source_names {list(source_names)}")  # fmt: skip
            ids = mapped
    else:
        raise TypeError(f"{where} has type {typ}: expected source names (strings) or source ids "
                        "(integers)")  # fmt: skip
    limit = _INT32_MAX if source_names is None else len(source_names) - 1
    bad = np.flatnonzero((ids < 0) | (ids > limit))
    if bad.size:
        row = int(bad[0])
        known = "" if source_names is None else (
            f" (source_names has {len(source_names)}: {list(source_names)})")  # fmt: skip
        raise ValueError(f"{where}: row {row} has source id {col[row].as_py()}, which names no "
                         f"source{known}")  # fmt: skip
    assert ids.size == num_docs
    return name, ids.astype(np.int32)


def _has_gaps(plan: PackPlan) -> bool:
    """Whether some piece does not start where the previous one in its row ends (``align``)."""
    if not plan.num_pieces:
        return False
    ends = np.cumsum(plan.length) - plan.length  # tokens before each piece
    row_first = np.repeat(ends[plan.row_offsets[:-1]], np.diff(plan.row_offsets))
    return bool(np.any(plan.column != ends - row_first))


@dataclass(frozen=True)
class _RowFormat:
    """How rows are written: the same for one in-memory fill and for every batch on disk."""

    column: str
    fields: tuple[str, ...]
    layout: str
    capacity: int
    pad_value: int
    label_pad_value: int
    position_start: int
    large_tokens: bool  # ragged token columns need large_list (> 2**31 - 1 tokens in all)
    large_pieces: bool  # per-row lists need large_list (> 2**31 - 1 pieces in all)


def _rows_table(
    plan: PackPlan,
    doc_ids: Int64Array,
    values: IntArray,
    offsets: Int64Array,
    extra: dict[str, tuple[IntArray, npt.DTypeLike]],
    fmt: _RowFormat,
    first_piece: int = 0,
    doc_sources: npt.NDArray[np.int32] | None = None,
) -> pa.Table:
    """The packed rows of ``plan`` (whose ``doc`` indexes ``offsets``) as an Arrow table;
    ``doc_ids`` are the input rows of the plan's pieces, ``first_piece`` the index of its first
    piece in the whole plan (``seq_idx`` numbers the pieces of the whole output);
    ``doc_sources`` the source id of every input row (written per piece as doc_source_ids)."""
    fill_layout = "padded" if fmt.layout == "padded" else "flat"
    if values.size and np.issubdtype(values.dtype, np.signedinteger) and int(values.min()) < 0:
        at = int(np.argmax(values < 0))  # -100 would pass for a masked label, -1 for padding
        doc = int(np.searchsorted(offsets, at, side="right")) - 1
        piece = np.flatnonzero(plan.doc == doc)
        row = int(doc_ids[piece[0]]) if piece.size else doc
        raise ValueError(f"pack_sequences: example {row} has a negative token id "
                         f"({int(values[at])}); token ids must be >= 0")
    token_fields = [f for f in TOKEN_FIELDS if f in fmt.fields]
    filled = pack_fill(
        plan, values, offsets, layout=fill_layout, pad_value=fmt.pad_value,
        label_pad_value=fmt.label_pad_value, position_start=fmt.position_start,
        fields=token_fields, dtype=values.dtype,
    ) if token_fields else {}  # fmt: skip
    if first_piece and "seq_idx" in filled:
        seq_idx = filled["seq_idx"]
        last = first_piece + plan.num_pieces - 1
        if last > np.iinfo(seq_idx.dtype).max:  # it would wrap to negatives (-1 is padding)
            raise ValueError(f"seq_idx: piece {last} of the output does not fit "
                             f"{seq_idx.dtype}; leave seq_idx out of fields (doc_source_ids / "
                             "seq_lengths mark the documents)")  # fmt: skip
        seq_idx[seq_idx >= 0] += first_piece  # -1 marks padding
    # Token offsets of the rows in the ragged layout: pieces back to back, row after row.
    piece_ends = np.concatenate([np.zeros(1, np.int64), np.cumsum(plan.length)])
    row_tok_offsets = piece_ends[plan.row_offsets]

    def fill_extra(name: str) -> npt.NDArray[Any]:
        vals = extra[name][0]
        kind = "labels" if name == "labels" else "input_ids"
        # pad_value is a token id; other columns (attention_mask, token_type_ids, ...) pad with 0.
        got: npt.NDArray[Any] = pack_fill(
            plan, vals, offsets, layout=fill_layout, pad_value=0,
            label_pad_value=fmt.label_pad_value, fields=(kind,), dtype=vals.dtype,
        )[kind]  # fmt: skip
        return got

    packed_extra: dict[str, npt.NDArray[Any]] = {}
    if "loss_mask" in filled and "labels" in extra:
        # The mask follows the carried labels (prompt tokens masked there), not the ids.
        packed_extra["labels"] = fill_extra("labels")
        filled["loss_mask"] = packed_extra["labels"] != fmt.label_pad_value
    names: list[str] = []
    arrays: list[pa.Array] = []
    for f in token_fields:
        names.append(fmt.column if f == "input_ids" else f)
        arrays.append(_token_column(filled[f], fmt.layout, fmt.capacity, row_tok_offsets,
                                    fmt.large_tokens))  # fmt: skip
    for name, (_, dtype) in extra.items():
        got = packed_extra[name] if name in packed_extra else fill_extra(name)
        names.append(name)
        arrays.append(_token_column(got.astype(dtype, copy=False), fmt.layout, fmt.capacity,
                                    row_tok_offsets, fmt.large_tokens))  # fmt: skip
    if "seq_lengths" in fmt.fields:
        names.append("seq_lengths")
        arrays.append(_list_array(plan.row_offsets, plan.length.astype(np.int32),
                                  fmt.large_pieces))  # fmt: skip
    if "seq_starts" in fmt.fields:
        names.append("seq_starts")
        starts = plan.column if fmt.layout == "padded" else piece_ends[:-1] - np.repeat(
            row_tok_offsets[:-1], np.diff(plan.row_offsets))  # fmt: skip
        arrays.append(_list_array(plan.row_offsets, starts.astype(np.int32), fmt.large_pieces))
    if "doc_ids" in fmt.fields:
        names.append("doc_ids")
        arrays.append(_list_array(plan.row_offsets, doc_ids, fmt.large_pieces))
    if doc_sources is not None:
        names.append(DOC_SOURCE_IDS)
        arrays.append(_list_array(plan.row_offsets, doc_sources[doc_ids], fmt.large_pieces))
    return pa.Table.from_arrays(arrays, names=names)


def _batch_rows(plan: PackPlan, fmt: _RowFormat, bytes_per_token: int) -> list[tuple[int, int]]:
    """Row ranges of about ``_BATCH_BYTES`` of output (and so of gathered input) each."""
    rows = max(1, _BATCH_BYTES // max(1, fmt.capacity * bytes_per_token))
    if plan.num_rows == 0:
        return [(0, 0)]  # one empty batch still writes the schema
    return [(a, min(a + rows, plan.num_rows)) for a in range(0, plan.num_rows, rows)]


def _write_batches(
    plan: PackPlan,
    source: ListColumn,
    carried: dict[str, ListColumn],
    fmt: _RowFormat,
    ranges: list[tuple[int, int]],
    path: str,
    doc_sources: npt.NDArray[np.int32] | None = None,
) -> None:
    """Fill the rows ``ranges`` of ``plan`` batch by batch into the Arrow file ``path``: each
    batch gathers only its documents (compact, the plan's doc ids remapped) from the chunks."""
    from datasets.arrow_writer import ArrowWriter

    with ArrowWriter(path=path) as writer:
        for a, b in ranges:
            sub = plan.select_rows(a, b)
            docs = np.unique(sub.doc)
            local = dataclasses.replace(sub, doc=np.searchsorted(docs, sub.doc),
                                        num_docs=int(docs.size))  # fmt: skip
            values, offsets = source.gather(docs)
            extra = {name: (col.gather(docs)[0], col.value_dtype)
                     for name, col in carried.items()}  # fmt: skip
            first = int(plan.row_offsets[a])
            writer.write_table(_rows_table(local, sub.doc, values, offsets, extra, fmt, first,
                                           doc_sources))  # fmt: skip
            del values, extra
        writer.finalize()


def _output_path(
    dataset: Any, cache_file_name: str | Path | None, keep_in_memory: bool, fingerprint: str
) -> str | None:
    """Where the packed rows go: ``cache_file_name``, else next to a memory-mapped input's cache
    files (as ``Dataset.map``), else None (kept in memory)."""
    if cache_file_name is not None:
        return os.fspath(cache_file_name)
    if keep_in_memory or not is_hf_dataset(dataset) or not dataset.cache_files:
        return None
    from datasets.fingerprint import (
        generate_random_fingerprint,
        get_temporary_cache_files_directory,
        is_caching_enabled,
    )

    if is_caching_enabled():
        folder = os.path.dirname(dataset.cache_files[0]["filename"])
        return os.path.join(folder, f"cache-{fingerprint}.arrow")
    name = f"cache-{generate_random_fingerprint()}.arrow"
    return os.path.join(get_temporary_cache_files_directory(), name)


def pack_sequences(
    dataset: Any,
    max_length: int,
    strategy: str = "bfd",
    *,
    overflow: str = "split",
    column: str = "input_ids",
    fields: Sequence[str] = ("input_ids", "position_ids", "seq_lengths"),
    columns: Sequence[str] | None = None,
    source_column: str | None = None,
    source_names: Sequence[str] | None = None,
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
    drop_empty: bool = False,
    cache_file_name: str | Path | None = None,
    keep_in_memory: bool = False,
    load_from_cache_file: bool = True,
    num_proc: int | None = None,
) -> Any:
    """Pack every sequence of ``dataset`` into rows of ``max_length`` tokens, planned globally.

    Input: an HF ``datasets.Dataset`` (or ``DatasetDict``: each split packed alone), a pyarrow
    Table (``column`` is read) or list array, a ``(values, offsets)`` numpy pair, or a list of
    token lists. Output: a packed HF ``Dataset`` for HF input, else a ``pyarrow.Table``.

    Columns: the tokens under ``column``'s name; ``labels`` (the ids, ``label_pad_value`` at each
    document start and on padding), ``position_ids`` (restart at ``position_start`` per document),
    ``seq_idx``, ``loss_mask`` as asked in ``fields``; per-row lists ``seq_lengths`` (as TRL's
    ``pack_dataset`` emits: lengths of the documents in the row), ``seq_starts`` (their first
    columns) and ``doc_ids`` (their input row indices). ``layout="padded"`` gives fixed-size rows
    of ``max_length`` (padded with ``pad_value``); ``"ragged"`` gives rows of their used length,
    as TRL does. With ``align`` > 1 (or a plan whose documents do not sit back to back) the
    padded rows have gaps between documents, so ``seq_starts`` is always written then, even if
    not in ``fields``: ``seq_lengths`` alone would be read as documents back to back.

    Other list columns (``columns``; default every other column, each must have the token
    column's lengths, as TRL requires) are packed the same way, padded with 0; a carried
    ``labels`` column gets ``label_pad_value`` at document starts and on padding. ``plan`` reuses
    a saved plan (a :class:`PackPlan` or a path of ``PackPlan.save``; the planning options are
    then the plan's, and it is checked against the data's lengths); ``save_plan`` writes the plan
    used. To get the plan itself, call :func:`plan_dataset` and pass it here.

    Sources: when the data has a column naming each document's source (``source_column``; by
    default ``__source__`` if there is one), every row gets ``doc_source_ids``, the int32 source
    id of each of its documents, aligned with ``seq_lengths`` (written too, whatever ``fields``
    says); ``PackedCollator`` turns them into per-token ``source_ids``. A column of names
    (strings) needs ``source_names`` (the mixture's names in order: a name's id is its index; an
    unknown name is a ValueError naming the row); a column of integers holds the ids already
    (checked against ``source_names`` when given). The source column is not packed as tokens.

    Empty sequences: refused by default (a ``ValueError`` naming the first empty row), since a
    document of no tokens usually means a tokenization bug. ``drop_empty=True`` leaves them out,
    as TRL's ``pack_dataset`` does silently: the count is logged (logger ``mixtape.packing``) and
    kept in the plan's ``dropped_docs`` (``plan_dataset(..., drop_empty=True)``, ``save_plan``,
    ``PackingStats.from_plan``), and ``doc_ids`` still index the input rows.

    Memory: a memory-mapped HF ``Dataset`` (one with ``cache_files``, e.g. from ``load_dataset``
    or ``load_from_disk``) is never read whole: lengths come from the Arrow offsets, and rows are
    filled in batches of about 64 MB, each gathering only its documents from the memory-mapped
    chunks, then written to an Arrow cache file next to the input's (``cache-<fingerprint>.arrow``,
    as ``Dataset.map`` does; reused when it exists and ``load_from_cache_file``) or to
    ``cache_file_name``; the result is memory-mapped from that file. ``keep_in_memory=True``
    builds the output in RAM instead. Other inputs (in-memory datasets, Arrow, numpy) are packed
    in memory, or through ``cache_file_name`` when it is given. ``num_proc`` is accepted for
    ``Dataset.map`` compatibility; the fill runs in one process (see docs/architecture.md).
    """
    if num_proc is not None and (isinstance(num_proc, bool) or num_proc < 1):
        raise ValueError(f"num_proc must be None or >= 1, got {num_proc!r}")
    if is_dataset_dict(dataset):
        if plan is not None or save_plan is not None or cache_file_name is not None:
            raise ValueError("plan / save_plan / cache_file_name need a single split, not a "
                             "DatasetDict")  # fmt: skip
        from datasets import DatasetDict

        options: dict[str, Any] = {
            "overflow": overflow, "column": column, "fields": fields, "columns": columns,
            "source_column": source_column, "source_names": source_names,
            "max_docs_per_row": max_docs_per_row, "align": align,
            "rows_multiple_of": rows_multiple_of, "shuffle_seed": shuffle_seed, "layout": layout,
            "pad_value": pad_value, "label_pad_value": label_pad_value,
            "position_start": position_start, "drop_empty": drop_empty,
            "keep_in_memory": keep_in_memory, "load_from_cache_file": load_from_cache_file,
            "num_proc": num_proc,
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

    source = list_column(dataset, column)
    ragged: tuple[IntArray, Int64Array] | None = None
    if source is None:  # numpy pair / Python lists: already in memory
        ragged = ragged_column(dataset, column)
        lengths = np.diff(ragged[1])
    else:
        lengths = source.lengths()
    table = arrow_table(dataset)
    names = check_source_names(source_names)
    src_name, doc_sources = _doc_sources(table, source_column, names, int(lengths.size),
                                         getattr(dataset, "features", None))  # fmt: skip
    carried = _carried_columns(table, column, columns, lengths, src_name)
    if doc_sources is not None and DOC_SOURCE_IDS in carried:
        raise ValueError(f"column {DOC_SOURCE_IDS!r} exists in the data and would be written from "
                         f"{src_name!r}: drop one")  # fmt: skip
    clash = sorted(set(carried) & ({"labels", "position_ids", "seq_idx", "loss_mask"} & set(fields)
                                   | set(ROW_FIELDS) & set(fields)))  # fmt: skip
    if clash:
        raise ValueError(
            f"columns {clash} exist in the data and are also asked for in fields; drop them "
            "from fields or from columns"
        )
    if plan is None:
        the_plan = plan_lengths(
            lengths, max_length, column, drop_empty, strategy=strategy, overflow=overflow,
            max_docs_per_row=max_docs_per_row, align=align, rows_multiple_of=rows_multiple_of,
            shuffle_seed=shuffle_seed,
        )  # fmt: skip
    else:
        if not drop_empty:
            check_no_empty(lengths, column)
        the_plan = plan if isinstance(plan, PackPlan) else PackPlan.load(plan)
        _check_plan_matches(the_plan, lengths, max_length)
    if save_plan is not None:
        the_plan.save(save_plan)
    out_fields = tuple(fields)
    if layout == "padded" and "seq_starts" not in out_fields and (align > 1 or _has_gaps(the_plan)):
        out_fields = (*out_fields, "seq_starts")  # documents are not back to back
    if doc_sources is not None and "seq_lengths" not in out_fields:
        out_fields = (*out_fields, "seq_lengths")  # what doc_source_ids are aligned with
    fmt = _RowFormat(
        column=column, fields=out_fields, layout=layout, capacity=int(max_length),
        pad_value=pad_value, label_pad_value=label_pad_value, position_start=position_start,
        large_tokens=the_plan.packed_tokens > _INT32_MAX,
        large_pieces=the_plan.num_pieces > _INT32_MAX,
    )  # fmt: skip

    fingerprint = ""
    if is_hf_dataset(dataset):
        # A fingerprint from the input's and the plan's, not from hashing every packed token.
        digest = hashlib.sha256(str(getattr(dataset, "_fingerprint", "")).encode())
        digest.update(repr((column, out_fields, tuple(carried), layout, pad_value,
                            label_pad_value, position_start, max_length)).encode())  # fmt: skip
        for name in ("row_offsets", "doc", "start", "length", "column"):
            digest.update(np.ascontiguousarray(getattr(the_plan, name)).tobytes())
        if doc_sources is not None:  # the ids depend on source_names, not only on the input
            digest.update(repr((src_name, names)).encode())
            digest.update(doc_sources.tobytes())
        fingerprint = digest.hexdigest()[:16]
    path = _output_path(dataset, cache_file_name, keep_in_memory, fingerprint)
    if path is None:
        if ragged is None:
            r = arrow_ragged(table.column(column) if table is not None else dataset,
                             f"column {column!r}" if table is not None else "tokens")  # fmt: skip
            ragged = (r.values, r.offsets)
        extra: dict[str, tuple[IntArray, npt.DTypeLike]] = {}
        for name, col in carried.items():
            assert table is not None  # carried columns come from a table
            extra[name] = (arrow_ragged(table.column(name), col.name).values, col.value_dtype)
        out = _rows_table(the_plan, the_plan.doc, ragged[0], ragged[1], extra, fmt,
                          doc_sources=doc_sources)  # fmt: skip
    else:
        if not (load_from_cache_file and os.path.exists(path)):
            if source is None:
                assert ragged is not None
                source = ListColumn(_list_array(ragged[1], ragged[0], ragged[1][-1] > _INT32_MAX),
                                    "tokens")  # fmt: skip
            itemsizes = [np.dtype(source.value_dtype).itemsize]
            itemsizes += [np.dtype(c.value_dtype).itemsize for c in carried.values()]
            bytes_per_token = 2 * sum(itemsizes) + 8 * ("position_ids" in out_fields) + 13
            ranges = _batch_rows(the_plan, fmt, bytes_per_token)
            _write_atomically(path, lambda tmp: _write_batches(
                the_plan, source, carried, fmt, ranges, tmp, doc_sources))  # fmt: skip
        out = _memory_mapped(path)
    if is_hf_dataset(dataset):
        from datasets import Dataset

        packed = Dataset(out, split=dataset.split, fingerprint=fingerprint)
        fmt_ = dataset.format
        if fmt_.get("type") is not None:
            packed = packed.with_format(fmt_["type"], **fmt_.get("format_kwargs", {}))
        return packed
    return out if isinstance(out, pa.Table) else out.table


def _write_atomically(path: str, write: Any) -> None:
    """Write through a temporary file in the same folder, renamed at the end (as ``Dataset.map``
    does), so an interrupted run never leaves a truncated cache file to be loaded later."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="tmp-pack-", suffix=".arrow", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _memory_mapped(path: str) -> Any:
    """The Arrow file at ``path``, memory-mapped (a ``datasets`` MemoryMappedTable)."""
    from datasets.table import MemoryMappedTable

    return MemoryMappedTable.from_file(path)
