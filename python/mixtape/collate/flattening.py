"""Padding-free batches in the format of transformers' ``DataCollatorWithFlattening``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mixtape.collate.output import (
    DEFAULT_PAD_VALUES,
    Output,
    ReturnTensors,
    split_fields,
    stack_other,
)
from mixtape.collate.sources import SOURCE_IDS, SourceNames
from mixtape.ragged import (
    as_ragged,
    batch_columns,
    check_same_lengths,
    example_of,
    field_of,
)
from mixtape.validation import check_int

# --------------------------------------------------------------------------------------------
# Padding-free flattening
# --------------------------------------------------------------------------------------------


class FlatteningCollator:
    """Padding-free batches in the exact format of transformers' ``DataCollatorWithFlattening``.

    All examples concatenated into ``input_ids`` [1, T] (int64); ``labels`` [1, T] (the examples'
    ``labels`` or the ids) with ``separator_id`` at each document start; ``position_ids`` [1, T]
    restarting at ``position_ids_start``; optionally ``seq_idx`` [1, T] (int32) and the flash
    attention kwargs ``cu_seq_lens_q/k`` (int32, n + 1) and ``max_length_q/k`` (Python ints).
    Vectorised: no Python loop per sequence. The examples' ``attention_mask`` is dropped (there
    is no padding). Other fields follow the collators' one rule (``mixtape.collate``): per-token
    number columns are flattened to [1, T] (integers int64, floats float32), per-example numbers
    stacked, the rest passed through (transformers drops them). A batch may also be a list of
    bare id sequences (read as ``input_key``). With ``source_names`` (the mixture's names, in
    order), each example's ``__source__`` becomes ``source_ids`` [1, T] int64: every token carries
    its example's source id (the name's index in ``source_names``); without it ``__source__`` is
    passed through as a list.
    """

    def __init__(
        self,
        return_position_ids: bool = True,
        separator_id: int = -100,
        return_flash_attn_kwargs: bool = False,
        return_seq_idx: bool = False,
        position_ids_start: int = 0,
        return_tensors: ReturnTensors = True,
        pin_memory: bool = False,
        *,
        input_key: str = "input_ids",
        source_names: Sequence[str] | None = None,
    ) -> None:
        check_int("separator_id", separator_id)
        check_int("position_ids_start", position_ids_start)
        self.return_position_ids = return_position_ids
        self.separator_id = int(separator_id)
        self.return_flash_attn_kwargs = return_flash_attn_kwargs
        self.return_seq_idx = return_seq_idx
        self.position_ids_start = int(position_ids_start)
        self.input_key = input_key
        self._sources = SourceNames(source_names)
        self.source_names = self._sources.names
        self._out = Output(return_tensors, pin_memory)

    def __call__(self, batch: Any) -> dict[str, Any]:
        c = batch_columns(batch, self.input_key)
        sources = self._sources.take(c)
        ids = as_ragged(field_of(c, self.input_key), self.input_key)
        labels = None
        if "labels" in c.cols:
            labels = as_ragged(c.cols["labels"], "labels")
            check_same_lengths(labels, ids, "labels", self.input_key)
        n, total = len(ids), int(ids.values.size)
        lengths = ids.lengths
        starts = ids.offsets[:-1]
        if total and int(ids.values.min()) < 0:
            pos = int(np.flatnonzero(ids.values < 0)[0])
            raise ValueError(
                f"{self.input_key}: example {example_of(ids.offsets, pos)} has a negative "
                f"token id ({int(ids.values[pos])}); token ids must be >= 0"
            )
        out: dict[str, Any] = {}
        arena = self._out.arena(2 + self.return_position_ids, (1, total))
        flat = arena.take()
        np.copyto(flat[0], ids.values)
        out[self.input_key] = flat
        lab = arena.take()
        np.copyto(lab[0], ids.values if labels is None else labels.values)
        lab[0, starts[lengths > 0]] = self.separator_id
        out["labels"] = lab
        if self.return_position_ids:
            pos_ids = arena.take()
            first = np.repeat(starts - self.position_ids_start, lengths)
            np.subtract(np.arange(total, dtype=np.int64), first, out=pos_ids[0])
            out["position_ids"] = pos_ids
        if self.return_seq_idx:
            seq = self._out.empty((1, total), np.int32)
            seq[0] = np.repeat(np.arange(n, dtype=np.int32), lengths)
            out["seq_idx"] = seq
        if sources is not None:  # each token its example's source (no padding here)
            src = self._out.empty((1, total), np.int64)
            src[0] = np.repeat(sources, lengths)
            out[SOURCE_IDS] = src
        result = {k: self._out.wrap(v) for k, v in out.items()}
        if self.return_flash_attn_kwargs:
            if total > np.iinfo(np.int32).max:
                raise ValueError(f"{total} tokens overflow the int32 cu_seq_lens")
            for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
                cu = self._out.empty((n + 1,), np.int32)
                np.copyto(cu, ids.offsets, casting="unsafe")
                result[key] = self._out.wrap(cu)
            longest = int(lengths.max())
            result["max_length_q"] = result["max_length_k"] = longest
        # position_ids / seq_idx are the flattening's own (per document, as HF's collator): an
        # example's own would erase the document boundaries attention finds from them.
        skip = (self.input_key, "labels", "attention_mask", "position_ids", "seq_idx")
        tokens, rest = split_fields(c, ids.offsets, skip, DEFAULT_PAD_VALUES, self.input_key)
        for col in tokens:
            buf = self._out.empty((1, total), col.values.dtype)
            np.copyto(buf[0], col.values)
            result[col.name] = self._out.wrap(buf)
        for key, other in rest.items():
            result[key] = stack_other(other, key, self._out.tensors)
        return result



def create_flattening_collate(**kwargs: Any) -> FlatteningCollator:
    """Padding-free collator (``DataCollatorWithFlattening`` format); see FlatteningCollator."""
    return FlatteningCollator(**kwargs)
