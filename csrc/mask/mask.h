// mask: the block-diagonal causal attention mask of packed rows, [rows, C, C], from seq_idx.
//
// Contract. seq_idx[r, j] is the index of the document (piece) holding token j of row r, or a
// negative value on padding; the tokens of one document are contiguous (seq_idx never returns to
// a document it left). Query q may attend key k when both belong to the same document and k <= q;
// a padding query attends only to itself, so no attention row is fully masked (SDPA gives no
// NaN). Each element is written as `allowed` or `blocked`, raw values of `elem_size` bytes (1: bool,
// 2: fp16/bf16, 4: fp32), so one kernel serves the bool mask of SDPA and the additive float mask
// of eager attention (0 and the dtype's lowest value).
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace mixtape {

// First column of the document holding column j, given the first column of column j - 1's.
MIXTAPE_HD int64_t mask_block_start(int64_t prev_start, int64_t j, int64_t cur, int64_t prev) {
  return (j == 0 || cur < 0 || cur != prev) ? j : prev_start;
}

// Whether query q (whose document starts at `start`) may attend key k.
MIXTAPE_HD bool mask_allowed(int64_t start, int64_t q, int64_t k) {
  return k >= start && k <= q;
}

// CPU. Returns the first row whose non-negative seq_idx decrease (documents not contiguous), or
// -1; nothing is written for that row. `out` holds rows * C * C elements of elem_size bytes.
template <typename T>
int64_t block_causal_mask_cpu(const T* seq_idx, int64_t rows, int64_t C, int elem_size,
                              uint32_t allowed, uint32_t blocked, void* out);

}  // namespace mixtape
