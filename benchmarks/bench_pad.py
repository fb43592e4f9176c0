"""pytest-benchmark: the pad kernel vs its peers on case 1 of ``mixtape bench`` (same data).

    pytest benchmarks/bench_pad.py --benchmark-columns=median,iqr,ops

4096 int64 sequences with lengths uniform 16..2048 (``MIXTAPE_BENCH_QUICK=1``: 512). Every
contender's output is checked against the numpy reference once, outside the timing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from mixtape import ops
from mixtape.bench import ragged_batch

N = 512 if os.environ.get("MIXTAPE_BENCH_QUICK") else 4096
IMPLS = ["mixtape-fresh", "mixtape-reused", "torch-pad_sequence", "numpy-rows", "numpy-copyto"]


@pytest.fixture(scope="module")
def batch() -> dict[str, Any]:
    values, offsets = ragged_batch(0, N, 16, 2048)
    length = int(np.diff(offsets).max())
    rows = [values[offsets[i] : offsets[i + 1]] for i in range(N)]
    want = np.zeros((N, length), dtype=np.int64)
    for i, row in enumerate(rows):
        want[i, : row.size] = row
    return {"values": values, "offsets": offsets, "length": length, "rows": rows, "want": want}


def contender(impl: str, b: dict[str, Any]) -> Callable[[], Any]:
    values, offsets, length, rows = b["values"], b["offsets"], b["length"], b["rows"]
    if impl == "mixtape-fresh":
        return lambda: ops.pad(values, offsets, return_attention_mask=False)["input_ids"]
    if impl == "mixtape-reused":
        buf = {"input_ids": np.empty((N, length), dtype=np.int64)}
        return lambda: ops.pad(values, offsets, return_attention_mask=False, out=buf)["input_ids"]
    if impl == "torch-pad_sequence":
        seqs = [torch.from_numpy(r) for r in rows]
        return lambda: torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True).numpy()

    if impl == "numpy-rows":

        def numpy_rows() -> np.ndarray:
            dense = np.zeros((N, length), dtype=np.int64)
            for i, row in enumerate(rows):
                dense[i, : row.size] = row
            return dense

        return numpy_rows
    if impl == "numpy-copyto":  # the limit: a plain copy of the same number of bytes
        src, dst = b["want"], np.empty_like(b["want"])
        return lambda: (np.copyto(dst, src), dst)[1]
    raise ValueError(impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_pad_ragged(benchmark: Any, batch: dict[str, Any], impl: str) -> None:
    fn = contender(impl, batch)
    np.testing.assert_array_equal(fn(), batch["want"])
    benchmark.extra_info["bytes_written"] = batch["want"].nbytes
    benchmark(fn)
