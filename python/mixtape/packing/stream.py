"""Online packing of an iterable of examples with a bounded buffer and a resumable state.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch.utils.data

from mixtape.ops import (
    OVERFLOW_POLICIES,
    PACK_STRATEGIES,
    Int64Array,
    PackPlan,
    check_choice,
    pack_fill,
    pack_plan,
)
from mixtape.state import IterationOwner

# --------------------------------------------------------------------------------------------
# Online packing
# --------------------------------------------------------------------------------------------


def _take_rows(plan: PackPlan, rows: Int64Array) -> PackPlan:
    """The plan restricted to ``rows`` (in that order), pieces gathered without a row loop."""
    counts = np.diff(plan.row_offsets)[rows]
    firsts = plan.row_offsets[:-1][rows]
    new_offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(counts)])
    idx = np.repeat(firsts - new_offsets[:-1], counts) + np.arange(new_offsets[-1])
    return dataclasses.replace(
        plan, row_offsets=new_offsets, doc=plan.doc[idx], start=plan.start[idx],
        length=plan.length[idx], column=plan.column[idx],
    )  # fmt: skip


def _plan_state(plan: PackPlan) -> dict[str, Any]:
    return {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}


def _same_as_before(seen: bool | None, has: bool, where: str, what: str) -> bool:
    """Whether the stream's examples hold ``what``: set by the first, the same for every other."""
    if seen is not None and has != seen:
        raise ValueError(f"{where}: {'has' if has else 'has no'} {what} but the earlier examples "
                         "of the stream do" + ("n't" if has else ""))
    return has


def _concat_ragged(
    parts: list[npt.NDArray[Any]], dtype: npt.DTypeLike, width: int = 1
) -> tuple[npt.NDArray[Any], Int64Array]:
    """Documents stored as [width, n] (token ids, then labels when carried) joined along n."""
    lengths = np.fromiter((p.shape[-1] for p in parts), dtype=np.int64, count=len(parts))
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
    if not parts:
        return np.zeros((width, 0), dtype), offsets
    joined = np.concatenate(parts, axis=1)
    if joined.size and np.issubdtype(joined.dtype, np.signedinteger) and int(joined[0].min()) < 0:
        bad = int(joined[0][np.argmax(joined[0] < 0)])  # row 0: the ids (labels may be -100)
        raise ValueError(f"PackingStream: negative token id ({bad}); token ids must be >= 0")
    target = np.dtype(dtype)
    if joined.dtype != target and joined.size and np.issubdtype(target, np.integer):
        info = np.iinfo(target)  # a cast would wrap an id beyond the range silently
        lo, hi = int(joined.min()), int(joined.max())
        if lo < info.min or hi > info.max:
            bad = hi if hi > info.max else lo
            raise ValueError(f"PackingStream: token id {bad} does not fit dtype {target}; use "
                             "dtype=np.int64")  # fmt: skip
    return joined.astype(target, copy=False), offsets


