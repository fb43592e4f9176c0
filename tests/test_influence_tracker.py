"""``InfluenceTracker`` (python/mixtape/influence/tracker.py) and ``InfluenceConfig``: when it
updates, determinism, errors that change nothing, loaders, all-reduce across ranks, adapters."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import mixtape
from mixtape.config import InfluenceSection
from mixtape.influence import InfluenceConfig, InfluenceTracker
from mixtape.influence import tracker as tracker_mod
from mixtape.influence.tracker import LightningAdapter, TrainerCallbackAdapter

VOCAB = 12


class TinyLM(nn.Module):
    """Embedding + one hidden layer: next-token logits [n, T, V]."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, 8)
        self.hidden = nn.Linear(8, 16)
        self.out = nn.Linear(16, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(self.emb(input_ids))))


def chain(seed: int, n: int, step: int) -> list[dict[str, Any]]:
    """Sequences t, t + step, t + 2 step ... mod VOCAB (lengths 5..9)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t0, length = int(rng.integers(VOCAB)), int(rng.integers(5, 10))
        out.append({"input_ids": [(t0 + step * i) % VOCAB for i in range(length)]})
    return out


def noise(seed: int, n: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, VOCAB, 7).tolist()} for _ in range(n)]


def mixture(**kw: Any) -> mixtape.MixedDataset:
    sources = {"target": chain(1, 40, 1), "other": chain(2, 40, 5), "noise": noise(3, 40)}
    return mixtape.MixedDataset(sources, seed=0, batch_size=4, **kw)


def config(**kw: Any) -> InfluenceConfig:
    base: dict[str, Any] = {"update_interval": 5, "warmup_steps": 3, "samples_per_source": 6,
                            "learning_rate": 0.5, "batch_size": 4}  # fmt: skip
    base.update(kw)
    return InfluenceConfig(**base)


def train(tr: InfluenceTracker, model: nn.Module, mixed: mixtape.MixedDataset, first: int,
          last: int) -> None:  # fmt: skip
    """Steps first..last: a batch of the mixture consumed, an SGD step on a fixed batch, the
    tracker's hook (the model's updates depend on the step only, so runs can be compared)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    it = iter(mixed)
    for step in range(first, last + 1):
        for _ in range(4):  # the step's batch of the mixture (moves its position)
            next(it)
        opt.zero_grad()
        batch = tracker_mod.examples_to_batch(chain(step, 4, 1))
        logits = model(batch["input_ids"])
        loss = mixtape.influence.causal_lm_loss(logits, batch["labels"]).mean()
        loss.backward()
        opt.step()
        tr.on_step_end(step, float(loss.detach()))


def run(cfg: InfluenceConfig, steps: int = 20, data: Any = None) -> InfluenceTracker:
    mixed = mixture() if data is None else data
    model = TinyLM()
    tr = InfluenceTracker(cfg, mixed, model, probe=chain(9, 8, 1))
    tr.on_train_begin()
    train(tr, model, mixed, 1, steps)
    return tr


# --- config --------------------------------------------------------------------------------


def test_config_from_section_and_checks() -> None:
    sec = InfluenceSection(probe="target", method="grad_dot", update_interval=7,
                           params=["out.*"], smoothing=0.2)  # fmt: skip
    # seed / batch_size None inherit from the data config: resolved, or given here
    with pytest.raises(ValueError, match=r"seed is None, inherited from the data config"):
        InfluenceConfig.from_section(sec)
    cfg = InfluenceConfig.from_section(dataclasses.replace(sec, seed=3, batch_size=4))
    assert (cfg.method, cfg.update_interval, cfg.params, cfg.smoothing) == \
        ("grad_dot", 7, ("out.*",), 0.2)  # fmt: skip
    assert cfg.probe == "target" and cfg.damping == 0.1 and (cfg.seed, cfg.batch_size) == (3, 4)
    assert InfluenceConfig.from_section(sec, seed=5, batch_size=2).seed == 5
    for method in ("datainf", "grad_dot", "cosine"):
        assert InfluenceSection(probe="a", method=method).method == method
    with pytest.raises(ValueError, match=r"damping must be a finite number > 0.0, got 0"):
        InfluenceConfig(damping=0)
    with pytest.raises(ValueError, match=r"damping must be a finite number > 0.0, got -1.0"):
        InfluenceConfig(damping=-1.0)
    with pytest.raises(ValueError, match=r"method must be one of .*got 'influence'"):
        InfluenceConfig(method="influence")
    with pytest.raises(ValueError, match=r"update_interval must be an int >= 1, got 0"):
        InfluenceConfig(update_interval=0)
    with pytest.raises(ValueError, match=r"choose parameters by one of .*\['params', 'lora'\]"):
        InfluenceConfig(params=["a"], lora=True)


