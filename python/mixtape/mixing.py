"""Weighted mixtures of named sources: an exact, resumable sequence of (source, example).

:class:`MixedDataset` turns named sources (anything :func:`mixtape.as_source` reads) and weights
into one sequence of examples. Which source serves global position ``i`` and which of its
examples it reads is a pure function of (seed, mode, weight timeline, i), computed in C++ by
:class:`~mixtape.sampler.SourceSampler`; a source's ordinal ``o`` (how many times it was chosen
before) maps to a row through a fresh seeded permutation per pass (:func:`permute_rows`), so no
index array is stored and any position is known without replay. Hence:

- the same config and seed give the same sequence, whatever the number of DataLoader workers;
- :meth:`MixedDataset.update_weights` changes the mixture from a position on (positions already
  produced keep theirs); the ``(position, weights)`` timeline is part of the state;
- ``state_dict()`` is a few integers plus the timeline, and a fresh object resumes bit for bit;
- stop strategies are defined on the global sequence, never per worker.

Streaming sources (``num_rows is None``) are read in their own order: their ordinal ``o`` is the
``o``-th example of the stream (a new pass restarts it); random access (:meth:`plan`) needs
map-style sources.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.context import get_spawning_popen
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import torch.utils.data

from mixtape import ops
from mixtape.gather import ArrowRows
from mixtape.ops import Int64Array
from mixtape.sampler import SourceSampler, permute_rows
from mixtape.schedule import WeightScheduler
from mixtape.source_files import DatasetMixture
from mixtape.sources import BaseSource, as_source

__all__ = [
    "MIX_MODES",
    "STOP_STRATEGIES",
    "MixPlan",
    "MixedDataset",
    "MixedShardedSource",
    "block_mixture_interleave",
    "mixture_weights",
]

MIX_MODES = ("greedy", "random", "block")
STOP_STRATEGIES = ("restart", "first_exhausted", "all_exhausted")
_CHUNK = 4096  # positions planned per step while iterating
_SCAN = 1 << 20  # positions per step when searching for the end of a finite mixture
STATE_VERSION = 1


@dataclass(frozen=True)
class MixPlan:
    """What positions ``[start, start + len)`` read: source index, row in it, and ordinal."""

    start: int
    sources: npt.NDArray[np.int32]
    rows: Int64Array
    ordinals: Int64Array

    def __len__(self) -> int:
        return int(self.sources.size)


def _named(sources: Any) -> tuple[list[str], list[Any]]:
    """(names, objects) of a mapping name -> source, or of a sequence of named sources."""
    if isinstance(sources, Mapping):
        names = [str(k) for k in sources]
        objs = list(sources.values())
    elif isinstance(sources, Sequence) and not isinstance(sources, str | bytes):
        names, objs = [], []
        for i, s in enumerate(sources):
            name = getattr(s, "name", None)
            if not isinstance(name, str) or not name:
                raise TypeError(
                    f"sources[{i}] ({type(s).__name__}) has no name: pass a dict name -> source, "
                    "or DatasetMixture / Source objects (which carry their name)"
                )
            names.append(name)
            objs.append(s)
    else:
        raise TypeError(f"sources must be a dict name -> source or a list of named sources, "
                        f"got {type(sources).__name__}")  # fmt: skip
    if not names:
        raise ValueError("a mixture needs at least one source")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"source names must be unique, {dup[0]!r} appears twice")
    return names, objs


def mixture_weights(
    weights: Any, names: Sequence[str], objs: Sequence[Any] = ()
) -> npt.NDArray[np.float64]:
    """Weights in source order (the sampler normalises them); None: DatasetMixture's, or equal."""
    if weights is None:
        raw = [float(getattr(o, "weight", 1.0)) if isinstance(o, DatasetMixture) else 1.0
               for o in objs]  # fmt: skip
        return np.asarray(raw, dtype=np.float64)
    if isinstance(weights, Mapping):
        unknown = [k for k in weights if k not in names]
        if unknown:
            raise ValueError(f"weights name {unknown[0]!r}, which is not a source; sources are "
                             f"{names}")  # fmt: skip
        missing = [n for n in names if n not in weights]
        if missing:
            raise ValueError(f"weights give no weight for source {missing[0]!r} (use 0 to pause "
                             "it)")  # fmt: skip
        return np.asarray([weights[n] for n in names], dtype=np.float64)
    arr = np.asarray(weights, dtype=np.float64)
    if arr.ndim != 1 or arr.size != len(names):
        raise ValueError(f"weights must be one per source ({len(names)}: {names}), got shape "
                         f"{arr.shape}")  # fmt: skip
    return arr


