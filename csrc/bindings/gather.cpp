// gather: rows of ragged data copied to their output places (any numeric dtype, as bytes).
#include "bindings/bindings.h"
#include "gather/gather.h"

namespace mixtape {

void bind_gather(py::module_& m) {
  m.def(
      "gather_rows",
      [](const py::array& values, const Array<int64_t>& starts, const Array<int64_t>& lengths,
         const Array<int64_t>& out_offsets, py::array& out) {
        if (!(values.flags() & py::array::c_style) || values.ndim() != 1) {
          throw py::value_error("gather_rows: values must be a 1-D contiguous array");
        }
        if (!(out.flags() & py::array::c_style) || out.ndim() != 1 || !out.writeable()) {
          throw py::value_error("gather_rows: out must be a 1-D contiguous writeable array");
        }
        if (!values.dtype().is(out.dtype())) {
          throw py::type_error("gather_rows: out has dtype " + py::str(out.dtype()).cast<std::string>() +
                               ", values " + py::str(values.dtype()).cast<std::string>());
        }
        const int64_t n = starts.size();
        if (lengths.size() != n || out_offsets.size() != n) {
          throw py::value_error("gather_rows: starts, lengths and out_offsets must have one entry "
                                "per row, got " + std::to_string(n) + ", " +
                                std::to_string(lengths.size()) + ", " +
                                std::to_string(out_offsets.size()));
        }
        GatherRowsArgs a{values.data(),      values.size(),      values.itemsize(),
                         starts.data(),      lengths.data(),     out_offsets.data(),
                         n,                  out.mutable_data(), out.size()};
        py::gil_scoped_release nogil;
        gather_rows_cpu(a);
      },
      "values"_a, "starts"_a.noconvert(), "lengths"_a.noconvert(), "out_offsets"_a.noconvert(),
      "out"_a);
}

}  // namespace mixtape
