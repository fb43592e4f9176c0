"""Collators against plain Python references, every input form, bad input, pinning, registry."""

from __future__ import annotations

import pickle
import re
import warnings
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtape import collate, ops
from mixtape.collate import (
    CollatorRegistry,
    Ragged,
    VisionCollator,
    create_causal_lm_collate,
    create_collate_fn,
    create_flattening_collate,
    create_seq2seq_collate,
    get_collator,
    list_collators,
)
from mixtape.collate import output as collate_output
from mixtape.collate.output import Output

# ---------------------------------------------------------------------------------------------
# Plain Python references
# ---------------------------------------------------------------------------------------------


def ref_width(lengths: list[int], max_length: int | None, multiple: int | None) -> int:
    width = max(lengths) if lengths else 0
    if max_length is not None:
        width = min(width, max_length)
    if multiple:
        width = -(-width // multiple) * multiple
    return width


def ref_row(seq: list[int], width: int, fill: int, side: str, trunc: str) -> list[int]:
    kept = seq if len(seq) <= width else (seq[:width] if trunc == "right" else seq[-width:])
    pad = [fill] * (width - len(kept))
    return kept + pad if side == "right" else pad + kept


def ref_pad(
    seqs: list[list[int]],
    *,
    pad: int = 0,
    side: str = "right",
    trunc: str = "right",
    max_length: int | None = None,
    multiple: int | None = None,
    labels: list[list[int]] | None = None,
    shift: bool = False,
) -> dict[str, list[list[int]]]:
    width = ref_width([len(s) for s in seqs], max_length, multiple)
    keep = width if max_length is None else min(width, max_length)  # tokens kept per row
    lab_src = seqs if labels is None else labels
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for s, lab in zip(seqs, lab_src, strict=True):
        kept = s if len(s) <= keep else (s[:keep] if trunc == "right" else s[-keep:])
        kept_lab = lab if len(lab) <= keep else (lab[:keep] if trunc == "right" else lab[-keep:])
        if shift:
            kept_lab = [*kept_lab[1:], -100] if kept_lab else []
        out["input_ids"].append(ref_row(kept, width, pad, side, trunc))
        out["attention_mask"].append(ref_row([1] * len(kept), width, 0, side, trunc))
        out["labels"].append(ref_row(kept_lab, width, -100, side, trunc))
    return out


def ref_flatten(
    seqs: list[list[int]], labels: list[list[int]] | None = None, sep: int = -100, start: int = 0
) -> dict[str, Any]:
    lab_src = seqs if labels is None else labels
    ids, labs, pos, seq_idx, cu = [], [], [], [], [0]
    for i, (s, lab) in enumerate(zip(seqs, lab_src, strict=True)):
        ids += s
        labs += [sep, *lab[1:]] if s else []
        pos += [start + k for k in range(len(s))]
        seq_idx += [i] * len(s)
        cu.append(cu[-1] + len(s))
    return {"input_ids": [ids], "labels": [labs], "position_ids": [pos], "seq_idx": [seq_idx],
            "cu_seq_lens_q": cu, "max_length_q": max(len(s) for s in seqs)}  # fmt: skip


def as_lists(x: torch.Tensor) -> list[Any]:
    out: list[Any] = x.tolist()
    return out


# ---------------------------------------------------------------------------------------------
# Input forms: the same batch as lists, numpy, tensors, Arrow, dict of columns, Ragged
# ---------------------------------------------------------------------------------------------

FORMS = ["lists", "numpy32", "numpy64", "tensors", "arrow", "arrow_large", "columns", "ragged"]


def make_batch(seqs: list[list[int]], form: str, extra: dict[str, list[Any]] | None = None) -> Any:
    """The batch ``{"input_ids": seqs, **extra}`` in one of the supported input forms."""
    cols: dict[str, list[Any]] = {"input_ids": seqs, **(extra or {})}
    n = len(seqs)
    if form in ("arrow", "arrow_large"):
        lt = pa.list_ if form == "arrow" else pa.large_list
        arrays = {}
        for k, v in cols.items():
            is_seq = isinstance(v[0], list)
            arrays[k] = pa.array(v, lt(pa.int32()) if is_seq else None)
        return pa.table(arrays)
    if form == "columns":
        return cols
    if form == "ragged":
        out: dict[str, Any] = {}
        for k, v in cols.items():
            if isinstance(v[0], list):
                lengths = np.array([len(s) for s in v], dtype=np.int64)
                offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
                values = np.array([t for s in v for t in s], dtype=np.int64)
                out[k] = Ragged(values, offsets)
            else:
                out[k] = v
        return out

    def conv(v: Any) -> Any:
        if not isinstance(v, list):
            return v
        if form == "numpy32":
            return np.array(v, dtype=np.int32)
        if form == "numpy64":
            return np.array(v, dtype=np.int64)
        if form == "tensors":
            return torch.tensor(v, dtype=torch.int64)
        return list(v)

    return [{k: conv(cols[k][i]) for k in cols} for i in range(n)]


seq_lists = st.lists(
    st.lists(st.integers(0, 2**31 - 1), min_size=0, max_size=24), min_size=1, max_size=6
)


@settings(max_examples=150, deadline=None)
@given(
    seqs=seq_lists,
    form=st.sampled_from(FORMS),
    side=st.sampled_from(["left", "right"]),
    trunc=st.sampled_from(["left", "right"]),
    max_length=st.one_of(st.none(), st.integers(1, 30)),
    multiple=st.one_of(st.none(), st.integers(1, 8)),
    pad=st.integers(0, 5),
)
def test_padding_matches_reference(
    seqs: list[list[int]], form: str, side: str, trunc: str, max_length: int | None,
    multiple: int | None, pad: int,
) -> None:  # fmt: skip
    fn = create_collate_fn(pad, padding_side=side, max_length=max_length,  # type: ignore[arg-type]
                           pad_to_multiple_of=multiple, truncation_side=trunc)  # fmt: skip
    out = fn(make_batch(seqs, form))
    ref = ref_pad(seqs, pad=pad, side=side, trunc=trunc, max_length=max_length, multiple=multiple)
    assert set(out) == {"input_ids", "attention_mask"}
    for key in ("input_ids", "attention_mask"):
        assert out[key].dtype == torch.int64
        assert out[key].shape == (len(seqs), len(ref[key][0]))
        assert as_lists(out[key]) == ref[key], key


@settings(max_examples=120, deadline=None)
@given(
    seqs=seq_lists,
    form=st.sampled_from(FORMS),
    side=st.sampled_from(["left", "right"]),
    trunc=st.sampled_from(["left", "right"]),
    max_length=st.one_of(st.none(), st.integers(1, 30)),
    shift=st.booleans(),
    own_labels=st.booleans(),
)
def test_causal_lm_matches_reference(
    seqs: list[list[int]], form: str, side: str, trunc: str, max_length: int | None,
    shift: bool, own_labels: bool,
) -> None:  # fmt: skip
    labels = [[(t * 7 + 3) % 50 for t in s] for s in seqs] if own_labels else None
    fn = create_causal_lm_collate(1, shift_labels=shift, padding_side=side,
                                  truncation_side=trunc, max_length=max_length)  # fmt: skip
    out = fn(make_batch(seqs, form, {"labels": labels} if labels else None))
    ref = ref_pad(seqs, pad=1, side=side, trunc=trunc, max_length=max_length, labels=labels,
                  shift=shift)  # fmt: skip
    for key in ("input_ids", "attention_mask", "labels"):
        assert as_lists(out[key]) == ref[key], key


@settings(max_examples=100, deadline=None)
@given(
    seqs=seq_lists,
    labels=seq_lists,
    form=st.sampled_from(["lists", "numpy64", "tensors", "arrow", "columns", "ragged"]),
    side=st.sampled_from(["left", "right"]),
    multiple=st.one_of(st.none(), st.integers(1, 8)),
    start=st.one_of(st.none(), st.integers(0, 9)),
)
def test_seq2seq_matches_reference(
    seqs: list[list[int]], labels: list[list[int]], form: str, side: str, multiple: int | None,
    start: int | None,
) -> None:  # fmt: skip
    labels = (labels * len(seqs))[: len(seqs)]
    fn = create_seq2seq_collate(0, decoder_start_token_id=start, padding_side=side,
                                pad_to_multiple_of=multiple)  # fmt: skip
    out = fn(make_batch(seqs, form, {"labels": labels}))
    ref = ref_pad(seqs, side=side, multiple=multiple)
    assert as_lists(out["input_ids"]) == ref["input_ids"]
    assert as_lists(out["attention_mask"]) == ref["attention_mask"]
    lab_width = ref_width([len(x) for x in labels], None, multiple)
    ref_labels = [ref_row(x, lab_width, -100, side, "right") for x in labels]
    assert as_lists(out["labels"]) == ref_labels
    if start is None:
        assert "decoder_input_ids" not in out
    else:
        ref_dec = [[start, *row[:-1]] if row else [] for row in ref_labels]
        ref_dec = [[0 if t == -100 else t for t in row] for row in ref_dec]
        assert as_lists(out["decoder_input_ids"]) == ref_dec


@settings(max_examples=120, deadline=None)
@given(
    seqs=st.lists(st.lists(st.integers(0, 1000), max_size=20), min_size=1, max_size=6),
    form=st.sampled_from(FORMS),
    own_labels=st.booleans(),
    sep=st.sampled_from([-100, -1, 7]),
    start=st.integers(0, 3),
)
def test_flattening_matches_reference(
    seqs: list[list[int]], form: str, own_labels: bool, sep: int, start: int
) -> None:
    labels = [[t + 1 for t in s] for s in seqs] if own_labels else None
    fn = create_flattening_collate(return_flash_attn_kwargs=True, return_seq_idx=True,
                                   separator_id=sep, position_ids_start=start)  # fmt: skip
    out = fn(make_batch(seqs, form, {"labels": labels} if labels else None))
    ref = ref_flatten(seqs, labels, sep, start)
    for key in ("input_ids", "labels", "position_ids", "seq_idx"):
        assert as_lists(out[key]) == ref[key], key
    assert out["seq_idx"].dtype == torch.int32
    assert out["input_ids"].dtype == out["labels"].dtype == out["position_ids"].dtype == torch.int64
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert out[key].dtype == torch.int32
        assert as_lists(out[key]) == ref["cu_seq_lens_q"]
    assert out["max_length_q"] == out["max_length_k"] == ref["max_length_q"]
    assert out["cu_seq_lens_q"].data_ptr() != out["cu_seq_lens_k"].data_ptr()


def test_flattening_options_off() -> None:
    out = create_flattening_collate(return_position_ids=False)([{"input_ids": [3, 4]}])
    assert set(out) == {"input_ids", "labels"}


# ---------------------------------------------------------------------------------------------
# Fields other than ids: scalars, strings, renamed labels, extra padded fields
# ---------------------------------------------------------------------------------------------


def test_other_fields_stacked_or_passed_through() -> None:
    batch = [
        {"input_ids": [1, 2, 3], "label": 1, "score": 0.5, "src": "web", "emb": np.ones(2),
         "token_type_ids": [0, 1, 1], "special_tokens_mask": [1, 0, 1], "ragged": [1]},
        {"input_ids": [4], "label": 0, "score": 1.5, "src": "code", "emb": np.zeros(2),
         "token_type_ids": [1], "special_tokens_mask": [0], "ragged": [2, 3]},
    ]  # fmt: skip
    out = create_collate_fn(0)(batch)
    assert out["labels"].dtype == torch.int64 and as_lists(out["labels"]) == [1, 0]
    assert "label" not in out
    assert out["score"].dtype == torch.float32
    assert out["src"] == ["web", "code"]
    assert out["emb"].shape == (2, 2) and out["emb"].dtype == torch.float64
    assert as_lists(out["token_type_ids"]) == [[0, 1, 1], [1, 0, 0]]
    assert as_lists(out["special_tokens_mask"]) == [[1, 0, 1], [0, 1, 1]]
    assert out["ragged"] == [[1], [2, 3]]  # not in pad_values: passed through


def test_given_attention_mask_zeros_honoured_or_kept() -> None:
    """A given mask's zeros are kept (as 0/1); keep_attention_mask=True keeps its values."""
    batch = [{"input_ids": [1, 2, 3], "attention_mask": [2, 1, 0]},
             {"input_ids": [4], "attention_mask": [1]}]  # fmt: skip
    assert as_lists(create_collate_fn(0)(batch)["attention_mask"]) == [[1, 1, 0], [1, 0, 0]]
    kept = create_collate_fn(0, keep_attention_mask=True)(batch)["attention_mask"]
    assert as_lists(kept) == [[2, 1, 0], [1, 0, 0]]


def test_padding_max_length_mode_and_numpy_output() -> None:
    fn = create_collate_fn(9, padding="max_length", max_length=5, return_tensors="np")
    out = fn([{"input_ids": [1, 2]}, {"input_ids": [3, 4, 5, 6, 7, 8]}])
    assert isinstance(out["input_ids"], np.ndarray)
    assert out["input_ids"].tolist() == [[1, 2, 9, 9, 9], [3, 4, 5, 6, 7]]


def test_token_labels_padded_with_label_pad() -> None:
    out = create_collate_fn(0, label_pad_token_id=-1)(
        [{"input_ids": [5, 6], "labels": [1, 2]}, {"input_ids": [7], "labels": [3]}]
    )
    assert as_lists(out["labels"]) == [[1, 2], [3, -1]]


def test_large_ids_and_int32_columns() -> None:
    big = 2**40
    out = create_collate_fn(0)([{"input_ids": [big, 1]}, {"input_ids": np.array([2], np.int32)}])
    assert as_lists(out["input_ids"]) == [[big, 1], [2, 0]]
    u = create_collate_fn(0)({"input_ids": [np.array([1, 2], np.uint64), np.array([3], np.uint8)]})
    assert as_lists(u["input_ids"]) == [[1, 2], [3, 0]]


def test_pad_int32_output_rejects_values_it_cannot_hold() -> None:
    """ops.pad(dtype=int32) used to wrap wider ids, fills and labels silently (a C cast)."""
    offsets = np.array([0, 2, 3])
    ids = np.array([1, 2, 2**40], np.int64)
    with pytest.raises(ValueError, match=r"input_ids: example 1 has a value \(1099511627776\)"):
        ops.pad(ids, offsets, dtype=np.int32)
    small = np.array([1, 2, 3], np.int64)
    with pytest.raises(ValueError, match="pad_value = 2147483648 does not fit"):
        ops.pad(small, offsets, dtype=np.int32, pad_value=2**31)
    with pytest.raises(ValueError, match="label_pad_value = -2147483649 does not fit"):
        ops.pad(small, offsets, dtype=np.int32, return_labels=True, label_pad_value=-(2**31) - 1)
    labels = np.array([-100, 2**33, 5], np.int64)
    with pytest.raises(ValueError, match="labels: example 0 has a value"):
        ops.pad(small.astype(np.int32), offsets, labels=labels, label_offsets=offsets,
                dtype=np.int32)  # fmt: skip
    # int32 ids with int64 labels: the labels are not narrowed to the ids' dtype.
    got = ops.pad(small.astype(np.int32), offsets, labels=labels, label_offsets=offsets)
    assert got["labels"].tolist() == [[-100, 2**33], [5, -100]]
    # Values that fit (negative labels included) still go to int32 outputs.
    got = ops.pad(small, offsets, labels=labels[[0, 0, 2]], label_offsets=offsets, dtype=np.int32)
    assert got["input_ids"].tolist() == [[1, 2], [3, 0]]
    assert got["labels"].tolist() == [[-100, -100], [5, -100]]


MULTI_HOT = [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]]
MULTI_IDS = [[1, 2], [3], [4, 5, 6, 7], []]


