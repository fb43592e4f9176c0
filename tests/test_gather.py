"""Row gathers: ragged numpy arrays and chunked Arrow tables against Python indexing."""

from __future__ import annotations

import itertools
import pickle
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtape import gather
from mixtape.gather import ArrowRows, list_array, ragged_gather


def chunked(table: pa.Table, chunk: int) -> pa.Table:
    return pa.Table.from_batches(table.to_batches(max_chunksize=chunk), schema=table.schema)


def columns_table(n: int) -> pa.Table:
    """One column of every kind the gather treats differently."""
    rng = np.random.default_rng(n)
    lists = [rng.integers(0, 100, int(rng.integers(0, 5))).tolist() for _ in range(n)]
    return pa.table({
        "ids32": pa.array(lists, pa.list_(pa.int32())),
        "ids64_large": pa.array(lists, pa.large_list(pa.int64())),
        "floats": pa.array([[float(x) / 2 for x in r] for r in lists], pa.list_(pa.float32())),
        "element_named": pa.array(lists, pa.list_(pa.field("element", pa.int64()))),
        "null_rows": pa.array([None if i % 3 == 1 else r for i, r in enumerate(lists)],
                              pa.list_(pa.int32())),
        "null_tokens": pa.array([[None, *r] if i % 4 == 0 else r for i, r in enumerate(lists)],
                                pa.list_(pa.int16())),
        "fixed": pa.array([[i, i + 1] for i in range(n)], pa.list_(pa.int64(), 2)),
        "id": pa.array(np.arange(n, dtype=np.int64)),
        "score": pa.array(rng.random(n)),
        "maybe": pa.array([None if i % 2 else i for i in range(n)], pa.int32()),
        "text": pa.array([f"doc {i}" for i in range(n)]),
        "nested": pa.array([{"a": i, "b": [i]} for i in range(n)]),
    })  # fmt: skip


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
@pytest.mark.parametrize("sliced", [False, True])
def test_every_column_kind_matches_python_indexing(chunk: int, sliced: bool) -> None:
    table = chunked(columns_table(40), chunk)
    if sliced:
        table = table.slice(5, 30)
    ref = table.to_pylist()
    rows = np.array([3, 0, 0, len(ref) - 1, 17, 3, 9, 9, 2], dtype=np.int64)
    out = ArrowRows(table).gather(rows)
    assert out.schema == table.schema  # types, child field names and nullability kept
    assert all(c.num_chunks == 1 for c in out.columns)
    assert out.to_pylist() == [ref[r] for r in rows]


def test_row_mapping_is_applied_first() -> None:
    table = chunked(columns_table(20), 4)
    mapping = pa.chunked_array([pa.array([19, 0, 5], pa.uint64()), pa.array([7, 7], pa.uint64())])
    rows = ArrowRows(table, mapping)
    ref = table.to_pylist()
    assert rows.gather(np.array([4, 0, 2, 1])).to_pylist() == [ref[7], ref[19], ref[5], ref[0]]


def test_empty_selection_keeps_the_schema() -> None:
    table = columns_table(5)
    out = ArrowRows(table).gather(np.zeros(0, np.int64))
    assert out.num_rows == 0 and out.schema == table.schema


def test_pickle_drops_the_views_and_rebuilds_them() -> None:
    rows = ArrowRows(chunked(columns_table(12), 5))
    rows.gather(np.array([1]))
    again = pickle.loads(pickle.dumps(rows))
    assert again._index is None
    assert again.gather(np.array([11, 1])).equals(rows.gather(np.array([11, 1])))


def test_list_array_offsets_width(monkeypatch: pytest.MonkeyPatch) -> None:
    offsets, values = np.array([0, 2, 5]), np.arange(5, dtype=np.int32)
    assert list_array(offsets, values).type == pa.list_(pa.int32())
    monkeypatch.setattr(gather, "_INT32_MAX", 4)  # pretend 5 values overflow 32-bit offsets
    assert list_array(offsets, values).type == pa.large_list(pa.int32())
    with pytest.raises(ValueError, match=r"5 values do not fit in a list column with 32-bit"):
        list_array(offsets, values, pa.list_(pa.int32()))


@settings(max_examples=80, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=30),
    dtype=st.sampled_from([np.int32, np.int64, np.uint16]),
    data=st.data(),
)
def test_ragged_gather_matches_slices(lengths: list[int], dtype: Any, data: st.DataObject) -> None:
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = (np.arange(int(offsets[-1])) * 3).astype(dtype)
    rows = np.asarray(data.draw(st.lists(st.integers(0, len(lengths) - 1), max_size=40)), np.int64)
    got_values, got_offsets = ragged_gather(values, offsets, rows)
    expected = [values[offsets[r] : offsets[r + 1]] for r in rows]
    assert got_values.dtype == dtype and got_offsets[0] == 0
    got = [got_values[a:b].tolist() for a, b in itertools.pairwise(got_offsets)]
    assert got == [e.tolist() for e in expected]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 30), chunk=st.integers(1, 8), data=st.data())
def test_chunked_gather_matches_python_indexing(n: int, chunk: int, data: st.DataObject) -> None:
    table = chunked(columns_table(n), chunk)
    rows = np.asarray(data.draw(st.lists(st.integers(0, n - 1), max_size=30)), np.int64)
    ref = table.to_pylist()
    assert ArrowRows(table).gather(rows).to_pylist() == [ref[r] for r in rows]


def test_each_column_takes_the_path_meant_for_it() -> None:
    rows = ArrowRows(chunked(columns_table(10), 3))
    _, columns = rows._columns()
    kinds = dict(zip(rows.table.column_names, (c.kind for c in columns), strict=True))
    assert kinds == {"ids32": "list", "ids64_large": "list", "floats": "list",
                     "element_named": "list", "null_rows": "arrow", "null_tokens": "arrow",
                     "fixed": "arrow", "id": "flat", "score": "flat", "maybe": "arrow",
                     "text": "arrow", "nested": "arrow"}  # fmt: skip
