#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/parallel.h"
#include "pack/pack.h"

namespace mixtape {
namespace {

std::string where(int64_t piece, int64_t row) {
  return "piece " + std::to_string(piece) + " (row " + std::to_string(row) + ")";
}

// "[a, a + n)" without overflowing (a malformed plan may hold any int64).
std::string span(int64_t a, int64_t n) {
  const bool fits = n >= 0 ? a <= std::numeric_limits<int64_t>::max() - n
                           : a >= std::numeric_limits<int64_t>::min() - n;
  return "[" + std::to_string(a) + ", " +
         (fits ? std::to_string(a + n) : std::to_string(a) + " + " + std::to_string(n)) + ")";
}

// Output pointers of one fill, each advanced to a given element.
template <typename Out>
struct FillOut {
  Out* ids;
  Out* labels;
  int64_t* positions;
  int32_t* seq_idx;
  bool* loss_mask;
};

// Padding over [b, e).
template <typename Out>
void fill_padding(const FillOut<Out>& o, int64_t b, int64_t e, const PackFillOptions& opt) {
  if (e <= b) return;
  if (o.ids) std::fill(o.ids + b, o.ids + e, static_cast<Out>(opt.pad_value));
  if (o.labels) std::fill(o.labels + b, o.labels + e, static_cast<Out>(opt.label_pad_value));
  if (o.positions) std::fill(o.positions + b, o.positions + e, int64_t{0});
  if (o.seq_idx) std::fill(o.seq_idx + b, o.seq_idx + e, int32_t{-1});
  if (o.loss_mask) std::fill(o.loss_mask + b, o.loss_mask + e, false);
}

// Converts src[b, e) into dst[b, e); returns whether every value fits Out (checked only when
// the conversion narrows; the check is an OR folded into the copy loop).
template <typename In, typename Out>
bool copy_checked(const In* src, int64_t b, int64_t e, Out* dst) {
  if constexpr (std::is_same_v<In, Out>) {
    if (e > b) std::memcpy(dst + b, src + b, static_cast<size_t>(e - b) * sizeof(In));
    return true;
  } else if constexpr (narrows<In, Out>()) {
    In lost = 0;
    for (int64_t k = b; k < e; ++k) {
      dst[k] = static_cast<Out>(src[k]);
      lost |= src[k] ^ static_cast<In>(dst[k]);
    }
    return lost == 0;
  } else {
    for (int64_t k = b; k < e; ++k) dst[k] = static_cast<Out>(src[k]);
    return true;
  }
}

// One piece of `len` tokens from `src` at output element `at`, field by field (each loop is a
// plain copy or fill the compiler vectorises). Returns the offset in the piece of the first
// written token that does not fit Out, or -1.
template <typename In, typename Out>
int64_t fill_piece(const FillOut<Out>& o, int64_t at, const In* src, int64_t len, int32_t piece,
                   const PackFillOptions& opt) {
  bool ok = true;
  if (o.ids) ok &= copy_checked(src, 0, len, o.ids + at);
  if (o.labels) {
    Out* dst = o.labels + at;
    dst[0] = static_cast<Out>(opt.label_pad_value);
    ok &= copy_checked(src, 1, len, dst);
  }
  if (o.positions) {
    int64_t* dst = o.positions + at;
    for (int64_t k = 0; k < len; ++k) dst[k] = opt.position_start + k;
  }
  if (o.seq_idx) std::fill(o.seq_idx + at, o.seq_idx + at + len, piece);
  if (o.loss_mask) {
    bool* dst = o.loss_mask + at;
    dst[0] = false;
    for (int64_t k = 1; k < len; ++k) dst[k] = static_cast<int64_t>(src[k]) != opt.label_pad_value;
  }
  if (ok) return -1;
  for (int64_t k = o.ids ? 0 : 1; k < len; ++k) {  // the error path: find the first
    if (!fits<Out>(src[k])) return k;
  }
  return -1;
}

// Lowers `best` to `v` (v >= 0) atomically.
void lower_to(std::atomic<int64_t>& best, int64_t v) {
  int64_t cur = best.load();
  while (v < cur && !best.compare_exchange_weak(cur, v)) {
  }
}

}  // namespace

int64_t check_pack_pieces(const PackPieces& p, const int64_t* offsets, int64_t num_docs,
                          int64_t capacity) {
  if (p.rows < 0 || p.pieces < 0) throw std::invalid_argument("pack plan: negative size");
  // The padded output has rows * C elements: both must be sane before any index is formed.
  if (capacity < 0 || (capacity > 0 && p.rows > std::numeric_limits<int64_t>::max() / capacity)) {
    throw std::invalid_argument("pack plan: " + std::to_string(p.rows) + " rows of capacity " +
                                std::to_string(capacity) + " do not fit one int64 index");
  }
  if (p.row_offsets[0] != 0 || p.row_offsets[p.rows] != p.pieces) {
    throw std::invalid_argument("pack plan: row_offsets must go from 0 to the number of pieces " +
                                std::to_string(p.pieces) + ", got " +
                                std::to_string(p.row_offsets[0]) + " ... " +
                                std::to_string(p.row_offsets[p.rows]));
  }
  for (int64_t r = 0; r < p.rows; ++r) {
    if (p.row_offsets[r + 1] < p.row_offsets[r]) {
      throw std::invalid_argument("pack plan: row_offsets must be non-decreasing, but row_offsets[" +
                                  std::to_string(r + 1) + "] = " +
                                  std::to_string(p.row_offsets[r + 1]) + " < row_offsets[" +
                                  std::to_string(r) + "] = " + std::to_string(p.row_offsets[r]));
    }
  }
  if (p.pieces > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("pack plan: more than 2^31 - 1 pieces in one fill");
  }
  int64_t tokens = 0;
  for (int64_t r = 0; r < p.rows; ++r) {
    int64_t end = 0;  // first free column of the row
    for (int64_t k = p.row_offsets[r]; k < p.row_offsets[r + 1]; ++k) {
      const int64_t d = p.doc[k], s = p.start[k], len = p.length[k], col = p.column[k];
      if (d < 0 || d >= num_docs) {
        throw std::invalid_argument("pack plan: " + where(k, r) + " refers to document " +
                                    std::to_string(d) + " but there are " +
                                    std::to_string(num_docs) + " documents");
      }
      const int64_t doc_len = offsets[d + 1] - offsets[d];
      // Compared without forming s + len or col + len: a crafted or corrupt plan (e.g. a loaded
      // .npz) with values near 2^63 must not wrap past the check into an out-of-bounds access.
      if (len < 1 || s < 0 || len > doc_len || s > doc_len - len) {
        throw std::invalid_argument("pack plan: " + where(k, r) + " takes tokens " + span(s, len) +
                                    " of document " + std::to_string(d) + ", which has " +
                                    std::to_string(doc_len) + " tokens");
      }
      if (col < end || len > capacity || col > capacity - len) {
        throw std::invalid_argument("pack plan: " + where(k, r) + " occupies columns " +
                                    span(col, len) +
                                    ", overlapping the previous piece or beyond the capacity " +
                                    std::to_string(capacity));
      }
      end = col + len;
      if (len > std::numeric_limits<int64_t>::max() - tokens) {
        throw std::invalid_argument("pack plan: the pieces hold more than 2^63 - 1 tokens");
      }
      tokens += len;
    }
  }
  return tokens;
}

template <typename In, typename Out>
int64_t pack_fill_cpu(Ragged<In> docs, const PackPieces& plan, const PackFillOptions& opt,
                      Out* ids, Out* labels, int64_t* positions, int32_t* seq_idx,
                      bool* loss_mask, bool elementwise) {
  check_pack_pieces(plan, docs.offsets, docs.n, opt.capacity);
  const int64_t pieces = plan.pieces;
  const int64_t C = opt.capacity;
  PackPieces p = plan;
  std::vector<int64_t> flat_offsets;
  if (opt.flat) {
    flat_offsets.resize(static_cast<size_t>(pieces) + 1);
    flat_offsets[0] = 0;
    for (int64_t k = 0; k < pieces; ++k) {
      flat_offsets[static_cast<size_t>(k) + 1] = flat_offsets[static_cast<size_t>(k)] + p.length[k];
    }
    p.flat_offsets = flat_offsets.data();
  }
  const FillOut<Out> out{ids, labels, positions, seq_idx, loss_mask};
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  std::atomic<int64_t> unfit{kNone};
  // At least ~64K output elements per thread: a training batch (8 x 4096) stays on the
  // calling thread, since waking a second one costs more than it saves there and, with DataLoader
  // workers busy on the other cores, waits for a core (measured 70 -> 260 us per batch).
  const int64_t rows_per_thread = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, C));
  parallel_for(p.rows, rows_per_thread, [&](int64_t rb, int64_t re) {
    int64_t local = kNone;
    const auto note = [&](int64_t src) {
      if (src >= 0 && src < local) local = src;
    };
    for (int64_t r = rb; r < re; ++r) {
      const int64_t lo = p.row_offsets[r], hi = p.row_offsets[r + 1];
      if (elementwise) {  // the CUDA kernel's per-element path, run on the CPU for testing
        if (opt.flat) {
          if (hi == lo) continue;
          for (int64_t t = p.flat_offsets[lo]; t < p.flat_offsets[hi]; ++t) {
            note(pack_element(pack_source_flat(p, t), t, docs.values, docs.offsets, p, opt, ids,
                              labels, positions, seq_idx, loss_mask));
          }
        } else {
          for (int64_t j = 0; j < C; ++j) {
            note(pack_element(pack_source_padded(p, r, j), r * C + j, docs.values, docs.offsets,
                              p, opt, ids, labels, positions, seq_idx, loss_mask));
          }
        }
        continue;
      }
      int64_t col = 0;
      for (int64_t k = lo; k < hi; ++k) {
        const int64_t first = docs.offsets[p.doc[k]] + p.start[k];
        const int64_t at = opt.flat ? p.flat_offsets[k] : r * C + p.column[k];
        if (!opt.flat) fill_padding(out, r * C + col, at, opt);
        const int64_t bad = fill_piece(out, at, docs.values + first, p.length[k],
                                       static_cast<int32_t>(k), opt);
        if (bad >= 0) note(first + bad);
        col = p.column[k] + p.length[k];
      }
      if (!opt.flat) fill_padding(out, r * C + col, (r + 1) * C, opt);
    }
    if (local != kNone) lower_to(unfit, local);
  });
  const int64_t first = unfit.load();
  return first == kNone ? -1 : first;
}

