// The one translation unit that knows Python. Host kernels take numpy buffers (exact dtype, no
// silent conversion: noconvert) and write into caller-given outputs; CUDA kernels take device
// pointers and a stream as integers. Every kernel binding releases the GIL (ints_from_lists,
// which reads Python objects, is the one that cannot).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "build_info.h"
#include "common/device.h"
#include "common/ragged.h"
#include "mask/mask.h"
#include "pack/pack.h"
#include "pad/pad.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace mixtape {
namespace {

template <typename T>
using Array = py::array_t<T, py::array::c_style>;
template <typename T>
using OptArray = std::optional<Array<T>>;
using gil_release = py::call_guard<py::gil_scoped_release>;

template <typename T>
Ragged<T> ragged(const Array<T>& values, const Array<int64_t>& offsets, const char* what) {
  if (values.ndim() != 1 || offsets.ndim() != 1 || offsets.size() < 1) {
    throw py::value_error(std::string(what) + ": expected 1-D values and 1-D offsets with n + 1 " +
                          "entries, got values.ndim=" + std::to_string(values.ndim()) +
                          ", offsets.shape=(" + std::to_string(offsets.size()) + ",)");
  }
  const int64_t n = offsets.size() - 1;
  check_offsets(offsets.data(), n, values.size(), what);
  return Ragged<T>{values.data(), offsets.data(), n};
}

// The data of an optional caller-given output, checked to hold `size` elements.
template <typename T>
T* out_ptr(OptArray<T>& a, int64_t size, const char* op, const char* what) {
  if (!a) return nullptr;
  if (a->size() != size) {
    throw py::value_error(std::string(op) + ": output '" + what + "' has " +
                          std::to_string(a->size()) + " elements, expected " +
                          std::to_string(size));
  }
  return a->mutable_data();
}

template <typename In, typename Out>
void bind_pad(py::module_& m) {
  m.def(
      "pad",
      [](const Array<In>& values, const Array<int64_t>& offsets, const OptArray<In>& label_values,
         const std::optional<Array<int64_t>>& label_offsets, int64_t length, int64_t max_tokens,
         bool pad_left, bool truncate_left, int64_t pad_value, int64_t label_pad_value, bool shift_labels,
         OptArray<Out>& out_ids, OptArray<Out>& out_mask, OptArray<Out>& out_labels,
         bool check_negative, bool elementwise) {
        // Python objects only by reference: the call_guard releases the GIL around this whole
        // call, so a by-value py::array parameter would be Py_DECREF'd without the GIL.
        const Ragged<In> ids = ragged(values, offsets, "input_ids");
        const In* lv = nullptr;
        const int64_t* lo = nullptr;
        if (label_values) {
          if (!label_offsets) throw py::value_error("pad: label_values needs label_offsets");
          const Ragged<In> lab = ragged(*label_values, *label_offsets, "labels");
          if (lab.n != ids.n) {
            throw py::value_error("pad: " + std::to_string(lab.n) + " label rows for " +
                                  std::to_string(ids.n) + " input_ids rows");
          }
          lv = lab.values;
          lo = lab.offsets;
        }
        PadOptions o;
        o.length = length;
        o.max_tokens = max_tokens;
        o.pad_left = pad_left;
        o.truncate_left = truncate_left;
        o.pad_value = pad_value;
        o.label_pad_value = label_pad_value;
        o.shift_labels = shift_labels;
        const int64_t size = pad_output_size(ids.n, length);
        return pad_cpu_impl<In, Out>(ids, lv, lo, o, out_ptr(out_ids, size, "pad", "input_ids"),
                                     out_ptr(out_mask, size, "pad", "attention_mask"),
                                     out_ptr(out_labels, size, "pad", "labels"), check_negative,
                                     elementwise);
      },
      "values"_a.noconvert(), "offsets"_a.noconvert(), "label_values"_a.noconvert() = py::none(),
      "label_offsets"_a.noconvert() = py::none(), py::kw_only(), "length"_a, "max_tokens"_a = -1,
      "pad_left"_a = false,
      "truncate_left"_a = false, "pad_value"_a = 0, "label_pad_value"_a = -100,
      "shift_labels"_a = false, "out_ids"_a.noconvert() = py::none(),
      "out_mask"_a.noconvert() = py::none(), "out_labels"_a.noconvert() = py::none(),
      "check_negative"_a = true, "elementwise"_a = false, gil_release());
}

// A vector handed to numpy without a copy; the capsule owns it.
py::array_t<int64_t> to_numpy(std::vector<int64_t>&& v) {
  auto* heap = new std::vector<int64_t>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<int64_t>*>(p); });
  return py::array_t<int64_t>(static_cast<py::ssize_t>(heap->size()), heap->data(), owner);
}

