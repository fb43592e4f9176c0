// The packing loader's per-batch read: about a hundred pieces, so one pass in C++ replaces what
// was numpy call overhead (a unique, a gather of whole documents, then a gather of the pieces).
#include "pieces/pieces.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

namespace mixtape {
namespace {

// The source address of piece k (checked), or throws naming it.
const unsigned char* piece_source(const PieceColumn& col, const PieceList& p, int64_t k,
                                  int64_t out_size) {
  const int64_t row = p.rows[k], start = p.starts[k], len = p.lengths[k], dst = p.out_offsets[k];
  const auto fail = [&](const std::string& why) {
    return std::invalid_argument("piece " + std::to_string(k) + " (row " + std::to_string(row) +
                                 ", start " + std::to_string(start) + ", length " +
                                 std::to_string(len) + "): " + why);
  };
  if (row < 0 || row >= col.num_rows) {
    throw fail("row out of range [0, " + std::to_string(col.num_rows) + ")");
  }
  int64_t t = row;
  const int64_t table_rows = col.chunk_starts[col.num_chunks];
  if (col.mapping != nullptr) {
    t = col.mapping[row];
    if (t < 0 || t >= table_rows) {
      throw fail("the row maps to table row " + std::to_string(t) + ", outside [0, " +
                 std::to_string(table_rows) + ")");
    }
  }
  // The chunk holding table row t: the last chunk start <= t.
  const int64_t* cs = col.chunk_starts;
  const int64_t c = std::upper_bound(cs, cs + col.num_chunks + 1, t) - cs - 1;
  const RaggedChunk& ch = col.chunks[c];
  const int64_t local = t - cs[c];
  const int64_t lo = ch.offsets32 ? ch.offsets32[local] : ch.offsets64[local];
  const int64_t hi = ch.offsets32 ? ch.offsets32[local + 1] : ch.offsets64[local + 1];
  if (lo < 0 || hi < lo || hi > ch.num_values) {
    throw fail("the row's offsets [" + std::to_string(lo) + ", " + std::to_string(hi) +
               ") lie outside its chunk's " + std::to_string(ch.num_values) + " values");
  }
  // Compared without forming sums that could overflow.
  if (start < 0 || len < 0 || start > hi - lo || len > hi - lo - start) {
    throw fail("outside the row's " + std::to_string(hi - lo) + " elements");
  }
  if (dst < 0 || dst > out_size || len > out_size - dst) {
    throw fail("destination [" + std::to_string(dst) + ", +" + std::to_string(len) +
               ") outside the output's " + std::to_string(out_size) + " elements");
  }
  return static_cast<const unsigned char*>(ch.values) + (lo + start) * col.elem_size;
}

}  // namespace

int64_t gather_pieces_cpu(const PieceColumn& col, const PieceList& p, void* out,
                          int64_t out_size) {
  const auto mine = [&](int64_t k) { return p.sources == nullptr || p.sources[k] == p.source; };
  for (int64_t k = 0; k < p.n; ++k) {
    if (mine(k)) piece_source(col, p, k, out_size);  // every check before any write
  }
  auto* dst = static_cast<unsigned char*>(out);
  const int64_t es = col.elem_size;
  int64_t copied = 0;
  for (int64_t k = 0; k < p.n; ++k) {
    if (!mine(k)) continue;
    std::memcpy(dst + p.out_offsets[k] * es, piece_source(col, p, k, out_size),
                static_cast<size_t>(p.lengths[k] * es));
    ++copied;
  }
  return copied;
}

}  // namespace mixtape
