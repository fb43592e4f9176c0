#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/parallel.h"
#include "pad/pad.h"

namespace mixtape {
namespace {

template <typename T>
void fill(T* p, int64_t n, T v) {
  std::fill(p, p + n, v);
}

// Copies n values with conversion and returns their minimum (fused, so checking ids costs no
// extra pass over memory).
template <typename In, typename Out>
In copy_min(const In* src, int64_t n, Out* dst) {
  In mn = std::numeric_limits<In>::max();
  if constexpr (std::is_same_v<In, Out>) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(In));
    for (int64_t k = 0; k < n; ++k) mn = std::min(mn, src[k]);
  } else {
    for (int64_t k = 0; k < n; ++k) {
      const In v = src[k];
      dst[k] = static_cast<Out>(v);
      mn = std::min(mn, v);
    }
  }
  return mn;
}

// One row by segments: [0, dst) pad, [dst, dst + len) tokens, [dst + len, L) pad.
template <typename In, typename Out>
bool pad_one_row(const PadRow& r, const In* values, const In* labels, int64_t label_shift,
                 const PadOptions& o, Out* ids, Out* mask, Out* out_labels) {
  const int64_t L = o.length, head = r.dst, tail = L - r.dst - r.len;
  In mn = 0;
  if (ids) {
    fill(ids, head, static_cast<Out>(o.pad_value));
    mn = copy_min(values + r.src, r.len, ids + head);
    fill(ids + head + r.len, tail, static_cast<Out>(o.pad_value));
  } else if (r.len > 0) {
    mn = *std::min_element(values + r.src, values + r.src + r.len);
  }
  if (mask) {
    fill(mask, head, Out(0));
    fill(mask + head, r.len, Out(1));
    fill(mask + head + r.len, tail, Out(0));
  }
  if (out_labels) {
    const int64_t shift = o.shift_labels ? 1 : 0;
    const int64_t n = std::max<int64_t>(0, r.len - shift);
    const Out lp = static_cast<Out>(o.label_pad_value);
    fill(out_labels, head, lp);
    const In* src = labels + r.src + label_shift + shift;
    for (int64_t k = 0; k < n; ++k) out_labels[head + k] = static_cast<Out>(src[k]);
    fill(out_labels + head + n, L - head - n, lp);
  }
  return mn < 0;
}

}  // namespace

template <typename In, typename Out>
int64_t pad_cpu_impl(Ragged<In> ids, const In* label_values, const int64_t* label_offsets,
                     const PadOptions& o, Out* out_ids, Out* out_mask, Out* out_labels,
                     bool check_negative, bool elementwise) {
  if (o.length < 0) throw std::invalid_argument("pad: length must be >= 0");
  const In* labels = label_values ? label_values : ids.values;
  if (label_values) {
    for (int64_t i = 0; i < ids.n; ++i) {
      const int64_t a = ids.size(i), b = label_offsets[i + 1] - label_offsets[i];
      if (a != b) {
        throw std::invalid_argument("labels of example " + std::to_string(i) + " have length " +
                                    std::to_string(b) + " but its input_ids have length " +
                                    std::to_string(a));
      }
    }
  }
  const int64_t L = o.length;
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  // ~64 KiB of output per thread at least, so small batches stay on one thread.
  const int64_t rows_per_thread = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, L));
  parallel_for(ids.n, rows_per_thread, [&](int64_t b, int64_t e) {
    int64_t local_bad = std::numeric_limits<int64_t>::max();
    for (int64_t i = b; i < e; ++i) {
      const PadRow r = pad_row(ids.offsets[i], ids.offsets[i + 1], o);
      const int64_t shift = label_values ? label_offsets[i] - ids.offsets[i] : 0;
      Out* row_ids = out_ids ? out_ids + i * L : nullptr;
      Out* row_mask = out_mask ? out_mask + i * L : nullptr;
      Out* row_labels = out_labels ? out_labels + i * L : nullptr;
      bool negative = false;
      if (elementwise) {  // the CUDA kernel's per-element path, run on the CPU for testing
        for (int64_t j = 0; j < L; ++j) {
          pad_element(r, j, ids.values, labels, shift, o, row_ids, row_mask, row_labels);
        }
        for (int64_t k = 0; k < r.len; ++k) negative |= ids.values[r.src + k] < 0;
      } else {
        negative = pad_one_row(r, ids.values, labels, shift, o, row_ids, row_mask, row_labels);
      }
      if (check_negative && negative && i < local_bad) local_bad = i;
    }
    int64_t cur = bad.load();
    while (local_bad < cur && !bad.compare_exchange_weak(cur, local_bad)) {
    }
  });
  const int64_t result = bad.load();
  return result == std::numeric_limits<int64_t>::max() ? -1 : result;
}

template <typename In, typename Out>
int64_t pad_cpu(Ragged<In> ids, const In* label_values, const int64_t* label_offsets,
                const PadOptions& opt, Out* out_ids, Out* out_mask, Out* out_labels,
                bool check_negative) {
  return pad_cpu_impl(ids, label_values, label_offsets, opt, out_ids, out_mask, out_labels,
                      check_negative, false);
}

#define MIXTAPE_INSTANTIATE_PAD(In, Out)                                                         \
  template int64_t pad_cpu<In, Out>(Ragged<In>, const In*, const int64_t*, const PadOptions&,   \
                                    Out*, Out*, Out*, bool);                                     \
  template int64_t pad_cpu_impl<In, Out>(Ragged<In>, const In*, const int64_t*,                 \
                                         const PadOptions&, Out*, Out*, Out*, bool, bool);
MIXTAPE_INSTANTIATE_PAD(int32_t, int32_t)
MIXTAPE_INSTANTIATE_PAD(int32_t, int64_t)
MIXTAPE_INSTANTIATE_PAD(int64_t, int32_t)
MIXTAPE_INSTANTIATE_PAD(int64_t, int64_t)
#undef MIXTAPE_INSTANTIATE_PAD

}  // namespace mixtape
