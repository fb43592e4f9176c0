// The one translation unit that knows Python. Host kernels take numpy buffers (exact dtype, no
// silent conversion: noconvert) and write into caller-given outputs; CUDA kernels take device
// pointers and a stream as integers. Every binding releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>

#include "build_info.h"
#include "common/device.h"
#include "common/ragged.h"
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

template <typename T>
T* out_ptr(OptArray<T>& a, int64_t size, const char* what) {
  if (!a) return nullptr;
  if (a->size() != size) {
    throw py::value_error(std::string("pad: output '") + what + "' has " +
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
         const std::optional<Array<int64_t>>& label_offsets, int64_t length, bool pad_left,
         bool truncate_left, int64_t pad_value, int64_t label_pad_value, bool shift_labels,
         OptArray<Out> out_ids, OptArray<Out> out_mask, OptArray<Out> out_labels,
         bool check_negative, bool elementwise) {
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
        o.pad_left = pad_left;
        o.truncate_left = truncate_left;
        o.pad_value = pad_value;
        o.label_pad_value = label_pad_value;
        o.shift_labels = shift_labels;
        const int64_t size = ids.n * length;
        return pad_cpu_impl<In, Out>(ids, lv, lo, o, out_ptr(out_ids, size, "input_ids"),
                                     out_ptr(out_mask, size, "attention_mask"),
                                     out_ptr(out_labels, size, "labels"), check_negative,
                                     elementwise);
      },
      "values"_a.noconvert(), "offsets"_a.noconvert(), "label_values"_a.noconvert() = py::none(),
      "label_offsets"_a.noconvert() = py::none(), py::kw_only(), "length"_a, "pad_left"_a = false,
      "truncate_left"_a = false, "pad_value"_a = 0, "label_pad_value"_a = -100,
      "shift_labels"_a = false, "out_ids"_a.noconvert() = py::none(),
      "out_mask"_a.noconvert() = py::none(), "out_labels"_a.noconvert() = py::none(),
      "check_negative"_a = true, "elementwise"_a = false, gil_release());
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

}  // namespace
}  // namespace mixtape

PYBIND11_MODULE(_C, m) {
  using namespace mixtape;
  m.doc() = "mixtape's compiled kernels (private: use mixtape.ops)";
  bind_pad<int64_t, int64_t>(m);
  bind_pad<int32_t, int64_t>(m);
  bind_pad<int32_t, int32_t>(m);
  bind_pad<int64_t, int32_t>(m);
  m.def("build_info", &build_info);
#ifdef MIXTAPE_WITH_CUDA
  m.attr("cuda_compiled") = true;
  m.def("cuda_device_count", &cuda_device_count, gil_release());
  m.def(
      "pad_cuda",
      [](uintptr_t values, uintptr_t offsets, int64_t n, uintptr_t label_values,
         uintptr_t label_offsets, int in_bits, int out_bits, int64_t length, bool pad_left,
         bool truncate_left, int64_t pad_value, int64_t label_pad_value, bool shift_labels,
         uintptr_t out_ids, uintptr_t out_mask, uintptr_t out_labels, uintptr_t stream) {
        PadOptions o{length, pad_left, truncate_left, pad_value, label_pad_value, shift_labels};
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
      "out_bits"_a, "length"_a, "pad_left"_a, "truncate_left"_a, "pad_value"_a,
      "label_pad_value"_a, "shift_labels"_a, "out_ids"_a, "out_mask"_a, "out_labels"_a,
      "stream"_a, gil_release());
#else
  m.attr("cuda_compiled") = false;
  m.def("cuda_device_count", [] { return 0; });
#endif
}
