"""The Pipeline API: sources -> tokenize -> mix -> pack -> load, as one config or fluently.

A thin composition of the existing pieces, with one build path for every entry point
(:func:`build_from_config`, :meth:`Pipeline.build`, :meth:`mixtape.DataConfig.build_loader`):
:class:`~mixtape.DatasetMixture` opens each source, :class:`~mixtape.PreprocessedDataset`
tokenizes it, :class:`~mixtape.MixedDataset` mixes, :class:`~mixtape.DataLoaderFactory` loads
(and packs). The stage configs are the :mod:`mixtape.config` dataclasses:

- :class:`DatasetConfig` is a :class:`~mixtape.SourceConfig` plus its tokenizer (and the
  tokenizer's ``max_length`` / ``add_eos``);
- :class:`MixStageConfig` is :class:`~mixtape.MixtureConfig` without the sources (which are the
  pipeline's ``datasets``); ``to_mixture`` makes the MixtureConfig, which validates;
- :class:`PackStageConfig` is :class:`~mixtape.PackingConfig` plus the packed collator's
  ``attention``;
- ``LoadStageConfig`` *is* :class:`~mixtape.DataLoaderConfig`;
- :class:`PipelineConfig` becomes a :class:`~mixtape.DataConfig` (``to_data_config``) plus the
  tokenizers, which a YAML config cannot hold.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mixtape.builder import _PAD_COLLATORS, _pad_id, check_loader_overflow
from mixtape.config import (
    DataConfig,
    MixtureConfig,
    PackingConfig,
    SourceConfig,
    load_data_config,
)
from mixtape.config_fields import check_bool, check_int, field_where, optional
from mixtape.loader import DataLoaderFactory, Loader
from mixtape.loader_config import DataLoaderConfig
from mixtape.mixing import MixedDataset
from mixtape.schedule import WeightSchedulePoint

__all__ = [
    "DatasetConfig",
    "LoadStageConfig",
    "MixStageConfig",
    "PackStageConfig",
    "Pipeline",
    "PipelineConfig",
    "TokenizeStageConfig",
    "build_from_config",
    "build_mixed_dataset",
]

LoadStageConfig = DataLoaderConfig
"""The load stage is the loader's config itself."""

# PackingConfig fields the loader's per-batch packer does not use (they belong to
# pack_sequences / PackingStream), with their defaults: another value would be ignored.
_UNUSED_BY_LOADER = {"max_docs_per_row": None, "align": 1, "buffer_size": 1024, "min_fill": 0.99}


# --------------------------------------------------------------------------------------------
# Stage configs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizeStageConfig:
    """How text becomes tokens (:class:`~mixtape.PreprocessedDataset`'s options).

    ``tokenizer``: a HF tokenizer, or a local path / name for ``AutoTokenizer.from_pretrained``.
    ``text_field``: the records' text (default ``"text"``, or the source's ``text_field``).
    ``max_length``: tokens kept per document (EOS included). ``add_eos``: None appends the
    tokenizer's EOS unless it adds one itself.
    """

    tokenizer: Any
    text_field: str | None = None
    max_length: int | None = None
    add_eos: bool | None = None

    def __post_init__(self) -> None:
        w = functools.partial(field_where, "TokenizeStageConfig")
        if self.tokenizer is None:
            raise ValueError(f"{w('tokenizer')} is None")
        optional(check_int, w("max_length"), self.max_length, minimum=2)
        optional(check_bool, w("add_eos"), self.add_eos)