@pytest.mark.parametrize(
    "form", ["lists", "numpy", "tensors", "columns", "hf-torch", "hf-numpy", "hf-arrow", "hf-rows"]
)
def test_float_label_rows_are_stacked(form: str) -> None:
    """Multi-label targets (a float row per example) used to be read as token ids: TypeError."""
    ds = datasets.Dataset.from_dict({"input_ids": MULTI_IDS, "labels": MULTI_HOT})
    batch: Any = {
        "lists": [{"input_ids": i, "labels": m} for i, m in zip(MULTI_IDS, MULTI_HOT, strict=True)],
        "numpy": [{"input_ids": np.array(i, np.int64), "labels": np.array(m, np.float32)}
                  for i, m in zip(MULTI_IDS, MULTI_HOT, strict=True)],
        "tensors": [{"input_ids": torch.tensor(i, dtype=torch.long), "labels": torch.tensor(m)}
                    for i, m in zip(MULTI_IDS, MULTI_HOT, strict=True)],
        "columns": {"input_ids": MULTI_IDS, "labels": MULTI_HOT},
        "hf-torch": ds.with_format("torch")[:],
        "hf-numpy": [ds.with_format("numpy")[i] for i in range(len(ds))],
        "hf-arrow": ds.with_format("arrow")[:],
        "hf-rows": [ds[i] for i in range(len(ds))],
    }[form]  # fmt: skip
    out = create_collate_fn(0)(batch)
    assert out["labels"].dtype.is_floating_point
    np.testing.assert_allclose(out["labels"].numpy(), MULTI_HOT)
    assert as_lists(out["input_ids"])[1] == [3, 0, 0, 0]


