"""mixtape.packing: packed datasets checked token by token, TRL parity, stream state, stats, CLI,
and the model-loss equivalence of a packed batch with the documents run one by one."""

from __future__ import annotations

import itertools
import json
import math
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packing_fixtures import as_dataset, make_docs, tiny_model

from mixtape.ops import PackPlan, block_causal_mask, pack_fill, pack_plan
from mixtape.packing import (
    PackingStats,
    PackingStream,
    dataset_lengths,
    pack_sequences,
    plan_dataset,
    stats_main,
    synthetic_lengths,
)

datasets = pytest.importorskip("datasets")






def ragged(docs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum([d.size for d in docs])]).astype(np.int64)
    return np.concatenate(docs), offsets


def column(table: Any, name: str) -> list[list[int]]:
    data = table.data.table if hasattr(table, "data") else table
    return [list(r) if r is not None else None for r in data.column(name).to_pylist()]


# ---------------------------------------------------------------------------------------------
# An independent checker of packed output
# ---------------------------------------------------------------------------------------------


def check_packed(
    docs: list[np.ndarray], out: Any, capacity: int, overflow: str, layout: str = "padded"
) -> None:
    """Every kept token of every document appears exactly once, in order, where the row says."""
    ids, pos = column(out, "input_ids"), column(out, "position_ids")
    seq_lengths, doc_ids = column(out, "seq_lengths"), column(out, "doc_ids")
    labels = column(out, "labels") if "labels" in out.column_names else None
    pieces: dict[int, list[list[int]]] = {}
    for r, (row, lens, dids) in enumerate(zip(ids, seq_lengths, doc_ids, strict=True)):
        assert len(lens) == len(dids)
        if layout == "padded":
            assert len(row) == capacity
        else:
            assert len(row) == sum(lens)
        assert sum(lens) <= capacity
        col = 0
        for n, d in zip(lens, dids, strict=True):
            assert 1 <= n <= capacity
            pieces.setdefault(d, []).append(row[col : col + n])
            assert pos[r][col : col + n] == list(range(n))
            if labels is not None:
                assert labels[r][col] == -100
                assert labels[r][col + 1 : col + n] == row[col + 1 : col + n]
            col += n
        assert row[col:] == [0] * (len(row) - col)  # padding
        assert pos[r][col:] == [0] * (len(row) - col)
        if labels is not None:
            assert labels[r][col:] == [-100] * (len(row) - col)
    for d, doc in enumerate(docs):
        doc_l = doc.tolist()
        n = len(doc_l)
        if n <= capacity:
            assert pieces.pop(d) == [doc_l], f"document {d}"
        elif overflow == "truncate":
            assert pieces.pop(d) == [doc_l[:capacity]], f"document {d}"
        elif overflow == "drop":
            assert d not in pieces, f"dropped document {d} was packed"
        else:  # split: fragments [kC, kC + C), each exactly once
            got = sorted(pieces.pop(d), key=lambda p: (len(p) != capacity, p))
            want = [doc_l[k : k + capacity] for k in range(0, n, capacity)]
            assert sorted(got) == sorted(want), f"document {d}"
    assert not pieces, f"unknown documents {sorted(pieces)}"


ALL = ("input_ids", "labels", "position_ids", "seq_lengths", "doc_ids")


@pytest.mark.parametrize("strategy", ["bfd", "ffd", "next_fit"])
@pytest.mark.parametrize("overflow", ["split", "truncate", "drop"])
@pytest.mark.parametrize("layout", ["padded", "ragged"])
def test_pack_sequences_places_every_token(strategy: str, overflow: str, layout: str) -> None:
    rng = np.random.default_rng(1)
    lengths = [int(x) for x in rng.integers(1, 90, 120)] + [150, 64, 200, 1]
    docs = make_docs(lengths)
    out = pack_sequences(as_dataset(docs), 64, strategy=strategy, overflow=overflow,
                         fields=ALL, layout=layout)  # fmt: skip
    assert isinstance(out, datasets.Dataset)
    check_packed(docs, out, 64, overflow, layout)
    plan = plan_dataset(as_dataset(docs), 64, strategy=strategy, overflow=overflow)
    assert out.num_rows == plan.num_rows
    bounds = zip(plan.row_offsets[:-1], plan.row_offsets[1:], strict=True)
    assert column(out, "doc_ids") == [plan.doc[a:b].tolist() for a, b in bounds]


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=60),
    capacity=st.integers(1, 32),
    strategy=st.sampled_from(["bfd", "ffd", "next_fit"]),
    overflow=st.sampled_from(["split", "truncate", "drop"]),
)
def test_pack_sequences_random(lengths: list[int], capacity: int, strategy: str,
                               overflow: str) -> None:  # fmt: skip
    docs = make_docs(lengths, seed=len(lengths))
    out = pack_sequences(pa.table({"input_ids": [d.tolist() for d in docs]}), capacity,
                         strategy=strategy, overflow=overflow, fields=ALL)  # fmt: skip
    check_packed(docs, out, capacity, overflow)


def test_bfd_reaches_lower_bound_on_easy_input() -> None:
    docs = make_docs([3, 5, 2, 6, 4, 4, 7, 1] * 25)
    out = pack_sequences(as_dataset(docs), 8)
    assert out.num_rows == math.ceil(sum(d.size for d in docs) / 8)
    assert out.column_names == ["input_ids", "position_ids", "seq_lengths"]
    assert out.features["input_ids"].length == 8  # fixed-size rows in the padded layout
    tensors = out.with_format("torch")[:4]
    assert tuple(tensors["input_ids"].shape) == (4, 8)


def test_wrapped_concatenates_and_cuts() -> None:
    docs = make_docs([5, 9, 3, 11])
    out = pack_sequences(as_dataset(docs), 6, strategy="wrapped", layout="ragged",
                         fields=("input_ids", "seq_lengths"))  # fmt: skip
    flat = np.concatenate(docs).tolist()
    assert column(out, "input_ids") == [flat[i : i + 6] for i in range(0, len(flat), 6)]
    assert sum(map(sum, column(out, "seq_lengths"))) == len(flat)


def test_labels_and_extra_columns_packed_alongside() -> None:
    docs = make_docs([4, 7, 3, 6])
    mask = pa.array([[1] * d.size for d in docs], type=pa.list_(pa.int8()))
    labels = pa.array([(d * 2).tolist() for d in docs], type=pa.list_(pa.int64()))
    ds = as_dataset(docs, attention_mask=mask, labels=labels)
    out = pack_sequences(ds, 10, fields=("input_ids", "position_ids", "seq_lengths", "doc_ids"))
    assert out.column_names == ["input_ids", "position_ids", "attention_mask", "labels",
                                "seq_lengths", "doc_ids"]  # fmt: skip
    assert out.features["attention_mask"].feature.dtype == "int8"
    rows = zip(column(out, "input_ids"), column(out, "attention_mask"), column(out, "labels"),
               column(out, "seq_lengths"), strict=True)  # fmt: skip
    for row_ids, row_mask, row_lab, lens in rows:
        used = sum(lens)
        assert row_mask == [1] * used + [0] * (10 - used)
        starts = set(np.cumsum([0, *lens[:-1]]).tolist())
        for c in range(10):
            if c >= used or c in starts:
                assert row_lab[c] == -100
            else:
                assert row_lab[c] == 2 * row_ids[c]
    with pytest.raises(ValueError, match="also asked for in fields"):
        pack_sequences(ds, 10, fields=("input_ids", "labels"))
    only = pack_sequences(ds, 10, columns=())
    assert only.column_names == ["input_ids", "position_ids", "seq_lengths"]


