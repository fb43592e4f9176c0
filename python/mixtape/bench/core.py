"""The benchmark framework: case registry, timing, side-by-side ratios, the table and ``main``."""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass
class Measurement:
    """One contender's median time on one case; ``seconds`` is NaN when it was skipped."""

    case: str
    impl: str
    seconds: float
    ours: bool
    note: str = ""

    @property
    def skipped(self) -> bool:
        return math.isnan(self.seconds)


CaseFn = Callable[[bool], list[Measurement]]

#: name -> function(quick) returning the measurements of that case, in registration order.
CASES: dict[str, CaseFn] = {}

#: Modules whose import registers cases; missing ones (not written yet) are skipped.
CASE_MODULES = [
    "mixtape.bench.collate",
    "mixtape.bench.pack",
    "mixtape.bench.sources",
    "mixtape.bench.mixing",
    "mixtape.bench.sample",
    "mixtape.bench.datainf",
    "mixtape.bench.loader",
]


def case(name: str) -> Callable[[CaseFn], CaseFn]:
    """Register a benchmark case under ``name``; its docstring's first line is the table title."""

    def register(fn: CaseFn) -> CaseFn:
        if name in CASES and CASES[name] is not fn:
            raise ValueError(f"benchmark case {name!r} is registered twice")
        CASES[name] = fn
        return fn

    return register


def timeit(fn: Callable[[], object], repeat: int = 7, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeat`` calls after ``warmup`` calls, GC off."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    for _ in range(warmup):
        fn()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    finally:
        if was_enabled:
            gc.enable()
    return statistics.median(times)


def skipped(case_name: str, impl: str, why: str) -> Measurement:
    """A peer that could not run here (e.g. not installed): reported, never timed or faked."""
    return Measurement(case_name, impl, float("nan"), ours=False, note=f"skipped: {why}")


def ratios(measurements: list[Measurement]) -> dict[str, dict[str, float]]:
    """peer time / our time, for every (ours, peer) pair that ran: above 1 means we are faster."""
    ours = [m for m in measurements if m.ours and not m.skipped]
    peers = [m for m in measurements if not m.ours and not m.skipped]
    return {o.impl: {p.impl: p.seconds / o.seconds for p in peers} for o in ours}


def load_cases() -> dict[str, CaseFn]:
    """Import every module in CASE_MODULES (registering its cases) and return the registry."""
    for module in CASE_MODULES:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            importlib.import_module(module)
    return CASES


# --- data --------------------------------------------------------------------------------------


def ragged_batch(
    seed: int, n: int, lo: int, hi: int, dtype: npt.DTypeLike = np.int64, vocab: int = 50_000
) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64]]:
    """n sequences, lengths uniform in [lo, hi], ids uniform in [0, vocab): values, offsets."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = rng.integers(0, vocab, int(offsets[-1])).astype(dtype)
    return values, offsets


def peer_import(case_name: str, impl: str, module: str) -> tuple[Any, Measurement | None]:
    """The module, or a skipped Measurement saying it is not installed."""
    try:
        return importlib.import_module(module), None
    except ImportError as e:
        return None, skipped(case_name, impl, f"{module} not installed ({e})")


def gbps(nbytes: int, seconds: float) -> str:
    return f"writes {nbytes / seconds / 1e9:.1f} GB/s"



def _fmt_time(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def _fmt_ratio(r: float) -> str:
    return f"{r:.2f}x faster" if r >= 1 else f"{1 / r:.2f}x slower"


def format_table(title: str, measurements: list[Measurement]) -> str:
    """One case: every contender's time and, for each of our variants, peer time / our time."""
    table = ratios(measurements)
    ours = list(table)
    head = ["impl", "time", *(f"ours: {o}" for o in ours), "note"]
    rows = [head]
    for m in measurements:
        cells = [m.impl + (" *" if m.ours else ""), _fmt_time(m.seconds)]
        for o in ours:
            r = table[o].get(m.impl)
            cells.append(_fmt_ratio(r) if r is not None else "")
        cells.append(m.note)
        rows.append(cells)
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    lines = [title]
    for k, row in enumerate(rows):
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
        lines.append("  " + line.rstrip())
        if k == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
    }
    for mod in ("torch", "transformers", "pyarrow"):
        try:
            env[mod] = importlib.import_module(mod).__version__
        except ImportError:
            env[mod] = None
    from mixtape.ops import build_info

    info = build_info()
    env["mixtape_build"] = {k: info.get(k) for k in ("build_type", "cxx_flags", "cuda_compiled")}
    return env


def _case_title(fn: CaseFn) -> str:
    doc = (fn.__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def main(argv: list[str] | None = None) -> int:
    """Run the selected cases, print one table per case, optionally write JSON. Returns 0/2."""
    parser = argparse.ArgumentParser(
        prog="mixtape bench",
        description="Time mixtape against the usual peers on the same data; ratios are peer "
        "time / our time (above 1: we are faster). Peers that are not installed are skipped.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and repeats (CI smoke)")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--json", metavar="FILE", help="also write machine-readable results")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    cases = load_cases()
    if args.list:
        for name, fn in cases.items():
            print(f"{name:<22} {_case_title(fn)}")
        return 0
    names = list(cases) if not args.cases else [c.strip() for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in cases]
    if unknown:
        print(f"mixtape bench: unknown case(s) {unknown}; known: {list(cases)}", file=sys.stderr)
        return 2
    try:  # quiet peers' advisory logging (not errors) while timing them
        hf_logging: Any = importlib.import_module("transformers.utils.logging")
        hf_logging.set_verbosity_error()
    except ImportError:
        pass

    env = _environment()
    print(
        f"mixtape bench{' --quick' if args.quick else ''}: {env['cpu_count']} CPUs, "
        f"torch {env['torch']}, transformers {env['transformers']}, numpy {env['numpy']}; "
        "median wall time; * = mixtape; 'ours: X' = peer time / time of X\n"
    )
    results: dict[str, Any] = {}
    for name in names:
        fn = cases[name]
        measurements = fn(args.quick)
        print(format_table(f"[{name}] {_case_title(fn)}", measurements), end="\n\n", flush=True)
        results[name] = {
            "description": _case_title(fn),
            "ours": {m.impl: m.seconds for m in measurements if m.ours},
            "peers": {
                m.impl: None if m.skipped else m.seconds for m in measurements if not m.ours
            },
            "ratios": ratios(measurements),
            "notes": {m.impl: m.note for m in measurements if m.note},
            "measurements": [
                {**asdict(m), "seconds": None if m.skipped else m.seconds} for m in measurements
            ],
        }
    if args.json:
        payload = {"quick": args.quick, "environment": env, "cases": results}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":  # run the registry of the importable module, not of __main__
    from mixtape.bench.core import main as _main

    sys.exit(_main())
