// The loader's per-batch planning in one call: about a hundred items per batch, so what it
// replaces was numpy call overhead (dozens of small array operations), not arithmetic.
#include "pack_batch/pack_batch.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>

namespace mixtape {

void pack_batch_cpu(const PackBatchInput& in, const PackBatchOptions& opt, PackBatchResult* out) {
  const int64_t cap = opt.capacity;
  if (cap < 1) {
    throw std::invalid_argument("pack_batch: capacity must be >= 1, got " + std::to_string(cap));
  }
  if (opt.batch_size < 1) {
    throw std::invalid_argument("pack_batch: batch_size must be >= 1, got " +
                                std::to_string(opt.batch_size));
  }
  // Items: carried pieces, then each document's row-sized pieces.
  int64_t n = in.num_carry;
  for (int64_t d = 0; d < in.num_docs; ++d) {
    const int64_t len = in.doc_length[d];
    const int64_t pieces = len > 0 ? (len - 1) / cap + 1 : 0;  // no len + cap - 1 overflow
    if (len < 0 || pieces > std::numeric_limits<int32_t>::max() - n) {
      throw std::invalid_argument("pack_batch: document " + std::to_string(d) + " has length " +
                                  std::to_string(len) + " (capacity " + std::to_string(cap) +
                                  "; at most 2^31 - 1 pieces per batch)");
    }
    n += pieces;
  }
  std::vector<int64_t> items(static_cast<size_t>(n) * 4);
  std::vector<int64_t> lengths(static_cast<size_t>(n));
  for (int64_t i = 0; i < in.num_carry; ++i) {
    const int64_t* c = in.carry + 4 * i;
    if (c[0] < 0 || c[0] > std::numeric_limits<int32_t>::max() || c[1] < 0 || c[2] < 0 ||
        c[3] < 1 || c[3] > cap) {
      throw std::invalid_argument(
          "pack_batch: carried piece " + std::to_string(i) + " is (source " +
          std::to_string(c[0]) + ", row " + std::to_string(c[1]) + ", start " +
          std::to_string(c[2]) + ", length " + std::to_string(c[3]) + "): expected a source in " +
          "int32, row and start >= 0 and a length in [1, " + std::to_string(cap) + "]");
    }
    std::copy(c, c + 4, items.begin() + 4 * i);
    lengths[static_cast<size_t>(i)] = c[3];
  }
  int64_t k = in.num_carry;
  for (int64_t d = 0; d < in.num_docs; ++d) {
    const int64_t len = in.doc_length[d];
    for (int64_t s = 0; s < len; s += cap) {
      int64_t* it = items.data() + 4 * k;
      it[0] = in.doc_source[d];
      it[1] = in.doc_row[d];
      it[2] = s;
      it[3] = std::min(cap, len - s);
      lengths[static_cast<size_t>(k++)] = it[3];
      if (len - s <= cap) break;  // the last piece (and s + cap cannot overflow below)
    }
  }
  PackPlanOptions po;
  po.capacity = cap;
  po.strategy = opt.strategy;
  po.overflow = PackOverflow::kError;
  PackPlanResult plan;
  pack_plan_cpu(lengths.data(), n, po, &plan);
  const int64_t rows = static_cast<int64_t>(plan.row_offsets.size()) - 1;
  out->num_rows = rows;

  // The batch_size fullest rows (stable: the earlier row wins a tie), then back in plan order.
  std::vector<int64_t> used(static_cast<size_t>(rows), 0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = plan.row_offsets[r]; j < plan.row_offsets[r + 1]; ++j) {
      used[static_cast<size_t>(r)] += plan.length[static_cast<size_t>(j)];
    }
  }
  std::vector<int64_t> order(static_cast<size_t>(rows));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return used[static_cast<size_t>(a)] > used[static_cast<size_t>(b)];
  });
  const int64_t kept = std::min(opt.batch_size, rows);
  order.resize(static_cast<size_t>(kept));
  std::sort(order.begin(), order.end());
  std::vector<char> is_kept(static_cast<size_t>(rows), 0);
  for (int64_t r : order) is_kept[static_cast<size_t>(r)] = 1;

  const size_t pieces = plan.doc.size();  // no reallocation while appending below
  out->source.clear();
  out->source.reserve(pieces);
  out->row.clear();
  out->row.reserve(pieces);
  out->start.clear();
  out->start.reserve(pieces);
  out->length.clear();
  out->length.reserve(pieces);
  out->carry.clear();
  out->carry.reserve(4 * pieces);
  out->carry_tokens = 0;
  out->row_offsets.reserve(static_cast<size_t>(kept) + 1);
  out->row_offsets.assign(1, 0);
  const auto piece = [&](int64_t j, int64_t* f) {  // f: source, row, start, length
    const int64_t* it = items.data() + 4 * plan.doc[static_cast<size_t>(j)];
    f[0] = it[0];
    f[1] = it[1];
    f[2] = it[2] + plan.start[static_cast<size_t>(j)];
    f[3] = plan.length[static_cast<size_t>(j)];
  };
  int64_t f[4];
  for (int64_t r : order) {
    for (int64_t j = plan.row_offsets[r]; j < plan.row_offsets[r + 1]; ++j) {
      piece(j, f);
      out->source.push_back(static_cast<int32_t>(f[0]));
      out->row.push_back(f[1]);
      out->start.push_back(f[2]);
      out->length.push_back(f[3]);
    }
    out->row_offsets.push_back(static_cast<int64_t>(out->row.size()));
  }
  for (int64_t r = 0; r < rows; ++r) {
    if (is_kept[static_cast<size_t>(r)]) continue;
    for (int64_t j = plan.row_offsets[r]; j < plan.row_offsets[r + 1]; ++j) {
      piece(j, f);
      out->carry.insert(out->carry.end(), f, f + 4);
      out->carry_tokens += f[3];
    }
  }
}

}  // namespace mixtape
