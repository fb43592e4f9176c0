"""End-to-end loader case for ``mixtape bench``: mixture -> packed 4096-token training batches.

Data for every contender: three pre-tokenized HF Datasets (:func:`mixture_datasets`: lognormal
lengths around 300 tokens, int32 ids), weights 0.5 / 0.3 / 0.2, batches of 8 packed rows of 4096
tokens (best-fit decreasing; no document is longer than a row, so truncate / split agree).

- mixtape: ``get_loader(MixedDataset(...), 8, packing="bfd", max_length=4096,
  collate_fn="packed", collate_kwargs={"attention": "flash"}, num_workers=W)``; its start-up
  is building the MixedDataset and the loader, reading the sources' lengths and the first batch.
- HF map-style: ``datasets.interleave_datasets(..., probabilities, seed=0,
  stopping_strategy="all_exhausted")`` + TRL ``pack_dataset(..., 4096, strategy="bfd")`` (the
  whole interleaved dataset: HF packs before the first batch), then a torch ``DataLoader``
  (batch_size=8) with TRL's padding-free ``DataCollatorForLanguageModeling`` (position ids per
  document from ``seq_lengths``) or ``transformers.DataCollatorWithFlattening`` (which sees a packed
  row as one sequence: position ids per row; left out under --quick). Interleave + pack is a
  one-off preparation, timed once and apart, and added to the "everything" rows.
- HF streaming: ``to_iterable_dataset(num_shards=4)`` per source + ``interleave_datasets`` +
  TRL ``pack_dataset`` on the resulting IterableDataset (TRL maps its batched BFD packer lazily,
  1000 examples at a time), same DataLoader and padding-free collator; nothing is prepared ahead:
  its start-up fills the first packing window, the N batches pack as they go; one run (with 2
  workers each reads its own shards, so HF's streamed order depends on the worker count;
  mixtape's does not).

Every run of every contender is split in three (:func:`_phases`): start-up (building the
pipeline and taking its first batch: loader or DataLoader, worker start), the next N batches,
and shut-down (workers joined). The plain rows are the N batches only (steady state, as a
training run sees them after its first step); the "everything" rows add the start-up, the
shut-down and, for HF map-style, the one-off interleave + pack. ``seconds`` is time per
million real (non-padding) tokens of the N batches (counted in a first, untimed run: see
``_timed``), so "ours: X" ratios are tokens/s ratios (packing fills rows differently: mixtape
packs each batch from a stream, TRL packs 1000-example windows). Compare like with like:
steady state with steady state, everything with everything.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, NamedTuple

import torch

from mixtape.bench.core import Measurement, case, peer_import
from mixtape.bench.mixing import WEIGHTS, mixture_datasets

NAME = "loader-e2e"
BATCH_ROWS = 8
MAX_LENGTH = 4096
WORKERS = (0, 2)
NAMES = ("a", "b", "c")


def _tokens(batch: dict[str, Any]) -> int:
    """Real tokens in a batch: mixtape marks padding with source id -1; HF flattens (no pad)."""
    if "source_ids" in batch:
        return int((batch["source_ids"] >= 0).sum())
    return int(batch["input_ids"].numel())


def _drain(batches: Iterable[dict[str, Any]], n: int, count: bool = True) -> int:
    """Tokens in the first ``n`` batches of ``batches`` (fails if there are fewer); with
    ``count=False`` the batches are only taken (0 returned)."""
    got, tokens = 0, 0
    for batch in batches:
        if count:
            tokens += _tokens(batch)
        got += 1
        if got == n:
            return tokens
    raise RuntimeError(f"{NAME}: the pipeline ended after {got} of {n} batches")


class Phases(NamedTuple):
    """Seconds of one run: start-up (to the first batch), the N batches after it, shut-down."""

    start: float
    batches: float
    stop: float

    @property
    def total(self) -> float:
        return self.start + self.batches + self.stop


def _phases(make: Callable[[], Iterable[dict[str, Any]]], n: int,
            count: bool) -> tuple[Phases, int]:  # fmt: skip
    """One run of a pipeline: ``make()`` builds it, its first batch ends the start-up, then ``n``
    batches (their real tokens counted when ``count``), then its workers are shut down."""
    t0 = time.perf_counter()
    src = make()
    it = iter(src)
    if next(it, None) is None:
        raise RuntimeError(f"{NAME}: the pipeline gave no batch")
    t1 = time.perf_counter()
    tokens = _drain(it, n, count)
    t2 = time.perf_counter()
    live = getattr(src, "_live", None)  # a mixtape Loader: its running torch iterator
    workers = live() if live is not None else getattr(src, "_iterator", None)
    if workers is None:  # not `or`: the truth test of an iterator may call its __len__
        workers = it
    shutdown = getattr(workers, "_shutdown_workers", None)  # torch's multi-process iterator
    if shutdown is not None:
        shutdown()
    t3 = time.perf_counter()
    return Phases(t1 - t0, t2 - t1, t3 - t2), tokens


def _timed(make: Callable[[], Iterable[dict[str, Any]]], n: int, repeat: int,
           warmup: int) -> tuple[Phases, int]:  # fmt: skip
    """The median of each phase over ``repeat`` runs, and the tokens of the N batches, counted in
    a first, untimed run: counting reads mixtape's per-token source ids (padding is -1), while
    an HF batch has no padding and counts by its shape, so counting inside the timed runs would
    charge mixtape for the benchmark's own bookkeeping. Every pipeline gives the same batches
    each run (seeded), so the first run's count holds for all. GC runs between runs only."""
    tokens = _phases(make, n, True)[1]
    for _ in range(max(0, warmup - 1)):
        _phases(make, n, False)
    runs = []
    for _ in range(repeat):
        gc.collect()
        gc.disable()
        try:
            runs.append(_phases(make, n, False)[0])
        finally:
            gc.enable()
    return Phases(*(statistics.median(p) for p in zip(*runs, strict=True))), tokens