@dataclass(frozen=True)
class DatasetConfig(SourceConfig):
    """A :class:`~mixtape.SourceConfig` and how to tokenize it: ``tokenizer`` (a HF tokenizer or
    a path / name; None: the pipeline's, else the source must hold token ids already),
    ``max_length`` and ``add_eos`` as in :class:`TokenizeStageConfig`."""

    tokenizer: Any = None
    max_length: int | None = None
    add_eos: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        w = functools.partial(field_where, f"DatasetConfig({self.name!r})")
        optional(check_int, w("max_length"), self.max_length, minimum=2)
        optional(check_bool, w("add_eos"), self.add_eos)

    def to_source(self) -> SourceConfig:
        """The plain :class:`~mixtape.SourceConfig` (what a :class:`DataConfig` holds)."""
        own = {f.name for f in dataclasses.fields(SourceConfig)}
        return SourceConfig(**{k: getattr(self, k) for k in own})

    def tokenize_stage(self, default: TokenizeStageConfig | None) -> TokenizeStageConfig | None:
        """This source's tokenization: its own settings over the pipeline's ``default``."""
        tok = self.tokenizer if self.tokenizer is not None else (
            None if default is None else default.tokenizer)  # fmt: skip
        if tok is None:
            return None
        d = default or TokenizeStageConfig(tok)
        return TokenizeStageConfig(
            tok, text_field=self.text_field or d.text_field,
            max_length=self.max_length if self.max_length is not None else d.max_length,
            add_eos=self.add_eos if self.add_eos is not None else d.add_eos)  # fmt: skip


@dataclass(frozen=True)
class MixStageConfig:
    """:class:`~mixtape.MixtureConfig` without its sources: ``weights`` (name -> weight, or one
    per dataset in order; None: each dataset's ``weight``, default 1) or ``weight_schedule``,
    ``weight_schedule_type``, ``block_size``, ``stop_strategy``, ``mode``, ``seed`` (None: the
    loader's). Checked when combined with the sources (:meth:`to_mixture`)."""

    weights: Mapping[str, float] | Sequence[float] | None = None
    weight_schedule: Sequence[WeightSchedulePoint | Mapping[str, Any]] | None = None
    weight_schedule_type: str | None = None
    block_size: int = 1000
    stop_strategy: str = "restart"
    mode: str = "greedy"
    seed: int | None = None

    def to_mixture(self, sources: Sequence[SourceConfig]) -> MixtureConfig:
        """The :class:`~mixtape.MixtureConfig` of ``sources`` mixed this way (validated)."""
        weights = self.weights
        if weights is not None and not isinstance(weights, Mapping):
            if isinstance(weights, str) or len(weights) != len(sources):
                raise ValueError(f"MixStageConfig.weights: a list needs one weight per dataset "
                                 f"({len(sources)}: {[s.name for s in sources]}), got "
                                 f"{weights!r}")  # fmt: skip
            weights = {s.name: w for s, w in zip(sources, weights, strict=True)}
        schedule = None if self.weight_schedule is None else tuple(self.weight_schedule)
        return MixtureConfig(sources=tuple(sources), weights=weights,
                             weight_schedule=schedule,  # type: ignore[arg-type]
                             weight_schedule_type=self.weight_schedule_type,
                             block_size=self.block_size, stop_strategy=self.stop_strategy,
                             mode=self.mode, seed=self.seed)  # fmt: skip


@dataclass(frozen=True)
class PackStageConfig(PackingConfig):
    """:class:`~mixtape.PackingConfig` plus the packed collator's ``attention`` ("flash" |
    "sdpa" | "eager": what the model's attention needs, position ids or a block mask)."""

    attention: str | None = None

    def to_packing(self) -> PackingConfig:
        """The plain :class:`~mixtape.PackingConfig`."""
        own = {f.name for f in dataclasses.fields(PackingConfig)}
        return PackingConfig(**{k: getattr(self, k) for k in own})


