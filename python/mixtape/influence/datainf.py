"""DataInf influence scores of training samples on a probe set, from per-sample gradients.

Sign convention (every method): positive influence = up-weighting the sample raises the probe
loss (harmful), negative = helpful, as in DataInf's ``compute_IF`` (Kwon et al. 2024). Layers
given as per-sample gradient tensors go to the C++/CUDA kernel (``ops.datainf``); linear layers
given as :class:`GhostLinear` (inputs and output gradients) are scored in torch without ever
forming their per-sample gradients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch

from mixtape import ops

__all__ = [
    "METHODS",
    "DataInfCalculator",
    "GhostLinear",
    "ghost_linear_solve",
    "ghost_linear_stats",
]

#: ``datainf``: the DataInf kernel; ``grad_dot``: -g_i . v; ``cosine``: -cos(g_i, v).
METHODS = ("datainf", "grad_dot", "cosine")


@dataclass(frozen=True)
class GhostLinear:
    """An ``nn.Linear`` layer as its backward pass sees it, so per-sample gradients are never
    formed: sample i's weight gradient is ``output_grads[i]^T @ inputs[i]`` ([d_out, d_in]).

    ``inputs`` [n, T, d_in] (or [n, d_in]) are the layer's inputs and ``output_grads``
    [n, T, d_out] the gradients of each sample's loss with respect to its outputs (positions
    outside the loss have zero output gradient, so padding needs no mask). With ``bias=True`` the
    bias belongs to the layer block: its per-sample gradient ``output_grads[i].sum(0)`` follows
    the flattened weight gradient (the order of ``cat([w.flatten(), b])``), and the probe
    gradient is ``(weight_grad [d_out, d_in], bias_grad [d_out])`` or that flat concatenation.
    """

    inputs: torch.Tensor
    output_grads: torch.Tensor
    bias: bool = False

    def dims(self) -> tuple[int, int, int]:
        """(n, d_in, d_out), checking the two tensors agree."""
        x, g = self.inputs, self.output_grads
        if x.dim() not in (2, 3) or g.dim() != x.dim() or x.shape[:-1] != g.shape[:-1]:
            raise ValueError(
                f"GhostLinear: inputs {tuple(x.shape)} and output_grads {tuple(g.shape)} must be "
                "[n, T, d_in] and [n, T, d_out] (or [n, d_in] and [n, d_out])"
            )
        if x.device != g.device:
            raise ValueError(f"GhostLinear: inputs on {x.device}, output_grads on {g.device}")
        return int(x.shape[0]), int(x.shape[-1]), int(g.shape[-1])

    @property
    def num_params(self) -> int:
        """d_l: entries of the layer's gradient (weight, plus bias when included)."""
        _, d_in, d_out = self.dims()
        return d_out * (d_in + (1 if self.bias else 0))


