"""Sources from files: parquet / jsonl through datasets, .npy token files, DatasetMixture."""

from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from source_contract import check_map_source, check_streaming_source, make_docs, plain

from mixtape import (
    DatasetMixture,
    HFDatasetSource,
    HFIterableSource,
    NumpyTokenSource,
    as_source,
)
from mixtape.source_files import open_files, open_path

datasets.disable_progress_bars()


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def write_parquet(path: Path, docs: list[dict[str, Any]], row_group: int = 4) -> Path:
    pq.write_table(pa.Table.from_pylist(docs), path, row_group_size=row_group)
    return path


def write_jsonl(path: Path, docs: list[dict[str, Any]]) -> Path:
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    return path


def write_tokens(tmp: Path, docs: list[list[int]], dtype: Any = np.int32,
                 name: str = "tok") -> tuple[Path, Path]:  # fmt: skip
    offsets = np.zeros(len(docs) + 1, np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    tokens = np.concatenate([np.asarray(d, dtype) for d in docs]) if docs else np.zeros(0, dtype)
    np.save(tmp / f"{name}.npy", tokens)
    np.save(tmp / f"{name}_offsets.npy", offsets)
    return tmp / f"{name}.npy", tmp / f"{name}_offsets.npy"


# --------------------------------------------------------------------------------------------
# parquet / jsonl
# --------------------------------------------------------------------------------------------


def test_parquet_files_glob_and_list_in_order(tmp_path: Path) -> None:
    docs = make_docs(30)
    for i in range(3):
        write_parquet(tmp_path / f"part-{i}.parquet", docs[i * 10 : (i + 1) * 10])
    src = as_source(str(tmp_path / "part-*.parquet"), "pq")
    assert isinstance(src, HFDatasetSource)
    check_map_source(src, docs)
    listed = as_source([tmp_path / "part-2.parquet", tmp_path / "part-0.parquet"], "two")
    check_map_source(listed, docs[20:] + docs[:10])  # the order given
    single = as_source(tmp_path / "part-1.parquet", "one")
    check_map_source(single, docs[10:20])


def test_file_fingerprint_follows_path_size_and_mtime(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", make_docs(5))
    fp = as_source(path, "a").fingerprint
    assert fp is not None and as_source(path, "a").fingerprint == fp
    write_parquet(path, make_docs(6))
    os.utime(path, ns=(1, 1))
    assert as_source(path, "a").fingerprint != fp


def test_jsonl_plain_and_compressed(tmp_path: Path) -> None:
    docs = make_docs(12)
    check_map_source(as_source(write_jsonl(tmp_path / "a.jsonl", docs), "j"), docs)
    check_map_source(as_source(write_jsonl(tmp_path / "b.jsonl.gz", docs), "g"), docs)


def test_streaming_files(tmp_path: Path) -> None:
    docs = make_docs(20)
    write_parquet(tmp_path / "a.parquet", docs[:8])
    write_parquet(tmp_path / "b.parquet", docs[8:])
    src = as_source(str(tmp_path / "*.parquet"), "s", streaming=True)
    assert isinstance(src, HFIterableSource)
    check_streaming_source(src, docs)
    jsonl = as_source(write_jsonl(tmp_path / "c.jsonl", docs), "j", streaming=True)
    check_streaming_source(jsonl, docs)


def test_file_errors_name_the_source_and_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"source 'x': no file matches '.*\*.parquet'"):
        as_source(str(tmp_path / "*.parquet"), "x")
    with pytest.raises(FileNotFoundError, match=r"source 'x': '.*nope.parquet' is not a file, a "
                                                r"matching glob or a directory"):  # fmt: skip
        as_source(tmp_path / "nope.parquet", "x")
    (tmp_path / "a.xyz").write_text("?")
    with pytest.raises(ValueError, match=r"cannot tell the format of '.*a.xyz' from its suffix"):
        as_source(tmp_path / "a.xyz", "x")
    write_parquet(tmp_path / "p.parquet", make_docs(2))
    write_jsonl(tmp_path / "j.jsonl", make_docs(2))
    with pytest.raises(ValueError, match=r"files of different formats \['json', 'parquet'\]"):
        as_source([tmp_path / "p.parquet", tmp_path / "j.jsonl"], "x")
    with pytest.raises(ValueError, match="data files must be a path, a glob or a non-empty list"):
        open_files([], "x")


def test_save_to_disk_directories(tmp_path: Path) -> None:
    docs = make_docs(9)
    datasets.Dataset.from_list(docs).save_to_disk(str(tmp_path / "ds"))
    check_map_source(as_source(tmp_path / "ds", "d"), docs)
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(docs[:4]),
                               "test": datasets.Dataset.from_list(docs[4:])})  # fmt: skip
    dd.save_to_disk(str(tmp_path / "dd"))
    assert plain(list(as_source(tmp_path / "dd", "dd", split="test").stream())) == docs[4:]
    with pytest.raises(ValueError, match=r"split 'val' not found in '.*dd'; splits are"):
        as_source(tmp_path / "dd", "dd", split="val")
    streamed = open_path(tmp_path / "ds", "s", streaming=True)
    assert isinstance(streamed, HFIterableSource) and streamed.fingerprint is not None
    check_streaming_source(streamed, docs)


