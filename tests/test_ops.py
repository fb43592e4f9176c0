"""The pad kernel (``mixtape.ops.pad``) against a plain numpy reference, torch parity, bad input."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from conftest import DEVICES
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtape import ops

SIDES = ["left", "right"]
DTYPES = [np.int32, np.int64]


# --- reference ---------------------------------------------------------------------------------


def ragged(seqs: Sequence[Sequence[int]], dtype: Any = np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Values and offsets of a list of sequences."""
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])
    values = np.array([t for s in seqs for t in s], dtype=dtype)
    return values, offsets


def reference_length(
    seqs: Sequence[Sequence[int]], max_length: int | None, multiple: int | None
) -> int:
    """Row length the way transformers computes it: longest, capped, rounded up to a multiple."""
    length = max((len(s) for s in seqs), default=0)
    if max_length is not None:
        length = min(length, max_length)
    if multiple:
        length = (length + multiple - 1) // multiple * multiple
    return length


def reference_pad(
    seqs: Sequence[Sequence[int]],
    length: int,
    *,
    labels: Sequence[Sequence[int]] | None = None,
    padding_side: str = "right",
    truncation_side: str = "right",
    pad_value: int = 0,
    label_pad_value: int = -100,
    shift_labels: bool = False,
    max_length: int | None = None,
) -> dict[str, np.ndarray]:
    """Obvious per-row Python: truncate to max_length (and the row), shift labels within the kept
    tokens, place, pad."""
    keep = length if max_length is None else min(length, max_length)
    n = len(seqs)
    ids = np.full((n, length), pad_value, dtype=np.int64)
    mask = np.zeros((n, length), dtype=np.int64)
    lab = np.full((n, length), label_pad_value, dtype=np.int64)
    for i, seq in enumerate(seqs):
        s = list(seq)
        lb = list(labels[i]) if labels is not None else list(s)
        if len(s) > keep:
            start = len(s) - keep if truncation_side == "left" else 0
            s, lb = s[start : start + keep], lb[start : start + keep]
        if shift_labels:
            lb = [*lb[1:], label_pad_value][: len(s)]
        begin = length - len(s) if padding_side == "left" else 0
        ids[i, begin : begin + len(s)] = s
        mask[i, begin : begin + len(s)] = 1
        lab[i, begin : begin + len(s)] = lb
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def to_device(x: np.ndarray, device: str) -> Any:
    """numpy on the CPU; a torch tensor on CUDA."""
    return x if device == "cpu" else torch.from_numpy(x).to(device)


