"""Packing cases for ``mixtape bench``: planner, fill and ``pack_sequences`` against their peers.

Every contender gets the same data: lognormal lengths (mean about 300, clipped to 1..8192) packed
into rows of 4096. Peers: TRL's ``pack_dataset`` (BFD with a Python segment tree), a numpy
first-fit-decreasing, a Python next-fit, and a numpy gather for the fill.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from mixtape.bench.core import Measurement, case, skipped, timeit
from mixtape.ops import PackPlan, pack_fill, pack_plan
from mixtape.packing import pack_sequences, synthetic_lengths

CAPACITY = 4096
Int64Array = npt.NDArray[np.int64]


def _tokens(lengths: Int64Array, seed: int = 0) -> tuple[npt.NDArray[np.int32], Int64Array]:
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
    values = np.random.default_rng(seed).integers(1, 50_000, int(offsets[-1]), dtype=np.int32)
    return values, offsets


def _table(lengths: Int64Array) -> pa.Table:
    values, offsets = _tokens(lengths)
    column = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
    return pa.table({"input_ids": column})


def _bound(lengths: Int64Array) -> int:
    return math.ceil(int(np.minimum(lengths, CAPACITY).sum()) / CAPACITY)


def _rows_note(rows: int, bound: int, extra: str = "") -> str:
    gap = 100.0 * (rows - bound) / bound
    return f"{rows:,} rows, lower bound {bound:,} (+{gap:.3f}%){extra}"


# ---- peers ----------------------------------------------------------------------------------


def numpy_ffd(lengths: Int64Array, capacity: int) -> Int64Array:
    """First-fit decreasing with numpy: each item (<= capacity, longest first) to the first bin
    it fits in.

    Returns the bin of every item. O(n * bins) element operations, vectorised per item.
    """
    order = np.argsort(-lengths, kind="stable")
    remaining = np.empty(len(lengths), np.int64)
    bins = 0
    where = np.empty(len(lengths), np.int64)
    for i in order.tolist():
        size = int(lengths[i])
        fits = np.flatnonzero(remaining[:bins] >= size)
        if fits.size:
            b = int(fits[0])
        else:
            b = bins
            remaining[b] = capacity
            bins += 1
        remaining[b] -= size
        where[i] = b
    return where


def python_next_fit(lengths: Int64Array, capacity: int) -> int:
    """Order-preserving next-fit (torchtune's greedy packer) of lengths <= capacity: rows used."""
    rows, used = 0, capacity
    for size in lengths.tolist():
        if used + size > capacity:
            rows, used = rows + 1, 0
        used += size
    return rows


def numpy_fill(plan: PackPlan, values: npt.NDArray[Any], offsets: Int64Array) -> dict[str, Any]:
    """The padded fill of ``input_ids``, ``labels``, ``position_ids`` as numpy index arithmetic."""
    rows, cap = plan.num_rows, plan.capacity
    n = plan.length
    piece_row = np.repeat(np.arange(rows), np.diff(plan.row_offsets))
    piece_first = np.concatenate([np.zeros(1, np.int64), np.cumsum(n)[:-1]])
    within = np.arange(int(n.sum())) - np.repeat(piece_first, n)
    dest = np.repeat(piece_row * cap + plan.column, n) + within
    src = np.repeat(offsets[plan.doc] + plan.start, n) + within
    ids = np.zeros(rows * cap, values.dtype)
    ids[dest] = values[src]
    labels = np.full(rows * cap, -100, values.dtype)
    labels[dest] = ids[dest]
    labels[dest[within == 0]] = -100
    pos = np.zeros(rows * cap, np.int64)
    pos[dest] = within
    return {"input_ids": ids.reshape(rows, cap), "labels": labels.reshape(rows, cap),
            "position_ids": pos.reshape(rows, cap)}  # fmt: skip


def _trl() -> Any | None:
    try:
        from trl.data_utils import _pack_bfd, pack_dataset
    except ImportError:
        return None
    return _pack_bfd, pack_dataset


# ---- cases ----------------------------------------------------------------------------------


def _plan_measurements(name: str, n: int, ffd_limit: int) -> list[Measurement]:
    """All planners on the same n lognormal lengths (numpy FFD only up to ``ffd_limit``)."""
    lengths = synthetic_lengths(n)
    bound = _bound(lengths)
    # Everyone truncates sequences longer than C (TRL "bfd"'s policy), so all pack the same tokens.
    clipped = np.minimum(lengths, CAPACITY)
    out: list[Measurement] = []
    for strategy in ("bfd", "ffd", "next_fit"):
        run = functools.partial(pack_plan, lengths, CAPACITY, strategy=strategy,
                                overflow="truncate")  # fmt: skip
        plan = run()
        sec = timeit(run, repeat=5, warmup=1)
        note = _rows_note(plan.num_rows, bound, f"; n={n:,}" if strategy == "bfd" else "")
        out.append(Measurement(name, f"mixtape {strategy}", sec, True, note))
    trl = _trl()
    if trl is None:
        out.append(skipped(name, "trl pack_dataset bfd", "trl not installed"))
    else:
        pack_bfd = trl[0]
        table = _table(lengths)

        def trl_run() -> Any:
            return pack_bfd(table, seq_length=CAPACITY, on_seq_length_overflow="truncate")

        res = trl_run()
        sec = timeit(trl_run, repeat=1, warmup=0)
        note = "; trl _pack_bfd over the whole Arrow table at once (its plan + take)"
        out.append(Measurement(name, "trl pack_dataset bfd", sec, False,
                               _rows_note(res.num_rows, bound, note)))  # fmt: skip
        del table, res
    if n <= ffd_limit:
        ffd_rows = int(numpy_ffd(clipped, CAPACITY).max()) + 1
        sec = timeit(lambda: numpy_ffd(clipped, CAPACITY), repeat=1, warmup=0)
        out.append(Measurement(name, "numpy ffd", sec, False, _rows_note(ffd_rows, bound)))
    else:
        out.append(skipped(name, "numpy ffd", f"O(n * rows): minutes at n={n:,}; see pack-plan"))
    rows = python_next_fit(clipped, CAPACITY)
    sec = timeit(lambda: python_next_fit(clipped, CAPACITY), repeat=1, warmup=0)
    out.append(Measurement(name, "python next-fit", sec, False, _rows_note(rows, bound)))
    return out


@case("pack-plan")
def bench_pack_plan(quick: bool) -> list[Measurement]:
    """100k lognormal lengths (mean 300, 1..8192) planned into rows of 4096; rows vs bound."""
    return _plan_measurements("pack-plan", 20_000 if quick else 100_000, ffd_limit=100_000)


@case("pack-plan-1m")
def bench_pack_plan_1m(quick: bool) -> list[Measurement]:
    """1M lognormal lengths (mean 300, 1..8192) planned into rows of 4096; rows vs bound."""
    return _plan_measurements("pack-plan-1m", 100_000 if quick else 1_000_000, ffd_limit=0)


@case("pack-fill")
def bench_pack_fill(quick: bool) -> list[Measurement]:
    """The 100k plan (~30M tokens) written as padded rows: ids, labels, positions."""
    n = 10_000 if quick else 100_000
    lengths = synthetic_lengths(n)
    values, offsets = _tokens(lengths)
    plan = pack_plan(lengths, CAPACITY)
    name = "pack-fill"
    fields = ("input_ids", "labels", "position_ids")
    ours = pack_fill(plan, values, offsets, fields=fields, dtype=np.int32)
    ref = numpy_fill(plan, values, offsets)
    same = all(np.array_equal(ours[k], ref[k]) for k in fields)
    note = (f"{int(values.size) / 1e6:.1f}M tokens into {plan.num_rows:,} x {CAPACITY}, int32, "
            f"fresh outputs; outputs equal: {same}")  # fmt: skip
    sec = timeit(lambda: pack_fill(plan, values, offsets, fields=fields, dtype=np.int32),
                 repeat=5, warmup=1)  # fmt: skip
    out = [Measurement(name, "mixtape pack_fill", sec, True, note)]
    sec = timeit(lambda: numpy_fill(plan, values, offsets), repeat=3, warmup=1)
    out.append(Measurement(name, "numpy gather", sec, False, note))
    sec = timeit(lambda: pack_fill(plan, values, offsets, fields=("input_ids",), dtype=np.int32),
                 repeat=5, warmup=1)  # fmt: skip
    out.append(Measurement(name, "mixtape pack_fill (input_ids only)", sec, True, ""))
    return out


@case("pack-sequences")
def bench_pack_sequences(quick: bool) -> list[Measurement]:
    """100k-document HF Dataset in, packed HF Dataset out (bfd, truncate), vs TRL pack_dataset."""
    import datasets

    datasets.disable_progress_bars()
    n = 10_000 if quick else 100_000
    lengths = synthetic_lengths(n)
    ds = datasets.Dataset(_table(lengths))
    name = "pack-sequences"
    bound = _bound(lengths)
    kwargs: dict[str, Any] = {"strategy": "bfd", "overflow": "truncate"}
    ragged = pack_sequences(ds, CAPACITY, layout="ragged", fields=("input_ids", "seq_lengths"),
                            **kwargs)  # fmt: skip
    sec = timeit(lambda: pack_sequences(ds, CAPACITY, layout="ragged",
                                        fields=("input_ids", "seq_lengths"), **kwargs),
                 repeat=3, warmup=1)  # fmt: skip
    out = [Measurement(name, "mixtape ragged (TRL columns)", sec, True,
                       _rows_note(ragged.num_rows, bound, "; global"))]  # fmt: skip
    sec = timeit(lambda: pack_sequences(ds, CAPACITY, **kwargs), repeat=3, warmup=1)
    out.append(Measurement(name, "mixtape padded (+position_ids)", sec, True,
                           _rows_note(ragged.num_rows, bound)))  # fmt: skip
    trl = _trl()
    if trl is None:
        out.append(skipped(name, "trl pack_dataset bfd", "trl not installed"))
    else:
        pack_dataset = trl[1]
        packed = pack_dataset(ds, CAPACITY, strategy="bfd")
        sec = timeit(lambda: pack_dataset(ds, CAPACITY, strategy="bfd"), repeat=1, warmup=0)
        note = _rows_note(packed.num_rows, bound, "; 1000-row windows")
        out.append(Measurement(name, "trl pack_dataset bfd", sec, False, note))
    return out


@case("packed-collate")
def bench_packed_collate(quick: bool) -> list[Measurement]:
    """8 packed rows of 4096 (TRL columns) -> a padding-free training batch with varlen kwargs."""
    import datasets

    from mixtape.collate import create_packed_collate

    datasets.disable_progress_bars()
    name = "packed-collate"
    rows = 2 if quick else 8
    lengths = synthetic_lengths(rows * 20)
    packed = pack_sequences(datasets.Dataset(_table(lengths)), CAPACITY, layout="ragged",
                            fields=("input_ids", "seq_lengths"))  # fmt: skip
    packed = packed.select(range(min(rows, packed.num_rows)))
    examples = packed.to_list()
    arrow = packed.with_format("arrow")[:]
    ours = create_packed_collate(attention="flash", padding_free=True)
    tokens = sum(len(e["input_ids"]) for e in examples)
    note = f"{len(examples)} rows, {tokens:,} tokens, {sum(map(len, packed['seq_lengths'])):,} docs"
    out = [
        Measurement(name, "mixtape packed collate (Arrow batch)",
                    timeit(lambda: ours(arrow), repeat=20, warmup=2), True, note),
        Measurement(name, "mixtape packed collate (list of dicts)",
                    timeit(lambda: ours(examples), repeat=20, warmup=2), True),
    ]  # fmt: skip
    try:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    except ImportError as e:
        out.append(skipped(name, "trl DataCollatorForLanguageModeling(padding_free)", str(e)))
        return out
    theirs = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    out.append(Measurement(name, "trl DataCollatorForLanguageModeling(padding_free)",
                           timeit(lambda: theirs(examples), repeat=20, warmup=2), False,
                           "list of dicts"))  # fmt: skip
    return out


# ---- out of core: a memory-mapped dataset on disk ------------------------------------------


def build_disk_dataset(folder: str, gigabytes: float, shards: int = 8, seed: int = 0) -> str:
    """An on-disk pre-tokenized dataset of about ``gigabytes`` of int32 tokens (lognormal lengths
    around 300), written shard by shard with ``save_to_disk`` (never all in RAM); returns the
    folder holding ``shard-<k>`` datasets (:func:`load_disk_dataset` reads them back)."""
    import os

    import datasets

    datasets.disable_progress_bars()
    tokens_per_shard = int(gigabytes * 1e9 / 4 / shards)
    docs_per_shard = max(1, tokens_per_shard // 300)
    for k in range(shards):
        lengths = synthetic_lengths(docs_per_shard, seed=seed + k)
        values, offsets = _tokens(lengths, seed=seed + k)
        column = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
        ds = datasets.Dataset(pa.table({"input_ids": column}))
        ds.save_to_disk(os.path.join(folder, f"shard-{k}"), num_shards=1)
        del ds, column, values, offsets
    return folder


def load_disk_dataset(folder: str) -> Any:
    """The shards of :func:`build_disk_dataset` as one memory-mapped HF Dataset."""
    import glob
    import os

    import datasets

    paths = sorted(glob.glob(os.path.join(folder, "shard-*")),
                   key=lambda p: int(p.rsplit("-", 1)[1]))  # fmt: skip
    return datasets.concatenate_datasets([datasets.load_from_disk(p) for p in paths])


def _status() -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile of this process in bytes (Linux /proc)."""
    out: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def measure_pack_memory(folder: str, out_file: str, max_length: int = CAPACITY,
                        peer: str = "mixtape") -> dict[str, Any]:  # fmt: skip
    """Pack the dataset of :func:`build_disk_dataset` in this process and measure it: wall time,
    peak resident memory above the baseline (VmHWM), and the peak of anonymous memory (RssAnon,
    sampled every 2 ms: the part that is not file-backed pages of the memory maps)."""
    import gc
    import os
    import threading
    import time

    import datasets
    from datasets.table import MemoryMappedTable

    datasets.disable_progress_bars()
    ds = load_disk_dataset(folder)
    gc.collect()
    base = _status()
    peak = dict(base)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            now = _status()
            for key in ("RssAnon", "RssFile", "VmRSS"):
                peak[key] = max(peak[key], now[key])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    if peer == "trl":
        from trl.data_utils import pack_dataset

        packed = pack_dataset(ds, max_length, strategy="bfd",
                              map_kwargs={"cache_file_name": out_file})  # fmt: skip
    else:
        packed = pack_sequences(ds, max_length, strategy="bfd", overflow="truncate",
                                cache_file_name=out_file)  # fmt: skip
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    end = _status()
    mb = 1e6
    return {
        "impl": peer,
        "documents": ds.num_rows,
        "input_bytes": sum(os.path.getsize(c["filename"]) for c in ds.cache_files),
        "rows": packed.num_rows,
        "seconds": seconds,
        "peak_rss_above_baseline_mb": (end["VmHWM"] - base["VmRSS"]) / mb,
        "peak_anon_above_baseline_mb": (peak["RssAnon"] - base["RssAnon"]) / mb,
        "peak_file_backed_above_baseline_mb": (peak["RssFile"] - base["RssFile"]) / mb,
        "end_anon_above_baseline_mb": (end["RssAnon"] - base["RssAnon"]) / mb,
        "baseline_rss_mb": base["VmRSS"] / mb,
        "output_cache_files": [c["filename"] for c in packed.cache_files],
        "output_memory_mapped": isinstance(packed.data, MemoryMappedTable)
        or all(isinstance(t, MemoryMappedTable) for t in getattr(packed.data, "blocks", [[]])[0]),
    }


def measure_in_subprocess(folder: str, out_file: str, peer: str = "mixtape") -> dict[str, Any]:
    """:func:`measure_pack_memory` in a fresh Python process (a clean baseline); its JSON."""
    import json
    import subprocess
    import sys

    code = ("import json, sys; from mixtape.bench.pack import measure_pack_memory; "
            "print(json.dumps(measure_pack_memory(sys.argv[1], sys.argv[2], peer=sys.argv[3])))")
    done = subprocess.run([sys.executable, "-c", code, folder, out_file, peer], check=True,
                          capture_output=True, text=True)  # fmt: skip
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@case("pack-sequences-disk")
def bench_pack_sequences_disk(quick: bool) -> list[Measurement]:
    """A memory-mapped on-disk dataset (1 GB int32 tokens; --quick 64 MB) packed into 4096-token
    rows, each run in a fresh process: time, peak anonymous / resident memory above baseline."""
    import os
    import tempfile

    name = "pack-sequences-disk"
    out: list[Measurement] = []
    with tempfile.TemporaryDirectory() as tmp:
        build_disk_dataset(os.path.join(tmp, "data"), 0.064 if quick else 1.0)
        peers = ["mixtape", "trl"] if quick else ["mixtape"]
        for peer in peers:
            if peer == "trl" and _trl() is None:
                out.append(skipped(name, "trl pack_dataset bfd", "trl not installed"))
                continue
            r = measure_in_subprocess(os.path.join(tmp, "data"),
                                      os.path.join(tmp, f"packed-{peer}.arrow"), peer)  # fmt: skip
            note = (f"{r['input_bytes'] / 1e9:.2f} GB in, {r['rows']:,} rows; peak anon "
                    f"+{r['peak_anon_above_baseline_mb']:.0f} MB, file-backed "
                    f"+{r['peak_file_backed_above_baseline_mb']:.0f} MB, VmHWM "
                    f"+{r['peak_rss_above_baseline_mb']:.0f} MB; memory-mapped output: "
                    f"{r['output_memory_mapped']}")  # fmt: skip
            impl = "mixtape pack_sequences (disk)" if peer == "mixtape" else "trl pack_dataset bfd"
            out.append(Measurement(name, impl, r["seconds"], peer == "mixtape", note))
        if not quick:
            why = "about 50x slower: run with --quick (64 MB) to compare"
            out.append(skipped(name, "trl pack_dataset bfd", why))
    return out
