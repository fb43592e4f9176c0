"""SourceSampler: positions vs the plain-Python reference of a whole weight timeline, chunking,
peek/seek, weight changes, the saved state (also through JSON), and errors naming the item."""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_ops_sample import MODES, ref_sample

import mixtape
from mixtape import SourceSampler, ops
from mixtape.sampler import permute_rows

CONFIGS = [
    {"mode": "greedy"},
    {"mode": "greedy", "shuffle": True, "block_size": 7},
    {"mode": "greedy", "shuffle": True, "block_size": 1},
    {"mode": "random"},
    {"mode": "block", "block_size": 10},
    {"mode": "block", "block_size": 20},
    {"mode": "block", "block_size": 9, "shuffle": False},
]
IDS = [
    "greedy", "greedy-shuffle", "greedy-shuffle-b1", "random", "block", "block-b20", "block-smooth"
]


def make(weights: Sequence[float], config: dict[str, Any], seed: int = 3) -> SourceSampler:
    return SourceSampler(weights, seed=seed, **config)


def reference(s: SourceSampler, n: int) -> tuple[list[int], list[int]]:
    timeline = [(p, w.tolist()) for p, w in s.weight_timeline]
    return ref_sample(timeline, s.mode, s.seed, s.block_size, s.shuffle, n)


