// CPU DataInf kernel. Each layer is three streaming passes over G (see datainf.h): the inner loops
// are written once with GCC/Clang vector extensions and compiled three times (AVX-512, AVX2 + FMA,
// the baseline ISA, each with its register width), picked at run time, because the build does not
// assume the host's ISA. Sums run in float over blocks of at most kFlush terms and are carried in
// double across blocks, so accuracy does not fall with d or n.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/parallel.h"
#include "datainf/datainf.h"

#if !defined(__GNUC__)
#error "datainf_cpu.cpp uses GCC/Clang vector extensions"
#endif

#if defined(__x86_64__) || defined(__i386__)
#define MIXTAPE_DATAINF_X86 1
#endif

// The vector types never cross a non-inlined call, so the AVX-512 ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace mixtape {
namespace {

// Native vectors of N floats (16: AVX-512, 8: AVX2, 4: SSE2 / NEON): GCC lowers a vector wider
// than the target's registers through memory, so each ISA gets its own width.
template <int N>
struct Vec;
#define MIXTAPE_VEC(N)                                                      \
  template <>                                                               \
  struct Vec<N> {                                                           \
    typedef float f __attribute__((vector_size(4 * N)));                    \
    typedef uint16_t h __attribute__((vector_size(2 * N)));                 \
    typedef uint32_t w __attribute__((vector_size(4 * N)));                 \
  };
MIXTAPE_VEC(4)
MIXTAPE_VEC(8)
MIXTAPE_VEC(16)
#undef MIXTAPE_VEC
#define MIXTAPE_AI inline __attribute__((always_inline))

constexpr int64_t kFlush = 2048;       // terms summed in float before the double carry
constexpr int64_t kMinWork = 1 << 18;  // elements per thread worth starting it (~50 us of reads)
constexpr int64_t kColTile = 4096;     // pass 2: columns accumulated in L1 over all rows
constexpr int64_t kColGrain = 2048;    // pass 2: columns a thread takes at a time (8 KiB of a row)
constexpr int64_t kRowGrain = 1 << 16; // passes 1, 3: elements (rows x d) a thread takes at a time
constexpr int64_t kProjPad = 32;       // projection: output rows padded to this (>= 2 vectors)
constexpr int64_t kProjCols = 128;     // projection: input columns per generated tile
constexpr int64_t kProjSamples = 256;   // projection: samples sharing one generation of the tiles

template <int N>
MIXTAPE_AI typename Vec<N>::f load(const float* p) {
  typename Vec<N>::f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int N>
MIXTAPE_AI typename Vec<N>::f load(const uint16_t* p) {
  typename Vec<N>::h h;
  std::memcpy(&h, p, sizeof h);
  const typename Vec<N>::w w = __builtin_convertvector(h, typename Vec<N>::w) << 16;
  return (typename Vec<N>::f)w;  // same-size vector cast: the bits, reinterpreted
}

template <int N>
MIXTAPE_AI void store(float* p, typename Vec<N>::f v) {
  std::memcpy(p, &v, sizeof v);
}

template <int N>
MIXTAPE_AI float hsum(typename Vec<N>::f x) {
  float s = 0.0f;
  for (int k = 0; k < N; ++k) s += x[k];
  return s;
}

// A layer's gradient matrix as the passes see it (the input, or its projection).
template <typename T>
struct Block {
  const T* g;
  int64_t d;
  int64_t stride;
  const T* row(int64_t i) const { return g + i * stride; }
};

// dot[r] = g_{i+r} . v and (kSq) sq[r] = |g_{i+r}|^2 for R rows at once: v is loaded once for R
// rows, and 2R independent sums hide the FMA latency.
template <int N, typename T, int R, bool kSq>
MIXTAPE_AI void rows_dot(const Block<T>& b, int64_t i, const float* v, double* dot, double* sq) {
  typedef typename Vec<N>::f F;
  const T* rows[R];
  for (int r = 0; r < R; ++r) {
    rows[r] = b.row(i + r);
    dot[r] = 0.0;
    if (kSq) sq[r] = 0.0;
  }
  for (int64_t j0 = 0; j0 < b.d; j0 += kFlush) {
    const int64_t j1 = std::min(b.d, j0 + kFlush);
    F sa[R], ss[R];
    for (int r = 0; r < R; ++r) sa[r] = ss[r] = F{};
    int64_t j = j0;
    for (; j + N <= j1; j += N) {
      const F vv = load<N>(v + j);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const F x = load<N>(rows[r] + j);
        sa[r] += x * vv;
        if (kSq) ss[r] += x * x;
      }
    }
    for (int r = 0; r < R; ++r) {
      float ta = hsum<N>(sa[r]), ts = kSq ? hsum<N>(ss[r]) : 0.0f;
      for (int64_t t = j; t < j1; ++t) {
        const float x = widen(rows[r][t]);
        ta += x * v[t];
        if (kSq) ts += x * x;
      }
      dot[r] += ta;
      if (kSq) sq[r] += ts;
    }
  }
}

// Rows [r0, r1): a_i = g_i . v and (q non-null) q_i = |g_i|^2.
template <int N, typename T>
MIXTAPE_AI void rows_pass(const Block<T>& b, const float* v, int64_t r0, int64_t r1, double* a,
                          double* q) {
  constexpr int R = 4;
  int64_t i = r0;
  if (q) {
    for (; i + R <= r1; i += R) rows_dot<N, T, R, true>(b, i, v, a + i, q + i);
    for (; i < r1; ++i) rows_dot<N, T, 1, true>(b, i, v, a + i, q + i);
  } else {
    for (; i + R <= r1; i += R) rows_dot<N, T, R, false>(b, i, v, a + i, nullptr);
    for (; i < r1; ++i) rows_dot<N, T, 1, false>(b, i, v, a + i, nullptr);
  }
}

// Columns [j0, j1) of u = G^T c (not yet / n), in double: rows are added four at a time into a
// float tile in L1, carried into the double tile every kFlush rows.
template <int N, typename T>
MIXTAPE_AI void cols_pass(const Block<T>& b, const float* c, int64_t n, int64_t j0, int64_t j1,
                          double* u) {
  typedef typename Vec<N>::f F;
  alignas(64) float acc[kColTile];
  for (int64_t t0 = j0; t0 < j1; t0 += kColTile) {
    const int64_t t1 = std::min(j1, t0 + kColTile), w = t1 - t0;
    for (int64_t j = t0; j < t1; ++j) u[j] = 0.0;
    for (int64_t i0 = 0; i0 < n; i0 += kFlush) {
      const int64_t i1 = std::min(n, i0 + kFlush);
      std::fill(acc, acc + w, 0.0f);
      int64_t i = i0;
      for (; i + 4 <= i1; i += 4) {
        const float c0 = c[i], c1 = c[i + 1], c2 = c[i + 2], c3 = c[i + 3];
        const T *g0 = b.row(i) + t0, *g1 = b.row(i + 1) + t0, *g2 = b.row(i + 2) + t0,
                *g3 = b.row(i + 3) + t0;
        int64_t j = 0;
        for (; j + N <= w; j += N) {
          const F s = load<N>(acc + j) + c0 * load<N>(g0 + j) + c1 * load<N>(g1 + j) +
                      c2 * load<N>(g2 + j) + c3 * load<N>(g3 + j);
          store<N>(acc + j, s);
        }
        for (; j < w; ++j) {
          acc[j] += c0 * widen(g0[j]) + c1 * widen(g1[j]) + c2 * widen(g2[j]) + c3 * widen(g3[j]);
        }
      }
      for (; i < i1; ++i) {
        const float ci = c[i];
        const T* gi = b.row(i) + t0;
        int64_t j = 0;
        for (; j + N <= w; j += N) store<N>(acc + j, load<N>(acc + j) + ci * load<N>(gi + j));
        for (; j < w; ++j) acc[j] += ci * widen(gi[j]);
      }
      for (int64_t j = 0; j < w; ++j) u[t0 + j] += acc[j];
    }
  }
}

// Samples [s0, s1) of the projection: out[i, r] (double, row stride kpad) = sum_j P[r, j] g_i[j].
// P is generated in tiles of kProjCols x 2N (j-major), each used for kProjSamples samples whose
// kProjCols-column slices stay in L1 meanwhile, so P is never stored whole, G is read once and
// the generation costs 1/kProjSamples of the multiply-adds; 4 samples x 2 vectors of outputs stay
// in registers.
template <int N, typename T>
MIXTAPE_AI void project_pass(const Block<T>& b, int64_t s0, int64_t s1, uint64_t seed,
                             uint64_t key, int64_t k, int64_t kpad, float scale, double* out) {
  typedef typename Vec<N>::f F;
  constexpr int64_t PR = 2 * N;  // output rows per tile
  alignas(64) float tile[kProjCols * PR];
  for (int64_t c0 = s0; c0 < s1; c0 += kProjSamples) {
    const int64_t c1 = std::min(s1, c0 + kProjSamples);
    for (int64_t i = c0; i < c1; ++i) std::fill(out + i * kpad, out + (i + 1) * kpad, 0.0);
    for (int64_t j0 = 0; j0 < b.d; j0 += kProjCols) {
      const int64_t nj = std::min(kProjCols, b.d - j0);
      for (int64_t r0 = 0; r0 < k; r0 += PR) {
        const int64_t nr = std::min<int64_t>(PR, k - r0);
        // tile[j][r] = P[r0 + r, j0 + j], from whole 64-bit words of signs; rows past k are 0.
        for (int64_t r = 0; r < PR; ++r) {
          if (r >= nr) {
            for (int64_t j = 0; j < nj; ++j) tile[j * PR + r] = 0.0f;
            continue;
          }
          const uint64_t row_key = projection_row_key(seed, key, r0 + r);
          for (int64_t j = 0; j < nj;) {
            const uint64_t jj = static_cast<uint64_t>(j0 + j);
            const uint64_t word = rademacher_word(row_key, jj >> 6);
            const int64_t end = std::min<int64_t>(nj, j + 64 - static_cast<int64_t>(jj & 63));
            for (int64_t bit = static_cast<int64_t>(jj & 63); j < end; ++j, ++bit) {
              tile[j * PR + r] = ((word >> bit) & 1u) ? -scale : scale;
            }
          }
        }
        for (int64_t i = c0; i < c1; i += 4) {
          const int64_t ns = std::min<int64_t>(4, c1 - i);
          F acc[4][2];
          for (auto& a : acc) a[0] = a[1] = F{};
          const T* g[4];
          for (int64_t t = 0; t < 4; ++t) g[t] = b.row(i + std::min(t, ns - 1)) + j0;
          for (int64_t j = 0; j < nj; ++j) {
            const F p0 = load<N>(tile + j * PR), p1 = load<N>(tile + j * PR + N);
#pragma GCC unroll 4
            for (int t = 0; t < 4; ++t) {
              const float x = widen(g[t][j]);
              acc[t][0] += x * p0;
              acc[t][1] += x * p1;
            }
          }
          for (int64_t t = 0; t < ns; ++t) {
            double* o = out + (i + t) * kpad + r0;
            for (int r = 0; r < N; ++r) {
              o[r] += acc[t][0][r];
              o[r + N] += acc[t][1][r];
            }
          }
        }
      }
    }
  }
}

// The passes, compiled once per ISA with that ISA's vector width.
#define MIXTAPE_DATAINF_PASSES(ISA, N, ATTR)                                                     \
  template <typename T>                                                                        \
  ATTR void rows_##ISA(const Block<T>& b, const float* v, int64_t r0, int64_t r1, double* a,   \
                       double* q) {                                                            \
    rows_pass<N>(b, v, r0, r1, a, q);                                                          \
  }                                                                                            \
  template <typename T>                                                                        \
  ATTR void cols_##ISA(const Block<T>& b, const float* c, int64_t n, int64_t j0, int64_t j1,   \
                       double* u) {                                                            \
    cols_pass<N>(b, c, n, j0, j1, u);                                                          \
  }                                                                                            \
  template <typename T>                                                                        \
  ATTR void project_##ISA(const Block<T>& b, int64_t s0, int64_t s1, uint64_t seed,            \
                          uint64_t key, int64_t k, int64_t kpad, float scale, double* out) {   \
    project_pass<N>(b, s0, s1, seed, key, k, kpad, scale, out);                                \
  }

