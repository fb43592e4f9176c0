"""ops.pack_batch (the packing loader's per-batch planning) against the numpy steps it replaced."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ops_pack import as_rows, reference_plan

from mixtape import ops
from mixtape.ops import pack_batch, pack_plan


def reference(carry: list[list[int]], sources: list[int], rows: list[int], lengths: list[int],
              capacity: int, batch_size: int, strategy: str) -> dict[str, Any]:  # fmt: skip
    """The planner's numpy steps as they were before the kernel (loader.py at c17ca73), with the
    plan's piece start / length kept (they equal the item's but for ``wrapped``)."""
    doc_len = np.asarray(lengths, dtype=np.int64)
    parts = [np.asarray(carry, dtype=np.int64).reshape(-1, 4)]
    pieces = -(-doc_len // capacity)
    idx = np.repeat(np.arange(doc_len.size), pieces)
    first = np.cumsum(pieces) - pieces
    p_start = (np.arange(idx.size) - first[idx]) * capacity
    p_len = np.minimum(capacity, doc_len[idx] - p_start)
    parts.append(np.stack([np.asarray(sources, dtype=np.int64)[idx],
                           np.asarray(rows, dtype=np.int64)[idx], p_start, p_len], axis=1))
    items = np.concatenate(parts)
    if not len(items):
        return {"num_rows": 0}
    pp = pack_plan(items[:, 3], capacity, strategy=strategy, overflow="error")
    per_row = np.diff(pp.row_offsets)
    used = np.bincount(np.repeat(np.arange(pp.num_rows), per_row), weights=pp.length,
                       minlength=pp.num_rows)  # fmt: skip
    keep = np.sort(np.argsort(-used, kind="stable")[:batch_size])
    is_kept = np.zeros(pp.num_rows, dtype=bool)
    is_kept[keep] = True
    piece_row = np.repeat(np.arange(pp.num_rows), per_row)
    whole = items[pp.doc].copy()
    whole[:, 2] += pp.start
    whole[:, 3] = pp.length
    chosen = whole[is_kept[piece_row]]
    row_offsets = np.zeros(keep.size + 1, dtype=np.int64)
    np.cumsum(per_row[keep], out=row_offsets[1:])
    carried = whole[~is_kept[piece_row]]
    return {"num_rows": pp.num_rows, "chosen": chosen.tolist(), "row_offsets": row_offsets.tolist(),
            "carry": carried.tolist()}  # fmt: skip


def check(carry: list[list[int]], sources: list[int], rows: list[int], lengths: list[int],
          capacity: int, batch_size: int, strategy: str) -> ops.PackBatch:  # fmt: skip
    got = pack_batch(carry, sources, rows, lengths, capacity=capacity, batch_size=batch_size,
                     strategy=strategy)  # fmt: skip
    ref = reference(carry, sources, rows, lengths, capacity, batch_size, strategy)
    assert got.num_rows == ref["num_rows"]
    if not ref["num_rows"]:
        return got
    chosen = np.stack([got.sources.astype(np.int64), got.rows, got.starts, got.lengths], axis=1)
    assert got.sources.dtype == np.int32
    assert chosen.tolist() == ref["chosen"]
    assert got.row_offsets.tolist() == ref["row_offsets"]
    assert got.carry.shape == (len(ref["carry"]), 4)
    assert got.carry.tolist() == ref["carry"]
    assert got.carry_tokens == sum(c[3] for c in ref["carry"])
    return got


pieces_st = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 50), st.integers(0, 30),
                               st.integers(1, 32)), max_size=12)  # fmt: skip
docs_st = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10**6), st.integers(0, 120)),
                   max_size=40)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(carry=pieces_st, docs=docs_st, capacity=st.sampled_from([32, 40, 64]),
       batch_size=st.integers(1, 5),
       strategy=st.sampled_from(["bfd", "ffd", "next_fit"]))  # fmt: skip
def test_matches_the_numpy_steps(carry: list[tuple[int, int, int, int]],
                                 docs: list[tuple[int, int, int]], capacity: int,
                                 batch_size: int, strategy: str) -> None:  # fmt: skip
    c = [list(p) for p in carry]
    s, r, ln = ([d[i] for d in docs] for i in range(3))
    check(c, s, r, ln, capacity, batch_size, strategy)


@settings(max_examples=100, deadline=None)
@given(carry=pieces_st, docs=docs_st, batch_size=st.integers(1, 5))
def test_wrapped_keeps_the_plans_pieces(carry: list[tuple[int, int, int, int]],
                                        docs: list[tuple[int, int, int]],
                                        batch_size: int) -> None:  # fmt: skip
    """``wrapped`` cuts items between rows: every kept row holds at most C tokens and the kept
    plus carried pieces hold each item's tokens exactly once."""
    cap = 32
    c = [list(p) for p in carry]
    s, r, ln = ([d[i] for d in docs] for i in range(3))
    got = check(c, s, r, ln, cap, batch_size, "wrapped")
    if not got.num_rows:
        return
    assert all(
        int(got.lengths[a:b].sum()) <= cap for a, b in itertools.pairwise(got.row_offsets.tolist())
    )

    def tokens(pieces: Any) -> list[tuple[int, int, int]]:
        return sorted((int(p[0]), int(p[1]), int(p[2]) + t) for p in pieces for t in range(p[3]))

    kept = np.stack([got.sources.astype(np.int64), got.rows, got.starts, got.lengths], axis=1)
    items = c + [[sd, rd, st_, min(cap, n - st_)] for sd, rd, n in docs
                 for st_ in range(0, n, cap)]  # fmt: skip
    assert tokens(list(kept) + list(got.carry)) == tokens(items)