template <typename In>
PackRowsResult pack_rows_cpu(const In* values, int64_t num_values, const int64_t* lengths,
                             int64_t pieces, const int64_t* row_offsets, int64_t rows,
                             const int64_t* piece_tag, const PackRowsOptions& opt, int64_t* ids,
                             int64_t* labels, int64_t* positions, int32_t* seq_idx, int64_t* tags,
                             int32_t* cu_seqlens) {
  const int64_t C = opt.fill.capacity;
  if (rows < 0 || pieces < 0 || C < 0 || (C > 0 && rows > std::numeric_limits<int64_t>::max() / C)) {
    throw std::invalid_argument("pack_rows: " + std::to_string(rows) + " rows of capacity " +
                                std::to_string(C) + " do not fit one int64 index");
  }
  if (cu_seqlens && rows * C > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("pack_rows: cu_seqlens: " + std::to_string(rows * C) +
                                " tokens do not fit int32; fill fewer rows");
  }
  if (pieces > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("pack_rows: more than 2^31 - 1 pieces in one fill");
  }
  if (row_offsets[0] != 0 || row_offsets[rows] != pieces) {
    throw std::invalid_argument("pack_rows: row_offsets must go from 0 to the number of pieces " +
                                std::to_string(pieces) + ", got " + std::to_string(row_offsets[0]) +
                                " ... " + std::to_string(row_offsets[rows]));
  }
  // Checked before any write: each row's pieces fit it, and the pieces cover `values` exactly.
  int64_t total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (row_offsets[r + 1] < row_offsets[r]) {
      throw std::invalid_argument("pack_rows: row_offsets must be non-decreasing, but row " +
                                  std::to_string(r) + " ends before it starts");
    }
    int64_t used = 0;
    for (int64_t k = row_offsets[r]; k < row_offsets[r + 1]; ++k) {
      if (lengths[k] < 1 || lengths[k] > C - used) {
        throw std::invalid_argument("pack_rows: " + where(k, r) + " has " +
                                    std::to_string(lengths[k]) + " tokens; pieces need >= 1 and " +
                                    "the row has " + std::to_string(C - used) + " columns left");
      }
      used += lengths[k];
    }
    total += used;  // <= rows * C, which fits int64
  }
  if (total != num_values) {
    throw std::invalid_argument("pack_rows: " + std::to_string(num_values) +
                                " values for pieces of " + std::to_string(total) + " tokens");
  }
  PackRowsResult res;
  for (int64_t i = 0; i < num_values; ++i) {
    if (values[i] < 0) {
      res.negative = i;
      return res;
    }
  }
  const PackFillOptions& fo = opt.fill;
  const FillOut<int64_t> out{ids, labels, positions, seq_idx, nullptr};
  int64_t src = 0, n_cu = 0, last = -1;
  const auto boundary = [&](int64_t at) {
    if (n_cu > 0 && at == last) return;
    if (n_cu > 0) res.max_segment = std::max(res.max_segment, at - last);
    if (cu_seqlens) cu_seqlens[n_cu] = static_cast<int32_t>(at);
    ++n_cu;
    last = at;
  };
  for (int64_t r = 0; r < rows; ++r) {
    int64_t at = r * C;
    boundary(at);
    for (int64_t k = row_offsets[r]; k < row_offsets[r + 1]; ++k) {
      const int64_t len = lengths[k];
      fill_piece(out, at, values + src, len, static_cast<int32_t>(k), fo);  // int64 out: fits
      if (tags) std::fill(tags + at, tags + at + len, piece_tag[k]);
      src += len;
      at += len;
      boundary(at);
    }
    fill_padding(out, at, (r + 1) * C, fo);
    if (tags) std::fill(tags + at, tags + (r + 1) * C, opt.tag_pad);
  }
  boundary(rows * C);
  res.cu_size = n_cu;
  return res;
}

