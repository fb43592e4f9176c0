"""Convenience layers over the one loader: :class:`DataLoaderBuilder` (fluent) and
:class:`UniversalDataModule` (train / validation split, Lightning-style).

Both only fill a :class:`~mixtape.DataLoaderConfig` and call
:class:`~mixtape.DataLoaderFactory`, so a loader built either way is the loader ``get_loader``
builds from the same settings (same batches, same state, same guarantees).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.utils.data

from mixtape.collate.registry import CollatorRegistry
from mixtape.loader import DataLoaderFactory, Loader
from mixtape.loader_config import DataLoaderConfig
from mixtape.mixing import MixedDataset

__all__ = [
    "DataLoaderBuilder",
    "DataModuleProtocol",
    "TensorListDataset",
    "UniversalDataModule",
]

# Loader arguments that are not DataLoaderConfig fields
_LOADER_OWN = ("overflow", "column", "drop_empty")
_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(DataLoaderConfig))
# Text collators whose first argument is the pad id (filled from the tokenizer when not given).
_PAD_COLLATORS = ("padding", "causal_lm", "seq2seq", "packed")
LOADER_OVERFLOW = ("split", "truncate")  # what the loader's per-batch packer implements


def check_loader_overflow(where: str, overflow: object) -> None:
    """The loader packs with ``split`` or ``truncate``; other policies would be ignored."""
    if overflow not in LOADER_OVERFLOW:
        raise ValueError(f"{where}={overflow!r}: the loader packs with {list(LOADER_OVERFLOW)} "
                         f"(long documents split into row-sized pieces, or truncated)")


def _default_shuffle(dataset: Any) -> bool:
    """A map-style dataset is shuffled by default; a mixture (its own seeded order) or another
    iterable dataset (torch cannot shuffle it) is not."""
    return not isinstance(dataset, (MixedDataset, torch.utils.data.IterableDataset))


# --------------------------------------------------------------------------------------------
# The fluent builder
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataLoaderBuilder:
    """Fluent construction of a :class:`~mixtape.Loader`.

    ``DataLoaderBuilder().with_dataset(ds).with_batch_size(32).with_workers(4).build()``. Each
    ``with_*`` returns a new builder (a half-built one can be branched); :meth:`config` is the
    :class:`DataLoaderConfig` it fills and :meth:`build` hands it to
    :class:`DataLoaderFactory`. Unset options keep the config's defaults (pin memory, prefetch,
    persistent workers and horizon chosen automatically; shuffle on for map-style datasets, off
    for a :class:`MixedDataset`, whose order is its own seeded one, and other iterables).
    """

    dataset: Any = None
    options: Mapping[str, Any] = field(default_factory=dict)
    loader_options: Mapping[str, Any] = field(default_factory=dict)

    def _with(self, **options: Any) -> DataLoaderBuilder:
        return dataclasses.replace(self, options={**self.options, **options})

    def with_dataset(self, dataset: Any) -> DataLoaderBuilder:
        """The data: a :class:`MixedDataset` (exact, resumable, packable), or any torch / HF
        dataset (a plain seeded DataLoader underneath)."""
        if dataset is None:
            raise ValueError("DataLoaderBuilder.with_dataset: dataset is None")
        return dataclasses.replace(self, dataset=dataset)

    def with_batch_size(self, batch_size: int) -> DataLoaderBuilder:
        """Examples (or packed rows) per batch, per rank."""
        return self._with(batch_size=batch_size)

    def with_workers(self, num_workers: int, *, pin_memory: bool | None = None,
                     prefetch_factor: int | None = None, persistent_workers: bool | None = None,
                     batches_per_task: int | None = None) -> DataLoaderBuilder:  # fmt: skip
        """DataLoader workers; ``None`` options are chosen automatically (pin memory when CUDA is
        available; prefetch 2 and persistent workers when there are workers; batches per worker
        task as :class:`DataLoaderConfig` says)."""
        return self._with(num_workers=num_workers, pin_memory=pin_memory,
                          prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
                          batches_per_task=batches_per_task)  # fmt: skip

    def with_distributed(self, rank: int, world_size: int) -> DataLoaderBuilder:
        """Serve rank ``rank`` of ``world_size`` (default: read from torch.distributed)."""
        return self._with(rank=rank, world_size=world_size)

    def with_packing(self, strategy: str = "bfd", *, max_length: int,
                     attention: str | None = None, overflow: str = "split",
                     **collate_kwargs: Any) -> DataLoaderBuilder:  # fmt: skip
        """Pack documents into ``max_length``-token rows with ``strategy`` (a planner strategy),
        collated by the ``packed`` collator with ``attention`` ("flash" | "sdpa" | "eager"; or
        ``model=`` / ``config=`` in ``collate_kwargs``). Needs a :class:`MixedDataset`."""
        check_loader_overflow("DataLoaderBuilder.with_packing: overflow", overflow)
        kw = dict(collate_kwargs)
        if attention is not None:
            kw["attention"] = attention
        if "attention" not in kw and "model" not in kw and "config" not in kw:
            raise ValueError("DataLoaderBuilder.with_packing: the packed collator needs the "
                             "model's attention: pass attention='flash' | 'sdpa' | 'eager' (or "
                             "model=... / config=...)")  # fmt: skip
        out = self._with(packing=strategy, max_length=max_length, collate_fn="packed",
                         collate_kwargs=kw)  # fmt: skip
        return dataclasses.replace(out, loader_options={**self.loader_options,
                                                        "overflow": overflow})  # fmt: skip

    def with_collator(self, collator: str | Callable[..., Any],
                      **kwargs: Any) -> DataLoaderBuilder:  # fmt: skip
        """The collator: a name registered in :class:`~mixtape.CollatorRegistry` (built with
        ``kwargs``) or a callable (then ``kwargs`` must be empty)."""
        if not isinstance(collator, str) and kwargs:
            raise ValueError(f"DataLoaderBuilder.with_collator: keyword arguments {sorted(kwargs)} "
                             f"build a registered collator; {collator!r} is a callable, "
                             f"configure it yourself")  # fmt: skip
        packing = self.options.get("packing")
        if packing is not None and collator != "packed":
            raise ValueError(f"DataLoaderBuilder.with_collator({collator!r}): with_packing "
                             f"collates with the 'packed' collator; call with_collator('packed', "
                             f"...) or drop with_packing")  # fmt: skip
        return self._with(collate_fn=collator, collate_kwargs=dict(kwargs))

    def with_seed(self, seed: int) -> DataLoaderBuilder:
        """Seeds the shuffle order and the workers (a mixture's draws use its own seed)."""
        return self._with(seed=seed)

    def with_horizon(self, horizon: int) -> DataLoaderBuilder:
        """Batches between ``update_weights`` and its effect (at least the batches in flight)."""
        return self._with(horizon=horizon)

    def with_shuffle(self, shuffle: bool) -> DataLoaderBuilder:
        """Shuffle a map-style dataset each epoch (seeded)."""
        return self._with(shuffle=shuffle)

    def with_drop_last(self, drop_last: bool = True) -> DataLoaderBuilder:
        """Drop a last batch shorter than ``batch_size``."""
        return self._with(drop_last=drop_last)

    def with_options(self, **options: Any) -> DataLoaderBuilder:
        """Any other :class:`DataLoaderConfig` field, or the loader's ``overflow`` / ``column``."""
        own = {k: options.pop(k) for k in _LOADER_OWN if k in options}
        if "overflow" in own:
            check_loader_overflow("DataLoaderBuilder.with_options: overflow", own["overflow"])
        unknown = sorted(set(options) - _CONFIG_FIELDS)
        if unknown:
            raise ValueError(f"DataLoaderBuilder.with_options: {unknown} are not DataLoaderConfig "
                             f"fields (fields: {sorted(_CONFIG_FIELDS)}) nor "
                             f"{list(_LOADER_OWN)}")  # fmt: skip
        out = self._with(**options)
        return dataclasses.replace(out, loader_options={**self.loader_options, **own})

    def config(self) -> DataLoaderConfig:
        """The :class:`DataLoaderConfig` this builder fills (validated)."""
        if "batch_size" not in self.options:
            raise ValueError("DataLoaderBuilder: no batch size; call .with_batch_size(n)")
        opts = dict(self.options)
        collate = opts.get("collate_fn")
        if opts.get("packing") is not None and isinstance(collate, str) and collate != "packed":
            raise ValueError(f"DataLoaderBuilder: packing={opts['packing']!r} makes packed rows, "
                             f"which the {collate!r} collator does not read; use "
                             f"with_packing(..., attention=...) or "
                             f"collate_fn='packed'")  # fmt: skip
        if "shuffle" not in opts:
            opts["shuffle"] = True if self.dataset is None else _default_shuffle(self.dataset)
        return DataLoaderConfig(**opts)

    def build(self) -> Loader:
        """The :class:`~mixtape.Loader` (through :class:`DataLoaderFactory`)."""
        if self.dataset is None:
            raise ValueError("DataLoaderBuilder.build: no dataset; call .with_dataset(ds) first")
        return DataLoaderFactory().create_dataloader(self.dataset, self.config(),
                                                     **self.loader_options)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Data modules
# --------------------------------------------------------------------------------------------


@runtime_checkable
class DataModuleProtocol(Protocol):
    """What a trainer needs of a data module (Lightning's ``LightningDataModule`` shape)."""

    def setup(self, stage: str | None = None) -> None: ...

    def train_dataloader(self) -> Any: ...

    def val_dataloader(self) -> Any: ...


class TensorListDataset(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """A list of 1-D token tensors as a map-style dataset of ``{key: tensor}`` examples."""

    def __init__(self, tensors: Sequence[torch.Tensor], key: str = "input_ids") -> None:
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"TensorListDataset: item {i} is a {type(t).__name__}, not a "
                                f"tensor")  # fmt: skip
            if t.dim() != 1:
                raise ValueError(f"TensorListDataset: item {i} has shape {tuple(t.shape)}; "
                                 f"token sequences are 1-D")  # fmt: skip
        self.tensors = list(tensors)
        self.key = key

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {self.key: self.tensors[i]}


def _is_tensor_list(data: Any) -> bool:
    return (isinstance(data, (list, tuple)) and len(data) > 0
            and all(isinstance(t, torch.Tensor) for t in data))  # fmt: skip


def _length(where: str, data: Any) -> int:
    try:
        n = len(data)
    except TypeError:
        raise TypeError(f"UniversalDataModule: {where} is a {type(data).__name__} without a "
                        f"length; give a map-style dataset (HF Dataset, torch Dataset, list of "
                        f"tensors), or a MixedDataset with val_data / val_split=None") from None
    if n == 0:
        raise ValueError(f"UniversalDataModule: {where} is empty (0 examples)")
    return int(n)


def _subset(data: Any, indices: list[int]) -> Any:
    """Rows ``indices`` of ``data``, keeping its type where it has ``select`` (HF Dataset,
    PreprocessedDataset)."""
    if hasattr(data, "select") and not isinstance(data, torch.utils.data.Subset):
        return data.select(indices)
    return torch.utils.data.Subset(data, indices)


def _pad_id(tokenizer: Any) -> int | None:
    """The tokenizer's pad id, else its EOS id (GPT-2 style tokenizers have no pad token; the
    collators mask padding by length, so any id is safe there)."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, numbers.Integral) and not isinstance(v, bool):
            return int(v)
    return None


class UniversalDataModule:
    """Training and validation loaders for one dataset, split reproducibly.

    ``train_data``: an HF ``Dataset`` (of ``input_ids``, or of text in ``text_field``,
    tokenized with ``tokenizer`` by a cached :class:`~mixtape.PreprocessedDataset`), a torch
    map-style dataset, a list of 1-D token tensors (wrapped as :class:`TensorListDataset`,
    examples ``{"input_ids": t}``), or a :class:`MixedDataset` (then not split: give
    ``val_data`` or ``val_split=None``). ``val_data``: the same kinds.
    Validation: ``val_data`` when given (it wins over ``val_split``); else ``val_split`` of
    ``train_data``: a fraction in (0, 1) (``round(n * fraction)`` examples, half up) or an int
    count, drawn by a permutation seeded with ``seed`` (the same split in every run and
    process); ``None`` or 0: no validation set (``val_dataloader`` raises).

    Collator: ``collator`` (a registered name or a callable), else the modality's: ``"text"`` ->
    ``causal_lm`` padded with the tokenizer's pad id (its EOS id when it has none), or 0 without
    a tokenizer (padding is masked by length, so 0 only shows in the padded ``input_ids``);
    another modality -> its registry default (``"vision"`` -> ``vision``). A registered text
    collator named in ``collator`` gets the same pad id unless ``collate_kwargs`` sets one.

    ``loader_options``: further :class:`DataLoaderConfig` fields (``pin_memory``,
    ``drop_last``, ``horizon``, ``rank``, ``world_size``, ``collate_kwargs``, ...) and the
    loader's ``overflow`` / ``column``. The training loader is shuffled (seeded; a mixture keeps
    its own order); the validation loader is not. A batch size above the training set's size
    gives one short batch per epoch (torch's rule), or is an error with ``drop_last=True``
    (it would give none).
    """

    def __init__(self, train_data: Any, val_data: Any = None, val_split: float | int | None = 0.1,
                 tokenizer: Any = None, batch_size: int = 8, num_workers: int = 0, seed: int = 0,
                 collator: str | Callable[..., Any] | None = None, modality: str = "text",
                 text_field: str = "text", **loader_options: Any) -> None:  # fmt: skip
        if train_data is None:
            raise ValueError("UniversalDataModule: train_data is None")
        self.tokenizer = tokenizer
        self.modality = modality
        self.text_field = text_field
        self.train_data = self._prepare("train_data", train_data)
        self.val_data = None if val_data is None else self._prepare("val_data", val_data)
        self.val_split = val_split
        self.seed = seed
        self.loader_own = {k: loader_options.pop(k) for k in _LOADER_OWN if k in loader_options}
        unknown = sorted(set(loader_options) - _CONFIG_FIELDS)
        if unknown:
            raise ValueError(f"UniversalDataModule: {unknown} are not DataLoaderConfig fields "
                             f"(fields: {sorted(_CONFIG_FIELDS)}) nor "
                             f"{list(_LOADER_OWN)}")  # fmt: skip
        if "collate_fn" in loader_options:
            raise ValueError("UniversalDataModule: give the collator as collator=..., not "
                             "collate_fn")  # fmt: skip
        shuffle = loader_options.pop("shuffle", _default_shuffle(self.train_data))
        self.pad_token_id = 0 if tokenizer is None else _pad_id(tokenizer)
        if self.pad_token_id is None:
            raise ValueError(f"UniversalDataModule: tokenizer {type(tokenizer).__name__} has "
                             f"neither pad_token_id nor eos_token_id; set one, or pass "
                             f"collator=... with its pad id in collate_kwargs")  # fmt: skip
        collate_fn, collate_kwargs = self._collator(collator,
                                                    dict(loader_options.pop("collate_kwargs",
                                                                            {})))  # fmt: skip
        # The one config both loaders come from (validated now, so a bad option fails here).
        self.config = DataLoaderConfig(batch_size=batch_size, num_workers=num_workers, seed=seed,
                                       collate_fn=collate_fn, collate_kwargs=collate_kwargs,
                                       shuffle=shuffle,
                                       **loader_options)  # fmt: skip
        self._check_split_args()
        self.train_dataset: Any = None
        self.val_dataset: Any = None
        self._train_loader: Loader | None = None
        self._val_loader: Loader | None = None

    def _prepare(self, where: str, data: Any) -> Any:
        """``data`` as a dataset: tensors wrapped; an HF ``Dataset`` of text (no ``input_ids``)
        tokenized with the tokenizer (a :class:`~mixtape.PreprocessedDataset`, cached)."""
        if isinstance(data, (list, tuple)) and not data:
            raise ValueError(f"UniversalDataModule: {where} is empty (0 examples)")
        if _is_tensor_list(data):
            return TensorListDataset(data)
        fields = getattr(data, "column_names", None)
        if self.modality != "text" or not isinstance(fields, list) or "input_ids" in fields:
            return data
        if self.tokenizer is None:
            raise ValueError(f"UniversalDataModule: {where} has no 'input_ids' field (fields: "
                             f"{fields}); pass tokenizer=... to tokenize its "
                             f"{self.text_field!r} field, or tokenized data")  # fmt: skip
        from mixtape.preprocess import PreprocessedDataset

        if len(data) == 0:
            raise ValueError(f"UniversalDataModule: {where} is empty (0 examples)")
        return PreprocessedDataset(data, self.tokenizer, text_field=self.text_field,
                                   name=where.removesuffix("_data"))  # fmt: skip

    def _collator(self, collator: str | Callable[..., Any] | None,
                  kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:  # fmt: skip
        """(collate_fn, collate_kwargs) for the config: named through the registry."""
        if callable(collator) and not isinstance(collator, str):
            return collator, kwargs
        if collator is None:
            if self.modality == "text":
                name = "causal_lm"
            else:
                known = sorted({c.modality for c in CollatorRegistry.list_collators()})
                if self.modality not in known:
                    raise ValueError(f"UniversalDataModule: no collator for modality "
                                     f"{self.modality!r}; modalities: {known}, or pass "
                                     f"collator=...")  # fmt: skip
                # The registry's default for the modality (what get_collator(modality=) builds).
                name = CollatorRegistry.default_name(self.modality)
        else:
            name = collator
        if name in _PAD_COLLATORS:
            kwargs.setdefault("pad_token_id", self.pad_token_id)
        return name, kwargs

    def _check_split_args(self) -> None:
        v = self.val_split
        if self.val_data is not None or v is None:
            return
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"UniversalDataModule: val_split must be a fraction in (0, 1), an "
                            f"int count or None, got {v!r}")  # fmt: skip
        if isinstance(v, numbers.Integral):
            if v < 0:
                raise ValueError(f"UniversalDataModule: val_split={v} is a negative count")
        elif not (0.0 <= float(v) < 1.0) or not math.isfinite(float(v)):
            raise ValueError(f"UniversalDataModule: val_split={v!r} as a fraction must be in "
                             f"(0, 1) (or an int count of examples)")  # fmt: skip
        if v and isinstance(self.train_data, (MixedDataset, torch.utils.data.IterableDataset)):
            raise ValueError(f"UniversalDataModule: train_data is a "
                             f"{type(self.train_data).__name__}, which cannot be split; give "
                             f"val_data or val_split=None")  # fmt: skip

    def setup(self, stage: str | None = None) -> None:
        """Split (once; the same split in every call and process). ``stage`` is Lightning's
        ("fit", "validate", ...) and changes nothing: both sets are made together."""
        del stage
        if self.train_dataset is not None:
            return
        data = self.train_data
        if isinstance(data, (MixedDataset, torch.utils.data.IterableDataset)):
            self.train_dataset = data
        else:
            n = _length("train_data", data)
            v = self.val_split
            if self.val_data is None and v:
                if isinstance(v, numbers.Integral):
                    n_val = int(v)
                else:
                    n_val = math.floor(float(v) * n + 0.5)
                if not 0 < n_val < n:
                    raise ValueError(f"UniversalDataModule: val_split={v!r} of {n} examples "
                                     f"gives {n_val} validation and {n - n_val} training "
                                     f"examples; both need at least one")  # fmt: skip
                g = torch.Generator()
                g.manual_seed(self.seed)
                perm = torch.randperm(n, generator=g)
                self.val_dataset = _subset(data, sorted(perm[:n_val].tolist()))
                self.train_dataset = _subset(data, sorted(perm[n_val:].tolist()))
            else:
                self.train_dataset = data
            n_train = _length("the training set", self.train_dataset)
            if self.config.drop_last and self.config.batch_size > n_train:
                raise ValueError(f"UniversalDataModule: batch_size={self.config.batch_size} is "
                                 f"larger than the {n_train} training examples and drop_last is "
                                 f"set: every epoch would be empty")  # fmt: skip
        if self.val_data is not None:
            if not isinstance(self.val_data, torch.utils.data.IterableDataset):
                _length("val_data", self.val_data)
            self.val_dataset = self.val_data

    def train_dataloader(self) -> Loader:
        """The training loader, the same object on every call: each pass over it is the next
        epoch (a fresh shuffle seeded by ``seed`` and the epoch), so a trainer that asks again
        every epoch does not replay epoch 0; a mixture keeps its own order."""
        self.setup("fit")
        if self._train_loader is None:
            self._train_loader = DataLoaderFactory().create_dataloader(
                self.train_dataset, self.config, **self.loader_own)  # fmt: skip
        return self._train_loader

    def val_dataloader(self) -> Loader:
        """The validation loader, unshuffled, every example once (no ``drop_last``; over several
        ranks, uneven shares rather than examples repeated to even them, which would count twice
        in a metric)."""
        self.setup("validate")
        if self.val_dataset is None:
            raise ValueError("UniversalDataModule: no validation set; pass val_data or a "
                             "val_split (a fraction in (0, 1) or a count)")  # fmt: skip
        if self._val_loader is None:
            cfg = dataclasses.replace(self.config, shuffle=False, drop_last=False)
            self._val_loader = DataLoaderFactory().create_dataloader(
                self.val_dataset, cfg, even_shards=False, **self.loader_own)
        return self._val_loader

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position (the split is a function of ``seed``)."""
        return {"train": self.train_dataloader().state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume the training loader where :meth:`state_dict` was taken."""
        if not isinstance(state, Mapping) or "train" not in state:
            raise ValueError(f"UniversalDataModule.load_state_dict: expected a state_dict() "
                             f"mapping with 'train', got {state!r:.80}")  # fmt: skip
        self.train_dataloader().load_state_dict(state["train"])
