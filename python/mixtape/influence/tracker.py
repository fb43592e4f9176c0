"""``InfluenceTracker``: steers a mixture during training from DataInf scores against a probe set.

Every ``update_interval`` steps after ``warmup_steps`` it refreshes the probe gradient (the
weights moved since the last one), draws ``samples_per_source`` rows of every source from
``(seed, step, source, rank)``, scores them, all-reduces the per-source score sums and counts
across ranks (so every rank computes the same weights), and hands the new weights to the loader
(``Loader.update_weights``: they land at batch b + horizon on every rank) or the MixedDataset.
Everything is computed before anything is changed: an error leaves the weights as they were.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mixtape.influence.config import InfluenceConfig
from mixtape.influence.datainf import DataInfCalculator
from mixtape.influence.gradients import (
    GhostGradientExtractor,
    ghost_modules,
    hook_owners,
    hooks_supported,
    mean_gradient,
    per_sample_gradients,
    select_parameters,
)
from mixtape.influence.weights import MixtureWeightCalculator, WeightUpdate

__all__ = ["InfluenceTracker", "LightningAdapter", "TrainerCallbackAdapter", "examples_to_batch"]


def examples_to_batch(
    examples: Sequence[Mapping[str, Any]],
    *,
    tokenizer: Any = None,
    pad_token_id: int = 0,
    max_length: int | None = None,
    device: torch.device | str = "cpu",
    where: str = "examples",
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding; an
    example's own ``labels`` kept) from examples with ``input_ids`` or (with a tokenizer)
    ``text``, cut to ``max_length``."""
    if len(examples) == 0:
        raise ValueError(f"{where}: no examples")
    rows: list[list[int]] = []
    labs: list[list[int] | None] = []
    for i, ex in enumerate(examples):
        if "input_ids" in ex:
            ids = ex["input_ids"]
        elif "text" in ex and tokenizer is not None:
            ids = tokenizer(ex["text"])["input_ids"]
        else:
            raise ValueError(f"{where}[{i}] has no 'input_ids'"
                             + ("" if tokenizer is not None else " (and no tokenizer for 'text')")
                             + f"; keys {sorted(ex)}")  # fmt: skip
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        lab = ex.get("labels")
        lab = None if lab is None else (lab.tolist() if hasattr(lab, "tolist") else list(lab))
        if max_length is not None:
            ids = ids[:max_length]
            lab = None if lab is None else lab[:max_length]
        if not ids:
            raise ValueError(f"{where}[{i}] has no tokens")
        if lab is not None and len(lab) != len(ids):
            raise ValueError(f"{where}[{i}]: {len(lab)} labels for {len(ids)} input_ids")
        rows.append([int(t) for t in ids])
        labs.append(lab)
    t = max(len(r) for r in rows)
    n = len(rows)
    input_ids = torch.full((n, t), pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, t), dtype=torch.long)
    labels = torch.full((n, t), -100, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labs, strict=True)):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, : len(r)] = torch.tensor(r if lab is None else [int(x) for x in lab])
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
            "labels": labels.to(device)}  # fmt: skip


def _matrix(v: Any) -> torch.Tensor | None:
    """``v`` as a 2-D tensor (a tensor, a numpy array or rectangular lists), else None."""
    try:
        t = _tensor(v)
    except (TypeError, ValueError, RuntimeError):
        return None  # ragged rows
    return t if t.dim() == 2 else None


def _tensor(v: Any) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))


