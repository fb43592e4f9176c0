// sample: which source serves each global position of a weighted mixture, and which ordinal of
// that source it reads; plus the per-source row permutation those ordinals map through.
//
// Contract. Sources 0..S-1 have non-negative finite weights (at least one positive) that hold for
// a weight *segment*: the positions [segment_start, next segment's start). The source at global
// position i, and its ordinal (how many times that source was chosen before i, across all
// segments), are a pure function of (seed, weight timeline, i); a call computes a range of
// positions of one segment from a saved *anchor* state, so any range can be computed without
// replaying the run, and state to resume is a few integers per source.
//
// Weights are used as integers: W_s = round(w_s / sum(w) * 2^P) (at least 1 when w_s > 0),
// D = sum(W_s), P = 52 - ceil(log2 A) for A positive weights, so every key below is an exact
// integer in a double (|key| < A * D <= 2^53) and every mode is exact integer arithmetic:
// bit-identical on every platform, compiler and ISA. Proportions are those of the integers,
// within 2^-P of the float weights. A zero weight pauses its source: it is never chosen.
//
// Modes (j = position - segment_start, c_s = picks of s since segment_start):
//  - greedy: position j goes to argmax_s W_s * (j + 1) - c_s * D (ties to the lowest index): the
//    deficit-minimising interleave, restarted at each segment (no catch-up burst after a weight
//    change). Any prefix of a segment has c_s < w_s * n + 1 for every s (a source is never ahead
//    of its share by a whole position); behind its share by more than 1 happens from 4 sources on
//    (about 1.3 at most in our tests). The argmax is an unrolled scan up to 16 sources, a SIMD
//    scan above, a kinetic tournament tree from 2048 (GreedyPath). With shuffle, each block of
//    block_size positions (aligned to segment_start) holds the same multiset as the greedy output,
//    in an order drawn by a Fisher-Yates shuffle keyed by (seed, segment, block), so prefixes stay
//    within a block of w * n. The seed is not used without shuffle.
//  - random: i.i.d. draws: Vose's alias table over the integer weights, indexed by the counter
//    hash of (seed, global position): the draw at i depends on (seed, weights in force, i) only.
//  - block: every block holds exactly n_s = floor(W_s * B / D) picks of s plus one for the
//    B - sum(n_s) largest remainders (ties to the lowest index); shuffle puts them in a
//    Fisher-Yates order keyed by (seed, segment, block), otherwise in the greedy interleave of
//    the counts (which meets them exactly at the block's end).
// The last block of a segment may be cut short by the next segment: its positions are the first
// ones of the full block's order, so positions before a weight change never depend on it.
//
// State. A call resumes from an anchor: the global and segment counts before a position (a block
// start in the block-based modes, whose positions depend on the whole block). Positions before
// the requested range are only counted: whole blocks in closed form (block mode) or by the greedy
// run without the shuffle, random draws on all threads, so a seek costs at most one pass.
//
// Rows. permute_rows maps the ordinal k of source s (a dataset of `length` rows) to row
// pi(k mod length), pi the FeistelPermutation keyed by (seed, s, pass = k div length): each pass
// reads every row once, in a new order, with O(1) memory per element.
#pragma once

#include <cstdint>
#include <string>

#include "common/macros.h"
#include "common/rng.h"

