"""PackedCollator: packed rows (pack_sequences, TRL's pack_dataset) -> training batches, checked
against a row-by-row reference, TRL's collator, and the model loss of the documents run alone."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packing_fixtures import as_dataset, make_docs, tiny_model
from stateful_helpers import same

from mixtape.packing import pack_sequences

datasets = pytest.importorskip("datasets")







# ---------------------------------------------------------------------------------------------
# PackedCollator: packed rows -> training batches
# ---------------------------------------------------------------------------------------------


def ref_documents(row: dict[str, Any]) -> list[tuple[int, int]]:
    """(start, length) of the documents of one packed row, found with plain loops."""
    ids = list(row["input_ids"])
    if row.get("seq_lengths") is not None:
        lens = list(row["seq_lengths"])
        starts = list(row["seq_starts"]) if row.get("seq_starts") is not None else None
        if starts is None:
            starts, at = [], 0
            for n in lens:
                starts.append(at)
                at += n
        return [(s, n) for s, n in zip(starts, lens, strict=True) if n > 0]
    if row.get("position_ids") is not None:
        pos = list(row["position_ids"])
        docs: list[tuple[int, int]] = []
        for t in range(len(ids)):
            if t == 0 or pos[t] != pos[t - 1] + 1:
                docs.append((t, 1))
            else:
                docs[-1] = (docs[-1][0], docs[-1][1] + 1)
        return docs
    return [(0, len(ids))] if ids else []


def ref_packed_batch(rows: list[dict[str, Any]], attention: str, pad: int = 0,
                     label_pad: int = -100, multiple: int | None = None,
                     padding_free: bool = False, start: int = 0) -> dict[str, Any]:  # fmt: skip
    """What PackedCollator must return, computed row by row, document by document, token by token.

    Masks as nested lists of bools (True = may attend); cu_seq_lens as a list.
    """
    width = max(len(r["input_ids"]) for r in rows)
    if multiple:
        width = -(-width // multiple) * multiple
    out_ids, out_lab, out_pos, out_seg = [], [], [], []
    for r in rows:
        ids = list(r["input_ids"])
        lab = list(r["labels"]) if r.get("labels") is not None else ids
        row_ids, row_lab, row_pos, row_seg = [pad] * width, [label_pad] * width, [0] * width, \
            [-1] * width  # fmt: skip
        for j, (s, n) in enumerate(ref_documents(r)):
            for t in range(n):
                row_ids[s + t] = ids[s + t]
                row_lab[s + t] = lab[s + t] if t > 0 else label_pad
                row_pos[s + t] = start + t
                row_seg[s + t] = j
        if padding_free:  # documents back to back, padding dropped
            keep = [c for c in range(width) if row_seg[c] >= 0]
            row_ids, row_lab, row_pos = ([x[c] for c in keep] for x in (row_ids, row_lab, row_pos))
            row_seg = [row_seg[c] for c in keep]
        out_ids.append(row_ids)
        out_lab.append(row_lab)
        out_pos.append(row_pos)
        out_seg.append(row_seg)
    if padding_free:
        out_ids, out_lab, out_pos = ([[t for row in x for t in row]]
                                     for x in (out_ids, out_lab, out_pos))  # fmt: skip
        # a new segment wherever the (row, document) changes
        keys = [(i, s) for i, row_seg in enumerate(out_seg) for s in row_seg]
        out_seg = [[len({*keys[: t + 1]}) - 1 for t in range(len(keys))]]
        if multiple:  # padded to the multiple as TRL: position 0, each pad token a segment
            extra = -len(keys) % multiple
            out_ids[0] += [pad] * extra
            out_lab[0] += [label_pad] * extra
            out_pos[0] += [0] * extra
            out_seg[0] += [-2 - k for k in range(extra)]  # < 0: padding, each its own
    want: dict[str, Any] = {"input_ids": out_ids, "labels": out_lab, "position_ids": out_pos}
    if attention == "flash":
        cu = [0]
        for i, row_seg in enumerate(out_seg):
            for c in range(1, len(row_seg)):
                if row_seg[c] != row_seg[c - 1]:
                    cu.append(i * len(row_seg) + c)
            cu.append((i + 1) * len(row_seg))
        cu = sorted(set(cu))
        want["cu_seq_lens_q"] = want["cu_seq_lens_k"] = cu
        longest = max((b - a for a, b in itertools.pairwise(cu)), default=0)
        want["max_length_q"] = want["max_length_k"] = longest
    elif attention in ("sdpa", "eager"):
        want["attention_mask"] = [
            [[(seg[q] >= 0 and seg[q] == seg[k] and k <= q) or (seg[q] < 0 and q == k)
              for k in range(len(seg))] for q in range(len(seg))]
            for seg in out_seg
        ]  # fmt: skip
    return want


def check_packed_batch(got: dict[str, Any], want: dict[str, Any], attention: str) -> None:
    import torch

    assert set(got) == set(want), (sorted(got), sorted(want))
    for key in ("input_ids", "labels", "position_ids"):
        assert got[key].dtype == torch.int64, key
        assert got[key].tolist() == want[key], key
    if attention == "flash":
        assert got["cu_seq_lens_q"].dtype == torch.int32
        assert got["cu_seq_lens_q"].tolist() == got["cu_seq_lens_k"].tolist() == want[
            "cu_seq_lens_q"]  # fmt: skip
        assert got["max_length_q"] == got["max_length_k"] == want["max_length_q"]
        assert isinstance(got["max_length_q"], int)
    elif attention in ("sdpa", "eager"):
        mask = got["attention_mask"]
        allowed = torch.tensor(want["attention_mask"], dtype=torch.bool)[:, None]
        assert tuple(mask.shape) == tuple(allowed.shape)
        if attention == "sdpa":
            assert mask.dtype == torch.bool and torch.equal(mask, allowed)
        else:
            assert mask.dtype == torch.float32
            assert torch.equal(mask == 0, allowed)
            assert torch.all(mask[~allowed] == torch.finfo(torch.float32).min)


def table_rows(table: Any) -> list[dict[str, Any]]:
    data = table.data.table if hasattr(table, "data") else table
    return list(data.to_pylist())


def test_packed_collator_hand_made() -> None:
    from mixtape import PackedCollator, create_packed_collate

    rows = [
        {"input_ids": [11, 12, 13, 14, 10, 0], "seq_lengths": [4, 1]},
        {"input_ids": [5, 6, 7, 8, 9, 3], "seq_lengths": [3, 2, 1]},
    ]
    flash = create_packed_collate(pad_token_id=0, attention="flash")
    assert isinstance(flash, PackedCollator) and flash.attention == "flash"
    got = flash(rows)
    assert got["input_ids"].tolist() == [[11, 12, 13, 14, 10, 0], [5, 6, 7, 8, 9, 3]]
    assert got["labels"].tolist() == [[-100, 12, 13, 14, -100, -100],
                                      [-100, 6, 7, -100, 9, -100]]  # fmt: skip
    assert got["position_ids"].tolist() == [[0, 1, 2, 3, 0, 0], [0, 1, 2, 0, 1, 0]]
    assert got["cu_seq_lens_q"].tolist() == [0, 4, 5, 6, 9, 11, 12]  # the padding run is one
    assert got["max_length_q"] == 4
    sdpa = create_packed_collate(attention="sdpa")(rows)["attention_mask"]
    assert sdpa[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1],
    ]  # fmt: skip
    # Ragged rows (TRL's layout) are padded to the longest row, rounded up; own labels are used.
    ragged_rows = [{"input_ids": [1, 2, 3], "labels": [7, 8, 9], "seq_lengths": [1, 2]},
                   {"input_ids": [4], "labels": [-100], "seq_lengths": [1]}]  # fmt: skip
    got = create_packed_collate(pad_token_id=3, attention="none", pad_to_multiple_of=4)(
        ragged_rows)  # fmt: skip
    assert set(got) == {"input_ids", "labels", "position_ids"}
    assert got["input_ids"].tolist() == [[1, 2, 3, 3], [4, 3, 3, 3]]
    assert got["labels"].tolist() == [[-100, -100, 9, -100], [-100] * 4]
    assert got["position_ids"].tolist() == [[0, 0, 1, 0], [0, 0, 0, 0]]
    flat = create_packed_collate(attention="flash", padding_free=True, position_ids_start=1)(
        ragged_rows)  # fmt: skip
    assert flat["input_ids"].tolist() == [[1, 2, 3, 4]]
    assert flat["position_ids"].tolist() == [[1, 1, 2, 1]]
    assert flat["cu_seq_lens_q"].tolist() == [0, 1, 3, 4]


PACKED_ATTENTIONS = ["flash", "sdpa", "eager", "none"]


@pytest.mark.parametrize("attention", PACKED_ATTENTIONS)
@pytest.mark.parametrize("layout", ["padded", "ragged"])
def test_packed_collator_from_pack_sequences(attention: str, layout: str) -> None:
    from mixtape import create_packed_collate

    rng = np.random.default_rng(21)
    docs = make_docs([int(x) for x in rng.integers(1, 40, 60)], seed=3, vocab=1000)
    labels = pa.array([(d + 1).tolist() for d in docs], type=pa.list_(pa.int64()))
    ds = as_dataset(docs, labels=labels)
    packed = pack_sequences(ds, 48, layout=layout, fields=("input_ids", "position_ids",
                                                           "seq_lengths", "doc_ids"))  # fmt: skip
    collate = create_packed_collate(attention=attention)
    arrow = packed.with_format("arrow")
    for lo, hi in ((0, 4), (4, 11), (packed.num_rows - 1, packed.num_rows)):
        rows = packed.select(range(lo, hi)).to_list()
        want = ref_packed_batch(rows, attention)
        check_packed_batch(collate(rows), want, attention)  # list of dicts
        check_packed_batch(collate(arrow[lo:hi]), want, attention)  # Arrow table
        check_packed_batch(collate(packed[lo:hi]), want, attention)  # dict of columns
    # The rows' own labels were used (ids + 1), with -100 at document starts.
    got = collate(arrow[0:4])
    real = got["labels"] != -100
    assert torch_equal(got["labels"][real], got["input_ids"][real] + 1)


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return bool(torch.equal(a, b))


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=40),
    capacity=st.sampled_from([8, 16, 24, 32]),
    layout=st.sampled_from(["padded", "ragged"]),
    align=st.sampled_from([1, 1, 4]),
    boundaries=st.sampled_from(["seq_lengths", "position_ids", "none"]),
    attention=st.sampled_from(PACKED_ATTENTIONS),
    multiple=st.sampled_from([None, 1, 8]),
    padding_free=st.booleans(),
    as_arrow=st.booleans(),
    batch=st.integers(1, 5),
)
def test_packed_collator_random(
    lengths: list[int], capacity: int, layout: str, align: int, boundaries: str, attention: str,
    multiple: int | None, padding_free: bool, as_arrow: bool, batch: int,
) -> None:
    from mixtape import create_packed_collate

    if layout == "ragged":
        align = 1
    fields = ["input_ids"]
    if boundaries != "none":
        fields.append(boundaries)
    if boundaries == "seq_lengths" and align > 1:
        fields.append("seq_starts")
    docs = make_docs(lengths, seed=len(lengths), vocab=500)
    table = pack_sequences(pa.table({"input_ids": [d.tolist() for d in docs]}), capacity,
                           layout=layout, align=align, fields=fields)  # fmt: skip
    collate = create_packed_collate(attention=attention, pad_to_multiple_of=multiple,
                                    padding_free=padding_free)  # fmt: skip
    for lo in range(0, table.num_rows, batch):
        part = table.slice(lo, batch)
        rows = part.to_pylist()
        got = collate(part.to_batches()[0] if as_arrow else rows)
        check_packed_batch(got, ref_packed_batch(rows, attention, multiple=multiple,
                                                 padding_free=padding_free), attention)  # fmt: skip


def test_packed_collator_position_resets_match_seq_lengths() -> None:
    """Without seq_lengths, documents are found where position_ids restart: same batch."""
    from mixtape import create_packed_collate

    docs = make_docs([int(x) for x in np.random.default_rng(4).integers(1, 30, 50)])
    full = pack_sequences(as_dataset(docs), 40).with_format("arrow")
    for attention in ("sdpa", "eager", "none"):
        collate = create_packed_collate(attention=attention)
        a = collate(full[0:6])
        b = collate(full[0:6].drop_columns(["seq_lengths"]))
        for key in a:
            assert torch_equal(a[key], b[key]), (attention, key)
    # A reset is any break in the count, whatever the start (here positions start at 1).
    got = create_packed_collate(attention="flash")(
        [{"input_ids": [5, 6, 7, 8, 9], "position_ids": [1, 2, 3, 1, 2]}])  # fmt: skip
    assert got["cu_seq_lens_q"].tolist() == [0, 3, 5]
    assert got["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert got["position_ids"].tolist() == [[0, 1, 2, 0, 1]]  # rebuilt from position_ids_start


def test_packed_collator_trl_pack_dataset() -> None:
    """TRL's pack_dataset rows: the reference output, and TRL's own padding-free collator."""
    trl_data_utils = pytest.importorskip("trl.data_utils")
    sft = pytest.importorskip("trl.trainer.sft_trainer")
    from mixtape import create_packed_collate

    rng = np.random.default_rng(8)
    docs = make_docs([int(x) for x in rng.integers(1, 50, 80)] + [90], vocab=1000)
    mask = pa.array([[1] * d.size for d in docs], type=pa.list_(pa.int8()))
    ds = as_dataset(docs, attention_mask=mask)
    theirs_collate = sft.DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    for strategy in ("bfd", "bfd_split", "wrapped"):
        packed = trl_data_utils.pack_dataset(ds, 64, strategy=strategy)
        rows = packed.select(range(5)).to_list()
        for attention in PACKED_ATTENTIONS:
            collate = create_packed_collate(attention=attention)
            want = ref_packed_batch(rows, attention)
            check_packed_batch(collate(rows), want, attention)
            check_packed_batch(collate(packed.with_format("arrow")[0:5]), want, attention)
        ours = create_packed_collate(attention="flash", padding_free=True)(rows)
        theirs = theirs_collate(rows)
        for key in ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k"):
            assert ours[key].tolist() == theirs[key].tolist(), (strategy, key)
        assert ours["max_length_q"] == theirs["max_length_q"]


def test_packed_collator_registry_and_options() -> None:
    import torch

    import mixtape
    from mixtape import PackedCollator, get_collator, list_collators

    assert "PackedCollator" in mixtape.__all__ and "create_packed_collate" in mixtape.__all__
    info = {c.name: c for c in list_collators("text")}["packed"]
    assert info.modality == "text"
    col = get_collator("packed", attention="flash_attention_2", pad_token_id=5)
    assert isinstance(col, PackedCollator) and col.attention == "flash" and col.pad_token_id == 5
    rows = [{"input_ids": [1, 2, 3], "seq_lengths": [2, 1], "token_type_ids": [1, 1, 2],
             "doc_ids": [4, 9], "weight": 0.5},
            {"input_ids": [4, 5], "seq_lengths": [2], "token_type_ids": [3, 3],
             "doc_ids": [1], "weight": 2.0}]  # fmt: skip
    got = mixtape.create_packed_collate(attention="eager", mask_dtype=torch.bfloat16)(rows)
    assert got["attention_mask"].dtype == torch.bfloat16
    assert got["token_type_ids"].tolist() == [[1, 1, 2], [3, 3, 0]]  # laid out like the ids
    assert got["weight"].tolist() == [0.5, 2.0]
    assert "doc_ids" not in got and "seq_lengths" not in got
    as_numpy = mixtape.create_packed_collate(attention="sdpa", return_tensors=False)(rows)
    assert isinstance(as_numpy["input_ids"], np.ndarray)
    assert isinstance(as_numpy["attention_mask"], np.ndarray)
    assert as_numpy["attention_mask"].dtype == np.bool_
    plan = col.plan(rows)
    assert plan.row_offsets.tolist() == [0, 2, 3] and plan.length.tolist() == [2, 1, 2]


def test_packed_collator_bad_inputs() -> None:
    from mixtape import create_packed_collate

    collate = create_packed_collate(attention="flash")
    with pytest.raises(ValueError, match="attention must be one of"):
        create_packed_collate(attention="flex")
    with pytest.raises(ValueError, match="mask_dtype"):
        import torch

        create_packed_collate(attention="sdpa", mask_dtype=torch.float16)
    with pytest.raises(ValueError, match="example 1 has a document ending at token 4 but its "
                                         "'input_ids' has 3 tokens"):  # fmt: skip
        collate([{"input_ids": [1, 2], "seq_lengths": [2]},
                 {"input_ids": [1, 2, 3], "seq_lengths": [1, 3]}])  # fmt: skip
    with pytest.raises(ValueError, match="example 0 has a negative document length"):
        collate([{"input_ids": [1, 2], "seq_lengths": [-1, 3]}])
    with pytest.raises(ValueError, match="seq_starts: example 0 has a document at column 1"):
        collate([{"input_ids": [1, 2, 3, 4], "seq_lengths": [2, 2], "seq_starts": [0, 1]}])
    with pytest.raises(ValueError, match="input_ids: example 1 has a negative token id"):
        collate([{"input_ids": [1], "seq_lengths": [1]}, {"input_ids": [-3], "seq_lengths": [1]}])
    with pytest.raises(ValueError, match="labels: example 0 has 1 tokens but its input_ids has 2"):
        collate([{"input_ids": [1, 2], "labels": [1], "seq_lengths": [2]}])
    with pytest.raises(ValueError, match="missing field 'seq_lengths'"):
        collate([{"input_ids": [1], "seq_lengths": [1]}, {"input_ids": [2]}])
    # Zero-length documents are skipped.
    got = collate([{"input_ids": [1, 2, 3], "seq_lengths": [0, 2, 0, 1]}])
    assert got["cu_seq_lens_q"].tolist() == [0, 2, 3]


# ---------------------------------------------------------------------------------------------
# The user's path: HF Dataset -> pack_sequences -> PackedCollator -> model, same loss as unpacked
# ---------------------------------------------------------------------------------------------


def separate_loss(model: Any, docs: list[np.ndarray]) -> float:
    """Summed token loss of the documents run one by one."""
    import torch

    total = 0.0
    with torch.no_grad():
        for d in docs:
            if d.size > 1:  # a one-token document predicts nothing
                t = torch.from_numpy(d)[None]
                total += float(model(input_ids=t, labels=t).loss) * (d.size - 1)
    return total


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["padded", "ragged"])
def test_packed_collator_model_loss(attn: str, layout: str) -> None:
    import torch

    from mixtape import create_packed_collate

    model = tiny_model("gpt2", attn)
    lengths = [7, 12, 20, 5, 30, 9, 3, 17, 25, 1, 11]
    docs = make_docs(lengths, seed=11, vocab=256)
    packed = pack_sequences(as_dataset(docs), 32, layout=layout).with_format("arrow")
    assert 3 <= packed.num_rows < len(docs)
    collate = create_packed_collate(attention=attn)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for lo in range(0, packed.num_rows, 2):
            batch = collate(packed[lo : lo + 2])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            tokens += n
    assert tokens == sum(n - 1 for n in lengths)
    assert total == pytest.approx(separate_loss(model, docs), rel=1e-5, abs=1e-4)


def test_packed_collator_flash_segments_reproduce_the_documents() -> None:
    """The flash-attention kwargs mean what varlen attention reads: running each cu_seq_lens
    segment of the flattened batch alone (what flash_attn_varlen does per segment) gives the
    per-document loss. Checked on the CPU, where flash attention itself is not available."""
    import torch

    from mixtape import create_packed_collate

    model = tiny_model("gpt2", "sdpa")
    lengths = [7, 12, 20, 5, 30, 9, 3, 17]
    docs = make_docs(lengths, seed=11, vocab=256)
    for padding_free in (False, True):
        packed = pack_sequences(as_dataset(docs), 32).with_format("arrow")
        batch = create_packed_collate(attention="flash", padding_free=padding_free)(packed[:])
        ids, lab, pos = (batch[k].reshape(-1) for k in ("input_ids", "labels", "position_ids"))
        cu = batch["cu_seq_lens_q"].tolist()
        assert cu[-1] == ids.numel()
        assert batch["max_length_q"] == max(b - a for a, b in itertools.pairwise(cu))
        total = 0.0
        with torch.no_grad():
            for a, b in itertools.pairwise(cu):
                n = int((lab[a + 1 : b] != -100).sum())
                if n:
                    out = model(input_ids=ids[a:b][None], position_ids=pos[a:b][None],
                                labels=lab[a:b][None])  # fmt: skip
                    total += float(out.loss) * n
        assert total == pytest.approx(separate_loss(model, docs), rel=1e-5, abs=1e-4)




# ---------------------------------------------------------------------------------------------
# Rows with gaps (align > 1): read at their seq_starts, or refused; never read back to back
# ---------------------------------------------------------------------------------------------


def test_rows_with_gaps_are_read_at_their_starts_or_refused() -> None:
    from mixtape import create_packed_collate

    data = pa.table({"input_ids": [[1, 2, 3], [4, 5, 6, 7, 8]]})
    fields = ("input_ids", "position_ids", "seq_lengths", "seq_starts")
    rows = pack_sequences(data, 16, align=8, fields=fields).to_pylist()
    assert rows[0]["seq_starts"] == [0, 8]  # the documents sit at aligned columns
    collate = create_packed_collate(attention="flash")
    got = collate(rows)
    assert got["cu_seq_lens_q"].tolist() == [0, 5, 8, 11, 16]
    assert got["labels"].tolist() == [[-100, 5, 6, 7, 8] + [-100] * 4 + [2, 3] + [-100] * 5]
    # Without seq_starts, reading back to back would lose [1, 2, 3] and train on padding.
    no_starts = [{k: v for k, v in r.items() if k != "seq_starts"} for r in rows]
    with pytest.raises(ValueError, match=r"seq_lengths: example 0 has no seq_starts.*"
                                         r"position_ids do not count up.*pass their seq_starts"):
        collate(no_starts)
    # Without position_ids, the tokens after the documents are not one padding value.
    bare = [{k: v for k, v in r.items() if k != "position_ids"} for r in no_starts]
    with pytest.raises(ValueError, match="column 8 after its documents holds 1, not the padding 0"):
        collate(bare)
    # A carried attention_mask reveals a one-token document of the pad value after a gap.
    row = {"input_ids": [1, 2, 3, 0, 0, 0, 0, 0], "attention_mask": [1, 1, 1, 0, 1, 0, 0, 0],
           "seq_lengths": [3, 1]}  # fmt: skip
    with pytest.raises(ValueError, match="attention_mask is 1 at column 4"):
        collate([row])
    # A later row is named, and rows that really are back to back still pass.
    good = {"input_ids": [1, 2, 3, 4, 0, 0], "position_ids": [0, 1, 0, 1, 0, 0],
            "seq_lengths": [2, 2]}  # fmt: skip
    bad = {"input_ids": [1, 2, 0, 3, 4, 0], "position_ids": [0, 1, 0, 0, 1, 0],
           "seq_lengths": [2, 2]}  # fmt: skip
    assert collate([good])["cu_seq_lens_q"].tolist() == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="example 1 has no seq_starts"):
        collate([good, bad])
    # A document continuing its predecessor's positions is not a document boundary.
    joined = {"input_ids": [1, 2, 3, 4], "position_ids": [0, 1, 2, 3], "seq_lengths": [2, 2]}
    with pytest.raises(ValueError, match="do not restart at column 2"):
        collate([joined])


# ---------------------------------------------------------------------------------------------
# padding_free + pad_to_multiple_of: padded as TRL pads it
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("multiple", [None, 1, 3, 4, 8, 64])
def test_padding_free_pad_to_multiple_matches_trl(multiple: int | None) -> None:
    sft = pytest.importorskip("trl.trainer.sft_trainer")
    from mixtape import create_packed_collate

    theirs_collate = sft.DataCollatorForLanguageModeling(pad_token_id=7, padding_free=True,
                                                         pad_to_multiple_of=multiple)  # fmt: skip
    ours_collate = create_packed_collate(pad_token_id=7, attention="flash", padding_free=True,
                                         pad_to_multiple_of=multiple)  # fmt: skip
    rng = np.random.default_rng(multiple or 0)
    plain = [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}]
    packed = [{"input_ids": rng.integers(1, 100, sum(s)).tolist(), "seq_lengths": s}
              for s in ([3, 1, 4], [2], [5, 5])]  # fmt: skip
    for examples in (plain, packed):
        ours, theirs = ours_collate(examples), theirs_collate(examples)
        for key in ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k"):
            assert ours[key].tolist() == theirs[key].tolist(), key
        assert ours["max_length_q"] == theirs["max_length_q"]
    got = ours_collate(plain)
    if multiple == 4:
        assert got["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 7, 7]]
        assert got["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 7, 8]
    # sdpa: the padding attends only to itself; extra token columns padded the same way.
    rows = [{"input_ids": [1, 2, 3], "w": [0.5, 1.0, 2.0]}, {"input_ids": [4, 5], "w": [3.0, 4.0]}]
    sdpa = create_packed_collate(attention="sdpa", padding_free=True, pad_to_multiple_of=multiple)
    got = sdpa(rows)
    width = got["input_ids"].shape[1]
    assert tuple(got["attention_mask"].shape) == (1, 1, width, width)
    assert got["w"].dtype.is_floating_point and got["w"].tolist() == [
        [0.5, 1.0, 2.0, 3.0, 4.0] + [0.0] * (width - 5)]  # fmt: skip
    pad_rows = got["attention_mask"][0, 0, 5:]
    assert all(pad_rows[i].nonzero().flatten().tolist() == [5 + i] for i in range(width - 5))


# ---------------------------------------------------------------------------------------------
# attention: read from the model or given, never a silent default
# ---------------------------------------------------------------------------------------------


def test_attention_is_never_a_silent_default() -> None:
    import transformers as tf

    from mixtape import PackedCollator, create_packed_collate, get_collator

    with pytest.raises(ValueError, match=r"needs to know how the model attends.*model= or config="):
        PackedCollator()
    with pytest.raises(ValueError, match="needs to know"):
        get_collator("packed")
    assert get_collator("packed", attention="flash").attention == "flash"
    for impl, want in (("sdpa", "sdpa"), ("eager", "eager"), ("flash_attention_2", "flash"),
                       ("flash_attention_3", "flash")):  # fmt: skip
        config = tf.LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                                attn_implementation=impl)  # fmt: skip
        assert create_packed_collate(config=config).attention == want
        assert create_packed_collate(config={"attn_implementation": impl}).attention == want
    flex = {"_attn_implementation": "flex_attention"}
    with pytest.raises(ValueError, match=r"'flex_attention'.*pass attention='flash'"):
        create_packed_collate(config=flex)
    unset = tf.LlamaConfig()  # no model was built from it: nothing says how it will attend
    with pytest.raises(ValueError, match="is None"):
        create_packed_collate(config=unset)
    model = tiny_model("llama", "sdpa")
    with pytest.raises(ValueError, match="attention='flash' but the model runs 'sdpa'"):
        create_packed_collate(attention="flash", model=model)
    assert create_packed_collate(attention="none", model=model).attention == "none"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_read_from_the_model_gives_the_per_document_loss(attn: str) -> None:
    import torch

    from mixtape import create_packed_collate

    model = tiny_model("llama", attn)
    lengths = [7, 12, 20, 5, 30, 9, 3, 17]
    docs = make_docs(lengths, seed=11, vocab=256)
    packed = pack_sequences(as_dataset(docs), 32).with_format("arrow")[:]
    want = separate_loss(model, docs)
    n = sum(d - 1 for d in lengths)

    def loss(batch: dict[str, Any]) -> float:
        with torch.no_grad():
            return float(model(**batch).loss) * n

    collate = create_packed_collate(model=model)
    assert collate.attention == attn
    assert loss(collate(packed)) == pytest.approx(want, rel=1e-5, abs=1e-4)
    # What the old default (flash kwargs) did on this model: documents see each other.
    leaky = create_packed_collate(attention="flash")(packed)
    assert abs(loss(leaky) - want) > 1e-3


# ---------------------------------------------------------------------------------------------
# mask="device": seq_idx in the batch, the mask built on the model's device by a hook
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padding_free", [False, True])
def test_device_mask_hook_equals_host_mask(attn: str, padding_free: bool) -> None:
    import torch

    import mixtape
    from mixtape import attach_packed_mask, create_packed_collate, packed_attention_mask

    model = tiny_model("llama", attn)
    lengths = [7, 12, 20, 5, 30, 9, 3, 17]
    docs = make_docs(lengths, seed=11, vocab=256)
    packed = pack_sequences(as_dataset(docs), 32).with_format("arrow")[:]
    kw: dict[str, Any] = {"model": model, "padding_free": padding_free, "pad_to_multiple_of": 8}
    host = create_packed_collate(**kw)(packed)
    dev = create_packed_collate(mask="device", **kw)(packed)
    assert "attention_mask" not in dev and dev["seq_idx"].dtype == torch.int32
    assert tuple(dev["seq_idx"].shape) == tuple(dev["input_ids"].shape)
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(dev[key], host[key])
    mask = packed_attention_mask(dev["seq_idx"], attn)
    assert torch.equal(mask, host["attention_mask"])
    with torch.no_grad():
        host_loss = float(model(**host).loss)
        unhooked = float(model(**dev).loss)  # transformers ignores seq_idx: documents mix
        handle = attach_packed_mask(model)
        hooked = float(model(**dev).loss)
        plain = float(model(input_ids=host["input_ids"][:, :4]).logits.sum())  # no seq_idx: as is
        handle.remove()
        assert plain == float(model(input_ids=host["input_ids"][:, :4]).logits.sum())
    assert hooked == pytest.approx(host_loss, rel=1e-6, abs=1e-6)
    assert abs(unhooked - host_loss) > 1e-4
    n = sum(d - 1 for d in lengths)
    assert hooked * n == pytest.approx(separate_loss(model, docs), rel=1e-5, abs=1e-4)
    with pytest.raises(ValueError, match=r"mask='device'.*not 'flash'"):
        create_packed_collate(attention="flash", mask="device")
    with pytest.raises(ValueError, match="mask must be one of"):
        create_packed_collate(attention="sdpa", mask="gpu")
    handle = mixtape.attach_packed_mask(model)
    with pytest.raises(ValueError, match="both seq_idx and attention_mask"):
        model(**dev, attention_mask=host["attention_mask"])
    handle.remove()


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(1, 40), min_size=0, max_size=5), min_size=1, max_size=5),
    attention=st.sampled_from(PACKED_ATTENTIONS),
    multiple=st.sampled_from([None, 8, 64]),
    padding_free=st.booleans(),
    names=st.booleans(),
)
def test_collate_pieces_equals_the_collator_on_the_rows(
    rows: list[list[int]], attention: str, multiple: int | None, padding_free: bool, names: bool,
) -> None:
    """The packing loader's path (pieces, no parsing) gives the batch of the rows it stands for."""
    from mixtape import create_packed_collate

    rng = np.random.default_rng(len(rows))
    lengths = np.asarray([n for r in rows for n in r], dtype=np.int64)
    row_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=row_offsets[1:])
    values = rng.integers(0, 1000, int(lengths.sum())).astype(np.int32)
    sources = rng.integers(0, 3, lengths.size).astype(np.int32)
    source_names = ["a", "b", "c"] if names else None
    collate = create_packed_collate(attention=attention, pad_to_multiple_of=multiple,
                                    padding_free=padding_free, source_names=source_names)
    tok = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=tok[1:])
    rows_of = itertools.pairwise(row_offsets)
    table = pa.table({
        "input_ids": pa.array([values[tok[a]: tok[b]].tolist() for a, b in rows_of],
                              pa.list_(pa.int32())),
        "seq_lengths": pa.array([lengths[a:b].tolist() for a, b in itertools.pairwise(row_offsets)],
                                pa.list_(pa.int32())),
        "doc_source_ids": pa.array([sources[a:b].tolist()
                                    for a, b in itertools.pairwise(row_offsets)],
                                   pa.list_(pa.int32())),
    })  # fmt: skip
    want = collate(table)
    got = collate.collate_pieces(values, lengths, row_offsets, sources)
    longest = max([sum(r) for r in rows], default=0)
    hinted = collate.collate_pieces(values, lengths, row_offsets, sources, max_row=longest)
    assert same(hinted, got)  # the width known ahead changes nothing
    assert list(got) == list(want)
    for key, value in want.items():
        if hasattr(value, "numpy"):
            assert got[key].dtype == value.dtype, key
            np.testing.assert_array_equal(got[key].numpy(), value.numpy(), err_msg=key)
        else:
            assert got[key] == value, key


def test_collate_pieces_refuses_bad_pieces() -> None:
    from mixtape import create_packed_collate

    collate = create_packed_collate(attention="sdpa", source_names=["a", "b"])
    one = np.array([0, 1], dtype=np.int64)
    with pytest.raises(ValueError, match="3 values for pieces of 2 tokens"):
        collate.collate_pieces(np.array([1, 2, 3]), np.array([2]), one)
    with pytest.raises(ValueError, match=r"input_ids: piece 0 has a negative token id \(-4\)"):
        collate.collate_pieces(np.array([1, -4]), np.array([2]), one)
    with pytest.raises(ValueError, match="doc_source_ids"):
        collate.collate_pieces(np.array([1, 2]), np.array([2]), one, np.array([2]))
