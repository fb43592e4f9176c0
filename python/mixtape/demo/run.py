"""``mixtape demo``: train a tiny GPT-2 on CPU from a scheduled, packed mixture, then prove resume.

The pipeline is the one a user runs: the data config (``configs/demo.yaml``, read with
:func:`mixtape.load_data_config`) gives the mixture, its weight schedule, packing and loader
options; the demo supplies the embedded sources (:mod:`mixtape.demo.data`), tokenized by a
tokenizer trained on the spot, in place of the config's ``embedded:<name>`` paths. Batches come
from :func:`mixtape.get_loader` (packed rows, block-diagonal sdpa mask, per-token ``source_ids``).

The weight schedule counts optimizer steps. A packed step holds a varying number of documents,
so the schedule is applied with ``loader.update_weights`` (which lands at an exact batch index,
``horizon`` batches after it is asked for) rather than through the mixer's document positions;
the weights recorded per step are the ones in force, not the ones intended.

Resume check: at step ``S`` the model, optimizer, LR schedule, RNG and ``loader.state_dict()``
are saved; the run continues to ``S + K``; then a fresh Python process loads the checkpoint,
resumes (with another worker count) and runs the same ``K`` steps: the losses must be equal bit
for bit.

Influence (on by default: the config's ``influence:`` section; ``--no-influence`` runs the
schedule alone): an :class:`~mixtape.influence.InfluenceTracker` (DataInf on the last transformer
block) scores every source against a held-out probe (the last ``PROBE_DOCS`` documents of the
section's ``probe`` source, removed from it before training) at steps ``warmup + k * interval``
and sends its weights with ``loader.update_weights`` (landing ``horizon`` batches later). The
schedule drives the weights until the tracker's first update lands, the tracker from then on.
The section's step numbers, like the schedule's, count steps of the default 300-step run;
``--influence-interval`` / ``--influence-warmup`` override them as given. The tracker's state
goes into the checkpoint, so the resume check covers it (history included).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DemoOptions", "ScheduleDriver", "main", "run_demo"]

DEFAULT_STEPS = 300  # the default run length, which the demo config's schedule step numbers count
EMBEDDED = "embedded:"
_CONFIG_NAME = "demo.yaml"
PROBE_SOURCE = "prose"  # the default probe: this source's last PROBE_DOCS documents
PROBE_DOCS = 32


def default_config_path() -> Path:
    """``configs/demo.yaml`` of a source checkout, else the copy installed with the package."""
    here = Path(__file__).resolve()
    checkout = here.parents[3] / "configs" / _CONFIG_NAME
    return checkout if checkout.is_file() else here.with_name(_CONFIG_NAME)


@dataclass
class DemoOptions:
    """What ``mixtape demo`` runs; ``None`` fields come from the data config."""

    steps: int = DEFAULT_STEPS
    workers: int | None = None
    config: str | None = None
    out: str = "mixtape-demo"
    seed: int | None = None
    batch_size: int | None = None
    max_length: int | None = None
    threads: int | None = None
    lr: float = 3e-3
    warmup: int = 20
    vocab_size: int = 2048
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    tokenizer_sample: int = 2000
    arithmetic_docs: int = 5000
    checkpoint_step: int | None = None  # S: default steps // 2
    resume_steps: int | None = None  # K: default min(20, steps - S)
    resume_check: bool = True
    progress: bool = True
    quick: bool = False
    influence: bool | None = None  # None: the config's influence.enabled
    influence_interval: int | None = None  # None: the config's (scaled by steps / 300)
    influence_warmup: int | None = None

    def finished(self) -> DemoOptions:
        """A copy with the ``--quick`` sizes applied (where not given) and S, K chosen."""
        o = dataclasses.replace(self)
        if o.quick:
            o.batch_size = o.batch_size or 4
            o.max_length = o.max_length or 64
            o.vocab_size, o.tokenizer_sample, o.arithmetic_docs = 512, 200, 2000
            o.warmup = min(o.warmup, 4)
        if o.steps < 2:
            raise ValueError(f"--steps must be >= 2 (a checkpoint step and one after it), "
                             f"got {o.steps}")  # fmt: skip
        if o.checkpoint_step is None:
            o.checkpoint_step = o.steps // 2
        if not 0 < o.checkpoint_step < o.steps:
            raise ValueError(f"--checkpoint-step must be in [1, steps={o.steps}), "
                             f"got {o.checkpoint_step}")  # fmt: skip
        if o.resume_steps is None:
            o.resume_steps = min(20, o.steps - o.checkpoint_step)
        if not 0 < o.resume_steps <= o.steps - o.checkpoint_step:
            raise ValueError(f"--resume-steps must be in [1, {o.steps - o.checkpoint_step}] "
                             f"(steps after the checkpoint), got {o.resume_steps}")  # fmt: skip
        if o.threads is None:
            o.threads = default_threads(o.workers)
        if (o.influence_interval is not None and o.influence_interval < 1) or \
                (o.influence_warmup is not None and o.influence_warmup < 0):  # fmt: skip
            raise ValueError(f"--influence-interval must be >= 1 and --influence-warmup >= 0, "
                             f"got {o.influence_interval} and {o.influence_warmup}")  # fmt: skip
        return o


def resolve_influence(opts: DemoOptions, cfg: Any) -> DemoOptions:
    """``opts`` with the tracker settings decided: on unless the config has no enabled
    ``influence:`` section or ``--no-influence``; interval and warmup from the command line, else
    the section's scaled by ``steps / DEFAULT_STEPS`` (interval at least 1)."""
    section = cfg.influence
    on = (section is not None and section.enabled) if opts.influence is None else opts.influence
    if not on:
        return dataclasses.replace(opts, influence=False)
    scale = opts.steps / DEFAULT_STEPS
    interval, warmup = opts.influence_interval, opts.influence_warmup
    if interval is None:
        interval = max(1, round((100 if section is None else section.update_interval) * scale))
    if warmup is None:
        warmup = round((0 if section is None else section.warmup_steps) * scale)
    return dataclasses.replace(opts, influence=True, influence_interval=interval,
                               influence_warmup=warmup)  # fmt: skip


