// Per-element math of the ITC loss, shared by the C++ (CPU) implementation in ops.cpp and the CUDA kernels in
// itc_loss.cu, so the CPU tests exercise the arithmetic the GPU runs. The spec is blip2fast/ops/losses.py
// (itc_similarities + itc_loss_ref); the op contract is the schema of blip2fast::itc_loss_fwd / itc_loss_bwd.
//
//   sim_i2t[b, j] = max_q <image_feats[b, q], text_all[j]> / temp        (B, Ba)
//   sim_t2i[b, j] = max_q <text_feat[b], image_all[j, q]> / temp         (B, Ba)
//   CE[b]  = lse[b] - (1 - eps) * sim[b, t_b] - eps / C * sum_j sim[b, j]           (C = Ba classes)
//   loss   = 0.5 * (mean_b CE_i2t[b] + mean_b CE_t2i[b])
//   dsim[b, j] = grad * 0.5 / B * (exp(sim[b, j] - lse[b]) - (1 - eps) * [j == t_b] - eps / C)
//
// Both paths accumulate every dot product in float32 with one fmaf per element, in increasing order of the
// feature index, so the CPU and CUDA similarities and argmaxes are bit-identical (only expf/logf, and the order
// of the row sums, differ between host and device: lse, loss and gradients agree to a few ulp).
//
// Plain C++ with no torch and no CUDA headers; under nvcc every function is also __device__.
#pragma once

#include <math.h>
#include <stdint.h>

#include "host_device.h"

namespace blip2fast {
namespace itc {

// <a, b> over n elements: float32 accumulation, one fused multiply-add per element, in increasing index order.
// The CUDA GEMM tile accumulates each output in exactly this order (its masked tail adds fmaf(0, 0, acc)).
B2F_HD float dot_f32(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
  for (int64_t k = 0; k < n; ++k) acc = fmaf(a[k], b[k], acc);
  return acc;
}

// Running max over the queries of one (row, column) pair with the argmax query. Queries are offered in
// increasing order; a later query replaces the best only when strictly larger, so ties keep the lowest q (what
// torch.amax's gradient routing and torch.argmax pick on random inputs). A NaN wins and stays, as torch.max
// propagates NaN.
struct MaxQ {
  float value;
  int32_t q;  // -1: nothing offered yet

  B2F_HD static MaxQ empty() { return MaxQ{0.0f, -1}; }

  B2F_HD void offer(float v, int32_t qi) {
    const bool value_is_nan = value != value;
    if (q < 0 || (!value_is_nan && (v > value || v != v))) {
      value = v;
      q = qi;
    }
  }
};

// Online logsumexp: m is the running max, s the sum of exp(x - m). s == 0 marks the empty state. Merging is
// what a block reduction needs; offering x is merging {x, 1}. NaN propagates (as torch.logsumexp does), and a
// row of -inf gives -inf.
struct OnlineLse {
  float m;
  float s;

  B2F_HD static OnlineLse empty() { return OnlineLse{-INFINITY, 0.0f}; }

  B2F_HD void merge(float om, float os) {
    if (os == 0.0f) return;  // other side empty
    if (s == 0.0f) {
      m = om;
      s = os;
      return;
    }
    const float mx = om > m ? om : m;  // NaN in m stays in m; NaN in om reaches s through expf below
    if (mx == -INFINITY) {  // both all -inf: exp(-inf - -inf) would be NaN
      s += os;
      return;
    }
    s = s * expf(m - mx) + os * expf(om - mx);
    m = mx;
  }
  B2F_HD void merge(const OnlineLse& o) { merge(o.m, o.s); }
  B2F_HD void offer(float x) { merge(x, 1.0f); }
  B2F_HD float value() const { return s == 0.0f ? -INFINITY : m + logf(s); }
};

// Label-smoothed cross-entropy of one row from its logsumexp, its target logit and the sum of its logits.
B2F_HD float smoothed_ce(float lse, float sim_target, float sum_sim, float eps, int64_t classes) {
  return lse - (1.0f - eps) * sim_target - eps / static_cast<float>(classes) * sum_sim;
}

// dL/dsim[b, j] = scale * (softmax - (1 - eps) * onehot - eps / C), scale = grad_loss * 0.5 / B.
B2F_HD float dsim(float sim, float lse, bool is_target, float eps, int64_t classes, float scale) {
  const float p = expf(sim - lse);
  const float target = (is_target ? 1.0f - eps : 0.0f) + eps / static_cast<float>(classes);
  return scale * (p - target);
}

// Gradient coefficients of one (row b, column j) pair of one direction: the similarity is dot / temp, so the
// dot product's gradient is dsim / temp and temp's is -dsim * sim / temp.
struct PairGrad {
  float ddot;   // dL/d<., .> of the argmax query's dot product
  float dtemp;  // this pair's share of dL/dtemp
};

B2F_HD PairGrad pair_grad(float sim, float lse, bool is_target, float eps, int64_t classes, float scale,
                          float temp) {
  const float d = dsim(sim, lse, is_target, eps, classes, scale);
  return PairGrad{d / temp, -d * sim / temp};
}

// grad_loss * 0.5 / B: loss = 0.5 * (mean over B rows of each direction's CE).
B2F_HD float grad_scale(float grad_loss, int64_t rows) { return grad_loss * 0.5f / static_cast<float>(rows); }

}  // namespace itc
}  // namespace blip2fast