# --- behaviour -------------------------------------------------------------------------------


def test_disabled_is_a_noop() -> None:
    tr = InfluenceTracker(InfluenceConfig(enabled=False), object(), nn.Linear(1, 1))
    tr.on_train_begin()
    assert [tr.on_step_end(s) for s in range(1, 300)] == [None] * 299
    assert tr.history == [] and tr.state_dict()["weights"] is None
    assert json.loads(tr.to_json())["enabled"] is False


def test_weights_change_only_every_interval_after_warmup() -> None:
    mixed = mixture()
    tr = run(config(), steps=24, data=mixed)
    assert [h["step"] for h in tr.history] == [8, 13, 18, 23]
    # One timeline entry per update, at the position the mixture had reached at that step.
    timeline = mixed.weight_timeline
    assert [p for p, _ in timeline] == [0, 8 * 4, 13 * 4, 18 * 4, 23 * 4]
    for (_, w), h in zip(timeline[1:], tr.history, strict=True):
        assert w == pytest.approx(h["weights"])
        assert h["counts"] == {"target": 6, "other": 6, "noise": 6}
    assert tr.history[-1]["weights"] != pytest.approx(timeline[0][1])
    # The probe is the target chain: its source ends up weighted above the noise.
    assert tr.history[-1]["weights"]["target"] > tr.history[-1]["weights"]["noise"]
    assert tr.history[0]["applied_at"] == 32 and tr.history[0]["probe_loss"] > 0


@pytest.mark.parametrize("method", ["datainf", "grad_dot", "cosine"])
def test_same_run_twice_same_history(method: str) -> None:
    a = run(config(method=method), steps=14)
    b = run(config(method=method), steps=14)
    assert a.history == b.history and a.to_json() == b.to_json()
    c = run(config(method=method, seed=1), steps=14)  # other draws: other scores
    assert c.history[0]["scores"] != a.history[0]["scores"]


@pytest.mark.parametrize("floor", [0.0, 0.3])
def test_state_dict_resume_continues_the_same_history(floor: float) -> None:
    """Stop after step 10, restore tracker, mixture and model in fresh objects, continue to 18:
    the same updates as an uninterrupted run (with a floor, also the weights carried below it)."""
    full = run(config(floor=floor, learning_rate=2.0), steps=18)
    mixed, model = mixture(), TinyLM()
    tr = InfluenceTracker(config(floor=floor, learning_rate=2.0), mixed, model,
                          probe=chain(9, 8, 1))  # fmt: skip
    tr.on_train_begin()
    train(tr, model, mixed, 1, 10)
    assert [h["step"] for h in tr.history] == [8]
    state = json.loads(json.dumps(tr.state_dict()))
    mixed2, model2 = mixture(), TinyLM(seed=1)
    mixed2.load_state_dict(mixed.state_dict())
    model2.load_state_dict(model.state_dict())
    tr2 = InfluenceTracker(config(floor=floor, learning_rate=2.0), mixed2, model2,
                           probe=chain(9, 8, 1))  # fmt: skip
    if floor:
        assert state["carried"] is not None and min(state["carried"].values()) < floor
    tr2.load_state_dict(state)
    tr2.on_train_begin()
    assert tr2.weights == tr.weights and tr2.initial_weights == tr.initial_weights
    train(tr2, model2, mixed2, 11, 18)
    assert [h["step"] for h in tr2.history] == [8, 13, 18]
    assert tr2.history == full.history


