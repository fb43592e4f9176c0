"""The loader's contract: the same batches for any worker count, weight updates landing at
b + horizon, exact resume (also in a fresh process and with another worker count), ranks."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import datasets
import numpy as np
import pytest
import torch
from stateful_helpers import host, rss_growth_kb, same_batches
from stateful_helpers import take_batches as take

from mixtape import DataLoaderConfig, MixedDataset
from mixtape.loader import DataLoaderFactory, get_loader

datasets.disable_progress_bars()

PACKED = {"packing": "bfd", "max_length": 16, "collate_fn": "packed",
          "collate_kwargs": {"attention": "flash"}}  # fmt: skip


def ds(base: int, n: int) -> Any:
    """Document i of a source is [base + i] repeated 1 + i % 7 times (its origin is readable)."""
    return datasets.Dataset.from_dict({"input_ids": [[base + i] * (1 + i % 7) for i in range(n)]})


def make(stop: str = "restart", **kw: Any) -> MixedDataset:
    return MixedDataset({"a": ds(0, 200), "b": ds(1000, 100), "c": ds(2000, 50)},
                        {"a": 0.5, "b": 0.3, "c": 0.2}, seed=1, stop_strategy=stop,
                        **kw)  # fmt: skip


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize(("workers", "persistent"), [(1, False), (2, True), (2, False)])
def test_same_batches_for_every_worker_count(packed: bool, workers: int, persistent: bool) -> None:
    opts = PACKED if packed else {}
    ref = take(get_loader(make(), 4, **opts), 30)
    got = take(get_loader(make(), 4, num_workers=workers, persistent_workers=persistent,
                          **opts), 30)  # fmt: skip
    assert same_batches(ref, got)
    assert "source_ids" in ref[0]


def test_padded_batches_hold_the_mixture_in_order() -> None:
    mixed = make()
    batches = take(get_loader(mixed, 8), 10)
    plan = make().plan(0, 80)
    src = np.concatenate([b["source_ids"].numpy() for b in batches])
    assert np.array_equal(src, plan.sources)
    first = np.concatenate([b["input_ids"][:, 0].numpy() for b in batches])
    assert np.array_equal(first % 1000, plan.rows)  # row i's first token is base + i


def test_packed_rows_are_documents_of_the_mixture() -> None:
    batch = take(get_loader(make(), 4, **PACKED), 1)[0]
    ids, src = batch["input_ids"].numpy(), batch["source_ids"].numpy()
    assert ids.shape == (4, 16)
    wide = take(get_loader(make(), 4, **{**PACKED, "max_length": 64}), 3)
    assert all(tuple(b["input_ids"].shape) == (4, 64) for b in wide)  # rows of max_length
    real = src >= 0
    assert np.array_equal(ids[real] // 1000, src[real])  # every token from its source
    cu = batch["cu_seq_lens_q"].numpy()
    assert cu[-1] == ids.size


def test_packed_rows_reach_a_users_collate_fn_as_the_packed_collator_reads_them() -> None:
    """A packing loader with a callable collate_fn gives it the rows (Arrow: input_ids,
    seq_lengths, doc_source_ids; in the workers when there are some); mixtape's packed collator
    on those rows is the default batch."""
    from mixtape import create_packed_collate

    seen: list[Any] = []

    def mine(rows: Any) -> Any:
        seen.append(rows)
        return {"n": rows.num_rows}

    opts = {"packing": "bfd", "max_length": 16, "collate_fn": mine}
    assert [b["n"] for b in take(get_loader(make(), 4, **opts), 3)] == [4, 4, 4]
    assert seen[0].column_names == ["input_ids", "seq_lengths", "doc_source_ids"]
    rows = list(seen)
    seen.clear()
    assert [b["n"] for b in take(get_loader(make(), 4, num_workers=2, **opts), 3)] == [4, 4, 4]
    assert not seen  # collated in the workers
    want = take(get_loader(make(), 4, **PACKED), 3)
    collate = create_packed_collate(attention="flash", pad_to_multiple_of=16)
    assert same_batches([host(collate(t)) for t in rows], want)


def test_pin_memory_without_cuda_still_gives_the_batches() -> None:
    want = take(get_loader(make(), 4, **PACKED), 3)
    with pytest.warns(UserWarning):
        got = take(get_loader(make(), 4, pin_memory=True, **PACKED), 3)
    assert same_batches(want, got)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_update_lands_at_b_plus_horizon_for_any_worker_count(packed: bool) -> None:
    opts = PACKED if packed else {}
    runs = []
    for workers in (0, 1, 2):
        loader = get_loader(make(), 4, num_workers=workers, horizon=5, **opts)
        got = []
        for i, batch in enumerate(loader):
            got.append(host(batch))
            if i == 3:  # after the trainer received batch 3
                assert loader.update_weights({"a": 0, "b": 0, "c": 1}) == 8
            if i == 20:
                break
        runs.append(got)
    assert same_batches(runs[0], runs[1]) and same_batches(runs[0], runs[2])
    src = [b["source_ids"].numpy() for b in runs[0]]
    if not packed:
        assert all(set(s.tolist()) != {2} for s in src[:8])  # old weights up to batch 7
        assert all(set(s.tolist()) == {2} for s in src[8:])  # only c from batch 8 on
    else:  # windows planned for batch >= 8 draw only c (rows left over from before may not)
        assert any(0 in s or 1 in s for s in src[:8])
        assert all(set(s[s >= 0].tolist()) == {2} for s in src[10:])


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("per_task", [2, 3])
def test_tasks_of_several_batches_change_nothing_but_the_horizon(
        packed: bool, per_task: int) -> None:  # fmt: skip
    """Workers making ``per_task`` consecutive batches per DataLoader task give the same batches
    (also at the end of a finite mixture, whose last task is short), weight updates land at
    b + horizon with the larger default horizon, and a state taken inside a task resumes."""
    opts = PACKED if packed else {}
    kw = {"num_workers": 2, "batches_per_task": per_task}
    horizon = (2 * 2 + 1) * per_task  # tasks planned ahead of the trainer, plus the current one
    loader = get_loader(make("first_exhausted"), 4, **kw, **opts)
    assert loader.horizon == horizon
    assert same_batches(take(loader), take(get_loader(make("first_exhausted"), 4, **opts)))
    runs = []
    for workers in ({}, kw):
        run = get_loader(make(), 4, horizon=horizon, **workers, **opts)
        got = []
        for i, batch in enumerate(run):
            got.append(host(batch))
            if i == 3:
                assert run.update_weights({"a": 0, "b": 0, "c": 1}) == 3 + horizon
            if i == 30:
                break
        runs.append(got)
    assert same_batches(runs[0], runs[1])
    first = get_loader(make(), 4, **kw, **opts)
    got = take(first, per_task + 1)  # inside the second task
    second = get_loader(make(), 4, **opts)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += take(second, 10)
    assert same_batches(got, take(get_loader(make(), 4, **opts), per_task + 11))


def test_batches_per_task_needs_workers_and_room_in_the_horizon() -> None:
    with pytest.raises(ValueError, match="batches_per_task is 2 with num_workers=0"):
        get_loader(make(), 4, batches_per_task=2, **PACKED)
    with pytest.raises(ValueError, match=r"\(2 x 2 \+ 1\) x 4 = 20 batches"):
        get_loader(make(), 4, num_workers=2, batches_per_task=4, horizon=10, **PACKED)
    # a given horizon makes the automatic choice smaller instead
    assert get_loader(make(), 4, num_workers=2, horizon=10, **PACKED).config.batches_per_task == 2
    assert get_loader(make(), 4, num_workers=2, **PACKED).config.batches_per_task == 4
    assert get_loader(make(), 4, num_workers=2).config.batches_per_task == 1  # not packing


def test_horizon_smaller_than_in_flight_is_an_error() -> None:
    with pytest.raises(ValueError, match="horizon"):
        get_loader(make(), 4, num_workers=2, horizon=3)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cut", [0, 1, 7, 25])
def test_resume_is_exact_with_another_worker_count(packed: bool, cut: int) -> None:
    opts = PACKED if packed else {}
    ref_loader = get_loader(make(), 4, horizon=5, **opts)
    ref = []
    for i, batch in enumerate(ref_loader):
        ref.append(host(batch))
        if i == 5:
            ref_loader.update_weights({"a": 1, "b": 1, "c": 6})
        if i == 40:
            break
    first = get_loader(make(), 4, horizon=5, num_workers=2, **opts)
    got: list[dict[str, Any]] = []
    for i, batch in enumerate(itertools.islice(first, cut)):
        got.append(host(batch))
        if i == 5:
            first.update_weights({"a": 1, "b": 1, "c": 6})
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint, maybe mid-update
    second = get_loader(make(), 4, horizon=5, num_workers=1, **opts)
    second.load_state_dict(state)
    for i, batch in enumerate(second, start=cut):
        got.append(host(batch))
        if i == 5:
            second.update_weights({"a": 1, "b": 1, "c": 6})
        if i == 40:
            break
    assert same_batches(ref, got)
    # twice in a row: the state of a resumed loader resumes again
    third = get_loader(make(), 4, horizon=5, **opts)
    third.load_state_dict(second.state_dict())
    assert third.state_dict()["batches"] == 41


def test_resume_in_a_fresh_process(tmp_path: Any) -> None:
    script = textwrap.dedent("""
        import hashlib, itertools, json, sys
        import datasets
        from mixtape import MixedDataset
        from mixtape.loader import get_loader
        datasets.disable_progress_bars()
        def ds(base, n):
            return datasets.Dataset.from_dict(
                {"input_ids": [[base + i] * (1 + i % 7) for i in range(n)]})
        def make():
            return MixedDataset({"a": ds(0, 200), "b": ds(1000, 100), "c": ds(2000, 50)},
                                {"a": 0.5, "b": 0.3, "c": 0.2}, seed=1)
        loader = get_loader(make(), 4, packing="bfd", max_length=16, collate_fn="packed",
                            collate_kwargs={"attention": "flash"}, num_workers=int(sys.argv[2]))
        if sys.argv[1] != "-":
            loader.load_state_dict(json.load(open(sys.argv[1])))
        h = hashlib.sha256()
        for batch in itertools.islice(loader, int(sys.argv[3])):
            h.update(batch["input_ids"].numpy().tobytes())
        if sys.argv[4] != "-":
            json.dump(loader.state_dict(), open(sys.argv[4], "w"))
        print(h.hexdigest())
    """)
    path = tmp_path / "run.py"
    path.write_text(script)
    state = tmp_path / "state.json"
    env = {**os.environ, "PYTHONHASHSEED": "1"}

    def run(*args: str) -> str:
        out = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                             env=env, check=True)  # fmt: skip
        return out.stdout.strip()

    whole = run("-", "0", "20", "-")
    run("-", "2", "8", str(state))
    rest = run(str(state), "1", "12", "-")
    import hashlib

    loader = get_loader(make(), 4, **PACKED)
    batches = take(loader, 20)
    h_all, h_rest = hashlib.sha256(), hashlib.sha256()
    for i, b in enumerate(batches):
        h_all.update(b["input_ids"].numpy().tobytes())
        if i >= 8:
            h_rest.update(b["input_ids"].numpy().tobytes())
    assert whole == h_all.hexdigest()
    assert rest == h_rest.hexdigest()


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_ranks_serve_disjoint_batches_whose_union_is_the_sequence(packed: bool) -> None:
    opts = PACKED if packed else {}
    ref = take(get_loader(make(), 4, **opts), 24)
    r0 = take(get_loader(make(), 4, rank=0, world_size=2, **opts), 12)
    r1 = take(get_loader(make(), 4, rank=1, world_size=2, num_workers=2, **opts), 12)
    merged = [b for pair in zip(r0, r1, strict=True) for b in pair]
    assert same_batches(ref, merged)


def test_finite_mixture_length_and_epochs() -> None:
    mixed = make("first_exhausted")
    loader = get_loader(mixed, 8)
    n = len(mixed)
    assert len(loader) == -(-n // 8)
    batches = list(loader)
    assert len(batches) == len(loader)
    assert sum(len(b["input_ids"]) for b in batches) == n
    assert same_batches(batches, list(loader))  # a second epoch replays the sequence
    assert len(get_loader(make("first_exhausted"), 8, drop_last=True)) == n // 8
    half = get_loader(make("first_exhausted"), 8, rank=1, world_size=2)
    assert len(list(half)) == len(half)


def test_source_counts() -> None:
    loader = get_loader(make(), 10)
    take(loader, 10)
    assert loader.source_counts() == {"a": 50, "b": 30, "c": 20}


def test_plain_datasets_get_a_seeded_resumable_loader() -> None:
    data = [{"input_ids": torch.tensor([i])} for i in range(40)]
    cfg = DataLoaderConfig(batch_size=4, shuffle=True, seed=3)
    ref = [b["input_ids"].tolist() for b in DataLoaderFactory().create_dataloader(data, cfg)]
    again = [b["input_ids"].tolist() for b in DataLoaderFactory().create_dataloader(data, cfg)]
    assert ref == again
    loader = DataLoaderFactory().create_dataloader(data, cfg)
    head = [b["input_ids"].tolist() for b in itertools.islice(loader, 3)]
    resumed = DataLoaderFactory().create_dataloader(data, cfg)
    resumed.load_state_dict(loader.state_dict())
    assert head + [b["input_ids"].tolist() for b in resumed] == ref
    with pytest.raises(ValueError, match="MixedDataset"):
        loader.update_weights([1.0])


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="attention"):
        get_loader(make(), 4, packing="bfd", max_length=16)
    with pytest.raises(ValueError, match="max_length"):
        get_loader(make(), 4, packing="bfd")
    loader = get_loader(make(), 4)
    with pytest.raises(ValueError, match="'z'"):
        loader.update_weights({"a": 1, "z": 1})
    with pytest.raises(ValueError, match="-1"):
        loader.update_weights([1, -1, 1])
    with pytest.raises(ValueError, match="batch_size"):
        get_loader(make(), 5).load_state_dict(loader.state_dict())


@pytest.mark.slow
def test_memory_does_not_grow_with_batches() -> None:
    loader = get_loader(make(), 8)
    grown_kb = rss_growth_kb(iter(loader), 2000, 10_000)
    assert grown_kb < 50_000, f"resident memory grew by {grown_kb} KB over 10k batches"
    assert len(loader._cursors) == 0


def test_schedule_counts_training_steps() -> None:
    from mixtape import WeightScheduler

    sched = WeightScheduler([(0, {"a": 1, "b": 0, "c": 0}), (5, {"a": 0, "b": 0, "c": 1})])

    def scheduled(batch_size: int) -> MixedDataset:
        return MixedDataset({"a": ds(0, 200), "b": ds(1000, 100), "c": ds(2000, 50)},
                            schedule=sched, seed=1, batch_size=batch_size)  # fmt: skip

    with pytest.raises(ValueError, match="batch_size=4"):
        get_loader(scheduled(1), 4)  # steps of 1 example: the schedule would run 4x too fast
    src = [set(b["source_ids"].tolist()) for b in take(get_loader(scheduled(4), 4), 10)]
    assert src[:5] == [{0}] * 5 and src[5:] == [{2}] * 5
    for workers in (0, 2):  # packed: the loader applies it at the batches of each step
        got = take(get_loader(scheduled(1), 4, num_workers=workers, **PACKED), 10)
        ids = [set(b["source_ids"][b["source_ids"] >= 0].tolist()) for b in got]
        assert ids[:5] == [{0}] * 5 and all(s == {2} for s in ids[6:])  # batch 5 may carry a


def test_overflow_policies_of_the_packing_loader() -> None:
    long = datasets.Dataset.from_dict({"input_ids": [[5] * 40, [6] * 3] * 10})
    mixed = lambda: MixedDataset({"long": long})  # noqa: E731
    opts = {**PACKED, "max_length": 16}
    split = take(get_loader(mixed(), 4, **opts), 3)
    assert all((b["input_ids"] == 5).sum() > 0 for b in split)  # pieces of the long documents
    trunc = take(get_loader(mixed(), 4, overflow="truncate", **opts), 2)
    assert sum(int((b["input_ids"] == 5).sum()) for b in trunc) % 16 == 0
    loader = get_loader(mixed(), 4, overflow="drop", **opts)
    dropped = take(loader, 2)
    assert all(int((b["input_ids"] == 5).sum()) == 0 for b in dropped)
    assert loader.dropped_docs > 0 and loader.state_dict()["dropped_docs"] == loader.dropped_docs
    with pytest.raises(ValueError, match=r"source .long. row \d+ has 40 tokens"):
        take(get_loader(mixed(), 4, overflow="error", **opts), 1)
    with pytest.raises(ValueError, match="overflow"):
        get_loader(mixed(), 4, overflow="wrap", **opts)


@pytest.mark.skipif(not hasattr(__import__("fcntl"), "F_GETPIPE_SZ"), reason="Linux pipes only")
def test_packed_batches_cross_a_pipe_wide_enough_for_one_batch() -> None:
    """A packed batch's pieces outgrow the default 64 KB pipe; the loader widens the DataLoader's
    result pipe to 1 MB so a batch crosses in one write (same batches either way)."""
    import fcntl

    loader = get_loader(make(), 4, num_workers=2, **PACKED)
    got = take(loader, 3)
    queue = loader.dataloader._iterator._worker_result_queue  # type: ignore[union-attr]
    assert fcntl.fcntl(queue._reader.fileno(), fcntl.F_GETPIPE_SZ) == 1 << 20
    assert same_batches(got, take(get_loader(make(), 4, **PACKED), 3))


@pytest.mark.parametrize("empty", [[], None], ids=["empty-list", "null"])
def test_empty_documents_are_refused_or_counted(empty: Any) -> None:
    """A document with no tokens would silently vanish from a packed batch: an error naming the
    source and row, or with drop_empty=True skipped and counted (once, not again when state_dict
    replays the plan)."""
    rows = [[1, 2, 3] if i % 4 else empty for i in range(40)]
    web = datasets.Dataset.from_dict({"input_ids": rows},
                                     features=datasets.Features({"input_ids": datasets.List(
                                         datasets.Value("int32"))}))  # fmt: skip
    mixed = MixedDataset({"web": web, "b": ds(1000, 50)}, {"web": 0.5, "b": 0.5}, seed=0)
    with pytest.raises(ValueError, match=r"source 'web' row \d+ has no tokens .* drop_empty=True"):
        take(get_loader(mixed, 2, **PACKED), 5)
    loader = get_loader(MixedDataset({"web": web, "b": ds(1000, 50)}, {"web": 0.5, "b": 0.5},
                                     seed=0), 2, drop_empty=True, **PACKED)  # fmt: skip
    got = take(loader, 5)
    counted = loader.empty_docs
    assert counted > 0
    loader.state_dict()
    assert loader.empty_docs == counted
    real = np.concatenate([b["source_ids"].numpy().ravel() for b in got])
    assert set(real.tolist()) <= {-1, 0, 1}


def _first_and_length(rows: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A user collate_fn whose batch is a tuple: each row's first token and its length."""
    ids = rows.column("input_ids").to_pylist()
    return torch.tensor([r[0] for r in ids]), torch.tensor([len(r) for r in ids])


