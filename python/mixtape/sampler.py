"""Which source serves each global position of a weighted mixture, and which example of it.

:class:`SourceSampler` maps global positions 0, 1, 2, ... to ``(source, ordinal)``: the source
chosen at that position and how many times that source was chosen before (across weight
changes). Everything is a pure function of (mode, seed, block_size, shuffle, weight timeline,
position), computed in C++ (csrc/sample) one call per weight segment, so any range can be computed
without replay, chunked calls equal one big call, and the state is a few integers per source.
:func:`permute_rows` turns an ordinal into a row of the source (a fresh permutation per pass).

Modes (exact integer arithmetic, bit-identical on every platform; see csrc/sample/sample.h):

- ``greedy`` (default): position j of a weight segment goes to argmax_s w_s(j + 1) - c_s (ties to
  the lowest index), counted from the segment's start, so a weight change causes no catch-up
  burst. Deterministic and smooth: a source is never ahead of its share w_s * n by a whole
  position, and behind it by little more than one (1.3 in our tests). ``shuffle=True`` permutes
  each block of ``block_size`` positions (same multiset) for variety without drift.
- ``random``: i.i.d. draws (alias table + counter hash of (seed, position)).
- ``block``: exact per-block counts (largest remainder of w * block_size) in a seeded order
  (``shuffle=True``, the default) or smoothly interleaved (``shuffle=False``).

Weights change with :meth:`SourceSampler.set_weights` at a position at or after the current one;
a zero weight pauses its source. In the block-based modes (``block``, greedy with shuffle) blocks
are aligned to the segment start; a block cut short by a weight change keeps the first positions
of its full order, so positions before the change never depend on it.

For the mixer (MixedDataset): ``sources, ordinals = sampler.sample(n)`` for the next n positions
(or ``peek(start, n)`` for any range, e.g. a worker's or a rank's share), then
``rows = permute_rows(ordinals, lengths[sources], seed=seed, source=sources)`` (one call for all
sources) to read ``dataset[sources[i]][rows[i]]``; a source is exhausted (``first_exhausted``)
when ``ordinals >= lengths[sources]``. ``state_dict()`` is json-able and resumes bit for bit.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from mixtape import ops
from mixtape.ops import MAX_BLOCK_SIZE, MAX_POSITION, Int64Array, permute_rows

__all__ = ["SourceSampler", "permute_rows"]

STATE_VERSION = 1
_STATE_KEYS = (
    "version",
    "mode",
    "seed",
    "block_size",
    "shuffle",
    "num_sources",
    "position",
    "counts",
    "anchor",
    "anchor_segment",
    "anchor_counts",
    "anchor_segment_counts",
    "timeline",
)


@dataclass
class _Anchor:
    """A state the kernel resumes from: at ``position`` of timeline segment ``segment``, the
    global counts and the counts since the segment's start (block-based modes: a block start)."""

    segment: int
    position: int
    counts: Int64Array
    segment_counts: Int64Array


@dataclass
class _Block:
    """The rest of the current block (block-based modes), computed once when sample() stopped
    inside it, and the anchor after it."""

    start: int
    sources: npt.NDArray[np.int32]
    ordinals: Int64Array
    after: _Anchor


