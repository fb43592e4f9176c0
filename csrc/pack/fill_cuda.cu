#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/device.h"
#include "pack/pack.h"

namespace mixtape {
namespace {

// One thread per output element; the per-element logic is pack_source_* and pack_element, shared
// with the CPU path (which tests run with elementwise=true). A written token that does not fit
// Out is recorded (smallest index, atomicMin), not acted on: the host reads it later.
template <typename In, typename Out>
__global__ void pack_fill_kernel(Ragged<In> docs, PackPieces p, PackFillOptions o, int64_t total,
                                 Out* ids, Out* labels, int64_t* positions, int32_t* seq_idx,
                                 bool* loss_mask, unsigned long long* unfit) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const PackSource s = o.flat ? pack_source_flat(p, i)
                                : pack_source_padded(p, i / o.capacity, i % o.capacity);
    const int64_t bad = pack_element(s, i, docs.values, docs.offsets, p, o, ids, labels,
                                     positions, seq_idx, loss_mask);
    if (bad >= 0 && unfit) atomicMin(unfit, static_cast<unsigned long long>(bad));
  }
}

// unfit[1] = the value at the position in unfit[0] (after pack_fill_kernel, same stream).
template <typename In>
__global__ void pack_fill_error_value(const In* values, unsigned long long* unfit) {
  const unsigned long long pos = unfit[0];
  unfit[1] = pos == ~0ull ? 0ull
                          : static_cast<unsigned long long>(static_cast<long long>(values[pos]));
}

}  // namespace

template <typename In, typename Out>
void pack_fill_cuda(Ragged<In> docs, const PackPieces& plan, const PackFillOptions& opt,
                    int64_t total, Out* ids, Out* labels, int64_t* positions, int32_t* seq_idx,
                    bool* loss_mask, unsigned long long* unfit, void* stream) {
  if (opt.flat && plan.flat_offsets == nullptr) {
    throw std::invalid_argument("pack_fill_cuda: the flat layout needs flat_offsets");
  }
  const auto s = static_cast<cudaStream_t>(stream);
  if (unfit) check_cuda(cudaMemsetAsync(unfit, 0xff, sizeof(unsigned long long), s), "pack_fill_cuda");
  if (total > 0) {
    const int threads = 256;
    const int64_t blocks = (total + threads - 1) / threads;
    const int grid = static_cast<int>(blocks < 65535 * 8 ? blocks : 65535 * 8);
    pack_fill_kernel<In, Out><<<grid, threads, 0, s>>>(docs, plan, opt, total, ids, labels,
                                                       positions, seq_idx, loss_mask, unfit);
    check_cuda(cudaGetLastError(), "pack_fill_cuda");
  }
  if (unfit) {
    pack_fill_error_value<In><<<1, 1, 0, s>>>(docs.values, unfit);
    check_cuda(cudaGetLastError(), "pack_fill_cuda");
  }
}

#define MIXTAPE_INSTANTIATE_PACK_FILL_CUDA(In, Out)                                             \
  template void pack_fill_cuda<In, Out>(Ragged<In>, const PackPieces&, const PackFillOptions&, \
                                        int64_t, Out*, Out*, int64_t*, int32_t*, bool*,         \
                                        unsigned long long*, void*);
MIXTAPE_INSTANTIATE_PACK_FILL_CUDA(int32_t, int32_t)
MIXTAPE_INSTANTIATE_PACK_FILL_CUDA(int32_t, int64_t)
MIXTAPE_INSTANTIATE_PACK_FILL_CUDA(int64_t, int32_t)
MIXTAPE_INSTANTIATE_PACK_FILL_CUDA(int64_t, int64_t)
#undef MIXTAPE_INSTANTIATE_PACK_FILL_CUDA

}  // namespace mixtape
