// pieces: PieceReader, a chunked ragged column (Arrow list column buffers) held once per source,
// from which the packing loader copies its pieces (see pieces/pieces.h).
#include <memory>

#include "bindings/bindings.h"
#include "pieces/pieces.h"

namespace mixtape {
namespace {

class PieceReader {
 public:
  // values[c], offsets[c]: chunk c's values (1-D, contiguous, one dtype for all chunks) and its
  // offsets (int32 or int64, rows + 1 entries); mapping: int64 row -> table row, or None.
  PieceReader(const std::vector<py::array>& values, const std::vector<py::array>& offsets,
              std::optional<Array<int64_t>> mapping)
      : values_(values), offsets_(offsets), mapping_(std::move(mapping)) {
    if (values.empty() || values.size() != offsets.size()) {
      throw py::value_error("PieceReader: one values and one offsets array per chunk (at least "
                            "one), got " + std::to_string(values.size()) + " and " +
                            std::to_string(offsets.size()));
    }
    dtype_ = values[0].dtype();
    starts_.push_back(0);
    for (size_t c = 0; c < values.size(); ++c) {
      const py::array& v = values[c];
      const py::array& o = offsets[c];
      const std::string where = "PieceReader: chunk " + std::to_string(c);
      if (!(v.flags() & py::array::c_style) || v.ndim() != 1 || !v.dtype().is(dtype_)) {
        throw py::value_error(where + ": values must be 1-D, contiguous and of the first "
                              "chunk's dtype");
      }
      if (!(o.flags() & py::array::c_style) || o.ndim() != 1 || o.size() < 1) {
        throw py::value_error(where + ": offsets must be 1-D and contiguous with rows + 1 "
                              "entries");
      }
      RaggedChunk ch{v.data(), v.size(), nullptr, nullptr};
      if (o.dtype().is(py::dtype::of<int32_t>())) {
        ch.offsets32 = static_cast<const int32_t*>(o.data());
      } else if (o.dtype().is(py::dtype::of<int64_t>())) {
        ch.offsets64 = static_cast<const int64_t*>(o.data());
      } else {
        throw py::type_error(where + ": offsets must be int32 or int64, got " +
                             py::str(o.dtype()).cast<std::string>());
      }
      chunks_.push_back(ch);
      starts_.push_back(starts_.back() + o.size() - 1);
    }
    col_ = PieceColumn{chunks_.data(), starts_.data(), static_cast<int64_t>(chunks_.size()),
                       dtype_.itemsize(), nullptr, starts_.back()};
    if (mapping_) {
      if (mapping_->ndim() != 1) throw py::value_error("PieceReader: mapping must be 1-D");
      col_.mapping = mapping_->data();
      col_.num_rows = mapping_->size();
    }
  }

  int64_t gather(const std::optional<Array<int32_t>>& sources, int32_t source,
                 const Array<int64_t>& rows, const Array<int64_t>& starts,
                 const Array<int64_t>& lengths, const Array<int64_t>& out_offsets,
                 py::array& out) const {
    const int64_t n = rows.size();
    if (starts.size() != n || lengths.size() != n || out_offsets.size() < n ||
        (sources && sources->size() != n)) {
      throw py::value_error("PieceReader.gather: rows, starts, lengths (and sources) need one "
                            "entry per piece and out_offsets at least as many, got " +
                            std::to_string(n) + ", " + std::to_string(starts.size()) + ", " +
                            std::to_string(lengths.size()) + ", " +
                            std::to_string(out_offsets.size()));
    }
    if (!(out.flags() & py::array::c_style) || out.ndim() != 1 || !out.writeable()) {
      throw py::value_error("PieceReader.gather: out must be a 1-D contiguous writeable array");
    }
    if (!out.dtype().is(dtype_)) {
      throw py::type_error("PieceReader.gather: out has dtype " +
                           py::str(out.dtype()).cast<std::string>() + ", the column " +
                           py::str(dtype_).cast<std::string>());
    }
    const PieceList p{sources ? sources->data() : nullptr, source, rows.data(), starts.data(),
                      lengths.data(), out_offsets.data(), n};
    void* dst = out.mutable_data();
    const int64_t size = out.size();
    py::gil_scoped_release nogil;
    return gather_pieces_cpu(col_, p, dst, size);
  }

  py::dtype dtype() const { return dtype_; }
  int64_t num_rows() const { return col_.num_rows; }
  int64_t num_chunks() const { return col_.num_chunks; }

 private:
  std::vector<py::array> values_, offsets_;  // keep the buffers alive
  std::optional<Array<int64_t>> mapping_;
  py::dtype dtype_;
  std::vector<RaggedChunk> chunks_;
  std::vector<int64_t> starts_;
  PieceColumn col_{};
};

}  // namespace

void bind_pieces(py::module_& m) {
  py::class_<PieceReader>(m, "PieceReader")
      .def(py::init<const std::vector<py::array>&, const std::vector<py::array>&,
                    std::optional<Array<int64_t>>>(),
           "values"_a, "offsets"_a, "mapping"_a.noconvert() = py::none())
      .def("gather", &PieceReader::gather, "sources"_a.noconvert(), "source"_a,
           "rows"_a.noconvert(), "starts"_a.noconvert(), "lengths"_a.noconvert(),
           "out_offsets"_a.noconvert(), "out"_a)
      .def_property_readonly("dtype", &PieceReader::dtype)
      .def_property_readonly("num_rows", &PieceReader::num_rows)
      .def_property_readonly("num_chunks", &PieceReader::num_chunks);
}

}  // namespace mixtape
