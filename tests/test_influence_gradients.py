"""Per-sample gradients (python/mixtape/influence/gradients.py) against per-sample autograd loops
on tiny GPT-2 / Llama models built from configs: vmap, loop, ghost hooks, probe means, params."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mixtape.influence import DataInfCalculator, GhostGradientExtractor
from mixtape.influence.gradients import (
    causal_lm_loss,
    ghost_modules,
    mean_gradient,
    per_sample_gradients,
    select_parameters,
)

tf = pytest.importorskip("transformers")


def tiny_model(kind: str, attn: str = "eager") -> Any:
    torch.manual_seed(0)
    if kind == "gpt2":
        config = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32,
                               resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)  # fmt: skip
        model = tf.GPT2LMHeadModel(config)
    else:
        config = tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                max_position_embeddings=32, pad_token_id=0)  # fmt: skip
        model = tf.LlamaForCausalLM(config)
    model.set_attn_implementation(attn)
    return model.train()  # gradients must be taken in eval mode whatever the caller's mode


def ragged_batch(seed: int, lengths: list[int], vocab: int = 64) -> dict[str, torch.Tensor]:
    """Right-padded ids (pad 0), mask and labels (-100 on padding and on a few real tokens)."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 1] = -100  # a prompt token: excluded from the loss
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reference(model: Any, batch: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:  # noqa: E501
    """One autograd pass per sample, unpadded, with transformers' own loss."""
    model.eval()
    named = dict(model.named_parameters())
    out: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        loss = model(input_ids=batch["input_ids"][i : i + 1, :n],
                     labels=batch["labels"][i : i + 1, :n]).loss  # fmt: skip
        grads = torch.autograd.grad(loss, [named[k] for k in names])
        for k, g in zip(names, grads, strict=True):
            out[k].append(g)
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize(("backend", "attn"), [("vmap", "eager"), ("vmap", "sdpa"),
                                               ("loop", "eager"), ("hooks", "sdpa"),
                                               ("hooks", "eager")])  # fmt: skip
def test_per_sample_gradients_match_autograd_loop(kind: str, backend: str, attn: str) -> None:
    """sdpa: transformers' mask code branches on data, so the right-padding mask is dropped."""
    model = tiny_model(kind, attn)
    batch = ragged_batch(1, [9, 5, 12, 7, 3])
    params = select_parameters(model)  # the last block
    assert params and all(".1." in k for k in params)
    got = per_sample_gradients(model, batch, params, backend=backend, chunk_size=2)
    assert model.training  # mode restored
    want = reference(model, batch, list(params))
    for k in params:
        assert got[k].shape == (5, *params[k].shape)
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)


def test_causal_lm_loss_matches_transformers() -> None:
    model = tiny_model("llama").eval()
    batch = ragged_batch(2, [6, 6, 6])
    logits = model(input_ids=batch["input_ids"]).logits
    per = causal_lm_loss(logits, batch["labels"])
    for i in range(3):
        want = model(input_ids=batch["input_ids"][i : i + 1],
                     labels=batch["labels"][i : i + 1]).loss  # fmt: skip
        torch.testing.assert_close(per[i], want, rtol=1e-5, atol=1e-6)
    # A sample with no labelled token has loss 0 (and so a zero gradient), not NaN.
    empty = torch.full_like(batch["labels"], -100)
    assert causal_lm_loss(logits, empty).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_mean_gradient_is_the_mean_of_per_sample(kind: str) -> None:
    model = tiny_model(kind)
    batch = ragged_batch(3, [4, 10, 8, 6, 5, 9, 7])
    params = select_parameters(model, ["*.1.mlp.*"])
    per = per_sample_gradients(model, batch, params)
    mean, loss = mean_gradient(model, batch, params, chunk_size=3)
    for k in params:
        torch.testing.assert_close(mean[k], per[k].mean(0), rtol=1e-4, atol=1e-6)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert loss == pytest.approx(float(causal_lm_loss(logits, batch["labels"]).mean()), rel=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_ghost_layers_match_materialised_gradients(kind: str) -> None:
    """GhostLinear built from hooks: D_i^T X_i is each sample's weight gradient (transposed for
    GPT-2's Conv1D), and DataInf on ghosts equals DataInf on the materialised gradients."""
    model = tiny_model(kind)
    batch = ragged_batch(4, [8, 3, 11, 6, 9, 5])
    pattern = ["transformer.h.1.mlp.c_fc.*"] if kind == "gpt2" else ["model.layers.1.mlp.*_proj.weight"]  # noqa: E501
    params = select_parameters(model, pattern)
    mods = ghost_modules(model, params)
    ghosts = GhostGradientExtractor(model, mods)(batch, chunk_size=4)
    per = per_sample_gradients(model, batch, params)
    for name, layer in ghosts.items():
        w = torch.einsum("nto,nti->noi", layer.output_grads, layer.inputs)
        want = per[f"{name}.weight"]
        if kind == "gpt2":
            want = want.transpose(1, 2)
        torch.testing.assert_close(w, want, rtol=1e-4, atol=1e-5, msg=name)
        if layer.bias:
            torch.testing.assert_close(layer.output_grads.sum(1), per[f"{name}.bias"],
                                       rtol=1e-4, atol=1e-5)  # fmt: skip
    probe = ragged_batch(5, [7, 7, 4])
    mean, _ = mean_gradient(model, probe, params)
    ghost_probe = GhostGradientExtractor(model, mods).probe_gradients(mean)
    # The plain path scores each module's weight and bias as one block, as the ghost path does.
    plain_train, plain_probe = {}, {}
    for name, mod in mods.items():
        keys = [f"{name}.weight"] + ([f"{name}.bias"] if mod.bias is not None else [])
        ws = [per[k].transpose(1, 2) if kind == "gpt2" and k.endswith("weight") else per[k]
              for k in keys]  # fmt: skip
        ps = [mean[k].T if kind == "gpt2" and k.endswith("weight") else mean[k] for k in keys]
        plain_train[name] = torch.cat([w.reshape(6, -1) for w in ws], dim=1)
        plain_probe[name] = torch.cat([p.reshape(-1) for p in ps])
    calc = DataInfCalculator()
    got = calc.compute_influence(ghosts, ghost_probe)
    want = calc.compute_influence(plain_train, plain_probe)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))


