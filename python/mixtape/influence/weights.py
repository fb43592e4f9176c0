"""Mixture weights from influence scores: an exponentiated-gradient step on per-source helpfulness.

Per source s: score_s = mean over its samples of -influence (positive = the source helps the
probe loss). Then

    log w_s += learning_rate * (score_s - mean_s score_s) / scale
    w = normalise(w);  w = (1 - smoothing) * w + smoothing * prior
    w_s >= floor for every s, summing to 1 (the sources below the floor are held at it and the
    rest rescaled, repeated until none falls below)

The next step starts from the weights before the floor, held only at floor * exp(-floor_depth)
(``WeightUpdate.carried``): a source the scores keep rejecting then needs several updates of
evidence to rise above the floor again, instead of one noisy one.

Subtracting the mean changes nothing after normalising (the step is exponentiated and the
weights renormalised), so only the differences between sources move the weights; the scale
should measure those differences too. The default, ``max_dev`` (max_s |score_s - mean|), makes
``learning_rate`` the largest change of any log-weight relative to the mean, whatever the units
of the influence scores and whatever part of them every source shares. ``max_abs`` (max
|score_s|, the default before) also counts that shared part: when every source helps (early in
training, when all of them teach the common token statistics) it divides the differences by a
large number and the weights barely move, and the effective step then grows as the shared part
fades; the step size followed the training phase rather than the evidence. No scale here knows
the sampling noise of the scores (the tracker passes per-source means): when the sources are
indistinguishable, ``max_dev`` and ``std`` scale the noise up to a full step (``max_abs`` did too
whenever the shared part was small); ``smoothing`` toward the prior, more samples per source or a
smaller ``learning_rate`` bound that jitter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["NORMALIZATIONS", "MixtureWeightCalculator", "WeightUpdate"]

#: How scores are scaled before the step: by their largest deviation from the mean over sources
#: (``learning_rate`` is then the largest relative log-weight change), by their standard
#: deviation over sources, by max |score_s| (counts the part all sources share), or not at all.
NORMALIZATIONS = ("max_dev", "std", "max_abs", "none")

#: Relative differences between source scores below this are float32 rounding (the influence
#: kernel computes in float32), not evidence: ``max_dev`` and ``std`` then take no step.
_TIE = 1e-6

FloatArray = npt.NDArray[np.float64]
Weights = Mapping[str, float] | Sequence[float] | npt.NDArray[Any]


@dataclass(frozen=True)
class WeightUpdate:
    """New weights (a dict by source name, or an array, as the current weights were given) and
    the diagnostics of the step, per source in the same order."""

    weights: dict[str, float] | FloatArray
    scores: FloatArray  # mean helpfulness (-influence) of each source's samples
    counts: npt.NDArray[np.int64]  # samples of each source in this update
    scale: float  # what the scores were divided by (0: no step)
    step: FloatArray  # the change of each log-weight before normalising (centred for max_dev)
    carried: FloatArray | None = None  # the weights the next step starts from (see floor_depth)


class MixtureWeightCalculator:
    """Turns per-sample influence into new mixture weights (see the module docstring).

    ``prior``: the weights smoothing pulls toward (a dict name -> weight, or an array); its keys
    or length define the sources. ``learning_rate`` (eta >= 0), ``smoothing`` (epsilon in
    [0, 1]), ``floor`` (minimum weight, floor * sources <= 1), ``normalize`` (one of
    :data:`NORMALIZATIONS`).

    ``floor_depth``: the floor applies to the weights handed to the mixture; the weights the
    next step starts from (:attr:`WeightUpdate.carried`, pass them back as ``carried``) may sink
    to ``floor * exp(-floor_depth)``. A source held at the floor then needs evidence worth that
    much log-weight to rise above it again, so one noisy update does not lift a rejected
    source, while a source that turns useful later still recovers in a few steps. 0 carries
    the floored weights themselves.
    """

    def __init__(
        self,
        prior: Weights,
        learning_rate: float = 1.0,
        smoothing: float = 0.1,
        floor: float = 0.0,
        normalize: str = "max_dev",
        floor_depth: float = 3.0,
    ) -> None:
        self.names, prior_arr = _weights_array(prior, None, "prior")
        self.prior = prior_arr
        if not _finite(learning_rate) or learning_rate < 0:
            raise ValueError(f"learning_rate must be a finite float >= 0, got {learning_rate!r}")
        if not _finite(smoothing) or not 0 <= smoothing <= 1:
            raise ValueError(f"smoothing must be in [0, 1], got {smoothing!r}")
        if not _finite(floor) or floor < 0 or floor * len(prior_arr) > 1 + 1e-12:
            raise ValueError(
                f"floor must be >= 0 with floor * sources <= 1, got {floor!r} for "
                f"{len(prior_arr)} sources"
            )
        if not _finite(floor_depth) or floor_depth < 0:
            raise ValueError(f"floor_depth must be a finite float >= 0, got {floor_depth!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.learning_rate = float(learning_rate)
        self.smoothing = float(smoothing)
        self.floor = float(floor)
        self.normalize = normalize
        self.floor_depth = float(floor_depth)

    @property
    def num_sources(self) -> int:
        return len(self.prior)

    def source_scores(
        self, influence: Any, source_ids: Any
    ) -> tuple[FloatArray, npt.NDArray[np.int64]]:
        """Per source: mean of -influence over its samples, and the sample counts."""
        infl = _vector(influence, "influence", np.float64)
        ids = self._source_index(source_ids, infl.size)
        bad = ~np.isfinite(infl)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"influence[{i}] is {infl[i]} (sample of source {self._name(ids[i])})")
        counts = np.bincount(ids, minlength=self.num_sources).astype(np.int64)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            raise ValueError(
                f"source {self._name(int(empty[0]))} has no samples in this update "
                f"({', '.join(self._name(int(s)) for s in empty)} empty); every source needs "
                "scored samples"
            )
        sums = np.bincount(ids, weights=-infl, minlength=self.num_sources)
        return sums / counts, counts

    def get_weight_update(
        self, current_weights: Weights, influence: Any, source_ids: Any,
        carried: Weights | None = None,
    ) -> WeightUpdate:
        """New weights from ``current_weights`` and per-sample ``influence`` [n] (positive =
        harmful) of samples from sources ``source_ids`` [n] (indices, or names when the
        sources are named). ``carried``: the previous update's :attr:`WeightUpdate.carried`,
        to step from instead of the (floored) current weights."""
        _, current = _weights_array(current_weights, self.names, "current_weights")
        if current.size != self.num_sources:
            raise ValueError(
                f"current_weights has {current.size} sources, the prior {self.num_sources}"
            )
        if carried is not None:
            _, current = _weights_array(carried, self.names, "carried")
            if current.size != self.num_sources:
                raise ValueError(f"carried has {current.size} sources, the prior "
                                 f"{self.num_sources}")  # fmt: skip
        scores, counts = self.source_scores(influence, source_ids)
        moved = scores
        if self.normalize == "max_dev":
            moved = scores - scores.mean()  # the same weights as uncentred, after normalising
            scale = float(np.max(np.abs(moved)))
        elif self.normalize == "max_abs":
            scale = float(np.max(np.abs(scores)))
        elif self.normalize == "std":
            scale = float(np.std(scores))
        else:
            scale = 1.0
        if self.normalize in ("max_dev", "std") and scale <= _TIE * float(np.max(np.abs(scores))):
            scale = 0.0  # the sources differ by rounding only: scaling it up would be noise
        step = self.learning_rate * moved / scale if scale > 0 else np.zeros_like(scores)
        with np.errstate(divide="ignore"):  # a weight of 0 stays 0 before smoothing
            logw = np.log(current) + step
        w = np.exp(logw - np.max(logw))
        w /= w.sum()
        w = (1.0 - self.smoothing) * w + self.smoothing * self.prior
        keep = w if self.floor <= 0 else _apply_floor(w, self.floor * math.exp(-self.floor_depth))
        w = _apply_floor(w, self.floor)
        weights: dict[str, float] | FloatArray = (
            dict(zip(self.names, w.tolist(), strict=True)) if self.names is not None else w
        )
        return WeightUpdate(weights, scores, counts, scale, step, keep)

    # --- internals -----------------------------------------------------------------------------

    def _name(self, s: int) -> str:
        return repr(self.names[s]) if self.names is not None else str(s)

    def _source_index(self, source_ids: Any, n: int) -> npt.NDArray[np.intp]:
        """Source ids as indices in [0, sources), from indices or (named sources) names."""
        if hasattr(source_ids, "detach"):
            source_ids = source_ids.detach().cpu().numpy()
        arr = np.asarray(source_ids)
        if arr.ndim != 1 or arr.size != n:
            raise ValueError(f"source_ids must be [{n}] like influence, got shape {arr.shape}")
        if arr.dtype.kind in "UO" and arr.size:
            if self.names is None:
                raise TypeError("source_ids are names but the sources are unnamed (array prior)")
            index = {name: i for i, name in enumerate(self.names)}
            unknown = [x for x in arr.tolist() if x not in index]
            if unknown:
                raise ValueError(f"source_ids name unknown sources {sorted(set(map(str, unknown)))}"
                                 f"; sources: {self.names}")  # fmt: skip
            return np.array([index[x] for x in arr.tolist()], dtype=np.intp)
        if arr.size == 0:
            return np.zeros(0, dtype=np.intp)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"source_ids must be integer indices or names, got dtype {arr.dtype}")
        bad = (arr < 0) | (arr >= self.num_sources)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"source_ids[{i}] = {int(arr[i])} is not a source index in [0, {self.num_sources})"
            )
        return arr.astype(np.intp)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _vector(x: Any, what: str, dtype: Any) -> FloatArray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    arr: FloatArray = np.asarray(x, dtype=dtype)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {arr.shape}")
    return arr


def _weights_array(
    weights: Weights, names: list[str] | None, what: str
) -> tuple[list[str] | None, FloatArray]:
    """(names or None, weights normalised to sum 1), checked non-negative and finite."""
    if isinstance(weights, Mapping):
        keys = [str(k) for k in weights]
        if names is not None and keys != names and sorted(keys) != sorted(names):
            raise ValueError(f"{what} names sources {keys}, the prior {names}")
        order = names if names is not None else keys
        by_name = {str(k): v for k, v in weights.items()}
        arr = np.array([float(by_name[k]) for k in order], dtype=np.float64)
        out_names: list[str] | None = order
    else:
        if names is not None:
            raise TypeError(f"{what} must be a mapping name -> weight, as the prior is")
        arr = _vector(weights, what, np.float64)
        out_names = None
    if arr.size == 0:
        raise ValueError(f"{what} has no sources")
    bad = ~np.isfinite(arr) | (arr < 0)
    if bad.any():
        i = int(np.argmax(bad))
        who = repr(out_names[i]) if out_names is not None else str(i)
        raise ValueError(f"{what}: weight of source {who} is {arr[i]}; weights must be >= 0")
    total = float(arr.sum())
    if total <= 0:
        raise ValueError(f"{what}: weights sum to 0")
    return out_names, arr / total


def _apply_floor(w: FloatArray, floor: float) -> FloatArray:
    """w with every entry >= floor and sum 1: entries below it are held at it, the others
    rescaled to the mass left, until none falls below (at most one round per source)."""
    if floor <= 0:
        return w
    held = np.zeros(w.size, dtype=bool)
    out: FloatArray = w.copy()
    for _ in range(w.size):
        free = ~held
        mass = 1.0 - floor * held.sum()
        total = w[free].sum()
        out[free] = w[free] / total * mass if total > 0 else mass / free.sum()
        out[held] = floor
        low = free & (out < floor)
        if not low.any():
            break
        held |= low
    return out
