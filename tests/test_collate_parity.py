"""Parity with the collators users know: transformers' data collators and torch pad_sequence.

Same inputs, equal tensors (torch.equal), same keys and dtypes. No network: the tokenizer is
ByT5Tokenizer() (no vocabulary files) and models are tiny configs built from scratch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pad_sequence
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    ByT5Tokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    DataCollatorWithPadding,
    T5Config,
    T5ForConditionalGeneration,
)

from mixtape.collate import (
    create_causal_lm_collate,
    create_collate_fn,
    create_flattening_collate,
    create_seq2seq_collate,
)

# ByT5 ids: pad 0, eos 1, unk 2, bytes from 3. Real ids are kept >= 2 where pad must not occur.
PAD, EOS = 0, 1


def tokenizer(side: str = "right") -> Any:
    tok = ByT5Tokenizer()
    tok.padding_side = side
    return tok


def assert_same(ours: dict[str, Any], theirs: Any, keys: set[str] | None = None) -> None:
    theirs = dict(theirs)
    assert set(ours) == set(theirs) if keys is None else keys <= set(ours) & set(theirs)
    for key in keys or theirs:
        a, b = ours[key], theirs[key]
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype, (key, a.dtype, b.dtype)
            assert torch.equal(a, b), (key, a, b)
        else:
            assert a == b, key


seqs_st = st.lists(st.lists(st.integers(2, 255), min_size=1, max_size=20), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(
    seqs=seqs_st,
    side=st.sampled_from(["left", "right"]),
    multiple=st.one_of(st.none(), st.integers(1, 8)),
    form=st.sampled_from(["lists", "numpy", "tensors"]),
    label=st.booleans(),
)
def test_data_collator_with_padding(
    seqs: list[list[int]], side: str, multiple: int | None, form: str, label: bool
) -> None:
    def conv(s: list[int]) -> Any:
        return {"lists": s, "numpy": np.array(s), "tensors": torch.tensor(s)}[form]

    feats = [{"input_ids": s, **({"label": i % 2} if label else {})} for i, s in enumerate(seqs)]
    ours = create_collate_fn(PAD, padding_side=side, pad_to_multiple_of=multiple)(  # type: ignore[arg-type]
        [{**f, "input_ids": conv(f["input_ids"])} for f in feats]
    )
    theirs = DataCollatorWithPadding(tokenizer(side), pad_to_multiple_of=multiple)(feats)
    assert_same(ours, theirs)


def test_data_collator_with_padding_given_mask_and_token_types() -> None:
    tok = tokenizer()
    tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    feats = [
        {"input_ids": [5, 6, 7], "token_type_ids": [0, 0, 1], "attention_mask": [1, 1, 1]},
        {"input_ids": [8], "token_type_ids": [1], "attention_mask": [1]},
    ]
    assert_same(create_collate_fn(PAD)(feats), DataCollatorWithPadding(tok)(feats))


@pytest.mark.parametrize("key", ["label", "labels"])
def test_data_collator_with_padding_multi_label_scores(key: str) -> None:
    """Multi-label classification (float multi-hot rows, any length) is stacked, not padded."""
    feats = [
        {"input_ids": [5, 6, 7], key: [0.0, 1.0, 1.0, 0.0]},
        {"input_ids": [8], key: [1.0, 0.0, 0.0, 0.5]},
        {"input_ids": [9, 9], key: [0.0, 0.0, 0.0, 0.0]},
    ]
    assert_same(create_collate_fn(PAD)(feats), DataCollatorWithPadding(tokenizer())(feats))


@settings(max_examples=60, deadline=None)
@given(
    seqs=seqs_st,
    side=st.sampled_from(["left", "right"]),
    multiple=st.one_of(st.none(), st.integers(1, 8)),
)
def test_data_collator_for_language_modeling(
    seqs: list[list[int]], side: str, multiple: int | None
) -> None:
    feats = [{"input_ids": s} for s in seqs]
    ours = create_causal_lm_collate(PAD, padding_side=side, pad_to_multiple_of=multiple)(feats)  # type: ignore[arg-type]
    theirs = DataCollatorForLanguageModeling(
        tokenizer(side), mlm=False, pad_to_multiple_of=multiple
    )(feats)
    assert_same(ours, theirs)


def test_pad_equal_to_eos_keeps_real_eos_labels() -> None:
    """transformers masks every token equal to the pad id; we mask padding by length only."""
    tok = tokenizer()
    tok.pad_token = tok.eos_token  # the common GPT-style setup: pad = eos
    assert tok.pad_token_id == EOS
    feats = [{"input_ids": [5, 6, EOS]}, {"input_ids": [7, EOS]}]
    theirs = DataCollatorForLanguageModeling(tok, mlm=False)(feats)
    ours = create_causal_lm_collate(EOS)(feats)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert ours["labels"].tolist() == [[5, 6, EOS], [7, EOS, -100]]
    assert theirs["labels"].tolist() == [[5, 6, -100], [7, -100, -100]]  # real EOS lost


def tiny_t5() -> Any:
    cfg = T5Config(vocab_size=300, d_model=8, d_ff=16, d_kv=4, num_layers=1, num_heads=2,
                   decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS)  # fmt: skip
    return T5ForConditionalGeneration(cfg)


def tiny_bart() -> Any:
    cfg = BartConfig(vocab_size=300, d_model=8, encoder_layers=1, decoder_layers=1,
                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
                     decoder_ffn_dim=16, max_position_embeddings=64, pad_token_id=PAD,
                     bos_token_id=3, eos_token_id=EOS, decoder_start_token_id=EOS)  # fmt: skip
    return BartForConditionalGeneration(cfg)


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    torch.manual_seed(0)
    return {"t5": tiny_t5(), "bart": tiny_bart()}


@pytest.mark.filterwarnings("ignore:Creating a tensor from a list of numpy.ndarrays")
@settings(max_examples=40, deadline=None)
@given(
    seqs=seqs_st,
    labels=st.lists(
        st.lists(st.integers(2, 255), min_size=1, max_size=12), min_size=6, max_size=6
    ),
    side=st.sampled_from(["left", "right"]),
    multiple=st.one_of(st.none(), st.integers(1, 8)),
    model=st.sampled_from([None, "t5", "bart"]),
    as_numpy=st.booleans(),
)
def test_data_collator_for_seq2seq(
    models: dict[str, Any], seqs: list[list[int]], labels: list[list[int]], side: str,
    multiple: int | None, model: str | None, as_numpy: bool,
) -> None:  # fmt: skip
    feats: list[dict[str, Any]] = [
        {"input_ids": s, "labels": np.array(lab) if as_numpy else lab}
        for s, lab in zip(seqs, labels, strict=False)
    ]
    m = models[model] if model else None
    theirs = DataCollatorForSeq2Seq(tokenizer(side), model=m, pad_to_multiple_of=multiple)(feats)
    start = m.config.decoder_start_token_id if m is not None else None
    ours = create_seq2seq_collate(PAD, decoder_start_token_id=start, padding_side=side,  # type: ignore[arg-type]
                                  pad_to_multiple_of=multiple)(feats)  # fmt: skip
    assert_same(ours, theirs)
    assert ("decoder_input_ids" in ours) == (m is not None)


@pytest.mark.parametrize("model", ["t5", "bart"])
def test_data_collator_for_seq2seq_label_key_and_unlabelled(
    models: dict[str, Any], model: str
) -> None:
    """A "label" field is the labels (it was passed through unpadded); labels None in every
    example (a test split) give labels None and no decoder_input_ids (it raised)."""
    m = models[model]
    start = m.config.decoder_start_token_id
    ours_fn = create_seq2seq_collate(PAD, decoder_start_token_id=start)
    theirs_fn = DataCollatorForSeq2Seq(tokenizer(), model=m)
    feats = [{"input_ids": [5, 6, 7], "label": [8, 9]}, {"input_ids": [5], "label": [4, 3, 2]}]
    assert_same(ours_fn(feats), theirs_fn(feats))
    unlabelled = [{"input_ids": [5, 6, 7], "labels": None}, {"input_ids": [5], "labels": None}]
    ours, theirs = ours_fn(unlabelled), theirs_fn(unlabelled)
    assert ours["labels"] is None and theirs["labels"] is None
    assert_same(ours, theirs, {"input_ids", "attention_mask"})
    assert set(ours) == set(theirs)
    with pytest.raises(ValueError, match="labels: example 1 is None"):
        ours_fn([{"input_ids": [5], "labels": [4]}, {"input_ids": [5], "labels": None}])


@settings(max_examples=60, deadline=None)
@given(
    seqs=seqs_st,
    own_labels=st.booleans(),
    flash=st.booleans(),
    seq_idx=st.booleans(),
    positions=st.booleans(),
    sep=st.sampled_from([-100, 3]),
    start=st.sampled_from([0, 2]),
    with_mask=st.booleans(),
)
def test_data_collator_with_flattening(
    seqs: list[list[int]], own_labels: bool, flash: bool, seq_idx: bool, positions: bool,
    sep: int, start: int, with_mask: bool,
) -> None:  # fmt: skip
    feats: list[dict[str, Any]] = []
    for s in seqs:
        f: dict[str, Any] = {"input_ids": s}
        if own_labels:
            f["labels"] = [t + 1 for t in s]
        if with_mask:
            f["attention_mask"] = [1] * len(s)
        feats.append(f)
    kwargs = {"return_flash_attn_kwargs": flash, "return_seq_idx": seq_idx,
              "return_position_ids": positions, "separator_id": sep, "position_ids_start": start}
    theirs = DataCollatorWithFlattening(**kwargs)(feats)
    ours = create_flattening_collate(**kwargs)(feats)
    assert_same(ours, theirs)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_pad_sequence(side: str, dtype: torch.dtype) -> None:
    rng = np.random.default_rng(3)
    seqs = [torch.from_numpy(rng.integers(0, 1000, n)).to(dtype) for n in [5, 0, 17, 1, 9]]
    theirs = pad_sequence(seqs, batch_first=True, padding_value=7, padding_side=side)
    ours = create_collate_fn(7, padding_side=side)([{"input_ids": s} for s in seqs])  # type: ignore[arg-type]
    assert torch.equal(ours["input_ids"], theirs.to(torch.int64))
    lengths = torch.tensor([len(s) for s in seqs])
    mask = torch.arange(theirs.shape[1])[None, :] < lengths[:, None]
    if side == "left":
        mask = mask.flip(1)
    assert torch.equal(ours["attention_mask"], mask.to(torch.int64))


# ---------------------------------------------------------------------------------------------
# Bare id lists: DataCollatorForLanguageModeling(mlm=False) takes them; so does every collator
# ---------------------------------------------------------------------------------------------


def test_bare_id_lists_match_data_collator_for_language_modeling() -> None:
    import numpy as np
    import torch
    from transformers import ByT5Tokenizer, DataCollatorForLanguageModeling

    import mixtape

    tok = ByT5Tokenizer()  # byte-level: needs no vocabulary file
    theirs_collate = DataCollatorForLanguageModeling(tok, mlm=False, pad_to_multiple_of=4)
    ours_collate = mixtape.create_causal_lm_collate(tok.pad_token_id, pad_to_multiple_of=4)
    lists = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    for form in (lists, [np.array(x) for x in lists], [torch.tensor(x) for x in lists]):
        theirs, ours = theirs_collate(form), ours_collate(form)
        for key in ("input_ids", "labels"):
            assert torch.equal(ours[key], theirs[key]), key
        assert ours["attention_mask"].tolist() == [
            [1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    # Every text collator reads them as input_ids, so swapping the collator is one line.
    assert mixtape.create_collate_fn(0)(lists)["input_ids"].shape == (3, 5)
    assert mixtape.create_seq2seq_collate(0)(lists)["input_ids"].shape == (3, 5)
    flat = mixtape.create_flattening_collate()(lists)
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
    packed = mixtape.create_packed_collate(attention="flash")(lists)
    assert packed["cu_seq_lens_q"].tolist() == [0, 3, 5, 7, 10, 15]  # a row each, padded
    assert mixtape.create_causal_lm_collate(0)(np.array([[1, 2], [3, 4]]))["labels"].tolist() == [
        [1, 2], [3, 4]]  # fmt: skip
    with pytest.raises(TypeError, match="example 1 must be a sequence of ids like example 0"):
        ours_collate([[1, 2], {"input_ids": [3]}])
    keyed = mixtape.create_collate_fn(0, input_key="ids")([[1], [2, 3]])
    assert keyed["ids"].tolist() == [[1, 0], [2, 3]]
