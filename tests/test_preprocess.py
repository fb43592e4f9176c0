"""PreprocessedDataset / StreamingPreprocessedDataset / create_preprocessed_dataset against plain
references: the tokenizer called directly, the callable applied by hand, the records as given."""

from __future__ import annotations

import collections
import json
import logging
import re
from typing import Any

import datasets
import numpy as np
import pytest
import torch
from source_contract import check_map_source, plain
from stateful_helpers import assert_state_refused_in_workers, run_test_save_load_state

from mixtape import (
    PreprocessedDataset,
    PreprocessError,
    StreamingPreprocessedDataset,
    as_source,
    create_preprocessed_dataset,
)

WORDS = ["the", "cat", "sat", "on", "the", "mat", "while", "a", "dog", "ran", "past", "red", "barn",
         "and", "birds", "sang", "in", "tall", "green", "trees", "near", "quiet", "river"]


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(0, 12)))) for _ in range(n)]


def records(n: int = 41) -> list[dict[str, Any]]:
    return [{"text": t, "id": i} for i, t in enumerate(texts(n))]


@pytest.fixture(scope="module")
def byt5() -> Any:
    import transformers

    return transformers.ByT5Tokenizer()


@pytest.fixture(scope="module")
def trained() -> Any:
    """A word-level tokenizer trained here on the embedded words; it adds no EOS itself."""
    import tokenizers
    import transformers
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "</s>"])
    tok.train_from_iterator([*texts(200, seed=1), " ".join(WORDS)], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")  # fmt: skip


def hf(n: int = 41) -> datasets.Dataset:
    return datasets.Dataset.from_list(records(n))


def ids_of(rows: list[dict[str, Any]]) -> list[int]:
    return [r["id"] for r in rows]


# ---- tokenizer path ------------------------------------------------------------------------


@pytest.mark.parametrize("cache", [True, False])
def test_byt5_adds_its_own_eos_once(byt5: Any, cache: bool) -> None:
    ds = PreprocessedDataset(hf(), byt5, text_field="text", cache_enabled=cache)
    want = [{"id": r["id"], "input_ids": byt5(r["text"])["input_ids"]} for r in records()]
    assert all(w["input_ids"][-1] == byt5.eos_token_id for w in want)
    assert plain(ds.take(range(len(ds)))) == want
    assert ds[5] == want[5] and ds[-1] == want[-1]


@pytest.mark.parametrize("cache", [True, False])
def test_trained_tokenizer_appends_eos_within_max_length(trained: Any, cache: bool) -> None:
    eos = trained.eos_token_id
    assert trained("the cat")["input_ids"][-1] != eos  # adds no EOS itself
    full = PreprocessedDataset(hf(), trained, text_field="text", cache_enabled=cache)
    assert [r["input_ids"] for r in full.take(range(41))] == [
        trained(r["text"])["input_ids"] + [eos] for r in records()]  # fmt: skip
    cut = PreprocessedDataset(hf(), trained, text_field="text", max_length=5, cache_enabled=cache,
                              return_attention_mask=True)  # fmt: skip
    for got, r in zip(cut.take(range(41)), records(), strict=True):
        assert got["input_ids"] == [*trained(r["text"])["input_ids"][:4], eos]
        assert got["attention_mask"] == [1] * len(got["input_ids"])
    never = PreprocessedDataset(hf(), trained, text_field="text", add_eos=False,
                                cache_enabled=cache)  # fmt: skip
    assert never[3]["input_ids"] == trained(records()[3]["text"])["input_ids"]


def test_tokenizer_fingerprint_is_stable_and_covers_settings(trained: Any) -> None:
    a = PreprocessedDataset(hf(), trained, text_field="text", max_length=6)
    trained(["the cat sat"], truncation=True, max_length=2)  # changes the backend's state
    b = PreprocessedDataset(hf(), trained, text_field="text", max_length=6, cache_enabled=False)
    c = PreprocessedDataset(hf(), trained, text_field="text", max_length=7)
    assert a.fingerprint is not None and a.fingerprint == b.fingerprint != c.fingerprint
    assert a.processed._fingerprint == a.fingerprint  # HF's cache file is named by it


def test_cache_is_reused_from_disk(tmp_path: Any, trained: Any) -> None:
    hf().save_to_disk(str(tmp_path / "raw"))
    raw = datasets.load_from_disk(str(tmp_path / "raw"))
    first = PreprocessedDataset(raw, trained, text_field="text")
    again = PreprocessedDataset(datasets.load_from_disk(str(tmp_path / "raw")), trained,
                                text_field="text")  # fmt: skip
    files = [f["filename"] for f in first.processed.cache_files]
    assert files and files == [f["filename"] for f in again.processed.cache_files]
    assert again.take(range(41)) == first.take(range(41))


# ---- callable path -------------------------------------------------------------------------


def shout(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    n_words = np.array([len(t.split()) for t in batch["text"]], dtype=np.int32)
    return {"text": [t.upper() for t in batch["text"]], "n_words": n_words}


def split_words(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"word": [], "id": []}
    for t, i in zip(batch["text"], batch["id"], strict=True):
        out["word"] += t.split()
        out["id"] += [i] * len(t.split())
    return out


@pytest.mark.parametrize("cache", [True, False])
def test_callable_merges_over_the_record_columns(cache: bool) -> None:
    ds = PreprocessedDataset(hf(), shout, cache_enabled=cache)
    want = [{"text": r["text"].upper(), "id": r["id"], "n_words": len(r["text"].split())}
            for r in records()]  # fmt: skip
    assert ds.take(range(41)) == want
    assert list(ds.take_arrow([0]).column_names) == ["text", "id", "n_words"]  # HF map's order
    check_map_source(ds, want)
    dropped = PreprocessedDataset(hf(), shout, remove_columns=["id"], cache_enabled=cache)
    assert dropped[0] == {"text": want[0]["text"], "n_words": want[0]["n_words"]}


def test_cache_on_and_off_give_the_same_rows_and_arrow(trained: Any) -> None:
    for pre, kw in ((trained, {"text_field": "text", "max_length": 6}), (shout, {})):
        on = PreprocessedDataset(hf(), pre, **kw)
        off = PreprocessedDataset(hf(), pre, cache_enabled=False, **kw)
        rows = np.random.default_rng(0).integers(0, 41, 60)
        assert on.take(rows) == off.take(rows)
        a, b = on.take_arrow(rows), off.take_arrow(rows)
        assert a.to_pylist() == b.to_pylist()
        assert [f.type for f in a.schema] == [f.type for f in b.schema]  # HF's int32 input_ids too


def test_a_preprocess_that_changes_row_counts_needs_the_cache() -> None:
    ds = PreprocessedDataset(hf(), split_words, remove_columns=["text", "id"])
    want = [{"word": w, "id": r["id"]} for r in records() for w in r["text"].split()]
    assert ds.take(range(len(ds))) == want
    with pytest.raises(PreprocessError, match=r"input columns \['text'\] are kept"):
        PreprocessedDataset(hf(), split_words)
    lazy = PreprocessedDataset(hf(), split_words, remove_columns=["text", "id"],
                               cache_enabled=False)  # fmt: skip
    with pytest.raises(PreprocessError, match="every record must give one row"):
        lazy.take([1, 2])


def test_select(trained: Any) -> None:
    for cache in (True, False):
        ds = PreprocessedDataset(hf(), trained, text_field="text", cache_enabled=cache)
        sub = ds.select([7, 3, 3, 40])
        assert isinstance(sub, PreprocessedDataset) and len(sub) == 4
        assert sub.take(range(4)) == ds.take([7, 3, 3, 40])
        assert sub.fingerprint not in (None, ds.fingerprint)
        assert ds.select(range(2, 5)).take(range(3)) == ds.take([2, 3, 4])
        with pytest.raises(ValueError, match=r"row 41 \(position 1\) is out of range"):
            ds.select([0, 41])
    on = PreprocessedDataset(hf(), trained, text_field="text").select([7, 3])
    off = PreprocessedDataset(hf(), trained, text_field="text", cache_enabled=False).select([7, 3])
    assert on.fingerprint == off.fingerprint


def test_is_a_mixer_source(byt5: Any) -> None:
    ds = PreprocessedDataset(hf(), byt5, text_field="text", name="web")
    assert as_source(ds) is ds
    renamed = as_source(ds, "books")
    assert renamed.name == "books" and ds.name == "web"
    assert renamed.take([2, 1]) == ds.take([2, 1])
    assert list(ds.stream(39)) == ds.take([39, 40])


@pytest.mark.parametrize("cache", [True, False])
def test_dataloader_workers_give_the_same_order(byt5: Any, cache: bool) -> None:
    ds = PreprocessedDataset(hf(), byt5, text_field="text", cache_enabled=cache)
    got = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers,
                                             collate_fn=list)  # fmt: skip
        got.append([x for batch in loader for x in batch])
    assert got[0] == got[1] == ds.take(range(41))


# ---- streaming -----------------------------------------------------------------------------


def stream_sources(n: int = 41) -> dict[str, Any]:
    return {
        "list": records(n),
        "hf_dataset": hf(n),
        "hf_iterable_4_shards": hf(n).to_iterable_dataset(num_shards=4),
        "hf_iterable_3_shards": hf(n).to_iterable_dataset(num_shards=3),
    }


def read(ds: Any, workers: int = 0) -> list[dict[str, Any]]:
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    return [plain(x) for x in loader]


@pytest.mark.parametrize("kind", list(stream_sources()))
def test_two_ranks_of_two_workers_read_every_record_once(kind: str, byt5: Any) -> None:
    seen: list[int] = []
    for rank in range(2):
        ds = StreamingPreprocessedDataset(stream_sources()[kind], byt5, text_field="text",
                                          rank=rank, world_size=2, batch_size=3)  # fmt: skip
        part = read(ds, workers=2)
        assert part, rank
        seen += ids_of(part)
    assert sorted(seen) == list(range(41))


@pytest.mark.parametrize("kind", list(stream_sources()))
def test_streaming_rows_equal_the_map_style_rows(kind: str, trained: Any) -> None:
    want = PreprocessedDataset(hf(), trained, text_field="text", max_length=5).take(range(41))
    ds = StreamingPreprocessedDataset(stream_sources()[kind], trained, text_field="text",
                                      max_length=5, buffer_size=0, batch_size=4)  # fmt: skip
    assert read(ds) == want  # one reader: the source's order
    two = read(ds, workers=2)
    assert sorted(two, key=lambda r: r["id"]) == want


def test_shuffle_buffer_is_seeded() -> None:
    def order(seed: int, buffer_size: int | None, workers: int = 0) -> list[int]:
        ds = StreamingPreprocessedDataset(records(), shout, buffer_size=buffer_size, seed=seed,
                                          batch_size=5)  # fmt: skip
        return ids_of(read(ds, workers))

    base = order(0, 8)
    assert base == order(0, 8) and sorted(base) == list(range(41)) and base != list(range(41))
    assert order(1, 8) != base
    assert order(0, 0) == order(0, None) == list(range(41))
    assert order(0, 8, workers=2) == order(0, 8, workers=2)
    big = order(0, 1000)  # a buffer larger than the data: a full random permutation
    assert sorted(big) == list(range(41)) and big != list(range(41))
    ds = StreamingPreprocessedDataset(records(), shout, buffer_size=8, seed=0, batch_size=5)
    ds.set_epoch(1)
    assert sorted(ids_of(read(ds))) == list(range(41)) and ids_of(read(ds)) != base


def flaky(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    for i in batch["id"]:
        if i % 7 == 3:
            raise ValueError(f"bad record {i}")
        if i % 11 == 5:
            raise KeyError(i)
    return {"n": [len(t) for t in batch["text"]]}


def bad_records() -> list[Any]:
    recs: list[Any] = records()
    recs[12] = {"id": 12, "body": "no text"}
    recs[20] = {"id": 20, "text": None}
    return recs


def test_skip_errors_counts_by_type(caplog: pytest.LogCaptureFixture) -> None:
    ds = StreamingPreprocessedDataset(bad_records(), flaky, text_field="text", skip_errors=True,
                                      batch_size=4, buffer_size=0)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="mixtape.preprocess"):
        got = read(ds)
    bad7 = {i for i in range(41) if i % 7 == 3}
    bad11 = {i for i in range(41) if i % 11 == 5} - bad7
    lost = bad7 | bad11 | {12, 20}
    assert ids_of(got) == [i for i in range(41) if i not in lost]
    want = {"ValueError": len(bad7) + 2, "KeyError": len(bad11)}  # + no text, text None
    assert ds.error_counts == want and ds.skipped == sum(want.values())
    assert ds.state_dict()["errors"] == want
    assert f"skipped {len(lost)} records" in caplog.text and "KeyError" in caplog.text


def test_errors_name_the_record_and_source(byt5: Any) -> None:
    ds = StreamingPreprocessedDataset(records(), flaky, batch_size=8, name="web")
    with pytest.raises(PreprocessError, match=r"source 'web': preprocess failed on record 3: "
                       r"ValueError: bad record 3") as info:  # fmt: skip
        read(ds)
    assert isinstance(info.value.__cause__, ValueError)
    missing = StreamingPreprocessedDataset(bad_records(), byt5, text_field="text", name="web")
    with pytest.raises(ValueError, match=r"source 'web': record 12 has no field 'text' "
                       r"\(fields: \['body', 'id'\]\)"):  # fmt: skip
        read(missing)
    sharded = StreamingPreprocessedDataset([{"id": i} for i in range(4)], byt5, name="web",
                                           rank=1, world_size=2)  # fmt: skip
    with pytest.raises(ValueError, match="record 1 has no field 'text'"):  # the global index
        read(sharded)
    with pytest.raises(PreprocessError, match=r"source 'x': preprocess failed on record 3"):
        PreprocessedDataset(hf(), flaky, name="x")
    with pytest.raises(PreprocessError, match=r"source 'x': preprocess failed on record 3"):
        PreprocessedDataset(hf(), flaky, name="x", cache_enabled=False).take([1, 2, 3])


def test_bad_inputs(byt5: Any) -> None:
    with pytest.raises(ValueError, match=r"source 'x': record 0 has no field 'body' \(fields: "
                       r"\['text', 'id'\]\)"):  # fmt: skip
        PreprocessedDataset(hf(), byt5, text_field="body", name="x")
    with pytest.raises(TypeError, match="record 2: 'text' is a int, not a string"):
        read(StreamingPreprocessedDataset([{"text": "a"}, {"text": "b"}, {"text": 5}], byt5))
    import tokenizers

    with pytest.raises(TypeError, match="PreTrainedTokenizerFast"):
        PreprocessedDataset(hf(), tokenizers.Tokenizer(tokenizers.models.BPE()))
    with pytest.raises(TypeError, match="max_length=8 applies to a tokenizer"):
        PreprocessedDataset(hf(), shout, max_length=8)
    with pytest.raises(ValueError, match=r"remove_columns \['nope'\] are not fields"):
        PreprocessedDataset(hf(), shout, remove_columns=["nope"])
    with pytest.raises(ValueError, match="pass one"):
        PreprocessedDataset(datasets.DatasetDict({"train": hf()}), shout)
    with pytest.raises(TypeError, match="is an iterator, readable once"):
        StreamingPreprocessedDataset(iter(records()), shout)
    with pytest.raises(ValueError, match="already split by node"):
        from datasets.distributed import split_dataset_by_node

        split = split_dataset_by_node(hf().to_iterable_dataset(num_shards=2), rank=0, world_size=2)
        StreamingPreprocessedDataset(split, shout)
    with pytest.raises(ValueError, match="give both rank and world_size"):
        StreamingPreprocessedDataset(records(), shout, rank=0)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\)"):
        StreamingPreprocessedDataset(records(), shout, rank=2, world_size=2)
    with pytest.raises(PreprocessError, match="must return a dict of columns"):
        PreprocessedDataset(hf(), lambda b: [1, 2])
    with pytest.raises(ValueError, match="is empty"):
        PreprocessedDataset(hf(), lambda b: {"x": []}, remove_columns=["text", "id"])


