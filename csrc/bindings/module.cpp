// The module mixtape._C: each op's bindings live in csrc/bindings/<op>.cpp.
#include "bindings/bindings.h"
#include "build_info.h"
#include "common/device.h"

namespace mixtape {
namespace {

py::dict build_info() {
  py::dict d;
  d["compiler"] = MIXTAPE_CXX_COMPILER;
  d["cxx_flags"] = MIXTAPE_CXX_FLAGS;
  d["build_type"] = MIXTAPE_BUILD_TYPE;
  d["sanitizers"] = MIXTAPE_SANITIZERS;
#ifdef MIXTAPE_WITH_CUDA
  d["cuda_compiled"] = true;
  d["cuda_compiler"] = MIXTAPE_CUDA_COMPILER;
  d["cuda_architectures"] = MIXTAPE_CUDA_ARCHS;
  d["cuda_runtime_version"] = cuda_runtime_version();
  d["cuda_driver_version"] = cuda_driver_version();
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
  bind_device(m);
  bind_pad(m);
  bind_pack(m);
  bind_pack_batch(m);
  bind_mask(m);
  bind_lists(m);
  bind_gather(m);
  bind_pieces(m);
  bind_sample(m);
  bind_datainf(m);
  bind_parallel(m);
  m.def("build_info", &build_info);
#ifdef MIXTAPE_WITH_CUDA
  m.attr("cuda_compiled") = true;
  m.def("cuda_device_count", &cuda_device_count, gil_release());
#else
  m.attr("cuda_compiled") = false;
  m.def("cuda_device_count", [] { return 0; });
  m.def("cuda_status", [] {
    py::dict d;
    d["device_count"] = 0;
    d["runtime_version"] = 0;
    d["driver_version"] = 0;
    d["error"] = py::none();
    d["message"] = py::none();
    return d;
  });
#endif
}
