"""pytest-benchmark: the ``loader-e2e`` case of ``mixtape bench``: 3 pre-tokenized HF Datasets
(100k rows each; ``MIXTAPE_BENCH_QUICK=1``: 1k), weights .5/.3/.2 -> 200 (quick: 20) batches of 8
packed 4096-token rows, mixtape's loader vs HF interleave + TRL pack_dataset + collator, map-style
(prepared once per module, outside the timing) and streaming (packing on the fly, timed).

    pytest benchmarks/bench_loader.py --benchmark-columns=median,iqr,ops

Each run starts a fresh iterator (worker start-up included) and must deliver all N batches; the
real tokens delivered are in ``extra_info`` (tokens/s = tokens / time).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

from mixtape.bench.loader import BATCH_ROWS, MAX_LENGTH, NAMES, WORKERS, _drain
from mixtape.bench.mixing import WEIGHTS, mixture_datasets

QUICK = bool(os.environ.get("MIXTAPE_BENCH_QUICK"))
N_ROWS = 1_000 if QUICK else 100_000
N_BATCHES = 20 if QUICK else 200
IMPLS = ["mixtape", "hf-map-padding-free", "hf-map-flattening", "hf-streaming-padding-free"]


@pytest.fixture(scope="module")
def dss() -> list[Any]:
    pytest.importorskip("datasets")
    return mixture_datasets(N_ROWS)


@pytest.fixture(scope="module")
def hf_packed(dss: list[Any]) -> Any:
    """The map-style HF pipeline's one-off preparation: interleave, then pack everything."""
    import datasets

    data_utils = pytest.importorskip("trl.data_utils")
    mix = datasets.interleave_datasets(dss, probabilities=list(WEIGHTS), seed=0,
                                       stopping_strategy="all_exhausted")  # fmt: skip
    return data_utils.pack_dataset(mix, MAX_LENGTH, strategy="bfd")


def _collator(impl: str) -> Any:
    if impl.endswith("flattening"):
        transformers = pytest.importorskip("transformers")
        return transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    sft = pytest.importorskip("trl.trainer.sft_trainer")
    return sft.DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True,
                                               return_position_ids=True)  # fmt: skip


def contender(impl: str, workers: int, dss: list[Any], request: Any) -> Callable[[], int]:
    """A function producing N batches from a fresh iterator, returning their real tokens."""
    if impl == "mixtape":
        from mixtape import MixedDataset, get_loader

        weights = dict(zip(NAMES, WEIGHTS, strict=True))

        def ours() -> int:
            mixed = MixedDataset(dict(zip(NAMES, dss, strict=True)), weights, seed=0)
            loader = get_loader(mixed, BATCH_ROWS, packing="bfd", max_length=MAX_LENGTH,
                                collate_fn="packed", collate_kwargs={"attention": "flash"},
                                num_workers=workers)  # fmt: skip
            return _drain(loader, N_BATCHES)

        return ours
    collator = _collator(impl)

    def hf(ds: Any) -> int:
        dl = torch.utils.data.DataLoader(ds, batch_size=BATCH_ROWS, collate_fn=collator,
                                         num_workers=workers)  # fmt: skip
        return _drain(dl, N_BATCHES)

    if impl.startswith("hf-map"):
        packed = request.getfixturevalue("hf_packed")
        return lambda: hf(packed)
    import datasets
    from trl.data_utils import pack_dataset

    def streaming() -> int:
        streams = [d.to_iterable_dataset(num_shards=4) for d in dss]
        mix = datasets.interleave_datasets(streams, probabilities=list(WEIGHTS), seed=0,
                                           stopping_strategy="all_exhausted")  # fmt: skip
        return hf(pack_dataset(mix, MAX_LENGTH, strategy="bfd"))

    return streaming


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("impl", IMPLS)
def test_loader_e2e(benchmark: Any, impl: str, workers: int, dss: list[Any],
                    request: Any) -> None:  # fmt: skip
    fn = contender(impl, workers, dss, request)
    tokens = fn()
    assert tokens > N_BATCHES * MAX_LENGTH  # more than one full row per batch on average
    benchmark.extra_info.update(tokens=tokens, batches=N_BATCHES)
    rounds = 3 if impl == "mixtape" else 1
    benchmark.pedantic(fn, rounds=rounds, iterations=1)
