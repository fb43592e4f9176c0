"""Collators: examples -> batches of tensors, on top of the pad and pack-fill kernels.

Every collator reads its batch through :mod:`mixtape.ragged` (a list of example dicts or of id
lists, an Arrow ``RecordBatch``/``Table``, a dict of columns) and follows one rule for the fields
it does not own: integer per-token fields are laid out like the ids with their own pad value,
float per-token fields with 0.0, per-example numbers are stacked, anything else is passed through.
"""

from __future__ import annotations

from mixtape.collate.flattening import FlatteningCollator, create_flattening_collate
from mixtape.collate.output import ReturnTensors
from mixtape.collate.packed import PACKED_ATTENTION, PackedCollator, create_packed_collate
from mixtape.collate.padding import (
    DEFAULT_PAD_VALUES,
    CausalLMCollator,
    PaddingCollator,
    Seq2SeqCollator,
    create_causal_lm_collate,
    create_collate_fn,
    create_seq2seq_collate,
)
from mixtape.collate.registry import CollatorInfo, CollatorRegistry, get_collator, list_collators
from mixtape.collate.vision import IMAGE_NORMALIZATION, VisionCollator
from mixtape.ragged import Ragged

__all__ = [
    "DEFAULT_PAD_VALUES",
    "IMAGE_NORMALIZATION",
    "PACKED_ATTENTION",
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
    "create_causal_lm_collate",
    "create_collate_fn",
    "create_flattening_collate",
    "create_packed_collate",
    "create_seq2seq_collate",
    "get_collator",
    "list_collators",
]
