"""ops.PieceReader (pieces of rows straight from Arrow buffers) and the packing loader's read of
every source kind, against plain Python slicing and the take_ragged path."""

from __future__ import annotations

import pickle
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtape import MixedDataset
from mixtape.gather import ArrowRows
from mixtape.loader import get_loader
from mixtape.ops import PieceReader
from mixtape.sources import as_source, piece_reader, take_ragged

datasets.disable_progress_bars()


def docs_of(seed: int, n: int, dtype: Any = np.int32, high: int = 60) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1000, int(rng.integers(1, high))).astype(dtype) for _ in range(n)]


def list_table(docs: list[np.ndarray], chunk: int | None = None, large: bool = False,
               extra: bool = True) -> pa.Table:  # fmt: skip
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum([d.size for d in docs], out=offsets[1:])
    cls = pa.LargeListArray if large else pa.ListArray
    col = cls.from_arrays(pa.array(offsets if large else offsets.astype(np.int32)),
                          pa.array(np.concatenate(docs)))  # fmt: skip
    columns = {"input_ids": col}
    if extra:
        columns["n"] = pa.array(np.arange(len(docs)))
    t = pa.table(columns)
    return pa.Table.from_batches(t.to_batches(max_chunksize=chunk)) if chunk else t


def pieces_of(docs: list[np.ndarray], rng: np.random.Generator,
              n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    rows = rng.integers(0, len(docs), n)
    starts, lengths = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    for k, r in enumerate(rows.tolist()):
        size = docs[r].size
        starts[k] = rng.integers(0, size + 1)
        lengths[k] = rng.integers(0, size - starts[k] + 1)
    return rows.astype(np.int64), starts, lengths


def expected(docs: list[np.ndarray], rows: np.ndarray, starts: np.ndarray,
             lengths: np.ndarray) -> np.ndarray:  # fmt: skip
    parts = [docs[r][s: s + n] for r, s, n in zip(rows.tolist(), starts.tolist(), lengths.tolist(),
                                                   strict=True)]  # fmt: skip
    return np.concatenate(parts) if parts else np.zeros(0, dtype=docs[0].dtype)


def out_offsets(lengths: np.ndarray) -> np.ndarray:
    o = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=o[1:])
    return o


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), n_docs=st.integers(1, 40), n=st.integers(0, 50),
       chunk=st.sampled_from([None, 1, 3, 7]), large=st.booleans(),
       dtype=st.sampled_from([np.int32, np.int64, np.uint16, np.float32]),
       mapped=st.booleans())  # fmt: skip
def test_reader_matches_python_slicing(seed: int, n_docs: int, n: int, chunk: int | None,
                                       large: bool, dtype: Any, mapped: bool) -> None:  # fmt: skip
    docs = docs_of(seed, n_docs, dtype)
    table = list_table(docs, chunk, large)
    rng = np.random.default_rng(seed)
    indices = None
    view = docs
    if mapped:  # rows through a mapping, as HF's select / shuffle leave
        perm = rng.permutation(n_docs)[: max(1, n_docs - 2)]
        indices = pa.chunked_array([pa.array(perm.astype(np.uint64))])
        view = [docs[i] for i in perm.tolist()]
    reader = ArrowRows(table, indices).piece_reader("input_ids")
    assert reader is not None and reader.dtype == np.dtype(dtype)
    assert reader.num_rows == len(view)
    rows, starts, lengths = pieces_of(view, rng, n)
    oo = out_offsets(lengths)
    out = np.full(int(oo[-1]), 7, dtype=dtype)
    assert reader.gather(rows, starts, lengths, oo, out) == n
    np.testing.assert_array_equal(out, expected(view, rows, starts, lengths))


def test_sources_filter_copies_only_that_sources_pieces() -> None:
    docs = docs_of(1, 10)
    reader = PieceReader([list_table(docs)["input_ids"].chunks[0].values.to_numpy()],
                         [list_table(docs)["input_ids"].chunks[0].offsets.to_numpy()])  # fmt: skip
    rows = np.array([1, 2, 3, 4], dtype=np.int64)
    starts = np.zeros(4, dtype=np.int64)
    lengths = np.array([1, 1, 1, 1], dtype=np.int64)
    sources = np.array([0, 5, 0, 5], dtype=np.int32)
    out = np.full(4, -1, dtype=np.int32)
    assert reader.gather(rows, starts, lengths, out_offsets(lengths), out, sources=sources,
                         source=5) == 2  # fmt: skip
    assert out.tolist() == [-1, int(docs[2][0]), -1, int(docs[4][0])]


