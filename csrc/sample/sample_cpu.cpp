// The source sampler on the CPU: greedy (exact integer argmax, scalar or SIMD), random (integer
// alias table over counter hashes), block (exact largest-remainder counts); see sample.h.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/parallel.h"
#include "sample/sample.h"

// The SIMD argmax is compiled for several ISAs and picked at load time (ifunc). Every path does
// the same exact integer arithmetic in doubles, so the choice changes speed, never the output.
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__CUDACC__)
#define MIXTAPE_TARGET_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define MIXTAPE_TARGET_CLONES
#endif

namespace mixtape {

namespace {

constexpr int64_t kMaxSources = int64_t{1} << 24;
constexpr int64_t kMaxBlockSize = int64_t{1} << 28;
constexpr int64_t kMaxPosition = int64_t{1} << 62;

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

std::string num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

int ceil_log2(int64_t a) {
  int b = 0;
  while ((int64_t{1} << b) < a) ++b;
  return b;
}

// floor(a * b / d) and the remainder, exactly (a, b >= 0, d > 0).
uint64_t mul_div(uint64_t a, uint64_t b, uint64_t d, uint64_t* rem) {
#if defined(__SIZEOF_INT128__)
  const unsigned __int128 p = static_cast<unsigned __int128>(a) * b;
  *rem = static_cast<uint64_t>(p % d);
  return static_cast<uint64_t>(p / d);
#else
  // Long division of the 128-bit product, one bit at a time (S values per call: cheap enough).
  const uint64_t hi = mulhi64(a, b), lo = a * b;
  uint64_t q = 0, r = 0;
  for (int i = 127; i >= 0; --i) {
    const uint64_t bit = i >= 64 ? (hi >> (i - 64)) & 1 : (lo >> i) & 1;
    const bool carry = (r >> 63) != 0;
    r = (r << 1) | bit;
    if (carry || r >= d) {
      r -= d;
      if (i < 64) q |= uint64_t{1} << i;
    }
  }
  *rem = r;
  return q;
#endif
}

// --- greedy ----------------------------------------------------------------------------------
//
// Candidate keys k_s = W_s * (j + 1) - c_s * D for the next position j, over the A positive
// sources: pick the largest (lowest index on ties), subtract D from it, add W to all. Keys stay in
// (-D, A * D), so doubles hold them exactly and every path gives the same picks.

constexpr int kLanes = 8;

// From this many positive weights on, the kinetic tree (O(log A) per position) beats the SIMD
// scan (O(A)); measured with AVX-512, where the scan is fastest (M positions/s, scan vs tree):
// 1024 sources 4.8 vs 4.0, 2048: 2.9 vs 3.3, 4096: 1.4 vs 2.9, 65536: 0.07 vs 2.9.
constexpr int64_t kTreeFrom = 2048;

// A kinetic tournament tree over the keys k_s(t) = W_s * t - C_s, t = j + 1, C_s = c_s * D: each
// node holds the winner of its subtree (largest key, lowest index on ties) and the first t at
// which that may change (a loser with a larger slope overtakes, or a child changes). A pick
// lowers one leaf and invalidates its path; stale nodes are recomputed from the root down on the
// next position. Keys are evaluated modulo 2^64 (exact: their true values are small).
struct GreedyTree {
  int64_t leaves = 1;
  std::vector<int64_t> w;   // by active index
  std::vector<uint64_t> c;  // C_s
  uint64_t d = 0;
  int64_t t = 1;
  std::vector<int32_t> win;  // heap order: node v has children 2v, 2v + 1; -1 for none
  std::vector<int64_t> expiry;

  int64_t key(int32_t i, int64_t at) const {
    return static_cast<int64_t>(static_cast<uint64_t>(w[i]) * static_cast<uint64_t>(at) - c[i]);
  }

