"""End-to-end loader case for ``mixtape bench``: mixture -> packed 4096-token training batches.

Data for every contender: three pre-tokenized HF Datasets (:func:`mixture_datasets`: lognormal
lengths around 300 tokens, int32 ids), weights 0.5 / 0.3 / 0.2, batches of 8 packed rows of 4096
tokens (best-fit decreasing; no document is longer than a row, so truncate / split agree).

- mixtape: ``get_loader(MixedDataset(...), 8, packing="bfd", max_length=4096,
  collate_fn="packed", collate_kwargs={"attention": "flash"}, num_workers=W)``. Timed: building
  the MixedDataset and the loader, reading the sources' lengths, planning, fetching and
  collating N batches (worker start-up included).
- HF map-style: ``datasets.interleave_datasets(..., probabilities, seed=0,
  stopping_strategy="all_exhausted")`` + TRL ``pack_dataset(..., 4096, strategy="bfd")`` (the
  whole interleaved dataset: HF packs before the first batch), then a torch ``DataLoader``
  (batch_size=8) with TRL's padding-free ``DataCollatorForLanguageModeling`` (position ids per
  document from ``seq_lengths``) or ``transformers.DataCollatorWithFlattening`` (which sees a packed
  row as one sequence: position ids per row; left out under --quick). Interleave + pack is a
  one-off preparation, timed once and apart: the plain rows time N batches from a fresh iterator
  over the prepared dataset (steady state, worker start-up included), the "incl. prep" rows add
  the preparation to the same N batches.
- HF streaming: ``to_iterable_dataset(num_shards=4)`` per source + ``interleave_datasets`` +
  TRL ``pack_dataset`` on the resulting IterableDataset (TRL maps its batched BFD packer lazily,
  1000 examples at a time), same DataLoader and padding-free collator; nothing is prepared ahead,
  so the timed N batches include all of it (with 2 workers each reads its own shards, so HF's
  streamed order depends on the worker count; mixtape's does not).

Every contender is timed from a fresh iterator to its N-th batch; ``seconds`` is that time per
million real (non-padding) tokens delivered (counted in a first, untimed run: see ``_timed``),
so "ours: X" ratios are tokens/s ratios (packing fills rows differently: mixtape packs each
batch from a stream, TRL packs 1000-example windows).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch

from mixtape.bench.core import Measurement, case, peer_import, timeit
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


def _timed(run: Callable[[bool], int], repeat: int, warmup: int) -> tuple[float, int]:
    """Median seconds of ``run`` (N batches) and the tokens they hold, counted in a first,
    untimed run: counting reads mixtape's per-token source ids (padding is -1), while an HF
    batch has no padding and counts by its shape, so counting inside the timed runs would
    charge mixtape for the benchmark's own bookkeeping. Every pipeline gives the same batches
    each run (seeded), so the first run's count holds for all."""
    tokens = run(True)
    timing = timeit(lambda: run(False), repeat=repeat, warmup=max(0, warmup - 1))
    return timing, tokens


def _append_run(into: list[int], run: Callable[[], int]) -> None:
    into.append(run())


def _row(impl: str, ours: bool, sec: float, tokens: int, n: int, extra: str) -> Measurement:
    """Seconds per million tokens; tokens/s and the raw time of the N batches in the note."""
    note = f"{tokens / sec / 1e6:.2f}M tokens/s; {n} batches in {sec:.3f} s; {extra}"
    return Measurement(NAME, impl, sec / tokens * 1e6, ours, note)


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

    def ours(workers: int, count: bool) -> int:
        mixed = MixedDataset(dict(zip(NAMES, dss, strict=True)), weights, seed=0)
        loader = get_loader(mixed, BATCH_ROWS, packing="bfd", max_length=MAX_LENGTH,
                            collate_fn="packed", collate_kwargs={"attention": "flash"},
                            num_workers=workers)  # fmt: skip
        return _drain(loader, n_batches, count)

    for w in WORKERS:
        sec, tok = _timed(partial(ours, w), repeat, 1)
        out.append(_row(f"mixtape get_loader (num_workers={w})", True, sec, tok, n_batches,
                        "includes building the MixedDataset and the loader"))

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
    prepared: list[Any] = []

    def prepare() -> None:
        mix = datasets.interleave_datasets(dss, probabilities=list(WEIGHTS), seed=0,
                                           stopping_strategy="all_exhausted")  # fmt: skip
        prepared[:] = [mix, trl.pack_dataset(mix, MAX_LENGTH, strategy="bfd")]

    t0 = time.perf_counter()
    prepare()
    prep = time.perf_counter() - t0
    mix, packed = prepared
    prep_note = (f"one-off prep {prep:.2f} s (interleave {len(mix):,} rows + pack_dataset -> "
                 f"{len(packed):,} packed rows)")  # fmt: skip

    def hf(ds: Any, collator: Any, workers: int, count: bool = True) -> int:
        dl = torch.utils.data.DataLoader(ds, batch_size=BATCH_ROWS, collate_fn=collator,
                                         num_workers=workers)  # fmt: skip
        return _drain(dl, n_batches, count)

    hf_warmup = 0 if quick else 1
    for label, collator in collators.items():
        for w in WORKERS:
            sec, tok = _timed(partial(hf, packed, collator, w), repeat, hf_warmup)
            impl = f"HF map-style + {label} (num_workers={w})"
            out.append(_row(impl, False, sec, tok, n_batches,
                            f"steady state: without the {prep_note}"))  # fmt: skip
            if collator is padding_free:  # the same N batches with the preparation added
                out.append(_row(impl.replace(" (", " incl. prep ("), False, sec + prep, tok,
                                n_batches, f"the {n_batches} batches + the {prep_note}"))

    def streaming() -> Any:
        streams = [d.to_iterable_dataset(num_shards=4) for d in dss]
        mix = datasets.interleave_datasets(streams, probabilities=list(WEIGHTS), seed=0,
                                           stopping_strategy="all_exhausted")  # fmt: skip
        return trl.pack_dataset(mix, MAX_LENGTH, strategy="bfd")

    def streamed(workers: int) -> int:
        return hf(streaming(), padding_free, workers)

    for w in WORKERS:  # one run each, counted as it goes (an HF batch counts by its shape)
        counted: list[int] = []
        sec = timeit(partial(_append_run, counted, partial(streamed, w)), repeat=1, warmup=0)
        tok = counted[-1]
        out.append(_row(f"HF streaming: to_iterable_dataset + interleave + TRL pack_dataset + "
                        f"padding-free collator (num_workers={w})", False, sec, tok, n_batches,
                        "packing on the fly, everything included; one run"))  # fmt: skip
    return out