def _row(impl: str, ours: bool, sec: float, tokens: int, n: int, extra: str) -> Measurement:
    """Seconds per million tokens; tokens/s and the raw time of the N batches in the note."""
    note = f"{tokens / sec / 1e6:.2f}M tokens/s; {n} batches in {sec:.3f} s; {extra}"
    return Measurement(NAME, impl, sec / tokens * 1e6, ours, note)


def _rows(impl: str, ours: bool, p: Phases, tokens: int, n: int, prep: float = 0.0,
          prep_note: str = "") -> list[Measurement]:  # fmt: skip
    """The steady-state row (the N batches) and the everything row (start-up, shut-down and any
    one-off preparation added) of one contender."""
    one_off = (f"start-up (to the first batch) {1e3 * p.start:.1f} ms, shut-down "
               f"{1e3 * p.stop:.1f} ms")  # fmt: skip
    if prep:
        one_off += f", {prep_note}"
    everything = impl.replace(" (num_workers", ", everything (num_workers")
    return [_row(impl, ours, p.batches, tokens, n, f"steady state; not counted: {one_off}"),
            _row(everything, ours, p.total + prep, tokens, n, f"counted: {one_off}")]


@case(NAME)
def bench_loader_e2e(quick: bool) -> list[Measurement]:
    """3 x 100k HF Datasets, .5/.3/.2 -> N batches of 8 packed 4096-token rows; s per 1M tokens."""
    from mixtape.loader import get_loader
    from mixtape.mixing import MixedDataset

    n_rows = 1_000 if quick else 100_000  # quick: 20 batches need ~2.2k documents
    n_batches = 20 if quick else 200
    repeat = 1 if quick else 3
    dss = mixture_datasets(n_rows)
    weights = dict(zip(NAMES, WEIGHTS, strict=True))
    out: list[Measurement] = []

    def ours(workers: int) -> Any:
        mixed = MixedDataset(dict(zip(NAMES, dss, strict=True)), weights, seed=0)
        return get_loader(mixed, BATCH_ROWS, packing="bfd", max_length=MAX_LENGTH,
                          collate_fn="packed", collate_kwargs={"attention": "flash"},
                          num_workers=workers)  # fmt: skip

    for w in WORKERS:
        phases, tok = _timed(partial(ours, w), n_batches, repeat, 1)
        out += _rows(f"mixtape get_loader (num_workers={w})", True, phases, tok, n_batches)

    datasets, miss = peer_import(NAME, "datasets + trl", "datasets")
    trl, miss_trl = peer_import(NAME, "datasets + trl", "trl")
    if miss is not None or miss_trl is not None:
        return [*out, miss or miss_trl]  # type: ignore[list-item]
    assert datasets is not None and trl is not None
    datasets.disable_progress_bars()
    padding_free = trl.trainer.sft_trainer.DataCollatorForLanguageModeling(
        pad_token_id=0, padding_free=True, return_position_ids=True)
    collators: dict[str, Any] = {"TRL padding-free collator": padding_free}
    transformers, _ = peer_import(NAME, "transformers", "transformers")
    if transformers is not None and not quick:  # a variant; --quick keeps CI in seconds
        collators["DataCollatorWithFlattening"] = transformers.DataCollatorWithFlattening(
            return_flash_attn_kwargs=True)

    # One-off preparation of the map-style pipeline: interleave + pack everything.
    t0 = time.perf_counter()
    mix = datasets.interleave_datasets(dss, probabilities=list(WEIGHTS), seed=0,
                                       stopping_strategy="all_exhausted")  # fmt: skip
    packed = trl.pack_dataset(mix, MAX_LENGTH, strategy="bfd")
    prep = time.perf_counter() - t0
    prep_note = (f"one-off prep {prep:.2f} s (interleave {len(mix):,} rows + pack_dataset -> "
                 f"{len(packed):,} packed rows)")  # fmt: skip

    def hf(ds: Any, collator: Any, workers: int) -> Any:
        return torch.utils.data.DataLoader(ds, batch_size=BATCH_ROWS, collate_fn=collator,
                                           num_workers=workers)  # fmt: skip

    hf_warmup = 0 if quick else 1
    for label, collator in collators.items():
        for w in WORKERS:
            phases, tok = _timed(partial(hf, packed, collator, w), n_batches, repeat, hf_warmup)
            out += _rows(f"HF map-style + {label} (num_workers={w})", False, phases, tok,
                         n_batches, prep, prep_note)  # fmt: skip

    def streaming(workers: int) -> Any:
        streams = [d.to_iterable_dataset(num_shards=4) for d in dss]
        mix = datasets.interleave_datasets(streams, probabilities=list(WEIGHTS), seed=0,
                                           stopping_strategy="all_exhausted")  # fmt: skip
        return hf(trl.pack_dataset(mix, MAX_LENGTH, strategy="bfd"), padding_free, workers)

    for w in WORKERS:  # one run each, counted as it goes (an HF batch counts by its shape)
        phases, tok = _phases(partial(streaming, w), n_batches, True)
        out += _rows(f"HF streaming: to_iterable_dataset + interleave + TRL pack_dataset + "
                     f"padding-free collator (num_workers={w})", False, phases, tok,
                     n_batches)  # fmt: skip
    return out
