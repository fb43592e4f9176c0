"""Where one influence-tracker update of ``mixtape demo`` spends its time, and the per-sample
gradient backends side by side (same model, same drawn documents, same process, alternating).

Builds the demo's trainer (default config and sizes), trains ``--steps`` steps so the weights are
not the initial ones (their mean step time, first step excluded, is the unit), then times: the
probe gradient, drawing and batching the documents, per-sample gradients of the last block with
``hooks`` and ``vmap``, and the DataInf kernel; the best of ``--repeat`` runs each. Checks both
backends give the same scores. ``python benchmarks/tracker_update.py [--steps 20] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any


def _best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="training steps before timing")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement (best kept)")
    args = p.parse_args(argv)
    import torch

    from mixtape.demo import run
    from mixtape.influence.gradients import per_sample_gradients

    warnings.filterwarnings("ignore", message=".*performance drop.*")
    opts = run.DemoOptions(progress=False, resume_check=False).finished()
    torch.set_num_threads(int(opts.threads or 1))
    cfg = run.load_config(opts)
    opts = run.resolve_influence(dataclass_replace(opts, influence=True), cfg)
    lc = cfg.resolved().loader
    datasets, tok = run.make_datasets(opts, int(lc.max_length), int(lc.seed), {})
    datasets, probe = run.split_probe(datasets, run.probe_source(cfg))
    trainer = run.make_trainer(opts, cfg, datasets, tok.get_vocab_size(), probe)
    trainer.train(args.steps)
    steady = trainer.records[1:]  # the first batch waits for the worker to start
    step_s = sum(r.wait_s + r.compute_s for r in steady) / len(steady)
    tr = trainer.tracker
    model = trainer.model.eval()
    rows: list[tuple[str, float]] = []
    rows.append(("probe gradient", _best(tr._refresh_probe, args.repeat)[0]))
    s, (examples, _) = _best(lambda: tr._draw(args.steps, 0), args.repeat)
    rows.append(("draw documents", s))
    s, batch = _best(lambda: tr._batch(examples, "drawn"), args.repeat)
    rows.append(("batch", s))
    grads: dict[str, Any] = {}
    times = {"hooks": float("inf"), "vmap": float("inf")}
    for _ in range(args.repeat):  # alternating, so load changes hit both
        for backend in times:
            t = time.perf_counter()
            grads[backend] = per_sample_gradients(model, batch, tr.params, backend=backend,
                                                  chunk_size=tr.config.batch_size)  # fmt: skip
            times[backend] = min(times[backend], time.perf_counter() - t)
    rows += [(f"per-sample gradients, {b}", s) for b, s in times.items()]
    s, score_h = _best(lambda: tr.calculator.compute_influence(grads["hooks"], tr.probe_grads),
                       args.repeat)  # fmt: skip
    rows.append(("DataInf kernel", s))
    score_v = tr.calculator.compute_influence(grads["vmap"], tr.probe_grads)
    rel = float((score_h - score_v).abs().max() / score_v.abs().max())
    n, length = batch["input_ids"].shape
    print(f"demo tracker update: {n} documents (padded to {length}, "
          f"{int(batch['attention_mask'].sum())} tokens), {len(tr.params)} parameter tensors, "
          f"{torch.get_num_threads()} thread(s); mean training step {step_s * 1e3:.0f} ms")
    for name, sec in rows:
        print(f"  {name:28s} {sec * 1e3:8.0f} ms  ({sec / step_s:5.2f} steps)")
    update = rows[0][1] + rows[1][1] + rows[2][1] + times["hooks"] + rows[-1][1]
    print(f"  update with hooks            {update * 1e3:8.0f} ms = {update / step_s:.2f} steps "
          f"= {update / (100 * step_s):.1%} of 100 steps")
    print(f"  vmap / hooks: {times['vmap'] / times['hooks']:.2f}x; scores max rel diff {rel:.1e}")
    return 0


def dataclass_replace(obj: Any, **kw: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **kw)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
