"""Per-sample gradients of chosen parameters for a causal-LM loss: module hooks (one batched
forward and backward, per-sample gradients formed per module), torch.func (vmap of grad), a
per-sample loop, or the ghost path for linear layers (inputs and output gradients from hooks).

Every sample's loss is the mean token cross-entropy over its labelled positions (labels aligned
with ``input_ids`` and shifted here, as transformers does; -100 ignored; a sample with no label
has loss 0 and a zero gradient). The model is put in eval mode while gradients are taken (no
dropout: a sample's gradient is a function of the sample and the weights) and restored after.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from mixtape.influence.datainf import GhostLinear

__all__ = [
    "HOOK_MODULES",
    "GhostGradientExtractor",
    "causal_lm_loss",
    "ghost_modules",
    "hooks_supported",
    "mean_gradient",
    "model_logits",
    "per_sample_gradients",
    "select_parameters",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = Mapping[str, torch.Tensor]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample mean next-token loss [n] of logits [n, T, V] and labels [n, T] (-100 ignored)."""
    # The labels move one position left (the last position predicts nothing) rather than the
    # logits: slicing them would copy [n, T - 1, V] before the loss.
    lb = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
    lg = logits.float()
    ce = nn.functional.cross_entropy(
        lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100, reduction="none"
    ).reshape(lb.shape)
    return ce.sum(dim=1) / (lb != -100).sum(dim=1).clamp_min(1)


def model_logits(output: Any) -> torch.Tensor:
    """The logits of a model's output: ``.logits``, a tensor, or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in the model's output of type {type(output).__name__}")


def _blocks(model: nn.Module) -> tuple[str, list[int]] | None:
    """The model's transformer blocks: the ``nn.ModuleList`` of same-class modules holding the
    most parameters, as (name prefix, indices of its entries that hold parameters), or None."""
    best: tuple[int, str, list[int]] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        sizes = [sum(p.numel() for p in m.parameters()) for m in mod]
        idx = [i for i, s in enumerate(sizes) if s > 0]
        if idx and (best is None or sum(sizes) > best[0]):
            best = (sum(sizes), f"{name}." if name else "", idx)
    return None if best is None else (best[1], best[2])


def select_parameters(
    model: nn.Module,
    params: Sequence[str] | None = None,
    last_k_blocks: int | None = None,
    lora: bool = False,
) -> dict[str, nn.Parameter]:
    """The parameters to score, by name, in the model's order.

    ``params``: fnmatch patterns on names; ``last_k_blocks``: every parameter of the last k
    blocks (the ``nn.ModuleList`` of same-class modules holding the most parameters:
    ``transformer.h`` / ``model.layers``);
    ``lora``: names containing ``lora_``. None set: LoRA parameters if any, else the trainable
    parameters of the last block that has any, else every parameter that requires grad (the
    head, when every block is frozen).
    """
    named = dict(model.named_parameters())
    names = list(named)
    if params is not None:
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in params)]
        if not chosen:
            raise ValueError(f"no parameter matches params={list(params)}; the model has "
                             f"{names[:6]}{' ...' if len(names) > 6 else ''}")  # fmt: skip
        return {n: named[n] for n in chosen}
    lora_names = [n for n in names if "lora_" in n]
    if lora:
        if not lora_names:
            raise ValueError("lora=True but the model has no parameter named '*lora_*'")
        return {n: named[n] for n in lora_names}
    blocks = _blocks(model)
    if last_k_blocks is not None:
        if blocks is None:
            raise ValueError("last_k_blocks: the model has no blocks (an nn.ModuleList of "
                             "same-class modules with parameters)")  # fmt: skip
        prefix, idx = blocks
        keep = {f"{prefix}{i}." for i in idx[-last_k_blocks:]}
        return {n: named[n] for n in names if any(n.startswith(k) for k in keep)}
    if lora_names:
        return {n: named[n] for n in lora_names}
    if blocks is not None:
        # Influence through weights training never moves says nothing: the last block that
        # trains (head-only / partial fine-tuning freezes the top or every block), its
        # trainable parameters only.
        prefix, idx = blocks
        for i in reversed(idx):
            chosen = [n for n in names
                      if n.startswith(f"{prefix}{i}.") and named[n].requires_grad]  # fmt: skip
            if chosen:
                return {n: named[n] for n in chosen}
        # every block frozen (head-only fine-tuning): what trains, below
    chosen = [n for n in names if named[n].requires_grad]
    if not chosen:
        raise ValueError("the model has no trainable parameter to score")
    return {n: named[n] for n in chosen}


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _check_batch(batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(input_ids [n, T], attention_mask or None, labels [n, T]) checked."""
    if "input_ids" not in batch:
        raise ValueError(f"batch needs 'input_ids', has {sorted(batch)}")
    ids = batch["input_ids"]
    if ids.dim() != 2 or ids.shape[0] == 0:
        raise ValueError(f"input_ids must be [n >= 1, T], got {tuple(ids.shape)}")
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is None:
        labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    for key, t in (("attention_mask", mask), ("labels", labels)):
        if t is not None and tuple(t.shape) != tuple(ids.shape):
            raise ValueError(f"{key} has shape {tuple(t.shape)}, input_ids {tuple(ids.shape)}")
    return ids, mask, labels


