"""The shared-memory ring workers collate packed batches into: a slot is reused only when every
tensor of its batch is gone, batches a trainer keeps stay intact, and the batches are the same as
without workers however they are held, dropped or abandoned."""

from __future__ import annotations

import gc
import itertools
from typing import Any

import datasets
import numpy as np
import pytest
import torch
from stateful_helpers import host, rss_growth_kb, same, same_batches
from stateful_helpers import take_batches as take

from mixtape import MixedDataset
from mixtape.loader import Loader, get_loader
from mixtape.ring import Filled, InSlot, Ring

datasets.disable_progress_bars()

PACKED = {"packing": "bfd", "max_length": 16, "collate_fn": "packed",
          "collate_kwargs": {"attention": "flash"}}  # fmt: skip


def make() -> MixedDataset:
    def ds(base: int, n: int) -> Any:
        return datasets.Dataset.from_dict({"input_ids": [[base + i] * (1 + i % 7)
                                                         for i in range(n)]})  # fmt: skip

    return MixedDataset({"a": ds(0, 200), "b": ds(1000, 100), "c": ds(2000, 50)},
                        {"a": 0.5, "b": 0.3, "c": 0.2}, seed=1)  # fmt: skip


def reference(n: int, **opts: Any) -> list[dict[str, Any]]:
    return take(get_loader(make(), 4, **{**PACKED, **opts}), n)


# --- the ring on its own ----------------------------------------------------------------------


def _fill(ring: Ring, ticket: tuple[int, int], value: int) -> Filled:
    block = ring.slot_view(ticket[0])
    ids = block[:64].view(np.int64).reshape(2, 4)
    ids[:] = value
    batch = {"input_ids": torch.from_numpy(ids), "np": block[64:96].view(np.int32),
             "cu": torch.arange(3, dtype=torch.int32), "n": 7}  # fmt: skip
    batch["cu_k"] = batch["cu"]
    return ring.describe(ticket, batch)


def test_a_slot_comes_back_when_the_last_view_of_its_batch_is_gone() -> None:
    ring = Ring(2, 100)
    assert ring.slot_bytes == 4096 and ring.nbytes == 8192
    ticket = ring.take()
    assert ticket == (0, 0)
    filled = _fill(ring, ticket, 5)
    assert isinstance(filled.fields, dict) and isinstance(filled.fields["input_ids"], InSlot)
    assert isinstance(filled.fields["np"], InSlot) and not filled.fields["np"].tensor
    assert filled.alias == {"cu_k": "cu"} and filled.tensors == {"cu"}
    batch = ring.receive(filled)
    assert batch is not None
    assert batch["input_ids"].tolist() == [[5] * 4] * 2 and batch["n"] == 7
    assert isinstance(batch["np"], np.ndarray) and isinstance(batch["cu"], torch.Tensor)
    assert batch["cu_k"] is batch["cu"]
    assert ring.take() == (1, 0) and ring.take() is None  # slot 0 is held by the batch
    view = batch["input_ids"][1, 2:]
    del batch
    gc.collect()
    assert ring.take() is None  # a view keeps the slot
    del view
    gc.collect()
    assert ring.take() == (0, 0)


def test_a_fallback_answer_frees_its_slot_and_stray_answers_are_errors() -> None:
    ring = Ring(1, 64)
    ticket = ring.take()
    assert ticket is not None
    assert ring.receive(Filled(ring.token, *ticket, None, fallback="pieces")) is None
    assert ring.take() == ticket
    with pytest.raises(RuntimeError, match="from ring"):
        ring.receive(Filled(ring.token + 1, *ticket, {}))
    ring.reclaim()  # a new iteration: the old one's answers are refused, their slots reused
    assert ring.take() == (0, 1)
    with pytest.raises(RuntimeError, match="earlier iteration"):
        ring.receive(Filled(ring.token, *ticket, {}))
    with pytest.raises(ValueError, match="slots >= 1"):
        Ring(0, 64)


# --- the loader's use of it -------------------------------------------------------------------


def _misses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts batches collated in the main process (no free slot, or no ring)."""
    calls: list[int] = []
    orig = Loader._collate_pieces

    def counted(self: Loader, pieces: Any) -> Any:
        calls.append(1)
        return orig(self, pieces)

    monkeypatch.setattr(Loader, "_collate_pieces", counted)
    return calls


@pytest.mark.parametrize("persistent", [True, False])
def test_dropped_batches_return_their_slots(monkeypatch: pytest.MonkeyPatch,
                                            persistent: bool) -> None:  # fmt: skip
    misses = _misses(monkeypatch)
    loader = get_loader(make(), 4, num_workers=2, persistent_workers=persistent, **PACKED)
    got = take(loader, 40)
    assert loader.config.batches_per_task == 4  # a packing loader's default with workers
    assert loader._ring is not None and loader._ring.slots == (2 * 2 + 1) * 4 + 3
    assert not misses  # every batch went through a slot: each was free again in time
    assert same_batches(got, reference(40))


def test_batches_kept_by_the_trainer_stay_intact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeping more batches than there are slots: the kept ones keep theirs (never rewritten),
    the rest are collated in the main process; every batch is the one without workers."""
    misses = _misses(monkeypatch)
    loader = get_loader(make(), 4, num_workers=2, **PACKED)
    kept = list(itertools.islice(loader, 30))  # the originals, not copies
    views = [b["input_ids"][1:3] for b in kept[:5]]
    want = reference(30)
    assert misses  # the ring ran out while the batches were held
    assert same_batches([host(b) for b in kept], want)
    del kept
    gc.collect()
    more = take(loader, 10)  # slots in use again
    assert same_batches(more, reference(40)[30:])
    assert all(same(v, w["input_ids"][1:3]) for v, w in zip(views, want, strict=False))