def test_dataset_row_order_slices_and_dict() -> None:
    docs = make_docs([4, 7, 3, 6, 2, 8])
    ds = as_dataset(docs)
    shuffled = ds.select([5, 1, 3, 0])
    out = pack_sequences(shuffled, 10, fields=ALL)
    check_packed([docs[i] for i in (5, 1, 3, 0)], out, 10, "split")
    sub = ds.select(range(2, 5))  # contiguous select: a sliced table, no indices mapping
    check_packed(docs[2:5], pack_sequences(sub, 10, fields=ALL), 10, "split")
    dd = datasets.DatasetDict({"train": ds, "test": sub})
    packed = pack_sequences(dd, 10, fields=ALL)
    assert set(packed) == {"train", "test"}
    check_packed(docs, packed["train"], 10, "split")
    torch_ds = pack_sequences(ds.with_format("torch"), 10)
    assert torch_ds.format["type"] == "torch"


def test_align_empty_and_row_fields() -> None:
    data = pa.array([[1, 2, 3], [4, 5], [6]])
    out = pack_sequences(data, 8, align=4, fields=("input_ids", "position_ids", "seq_lengths",
                                                   "seq_starts", "doc_ids"))  # fmt: skip
    assert out.to_pydict() == {
        "input_ids": [[1, 2, 3, 0, 4, 5, 0, 0], [6, 0, 0, 0, 0, 0, 0, 0]],
        "position_ids": [[0, 1, 2, 0, 0, 1, 0, 0], [0] * 8],
        "seq_lengths": [[3, 2], [1]],
        "seq_starts": [[0, 4], [0]],
        "doc_ids": [[0, 1], [2]],
    }
    ragged_out = pack_sequences(data, 8, layout="ragged", fields=("input_ids", "seq_starts"))
    assert ragged_out.to_pydict() == {"input_ids": [[1, 2, 3, 4, 5, 6]], "seq_starts": [[0, 3, 5]]}
    with pytest.raises(ValueError, match="layout='padded'"):
        pack_sequences(data, 8, align=4, layout="ragged")
    empty = datasets.Dataset(pa.table({"input_ids": pa.array([], type=pa.list_(pa.int32()))}))
    packed = pack_sequences(empty, 8, fields=ALL)
    assert packed.num_rows == 0 and packed.column_names == list(ALL)


# ---------------------------------------------------------------------------------------------
# Parity with TRL's pack_dataset
# ---------------------------------------------------------------------------------------------


def test_trl_bfd_parity() -> None:
    trl_data_utils = pytest.importorskip("trl.data_utils")
    rng = np.random.default_rng(7)
    docs = make_docs([int(x) for x in rng.integers(1, 300, 500)] + [700, 1000])
    mask = pa.array([[1] * d.size for d in docs], type=pa.list_(pa.int8()))
    ds = as_dataset(docs, attention_mask=mask)
    for trl_strategy, overflow in (("bfd", "truncate"), ("bfd_split", "split")):
        theirs = trl_data_utils.pack_dataset(ds, 512, strategy=trl_strategy)
        ours = pack_sequences(ds, 512, strategy="bfd", overflow=overflow, layout="ragged",
                              fields=("input_ids", "seq_lengths"))  # fmt: skip
        assert ours.column_names == theirs.column_names == [
            "input_ids", "attention_mask", "seq_lengths"]  # fmt: skip
        assert ours.num_rows == theirs.num_rows
        assert ours.features == theirs.features
        # Same tokens in total and the same multiset of row loads.
        assert sorted(map(sum, column(ours, "seq_lengths"))) == sorted(
            map(sum, column(theirs, "seq_lengths"))
        )
        assert sorted(np.concatenate(column(ours, "input_ids")).tolist()) == sorted(
            np.concatenate(column(theirs, "input_ids")).tolist()
        )


def test_trl_wrapped_parity() -> None:
    trl_data_utils = pytest.importorskip("trl.data_utils")
    docs = make_docs([int(x) for x in np.random.default_rng(3).integers(1, 100, 300)])
    ds = as_dataset(docs)
    theirs = trl_data_utils.pack_dataset(ds, 128, strategy="wrapped")
    ours = pack_sequences(ds, 128, strategy="wrapped", layout="ragged", fields=("input_ids",))
    assert column(ours, "input_ids") == column(theirs, "input_ids")
    assert ours.features == theirs.features


# ---------------------------------------------------------------------------------------------
# Other inputs, plans
# ---------------------------------------------------------------------------------------------


def test_numpy_and_arrow_inputs_agree() -> None:
    docs = make_docs([int(x) for x in np.random.default_rng(5).integers(1, 50, 200)])
    values, offsets = ragged(docs)
    want = pack_sequences(as_dataset(docs), 64, fields=ALL).data.table
    arr = pa.array([d.tolist() for d in docs], type=pa.list_(pa.int32()))
    large = pa.array([d.tolist() for d in docs], type=pa.large_list(pa.int64()))
    chunked = pa.chunked_array([arr.slice(0, 70), arr.slice(70, 50), arr.slice(120)])
    inputs = {
        "numpy int64": (values, offsets),
        "numpy int32 + int32 offsets": (values.astype(np.int32), offsets.astype(np.int32)),
        "list array": arr,
        "large_list": large,
        "chunked": chunked,
        "table": pa.table({"input_ids": chunked}),
        "python lists": [d.tolist() for d in docs],
    }
    for name, data in inputs.items():
        got = pack_sequences(data, 64, fields=ALL)
        assert isinstance(got, pa.Table), name
        for field in ALL:
            assert column(got, field) == column(want, field), (name, field)
    # A sliced table reads only its rows.
    table = pa.table({"input_ids": arr}).slice(30, 100)
    check_packed(docs[30:130], pack_sequences(table, 64, fields=ALL), 64, "split")
    assert np.array_equal(dataset_lengths(table), [d.size for d in docs[30:130]])


def test_plan_save_load(tmp_path: Any) -> None:
    docs = make_docs([int(x) for x in np.random.default_rng(9).integers(1, 200, 300)])
    ds = as_dataset(docs)
    path = tmp_path / "plan.npz"
    first = pack_sequences(ds, 256, strategy="ffd", shuffle_seed=3, save_plan=path, fields=ALL)
    plan = PackPlan.load(path)
    assert plan == plan_dataset(ds, 256, strategy="ffd", shuffle_seed=3)
    for given_plan in (path, str(path), plan):
        again = pack_sequences(ds, 256, plan=given_plan, fields=ALL)  # strategy comes from plan
        assert again.data.table.equals(first.data.table)
    with pytest.raises(ValueError, match="capacity 256"):
        pack_sequences(ds, 512, plan=plan)
    with pytest.raises(ValueError, match="300 documents"):
        pack_sequences(as_dataset(docs[:-1]), 256, plan=plan)
    swapped = as_dataset([docs[1], docs[0], *docs[2:]])
    if docs[0].size != docs[1].size:
        with pytest.raises(ValueError, match="plan piece"):
            pack_sequences(swapped, 256, plan=plan)


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