def _right_padding(mask: torch.Tensor) -> bool:
    """Every row is ones then zeros (padding only after the tokens)."""
    m = mask != 0
    return bool((m[:, 1:] <= m[:, :-1]).all())


def _forward(model: nn.Module, params: Mapping[str, torch.Tensor] | None, ids: torch.Tensor,
             mask: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    kwargs: dict[str, torch.Tensor] = {"input_ids": ids}
    if mask is not None:
        kwargs["attention_mask"] = mask
    if params is None:
        return model_logits(model(**kwargs))
    return model_logits(functional_call(model, dict(params), args=(), kwargs=kwargs))


# --- the hooks path: one batched pass, per-sample gradients formed module by module ----------

#: Module kinds whose parameters the hooks path scores (besides these it needs backend="vmap"):
#: linear layers (per-sample weight gradients as one einsum of inputs and output gradients) and
#: normalisation layers (the module alone re-run per sample under vmap: cheap, it is elementwise).
HOOK_MODULES = ("Linear", "Conv1D", "LayerNorm", "RMSNorm")


def _hook_kind(module: nn.Module) -> str | None:
    """"linear" (``nn.Linear``'s own forward: y = x W^T + b), "conv1d" (transformers' y = x W
    + b), "layernorm" (``nn.LayerNorm``'s own forward, in closed form), "local" (another norm
    layer, or an ``nn.Linear`` subclass with its own forward: scored by re-running the module
    alone), or None (not supported by the hooks path)."""
    if isinstance(module, nn.Linear):
        return "linear" if _plain_linear(module) else "local"
    if _is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward:
        return "layernorm"
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm) or name.endswith(("LayerNorm", "RMSNorm")):
        return "local"
    return None


def _owners(model: nn.Module, params: Mapping[str, torch.Tensor]
            ) -> dict[str, tuple[nn.Module, dict[str, str]]]:  # fmt: skip
    """{module name: (module, {own parameter name: chosen name})} per module object holding a
    chosen parameter, under its first name (a tied parameter's owners' parts are summed)."""
    by_id = {id(p): k for k, p in params.items()}
    out: dict[str, tuple[nn.Module, dict[str, str]]] = {}
    found: set[str] = set()
    for mname, module in model.named_modules():  # each module object once, by its first name
        for lname, p in module.named_parameters(recurse=False):
            full = by_id.get(id(p))
            if full is not None:
                if mname not in out:
                    out[mname] = (module, {})
                out[mname][1][lname] = full
                found.add(full)
    missing = [k for k in params if k not in found]
    if missing:
        raise ValueError(f"{missing[:4]} are not parameters of the model (the hooks backend "
                         "reads gradients off the model's own modules)")  # fmt: skip
    return out