template <typename T>
void bind_pack_plan(py::module_& m) {
  m.def(
      "pack_plan",
      [](const Array<T>& lengths, int64_t capacity, const std::string& strategy,
         const std::string& overflow, int64_t max_docs_per_row, int64_t align,
         int64_t rows_multiple_of, std::optional<uint64_t> shuffle_seed) {
        if (lengths.ndim() != 1) {
          throw py::value_error("pack_plan: lengths must be 1-D, got ndim=" +
                                std::to_string(lengths.ndim()));
        }
        PackPlanOptions o;
        o.capacity = capacity;
        o.strategy = parse_pack_strategy(strategy);
        o.overflow = parse_pack_overflow(overflow);
        o.max_docs_per_row = max_docs_per_row;
        o.align = align;
        o.rows_multiple_of = rows_multiple_of;
        o.shuffle = shuffle_seed.has_value();
        o.shuffle_seed = shuffle_seed.value_or(0);
        PackPlanResult r;
        {
          py::gil_scoped_release nogil;
          pack_plan_cpu(lengths.data(), static_cast<int64_t>(lengths.size()), o, &r);
        }
        py::dict d;
        d["row_offsets"] = to_numpy(std::move(r.row_offsets));
        d["doc"] = to_numpy(std::move(r.doc));
        d["start"] = to_numpy(std::move(r.start));
        d["length"] = to_numpy(std::move(r.length));
        d["column"] = to_numpy(std::move(r.column));
        d["num_tokens"] = r.num_tokens;
        d["truncated_tokens"] = r.truncated_tokens;
        d["dropped_docs"] = r.dropped_docs;
        d["dropped_tokens"] = r.dropped_tokens;
        d["split_docs"] = r.split_docs;
        return d;
      },
      "lengths"_a.noconvert(), py::kw_only(), "capacity"_a, "strategy"_a = "bfd",
      "overflow"_a = "split", "max_docs_per_row"_a = 0, "align"_a = 1, "rows_multiple_of"_a = 1,
      "shuffle_seed"_a = py::none());
}

// The plan arrays as PackPieces (after checking their sizes agree).
PackPieces pack_pieces(const Array<int64_t>& row_offsets, const Array<int64_t>& doc,
                       const Array<int64_t>& start, const Array<int64_t>& length,
                       const Array<int64_t>& column) {
  const int64_t pieces = doc.size();
  if (row_offsets.ndim() != 1 || row_offsets.size() < 1 || start.size() != pieces ||
      length.size() != pieces || column.size() != pieces) {
    throw py::value_error("pack plan: row_offsets must have rows + 1 >= 1 entries and doc, "
                          "start, length, column the same size, got sizes " +
                          std::to_string(row_offsets.size()) + ", " + std::to_string(pieces) +
                          ", " + std::to_string(start.size()) + ", " +
                          std::to_string(length.size()) + ", " + std::to_string(column.size()));
  }
  return PackPieces{row_offsets.data(), doc.data(),    start.data(),          length.data(),
                    column.data(),      nullptr,       row_offsets.size() - 1, pieces};
}

