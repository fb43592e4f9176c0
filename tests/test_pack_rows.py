"""ops.pack_rows (rows of back-to-back pieces in one pass) against pack_fill on the same plan."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtape.ops import PackPlan, _padded_cu_seqlens, pack_fill, pack_rows


def _plan(lengths: np.ndarray, row_offsets: np.ndarray, capacity: int) -> PackPlan:
    """The pack_fill plan of the same rows: piece k is document k, columns back to back."""
    column = np.zeros(lengths.size, dtype=np.int64)
    for a, b in itertools.pairwise(row_offsets):
        column[a:b] = np.cumsum(lengths[a:b]) - lengths[a:b]
    return PackPlan(capacity=capacity, strategy="packed_rows", row_offsets=row_offsets,
                    doc=np.arange(lengths.size, dtype=np.int64),
                    start=np.zeros(lengths.size, np.int64), length=lengths, column=column,
                    num_docs=lengths.size, num_tokens=int(lengths.sum()))  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(1, 30), min_size=0, max_size=5), min_size=0, max_size=6),
    slack=st.integers(0, 9),
    dtype=st.sampled_from([np.int32, np.int64]),
    pad=st.integers(-5, 5),
    start=st.integers(0, 2),
)
def test_pack_rows_equals_pack_fill_and_the_numpy_reference(
    rows: list[list[int]], slack: int, dtype: type, pad: int, start: int
) -> None:
    lengths = np.asarray([n for r in rows for n in r], dtype=np.int64)
    row_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=row_offsets[1:])
    capacity = max([sum(r) for r in rows], default=0) + slack
    rng = np.random.default_rng(int(lengths.sum()) + slack)
    values = rng.integers(0, 10_000, int(lengths.sum())).astype(dtype)
    tags = rng.integers(0, 4, lengths.size)
    fields = ("input_ids", "labels", "position_ids", "seq_idx", "tags", "cu_seqlens")
    got = pack_rows(values, lengths, row_offsets, tags, capacity=capacity, pad_value=pad,
                    label_pad_value=-100, position_start=start, tag_pad=-1,
                    fields=fields)  # fmt: skip
    plan = _plan(lengths, row_offsets, capacity)
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    want = pack_fill(plan, values, offsets, pad_value=pad, position_start=start,
                     fields=("input_ids", "labels", "position_ids", "seq_idx"))  # fmt: skip
    for key in ("input_ids", "labels", "position_ids", "seq_idx"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # tags: each piece's tag on its tokens, -1 on padding (the numpy reference)
    ref = np.full((len(rows), capacity), -1, dtype=np.int64)
    for r, (a, b) in enumerate(itertools.pairwise(row_offsets)):
        ref[r, : int(lengths[a:b].sum())] = np.repeat(tags[a:b], lengths[a:b])
    np.testing.assert_array_equal(got["tags"], ref)
    cu = _padded_cu_seqlens(plan)
    np.testing.assert_array_equal(got["cu_seqlens"], cu.astype(np.int32))
    assert got["cu_seqlens"].dtype == np.int32
    assert got["max_seqlen"] == (int(np.diff(cu).max()) if cu.size > 1 else 0)


def test_pack_rows_writes_into_given_buffers() -> None:
    out = {"input_ids": np.full((2, 4), 7, dtype=np.int64)}
    got = pack_rows(np.array([1, 2, 3], np.int32), np.array([2, 1]), np.array([0, 1, 2]),
                    capacity=4, fields=("input_ids",), out=out)  # fmt: skip
    assert got["input_ids"] is out["input_ids"]
    assert out["input_ids"].tolist() == [[1, 2, 0, 0], [3, 0, 0, 0]]


def test_pack_rows_refuses_bad_input_before_writing() -> None:
    one = np.array([0, 1], dtype=np.int64)
    out = {"input_ids": np.full((1, 4), 7, dtype=np.int64)}
    cases = [
        ((np.array([1, 2, 3]), np.array([2]), one), "3 values for pieces of 2 tokens"),
        ((np.array([1, 2]), np.array([0, 2]), np.array([0, 2])), "piece 0 .* has 0 tokens"),
        ((np.arange(5), np.array([5]), one), r"piece 0 \(row 0\) has 5 tokens.* 4 columns left"),
        ((np.array([1, 2]), np.array([2]), np.array([0, 2])), "row_offsets must go from 0"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            pack_rows(*args, capacity=4, fields=("input_ids",), out=out)
        assert (out["input_ids"] == 7).all()
    with pytest.raises(ValueError, match=r"tokens: piece 1 has a negative token id \(-4\)"):
        pack_rows(np.array([1, 2, -4]), np.array([2, 1]), np.array([0, 2]), capacity=4,
                  name="tokens")  # fmt: skip
    with pytest.raises(ValueError, match="unknown pack_rows fields"):
        pack_rows(np.array([1]), np.array([1]), one, capacity=4, fields=("loss_mask",))
    with pytest.raises(ValueError, match="tags field needs piece_tag"):
        pack_rows(np.array([1]), np.array([1]), one, capacity=4, fields=("tags",))
    with pytest.raises(ValueError, match="out\\['labels'\\] must be a contiguous int64"):
        pack_rows(np.array([1]), np.array([1]), one, capacity=4, fields=("labels",),
                  out={"labels": np.zeros((1, 4), np.int32)})  # fmt: skip
    with pytest.raises(TypeError, match="int32 or int64"):
        pack_rows(np.array([1.0]), np.array([1]), one, capacity=4)
