"""``InfluenceConfig``: what the influence tracker scores, how often, and how weights move."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mixtape.influence.datainf import METHODS
from mixtape.influence.weights import NORMALIZATIONS

__all__ = ["BACKENDS", "InfluenceConfig"]

#: Per-sample gradient paths: ``hooks`` (one batched forward and backward per chunk, per-sample
#: gradients formed per module from its inputs and output gradients: linear and norm layers),
#: ``vmap`` (torch.func over the chosen parameters: any module, slower), ``loop`` (one autograd
#: pass per sample: slow, for models vmap cannot trace), ``ghost`` (linear layers from their
#: inputs and output gradients, never forming per-sample gradients), ``auto`` (``hooks`` when every
#: chosen parameter belongs to a linear or norm layer, else ``vmap``: the same scores either way).
BACKENDS = ("auto", "hooks", "vmap", "loop", "ghost")


def _int(name: str, v: Any, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"InfluenceConfig.{name} must be an int >= {minimum}, got {v!r}")
    return v


def _real(name: str, v: Any, lo: float, hi: float | None = None, *, open_lo: bool = False) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok:
        ok = (v > lo if open_lo else v >= lo) and (hi is None or v <= hi)
    if not ok:
        rng = f"{'>' if open_lo else '>='} {lo}" + ("" if hi is None else f" and <= {hi}")
        raise ValueError(f"InfluenceConfig.{name} must be a finite number {rng}, got {v!r}")
    return float(v)


@dataclass
class InfluenceConfig:
    """Settings of :class:`~mixtape.influence.tracker.InfluenceTracker`.

    Updates happen at steps ``warmup_steps + k * update_interval`` (k >= 1). Each draws
    ``samples_per_source`` rows of every source (seeded by ``(seed, step, source, rank)``), scores
    them against ``probe`` with ``method`` and moves the weights by an exponentiated-gradient step
    (``learning_rate``, ``smoothing`` toward ``prior``, ``floor``, ``floor_depth``,
    ``normalize``; see :class:`~mixtape.influence.weights.MixtureWeightCalculator`).

    ``probe``: a list of examples (dicts with ``input_ids`` or, with a tokenizer, ``text``), a
    batch (dict of ``input_ids`` [m, T] ...), any map-style dataset, or a string (a mixture source
    name, else a data file path); ``probe_samples`` caps how many of its examples are used.
    Parameters scored: ``params`` (fnmatch patterns on parameter names), ``last_k_blocks`` (the
    last k blocks of the model's largest numbered ModuleList), or ``lora`` (parameters whose name
    contains ``lora_``); none set: the LoRA parameters if the model has any, else the last block,
    else every trainable parameter. ``damping`` is DataInf's rule factor (lambda_l = damping *
    mean |g|^2 / d_l); ``lambda_`` fixes lambda instead. ``batch_size`` bounds how many samples
    have their gradients formed at once; ``max_length`` truncates examples.
    """

    enabled: bool = True
    method: str = "datainf"
    update_interval: int = 100
    warmup_steps: int = 0
    probe: Any = None
    probe_samples: int | None = None
    samples_per_source: int = 32
    params: tuple[str, ...] | None = None
    last_k_blocks: int | None = None
    lora: bool = False
    backend: str = "auto"
    projection_dim: int | None = None
    damping: float = 0.1
    lambda_: float | None = None
    learning_rate: float = 1.0
    smoothing: float = 0.0
    floor: float = 0.0
    floor_depth: float = 3.0
    normalize: str = "max_dev"
    prior: Mapping[str, float] | None = None
    seed: int = 0
    batch_size: int = 8
    max_length: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise TypeError(f"InfluenceConfig.enabled must be a bool, got {self.enabled!r}")
        if self.method not in METHODS:
            raise ValueError(f"InfluenceConfig.method must be one of {METHODS}, got "
                             f"{self.method!r}")  # fmt: skip
        if self.backend not in BACKENDS:
            raise ValueError(f"InfluenceConfig.backend must be one of {BACKENDS}, got "
                             f"{self.backend!r}")  # fmt: skip
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"InfluenceConfig.normalize must be one of {NORMALIZATIONS}, got "
                             f"{self.normalize!r}")  # fmt: skip
        _int("update_interval", self.update_interval, 1)
        _int("warmup_steps", self.warmup_steps, 0)
        _int("samples_per_source", self.samples_per_source, 1)
        _int("batch_size", self.batch_size, 1)
        for name in ("probe_samples", "last_k_blocks", "projection_dim", "max_length"):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name), 1)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or \
                not 0 <= self.seed < 2**63:  # fmt: skip
            raise ValueError(f"InfluenceConfig.seed must be an int in [0, 2**63), got "
                             f"{self.seed!r}")  # fmt: skip
        self.damping = _real("damping", self.damping, 0.0, open_lo=True)
        if self.lambda_ is not None:
            self.lambda_ = _real("lambda_", self.lambda_, 0.0, open_lo=True)
        self.learning_rate = _real("learning_rate", self.learning_rate, 0.0)
        self.smoothing = _real("smoothing", self.smoothing, 0.0, 1.0)
        self.floor = _real("floor", self.floor, 0.0, 1.0)
        self.floor_depth = _real("floor_depth", self.floor_depth, 0.0)
        if self.params is not None:
            if isinstance(self.params, str) or not isinstance(self.params, Sequence):
                raise TypeError(f"InfluenceConfig.params must be a list of name patterns, got "
                                f"{self.params!r}")  # fmt: skip
            if not self.params or not all(isinstance(p, str) and p for p in self.params):
                raise ValueError(f"InfluenceConfig.params must be non-empty strings, got "
                                 f"{self.params!r}")  # fmt: skip
            self.params = tuple(self.params)
        chosen = [n for n, on in (("params", self.params is not None),
                                  ("last_k_blocks", self.last_k_blocks is not None),
                                  ("lora", bool(self.lora))) if on]  # fmt: skip
        if len(chosen) > 1:
            raise ValueError(f"InfluenceConfig: choose parameters by one of params, "
                             f"last_k_blocks, lora; got {chosen}")  # fmt: skip
        if self.backend == "ghost" and self.projection_dim is not None:
            raise ValueError("InfluenceConfig: projection_dim applies to materialised gradients; "
                             "the ghost backend never forms them (use backend='vmap')")

    @classmethod
    def from_section(cls, section: Any, **overrides: Any) -> InfluenceConfig:
        """From a resolved :class:`mixtape.config.InfluenceSection` (``DataConfig.resolved()
        .influence``): its probe string stays a source name / path for the tracker to open;
        ``damping`` None is the rule's 0.1. ``seed`` / ``batch_size`` None (inherited from the
        data config until resolved) are an error unless ``overrides`` give them: this class's
        defaults would silently replace the data config's. ``overrides`` win."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        for key in section.keys():  # noqa: SIM118  (InfluenceSection: keys(), no __iter__)
            value = section[key] if isinstance(section, Mapping) else getattr(section, key)
            if key not in names:
                raise ValueError(f"InfluenceConfig.from_section: unknown field {key!r}")
            if value is None and key == "damping":
                continue
            if value is None and key in ("seed", "batch_size"):
                if key not in overrides:
                    raise ValueError(f"InfluenceConfig.from_section: {key} is None, inherited "
                                     "from the data config: pass DataConfig.resolved().influence "
                                     f"(or {key}=...)")  # fmt: skip
                continue
            kw[key] = value
        kw.update(overrides)
        return cls(**kw)