template <typename In, typename Out>
void bind_pack_fill(py::module_& m) {
  m.def(
      "pack_fill",
      [](const Array<In>& values, const Array<int64_t>& offsets, const Array<int64_t>& row_offsets,
         const Array<int64_t>& doc, const Array<int64_t>& start, const Array<int64_t>& length,
         const Array<int64_t>& column, int64_t capacity, bool flat, int64_t pad_value,
         int64_t label_pad_value, int64_t position_start, OptArray<Out> out_ids,
         OptArray<Out> out_labels, OptArray<int64_t> out_positions, OptArray<int32_t> out_seq_idx,
         OptArray<bool> out_loss_mask, bool elementwise) {
        const Ragged<In> docs = ragged(values, offsets, "pack_fill values");
        const PackPieces p = pack_pieces(row_offsets, doc, start, length, column);
        PackFillOptions o;
        o.capacity = capacity;
        o.flat = flat;
        o.pad_value = pad_value;
        o.label_pad_value = label_pad_value;
        o.position_start = position_start;
        int64_t tokens;
        {
          py::gil_scoped_release nogil;
          tokens = check_pack_pieces(p, docs.offsets, docs.n, capacity);
        }
        const int64_t size = flat ? tokens : p.rows * capacity;
        auto ptr = [size](auto& a, const char* what) { return out_ptr(a, size, "pack_fill", what); };
        Out* ids = ptr(out_ids, "input_ids");
        Out* labels = ptr(out_labels, "labels");
        int64_t* positions = ptr(out_positions, "position_ids");
        int32_t* seq_idx = ptr(out_seq_idx, "seq_idx");
        bool* loss_mask = ptr(out_loss_mask, "loss_mask");
        py::gil_scoped_release nogil;
        pack_fill_cpu<In, Out>(docs, p, o, ids, labels, positions, seq_idx, loss_mask,
                               elementwise);
        return tokens;
      },
      "values"_a.noconvert(), "offsets"_a.noconvert(), "row_offsets"_a.noconvert(),
      "doc"_a.noconvert(), "start"_a.noconvert(), "length"_a.noconvert(),
      "column"_a.noconvert(), py::kw_only(), "capacity"_a, "flat"_a = false, "pad_value"_a = 0,
      "label_pad_value"_a = -100, "position_start"_a = 0, "out_ids"_a.noconvert() = py::none(),
      "out_labels"_a.noconvert() = py::none(), "out_positions"_a.noconvert() = py::none(),
      "out_seq_idx"_a.noconvert() = py::none(), "out_loss_mask"_a.noconvert() = py::none(),
      "elementwise"_a = false);
}

// Calls fn with a value of the integer type that `bits` names (int32 or int64).
template <typename Fn>
void dispatch_int_bits(int bits, const char* what, Fn&& fn) {
  if (bits == 32) {
    fn(int32_t{});
  } else if (bits == 64) {
    fn(int64_t{});
  } else {
    throw py::type_error(std::string(what) + " must be 32 or 64, got " + std::to_string(bits));
  }
}

py::dict build_info() {
  py::dict d;
  d["compiler"] = MIXTAPE_CXX_COMPILER;
  d["cxx_flags"] = MIXTAPE_CXX_FLAGS;
  d["build_type"] = MIXTAPE_BUILD_TYPE;
#ifdef MIXTAPE_WITH_CUDA
  d["cuda_compiled"] = true;
  d["cuda_compiler"] = MIXTAPE_CUDA_COMPILER;
  d["cuda_architectures"] = MIXTAPE_CUDA_ARCHS;
  d["cuda_runtime_version"] = cuda_runtime_version();
#else
  d["cuda_compiled"] = false;
#endif
  return d;
}