template PackRowsResult pack_rows_cpu<int32_t>(const int32_t*, int64_t, const int64_t*, int64_t,
                                               const int64_t*, int64_t, const int64_t*,
                                               const PackRowsOptions&, int64_t*, int64_t*,
                                               int64_t*, int32_t*, int64_t*, int32_t*);
template PackRowsResult pack_rows_cpu<int64_t>(const int64_t*, int64_t, const int64_t*, int64_t,
                                               const int64_t*, int64_t, const int64_t*,
                                               const PackRowsOptions&, int64_t*, int64_t*,
                                               int64_t*, int32_t*, int64_t*, int32_t*);

#define MIXTAPE_INSTANTIATE_PACK_FILL(In, Out)                                                   \
  template int64_t pack_fill_cpu<In, Out>(Ragged<In>, const PackPieces&, const PackFillOptions&, \
                                          Out*, Out*, int64_t*, int32_t*, bool*, bool);
MIXTAPE_INSTANTIATE_PACK_FILL(int32_t, int32_t)
MIXTAPE_INSTANTIATE_PACK_FILL(int32_t, int64_t)
MIXTAPE_INSTANTIATE_PACK_FILL(int64_t, int32_t)
MIXTAPE_INSTANTIATE_PACK_FILL(int64_t, int64_t)
#undef MIXTAPE_INSTANTIATE_PACK_FILL

}  // namespace mixtape
