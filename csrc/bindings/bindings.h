// What the binding files share. Only csrc/bindings/ knows Python: host kernels take numpy buffers
// (exact dtype, no silent conversion: noconvert) and write into caller-given outputs; CUDA kernels
// take device pointers and a stream as integers. Every kernel binding releases the GIL
// (ints_from_lists, which reads Python objects, is the one that cannot). One file per op, each
// defining bind_<op>(module), called from module.cpp.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/ragged.h"

namespace mixtape {

namespace py = pybind11;
using namespace pybind11::literals;

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

// A vector handed to numpy without a copy; the capsule owns it.
inline py::array_t<int64_t> to_numpy(std::vector<int64_t>&& v) {
  auto* heap = new std::vector<int64_t>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<int64_t>*>(p); });
  return py::array_t<int64_t>(static_cast<py::ssize_t>(heap->size()), heap->data(), owner);
}

// Calls fn with a value of the integer type that `bits` names (int32 or int64).
template <typename Fn>
inline void dispatch_int_bits(int bits, const char* what, Fn&& fn) {
  if (bits == 32) {
    fn(int32_t{});
  } else if (bits == 64) {
    fn(int64_t{});
  } else {
    throw py::type_error(std::string(what) + " must be 32 or 64, got " + std::to_string(bits));
  }
}

void bind_pad(py::module_& m);
void bind_pack(py::module_& m);
void bind_mask(py::module_& m);
void bind_lists(py::module_& m);
void bind_parallel(py::module_& m);

}  // namespace mixtape
