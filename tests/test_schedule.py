"""WeightScheduler: values at and between points for each interpolation, timelines, bad inputs."""

from __future__ import annotations

import itertools
import math
import pickle
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtape import WeightSchedulePoint, WeightScheduler

P = WeightSchedulePoint


def reference(points: list[tuple[int, dict[str, float]]], kind: str, step: int) -> dict[str, float]:
    """The schedule spelled out: normalise each point, find the segment, ease, interpolate."""
    names = list(points[0][1])
    norm = [(s, {k: w[k] / sum(w.values()) for k in names}) for s, w in points]
    if step <= norm[0][0]:
        return norm[0][1]
    if step >= norm[-1][0]:
        return norm[-1][1]
    i = max(j for j, (s, _) in enumerate(norm) if s <= step)
    (s0, a), (s1, b) = norm[i], norm[i + 1]
    if kind == "step":
        return a
    t = (step - s0) / (s1 - s0)
    if kind == "cosine":
        t = 0.5 * (1 - math.cos(math.pi * t))
    out = {k: a[k] + t * (b[k] - a[k]) for k in names}
    total = sum(out.values())
    return {k: v / total for k, v in out.items()}


def test_easydel_linear_example() -> None:
    s = WeightScheduler([P(0, {"code": 0.2, "text": 0.8}), P(10_000, {"code": 0.5, "text": 0.5})],
                        interpolation="linear")  # fmt: skip
    assert s.get_weights(5000) == pytest.approx({"code": 0.35, "text": 0.65})
    assert s.get_weights(0) == pytest.approx({"code": 0.2, "text": 0.8})
    assert s.get_weights(10_000) == pytest.approx({"code": 0.5, "text": 0.5})
    assert s.get_weights(2500) == pytest.approx({"code": 0.275, "text": 0.725})


POINTS = [(100, {"a": 1.0, "b": 3.0, "c": 0.0}), (200, {"a": 1.0, "b": 1.0, "c": 2.0}),
          (500, {"a": 0.0, "b": 5.0, "c": 5.0})]  # fmt: skip


@pytest.mark.parametrize("kind", ["step", "linear", "cosine"])
def test_values_at_before_between_and_after_points(kind: str) -> None:
    s = WeightScheduler(POINTS, interpolation=kind)  # type: ignore[arg-type]
    assert s.source_names == ("a", "b", "c") and s.steps == (100, 200, 500)
    for step in [-10, 0, 99, 100, 101, 150, 199, 200, 201, 350, 499, 500, 501, 10**12]:
        got = s.get_weights(step)
        assert got == pytest.approx(reference(POINTS, kind, step), abs=1e-12), step
        assert sum(got.values()) == pytest.approx(1.0) and list(got) == ["a", "b", "c"]
    # at a point, every interpolation gives that point's (normalised) weights exactly
    assert s.get_weights(200) == {"a": 0.25, "b": 0.25, "c": 0.5}
    assert s.get_weights(0) == {"a": 0.25, "b": 0.75, "c": 0.0}  # before the first: the first
    assert s.get_weights(10**9) == {"a": 0.0, "b": 0.5, "c": 0.5}  # after the last: the last


def test_step_keeps_the_last_point_at_or_before() -> None:
    s = WeightScheduler([P(0, {"a": 1, "b": 0}), P(10, {"a": 0, "b": 1})])
    assert [s.get_weights(k)["a"] for k in (0, 9, 10, 11)] == [1.0, 1.0, 0.0, 0.0]


def test_cosine_eases_in_and_out() -> None:
    s = WeightScheduler([P(0, {"a": 1, "b": 0}), P(100, {"a": 0, "b": 1})], "cosine")
    assert s.get_weights(50)["b"] == pytest.approx(0.5)
    assert s.get_weights(25)["b"] == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))
    assert s.get_weights(10)["b"] < 0.1 * 0.5  # slower than linear near the ends
    linear = WeightScheduler([P(0, {"a": 1, "b": 0}), P(100, {"a": 0, "b": 1})], "linear")
    assert linear.get_weights(10)["b"] == pytest.approx(0.1)


def test_points_are_normalised_before_interpolating() -> None:
    """{a: 3, b: 1} means {a: .75, b: .25} whatever its scale, so the midpoint is the average."""
    s = WeightScheduler([(0, {"a": 1, "b": 1}), (10, {"a": 30, "b": 10})], "linear")
    assert s.get_weights(5) == pytest.approx({"a": 0.625, "b": 0.375})
    scaled = WeightScheduler([(0, {"a": 100, "b": 100}), (10, {"a": 3, "b": 1})], "linear")
    assert scaled.get_weights(5) == pytest.approx(s.get_weights(5))