def to_numpy(x: Any) -> np.ndarray:
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def random_seqs(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[list[int]]:
    return [rng.integers(0, 1000, int(k)).tolist() for k in rng.integers(lo, hi + 1, n)]


def check(
    got: dict[str, Any], want: dict[str, np.ndarray], keys: Sequence[str], dtype: Any
) -> None:
    assert set(got) == set(keys)
    for key in keys:
        arr = to_numpy(got[key])
        assert arr.dtype == np.dtype(dtype), key
        np.testing.assert_array_equal(arr, want[key].astype(dtype), err_msg=key)


# --- correctness -------------------------------------------------------------------------------

SEQS = [[5, 6, 7], [], [8], [1, 2, 3, 4, 9, 9], [0, 0]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("elementwise", [False, True])
@pytest.mark.parametrize("padding_side", SIDES)
@pytest.mark.parametrize("truncation_side", SIDES)
@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("shift_labels", [False, True])
@pytest.mark.parametrize(("max_length", "multiple"), [(None, None), (4, None), (None, 4), (1, 3)])
def test_pad_matches_reference(
    device: str,
    elementwise: bool,
    padding_side: str,
    truncation_side: str,
    in_dtype: Any,
    out_dtype: Any,
    shift_labels: bool,
    max_length: int | None,
    multiple: int | None,
) -> None:
    if device != "cpu" and elementwise:
        pytest.skip("the elementwise path is the CPU rehearsal of the CUDA kernel")
    values, offsets = ragged(SEQS, in_dtype)
    got = ops.pad(
        to_device(values, device), to_device(offsets, device), max_length=max_length,
        pad_to_multiple_of=multiple, padding_side=padding_side,  # type: ignore[arg-type]
        truncation_side=truncation_side,  # type: ignore[arg-type]
        pad_value=3, return_labels=True, shift_labels=shift_labels, dtype=out_dtype,
        _elementwise=elementwise,
    )  # fmt: skip
    length = reference_length(SEQS, max_length, multiple)
    want = reference_pad(
        SEQS, length, padding_side=padding_side, truncation_side=truncation_side, pad_value=3,
        shift_labels=shift_labels, max_length=max_length,
    )  # fmt: skip
    check(got, want, ["input_ids", "attention_mask", "labels"], out_dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("elementwise", [False, True])
@pytest.mark.parametrize("shift_labels", [False, True])
@pytest.mark.parametrize("padding_side", SIDES)
def test_separate_labels(
    device: str, elementwise: bool, shift_labels: bool, padding_side: str
) -> None:
    if device != "cpu" and elementwise:
        pytest.skip("the elementwise path is the CPU rehearsal of the CUDA kernel")
    labels = [[-100, 60, 70], [], [80], [10, 20, -100, 40, 90, 91], [1, 2]]
    values, offsets = ragged(SEQS)
    lab_values, lab_offsets = ragged(labels)
    got = ops.pad(
        to_device(values, device), offsets, labels=to_device(lab_values, device),
        label_offsets=lab_offsets, max_length=5, truncation_side="left",
        padding_side=padding_side,  # type: ignore[arg-type]
        shift_labels=shift_labels, return_attention_mask=False, _elementwise=elementwise,
    )  # fmt: skip
    want = reference_pad(
        SEQS, 5, labels=labels, truncation_side="left", padding_side=padding_side,
        shift_labels=shift_labels,
    )  # fmt: skip
    check(got, want, ["input_ids", "labels"], np.int64)


@settings(max_examples=150, deadline=None)
@given(
    seqs=st.lists(st.lists(st.integers(0, 2**31 - 1), max_size=12), max_size=9),
    padding_side=st.sampled_from(SIDES),
    truncation_side=st.sampled_from(SIDES),
    max_length=st.none() | st.integers(1, 14),
    multiple=st.none() | st.integers(1, 5),
    in_dtype=st.sampled_from(DTYPES),
    out_dtype=st.sampled_from(DTYPES),
    shift_labels=st.booleans(),
    separate_labels=st.booleans(),
    pad_value=st.integers(0, 7),
    elementwise=st.booleans(),
)
def test_pad_hypothesis(
    seqs: list[list[int]],
    padding_side: str,
    truncation_side: str,
    max_length: int | None,
    multiple: int | None,
    in_dtype: Any,
    out_dtype: Any,
    shift_labels: bool,
    separate_labels: bool,
    pad_value: int,
    elementwise: bool,
) -> None:
    values, offsets = ragged(seqs, in_dtype)
    labels = [[(t * 7 + 1) % 1000 - 100 for t in s] for s in seqs] if separate_labels else None
    kwargs: dict[str, Any] = {}
    if labels is not None:
        kwargs["labels"], kwargs["label_offsets"] = ragged(labels, in_dtype)
    got = ops.pad(
        values, offsets, max_length=max_length, pad_to_multiple_of=multiple,
        padding_side=padding_side, truncation_side=truncation_side,  # type: ignore[arg-type]
        pad_value=pad_value, return_labels=True, shift_labels=shift_labels, dtype=out_dtype,
        _elementwise=elementwise, **kwargs,
    )  # fmt: skip
    length = reference_length(seqs, max_length, multiple)
    want = reference_pad(
        seqs, length, labels=labels, padding_side=padding_side, truncation_side=truncation_side,
        pad_value=pad_value, shift_labels=shift_labels, max_length=max_length,
    )  # fmt: skip
    # int32 outputs hold ids that fit; wider ids wrap exactly as a C cast does.
    for key in want:
        want[key] = want[key].astype(out_dtype)
    check(got, want, ["input_ids", "attention_mask", "labels"], out_dtype)


@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("padding_side", SIDES)
@pytest.mark.parametrize("misaligned", [False, True])
def test_large_batch_streaming_path(
    in_dtype: Any, out_dtype: Any, padding_side: str, misaligned: bool
) -> None:
    """Batches past the cache take the streaming-store path; outputs may start off 16 bytes."""
    rng = np.random.default_rng(1)
    seqs = random_seqs(rng, 420, 0, 2048)
    values, offsets = ragged(seqs, in_dtype)
    length = reference_length(seqs, None, None)
    size = len(seqs) * length
    out = {}
    for key in ("input_ids", "attention_mask", "labels"):
        flat = np.full(size + 1, 12345, dtype=out_dtype)
        out[key] = (flat[1:] if misaligned else flat[:-1]).reshape(len(seqs), length)
    got = ops.pad(
        values, offsets, padding_side=padding_side,  # type: ignore[arg-type]
        return_labels=True, shift_labels=True, dtype=out_dtype, out=out,
    )  # fmt: skip
    assert all(got[k] is out[k] for k in out)
    want = reference_pad(seqs, length, padding_side=padding_side, shift_labels=True)
    check(got, want, list(out), out_dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_out_buffers_reused(device: str) -> None:
    """Buffers given in ``out`` are filled completely: nothing of an earlier batch survives."""
    rng = np.random.default_rng(2)
    n, length = 6, 16
    out = {
        k: to_device(np.full((n, length), 777, dtype=np.int64), device)
        for k in ("input_ids", "attention_mask", "labels")
    }
    for step in range(3):
        seqs = random_seqs(rng, n, 0, 20)
        values, offsets = ragged(seqs)
        got = ops.pad(
            to_device(values, device), offsets, length=length, padding_side="left",
            return_labels=True, out=out,
        )  # fmt: skip
        assert all(got[k] is out[k] for k in out), step
        check(got, reference_pad(seqs, length, padding_side="left"), list(out), np.int64)


def test_out_accepts_cpu_tensors() -> None:
    seqs = [[1, 2], [3]]
    values, offsets = ragged(seqs)
    out = {"input_ids": torch.full((2, 4), -1), "attention_mask": torch.full((2, 4), -1)}
    got = ops.pad(torch.from_numpy(values), torch.from_numpy(offsets), length=4, out=out)
    assert got["input_ids"] is out["input_ids"]
    check(got, reference_pad(seqs, 4), ["input_ids", "attention_mask"], np.int64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("elementwise", [False, True])
def test_pad_equal_to_eos_is_not_masked(device: str, elementwise: bool) -> None:
    """The mask comes from lengths: a real EOS equal to the pad id stays attended and labelled."""
    if device != "cpu" and elementwise:
        pytest.skip("the elementwise path is the CPU rehearsal of the CUDA kernel")
    eos = 2
    seqs = [[7, 8, eos], [9, eos]]
    values, offsets = ragged(seqs)
    got = ops.pad(
        to_device(values, device), offsets, pad_value=eos, return_labels=True,
        _elementwise=elementwise,
    )  # fmt: skip
    np.testing.assert_array_equal(to_numpy(got["attention_mask"]), [[1, 1, 1], [1, 1, 0]])
    np.testing.assert_array_equal(to_numpy(got["labels"]), [[7, 8, eos], [9, eos, -100]])
    np.testing.assert_array_equal(to_numpy(got["input_ids"]), [[7, 8, eos], [9, eos, eos]])


def test_empty_batch_and_empty_values() -> None:
    got = ops.pad(np.zeros(0, np.int64), np.zeros(1, np.int64))
    assert got["input_ids"].shape == (0, 0)
    got = ops.pad(np.zeros(0, np.int64), np.zeros(3, np.int64), pad_to_multiple_of=8)
    assert got["input_ids"].shape == (2, 0)
    got = ops.pad([], np.zeros(3, np.int64), length=2, pad_value=5)
    np.testing.assert_array_equal(got["input_ids"], [[5, 5], [5, 5]])
    np.testing.assert_array_equal(got["attention_mask"], [[0, 0], [0, 0]])


def test_offsets_rebased_like_an_arrow_slice() -> None:
    values = np.array([100, 1, 2, 3, 4], dtype=np.int64)
    got = ops.pad(values[1:], np.array([7, 9, 11]), length=2)  # rebased to [0, 2, 4]
    np.testing.assert_array_equal(got["input_ids"], [[1, 2], [3, 4]])


# --- parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", SIDES)
@pytest.mark.parametrize("padding_value", [0, 5])
def test_parity_with_torch_pad_sequence(padding_side: str, padding_value: int) -> None:
    rng = np.random.default_rng(3)
    seqs = random_seqs(rng, 33, 0, 50)
    values, offsets = ragged(seqs)
    theirs = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(s, dtype=torch.int64) for s in seqs], batch_first=True,
        padding_value=padding_value, padding_side=padding_side,
    )  # fmt: skip
    ours = ops.pad(
        torch.from_numpy(values), torch.from_numpy(offsets), pad_value=padding_value,
        padding_side=padding_side,  # type: ignore[arg-type]
        return_attention_mask=False,
    )  # fmt: skip
    assert torch.equal(torch.from_numpy(ours["input_ids"]), theirs)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("elementwise", [False, True])
def test_non_monotonic_offsets(elementwise: bool) -> None:
    with pytest.raises(ValueError, match=r"non-decreasing.*example 1"):
        ops.pad(np.arange(4), np.array([0, 3, 1, 4]), _elementwise=elementwise)


def test_offsets_not_ending_at_values() -> None:
    with pytest.raises(ValueError, match=r"offsets\[-1\] = 5 but there are 4 values"):
        ops.pad(np.arange(4), np.array([0, 2, 5]))
    with pytest.raises(ValueError, match=r"offsets\[-1\] = 3 but there are 4 values"):
        ops.pad(np.arange(4), np.array([0, 2, 3]))


@pytest.mark.parametrize("bad", [np.float32, np.float64, np.uint8, np.int16, np.bool_])
def test_wrong_id_dtypes(bad: Any) -> None:
    with pytest.raises(TypeError, match="input_ids: token ids must be int32 or int64"):
        ops.pad(np.array([1, 2, 3], dtype=bad), np.array([0, 1, 3]))


def test_wrong_offset_and_output_dtypes() -> None:
    with pytest.raises(TypeError, match="offsets must be an integer array"):
        ops.pad(np.array([1, 2, 3]), np.array([0.0, 1.0, 3.0]))
    with pytest.raises(TypeError, match="dtype must be int32 or int64"):
        ops.pad(np.array([1, 2, 3]), np.array([0, 1, 3]), dtype=np.float32)
    with pytest.raises(TypeError, match="labels: token ids must be int32 or int64"):
        ops.pad(
            np.array([1, 2, 3]), np.array([0, 1, 3]), labels=np.array([1.0, 2.0, 3.0]),
            label_offsets=np.array([0, 1, 3]),
        )  # fmt: skip
    with pytest.raises(TypeError, match=r"out\['input_ids'\] must be a int64 array"):
        ops.pad(
            np.array([1, 2, 3]), np.array([0, 1, 3]), out={"input_ids": np.zeros((2, 2), np.int32)}
        )
    with pytest.raises(ValueError, match=r"out\['attention_mask'\] must be a contiguous array"):
        ops.pad(
            np.array([1, 2, 3]), np.array([0, 1, 3]),
            out={"attention_mask": np.zeros((2, 3), np.int64)},
        )  # fmt: skip


@pytest.mark.parametrize("elementwise", [False, True])
@pytest.mark.parametrize("in_dtype", DTYPES)
def test_negative_ids_name_the_example(elementwise: bool, in_dtype: Any) -> None:
    seqs = [[1, 2], [3], [4, -7, 5], [-1]]
    values, offsets = ragged(seqs, in_dtype)
    with pytest.raises(ValueError, match=r"input_ids: example 2 has a negative token id \(-7\)"):
        ops.pad(values, offsets, _elementwise=elementwise)
    with pytest.raises(ValueError, match="my_ids: example 2"):
        ops.pad(values, offsets, name="my_ids", _elementwise=elementwise)
    with pytest.raises(ValueError, match="example 3"):
        ops.pad(values, offsets, truncation_side="left", max_length=1, _elementwise=elementwise)
    # Only kept ids are checked: truncated away, the bad id is never read.
    got = ops.pad(values[:6], offsets[:4], max_length=1, _elementwise=elementwise)
    np.testing.assert_array_equal(got["input_ids"], [[1], [3], [4]])
    # check_ids=False is the caller's promise; the kernel then copies what it is given.
    got = ops.pad(values, offsets, check_ids=False, _elementwise=elementwise)
    assert int(got["input_ids"][2, 1]) == -7


@pytest.mark.parametrize("device", DEVICES)
def test_negative_ids_on_device(device: str) -> None:
    values, offsets = ragged([[1, 2], [3], [4, -7, 5], [-1]])
    with pytest.raises(ValueError, match="input_ids: example 2 has a negative token id"):
        ops.pad(to_device(values, device), offsets)
        ops.check_cuda_errors()  # CUDA: the kernel's verdict, read without a sync at the call
    got = ops.pad(to_device(values[:6], device), offsets[:4], max_length=1)
    np.testing.assert_array_equal(to_numpy(got["input_ids"]), [[1], [3], [4]])


def device_flags(
    seqs: list[list[int]], length: int, truncate_left: bool, labels: list[list[int]] | None,
    narrow: bool,
) -> np.ndarray:
    """The flags the CUDA pad kernel records (csrc/pad/pad.h PadErrorSlot), computed in Python:
    the smallest index of a kept negative id, of an id and of a label that int32 cannot hold, then
    the values there (-1 / 0 where none)."""
    values, offsets = ragged(seqs)
    kept = np.zeros(values.size, bool)
    for i in range(len(seqs)):
        b, e = offsets[i], offsets[i + 1]
        keep = min(e - b, length)
        kept[(e - keep if truncate_left else b) : (e - keep if truncate_left else b) + keep] = True
    lab = ragged(labels)[0] if labels is not None else np.zeros(0, np.int64)
    hits = [np.flatnonzero(kept & (values < 0)),
            np.flatnonzero(np.abs(values) > 2**31 - 1) if narrow else [],
            np.flatnonzero(np.abs(lab) > 2**31 - 1) if narrow else []]  # fmt: skip
    pos = [int(h[0]) if len(h) else -1 for h in hits]
    src = [values, values, lab]
    return np.array(pos + [int(src[k][p]) if p >= 0 else 0 for k, p in enumerate(pos)], np.int64)


@settings(max_examples=150, deadline=None)
@given(
    seqs=st.lists(st.lists(st.sampled_from([-3, -1, 0, 2, 2**31, -(2**31) - 1]), max_size=6),
                  max_size=6),
    length=st.integers(0, 7),
    truncate_left=st.booleans(),
    narrow=st.booleans(),
    with_labels=st.booleans(),
)  # fmt: skip
def test_cuda_error_report_agrees_with_cpu_kernel(
    seqs: list[list[int]], length: int, truncate_left: bool, narrow: bool, with_labels: bool
) -> None:
    """The CUDA path raises from the flags its kernel recorded the error the CPU path raises at
    once: same example, same value, same precedence (the report is device-independent)."""
    values, offsets = ragged(seqs)
    labels = [[-t for t in s] for s in seqs] if with_labels else None
    kw: dict[str, Any] = {"length": length, "truncation_side": "left" if truncate_left else "right",
                          "dtype": np.int32 if narrow else np.int64}  # fmt: skip
    if labels is not None:
        kw.update(labels=ragged(labels)[0], label_offsets=offsets)
    try:
        ops.pad(values, offsets, **kw)
        cpu_error = None
    except ValueError as e:
        cpu_error = str(e)
    flags = device_flags(seqs, length, truncate_left, labels, narrow)
    report = ops._pad_device_report(flags, offsets, offsets if labels else None, "input_ids")
    assert report == cpu_error


@pytest.mark.parametrize("device", DEVICES)
def test_inputs_the_kernel_trusts_are_checked_on_every_device(device: str) -> None:
    """Label values fewer than their offsets say, or an output of the wrong shape, are errors
    on CUDA as on the CPU (the CUDA path passed them on: out-of-bounds device reads/writes)."""
    values, offsets = ragged([[1, 2], [3], [4, 5]])
    with pytest.raises(ValueError, match="labels: offsets"):
        ops.pad(to_device(values, device), offsets, labels=to_device(values[:4], device),
                label_offsets=offsets)  # fmt: skip
    small = {"input_ids": to_device(np.zeros((3, 1), np.int64), device)}
    with pytest.raises(ValueError, match=r"out\['input_ids'\] must be a contiguous"):
        ops.pad(to_device(values, device), offsets, out=small)


def test_cuda_path_host_checks_on_meta_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path's checks before its launch, run without a GPU on meta tensors (their logic
    is device-independent): each bad input is a ValueError, never a launch."""
    monkeypatch.setattr(ops, "_require_cuda", lambda op, device: None)
    values, offsets = torch.tensor([1, 2, 3, 4, 5], device="meta"), np.array([0, 2, 3, 5])

    def pad_cuda(**kw: Any) -> None:
        ops._pad_cuda(
            values, offsets, kw.pop("labels", None), kw.pop("label_offsets", None),
            kw.pop("length", None), None,
            None, False, False, 0, -100, True, "labels" in kw or kw.pop("return_labels", False),
            False, np.int64, kw.pop("out", None), "input_ids", check_ids=False,
        )  # fmt: skip

    with pytest.raises(ValueError, match="length must be >= 0, got -2"):
        pad_cuda(length=-2)
    with pytest.raises(ValueError, match="labels: offsets have 4 entries ending at 5 for 4"):
        pad_cuda(labels=values[:4], label_offsets=offsets)
    with pytest.raises(ValueError, match="labels: offsets have 3 entries"):
        pad_cuda(labels=values[:3], label_offsets=offsets[:3])
    for bad in (torch.zeros(3, 1, dtype=torch.int64, device="meta"),  # shape
                torch.zeros(3, 2, dtype=torch.int32, device="meta"),  # dtype
                torch.zeros(2, 3, dtype=torch.int64, device="meta").t(),  # not contiguous
                torch.zeros(3, 2, dtype=torch.int64)):  # host memory, not the values' device
        with pytest.raises(ValueError, match=r"out\['input_ids'\] must be a contiguous"):
            pad_cuda(out={"input_ids": bad})


@pytest.mark.parametrize("elementwise", [False, True])
def test_label_length_mismatch_names_the_example(elementwise: bool) -> None:
    values, offsets = ragged([[1, 2], [3], [4, 5]])
    lab_values, lab_offsets = ragged([[1, 2], [3], [4]])
    with pytest.raises(ValueError, match="labels of example 2 have length 1 but its input_ids"):
        ops.pad(
            values, offsets, labels=lab_values, label_offsets=lab_offsets,
            _elementwise=elementwise,
        )  # fmt: skip
    with pytest.raises(ValueError, match="label rows"):
        ops.pad(values, offsets, labels=lab_values[:3], label_offsets=np.array([0, 2, 3]))
    with pytest.raises(ValueError, match="labels given without label_offsets"):
        ops.pad(values, offsets, labels=lab_values)


@pytest.mark.parametrize("max_length", [0, -1])
def test_max_length_below_one(max_length: int) -> None:
    with pytest.raises(ValueError, match=f"max_length must be >= 1, got {max_length}"):
        ops.pad(np.array([1, 2, 3]), np.array([0, 1, 3]), max_length=max_length)


def test_bad_options() -> None:
    values, offsets = np.array([1, 2, 3]), np.array([0, 1, 3])
    sides = r"one of \('left', 'right'\)"
    with pytest.raises(ValueError, match=f"padding_side must be {sides}, got 'top'"):
        ops.pad(values, offsets, padding_side="top")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"truncation_side must be one of \('left', 'right'\)"):
        ops.pad(values, offsets, truncation_side="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pad_to_multiple_of must be >= 1, got 0"):
        ops.pad(values, offsets, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="length must be >= 0, got -2"):
        ops.pad(values, offsets, length=-2)
    with pytest.raises(ValueError, match=r"values must be 1-D, got shape \(1, 3\)"):
        ops.pad(values[None], offsets)


_REFCOUNT_SCRIPT = """
import sys, threading, time
import numpy as np
from mixtape import ops
sys.setswitchinterval(1e-6)
values, offsets = np.arange(4, dtype=np.int64), np.array([0, 4], dtype=np.int64)
arr = np.empty((1, 4096), np.int64)  # long enough a call that the other thread runs meanwhile
base = sys.getrefcount(arr)
stop = False
def churn():  # refcount traffic on the output array, under the GIL
    refs = [None] * 64
    while not stop:
        for i in range(64):
            refs[i] = arr
        for i in range(64):
            refs[i] = None
thread = threading.Thread(target=churn)
thread.start()
t0 = time.perf_counter()
while time.perf_counter() - t0 < 1.0:
    for _ in range(100):
        ops._C.pad(values, offsets, length=4096, out_ids=arr, out_mask=arr, out_labels=arr)
stop = True
thread.join()
print(sys.getrefcount(arr) - base)
"""


def test_pad_outputs_refcounted_under_the_gil() -> None:
    """The pad binding runs with the GIL released; its output arrays used to be by-value
    parameters, Py_DECREF'd at return without the GIL: racing another thread, the refcount
    drifted (and the array could be freed while in use). A debug build aborts on it."""
    proc = subprocess.run([sys.executable, "-c", _REFCOUNT_SCRIPT], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "0", f"refcount drift {proc.stdout.strip()}"


_NO_THREADS_SCRIPT = """
import resource
import numpy as np
from mixtape import ops

def vm_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))

