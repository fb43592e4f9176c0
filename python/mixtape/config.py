"""Typed, validated configuration of the data pipeline, and its YAML form.

Sections: :class:`MixtureConfig` (sources, weights or a weight schedule, mixing options),
:class:`PackingConfig`, :class:`DataLoaderConfig` (``None`` fields chosen automatically by
:meth:`DataLoaderConfig.resolved`) and :class:`InfluenceSection`, gathered in :class:`DataConfig`.
Every dataclass validates itself in ``__post_init__``; loaded from YAML
(:func:`load_data_config`), an error names the file and the key path (``loader.num_workers``).

The cascade (:meth:`DataConfig.resolved`; the stored sections keep their ``None``, so a changed
parent is always followed):

- ``mixture.seed`` <- ``loader.seed``; ``influence.seed`` <- the mixture's (resolved) seed;
- ``influence.batch_size`` <- ``loader.batch_size``;
- ``loader.packing`` / ``loader.max_length`` <- ``packing.strategy`` / ``packing.max_length``
  (given in both places, they must agree);
- ``influence.probe``: the name of a mixture source, else a path that must exist;
- paths (resolved when loading, against the YAML file's folder): ``data_files``, ``offsets`` and
  a probe path always; a source ``path`` and ``tokenizer`` when they look local (start with
  ``/``, ``./``, ``../`` or ``~``, have a data-file suffix, or exist there), else they stay a
  ``datasets`` builder / Hub name. ``data_dir`` is relative to the builder and left as is.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mixtape.config_fields import (
    SEED_END,
    check_bool,
    check_choice,
    check_int,
    check_real,
    check_str,
    close_matches,
    field_where,
    loc,
    location,
    optional,
    plain_fields,
    set_field,
)
from mixtape.loader_config import DataLoaderConfig, make_generator, seed_worker
from mixtape.ops import OVERFLOW_POLICIES, PACK_STRATEGIES
from mixtape.schedule import INTERPOLATIONS, WeightSchedulePoint, WeightScheduler
from mixtape.source_files import FILE_BUILDERS, DatasetMixture

__all__ = [
    "MIXING_MODES",
    "STOP_STRATEGIES",
    "DataConfig",
    "DataLoaderConfig",
    "InfluenceSection",
    "MixtureConfig",
    "PackingConfig",
    "SourceConfig",
    "dump_data_config",
    "load_data_config",
    "make_generator",
    "seed_worker",
]

MIXING_MODES: tuple[str, ...] = ("greedy", "random", "block")
STOP_STRATEGIES: tuple[str, ...] = ("restart", "first_exhausted", "all_exhausted")
INFLUENCE_METHODS: tuple[str, ...] = ("datainf", "grad_dot", "cosine")
_LOCAL_SUFFIXES = (*FILE_BUILDERS, ".npy")
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4")


# --------------------------------------------------------------------------------------------
# Packing, influence
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackingConfig:
    """Packing of documents into rows of ``max_length`` tokens (``ops.pack_plan`` options and the
    online stream's ``buffer_size`` / ``min_fill``)."""

    strategy: str
    max_length: int
    overflow: str = "split"
    max_docs_per_row: int | None = None
    align: int = 1
    buffer_size: int = 1024
    min_fill: float = 0.99
    pad_value: int = 0
    label_pad_value: int = -100
    column: str = "input_ids"

    def __post_init__(self) -> None:
        w = functools.partial(field_where, "PackingConfig")
        check_choice(w("strategy"), self.strategy, PACK_STRATEGIES)
        cap = check_int(w("max_length"), self.max_length, minimum=1)
        check_choice(w("overflow"), self.overflow, OVERFLOW_POLICIES)
        optional(check_int, w("max_docs_per_row"), self.max_docs_per_row, minimum=1)
        align = check_int(w("align"), self.align, minimum=1)
        if cap % align:
            raise ValueError(f"{w('align')} must divide max_length={cap}, got {align}")
        check_int(w("buffer_size"), self.buffer_size, minimum=1)
        fill = check_real(w("min_fill"), self.min_fill, maximum=1.0)
        if fill <= 0:
            raise ValueError(f"{w('min_fill')} must be in (0, 1], got {self.min_fill!r}")
        check_int(w("pad_value"), self.pad_value)
        check_int(w("label_pad_value"), self.label_pad_value)
        check_str(w("column"), self.column)
        set_field(self, "min_fill", fill)

    def to_dict(self) -> dict[str, Any]:
        """Fields as plain values (``None`` fields left out)."""
        return plain_fields(self)


@dataclass(frozen=True)
class InfluenceSection:
    """The ``influence`` section, checked, for ``InfluenceConfig(**section)`` (it is a mapping).

    ``probe``: a mixture source name or a path (see :class:`DataConfig`), required when
    ``enabled``. ``params``: parameter-name patterns (fnmatch) whose gradients are scored (None:
    the tracker's default). ``damping``: None is DataInf's rule (0.1 x mean of ``|g|^2 / d``).
    ``learning_rate`` / ``smoothing`` / ``floor``: the weight update (exponentiated-gradient step,
    pull toward the prior in [0, 1], minimum weight per source). ``seed`` and ``batch_size``:
    None inherits (see :meth:`DataConfig.resolved`).
    """

    enabled: bool = True
    method: str = "datainf"
    update_interval: int = 100
    warmup_steps: int = 0
    samples_per_source: int = 32
    projection_dim: int | None = None
    damping: float | None = None
    params: tuple[str, ...] | None = None
    learning_rate: float = 1.0
    smoothing: float = 0.0
    floor: float = 0.0
    probe: str | None = None
    seed: int | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        w = functools.partial(field_where, "InfluenceSection")
        enabled = check_bool(w("enabled"), self.enabled)
        check_choice(w("method"), self.method, INFLUENCE_METHODS)
        check_int(w("update_interval"), self.update_interval, minimum=1)
        check_int(w("warmup_steps"), self.warmup_steps, minimum=0)
        check_int(w("samples_per_source"), self.samples_per_source, minimum=1)
        optional(check_int, w("projection_dim"), self.projection_dim, minimum=1)
        set_field(self, "damping", optional(check_real, w("damping"), self.damping, positive=True))
        if self.params is not None:
            if isinstance(self.params, str) or not isinstance(self.params, Sequence):
                raise TypeError(f"{w('params')} must be a list of parameter-name patterns, "
                                f"got {self.params!r}")  # fmt: skip
            if not self.params:
                raise ValueError(f"{w('params')} is empty: name at least one pattern, or leave "
                                 f"it unset for the tracker's default")  # fmt: skip
            for i, p in enumerate(self.params):
                check_str(f"{w('params')}[{i}]", p)
            set_field(self, "params", tuple(self.params))
        lr = check_real(w("learning_rate"), self.learning_rate, positive=True)
        set_field(self, "learning_rate", lr)
        smoothing = check_real(w("smoothing"), self.smoothing, minimum=0.0, maximum=1.0)
        set_field(self, "smoothing", smoothing)
        set_field(self, "floor", check_real(w("floor"), self.floor, minimum=0.0, below=1.0))
        optional(check_str, w("probe"), self.probe)
        if enabled and self.probe is None:
            raise ValueError(f"{w('probe')} is required when influence is enabled: a mixture "
                             f"source name or a path to the target data")  # fmt: skip
        optional(check_int, w("seed"), self.seed, minimum=0, below=SEED_END)
        optional(check_int, w("batch_size"), self.batch_size, minimum=1)

    def keys(self) -> list[str]:
        """Field names, so ``InfluenceConfig(**section)`` works."""
        return [f.name for f in dataclasses.fields(self)]

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        """Fields as plain values (``None`` fields left out)."""
        return plain_fields(self)


# --------------------------------------------------------------------------------------------
# Mixture
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceConfig:
    """One source of the mixture: the arguments of :class:`~mixtape.DatasetMixture`.

    Where the data is: ``path``, ``data_files`` (a path, glob or list) or ``dataset`` (a Python
    object; not in YAML). ``offsets``: the offsets ``.npy`` of a ``.npy`` token file.
    ``weight``: None when the mixture's ``weights`` or ``weight_schedule`` give it.
    ``load_kwargs``: further ``datasets.load_dataset`` arguments (e.g. ``config_name``).
    """

    name: str
    path: str | None = None
    data_files: str | tuple[str, ...] | None = None
    data_dir: str | None = None
    dataset: Any = None
    weight: float | None = None
    split: str = "train"
    text_field: str | None = None
    streaming: bool = False
    offsets: str | None = None
    load_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        name = check_str(field_where("SourceConfig", "name"), self.name)
        w = functools.partial(field_where, f"SourceConfig({name!r})")
        for key in ("path", "data_dir", "offsets", "text_field"):
            value = getattr(self, key)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            set_field(self, key, optional(check_str, w(key), value))
        check_str(w("split"), self.split)
        check_bool(w("streaming"), self.streaming)
        files = self.data_files
        if files is not None:
            if isinstance(files, (str, os.PathLike)):
                files = os.fspath(files)
                check_str(w("data_files"), files)
            elif isinstance(files, Sequence) and files:
                files = tuple(os.fspath(f) if isinstance(f, os.PathLike) else f for f in files)
                for i, f in enumerate(files):
                    check_str(f"{w('data_files')}[{i}]", f)
            else:
                raise TypeError(f"{w('data_files')} must be a path, a glob or a non-empty list of "
                                f"them, got {files!r}")  # fmt: skip
            set_field(self, "data_files", files)
        if self.dataset is not None and (self.path or files or self.data_dir):
            raise ValueError(f"{w('dataset')}: give dataset alone, or path / data_files")
        if self.dataset is None and self.path is None and files is None:
            raise ValueError(f"{w('path')}: say where the data is: path, data_files or dataset")
        if self.data_dir is not None and self.path is None:
            raise ValueError(f"{w('data_dir')} is read by a builder: give path too (e.g. "
                             f"'parquet' or a Hub name)")  # fmt: skip
        set_field(self, "weight", optional(check_real, w("weight"), self.weight, minimum=0.0))
        if not isinstance(self.load_kwargs, Mapping):
            raise TypeError(f"{w('load_kwargs')} must be a mapping, got {self.load_kwargs!r}")
        reserved = sorted({f.name for f in dataclasses.fields(self)} & set(self.load_kwargs))
        if reserved:
            raise ValueError(f"{w('load_kwargs')} sets {reserved}, which are fields of the "
                             f"source: set them there")  # fmt: skip
        set_field(self, "load_kwargs", dict(self.load_kwargs))

    def to_mixture(self, weight: float | None = None) -> DatasetMixture:
        """A :class:`DatasetMixture` for this source (not opened yet), with ``weight`` (default:
        this source's weight, else 1)."""
        w = weight if weight is not None else (1.0 if self.weight is None else self.weight)
        kw = dict(self.load_kwargs)
        if self.offsets is not None:
            kw["offsets"] = self.offsets
        files = list(self.data_files) if isinstance(self.data_files, tuple) else self.data_files
        return DatasetMixture(self.name, path=self.path, dataset=self.dataset, weight=w,
                              split=self.split, text_field=self.text_field,
                              streaming=self.streaming, data_files=files,
                              data_dir=self.data_dir, **kw)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """Fields as plain values (``None`` fields left out)."""
        return plain_fields(self)


def _check_weights(where: str, weights: object, names: Sequence[str]) -> dict[str, float]:
    """A mapping giving each of ``names`` (exactly) a finite weight >= 0, not all zero."""
    if not isinstance(weights, Mapping) or not weights:
        raise TypeError(f"{where} must be a non-empty mapping of source name to weight, "
                        f"got {weights!r}")  # fmt: skip
    out: dict[str, float] = {}
    for k, v in weights.items():
        if k not in names:
            near = close_matches(k, names)
            raise ValueError(f"{where} names {k!r}, which is not a source{near}; "
                             f"sources: {list(names)}")  # fmt: skip
        out[k] = check_real(f"{where}.{k}", v, minimum=0.0)
    missing = [n for n in names if n not in out]
    if missing:
        raise ValueError(f"{where} gives no weight to source(s) {missing}: give every source a "
                         f"weight (0 to leave one out)")  # fmt: skip
    if not any(out.values()):
        raise ValueError(f"{where}: all weights are zero; at least one source needs weight")
    return {n: out[n] for n in names}


@dataclass(frozen=True)
class MixtureConfig:
    """The sources and how they are mixed.

    Weights come from exactly one place: each source's ``weight`` (on every source, or on none:
    equal weights),
    ``weights`` (every source named), or ``weight_schedule``: points ``(step, weights)`` (or
    ``{step:, weights:}``) with increasing steps, each naming every source, interpolated by
    ``weight_schedule_type`` (step | linear | cosine; default step). ``mode``: greedy | random |
    block (``block_size`` positions per block); ``stop_strategy``: restart | first_exhausted |
    all_exhausted; ``seed``: None inherits the loader's.
    """

    sources: tuple[SourceConfig, ...]
    weights: Mapping[str, float] | None = None
    weight_schedule: tuple[WeightSchedulePoint, ...] | None = None
    weight_schedule_type: str | None = None
    block_size: int = 1000
    stop_strategy: str = "restart"
    mode: str = "greedy"
    seed: int | None = None

    def __post_init__(self) -> None:
        w = functools.partial(field_where, "MixtureConfig")
        if isinstance(self.sources, (str, Mapping)) or not isinstance(self.sources, Sequence):
            raise TypeError(f"{w('sources')} must be a list of SourceConfig, got {self.sources!r}")
        if not self.sources:
            raise ValueError(f"{w('sources')} is empty: a mixture needs at least one source")
        seen: dict[str, int] = {}
        for i, s in enumerate(self.sources):
            if not isinstance(s, SourceConfig):
                raise TypeError(f"{w('sources')}[{i}] must be a SourceConfig, got {s!r}")
            if s.name in seen:
                raise ValueError(f"{w('sources')}[{i}].name {s.name!r} repeats sources"
                                 f"[{seen[s.name]}]: source names must be unique")  # fmt: skip
            seen[s.name] = i
        set_field(self, "sources", tuple(self.sources))
        names = list(seen)
        given = [s.name for s in self.sources if s.weight is not None]
        if self.weights is not None:
            if given:
                raise ValueError(f"{w('weights')} and the weight of source(s) {given} are both "
                                 f"given: give weights in one place")  # fmt: skip
            set_field(self, "weights", _check_weights(w("weights"), self.weights, names))
        if self.weight_schedule is not None:
            if given or self.weights is not None:
                other = "weights" if self.weights is not None else f"the weight of {given}"
                raise ValueError(f"{w('weight_schedule')} and {other} are both given: a "
                                 f"schedule sets every weight (its first point's before its "
                                 f"first step)")  # fmt: skip
            points = self._check_schedule(w("weight_schedule"), self.weight_schedule, names)
            set_field(self, "weight_schedule", points)
            check_choice(w("weight_schedule_type"), self.weight_schedule_type or "step",
                          INTERPOLATIONS)  # fmt: skip
        elif self.weight_schedule_type is not None:
            raise ValueError(f"{w('weight_schedule_type')} is {self.weight_schedule_type!r} but "
                             f"there is no weight_schedule")  # fmt: skip
        missing = [s.name for s in self.sources if s.weight is None]
        if given and missing:  # a default of 1 beside weights like 0.7 / 0.3 would dominate
            raise ValueError(f"{w('sources')}: source(s) {given} have a weight but {missing} "
                             f"do not: give every source a weight, or none (equal weights)")
        static = self.static_weights()
        if static is not None and not any(static.values()):
            raise ValueError(f"{w('sources')}: every source has weight 0; at least one needs "
                             f"weight")  # fmt: skip
        check_int(w("block_size"), self.block_size, minimum=1)
        check_choice(w("stop_strategy"), self.stop_strategy, STOP_STRATEGIES)
        check_choice(w("mode"), self.mode, MIXING_MODES)
        optional(check_int, w("seed"), self.seed, minimum=0, below=SEED_END)

    @staticmethod
    def _check_schedule(where: str, schedule: object,
                        names: Sequence[str]) -> tuple[WeightSchedulePoint, ...]:  # fmt: skip
        if isinstance(schedule, (str, Mapping)) or not isinstance(schedule, Sequence):
            raise TypeError(f"{where} must be a list of (step, weights) points, got {schedule!r}")
        if not schedule:
            raise ValueError(f"{where} is empty: give at least one (step, weights) point")
        points: list[WeightSchedulePoint] = []
        for i, p in enumerate(schedule):
            at = f"{where}[{i}]"
            if isinstance(p, WeightSchedulePoint):
                step, weights = p.step, p.weights
            elif isinstance(p, Mapping):
                unknown = sorted(set(p) - {"step", "weights"}, key=str)
                if unknown:
                    near = close_matches(unknown[0], ["step", "weights"])
                    raise ValueError(f"{at}: unknown key {unknown[0]!r}{near}; a point has "
                                     f"'step' and 'weights'")  # fmt: skip
                if "step" not in p or "weights" not in p:
                    raise ValueError(f"{at} needs 'step' and 'weights', got {sorted(p)}")
                step, weights = p["step"], p["weights"]
            elif isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2:
                step, weights = p
            else:
                raise TypeError(f"{at} must be (step, weights) or {{step: ..., weights: ...}}, "
                                f"got {p!r}")  # fmt: skip
            step = check_int(f"{at}.step", step, minimum=0)
            if points and step <= points[-1].step:
                what = "repeats" if step == points[-1].step else "comes before"
                raise ValueError(f"{at}.step {step} {what} the previous point's step "
                                 f"{points[-1].step}: steps must increase")  # fmt: skip
            points.append(WeightSchedulePoint(step, _check_weights(f"{at}.weights", weights,
                                                                   names)))  # fmt: skip
        return tuple(points)

    @property
    def source_names(self) -> list[str]:
        """Source names in the configured order."""
        return [s.name for s in self.sources]

    def static_weights(self) -> dict[str, float] | None:
        """The fixed weights (``weights``, else each source's; equal when none is given), None
        with a schedule."""
        if self.weight_schedule is not None:
            return None
        if self.weights is not None:
            return dict(self.weights)
        return {s.name: 1.0 if s.weight is None else s.weight for s in self.sources}

    def build_schedule(self) -> WeightScheduler | None:
        """The :class:`~mixtape.WeightScheduler` of ``weight_schedule`` (None without one)."""
        if self.weight_schedule is None:
            return None
        kind = self.weight_schedule_type or "step"
        return WeightScheduler(list(self.weight_schedule), kind)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """Fields as plain values (``None`` fields left out); points as ``{step, weights}``."""
        return plain_fields(self)


# --------------------------------------------------------------------------------------------
# The whole data config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The data pipeline's config: ``mixture``, ``packing``, ``loader``, ``influence``,
    ``tokenizer`` (a name or path, for the caller to load). Cross-section rules are checked
    here; :meth:`resolved` applies the cascade described in :mod:`mixtape.config`."""

    mixture: MixtureConfig
    packing: PackingConfig | None = None
    loader: DataLoaderConfig
    influence: InfluenceSection | None = None
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        w = functools.partial(field_where, "DataConfig")
        for key, cls, nullable in (("mixture", MixtureConfig, False),
                                   ("packing", PackingConfig, True),
                                   ("loader", DataLoaderConfig, False),
                                   ("influence", InfluenceSection, True)):  # fmt: skip
            value = getattr(self, key)
            if not (isinstance(value, cls) or (nullable and value is None)):
                raise TypeError(f"{w(key)} must be a {cls.__name__}"
                                f"{' or None' if nullable else ''}, got {value!r}")  # fmt: skip
        optional(check_str, w("tokenizer"), self.tokenizer)
        pk, ld = self.packing, self.loader
        if pk is not None:
            if ld.packing is not None and ld.packing != pk.strategy:
                raise ValueError(f"{w('loader.packing')} is {ld.packing!r} but "
                                 f"packing.strategy is {pk.strategy!r}: give it once (the "
                                 f"loader inherits it)")  # fmt: skip
            if ld.max_length is not None and ld.max_length != pk.max_length:
                raise ValueError(f"{w('loader.max_length')} is {ld.max_length} but "
                                 f"packing.max_length is {pk.max_length}: give it once (the "
                                 f"loader inherits it)")  # fmt: skip
        inf = self.influence
        if inf is not None:
            n = len(self.mixture.sources)
            if inf.floor * n >= 1.0:
                raise ValueError(f"{w('influence.floor')} is {inf.floor} with {n} sources: the "
                                 f"floors would take the whole mixture (floor x sources must be "
                                 f"< 1)")  # fmt: skip
            names = self.mixture.source_names
            if inf.probe is not None and inf.probe not in names and not _exists(inf.probe):
                raise _probe_error(w("influence.probe"), inf.probe, names, inf.probe)

    @property
    def probe_source(self) -> str | None:
        """The mixture source the influence probe is drawn from (None: a path, or no probe)."""
        p = None if self.influence is None else self.influence.probe
        return p if p is not None and p in self.mixture.source_names else None

    def resolved(self) -> DataConfig:
        """A copy with the cascade applied and the loader's automatic choices made."""
        pk = self.packing
        loader = self.loader
        if pk is not None:
            loader = dataclasses.replace(loader, packing=pk.strategy, max_length=pk.max_length)
        loader = loader.resolved()
        seed = loader.seed if self.mixture.seed is None else self.mixture.seed
        mixture = dataclasses.replace(self.mixture, seed=seed)
        influence = self.influence
        if influence is not None:
            influence = dataclasses.replace(
                influence,
                seed=seed if influence.seed is None else influence.seed,
                batch_size=(loader.batch_size if influence.batch_size is None
                            else influence.batch_size))  # fmt: skip
        return dataclasses.replace(self, mixture=mixture, loader=loader, influence=influence)

    def build_mixture(self) -> dict[str, Any]:
        """Keyword arguments of the mixer: ``MixedDataset(**cfg.build_mixture())``.

        ``sources``: name -> :class:`DatasetMixture` (not opened). ``weights``: the static
        weights as given (not normalised), or None with a schedule (each DatasetMixture then
        carries the schedule's normalised step-0 weight). ``schedule``: a
        :class:`WeightScheduler` or None. ``seed`` (cascaded), ``mode``, ``block_size``,
        ``stop_strategy``.
        """
        m = self.resolved().mixture
        schedule = m.build_schedule()
        weights = m.static_weights()
        start = weights if schedule is None else schedule.get_weights(0)
        assert start is not None
        sources = {s.name: s.to_mixture(start[s.name]) for s in m.sources}
        return {"sources": sources, "weights": weights, "schedule": schedule, "seed": m.seed,
                "mode": m.mode, "block_size": m.block_size,
                "stop_strategy": m.stop_strategy}  # fmt: skip

    def build_dataset(self, tokenizer: Any = None) -> Any:
        """The :class:`~mixtape.MixedDataset` of this config, sources opened and tokenized
        (see :func:`mixtape.build_mixed_dataset`)."""
        from mixtape.pipeline import build_mixed_dataset

        return build_mixed_dataset(self, tokenizer)

    def build_loader(self, tokenizer: Any = None, *, attention: str | None = None) -> Any:
        """The :class:`~mixtape.Loader` of this config (its dataset is ``loader.dataset``;
        see :func:`mixtape.build_from_config`)."""
        from mixtape.pipeline import build_from_config

        return build_from_config(self, tokenizer, attention=attention)[1]

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts (sections that are None left out); ``from_dict`` inverts it."""
        return plain_fields(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *,
                  base_dir: str | os.PathLike[str] | None = None) -> DataConfig:  # fmt: skip
        """A config from nested dicts (as in YAML); relative paths resolve against
        ``base_dir`` when given (else they stay relative, to the working directory)."""
        return _data_config_from_dict(d, None if base_dir is None else os.fspath(base_dir),
                                      None, yaml_file=False)  # fmt: skip


# --------------------------------------------------------------------------------------------
# dicts <-> dataclasses
# --------------------------------------------------------------------------------------------


def _keys(d: object, cls: type, file: str | None, path: str,
          exclude: Sequence[str] = ()) -> dict[str, Any]:  # fmt: skip
    """``d`` as a dict whose keys are fields of ``cls`` (unknown keys named, with close matches);
    missing required fields are errors too."""
    if not isinstance(d, Mapping):
        raise TypeError(f"{loc(file, path or 'the config')} must be a mapping, got "
                        f"{type(d).__name__} {d!r}")  # fmt: skip
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in exclude}
    for k in d:
        if k not in fields:
            key = f"{path}.{k}" if path else str(k)
            near = close_matches(k, list(fields))
            raise ValueError(f"{loc(file, key)}: unknown key {k!r}{near}; "
                             f"keys of {path or 'the top level'}: {list(fields)}")  # fmt: skip
    for name, f in fields.items():
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and name not in d:
            key = f"{path}.{name}" if path else name
            raise ValueError(f"{loc(file, key)} is required")
    return dict(d)


def _probe_error(where: str, probe: str, names: list[str], looked: str) -> ValueError:
    at = "" if looked == probe else f" (looked for {looked!r})"
    return ValueError(f"{where} {probe!r} is neither a source of the mixture"
                      f"{close_matches(probe, names)} (sources: {names}) nor an existing path{at}")


def _exists(path: str) -> bool:
    p = os.path.expanduser(path)
    return os.path.exists(p) or (glob.has_magic(p) and bool(glob.glob(p, recursive=True)))


def _join(base: str | None, path: str) -> str:
    """``path`` against ``base`` (the config file's folder), ``~`` expanded; absolute kept."""
    p = os.path.expanduser(path)
    if base is None or os.path.isabs(p):
        return p
    return os.path.normpath(os.path.join(base, p))


def _looks_local(base: str | None, value: str) -> bool:
    """A source ``path`` or ``tokenizer`` that names a local file rather than a Hub name."""
    low = value.lower()
    for c in _COMPRESSED:
        low = low.removesuffix(c)
    return (value.startswith(("/", "./", "../", "~")) or low.endswith(_LOCAL_SUFFIXES)
            or (base is not None and _exists(os.path.join(base, value))))  # fmt: skip


def _source_from_dict(d: object, base: str | None, file: str | None, path: str,
                      yaml_file: bool) -> SourceConfig:  # fmt: skip
    out = _keys(d, SourceConfig, file, path, exclude=("dataset",) if yaml_file else ())
    if base is not None:
        if isinstance(out.get("path"), str) and _looks_local(base, out["path"]):
            out["path"] = _join(base, out["path"])
        if isinstance(out.get("offsets"), str):
            out["offsets"] = _join(base, out["offsets"])
        files = out.get("data_files")
        if isinstance(files, str):
            out["data_files"] = _join(base, files)
        elif isinstance(files, list):
            out["data_files"] = [_join(base, f) if isinstance(f, str) else f for f in files]
    with location(file, path + "."):
        return SourceConfig(**out)


def _mixture_from_dict(d: object, base: str | None, file: str | None,
                       yaml_file: bool) -> MixtureConfig:  # fmt: skip
    out = _keys(d, MixtureConfig, file, "mixture")
    sources = out["sources"]
    if not isinstance(sources, list):
        raise TypeError(f"{loc(file, 'mixture.sources')} must be a list of sources, got "
                        f"{sources!r}")  # fmt: skip
    out["sources"] = [_source_from_dict(s, base, file, f"mixture.sources[{i}]", yaml_file)
                      for i, s in enumerate(sources)]  # fmt: skip
    with location(file, "mixture."):
        return MixtureConfig(**out)


def _data_config_from_dict(d: object, base: str | None, file: str | None, *,
                           yaml_file: bool) -> DataConfig:  # fmt: skip
    top = _keys(d, DataConfig, file, "")
    top["mixture"] = _mixture_from_dict(top["mixture"], base, file, yaml_file)
    if top.get("packing") is not None:
        packing = _keys(top["packing"], PackingConfig, file, "packing")
        with location(file, "packing."):
            top["packing"] = PackingConfig(**packing)
    loader = _keys(top["loader"], DataLoaderConfig, file, "loader")
    with location(file, "loader."):
        top["loader"] = DataLoaderConfig(**loader)
    if top.get("influence") is not None:
        inf = _keys(top["influence"], InfluenceSection, file, "influence")
        probe = inf.get("probe")
        names = top["mixture"].source_names
        if base is not None and isinstance(probe, str) and probe not in names:
            inf["probe"] = _join(base, probe)
            if not _exists(inf["probe"]):  # named as written, not as resolved
                raise _probe_error(loc(file, "influence.probe"), probe, names, inf["probe"])
        with location(file, "influence."):
            top["influence"] = InfluenceSection(**inf)
    tok = top.get("tokenizer")
    if base is not None and isinstance(tok, str) and _looks_local(base, tok):
        top["tokenizer"] = _join(base, tok)
    with location(file, ""):
        return DataConfig(**top)


# --------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` semantics, but a key repeated in one mapping is an error (PyYAML keeps
    the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<:` merges; explicit keys override merged ones, as YAML says
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:
            continue  # unhashable: the safe constructor reports it
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {first})",
                key_node.start_mark)  # fmt: skip
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_data_config(path: str | os.PathLike[str]) -> DataConfig:
    """Read a :class:`DataConfig` from a YAML file (sections ``mixture``, ``packing``,
    ``loader``, ``influence``, ``tokenizer``). Relative paths resolve against the file's folder
    (see :mod:`mixtape.config`); every error names the file and the key path."""
    file = os.fspath(path)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"data config {file!r} does not exist") from None
    try:
        d = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ValueError(f"{file}: not valid YAML: {e}") from e
    if d is None:
        raise ValueError(f"{file}: the file is empty; it needs at least mixture and loader")
    base = os.path.dirname(os.path.abspath(file))
    return _data_config_from_dict(d, base, file, yaml_file=True)


def _check_dumpable(value: Any, path: str) -> None:
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_dumpable(v, f"{path}.{k}" if path else str(k))
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_dumpable(v, f"{path}[{i}]")
        return
    raise ValueError(f"{path} holds a {type(value).__name__}, which YAML cannot store; give a "
                     f"path or a registered name instead")  # fmt: skip


def dump_data_config(cfg: DataConfig, path: str | os.PathLike[str]) -> None:
    """Write ``cfg`` as YAML that :func:`load_data_config` reads back equal (paths are written
    as stored, so a config loaded from a file, whose paths are absolute, loads back anywhere)."""
    for i, s in enumerate(cfg.mixture.sources):
        if s.dataset is not None:
            raise ValueError(f"mixture.sources[{i}].dataset holds a Python object, which a "
                             f"YAML config cannot name: give it a path or data_files")  # fmt: skip
    d = cfg.to_dict()
    _check_dumpable(d, "")
    Path(path).write_text(yaml.safe_dump(d, sort_keys=False), encoding="utf-8")
