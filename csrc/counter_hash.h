// Counter-based random numbers and the ITM per-row draw, shared by the C++ (CPU) and CUDA paths.
//
// This is the C++/CUDA twin of blip2fast/ops/hashing.py; the definitions there are the spec and every function
// here must return bit-identical values:
//
//   mix32(x):  x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16   (uint32 wrap)
//   hash(k0..kn):  h = 0x9E3779B9; for k in keys: h = mix32(h ^ (k mod 2**32))
//   uniform(h) = ((h >> 8) + 0.5) / 2**24          (float32, exact)
//   gumbel(h)  = float32(-log(-log(uniform(h))))   (evaluated in double, rounded once)
//   keep(h, t) = (h >> 8) >= t                     (dropout as an integer compare)
//
// Plain C++ with no torch and no CUDA headers, so g++ compiles it as is; under nvcc every function is also
// __device__. Never build this with -ffast-math / --use_fast_math: the gumbel noise must be IEEE double.
#pragma once

#include <stdint.h>
#include <string.h>
#include <math.h>

#include "host_device.h"

namespace blip2fast {

constexpr uint32_t kGolden = 0x9E3779B9u;
constexpr uint32_t kMixC1 = 0x7FEB352Du;
constexpr uint32_t kMixC2 = 0x846CA68Bu;

// The lowbias32 integer mixer (a bijection of uint32).
B2F_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMixC1;
  x ^= x >> 15;
  x *= kMixC2;
  x ^= x >> 16;
  return x;
}

// A key is taken mod 2**32: the low 32 bits of its two's complement, as `k & 0xFFFFFFFF` does in Python.
B2F_HD uint32_t key32(int64_t k) { return static_cast<uint32_t>(static_cast<uint64_t>(k)); }

// One step of hash(k0, ..., kn): h = mix32(h ^ k).
B2F_HD uint32_t hash_combine(uint32_t h, uint32_t k) { return mix32(h ^ k); }

// hash(seed_lo, seed_hi, step, stream): the leading keys every stream starts with (hashing.seed_keys).
B2F_HD uint32_t hash_prefix(int64_t seed, int64_t step, int64_t stream) {
  uint32_t h = kGolden;
  h = hash_combine(h, key32(seed));                                   // seed_lo
  h = hash_combine(h, static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32));  // seed_hi
  h = hash_combine(h, key32(step));
  h = hash_combine(h, key32(stream));
  return h;
}

// hash(k[0], ..., k[n-1]) for callers that have all keys at hand (tests, dropout sites).
B2F_HD uint32_t counter_hash(const int64_t* keys, int n) {
  uint32_t h = kGolden;
  for (int i = 0; i < n; ++i) h = hash_combine(h, key32(keys[i]));
  return h;
}

// 24-bit uniform strictly inside (0, 1); exact in float32.
B2F_HD float uniform_from_hash(uint32_t h) {
  return (static_cast<float>(h >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

// Standard Gumbel noise: double precision, rounded once to float (so backends whose float log differs by an
// ulp still agree). Result lies in about [-2.85, 17.33]: always finite.
B2F_HD float gumbel_from_hash(uint32_t h) {
  const double u = (static_cast<double>(h >> 8) + 0.5) * (1.0 / 16777216.0);
  return static_cast<float>(-log(-log(u)));
}

// Integer dropout threshold round(p * 2**24) is computed by the caller (hashing.dropout_threshold).
B2F_HD bool dropout_keep(uint32_t h, uint32_t threshold) { return (h >> 8) >= threshold; }

// Finite test on the bit pattern: immune to -ffinite-math-only and identical on host and device.
B2F_HD bool is_finite_f32(float x) {
#if defined(__CUDA_ARCH__)
  const uint32_t bits = __float_as_uint(x);
#else
  uint32_t bits;
  memcpy(&bits, &x, sizeof(bits));
#endif
  return (bits & 0x7F800000u) != 0x7F800000u;
}

// Running argmax of (score, index): larger score wins, equal scores go to the smaller index, as torch.argmax
// returns the first maximal index. index < 0 means "nothing seen yet". Merging is associative and commutative,
// so any split of the columns (one thread, a CUDA block) gives the same answer.
struct ArgMax {
  float score;
  int64_t index;

  B2F_HD static ArgMax empty() { return ArgMax{0.0f, -1}; }

  B2F_HD void offer(float s, int64_t j) {
    if (index < 0 || s > score || (s == score && j < index)) {
      score = s;
      index = j;
    }
  }
  B2F_HD void merge(const ArgMax& o) {
    if (o.index >= 0) offer(o.score, o.index);
  }
};

// The state of one row's draw:
//   drawn:    argmax of float(sim) + gumbel over candidates (finite and not the positive)
//   fallback: argmax of gumbel over every column but the positive (used when the row has no candidate)
struct RowDraw {
  ArgMax drawn;
  ArgMax fallback;

  B2F_HD static RowDraw empty() { return RowDraw{ArgMax::empty(), ArgMax::empty()}; }

  // Column j of a row whose hash prefix (… , row_id) is row_hash, with logit x (already float32).
  B2F_HD void offer(int64_t j, float x, int64_t positive, uint32_t row_hash) {
    if (j == positive) return;
    const float g = gumbel_from_hash(hash_combine(row_hash, key32(j)));
    fallback.offer(g, j);
    if (is_finite_f32(x)) drawn.offer(x + g, j);  // float32 add, as the reference does
  }
  B2F_HD void merge(const RowDraw& o) {
    drawn.merge(o.drawn);
    fallback.merge(o.fallback);
  }
  B2F_HD bool used_fallback() const { return drawn.index < 0; }
  // With at least two columns there is always a non-positive column, so the result is a valid column.
  B2F_HD int64_t result() const { return drawn.index >= 0 ? drawn.index : fallback.index; }
};

// Visit columns begin, begin + stride, ... < cols of one row; load(j) returns the logit of column j as float.
// The C++ path calls it with (0, 1); a CUDA thread with (threadIdx.x, blockDim.x) before a block merge.
template <typename Load>
B2F_HD RowDraw draw_row_columns(const Load& load, int64_t begin, int64_t stride, int64_t cols, int64_t positive,
                                uint32_t row_hash) {
  RowDraw d = RowDraw::empty();
  for (int64_t j = begin; j < cols; j += stride) d.offer(j, load(j), positive, row_hash);
  return d;
}

}  // namespace blip2fast
