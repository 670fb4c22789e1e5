// CUDA ITC loss: forward (similarities both ways with their argmax query, row logsumexp, smoothed CE, loss) and
// backward (all five gradients), deterministic (no atomics: every output element is summed by one thread in a
// fixed order). No torch headers (compiles with plain nvcc in seconds); ops_cuda.cpp checks the tensors and calls
// the launchers of itc_loss_cuda.h. The per-element math is itc_loss.h, the same code the C++ CPU path runs.
//
// Kernels:
//   sim_kernel        tiled NT GEMM  C[g*Q + q, n] = <X[g, q], Y[n]>  with a max-over-q epilogue:
//                     i2t: X = image_feats (G = B),  Y = text_all (N = Ba), stored sim[g, n]
//                     t2i: X = image_all   (G = Ba), Y = text_feat (N = B),  stored sim[n, g] (transposed)
//                     Memory O(B x Ba): the (B, Ba, Q) products live only in registers.
//   row_ce_kernel     one block per (row b, direction): online logsumexp, sum, target logit -> lse, CE[b]
//   sum_kernel        one block: a fixed-order sum (loss from the CEs, d_temp from per-row partials)
//   grad_kernel       row mode, one block per b:    d_image_feats[b] (i2t pairs), d_text_feat[b] (t2i pairs)
//                     column mode, one block per j: d_image_all[j] (t2i pairs),   d_text_all[j] (i2t pairs)
//
// The similarities are a GEMM tiled over (rows, columns) rather than one block per row b: a per-row block of the
// t2i direction would read all of image_all (Ba x Q x E) once per row, B times in all, and the two directions'
// work per row differs by Q. The GEMM runs on CUDA cores (fmaf), not tensor cores, so its sums are exactly the
// C++ path's (bit-identical similarities and argmax); an mma path would be faster and only close.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "itc_loss.h"
#include "itc_loss_cuda.h"

