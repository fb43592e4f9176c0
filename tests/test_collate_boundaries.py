"""Document boundaries and ranges the collators must not lose silently: flattening ignores an
example's own position_ids / seq_idx (as HF's collator), packed sdpa / eager masks refuse
documents longer than a model's sliding window, ids and piece numbers never wrap."""

from __future__ import annotations

import numpy as np
import pytest

from mixtape.collate import FlatteningCollator, PackedCollator
from mixtape.collate.attention import sliding_window
from mixtape.packing.stream import PackingStream


def test_flattening_computes_its_own_positions_and_seq_idx() -> None:
    transformers = pytest.importorskip("transformers")
    feats = [{"input_ids": [5, 6, 7], "position_ids": [10, 11, 12], "seq_idx": [0, 0, 0]},
             {"input_ids": [8, 9], "position_ids": [3, 4], "seq_idx": [0, 0]}]  # fmt: skip
    ours = FlatteningCollator(return_seq_idx=True)(feats)
    hf = transformers.DataCollatorWithFlattening(return_seq_idx=True)(feats)
    assert ours["position_ids"].tolist() == hf["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert ours["seq_idx"].tolist() == hf["seq_idx"].tolist() == [[0, 0, 0, 1, 1]]


def test_sliding_window_is_read_from_the_config() -> None:
    assert sliding_window(config={"sliding_window": 4}) == 4
    assert sliding_window(config={"sliding_window": None}) is None
    assert sliding_window(config={"sliding_window": 4, "use_sliding_window": False}) is None
    assert sliding_window(config={"sliding_window": 4,
                                  "layer_types": ["full_attention"] * 2}) is None  # fmt: skip
    assert sliding_window(config={"sliding_window": 4,
                                  "layer_types": ["sliding_attention", "full_attention"]}) == 4


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_masks_refuse_documents_past_a_sliding_window(attention: str) -> None:
    config = {"_attn_implementation": attention, "sliding_window": 4}
    rows = [{"input_ids": [1, 2, 3, 4, 5, 6], "seq_lengths": [2, 4]}]
    assert PackedCollator(config=config)(rows)["attention_mask"].shape == (1, 1, 6, 6)
    long = [{"input_ids": [1, 2, 3, 4, 5, 6], "seq_lengths": [1, 5]}]
    with pytest.raises(ValueError, match=r"a document of 5 tokens is longer than the model's "
                                         r"sliding window \(4\)"):  # fmt: skip
        PackedCollator(config=config)(long)
    collate = PackedCollator(config=config)
    with pytest.raises(ValueError, match="longer than the model's sliding window"):
        collate.collate_pieces(np.arange(1, 7), np.array([1, 5]), np.array([0, 2]))
    flash = PackedCollator(config={"_attn_implementation": "flash_attention_2",
                                   "sliding_window": 4})  # fmt: skip
    assert flash(long)["cu_seq_lens_q"].tolist() == [0, 1, 6]  # the kernel takes the window


def test_packing_stream_refuses_an_id_its_dtype_cannot_hold() -> None:
    docs = [{"input_ids": np.array([1, 2**31 + 5], dtype=np.int64)}]
    with pytest.raises(ValueError, match=r"token id 2147483653 does not fit dtype int32"):
        list(PackingStream(docs, 8, batch_size=1, dtype=np.int32))
    (batch,) = list(PackingStream(docs, 8, batch_size=1, dtype=np.int64))
    assert int(np.asarray(batch["input_ids"]).max()) == 2**31 + 5


def test_padded_max_seqlen_covers_the_padding_segments() -> None:
    from mixtape import ops

    plan = ops.pack_plan(np.array([3, 2, 100]), capacity=4096)
    got = ops.pack_fill(plan, np.arange(1, 106), np.array([0, 3, 5, 105]), layout="padded",
                        fields=("input_ids", "cu_seqlens", "max_seqlen"))  # fmt: skip
    assert got["max_seqlen"] == int(np.diff(got["cu_seqlens"]).max()) == 3991