def _pad_right(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with left padding moved after each row's tokens (GPT-2 / Llama number positions
    from the row's start, not the mask); a mask with gaps in a row leaves the batch as it is."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return batch
    real = mask != 0
    n_real = real.sum(dim=1)
    first = real.long().argmax(dim=1)  # 0 for a row without tokens
    pos = torch.arange(mask.shape[1], device=mask.device)[None]
    run = (pos >= first[:, None]) & (pos < (first + n_real)[:, None])
    if not bool((run == real).all()) or not bool(first.any()):
        return batch  # not one run of tokens per row, or right-padded already
    src = (pos + first[:, None]) % mask.shape[1]  # the leading padding wraps to the end
    return {k: v.gather(1, src) if tuple(v.shape) == tuple(mask.shape) else v
            for k, v in batch.items()}  # fmt: skip


def _unpadded_rows(p: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Examples from a batch of ragged rows (``input_ids``, optional ``labels``), each cut to
    the positions its ``attention_mask`` (when given) marks as tokens."""
    mask = p.get("attention_mask")
    out: list[dict[str, Any]] = []
    for i in range(len(p["input_ids"])):
        ex = {k: _as_list(p[k][i]) for k in ("input_ids", "labels") if k in p}
        if mask is not None:
            row = _as_list(mask[i])
            if len(row) != len(ex["input_ids"]):
                raise ValueError(f"probe row {i}: attention_mask has {len(row)} entries, "
                                 f"input_ids {len(ex['input_ids'])}")  # fmt: skip
            keep = [j for j, m in enumerate(row) if m]
            ex = {k: [v[j] for j in keep] if len(v) == len(row) else v for k, v in ex.items()}
        out.append(ex)
    return out


def _as_list(v: Any) -> list[Any]:
    v = v.tolist() if hasattr(v, "tolist") else v
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"probe rows must be sequences of token ids, got {v!r}")
    return list(v)


def _world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class InfluenceTracker:
    """Influence-driven mixing (see the module docstring). A no-op when ``config.enabled`` is
    False: every method returns at once and nothing is read.

    ``data``: a :class:`mixtape.Loader` over a MixedDataset of map-style sources, or the
    :class:`mixtape.MixedDataset` itself (updates then start at its next position). ``probe``
    overrides ``config.probe``. ``prior`` (default: the mixture's weights when training begins) is
    what ``smoothing`` pulls toward; the weights the tracker steps from are ``self.weights``, its
    own last update (restored by :meth:`load_state_dict`; a caller that changed the mixture by
    other means, such as a schedule it hands over from, sets them to the weights in force).
    ``loss_fn(logits, labels) -> [n]`` defaults to the per-sample mean causal-LM loss.
    """

    def __init__(self, config: InfluenceConfig, data: Any, model: nn.Module, tokenizer: Any = None,
                 probe: Any = None, *, loss_fn: Any = None) -> None:  # fmt: skip
        if not isinstance(config, InfluenceConfig):
            raise TypeError(f"config must be an InfluenceConfig, got {type(config).__name__}")
        self.config = config
        self.enabled = config.enabled
        self.history: list[dict[str, Any]] = []
        self.initial_weights: dict[str, float] | None = None
        self.weights: dict[str, float] | None = None
        # What the last update carried to the next (MixtureWeightCalculator floor_depth), and the
        # weights it gave: carried only while self.weights are still those.
        self._carried: dict[str, float] | None = None
        self._carried_for: dict[str, float] | None = None
        if not self.enabled:
            return
        from mixtape.loader import Loader
        from mixtape.mixing import MixedDataset

        if isinstance(data, Loader):
            if not data.exact:
                raise ValueError("InfluenceTracker needs a Loader over a MixedDataset of "
                                 "map-style sources (its update_weights lands at b + horizon)")
            self.loader: Loader | None = data
            self.mixed: MixedDataset = data.mixed
        elif isinstance(data, MixedDataset):
            self.loader, self.mixed = None, data
        else:
            raise TypeError(f"data must be a mixtape.Loader or MixedDataset, got "
                            f"{type(data).__name__}")  # fmt: skip
        self.model = model.module if isinstance(
            model, torch.nn.parallel.DistributedDataParallel) else model  # fmt: skip
        self.tokenizer = tokenizer
        self.probe_input = config.probe if probe is None else probe
        if self.probe_input is None:
            raise ValueError("InfluenceTracker: no probe (give probe=... or config.probe)")
        self.loss_fn = loss_fn
        self.names = list(self.mixed.source_names)
        self.params = select_parameters(self.model, config.params, config.last_k_blocks,
                                        config.lora)  # fmt: skip
        # "auto" is decided once, so every update (and every rank) takes the same path.
        self.backend = config.backend
        if self.backend == "auto":
            self.backend = "hooks" if hooks_supported(self.model, self.params) else "vmap"
        elif self.backend == "hooks":
            hook_owners(self.model, self.params)  # an unsupported layer: an error now
        self._ghost: GhostGradientExtractor | None = None
        if config.backend == "ghost":
            mods = ghost_modules(self.model, self.params)
            bias = {k: (f"{k}.bias" if k else "bias") in self.params for k in mods}
            self._ghost = GhostGradientExtractor(self.model, mods, bias)
        self.calculator = DataInfCalculator(damping=config.damping, lambda_=config.lambda_,
                                            projection_dim=config.projection_dim,
                                            seed=config.seed, method=config.method)  # fmt: skip
        self._weighter: MixtureWeightCalculator | None = None
        self._probe_batch: dict[str, torch.Tensor] | None = None
        self.probe_grads: dict[str, Any] | None = None
        self.probe_loss: float | None = None

    # --- events ------------------------------------------------------------------------------

    def on_train_begin(self) -> None:
        """Open the probe, compute its gradient, fix the starting weights and the prior."""
        if not self.enabled:
            return
        self._probe_batch = self._load_probe()
        self._refresh_probe()
        if self.weights is None:
            self.weights = dict(self.mixed.weights)
            self.initial_weights = dict(self.weights)
        prior = dict(self.config.prior) if self.config.prior is not None else self.initial_weights
        assert prior is not None
        self._weighter = MixtureWeightCalculator(
            {n: float(prior[n]) for n in self.names}, learning_rate=self.config.learning_rate,
            smoothing=self.config.smoothing, floor=self.config.floor,
            normalize=self.config.normalize, floor_depth=self.config.floor_depth)  # fmt: skip

    def is_update_step(self, step: int) -> bool:
        """Whether ``step`` (optimizer steps done) is ``warmup_steps + k * update_interval``,
        k >= 1."""
        c = self.config
        since = step - c.warmup_steps
        return self.enabled and since > 0 and since % c.update_interval == 0

    def on_step_end(self, step: int, loss: float | None = None) -> WeightUpdate | None:
        """After optimizer step ``step`` (1-based count of steps done): update the weights when
        it is an update step; returns the update (None otherwise)."""
        if not self.enabled or not self.is_update_step(step):
            return None
        if self.history and self.history[-1]["step"] >= step:
            return None  # this step was scored already (a hook called once per micro-batch)
        if self._weighter is None:
            self.on_train_begin()
        assert self._weighter is not None and self.weights is not None
        self._refresh_probe()
        sums, counts = self._score_sources(step)
        sums, counts = self._all_reduce(sums, counts)
        scores = sums / counts
        # One entry per source whose influence is minus its mean helpfulness: the calculator's
        # per-source mean is then exactly the all-reduced mean.
        # Step from the weights the last update carried (below the floor, see floor_depth) while
        # nobody has set other weights since (a caller handing over from a schedule does).
        start = self._carried if self._carried_for == self.weights else None
        upd = self._weighter.get_weight_update(self.weights, -scores, np.arange(len(self.names)),
                                               carried=start)  # fmt: skip
        assert isinstance(upd.weights, dict) and upd.carried is not None
        new = {n: float(upd.weights[n]) for n in self.names}
        self._carried = {n: float(w) for n, w in zip(self.names, upd.carried, strict=True)}
        self._carried_for = dict(new)
        at = (self.loader.update_weights(new) if self.loader is not None
              else self._update_mixed(new))  # fmt: skip
        self.weights = new
        self.history.append({
            "step": int(step), "weights": new,
            "scores": dict(zip(self.names, scores.tolist(), strict=True)),
            "counts": dict(zip(self.names, counts.astype(np.int64).tolist(), strict=True)),
            "applied_at": int(at), "probe_loss": self.probe_loss,
            "loss": None if loss is None else float(loss),
        })  # fmt: skip
        return WeightUpdate(new, scores, counts.astype(np.int64), upd.scale, upd.step)

    # --- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The weights the next step starts from and the history (json-able)."""
        carried = self._carried if self._carried_for == self.weights else None
        return {"weights": self.weights, "initial_weights": self.initial_weights,
                "history": [dict(h) for h in self.history], "carried": carried}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (call before :meth:`on_train_begin`)."""
        if not self.enabled:
            return
        for key in ("weights", "initial_weights", "history"):
            if key not in state:
                raise ValueError(f"InfluenceTracker state has no {key!r}")
        w = state["weights"]
        if w is not None and sorted(w) != sorted(self.names):
            raise ValueError(f"InfluenceTracker state names sources {sorted(w)}, the mixture "
                             f"{sorted(self.names)}")  # fmt: skip
        self.weights = None if w is None else {n: float(w[n]) for n in self.names}
        iw = state["initial_weights"]
        self.initial_weights = None if iw is None else {n: float(iw[n]) for n in self.names}
        self.history = [dict(h) for h in state["history"]]
        c = state.get("carried")  # (absent in states saved before it was kept)
        self._carried = None if c is None else {n: float(c[n]) for n in self.names}
        self._carried_for = None if c is None else self.weights
        self._weighter = None  # rebuilt with the restored prior at on_train_begin

    def to_json(self) -> str:
        """Config summary, starting weights and the update history as JSON."""
        c = self.config
        return json.dumps({
            "enabled": self.enabled, "method": c.method, "update_interval": c.update_interval,
            "warmup_steps": c.warmup_steps, "samples_per_source": c.samples_per_source,
            "sources": getattr(self, "names", []), "initial_weights": self.initial_weights,
            "history": self.history,
        })  # fmt: skip

    # --- internals -----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        p = next(iter(self.params.values()), None)
        return p.device if p is not None else torch.device("cpu")

    def _pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def _batch(self, examples: Sequence[Mapping[str, Any]], where: str) -> dict[str, torch.Tensor]:
        return examples_to_batch(examples, tokenizer=self.tokenizer, pad_token_id=self._pad_id(),
                                 max_length=self.config.max_length, device=self.device,
                                 where=where)  # fmt: skip

    def _load_probe(self) -> dict[str, torch.Tensor]:
        """The probe as a right-padded batch: a batch dict (tensors, numpy arrays or lists; its
        attention_mask honoured), examples, a map-style dataset, or a source name / data path."""
        p = self.probe_input
        cap = self.config.probe_samples
        if isinstance(p, Mapping) and "input_ids" in p:
            ids = _matrix(p["input_ids"])
            if ids is not None:  # a padded batch: tensors, numpy arrays or rectangular lists
                if ids.shape[0] == 0:
                    raise ValueError("empty probe set: the probe batch has 0 rows")
                keep = slice(0, cap)
                batch = {k: (ids if k == "input_ids" else _tensor(v))[keep].to(self.device)
                         for k, v in p.items()
                         if k in ("input_ids", "attention_mask", "labels")}  # fmt: skip
                batch = _pad_right(batch)
                if self.config.max_length is not None:
                    batch = {k: v[:, : self.config.max_length] for k, v in batch.items()}
                return batch
            examples = _unpadded_rows(p)
        elif isinstance(p, str):
            from mixtape.sources import as_source

            src = self.mixed.source(p) if p in self.names else as_source(p, "probe")
            if src.num_rows is None:
                raise ValueError(f"probe {p!r} is a streaming source: give a map-style one")
            rows = np.arange(min(src.num_rows, cap or src.num_rows), dtype=np.int64)
            examples = src.take(rows) if rows.size else []
        elif isinstance(p, Sequence) or (hasattr(p, "__len__") and hasattr(p, "__getitem__")):
            count = len(p) if cap is None else min(len(p), cap)
            examples = [p[i] for i in range(count)]
        else:
            raise TypeError(f"probe must be a batch dict, a list of examples, a map-style dataset "
                            f"or a source name / path, got {type(p).__name__}")  # fmt: skip
        if len(examples) == 0:
            raise ValueError("empty probe set: the probe has no examples")
        return self._batch(examples[:cap] if cap else examples, "probe")

    def _kw(self) -> dict[str, Any]:
        return {} if self.loss_fn is None else {"loss_fn": self.loss_fn}

    def _refresh_probe(self) -> None:
        assert self._probe_batch is not None or self.enabled
        if self._probe_batch is None:
            self._probe_batch = self._load_probe()
        grads, loss = mean_gradient(self.model, self._probe_batch, self.params,
                                    chunk_size=self.config.batch_size, **self._kw())  # fmt: skip
        self.probe_loss = loss
        self.probe_grads = (self._ghost.probe_gradients(grads) if self._ghost is not None
                            else grads)  # fmt: skip

    def _draw(self, step: int, rank: int) -> tuple[list[dict[str, Any]], np.ndarray]:
        """``samples_per_source`` examples of every source, seeded by (seed, step, source, rank);
        a source with no rows (or no random access) is an error naming it."""
        m = self.config.samples_per_source
        examples: list[dict[str, Any]] = []
        ids: list[int] = []
        for k, name in enumerate(self.names):
            src = self.mixed.source(k)
            n = src.num_rows
            if n is None:
                raise ValueError(f"source {name!r} is streaming: the tracker draws rows by index "
                                 "and needs map-style sources")  # fmt: skip
            if n == 0:
                raise ValueError(f"source {name!r} has no samples to score (0 rows)")
            rng = np.random.default_rng([self.config.seed, step, k, rank])
            rows = rng.choice(n, size=m, replace=n < m).astype(np.int64)
            got = src.take(rows)
            if len(got) != m:
                raise ValueError(f"source {name!r} returned {len(got)} of {m} drawn rows")
            examples.extend(got)
            ids.extend([k] * m)
        return examples, np.asarray(ids, dtype=np.int64)

    def _score_sources(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's per-source sums of helpfulness (-influence) and sample counts."""
        rank, _ = _world()
        examples, ids = self._draw(step, rank)
        batch = self._batch(examples, f"samples drawn at step {step}")
        if self._ghost is not None:
            train: Any = self._ghost(batch, chunk_size=self.config.batch_size, **self._kw())
        else:
            train = per_sample_gradients(self.model, batch, self.params,
                                         backend=self.backend,
                                         chunk_size=self.config.batch_size,
                                         **self._kw())  # fmt: skip
        assert self.probe_grads is not None
        infl = self.calculator.compute_influence(train, self.probe_grads)
        help_ = -infl.double().cpu().numpy()
        if not np.isfinite(help_).all():
            i = int(np.argmax(~np.isfinite(help_)))
            raise ValueError(f"influence of sample {i} (source {self.names[ids[i]]!r}) is "
                             f"{help_[i]}")  # fmt: skip
        k = len(self.names)
        sums = np.bincount(ids, weights=help_, minlength=k)
        counts = np.bincount(ids, minlength=k).astype(np.float64)
        return sums, counts

    def _all_reduce(self, sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sums and counts over ranks (identity on one process)."""
        _, world = _world()
        if world == 1:
            return sums, counts
        dist = torch.distributed
        dev = (torch.device("cuda", torch.cuda.current_device())
               if dist.get_backend() == "nccl" else torch.device("cpu"))  # fmt: skip
        t = torch.tensor(np.stack([sums, counts]), dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out = t.cpu().numpy()
        return out[0], out[1]

    def _update_mixed(self, weights: dict[str, float]) -> int:
        position = self.mixed.position
        self.mixed.update_weights_from_influence(weights)
        return int(position)


class TrainerCallbackAdapter:
    """The HF ``TrainerCallback`` events the tracker needs (``InfluenceTrainerCallback`` is this
    on top of transformers' base class). The ``loss`` recorded is the last one logged before the
    step ends (the Trainer logs after ``on_step_end``), None when nothing was logged."""

    def __init__(self, tracker: InfluenceTracker) -> None:
        self.tracker = tracker

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.tracker.on_train_begin()
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        loss = None
        hist = getattr(state, "log_history", None) or []
        if hist and "loss" in hist[-1]:
            loss = hist[-1]["loss"]
        self.tracker.on_step_end(int(state.global_step), loss)
        return control


class LightningAdapter:
    """The Lightning ``Callback`` hooks the tracker needs (``InfluenceLightningCallback`` is
    this on top of Lightning's base class). ``trainer.global_step`` counts optimizer steps."""

    def __init__(self, tracker: InfluenceTracker) -> None:
        self.tracker = tracker

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.tracker.on_train_begin()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else None
        self.tracker.on_step_end(int(trainer.global_step), value)