template <typename T>
void bind_block_causal_mask(py::module_& m) {
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

// Python lists of Python ints -> ragged int64 (values, offsets): the boundary where users hand us
// tokenizer output. It reads Python objects, so it holds the GIL (the one binding that does); a
// direct loop over the list items is ~4x faster than array.array.fromlist per row.
py::tuple ints_from_lists(const py::list& rows, const std::string& name, int64_t first) {
  const Py_ssize_t n = PyList_GET_SIZE(rows.ptr());
  Array<int64_t> offsets(n + 1);
  int64_t* off = offsets.mutable_data();
  off[0] = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* row = PyList_GET_ITEM(rows.ptr(), i);
    if (!PyList_Check(row)) {
      throw py::type_error(name + ": example " + std::to_string(first + i) + " must be a list, got " +
                           Py_TYPE(row)->tp_name);
    }
    off[i + 1] = off[i] + PyList_GET_SIZE(row);
  }
  Array<int64_t> values(off[n]);
  int64_t* out = values.mutable_data();
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* row = PyList_GET_ITEM(rows.ptr(), i);
    const Py_ssize_t len = off[i + 1] - off[i];
    for (Py_ssize_t j = 0; j < len; ++j) {
      // __index__ of a non-int item is Python code that could resize the list: re-check.
      if (PyList_GET_SIZE(row) != len) {
        throw py::value_error(name + ": example " + std::to_string(first + i) +
                              " changed size while it was read");
      }
      PyObject* item = PyList_GET_ITEM(row, j);
      int overflow = 0;
      long long v;
      if (PyLong_Check(item)) {
        v = PyLong_AsLongLongAndOverflow(item, &overflow);
      } else {
        py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(item));
        if (!index) {
          PyErr_Clear();
          throw py::type_error(name + ": example " + std::to_string(first + i) +
                               " has a non-integer token id at position " + std::to_string(j) +
                               ": " + py::repr(py::handle(item)).cast<std::string>() + " (" +
                               Py_TYPE(item)->tp_name + ")");
        }
        v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
      }
      if (overflow != 0) {
        throw py::value_error(name + ": example " + std::to_string(first + i) +
                              " has a token id out of the int64 range at position " +
                              std::to_string(j) + ": " +
                              py::str(py::handle(item)).cast<std::string>());
      }
      out[off[i] + j] = v;
    }
  }
  return py::make_tuple(std::move(values), std::move(offsets));
}

}  // namespace
}  // namespace mixtape

