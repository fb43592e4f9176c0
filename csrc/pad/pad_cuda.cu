#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "common/device.h"
#include "common/fits.h"
#include "pad/pad.h"

namespace mixtape {
namespace {

// One thread per output element (the per-element logic is pad_element, shared with the CPU), and
// per input value for the fit checks. Problems are recorded, not acted on: the smallest offending
// index per PadErrorSlot (atomicMin), read by the host later.
template <typename In, typename Out>
__global__ void pad_kernel(Ragged<In> ids, int64_t num_values, const In* labels,
                           const int64_t* label_offsets, int64_t num_label_values, PadOptions o,
                           Out* out_ids, Out* out_mask, Out* out_labels, bool check_negative,
                           unsigned long long* errors) {
  const int64_t total = ids.n * o.length;
  int64_t span = total;
  if (narrows<In, Out>() && errors) {
    span = span > num_values ? span : num_values;
    span = span > num_label_values ? span : num_label_values;
  }
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < span;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (idx < total) {
      const int64_t i = idx / o.length, j = idx - i * o.length;
      const PadRow r = pad_row(ids.offsets[i], ids.offsets[i + 1], o);
      const int64_t shift = label_offsets ? label_offsets[i] - ids.offsets[i] : 0;
      const int64_t row = i * o.length;
      pad_element(r, j, ids.values, labels ? labels : ids.values, shift, o,
                  out_ids ? out_ids + row : nullptr, out_mask ? out_mask + row : nullptr,
                  out_labels ? out_labels + row : nullptr);
      if (check_negative && errors) {
        const int64_t src = pad_id_source(r, j);
        if (src >= 0 && ids.values[src] < 0) {
          atomicMin(&errors[kPadNegativeId], static_cast<unsigned long long>(src));
        }
      }
    }
    if constexpr (narrows<In, Out>()) {
      if (errors && idx < num_values && !fits<Out>(ids.values[idx])) {
        atomicMin(&errors[kPadUnfitId], static_cast<unsigned long long>(idx));
      }
      if (errors && labels && out_labels && idx < num_label_values && !fits<Out>(labels[idx])) {
        atomicMin(&errors[kPadUnfitLabel], static_cast<unsigned long long>(idx));
      }
    }
  }
}

// errors[kPadErrorSlots + k] = the value at the position in slot k (after pad_kernel, same stream).
template <typename In>
__global__ void pad_error_values(const In* values, const In* labels,
                                 unsigned long long* errors) {
  const int k = threadIdx.x;
  if (k >= kPadErrorSlots) return;
  const unsigned long long pos = errors[k];
  const In* src = k == kPadUnfitLabel ? labels : values;
  errors[kPadErrorSlots + k] =
      pos == ~0ull || src == nullptr ? 0ull
                                     : static_cast<unsigned long long>(static_cast<long long>(src[pos]));
}

}  // namespace

template <typename In, typename Out>
void pad_cuda(Ragged<In> ids, int64_t num_values, const In* label_values,
              const int64_t* label_offsets, int64_t num_label_values, const PadOptions& opt,
              Out* out_ids, Out* out_mask, Out* out_labels, bool check_negative,
              unsigned long long* errors, void* stream) {
  const int64_t total = pad_output_size(ids.n, opt.length);
  const auto s = static_cast<cudaStream_t>(stream);
  if (errors) {
    check_cuda(cudaMemsetAsync(errors, 0xff, kPadErrorSlots * sizeof(unsigned long long), s),
               "pad_cuda");
  }
  int64_t span = total;
  if (narrows<In, Out>() && errors) {
    span = std::max(span, std::max(num_values, label_values ? num_label_values : 0));
  }
  if (span > 0) {
    const int threads = 256;
    const int64_t blocks = (span + threads - 1) / threads;
    const int grid = static_cast<int>(blocks < 65535 * 8 ? blocks : 65535 * 8);
    pad_kernel<In, Out><<<grid, threads, 0, s>>>(
        ids, num_values, label_values, label_values ? label_offsets : nullptr,
        label_values ? num_label_values : 0, opt, out_ids, out_mask, out_labels, check_negative,
        errors);
    check_cuda(cudaGetLastError(), "pad_cuda");
  }
  if (errors) {
    pad_error_values<In><<<1, 32, 0, s>>>(ids.values, label_values, errors);
    check_cuda(cudaGetLastError(), "pad_cuda");
  }
}

#define MIXTAPE_INSTANTIATE_PAD_CUDA(In, Out)                                                   \
  template void pad_cuda<In, Out>(Ragged<In>, int64_t, const In*, const int64_t*, int64_t,     \
                                  const PadOptions&, Out*, Out*, Out*, bool,                   \
                                  unsigned long long*, void*);
MIXTAPE_INSTANTIATE_PAD_CUDA(int32_t, int32_t)
MIXTAPE_INSTANTIATE_PAD_CUDA(int32_t, int64_t)
MIXTAPE_INSTANTIATE_PAD_CUDA(int64_t, int32_t)
MIXTAPE_INSTANTIATE_PAD_CUDA(int64_t, int64_t)
#undef MIXTAPE_INSTANTIATE_PAD_CUDA

}  // namespace mixtape
