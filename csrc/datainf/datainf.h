// datainf: DataInf influence of n training samples on a probe set, all layers in one call.
//
// Contract. Layer l holds the per-sample gradients G_l [n, d_l] (row i = g_i, float32 or bfloat16
// read as its uint16 bits, rows `stride` elements apart) and the probe-mean gradient v_l [d_l]
// (float32), both taken at the same weights. For each layer (fp32 arithmetic; sums carried in
// double every 2048 terms, so accuracy does not fall with n or d):
//   1. one fused pass over G:   a_i = g_i . v,   q_i = |g_i|^2
//   2. lambda_l = damping * sum_i q_i / (n d_l)          (DataInf's rule; or the layer's fixed value)
//   3. c_i = a_i / (lambda_l + q_i);   u = G^T c / n;   b_i = g_i . u
//   4. score_{l,i} = (b_i - a_i) / lambda_l;   influence_i = sum_l score_{l,i}
// which is -v^T [ (1/n) sum_j (g_j g_j^T + lambda_l I)^-1 ] g_i by Sherman-Morrison: DataInf's
// approximation of the damped inverse Fisher (Kwon et al. 2024, ykwon0407/DataInf, whose
// `compute_IF` returns the same sign). Positive influence = up-weighting sample i raises the
// probe loss (harmful); negative = helpful. The rule is scale-equivariant: scaling G and v by the
// same factor leaves every score unchanged.
//   - Memory: O(n + d) scratch per call (plus O(n k) with a projection); never an n x n matrix.
//     Every G is read three times.
//   - Projection (projection_dim = k > 0): a layer with d_l > k is replaced by its seeded random
//     projection P_l g_i and P_l v (P_l [k, d_l], entries +-1/sqrt(k), entry (r, j) a pure function
//     of (seed, layer key, r, j): projection_entry below), generated tile by tile while G is read
//     once and never stored whole. lambda and the scores are then those of the projected layer.
//     Layers with d_l <= k are used as they are (a projection would not shrink them).
//   - n == 1: b = c q exactly (taken in double: b - a cancels by ~ d / damping for one sample).
//   - A layer whose gradients are all zero gets lambda = 0 under the rule and scores 0 (the
//     limit: a zero gradient has no influence).
//   - Non-finite input: a row whose a_i or q_i is not finite (a NaN or inf in g_i, or a squared
//     norm past float32) stops the call and is returned as DataInfStatus{layer, sample}, the
//     first such row of the first such layer; `influence` is then left untouched (per-layer rows
//     already written stay). The probe gradients are the caller's to check.
//   - stats_only: only pass 1 (a, q per layer), for the grad-dot and cosine baselines.
// CPU: passes parallel over rows (1, 3) and column slices (2), dealt out to parallel_for threads
// from a shared counter (results do not depend on the thread count); SIMD inner loops compiled
// for AVX-512 / AVX2 / baseline and picked at run time. CUDA: the same passes as kernels
// on `stream` (projection is done by the caller with projection_matrix_cuda tiles and a GEMM).
#pragma once

#include <cstdint>
#include <cstring>

#include "common/macros.h"
#include "common/rng.h"

