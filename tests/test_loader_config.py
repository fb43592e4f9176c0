"""DataLoaderConfig: automatic choices, the horizon rule, DataLoader kwargs, seeded workers."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import numpy as np
import pytest
import torch
import torch.utils.data
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtape.loader_config import DataLoaderConfig, make_generator, seed_worker

# --------------------------------------------------------------------------------------------
# DataLoaderConfig: automatic choices and the horizon rule
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cuda", [True, False])
def test_pin_memory_follows_cuda(monkeypatch: pytest.MonkeyPatch, cuda: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert DataLoaderConfig(4).resolved().pin_memory is cuda
    assert DataLoaderConfig(4, pin_memory=not cuda).resolved().pin_memory is (not cuda)


def test_worker_dependent_choices() -> None:
    r0 = DataLoaderConfig(4).resolved()
    assert (r0.prefetch_factor, r0.persistent_workers, r0.horizon) == (None, False, 1)
    r2 = DataLoaderConfig(4, num_workers=2).resolved()
    assert (r2.prefetch_factor, r2.persistent_workers, r2.horizon) == (2, True, 5)
    r3 = DataLoaderConfig(4, num_workers=3, prefetch_factor=4, persistent_workers=False).resolved()
    assert (r3.prefetch_factor, r3.persistent_workers, r3.horizon) == (4, False, 13)
    assert DataLoaderConfig(4, num_workers=3, horizon=40).resolved().horizon == 40
    # resolving twice changes nothing
    assert r3.resolved() == r3


@settings(max_examples=60, deadline=None)
@given(workers=st.integers(0, 8), prefetch=st.integers(1, 6), horizon=st.integers(1, 60))
def test_horizon_rule(workers: int, prefetch: int, horizon: int) -> None:
    pf = prefetch if workers else None
    in_flight = workers * prefetch  # torch keeps at most this many batches requested
    if horizon >= in_flight + 1:
        cfg = DataLoaderConfig(4, num_workers=workers, prefetch_factor=pf, horizon=horizon)
        assert cfg.resolved().horizon == horizon
    else:
        with pytest.raises(ValueError, match=rf"horizon is {horizon}.*>= {in_flight + 1}"):
            DataLoaderConfig(4, num_workers=workers, prefetch_factor=pf, horizon=horizon)


def test_rank_and_world_size(monkeypatch: pytest.MonkeyPatch) -> None:
    r = DataLoaderConfig(4).resolved()
    assert (r.rank, r.world_size) == (0, 1)
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    r = DataLoaderConfig(4).resolved()
    assert (r.rank, r.world_size) == (3, 4)
    r = DataLoaderConfig(4, rank=1, world_size=2).resolved()  # explicit values are kept
    assert (r.rank, r.world_size) == (1, 2)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 0}, ValueError, r"DataLoaderConfig\.batch_size must be >= 1, got 0"),
        ({"batch_size": 2.0}, TypeError, r"batch_size must be an int, got 2\.0"),
        ({"batch_size": True}, TypeError, r"batch_size must be an int, got True"),
        ({"num_workers": -1}, ValueError, r"num_workers must be >= 0, got -1"),
        ({"prefetch_factor": 2}, ValueError, r"prefetch_factor is 2 with num_workers=0"),
        ({"num_workers": 1, "prefetch_factor": 0}, ValueError, r"prefetch_factor must be >= 1"),
        ({"persistent_workers": True}, ValueError, r"persistent_workers is true with"),
        ({"shuffle": "yes"}, TypeError, r"shuffle must be true or false, got 'yes'"),
        ({"seed": -1}, ValueError, r"seed must be >= 0"),
        ({"seed": 2**64}, ValueError, r"seed must be < 18446744073709551616"),
        ({"packing": "bdf", "max_length": 8}, ValueError, r"packing must be one of .*'bdf'.*"
         r"did you mean 'bfd'"),
        ({"packing": "bfd"}, ValueError, r"max_length is required with packing='bfd'"),
        ({"max_length": 0}, ValueError, r"max_length must be >= 1"),
        ({"horizon": 0}, ValueError, r"horizon must be >= 1"),
        ({"rank": 0}, ValueError, r"rank and world_size are given together"),
        ({"rank": 2, "world_size": 2}, ValueError, r"rank must be in \[0, world_size=2\), got 2"),
        ({"rank": 0, "world_size": 0}, ValueError, r"world_size must be >= 1"),
        ({"collate_fn": "causal_ml"}, ValueError, r"no collator named 'causal_ml' \(did you "
         r"mean 'causal_lm'"),
        ({"collate_fn": 3}, TypeError, r"collate_fn must be a registered collator name or a "
         r"callable"),
        ({"collate_kwargs": {"pad_token_id": 1}}, ValueError, r"collate_kwargs builds a "
         r"registered collator"),
    ],
)  # fmt: skip
def test_loader_config_errors(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    kwargs = {"batch_size": 4, **kwargs}
    with pytest.raises(error, match=match):
        DataLoaderConfig(**kwargs)


def test_loader_is_frozen_and_normalises() -> None:
    cfg = DataLoaderConfig(np.int64(4), num_workers=np.int32(1), shuffle=np.bool_(False))
    assert type(cfg.batch_size) is int and type(cfg.num_workers) is int
    assert cfg.shuffle is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 8  # type: ignore[misc]


class _RandomDataset(torch.utils.data.Dataset[tuple[int, float, float]]):
    """Each item draws from numpy's and Python's global RNGs (seeded per worker)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[int, float, float]:
        return i, float(np.random.rand()), random.random()


