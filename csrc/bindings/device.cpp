// device: the DeviceArray descriptor CUDA kernels take, and what the CUDA runtime can see.
#include "bindings/bindings.h"
#include "common/device.h"

namespace mixtape {

void bind_device(py::module_& m) {
  py::class_<DeviceArray>(m, "DeviceArray")
      .def(py::init([](uintptr_t ptr, int64_t size, std::string dtype, int device) {
             if (size < 0) throw py::value_error("DeviceArray: size must be >= 0");
             return DeviceArray{ptr, size, std::move(dtype), device};
           }),
           py::kw_only(), "ptr"_a, "size"_a, "dtype"_a, "device"_a)
      .def_readonly("ptr", &DeviceArray::ptr)
      .def_readonly("size", &DeviceArray::size)
      .def_readonly("dtype", &DeviceArray::dtype)
      .def_readonly("device", &DeviceArray::device)
      .def("__repr__", [](const DeviceArray& a) {
        return "DeviceArray(ptr=" + std::to_string(a.ptr) + ", size=" + std::to_string(a.size) +
               ", dtype='" + a.dtype + "', device=" + std::to_string(a.device) + ")";
      });
  m.def("_cuda_problem", &cuda_problem, py::kw_only(), "op"_a, "error_name"_a, "error_string"_a,
        "runtime"_a, "driver"_a, "archs"_a, "device_cc"_a);
#ifdef MIXTAPE_WITH_CUDA
  m.def("cuda_status", [] {
    CudaStatus s;
    {
      py::gil_scoped_release nogil;
      s = cuda_status();
    }
    py::dict d;
    d["device_count"] = s.device_count;
    d["runtime_version"] = s.runtime_version;
    d["driver_version"] = s.driver_version;
    d["error"] = s.error_name.empty() ? py::none() : py::cast(s.error_name);
    d["message"] = s.message.empty() ? py::none() : py::cast(s.message);
    return d;
  });
#endif
}

}  // namespace mixtape
