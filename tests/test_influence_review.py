"""Review fixes in mixtape.influence: a module under several names, ``nn.Linear`` subclasses with
their own forward, probe batches as lists / numpy / left-padded, frozen blocks by default."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import mixtape
from mixtape.influence import InfluenceConfig, InfluenceTracker
from mixtape.influence.gradients import (
    ghost_modules,
    hooks_supported,
    per_sample_gradients,
    select_parameters,
)
from mixtape.influence.tracker import examples_to_batch

ROWS = [[1, 2, 3, 4, 5], [7, 3, 9], [2, 2, 8, 1], [5, 6, 7, 8, 9, 10]]


class SharedBlock(nn.Module):
    """One Linear reused at three depths (``ModuleList([block] * 3)``) and one Linear under two
    attribute names."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        block = nn.Linear(8, 8)
        self.layers = nn.ModuleList([block] * 3)
        self.proj = nn.Linear(8, 8)
        self.proj_alias = self.proj
        self.head = nn.Linear(8, 20)

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
        h = self.emb(input_ids)
        for layer in self.layers:
            h = torch.tanh(layer(h)) + h
        return self.head(torch.tanh(self.proj_alias(h)))


class ScaledHead(nn.Linear):
    """A Linear whose forward is not x W^T + b (logits times a per-token scale)."""

    def __init__(self, d: int, v: int) -> None:
        super().__init__(d, v, bias=False)
        self.register_buffer("scale", torch.linspace(0.5, 3.0, v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


class ScaledLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.hidden = nn.Linear(8, 16)
        self.head = ScaledHead(16, 20)

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.emb(input_ids))))


def test_module_under_several_names_is_counted_once() -> None:
    model = SharedBlock()
    params = {k: v for k, v in model.named_parameters() if not k.startswith("emb")}
    assert list(params) == ["layers.0.weight", "layers.0.bias", "proj.weight", "proj.bias",
                            "head.weight", "head.bias"]  # fmt: skip
    assert hooks_supported(model, params)
    batch = examples_to_batch([{"input_ids": r} for r in ROWS])
    got = per_sample_gradients(model, batch, params, backend="hooks", chunk_size=3)
    want = per_sample_gradients(model, batch, params, backend="loop")
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


def test_linear_subclass_with_own_forward_matches_loop() -> None:
    model = ScaledLM()
    params = {"hidden.weight": model.hidden.weight, "head.weight": model.head.weight}
    batch = examples_to_batch([{"input_ids": r} for r in ROWS])
    want = per_sample_gradients(model, batch, params, backend="loop")
    for backend in ("auto", "hooks"):
        got = per_sample_gradients(model, batch, params, backend=backend, chunk_size=3)
        for k in params:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)
    assert list(ghost_modules(model, {"hidden.weight": model.hidden.weight})) == ["hidden"]
    with pytest.raises(ValueError, match=r"'head' \(ScaledHead overrides forward\)"):
        ghost_modules(model, params)


# --- tiny GPT-2: probe forms and the default parameters ----------------------------------------


def tiny_gpt2() -> Any:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    return tf.GPT2LMHeadModel(config)


def probe_grads(model: nn.Module, probe: Any) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    sources = {s: [{"input_ids": rng.integers(1, 64, 6).tolist()} for _ in range(4)]
               for s in ("a", "b")}  # fmt: skip
    mixed = mixtape.MixedDataset(sources, seed=0, batch_size=2)
    tr = InfluenceTracker(InfluenceConfig(samples_per_source=2), mixed, model, probe=probe)
    tr.on_train_begin()
    assert tr.probe_grads is not None
    return tr.probe_grads


def padded(rows: list[list[int]], left: bool) -> tuple[list[list[int]], list[list[int]]]:
    t = max(map(len, rows))
    ids = [[0] * (t - len(r)) + r if left else r + [0] * (t - len(r)) for r in rows]
    mask = [[0] * (t - len(r)) + [1] * len(r) if left else [1] * len(r) + [0] * (t - len(r))
            for r in rows]  # fmt: skip
    return ids, mask


@pytest.mark.parametrize("form", ["lists", "numpy", "left-padded tensors", "left-padded lists",
                                  "ragged lists"])  # fmt: skip
def test_padded_probe_forms_equal_the_examples(form: str) -> None:
    """The attention mask of a padded probe is honoured whatever the container, and left
    padding is moved to the right (GPT-2 numbers positions from the row's start)."""
    model = tiny_gpt2()
    rows = [[(3 * i + j) % 60 + 1 for j in range(n)] for i, n in enumerate([9, 4, 7, 11])]
    ids, mask = padded(rows, left=form.startswith("left"))
    probe: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if form == "numpy":
        probe = {k: np.array(v) for k, v in probe.items()}
    elif form == "left-padded tensors":
        probe = {k: torch.tensor(v) for k, v in probe.items()}
    elif form == "ragged lists":  # a pad token inside each row's own list, marked by the mask
        probe = {"input_ids": [[*r, 0] for r in rows],
                 "attention_mask": [[1] * len(r) + [0] for r in rows]}
    want = probe_grads(model, [{"input_ids": r} for r in rows])
    got = probe_grads(model, probe)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


def test_default_parameters_are_the_last_trainable_block() -> None:
    model = tiny_gpt2()
    names = [n for n, _ in model.named_parameters()]
    for n, p in model.named_parameters():  # the top block frozen, half of block 0 trains
        p.requires_grad_(n.startswith("transformer.ln_f") or n.startswith("transformer.h.0.mlp"))
    got = select_parameters(model)
    assert list(got) == [n for n in names if n.startswith("transformer.h.0.mlp.")]
    assert all(p.requires_grad for p in got.values())
    for n, p in model.named_parameters():  # head-only fine-tuning: no block trains
        p.requires_grad_(n.startswith("transformer.ln_f"))
    assert list(select_parameters(model)) == ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    assert list(select_parameters(model, ["transformer.h.1.mlp.c_fc.*"])) == [
        "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.bias"]