def _ghost_tensors(layer: GhostLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """X [n, T, d_in], D [n, T, d_out] in float32 and (with bias) the per-sample bias gradients."""
    x = layer.inputs.detach().float()
    dg = layer.output_grads.detach().float()
    if x.dim() == 2:
        x, dg = x[:, None], dg[:, None]
    return x, dg, (dg.sum(dim=1) if layer.bias else None)


def ghost_linear_stats(
    layer: GhostLinear, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1 of DataInf for a linear layer from X_i and D_i (no per-sample gradients):
    a_i = <D_i, X_i V^T> (+ g_bias_i . v_bias) and q_i = sum((X_i X_i^T) * (D_i D_i^T))
    (+ |g_bias_i|^2), V = ``weight`` [d_out, d_in] the probe gradient. Float32, [n] each."""
    layer.dims()
    x, dg, gb = _ghost_tensors(layer)
    a = torch.einsum("nto,nto->n", dg, x @ weight.T)
    q = ((x @ x.transpose(1, 2)) * (dg @ dg.transpose(1, 2))).sum(dim=(1, 2))
    if gb is not None:
        if bias is None:
            raise ValueError("ghost_linear_stats: a layer with bias needs the probe's bias part")
        a = a + gb @ bias
        q = q + gb.square().sum(dim=1)
    return a, q


def ghost_linear_solve(layer: GhostLinear, c: torch.Tensor) -> torch.Tensor:
    """Passes 2-3 for a linear layer: b_i = <D_i, X_i U^T> (+ bias part) with
    U = sum_i c_i D_i^T X_i / n, from the coefficients ``c`` [n]. Float32, [n]."""
    n, _, _ = layer.dims()
    x, dg, gb = _ghost_tensors(layer)
    cn = c.float() / n
    cd = dg * cn[:, None, None]
    u_w = cd.reshape(-1, cd.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # [d_out, d_in]
    b = torch.einsum("nto,nto->n", dg, x @ u_w.T)
    if gb is not None:
        b = b + gb @ (gb.T @ cn)
    return b


LayerGrad = torch.Tensor | GhostLinear
ProbeGrad = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass
class _Layer:
    name: str
    train: torch.Tensor | GhostLinear  # [n, D] (float32/bf16) or a ghost layer
    probe: torch.Tensor  # [D] float32 (ghost: weight part [d_out, d_in])
    probe_bias: torch.Tensor | None  # ghost layers with bias: [d_out]
    lam: float | None


class DataInfCalculator:
    """Per-sample influence on a probe set from per-sample gradients of chosen layers.

    ``damping`` sets DataInf's per-layer lambda_l = damping * mean_i |g_i|^2 / d_l (0.1, the
    paper's rule); ``lambda_`` fixes it instead (one float, a mapping name -> float, or a sequence
    for list input; layers it does not name use the rule). ``projection_dim`` k replaces each
    layer with d_l > k by its seeded random projection (``seed``; see ``ops.projection_matrix``),
    which keeps DataInf accurate on wide layers. ``method`` chooses DataInf or the cheap
    baselines ``grad_dot`` and ``cosine`` (same sign: positive = harmful).
    """

    def __init__(
        self,
        damping: float = 0.1,
        lambda_: float | Mapping[str, float] | Sequence[float] | None = None,
        projection_dim: int | None = None,
        seed: int = 0,
        method: str = "datainf",
    ) -> None:
        if isinstance(damping, bool) or not (math.isfinite(damping) and damping > 0):
            raise ValueError(f"damping must be a finite float > 0, got {damping!r}")
        if projection_dim is not None and (
            isinstance(projection_dim, bool) or not isinstance(projection_dim, int)
            or projection_dim < 1
        ):  # fmt: skip
            raise ValueError(f"projection_dim must be None or an int >= 1, got {projection_dim!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        ops.check_choice("method", method, METHODS)
        _check_lambda_values(lambda_)
        self.damping = float(damping)
        self.lambda_ = lambda_
        self.projection_dim = projection_dim
        self.seed = seed
        self.method = method

    def __repr__(self) -> str:
        return (
            f"DataInfCalculator(damping={self.damping}, lambda_={self.lambda_!r}, "
            f"projection_dim={self.projection_dim}, seed={self.seed}, method={self.method!r})"
        )

    @overload
    def compute_influence(
        self,
        train_grads: Mapping[str, LayerGrad] | Sequence[LayerGrad],
        probe_grads: Mapping[str, ProbeGrad] | Sequence[ProbeGrad],
        per_layer: Literal[False] = False,
    ) -> torch.Tensor: ...

    @overload
    def compute_influence(
        self,
        train_grads: Mapping[str, LayerGrad] | Sequence[LayerGrad],
        probe_grads: Mapping[str, ProbeGrad] | Sequence[ProbeGrad],
        per_layer: Literal[True],
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    @overload
    def compute_influence(
        self,
        train_grads: Mapping[str, LayerGrad] | Sequence[LayerGrad],
        probe_grads: Mapping[str, ProbeGrad] | Sequence[ProbeGrad],
        per_layer: bool,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...

    def compute_influence(
        self,
        train_grads: Mapping[str, LayerGrad] | Sequence[LayerGrad],
        probe_grads: Mapping[str, ProbeGrad] | Sequence[ProbeGrad],
        per_layer: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Influence of each of the n training samples: a float32 tensor [n] on the gradients'
        device, and with ``per_layer=True`` also the [L, n] per-layer scores (layers in input
        order) whose column sums are the influence (DataInf, grad_dot; for cosine the total is
        the cosine of the whole concatenated gradient, rows the per-layer cosines).

        ``train_grads`` maps layer names to per-sample gradients [n, *S_l] (any float dtype;
        float32 and bfloat16 are read in place, others converted to float32) or
        :class:`GhostLinear`; a list is accepted too. ``probe_grads`` maps the same names to the
        probe-mean gradient [*S_l] or per-probe gradients [m, *S_l] (averaged here).
        """
        layers = self._layers(train_grads, probe_grads)
        n = _num_samples(layers)
        device = _device(layers)
        plain = [i for i, lay in enumerate(layers) if not isinstance(lay.train, GhostLinear)]
        ghosts = [i for i, lay in enumerate(layers) if isinstance(lay.train, GhostLinear)]
        if ghosts and self.projection_dim is not None:
            raise ValueError(
                f"projection_dim applies to materialised gradients only; layer "
                f"{layers[ghosts[0]].name!r} is a GhostLinear (pass its per-sample gradients, or "
                "use projection_dim=None)"
            )
        count = len(layers)
        a = torch.zeros((count, n), dtype=torch.float32, device=device)
        q = torch.zeros((count, n), dtype=torch.float32, device=device)
        vsq = torch.zeros(count, dtype=torch.float64, device=device)
        scores = torch.zeros((count, n), dtype=torch.float32, device=device)
        stats_only = self.method != "datainf"
        if plain:
            res = ops.datainf(
                [layers[i].train for i in plain], [layers[i].probe for i in plain],
                names=[layers[i].name for i in plain], damping=self.damping,
                lambdas=[layers[i].lam for i in plain], projection_dim=self.projection_dim,
                seed=self.seed, per_layer=not stats_only, stats_only=stats_only,
            )  # fmt: skip
            idx = torch.tensor(plain, device=device)
            a[idx] = torch.as_tensor(res.a, device=device)
            q[idx] = torch.as_tensor(res.q, device=device)
            vsq[idx] = torch.as_tensor(res.probe_sq, device=device)
            if not stats_only:
                scores[idx] = torch.as_tensor(res.per_layer, device=device)
        for i in ghosts:
            a[i], q[i], vsq[i], s = self._ghost(layers[i], n, stats_only)
            if s is not None:
                scores[i] = s
        if self.method == "datainf":
            total = scores.sum(dim=0)
        elif self.method == "grad_dot":
            scores = -a
            total = scores.sum(dim=0)
        else:
            scores = _neg_cosine(a, q, vsq[:, None])
            total = _neg_cosine(a.sum(dim=0), q.sum(dim=0), vsq.sum())
        return (total, scores) if per_layer else total

    # --- internals -----------------------------------------------------------------------------

    def _ghost(
        self, layer: _Layer, n: int, stats_only: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """a, q, |v|^2 and (DataInf) the scores of a ghost layer, the kernel's steps in torch."""
        g = layer.train
        assert isinstance(g, GhostLinear)
        a, q = ghost_linear_stats(g, layer.probe, layer.probe_bias)
        ok = torch.isfinite(a) & torch.isfinite(q)
        if not bool(ok.all()):
            row = int((~ok).nonzero()[0, 0])
            raise ValueError(
                f"layer {layer.name!r}: the gradient of sample {row} is not finite (NaN or inf in "
                "its inputs or output gradients, or a squared norm past float32)"
            )
        vsq = layer.probe.double().square().sum()
        if layer.probe_bias is not None:
            vsq = vsq + layer.probe_bias.double().square().sum()
        if stats_only:
            return a, q, vsq, None
        lam = layer.lam
        if lam is None:
            lam = self.damping * float(q.double().sum()) / (n * g.num_params)
        if lam <= 0:  # every gradient of the layer is zero: no influence (as the kernel)
            return a, q, vsq, torch.zeros_like(a)
        c = a.double() / (lam + q.double())
        # n == 1: b = c q exactly, in double as in the kernel (b - a cancels for one sample).
        b = c * q.double() if n == 1 else ghost_linear_solve(g, c.float())
        return a, q, vsq, ((b.double() - a.double()) / lam).float()

    def _layers(
        self,
        train_grads: Mapping[str, LayerGrad] | Sequence[LayerGrad],
        probe_grads: Mapping[str, ProbeGrad] | Sequence[ProbeGrad],
    ) -> list[_Layer]:
        """Pair train and probe gradients by name, check shapes, average probes, fix dtypes."""
        if isinstance(train_grads, Mapping):
            if not isinstance(probe_grads, Mapping):
                raise TypeError("train_grads is a mapping, so probe_grads must be one too")
            if len(probe_grads) == 0:
                raise ValueError("empty probe set: probe_grads has no layers")
            names = [str(k) for k in train_grads]
            missing = [k for k in train_grads if k not in probe_grads]
            extra = [k for k in probe_grads if k not in train_grads]
            if missing or extra:
                raise ValueError(
                    f"train and probe gradients name different layers: missing from probe_grads "
                    f"{missing}, not in train_grads {extra}"
                )
            pairs = [(train_grads[k], probe_grads[k]) for k in train_grads]
        else:
            if isinstance(probe_grads, Mapping) or isinstance(train_grads, (str, torch.Tensor)):
                raise TypeError(
                    "train_grads and probe_grads must both be mappings name -> tensor or both "
                    "sequences of tensors"
                )
            if len(probe_grads) == 0:
                raise ValueError("empty probe set: probe_grads has no layers")
            if len(train_grads) != len(probe_grads):
                raise ValueError(
                    f"{len(train_grads)} train gradient layers but {len(probe_grads)} probe layers"
                )
            names = [str(i) for i in range(len(train_grads))]
            pairs = list(zip(train_grads, probe_grads, strict=True))
        if not pairs:
            raise ValueError("no layers: train_grads is empty")
        lams = _lambdas_by_layer(self.lambda_, names, isinstance(train_grads, Mapping))
        zipped = zip(names, pairs, lams, strict=True)
        return [_layer(name, tr, pr, lam) for name, (tr, pr), lam in zipped]


def _check_lambda_values(lambda_: Any) -> None:
    if lambda_ is None:
        return
    if isinstance(lambda_, Mapping):
        values = list(lambda_.values())
    elif isinstance(lambda_, (int, float)) and not isinstance(lambda_, bool):
        values = [lambda_]
    elif isinstance(lambda_, Sequence) and not isinstance(lambda_, str):
        values = list(lambda_)
    else:
        raise TypeError(f"lambda_ must be a float, a mapping or a sequence, got {lambda_!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
            math.isfinite(v) and v > 0
        ):  # fmt: skip
            raise ValueError(f"lambda_ values must be finite floats > 0, got {v!r}")


def _lambdas_by_layer(lambda_: Any, names: list[str], named: bool) -> list[float | None]:
    if lambda_ is None:
        return [None] * len(names)
    if isinstance(lambda_, (int, float)):
        return [float(lambda_)] * len(names)
    if isinstance(lambda_, Mapping):
        unknown = [k for k in lambda_ if str(k) not in names]
        if unknown:
            raise ValueError(f"lambda_ names layers not given: {unknown} (layers: {names})")
        by_name = {str(k): float(v) for k, v in lambda_.items()}
        return [by_name.get(name) for name in names]
    if named:
        raise TypeError("lambda_ for named layers must be a float or a mapping name -> float")
    seq = [float(v) for v in lambda_]
    if len(seq) != len(names):
        raise ValueError(f"lambda_ has {len(seq)} values for {len(names)} layers")
    return list(seq)


def _as_float(name: str, t: Any, what: str) -> torch.Tensor:
    """A float tensor (float32 and bfloat16 kept; other floats -> float32; no autograd graph)."""
    x = torch.as_tensor(t).detach() if not isinstance(t, torch.Tensor) else t.detach()
    if not x.dtype.is_floating_point:
        raise TypeError(f"layer {name!r}: {what} must be floating point, got {x.dtype}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    return x


def _probe_mean(
    name: str, probe: Any, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """The probe-mean gradient [*shape] (float32) from [*shape] or [m, *shape]."""
    p = _as_float(name, probe, "probe gradients")
    if tuple(p.shape) == shape:
        mean = p.float()
    elif p.dim() == len(shape) + 1 and tuple(p.shape[1:]) == shape:
        if p.shape[0] == 0:
            raise ValueError(f"empty probe set: layer {name!r} has 0 probe gradients")
        mean = p.double().mean(dim=0).float()
    else:
        raise ValueError(
            f"layer {name!r}: probe gradients have shape {tuple(p.shape)}, expected {shape} "
            f"(the probe mean) or (m, *{shape}) (m probe samples, averaged)"
        )
    return mean.to(device)


def _layer(name: str, train: Any, probe: Any, lam: float | None) -> _Layer:
    if isinstance(train, GhostLinear):
        _, d_in, d_out = train.dims()
        dev = train.inputs.device
        if isinstance(probe, tuple):
            if not train.bias or len(probe) != 2:
                raise ValueError(
                    f"layer {name!r}: a (weight, bias) probe pair needs GhostLinear(bias=True)"
                )
            w = _probe_mean(name, probe[0], (d_out, d_in), dev)
            bvec = _probe_mean(name, probe[1], (d_out,), dev)
            return _Layer(name, train, w, bvec, lam)
        p = _as_float(name, probe, "probe gradients")
        total = train.num_params
        if not train.bias and p.shape[-2:] == (d_out, d_in):
            return _Layer(name, train, _probe_mean(name, p, (d_out, d_in), dev), None, lam)
        flat = _probe_mean(name, p, (total,), dev)
        w = flat[: d_out * d_in].reshape(d_out, d_in)
        return _Layer(name, train, w, flat[d_out * d_in :] if train.bias else None, lam)
    g = _as_float(name, train, "train gradients")
    if g.dim() < 2:
        raise ValueError(f"layer {name!r}: train gradients must be [n, ...], got {tuple(g.shape)}")
    shape = tuple(g.shape[1:])
    mean = _probe_mean(name, probe, shape, g.device)
    flat = g.reshape(g.shape[0], math.prod(shape))  # a view when each sample's are contiguous
    return _Layer(name, flat, mean.reshape(-1), None, lam)


def _train_of(layer: _Layer) -> torch.Tensor:
    """The tensor whose first dimension is the samples (a ghost layer's inputs)."""
    return layer.train.inputs if isinstance(layer.train, GhostLinear) else layer.train


def _num_samples(layers: list[_Layer]) -> int:
    counts = [(lay.name, _train_of(lay).shape[0]) for lay in layers]
    n = counts[0][1]
    for name, c in counts:
        if c != n:
            raise ValueError(f"layer {name!r} has {c} samples, layer {counts[0][0]!r} has {n}")
    if n == 0:
        raise ValueError("no training samples (n == 0)")
    return int(n)


def _device(layers: list[_Layer]) -> torch.device:
    devs = [(lay.name, _train_of(lay).device) for lay in layers]
    for name, dev in devs:
        if dev != devs[0][1]:
            raise ValueError(f"layer {name!r} is on {dev}, layer {devs[0][0]!r} on {devs[0][1]}")
    return devs[0][1]


def _neg_cosine(a: torch.Tensor, q: torch.Tensor, vsq: torch.Tensor) -> torch.Tensor:
    """-a / (|g| |v|), 0 where either norm is 0."""
    den = (q.double() * vsq.double()).sqrt()
    out = torch.where(den > 0, -a.double() / den.clamp_min(1e-300), torch.zeros_like(den))
    return out.float()

