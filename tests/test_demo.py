"""``mixtape demo``: the CLI end to end (--quick; the influence tracker on, as configured, and
--no-influence), its report and plot, the fresh-process resume check, determinism, the packed sdpa
mask against per-document loss, and the schedule driver."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mixtape import cli
from mixtape.demo import run

QUICK = ["--quick", "--steps", "12", "--no-progress"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    """The schedule alone (--no-influence)."""
    out = tmp_path_factory.mktemp("demo")
    code = cli.main(["demo", *QUICK, "--no-influence", "--out", str(out)])
    return code, out


def test_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--steps", "--workers", "--config", "--out", "--seed", "--batch-size",
                "--max-length", "--quick", "--influence", "--no-influence",
                "--influence-interval", "--influence-warmup"):  # fmt: skip
        assert opt in out


@pytest.mark.slow
def test_quick_run_reports_and_resumes(quick_run: tuple[int, Path]) -> None:
    code, out = quick_run
    assert code == 0
    text = (out / "report.json").read_text()  # standard JSON: no NaN / Infinity tokens
    json.loads(text, parse_constant=lambda c: pytest.fail(f"report.json holds {c}"))
    report = json.loads(text)
    assert (out / "demo.png").stat().st_size > 10_000
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["sources"] == ["code", "prose", "arithmetic"]
    assert report["steps"] == 12
    assert report["config"]["batch_size"] == 4 and report["config"]["max_length"] == 64
    assert report["model"]["n_layer"] == 2 and report["model"]["n_embd"] == 128
    assert report["model"]["attn_implementation"] == "sdpa"
    sp = report["speed"]
    assert sp["tokens_per_s"] > 0 and 0 <= sp["loader_share"] <= 1
    assert 0 <= sp["padding_fraction"] < 1
    resume = report["resume"]
    assert resume["checked"] and resume["passed"], resume["detail"]
    assert resume["start"] == 6 and resume["steps"] == 6
    assert resume["resumed"] == resume["expected"] == report["series"]["loss"][6:12]
    assert resume["workers"] != report["config"]["num_workers"]  # another worker count
    assert report["packed_mask_max_abs_diff"] < 1e-4
    s = report["series"]
    for key in ("loss", "weights", "source_loss", "source_tokens", "source_docs"):
        assert len(s[key]) == 12
    assert all(math.isfinite(x) for x in s["loss"])
    for row in s["weights"]:
        assert sum(row) == pytest.approx(1.0)
    # The mixture changes mid-run: code-heavy first, prose-heavy last (by the config).
    first, last = s["weights"][0], s["weights"][-1]
    assert first[0] > first[1] and last[1] > last[0]
    # Token counts add up to the trained rows (no padding counted).
    cap = 4 * 64
    assert all(0 < sum(t) <= cap for t in s["source_tokens"])
    windows = report["mixture"]["windows"]
    assert windows[0]["start"] == 0 and windows[-1]["end"] == 12
    assert sum(w["documents"] for w in windows) == sum(map(sum, s["source_docs"]))
    assert set(report["timings"]) >= {"train_s", "total_s", "tokenizer_s", "resume_check_s"}
    assert report["influence"] is None  # --no-influence: the schedule alone, to the end


@pytest.mark.slow
def test_default_run_hands_the_weights_from_schedule_to_tracker(tmp_path: Path) -> None:
    """By default (the config's influence section, its steps scaled by 16 / 300: warmup 3,
    interval 5) the schedule moves the mixture first, then the tracker's updates take over; the
    fresh-process resume covers the tracker's history."""
    code = cli.main(["demo", "--quick", "--steps", "16", "--no-progress",
                     "--out", str(tmp_path)])  # fmt: skip
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 0
    infl = report["influence"]
    assert infl["method"] == "datainf" and infl["backend"] == "hooks"
    assert (infl["warmup_steps"], infl["update_interval"]) == (3, 5)
    assert infl["parameters"] and all(".h.1." in p for p in infl["parameters"])
    hist = infl["history"]
    assert [h["step"] for h in hist] == [8, 13]  # 3 + k * 5, none at the last step
    start = [infl["initial_weights"][n] for n in report["sources"]]
    assert start == pytest.approx([0.7, 0.15, 0.15])  # the schedule's step-0 mixture
    w = report["series"]["weights"]
    at = hist[0]["applied_at"]
    assert infl["schedule_until"] == at and hist[0]["step"] <= at < 16
    # Before the tracker: the schedule's code-heavy start and its move to prose-heavy (steps
    # 40 -> 120 of 300, i.e. 2 -> 6 here), all before the first update lands.
    assert w[0] == pytest.approx(start)
    assert w[at - 1] == pytest.approx([0.15, 0.7, 0.15])
    # From the landing batch on, the weights in force are the tracker's.
    first = [hist[0]["weights"][n] for n in report["sources"]]
    assert w[at] == pytest.approx(first)
    assert max(abs(a - b) for a, b in zip(first, w[at - 1], strict=True)) > 1e-3
    # The first update steps from the schedule's weights (not the starting mixture).
    from mixtape.influence import MixtureWeightCalculator

    names = report["sources"]
    calc = MixtureWeightCalculator(dict(zip(names, start, strict=True)), smoothing=0.0)
    base = dict(zip(names, w[at - 1], strict=True))
    helpful = np.asarray([hist[0]["scores"][n] for n in names])
    again = calc.get_weight_update(base, -helpful, np.arange(len(names))).weights
    assert isinstance(again, dict)
    assert [again[n] for n in names] == pytest.approx(first)
    second = [hist[1]["weights"][n] for n in report["sources"]]
    assert w[hist[1]["applied_at"]] == pytest.approx(second) and w[-1] == pytest.approx(second)
    assert 0 < infl["overhead_share"] < 1 and infl["overhead_s"] > 0
    assert report["timings"]["influence_s"] == infl["overhead_s"]
    assert len(infl["update_s"]) == 2 and 0 < sum(infl["update_s"]) < infl["overhead_s"]
    assert 0 < infl["per_interval_share"] < 1
    resume = report["resume"]
    assert resume["checked"] and resume["passed"], resume["detail"]
    assert "tracker" in resume["detail"]
    assert (tmp_path / "demo.png").stat().st_size > 10_000


