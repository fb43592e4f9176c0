"""The influence-mixing experiment (python/mixtape/influence/experiment.py): every arm on the same
data and budget, the tracker's schedule, the time average, the summary's per-seed numbers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from mixtape.influence import experiment as E


def _args(**kw: object) -> argparse.Namespace:
    base = dict(seeds=1, steps=12, batch_size=8, lr=1e-2, vocab=8, length=10, per_source=60,
                probe=32, interval=3, samples=4, eta=1.0, floor=0.01, eval_every=5,
                normalize="max_dev")  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.fixture(scope="module")
def data() -> dict[str, object]:
    return E.make_data(7, 8, 10, 60)


def test_arms_share_data_and_budget(data: dict[str, object]) -> None:
    args = _args()
    runs = {arm: E.train_arm(arm, 0, data, args) for arm in ("uniform", "datainf", "oracle")}
    for arm, run in runs.items():
        assert sum(run["examples_per_source"].values()) == args.steps * args.batch_size, arm
        # evaluated at 0, every eval_every steps and at the last step (12 is not a multiple of 5)
        assert [s for s, _ in run["curve"]] == [0, 5, 10, 12]
        assert run["final"] == run["curve"][-1][1]
        assert run["curve"][0][1] == runs["uniform"]["curve"][0][1]  # same init, same test set
    assert runs["oracle"]["examples_per_source"]["target"] == args.steps * args.batch_size
    t = runs["datainf"]["tracker"]
    assert t["updates"] == 4 and t["first_update"] == 3  # steps 3, 6, 9, 12
    assert [h["step"] for h in runs["datainf"]["history"]] == [3, 6, 9, 12]
    assert t["scored_examples"] == 4 * len(E.SOURCES) * args.samples
    assert t["probe_examples"] == 5 * 32  # at train begin and at every update
    assert t["trained_examples"] == args.steps * args.batch_size


def test_time_average_weighs_each_update_by_the_steps_it_held(data: dict[str, object]) -> None:
    args = _args(interval=5)
    run = E.train_arm("datainf", 0, data, args)
    hist = run["history"]
    assert [h["step"] for h in hist] == [5, 10]
    want = {s: (5 * 0.25 + 5 * hist[0]["weights"][s] + 2 * hist[1]["weights"][s]) / 12
            for s in E.SOURCES}  # fmt: skip
    assert run["time_avg_weights"] == pytest.approx(want, rel=1e-12)
    assert sum(run["time_avg_weights"].values()) == pytest.approx(1.0)
    # The static arm trains on exactly those weights.
    static = E.train_arm("time_avg", 0, data, args, static=run["time_avg_weights"])
    used = np.array([static["examples_per_source"][s] for s in E.SOURCES])
    w = np.array([want[s] for s in E.SOURCES])
    assert np.abs(used / used.sum() - w).max() <= 1.0 / used.sum() + 1e-12


def test_probe_size_leaves_sources_and_test_set_alone() -> None:
    a = E.make_data(3, 8, 10, 20)
    b = E.make_data(3, 8, 10, 20, probe=50)
    c = E.make_data(3, 8, 10, 20, probe=5)
    assert len(a["probe"]) == 32 and len(b["probe"]) == 50 and len(c["probe"]) == 5
    assert b["probe"][:32] == a["probe"] and c["probe"] == a["probe"][:5]
    for other in (b, c):
        assert other["sources"] == a["sources"]
        for k, v in a["test"].items():
            assert np.array_equal(other["test"][k].numpy(), v.numpy())
    with pytest.raises(ValueError, match="probe must be >= 1 rows, got 0"):
        E.make_data(3, 8, 10, 20, probe=0)


def test_steps_to_reach() -> None:
    curve = [(0, 3.0), (5, 2.5), (10, 2.0), (15, 2.1)]
    assert E._steps_to(curve, 2.5) == 5
    assert E._steps_to(curve, 2.05) == 10
    assert E._steps_to(curve, 1.0) is None


def test_summary_has_per_seed_goals_and_cost(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "exp"
    assert E.main(["--seeds", "2", "--steps", "10", "--per-source", "60", "--vocab", "8",
                   "--length", "10", "--interval", "2", "--out", str(out)]) == 0  # fmt: skip
    s = json.loads(Path(f"{out}.json").read_text())
    by = {row["arm"]: row for row in s["table"]}
    g = s["goal"]
    assert len(g["datainf_fraction_of_steps"]) == len(g["oracle_fraction_of_steps"]) == 2
    margin = [d - t for d, t in zip(by["datainf"]["final_loss"], by["time_avg"]["final_loss"],
                                    strict=True)]  # fmt: skip
    assert g["datainf_minus_time_avg_final"] == pytest.approx(margin)
    assert g["datainf_final_below_time_avg_every_seed"] == all(m < 0 for m in margin)
    for f, reach in zip(g["datainf_fraction_of_steps"], by["datainf"]["steps_to_uniform_final"],
                        strict=True):  # fmt: skip
        assert f == (None if reach is None else reach / 10)
    assert len(s["time_avg_weights"]) == 2
    assert s["tracker_cost"]["datainf"]["updates"] == 5
    assert s["settings"]["normalize"] == "max_dev" and s["settings"]["eval_every"] == 1
    printed = capsys.readouterr().out
    assert "per seed" in printed and "examples per trained one" in printed
