// CPU pad kernel. Each row is written segment by segment (head pad, tokens, tail pad) with
// vector stores; the negative-id check is an OR folded into the token copy, so it costs no extra
// pass. Batches whose outputs exceed the cache use non-temporal (streaming) stores: the rows are
// not read back soon, and skipping the read-for-ownership of every destination line is what brings
// the kernel close to memcpy bandwidth.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/parallel.h"
#include "pad/pad.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#define MIXTAPE_PAD_SSE2 1
#endif

namespace mixtape {
namespace {

// Output bytes above which stores stream past the cache. Below it the batch fits in L2/L3 and the
// consumer (pinning, the H2D copy) reads it right away, so ordinary stores are better.
constexpr int64_t kStreamBytes = int64_t{8} << 20;
// Output bytes per thread below which a second thread is not worth waking (a pool worker takes
// ~5-20 us to wake and report back; 2 MiB takes ~100-200 us to write).
constexpr int64_t kBytesPerThread = int64_t{2} << 20;
// Elements converted at a time through an L1-resident buffer when In != Out.
constexpr int64_t kChunk = 512;

#if MIXTAPE_PAD_SSE2
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <typename T>
inline void store_scalar(T* p, T v, bool nt) {
  if (!nt) {
    *p = v;
  } else if constexpr (sizeof(T) == 8) {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_stream_si64(reinterpret_cast<long long*>(p), static_cast<long long>(v));
#else
    *p = v;
#endif
  } else {
    _mm_stream_si32(reinterpret_cast<int*>(p), static_cast<int>(v));
  }
}

inline void store_vec(void* p, __m128i v, bool nt) {
  if (nt) {
    _mm_stream_si128(static_cast<__m128i*>(p), v);
  } else {
    _mm_store_si128(static_cast<__m128i*>(p), v);
  }
}

template <typename T>
inline __m128i splat(T v) {
  if constexpr (sizeof(T) == 8) {
    return _mm_set1_epi64x(static_cast<long long>(v));
  } else {
    return _mm_set1_epi32(static_cast<int>(v));
  }
}

// Lanes of `acc` ORed into one T (its sign bit is set iff some ORed value was negative).
template <typename T>
inline T reduce_or(__m128i acc) {
  alignas(16) T lanes[16 / sizeof(T)];
  _mm_store_si128(reinterpret_cast<__m128i*>(lanes), acc);
  T r = 0;
  for (T x : lanes) r |= x;
  return r;
}
#endif

// dst[0, n) = v.
template <typename T>
void put_fill(T* dst, int64_t n, T v, bool nt) {
#if MIXTAPE_PAD_SSE2
  constexpr int64_t w = 16 / sizeof(T);
  int64_t k = 0;
  for (; k < n && !aligned16(dst + k); ++k) store_scalar(dst + k, v, nt);
  const __m128i x = splat(v);
  for (; k + 2 * w <= n; k += 2 * w) {
    store_vec(dst + k, x, nt);
    store_vec(dst + k + w, x, nt);
  }
  for (; k < n; ++k) store_scalar(dst + k, v, nt);
#else
  (void)nt;
  std::fill(dst, dst + n, v);
#endif
}

// dst[0, n) = src[0, n) for one type, returning the OR of the values copied.
template <typename T>
T put_copy_same(const T* src, int64_t n, T* dst, bool nt) {
  T acc = 0;
#if MIXTAPE_PAD_SSE2
  constexpr int64_t w = 16 / sizeof(T);
  int64_t k = 0;
  for (; k < n && !aligned16(dst + k); ++k) {
    acc |= src[k];
    store_scalar(dst + k, src[k], nt);
  }
  __m128i a0 = _mm_setzero_si128(), a1 = _mm_setzero_si128();
  for (; k + 2 * w <= n; k += 2 * w) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k));
    const __m128i y = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k + w));
    a0 = _mm_or_si128(a0, x);
    a1 = _mm_or_si128(a1, y);
    store_vec(dst + k, x, nt);
    store_vec(dst + k + w, y, nt);
  }
  for (; k < n; ++k) {
    acc |= src[k];
    store_scalar(dst + k, src[k], nt);
  }
  acc |= reduce_or<T>(_mm_or_si128(a0, a1));