MIXTAPE_DATAINF_PASSES(base, 4, )
#if MIXTAPE_DATAINF_X86
MIXTAPE_DATAINF_PASSES(avx2, 8, __attribute__((target("avx2,fma,f16c"))))
MIXTAPE_DATAINF_PASSES(avx512, 16,
                       __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"))))
#endif
#undef MIXTAPE_DATAINF_PASSES

// 0: baseline, 1: AVX2 + FMA, 2: AVX-512 (F, BW, DQ, VL).
int host_isa() {
#if MIXTAPE_DATAINF_X86
  static const int isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
      return 2;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
  }();
  return isa;
#else
  return 0;
#endif
}

// The ISA-specific passes behind one name; `isa` is already capped at the host's.
template <typename T>
struct Passes {
  int isa;
  void rows(const Block<T>& b, const float* v, int64_t r0, int64_t r1, double* a,
            double* q) const {
#if MIXTAPE_DATAINF_X86
    if (isa == 2) return rows_avx512(b, v, r0, r1, a, q);
    if (isa == 1) return rows_avx2(b, v, r0, r1, a, q);
#endif
    rows_base(b, v, r0, r1, a, q);
  }
  void cols(const Block<T>& b, const float* c, int64_t n, int64_t j0, int64_t j1,
            double* u) const {
#if MIXTAPE_DATAINF_X86
    if (isa == 2) return cols_avx512(b, c, n, j0, j1, u);
    if (isa == 1) return cols_avx2(b, c, n, j0, j1, u);
#endif
    cols_base(b, c, n, j0, j1, u);
  }
  void project(const Block<T>& b, int64_t s0, int64_t s1, uint64_t seed, uint64_t key, int64_t k,
               int64_t kpad, float scale, double* out) const {
#if MIXTAPE_DATAINF_X86
    if (isa == 2) return project_avx512(b, s0, s1, seed, key, k, kpad, scale, out);
    if (isa == 1) return project_avx2(b, s0, s1, seed, key, k, kpad, scale, out);
#endif
    project_base(b, s0, s1, seed, key, k, kpad, scale, out);
  }
};

