"""Kernel wrappers that must refuse or report instead of returning a wrong value: object arrays,
ids outside their dtype, non-finite influence, negative token ids, empty rows' max_seqlen."""

from __future__ import annotations

import numpy as np
import pytest

from mixtape import ops
from mixtape.packing import pack_sequences
from mixtape.packing.stream import PackingStream


def test_gather_rows_refuses_objects() -> None:
    # Their pointers were copied bytewise, skipping the reference counts (a use after free).
    values = np.array([object(), object()], dtype=object)
    with pytest.raises(TypeError, match="values must be numbers, got dtype object"):
        ops.gather_rows(values, np.array([0]), np.array([2]), np.array([0]),
                        np.empty(2, dtype=object))  # fmt: skip


def test_pack_batch_checks_the_documents_sources_and_rows() -> None:
    carry = np.zeros((0, 4), np.int64)
    for sources, rows, match in (([2**32 + 1], [0], r"doc_sources holds 4294967297"),
                                 ([-1], [0], r"doc_sources holds -1"),
                                 ([0], [-5], r"doc_rows holds -5")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            ops.pack_batch(carry, sources, rows, [3], capacity=4, batch_size=1)
    got = ops.pack_batch(carry, [1], [7], [3], capacity=4, batch_size=1)
    assert got is not None


def test_datainf_refuses_non_finite_influence() -> None:
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal((4, 8)).astype(np.float32)]
    probes = [rng.standard_normal(8).astype(np.float32)]
    assert np.isfinite(ops.datainf(grads, probes).influence).all()
    with pytest.raises(ValueError, match=r"influence of sample 0 is not finite"):
        ops.datainf(grads, probes, damping=1e-300)


def test_pack_fill_max_seqlen_covers_rows_without_pieces() -> None:
    lengths = np.array([5, 3, 6])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    plan = ops.pack_plan(lengths, 8, rows_multiple_of=4)  # two empty rows appended
    tail = plan.select_rows(2, 4)
    got = ops.pack_fill(tail, np.arange(1, 15), offsets,
                        fields=("input_ids", "cu_seqlens", "max_seqlen"))  # fmt: skip
    assert got["cu_seqlens"].tolist() == [0, 8, 16] and got["max_seqlen"] == 8


def test_packing_refuses_negative_token_ids() -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"input_ids": [[5, -3, 7], [1, 2]]})
    with pytest.raises(ValueError, match=r"example 0 has a negative token id \(-3\)"):
        pack_sequences(ds, 8)
    with pytest.raises(ValueError, match=r"PackingStream: negative token id \(-3\)"):
        list(PackingStream([{"input_ids": [5, -3, 7]}], 8, batch_size=1))
