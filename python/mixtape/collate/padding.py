"""Padding collators (``DataCollatorWithPadding``, causal LM, seq2seq) on the one-pass pad kernel.

Outputs are written once, into buffers we allocate (optionally pinned) and hand to torch with
``torch.from_numpy``: no copy after the kernel.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from mixtape import ops
from mixtape.collate.output import (
    DEFAULT_PAD_VALUES,
    LABEL_ALIASES,
    Arena,
    Output,
    all_none,
    gather_layout,
    is_float_rows,
    split_fields,
    stack_labels,
    stack_other,
)
from mixtape.collate.sources import SOURCE_IDS, SourceNames
from mixtape.ragged import (
    Columns,
    Ragged,
    as_ragged,
    batch_columns,
    check_same_lengths,
    field_of,
    is_sequence_column,
    numeric_ragged,
)
from mixtape.validation import check_int

Side = ops.Side
Padding = Literal["longest", "max_length"]
ReturnTensors = bool | Literal["pt", "np"]


# --------------------------------------------------------------------------------------------
# Padding collators
# --------------------------------------------------------------------------------------------


def has_zero(col: Any) -> bool:
    """Whether a column of per-token numbers (a mask) holds a 0; False for other columns.

    Lists of Python lists (the usual ``attention_mask`` of ones) are not converted: ``count(1)``
    finds the cached int 1 by identity, so a row of ones costs a pointer scan.
    """
    if isinstance(col, list) and all(type(r) is list for r in col):
        return not all(r.count(1) == len(r) or all(r) for r in col)
    got = numeric_ragged(col, "attention_mask") if is_sequence_column(col) else None
    return got is not None and not bool(got[0].all())


class PaddingCollator:
    """Pads ``input_ids`` (+ ``attention_mask``, ragged ``labels``) of a batch in one kernel pass.

    Like transformers' ``DataCollatorWithPadding``: ids padded with ``pad_token_id``, a mask of 1
    over each example's tokens (from lengths), integer token ``labels`` padded with
    ``label_pad_token_id``; a scalar ``label``/``label_ids``, or a float row of class scores
    (multi-label), is stacked as ``labels`` (all None: ``labels`` is None). Other fields follow
    the collators' one rule (``mixtape.collate``): per-token number columns are padded like the
    ids, integers as int64 with their ``pad_values`` entry (default ``token_type_ids`` → 0,
    ``special_tokens_mask`` → 1, others 0), floats as float32 with 0.0; per-example numbers and
    equal-shape arrays are stacked; anything else is passed through. A batch may also be a list
    of bare id sequences (read as ``input_key``). ``max_length`` truncates (at ``truncation_side``),
    unlike transformers. The examples' own ``attention_mask`` is honoured: where it holds 0 (e.g.
    examples tokenized with ``padding="max_length"``) the output mask is 0 too; a mask of all ones
    is not read again (the mask comes from lengths). ``keep_attention_mask=True`` pads the given
    mask as is (keeping values other than 0/1).

    ``source_names`` (the mixture's source names, in mixture order) turns each example's
    ``__source__`` (a name, or an id already) into ``source_ids`` int64 [B], the index of the name
    in ``source_names`` (an unknown name is a ValueError); without it ``__source__`` is passed
    through as a list and there are no ids (never numbered by appearance in a batch).

    ``pin_memory=True`` allocates outputs in pinned memory when CUDA is available; otherwise (no
    GPU, or a forked worker that cannot pin) it warns once and returns ordinary memory.
    """

    def __init__(
        self,
        pad_token_id: int,
        label_pad_token_id: int = -100,
        padding_side: Side = "right",
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        return_tensors: ReturnTensors = True,
        pin_memory: bool = False,
        truncation_side: Side = "right",
        *,
        padding: Padding = "longest",
        return_attention_mask: bool = True,
        keep_attention_mask: bool = False,
        pad_values: Mapping[str, int | float] | None = None,
        input_key: str = "input_ids",
        source_names: Sequence[str] | None = None,
    ) -> None:
        check_int("pad_token_id", pad_token_id)
        check_int("label_pad_token_id", label_pad_token_id)
        check_int("max_length", max_length, minimum=1, optional=True)
        check_int("pad_to_multiple_of", pad_to_multiple_of, minimum=1, optional=True)
        ops.is_left("padding_side", padding_side)
        ops.is_left("truncation_side", truncation_side)
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        self.pad_token_id = int(pad_token_id)
        self.label_pad_token_id = int(label_pad_token_id)
        self.padding_side: Side = padding_side
        self.truncation_side: Side = truncation_side
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding: Padding = padding
        self.return_attention_mask = return_attention_mask
        self.keep_attention_mask = keep_attention_mask
        self.pad_values = dict(DEFAULT_PAD_VALUES if pad_values is None else pad_values)
        self.input_key = input_key
        self._sources = SourceNames(source_names)
        self.source_names = self._sources.names
        self._out = Output(return_tensors, pin_memory)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(pad_token_id={self.pad_token_id}, "
            f"padding_side={self.padding_side!r}, max_length={self.max_length}, "
            f"pad_to_multiple_of={self.pad_to_multiple_of})"
        )

    def row_length(self, lengths: npt.NDArray[np.int64], max_length: int | None = None) -> int:
        """Columns of the padded batch for sequences of these lengths (and this max_length)."""
        if self.padding == "max_length" and max_length is not None:
            return ops.padded_length(max_length, None, self.pad_to_multiple_of)
        longest = int(lengths.max()) if lengths.size else 0
        return ops.padded_length(longest, max_length, self.pad_to_multiple_of)

    def _pad(
        self,
        ids: Ragged,
        labels: Ragged | None,
        *,
        length: int,
        name: str,
        pad_value: int,
        mask: bool,
        max_length: int | None = None,
        return_labels: bool = False,
        shift_labels: bool = False,
        check_ids: bool = True,
        arena: Arena | None = None,
    ) -> dict[str, Any]:
        """One kernel call writing ids (+ mask, labels) into buffers from ``arena`` (or fresh)."""
        n = len(ids)
        values = ids.values
        lab_values = None if labels is None else labels.values
        if lab_values is not None and lab_values.dtype != values.dtype:
            values, lab_values = values.astype(np.int64), lab_values.astype(np.int64)
        want_labels = return_labels or labels is not None
        if arena is None:
            arena = self._out.arena(1 + mask + want_labels, (n, length))
        out: dict[str, Any] = {"input_ids": arena.take()}
        if mask:
            out["attention_mask"] = arena.take()
        if want_labels:
            out["labels"] = arena.take()
        return ops.pad(
            values, ids.offsets,
            labels=lab_values, label_offsets=None if labels is None else labels.offsets,
            length=length, max_length=max_length, padding_side=self.padding_side,
            truncation_side=self.truncation_side,
            pad_value=pad_value, label_pad_value=self.label_pad_token_id,
            return_attention_mask=mask, return_labels=want_labels, shift_labels=shift_labels,
            out=out, check_ids=check_ids, name=name,
        )  # fmt: skip

    def _labels(self, c: Columns) -> tuple[str | None, Any]:
        """The label field (``labels``, ``label`` or ``label_ids``) and its column, if any."""
        present = [k for k in LABEL_ALIASES if k in c.cols]
        if len(present) > 1:
            raise ValueError(f"batch has several label fields {present}: keep one")
        return (present[0], c.cols[present[0]]) if present else (None, None)

    def _collate_inputs(
        self, c: Columns, labels: Ragged | None, *, return_labels: bool, shift_labels: bool,
        skip: Iterable[str] = (), mask_labels: bool = False,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Pad ids, mask, labels and the per-token fields: the numpy results, and the fields
        neither padded nor in ``skip`` (for :meth:`_finish` to stack or pass through).

        ``mask_labels``: labels become ``label_pad_token_id`` where a given mask holds 0.
        """
        sources = self._sources.take(c)
        ids = as_ragged(field_of(c, self.input_key), self.input_key)
        if labels is not None:
            check_same_lengths(labels, ids, "labels", self.input_key)
        length = self.row_length(ids.lengths, self.max_length)
        given = self._given_mask(c, ids, mask_labels)
        owned = {self.input_key, "attention_mask", *skip}
        tokens, rest = split_fields(c, ids.offsets, owned, self.pad_values, self.input_key)
        ints = [t for t in tokens if not t.is_float]
        want_labels = return_labels or labels is not None
        slots = 1 + (self.return_attention_mask or given is not None) + want_labels + len(ints)
        arena = self._out.arena(slots, (len(ids), length))
        res = self._pad(
            ids, labels, length=length, max_length=self.max_length, name=self.input_key,
            pad_value=self.pad_token_id, mask=self.return_attention_mask and given is None,
            return_labels=return_labels,
            shift_labels=shift_labels, arena=arena,
        )  # fmt: skip
        out: dict[str, Any] = {self.input_key: res["input_ids"]}
        if given is not None:
            mask, zeros = given
            padded = self._pad_column(mask.values, mask.offsets, "attention_mask", 0, length,
                                      arena)  # fmt: skip
            if self.return_attention_mask:
                out["attention_mask"] = padded
            if zeros and mask_labels and "labels" in res:
                self._mask_labels(res["labels"], padded, shift_labels)
        elif "attention_mask" in res:
            out["attention_mask"] = res["attention_mask"]
        index = None
        for col in tokens:
            if col.is_float:  # the ids' layout (side, truncation) applied to any dtype
                if index is None:
                    index = self._index_layout(ids, length)
                out[col.name] = gather_layout(index, col)
            else:
                out[col.name] = self._pad_column(col.values, col.offsets, col.name,
                                                 int(col.pad), length, arena)  # fmt: skip
        if "labels" in res:
            out["labels"] = res["labels"]
        if sources is not None:
            out[SOURCE_IDS] = sources
        return out, rest

    def _given_mask(self, c: Columns, ids: Ragged, mask_labels: bool) -> tuple[Ragged, bool] | None:
        """The examples' ``attention_mask`` to pad (and whether it holds a 0), or None to build
        the mask from lengths: when it is not kept and holds no 0 (checked cheaply), or absent."""
        col = c.cols.get("attention_mask")
        if col is None:
            return None
        if self.keep_attention_mask and self.return_attention_mask:
            mask = as_ragged(col, "attention_mask")
            check_same_lengths(mask, ids, "attention_mask", self.input_key)
            return mask, bool(mask_labels and not mask.values.all())
        if not (self.return_attention_mask or mask_labels) or not has_zero(col):
            return None  # the fast path: a mask of ones is the mask from lengths
        got = numeric_ragged(col, "attention_mask")
        if got is None:  # not numbers (a 0 among other objects): ignored, as before
            return None
        values, offsets = got
        mask = Ragged((values != 0).astype(np.int64), offsets)
        check_same_lengths(mask, ids, "attention_mask", self.input_key)
        return mask, True

    def _mask_labels(
        self, labels: npt.NDArray[np.int64], mask: npt.NDArray[np.int64], shifted: bool
    ) -> None:
        """Labels → ``label_pad_token_id`` where ``mask`` is 0 (and, shifted, where the next
        token's mask is 0: that token is the label)."""
        off = mask == 0
        if shifted and mask.shape[1] > 1:
            off[:, :-1] |= off[:, 1:]
        np.putmask(labels, off, self.label_pad_token_id)

    def _pad_column(
        self, values: Any, offsets: Any, key: str, value: int, length: int, arena: Arena
    ) -> Any:
        r = Ragged(np.ascontiguousarray(values, dtype=np.int64), offsets)
        res = self._pad(r, None, length=length, max_length=self.max_length, name=key,
                        pad_value=value, mask=False, check_ids=False, arena=arena)  # fmt: skip
        return res["input_ids"]

    def _index_layout(self, ids: Ragged, length: int) -> npt.NDArray[np.int64]:
        """Flat position of every cell of the padded ids (-1 on padding), by the same kernel."""
        flat = Ragged(np.arange(ids.values.size, dtype=np.int64), ids.offsets)
        got: npt.NDArray[np.int64] = self._pad(
            flat, None, length=length, max_length=self.max_length, name="index", pad_value=-1,
            mask=False, check_ids=False,
        )["input_ids"]  # fmt: skip
        return got

    def _finish(self, out: dict[str, Any], rest: dict[str, Any]) -> dict[str, Any]:
        """Wrap padded numpy buffers as tensors, then stack / pass through the other fields."""
        result = {k: self._out.wrap(v) for k, v in out.items()}
        for key, col in rest.items():
            result[key] = stack_other(col, key, self._out.tensors)
        return result

    def __call__(self, batch: Any) -> dict[str, Any]:
        c = batch_columns(batch, self.input_key)
        label_key, label_col = self._labels(c)
        labels = None
        if (label_key is not None and is_sequence_column(label_col)
                and not is_float_rows(label_col)):  # fmt: skip
            labels = as_ragged(label_col, label_key)  # token labels: padded like the ids
        out, rest = self._collate_inputs(c, labels, return_labels=False, shift_labels=False,
                                         skip={label_key} if label_key else ())  # fmt: skip
        out_t = self._finish(out, rest)
        if label_key is not None and labels is None:  # one label (or score row) per example
            out_t["labels"] = stack_labels(label_col, label_key, self._out.tensors)
        return out_t


class CausalLMCollator(PaddingCollator):
    """Causal-LM batches: labels are the ids (or the examples' own ``labels``), −100 on padding.

    Padding is found by length and by the examples' own ``attention_mask`` (labels are −100 where
    it holds 0), never by comparing to ``pad_token_id``, so with pad == eos the real EOS tokens
    keep their labels (transformers' ``DataCollatorForLanguageModeling(mlm=False)`` masks every
    token equal to the pad id). ``shift_labels=True`` stores at position k the label of token
    k + 1 (the last token of each example, and a token whose next token is masked, get −100),
    for models that do not shift.
    """

    def __init__(self, pad_token_id: int, shift_labels: bool = False, **kwargs: Any) -> None:
        super().__init__(pad_token_id, **kwargs)
        self.shift_labels = shift_labels

    def __call__(self, batch: Any) -> dict[str, Any]:
        c = batch_columns(batch, self.input_key)
        labels = None
        if "labels" in c.cols:
            labels = as_ragged(c.cols["labels"], "labels")
        out, rest = self._collate_inputs(c, labels, return_labels=True,
                                         shift_labels=self.shift_labels, skip=("labels",),
                                         mask_labels=True)  # fmt: skip
        return self._finish(out, rest)


class Seq2SeqCollator(PaddingCollator):
    """Encoder-decoder batches: encoder ids + mask; ``labels`` padded on their own with −100.

    With ``decoder_start_token_id``, also ``decoder_input_ids``: the padded labels shifted right
    by one with the start token in front and −100 replaced by ``pad_token_id`` (what transformers'
    ``shift_tokens_right`` / ``prepare_decoder_input_ids_from_labels`` compute). The labels may
    be named ``label`` (output as ``labels``); labels None in every example give ``labels`` None
    and no ``decoder_input_ids``, as ``DataCollatorForSeq2Seq``. Labels are cut only to
    ``max_label_length`` (at ``truncation_side``) when given, never to the encoder's
    ``max_length``; with ``padding="max_length"`` they are padded to ``max_label_length`` (or to
    ``max_length``, or the longest label when longer, as ``DataCollatorForSeq2Seq`` pads them).
    """

    def __init__(
        self,
        pad_token_id: int,
        decoder_start_token_id: int | None = None,
        label_pad_token_id: int = -100,
        *,
        max_label_length: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(pad_token_id, label_pad_token_id, **kwargs)
        check_int("decoder_start_token_id", decoder_start_token_id, optional=True)
        check_int("max_label_length", max_label_length, minimum=1, optional=True)
        self.decoder_start_token_id = decoder_start_token_id
        self.max_label_length = max_label_length

    def __call__(self, batch: Any) -> dict[str, Any]:
        c = batch_columns(batch, self.input_key)
        label_key, label_col = self._labels(c)  # "label" too, as DataCollatorForSeq2Seq reads it
        out, rest = self._collate_inputs(c, None, return_labels=False, shift_labels=False,
                                         skip={label_key} if label_key else ())  # fmt: skip
        unlabelled = label_key is not None and all_none(label_col)
        if label_key is not None and not unlabelled:
            labels = as_ragged(label_col, label_key)
            max_len = self.max_label_length  # the only cut: never the encoder's max_length
            length = self.label_row_length(labels.lengths)
            start = self.decoder_start_token_id
            want_dec = start is not None
            arena = self._out.arena(1 + want_dec, (len(labels), length))
            lab = self._pad(
                labels, None, length=length, max_length=max_len, name="labels",
                pad_value=self.label_pad_token_id, mask=False, check_ids=False, arena=arena,
            )["input_ids"]  # fmt: skip
            out["labels"] = lab
            if start is not None:
                out["decoder_input_ids"] = self._shift_right(lab, start, arena.take())
        result = self._finish(out, rest)
        if unlabelled:  # every example's labels are None (a test split): labels=None, as HF
            result["labels"] = None
        return result

    def label_row_length(self, lengths: npt.NDArray[np.int64]) -> int:
        """Columns of the padded labels: the longest label (cut to ``max_label_length``), or with
        ``padding="max_length"`` ``max_label_length`` (else ``max_length``, or the longest label
        when longer), rounded up to ``pad_to_multiple_of``."""
        if self.max_label_length is not None:
            return self.row_length(lengths, self.max_label_length)
        longest = int(lengths.max()) if lengths.size else 0
        if self.padding == "max_length" and self.max_length is not None:
            longest = max(longest, self.max_length)
        return ops.padded_length(longest, None, self.pad_to_multiple_of)

    def _shift_right(
        self, labels: npt.NDArray[np.int64], start: int, dec: npt.NDArray[np.int64]
    ) -> Any:
        """Labels shifted right after ``start``, -100 → pad (transformers' shift_tokens_right)."""
        if labels.shape[1]:
            dec[:, 0] = start
            dec[:, 1:] = labels[:, :-1]
            np.putmask(dec, dec == -100, self.pad_token_id)
        return dec



def create_collate_fn(
    pad_token_id: int,
    label_pad_token_id: int = -100,
    padding_side: Side = "right",
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
    return_tensors: ReturnTensors = True,
    pin_memory: bool = False,
    truncation_side: Side = "right",
    **kwargs: Any,
) -> PaddingCollator:
    """A picklable padding collator (``DataCollatorWithPadding`` semantics); see PaddingCollator."""
    return PaddingCollator(
        pad_token_id, label_pad_token_id, padding_side, max_length, pad_to_multiple_of,
        return_tensors, pin_memory, truncation_side, **kwargs,
    )  # fmt: skip


def create_causal_lm_collate(
    pad_token_id: int, shift_labels: bool = False, **kwargs: Any
) -> CausalLMCollator:
    """Causal-LM collator: labels from the ids, −100 on padding; see CausalLMCollator."""
    return CausalLMCollator(pad_token_id, shift_labels=shift_labels, **kwargs)


def create_seq2seq_collate(
    pad_token_id: int,
    decoder_start_token_id: int | None = None,
    label_pad_token_id: int = -100,
    **kwargs: Any,
) -> Seq2SeqCollator:
    """Encoder-decoder collator (``DataCollatorForSeq2Seq`` semantics); see Seq2SeqCollator."""
    return Seq2SeqCollator(pad_token_id, decoder_start_token_id, label_pad_token_id, **kwargs)
