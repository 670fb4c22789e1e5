// blip2fast::itc_loss_fwd / itc_loss_bwd: input checks (shared with the CUDA implementation) and the C++ CPU
// implementation. The per-element math is itc_loss.h, the code the CUDA kernels run, and the loops keep the CUDA
// kernels' accumulation order (dot products over the feature index, gradients over the other batch index in
// increasing order), so similarities and argmaxes match the GPU bit for bit and everything else to a few ulp.
// Registered in ops.cpp (schema + CPU) and ops_cuda.cpp (CUDA).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <utility>
#include <vector>

#include "itc_loss.h"
#include "ops.h"

namespace blip2fast {
namespace {

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* where) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "itc_loss (", where, "): ", name, " is on ", t.device(),
                    " but image_feats is on ", ref.device(), "; put every input on one device");
}

void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "itc_loss: ", name, " must be contiguous (call .contiguous() first), got ",
                    "shape ", t.sizes(), " strides ", t.strides());
}

// (B, Ba) float32 / int32 saved forward outputs.
void check_saved(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
                 const at::Tensor& ref, const char* where) {
  TORCH_CHECK_VALUE(t.scalar_type() == dtype && t.sizes() == shape, "itc_loss_bwd: ", name, " must be ", dtype,
                    " of shape ", shape, " (as itc_loss_fwd returns it), got ", t.scalar_type(), " ", t.sizes());
  check_contiguous(t, name);
  check_same_device(t, name, ref, where);
}

}  // namespace

void check_itc_inputs(const at::Tensor& image_feats, const at::Tensor& text_feat, const at::Tensor& image_all,
                      const at::Tensor& text_all, const at::Tensor& temp, const at::Tensor& targets,
                      double label_smoothing, const char* where) {
  TORCH_CHECK_VALUE(image_feats.dim() == 3, "itc_loss: image_feats must be 3-D (B, Q, E), got shape ",
                    image_feats.sizes());
  TORCH_CHECK_VALUE(text_feat.dim() == 2, "itc_loss: text_feat must be 2-D (B, E), got shape ", text_feat.sizes());
  TORCH_CHECK_VALUE(image_all.dim() == 3, "itc_loss: image_all must be 3-D (Ba, Q, E), got shape ",
                    image_all.sizes());
  TORCH_CHECK_VALUE(text_all.dim() == 2, "itc_loss: text_all must be 2-D (Ba, E), got shape ", text_all.sizes());
  const int64_t B = image_feats.size(0), Q = image_feats.size(1), E = image_feats.size(2);
  const int64_t Ba = image_all.size(0);
  TORCH_CHECK_VALUE(B >= 1 && Q >= 1 && E >= 1, "itc_loss: image_feats (B, Q, E) must have B, Q, E >= 1, got ",
                    image_feats.sizes());
  TORCH_CHECK_VALUE(text_feat.size(0) == B && text_feat.size(1) == E, "itc_loss: text_feat must be (B, E) = (", B,
                    ", ", E, ") to match image_feats ", image_feats.sizes(), ", got ", text_feat.sizes());
  TORCH_CHECK_VALUE(Ba >= 1 && image_all.size(1) == Q && image_all.size(2) == E,
                    "itc_loss: image_all must be (Ba, Q, E) with Ba >= 1 and Q = ", Q, ", E = ", E,
                    " as image_feats ", image_feats.sizes(), ", got ", image_all.sizes());
  TORCH_CHECK_VALUE(text_all.size(0) == Ba && text_all.size(1) == E, "itc_loss: text_all must be (Ba, E) = (", Ba,
                    ", ", E, ") to match image_all ", image_all.sizes(), ", got ", text_all.sizes());
  TORCH_CHECK_VALUE(Ba <= INT32_MAX && Q <= 65535, "itc_loss: at most 2**31-1 gathered rows and 65535 queries, got "
                    "Ba = ", Ba, ", Q = ", Q);

  const auto dt = image_feats.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "itc_loss (", where,
                   "): features must be float32, float16 or bfloat16, got ", dt,
                   " (the torch backend takes float64)");
  const std::pair<const char*, const at::Tensor*> feats[] = {
      {"image_feats", &image_feats}, {"text_feat", &text_feat}, {"image_all", &image_all}, {"text_all", &text_all}};
  for (const auto& [name, t] : feats) {
    TORCH_CHECK_TYPE(t->scalar_type() == dt, "itc_loss: ", name, " is ", t->scalar_type(), " but image_feats is ",
                     dt, "; cast the four feature tensors to one dtype");
    check_contiguous(*t, name);
    check_same_device(*t, name, image_feats, where);
  }
  TORCH_CHECK_VALUE(temp.dim() == 0 && temp.scalar_type() == at::kFloat,
                    "itc_loss: temp must be a 0-dim float32 tensor (the clamped temperature), got ",
                    temp.scalar_type(), " of shape ", temp.sizes());
  check_same_device(temp, "temp", image_feats, where);
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == B && targets.scalar_type() == at::kLong,
                    "itc_loss: targets must be int64 of shape (", B, ",) (the global column of each row's "
                    "positive), got ", targets.scalar_type(), " ", targets.sizes());
  check_contiguous(targets, "targets");
  check_same_device(targets, "targets", image_feats, where);
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "itc_loss: label_smoothing must be in [0, 1], got ", label_smoothing);
}

