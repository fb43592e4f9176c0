// gather_rows: random-access reads of ragged data (the mixer's and the loader's hot copy).
//
// For each output row k, copies `lengths[k]` elements starting at element `starts[k]` of `values`
// to element `out_offsets[k]` of `out`. Elements are `elem_size` bytes, so one kernel serves every
// numeric dtype (token ids, float columns). The ranges are checked first (every source range inside
// [0, num_values), every destination inside [0, out_size)); a bad range throws std::invalid_argument
// naming the row, and nothing is written. Rows may repeat; destination ranges must not overlap.
#pragma once

#include <cstdint>

namespace mixtape {

struct GatherRowsArgs {
  const void* values;
  int64_t num_values;
  int64_t elem_size;
  const int64_t* starts;
  const int64_t* lengths;
  const int64_t* out_offsets;
  int64_t n;  // rows
  void* out;
  int64_t out_size;  // elements
};

void gather_rows_cpu(const GatherRowsArgs& a);

}  // namespace mixtape
