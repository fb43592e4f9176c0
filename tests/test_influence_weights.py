"""``MixtureWeightCalculator`` (python/mixtape/influence/weights.py): exact steps, smoothing, the
floor, both weight forms, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mixtape import MixtureWeightCalculator


def test_exact_values_of_one_update() -> None:
    calc = MixtureWeightCalculator({"web": 0.5, "code": 0.5}, learning_rate=1.0, smoothing=0.1)
    # web's samples are helpful (influence -1: score +1), code's harmful (score -2).
    up = calc.get_weight_update({"web": 0.5, "code": 0.5}, [-1.0, -1.0, 2.0, 2.0, 2.0],
                                ["web", "web", "code", "code", "code"])  # fmt: skip
    np.testing.assert_allclose(up.scores, [1.0, -2.0])
    np.testing.assert_array_equal(up.counts, [2, 3])
    # max_dev (default): deviations from the mean -0.5 are +-1.5, so the largest log-weight
    # change relative to the mean is the learning rate.
    assert up.scale == 1.5
    np.testing.assert_allclose(up.step, [1.0, -1.0])
    e = math.exp(1.0) / (math.exp(1.0) + math.exp(-1.0))
    want_web = 0.9 * e + 0.1 * 0.5
    assert isinstance(up.weights, dict)
    assert up.weights["web"] == pytest.approx(want_web, rel=1e-12)
    assert up.weights["code"] == pytest.approx(1 - want_web, rel=1e-12)
    old = MixtureWeightCalculator({"web": 0.5, "code": 0.5}, smoothing=0.1, normalize="max_abs")
    up = old.get_weight_update({"web": 0.5, "code": 0.5}, [-1.0, -1.0, 2.0, 2.0, 2.0],
                               ["web", "web", "code", "code", "code"])  # fmt: skip
    assert up.scale == 2.0  # max |score|
    np.testing.assert_allclose(up.step, [0.5, -1.0])
    e = math.exp(0.5) / (math.exp(0.5) + math.exp(-1.0))
    assert isinstance(up.weights, dict)
    assert up.weights["web"] == pytest.approx(0.9 * e + 0.1 * 0.5, rel=1e-12)


@pytest.mark.parametrize("normalize", ["max_dev", "std", "max_abs", "none"])
@pytest.mark.parametrize("seed", range(5))
def test_weights_follow_a_plain_reference(normalize: str, seed: int) -> None:
    """The update against the formula written out directly, on random scores and weights."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 7))
    prior = rng.dirichlet(np.ones(k))
    current = rng.dirichlet(np.ones(k))
    ids = np.concatenate([np.arange(k), rng.integers(0, k, 20)])
    infl = rng.normal(rng.normal(0, 5), 1.0, ids.size)
    eta, eps = float(rng.uniform(0.1, 3)), float(rng.uniform(0, 0.5))
    calc = MixtureWeightCalculator(prior, learning_rate=eta, smoothing=eps, normalize=normalize)
    up = calc.get_weight_update(current, infl, ids)
    score = np.array([-infl[ids == s].mean() for s in range(k)])
    scale = {"max_dev": np.abs(score - score.mean()).max(), "std": score.std(),
             "max_abs": np.abs(score).max(), "none": 1.0}[normalize]  # fmt: skip
    w = current * np.exp(eta * score / scale)
    w = (1 - eps) * w / w.sum() + eps * prior
    np.testing.assert_allclose(up.weights, w, rtol=1e-10)
    assert up.scale == pytest.approx(scale, rel=1e-12)


def test_max_dev_and_std_ignore_what_every_source_shares() -> None:
    """Adding the same amount to every source's score (all sources help the probe alike) leaves
    the max_dev / std step unchanged; max_abs shrinks it."""
    prior = [0.25, 0.25, 0.25, 0.25]
    scores = np.array([3.0, 1.0, -1.0, -2.0])
    ids = np.arange(4)
    for shared in (0.0, 10.0, 1000.0):
        for normalize in ("max_dev", "std"):
            calc = MixtureWeightCalculator(prior, smoothing=0.0, normalize=normalize)
            up = calc.get_weight_update(prior, -(scores + shared), ids)
            base = calc.get_weight_update(prior, -scores, ids)
            np.testing.assert_allclose(up.weights, base.weights, rtol=1e-9)
            if normalize == "max_dev":
                assert np.max(np.abs(up.step)) == pytest.approx(1.0)
    calc = MixtureWeightCalculator(prior, smoothing=0.0, normalize="max_abs")
    small = calc.get_weight_update(prior, -(scores + 1000.0), ids).weights
    assert isinstance(small, np.ndarray)
    assert small.max() - small.min() < 0.002  # the differences are divided by ~1003
    dev = MixtureWeightCalculator(prior, smoothing=0.0).get_weight_update(
        prior, -(scores + 1000.0), ids).weights  # fmt: skip
    assert isinstance(dev, np.ndarray)
    # deviations from the mean 0.25: 2.75 .. -2.25, scaled by 2.75
    assert dev[0] / dev[3] == pytest.approx(math.exp(5.0 / 2.75), rel=1e-9)


