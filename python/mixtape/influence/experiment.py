"""Does influence-driven mixing help? A small controlled experiment (``mixtape experiment
influence``, also ``benchmarks/influence_experiment.py``).

A next-token model (embeddings of the last two tokens -> one hidden layer -> logits) is trained
from scratch on a mixture of synthetic sources: ``target`` (an order-2 Markov chain), ``perturbed``
(the target's transitions with a share of them replaced), ``noise`` (uniform tokens) and
``unrelated`` (another order-2 chain). The probe set is held-out target text; the score is the
loss on a separate target test set. Arms, over several seeds, on the same data and the same
number of steps and batch size: uniform static weights, the tracker with DataInf, the tracker
with grad-dot, the DataInf run's time-averaged weights used as static weights, and the oracle
(target only). Reported: final target loss and the steps each arm needs to reach uniform's final
target loss (the test loss is evaluated every ``--eval-every`` steps, default every step), per
seed and summarised, and what the tracker scored besides training.

The tracker updates every step by default (``--interval 1``, first update after step 1): the
question is how many steps the mixture needs, the goal's yardstick is 1/5 of 300 steps, and an
update of this model costs little (it scores ``--samples`` rows per source and the 32-row probe,
about 6 examples per trained one; the cost is printed). An update every 10 steps spends the
first 10 steps, a sixth of that yardstick, on the uniform mixture before the first decision.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mixtape.influence.config import InfluenceConfig
from mixtape.influence.gradients import causal_lm_loss
from mixtape.influence.tracker import InfluenceTracker, examples_to_batch
from mixtape.influence.weights import NORMALIZATIONS

__all__ = ["main", "run_experiment"]

SOURCES = ("target", "perturbed", "noise", "unrelated")
ARMS = ("uniform", "datainf", "grad_dot", "time_avg", "oracle")


class BigramMLP(nn.Module):
    """Logits for token t + 1 from the embeddings of tokens t - 1 and t (an order-2 model)."""

    def __init__(self, vocab: int, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(2 * dim, hidden)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
        e = self.emb(input_ids)
        prev = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], dim=1)
        out: torch.Tensor = self.out(torch.tanh(self.hidden(torch.cat([prev, e], dim=-1))))
        return out


def _chain(rng: np.random.Generator, vocab: int, alpha: float) -> np.ndarray:
    """Order-2 transition table [V, V, V] with Dirichlet(alpha) rows (small alpha: peaked)."""
    return rng.dirichlet(np.full(vocab, alpha), size=(vocab, vocab))


def _sample(rng: np.random.Generator, table: np.ndarray | None, vocab: int, n: int,
            length: int) -> list[dict[str, Any]]:  # fmt: skip
    """n sequences of ``length`` tokens from the chain (None: uniform tokens)."""
    seqs = np.empty((n, length), dtype=np.int64)
    seqs[:, :2] = rng.integers(0, vocab, (n, 2))
    for t in range(2, length):
        if table is None:
            seqs[:, t] = rng.integers(0, vocab, n)
            continue
        p = table[seqs[:, t - 2], seqs[:, t - 1]]  # [n, V]
        u = rng.random((n, 1))
        seqs[:, t] = np.minimum((p.cumsum(axis=1) < u).sum(axis=1), vocab - 1)
    return [{"input_ids": s.tolist()} for s in seqs]


def make_data(seed: int, vocab: int, length: int, per_source: int,
              probe: int = 32) -> dict[str, Any]:  # fmt: skip
    """Sources, probe (``probe`` held-out target rows) and target test set for one seed. Rows
    beyond the first 32 of the probe come from their own generator, so the sources and the test
    set are the same whatever the probe size."""
    if probe < 1:
        raise ValueError(f"probe must be >= 1 rows, got {probe}")
    rng = np.random.default_rng(seed)
    target = _chain(rng, vocab, 0.1)
    perturbed = target.copy()
    swap = rng.random((vocab, vocab)) < 0.5  # half of the contexts get another distribution
    perturbed[swap] = _chain(rng, vocab, 0.1)[swap]
    unrelated = _chain(rng, vocab, 0.1)
    sources = {
        "target": _sample(rng, target, vocab, per_source, length),
        "perturbed": _sample(rng, perturbed, vocab, per_source, length),
        "noise": _sample(rng, None, vocab, per_source, length),
        "unrelated": _sample(rng, unrelated, vocab, per_source, length),
    }
    probe_rows = _sample(rng, target, vocab, 32, length)[:probe]
    test = examples_to_batch(_sample(rng, target, vocab, 512, length))
    if probe > 32:
        extra = np.random.default_rng([seed, 1])
        probe_rows += _sample(extra, target, vocab, probe - 32, length)
    return {"sources": sources, "probe": probe_rows, "test": test}


def _eval(model: nn.Module, test: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(causal_lm_loss(model(test["input_ids"]), test["labels"]).mean())


def train_arm(arm: str, seed: int, data: dict[str, Any], args: argparse.Namespace,
              static: dict[str, float] | None = None) -> dict[str, Any]:  # fmt: skip
    """One training run; returns the eval curve, and for tracker arms the weight history."""
    from mixtape.mixing import MixedDataset

    torch.manual_seed(seed)
    model = BigramMLP(args.vocab)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    if arm == "oracle":
        weights = {s: float(s == "target") for s in SOURCES}
    elif static is not None:
        weights = static
    else:
        weights = {s: 1.0 / len(SOURCES) for s in SOURCES}
    mixed = MixedDataset(data["sources"], weights, seed=seed, batch_size=args.batch_size)
    tracker = None
    if arm in ("datainf", "grad_dot"):
        cfg = InfluenceConfig(method=arm, update_interval=args.interval, warmup_steps=0,
                              samples_per_source=args.samples, learning_rate=args.eta,
                              smoothing=0.0, floor=args.floor, normalize=args.normalize,
                              seed=seed, batch_size=64)  # fmt: skip
        tracker = InfluenceTracker(cfg, mixed, model, probe=data["probe"])
        tracker.on_train_begin()
    curve: list[tuple[int, float]] = [(0, _eval(model, data["test"]))]
    used = np.zeros(len(SOURCES))
    stream = iter(mixed)  # re-plans from its position when the weights change
    train_s = tracker_s = 0.0
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        rows = [next(stream) for _ in range(args.batch_size)]
        names = [r["__source__"] for r in rows]
        used += np.array([names.count(s) for s in SOURCES], dtype=np.float64)
        batch = examples_to_batch(rows)
        opt.zero_grad()
        loss = causal_lm_loss(model(batch["input_ids"]), batch["labels"]).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        t1 = time.perf_counter()
        train_s += t1 - t0
        if tracker is not None:
            tracker.on_step_end(step, float(loss.detach()))
            tracker_s += time.perf_counter() - t1
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, _eval(model, data["test"])))
    out: dict[str, Any] = {"curve": curve, "final": curve[-1][1],
                           "examples_per_source": dict(zip(SOURCES, used.tolist(),
                                                           strict=True))}  # fmt: skip
    if tracker is not None:
        out["time_avg_weights"] = _time_average(tracker, args.steps)
        out["history"] = tracker.history
        updates = len(tracker.history)
        # What the tracker read besides training: every update scores samples_per_source rows
        # of each source and recomputes the probe gradient.
        out["tracker"] = {
            "updates": updates, "first_update": tracker.history[0]["step"] if updates else None,
            "scored_examples": updates * len(SOURCES) * args.samples,
            "probe_examples": (updates + 1) * len(data["probe"]),  # + on_train_begin
            "trained_examples": args.steps * args.batch_size,
            "seconds": tracker_s, "train_seconds": train_s,
        }  # fmt: skip
    return out


def _time_average(tracker: InfluenceTracker, steps: int) -> dict[str, float]:
    """The weights in force averaged over training steps (each update holds until the next)."""
    assert tracker.initial_weights is not None
    points = [(0, tracker.initial_weights)] + [(h["step"], h["weights"]) for h in tracker.history]
    acc = dict.fromkeys(SOURCES, 0.0)
    for i, (start, w) in enumerate(points):
        end = points[i + 1][0] if i + 1 < len(points) else steps
        for s in SOURCES:
            acc[s] += w[s] * (end - start)
    return {s: v / steps for s, v in acc.items()}


def _steps_to(curve: list[tuple[int, float]], level: float) -> int | None:
    return next((s for s, v in curve if v <= level), None)


def run_experiment(args: argparse.Namespace) -> dict[str, Any]:
    """All arms over all seeds; a json-able summary."""
    torch.set_num_threads(1)
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in ARMS}
    for seed in range(args.seeds):
        data = make_data(1000 + seed, args.vocab, args.length, args.per_source, args.probe)
        for arm in ("uniform", "datainf", "grad_dot", "oracle"):
            runs[arm].append(train_arm(arm, seed, data, args))
        runs["time_avg"].append(train_arm("time_avg", seed, data, args,
                                          static=runs["datainf"][-1]["time_avg_weights"]))
    table: list[dict[str, Any]] = []
    for arm in ARMS:
        finals = [r["final"] for r in runs[arm]]
        reach = [_steps_to(r["curve"], u["final"]) for r, u in zip(runs[arm], runs["uniform"],
                                                                   strict=True)]  # fmt: skip
        reached = [x for x in reach if x is not None]
        table.append({
            "arm": arm, "final_loss_mean": float(np.mean(finals)),
            "final_loss_std": float(np.std(finals)), "final_loss": finals,
            "steps_to_uniform_final": reach,
            "steps_to_uniform_final_median": float(np.median(reached)) if reached else None,
            "reached": f"{len(reached)}/{len(reach)}",
        })  # fmt: skip
    by = {row["arm"]: row for row in table}
    ratio = [(d / args.steps) if d is not None else None
             for d in by["datainf"]["steps_to_uniform_final"]]  # fmt: skip
    oracle = [(d / args.steps) if d is not None else None
              for d in by["oracle"]["steps_to_uniform_final"]]  # fmt: skip
    goal_speed = all(r is not None and r <= 0.2 for r in ratio)
    margin = [d - t for d, t in zip(by["datainf"]["final_loss"], by["time_avg"]["final_loss"],
                                    strict=True)]  # fmt: skip
    goal_static = all(m < 0 for m in margin)
    avg_w = {s: float(np.mean([r["time_avg_weights"][s] for r in runs["datainf"]]))
             for s in SOURCES}  # fmt: skip
    cost = {arm: {k: float(np.mean([r["tracker"][k] for r in runs[arm]]))
                  for k in ("updates", "scored_examples", "probe_examples", "trained_examples",
                            "seconds", "train_seconds")}
            for arm in ("datainf", "grad_dot")}  # fmt: skip
    return {"settings": vars(args), "table": table,
            "datainf_time_avg_weights": avg_w,
            "time_avg_weights": [r["time_avg_weights"] for r in runs["datainf"]],
            "tracker_cost": cost,
            "goal": {"datainf_reaches_uniform_final_within_1_5_of_steps_every_seed": goal_speed,
                     "datainf_fraction_of_steps": ratio,
                     "oracle_fraction_of_steps": oracle,
                     "datainf_final_below_time_avg_every_seed": goal_static,
                     "datainf_minus_time_avg_final": margin},
            "curves": {a: [r["curve"] for r in runs[a]] for a in ARMS}}  # fmt: skip


def _print(summary: dict[str, Any]) -> None:
    steps = summary["settings"]["steps"]
    table = summary["table"]
    print(f"{'arm':<10} {'final target loss':>20} {'steps to uniform final (median)':>34} "
          f"{'reached':>8}")  # fmt: skip
    for row in table:
        med = row["steps_to_uniform_final_median"]
        med_s = "-" if med is None else f"{med:.0f} ({med / steps:.2f} of {steps})"
        print(f"{row['arm']:<10} {row['final_loss_mean']:>12.4f} ± {row['final_loss_std']:.4f}"
              f" {med_s:>34} {row['reached']:>8}")  # fmt: skip
    print("per seed: final target loss / steps to uniform's final loss")
    print(f"{'seed':<5}" + "".join(f"{row['arm']:>17}" for row in table))
    for i in range(len(table[0]["final_loss"])):
        cells = []
        for row in table:
            reach = row["steps_to_uniform_final"][i]
            cells.append(f"{row['final_loss'][i]:.4f} / {'-' if reach is None else reach:>3}")
        print(f"{i:<5}" + "".join(f"{c:>17}" for c in cells))
    w = summary["datainf_time_avg_weights"]
    print("DataInf time-averaged weights: " + ", ".join(f"{k}={v:.3f}" for k, v in w.items()))
    for arm, c in summary["tracker_cost"].items():
        print(f"{arm} tracker: {c['updates']:.0f} updates, scored "
              f"{(c['scored_examples'] + c['probe_examples']) / c['trained_examples']:.1f} "
              f"examples per trained one, {c['seconds']:.1f} s vs {c['train_seconds']:.1f} s "
              "training (per run)")  # fmt: skip
    g = summary["goal"]

    def fractions(xs: list[float | None]) -> str:
        return "[" + ", ".join("-" if x is None else f"{x:.3f}" for x in xs) + "]"

    print(f"goal 1 (DataInf reaches uniform's final loss in <= 1/5 of the steps, every seed): "
          f"{'met' if g['datainf_reaches_uniform_final_within_1_5_of_steps_every_seed'] else 'NOT met'}"  # noqa: E501
          f" (DataInf {fractions(g['datainf_fraction_of_steps'])}, oracle "
          f"{fractions(g['oracle_fraction_of_steps'])})")
    print(f"goal 2 (DataInf ends below the time-averaged static mix, every seed): "
          f"{'met' if g['datainf_final_below_time_avg_every_seed'] else 'NOT met'}"
          f" (DataInf - time_avg: {', '.join(f'{m:+.4f}' for m in g['datainf_minus_time_avg_final'])})")  # noqa: E501


def _plot(summary: dict[str, Any], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG written"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, curves in summary["curves"].items():
        steps = [s for s, _ in curves[0]]
        mean = np.mean([[v for _, v in c] for c in curves], axis=0)
        ax.plot(steps, mean, label=arm)
    total = summary["settings"]["steps"]
    by = {row["arm"]: row for row in summary["table"]}
    ax.axhline(by["uniform"]["final_loss_mean"], color="gray", ls=":", lw=1,
               label="uniform's final loss")  # fmt: skip
    ax.axvline(total / 5, color="gray", ls="--", lw=1, label="1/5 of the steps")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"target test loss (mean of {len(curves)} seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"wrote {path}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mixtape experiment influence", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--vocab", type=int, default=16)
    p.add_argument("--length", type=int, default=24)
    p.add_argument("--per-source", type=int, default=2000)
    p.add_argument("--probe", type=int, default=32, help="held-out target rows in the probe set")
    p.add_argument("--interval", type=int, default=1,
                   help="steps between influence updates (the first after this many)")
    p.add_argument("--samples", type=int, default=16, help="samples per source per update")
    p.add_argument("--eta", type=float, default=1.0, help="weight learning rate")
    p.add_argument("--floor", type=float, default=0.01)
    p.add_argument("--normalize", default="max_dev", choices=NORMALIZATIONS,
                   help="how scores are scaled before the weight step (see "
                        "mixtape.influence.weights)")
    p.add_argument("--eval-every", type=int, default=1, help="steps between test-loss evaluations")
    p.add_argument("--out", type=Path, default=Path("influence_experiment"),
                   help="writes OUT.json and OUT.png")  # fmt: skip
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    summary = run_experiment(args)
    summary["seconds"] = time.perf_counter() - t0
    _print(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary["settings"]["out"] = str(args.out)
    Path(f"{args.out}.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}.json; {_plot(summary, Path(f'{args.out}.png'))}; "
          f"{summary['seconds']:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