def _stack_pairs(rows: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.stack(t) for t in zip(*rows, strict=True))


@pytest.mark.parametrize(("workers", "per_task"), [(0, None), (2, 1), (2, 3)])
def test_a_batch_that_is_a_tuple_is_one_batch(workers: int, per_task: int | None) -> None:
    # Tasks of several batches travel as a marked tuple; a user's tuple batch is not one.
    def pairs(loader: Any) -> list[tuple[list[int], list[int]]]:
        out = []
        for first, length in itertools.islice(loader, 6):
            out.append((first.tolist(), length.tolist()))
        return out

    ref = pairs(get_loader(make(), 4, collate_fn=_first_and_length))
    assert len(ref) == 6 and all(len(f) == 4 for f, _ in ref)
    loader = get_loader(make(), 4, collate_fn=_first_and_length, num_workers=workers,
                        batches_per_task=per_task)  # fmt: skip
    assert pairs(loader) == ref and loader.batches_consumed == 6
    plain = torch.utils.data.TensorDataset(torch.arange(8), torch.arange(8) * 10)
    got = [tuple(t.tolist() for t in b)
           for b in get_loader(plain, 4, shuffle=False, collate_fn=_stack_pairs)]  # fmt: skip
    assert got == [([0, 1, 2, 3], [0, 10, 20, 30]), ([4, 5, 6, 7], [40, 50, 60, 70])]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_load_state_dict_refuses_what_would_not_resume_exactly(packed: bool) -> None:
    opts = PACKED if packed else {}
    # An iterated loader: its plan, prefetch and live iterator are past any state.
    loader = get_loader(make(), 4, **opts)
    it = iter(loader)
    take(it, 2)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="needs a loader that has not been iterated"):
        loader.load_state_dict(state)
    # A mixture whose weights changed after the state was taken: the change would stay in force.
    loader.update_weights({"a": 0.1, "b": 0.1, "c": 0.8})
    take(it, 3)
    assert len(loader.mixed.weight_timeline) == 2
    with pytest.raises(ValueError, match=r"timeline entry 1 \(position \d+: .*\) is not in the "
                                         r"state \(nothing\)"):  # fmt: skip
        get_loader(loader.mixed, 4, **opts).load_state_dict(state)
    # The same mixture with a state that has the change: resumes where the first loader is.
    later = loader.state_dict()
    rest = take(it, 4)
    again = get_loader(loader.mixed, 4, **opts)
    again.load_state_dict(json.loads(json.dumps(later)))
    assert same_batches(take(again, 4), rest)
    # Another mixture's state: the first entry (initial weights) differs.
    other = MixedDataset({"a": ds(0, 200), "b": ds(1000, 100), "c": ds(2000, 50)},
                         {"a": 0.2, "b": 0.3, "c": 0.5}, seed=1)  # fmt: skip
    with pytest.raises(ValueError, match=r"timeline entry 0 \(position 0: "):
        get_loader(other, 4, **opts).load_state_dict(state)