def test_points_as_pairs_and_mappings_and_constant() -> None:
    a = WeightScheduler([(0, {"x": 1}), {"step": 5, "weights": {"x": 2}}])
    assert a.points == (P(0, {"x": 1.0}), P(5, {"x": 2.0}))
    c = WeightScheduler.constant({"x": 1, "y": 3})
    assert c.get_weights(0) == c.get_weights(10**6) == {"x": 0.25, "y": 0.75}


def test_pure_picklable_and_comparable() -> None:
    s = WeightScheduler(POINTS, "cosine")
    again = pickle.loads(pickle.dumps(s))
    assert again == s and again != WeightScheduler(POINTS, "linear")
    assert [again.get_weights(k) for k in range(0, 600, 7)] == [s.get_weights(k)
                                                                 for k in range(0, 600, 7)]
    before = s.get_weights(300)
    s.get_weights(10)  # no state: asking for another step changes nothing
    assert s.get_weights(300) == before
    assert "interpolation='cosine'" in repr(s)


# --------------------------------------------------------------------------------------------
# change points and timelines
# --------------------------------------------------------------------------------------------


def test_step_timeline_is_exact() -> None:
    s = WeightScheduler([(0, {"a": 1, "b": 1}), (100, {"a": 1, "b": 1}), (200, {"a": 3, "b": 1}),
                         (300, {"a": 0, "b": 1})])  # fmt: skip
    assert s.change_points() == [200, 300]  # the point at 100 changes nothing
    assert s.timeline() == [(0, {"a": 0.5, "b": 0.5}), (200, {"a": 0.75, "b": 0.25}),
                            (300, {"a": 0.0, "b": 1.0})]  # fmt: skip
    assert s.timeline(every=7) == s.timeline()  # every does not matter for steps
    assert s.timeline(250, 1000) == [(250, {"a": 0.75, "b": 0.25}), (300, {"a": 0.0, "b": 1.0})]
    assert s.timeline(0, 200) == [(0, {"a": 0.5, "b": 0.5})]  # end is exclusive
    assert s.change_points(200, 1000) == [300]


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_smooth_timeline_on_an_absolute_grid(kind: str) -> None:
    s = WeightScheduler([(0, {"a": 1, "b": 1}), (100, {"a": 1, "b": 1}), (200, {"a": 3, "b": 1})],
                        kind)  # type: ignore[arg-type]  # fmt: skip
    assert s.change_points() == [100, 200]  # the weights start moving at 100, stop at 200
    tl = s.timeline(0, None, every=30)
    assert [k for k, _ in tl] == [0, 120, 150, 180, 200]  # 100 and the grid at 30..90 merged
    for k, w in tl:
        assert w == s.get_weights(k)
    resumed = s.timeline(130, None, every=30)  # a run resumed at 130: same grid from there on
    assert resumed[0] == (130, s.get_weights(130)) and resumed[1:] == tl[2:]
    with pytest.raises(ValueError, match=r"weights move \(" + kind + r"\) between steps 100 and "
                                         r"200; give every="):  # fmt: skip
        s.timeline()
    assert s.timeline(0, 100) == [(0, {"a": 0.5, "b": 0.5})]  # no moving stretch: every unneeded


def test_timeline_after_the_last_point_is_one_entry() -> None:
    s = WeightScheduler([(0, {"a": 1, "b": 0}), (10, {"a": 0, "b": 1})], "linear")
    assert s.timeline(50, None) == [(50, {"a": 0.0, "b": 1.0})]
    assert s.timeline(50, 10**9, every=1) == [(50, {"a": 0.0, "b": 1.0})]