# ---- state ---------------------------------------------------------------------------------


def make_stream(kind: str = "list") -> StreamingPreprocessedDataset:
    return StreamingPreprocessedDataset(
        stream_sources(53)[kind] if kind != "list" else bad_records() + records(12),
        flaky, text_field="text", skip_errors=True, buffer_size=6, batch_size=4, seed=3)


@pytest.mark.parametrize("midpoint", [0, 1, 5, 17, 30, 40])
def test_state_round_trip(midpoint: int) -> None:
    run_test_save_load_state(make_stream, midpoint)


@pytest.mark.parametrize("kind", ["hf_dataset", "hf_iterable_3_shards"])
def test_state_round_trip_hf_sources(kind: str) -> None:
    run_test_save_load_state(lambda: make_stream(kind), 13)
    run_test_save_load_state(lambda: make_stream(kind),
                             7, iterate=lambda d: torch.utils.data.DataLoader(d, batch_size=None))


def test_state_holds_errors_and_refuses_another_layout() -> None:
    ds = make_stream()
    it = iter(ds)
    for _ in range(30):
        next(it)
    state = ds.state_dict()
    assert state["errors"] and state["layout"] == (0, 1)
    other = StreamingPreprocessedDataset(bad_records() + records(12), flaky, text_field="text",
                                         skip_errors=True, buffer_size=6, batch_size=4, seed=3,
                                         rank=1, world_size=2)  # fmt: skip
    other.load_state_dict(state)
    with pytest.raises(ValueError, match=re.escape("state is for shard 0 of 1 but this reader "
                                                   "is shard 1 of 2")):  # fmt: skip
        next(iter(other))
    with pytest.raises(ValueError, match="seed=3, this dataset has seed=0"):
        StreamingPreprocessedDataset(records(), flaky, buffer_size=6).load_state_dict(state)