class SourceSampler:
    """Source and ordinal of every global position of a weighted mixture (see the module doc).

    Args:
        weights: one non-negative finite weight per source (normalised; 0 pauses a source).
        mode: ``"greedy"`` (smooth, deterministic), ``"random"`` (i.i.d.) or ``"block"``
            (exact counts per block).
        seed: 0 <= seed < 2**64; keys the random draws, the in-block orders (and, passed to
            :func:`permute_rows`, the row orders).
        block_size: positions per block for ``block`` and shuffled ``greedy`` (1 to 2**28).
        shuffle: permute within blocks; default False for greedy, True for block; random
            takes none.
        names: source names, used in error messages.
    """

    def __init__(
        self,
        weights: Sequence[float] | npt.NDArray[Any],
        *,
        mode: str = "greedy",
        seed: int = 0,
        block_size: int = 1000,
        shuffle: bool | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        ops.check_choice("mode", mode, ops.SAMPLE_MODES)
        self._mode = mode
        self._seed = ops.check_int("seed", seed, 0, (1 << 64) - 1)
        self._block_size = ops.check_int("block_size", block_size, 1, MAX_BLOCK_SIZE)
        if shuffle is None:
            shuffle = mode == "block"
        if not isinstance(shuffle, (bool, np.bool_)):
            raise TypeError(f"shuffle must be a bool or None, got {shuffle!r}")
        if mode == "random" and shuffle:
            raise ValueError("shuffle=True does not apply to mode 'random' (its draws are i.i.d.)")
        self._shuffle = bool(shuffle)
        self._names = list(names) if names is not None else None
        w = ops.normalize_weights(weights, self._names)
        if self._names is not None and len(self._names) != w.size:
            raise ValueError(f"names has {len(self._names)} entries for {w.size} sources")
        self._num_sources = int(w.size)
        self._check_block_counts(w)
        self._timeline: list[tuple[int, npt.NDArray[np.float64]]] = [(0, w)]
        zeros = np.zeros(self._num_sources, dtype=np.int64)
        self._state = _Anchor(0, 0, zeros, zeros.copy())
        self._position = 0
        self._counts = zeros.copy()
        self._block: _Block | None = None
        # Global counts at the start of each segment reached: states to seek from.
        self._checkpoints: dict[int, Int64Array] = {0: zeros.copy()}

    def _check_block_counts(self, w: npt.NDArray[np.float64]) -> None:
        """Block mode gives every block the same counts: a source with positive weight that gets
        none would never be read (a silently different mixture), so it is an error."""
        if self._mode != "block":
            return
        counts = ops.block_counts(w, self._block_size)
        starved = np.flatnonzero((w > 0) & (counts == 0))
        if starved.size:
            i = int(starved[0])
            name = repr(self._names[i]) if self._names is not None else f"{i}"
            need = int(np.ceil(1.0 / float(w[w > 0].min())))
            while np.any((w > 0) & (ops.block_counts(w, need) == 0)):  # float rounding at 1/w
                need += 1
            raise ValueError(
                f"mode 'block': source {name} has weight {float(w[i]):.4g} but gets no position "
                f"in a block of {self._block_size} (every block holds the same largest-remainder "
                f"counts), so it would never be read; use block_size >= {need} or mode='greedy'"
            )

    # --- properties ---------------------------------------------------------------------------

    @property
    def num_sources(self) -> int:
        return self._num_sources

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def shuffle(self) -> bool:
        return self._shuffle

    @property
    def names(self) -> list[str] | None:
        return list(self._names) if self._names is not None else None

    @property
    def position(self) -> int:
        """The next position sample() returns."""
        return self._position

    @property
    def counts(self) -> Int64Array:
        """Picks of each source before :attr:`position` (int64 [S], a copy)."""
        out: Int64Array = self._counts.copy()
        return out

    @property
    def weights(self) -> npt.NDArray[np.float64]:
        """The normalised weights in force at :attr:`position`."""
        out: npt.NDArray[np.float64] = self._timeline[self._segment_of(self._position)][1].copy()
        return out

    @property
    def weight_timeline(self) -> list[tuple[int, npt.NDArray[np.float64]]]:
        """``(position, normalised weights)`` entries: each holds from its position on."""
        return [(p, w.copy()) for p, w in self._timeline]

    @property
    def uses_blocks(self) -> bool:
        """Whether positions come in whole blocks (block mode, shuffled greedy)."""
        return self._mode == "block" or (self._mode == "greedy" and self._shuffle)

    def __repr__(self) -> str:
        return (
            f"SourceSampler(num_sources={self._num_sources}, mode={self._mode!r}, "
            f"seed={self._seed}, block_size={self._block_size}, shuffle={self._shuffle}, "
            f"position={self._position}, segments={len(self._timeline)})"
        )

    # --- sampling -----------------------------------------------------------------------------

    def sample(self, count: int) -> tuple[npt.NDArray[np.int32], Int64Array]:
        """Sources (int32) and ordinals (int64) of the next ``count`` positions; advances."""
        count = ops.check_int("count", count, 0, MAX_POSITION - self._position)
        start, stop = self._position, self._position + count
        sources = np.empty(count, dtype=np.int32)
        ordinals = np.empty(count, dtype=np.int64)
        if count == 0:
            return sources, ordinals
        if not self.uses_blocks:
            r = self._run(self._state, start, stop, sources, ordinals)
            self._state, self._position, self._counts = r.after, stop, r.end_counts
            return sources, ordinals
        pos = start
        counts = self._counts.copy()
        if self._block is not None:  # the rest of the current block, computed before
            b = self._block
            take = min(count, b.sources.size)
            sources[:take] = b.sources[:take]
            ordinals[:take] = b.ordinals[:take]
            counts += np.bincount(b.sources[:take], minlength=self._num_sources)
            pos += take
            if take == b.sources.size:
                self._state, self._block = b.after, None
            else:
                self._block = _Block(pos, b.sources[take:], b.ordinals[take:], b.after)
        if pos < stop:
            state = self._state
            _, block_start, block_end = self._block_of(stop)
            if block_start > pos:  # whole blocks up to the one holding `stop`
                head = slice(pos - start, block_start - start)
                r = self._run(state, pos, block_start, sources[head], ordinals[head])
                state, counts = r.after, r.end_counts
            if block_start < stop:  # the block holding `stop`: computed whole, the rest kept
                n = block_end - block_start
                bs = np.empty(n, dtype=np.int32)
                bo = np.empty(n, dtype=np.int64)
                r = self._run(state, block_start, block_end, bs, bo)
                lo = max(pos, block_start)
                sources[lo - start :] = bs[lo - block_start : stop - block_start]
                ordinals[lo - start :] = bo[lo - block_start : stop - block_start]
                # counts holds the picks before lo (also those made before a weight change
                # inside this block, which the block's start state does not)
                counts = counts + np.bincount(
                    bs[lo - block_start : stop - block_start], minlength=self._num_sources
                )
                rest = slice(stop - block_start, None)
                self._block = _Block(stop, bs[rest], bo[rest], r.after)
            self._state = state
        self._position, self._counts = stop, counts
        return sources, ordinals

    def peek(self, start: int, count: int) -> tuple[npt.NDArray[np.int32], Int64Array]:
        """Sources and ordinals of positions [start, start + count), without changing the state.

        O(count) (plus one block in the block-based modes) from the current position or any
        later one; an earlier start replays from the nearest known state before it (position 0
        or a segment start passed in this process): at most one pass at the kernel's speed.
        """
        start = ops.check_int("start", start, 0, MAX_POSITION)
        count = ops.check_int("count", count, 0, MAX_POSITION - start)
        sources = np.empty(count, dtype=np.int32)
        ordinals = np.empty(count, dtype=np.int64)
        if count:
            anchor, _ = self._state_at(start)
            self._run(anchor, start, start + count, sources, ordinals)
        return sources, ordinals

    def seek(self, position: int) -> None:
        """Make ``position`` the next position sample() returns (backwards or forwards)."""
        position = ops.check_int("position", position, 0, MAX_POSITION)
        self._state, self._counts = self._state_at(position)
        self._position = position
        self._block = None

    def set_weights(
        self, weights: Sequence[float] | npt.NDArray[Any], position: int | None = None
    ) -> None:
        """Use ``weights`` from ``position`` on (default: the current position).

        ``position`` must be >= :attr:`position` (positions already produced keep their
        weights) and >= the last timeline entry's; at that entry's position it replaces it.
        Weights equal to those in force add no entry: a new segment would restart the greedy
        counts and the block alignment for nothing.
        """
        w = ops.normalize_weights(weights, self._names, self._num_sources)
        self._check_block_counts(w)
        p = self._position if position is None else ops.check_int(
            "position", position, 0, MAX_POSITION
        )
        if p < self._position:
            raise ValueError(
                f"set_weights: position {p} is before the current position {self._position}; "
                "positions already produced keep their weights"
            )
        last_pos, last_w = self._timeline[-1]
        if p < last_pos:
            raise ValueError(
                f"set_weights: position {p} is before the last timeline entry, at {last_pos}"
            )
        self._block = None
        if p > last_pos:
            if not np.array_equal(w, last_w):
                self._timeline.append((p, w))
            return
        # p == last_pos >= position: the entry holds no position produced yet.
        k = len(self._timeline) - 1
        if k > 0 and np.array_equal(w, self._timeline[k - 1][1]):
            del self._timeline[k]
            self._checkpoints.pop(k, None)
            if self._state.segment >= k:  # the anchor was the removed segment's start
                self._state, _ = self._state_at(self._position, allow_current=False)
        else:
            self._timeline[k] = (p, w)

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The state to resume from (torchdata Stateful): plain ints, floats and lists."""
        s = self._state
        return {
            "version": STATE_VERSION,
            "mode": self._mode,
            "seed": self._seed,
            "block_size": self._block_size,
            "shuffle": self._shuffle,
            "num_sources": self._num_sources,
            "position": self._position,
            "counts": self._counts.tolist(),
            "anchor": s.position,
            "anchor_segment": s.segment,
            "anchor_counts": s.counts.tolist(),
            "anchor_segment_counts": s.segment_counts.tolist(),
            "timeline": [[p, w.tolist()] for p, w in self._timeline],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (also after a JSON round trip).

        The configuration (mode, seed, block_size, shuffle, number of sources) must match this
        sampler's; the weight timeline is the state's. The state is checked: the counts it
        claims at its position are recomputed from its anchor.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"state_dict: missing keys {missing}")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"state_dict: version {state['version']!r}, expected {STATE_VERSION}")
        for key, mine in (
            ("mode", self._mode),
            ("seed", self._seed),
            ("block_size", self._block_size),
            ("shuffle", self._shuffle),
            ("num_sources", self._num_sources),
        ):
            if state[key] != mine:
                raise ValueError(
                    f"state_dict: {key} is {state[key]!r} but this sampler has {mine!r}; "
                    "build the sampler with the saved configuration"
                )
        n = self._num_sources
        timeline = _load_timeline(state["timeline"], n, self._names)
        position = ops.check_int("state_dict position", state["position"], 0, MAX_POSITION)
        anchor = ops.check_int("state_dict anchor", state["anchor"], 0, position)
        segment = ops.check_int(
            "state_dict anchor_segment", state["anchor_segment"], 0, len(timeline) - 1
        )
        seg_start = timeline[segment][0]
        seg_end = timeline[segment + 1][0] if segment + 1 < len(timeline) else MAX_POSITION
        if not seg_start <= anchor <= seg_end:
            raise ValueError(
                f"state_dict: anchor {anchor} is outside its segment {segment} "
                f"[{seg_start}, {seg_end}]"
            )
        counts = _load_counts(state["counts"], n, "counts")
        anchor_state = _Anchor(
            segment,
            anchor,
            _load_counts(state["anchor_counts"], n, "anchor_counts"),
            _load_counts(state["anchor_segment_counts"], n, "anchor_segment_counts"),
        )
        # Replay from the anchor to the position: checks the anchor state (the kernel rejects
        # one no run can reach) and the counts claimed at the position.
        saved = self._timeline, self._checkpoints
        self._timeline, self._checkpoints = timeline, {0: np.zeros(n, dtype=np.int64)}
        try:
            target = self._anchor_for(position)
            after = self._run(anchor_state, anchor, target).after
            end = after.counts
            if position > target:
                end = self._run(after, target, position).end_counts
        except ValueError as e:
            self._timeline, self._checkpoints = saved
            raise ValueError(f"state_dict: inconsistent state: {e}") from None
        if not np.array_equal(end, counts):
            self._timeline, self._checkpoints = saved
            raise ValueError(
                f"state_dict: the counts at position {position} are {counts.tolist()[:16]}, but "
                f"the anchor state gives {end.tolist()[:16]}"
            )
        self._state, self._position, self._counts = after, position, counts
        self._block = None

    # --- internals ----------------------------------------------------------------------------

    def _segment_of(self, position: int) -> int:
        return bisect.bisect_right(self._timeline, position, key=_entry_position) - 1

    def _segment_end(self, k: int) -> int | None:
        return self._timeline[k + 1][0] if k + 1 < len(self._timeline) else None

    def _block_of(self, position: int) -> tuple[int, int, int]:
        """(segment, start, end) of the block holding ``position`` (end cut at the segment's)."""
        k = self._segment_of(position)
        seg_start = self._timeline[k][0]
        start = seg_start + (position - seg_start) // self._block_size * self._block_size
        end = start + self._block_size
        seg_end = self._segment_end(k)
        return k, start, end if seg_end is None else min(end, seg_end)

    def _anchor_for(self, position: int) -> int:
        return self._block_of(position)[1] if self.uses_blocks else position

    def _state_at(self, position: int, allow_current: bool = True) -> tuple[_Anchor, Int64Array]:
        """The anchor state for ``position`` and the counts before it, computed from the nearest
        known state at or before the anchor."""
        target = self._anchor_for(position)
        best: _Anchor | None = None
        if allow_current and self._state.position <= target:
            best = self._state
        after = self._block.after if allow_current and self._block is not None else None
        if after is not None and after.position <= target:
            best = after if best is None or after.position > best.position else best
        for k, counts in self._checkpoints.items():
            p = self._timeline[k][0] if k < len(self._timeline) else None
            if p is not None and p <= target and (best is None or p > best.position):
                best = _Anchor(k, p, counts, np.zeros(self._num_sources, dtype=np.int64))
        assert best is not None  # segment 0 starts at 0
        anchor = self._run(best, best.position, target).after if best.position < target else best
        if position == target:
            return anchor, anchor.counts.copy()
        return anchor, self._run(anchor, target, position).end_counts

    def _run(
        self,
        state: _Anchor,
        start: int,
        stop: int,
        sources: npt.NDArray[np.int32] | None = None,
        ordinals: Int64Array | None = None,
    ) -> _RunResult:
        """Positions [start, stop) from ``state`` (at or before start), one kernel call per
        segment; writes into ``sources``/``ordinals`` when given (else only counts)."""
        k, anchor = state.segment, state.position
        counts, seg_counts = state.counts, state.segment_counts
        while True:
            seg_start, w = self._timeline[k]
            seg_end = self._segment_end(k)
            upto = stop if seg_end is None else min(stop, seg_end)
            # Counting only: nothing to write, so the kernel may skip what it can (whole blocks).
            lo = upto if sources is None else min(max(start, anchor), upto)
            r = ops.sample_sources(
                w,
                counts,
                seg_counts,
                mode=self._mode,
                seed=self._seed,
                block_size=self._block_size,
                shuffle=self._shuffle,
                segment=k,
                segment_start=seg_start,
                anchor=anchor,
                start=lo,
                count=upto - lo,
                want_output=sources is not None,
                out_sources=None if sources is None else sources[lo - start : upto - start],
                out_ordinals=None if ordinals is None else ordinals[lo - start : upto - start],
            )
            if seg_end is not None and upto == seg_end:
                # Into the next segment: its state is the counts at its start.
                k, anchor = k + 1, seg_end
                counts, seg_counts = r.end_counts, np.zeros(self._num_sources, dtype=np.int64)
                self._checkpoints.setdefault(k, counts.copy())
                if upto == stop:
                    return _RunResult(_Anchor(k, anchor, counts, seg_counts), counts.copy())
                continue
            return _RunResult(_Anchor(k, r.anchor, r.counts, r.segment_counts), r.end_counts)


@dataclass
class _RunResult:
    after: _Anchor  # the anchor state at or before the range's end
    end_counts: Int64Array  # global counts before the range's end


def _entry_position(entry: tuple[int, npt.NDArray[np.float64]]) -> int:
    return entry[0]


def _load_counts(value: Any, n: int, name: str) -> Int64Array:
    arr = np.asarray(value)
    if arr.shape != (n,) or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"state_dict: {name} must be {n} integers, got {value!r:.80}")
    out = arr.astype(np.int64)
    if n and out.min() < 0:
        raise ValueError(f"state_dict: {name} has a negative entry: {out.tolist()[:16]}")
    return out


def _load_timeline(
    value: Any, n: int, names: Sequence[str] | None
) -> list[tuple[int, npt.NDArray[np.float64]]]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError("state_dict: timeline must be a non-empty list of [position, weights]")
    out: list[tuple[int, npt.NDArray[np.float64]]] = []
    for i, entry in enumerate(value):
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ValueError(f"state_dict: timeline[{i}] must be [position, weights]")
        p = ops.check_int(f"state_dict timeline[{i}] position", entry[0], 0, MAX_POSITION)
        if (i == 0 and p != 0) or (i > 0 and p <= out[-1][0]):
            raise ValueError(
                f"state_dict: timeline positions must start at 0 and increase, got {p} at "
                f"entry {i}"
            )
        w = np.asarray(entry[1], dtype=np.float64)
        ops.normalize_weights(w, names, n)  # validates; the saved values are used as they are
        out.append((p, w))
    return out
