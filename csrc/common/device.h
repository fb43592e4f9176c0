// What the CUDA runtime (linked statically) can see, and CUDA failures as messages that say what
// to do. cuda_problem is plain C++ (also in CPU-only builds, and testable with made-up versions);
// the rest is defined only in CUDA builds (device_cuda.cu).
#pragma once

#include <string>

namespace mixtape {

// "13.0" from 13000 (CUDART_VERSION / cudaDriverGetVersion encoding).
std::string cuda_version_string(int version);

// A CUDA failure as a message for users: `op`, the error, and for the errors a user can fix, what
// to do. Driver too old for the runtime: both versions, the minimum driver of that CUDA major, how
// to rebuild (a matching toolkit, or MIXTAPE_CUDA=OFF). No kernel image for the GPU: its compute
// capability (`device_cc`, e.g. 89; 0 if unknown), the architectures built (`archs`) and how to
// rebuild for it. `runtime`/`driver` use the CUDART_VERSION encoding (driver 0: none found).
std::string cuda_problem(const std::string& op, const std::string& error_name,
                         const std::string& error_string, int runtime, int driver,
                         const std::string& archs, int device_cc);

#ifdef MIXTAPE_WITH_CUDA
struct CudaStatus {
  int device_count = 0;
  int runtime_version = 0;  // of the runtime linked in (e.g. 13000)
  int driver_version = 0;   // newest CUDA the installed driver supports; 0: no driver
  std::string error_name;   // cudaGetDeviceCount's error ("" when it succeeded)
  std::string message;      // cuda_problem of that error ("" when it succeeded)
};
// Never throws: no driver or no GPU is an answer, so `import mixtape` works everywhere.
CudaStatus cuda_status();
int cuda_device_count();
int cuda_runtime_version();
int cuda_driver_version();
// Throws std::runtime_error(cuda_problem(...)) unless err (a cudaError_t) is cudaSuccess.
void check_cuda(int err, const char* op);
#endif

}  // namespace mixtape
