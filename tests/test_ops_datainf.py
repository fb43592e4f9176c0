"""The DataInf kernel (``mixtape.ops.datainf``) against float64 references, projections, bad input.

Tolerances: float32 input, rtol 1e-4 with an absolute floor of 1e-5 x max |reference| (scores
that cancel to ~0 have no relative precision). bfloat16 input is compared with the reference of
the same bf16 values (the kernel widens them exactly), so the same tolerance holds; against the
unrounded float32 gradients, bf16's 8-bit mantissa allows only ~1e-2 (checked separately).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
from conftest import DEVICES
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtape import ops

ISAS = [0, 1, 2]  # baseline, AVX2, AVX-512 (capped at what the CPU has)


# --- references --------------------------------------------------------------------------------


def dense_reference(
    grads: list[np.ndarray], probes: list[np.ndarray], damping: float = 0.1,
    lambdas: list[float | None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """influence_i = sum_l -v_l^T [(1/n) sum_j (g_j g_j^T + lambda_l I)^-1] g_i, the inverses
    formed explicitly in float64 (d <= 64). Returns (influence, per-layer scores)."""
    scores = []
    for li, (g, v) in enumerate(zip(grads, probes, strict=True)):
        g, v = g.astype(np.float64), v.astype(np.float64)
        n, d = g.shape
        lam = lambdas[li] if lambdas and lambdas[li] else damping * (g * g).sum() / (n * d)
        m = sum(np.linalg.inv(np.outer(gj, gj) + lam * np.eye(d)) for gj in g) / n
        scores.append(-(g @ (m @ v)))
    per_layer = np.stack(scores)
    return per_layer.sum(0), per_layer


def formula_reference(
    grads: list[np.ndarray], probes: list[np.ndarray], damping: float = 0.1,
    lambdas: list[float | None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """The four steps of the issue in float64: a, q; lambda; c, u, b; (b - a) / lambda.
    Returns (influence, per-layer scores, lambdas)."""
    scores, lams = [], []
    for li, (g, v) in enumerate(zip(grads, probes, strict=True)):
        g, v = g.astype(np.float64), v.astype(np.float64)
        n, d = g.shape
        a, q = g @ v, (g * g).sum(1)
        lam = lambdas[li] if lambdas and lambdas[li] else damping * q.sum() / (n * d)
        c = a / (lam + q)
        u = g.T @ c / n
        scores.append((g @ u - a) / lam)
        lams.append(lam)
    per_layer = np.stack(scores)
    return per_layer.sum(0), per_layer, np.array(lams)


def bf16(x: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) of x, rounded to nearest even as torch does."""
    return torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16)


