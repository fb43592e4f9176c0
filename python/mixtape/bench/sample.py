"""Sampling cases for ``mixtape bench``: source ids + ordinals of 10M positions, and row
permutations, against what users run today (numpy ``Generator.choice``, ``torch.multinomial``,
a numpy permutation index).

The peers produce source ids alone (no ordinals, no resumable state), from the same weights in the
same process; mixtape's rows include the ordinals. torch runs with its default thread count.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import numpy.typing as npt

from mixtape.bench.core import Measurement, case, skipped, timeit
from mixtape.ops import permute_rows
from mixtape.sampler import SourceSampler

MODES: list[tuple[str, dict[str, Any]]] = [
    ("greedy", {"mode": "greedy"}),
    ("greedy shuffle=1000", {"mode": "greedy", "shuffle": True, "block_size": 1000}),
    ("random", {"mode": "random"}),
    ("block 1000", {"mode": "block", "block_size": 1000}),
]


def bench_weights(num_sources: int) -> npt.NDArray[np.float64]:
    """Seeded weights, uniform 0.1..1 before normalisation (the same for every contender)."""
    w = np.random.default_rng(num_sources).uniform(0.1, 1.0, num_sources)
    out: npt.NDArray[np.float64] = w / w.sum()
    return out


def _sample(
    w: npt.NDArray[np.float64], config: dict[str, Any], n: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]:
    return SourceSampler(w, seed=0, **config).sample(n)


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds / 1e6:.1f}M positions/s"


def _sources_case(name: str, num_sources: int, quick: bool) -> list[Measurement]:
    n = 1_000_000 if quick else 10_000_000
    repeat = 3 if quick else 7
    w = bench_weights(num_sources)
    out: list[Measurement] = []
    for label, config in MODES:
        run = functools.partial(_sample, w, config, n)
        src, _ = run()
        share = float(np.abs(np.bincount(src, minlength=num_sources) / n - w).max())
        sec = timeit(run, repeat)
        note = f"{_rate(n, sec)}; ids + ordinals; max |share - w| = {share:.1e}"
        out.append(Measurement(name, f"mixtape {label}", sec, True, note))

    rng = np.random.default_rng(0)
    sec = timeit(lambda: rng.choice(num_sources, size=n, p=w), repeat)
    out.append(Measurement(name, "numpy Generator.choice", sec, False, f"{_rate(n, sec)}; ids"))
    try:
        import torch
    except ImportError as e:
        out.append(skipped(name, "torch.multinomial", str(e)))
        return out
    tw = torch.from_numpy(w)
    sec = timeit(lambda: torch.multinomial(tw, n, replacement=True), repeat)
    note = f"{_rate(n, sec)}; ids; {torch.get_num_threads()} threads"
    out.append(Measurement(name, "torch.multinomial", sec, False, note))
    return out


@case("sample-sources")
def bench_sample_sources(quick: bool) -> list[Measurement]:
    """Source ids (+ ordinals) of 10M positions from 3 weighted sources, each mode vs peers."""
    return _sources_case("sample-sources", 3, quick)


@case("sample-sources-64")
def bench_sample_sources_64(quick: bool) -> list[Measurement]:
    """Source ids (+ ordinals) of 10M positions from 64 weighted sources, each mode vs peers."""
    return _sources_case("sample-sources-64", 64, quick)


@case("sample-rows")
def bench_sample_rows(quick: bool) -> list[Measurement]:
    """Rows of 10M ordinals of a 10M-row source (one pass, shuffled) vs a numpy index."""
    name = "sample-rows"
    n = 1_000_000 if quick else 10_000_000
    repeat = 3 if quick else 7
    ordinals = np.arange(n, dtype=np.int64)
    rows = permute_rows(ordinals, n, seed=0, source=0)
    ok = bool(np.array_equal(np.sort(rows), ordinals))
    sec = timeit(lambda: permute_rows(ordinals, n, seed=0, source=0), repeat)
    out = [Measurement(name, "mixtape permute_rows", sec, True,
                       f"{_rate(n, sec)}; no index array; a permutation: {ok}")]  # fmt: skip
    big = 10**9
    sec = timeit(lambda: permute_rows(ordinals, big, seed=0, source=0), repeat)
    note = f"{_rate(n, sec)}; the same ordinals of a 1e9-row source"
    out.append(Measurement(name, "mixtape permute_rows (1B-row source)", sec, True, note))
    rng = np.random.default_rng(0)

    def numpy_index() -> object:
        return rng.permutation(n)[ordinals]

    sec = timeit(numpy_index, repeat)
    out.append(Measurement(name, "numpy permutation + take", sec, False,
                           f"{_rate(n, sec)}; an int64 index of every row (80 MB here, 8 GB "
                           "for 1e9 rows)"))  # fmt: skip
    return out
