#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/parallel.h"
#include "mask/mask.h"

namespace mixtape {
namespace {

// One query row of the mask: blocked, then allowed over [start, q] (or [q, q] on padding), then
// blocked. Three fills, so the mask is written at memset speed.
template <typename E>
void write_query_row(E* row, int64_t C, int64_t start, int64_t q, E allowed, E blocked) {
  std::fill(row, row + start, blocked);
  std::fill(row + start, row + q + 1, allowed);
  std::fill(row + q + 1, row + C, blocked);
}

template <typename T, typename E>
int64_t mask_rows(const T* seq_idx, int64_t rows, int64_t C, E allowed, E blocked, E* out) {
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  // ~1 MiB of output per thread at least: threads cost more than small masks take.
  const int64_t rows_per_thread =
      std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, C * C * int64_t(sizeof(E))));
  parallel_for(rows, rows_per_thread, [&](int64_t b, int64_t e) {
    std::vector<int64_t> starts(static_cast<size_t>(C));
    for (int64_t r = b; r < e; ++r) {
      const T* s = seq_idx + r * C;
      // Pass 1: document starts, and the contiguity check (non-negative ids never decrease).
      int64_t start = 0, last_doc = std::numeric_limits<int64_t>::min();
      bool ok = true;
      for (int64_t j = 0; j < C; ++j) {
        const int64_t cur = static_cast<int64_t>(s[j]);
        start = mask_block_start(start, j, cur, j > 0 ? static_cast<int64_t>(s[j - 1]) : cur);
        starts[static_cast<size_t>(j)] = start;
        if (cur >= 0) {
          if (cur < last_doc || (cur == last_doc && start == j)) ok = false;
          last_doc = cur;
        }
      }
      if (!ok) {
        int64_t cur_bad = bad.load();
        while (r < cur_bad && !bad.compare_exchange_weak(cur_bad, r)) {
        }
        continue;
      }
      // Pass 2: the C query rows of this row's mask.
      E* m = out + r * C * C;
      for (int64_t q = 0; q < C; ++q) {
        write_query_row(m + q * C, C, starts[static_cast<size_t>(q)], q, allowed, blocked);
      }
    }
  });
  const int64_t first = bad.load();
  return first == std::numeric_limits<int64_t>::max() ? -1 : first;
}

}  // namespace

template <typename T>
int64_t block_causal_mask_cpu(const T* seq_idx, int64_t rows, int64_t C, int elem_size,
                              uint32_t allowed, uint32_t blocked, void* out) {
  switch (elem_size) {
    case 1:
      return mask_rows(seq_idx, rows, C, static_cast<uint8_t>(allowed),
                       static_cast<uint8_t>(blocked), static_cast<uint8_t*>(out));
    case 2:
      return mask_rows(seq_idx, rows, C, static_cast<uint16_t>(allowed),
                       static_cast<uint16_t>(blocked), static_cast<uint16_t*>(out));
    case 4:
      return mask_rows(seq_idx, rows, C, allowed, blocked, static_cast<uint32_t*>(out));
    default:
      throw std::invalid_argument("block_causal_mask: elem_size must be 1, 2 or 4, got " +
                                  std::to_string(elem_size));
  }
}

template int64_t block_causal_mask_cpu<int32_t>(const int32_t*, int64_t, int64_t, int, uint32_t,
                                                uint32_t, void*);
template int64_t block_causal_mask_cpu<int64_t>(const int64_t*, int64_t, int64_t, int, uint32_t,
                                                uint32_t, void*);

}  // namespace mixtape
