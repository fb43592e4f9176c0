"""MixedDataset: exact sequences, stop strategies, weight updates, state, workers, bad input."""

from __future__ import annotations

import itertools
import json
import pickle
from collections import Counter
from typing import Any

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from stateful_helpers import assert_state_refused_in_workers, run_test_save_load_state

from mixtape import (
    DatasetMixture,
    MixedDataset,
    MixedShardedSource,
    WeightSchedulePoint,
    WeightScheduler,
    block_mixture_interleave,
)

datasets.disable_progress_bars()


def ds(name: str, n: int) -> Any:
    """n rows whose ids say where they come from: [source index * 1000 + row]."""
    base = {"a": 0, "b": 1000, "c": 2000}[name]
    return datasets.Dataset.from_dict({"input_ids": [[base + i] for i in range(n)]})


def sources(**sizes: int) -> dict[str, Any]:
    return {k: ds(k, n) for k, n in sizes.items()}


def ids(examples: list[dict[str, Any]]) -> list[int]:
    return [int(e["input_ids"][0]) for e in examples]


def first(m: MixedDataset, n: int) -> list[dict[str, Any]]:
    return list(itertools.islice(iter(m), n))


# ---------------------------------------------------------------------------------------------
# The sequence
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["greedy", "random", "block"])
def test_same_config_same_sequence_other_seed_differs(mode: str) -> None:
    def make(seed: int) -> MixedDataset:
        return MixedDataset(sources(a=50, b=30, c=20), {"a": 5, "b": 3, "c": 2}, seed=seed,
                            mode=mode, block_size=10)  # fmt: skip

    one, two = ids(first(make(1), 300)), ids(first(make(1), 300))
    assert one == two
    assert ids(first(make(2), 300)) != one


def test_examples_carry_their_source_and_the_proportions_follow_the_weights() -> None:
    m = MixedDataset(sources(a=100, b=100, c=100), {"a": 0.5, "b": 0.3, "c": 0.2})
    got = first(m, 1000)
    assert all(e["__source__"] == "abc"[e["input_ids"][0] // 1000] for e in got)
    counts = Counter(e["__source__"] for e in got)
    assert counts == {"a": 500, "b": 300, "c": 200}  # greedy: exact at multiples of 10
    # every prefix within one position of w * n (greedy without in-block shuffling)
    src = np.array(["abc".index(e["__source__"]) for e in got])
    for k, w in enumerate((0.5, 0.3, 0.2)):
        realised = np.cumsum(src == k)
        assert np.all(np.abs(realised - w * np.arange(1, 1001)) <= 1.5)


def test_rows_are_read_once_per_pass_in_a_fresh_order() -> None:
    m = MixedDataset(sources(a=40, b=40), seed=3)  # equal weights, restart
    got = ids(first(m, 160))
    a = [i for i in got if i < 1000]
    assert sorted(a[:40]) == list(range(40)) and sorted(a[40:80]) == list(range(40))
    assert a[:40] != a[40:80]  # the second pass is permuted again
    plain = MixedDataset(sources(a=40, b=40), shuffle_rows=False)
    assert [i for i in ids(first(plain, 80)) if i < 1000] == list(range(40))


def test_plan_take_and_iteration_agree() -> None:
    m = MixedDataset(sources(a=30, b=20, c=10), {"a": 3, "b": 2, "c": 1}, seed=5)
    seq = first(m, 200)
    fresh = MixedDataset(sources(a=30, b=20, c=10), {"a": 3, "b": 2, "c": 1}, seed=5)
    assert fresh.take(fresh.plan(0, 200)) == seq
    assert fresh.take(fresh.plan(57, 31)) == seq[57:88]  # any range, any order of calls
    assert fresh.example_at(123) == seq[123]
    table = fresh.take_arrow(fresh.plan(10, 50))
    assert table.to_pylist() == seq[10:60]
    batches = list(fresh.iter_batches(16, start=0, stop=64))
    assert [len(b) for b in batches] == [16] * 4
    assert [row for b in batches for row in b.to_pylist()] == seq[:64]


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.integers(1, 30), min_size=1, max_size=4),
       weights=st.lists(st.integers(0, 5), min_size=4, max_size=4),
       mode=st.sampled_from(["greedy", "random", "block"]), seed=st.integers(0, 2**32))