n, L = 64, 16384  # 8 MiB per output: the pad kernel wants several threads
values = np.arange(n * 1000, dtype=np.int64)
offsets = np.arange(0, n * 1000 + 1, 1000, dtype=np.int64)
out = {"input_ids": np.empty((n, L), np.int64), "attention_mask": np.empty((n, L), np.int64)}
lengths = np.full(1024, 200)
plan = ops.pack_plan(lengths, 256)
docs = np.arange(lengths.sum(), dtype=np.int64)
doc_offsets = np.concatenate([[0], np.cumsum(lengths)])
fill_out = {"input_ids": np.empty((plan.num_rows, 256), np.int64)}
fills = []
unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
for margin_mb in (1, 3, 9, 17, 40):  # room for no, one or a few thread stacks
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + (margin_mb << 20), resource.RLIM_INFINITY))
    try:
        ops.pad(values, offsets, length=L, out=out)
        ops.pack_fill(plan, docs, doc_offsets, fields=["input_ids"], out=fill_out)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, unlimited)
    assert (out["input_ids"][:, :1000] == values.reshape(n, 1000)).all()
    assert (out["input_ids"][:, 1000:] == 0).all() and out["attention_mask"].sum() == n * 1000
    fills.append(fill_out["input_ids"].copy())
