#include "gather/gather.h"

#include <cstring>
#include <stdexcept>
#include <string>

#include "common/parallel.h"

namespace mixtape {

void gather_rows_cpu(const GatherRowsArgs& a) {
  for (int64_t k = 0; k < a.n; ++k) {
    const int64_t s = a.starts[k], len = a.lengths[k], d = a.out_offsets[k];
    // Compared without forming s + len (no overflow for any int64 inputs).
    if (len < 0 || s < 0 || s > a.num_values || len > a.num_values - s || d < 0 ||
        d > a.out_size || len > a.out_size - d) {
      throw std::invalid_argument(
          "gather_rows: row " + std::to_string(k) + " reads [" + std::to_string(s) + ", +" +
          std::to_string(len) + ") of " + std::to_string(a.num_values) + " values into [" +
          std::to_string(d) + ", +" + std::to_string(len) + ") of " + std::to_string(a.out_size));
    }
  }
  const auto* src = static_cast<const unsigned char*>(a.values);
  auto* dst = static_cast<unsigned char*>(a.out);
  const int64_t es = a.elem_size;
  // ~256 rows of a few hundred tokens per task: big enough that a thread pays off.
  parallel_for(a.n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      std::memcpy(dst + a.out_offsets[k] * es, src + a.starts[k] * es,
                  static_cast<size_t>(a.lengths[k] * es));
    }
  });
}

}  // namespace mixtape
