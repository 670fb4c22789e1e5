"""LayerNorm with an optional fused residual: `layer_norm(x, weight, bias, eps, residual)` = F.layer_norm(x + residual).

The Q-Former is a post-LN BERT: every attention and FFN block ends in `LayerNorm(dense_output + input)`. The Triton
backend (kernels/layer_norm.py) reads x and residual once and never materialises their sum; statistics and the
affine transform are fp32 whatever the input dtype; the backward gives d(x + residual) once (it is both dx and
dresidual) and dweight, dbias from per-program partial sums (deterministic, no atomics).

Output dtype: the dtype of x + residual (type promotion), or float32 under CUDA autocast (which runs layer_norm in
float32; x + residual of a bf16 dense output and an fp32 residual is fp32 already): what the module call gave.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch, kernel_cost


def layer_norm_ref(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   residual: Optional[Tensor] = None) -> Tensor:
    """Pure-PyTorch reference: F.layer_norm(x + residual) over the last dimension, exactly what
    `nn.LayerNorm(N)(x + residual)` computes (bit for bit: the LAVIS parity tests rely on it)."""
    s = x if residual is None else x + residual
    return F.layer_norm(s, (x.shape[-1],), weight, bias, eps)


def _check(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor]) -> None:
    """Shape errors every backend shares (values are never read)."""
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"layer_norm needs x of shape (..., N) with N >= 1; got {tuple(x.shape)}")
    N = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (N,):
            raise ValueError(f"{name} must have shape ({N},) (the last dim of x {tuple(x.shape)}); got "
                             f"{tuple(t.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x {tuple(x.shape)}; got {tuple(residual.shape)}")


# ---------------------------------------------------------------------------------------------------------------
# Public op: one function, backends chosen by argument > BLIP2FAST_BACKEND > automatic (ops/dispatch.py).
#   "torch":  layer_norm_ref above (any device and float dtype; autograd through PyTorch)
#   "triton": kernels/layer_norm.py behind the custom ops blip2fast::layer_norm / blip2fast::layer_norm_backward
#             (custom_op + register_fake + register_autograd, so torch.compile(fullgraph=True) and CUDA graphs see
#             them); CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests); fp32/fp16/bf16 (bf16 on CUDA
#             only); weight and bias present; hidden size up to kernels.layer_norm.MAX_HIDDEN.
# Automatic: torch on the CPU; on CUDA the order the GPU check script measured fastest (dispatch.gpu_order),
# torch until a measurement is committed.

BACKENDS = ("torch", "triton")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HIDDEN = 8192  # kernels/layer_norm.py MAX_HIDDEN (kept here so dispatch never imports triton to decide)


def _triton_unsupported(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        residual: Optional[Tensor]) -> list[str]:
    """Why the Triton kernels cannot take this input ([] when they can)."""
    if weight is None or bias is None:
        return ["the Triton LayerNorm needs both weight and bias (elementwise_affine=True with bias)"]
    tensors = [x, weight, bias] + ([residual] if residual is not None else [])
    reasons = dispatch.triton_reasons("layer_norm", *tensors, dtypes=TRITON_DTYPES)
    if x.shape[-1] > MAX_HIDDEN:
        reasons.append(f"hidden size {x.shape[-1]} > {MAX_HIDDEN} (one row must fit in registers)")
    return reasons


def _choose_backend(x, weight, bias, residual, backend: Optional[str]) -> str:
    return dispatch.choose_backend(
        "layer_norm", backend,
        {"torch": lambda: [], "triton": lambda: _triton_unsupported(x, weight, bias, residual)},
        # CUDA: what the GPU check measured fastest (ops/dispatch.py gpu_order), the reference until then
        automatic=dispatch.gpu_order("layer_norm", ("torch",)) if x.device.type == "cuda" else ("torch",),
        what="LayerNorm",
    )


def _kernels():
    module, why = dispatch.triton_kernels("layer_norm")
    if module is None:
        raise RuntimeError(why)
    return module


def _stats_shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape[:-1])


@torch.library.custom_op("blip2fast::layer_norm", mutates_args=(), device_types=("cpu", "cuda"))
def _layer_norm_op(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], eps: float,
                   out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Triton forward: (y (x.shape, out_dtype), mean, rstd (x.shape[:-1], fp32), saved for the backward)."""
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = torch.empty(_stats_shape(x), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    _kernels().forward(x, weight, bias, residual, eps, y, mean, rstd)
    return y, mean, rstd


@_layer_norm_op.register_fake
def _layer_norm_fake(x, weight, bias, residual, eps, out_dtype):
    mean = x.new_empty(_stats_shape(x), dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype), mean, torch.empty_like(mean)


@kernel_cost.register("blip2fast::layer_norm")
def _layer_norm_cost(x, weight, bias, residual, eps, out_dtype):
    # one pass: x (+ residual) in, y and the fp32 row statistics out; no matrix products
    rows = x.numel() // x.shape[-1]
    return kernel_cost.KernelCost(bytes_read=kernel_cost.nbytes(x, residual, weight, bias),
                                  bytes_written=x.numel() * out_dtype.itemsize + 2 * 4.0 * rows)


def _sum_dtype(x: Tensor, residual: Optional[Tensor]) -> torch.dtype:
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


@torch.library.custom_op("blip2fast::layer_norm_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _layer_norm_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor],
                            mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backward: (d(x + residual) in the dtype of x + residual, dweight, dbias in their parameters' dtypes)."""
    ds = torch.empty(x.shape, dtype=_sum_dtype(x, residual), device=x.device)
    dw, db = _kernels().backward(grad_y, x, weight, residual, mean, rstd, ds)
    return ds, dw.to(weight.dtype), db.to(bias.dtype)


@_layer_norm_backward_op.register_fake
def _layer_norm_backward_fake(grad_y, x, weight, bias, residual, mean, rstd):
    return x.new_empty(x.shape, dtype=_sum_dtype(x, residual)), torch.empty_like(weight), torch.empty_like(bias)


@kernel_cost.register("blip2fast::layer_norm_backward")
def _layer_norm_backward_cost(grad_y, x, weight, bias, residual, mean, rstd):
    # the kernel (d(x + residual), per-program dw/db partials), then the two partial sums and their casts
    # (kernels/layer_norm.py backward + the wrapper's .to)
    return kernel_cost.KernelCost(
        launches=3, bytes_read=kernel_cost.nbytes(grad_y, x, residual, weight, mean, rstd),
        bytes_written=x.numel() * _sum_dtype(x, residual).itemsize + kernel_cost.nbytes(weight, bias))


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, out_dtype = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, residual, mean, rstd)


def _backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, bias, residual, mean, rstd = ctx.saved_tensors
    if grad_y is None:  # only the statistics were used downstream (they carry no gradient)
        return None, None, None, None, None, None
    ds, dw, db = _layer_norm_backward_op(grad_y, x, weight, bias, residual, mean, rstd)
    # d(x + residual) flows to both operands unchanged, each in its own dtype (as autograd's add would cast it)
    dx = ds.to(x.dtype)
    dres = None if residual is None else ds.to(residual.dtype)
    return dx, dw, db, dres, None, None


_layer_norm_op.register_autograd(_backward, setup_context=_setup_context)


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5,
               residual: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """F.layer_norm(x + residual, (N,), weight, bias, eps) over the last dimension N of x (residual: None or x's
    shape). backend: "torch" | "triton" | None (BLIP2FAST_BACKEND if set, else triton on CUDA when it can take
    the input, torch otherwise). A requested backend that cannot take the input raises with the reasons."""
    _check(x, weight, bias, residual)
    if _choose_backend(x, weight, bias, residual, backend) == "torch":
        return layer_norm_ref(x, weight, bias, eps, residual)
    out_dtype = _sum_dtype(x, residual)
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        # CUDA autocast runs layer_norm in float32 (CPU autocast leaves it in the input dtype); the custom op is
        # not autocast-aware, so the wrapper gives the dtype F.layer_norm would
        out_dtype = torch.float32
    y, _, _ = _layer_norm_op(x, weight, bias, residual, float(eps), out_dtype)
    return y
