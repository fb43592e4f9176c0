#include <cuda_runtime.h>

#include "common/device.h"

namespace mixtape {

int cuda_device_count() {
  int n = 0;
  // No driver or no GPU is an answer (0), not an error: import must work everywhere.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

int cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

}  // namespace mixtape