def hook_owners(model: nn.Module, params: Mapping[str, torch.Tensor]
                ) -> dict[str, tuple[nn.Module, dict[str, str]]]:  # fmt: skip
    """The modules holding the chosen parameters (see :func:`_owners`), checked to be kinds the
    hooks backend handles (:data:`HOOK_MODULES`): a ValueError naming the others."""
    owners = _owners(model, params)
    bad = [f"{k!r} ({type(m).__name__})" for k, (m, _) in owners.items()
           if _hook_kind(m) is None]  # fmt: skip
    if bad:
        raise ValueError(f"the hooks backend scores parameters of {', '.join(HOOK_MODULES)} "
                         f"modules only; {', '.join(bad[:4])} "
                         f"{'is' if len(bad) == 1 else 'are'} not (use backend='vmap')")
    return owners


def hooks_supported(model: nn.Module, params: Mapping[str, torch.Tensor]) -> bool:
    """Whether every chosen parameter belongs to a module the hooks backend handles
    (:data:`HOOK_MODULES`), so ``per_sample_gradients(backend="hooks")`` applies."""
    try:
        hook_owners(model, params)
    except ValueError:
        return False
    return True


@contextmanager
def _grad_only(model: nn.Module, chosen: Sequence[torch.Tensor]) -> Iterator[None]:
    """Only the chosen parameters require grad while gradients are taken, so no graph is built
    for the rest of the model (everything before the first chosen layer runs graph-free); the
    flags are restored after."""
    keep = {id(p) for p in chosen}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    own = {id(q) for q, _ in flags}
    extra = [t for t in chosen if id(t) not in own]
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
        for t in extra:
            t.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def _length_chunks(ids: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor,
                   chunk_size: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                  torch.Tensor]]:  # fmt: skip
    """Chunks of at most ``chunk_size`` samples as (row indices, ids, mask, labels).

    Right-padded rows are sorted by length (longest first) and each chunk is cut to its longest
    row, with the mask dropped: padding after a sample's tokens cannot change a causal model's
    outputs on them and carries no label, so less padding is computed and transformers' mask code
    stays out of the pass. Other batches are chunked in order, as given.
    """
    n = ids.shape[0]
    if mask is None or not _right_padding(mask):
        return [(torch.arange(s, min(s + chunk_size, n), device=ids.device), ids[s:s + chunk_size],
                 None if mask is None else mask[s:s + chunk_size], labels[s:s + chunk_size])
                for s in range(0, n, chunk_size)]  # fmt: skip
    real = (mask != 0) | (labels != -100)
    pos = torch.arange(1, ids.shape[1] + 1, device=ids.device)
    lengths = (real * pos).amax(dim=1).clamp_min(1)
    order = torch.sort(lengths, descending=True, stable=True).indices
    out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
    for s in range(0, n, chunk_size):
        idx = order[s:s + chunk_size]
        t = int(lengths[idx].max())
        out.append((idx, ids[idx, :t], None, labels[idx, :t]))
    return out