def test_first_exhausted_stops_before_any_second_pass(
    sizes: list[int], weights: list[int], mode: str, seed: int
) -> None:
    names = [f"s{i}" for i in range(len(sizes))]
    w = weights[: len(sizes)]
    if sum(w) == 0:
        w[0] = 1
    data = {n: datasets.Dataset.from_dict({"input_ids": [[i] for i in range(k)]})
            for n, k in zip(names, sizes, strict=True)}  # fmt: skip
    if mode == "block" and any(wk and 7 * wk < sum(w) for wk in w):
        try:  # a source left out of every block of 7 would never be read: refused
            MixedDataset(data, dict(zip(names, w, strict=True)), mode=mode, block_size=7)
        except ValueError as e:
            assert "gets no position in a block of 7" in str(e)
            return
    m = MixedDataset(data, dict(zip(names, w, strict=True)), mode=mode, seed=seed, block_size=7,
                     stop_strategy="first_exhausted")  # fmt: skip
    got = list(m)
    assert len(got) == len(m)
    counts = Counter(e["__source__"] for e in got)
    for n, k, wk in zip(names, sizes, w, strict=True):
        assert counts[n] <= k  # never a second pass
        rows = [e["input_ids"][0] for e in got if e["__source__"] == n]
        assert len(set(rows)) == len(rows)
        if wk == 0:
            assert counts[n] == 0
    assert any(counts[n] == k for n, k, wk in zip(names, sizes, w, strict=True) if wk > 0)
    # all_exhausted: every positive-weight source fully read at least once, ends right after
    m2 = MixedDataset(data, dict(zip(names, w, strict=True)), mode=mode, seed=seed,
                      block_size=7, stop_strategy="all_exhausted")  # fmt: skip
    got2 = list(m2)
    assert len(got2) == len(m2)
    for n, k, wk in zip(names, sizes, w, strict=True):
        rows = {e["input_ids"][0] for e in got2 if e["__source__"] == n}
        assert (rows == set(range(k))) if wk > 0 else not rows
    last = got2[-1]
    rows_before = [e["input_ids"][0] for e in got2[:-1] if e["__source__"] == last["__source__"]]
    assert set(rows_before) != set(range(sizes[names.index(last["__source__"])]))


def test_exact_counts_on_small_sources() -> None:
    m = MixedDataset(sources(a=6, b=3), {"a": 2, "b": 1}, stop_strategy="first_exhausted")
    assert len(m) == 9 and Counter(e["__source__"] for e in m) == {"a": 6, "b": 3}
    m = MixedDataset(sources(a=10, b=2), {"a": 1, "b": 1}, stop_strategy="all_exhausted")
    got = list(m)
    # a, b alternate (ties to the first): a's last row is position 18, after b's 9th read
    assert Counter(e["__source__"] for e in got) == {"a": 10, "b": 9}  # b oversampled
    assert set(ids(got)) == set(range(10)) | {1000, 1001}
    with pytest.raises(TypeError, match="infinite"):
        len(MixedDataset(sources(a=3, b=3)))


# ---------------------------------------------------------------------------------------------
# Weights at run time
# ---------------------------------------------------------------------------------------------


