// CUDA attention-dropout keep mask: one launch writes the whole (B, heads, q_len, k_len) bool mask, where the
// PyTorch definition (blip2fast/ops/attention.py:dropout_keep_mask_ref) runs ~190 elementwise int64 kernels. The
// hash is counter_hash.h's, the code the CPU op (dropout_mask_cpu.cpp) runs, so all three agree bit for bit.
// No torch headers (compiles with plain nvcc in seconds); ops_cuda.cpp checks the tensors and calls the launcher.
#include <cuda_runtime.h>

#include "counter_hash.h"
#include "dropout_mask.h"

namespace blip2fast {
namespace {

// A block is kKeyThreads x kRowsPerBlock threads: threadIdx.y picks one (b, h, i) row, whose hash state over the
// keys shared by the row (…, row_ids[b], h, i + q_offset) is computed once; threadIdx.x strides over its keys, so a
// warp writes 32 neighbouring bytes (full sectors) and every key costs one mix32.
constexpr int kKeyThreads = 32;
constexpr int kRowsPerBlock = 8;

__global__ void __launch_bounds__(kKeyThreads * kRowsPerBlock)
attention_dropout_keep_kernel(const int64_t* __restrict__ seed_step,  // (2,) [seed, step], read on device
                              const int64_t* __restrict__ row_ids,    // (B,) global batch row (hash key)
                              int64_t rows,                           // B * heads * q_len
                              int64_t stream_id, int64_t site, int64_t heads, int64_t q_len, int64_t k_len,
                              int64_t q_offset, uint32_t threshold,
                              bool* __restrict__ keep) {              // (rows, k_len) out
  const uint32_t prefix = hash_combine(hash_prefix(seed_step[0], seed_step[1], stream_id), key32(site));
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y; t < rows; t += row_step) {
    const int64_t i = t % q_len, bh = t / q_len, h = bh % heads, b = bh / heads;
    uint32_t state = hash_combine(prefix, key32(row_ids[b]));
    state = hash_combine(state, key32(h));
    state = hash_combine(state, key32(i + q_offset));
    bool* row = keep + t * k_len;
    for (int64_t j = threadIdx.x; j < k_len; j += kKeyThreads) {
      row[j] = dropout_keep(hash_combine(state, key32(j)), threshold);
    }
  }
}

}  // namespace

cudaError_t attention_dropout_keep_cuda(const int64_t* seed_step, const int64_t* row_ids, int64_t batch,
                                        int64_t stream_id, int64_t site, int64_t heads, int64_t q_len, int64_t k_len,
                                        int64_t q_offset, uint32_t threshold, bool* keep, cudaStream_t stream) {
  if (batch < 0 || heads < 0 || q_len < 0 || k_len < 0) return cudaErrorInvalidValue;
  const int64_t rows = batch * heads * q_len;
  if (rows == 0 || k_len == 0) return cudaSuccess;
  const int64_t max_blocks = int64_t{1} << 20;  // rows beyond this are strided over
  const int64_t wanted = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const unsigned blocks = static_cast<unsigned>(wanted < max_blocks ? wanted : max_blocks);
  attention_dropout_keep_kernel<<<blocks, dim3(kKeyThreads, kRowsPerBlock), 0, stream>>>(
      seed_step, row_ids, rows, stream_id, site, heads, q_len, k_len, q_offset, threshold, keep);
  return cudaGetLastError();
}

}  // namespace blip2fast