def _module_per_sample(module: nn.Module, local: Mapping[str, str], x: torch.Tensor,
                       dy: torch.Tensor) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per-sample gradients {own parameter name: [n, *shape]} of a module that acts on each
    sample alone, from its inputs ``x`` [n, ...] and output gradients ``dy`` [n, ...]: the module
    by itself re-run per sample under vmap (a vector-Jacobian product), not the whole model."""
    own = {k: getattr(module, k).detach() for k in local}

    def one(xi: torch.Tensor, di: torch.Tensor) -> dict[str, torch.Tensor]:
        y, back, *_ = torch.func.vjp(lambda p: functional_call(module, p, (xi[None],)), own)
        g: dict[str, torch.Tensor] = back(di[None].to(y.dtype))[0]
        return g

    result: dict[str, torch.Tensor] = vmap(one)(x, dy)
    return result


def _hooks_chunk(
    model: nn.Module,
    owners: Mapping[str, tuple[nn.Module, dict[str, str]]],
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    labels: torch.Tensor,
    loss_fn: LossFn,
) -> dict[str, torch.Tensor]:
    """One batched forward and backward of a chunk's summed losses (samples do not interact, so
    the gradient of the sum at a module's output is each sample's own): the chunk's per-sample
    gradients {chosen name: [c, *shape]} (float32; summed over calls and tied owners)."""
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {k: [] for k in owners}
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def fwd(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor) or \
                    not isinstance(output, torch.Tensor):  # fmt: skip
                raise ValueError(f"the hooks backend needs module {name!r} "
                                 f"({type(module).__name__}) called with one tensor and "
                                 "returning one; use backend='vmap'")  # fmt: skip
            calls[name].append((args[0].detach(), output))

        return fwd

    try:
        for name, (module, _) in owners.items():
            handles.append(module.register_forward_hook(hook(name), with_kwargs=True))
        loss = loss_fn(_forward(model, None, ids, mask), labels).sum()
    finally:
        for h in handles:
            h.remove()
    outputs = [y for k in owners for _, y in calls[k]]
    if not all(y.requires_grad for y in outputs):
        raise ValueError("a chosen module's output does not depend on its parameters here")
    grads = list(torch.autograd.grad(loss, outputs, allow_unused=True)) if outputs else []
    out: dict[str, torch.Tensor] = {}

    def add(full: str, g: torch.Tensor) -> None:
        out[full] = g if full not in out else out[full] + g

    i = 0
    for name, (module, local) in owners.items():
        if not calls[name]:
            raise ValueError(f"module {name!r} was not called in the forward pass")
        kind = _hook_kind(module)
        for x, y in calls[name]:
            g = grads[i]
            i += 1
            dy = torch.zeros_like(y) if g is None else g.detach()
            if kind == "local":
                for lname, g_own in _module_per_sample(module, local, x, dy).items():
                    add(local[lname], g_own.float())
                continue
            if kind == "layernorm":  # y = x_hat * w + b: per sample sum(dy * x_hat), sum(dy)
                assert isinstance(module, nn.LayerNorm)
                shape = tuple(module.normalized_shape)
                xh = nn.functional.layer_norm(x.float(), shape, eps=module.eps)
                dims = (x.shape[0], -1, *shape)
                for lname, full in local.items():
                    part = dy.float() if lname == "bias" else dy.float() * xh
                    add(full, part.reshape(dims).sum(dim=1))
                continue
            x3 = x.float().reshape(x.shape[0], -1, x.shape[-1])
            d3 = dy.float().reshape(dy.shape[0], -1, dy.shape[-1])
            for lname, full in local.items():
                if lname == "bias":
                    add(full, d3.sum(dim=1))
                elif kind == "linear":  # weight [d_out, d_in]
                    add(full, torch.einsum("nto,nti->noi", d3, x3))
                else:  # Conv1D weight [d_in, d_out]
                    add(full, torch.einsum("nti,nto->nio", x3, d3))
    return out


def _hooks_per_sample(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None,
                      labels: torch.Tensor, params: Mapping[str, torch.Tensor], chunk_size: int,
                      loss_fn: LossFn) -> dict[str, torch.Tensor]:  # fmt: skip
    owners = hook_owners(model, params)
    n = ids.shape[0]
    out = {k: torch.empty((n, *p.shape), dtype=torch.float32, device=p.device)
           for k, p in params.items()}  # fmt: skip
    with _eval_mode(model), _grad_only(model, list(params.values())):
        for rows, i, m, lb in _length_chunks(ids, mask, labels, chunk_size):
            got = _hooks_chunk(model, owners, i, m, lb, loss_fn)
            for k, t in out.items():  # every chunk writes its rows once
                t.index_copy_(0, rows, got[k])
    return out


def mean_gradient(
    model: nn.Module,
    batch: Batch,
    params: Mapping[str, torch.Tensor],
    *,
    chunk_size: int = 8,
    loss_fn: LossFn = causal_lm_loss,
) -> tuple[dict[str, torch.Tensor], float]:
    """The mean over samples of the per-sample gradients (the probe gradient) and the mean
    per-sample loss, computed in chunks of ``chunk_size`` samples (float32).

    When ``params`` are the model's own parameters this is plain autograd with only them
    requiring grad, right-padded rows sorted by length and chunks cut to their longest row (see
    :func:`per_sample_gradients`); other tensors go through ``torch.func.functional_call``.
    """
    ids, mask, labels = _check_batch(batch)
    n = ids.shape[0]
    own = {id(p) for p in model.parameters()}
    if params and all(id(p) in own for p in params.values()):
        names = list(params)
        chosen = [params[k] for k in names]
        sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in chosen]
        loss_total = 0.0
        with _eval_mode(model), _grad_only(model, chosen):
            for _, i, m, lb in _length_chunks(ids, mask, labels, chunk_size):
                loss = loss_fn(_forward(model, None, i, m), lb).sum() / n
                gs = torch.autograd.grad(loss, chosen, allow_unused=True)
                for acc, g in zip(sums, gs, strict=True):
                    if g is not None:
                        acc += g.float()
                loss_total += float(loss.detach())
        return dict(zip(names, sums, strict=True)), loss_total
    detached = {k: p.detach() for k, p in params.items()}

    def chunk_loss(p: dict[str, torch.Tensor], i: torch.Tensor, m: torch.Tensor | None,
                   lb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        loss = loss_fn(_forward(model, p, i, m), lb).sum() / n
        return loss, loss.detach()

    total = {k: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
             for k, p in detached.items()}  # fmt: skip
    loss_sum = 0.0
    g_fn = grad(chunk_loss, has_aux=True)
    with _eval_mode(model):
        for s in range(0, n, chunk_size):
            sl = slice(s, s + chunk_size)
            g, loss = g_fn(detached, ids[sl], None if mask is None else mask[sl], labels[sl])
            for k in total:
                total[k] += g[k].float()
            loss_sum += float(loss)
    return total, loss_sum


def per_sample_gradients(
    model: nn.Module,
    batch: Batch,
    params: Mapping[str, torch.Tensor],
    *,
    backend: str = "auto",
    chunk_size: int = 8,
    loss_fn: LossFn = causal_lm_loss,
) -> dict[str, torch.Tensor]:
    """Per-sample gradients {name: [n, *shape]} (float32) of ``params`` for each sample's loss.

    ``backend="hooks"``: per chunk one batched forward and one backward to the chosen modules'
    outputs (only the chosen parameters require grad, so nothing before them is
    differentiated); each module's per-sample gradients are formed from its inputs and output
    gradients (an einsum for linear layers; norm layers re-run alone under vmap). Right-padded
    rows are sorted by length and each chunk is cut to its longest row. Parameters of
    :data:`HOOK_MODULES` modules only. ``"auto"`` (default): ``hooks`` when it applies
    (:func:`hooks_supported`), else ``vmap``.
    ``backend="vmap"``: ``vmap(grad(loss))`` over chunks of ``chunk_size`` samples (memory is
    bounded by the chunk); ``"loop"``: one ``grad`` call per sample (for models vmap cannot
    trace). Parameters need not require grad (LoRA bases stay frozen).
    """
    if backend not in ("auto", "hooks", "vmap", "loop"):
        raise ValueError(f"backend must be 'auto', 'hooks', 'vmap' or 'loop' here, got "
                         f"{backend!r} (the ghost path is GhostGradientExtractor)")  # fmt: skip
    ids, mask, labels = _check_batch(batch)
    if not params:
        raise ValueError("no parameters to differentiate")
    if backend == "auto":
        backend = "hooks" if hooks_supported(model, params) else "vmap"
    if backend == "hooks":
        return _hooks_per_sample(model, ids, mask, labels, params, chunk_size, loss_fn)
    detached = {k: p.detach() for k, p in params.items()}

    def one(p: dict[str, torch.Tensor], i: torch.Tensor, m: torch.Tensor | None,
            lb: torch.Tensor) -> torch.Tensor:  # fmt: skip
        return loss_fn(_forward(model, p, i[None], None if m is None else m[None]), lb[None])[0]

    if mask is not None and _right_padding(mask):
        # Padding after a sample's tokens cannot change a causal model's outputs on them, and
        # its labels are -100: the mask is dropped, which keeps transformers' mask code (data-
        # dependent branches that vmap cannot trace, under sdpa) out of the transform.
        mask = None
    out: dict[str, list[torch.Tensor]] = {k: [] for k in detached}
    g_one = grad(one)
    with _eval_mode(model):
        if backend == "loop":
            for r in range(ids.shape[0]):
                g = g_one(detached, ids[r], None if mask is None else mask[r], labels[r])
                for k in out:
                    out[k].append(g[k].float()[None])
        else:
            batched = vmap(g_one, in_dims=(None, 0, None if mask is None else 0, 0))
            for s in range(0, ids.shape[0], chunk_size):
                sl = slice(s, s + chunk_size)
                try:
                    g = batched(detached, ids[sl], None if mask is None else mask[sl], labels[sl])
                except RuntimeError as e:
                    if "vmap" not in str(e):
                        raise
                    raise RuntimeError(
                        "per-sample gradients: the model cannot be traced by torch.func.vmap "
                        f"({str(e).splitlines()[0][:160]}); use backend='loop' (or 'ghost'), "
                        "or right-padded batches"
                    ) from e
                for k in out:
                    out[k].append(g[k].float())
    return {k: torch.cat(v) for k, v in out.items()}


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): y = x @ W + b with W [d_in, d_out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` (or subclass) that keeps ``nn.Linear.forward``: y = x W^T + b exactly."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def ghost_modules(model: nn.Module, params: Mapping[str, Any]) -> dict[str, nn.Module]:
    """The linear modules (``nn.Linear`` with its own forward, transformers' ``Conv1D``) whose
    weights are among ``params``; every chosen parameter must be such a weight or its bias."""
    mods: dict[str, nn.Module] = {}
    covered: set[str] = set()
    custom: list[str] = []
    for name, module in model.named_modules():
        w = f"{name}.weight" if name else "weight"
        if isinstance(module, nn.Linear) and not _plain_linear(module):
            if w in params:  # y is not x W^T + b: its gradient is not D^T X
                custom.append(f"{name!r} ({type(module).__name__} overrides forward)")
            continue
        if not (_plain_linear(module) or _is_conv1d(module)):
            continue
        if w in params:
            mods[name] = module
            covered.add(w)
            if module.bias is not None:
                covered.add(f"{name}.bias" if name else "bias")
    missing = [p for p in params if p not in covered]
    if missing:
        why = f" ({', '.join(custom[:4])})" if custom else ""
        raise ValueError(f"the ghost backend scores linear layers only: {missing[:4]} "
                         f"are not the weight or bias of a chosen nn.Linear / Conv1D{why} (use "
                         "backend='vmap', or params matching linear weights)")  # fmt: skip
    if not mods:
        raise ValueError("no linear layer among the chosen parameters")
    return mods


class GhostGradientExtractor:
    """Inputs and output gradients of linear layers (forward and tensor hooks), one batched
    backward of the sum of per-sample losses, as :class:`GhostLinear` per module name.

    Samples must not interact in the forward (true of LMs; not of batch norm). A module called
    several times in one forward has its calls concatenated along the position axis (the weight
    gradient is the sum over calls). A bias scored is part of its layer's block
    (``GhostLinear(bias=True)``), so a module is one DataInf layer (the vmap path scores each
    parameter as its own layer: with DataInf's per-layer damping the two differ slightly).
    """

    def __init__(self, model: nn.Module, modules: Mapping[str, nn.Module],
                 with_bias: Mapping[str, bool] | None = None) -> None:  # fmt: skip
        self.model = model
        self.modules = dict(modules)
        # A module's bias is scored with its weight when it has one (or as ``with_bias`` says:
        # the tracker scores a bias only when it is among the chosen parameters).
        self.with_bias = {k: m.bias is not None and (with_bias is None or bool(with_bias[k]))
                          for k, m in self.modules.items()}  # fmt: skip

    def probe_gradients(
        self, mean_grads: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """Probe gradients {module: weight [d_out, d_in] or (weight, bias)} from parameter
        gradients by name (as :func:`mean_gradient` returns)."""
        out: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}
        for name, module in self.modules.items():
            pre = f"{name}." if name else ""
            w = mean_grads[f"{pre}weight"]
            w = w.T if _is_conv1d(module) else w
            out[name] = (w, mean_grads[f"{pre}bias"]) if self.with_bias[name] else w
        return out

    def __call__(self, batch: Batch, *, chunk_size: int = 8,
                 loss_fn: LossFn = causal_lm_loss) -> dict[str, GhostLinear]:  # fmt: skip
        """{module name: GhostLinear} for the batch's samples (float32, on the model's device)."""
        ids, mask, labels = _check_batch(batch)
        xs: dict[str, list[torch.Tensor]] = {k: [] for k in self.modules}
        gs: dict[str, list[torch.Tensor]] = {k: [] for k in self.modules}
        for s in range(0, ids.shape[0], chunk_size):
            sl = slice(s, s + chunk_size)
            x, g = self._chunk(ids[sl], None if mask is None else mask[sl], labels[sl], loss_fn)
            for k in self.modules:
                xs[k].append(x[k])
                gs[k].append(g[k])
        return {k: GhostLinear(torch.cat(xs[k]), torch.cat(gs[k]), bias=self.with_bias[k])
                for k in self.modules}  # fmt: skip

    def _chunk(
        self, ids: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor, loss_fn: LossFn
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        calls_x: dict[str, list[torch.Tensor]] = {k: [] for k in self.modules}
        calls_g: dict[str, list[torch.Tensor | None]] = {k: [] for k in self.modules}
        handles = []

        def hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
            def fwd(_m: nn.Module, inputs: Any, output: Any) -> None:
                calls_x[name].append(inputs[0].detach().float())
                slot = len(calls_g[name])
                calls_g[name].append(None)

                def bwd(g: torch.Tensor) -> None:
                    calls_g[name][slot] = g.detach().float()

                output.register_hook(bwd)

            return fwd

        weights: list[torch.Tensor] = [m.weight for m in self.modules.values()]  # type: ignore[misc]
        flags = [w.requires_grad for w in weights]
        try:
            for w in weights:
                w.requires_grad_(True)
            for name, module in self.modules.items():
                handles.append(module.register_forward_hook(hook(name)))
            with _eval_mode(self.model), torch.enable_grad():
                loss = loss_fn(_forward(self.model, None, ids, mask), labels).sum()
                torch.autograd.grad(loss, weights, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
            for w, f in zip(weights, flags, strict=True):
                w.requires_grad_(f)
        xo: dict[str, torch.Tensor] = {}
        go: dict[str, torch.Tensor] = {}
        for name in self.modules:
            if not calls_x[name]:
                raise ValueError(f"module {name!r} was not called in the forward pass")
            grads = [torch.zeros(*x.shape[:-1], g_out, device=x.device) if g is None else g
                     for x, g, g_out in zip(calls_x[name], calls_g[name],
                                            [self._d_out(name)] * len(calls_x[name]),
                                            strict=True)]  # fmt: skip
            x3 = [x if x.dim() == 3 else x.reshape(x.shape[0], -1, x.shape[-1])
                  for x in calls_x[name]]  # fmt: skip
            g3 = [g if g.dim() == 3 else g.reshape(g.shape[0], -1, g.shape[-1]) for g in grads]
            xo[name], go[name] = torch.cat(x3, dim=1), torch.cat(g3, dim=1)
        return xo, go

    def _d_out(self, name: str) -> int:
        m = self.modules[name]
        w: torch.Tensor = m.weight  # type: ignore[assignment]
        return int(m.nf) if _is_conv1d(m) else int(w.shape[0])  # type: ignore[arg-type]
