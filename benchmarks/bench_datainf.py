"""pytest-benchmark of the DataInf kernel: 1024 samples x 8 layers x d = 4096 float32 (128 MiB),
ours (float32, bfloat16, with a k = 256 projection) against torch's per-layer DataInf.

Run: ``pytest benchmarks/bench_datainf.py --benchmark-only`` (outside ``testpaths``).
The side-by-side table lives in ``mixtape bench --cases datainf``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from mixtape import ops
from mixtape.bench.datainf import torch_datainf

N, LAYERS, D = 1024, 8, 4096


@pytest.fixture(scope="module")
def grads() -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    g = [rng.standard_normal((N, D), dtype=np.float32) for _ in range(LAYERS)]
    v = [rng.standard_normal(D, dtype=np.float32) for _ in range(LAYERS)]
    return g, v


@pytest.mark.parametrize("impl", ["mixtape", "mixtape-bf16", "mixtape-proj256", "torch"])
def test_datainf(
    benchmark: Any, grads: tuple[list[np.ndarray], list[np.ndarray]], impl: str
) -> None:
    g, v = grads
    if impl == "mixtape":
        benchmark(ops.datainf, g, v)
    elif impl == "mixtape-bf16":
        bf = [torch.from_numpy(x).bfloat16() for x in g]
        benchmark(ops.datainf, bf, v)
    elif impl == "mixtape-proj256":
        benchmark(ops.datainf, g, v, projection_dim=256)
    else:
        torch.set_num_threads(2)
        benchmark(torch_datainf, [torch.from_numpy(x) for x in g], [torch.from_numpy(x) for x in v])
    benchmark.extra_info.update(n=N, layers=LAYERS, d=D)