RECORDS = [{"text": "x" * (1 + i % 5), "id": i} for i in range(20)]


def _lengths(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return {"input_ids": [[1] * len(t) for t in batch["text"]], "id": batch["id"]}


def _ids(rows: list[dict[str, Any]]) -> list[int]:
    return [int(r["id"]) for r in rows]


def _iterable(kind: str, **kw: Any) -> Any:
    from mixtape import StreamingPreprocessedDataset

    if kind == "hf":
        return datasets.Dataset.from_list(RECORDS).to_iterable_dataset(num_shards=2)
    return StreamingPreprocessedDataset(RECORDS, _lengths, buffer_size=0, remove_columns=["text"],
                                        **kw)  # fmt: skip


@pytest.mark.parametrize("kind", ["hf", "streaming"])
def test_an_iterable_dataset_resumes_from_its_own_state(kind: str) -> None:
    # The loader's state holds the dataset's own position (it used to hold only the batch count,
    # so a resumed loader started from the first record).
    loader = get_loader(_iterable(kind), 4, shuffle=False, collate_fn=_ids)
    it = iter(loader)
    assert [next(it), next(it)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    state = loader.state_dict()
    resumed = get_loader(_iterable(kind), 4, shuffle=False, collate_fn=_ids)
    resumed.load_state_dict(state)
    assert list(resumed) == [[8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19]]
    with_workers = get_loader(_iterable(kind), 4, shuffle=False, collate_fn=_ids, num_workers=1)
    next(iter(with_workers))
    with pytest.raises(ValueError, match="read by 1 DataLoader workers, each holding its own"):
        with_workers.state_dict()
    stateless = get_loader(_Counting(), 4, shuffle=False)
    next(iter(stateless))
    with pytest.raises(ValueError, match="has no state_dict"):
        stateless.state_dict()


class _Counting(torch.utils.data.IterableDataset[int]):
    def __iter__(self) -> Any:
        return iter(range(12))


def test_an_iterable_dataset_is_split_between_ranks() -> None:
    hf = [get_loader(_iterable("hf"), 4, shuffle=False, collate_fn=_ids, rank=r, world_size=2)
          for r in range(2)]  # fmt: skip
    served = [[i for b in loader for i in b] for loader in hf]
    assert not set(served[0]) & set(served[1]) and sorted(served[0] + served[1]) == list(range(20))
    with pytest.raises(ValueError, match="shards itself as rank 0 of 1"):
        get_loader(_iterable("streaming"), 4, shuffle=False, rank=1, world_size=2)
    own = [get_loader(_iterable("streaming", rank=r, world_size=2), 4, shuffle=False,
                      collate_fn=_ids, rank=r, world_size=2) for r in range(2)]  # fmt: skip
    served = [[i for b in loader for i in b] for loader in own]
    assert not set(served[0]) & set(served[1]) and sorted(served[0] + served[1]) == list(range(20))
    with pytest.warns(UserWarning, match="cannot be split by the loader"):
        get_loader(_Counting(), 4, shuffle=False, rank=0, world_size=2)


def test_taking_exactly_an_epoch_ends_it() -> None:
    # A trainer steps len(loader) times and never asks for one more: the next iter() is the
    # next epoch (it was empty: the loader resumed at its end).
    loader = get_loader(make("first_exhausted"), 4)
    n = len(loader)
    first = take(iter(loader), n)
    state = loader.state_dict()
    second = take(loader)
    assert len(second) == n and same_batches(first, second)
    resumed = get_loader(make("first_exhausted"), 4)
    resumed.load_state_dict(state)  # saved at the epoch's end: resumes at the next epoch
    assert same_batches(take(resumed), second)
    plain = get_loader(list(range(10)), 4, collate_fn=lambda xs: xs)
    epoch0 = list(itertools.islice(iter(plain), len(plain)))
    epoch1 = list(plain)
    flat0 = sorted(x for b in epoch0 for x in b)
    assert len(epoch1) == 3 and flat0 == sorted(x for b in epoch1 for x in b) == list(range(10))


def test_the_state_keeps_the_runs_horizon_and_packing() -> None:
    # The automatic horizon depends on the worker count: resumed with another count, updates
    # asked after the resume would land at other batches.
    two = get_loader(make(), 4, num_workers=2)
    take(iter(two), 3)
    state = json.loads(json.dumps(two.state_dict()))
    del two
    zero = get_loader(make(), 4)
    zero.load_state_dict(state)
    assert (state["horizon"], zero.horizon) == (5, 5)
    with pytest.raises(ValueError, match="saved with horizon 5, this loader has horizon=7"):
        get_loader(make(), 4, horizon=7).load_state_dict(state)
    small = json.loads(json.dumps(get_loader(make(), 4).state_dict()))  # horizon 1
    with pytest.raises(ValueError, match=r"saved with horizon 1, but with 2 workers up to 5"):
        get_loader(make(), 4, num_workers=2).load_state_dict(small)
    packed = json.loads(json.dumps(get_loader(make(), 4, **PACKED).state_dict()))
    with pytest.raises(ValueError, match="saved with packing='bfd', max_length=16; this loader "
                                         "has packing=None"):  # fmt: skip
        get_loader(make(), 4).load_state_dict(packed)


@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_ranks_share_a_map_style_dataset_as_distributed_sampler_does(n: int) -> None:
    # Fewer examples than the padding a rank needed left a rank short (DistributedSampler
    # repeats the indices): ranks would then take different numbers of steps.
    data = list(range(n))
    for rank in range(3):
        ours = [i for b in get_loader(data, 1, shuffle=False, collate_fn=lambda xs: xs,
                                      rank=rank, world_size=3) for i in b]  # fmt: skip
        ref = torch.utils.data.DistributedSampler(data, num_replicas=3, rank=rank, shuffle=False)
        assert ours == list(ref)
