"""mixtape: fast, reproducible data mixing, packing and collation for language-model training."""

from __future__ import annotations

from mixtape.collate import (
    IMAGE_NORMALIZATION,
    CausalLMCollator,
    CollatorInfo,
    CollatorRegistry,
    FlatteningCollator,
    PaddingCollator,
    Ragged,
    Seq2SeqCollator,
    VisionCollator,
    create_causal_lm_collate,
    create_collate_fn,
    create_flattening_collate,
    create_seq2seq_collate,
    get_collator,
    list_collators,
)
from mixtape.ops import (
    PackPlan,
    block_causal_mask,
    build_info,
    get_num_threads,
    pack_fill,
    pack_plan,
    pad,
    set_num_threads,
)
from mixtape.packing import (
    PackedCollator,
    PackingStats,
    PackingStream,
    create_packed_collate,
    dataset_lengths,
    pack_sequences,
    plan_dataset,
)

__version__ = "0.1.0"

__all__ = [
    "IMAGE_NORMALIZATION",
    "CausalLMCollator",
    "CollatorInfo",
    "CollatorRegistry",
    "FlatteningCollator",
    "PackPlan",
    "PackedCollator",
    "PackingStats",
    "PackingStream",
    "PaddingCollator",
    "Ragged",
    "Seq2SeqCollator",
    "VisionCollator",
    "__version__",
    "block_causal_mask",
    "build_info",
    "create_causal_lm_collate",
    "create_collate_fn",
    "create_flattening_collate",
    "create_packed_collate",
    "create_seq2seq_collate",
    "dataset_lengths",
    "get_collator",
    "get_num_threads",
    "list_collators",
    "pack_fill",
    "pack_plan",
    "pack_sequences",
    "pad",
    "plan_dataset",
    "set_num_threads",
]