def test_bad_inputs() -> None:
    docs = make_docs([3, 4, 5])
    ds = as_dataset(docs)
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        pack_sequences(ds, 0)
    with pytest.raises(TypeError, match="max_length must be an int"):
        pack_sequences(ds, 4.5)
    with pytest.raises(ValueError, match="strategy"):
        pack_sequences(ds, 8, strategy="best")
    with pytest.raises(ValueError, match="overflow"):
        pack_sequences(ds, 8, overflow="wrap")
    with pytest.raises(ValueError, match="layout"):
        pack_sequences(ds, 8, layout="flat")
    with pytest.raises(ValueError, match="field"):
        pack_sequences(ds, 8, fields=("input_ids", "attention"))
    with pytest.raises(ValueError, match="column 'tokens' not found"):
        pack_sequences(ds, 8, column="tokens")
    with pytest.raises(ValueError) as exc:  # names the document, its length and the capacity
        pack_sequences(ds, 4, overflow="error")
    assert all(x in str(exc.value) for x in ("2", "5", "4"))
    with pytest.raises(ValueError) as exc:  # the zero-length document, by index
        pack_sequences(pa.array([[1, 2], [], [3]]), 4)
    assert "1" in str(exc.value) and "0" in str(exc.value)
    with pytest.raises(ValueError, match="example 1 is null"):
        pack_sequences(pa.array([[1, 2], None, [3]]), 4)
    with pytest.raises(ValueError, match="example 1 has a null token"):
        pack_sequences(pa.array([[1, 2], [None], [3]]), 4)
    with pytest.raises(TypeError, match="integers"):
        pack_sequences(pa.array([[1.5, 2.0]]), 4)
    with pytest.raises(TypeError, match="not a list column"):
        pack_sequences(as_dataset(docs, text=pa.array(["a", "b", "c"])), 8)
    with pytest.raises(ValueError, match="column 'attention_mask' row 2 has 1 values"):
        pack_sequences(as_dataset(docs, attention_mask=pa.array([[1] * 3, [1] * 4, [1]])), 8)
    with pytest.raises(TypeError, match=r"expected an HF datasets\.Dataset"):
        pack_sequences(42, 8)
    with pytest.raises(ValueError, match="offsets must be non-decreasing"):
        pack_sequences((np.arange(5), np.array([0, 3, 2])), 8)


# ---------------------------------------------------------------------------------------------
# PackingStats
# ---------------------------------------------------------------------------------------------


def test_packing_stats_hand_made() -> None:
    # BFD of [3, 3, 2, 5] into 6: 5 | 3 + 3 | 2  -> 3 rows, 13 tokens, bound ceil(13/6) = 3.
    s = PackingStats.from_plan(pack_plan(np.array([3, 3, 2, 5]), 6))
    assert (s.documents, s.tokens, s.packed_tokens, s.rows, s.slots) == (4, 13, 13, 3, 18)
    assert s.efficiency == pytest.approx(13 / 18)
    assert (s.lower_bound, s.gap_rows, s.gap_percent) == (3, 0, 0.0)
    assert s.docs_per_row_mean == pytest.approx(4 / 3) and s.docs_per_row_max == 2
    assert (s.truncated_tokens, s.dropped_docs, s.dropped_tokens, s.split_docs) == (0, 0, 0, 0)
    # Next-fit keeps order: [5, 3, 2, 4] into 7 -> 5 | 3 + 2 | 4; BFD -> 5 + 2 | 4 + 3.
    assert PackingStats.from_lengths([5, 3, 2, 4], 7, strategy="next_fit").rows == 3
    assert PackingStats.from_lengths([5, 3, 2, 4], 7).rows == 2
    t = PackingStats.from_lengths([8, 2], 6, overflow="truncate")
    assert (t.tokens, t.packed_tokens, t.truncated_tokens, t.rows, t.lower_bound) == (
        10, 8, 2, 2, 2)  # fmt: skip
    sp = PackingStats.from_lengths([8, 2], 6, overflow="split")
    assert (sp.pieces, sp.split_docs, sp.rows, sp.packed_tokens) == (3, 1, 2, 10)
    dr = PackingStats.from_lengths([8, 2, 1], 6, overflow="drop")
    assert (dr.dropped_docs, dr.dropped_tokens, dr.packed_tokens, dr.rows) == (1, 8, 3, 1)
    # A gap: [4, 4, 4] into 6 needs 3 rows, the bound is 2.
    g = PackingStats.from_lengths([4, 4, 4], 6)
    assert (g.rows, g.lower_bound, g.gap_rows, g.gap_percent) == (3, 2, 1, 50.0)
    text = str(g)
    assert "lower bound" in text and "50.0000%" in text and "efficiency" in text
    assert PackingStats(**g.to_dict()) == g


# ---------------------------------------------------------------------------------------------
# PackingStream
# ---------------------------------------------------------------------------------------------


def stream_docs(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    lengths = synthetic_lengths(n, mean=40, maximum=300, seed=seed)
    return [{"input_ids": d} for d in make_docs(lengths.tolist(), seed=seed)]


def batches_equal(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True)
    )


def stream_tokens(batches: list[dict[str, Any]]) -> list[int]:
    """All document tokens the batches hold, in a canonical (sorted) order."""
    out: list[int] = []
    for b in batches:
        used = b["labels"] != -100
        used |= (b["position_ids"] == 0) & (b["input_ids"] != 0)  # piece starts (ids >= 1)
        out += b["input_ids"][used].tolist()
    return sorted(out)


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("strategy", ["bfd", "next_fit"])
def test_packing_stream_emits_every_token(batch_size: int, strategy: str) -> None:
    docs = stream_docs(500)
    stream = PackingStream(docs, 128, batch_size=batch_size, buffer_size=64, strategy=strategy)
    batches = list(stream)
    assert all(b["input_ids"].shape == (batch_size, 128) for b in batches[:-1])
    assert stream_tokens(batches) == sorted(np.concatenate([d["input_ids"] for d in docs]).tolist())
    c = stream.counters
    assert c["documents"] == 500 and c["tokens"] == sum(d["input_ids"].size for d in docs)
    assert c["rows"] == sum(b["input_ids"].shape[0] for b in batches)
    assert c["split_docs"] > 0  # lengths up to 300 into 128
    # Carrying under-filled rows packs nearly as tight as the global plan.
    lower = math.ceil(c["tokens"] / 128)
    if strategy == "bfd":
        assert c["rows"] <= lower * 1.05 + batch_size


@pytest.mark.parametrize("midpoint", [0, 1, 7, 20, 41])
def test_packing_stream_state_round_trip(midpoint: int) -> None:
    docs = stream_docs(400, seed=2)
    kwargs: dict[str, Any] = {"batch_size": 2, "buffer_size": 50}
    full_stream = PackingStream(docs, 96, **kwargs)
    full = list(full_stream)
    assert len(full) > 41
    first = PackingStream(docs, 96, **kwargs)
    it = iter(first)
    head = [next(it) for _ in range(midpoint)]
    state = first.state_dict()
    state = json.loads(json.dumps(state, default=lambda a: a.tolist()))  # survives serialisation
    state = {k: np.asarray(v) if isinstance(v, list) else v for k, v in state.items()}
    if state["pending"] is not None:
        state["pending"] = {k: np.asarray(v) if isinstance(v, list) else v
                            for k, v in state["pending"].items()}  # fmt: skip
    resumed = PackingStream(docs, 96, **kwargs)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert batches_equal(head + tail, full)
    assert resumed.counters == full_stream.counters