def widen(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def layers(
    seed: int, n: int, dims: list[int], scale: float = 1.0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    grads = [(rng.standard_normal((n, d)) * scale).astype(np.float32) for d in dims]
    probes = [rng.standard_normal(d).astype(np.float32) for d in dims]
    return grads, probes


def assert_close(got: np.ndarray, want: np.ndarray, rtol: float = 1e-4) -> None:
    floor = 1e-5 * max(float(np.abs(want).max()), 1e-30)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=floor)


# --- against the references --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("dims", [[1], [5], [64], [3, 17, 64], [8, 8, 8, 8]], ids=str)
@pytest.mark.parametrize("n", [1, 2, 7, 60])
def test_matches_dense_inverse(n: int, dims: list[int], dtype: str) -> None:
    grads, probes = layers(n * 7 + len(dims), n, dims)
    given_grads: list[Any] = grads
    if dtype == "bfloat16":
        given_grads = [bf16(g) for g in grads]
        grads = [widen(g) for g in given_grads]
    want, want_layers = dense_reference(grads, probes)
    res = ops.datainf(given_grads, probes, per_layer=True)
    assert res.influence.dtype == np.float32 and res.influence.shape == (n,)
    assert res.per_layer.shape == (len(dims), n)
    assert_close(res.influence, want)
    assert_close(res.per_layer, want_layers)


@pytest.mark.parametrize("elementwise", [False, True])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_code_path_matches_the_formula(isa: int, elementwise: bool, dtype: str) -> None:
    # d and n cross the SIMD widths, the 4-row blocks and the 2048-term float blocks.
    grads, probes = layers(3, 301, [1, 15, 33, 2500, 4099])
    if dtype == "bfloat16":
        given: list[Any] = [bf16(g) for g in grads]
        grads = [widen(g) for g in given]
    else:
        given = grads
    want, want_layers, lams = formula_reference(grads, probes)
    res = ops.datainf(given, probes, per_layer=True, _cpu_isa=isa, _elementwise=elementwise)
    assert_close(res.influence, want)
    assert_close(res.per_layer, want_layers)
    np.testing.assert_allclose(res.lambdas, lams, rtol=1e-6)
    for li, g in enumerate(grads):
        g64 = g.astype(np.float64)
        np.testing.assert_allclose(res.a[li], g64 @ probes[li], rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(res.q[li], (g64 * g64).sum(1), rtol=1e-5)
        vv = float(np.square(probes[li], dtype=np.float64).sum())
        assert res.probe_sq[li] == pytest.approx(vv)


def test_bfloat16_against_the_float32_gradients() -> None:
    grads, probes = layers(5, 200, [32, 300])
    want, _ = dense_reference(grads, probes) if max(g.shape[1] for g in grads) <= 64 else (
        formula_reference(grads, probes)[0], None
    )  # fmt: skip
    got = ops.datainf([bf16(g) for g in grads], probes).influence
    # bf16 keeps 8 bits of mantissa: ~0.4% per entry; scores agree to ~1e-2 of their range.
    np.testing.assert_allclose(got, want, atol=2e-2 * np.abs(want).max())


def test_torch_tensors_float32_and_bfloat16_are_read_in_place() -> None:
    grads, probes = layers(11, 40, [6, 50])
    want = formula_reference(grads, probes)[0]
    tg = [torch.from_numpy(g) for g in grads]
    assert_close(ops.datainf(tg, [torch.from_numpy(v) for v in probes]).influence, want)
    tb = [t.bfloat16() for t in tg]
    want_bf = formula_reference([t.float().numpy() for t in tb], probes)[0]
    assert_close(ops.datainf(tb, probes).influence, want_bf)


def test_row_stride_views_need_no_copy() -> None:
    """Layers as column slices of one [n, D] buffer (per-sample gradients of a whole model)."""
    rng = np.random.default_rng(2)
    buf = rng.standard_normal((50, 100)).astype(np.float32)
    cuts = [(0, 10), (10, 47), (47, 100)]
    views = [buf[:, a:b] for a, b in cuts]
    probes = [rng.standard_normal(b - a).astype(np.float32) for a, b in cuts]
    want = formula_reference([np.ascontiguousarray(v) for v in views], probes)[0]
    assert_close(ops.datainf(views, probes).influence, want)
    # Non-contiguous rows (a transposed view) are copied, with the same result.
    cols = np.asfortranarray(buf[:, :10])
    want = formula_reference([buf[:, :10]], probes[:1])[0]
    assert_close(ops.datainf([cols], probes[:1]).influence, want)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    dims=st.lists(st.integers(1, 90), min_size=1, max_size=4),
    bits=st.booleans(),
    isa=st.sampled_from(ISAS),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes(n: int, dims: list[int], bits: bool, isa: int, seed: int) -> None:
    grads, probes = layers(seed, n, dims)
    given_grads: list[Any] = [bf16(g) for g in grads] if bits else grads
    if bits:
        grads = [widen(g) for g in given_grads]
    want, want_layers, _ = formula_reference(grads, probes)
    res = ops.datainf(given_grads, probes, per_layer=True, _cpu_isa=isa)
    assert_close(res.influence, want)
    assert_close(res.per_layer, want_layers)


def test_many_samples_keep_their_accuracy() -> None:
    """Sums over n are carried in double every 2048 rows: no drift with n."""
    grads, probes = layers(8, 50_000, [3, 20])
    want = formula_reference(grads, probes)[0]
    assert_close(ops.datainf(grads, probes).influence, want)


def test_fixed_lambda_per_layer_and_for_all() -> None:
    grads, probes = layers(4, 30, [4, 9, 16])
    fixed: list[float | None] = [0.5, None, 2.0]
    want, _ = dense_reference(grads, probes, lambdas=fixed)
    res = ops.datainf(grads, probes, lambdas=fixed)
    assert_close(res.influence, want)
    assert res.lambdas[0] == 0.5 and res.lambdas[2] == 2.0
    sum_q = float((grads[1].astype(np.float64) ** 2).sum())
    assert res.lambdas[1] == pytest.approx(0.1 * sum_q / (30 * 9))
    assert_close(ops.datainf(grads, probes, lambdas=0.25).influence,
                 dense_reference(grads, probes, lambdas=[0.25] * 3)[0])  # fmt: skip


@pytest.mark.parametrize("damping", [0.01, 0.1, 1.0])
def test_scaling_g_and_v_together_leaves_scores_unchanged(damping: float) -> None:
    grads, probes = layers(6, 80, [7, 130])
    base = ops.datainf(grads, probes, damping=damping, per_layer=True)
    for s in (1e-3, 37.0):
        scaled = ops.datainf([g * s for g in grads], [v * s for v in probes], damping=damping,
                             per_layer=True)  # fmt: skip
        assert_close(scaled.influence, base.influence, rtol=1e-5)
        assert_close(scaled.per_layer, base.per_layer, rtol=1e-5)


def test_damping_scales_the_rule() -> None:
    grads, probes = layers(7, 25, [12])
    for damping in (0.01, 0.5):
        want, _ = dense_reference(grads, probes, damping=damping)
        assert_close(ops.datainf(grads, probes, damping=damping).influence, want)


def test_all_zero_layer_has_no_influence() -> None:
    grads, probes = layers(9, 20, [5, 6])
    grads[0][:] = 0
    res = ops.datainf(grads, probes, per_layer=True)
    assert res.lambdas[0] == 0 and np.all(res.per_layer[0] == 0)
    assert_close(res.influence, formula_reference(grads[1:], probes[1:])[0])


def test_stats_only_gives_a_and_q() -> None:
    grads, probes = layers(10, 33, [3, 40])
    res = ops.datainf(grads, probes, stats_only=True)
    assert res.influence is None and res.lambdas is None and res.per_layer is None
    for li, g in enumerate(grads):
        g64 = g.astype(np.float64)
        np.testing.assert_allclose(res.a[li], g64 @ probes[li], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(res.q[li], (g64**2).sum(1), rtol=1e-5)


def test_results_do_not_depend_on_the_thread_count() -> None:
    """Rows and columns are split across threads, never a sum: bitwise identical results."""
    code = (
        "import numpy as np; from mixtape import ops\n"
        "rng = np.random.default_rng(0)\n"
        "g = [rng.standard_normal((3000, d)).astype(np.float32) for d in (70, 900)]\n"
        "v = [rng.standard_normal(d).astype(np.float32) for d in (70, 900)]\n"
        "import sys; out = sys.stdout.buffer\n"
        "out.write(ops.datainf(g, v, projection_dim=64).influence.tobytes())\n"
        "out.write(ops.datainf(g, v).influence.tobytes())\n"
    )
    outs = []
    for threads in ("1", "2", "3"):
        env = {**os.environ, "MIXTAPE_NUM_THREADS": threads}
        outs.append(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                   check=True).stdout)  # fmt: skip
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) == 2 * 3000 * 4


# --- projection --------------------------------------------------------------------------------


def test_projection_matrix_is_seeded_signs() -> None:
    p = ops.projection_matrix("mlp.0", 300, 64, seed=3)
    assert p.shape == (64, 300) and p.dtype == np.float32
    assert set(np.unique(p).tolist()) == {-1 / 8, 1 / 8}
    assert np.array_equal(p, ops.projection_matrix("mlp.0", 300, 64, seed=3))
    assert not np.array_equal(p, ops.projection_matrix("mlp.0", 300, 64, seed=4))
    assert not np.array_equal(p, ops.projection_matrix("mlp.1", 300, 64, seed=3))
    # Entry (r, j) does not depend on d: a wider layer's matrix extends it.
    assert np.array_equal(p, ops.projection_matrix("mlp.0", 500, 64, seed=3)[:, :300])
    # Fair, independent-looking signs: E[P^T P] = I.
    big = ops.projection_matrix("x", 256, 4096)
    gram = big.T.astype(np.float64) @ big
    assert np.abs(np.diag(gram) - 1).max() < 1e-6
    assert np.abs(gram - np.eye(256)).max() < 0.1
    assert abs(float(big.mean())) < 2e-3


def test_projection_matrix_column_tiles_agree() -> None:
    from mixtape import _C

    full = ops.projection_matrix(12345, 1000, 40, seed=9)
    for c0, c in ((0, 1), (63, 2), (64, 130), (999, 1)):
        np.testing.assert_array_equal(_C.projection_matrix(9, 12345, 40, 1000, c0, c),
                                      full[:, c0 : c0 + c])  # fmt: skip


@pytest.mark.parametrize("elementwise", [False, True])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k", [1, 5, 32, 70])
def test_projection_matches_the_explicit_matrix(k: int, isa: int, elementwise: bool) -> None:
    dims = [3, 64, 129] if elementwise else [3, 64, 129, 700]
    n = 37
    grads, probes = layers(k, n, dims)
    names = [f"layer.{i}" for i in range(len(dims))]
    given: list[Any] = [bf16(g) for g in grads] if isa == 1 else grads  # bf16 through one ISA
    if isa == 1:
        grads = [widen(g) for g in given]
    proj_g, proj_v = [], []
    for name, g, v in zip(names, grads, probes, strict=True):
        if g.shape[1] > k:
            p = ops.projection_matrix(name, g.shape[1], k, seed=5).astype(np.float64)
            g, v = g.astype(np.float64) @ p.T, p @ v
        proj_g.append(g)
        proj_v.append(v)
    want, want_layers, _ = formula_reference(proj_g, proj_v)
    res = ops.datainf(given, probes, names=names, projection_dim=k, seed=5, per_layer=True,
                      _cpu_isa=isa, _elementwise=elementwise)  # fmt: skip
    assert_close(res.influence, want, rtol=2e-4)
    assert_close(res.per_layer, want_layers, rtol=2e-4)
    for li, g in enumerate(proj_g):
        np.testing.assert_allclose(res.q[li], (g.astype(np.float64) ** 2).sum(1), rtol=1e-5)
        assert res.probe_sq[li] == pytest.approx(float(np.square(proj_v[li]).sum()), rel=1e-5)


def test_projection_preserves_inner_products_on_average() -> None:
    """E[<Pg, Pv>] = <g, v> with error ~ |g| |v| / sqrt(k): the projected grad-dot is unbiased."""
    rng = np.random.default_rng(1)
    v = rng.standard_normal(2000).astype(np.float32)
    alpha = rng.uniform(-1, 1, 200)
    g = (alpha[:, None] * v + 0.3 * rng.standard_normal((200, 2000))).astype(np.float32)
    exact = g.astype(np.float64) @ v
    runs = [ops.datainf([g], [v], projection_dim=256, seed=s, stats_only=True).a[0]
            for s in range(4)]  # fmt: skip
    for a in runs:
        assert np.corrcoef(exact, a)[0, 1] > 0.98
    mean = np.mean(runs, axis=0)
    assert abs(float(np.mean(mean - exact))) < 0.05 * float(np.abs(exact).mean())


# --- errors ------------------------------------------------------------------------------------


def test_non_finite_gradients_are_named_by_layer_and_sample() -> None:
    grads, probes = layers(12, 10, [4, 20])
    for bad in (np.nan, np.inf, -np.inf, 1e20):  # 1e20**2 overflows float32
        g = [x.copy() for x in grads]
        g[1][7, 3] = bad
        with pytest.raises(ValueError, match=r"layer 'ff': the gradient of sample 7 is not finite"):
            ops.datainf(g, probes, names=["attn", "ff"])
    g = [x.copy() for x in grads]
    g[0][2, 0] = np.nan
    with pytest.raises(ValueError, match="layer 'layer 0': the gradient of sample 2"):
        ops.datainf(g, probes, projection_dim=2)
    v = [x.copy() for x in probes]
    v[1][5] = np.inf
    with pytest.raises(ValueError, match="layer 'layer 1': probe gradient entry 5 is inf"):
        ops.datainf(grads, v)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"damping": 0.0}, ValueError, "damping must be a finite float > 0, got 0.0"),
        ({"damping": -1.0}, ValueError, "damping must be"),
        ({"damping": float("nan")}, ValueError, "damping must be"),
        ({"projection_dim": 0}, ValueError, "projection_dim must be >= 1, got 0"),
        ({"projection_dim": 2.5}, TypeError, "projection_dim must be an int"),
        ({"lambdas": [1.0]}, ValueError, "1 lambdas for 2 layers"),
        ({"lambdas": [1.0, -2.0]}, ValueError, "layer 'layer 1': lambda must be a finite float"),
        ({"names": ["a"]}, ValueError, "2 gradient layers, 2 probe gradients, 1 names"),
        ({"seed": -1}, ValueError, "seed must be an integer"),
    ],
)
def test_bad_options(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    grads, probes = layers(0, 5, [3, 4])
    with pytest.raises(error, match=match):
        ops.datainf(grads, probes, **kwargs)


def test_bad_shapes_and_dtypes() -> None:
    grads, probes = layers(0, 5, [3, 4])
    with pytest.raises(ValueError, match="no layers"):
        ops.datainf([], [])
    with pytest.raises(ValueError, match="no training samples"):
        ops.datainf([np.zeros((0, 3), np.float32)], [np.zeros(3, np.float32)])
    with pytest.raises(ValueError, match="layer 'layer 1' has 4 samples, layer 'layer 0' has 5"):
        ops.datainf([grads[0], grads[1][:4]], probes)
    with pytest.raises(ValueError, match=r"probe gradient has shape \(3,\), the layer has d = 4"):
        ops.datainf(grads, [probes[0], probes[0]])
    with pytest.raises(TypeError, match="layer 'layer 0': gradients must be float32 or bfloat16"):
        ops.datainf([grads[0].astype(np.float64)], probes[:1])
    with pytest.raises(TypeError, match=r"got torch.float16 \(convert explicitly"):
        ops.datainf([torch.from_numpy(grads[0]).half()], probes[:1])
    with pytest.raises(ValueError, match=r"gradients must be \[n, d\], got \(5, 3, 1\)"):
        ops.datainf([grads[0][:, :, None]], probes[:1])


# --- CUDA --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("projection_dim", [None, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_devices_agree(device: str, dtype: torch.dtype, projection_dim: int | None) -> None:
    grads, probes = layers(13, 90, [5, 40, 300])
    host = [torch.from_numpy(g).to(dtype) for g in grads]
    want = ops.datainf(host, probes, projection_dim=projection_dim, per_layer=True)
    dev = [g.to(device) for g in host]
    got = ops.datainf(dev, [torch.from_numpy(v).to(device) for v in probes],
                      projection_dim=projection_dim, per_layer=True)  # fmt: skip
    infl = got.influence.cpu().numpy() if device != "cpu" else got.influence
    per = got.per_layer.cpu().numpy() if device != "cpu" else got.per_layer
    assert_close(infl, want.influence, rtol=2e-4)
    assert_close(per, want.per_layer, rtol=2e-4)
    if device != "cpu":
        bad = [g.clone() for g in dev]
        bad[2][4, 1] = float("nan")
        with pytest.raises(ValueError, match="layer 'layer 2': the gradient of sample 4"):
            ops.datainf(bad, [torch.from_numpy(v).to(device) for v in probes])
