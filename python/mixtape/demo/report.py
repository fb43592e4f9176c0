"""The demo's report: speed, realised mixture against the weights in force, per-source loss (JSON),
and a plot of them over steps (PNG, matplotlib's Agg backend)."""

from __future__ import annotations

import dataclasses
import itertools
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["build_report", "write_plot"]

REPORT_VERSION = 1


def _share(counts: npt.NDArray[np.float64]) -> list[float]:
    total = float(counts.sum())
    return [float(c) / total if total else 0.0 for c in counts]


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def build_report(opts: Any, cfg: Any, trainer: Any, names: Sequence[str],
                 timings: Mapping[str, float], mask_diff: float,
                 resume: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The JSON report of a finished run (per-step series and their summaries)."""
    import torch
    import transformers

    import mixtape

    recs = trainer.records
    steps = len(recs)
    lc = cfg.resolved().loader
    tokens = np.asarray([r.source_tokens for r in recs], dtype=np.float64)  # [steps, sources]
    docs = np.asarray([r.source_docs for r in recs], dtype=np.float64)
    lsum = np.asarray([r.source_loss_sum for r in recs], dtype=np.float64)
    lcnt = np.asarray([r.source_loss_tokens for r in recs], dtype=np.float64)
    wait = np.asarray([r.wait_s for r in recs])
    compute = np.asarray([r.compute_s for r in recs])
    weights = np.asarray([trainer.driver.weights_at(s) for s in range(steps)])
    capacity = int(lc.batch_size) * int(lc.max_length)
    # Speed: the first batch includes worker start-up and the first plans; reported apart.
    steady = slice(1, None) if steps > 1 else slice(0, None)
    step_time = float((wait[steady] + compute[steady]).sum())
    trained = float(tokens[steady].sum())
    speed = {
        "tokens_per_s": trained / step_time if step_time else float("nan"),
        "steps_per_s": (steps - (1 if steps > 1 else 0)) / step_time if step_time else 0.0,
        "loader_share": float(wait[steady].sum()) / step_time if step_time else float("nan"),
        "first_batch_wait_s": float(wait[0]) if steps else float("nan"),
        "mean_wait_ms": 1e3 * float(wait[steady].mean()) if steps else float("nan"),
        "mean_compute_ms": 1e3 * float(compute[steady].mean()) if steps else float("nan"),
        "padding_fraction": 1.0 - float(tokens.sum()) / (capacity * steps) if steps else 0.0,
        "note": "tokens/s counts non-padding tokens over wait + compute of steps 1.. (step 0 "
                "includes worker start-up); loader_share = time waiting for the next batch / "
                "(that + forward, backward, optimizer)",
    }  # fmt: skip
    # Mixture: windows of constant weights in force (updates land at exact batches).
    windows = []
    bounds = [e for e, _ in trainer.driver.in_force if e < steps] + [steps]
    for a, b in itertools.pairwise(bounds):
        if b <= a:
            continue
        windows.append({"start": a, "end": b, "weights": weights[a].tolist(),
                        "documents": int(docs[a:b].sum()),
                        "doc_share": _share(docs[a:b].sum(0)),
                        "token_share": _share(tokens[a:b].sum(0))})  # fmt: skip
    losses = [r.loss for r in recs]
    with np.errstate(invalid="ignore", divide="ignore"):
        src_loss = np.where(lcnt > 0, lsum / np.maximum(lcnt, 1), np.nan)
    k = min(10, steps)

    def window_loss(rows: slice) -> list[float | None]:
        c = lcnt[rows].sum(0)
        return [float(s / n) if n else None for s, n in zip(lsum[rows].sum(0), c,
                                                            strict=True)]  # None: no tokens

    opts_d = dataclasses.asdict(opts)
    influence: dict[str, Any] | None = None
    tracker = getattr(trainer, "tracker", None)
    if tracker is not None:
        from mixtape.demo.run import PROBE_DOCS, probe_source

        train_s = float(timings.get("train_s", float("nan")))
        hist = tracker.history
        influence = {
            "method": tracker.config.method, "parameters": list(tracker.params),
            "backend": tracker.backend,
            "update_interval": tracker.config.update_interval,
            "warmup_steps": tracker.config.warmup_steps,
            "samples_per_source": tracker.config.samples_per_source,
            "probe": f"the last {PROBE_DOCS} {probe_source(cfg)!r} documents, held out of "
                     f"training",
            "schedule_until": int(hist[0]["applied_at"]) if hist else None,
            "initial_weights": tracker.initial_weights, "history": hist,
            "overhead_s": float(trainer.influence_s),
            "update_s": [float(x) for x in getattr(trainer, "influence_update_s", [])],
            "per_interval_share": _interval_share(trainer, speed),
            "overhead_share": float(trainer.influence_s) / train_s if train_s else float("nan"),
            "note": "overhead_share: time inside the tracker (on_train_begin + on_step_end) / "
                    "training loop time; per_interval_share: mean update time / (that + "
                    "update_interval mean steps); history[i].applied_at is the batch its "
                    "weights land at; the schedule drives the weights before schedule_until "
                    "(the first update)",
        }  # fmt: skip
    return {
        "influence": influence,
        "version": REPORT_VERSION,
        "sources": list(names),
        "steps": steps,
        "options": opts_d,
        "config": {"batch_size": int(lc.batch_size), "max_length": int(lc.max_length),
                   "num_workers": int(lc.num_workers), "horizon": int(lc.horizon),
                   "seed": int(lc.seed), "packing": lc.packing,
                   "attention": dict(lc.collate_kwargs).get("attention"),
                   "mixture_mode": cfg.mixture.mode,
                   "schedule_type": cfg.mixture.weight_schedule_type},
        "model": {"type": "GPT2LMHeadModel", "n_layer": opts.n_layer, "n_embd": opts.n_embd,
                  "n_head": opts.n_head, "vocab_size": int(trainer.model.config.vocab_size),
                  "parameters": sum(p.numel() for p in trainer.model.parameters()),
                  "attn_implementation": trainer.model.config._attn_implementation},
        "timings": dict(timings),
        "speed": speed,
        "packed_mask_max_abs_diff": mask_diff,
        "resume": dict(resume),
        "loss": {"first10": _mean(losses[:k]), "last10": _mean(losses[-k:]),
                 "source_first10": window_loss(slice(0, k)),
                 "source_last10": window_loss(slice(steps - k, steps))},
        "mixture": {"windows": windows,
                    "weight_updates": [[e, list(w)] for e, w in trainer.driver.in_force],
                    "note": "weights are per document (mixture position); doc_share counts "
                            "documents starting in each step's rows; token_share counts their "
                            "tokens (long documents weigh more)"},
        "series": {"loss": losses, "weights": weights.tolist(),
                   "source_loss": [[None if np.isnan(x) else float(x) for x in row]
                                   for row in src_loss],
                   "source_tokens": tokens.astype(np.int64).tolist(),
                   "source_docs": docs.astype(np.int64).tolist(),
                   "wait_s": wait.tolist(), "compute_s": compute.tolist()},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__,
                        "mixtape": mixtape.__version__ if hasattr(mixtape, "__version__")
                        else None, "torch_threads": torch.get_num_threads()},
    }  # fmt: skip


def _interval_share(trainer: Any, speed: Mapping[str, Any]) -> float | None:
    """Mean update time / (that + update_interval mean steps): the tracker's steady share."""
    ups = list(getattr(trainer, "influence_update_s", []))
    sps = float(speed.get("steps_per_s") or 0.0)
    if not ups or sps <= 0:
        return None
    mean = sum(ups) / len(ups)
    return float(mean / (mean + trainer.tracker.config.update_interval / sps))


def _rolling(x: npt.NDArray[np.float64], n: int) -> npt.NDArray[np.float64]:
    """Trailing mean over ``n`` rows (fewer at the start), per column."""
    c = np.cumsum(np.vstack([np.zeros((1, *x.shape[1:])), x]), axis=0)
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(idx - n, 0)
    width = (idx - lo).reshape(-1, *([1] * (x.ndim - 1)))
    out: npt.NDArray[np.float64] = (c[idx] - c[lo]) / width
    return out


def write_plot(report: Mapping[str, Any], path: str | Path) -> None:
    """Weights in force, realised document and token shares, and per-source loss over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = report["sources"]
    s = report["series"]
    steps = np.arange(report["steps"])
    w = np.asarray(s["weights"], dtype=np.float64)
    n = max(1, min(20, len(steps) // 10))
    docs = _rolling(np.asarray(s["source_docs"], dtype=np.float64), n)
    toks = _rolling(np.asarray(s["source_tokens"], dtype=np.float64), n)
    doc_share = docs / np.maximum(docs.sum(1, keepdims=True), 1e-12)
    tok_share = toks / np.maximum(toks.sum(1, keepdims=True), 1e-12)
    sl = np.asarray([[np.nan if x is None else x for x in row] for row in s["source_loss"]],
                    dtype=np.float64).reshape(len(steps), len(names))  # fmt: skip
    fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax = axes[0]
    for i, name in enumerate(names):
        c = colors[i % len(colors)]
        ax.plot(steps, w[:, i], color=c, lw=2, label=f"{name} weight")
        ax.plot(steps, doc_share[:, i], color=c, ls="--", label=f"{name} documents")
    ax.set_ylabel("share of documents")
    title = f"mixture: weights in force (solid) vs realised ({n}-step mean, dashed)"
    infl = report.get("influence")
    if infl is not None:
        for h in infl["history"]:
            ax.axvline(h["applied_at"], color="0.6", lw=0.8, ls=":")
        title = (f"weights in force (solid): the schedule, then the influence tracker's choice "
                 f"({infl['method']}, every {infl['update_interval']} steps)\nfrom each dotted "
                 f"line, vs realised ({n}-step mean, dashed)")  # fmt: skip
        for h in infl["history"]:
            ax.annotate(f"tracker, step {h['step']}", (h["applied_at"], 0.25),
                        xytext=(-3, 0), textcoords="offset points", rotation=90, fontsize=7,
                        color="0.4", ha="right", va="center")  # fmt: skip
    ax.set_title(title, fontsize=9 if infl is not None else None)
    if infl is not None:  # where the tracker's weights leave room
        ax.legend(ncol=3, fontsize=8, loc="center right", bbox_to_anchor=(1.0, 0.58))
    else:
        ax.legend(ncol=3, fontsize=8)
    ax.set_ylim(0, 1)
    ax = axes[1]
    for i, name in enumerate(names):
        ax.plot(steps, tok_share[:, i], color=colors[i % len(colors)], label=name)
    ax.set_ylabel("share of tokens")
    ax.set_title(f"trained tokens per source ({n}-step mean)")
    ax.legend(ncol=3, fontsize=8)
    ax.set_ylim(0, 1)
    ax = axes[2]
    ax.plot(steps, s["loss"], color="0.5", lw=1, label="all")
    for i, name in enumerate(names):
        col = sl[:, i]
        ok = ~np.isnan(col)
        if ok.any():
            sm = _rolling(np.where(ok, col, 0.0)[:, None], n)[:, 0] / np.maximum(
                _rolling(ok.astype(np.float64)[:, None], n)[:, 0], 1e-12)
            ax.plot(steps, sm, color=colors[i % len(colors)], label=name)
    ax.set_ylabel("loss (nats / token)")
    ax.set_xlabel("optimizer step")
    ax.set_title("per-source loss")
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