def test_errors_change_no_weights() -> None:
    mixed = mixture()
    before = mixed.weight_timeline
    tr = InfluenceTracker(config(), mixed, TinyLM(), probe=[])
    with pytest.raises(ValueError, match="empty probe set"):
        tr.on_train_begin()
    tr = InfluenceTracker(config(), mixed, TinyLM(), probe={"input_ids": torch.zeros(0, 4)})
    with pytest.raises(ValueError, match="empty probe set"):
        tr.on_train_begin()
    empty = mixtape.MixedDataset({"target": chain(1, 10, 1), "void": []}, weights=[1.0, 0.0])
    tr = InfluenceTracker(config(), empty, TinyLM(), probe=chain(9, 4, 1))
    tr.on_train_begin()
    with pytest.raises(ValueError, match=r"source 'void' (is empty|has no samples)"):
        tr.on_step_end(8)
    assert tr.history == [] and empty.weight_timeline == [(0, {"target": 1.0, "void": 0.0})]
    tr = InfluenceTracker(config(), mixed, TinyLM(), probe=[{"text": "abc"}])
    with pytest.raises(ValueError, match=r"probe\[0\] has no 'input_ids' \(and no tokenizer"):
        tr.on_train_begin()
    assert mixed.weight_timeline == before
    with pytest.raises(TypeError, match=r"data must be a mixtape\.Loader or MixedDataset"):
        InfluenceTracker(config(), [1, 2], TinyLM(), probe=chain(9, 4, 1))


def test_probe_forms_agree() -> None:
    """A list, a padded batch, a source name and a map-style dataset give the same probe."""
    mixed = mixture()
    examples = mixed.source("target").take(np.arange(5))
    batch = tracker_mod.examples_to_batch(examples)
    grads = []
    for probe in (examples, batch, "target", _MapDataset(examples)):
        tr = InfluenceTracker(config(probe_samples=5), mixed, TinyLM(), probe=probe)
        tr.on_train_begin()
        grads.append(tr.probe_grads)
    for g in grads[1:]:
        for k in grads[0]:  # type: ignore[union-attr]
            torch.testing.assert_close(g[k], grads[0][k])  # type: ignore[index]


class _MapDataset(torch.utils.data.Dataset[dict[str, Any]]):
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


def test_loader_update_lands_at_b_plus_horizon() -> None:
    mixed = mixture()
    loader = mixtape.get_loader(mixed, batch_size=4)
    model = TinyLM()
    tr = InfluenceTracker(config(warmup_steps=0, update_interval=3), loader, model,
                          probe=chain(9, 8, 1))  # fmt: skip
    tr.on_train_begin()
    it = iter(loader)
    for step in range(1, 7):
        next(it)
        upd = tr.on_step_end(step)
        assert (upd is not None) == (step % 3 == 0)
    assert [h["applied_at"] for h in tr.history] == [3 - 1 + loader.horizon,
                                                     6 - 1 + loader.horizon]  # fmt: skip


@pytest.mark.parametrize(("backend", "params"), [
    ("loop", ["hidden.weight", "hidden.bias", "out.weight", "out.bias"]),
    ("hooks", ["hidden.weight", "hidden.bias", "out.weight", "out.bias"]),
    ("auto", ["hidden.weight", "hidden.bias", "out.weight", "out.bias"]),
    ("ghost", ["hidden.weight", "out.weight"]),  # each layer one block on both paths
])  # fmt: skip
def test_backends_agree_with_vmap(backend: str, params: list[str]) -> None:
    ref = run(config(params=params, backend="vmap"), steps=8)
    got = run(config(params=params, backend=backend), steps=8)
    for key in ("target", "other", "noise"):
        assert got.history[0]["scores"][key] == pytest.approx(ref.history[0]["scores"][key],
                                                              rel=1e-3, abs=1e-6)  # fmt: skip


