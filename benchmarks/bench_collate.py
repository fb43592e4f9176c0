"""pytest-benchmark: mixtape collators vs transformers/torch, cases 2 and 3 of ``mixtape bench``.

    pytest benchmarks/bench_collate.py --benchmark-columns=median,iqr,ops

Same seeded data as the compare table. Peers that are not installed are skipped, never faked.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from mixtape.bench.collate import micro_batch_docs, pylist_batch

collate = pytest.importorskip("mixtape.collate")


def _transformers() -> Any:
    return pytest.importorskip("transformers")


def _byt5() -> Any:
    return _transformers().ByT5Tokenizer()


# --- case 2: ~32k tokens in ~100 documents, padding-free ---------------------------------------

FLATTEN_IMPLS = ["mixtape-arrow", "mixtape-list", "hf-flattening", "hf-padding"]


@pytest.fixture(scope="module")
def docs() -> list[list[int]]:
    return micro_batch_docs()


def flatten_contender(impl: str, docs: list[list[int]]) -> Callable[[], Any]:
    examples = [{"input_ids": d} for d in docs]
    if impl == "mixtape-arrow":
        pa = pytest.importorskip("pyarrow")
        rb = pa.RecordBatch.from_pydict({"input_ids": pa.array(docs, type=pa.list_(pa.int32()))})
        fn = collate.create_flattening_collate()
        return lambda: fn(rb)
    if impl == "mixtape-list":
        fn = collate.create_flattening_collate()
        return lambda: fn(examples)
    if impl == "hf-flattening":
        hf = _transformers().DataCollatorWithFlattening()
        return lambda: hf(examples)
    if impl == "hf-padding":
        hf = _transformers().DataCollatorWithPadding(_byt5())
        return lambda: hf(examples)
    raise ValueError(impl)


@pytest.mark.parametrize("impl", FLATTEN_IMPLS)
def test_flatten_microbatch(benchmark: Any, docs: list[list[int]], impl: str) -> None:
    fn = flatten_contender(impl, docs)
    got = fn()
    flat = list(itertools.chain.from_iterable(docs))
    if impl == "hf-padding":
        assert got["input_ids"].shape == (len(docs), max(map(len, docs)))
    else:
        assert got["input_ids"].tolist() == [flat]
    benchmark(fn)


# --- case 3: 64 examples as Python lists, lengths 32..2048 -------------------------------------

PYLIST_IMPLS = ["mixtape", "hf-padding", "pad_sequence-one-liner", "numpy-floor"]


@pytest.fixture(scope="module")
def ids() -> list[list[int]]:
    return pylist_batch()


def pylist_contender(impl: str, ids: list[list[int]]) -> Callable[[], Any]:
    examples = [{"input_ids": x} for x in ids]
    if impl == "mixtape":
        fn = collate.create_collate_fn(pad_token_id=0)
        return lambda: fn(examples)["input_ids"]
    if impl == "hf-padding":
        hf = _transformers().DataCollatorWithPadding(_byt5())
        return lambda: hf(examples)["input_ids"]
    if impl == "pad_sequence-one-liner":
        return lambda: torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(x) for x in ids], batch_first=True
        )
    if impl == "numpy-floor":  # reading the same Python ints once: the floor
        total = sum(map(len, ids))
        return lambda: np.fromiter(itertools.chain.from_iterable(ids), np.int64, count=total)
    raise ValueError(impl)


@pytest.mark.parametrize("impl", PYLIST_IMPLS)
def test_pad_pylists(benchmark: Any, ids: list[list[int]], impl: str) -> None:
    fn = pylist_contender(impl, ids)
    got = torch.as_tensor(fn())
    if impl != "numpy-floor":
        want = torch.nn.utils.rnn.pad_sequence([torch.tensor(x) for x in ids], batch_first=True)
        assert torch.equal(got, want)
    benchmark(fn)
