"""pytest-benchmark: source ids for 10M positions (``MIXTAPE_BENCH_QUICK=1``: 1M) from 3 and 64
weighted sources, every sampler mode vs numpy ``Generator.choice`` and ``torch.multinomial``
(same weights, ids only for the peers; mixtape also returns the ordinals), and permute_rows.

    pytest benchmarks/bench_sample.py --benchmark-columns=median,iqr,ops

Every contender's output is checked for its realised shares once, outside the timing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from mixtape.bench.sample import bench_weights
from mixtape.ops import permute_rows
from mixtape.sampler import SourceSampler

N = 1_000_000 if os.environ.get("MIXTAPE_BENCH_QUICK") else 10_000_000
IMPLS = [
    "mixtape-greedy",
    "mixtape-greedy-shuffle",
    "mixtape-random",
    "mixtape-block",
    "numpy-choice",
    "torch-multinomial",
]
CONFIGS: dict[str, dict[str, Any]] = {
    "mixtape-greedy": {"mode": "greedy"},
    "mixtape-greedy-shuffle": {"mode": "greedy", "shuffle": True, "block_size": 1000},
    "mixtape-random": {"mode": "random"},
    "mixtape-block": {"mode": "block", "block_size": 1000},
}


def contender(impl: str, w: np.ndarray) -> Callable[[], np.ndarray]:
    s = w.size
    if impl in CONFIGS:
        return lambda: SourceSampler(w, seed=0, **CONFIGS[impl]).sample(N)[0]
    if impl == "numpy-choice":
        rng = np.random.default_rng(0)
        return lambda: rng.choice(s, size=N, p=w)
    if impl == "torch-multinomial":
        tw = torch.from_numpy(w)
        return lambda: torch.multinomial(tw, N, replacement=True).numpy()
    raise ValueError(impl)


@pytest.mark.parametrize("num_sources", [3, 64])
@pytest.mark.parametrize("impl", IMPLS)
def test_sample_sources(benchmark: Any, impl: str, num_sources: int) -> None:
    w = bench_weights(num_sources)
    fn = contender(impl, w)
    share = np.bincount(fn(), minlength=num_sources) / N
    assert np.abs(share - w).max() < 5e-3
    benchmark.extra_info["positions"] = N
    benchmark(fn)


@pytest.mark.parametrize("impl", ["mixtape-permute_rows", "numpy-permutation"])
def test_rows(benchmark: Any, impl: str) -> None:
    ordinals = np.arange(N, dtype=np.int64)
    if impl == "mixtape-permute_rows":
        def fn() -> np.ndarray:
            return permute_rows(ordinals, N, seed=0, source=0)
    else:
        rng = np.random.default_rng(0)

        def fn() -> np.ndarray:
            return rng.permutation(N)[ordinals]

    assert np.array_equal(np.sort(fn()), ordinals)
    benchmark(fn)