# Only now a kernel with its threads (glibc caches the stacks of finished threads).
want = ops.pack_fill(plan, docs, doc_offsets, fields=["input_ids"])["input_ids"]
assert all((got == want).all() for got in fills)
print("ok")
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_kernels_run_when_threads_cannot_start() -> None:
    """With no room for a thread's stack (as under ulimit -u or a container's pids limit) the
    kernels used to fail with 'Resource temporarily unavailable', or std::terminate when the
    second thread failed after the first had started; they now run the work on the caller."""
    env = {**os.environ, "MIXTAPE_NUM_THREADS": "4"}
    proc = subprocess.run([sys.executable, "-c", _NO_THREADS_SCRIPT], capture_output=True,
                          text=True, timeout=120, env=env)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("elementwise", [False, True])
def test_row_count_times_length_overflow_is_rejected(elementwise: bool) -> None:
    """4 rows of 2^62 + 1 columns wrap to 4 elements in int64: the binding must not accept a
    4-element output for them (it wrote rows 2^62 elements apart)."""
    values, offsets = np.arange(8, dtype=np.int64), np.array([0, 2, 4, 6, 8])
    with pytest.raises(ValueError, match="4 rows of length 4611686018427387905 do not fit"):
        ops._C.pad(values, offsets, length=2**62 + 1, out_ids=np.empty(4, np.int64),
                   elementwise=elementwise)  # fmt: skip


