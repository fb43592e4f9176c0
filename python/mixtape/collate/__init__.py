"""Collators: examples -> batches of tensors, on top of the pad and pack-fill kernels.

Every collator reads its batch through :mod:`mixtape.ragged`: a list of example dicts, a list of
bare id sequences (lists, numpy arrays or tensors, read as ``input_ids``, as transformers'
``DataCollatorForLanguageModeling`` accepts them), an Arrow ``RecordBatch``/``Table`` or a dict
of columns. Every collator (padding, causal LM, seq2seq, flattening, packed) follows one rule for
the fields it does not own (``collate.output.split_fields``):

- a column of 1-D number sequences with the ids' lengths is per-token and laid out like the ids
  (padded, truncated, flattened or packed the same way): integers and bools as int64 padded with
  their ``pad_values`` entry (default ``DEFAULT_PAD_VALUES``: ``token_type_ids`` 0,
  ``special_tokens_mask`` 1; any other 0), floats (e.g. loss weights) as float32 padded with 0.0,
  whatever their input dtype (an HF ``Dataset`` stores Python floats as float64; the batch is the
  same from its Arrow columns or its rows, and float32 is what a model computes its loss in);
- per-example numbers and equal-shape arrays are stacked (Python ints int64, floats float32, as
  ``torch.tensor``); anything else (strings, ragged lists of other lengths) is passed through.

Sources (``collate.sources``): every collator takes ``source_names``, the mixture's source names
in mixture order; the id of a name is its index there. With it, each example's ``__source__`` (a
name, or an id already) is consumed and becomes ``source_ids`` int64: [B] for padded batches
(padding, causal LM, seq2seq, vision), per token for flattening ([1, T]) and packed rows ([B, L]
or [1, T], each token its document's source from the rows' ``doc_source_ids``, -1 on padding).
An unknown name is a ValueError naming the example. Without ``source_names`` there are no ids and
``__source__`` is passed through as a list: ids are never numbered by which names a batch holds,
so an id means the same source in every batch, worker and run.
"""

from __future__ import annotations

from mixtape.collate.attention import (
    PACKED_ATTENTION,
    attach_packed_mask,
    model_attention,
    packed_attention_mask,
)
from mixtape.collate.flattening import FlatteningCollator, create_flattening_collate
from mixtape.collate.output import DEFAULT_PAD_VALUES, ReturnTensors
from mixtape.collate.packed import PackedCollator, create_packed_collate
from mixtape.collate.padding import (
    CausalLMCollator,
    PaddingCollator,
    Seq2SeqCollator,
    create_causal_lm_collate,
    create_collate_fn,
    create_seq2seq_collate,
)
from mixtape.collate.registry import CollatorInfo, CollatorRegistry, get_collator, list_collators
from mixtape.collate.sources import DOC_SOURCE_IDS, SOURCE_IDS, SOURCE_KEY
from mixtape.collate.vision import IMAGE_NORMALIZATION, VisionCollator
from mixtape.ragged import Ragged

__all__ = [
    "DEFAULT_PAD_VALUES",
    "DOC_SOURCE_IDS",
    "IMAGE_NORMALIZATION",
    "PACKED_ATTENTION",
    "SOURCE_IDS",
    "SOURCE_KEY",
    "CausalLMCollator",
    "CollatorInfo",
    "CollatorRegistry",
    "FlatteningCollator",
    "PackedCollator",
    "PaddingCollator",
    "Ragged",
    "ReturnTensors",
    "Seq2SeqCollator",
    "VisionCollator",
    "attach_packed_mask",
    "create_causal_lm_collate",
    "create_collate_fn",
    "create_flattening_collate",
    "create_packed_collate",
    "create_seq2seq_collate",
    "get_collator",
    "list_collators",
    "model_attention",
    "packed_attention_mask",
]
