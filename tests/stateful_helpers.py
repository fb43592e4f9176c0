"""Reusable save/load checks for every ``Stateful`` stage (torchdata's run_test_save_load_state).

``run_test_save_load_state(make, midpoint)``: iterate a fresh object to the end (the reference);
iterate another to ``midpoint`` items, take its ``state_dict()`` (pickled and unpickled, as a
checkpoint would be), load it into a fresh object and check that the continuation is identical,
item for item, and that a state taken right after loading (before iterating) resumes the same way.
``assert_state_refused_in_workers(make, num_workers)`` checks the other side of the contract: a
DataLoader whose workers hold the state makes the main process's ``state_dict()`` an error.
The mixer and loader tests use both.
"""

from __future__ import annotations

import itertools
import pickle
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pytest

from mixtape.state import Stateful


def same(a: Any, b: Any) -> bool:
    """Deep equality of batches: dicts, lists, numpy arrays, tensors, numbers (exact, bitwise)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return (isinstance(b, list | tuple) and len(a) == len(b)
                and all(same(x, y) for x, y in zip(a, b, strict=True)))  # fmt: skip
    if hasattr(a, "detach") and hasattr(a, "numpy"):
        a = a.detach().cpu().numpy()
    if hasattr(b, "detach") and hasattr(b, "numpy"):
        b = b.detach().cpu().numpy()
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
    return bool(a == b)


def host(batch: dict[str, Any]) -> dict[str, Any]:
    """A copy owning its memory: tensors from workers each hold a file descriptor (torch's
    sharing strategy), so a test keeping many batches would run out of them."""
    return {k: v.clone() if hasattr(v, "clone") else v for k, v in batch.items()}


def take_batches(loader: Iterable[dict[str, Any]], n: int | None = None) -> list[dict[str, Any]]:
    """The first ``n`` batches of ``loader`` (all with None), as copies (see :func:`host`)."""
    return [host(b) for b in itertools.islice(loader, n)]


def same_batches(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Equal batch lists, bit for bit (see :func:`same`)."""
    return same(a, b)


def take(it: Iterator[Any], n: int) -> list[Any]:
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def run_test_save_load_state(
    make: Callable[[], Any],
    midpoint: int,
    *,
    iterate: Callable[[Any], Iterable[Any]] = iter,
) -> None:
    """Save at ``midpoint`` items, load into a fresh object: the continuation is identical (the
    rest of the pass; the next pass when ``midpoint`` is past the end and the pass ended).

    ``make()`` builds a fresh stateful iterable; ``iterate(obj)`` how it is consumed (default
    ``iter``; e.g. a ``DataLoader(obj, batch_size=None, num_workers=0)``).
    """
    full = list(iterate(make()))
    first = make()
    assert isinstance(first, Stateful), f"{type(first).__name__} is not Stateful"
    head = take(iter(iterate(first)), midpoint)
    assert len(head) == min(midpoint, len(full))
    state = pickle.loads(pickle.dumps(first.state_dict()))  # a checkpoint round trip
    # What the object yields next: the rest of its pass, or the next pass if this one ended.
    rest = list(iterate(first))
    resumed = make()
    resumed.load_state_dict(state)
    again = pickle.loads(pickle.dumps(resumed.state_dict()))  # loaded, not yet iterated
    tail = list(iterate(resumed))
    assert len(tail) == len(rest), (len(tail), len(rest))
    assert all(same(x, y) for x, y in zip(tail, rest, strict=True))
    if midpoint <= len(full):  # saved within the pass: head + tail is the pass
        assert len(head) + len(tail) == len(full), (len(head), len(tail), len(full))
        for i, (got, want) in enumerate(zip(head + tail, full, strict=True)):
            assert same(got, want), f"item {i} differs after resuming at {midpoint}"
    twice = make()
    twice.load_state_dict(again)
    assert all(same(x, y) for x, y in zip(list(iterate(twice)), tail, strict=True))


def assert_state_refused_in_workers(
    make: Callable[[], Any], num_workers: int = 1, context: str | None = None, items: int = 2
) -> None:
    """With DataLoader workers holding the state, the main process's state_dict() raises."""
    import torch

    obj = make()
    loader = torch.utils.data.DataLoader(obj, batch_size=None, num_workers=num_workers,
                                         multiprocessing_context=context)  # fmt: skip
    it = iter(loader)
    got = take(it, items)
    assert len(got) == items
    with pytest.raises(ValueError, match="num_workers=0"):
        obj.state_dict()
    del it


def rss_growth_kb(it: Iterator[Any], warmup: int, n: int) -> int:
    """Peak resident memory (KB) added while taking ``n`` items of ``it`` after ``warmup``."""
    import resource

    for _ in range(warmup):
        next(it)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(n):
        next(it)
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