def draw(s: SourceSampler, chunks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    parts = [s.sample(c) for c in chunks]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def test_exported() -> None:
    assert mixtape.SourceSampler is SourceSampler
    assert "SourceSampler" in mixtape.__all__


def test_defaults() -> None:
    s = SourceSampler([1, 2, 1])
    assert (s.mode, s.seed, s.block_size, s.shuffle, s.position) == ("greedy", 0, 1000, False, 0)
    assert SourceSampler([1, 2], mode="block").shuffle is True
    assert SourceSampler([1, 2], mode="random").shuffle is False
    assert s.num_sources == 3 and s.counts.tolist() == [0, 0, 0]
    assert np.allclose(s.weights, [0.25, 0.5, 0.25])
    tl = s.weight_timeline
    assert len(tl) == 1 and tl[0][0] == 0 and np.allclose(tl[0][1], [0.25, 0.5, 0.25])


def test_block_mode_refuses_a_source_no_block_reads() -> None:
    """Every block holds the same counts: a positive weight below one pick per block would never
    be read (block_size 1 always serves the heaviest source), so it is an error, also later."""
    with pytest.raises(ValueError, match=r"source 1 has weight 0.3 but gets no position in a "
                                         r"block of 1 .* use block_size >= 10 or mode='greedy'"):
        SourceSampler([0.45, 0.3, 0.0, 0.15, 0.1], mode="block", block_size=1)
    s = SourceSampler([0.5, 0.5], mode="block", block_size=10, names=["web", "code"])
    with pytest.raises(ValueError, match=r"source 'code' has weight 0.02 .* block_size >= 50"):
        s.set_weights([0.98, 0.02], position=20)
    assert len(s.weight_timeline) == 1  # nothing changed
    SourceSampler([0.45, 0.3, 0.0, 0.15, 0.1], mode="greedy", block_size=1)  # greedy: fine


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_matches_reference_and_chunking(config: dict[str, Any]) -> None:
    """One big sample() == chunked sample() == peek() == the reference, ordinals included."""
    w = [0.45, 0.3, 0.0, 0.15, 0.1]
    n = 230
    want_s, want_o = reference(make(w, config), n)
    big = make(w, config).sample(n)
    chunks = draw(make(w, config), [1, 2, 3, 5, 8, 13, 21, 34, 55, 88])
    peeked = make(w, config).peek(0, n)
    for got in (big, chunks, peeked):
        assert got[0].dtype == np.int32 and got[1].dtype == np.int64
        assert got[0].tolist() == want_s and got[1].tolist() == want_o
    s = make(w, config)
    s.sample(n)
    assert s.position == n
    assert s.counts.tolist() == np.bincount(want_s, minlength=len(w)).tolist()
    assert s.counts[2] == 0  # zero weight: never served


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_peek_any_range(config: dict[str, Any]) -> None:
    w = [0.5, 0.25, 0.25]
    want_s, want_o = reference(make(w, config), 120)
    s = make(w, config)
    s.sample(37)
    for start, count in [(0, 10), (5, 50), (36, 3), (37, 40), (50, 70), (119, 1), (0, 120)]:
        src, ords = s.peek(start, count)
        assert src.tolist() == want_s[start : start + count]
        assert ords.tolist() == want_o[start : start + count]
    assert s.position == 37  # peek leaves the state alone
    assert s.sample(83)[0].tolist() == want_s[37:]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_seek(config: dict[str, Any]) -> None:
    w = [0.2, 0.8]
    s = make(w, config)
    s.set_weights([0.6, 0.4], position=40)
    want_s, want_o = reference(s, 150)
    for p in [100, 3, 40, 41, 0, 149, 39]:
        s.seek(p)
        assert s.position == p
        assert s.counts.tolist() == np.bincount(want_s[:p], minlength=2).tolist()
        src, ords = s.sample(150 - p)
        assert src.tolist() == want_s[p:] and ords.tolist() == want_o[p:]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_same_config_same_sequence_other_seed_differs(config: dict[str, Any]) -> None:
    w = [0.4, 0.35, 0.25]
    a = make(w, config, seed=1).sample(500)[0]
    assert np.array_equal(a, make(w, config, seed=1).sample(500)[0])
    b = make(w, config, seed=2).sample(500)[0]
    uses_seed = config["mode"] == "random" or config.get("shuffle", config["mode"] == "block")
    if config.get("block_size") == 1 and config["mode"] != "random":
        uses_seed = False  # a block of one position has one order
    # Unshuffled greedy is deterministic by design: no seed involved.
    assert np.array_equal(a, b) != uses_seed


# --- weight changes ------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_set_weights_mid_run(config: dict[str, Any]) -> None:
    w = [0.5, 0.3, 0.2]
    s = make(w, config)
    before = s.sample(53)  # mid-block for every block size here
    future = s.peek(53, 100)
    s.set_weights([0.0, 0.5, 0.5])  # at the current position
    assert [p for p, _ in s.weight_timeline] == [0, 53]
    after = s.sample(100)
    # positions already produced are unchanged
    assert np.array_equal(s.peek(0, 53)[0], before[0])
    assert np.array_equal(s.peek(0, 53)[1], before[1])
    # later ones follow the new weights: source 0 is paused for good
    assert not np.any(after[0] == 0)
    assert not np.array_equal(after[0], future[0])
    want_s, want_o = reference(s, 153)
    assert np.concatenate([before[0], after[0]]).tolist() == want_s
    assert np.concatenate([before[1], after[1]]).tolist() == want_o


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_set_weights_in_the_future_and_many_segments(config: dict[str, Any]) -> None:
    s = make([1, 1, 1, 1], config)
    s.set_weights([4, 0, 1, 1], position=25)
    s.set_weights([0, 0, 0, 1], position=31)  # one live source
    s.set_weights([1, 2, 3, 4], position=60)
    s.set_weights([1, 2, 3, 4], position=90)  # equal to the weights in force: no new segment
    assert [p for p, _ in s.weight_timeline] == [0, 25, 31, 60]
    want_s, want_o = reference(s, 200)
    got = draw(s, [10, 14, 1, 3, 40, 1, 131])
    assert got[0].tolist() == want_s and got[1].tolist() == want_o
    assert set(got[0][31:60].tolist()) == {3}
    assert 1 not in got[0][25:60].tolist()


def test_set_weights_at_the_same_position_replaces() -> None:
    s = SourceSampler([1, 1])
    s.sample(10)
    s.set_weights([1, 3], position=20)
    s.set_weights([3, 1], position=20)
    assert [p for p, _ in s.weight_timeline] == [0, 20]
    assert np.allclose(s.weight_timeline[1][1], [0.75, 0.25])
    s.set_weights([1, 1], position=20)  # back to the weights before it: the entry goes
    assert [p for p, _ in s.weight_timeline] == [0]
    assert s.sample(30)[0].tolist() == SourceSampler([1, 1]).peek(10, 30)[0].tolist()


def test_set_weights_removing_the_current_segment_keeps_state() -> None:
    for config in CONFIGS:
        s = make([1, 2], config)
        s.set_weights([2, 1], position=20)
        s.sample(20)  # now at the start of the second segment
        s.set_weights([1, 2])  # same as the first: merges back
        want = make([1, 2], config)
        want.sample(20)
        assert s.sample(50)[0].tolist() == want.sample(50)[0].tolist()


def test_greedy_segment_restarts_its_counts() -> None:
    """No catch-up burst: after a change, the new weights' interleave starts from scratch."""
    s = SourceSampler([0.5, 0.5])
    s.sample(1000)
    s.set_weights([0.1, 0.9])
    src = s.sample(100)[0]
    fresh = SourceSampler([0.1, 0.9]).sample(100)[0]
    assert src.tolist() == fresh.tolist()


def test_small_weight_never_starved_across_calls() -> None:
    s = SourceSampler([1.0, 1e-4])
    got = np.concatenate([s.sample(7)[0] for _ in range(3000)])
    assert (got == 1).sum() == 2  # 21000 positions * 1e-4, within one


# --- state ---------------------------------------------------------------------------------------


def roundtrip(s: SourceSampler, config: dict[str, Any], via_json: bool) -> SourceSampler:
    state = s.state_dict()
    if via_json:
        state = json.loads(json.dumps(state))
    fresh = make([9, 9, 9], config)  # other weights: the state's timeline wins
    fresh.load_state_dict(state)
    return fresh


@pytest.mark.parametrize("via_json", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_state_dict_resumes_identically(config: dict[str, Any], via_json: bool) -> None:
    rng = np.random.default_rng(0)
    s = make([0.5, 0.2, 0.3], config)
    s.set_weights([0.1, 0.1, 0.8], position=44)
    pos = 0
    for step in [44, 1, 13, 6, 0, 31, 9]:  # right at an update, inside blocks, ...
        s.sample(step)
        pos += step
        if pos == 64:
            s.set_weights([0.3, 0.3, 0.4])  # and right after one made at the current position
        resumed = roundtrip(s, config, via_json)
        assert resumed.position == s.position == pos
        assert resumed.counts.tolist() == s.counts.tolist()
        assert [p for p, _ in resumed.weight_timeline] == [p for p, _ in s.weight_timeline]
        n = int(rng.integers(1, 60))
        a, b = s.peek(pos, n), resumed.sample(n)
        assert a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()
    want_s, want_o = reference(s, 400)
    tail = roundtrip(s, config, via_json).sample(400 - pos)
    assert tail[0].tolist() == want_s[pos:] and tail[1].tolist() == want_o[pos:]


def test_state_dict_is_plain_and_picklable() -> None:
    s = SourceSampler([1, 2, 3], mode="block", block_size=8, seed=5)
    s.sample(13)
    state = s.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert pickle.loads(pickle.dumps(state)) == state
    assert state["anchor"] == 8 and state["position"] == 13  # a block start, inside the block
    t = SourceSampler([1, 2, 3], mode="block", block_size=8, seed=5)
    t.load_state_dict(state)
    assert t.sample(20)[0].tolist() == s.sample(20)[0].tolist()


def _starves(weights: Sequence[float], config: dict[str, Any]) -> bool:
    """Block-mode weights that leave a positive-weight source no pick per block (refused)."""
    if config["mode"] != "block":
        return False
    w = ops.normalize_weights(np.asarray(weights, dtype=np.float64))
    counts = ops.block_counts(w, config.get("block_size", 1000))
    return bool(np.any((w > 0) & (counts == 0)))


@settings(max_examples=40, deadline=None)
@given(
    config=st.sampled_from(CONFIGS),
    weights=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5]), min_size=1, max_size=6).filter(
        lambda w: any(v > 0 for v in w)
    ),
    ops_=st.lists(
        st.tuples(st.sampled_from(["sample", "set", "save", "seek"]), st.integers(0, 40)),
        max_size=12,
    ),
)  # fmt: skip
def test_random_programs_match_reference(
    config: dict[str, Any], weights: list[float], ops_: list[tuple[str, int]]
) -> None:
    """Any interleaving of sample / set_weights / save-load / seek gives the reference sequence."""
    assume(not _starves(weights, config))
    s = make(weights, config)
    produced: dict[int, tuple[int, int]] = {}
    rng = np.random.default_rng(len(ops_))
    for op, k in ops_:
        if op == "sample":
            start = s.position
            src, ords = s.sample(k)
            for i in range(k):
                produced[start + i] = (int(src[i]), int(ords[i]))
        elif op == "set":
            w = rng.choice([0.0, 1.0, 2.0], size=len(weights))
            if w.sum() > 0 and not _starves(w, config):
                s.set_weights(w, position=max(s.position, s.weight_timeline[-1][0]) + k % 5)
        elif op == "save":
            t = make(weights, config)
            t.load_state_dict(json.loads(json.dumps(s.state_dict())))
            s = t
        elif produced:  # a rewind: positions after it are to be produced again
            s.seek(max(produced) + 1 - min(k, max(produced) + 1))
            produced = {i: v for i, v in produced.items() if i < s.position}
    n = max(produced, default=-1) + 1
    want_s, want_o = reference(s, n + 30)
    for i, (src, o) in produced.items():
        assert (want_s[i], want_o[i]) == (src, o)
    tail = s.sample(n + 30 - s.position) if s.position <= n + 30 else None
    if tail is not None:
        assert tail[0].tolist() == want_s[n + 30 - tail[0].size :]