class CountingSource:
    """A stateful source: resuming uses its own state instead of skipping examples."""

    def __init__(self, docs: list[dict[str, np.ndarray]]) -> None:
        self.docs, self.pos, self.skipped = docs, 0, 0

    def __iter__(self) -> Any:
        while self.pos < len(self.docs):
            self.pos += 1
            yield self.docs[self.pos - 1]

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pos = state["pos"]


def test_packing_stream_stateful_source() -> None:
    docs = stream_docs(200, seed=4)
    full = list(PackingStream(CountingSource(docs), 64, buffer_size=30, batch_size=2))
    first = PackingStream(CountingSource(docs), 64, buffer_size=30, batch_size=2)
    it = iter(first)
    head = [next(it) for _ in range(9)]
    state = first.state_dict()
    assert state["source"]["pos"] == state["consumed"]
    resumed = PackingStream(CountingSource(docs), 64, buffer_size=30, batch_size=2)
    resumed.load_state_dict(state)
    assert batches_equal(head + list(resumed), full)


def test_packing_stream_bad_inputs() -> None:
    with pytest.raises(ValueError, match="capacity"):
        PackingStream([], 0)
    with pytest.raises(ValueError, match="example 1: 'input_ids' is empty"):
        list(PackingStream([{"input_ids": [1]}, {"input_ids": []}], 8))
    with pytest.raises(TypeError, match="example 0: 'input_ids' must hold integers"):
        list(PackingStream([{"input_ids": [1.5]}], 8))
    s = PackingStream([[1, 2]], 8)
    with pytest.raises(ValueError, match="capacity 8"):
        PackingStream([[1, 2]], 16).load_state_dict(s.state_dict())
    assert [b["input_ids"].tolist() for b in s] == [[[1, 2, 0, 0, 0, 0, 0, 0]]]


# ---------------------------------------------------------------------------------------------
# mixtape pack-stats
# ---------------------------------------------------------------------------------------------


