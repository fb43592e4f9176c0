// CUDA DataInf: per layer, rows -> lambda -> column chunks -> u -> rows -> scores, all enqueued on
// one stream with no host synchronisation. The arithmetic is datainf.h's MIXTAPE_HD functions
// (which the CPU's elementwise path also runs); this file is launches and block reductions. The
// column pass sums fixed row chunks in a fixed order, so results do not depend on scheduling.
#include <cuda_runtime.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "datainf/datainf.h"

namespace mixtape {
namespace {

constexpr int kT = kDataInfThreads;

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("datainf_cuda: ") + what + " failed: " +
                             cudaGetErrorString(err));
  }
}

// Sum over the block's kT threads (a tree in shared memory, the CPU rehearsal's order).
template <typename V>
__device__ V block_sum(V x, V* sh) {
  sh[threadIdx.x] = x;
  __syncthreads();
  for (int w = kT / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) sh[threadIdx.x] += sh[threadIdx.x + w];
    __syncthreads();
  }
  const V r = sh[0];
  __syncthreads();
  return r;
}

// One block per row: dot[i] = g_i . v and, when sq is given, sq[i] = |g_i|^2 (the first
// non-finite row goes to *bad).
template <typename T>
__global__ void rows_kernel(const T* g, int64_t n, int64_t d, int64_t stride, const float* v,
                            float* dot, float* sq, int64_t* bad) {
  __shared__ float sh[kT];
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const RowPartial p = datainf_row_partial(g + i * stride, v, d, threadIdx.x, kT);
    const float a = block_sum(p.dot, sh);
    if (!sq) {
      if (threadIdx.x == 0) dot[i] = a;
      continue;
    }
    const float q = block_sum(p.sq, sh);
    if (threadIdx.x == 0) {
      dot[i] = a;
      sq[i] = q;
      if (!datainf_finite(a, q)) {
        atomicMin(reinterpret_cast<long long*>(bad), static_cast<long long>(i));
      }
    }
  }
}

// lambda of one layer from its q (one block; sum in double).
__global__ void lambda_kernel(const float* q, int64_t n, int64_t d, double damping, double fixed,
                              double* lambda) {
  __shared__ double sh[kT];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kT) s += q[i];
  s = block_sum(s, sh);
  if (threadIdx.x == 0) *lambda = datainf_lambda(s, n, d, damping, fixed);
}

// partial[chunk, j] = sum over the chunk's rows of c_i g[i, j]; one thread per column.
template <typename T>
__global__ void cols_kernel(const T* g, int64_t n, int64_t d, int64_t stride, const float* a,
                            const float* q, const double* lambda, float* partial) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(kT) + threadIdx.x;
  if (j >= d) return;
  const int64_t chunk = (n + kDataInfColChunks - 1) / kDataInfColChunks;
  const int64_t i0 = min(n, blockIdx.y * chunk), i1 = min(n, i0 + chunk);
  partial[blockIdx.y * d + j] = datainf_col_partial(g, stride, j, a, q, *lambda, i0, i1);
}

// u[j] = sum over chunks (in order) of partial[chunk, j], / n.
__global__ void reduce_u_kernel(const float* partial, int64_t n, int64_t d, float* u) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(kT) + threadIdx.x;
  if (j >= d) return;
  float s = 0.0f;
  for (int c = 0; c < kDataInfColChunks; ++c) s += partial[c * d + j];
  u[j] = static_cast<float>(s * (1.0 / static_cast<double>(n)));
}

// b null: n == 1 (datainf_single_b).
__global__ void score_kernel(const float* a, const float* q, const float* b, int64_t n,
                             const double* lambda, float* per_layer, float* influence) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(kT) + threadIdx.x;
  if (i >= n) return;
  const double bi = b ? static_cast<double>(b[i]) : datainf_single_b(a[i], q[i], *lambda);
  const float s = datainf_score(a[i], bi, *lambda);
  if (per_layer) per_layer[i] = s;
  influence[i] += s;
}

__global__ void projection_kernel(uint64_t seed, uint64_t key, int64_t k, int64_t col_begin,
                                  int64_t cols, float scale, float* out) {
  const int64_t total = k * cols;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(kT) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kT) {
    const int64_t r = idx / cols, j = idx - r * cols;
    out[idx] = projection_entry(seed, key, r, col_begin + j, scale);
  }
}