class PackingStream(torch.utils.data.IterableDataset[dict[str, Any]]):
    """Online packing of an iterable of examples into batches of packed rows.

    Documents are read into a buffer of ``buffer_size``; each full buffer is planned with
    ``strategy`` (plus the pieces carried from the previous plan). Rows filled below ``min_fill``
    (the least-filled first, at most ``buffer_size // 2`` pieces) and rows that would not make a
    whole batch of ``batch_size`` go back into the next buffer instead of being emitted, so little
    space is wasted while memory stays bounded. At the end of the source everything is emitted
    (the last batch may be short unless ``drop_last``). Iterating again after the end starts a
    new pass over the source (a new epoch; the counters restart).

    Each batch is ``pack_fill``'s output for ``batch_size`` rows: a dict of numpy arrays
    ``[rows, capacity]`` (``fields``). When the examples are mappings holding ``label_column``
    (e.g. prompt tokens masked with -100), those labels are packed with the ids (still
    ``label_pad_value`` at each document start and on padding) instead of being made from the
    ids. Examples holding ``source_key`` (a :class:`~mixtape.MixedDataset`'s ``__source__``: a
    source name, or an int id) add ``source_ids`` ``[rows, capacity]``: each token's source id
    (its index in ``source_names``, by default the source's own ``source_names``), -1 on
    padding, as the packing loader gives. ``state_dict()`` / ``load_state_dict()`` hold the
    buffer, the rows not yet emitted and the counters; a resumed stream yields exactly the
    batches the uninterrupted one would. The source is fast-forwarded by the number of examples
    consumed, or restored with its own ``state_dict`` when it has one.

    It is a torch ``IterableDataset`` yielding whole batches: use ``DataLoader(stream,
    batch_size=None)`` (numpy arrays become tensors) with ``num_workers`` 0 or 1; more workers
    would each pack the whole source, so they are refused. The state lives in the process that
    iterates the stream: with ``num_workers=1`` that is the worker, and ``state_dict()`` in the
    main process (whose copy never advanced) raises instead of returning a state that would
    resume from the start; checkpoint with ``num_workers=0`` (mixtape's loader will make workers
    resumable).
    """

    def __init__(
        self,
        source: Iterable[Any],
        capacity: int,
        *,
        batch_size: int = 1,
        buffer_size: int = 1024,
        strategy: str = "bfd",
        overflow: str = "split",
        column: str = "input_ids",
        fields: Sequence[str] = ("input_ids", "labels", "position_ids"),
        min_fill: float = 0.99,
        max_docs_per_row: int | None = None,
        align: int = 1,
        pad_value: int = 0,
        label_pad_value: int = -100,
        drop_last: bool = False,
        dtype: npt.DTypeLike = np.int64,
        label_column: str | None = "labels",
        source_key: str | None = "__source__",
        source_names: Sequence[str] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if not 0.0 <= min_fill <= 1.0:
            raise ValueError(f"min_fill must be in [0, 1], got {min_fill}")
        check_choice("strategy", strategy, PACK_STRATEGIES)
        check_choice("overflow", overflow, OVERFLOW_POLICIES)
        self.source = source
        self.capacity = int(capacity)
        self.batch_size = int(batch_size)
        self.buffer_size = int(buffer_size)
        self.strategy = strategy
        self.overflow = overflow
        self.column = column
        self.fields = tuple(fields)
        self.min_fill = float(min_fill)
        self.max_docs_per_row = max_docs_per_row
        self.align = int(align)
        self.pad_value = int(pad_value)
        self.label_pad_value = int(label_pad_value)
        self.drop_last = bool(drop_last)
        self.dtype = np.dtype(dtype)
        self.label_column = label_column
        self.source_key = source_key
        names = source_names if source_names is not None else getattr(source, "source_names",
                                                                       None)  # fmt: skip
        self.source_names: list[str] | None = None if names is None else [str(n) for n in names]
        # The process that last iterated the stream, shared with DataLoader workers (inherited
        # by fork, passed to spawn while spawning): a state_dict() elsewhere is stale.
        self._iterated_by = IterationOwner()
        self._reset()

    def _reset(self) -> None:
        self._consumed = 0  # source examples read
        self._carry: list[npt.NDArray[Any]] = []  # pieces of carried rows, planned again
        self._pending: PackPlan | None = None  # rows planned, not yet emitted
        self._labels: bool | None = None  # examples carry label_column (set by the first)
        self._sources: bool | None = None  # examples carry source_key (set by the first)
        self._finished = False  # a pass ended: the next iter() starts a new one
        self._pending_values: npt.NDArray[Any] = np.zeros((1, 0), self.dtype)
        self._pending_offsets: Int64Array = np.zeros(1, np.int64)
        self._cursor = 0  # rows of _pending already emitted
        self._exhausted = False
        self._source_state: Any = None
        self.counters = {
            "documents": 0, "tokens": 0, "rows": 0, "batches": 0, "plans": 0,
            "truncated_tokens": 0, "dropped_docs": 0, "dropped_tokens": 0, "split_docs": 0,
        }  # fmt: skip

    # ---- documents ------------------------------------------------------------------------

    def _tokens(self, example: Any) -> npt.NDArray[Any]:
        where = f"example {self._consumed}"
        if isinstance(example, Mapping):
            if self.column not in example:
                raise ValueError(f"{where}: no {self.column!r} column; it has {list(example)}")
            item = example[self.column]
        else:
            item = example
        if hasattr(item, "numpy") and hasattr(item, "is_cuda"):
            item = item.cpu().numpy()
        arr = np.asarray(item)
        if arr.ndim != 1:
            raise ValueError(f"{where}: {self.column!r} must be 1-D, got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError(f"{where}: {self.column!r} is empty; every document needs a token")
        if arr.dtype.kind not in "iub":
            raise TypeError(f"{where}: {self.column!r} must hold integers, got dtype {arr.dtype}")
        lab_key = self.label_column
        has = lab_key is not None and isinstance(example, Mapping) and lab_key in example
        self._labels = _same_as_before(self._labels, has, where, f"{lab_key!r} column")
        src = self._source_row(example, where, arr.size)
        if not has:
            return arr.reshape(1, -1) if src is None else np.stack([arr.astype(np.int64), src])
        lab = example[lab_key]
        if hasattr(lab, "numpy") and hasattr(lab, "is_cuda"):
            lab = lab.cpu().numpy()
        lab = np.asarray(lab)
        if lab.shape != arr.shape or lab.dtype.kind not in "iub":
            raise ValueError(
                f"{where}: {lab_key!r} must be integers of the shape of {self.column!r} "
                f"{arr.shape}, got {lab.dtype} {lab.shape}"
            )
        rows = [arr.astype(np.int64), lab.astype(np.int64)]
        return np.stack(rows if src is None else [*rows, src])

    def _source_row(self, example: Any, where: str, n: int) -> Int64Array | None:
        """The document's source id repeated over its ``n`` tokens (None without source_key)."""
        key = self.source_key
        has = key is not None and isinstance(example, Mapping) and key in example
        self._sources = _same_as_before(self._sources, has, where, f"{key!r} field")
        if not has:
            return None
        value = example[key]
        if isinstance(value, str):
            if self.source_names is None:
                raise ValueError(f"{where}: {key!r} is the name {value!r} but the stream has no "
                                 "source_names to number it (pass source_names=...)")
            if value not in self.source_names:
                raise ValueError(f"{where}: {key!r} = {value!r} is not one of source_names "
                                 f"{self.source_names}")  # fmt: skip
            sid = self.source_names.index(value)
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            sid = int(value)
            top = None if self.source_names is None else len(self.source_names)
            if sid < 0 or (top is not None and sid >= top):
                raise ValueError(f"{where}: {key!r} = {sid} is not a source id (0 <= id < "
                                 f"{top if top is not None else 'inf'})")  # fmt: skip
        else:
            raise TypeError(f"{where}: {key!r} must be a source name or an int id, got "
                            f"{type(value).__name__}")  # fmt: skip
        return np.full(n, sid, dtype=np.int64)

    def _width(self) -> int:
        """Rows of the document buffer: ids, then labels and source ids when carried."""
        return 1 + bool(self._labels) + bool(self._sources)

    def _read(self, it: Iterator[Any], count: int) -> list[npt.NDArray[Any]]:
        docs: list[npt.NDArray[Any]] = []
        for example in itertools.islice(it, count):
            tokens = self._tokens(example)
            docs.append(tokens)
            self._consumed += 1
            self.counters["documents"] += 1
            self.counters["tokens"] += int(tokens.shape[1])
        if len(docs) < count:
            self._exhausted = True
        return docs

    # ---- planning -------------------------------------------------------------------------

    def _plan(self, segments: list[npt.NDArray[Any]]) -> None:
        """Plan the buffer; keep the rows to emit in _pending and carry the rest."""
        values, offsets = _concat_ragged(segments, self.dtype, self._width())
        plan = pack_plan(
            np.diff(offsets), self.capacity, strategy=self.strategy, overflow=self.overflow,
            max_docs_per_row=self.max_docs_per_row, align=self.align,
        )  # fmt: skip
        self.counters["plans"] += 1
        for key in ("truncated_tokens", "dropped_docs", "dropped_tokens", "split_docs"):
            self.counters[key] += int(getattr(plan, key))
        rows = plan.num_rows
        carried = np.zeros(rows, dtype=bool)
        if not self._exhausted and rows:
            ends = np.concatenate([np.zeros(1, np.int64), np.cumsum(plan.length)])
            used = ends[plan.row_offsets[1:]] - ends[plan.row_offsets[:-1]]
            order = np.lexsort((np.arange(rows), used))  # least filled first, then row index
            under = order[used[order] < self.min_fill * self.capacity]
            pieces = np.diff(plan.row_offsets)[under]
            under = under[np.cumsum(pieces) <= self.buffer_size // 2]
            carried[under] = True
            extra = int((~carried).sum()) % self.batch_size  # rows short of a whole batch
            if extra:
                kept = order[~carried[order]]
                carried[kept[:extra]] = True
        emit = np.flatnonzero(~carried)
        self._pending = _take_rows(plan, emit)
        self._pending_values, self._pending_offsets = values, offsets
        self._cursor = 0
        keep = _take_rows(plan, np.flatnonzero(carried))
        self._carry = [
            values[:, offsets[d] + s : offsets[d] + s + n]
            for d, s, n in zip(keep.doc.tolist(), keep.start.tolist(), keep.length.tolist(),
                               strict=True)
        ]

    def _next_batch(self) -> dict[str, Any] | None:
        plan = self._pending
        if plan is None or self._cursor >= plan.num_rows:
            return None
        stop = min(self._cursor + self.batch_size, plan.num_rows)
        if stop - self._cursor < self.batch_size and (not self._exhausted or self.drop_last):
            if self._exhausted:
                self._cursor = plan.num_rows
            return None
        rows = plan.select_rows(self._cursor, stop)
        carried = bool(self._labels) and "labels" in self.fields
        fields = [f for f in self.fields if f != "labels"] if carried else self.fields
        batch = pack_fill(
            rows, self._pending_values[0], self._pending_offsets, layout="padded",
            pad_value=self.pad_value, label_pad_value=self.label_pad_value, fields=fields,
            dtype=self.dtype,
        )  # fmt: skip
        if carried:
            batch["labels"] = pack_fill(
                rows, self._pending_values[1], self._pending_offsets, layout="padded",
                label_pad_value=self.label_pad_value, fields=("labels",), dtype=self.dtype,
            )["labels"]  # fmt: skip
            if "loss_mask" in batch:  # follows the examples' labels, prompt masking included
                batch["loss_mask"] = batch["labels"] != self.label_pad_value
            batch = {f: batch[f] for f in self.fields}
        if self._sources:  # each token its document's source id, -1 on padding
            batch["source_ids"] = pack_fill(
                rows, self._pending_values[-1], self._pending_offsets, layout="padded",
                pad_value=-1, fields=("input_ids",), dtype=self.dtype,
            )["input_ids"]  # fmt: skip
        self.counters["rows"] += stop - self._cursor
        self.counters["batches"] += 1
        self._cursor = stop
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.num_workers > 1:
            raise ValueError(
                f"PackingStream cannot be split across {worker.num_workers} DataLoader workers "
                "(each would pack the whole source): use num_workers=0 or 1"
            )
        self._iterated_by.claim()
        if self._finished:
            self._reset()
        it = iter(self.source)
        if self._source_state is not None and hasattr(self.source, "load_state_dict"):
            self.source.load_state_dict(self._source_state)
            it = iter(self.source)
        elif self._consumed:
            for _ in itertools.islice(it, self._consumed):
                pass
        while True:
            batch = self._next_batch()
            if batch is not None:
                yield batch
                continue
            if self._exhausted and not self._carry:
                self._finished = True
                return
            new = [] if self._exhausted else self._read(it, self.buffer_size)
            segments = self._carry + new
            self._carry = []
            if not segments:
                self._pending = None
                self._finished = True
                return
            self._plan(segments)

    # ---- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the stream bit for bit (numpy arrays and ints).

        Raises ValueError in a process other than the one iterating the stream (the main process
        of a ``DataLoader`` with workers): its copy has not advanced.
        """
        owner = self._iterated_by.elsewhere()
        if owner:
            raise ValueError(
                f"PackingStream.state_dict(): the stream is iterated in another process (pid "
                f"{owner}, a DataLoader worker); this copy (pid {os.getpid()}) has not advanced, "
                "so its state would resume from the start. The state lives in the worker: use "
                "DataLoader(stream, batch_size=None, num_workers=0) to checkpoint the stream "
                "(mixtape's loader will make workers resumable)"
            )
        width = self._pending_values.shape[0] if self._labels is None else self._width()
        carry_values, carry_offsets = _concat_ragged(self._carry, self.dtype, width)
        state: dict[str, Any] = {
            "capacity": self.capacity, "strategy": self.strategy,
            "consumed": self._consumed, "exhausted": self._exhausted,
            "finished": self._finished,
            "carry_values": carry_values, "carry_offsets": carry_offsets,
            "pending": None if self._pending is None else _plan_state(self._pending),
            "pending_values": self._pending_values.copy(),
            "pending_offsets": self._pending_offsets.copy(), "cursor": self._cursor,
            "counters": dict(self.counters), "labels": self._labels,
            "sources": self._sources, "source_names": self.source_names,
        }  # fmt: skip
        state_fn: Callable[[], Any] | None = getattr(self.source, "state_dict", None)
        if state_fn is not None:
            state["source"] = state_fn()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next ``iter()`` continues where the state was taken."""
        if state["capacity"] != self.capacity or state["strategy"] != self.strategy:
            raise ValueError(
                f"state is for capacity {state['capacity']} / {state['strategy']!r}, this stream "
                f"packs capacity {self.capacity} / {self.strategy!r}"
            )
        self._reset()
        self._iterated_by.claim()  # this process holds the state now
        self._consumed = int(state["consumed"])
        self._exhausted = bool(state["exhausted"])
        # A state taken after a pass ended: the next iter() starts the next pass, as it would
        # have on the object the state was taken from (not an empty rest of the ended one).
        self._finished = bool(state.get("finished", False))
        self._labels = state.get("labels")
        self._sources = state.get("sources")
        if self._sources and state.get("source_names") != self.source_names:
            raise ValueError(f"state numbers the sources {state.get('source_names')}, this stream "
                             f"{self.source_names}: the source ids would mean other sources")
        cv = np.asarray(state["carry_values"], dtype=self.dtype)
        cv = cv.reshape(1, -1) if cv.ndim == 1 else cv  # states of 1-D (ids only) buffers
        co = np.asarray(state["carry_offsets"], dtype=np.int64)
        self._carry = [cv[:, co[i] : co[i + 1]].copy() for i in range(co.size - 1)]
        pend = state["pending"]
        if pend is not None:
            pend = {k: np.asarray(v, dtype=np.int64) if isinstance(v, (list, np.ndarray)) else v
                    for k, v in pend.items()}  # fmt: skip
        self._pending = None if pend is None else PackPlan(**pend)
        pv = np.asarray(state["pending_values"], dtype=self.dtype)
        self._pending_values = (pv.reshape(1, -1) if pv.ndim == 1 else pv).copy()
        self._pending_offsets = np.asarray(state["pending_offsets"], dtype=np.int64).copy()
        self._cursor = int(state["cursor"])
        self.counters = dict(state["counters"])
        self._source_state = state.get("source")
