// Shared by the CPU (ops.cpp) and CUDA (ops_cuda.cpp) implementations of the blip2fast ops.
#pragma once

#include <ATen/core/Tensor.h>

namespace blip2fast {

// Checks the inputs of blip2fast::itm_sample_negatives (shapes, dtypes, devices) with messages that name the
// offending value; `where` is the implementation's device ("CPU" or "CUDA") for the device message.
void check_itm_sample_inputs(const at::Tensor& sim, const at::Tensor& positive, const at::Tensor& row_ids,
                             const at::Tensor& seed_step, const char* where);

}  // namespace blip2fast
