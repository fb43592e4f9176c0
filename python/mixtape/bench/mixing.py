"""Mixing cases for ``mixtape bench``: weighted mixtures of pre-tokenized sources vs HF.

Data for every contender: three pre-tokenized HF Datasets of 100k rows each (lognormal lengths
around 300 tokens, int32 ids), weights 0.5 / 0.3 / 0.2, read into batches of 64 examples. Peers:
``datasets.interleave_datasets`` over the map-style datasets and over their
``to_iterable_dataset()`` streams (HF's own batched iteration, ``.iter(batch_size=64)``). Each
contender reads the same number of examples; times are per pass, reported with examples/s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from mixtape.bench.core import Measurement, case, skipped, timeit
from mixtape.packing import synthetic_lengths

WEIGHTS = (0.5, 0.3, 0.2)
BATCH = 64


def mixture_datasets(n: int, seed: int = 0) -> list[Any]:
    """Three pre-tokenized HF Datasets of ``n`` rows (lognormal lengths, mean ~300, int32)."""
    import datasets

    datasets.disable_progress_bars()
    out = []
    for k in range(3):
        lengths = synthetic_lengths(n, seed=seed + k, maximum=4096)
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        rng = np.random.default_rng(seed + 10 + k)
        values = rng.integers(0, 50_000, int(offsets[-1]), dtype=np.int32)
        column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        out.append(datasets.Dataset(pa.table({"input_ids": column})))
    return out


def _rate(examples: int, seconds: float) -> str:
    return f"{examples / seconds:,.0f} examples/s"


@case("mix-datasets")
def bench_mix_datasets(quick: bool) -> list[Measurement]:
    """3 x 100k pre-tokenized HF Datasets, weights .5/.3/.2 -> batches of 64 examples."""
    import datasets

    from mixtape.mixing import MixedDataset

    name = "mix-datasets"
    n_rows = 10_000 if quick else 100_000
    n_examples = 2_048 if quick else 20_480
    repeat = 3 if quick else 5
    dss = mixture_datasets(n_rows)
    names = ("a", "b", "c")
    weights = dict(zip(names, WEIGHTS, strict=True))
    out: list[Measurement] = []

    mixed = MixedDataset(dict(zip(names, dss, strict=True)), weights, seed=0, batch_size=BATCH)

    def ours_arrow() -> int:
        got = 0
        for table in mixed.iter_batches(BATCH, start=0, stop=n_examples):
            got += table.num_rows
        return got

    assert ours_arrow() == n_examples
    sec = timeit(ours_arrow, repeat=repeat)
    out.append(Measurement(name, "mixtape MixedDataset.iter_batches (Arrow)", sec, True,
                           _rate(n_examples, sec)))  # fmt: skip

    def ours_examples() -> int:
        it = iter(MixedDataset(dict(zip(names, dss, strict=True)), weights, seed=0))
        return sum(1 for _ in zip(range(n_examples), it, strict=False))

    sec_ex = timeit(ours_examples, repeat=max(1, repeat - 2))
    out.append(Measurement(name, "mixtape MixedDataset iteration (dicts of lists)", sec_ex, True,
                           _rate(n_examples, sec_ex)))  # fmt: skip

    try:
        interleaved = datasets.interleave_datasets(
            dss, probabilities=list(WEIGHTS), seed=0, stopping_strategy="all_exhausted"
        )
    except Exception as exc:  # pragma: no cover - a datasets version without these options
        return [*out, skipped(name, "datasets.interleave_datasets", str(exc))]

    def reader(ds: Any) -> Callable[[], int]:
        """Read ``n_examples`` examples of an HF dataset in batches of BATCH (HF's .iter)."""

        def run() -> int:
            got = 0
            for batch in ds.iter(batch_size=BATCH):
                got += len(next(iter(batch.values()))) if isinstance(batch, dict) else len(batch)
                if got >= n_examples:
                    break
            return got

        return run

    streams = [d.to_iterable_dataset(num_shards=8) for d in dss]
    streaming = datasets.interleave_datasets(streams, probabilities=list(WEIGHTS), seed=0,
                                             stopping_strategy="all_exhausted")  # fmt: skip
    peers = [("datasets.interleave_datasets (map-style)", interleaved, repeat),
             ("datasets.interleave_datasets (map-style, arrow format)",
              interleaved.with_format("arrow"), repeat),
             ("datasets.interleave_datasets (to_iterable_dataset)", streaming,
              max(1, repeat - 2))]  # fmt: skip
    for impl, ds, reps in peers:
        sec = timeit(reader(ds), repeat=reps)
        out.append(Measurement(name, impl, sec, False, _rate(n_examples, sec)))
    return out