  void compute(int64_t v, int64_t at) {
    const int32_t a = win[2 * v], b = win[2 * v + 1];
    int64_t e = std::min(expiry[2 * v], expiry[2 * v + 1]);
    if (a < 0 || b < 0) {
      win[v] = a < 0 ? b : a;
      expiry[v] = e;
      return;
    }
    const int64_t ka = key(a, at), kb = key(b, at);
    const bool a_wins = ka > kb || (ka == kb && a < b);
    const int32_t top = a_wins ? a : b, low = a_wins ? b : a;
    const int64_t gap = a_wins ? ka - kb : kb - ka;  // >= 0
    const int64_t faster = w[low] - w[top];
    if (faster > 0) {
      // The loser leads after m more positions: gap - m * faster < 0, or == 0 with the lower
      // index. An earlier expiry only costs a recomputation, so m is capped.
      const int64_t m = low < top ? (gap + faster - 1) / faster : gap / faster + 1;
      e = std::min(e, at + std::min<int64_t>(m, int64_t{1} << 40));
    }
    win[v] = top;
    expiry[v] = e;
  }

  void refresh(int64_t v, int64_t at) {
    if (expiry[v] > at) return;
    if (v < leaves) {
      refresh(2 * v, at);
      refresh(2 * v + 1, at);
      compute(v, at);
    }
  }

  void build(int64_t a) {
    while (leaves < a) leaves *= 2;
    win.assign(2 * leaves, -1);
    expiry.assign(2 * leaves, std::numeric_limits<int64_t>::max());
    for (int64_t i = 0; i < a; ++i) win[leaves + i] = static_cast<int32_t>(i);
    for (int64_t v = leaves - 1; v >= 1; --v) compute(v, t);
  }

