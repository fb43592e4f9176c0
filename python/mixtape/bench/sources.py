"""Source cases for ``mixtape bench``: random-access reads of pre-tokenized data.

The mixer asks each source for a batch of random rows. Data: 100k documents, lengths uniform in
16..512 (~26M int32 tokens), saved with ``save_to_disk`` and memory-mapped back (about a hundred
record batches), then shuffled (a row mapping), as a training set usually is. Every contender
reads the same 1000 random rows; outputs are compared.
"""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np
import pyarrow as pa

from mixtape.bench.core import Measurement, case, ragged_batch, timeit
from mixtape.source_files import NumpyTokenSource
from mixtape.sources import HFDatasetSource


def _dataset(directory: str, n: int) -> Any:
    import datasets

    datasets.disable_progress_bars()
    values, offsets = ragged_batch(0, n, 16, 512, dtype=np.int32)
    column = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
    datasets.Dataset(pa.table({"input_ids": column})).save_to_disk(directory)
    return datasets.load_from_disk(directory).shuffle(seed=0), values, offsets


@case("source-take")
def bench_source_take(quick: bool) -> list[Measurement]:
    """1000 random rows of a 100k-document shuffled, memory-mapped HF Dataset (and .npy tokens)."""
    name = "source-take"
    n = 10_000 if quick else 100_000
    rows = np.random.default_rng(1).integers(0, n, 1000)
    repeat = 5 if quick else 15
    out: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="mixtape-bench-") as tmp:
        ds, values, offsets = _dataset(f"{tmp}/ds", n)
        src = HFDatasetSource(ds, "bench")
        arrow_ds = ds.with_format("arrow")
        ours = src.take_arrow(rows)
        same = ours.equals(arrow_ds[rows.tolist()].combine_chunks())
        chunks = ds.data.table.column(0).num_chunks
        note = f"{chunks} record batches + row mapping; tables equal: {same}"
        out.append(Measurement(name, "mixtape take_arrow", timeit(lambda: src.take_arrow(rows),
                                                                  repeat), True, note))  # fmt: skip
        out.append(Measurement(name, "HF with_format('arrow')[rows]",
                               timeit(lambda: arrow_ds[rows.tolist()], repeat), False))  # fmt: skip
        table, index = ds.data.table, ds._indices.column(0)

        def arrow_take() -> pa.Table:
            return table.take(index.take(pa.array(rows)))

        out.append(Measurement(name, "pyarrow Table.take (mapped rows)",
                               timeit(arrow_take, repeat), False))  # fmt: skip
        dicts_same = src.take(rows[:50]) == [ds[int(r)] for r in rows[:50]]
        out.append(Measurement(name, "mixtape take (dicts)", timeit(lambda: src.take(rows), repeat),
                               True, f"first 50 equal to ds[i]: {dicts_same}"))  # fmt: skip
        out.append(Measurement(name, "HF ds[rows] (columns of lists)",
                               timeit(lambda: ds[rows.tolist()], repeat), False))  # fmt: skip
        np.save(f"{tmp}/tok.npy", values)
        np.save(f"{tmp}/off.npy", offsets)
        tokens = NumpyTokenSource(f"{tmp}/tok.npy", f"{tmp}/off.npy")
        mm = np.load(f"{tmp}/tok.npy", mmap_mode="r")

        def numpy_loop() -> list[Any]:
            return [np.asarray(mm[offsets[r] : offsets[r + 1]]) for r in rows.tolist()]

        got = tokens.take_arrow(rows).column(0).to_pylist()
        same_np = got == [x.tolist() for x in numpy_loop()]
        out.append(Measurement(name, "mixtape NumpyTokenSource.take_arrow",
                               timeit(lambda: tokens.take_arrow(rows), repeat), True,
                               f"vectorised gather; equal to slices: {same_np}"))  # fmt: skip
        out.append(Measurement(name, "numpy memmap slice per row",
                               timeit(numpy_loop, repeat), False, "list of arrays"))  # fmt: skip
    return out
