// pack: sequences (by length) -> rows of capacity C (the plan), then plan + ragged tokens ->
// packed rows (the fill).
//
// Plan contract. Every input sequence becomes one or more pieces (doc, start, length); a row holds
// pieces at increasing columns, each piece starting at a multiple of `align` and occupying
// ceil(length / align) * align columns, at most C in all, at most max_docs_per_row pieces.
// Sequences longer than C are split into C-sized pieces, truncated to their first C tokens,
// dropped, or rejected (by policy); `wrapped` cuts the concatenation of all sequences every C
// tokens instead. Plans are deterministic: same inputs, same plan, on every platform.
//
// Fill contract. Row r, column j of the padded layout (or token t of the flat layout, pieces back
// to back) holds the token of the piece covering it, or padding: input_ids = pad_value,
// labels = label_pad_value (also at the first token of every piece, so nothing is predicted
// across a document boundary), position_ids = 0 (position_start + offset in the piece on real
// tokens), seq_idx = -1 (the piece index on real tokens), loss_mask = labels != label_pad_value.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/fits.h"
#include "common/macros.h"
#include "common/ragged.h"

namespace mixtape {

enum class PackStrategy { kBfd, kFfd, kNextFit, kWrapped };
enum class PackOverflow { kSplit, kTruncate, kDrop, kError };

// Throw std::invalid_argument listing the valid names.
PackStrategy parse_pack_strategy(const std::string& name);
PackOverflow parse_pack_overflow(const std::string& name);

struct PackPlanOptions {
  int64_t capacity = 0;  // C: columns per row
  PackStrategy strategy = PackStrategy::kBfd;
  PackOverflow overflow = PackOverflow::kSplit;
  int64_t max_docs_per_row = 0;  // 0: no limit
  int64_t align = 1;             // every piece starts at a multiple; C % align == 0
  int64_t rows_multiple_of = 1;  // empty rows are appended up to a multiple
  bool shuffle = false;          // permute the rows (before the empty rows are appended)
  uint64_t shuffle_seed = 0;
};

// The plan as CSR over rows: row r holds pieces row_offsets[r]:row_offsets[r + 1].
struct PackPlanResult {
  std::vector<int64_t> row_offsets, doc, start, length, column;
  int64_t num_tokens = 0;        // input tokens
  int64_t truncated_tokens = 0;  // cut by overflow = truncate
  int64_t dropped_docs = 0;      // removed by overflow = drop
  int64_t dropped_tokens = 0;
  int64_t split_docs = 0;  // sequences cut into more than one piece
};

// Throws std::invalid_argument for a non-positive length (naming its index), bad options, or a
// sequence longer than C under overflow = error. Single-threaded: O(n + C) plus O(n log C) (bfd),
// O(n log n) (ffd), O(n) (next_fit, wrapped).
template <typename T>
void pack_plan_cpu(const T* lengths, int64_t n, const PackPlanOptions& opt, PackPlanResult* out);

// --- fill ------------------------------------------------------------------------------------

// A plan (or a batch of its rows, rebased: row_offsets[0] == 0) as raw pointers.
struct PackPieces {
  const int64_t* row_offsets;   // [rows + 1]
  const int64_t* doc;           // [pieces] each
  const int64_t* start;
  const int64_t* length;
  const int64_t* column;
  const int64_t* flat_offsets;  // [pieces + 1]: first flat token of each piece (flat layout only)
  int64_t rows;
  int64_t pieces;  // size of doc, start, length, column
};

struct PackFillOptions {
  int64_t capacity = 0;
  bool flat = false;  // [1, T] pieces back to back, instead of [rows, C]
  int64_t pad_value = 0;
  int64_t label_pad_value = -100;
  int64_t position_start = 0;
};

// Where an output element takes its token from: piece -1 is padding.
struct PackSource {
  int64_t piece;
  int64_t offset;  // token index within the piece
};

// First index i in [lo, hi) with a[i] > x (hi if none); a is non-decreasing on [lo, hi).
MIXTAPE_HD int64_t pack_upper_bound(const int64_t* a, int64_t lo, int64_t hi, int64_t x) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (a[mid] <= x) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Padded layout: the piece covering column j of row r (columns increase within a row).
MIXTAPE_HD PackSource pack_source_padded(const PackPieces& p, int64_t r, int64_t j) {
  const int64_t lo = p.row_offsets[r], hi = p.row_offsets[r + 1];
  const int64_t k = pack_upper_bound(p.column, lo, hi, j) - 1;
  if (k < lo) return PackSource{-1, 0};
  const int64_t off = j - p.column[k];
  return off < p.length[k] ? PackSource{k, off} : PackSource{-1, 0};
}

// Flat layout: the piece holding token t (every flat token is real).
MIXTAPE_HD PackSource pack_source_flat(const PackPieces& p, int64_t t) {
  const int64_t k = pack_upper_bound(p.flat_offsets, 0, p.pieces, t) - 1;
  return PackSource{k, t - p.flat_offsets[k]};
}

// Writes element i of every requested output (null pointers are skipped); shared by the CPU
// per-element path and the CUDA kernel. Returns the index in `values` of the token written here
// when it does not fit Out (an int64 id past int32 in input_ids, or in labels after the piece's
// first token), else -1: the caller reports the first one, never the wrapped value.
template <typename In, typename Out>
MIXTAPE_HD int64_t pack_element(const PackSource& s, int64_t i, const In* values,
                                const int64_t* offsets, const PackPieces& p,
                                const PackFillOptions& o, Out* ids, Out* labels,
                                int64_t* positions, int32_t* seq_idx, bool* loss_mask) {
  const bool real = s.piece >= 0;
  int64_t id = o.pad_value, label = o.label_pad_value, src = -1;
  if (real) {
    src = offsets[p.doc[s.piece]] + p.start[s.piece] + s.offset;
    id = static_cast<int64_t>(values[src]);
    if (s.offset > 0) label = id;
  }
  if (ids) ids[i] = static_cast<Out>(id);
  if (labels) labels[i] = static_cast<Out>(label);
  if (positions) positions[i] = real ? o.position_start + s.offset : 0;
  if (seq_idx) seq_idx[i] = real ? static_cast<int32_t>(s.piece) : -1;
  if (loss_mask) loss_mask[i] = label != o.label_pad_value;
  const bool written = ids != nullptr || (labels != nullptr && s.offset > 0);
  return real && written && !fits<Out>(id) ? src : -1;
}

// Checks the plan against the documents before any write: row_offsets go from 0 to `pieces`
// without decreasing, every piece lies inside its document and its row, pieces of a row do not
// overlap. Throws std::invalid_argument naming the piece and row. Returns the tokens of all
// pieces (T of the flat layout).
int64_t check_pack_pieces(const PackPieces& p, const int64_t* offsets, int64_t num_docs,
                          int64_t capacity);

// CPU, parallel over rows. Outputs are [rows * C] (padded) or [T] (flat, T = sum of lengths),
// any may be null. `elementwise` runs the CUDA kernel's per-element path (for tests). Returns the
// smallest index in `docs.values` of a written token that does not fit Out (see pack_element), or
// -1; pad_value and label_pad_value are the caller's to check.
template <typename In, typename Out>
int64_t pack_fill_cpu(Ragged<In> docs, const PackPieces& plan, const PackFillOptions& opt,
                      Out* ids, Out* labels, int64_t* positions, int32_t* seq_idx,
                      bool* loss_mask, bool elementwise);

// --- rows from pieces (the packing loader's collate) --------------------------------------------

// Row r holds pieces row_offsets[r]:row_offsets[r + 1] back to back from column 0; piece k has
// lengths[k] >= 1 tokens, the next ones of `values` (pieces in order, nothing between them).
struct PackRowsOptions {
  PackFillOptions fill;  // capacity C, pad values, position_start (flat is ignored)
  int64_t tag_pad = -1;  // tags on padding
};

struct PackRowsResult {
  int64_t cu_size = 0;      // entries written to cu_seqlens
  int64_t max_segment = 0;  // the longest cu_seqlens segment
  int64_t negative = -1;    // index in values of the first negative token id, or -1 (no output)
};

// The padded layout of pack_fill for these rows in one pass, outputs [rows * C] (any may be
// null): ids, labels, positions and seq_idx as pack_fill; tags[i] = piece_tag[k] on the tokens
// of piece k, tag_pad on padding; cu_seqlens (2 * pieces + rows + 1 entries of room) the
// boundaries of every piece and every padding run over the flattened rows (row starts, piece
// starts and ends, repeats removed). Throws std::invalid_argument naming the piece or row for
// lengths < 1, row_offsets not 0 .. pieces non-decreasing, lengths not summing to num_values,
// a row over C, or rows * C past int32 with cu_seqlens. A negative token id writes nothing and is
// reported in the result. Single-threaded (a training batch; the loader's workers run in
// parallel).
template <typename In>
PackRowsResult pack_rows_cpu(const In* values, int64_t num_values, const int64_t* lengths,
                             int64_t pieces, const int64_t* row_offsets, int64_t rows,
                             const int64_t* piece_tag, const PackRowsOptions& opt, int64_t* ids,
                             int64_t* labels, int64_t* positions, int32_t* seq_idx, int64_t* tags,
                             int32_t* cu_seqlens);

// CUDA (all pointers on the device, plan checked on the host; flat_offsets required for the
// flat layout). `total` is rows * C or T. Enqueued on `stream`, asynchronous: a written token that
// does not fit Out lowers `*unfit` (atomicMin; the caller sets it to UINT64_MAX first) to its
// index in `docs.values`.
template <typename In, typename Out>
void pack_fill_cuda(Ragged<In> docs, const PackPieces& plan, const PackFillOptions& opt,
                    int64_t total, Out* ids, Out* labels, int64_t* positions, int32_t* seq_idx,
                    bool* loss_mask, unsigned long long* unfit, void* stream);

}  // namespace mixtape