@pytest.mark.slow
def test_resume_carries_the_tracker_weights_below_the_floor(tmp_path: Path) -> None:
    """With a floor, the weights an update carries to the next sink below it (floor_depth): the
    checkpoint holds them and the fresh process (with a loader worker) continues bit for bit,
    the tracker's second update included."""
    import torch

    text = run.default_config_path().read_text()
    cfg = tmp_path / "demo.yaml"
    floored = text.replace("  update_interval: 100\n", "  update_interval: 100\n  floor: 0.3\n")
    cfg.write_text(floored)
    code = cli.main(["demo", "--quick", "--steps", "16", "--no-progress", "--config", str(cfg),
                     "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    resume = report["resume"]
    assert resume["workers"] == 1 and resume["passed"], resume["detail"]
    assert [h["step"] for h in report["influence"]["history"]] == [8, 13]
    state = torch.load(tmp_path / "out" / "checkpoint" / "state.pt", weights_only=False)
    carried = state["tracker"]["carried"]
    assert carried is not None and min(carried.values()) < 0.3  # below the floor: in the state
    assert min(state["tracker"]["weights"].values()) == pytest.approx(0.3)


def test_influence_settings_come_from_the_config_or_the_command_line() -> None:
    cfg = run.load_config(run.DemoOptions())
    assert cfg.influence is not None and cfg.influence.enabled and cfg.influence.probe == "prose"
    o = run.resolve_influence(run.DemoOptions(), cfg)
    assert (o.influence, o.influence_interval, o.influence_warmup) == (True, 100, 60)
    o = run.resolve_influence(run.DemoOptions(steps=30), cfg)  # scaled by 30 / 300
    assert (o.influence_interval, o.influence_warmup) == (10, 6)
    o = run.resolve_influence(run.DemoOptions(steps=30, influence_interval=7,
                                              influence_warmup=0), cfg)  # fmt: skip
    assert (o.influence_interval, o.influence_warmup) == (7, 0)
    assert run.resolve_influence(run.DemoOptions(influence=False), cfg).influence is False
    assert run.probe_source(cfg) == "prose"


def test_probe_is_held_out_of_training() -> None:
    import datasets

    docs = {"prose": datasets.Dataset.from_dict({"input_ids": [[i, 0] for i in range(100)]}),
            "code": datasets.Dataset.from_dict({"input_ids": [[1, 0]] * 5})}  # fmt: skip
    train, probe = run.split_probe(docs)
    assert len(probe) == run.PROBE_DOCS == 32
    assert run.split_probe(docs, "prose")[1] == probe
    assert [p["input_ids"][0] for p in probe] == list(range(68, 100))
    assert [r[0] for r in train["prose"]["input_ids"]] == list(range(68))
    assert train["code"] is docs["code"]
    with pytest.raises(ValueError, match="too few"):
        run.split_probe({"prose": docs["prose"].select(range(40))})


@pytest.mark.slow
def test_same_seed_same_losses(quick_run: tuple[int, Path], tmp_path: Path) -> None:
    _, out = quick_run
    first = json.loads((out / "report.json").read_text())
    again = run.run_demo(run.DemoOptions(steps=12, quick=True, out=str(tmp_path),
                                         resume_check=False, progress=False,
                                         influence=False))  # fmt: skip
    assert again["series"]["loss"] == first["series"]["loss"]
    other = run.run_demo(run.DemoOptions(steps=4, quick=True, out=str(tmp_path), seed=1,
                                         resume_check=False, progress=False,
                                         influence=False))  # fmt: skip
    assert other["series"]["loss"] != first["series"]["loss"][:4]


def test_packed_sdpa_mask_gives_the_per_document_loss() -> None:
    opts = run.DemoOptions(quick=True).finished()
    model = run.build_model(opts, vocab_size=97, max_length=64, seed=0)
    assert run.packed_mask_check(model, max_length=64, seed=0) < 1e-5


def test_packed_loss_is_not_the_unmasked_loss() -> None:
    """The check can fail: without the mask, documents attend to each other and losses move."""
    import torch

    import mixtape

    model = run.build_model(run.DemoOptions(quick=True).finished(), 97, 64, seed=0).eval()
    collate = mixtape.create_packed_collate(pad_token_id=0, attention="sdpa")
    row = {"input_ids": list(range(1, 41)), "seq_lengths": [20, 20], "doc_source_ids": [0, 1]}
    batch = collate([row])
    with torch.no_grad():
        masked, _, _ = run.token_losses(model, batch)
        open_batch = dict(batch)
        open_batch["attention_mask"] = torch.ones_like(batch["attention_mask"]).tril()
        unmasked, _, _ = run.token_losses(model, open_batch)
    assert not torch.allclose(masked[0, 20:], unmasked[0, 20:], atol=1e-4)


def test_the_packaged_config_is_configs_demo_yaml() -> None:
    """The installed package carries a copy of configs/demo.yaml: the two files must not drift."""
    repo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    packaged = Path(run.__file__).with_name("demo.yaml")
    assert packaged.read_text() == repo.read_text()


def test_config_sources_must_be_embedded(tmp_path: Path) -> None:
    text = run.default_config_path().read_text().replace("embedded:prose", "data/prose.jsonl")
    cfg_path = tmp_path / "demo.yaml"
    cfg_path.write_text(text)
    cfg = run.load_config(run.DemoOptions(config=str(cfg_path)))
    with pytest.raises(ValueError, match=r"sources\[1\] \('prose'\).*embedded"):
        run.embedded_sources(cfg, {"code": object(), "prose": object(), "arithmetic": object()})


def test_overrides_reach_the_config() -> None:
    cfg = run.load_config(run.DemoOptions(seed=7, workers=0, batch_size=3, max_length=32))
    lc = cfg.resolved().loader
    assert (lc.seed, lc.num_workers, lc.batch_size, lc.max_length) == (7, 0, 3, 32)
    assert cfg.resolved().mixture.seed == 7
    # one horizon for this run (0 workers) and its resume check (1 worker: 1 x 2 in flight + 1),
    # so schedule updates land at the same batches in both processes
    assert lc.horizon == 3
    assert run.load_config(run.DemoOptions(workers=2)).resolved().loader.horizon == 5


class _FakeLoader:
    """The loader surface ScheduleDriver uses: update_weights lands at consumed - 1 + horizon."""

    def __init__(self, horizon: int) -> None:
        self.horizon = horizon
        self.batches_consumed = 0
        self.source_names = ["a", "b"]
        self.sent: list[tuple[int, list[float]]] = []

    def update_weights(self, w: Any) -> int:
        effect = max(0, self.batches_consumed - 1 + self.horizon)
        self.sent.append((effect, list(w)))
        return effect


def test_schedule_driver_lands_updates_at_the_scheduled_steps() -> None:
    from mixtape import WeightScheduler

    sched = WeightScheduler([(0, {"a": 1, "b": 0}), (10, {"a": 0, "b": 1})], "step")
    loader = _FakeLoader(horizon=3)
    driver = run.ScheduleDriver(sched, loader, steps=20, scale=1.0, every=5)
    for _ in range(20):
        loader.batches_consumed += 1
        driver.after_batch()
    assert loader.sent == [(10, [0.0, 1.0])]
    assert driver.weights_at(9) == [1.0, 0.0] and driver.weights_at(10) == [0.0, 1.0]


def test_schedule_driver_records_a_late_landing() -> None:
    from mixtape import WeightScheduler

    sched = WeightScheduler([(0, {"a": 1, "b": 1}), (1, {"a": 3, "b": 1})], "step")
    loader = _FakeLoader(horizon=4)
    driver = run.ScheduleDriver(sched, loader, steps=8, scale=1.0, every=1)
    loader.batches_consumed = 1
    driver.after_batch()
    assert driver.in_force[-1] == (4, [0.75, 0.25])  # asked for step 1, landed at 4
    assert driver.weights_at(3) == [0.5, 0.5]


def test_schedule_is_scaled_to_the_run_length() -> None:
    from mixtape import WeightScheduler

    sched = WeightScheduler([(0, {"a": 1, "b": 0}), (200, {"a": 0, "b": 1})], "step")
    entries = run._scaled_timeline(sched, steps=30, scale=0.1, every=1)
    assert [s for s, _ in entries] == [0, 20]


def test_bad_options_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--steps", "1", "--no-progress"]) == 2
    assert "--steps must be >= 2" in capsys.readouterr().err
    assert cli.main(["demo", "--steps", "10", "--checkpoint-step", "10"]) == 2
    assert "--checkpoint-step" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_check_fails_on_a_wrong_checkpoint(quick_run: tuple[int, Path],
                                                  tmp_path: Path) -> None:  # fmt: skip
    """The check can fail: a checkpoint whose dropout RNG is not the run's gives other losses."""
    import shutil
    from types import SimpleNamespace

    import torch

    _, out = quick_run
    report = json.loads((out / "report.json").read_text())
    ckpt = tmp_path / "checkpoint"
    shutil.copytree(out / "checkpoint", ckpt)
    state = torch.load(ckpt / "state.pt", weights_only=False)
    state["rng"] = torch.Generator().manual_seed(12345).get_state()
    torch.save(state, ckpt / "state.pt")
    opts = run.DemoOptions(steps=12, quick=True).finished()
    records = [SimpleNamespace(loss=x) for x in report["series"]["loss"]]
    result = run.check_resume(ckpt, opts, SimpleNamespace(records=records), workers=1)  # type: ignore[arg-type]
    assert result["checked"] and not result["passed"]
    assert "differ" in result["detail"]
