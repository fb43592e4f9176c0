"""The loader: batches planned in the main process, fetched in workers.

For a :class:`~mixtape.MixedDataset` of map-style sources, batch ``k`` is a pure function of
(config, seed, weight timeline, k). The main process turns ``k`` into a plan (which source and
row every example, or every packed piece, comes from: the compiled sampler, then the pack
planner over the documents drawn for each batch) inside the DataLoader's sampler; workers fetch
the planned rows and collate them (a packed batch into a slot of the loader's shared-memory
:class:`~mixtape.ring.Ring`, which the main process wraps without a copy; without a free slot it
crosses as its pieces, see :class:`_Pieces`, and is collated here). Hence:

- the same config and seed give the same batches for any ``num_workers`` (persistent or not);
- the state is the number of batches the trainer received plus the weight timeline, so
  ``state_dict()`` / ``load_state_dict()`` resume bit for bit in a fresh process, also with
  another worker count, without replaying data;
- ``update_weights`` asked for after the trainer received batch ``b`` takes effect at batch
  ``b + horizon``: the DataLoader has planned at most ``num_workers * prefetch_factor`` batches
  ahead, so that batch is not planned yet whatever the timing;
- under torch.distributed rank ``r`` of ``W`` serves global batches ``r, r + W, ...``, whose
  union in order is the single-process sequence.

Other datasets get a plain ``DataLoader`` with seeded workers and a seeded shuffle; their state is
the batch count (a map-style dataset resumes by skipping sampler indices, not data).
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import dataclasses
import warnings
import weakref

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import torch
import torch.utils.data

from mixtape.collate.packed import PackedCollator
from mixtape.collate.sources import DOC_SOURCE_IDS
from mixtape.loader_config import RING_BUDGET, DataLoaderConfig, make_generator, seed_worker
from mixtape.mixing import MixedDataset, MixPlan, mixture_weights
from mixtape.ops import OVERFLOW_POLICIES, Int64Array, _pack_batch, gather_rows, normalize_weights
from mixtape.ring import Filled, InSlot, Ring
from mixtape.schedule import WeightScheduler
from mixtape.sources import piece_reader, take_ragged

__all__ = ["DataLoaderFactory", "Loader", "get_loader"]

STATE_VERSION = 1


# --------------------------------------------------------------------------------------------
# Requests: what the main process sends a worker for one batch
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    """Batch ``index``: its examples (``sources``, ``rows``), or its packed rows (pieces)."""

    index: int
    sources: npt.NDArray[np.int32]  # per example, or per piece when packed
    rows: Int64Array
    starts: Int64Array | None = None  # packed: piece start within its document
    lengths: Int64Array | None = None  # packed: piece length
    row_offsets: Int64Array | None = None  # packed: pieces of each row (CSR)
    slot: tuple[int, int] | None = None  # packed, with workers: ring (slot, generation) to fill

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """A packed request crosses to a worker as one int64 buffer, not six pickled arrays
        (pickled in the main process's queue thread, which competes with it for the GIL)."""
        if self.starts is None or self.lengths is None or self.row_offsets is None:
            return (_Request, (self.index, self.sources, self.rows, None, None, None, self.slot))
        n = self.lengths.size
        buf = np.concatenate([self.sources, self.rows, self.starts, self.lengths,
                              self.row_offsets], dtype=np.int64)  # fmt: skip
        return (_packed_request, (self.index, n, buf.tobytes(), self.slot))


def _packed_request(index: int, n: int, data: bytes, slot: tuple[int, int] | None) -> _Request:
    buf = np.frombuffer(data, dtype=np.int64)  # read-only views: the worker only reads them
    return _Request(index, buf[:n].astype(np.int32), buf[n: 2 * n], buf[2 * n: 3 * n],
                    buf[3 * n: 4 * n], buf[4 * n:], slot)  # fmt: skip


@dataclass(frozen=True)
class _Pieces:
    """A packed batch as a worker returns it: the pieces' tokens back to back (``flat``), the
    pieces of each row (``row_offsets``, CSR), their lengths and sources. The main process
    collates it: 8 x 4096 int32 tokens cross the process boundary as 128 KB, not as the 1 MB of
    int64 training tensors (fresh shared memory costs a page fault per 4 KB at both ends)."""

    flat: npt.NDArray[Any]
    row_offsets: Int64Array
    lengths: Int64Array
    sources: npt.NDArray[np.int32]

    def table(self, column: str) -> pa.Table:
        """The rows as the packed collator reads them (one list of tokens per row)."""
        offsets = np.zeros(self.lengths.size + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        row_tok = offsets[self.row_offsets]
        by_row = pa.array(self.row_offsets.astype(np.int32))
        return pa.table({
            column: pa.ListArray.from_arrays(pa.array(row_tok.astype(np.int32)),
                                             pa.array(self.flat)),
            "seq_lengths": pa.ListArray.from_arrays(by_row,
                                                    pa.array(self.lengths.astype(np.int32))),
            # the packed collator turns these into per-token source_ids (-1 on padding)
            DOC_SOURCE_IDS: pa.ListArray.from_arrays(by_row, pa.array(self.sources)),
        })  # fmt: skip


def _identity(x: Any) -> Any:
    return x


class _Task(tuple):  # type: ignore[type-arg]
    """The batches of one DataLoader task, in order (``batches_per_task`` > 1). A marked tuple,
    so that a batch that is itself a tuple (a user ``collate_fn``'s ``(x, y)``) is never taken
    for a task; torch's pin-memory thread rebuilds tuples with their own type."""

    __slots__ = ()


class _Fetcher(torch.utils.data.Dataset[Any]):
    """Fetches and collates a planned batch (runs in the workers; holds no planning state)."""

    def __init__(self, mixed: MixedDataset, collate: Callable[[Any], Any] | None,
                 packed: bool, capacity: int, column: str) -> None:  # fmt: skip
        self.mixed = mixed
        self.collate = collate
        self.packed = packed
        self.capacity = capacity
        self.column = column
        # With workers: the packed collator and the main process's ring to collate into.
        self.ring: Ring | None = None
        self.pieces_collate: PackedCollator | None = None

    def __len__(self) -> int:  # pragma: no cover - indices come from the plan sampler
        raise TypeError("batches are addressed by plan, not by position")

    def __getitem__(self, req: _Request | _Task) -> Any:
        if isinstance(req, _Task):  # a task of several batches: one answer each
            return _Task(self[r] for r in req)
        if self.packed:
            pieces = self._packed(req)
            if req.slot is not None and self.ring is not None and self.pieces_collate is not None:
                return self._into_slot(req.slot, self.ring, self.pieces_collate, pieces,
                                       self.capacity)  # fmt: skip
            if self.collate is None:  # collated in the main process
                return pieces
            batch = self.collate(pieces.table(self.column))
        else:
            batch = self._examples(req)
        if isinstance(batch, dict) and torch.utils.data.get_worker_info() is not None:
            return _one_segment(batch)
        return batch

    @staticmethod
    def _into_slot(ticket: tuple[int, int], ring: Ring, collate: PackedCollator,
                   pieces: _Pieces, max_row: int) -> Filled:  # fmt: skip
        """The batch collated into the ticket's ring slot (the main process wraps it, no copy);
        the pieces themselves when it does not fit."""
        with collate._out.into(ring.slot_view(ticket[0])):
            batch = collate.collate_pieces(pieces.flat, pieces.lengths, pieces.row_offsets,
                                           pieces.sources, max_row=max_row)  # fmt: skip
        filled = ring.describe(ticket, batch)
        if not any(isinstance(v, InSlot) for v in (filled.fields or {}).values()):
            return Filled(ring.token, *ticket, None, fallback=pieces)
        return filled

    def _examples(self, req: _Request) -> Any:
        plan = MixPlan(req.index, req.sources, req.rows, req.rows)
        table = self.mixed.take_arrow(plan).drop_columns([self.mixed.source_key])
        batch = self.collate(table) if self.collate is not None else table
        if isinstance(batch, dict):
            ids = req.sources.astype(np.int64)
            batch["source_ids"] = torch.from_numpy(ids) if _has_tensors(batch) else ids
        return batch

    def _packed(self, req: _Request) -> _Pieces:
        assert req.starts is not None and req.lengths is not None and req.row_offsets is not None
        # Each source's pieces copied straight from its column's buffers to their place in the
        # batch's flat tokens (one C++ pass per source, see ops.PieceReader); a source without
        # such buffers reads its distinct documents (only the token column), then the pieces.
        out_offsets = np.zeros(req.lengths.size + 1, dtype=np.int64)
        np.cumsum(req.lengths, out=out_offsets[1:])
        sources = np.ascontiguousarray(req.sources, dtype=np.int32)
        rows, starts, lengths = (np.ascontiguousarray(a, dtype=np.int64)
                                 for a in (req.rows, req.starts, req.lengths))  # fmt: skip
        readers, reads = [], []
        for k in np.flatnonzero(np.bincount(sources)).tolist() if sources.size else ():
            source = self.mixed.source(k)
            reader = piece_reader(source, self.column)
            if reader is not None:
                readers.append((k, source.name, reader))
                continue
            sel = np.flatnonzero(sources == k)
            uniq, inverse = np.unique(rows[sel], return_inverse=True)
            values, doc_offsets = take_ragged(source, uniq, self.column)
            reads.append((sel, values, doc_offsets[inverse.reshape(-1)] + starts[sel]))
        dtypes = [r.dtype for _, _, r in readers] + [v.dtype for _, v, _ in reads]
        dtype = np.result_type(*dtypes) if dtypes else np.dtype(np.int64)
        flat = np.empty(int(out_offsets[-1]), dtype=dtype)
        for k, name, reader in readers:
            # Only this source's pieces; another dtype goes through a copy of its own dtype.
            into = flat if reader.dtype == dtype else np.empty(flat.size, dtype=reader.dtype)
            try:
                reader.gather(rows, starts, lengths, out_offsets, into, sources=sources, source=k)
            except ValueError as e:
                raise ValueError(f"source {name!r}: {e}") from None
            if into is not flat:
                mine = np.repeat(sources == k, lengths)
                flat[mine] = into[mine]
        for sel, values, at in reads:
            gather_rows(values.astype(dtype, copy=False), at, lengths[sel], out_offsets[sel],
                        flat)  # fmt: skip
        return _Pieces(flat, req.row_offsets, req.lengths, req.sources.astype(np.int32))


def _one_segment(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch's tensors as views of one shared-memory buffer (worker side).

    The DataLoader moves every tensor a worker returns into its own shared-memory segment (open,
    copy, pass the descriptor, map it in the main process); one segment per batch instead of one
    per tensor took 2-3 ms per packed 8 x 4096 batch off the main process's wait (profiled with
    2 workers). Values, dtypes and shapes are unchanged; each tensor is contiguous.
    """
    tensors = [(k, v) for k, v in batch.items() if isinstance(v, torch.Tensor) and v.numel()]
    if len(tensors) < 2:
        return batch
    sizes = [-(-v.numel() * v.element_size() // 64) * 64 for _, v in tensors]  # aligned slots
    buf = torch.empty(sum(sizes), dtype=torch.uint8)
    buf.share_memory_()  # type: ignore[no-untyped-call]
    out = dict(batch)
    offset = 0
    for (key, t), size in zip(tensors, sizes, strict=True):
        nbytes = t.numel() * t.element_size()
        view = buf[offset: offset + nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        out[key] = view
        offset += size
    return out


def _widen_result_pipe(batches: Any) -> None:
    """Give the DataLoader's worker-result pipe 1 MB (Linux; best effort).

    A packed batch's pieces (~128 KB of tokens for 8 x 4096) do not fit the default 64 KB pipe,
    so every batch took several write / read round trips between a worker and the main process:
    measured with 2 workers, 1.17 -> 0.95 ms of main-process time per batch.
    """
    queue = getattr(batches, "_worker_result_queue", None)  # torch's multi-process iterator
    reader = getattr(queue, "_reader", None)
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    if reader is None or setsize is None:
        return
    # Over the user's pipe-buffer quota, or not a pipe: the default size stays.
    with contextlib.suppress(OSError):
        fcntl.fcntl(reader.fileno(), setsize, 1 << 20)


def _has_tensors(batch: Mapping[str, Any]) -> bool:
    return any(isinstance(v, torch.Tensor) for v in batch.values())


# --------------------------------------------------------------------------------------------
# Planning (main process)
# --------------------------------------------------------------------------------------------


class _PackPlanner:
    """Packed batches in order, each planned from the documents drawn for it.

    Batch ``k`` takes the pieces carried from batch ``k - 1`` plus new mixture positions, in
    order, until they hold ``batch_size * max_length`` tokens, a document counting at most a row
    (documents longer than a row are cut into row-sized pieces, or truncated with
    ``overflow="truncate"``; dropped ones count nothing); the planner packs them
    into rows, the ``batch_size`` fullest rows are the batch and the pieces of the other rows are
    carried. So every batch is a pure function of the timeline, a weight update due at batch
    ``e`` applies from the first document drawn for ``e``, and the state before batch ``k`` is
    its cursor: the next position and the carried pieces.
    """

    def __init__(self, loader: Loader) -> None:
        # Weak: a loader <-> planner cycle would leave the DataLoader's workers to the garbage
        # collector (see _PlanSampler).
        self.loader: Loader = weakref.proxy(loader)
        self.counting = True  # count dropped / empty documents (not on a replaying copy)
        self.reset(0, [], 0)

    _carry_list: list[list[int]] | None
    _carry_arr: Int64Array
    _carry_tokens: int

    def reset(self, position: int, carry: list[list[int]], next_batch: int) -> None:
        self.position = position  # next mixture position to draw
        self.carry = carry
        self.next_batch = next_batch
        self.ended = False
        self._buf: _Docs | None = None  # documents planned ahead

    @property
    def carry(self) -> list[list[int]]:
        """The carried pieces, (source, row, start, length) each (a list made on first use: the
        planner keeps them as the int64 [n, 4] array the kernel takes)."""
        if self._carry_list is None:
            pieces: list[list[int]] = self._carry_arr.tolist()
            self._carry_list = pieces
        return self._carry_list

    @carry.setter
    def carry(self, pieces: list[list[int]]) -> None:
        self._carry_list = [list(map(int, c)) for c in pieces]
        for i, c in enumerate(self._carry_list):
            if len(c) != 4:
                raise ValueError(f"packing cursor: carried piece {i} is {c}, expected "
                                 "[source, row, start, length]")  # fmt: skip
        self._carry_arr = np.asarray(self._carry_list, dtype=np.int64).reshape(-1, 4)
        self._carry_tokens = int(self._carry_arr[:, 3].sum())

    def cursor(self) -> tuple[int, list[list[int]]]:
        """The state before batch ``next_batch``: next position and carried pieces."""
        pieces: list[list[int]] = self._carry_arr.tolist()
        return self.position, pieces

    def _docs(self, need: int) -> tuple[npt.NDArray[np.int32], Int64Array, Int64Array, int,
                                        bool] | None:  # fmt: skip
        """The next documents from ``self.position`` holding ``need`` tokens (each counting at
        most a row), or up to the end of the read-ahead: (sources, rows, token counts, the sum
        of the counts capped at a row, whether any is empty or, unless split or truncated, too
        long)."""
        lo = self.loader
        buf = self._buf
        if buf is None or not buf.start <= self.position < buf.start + len(buf.cum):
            stop = lo.mixed.stop_position()
            n = 1024 if stop is None else min(1024, stop - self.position)
            if n <= 0:
                return None
            buf = self._buf = _Docs.of(lo, lo.mixed.plan(self.position, n))
        i = self.position - buf.start
        base = buf.cum[i - 1] if i else 0
        # Through the document reaching `need` (counting at most a row per document).
        end = min(bisect.bisect_left(buf.cum, base + need) + 1, len(buf.cum))
        self.position = buf.start + end
        flagged = buf.flagged[end - 1] - (buf.flagged[i - 1] if i else 0)
        return buf.sources[i:end], buf.rows[i:end], buf.lengths[i:end], buf.cum[end - 1] - base, \
            flagged > 0

    def batch(self, k: int) -> _Request | None:
        """The request of global batch ``k`` (called with k, k + 1, ...)."""
        lo = self.loader
        b, cap = lo.config.batch_size, lo.capacity
        if k != self.next_batch:
            raise AssertionError(f"batches are planned in order: asked {k}, next {self.next_batch}")
        lo._cursors[k] = self.cursor()  # the state a loader resuming at batch k starts from
        if lo._apply_updates(k, self.position):  # from the first document drawn for batch k
            self._buf = None  # documents planned ahead under the old weights
        # Carried pieces go first; a document counts at most a row (the same count the
        # read-ahead uses), so where the read-ahead ends does not change the batch.
        have = self._carry_tokens
        docs: list[tuple[npt.NDArray[np.int32], Int64Array, Int64Array]] = []
        while have < b * cap and not self.ended:
            got = self._docs(b * cap - have)
            if got is None:
                self.ended = True
                break
            sources, rows, doc_len, counted, flagged = got
            if flagged:  # refused, or some skipped / dropped (they count nothing)
                sources, rows, doc_len = self._checked(sources, rows, doc_len)
                counted = int(np.minimum(doc_len, cap).sum())
            if lo.overflow == "truncate":
                doc_len = np.minimum(doc_len, cap)
            docs.append((sources, rows, doc_len))
            have += counted
        if len(docs) != 1:
            docs = [(np.concatenate([d[0] for d in docs]).astype(np.int32, copy=False),
                     np.concatenate([d[1] for d in docs]).astype(np.int64, copy=False),
                     np.concatenate([d[2] for d in docs]).astype(np.int64, copy=False))
                    if docs else (_NO_SOURCES, _NO_INTS, _NO_INTS)]  # fmt: skip
        # Documents cut into row-sized pieces after the carried ones, packed; the fullest rows
        # are the batch (in plan order) and the other rows' pieces are carried (ops.pack_batch).
        res = _pack_batch(self._carry_arr, *docs[0], cap, b, lo.config.packing or "bfd")
        if res.num_rows == 0:
            return None
        if res.row_offsets.size - 1 < b and lo.config.drop_last:
            return None
        self._carry_arr, self._carry_list, self._carry_tokens = res.carry, None, res.carry_tokens
        self.next_batch += 1
        return _Request(k, res.sources, res.rows, res.starts, res.lengths, res.row_offsets)

    def _checked(self, sources: npt.NDArray[np.int32], rows: Int64Array,
                 doc_len: Int64Array) -> tuple[npt.NDArray[np.int32], Int64Array,
                                               Int64Array]:  # fmt: skip
        """Documents with an empty or (under overflow ``error`` / ``drop``) too long one among
        them: refused, or counted and skipped / dropped."""
        lo = self.loader
        cap = lo.capacity
        empty = doc_len == 0
        if empty.any():  # no piece would carry them: refused, or counted and skipped
            i = int(np.argmax(empty))
            if not lo.drop_empty:
                raise ValueError(
                    f"source {lo.source_names[int(sources[i])]!r} row "
                    f"{int(rows[i])} has no tokens ({lo.column!r} is empty or None); "
                    "pass drop_empty=True to skip empty documents (they are counted in "
                    "loader.empty_docs)"
                )
            if self.counting:
                lo.empty_docs += int(empty.sum())
        long = doc_len > cap
        if long.any() and lo.overflow == "error":
            i = int(np.argmax(long))
            raise ValueError(
                f"source {lo.source_names[int(sources[i])]!r} row {int(rows[i])} "
                f"has {int(doc_len[i])} tokens, more than max_length={cap} "
                "(overflow='error'; 'split', 'truncate' or 'drop' to go on)"
            )
        if long.any() and lo.overflow == "drop":  # counted, never silent
            if self.counting:
                lo.dropped_docs += int(long.sum())
            keep = ~long
            sources, rows, doc_len = sources[keep], rows[keep], doc_len[keep]
        return sources, rows, doc_len


_NO_SOURCES = np.zeros(0, dtype=np.int32)
_NO_INTS = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class _Docs:
    """Documents planned ahead from mixture position ``start``: sources, rows and token counts;
    ``cum``: running sum of the counts capped at a row; ``flagged``: running count of documents
    that need :meth:`_PackPlanner._checked` (empty, or too long unless split or truncated). The
    running sums are lists: a batch reads a few of their entries, faster from a list than as
    numpy scalars."""

    start: int
    sources: npt.NDArray[np.int32]
    rows: Int64Array
    lengths: Int64Array
    cum: list[int]
    flagged: list[int]

    @staticmethod
    def of(lo: Loader, plan: MixPlan) -> _Docs:
        lengths = lo._lengths(plan)
        cap = lo.capacity
        bad = lengths == 0
        if lo.overflow in ("error", "drop"):
            bad |= lengths > cap
        return _Docs(plan.start, np.ascontiguousarray(plan.sources, dtype=np.int32),
                     np.ascontiguousarray(plan.rows, dtype=np.int64), lengths,
                     np.cumsum(np.minimum(lengths, cap)).tolist(),
                     np.cumsum(bad).tolist())  # fmt: skip


class _PlanSampler(torch.utils.data.Sampler[Any]):
    """The DataLoader's sampler: yields this rank's batch requests, planned on demand.

    It holds the loader weakly: a loader -> DataLoader -> sampler -> loader cycle would leave
    persistent workers to the garbage collector, which may finalise their queues before asking
    them to stop (each then waits out torch's 5 s join timeout).
    """

    def __init__(self, loader: Loader) -> None:
        self._loader = weakref.ref(loader)

    def __iter__(self) -> Iterator[_Request | _Task]:
        loader = self._loader()
        if loader is None:
            return iter(())
        loader._start_requests()
        return _requests(self._loader)

    def __len__(self) -> int:
        loader = self._loader()
        return 0 if loader is None else len(loader)


def _requests(ref: weakref.ref[Loader]) -> Iterator[_Request | _Task]:
    """Requests from the loader behind ``ref``, holding it only while planning one; grouped by
    ``batches_per_task`` (a :class:`_Task` per DataLoader task when more than one)."""
    loader = ref()
    per_task = 1 if loader is None else int(loader.config.batches_per_task or 1)
    del loader
    while True:
        task: list[_Request] = []
        while len(task) < per_task:
            loader = ref()
            req = None if loader is None else loader._next_request()
            del loader
            if req is None:
                break
            task.append(req)
        if task:
            yield task[0] if per_task == 1 else _Task(task)
        if len(task) < per_task:
            return


# --------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------


class Loader:
    """Batches of a dataset, exact under workers, ranks, restarts and weight changes.

    Iterate it like a ``DataLoader`` (it wraps one: ``loader.dataloader``). For a
    :class:`~mixtape.MixedDataset` of map-style sources, see the module docstring for the
    guarantees. ``packing`` (a planner strategy) with ``max_length=N``: each batch is
    ``batch_size`` rows of ``N`` tokens packed from the mixture's documents (each batch planned
    from the pieces the previous one carried plus new documents), collated by the ``packed``
    collator (give its
    ``attention`` in ``collate_kwargs``); ``source_ids`` per example, or per token when packed
    (-1 on padding), say which source each came from (names in ``source_names``).
    ``even_shards=False`` (a map-style dataset over several ranks): ranks serve uneven shares,
    no example twice, instead of padding every rank to the same count (for evaluation).
    """

    def __init__(self, dataset: Any, config: DataLoaderConfig, *, overflow: str = "split",
                 column: str = "input_ids", drop_empty: bool = False,
                 even_shards: bool = True) -> None:  # fmt: skip
        self.dataset = dataset
        self.even_shards = bool(even_shards)
        self._horizon_given = config.horizon is not None  # else the automatic one
        self.config = config.resolved()
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {list(OVERFLOW_POLICIES)}, got {overflow!r}")
        self.overflow = overflow
        self.dropped_docs = 0  # documents longer than a row dropped by overflow="drop"
        self.drop_empty = bool(drop_empty)
        self.empty_docs = 0  # empty documents skipped by drop_empty=True
        self.column = column
        self.capacity = int(self.config.max_length or 0)
        self._consumed = 0  # batches this rank's trainer received
        self._pending: list[tuple[int, list[float]]] = []  # (effect batch, weights) not applied
        self._cursors: dict[int, tuple[int, list[list[int]]]] = {}  # packing state per batch
        self._lengths_cache: dict[int, Int64Array] = {}
        c = self.config
        assert c.rank is not None and c.world_size is not None and c.horizon is not None
        self.rank, self.world_size, self.horizon = c.rank, c.world_size, c.horizon
        self.exact = isinstance(dataset, MixedDataset) and dataset.random_access
        self.mixed: MixedDataset = dataset if self.exact else None  # type: ignore[assignment]
        self._schedule: WeightScheduler | None = None
        self._schedule_every = 1
        self._collate: PackedCollator | None = None  # packed: collates fetched _Pieces
        if self.exact:
            self.source_names = list(dataset.source_names)
            self._take_schedule(dataset)
            collate = self.config.build_collate_fn()
            kw_c = dict(self.config.collate_kwargs)
            if (self.config.packing and self.config.collate_fn == "packed"
                    and not kw_c.get("padding_free") and "pad_to_multiple_of" not in kw_c):
                # Rows of exactly max_length tokens (the collator pads to the longest row
                # otherwise): a fixed [batch_size, max_length] shape, as compiled models want.
                from mixtape.collate import CollatorRegistry

                kw_c["pad_to_multiple_of"] = self.capacity
                kw_c.setdefault("pin_memory", bool(c.pin_memory))  # collated in this process
                collate = CollatorRegistry.get_collator("packed", **kw_c)
            if collate is None and not self.config.packing:
                from mixtape.collate import create_causal_lm_collate

                collate = create_causal_lm_collate(pad_token_id=0)
            if self.config.packing and not isinstance(self.config.collate_fn, str) and (
                    collate is None):  # fmt: skip
                raise ValueError("packing needs the packed collator's attention: pass "
                                 "collate_fn='packed', collate_kwargs={'attention': 'flash' | "
                                 "'sdpa' | 'eager' (or model=...)}")  # fmt: skip
            self._planner = _PackPlanner(self) if self.config.packing else None
            # mixtape's packed collator runs here, in the main process, on the pieces a worker
            # fetched (see _Pieces); any other collate_fn runs in the workers.
            if (self.config.packing and isinstance(collate, PackedCollator)
                    and collate.input_key == column):  # fmt: skip
                self._collate, collate = collate, None
            fetch = _Fetcher(dataset, collate, bool(self.config.packing), self.capacity, column)
            self._fetch = fetch
            self._ring_shape = self._ring_layout(c)
            kw: dict[str, Any] = {"batch_size": None, "sampler": _PlanSampler(self),
                                  "collate_fn": _identity, "num_workers": c.num_workers,
                                  "pin_memory": c.pin_memory,
                                  "generator": make_generator(c.seed)}  # fmt: skip
            if c.num_workers:
                kw.update(prefetch_factor=c.prefetch_factor,
                          persistent_workers=c.persistent_workers, worker_init_fn=seed_worker)
            self.dataloader: torch.utils.data.DataLoader[Any] = torch.utils.data.DataLoader(
                fetch, **kw)
        else:
            self.source_names = list(getattr(dataset, "source_names", []))
            if self.config.packing:
                raise ValueError("packing in the loader needs a MixedDataset of map-style "
                                 "sources; pack other data with pack_sequences or "
                                 "PackingStream")  # fmt: skip
            self._planner = None
            if isinstance(dataset, torch.utils.data.IterableDataset):
                dataset = _split_iterable(dataset, self.rank, self.world_size)
            kw = self.config.to_dataloader_kwargs(dataset)
            self._sampler: _ResumableSampler | None = None
            if not isinstance(dataset, torch.utils.data.IterableDataset):
                # A sampler that resumes by skipping indices (no batch is fetched to skip it).
                self._sampler = _ResumableSampler(len(dataset), c, pad=self.even_shards)
                for key in ("shuffle", "sampler"):
                    kw.pop(key, None)
                kw["sampler"] = self._sampler
            self.dataloader = torch.utils.data.DataLoader(dataset, **kw)
        self._ended = False
        self._epoch = 0
        self._ring: Ring | None = None
        self._reclaim = False
        self._live: weakref.ref[Any] | None = None  # the running torch iterator
        self._iterations = 0  # iterations started: an older one still iterated raises
        if self.exact:
            self._sampler = None
        else:
            self._ring_shape = None

    def _ring_layout(self, c: DataLoaderConfig) -> tuple[int, int] | None:
        """(slots, bytes per slot) of the ring workers collate packed batches into, or None
        (no workers, another collator, a host mask too big to ship, pinned CUDA batches)."""
        col = self._collate
        if not c.num_workers or col is None or not col._out.tensors:
            return None
        if col.attention in ("sdpa", "eager") and col.mask != "device":
            return None  # the [B, 1, L, L] mask is built in the main process, from the pieces
        if c.pin_memory and torch.cuda.is_available():
            return None  # pinned after collating, in the main process
        cells = c.batch_size * self.capacity
        if col.padding_free and col.pad_to_multiple_of:
            cells = -(-cells // col.pad_to_multiple_of) * col.pad_to_multiple_of
        slot_bytes = 4 * 8 * cells  # ids, labels, positions, source ids (int64)
        assert c.prefetch_factor is not None
        # The tasks in flight and the one being handed over, the batch the trainer still holds
        # while asking for the next, and two spare (e.g. a batch kept for logging); past that,
        # batches are collated in this process until slots come back.
        per_task = int(c.batches_per_task or 1)
        slots = min((c.num_workers * c.prefetch_factor + 1) * per_task + 3,
                    RING_BUDGET // slot_bytes)  # fmt: skip
        return (slots, slot_bytes) if slots >= 1 else None

    # --- planning ---------------------------------------------------------------------------

    def _global(self, local: int) -> int:
        return local * self.world_size + self.rank

    def _take_schedule(self, mixed: MixedDataset) -> None:
        """A weight schedule counts training steps. Unpacked, step ``t`` is positions
        ``t * batch_size * world_size`` on, which the mixture must agree with; packed, documents
        per step vary, so the loader applies the schedule itself, at the batches of each step."""
        if mixed.schedule is None:
            return
        per_step = self.config.batch_size * self.world_size
        if not self.config.packing:
            if mixed.batch_size != per_step:
                raise ValueError(
                    f"the mixture's weight schedule counts steps of {mixed.batch_size} examples, "
                    f"but this loader takes {per_step} per step (batch_size "
                    f"{self.config.batch_size} x world_size {self.world_size}): build the "
                    f"MixedDataset with batch_size={per_step}"
                )
            return
        if mixed.position or len(mixed.weight_timeline) > 1:
            raise ValueError("a packing loader applies the mixture's schedule itself: give it a "
                             "fresh MixedDataset (no update_weights, not iterated)")  # fmt: skip
        self._schedule = mixed.schedule
        # Steps between weight entries: the mixture's schedule_every if given; else every step
        # for a step schedule (its weights change only at its points), 10 for linear / cosine.
        self._schedule_every = (mixed.schedule_every if mixed.schedule_every_given
                                else 1 if mixed.schedule.interpolation == "step" else 10)
        mixed.end_schedule(0)  # the mixture no longer materialises it by position

    def _apply_updates(self, batch: int, position: int | None = None) -> bool:
        """Weight updates due by ``batch`` go into the mixture's timeline at ``position``, or
        (None, unpacked) at the first position of their effect batch: a rank plans only its own
        batches, so the first one it plans may lie past the effect batch (which another rank
        serves), and every rank must put the change at the same position. With packing, the
        schedule's weights of this batch's step go in too."""
        changed = False
        due = [(e, w) for e, w in self._pending if e <= batch]
        if due:
            self._pending = [(e, w) for e, w in self._pending if e > batch]
            self._schedule = None  # an update replaces the schedule from here on
            for e, w in due:
                at = e * self.config.batch_size if position is None else position
                self.mixed.update_weights(w, position=at)
            changed = True
        if self._schedule is not None and position is not None:
            step = batch // self.world_size // self._schedule_every * self._schedule_every
            named = self._schedule.get_weights(step)
            target = np.asarray([named[n] for n in self.source_names], dtype=np.float64)
            if not np.array_equal(target, self.mixed.weights_at(position)):
                self.mixed.update_weights(target.tolist(), position=position)
                changed = True
        return changed

    # Every loaded source's token counts back to back and the start of each source's (views of
    # it are the values of _lengths_cache): a plan's counts are one gather.
    _lengths_all: tuple[Int64Array, Int64Array] | None = None

    def _lengths(self, plan: MixPlan) -> Int64Array:
        """Token counts of the planned documents (lengths read once per source, from offsets)."""
        cache = self._lengths_cache
        present = np.flatnonzero(np.bincount(plan.sources)).tolist() if len(plan) else []
        missing = [k for k in present if k not in cache]
        if missing or self._lengths_all is None:
            for k in missing:
                source = self.mixed.source(k)
                counts = _source_lengths(source, self.column)
                if counts.size != source.num_rows:  # else a row would read another source's
                    raise ValueError(f"source {source.name!r}: {counts.size} token counts for "
                                     f"{source.num_rows} rows")  # fmt: skip
                cache[k] = counts
            base = np.zeros(len(self.source_names), dtype=np.int64)
            ks = sorted(cache)
            sizes = [cache[k].size for k in ks]
            table = np.concatenate([cache[k] for k in ks]) if ks else np.zeros(0, np.int64)
            at = 0
            for k, n in zip(ks, sizes, strict=True):
                base[k] = at
                cache[k] = table[at: at + n]
                at += n
            self._lengths_all = (table, base)
        table, base = self._lengths_all
        out: Int64Array = table[base[plan.sources] + plan.rows]
        return out

    def _cursor(self, k: int) -> tuple[int, list[list[int]]]:
        """The packing state before batch ``k``: recorded when ``k`` was planned, else planned on a
        copy of the planner (planning is pure: the mixture's sampler and pending updates are put
        back as they were, so the running plan is not disturbed)."""
        if k in self._cursors:
            return self._cursors[k]
        planner = self._planner
        assert planner is not None
        if planner.next_batch == k:
            return planner.cursor()
        mix = self.mixed
        saved = (mix.planning_state(), list(self._pending), self._schedule)
        try:
            probe = copy.copy(planner)
            probe.carry = [list(c) for c in planner.carry]
            probe.counting = False  # its documents were (or will be) counted by the planner
            while probe.next_batch < k and probe.batch(probe.next_batch) is not None:
                pass
            return probe.cursor()
        finally:
            mix.restore_planning_state(saved[0])
            self._pending, self._schedule = saved[1], saved[2]

    def _start_requests(self) -> None:
        """Plan from the first batch this rank has not consumed."""
        self._next_local = self._consumed
        # Slots handed to the last iteration's requests are free once the first request of
        # this one is asked for: torch has drained persistent workers by then, and __iter__
        # stopped other workers before starting new ones.
        self._reclaim = True
        if self._planner is not None:
            k0 = self._global(self._consumed)
            position, carry = self._cursor(k0) if k0 else (0, [])
            self._planner.reset(position, carry, k0)

    def _next_request(self) -> _Request | None:
        """This rank's next batch request (None at the end of a finite mixture)."""
        b = self.config.batch_size
        if self._planner is not None:
            while True:  # every rank plans every batch (packing is sequential), keeps its own
                k = self._planner.next_batch
                req = self._planner.batch(k)
                if req is None or k % self.world_size == self.rank:
                    return self._with_slot(req)
        k = self._global(self._next_local)
        pos = k * b
        stop = self.mixed.stop_position()
        n = b if stop is None else min(b, stop - pos)
        if n <= 0 or (n < b and self.config.drop_last):
            return None
        self._apply_updates(k)
        plan = self.mixed.plan(pos, n)
        self._next_local += 1
        return _Request(k, plan.sources, plan.rows)

    def _with_slot(self, req: _Request | None) -> _Request | None:
        """``req`` with a free ring slot to collate into (as it is without a ring or a slot)."""
        ring = self._ring
        if ring is None or req is None:
            return req
        if self._reclaim:
            self._reclaim = False
            ring.reclaim()
        ticket = ring.take()
        return req if ticket is None else dataclasses.replace(req, slot=ticket)

    # --- iteration --------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        self._restart_if_ended()
        if self._sampler is not None:
            self._sampler.skip = self._consumed * self.config.batch_size
        self._iterations += 1
        mine = self._iterations
        self._prepare_ring()
        batches = iter(self.dataloader)
        self._live = weakref.ref(batches)
        if self._planner is not None:
            _widen_result_pipe(batches)
        while True:
            # Checked before asking torch: that may plan a batch, or take the newer iteration's.
            if mine != self._iterations:
                raise _superseded()
            raw = next(batches, _END)
            if raw is _END:
                break
            # This frame holds only what the DataLoader returned, never the batch: a ring slot is
            # the trainer's to keep or drop, also while this generator is suspended.
            for one in raw if isinstance(raw, _Task) else (raw,):
                if mine != self._iterations:
                    raise _superseded()
                yield self._deliver(one)
        self._ended = True

    def _deliver(self, raw: Any) -> Any:
        """The trainer's batch from what the DataLoader returned; counted as received."""
        if isinstance(raw, Filled):
            assert self._ring is not None
            got = self._ring.receive(raw)
            batch = got if got is not None else self._collate_pieces(raw.fallback)
        elif isinstance(raw, _Pieces):
            batch = self._collate_pieces(raw)
        else:
            batch = raw
        self._cursors.pop(self._global(self._consumed) - self.world_size, None)  # bounded
        self._consumed += 1
        return batch

    def _prepare_ring(self) -> None:
        """Make the ring before the first workers start (they inherit it, or receive it pickled
        with the dataset); stop the workers of an earlier iteration still running, whose
        answers would land in slots this one hands out again."""
        if self._ring_shape is None:
            return
        if self._ring is None:
            try:
                self._ring = Ring(*self._ring_shape)
            except OSError as e:  # no shared memory to spare: pieces, collated here
                warnings.warn(f"mixtape loader: no shared memory for the workers' batch ring "
                              f"({e}); packed batches are collated in the main process",
                              stacklevel=3)  # fmt: skip
                self._ring_shape = None
                return
            self._fetch.ring, self._fetch.pieces_collate = self._ring, self._collate
        prev = self._live() if self._live is not None else None
        if prev is not None and not self.config.persistent_workers:
            shutdown = getattr(prev, "_shutdown_workers", None)  # torch's multi-process iterator
            if shutdown is not None:
                shutdown()

    def _collate_pieces(self, pieces: _Pieces) -> Any:
        """A fetched packed batch collated (and pinned when the config asks) for the trainer."""
        if self._collate is None:  # packing without a collator: the rows as an Arrow table
            return pieces.table(self.column)
        batch = self._collate.collate_pieces(pieces.flat, pieces.lengths, pieces.row_offsets,
                                             pieces.sources, max_row=self.capacity)  # fmt: skip
        if self.config.pin_memory and isinstance(batch, dict) and torch.cuda.is_available():
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) and not v.is_pinned() else v
                     for k, v in batch.items()}  # fmt: skip
        return batch

    def _restart_if_ended(self) -> None:
        """A loader iterated to its end starts again from the first batch (a new epoch over the
        same sequence), as a DataLoader does; the weight timeline is kept. Taking exactly the
        epoch's batches is its end too: a trainer stepping ``len(loader)`` times never asks for
        one more, and the next epoch would be empty."""
        if not self._ended and self._consumed and self._consumed == self._epoch_batches():
            self._ended = True
        if self._ended:
            self._ended = False
            self._consumed = 0
            self._cursors.clear()
            self._epoch += 1
            if self._sampler is not None:
                self._sampler.epoch = self._epoch

    def _epoch_batches(self) -> int | None:
        """This rank's batches per epoch when known ahead (None: packing, iterable datasets,
        infinite mixtures)."""
        if self._sampler is not None:
            n, b = self._sampler.size(), self.config.batch_size
            return n // b if self.config.drop_last else -(-n // b)
        if self.exact and self._planner is None and self.mixed.stop_position() is not None:
            return len(self)
        return None

    def __len__(self) -> int:
        if not self.exact:
            return len(self.dataloader)
        b = self.config.batch_size
        if self._planner is not None:
            raise TypeError("len() of a packing loader is not known ahead (rows depend on the "
                            "documents' lengths)")  # fmt: skip
        stop = self.mixed.stop_position()
        if stop is None:
            raise TypeError("len() of a loader over an infinite mixture (stop_strategy="
                            "'restart') is not defined")  # fmt: skip
        total = stop // b if self.config.drop_last else -(-stop // b)
        return max(0, (total - self.rank + self.world_size - 1) // self.world_size)

    @property
    def batches_consumed(self) -> int:
        """Batches this rank's trainer has received."""
        return self._consumed

    # --- weights ----------------------------------------------------------------------------

    def update_weights(self, weights: Mapping[str, float] | Sequence[float]) -> int:
        """Use ``weights`` from batch ``b + horizon`` on, ``b`` the last batch received.

        Returns that global batch index. Under torch.distributed call it on every rank at the same
        step (it is a collective: rank 0's weights are broadcast), so all ranks switch together.
        """
        if not self.exact:
            raise ValueError("update_weights needs a MixedDataset of map-style sources")
        if self.world_size > 1 and torch.distributed.is_available() and \
                torch.distributed.is_initialized():  # fmt: skip
            box: list[Any] = [(mixture_weights(weights, self.source_names).tolist(),
                               self._consumed)]  # fmt: skip
            torch.distributed.broadcast_object_list(box, src=0)
            weights, at = box[0]
            if at != self._consumed:  # the ranks would switch at different global batches
                raise ValueError(f"update_weights: rank 0 called it after {at} batches, rank "
                                 f"{self.rank} after {self._consumed}: call it on every rank at "
                                 "the same step")  # fmt: skip
        w = mixture_weights(weights, self.source_names).tolist()
        effect_local = self._consumed - 1 + self.horizon
        effect = max(0, effect_local) * self.world_size
        normalize_weights(w, self.source_names)  # checked now, not when the batch is planned
        self._pending.append((effect, w))
        return effect

    update_weights_from_influence = update_weights

    def source_counts(self) -> dict[str, int]:
        """Examples of each source in the batches this rank received (unpacked loaders)."""
        if not self.exact or self._planner is not None:
            raise ValueError("source_counts needs an unpacked MixedDataset loader")
        b = self.config.batch_size
        if self.world_size == 1:
            return self.mixed.source_counts(self._consumed * b)
        counts = np.zeros(len(self.source_names), dtype=np.int64)
        for local in range(self._consumed):
            plan = self.mixed.plan(self._global(local) * b, b)
            counts += np.bincount(plan.sources, minlength=counts.size)
        return dict(zip(self.source_names, counts.tolist(), strict=True))

    # --- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Batches received, the timeline and pending weight updates (json-able)."""
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "batches": self._consumed,
            "batch_size": self.config.batch_size,
            "world_size": self.world_size,
            "pending": [[e, w] for e, w in self._pending],
            "epoch": self._epoch,
            "dropped_docs": self.dropped_docs,
            "horizon": self.horizon,
            "packing": [self.config.packing, self.config.max_length],
        }
        if not self.exact and self._sampler is None:  # an IterableDataset: its own position
            state["dataset"] = self._iterable_state()
        if self.exact:
            mix = self.mixed
            timeline = [[p, [w[n] for n in self.source_names]] for p, w in mix.weight_timeline]
            state["timeline"] = timeline
            state["schedule"] = self._schedule is not None
            if self._planner is not None:
                k = self._global(self._consumed)
                position, carry = self._cursor(k)
                # "batch": the cursor is the state before that global batch, so a rank that
                # loads another rank's state (a trainer saves rank 0's) plans on from there.
                state["cursor"] = {"batch": k, "position": position, "carry": carry}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue after the batches the state counts: identical to an uninterrupted run."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected "
                             f"{STATE_VERSION}")  # fmt: skip
        if int(state["batch_size"]) != self.config.batch_size:
            raise ValueError(f"state was saved with batch_size {state['batch_size']}, this "
                             f"loader has {self.config.batch_size}")  # fmt: skip
        if int(state["world_size"]) != self.world_size:
            raise ValueError(f"state was saved with world_size {state['world_size']}, this "
                             f"loader has {self.world_size}")  # fmt: skip
        packing = state.get("packing")
        if packing is not None and list(packing) != [self.config.packing, self.config.max_length]:
            raise ValueError(f"state was saved with packing={packing[0]!r}, max_length="
                             f"{packing[1]}; this loader has packing={self.config.packing!r}, "
                             f"max_length={self.config.max_length}: its batches would differ")
        self._restore_horizon(state.get("horizon"))
        if self._iterations:
            raise ValueError(f"load_state_dict needs a loader that has not been iterated (this one "
                             f"has served {self._consumed} batches and planned ahead of them): "
                             "build a fresh loader, over a fresh MixedDataset, to resume or "
                             "rewind")  # fmt: skip
        if self.exact:
            self._check_timeline(state["timeline"])
        elif self._sampler is None:  # an IterableDataset resumes from its own state
            if "dataset" not in state:
                raise ValueError("loader state has no position of the IterableDataset (a state "
                                 "of another kind of loader?): it would resume from the start")
            self.dataloader.dataset.load_state_dict(state["dataset"])  # type: ignore[attr-defined]
        self._consumed = int(state["batches"])
        if self.exact and not state.get("schedule", True):
            self._schedule = None  # an update had replaced it
        self._pending = [(int(e), [float(x) for x in w]) for e, w in state["pending"]]
        if self.exact:
            mix = self.mixed
            for p, w in state["timeline"][1:]:
                if int(p) >= mix.weight_timeline[-1][0]:
                    mix.update_weights(w, position=int(p))
            if self._planner is not None:
                cur = state["cursor"]
                carry = [[int(x) for x in c] for c in cur["carry"]]
                k0 = self._global(self._consumed)
                batch = int(cur.get("batch", k0))
                if not k0 - self.world_size < batch <= k0:
                    raise ValueError(f"loader state: packing cursor before global batch {batch}, "
                                     f"this rank resumes at global batch {k0}")  # fmt: skip
                self._cursors[batch] = (int(cur["position"]), carry)
                if batch != k0:
                    assert self._planner is not None
                    self._planner.reset(int(cur["position"]), carry, batch)
        self._epoch = int(state.get("epoch", 0))
        self.dropped_docs = int(state.get("dropped_docs", 0))
        if self._sampler is not None:
            self._sampler.epoch = self._epoch

    def _restore_horizon(self, saved: Any) -> None:
        """The run's horizon: updates asked after the resume land where they would have (the
        automatic horizon depends on the worker count, which may differ now)."""
        if saved is None or int(saved) == self.horizon:
            return
        saved = int(saved)
        if self._horizon_given:
            raise ValueError(f"state was saved with horizon {saved}, this loader has horizon="
                             f"{self.horizon}: weight updates would land at other batches; "
                             f"leave horizon unset (the state's is used) or set {saved}")
        if saved < self.config.min_horizon:
            raise ValueError(f"state was saved with horizon {saved}, but with "
                             f"{self.config.num_workers} workers up to {self.config.min_horizon} "
                             f"batches can be in flight: resume with fewer workers (or prefetch), "
                             f"or give the original run horizon >= {self.config.min_horizon}")
        self.horizon = saved

    def _iterable_state(self) -> Any:
        """The IterableDataset's own state, which is the consumer's only without workers (each
        worker iterates its own copy); anything else would resume from the start."""
        ds = self.dataloader.dataset
        state_fn = getattr(ds, "state_dict", None)
        if self.config.num_workers or state_fn is None or not hasattr(ds, "load_state_dict"):
            why = (f"is read by {self.config.num_workers} DataLoader workers, each holding its "
                   "own position" if self.config.num_workers else "has no state_dict()")
            raise ValueError(f"Loader.state_dict(): the {type(ds).__name__} {why}, so a state "
                             "would resume from its start. Resume needs num_workers=0 and a "
                             "dataset with state_dict() / load_state_dict() (a "
                             "StreamingPreprocessedDataset, an HF IterableDataset, a "
                             "MixedDataset), or a MixedDataset of map-style sources (exact with "
                             "any worker count)")  # fmt: skip
        return state_fn()

    def _check_timeline(self, saved: Sequence[Any]) -> None:
        """The mixture's weight timeline must be the start of the state's: an entry the state
        lacks (weights changed after it was taken, or another mixture) would stay in force."""
        here = [(p, [w[n] for n in self.source_names]) for p, w in self.mixed.weight_timeline]
        for i, (p, w) in enumerate(here):
            sp, sw = (int(saved[i][0]), [float(x) for x in saved[i][1]]) if i < len(saved) \
                else (None, None)  # fmt: skip
            if sp != p or sw is None or not np.allclose(sw, w, rtol=1e-12, atol=0):
                theirs = "nothing" if sw is None else f"position {sp}: {sw}"
                raise ValueError(f"loader state: the mixture's weight timeline entry {i} "
                                 f"(position {p}: {w}) is not in the state ({theirs}): the state "
                                 "is of another mixture, or its weights changed after the state "
                                 "was taken; load it into a fresh loader over a fresh "
                                 "MixedDataset built as the saved one was")  # fmt: skip