def test_state_refused_in_the_main_process_with_workers() -> None:
    assert_state_refused_in_workers(make_stream, num_workers=2)
    ds = make_stream()
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)
    it = iter(loader)
    next(it)
    with pytest.raises(ValueError, match="num_workers=0"):
        ds.error_counts  # noqa: B018
    del it


# ---- factory -------------------------------------------------------------------------------


def test_create_preprocessed_dataset(tmp_path: Any, byt5: Any) -> None:
    path = tmp_path / "data.jsonl"
    hf().to_json(str(path))
    want = PreprocessedDataset(hf(), byt5, text_field="text").take(range(41))
    from_path = create_preprocessed_dataset(str(path), byt5, text_field="text")
    assert isinstance(from_path, PreprocessedDataset) and from_path.take(range(41)) == want
    streamed = create_preprocessed_dataset(path, byt5, streaming=True, text_field="text",
                                           buffer_size=0)  # fmt: skip
    assert isinstance(streamed, StreamingPreprocessedDataset) and read(streamed) == want
    assert isinstance(create_preprocessed_dataset(hf(), byt5), PreprocessedDataset)
    it = create_preprocessed_dataset(hf().to_iterable_dataset(), byt5, buffer_size=0)
    assert isinstance(it, StreamingPreprocessedDataset) and read(it) == want
    assert isinstance(create_preprocessed_dataset(records(), byt5), PreprocessedDataset)
    assert collections.Counter(ids_of(read(create_preprocessed_dataset(
        records(), byt5, streaming=True)))) == collections.Counter(range(41))  # fmt: skip
    with pytest.raises(ValueError, match="pass split= one of them"):
        create_preprocessed_dataset(datasets.DatasetDict({"train": hf()}), byt5)
    assert len(create_preprocessed_dataset(datasets.DatasetDict({"train": hf()}), byt5,
                                           split="train")) == 41  # fmt: skip
    with pytest.raises(ValueError, match=r"streaming=False needs a datasets\.Dataset"):
        create_preprocessed_dataset(hf().to_iterable_dataset(), byt5, streaming=False)


