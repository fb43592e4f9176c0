"""Batches of packed rows (``pack_sequences`` or TRL's ``pack_dataset``) for training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from mixtape.collate.output import Output, ReturnTensors, stack_other
from mixtape.ops import (
    Int64Array,
    PackPlan,
    block_causal_mask,
    check_choice,
    pack_fill,
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
    is_sequence_column,
)
from mixtape.validation import check_int

if TYPE_CHECKING:
    import torch


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


def _row_documents(c: Columns, ids: Ragged, key: str) -> tuple[Int64Array, ...]:
    """Documents of every row as (row_offsets, row, start, length), vectorised over the batch.

    From ``seq_lengths`` (documents back to back from column 0, or at ``seq_starts``), else from
    the resets of ``position_ids`` (a token whose position is not the previous one + 1 starts a
    document), else one document per row. Zero-length documents are skipped.
    """
    rows = len(ids)
    row_len = ids.lengths
    if "seq_lengths" in c.cols:
        sl = as_ragged(c.cols["seq_lengths"], "seq_lengths")
        counts = sl.lengths
        row = np.repeat(np.arange(rows, dtype=np.int64), counts)
        length = sl.values.astype(np.int64)
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
        check_int("pad_token_id", pad_token_id)
        check_int("label_pad_token_id", label_pad_token_id)
        check_int("pad_to_multiple_of", pad_to_multiple_of, minimum=1, optional=True)
        check_int("position_ids_start", position_ids_start)
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
        self._out = Output(return_tensors, pin_memory)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(pad_token_id={self.pad_token_id}, "
            f"attention={self.attention!r}, padding_free={self.padding_free}, "
            f"pad_to_multiple_of={self.pad_to_multiple_of})"
        )

    def plan(self, batch: Any) -> PackPlan:
        """The rows of ``batch`` as a :class:`PackPlan` (one piece per document, doc = row)."""
        return self._plan(batch_columns(batch))[0]

    def _plan(self, c: Columns) -> tuple[PackPlan, Ragged]:
        key = self.input_key
        ids = as_ragged(field_of(c, key), key)
        if ids.values.size and int(ids.values.min()) < 0:
            pos = int(np.argmax(ids.values < 0))
            raise ValueError(
                f"{key}: example {example_of(ids.offsets, pos)} has a negative token id "
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
        c = batch_columns(batch)
        plan, ids = self._plan(c)
        shape = (1, plan.packed_tokens) if self.padding_free else (plan.num_rows, plan.capacity)
        labels = None
        if "labels" in c.cols:
            labels = as_ragged(c.cols["labels"], "labels")
            check_same_lengths(labels, ids, "labels", self.input_key)
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
            if is_sequence_column(col):
                r = as_ragged(col, name)
                check_same_lengths(r, ids, name, self.input_key)
                buf = self._out.empty(shape)
                self._fill(plan, r, ("input_ids",), {"input_ids": buf}, 0)
                result[name] = self._out.wrap(buf)
            else:
                result[name] = stack_other(col, name, self._out.tensors)
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