int64_t per_thread(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work_per_item));
}

// Rows per chunk of the row passes: a multiple of the 4-row blocks, about kRowGrain elements.
int64_t row_grain(int64_t d) {
  return std::max<int64_t>(4, kRowGrain / std::max<int64_t>(1, d) / 4 * 4);
}

// parallel_for with the items dealt out `grain` at a time from a shared counter: a thread slowed
// by a busy core (a shared machine, DataLoader workers) does less of the work instead of holding
// up the others. Which thread runs an item never changes what it computes.
template <typename Fn>
void dynamic_for(int64_t n, int64_t min_per_thread, int64_t grain, Fn&& fn) {
  if (n <= 0) return;
  const int64_t chunks = (n + grain - 1) / grain;
  const int64_t workers =
      std::min<int64_t>({int64_t{num_threads()}, chunks, std::max<int64_t>(1, n / min_per_thread)});
  std::atomic<int64_t> next{0};
  parallel_for(workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
        fn(c * grain, std::min(n, (c + 1) * grain));
      }
    }
  });
}

// Scratch of one call, allocated once (no allocation inside the passes).
struct Scratch {
  std::vector<double> a, q, b, acc, u, proj;
  std::vector<float> c, uf, pg, pv;
};

// a, q of layer rows (pass 1), bulk or elementwise. Returns the first non-finite row or -1.
template <typename T>
int64_t pass_stats(const Passes<T>& p, const Block<T>& b, const float* v, int64_t n, bool ew,
                   Scratch& s) {
  if (ew) {
    for (int64_t i = 0; i < n; ++i) {
      // The CUDA block's decomposition: thread t takes columns t, t + 256, ...
      float dot[kDataInfThreads], sq[kDataInfThreads];
      for (int t = 0; t < kDataInfThreads; ++t) {
        const RowPartial r = datainf_row_partial(b.row(i), v, b.d, t, kDataInfThreads);
        dot[t] = r.dot;
        sq[t] = r.sq;
      }
      for (int w = kDataInfThreads / 2; w > 0; w /= 2) {
        for (int t = 0; t < w; ++t) {
          dot[t] += dot[t + w];
          sq[t] += sq[t + w];
        }
      }
      s.a[i] = dot[0];
      s.q[i] = sq[0];
    }
  } else {
    dynamic_for(n, per_thread(b.d), row_grain(b.d), [&](int64_t r0, int64_t r1) {
      p.rows(b, v, r0, r1, s.a.data(), s.q.data());
    });
  }
  for (int64_t i = 0; i < n; ++i) {
    if (!datainf_finite(s.a[i], s.q[i])) return i;
  }
  return -1;
}