def test_errors_name_the_piece_and_nothing_is_written() -> None:
    docs = docs_of(2, 6)
    reader = ArrowRows(list_table(docs, chunk=2)).piece_reader("input_ids")
    assert reader is not None
    ok = (np.array([0], dtype=np.int64), np.array([0], dtype=np.int64), np.array([1], np.int64))
    bad_cases = [
        ([0, 6], [0, 0], [1, 1], r"piece 1 \(row 6.*row out of range \[0, 6\)"),
        ([0, -1], [0, 0], [1, 1], r"piece 1 \(row -1.*out of range"),
        ([0, 1], [0, -1], [1, 1], r"piece 1 .*outside the row's"),
        ([0, 1], [0, 0], [1, docs[1].size + 1], r"piece 1 .*outside the row's"),
        ([0, 1], [0, 2], [1, 2**62], r"piece 1 .*outside the row's"),
        ([0, 1], [0, 0], [1, -1], r"piece 1 .*outside the row's"),
    ]
    for rows, starts, lengths, msg in bad_cases:
        r, s, n = (np.asarray(a, dtype=np.int64) for a in (rows, starts, lengths))
        out = np.full(8, -5, dtype=np.int32)
        with pytest.raises(ValueError, match=msg):
            reader.gather(r, s, n, np.array([0, 1], dtype=np.int64), out)
        assert (out == -5).all()  # the good piece 0 was not written either
    out = np.zeros(1, dtype=np.int32)
    with pytest.raises(ValueError, match="destination"):
        reader.gather(*ok, np.array([1], dtype=np.int64), out)
    with pytest.raises(TypeError, match="out has dtype int64"):
        reader.gather(*ok, np.array([0], dtype=np.int64), np.zeros(1, dtype=np.int64))
    with pytest.raises(TypeError):  # exact index dtypes: no silent conversion
        reader.gather(np.array([0], dtype=np.int32), *ok[1:], np.array([0], np.int64), out)
    mapped = ArrowRows(list_table(docs), pa.chunked_array([pa.array([0, 9], pa.uint64())]))
    m = mapped.piece_reader("input_ids")
    assert m is not None
    with pytest.raises(ValueError, match="maps to table row 9"):
        m.gather(np.array([1], dtype=np.int64), *ok[1:], np.array([0], np.int64), out)
    with pytest.raises(ValueError, match="one values and one offsets array per chunk"):
        PieceReader([], [])
    with pytest.raises(TypeError, match="offsets must be int32 or int64"):
        PieceReader([np.zeros(2, np.int32)], [np.zeros(2, np.float64)])
    with pytest.raises(TypeError, match="must be numeric"):
        PieceReader([np.zeros(2, bool)], [np.zeros(2, np.int64)])


def test_reader_only_where_take_ragged_reads_arrow_buffers(tmp_path: Any) -> None:
    docs = docs_of(3, 30)
    table = list_table(docs)
    hf = datasets.Dataset(table)
    assert piece_reader(as_source(hf, "a"), "input_ids") is not None
    assert piece_reader(as_source(table, "a"), "input_ids") is not None
    assert piece_reader(as_source(hf, "a"), "missing") is None
    assert piece_reader(as_source(hf, "a"), "n") is None  # not a list column
    assert piece_reader(as_source(hf, "a", text_field="input_ids"), "input_ids") is None
    assert piece_reader(as_source(hf.with_transform(lambda b: b), "a"), "input_ids") is None
    assert piece_reader(as_source([d.tolist() for d in docs], "a"), "input_ids") is None
    nulls = pa.table({"input_ids": pa.array([[1], None, [2]], pa.list_(pa.int32()))})
    assert piece_reader(as_source(nulls, "a"), "input_ids") is None
    # the reader is cached on the source and not pickled (a worker builds its own)
    src = as_source(table, "a")
    first = piece_reader(src, "input_ids")
    assert piece_reader(src, "input_ids") is first
    back = pickle.loads(pickle.dumps(src))
    again = piece_reader(back, "input_ids")
    assert again is not None and again is not first


# --- the packing loader's read, per source kind ---------------------------------------------


