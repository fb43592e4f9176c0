"""torch.distributed (gloo, CPU, 2 ranks by torchrun): ranks serve disjoint batches whose union
in order is the single-process sequence, and a weight update switches every rank at the same
global batch with rank 0's weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dist_worker
import pytest
import torch
import torch.distributed

from mixtape.loader import get_loader

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD = 2


def gloo_available() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


def torchrun(out: Path, *extra: str) -> None:
    if not gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    worker = Path(__file__).with_name("dist_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={WORLD}", str(worker), str(out), *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("dist")
    torchrun(out)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def reference(batches: int, mixed: Any = None, **opts: Any) -> list[dict[str, Any]]:
    loader = get_loader(dist_worker.make() if mixed is None else mixed, dist_worker.B, **opts)
    return [dist_worker.plain(b) for _, b in zip(range(batches), loader, strict=False)]


def interleave(ranks: list[dict[str, Any]], case: str) -> list[dict[str, Any]]:
    return [b for group in zip(*(r[case] for r in ranks), strict=True) for b in group]


def test_ranks_come_from_the_process_group(ranks: list[dict[str, Any]]) -> None:
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, WORLD), (1, WORLD)]


@pytest.mark.parametrize("case", ["padded", "packed"])
def test_rank_batches_are_disjoint_and_interleave_to_the_sequence(
    ranks: list[dict[str, Any]], case: str
) -> None:
    opts = dist_worker.PACKED if case == "packed" else {}
    ref = reference(WORLD * dist_worker.BATCHES, **opts)
    assert interleave(ranks, case) == ref
    assert ranks[0][case] != ranks[1][case]


def test_update_switches_every_rank_at_the_same_global_batch(ranks: list[dict[str, Any]]) -> None:
    effect = ranks[0]["effect"]
    assert ranks[1]["effect"] == effect == dist_worker.SWITCH_AFTER * WORLD  # horizon 1
    mixed = dist_worker.make()
    mixed.update_weights(dist_worker.RANK_WEIGHTS[0], position=effect * dist_worker.B)
    ref = reference(WORLD * dist_worker.BATCHES, mixed)
    merged = interleave(ranks, "update")
    assert merged == ref
    assert merged[:effect] == reference(effect)  # nothing before the effect batch changed
    b = dist_worker.make().source_names.index("b")
    after = [s for batch in merged[effect:] for s in batch["source_ids"]]
    assert after and set(after) == {b}  # rank 0's weights on both ranks, not rank 1's ("a")


def test_mixtape_trainer_feeds_each_rank_its_global_batches(tmp_path: Path) -> None:
    torchrun(tmp_path, "trainer")
    fed = [json.loads((tmp_path / f"trainer{r}.json").read_text()) for r in range(WORLD)]
    ref = reference(WORLD * dist_worker.TRAINER_STEPS)
    for r in range(WORLD):
        assert fed[r] == [b["input_ids"] for b in ref[r::WORLD]]


@pytest.mark.parametrize("case", ["padded", "packed"])
def test_every_rank_resumes_from_the_state_rank_0_saved(case: str) -> None:
    # A trainer saves one loader state (rank 0's) and every rank loads it.
    opts = dist_worker.PACKED if case == "packed" else {}
    ref = reference(WORLD * 8, **opts)
    r0 = get_loader(dist_worker.make(), dist_worker.B, rank=0, world_size=WORLD, **opts)
    for _ in zip(range(3), r0, strict=False):
        pass
    saved = json.loads(json.dumps(r0.state_dict()))
    for r in range(WORLD):
        loader = get_loader(dist_worker.make(), dist_worker.B, rank=r, world_size=WORLD, **opts)
        loader.load_state_dict(saved)
        got = [dist_worker.plain(b) for _, b in zip(range(5), loader, strict=False)]
        assert got == ref[3 * WORLD + r:: WORLD][:5]
