"""Sequence packing: plan globally in C++ from lengths, write packed rows as Arrow.

``pack_sequences`` packs a pre-tokenized HF ``Dataset`` (or Arrow / numpy ragged tokens) into rows
of ``max_length`` tokens, like TRL's ``pack_dataset`` but over the whole dataset at once
(:mod:`.offline`). ``PackingStream`` packs an iterable online with a bounded buffer and a
resumable state (:mod:`.stream`). ``PackingStats`` measures a plan against the lower bound
``ceil(tokens / C)``; ``stats_main`` is ``mixtape pack-stats`` (:mod:`.stats`). The packed
collator lives with the collators (:mod:`mixtape.collate.packed`).
"""

from __future__ import annotations

from mixtape.packing.offline import pack_sequences
from mixtape.packing.plan import PACKED_FIELDS, dataset_lengths, plan_dataset, synthetic_lengths
from mixtape.packing.stats import PackingStats, stats_main
from mixtape.packing.stream import PackingStream

__all__ = [
    "PACKED_FIELDS",
    "PackingStats",
    "PackingStream",
    "dataset_lengths",
    "pack_sequences",
    "plan_dataset",
    "stats_main",
    "synthetic_lengths",
]
