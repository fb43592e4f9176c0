"""The packing loader's batch plans against the planner's contract written out in numpy (one
document at a time from the mixture, pack_plan, the fullest rows, the carry): the C++ step
(ops.pack_batch), the read-ahead with running sums and the checks change nothing."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import datasets
import numpy as np
import pytest

from mixtape import MixedDataset
from mixtape.loader import get_loader
from mixtape.ops import pack_plan

datasets.disable_progress_bars()


def corpus(seed: int, n: int, high: int, empty_every: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, 100, int(rng.integers(1, high))).tolist() for _ in range(n)]
    if empty_every:
        docs = [[] if i % empty_every == 3 else d for i, d in enumerate(docs)]
    return datasets.Dataset.from_dict({"input_ids": docs}, features=datasets.Features(
        {"input_ids": datasets.List(datasets.Value("int32"))}))  # fmt: skip


def mixture(empty_every: int, stop: str) -> MixedDataset:
    return MixedDataset({"a": corpus(1, 120, 70, empty_every), "b": corpus(2, 80, 30)},
                        {"a": 0.6, "b": 0.4}, seed=3, stop_strategy=stop)  # fmt: skip


class ReferencePlanner:
    """The contract, one document at a time (no read-ahead, no kernel)."""

    def __init__(self, mixed: MixedDataset, b: int, cap: int, strategy: str, overflow: str,
                 drop_empty: bool, drop_last: bool) -> None:  # fmt: skip
        self.mixed, self.b, self.cap, self.strategy = mixed, b, cap, strategy
        self.overflow, self.drop_empty, self.drop_last = overflow, drop_empty, drop_last
        self.lengths = [np.asarray([len(x) for x in mixed.source(k).dataset["input_ids"]])
                        for k in range(len(mixed.source_names))]  # fmt: skip
        self.position, self.carry = 0, []  # carry: [source, row, start, length]
        self.stop = mixed.stop_position()

    def batch(self) -> tuple[list[list[int]], list[int]] | None:
        items, have = list(self.carry), sum(c[3] for c in self.carry)
        while have < self.b * self.cap and (self.stop is None or self.position < self.stop):
            plan = self.mixed.plan(self.position, 1)
            k, row = int(plan.sources[0]), int(plan.rows[0])
            self.position += 1
            n = int(self.lengths[k][row])
            name = self.mixed.source_names[k]
            if n == 0 and not self.drop_empty:
                raise ValueError(f"source {name!r} row {row} has no tokens")
            if n > self.cap and self.overflow == "error":
                raise ValueError(f"source {name!r} row {row} has {n} tokens")
            if n > self.cap and self.overflow == "drop":
                continue
            if self.overflow == "truncate":
                n = min(n, self.cap)
            items += [[k, row, s, min(self.cap, n - s)] for s in range(0, n, self.cap)]
            have += min(n, self.cap)  # a document counts at most a row
        if not items:
            return None
        arr = np.asarray(items, dtype=np.int64)
        pp = pack_plan(arr[:, 3], self.cap, strategy=self.strategy, overflow="error")
        per_row = np.diff(pp.row_offsets)
        used = [int(pp.length[a:z].sum()) for a, z in itertools.pairwise(pp.row_offsets)]
        keep = sorted(sorted(range(pp.num_rows), key=lambda r: -used[r])[: self.b])
        if len(keep) < self.b and self.drop_last:
            return None
        rows = [arr[pp.doc[a:z]].tolist() for a, z in itertools.pairwise(pp.row_offsets)]
        self.carry = [p for r in range(pp.num_rows) if r not in keep for p in rows[r]]
        return [p for r in keep for p in rows[r]], [int(per_row[r]) for r in keep]


def _plans(step: Callable[[], Any], n: int) -> list[Any]:
    """Up to ``n`` plans of ``step()``; None ends them, a ValueError ends them with its text."""
    out: list[Any] = []
    try:
        for _ in range(n):
            got = step()
            if got is None:
                return [*out, None]
            out.append(got)
    except ValueError as e:
        out.append(("error", str(e).split(" has ")[0]))
    return out


def loader_plans(loader: Any, n: int) -> list[Any]:
    loader._start_requests()

    def step() -> Any:
        req = loader._next_request()
        if req is None:
            return None
        pieces = np.stack([req.sources.astype(np.int64), req.rows, req.starts, req.lengths],
                          axis=1).tolist()  # fmt: skip
        return pieces, np.diff(req.row_offsets).tolist()

    return _plans(step, n)


def reference_plans(ref: ReferencePlanner, n: int) -> list[Any]:
    return _plans(ref.batch, n)


@pytest.mark.parametrize("strategy", ["bfd", "ffd", "next_fit"])
@pytest.mark.parametrize("overflow", ["split", "truncate", "drop", "error"])
@pytest.mark.parametrize(("empty_every", "drop_empty"), [(0, False), (9, True), (9, False)])
@pytest.mark.parametrize(("stop", "drop_last"), [("restart", False),
                                                 ("first_exhausted", True),
                                                 ("all_exhausted", False)])  # fmt: skip
def test_loader_plans_follow_the_contract(strategy: str, overflow: str, empty_every: int,
                                          drop_empty: bool, stop: str,
                                          drop_last: bool) -> None:  # fmt: skip
    b, cap = 3, 48
    loader = get_loader(mixture(empty_every, stop), b, packing=strategy, max_length=cap,
                        collate_fn="packed", collate_kwargs={"attention": "flash"},
                        overflow=overflow, drop_empty=drop_empty, drop_last=drop_last)  # fmt: skip
    ref = ReferencePlanner(mixture(empty_every, stop), b, cap, strategy, overflow, drop_empty,
                           drop_last)  # fmt: skip
    got = loader_plans(loader, 60)
    assert got == reference_plans(ref, 60)
    assert len(got) > 3 or got[-1][0] == "error"  # documents past a row: refused, naming one


def test_resumed_plans_continue_the_sequence() -> None:
    """The cursor (position + carry) saved mid-run gives the uninterrupted run's next plans."""
    opts = {"packing": "bfd", "max_length": 48, "collate_fn": "packed",
            "collate_kwargs": {"attention": "flash"}}  # fmt: skip
    full = loader_plans(get_loader(mixture(0, "restart"), 3, **opts), 40)
    first = get_loader(mixture(0, "restart"), 3, **opts)
    for _ in itertools.islice(first, 17):
        pass
    state = first.state_dict()
    assert state["cursor"]["carry"]  # something is carried across the cut
    resumed = get_loader(mixture(0, "restart"), 3, **opts)
    resumed.load_state_dict(state)
    assert loader_plans(resumed, 23) == full[17:]