# --- build -------------------------------------------------------------------------------------


def test_build_info_reports_cuda_compiled_where_nvcc_exists() -> None:
    info = ops.build_info()
    assert {"compiler", "cxx_flags", "cuda_compiled", "cuda_usable"} <= set(info)
    nvcc = shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
    if nvcc and os.environ.get("MIXTAPE_CUDA", "AUTO").upper() != "OFF":  # OFF: built without
        assert info["cuda_compiled"] is True
    assert info["cuda_usable"] == (info["cuda_compiled"] and info["cuda_device_count"] > 0)


# --- ints_from_lists: Python lists -> ragged int64 -------------------------------------------


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=20), max_size=12))
def test_ints_from_lists_matches_reference(rows: list[list[int]]) -> None:
    values, offsets = ops.ints_from_lists(rows)
    assert values.dtype == np.int64 and offsets.dtype == np.int64
    np.testing.assert_array_equal(offsets, np.cumsum([0] + [len(r) for r in rows]))
    np.testing.assert_array_equal(values, np.array([t for r in rows for t in r], dtype=np.int64))


def test_ints_from_lists_reads_integer_likes() -> None:
    values, _ = ops.ints_from_lists([[np.int64(3), np.uint8(4), True]])
    assert values.tolist() == [3, 4, 1]


