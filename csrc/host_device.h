// B2F_HD marks the math shared by the C++ (CPU) and CUDA implementations: inline on the host compiler, also
// __device__ (and force-inlined) under nvcc. Included by every header that holds such shared math.
#pragma once

#if defined(__CUDACC__)
#define B2F_HD __host__ __device__ __forceinline__
#else
#define B2F_HD inline
#endif