def test_auto_backend_takes_hooks_where_it_applies() -> None:
    """``auto`` (the default): hooks for linear (and norm) layers, vmap when an embedding is
    among the chosen parameters; decided once, when the tracker is built."""
    mixed = mixture()
    linear = InfluenceTracker(config(params=["hidden.*", "out.*"]), mixed, TinyLM(),
                              probe=chain(9, 4, 1))  # fmt: skip
    assert InfluenceConfig().backend == "auto" and linear.backend == "hooks"
    every = InfluenceTracker(config(), mixed, TinyLM(), probe=chain(9, 4, 1))
    assert "emb.weight" in every.params and every.backend == "vmap"
    with pytest.raises(ValueError, match=r"hooks backend scores parameters of .*; 'emb' "
                                         r"\(Embedding\) is not"):  # fmt: skip
        InfluenceTracker(config(backend="hooks"), mixed, TinyLM(), probe=chain(9, 4, 1))


# --- distributed -----------------------------------------------------------------------------


def test_all_reduce_makes_ranks_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks score different draws; with sums and counts all-reduced both adopt the weights
    of the pooled samples (a mock process group: each rank's contribution is recorded first)."""
    local: dict[int, np.ndarray] = {}
    for rank in (0, 1):
        monkeypatch.setattr(tracker_mod, "_world", lambda r=rank: (r, 1))
        tr = InfluenceTracker(config(), mixture(), TinyLM(), probe=chain(9, 8, 1))
        tr.on_train_begin()
        local[rank] = np.stack(tr._score_sources(8))
    assert not np.allclose(local[0][0], local[1][0])  # the ranks drew different rows
    pooled = local[0] + local[1]

    dist = torch.distributed
    results = []
    for rank in (0, 1):
        monkeypatch.setattr(tracker_mod, "_world", lambda r=rank: (r, 2))
        monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo", raising=False)

        def all_reduce(t: torch.Tensor, op: Any = None, r: int = rank) -> None:
            t += torch.as_tensor(local[1 - r])

        monkeypatch.setattr(dist, "all_reduce", all_reduce, raising=False)
        tr = InfluenceTracker(config(), mixture(), TinyLM(), probe=chain(9, 8, 1))
        tr.on_train_begin()
        tr.on_step_end(8)
        results.append(tr.history[0])
    assert results[0]["weights"] == results[1]["weights"]
    want = pooled[0] / pooled[1]
    assert list(results[0]["scores"].values()) == pytest.approx(want.tolist())
    assert list(results[0]["counts"].values()) == [12, 12, 12]


def _worker(rank: int, world: int, init: str, out: str) -> None:  # pragma: no cover - subprocess
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    tr = InfluenceTracker(config(), mixture(), TinyLM(), probe=chain(9, 8, 1))
    tr.on_train_begin()
    tr.on_step_end(8)
    Path(out, f"{rank}.json").write_text(json.dumps(tr.history[0]))
    torch.distributed.barrier()  # no rank tears gloo down while another still talks to it
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_gloo_two_ranks_adopt_the_same_weights(tmp_path: Path) -> None:
    if sys.platform == "win32" or not torch.distributed.is_available():
        pytest.skip("needs torch.distributed with gloo")
    init = f"file://{tmp_path / 'pg'}"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.multiprocessing.spawn(_worker, args=(2, init, str(tmp_path)), nprocs=2)
    h0, h1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert h0["weights"] == h1["weights"] and h0["counts"]["target"] == 12


# --- adapters --------------------------------------------------------------------------------


class _State:
    def __init__(self) -> None:
        self.global_step = 0
        self.log_history: list[dict[str, float]] = []


def test_trainer_callback_drives_the_tracker() -> None:
    pytest.importorskip("transformers")
    from mixtape.influence import InfluenceTrainerCallback

    tr = InfluenceTracker(config(), mixture(), TinyLM(), probe=chain(9, 8, 1))
    cb = InfluenceTrainerCallback(tr)
    from transformers import TrainerCallback

    assert isinstance(cb, TrainerCallback) and isinstance(cb, TrainerCallbackAdapter)
    state, control = _State(), object()
    assert cb.on_train_begin(None, state, control) is control
    for step in range(1, 14):
        state.global_step = step
        state.log_history.append({"loss": 1.0 / step})
        cb.on_step_end(None, state, control)
    assert [h["step"] for h in tr.history] == [8, 13] and tr.history[1]["loss"] == 1.0 / 13


def test_transformers_trainer_runs_the_tracker(tmp_path: Path) -> None:
    """A real Trainer (tiny GPT-2, sdpa attention) training on the mixture updates it at steps
    3 and 6, from the position the Trainer's DataLoader had read to."""
    tf = pytest.importorskip("transformers")
    from mixtape.influence import InfluenceTrainerCallback

    rng = np.random.default_rng(0)
    src = {k: [{"input_ids": rng.integers(1, 64, 12).tolist()} for _ in range(50)]
           for k in ("a", "b", "c")}  # fmt: skip
    mixed = mixtape.MixedDataset(src, seed=0, batch_size=4)
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64,
                                             n_positions=32))  # fmt: skip
    tr = InfluenceTracker(InfluenceConfig(update_interval=3, samples_per_source=4), mixed, model,
                          probe=src["a"][:8])  # fmt: skip
    collate = mixtape.create_causal_lm_collate(pad_token_id=0)
    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=7, report_to=[],
                                per_device_train_batch_size=4, save_strategy="no",
                                use_cpu=True, logging_steps=1)  # fmt: skip
    trainer = tf.Trainer(model=model, args=args, train_dataset=mixed,
                         data_collator=lambda rows: collate([{"input_ids": r["input_ids"]}
                                                             for r in rows]),
                         callbacks=[InfluenceTrainerCallback(tr)])  # fmt: skip
    trainer.train()
    assert [h["step"] for h in tr.history] == [3, 6]
    timeline = mixed.weight_timeline
    assert [p for p, _ in timeline[1:]] == [h["applied_at"] for h in tr.history]
    assert all(h["applied_at"] >= 4 * h["step"] for h in tr.history)
    assert timeline[-1][1] == pytest.approx(tr.history[-1]["weights"])