# --------------------------------------------------------------------------------------------
# numpy token files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "out"),
    [(np.uint16, np.int32), (np.int32, np.int32), (np.int64, np.int64), (np.uint32, np.int64)],
)
def test_numpy_token_files(tmp_path: Path, dtype: Any, out: Any) -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60_000, int(rng.integers(0, 7))).tolist() for _ in range(25)]
    tok, off = write_tokens(tmp_path, docs, dtype)
    src = NumpyTokenSource(tok, off)
    assert src.name == "tok" and isinstance(src.tokens, np.memmap) and src.dtype == out
    check_map_source(src, [{"input_ids": d} for d in docs])
    assert src.take([3])[0]["input_ids"].dtype == out
    arrow_type = src.take_arrow([3, 1]).schema.field("input_ids").type
    assert arrow_type == pa.list_(pa.from_numpy_dtype(out))
    renamed = NumpyTokenSource(tok, off, name="web", column="ids")
    assert plain(renamed.take([1])) == [{"ids": docs[1]}]
    via = as_source(tok, "via", offsets=off)  # a .npy path with offsets= through as_source
    assert plain(via.take([4, 2])) == [{"input_ids": docs[4]}, {"input_ids": docs[2]}]


def test_numpy_arrays_in_memory() -> None:
    src = NumpyTokenSource(np.arange(6, dtype=np.int64), np.array([0, 2, 2, 6]), name="mem")
    assert src.fingerprint is None
    check_map_source(src, [{"input_ids": [0, 1]}, {"input_ids": []}, {"input_ids": [2, 3, 4, 5]}])


def test_pickled_numpy_source_reopens_the_files(tmp_path: Path) -> None:
    docs = [list(range(i, i + 100)) for i in range(2000)]
    tok, off = write_tokens(tmp_path, docs)
    src = NumpyTokenSource(tok, off)
    blob = pickle.dumps(src)
    assert len(blob) < 10_000  # the 800 KB of tokens are not in the pickle
    again = pickle.loads(blob)
    assert isinstance(again.tokens, np.memmap) and plain(again.take([1999])) == [{"input_ids":
                                                                                  docs[1999]}]
    np.save(tok, np.zeros(2000 * 100, np.int32))  # the data changed under a saved source
    with pytest.raises(ValueError, match=r"source 'tok': '.*tok.npy' or '.*' changed since"):
        pickle.loads(blob)


@pytest.mark.parametrize(
    ("offsets", "match"),
    [
        ([1, 3, 6], r"offsets must start at 0, got 1"),
        ([0, 3, 5], r"offsets must end at the token count 6, got 5"),
        ([0, 4, 3, 6], r"offsets decrease at row 1 \(4 -> 3\)"),
        ([[0, 6]], r"offsets must be 1-D"),
    ],
)
def test_numpy_offsets_are_validated_naming_the_file(tmp_path: Path, offsets: Any,
                                                     match: str) -> None:  # fmt: skip
    np.save(tmp_path / "t.npy", np.arange(6, dtype=np.int32))
    np.save(tmp_path / "o.npy", np.asarray(offsets, np.int64))
    with pytest.raises(ValueError, match=rf"source 't': offsets file '.*o.npy': {match}"):
        NumpyTokenSource(tmp_path / "t.npy", tmp_path / "o.npy")