void check_itc_bwd_inputs(const at::Tensor& grad_loss, const at::Tensor& image_feats, const at::Tensor& text_feat,
                          const at::Tensor& image_all, const at::Tensor& text_all, const at::Tensor& temp,
                          const at::Tensor& targets, double label_smoothing, const at::Tensor& sim_i2t,
                          const at::Tensor& sim_t2i, const at::Tensor& arg_i2t, const at::Tensor& arg_t2i,
                          const at::Tensor& lse, const c10::List<bool>& output_mask, const char* where) {
  check_itc_inputs(image_feats, text_feat, image_all, text_all, temp, targets, label_smoothing, where);
  TORCH_CHECK_VALUE(output_mask.size() == 5, "itc_loss_bwd: output_mask must hold 5 bools (image_feats, text_feat, "
                    "image_all, text_all, temp), got ", output_mask.size());
  TORCH_CHECK_VALUE(grad_loss.dim() == 0 && grad_loss.scalar_type() == at::kFloat,
                    "itc_loss_bwd: grad_loss must be a 0-dim float32 tensor, got ", grad_loss.scalar_type(),
                    " of shape ", grad_loss.sizes());
  check_same_device(grad_loss, "grad_loss", image_feats, where);
  const int64_t B = image_feats.size(0), Ba = image_all.size(0);
  check_saved(sim_i2t, "sim_i2t", at::kFloat, {B, Ba}, image_feats, where);
  check_saved(sim_t2i, "sim_t2i", at::kFloat, {B, Ba}, image_feats, where);
  check_saved(arg_i2t, "arg_i2t", at::kInt, {B, Ba}, image_feats, where);
  check_saved(arg_t2i, "arg_t2i", at::kInt, {B, Ba}, image_feats, where);
  check_saved(lse, "lse", at::kFloat, {2, B}, image_feats, where);
}

namespace {

// Contiguous float32 copy (fp16/bf16 widen exactly; float32 input is returned as is).
at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

void check_target_values(const at::Tensor& targets, int64_t Ba) {
  const int64_t* t = targets.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < targets.size(0); ++b) {
    TORCH_CHECK_VALUE(t[b] >= 0 && t[b] < Ba, "itc_loss: targets[", b, "] = ", t[b], " is outside [0, Ba = ", Ba,
                      "): each target is the global column of its row's positive pair");
  }
}

void check_arg_values(const at::Tensor& arg, const char* name, int64_t Q) {
  const int32_t* a = arg.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < arg.numel(); ++i) {
    TORCH_CHECK_VALUE(a[i] >= 0 && a[i] < Q, "itc_loss_bwd: ", name, " holds ", a[i], " at flat index ", i,
                      ", outside [0, Q = ", Q, "): pass the argmax tensors itc_loss_fwd returned");
  }
}

