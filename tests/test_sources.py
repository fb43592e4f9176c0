"""Sources: every kind against a plain reference; take / take_arrow / stream agree; errors."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from source_contract import check_map_source, check_streaming_source, make_docs, plain

from mixtape import (
    ArrowTableSource,
    BaseSource,
    CompositeShardedSource,
    HFDatasetSource,
    HFIterableSource,
    ListSource,
    Source,
    TorchIterableSource,
    TorchMapSource,
    as_source,
)
from mixtape.sources import take_ragged

datasets.disable_progress_bars()


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """datasets writes its Arrow caches under the test's tmp_path, not ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


class Items(torch.utils.data.Dataset[Any]):
    """A map-style torch dataset over a list (module level, so it pickles)."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


class BatchedItems(Items):
    def __getitems__(self, idx: list[int]) -> list[Any]:
        return [self.items[i] for i in idx]


def torch_dataset(items: list[Any], batched: bool = False) -> Items:
    return BatchedItems(items) if batched else Items(items)


class TorchStream(torch.utils.data.IterableDataset[Any]):
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)


def chunked_table(docs: list[dict[str, Any]], chunk: int) -> pa.Table:
    return pa.Table.from_batches(pa.Table.from_pylist(docs).to_batches(max_chunksize=chunk))


# --------------------------------------------------------------------------------------------
# Map-style kinds against their reference
# --------------------------------------------------------------------------------------------

MapCase = Callable[[list[dict[str, Any]], Path], tuple[Any, list[dict[str, Any]]]]


def _hf_saved(docs: list[dict[str, Any]], tmp: Path) -> tuple[Any, list[dict[str, Any]]]:
    datasets.Dataset(chunked_table(docs, 5)).save_to_disk(str(tmp / "saved"))
    ds = datasets.load_from_disk(str(tmp / "saved")).shuffle(seed=1)  # memory-mapped, mapped rows
    return ds, [ds[i] for i in range(len(ds))]


def _hf(transform: Callable[[datasets.Dataset], datasets.Dataset]) -> MapCase:
    def make(docs: list[dict[str, Any]], tmp: Path) -> tuple[Any, list[dict[str, Any]]]:
        ds = transform(datasets.Dataset.from_list(docs))
        return ds, [ds[i] for i in range(len(ds))]  # ds[i] is the reference

    return make


MAP_CASES: dict[str, MapCase] = {
    "hf": _hf(lambda ds: ds),
    "hf-shuffled": _hf(lambda ds: ds.shuffle(seed=3)),
    "hf-select-repeats": _hf(lambda ds: ds.select([5, 1, 1, 30, 2, 36, 0, 7])),
    "hf-contiguous-slice": _hf(lambda ds: ds.select(range(3, 20))),
    "hf-chunked": _hf(lambda ds: datasets.Dataset(chunked_table(ds.to_list(), 4))),
    "hf-chunked-shuffled": _hf(lambda ds: datasets.Dataset(chunked_table(ds.to_list(), 3))
                               .shuffle(seed=5)),
    "hf-saved-to-disk": _hf_saved,
    "arrow-table": lambda docs, tmp: (chunked_table(docs, 6), docs),
    "list-of-dicts": lambda docs, tmp: (docs, docs),
    "list-of-token-lists": lambda docs, tmp: ([d["input_ids"] for d in docs],
                                              [{"input_ids": d["input_ids"]} for d in docs]),
    "torch-map": lambda docs, tmp: (torch_dataset(docs), docs),
    "torch-map-getitems": lambda docs, tmp: (torch_dataset(docs, batched=True), docs),
    "torch-map-tensors": lambda docs, tmp: (
        torch_dataset([torch.tensor(d["input_ids"]) for d in docs]),
        [{"input_ids": d["input_ids"]} for d in docs]),
    "torch-map-numpy": lambda docs, tmp: (
        torch_dataset([{"input_ids": np.asarray(d["input_ids"], np.int32)} for d in docs]),
        [{"input_ids": d["input_ids"]} for d in docs]),
}


@pytest.mark.parametrize("kind", list(MAP_CASES))
def test_map_style_kind_matches_its_reference(kind: str, tmp_path: Path) -> None:
    obj, ref = MAP_CASES[kind](make_docs(), tmp_path)
    src = as_source(obj, kind)
    assert isinstance(src, Source) and isinstance(src, BaseSource)
    assert src.name == kind and not src.is_streaming
    check_map_source(src, ref)


def test_hf_dataset_source_reads_arrow_and_keeps_hf_fingerprint() -> None:
    ds = datasets.Dataset.from_list(make_docs()).shuffle(seed=0)
    src = as_source(ds, "hf")
    assert isinstance(src, HFDatasetSource) and src.dataset is ds
    assert src.fingerprint == ds._fingerprint
    assert src.take_arrow([0]).schema == ds.data.table.schema  # the stored types, as stored


def test_hf_formats_torch_and_columns() -> None:
    docs = make_docs()
    ds = datasets.Dataset.from_list(docs)
    src = as_source(ds.with_format("torch"), "t")  # take gives plain Python, not tensors
    rows = [3, 1]
    assert src.take(rows) == [docs[3], docs[1]]
    cols = as_source(ds.with_format(columns=["input_ids"]), "c")  # the chosen columns only
    assert cols.take(rows) == [{"input_ids": docs[r]["input_ids"]} for r in rows]
    assert cols.take_arrow(rows).column_names == ["input_ids"]
    everything = as_source(ds.with_format("numpy", columns=["id"], output_all_columns=True), "a")
    assert everything.take(rows) == [docs[3], docs[1]]


def test_hf_transform_applies_to_take_and_take_arrow() -> None:
    docs = make_docs()
    ds = datasets.Dataset.from_list(docs).with_transform(
        lambda b: {"n": [len(x) for x in b["input_ids"]]})
    src = as_source(ds, "tr")
    assert src.take([2, 0]) == [{"n": len(docs[2]["input_ids"])}, {"n": len(docs[0]["input_ids"])}]
    assert src.take_arrow([2, 0]).to_pylist() == src.take([2, 0])


def test_hf_features_are_decoded_by_take() -> None:
    feats = datasets.Features({"label": datasets.ClassLabel(names=["neg", "pos"]),
                               "input_ids": datasets.List(datasets.Value("int32"))})  # fmt: skip
    ds = datasets.Dataset.from_dict({"label": [1, 0], "input_ids": [[1], [2, 3]]}, features=feats)
    src = as_source(ds, "f")
    assert src.take([1, 0]) == [ds[1], ds[0]]
    assert src.take_arrow([0]).schema.field("input_ids").type == pa.list_(pa.int32())


def test_dataset_dict_needs_a_split() -> None:
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(make_docs(4)),
                               "test": datasets.Dataset.from_list(make_docs(2))})  # fmt: skip
    with pytest.raises(ValueError, match=r"source 'dd': a DatasetDict holds the splits "
                                         r"\['train', 'test'\]; pass one"):  # fmt: skip
        as_source(dd, "dd")
    assert as_source(dd, "dd", split="test").num_rows == 2
    with pytest.raises(ValueError, match="split 'val' not found"):
        as_source(dd, "dd", split="val")


def test_pickled_hf_source_does_not_copy_the_memory_mapped_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    docs = [{"input_ids": rng.integers(0, 50_000, 500).tolist()} for _ in range(2000)]
    datasets.Dataset.from_list(docs).save_to_disk(str(tmp_path / "big"))
    ds = datasets.load_from_disk(str(tmp_path / "big")).shuffle(seed=0)
    src = as_source(ds, "big")
    src.take_arrow([5, 1])  # fills the per-batch index
    blob = pickle.dumps(src)
    assert len(blob) < 200_000 < 2000 * 500 * 8  # the data is ~8 MB; the pickle holds paths
    assert pickle.loads(blob).take([7]) == [ds[7]]


# --------------------------------------------------------------------------------------------
# Streaming kinds
# --------------------------------------------------------------------------------------------


def test_hf_iterable_dataset_streams_with_skip() -> None:
    docs = make_docs()
    it = datasets.Dataset.from_list(docs).to_iterable_dataset(num_shards=3)
    src = as_source(it, "it")
    assert isinstance(src, HFIterableSource) and src.is_streaming
    check_streaming_source(src, docs)


def test_hf_iterable_split_by_node_partitions_the_stream() -> None:
    docs = make_docs(40)
    src = as_source(datasets.Dataset.from_list(docs).to_iterable_dataset(num_shards=4), "it")
    assert isinstance(src, HFIterableSource)
    parts = [list(src.split_by_node(rank, 2).stream()) for rank in range(2)]
    assert all(parts) and sorted(d["id"] for p in parts for d in p) == list(range(40))


def test_torch_iterable_dataset_streams() -> None:
    docs = make_docs()
    src = as_source(TorchStream(docs), "ts")
    assert isinstance(src, TorchIterableSource)
    check_streaming_source(src, docs)
    tokens = as_source(TorchStream([np.arange(3), [4, 5]]), "tt", column="ids")
    assert plain(list(tokens.stream())) == [{"ids": [0, 1, 2]}, {"ids": [4, 5]}]


def test_empty_streaming_source_is_an_error_when_read() -> None:
    src = as_source(TorchStream([]), "nothing")
    with pytest.raises(ValueError, match="source 'nothing' is empty"):
        list(src.stream())
    assert list(src.stream(3)) == []  # past the end of whatever there is: nothing, no error


# --------------------------------------------------------------------------------------------
# CompositeShardedSource
# --------------------------------------------------------------------------------------------


def test_composite_concatenates_map_style_parts() -> None:
    docs = make_docs(30)
    a = as_source(datasets.Dataset.from_list(docs[:10]).shuffle(seed=0), "a")
    ref_a = [a.take([i])[0] for i in range(10)]
    b = ListSource(docs[10:25], "b")
    c = datasets.Dataset(chunked_table(docs[25:], 2))  # not yet a source: named part2
    comp = CompositeShardedSource([a, b, c], name="abc")
    assert [p.name for p in comp.sources] == ["a", "b", "part2"]
    check_map_source(comp, ref_a + docs[10:])
    assert comp.fingerprint is None  # the list part has none
    both = CompositeShardedSource([a, as_source(datasets.Dataset.from_list(docs[10:]), "x")])
    assert both.name == "a+x" and both.fingerprint is not None


def test_composite_widens_types_and_rejects_other_fields() -> None:
    narrow = pa.table({"input_ids": pa.array([[1, 2]], pa.list_(pa.int32()))})
    wide = pa.table({"input_ids": pa.array([[3]], pa.list_(pa.int64()))})
    comp = CompositeShardedSource([ArrowTableSource(narrow, "n"), ArrowTableSource(wide, "w")])
    t = comp.take_arrow([1, 0])
    assert t.schema.field("input_ids").type == pa.list_(pa.int64())
    assert t.to_pylist() == [{"input_ids": [3]}, {"input_ids": [1, 2]}]
    other = CompositeShardedSource([narrow, pa.table({"ids": [[1]]})], name="mixed")
    with pytest.raises(ValueError, match="'mixed': parts 'part0' and 'part1' have different"):
        other.take_arrow([0, 1])


def test_composite_with_a_streaming_part_streams() -> None:
    docs = make_docs(20)
    comp = CompositeShardedSource([ListSource(docs[:5], "l"), TorchStream(docs[5:12]),
                                   ListSource(docs[12:], "m")])  # fmt: skip
    check_streaming_source(comp, docs)


# --------------------------------------------------------------------------------------------
# Rows, records, names, kinds: errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "error", "match"),
    [
        (np.array([1.0]), TypeError, "rows must be integers, got dtype float64"),
        ([0.5], TypeError, r"row at position 0 is 0.5, not an integer"),
        (np.array([True]), TypeError, "rows must be integers, got dtype bool"),
        (np.zeros((2, 2), np.int64), ValueError, r"rows must be 1-D, got shape \(2, 2\)"),
        (np.array([2**63], np.uint64), ValueError, r"row 9223372036854775808 \(position 0\)"),
        ([1, 2**70], ValueError, r"row 1180591620717411303424 \(position 1\) is out of range"),
        ([-1, 2**63], ValueError, r"row -1 \(position 0\) is out of range \[0, 3\)"),
        (np.array([3], np.int8), ValueError, r"row 3 \(position 0\) is out of range \[0, 3\)"),
    ],
)
def test_bad_rows_are_named_exactly(rows: Any, error: type[Exception], match: str) -> None:
    src = ListSource([[1], [2], [3]], "three")
    with pytest.raises(error, match=match):
        src.take(rows)
    with pytest.raises(error, match="source 'three'"):
        src.take_arrow(rows)


def test_unsigned_and_narrow_rows_are_accepted() -> None:
    src = ListSource([[1], [2], [3]], "three")
    assert src.take(np.array([2, 0], np.uint64)) == [{"input_ids": [3]}, {"input_ids": [1]}]
    assert src.take(np.array([1], np.int16)) == [{"input_ids": [2]}]


def test_stream_start_must_be_a_non_negative_int() -> None:
    src = ListSource([[1]], "one")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="source 'one': stream start must be an int >= 0"):
            src.stream(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "empty",
    [[], datasets.Dataset.from_dict({"input_ids": []}), pa.table({"x": pa.array([], pa.int64())}),
     torch_dataset([])],
)  # fmt: skip
def test_empty_sources_are_named(empty: Any) -> None:
    with pytest.raises(ValueError, match=r"source 'void' is empty \(0 rows\)"):
        as_source(empty, "void")


def test_records_that_are_not_examples_are_named() -> None:
    src = ListSource([{"input_ids": [1]}, "text", [[1, 2]]], "bad")
    with pytest.raises(TypeError, match="source 'bad': row 1 is a str; expected a dict"):
        src.take([0, 1])
    with pytest.raises(TypeError, match="source 'bad': row 2 is a list"):
        list(src.stream(2))


def test_records_are_fresh_dicts() -> None:
    docs = [{"input_ids": [1, 2]}]
    src = ListSource(docs, "l")
    src.take([0])[0]["__source__"] = "l"  # the mixer tags examples; the data must not change
    assert docs == [{"input_ids": [1, 2]}] and next(src.stream()) == {"input_ids": [1, 2]}


def test_unknown_kinds_list_what_is_accepted() -> None:
    for obj in (42, {"input_ids": [[1]]}, object()):
        with pytest.raises(TypeError, match=r"cannot read a \w+; accepted: a Source, .*pyarrow"):
            as_source(obj, "x")
    with pytest.raises(TypeError, match="a name is needed for a list"):
        as_source([[1]])
    with pytest.raises(ValueError, match="a source name must be a non-empty string, got ''"):
        as_source([[1]], "")
    with pytest.raises(TypeError, match=r"unknown options \['bogus'\]"):
        as_source([[1]], "x", bogus=1)


def test_sources_pass_through_as_source_and_rename() -> None:
    src = ListSource([[1]], "a")
    assert as_source(src) is src and as_source(src, "a") is src
    renamed = as_source(src, "b")
    assert renamed.name == "b" and src.name == "a" and renamed.take([0]) == src.take([0])
    with pytest.raises(TypeError, match=r"options .* do not apply to the existing source 'a'"):
        as_source(src, text_field="text")


def test_text_field_errors_name_source_and_row() -> None:
    docs = make_docs(8)
    docs[5] = {"input_ids": [1]}  # no text
    src = as_source(docs, "web", text_field="text")
    assert src.take([0, 1]) == [docs[0], docs[1]]
    with pytest.raises(ValueError, match=r"source 'web': row 5 has no field 'text'"):
        src.take([1, 5])
    with pytest.raises(ValueError, match=r"source 'web': row 5 has 'text' = None"):
        src.take_arrow([2, 5])  # Arrow fills the missing field with null
    with pytest.raises(ValueError, match=r"source 'web': row 5 has no field 'text'"):
        list(src.stream(3))
    ds = datasets.Dataset.from_list([{"text": "a"}, {"text": None}, {"text": "c"}])
    hf = as_source(ds, "hf", text_field="text")
    with pytest.raises(ValueError, match=r"source 'hf': row 1 has 'text' = None"):
        hf.take_arrow([0, 2, 1])
    with pytest.raises(ValueError, match=r"source 'hf': row 2 has no field 'body'"):
        as_source(ds, "hf", text_field="body").take_arrow([2])


# --------------------------------------------------------------------------------------------
# Properties: the per-batch Arrow gather against a plain reference
# --------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=40),
    chunk=st.integers(1, 9),
    data=st.data(),
)
def test_arrow_gather_matches_python_indexing(lengths: list[int], chunk: int,
                                              data: st.DataObject) -> None:  # fmt: skip
    docs = [{"input_ids": list(range(i, i + k)), "id": i} for i, k in enumerate(lengths)]
    n = len(docs)
    rows = data.draw(st.lists(st.integers(0, n - 1), max_size=50))
    src = ArrowTableSource(chunked_table(docs, chunk), "t")
    assert src.take_arrow(rows).to_pylist() == [docs[r] for r in rows]
    perm = data.draw(st.permutations(range(n)))
    ds = datasets.Dataset(chunked_table(docs, chunk)).select(perm)
    assert as_source(ds, "hf").take_arrow(rows).to_pylist() == [docs[perm[r]] for r in rows]


def test_torch_map_getitems_must_give_one_item_per_row() -> None:
    class Short(torch.utils.data.Dataset[Any]):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> Any:
            return [i]

        def __getitems__(self, idx: list[int]) -> list[Any]:
            return [[0]]

    src = as_source(Short(), "short")
    assert isinstance(src, TorchMapSource)
    with pytest.raises(ValueError, match="'short': __getitems__ gave 1 items for 2 rows"):
        src.take([0, 1])


# --------------------------------------------------------------------------------------------
# take_ragged: one token column, the packing loader's read
# --------------------------------------------------------------------------------------------


class ForeignSource:
    """A Source by protocol only (not a BaseSource): take_ragged goes through take_arrow."""

    name = "foreign"
    num_rows = 3
    fingerprint = None

    def take(self, rows: Any) -> list[dict[str, Any]]:
        return [{"input_ids": [int(r)] * (int(r) + 1)} for r in np.asarray(rows)]

    def take_arrow(self, rows: Any) -> pa.Table:
        return pa.Table.from_pylist(self.take(rows))

    def stream(self, start: int = 0) -> Iterator[dict[str, Any]]:
        return iter(self.take(np.arange(start, 3)))


def test_take_ragged_of_a_foreign_source_reads_take_arrow() -> None:
    values, offsets = take_ragged(ForeignSource(), np.array([2, 0, 2]), "input_ids")
    assert values.tolist() == [2, 2, 2, 0, 2, 2, 2] and offsets.tolist() == [0, 3, 4, 7]


@pytest.mark.parametrize("kind", ["hf", "arrow-table", "list-of-dicts"])
def test_take_ragged_names_the_source_column_and_row(kind: str, tmp_path: Path) -> None:
    docs = [{"input_ids": [1, 2], "text": "a", "n": 1}, {"input_ids": None, "text": "b", "n": 2}]
    obj = (datasets.Dataset.from_list(docs) if kind == "hf" else pa.Table.from_pylist(docs)
           if kind == "arrow-table" else docs)  # fmt: skip
    src = as_source(obj, "web")
    assert take_ragged(src, np.array([0, 0]), "input_ids")[0].tolist() == [1, 2, 1, 2]
    with pytest.raises(ValueError, match=r"source 'web': row 1 has 'input_ids' = None"):
        take_ragged(src, np.array([0, 1]), "input_ids")
    with pytest.raises(ValueError, match=r"source 'web': no column 'ids' \(columns: "):
        take_ragged(src, np.array([0]), "ids")
    with pytest.raises(TypeError, match=r"source 'web': column 'n' must hold token lists"):
        take_ragged(src, np.array([0]), "n")
    with pytest.raises(ValueError, match=r"source 'web': row 2 \(position 0\) is out"):
        take_ragged(src, np.array([2]), "input_ids")


def test_take_ragged_with_a_text_field_keeps_its_check() -> None:
    src = as_source(datasets.Dataset.from_list([{"input_ids": [1], "text": None}]), "web",
                    text_field="text")  # fmt: skip
    with pytest.raises(ValueError, match=r"source 'web': row 0 has 'text' = None"):
        take_ragged(src, np.array([0]), "input_ids")