def _draws(cfg: DataLoaderConfig) -> list[tuple[int, float, float]]:
    loader = torch.utils.data.DataLoader(_RandomDataset(), **cfg.to_dataloader_kwargs())
    out = []
    for idx, a, b in loader:
        out += list(zip(idx.tolist(), a.tolist(), b.tolist(), strict=True))
    return out


def test_dataloader_kwargs_per_worker_count() -> None:
    kw0 = DataLoaderConfig(4, seed=7).to_dataloader_kwargs()
    assert set(kw0) == {"num_workers", "pin_memory", "generator", "batch_size", "drop_last",
                        "shuffle"}  # fmt: skip
    kw2 = DataLoaderConfig(4, num_workers=2, seed=7).to_dataloader_kwargs()
    assert kw2["prefetch_factor"] == 2 and kw2["persistent_workers"] is True
    assert kw2["worker_init_fn"] is seed_worker
    assert torch.equal(torch.randperm(50, generator=kw0["generator"]),
                       torch.randperm(50, generator=make_generator(7)))  # fmt: skip
    for kw in (kw0, kw2):  # torch accepts them
        torch.utils.data.DataLoader(_RandomDataset(), **kw)


def test_seeded_workers_are_reproducible() -> None:
    cfg = DataLoaderConfig(2, num_workers=2, seed=11, persistent_workers=False)
    first, again = _draws(cfg), _draws(cfg)
    assert first == again
    assert sorted(i for i, _, _ in first) == list(range(8))
    other = _draws(dataclasses.replace(cfg, seed=12))
    assert [x[1:] for x in other] != [x[1:] for x in first]
    # the two workers draw different streams
    by_worker = [x[1] for x in first[:2]], [x[1] for x in first[2:4]]
    assert by_worker[0] != by_worker[1]


def test_seed_worker_recipe() -> None:
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(2**40 + 5)
            seed_worker(0)
        expected = (2**40 + 5) % 2**32
        assert np.array_equal(np.random.get_state()[1],
                              np.random.RandomState(expected).get_state()[1])  # fmt: skip
        assert random.random() == random.Random(expected).random()
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def test_distributed_sampler_partitions_ranks() -> None:
    ds = _RandomDataset()
    with pytest.raises(ValueError, match="world_size is 2: pass the dataset"):
        DataLoaderConfig(2, rank=0, world_size=2).to_dataloader_kwargs()
    seen = []
    for rank in (0, 1):
        kw = DataLoaderConfig(2, rank=rank, world_size=2, seed=3).to_dataloader_kwargs(ds)
        assert "shuffle" not in kw
        sampler = kw["sampler"]
        assert isinstance(sampler, torch.utils.data.DistributedSampler)
        seen.append(list(sampler))
    assert sorted(seen[0] + seen[1]) == list(range(8)) and not set(seen[0]) & set(seen[1])


def test_iterable_and_batched_kwargs() -> None:
    class Stream(torch.utils.data.IterableDataset[int]):
        def __iter__(self) -> Any:
            return iter(range(6))

    with pytest.raises(ValueError, match="IterableDataset, which torch cannot shuffle"):
        DataLoaderConfig(2).to_dataloader_kwargs(Stream())
    kw = DataLoaderConfig(2, shuffle=False).to_dataloader_kwargs(Stream())
    assert [b.tolist() for b in torch.utils.data.DataLoader(Stream(), **kw)] == [[0, 1], [2, 3],
                                                                                [4, 5]]  # fmt: skip
    kw = DataLoaderConfig(2, drop_last=True).to_dataloader_kwargs(batched=True)
    assert kw["batch_size"] is None and "drop_last" not in kw and "shuffle" not in kw
    assert list(torch.utils.data.DataLoader(Stream(), **kw)) == list(range(6))


def test_collate_fn_by_name() -> None:
    cfg = DataLoaderConfig(2, collate_fn="causal_lm", collate_kwargs={"pad_token_id": 9})
    collate = cfg.to_dataloader_kwargs()["collate_fn"]
    batch = collate([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert DataLoaderConfig(2, collate_fn=len).build_collate_fn() is len


def test_max_length_without_packing_is_refused_when_resolved() -> None:
    # A YAML loader section may give max_length for a packing section to agree with, so the
    # check waits for the cascade; a loader built without packing would truncate nothing.
    cfg = DataLoaderConfig(4, max_length=8)
    with pytest.raises(ValueError, match="max_length is 8 without packing"):
        cfg.resolved()
    assert DataLoaderConfig(4, packing="bfd", max_length=8).resolved().max_length == 8
