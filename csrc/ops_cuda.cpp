// CUDA implementations of the blip2fast ops (compiled only in the CUDA build): check the tensors, take the current
// stream, call the plain-pointer launchers of the .cu files. Nothing here synchronises with the host.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

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

}  // namespace
}  // namespace blip2fast

TORCH_LIBRARY_IMPL(blip2fast, CUDA, m) {
  m.impl("itm_sample_negatives", &blip2fast::itm_sample_negatives_cuda_impl);
}