def test_numpy_token_file_errors(tmp_path: Path) -> None:
    np.save(tmp_path / "f.npy", np.zeros(4, np.float32))
    np.save(tmp_path / "o.npy", np.array([0, 4]))
    with pytest.raises(TypeError, match=r"tokens file '.*f.npy' must hold integer token ids"):
        NumpyTokenSource(tmp_path / "f.npy", tmp_path / "o.npy")
    with pytest.raises(FileNotFoundError, match=r"tokens file '.*missing.npy' does not exist"):
        NumpyTokenSource(tmp_path / "missing.npy", tmp_path / "o.npy")
    np.save(tmp_path / "e.npy", np.zeros(0, np.int32))
    np.save(tmp_path / "e_off.npy", np.zeros(1, np.int64))
    with pytest.raises(ValueError, match=r"source 'e' is empty \(0 rows\)"):
        NumpyTokenSource(tmp_path / "e.npy", tmp_path / "e_off.npy")
    np.save(tmp_path / "u.npy", np.array([1, 2**63 + 5], np.uint64))
    big = NumpyTokenSource(tmp_path / "u.npy", np.array([0, 1, 2]))
    assert plain(big.take_arrow([0, 0]).to_pylist()) == [{"input_ids": [1]}] * 2
    for take in (big.take, big.take_arrow):
        with pytest.raises(ValueError, match=r"source 'u': row 1 holds token id "
                                             r"9223372036854775813, which does not fit in int64"):
            take([0, 1])
    with pytest.raises(ValueError, match=r"a .npy token file is one file read with offsets="):
        as_source(tmp_path / "u.npy", "u")


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(0, 5), min_size=1, max_size=30), data=st.data())
def test_numpy_vectorised_gather_matches_slices(lengths: list[int], data: st.DataObject) -> None:
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.arange(int(offsets[-1]), dtype=np.int32) * 7
    rows = data.draw(st.lists(st.integers(0, len(lengths) - 1), max_size=40))
    src = NumpyTokenSource(tokens, offsets)
    expected = [{"input_ids": tokens[offsets[r] : offsets[r + 1]].tolist()} for r in rows]
    assert src.take_arrow(rows).to_pylist() == expected == plain(src.take(rows))


# --------------------------------------------------------------------------------------------
# DatasetMixture
# --------------------------------------------------------------------------------------------


def test_mixture_is_loaded_lazily_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = make_docs(10)
    write_parquet(tmp_path / "a.parquet", docs)
    calls: list[tuple[Any, ...]] = []
    real = datasets.load_dataset

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", counting)
    mix = DatasetMixture("web", path=str(tmp_path / "*.parquet"), weight=0.3)
    assert not mix.loaded and calls == [] and "loaded=False" in repr(mix)
    src = as_source(mix)
    assert mix.loaded and len(calls) == 1 and src.name == "web"
    assert as_source(mix) is src and mix.load() is src and len(calls) == 1
    check_map_source(src, docs)
    missing = DatasetMixture("gone", path=str(tmp_path / "gone.parquet"))  # not opened: no error
    with pytest.raises(FileNotFoundError, match="source 'gone'"):
        missing.load()


def test_mixture_path_kinds(tmp_path: Path) -> None:
    docs = make_docs(12)
    datasets.Dataset.from_list(docs).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(docs[:3]),
                          "validation": datasets.Dataset.from_list(docs[3:])}).save_to_disk(
        str(tmp_path / "dd"))  # fmt: skip
    write_jsonl(tmp_path / "d.jsonl", docs)
    (tmp_path / "pq").mkdir()
    write_parquet(tmp_path / "pq" / "x.parquet", docs)
    tok, off = write_tokens(tmp_path, [d["input_ids"] for d in docs])
    cases: list[tuple[DatasetMixture, list[dict[str, Any]]]] = [
        (DatasetMixture("saved", path=tmp_path / "saved"), docs),
        (DatasetMixture("dd", path=tmp_path / "dd", split="validation"), docs[3:]),
        (DatasetMixture("jsonl", path=tmp_path / "d.jsonl"), docs),
        (DatasetMixture("files", data_files=[str(tmp_path / "d.jsonl")]), docs),
        (DatasetMixture("builder", path="parquet", data_files=str(tmp_path / "pq" / "*.parquet")),
         docs),
        (DatasetMixture("data-dir", path="parquet", data_dir=str(tmp_path / "pq")), docs),
        (DatasetMixture("local-dir", path=tmp_path / "pq"), docs),
        (DatasetMixture("npy", path=tok, offsets=off),
         [{"input_ids": d["input_ids"]} for d in docs]),
        (DatasetMixture("ds", dataset=datasets.Dataset.from_list(docs)), docs),
        (DatasetMixture("dd-obj", dataset=datasets.load_from_disk(str(tmp_path / "dd")),
                        split="train"), docs[:3]),
        (DatasetMixture("list", dataset=[d["input_ids"] for d in docs], column="ids"),
         [{"ids": d["input_ids"]} for d in docs]),
    ]  # fmt: skip
    for mix, ref in cases:
        src = mix.load()
        assert src.name == mix.name
        check_map_source(src, ref)


