"""Packing statistics against the lower bound ``ceil(tokens / C)``, and ``mixtape pack-stats``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixtape.ops import OVERFLOW_POLICIES, PACK_STRATEGIES, Int64Array, PackPlan, pack_plan
from mixtape.packing.plan import dataset_lengths, synthetic_lengths

# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackingStats:
    """How well a plan packs: rows against the lower bound ``ceil(packed_tokens / capacity)``."""

    capacity: int
    strategy: str
    documents: int
    tokens: int  # input tokens
    packed_tokens: int  # tokens placed in rows (tokens - truncated - dropped)
    rows: int
    slots: int  # rows * capacity
    efficiency: float  # packed_tokens / slots
    lower_bound: int
    gap_rows: int  # rows - lower_bound
    gap_percent: float  # 100 * gap_rows / lower_bound
    pieces: int
    docs_per_row_mean: float
    docs_per_row_max: int
    truncated_tokens: int
    dropped_docs: int
    dropped_tokens: int
    split_docs: int

    @classmethod
    def from_plan(cls, plan: PackPlan) -> PackingStats:
        """Statistics of ``plan`` (all numbers exact; no tokens needed)."""
        c = int(plan.capacity)
        rows = int(plan.num_rows)
        packed = int(plan.packed_tokens)
        per_row = np.diff(plan.row_offsets)
        bound = -(-packed // c)
        gap = rows - bound
        return cls(
            capacity=c, strategy=str(plan.strategy), documents=int(plan.num_docs),
            tokens=int(plan.num_tokens), packed_tokens=packed, rows=rows, slots=rows * c,
            efficiency=packed / (rows * c) if rows else 1.0, lower_bound=bound, gap_rows=gap,
            gap_percent=100.0 * gap / bound if bound else 0.0, pieces=int(plan.doc.size),
            docs_per_row_mean=float(per_row.mean()) if rows else 0.0,
            docs_per_row_max=int(per_row.max()) if rows else 0,
            truncated_tokens=int(plan.truncated_tokens), dropped_docs=int(plan.dropped_docs),
            dropped_tokens=int(plan.dropped_tokens), split_docs=int(plan.split_docs),
        )  # fmt: skip

    @classmethod
    def from_lengths(cls, lengths: Any, capacity: int, **plan_kwargs: Any) -> PackingStats:
        """Plan ``lengths`` into rows of ``capacity`` (``pack_plan`` options) and measure it."""
        return cls.from_plan(pack_plan(lengths, capacity, **plan_kwargs))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lost = self.truncated_tokens + self.dropped_tokens
        lines = [
            f"packing ({self.strategy}, capacity {self.capacity:,})",
            f"  documents      {self.documents:>14,}   pieces {self.pieces:,} "
            f"({self.split_docs:,} documents split)",
            f"  tokens         {self.tokens:>14,}   packed {self.packed_tokens:,}",
            f"  rows           {self.rows:>14,}   slots {self.slots:,}",
            f"  efficiency     {100 * self.efficiency:>13.3f}%",
            f"  lower bound    {self.lower_bound:>14,}   gap {self.gap_rows:,} rows "
            f"({self.gap_percent:.4f}%)",
            f"  docs per row   {self.docs_per_row_mean:>14.2f}   max {self.docs_per_row_max}",
            f"  lost tokens    {lost:>14,}   truncated {self.truncated_tokens:,}, dropped "
            f"{self.dropped_tokens:,} in {self.dropped_docs:,} documents",
        ]
        return "\n".join(lines)



# --------------------------------------------------------------------------------------------
# mixtape pack-stats
# --------------------------------------------------------------------------------------------



def _load_lengths(args: argparse.Namespace) -> tuple[Int64Array, str]:
    if args.synthetic is not None:
        if args.synthetic < 1:
            raise ValueError(f"--synthetic must be >= 1, got {args.synthetic}")
        return synthetic_lengths(args.synthetic, seed=args.seed), f"synthetic {args.synthetic:,}"
    if args.lengths is not None:
        path = Path(args.lengths)
        if not path.exists():
            raise ValueError(f"--lengths: {path} does not exist")
        try:
            raw = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, ndmin=1)
        except ValueError as exc:
            raise ValueError(f"--lengths: {path}: {exc}") from exc
        arr = np.asarray(raw)
        if arr.dtype.kind == "f" and arr.ndim == 1 and np.array_equal(arr, np.rint(arr)):
            arr = arr.astype(np.int64)  # a text file of lengths, e.g. from np.savetxt
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise ValueError(f"--lengths: {path} must hold a 1-D integer array, got "
                             f"{arr.dtype} {arr.shape}")  # fmt: skip
        return arr.astype(np.int64), str(path)
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(args.dataset)
    if isinstance(ds, DatasetDict):
        split = args.split or (next(iter(ds)) if len(ds) == 1 else None)
        if split not in ds:
            raise ValueError(f"--dataset {args.dataset} has splits {list(ds)}; choose with --split")
        ds = ds[split]
    return dataset_lengths(ds, args.column), f"{args.dataset} [{args.column}]"


def stats_main(argv: list[str]) -> int:
    """``mixtape pack-stats``: plan a dataset, a lengths file or synthetic lengths; print stats."""
    parser = argparse.ArgumentParser(
        prog="mixtape pack-stats",
        description="Packing statistics (rows vs the lower bound ceil(tokens / C)).",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="a dataset saved with Dataset.save_to_disk")
    src.add_argument("--lengths", help="a .npy or .txt file of sequence lengths")
    src.add_argument("--synthetic", type=int, metavar="N",
                     help="N lognormal lengths (mean about 300, clipped to 1..8192)")  # fmt: skip
    parser.add_argument("--column", default="input_ids", help="token column (with --dataset)")
    parser.add_argument("--split", default=None, help="split of a saved DatasetDict")
    parser.add_argument("--seed", type=int, default=0, help="seed of --synthetic")
    parser.add_argument("--max-length", type=int, default=4096, help="row capacity C")
    parser.add_argument("--strategy", default="bfd", choices=(*PACK_STRATEGIES, "all"))
    parser.add_argument("--overflow", default="split", choices=OVERFLOW_POLICIES)
    parser.add_argument("--align", type=int, default=1)
    parser.add_argument("--max-docs-per-row", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on errors
        return int(exc.code or 0)
    try:
        lengths, name = _load_lengths(args)
        strategies = PACK_STRATEGIES if args.strategy == "all" else (args.strategy,)
        results = []
        for strategy in strategies:
            t0 = time.perf_counter()
            plan = pack_plan(
                lengths, args.max_length, strategy=strategy, overflow=args.overflow,
                align=args.align, max_docs_per_row=args.max_docs_per_row,
            )  # fmt: skip
            seconds = time.perf_counter() - t0
            results.append((PackingStats.from_plan(plan), seconds))
    except (ValueError, TypeError, OSError) as exc:
        print(f"mixtape pack-stats: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out = [{"source": name, **s.to_dict(), "plan_seconds": sec} for s, sec in results]
        print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    else:
        print(f"source: {name}")
        for s, sec in results:
            print(f"{s}\n  planned in     {sec * 1e3:>13.1f} ms")
    return 0
