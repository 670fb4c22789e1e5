"""Fused linear + cross-entropy: the loss of logits = hidden @ weight^T + bias without the (N, V) logits.

    loss_sum, count = linear_cross_entropy(hidden (N, H), weight (V, H), bias (V,) or None, targets (N,))

is `token_ce_sum_ref(F.linear(hidden, weight, bias), targets, label_smoothing)` (ops/losses.py): the sum of the
label-smoothed cross-entropy over the rows whose target is not -100 (fp32; fp64 for fp64 inputs on the torch
backend) and the number of those rows (int64, on device: no host synchronisation). The caller divides by a global
count (`mean_over_global_count`). An LM head's logits are the largest tensor of a training step (4096 tokens x
50272 words: 0.8 GB in fp32, the same again for their gradient); here at most a chunk of rows exists at a time.

Backends (ops/dispatch.py: argument > BLIP2FAST_BACKEND > automatic):
  "torch"   chunked PyTorch (`_ChunkedLinearCE`): rows in chunks of `chunk_size`; per chunk the fp32 logits,
            logsumexp, the smoothed loss and, when a gradient is wanted, dlogits -> d_hidden, d_weight, d_bias,
            computed right there in the forward (no recomputation) and saved: peak memory O(chunk x V) and the
            saved tensors are O(N x H + V x H), never O(N x V). Any device and float dtype; the CPU path.
  "triton"  kernels/linear_ce.py behind the torch.library ops blip2fast::linear_cross_entropy(_backward)
            (custom_op + register_fake + register_autograd: torch.compile(fullgraph=True) and CUDA graphs see
            them): a fused forward that never writes a logit, and a backward that recomputes dlogits for
            `chunk_size` rows at a time and multiplies them out with cuBLAS (deterministic). CUDA tensors, or
            CPU tensors under TRITON_INTERPRET=1 (tests); fp32/fp16/bf16 (bf16 on CUDA only).
Automatic: torch (chunked) on the CPU; on CUDA the order the GPU check script measured fastest (ops/dispatch.py
`gpu_order`), the chunked torch path until then.

Gradients: hidden always (when it requires grad); weight and bias only when they require grad (the Q-Former's
tied decoder is trained, an LLM's output layer is frozen). Under autocast the three are cast to the autocast dtype
first, as F.linear would be. A target outside [0, V) that is not -100 gives a NaN loss (raising would need a host
synchronisation).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernel_cost
from .losses import token_ce_sum_ref

IGNORE_INDEX = -100
BACKENDS = ("torch", "triton")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TORCH_CHUNK_BYTES = 64 << 20  # default torch chunk: its fp32 logits take at most this (~4x that live at the peak)


def linear_cross_entropy_ref(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                             label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """The plain unfused definition: all (N, V) logits, then token_ce_sum_ref."""
    return token_ce_sum_ref(F.linear(hidden, weight, bias), targets, label_smoothing)


def _check_inputs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, label_smoothing: float,
                  chunk_size: Optional[int]) -> None:
    """Errors every backend shares (shapes and dtypes only: no tensor value is read)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be (N, H) and weight (V, H) with the same H; got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)} (flatten the batch: "
                         f"hidden.reshape(-1, H))")
    V = weight.shape[0]
    if V == 0:
        raise ValueError("weight has 0 rows: the vocabulary must not be empty")
    if bias is not None and bias.shape != (V,):
        raise ValueError(f"bias must have shape ({V},) like weight's rows, got {tuple(bias.shape)}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must have shape ({hidden.shape[0]},) (one per hidden row), got "
                         f"{tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 (or int32) class indices with -100 = ignored, got {targets.dtype}")
    if not (hidden.dtype.is_floating_point and hidden.dtype == weight.dtype
            and (bias is None or bias.dtype == weight.dtype)):
        raise ValueError(f"hidden, weight and bias must share one floating dtype, got {hidden.dtype}, {weight.dtype}"
                         f"{'' if bias is None else ', ' + str(bias.dtype)}: cast them (or run under autocast)")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of rows (or None for the default), got {chunk_size}")