@pytest.mark.parametrize(
    ("rows", "exc", "message"),
    [
        ([[1], [2, 2.5]], TypeError, "ids: example 1 has a non-integer token id at position 1: "
                                     "2.5 (float)"),
        ([[1, "7"]], TypeError, "ids: example 0 has a non-integer token id at position 1: '7'"),
        ([[], [2**63]], ValueError, "ids: example 1 has a token id out of the int64 range at "
                                    "position 0: 9223372036854775808"),
        ([[1], (2, 3)], TypeError, "ids: example 1 must be a list, got tuple"),
        ((1, 2), TypeError, "ids: expected a list of lists, got tuple"),
    ],
)  # fmt: skip
def test_ints_from_lists_errors_name_example_and_position(
    rows: Any, exc: type[Exception], message: str
) -> None:
    with pytest.raises(exc, match=re.escape(message)):
        ops.ints_from_lists(rows, "ids")


def test_ints_from_lists_first_offsets_the_example_index() -> None:
    with pytest.raises(TypeError, match="labels: example 7 has a non-integer"):
        ops.ints_from_lists([[None]], "labels", first=7)


def test_ints_from_lists_list_resized_while_read() -> None:
    row: list[Any] = [1, 2, 3]

    class Shrinks:
        def __index__(self) -> int:
            row.clear()
            return 5

    row[0] = Shrinks()
    with pytest.raises(ValueError, match="example 0 changed size while it was read"):
        ops.ints_from_lists([row])


