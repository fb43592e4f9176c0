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
