"""Test data shared by the packing and packed-collator tests: documents, datasets, tiny models."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa


def make_docs(lengths: list[int], seed: int = 0, vocab: int = 50_000) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, n, dtype=np.int64) for n in lengths]


def as_dataset(docs: list[np.ndarray], dtype: Any = None, **extra: Any) -> Any:
    import datasets

    offsets = np.concatenate([[0], np.cumsum([d.size for d in docs])]).astype(np.int32)
    flat = np.concatenate(docs) if docs else np.zeros(0, np.int64)
    ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=dtype or pa.int32()))
    cols = {"input_ids": ids}
    cols.update(extra)
    return datasets.Dataset(pa.table(cols))


def tiny_model(kind: str, attn: str) -> Any:
    """A 2-layer GPT-2 (learned positions: position_ids must restart per document) or Llama
    (RoPE, grouped-query attention) built from a config: no download."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if kind == "gpt2":
        config = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64,
                               bos_token_id=1, eos_token_id=2)  # fmt: skip
        model = tf.GPT2LMHeadModel(config)
    else:
        config = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                                pad_token_id=0)  # fmt: skip
        model = tf.LlamaForCausalLM(config)
    model.set_attn_implementation(attn)
    return model.eval()
