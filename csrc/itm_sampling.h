// Launcher of the CUDA ITM hard-negative sampler (itm_sampling.cu). Plain pointers and sizes, no torch types,
// so the .cu file compiles with nvcc alone; ops_cuda.cpp checks the tensors and calls this.
#pragma once

#include <stdint.h>
#include <cuda_runtime_api.h>

namespace blip2fast {

// Element type of `sim` (the only templated input).
enum class SimDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// neg[r] = argmax_j float(sim[r, j]) + gumbel(hash(seed, step, stream, row_ids[r], j)) over candidates j (finite,
// j != positive[r]); a row without a candidate takes argmax_j gumbel over j != positive[r] and adds 1 to
// *n_fallback. The launcher zeroes *n_fallback on `stream` first. seed_step points at [seed, step] in device
// memory (read by the kernel: no host sync). sim is addressed as sim[r * row_stride + j * col_stride] (elements).
// Requires rows >= 0, 2 <= cols < 2**31. Returns the launch error (cudaSuccess when queued).
cudaError_t itm_sample_negatives_cuda(const void* sim, SimDtype dtype, int64_t rows, int64_t cols,
                                      int64_t row_stride, int64_t col_stride, const int64_t* positive,
                                      const int64_t* row_ids, const int64_t* seed_step, int64_t stream_id,
                                      int64_t* neg, int64_t* n_fallback, cudaStream_t stream);

}  // namespace blip2fast
