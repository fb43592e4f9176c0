// pack_batch: one packed batch of the loader's planner, from the pieces carried over from the
// previous batch plus newly drawn documents.
//
// Contract. The items are the carried pieces (source, row, start, length), in order, then every
// document cut into pieces of at most C tokens (a document of length L gives ceil(L / C) pieces
// at starts 0, C, 2C, ...; an empty document gives none). The items are packed into rows by
// pack_plan_cpu (the strategy given, overflow = error: every item fits a row). The batch is the
// `batch_size` rows holding the most tokens (ties: the earlier row), in plan order; their pieces,
// row by row, are the output, and the pieces of the other rows, in plan order, are the new carry.
// A piece is (source, row, item start + plan start, plan length): for bfd / ffd / next_fit the
// plan keeps every item whole; `wrapped` may cut an item between rows, and each part stays
// where the plan put it. Deterministic and single-threaded (about a hundred items per batch).
#pragma once

#include <cstdint>
#include <vector>

#include "pack/pack.h"

namespace mixtape {

struct PackBatchOptions {
  int64_t capacity = 0;    // C: tokens per row
  int64_t batch_size = 0;  // rows kept
  PackStrategy strategy = PackStrategy::kBfd;
};

struct PackBatchInput {
  const int64_t* carry;  // [num_carry * 4]: source, row, start, length of each carried piece
  int64_t num_carry;
  const int32_t* doc_source;  // [num_docs] each
  const int64_t* doc_row;
  const int64_t* doc_length;  // tokens (after the loader's overflow policy); 0: no piece
  int64_t num_docs;
};

struct PackBatchResult {
  std::vector<int32_t> source;  // the kept rows' pieces, row by row
  std::vector<int64_t> row, start, length;
  std::vector<int64_t> row_offsets;  // [kept rows + 1]: pieces of each kept row (CSR)
  std::vector<int64_t> carry;        // [carried pieces * 4], as PackBatchInput::carry
  int64_t num_rows = 0;              // rows of the plan (kept: min(batch_size, num_rows))
  int64_t carry_tokens = 0;          // tokens of the carried pieces
};

// Throws std::invalid_argument for bad options, a negative document length, or a carried piece
// that is empty, negative or longer than C (naming its index).
void pack_batch_cpu(const PackBatchInput& in, const PackBatchOptions& opt, PackBatchResult* out);

}  // namespace mixtape