def test_timeline_arguments_are_checked() -> None:
    s = WeightScheduler([(0, {"a": 1})])
    with pytest.raises(ValueError, match=r"end_step \(5\) must be after start_step \(5\)"):
        s.timeline(5, 5)
    with pytest.raises(ValueError, match="every must be an int >= 1, got 0"):
        s.timeline(0, 10, every=0)
    with pytest.raises(TypeError, match=r"step must be an int, got 1\.5"):
        s.get_weights(1.5)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(st.integers(0, 400), min_size=1, max_size=5, unique=True),
    kind=st.sampled_from(["step", "linear", "cosine"]),
    every=st.integers(1, 50),
    data=st.data(),
)
def test_timeline_follows_get_weights(steps: list[int], kind: str, every: int,
                                      data: st.DataObject) -> None:  # fmt: skip
    weights = st.lists(st.integers(0, 4), min_size=3, max_size=3).filter(any)
    points = [(k, dict(zip("abc", map(float, data.draw(weights)), strict=True)))
              for k in sorted(steps)]  # fmt: skip
    s = WeightScheduler(points, kind)  # type: ignore[arg-type]
    start = data.draw(st.integers(0, 450))
    end = start + data.draw(st.integers(1, 300))
    tl = s.timeline(start, end, every=every)
    assert tl[0][0] == start and all(a[0] < b[0] < end for a, b in itertools.pairwise(tl))
    assert all(a[1] != b[1] for a, b in itertools.pairwise(tl))  # merged when equal
    for k in range(start, end):
        held = next(w for s_, w in reversed(tl) if s_ <= k)  # the entry in force at step k
        exact = s.get_weights(k)
        if kind == "step" or k % every == 0 or k in s.steps or held == exact:
            assert held == pytest.approx(exact, abs=1e-12), k
        else:  # between grid steps the timeline holds the value of the last grid/knot step
            last = max([start] + [g for g in range(start, k + 1) if g % every == 0 or g in s.steps])
            assert held == pytest.approx(s.get_weights(last), abs=1e-12), k
    for step in (start, end - 1, 0, 10**6):
        got = s.get_weights(step)
        assert got == pytest.approx(reference(points, kind, step), abs=1e-12)
        assert all(v >= 0 for v in got.values()) and sum(got.values()) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "schedule is empty"),
        ([P(0, {"a": 1})], {"interpolation": "cubic"}, ValueError,
         r"interpolation must be one of \['step', 'linear', 'cosine'\], got 'cubic'"),
        ([P(10, {"a": 1}), P(5, {"a": 1})], {}, ValueError,
         r"schedule point 1 \(step 5\) comes before point 0 \(step 10\)"),
        ([P(0, {"a": 1}), P(7, {"a": 1}), P(7, {"a": 2})], {}, ValueError,
         r"schedule point 2 \(step 7\) repeats point 1 \(step 7\)"),
        ([P(0, {"a": 1, "b": 1}), P(5, {"a": 1, "c": 1})], {}, ValueError,
         r"point 1 \(step 5\) names other sources than point 0: missing \['b'\], extra \['c'\]"),
        ([(0, {"a": -1})], {}, ValueError,
         r"schedule point 0: WeightSchedulePoint\(step=0\): weight of 'a' is -1"),
        ([(3, {"a": float("nan")})], {}, ValueError, r"step=3\): weight of 'a' is nan"),
        ([(3, {"a": float("inf")})], {}, ValueError, r"weight of 'a' is inf"),
        ([(3, {"a": 0, "b": 0.0})], {}, ValueError, r"step=3\): all weights are zero"),
        ([(3, {})], {}, ValueError, "weights must be a non-empty mapping"),
        ([(-1, {"a": 1})], {}, ValueError, r"WeightSchedulePoint\(step=-1\): step must be >= 0"),
        ([(1.5, {"a": 1})], {}, TypeError, "step must be an int, got 1.5"),
        ([(1, {"a": "x"})], {}, TypeError, r"weight of 'a' must be a number, got 'x'"),
        ([(1, {"a": True})], {}, TypeError, r"weight of 'a' must be a number, got True"),
        ([(1, {"": 1})], {}, ValueError, "source names must be non-empty strings"),
        ([{"step": 1, "w": {"a": 1}}], {}, ValueError, r"expected keys 'step' and 'weights'"),
        ([1], {}, TypeError, r"schedule point 0: expected WeightSchedulePoint, \(step, weights\)"),
        ({"a": 1}, {}, TypeError, "schedule must be a sequence of points, got dict"),
    ],
)  # fmt: skip
def test_bad_schedules_name_the_offending_item(
    schedule: Any, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        WeightScheduler(schedule, **kwargs)


def test_point_weights_are_copied_and_floats() -> None:
    w = {"a": 1, "b": np.float32(2.0)}
    p = P(np.int64(4), w)  # type: ignore[arg-type]
    w["a"] = 100
    assert p.step == 4 and type(p.step) is int and p.weights == {"a": 1.0, "b": 2.0}
    with pytest.raises(AttributeError):
        p.step = 5  # type: ignore[misc]


def test_entry_step_is_the_entry_in_force() -> None:
    # A timeline started there (a resumed or chunked extension) gives the weights of one started
    # at 0 at every later step.
    sched = WeightScheduler([(0, {"a": 1.0, "b": 0.0}), (10, {"a": 0.0, "b": 1.0}),
                             (20, {"a": 0.0, "b": 1.0})], "linear")  # fmt: skip

    def at(entries: list[tuple[int, dict[str, float]]], step: int) -> dict[str, float]:
        return [w for s, w in entries if s <= step][-1]

    full = sched.timeline(0, 30, every=4)
    for step in range(30):
        start = sched.entry_step(step, every=4)
        assert start <= step and at(full, start) == at(full, step)
        tail = sched.timeline(start, 30, every=4)
        assert all(at(tail, s) == at(full, s) for s in range(start, 30))
