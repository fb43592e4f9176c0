"""HF Trainer integration: the model sees the mixture's batches in order (any worker count), and
a resumed run continues with the uninterrupted run's batches without replaying data."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import datasets
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import mixtape
from mixtape import MixedDataset
from mixtape.integrations.hf import (
    STATE_FILE,
    MixtapeTrainer,
    MixtureCheckpointCallback,
    examples_per_step,
)

datasets.disable_progress_bars()

B = 4  # per-device batch


def ds(base: int, n: int) -> Any:
    """Document i of a source is [base + i] repeated 1 + i % 5 times (its origin is readable)."""
    return datasets.Dataset.from_dict({"input_ids": [[base + i] * (1 + i % 5) for i in range(n)]})


class CountingMixture(MixedDataset):
    """Counts the examples its iterator yields in this process (num_workers=0)."""

    served = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for ex in super().__iter__():
            self.served += 1
            yield ex


def make(cls: type[MixedDataset] = MixedDataset, **kw: Any) -> MixedDataset:
    weights = None if "schedule" in kw else {"a": 0.7, "b": 0.3}
    return cls({"a": ds(1, 120), "b": ds(150, 60)}, weights, seed=3, batch_size=B,
               **kw)  # fmt: skip


def model() -> tuple[GPT2LMHeadModel, list[torch.Tensor]]:
    """A tiny GPT-2 and the input_ids of every forward call (what the model was fed)."""
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=16, n_embd=16, n_layer=1,
                                   n_head=2))  # fmt: skip
    seen: list[torch.Tensor] = []
    m.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"].clone()),
                                with_kwargs=True)  # fmt: skip
    return m, seen


def targs(out: Any, steps: int, workers: int = 0, **kw: Any) -> TrainingArguments:
    kw.setdefault("save_strategy", "no")
    return TrainingArguments(str(out), per_device_train_batch_size=B, max_steps=steps,
                             dataloader_num_workers=workers, report_to=[], use_cpu=True,
                             disable_tqdm=True, logging_steps=1000,
                             dataloader_persistent_workers=False, seed=0, **kw)  # fmt: skip


def expected(mixed: MixedDataset, batches: int, start: int = 0) -> list[torch.Tensor]:
    """The padded input_ids of batches [start, start + batches) of the mixture, from its plan."""
    collate = mixtape.create_causal_lm_collate(pad_token_id=0)
    out = []
    for k in range(start, start + batches):
        rows = mixed.take(mixed.plan(k * B, B))
        out.append(collate([{"input_ids": r["input_ids"]} for r in rows])["input_ids"])
    return out


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def train_dataset_run(out: Any, mixed: MixedDataset, steps: int, workers: int,
                      resume: str | None = None, **kw: Any) -> list[torch.Tensor]:  # fmt: skip
    m, seen = model()
    cb = MixtureCheckpointCallback(mixed)
    trainer = Trainer(model=m, args=targs(out, steps, workers, **kw), train_dataset=mixed,
                      data_collator=mixtape.create_causal_lm_collate(pad_token_id=0),
                      callbacks=[cb])  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return seen


# --------------------------------------------------------------------------------------------
# MixedDataset as train_dataset
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_trainer_feeds_the_mixture_in_order(tmp_path: Any, workers: int) -> None:
    mixed = make()
    seen = train_dataset_run(tmp_path, mixed, 6, workers)
    assert same(seen, expected(mixed, 6))


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "accum"), [(0, 1), (2, 1), (2, 2)])
def test_resume_continues_the_uninterrupted_batches_without_replay(
    tmp_path: Any, workers: int, accum: int
) -> None:
    # An odd step count: with 2 workers the resumed DataLoader's first batch comes from worker 0
    # although it is an odd-numbered batch of the mixture.
    kw = {"gradient_accumulation_steps": accum}
    full = train_dataset_run(tmp_path / "full", make(), 8, workers, **kw)
    first = train_dataset_run(tmp_path / "run", make(), 3, workers, save_strategy="steps",
                              save_steps=3, **kw)  # fmt: skip
    ckpt = tmp_path / "run" / "checkpoint-3"
    record = json.loads((ckpt / STATE_FILE).read_text())
    assert record["global_step"] == 3 and record["examples"] == 3 * accum * B
    assert (ckpt / "trainer_state.json").is_file()

    resumed_mixed = make(CountingMixture)
    rest = train_dataset_run(tmp_path / "run", resumed_mixed, 8, workers, resume=str(ckpt),
                             **kw)  # fmt: skip
    assert len(full) == 8 * accum
    assert same(first, full[: 3 * accum])
    assert same(rest, full[3 * accum :])
    if workers == 0:
        # Replaying would draw the 3 trained batches again before the 5 new ones (>= 8 B);
        # what is drawn beyond the 5 batches is the DataLoader's read-ahead.
        assert 5 * B <= resumed_mixed.served < 8 * B


def test_mixture_state_is_the_state_after_the_steps(tmp_path: Any) -> None:
    mixed = make(schedule=[(0, {"a": 1.0, "b": 0.0}), (2, {"a": 0.0, "b": 1.0})])
    args = targs(tmp_path, 10, gradient_accumulation_steps=2)
    assert examples_per_step(args) == 2 * B
    cb = MixtureCheckpointCallback(mixed)
    state = cb.state_dict(args, type("S", (), {"global_step": 3})())  # type: ignore[arg-type]
    assert state["examples"] == 6 * B
    fresh = make(schedule=[(0, {"a": 1.0, "b": 0.0}), (2, {"a": 0.0, "b": 1.0})])
    fresh.load_state_dict(state["state"])
    assert fresh.position == 6 * B
    probe = make(schedule=[(0, {"a": 1.0, "b": 0.0}), (2, {"a": 0.0, "b": 1.0})])
    ref = [e["input_ids"] for e in probe.take(probe.plan(6 * B, 3 * B))]
    got = [e["input_ids"] for _, e in zip(range(3 * B), iter(fresh), strict=False)]
    assert got == ref
    assert all(e >= 150 for row in got for e in row)  # source b only from step 2 on


def test_setup_errors(tmp_path: Any) -> None:
    m, _ = model()
    bad = MixedDataset({"a": ds(1, 20)}, seed=0, batch_size=B + 1)
    trainer = Trainer(model=m, args=targs(tmp_path, 1), train_dataset=bad,
                      data_collator=mixtape.create_causal_lm_collate(pad_token_id=0),
                      callbacks=[MixtureCheckpointCallback(bad)])  # fmt: skip
    with pytest.raises(ValueError, match="batch_size is 5, per_device_train_batch_size 4"):
        trainer.train()
    with pytest.raises(TypeError, match="MixedDataset or a mixtape Loader"):
        MixtureCheckpointCallback([1, 2])  # type: ignore[arg-type]


def test_resume_without_a_saved_mixture_is_an_error(tmp_path: Any) -> None:
    m, _ = model()
    trainer = Trainer(model=m, args=targs(tmp_path, 2, save_strategy="steps", save_steps=2),
                      train_dataset=make(),
                      data_collator=mixtape.create_causal_lm_collate(pad_token_id=0))  # fmt: skip
    trainer.train()  # no callback: no mixture state in the checkpoint
    with pytest.raises(ValueError, match=r"no mixtape_state\.json was found"):
        train_dataset_run(tmp_path, make(), 4, 0, resume=str(tmp_path / "checkpoint-2"))



class _StopAt(TrainerCallback):  # type: ignore[misc]
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_keeps_the_dropout_stream(tmp_path: Any) -> None:
    # The Trainer restores its RNG before iter(train_dataloader); a DataLoader without its own
    # generator drew its base seed from that RNG, shifting every dropout mask after the resume.
    def run(out: Any, resume: str | None = None, stop: int | None = None) -> list[torch.Tensor]:
        m, _ = model()  # GPT-2's default dropout, 0.1
        mixed = make()
        callbacks = [MixtureCheckpointCallback(mixed)] + ([_StopAt(stop)] if stop else [])
        Trainer(model=m, args=targs(out, 6, save_strategy="steps", save_steps=3),
                train_dataset=mixed, callbacks=callbacks,
                data_collator=mixtape.create_causal_lm_collate(pad_token_id=0),
                ).train(resume_from_checkpoint=resume)  # fmt: skip
        return [p.detach().clone() for p in m.parameters()]

    full = run(tmp_path / "full")
    run(tmp_path / "run", stop=3)
    resumed = run(tmp_path / "run", resume=str(tmp_path / "run" / "checkpoint-3"))
    assert all(torch.equal(a, b) for a, b in zip(full, resumed, strict=True))

def test_resume_refuses_another_runs_checkpoint_and_a_late_callback(tmp_path: Any) -> None:
    # A plain Trainer resumed from a folder outside output_dir: output_dir's checkpoint of the
    # same step is another run's, whose mixture state would have been loaded.
    train_dataset_run(tmp_path / "x", make(), 2, 0, save_strategy="steps", save_steps=2)
    m, _ = model()  # another run (it logs every step) into y, with a checkpoint at step 2
    y_args = TrainingArguments(str(tmp_path / "y"), per_device_train_batch_size=B, max_steps=2,
                               report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1,
                               save_strategy="steps", save_steps=2)  # fmt: skip
    other = make()
    Trainer(model=m, args=y_args, train_dataset=other, callbacks=[MixtureCheckpointCallback(other)],
            data_collator=mixtape.create_causal_lm_collate(pad_token_id=0)).train()
    with pytest.raises(ValueError, match="hold another run's trainer state"):
        train_dataset_run(tmp_path / "y", make(), 4, 0, resume=str(tmp_path / "x/checkpoint-2"))
    # Added after __init__: the Trainer decided about data skipping and its RNG restore first.
    m, _ = model()
    mixed = make()
    trainer = Trainer(model=m, args=targs(tmp_path / "x", 4), train_dataset=mixed,
                      data_collator=mixtape.create_causal_lm_collate(pad_token_id=0))  # fmt: skip
    trainer.add_callback(MixtureCheckpointCallback(mixed))
    with pytest.raises(ValueError, match=r"added after the Trainer was built \(add_callback\)"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "x/checkpoint-2"))


# --------------------------------------------------------------------------------------------
# MixtapeTrainer with a Loader
# --------------------------------------------------------------------------------------------


class Reweight(TrainerCallback):  # type: ignore[misc]
    """Asks the loader for new weights after step 2 (as an influence tracker would)."""

    def __init__(self, loader: mixtape.Loader) -> None:
        self.loader = loader

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == 2:
            self.loader.update_weights({"a": 0.0, "b": 1.0})


def loader_run(out: Any, steps: int, workers: int, resume: Any = None, reweight: bool = True,
               **kw: Any) -> list[torch.Tensor]:  # fmt: skip
    m, seen = model()
    loader = mixtape.get_loader(make(), B, num_workers=workers)
    callbacks = [Reweight(loader)] if reweight else []
    trainer = MixtapeTrainer(model=m, args=targs(out, steps, workers, **kw), train_loader=loader,
                             callbacks=callbacks)  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return seen


@pytest.mark.slow
def test_mixtape_trainer_resumes_the_loader_with_its_weight_updates(tmp_path: Any) -> None:
    ref_loader = mixtape.get_loader(make(), B)
    ref = [b["input_ids"] for _, b in zip(range(8), ref_loader, strict=False)]
    full = loader_run(tmp_path / "full", 8, 2)
    assert same(full[:3], ref[:3])  # the update lands at b + horizon: batch 6 with 2 workers
    assert any(not torch.equal(x, y) for x, y in zip(full[6:], ref[6:], strict=True))
    assert all(int(t) >= 150 or int(t) == 0 for x in full[6:] for t in x.flatten())

    first = loader_run(tmp_path / "run", 3, 2, save_strategy="steps", save_steps=3)
    assert same(first, full[:3])
    record = json.loads((tmp_path / "run" / "checkpoint-3" / STATE_FILE).read_text())
    assert record["kind"] == "loader" and record["state"]["batches"] == 3
    # the update asked for at step 2 (for batch 6) is saved: pending, or in the timeline when
    # the DataLoader has already planned batch 6
    state = record["state"]
    assert state["pending"] == [[6, [0.0, 1.0]]] or state["timeline"][-1][1] == [0.0, 1.0]
    rest = loader_run(tmp_path / "run", 8, 0, resume=True, reweight=False)
    assert same(rest, full[3:])


def test_mixtape_trainer_checks_the_loader(tmp_path: Any) -> None:
    m, _ = model()
    loader = mixtape.get_loader(make(), B + 1)
    with pytest.raises(ValueError, match="batch_size is 5, per_device_train_batch_size 4"):
        MixtapeTrainer(model=m, args=targs(tmp_path, 1), train_loader=loader)
    with pytest.raises(TypeError, match="must be a mixtape Loader"):
        MixtapeTrainer(model=m, args=targs(tmp_path, 1), train_loader=make())  # type: ignore[arg-type]


def test_importing_mixtape_does_not_import_transformers_trainer() -> None:
    import subprocess
    import sys

    code = ("import sys, mixtape; print('transformers.trainer' in sys.modules, "
            "'mixtape.integrations.hf' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ})  # fmt: skip
    assert out.stdout.split() == ["False", "False"]


def test_dataloader_workers_resume_at_an_odd_batch() -> None:
    # The DataLoader asks worker 0 first: batches are dealt from the first one served, not from
    # batch 0 of the mixture (a regression: resuming at batch 3 gave batches 4, 3, 6, 5, ...).
    mixed = make()
    mixed.load_state_dict(make().state_dict(position=3 * B))
    loader = torch.utils.data.DataLoader(mixed, batch_size=B, num_workers=2,
                                         collate_fn=lambda rows: [r["input_ids"] for r in rows])
    got = [b for _, b in zip(range(4), loader, strict=False)]
    probe = make()
    assert got == [[r["input_ids"] for r in probe.take(probe.plan(k * B, B))] for k in range(3, 7)]


def test_mid_epoch_resume_of_a_finite_mixture_is_refused_where_the_trainer_would_differ(
        tmp_path: Any) -> None:  # fmt: skip
    # The Trainer counts a resumed epoch from its start: with an accumulation that does not
    # divide the epoch its last, partial step was dropped; a MixedDataset as train_dataset
    # started the next epoch at the restored position.
    def finite() -> MixedDataset:
        return make(stop_strategy="first_exhausted")

    per_epoch = len(mixtape.get_loader(finite(), B))
    ga = next(g for g in (2, 3, 4, 5) if per_epoch % g)

    def loader_trainer(out: Any) -> Any:
        m, _ = model()
        args = targs(out, 3 * per_epoch, gradient_accumulation_steps=ga, save_strategy="steps",
                     save_steps=2)  # fmt: skip
        return MixtapeTrainer(model=m, args=args, train_loader=mixtape.get_loader(finite(), B),
                              callbacks=[_StopAt(2)])  # fmt: skip

    loader_trainer(tmp_path / "l").train()
    with pytest.raises(ValueError, match=f"not a multiple of gradient_accumulation_steps={ga}"):
        loader_trainer(tmp_path / "l").train(resume_from_checkpoint=True)
    stop = finite().stop_position()
    assert stop is not None
    train_dataset_run(tmp_path / "d", finite(), 2, 0, save_strategy="steps", save_steps=2)
    with pytest.raises(ValueError, match="with training going past the epoch"):
        train_dataset_run(tmp_path / "d", finite(), stop // B + 2, 2,
                          resume=str(tmp_path / "d" / "checkpoint-2"))