namespace mixtape {

enum class SampleMode : int32_t { kGreedy = 0, kRandom = 1, kBlock = 2 };

// Throws std::invalid_argument listing the valid names.
SampleMode parse_sample_mode(const std::string& name);

// Kernel paths of the greedy argmax: a linear scan (unrolled up to 16 sources, SIMD above) or a
// kinetic tournament tree (from 2048 sources). kAuto picks by source count; the others exist so
// the tests can check every path gives the same output.
enum class GreedyPath : int32_t { kAuto = 0, kScalar = 1, kVector = 2, kTree = 3 };

struct SampleOptions {
  SampleMode mode = SampleMode::kGreedy;
  uint64_t seed = 0;
  int64_t block_size = 1000;  // B: greedy with shuffle, and block mode
  bool shuffle = false;       // greedy and block: permute within each block
  int64_t segment = 0;        // index of the weight segment: keys the in-block orders
  int64_t segment_start = 0;  // global position of the segment's first position
  GreedyPath greedy_path = GreedyPath::kAuto;
};

// Whether the mode works in whole blocks (anchors are block starts).
MIXTAPE_HD bool sample_uses_blocks(SampleMode mode, bool shuffle) {
  return mode == SampleMode::kBlock || (mode == SampleMode::kGreedy && shuffle);
}

// Key tags: the sub-streams of one seed used by the sampler.
constexpr uint64_t kTagRandomDraws = 0x72616e646f6d0001ull;
constexpr uint64_t kTagBlockOrder = 0x626c6f636b000002ull;
constexpr uint64_t kTagRows = 0x726f777300000003ull;

// The random-mode draw at a position: `h` the counter hash of (seed, position), `prob` and
// `alias` the integer alias table over the A positive sources (prob in [0, D]).
MIXTAPE_HD int64_t alias_draw(uint64_t h, const uint64_t* prob, const int32_t* alias, int64_t a,
                              uint64_t d) {
  const uint64_t bin = mulhi64(h, static_cast<uint64_t>(a));
  const uint64_t frac = h * static_cast<uint64_t>(a);  // the fractional part of h * A / 2^64
  return mulhi64(frac, d) < prob[bin] ? static_cast<int64_t>(bin) : alias[bin];
}

// The row of ordinal `ordinal` of a source with `length` rows (ordinal >= 0, length >= 1).
MIXTAPE_HD int64_t permuted_row(uint64_t rows_key, int64_t source, int64_t ordinal,
                                int64_t length) {
  const int64_t pass = ordinal / length;
  const int64_t k = ordinal - pass * length;
  const FeistelPermutation pi(derive_key(rows_key, static_cast<uint64_t>(source),
                                         static_cast<uint64_t>(pass)),
                              static_cast<uint64_t>(length));
  return static_cast<int64_t>(pi(static_cast<uint64_t>(k)));
}

// One segment's range of positions from an anchor state.
//
// In: `weights` [S] (finite, >= 0, one > 0), the anchor state: *anchor (a position in the
// segment, a block start in block-based modes), counts [S] (global picks before it) and
// segment_counts [S] (picks since segment_start before it). Writes sources [count] and ordinals
// [count] (either may be null) for positions [start, start + count), start >= *anchor.
// Out: the state moved to the last anchor at or before start + count (start + count itself
// outside block-based modes), and end_counts [S] (may be null): the global counts before
// start + count. Throws std::invalid_argument for bad weights or options, or an anchor state
// that no run can reach (a saved state that was altered or belongs to other weights).
void sample_sources_cpu(const double* weights, int64_t num_sources, const SampleOptions& o,
                        int64_t* anchor, int64_t* counts, int64_t* segment_counts, int64_t start,
                        int64_t count, int32_t* sources, int64_t* ordinals, int64_t* end_counts);

// The integer weights W [S] of the contract; returns D. Throws for bad weights.
int64_t quantize_weights(const double* weights, int64_t num_sources, int64_t* out);

// Exact per-block counts of block mode [S] for block size B (largest remainder).
void block_counts(const int64_t* w, int64_t num_sources, int64_t d, int64_t block_size,
                  int64_t* out);

// rows[i] = permuted_row(key(seed), source[i], ordinals[i], length[i]) (or ordinal mod length
// without shuffle). `source` and `length` are arrays of n or, with stride 0, one value for all.
// Throws for a negative ordinal or a length < 1, naming the element.
void permute_rows_cpu(const int64_t* ordinals, int64_t n, const int64_t* length,
                      int64_t length_stride, const int64_t* source, int64_t source_stride,
                      uint64_t seed, bool shuffle, int64_t* rows);

}  // namespace mixtape