def test_select_parameters_rules_and_errors() -> None:
    model = tiny_model("llama")
    names = [n for n, _ in model.named_parameters()]
    last = select_parameters(model)
    assert list(last) == [n for n in names if n.startswith("model.layers.1.")]
    two = select_parameters(model, last_k_blocks=2)
    assert list(two) == [n for n in names if n.startswith("model.layers.")]
    assert list(select_parameters(model, ["lm_head.weight"])) == ["lm_head.weight"]
    with pytest.raises(ValueError, match=r"no parameter matches params=\['nope\.\*'\]"):
        select_parameters(model, ["nope.*"])
    with pytest.raises(ValueError, match="no parameter named '\\*lora_\\*'"):
        select_parameters(model, lora=True)
    # LoRA-style parameters are the default when present.
    model.model.layers[0].self_attn.q_proj.lora_A = torch.nn.Parameter(torch.zeros(2, 32))
    assert list(select_parameters(model)) == ["model.layers.0.self_attn.q_proj.lora_A"]
    flat = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 8))
    assert list(select_parameters(flat)) == ["0.weight", "1.weight", "1.bias"]  # no blocks: all
    with pytest.raises(ValueError, match="ghost backend scores linear layers only"):
        ghost_modules(flat, select_parameters(flat))


def test_batch_errors() -> None:
    model = tiny_model("gpt2")
    params = select_parameters(model)
    with pytest.raises(ValueError, match="batch needs 'input_ids'"):
        per_sample_gradients(model, {"ids": torch.zeros(2, 3)}, params)
    with pytest.raises(ValueError, match=r"input_ids must be \[n >= 1, T\], got \(0, 4\)"):
        per_sample_gradients(model, {"input_ids": torch.zeros(0, 4, dtype=torch.long)}, params)
    bad = {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.ones(2, 3)}
    with pytest.raises(ValueError, match=r"labels has shape \(2, 3\), input_ids \(2, 4\)"):
        per_sample_gradients(model, bad, params)
    with pytest.raises(ValueError, match="backend must be 'auto', 'hooks', 'vmap' or 'loop'"):
        per_sample_gradients(model, bad, params, backend="ghost")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hooks_and_vmap_give_the_same_datainf_scores(kind: str) -> None:
    """The tracker's default path (hooks: batched pass, rows sorted by length and chunks cut to
    their longest row) scores the last block exactly as the vmap path does, layer by layer."""
    model = tiny_model(kind, "sdpa")
    batch = ragged_batch(4, [9, 3, 12, 7, 5, 11, 4])
    probe = ragged_batch(5, [8, 12, 6])
    params = select_parameters(model)
    probe_grads, _ = mean_gradient(model, probe, params, chunk_size=2)
    calc = DataInfCalculator()
    want_total, want = calc.compute_influence(
        per_sample_gradients(model, batch, params, backend="vmap", chunk_size=3), probe_grads,
        per_layer=True)
    got_total, got = calc.compute_influence(
        per_sample_gradients(model, batch, params, backend="hooks", chunk_size=3), probe_grads,
        per_layer=True)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(got_total, want_total, rtol=1e-3, atol=1e-6)
    assert not torch.allclose(want_total, torch.zeros_like(want_total))


def test_hooks_backend_handles_tied_and_untied_weights() -> None:
    """GPT-2's lm_head shares the embedding matrix: the hooks path reads the tied weight's
    gradient where it is used as a linear layer (lm_head) and refuses the embedding use."""
    model = tiny_model("gpt2")
    batch = ragged_batch(6, [6, 4, 8])
    params = select_parameters(model, ["transformer.ln_f.*"])
    got = per_sample_gradients(model, batch, params, backend="hooks", chunk_size=2)
    want = reference(model, batch, list(params))
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    tied = select_parameters(model, ["transformer.wte.weight"])
    with pytest.raises(ValueError, match="hooks backend scores parameters of"):
        per_sample_gradients(model, batch, tied, backend="hooks")
    assert per_sample_gradients(model, batch, tied, backend="auto")[
        "transformer.wte.weight"].shape == (3, 64, 32)