@pytest.mark.parametrize("normalize", ["max_dev", "std"])
def test_scores_equal_up_to_rounding_take_no_step(normalize: str) -> None:
    prior = np.array([0.5, 0.3, 0.2])
    calc = MixtureWeightCalculator(prior, smoothing=0.0, normalize=normalize)
    infl = np.array([0.1, 0.1, 0.1]) * (1 + np.array([0.0, 1e-9, -1e-9]))
    up = calc.get_weight_update(prior, infl, [0, 1, 2])
    assert up.scale == 0.0 and np.all(up.step == 0)
    np.testing.assert_allclose(up.weights, prior, rtol=1e-12)


def test_floor_is_respected_exactly_and_weights_sum_to_one() -> None:
    prior = np.array([0.25, 0.25, 0.25, 0.25])
    calc = MixtureWeightCalculator(prior, learning_rate=4.0, smoothing=0.0, floor=0.1)
    influence = np.array([-1.0, -0.8, 1.0, 0.9, 0.0, 0.0])  # scores 0.5, 0.4, -1, -0.9
    up = calc.get_weight_update(prior, influence, [0, 1, 2, 3, 0, 1])
    w = up.weights
    assert isinstance(w, np.ndarray)
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    assert w.min() >= 0.1 - 1e-12
    # Sources 2 and 3 are pushed below the floor and held at it; the rest share what remains
    # in the proportions of the step.
    np.testing.assert_allclose(w[2:], [0.1, 0.1])
    raw = np.exp(up.step) * prior
    np.testing.assert_allclose(w[:2], raw[:2] / raw[:2].sum() * 0.8)
    # A harder push: only source 0 stays above the floor.
    up = calc.get_weight_update(prior, [-1.0, 1.0, 1.0, 0.9, 0.0, 0.0], [0, 1, 2, 3, 0, 1])
    np.testing.assert_allclose(up.weights, [0.7, 0.1, 0.1, 0.1])


def test_the_floor_holds_the_output_while_the_carried_weights_sink_below_it() -> None:
    """A source scored worst again and again stays at the floor in the output, while the
    weights the next step starts from sink to floor * exp(-floor_depth): one good score then
    does not lift it above the floor, a few in a row do. floor_depth=0: the old behaviour."""
    prior = np.array([0.25, 0.25, 0.25, 0.25])
    calc = MixtureWeightCalculator(prior, learning_rate=1.0, smoothing=0.0, floor=0.1,
                                   floor_depth=3.0)  # fmt: skip
    bad = np.array([-1.0, -1.0, -1.0, 1.0])  # source 3 harmful
    good = -bad  # now source 3 the most helpful
    w, carried = prior, None
    for _ in range(10):
        up = calc.get_weight_update(w, bad, [0, 1, 2, 3], carried=carried)
        w, carried = up.weights, up.carried
        assert isinstance(w, np.ndarray) and carried is not None
        assert w[3] == pytest.approx(0.1) and carried.sum() == pytest.approx(1.0)
    assert carried[3] == pytest.approx(0.1 * math.exp(-3.0))
    up = calc.get_weight_update(w, good, [0, 1, 2, 3], carried=carried)
    assert up.weights[3] == pytest.approx(0.1)  # one good update: still at the floor
    for _ in range(4):
        up = calc.get_weight_update(up.weights, good, [0, 1, 2, 3], carried=up.carried)
    assert up.weights[3] > 0.2  # consistent evidence lifts it
    old = MixtureWeightCalculator(prior, learning_rate=1.0, smoothing=0.0, floor=0.1,
                                  floor_depth=0.0)  # fmt: skip
    once = old.get_weight_update(prior, bad, [0, 1, 2, 3])
    np.testing.assert_allclose(once.carried, once.weights)
    with pytest.raises(ValueError, match="floor_depth must be a finite float >= 0"):
        MixtureWeightCalculator(prior, floor_depth=-1.0)


def test_smoothing_and_learning_rate_limits() -> None:
    prior = {"a": 0.2, "b": 0.3, "c": 0.5}
    current = {"a": 0.6, "b": 0.3, "c": 0.1}
    infl, ids = [0.5, -0.2, 0.1], ["a", "b", "c"]
    only_prior = MixtureWeightCalculator(prior, smoothing=1.0).get_weight_update(current, infl, ids)
    assert only_prior.weights == pytest.approx(prior)
    still = MixtureWeightCalculator(prior, learning_rate=0.0, smoothing=0.0)
    assert still.get_weight_update(current, infl, ids).weights == pytest.approx(current)
    half = MixtureWeightCalculator(prior, learning_rate=0.0, smoothing=0.5)
    want = {k: 0.5 * current[k] + 0.5 * prior[k] for k in prior}
    assert half.get_weight_update(current, infl, ids).weights == pytest.approx(want)