PYBIND11_MODULE(_C, m) {
  using namespace mixtape;
  m.doc() = "mixtape's compiled kernels (private: use mixtape.ops)";
  bind_pad<int64_t, int64_t>(m);
  bind_pad<int32_t, int64_t>(m);
  bind_pad<int32_t, int32_t>(m);
  bind_pad<int64_t, int32_t>(m);
  bind_pack_plan<int64_t>(m);
  bind_pack_plan<int32_t>(m);
  m.def(
      "pack_check",
      [](const Array<int64_t>& offsets, const Array<int64_t>& row_offsets,
         const Array<int64_t>& doc, const Array<int64_t>& start, const Array<int64_t>& length,
         const Array<int64_t>& column, int64_t capacity) {
        if (offsets.ndim() != 1 || offsets.size() < 1) {
          throw py::value_error("pack_check: offsets must be 1-D with num_docs + 1 entries");
        }
        const PackPieces p = pack_pieces(row_offsets, doc, start, length, column);
        py::gil_scoped_release nogil;
        return check_pack_pieces(p, offsets.data(), offsets.size() - 1, capacity);
      },
      "offsets"_a.noconvert(), "row_offsets"_a.noconvert(), "doc"_a.noconvert(),
      "start"_a.noconvert(), "length"_a.noconvert(), "column"_a.noconvert(), py::kw_only(),
      "capacity"_a);
  bind_pack_fill<int64_t, int64_t>(m);
  bind_pack_fill<int32_t, int64_t>(m);
  bind_pack_fill<int32_t, int32_t>(m);
  bind_pack_fill<int64_t, int32_t>(m);
  bind_block_causal_mask<int64_t>(m);
  bind_block_causal_mask<int32_t>(m);
  m.def("ints_from_lists", &ints_from_lists, "rows"_a, "name"_a = "input_ids", "first"_a = 0);
  m.def("build_info", &build_info);
#ifdef MIXTAPE_WITH_CUDA
  m.attr("cuda_compiled") = true;
  m.def("cuda_device_count", &cuda_device_count, gil_release());
  m.def(
      "pad_cuda",
      [](uintptr_t values, uintptr_t offsets, int64_t n, uintptr_t label_values,
         uintptr_t label_offsets, int in_bits, int out_bits, int64_t length, int64_t max_tokens,
         bool pad_left, bool truncate_left, int64_t pad_value, int64_t label_pad_value, bool shift_labels,
         uintptr_t out_ids, uintptr_t out_mask, uintptr_t out_labels, uintptr_t stream) {
        PadOptions o{length,    max_tokens,      pad_left,    truncate_left,
                     pad_value, label_pad_value, shift_labels};
        dispatch_int_bits(in_bits, "in_bits", [&](auto in) {
          dispatch_int_bits(out_bits, "out_bits", [&](auto out) {
            using In = decltype(in);
            using Out = decltype(out);
            pad_cuda<In, Out>(
                Ragged<In>{reinterpret_cast<const In*>(values),
                           reinterpret_cast<const int64_t*>(offsets), n},
                reinterpret_cast<const In*>(label_values),
                reinterpret_cast<const int64_t*>(label_offsets), o,
                reinterpret_cast<Out*>(out_ids), reinterpret_cast<Out*>(out_mask),
                reinterpret_cast<Out*>(out_labels), reinterpret_cast<void*>(stream));
          });
        });
      },
      "values"_a, "offsets"_a, "n"_a, "label_values"_a, "label_offsets"_a, "in_bits"_a,
      "out_bits"_a, "length"_a, "max_tokens"_a, "pad_left"_a, "truncate_left"_a, "pad_value"_a,
      "label_pad_value"_a, "shift_labels"_a, "out_ids"_a, "out_mask"_a, "out_labels"_a,
      "stream"_a, gil_release());
  m.def(
      "pack_fill_cuda",
      [](uintptr_t values, uintptr_t offsets, int64_t num_docs, uintptr_t row_offsets,
         uintptr_t doc, uintptr_t start, uintptr_t length, uintptr_t column,
         uintptr_t flat_offsets, int64_t rows, int64_t pieces, int64_t total, int in_bits,
         int out_bits, int64_t capacity, bool flat, int64_t pad_value, int64_t label_pad_value,
         int64_t position_start, uintptr_t out_ids, uintptr_t out_labels, uintptr_t out_positions,
         uintptr_t out_seq_idx, uintptr_t out_loss_mask, uintptr_t stream) {
        const auto i64 = [](uintptr_t a) { return reinterpret_cast<const int64_t*>(a); };
        const PackPieces p{i64(row_offsets), i64(doc), i64(start), i64(length), i64(column),
                           i64(flat_offsets), rows, pieces};
        PackFillOptions o;
        o.capacity = capacity;
        o.flat = flat;
        o.pad_value = pad_value;
        o.label_pad_value = label_pad_value;
        o.position_start = position_start;
        dispatch_int_bits(in_bits, "in_bits", [&](auto in) {
          dispatch_int_bits(out_bits, "out_bits", [&](auto out) {
            using In = decltype(in);
            using Out = decltype(out);
            pack_fill_cuda<In, Out>(
                Ragged<In>{reinterpret_cast<const In*>(values), i64(offsets), num_docs}, p, o,
                total, reinterpret_cast<Out*>(out_ids), reinterpret_cast<Out*>(out_labels),
                reinterpret_cast<int64_t*>(out_positions), reinterpret_cast<int32_t*>(out_seq_idx),
                reinterpret_cast<bool*>(out_loss_mask), reinterpret_cast<void*>(stream));
          });
        });
      },
      "values"_a, "offsets"_a, "num_docs"_a, "row_offsets"_a, "doc"_a, "start"_a, "length"_a,
      "column"_a, "flat_offsets"_a, "rows"_a, "pieces"_a, "total"_a, "in_bits"_a, "out_bits"_a,
      "capacity"_a, "flat"_a, "pad_value"_a, "label_pad_value"_a, "position_start"_a,
      "out_ids"_a, "out_labels"_a, "out_positions"_a, "out_seq_idx"_a, "out_loss_mask"_a,
      "stream"_a, gil_release());
#else
  m.attr("cuda_compiled") = false;
  m.def("cuda_device_count", [] { return 0; });
#endif
}