def test_pack_stats_cli(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert stats_main(["--synthetic", "2000", "--max-length", "1024", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = PackingStats.from_plan(pack_plan(synthetic_lengths(2000), 1024))
    assert {k: got[k] for k in want.to_dict()} == want.to_dict()

    lengths = np.array([3, 3, 2, 5])
    np.save(tmp_path / "l.npy", lengths)
    np.savetxt(tmp_path / "l.txt", lengths, fmt="%d")
    for f in ("l.npy", "l.txt"):
        assert stats_main(["--lengths", str(tmp_path / f), "--max-length", "6", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["rows"] == 3

    docs = make_docs([3, 3, 2, 5])
    as_dataset(docs).save_to_disk(str(tmp_path / "ds"))
    assert stats_main(["--dataset", str(tmp_path / "ds"), "--max-length", "6"]) == 0
    text = capsys.readouterr().out
    assert "lower bound" in text and "13" in text
    assert stats_main(["--synthetic", "500", "--strategy", "all", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4

    assert stats_main(["--lengths", str(tmp_path / "missing.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert stats_main(["--synthetic", "10", "--max-length", "0"]) == 2
    assert "capacity" in capsys.readouterr().err
    assert stats_main(["--dataset", str(tmp_path / "ds"), "--column", "x"]) == 2
    assert "column 'x' not found" in capsys.readouterr().err
    assert stats_main([]) == 2  # one source is required


# ---------------------------------------------------------------------------------------------
# Model-loss equivalence: a packed batch computes the same loss as the documents one by one
# ---------------------------------------------------------------------------------------------




@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_per_document_loss(kind: str, attn: str) -> None:
    import torch

    model = tiny_model(kind, attn)
    lengths = [7, 12, 20, 5, 30, 9, 3, 17]
    docs = make_docs(lengths, seed=11, vocab=256)
    values, offsets = ragged(docs)
    plan = pack_plan(np.array(lengths), 32)
    assert plan.num_rows < len(docs) and plan.num_rows >= 3  # really packed, with padding
    batch = pack_fill(plan, values, offsets,
                      fields=("input_ids", "labels", "position_ids", "seq_idx"))  # fmt: skip
    ids = torch.from_numpy(batch["input_ids"])
    labels = torch.from_numpy(batch["labels"])
    positions = torch.from_numpy(batch["position_ids"])
    seq_idx = torch.from_numpy(batch["seq_idx"])
    mask = block_causal_mask(seq_idx, additive=(attn == "eager"))
    if attn == "eager":
        assert mask.dtype == torch.float32
    else:
        assert mask.dtype == torch.bool
    assert tuple(mask.shape) == (plan.num_rows, 1, 32, 32)
    with torch.no_grad():
        n_packed = int((labels[:, 1:] != -100).sum())
        assert n_packed == sum(n - 1 for n in lengths)
        out = model(input_ids=ids, position_ids=positions, attention_mask=mask, labels=labels)
        packed = float(out.loss) * n_packed
        separate = 0.0
        for d in docs:
            t = torch.from_numpy(d)[None]
            separate += float(model(input_ids=t, labels=t).loss) * (d.size - 1)
        # Without the mask, documents see each other: the test can tell the difference.
        leaky = float(model(input_ids=ids, position_ids=positions, labels=labels).loss) * n_packed
    assert packed == pytest.approx(separate, rel=1e-5, abs=1e-4)
    assert abs(leaky - separate) > 1e-3


# ---------------------------------------------------------------------------------------------
# The benchmark's peers compute what they claim (so the bench compares like with like)
# ---------------------------------------------------------------------------------------------


def test_bench_peers_agree_with_ops() -> None:
    pytest.importorskip("mixtape.bench")
    from mixtape.bench import pack as bench_pack

    lengths = np.minimum(synthetic_lengths(3000, seed=5), 4096)
    for cap in (512, 4096):
        clipped = np.minimum(lengths, cap)
        ffd = pack_plan(clipped, cap, strategy="ffd")
        where = bench_pack.numpy_ffd(clipped, cap)
        assert int(where.max()) + 1 == ffd.num_rows
        assert np.array_equal(where[ffd.doc], np.repeat(np.arange(ffd.num_rows),
                                                        np.diff(ffd.row_offsets)))  # fmt: skip
        assert bench_pack.python_next_fit(clipped, cap) == pack_plan(
            clipped, cap, strategy="next_fit").num_rows  # fmt: skip
    values, offsets = ragged(make_docs(lengths[:500].tolist()))
    plan = pack_plan(lengths[:500], 1024, overflow="split", align=8)
    ours = pack_fill(plan, values, offsets, fields=("input_ids", "labels", "position_ids"))
    ref = bench_pack.numpy_fill(plan, values, offsets)
    for key in ours:
        assert np.array_equal(ours[key], ref[key]), key


# ---------------------------------------------------------------------------------------------
# Review regressions
# ---------------------------------------------------------------------------------------------


def test_extra_columns_pad_with_zero_not_the_token_pad() -> None:
    # pad_value is a token id (e.g. GPT-2's eos 50256): attention_mask / token_type_ids padding
    # must stay 0, and labels (with prompt masking) keep -100 wherever the input had it.
    docs = make_docs([3, 2, 4])
    ds = datasets.Dataset.from_dict({
        "input_ids": [d.tolist() for d in docs],
        "attention_mask": [[1] * d.size for d in docs],
        "labels": [[-100] * (d.size - 1) + [int(d[-1])] for d in docs],
    })  # fmt: skip
    out = pack_sequences(ds, 6, pad_value=50256, fields=("input_ids", "seq_lengths"))
    for ids, mask, lab, lens in zip(column(out, "input_ids"), column(out, "attention_mask"),
                                    column(out, "labels"), column(out, "seq_lengths"),
                                    strict=True):  # fmt: skip
        used = sum(lens)
        assert ids[used:] == [50256] * (6 - used)
        assert mask == [1] * used + [0] * (6 - used)
        ends = np.cumsum(lens) - 1
        assert [c for c in range(6) if lab[c] != -100] == ends.tolist()
        assert [lab[c] for c in ends] == [ids[c] for c in ends]


def test_saved_plan_on_other_data_with_equal_totals_errors(tmp_path: Any) -> None:
    # Same documents and tokens in total, all pieces in bounds, yet document 0 would lose a token.
    a = datasets.Dataset.from_dict({"input_ids": [[1] * 5, [2] * 9]})
    b = datasets.Dataset.from_dict({"input_ids": [[1] * 6, [2] * 8]})
    plan_dataset(a, 6, overflow="truncate").save(tmp_path / "p.npz")
    assert pack_sequences(a, 6, plan=tmp_path / "p.npz").num_rows == 2
    with pytest.raises(ValueError, match=r"5 tokens of document 0, which has 6.*other data"):
        pack_sequences(b, 6, plan=tmp_path / "p.npz")
    for overflow in ("split", "drop"):
        plan_dataset(a, 6, overflow=overflow).save(tmp_path / "q.npz")
        pack_sequences(a, 6, plan=tmp_path / "q.npz")


def _prompt_masked(seed: int = 0, n: int = 60) -> list[dict[str, list[int]]]:
    rng = np.random.default_rng(seed)
    out = []
    for length in rng.integers(2, 20, n).tolist():
        ids = rng.integers(1, 1000, length).tolist()
        prompt = int(rng.integers(1, length))
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def test_packing_stream_keeps_prompt_masked_labels() -> None:
    examples = _prompt_masked()
    batches = list(PackingStream(examples, 32, batch_size=2, buffer_size=16))
    want_masked = sum(sum(x == -100 for x in e["labels"]) for e in examples)
    ids = np.concatenate([b["input_ids"] for b in batches])
    labels = np.concatenate([b["labels"] for b in batches])
    pos = np.concatenate([b["position_ids"] for b in batches])
    # Every (document-start, label) pair matches an input example: the prompt stays masked.
    got = set()
    for r in range(ids.shape[0]):
        starts = [*np.flatnonzero(pos[r] == 0).tolist(), ids.shape[1]]
        for a, b in itertools.pairwise(starts):
            used = ids[r, a:b][ids[r, a:b] != 0]
            if used.size:  # padding has position 0 too
                got.add((tuple(used.tolist()), tuple(labels[r, a + 1 : a + used.size].tolist())))
    want = {(tuple(e["input_ids"]), tuple(e["labels"][1:])) for e in examples}
    assert got == want
    assert int((labels == -100).sum()) >= want_masked
    # Resumed mid-stream in a fresh object: bit for bit the same continuation, labels included.
    s = PackingStream(examples, 32, batch_size=2, buffer_size=16)
    it = iter(s)
    head = [next(it) for _ in range(3)]
    fresh = PackingStream(examples, 32, batch_size=2, buffer_size=16)
    fresh.load_state_dict(s.state_dict())
    rest = head + list(fresh)
    assert len(rest) == len(batches)
    for x, y in zip(rest, batches, strict=True):
        assert all(np.array_equal(x[k], y[k]) for k in ("input_ids", "labels", "position_ids"))
    bad = [{"input_ids": [1, 2]}, {"input_ids": [3], "labels": [3]}]
    with pytest.raises(ValueError, match="example 1: has 'labels'"):
        list(PackingStream(bad, 4))
    with pytest.raises(ValueError, match=r"example 0: 'labels' must be.*shape"):
        list(PackingStream([{"input_ids": [1, 2], "labels": [1]}], 4))
    plain = list(PackingStream(examples, 32, batch_size=2, buffer_size=16, label_column=None))
    assert int(np.concatenate([b["labels"] for b in plain]).__eq__(-100).sum()) < want_masked


def test_packing_stream_iterates_again_as_a_new_epoch() -> None:
    docs = [d.tolist() for d in make_docs([5, 9, 3, 11, 7, 2, 8])]
    s = PackingStream(docs, 12, batch_size=2, buffer_size=4)
    first = [b["input_ids"] for b in s]
    second = [b["input_ids"] for b in s]
    assert len(first) > 0 and len(second) == len(first)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert s.counters["documents"] == len(docs)


def test_errors_name_the_column_row_and_example(tmp_path: Any) -> None:
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2], [], [3]]})
    for call in (lambda: pack_sequences(ds, 4), lambda: plan_dataset(ds, 4)):
        with pytest.raises(ValueError, match=r"column 'input_ids': row 1 is empty \(1 empty"):
            call()
    floats = datasets.Dataset.from_dict({"input_ids": [[1, 2], [3]], "w": [[0.5, 1.0], [1.0]]})
    with pytest.raises(TypeError, match=r"column 'w' holds double values.*columns=\[\.\.\.\]"):
        pack_sequences(floats, 4)
    assert pack_sequences(floats, 4, columns=()).num_rows == 1
    with pytest.raises(ValueError, match=r"example 1: no 'input_ids' column; it has \['ids'\]"):
        list(PackingStream([{"input_ids": [1]}, {"ids": [2]}], 4))


def test_pack_stats_cli_text_lengths_from_savetxt(tmp_path: Any,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "lengths.txt"
    np.savetxt(path, np.array([5, 3, 8, 2, 9, 1]))  # written as floats: 5.000000000000000000e+00
    assert stats_main(["--lengths", str(path), "--max-length", "8", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["documents"], got["tokens"], got["rows"], got["lower_bound"]) == (6, 28, 4, 4)
    path.write_text("5\nfive\n")
    assert stats_main(["--lengths", str(path)]) == 2
    assert str(path) in capsys.readouterr().err


def test_loss_mask_follows_carried_labels() -> None:
    # loss_mask is documented as labels != label_pad_value; with the data's own labels (prompt
    # masked) it must not mark the prompt tokens as trained on.
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]],
                                     "labels": [[-100, -100, 3], [-100, 5]]})  # fmt: skip
    for layout in ("padded", "ragged"):
        out = pack_sequences(ds, 6, layout=layout,
                             fields=("input_ids", "loss_mask", "seq_lengths"))  # fmt: skip
        for mask, lab in zip(column(out, "loss_mask"), column(out, "labels"), strict=True):
            assert mask == [x != -100 for x in lab]
            assert sum(mask) == 2
    stream = PackingStream(ds.to_iterable_dataset(), 6, fields=("input_ids", "labels", "loss_mask"))
    (batch,) = list(stream)
    assert batch["loss_mask"].tolist() == [[False, False, True, False, True, False]]
    assert batch["labels"].tolist() == [[-100, -100, 3, -100, 5, -100]]


def test_packing_stream_in_a_dataloader() -> None:
    """A torch IterableDataset of whole batches: DataLoader(batch_size=None) gives the same
    batches as tensors; more than one worker would duplicate the source, so it is refused."""
    import torch

    docs = [list(range(1, n + 1)) for n in (5, 9, 3, 17, 2, 8, 11, 4)]
    stream = PackingStream(docs, 16, batch_size=2, buffer_size=4)
    assert isinstance(stream, torch.utils.data.IterableDataset)
    direct = list(PackingStream(docs, 16, batch_size=2, buffer_size=4))
    loaded = list(torch.utils.data.DataLoader(stream, batch_size=None))
    assert len(loaded) == len(direct) > 0
    for got, want in zip(loaded, direct, strict=True):
        assert set(got) == set(want)
        for key in want:
            assert isinstance(got[key], torch.Tensor)
            np.testing.assert_array_equal(got[key].numpy(), want[key])
    two = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    with pytest.raises(ValueError, match="cannot be split across 2 DataLoader workers"):
        list(two)


# ---------------------------------------------------------------------------------------------
# Memory-mapped datasets: batches on disk, same rows as in memory
# ---------------------------------------------------------------------------------------------


def _on_disk(ds: Any, path: Any, shards: int = 3) -> Any:
    ds.save_to_disk(str(path), num_shards=shards)
    return datasets.load_from_disk(str(path))


def _carried_dataset(n: int = 300, seed: int = 11) -> Any:
    rng = np.random.default_rng(seed)
    docs = make_docs([int(x) for x in rng.integers(1, 90, n)] + [200], seed=seed)
    return datasets.Dataset.from_dict({
        "input_ids": [d.tolist() for d in docs],
        "attention_mask": [[1] * d.size for d in docs],
        "labels": [(d * 3).tolist() for d in docs],
    })  # fmt: skip


@pytest.mark.parametrize("layout", ["padded", "ragged"])
@pytest.mark.parametrize("mapping", ["none", "shuffle", "select"])
def test_memory_mapped_input_packs_in_batches_to_a_cache_file(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, layout: str, mapping: str
) -> None:
    from datasets.table import MemoryMappedTable

    import mixtape.packing.offline as offline

    monkeypatch.setattr(offline, "_BATCH_BYTES", 64 * 100)  # a few rows a batch: many batches
    mem = _carried_dataset()
    disk = _on_disk(mem, tmp_path / "ds")
    if mapping == "shuffle":
        mem, disk = mem.shuffle(seed=4), disk.shuffle(seed=4)
    elif mapping == "select":
        rows = [5, 3, 200, 17, 17, 0, *range(40, 120)]
        mem, disk = mem.select(rows), disk.select(rows)
    fields = ("input_ids", "position_ids", "seq_idx", "loss_mask", "seq_lengths", "doc_ids")
    want = pack_sequences(mem, 64, layout=layout, fields=fields, keep_in_memory=True)
    got = pack_sequences(disk, 64, layout=layout, fields=fields)
    assert not want.cache_files
    (cache,) = got.cache_files
    assert os.path.dirname(cache["filename"]) == str(tmp_path / "ds")
    assert isinstance(got.data, MemoryMappedTable)
    assert got.num_rows == want.num_rows > 10
    assert got.features == want.features
    for name in want.column_names:
        assert column(got, name) == column(want, name), name
    assert got.data.table.equals(want.data.table)
    # Same input, same plan: the same fingerprint, and the cache file is reused, not rewritten.
    monkeypatch.setattr(offline, "_write_batches", None)
    again = pack_sequences(disk, 64, layout=layout, fields=fields)
    assert again._fingerprint == got._fingerprint and again.cache_files == got.cache_files
    in_ram = pack_sequences(disk, 64, layout=layout, fields=fields, keep_in_memory=True)
    assert not in_ram.cache_files and in_ram.data.table.equals(want.data.table)


def test_cache_file_name_for_in_memory_and_arrow_inputs(tmp_path: Any) -> None:
    mem = _carried_dataset(80)
    want = pack_sequences(mem, 32, fields=ALL, columns=())
    path = tmp_path / "sub" / "packed.arrow"
    got = pack_sequences(mem, 32, fields=ALL, columns=(), cache_file_name=path)
    assert got.cache_files == [{"filename": str(path)}]
    assert got.data.table.equals(want.data.table)
    assert not list((tmp_path / "sub").glob("tmp-pack-*"))  # the temporary file was renamed
    table = pa.table({"input_ids": mem.data.table.column("input_ids")})
    arrow_path = tmp_path / "arrow.arrow"
    got_table = pack_sequences(table, 32, fields=ALL, cache_file_name=arrow_path)
    assert isinstance(got_table, pa.Table) and got_table.equals(want.data.table)
    values, offsets = ragged([np.asarray(x) for x in mem["input_ids"]])
    got_np = pack_sequences((values, offsets), 32, fields=ALL, cache_file_name=tmp_path / "np")
    assert got_np.equals(pack_sequences((values, offsets), 32, fields=ALL))
    with pytest.raises(ValueError, match="num_proc"):
        pack_sequences(mem, 32, num_proc=0)
    assert pack_sequences(mem, 32, num_proc=2, columns=()).data.table.equals(
        pack_sequences(mem, 32, columns=()).data.table)


def test_dataset_lengths_chunk_by_chunk_with_a_mapping(tmp_path: Any) -> None:
    mem = _carried_dataset(120)
    disk = _on_disk(mem, tmp_path / "ds", shards=4)
    want = np.array([len(x) for x in mem["input_ids"]])
    assert disk.data.table.column("input_ids").num_chunks >= 4
    assert np.array_equal(dataset_lengths(disk), want)
    order = np.random.default_rng(0).permutation(len(want))[:50]
    assert np.array_equal(dataset_lengths(disk.select(order)), want[order])
    assert np.array_equal(dataset_lengths(disk.shuffle(seed=2)),
                          want[np.asarray(disk.shuffle(seed=2)._indices.column(0))])  # fmt: skip
    assert plan_dataset(disk.select(order), 64) == pack_plan(want[order], 64)


# ---------------------------------------------------------------------------------------------
# Empty sequences and alignment gaps
# ---------------------------------------------------------------------------------------------


def test_drop_empty_counts_and_keeps_input_row_ids(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [[1, 2], [], [3, 4, 5], [], [], [6]]
    ds = datasets.Dataset.from_dict({"input_ids": rows})
    with pytest.raises(ValueError, match=r"row 1 is empty \(3 empty rows\)"):
        pack_sequences(ds, 4)
    with pytest.raises(ValueError, match="row 1 is empty"):
        plan_dataset(ds, 4)
    with caplog.at_level("WARNING", logger="mixtape.packing"):
        out = pack_sequences(ds, 4, strategy="next_fit", drop_empty=True,
                             fields=("input_ids", "seq_lengths", "doc_ids"),
                             layout="ragged")  # fmt: skip
    assert "3 empty rows dropped" in caplog.text
    assert out.to_dict() == {"input_ids": [[1, 2], [3, 4, 5, 6]], "seq_lengths": [[2], [3, 1]],
                             "doc_ids": [[0], [2, 5]]}  # fmt: skip
    plan = plan_dataset(ds, 4, strategy="next_fit", drop_empty=True)
    assert (plan.num_docs, plan.dropped_docs, plan.dropped_tokens) == (6, 3, 0)
    assert PackingStats.from_plan(plan).dropped_docs == 3
    # Counted together with documents that overflow="drop" drops; the saved plan reloads.
    long = datasets.Dataset.from_dict({"input_ids": [[1] * 9, [], [2, 3]]})
    plan = plan_dataset(long, 4, overflow="drop", drop_empty=True)
    assert (plan.dropped_docs, plan.dropped_tokens) == (2, 9)
    packed = pack_sequences(long, 4, overflow="drop", drop_empty=True, save_plan=tmp_path / "p",
                            fields=ALL)  # fmt: skip
    assert column(packed, "doc_ids") == [[2]]
    again = pack_sequences(long, 4, plan=tmp_path / "p.npz", drop_empty=True, fields=ALL)
    assert again.data.table.equals(packed.data.table)
    with pytest.raises(ValueError, match="row 1 is empty"):
        pack_sequences(long, 4, plan=tmp_path / "p.npz")
    disk = _on_disk(ds, tmp_path / "ds", shards=2)
    on_disk = pack_sequences(disk, 4, strategy="next_fit", drop_empty=True,
                             fields=("input_ids", "seq_lengths", "doc_ids"),
                             layout="ragged")  # fmt: skip
    assert on_disk.cache_files and on_disk.to_dict() == out.to_dict()


def test_align_gaps_always_write_seq_starts() -> None:
    data = pa.array([[1, 2, 3], [4, 5], [6]])
    out = pack_sequences(data, 8, align=4, fields=("input_ids", "seq_lengths"))
    assert out.to_pydict() == {
        "input_ids": [[1, 2, 3, 0, 4, 5, 0, 0], [6, 0, 0, 0, 0, 0, 0, 0]],
        "seq_lengths": [[3, 2], [1]],
        "seq_starts": [[0, 4], [0]],
    }
    # Even when no gap happens to occur, align > 1 keeps the same columns.
    even = pack_sequences(pa.array([[1, 2, 3, 4], [5, 6, 7, 8]]), 8, align=4,
                          fields=("input_ids", "seq_lengths", "doc_ids"))  # fmt: skip
    assert even.column_names == ["input_ids", "seq_lengths", "seq_starts", "doc_ids"]
    # A reused plan with gaps also gets them, whatever align says; back to back needs none.
    gapped = pack_plan(np.array([3, 2, 1]), 8, align=4)
    reused = pack_sequences(data, 8, plan=gapped, fields=("input_ids", "seq_lengths"))
    assert column(reused, "seq_starts") == [[0, 4], [0]]
    plain = pack_sequences(data, 8, fields=("input_ids", "seq_lengths"))
    assert plain.column_names == ["input_ids", "seq_lengths"]
    ragged_out = pack_sequences(data, 8, plan=gapped, layout="ragged", fields=("input_ids",))
    assert ragged_out.column_names == ["input_ids"]  # ragged rows are back to back


# ---------------------------------------------------------------------------------------------
# Document sources: doc_source_ids per row
# ---------------------------------------------------------------------------------------------

SOURCE_NAMES = ("web", "code", "math")


def sourced_dataset(lengths: list[int], seed: int = 0, **extra: Any) -> tuple[Any, list[int]]:
    """Documents with a ``__source__`` name each; returns the dataset and each row's id."""
    rng = np.random.default_rng(seed)
    ids = [int(i) for i in rng.integers(0, len(SOURCE_NAMES), len(lengths))]
    names = pa.array([SOURCE_NAMES[i] for i in ids])
    return as_dataset(make_docs(lengths, seed), __source__=names, **extra), ids


def check_doc_sources(packed: Any, want: list[int]) -> None:
    """Every row's doc_source_ids: int32, aligned with seq_lengths, each its document's source."""
    data = packed.data.table if hasattr(packed, "data") else packed
    typ = data.schema.field("doc_source_ids").type
    assert typ.value_type == pa.int32(), typ
    for r, (srcs, docs, lens) in enumerate(zip(column(data, "doc_source_ids"),
                                               column(data, "doc_ids"),
                                               column(data, "seq_lengths"), strict=True)):
        assert len(srcs) == len(lens), r
        assert srcs == [want[d] for d in docs], r


@pytest.mark.parametrize("strategy", ["bfd", "next_fit", "wrapped"])
@pytest.mark.parametrize("layout", ["padded", "ragged"])
@pytest.mark.parametrize("form", ["names", "dictionary", "ids", "class_label"])
def test_pack_sequences_doc_source_ids(strategy: str, layout: str, form: str) -> None:
    lengths = [int(n) for n in np.random.default_rng(1).integers(1, 40, 80)]
    ds, want = sourced_dataset(lengths, seed=1)
    kwargs: dict[str, Any] = {"source_names": SOURCE_NAMES}
    if form == "dictionary":
        ds = datasets.Dataset(ds.data.table.set_column(
            1, "__source__", ds.data.table.column("__source__").dictionary_encode()))
    elif form == "ids":  # integer ids already, under a name of our choice, no names needed
        ds = ds.remove_columns("__source__").add_column("source_id", want)
        kwargs = {"source_column": "source_id"}
    elif form == "class_label":  # ClassLabel ids index its own (sorted) names: re-mapped
        ds = ds.class_encode_column("__source__")
        assert ds.features["__source__"].names == sorted(SOURCE_NAMES)
    out = pack_sequences(ds, 32, strategy, layout=layout, fields=("input_ids", "doc_ids"),
                         **kwargs)  # fmt: skip
    assert out.column_names == ["input_ids", "seq_lengths", "doc_ids", "doc_source_ids"]
    check_doc_sources(out, want)
    # A split document (over max_length) gives each of its pieces its source.
    long_ds, long_want = sourced_dataset([70, 5, 33], seed=2)
    long_out = pack_sequences(long_ds, 32, strategy, layout=layout, source_names=SOURCE_NAMES,
                              fields=("input_ids", "seq_lengths", "doc_ids"))  # fmt: skip
    assert sum(len(d) for d in column(long_out, "doc_ids")) > 3
    check_doc_sources(long_out, long_want)


def test_doc_sources_follow_row_order_align_and_dropped_documents() -> None:
    ds, want = sourced_dataset([4, 7, 0, 6, 2, 8, 0, 3], seed=4)
    order = [5, 1, 3, 0, 6, 7]
    shuffled = ds.select(order)  # an indices mapping over the table
    fields = ("input_ids", "seq_lengths", "seq_starts", "doc_ids")
    out = pack_sequences(shuffled, 12, fields=fields, align=4, drop_empty=True,
                         source_names=SOURCE_NAMES)  # fmt: skip
    check_doc_sources(out, [want[i] for i in order])
    assert sum(len(x) for x in column(out, "doc_source_ids")) == 5  # the empty row dropped
    dd = pack_sequences(datasets.DatasetDict({"a": ds.select(range(6)), "b": shuffled}), 12,
                        fields=fields, drop_empty=True, source_names=SOURCE_NAMES)  # fmt: skip
    check_doc_sources(dd["a"], want[:6])
    check_doc_sources(dd["b"], [want[i] for i in order])


def test_doc_sources_out_of_core_and_cache(tmp_path: Any) -> None:
    lengths = [int(n) for n in np.random.default_rng(7).integers(1, 50, 300)]
    ds, want = sourced_dataset(lengths, seed=7)
    ds.save_to_disk(str(tmp_path / "data"))
    mapped = datasets.load_from_disk(str(tmp_path / "data")).shuffle(seed=3)
    assert mapped.cache_files
    order = mapped._indices.column(0).to_pylist()
    fields = ("input_ids", "seq_lengths", "doc_ids")
    disk = pack_sequences(mapped, 64, fields=fields, source_names=SOURCE_NAMES)
    assert disk.cache_files  # written batch by batch to a cache file
    check_doc_sources(disk, [want[i] for i in order])
    memory = pack_sequences(mapped, 64, fields=fields, source_names=SOURCE_NAMES,
                            keep_in_memory=True)  # fmt: skip
    assert column(disk, "doc_source_ids") == column(memory, "doc_source_ids")
    # Other names (another order) are other ids: never the cached rows of the first call.
    names = ("math", "web", "code")
    again = pack_sequences(mapped, 64, fields=fields, source_names=names)
    check_doc_sources(again, [names.index(SOURCE_NAMES[want[i]]) for i in order])


def test_doc_source_errors() -> None:
    ds, _ = sourced_dataset([3, 4, 5], seed=0)
    with pytest.raises(ValueError, match="holds source names: pass source_names"):
        pack_sequences(ds, 8)
    with pytest.raises(ValueError, match=r"source column '__source__': row \d has source '\w+', "
                                         r"which is not in source_names \['web'\]"):  # fmt: skip
        pack_sequences(ds.map(lambda ex, i: {"__source__": "web" if i == 0 else "code"},
                              with_indices=True), 8, source_names=["web"])  # fmt: skip
    with pytest.raises(ValueError, match="source_column 'src' not found"):
        pack_sequences(ds, 8, source_column="src", source_names=SOURCE_NAMES)
    with pytest.raises(ValueError, match="no '__source__' column; name the documents' source"):
        pack_sequences(ds.remove_columns("__source__"), 8, source_names=SOURCE_NAMES)
    with pytest.raises(ValueError, match="need a Dataset or a pyarrow Table"):
        pack_sequences([[1, 2], [3]], 8, source_names=SOURCE_NAMES)
    with pytest.raises(ValueError, match="is the documents' source column"):
        pack_sequences(ds, 8, columns=["__source__"], source_names=SOURCE_NAMES)
    with pytest.raises(ValueError, match="repeats 'web'"):
        pack_sequences(ds, 8, source_names=["web", "web"])
    ints = ds.remove_columns("__source__")
    with pytest.raises(ValueError, match=r"row 1 has source id 3, which names no source "
                                         r"\(source_names has 3"):  # fmt: skip
        pack_sequences(ints.add_column("sid", [0, 3, 1]), 8, source_column="sid",
                       source_names=SOURCE_NAMES)  # fmt: skip
    with pytest.raises(ValueError, match="row 2 has source id -1"):
        pack_sequences(ints.add_column("sid", [0, 1, -1]), 8, source_column="sid")
    with pytest.raises(ValueError, match=r"row 1 has no source \(null\)"):
        pack_sequences(ints.add_column("sid", ["web", None, "code"]), 8, source_column="sid",
                       source_names=SOURCE_NAMES)  # fmt: skip
    with pytest.raises(TypeError, match="expected source names"):
        pack_sequences(ints.add_column("sid", [0.5, 1.0, 2.0]), 8, source_column="sid")
    with pytest.raises(ValueError, match="row 1 has source 'wiki' \\(a ClassLabel\\)"):
        labelled = ints.add_column("sid", ["web", "wiki", "code"]).class_encode_column("sid")
        pack_sequences(labelled, 8, source_column="sid", source_names=SOURCE_NAMES)


def _source_docs(n: int, with_labels: bool) -> list[dict[str, Any]]:
    """Documents whose tokens name their source: source k's tokens are 1000 * (k + 1) + ..."""
    rng = np.random.default_rng(9)
    names = ["web", "code", "math"]
    out = []
    for i in range(n):
        k = int(rng.integers(0, 3))
        ids = 1000 * (k + 1) + rng.integers(0, 999, int(rng.integers(1, 150)))
        doc: dict[str, Any] = {"input_ids": ids, "__source__": names[k] if i % 2 else k}
        if with_labels:
            doc["labels"] = np.where(np.arange(ids.size) < 2, -100, ids)
        out.append(doc)
    return out


@pytest.mark.parametrize("with_labels", [False, True])
def test_packing_stream_source_ids_follow_every_token(with_labels: bool) -> None:
    """Examples with __source__ (name or id) get per-token source_ids, -1 on padding; they
    survive carried rows, split documents and a state round trip."""
    docs = _source_docs(300, with_labels)
    kw: dict[str, Any] = {"batch_size": 2, "buffer_size": 40,
                          "source_names": ["web", "code", "math"]}  # fmt: skip
    batches = list(PackingStream(docs, 96, **kw))
    for b in batches:
        src, ids = b["source_ids"], b["input_ids"]
        assert src.shape == ids.shape
        real = src >= 0
        assert np.array_equal(ids[real] // 1000 - 1, src[real])
        assert np.all(src[~real] == -1) and np.all(ids[~real] == 0)
    first = PackingStream(docs, 96, **kw)
    it = iter(first)
    head = [next(it) for _ in range(11)]
    resumed = PackingStream(docs, 96, **kw)
    resumed.load_state_dict(first.state_dict())
    assert batches_equal(head + list(resumed), batches)
    other = PackingStream(docs, 96, **{**kw, "source_names": ["code", "web", "math"]})
    with pytest.raises(ValueError, match="the source ids would mean other sources"):
        other.load_state_dict(first.state_dict())


def test_packing_stream_of_a_mixture_numbers_sources_by_its_names() -> None:
    from mixtape import MixedDataset

    mixed = MixedDataset({"a": [{"input_ids": [1000 + i] * 5} for i in range(30)],
                          "b": [{"input_ids": [2000 + i] * 9} for i in range(30)]},
                         {"a": 0.5, "b": 0.5}, seed=0, stop_strategy="first_exhausted")
    batches = list(PackingStream(mixed, 32, batch_size=2))
    src = np.concatenate([b["source_ids"].ravel() for b in batches])
    ids = np.concatenate([b["input_ids"].ravel() for b in batches])
    assert np.array_equal(ids[src >= 0] // 1000 - 1, src[src >= 0])
    assert set(src.tolist()) == {-1, 0, 1}


def test_packing_stream_bad_sources() -> None:
    with pytest.raises(ValueError, match=r"example 0: '__source__' is the name 'web' but the "
                                         r"stream has no source_names"):
        list(PackingStream([{"input_ids": [1], "__source__": "web"}], 8))
    with pytest.raises(ValueError, match=r"example 0: '__source__' = 'x' is not one of"):
        list(PackingStream([{"input_ids": [1], "__source__": "x"}], 8, source_names=["web"]))
    with pytest.raises(ValueError, match=r"example 0: '__source__' = 3 is not a source id"):
        list(PackingStream([{"input_ids": [1], "__source__": 3}], 8, source_names=["web"]))
    with pytest.raises(TypeError, match=r"'__source__' must be a source name or an int id"):
        list(PackingStream([{"input_ids": [1], "__source__": 1.5}], 8))
    with pytest.raises(ValueError, match=r"example 1: has no '__source__' field but the earlier"):
        list(PackingStream([{"input_ids": [1], "__source__": 0}, {"input_ids": [2]}], 8))
    plain = list(PackingStream([{"input_ids": [1], "__source__": 0}], 8, source_key=None))
    assert "source_ids" not in plain[0]


def test_packing_stream_state_after_a_pass_resumes_to_the_next_pass() -> None:
    docs = stream_docs(60, seed=4)
    first = PackingStream(docs, 96, batch_size=2)
    assert list(first)
    state = first.state_dict()
    resumed = PackingStream(docs, 96, batch_size=2)
    resumed.load_state_dict(state)
    again, other = list(first), list(resumed)
    assert again and len(other) == len(again)
    for x, y in zip(again, other, strict=True):
        assert np.array_equal(x["input_ids"], y["input_ids"])
