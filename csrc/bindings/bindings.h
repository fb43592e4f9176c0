// What the binding files share. Only csrc/bindings/ knows Python: host kernels take numpy buffers
// (exact dtype, no silent conversion: noconvert) and write into caller-given outputs; CUDA kernels
// take DeviceArray descriptors as keyword-only arguments and the stream as an integer. Every
// kernel binding releases the GIL (ints_from_lists, which reads Python objects, is the one that
// cannot). One file per op, each defining bind_<op>(module), called from module.cpp.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
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

// A device buffer handed over by Python (a CUDA tensor): address, element count, dtype name
// ("int32", "int64", "bool", as torch prints them without "torch.") and device index. Built in
// one place, ops._device_array, which takes torch tensors apart; the kernel bindings take them as
// keyword-only arguments and check each with device_ptr before a launch, so a swapped or
// mismatched buffer is an error, never a silent out-of-bounds access.
struct DeviceArray {
  uintptr_t ptr = 0;
  int64_t size = 0;
  std::string dtype;
  int device = -1;
};
using OptDeviceArray = std::optional<DeviceArray>;

template <typename T>
constexpr const char* dtype_name() {
  if constexpr (std::is_same_v<T, int32_t>) {
    return "int32";
  } else if constexpr (std::is_same_v<T, int64_t>) {
    return "int64";
  } else if constexpr (std::is_same_v<T, bool>) {
    return "bool";
  } else {
    static_assert(std::is_same_v<T, uint64_t>, "add the dtype's name");
    return "uint64";
  }
}

// The typed address of `a` after checking its dtype, element count (`size`, or any when -1) and
// device; `op` and `what` name the kernel and the argument in the error.
template <typename T>
T* device_ptr(const DeviceArray& a, int64_t size, int device, const char* op, const char* what) {
  const auto fail = [&](const std::string& why) {
    return py::value_error(std::string(op) + ": " + what + " " + why);
  };
  if (a.dtype != dtype_name<T>()) {
    throw fail("must be " + std::string(dtype_name<T>()) + ", got " + a.dtype);
  }
  if (size >= 0 && a.size != size) {
    throw fail("must have " + std::to_string(size) + " elements, got " + std::to_string(a.size));
  }
  if (a.device != device) {
    throw fail("is on cuda:" + std::to_string(a.device) + ", the kernel runs on cuda:" +
               std::to_string(device));
  }
  if (a.ptr == 0 && a.size > 0) throw fail("has a null address");
  return reinterpret_cast<T*>(a.ptr);
}

// An optional argument: null when absent.
template <typename T>
T* device_ptr(const OptDeviceArray& a, int64_t size, int device, const char* op, const char* what) {
  return a ? device_ptr<T>(*a, size, device, op, what) : nullptr;
}

// Calls fn with a value of the integer type named by `dtype` ("int32" or "int64").
template <typename Fn>
inline void dispatch_int_dtype(const std::string& dtype, const char* what, Fn&& fn) {
  if (dtype == "int32") {
    fn(int32_t{});
  } else if (dtype == "int64") {
    fn(int64_t{});
  } else {
    throw py::type_error(std::string(what) + " must be int32 or int64, got " + dtype);
  }
}

void bind_device(py::module_& m);
void bind_pad(py::module_& m);
void bind_pack(py::module_& m);
void bind_pack_batch(py::module_& m);
void bind_mask(py::module_& m);
void bind_lists(py::module_& m);
void bind_gather(py::module_& m);
void bind_pieces(py::module_& m);
void bind_sample(py::module_& m);
void bind_datainf(py::module_& m);
void bind_parallel(py::module_& m);

}  // namespace mixtape
