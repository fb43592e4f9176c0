"""Where the packing loader's time per batch goes, and what its workers cost the main process.

Data of the ``loader-e2e`` case (3 x 100k pre-tokenized HF Datasets, .5/.3/.2, batches of 8
packed 4096-token rows). Prints, over ``--batches`` batches after the first:

- with no workers: wall time per batch and its parts (planning in the sampler, reading the pieces,
  collating; the rest is the DataLoader and the loop), the mean of each;
- with ``--workers`` workers: wall time and main-process CPU time per batch, with the DataLoader's
  result pipe widened (as the loader does) and left at its default 64 KB, alternating, so the two
  share the machine's load.

    python benchmarks/loader_stages.py [--batches 300] [--workers 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

import mixtape.loader as loader_mod
from mixtape.bench.mixing import WEIGHTS, mixture_datasets
from mixtape.loader import get_loader
from mixtape.mixing import MixedDataset

NAMES = ("a", "b", "c")


def _timed(cls: Any, name: str, into: list[float]) -> Callable[[], None]:
    """Wrap ``cls.name`` to append its wall time to ``into``; returns the undo."""
    orig = getattr(cls, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return orig(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - t)

    setattr(cls, name, wrapper)
    return lambda: setattr(cls, name, orig)


def _run(dss: list[Any], workers: int, batches: int) -> tuple[float, float]:
    """(wall s, main-process CPU s) per batch over ``batches`` batches after the first."""
    mixed = MixedDataset(dict(zip(NAMES, dss, strict=True)), dict(zip(NAMES, WEIGHTS, strict=True)),
                         seed=0)  # fmt: skip
    loader = get_loader(mixed, 8, packing="bfd", max_length=4096, collate_fn="packed",
                        collate_kwargs={"attention": "flash"}, num_workers=workers)  # fmt: skip
    it = iter(loader)
    next(it)
    t, c = time.perf_counter(), time.process_time()
    for _, _batch in zip(range(batches), it, strict=False):
        pass
    return (time.perf_counter() - t) / batches, (time.process_time() - c) / batches


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    dss = mixture_datasets(100_000)

    print(f"no workers, {args.batches} batches of 8 x 4096 (mean per batch):")
    parts: dict[str, list[float]] = defaultdict(list)
    undo = [_timed(loader_mod._PackPlanner, "batch", parts["planning"]),
            _timed(loader_mod._Fetcher, "_packed", parts["reading pieces"]),
            _timed(loader_mod.Loader, "_collate_pieces", parts["collating"])]  # fmt: skip
    try:
        for _ in range(args.repeat):
            for v in parts.values():
                v.clear()
            wall, _ = _run(dss, 0, args.batches)
            means = {k: float(np.mean(v[-args.batches:])) for k, v in parts.items()}
            rest = wall - sum(means.values())
            print(f"  {wall * 1e3:.3f} ms: " + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in
                                                       means.items()) + f", rest {rest * 1e3:.3f}")
    finally:
        for u in undo:
            u()

    widen = loader_mod._widen_result_pipe
    print(f"{args.workers} workers (per batch: wall / main-process CPU):")
    for _ in range(args.repeat):
        for label, fn in (("pipe widened to 1 MB", widen), ("default 64 KB pipe", None)):
            loader_mod._widen_result_pipe = fn if fn is not None else (lambda batches: None)
            try:
                wall, cpu = _run(dss, args.workers, args.batches)
            finally:
                loader_mod._widen_result_pipe = widen
            print(f"  {label:<22} {wall * 1e3:.3f} / {cpu * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
