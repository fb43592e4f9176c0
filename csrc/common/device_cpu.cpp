#include <string>

#include "common/device.h"

namespace mixtape {
namespace {

// The oldest driver branch that runs a CUDA major's runtime (NVIDIA's minor version
// compatibility: 11.x >= 450, 12.x >= 525, 13.x >= 580); 0 when not known.
int min_driver_branch(int runtime) {
  switch (runtime / 1000) {
    case 11: return 450;
    case 12: return 525;
    case 13: return 580;
    default: return 0;
  }
}

}  // namespace

std::string cuda_version_string(int version) {
  return std::to_string(version / 1000) + "." + std::to_string((version % 1000) / 10);
}

std::string cuda_problem(const std::string& op, const std::string& error_name,
                         const std::string& error_string, int runtime, int driver,
                         const std::string& archs, int device_cc) {
  const std::string what = op + ": " + error_name + " (" + error_string + ")";
  const std::string rebuild =
      "rebuild mixtape for this machine: with the nvcc of a CUDA toolkit this driver supports on "
      "PATH (`pip install --no-build-isolation --force-reinstall --no-deps .`), or without CUDA "
      "kernels (`MIXTAPE_CUDA=OFF pip install ...`) and CPU tensors";
  const std::string rt = cuda_version_string(runtime);
  if (error_name == "cudaErrorInsufficientDriver" || error_name == "cudaErrorCallRequiresNewerDriver" ||
      error_name == "cudaErrorSystemDriverMismatch" || error_name == "cudaErrorUnsupportedPtxVersion" ||
      (driver > 0 && driver / 1000 < runtime / 1000 && error_name != "cudaErrorNoDevice")) {
    const int branch = min_driver_branch(runtime);
    return what + ": mixtape was built with the CUDA " + rt + " runtime, but " +
           (driver > 0 ? "the NVIDIA driver supports CUDA " + cuda_version_string(driver) +
                             " at most"
                       : std::string("no NVIDIA driver was found")) +
           " (cudaDriverGetVersion = " + std::to_string(driver) + "); CUDA " +
           std::to_string(runtime / 1000) + ".x needs " +
           (branch > 0 ? "driver " + std::to_string(branch) + " or newer" : "a newer driver") +
           ". Update the driver, or " + rebuild + ".";
  }
  if (error_name == "cudaErrorNoKernelImageForDevice" || error_name == "cudaErrorInvalidKernelImage" ||
      error_name == "cudaErrorInvalidPtx" || error_name == "cudaErrorJitCompilerNotFound") {
    const std::string cc = device_cc > 0 ? std::to_string(device_cc) : "<cc>";
    return what + ": no kernel of this build runs on this GPU (compute capability " +
           (device_cc > 0 ? std::to_string(device_cc / 10) + "." + std::to_string(device_cc % 10)
                          : std::string("unknown")) +
           "; built for CUDA architectures " + archs + ", CUDA " + rt +
           "). Rebuild for it: `pip install --no-build-isolation --force-reinstall --no-deps . "
           "-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=" + cc + "-real`.";
  }
  if (error_name == "cudaErrorNoDevice") {
    return what + ": the CUDA runtime sees no GPU (check CUDA_VISIBLE_DEVICES and nvidia-smi).";
  }
  return what;
}

}  // namespace mixtape