// u = G^T c / n (pass 2) into s.uf, then b = G u (pass 3) into s.b.
template <typename T>
void pass_solve(const Passes<T>& p, const Block<T>& b, double lambda, int64_t n, bool ew,
                Scratch& s) {
  const double inv_n = 1.0 / static_cast<double>(n);
  if (ew) {
    std::vector<float> a(n), q(n);
    for (int64_t i = 0; i < n; ++i) {
      a[i] = static_cast<float>(s.a[i]);
      q[i] = static_cast<float>(s.q[i]);
    }
    const int64_t chunk = (n + kDataInfColChunks - 1) / kDataInfColChunks;
    for (int64_t j = 0; j < b.d; ++j) {
      float u = 0.0f;
      for (int ch = 0; ch < kDataInfColChunks; ++ch) {
        const int64_t i0 = std::min(n, ch * chunk), i1 = std::min(n, i0 + chunk);
        u += datainf_col_partial(b.g, b.stride, j, a.data(), q.data(), lambda, i0, i1);
      }
      s.uf[j] = static_cast<float>(u * inv_n);
    }
    for (int64_t i = 0; i < n; ++i) {
      float dot[kDataInfThreads];
      for (int t = 0; t < kDataInfThreads; ++t) {
        dot[t] = datainf_row_partial(b.row(i), s.uf.data(), b.d, t, kDataInfThreads).dot;
      }
      for (int w = kDataInfThreads / 2; w > 0; w /= 2) {
        for (int t = 0; t < w; ++t) dot[t] += dot[t + w];
      }
      s.b[i] = dot[0];
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) s.c[i] = datainf_coef(s.a[i], s.q[i], lambda);
  // Threads take the columns in groups of 16 (whole cache lines), kColGrain groups at a time.
  const int64_t groups = (b.d + 15) / 16;
  dynamic_for(groups, per_thread(n * 16), kColGrain / 16, [&](int64_t t0, int64_t t1) {
    const int64_t j0 = t0 * 16, j1 = std::min(b.d, t1 * 16);
    p.cols(b, s.c.data(), n, j0, j1, s.u.data());
    for (int64_t j = j0; j < j1; ++j) s.uf[j] = static_cast<float>(s.u[j] * inv_n);
  });
  dynamic_for(n, per_thread(b.d), row_grain(b.d), [&](int64_t r0, int64_t r1) {
    p.rows(b, s.uf.data(), r0, r1, s.b.data(), nullptr);
  });
}

// Projects layer `l` into s.pg [n, k] and its probe into s.pv [k].
template <typename T>
Block<float> pass_project(const Passes<T>& p, const Block<T>& b, const float* v,
                          const DataInfLayer& layer, const DataInfOptions& opt, int64_t n,
                          bool ew, Scratch& s) {
  const int64_t k = opt.projection_dim;
  const int64_t kpad = (k + kProjPad - 1) / kProjPad * kProjPad;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(k)));
  if (ew) {
    for (int64_t r = 0; r < k; ++r) {
      double pv = 0.0;
      for (int64_t j = 0; j < b.d; ++j) pv += projection_entry(opt.seed, layer.key, r, j, scale) * v[j];
      s.pv[r] = static_cast<float>(pv);
      for (int64_t i = 0; i < n; ++i) {
        double acc = 0.0;
        for (int64_t j = 0; j < b.d; ++j) {
          acc += projection_entry(opt.seed, layer.key, r, j, scale) * widen(b.row(i)[j]);
        }
        s.pg[i * k + r] = static_cast<float>(acc);
      }
    }
    return Block<float>{s.pg.data(), k, k};
  }
  // Chunks of up to kProjSamples samples (each generates the tiles once), small enough that every
  // thread gets two.
  const int64_t grain =
      std::clamp<int64_t>(n / (2 * int64_t{num_threads()}) / 4 * 4, 32, kProjSamples);
  dynamic_for(n, grain, grain, [&](int64_t s0, int64_t s1) {
    p.project(b, s0, s1, opt.seed, layer.key, k, kpad, scale, s.proj.data());
    for (int64_t i = s0; i < s1; ++i) {
      for (int64_t r = 0; r < k; ++r) s.pg[i * k + r] = static_cast<float>(s.proj[i * kpad + r]);
    }
  });
  // The probe through the same code: a one-row float block.
  Passes<float> pf{p.isa};
  pf.project(Block<float>{v, b.d, b.d}, 0, 1, opt.seed, layer.key, k, kpad, scale,
             s.proj.data());
  for (int64_t r = 0; r < k; ++r) s.pv[r] = static_cast<float>(s.proj[r]);
  return Block<float>{s.pg.data(), k, k};
}

