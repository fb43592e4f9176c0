"""Pack planner and fill vs plain-Python references: an independent plan checker, slow
BFD/FFD/next-fit/wrapped, a Python splitmix64 shuffle and a per-token fill loop."""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from typing import Any

import numpy as np
import pytest
import torch
from conftest import DEVICES
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtape import ops
from mixtape.ops import PackPlan, block_causal_mask, pack_fill, pack_plan

MASK64 = (1 << 64) - 1


def lognormal_lengths(n: int, seed: int = 0, mean: float = 300.0, high: int = 8192) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sigma = 1.0
    mu = np.log(mean) - sigma**2 / 2
    return np.clip(np.round(rng.lognormal(mu, sigma, n)), 1, high).astype(np.int64)


def ragged_tokens(lengths: np.ndarray, seed: int = 0, dtype: Any = np.int64) -> tuple:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.random.default_rng(seed).integers(0, 1000, int(offsets[-1])).astype(dtype)
    return values, offsets


# --- the independent checker ---------------------------------------------------------------------


def check_plan(
    plan: PackPlan,
    lengths: list[int],
    capacity: int,
    *,
    strategy: str = "bfd",
    overflow: str = "split",
    max_docs_per_row: int | None = None,
    align: int = 1,
    rows_multiple_of: int | None = None,
) -> None:
    """Every constraint of the contract, from the plan arrays alone."""
    ro = plan.row_offsets.tolist()
    doc, start, length, column = (a.tolist() for a in (plan.doc, plan.start, plan.length,
                                                       plan.column))  # fmt: skip
    assert plan.capacity == capacity and plan.strategy == strategy
    assert plan.num_docs == len(lengths)
    assert ro[0] == 0 and ro[-1] == len(doc)
    assert all(a <= b for a, b in itertools.pairwise(ro))
    pieces_of: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for r in range(plan.num_rows):
        ks = range(ro[r], ro[r + 1])
        if max_docs_per_row is not None:
            assert len(ks) <= max_docs_per_row, f"row {r} has {len(ks)} pieces"
        end = 0
        for k in ks:
            assert length[k] >= 1
            assert column[k] % align == 0, f"piece {k} at column {column[k]}"
            assert column[k] >= end, f"piece {k} overlaps the previous one in row {r}"
            end = column[k] + -(-length[k] // align) * align
            assert end <= capacity, f"row {r} over capacity"
            pieces_of[doc[k]].append((start[k], length[k]))
    split_docs = dropped = dropped_tokens = truncated = 0
    for d, n in enumerate(lengths):
        got = sorted(pieces_of.get(d, []))
        if len(got) > 1:
            split_docs += 1
        if strategy == "wrapped" or n <= capacity or overflow == "split":
            pos = 0
            for s, ln in got:  # contiguous pieces covering the whole document, in order
                assert s == pos, f"document {d}: piece at {s}, expected {pos}"
                pos += ln
            assert pos == n, f"document {d}: pieces cover {pos} of {n} tokens"
            if strategy != "wrapped":
                assert all(ln == capacity for _, ln in got[:-1])
        elif overflow == "truncate":
            assert got == [(0, capacity)]
            truncated += n - capacity
        elif overflow == "drop":
            assert got == []
            dropped += 1
            dropped_tokens += n
        else:
            raise AssertionError(f"document {d} longer than capacity under {overflow!r}")
    assert plan.num_tokens == sum(lengths)
    assert plan.split_docs == split_docs
    assert plan.truncated_tokens == truncated
    assert plan.dropped_docs == dropped and plan.dropped_tokens == dropped_tokens
    assert plan.packed_tokens == sum(lengths) - truncated - dropped_tokens
    m = rows_multiple_of or 1
    assert plan.num_rows % m == 0
    counts = np.diff(plan.row_offsets)
    nonempty = int(np.count_nonzero(counts))
    assert np.all(counts[:nonempty] > 0), "empty rows only at the end"
    assert plan.num_rows - nonempty < m


# --- slow references -----------------------------------------------------------------------------


def reference_pieces(
    lengths: list[int], capacity: int, overflow: str
) -> list[tuple[int, int, int]]:
    items = []
    for d, n in enumerate(lengths):
        if n > capacity:
            if overflow == "drop":
                continue
            if overflow == "truncate":
                n = capacity
        items += [(d, s, min(capacity, n - s)) for s in range(0, n, capacity)]
    return items


def as_rows(plan: PackPlan) -> list[list[tuple[int, int, int, int]]]:
    ro = plan.row_offsets
    return [
        list(zip(plan.doc[a:b].tolist(), plan.start[a:b].tolist(), plan.length[a:b].tolist(),
                 plan.column[a:b].tolist(), strict=True))
        for a, b in itertools.pairwise(ro)
    ]


def reference_plan(
    lengths: list[int],
    capacity: int,
    strategy: str,
    overflow: str = "split",
    max_docs: int | None = None,
    align: int = 1,
) -> list[list[tuple[int, int, int, int]]]:
    """The contract, written the slow and obvious way (O(n * bins))."""
    cap = capacity // align
    rows: list[list[tuple[int, int, int, int]]] = []
    left: list[int] = []

    def size(ln: int) -> int:
        return -(-ln // align)

    def place(b: int, item: tuple[int, int, int]) -> None:
        rows[b].append((*item, (cap - left[b]) * align))
        left[b] -= size(item[2])

    def open_row() -> int:
        rows.append([])
        left.append(cap)
        return len(rows) - 1

    def full(b: int) -> bool:
        return max_docs is not None and len(rows[b]) >= max_docs

    if strategy == "wrapped":
        for d, n in enumerate(lengths):
            s = 0
            while s < n:
                if not rows or left[-1] == 0 or full(len(rows) - 1):
                    open_row()
                take = min(n - s, left[-1] * align)
                place(len(rows) - 1, (d, s, take))
                s += take
        return rows
    items = reference_pieces(lengths, capacity, overflow)
    if strategy == "next_fit":
        for item in items:
            if not rows or size(item[2]) > left[-1] or full(len(rows) - 1):
                open_row()
            place(len(rows) - 1, item)
        return rows
    items.sort(key=lambda it: (-it[2], it[0], it[1]))
    if strategy == "ffd":
        for item in items:
            fits = [b for b in range(len(rows)) if left[b] >= size(item[2]) and not full(b)]
            place(fits[0] if fits else open_row(), item)
        return rows
    buckets: dict[int, list[int]] = defaultdict(list)  # bfd: remaining -> bins, LIFO
    for item in items:
        s = size(item[2])
        r = next((r for r in range(s, cap + 1) if buckets[r]), None)
        b = open_row() if r is None else buckets[r].pop()
        place(b, item)
        if left[b] > 0 and not full(b):
            buckets[left[b]].append(b)
    return rows


def splitmix64_permutation(n: int, seed: int) -> list[int]:
    state = seed

    def nxt() -> int:
        nonlocal state
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def below(bound: int) -> int:
        threshold = (-bound) % (1 << 64) % bound
        while True:
            x = nxt()
            if x >= threshold:
                return x % bound

    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = below(i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


# --- planner -------------------------------------------------------------------------------------

lengths_st = st.lists(st.integers(1, 40), min_size=0, max_size=40)


@settings(max_examples=150, deadline=None)
@given(
    lengths=lengths_st,
    capacity=st.sampled_from([1, 4, 8, 12, 16, 32]),
    strategy=st.sampled_from(ops.PACK_STRATEGIES),
    overflow=st.sampled_from(["split", "truncate", "drop"]),
    max_docs=st.one_of(st.none(), st.integers(1, 4)),
    align_pow=st.integers(0, 2),
)
def test_plan_matches_reference(
    lengths: list[int], capacity: int, strategy: str, overflow: str, max_docs: int | None,
    align_pow: int,
) -> None:  # fmt: skip
    align = 2**align_pow if capacity % 2**align_pow == 0 else 1
    plan = pack_plan(np.array(lengths, dtype=np.int64), capacity, strategy=strategy,
                     overflow=overflow, max_docs_per_row=max_docs, align=align)  # fmt: skip
    check_plan(plan, lengths, capacity, strategy=strategy, overflow=overflow,
               max_docs_per_row=max_docs, align=align)  # fmt: skip
    expected = reference_plan(lengths, capacity, strategy, overflow, max_docs, align)
    assert as_rows(plan) == expected
    assert plan.num_rows == len(expected)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=60),
       capacity=st.sampled_from([64, 100, 128]))  # fmt: skip
def test_bfd_ffd_row_counts(lengths: list[int], capacity: int) -> None:
    for strategy in ("bfd", "ffd"):
        plan = pack_plan(lengths, capacity, strategy=strategy)
        assert plan.num_rows == len(reference_plan(lengths, capacity, strategy))
        assert plan.num_rows >= -(-sum(lengths) // capacity)


def test_bfd_near_lower_bound_at_scale() -> None:
    lengths = lognormal_lengths(200_000, seed=1)
    bound = -(-int(lengths.sum()) // 4096)
    for strategy in ("bfd", "ffd"):
        plan = pack_plan(lengths, 4096, strategy=strategy)
        assert plan.num_rows <= bound + max(1, bound // 10_000)
        assert plan.packed_tokens == int(lengths.sum())
    nf = pack_plan(lengths, 4096, strategy="next_fit")
    assert nf.num_rows > bound * 1.05  # next fit wastes space: the reason bfd is the default


@pytest.mark.parametrize("strategy", ops.PACK_STRATEGIES)
@pytest.mark.parametrize("overflow", ["split", "truncate", "drop"])
def test_plan_checker_on_lognormal(strategy: str, overflow: str) -> None:
    lengths = lognormal_lengths(3000, seed=2, high=3000)
    plan = pack_plan(lengths, 1024, strategy=strategy, overflow=overflow, max_docs_per_row=6,
                     align=8, rows_multiple_of=4)  # fmt: skip
    check_plan(plan, lengths.tolist(), 1024, strategy=strategy, overflow=overflow,
               max_docs_per_row=6, align=8, rows_multiple_of=4)  # fmt: skip
    ends = [row[-1][3] + row[-1][2] if row else 0 for row in as_rows(plan)]
    assert plan.row_lengths().tolist() == ends
    assert np.all(plan.row_lengths() <= 1024)


def test_next_fit_keeps_order() -> None:
    lengths = lognormal_lengths(2000, seed=3, high=5000)
    plan = pack_plan(lengths, 1000, strategy="next_fit")
    order = list(zip(plan.doc.tolist(), plan.start.tolist(), strict=True))
    assert order == sorted(order)
    assert plan.doc.tolist() == sorted(plan.doc.tolist())


def test_wrapped_covers_the_concatenation() -> None:
    lengths = lognormal_lengths(1000, seed=4, high=3000)
    plan = pack_plan(lengths, 512, strategy="wrapped", overflow="error")  # overflow ignored
    pieces = zip(plan.doc.tolist(), plan.start.tolist(), plan.length.tolist(), strict=True)
    tokens = [(d, s + i) for d, s, n in pieces for i in range(n)]
    assert tokens == [(d, i) for d, n in enumerate(lengths.tolist()) for i in range(n)]
    used = plan.row_lengths()
    assert np.all(used[:-1] == 512) and 0 < used[-1] <= 512
    assert plan.num_rows == -(-int(lengths.sum()) // 512)
    assert plan.split_docs == int(np.count_nonzero(np.bincount(plan.doc) > 1))


def test_overflow_split_and_counters() -> None:
    plan = pack_plan([3, 20, 5], 8, overflow="split")
    assert plan.split_docs == 1 and plan.packed_tokens == 28
    mine = plan.doc == 1
    pieces = sorted(zip(plan.start[mine].tolist(), plan.length[mine].tolist(), strict=True))
    assert pieces == [(0, 8), (8, 8), (16, 4)]
    t = pack_plan([3, 20, 5], 8, overflow="truncate")
    assert t.truncated_tokens == 12 and t.packed_tokens == 16 and t.split_docs == 0
    d = pack_plan([3, 20, 5], 8, overflow="drop")
    assert (d.dropped_docs, d.dropped_tokens, d.packed_tokens) == (1, 20, 8)
    assert 1 not in d.doc.tolist()


def test_deterministic_and_input_types() -> None:
    lengths = lognormal_lengths(5000, seed=5)
    a = pack_plan(lengths, 2048)
    assert a == pack_plan(lengths, 2048)
    assert a == pack_plan(lengths.astype(np.int32), 2048)
    assert a == pack_plan(lengths.tolist(), 2048)
    assert a == pack_plan(torch.from_numpy(lengths), 2048)
    assert a == pack_plan(lengths.astype(np.uint16), 2048)
    assert a != pack_plan(lengths, 2048, strategy="ffd") or a.strategy != "ffd"


def test_empty_input() -> None:
    for strategy in ops.PACK_STRATEGIES:
        plan = pack_plan([], 16, strategy=strategy, rows_multiple_of=4)
        assert plan.num_rows == 0 and plan.num_pieces == 0 and plan.num_docs == 0
        assert pack_fill(plan, np.zeros(0, np.int64), [0])["input_ids"].shape == (0, 16)


def test_rows_multiple_of_appends_empty_rows() -> None:
    plan = pack_plan([5, 5, 5], 10, rows_multiple_of=4)
    assert plan.num_rows == 4
    assert np.diff(plan.row_offsets).tolist() == [2, 1, 0, 0]
    assert plan.row_lengths().tolist() == [10, 5, 0, 0]


def test_shuffle_is_seeded_permutation_of_rows() -> None:
    lengths = lognormal_lengths(3000, seed=6)
    base = pack_plan(lengths, 2048)
    shuffled = pack_plan(lengths, 2048, shuffle_seed=123)
    assert shuffled == pack_plan(lengths, 2048, shuffle_seed=123)
    assert shuffled != pack_plan(lengths, 2048, shuffle_seed=124)
    perm = splitmix64_permutation(base.num_rows, 123)
    base_rows = as_rows(base)
    assert as_rows(shuffled) == [base_rows[i] for i in perm]
    padded = pack_plan(lengths, 2048, shuffle_seed=123, rows_multiple_of=1000)
    assert as_rows(padded)[: base.num_rows] == as_rows(shuffled)  # empty rows stay at the end
    big = pack_plan(lengths, 2048, shuffle_seed=2**64 - 1)
    assert sorted(map(tuple, as_rows(big))) == sorted(map(tuple, base_rows))


def test_save_load_select_rows(tmp_path: Any) -> None:
    plan = pack_plan(lognormal_lengths(2000, seed=7), 1024, overflow="truncate", align=4,
                     shuffle_seed=9)  # fmt: skip
    path = tmp_path / "plan.npz"
    plan.save(path)
    loaded = PackPlan.load(path)
    assert loaded == plan
    assert loaded.strategy == "bfd" and loaded.truncated_tokens == plan.truncated_tokens
    part = plan.select_rows(10, 20)
    assert part.num_rows == 10 and part.row_offsets[0] == 0
    assert as_rows(part) == as_rows(plan)[10:20]
    assert part.num_docs == plan.num_docs
    assert plan.select_rows(5, 5).num_rows == 0
    with pytest.raises(ValueError, match="select_rows"):
        plan.select_rows(3, plan.num_rows + 1)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a saved PackPlan"):
        PackPlan.load(tmp_path / "other.npz")
    with pytest.raises(TypeError):
        hash(plan)


# --- bad inputs ----------------------------------------------------------------------------------


def test_bad_plan_inputs() -> None:
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        pack_plan([1, 2], 0)
    with pytest.raises(ValueError, match=r"lengths\[2\] = -3"):
        pack_plan([4, 5, -3], 16)
    with pytest.raises(ValueError, match=r"lengths\[1\] = 0"):
        pack_plan(np.array([4, 0, 3], dtype=np.int32), 16)
    with pytest.raises(ValueError, match=r"lengths\[1\] = 0"):
        pack_plan([4, 0, 3], 16, strategy="wrapped")
    with pytest.raises(ValueError, match="sequence 1 has 40 tokens, more than the capacity 16"):
        pack_plan([4, 40, 3], 16, overflow="error")
    assert pack_plan([4, 16, 3], 16, overflow="error").num_rows == 2
    with pytest.raises(ValueError, match="strategy must be one of"):
        pack_plan([1], 4, strategy="best")
    with pytest.raises(ValueError, match="overflow must be one of"):
        pack_plan([1], 4, overflow="wrap")
    with pytest.raises(ValueError, match="align must be >= 1 and divide capacity=10, got 4"):
        pack_plan([1], 10, align=4)
    with pytest.raises(ValueError, match="max_docs_per_row"):
        pack_plan([1], 10, max_docs_per_row=0)
    with pytest.raises(ValueError, match="rows_multiple_of"):
        pack_plan([1], 10, rows_multiple_of=0)
    with pytest.raises(ValueError, match="shuffle_seed"):
        pack_plan([1], 10, shuffle_seed=-1)
    with pytest.raises(TypeError, match="lengths must be integers"):
        pack_plan([1.5, 2.0], 10)
    with pytest.raises(ValueError, match="1-D"):
        pack_plan(np.ones((2, 2), dtype=np.int64), 10)
    with pytest.raises(TypeError):
        pack_plan([1], 4.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("strategy", ops.PACK_STRATEGIES)
def test_token_total_past_int64_is_an_error(strategy: str) -> None:
    """Lengths whose sum passes 2^63 (a corrupt lengths file) used to wrap the token counters
    negative (signed overflow)."""
    with pytest.raises(ValueError, match=r"lengths\[1\] = 4611686018427387904: the total"):
        pack_plan([2**62, 2**62, 3], 8, strategy=strategy, overflow="drop")
    plan = pack_plan([2**62, 3], 8, overflow="drop")
    assert plan.num_tokens == 2**62 + 3 and plan.dropped_tokens == 2**62


def test_bad_fill_inputs() -> None:
    lengths = np.array([3, 5, 2])
    values, offsets = ragged_tokens(lengths)
    plan = pack_plan(lengths, 8)
    with pytest.raises(ValueError, match="offsets has 3 entries but the plan indexes 3 documents"):
        pack_fill(plan, values[:8], offsets[:3])
    with pytest.raises(ValueError, match="offsets"):
        pack_fill(plan, values[:-1], offsets)
    with pytest.raises(ValueError, match=r"unknown pack_fill fields \['mask'\]"):
        pack_fill(plan, values, offsets, fields=["input_ids", "mask"])
    with pytest.raises(TypeError, match="sequence of names"):
        pack_fill(plan, values, offsets, fields="input_ids")
    with pytest.raises(ValueError, match="layout must be one of"):
        pack_fill(plan, values, offsets, layout="dense")
    with pytest.raises(ValueError, match="cu_seqlens_size >= "):
        pack_fill(plan, values, offsets, fields=["cu_seqlens_padded"], cu_seqlens_size=2)
    with pytest.raises(TypeError, match="int32 or int64"):
        pack_fill(plan, values.astype(np.float32), offsets)
    # A plan that does not match the documents (e.g. loaded for another dataset).
    other = pack_plan([3, 9, 2], 16)
    with pytest.raises(ValueError, match=r"takes tokens \[0, 9\) of document 1, which has 5"):
        pack_fill(other, values, offsets)
    bad = PackPlan(capacity=8, strategy="bfd", row_offsets=[0, 2], doc=[0, 7], start=[0, 0],
                   length=[3, 2], column=[0, 3], num_docs=3, num_tokens=10)  # fmt: skip
    with pytest.raises(ValueError, match="refers to document 7"):
        pack_fill(bad, values, offsets)
    overlap = PackPlan(capacity=8, strategy="bfd", row_offsets=[0, 2], doc=[0, 2], start=[0, 0],
                       length=[3, 2], column=[0, 2], num_docs=3, num_tokens=10)  # fmt: skip
    with pytest.raises(ValueError, match="overlapping"):
        pack_fill(overlap, values, offsets)
    with pytest.raises(ValueError, match="sizes"):
        PackPlan(capacity=8, strategy="bfd", row_offsets=[0, 2], doc=[0], start=[0],
                 length=[3], column=[0], num_docs=3, num_tokens=10)  # fmt: skip
    with pytest.raises(ValueError, match=r"out\['input_ids'\] must be a contiguous array"):
        pack_fill(plan, values, offsets, out={"input_ids": np.empty((1, 8), np.int64)})
    with pytest.raises(TypeError, match=r"out\['labels'\] must be a int64 array"):
        pack_fill(plan, values, offsets, out={"labels": np.empty((2, 8), np.int32)})


@pytest.mark.parametrize("elementwise", [False, True])
@pytest.mark.parametrize("layout", ops.PACK_LAYOUTS)
def test_plan_check_does_not_overflow(elementwise: bool, layout: str) -> None:
    """start + length or column + length past 2^63 (a corrupt saved plan) must be rejected, not
    wrap negative through the bounds check into an out-of-bounds read or write."""
    values, offsets = ragged_tokens(np.array([4, 6]))
    big = 2**63 - 2

    def plan(start: int, column: int) -> PackPlan:
        return PackPlan(capacity=8, strategy="bfd", row_offsets=[0, 1], doc=[0], start=[start],
                        length=[4], column=[column], num_docs=2, num_tokens=10)  # fmt: skip

    with pytest.raises(ValueError, match=rf"piece 0 \(row 0\) takes tokens \[{big}, {big} \+ 4\)"):
        pack_fill(plan(big, 0), values, offsets, layout=layout, _elementwise=elementwise)
    with pytest.raises(ValueError, match=rf"piece 0 \(row 0\) occupies columns \[{big}, "):
        pack_fill(plan(0, big), values, offsets, layout=layout, _elementwise=elementwise)
    p = plan(0, big)
    with pytest.raises(ValueError, match="occupies columns"):  # the CUDA path's host check
        ops._C.pack_check(offsets, p.row_offsets, p.doc, p.start, p.length, p.column, capacity=8)
    # rows * capacity wrapping to a small number must not let a 4-element output through.
    empty = np.zeros(0, np.int64)
    for rows, capacity in ((4, 2**62 + 1), (1, -4)):
        with pytest.raises(ValueError, match="rows of capacity"):
            ops._C.pack_fill(values, offsets, np.zeros(rows + 1, np.int64), empty, empty, empty,
                             empty, capacity=capacity, out_ids=np.empty(4, np.int64),
                             elementwise=elementwise)  # fmt: skip


# --- fill ----------------------------------------------------------------------------------------


def reference_fill(
    plan: PackPlan, values: np.ndarray, offsets: np.ndarray, flat: bool, pad: int,
    label_pad: int, pos0: int,
) -> dict[str, np.ndarray]:  # fmt: skip
    cap, rows = plan.capacity, plan.num_rows
    n = plan.packed_tokens if flat else rows * cap
    ids = np.full(n, pad, np.int64)
    labels = np.full(n, label_pad, np.int64)
    pos = np.zeros(n, np.int64)
    seq = np.full(n, -1, np.int32)
    cu = [0]
    t = 0
    for r in range(rows):
        for k in range(plan.row_offsets[r], plan.row_offsets[r + 1]):
            d, s, ln, c = (int(plan.doc[k]), int(plan.start[k]), int(plan.length[k]),
                           int(plan.column[k]))  # fmt: skip
            at = t if flat else r * cap + c
            if not flat and at > cu[-1]:
                cu.append(at)  # a padding run before the piece
            src = values[offsets[d] + s : offsets[d] + s + ln]
            ids[at : at + ln] = src
            labels[at + 1 : at + ln] = src[1:]
            pos[at : at + ln] = pos0 + np.arange(ln)
            seq[at : at + ln] = k
            cu.append(at + ln)
            t += ln
        if not flat and (r + 1) * cap > cu[-1]:
            cu.append((r + 1) * cap)
    shape = (1, n) if flat else (rows, cap)
    return {
        "input_ids": ids.reshape(shape),
        "labels": labels.reshape(shape),
        "position_ids": pos.reshape(shape),
        "seq_idx": seq.reshape(shape),
        "loss_mask": (labels != label_pad).reshape(shape),
        "cu_seqlens": np.array(cu, np.int32),
        # the longest segment of cu_seqlens (padding runs included), as a varlen kernel needs
        "max_seqlen": int(np.diff(cu).max()) if len(cu) > 1 else 0,
        "doc_lens": plan.length.astype(np.int32),
        "doc_ids": plan.doc,
    }


@pytest.mark.parametrize("layout", ops.PACK_LAYOUTS)
@pytest.mark.parametrize("elementwise", [False, True])
@pytest.mark.parametrize(("in_dtype", "out_dtype"),
                         [(np.int64, np.int64), (np.int32, np.int64), (np.int32, np.int32),
                          (np.int64, np.int32)])  # fmt: skip
@pytest.mark.parametrize("strategy", ["bfd", "wrapped"])
def test_fill_matches_reference(
    layout: str, elementwise: bool, in_dtype: Any, out_dtype: Any, strategy: str
) -> None:
    lengths = lognormal_lengths(300, seed=8, mean=40, high=300)
    values, offsets = ragged_tokens(lengths, dtype=in_dtype)
    plan = pack_plan(lengths, 128, strategy=strategy, align=4 if strategy == "bfd" else 1,
                     max_docs_per_row=5, shuffle_seed=3, rows_multiple_of=8)  # fmt: skip
    got = pack_fill(plan, values, offsets, layout=layout, pad_value=7, label_pad_value=-1,
                    position_start=1, fields=ops.PACK_FIELDS, cu_seqlens_size=2000,
                    dtype=out_dtype, _elementwise=elementwise)  # fmt: skip
    want = reference_fill(plan, values, offsets, layout == "flat", 7, -1, 1)
    assert list(got) == list(ops.PACK_FIELDS)
    for key, ref in want.items():
        np.testing.assert_array_equal(got[key], ref, err_msg=key)
    assert got["input_ids"].dtype == out_dtype and got["labels"].dtype == out_dtype
    assert got["position_ids"].dtype == np.int64 and got["seq_idx"].dtype == np.int32
    assert got["loss_mask"].dtype == bool and got["cu_seqlens"].dtype == np.int32
    assert isinstance(got["max_seqlen"], int)
    cu = want["cu_seqlens"]
    assert got["cu_seqlens_padded"].tolist() == [*cu.tolist(), *[int(cu[-1])] * (2000 - cu.size)]
    if layout == "padded":
        assert cu[-1] == plan.num_rows * plan.capacity


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=25),
       capacity=st.sampled_from([8, 16, 24]), strategy=st.sampled_from(ops.PACK_STRATEGIES),
       layout=st.sampled_from(ops.PACK_LAYOUTS), elementwise=st.booleans())  # fmt: skip
def test_fill_matches_reference_random(
    lengths: list[int], capacity: int, strategy: str, layout: str, elementwise: bool
) -> None:
    arr = np.array(lengths)
    values, offsets = ragged_tokens(arr)
    plan = pack_plan(arr, capacity, strategy=strategy)
    got = pack_fill(plan, values, offsets, layout=layout, fields=ops.PACK_FIELDS,
                    cu_seqlens_size=200, _elementwise=elementwise)  # fmt: skip
    want = reference_fill(plan, values, offsets, layout == "flat", 0, -100, 0)
    for key, ref in want.items():
        np.testing.assert_array_equal(got[key], ref, err_msg=key)


def test_fill_batches_and_out_buffers() -> None:
    lengths = lognormal_lengths(500, seed=9, mean=60, high=400)
    values, offsets = ragged_tokens(lengths)
    plan = pack_plan(lengths, 256)
    whole = pack_fill(plan, values, offsets, fields=("input_ids", "labels", "position_ids"))
    buf = {"input_ids": np.empty((4, 256), np.int64), "labels": np.empty((4, 256), np.int64)}
    for r in range(0, plan.num_rows - 4, 4):
        batch = pack_fill(plan.select_rows(r, r + 4), values, offsets, out=buf,
                          fields=("input_ids", "labels", "position_ids"))  # fmt: skip
        assert batch["input_ids"] is buf["input_ids"]
        for key in ("input_ids", "labels", "position_ids"):
            np.testing.assert_array_equal(batch[key], whole[key][r : r + 4])
    pinned = torch.empty((plan.num_rows, 256), dtype=torch.int64)
    got = pack_fill(plan, values, offsets, fields=["input_ids"], out={"input_ids": pinned})
    assert got["input_ids"] is pinned
    np.testing.assert_array_equal(pinned.numpy(), whole["input_ids"])


def test_fill_torch_cpu_inputs() -> None:
    lengths = np.array([3, 6, 2, 9])
    values, offsets = ragged_tokens(lengths)
    plan = pack_plan(lengths, 10)
    a = pack_fill(plan, values, offsets)
    b = pack_fill(plan, torch.from_numpy(values), torch.from_numpy(offsets))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


# --- attention mask ------------------------------------------------------------------------------


def test_block_causal_mask() -> None:
    seq = np.array([[0, 0, 0, 1, 1, -1], [2, 2, 3, -1, -1, -1]], dtype=np.int32)
    mask = block_causal_mask(seq)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    want = np.zeros((2, 6, 6), dtype=bool)
    for r in range(2):
        for q in range(6):
            for k in range(6):
                if seq[r, q] < 0:
                    want[r, q, k] = q == k
                else:
                    want[r, q, k] = seq[r, q] == seq[r, k] and k <= q
    np.testing.assert_array_equal(mask[:, 0].numpy(), want)
    assert bool(mask.any(dim=-1).all())  # no query row fully masked: no NaN under SDPA
    add = block_causal_mask(torch.from_numpy(seq), additive=True, dtype=torch.float16)
    assert add.dtype == torch.float16
    np.testing.assert_array_equal((add == 0).numpy(), mask.numpy())
    assert float(add.min()) == float(torch.finfo(torch.float16).min)
    with pytest.raises(ValueError, match="rows, C"):
        block_causal_mask(seq[0])
    with pytest.raises(TypeError, match="floating"):
        block_causal_mask(seq, additive=True, dtype=torch.int32)


def reference_block_mask(seq: np.ndarray) -> np.ndarray:
    """Obvious triple loop: same piece and k <= q; a padding query sees only itself."""
    rows, c = seq.shape
    want = np.zeros((rows, c, c), dtype=bool)
    for r in range(rows):
        for q in range(c):
            for k in range(c):
                same = seq[r, q] >= 0 and seq[r, q] == seq[r, k] and k <= q
                want[r, q, k] = same or (seq[r, q] < 0 and q == k)
    return want


@settings(max_examples=60, deadline=None)
@given(
    runs=st.lists(
        st.lists(st.tuples(st.booleans(), st.integers(1, 5)), max_size=6), min_size=1, max_size=4
    ),
    dtype=st.sampled_from([torch.bool, torch.float32, torch.bfloat16, torch.float16,
                           torch.float64]),
    id_dtype=st.sampled_from([np.int32, np.int64, np.int16]),
)  # fmt: skip
def test_block_causal_mask_kernel_matches_reference(
    runs: list[list[tuple[bool, int]]], dtype: torch.dtype, id_dtype: Any
) -> None:
    """Rows of pieces and padding runs (any order, equal widths): the C++ kernel vs the loops."""
    rows = []
    for row in runs:
        ids: list[int] = []
        piece = 0
        for is_pad, n in row:
            ids += [-1] * n if is_pad else [piece] * n
            piece += 0 if is_pad else 1
        rows.append(ids)
    width = max(len(r) for r in rows)
    seq = np.array([r + [-1] * (width - len(r)) for r in rows], dtype=id_dtype)
    additive = dtype != torch.bool
    mask = block_causal_mask(torch.from_numpy(seq), additive=additive,
                             dtype=dtype if additive else None)  # fmt: skip
    assert mask.shape == (len(rows), 1, width, width) and mask.dtype == dtype
    allowed = mask[:, 0] == 0 if additive else mask[:, 0]
    np.testing.assert_array_equal(allowed.numpy(), reference_block_mask(seq))
    if additive:
        assert torch.all((mask == 0) | (mask == torch.finfo(dtype).min))


@pytest.mark.parametrize("seq", [[[0, 1, 0]], [[0, -1, 0]], [[1, 1, 0, 0]]])
def test_block_causal_mask_rejects_non_contiguous_pieces(seq: list[list[int]]) -> None:
    with pytest.raises(ValueError, match="seq_idx row 0: the tokens of a piece must be contiguous"):
        block_causal_mask(torch.tensor(seq))


def test_block_mask_isolates_documents_in_sdpa() -> None:
    """Attention of a packed row under the mask equals attention of each piece alone."""
    lengths = np.array([5, 3, 6])
    values, offsets = ragged_tokens(lengths)
    plan = pack_plan(lengths, 16, strategy="next_fit")
    seq = pack_fill(plan, values, offsets, fields=["seq_idx"])["seq_idx"]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=gen) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    out = sdpa(q, k, v, attn_mask=block_causal_mask(seq))
    assert not torch.isnan(out).any()
    for c, n in zip(plan.column.tolist(), plan.length.tolist(), strict=True):
        sl = slice(c, c + n)
        alone = sdpa(q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True)
        torch.testing.assert_close(out[:, :, sl], alone)


# --- int32 outputs --------------------------------------------------------------------------------


def to_device(x: np.ndarray, device: str) -> Any:
    return x if device == "cpu" else torch.from_numpy(x).to(device)


def to_numpy(x: Any) -> np.ndarray:
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def fill_raises(device: str, **kw: Any) -> Any:
    """pack_fill, then (CUDA) the kernel's verdict: the error is raised either way."""
    got = pack_fill(**kw)
    if device != "cpu":
        ops.check_cuda_errors()
    return got


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("elementwise", [False, True])
@pytest.mark.parametrize("layout", ops.PACK_LAYOUTS)
def test_int32_output_refuses_ids_it_cannot_hold(device: str, elementwise: bool,
                                                 layout: str) -> None:  # fmt: skip
    """pack_fill(dtype=int32) wrapped ids past int32 (2**31 + 5 became -2147483643), as pad
    used to; the fill values were not checked either. Placed tokens are checked in the fill."""
    lengths = np.array([3, 4, 2])
    values, offsets = ragged_tokens(lengths)
    values[3 + 2] = 2**31 + 5  # document 1, position 2
    plan = pack_plan(lengths, 8)
    kw: dict[str, Any] = {"plan": plan, "values": to_device(values, device), "offsets": offsets,
                          "layout": layout, "dtype": np.int32}  # fmt: skip
    if device == "cpu":
        kw["_elementwise"] = elementwise
    message = ("pack_fill {}: document 1 has a token id (2147483653) at position 2 that does not "
               "fit the int32 output dtype; use dtype=int64")  # fmt: skip
    for fields, field in ((("input_ids", "labels"), "input_ids"), (("labels",), "labels"),
                          (("input_ids",), "input_ids")):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message.format(field))):
            fill_raises(device, fields=fields, **kw)
    # The same values fit int64 outputs, and fields that do not hold ids are not checked.
    got = fill_raises(device, **{**kw, "dtype": np.int64})
    assert 2**31 + 5 in np.asarray(to_numpy(got["input_ids"]))
    fill_raises(device, fields=("position_ids", "seq_idx", "loss_mask"), **kw)
    # A token never written is not refused: the first token of a piece is not a label, and a
    # document the plan leaves out is not read.
    values[3 + 2] = 7
    values[3] = -(2**31) - 1  # document 1, position 0
    kw["values"] = to_device(values, device)
    got = fill_raises(device, fields=("labels",), **kw)
    want = fill_raises(device, fields=("labels",), **{**kw, "dtype": np.int64})
    np.testing.assert_array_equal(to_numpy(got["labels"]), to_numpy(want["labels"]))
    with pytest.raises(ValueError, match=r"document 1 has a token id \(-2147483649\) at pos"):
        fill_raises(device, fields=("input_ids",), **kw)
    sub = PackPlan(capacity=8, strategy="bfd", row_offsets=[0, 1], doc=[0], start=[0], length=[3],
                   column=[0], num_docs=3, num_tokens=9)  # fmt: skip
    fill_raises(device, **{**kw, "plan": sub})
    # The fill values.
    with pytest.raises(ValueError, match="pad_value = 2147483648 does not fit the int32"):
        pack_fill(plan, values, offsets, dtype=np.int32, pad_value=2**31)
    with pytest.raises(ValueError, match="label_pad_value = -2147483649 does not fit the int32"):
        pack_fill(plan, values, offsets, dtype=np.int32, label_pad_value=-(2**31) - 1)
    # A fill value for a field not asked for is not written, so not refused.
    pack_fill(plan, values, offsets, fields=("labels",), dtype=np.int32, pad_value=2**31)


@settings(max_examples=80, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=12),
    big=st.lists(st.integers(0, 200), max_size=4),
    capacity=st.sampled_from([4, 8, 16]),
    layout=st.sampled_from(ops.PACK_LAYOUTS),
    fields=st.sampled_from([("input_ids",), ("labels",), ("input_ids", "labels", "loss_mask")]),
    elementwise=st.booleans(),
)
def test_int32_refusal_matches_reference(
    lengths: list[int], big: list[int], capacity: int, layout: str, fields: tuple[str, ...],
    elementwise: bool,
) -> None:  # fmt: skip
    """The first written token (by index in the values) that int32 cannot hold is the one named;
    with none, the output equals the int64 fill."""
    values, offsets = ragged_tokens(np.array(lengths))
    for b in big:
        values[b % values.size] = 2**31 + b
    plan = pack_plan(np.array(lengths), capacity, overflow="truncate")
    written = []
    for k in range(plan.num_pieces):
        first = int(offsets[plan.doc[k]] + plan.start[k])
        skip = 0 if "input_ids" in fields else 1  # labels: not the piece's first token
        written += range(first + skip, first + int(plan.length[k]))
    bad = sorted(p for p in written if values[p] > 2**31 - 1)
    kw = {"layout": layout, "fields": fields, "_elementwise": elementwise}
    if not bad:
        got = pack_fill(plan, values, offsets, dtype=np.int32, **kw)
        want = pack_fill(plan, values, offsets, dtype=np.int64, **kw)
        for key in fields:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        return
    doc = int(np.searchsorted(offsets, bad[0], side="right")) - 1
    with pytest.raises(ValueError) as info:
        pack_fill(plan, values, offsets, dtype=np.int32, **kw)
    assert (f"document {doc} has a token id ({int(values[bad[0]])}) at position "
            f"{bad[0] - int(offsets[doc])} that does not fit") in str(info.value)  # fmt: skip


# --- CUDA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", [d for d in DEVICES if not isinstance(d, str)])
@pytest.mark.parametrize("layout", ops.PACK_LAYOUTS)
def test_fill_cuda_matches_cpu(device: str, layout: str) -> None:
    lengths = lognormal_lengths(400, seed=10, mean=50, high=500)
    values, offsets = ragged_tokens(lengths, dtype=np.int32)
    plan = pack_plan(lengths, 256, align=8, shuffle_seed=1)
    fields = ops.PACK_FIELDS
    cpu = pack_fill(plan, values, offsets, layout=layout, fields=fields, cu_seqlens_size=900)
    gpu = pack_fill(plan, torch.from_numpy(values).to(device), offsets, layout=layout,
                    fields=fields, cu_seqlens_size=900)  # fmt: skip
    for key in fields:
        if key == "max_seqlen":
            assert gpu[key] == cpu[key]
            continue
        assert gpu[key].device.type == "cuda"
        np.testing.assert_array_equal(gpu[key].cpu().numpy(), cpu[key], err_msg=key)
