"""What a user does end to end: real text, a real tokenizer, a HF Dataset, a torch DataLoader
(with workers), our collators, a tiny GPT-2 training a few steps, and transformers' Trainer.

Everything is local: text from ``pydoc_data.topics`` (ships with Python), the byte-level
``ByT5Tokenizer()`` (no files), a model built from a config. No network.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from stateful_helpers import same_batches
from stateful_helpers import take_batches as take

import mixtape

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

MAX_TOKENS = 96  # tokens kept per document
CAPACITY = 128  # packed row length


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return transformers.ByT5Tokenizer()


@pytest.fixture(scope="module")
def tokenized(tokenizer: Any) -> Any:
    """Paragraphs of Python's help topics, tokenized into input_ids + attention_mask."""
    from pydoc_data.topics import topics

    paragraphs = [p.strip() for key in sorted(topics) for p in topics[key].split("\n\n")]
    paragraphs = [p for p in paragraphs if len(p) >= 20][:240]
    ds = datasets.Dataset.from_dict({"text": paragraphs})
    return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=MAX_TOKENS),
                  batched=True, remove_columns=["text"])  # fmt: skip


def tiny_gpt2(tokenizer: Any, attn: str = "sdpa") -> Any:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=len(tokenizer), n_positions=CAPACITY,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    model.set_attn_implementation(attn)
    return model


def train(model: Any, batches: list[dict[str, Any]]) -> list[float]:
    """One optimiser step per batch; the losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def test_dataloader_causal_lm_with_workers(tokenizer: Any, tokenized: Any) -> None:
    """(a) DataLoader + create_causal_lm_collate: same batches with 0 and 2 workers, from dicts
    and from Arrow; a tiny GPT-2 trains on them."""
    collate = mixtape.create_causal_lm_collate(pad_token_id=tokenizer.pad_token_id)
    got = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(tokenized, batch_size=8, num_workers=workers,
                                             collate_fn=collate)  # fmt: skip
        got[workers] = take(loader, 4)
    assert same_batches(got[0], got[2])
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(tokenized), 8,
                                            drop_last=False)  # fmt: skip
    arrow = torch.utils.data.DataLoader(tokenized.with_format("arrow"), sampler=sampler,
                                        batch_size=None, num_workers=2, collate_fn=collate)
    assert same_batches(take(arrow, 4), got[0])
    first = got[0][0]
    assert set(first) == {"input_ids", "attention_mask", "labels"}
    lengths = [len(x) for x in tokenized[:8]["input_ids"]]
    assert first["attention_mask"].sum(1).tolist() == lengths
    losses = train(tiny_gpt2(tokenizer), got[0][:3])
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(len(tokenizer)), rel=0.1)  # an untrained model


def test_packed_dataset_trains(tokenizer: Any, tokenized: Any) -> None:
    """(b) pack_sequences -> PackedCollator (sdpa mask) in a DataLoader with workers -> training."""
    packed = mixtape.pack_sequences(tokenized, CAPACITY)
    assert packed.column_names == ["input_ids", "position_ids", "attention_mask", "seq_lengths"]
    stats = mixtape.PackingStats.from_plan(mixtape.plan_dataset(tokenized, CAPACITY))
    assert packed.num_rows == stats.rows < stats.documents  # really packed
    collate = mixtape.create_packed_collate(pad_token_id=tokenizer.pad_token_id, attention="sdpa")
    loader = torch.utils.data.DataLoader(packed, batch_size=4, num_workers=2, collate_fn=collate)
    batches = list(loader)
    sampler = torch.utils.data.BatchSampler(range(packed.num_rows), 4, drop_last=False)
    arrow = torch.utils.data.DataLoader(packed.with_format("arrow"), sampler=sampler,
                                        batch_size=None, collate_fn=collate)  # fmt: skip
    assert same_batches(list(arrow), batches)
    # Every document's tokens are trained on once: all but its first token carry a label.
    labelled = sum(int((b["labels"] != -100).sum()) for b in batches)
    assert labelled == sum(len(x) - 1 for x in tokenized["input_ids"])
    first = batches[0]
    assert tuple(first["attention_mask"].shape) == (4, 1, CAPACITY, CAPACITY)
    losses = train(tiny_gpt2(tokenizer), batches[:3])
    assert all(math.isfinite(x) for x in losses)
    # The packed batch computes each document's loss: compare with the documents one by one.
    model = tiny_gpt2(tokenizer).eval()
    row = packed[0]
    starts = np.cumsum([0, *row["seq_lengths"][:-1]])
    with torch.no_grad():
        one = collate([row])
        n = int((one["labels"] != -100).sum())
        packed_sum = float(model(**one).loss) * n
        separate = 0.0
        for s, k in zip(starts, row["seq_lengths"], strict=True):
            if k > 1:
                ids = torch.tensor(row["input_ids"][s : s + k])[None]
                separate += float(model(input_ids=ids, labels=ids).loss) * (k - 1)
    assert packed_sum == pytest.approx(separate, rel=1e-5)


def test_trainer_runs_with_our_collators(tokenizer: Any, tokenized: Any, tmp_path: Any) -> None:
    """(c) transformers.Trainer with the packed collator (and the causal-LM one) for 2 steps."""
    packed = mixtape.pack_sequences(tokenized, CAPACITY)
    cases = {
        "packed": (packed, mixtape.create_packed_collate(
            pad_token_id=tokenizer.pad_token_id, attention="sdpa")),
        "causal_lm": (tokenized, mixtape.create_causal_lm_collate(tokenizer.pad_token_id)),
    }  # fmt: skip
    for name, (train_ds, collate) in cases.items():
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=4,
            learning_rate=1e-3, remove_unused_columns=False, report_to=[], use_cpu=True,
            logging_steps=1, save_strategy="no", dataloader_num_workers=0,
        )  # fmt: skip
        trainer = transformers.Trainer(model=tiny_gpt2(tokenizer), args=args,
                                       train_dataset=train_ds, data_collator=collate)
        result = trainer.train()
        assert result.global_step == 2, name
        logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert len(logged) == 2 and all(math.isfinite(x) for x in logged), (name, logged)