def test_update_weights_mid_iteration() -> None:
    def make() -> MixedDataset:
        return MixedDataset(sources(a=100, b=100, c=100), {"a": 1, "b": 1, "c": 1}, seed=4)

    ref = ids(first(make(), 300))
    m = make()
    it = iter(m)
    head = ids([next(it) for _ in range(120)])
    assert head == ref[:120]  # nothing changed yet
    m.update_weights({"a": 0, "b": 1, "c": 3})
    tail = [next(it) for _ in range(200)]
    assert all(e["__source__"] != "a" for e in tail)  # a zero weight never serves again
    assert Counter(e["__source__"] for e in tail) == {"b": 50, "c": 150}
    assert m.weight_timeline[-1] == (120, {"a": 0.0, "b": 0.25, "c": 0.75})
    # the same update at the same position in a fresh object gives the same sequence
    again = make()
    again.update_weights({"a": 0, "b": 1, "c": 3}, position=120)
    assert ids(first(again, 320)) == head + ids(tail)
    assert again.source_counts(320)["a"] == Counter(i // 1000 for i in head)[0]
    with pytest.raises(ValueError, match="already produced"):
        m.update_weights({"a": 1, "b": 1, "c": 1}, position=10)
    m.update_weights_from_influence([1, 1, 1])
    assert m.weights == {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}


def test_schedule_in_steps_and_update_replaces_it() -> None:
    sched = WeightScheduler([WeightSchedulePoint(0, {"a": 1, "b": 0}),
                             WeightSchedulePoint(10, {"a": 0, "b": 1})], "step")  # fmt: skip
    m = MixedDataset(sources(a=1000, b=1000), schedule=sched, batch_size=4)
    got = first(m, 80)
    assert {e["__source__"] for e in got[:40]} == {"a"}  # steps 0..9 = positions 0..39
    assert {e["__source__"] for e in got[40:]} == {"b"}
    lin = WeightScheduler([(0, {"a": 0.2, "b": 0.8}), (100, {"a": 0.5, "b": 0.5})], "linear")
    m = MixedDataset(sources(a=5000, b=5000), schedule=lin, batch_size=10, schedule_every=5)
    assert m._weights_at(500)[0] == pytest.approx(0.35)  # step 50 of 100
    m2 = MixedDataset(sources(a=5000, b=5000), schedule=lin, batch_size=10, schedule_every=5)
    it = iter(m2)
    _ = [next(it) for _ in range(300)]
    m2.update_weights({"a": 1, "b": 0})  # replaces the schedule from position 300 on
    assert {e["__source__"] for e in itertools.islice(it, 700)} == {"a"}
    assert m2.weight_timeline[-1] == (300, {"a": 1.0, "b": 0.0})


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["greedy", "random", "block"])
@pytest.mark.parametrize("midpoint", [0, 1, 37, 150, 299])
def test_state_round_trip(mode: str, midpoint: int) -> None:
    def make() -> MixedDataset:
        m = MixedDataset(sources(a=40, b=25, c=10), {"a": 3, "b": 2, "c": 1}, mode=mode, seed=9,
                         block_size=16, stop_strategy="all_exhausted")  # fmt: skip
        return m

    run_test_save_load_state(make, midpoint)


def test_state_after_an_update_and_json() -> None:
    m = MixedDataset(sources(a=50, b=50), mode="block", block_size=8, seed=1)
    it = iter(m)
    _ = [next(it) for _ in range(13)]  # inside a block
    m.update_weights({"a": 1, "b": 3})
    _ = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(m.state_dict()))
    rest = ids([next(it) for _ in range(100)])
    fresh = MixedDataset(sources(a=50, b=50), mode="block", block_size=8, seed=1)
    fresh.load_state_dict(state)
    assert ids(first(fresh, 100)) == rest
    assert fresh.weight_timeline == m.weight_timeline
    other = MixedDataset(sources(a=50, c=50))
    with pytest.raises(ValueError, match="mixes"):
        other.load_state_dict(state)


def test_state_refused_while_workers_iterate() -> None:
    assert_state_refused_in_workers(lambda: MixedDataset(sources(a=20, b=20)), num_workers=1)


