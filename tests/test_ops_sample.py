"""The sample kernels vs plain-Python references of each mode (Python ints, so exact by
construction): integer weights, the greedy argmax, the integer alias table over splitmix64 counter
hashes, largest-remainder blocks with Fisher-Yates orders, and the Feistel row permutation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtape import ops

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
TAG_RANDOM = 0x72616E646F6D0001
TAG_BLOCK = 0x626C6F636B000002
TAG_ROWS = 0x726F777300000003

# --- references ----------------------------------------------------------------------------------


def mix64(z: int) -> int:
    z &= MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def counter_hash(seed: int, i: int) -> int:
    return mix64(seed + (i + 1) * GOLDEN)


def derive_key(seed: int, a: int, b: int = 0) -> int:
    return mix64(mix64(seed ^ mix64(a + 0x632BE59BD9B4E019)) ^ mix64(b + 0x8CB92BA72F3D8DD7))


class SplitMix:
    def __init__(self, state: int) -> None:
        self.state = state

    def next(self) -> int:
        self.state = (self.state + GOLDEN) & MASK
        return mix64(self.state)

    def bounded(self, n: int) -> int:
        """Lemire's exact bounded draw."""
        x = self.next()
        if (x * n) & MASK < n:
            threshold = ((1 << 64) - n) % n
            while (x * n) & MASK < threshold:
                x = self.next()
        return (x * n) >> 64


def ref_weights(w: Sequence[float]) -> tuple[list[int], int]:
    """W_s = round(w_s / sum(w) * 2^P), >= 1 when w_s > 0, P = 52 - ceil(log2 A)."""
    top = max(w)
    total = 0.0
    for v in w:
        total += v / top
    a = sum(v > 0 for v in w)
    p = 52 - max(0, math.ceil(math.log2(a)))
    out = [max(1, math.floor(math.ldexp(v / top / total, p) + 0.5)) if v > 0 else 0 for v in w]
    return out, sum(out)


def ref_greedy(big_w: list[int], d: int, n: int, c: list[int] | None = None, j0: int = 0):
    """n positions of the greedy rule from segment position j0 with counts c (mutated)."""
    c = [0] * len(big_w) if c is None else c
    live = [s for s, v in enumerate(big_w) if v > 0]
    out = []
    for j in range(j0, j0 + n):
        s = max(live, key=lambda s: (big_w[s] * (j + 1) - c[s] * d, -s))
        c[s] += 1
        out.append(s)
    return out


def ref_alias(big_w: list[int], d: int):
    ids = [s for s, v in enumerate(big_w) if v > 0]
    a = len(ids)
    prob, alias = [d] * a, list(range(a))
    p = [big_w[s] * a for s in ids]
    small = [i for i in range(a) if p[i] < d]
    large = [i for i in range(a) if p[i] >= d]
    while small and large:
        lo = small.pop()
        g = large[-1]
        prob[lo], alias[lo] = p[lo], g
        p[g] -= d - p[lo]
        if p[g] < d:
            large.pop()
            small.append(g)
    return ids, prob, alias


def ref_random(big_w: list[int], d: int, seed: int, positions: range) -> list[int]:
    ids, prob, alias = ref_alias(big_w, d)
    a, key = len(ids), derive_key(seed, TAG_RANDOM)
    out = []
    for i in positions:
        h = counter_hash(key, i) * a
        b, frac = h >> 64, h & MASK
        out.append(ids[b if (frac * d) >> 64 < prob[b] else alias[b]])
    return out