// Rows per parallel task so that each task does ~1M multiply-adds.
int64_t grain_for(int64_t work_per_row) { return std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, work_per_row)); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> itc_loss_fwd_cpu(
    const at::Tensor& image_feats, const at::Tensor& text_feat, const at::Tensor& image_all,
    const at::Tensor& text_all, const at::Tensor& temp, const at::Tensor& targets, double label_smoothing) {
  check_itc_inputs(image_feats, text_feat, image_all, text_all, temp, targets, label_smoothing, "CPU");
  const int64_t B = image_feats.size(0), Q = image_feats.size(1), E = image_feats.size(2);
  const int64_t Ba = image_all.size(0);
  check_target_values(targets, Ba);
  const at::Tensor imf = as_float(image_feats), txf = as_float(text_feat);
  const at::Tensor ima = as_float(image_all), txa = as_float(text_all);
  const float* IF = imf.const_data_ptr<float>();  // (B, Q, E)
  const float* TF = txf.const_data_ptr<float>();  // (B, E)
  const float* IA = ima.const_data_ptr<float>();  // (Ba, Q, E)
  const float* TA = txa.const_data_ptr<float>();  // (Ba, E)
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  const float t = *temp.const_data_ptr<float>();
  const float eps = static_cast<float>(label_smoothing);

  const auto fopts = image_feats.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({}, fopts);
  at::Tensor sim_i2t = at::empty({B, Ba}, fopts), sim_t2i = at::empty({B, Ba}, fopts);
  at::Tensor arg_i2t = at::empty({B, Ba}, fopts.dtype(at::kInt)), arg_t2i = at::empty({B, Ba}, fopts.dtype(at::kInt));
  at::Tensor lse = at::empty({2, B}, fopts);
  float* s_i2t = sim_i2t.mutable_data_ptr<float>();
  float* s_t2i = sim_t2i.mutable_data_ptr<float>();
  int32_t* a_i2t = arg_i2t.mutable_data_ptr<int32_t>();
  int32_t* a_t2i = arg_t2i.mutable_data_ptr<int32_t>();
  float* lse_p = lse.mutable_data_ptr<float>();
  std::vector<float> ce(static_cast<size_t>(2 * B));

  at::parallel_for(0, B, grain_for(2 * Ba * Q * E), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t j = 0; j < Ba; ++j) {
        itc::MaxQ i2t = itc::MaxQ::empty(), t2i = itc::MaxQ::empty();
        for (int64_t q = 0; q < Q; ++q) {
          i2t.offer(itc::dot_f32(IF + (b * Q + q) * E, TA + j * E, E), static_cast<int32_t>(q));
          t2i.offer(itc::dot_f32(TF + b * E, IA + (j * Q + q) * E, E), static_cast<int32_t>(q));
        }
        s_i2t[b * Ba + j] = i2t.value / t;
        a_i2t[b * Ba + j] = i2t.q;
        s_t2i[b * Ba + j] = t2i.value / t;
        a_t2i[b * Ba + j] = t2i.q;
      }
      const float* rows[2] = {s_i2t + b * Ba, s_t2i + b * Ba};
      for (int dir = 0; dir < 2; ++dir) {
        itc::OnlineLse state = itc::OnlineLse::empty();
        float sum = 0.0f;
        for (int64_t j = 0; j < Ba; ++j) {
          state.offer(rows[dir][j]);
          sum += rows[dir][j];
        }
        const float value = state.value();
        lse_p[dir * B + b] = value;
        ce[dir * B + b] = itc::smoothed_ce(value, rows[dir][tgt[b]], sum, eps, Ba);
      }
    }
  });
  float total = 0.0f;
  for (float c : ce) total += c;
  *loss.mutable_data_ptr<float>() = (0.5f / static_cast<float>(B)) * total;
  return {loss, sim_i2t, sim_t2i, arg_i2t, arg_t2i, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> itc_loss_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& image_feats, const at::Tensor& text_feat,
    const at::Tensor& image_all, const at::Tensor& text_all, const at::Tensor& temp, const at::Tensor& targets,
    double label_smoothing, const at::Tensor& sim_i2t, const at::Tensor& sim_t2i, const at::Tensor& arg_i2t,
    const at::Tensor& arg_t2i, const at::Tensor& lse, c10::List<bool> output_mask) {
  check_itc_bwd_inputs(grad_loss, image_feats, text_feat, image_all, text_all, temp, targets, label_smoothing,
                       sim_i2t, sim_t2i, arg_i2t, arg_t2i, lse, output_mask, "CPU");
  const int64_t B = image_feats.size(0), Q = image_feats.size(1), E = image_feats.size(2);
  const int64_t Ba = image_all.size(0);
  check_target_values(targets, Ba);
  check_arg_values(arg_i2t, "arg_i2t", Q);
  check_arg_values(arg_t2i, "arg_t2i", Q);
  const bool need_if = output_mask[0], need_tf = output_mask[1], need_ia = output_mask[2];
  const bool need_ta = output_mask[3], need_temp = output_mask[4];

  const at::Tensor imf = as_float(image_feats), txf = as_float(text_feat);
  const at::Tensor ima = as_float(image_all), txa = as_float(text_all);
  const float* IF = imf.const_data_ptr<float>();
  const float* TF = txf.const_data_ptr<float>();
  const float* IA = ima.const_data_ptr<float>();
  const float* TA = txa.const_data_ptr<float>();
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  const float* S_i2t = sim_i2t.const_data_ptr<float>();
  const float* S_t2i = sim_t2i.const_data_ptr<float>();
  const int32_t* A_i2t = arg_i2t.const_data_ptr<int32_t>();
  const int32_t* A_t2i = arg_t2i.const_data_ptr<int32_t>();
  const float* L = lse.const_data_ptr<float>();  // (2, B): i2t then t2i
  const float t = *temp.const_data_ptr<float>();
  const float eps = static_cast<float>(label_smoothing);
  const float scale = itc::grad_scale(*grad_loss.const_data_ptr<float>(), B);

  const auto fopts = image_feats.options().dtype(at::kFloat);
  // Unwanted gradients are empty (0,) tensors and are not computed.
  auto buffer = [&](bool need, at::IntArrayRef shape) { return at::zeros(need ? shape : at::IntArrayRef{0}, fopts); };
  at::Tensor d_if = buffer(need_if, {B, Q, E}), d_tf = buffer(need_tf, {B, E});
  at::Tensor d_ia = buffer(need_ia, {Ba, Q, E}), d_ta = buffer(need_ta, {Ba, E});
  at::Tensor d_temp = at::empty(need_temp ? at::IntArrayRef{} : at::IntArrayRef{0}, fopts);

  // Row part, as the CUDA row kernel: block b walks j in order. d_image_feats[b] from the i2t pairs,
  // d_text_feat[b] from the t2i pairs, and row b's share of d_temp.
  if (need_if || need_tf || need_temp) {
    float* dIF = d_if.mutable_data_ptr<float>();
    float* dTF = d_tf.mutable_data_ptr<float>();
    std::vector<float> dtemp_rows(static_cast<size_t>(B), 0.0f);
    at::parallel_for(0, B, grain_for(2 * Ba * E), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        float dtemp = 0.0f;
        for (int64_t j = 0; j < Ba; ++j) {
          const int64_t idx = b * Ba + j;
          const bool is_target = tgt[b] == j;
          const itc::PairGrad gi = itc::pair_grad(S_i2t[idx], L[b], is_target, eps, Ba, scale, t);
          const itc::PairGrad gt = itc::pair_grad(S_t2i[idx], L[B + b], is_target, eps, Ba, scale, t);
          dtemp += gi.dtemp + gt.dtemp;
          if (need_if) {
            float* out = dIF + (b * Q + A_i2t[idx]) * E;
            const float* src = TA + j * E;
            for (int64_t e = 0; e < E; ++e) out[e] = fmaf(gi.ddot, src[e], out[e]);
          }
          if (need_tf) {
            float* out = dTF + b * E;
            const float* src = IA + (j * Q + A_t2i[idx]) * E;
            for (int64_t e = 0; e < E; ++e) out[e] = fmaf(gt.ddot, src[e], out[e]);
          }
        }
        dtemp_rows[b] = dtemp;
      }
    });
    if (need_temp) {
      float total = 0.0f;
      for (float v : dtemp_rows) total += v;
      *d_temp.mutable_data_ptr<float>() = total;
    }
  }

  // Column part, as the CUDA column kernel: block j walks b in order. d_image_all[j] from the t2i pairs,
  // d_text_all[j] from the i2t pairs.
  if (need_ia || need_ta) {
    float* dIA = d_ia.mutable_data_ptr<float>();
    float* dTA = d_ta.mutable_data_ptr<float>();
    at::parallel_for(0, Ba, grain_for(2 * B * E), [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        for (int64_t b = 0; b < B; ++b) {
          const int64_t idx = b * Ba + j;
          const bool is_target = tgt[b] == j;
          if (need_ia) {
            const itc::PairGrad gt = itc::pair_grad(S_t2i[idx], L[B + b], is_target, eps, Ba, scale, t);
            float* out = dIA + (j * Q + A_t2i[idx]) * E;
            const float* src = TF + b * E;
            for (int64_t e = 0; e < E; ++e) out[e] = fmaf(gt.ddot, src[e], out[e]);
          }
          if (need_ta) {
            const itc::PairGrad gi = itc::pair_grad(S_i2t[idx], L[b], is_target, eps, Ba, scale, t);
            float* out = dTA + j * E;
            const float* src = IF + (b * Q + A_i2t[idx]) * E;
            for (int64_t e = 0; e < E; ++e) out[e] = fmaf(gi.ddot, src[e], out[e]);
          }
        }
      }
    });
  }

  const auto dt = image_feats.scalar_type();
  return {d_if.to(dt), d_tf.to(dt), d_ia.to(dt), d_ta.to(dt), d_temp};
}

}  // namespace blip2fast