def test_weights_refused_while_workers_iterate() -> None:
    # The workers' copies would never see the update (an influence tracker recorded it as
    # applied while the batches kept the old mixture).
    mixed = MixedDataset(sources(a=20, b=20))
    it = iter(torch.utils.data.DataLoader(mixed, batch_size=2, num_workers=1,
                                          collate_fn=lambda rows: rows))  # fmt: skip
    next(it)
    with pytest.raises(ValueError, match=r"update_weights\(\): the dataset is iterated in another "
                                         "process"):  # fmt: skip
        mixed.update_weights({"a": 1.0, "b": 0.0})
    del it
    alone = MixedDataset(sources(a=20, b=20))
    next(iter(alone))
    alone.update_weights({"a": 1.0, "b": 0.0})  # iterated here: fine


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_dataloader_workers_give_the_single_process_order(workers: int) -> None:
    def make() -> MixedDataset:
        return MixedDataset(sources(a=50, b=40, c=30), {"a": 5, "b": 3, "c": 2}, seed=2,
                            batch_size=4, stop_strategy="first_exhausted")  # fmt: skip

    def collate(batch: list[dict[str, Any]]) -> list[int]:
        return ids(batch)

    ref = [b for b in torch.utils.data.DataLoader(make(), batch_size=4, collate_fn=collate)]
    got = list(torch.utils.data.DataLoader(make(), batch_size=4, num_workers=workers,
                                           collate_fn=collate))  # fmt: skip
    assert got == ref
    assert sum(len(b) for b in ref) == len(make())


def test_pickles() -> None:
    m = MixedDataset(sources(a=5, b=5))
    assert ids(first(pickle.loads(pickle.dumps(m)), 10)) == ids(first(m, 10))


# ---------------------------------------------------------------------------------------------
# Other source kinds and the EasyDeL names
# ---------------------------------------------------------------------------------------------


def test_streaming_source_reads_in_its_own_order() -> None:
    a = ds("a", 20)
    b = ds("b", 7).to_iterable_dataset()
    m = MixedDataset({"a": a, "b": b}, seed=1)
    got = first(m, 60)
    b_rows = [e["input_ids"][0] - 1000 for e in got if e["__source__"] == "b"]
    assert b_rows == [i % 7 for i in range(len(b_rows))]  # passes restart the stream
    assert not m.random_access
    with pytest.raises(ValueError, match="map-style"):
        m.plan(0, 1)
    fe = MixedDataset({"a": ds("a", 100), "b": ds("b", 7).to_iterable_dataset()},
                      stop_strategy="first_exhausted")  # fmt: skip
    assert Counter(e["__source__"] for e in fe)["b"] == 7


def test_dataset_mixture_sources_and_their_weights(tmp_path: Any) -> None:
    ds("a", 30).save_to_disk(str(tmp_path / "a"))
    ds("b", 30).save_to_disk(str(tmp_path / "b"))
    mix = [DatasetMixture("a", path=str(tmp_path / "a"), weight=3.0),
           DatasetMixture("b", path=str(tmp_path / "b"), weight=1.0)]  # fmt: skip
    m = MixedDataset(mix)
    assert m.source_names == ["a", "b"] and m.weights == {"a": 0.75, "b": 0.25}
    assert Counter(e["__source__"] for e in first(m, 40)) == {"a": 30, "b": 10}


def test_block_mixture_interleave_and_mixed_sharded_source() -> None:
    m = block_mixture_interleave({"a": ds("a", 100), "b": ds("b", 100)}, {"a": 0.7, "b": 0.3},
                                 block_size=10, seed=42)  # fmt: skip
    got = first(m, 100)
    for blk in range(10):
        assert Counter(e["__source__"] for e in got[blk * 10:(blk + 1) * 10]) == {"a": 7, "b": 3}
    s = MixedShardedSource({"a": ds("a", 100), "b": ds("b", 100)}, {"a": 0.7, "b": 0.3},
                           block_size=10, seed=42)  # fmt: skip
    assert ids(first(s, 100)) == ids(got)
    lst = block_mixture_interleave([ds("a", 5), ds("b", 5)], block_size=2)
    assert lst.source_names == ["0", "1"]


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "exc", "message"), [
    ({"weights": {"a": 1, "z": 1}}, ValueError, "'z'"),
    ({"weights": {"a": 1}}, ValueError, "no weight for source 'b'"),
    ({"weights": {"a": -1, "b": 1}}, ValueError, "-1"),
    ({"weights": {"a": float("nan"), "b": 1}}, ValueError, "nan"),
    ({"weights": {"a": float("inf"), "b": 1}}, ValueError, "inf"),
    ({"weights": {"a": 0, "b": 0}}, ValueError, "zero"),
    ({"weights": [1, 2, 3]}, ValueError, "one per source"),
    ({"mode": "smooth"}, ValueError, "smooth"),
    ({"stop_strategy": "never"}, ValueError, "never"),
    ({"schedule": [(10, {"a": 1, "b": 1}), (5, {"a": 1, "b": 2})]}, ValueError, "5"),
    ({"schedule": [(0, {"a": 1, "c": 1})]}, ValueError, "'c'"),
])  # fmt: skip
def test_bad_input_names_the_item(kwargs: dict[str, Any], exc: type, message: str) -> None:
    src = sources(a=3, b=3)
    weights = kwargs.pop("weights", None)
    with pytest.raises(exc, match=message):
        MixedDataset(src, weights, **kwargs)