def test_loader_sized_batches() -> None:
    """About a hundred documents against 4096-token rows (the small-input paths of the kernel),
    with long documents split and a carry."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 300))
        lengths = np.minimum(rng.lognormal(5.5, 1.2, n).astype(np.int64), 12000).tolist()
        sources = rng.integers(0, 3, n).tolist()
        rows = rng.integers(0, 10**5, n).tolist()
        carry = [[int(rng.integers(0, 3)), int(rng.integers(0, 10**5)), 0,
                  int(rng.integers(1, 4097))] for _ in range(int(rng.integers(0, 30)))]  # fmt: skip
        for strategy in ("bfd", "ffd", "next_fit"):
            check(carry, sources, rows, lengths, 4096, 8, strategy)


def test_nothing_to_pack() -> None:
    got = pack_batch(np.zeros((0, 4), dtype=np.int64), [0, 1], [3, 4], [0, 0], capacity=8,
                     batch_size=2)  # fmt: skip
    assert got.num_rows == 0 and got.sources.size == 0 and got.carry.shape == (0, 4)
    got = pack_batch([], [], [], [], capacity=8, batch_size=2)
    assert got.num_rows == 0 and got.row_offsets.tolist() == [0]


def test_fewer_rows_than_the_batch() -> None:
    got = pack_batch([[2, 7, 5, 3]], [0], [1], [4], capacity=8, batch_size=4)
    assert got.num_rows == 1 and got.row_offsets.tolist() == [0, 2]
    assert got.carry.shape == (0, 4) and got.carry_tokens == 0


def test_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match="document 1 has length -3"):
        pack_batch([], [0, 0], [1, 2], [4, -3], capacity=8, batch_size=1)
    for bad in ([0, 1, 0, 0], [0, 1, 0, 9], [0, -1, 0, 2], [-1, 1, 0, 2], [0, 1, -2, 2],
                [2**31, 1, 0, 2]):  # fmt: skip
        with pytest.raises(ValueError, match="carried piece 1 is"):
            pack_batch([[0, 0, 0, 1], bad], [], [], [], capacity=8, batch_size=1)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        pack_batch([], [0], [0], [1], capacity=0, batch_size=1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        pack_batch([], [0], [0], [1], capacity=8, batch_size=0)
    with pytest.raises(ValueError, match="strategy must be one of"):
        pack_batch([], [0], [0], [1], capacity=8, batch_size=1, strategy="best")
    with pytest.raises(ValueError, match=r"carry must have shape \(n, 4\)"):
        pack_batch([[0, 1, 2]], [0], [0], [1], capacity=8, batch_size=1)
    with pytest.raises(ValueError, match="one size"):
        pack_batch([], [0, 1], [0], [1], capacity=8, batch_size=1)
    with pytest.raises(TypeError, match="expected integers"):
        pack_batch([], [0], [0], [1.5], capacity=8, batch_size=1)
    with pytest.raises(ValueError, match="does not fit int64"):
        pack_batch([], [0], np.array([2**63], dtype=np.uint64), [1], capacity=8, batch_size=1)


# --- pack_plan's small-input paths (few pieces against a large capacity) ---------------------


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 1300), min_size=0, max_size=300),
       strategy=st.sampled_from(["bfd", "ffd"]), max_docs=st.one_of(st.none(), st.integers(1, 5)),
       align=st.sampled_from([1, 8]))  # fmt: skip
def test_pack_plan_is_the_same_on_both_sides_of_the_small_input_threshold(
    lengths: list[int], strategy: str, max_docs: int | None, align: int
) -> None:
    """Up to 256 pieces (and C / 4) the sort and best fit use O(n) memory instead of C-sized
    tables; split pieces push some inputs over the threshold. Both sides equal the reference."""
    plan = pack_plan(np.asarray(lengths, dtype=np.int64), 1024, strategy=strategy,
                     max_docs_per_row=max_docs, align=align)  # fmt: skip
    assert as_rows(plan) == reference_plan(lengths, 1024, strategy, "split", max_docs, align)


def test_wrapped_packing_loader_rows_hold_max_length_tokens() -> None:
    """With ``wrapped`` a document is cut between rows: each row gets its part (before the
    kernel, the whole document went into both rows, giving rows past max_length)."""
    import datasets

    from mixtape import MixedDataset
    from mixtape.loader import get_loader

    rng = np.random.default_rng(0)
    docs = [list(range(1, int(n) + 1)) for n in rng.integers(1, 40, 200)]
    mixed = MixedDataset({"a": datasets.Dataset.from_dict({"input_ids": docs})}, seed=0)
    loader = get_loader(mixed, 2, packing="wrapped", max_length=32, collate_fn="packed",
                        collate_kwargs={"attention": "flash"})  # fmt: skip
    seen = 0
    for batch in itertools.islice(loader, 5):
        assert batch["input_ids"].shape == (2, 32)
        seen += int((batch["source_ids"] >= 0).sum())
    assert seen == 5 * 2 * 32  # wrapped rows are full


def test_a_huge_document_length_is_an_error_not_a_wrapped_count() -> None:
    with pytest.raises(ValueError, match=r"document 1 has length 9223372036854775807"):
        pack_batch([], [0, 0], [0, 1], [5, 2**63 - 1], capacity=4096, batch_size=1)
