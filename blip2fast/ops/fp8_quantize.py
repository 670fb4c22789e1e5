"""Row-wise float8 (e4m3fn) quantisation of the activations of the FP8 frozen linears (blip2fast/models/fp8.py):
`quantize_rows(x)` -> (q, scale) with x ~= q * scale, one scale per row (token):

    scale[r] = max(amax_k |x[r, k]| / 448, 1e-12)     float32, shape (rows, 1)
    q[r, k]  = e4m3fn(float32(x[r, k]) / scale[r])     IEEE division, then round to nearest even

With `gelu=True` the rows are F.gelu(x) (exact erf form, computed in float32 and rounded to x's dtype, as torch
does) before quantisation: the FP8 MLP's fc2 input, so the activation is never written to memory in x's dtype.

The reference below is the definition (the same values the earlier upcast / abs / amax / divide / cast passes
gave, in three full-size kernels instead of five: the inf-norm reads x in its own dtype and the division
promotes it on the fly). The Triton backend (kernels/fp8_quantize.py) does it in one pass, bit for bit without
gelu; with gelu, its erf (libdevice on the GPU, numpy under the interpreter) may differ from torch's by an ulp.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch, kernel_cost

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite e4m3fn value
TINY = 1e-12  # floor of a scale: an all-zero row quantises to zeros instead of NaN


def quantize_rows_ref(x: Tensor, gelu: bool = False, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                      eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """The definition: x (rows, K) of any float dtype -> (e4m3fn (rows, K), float32 scale (rows, 1)). weight and
    bias (K,): x is first layer_norm(x, weight, bias, eps) in x's dtype (float32 inside, autocast off)."""
    if weight is not None:
        with torch.autocast(x.device.type, enabled=False):
            x = F.layer_norm(x, (x.shape[1],), weight, bias, eps)
    if gelu:
        x = F.gelu(x)
    amax = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True, dtype=torch.float32)  # max |x|, exact
    scale = (amax / E4M3_MAX).clamp(min=TINY)
    return torch.div(x, scale).to(E4M3), scale


# ---------------------------------------------------------------------------------------------------------------
# Public op: backends chosen by argument > BLIP2FAST_BACKEND > automatic (ops/dispatch.py).
#   "torch":  quantize_rows_ref (any device and float dtype)
#   "triton": kernels/fp8_quantize.py behind the custom op blip2fast::fp8_quantize_rows (custom_op +
#             register_fake, so torch.compile(fullgraph=True), CUDA graphs and the cost model see one kernel);
#             CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests); fp32/fp16/bf16 (bf16 on CUDA only);
#             rows up to kernels.fp8_quantize.MAX_K wide, unit column stride.
# Automatic: torch on the CPU; on CUDA the order the GPU check measured fastest (dispatch.gpu_order), torch until
# then. No autograd: the FP8 linears quantise inside their own autograd.Function (frozen weights).

BACKENDS = ("torch", "triton")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_K = 16384  # kernels/fp8_quantize.py MAX_K (kept here so dispatch never imports triton to decide)


def _triton_unsupported(x: Tensor) -> list[str]:
    reasons = dispatch.triton_reasons("fp8_quantize", x, dtypes=TRITON_DTYPES)
    if x.shape[1] > MAX_K:
        reasons.append(f"row width {x.shape[1]} > {MAX_K} (one row must fit in registers)")
    if x.shape[1] > 1 and x.stride(1) != 1:
        reasons.append(f"rows must be contiguous (column stride {x.stride(1)})")
    return reasons


def _choose_backend(x: Tensor, backend: Optional[str]) -> str:
    return dispatch.choose_backend(
        "fp8_quantize_rows", backend,
        {"torch": lambda: [], "triton": lambda: _triton_unsupported(x)},
        automatic=dispatch.gpu_order("fp8_quantize_rows", ("torch",)) if x.device.type == "cuda" else ("torch",),
        what="FP8 quantisation",
    )


@torch.library.custom_op("blip2fast::fp8_quantize_rows", mutates_args=(), device_types=("cpu", "cuda"))
def _quantize_rows_op(x: Tensor, gelu: bool, weight: Optional[Tensor], bias: Optional[Tensor],
                      eps: float) -> tuple[Tensor, Tensor]:
    """Triton: (q (rows, K) e4m3fn, scale (rows, 1) float32)."""
    module, why = dispatch.triton_kernels("fp8_quantize")
    if module is None:
        raise RuntimeError(why)
    q = torch.empty(x.shape, dtype=E4M3, device=x.device)
    scale = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    module.quantize_rows(x, q, scale, gelu, weight, bias, eps)
    return q, scale


@_quantize_rows_op.register_fake
def _quantize_rows_fake(x, gelu, weight, bias, eps):
    return x.new_empty(x.shape, dtype=E4M3), x.new_empty((x.shape[0], 1), dtype=torch.float32)


@kernel_cost.register("blip2fast::fp8_quantize_rows")
def _quantize_rows_cost(x, gelu, weight, bias, eps):
    # one pass: x in once (the row stays in registers, the norm or gelu applied there), one byte per element and a
    # float32 scale per row out
    return kernel_cost.KernelCost(bytes_read=kernel_cost.nbytes(x, weight, bias),
                                  bytes_written=x.numel() + 4.0 * x.shape[0])


def quantize_rows(x: Tensor, backend: Optional[str] = None, gelu: bool = False, weight: Optional[Tensor] = None,
                  bias: Optional[Tensor] = None, eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """(e4m3fn (rows, K), float32 scale (rows, 1)) with x ~= q * scale (gelu: F.gelu(x) ~= q * scale; weight and
    bias: layer_norm(x) ~= q * scale): the semantics of `quantize_rows_ref`. x: (rows, K) float. backend: "torch" |
    "triton" | None (BLIP2FAST_BACKEND, else automatic)."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows takes a 2-D (rows, K) tensor; got shape {tuple(x.shape)}")
    if (weight is None) != (bias is None) or (weight is not None and weight.shape != (x.shape[1],)):
        raise ValueError(f"quantize_rows: give both LayerNorm weight and bias of shape ({x.shape[1]},) or neither")
    if _choose_backend(x, backend) == "torch":
        return quantize_rows_ref(x, gelu, weight, bias, eps)
    return _quantize_rows_op(x, bool(gelu), weight, bias, float(eps))