def probe_source(cfg: Any) -> str:
    """The source the probe documents are held out of: the config's ``influence.probe`` (a
    source name), else ``PROBE_SOURCE``."""
    section = cfg.influence
    name = PROBE_SOURCE if section is None or section.probe is None else str(section.probe)
    names = [s.name for s in cfg.mixture.sources]
    if name not in names:
        raise ValueError(f"influence.probe is {name!r}: the demo holds the probe out of one of "
                         f"its sources, {names}")  # fmt: skip
    return name


def default_threads(workers: int | None) -> int:
    """Torch threads: the CPUs left after the loader's workers (at least one each), 1 to 8.

    On 2 CPUs this is 1. Measured on this project's shared 2-core machine: with other jobs
    running (load ~9) a second OpenMP thread made steps ~10x slower (0.37 s -> 3.8 s); on a
    quieter machine (load ~2.5) ``--threads 2`` gave 16.1k tokens/s against 9.7k with 1.
    """
    return max(1, min(8, _usable_cpus() - max(1, workers or 0)))


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# Config and data
# --------------------------------------------------------------------------------------------


def _auto_horizon(loader: Any, workers: int) -> int:
    """The loader's automatic horizon (batches in flight + 1) with ``workers`` workers."""
    return int(dataclasses.replace(
        loader, num_workers=workers, horizon=None, persistent_workers=None,
        prefetch_factor=loader.prefetch_factor if workers else None,
        batches_per_task=loader.batches_per_task if workers else None).resolved().horizon)


def load_config(opts: DemoOptions) -> Any:
    """The data config with the command line's overrides (seed, workers, batch size, length)."""
    from mixtape.config import load_data_config

    cfg = load_data_config(opts.config or default_config_path())
    loader, packing = cfg.loader, cfg.packing
    if packing is None:
        raise ValueError("the demo trains on packed rows: the config needs a packing section")
    if opts.seed is not None:
        loader = dataclasses.replace(loader, seed=opts.seed)
    if opts.workers is not None:
        persistent = loader.persistent_workers if opts.workers else None
        prefetch = loader.prefetch_factor if opts.workers else None
        per_task = loader.batches_per_task if opts.workers else None
        loader = dataclasses.replace(loader, num_workers=opts.workers, horizon=None,
                                     persistent_workers=persistent, prefetch_factor=prefetch,
                                     batches_per_task=per_task)  # fmt: skip
    if loader.horizon is None:
        # The resume check continues in a fresh process with another worker count (1 if this
        # run has none, else 0); weight updates land at b + horizon, so both processes must use
        # one horizon, enough for what either worker count can have in flight.
        loader = dataclasses.replace(loader, horizon=max(
            _auto_horizon(loader, loader.num_workers),
            _auto_horizon(loader, 0 if loader.num_workers else 1)))  # fmt: skip
    if opts.batch_size is not None:
        loader = dataclasses.replace(loader, batch_size=opts.batch_size)
    if opts.max_length is not None:
        packing = dataclasses.replace(packing, max_length=opts.max_length)
        if loader.max_length is not None:
            loader = dataclasses.replace(loader, max_length=opts.max_length)
    return dataclasses.replace(cfg, loader=loader, packing=packing)


def embedded_sources(cfg: Any, datasets: Mapping[str, Any]) -> Any:
    """``cfg`` with each ``embedded:<name>`` source replaced by the in-memory dataset."""
    sources = []
    for i, s in enumerate(cfg.mixture.sources):
        name = s.path[len(EMBEDDED):] if isinstance(s.path, str) else None
        if name is None or not s.path.startswith(EMBEDDED) or name not in datasets:
            raise ValueError(f"mixture.sources[{i}] ({s.name!r}) has path {s.path!r}: the demo "
                             f"reads only its embedded sources, "
                             f"{[EMBEDDED + n for n in datasets]}")  # fmt: skip
        sources.append(dataclasses.replace(s, path=None, data_files=None, dataset=datasets[name]))
    return dataclasses.replace(cfg, mixture=dataclasses.replace(cfg.mixture, sources=sources))


