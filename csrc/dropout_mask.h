// Launcher of the CUDA attention-dropout keep mask (dropout_mask.cu). Plain pointers and sizes, no torch types, so
// the .cu file compiles with nvcc alone; ops_cuda.cpp checks the tensors and calls this.
#pragma once

#include <stdint.h>
#include <cuda_runtime_api.h>

namespace blip2fast {

// keep[((b * heads + h) * q_len + i) * k_len + j] = (hash(seed_lo, seed_hi, step, stream, site, row_ids[b], h,
// i + q_offset, j) >> 8) >= threshold for b < batch: blip2fast/ops/attention.py:dropout_keep_mask_ref, bit for bit.
// seed_step points at [seed, step] in device memory (read by the kernel: no host sync, CUDA-graph safe). keep is a
// contiguous (batch, heads, q_len, k_len) bool buffer. Returns the launch error (cudaSuccess when queued, or when
// there is nothing to write).
cudaError_t attention_dropout_keep_cuda(const int64_t* seed_step, const int64_t* row_ids, int64_t batch,
                                        int64_t stream_id, int64_t site, int64_t heads, int64_t q_len, int64_t k_len,
                                        int64_t q_offset, uint32_t threshold, bool* keep, cudaStream_t stream);

}  // namespace blip2fast
