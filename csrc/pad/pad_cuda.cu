#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "pad/pad.h"

namespace mixtape {
namespace {

// One thread per output element; the per-element logic is pad_element, shared with the CPU.
template <typename In, typename Out>
__global__ void pad_kernel(Ragged<In> ids, const In* labels, const int64_t* label_offsets,
                           PadOptions o, Out* out_ids, Out* out_mask, Out* out_labels) {
  const int64_t total = ids.n * o.length;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / o.length, j = idx - i * o.length;
    const PadRow r = pad_row(ids.offsets[i], ids.offsets[i + 1], o);
    const int64_t shift = label_offsets ? label_offsets[i] - ids.offsets[i] : 0;
    const int64_t row = i * o.length;
    pad_element(r, j, ids.values, labels ? labels : ids.values, shift, o,
                out_ids ? out_ids + row : nullptr, out_mask ? out_mask + row : nullptr,
                out_labels ? out_labels + row : nullptr);
  }
}

}  // namespace

template <typename In, typename Out>
void pad_cuda(Ragged<In> ids, const In* label_values, const int64_t* label_offsets,
              const PadOptions& opt, Out* out_ids, Out* out_mask, Out* out_labels,
              void* stream) {
  const int64_t total = pad_output_size(ids.n, opt.length);
  if (total == 0) return;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  const int grid = static_cast<int>(blocks < 65535 * 8 ? blocks : 65535 * 8);
  pad_kernel<In, Out><<<grid, threads, 0, static_cast<cudaStream_t>(stream)>>>(
      ids, label_values, label_values ? label_offsets : nullptr, opt, out_ids, out_mask,
      out_labels);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("pad_cuda: kernel launch failed: ") +
                             cudaGetErrorString(err));
  }
}

#define MIXTAPE_INSTANTIATE_PAD_CUDA(In, Out)                                              \
  template void pad_cuda<In, Out>(Ragged<In>, const In*, const int64_t*, const PadOptions&, \
                                  Out*, Out*, Out*, void*);
MIXTAPE_INSTANTIATE_PAD_CUDA(int32_t, int32_t)
MIXTAPE_INSTANTIATE_PAD_CUDA(int32_t, int64_t)
MIXTAPE_INSTANTIATE_PAD_CUDA(int64_t, int32_t)
MIXTAPE_INSTANTIATE_PAD_CUDA(int64_t, int64_t)
#undef MIXTAPE_INSTANTIATE_PAD_CUDA

}  // namespace mixtape