#else
  (void)nt;
  if (n > 0) std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(T));
  for (int64_t k = 0; k < n; ++k) acc |= src[k];
#endif
  return acc;
}

// dst[0, n) = src[0, n) converted to Out, returning the OR of the source values (negative iff a
// copied value is). Conversions go through a small L1 buffer so the stores stay vectorised.
template <typename In, typename Out>
In put_copy(const In* src, int64_t n, Out* dst, bool nt) {
  if constexpr (std::is_same_v<In, Out>) {
    return put_copy_same(src, n, dst, nt);
  } else {
    In acc = 0;
    alignas(64) Out buf[kChunk];
    for (int64_t b = 0; b < n; b += kChunk) {
      const int64_t m = std::min(kChunk, n - b);
      for (int64_t k = 0; k < m; ++k) {
        acc |= src[b + k];
        buf[k] = static_cast<Out>(src[b + k]);
      }
      put_copy_same(buf, m, dst + b, nt);
    }
    return acc;
  }
}

template <typename In>
In or_of(const In* src, int64_t n) {
  In acc = 0;
  for (int64_t k = 0; k < n; ++k) acc |= src[k];
  return acc;
}

// One row by segments: [0, dst) pad, [dst, dst + len) tokens, [dst + len, L) pad. Returns whether
// a kept id is negative.
template <typename In, typename Out>
bool pad_one_row(const PadRow& r, const In* values, const In* labels, int64_t label_shift,
                 const PadOptions& o, Out* ids, Out* mask, Out* out_labels, bool nt) {
  const int64_t L = o.length, head = r.dst, tail = L - r.dst - r.len;
  In bits = 0;
  if (ids) {
    const Out pad = static_cast<Out>(o.pad_value);
    put_fill(ids, head, pad, nt);
    bits = put_copy(values + r.src, r.len, ids + head, nt);
    put_fill(ids + head + r.len, tail, pad, nt);
  } else {
    bits = or_of(values + r.src, r.len);
  }
  if (mask) {
    put_fill(mask, head, Out(0), nt);
    put_fill(mask + head, r.len, Out(1), nt);
    put_fill(mask + head + r.len, tail, Out(0), nt);
  }
  if (out_labels) {
    const int64_t shift = o.shift_labels ? 1 : 0;
    const int64_t n = std::max<int64_t>(0, r.len - shift);
    const Out lp = static_cast<Out>(o.label_pad_value);
    put_fill(out_labels, head, lp, nt);
    put_copy(labels + r.src + label_shift + shift, n, out_labels + head, nt);
    put_fill(out_labels + head + n, L - head - n, lp, nt);
  }
  return bits < 0;
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
  const int64_t outputs = (out_ids ? 1 : 0) + (out_mask ? 1 : 0) + (out_labels ? 1 : 0);
  const int64_t row_bytes = std::max<int64_t>(1, outputs * L * static_cast<int64_t>(sizeof(Out)));
  const bool nt = ids.n * row_bytes >= kStreamBytes;
  const int64_t rows_per_thread = std::max<int64_t>(1, kBytesPerThread / row_bytes);
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
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
          const int64_t src = pad_id_source(r, j);  // the kernel's negative-id check
          negative |= src >= 0 && ids.values[src] < 0;
        }
      } else {
        negative =
            pad_one_row(r, ids.values, labels, shift, o, row_ids, row_mask, row_labels, nt);
      }
      if (check_negative && negative && i < local_bad) local_bad = i;
    }
#if MIXTAPE_PAD_SSE2
    // Streaming stores are weakly ordered: make them visible before the join publishes the rows.
    if (nt) _mm_sfence();
#endif
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
