// blip2fast::attention_dropout_keep (CPU): the hashed attention-dropout keep mask of
// blip2fast/ops/attention.py:dropout_keep_mask (the spec), in one pass instead of PyTorch's ~18 elementwise passes
// over int64 tensors. keep[b, h, i, j] = (hash(seed_lo, seed_hi, step, STREAM_ATTN_DROPOUT, site, row_ids[b], h,
// i + q_offset, j) >> 8) >= threshold, with counter_hash.h's hash (the one the Triton and CUDA kernels use).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "counter_hash.h"
#include "ops.h"

namespace blip2fast {

void check_attention_dropout_keep_inputs(const at::Tensor& seed_step, const at::Tensor& row_ids, int64_t heads,
                                         int64_t q_len, int64_t k_len, int64_t threshold) {
  TORCH_CHECK_VALUE(seed_step.dim() == 1 && seed_step.size(0) == 2 && seed_step.scalar_type() == at::kLong,
                    "attention_dropout_keep: seed_step must be an int64 tensor [seed, step] of shape (2,), got ",
                    seed_step.scalar_type(), " ", seed_step.sizes());
  TORCH_CHECK_VALUE(row_ids.dim() == 1 && row_ids.scalar_type() == at::kLong,
                    "attention_dropout_keep: row_ids must be int64 of shape (B,), got ", row_ids.scalar_type(), " ",
                    row_ids.sizes());
  TORCH_CHECK_VALUE(heads >= 0 && q_len >= 0 && k_len >= 0, "attention_dropout_keep: heads, q_len, k_len must be "
                    ">= 0, got ", heads, ", ", q_len, ", ", k_len);
  TORCH_CHECK_VALUE(threshold >= 0 && threshold <= (int64_t{1} << 24), "attention_dropout_keep: threshold must be "
                    "in [0, 2**24] (hashing.dropout_threshold), got ", threshold);
  TORCH_CHECK_VALUE(row_ids.device() == seed_step.device(), "attention_dropout_keep: row_ids on ", row_ids.device(),
                    ", seed_step on ", seed_step.device(), "; put them on one device");
}

at::Tensor attention_dropout_keep_cpu(const at::Tensor& seed_step, const at::Tensor& row_ids, int64_t stream,
                                      int64_t site, int64_t heads, int64_t q_len, int64_t k_len, int64_t q_offset,
                                      int64_t threshold) {
  check_attention_dropout_keep_inputs(seed_step, row_ids, heads, q_len, k_len, threshold);
  const at::Tensor ss = seed_step.contiguous();
  const at::Tensor rows = row_ids.contiguous();
  const int64_t* s = ss.const_data_ptr<int64_t>();
  const int64_t* r = rows.const_data_ptr<int64_t>();
  const int64_t B = rows.size(0);
  at::Tensor keep = at::empty({B, heads, q_len, k_len}, row_ids.options().dtype(at::kBool));
  bool* out = keep.mutable_data_ptr<bool>();
  const uint32_t prefix = hash_combine(hash_prefix(s[0], s[1], stream), key32(site));
  const uint32_t thr = static_cast<uint32_t>(threshold);
  // one task per (b, h, i) row of k_len keys; the hash state shared by a row is computed once
  at::parallel_for(0, B * heads * q_len, std::max<int64_t>(1, 16384 / std::max<int64_t>(k_len, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t % q_len, bh = t / q_len, h = bh % heads, b = bh / heads;
      uint32_t state = hash_combine(prefix, key32(r[b]));
      state = hash_combine(state, key32(h));
      state = hash_combine(state, key32(i + q_offset));
      bool* row = out + t * k_len;
      for (int64_t j = 0; j < k_len; ++j) row[j] = dropout_keep(hash_combine(state, key32(j)), thr);
    }
  });
  return keep;
}

}  // namespace blip2fast
