// What the CUDA runtime (linked statically) can see; defined only in CUDA builds.
#pragma once

namespace mixtape {
int cuda_device_count();
int cuda_runtime_version();
}  // namespace mixtape