namespace mixtape {

enum class GradDtype : int32_t { kFloat32 = 0, kBFloat16 = 1 };

struct DataInfLayer {
  const void* grads = nullptr;  // [n, d] float32 or bfloat16 bits (uint16), see dtype
  GradDtype dtype = GradDtype::kFloat32;
  int64_t d = 0;                // gradient entries of this layer (> 0)
  int64_t stride = 0;           // elements between the starts of consecutive rows (>= d)
  const float* probe = nullptr; // [d] probe-mean gradient
  uint64_t key = 0;             // names this layer's projection stream (e.g. a hash of its name)
  double lambda = 0;            // fixed damping lambda_l > 0, or 0: the damping rule
};

struct DataInfOptions {
  double damping = 0.1;        // lambda_l = damping * mean_i q_i / d_l (layers without a fixed one)
  int64_t projection_dim = 0;  // k; 0: no projection
  uint64_t seed = 0;           // of the projection
  bool stats_only = false;     // pass 1 only: a and q
  int cpu_isa = -1;            // CPU SIMD level: -1 best available, 0 baseline, 1 AVX2, 2 AVX-512
                               // (capped at what the host supports; for tests and benchmarks)
};

// Caller-given outputs; null ones are not written. a, q, per_layer are [L, n] row-major.
struct DataInfOutputs {
  float* influence = nullptr;  // [n] sum of the layers' scores
  float* per_layer = nullptr;  // [L, n] score_{l,i}
  float* a = nullptr;          // [L, n] g_i . v (projected when the layer is)
  float* q = nullptr;          // [L, n] |g_i|^2 (projected when the layer is)
  double* lambdas = nullptr;   // [L] the lambda_l used
  double* probe_sq = nullptr;  // [L] |v_l|^2 as scored (projected when the layer is); CPU only
};

// The first non-finite row (layer, sample), or {-1, -1}.
struct DataInfStatus {
  int64_t layer = -1;
  int64_t sample = -1;
  bool ok() const { return layer < 0; }
};

// Threads per CUDA block; the CPU's elementwise rehearsal splits rows the same way.
constexpr int kDataInfThreads = 256;
// Row chunks of the CUDA G^T c pass, summed in a fixed order (deterministic, no atomics).
constexpr int kDataInfColChunks = 8;

// --- per-element logic, shared by the CPU and CUDA paths ---------------------------------------

MIXTAPE_HD float widen(float x) { return x; }

// bfloat16 bits -> float32: the top half of the float's bits.
MIXTAPE_HD float widen(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

struct RowPartial {
  float dot;  // sum of g_j v_j
  float sq;   // sum of g_j^2
};

// One share of a row: columns begin, begin + step, ... below d (a CUDA thread's share of row i).
template <typename T>
MIXTAPE_HD RowPartial datainf_row_partial(const T* g, const float* v, int64_t d, int64_t begin,
                                          int64_t step) {
  RowPartial p{0.0f, 0.0f};
  for (int64_t j = begin; j < d; j += step) {
    const float x = widen(g[j]);
    p.dot += x * v[j];
    p.sq += x * x;
  }
  return p;
}

// lambda_l: the fixed value when given (> 0), else damping * sum_q / (n d). 0 only when every
// gradient of the layer is zero (then the layer scores 0).
MIXTAPE_HD double datainf_lambda(double sum_q, int64_t n, int64_t d, double damping,
                                 double fixed) {
  if (fixed > 0) return fixed;
  return damping * sum_q / (static_cast<double>(n) * static_cast<double>(d));
}

// c_i = a_i / (lambda + q_i); 0 when both are 0 (a zero row of an all-zero layer).
MIXTAPE_HD float datainf_coef(double a, double q, double lambda) {
  const double den = lambda + q;
  return den > 0 ? static_cast<float>(a / den) : 0.0f;
}

// One column's share of G^T c over rows [begin, end), c_i from (a_i, q_i, lambda) on the fly.
template <typename T>
MIXTAPE_HD float datainf_col_partial(const T* g, int64_t stride, int64_t j, const float* a,
                                     const float* q, double lambda, int64_t begin, int64_t end) {
  float s = 0.0f;
  for (int64_t i = begin; i < end; ++i) s += datainf_coef(a[i], q[i], lambda) * widen(g[i * stride + j]);
  return s;
}

// b for n == 1: u = c g, so b = c q exactly. Taken in double, because b - a then cancels by a
// factor of ~ d / damping, which the float32 G u passes cannot resolve for a single sample.
MIXTAPE_HD double datainf_single_b(double a, double q, double lambda) {
  const double den = lambda + q;
  return den > 0 ? a / den * q : 0.0;
}

// score_i = (b_i - a_i) / lambda; 0 for an all-zero layer (lambda = 0).
MIXTAPE_HD float datainf_score(double a, double b, double lambda) {
  return lambda > 0 ? static_cast<float>((b - a) / lambda) : 0.0f;
}

// Whether a row's pass-1 results are usable (no NaN/inf in the row, no overflow of its norm).
MIXTAPE_HD bool datainf_finite(double a, double q) {
  return a - a == 0.0 && q - q == 0.0 && q < 3.4e38;  // NaN - NaN and inf - inf are NaN
}

// "projectn": keeps projection streams apart from other users of the same seed.
constexpr uint64_t kProjectionTag = 0x70726f6a6563746eull;

// The sign stream of row r of layer `layer_key`'s projection.
MIXTAPE_HD uint64_t projection_row_key(uint64_t seed, uint64_t layer_key, int64_t r) {
  return derive_key(derive_key(seed, kProjectionTag, layer_key), static_cast<uint64_t>(r));
}

// Entry (r, j) of the [k, d] projection of layer `layer_key`: +-1/sqrt(k), E[P^T P] = I.
MIXTAPE_HD float projection_entry(uint64_t seed, uint64_t layer_key, int64_t r, int64_t j,
                                  float scale) {
  return scale * rademacher(projection_row_key(seed, layer_key, r), static_cast<uint64_t>(j));
}

// --- entry points ------------------------------------------------------------------------------

// CPU. `elementwise` runs the per-element functions above in the CUDA kernels' decomposition
// instead of the SIMD passes (for tests). Throws std::invalid_argument on a bad layer geometry.
DataInfStatus datainf_cpu(const DataInfLayer* layers, int64_t num_layers, int64_t n,
                          const DataInfOptions& opt, const DataInfOutputs& out,
                          bool elementwise = false);

// Columns [col_begin, col_begin + cols) of the [k, d] projection of layer `layer_key`, written
// row-major as [k, cols] into `out`.
void projection_matrix_cpu(uint64_t seed, uint64_t layer_key, int64_t k, int64_t d,
                           int64_t col_begin, int64_t cols, float* out);

// Device scratch for datainf_cuda, allocated by the caller (torch).
struct DataInfCudaWorkspace {
  float* b = nullptr;          // [n]
  float* u = nullptr;          // [max d]
  float* u_partial = nullptr;  // [kDataInfColChunks * max d]
  int64_t* bad = nullptr;      // [L], set to n by the caller; the first non-finite row per layer
};

// CUDA: layers' grads and probes are device pointers (projection_dim must be 0: the caller
// projects); out.a, out.q, out.lambdas and out.influence are required (device memory).
// Enqueued on `stream`; the caller reads ws.bad after it to raise on non-finite rows.
void datainf_cuda(const DataInfLayer* layers, int64_t num_layers, int64_t n,
                  const DataInfOptions& opt, const DataInfOutputs& out,
                  const DataInfCudaWorkspace& ws, void* stream);

// projection_matrix_cpu on the device (out: device memory [k, cols]), enqueued on `stream`.
void projection_matrix_cuda(uint64_t seed, uint64_t layer_key, int64_t k, int64_t d,
                            int64_t col_begin, int64_t cols, float* out, void* stream);

}  // namespace mixtape