def source_kinds(tmp_path: Any) -> dict[str, Any]:
    """Every kind of source the loader reads, each ~200 documents of up to 90 tokens."""
    kinds: dict[str, Any] = {}
    kinds["hf"] = datasets.Dataset(list_table(docs_of(10, 200, high=90)))
    kinds["hf_chunked"] = datasets.Dataset(list_table(docs_of(11, 200, high=90), chunk=23))
    # memory-mapped from a cache file written in record batches of 32 rows
    mm = datasets.Dataset(list_table(docs_of(12, 200, high=90))).map(
        lambda b: b, batched=True, writer_batch_size=32,
        cache_file_name=str(tmp_path / "mm.arrow"))  # fmt: skip
    assert mm.data.table.to_batches()[0].num_rows == 32
    kinds["hf_mmap_chunked"] = mm
    kinds["hf_shuffled"] = datasets.Dataset(list_table(docs_of(13, 240, high=90),
                                                       chunk=50)).shuffle(seed=3)  # fmt: skip
    kinds["hf_select"] = datasets.Dataset(list_table(docs_of(14, 300, high=90))).select(
        range(299, 50, -1))
    kinds["hf_int64"] = datasets.Dataset(list_table(docs_of(15, 200, np.int64, high=90)))
    kinds["arrow_large_list"] = as_source(list_table(docs_of(16, 200, high=90), chunk=30,
                                                     large=True), "arrow_large_list")  # fmt: skip
    kinds["list"] = [d.tolist() for d in docs_of(17, 200, high=90)]
    kinds["hf_transform"] = datasets.Dataset(list_table(docs_of(18, 200, high=90))).with_transform(
        lambda b: b)
    return kinds


def reference_flat(loader: Any, req: Any) -> np.ndarray:
    """The batch's flat tokens read through take_ragged (the generic path), piece by piece."""
    parts = []
    for k, r, s, n in zip(req.sources.tolist(), req.rows.tolist(), req.starts.tolist(),
                          req.lengths.tolist(), strict=True):  # fmt: skip
        values, offsets = take_ragged(loader.mixed.source(k), np.array([r]), loader.column)
        parts.append(values[offsets[0] + s: offsets[0] + s + n])
    dtype = np.result_type(*(p.dtype for p in parts))
    return np.concatenate([p.astype(dtype) for p in parts])


@pytest.mark.parametrize("combo", [
    ("hf",), ("hf_chunked",), ("hf_mmap_chunked",), ("hf_shuffled",), ("hf_select",),
    ("arrow_large_list",), ("list",), ("hf_transform",),
    ("hf", "hf_int64"),  # int32 and int64 tokens: the batch is int64
    ("hf_shuffled", "list", "hf_mmap_chunked"),  # fast and generic paths in one batch
])  # fmt: skip
def test_packed_pieces_of_every_source_kind(tmp_path: Any, combo: tuple[str, ...]) -> None:
    kinds = source_kinds(tmp_path)
    mixed = MixedDataset({k: kinds[k] for k in combo}, seed=4)
    loader = get_loader(mixed, 3, packing="bfd", max_length=128, collate_fn="packed",
                        collate_kwargs={"attention": "flash"})  # fmt: skip
    loader._start_requests()
    fetch = loader.dataloader.dataset
    for _ in range(25):
        req = loader._next_request()
        assert req is not None
        pieces = fetch._packed(req)
        ref = reference_flat(loader, req)
        assert pieces.flat.dtype == ref.dtype
        np.testing.assert_array_equal(pieces.flat, ref)
        assert pieces.sources.dtype == np.int32


def test_a_bad_row_in_a_restored_carry_names_the_source() -> None:
    ds = datasets.Dataset(list_table(docs_of(20, 50, high=90)))
    mixed = MixedDataset({"web": ds}, seed=0)
    loader = get_loader(mixed, 2, packing="bfd", max_length=64, collate_fn="packed",
                        collate_kwargs={"attention": "flash"})  # fmt: skip
    next(iter(loader))
    state = loader.state_dict()
    state["cursor"]["carry"] = [[0, 50, 0, 64]]  # row 50 of a 50-row source, a full row
    loader = get_loader(MixedDataset({"web": ds}, seed=0), 2, packing="bfd", max_length=64,
                        collate_fn="packed", collate_kwargs={"attention": "flash"})  # fmt: skip
    loader.load_state_dict(state)
    with pytest.raises(ValueError, match=r"source 'web': piece \d+ \(row 50.*out of range"):
        next(iter(loader))
