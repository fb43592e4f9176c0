// The ragged batch, the currency between stages: `values` (1-D, contiguous) plus `offsets`
// (int64, n + 1 entries, offsets[0] == 0, non-decreasing, offsets[n] == number of values).
// Arrow list columns have exactly this layout.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace mixtape {

template <typename T>
struct Ragged {
  const T* values;
  const int64_t* offsets;
  int64_t n;  // number of sequences

  int64_t size(int64_t i) const { return offsets[i + 1] - offsets[i]; }
};

// Throws std::invalid_argument naming the first bad offset. `what` names the field ("input_ids").
// O(n); every kernel that takes offsets from the user calls it first.
inline void check_offsets(const int64_t* offsets, int64_t n, int64_t num_values,
                          const char* what) {
  if (offsets[0] != 0) {
    throw std::invalid_argument(std::string(what) + ": offsets[0] must be 0, got " +
                                std::to_string(offsets[0]));
  }
  for (int64_t i = 0; i < n; ++i) {
    if (offsets[i + 1] < offsets[i]) {
      throw std::invalid_argument(std::string(what) + ": offsets must be non-decreasing, but " +
                                  "offsets[" + std::to_string(i + 1) + "] = " +
                                  std::to_string(offsets[i + 1]) + " < offsets[" +
                                  std::to_string(i) + "] = " + std::to_string(offsets[i]) +
                                  " (example " + std::to_string(i) + ")");
    }
  }
  if (offsets[n] != num_values) {
    throw std::invalid_argument(std::string(what) + ": offsets[-1] = " +
                                std::to_string(offsets[n]) + " but there are " +
                                std::to_string(num_values) + " values");
  }
}

}  // namespace mixtape