def test_lightning_adapter_with_a_stand_in_trainer() -> None:
    tr = InfluenceTracker(config(), mixture(), TinyLM(), probe=chain(9, 8, 1))
    cb = LightningAdapter(tr)

    class Trainer:
        global_step = 0

    trainer = Trainer()
    cb.on_train_start(trainer, None)
    for step in range(1, 10):
        trainer.global_step = step
        for _ in range(2):  # two micro-batches per optimizer step: one update, not two
            cb.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.5)}, None, 0)
    assert [h["step"] for h in tr.history] == [8] and tr.history[0]["loss"] == 0.5
    try:
        import lightning  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="InfluenceLightningCallback needs lightning"):
            mixtape.influence.InfluenceLightningCallback  # noqa: B018


# --- experiment ----------------------------------------------------------------------------


def test_experiment_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mixtape.cli import main

    out = tmp_path / "exp"
    assert main(["experiment", "influence", "--seeds", "1", "--steps", "20", "--per-source",
                 "100", "--eval-every", "5", "--out", str(out)]) == 0  # fmt: skip
    summary = json.loads(Path(f"{out}.json").read_text())
    assert [r["arm"] for r in summary["table"]] == ["uniform", "datainf", "grad_dot",
                                                    "time_avg", "oracle"]  # fmt: skip
    w = summary["datainf_time_avg_weights"]
    assert sum(w.values()) == pytest.approx(1.0)
    assert "final target loss" in capsys.readouterr().out
    assert main(["experiment", "nope"]) == 2