@pytest.mark.parametrize(
    "change,match",
    [
        ({"mode": "random"}, "mode is 'random' but this sampler has 'greedy'"),
        ({"seed": 4}, "seed is 4 but this sampler has 3"),
        ({"num_sources": 4}, "num_sources is 4"),
        ({"version": 9}, "version 9"),
        ({"counts": [5, 5, 2]}, "counts at position 12"),
        ({"anchor_counts": [12, 0, 0]}, "inconsistent state"),
        ({"anchor_segment_counts": [1, 1, 1]}, "inconsistent state"),
        ({"timeline": [[3, [1, 1, 1]]]}, "start at 0"),
        ({"timeline": [[0, [1, -1, 1]]]}, "source 1 .* -1"),
        ({"counts": [1, 2]}, "counts must be 3 integers"),
        ({"anchor": 20}, "anchor must be in"),
        ({"anchor_segment": 5}, "anchor_segment must be in"),
    ],
)
def test_load_state_dict_rejects(change: dict[str, Any], match: str) -> None:
    s = SourceSampler([1, 2, 3], seed=3)
    s.sample(12)
    state = {**s.state_dict(), **change}
    with pytest.raises(ValueError, match=match):
        SourceSampler([1, 2, 3], seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys"):
        SourceSampler([1, 2, 3], seed=3).load_state_dict({"position": 0})


def test_failed_load_leaves_the_sampler_usable() -> None:
    s = SourceSampler([1, 2, 3], seed=3)
    s.sample(5)
    state = {**s.state_dict(), "counts": [0, 0, 5]}
    t = SourceSampler([1, 2, 3], seed=3)
    t.sample(5)
    with pytest.raises(ValueError):
        t.load_state_dict(state)
    assert t.sample(10)[0].tolist() == s.sample(10)[0].tolist()


# --- scale ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,shuffle", MODES)
def test_many_sources(mode: str, shuffle: bool) -> None:
    w = np.maximum(np.random.default_rng(1).dirichlet(np.ones(300)), 1 / 1200)  # block mode:
    w[::7] = 0  # every positive weight at least one pick per block of 2000
    s = SourceSampler(w, mode=mode, shuffle=shuffle, block_size=2000, seed=1)
    got = draw(s, [999, 1, 2000])
    assert got[0].max() < 300 and not np.any(np.isin(got[0], np.arange(0, 300, 7)))
    want = reference(SourceSampler(w, mode=mode, shuffle=shuffle, block_size=2000, seed=1), 3000)
    assert got[0].tolist() == want[0] and got[1].tolist() == want[1]


@pytest.mark.parametrize("mode", ["block", "greedy"])
def test_block_size_one_million(mode: str) -> None:
    b = 10**6
    s = SourceSampler([0.7, 0.2, 0.1], mode=mode, shuffle=True, block_size=b, seed=2)
    head = s.sample(10)
    s.set_weights([0.1, 0.1, 0.8], position=b + 5)  # cuts the second block short
    rest = draw(s, [b - 20, 10, 7, 1000])
    src = np.concatenate([head[0], rest[0]])
    if mode == "block":
        assert np.bincount(src[:b], minlength=3).tolist() == [700_000, 200_000, 100_000]
    else:
        assert np.abs(np.bincount(src[:b], minlength=3) - np.array([7e5, 2e5, 1e5])).max() <= 1
    assert np.array_equal(src, s.peek(0, src.size)[0])
    t = SourceSampler([0.7, 0.2, 0.1], mode=mode, shuffle=True, block_size=b, seed=2)
    t.load_state_dict(s.state_dict())
    assert np.array_equal(t.sample(100)[0], s.peek(s.position, 100)[0])


def test_random_mode_far_position() -> None:
    """peek far ahead costs one counting pass at the kernel's speed; draws are position-pure."""
    s = SourceSampler([0.6, 0.4], mode="random", seed=9)
    far = 5_000_000
    src, ords = s.peek(far, 5)
    full = s.peek(0, far + 5)
    assert np.array_equal(src, full[0][far:]) and np.array_equal(ords, full[1][far:])


# --- permute_rows and the mixer's use ------------------------------------------------------------


def test_sources_to_rows() -> None:
    """How the mixer reads examples: each pass of a source reads every row once."""
    lengths = np.array([3, 10, 7])
    s = SourceSampler([0.2, 0.5, 0.3], seed=4)
    sources, ordinals = s.sample(600)
    rows = permute_rows(ordinals, lengths[sources], seed=s.seed, source=sources)
    for src in range(3):
        mine = rows[sources == src]
        n = lengths[src]
        for p in range(mine.size // n):
            assert sorted(mine[p * n : (p + 1) * n].tolist()) == list(range(n))
    for k in range(3):  # one call per source gives the same rows
        alone = permute_rows(ordinals[sources == k], int(lengths[k]), seed=4, source=k)
        assert np.array_equal(rows[sources == k], alone)


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"weights": [1, -2]}, ValueError, "source 1 .* -2"),
        ({"weights": [1, float("nan")], "names": ["web", "code"]}, ValueError, "'code'.* nan"),
        ({"weights": [0, 0]}, ValueError, "all 2 weights are zero"),
        ({"weights": [1, float("inf")]}, ValueError, "source 1 .* inf"),
        ({"mode": "fast"}, ValueError, "mode must be one of .* got 'fast'"),
        ({"block_size": 0}, ValueError, "block_size must be in"),
        ({"block_size": 2**28 + 1}, ValueError, "block_size must be in"),
        ({"seed": -1}, ValueError, "seed must be in"),
        ({"seed": 2**64}, ValueError, "seed must be in"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
        ({"mode": "random", "shuffle": True}, ValueError, "does not apply to mode 'random'"),
        ({"shuffle": "yes"}, TypeError, "shuffle must be a bool"),
        ({"names": ["a"]}, ValueError, "names has 1 entries for 2 sources"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict[str, Any], exc: type, match: str) -> None:
    args = {"weights": [1, 1], **kwargs}
    with pytest.raises(exc, match=match):
        SourceSampler(**args)


def test_bad_calls() -> None:
    s = SourceSampler([1, 1], names=["web", "code"])
    s.sample(10)
    with pytest.raises(ValueError, match="count must be in"):
        s.sample(-1)
    with pytest.raises(ValueError, match="start must be in"):
        s.peek(-1, 2)
    with pytest.raises(ValueError, match="position must be in"):
        s.seek(-3)
    with pytest.raises(ValueError, match="position 5 is before the current position 10"):
        s.set_weights([1, 2], position=5)
    s.set_weights([1, 2], position=30)
    with pytest.raises(ValueError, match="position 20 is before the last timeline entry, at 30"):
        s.set_weights([2, 1], position=20)
    with pytest.raises(ValueError, match="expected 2 weights"):
        s.set_weights([1, 2, 3])
    with pytest.raises(ValueError, match=r"source 1 \('code'\) has weight -1"):
        s.set_weights([1, -1])
    with pytest.raises(TypeError, match="count must be an int"):
        s.sample(2.0)  # type: ignore[arg-type]
    assert s.position == 10 and [p for p, _ in s.weight_timeline] == [0, 30]


def test_ops_names_in_errors() -> None:
    with pytest.raises(ValueError, match=r"source 2 \('math'\) has weight -0.5"):
        ops.normalize_weights([1, 1, -0.5], names=["web", "code", "math"])


def test_block_mode_seeks_in_closed_form() -> None:
    """Counts at block boundaries are closed-form: a seek 10^12 positions ahead is instant (a
    replay would take hours), and what follows equals a fresh run's block at that index."""
    s = SourceSampler([1, 2, 3], mode="block", block_size=1000, seed=4)
    s.seek(10**12 + 5)
    per_block = ops.block_counts(ops.normalize_weights([1, 2, 3]), 1000)
    head = SourceSampler([1, 2, 3], mode="block", block_size=1000, seed=4).peek(0, 1000)[0]
    assert s.counts.tolist() == (per_block * 10**9 + np.bincount(
        s.peek(10**12, 5)[0], minlength=3)).tolist()  # fmt: skip
    src, ords = s.sample(995)
    assert np.bincount(np.concatenate([s.peek(10**12, 5)[0], src]), minlength=3).tolist() == \
        per_block.tolist()  # fmt: skip
    assert not np.array_equal(src, head[5:])  # block 10^9 has its own order
    assert ords.min() >= per_block.min() * 10**9


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_sampler_pickles_mid_block(config: dict[str, Any]) -> None:
    """A DataLoader with spawn pickles the sampler: the copy continues like the original."""
    s = make([0.5, 0.3, 0.2], config)
    s.sample(13)
    s.set_weights([0.2, 0.2, 0.6], position=40)
    copy = pickle.loads(pickle.dumps(s))
    assert copy.sample(60)[0].tolist() == s.sample(60)[0].tolist()


def test_bench_cases_register() -> None:
    from mixtape import bench

    assert {"sample-sources", "sample-sources-64", "sample-rows"} <= set(bench.load_cases())


@pytest.mark.parametrize(("mode", "shuffle"), [("block", True), ("block", False), ("greedy", True)])
def test_counts_after_a_weight_change_inside_a_block(mode: str, shuffle: bool) -> None:
    # The picks before the change were lost from counts (the block's start state does not hold
    # them), and a state saved there could not be loaded.
    s = SourceSampler([1, 1, 1], mode=mode, block_size=10, shuffle=shuffle, seed=5)
    a, _ = s.sample(2)
    s.set_weights([1, 0, 2], s.position)
    b, _ = s.sample(4)
    assert s.counts.tolist() == np.bincount(np.concatenate([a, b]), minlength=3).tolist()
    fresh = SourceSampler([1, 1, 1], mode=mode, block_size=10, shuffle=shuffle, seed=5)
    fresh.load_state_dict(s.state_dict())
    assert np.array_equal(fresh.sample(30)[0], s.sample(30)[0])