_LIST_MUTATION_SCRIPT = """
import gc
from mixtape import ops

class ClearsOuter:  # frees the row being read (the outer list held its only reference)
    def __index__(self):
        rows.clear()
        gc.collect()
        [[0] * 8 for _ in range(1000)]  # reuse the freed memory
        return 1

class ReplacesRow:
    def __index__(self):
        rows[0] = [7, 7, 7]
        [[0] * 8 for _ in range(1000)]
        return 1

class ClearsRow:
    def __index__(self):
        rows[0].clear()
        return 1

for cls, message in [(ClearsOuter, "the list of examples changed while it was read"),
                     (ReplacesRow, "the list of examples changed while it was read"),
                     (ClearsRow, "example 0 changed size while it was read")]:
    rows = [[cls(), 2, 3], [4, 5]]
    try:
        ops.ints_from_lists(rows)
    except ValueError as e:
        assert message in str(e), (cls.__name__, str(e))
    else:
        raise AssertionError(f"{cls.__name__}: no error")
print("ok")
"""


def test_ints_from_lists_outer_list_mutated_while_read() -> None:
    """An item's __index__ that clears or replaces the outer list freed the row being read, which
    was only borrowed (use after free: a crash or garbage ids). Rows and items are now held and
    the shapes checked again after the call."""
    proc = subprocess.run([sys.executable, "-c", _LIST_MUTATION_SCRIPT], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