  void run(const int32_t* ids, int64_t n, int32_t* out) {
    for (int64_t p = 0; p < n; ++p, ++t) {
      refresh(1, t);
      const int32_t s = win[1];
      out[p] = ids[s];
      c[s] += d;
      for (int64_t v = (leaves + s) / 2; v >= 1; v /= 2) {
        expiry[v] = std::numeric_limits<int64_t>::min();
      }
    }
  }
};

struct Greedy {
  std::vector<int32_t> ids;  // positive-weight sources, ascending
  std::vector<double> w;     // padded to a multiple of kLanes: weight 0, key -inf
  std::vector<double> key;
  double d = 0;
  int64_t a = 0;
  bool use_tree = false;
  GreedyTree tree;
};

template <int N>
void greedy_fixed(Greedy& g, int64_t n, int32_t* out) {
  double k[N], w[N];
  int32_t ids[N];
  for (int i = 0; i < N; ++i) {
    k[i] = g.key[i];
    w[i] = g.w[i];
    ids[i] = g.ids[i];
  }
  const double d = g.d;
  for (int64_t p = 0; p < n; ++p) {
    int best = 0;
    double top = k[0];
    for (int i = 1; i < N; ++i) {
      const bool gt = k[i] > top;
      top = gt ? k[i] : top;
      best = gt ? i : best;
    }
    out[p] = ids[best];
    k[best] -= d;
    for (int i = 0; i < N; ++i) k[i] += w[i];
  }
  for (int i = 0; i < N; ++i) g.key[i] = k[i];
}

// The reference path: any A, one comparison at a time.
void greedy_scalar(Greedy& g, int64_t n, int32_t* out) {
  double* k = g.key.data();
  const double* w = g.w.data();
  const int64_t a = g.a;
  for (int64_t p = 0; p < n; ++p) {
    int64_t best = 0;
    for (int64_t i = 1; i < a; ++i) best = k[i] > k[best] ? i : best;
    out[p] = g.ids[best];
    k[best] -= g.d;
    for (int64_t i = 0; i < a; ++i) k[i] += w[i];
  }
}

}  // namespace

#if defined(__GNUC__)
namespace sample_detail {

typedef double vec8 __attribute__((vector_size(64), aligned(8)));
typedef int64_t mask8 __attribute__((vector_size(64), aligned(8)));

// The argmax over kLanes-wide vectors: per lane the first maximum (strict >), then the lanes'
// maximum with the lowest index. Keys are kept one addition behind (the add of W is fused into
// the next scan), so each position is one pass over the keys.
MIXTAPE_TARGET_CLONES
void greedy_vector(const double* w, double d, double* key, int64_t vectors, const int32_t* ids,
                   int64_t n, int32_t* out) {
  vec8* kv = reinterpret_cast<vec8*>(key);
  const vec8* wv = reinterpret_cast<const vec8*>(w);
  const vec8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  for (int64_t i = 0; i < vectors; ++i) kv[i] -= wv[i];
  for (int64_t p = 0; p < n; ++p) {
    vec8 top = kv[0] + wv[0];
    kv[0] = top;
    vec8 idx = lane;
    for (int64_t i = 1; i < vectors; ++i) {
      const vec8 x = kv[i] + wv[i];
      kv[i] = x;
      const mask8 gt = x > top;
      top = gt ? x : top;
      idx = gt ? lane + static_cast<double>(kLanes * i) : idx;
    }
    double best = top[0];
    double at = idx[0];
    for (int l = 1; l < kLanes; ++l) {
      if (top[l] > best || (top[l] == best && idx[l] < at)) {
        best = top[l];
        at = idx[l];
      }
    }
    const int64_t b = static_cast<int64_t>(at);
    out[p] = ids[b];
    key[b] -= d;
  }
  for (int64_t i = 0; i < vectors; ++i) kv[i] += wv[i];
}

}  // namespace sample_detail
#endif

namespace {

void greedy_run(Greedy& g, GreedyPath path, int64_t n, int32_t* out) {
  if (n <= 0) return;
  if (g.a == 1) {
    std::fill(out, out + n, g.ids[0]);
    return;  // the one key grows by W - D = 0 per position
  }
  if (g.use_tree) return g.tree.run(g.ids.data(), n, out);
  if (path == GreedyPath::kScalar) return greedy_scalar(g, n, out);
#if defined(__GNUC__)
  if (path == GreedyPath::kVector || g.a > 16) {
    const int64_t vectors = static_cast<int64_t>(g.key.size()) / kLanes;
    return sample_detail::greedy_vector(g.w.data(), g.d, g.key.data(), vectors, g.ids.data(), n,
                                        out);
  }
#endif
  switch (g.a) {
    case 2: return greedy_fixed<2>(g, n, out);
    case 3: return greedy_fixed<3>(g, n, out);
    case 4: return greedy_fixed<4>(g, n, out);
    case 5: return greedy_fixed<5>(g, n, out);
    case 6: return greedy_fixed<6>(g, n, out);
    case 7: return greedy_fixed<7>(g, n, out);
    case 8: return greedy_fixed<8>(g, n, out);
    case 9: return greedy_fixed<9>(g, n, out);
    case 10: return greedy_fixed<10>(g, n, out);
    case 11: return greedy_fixed<11>(g, n, out);
    case 12: return greedy_fixed<12>(g, n, out);
    case 13: return greedy_fixed<13>(g, n, out);
    case 14: return greedy_fixed<14>(g, n, out);
    case 15: return greedy_fixed<15>(g, n, out);
    case 16: return greedy_fixed<16>(g, n, out);
    default: return greedy_scalar(g, n, out);
  }
}

// The greedy state `j` positions into its run, after c[s] picks of each source (c of the
// zero-weight sources must be 0). Checks the state is one a run can reach: sum(c) == j and every
// deficit W_s * j - c_s * D in (-D, (A - 1) * D).
Greedy greedy_init(const int64_t* w, int64_t num_sources, int64_t d, int64_t j, const int64_t* c,
                   GreedyPath path, const char* what) {
  Greedy g;
  g.d = static_cast<double>(d);
  int64_t total = 0;
  for (int64_t s = 0; s < num_sources; ++s) {
    total += c[s];
    if (w[s] > 0) g.ids.push_back(static_cast<int32_t>(s));
  }
  g.a = static_cast<int64_t>(g.ids.size());
  if (total != j) {
    fail(std::string(what) + ": the segment counts add up to " + std::to_string(total) +
         ", not to the " + std::to_string(j) + " positions since the segment start");
  }
  const int64_t padded = (g.a + kLanes - 1) / kLanes * kLanes;
  g.w.assign(padded, 0.0);
  g.key.assign(padded, -std::numeric_limits<double>::infinity());
  for (int64_t i = 0; i < g.a; ++i) {
    const int64_t s = g.ids[i];
    // The true value is small, so arithmetic modulo 2^64 gives it exactly.
    const int64_t deficit = static_cast<int64_t>(static_cast<uint64_t>(w[s]) *
                                                     static_cast<uint64_t>(j) -
                                                 static_cast<uint64_t>(c[s]) *
                                                     static_cast<uint64_t>(d));
    if (deficit <= -d || deficit >= (g.a - 1) * d + 1 || c[s] > j) {
      fail(std::string(what) + ": source " + std::to_string(s) + " was picked " +
           std::to_string(c[s]) + " times in " + std::to_string(j) +
           " positions, which the greedy rule never does with these weights");
    }
    g.w[i] = static_cast<double>(w[s]);
    g.key[i] = static_cast<double>(deficit + w[s]);
  }
  g.use_tree = path == GreedyPath::kTree || (path == GreedyPath::kAuto && g.a >= kTreeFrom);
  if (g.use_tree) {
    g.tree.d = static_cast<uint64_t>(d);
    g.tree.t = j + 1;
    g.tree.w.resize(g.a);
    g.tree.c.resize(g.a);
    for (int64_t i = 0; i < g.a; ++i) {
      g.tree.w[i] = w[g.ids[i]];
      g.tree.c[i] = static_cast<uint64_t>(c[g.ids[i]]) * static_cast<uint64_t>(d);
    }
    g.tree.build(g.a);
  }
  for (int64_t s = 0; s < num_sources; ++s) {
    if (w[s] == 0 && c[s] != 0) {
      fail(std::string(what) + ": source " + std::to_string(s) + " has weight 0 but " +
           std::to_string(c[s]) + " picks in the segment");
    }
  }
  return g;
}

// --- random ----------------------------------------------------------------------------------

struct AliasTable {
  std::vector<int32_t> ids;  // positive-weight sources
  std::vector<uint64_t> prob;
  std::vector<int32_t> alias;
  uint64_t d = 0;
};

// Vose's alias method in integers: bin i keeps itself with probability prob[i] / D, else its
// alias. Scaled weights W_s * A (< 2^53) against the mean D, so no rounding anywhere.
AliasTable alias_table(const int64_t* w, int64_t num_sources, int64_t d) {
  AliasTable t;
  for (int64_t s = 0; s < num_sources; ++s) {
    if (w[s] > 0) t.ids.push_back(static_cast<int32_t>(s));
  }
  const int64_t a = static_cast<int64_t>(t.ids.size());
  t.d = static_cast<uint64_t>(d);
  t.prob.assign(a, t.d);
  t.alias.resize(a);
  std::vector<int64_t> p(a);
  std::vector<int32_t> small, large;
  for (int64_t i = 0; i < a; ++i) {
    p[i] = w[t.ids[i]] * a;
    t.alias[i] = static_cast<int32_t>(i);
    (p[i] < d ? small : large).push_back(static_cast<int32_t>(i));
  }
  while (!small.empty() && !large.empty()) {
    const int32_t l = small.back();
    small.pop_back();
    const int32_t g = large.back();
    t.prob[l] = static_cast<uint64_t>(p[l]);
    t.alias[l] = g;
    p[g] -= d - p[l];
    if (p[g] < d) {
      large.pop_back();
      small.push_back(g);
    }
  }
  // Exact arithmetic leaves only full bins (prob = D, alias = itself), already set.
  return t;
}

// --- blocks ----------------------------------------------------------------------------------

// The in-block order of block `block` of a segment: Fisher-Yates keyed by (seed, segment, block).
void shuffle_block(int32_t* buf, int64_t size, uint64_t order_key, int64_t segment, int64_t block) {
  SplitMix64 rng{derive_key(order_key, static_cast<uint64_t>(segment),
                            static_cast<uint64_t>(block))};
  for (int64_t i = size - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(rng.bounded(static_cast<uint64_t>(i + 1)));
    std::swap(buf[i], buf[j]);
  }
}

// Picks of positions [pos, pos + n) (sources in `picked`), of which those at or after `start` are
// written out with their ordinals; counts and segment counts advance.
inline void record(const int32_t* picked, int64_t n, int64_t pos, int64_t start, int64_t* counts,
                   int64_t* segment_counts, int32_t* sources, int64_t* ordinals) {
  for (int64_t q = 0; q < n; ++q) {
    const int32_t s = picked[q];
    const int64_t p = pos + q;
    if (p >= start) {
      if (sources) sources[p - start] = s;
      if (ordinals) ordinals[p - start] = counts[s];
    }
    ++counts[s];
    ++segment_counts[s];
  }
}

void check_options(const SampleOptions& o, int64_t num_sources, int64_t anchor, int64_t start,
                   int64_t count) {
  if (num_sources < 1 || num_sources > kMaxSources) {
    fail("sample: the number of sources must be in [1, 2^24], got " +
         std::to_string(num_sources));
  }
  if (o.mode != SampleMode::kGreedy && o.mode != SampleMode::kRandom &&
      o.mode != SampleMode::kBlock) {
    fail("sample: unknown mode " + std::to_string(static_cast<int>(o.mode)));
  }
  if (o.mode == SampleMode::kRandom && o.shuffle) {
    fail("sample: shuffle does not apply to mode 'random' (its draws are already i.i.d.)");
  }
  if (sample_uses_blocks(o.mode, o.shuffle) &&
      (o.block_size < 1 || o.block_size > kMaxBlockSize)) {
    fail("sample: block_size must be in [1, 2^28], got " + std::to_string(o.block_size));
  }
  if (o.segment < 0 || o.segment_start < 0) {
    fail("sample: segment and segment_start must be >= 0, got " + std::to_string(o.segment) +
         " and " + std::to_string(o.segment_start));
  }
  if (anchor < o.segment_start || start < anchor || count < 0 || start > kMaxPosition ||
      count > kMaxPosition - start) {
    fail("sample: positions must satisfy segment_start <= anchor <= start and 0 <= count, with "
         "start + count <= 2^62; got segment_start=" + std::to_string(o.segment_start) +
         ", anchor=" + std::to_string(anchor) + ", start=" + std::to_string(start) +
         ", count=" + std::to_string(count));
  }
}

void check_counts(const int64_t* w, int64_t num_sources, int64_t anchor, int64_t segment_start,
                  const int64_t* counts, const int64_t* segment_counts) {
  int64_t total = 0;
  for (int64_t s = 0; s < num_sources; ++s) {
    if (segment_counts[s] < 0 || counts[s] < segment_counts[s]) {
      fail("sample state: source " + std::to_string(s) + " has count " +
           std::to_string(counts[s]) + " and segment count " + std::to_string(segment_counts[s]) +
           " (need 0 <= segment count <= count)");
    }
    if (w[s] == 0 && segment_counts[s] != 0) {
      fail("sample state: source " + std::to_string(s) + " has weight 0 but " +
           std::to_string(segment_counts[s]) + " picks in this segment");
    }
    total += counts[s];
  }
  if (total != anchor) {
    fail("sample state: the counts add up to " + std::to_string(total) + ", not to the anchor " +
         "position " + std::to_string(anchor));
  }
  (void)segment_start;
}

}  // namespace

SampleMode parse_sample_mode(const std::string& name) {
  if (name == "greedy") return SampleMode::kGreedy;
  if (name == "random") return SampleMode::kRandom;
  if (name == "block") return SampleMode::kBlock;
  fail("mode must be one of ('greedy', 'random', 'block'), got '" + name + "'");
}

int64_t quantize_weights(const double* weights, int64_t num_sources, int64_t* out) {
  if (num_sources < 1 || num_sources > kMaxSources) {
    fail("weights: need 1 to 2^24 sources, got " + std::to_string(num_sources));
  }
  double top = 0;
  int64_t a = 0;
  for (int64_t s = 0; s < num_sources; ++s) {
    const double v = weights[s];
    if (!std::isfinite(v) || v < 0) {
      fail("weights: source " + std::to_string(s) + " has weight " + num(v) +
           "; weights must be finite and >= 0");
    }
    top = std::max(top, v);
    a += v > 0;
  }
  if (a == 0) fail("weights: all " + std::to_string(num_sources) + " weights are zero");
  // Scaled by the largest first, so the sum cannot overflow; summed in index order.
  double total = 0;
  for (int64_t s = 0; s < num_sources; ++s) total += weights[s] / top;
  const int p = 52 - ceil_log2(a);
  int64_t d = 0;
  for (int64_t s = 0; s < num_sources; ++s) {
    int64_t v = 0;
    if (weights[s] > 0) {
      v = static_cast<int64_t>(std::floor(std::ldexp(weights[s] / top / total, p) + 0.5));
      v = std::max<int64_t>(v, 1);
    }
    out[s] = v;
    d += v;
  }
  return d;
}

void block_counts(const int64_t* w, int64_t num_sources, int64_t d, int64_t block_size,
                  int64_t* out) {
  std::vector<uint64_t> rem(num_sources);
  int64_t left = block_size;
  for (int64_t s = 0; s < num_sources; ++s) {
    out[s] = static_cast<int64_t>(
        mul_div(static_cast<uint64_t>(w[s]), static_cast<uint64_t>(block_size),
                static_cast<uint64_t>(d), &rem[s]));
    left -= out[s];
  }
  // The `left` (< A) largest remainders get one more; ties to the lowest index. Every one of
  // them is positive (the remainders add up to left * D, each below D), so a zero weight never
  // gets a pick.
  std::vector<int64_t> order(num_sources);
  for (int64_t s = 0; s < num_sources; ++s) order[s] = s;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return rem[x] > rem[y]; });
  for (int64_t i = 0; i < left; ++i) ++out[order[i]];
}

