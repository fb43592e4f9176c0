"""``mixtape bench``: side-by-side timings of mixtape against what users run today.

The one implementation behind ``mixtape bench`` and ``benchmarks/compare.py``. Cases register with
:func:`case` (other modules listed in :data:`CASE_MODULES` add theirs); each returns
:class:`Measurement` rows on the same seeded data for every contender. Peers that are not
installed are reported as skipped, never faked.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import itertools
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

__all__ = [
    "CASES",
    "CASE_MODULES",
    "Measurement",
    "case",
    "load_cases",
    "main",
    "micro_batch_docs",
    "pylist_batch",
    "python_lists",
    "ragged_batch",
    "ratios",
    "skipped",
    "timeit",
]


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
CASE_MODULES = ["mixtape.bench", "mixtape.bench_pack", "mixtape.bench_datainf"]


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


def _peer_import(case_name: str, impl: str, module: str) -> tuple[Any, Measurement | None]:
    """The module, or a skipped Measurement saying it is not installed."""
    try:
        return importlib.import_module(module), None
    except ImportError as e:
        return None, skipped(case_name, impl, f"{module} not installed ({e})")


def _gbps(nbytes: int, seconds: float) -> str:
    return f"writes {nbytes / seconds / 1e9:.1f} GB/s"


# --- cases -------------------------------------------------------------------------------------


@case("pad-ragged")
def pad_ragged(quick: bool) -> list[Measurement]:
    """4096 int64 sequences, lengths uniform 16..2048 -> dense [n, L] ids (same data for all)."""
    from mixtape import ops

    name = "pad-ragged"
    n = 512 if quick else 4096
    repeat = 3 if quick else 15
    values, offsets = ragged_batch(0, n, 16, 2048)
    length = int(np.diff(offsets).max())
    nbytes = n * length * values.itemsize
    out: list[Measurement] = []

    def fresh() -> object:
        return ops.pad(values, offsets, return_attention_mask=False)

    buf = {"input_ids": np.empty((n, length), dtype=np.int64)}

    def reused() -> object:
        return ops.pad(values, offsets, return_attention_mask=False, out=buf)

    t = timeit(fresh, repeat)
    out.append(Measurement(name, "mixtape pad (fresh output)", t, True, _gbps(nbytes, t)))
    t = timeit(reused, repeat)
    out.append(Measurement(name, "mixtape pad (reused output)", t, True, _gbps(nbytes, t)))

    torch, missing = _peer_import(name, "torch pad_sequence", "torch")
    if missing:
        out.append(missing)
    else:
        seqs = [torch.from_numpy(values[offsets[i] : offsets[i + 1]]) for i in range(n)]
        t = timeit(lambda: torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True), repeat)
        out.append(Measurement(name, "torch pad_sequence", t, False, "list of tensors"))

    rows = [values[offsets[i] : offsets[i + 1]] for i in range(n)]

    def numpy_rows() -> object:
        dense = np.zeros((n, length), dtype=np.int64)
        for i, row in enumerate(rows):
            dense[i, : row.size] = row
        return dense

    out.append(Measurement(name, "numpy per-row copy", timeit(numpy_rows, repeat), False))

    src = np.random.default_rng(1).integers(0, 50_000, (n, length))
    dst = np.empty_like(src)
    t = timeit(lambda: np.copyto(dst, src), repeat)
    out.append(
        Measurement(name, "numpy.copyto, same bytes (limit)", t, False, _gbps(nbytes, t))
    )
    return out


def python_lists(values: npt.NDArray[Any], offsets: npt.NDArray[np.int64]) -> list[list[int]]:
    """The ragged batch as lists of Python ints (what a HF Dataset row holds)."""
    return [values[offsets[i] : offsets[i + 1]].tolist() for i in range(offsets.size - 1)]


def micro_batch_docs(seed: int = 2) -> list[list[int]]:
    """~100 documents totalling ~32k tokens (lengths uniform 64..576), as Python int lists."""
    return python_lists(*ragged_batch(seed, 100, 64, 576, vocab=256))


def pylist_batch(seed: int = 3) -> list[list[int]]:
    """64 examples, lengths uniform 32..2048, as Python int lists."""
    return python_lists(*ragged_batch(seed, 64, 32, 2048, vocab=256))


def _byt5() -> Any:
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


@case("flatten-microbatch")
def flatten_microbatch(quick: bool) -> list[Measurement]:
    """~32k tokens in ~100 documents -> one padding-free [1, T] row (DataCollatorWithFlattening)."""
    import pyarrow as pa

    from mixtape.collate import create_flattening_collate

    name = "flatten-microbatch"
    repeat = 5 if quick else 25
    docs = micro_batch_docs()
    tokens = sum(len(d) for d in docs)
    examples = [{"input_ids": d} for d in docs]
    # As a pre-tokenized HF Dataset stores them (list<int32>), one Arrow batch from the loader.
    record_batch = pa.RecordBatch.from_pydict(
        {"input_ids": pa.array(docs, type=pa.list_(pa.int32()))}
    )
    ours = create_flattening_collate()
    note = f"{len(docs)} docs, {tokens} tokens"
    fast = 20 if quick else 200  # sub-millisecond: more calls for a stable median
    out = [
        Measurement(name, "mixtape flatten (Arrow batch)",
                    timeit(lambda: ours(record_batch), fast, warmup=5), True, note),
        Measurement(name, "mixtape flatten (list of dicts)",
                    timeit(lambda: ours(examples), fast, warmup=5), True),
    ]  # fmt: skip
    tf, missing = _peer_import(name, "transformers DataCollatorWithFlattening", "transformers")
    if missing:
        out.append(missing)
        out.append(skipped(name, "transformers DataCollatorWithPadding", missing.note[9:]))
        return out
    flattening = tf.DataCollatorWithFlattening()
    out.append(
        Measurement(name, "transformers DataCollatorWithFlattening",
                    timeit(lambda: flattening(examples), repeat), False, "list of dicts")
    )  # fmt: skip
    padding = tf.DataCollatorWithPadding(_byt5())
    out.append(
        Measurement(name, "transformers DataCollatorWithPadding",
                    timeit(lambda: padding(examples), repeat), False, "list of dicts, pads")
    )  # fmt: skip
    return out


@case("pad-pylists")
def pad_pylists(quick: bool) -> list[Measurement]:
    """64 examples given as lists of Python ints, lengths uniform 32..2048 -> padded batch."""
    from mixtape.collate import create_collate_fn

    name = "pad-pylists"
    repeat = 5 if quick else 25
    ids = pylist_batch()
    examples = [{"input_ids": x} for x in ids]
    total = sum(map(len, ids))
    ours = create_collate_fn(pad_token_id=0)
    fast = 10 if quick else 100
    out = [
        Measurement(name, "mixtape collate (list of dicts)",
                    timeit(lambda: ours(examples), fast, warmup=5), True),
    ]  # fmt: skip
    tf, missing = _peer_import(name, "transformers DataCollatorWithPadding", "transformers")
    if missing:
        out.append(missing)
    else:
        padding = tf.DataCollatorWithPadding(_byt5())
        out.append(
            Measurement(name, "transformers DataCollatorWithPadding",
                        timeit(lambda: padding(examples), repeat), False, "ByT5Tokenizer")
        )  # fmt: skip
    torch, missing = _peer_import(name, "pad_sequence([torch.tensor(x) ...])", "torch")
    if missing:
        out.append(missing)
    else:

        def one_liner() -> object:
            return torch.nn.utils.rnn.pad_sequence(
                [torch.tensor(x) for x in ids], batch_first=True, padding_value=0
            )

        out.append(
            Measurement(name, "pad_sequence([torch.tensor(x) ...])", timeit(one_liner, repeat),
                        False, "ids only, no mask")
        )  # fmt: skip

    def floor() -> object:
        return np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=total)

    out.append(
        Measurement(name, "numpy reads the same ints (floor)", timeit(floor, fast, 5), False,
                    f"{total} ints")
    )  # fmt: skip
    return out


# --- output ------------------------------------------------------------------------------------


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
    from mixtape.bench import main as _main

    sys.exit(_main())