@dataclass(frozen=True)
class PipelineConfig:
    """A whole pipeline: ``datasets`` (:class:`DatasetConfig`), ``tokenize`` (the default for
    datasets without a tokenizer), ``mix``, ``pack`` (None: padded batches), ``load``."""

    datasets: Sequence[DatasetConfig]
    load: DataLoaderConfig
    mix: MixStageConfig = field(default_factory=MixStageConfig)
    pack: PackStageConfig | PackingConfig | None = None
    tokenize: TokenizeStageConfig | None = None

    def __post_init__(self) -> None:
        w = functools.partial(field_where, "PipelineConfig")
        if isinstance(self.datasets, (str, Mapping)) or not isinstance(self.datasets, Sequence):
            raise TypeError(f"{w('datasets')} must be a list of DatasetConfig, got "
                            f"{self.datasets!r}")  # fmt: skip
        if not self.datasets:
            raise ValueError(f"{w('datasets')} is empty: add at least one dataset")
        for i, d in enumerate(self.datasets):
            if not isinstance(d, SourceConfig):
                raise TypeError(f"{w('datasets')}[{i}] must be a DatasetConfig, got {d!r}")
        object.__setattr__(self, "datasets", tuple(self.datasets))
        for key, cls in (("load", DataLoaderConfig), ("mix", MixStageConfig)):
            if not isinstance(getattr(self, key), cls):
                raise TypeError(f"{w(key)} must be a {cls.__name__}, got {getattr(self, key)!r}")
        if self.pack is not None and not isinstance(self.pack, PackingConfig):
            raise TypeError(f"{w('pack')} must be a PackStageConfig or None, got {self.pack!r}")

    def to_data_config(self) -> DataConfig:
        """The equivalent :class:`~mixtape.DataConfig` (without the tokenizer objects)."""
        sources = [d.to_source() if isinstance(d, DatasetConfig) else d for d in self.datasets]
        pack = self.pack.to_packing() if isinstance(self.pack, PackStageConfig) else self.pack
        load = self.load
        attention = getattr(self.pack, "attention", None)
        if attention is not None and load.collate_fn is None:
            load = dataclasses.replace(load, collate_fn="packed",
                                       collate_kwargs={"attention": attention})  # fmt: skip
        return DataConfig(mixture=self.mix.to_mixture(sources), packing=pack, loader=load)

    def shared_tokenizer(self) -> list[str]:
        """Datasets tokenized by the pipeline's ``tokenize`` stage rather than their own (it
        skips those that are token ids already)."""
        return [d.name for d in self.datasets if getattr(d, "tokenizer", None) is None]

    def tokenize_stages(self) -> dict[str, TokenizeStageConfig | None]:
        """Each dataset's tokenization (None: it holds token ids already)."""
        return {d.name: d.tokenize_stage(self.tokenize) if isinstance(d, DatasetConfig)
                else (None if self.tokenize is None else dataclasses.replace(
                    self.tokenize, text_field=d.text_field or self.tokenize.text_field))
                for d in self.datasets}  # fmt: skip