def test_normalizations_and_zero_scores() -> None:
    prior = [0.5, 0.5]
    infl = torch.tensor([-3.0, 1.0])  # torch tensors accepted
    ids = torch.tensor([0, 1])
    calc = MixtureWeightCalculator(prior, smoothing=0.0, normalize="std")
    std = calc.get_weight_update(prior, infl, ids)
    assert std.scale == pytest.approx(2.0)
    np.testing.assert_allclose(std.step, [1.5, -0.5])
    raw = MixtureWeightCalculator(prior, learning_rate=0.1, smoothing=0.0, normalize="none")
    up = raw.get_weight_update(prior, infl, ids)
    assert up.scale == 1.0
    np.testing.assert_allclose(up.step, [0.3, -0.1])
    for normalize in ("max_dev", "std", "max_abs"):
        calc = MixtureWeightCalculator(prior, normalize=normalize)
        for same in (0.0, 0.7):
            flat = calc.get_weight_update(prior, [same, same], [0, 1])
            if normalize != "max_abs" or same == 0.0:  # max_abs: scale 0.7, equal steps
                assert flat.scale == 0.0 and np.all(flat.step == 0)
            np.testing.assert_allclose(flat.weights, prior)


def test_unnormalised_current_weights_and_integer_ids_with_names() -> None:
    calc = MixtureWeightCalculator({"x": 1.0, "y": 3.0}, learning_rate=0.0, smoothing=0.0)
    up = calc.get_weight_update({"y": 6.0, "x": 2.0}, [0.1, 0.2], np.array([1, 0]))
    assert up.weights == pytest.approx({"x": 0.25, "y": 0.75})
    assert list(up.weights) == ["x", "y"]  # the prior's order


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"learning_rate": -1.0}, "learning_rate must be a finite float >= 0"),
        ({"smoothing": 1.5}, r"smoothing must be in \[0, 1\]"),
        ({"floor": 0.5}, "floor must be >= 0 with floor \\* sources <= 1, got 0.5 for 3 sources"),
        ({"normalize": "l2"}, "normalize must be one of"),
    ],
)
def test_bad_settings(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MixtureWeightCalculator([0.2, 0.3, 0.5], **kwargs)  # type: ignore[arg-type]


def test_bad_updates_name_the_source() -> None:
    calc = MixtureWeightCalculator({"web": 0.5, "code": 0.3, "math": 0.2})
    w = {"web": 0.5, "code": 0.3, "math": 0.2}
    with pytest.raises(ValueError, match="source 'math' has no samples in this update"):
        calc.get_weight_update(w, [0.1, 0.2], ["web", "code"])
    with pytest.raises(ValueError, match=r"source_ids name unknown sources \['books'\]"):
        calc.get_weight_update(w, [0.1, 0.2, 0.3], ["web", "code", "books"])
    with pytest.raises(ValueError, match=r"source_ids\[2\] = 3 is not a source index in \[0, 3\)"):
        calc.get_weight_update(w, [0.1, 0.2, 0.3], [0, 1, 3])
    with pytest.raises(ValueError, match=r"influence\[1\] is nan \(sample of source 'code'\)"):
        calc.get_weight_update(w, [0.1, float("nan"), 0.3], [0, 1, 2])
    with pytest.raises(ValueError, match=r"source_ids must be \[3\] like influence"):
        calc.get_weight_update(w, [0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match=r"current_weights: weight of source 'code' is -0\.1"):
        calc.get_weight_update({"web": 0.5, "code": -0.1, "math": 0.2}, [0.1, 0.2, 0.3], [0, 1, 2])
    with pytest.raises(ValueError, match="current_weights names sources"):
        calc.get_weight_update({"web": 0.5, "code": 0.5}, [0.1, 0.2, 0.3], [0, 1, 2])
    with pytest.raises(TypeError, match="current_weights must be a mapping"):
        calc.get_weight_update([0.5, 0.3, 0.2], [0.1, 0.2, 0.3], [0, 1, 2])
    arr = MixtureWeightCalculator([0.5, 0.5])
    with pytest.raises(TypeError, match="source_ids are names but the sources are unnamed"):
        arr.get_weight_update([0.5, 0.5], [0.1, 0.2], ["a", "b"])
    with pytest.raises(ValueError, match="current_weights has 3 sources, the prior 2"):
        arr.get_weight_update([0.3, 0.3, 0.4], [0.1, 0.2], [0, 1])
    with pytest.raises(ValueError, match="prior: weights sum to 0"):
        MixtureWeightCalculator([0.0, 0.0])