_END = object()


def _superseded() -> RuntimeError:
    return RuntimeError("this iterator of the loader was superseded by a newer iteration of the "
                        "same loader (they share its plan and workers): iterate one at a time")


def _split_iterable(dataset: Any, rank: int, world: int) -> Any:
    """The IterableDataset rank ``rank`` of ``world`` iterates: an HF IterableDataset is split
    by node; a dataset that shards itself must shard as the loader's config says (every rank
    would otherwise read every record)."""
    if world == 1:
        return dataset
    from mixtape.preprocess import StreamingPreprocessedDataset

    if isinstance(dataset, (StreamingPreprocessedDataset, MixedDataset)):
        got = dataset._rank_world() if isinstance(dataset, StreamingPreprocessedDataset) else \
            dataset._shard()[2:]  # fmt: skip
        if tuple(got) != (rank, world):
            how = ("build it with rank=, world_size=" if isinstance(
                dataset, StreamingPreprocessedDataset) else "initialise torch.distributed")
            raise ValueError(f"the loader serves rank {rank} of {world}, but the "
                             f"{type(dataset).__name__} shards itself as rank {got[0]} of "
                             f"{got[1]} (from its arguments or the process group): {how} so "
                             "the two agree")  # fmt: skip
        return dataset
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None and isinstance(dataset, datasets.IterableDataset):
        split = getattr(dataset, "_distributed", None)
        if split is None:
            from datasets.distributed import split_dataset_by_node

            return split_dataset_by_node(dataset, rank=rank, world_size=world)
        if (split.rank, split.world_size) != (rank, world):
            raise ValueError(f"the loader serves rank {rank} of {world}, but the HF "
                             f"IterableDataset is split for rank {split.rank} of "
                             f"{split.world_size}")  # fmt: skip
        return dataset
    warnings.warn(f"mixtape loader: rank {rank} of {world}, but a {type(dataset).__name__} "
                  "(an IterableDataset) cannot be split by the loader: it must shard itself by "
                  "rank, or every rank reads every record", stacklevel=3)  # fmt: skip
    return dataset


