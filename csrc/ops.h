// Shared by the CPU (ops.cpp) and CUDA (ops_cuda.cpp) implementations of the blip2fast ops.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <tuple>

namespace blip2fast {

// Checks the inputs of blip2fast::itm_sample_negatives (shapes, dtypes, devices) with messages that name the
// offending value; `where` is the implementation's device ("CPU" or "CUDA") for the device message.
void check_itm_sample_inputs(const at::Tensor& sim, const at::Tensor& positive, const at::Tensor& row_ids,
                             const at::Tensor& seed_step, const char* where);

// blip2fast::itc_loss_fwd / itc_loss_bwd (itc_loss_cpu.cpp): input checks shared by the CPU and CUDA
// implementations (shapes, dtypes, contiguity, devices, label_smoothing range; no tensor values, so no sync).
void check_itc_inputs(const at::Tensor& image_feats, const at::Tensor& text_feat, const at::Tensor& image_all,
                      const at::Tensor& text_all, const at::Tensor& temp, const at::Tensor& targets,
                      double label_smoothing, const char* where);
void check_itc_bwd_inputs(const at::Tensor& grad_loss, const at::Tensor& image_feats, const at::Tensor& text_feat,
                          const at::Tensor& image_all, const at::Tensor& text_all, const at::Tensor& temp,
                          const at::Tensor& targets, double label_smoothing, const at::Tensor& sim_i2t,
                          const at::Tensor& sim_t2i, const at::Tensor& arg_i2t, const at::Tensor& arg_t2i,
                          const at::Tensor& lse, const c10::List<bool>& output_mask, const char* where);

// The CPU implementations (itc_loss_cpu.cpp), registered in ops.cpp.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> itc_loss_fwd_cpu(
    const at::Tensor& image_feats, const at::Tensor& text_feat, const at::Tensor& image_all,
    const at::Tensor& text_all, const at::Tensor& temp, const at::Tensor& targets, double label_smoothing);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> itc_loss_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& image_feats, const at::Tensor& text_feat,
    const at::Tensor& image_all, const at::Tensor& text_all, const at::Tensor& temp, const at::Tensor& targets,
    double label_smoothing, const at::Tensor& sim_i2t, const at::Tensor& sim_t2i, const at::Tensor& arg_i2t,
    const at::Tensor& arg_t2i, const at::Tensor& lse, c10::List<bool> output_mask);

// The hashed attention-dropout keep mask (dropout_mask_cpu.cpp), registered in ops.cpp; its input checks are shared
// with the CUDA implementation (ops_cuda.cpp).
void check_attention_dropout_keep_inputs(const at::Tensor& seed_step, const at::Tensor& row_ids, int64_t heads,
                                         int64_t q_len, int64_t k_len, int64_t threshold);
at::Tensor attention_dropout_keep_cpu(const at::Tensor& seed_step, const at::Tensor& row_ids, int64_t stream,
                                      int64_t site, int64_t heads, int64_t q_len, int64_t k_len, int64_t q_offset,
                                      int64_t threshold);

}  // namespace blip2fast
