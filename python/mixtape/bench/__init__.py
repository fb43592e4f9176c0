"""``mixtape bench``: side-by-side timings of mixtape against what users run today.

The one implementation behind ``mixtape bench`` and ``benchmarks/compare.py``. Cases register with
:func:`case` in the modules listed in :data:`CASE_MODULES` (one per stage: :mod:`.collate`,
:mod:`.pack`, ...); each returns :class:`Measurement` rows on the same seeded data for every
contender. Peers that are not installed are reported as skipped, never faked.
"""

from __future__ import annotations

from mixtape.bench.core import (
    CASE_MODULES,
    CASES,
    Measurement,
    case,
    format_table,
    load_cases,
    main,
    ragged_batch,
    ratios,
    skipped,
    timeit,
)

__all__ = [
    "CASES",
    "CASE_MODULES",
    "Measurement",
    "case",
    "format_table",
    "load_cases",
    "main",
    "ragged_batch",
    "ratios",
    "skipped",
    "timeit",
]
