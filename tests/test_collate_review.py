"""Review fixes: examples that arrive padded (a given mask holding zeros), seq2seq label length.

Parity with transformers' collators on the reviewer's inputs (ByT5Tokenizer: no network).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import (
    ByT5Tokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    T5Config,
    T5ForConditionalGeneration,
)

from mixtape.collate import CausalLMCollator, PaddingCollator, Seq2SeqCollator
from mixtape.ops import Side

PAD, EOS = 0, 1  # ByT5


def tokenizer(side: str = "right") -> Any:
    tok = ByT5Tokenizer()
    tok.padding_side = side
    return tok


def assert_same(ours: dict[str, Any], theirs: Any) -> None:
    theirs = dict(theirs)
    assert set(ours) == set(theirs)
    for key, b in theirs.items():
        assert ours[key].dtype == b.dtype, key
        assert torch.equal(ours[key], b), (key, ours[key], b)


def prepadded(side: str) -> list[dict[str, Any]]:
    """As ``dataset.map(lambda e: tok(e, padding="max_length", ...))`` makes, plus an example
    without padding (so the batch adds padding too)."""
    tok = tokenizer(side)
    feats = [dict(tok(t, padding="max_length", max_length=12, truncation=True))
             for t in ["hi", "hello there"]]  # fmt: skip
    feats.append(dict(tok("abcd")))
    assert feats[0]["attention_mask"].count(0) == 9
    return feats


# --------------------------------------------------------------------------------------------
# 1. A given attention_mask with zeros is honoured
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_prepadded_examples_match_data_collator_with_padding(side: Side) -> None:
    feats = prepadded(side)
    theirs = DataCollatorWithPadding(tokenizer(side))(feats)
    for keep in (False, True):
        ours = PaddingCollator(PAD, padding_side=side, keep_attention_mask=keep)(feats)
        assert_same(ours, theirs)


@pytest.mark.parametrize("side", ["right", "left"])
def test_prepadded_examples_match_data_collator_for_language_modeling(side: str) -> None:
    feats = prepadded(side)
    theirs = DataCollatorForLanguageModeling(tokenizer(side), mlm=False)(feats)
    assert (theirs["labels"] == -100).sum() == 9 + 7  # the given and the added padding
    for keep in (False, True):
        ours = CausalLMCollator(PAD, padding_side=side, keep_attention_mask=keep)(feats)
        assert_same(ours, theirs)


def test_prepadded_pad_equal_to_eos_keeps_real_eos_labels() -> None:
    feats = [{"input_ids": [5, 6, EOS, EOS, EOS], "attention_mask": [1, 1, 1, 0, 0]},
             {"input_ids": [7, EOS], "attention_mask": [1, 1]}]  # fmt: skip
    out = CausalLMCollator(EOS)(feats)
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert out["labels"].tolist() == [[5, 6, EOS, -100, -100], [7, EOS, -100, -100, -100]]


def test_prepadded_shift_labels() -> None:
    """Shifted: no label where the token or the next token (the label) is masked."""
    right = [{"input_ids": [5, 6, 7, 0, 0], "attention_mask": [1, 1, 1, 0, 0]}]
    out = CausalLMCollator(PAD, shift_labels=True)(right)
    assert out["labels"].tolist() == [[6, 7, -100, -100, -100]]
    left = [{"input_ids": [0, 0, 5, 6, 7], "attention_mask": [0, 0, 1, 1, 1]},
            {"input_ids": [8, 9], "attention_mask": [1, 1]}]  # fmt: skip
    out = CausalLMCollator(PAD, shift_labels=True, padding_side="left")(left)
    assert out["labels"].tolist() == [[-100, -100, 6, 7, -100], [-100, -100, -100, 9, -100]]


def test_given_mask_forms_and_truncation() -> None:
    ids = [[5, 6, 0, 0], [7, 8, 9, 0]]
    mask = [[1, 1, 0, 0], [1, 1, 1, 0]]
    want_mask = [[1, 1, 0], [1, 1, 1]]
    want_labels = [[5, 6, -100], [7, 8, 9]]
    forms: list[Any] = [
        mask,
        np.array(mask, dtype=np.int8),
        torch.tensor(mask).bool(),
        [np.array(m) for m in mask],
        pa.array(mask, type=pa.list_(pa.int64())),
        [[float(v) for v in m] for m in mask],
    ]
    for form in forms:
        out = CausalLMCollator(PAD, max_length=3)({"input_ids": ids, "attention_mask": form})
        assert out["attention_mask"].tolist() == want_mask, type(form)
        assert out["labels"].tolist() == want_labels, type(form)
    table = pa.table({"input_ids": ids, "attention_mask": mask})
    out = CausalLMCollator(PAD, max_length=3)(table)
    assert out["labels"].tolist() == want_labels
    # no mask returned: the labels still skip the given padding
    out = CausalLMCollator(PAD, return_attention_mask=False)({"input_ids": ids,
                                                             "attention_mask": mask})  # fmt: skip
    assert "attention_mask" not in out
    assert out["labels"].tolist() == [[5, 6, -100, -100], [7, 8, 9, -100]]


def test_mask_of_ones_is_the_mask_from_lengths() -> None:
    feats = [{"input_ids": [5, 6, 7]}, {"input_ids": [8]}]
    ones = [{**f, "attention_mask": [1] * len(f["input_ids"])} for f in feats]
    for cls in (PaddingCollator, CausalLMCollator):
        a, b = cls(PAD)(feats), cls(PAD)(ones)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_given_mask_length_mismatch_is_an_error() -> None:
    feats = [{"input_ids": [5, 6, 7], "attention_mask": [1, 0]}]
    with pytest.raises(ValueError, match="attention_mask"):
        PaddingCollator(PAD)(feats)


# --------------------------------------------------------------------------------------------
# 2. Seq2Seq labels are cut only by max_label_length
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def t5() -> Any:
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=300, d_model=8, d_ff=16, d_kv=4, num_layers=1, num_heads=2,
                   pad_token_id=PAD, eos_token_id=EOS)  # fmt: skip
    cfg.decoder_start_token_id = PAD
    return T5ForConditionalGeneration(cfg)


@pytest.mark.parametrize("trunc", ["right", "left"])
@pytest.mark.parametrize("target", [list(range(10, 22)), [10, 11, 12]])
def test_seq2seq_max_length_does_not_cut_labels(t5: Any, trunc: str, target: list[int]) -> None:
    """padding="max_length": labels padded to max_length (HF), a longer target kept whole."""
    feats = [{"input_ids": [5, 6, 7], "labels": target}]
    theirs = DataCollatorForSeq2Seq(tokenizer(), model=t5, padding="max_length", max_length=8)(
        feats
    )
    ours = Seq2SeqCollator(PAD, decoder_start_token_id=PAD, padding="max_length", max_length=8,
                           truncation_side=trunc)(feats)  # fmt: skip
    assert_same(ours, theirs)
    ours = Seq2SeqCollator(PAD, decoder_start_token_id=PAD, max_length=8,
                           truncation_side=trunc)(feats)  # fmt: skip
    assert ours["labels"].tolist() == [target]


def test_seq2seq_label_length_rules() -> None:
    feats = [{"input_ids": [5], "labels": list(range(10, 22))}, {"input_ids": [6], "labels": [3]}]
    fn = Seq2SeqCollator(PAD, padding="max_length", max_length=8, pad_to_multiple_of=5,
                         return_tensors="np")  # fmt: skip
    out = fn(feats)  # the longest label (12) is longer than max_length: padded to it, rounded
    assert out["labels"].shape == (2, 15) and out["labels"][0, :12].tolist() == feats[0]["labels"]
    assert out["input_ids"].shape == (2, 10)
    cut = Seq2SeqCollator(PAD, padding="max_length", max_length=8, max_label_length=4,
                          truncation_side="left", return_tensors="np")(feats)  # fmt: skip
    assert cut["labels"].tolist() == [[18, 19, 20, 21], [3, -100, -100, -100]]
    longest = Seq2SeqCollator(PAD, max_length=2, max_label_length=4, return_tensors="np")(feats)
    assert longest["labels"].tolist() == [[10, 11, 12, 13], [3, -100, -100, -100]]
