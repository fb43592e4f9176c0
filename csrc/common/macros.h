// Shared by the C++ and CUDA translation units: the per-element logic of every kernel is written
// once as MIXTAPE_HD inline functions, so the CPU path (and its tests) exercise what the GPU runs.
#pragma once

#if defined(__CUDACC__)
#define MIXTAPE_HD __host__ __device__ __forceinline__
#else
#define MIXTAPE_HD inline
#endif