@pytest.mark.parametrize("persistent", [True, False])
def test_abandoned_iterations_leave_no_slot_behind(monkeypatch: pytest.MonkeyPatch,
                                                   persistent: bool) -> None:  # fmt: skip
    """Breaking out of the loop (prefetched batches never delivered) and iterating again, also
    with the first iterator still alive: the ring gets its slots back and batches run on."""
    want = reference(30)
    loader = get_loader(make(), 4, num_workers=2, persistent_workers=persistent, **PACKED)
    got = []
    for _ in range(3):
        for b in loader:
            got.append(host(b))
            if len(got) % 5 == 0:
                break
    stale = iter(loader)
    got += take(stale, 2)
    got += take(loader, 13)  # a new iteration while `stale` is alive
    assert same_batches(got, want)
    misses = _misses(monkeypatch)
    got = take(loader, 20)
    assert not misses  # no slot leaked by the abandoned iterations
    assert same_batches(got, reference(50)[30:])


def test_no_ring_without_workers_or_with_a_host_mask() -> None:
    assert get_loader(make(), 4, **PACKED)._ring_shape is None
    sdpa = {**PACKED, "collate_kwargs": {"attention": "sdpa"}}
    loader = get_loader(make(), 4, num_workers=1, **sdpa)
    assert loader._ring_shape is None
    assert same_batches(take(loader, 3), take(get_loader(make(), 4, **sdpa), 3))
    device = {**PACKED, "collate_kwargs": {"attention": "sdpa", "mask": "device"}}
    loader = get_loader(make(), 4, num_workers=1, **device)
    assert loader._ring_shape == ((1 * 2 + 1) * 4 + 3, 4 * 8 * 4 * 16)
    assert same_batches(take(loader, 6), take(get_loader(make(), 4, **device), 6))


@pytest.mark.slow
@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_workers_started_without_fork_share_the_ring(monkeypatch: pytest.MonkeyPatch,
                                                     context: str) -> None:  # fmt: skip
    """Under spawn / forkserver (Python 3.14's default) the ring reaches the workers pickled with
    the dataset (torch sends the shared block's descriptor); the batches still come through it."""
    want = reference(12)
    misses = _misses(monkeypatch)
    loader = get_loader(make(), 4, num_workers=2, **PACKED)
    loader.dataloader.multiprocessing_context = context
    assert same_batches(take(loader, 12), want)
    assert not misses


def test_without_shared_memory_the_loader_collates_in_the_main_process(
        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    def no_memory(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.posix_fallocate", no_memory)
    loader = get_loader(make(), 4, num_workers=2, **PACKED)
    with pytest.warns(UserWarning, match="No space left on device"):
        got = take(loader, 6)
    assert loader._ring is None and same_batches(got, reference(6))


@pytest.mark.parametrize(("workers", "persistent"), [(0, False), (2, False), (2, True)])
def test_a_superseded_iterator_fails_loudly(workers: int, persistent: bool) -> None:
    """An iterator of the loader used after a newer one started (they share the plan, the workers
    and the ring) raises, instead of ending early or taking the newer one's batches; the newer
    one goes on unharmed."""
    kw = {"persistent_workers": persistent} if workers else {}
    loader = get_loader(make(), 4, num_workers=workers, **kw, **PACKED)
    stale = iter(loader)
    first = host(next(stale))
    fresh = iter(loader)
    got = [host(next(fresh))]
    with pytest.raises(RuntimeError, match="superseded"):
        next(stale)
    got += take(fresh, 5)
    assert same_batches([first, *got], reference(7))


@pytest.mark.slow
def test_memory_and_slots_stay_flat_over_10k_batches() -> None:
    """Leases, finalisers and descriptors do not pile up: resident memory stays flat and every
    slot is free again once the batches are dropped."""
    import weakref

    loader = get_loader(make(), 4, num_workers=2, **PACKED)
    it = iter(loader)
    grown_kb = rss_growth_kb(it, 1000, 10_000)
    assert grown_kb < 20_000, f"resident memory grew by {grown_kb} KB over 10k batches"
    ring = loader._ring
    assert ring is not None
    leases = [f for f in weakref.finalize._registry  # type: ignore[attr-defined]
              if (f.peek() or (None, None))[1] == ring._release]  # fmt: skip
    assert len(leases) <= ring.slots  # one per batch still held, none left behind
    del it
    gc.collect()
    assert len(ring._free) + len(ring._inflight) == ring.slots