@pytest.mark.parametrize("key", ["label", "labels"])
def test_missing_labels(key: str) -> None:
    """A None / null label among others is an error naming the example (was passed through as a
    Python list); a split with no labels at all gives labels None, as DataCollatorForSeq2Seq."""
    fn = create_collate_fn(0)
    ids = [[1, 2], [3]]
    with pytest.raises(ValueError, match=f"{key}: example 1 has no label"):
        fn([{"input_ids": ids[0], key: 1}, {"input_ids": ids[1], key: None}])
    with pytest.raises(ValueError, match=f"{key}: example 1 has no label"):
        fn(pa.table({"input_ids": ids, key: pa.array([1, None])}))
    with pytest.raises(TypeError, match=f"{key}: example 1 has label 'b', expected a number"):
        fn([{"input_ids": ids[0], key: 1}, {"input_ids": ids[1], key: "b"}])
    with pytest.raises(ValueError, match=f"{key}: example 1 has 1 values but example 0 has 2"):
        fn([{"input_ids": ids[0], key: [0.5, 0.5]}, {"input_ids": ids[1], key: [1.0]}])
    out = fn([{"input_ids": ids[0], key: None}, {"input_ids": ids[1], key: None}])
    assert out["labels"] is None
    assert key == "labels" or key not in out
    assert as_lists(out["input_ids"]) == [[1, 2], [3, 0]]