# --------------------------------------------------------------------------------------------
# The one build path
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _tokenizer_from(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object: given, or loaded (once per path) from a path / name."""
    if isinstance(tokenizer, (str, os.PathLike)):
        return _tokenizer_from(os.fspath(tokenizer))
    return tokenizer


def _tokenized(name: str, source: Any, stage: TokenizeStageConfig, column: str) -> Any:
    """``source`` (an opened source) tokenized by ``stage``: a PreprocessedDataset (map-style)
    or a StreamingPreprocessedDataset."""
    from mixtape.preprocess import create_preprocessed_dataset

    data = getattr(source, "dataset", None)
    if data is None or not hasattr(data, "map"):
        raise TypeError(f"source {name!r} opens as a {type(source).__name__}, not a HF dataset "
                        f"of records, so it cannot be tokenized: give it data files, a path or "
                        f"an HF Dataset, or token ids and no tokenizer")  # fmt: skip
    if column != "input_ids":
        raise ValueError(f"source {name!r}: tokenizing writes 'input_ids', but the loader reads "
                         f"column {column!r}")  # fmt: skip
    return create_preprocessed_dataset(
        data, _load_tokenizer(stage.tokenizer), text_field=stage.text_field or "text",
        max_length=stage.max_length, add_eos=stage.add_eos, name=name)  # fmt: skip


def _check_tokens(name: str, source: Any, column: str) -> None:
    """A source read without a tokenizer must hold the token column."""
    data = getattr(source, "dataset", None)
    fields = getattr(data, "column_names", None)
    if isinstance(fields, list) and column not in fields:
        raise ValueError(f"source {name!r} has no {column!r} field (fields: {fields}): give a "
                         f"tokenizer (build_from_config(tokenizer=...), the config's "
                         f"'tokenizer', or the dataset's) or pre-tokenized data")  # fmt: skip


def build_mixed_dataset(config: DataConfig | str | os.PathLike[str], tokenizer: Any = None, *,
                        tokenizers: Mapping[str, TokenizeStageConfig | None] | None = None,
                        shared: Collection[str] = ()) -> MixedDataset:  # fmt: skip
    """The :class:`~mixtape.MixedDataset` of a config: each source opened, tokenized when a
    tokenizer applies, and mixed as ``config.mixture`` says.

    Tokenizer of a source: ``tokenizers[name]`` when given (None: not tokenized), else
    ``tokenizer`` (an object, a path or a name), else the config's ``tokenizer``. A source that
    is token ids already (``.npy``) is skipped by a shared tokenizer (``tokenizer``, the
    config's, or a ``tokenizers`` entry whose name is in ``shared``); its own is an error.

    The loader's ``shuffle`` is the mixture's ``shuffle_rows`` (each pass of a source in a fresh
    seeded order), and a schedule's step is ``loader.batch_size`` positions: one global batch
    (under ``W`` ranks an optimiser step takes ``W`` of them; when packing, positions are
    documents, not rows).
    """
    cfg = load_data_config(config) if isinstance(config, (str, os.PathLike)) else config
    if not isinstance(cfg, DataConfig):
        raise TypeError(f"build_mixed_dataset: config must be a DataConfig or a YAML path, got "
                        f"{config!r}")  # fmt: skip
    mix = cfg.build_mixture()
    res = cfg.resolved()
    column = "input_ids" if cfg.packing is None else cfg.packing.column
    default = _load_tokenizer(tokenizer if tokenizer is not None else cfg.tokenizer)
    sources: dict[str, Any] = {}
    by_name = {s.name: s for s in cfg.mixture.sources}
    for name, entry in mix["sources"].items():
        if tokenizers is not None and name in tokenizers:
            stage = tokenizers[name]
        elif default is not None:
            stage = TokenizeStageConfig(default, text_field=by_name[name].text_field)
        else:
            stage = None
        opened = entry.load()
        own = tokenizers is not None and name in tokenizers and name not in shared
        if stage is not None and getattr(opened, "dataset", None) is None and not own:
            stage = None  # token ids already (a .npy source): the shared tokenizer skips it
        if stage is None:
            _check_tokens(name, opened, column)
            sources[name] = entry
        else:
            sources[name] = _tokenized(name, opened, stage, column)
    return MixedDataset(sources, mix["weights"], schedule=mix["schedule"], seed=mix["seed"],
                        mode=mix["mode"], block_size=mix["block_size"],
                        stop_strategy=mix["stop_strategy"], batch_size=res.loader.batch_size,
                        shuffle_rows=res.loader.shuffle)  # fmt: skip


def _loader_config(cfg: DataConfig, pad_id: int, attention: str | None) -> DataLoaderConfig:
    """``cfg.loader`` with the packing cascade applied and the collator chosen: the configured
    one, else ``packed`` (with ``attention`` and the packing's pad values) when packing, else
    ``causal_lm`` padded with ``pad_id``. A registered text collator gets the pad id too unless
    its ``collate_kwargs`` set one."""
    ld = cfg.loader
    pk = cfg.packing
    kw: dict[str, Any] = {"shuffle": False}  # the mixture's order is its own (shuffle_rows)
    if pk is not None:
        for key, default in _UNUSED_BY_LOADER.items():
            if getattr(pk, key) != default:
                raise ValueError(f"packing.{key}={getattr(pk, key)!r} is not used by the "
                                 f"loader's per-batch packer (it belongs to pack_sequences / "
                                 f"PackingStream): leave it at {default!r}")  # fmt: skip
        check_loader_overflow("packing.overflow", pk.overflow)
        kw.update(packing=pk.strategy, max_length=pk.max_length)
    if pk is not None or ld.packing is not None:
        collate_kwargs = dict(ld.collate_kwargs)
        if ld.collate_fn is None or ld.collate_fn == "packed":
            if attention is not None:
                collate_kwargs.setdefault("attention", attention)
            if not ({"attention", "model", "config"} & set(collate_kwargs)):
                raise ValueError("packing needs the model's attention for the packed collator: "
                                 "pass attention='flash' | 'sdpa' | 'eager', or set "
                                 "loader.collate_fn: packed and loader.collate_kwargs."
                                 "attention in the config")  # fmt: skip
            collate_kwargs.setdefault("pad_token_id", pad_id if pk is None else pk.pad_value)
            if pk is not None:
                collate_kwargs.setdefault("label_pad_token_id", pk.label_pad_value)
            kw.update(collate_fn="packed", collate_kwargs=collate_kwargs)
        elif isinstance(ld.collate_fn, str):
            raise ValueError(f"loader.collate_fn={ld.collate_fn!r} with packing: packed rows "
                             f"are read by the 'packed' collator (or a callable)")  # fmt: skip
    elif ld.collate_fn is None:
        kw.update(collate_fn="causal_lm", collate_kwargs={"pad_token_id": pad_id})
    elif isinstance(ld.collate_fn, str) and ld.collate_fn in _PAD_COLLATORS:
        kw["collate_kwargs"] = {"pad_token_id": pad_id, **ld.collate_kwargs}
    return dataclasses.replace(ld, **kw)


def build_from_config(config: DataConfig | str | os.PathLike[str], tokenizer: Any = None, *,
                      attention: str | None = None,
                      tokenizers: Mapping[str, TokenizeStageConfig | None] | None = None,
                      shared: Collection[str] = ()) -> tuple[MixedDataset, Loader]:  # fmt: skip
    """A YAML file (or a :class:`~mixtape.DataConfig`) as ``(MixedDataset, Loader)`` in one
    call: :func:`build_mixed_dataset`, then :class:`~mixtape.DataLoaderFactory` with
    ``config.loader`` (packing from ``config.packing``; ``attention`` for the packed collator
    unless the config names it; ``tokenizers`` / ``shared`` as in :func:`build_mixed_dataset`)."""
    cfg = load_data_config(config) if isinstance(config, (str, os.PathLike)) else config
    if not isinstance(cfg, DataConfig):
        raise TypeError(f"build_from_config: config must be a DataConfig or a YAML path, got "
                        f"{config!r}")  # fmt: skip
    tok = _load_tokenizer(tokenizer if tokenizer is not None else cfg.tokenizer)
    if tok is None and tokenizers:  # the pipeline's per-dataset tokenizers: the first one's pad
        tok = next((_load_tokenizer(t.tokenizer) for t in tokenizers.values() if t is not None),
                   None)  # fmt: skip
    pad = 0 if tok is None else (_pad_id(tok) or 0)  # padding is masked by length either way
    loader_cfg = _loader_config(cfg, pad, attention)  # checked before opening any data
    mixed = build_mixed_dataset(cfg, tok, tokenizers=tokenizers, shared=shared)
    pk = cfg.packing
    own = {} if pk is None else {"overflow": pk.overflow, "column": pk.column}
    return mixed, DataLoaderFactory().create_dataloader(mixed, loader_cfg, **own)


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pipeline:
    """``Pipeline().source(...).tokenize(...).mix(...).pack(...).load(...).build()`` -> a
    :class:`~mixtape.Loader` of training batches; or ``Pipeline.from_config(PipelineConfig)``.

    Each step returns a new pipeline. ``source`` adds a dataset (:class:`DatasetConfig`
    arguments); ``tokenize`` sets the tokenizer of datasets without their own; ``mix`` the
    weights and mixing options; ``pack`` packs into rows (optional); ``load`` the loader's
    options (``batch_size`` required). :meth:`config` is the :class:`PipelineConfig`.
    """

    datasets: tuple[DatasetConfig, ...] = ()
    tokenize_stage: TokenizeStageConfig | None = None
    mix_stage: MixStageConfig = field(default_factory=MixStageConfig)
    pack_stage: PackStageConfig | PackingConfig | None = None
    load_stage: DataLoaderConfig | None = None

    @classmethod
    def from_config(cls, config: PipelineConfig) -> Pipeline:
        """The pipeline of a :class:`PipelineConfig`."""
        if not isinstance(config, PipelineConfig):
            raise TypeError(f"Pipeline.from_config takes a PipelineConfig, got {config!r}")
        return cls(tuple(config.datasets), config.tokenize, config.mix, config.pack,
                   config.load)  # fmt: skip

    def source(self, name: str, path: str | os.PathLike[str] | None = None,
               **options: Any) -> Pipeline:  # fmt: skip
        """Add a dataset: :class:`DatasetConfig` ``(name, path, data_files=, dataset=, weight=,
        text_field=, tokenizer=, max_length=, ...)``."""
        if any(d.name == name for d in self.datasets):
            raise ValueError(f"Pipeline.source: a dataset named {name!r} was added already")
        d = DatasetConfig(name, path=None if path is None else os.fspath(path), **options)
        return dataclasses.replace(self, datasets=(*self.datasets, d))

    def tokenize(self, tokenizer: Any, *, text_field: str | None = None,
                 max_length: int | None = None,
                 add_eos: bool | None = None) -> Pipeline:  # fmt: skip
        """Tokenize every dataset that has no tokenizer of its own (added before or after)."""
        stage = TokenizeStageConfig(tokenizer, text_field, max_length, add_eos)
        return dataclasses.replace(self, tokenize_stage=stage)

    def mix(self, weights: Mapping[str, float] | Sequence[float] | None = None,
            **options: Any) -> Pipeline:  # fmt: skip
        """Mixing: ``weights`` and :class:`MixStageConfig` options (``weight_schedule``,
        ``weight_schedule_type``, ``block_size``, ``stop_strategy``, ``mode``, ``seed``)."""
        return dataclasses.replace(self, mix_stage=MixStageConfig(weights, **options))

    def pack(self, strategy: str = "bfd", *, max_length: int, attention: str | None = None,
             **options: Any) -> Pipeline:  # fmt: skip
        """Pack documents into rows of ``max_length`` tokens (:class:`PackStageConfig`)."""
        stage = PackStageConfig(strategy, max_length, attention=attention, **options)
        return dataclasses.replace(self, pack_stage=stage)

    def load(self, batch_size: int, **options: Any) -> Pipeline:
        """Loader options: :class:`~mixtape.DataLoaderConfig` fields."""
        return dataclasses.replace(self, load_stage=DataLoaderConfig(batch_size, **options))

    def config(self) -> PipelineConfig:
        """The :class:`PipelineConfig` built so far (validated)."""
        if not self.datasets:
            raise ValueError("Pipeline: no datasets; call .source(name, path_or_data_files=...)")
        if self.load_stage is None:
            raise ValueError("Pipeline: no loader options; call .load(batch_size=...)")
        return PipelineConfig(self.datasets, self.load_stage, self.mix_stage, self.pack_stage,
                              self.tokenize_stage)  # fmt: skip

    def build_with_dataset(self) -> tuple[MixedDataset, Loader]:
        """``(MixedDataset, Loader)``, through :func:`build_from_config`."""
        pc = self.config()
        attention = getattr(pc.pack, "attention", None)
        return build_from_config(pc.to_data_config(), attention=attention,
                                 tokenizers=pc.tokenize_stages(),
                                 shared=pc.shared_tokenizer())  # fmt: skip

    def build(self) -> Loader:
        """The :class:`~mixtape.Loader` of training batches."""
        return self.build_with_dataset()[1]