class MixedDataset(torch.utils.data.IterableDataset[dict[str, Any]]):
    """A weighted mixture of named sources, exact under workers, restarts and weight changes.

    Args:
        sources: name -> source (HF ``Dataset`` / ``IterableDataset``, torch datasets, files,
            ``DatasetMixture``, lists; anything :func:`mixtape.as_source` reads), or a list of
            ``DatasetMixture`` / named sources. The order is the mixture order (source ids).
        weights: name -> weight, or one per source, any non-negative numbers (normalised);
            None: the ``DatasetMixture`` weights, else equal. A zero weight pauses a source.
        seed: keys the sampler's draws and the per-pass row permutations.
        mode: ``"greedy"`` (deterministic, every prefix within a block of the weights),
            ``"random"`` (i.i.d. draws) or ``"block"`` (exact counts per block of
            ``block_size``, EasyDeL's semantics); see :class:`~mixtape.sampler.SourceSampler`.
        stop_strategy: ``"restart"`` (an exhausted source starts a new, freshly permuted pass;
            infinite), ``"first_exhausted"`` (stop before the first position that would start
            a second pass of a positive-weight source: positions between the last row of that
            source and its next pick still serve the other sources, where HF's
            ``interleave_datasets`` stops right after that row), ``"all_exhausted"`` (stop once
            every source with positive weight was read
            fully at least once; the others restart meanwhile, as HF's oversampling).
        schedule: a :class:`WeightScheduler` (or its points) over training steps; step ``t``
            starts at position ``t * batch_size``. ``update_weights`` replaces the schedule from
            the position it takes effect on.
        batch_size: examples per training step (the schedule's unit) and per DataLoader batch:
            ``DataLoader(ds, batch_size=B, num_workers=W)`` with ``ds.batch_size == B`` gives the
            single-process order exactly, since worker ``w`` serves batches ``w, w + W, ...``.
        shuffle_rows: read each pass of a map-style source in a fresh seeded order (False: in
            row order).
        shuffle: permute positions within each block (``block``: default True; ``greedy``:
            default False).
        schedule_every: for linear / cosine schedules, steps between timeline entries (default:
            one block of positions, at least one step).
        source_key: the key added to every example with its source's name.
    """

    def __init__(
        self,
        sources: Mapping[str, Any] | Sequence[Any],
        weights: Mapping[str, float] | Sequence[float] | None = None,
        *,
        seed: int = 0,
        mode: str = "greedy",
        block_size: int = 1000,
        stop_strategy: str = "restart",
        schedule: WeightScheduler | Sequence[Any] | None = None,
        batch_size: int = 1,
        shuffle_rows: bool = True,
        shuffle: bool | None = None,
        schedule_every: int | None = None,
        source_key: str = "__source__",
    ) -> None:
        ops.check_choice("mode", mode, MIX_MODES)
        ops.check_choice("stop_strategy", stop_strategy, STOP_STRATEGIES)
        self.source_names, self._objs = _named(sources)
        self.batch_size = ops.check_int("batch_size", batch_size, 1, 1 << 40)
        self.mode = mode
        self.stop_strategy = stop_strategy
        self.seed = ops.check_int("seed", seed, 0, (1 << 64) - 1)
        self.shuffle_rows = bool(shuffle_rows)
        self.source_key = source_key
        self._sampler = SourceSampler(
            mixture_weights(weights, self.source_names, self._objs), mode=mode, seed=self.seed,
            block_size=block_size, shuffle=shuffle, names=self.source_names,
        )  # fmt: skip
        if schedule is not None and not isinstance(schedule, WeightScheduler):
            schedule = WeightScheduler(schedule)
        if schedule is not None:
            extra = sorted(set(schedule.source_names) ^ set(self.source_names))
            if extra:
                raise ValueError(f"schedule names sources {schedule.source_names}, the mixture "
                                 f"has {self.source_names} (differs in {extra[0]!r})")  # fmt: skip
            if weights is not None:
                raise ValueError("give weights or schedule, not both (the schedule's first point "
                                 "is the starting mixture)")  # fmt: skip
        self.schedule = schedule
        self.schedule_every_given = schedule_every is not None
        if schedule_every is None:
            schedule_every = max(1, self._sampler.block_size // self.batch_size)
        self.schedule_every = ops.check_int("schedule_every", schedule_every, 1, 1 << 40)
        self._scheduled_until = 0  # positions below this have their schedule entries appended
        self._schedule_end: int | None = None  # an update_weights replaced the schedule here
        self._sources: list[BaseSource | None] = [None] * len(self.source_names)
        self._position = 0  # next position this process yields (the consumer's position)
        self._stream_lengths: dict[int, int] = {}  # streaming sources whose first pass ended
        self._stop: int | None = None  # end of a finite mixture, once known
        self._stop_version = -1
        self._version = 0  # bumped by every timeline change (invalidates planned chunks)
        self._updated_at: list[int] = []  # positions of update_weights calls (not the schedule's)
        # Pid of the process that iterates this dataset, shared with DataLoader workers: the
        # main process's copy has not advanced when a worker iterates (its state_dict is stale).
        self._iterated_by = multiprocessing.RawValue("q", 0)
        if schedule is not None:
            self._extend_schedule(1)

    # --- pickling (DataLoader workers) ------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if get_spawning_popen() is None:  # a plain pickle / deepcopy: the copy is its own
            state["_iterated_by"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._iterated_by is None:
            self._iterated_by = multiprocessing.RawValue("q", 0)

    # --- sources ---------------------------------------------------------------------------

    @property
    def num_sources(self) -> int:
        return len(self.source_names)

    def source(self, i: int | str) -> BaseSource:
        """Source ``i`` (index or name), opened on first use (``DatasetMixture`` loads lazily)."""
        k = self.source_names.index(i) if isinstance(i, str) else int(i)
        src = self._sources[k]
        if src is None:
            src = as_source(self._objs[k], self.source_names[k])
            self._sources[k] = src
        return src

    def _num_rows(self) -> list[int | None]:
        return [self.source(k).num_rows for k in range(self.num_sources)]

    @property
    def random_access(self) -> bool:
        """Whether every source is map-style (so :meth:`plan` can read any position)."""
        return all(n is not None for n in self._num_rows())

    # --- weights ----------------------------------------------------------------------------

    @property
    def weights(self) -> dict[str, float]:
        """The normalised weights in force at the next position this process yields."""
        w = self._weights_at(self._position)
        return dict(zip(self.source_names, w.tolist(), strict=True))

    def weights_at(self, position: int) -> npt.NDArray[np.float64]:
        """The normalised weights in force at ``position`` (in source order)."""
        out: npt.NDArray[np.float64] = self._weights_at(position).copy()
        return out

    def end_schedule(self, position: int) -> None:
        """Stop materialising the schedule from ``position`` on (an owner, such as a packing
        loader, applies it by training step instead)."""
        self._schedule_end = position if self._schedule_end is None else min(
            position, self._schedule_end)  # fmt: skip

    def planning_state(self) -> tuple[Any, ...]:
        """An opaque copy of what planning changes (sampler, schedule markers), to plan ahead on
        trial and put back with :meth:`restore_planning_state`."""
        return (copy.deepcopy(self._sampler), self._scheduled_until, self._schedule_end,
                list(self._updated_at))  # fmt: skip

    def restore_planning_state(self, state: tuple[Any, ...]) -> None:
        self._sampler, self._scheduled_until, self._schedule_end, self._updated_at = state
        self._version += 1

    def _weights_at(self, position: int) -> npt.NDArray[np.float64]:
        self._extend_schedule(position + 1)
        timeline = self._sampler.weight_timeline
        k = max(i for i, (p, _) in enumerate(timeline) if p <= position)
        return timeline[k][1]

    @property
    def weight_timeline(self) -> list[tuple[int, dict[str, float]]]:
        """``(position, weights)`` entries, each in force from its position on (known so far)."""
        return [(p, dict(zip(self.source_names, w.tolist(), strict=True)))
                for p, w in self._sampler.weight_timeline]  # fmt: skip

    def update_weights(
        self, weights: Mapping[str, float] | Sequence[float], position: int | None = None
    ) -> None:
        """Use ``weights`` from ``position`` on (default: the next position this process yields).

        Positions before it keep their sources; it must not precede the last timeline entry.
        From there on the schedule (if any) no longer applies.
        """
        owner = int(self._iterated_by.value)
        if owner and owner != os.getpid():  # the workers' copies would keep the old weights
            raise ValueError(
                f"MixedDataset.update_weights(): the dataset is iterated in another process (pid "
                f"{owner}, a DataLoader worker), which this copy's update would never reach. Use "
                "mixtape.get_loader (its update_weights reaches every worker at an exact batch) "
                "or num_workers=0"
            )
        w = mixture_weights(weights, self.source_names, self._objs)
        p = self._position if position is None else ops.check_int("position", position, 0,
                                                                   ops.MAX_POSITION)  # fmt: skip
        if p < self._position:
            raise ValueError(f"update_weights: position {p} was already produced (next position "
                             f"{self._position}); positions already produced keep their "
                             "weights")  # fmt: skip
        later = [q for q in self._updated_at if q > p]
        if later:  # rebuilding the timeline at p would silently drop that update
            raise ValueError(f"update_weights: position {p} precedes an update already set at "
                             f"position {later[0]}; give updates in position order")  # fmt: skip
        self._updated_at = [q for q in self._updated_at if q != p] + [p]
        if self.schedule is not None and (self._schedule_end is None or p < self._schedule_end):
            self._extend_schedule(p)  # the schedule holds up to p, the update from p on
            self._schedule_end = p
        if p < self._sampler.weight_timeline[-1][0] or p < self._sampler.position:
            self._rebuild_sampler(p)  # entries past p (schedule read ahead) or sampled ahead
        self._sampler.set_weights(w, p)
        self._version += 1

    def _rebuild_sampler(self, keep_before: int) -> None:
        """A sampler with only the timeline entries before ``keep_before``, at this position.

        The entries are pure configuration, so replaying them rebuilds the same sequence up to
        ``keep_before``; what was planned after it (read ahead) is planned again.
        """
        old = self._sampler
        timeline = old.weight_timeline
        fresh = SourceSampler(timeline[0][1], mode=old.mode, seed=old.seed,
                              block_size=old.block_size, shuffle=old.shuffle,
                              names=old.names)  # fmt: skip
        for q, w in timeline[1:]:
            if q < keep_before:
                fresh.set_weights(w, q)
        fresh.seek(min(self._position, keep_before))
        self._sampler = fresh
        self._scheduled_until = min(self._scheduled_until, keep_before)

    def update_weights_from_influence(
        self, weights: Mapping[str, float] | Sequence[float], position: int | None = None
    ) -> None:
        """Alias of :meth:`update_weights`, the name the influence tracker calls."""
        self.update_weights(weights, position)

    def _extend_schedule(self, until: int) -> None:
        """Append the schedule's timeline entries for positions below ``until``."""
        if self.schedule is None or until <= self._scheduled_until:
            return
        end = until if self._schedule_end is None else min(until, self._schedule_end)
        if end > self._scheduled_until:
            b = self.batch_size
            # From the entry in force (not the step holding _scheduled_until, which would add an
            # entry off the grid wherever a request happened to end: plans would depend on how
            # positions were asked for)
            first = self.schedule.entry_step(self._scheduled_until // b, self.schedule_every)
            last = -(-end // b)  # steps whose start position is below `end`
            entries = self.schedule.timeline(first, last, every=self.schedule_every)
            for step, weights in entries:
                pos = step * b
                if pos < self._scheduled_until or pos >= end:
                    continue
                if pos < self._sampler.position:
                    continue  # cannot happen: entries are appended before their positions
                self._sampler.set_weights(
                    np.asarray([weights[n] for n in self.source_names], dtype=np.float64), pos
                )
        self._scheduled_until = max(self._scheduled_until, until)

    # --- planning: positions -> (source, row) -------------------------------------------------

    def _sample(self, start: int, count: int) -> tuple[npt.NDArray[np.int32], Int64Array]:
        """Sources and ordinals of a range. Ranges at or after the sampler's position move it
        there (so a reader skipping ahead, e.g. one rank of several, pays each position once);
        earlier ranges are replayed from the nearest known state without moving it."""
        self._extend_schedule(start + count)
        if start > self._sampler.position:
            self._sampler.seek(start)
        if start == self._sampler.position:
            return self._sampler.sample(count)
        return self._sampler.peek(start, count)

    def _rows(self, sources: npt.NDArray[np.int32], ordinals: Int64Array) -> Int64Array:
        """Rows of map-style sources (a fresh permutation per pass); streaming: the ordinal."""
        lengths = np.asarray([n if n is not None else self._stream_lengths.get(k, 0)
                              for k, n in enumerate(self._num_rows())], dtype=np.int64)  # fmt: skip
        per = lengths[sources]
        rows: Int64Array = ordinals.copy()
        mapped = per > 0
        if np.any(mapped):
            streaming = np.asarray([n is None for n in self._num_rows()])[sources]
            perm = mapped & ~streaming
            if np.any(perm):
                rows[perm] = permute_rows(ordinals[perm], per[perm], seed=self.seed,
                                          source=sources[perm], shuffle=self.shuffle_rows)
            wrap = mapped & streaming
            rows[wrap] = ordinals[wrap] % per[wrap]
        return rows

    def plan(self, start: int, count: int) -> MixPlan:
        """Sources, rows and ordinals of positions ``[start, start + count)`` (map-style sources).

        Pure: the same arguments give the same plan in any process, before or after iterating.
        Positions at or past the end of a finite mixture are an error.
        """
        start = ops.check_int("start", start, 0, ops.MAX_POSITION)
        count = ops.check_int("count", count, 0, ops.MAX_POSITION - start)
        if not self.random_access:
            streaming = [n for n, r in zip(self.source_names, self._num_rows(), strict=True)
                         if r is None]  # fmt: skip
            raise ValueError(f"plan() needs map-style sources; {streaming} are streaming")
        stop = self.stop_position()
        if stop is not None and start + count > stop:
            raise ValueError(f"positions [{start}, {start + count}) run past the end of the "
                             f"mixture ({stop} positions, stop_strategy={self.stop_strategy!r})")
        sources, ordinals = self._sample(start, count)
        return MixPlan(start, sources, self._rows(sources, ordinals), ordinals)

    def stop_position(self) -> int | None:
        """Number of positions of a finite mixture (``None`` for ``restart`` or when unknown).

        Found by scanning the sequence at the sampler's speed (tens of millions of positions a
        second) and cached until the weights change; needs map-style sources.
        """
        if self.stop_strategy == "restart":
            return None
        if self._stop_version == self._version:
            return self._stop
        rows = self._num_rows()
        if any(n is None for n in rows):
            return None
        lengths = np.asarray(rows, dtype=np.int64)
        probe = copy.deepcopy(self._sampler)
        probe.seek(0)
        done = np.zeros(self.num_sources, dtype=bool)
        pos = 0
        stop: int | None = None
        while stop is None:
            self._extend_schedule(pos + _SCAN)
            self._sync_timeline(probe)
            src, ords = probe.sample(_SCAN)
            over = ords >= lengths[src]  # reads from a second pass
            if self.stop_strategy == "first_exhausted":
                if np.any(over):
                    stop = pos + int(np.argmax(over))
            else:  # all_exhausted: after the last first-pass read of the last source to finish
                stop = self._all_exhausted_in(src, ords, lengths, pos, done)
            pos += _SCAN
            if stop is None and pos > ops.MAX_POSITION - _SCAN:
                raise ValueError("the mixture does not end: a source with positive weight is "
                                 "never exhausted")  # fmt: skip
        self._stop, self._stop_version = stop, self._version
        return stop

    def _all_exhausted_in(self, src: npt.NDArray[np.int32], ords: Int64Array, lengths: Int64Array,
                          pos: int, done: npt.NDArray[np.bool_]) -> int | None:  # fmt: skip
        """The end of an all_exhausted mixture within positions [pos, pos + len(src)), if there.

        It ends right after the position where the last source with positive weight (in force
        there) finished its first pass, or at a weight change that leaves only finished sources
        with positive weight.
        """
        events = [(int(i), int(src[i])) for i in np.flatnonzero(ords == lengths[src] - 1)]
        events += [(p - pos, -1) for p, _ in self._sampler.weight_timeline
                   if pos <= p < pos + src.size]  # fmt: skip
        for i, k in sorted(events):
            if k >= 0:
                done[k] = True
            w = self._weights_at(pos + i)
            if done.any() and np.all(done | (w == 0)):
                return pos + i + (1 if k >= 0 else 0)
        return None

    def _sync_timeline(self, other: SourceSampler) -> None:
        for p, w in self._sampler.weight_timeline:
            if p > other.weight_timeline[-1][0]:
                other.set_weights(w, p)

    def __len__(self) -> int:
        stop = self.stop_position()
        if stop is None:
            raise TypeError(
                f"len() of a MixedDataset with stop_strategy={self.stop_strategy!r}"
                + (" and streaming sources" if self.stop_strategy != "restart" else "")
                + " is not defined (the mixture is infinite or its end is not known ahead)"
            )
        return stop

    # --- reading ----------------------------------------------------------------------------

    def take(self, plan: MixPlan) -> list[dict[str, Any]]:
        """The examples of a plan, in order, each with ``source_key`` set to its source's name."""
        out: list[dict[str, Any]] = [{}] * len(plan)
        for k in np.unique(plan.sources).tolist():
            where = np.flatnonzero(plan.sources == k)
            rows = self.source(k).take(plan.rows[where])
            name = self.source_names[k]
            for i, ex in zip(where.tolist(), rows, strict=True):
                ex[self.source_key] = name
                out[i] = ex
        return out

    def take_arrow(self, plan: MixPlan) -> pa.Table:
        """The examples of a plan as one Arrow table (sources must share their columns), with a
        ``source_key`` string column; the fast path for collators (no Python object per token)."""
        parts: list[pa.Table] = []
        order: list[Int64Array] = []
        for k in np.unique(plan.sources).tolist():
            where = np.flatnonzero(plan.sources == k)
            t = self.source(k).take_arrow(plan.rows[where])
            t = t.append_column(self.source_key, pa.array([self.source_names[k]] * t.num_rows,
                                                          pa.string()))  # fmt: skip
            parts.append(t)
            order.append(where)
        if not parts:
            return pa.table({self.source_key: pa.array([], pa.string())})
        schema = parts[0].schema
        for k, t in zip(np.unique(plan.sources).tolist(), parts, strict=True):
            if t.schema.names != schema.names:
                raise ValueError(
                    f"take_arrow: source {self.source_names[k]!r} has columns {t.schema.names}, "
                    f"another has {schema.names}; select the same columns in every source"
                )
        table = pa.concat_tables(parts, promote_options="permissive")
        inverse = np.empty(len(plan), dtype=np.int64)
        inverse[np.concatenate(order)] = np.arange(len(plan))
        return ArrowRows(table).gather(inverse)  # one memcpy per row (Arrow's take: per token)

    def _stream_take(self, streams: dict[int, tuple[int, Iterator[dict[str, Any]]]],
                     k: int, ordinal: int) -> dict[str, Any] | None:  # fmt: skip
        """The ``ordinal``-th example of streaming source ``k`` (None: its first pass ended)."""
        length = self._stream_lengths.get(k)
        if length is not None:
            ordinal %= length
        nxt, it = streams.get(k, (-1, iter(())))
        if nxt != ordinal:
            it = self.source(k).stream(ordinal)
            nxt = ordinal
        try:
            ex = next(it)
        except StopIteration:
            if length is None:
                if ordinal == 0:
                    raise ValueError(f"source {self.source_names[k]!r} yielded no example")\
                        from None
                self._stream_lengths[k] = ordinal
                return None
            raise ValueError(f"source {self.source_names[k]!r} ended after {ordinal} examples "
                             f"in a later pass, {length} in the first") from None  # fmt: skip
        streams[k] = (nxt + 1, it)
        return ex

    def _shard(self) -> tuple[int, int, int, int]:
        """(worker, num_workers, rank, world_size) of the iterating process."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return worker, workers, rank, world

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._iterated_by.value = os.getpid()
        worker, workers, rank, world = self._shard()
        shards, shard = workers * world, worker * world + rank
        b = self.batch_size
        streams: dict[int, tuple[int, Iterator[dict[str, Any]]]] = {}
        pos = self._position
        # Batches are dealt from the first one this iteration yields: a DataLoader asks worker 0
        # for its first batch whatever the position it resumes from.
        first = pos // b
        stop = self.stop_position() if self.random_access else None
        # With streaming sources the end is found as they go; map-style sources count too: one
        # that finished its first pass (all_exhausted), or would start a second (first_exhausted)
        finite = not self.random_access and self.stop_strategy != "restart"
        num_rows = self._num_rows()
        done: set[int] = set()
        if finite:
            for j, c in enumerate(self.source_counts(pos).values()):
                rows_j = num_rows[j]
                if rows_j is not None and c >= rows_j:
                    done.add(j)
        while stop is None or pos < stop:
            n = _CHUNK if stop is None else min(_CHUNK, stop - pos)
            version = self._version
            sources, ordinals = self._sample(pos, n)
            rows = self._rows(sources, ordinals)
            mine = ((pos + np.arange(n)) // b - first) % shards == shard if shards > 1 else None
            by_source: dict[int, list[dict[str, Any]]] = {}
            num_rows = self._num_rows()
            for k in np.unique(sources).tolist():
                if num_rows[k] is None:
                    continue
                sel = np.flatnonzero(sources == k) if mine is None else np.flatnonzero(
                    (sources == k) & mine)  # fmt: skip
                by_source[k] = self.source(k).take(rows[sel])
                by_source[k].reverse()  # pop() from the end gives them in order
            for i in range(n):
                if self._version != version:  # weights changed: plan again from here
                    break
                k = int(sources[i])
                last = False  # the mixture ends after this position (every shard sees it)
                if num_rows[k] is None:  # every shard reads streams to keep ordinals exact
                    ex = self._stream_take(streams, k, int(ordinals[i]))
                    if ex is None:
                        if self._finite_stream_end(k, done):
                            return
                        ex = self._stream_take(streams, k, int(ordinals[i]))
                        assert ex is not None
                    if mine is not None and not mine[i]:
                        continue
                else:
                    if finite:
                        end = self._map_source_end(k, int(ordinals[i]), num_rows[k], done)
                        if end == "before":
                            return
                        last = end == "after"
                    if mine is not None and not mine[i]:
                        if last:
                            return
                        continue
                    ex = by_source[k].pop()
                ex[self.source_key] = self.source_names[k]
                self._position = pos + i + 1
                yield ex
                if last:
                    return
            else:
                pos += n
                continue
            pos = self._position

    def _finite_stream_end(self, k: int, done: set[int] | None = None) -> bool:
        """A streaming source ``k`` just ended its first pass (or, ``k=-1``, a map-style one in
        ``done``): whether the mixture ends here. ``done``: map-style sources past their first
        pass."""
        if self.stop_strategy == "first_exhausted":
            return k >= 0
        if self.stop_strategy == "all_exhausted":
            w = self._weights_at(self._position)
            ended = set(self._stream_lengths) | (done or set())
            return all(w[j] == 0 or j in ended for j in range(self.num_sources))
        return False

    def _map_source_end(self, k: int, ordinal: int, n: int | None, done: set[int]) -> str:
        """Map-style source ``k`` serves its ``ordinal``-th row: "before" when the mixture ends
        before this position (first_exhausted: a second pass would start), "after" when it ends
        after it (all_exhausted: the last positive-weight source finished its first pass), else
        "" (finished first passes are noted in ``done``). ``n``: the source's rows."""
        assert n is not None
        if ordinal >= n and self.stop_strategy == "first_exhausted":
            return "before"
        if ordinal == n - 1 and k not in done:
            done.add(k)
            if self.stop_strategy == "all_exhausted" and self._finite_stream_end(-1, done):
                return "after"
        return ""

    def iter_batches(self, batch_size: int | None = None, *, start: int = 0,
                     stop: int | None = None) -> Iterator[pa.Table]:  # fmt: skip
        """Consecutive batches of positions from ``start`` as Arrow tables (map-style sources).

        Pure (the dataset's position does not move): the loader's and collators' fast path, with
        the token columns gathered as Arrow buffers, never as Python objects. The last batch may
        be short when the mixture ends.
        """
        b = self.batch_size if batch_size is None else ops.check_int("batch_size", batch_size,
                                                                     1, 1 << 40)  # fmt: skip
        end = self.stop_position()
        if stop is not None:
            end = stop if end is None else min(end, stop)
        pos = ops.check_int("start", start, 0, ops.MAX_POSITION)
        # Gather whole chunks of batches at once (one gather per source per chunk), then hand
        # out zero-copy slices: the per-call overhead is paid once per chunk, not per batch.
        per_chunk = b * max(1, _CHUNK // b)
        while end is None or pos < end:
            n = per_chunk if end is None else min(per_chunk, end - pos)
            table = self.take_arrow(self.plan(pos, n))
            for lo in range(0, n, b):
                yield table.slice(lo, min(b, n - lo))
            pos += n

    def example_at(self, position: int) -> dict[str, Any]:
        """The example at global ``position`` (map-style sources)."""
        return self.take(self.plan(position, 1))[0]

    # --- state ------------------------------------------------------------------------------

    @property
    def position(self) -> int:
        """The next position this process yields (examples consumed so far)."""
        return self._position

    def source_counts(self, position: int | None = None) -> dict[str, int]:
        """How many examples of each source the positions before ``position`` hold."""
        p = self._position if position is None else int(position)
        probe = copy.deepcopy(self._sampler)
        self._extend_schedule(p)
        self._sync_timeline(probe)
        probe.seek(p)
        return dict(zip(self.source_names, probe.counts.tolist(), strict=True))

    def state_dict(self, position: int | None = None) -> dict[str, Any]:
        """Position, weight timeline and what streaming sources revealed (json-able).

        ``position``: the state after that many examples instead of this process's position
        (a trainer counts them as steps x batch while DataLoader workers do the iterating).
        """
        if position is not None:
            p = ops.check_int("position", position, 0, ops.MAX_POSITION)
            self._extend_schedule(p)  # the schedule's entries before p are part of that state
            return self._state_at(p)
        owner = int(self._iterated_by.value)
        if owner and owner != os.getpid():
            raise ValueError(
                f"MixedDataset.state_dict(): the dataset is iterated in another process (pid "
                f"{owner}, a DataLoader worker); this copy (pid {os.getpid()}) has not advanced. "
                "Use mixtape.get_loader (it counts the batches the trainer received) or "
                "num_workers=0"
            )
        return self._state_at(self._position)

    def _state_at(self, position: int) -> dict[str, Any]:
        probe = copy.deepcopy(self._sampler)
        probe.seek(position)
        return {
            "version": STATE_VERSION,
            "source_names": list(self.source_names),
            "position": position,
            "sampler": probe.state_dict(),
            "scheduled_until": self._scheduled_until,
            "schedule_end": self._schedule_end,
            "stream_lengths": {str(k): v for k, v in self._stream_lengths.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the rest is identical to an uninterrupted run."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = [k for k in ("version", "source_names", "position", "sampler") if k not in state]
        if missing:
            raise ValueError(f"MixedDataset state lacks {missing[0]!r}")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"MixedDataset state version {state['version']}, expected "
                             f"{STATE_VERSION}")  # fmt: skip
        if list(state["source_names"]) != self.source_names:
            raise ValueError(f"state is of a mixture of {list(state['source_names'])}, this one "
                             f"mixes {self.source_names}")  # fmt: skip
        self._sampler.load_state_dict(dict(state["sampler"]))
        self._position = int(state["position"])
        self._scheduled_until = int(state.get("scheduled_until", 0))
        end = state.get("schedule_end")
        self._schedule_end = None if end is None else int(end)
        lengths = dict(state.get("stream_lengths", {}))
        self._stream_lengths = {int(k): int(v) for k, v in lengths.items()}
        self._updated_at = []  # the state's entries are the past: updates go on from there
        self._version += 1
        self._iterated_by.value = os.getpid()

    def __repr__(self) -> str:
        w = ", ".join(f"{n}={v:.3g}" for n, v in self.weights.items())
        return (f"MixedDataset({w}; mode={self.mode!r}, stop_strategy={self.stop_strategy!r}, "
                f"seed={self.seed}, position={self._position})")  # fmt: skip


class MixedShardedSource(MixedDataset):
    """EasyDeL's block mixing of named sources: exact per-block counts, a seeded order per block.

    ``MixedDataset(sources, weights, mode="block", ...)`` under EasyDeL's names; ``seed=None`` is
    seed 0 (never an unseeded, unreproducible order).
    """

    def __init__(
        self,
        sources: Mapping[str, Any] | Sequence[Any],
        weights: Mapping[str, float] | Sequence[float] | None = None,
        block_size: int = 1000,
        seed: int | None = None,
        stop_strategy: str = "restart",
        weight_scheduler: WeightScheduler | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(sources, weights, seed=0 if seed is None else seed, mode="block",
                         block_size=block_size, stop_strategy=stop_strategy,
                         schedule=weight_scheduler, **kwargs)  # fmt: skip


def block_mixture_interleave(
    datasets: Mapping[str, Any] | Sequence[Any],
    weights: Mapping[str, float] | Sequence[float] | None = None,
    block_size: int = 1000,
    seed: int = 42,
    stop: str = "restart",
    **kwargs: Any,
) -> MixedDataset:
    """EasyDeL's ``block_mixture_interleave``: a block mixture of ``datasets`` (a dict, or a list
    named ``"0"``, ``"1"``, ...), as a :class:`MixedDataset` (same class, same guarantees)."""
    if not isinstance(datasets, Mapping):
        seq = list(datasets)
        if all(isinstance(getattr(d, "name", None), str) and getattr(d, "name", None)
               for d in seq):  # fmt: skip
            datasets = {d.name: d for d in seq}
        else:
            datasets = {str(i): d for i, d in enumerate(seq)}
    return MixedDataset(datasets, weights, seed=seed, mode="block", block_size=block_size,
                        stop_strategy=stop, **kwargs)  # fmt: skip

