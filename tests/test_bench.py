"""``mixtape bench``: the case registry, the ratios and the JSON it writes (not the speed)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from mixtape import bench
from mixtape.bench import Measurement


def test_ratios_are_peer_over_ours_and_skip_skipped() -> None:
    ms = [
        Measurement("c", "ours", 0.5, True),
        Measurement("c", "peer", 2.0, False),
        bench.skipped("c", "absent", "not installed"),
    ]
    assert bench.ratios(ms) == {"ours": {"peer": 4.0}}
    assert ms[2].skipped and math.isnan(ms[2].seconds) and "not installed" in ms[2].note


def test_timeit_rejects_no_repeat() -> None:
    with pytest.raises(ValueError, match="repeat must be >= 1, got 0"):
        bench.timeit(lambda: None, repeat=0)


def test_case_registered_twice_is_an_error() -> None:
    bench.case("test-duplicate")(lambda quick: [])
    with pytest.raises(ValueError, match="'test-duplicate' is registered twice"):
        bench.case("test-duplicate")(lambda quick: [])
    del bench.CASES["test-duplicate"]


def test_every_case_module_registers() -> None:
    cases = bench.load_cases()
    assert {"pad-ragged", "flatten-microbatch", "pad-pylists", "pack-plan", "pack-fill"} <= set(
        cases
    )


def test_unknown_case_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--cases", "nope"]) == 2
    assert "unknown case(s) ['nope']" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_run_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--cases", "pad-pylists,pack-plan", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[pad-pylists]" in printed and "[pack-plan]" in printed
    payload = json.loads(out.read_text())
    assert payload["quick"] is True
    for name in ("pad-pylists", "pack-plan"):
        result = payload["cases"][name]
        assert result["ours"] and all(t > 0 for t in result["ours"].values())
        for our_impl, peers in result["ratios"].items():
            assert our_impl in result["ours"]
            for peer, ratio in peers.items():
                assert ratio == pytest.approx(result["peers"][peer] / result["ours"][our_impl])


def test_loader_case_splits_a_run_and_joins_the_workers() -> None:
    torch = pytest.importorskip("torch")
    from mixtape.bench.loader import _phases

    made: list[Any] = []

    def make() -> Any:
        rows = [{"input_ids": torch.ones(3, dtype=torch.long)}] * 4
        made.append(torch.utils.data.DataLoader(rows, batch_size=1, num_workers=1,
                                                persistent_workers=True))  # fmt: skip
        return made[-1]

    phases, tokens = _phases(make, 3, True)  # the first batch is start-up: 3 more of 3 tokens
    assert tokens == 9 and min(phases) >= 0 and phases.total == pytest.approx(sum(phases))
    assert not any(w.is_alive() for w in made[-1]._iterator._workers)
    with pytest.raises(RuntimeError, match="ended after 3 of 4 batches"):
        _phases(make, 4, False)