def ref_block_counts(big_w: list[int], d: int, b: int) -> list[int]:
    q = [v * b // d for v in big_w]
    r = [v * b % d for v in big_w]
    order = sorted(range(len(big_w)), key=lambda s: (-r[s], s))
    for s in order[: b - sum(q)]:
        q[s] += 1
    return q


def ref_shuffle(block: list[int], seed: int, segment: int, index: int) -> list[int]:
    rng = SplitMix(derive_key(derive_key(seed, TAG_BLOCK), segment, index))
    block = list(block)
    for i in range(len(block) - 1, 0, -1):
        j = rng.bounded(i + 1)
        block[i], block[j] = block[j], block[i]
    return block


def ref_segment(
    weights: Sequence[float], mode: str, seed: int, block_size: int, shuffle: bool,
    segment: int, segment_start: int, length: int,
) -> list[int]:  # fmt: skip
    """The sources of the first `length` positions of a weight segment."""
    big_w, d = ref_weights(weights)
    if mode == "random":
        return ref_random(big_w, d, seed, range(segment_start, segment_start + length))
    if mode == "greedy" and not shuffle:
        return ref_greedy(big_w, d, length)
    out: list[int] = []
    c = [0] * len(big_w)
    base: list[int] = []
    if mode == "block":
        n = ref_block_counts(big_w, d, block_size)
        base = [s for s in range(len(n)) for _ in range(n[s])] if shuffle else (
            ref_greedy(n, block_size, block_size))  # fmt: skip
    index = 0
    while len(out) < length:
        block = base if mode == "block" else ref_greedy(big_w, d, block_size, c, index * block_size)
        if shuffle:
            block = ref_shuffle(block, seed, segment, index)
        out += block[: length - len(out)]
        index += 1
    return out


def ref_sample(
    timeline: Sequence[tuple[int, Sequence[float]]], mode: str, seed: int, block_size: int,
    shuffle: bool, n: int,
) -> tuple[list[int], list[int]]:  # fmt: skip
    """Sources and ordinals of positions [0, n) under a weight timeline."""
    sources: list[int] = []
    for k, (p, w) in enumerate(timeline):
        end = timeline[k + 1][0] if k + 1 < len(timeline) else n
        if p >= n:
            break
        sources += ref_segment(w, mode, seed, block_size, shuffle, k, p, min(end, n) - p)
    counts: dict[int, int] = {}
    ordinals = []
    for s in sources:
        ordinals.append(counts.get(s, 0))
        counts[s] = counts.get(s, 0) + 1
    return sources, ordinals


def ref_feistel(key: int, n: int, i: int) -> int:
    if n <= 1:
        return 0
    bits = 2
    while bits < 64 and (1 << bits) < n:
        bits += 1
    hi, lo = bits // 2, bits - bits // 2
    rk = [mix64(key + (r + 1) * GOLDEN) for r in range(4)]

    def network(x: int) -> int:
        lw, rw = hi, lo
        for r in range(4):
            right, left = x & ((1 << rw) - 1), x >> rw
            x = (right << lw) | ((left ^ mix64(right ^ rk[r])) & ((1 << lw) - 1))
            lw, rw = rw, lw
        return x

    x = network(i)
    while x >= n:
        x = network(x)
    return x


def ref_row(seed: int, source: int, ordinal: int, length: int) -> int:
    p = ordinal // length
    return ref_feistel(derive_key(derive_key(seed, TAG_ROWS), source, p), length, ordinal % length)


# --- kernel helpers ------------------------------------------------------------------------------


def kernel(
    weights: Sequence[float], mode: str, *, seed: int = 0, block_size: int = 1000,
    shuffle: bool = False, start: int = 0, count: int, anchor: int = 0,
    counts: Sequence[int] | None = None, segment_counts: Sequence[int] | None = None,
    segment: int = 0, segment_start: int = 0, greedy_path: str = "auto",
) -> ops.SampleRange:  # fmt: skip
    w = ops.normalize_weights(weights)
    zeros = np.zeros(w.size, dtype=np.int64)
    return ops.sample_sources(
        w,
        zeros if counts is None else np.asarray(counts, dtype=np.int64),
        zeros if segment_counts is None else np.asarray(segment_counts, dtype=np.int64),
        mode=mode, seed=seed, block_size=block_size, shuffle=shuffle, segment=segment,
        segment_start=segment_start, anchor=anchor, start=start, count=count,
        greedy_path=greedy_path,
    )  # fmt: skip


def ordinals_of(sources: Sequence[int], counts: Sequence[int]) -> list[int]:
    running = list(counts)
    out = []
    for s in sources:
        out.append(running[s])
        running[s] += 1
    return out


WEIGHTS = {
    "three": [0.5, 0.3, 0.2],
    "zeros": [0.0, 2.0, 0.0, 1.0, 1.0, 0.0],
    "one": [3.0],
    "one-live": [0.0, 0.0, 5.0],
    "equal8": [1.0] * 8,
    "skewed": [1e-6, 1.0, 1e-3, 0.5, 7.0],
    "primes": [2.0, 3.0, 5.0, 7.0, 11.0, 13.0, 17.0, 19.0, 23.0, 29.0, 31.0],
    "wide": list(np.random.default_rng(5).uniform(0.01, 1.0, 40)),
    "256": list(np.random.default_rng(6).dirichlet(np.ones(256) * 0.5)),
    "300": [float(v) for v in np.random.default_rng(7).integers(0, 4, 300)],
}

MODES = [("greedy", False), ("greedy", True), ("random", False), ("block", True), ("block", False)]

# --- integer weights -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(WEIGHTS))
def test_integer_weights_match_reference(name: str) -> None:
    w = ops.normalize_weights(WEIGHTS[name])
    got, d = ops.sample_weights(w)
    want, want_d = ref_weights(w.tolist())
    assert got.tolist() == want and d == want_d
    assert all((got > 0) == (w > 0))
    assert d * int((w > 0).sum()) < 2**53  # every key fits a double exactly


def test_tiny_positive_weight_is_not_paused() -> None:
    w = ops.normalize_weights([1.0, 1e-300])
    got, _ = ops.sample_weights(w)
    assert got[1] == 1  # rounded to at least one unit, never to a pause
    r = kernel([1.0, 1e-300], "block", block_size=1, count=3)
    assert r.sources is not None and r.sources.tolist() == [0, 0, 0]


@pytest.mark.parametrize("block_size", [1, 2, 3, 7, 10, 1000, 10**6])
@pytest.mark.parametrize("name", ["three", "zeros", "skewed", "primes", "256"])
def test_block_counts_largest_remainder(name: str, block_size: int) -> None:
    w = ops.normalize_weights(WEIGHTS[name])
    big_w, d = ref_weights(w.tolist())
    got = ops.block_counts(w, block_size)
    assert got.tolist() == ref_block_counts(big_w, d, block_size)
    assert got.sum() == block_size
    assert np.all(got[w == 0] == 0)
    assert np.all(np.abs(got - w * block_size) < 1 + 1e-9)


# --- each mode vs its reference ------------------------------------------------------------------


@pytest.mark.parametrize("mode,shuffle", MODES)
@pytest.mark.parametrize(
    "name", ["three", "zeros", "one", "one-live", "equal8", "skewed", "primes"]
)
@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_kernel_matches_reference(name: str, mode: str, shuffle: bool, block_size: int) -> None:
    w, n = WEIGHTS[name], 200
    r = kernel(w, mode, seed=11, block_size=block_size, shuffle=shuffle, count=n)
    want = ref_segment(w, mode, 11, block_size, shuffle, 0, 0, n)
    assert r.sources is not None and r.ordinals is not None
    assert r.sources.tolist() == want
    assert r.ordinals.tolist() == ordinals_of(want, [0] * len(w))
    assert r.end_counts.tolist() == np.bincount(want, minlength=len(w)).tolist()


@pytest.mark.parametrize("mode,shuffle", MODES)
@pytest.mark.parametrize("name", ["wide", "256", "300"])
def test_many_sources_match_reference(name: str, mode: str, shuffle: bool) -> None:
    w, n = WEIGHTS[name], 700
    r = kernel(w, mode, seed=3, block_size=300, shuffle=shuffle, count=n)
    assert r.sources is not None
    assert r.sources.tolist() == ref_segment(w, mode, 3, 300, shuffle, 0, 0, n)


@pytest.mark.parametrize("mode,shuffle", MODES)
@pytest.mark.parametrize("start", [0, 1, 5, 7, 8, 20, 33])
def test_range_from_an_anchor(mode: str, shuffle: bool, start: int) -> None:
    """Any range (starting mid-block too) from the state at an earlier anchor, in a segment that
    starts later than position 0 and has an index > 0."""
    w, b, seg_start = WEIGHTS["primes"], 8, 100
    full = ref_segment(w, mode, 9, b, shuffle, 2, seg_start, 60)
    blocked = mode == "block" or shuffle
    anchor = (start // b) * b if blocked else start
    before = [3] * len(w)  # picks in earlier segments
    seg_counts = np.bincount(full[:anchor], minlength=len(w)).tolist()
    counts = [x + y for x, y in zip(before, seg_counts, strict=True)]
    # the global counts must add up to the anchor position: earlier segments' picks
    shift = seg_start - sum(before)
    counts[0] += shift
    r = kernel(w, mode, seed=9, block_size=b, shuffle=shuffle, anchor=seg_start + anchor,
               start=seg_start + start, count=60 - start, counts=counts,
               segment_counts=seg_counts, segment=2, segment_start=seg_start)  # fmt: skip
    assert r.sources is not None and r.ordinals is not None
    assert r.sources.tolist() == full[start:]
    all_ords = ordinals_of(full, [counts[s] - seg_counts[s] for s in range(len(w))])
    assert r.ordinals.tolist() == all_ords[start:]
    end_anchor = (60 // b) * b if blocked else 60
    assert r.anchor == seg_start + end_anchor
    assert r.segment_counts.tolist() == np.bincount(full[:end_anchor], minlength=len(w)).tolist()
    assert r.end_counts.tolist() == [
        c - sc + x for c, sc, x in
        zip(counts, seg_counts, np.bincount(full, minlength=len(w)).tolist(), strict=True)
    ]  # fmt: skip


@pytest.mark.parametrize("name", ["three", "zeros", "equal8", "primes", "wide", "256", "300"])
def test_greedy_paths_agree(name: str) -> None:
    """The scalar reference path, the fixed-size path and the SIMD path pick the same sources."""
    w, n = WEIGHTS[name], 20_000
    runs = [kernel(w, "greedy", count=n, greedy_path=p).sources for p in ops.GREEDY_PATHS]
    assert all(r is not None and np.array_equal(r, runs[0]) for r in runs)


@pytest.mark.parametrize("equal", [False, True])
@pytest.mark.parametrize("a", [2500, 5000])
def test_greedy_tree_for_thousands_of_sources(a: int, equal: bool) -> None:
    """From 2048 sources the kinetic tree runs (auto); it picks what the scans pick, also when
    resumed from a state mid-run."""
    rng = np.random.default_rng(a)
    w = np.ones(a) if equal else rng.uniform(0.0, 1.0, a) * (rng.random(a) > 0.1)
    n = 6000
    runs = {p: kernel(w, "greedy", count=n, greedy_path=p) for p in ("auto", "vector", "tree")}
    first = runs["auto"].sources
    assert first is not None
    assert all(r.sources is not None and np.array_equal(r.sources, first) for r in runs.values())
    half = np.bincount(first[:2500], minlength=a)
    rest = kernel(w, "greedy", anchor=2500, start=2500, count=n - 2500, counts=half,
                  segment_counts=half)  # fmt: skip
    assert rest.sources is not None and np.array_equal(rest.sources, first[2500:])


@pytest.mark.parametrize("a", [*range(1, 19), 31, 32, 33, 63, 64, 65, 129])
def test_greedy_paths_agree_every_width(a: int) -> None:
    w = np.random.default_rng(a).uniform(0.05, 1.0, a)
    runs = [kernel(w, "greedy", count=4000, greedy_path=p).sources for p in ops.GREEDY_PATHS]
    want = ref_greedy(*ref_weights(ops.normalize_weights(w).tolist()), 4000)
    assert all(r is not None and r.tolist() == want for r in runs)


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(
        st.one_of(st.just(0.0), st.floats(1e-6, 1e3), st.integers(1, 9).map(float)),
        min_size=1, max_size=12,
    ).filter(lambda w: any(v > 0 for v in w)),
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**64 - 1),
    block_size=st.sampled_from([1, 2, 3, 5, 16, 64]),
    start=st.integers(0, 150),
    count=st.integers(0, 150),
)  # fmt: skip
def test_kernel_matches_reference_hypothesis(
    weights: list[float], mode: tuple[str, bool], seed: int, block_size: int, start: int,
    count: int,
) -> None:  # fmt: skip
    name, shuffle = mode
    full = ref_segment(weights, name, seed, block_size, shuffle, 0, 0, start + count)
    r = kernel(weights, name, seed=seed, block_size=block_size, shuffle=shuffle, start=start,
               count=count)  # fmt: skip
    assert r.sources is not None and r.ordinals is not None
    assert r.sources.tolist() == full[start:]
    assert r.ordinals.tolist() == ordinals_of(full, [0] * len(weights))[start:]


def test_greedy_far_into_a_segment() -> None:
    """A state 2^40 positions into a segment: W * j overflows int64, the deficits do not."""
    j = 1 << 40
    r = kernel([0.25, 0.75], "greedy", anchor=j, start=j, count=64,
               counts=[j // 4, 3 * j // 4], segment_counts=[j // 4, 3 * j // 4])  # fmt: skip
    fresh = kernel([0.25, 0.75], "greedy", count=64)
    assert r.sources is not None and fresh.sources is not None
    assert r.sources.tolist() == fresh.sources.tolist()  # the deficits are back to zero
    assert r.ordinals is not None
    assert r.ordinals.tolist() == ordinals_of(fresh.sources.tolist(), [j // 4, 3 * j // 4])


def test_random_draw_depends_on_position_only() -> None:
    j = 1 << 45
    w = WEIGHTS["zeros"]
    counts = [0, j // 2, 0, j - j // 2, 0, 0]
    r = kernel(w, "random", seed=5, anchor=j, start=j, count=50, counts=counts,
               segment_counts=counts)  # fmt: skip
    assert r.sources is not None
    assert r.sources.tolist() == ref_random(*ref_weights(w), 5, range(j, j + 50))


def test_counting_only_equals_writing() -> None:
    w = WEIGHTS["wide"]
    for mode, shuffle in MODES:
        out = kernel(w, mode, shuffle=shuffle, block_size=37, count=5000)
        skip = kernel(w, mode, shuffle=shuffle, block_size=37, start=5000, count=0)
        assert skip.end_counts.tolist() == out.end_counts.tolist()
        assert skip.anchor == out.anchor


def test_random_parallel_count_matches_serial() -> None:
    """Skipping > 2^21 positions counts them on several threads; same counts as writing them."""
    w, n = WEIGHTS["three"], (1 << 21) + 12345
    out = kernel(w, "random", seed=1, count=n)
    skip = kernel(w, "random", seed=1, start=n, count=0)
    assert out.sources is not None
    assert skip.end_counts.tolist() == np.bincount(out.sources, minlength=3).tolist()


# --- proportions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["three", "zeros", "skewed", "primes", "wide", "256"])
def test_greedy_prefixes_track_the_weights(name: str) -> None:
    """Never ahead of w * n by a whole position (proven); behind by less than 2 (the worst we
    have seen is about 1.3)."""
    w = ops.normalize_weights(WEIGHTS[name])
    n = 20_000
    r = kernel(w, "greedy", count=n)
    assert r.sources is not None
    onehot = np.zeros((n, w.size), dtype=np.int32)
    onehot[np.arange(n), r.sources] = 1
    lag = w[None, :] * np.arange(1, n + 1)[:, None] - np.cumsum(onehot, axis=0)
    assert lag.min() > -1 and lag.max() < 2


@pytest.mark.parametrize("block_size", [1, 10, 333])
@pytest.mark.parametrize("name", ["three", "primes", "wide"])
def test_shuffled_greedy_stays_within_a_block(name: str, block_size: int) -> None:
    w = ops.normalize_weights(WEIGHTS[name])
    n = 20 * block_size + 17
    r = kernel(w, "greedy", shuffle=True, block_size=block_size, seed=2, count=n)
    plain = kernel(w, "greedy", count=n)
    assert r.sources is not None and plain.sources is not None
    for b in range(0, n - block_size, block_size):  # same multiset per block
        got = np.bincount(r.sources[b : b + block_size], minlength=w.size)
        want = np.bincount(plain.sources[b : b + block_size], minlength=w.size)
        assert got.tolist() == want.tolist()
    onehot = np.zeros((n, w.size), dtype=np.int32)
    onehot[np.arange(n), r.sources] = 1
    lag = w[None, :] * np.arange(1, n + 1)[:, None] - np.cumsum(onehot, axis=0)
    assert np.abs(lag).max() < block_size + 2


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("block_size", [1, 7, 1000, 10**6])
def test_block_counts_are_exact_per_block(block_size: int, shuffle: bool) -> None:
    w = ops.normalize_weights(WEIGHTS["primes"])
    blocks = max(2, 2_000_000 // block_size) if block_size > 1 else 50
    r = kernel(w, "block", seed=4, block_size=block_size, shuffle=shuffle,
               count=blocks * block_size)  # fmt: skip
    assert r.sources is not None
    want = ops.block_counts(w, block_size)
    per_block = r.sources.reshape(blocks, block_size)
    for b in range(blocks):
        assert np.bincount(per_block[b], minlength=w.size).tolist() == want.tolist()
    if block_size > 10:  # shuffled: each block its own order; else the same interleave
        assert np.array_equal(per_block[0], per_block[1]) != shuffle


def test_random_proportions_chi_square() -> None:
    w = ops.normalize_weights(WEIGHTS["primes"] + [0.0])
    n = 1_000_000
    r = kernel(w, "random", seed=8, count=n)
    assert r.sources is not None
    got = np.bincount(r.sources, minlength=w.size)
    assert got[-1] == 0
    expected = w[:-1] * n
    chi2 = float((((got[:-1] - expected) ** 2) / expected).sum())
    # 10 degrees of freedom: P(chi2 > 35.6) = 1e-4. Deterministic (seeded), so never flaky.
    assert chi2 < 35.6


# --- permute_rows --------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 7, 97, 1000, 1021, 1024, 1025, 65537])
def test_permute_rows_is_a_bijection_per_pass(length: int) -> None:
    passes = 3
    ordinals = np.arange(passes * length, dtype=np.int64)
    rows = ops.permute_rows(ordinals, length, seed=1, source=4)
    perms = rows.reshape(passes, length)
    for p in range(passes):
        assert np.array_equal(np.sort(perms[p]), np.arange(length))
    other = ops.permute_rows(ordinals, length, seed=1, source=5).reshape(passes, length)
    if length >= 7:
        assert not np.array_equal(perms[0], perms[1])  # a new order each pass
        assert not np.array_equal(perms[1], perms[2])
        assert not np.array_equal(perms[0], other[0])  # and for each source
        assert not np.array_equal(perms[0], np.arange(length))
    assert np.array_equal(ops.permute_rows(ordinals, length, seed=1, source=4, shuffle=False),
                          ordinals % length)  # fmt: skip


@pytest.mark.parametrize("length", [1, 2, 3, 10, 1000, 2**20 + 1])
def test_permute_rows_matches_reference(length: int) -> None:
    ords = np.random.default_rng(length).integers(0, 5 * length, 300)
    got = ops.permute_rows(ords, length, seed=77, source=2)
    assert got.tolist() == [ref_row(77, 2, int(k), length) for k in ords]


def test_permute_rows_per_element_sources_and_lengths() -> None:
    rng = np.random.default_rng(0)
    lengths = np.array([5, 1000, 3, 1 << 30], dtype=np.int64)
    sources = rng.integers(0, 4, 2000)
    ords = rng.integers(0, 10_000, 2000)
    got = ops.permute_rows(ords, lengths[sources], seed=9, source=sources)
    want = [ref_row(9, int(s), int(k), int(lengths[s])) for s, k in zip(sources, ords, strict=True)]
    assert got.tolist() == want


def test_permute_rows_billion_rows_needs_no_index() -> None:
    length = 10**9 + 7
    ords = np.array([0, 1, length - 1, length, 5 * length + 3], dtype=np.int64)
    got = ops.permute_rows(ords, length, seed=3, source=0)
    assert got.tolist() == [ref_row(3, 0, int(k), length) for k in ords]
    assert np.all((got >= 0) & (got < length))


def test_feistel_uniform_first_element() -> None:
    """Where row 0 lands, over many keys, is close to uniform (chi-square, 9 dof)."""
    n, keys = 10, 20_000
    got = ops.permute_rows(np.zeros(1, dtype=np.int64).repeat(keys) + n * np.arange(keys), n,
                           seed=0, source=0)  # fmt: skip
    counts = np.bincount(got, minlength=n)
    chi2 = float(((counts - keys / n) ** 2 / (keys / n)).sum())
    assert chi2 < 33.7  # P = 1e-4


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights,match",
    [
        ([1.0, -1.0], "source 1 .* -1.0"),
        ([1.0, float("nan")], "source 1 .* nan"),
        ([float("inf"), 1.0], "source 0 .* inf"),
        ([0.0, 0.0], "all 2 weights are zero"),
        ([], "non-empty"),
    ],
)
def test_bad_weights(weights: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ops.normalize_weights(weights)


def test_bad_weights_in_the_kernel() -> None:
    """The kernel checks too (the ops layer is not the only caller)."""
    from mixtape import _C

    z = np.zeros(2, dtype=np.int64)
    with pytest.raises(ValueError, match="source 1 has weight -1"):
        _C.sample_sources(np.array([1.0, -1.0]), z.copy(), z.copy(), mode="greedy", seed=0,
                          block_size=1, shuffle=False, segment=0, segment_start=0, anchor=0,
                          start=0, count=1)  # fmt: skip
    with pytest.raises(ValueError, match=r"mode must be one of .* 'fast'"):
        _C.sample_sources(np.array([1.0, 1.0]), z.copy(), z.copy(), mode="fast", seed=0,
                          block_size=1, shuffle=False, segment=0, segment_start=0, anchor=0,
                          start=0, count=1)  # fmt: skip


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "fast"}, "mode must be one of .*'greedy'.* got 'fast'"),
        ({"mode": "block", "block_size": 0}, "block_size must be in"),
        ({"mode": "random", "shuffle": True}, "shuffle does not apply to mode 'random'"),
        ({"anchor": 5}, "counts add up to 0, not to the anchor position 5"),
        ({"start": -1}, "anchor <= start"),
        ({"mode": "block", "shuffle": True, "block_size": 4, "anchor": 2, "counts": [2, 0, 0],
          "segment_counts": [2, 0, 0]}, "not a block start"),
        ({"anchor": 3, "counts": [3, 0, 0], "segment_counts": [3, 0, 0]},
         "source 0 was picked 3 times in 3 positions"),
        ({"anchor": 2, "counts": [1, 1, 0], "segment_counts": [1, 0, 0]},
         "segment counts add up to 1"),
        ({"mode": "block", "shuffle": True, "block_size": 2, "anchor": 2, "counts": [0, 2, 0],
          "segment_counts": [0, 2, 0]}, "block mode gives exactly"),
        ({"anchor": 1, "counts": [0, 0, 1], "segment_counts": [0, 0, 2]}, "segment count 2"),
    ],
)
def test_bad_options_and_states(kwargs: dict, match: str) -> None:
    args = {"mode": "greedy", "count": 4, "start": kwargs.get("anchor", 0), **kwargs}
    with pytest.raises(ValueError, match=match):
        kernel([0.6, 0.4, 0.0] if "zero" in match else [0.5, 0.3, 0.2], **args)


def test_zero_weight_with_picks_is_rejected() -> None:
    with pytest.raises(ValueError, match="source 2 has weight 0 but 1 picks"):
        kernel([0.5, 0.5, 0.0], "greedy", anchor=1, start=1, counts=[0, 0, 1],
               segment_counts=[0, 0, 1], count=1)  # fmt: skip


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ops.permute_rows([-1], 5, seed=0, source=0), r"ordinals\[0\] = -1"),
        (lambda: ops.permute_rows([1, 2], [5, 0], seed=0, source=0), r"length\[1\] = 0"),
        (lambda: ops.permute_rows([1, 2], [5, 5, 5], seed=0, source=0), "one per ordinal"),
        (lambda: ops.permute_rows([1], 5, seed=-1, source=0), "seed must be in"),
        (lambda: ops.permute_rows([[1]], 5, seed=0, source=0), "1-D"),
    ],
)
def test_bad_permute_rows(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_permute_rows_types() -> None:
    with pytest.raises(TypeError, match="ordinals must be integers"):
        ops.permute_rows(np.array([1.5]), 5, seed=0, source=0)
    with pytest.raises(TypeError, match="seed must be an int"):
        ops.permute_rows([1], 5, seed=1.0, source=0)  # type: ignore[arg-type]