// One layer: pass 1 (checked), lambda, passes 2-3, scores. Returns the first bad row or -1.
template <typename T>
int64_t run_layer(const DataInfLayer& layer, int64_t l, int64_t n, const DataInfOptions& opt,
                  const DataInfOutputs& out, int isa, bool ew, Scratch& s) {
  Block<T> g{static_cast<const T*>(layer.grads), layer.d, layer.stride};
  const float* v = layer.probe;
  auto finish = [&](const auto& blk, const float* probe) -> int64_t {
    using U = std::remove_cv_t<std::remove_pointer_t<decltype(blk.g)>>;
    Passes<U> p{isa};
    const int64_t bad = pass_stats(p, blk, probe, n, ew, s);
    if (bad >= 0) return bad;
    for (int64_t i = 0; i < n; ++i) {
      if (out.a) out.a[l * n + i] = static_cast<float>(s.a[i]);
      if (out.q) out.q[l * n + i] = static_cast<float>(s.q[i]);
    }
    if (out.probe_sq) {
      double vv = 0.0;
      for (int64_t j = 0; j < blk.d; ++j) vv += static_cast<double>(probe[j]) * probe[j];
      out.probe_sq[l] = vv;
    }
    if (opt.stats_only) return -1;
    double sum_q = 0.0;
    for (int64_t i = 0; i < n; ++i) sum_q += s.q[i];
    const double lambda = datainf_lambda(sum_q, n, blk.d, opt.damping, layer.lambda);
    if (out.lambdas) out.lambdas[l] = lambda;
    if (n == 1) {
      s.b[0] = datainf_single_b(s.a[0], s.q[0], lambda);
    } else if (lambda > 0) {
      pass_solve(p, blk, lambda, n, ew, s);
    } else {
      std::fill(s.b.begin(), s.b.end(), 0.0);
    }
    for (int64_t i = 0; i < n; ++i) {
      const float score = datainf_score(s.a[i], s.b[i], lambda);
      if (out.per_layer) out.per_layer[l * n + i] = score;
      s.acc[i] += score;
    }
    return -1;
  };
  if (opt.projection_dim > 0 && layer.d > opt.projection_dim) {
    Passes<T> p{isa};
    const Block<float> proj = pass_project(p, g, v, layer, opt, n, ew, s);
    return finish(proj, s.pv.data());
  }
  return finish(g, v);
}

}  // namespace