def build_loader(cfg: Any, datasets: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """(mixed dataset, loader, weight schedule or None) from the config and the datasets."""
    import mixtape

    full = embedded_sources(cfg, datasets)
    kw = full.build_mixture()
    schedule = kw.pop("schedule")
    if schedule is not None:  # driven per optimizer step by ScheduleDriver
        kw["weights"] = schedule.get_weights(0)
    mixed = mixtape.MixedDataset(**kw)
    lc = full.resolved().loader
    assert full.packing is not None
    options: dict[str, Any] = {
        "packing": lc.packing, "max_length": lc.max_length, "collate_fn": lc.collate_fn,
        "collate_kwargs": dict(lc.collate_kwargs), "num_workers": lc.num_workers,
        "seed": lc.seed, "shuffle": lc.shuffle, "drop_last": lc.drop_last,
        "horizon": lc.horizon, "overflow": full.packing.overflow,
        "column": full.packing.column,
    }  # fmt: skip
    if lc.num_workers:
        options.update(prefetch_factor=lc.prefetch_factor,
                       persistent_workers=lc.persistent_workers)
    loader = mixtape.get_loader(mixed, lc.batch_size, **options)
    return mixed, loader, schedule


def make_datasets(opts: DemoOptions, max_length: int, seed: int,
                  timings: dict[str, float]) -> tuple[dict[str, Any], Any]:  # fmt: skip
    """The tokenized embedded corpora (documents cut to ``max_length``) and their tokenizer."""
    from mixtape.demo.data import demo_corpora, tokenize_corpora, train_tokenizer

    t = time.perf_counter()
    corpora = demo_corpora(seed=seed, arithmetic_docs=opts.arithmetic_docs)
    timings["corpora_s"] = time.perf_counter() - t
    t = time.perf_counter()
    tok = train_tokenizer(corpora, vocab_size=opts.vocab_size,
                          sample_per_source=opts.tokenizer_sample, seed=seed)  # fmt: skip
    timings["tokenizer_s"] = time.perf_counter() - t
    t = time.perf_counter()
    datasets = tokenize_corpora(corpora, tok, max_tokens=max_length)
    timings["tokenize_s"] = time.perf_counter() - t
    return datasets, tok


def split_probe(datasets: Mapping[str, Any], source: str = PROBE_SOURCE
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:  # fmt: skip
    """(datasets with the probe documents removed, the probe): the last ``PROBE_DOCS``
    documents of ``source``, never trained on."""
    if source not in datasets:
        raise ValueError(f"influence: the probe source {source!r} is not among the "
                         f"demo's sources {sorted(datasets)}")  # fmt: skip
    src = datasets[source]
    n = len(src)
    if n <= 2 * PROBE_DOCS:
        raise ValueError(f"influence: source {source!r} has {n} documents, too few to "
                         f"hold {PROBE_DOCS} out as the probe")  # fmt: skip
    probe = [{"input_ids": list(r)} for r in src.select(range(n - PROBE_DOCS, n))["input_ids"]]
    out = dict(datasets)
    out[source] = src.select(range(n - PROBE_DOCS))
    return out, probe


def make_tracker(opts: DemoOptions, cfg: Any, loader: Any, model: Any, probe: Sequence[Any],
                 max_length: int) -> Any:  # fmt: skip
    """The tracker: the config's ``influence:`` section (resolved: seed and batch size
    inherited) with the demo's interval and warmup, the held-out probe, the last transformer
    block (when the section names no parameters), documents cut to ``max_length``."""
    from mixtape.config import InfluenceSection
    from mixtape.influence import InfluenceConfig, InfluenceTracker

    section = cfg.resolved().influence
    if section is None:  # --influence over a config without the section: its defaults
        section = InfluenceSection(probe=probe_source(cfg))
        loader_cfg = cfg.resolved().loader
        section = dataclasses.replace(section, seed=int(loader_cfg.seed),
                                      batch_size=int(loader_cfg.batch_size))
    extra: dict[str, Any] = {} if section.params is not None else {"last_k_blocks": 1}
    config = InfluenceConfig.from_section(
        section, enabled=True, update_interval=opts.influence_interval,
        warmup_steps=opts.influence_warmup, probe=None, max_length=max_length, **extra)
    return InfluenceTracker(config, loader, model, probe=list(probe))


# --------------------------------------------------------------------------------------------
# The weight schedule, per optimizer step
# --------------------------------------------------------------------------------------------


class ScheduleDriver:
    """Applies a :class:`~mixtape.WeightScheduler` over optimizer steps to a packing loader.

    Each timeline entry ``(s, weights)`` is sent with ``loader.update_weights`` once the trainer
    has received batch ``s - horizon``, so it lands at batch ``s`` exactly; an entry earlier than
    the horizon allows lands late, and :attr:`in_force` records where each one really landed.
    """

    def __init__(self, schedule: Any, loader: Any, steps: int, scale: float, every: int) -> None:
        self.names = list(loader.source_names)
        self.loader = loader
        self.entries: list[tuple[int, list[float]]] = []
        if schedule is not None:
            for s, w in _scaled_timeline(schedule, steps, scale, every):
                self.entries.append((s, [w[n] for n in self.names]))
            self.in_force = [(0, self.entries[0][1])]
        else:
            w = loader.mixed.weights
            total = sum(w.values())
            self.in_force = [(0, [w[n] / total for n in self.names])]
        self.next = 1  # entries[0] is the starting mixture

    def record(self, effect: int, weights: Sequence[float]) -> None:
        """Note an update sent by someone else (the influence tracker) landing at ``effect``;
        the schedule sends nothing after it (the tracker has taken over)."""
        self.next = len(self.entries)
        w = [float(x) for x in weights]
        if self.in_force[-1][0] == effect:
            self.in_force[-1] = (effect, w)
        else:
            self.in_force.append((effect, w))

    def after_batch(self) -> None:
        """Send the entries due now (call right after each batch is received)."""
        horizon, consumed = self.loader.horizon, self.loader.batches_consumed
        while self.next < len(self.entries) and self.entries[self.next][0] <= consumed - 1 + \
                horizon:  # fmt: skip
            _, w = self.entries[self.next]
            effect = int(self.loader.update_weights(w))
            if self.in_force[-1][0] == effect:
                self.in_force[-1] = (effect, w)  # several due at once: the last one holds
            else:
                self.in_force.append((effect, w))
            self.next += 1

    def weights_at(self, step: int) -> list[float]:
        """The weights in force at ``step`` (by where the updates really landed)."""
        current = self.in_force[0][1]
        for effect, w in self.in_force:
            if effect > step:
                break
            current = w
        return current

    def state_dict(self) -> dict[str, Any]:
        return {"next": self.next, "in_force": [[e, list(w)] for e, w in self.in_force]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.next = int(state["next"])
        self.in_force = [(int(e), [float(x) for x in w]) for e, w in state["in_force"]]


def _loss_str(x: float | None) -> str:
    """A window's loss, or "n/a" when the source trained no token there."""
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"


def _json_safe(x: Any) -> Any:
    """``x`` with NaN / inf floats as None: report.json stays standard JSON (no NaN tokens)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _scaled_timeline(schedule: Any, steps: int, scale: float,
                     every: int) -> list[tuple[int, dict[str, float]]]:  # fmt: skip
    """The schedule's piecewise-constant entries over ``[0, steps)``, its step numbers scaled."""
    from mixtape.schedule import WeightSchedulePoint, WeightScheduler

    if scale != 1.0:
        points, last = [], -1
        for p in schedule.points:
            s = max(round(p.step * scale), last + 1)
            points.append(WeightSchedulePoint(s, p.weights))
            last = s
        schedule = WeightScheduler(points, schedule.interpolation)
    return list(schedule.timeline(0, steps, every=every))


# --------------------------------------------------------------------------------------------
# Model and training step
# --------------------------------------------------------------------------------------------


def build_model(opts: DemoOptions, vocab_size: int, max_length: int, seed: int) -> Any:
    """A tiny GPT-2 (sdpa attention) initialised from ``seed``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=max_length, n_embd=opts.n_embd,
                        n_layer=opts.n_layer, n_head=opts.n_head, bos_token_id=0,
                        eos_token_id=0)  # fmt: skip
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config)


def token_losses(model: Any, batch: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """(per-token loss, valid mask, source id) of the predicted tokens, shapes [B, L - 1].

    Token ``t + 1`` is predicted from ``t``; the packed collator's labels are -100 on every
    document's first token and on padding, so no prediction crosses a document boundary.
    """
    import torch
    import torch.nn.functional as F

    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                attention_mask=batch["attention_mask"])  # fmt: skip
    logits = out.logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=-100, reduction="none").view_as(target)  # fmt: skip
    valid = target != -100
    return loss, valid, batch["source_ids"][:, 1:].to(torch.int64)


@dataclass
class StepStats:
    """What one optimizer step recorded."""

    loss: float
    source_loss_sum: list[float]
    source_loss_tokens: list[int]
    source_tokens: list[int]  # input tokens per source (padding excluded)
    source_docs: list[int]  # documents (pieces) starting in the batch, per source
    wait_s: float
    compute_s: float


def train_step(model: Any, optimizer: Any, lr_schedule: Any, batch: Mapping[str, Any],
               num_sources: int, wait_s: float) -> StepStats:  # fmt: skip
    """One optimizer step on a packed batch; the loss is the mean over predicted tokens."""
    import torch

    t = time.perf_counter()
    loss_tok, valid, src = token_losses(model, batch)
    n = valid.sum()
    loss = (loss_tok * valid).sum() / n.clamp(min=1)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    lr_schedule.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        v_src, v_loss = src[valid], loss_tok.detach()[valid]
        lsum = torch.bincount(v_src, weights=v_loss.double(), minlength=num_sources)
        lcnt = torch.bincount(v_src, minlength=num_sources)
        sid = batch["source_ids"]
        real = sid >= 0
        toks = torch.bincount(sid[real], minlength=num_sources)
        starts = real & (batch["position_ids"] == 0)
        docs = torch.bincount(sid[starts], minlength=num_sources)
    compute = time.perf_counter() - t
    return StepStats(float(loss.item()), lsum.tolist(), lcnt.tolist(), toks.tolist(),
                     docs.tolist(), wait_s, compute)  # fmt: skip


def make_optimizer(model: Any, opts: DemoOptions) -> tuple[Any, Any]:
    """AdamW with linear warmup then cosine decay to 10% over ``opts.steps``."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=0.01)
    warm, total = max(1, opts.warmup), opts.steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def packed_mask_check(model: Any, max_length: int, seed: int) -> float:
    """Max |loss difference| per token between documents packed in one row (4-D sdpa mask,
    restarting position_ids) and the same documents run alone: 0 up to float rounding when the
    mask keeps documents apart."""
    import torch

    import mixtape

    gen = np.random.default_rng(seed)
    vocab = int(model.config.vocab_size)
    cap = min(max_length, 48)
    lengths = [cap // 2, cap // 3, cap - cap // 2 - cap // 3]
    docs = [gen.integers(1, vocab, size=n).tolist() for n in lengths]
    collate = mixtape.create_packed_collate(pad_token_id=0, attention="sdpa")
    row = {"input_ids": [t for d in docs for t in d], "seq_lengths": lengths,
           "doc_source_ids": [0, 1, 2]}  # fmt: skip
    batch = collate([row])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed, valid, _ = token_losses(model, batch)
            worst = 0.0
            start = 0
            for d in docs:
                ids = torch.tensor([d])
                alone = model(input_ids=ids).logits[:, :-1].float()
                ref = torch.nn.functional.cross_entropy(alone[0], ids[0, 1:], reduction="none")
                got = packed[0, start: start + len(d) - 1]
                if not bool(valid[0, start: start + len(d) - 1].all()):
                    raise AssertionError("a document's own tokens were masked out of the loss")
                worst = max(worst, float((got - ref).abs().max()))
                start += len(d)
    finally:
        model.train(was_training)
    return worst


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class Trainer:
    """Model, optimizer, loader and schedule of one process, and the step records."""

    opts: DemoOptions
    model: Any
    optimizer: Any
    lr_schedule: Any
    loader: Any
    driver: ScheduleDriver
    tracker: Any = None  # the InfluenceTracker (None: the schedule alone)
    step: int = 0
    records: list[StepStats] = field(default_factory=list)
    influence_s: float = 0.0  # time inside the tracker (on_train_begin + on_step_end)
    influence_update_s: list[float] = field(default_factory=list)  # each update's time
    _tracker_started: bool = False

    def _influence(self, step: int | None, loss: float | None) -> None:
        """Run the tracker in eval mode (no dropout: scores are deterministic and the dropout
        RNG stream is the same with or without it); record where its update lands."""
        t = time.perf_counter()
        upd = None
        self.model.eval()
        try:
            if step is None:
                self.tracker.on_train_begin()
                self._tracker_started = True
            else:
                if not self.tracker.history and self.tracker.is_update_step(step):
                    # Taking over from the schedule: step from the weights it set last, not
                    # from the starting mixture the tracker saw when training began.
                    self.tracker.weights = dict(zip(self.driver.names,
                                                    self.driver.in_force[-1][1], strict=True))
                upd = self.tracker.on_step_end(step, loss)
                if upd is not None:
                    h = self.tracker.history[-1]
                    self.driver.record(int(h["applied_at"]),
                                       [h["weights"][n] for n in self.driver.names])
        finally:
            self.model.train()
            spent = time.perf_counter() - t
            self.influence_s += spent
            if upd is not None:
                self.influence_update_s.append(spent)

    def batches(self) -> Iterator[tuple[Any, float]]:
        """(batch, seconds waited for it), sending due weight updates after each."""
        it = iter(self.loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            wait = time.perf_counter() - t
            self.driver.after_batch()
            yield batch, wait

    def train(self, until: int, progress: Any = None, on_step: Any = None) -> None:
        """Train to step ``until`` (``on_step(trainer)`` is called after every step)."""
        n = len(self.loader.source_names)
        if self.step >= until:
            return
        if self.tracker is not None and not self._tracker_started:
            self._influence(None, None)
        for batch, wait in self.batches():
            rec = train_step(self.model, self.optimizer, self.lr_schedule, batch, n, wait)
            self.records.append(rec)
            self.step += 1
            if self.tracker is not None and self.step < self.opts.steps:
                self._influence(self.step, rec.loss)  # (an update after the last step: unused)
            if progress is not None:
                tokens = sum(rec.source_tokens)
                progress.update(1)
                progress.set_postfix(loss=f"{rec.loss:.3f}",
                                     tok_s=f"{tokens / (rec.wait_s + rec.compute_s):,.0f}")
            if on_step is not None:
                on_step(self)
            if self.step >= until:
                return
        raise RuntimeError(f"the loader ended at step {self.step}, before step {until}")

    def state_dict(self) -> dict[str, Any]:
        import torch

        return {"step": self.step, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "lr_schedule": self.lr_schedule.state_dict(),
                "rng": torch.get_rng_state(), "loader": self.loader.state_dict(),
                "driver": self.driver.state_dict(),
                "tracker": None if self.tracker is None else self.tracker.state_dict()}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        import torch

        self.step = int(state["step"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        torch.set_rng_state(state["rng"])
        self.loader.load_state_dict(state["loader"])
        self.driver.load_state_dict(state["driver"])
        if self.tracker is not None:
            if state.get("tracker") is None:
                raise ValueError("influence resume: the checkpoint has no tracker state")
            self.tracker.load_state_dict(state["tracker"])
            self._tracker_started = False  # on_train_begin again, from the restored state


def make_trainer(opts: DemoOptions, cfg: Any, datasets: Mapping[str, Any],
                 vocab_size: int, probe: Sequence[Any] | None = None) -> Trainer:  # fmt: skip
    """A trainer at step 0 (model initialised from the loader's seed); with ``opts.influence``
    the tracker (scoring against ``probe``) takes the weights over from the schedule at its
    first update."""
    _, loader, schedule = build_loader(cfg, datasets)
    lc = cfg.resolved().loader
    model = build_model(opts, vocab_size, int(lc.max_length), int(lc.seed))
    model.train()
    optimizer, lr_schedule = make_optimizer(model, opts)
    scale = opts.steps / DEFAULT_STEPS
    every = max(1, round(10 * scale))
    tracker = None
    if opts.influence:
        if probe is None:
            raise ValueError("the influence tracker needs the held-out probe")
        tracker = make_tracker(opts, cfg, loader, model, probe, int(lc.max_length))
    driver = ScheduleDriver(schedule, loader, opts.steps, scale, every)
    return Trainer(opts, model, optimizer, lr_schedule, loader, driver, tracker)


def _save_checkpoint(trainer: Trainer, cfg: Any, datasets: Mapping[str, Any], tokenizer: Any,
                     path: Path, probe: Sequence[Any] | None = None) -> None:  # fmt: skip
    """Everything a fresh process needs to continue: states, data, config, tokenizer, options."""
    import torch

    from mixtape.config import dump_data_config

    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    torch.save(trainer.state_dict(), path / "state.pt")
    # Weight updates (schedule, tracker) land at b + horizon, and the default horizon depends on
    # the worker count: the resumed process (other worker count) must use this run's horizon.
    cfg = dataclasses.replace(cfg, loader=dataclasses.replace(
        cfg.loader, horizon=int(trainer.loader.horizon)))  # fmt: skip
    dump_data_config(cfg, path / "config.yaml")
    tokenizer.save(str(path / "tokenizer.json"))
    from datasets.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # not over the training bar
    try:
        for name, ds in datasets.items():
            ds.save_to_disk(str(path / "data" / name))
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    (path / "options.json").write_text(json.dumps(dataclasses.asdict(trainer.opts), indent=1))
    if probe is not None:
        (path / "probe.json").write_text(json.dumps([list(map(int, p["input_ids"]))
                                                     for p in probe]))  # fmt: skip


def resume_main(ckpt: Path, steps: int, workers: int, out: Path) -> int:
    """The fresh process of the resume check: load ``ckpt``, train ``steps`` steps, write the
    losses (and the step they start at) to ``out`` as JSON."""
    import datasets as hf
    import torch
    from tokenizers import Tokenizer

    from mixtape.config import load_data_config

    opts = DemoOptions(**json.loads((ckpt / "options.json").read_text()))
    torch.set_num_threads(int(opts.threads or 1))
    cfg = load_data_config(ckpt / "config.yaml")
    cfg = dataclasses.replace(cfg, loader=dataclasses.replace(
        cfg.loader, num_workers=workers, horizon=cfg.loader.horizon,
        persistent_workers=True if workers else None,
        prefetch_factor=cfg.loader.prefetch_factor if workers else None,
        batches_per_task=cfg.loader.batches_per_task if workers else None))  # fmt: skip
    names = [str(s.path).removeprefix(EMBEDDED) for s in cfg.mixture.sources]
    data = {n: hf.load_from_disk(str(ckpt / "data" / n)) for n in names}
    vocab = Tokenizer.from_file(str(ckpt / "tokenizer.json")).get_vocab_size()
    probe = None
    if opts.influence:
        probe = [{"input_ids": ids} for ids in json.loads((ckpt / "probe.json").read_text())]
    trainer = make_trainer(opts, cfg, data, vocab, probe)
    state = torch.load(ckpt / "state.pt", weights_only=False)
    trainer.load_state_dict(state)
    start = trainer.step
    trainer.train(start + steps)
    history = None if trainer.tracker is None else trainer.tracker.history
    out.write_text(json.dumps({"start": start, "losses": [r.loss for r in trainer.records],
                               "workers": workers, "influence_history": history}))  # fmt: skip
    return 0


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    """Run the demo; returns the report (also written to ``<out>/report.json``)."""
    import torch
    from tqdm.auto import tqdm

    from mixtape.demo.report import build_report, write_plot

    t0 = time.perf_counter()
    opts = opts.finished()
    assert opts.threads is not None and opts.checkpoint_step is not None
    assert opts.resume_steps is not None
    torch.set_num_threads(opts.threads)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(opts)
    opts = resolve_influence(opts, cfg)
    lc = cfg.resolved().loader
    seed, max_length = int(lc.seed), int(lc.max_length)
    timings: dict[str, float] = {}
    datasets, tokenizer = make_datasets(opts, max_length, seed, timings)
    probe = None
    if opts.influence:
        datasets, probe = split_probe(datasets, probe_source(cfg))
    t = time.perf_counter()
    trainer = make_trainer(opts, cfg, datasets, tokenizer.get_vocab_size(), probe)
    mask_diff = packed_mask_check(trainer.model, max_length, seed)
    torch.manual_seed(seed)  # the dropout stream starts from the seed whatever ran before
    timings["setup_s"] = time.perf_counter() - t
    names = list(trainer.loader.source_names)
    print(f"mixtape demo: {opts.steps} steps of {lc.batch_size} x {max_length} packed tokens, "
          f"sources {names}, {lc.num_workers} loader worker(s), {opts.threads} torch thread(s)")
    print(f"packed sdpa mask: per-document loss max |diff| = {mask_diff:.2e}")
    if trainer.tracker is not None:
        c = trainer.tracker.config
        print(f"influence tracker: {c.method} on {len(trainer.tracker.params)} parameter "
              f"tensors ({trainer.tracker.backend} per-sample gradients), {c.samples_per_source} "
              f"documents per source against {PROBE_DOCS} held-out {probe_source(cfg)!r} "
              f"documents, at steps {c.warmup_steps} + k x {c.update_interval}; the schedule "
              f"drives the weights until its first update lands")  # fmt: skip
    else:
        print("influence tracker: off (the weight schedule alone)")
    ckpt = out / "checkpoint"

    def on_step(tr: Trainer) -> None:
        if tr.step == opts.checkpoint_step:
            _save_checkpoint(tr, cfg, datasets, tokenizer, ckpt, probe)

    t = time.perf_counter()
    bar = tqdm(total=opts.steps, desc="train", unit="step", disable=not opts.progress,
               mininterval=0.5, dynamic_ncols=True)  # fmt: skip
    try:
        trainer.train(opts.steps, progress=bar, on_step=on_step)
    finally:
        bar.close()
    timings["train_s"] = time.perf_counter() - t
    if trainer.tracker is not None:
        timings["influence_s"] = trainer.influence_s
        print(f"influence tracker: {len(trainer.tracker.history)} update(s), overhead "
              f"{trainer.influence_s:.1f} s = {trainer.influence_s / timings['train_s']:.1%} of "
              f"training time (time inside the tracker / training loop)")
        ups = trainer.influence_update_s
        if ups:
            steady = trainer.records[1:] or trainer.records
            step_s = sum(r.wait_s + r.compute_s for r in steady) / len(steady)
            interval = trainer.tracker.config.update_interval
            mean = sum(ups) / len(ups)
            print(f"  per update {mean:.2f} s = {mean / (mean + interval * step_s):.1%} of "
                  f"the time from one update to the next ({interval} steps of "
                  f"{step_s * 1e3:.0f} ms + the update)")

    resume: dict[str, Any] = {"checked": False}
    if opts.resume_check:
        t = time.perf_counter()
        resume = check_resume(ckpt, opts, trainer, lc.num_workers)
        timings["resume_check_s"] = time.perf_counter() - t
        print(f"resume from step {resume['start']} in a fresh process "
              f"({resume['workers']} worker(s)), {resume['steps']} steps: "
              f"{'PASS' if resume['passed'] else 'FAIL'} ({resume['detail']})")
    timings["total_s"] = time.perf_counter() - t0
    report = build_report(opts, cfg, trainer, names, timings, mask_diff, resume)
    (out / "report.json").write_text(json.dumps(_json_safe(report), indent=1, allow_nan=False))
    write_plot(report, out / "demo.png")
    print_summary(report, out)
    return report


def check_resume(ckpt: Path, opts: DemoOptions, trainer: Trainer, workers: int) -> dict[str, Any]:
    """Resume ``ckpt`` in a fresh process (another worker count) and compare the losses."""
    assert opts.checkpoint_step is not None and opts.resume_steps is not None
    s, k = opts.checkpoint_step, opts.resume_steps
    other = 0 if workers else 1
    result = ckpt / "resumed_losses.json"
    cmd = [sys.executable, "-m", "mixtape.demo.run", "--resume-from", str(ckpt),
           "--resume-steps", str(k), "--resume-workers", str(other), "--resume-out", str(result)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    expected = [r.loss for r in trainer.records[s: s + k]]
    base = {"checked": True, "start": s, "steps": k, "workers": other, "passed": False,
            "expected": expected}  # fmt: skip
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {**base, "detail": "the resumed process failed: " + " | ".join(tail)}
    got = json.loads(result.read_text())
    losses = [float(x) for x in got["losses"]]
    base["resumed"] = losses
    if got["start"] != s:
        return {**base, "detail": f"resumed at step {got['start']}, expected {s}"}
    diff = [i for i, (a, b) in enumerate(zip(expected, losses, strict=True)) if a != b]
    if diff:
        i = diff[0]
        return {**base, "detail": f"{len(diff)} of {k} losses differ, first at step {s + i}: "
                                  f"{expected[i].hex()} vs {losses[i].hex()}"}  # fmt: skip
    if trainer.tracker is not None:
        # The tracker's updates up to S + K (restored history, then the ones made after resume).
        want = [h for h in trainer.tracker.history if h["step"] <= s + k]
        have = got.get("influence_history")
        if have != json.loads(json.dumps(want)):
            return {**base, "detail": "the resumed influence tracker's weight history differs "
                                      "from the uninterrupted run's"}  # fmt: skip
        return {**base, "passed": True, "detail": f"{k} losses identical bit for bit, and the "
                f"tracker's {len(want)} update(s) to step {s + k}"}  # fmt: skip
    return {**base, "passed": True, "detail": f"{k} losses identical bit for bit"}


def print_summary(report: Mapping[str, Any], out: Path) -> None:
    """The numbers a reader looks for, after the progress bar."""
    sp = report["speed"]
    print(f"throughput: {sp['tokens_per_s']:,.0f} tokens/s (padding excluded; "
          f"{sp['padding_fraction']:.1%} padding), loader share of step time "
          f"{sp['loader_share']:.1%} (first batch {sp['first_batch_wait_s']:.2f} s)")
    names = report["sources"]
    print("mixture (documents: realised vs weights in force; tokens: share of trained tokens):")
    for win in (report["mixture"]["windows"][0], report["mixture"]["windows"][-1]):
        print(f"  steps {win['start']:>4}-{win['end'] - 1:<4} " + "  ".join(
            f"{n} {w:.2f}/{d:.2f}/{t:.2f}" for n, w, d, t in
            zip(names, win["weights"], win["doc_share"], win["token_share"], strict=True)))
    print("  (weight / realised document share / token share)")
    loss = report["loss"]
    print("loss, first -> last 10 steps: " + f"all {loss['first10']:.3f} -> {loss['last10']:.3f}; "
          + ", ".join(f"{n} {_loss_str(a)} -> {_loss_str(b)}" for n, a, b in
                      zip(names, loss["source_first10"], loss["source_last10"], strict=True)))
    print(f"wall time {report['timings']['total_s']:.1f} s; report {out / 'report.json'}, "
          f"plot {out / 'demo.png'}")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mixtape demo",
        description="Train a tiny GPT-2 (2 layers, 128 wide) on CPU for a few hundred steps from "
        "a packed mixture of three embedded sources (Python code, reference prose, arithmetic; "
        "nothing is downloaded) whose weights change mid-run, then resume from a mid-run "
        "checkpoint in a fresh process and check the losses match bit for bit. Prints tokens/s, "
        "the loader's share of step time, realised mixture vs weights and per-source loss; "
        "writes report.json and demo.png to the output folder.")  # fmt: skip
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"optimizer steps (default {DEFAULT_STEPS}; the config's schedule step "
                        f"numbers are scaled by steps / {DEFAULT_STEPS})")  # fmt: skip
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes (default: the config's loader.num_workers)")
    p.add_argument("--config", default=None,
                   help=f"data config YAML (default: {default_config_path()})")
    p.add_argument("--out", default="mixtape-demo",
                   help="output folder for report.json, demo.png, checkpoint/")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the mixture, loader and model (default: the config's "
                        "loader.seed); the same seed gives the same losses")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=None,
                   help="packed rows per step (default: the config's loader.batch_size)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per packed row (default: the config's packing.max_length)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: usable CPUs minus loader workers, at least 1; "
                        "on an idle 2-core machine --threads 2 is faster)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--checkpoint-step", type=int, default=None,
                   help="step S of the resume checkpoint (default: steps // 2)")
    p.add_argument("--resume-steps", type=int, default=None,
                   help="steps K compared after resuming (default: min(20, steps - S))")
    p.add_argument("--no-resume-check", action="store_true",
                   help="skip the fresh-process resume check")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--influence", action=argparse.BooleanOptionalAction, default=None,
                   help=f"an InfluenceTracker (DataInf, last transformer block) takes the "
                        f"weights over from the schedule at its first update, scoring every "
                        f"source against a held-out probe (the last {PROBE_DOCS} documents of "
                        f"the config's influence.probe source, not trained on); default: the "
                        f"config's influence.enabled (on in the demo config); --no-influence "
                        f"runs the schedule alone")  # fmt: skip
    p.add_argument("--influence-interval", type=int, default=None,
                   help="steps between tracker updates (default: the config's "
                        "influence.update_interval, scaled by steps / 300)")
    p.add_argument("--influence-warmup", type=int, default=None,
                   help="steps before the tracker's first interval starts (default: the "
                        "config's influence.warmup_steps, scaled by steps / 300)")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run: 4 x 64 tokens per step, small tokenizer and corpus "
                        "(combine with --steps, e.g. --steps 16)")  # fmt: skip
    # the fresh process of the resume check
    p.add_argument("--resume-from", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--resume-out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--resume-workers", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``mixtape demo [options]``: exit code 0 when the run (and resume check) passed."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.resume_from is not None:
        if args.resume_out is None or args.resume_steps is None:
            print("--resume-from needs --resume-out and --resume-steps", file=sys.stderr)
            return 2
        return resume_main(args.resume_from, args.resume_steps, args.resume_workers,
                           args.resume_out)  # fmt: skip
    opts = DemoOptions(steps=args.steps, workers=args.workers, config=args.config, out=args.out,
                       seed=args.seed, batch_size=args.batch_size, max_length=args.max_length,
                       threads=args.threads, lr=args.lr, checkpoint_step=args.checkpoint_step,
                       resume_steps=args.resume_steps, resume_check=not args.no_resume_check,
                       progress=not args.no_progress, quick=args.quick,
                       influence=args.influence, influence_interval=args.influence_interval,
                       influence_warmup=args.influence_warmup)  # fmt: skip
    try:
        report = run_demo(opts)
    except ValueError as e:
        print(f"mixtape demo: {e}", file=sys.stderr)
        return 2
    resume = report["resume"]
    return 1 if resume["checked"] and not resume["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