def test_two_dimensional_columns() -> None:
    arr = np.arange(6, dtype=np.int32).reshape(2, 3)
    out = create_collate_fn(0)({"input_ids": torch.from_numpy(arr), "y": np.array([1, 2])})
    assert as_lists(out["input_ids"]) == arr.tolist()
    assert as_lists(out["y"]) == [1, 2]


# ---------------------------------------------------------------------------------------------
# Arrow: datasets' arrow format, slices, chunked gathers, list types
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenized() -> datasets.Dataset:
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 300, rng.integers(0, 30)).tolist() for _ in range(40)]
    return datasets.Dataset.from_dict({
        "input_ids": seqs,
        "attention_mask": [[1] * len(s) for s in seqs],
        "label": list(range(40)),
        "src": [f"s{i % 3}" for i in range(40)],
    })  # fmt: skip


@pytest.mark.parametrize("index", [slice(0, 8), slice(13, 29), [5, 1, 33, 2, 2], [39]])
@pytest.mark.parametrize("side", ["left", "right"])
def test_arrow_dataset_batches(tokenized: datasets.Dataset, index: Any, side: str) -> None:
    arrow = tokenized.with_format("arrow")[index]
    assert isinstance(arrow, pa.Table)
    rows = tokenized[index]
    seqs = rows["input_ids"]
    out = create_causal_lm_collate(0, padding_side=side, pad_to_multiple_of=4)(arrow)
    ref = ref_pad(seqs, side=side, multiple=4)
    for key in ("input_ids", "attention_mask", "labels"):
        assert as_lists(out[key]) == ref[key]
    assert as_lists(out["label"]) == rows["label"]
    assert out["src"] == rows["src"]
    # the same batch as a list of rows, and as a dict of columns in every datasets format
    listed = [dict(zip(rows, vals, strict=True)) for vals in zip(*rows.values(), strict=True)]
    for batch in (listed, rows, tokenized.with_format("numpy")[index],
                  tokenized.with_format("torch")[index]):  # fmt: skip
        again = create_causal_lm_collate(0, padding_side=side, pad_to_multiple_of=4)(batch)
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(again[key], out[key]), key
    flat = create_flattening_collate(return_seq_idx=True)(arrow)
    assert as_lists(flat["input_ids"]) == [[t for s in seqs for t in s]]


