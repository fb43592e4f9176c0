"""How batches are loaded: :class:`DataLoaderConfig` (automatic choices made by
:meth:`~DataLoaderConfig.resolved`) and the seeded-worker recipe (:func:`seed_worker`,
:func:`make_generator`). Part of :class:`mixtape.config.DataConfig`.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.utils.data

from mixtape.collate.registry import CollatorRegistry
from mixtape.config_fields import (
    SEED_END,
    check_bool,
    check_choice,
    check_int,
    close_matches,
    field_where,
    optional,
    plain_fields,
    set_field,
)
from mixtape.ops import PACK_STRATEGIES

__all__ = ["DataLoaderConfig", "make_generator", "seed_worker"]


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` seeding numpy and ``random`` from the worker's torch seed.

    The PyTorch reproducibility recipe: torch seeds each worker with ``base_seed + worker_id``
    (``base_seed`` drawn from the loader's generator), so seeding from ``torch.initial_seed()``
    gives every worker its own stream, the same in every run with the same generator seed.
    """
    del worker_id  # torch.initial_seed() already includes it
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def make_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (in [0, 2**64)), for DataLoader's
    ``generator=``: it fixes the shuffle order and the workers' base seed."""
    seed = check_int("seed", seed, minimum=0, below=SEED_END)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


RING_BUDGET = 32 << 20  # shared memory per loader for batches collated by workers (bytes)