def test_mixture_streaming(tmp_path: Path) -> None:
    docs = make_docs(10)
    write_parquet(tmp_path / "a.parquet", docs)
    check_streaming_source(DatasetMixture("s", path=tmp_path / "a.parquet", streaming=True).load(),
                           docs)  # fmt: skip
    from_ds = DatasetMixture("d", dataset=datasets.Dataset.from_list(docs), streaming=True).load()
    assert isinstance(from_ds, HFIterableSource)
    check_streaming_source(from_ds, docs)
    with pytest.raises(ValueError, match="source 'l': streaming=True applies to paths, files"):
        DatasetMixture("l", dataset=[[1]], streaming=True).load()
    with pytest.raises(ValueError, match="numpy token files are random access"):
        tok, off = write_tokens(tmp_path, [[1]])
        DatasetMixture("n", path=tok, offsets=off, streaming=True).load()


def test_mixture_builder_names_reach_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub name is handed to load_dataset as given (here intercepted: nothing is downloaded)."""
    seen: dict[str, Any] = {}

    def fake_load_dataset(path: str, **kwargs: Any) -> datasets.Dataset:
        seen.update(path=path, **kwargs)
        return datasets.Dataset.from_list([{"text": "hello"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    mix = DatasetMixture("hub", path="org/corpus", config_name="en", split="train[:10]",
                         revision="main", text_field="text")  # fmt: skip
    assert mix.load().take([0]) == [{"text": "hello"}]
    assert seen == {"path": "org/corpus", "name": "en", "split": "train[:10]", "data_files": None,
                    "data_dir": None, "streaming": False, "revision": "main"}  # fmt: skip


def test_mixture_text_field_errors_name_the_mixture_and_row(tmp_path: Path) -> None:
    docs = make_docs(6)
    docs[4]["text"] = None
    write_jsonl(tmp_path / "a.jsonl", docs)
    mix = DatasetMixture("news", path=tmp_path / "a.jsonl", text_field="text")
    src = mix.load()
    assert src.take([0, 3]) == [docs[0], docs[3]]
    with pytest.raises(ValueError, match=r"source 'news': row 4 has 'text' = None"):
        src.take([1, 4])
    with pytest.raises(ValueError, match=r"source 'news': row 4 has 'text' = None"):
        src.take_arrow([4])
    with pytest.raises(ValueError, match=r"source 'news': row 4 has 'text' = None"):
        list(src.stream())
    other = DatasetMixture("body", path=tmp_path / "a.jsonl", text_field="body").load()
    with pytest.raises(ValueError, match=r"source 'body': row 2 has no field 'body'"):
        other.take([2])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "say where the data is: path=, data_files= or dataset="),
        ({"path": "a.parquet", "dataset": [[1]]}, "give dataset alone"),
        ({"data_dir": "d"}, "data_dir is read by a builder: give path= too"),
        ({"path": "p", "weight": -1.0}, "weight must be a finite number >= 0, got -1.0"),
        ({"path": "p", "weight": float("nan")}, "weight must be a finite number >= 0, got nan"),
        ({"path": "p", "weight": True}, "weight must be a finite number >= 0, got True"),
        ({"path": "p", "text_field": ""}, "text_field must be a non-empty string"),
    ],
)
def test_mixture_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=rf"DatasetMixture 'm': {match}"):
        DatasetMixture("m", **kwargs)


def test_mixture_as_source_renames_and_refuses_options(tmp_path: Path) -> None:
    mix = DatasetMixture("a", dataset=[[1], [2]])
    assert as_source(mix, "b").name == "b" and mix.load().name == "a"
    with pytest.raises(TypeError, match=r"options \['column'\] do not apply to a DatasetMixture"):
        as_source(mix, column="ids")


def test_mixture_pickles_before_and_after_loading(tmp_path: Path) -> None:
    write_parquet(tmp_path / "a.parquet", make_docs(5))
    mix = DatasetMixture("a", path=tmp_path / "a.parquet", weight=2)
    fresh = pickle.loads(pickle.dumps(mix))
    assert not fresh.loaded and fresh.weight == 2.0 and fresh.load().num_rows == 5
    mix.load()
    loaded = pickle.loads(pickle.dumps(mix))
    assert loaded.loaded and loaded.load().take([4]) == mix.load().take([4])
