"""pytest-benchmark of the pack kernels alone: planner on 1M lognormal lengths (C = 4096) and the
fill of the 100k-document plan (~30M tokens), fresh and reused outputs.

Run: ``pytest benchmarks/bench_pack_kernels.py --benchmark-only`` (outside ``testpaths``).
The comparison with TRL and numpy lives in benchmarks/compare.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mixtape import ops

CAPACITY = 4096


def lognormal_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Lengths with mean ~300, clipped to 1..8192 (the issue's benchmark distribution)."""
    rng = np.random.default_rng(seed)
    sigma = 1.0
    return np.clip(np.round(rng.lognormal(np.log(300) - sigma**2 / 2, sigma, n)), 1, 8192).astype(
        np.int64
    )


@pytest.fixture(scope="module")
def lengths_1m() -> np.ndarray:
    return lognormal_lengths(1_000_000)


@pytest.fixture(scope="module")
def docs_100k() -> tuple[ops.PackPlan, np.ndarray, np.ndarray]:
    lengths = lognormal_lengths(100_000, seed=1)
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.random.default_rng(2).integers(0, 50_000, int(offsets[-1]), dtype=np.int32)
    return ops.pack_plan(lengths, CAPACITY), values, offsets


@pytest.mark.parametrize("strategy", ops.PACK_STRATEGIES)
def test_pack_plan_1m(benchmark: Any, lengths_1m: np.ndarray, strategy: str) -> None:
    plan = benchmark(ops.pack_plan, lengths_1m, CAPACITY, strategy=strategy)
    bound = -(-int(lengths_1m.sum()) // CAPACITY)
    benchmark.extra_info.update(rows=plan.num_rows, lower_bound=bound,
                                gap=(plan.num_rows - bound) / bound)  # fmt: skip


@pytest.mark.parametrize("layout", ops.PACK_LAYOUTS)
@pytest.mark.parametrize(
    "fields", [("input_ids",), ("input_ids", "labels", "position_ids")], ids=["ids", "ids_lab_pos"]
)
@pytest.mark.parametrize("reuse", [False, True], ids=["fresh", "reused"])
def test_pack_fill_100k(
    benchmark: Any, docs_100k: tuple[ops.PackPlan, np.ndarray, np.ndarray], layout: str,
    fields: tuple[str, ...], reuse: bool,
) -> None:  # fmt: skip
    plan, values, offsets = docs_100k
    out = None
    if reuse:
        out = ops.pack_fill(plan, values, offsets, layout=layout, fields=fields)
    benchmark(ops.pack_fill, plan, values, offsets, layout=layout, fields=fields, out=out)
    benchmark.extra_info["tokens"] = plan.packed_tokens
