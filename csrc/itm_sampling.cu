// CUDA ITM hard-negative sampler: one block per row, threads stride over the columns, block reduction of the
// (score, index) pairs with the smallest index winning ties. No torch headers (compiles with plain nvcc in ~2 s);
// ops_cuda.cpp checks the tensors and calls itm_sample_negatives_cuda. The math lives in counter_hash.h and is
// the same code the C++ CPU path runs, so both match the PyTorch reference bit for bit.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "counter_hash.h"
#include "itm_sampling.h"

namespace blip2fast {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / 32;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Loads column j of one row as float (the reference scores in float32; fp16/bf16 widen exactly).
template <typename T>
struct RowLoader {
  const T* row;        // first element of the row
  int64_t col_stride;  // elements between neighbouring columns
  __device__ __forceinline__ float operator()(int64_t j) const { return to_float(row[j * col_stride]); }
};

__device__ __forceinline__ void shfl_merge(ArgMax& a, int offset) {
  ArgMax o;
  o.score = __shfl_down_sync(0xFFFFFFFFu, a.score, offset);
  o.index = __shfl_down_sync(0xFFFFFFFFu, static_cast<long long>(a.index), offset);
  a.merge(o);
}

// Merge the RowDraw of every thread of the block into thread 0's (blockDim.x is a multiple of 32, <= 512).
__device__ __forceinline__ RowDraw block_merge(RowDraw d, RowDraw* warp_partials) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    shfl_merge(d.drawn, offset);
    shfl_merge(d.fallback, offset);
  }
  if (warps == 1) return d;
  if (lane == 0) warp_partials[warp] = d;
  __syncthreads();
  if (warp == 0) {
    d = lane < warps ? warp_partials[lane] : RowDraw::empty();
#pragma unroll
    for (int offset = kMaxWarps / 2; offset > 0; offset >>= 1) {
      shfl_merge(d.drawn, offset);
      shfl_merge(d.fallback, offset);
    }
  }
  return d;
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
itm_sample_negatives_kernel(const T* __restrict__ sim,           // (rows, cols) logits, strided
                            int64_t rows, int64_t cols,
                            int64_t row_stride, int64_t col_stride,  // in elements
                            const int64_t* __restrict__ positive,   // (rows,) column excluded from the draw
                            const int64_t* __restrict__ row_ids,    // (rows,) global row index (hash coordinate)
                            const int64_t* __restrict__ seed_step,  // (2,) [seed, step], read on device
                            int64_t stream_id,                      // hashing.STREAM_ITM_*
                            int64_t* __restrict__ neg,              // (rows,) out: drawn column
                            unsigned long long* __restrict__ n_fallback) {  // () out: rows without a candidate
  __shared__ RowDraw warp_partials[kMaxWarps];
  const uint32_t prefix = hash_prefix(seed_step[0], seed_step[1], stream_id);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const uint32_t row_hash = hash_combine(prefix, key32(row_ids[r]));
    const RowLoader<T> load{sim + r * row_stride, col_stride};
    RowDraw d = draw_row_columns(load, threadIdx.x, blockDim.x, cols, positive[r], row_hash);
    d = block_merge(d, warp_partials);
    if (threadIdx.x == 0) {
      neg[r] = d.result();
      if (d.used_fallback()) atomicAdd(n_fallback, 1ull);
    }
    __syncthreads();  // warp_partials is reused by the next row
  }
}

int threads_for(int64_t cols) {
  int t = 32;
  while (t < kMaxThreads && t < cols) t *= 2;
  // Above 256 threads only pays for long rows (each thread should still see several columns).
  if (t > 256 && cols < 4096) t = 256;
  return t;
}

template <typename T>
void launch(const void* sim, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
            const int64_t* positive, const int64_t* row_ids, const int64_t* seed_step, int64_t stream_id,
            int64_t* neg, int64_t* n_fallback, cudaStream_t stream) {
  const int threads = threads_for(cols);
  const int64_t max_blocks = 1 << 20;  // rows beyond this are strided over
  const unsigned blocks = static_cast<unsigned>(rows < max_blocks ? rows : max_blocks);
  itm_sample_negatives_kernel<T><<<blocks, threads, 0, stream>>>(
      static_cast<const T*>(sim), rows, cols, row_stride, col_stride, positive, row_ids, seed_step, stream_id, neg,
      reinterpret_cast<unsigned long long*>(n_fallback));
}

}  // namespace

cudaError_t itm_sample_negatives_cuda(const void* sim, SimDtype dtype, int64_t rows, int64_t cols,
                                      int64_t row_stride, int64_t col_stride, const int64_t* positive,
                                      const int64_t* row_ids, const int64_t* seed_step, int64_t stream_id,
                                      int64_t* neg, int64_t* n_fallback, cudaStream_t stream) {
  if (rows < 0 || cols < 2 || cols > INT32_MAX) return cudaErrorInvalidValue;
  cudaError_t err = cudaMemsetAsync(n_fallback, 0, sizeof(int64_t), stream);
  if (err != cudaSuccess) return err;
  if (rows == 0) return cudaSuccess;
  switch (dtype) {
    case SimDtype::kFloat32:
      launch<float>(sim, rows, cols, row_stride, col_stride, positive, row_ids, seed_step, stream_id, neg,
                    n_fallback, stream);
      break;
    case SimDtype::kFloat16:
      launch<__half>(sim, rows, cols, row_stride, col_stride, positive, row_ids, seed_step, stream_id, neg,
                     n_fallback, stream);
      break;
    case SimDtype::kBFloat16:
      launch<__nv_bfloat16>(sim, rows, cols, row_stride, col_stride, positive, row_ids, seed_step, stream_id, neg,
                            n_fallback, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace blip2fast
