"""mixtape: fast, reproducible data mixing, packing and collation for language-model training."""

from __future__ import annotations

from mixtape.collate import (
    IMAGE_NORMALIZATION,
    CausalLMCollator,
    CollatorInfo,
    CollatorRegistry,
    FlatteningCollator,
    PackedCollator,
    PaddingCollator,
    Ragged,
    Seq2SeqCollator,
    VisionCollator,
    attach_packed_mask,
    create_causal_lm_collate,
    create_collate_fn,
    create_flattening_collate,
    create_packed_collate,
    create_seq2seq_collate,
    get_collator,
    list_collators,
    packed_attention_mask,
)
from mixtape.mixing import (
    MixedDataset,
    MixedShardedSource,
    MixPlan,
    block_mixture_interleave,
)
from mixtape.ops import (
    PackPlan,
    block_causal_mask,
    build_info,
    pack_fill,
    pack_plan,
    pad,
)
from mixtape.packing import (
    PackingStats,
    PackingStream,
    dataset_lengths,
    pack_sequences,
    plan_dataset,
)
from mixtape.preprocess import (
    PreprocessedDataset,
    PreprocessError,
    StreamingPreprocessedDataset,
    create_preprocessed_dataset,
)
from mixtape.sampler import SourceSampler
from mixtape.schedule import WeightSchedulePoint, WeightScheduler
from mixtape.source_files import DatasetMixture, NumpyTokenSource
from mixtape.sources import (
    ArrowTableSource,
    BaseSource,
    CompositeShardedSource,
    HFDatasetSource,
    HFIterableSource,
    ListSource,
    Source,
    TorchIterableSource,
    TorchMapSource,
    as_source,
)
from mixtape.state import Stateful

__version__ = "0.1.0"

__all__ = [
    "IMAGE_NORMALIZATION",
    "ArrowTableSource",
    "BaseSource",
    "CausalLMCollator",
    "CollatorInfo",
    "CollatorRegistry",
    "CompositeShardedSource",
    "DatasetMixture",
    "FlatteningCollator",
    "HFDatasetSource",
    "HFIterableSource",
    "ListSource",
    "MixPlan",
    "MixedDataset",
    "MixedShardedSource",
    "NumpyTokenSource",
    "PackPlan",
    "PackedCollator",
    "PackingStats",
    "PackingStream",
    "PaddingCollator",
    "PreprocessError",
    "PreprocessedDataset",
    "Ragged",
    "Seq2SeqCollator",
    "Source",
    "SourceSampler",
    "Stateful",
    "StreamingPreprocessedDataset",
    "TorchIterableSource",
    "TorchMapSource",
    "VisionCollator",
    "WeightSchedulePoint",
    "WeightScheduler",
    "__version__",
    "as_source",
    "attach_packed_mask",
    "block_causal_mask",
    "block_mixture_interleave",
    "build_info",
    "create_causal_lm_collate",
    "create_collate_fn",
    "create_flattening_collate",
    "create_packed_collate",
    "create_preprocessed_dataset",
    "create_seq2seq_collate",
    "dataset_lengths",
    "get_collator",
    "list_collators",
    "pack_fill",
    "pack_plan",
    "pack_sequences",
    "packed_attention_mask",
    "pad",
    "plan_dataset",
]
