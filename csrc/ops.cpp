// blip2fast::* op schemas (TORCH_LIBRARY) and their CPU implementations; imported from Python as blip2fast._C.
//
// itm_sample_negatives: the C++ twin of blip2fast/ops/itm_sampling.py:itm_sample_negatives_ref (the spec). The
// per-row math is counter_hash.h's draw_row_columns, the same code the CUDA kernel runs. Only light headers here
// (no torch/extension.h) so this file compiles in seconds.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "counter_hash.h"
#include "ops.h"

namespace blip2fast {

void check_itm_sample_inputs(const at::Tensor& sim, const at::Tensor& positive, const at::Tensor& row_ids,
                             const at::Tensor& seed_step, const char* where) {
  TORCH_CHECK_VALUE(sim.dim() == 2, "sim must be 2-D (rows, candidates), got shape ", sim.sizes());
  const auto dt = sim.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
                   "itm_sample_negatives (", where, "): sim must be float32, float16 or bfloat16, got ", dt,
                   " (the torch backend takes any float dtype)");
  const int64_t rows = sim.size(0);
  const int64_t cols = sim.size(1);
  TORCH_CHECK_VALUE(cols >= 2, "ITM negative sampling needs at least 2 candidates per row (the positive and one "
                    "other); got ", cols, " columns. Use a global batch of 2 or more, or skip ITM for this step.");
  TORCH_CHECK_VALUE(cols <= INT32_MAX, "itm_sample_negatives: at most 2**31-1 columns, got ", cols);
  for (const auto& p : {std::make_pair("positive", &positive), std::make_pair("row_ids", &row_ids)}) {
    const at::Tensor& t = *p.second;
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == rows && t.scalar_type() == at::kLong, p.first,
                      " must be int64 of shape (", rows, ",), got ", t.scalar_type(), " ", t.sizes());
  }
  TORCH_CHECK_VALUE(seed_step.dim() == 1 && seed_step.size(0) == 2 && seed_step.scalar_type() == at::kLong,
                    "seed_step must be an int64 tensor of shape (2,) holding [seed, step]; got dtype ",
                    seed_step.scalar_type(), " shape ", seed_step.sizes());
  for (const auto& p : {std::make_pair("positive", &positive), std::make_pair("row_ids", &row_ids),
                        std::make_pair("seed_step", &seed_step)}) {
    TORCH_CHECK_VALUE(p.second->device() == sim.device(), "itm_sample_negatives: ", p.first, " is on ",
                      p.second->device(), " but sim is on ", sim.device(), "; put every input on one device");
  }
}

namespace {

template <typename T>
struct CpuRowLoader {
  const T* row;        // first element of the row
  int64_t col_stride;  // elements between neighbouring columns
  float operator()(int64_t j) const { return static_cast<float>(row[j * col_stride]); }
};

template <typename T>
int64_t sample_rows_cpu(const at::Tensor& sim, const int64_t* positive, const int64_t* row_ids, uint32_t prefix,
                        int64_t* neg) {
  const int64_t rows = sim.size(0), cols = sim.size(1);
  const int64_t rs = sim.stride(0), cs = sim.stride(1);
  const T* base = sim.const_data_ptr<T>();
  std::vector<uint8_t> fell_back(static_cast<size_t>(rows), 0);
  // Each row costs ~cols hashes and two double logs: aim for ~32k columns per task.
  const int64_t grain = std::max<int64_t>(1, 32768 / cols);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint32_t row_hash = hash_combine(prefix, key32(row_ids[r]));
      const CpuRowLoader<T> load{base + r * rs, cs};
      const RowDraw d = draw_row_columns(load, 0, 1, cols, positive[r], row_hash);
      neg[r] = d.result();
      fell_back[r] = d.used_fallback();
    }
  });
  int64_t n = 0;
  for (uint8_t f : fell_back) n += f;
  return n;
}