class _ResumableSampler(torch.utils.data.Sampler[int]):
    """Indices of a map-style dataset: a permutation seeded by (seed, epoch), this rank's share
    (as ``DistributedSampler`` deals it), from ``skip`` on, so a resumed loader skips indices,
    not batches."""

    def __init__(self, n: int, config: DataLoaderConfig, pad: bool = True) -> None:
        assert config.rank is not None and config.world_size is not None
        self.n, self.shuffle, self.seed = n, config.shuffle, config.seed
        self.rank, self.world = config.rank, config.world_size
        self.drop_last = config.drop_last
        self.pad = pad  # False: uneven shares, no index twice (evaluation)
        self.epoch = 0
        self.skip = 0

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed((self.seed + self.epoch) % 2**63)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        if self.world > 1:
            if self.drop_last:
                idx = idx[: self.n - self.n % self.world]
            elif self.n % self.world and self.pad and idx:  # padded, as DistributedSampler
                extra = self.world - self.n % self.world  # (repeated when n is below it)
                idx += (idx * -(-extra // len(idx)))[:extra]
            idx = idx[self.rank :: self.world]
        return idx

    def size(self) -> int:
        """This rank's indices per epoch (what :meth:`_indices` gives, without drawing them)."""
        m = self.n
        if self.world > 1:
            if self.drop_last:
                m -= self.n % self.world
            elif self.pad and self.n:
                m += -self.n % self.world
            return max(0, (m - self.rank + self.world - 1) // self.world)
        return m

    def __iter__(self) -> Iterator[int]:
        idx = self._indices()[self.skip :]
        self.skip = 0
        return iter(idx)

    def __len__(self) -> int:
        return self.size() - self.skip


def _source_lengths(source: Any, column: str) -> Int64Array:
    """Token count of every row of a map-style source, from its list column's offsets."""
    from mixtape.packing import dataset_lengths

    ds = getattr(source, "dataset", None)
    if ds is not None:
        try:
            return dataset_lengths(ds, column)
        except (TypeError, ValueError):
            pass
    n = int(source.num_rows)
    out = np.empty(n, dtype=np.int64)
    step = 65536
    for lo in range(0, n, step):
        rows = np.arange(lo, min(n, lo + step), dtype=np.int64)
        col = source.take_arrow(rows).column(column).combine_chunks()
        out[lo: lo + rows.size] = np.diff(col.offsets.to_numpy())
    return out


class DataLoaderFactory:
    """Builds a :class:`Loader` from a :class:`DataLoaderConfig` (the one way loaders are made:
    ``get_loader``, ``DataLoaderBuilder`` and ``UniversalDataModule`` all come here)."""

    def create_dataloader(self, dataset: Any, config: DataLoaderConfig, **options: Any) -> Loader:
        return Loader(dataset, config, **options)


def get_loader(dataset: Any, batch_size: int, **options: Any) -> Loader:
    """A :class:`Loader` for ``dataset``: ``options`` are :class:`DataLoaderConfig` fields
    (``num_workers``, ``packing``, ``max_length``, ``collate_fn``, ``horizon``, ...) plus the
    loader's own (``overflow``, ``column``, ``drop_empty``)."""
    own = {k: options.pop(k) for k in ("overflow", "column", "drop_empty") if k in options}
    if isinstance(dataset, MixedDataset) and "shuffle" not in options:
        options["shuffle"] = False  # the mixture's order is its own (seeded) shuffle
    config = DataLoaderConfig(batch_size=batch_size, **options)
    return DataLoaderFactory().create_dataloader(dataset, config, **own)