def long_docs_mixture() -> MixedDataset:
    """Documents of 1-59 tokens against 16-token rows: batches straddling the end of a read-ahead
    have documents longer than a row on both sides."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 100, int(n)).tolist() for n in rng.integers(1, 60, 5000)]
    return MixedDataset({"a": datasets.Dataset.from_dict({"input_ids": docs})}, seed=0)


def test_plans_do_not_depend_on_where_the_read_ahead_ends() -> None:
    """The planner reads 1024 positions ahead; batches straddling the end of a read-ahead, with
    documents longer than a row (split), equal the one-document-at-a-time contract (before, the
    documents before the end counted whole and those after capped, so a batch depended on where
    the read-ahead had started)."""
    opts = {"packing": "bfd", "max_length": 16, "collate_fn": "packed",
            "collate_kwargs": {"attention": "flash"}}  # fmt: skip
    got = loader_plans(get_loader(long_docs_mixture(), 4, **opts), 1200)
    ref = ReferencePlanner(long_docs_mixture(), 4, 16, "bfd", "split", False, False)
    assert ref.stop is None and got == reference_plans(ref, 1200)


@pytest.mark.parametrize("cut", [1, 150, 290, 420])
def test_resume_with_split_documents_is_exact(cut: int) -> None:
    """A loader resumed from a saved cursor starts its read-ahead there, not where the first run's
    did: the plans after the cut are the uninterrupted run's."""
    opts = {"packing": "bfd", "max_length": 16, "collate_fn": "packed",
            "collate_kwargs": {"attention": "flash"}}  # fmt: skip
    full = loader_plans(get_loader(long_docs_mixture(), 4, **opts), 1200)
    first = get_loader(long_docs_mixture(), 4, **opts)
    for _ in itertools.islice(first, cut):
        pass
    resumed = get_loader(long_docs_mixture(), 4, **opts)
    resumed.load_state_dict(first.state_dict())
    assert loader_plans(resumed, 1200 - cut) == full[cut:]
