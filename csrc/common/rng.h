// Counter-based randomness shared by the ops that need it (pack row shuffle, the source sampler,
// random projections): every value is a pure function of (seed, counter), identical on every
// platform and on host and device, so any position can be computed without replaying the ones
// before it.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace mixtape {

// The splitmix64 finaliser (Steele, Lea, Flood 2014): a bijective 64-bit mix.
MIXTAPE_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The counter-th output of the splitmix64 stream started at `seed`: hash(seed, counter).
MIXTAPE_HD uint64_t counter_hash(uint64_t seed, uint64_t counter) {
  return mix64(seed + (counter + 1) * 0x9E3779B97F4A7C15ull);
}

// A key for a sub-stream (e.g. one per source and pass) derived from a seed and up to two tags.
MIXTAPE_HD uint64_t derive_key(uint64_t seed, uint64_t a, uint64_t b = 0) {
  return mix64(mix64(seed ^ mix64(a + 0x632BE59BD9B4E019ull)) ^ mix64(b + 0x8CB92BA72F3D8DD7ull));
}

// Uniform double in [0, 1) from the top 53 bits.
MIXTAPE_HD double to_unit(uint64_t x) { return static_cast<double>(x >> 11) * 0x1.0p-53; }

// The high 64 bits of the 128-bit product a * b.
MIXTAPE_HD uint64_t mulhi64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#elif defined(__SIZEOF_INT128__)
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#else
  const uint64_t a_lo = a & 0xFFFFFFFFull, a_hi = a >> 32, b_lo = b & 0xFFFFFFFFull, b_hi = b >> 32;
  const uint64_t lo_lo = a_lo * b_lo, hi_lo = a_hi * b_lo, lo_hi = a_lo * b_hi;
  const uint64_t cross = (lo_lo >> 32) + (hi_lo & 0xFFFFFFFFull) + lo_hi;
  return a_hi * b_hi + (hi_lo >> 32) + (cross >> 32);
#endif
}

// splitmix64 as a sequential generator (same stream as counter_hash(seed, 0), (seed, 1), ...).
struct SplitMix64 {
  uint64_t state;
  MIXTAPE_HD uint64_t next() { return mix64(state += 0x9E3779B97F4A7C15ull); }
  // Uniform in [0, n), n >= 1, by rejection (no modulo bias).
  MIXTAPE_HD uint64_t below(uint64_t n) {
    const uint64_t threshold = (0 - n) % n;  // 2^64 mod n
    for (;;) {
      const uint64_t x = next();
      if (x >= threshold) return x % n;
    }
  }
  // Uniform in [0, n), n >= 1, exactly (Lemire's multiply-and-reject): the same distribution as
  // below() from a different draw, with a division only on the rare rejection path.
  MIXTAPE_HD uint64_t bounded(uint64_t n) {
    uint64_t x = next();
    uint64_t lo = x * n;
    if (lo < n) {
      const uint64_t threshold = (0 - n) % n;
      while (lo < threshold) {
        x = next();
        lo = x * n;
      }
    }
    return mulhi64(x, n);
  }
};

// A keyed pseudo-random bijection of [0, n), evaluated per element in O(1) time and memory, so a
// permutation of a billion rows needs no index array and any element's image is known without
// the others. A 4-round Feistel network over the b = max(2, ceil(log2 n)) bit domain (halves of
// floor(b/2) and ceil(b/2) bits alternating, round function mix64 of the keyed half), restricted
// to [0, n) by cycle walking: images >= n are mapped again until one falls below n, which is a
// bijection because every cycle through an element < n returns to it. Fewer than 2 passes per
// element on average (the domain is below 2n for n > 2).
struct FeistelPermutation {
  uint64_t n;
  uint64_t round_key[4];
  int lo_bits;  // width of the low half entering round 0; the high half has hi_bits
  int hi_bits;

  MIXTAPE_HD FeistelPermutation(uint64_t key, uint64_t n_) : n(n_) {
    int bits = 2;
    while (bits < 64 && (uint64_t{1} << bits) < n) ++bits;
    hi_bits = bits / 2;
    lo_bits = bits - hi_bits;
    for (int r = 0; r < 4; ++r) round_key[r] = mix64(key + (r + 1) * 0x9E3779B97F4A7C15ull);
  }

  // One pass through the network: a bijection of [0, 2^b).
  MIXTAPE_HD uint64_t network(uint64_t x) const {
    int lw = hi_bits, rw = lo_bits;  // x = L << rw | R
    for (int r = 0; r < 4; ++r) {
      const uint64_t right = x & ((uint64_t{1} << rw) - 1);
      const uint64_t left = x >> rw;
      const uint64_t mixed = (left ^ mix64(right ^ round_key[r])) & ((uint64_t{1} << lw) - 1);
      x = (right << lw) | mixed;  // the halves swap places and widths
      const int t = lw;
      lw = rw;
      rw = t;
    }
    return x;
  }

  // The image of i in [0, n).
  MIXTAPE_HD uint64_t operator()(uint64_t i) const {
    if (n <= 1) return 0;
    uint64_t x = network(i);
    while (x >= n) x = network(x);
    return x;
  }
};

}  // namespace mixtape

// --- datainf: random signs for on-the-fly projections ------------------------------------------
// Appended in its own block; the functions above are shared and stay unchanged.

namespace mixtape {

// 64 independent fair random signs (one per bit) of word `word` of the stream `key`: the sign of
// entry j of that stream is bit (j & 63) of rademacher_word(key, j >> 6), so a consumer expanding
// a whole word and one reading a single entry see the same value.
MIXTAPE_HD uint64_t rademacher_word(uint64_t key, uint64_t word) { return counter_hash(key, word); }

// Entry j of the Rademacher stream `key`: +1 or -1 with probability 1/2 each.
MIXTAPE_HD float rademacher(uint64_t key, uint64_t j) {
  return ((rademacher_word(key, j >> 6) >> (j & 63)) & 1u) ? -1.0f : 1.0f;
}

}  // namespace mixtape