def test_arrow_in_a_dataloader(tokenized: datasets.Dataset) -> None:
    """The arrow format with a batch sampler: the DataLoader hands the collator one Table."""
    arrow = tokenized.with_format("arrow")
    sampler = torch.utils.data.BatchSampler(range(len(arrow)), batch_size=16, drop_last=False)
    loader = torch.utils.data.DataLoader(
        arrow, sampler=sampler, batch_size=None, collate_fn=create_causal_lm_collate(0)
    )
    batches = list(loader)
    assert [len(b["input_ids"]) for b in batches] == [16, 16, 8]
    ref = ref_pad(tokenized[32:40]["input_ids"])
    assert as_lists(batches[2]["labels"]) == ref["labels"]
    # a list of one-row tables / record batches is concatenated
    rows = [arrow[i] for i in range(32, 40)]
    assert torch.equal(create_causal_lm_collate(0)(rows)["labels"], batches[2]["labels"])
    rbs = [t.to_batches()[0] for t in rows]
    assert torch.equal(create_causal_lm_collate(0)(rbs)["labels"], batches[2]["labels"])
    with pytest.raises(TypeError, match="example 1 must be an Arrow table"):
        create_causal_lm_collate(0)([rows[0], {"input_ids": [1]}])


def test_arrow_sliced_record_batch_and_fixed_size_list() -> None:
    lists = pa.array([[9, 9], [1, 2, 3], [], [4], [8, 8, 8]], pa.list_(pa.int16()))
    rb = pa.record_batch({"input_ids": lists}).slice(1, 3)
    out = create_collate_fn(0)(rb)
    assert as_lists(out["input_ids"]) == [[1, 2, 3], [0, 0, 0], [4, 0, 0]]
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(12), pa.int64()), 3).slice(1, 2)
    out = create_collate_fn(0)(pa.table({"input_ids": fixed}))
    assert as_lists(out["input_ids"]) == [[3, 4, 5], [6, 7, 8]]
    chunked = pa.chunked_array([lists.slice(0, 2), lists.slice(3, 2)])
    out = create_collate_fn(0)(pa.table({"input_ids": chunked}))
    assert as_lists(out["input_ids"]) == [[9, 9, 0], [1, 2, 3], [4, 0, 0], [8, 8, 8]]


def test_arrow_values_are_read_in_place() -> None:
    values = pa.array(np.arange(10, dtype=np.int64))
    col = pa.ListArray.from_arrays(pa.array([0, 4, 10], pa.int32()), values)
    r = Ragged.from_arrow(col.slice(1, 1))
    assert r.values.ctypes.data == np.asarray(values).ctypes.data + 4 * 8
    assert r.offsets.tolist() == [0, 6]


# ---------------------------------------------------------------------------------------------
# Bad input: errors name the field and the example
# ---------------------------------------------------------------------------------------------

BAD_CASES: list[tuple[Any, type[Exception], str]] = [
    ([], ValueError, "empty batch"),
    ({"input_ids": []}, ValueError, "empty batch"),
    (pa.table({"input_ids": pa.array([], pa.list_(pa.int64()))}), ValueError, "empty batch"),
    ([{"input_ids": [1]}, {"ids": [2]}], ValueError, "example 1 is missing field 'input_ids'"),
    ([{"input_ids": [1]}, {"input_ids": [2], "x": 1}], ValueError, "example 1 has field 'x'"),
    ([{"x": [1]}], ValueError, "no field 'input_ids'"),
    ([{"input_ids": [1]}, [2]], TypeError, "example 1 must be a dict"),
    ({"input_ids": [[1], [2]], "y": [1]}, ValueError, "'y' has 1 examples"),
    ([{"input_ids": [1, 2]}, {"input_ids": [3, 2.5]}], TypeError,
     "input_ids: example 1 has a non-integer token id at position 1: 2.5"),
    ([{"input_ids": [1]}, {"input_ids": ["a"]}], TypeError,
     "input_ids: example 1 has a non-integer"),
    ([{"input_ids": [1]}, {"input_ids": [2**63]}], ValueError,
     "input_ids: example 1 has a token id out of the int64 range"),
    ([{"input_ids": [1]}, {"input_ids": [4, -1]}], ValueError,
     "input_ids: example 1 has a negative token id"),
    ([{"input_ids": [1]}, {"input_ids": np.array([1.0])}], TypeError,
     "input_ids: token ids must be integers, got dtype float64 (example 1)"),
    ([{"input_ids": [1]}, {"input_ids": np.array([2**63], np.uint64)}], ValueError,
     "input_ids: example 1 has a token id out of the int64 range"),
    ([{"input_ids": [1]}, {"input_ids": np.array([True])}], TypeError, "(example 1)"),
    ([{"input_ids": [1]}, {"input_ids": torch.ones(2, 2, dtype=torch.long)}], ValueError,
     "input_ids: example 1 must be 1-D"),
    ([{"input_ids": [1]}, {"input_ids": None}], ValueError, "input_ids: example 1 is None"),
    ([{"input_ids": [1]}, {"input_ids": "abc"}], TypeError,
     "input_ids: example 1 must be a sequence"),
    ([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3], "labels": [1, 2]}], ValueError,
     "labels: example 1 has 2 tokens but its input_ids has 1"),
    ({"input_ids": Ragged(np.arange(4), np.array([0, 3, 2, 4]))}, ValueError,
     "input_ids: offsets must be non-decreasing, but offsets[2] = 2 < offsets[1] = 3 (example 1)"),
    ({"input_ids": Ragged(np.arange(4), np.array([0, 3, 9]))}, ValueError, "span [0, 9)"),
    ({"input_ids": Ragged(np.arange(4.0), np.array([0, 3, 4]))}, TypeError, "got dtype float64"),
    ({"input_ids": Ragged(np.arange(4), np.array([0.0, 4.0]))}, TypeError,
     "offsets must be integers"),
    (pa.table({"input_ids": pa.array([[1], None])}), ValueError, "input_ids: example 1 is null"),
    (pa.table({"input_ids": pa.array([[1], [2, None]])}), ValueError,
     "input_ids: example 1 has a null token id"),
    (pa.table({"input_ids": pa.array([[1.0], [2.0]])}), TypeError, "input_ids: token ids must be"),
    (pa.table({"input_ids": pa.array([1, 2])}), TypeError, "input_ids: expected a list column"),
    (pa.table({"input_ids": pa.array([[1], [2**63]], pa.list_(pa.uint64()))}), ValueError,
     "input_ids: example 1 has a token id out of the int64 range"),
    ("abc", TypeError, "a batch must be"),
]  # fmt: skip