def test_state_after_a_pass_resumes_to_the_next_pass_and_its_epoch() -> None:
    # A checkpoint at an epoch's end: the next pass is a whole pass, not the empty rest of the
    # ended one; and set_epoch carries over for a loop that does not call it again.
    a = make_stream()
    a.set_epoch(2)
    first = [x["id"] for x in a]
    state = json.loads(json.dumps(a.state_dict()))
    nxt = [x["id"] for x in a]
    b = make_stream()
    b.load_state_dict(state)
    assert b.epoch == 2 and [x["id"] for x in b] == nxt and sorted(nxt) == sorted(first)
    a.set_epoch(3)
    c = make_stream()
    c.load_state_dict(state)
    c.set_epoch(3)
    assert [x["id"] for x in c] == [x["id"] for x in a] != nxt


def test_skips_are_logged_as_they_happen(caplog: pytest.LogCaptureFixture) -> None:
    # A DataLoader worker's end-of-pass summary never comes when training stops first: the
    # 1st, 10th, 100th ... skip of a pass is logged when it happens.
    recs = [{"text": None if i % 2 == 0 else "abc", "id": i} for i in range(40)]
    ds = StreamingPreprocessedDataset(recs, lambda b: {"n": [len(t) for t in b["text"]]},
                                      skip_errors=True, batch_size=4, buffer_size=0)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="mixtape"):
        it = iter(ds)
        next(it)
        assert "skipped 1 record(s) so far this pass" in caplog.text
        assert "TypeError" in caplog.text
        for _ in range(9):
            next(it)
        assert "skipped 10 record(s) so far" in caplog.text
        assert "skipped 2 record(s)" not in caplog.text