unsigned grid_for(int64_t items) {
  const int64_t blocks = (items + kT - 1) / kT;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

template <typename T>
void run_layer(const DataInfLayer& L, int64_t l, int64_t n, const DataInfOptions& opt,
               const DataInfOutputs& out, const DataInfCudaWorkspace& ws, cudaStream_t s) {
  const T* g = static_cast<const T*>(L.grads);
  float* a = out.a + l * n;
  float* q = out.q + l * n;
  const unsigned row_grid = static_cast<unsigned>(n < (1 << 20) ? n : (1 << 20));
  rows_kernel<T><<<row_grid, kT, 0, s>>>(g, n, L.d, L.stride, L.probe, a, q, ws.bad + l);
  check_launch("rows_kernel");
  if (opt.stats_only) return;
  double* lambda = out.lambdas + l;
  lambda_kernel<<<1, kT, 0, s>>>(q, n, L.d, opt.damping, L.lambda, lambda);
  check_launch("lambda_kernel");
  if (n > 1) {
    const dim3 cols_grid(grid_for(L.d), kDataInfColChunks);
    cols_kernel<T><<<cols_grid, kT, 0, s>>>(g, n, L.d, L.stride, a, q, lambda, ws.u_partial);
    check_launch("cols_kernel");
    reduce_u_kernel<<<grid_for(L.d), kT, 0, s>>>(ws.u_partial, n, L.d, ws.u);
    check_launch("reduce_u_kernel");
    rows_kernel<T><<<row_grid, kT, 0, s>>>(g, n, L.d, L.stride, ws.u, ws.b, nullptr, nullptr);
    check_launch("rows_kernel");
  }
  score_kernel<<<grid_for(n), kT, 0, s>>>(a, q, n > 1 ? ws.b : nullptr, n, lambda,
                                          out.per_layer ? out.per_layer + l * n : nullptr,
                                          out.influence);
  check_launch("score_kernel");
}

}  // namespace

void datainf_cuda(const DataInfLayer* layers, int64_t num_layers, int64_t n,
                  const DataInfOptions& opt, const DataInfOutputs& out,
                  const DataInfCudaWorkspace& ws, void* stream) {
  if (opt.projection_dim != 0) {
    throw std::invalid_argument("datainf_cuda: project on the caller's side (projection_dim 0)");
  }
  if (n <= 0 || num_layers <= 0) return;
  if (!out.a || !out.q || !ws.bad || (!opt.stats_only && (!out.influence || !out.lambdas ||
                                                          !ws.b || !ws.u || !ws.u_partial))) {
    throw std::invalid_argument("datainf_cuda: a required output or workspace buffer is null");
  }
  for (int64_t l = 0; l < num_layers; ++l) {
    if (layers[l].d < 1 || layers[l].stride < layers[l].d) {
      throw std::invalid_argument("datainf_cuda: layer " + std::to_string(l) +
                                  " needs d >= 1 and stride >= d");
    }
  }
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (!opt.stats_only) {
    const cudaError_t err = cudaMemsetAsync(out.influence, 0, sizeof(float) * n, s);
    if (err != cudaSuccess) {
      throw std::runtime_error(std::string("datainf_cuda: zeroing the influence failed: ") +
                               cudaGetErrorString(err));
    }
  }
  for (int64_t l = 0; l < num_layers; ++l) {
    if (layers[l].dtype == GradDtype::kBFloat16) {
      run_layer<uint16_t>(layers[l], l, n, opt, out, ws, s);
    } else {
      run_layer<float>(layers[l], l, n, opt, out, ws, s);
    }
  }
}

void projection_matrix_cuda(uint64_t seed, uint64_t layer_key, int64_t k, int64_t d,
                            int64_t col_begin, int64_t cols, float* out, void* stream) {
  if (k < 1 || d < 1 || col_begin < 0 || cols < 0 || col_begin + cols > d) {
    throw std::invalid_argument("projection_matrix_cuda: need k, d >= 1 and columns in [0, d)");
  }
  if (cols == 0) return;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(k)));
  const int64_t blocks = (k * cols + kT - 1) / kT;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
  projection_kernel<<<grid, kT, 0, static_cast<cudaStream_t>(stream)>>>(
      seed, layer_key, k, col_begin, cols, scale, out);
  check_launch("projection_kernel");
}

}  // namespace mixtape
