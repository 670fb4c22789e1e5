// Launchers of the CUDA ITC loss (itc_loss.cu). Plain pointers and sizes, no torch types, so the .cu file
// compiles with nvcc alone; ops_cuda.cpp checks the tensors, allocates outputs and scratch, and calls these.
//
// Shapes (all row-major and contiguous): image_feats (B, Q, E), text_feat (B, E), image_all (Ba, Q, E),
// text_all (Ba, E) in one element type `dtype`; sim_i2t, sim_t2i (B, Ba) float32; arg_i2t, arg_t2i (B, Ba) int32;
// lse (2, B) float32 (row 0: i2t, row 1: t2i); temp, grad_loss, loss, d_temp: one float32 in device memory (read
// or written by the kernels: no host synchronisation, CUDA-graph safe). targets (B,) int64; a target outside
// [0, Ba) makes that row's cross-entropy (and so the loss) NaN instead of reading out of bounds.
#pragma once

#include <stdint.h>
#include <cuda_runtime_api.h>

namespace blip2fast {

// Element type of the four feature tensors (and of their gradients).
enum class ItcDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Forward: sims + argmax queries (tiled, fp32-accumulating GEMMs with a max-over-queries epilogue), one block per
// (row, direction) for the logsumexp / smoothed CE, then a one-block deterministic sum into *loss.
// ce_scratch: 2 * B floats of device memory (per-row cross-entropies). Requires B, Ba, Q, E >= 1.
cudaError_t itc_loss_fwd_cuda(const void* image_feats, const void* text_feat, const void* image_all,
                              const void* text_all, ItcDtype dtype, int64_t B, int64_t Ba, int64_t Q, int64_t E,
                              const float* temp, const int64_t* targets, float label_smoothing, float* loss,
                              float* sim_i2t, float* sim_t2i, int32_t* arg_i2t, int32_t* arg_t2i, float* lse,
                              float* ce_scratch, cudaStream_t stream);

// Backward. A null output pointer means that gradient is not wanted (its work is skipped). Row kernel (one block
// per b): d_image_feats, d_text_feat, and the per-row share of d_temp into dtemp_scratch (B floats); column
// kernel (one block per j): d_image_all, d_text_all; then a one-block sum of dtemp_scratch into *d_temp. Every
// gradient element is summed by one thread in a fixed order: deterministic, no atomics. Argmax entries outside
// [0, Q) are skipped (they cannot come from itc_loss_fwd_cuda).
cudaError_t itc_loss_bwd_cuda(const float* grad_loss, const void* image_feats, const void* text_feat,
                              const void* image_all, const void* text_all, ItcDtype dtype, int64_t B, int64_t Ba,
                              int64_t Q, int64_t E, const float* temp, const int64_t* targets, float label_smoothing,
                              const float* sim_i2t, const float* sim_t2i, const int32_t* arg_i2t,
                              const int32_t* arg_t2i, const float* lse, void* d_image_feats, void* d_text_feat,
                              void* d_image_all, void* d_text_all, float* d_temp, float* dtemp_scratch,
                              cudaStream_t stream);

}  // namespace blip2fast