@dataclass(frozen=True)
class DataLoaderConfig:
    """How batches are loaded; ``None`` means chosen by :meth:`resolved`.

    ``pin_memory``: CUDA available. ``prefetch_factor``: 2 with workers, ``None`` without (torch
    refuses a prefetch factor without workers). ``persistent_workers``: ``num_workers > 0``.
    ``batches_per_task``: consecutive batches a worker makes per DataLoader task (a
    ``MixedDataset`` loader; each task costs a round trip through torch's queues, so packing
    loaders take 4 by default, fewer when the workers' shared-memory ring would pass
    ``RING_BUDGET`` or a given horizon would be too short; 1 otherwise, and always without
    workers). ``horizon`` (batches between a weight update being asked for and taking
    effect): at least ``(num_workers * prefetch_factor + 1) * batches_per_task``, the most
    batches planned ahead of the trainer plus one (1 without workers); the default is that
    minimum. ``packing``: a planner strategy
    (``ops.PACK_STRATEGIES``), which needs ``max_length``. ``rank`` / ``world_size``: given
    together, else read from ``torch.distributed`` when it is initialised (else 0 / 1).
    ``collate_fn``: a collator registered in :class:`~mixtape.CollatorRegistry` (built with
    ``collate_kwargs``) or a callable. ``seed`` seeds the shuffle order and the workers.
    """

    batch_size: int
    shuffle: bool = True
    num_workers: int = 0
    pin_memory: bool | None = None
    prefetch_factor: int | None = None
    persistent_workers: bool | None = None
    seed: int = 0
    drop_last: bool = False
    collate_fn: str | Callable[..., Any] | None = None
    packing: str | None = None
    max_length: int | None = None
    horizon: int | None = None
    batches_per_task: int | None = None
    rank: int | None = None
    world_size: int | None = None
    collate_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        w = functools.partial(field_where, "DataLoaderConfig")
        set_field(self, "batch_size", check_int(w("batch_size"), self.batch_size, minimum=1))
        set_field(self, "shuffle", check_bool(w("shuffle"), self.shuffle))
        workers = check_int(w("num_workers"), self.num_workers, minimum=0)
        set_field(self, "num_workers", workers)
        set_field(self, "pin_memory", optional(check_bool, w("pin_memory"), self.pin_memory))
        prefetch = optional(check_int, w("prefetch_factor"), self.prefetch_factor, minimum=1)
        set_field(self, "prefetch_factor", prefetch)
        persistent = optional(check_bool, w("persistent_workers"), self.persistent_workers)
        set_field(self, "persistent_workers", persistent)
        set_field(self, "seed", check_int(w("seed"), self.seed, minimum=0, below=SEED_END))
        set_field(self, "drop_last", check_bool(w("drop_last"), self.drop_last))
        if workers == 0 and self.prefetch_factor is not None:
            raise ValueError(f"{w('prefetch_factor')} is {self.prefetch_factor} with "
                             f"num_workers=0; torch takes a prefetch factor only with workers: "
                             f"leave it unset")  # fmt: skip
        if workers == 0 and self.persistent_workers:
            raise ValueError(f"{w('persistent_workers')} is true with num_workers=0; torch keeps "
                             f"workers alive only when there are some")  # fmt: skip
        if isinstance(self.collate_fn, str):
            known = [c.name for c in CollatorRegistry.list_collators()]
            if self.collate_fn not in known:
                near = close_matches(self.collate_fn, known)
                raise ValueError(f"{w('collate_fn')}: no collator named {self.collate_fn!r}"
                                 f"{near}; registered: {known}")  # fmt: skip
        elif self.collate_fn is not None and not callable(self.collate_fn):
            raise TypeError(f"{w('collate_fn')} must be a registered collator name or a "
                            f"callable, got {self.collate_fn!r}")  # fmt: skip
        if not isinstance(self.collate_kwargs, Mapping):
            raise TypeError(f"{w('collate_kwargs')} must be a mapping, "
                            f"got {self.collate_kwargs!r}")  # fmt: skip
        if self.collate_kwargs and not isinstance(self.collate_fn, str):
            raise ValueError(f"{w('collate_kwargs')} builds a registered collator: give "
                             f"collate_fn as its name (got {self.collate_fn!r})")  # fmt: skip
        set_field(self, "collate_kwargs", dict(self.collate_kwargs))
        if self.packing is not None:
            check_choice(w("packing"), self.packing, PACK_STRATEGIES)
            if self.max_length is None:
                raise ValueError(f"{w('max_length')} is required with packing={self.packing!r} "
                                 f"(the tokens per packed row)")  # fmt: skip
        optional(check_int, w("max_length"), self.max_length, minimum=1)
        optional(check_int, w("batches_per_task"), self.batches_per_task, minimum=1)
        if workers == 0 and (self.batches_per_task or 1) > 1:
            raise ValueError(f"{w('batches_per_task')} is {self.batches_per_task} with "
                             f"num_workers=0; it groups the batches of worker tasks: leave it "
                             f"unset")  # fmt: skip
        if self.horizon is not None:
            check_int(w("horizon"), self.horizon, minimum=1)
            if self.horizon < self.min_horizon:
                pf = self.prefetch_factor or 2
                g = self.task_batches
                raise ValueError(f"{w('horizon')} is {self.horizon}, but (num_workers x "
                                 f"prefetch_factor + 1) x batches_per_task = ({workers} x {pf} + "
                                 f"1) x {g} = {self.min_horizon} batches can be planned ahead of "
                                 f"the trainer, so a weight update can take effect reproducibly "
                                 f"only {self.min_horizon} or more batches after it is asked "
                                 f"for; set horizon >= {self.min_horizon} (or fewer "
                                 f"batches_per_task) or leave it unset")  # fmt: skip
        if (self.rank is None) != (self.world_size is None):
            raise ValueError(f"{w('rank')} and world_size are given together (or both left "
                             f"unset, read from torch.distributed); got rank={self.rank!r}, "
                             f"world_size={self.world_size!r}")  # fmt: skip
        if self.world_size is not None:
            ws = check_int(w("world_size"), self.world_size, minimum=1)
            check_int(w("rank"), self.rank, minimum=0)
            if not 0 <= int(self.rank) < ws:  # type: ignore[arg-type]
                raise ValueError(f"{w('rank')} must be in [0, world_size={ws}), got {self.rank}")

    @property
    def task_batches(self) -> int:
        """``batches_per_task``, or the automatic choice (see the class docstring)."""
        if self.batches_per_task is not None:
            return self.batches_per_task
        if self.num_workers == 0 or self.packing is None or self.max_length is None:
            return 1
        tasks = self.num_workers * (self.prefetch_factor or 2) + 1
        for g in (4, 3, 2):
            ring = (tasks * g + 3) * 32 * self.batch_size * self.max_length  # see Loader
            if ring <= RING_BUDGET and (self.horizon is None or self.horizon >= tasks * g):
                return g
        return 1

    @property
    def min_horizon(self) -> int:
        """The smallest valid horizon: ``(num_workers * prefetch_factor + 1) * batches_per_task``
        (1 without workers): after the trainer received batch ``b``, torch has asked for at most
        ``num_workers * prefetch_factor`` tasks beyond the one ``b`` came in."""
        if self.num_workers == 0:
            return 1
        return (self.num_workers * (self.prefetch_factor or 2) + 1) * self.task_batches

    def resolved(self) -> DataLoaderConfig:
        """A copy with every automatic (``None``) choice made for this machine and process."""
        if self.packing is None and self.max_length is not None:  # it would truncate nothing
            raise ValueError(f"DataLoaderConfig.max_length is {self.max_length} without packing: "
                             "it is the tokens per packed row; to truncate documents give the "
                             "tokenizer (or the tokenize stage) max_length, or set packing")
        workers = self.num_workers
        rank, world = self.rank, self.world_size
        if world is None:
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                rank, world = dist.get_rank(), dist.get_world_size()
            else:
                rank, world = 0, 1
        return dataclasses.replace(
            self,
            pin_memory=torch.cuda.is_available() if self.pin_memory is None else self.pin_memory,
            prefetch_factor=(self.prefetch_factor or 2) if workers else None,
            persistent_workers=(
                workers > 0 if self.persistent_workers is None else self.persistent_workers
            ),
            horizon=self.min_horizon if self.horizon is None else self.horizon,
            batches_per_task=self.task_batches,
            rank=rank,
            world_size=world,
        )

    def build_collate_fn(self) -> Callable[..., Any] | None:
        """The collate function: the registered collator built with ``collate_kwargs``, the
        callable given, or ``None`` (torch's default)."""
        if isinstance(self.collate_fn, str):
            kw = self.collate_kwargs
            fn: Callable[..., Any] = CollatorRegistry.get_collator(self.collate_fn, **kw)
            return fn
        return self.collate_fn

    def to_dataloader_kwargs(self, dataset: Any = None, *, batched: bool = False) -> dict[str, Any]:
        """Keyword arguments of ``torch.utils.data.DataLoader`` for the resolved config.

        Only what torch accepts for the worker count: ``prefetch_factor``, ``persistent_workers``
        and ``worker_init_fn`` (:func:`seed_worker`) only with workers. ``generator`` is
        :func:`make_generator` of ``seed``. A map-style ``dataset`` over several ranks gets a
        ``DistributedSampler`` (shuffle, seed and drop_last move there), so ``dataset`` is
        required then. ``batched=True``: the dataset yields whole batches, already partitioned
        by rank (``batch_size=None``; shuffle and drop_last are the dataset's business).
        An ``IterableDataset`` takes no shuffle: ``shuffle=True`` is then an error.
        """
        r = self.resolved()
        kw: dict[str, Any] = {"num_workers": r.num_workers, "pin_memory": r.pin_memory,
                              "generator": make_generator(r.seed)}  # fmt: skip
        if r.num_workers:
            kw.update(prefetch_factor=r.prefetch_factor, persistent_workers=r.persistent_workers,
                      worker_init_fn=seed_worker)  # fmt: skip
        collate = r.build_collate_fn()
        if collate is not None:
            kw["collate_fn"] = collate
        if batched:
            kw["batch_size"] = None
            return kw
        kw.update(batch_size=r.batch_size, drop_last=r.drop_last)
        if isinstance(dataset, torch.utils.data.IterableDataset):
            if r.shuffle:
                raise ValueError("DataLoaderConfig.shuffle is true but the dataset is an "
                                 "IterableDataset, which torch cannot shuffle: shuffle in the "
                                 "dataset and set shuffle=False")  # fmt: skip
            return kw
        assert r.world_size is not None and r.rank is not None
        if r.world_size > 1:
            if dataset is None:
                raise ValueError(f"world_size is {r.world_size}: pass the dataset so each rank "
                                 f"gets a DistributedSampler over its share")  # fmt: skip
            kw["sampler"] = torch.utils.data.DistributedSampler(
                dataset, num_replicas=r.world_size, rank=r.rank, shuffle=r.shuffle,
                seed=r.seed, drop_last=r.drop_last)  # fmt: skip
        else:
            kw["shuffle"] = r.shuffle
        return kw

    def to_dict(self) -> dict[str, Any]:
        """Fields as plain values (``None`` fields left out); ``from_dict`` inverts it."""
        return plain_fields(self)