void sample_sources_cpu(const double* weights, int64_t num_sources, const SampleOptions& o,
                        int64_t* anchor, int64_t* counts, int64_t* segment_counts, int64_t start,
                        int64_t count, int32_t* sources, int64_t* ordinals, int64_t* end_counts) {
  check_options(o, num_sources, *anchor, start, count);
  std::vector<int64_t> w(num_sources);
  const int64_t d = quantize_weights(weights, num_sources, w.data());
  check_counts(w.data(), num_sources, *anchor, o.segment_start, counts, segment_counts);
  const int64_t end = start + count;
  const int64_t rel = *anchor - o.segment_start;

  if (o.mode == SampleMode::kRandom) {
    int64_t total = 0;
    for (int64_t s = 0; s < num_sources; ++s) total += segment_counts[s];
    if (total != rel) {
      fail("sample state: the segment counts add up to " + std::to_string(total) + ", not to " +
           "the " + std::to_string(rel) + " positions since the segment start");
    }
    const AliasTable t = alias_table(w.data(), num_sources, d);
    const uint64_t key = derive_key(o.seed, kTagRandomDraws);
    const int64_t a = static_cast<int64_t>(t.ids.size());
    auto draw = [&](int64_t i) {
      return t.ids[alias_draw(counter_hash(key, static_cast<uint64_t>(i)), t.prob.data(),
                              t.alias.data(), a, t.d)];
    };
    // Positions before `start` are only counted: in parallel, one histogram per chunk.
    const int64_t skip = start - *anchor;
    if (skip > 0) {
      // One histogram per thread: only where they are small next to the work.
      const int64_t chunks =
          num_sources > (int64_t{1} << 16)
              ? 1
              : std::max<int64_t>(1, std::min<int64_t>(num_threads(), skip >> 20));
      std::vector<std::vector<int64_t>> hist(chunks, std::vector<int64_t>(num_sources, 0));
      const int64_t per = (skip + chunks - 1) / chunks;
      parallel_for(chunks, 1, [&](int64_t b, int64_t e) {
        for (int64_t c = b; c < e; ++c) {
          const int64_t lo = *anchor + c * per, hi = std::min(start, lo + per);
          int64_t* h = hist[c].data();
          for (int64_t i = lo; i < hi; ++i) ++h[draw(i)];
        }
      });
      for (const auto& h : hist) {
        for (int64_t s = 0; s < num_sources; ++s) {
          counts[s] += h[s];
          segment_counts[s] += h[s];
        }
      }
    }
    for (int64_t i = start; i < end; ++i) {
      const int32_t s = draw(i);
      if (sources) sources[i - start] = s;
      if (ordinals) ordinals[i - start] = counts[s];
      ++counts[s];
      ++segment_counts[s];
    }
    *anchor = end;
    if (end_counts) std::copy(counts, counts + num_sources, end_counts);
    return;
  }

  constexpr int64_t kChunk = 1 << 14;
  // Shuffled blocks of one position are the plain greedy run (one order, an anchor everywhere).
  if (o.mode == SampleMode::kGreedy && (!o.shuffle || o.block_size == 1)) {
    Greedy g =
        greedy_init(w.data(), num_sources, d, rel, segment_counts, o.greedy_path, "sample state");
    std::vector<int32_t> scratch(static_cast<size_t>(std::min<int64_t>(kChunk, end - *anchor)));
    for (int64_t pos = *anchor; pos < end;) {
      const int64_t n = std::min<int64_t>(kChunk, end - pos);
      // Positions at or after `start` are written straight into the output.
      int32_t* buf = (sources && pos >= start) ? sources + (pos - start) : scratch.data();
      const int64_t m = pos < start ? std::min(n, start - pos) : n;
      greedy_run(g, o.greedy_path, m, buf);
      record(buf, m, pos, start, counts, segment_counts, sources, ordinals);
      pos += m;
    }
    *anchor = end;
    if (end_counts) std::copy(counts, counts + num_sources, end_counts);
    return;
  }

  // Block-based modes: whole blocks from a block start; the state stays at the start of the
  // block holding `end` (its positions depend on the whole block).
  const int64_t b = o.block_size;
  if (rel % b != 0) {
    fail("sample state: the anchor " + std::to_string(*anchor) + " is not a block start (" +
         "segment start " + std::to_string(o.segment_start) + ", block_size " +
         std::to_string(b) + ")");
  }
  std::vector<int32_t> buf(static_cast<size_t>(b));
  std::vector<int32_t> base;  // block mode: the unshuffled block, the same for every block
  Greedy g;                   // greedy: the run, continued block after block
  std::vector<int64_t> n(num_sources);  // block mode: picks per block
  if (o.mode == SampleMode::kBlock) {
    block_counts(w.data(), num_sources, d, b, n.data());
    const int64_t blocks = rel / b;
    for (int64_t s = 0; s < num_sources; ++s) {
      if (segment_counts[s] != blocks * n[s]) {
        fail("sample state: source " + std::to_string(s) + " has " +
             std::to_string(segment_counts[s]) + " picks in the " + std::to_string(blocks) +
             " blocks since the segment start; block mode gives exactly " +
             std::to_string(blocks * n[s]));
      }
    }
    base.resize(static_cast<size_t>(b));
    if (o.shuffle) {
      int64_t at = 0;
      for (int64_t s = 0; s < num_sources; ++s) {
        std::fill(base.begin() + at, base.begin() + at + n[s], static_cast<int32_t>(s));
        at += n[s];
      }
    } else {
      // The greedy interleave of the counts: weights n_s over B positions meet them exactly.
      std::vector<int64_t> zero(num_sources, 0);
      Greedy inner =
          greedy_init(n.data(), num_sources, b, 0, zero.data(), o.greedy_path, "block counts");
      greedy_run(inner, o.greedy_path, b, base.data());
    }
  } else {
    g = greedy_init(w.data(), num_sources, d, rel, segment_counts, o.greedy_path, "sample state");
  }
  // Whole blocks before the one holding `start` only move the counts: in closed form (block
  // mode), or by the greedy run alone (a block's multiset does not depend on its order).
  const int64_t skip_to = *anchor + (start - *anchor) / b * b;
  if (o.mode == SampleMode::kBlock) {
    const int64_t blocks = (skip_to - *anchor) / b;
    for (int64_t s = 0; s < num_sources; ++s) {
      counts[s] += blocks * n[s];
      segment_counts[s] += blocks * n[s];
    }
  } else {
    for (int64_t pos = *anchor; pos < skip_to;) {
      const int64_t m = std::min<int64_t>(b, skip_to - pos);
      greedy_run(g, o.greedy_path, m, buf.data());
      record(buf.data(), m, pos, end, counts, segment_counts, nullptr, nullptr);
      pos += m;
    }
  }
  *anchor = skip_to;
  const uint64_t order_key = derive_key(o.seed, kTagBlockOrder);
  bool partial = false;
  for (int64_t pos = *anchor; pos < end; pos += b) {
    const int64_t block = (pos - o.segment_start) / b;
    if (o.mode == SampleMode::kBlock) {
      std::copy(base.begin(), base.end(), buf.begin());
    } else {
      greedy_run(g, o.greedy_path, b, buf.data());
    }
    if (o.shuffle) shuffle_block(buf.data(), b, order_key, o.segment, block);
    if (end - pos >= b) {
      record(buf.data(), b, pos, start, counts, segment_counts, sources, ordinals);
      *anchor = pos + b;
      continue;
    }
    // The block holding `end`: counted into end_counts only; the state stays at its start.
    std::vector<int64_t> running(counts, counts + num_sources);
    std::vector<int64_t> seg(segment_counts, segment_counts + num_sources);
    record(buf.data(), end - pos, pos, start, running.data(), seg.data(), sources, ordinals);
    if (end_counts) std::copy(running.begin(), running.end(), end_counts);
    partial = true;
    *anchor = pos;
  }
  if (!partial && end_counts) std::copy(counts, counts + num_sources, end_counts);
}

