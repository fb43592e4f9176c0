#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "build_info.h"
#include "common/device.h"

namespace mixtape {
namespace {

std::string problem(const char* op, cudaError_t err) {
  int cc = 0, dev = 0;
  if (cudaGetDevice(&dev) == cudaSuccess) {
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess) {
      cc = major * 10 + minor;
    }
  }
  return cuda_problem(op, cudaGetErrorName(err), cudaGetErrorString(err), cuda_runtime_version(),
                      cuda_driver_version(), MIXTAPE_CUDA_ARCHS, cc);
}

}  // namespace

CudaStatus cuda_status() {
  CudaStatus s;
  s.runtime_version = cuda_runtime_version();
  s.driver_version = cuda_driver_version();
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it
    s.error_name = cudaGetErrorName(err);
    s.message = problem("mixtape CUDA kernels", err);
    n = 0;
  }
  s.device_count = n;
  return s;
}

int cuda_device_count() { return cuda_status().device_count; }

int cuda_runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) v = CUDART_VERSION;
  return v;
}

int cuda_driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) v = 0;  // 0: no driver
  return v;
}

void check_cuda(int err, const char* op) {
  if (err == cudaSuccess) return;
  cudaGetLastError();
  throw std::runtime_error(problem(op, static_cast<cudaError_t>(err)));
}

}  // namespace mixtape