@pytest.mark.parametrize(("batch", "exc", "message"), BAD_CASES)
def test_bad_input_names_field_and_example(batch: Any, exc: type[Exception], message: str) -> None:
    with pytest.raises(exc) as info:
        create_causal_lm_collate(0)(batch)
    assert message in str(info.value)


def test_bad_input_flattening_and_seq2seq() -> None:
    with pytest.raises(ValueError, match="input_ids: example 1 has a negative token id"):
        create_flattening_collate()([{"input_ids": [1]}, {"input_ids": [-5]}])
    with pytest.raises(ValueError, match="labels: example 0 has 1 tokens but its input_ids has 2"):
        create_flattening_collate()([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(TypeError, match="labels: example 1 has a non-integer"):
        create_seq2seq_collate(0)([{"input_ids": [1], "labels": [1]},
                                   {"input_ids": [1], "labels": [None]}])  # fmt: skip
    with pytest.raises(ValueError, match="several label fields"):
        create_collate_fn(0)([{"input_ids": [1], "label": 1, "labels": 2}])


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"max_length": 0}, ValueError, "max_length must be >= 1, got 0"),
        ({"max_length": -3}, ValueError, "max_length must be >= 1"),
        ({"pad_to_multiple_of": 0}, ValueError, "pad_to_multiple_of must be >= 1"),
        (
            {"padding_side": "up"},
            ValueError,
            "padding_side must be one of ('left', 'right'), got 'up'",
        ),
        ({"truncation_side": "x"}, ValueError, "truncation_side must be"),
        ({"padding": "max_length"}, ValueError, "needs max_length"),
        ({"max_length": 2.5}, TypeError, "max_length must be an int"),
        ({"return_tensors": "tf"}, ValueError, "return_tensors must be"),
        # Values beyond int64 failed only at the first batch, with pybind11's signature dump.
        ({"label_pad_token_id": -(2**70)}, ValueError, "label_pad_token_id must fit in int64"),
        ({"max_length": 2**64}, ValueError, "max_length must fit in int64"),
    ],
)
def test_bad_options(kwargs: dict[str, Any], exc: type[Exception], message: str) -> None:
    with pytest.raises(exc, match=re.escape(message)):
        create_collate_fn(0, **kwargs)


