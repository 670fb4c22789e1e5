// CUDA implementations of the blip2fast ops (compiled only in the CUDA build): check the tensors, take the current
// stream, call the plain-pointer launchers of the .cu files. Nothing here synchronises with the host.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dropout_mask.h"
#include "itc_loss_cuda.h"
#include "itm_sampling.h"
#include "ops.h"

namespace blip2fast {
namespace {

std::tuple<at::Tensor, at::Tensor> itm_sample_negatives_cuda_impl(const at::Tensor& sim, const at::Tensor& positive,
                                                                  const at::Tensor& row_ids,
                                                                  const at::Tensor& seed_step, int64_t stream_id) {
  check_itm_sample_inputs(sim, positive, row_ids, seed_step, "CUDA");
  TORCH_CHECK_VALUE(sim.is_cuda(), "itm_sample_negatives (CUDA): sim must be a CUDA tensor, got ", sim.device());
  const c10::cuda::CUDAGuard guard(sim.device());
  const at::Tensor pos = positive.contiguous();
  const at::Tensor ids = row_ids.contiguous();
  const at::Tensor ss = seed_step.contiguous();
  SimDtype dtype;
  switch (sim.scalar_type()) {
    case at::kFloat: dtype = SimDtype::kFloat32; break;
    case at::kHalf: dtype = SimDtype::kFloat16; break;
    case at::kBFloat16: dtype = SimDtype::kBFloat16; break;
    default: TORCH_CHECK(false, "unreachable: dtype checked above");
  }
  at::Tensor neg = at::empty({sim.size(0)}, positive.options());
  at::Tensor n_fallback = at::empty({}, positive.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(sim.device().index()).stream();
  const cudaError_t err = itm_sample_negatives_cuda(
      sim.const_data_ptr(), dtype, sim.size(0), sim.size(1), sim.stride(0), sim.stride(1),
      pos.const_data_ptr<int64_t>(), ids.const_data_ptr<int64_t>(), ss.const_data_ptr<int64_t>(), stream_id,
      neg.mutable_data_ptr<int64_t>(), n_fallback.mutable_data_ptr<int64_t>(), stream);
  TORCH_CHECK(err == cudaSuccess, "itm_sample_negatives (CUDA) launch failed: ", cudaGetErrorString(err));
  return {neg, n_fallback};
}

ItcDtype itc_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ItcDtype::kFloat32;
    case at::kHalf: return ItcDtype::kFloat16;
    case at::kBFloat16: return ItcDtype::kBFloat16;
    default: TORCH_CHECK(false, "unreachable: dtype checked by check_itc_inputs");
  }
}

void check_on_cuda(const at::Tensor& image_feats, const char* op) {
  TORCH_CHECK_VALUE(image_feats.is_cuda(), op, " (CUDA): image_feats must be a CUDA tensor, got ",
                    image_feats.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> itc_loss_fwd_cuda_impl(
    const at::Tensor& image_feats, const at::Tensor& text_feat, const at::Tensor& image_all,
    const at::Tensor& text_all, const at::Tensor& temp, const at::Tensor& targets, double label_smoothing) {
  check_itc_inputs(image_feats, text_feat, image_all, text_all, temp, targets, label_smoothing, "CUDA");
  check_on_cuda(image_feats, "itc_loss_fwd");
  const c10::cuda::CUDAGuard guard(image_feats.device());
  const int64_t B = image_feats.size(0), Q = image_feats.size(1), E = image_feats.size(2);
  const int64_t Ba = image_all.size(0);
  const auto fopts = image_feats.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({}, fopts);
  at::Tensor sim_i2t = at::empty({B, Ba}, fopts), sim_t2i = at::empty({B, Ba}, fopts);
  at::Tensor arg_i2t = at::empty({B, Ba}, fopts.dtype(at::kInt)), arg_t2i = at::empty({B, Ba}, fopts.dtype(at::kInt));
  at::Tensor lse = at::empty({2, B}, fopts);
  at::Tensor ce = at::empty({2, B}, fopts);  // scratch: per-row cross-entropies
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(image_feats.device().index()).stream();
  const cudaError_t err = itc_loss_fwd_cuda(
      image_feats.const_data_ptr(), text_feat.const_data_ptr(), image_all.const_data_ptr(),
      text_all.const_data_ptr(), itc_dtype(image_feats), B, Ba, Q, E, temp.const_data_ptr<float>(),
      targets.const_data_ptr<int64_t>(), static_cast<float>(label_smoothing), loss.mutable_data_ptr<float>(),
      sim_i2t.mutable_data_ptr<float>(), sim_t2i.mutable_data_ptr<float>(), arg_i2t.mutable_data_ptr<int32_t>(),
      arg_t2i.mutable_data_ptr<int32_t>(), lse.mutable_data_ptr<float>(), ce.mutable_data_ptr<float>(), stream);
  TORCH_CHECK(err == cudaSuccess, "itc_loss_fwd (CUDA) launch failed for B=", B, ", Ba=", Ba, ", Q=", Q, ", E=", E,
              ": ", cudaGetErrorString(err));
  return {loss, sim_i2t, sim_t2i, arg_i2t, arg_t2i, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> itc_loss_bwd_cuda_impl(
    const at::Tensor& grad_loss, const at::Tensor& image_feats, const at::Tensor& text_feat,
    const at::Tensor& image_all, const at::Tensor& text_all, const at::Tensor& temp, const at::Tensor& targets,
    double label_smoothing, const at::Tensor& sim_i2t, const at::Tensor& sim_t2i, const at::Tensor& arg_i2t,
    const at::Tensor& arg_t2i, const at::Tensor& lse, c10::List<bool> output_mask) {
  check_itc_bwd_inputs(grad_loss, image_feats, text_feat, image_all, text_all, temp, targets, label_smoothing,
                       sim_i2t, sim_t2i, arg_i2t, arg_t2i, lse, output_mask, "CUDA");
  check_on_cuda(image_feats, "itc_loss_bwd");
  const c10::cuda::CUDAGuard guard(image_feats.device());
  const int64_t B = image_feats.size(0), Q = image_feats.size(1), E = image_feats.size(2);
  const int64_t Ba = image_all.size(0);
  // Unwanted gradients are empty (0,) tensors: the kernels get a null pointer and skip that work.
  auto grad = [&](bool need, at::IntArrayRef shape) {
    return at::empty(need ? shape : at::IntArrayRef{0}, image_feats.options());
  };
  auto ptr = [](bool need, at::Tensor& t) -> void* { return need ? t.mutable_data_ptr() : nullptr; };
  const bool need_if = output_mask[0], need_tf = output_mask[1], need_ia = output_mask[2];
  const bool need_ta = output_mask[3], need_temp = output_mask[4];
  at::Tensor d_if = grad(need_if, {B, Q, E}), d_tf = grad(need_tf, {B, E});
  at::Tensor d_ia = grad(need_ia, {Ba, Q, E}), d_ta = grad(need_ta, {Ba, E});
  const auto fopts = image_feats.options().dtype(at::kFloat);
  at::Tensor d_temp = at::empty(need_temp ? at::IntArrayRef{} : at::IntArrayRef{0}, fopts);
  at::Tensor dtemp_rows = at::empty({need_temp ? B : 0}, fopts);  // scratch: per-row shares of d_temp
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(image_feats.device().index()).stream();
  const cudaError_t err = itc_loss_bwd_cuda(
      grad_loss.const_data_ptr<float>(), image_feats.const_data_ptr(), text_feat.const_data_ptr(),
      image_all.const_data_ptr(), text_all.const_data_ptr(), itc_dtype(image_feats), B, Ba, Q, E,
      temp.const_data_ptr<float>(), targets.const_data_ptr<int64_t>(), static_cast<float>(label_smoothing),
      sim_i2t.const_data_ptr<float>(), sim_t2i.const_data_ptr<float>(), arg_i2t.const_data_ptr<int32_t>(),
      arg_t2i.const_data_ptr<int32_t>(), lse.const_data_ptr<float>(), ptr(need_if, d_if), ptr(need_tf, d_tf),
      ptr(need_ia, d_ia), ptr(need_ta, d_ta), need_temp ? d_temp.mutable_data_ptr<float>() : nullptr,
      need_temp ? dtemp_rows.mutable_data_ptr<float>() : nullptr, stream);
  TORCH_CHECK(err == cudaSuccess, "itc_loss_bwd (CUDA) launch failed for B=", B, ", Ba=", Ba, ", Q=", Q, ", E=", E,
              ": ", cudaGetErrorString(err));
  return {d_if, d_tf, d_ia, d_ta, d_temp};
}

at::Tensor attention_dropout_keep_cuda_impl(const at::Tensor& seed_step, const at::Tensor& row_ids,
                                            int64_t stream_id, int64_t site, int64_t heads, int64_t q_len,
                                            int64_t k_len, int64_t q_offset, int64_t threshold) {
  check_attention_dropout_keep_inputs(seed_step, row_ids, heads, q_len, k_len, threshold);
  TORCH_CHECK_VALUE(row_ids.is_cuda(), "attention_dropout_keep (CUDA): row_ids must be a CUDA tensor, got ",
                    row_ids.device());
  const c10::cuda::CUDAGuard guard(row_ids.device());
  const at::Tensor ss = seed_step.contiguous();
  const at::Tensor rows = row_ids.contiguous();
  at::Tensor keep = at::empty({rows.size(0), heads, q_len, k_len}, row_ids.options().dtype(at::kBool));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(row_ids.device().index()).stream();
  const cudaError_t err = attention_dropout_keep_cuda(
      ss.const_data_ptr<int64_t>(), rows.const_data_ptr<int64_t>(), rows.size(0), stream_id, site, heads, q_len,
      k_len, q_offset, static_cast<uint32_t>(threshold), keep.mutable_data_ptr<bool>(), stream);
  TORCH_CHECK(err == cudaSuccess, "attention_dropout_keep (CUDA) launch failed for B=", rows.size(0), ", heads=",
              heads, ", q_len=", q_len, ", k_len=", k_len, ": ", cudaGetErrorString(err));
  return keep;
}

}  // namespace
}  // namespace blip2fast

TORCH_LIBRARY_IMPL(blip2fast, CUDA, m) {
  m.impl("itm_sample_negatives", &blip2fast::itm_sample_negatives_cuda_impl);
  m.impl("itc_loss_fwd", &blip2fast::itc_loss_fwd_cuda_impl);
  m.impl("itc_loss_bwd", &blip2fast::itc_loss_bwd_cuda_impl);
  m.impl("attention_dropout_keep", &blip2fast::attention_dropout_keep_cuda_impl);
}
