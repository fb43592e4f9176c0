"""Mixture weights that change with the training step: a pure function of the step.

A :class:`WeightScheduler` holds points ``(step, weights)`` and interpolates between them, with
EasyDeL's semantics: before the first point, the first point's weights; after the last, the
last's; between two points ``step`` keeps the earlier point's weights, ``linear`` moves linearly
and ``cosine`` moves with the ease ``0.5 * (1 - cos(pi * t))``. Each point's weights are
normalised before interpolating, so a point means the same mixture whatever its scale
(``{a: 3, b: 1}`` is ``{a: 0.75, b: 0.25}``); for points that already sum to 1 this is EasyDeL's
result exactly (it interpolates the raw weights, then normalises).

A "step" is whatever unit the caller counts (optimizer steps, batches, examples): the scheduler
only compares numbers. :meth:`WeightScheduler.timeline` turns a schedule into the piecewise
constant ``(step, weights)`` entries a mixer appends to its timeline: exact for ``step``, and
sampled on a fixed grid of multiples of ``every`` for ``linear`` / ``cosine``.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = ["INTERPOLATIONS", "Interpolation", "WeightSchedulePoint", "WeightScheduler"]

Interpolation = Literal["step", "linear", "cosine"]
INTERPOLATIONS: tuple[str, ...] = ("step", "linear", "cosine")


def _check_step(step: object, where: str) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"{where}: step must be an int, got {step!r}")
    return int(step)


@dataclass(frozen=True)
class WeightSchedulePoint:
    """The mixture weights that hold at training step ``step`` (>= 0).

    ``weights`` maps source names to finite numbers >= 0, not all zero; they need not sum to 1.
    """

    step: int
    weights: Mapping[str, float]

    def __post_init__(self) -> None:
        step = _check_step(self.step, "WeightSchedulePoint")
        where = f"WeightSchedulePoint(step={step})"
        if step < 0:
            raise ValueError(f"{where}: step must be >= 0")
        if not isinstance(self.weights, Mapping) or not self.weights:
            raise ValueError(f"{where}: weights must be a non-empty mapping of source name to "
                             f"weight, got {self.weights!r}")  # fmt: skip
        weights: dict[str, float] = {}
        for name, w in self.weights.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}: source names must be non-empty strings, got {name!r}")
            if isinstance(w, bool) or not isinstance(w, numbers.Real):
                raise TypeError(f"{where}: weight of {name!r} must be a number, got {w!r}")
            if not math.isfinite(float(w)) or float(w) < 0:
                raise ValueError(f"{where}: weight of {name!r} is {w!r}; weights must be finite "
                                 f"and >= 0")  # fmt: skip
            weights[name] = float(w)
        if not any(weights.values()):
            raise ValueError(f"{where}: all weights are zero; at least one source needs weight")
        object.__setattr__(self, "step", step)
        object.__setattr__(self, "weights", weights)


def _as_point(p: object, i: int) -> WeightSchedulePoint:
    """A point given as a WeightSchedulePoint, ``(step, weights)`` or ``{"step", "weights"}``."""
    if isinstance(p, WeightSchedulePoint):
        return p
    try:
        if isinstance(p, Mapping):
            extra = set(p) - {"step", "weights"}
            if extra or "step" not in p or "weights" not in p:
                raise ValueError(f"expected keys 'step' and 'weights', got {sorted(p)}")
            return WeightSchedulePoint(p["step"], p["weights"])
        if isinstance(p, (tuple, list)) and len(p) == 2:
            return WeightSchedulePoint(p[0], p[1])
    except (ValueError, TypeError) as e:
        raise type(e)(f"schedule point {i}: {e}") from e
    raise TypeError(f"schedule point {i}: expected WeightSchedulePoint, (step, weights) or "
                    f"{{'step': ..., 'weights': ...}}, got {p!r}")  # fmt: skip


class WeightScheduler:
    """Mixture weights as a pure function of the step, from points ``(step, weights)``.

    ``schedule``: points with strictly increasing steps, all naming the same sources (the first
    point's order is the order of :attr:`source_names`). Points may also be given as
    ``(step, weights)`` pairs or ``{"step": ..., "weights": ...}`` mappings (as in a YAML
    config). Holds no state: equal schedulers give equal weights at every step, pickled or not.
    """

    def __init__(self, schedule: Sequence[Any], interpolation: Interpolation = "step") -> None:
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {list(INTERPOLATIONS)}, "
                             f"got {interpolation!r}")  # fmt: skip
        if isinstance(schedule, (str, bytes, Mapping)) or not isinstance(schedule, Sequence):
            raise TypeError(f"schedule must be a sequence of points, got {type(schedule).__name__}")
        if len(schedule) == 0:
            raise ValueError("schedule is empty: give at least one (step, weights) point")
        points = tuple(_as_point(p, i) for i, p in enumerate(schedule))
        names = tuple(points[0].weights)
        for i, (prev, p) in enumerate(itertools.pairwise(points), 1):
            if p.step <= prev.step:
                what = "repeats" if p.step == prev.step else "comes before"
                raise ValueError(f"schedule point {i} (step {p.step}) {what} point {i - 1} "
                                 f"(step {prev.step}): steps must increase")  # fmt: skip
        for i, p in enumerate(points[1:], 1):
            if set(p.weights) != set(names):
                missing = sorted(set(names) - set(p.weights))
                extra = sorted(set(p.weights) - set(names))
                raise ValueError(f"schedule point {i} (step {p.step}) names other sources than "
                                 f"point 0: missing {missing}, extra {extra}")  # fmt: skip
        self.points = points
        self.interpolation: Interpolation = interpolation
        self.source_names: tuple[str, ...] = names
        self.steps: tuple[int, ...] = tuple(p.step for p in points)
        rows = [[p.weights[n] for n in names] for p in points]
        w = np.asarray(rows, dtype=np.float64)
        self._weights: npt.NDArray[np.float64] = w / w.sum(axis=1, keepdims=True)

    @classmethod
    def constant(cls, weights: Mapping[str, float]) -> WeightScheduler:
        """A schedule whose weights never change."""
        return cls([WeightSchedulePoint(0, weights)])

    # -- weights at a step --------------------------------------------------------------------

    def weights_array(self, step: int) -> npt.NDArray[np.float64]:
        """Weights at ``step`` as float64 in :attr:`source_names` order, summing to 1."""
        step = _check_step(step, "WeightScheduler")
        steps, w = self.steps, self._weights
        # i: the last point at or before step (the first point when step is before it)
        i = max(int(np.searchsorted(steps, step, side="right")) - 1, 0)
        out: npt.NDArray[np.float64] = w[i].copy()
        if self.interpolation == "step" or i == len(steps) - 1 or step <= steps[i]:
            return out
        t = (step - steps[i]) / (steps[i + 1] - steps[i])
        if self.interpolation == "cosine":
            t = 0.5 * (1.0 - math.cos(math.pi * t))
        out = np.maximum((1.0 - t) * out + t * w[i + 1], 0.0)
        out /= out.sum()
        return out

    def get_weights(self, step: int) -> dict[str, float]:
        """Weights at ``step``, normalised to sum to 1, keyed by source name."""
        return dict(zip(self.source_names, self.weights_array(step).tolist(), strict=True))

    # -- piecewise timelines ------------------------------------------------------------------

    def change_points(self, start_step: int = 0, end_step: int | None = None) -> list[int]:
        """Point steps in ``(start_step, end_step)`` where the schedule's piece changes: the
        weights jump there (``step``), or start or stop moving (``linear`` / ``cosine``)."""
        start, end = self._range(start_step, end_step)
        last = len(self.steps) - 1
        out = []
        for i, s in enumerate(self.steps):
            if not start < s < end:
                continue
            before = i > 0 and not self._same(i - 1, i)
            after = self.interpolation != "step" and i < last and not self._same(i, i + 1)
            if before or after:
                out.append(s)
        return out

    def timeline(self, start_step: int = 0, end_step: int | None = None,
                 every: int | None = None) -> list[tuple[int, dict[str, float]]]:  # fmt: skip
        """Piecewise constant ``(step, weights)`` entries covering ``[start_step, end_step)``.

        Each entry holds from its step until the next entry's. The first entry is at
        ``start_step``; then one at each change point and, where weights move (``linear`` /
        ``cosine`` between two different points), one at every multiple of ``every`` inside
        the moving stretch, with the exact weights at that step (so the timeline lags the
        smooth schedule by less than ``every`` steps). The grid is of absolute multiples, so a
        timeline started later (a resumed run) has the same entries from there on. Consecutive
        entries with equal weights are merged. ``end_step=None`` ends after the last point
        (the weights are constant from there). ``every`` is required only when a moving stretch
        falls in the range.
        """
        start, end = self._range(start_step, end_step)
        if every is not None and (isinstance(every, bool) or not isinstance(every, numbers.Integral)
                                  or every < 1):  # fmt: skip
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        steps = {start, *self.change_points(start, end)}
        if self.interpolation != "step":
            for i in range(len(self.steps) - 1):
                lo, hi = max(self.steps[i], start), min(self.steps[i + 1], end)
                if lo >= hi or self._same(i, i + 1):
                    continue
                if every is None:
                    raise ValueError(f"timeline: the weights move ({self.interpolation}) between "
                                     f"steps {self.steps[i]} and {self.steps[i + 1]}; give every="
                                     f"<steps between timeline entries>")  # fmt: skip
                first = (lo // every + 1) * every  # the first grid step after lo
                steps.update(range(first, hi, int(every)))
        out: list[tuple[int, dict[str, float]]] = []
        prev: npt.NDArray[np.float64] | None = None
        for s in sorted(steps):
            w = self.weights_array(s)
            if prev is None or not np.array_equal(w, prev):
                out.append((s, dict(zip(self.source_names, w.tolist(), strict=True))))
                prev = w
        return out

    def entry_step(self, step: int, every: int | None = None) -> int:
        """The step of the :meth:`timeline` entry in force at ``step`` (a point, a multiple of
        ``every`` inside a moving stretch, or 0): a timeline started there has the entries of one
        started at 0 from there on, whatever ``step`` is."""
        at = max([p for p in self.steps if p <= step], default=0)
        if self.interpolation != "step" and every:
            for i in range(len(self.steps) - 1):
                if self.steps[i] <= step < self.steps[i + 1] and not self._same(i, i + 1):
                    grid = (step // every) * every
                    if grid > self.steps[i]:
                        at = max(at, grid)
        return at

    def _same(self, i: int, j: int) -> bool:
        return bool(np.array_equal(self._weights[i], self._weights[j]))

    def _range(self, start_step: int, end_step: int | None) -> tuple[int, int]:
        start = _check_step(start_step, "WeightScheduler")
        end = self.steps[-1] + 1 if end_step is None else _check_step(end_step, "WeightScheduler")
        if end_step is None:
            end = max(end, start + 1)
        if end <= start:
            raise ValueError(f"end_step ({end}) must be after start_step ({start})")
        return start, end

    # -- identity -----------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WeightScheduler):
            return NotImplemented
        return self.points == other.points and self.interpolation == other.interpolation

    def __repr__(self) -> str:
        points = ", ".join(f"({p.step}, {p.weights})" for p in self.points)
        return f"WeightScheduler([{points}], interpolation={self.interpolation!r})"