def test_bad_pad_token() -> None:
    with pytest.raises(TypeError, match="pad_token_id must be an int"):
        create_collate_fn(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pad_token_id must fit in int64, got 1844674407"):
        create_collate_fn(2**64)
    with pytest.raises(ValueError, match="decoder_start_token_id must fit in int64"):
        create_seq2seq_collate(0, decoder_start_token_id=2**63)
    with pytest.raises(ValueError, match="separator_id must fit in int64"):
        create_flattening_collate(separator_id=-(2**63) - 1)


# ---------------------------------------------------------------------------------------------
# Output memory: no copy after the kernel, pinned buffers when possible
# ---------------------------------------------------------------------------------------------


def test_outputs_are_the_pinned_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    allocated: list[torch.Tensor] = []

    def fake_pinned(shape: tuple[int, ...], dtype: np.dtype[Any]) -> torch.Tensor:
        t = torch.from_numpy(np.full(shape, 77, dtype=dtype))
        allocated.append(t)
        return t

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(collate_output, "pinned_empty", fake_pinned)
    out = create_causal_lm_collate(0, pin_memory=True)([{"input_ids": [1, 2]}, {"input_ids": [3]}])
    block = allocated[0]  # one block per batch, one slot per output
    assert block.shape == (3, 2, 2)
    for i, key in enumerate(("input_ids", "attention_mask", "labels")):
        assert out[key].data_ptr() == block[i].data_ptr()
    assert as_lists(out["labels"]) == [[1, 2], [3, -100]]
    flat = create_flattening_collate(pin_memory=True, return_flash_attn_kwargs=True)(
        [{"input_ids": [1, 2]}]
    )
    ptrs = {t[i].data_ptr() for t in allocated for i in range(len(t))}
    assert all(flat[k].data_ptr() in ptrs for k in ("input_ids", "labels", "cu_seq_lens_q"))
    vis = VisionCollator(pin_memory=True)([{"pixel_values": np.zeros((2, 2, 3), np.uint8)}])
    assert vis["pixel_values"].data_ptr() == allocated[-1].data_ptr()


def test_pin_memory_without_cuda_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(Output, "_pin_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = create_collate_fn(0, pin_memory=True)([{"input_ids": [1, 2]}])
    assert as_lists(out["input_ids"]) == [[1, 2]]
    assert not out["input_ids"].is_pinned()
    assert any("CUDA is not available" in str(w.message) for w in caught)


@pytest.mark.cuda
def test_pin_memory_on_gpu() -> None:
    out = create_causal_lm_collate(0, pin_memory=True)([{"input_ids": [1, 2]}, {"input_ids": [3]}])
    assert all(out[k].is_pinned() for k in ("input_ids", "attention_mask", "labels"))


def test_collators_pickle() -> None:
    for fn in (create_collate_fn(0, pin_memory=True), create_seq2seq_collate(0, 0),
               create_flattening_collate(), VisionCollator("cifar10")):  # fmt: skip
        again = pickle.loads(pickle.dumps(fn))
        assert type(again) is type(fn)


# ---------------------------------------------------------------------------------------------
# Vision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["imagenet", "cifar10"])
def test_vision_rgb_hwc_uint8_and_chw_tensor(preset: str) -> None:
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (3, 5, 4, 3), dtype=np.uint8)  # B, H, W, C
    mean, std = collate.IMAGE_NORMALIZATION[preset]
    ref = (imgs.transpose(0, 3, 1, 2) / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[
        :, None, None
    ]
    out = VisionCollator(preset)([{"pixel_values": im, "label": i} for i, im in enumerate(imgs)])
    assert out["pixel_values"].dtype == torch.float32 and out["pixel_values"].shape == (3, 3, 5, 4)
    np.testing.assert_allclose(out["pixel_values"].numpy(), ref, rtol=1e-5, atol=1e-5)
    assert out["labels"].dtype == torch.int64 and as_lists(out["labels"]) == [0, 1, 2]
    chw = [{"pixel_values": torch.from_numpy(im.transpose(2, 0, 1) / 255.0).float(), "labels": 1}
           for im in imgs]  # fmt: skip
    out2 = VisionCollator(preset)(chw)
    np.testing.assert_allclose(out2["pixel_values"].numpy(), ref, rtol=1e-5, atol=1e-5)


def test_vision_grayscale_and_custom() -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = VisionCollator(((0.5,), (0.25,)))([{"pixel_values": gray}, {"pixel_values": gray}])
    assert out["pixel_values"].shape == (2, 1, 3, 4)
    np.testing.assert_allclose(out["pixel_values"][0, 0].numpy(), (gray / 255 - 0.5) / 0.25,
                               rtol=1e-5)  # fmt: skip
    mnist = VisionCollator("mnist")([{"pixel_values": gray[:, :, None]}])
    assert mnist["pixel_values"].shape == (1, 1, 3, 4)
    with pytest.raises(ValueError, match="num_channels=3"):
        VisionCollator("imagenet")([{"pixel_values": gray}])
    rgb = VisionCollator("imagenet", num_channels=3)([{"pixel_values": gray}])
    assert rgb["pixel_values"].shape == (1, 3, 3, 4)
    raw = VisionCollator(None, return_tensors=False)([{"pixel_values": gray}])
    np.testing.assert_allclose(raw["pixel_values"][0, 0], gray / 255, rtol=1e-6)


def test_vision_bad_input() -> None:
    with pytest.raises(ValueError, match="pixel_values: example 1 has shape"):
        VisionCollator()([{"pixel_values": np.zeros((4, 4, 3), np.uint8)},
                          {"pixel_values": np.zeros((5, 4, 3), np.uint8)}])  # fmt: skip
    with pytest.raises(ValueError, match="unknown normalization preset"):
        VisionCollator("coco")
    with pytest.raises(TypeError, match="one integer label per example"):
        VisionCollator()([{"pixel_values": np.zeros((4, 4, 3), np.uint8), "label": 0.5}])
    with pytest.raises(ValueError, match="example 0 must be HW, HWC or CHW"):
        VisionCollator()([{"pixel_values": np.zeros(4, np.uint8)}])


def test_vision_missing_labels() -> None:
    """A None label names its example (the error named only dtype object); all None → None."""
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="label: example 1 has no label"):
        VisionCollator()([{"pixel_values": img, "label": 3}, {"pixel_values": img, "label": None}])
    with pytest.raises(TypeError, match="label: example 0 has label 'cat', expected a number"):
        VisionCollator()([{"pixel_values": img, "label": "cat"}])
    out = VisionCollator()([{"pixel_values": img, "label": None}] * 2)
    assert out["labels"] is None and out["pixel_values"].shape == (2, 3, 4, 4)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def test_registry_builtins_and_selection() -> None:
    assert CollatorRegistry() is CollatorRegistry()
    names = [c.name for c in list_collators()]
    assert {"padding", "causal_lm", "seq2seq", "flattening", "vision"} <= set(names)
    assert isinstance(get_collator("causal_lm", pad_token_id=0), collate.CausalLMCollator)
    assert isinstance(get_collator(modality="text", pad_token_id=0), collate.PaddingCollator)
    assert isinstance(get_collator(modality="vision"), VisionCollator)
    assert [c.name for c in list_collators("vision")] == ["vision"]
    assert CollatorRegistry.default_name("text") == "padding"
    with pytest.raises(ValueError, match="no collator for modality 'audio'"):
        CollatorRegistry.default_name("audio")
    with pytest.raises(ValueError, match="no collator named 'nope'"):
        get_collator("nope")
    with pytest.raises(ValueError, match="no collator for modality 'audio'"):
        get_collator(modality="audio")
    with pytest.raises(ValueError, match="is for modality 'text'"):
        get_collator("padding", modality="vision")
    with pytest.raises(ValueError, match="needs name"):
        get_collator()


def test_registry_register_decorator() -> None:
    @CollatorRegistry.register("test_audio", modality="audio", description="demo")
    class AudioCollator:
        def __init__(self, rate: int = 16000) -> None:
            self.rate = rate

    try:
        got = CollatorRegistry.get_collator(modality="audio", rate=8000)
        assert isinstance(got, AudioCollator) and got.rate == 8000
        info = CollatorRegistry.list_collators("audio")[0]
        assert (info.name, info.description) == ("test_audio", "demo")
        with pytest.raises(ValueError, match="already registered"):
            CollatorRegistry.register("test_audio")(AudioCollator)
    finally:
        CollatorRegistry.unregister("test_audio")
    assert not CollatorRegistry.list_collators("audio")


# ---------------------------------------------------------------------------------------------
# One rule for the fields a collator does not own, in every collator
# ---------------------------------------------------------------------------------------------


def _rule_batch() -> list[dict[str, Any]]:
    return [
        {"input_ids": [5, 6, 7], "token_type_ids": [0, 1, 1], "special_tokens_mask": [1, 0, 0],
         "tag": [3, 4, 5], "weight": [0.5, 1.0, 2.0], "score": 0.25, "text": "a",
         "choices": [1, 2, 3, 4]},
        {"input_ids": [8, 9], "token_type_ids": [1, 1], "special_tokens_mask": [0, 1],
         "tag": [6, 7], "weight": [3.0, 4.0], "score": 1.5, "text": "b", "choices": [5]},
    ]  # fmt: skip


@pytest.mark.parametrize("form", ["dicts", "arrow", "columns"])
def test_extra_fields_follow_one_rule_in_every_collator(form: str) -> None:
    import pyarrow as pa
    import torch

    import mixtape

    rows = _rule_batch()
    batch: Any = rows
    if form == "arrow":  # an HF Dataset stores the floats as float64
        batch = pa.Table.from_pylist(rows)
        assert batch.schema.field("weight").type == pa.list_(pa.float64())
    elif form == "columns":
        batch = {k: [r[k] for r in rows] for k in rows[0]}
        batch["weight"] = [np.asarray(w, dtype=np.float64) for w in batch["weight"]]
    padded = {
        "padding": mixtape.create_collate_fn(0, pad_values={"token_type_ids": 0,
                                                            "special_tokens_mask": 1, "tag": 9}),
        "causal_lm": mixtape.create_causal_lm_collate(0, pad_values={"tag": 9,
                                                                     "special_tokens_mask": 1}),
        "seq2seq": mixtape.create_seq2seq_collate(0, pad_values={"tag": 9,
                                                                 "special_tokens_mask": 1}),
        "packed": mixtape.create_packed_collate(attention="none", pad_values={
            "tag": 9, "special_tokens_mask": 1}),
    }  # fmt: skip
    for name, collator in padded.items():
        out = collator(batch)
        assert out["token_type_ids"].tolist() == [[0, 1, 1], [1, 1, 0]], name
        assert out["special_tokens_mask"].tolist() == [[1, 0, 0], [0, 1, 1]], name
        assert out["tag"].dtype == torch.int64 and out["tag"].tolist() == [[3, 4, 5], [6, 7, 9]]
        assert out["weight"].dtype == torch.float32, name
        assert out["weight"].tolist() == [[0.5, 1.0, 2.0], [3.0, 4.0, 0.0]], name
        assert out["score"].dtype == torch.float32 and out["score"].tolist() == [0.25, 1.5]
        assert out["text"] == ["a", "b"], name
        assert [list(c) for c in out["choices"]] == [[1, 2, 3, 4], [5]], name  # passed through
    flat = mixtape.create_flattening_collate()(batch)
    assert flat["tag"].tolist() == [[3, 4, 5, 6, 7]] and flat["tag"].dtype == torch.int64
    assert flat["weight"].dtype == torch.float32
    assert flat["weight"].tolist() == [[0.5, 1.0, 2.0, 3.0, 4.0]]
    assert flat["score"].tolist() == [0.25, 1.5] and flat["text"] == ["a", "b"]
    # Left padding and truncation move the float fields exactly as the ids.
    left = mixtape.create_collate_fn(0, padding_side="left", max_length=2,
                                     truncation_side="left")(batch)  # fmt: skip
    assert left["input_ids"].tolist() == [[6, 7], [8, 9]]
    assert left["weight"].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    # A field named in pad_values must be per-token: wrong lengths are an error, not a pass-through.
    bad = [dict(rows[0], token_type_ids=[0, 1]), rows[1]]
    with pytest.raises(ValueError, match="token_type_ids: example 0 has 2 tokens but its "
                                         "input_ids has 3"):  # fmt: skip
        mixtape.create_collate_fn(0)(bad)
