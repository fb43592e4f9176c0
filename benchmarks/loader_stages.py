"""Where the packing loader's time per batch goes, and what its workers cost.

Data of the ``loader-e2e`` case (3 x 100k pre-tokenized HF Datasets, .5/.3/.2, batches of 8
packed 4096-token rows). Prints, over ``--batches`` batches after the first:

- with no workers: wall time per batch and its parts (planning in the sampler, reading the pieces,
  collating; the rest is the DataLoader and the loop), the mean of each, and the one-off costs;
- with ``--workers`` workers: wall time, main-process CPU and the workers' CPU per batch, and
  the one-off costs (building the loader, the first batch while the workers start, the shut-down
  joining them; ``mixtape bench``'s loader case counts all three), alternating so they share
  the machine's load: workers collating into the loader's shared-memory ring 4 batches per
  DataLoader task (the default) or 1, or a batch sent as its pieces and collated in the main
  process (no ring) through the result pipe the loader widens to 1 MB, or the default 64 KB.

    python benchmarks/loader_stages.py [--batches 300] [--workers 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run(dss: list[Any], workers: int, batches: int,
         per_task: int | None = None) -> dict[str, float]:  # fmt: skip
    """Seconds: building the mixture and loader, the first batch (worker start-up included),
    then per batch over ``batches`` more (wall, main-process CPU, the workers' CPU), and the
    shut-down (workers joined)."""
    t = time.perf_counter()
    mixed = MixedDataset(dict(zip(NAMES, dss, strict=True)), dict(zip(NAMES, WEIGHTS, strict=True)),
                         seed=0)  # fmt: skip
    loader = get_loader(mixed, 8, packing="bfd", max_length=4096, collate_fn="packed",
                        collate_kwargs={"attention": "flash"}, num_workers=workers,
                        batches_per_task=per_task)  # fmt: skip
    out = {"build": time.perf_counter() - t}
    t = time.perf_counter()
    it = iter(loader)
    next(it)
    out["first"] = time.perf_counter() - t
    procs = getattr(loader.dataloader._iterator, "_workers", [])
    w0 = sum(_cpu_seconds(p.pid) for p in procs)
    t, c = time.perf_counter(), time.process_time()
    for _, _batch in zip(range(batches), it, strict=False):
        pass
    out["wall"] = (time.perf_counter() - t) / batches
    out["cpu"] = (time.process_time() - c) / batches
    out["workers"] = (sum(_cpu_seconds(p.pid) for p in procs) - w0) / batches
    t = time.perf_counter()
    del it, loader, _batch  # the workers are joined here (no cycle keeps the loader)
    out["shutdown"] = time.perf_counter() - t
    return out


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
            r = _run(dss, 0, args.batches)
            means = {k: float(np.mean(v[-args.batches:])) for k, v in parts.items()}
            rest = r["wall"] - sum(means.values())
            print(f"  {r['wall'] * 1e3:.3f} ms: " + ", ".join(
                f"{k} {v * 1e3:.3f}" for k, v in means.items()) + f", rest {rest * 1e3:.3f}; "
                f"building / first batch / shut-down {r['build'] * 1e3:.1f} / "
                f"{r['first'] * 1e3:.1f} / {r['shutdown'] * 1e3:.1f} ms")  # fmt: skip
    finally:
        for u in undo:
            u()

    widen, layout = loader_mod._widen_result_pipe, loader_mod.Loader._ring_layout
    no_ring = lambda self, c: None  # noqa: E731
    variants: list[tuple[str, Any, Any, int | None]] = [
        ("ring, 4 per task (default)", widen, layout, None),
        ("ring, 1 per task", widen, layout, 1),
        ("pieces, 1 per task", widen, no_ring, 1),
        ("pieces, 1, pipe 64 KB", lambda batches: None, no_ring, 1),
    ]
    print(f"{args.workers} workers, per batch: wall / main-process CPU / workers' CPU; then "
          "building the loader, the first batch (workers starting) and the shut-down:")
    for _ in range(args.repeat):
        for label, pipe, ring, per_task in variants:
            loader_mod._widen_result_pipe = pipe
            loader_mod.Loader._ring_layout = ring  # type: ignore[method-assign]
            try:
                r = _run(dss, args.workers, args.batches, per_task)
            finally:
                loader_mod._widen_result_pipe = widen
                loader_mod.Loader._ring_layout = layout  # type: ignore[method-assign]
            ms = {k: v * 1e3 for k, v in r.items()}
            print(f"  {label:<27} {ms['wall']:.3f} / {ms['cpu']:.3f} / {ms['workers']:.3f} ms; "
                  f"{ms['build']:.1f} / {ms['first']:.1f} / {ms['shutdown']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
