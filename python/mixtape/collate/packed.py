"""Batches of packed rows (``pack_sequences`` or TRL's ``pack_dataset``) for training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from mixtape.collate.attention import PACKED_ATTENTION, resolve_attention, sliding_window
from mixtape.collate.output import (
    DEFAULT_PAD_VALUES,
    Output,
    ReturnTensors,
    TokenColumn,
    gather_layout,
    split_fields,
    stack_other,
)
from mixtape.collate.sources import DOC_SOURCE_IDS, NO_SOURCE, SOURCE_IDS, SourceNames
from mixtape.ops import (
    Int64Array,
    PackPlan,
    block_causal_mask,
    check_choice,
    pack_fill,
    pack_rows,
    padded_length,
)
from mixtape.ragged import (
    Columns,
    Ragged,
    as_ragged,
    batch_columns,
    check_same_lengths,
    example_of,
    field_of,
    numeric_ragged,
)
from mixtape.validation import check_int

if TYPE_CHECKING:
    import torch


# --------------------------------------------------------------------------------------------
# Packed rows -> training batches
# --------------------------------------------------------------------------------------------

__all__ = ["PACKED_ATTENTION", "PackedCollator", "create_packed_collate"]
MASK_PLACES = ("host", "device")
# Columns a packed row carries that describe the packing; the collator consumes them (the
# examples' attention_mask too: it would make flash attention unpad across documents).
_PACKING_COLUMNS = ("labels", "position_ids", "attention_mask", "seq_lengths", "seq_starts",
                    "seq_idx", "loss_mask", "doc_ids", DOC_SOURCE_IDS)  # fmt: skip


def _row_documents(
    c: Columns, ids: Ragged, key: str
) -> tuple[Int64Array, Int64Array, Int64Array, Int64Array, Int64Array | None]:
    """Documents of every row as (row_offsets, row, start, length, entry), vectorised over the
    batch; ``entry`` is each document's index in the flat ``seq_lengths`` (None without them).

    From ``seq_lengths`` (documents back to back from column 0, or at ``seq_starts``), else from
    the resets of ``position_ids`` (a token whose position is not the previous one + 1 starts a
    document), else one document per row. Zero-length documents are skipped. Back-to-back
    documents are checked against what else the rows say (:func:`_check_back_to_back`).
    """
    rows = len(ids)
    row_len = ids.lengths
    back_to_back = False
    entry = None
    if "seq_lengths" in c.cols:
        sl = as_ragged(c.cols["seq_lengths"], "seq_lengths")
        counts = sl.lengths
        row = np.repeat(np.arange(rows, dtype=np.int64), counts)
        length = sl.values.astype(np.int64)
        entry = np.arange(length.size, dtype=np.int64)
        if length.size and int(length.min()) < 0:
            i = int(np.argmax(length < 0))
            raise ValueError(f"seq_lengths: example {int(row[i])} has a negative document length "
                             f"({int(length[i])})")  # fmt: skip
        if "seq_starts" in c.cols:
            ss = as_ragged(c.cols["seq_starts"], "seq_starts")
            check_same_lengths(ss, sl, "seq_starts", "seq_lengths")
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
            back_to_back = True
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
            row, start, length, entry = row[keep], start[keep], length[keep], entry[keep]
            counts = np.bincount(row, minlength=rows).astype(np.int64)
        if back_to_back:
            _check_back_to_back(c, ids, key, row, start, length)
    elif "position_ids" in c.cols:
        pos = as_ragged(c.cols["position_ids"], "position_ids")
        check_same_lengths(pos, ids, "position_ids", key)
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
    return row_offsets, row, start, length, entry


def _check_back_to_back(c: Columns, ids: Ragged, key: str, row: Int64Array, start: Int64Array,
                        length: Int64Array) -> None:  # fmt: skip
    """Rows with ``seq_lengths`` and no ``seq_starts`` must hold their documents back to back.

    Rows with gaps (``pack_sequences(align > 1)`` rows without their ``seq_starts``) read that way
    lose documents and train on padding, so whatever else the rows carry must agree:
    ``position_ids`` count up by one inside every document and restart at each document after the
    first; the tokens after the last document are padding (one repeated value); a carried
    ``attention_mask`` is 0 there. A gap followed only by one-token documents of the pad value is
    invisible to all three: such rows need their ``seq_starts``.
    """
    offs = ids.offsets
    problem: tuple[int, str] | None = None

    def note(r: int, what: str) -> None:
        nonlocal problem
        if problem is None or r < problem[0]:
            problem = (r, what)

    if "position_ids" in c.cols:
        first = offs[row] + start  # flat index of each document's first token
        cum = np.zeros(length.size + 1, dtype=np.int64)
        np.cumsum(length, out=cum[1:])
        within = np.arange(int(cum[-1]), dtype=np.int64) - np.repeat(cum[:-1], length)
        tok = np.repeat(first, length) + within  # flat index of every document token
        pos = as_ragged(c.cols["position_ids"], "position_ids")
        check_same_lengths(pos, ids, "position_ids", key)
        p = pos.values.astype(np.int64, copy=False)
        bad = np.flatnonzero(p[tok] != np.repeat(p[first], length) + within)
        if bad.size:
            d = int(np.searchsorted(cum, bad[0], side="right")) - 1
            j = d - int(np.searchsorted(row, row[d]))  # the document's index in its row
            cols = f"{int(start[d])}..{int(start[d] + length[d]) - 1}"
            note(int(row[d]), f"its position_ids do not count up by one inside document {j} "
                              f"(columns {cols})")  # fmt: skip
        later = np.flatnonzero(start > 0)
        cont = later[p[first[later]] == p[first[later] - 1] + 1]
        if cont.size:
            d = int(cont[0])
            j = d - int(np.searchsorted(row, row[d]))
            note(int(row[d]), f"its position_ids do not restart at column {int(start[d])}, where "
                              f"document {j} would begin")  # fmt: skip
    # Back to back, the documents cover columns [0, used) of each row; the rest is the tail.
    used = np.bincount(row, weights=length, minlength=len(ids)).astype(np.int64)
    tail_len = ids.lengths - used
    if np.any(tail_len):
        tail_row = np.repeat(np.arange(len(ids), dtype=np.int64), tail_len)
        tail_cum = np.zeros(tail_len.size + 1, dtype=np.int64)
        np.cumsum(tail_len, out=tail_cum[1:])
        outside = (np.repeat(offs[:-1] + used - tail_cum[:-1], tail_len)
                   + np.arange(int(tail_cum[-1]), dtype=np.int64))  # fmt: skip
        pad = ids.values[outside]
        ref = ids.values[offs[1:] - 1][tail_row]  # each row's last token: its padding value
        bad = np.flatnonzero(pad != ref)
        if bad.size:
            r = int(tail_row[bad[0]])
            note(r, f"column {int(outside[bad[0]] - offs[r])} after its documents holds "
                    f"{int(pad[bad[0]])}, not the padding {int(ref[bad[0]])} that ends the "
                    "row")  # fmt: skip
        mask = numeric_ragged(c.cols["attention_mask"], "attention_mask") if (
            "attention_mask" in c.cols) else None  # fmt: skip
        if mask is not None and mask[0].size == ids.values.size:
            on = np.flatnonzero(mask[0][outside] != 0)
            if on.size:
                r = int(tail_row[on[0]])
                note(r, f"its attention_mask is 1 at column {int(outside[on[0]] - offs[r])}, "
                        "after its documents")  # fmt: skip
    if problem is not None:
        r, what = problem
        raise ValueError(
            f"seq_lengths: example {r} has no seq_starts, so its documents are read back to back "
            f"from column 0, but {what}: the row has gaps between its documents (rows of "
            "pack_sequences with align > 1); pass their seq_starts column "
            "(pack_sequences(..., fields=(..., 'seq_starts')))"
        )


class PackedCollator:
    """Batches of packed rows (``pack_sequences`` output or TRL's ``pack_dataset``) for training.

    Input: a list of packed example dicts (or bare id rows), a ``pyarrow.RecordBatch`` /
    ``Table`` (``Dataset.with_format("arrow")``) or a dict of columns, in either layout:
    fixed-size rows (``pack_sequences(layout="padded")``: ``input_ids``, ``position_ids``,
    ``seq_lengths``) or rows of their used length (``layout="ragged"``, or TRL: ``input_ids``,
    ``seq_lengths``). Document boundaries come from ``seq_lengths`` at ``seq_starts`` when
    present; ``seq_lengths`` alone means back to back from column 0 (TRL's format), and is
    checked against what else the rows carry: their ``position_ids`` must restart at every
    document and count up inside it, the tokens after the documents must be one repeated
    padding value, a carried ``attention_mask`` 0 there; otherwise (rows with gaps, as
    ``pack_sequences(align > 1)`` makes) it is a ValueError asking for ``seq_starts``. Without
    ``seq_lengths``, documents come from the resets of ``position_ids``, else each row is one
    document (TRL's ``wrapped``). Tokens of a row outside every document are padding.

    Output (torch tensors, or numpy with ``return_tensors=False``): ``input_ids`` [B, L]
    (rows padded with ``pad_token_id`` to the longest row, rounded up to ``pad_to_multiple_of``);
    ``labels`` (the ids, or the rows' own ``labels``) with ``label_pad_token_id`` at the first
    token of every document and on padding, so nothing is predicted across a document boundary;
    ``position_ids`` restarting at ``position_ids_start`` per document (0 on padding). Then, by
    ``attention``:

    - ``"flash"`` (also ``"flash_attention_2"``/``"_3"``): transformers' padding-free kwargs
      ``cu_seq_lens_q``/``cu_seq_lens_k`` (int32 boundaries over the flattened ``B * L`` tokens;
      every document and every run of padding is one segment) and ``max_length_q``/``_k`` (int);
      no ``attention_mask``, which would make flash attention ignore them.
    - ``"sdpa"``: ``attention_mask`` bool [B, 1, L, L], block-diagonal causal (True = attend).
    - ``"eager"``: the same mask additive (0 or ``finfo(mask_dtype).min``, float32 by default).
    - ``"none"``: no attention fields.

    There is no default: a batch made for another implementation attends across documents with
    no error (``position_ids`` alone do not keep documents apart under sdpa/eager). Pass
    ``model=`` or ``config=`` (its ``attn_implementation`` is read: flash_attention_2/3, sdpa or
    eager; anything else is an error saying what to pass) or ``attention=``.

    ``mask="device"`` (sdpa/eager) returns ``seq_idx`` [B, L] int32 (-1 on padding) instead of
    the [B, 1, L, L] mask (134 MB bool / 537 MB float at 8 x 4096, built on the host and copied
    per batch); the model builds the mask on its own device after
    ``mixtape.attach_packed_mask(model)`` (or call ``mixtape.packed_attention_mask``). A model
    without that hook silently ignores ``seq_idx`` (transformers models accept unknown kwargs)
    and attends across documents, so ``mask="host"`` stays the default.

    ``padding_free=True`` drops all padding and returns [1, T] (documents back to back), as
    TRL's ``padding_free`` collator; with ``pad_to_multiple_of`` the row is padded to a multiple
    as TRL pads it (``pad_token_id``, labels ``label_pad_token_id``, position 0, each padding
    token its own ``cu_seq_lens`` segment). The rows' ``attention_mask``, ``position_ids``,
    ``seq_lengths``, ``seq_starts``, ``doc_ids``, ``doc_source_ids``, ``seq_idx`` and
    ``loss_mask`` are consumed; other fields follow the collators' one rule (``mixtape.collate``):
    per-token number columns laid out like ``input_ids`` (integers int64 padded with their
    ``pad_values`` entry, default 0; floats float32 padded with 0.0), per-example numbers
    stacked, the rest passed through.
    No Python loop per document or token: the rows become a pack plan that the fill kernel
    writes in one pass.

    Sources: rows holding documents of several sources carry ``doc_source_ids`` (a list per row,
    aligned with ``seq_lengths``, as ``pack_sequences`` writes from a source column); the output
    gets ``source_ids`` int64 shaped like ``input_ids``: every token its document's source id,
    -1 on padding (so ``loss[source_ids == s]`` is source s's loss). The ids are used as given
    (checked against ``source_names`` when it is given: ``0 <= id < len(source_names)``). Rows
    with a ``__source__`` (one source per row) need ``source_names`` (the mixture's names in
    order; the id is the name's index) and give the same per-token ``source_ids``; without it
    ``__source__`` is passed through as a list.

    With transformers' ``Trainer`` pass ``remove_unused_columns=False``: it would drop
    ``seq_lengths`` (not a model argument), leaving only ``position_ids`` resets, or nothing for
    TRL's rows, to find the documents by (and ``doc_source_ids`` / ``__source__`` with them).
    """

    def __init__(
        self,
        pad_token_id: int = 0,
        label_pad_token_id: int = -100,
        attention: str | None = None,
        return_tensors: ReturnTensors = True,
        pin_memory: bool = False,
        *,
        model: Any = None,
        config: Any = None,
        mask: str = "host",
        pad_to_multiple_of: int | None = None,
        padding_free: bool = False,
        position_ids_start: int = 0,
        mask_dtype: torch.dtype | None = None,
        pad_values: Mapping[str, int | float] | None = None,
        input_key: str = "input_ids",
        source_names: Sequence[str] | None = None,
    ) -> None:
        check_int("pad_token_id", pad_token_id)
        check_int("label_pad_token_id", label_pad_token_id)
        check_int("pad_to_multiple_of", pad_to_multiple_of, minimum=1, optional=True)
        check_int("position_ids_start", position_ids_start)
        attention = resolve_attention(attention, model, config)
        check_choice("mask", mask, MASK_PLACES)
        if mask == "device" and attention not in ("sdpa", "eager"):
            raise ValueError(f"mask='device' sends seq_idx for a mask built by the model; it "
                             f"needs attention 'sdpa' or 'eager', not {attention!r}")  # fmt: skip
        if mask_dtype is not None and (attention != "eager" or not mask_dtype.is_floating_point):
            raise ValueError(f"mask_dtype={mask_dtype} needs attention='eager' and a float dtype")
        self.pad_token_id = int(pad_token_id)
        self.label_pad_token_id = int(label_pad_token_id)
        self.attention = attention
        self.mask = mask
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_free = bool(padding_free)
        self.position_ids_start = int(position_ids_start)
        self.mask_dtype = mask_dtype
        self.pad_values = dict(DEFAULT_PAD_VALUES if pad_values is None else pad_values)
        self.input_key = input_key
        self._sources = SourceNames(source_names)
        self.source_names = self._sources.names
        self._out = Output(return_tensors, pin_memory)
        # sdpa / eager masks are block-causal with no window: a longer document is refused
        self.sliding_window = sliding_window(model, config) if attention in ("sdpa", "eager") \
            else None  # fmt: skip

    def _check_window(self, longest: int) -> None:
        if self.sliding_window is not None and longest > self.sliding_window:
            raise ValueError(
                f"a document of {longest} tokens is longer than the model's sliding window "
                f"({self.sliding_window}): the packed {self.attention} mask is block-causal with "
                "no window, so it would attend past it; use attention='flash' (the window goes "
                f"to the kernel) or documents of at most {self.sliding_window} tokens")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(pad_token_id={self.pad_token_id}, "
            f"attention={self.attention!r}, mask={self.mask!r}, padding_free={self.padding_free}, "
            f"pad_to_multiple_of={self.pad_to_multiple_of})"
        )

    def plan(self, batch: Any) -> PackPlan:
        """The rows of ``batch`` as a :class:`PackPlan` (one piece per document, doc = row)."""
        return self._plan(batch_columns(batch, self.input_key))[0]

    def _plan(self, c: Columns) -> tuple[PackPlan, Ragged, Int64Array | None]:
        key = self.input_key
        ids = as_ragged(field_of(c, key), key)
        if ids.values.size and int(ids.values.min()) < 0:
            pos = int(np.argmax(ids.values < 0))
            raise ValueError(
                f"{key}: example {example_of(ids.offsets, pos)} has a negative token id "
                f"({int(ids.values[pos])}); token ids must be >= 0"
            )
        row_offsets, row, start, length, entry = _row_documents(c, ids, key)
        longest = int(ids.lengths.max()) if len(ids) else 0
        width = padded_length(longest, None, self.pad_to_multiple_of)
        plan = PackPlan(
            capacity=width, strategy="packed_rows", row_offsets=row_offsets, doc=row,
            start=start, length=length, column=start, num_docs=len(ids),
            num_tokens=int(ids.values.size),
        )  # fmt: skip
        return plan, ids, entry

    def _piece_sources(self, c: Columns, plan: PackPlan,
                       entry: Int64Array | None) -> Int64Array | None:  # fmt: skip
        """The source id of every document (plan piece): from the rows' ``doc_source_ids``
        (aligned with ``seq_lengths``), or each row's ``__source__`` for all its documents."""
        row_src = self._sources.take(c)
        if DOC_SOURCE_IDS not in c.cols:
            return None if row_src is None else row_src[plan.doc]
        if row_src is not None:
            raise ValueError(f"rows carry both '__source__' and {DOC_SOURCE_IDS!r}: keep one (a "
                             f"row's {DOC_SOURCE_IDS!r} name the source of each document)")
        if entry is None:
            raise ValueError(f"{DOC_SOURCE_IDS}: the rows have no seq_lengths, so there are no "
                             "documents to align their source ids with")  # fmt: skip
        doc = as_ragged(c.cols[DOC_SOURCE_IDS], DOC_SOURCE_IDS)
        sl = as_ragged(c.cols["seq_lengths"], "seq_lengths")
        if not np.array_equal(doc.lengths, sl.lengths):
            i = int(np.flatnonzero(doc.lengths != sl.lengths)[0])
            raise ValueError(f"{DOC_SOURCE_IDS}: example {i} has {int(doc.lengths[i])} source ids "
                             f"but {int(sl.lengths[i])} seq_lengths")  # fmt: skip
        vals = self._sources.check_ids(doc.values, DOC_SOURCE_IDS, offsets=doc.offsets)
        return vals[entry]

    def __call__(self, batch: Any) -> dict[str, Any]:
        c = batch_columns(batch, self.input_key)
        plan, ids, entry = self._plan(c)
        piece_src = self._piece_sources(c, plan, entry)
        labels = None
        if "labels" in c.cols:
            labels = as_ragged(c.cols["labels"], "labels")
            check_same_lengths(labels, ids, "labels", self.input_key)
        tokens, rest = split_fields(c, ids.offsets, (self.input_key, *_PACKING_COLUMNS),
                                    self.pad_values, self.input_key)  # fmt: skip
        return self._collate(plan, ids, piece_src, labels, tokens, rest)

    def collate_pieces(self, values: Any, lengths: Int64Array, row_offsets: Int64Array,
                       sources: Any = None, *, max_row: int | None = None) -> dict[str, Any]:
        """The batch of rows given as pieces: ``values`` holds the pieces' tokens back to back,
        piece ``i`` has ``lengths[i]`` tokens, row ``r`` holds pieces ``row_offsets[r]:
        row_offsets[r + 1]`` (``sources``: each piece's source id). The same result as calling
        the collator on those rows with ``seq_lengths`` (and ``doc_source_ids``), without the
        parsing: the packing loader's path. ``max_row``: no row holds more tokens (as the
        loader's ``max_length``; checked), which spares a pass to find the width when
        ``pad_to_multiple_of`` is at least that."""
        if not self.padding_free:
            return self._pieces_padded(values, lengths, row_offsets, sources, max_row)
        ids = Ragged(np.asarray(values), np.zeros(lengths.size + 1, dtype=np.int64))
        np.cumsum(lengths, out=ids.offsets[1:])
        if ids.values.size != ids.offsets[-1]:
            raise ValueError(f"collate_pieces: {ids.values.size} values for pieces of "
                             f"{int(ids.offsets[-1])} tokens")  # fmt: skip
        if ids.values.size and int(ids.values.min()) < 0:
            pos = int(np.argmax(ids.values < 0))
            raise ValueError(f"{self.input_key}: piece {example_of(ids.offsets, pos)} has a "
                             f"negative token id ({int(ids.values[pos])}); token ids must be >= 0")
        row_tok = ids.offsets[row_offsets]
        piece_row = np.repeat(np.arange(row_offsets.size - 1, dtype=np.int64),
                              np.diff(row_offsets))  # fmt: skip
        column = ids.offsets[:-1] - row_tok[piece_row]
        longest = int(np.diff(row_tok).max()) if row_offsets.size > 1 else 0
        plan = PackPlan(
            capacity=padded_length(longest, None, self.pad_to_multiple_of),
            strategy="packed_rows", row_offsets=np.asarray(row_offsets, dtype=np.int64),
            doc=np.arange(lengths.size, dtype=np.int64), start=np.zeros(lengths.size, np.int64),
            length=np.asarray(lengths, dtype=np.int64), column=column, num_docs=lengths.size,
            num_tokens=int(ids.values.size),
        )  # fmt: skip
        piece_src = token_src = None
        if sources is not None:
            piece_src = self._sources.check_ids(np.asarray(sources), DOC_SOURCE_IDS)
            token_src = np.repeat(piece_src, lengths)  # piece i is ids.values[offsets[i]:...]
        return self._collate(plan, ids, piece_src, None, [], {}, token_src)

    def _pieces_padded(self, values: Any, lengths: Any, row_offsets: Any, sources: Any,
                       max_row: int | None) -> dict[str, Any]:  # fmt: skip
        """collate_pieces for rows padded to a width: every field in one kernel pass."""
        lengths = np.asarray(lengths, dtype=np.int64)
        row_offsets = np.asarray(row_offsets, dtype=np.int64)
        m = self.pad_to_multiple_of
        if m is not None and max_row is not None and max_row <= m and lengths.size:
            width = m  # some row holds a token, none more than max_row <= m (the kernel checks)
        else:
            ends = np.zeros(lengths.size + 1, dtype=np.int64)
            np.cumsum(lengths, out=ends[1:])
            longest = int(np.diff(ends[row_offsets]).max()) if row_offsets.size > 1 else 0
            width = padded_length(longest, None, m)
        shape = (row_offsets.size - 1, width)
        piece_src = None
        if sources is not None:
            piece_src = self._sources.check_ids(np.asarray(sources), DOC_SOURCE_IDS)
        arena = self._out.arena(3 + (piece_src is not None), shape)
        out = {"input_ids": arena.take(), "labels": arena.take(), "position_ids": arena.take()}
        fields = ["input_ids", "labels", "position_ids"]
        if piece_src is not None:
            out["tags"] = arena.take()
            fields.append("tags")
        if self.attention in ("sdpa", "eager"):
            if self.sliding_window is not None and lengths.size:
                self._check_window(int(lengths.max()))
            out["seq_idx"] = (self._out.empty(shape, np.int32) if self.mask == "device"
                              else np.empty(shape, np.int32))  # fmt: skip
            fields.append("seq_idx")
        elif self.attention == "flash":
            fields.append("cu_seqlens")
        got = pack_rows(values, lengths, row_offsets, piece_src, capacity=shape[1],
                        pad_value=self.pad_token_id, label_pad_value=self.label_pad_token_id,
                        position_start=self.position_ids_start, tag_pad=NO_SOURCE,
                        fields=fields, out=out, name=self.input_key)  # fmt: skip
        wrap = self._out.wrap
        result: dict[str, Any] = {self.input_key: wrap(out["input_ids"]),
                                  "labels": wrap(out["labels"]),
                                  "position_ids": wrap(out["position_ids"])}  # fmt: skip
        if self.attention == "flash":
            result["cu_seq_lens_q"] = result["cu_seq_lens_k"] = wrap(got["cu_seqlens"])
            result["max_length_q"] = result["max_length_k"] = got["max_seqlen"]
        elif self.attention != "none":
            if self.mask == "device":
                result["seq_idx"] = wrap(out["seq_idx"])
            else:
                result["attention_mask"] = self._mask(out["seq_idx"])
        if piece_src is not None:
            result[SOURCE_IDS] = wrap(out["tags"])
        return result

    def _collate(self, plan: PackPlan, ids: Ragged, piece_src: Int64Array | None,
                 labels: Ragged | None, tokens: Sequence[TokenColumn],
                 rest: Mapping[str, Any],
                 token_src: Int64Array | None = None) -> dict[str, Any]:  # fmt: skip
        """The batch of ``plan`` over ``ids`` (+ labels, other token and per-example fields).
        ``token_src``: each token's source id, aligned with ``ids.values`` (filled like the ids,
        instead of looked up per token through ``seq_idx``)."""
        if self.padding_free:  # documents back to back, then padding to the multiple (as TRL)
            used = plan.packed_tokens
            shape = (1, padded_length(used, None, self.pad_to_multiple_of))
        else:
            used = plan.capacity
            shape = (plan.num_rows, plan.capacity)
        arena = self._out.arena(3 + (piece_src is not None), shape)
        full = {"input_ids": arena.take(), "labels": arena.take(), "position_ids": arena.take()}
        fields = ["input_ids", "position_ids"] + (["labels"] if labels is None else [])
        if self.sliding_window is not None and plan.num_pieces:
            self._check_window(int(plan.length.max()))
        if self.attention in ("sdpa", "eager") or (piece_src is not None and token_src is None):
            fields.append("seq_idx")
        if self.attention == "flash":
            fields.append("cu_seqlens")
        tail = shape[1] - used
        out = {k: v[:, :used] for k, v in full.items()}
        seq_idx = None
        if "seq_idx" in fields:  # the device mask's input is returned: allocate it as output
            seq_idx = (self._out.empty(shape, np.int32) if self.mask == "device"
                       else np.empty(shape, np.int32))  # fmt: skip
            out["seq_idx"] = seq_idx[:, :used]
        got = self._fill(plan, ids.values, ids.offsets, fields, out, self.pad_token_id)
        if labels is not None:
            self._fill(plan, labels.values, labels.offsets, ("labels",),
                       {"labels": out["labels"]}, 0)  # fmt: skip
        if tail:
            full["input_ids"][:, used:] = self.pad_token_id
            full["labels"][:, used:] = self.label_pad_token_id
            full["position_ids"][:, used:] = 0
            if seq_idx is not None:
                seq_idx[:, used:] = -1
        result: dict[str, Any] = {self.input_key: self._out.wrap(full["input_ids"]),
                                  "labels": self._out.wrap(full["labels"]),
                                  "position_ids": self._out.wrap(full["position_ids"])}  # fmt: skip
        if self.attention == "flash":
            cu = got["cu_seqlens"]
            if tail:  # each padding token its own segment, as TRL's position-0 padding gives
                pad_ends = np.arange(used + 1, shape[1] + 1, dtype=cu.dtype)
                cu = np.concatenate([cu, pad_ends])
            cu_t = self._out.wrap(cu)
            result["cu_seq_lens_q"] = result["cu_seq_lens_k"] = cu_t
            result["max_length_q"] = result["max_length_k"] = (
                int(np.diff(cu).max()) if cu.size > 1 else 0
            )
        elif self.attention != "none":
            assert seq_idx is not None
            if self.mask == "device":
                result["seq_idx"] = self._out.wrap(seq_idx)
            else:
                result["attention_mask"] = self._mask(seq_idx)
        if piece_src is not None:  # each token its document's source
            src = arena.take()  # the fourth int64 slot of the batch's one block
            if token_src is not None:  # laid out as the ids are
                self._fill(plan, token_src, ids.offsets, ("input_ids",),
                           {"input_ids": src[:, :used]}, NO_SOURCE)  # fmt: skip
                src[:, used:] = NO_SOURCE
            else:  # a lookup by seq_idx
                assert seq_idx is not None
                lookup = np.empty(piece_src.size + 1, dtype=np.int64)
                lookup[:-1] = piece_src
                lookup[-1] = NO_SOURCE  # seq_idx -1 (padding) reads the last entry
                np.take(lookup, seq_idx, out=src)
            result[SOURCE_IDS] = self._out.wrap(src)
        index = None
        for col in tokens:
            if col.is_float:  # the ids' layout applied to floats: fill flat positions, gather
                if index is None:
                    index = self._layout_index(plan, ids, shape, used)
                result[col.name] = self._out.wrap(gather_layout(index, col))
            else:
                result[col.name] = self._out.wrap(self._int_column(plan, col, shape, used))
        for name, other in rest.items():
            result[name] = stack_other(other, name, self._out.tensors)
        return result

    def _int_column(self, plan: PackPlan, col: TokenColumn, shape: tuple[int, int],
                    used: int) -> npt.NDArray[np.int64]:  # fmt: skip
        buf: npt.NDArray[np.int64] = self._out.empty(shape)
        self._fill(plan, col.values, col.offsets, ("input_ids",), {"input_ids": buf[:, :used]},
                   int(col.pad))  # fmt: skip
        buf[:, used:] = int(col.pad)
        return buf

    def _layout_index(self, plan: PackPlan, ids: Ragged, shape: tuple[int, int],
                      used: int) -> npt.NDArray[np.int64]:  # fmt: skip
        """Flat input position of every output cell (-1 on padding), by the same fill."""
        index = np.full(shape, -1, dtype=np.int64)
        flat = np.arange(ids.values.size, dtype=np.int64)
        self._fill(plan, flat, ids.offsets, ("input_ids",), {"input_ids": index[:, :used]}, -1)
        return index

    def _fill(self, plan: PackPlan, values: Any, offsets: Any, fields: Sequence[str],
              out: dict[str, Any], pad_value: int) -> dict[str, Any]:  # fmt: skip
        """One fill of ``values`` (ids, labels or another token column) along ``plan``."""
        return pack_fill(
            plan, values, offsets, layout="flat" if self.padding_free else "padded",
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
    attention: str | None = None,
    return_tensors: ReturnTensors = True,
    pin_memory: bool = False,
    **kwargs: Any,
) -> PackedCollator:
    """Collator of packed rows into training batches (see :class:`PackedCollator`); picklable.

    ``attention`` (or ``model=`` / ``config=`` to read it from) is required: see PackedCollator.
    """
    return PackedCollator(pad_token_id, label_pad_token_id, attention, return_tensors,
                          pin_memory, **kwargs)  # fmt: skip