std::tuple<at::Tensor, at::Tensor> itm_sample_negatives_cpu(const at::Tensor& sim, const at::Tensor& positive,
                                                            const at::Tensor& row_ids, const at::Tensor& seed_step,
                                                            int64_t stream) {
  check_itm_sample_inputs(sim, positive, row_ids, seed_step, "CPU");
  const at::Tensor pos = positive.contiguous();
  const at::Tensor ids = row_ids.contiguous();
  const at::Tensor ss = seed_step.contiguous();
  const int64_t* s = ss.const_data_ptr<int64_t>();
  const uint32_t prefix = hash_prefix(s[0], s[1], stream);

  at::Tensor neg = at::empty({sim.size(0)}, positive.options());
  at::Tensor n_fallback = at::empty({}, positive.options());
  int64_t n = 0;
  switch (sim.scalar_type()) {
    case at::kFloat:
      n = sample_rows_cpu<float>(sim, pos.const_data_ptr<int64_t>(), ids.const_data_ptr<int64_t>(), prefix,
                                 neg.mutable_data_ptr<int64_t>());
      break;
    case at::kHalf:
      n = sample_rows_cpu<c10::Half>(sim, pos.const_data_ptr<int64_t>(), ids.const_data_ptr<int64_t>(), prefix,
                                     neg.mutable_data_ptr<int64_t>());
      break;
    case at::kBFloat16:
      n = sample_rows_cpu<c10::BFloat16>(sim, pos.const_data_ptr<int64_t>(), ids.const_data_ptr<int64_t>(),
                                         prefix, neg.mutable_data_ptr<int64_t>());
      break;
    default:
      TORCH_CHECK(false, "unreachable: dtype checked above");
  }
  *n_fallback.mutable_data_ptr<int64_t>() = n;
  return {neg, n_fallback};
}

}  // namespace
}  // namespace blip2fast

TORCH_LIBRARY(blip2fast, m) {
  // Returns (negative column per row: int64 (rows,), rows that had no finite candidate: int64 ()).
  m.def("itm_sample_negatives(Tensor sim, Tensor positive, Tensor row_ids, Tensor seed_step, int stream) "
        "-> (Tensor, Tensor)");
  // ITC loss (itc_loss_cpu.cpp, itc_loss.cu; contract: the schema below). Returns (loss (), sim_i2t (B, Ba),
  // sim_t2i (B, Ba), arg_i2t (B, Ba) int32, arg_t2i (B, Ba) int32, lse (2, B)); the backward returns the five
  // gradients, an unwanted one (output_mask false) as an empty (0,) tensor.
  m.def("itc_loss_fwd(Tensor image_feats, Tensor text_feat, Tensor image_all, Tensor text_all, Tensor temp, "
        "Tensor targets, float label_smoothing) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("itc_loss_bwd(Tensor grad_loss, Tensor image_feats, Tensor text_feat, Tensor image_all, Tensor text_all, "
        "Tensor temp, Tensor targets, float label_smoothing, Tensor sim_i2t, Tensor sim_t2i, Tensor arg_i2t, "
        "Tensor arg_t2i, Tensor lse, bool[] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Hashed attention-dropout keep mask (B, heads, q_len, k_len) bool (dropout_mask_cpu.cpp); the spec is
  // blip2fast/ops/attention.py:dropout_keep_mask.
  m.def("attention_dropout_keep(Tensor seed_step, Tensor row_ids, int stream, int site, int heads, int q_len, "
        "int k_len, int q_offset, int threshold) -> Tensor");
}

TORCH_LIBRARY_IMPL(blip2fast, CPU, m) {
  m.impl("itm_sample_negatives", &blip2fast::itm_sample_negatives_cpu);
  m.impl("itc_loss_fwd", &blip2fast::itc_loss_fwd_cpu);
  m.impl("itc_loss_bwd", &blip2fast::itc_loss_bwd_cpu);
  m.impl("attention_dropout_keep", &blip2fast::attention_dropout_keep_cpu);
}

// An importable, empty Python module: `import blip2fast._C` runs the static registrations above. No pybind11
// (torch/extension.h would cost a minute per compile).
static struct PyModuleDef blip2fast_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "blip2fast C++/CUDA ops, registered as torch.ops.blip2fast.*", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&blip2fast_c_module); }
