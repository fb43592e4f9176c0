"""``DataInfCalculator`` (python/mixtape/influence/datainf.py): inputs, baselines, the ghost path
for linear layers, errors, and agreement with exact damped block-Fisher influence."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap

import mixtape
from mixtape import ops
from mixtape.influence import DataInfCalculator, GhostLinear


def formula(grads: list[np.ndarray], probes: list[np.ndarray], damping: float = 0.1) -> np.ndarray:
    """DataInf's four steps per layer in float64, summed: [L, n]."""
    out = []
    for g, v in zip(grads, probes, strict=True):
        g, v = g.astype(np.float64), v.astype(np.float64)
        n, d = g.shape
        a, q = g @ v, (g * g).sum(1)
        lam = damping * q.sum() / (n * d)
        u = g.T @ (a / (lam + q)) / n
        out.append((g @ u - a) / lam)
    return np.stack(out)


def random_layers(seed: int, n: int, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:  # noqa: E501
    g = torch.Generator().manual_seed(seed)
    train = {k: torch.randn((n, *s), generator=g) for k, s in shapes.items()}
    probe = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    return train, probe


# --- inputs ------------------------------------------------------------------------------------


def test_named_layers_any_shape_and_probe_averaging() -> None:
    train, _ = random_layers(0, 30, {"attn.w": (3, 4), "mlp.w": (7,)})
    g = torch.Generator().manual_seed(1)
    probe_sets = {
        "attn.w": torch.randn(5, 3, 4, generator=g),
        "mlp.w": torch.randn(2, 7, generator=g),
    }
    calc = DataInfCalculator()
    total, per = calc.compute_influence(train, probe_sets, per_layer=True)
    assert total.dtype == torch.float32 and total.shape == (30,) and per.shape == (2, 30)
    means64 = [p.double().mean(0).reshape(-1).numpy() for p in probe_sets.values()]
    want = formula([t.reshape(30, -1).numpy() for t in train.values()], means64)
    np.testing.assert_allclose(per.numpy(), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    torch.testing.assert_close(total, per.sum(0), rtol=1e-6, atol=1e-5)
    means = {k: p.mean(0) for k, p in probe_sets.items()}
    torch.testing.assert_close(calc.compute_influence(train, means), total, rtol=1e-5, atol=1e-5)


def test_list_input_and_dtypes() -> None:
    train, probe = random_layers(2, 20, {"a": (6,), "b": (9,)})
    calc = DataInfCalculator()
    want = calc.compute_influence(train, probe)
    got = calc.compute_influence(list(train.values()), list(probe.values()))
    torch.testing.assert_close(got, want)
    # float64 / float16 gradients are converted to float32, numpy probes accepted.
    got64 = calc.compute_influence({k: v.double() for k, v in train.items()},
                                   {k: v.numpy() for k, v in probe.items()})  # fmt: skip
    torch.testing.assert_close(got64, want)
    bf = calc.compute_influence({k: v.bfloat16() for k, v in train.items()}, probe)
    ref = calc.compute_influence({k: v.bfloat16().float() for k, v in train.items()}, probe)
    torch.testing.assert_close(bf, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", mixtape.influence.METHODS)
def test_sign_aligned_sample_is_helpful(method: str) -> None:
    """A sample whose gradient points along the probe gradient lowers the probe loss when
    up-weighted: negative influence under every method; the opposite sample, positive."""
    train, probe = random_layers(3, 40, {"w": (16,)})
    g = train["w"].clone()
    g[0] = probe["w"] * 2.0
    g[1] = -probe["w"] * 2.0
    infl = DataInfCalculator(method=method).compute_influence({"w": g}, probe)
    assert infl[0] < 0 < infl[1]


def test_grad_dot_and_cosine_baselines() -> None:
    train, probe = random_layers(4, 25, {"a": (5,), "b": (11,)})
    g = [t.double().numpy() for t in train.values()]
    v = [p.double().numpy() for p in probe.values()]
    dot = DataInfCalculator(method="grad_dot")
    total, per = dot.compute_influence(train, probe, per_layer=True)
    want = np.stack([-(x @ y) for x, y in zip(g, v, strict=True)])
    np.testing.assert_allclose(per.numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(total.numpy(), want.sum(0), rtol=1e-5, atol=1e-5)
    total, per = DataInfCalculator(method="cosine").compute_influence(train, probe, per_layer=True)
    cos = [-(x @ y) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y))
           for x, y in zip(g, v, strict=True)]  # fmt: skip
    np.testing.assert_allclose(per.numpy(), np.stack(cos), rtol=1e-5, atol=1e-6)
    gc, vc = np.concatenate(g, 1), np.concatenate(v)
    whole = -(gc @ vc) / (np.linalg.norm(gc, axis=1) * np.linalg.norm(vc))
    np.testing.assert_allclose(total.numpy(), whole, rtol=1e-5, atol=1e-6)
    # A zero gradient has cosine 0, not NaN.
    train["a"][3] = 0
    train["b"][3] = 0
    assert DataInfCalculator(method="cosine").compute_influence(train, probe)[3] == 0


def test_fixed_lambda_and_projection_reach_the_kernel() -> None:
    train, probe = random_layers(5, 30, {"x": (40,), "y": (8,)})
    calc = DataInfCalculator(lambda_={"x": 0.7})
    want = ops.datainf(list(train.values()), list(probe.values()), names=["x", "y"],
                       lambdas=[0.7, None]).influence  # fmt: skip
    np.testing.assert_allclose(calc.compute_influence(train, probe).numpy(), want, rtol=1e-6)
    calc = DataInfCalculator(projection_dim=16, seed=3)
    want = ops.datainf(list(train.values()), list(probe.values()), names=["x", "y"],
                       projection_dim=16, seed=3).influence  # fmt: skip
    np.testing.assert_allclose(calc.compute_influence(train, probe).numpy(), want, rtol=1e-6)
    # The projection follows the layer's name, not its position.
    swapped = DataInfCalculator(projection_dim=16, seed=3).compute_influence(
        {"y": train["y"], "x": train["x"]}, probe
    )
    np.testing.assert_allclose(swapped.numpy(), want, rtol=1e-5, atol=1e-6)


def test_scaling_gradients_and_probe_together_changes_nothing() -> None:
    train, probe = random_layers(6, 50, {"a": (12,), "b": (300,)})
    calc = DataInfCalculator()
    base = calc.compute_influence(train, probe)
    scaled = calc.compute_influence({k: v * 1e-4 for k, v in train.items()},
                                    {k: v * 1e-4 for k, v in probe.items()})  # fmt: skip
    torch.testing.assert_close(scaled, base, rtol=1e-4, atol=1e-5 * float(base.abs().max()))


# --- ghost path --------------------------------------------------------------------------------


def linear_case(bias: bool, seed: int = 0, n: int = 12, m: int = 5, t: int = 7) -> dict[str, Any]:
    """Per-sample gradients of an nn.Linear under a masked squared loss (torch.func), the ghost
    inputs/output gradients of the same samples, and the probe-mean gradient."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(6, 4, bias=bias)
    x, xp = torch.randn(n, t, 6), torch.randn(m, t, 6)
    y, yp = torch.randn(n, t, 4), torch.randn(m, t, 4)
    mask = (torch.rand(n, t) > 0.3).float()  # padded positions: no loss, zero output gradient
    params = {k: v.detach() for k, v in lin.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor,
             mi: torch.Tensor) -> torch.Tensor:  # fmt: skip
        return 0.5 * (((functional_call(lin, p, (xi,)) - yi) ** 2).sum(-1) * mi).sum()

    def loss_all(out: torch.Tensor, yi: torch.Tensor, mi: torch.Tensor) -> torch.Tensor:
        return 0.5 * (((out - yi) ** 2).sum(-1) * mi).sum()

    per = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, x, y, mask)
    probe = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, xp, yp, torch.ones(m, t))
    flat = per["weight"].reshape(n, -1)
    probe_w = probe["weight"].mean(0)
    out = lin(x)
    dout = torch.autograd.grad(loss_all(out, y, mask), out)[0]  # d loss_i / d out_i, all i
    case = {"x": x, "dout": dout, "probe_w": probe_w, "flat": flat}
    if bias:
        case["flat"] = torch.cat([flat, per["bias"]], 1)
        case["probe_b"] = probe["bias"].mean(0)
    return case


@pytest.mark.parametrize("method", mixtape.influence.METHODS)
@pytest.mark.parametrize("bias", [False, True])
def test_ghost_linear_matches_materialised_gradients(bias: bool, method: str) -> None:
    c = linear_case(bias)
    calc = DataInfCalculator(method=method)
    if bias:
        probe_flat = torch.cat([c["probe_w"].reshape(-1), c["probe_b"]])
        ghost_probe: Any = (c["probe_w"], c["probe_b"])
    else:
        probe_flat = c["probe_w"].reshape(-1)
        ghost_probe = c["probe_w"]
    want = calc.compute_influence({"lin": c["flat"]}, {"lin": probe_flat})
    ghost = GhostLinear(c["x"], c["dout"], bias=bias)
    got = calc.compute_influence({"lin": ghost}, {"lin": ghost_probe})
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    # The flat probe (weight then bias) is accepted too.
    got_flat = calc.compute_influence({"lin": ghost}, {"lin": probe_flat})
    torch.testing.assert_close(got_flat, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_ghost_and_kernel_layers_mix_and_single_token_inputs() -> None:
    a, b = linear_case(True, seed=1), linear_case(False, seed=2)
    calc = DataInfCalculator()
    want_total, want = calc.compute_influence(
        {"a": a["flat"], "b": b["flat"]},
        {"a": torch.cat([a["probe_w"].reshape(-1), a["probe_b"]]), "b": b["probe_w"].reshape(-1)},
        per_layer=True,
    )
    total, per = calc.compute_influence(
        {"a": GhostLinear(a["x"], a["dout"], bias=True), "b": b["flat"]},
        {"a": (a["probe_w"], a["probe_b"]), "b": b["probe_w"].reshape(-1)},
        per_layer=True,
    )
    torch.testing.assert_close(per, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    torch.testing.assert_close(total, want_total, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    # [n, d_in] / [n, d_out] (one position per sample): g_i = outer(dout_i, x_i).
    x, d = a["x"][:, 0], a["dout"][:, 0]
    flat = torch.einsum("no,ni->noi", d, x).reshape(len(x), -1)
    one = calc.compute_influence({"l": GhostLinear(x, d)}, {"l": a["probe_w"]})
    want_one = calc.compute_influence({"l": flat}, {"l": a["probe_w"].reshape(-1)})
    torch.testing.assert_close(one, want_one, rtol=1e-4, atol=1e-5)


def test_single_sample() -> None:
    """n == 1: score = -a / (lambda + q) exactly, in the kernel and on the ghost path."""
    c = linear_case(False, n=1)
    g, v = c["flat"].double(), c["probe_w"].reshape(-1).double()
    a, q = float(g[0] @ v), float(g[0] @ g[0])
    want = -a / (0.1 * q / g.shape[1] + q)
    calc = DataInfCalculator()
    got = float(calc.compute_influence({"l": c["flat"]}, {"l": v.float()}))
    assert got == pytest.approx(want, rel=1e-5)
    ghost = calc.compute_influence({"l": GhostLinear(c["x"], c["dout"])}, {"l": c["probe_w"]})
    assert float(ghost) == pytest.approx(want, rel=1e-5)


# --- errors ------------------------------------------------------------------------------------


def test_errors_are_clear() -> None:
    train, probe = random_layers(7, 10, {"a": (4,), "b": (3, 2)})
    calc = DataInfCalculator()
    with pytest.raises(ValueError, match=r"from probe_grads \['b'\], not in train_grads \['c'\]"):
        calc.compute_influence(train, {"a": probe["a"], "c": probe["b"]})
    with pytest.raises(ValueError, match=r"'b': probe gradients have shape \(6,\), expected \(3"):
        calc.compute_influence(train, {"a": probe["a"], "b": probe["b"].reshape(6)})
    with pytest.raises(ValueError, match="empty probe set: layer 'a' has 0 probe gradients"):
        calc.compute_influence(train, {"a": torch.zeros(0, 4), "b": probe["b"]})
    with pytest.raises(ValueError, match="empty probe set: probe_grads has no layers"):
        calc.compute_influence(train, {})
    with pytest.raises(ValueError, match="no training samples"):
        calc.compute_influence({"a": torch.zeros(0, 4)}, {"a": probe["a"]})
    with pytest.raises(ValueError, match="layer 'b' has 9 samples, layer 'a' has 10"):
        calc.compute_influence({"a": train["a"], "b": train["b"][:9]}, probe)
    bad = {k: v.clone() for k, v in train.items()}
    bad["b"][6, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="layer 'b': the gradient of sample 6 is not finite"):
        calc.compute_influence(bad, probe)
    with pytest.raises(TypeError, match="probe_grads must be one too"):
        calc.compute_influence(train, list(probe.values()))
    with pytest.raises(TypeError, match="must be floating point"):
        calc.compute_influence({"a": train["a"].long()}, {"a": probe["a"]})
    with pytest.raises(ValueError, match=r"lambda_ names layers not given: \['zz'\]"):
        DataInfCalculator(lambda_={"zz": 1.0}).compute_influence(train, probe)
    for kwargs, match in [
        ({"damping": 0.0}, "damping must be a finite float > 0"),
        ({"damping": -0.1}, "damping must be a finite float > 0"),
        ({"projection_dim": 0}, "projection_dim must be None or an int >= 1"),
        ({"method": "tracin"}, "method must be one of"),
        ({"lambda_": -1.0}, "lambda_ values must be finite floats > 0"),
        ({"seed": -3}, "seed must be an int"),
    ]:
        with pytest.raises(ValueError, match=match):
            DataInfCalculator(**kwargs)


def test_ghost_errors() -> None:
    c = linear_case(False)
    ghost = GhostLinear(c["x"], c["dout"])
    with pytest.raises(ValueError, match="projection_dim applies to materialised gradients only"):
        DataInfCalculator(projection_dim=8).compute_influence({"l": ghost}, {"l": c["probe_w"]})
    with pytest.raises(ValueError, match="must be"):
        DataInfCalculator().compute_influence({"l": GhostLinear(c["x"], c["dout"][:, :3])},
                                              {"l": c["probe_w"]})  # fmt: skip
    with pytest.raises(ValueError, match="needs GhostLinear"):
        DataInfCalculator().compute_influence({"l": ghost}, {"l": (c["probe_w"], c["probe_w"][0])})
    bad = c["dout"].clone()
    bad[4, 2, 1] = float("inf")
    with pytest.raises(ValueError, match="layer 'l': the gradient of sample 4 is not finite"):
        DataInfCalculator().compute_influence({"l": GhostLinear(c["x"], bad)}, {"l": c["probe_w"]})


# --- agreement with exact influence ------------------------------------------------------------


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = score[positive], score[~positive]
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logistic_regression_agrees_with_exact_block_fisher_and_flags_noise(seed: int) -> None:
    """3-class logistic regression on 400 samples with 20% flipped labels: DataInf against the
    exact damped block-Fisher influence -v_l^T (F_l + lambda_l I)^-1 g_l (same lambda_l), with the
    weight matrix's per-sample gradients cut into blocks of d_l = 4."""
    g = torch.Generator().manual_seed(seed)
    n, m, p, classes = 400, 200, 8, 3
    centers = torch.randn(classes, p - 1, generator=g) * 1.5

    def data(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, classes, (k,), generator=g)
        return centers[y] + torch.randn(k, p - 1, generator=g), y

    x, y = data(n)
    xp, yp = data(m)
    mu, sd = x.mean(0), x.std(0)
    x = torch.cat([(x - mu) / sd, torch.ones(n, 1)], 1)  # standardised features + intercept
    xp = torch.cat([(xp - mu) / sd, torch.ones(m, 1)], 1)
    flipped = torch.rand(n, generator=g) < 0.2
    noisy = y.clone()
    shift = torch.randint(1, classes, (int(flipped.sum()),), generator=g)
    noisy[flipped] = (y[flipped] + shift) % classes  # a different, wrong class
    w = torch.zeros(classes, p, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.T, noisy) + 1e-2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    w = w.detach()

    def per_sample(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        r = torch.softmax(xs @ w.T, 1)
        r[torch.arange(len(ys)), ys] -= 1
        return (r[:, :, None] * xs[:, None, :]).reshape(len(ys), -1)  # d loss / d W, flattened

    grads, probe = per_sample(x, noisy), per_sample(xp, yp).mean(0)
    blocks = [(s, s + 4) for s in range(0, classes * p, 4)]
    ours = DataInfCalculator().compute_influence(
        {f"w[{s}:{e}]": grads[:, s:e] for s, e in blocks},
        {f"w[{s}:{e}]": probe[s:e] for s, e in blocks},
    ).numpy()
    exact = np.zeros(n)
    for s, e in blocks:
        gb, vb = grads[:, s:e].double().numpy(), probe[s:e].double().numpy()
        lam = 0.1 * (gb * gb).sum() / (n * (e - s))
        exact -= gb @ np.linalg.solve(gb.T @ gb / n + lam * np.eye(e - s), vb)
    assert spearman(ours, exact) >= 0.9
    assert roc_auc(ours, flipped.numpy()) >= 0.8  # flipped labels are the harmful ones


# --- benchmark cases ---------------------------------------------------------------------------


def test_bench_cases_register() -> None:
    from mixtape import bench

    assert {"datainf", "datainf-ghost"} <= set(bench.load_cases())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["datainf", "datainf-ghost"])
def test_bench_quick_run(name: str) -> None:
    from mixtape import bench

    measurements = bench.load_cases()[name](True)
    assert any(m.ours for m in measurements) and any(not m.ours for m in measurements)
    assert all(m.seconds > 0 for m in measurements if not m.skipped)