namespace blip2fast {
namespace {

using itc::MaxQ;
using itc::OnlineLse;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ---------------------------------------------------------------------------------------------------------------
// Similarities. A block computes a tile of kTileG groups x kTileN columns, sweeping the queries kQChunk at a time:
// each thread holds kQChunk x kThreadN accumulators (the chunk's queries of one group against kThreadN columns), so
// the max over queries is in-thread. Operands are staged in shared memory as float32 (fp16/bf16 widen exactly);
// every accumulator takes one fmaf per feature index in increasing order, as itc::dot_f32 does on the CPU.

constexpr int kSimThreads = 256;
constexpr int kTileG = 16;    // groups (rows b for i2t, columns j for t2i) per block
constexpr int kQChunk = 8;    // queries per pass over the feature dimension
constexpr int kTileN = 64;    // columns per block
constexpr int kThreadN = 4;   // columns per thread (kTileN / (kSimThreads / kTileG))
constexpr int kTileK = 16;    // feature indices staged per step
constexpr int kXRows = kTileG * kQChunk;
constexpr int kPad = 4;       // keeps float4 rows 16-byte aligned and halves staging bank conflicts
static_assert(kTileN == kThreadN * (kSimThreads / kTileG), "thread layout must cover the column tile");
constexpr int kRowsPerPass = kSimThreads / kTileK;        // tile rows staged per pass of all threads
constexpr int kGroupsPerPass = kRowsPerPass / kQChunk;
static_assert(kRowsPerPass % kQChunk == 0 && kXRows % kRowsPerPass == 0 && kTileN % kRowsPerPass == 0,
              "staging passes must cover whole groups and tiles");

template <typename T, bool kTransposedStore>
__global__ void __launch_bounds__(kSimThreads, 2)
sim_kernel(const T* __restrict__ X,        // (G, Q, K) query-side features
           const T* __restrict__ Y,        // (N, K) single-vector features
           int64_t G, int64_t N, int Q, int64_t K,
           const float* __restrict__ temp,  // () temperature, read on device
           float* __restrict__ sim,         // (G, N), or (N, G) when kTransposedStore
           int32_t* __restrict__ arg) {     // same layout as sim: argmax query
  __shared__ __align__(16) float xs[kTileK][kXRows + kPad];
  __shared__ __align__(16) float ys[kTileK][kTileN + kPad];
  const int tid = threadIdx.x;
  const int tg = tid / (kSimThreads / kTileG);  // this thread's group within the tile
  const int tn = tid % (kSimThreads / kTileG);  // this thread's column quad within the tile
  const int64_t g0 = static_cast<int64_t>(blockIdx.x) * kTileG;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileN;

  // Staging coordinates: thread tid stages feature index k0 + sk of the X tile rows srow + kRowsPerPass * it
  // (row r holds group r / kQChunk, query r % kQChunk) and of the Y tile rows srow + kRowsPerPass * it.
  const int sk = tid % kTileK;
  const int srow = tid / kTileK;
  const int64_t sx_group = g0 + srow / kQChunk;  // + it * kGroupsPerPass
  const int sx_query = srow % kQChunk;           // + qc
  const int64_t x_pass_stride = static_cast<int64_t>(kGroupsPerPass) * Q * K;
  const T* y_base = Y + (n0 + srow) * K + sk;
  const int64_t y_pass_stride = static_cast<int64_t>(kRowsPerPass) * K;

  MaxQ best[kThreadN];
#pragma unroll
  for (int j = 0; j < kThreadN; ++j) best[j] = MaxQ::empty();

  for (int qc = 0; qc < Q; qc += kQChunk) {
    float acc[kQChunk][kThreadN];
#pragma unroll
    for (int i = 0; i < kQChunk; ++i)
#pragma unroll
      for (int j = 0; j < kThreadN; ++j) acc[i][j] = 0.0f;
    const bool q_ok = qc + sx_query < Q;
    const T* x_base = X + (sx_group * Q + qc + sx_query) * K + sk;

    for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
      // Out-of-range entries are staged as 0 (an fmaf(0, 0, acc) leaves acc unchanged). Consecutive threads read
      // consecutive feature indices of one row.
      const bool k_ok = k0 + sk < K;
#pragma unroll
      for (int it = 0; it < kXRows / kRowsPerPass; ++it) {
        const bool ok = k_ok && q_ok && sx_group + it * kGroupsPerPass < G;
        xs[sk][srow + it * kRowsPerPass] = ok ? to_float(x_base[it * x_pass_stride + k0]) : 0.0f;
      }
#pragma unroll
      for (int it = 0; it < kTileN / kRowsPerPass; ++it) {
        const bool ok = k_ok && n0 + srow + it * kRowsPerPass < N;
        ys[sk][srow + it * kRowsPerPass] = ok ? to_float(y_base[it * y_pass_stride + k0]) : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kTileK; ++kk) {
        const float4 a0 = *reinterpret_cast<const float4*>(&xs[kk][tg * kQChunk]);
        const float4 a1 = *reinterpret_cast<const float4*>(&xs[kk][tg * kQChunk + 4]);
        const float4 b4 = *reinterpret_cast<const float4*>(&ys[kk][tn * kThreadN]);
        const float a[kQChunk] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        const float b[kThreadN] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
        for (int i = 0; i < kQChunk; ++i)
#pragma unroll
          for (int j = 0; j < kThreadN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();  // the next step overwrites xs / ys
    }
    // Queries in increasing order: ties keep the lowest q.
#pragma unroll
    for (int i = 0; i < kQChunk; ++i) {
      if (qc + i < Q) {
#pragma unroll
        for (int j = 0; j < kThreadN; ++j) best[j].offer(acc[i][j], qc + i);
      }
    }
  }

  const int64_t g = g0 + tg;
  if (g >= G) return;
  const float t = *temp;
#pragma unroll
  for (int j = 0; j < kThreadN; ++j) {
    const int64_t n = n0 + tn * kThreadN + j;
    if (n < N) {
      const int64_t idx = kTransposedStore ? n * G + g : g * N + n;
      sim[idx] = best[j].value / t;  // max(dot) / temp == max(dot / temp): division by temp > 0 is monotone
      arg[idx] = best[j].q;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Block reductions (blockDim.x a multiple of 32, <= 1024), fixed trees: deterministic.

constexpr int kMaxWarps = 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, offset);
  return v;
}

// Sum over the block; the result is valid in thread 0. `partials` holds kMaxWarps floats.
__device__ __forceinline__ float block_sum(float v, float* partials) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) partials[warp] = v;
  __syncthreads();
  if (warp == 0) v = warp_sum(lane < warps ? partials[lane] : 0.0f);
  return v;
}

struct RowStats {
  OnlineLse lse;
  float sum;
};

__device__ __forceinline__ RowStats warp_row_stats(RowStats r) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float om = __shfl_down_sync(0xFFFFFFFFu, r.lse.m, offset);
    const float os = __shfl_down_sync(0xFFFFFFFFu, r.lse.s, offset);
    const float osum = __shfl_down_sync(0xFFFFFFFFu, r.sum, offset);
    r.lse.merge(om, os);
    r.sum += osum;
  }
  return r;
}

