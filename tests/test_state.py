"""The Stateful contract (mixtape.state) for PackingStream: save at random batches, restore in a
fresh object, identical continuation; with DataLoader workers, a state that cannot be right is an
error, never a state that silently resumes from the start."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from stateful_helpers import assert_state_refused_in_workers, run_test_save_load_state, same

from mixtape import PackingStream, Stateful
from mixtape.packing import synthetic_lengths


def docs(n: int = 150, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    lengths = synthetic_lengths(n, mean=30, maximum=150, seed=seed)
    return [{"input_ids": rng.integers(1, 1000, int(k))} for k in lengths]


def make_stream(seed: int = 0) -> PackingStream:
    return PackingStream(docs(seed=seed), 64, batch_size=2, buffer_size=24)


def loader(stream: Any) -> Any:
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0)


def test_packing_stream_is_stateful() -> None:
    assert isinstance(make_stream(), Stateful)


@settings(max_examples=8, deadline=None)
@given(midpoint=st.integers(0, 40), seed=st.integers(0, 3))
def test_packing_stream_save_load_at_random_batches(midpoint: int, seed: int) -> None:
    run_test_save_load_state(lambda: make_stream(seed), midpoint)


@pytest.mark.parametrize("midpoint", [0, 3, 17])
def test_packing_stream_save_load_through_a_dataloader(midpoint: int) -> None:
    run_test_save_load_state(make_stream, midpoint, iterate=loader)


def test_state_in_a_worker_is_refused_in_the_main_process() -> None:
    assert_state_refused_in_workers(make_stream, num_workers=1)


@pytest.mark.slow
def test_state_in_a_spawned_worker_is_refused_in_the_main_process() -> None:
    assert_state_refused_in_workers(make_stream, num_workers=1, context="spawn")


def test_workers_then_main_process() -> None:
    """After a worker run, the main process iterating (or loading a state) owns the state again,
    and num_workers=0 behaves exactly as before."""
    stream = make_stream()
    direct = list(make_stream())
    it = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1))
    next(it)
    del it
    with pytest.raises(ValueError, match="the stream is iterated in another process"):
        stream.state_dict()
    fresh = make_stream()
    stream.load_state_dict(fresh.state_dict())
    assert stream.state_dict()["consumed"] == 0
    got = list(loader(stream))
    assert all(same(a, b) for a, b in zip(got, direct, strict=True)) and len(got) == len(direct)
    whole = make_stream()
    list(whole)
    assert stream.state_dict()["counters"] == whole.counters


def test_stream_pickles_and_copies() -> None:
    stream = make_stream()
    it = iter(stream)
    head = [next(it) for _ in range(3)]
    for clone in (pickle.loads(pickle.dumps(stream)), copy.deepcopy(stream)):
        assert clone.state_dict()["consumed"] == stream.state_dict()["consumed"]
        rest = list(clone)
        assert len(head) + len(rest) == len(list(make_stream()))