def test_bad_sources() -> None:
    with pytest.raises(ValueError, match="'empty'"):
        m = MixedDataset({"a": ds("a", 3), "empty": datasets.Dataset.from_dict({"input_ids": []})})
        first(m, 5)
    with pytest.raises(TypeError, match="no name"):
        MixedDataset([ds("a", 3)])
    with pytest.raises(ValueError, match="at least one"):
        MixedDataset({})
    text = datasets.Dataset.from_dict({"body": ["x", "y"]})
    m = MixedDataset({"t": DatasetMixture("t", dataset=text, text_field="text")})
    with pytest.raises(ValueError, match=r"'t'.*row"):
        first(m, 1)


def test_updates_must_come_in_position_order() -> None:
    # Rebuilding the timeline at an earlier position dropped the later update without a word.
    mixed = MixedDataset(sources(a=20, b=20))
    mixed.update_weights({"a": 1.0, "b": 0.0}, position=1000)
    with pytest.raises(ValueError, match="position 500 precedes an update already set at "
                                         "position 1000"):  # fmt: skip
        mixed.update_weights({"a": 0.0, "b": 1.0}, position=500)
    mixed.update_weights({"a": 0.25, "b": 0.75}, position=1000)  # the same position: replaced
    assert mixed.weight_timeline[-1] == (1000, {"a": 0.25, "b": 0.75})


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_a_moving_schedule_gives_one_sequence_however_positions_are_asked(kind: str) -> None:
    # Each extension of the timeline added an entry off the grid where the request began, so
    # one plan, chunked plans, iteration and a resumed run gave different sequences.
    def make() -> MixedDataset:
        sched = WeightScheduler([(0, {"a": 0.9, "b": 0.1}), (20000, {"a": 0.1, "b": 0.9})], kind)
        return MixedDataset(sources(a=50, b=50), schedule=sched, batch_size=1)

    n = 9000
    whole = make().plan(0, n).sources
    chunked = make()
    assert np.array_equal(np.concatenate([chunked.plan(s, 3000).sources
                                          for s in range(0, n, 3000)]), whole)  # fmt: skip
    it = iter(make())
    assert [r["__source__"] for r in itertools.islice(it, n)] == \
        [("a", "b")[s] for s in whole]  # fmt: skip
    first = make()
    head = list(itertools.islice(iter(first), 5000))
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    rest = [r["__source__"] for r in itertools.islice(iter(resumed), n - 5000)]
    assert [r["__source__"] for r in head] + rest == [("a", "b")[s] for s in whole]


@pytest.mark.parametrize(("stop", "sizes"), [("first_exhausted", (5, 200)),
                                             ("all_exhausted", (200, 5))])  # fmt: skip
def test_stop_strategies_count_map_style_sources_beside_streams(stop: str,
                                                                sizes: tuple[int, int]) -> None:
    # With a streaming source present only the stream's end was checked: first_exhausted read
    # a 5-row map-style source 201 times, all_exhausted ended before a map-style source's pass.
    def ds(n: int, base: int) -> Any:
        return datasets.Dataset.from_dict({"input_ids": [[base + i] for i in range(n)]})

    def counts(stream: bool) -> Counter[str]:
        second = ds(sizes[1], 1000)
        mixed = MixedDataset({"m": ds(sizes[0], 0),
                              "s": second.to_iterable_dataset() if stream else second},
                             stop_strategy=stop)  # fmt: skip
        return Counter(e["__source__"] for e in mixed)

    assert counts(stream=True) == counts(stream=False)