// ---------------------------------------------------------------------------------------------------------------
// Row cross-entropy: block (b, direction). Writes lse[dir, b] and ce[dir, b].

__global__ void __launch_bounds__(1024)
row_ce_kernel(const float* __restrict__ sim_i2t,   // (B, Ba)
              const float* __restrict__ sim_t2i,   // (B, Ba)
              const int64_t* __restrict__ targets, // (B,)
              int64_t B, int64_t Ba, float eps,
              float* __restrict__ lse,             // (2, B) out
              float* __restrict__ ce) {            // (2, B) out
  __shared__ RowStats partials[kMaxWarps];
  const int dir = blockIdx.y;
  const int64_t b = blockIdx.x;
  const float* row = (dir == 0 ? sim_i2t : sim_t2i) + b * Ba;
  RowStats r{OnlineLse::empty(), 0.0f};
  for (int64_t j = threadIdx.x; j < Ba; j += blockDim.x) {
    const float x = row[j];
    r.lse.offer(x);
    r.sum += x;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  r = warp_row_stats(r);
  if (lane == 0) partials[warp] = r;
  __syncthreads();
  if (warp != 0) return;
  r = lane < warps ? partials[lane] : RowStats{OnlineLse::empty(), 0.0f};
  r = warp_row_stats(r);
  if (lane == 0) {
    const int64_t t = targets[b];
    const float value = r.lse.value();
    const float target_logit = (t >= 0 && t < Ba) ? row[t] : NAN;  // a bad target poisons the loss, no OOB read
    lse[dir * B + b] = value;
    ce[dir * B + b] = itc::smoothed_ce(value, target_logit, r.sum, eps, Ba);
  }
}

// out[0] = scale * sum(x[0, n)), one block, fixed order (deterministic).
__global__ void __launch_bounds__(1024)
sum_kernel(const float* __restrict__ x, int64_t n, float scale, float* __restrict__ out) {
  __shared__ float partials[kMaxWarps];
  float v = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) v += x[i];
  v = block_sum(v, partials);
  if (threadIdx.x == 0) out[0] = scale * v;
}

// ---------------------------------------------------------------------------------------------------------------
// Gradients. Block p (row b, or column j in column mode) walks the other index r in order, staging blockDim.x
// pairs' coefficients in shared memory, and each thread owns feature index e of its outputs:
//   d_exp[p, q, e]  += ddot(pair) * [arg(pair) == q] * v_exp[r, e]        (q-expanded output, fp32 in smem)
//   d_flat[p, e]    += ddot(pair') * v_gat[r, arg(pair'), e]              (gathered at the argmax query)
// Row mode:    pairs (b = p, j = r); d_exp = d_image_feats (i2t pairs, v_exp = text_all),
//              d_flat = d_text_feat (t2i pairs, v_gat = image_all); also the row's share of d_temp.
// Column mode: pairs (b = r, j = p); d_exp = d_image_all (t2i pairs, v_exp = text_feat),
//              d_flat = d_text_all (i2t pairs, v_gat = image_feats).

struct GradArgs {
  const float* grad_loss;  // ()
  const float* temp;       // ()
  const int64_t* targets;  // (B,)
  float eps;
  int64_t B, Ba, E;
  int Q;
  const float* sim_i2t;    // (B, Ba)
  const float* sim_t2i;    // (B, Ba)
  const int32_t* arg_i2t;  // (B, Ba)
  const int32_t* arg_t2i;  // (B, Ba)
  const float* lse;        // (2, B)
  const void* v_exp;       // (R, E)
  const void* v_gat;       // (R, Q, E)
  void* d_exp;             // (P, Q, E) or null
  void* d_flat;            // (P, E) or null
  float* dtemp_part;       // (P,) or null (row mode only)
};

