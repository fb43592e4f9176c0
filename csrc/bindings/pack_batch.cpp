// pack_batch: the loader planner's per-batch step (split, pack, keep the fullest rows, carry).
#include "bindings/bindings.h"
#include "pack_batch/pack_batch.h"

namespace mixtape {
namespace {

// A vector handed to numpy without a copy (shape: {size} or {size / cols, cols}).
template <typename T>
py::array_t<T> vector_array(std::vector<T>&& v, py::ssize_t cols = 0) {
  auto* heap = new std::vector<T>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  const auto size = static_cast<py::ssize_t>(heap->size());
  if (cols > 0) {
    return py::array_t<T>({size / cols, cols}, heap->data(), owner);
  }
  return py::array_t<T>(size, heap->data(), owner);
}

}  // namespace

void bind_pack_batch(py::module_& m) {
  m.def(
      "pack_batch",
      [](const Array<int64_t>& carry, const Array<int32_t>& doc_source,
         const Array<int64_t>& doc_row, const Array<int64_t>& doc_length, int64_t capacity,
         int64_t batch_size, const std::string& strategy) {
        if (carry.ndim() != 2 || carry.shape(1) != 4) {
          throw py::value_error("pack_batch: carry must have shape (n, 4), got ndim=" +
                                std::to_string(carry.ndim()));
        }
        const int64_t d = doc_source.size();
        if (doc_source.ndim() != 1 || doc_row.ndim() != 1 || doc_length.ndim() != 1 ||
            doc_row.size() != d || doc_length.size() != d) {
          throw py::value_error("pack_batch: doc_source, doc_row and doc_length must be 1-D of "
                                "one size, got sizes " + std::to_string(d) + ", " +
                                std::to_string(doc_row.size()) + ", " +
                                std::to_string(doc_length.size()));
        }
        PackBatchOptions o;
        o.capacity = capacity;
        o.batch_size = batch_size;
        o.strategy = parse_pack_strategy(strategy);
        const PackBatchInput in{carry.data(), carry.shape(0), doc_source.data(),
                                doc_row.data(), doc_length.data(), d};
        PackBatchResult r;
        {
          py::gil_scoped_release nogil;
          pack_batch_cpu(in, o, &r);
        }
        return py::make_tuple(vector_array(std::move(r.source)), vector_array(std::move(r.row)),
                              vector_array(std::move(r.start)),
                              vector_array(std::move(r.length)),
                              vector_array(std::move(r.row_offsets)),
                              vector_array(std::move(r.carry), 4), r.num_rows,
                              r.carry_tokens);
      },
      "carry"_a.noconvert(), "doc_source"_a.noconvert(), "doc_row"_a.noconvert(),
      "doc_length"_a.noconvert(), py::kw_only(), "capacity"_a, "batch_size"_a,
      "strategy"_a = "bfd");
}

}  // namespace mixtape