DataInfStatus datainf_cpu(const DataInfLayer* layers, int64_t num_layers, int64_t n,
                          const DataInfOptions& opt, const DataInfOutputs& out,
                          bool elementwise) {
  if (n < 0 || num_layers < 0) throw std::invalid_argument("datainf: negative n or layer count");
  if (opt.projection_dim < 0) throw std::invalid_argument("datainf: projection_dim must be >= 0");
  if (!(opt.damping > 0) && !opt.stats_only) {
    throw std::invalid_argument("datainf: damping must be > 0, got " + std::to_string(opt.damping));
  }
  int64_t max_d = 0;
  for (int64_t l = 0; l < num_layers; ++l) {
    const DataInfLayer& L = layers[l];
    if (L.d < 1 || L.stride < L.d || !L.grads || !L.probe) {
      throw std::invalid_argument("datainf: layer " + std::to_string(l) + " has d = " +
                                  std::to_string(L.d) + ", stride = " +
                                  std::to_string(L.stride) + " (need d >= 1, stride >= d, data)");
    }
    if (L.dtype != GradDtype::kFloat32 && L.dtype != GradDtype::kBFloat16) {
      throw std::invalid_argument("datainf: layer " + std::to_string(l) + " has an unknown dtype");
    }
    if (!(L.lambda >= 0)) {
      throw std::invalid_argument("datainf: layer " + std::to_string(l) + " has lambda < 0");
    }
    max_d = std::max(max_d, opt.projection_dim > 0 ? std::min(L.d, opt.projection_dim) : L.d);
  }
  if (n == 0 || num_layers == 0) {
    if (out.influence) std::fill(out.influence, out.influence + n, 0.0f);
    return {};
  }
  const int isa = std::min(host_isa(), opt.cpu_isa < 0 ? 2 : opt.cpu_isa);
  Scratch s;
  s.a.resize(n);
  s.q.resize(n);
  s.b.resize(n);
  s.c.resize(n);
  s.acc.assign(n, 0.0);
  s.u.resize(max_d);
  s.uf.resize(max_d);
  if (opt.projection_dim > 0) {
    const int64_t k = opt.projection_dim;
    const int64_t kpad = (k + kProjPad - 1) / kProjPad * kProjPad;
    s.proj.resize(n * kpad);
    s.pg.resize(n * k);
    s.pv.resize(k);
  }
  for (int64_t l = 0; l < num_layers; ++l) {
    const int64_t bad =
        layers[l].dtype == GradDtype::kFloat32
            ? run_layer<float>(layers[l], l, n, opt, out, isa, elementwise, s)
            : run_layer<uint16_t>(layers[l], l, n, opt, out, isa, elementwise, s);
    if (bad >= 0) return DataInfStatus{l, bad};
  }
  if (out.influence && !opt.stats_only) {
    for (int64_t i = 0; i < n; ++i) out.influence[i] = static_cast<float>(s.acc[i]);
  }
  return {};
}

void projection_matrix_cpu(uint64_t seed, uint64_t layer_key, int64_t k, int64_t d,
                           int64_t col_begin, int64_t cols, float* out) {
  if (k < 1 || d < 1 || col_begin < 0 || cols < 0 || col_begin + cols > d) {
    throw std::invalid_argument("projection_matrix: need k, d >= 1 and columns within [0, d)");
  }
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(k)));
  for (int64_t r = 0; r < k; ++r) {
    for (int64_t j = 0; j < cols; ++j) {
      out[r * cols + j] = projection_entry(seed, layer_key, r, col_begin + j, scale);
    }
  }
}

}  // namespace mixtape