template <typename T, bool kColumn>
__global__ void __launch_bounds__(256, 1) grad_kernel(const GradArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int nt = blockDim.x;
  const int tid = threadIdx.x;
  float* coef_exp = reinterpret_cast<float*>(smem_raw);  // (nt,)
  float* coef_flat = coef_exp + nt;                     // (nt,)
  int32_t* arg_exp = reinterpret_cast<int32_t*>(coef_flat + nt);
  int32_t* arg_flat = arg_exp + nt;
  float* acc_exp = reinterpret_cast<float*>(arg_flat + nt);  // (Q, nt): column tid is this thread's

  const int64_t p = blockIdx.x;
  const int64_t R = kColumn ? a.B : a.Ba;
  const int Q = a.Q;
  const int64_t E = a.E;
  const float scale = itc::grad_scale(*a.grad_loss, a.B);
  const float temp = *a.temp;
  // Row mode: expanded output from i2t pairs (direction 0); column mode: from t2i pairs (direction 1).
  const float* sim_exp = kColumn ? a.sim_t2i : a.sim_i2t;
  const float* sim_flat = kColumn ? a.sim_i2t : a.sim_t2i;
  const int32_t* argm_exp = kColumn ? a.arg_t2i : a.arg_i2t;
  const int32_t* argm_flat = kColumn ? a.arg_i2t : a.arg_t2i;
  const float* lse_exp = a.lse + (kColumn ? a.B : 0);
  const float* lse_flat = a.lse + (kColumn ? 0 : a.B);
  const T* v_exp = static_cast<const T*>(a.v_exp);
  const T* v_gat = static_cast<const T*>(a.v_gat);
  T* d_exp = static_cast<T*>(a.d_exp);
  T* d_flat = static_cast<T*>(a.d_flat);
  const bool need_exp = d_exp != nullptr, need_flat = d_flat != nullptr;
  const bool need_temp = !kColumn && a.dtemp_part != nullptr;

  float dtemp_acc = 0.0f;
  for (int64_t e0 = 0; e0 < E; e0 += nt) {
    const int64_t e = e0 + tid;
    const bool active = e < E;
    if (need_exp)
      for (int q = 0; q < Q; ++q) acc_exp[q * nt + tid] = 0.0f;
    float acc_flat = 0.0f;
    for (int64_t r0 = 0; r0 < R; r0 += nt) {
      const int nr = static_cast<int>(R - r0 < nt ? R - r0 : nt);
      __syncthreads();  // the previous chunk is done with the staged coefficients
      if (tid < nr) {
        const int64_t r = r0 + tid;
        const int64_t b = kColumn ? r : p;
        const int64_t j = kColumn ? p : r;
        const int64_t idx = b * a.Ba + j;
        const bool is_target = a.targets[b] == j;
        const itc::PairGrad ge = itc::pair_grad(sim_exp[idx], lse_exp[b], is_target, a.eps, a.Ba, scale, temp);
        const itc::PairGrad gf = itc::pair_grad(sim_flat[idx], lse_flat[b], is_target, a.eps, a.Ba, scale, temp);
        coef_exp[tid] = ge.ddot;
        coef_flat[tid] = gf.ddot;
        arg_exp[tid] = argm_exp[idx];
        arg_flat[tid] = argm_flat[idx];
        if (need_temp && e0 == 0) dtemp_acc += ge.dtemp + gf.dtemp;
      }
      __syncthreads();
      if (!active) continue;
      if (need_exp) {
#pragma unroll 4
        for (int rr = 0; rr < nr; ++rr) {
          const int q = arg_exp[rr];
          if (q < 0 || q >= Q) continue;
          float& s = acc_exp[q * nt + tid];
          s = fmaf(coef_exp[rr], to_float(v_exp[(r0 + rr) * E + e]), s);
        }
      }
      if (need_flat) {
#pragma unroll 4
        for (int rr = 0; rr < nr; ++rr) {
          const int q = arg_flat[rr];
          if (q < 0 || q >= Q) continue;
          acc_flat = fmaf(coef_flat[rr], to_float(v_gat[((r0 + rr) * Q + q) * E + e]), acc_flat);
        }
      }
    }
    if (active) {
      if (need_exp)
        for (int q = 0; q < Q; ++q) d_exp[(p * Q + q) * E + e] = from_float<T>(acc_exp[q * nt + tid]);
      if (need_flat) d_flat[p * E + e] = from_float<T>(acc_flat);
    }
    if (!need_exp && !need_flat) break;  // d_temp only: one pass over the pairs is enough
  }
  if (need_temp) {
    __syncthreads();  // the staging area is reused for the reduction
    const float v = block_sum(dtemp_acc, coef_exp);
    if (tid == 0) a.dtemp_part[p] = v;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Launch helpers

int pow2_threads(int64_t work, int max_threads) {
  int t = 32;
  while (t < max_threads && t < work) t *= 2;
  return t;
}

template <typename T>
cudaError_t launch_sims(const void* image_feats, const void* text_feat, const void* image_all,
                        const void* text_all, int64_t B, int64_t Ba, int Q, int64_t E, const float* temp,
                        float* sim_i2t, float* sim_t2i, int32_t* arg_i2t, int32_t* arg_t2i, cudaStream_t stream) {
  // Groups on grid x (up to 2**31 - 1 blocks), columns on grid y (up to 65535 blocks of 64).
  const int64_t max_y = 65535;
  if ((Ba + kTileN - 1) / kTileN > max_y || (B + kTileN - 1) / kTileN > max_y) return cudaErrorInvalidValue;
  const dim3 grid_i2t(static_cast<unsigned>((B + kTileG - 1) / kTileG), static_cast<unsigned>((Ba + kTileN - 1) / kTileN));
  sim_kernel<T, false><<<grid_i2t, kSimThreads, 0, stream>>>(static_cast<const T*>(image_feats),
                                                             static_cast<const T*>(text_all), B, Ba, Q, E, temp,
                                                             sim_i2t, arg_i2t);
  const dim3 grid_t2i(static_cast<unsigned>((Ba + kTileG - 1) / kTileG), static_cast<unsigned>((B + kTileN - 1) / kTileN));
  sim_kernel<T, true><<<grid_t2i, kSimThreads, 0, stream>>>(static_cast<const T*>(image_all),
                                                            static_cast<const T*>(text_feat), Ba, B, Q, E, temp,
                                                            sim_t2i, arg_t2i);
  return cudaGetLastError();
}

// Threads of a gradient block: one per feature index up to 256 (E = 256 for BLIP-2), at least 64 so that the
// coefficient staging of long rows is spread; fewer when the shared q-expanded accumulator would not fit.
template <typename T, bool kColumn>
cudaError_t launch_grads(GradArgs a, int64_t blocks, cudaStream_t stream) {
  const bool need_exp = a.d_exp != nullptr;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  int optin = 0;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  int nt = pow2_threads(a.E, 256);
  if (nt < 64) nt = 64;
  auto bytes_for = [&](int threads) {
    return static_cast<size_t>(threads) * (4 * sizeof(float) + (need_exp ? a.Q * sizeof(float) : 0));
  };
  while (nt > 32 && bytes_for(nt) > 48 * 1024) nt /= 2;
  const size_t bytes = bytes_for(nt);
  if (bytes > static_cast<size_t>(optin)) return cudaErrorInvalidValue;  // Q in the thousands
  if (bytes > 48 * 1024) {
    err = cudaFuncSetAttribute(grad_kernel<T, kColumn>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(bytes));
    if (err != cudaSuccess) return err;
  }
  grad_kernel<T, kColumn><<<static_cast<unsigned>(blocks), nt, bytes, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_typed(const float* grad_loss, const void* image_feats, const void* text_feat,
                      const void* image_all, const void* text_all, int64_t B, int64_t Ba, int Q, int64_t E,
                      const float* temp, const int64_t* targets, float eps, const float* sim_i2t,
                      const float* sim_t2i, const int32_t* arg_i2t, const int32_t* arg_t2i, const float* lse,
                      void* d_image_feats, void* d_text_feat, void* d_image_all, void* d_text_all, float* d_temp,
                      float* dtemp_scratch, cudaStream_t stream) {
  GradArgs base{grad_loss, temp, targets, eps, B, Ba, E, Q, sim_i2t, sim_t2i, arg_i2t, arg_t2i, lse,
                nullptr, nullptr, nullptr, nullptr, nullptr};
  cudaError_t err = cudaSuccess;
  if (d_image_feats != nullptr || d_text_feat != nullptr || d_temp != nullptr) {
    GradArgs row = base;
    row.v_exp = text_all;
    row.v_gat = image_all;
    row.d_exp = d_image_feats;
    row.d_flat = d_text_feat;
    row.dtemp_part = d_temp != nullptr ? dtemp_scratch : nullptr;
    err = launch_grads<T, false>(row, B, stream);
    if (err != cudaSuccess) return err;
  }
  if (d_image_all != nullptr || d_text_all != nullptr) {
    GradArgs col = base;
    col.v_exp = text_feat;
    col.v_gat = image_feats;
    col.d_exp = d_image_all;
    col.d_flat = d_text_all;
    err = launch_grads<T, true>(col, Ba, stream);
    if (err != cudaSuccess) return err;
  }
  if (d_temp != nullptr) {
    sum_kernel<<<1, pow2_threads(B, 1024), 0, stream>>>(dtemp_scratch, B, 1.0f, d_temp);
    err = cudaGetLastError();
  }
  return err;
}

bool valid_sizes(int64_t B, int64_t Ba, int64_t Q, int64_t E) {
  const int64_t max_blocks = 2147483647;
  return B >= 1 && Ba >= 1 && Q >= 1 && E >= 1 && Q <= 65535 && B <= max_blocks && Ba <= max_blocks;
}

}  // namespace

cudaError_t itc_loss_fwd_cuda(const void* image_feats, const void* text_feat, const void* image_all,
                              const void* text_all, ItcDtype dtype, int64_t B, int64_t Ba, int64_t Q, int64_t E,
                              const float* temp, const int64_t* targets, float label_smoothing, float* loss,
                              float* sim_i2t, float* sim_t2i, int32_t* arg_i2t, int32_t* arg_t2i, float* lse,
                              float* ce_scratch, cudaStream_t stream) {
  if (!valid_sizes(B, Ba, Q, E)) return cudaErrorInvalidValue;
  const int q = static_cast<int>(Q);
  cudaError_t err;
  switch (dtype) {
    case ItcDtype::kFloat32:
      err = launch_sims<float>(image_feats, text_feat, image_all, text_all, B, Ba, q, E, temp, sim_i2t, sim_t2i,
                               arg_i2t, arg_t2i, stream);
      break;
    case ItcDtype::kFloat16:
      err = launch_sims<__half>(image_feats, text_feat, image_all, text_all, B, Ba, q, E, temp, sim_i2t, sim_t2i,
                                arg_i2t, arg_t2i, stream);
      break;
    case ItcDtype::kBFloat16:
      err = launch_sims<__nv_bfloat16>(image_feats, text_feat, image_all, text_all, B, Ba, q, E, temp, sim_i2t,
                                       sim_t2i, arg_i2t, arg_t2i, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(B), 2);
  row_ce_kernel<<<grid, pow2_threads(Ba, 256), 0, stream>>>(sim_i2t, sim_t2i, targets, B, Ba, label_smoothing, lse,
                                                            ce_scratch);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  sum_kernel<<<1, pow2_threads(2 * B, 1024), 0, stream>>>(ce_scratch, 2 * B, 0.5f / static_cast<float>(B), loss);
  return cudaGetLastError();
}

cudaError_t itc_loss_bwd_cuda(const float* grad_loss, const void* image_feats, const void* text_feat,
                              const void* image_all, const void* text_all, ItcDtype dtype, int64_t B, int64_t Ba,
                              int64_t Q, int64_t E, const float* temp, const int64_t* targets, float label_smoothing,
                              const float* sim_i2t, const float* sim_t2i, const int32_t* arg_i2t,
                              const int32_t* arg_t2i, const float* lse, void* d_image_feats, void* d_text_feat,
                              void* d_image_all, void* d_text_all, float* d_temp, float* dtemp_scratch,
                              cudaStream_t stream) {
  if (!valid_sizes(B, Ba, Q, E)) return cudaErrorInvalidValue;
  if (d_temp != nullptr && dtemp_scratch == nullptr) return cudaErrorInvalidValue;
  const int q = static_cast<int>(Q);
  switch (dtype) {
    case ItcDtype::kFloat32:
      return bwd_typed<float>(grad_loss, image_feats, text_feat, image_all, text_all, B, Ba, q, E, temp, targets,
                              label_smoothing, sim_i2t, sim_t2i, arg_i2t, arg_t2i, lse, d_image_feats, d_text_feat,
                              d_image_all, d_text_all, d_temp, dtemp_scratch, stream);
    case ItcDtype::kFloat16:
      return bwd_typed<__half>(grad_loss, image_feats, text_feat, image_all, text_all, B, Ba, q, E, temp, targets,
                               label_smoothing, sim_i2t, sim_t2i, arg_i2t, arg_t2i, lse, d_image_feats, d_text_feat,
                               d_image_all, d_text_all, d_temp, dtemp_scratch, stream);
    case ItcDtype::kBFloat16:
      return bwd_typed<__nv_bfloat16>(grad_loss, image_feats, text_feat, image_all, text_all, B, Ba, q, E, temp,
                                      targets, label_smoothing, sim_i2t, sim_t2i, arg_i2t, arg_t2i, lse,
                                      d_image_feats, d_text_feat, d_image_all, d_text_all, d_temp, dtemp_scratch,
                                      stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace blip2fast