void permute_rows_cpu(const int64_t* ordinals, int64_t n, const int64_t* length,
                      int64_t length_stride, const int64_t* source, int64_t source_stride,
                      uint64_t seed, bool shuffle, int64_t* rows) {
  for (int64_t i = 0; i < n; ++i) {
    if (ordinals[i] < 0) {
      fail("permute_rows: ordinals[" + std::to_string(i) + "] = " + std::to_string(ordinals[i]) +
           " is negative");
    }
    if (length[i * length_stride] < 1) {
      fail("permute_rows: length[" + std::to_string(i * length_stride) + "] = " +
           std::to_string(length[i * length_stride]) + "; a source needs at least one row");
    }
  }
  const uint64_t key = derive_key(seed, kTagRows);
  parallel_for(n, 1 << 16, [&](int64_t lo, int64_t hi) {
    // Consecutive elements of one source and pass share a permutation: build it once (and skip
    // the division while ordinals stay in that pass's range).
    int64_t last_source = -1, last_length = -1, first = 0;
    FeistelPermutation pi(0, 1);
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t len = length[i * length_stride];
      const int64_t k = ordinals[i];
      if (!shuffle) {
        rows[i] = k % len;
        continue;
      }
      const int64_t src = source[i * source_stride];
      if (src != last_source || len != last_length || k < first || k - first >= len) {
        const int64_t pass = k / len;
        pi = FeistelPermutation(
            derive_key(key, static_cast<uint64_t>(src), static_cast<uint64_t>(pass)),
            static_cast<uint64_t>(len));
        last_source = src;
        last_length = len;
        first = pass * len;
      }
      rows[i] = static_cast<int64_t>(pi(static_cast<uint64_t>(k - first)));
    }
  });
}

}  // namespace mixtape
