// pad: ragged batch -> dense [n, L] rows, with attention mask and labels in the same pass.
//
// Contract. Row i holds sequence i truncated to min(L, max_tokens) tokens (from the right or the left end) and
// placed at the left or right end of the row; the rest is pad_value. The mask is 1 exactly over
// the placed tokens: it is computed from the lengths, never by comparing tokens to pad_value, so
// pad == eos leaves real EOS tokens unmasked. Labels are the ids themselves or a second ragged
// input with the same lengths, label_pad_value (-100) on padding; with shift_labels, the label at
// token k is the label of token k + 1 and the last kept token gets label_pad_value.
// Outputs are caller-given buffers (pinned, reused), each of n * L elements, any may be null.
#pragma once

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "common/macros.h"
#include "common/ragged.h"

namespace mixtape {

struct PadOptions {
  int64_t length = 0;       // L: columns of every output row
  int64_t max_tokens = -1;  // tokens kept per row (max_length; the row may be longer when
                            // rounded up to a multiple); -1: L
  bool pad_left = false;
  bool truncate_left = false;
  int64_t pad_value = 0;
  int64_t label_pad_value = -100;
  bool shift_labels = false;
};

// Where row i's kept tokens come from and go to, after truncation.
struct PadRow {
  int64_t src;  // index of the first kept token in `values`
  int64_t len;  // kept tokens, <= L
  int64_t dst;  // column of the first kept token
};

MIXTAPE_HD PadRow pad_row(int64_t begin, int64_t end, const PadOptions& o) {
  const int64_t n = end - begin;
  const int64_t keep = (o.max_tokens >= 0 && o.max_tokens < o.length) ? o.max_tokens : o.length;
  const int64_t len = n < keep ? n : keep;
  return PadRow{o.truncate_left ? end - len : begin, len, o.pad_left ? o.length - len : 0};
}

// Index in `values` of the id placed at column j, or -1 where column j is padding.
MIXTAPE_HD int64_t pad_id_source(const PadRow& r, int64_t j) {
  return (j >= r.dst && j < r.dst + r.len) ? r.src + j - r.dst : -1;
}

// Index into the label source of the label for column j, or -1 where the label is padding.
MIXTAPE_HD int64_t pad_label_source(const PadRow& r, int64_t j, const PadOptions& o) {
  const int64_t k = j - r.dst + (o.shift_labels ? 1 : 0);
  return (j >= r.dst && j < r.dst + r.len && k < r.len) ? r.src + k : -1;
}

// The three outputs of column j of a row, given its geometry; shared by the CPU and CUDA paths.
template <typename In, typename Out>
MIXTAPE_HD void pad_element(const PadRow& r, int64_t j, const In* values, const In* labels,
                            int64_t label_shift, const PadOptions& o, Out* ids, Out* mask,
                            Out* out_labels) {
  const int64_t src = pad_id_source(r, j);
  if (ids) ids[j] = src >= 0 ? static_cast<Out>(values[src]) : static_cast<Out>(o.pad_value);
  if (mask) mask[j] = src >= 0 ? Out(1) : Out(0);
  if (out_labels) {
    const int64_t s = pad_label_source(r, j, o);
    out_labels[j] = s >= 0 ? static_cast<Out>(labels[s + label_shift])
                           : static_cast<Out>(o.label_pad_value);
  }
}

// Elements of each output, n * length; throws std::invalid_argument for a negative length or a
// product past int64 (a wrapped size would let a small buffer pass a size check). Host only; the
// binding and pad_cuda both call it.
inline int64_t pad_output_size(int64_t n, int64_t length) {
  if (length < 0) throw std::invalid_argument("pad: length must be >= 0");
  if (length > 0 && n > std::numeric_limits<int64_t>::max() / length) {
    throw std::invalid_argument("pad: " + std::to_string(n) + " rows of length " +
                                std::to_string(length) + " do not fit one int64 index");
  }
  return n * length;
}

// CPU. `labels` may be null (labels come from the ids) and must otherwise have the same lengths
// as `ids` (its own offsets). Returns the first example whose kept ids include a negative value,
// or -1; throws std::invalid_argument on bad offsets or label lengths.
template <typename In, typename Out>
int64_t pad_cpu(Ragged<In> ids, const In* label_values, const int64_t* label_offsets,
                const PadOptions& opt, Out* out_ids, Out* out_mask, Out* out_labels,
                bool check_negative);

// What the CUDA pad kernel found wrong in its inputs, written to a device array of
// kPadErrorSlots positions (UINT64_MAX: none) followed by the values at those positions, so the
// host can report them without a sync right after the launch (ops.check_cuda_errors).
enum PadErrorSlot : int {
  kPadNegativeId = 0,  // smallest index in `values` of a kept negative id (check_negative)
  kPadUnfitId = 1,     // smallest index in `values` of a value that does not fit Out
  kPadUnfitLabel = 2,  // smallest index in `label_values` of a value that does not fit Out
  kPadErrorSlots = 3,
};

// CUDA (all pointers on the device; offsets and label lengths already checked on the host).
// Enqueued on `stream`, asynchronous. `errors` (2 * kPadErrorSlots entries, may be null) is reset
// and then filled as PadErrorSlot says; the values-fit checks run only when Out narrows In and
// cover every value, as the CPU path's host check does.
template <typename In, typename Out>
void pad_cuda(Ragged<In> ids, int64_t num_values, const In* label_values,
              const int64_t* label_offsets, int64_t num_label_values, const PadOptions& opt,
              Out* out_ids, Out* out_mask, Out* out_labels, bool check_negative,
              unsigned long long* errors, void* stream);

}  // namespace mixtape

namespace mixtape {
// CPU, with `elementwise` choosing the per-element path the CUDA kernel runs (for tests).
template <typename In, typename Out>
int64_t pad_cpu_impl(Ragged<In> ids, const In* label_values, const int64_t* label_offsets,
                     const PadOptions& opt, Out* out_ids, Out* out_mask, Out* out_labels,
                     bool check_negative, bool elementwise);
}  // namespace mixtape
