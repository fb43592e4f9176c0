// mask: the block-diagonal causal attention mask of packed rows.
#include "bindings/bindings.h"
#include "mask/mask.h"

namespace mixtape {
namespace {

template <typename T>
void bind_block_causal_mask_typed(py::module_& m) {
  m.def(
      "block_causal_mask",
      [](const Array<T>& seq_idx, py::array& out, uint32_t allowed, uint32_t blocked) {
        if (seq_idx.ndim() != 2) {
          throw py::value_error("block_causal_mask: seq_idx must be [rows, C], got ndim=" +
                                std::to_string(seq_idx.ndim()));
        }
        const int64_t rows = seq_idx.shape(0), C = seq_idx.shape(1);
        if (!(out.flags() & py::array::c_style) || !out.writeable() ||
            out.size() != rows * C * C) {
          throw py::value_error("block_causal_mask: out must be a writeable contiguous array of " +
                                std::to_string(rows * C * C) + " elements, got " +
                                std::to_string(out.size()));
        }
        const int elem_size = static_cast<int>(out.itemsize());
        const T* s = seq_idx.data();
        void* o = out.mutable_data();
        py::gil_scoped_release nogil;
        return block_causal_mask_cpu<T>(s, rows, C, elem_size, allowed, blocked, o);
      },
      "seq_idx"_a.noconvert(), "out"_a, "allowed"_a, "blocked"_a);
}

}  // namespace

void bind_mask(py::module_& m) {
  bind_block_causal_mask_typed<int64_t>(m);
  bind_block_causal_mask_typed<int32_t>(m);
}
}  // namespace mixtape
