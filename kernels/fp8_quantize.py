"""Row-wise float8 (e4m3fn) quantisation of activations in one pass: the semantics of
blip2fast/ops/fp8_quantize.py:quantize_rows_ref (read it first); this kernel must give identical bits:

    scale[r] = max(amax_k |x[r, k]| / 448, 1e-12)     (float32)
    q[r, k]  = e4m3fn(float32(x[r, k]) / scale[r])     (IEEE division, round to nearest even)

NORM (constexpr): x is first replaced by its LayerNorm over the row (float32 mean, biased variance, 1/sqrt(var + eps),
times W plus B), rounded to x's dtype as the tower's norm (models/vision.py TowerLayerNorm) returns it: qkv's and
fc1's input quantised without the norm's output ever being written. Its reduction order is not aten's, so the
values can differ from torch's layer_norm by an ulp of x's dtype.

GELU (constexpr): x is first replaced by gelu(x) = x/2 (1 + erf(x / sqrt 2)) in float32, rounded to x's dtype as
torch's F.gelu rounds (the FP8 MLP's fc2 input); erf is libdevice's on the GPU (as torch's CUDA gelu), numpy's
under the interpreter (an ulp from torch's CPU erf now and then).

One program per row: the whole row (K <= 16384) is loaded once into registers, reduced to its amax, divided and
written as one byte per element plus the row's float32 scale, where PyTorch reads and writes the row five times.

The e4m3 rounding is done on the float32 bit pattern with integer arithmetic instead of `.to(tl.float8e4nv)`:
the Triton interpreter (CPU tests) rounds a value that carries into the next binade down by a factor of two
(e.g. 124.4 -> 64 instead of 128), and the integer form is exact on both. Values this kernel divides are at most
448 in magnitude (448 * (1 + 2^-23) at worst, which rounds to 448), so saturation never triggers NaN.
"""
from __future__ import annotations

import collections
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_K = 16384  # one row in registers; wider rows take the PyTorch reference
LAUNCHES: collections.Counter = collections.Counter()  # kernel name -> launches in this process
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

E4M3_MAX = 448.0
TINY = 1e-12


@triton.jit
def _e4m3_bits(v):
    """float32 -> e4m3fn bit pattern (uint8 in an int32), round to nearest even, |v| <= 464 assumed."""
    bits = v.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    a = mag.to(tl.float32, bitcast=True)
    # normal range (|v| >= 2^-6): round the 23-bit mantissa to 3 bits (ties to even) on the bit pattern; a carry
    # moves into the exponent as it should. Rebias the exponent from 127 to 7: (127 - 7) << 3 = 960.
    rounded = (mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20
    normal = rounded.to(tl.int32) - 960
    # subnormal range: multiples of 2^-9; adding 2^14 (whose float32 ulp is 2^-9) rounds to one, ties to even
    sub = ((a + 16384.0) - 16384.0) * 512.0
    out = tl.where(a < 0.015625, sub.to(tl.int32), normal)
    out = tl.minimum(out, 0x7E)  # 448: the largest finite e4m3fn
    return out | sign.to(tl.int32)


@triton.jit
def _quantize_rows_kernel(
    X,  # *fp32/fp16/bf16 (rows, K), row stride stride_x, unit column stride
    Q,  # *u8 (rows, K) contiguous out: e4m3fn bits
    S,  # *fp32 (rows,) out: the row scales
    W, B,  # *same as X (K,) LayerNorm weight and bias (NORM only)
    K, stride_x, eps,
    BLOCK_K: tl.constexpr, GELU: tl.constexpr, NORM: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    inside = offs < K
    x = tl.load(X + r * stride_x + offs, mask=inside, other=0.0)
    if NORM:
        f = x.to(tl.float32)
        mean = tl.sum(f, axis=0) / K
        centred = tl.where(inside, f - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / K + eps)
        w = tl.load(W + offs, mask=inside, other=0.0).to(tl.float32)
        b = tl.load(B + offs, mask=inside, other=0.0).to(tl.float32)
        x = (centred * rstd * w + b).to(x.dtype)  # rounded as the tower's norm returns it
    if GELU:
        g = x.to(tl.float32)
        x = (g * 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))).to(x.dtype)  # rounded as torch's gelu
    x = x.to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.maximum(amax / 448.0, 1e-12)
    q = _e4m3_bits(tl.math.div_rn(x, scale))
    tl.store(Q + r * K + offs, q.to(tl.uint8), mask=inside)
    tl.store(S + r, scale)


def _block_k(K: int) -> int:
    return max(16, triton.next_power_of_2(K))


def _warps(block_k: int) -> int:
    return 4 if block_k <= 2048 else 8 if block_k <= 8192 else 16


def quantize_rows(x: Tensor, q: Tensor, scale: Tensor, gelu: bool = False, weight=None, bias=None,
                  eps: float = 0.0) -> None:
    """Fill q (rows, K) float8_e4m3fn and scale (rows, 1) float32 from x (rows, K) (gelu: from F.gelu(x); weight and
    bias: from layer_norm(x, weight, bias, eps)), unit column stride."""
    rows, K = x.shape
    if rows == 0:
        return
    LAUNCHES["quantize_rows"] += 1
    block = _block_k(K)
    norm = weight is not None
    _quantize_rows_kernel[(rows,)](x, q.view(torch.uint8), scale, weight if norm else x, bias if norm else x, K,
                                   x.stride(0), float(eps), BLOCK_K=block, GELU=bool(gelu), NORM=norm,
                                   num_warps=_warps(block))


def aot_cases() -> list:
    """(label, jit_fn, signature, constexprs, attrs, options): the ViT-g widths (1408 in, 6144 in) in bf16."""
    cases = []
    # proj's input; qkv's / fc1's with the LayerNorm in-kernel; fc2's with the GELU in-kernel
    for K, gelu, norm in ((1408, False, False), (1408, False, True), (6144, True, False)):
        block = _block_k(K)
        signature = {"X": "*bf16", "Q": "*u8", "S": "*fp32", "W": "*bf16", "B": "*bf16", "K": "i32",
                     "stride_x": "i32", "eps": "fp32", "BLOCK_K": "constexpr", "GELU": "constexpr",
                     "NORM": "constexpr"}
        cases.append((f"quantize_rows K={K} gelu={gelu} norm={norm}", _quantize_rows_kernel, signature,
                      dict(BLOCK_K=block, GELU=gelu, NORM=norm), {}, dict(num_warps=_warps(block))))
    return cases