# ---------------------------------------------------------------------------------------------------------------
# "torch": chunked PyTorch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_torch_chunk(n_rows: int, vocab: int) -> int:
    rows = TORCH_CHUNK_BYTES // max(1, 4 * vocab)
    return max(1, min(n_rows, rows if rows < 64 else rows // 64 * 64))


def _chunked_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, eps: float,
                     chunk: int, need_hidden: bool, need_weight: bool, need_bias: bool):
    """(loss sum, d_hidden, d_weight, d_bias): the gradients of the loss sum (None where not needed)."""
    N = hidden.shape[0]
    V = weight.shape[0]
    cdtype = _compute_dtype(hidden.dtype)
    loss = hidden.new_zeros((), dtype=cdtype)
    d_hidden = torch.empty_like(hidden) if need_hidden else None
    d_weight = torch.zeros(weight.shape, dtype=cdtype, device=weight.device) if need_weight else None
    d_bias = torch.zeros(V, dtype=cdtype, device=weight.device) if need_bias else None
    grads = need_hidden or need_weight or need_bias
    for r0 in range(0, N, chunk):
        h, t = hidden[r0:r0 + chunk], targets[r0:r0 + chunk]
        z = F.linear(h, weight, bias).to(cdtype)  # (c, V): the only vocabulary-sized tensors live per chunk
        lse = torch.logsumexp(z, dim=-1)
        valid = t != IGNORE_INDEX
        in_range = (t >= 0) & (t < V)
        safe_t = torch.where(valid & in_range, t, torch.zeros_like(t)).unsqueeze(1)
        rows = lse - (1.0 - eps) * z.gather(1, safe_t).squeeze(1)
        if eps != 0.0:
            rows = rows - (eps / V) * z.sum(dim=-1)
        rows = torch.where(valid & ~in_range, torch.full_like(rows, float("nan")), rows)
        loss = loss + torch.where(valid, rows, torch.zeros_like(rows)).sum()
        if not grads:
            continue
        d = torch.exp(z.sub_(lse.unsqueeze(1)))  # softmax; z is not needed any more
        d.scatter_add_(1, safe_t, torch.full_like(safe_t, -(1.0 - eps), dtype=cdtype))
        if eps != 0.0:
            d.sub_(eps / V)
        d = torch.where(valid.unsqueeze(1), d, torch.zeros((), dtype=cdtype, device=d.device))
        d_low = d.to(hidden.dtype)  # the GEMMs run in the input dtype, as autograd of the unfused path would
        if need_hidden:
            torch.mm(d_low, weight, out=d_hidden[r0:r0 + chunk])
        if need_weight:
            d_weight += torch.mm(d_low.t(), h)
        if need_bias:
            d_bias += d.sum(dim=0)
    return loss, d_hidden, d_weight, d_bias


class _ChunkedLinearCE(torch.autograd.Function):
    """Gradients computed chunk by chunk in the forward (no recomputation) and scaled by the incoming gradient of
    the loss sum in the backward. Only asked-for gradients are computed (flags decided by the caller)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, eps, chunk, need_hidden, need_weight, need_bias):
        with torch.autocast(hidden.device.type, enabled=False):  # inputs are cast by the caller already
            loss, dh, dw, db = _chunked_forward(hidden, weight, bias, targets, eps, chunk, need_hidden, need_weight,
                                                need_bias)
        ctx.save_for_backward(dh, dw, db)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad):
        dh, dw, db = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        return (None if dh is None else dh * grad.to(h_dtype),
                None if dw is None else (dw * grad).to(w_dtype),
                None if db is None else (db * grad).to(b_dtype),
                None, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------------------------
# "triton": kernels/linear_ce.py behind torch.library custom ops


def _kernels():
    from .dispatch import triton_kernels

    module, why = triton_kernels("linear_ce")
    if module is None:
        raise RuntimeError(why)
    return module


@torch.library.custom_op("blip2fast::linear_cross_entropy", mutates_args=(), device_types=("cpu", "cuda"))
def _lce_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, label_smoothing: float,
            chunk_size: int) -> tuple[Tensor, Tensor]:
    """Triton forward: (loss sum fp32 0-dim, lse (N,) fp32, saved for the backward)."""
    return _kernels().forward(hidden, weight, bias, targets, label_smoothing)


@_lce_op.register_fake
def _lce_fake(hidden, weight, bias, targets, label_smoothing, chunk_size):
    return hidden.new_empty((), dtype=torch.float32), hidden.new_empty((hidden.shape[0],), dtype=torch.float32)


@kernel_cost.register("blip2fast::linear_cross_entropy")
def _lce_cost(hidden, weight, bias, targets, label_smoothing, chunk_size):
    # the logits GEMM on tensor cores, fused with logsumexp / target gather so no logit is written; then ~7 small
    # torch ops combine the per-split statistics (kernels/linear_ce.py forward)
    N, V = hidden.shape[0], weight.shape[0]
    return kernel_cost.KernelCost(
        flops=2.0 * N * V * hidden.shape[1], launches=8, kind="matmul",
        bytes_read=kernel_cost.nbytes(hidden, weight, bias, targets), bytes_written=4.0 * (N + 1))


@torch.library.custom_op("blip2fast::linear_cross_entropy_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _lce_backward_op(grad: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                     lse: Tensor, label_smoothing: float, chunk_size: int, need_hidden: bool, need_weight: bool,
                     need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backward: (d_hidden, d_weight, d_bias); an empty (0,) tensor for each gradient not asked for (an
    op's outputs cannot be None)."""
    dh, dw, db = _kernels().backward(grad, hidden, weight, bias, targets, lse, label_smoothing, chunk_size,
                                     need_hidden, need_weight, need_bias)
    empty = hidden.new_empty((0,))
    return (empty if dh is None else dh, empty.clone() if dw is None else dw,
            empty.clone() if db is None else db)


@_lce_backward_op.register_fake
def _lce_backward_fake(grad, hidden, weight, bias, targets, lse, label_smoothing, chunk_size, need_hidden,
                       need_weight, need_bias):
    empty = hidden.new_empty((0,))
    return (torch.empty_like(hidden) if need_hidden else empty,
            torch.empty_like(weight) if need_weight else empty.clone(),
            torch.empty_like(bias) if need_bias else empty.clone())


@kernel_cost.register("blip2fast::linear_cross_entropy_backward")
def _lce_backward_cost(grad, hidden, weight, bias, targets, lse, label_smoothing, chunk_size, need_hidden,
                       need_weight, need_bias):
    # per chunk of rows: a Triton kernel recomputes the logits (2 N V H, beyond the reference) and writes dlogits
    # in the input dtype, then cuBLAS multiplies it out (2 N V H per wanted gradient) reading it back once per GEMM;
    # the bias gradient is a column sum (kernels/linear_ce.py backward)
    N, H = hidden.shape
    V = weight.shape[0]
    chunks = -(-N // max(1, int(chunk_size)))
    gemms = int(need_hidden) + int(need_weight)
    dlogits = float(N * V * hidden.element_size())
    wanted = [t for t, m in ((hidden, need_hidden), (weight, need_weight), (bias, need_bias)) if m]
    return kernel_cost.KernelCost(
        flops=2.0 * N * V * H * gemms, extra_flops=2.0 * N * V * H, kind="matmul",
        launches=chunks * (1 + gemms + int(bool(need_bias))),
        bytes_read=kernel_cost.nbytes(grad, hidden, weight, bias, targets, lse) + dlogits * (gemms + int(need_bias))
        + kernel_cost.nbytes(weight) * max(0, chunks - 1) * int(need_hidden),
        bytes_written=kernel_cost.nbytes(*wanted) + dlogits)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, label_smoothing, chunk_size = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[1])
    ctx.scalars = (label_smoothing, chunk_size)


def _backward(ctx, grad_loss, grad_lse):
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    label_smoothing, chunk_size = ctx.scalars
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and bias is not None
    if grad_loss is None:  # only lse was used downstream (it carries no gradient)
        return None, None, None, None, None, None
    dh, dw, db = _lce_backward_op(grad_loss, hidden, weight, bias, targets, lse, label_smoothing, chunk_size,
                                  bool(need_h), bool(need_w), bool(need_b))
    return (dh if need_h else None, dw if need_w else None, db if need_b else None, None, None, None)


_lce_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Public op


def _triton_unsupported(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor) -> list[str]:
    from .dispatch import triton_reasons

    floats = (hidden, weight) if bias is None else (hidden, weight, bias)
    reasons = triton_reasons("linear_ce", *floats, dtypes=TRITON_DTYPES)
    if targets.device != hidden.device:
        reasons.append(f"targets on {targets.device}, hidden on {hidden.device}: put them on one device")
    return reasons


def _choose_backend(hidden, weight, bias, targets, backend: Optional[str]) -> str:
    from .dispatch import choose_backend, gpu_order

    # on a GPU the Triton kernel becomes automatic once the GPU check script has measured it faster (dispatch.py);
    # until then the chunked torch path, which already keeps the (N, V) logits out of memory
    return choose_backend(
        "linear_cross_entropy", backend,
        {"torch": lambda: [], "triton": lambda: _triton_unsupported(hidden, weight, bias, targets)},
        automatic=gpu_order("linear_cross_entropy", ("torch",)) if hidden.device.type == "cuda" else ("torch",),
        what="linear cross-entropy",
    )


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    label_smoothing: float = 0.0,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """(loss_sum, count): the label-smoothed cross-entropy of hidden @ weight^T + bias against targets, summed over
    the rows whose target is not -100 (fp32 0-dim; fp64 for fp64 inputs on the torch backend), and the number of
    those rows (int64 0-dim, on device). The (N, V) logits are never materialised.

    hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) int64 (-100 = ignored).
    chunk_size: rows per chunk (torch: of the whole computation; triton: of the backward's dlogits buffer);
    None picks one from the vocabulary size (a (chunk, V) buffer of 64 MB fp32 / 256 MB in the input dtype).
    backend: "torch" | "triton" | None (BLIP2FAST_BACKEND, else automatic: torch on the CPU; on CUDA the order
    the GPU check measured fastest, torch until then).
    """
    # F.linear would run in the autocast dtype: so do we (before the dtype check, which then sees one dtype)
    if hidden.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    _check_inputs(hidden, weight, bias, targets, label_smoothing, chunk_size)
    targets = targets.long()
    eps = float(label_smoothing)
    count = (targets != IGNORE_INDEX).sum()
    N, V = hidden.shape[0], weight.shape[0]
    if _choose_backend(hidden, weight, bias, targets, backend) == "torch":
        chunk = int(chunk_size) if chunk_size is not None else default_torch_chunk(N, V)
        grad = torch.is_grad_enabled()
        loss = _ChunkedLinearCE.apply(hidden, weight, bias, targets, eps, chunk,
                                      grad and hidden.requires_grad, grad and weight.requires_grad,
                                      grad and bias is not None and bias.requires_grad)
        return loss, count
    chunk = int(chunk_size) if chunk_size is not None else _kernels().default_chunk_rows(N, V, hidden.dtype)
    loss, _ = _lce_op(hidden, weight, bias, targets, eps, chunk)
    return loss, count
