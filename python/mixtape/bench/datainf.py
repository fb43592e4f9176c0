"""Influence cases for ``mixtape bench``: the DataInf kernel and the ghost path against torch.

Every contender gets the same seeded gradients. Peers: DataInf written the straightforward way in
torch (per layer, vectorised ops on [n, d], as the paper's formula reads), the DataInf
repository's own per-sample loop (``IFEngine.compute_hvp_proposed`` + ``compute_IF``), and the
time to read G once (the floor of any method that reads every gradient). torch runs with 2 threads
and our kernel with ``parallel_for`` (``MIXTAPE_NUM_THREADS``, default all cores).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from mixtape.bench.core import Measurement, case, timeit

TORCH_THREADS = 2


@contextmanager
def _torch_threads(n: int) -> Iterator[Any]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield torch
    finally:
        torch.set_num_threads(before)


def torch_datainf(grads: list[Any], probes: list[Any], damping: float = 0.1) -> Any:
    """DataInf per layer with torch ops on [n, d]: the obvious vectorisation of the formula."""
    import torch

    n = grads[0].shape[0]
    infl = torch.zeros(n)
    for g, v in zip(grads, probes, strict=True):
        q = (g * g).sum(dim=1)
        lam = damping * q.mean() / g.shape[1]
        a = g @ v
        c = a / (lam + q)
        hvp = (v - g.T @ c / n) / lam
        infl -= g @ hvp
    return infl


def reference_loop(grads: list[Any], probes: list[Any], damping: float = 0.1) -> Any:
    """The DataInf repository's loop (one sample at a time, layer by layer), same arithmetic."""
    import torch

    n = grads[0].shape[0]
    infl = torch.zeros(n)
    for g, v in zip(grads, probes, strict=True):
        lam = torch.stack([torch.mean(g[i] ** 2) for i in range(n)]).mean() * damping
        hvp = torch.zeros_like(v)
        for i in range(n):
            c = torch.sum(v * g[i]) / (lam + torch.sum(g[i] ** 2))
            hvp += (v - c * g[i]) / (n * lam)
        for i in range(n):
            infl[i] -= torch.sum(hvp * g[i])
    return infl


def _gbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.1f} GB/s of G"


@case("datainf")
def datainf_kernel(quick: bool) -> list[Measurement]:
    """DataInf influence, 1024 samples x 8 layers x d=4096 float32 (128 MiB of gradients)."""
    from mixtape import ops

    name = "datainf"
    n, layers, d = (256, 4, 1024) if quick else (1024, 8, 4096)
    repeat = 3 if quick else 7
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal((n, d), dtype=np.float32) for _ in range(layers)]
    probes = [rng.standard_normal(d, dtype=np.float32) for _ in range(layers)]
    nbytes = sum(g.nbytes for g in grads)
    size = f"n={n}, {layers} x d={d}"
    out: list[Measurement] = []

    def ours() -> object:
        return ops.datainf(grads, probes)

    t = timeit(ours, repeat)
    out.append(Measurement(name, "mixtape datainf (C++)", t, True,
                           f"{size}; 3 reads, {_gbps(3 * nbytes, t)}"))  # fmt: skip
    import torch

    bf = [torch.from_numpy(g).bfloat16() for g in grads]  # read in place as uint16 bits
    t = timeit(lambda: ops.datainf(bf, probes), repeat)
    out.append(Measurement(name, "mixtape datainf (bf16 input)", t, True, "same G rounded to bf16"))
    t = timeit(lambda: ops.datainf(grads, probes, stats_only=True), repeat)
    out.append(Measurement(name, "mixtape pass 1 only (a, q)", t, True,
                           f"one read, {_gbps(nbytes, t)}"))  # fmt: skip

    with _torch_threads(TORCH_THREADS) as torch:
        tg = [torch.from_numpy(g) for g in grads]
        tv = [torch.from_numpy(v) for v in probes]
        ref = torch_datainf(tg, tv).numpy()
        got = ours()
        assert isinstance(got, ops.DataInfResult)
        err = float(np.abs(got.influence - ref).max() / np.abs(ref).max())
        t = timeit(lambda: torch_datainf(tg, tv), repeat)
        note = f"{TORCH_THREADS} threads; max diff {err:.1e} of max |infl|"
        out.append(Measurement(name, "torch DataInf (vectorised per layer)", t, False, note))
        torch.set_num_threads(1)  # a loaded 2-core machine can penalise torch's thread pool
        t = timeit(lambda: torch_datainf(tg, tv), repeat)
        out.append(Measurement(name, "torch DataInf, 1 thread", t, False, "same code"))
        torch.set_num_threads(TORCH_THREADS)
        small = max(1, n // 8)
        t_loop = timeit(lambda: reference_loop([g[:small] for g in tg], tv), 1, warmup=0)
        note = f"timed on {small} samples, x{n // small} (linear in n)"
        out.append(Measurement(name, "DataInf repo loop (per sample)", t_loop * n / small, False,
                               note))  # fmt: skip
    t = timeit(lambda: [g.sum() for g in grads], repeat)
    out.append(Measurement(name, "numpy G.sum() (read G once)", t, False,
                           f"floor, 1 thread; {_gbps(nbytes, t)}"))  # fmt: skip
    return out


@case("datainf-ghost")
def datainf_ghost(quick: bool) -> list[Measurement]:
    """A linear layer 1024 -> 1024, 64 samples x 128 tokens: ghost path vs per-sample grads."""
    from mixtape.influence import DataInfCalculator, GhostLinear

    name = "datainf-ghost"
    n, t_len, d_in, d_out = (16, 32, 256, 256) if quick else (64, 128, 1024, 1024)
    repeat = 3 if quick else 5
    calc = DataInfCalculator()
    out: list[Measurement] = []
    with _torch_threads(TORCH_THREADS) as torch:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, t_len, d_in, generator=g)
        dout = torch.randn(n, t_len, d_out, generator=g) / t_len
        probe = torch.randn(d_out, d_in, generator=g) / t_len
        ghost = GhostLinear(x, dout)

        def run_ghost() -> Any:
            return calc.compute_influence({"lin": ghost}, {"lin": probe})

        def materialise() -> Any:
            per_sample = torch.einsum("nto,nti->noi", dout, x).reshape(n, -1)
            return calc.compute_influence({"lin": per_sample}, {"lin": probe.reshape(-1)})

        def materialise_torch() -> Any:
            per_sample = torch.einsum("nto,nti->noi", dout, x).reshape(n, -1)
            return torch_datainf([per_sample], [probe.reshape(-1)])

        ref = materialise()
        err = float((run_ghost() - ref).abs().max() / ref.abs().max())
        grad_bytes = n * d_in * d_out * 4
        act_bytes = (x.numel() + dout.numel()) * 4
        sizes = f"n={n}, T={t_len}, {d_in}->{d_out}"
        note = f"{sizes}; reads {act_bytes >> 20} MiB; diff {err:.1e}"
        made = f"materialises {grad_bytes >> 20} MiB"
        out.append(Measurement(name, "mixtape ghost (X, dY; torch ops)",
                               timeit(run_ghost, repeat), True, note))  # fmt: skip
        out.append(Measurement(name, "per-sample grads + mixtape kernel",
                               timeit(materialise, repeat), True, made))  # fmt: skip
        out.append(Measurement(name, "per-sample grads + torch DataInf",
                               timeit(materialise_torch, repeat), False, made))  # fmt: skip
    return out

