// gather_pieces: pieces of documents (row, start, length) read straight from a chunked ragged
// column (an Arrow list column: per record batch, values + offsets) into their places in one
// flat output: the packing loader's read, without first copying whole documents.
//
// Contract. Piece k (only those with sources[k] == source when `sources` is given) copies
// lengths[k] elements of row rows[k], from element starts[k] of that row, to out[out_offsets[k]:].
// A row is first mapped through `mapping` when given (the row order HF's select / shuffle leave),
// then found in the chunk holding it (chunk_starts). Elements are elem_size bytes (any numeric
// dtype). Everything is checked before anything is written: the row (and its mapped row) in range,
// the chunk's offsets inside its values, the piece inside its row, the destination inside out; a
// bad piece throws std::invalid_argument naming it and its row. Destinations must not overlap.
#pragma once

#include <cstdint>

namespace mixtape {

struct RaggedChunk {
  const void* values;
  int64_t num_values;
  const int32_t* offsets32;  // one of the two: [rows + 1], Arrow's list / large_list offsets
  const int64_t* offsets64;
};

struct PieceColumn {
  const RaggedChunk* chunks;
  const int64_t* chunk_starts;  // [num_chunks + 1]: first table row of each chunk, then the total
  int64_t num_chunks;
  int64_t elem_size;
  const int64_t* mapping;  // [num_rows] table row of each row, or null (identity)
  int64_t num_rows;        // rows addressable (mapping size, or the table's rows)
};

struct PieceList {
  const int32_t* sources;  // null: every piece is this column's
  int32_t source;
  const int64_t* rows;
  const int64_t* starts;
  const int64_t* lengths;
  const int64_t* out_offsets;
  int64_t n;
};

// Returns the number of pieces copied.
int64_t gather_pieces_cpu(const PieceColumn& col, const PieceList& p, void* out, int64_t out_size);

}  // namespace mixtape
