"""Q-Former attention: the pure-PyTorch reference that defines the masks, the dropout and the image indexing, and
the public op `qformer_attention` (bottom of this file) that runs it or the fused Triton kernels
(kernels/qformer_attention.py), chosen by argument > BLIP2FAST_BACKEND > automatic.

The fused kernels take the mask as *parameters*, never as a (B, 1, L, L) tensor: which keys a row sees is a
function of
  - `key_padding` (B, Lk) bool, True = a real token (None: every key is real),
  - `causal_prefix`: None for bidirectional attention; an int P for the multimodal-causal rule of ITG and
    generation: keys [0, P) (the queries) are always visible and key P + j is visible from row i iff
    j <= i + `row_offset` (row i of the call is text position i + row_offset),
exactly LAVIS's extended masks. Masked scores get LAVIS's additive -10000 rather than -inf, so a row whose keys
are all padding attends over all its keys (the shift cancels in the softmax) instead of producing NaN, as in LAVIS.

Cross-attention may index its K/V per row (`kv_index`, (B,) int64): the 3B ITM rows read the K/V of the B
images that were projected once per step.

Attention dropout (training) keeps element (row, head, q, k) iff its counter hash clears the threshold
(`hashing.keep`): keys (seed, step, STREAM_ATTN_DROPOUT, site, global batch row, head, q position, k position),
so any backend and any number of ranks reproduce the mask.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import hashing, kernel_cost
from .autocast import autocast_dtype

MASKED_SCORE = -10000.0  # BERT's / LAVIS's additive mask value


@dataclass
class AttnDropout:
    """What the hashed attention dropout needs: probability, [seed, step], the call site and global row ids."""

    p: float
    seed_step: Tensor  # (2,) int64 on device
    site: int  # distinct per (pass, layer, self/cross)
    row_ids: Tensor  # (B,) int64 global batch row of each row of this call
    q_offset: int = 0  # absolute position of row 0 in the [queries | text] sequence


def dropout_keep_mask(drop: AttnDropout, heads: int, q_len: int, k_len: int) -> Tensor:
    """(B, heads, q_len, k_len) bool: which attention probabilities survive.

    The compiled op blip2fast::attention_dropout_keep computes it in one pass, bit-identical to the definition:
    on CPU tensors csrc/dropout_mask_cpu.cpp, on CUDA tensors csrc/dropout_mask.cu (one kernel where PyTorch runs
    ~190 elementwise int64 kernels per call), on meta tensors its fake (the cost model's stand-in for CUDA).
    Otherwise (no blip2fast._C, a build without CUDA kernels, or BLIP2FAST_BACKEND=attention_dropout_keep=torch)
    the PyTorch definition below, which is the spec. A plain BLIP2FAST_BACKEND=torch keeps the compiled mask: it is
    bit-identical to the definition, so the torch attention's results are the same either way, and the issue asks
    for one kernel per mask in every backend (the pure-PyTorch GPU step otherwise spends most of its launches and
    a third of its HBM traffic on masks). The fused Triton attention never calls this: it hashes in-kernel."""
    if _compiled_dropout_mask() and (drop.row_ids.device.type != "cuda" or _cuda_dropout_mask()):
        return torch.ops.blip2fast.attention_dropout_keep(
            drop.seed_step, drop.row_ids, hashing.STREAM_ATTN_DROPOUT, int(drop.site), heads, q_len, k_len,
            int(drop.q_offset), hashing.dropout_threshold(drop.p))
    return dropout_keep_mask_ref(drop, heads, q_len, k_len)


@torch.compiler.assume_constant_result
def _compiled_dropout_mask() -> bool:
    """Whether blip2fast._C has the dropout-mask op (unset with BLIP2FAST_BACKEND=attention_dropout_keep=torch,
    which asks for the PyTorch definition; a plain "torch" or "triton" names the attention's backend, not this)."""
    from . import _extension
    from .dispatch import requested_backend

    name, source = requested_backend(None, "attention_dropout_keep", ("cpp",))
    if name not in (None, "cpp"):
        return False
    status = _extension.load_extension()
    available = bool(status) and hasattr(torch.ops.blip2fast, "attention_dropout_keep")
    if name == "cpp" and not available:  # asked for: never fall back silently
        raise RuntimeError(f"attention_dropout_keep: backend 'cpp' was requested ({source}) but blip2fast._C "
                           f"{'has no attention_dropout_keep (rebuild it)' if status else 'is unavailable: ' + status.reason}")
    return available


@torch.compiler.assume_constant_result
def _cuda_dropout_mask() -> bool:
    """Whether blip2fast._C was built with the CUDA kernel of the dropout-mask op (a CUDA build of torch and nvcc
    when it was installed)."""
    from .dispatch import requested_backend

    available = torch._C._dispatch_has_kernel_for_dispatch_key("blip2fast::attention_dropout_keep", "CUDA")
    name, source = requested_backend(None, "attention_dropout_keep", ("cpp",))
    if name == "cpp" and not available:
        raise RuntimeError(f"attention_dropout_keep: backend 'cpp' was requested ({source}) for CUDA tensors but "
                           "blip2fast._C was built without CUDA kernels: reinstall it with FORCE_CUDA=1 "
                           "`pip install -e . --no-build-isolation` on a machine with nvcc")
    return available


def dropout_keep_mask_ref(drop: AttnDropout, heads: int, q_len: int, k_len: int) -> Tensor:
    """The definition of the keep mask in PyTorch (any device)."""
    dev = drop.row_ids.device
    seed_lo, seed_hi, step = hashing.seed_keys(drop.seed_step)
    h = hashing.counter_hash(
        seed_lo, seed_hi, step, hashing.STREAM_ATTN_DROPOUT, drop.site,
        drop.row_ids.view(-1, 1, 1, 1),
        torch.arange(heads, device=dev).view(1, -1, 1, 1),
        (torch.arange(q_len, device=dev) + drop.q_offset).view(1, 1, -1, 1),
        torch.arange(k_len, device=dev).view(1, 1, 1, -1),
    )
    return (h >> 8) >= hashing.dropout_threshold(drop.p)


def visibility(
    batch: int, q_len: int, k_len: int, device: torch.device,
    key_padding: Optional[Tensor], causal_prefix: Optional[int], row_offset: int,
) -> Optional[Tensor]:
    """(B, 1, q_len, k_len) bool of visible keys, or None when every key is visible."""
    visible = None
    if key_padding is not None:
        visible = key_padding.bool().view(batch, 1, 1, k_len)
    if causal_prefix is not None:
        rows = torch.arange(q_len, device=device).view(q_len, 1) + row_offset
        keys = torch.arange(k_len, device=device).view(1, k_len) - causal_prefix
        causal = (keys < 0) | (keys <= rows)  # (q_len, k_len)
        visible = causal.view(1, 1, q_len, k_len) if visible is None else visible & causal
    return visible


def _rows_and_mask(q: Tensor, k: Tensor, v: Tensor, key_padding: Optional[Tensor], causal_prefix: Optional[int],
                   row_offset: int, kv_index: Optional[Tensor], mask_dtype: torch.dtype
                   ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Each query row's K/V (picked by `kv_index`) and the additive mask (B, 1, Lq, Lk) or None (all visible)."""
    if kv_index is not None:
        k, v = k.index_select(0, kv_index), v.index_select(0, kv_index)
    B, _, Lq, _ = q.shape
    if k.shape[0] != B:
        raise ValueError(f"K/V batch {k.shape[0]} != query batch {B}; pass kv_index to pick K/V rows per query row")
    visible = visibility(B, Lq, k.shape[2], q.device, key_padding, causal_prefix, row_offset)
    if visible is None:
        return k, v, None
    return k, v, torch.zeros(visible.shape, dtype=mask_dtype, device=q.device).masked_fill(~visible, MASKED_SCORE)


def qformer_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding: Optional[Tensor] = None,
    causal_prefix: Optional[int] = None,
    row_offset: int = 0,
    kv_index: Optional[Tensor] = None,
    dropout: Optional[AttnDropout] = None,
) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with the Q-Former's masks.

    q: (B, H, Lq, d); k, v: (Bk, H, Lk, d) with Bk = B, or any Bk when `kv_index` (B,) picks a K/V row per row.
    Returns (B, H, Lq, d) in q's dtype.
    """
    k, v, mask = _rows_and_mask(q, k, v, key_padding, causal_prefix, row_offset, kv_index, q.dtype)
    B, H, Lq, d = q.shape
    Lk = k.shape[2]
    if dropout is None or dropout.p == 0.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)
    if mask is not None:
        scores = scores + mask
    probs = scores.softmax(dim=-1)
    keep = dropout_keep_mask(dropout, H, Lq, Lk)
    probs = torch.where(keep, probs / (1.0 - dropout.p), torch.zeros((), dtype=probs.dtype, device=probs.device))
    return torch.matmul(probs, v)


# ---------------------------------------------------------------------------------------------------------------
# The torch backend with dropout on: the reference's math in fewer passes over the (B, H, Lq, Lk) scores.
# The reference spends ~85 bytes of HBM traffic per score element (forward + backward) under bf16 autocast: the
# 1/sqrt(d) and 1/(1-p) divisions are passes of their own, autocast runs the softmax in fp32, so the dropout's
# division and select run in fp32 and the probabilities are cast back to bf16 for the second matmul (and every
# one of those again in the backward). Here the two scales ride in the GEMMs (baddbmm's alpha), the softmax keeps
# the input dtype (accumulating in fp32 inside the kernel, as the fused kernels do), and the backward is written
# out: ~40 bytes per element, half the kernels. Same masks, same keep mask, same rounding points as
# the fused kernels (probabilities rounded to the compute dtype before the second matmul).


def _bmm(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    """alpha * (a @ b) for 3-D a, b in one GEMM (beta=0: the expanded placeholder is never read)."""
    placeholder = a.new_empty(()).expand(a.shape[0], a.shape[1], b.shape[2])
    return torch.baddbmm(placeholder, a, b, beta=0.0, alpha=alpha)


class _DropoutAttention(torch.autograd.Function):
    """softmax(q k^T * scale + mask) with hashed dropout, times v: q (B, H, Lq, d), k / v (B, H, Lk, d), all in
    one dtype; `mask` (B or 1, 1, Lq, Lk) additive or None; `keep` (B, H, Lq, Lk) bool."""

    @staticmethod
    def forward(ctx, q, k, v, mask, keep, scale: float, keep_scale: float):
        B, H, Lq, d = q.shape
        Lk = k.shape[2]
        q3, k3, v3 = (t.reshape(B * H, -1, d) for t in (q, k, v))  # copies only if the views are strided
        scores = _bmm(q3, k3.transpose(1, 2), scale)
        if mask is not None:
            scores.view(B, H, Lq, Lk).add_(mask)
        probs = scores.softmax(dim=-1)  # input dtype (autocast is off in here); fp32 accumulation inside
        keep = keep.view(B * H, Lq, Lk)
        kept = torch.where(keep, probs, torch.zeros((), dtype=probs.dtype, device=probs.device))
        out = _bmm(kept, v3, keep_scale)
        ctx.save_for_backward(q3, k3, v3, probs, kept, keep)
        ctx.scale, ctx.keep_scale, ctx.shape = scale, keep_scale, (B, H, Lq, Lk, d)
        return out.view(B, H, Lq, d)

    @staticmethod
    def backward(ctx, grad_out):
        q3, k3, v3, probs, kept, keep = ctx.saved_tensors
        B, H, Lq, Lk, d = ctx.shape
        g3 = grad_out.reshape(B * H, Lq, d).to(q3.dtype)
        grad_v = _bmm(kept.transpose(1, 2), g3, ctx.keep_scale)
        grad_kept = _bmm(g3, v3.transpose(1, 2), ctx.keep_scale)
        zero = torch.zeros((), dtype=grad_kept.dtype, device=grad_kept.device)
        grad_probs = torch.where(keep, grad_kept, zero)
        grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        grad_q = _bmm(grad_scores, k3, ctx.scale)
        grad_k = _bmm(grad_scores.transpose(1, 2), q3, ctx.scale)
        return (grad_q.view(B, H, Lq, d), grad_k.view(B, H, Lk, d), grad_v.view(B, H, Lk, d), None, None, None,
                None)


def _dropout_attention(q: Tensor, k: Tensor, v: Tensor, key_padding: Optional[Tensor],
                       causal_prefix: Optional[int], row_offset: int, kv_index: Optional[Tensor],
                       dropout: AttnDropout) -> Tensor:
    """The torch backend's path with dropout on: `qformer_attention_ref`'s result (to rounding) in fewer passes.
    Computes in the autocast dtype under autocast (what the reference's matmuls did), else in q's dtype."""
    device = q.device.type
    autocast = autocast_dtype(device)
    dtype = q.dtype if autocast is None else autocast
    k, v, mask = _rows_and_mask(q, k, v, key_padding, causal_prefix, row_offset, kv_index, dtype)
    B, H, Lq, d = q.shape
    keep = dropout_keep_mask(dropout, H, Lq, k.shape[2])
    with contextlib.nullcontext() if autocast is None else torch.autocast(device, enabled=False):
        return _DropoutAttention.apply(q.to(dtype), k.to(dtype), v.to(dtype), mask, keep, 1.0 / math.sqrt(d),
                                       1.0 / (1.0 - dropout.p))


# ---------------------------------------------------------------------------------------------------------------
# Public op: one function, backends chosen by argument > BLIP2FAST_BACKEND > automatic (ops/dispatch.py).
#   "torch":  qformer_attention_ref above (any device and float dtype; autograd through PyTorch); with dropout on,
#             _dropout_attention (the same result in fewer passes, its backward written out)
#   "triton": kernels/qformer_attention.py, fused forward + backward behind the torch.library custom ops
#             blip2fast::qformer_attention / blip2fast::qformer_attention_backward (custom_op + register_fake +
#             register_autograd, so torch.compile(fullgraph=True) and CUDA graphs see them); CUDA tensors, or CPU
#             tensors under TRITON_INTERPRET=1 (tests); fp32/fp16/bf16 (bf16 on CUDA only); head dims 16/32/64/128.
# Automatic: torch on the CPU; on CUDA the order the GPU check script measured fastest (dispatch.gpu_order), torch
# until a measurement is committed.

BACKENDS = ("torch", "triton")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_HEAD_DIMS = (16, 32, 64, 128)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, key_padding: Optional[Tensor], causal_prefix: Optional[int],
                  kv_index: Optional[Tensor], dropout: Optional[AttnDropout]) -> None:
    """Shape errors every backend shares (values are never read: no device sync)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (batch, heads, length, head_dim); got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Lq, d = q.shape
    if k.shape != v.shape or k.shape[1] != H or k.shape[3] != d:
        raise ValueError(f"k and v must have shape (Bk, {H}, Lk, {d}) like each other; got {tuple(k.shape)} and "
                         f"{tuple(v.shape)} for q {tuple(q.shape)}")
    Lk = k.shape[2]
    if kv_index is None and k.shape[0] != B:
        raise ValueError(f"K/V batch {k.shape[0]} != query batch {B}; pass kv_index to pick K/V rows per query row")
    if kv_index is not None and (kv_index.shape != (B,) or kv_index.dtype not in (torch.int64, torch.int32)):
        raise ValueError(f"kv_index must be an integer tensor of shape ({B},); got {kv_index.dtype} "
                         f"{tuple(kv_index.shape)}")
    if key_padding is not None and key_padding.shape not in ((B, Lk), (B,)):
        raise ValueError(f"key_padding must be a ({B}, {Lk}) mask (nonzero = real key) or ({B},) key lengths; got "
                         f"shape {tuple(key_padding.shape)}")
    if causal_prefix is not None and causal_prefix < 0:
        raise ValueError(f"causal_prefix must be >= 0 (keys [0, P) always visible) or None; got {causal_prefix}")
    if dropout is not None:
        hashing.dropout_threshold(dropout.p)  # raises for p outside [0, 1)
        if dropout.seed_step.shape != (2,) or dropout.seed_step.dtype != torch.int64:
            raise ValueError(f"dropout.seed_step must be an int64 tensor [seed, step] of shape (2,); got "
                             f"{dropout.seed_step.dtype} {tuple(dropout.seed_step.shape)}")
        if dropout.row_ids.shape != (B,) or dropout.row_ids.dtype != torch.int64:
            raise ValueError(f"dropout.row_ids must be int64 of shape ({B},); got {dropout.row_ids.dtype} "
                             f"{tuple(dropout.row_ids.shape)}")


def _triton_unsupported(q: Tensor, k: Tensor, v: Tensor, key_padding: Optional[Tensor], kv_index: Optional[Tensor],
                        dropout: Optional[AttnDropout]) -> list[str]:
    """Why the Triton kernels cannot take this input ([] when they can)."""
    from .dispatch import triton_reasons

    extra = [t for t in (key_padding, kv_index) if t is not None]
    if dropout is not None:
        extra += [dropout.seed_step, dropout.row_ids]
    reasons = triton_reasons("qformer_attention", q, k, v, dtypes=TRITON_DTYPES)
    devices = {t.device for t in (q, *extra)}
    if len(devices) > 1:
        reasons.append(f"mask / index / dropout tensors on {sorted(str(d) for d in devices)}: put them on q's device")
    if not (q.dtype == k.dtype == v.dtype):
        reasons.append(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        reasons.append(f"head dim {q.shape[-1]} is not one of {TRITON_HEAD_DIMS}")
    if kv_index is not None and kv_index.dtype != torch.int64:
        reasons.append(f"kv_index must be int64 for the kernel, got {kv_index.dtype}")
    if key_padding is not None and key_padding.dtype.is_floating_point:
        reasons.append(f"key_padding must be a bool/integer mask or integer lengths, got {key_padding.dtype}")
    return reasons


def _choose_backend(q, k, v, key_padding, kv_index, dropout, backend: Optional[str]) -> str:
    from .dispatch import choose_backend, gpu_order

    return choose_backend(
        "qformer_attention", backend,
        {"torch": lambda: [], "triton": lambda: _triton_unsupported(q, k, v, key_padding, kv_index, dropout)},
        # on CUDA the order the GPU check script measured fastest (dispatch.gpu_order); torch (SDPA) until then,
        # and always on the CPU. Ask for the kernel with backend="triton" or BLIP2FAST_BACKEND=triton
        automatic=gpu_order("qformer_attention", ("torch",)) if q.device.type == "cuda" else ("torch",),
        what="Q-Former attention",
    )


def _kernels():
    from .dispatch import triton_kernels

    module, why = triton_kernels("qformer_attention")
    if module is None:
        raise RuntimeError(why)
    return module


def _new_out(q: Tensor) -> Tensor:
    """(B, H, Lq, d) laid out as (B, Lq, H, d): the caller's transpose(1, 2).reshape(B, Lq, H * d) is then free."""
    B, H, Lq, d = q.shape
    return q.new_empty((B, Lq, H, d)).transpose(1, 2)


def _mask_args(key_padding, causal_prefix, row_offset, kv_index, seed_step, row_ids, dropout_p, site, q_offset):
    m = _kernels().MaskArgs(key_padding=key_padding, causal_prefix=causal_prefix, row_offset=row_offset,
                            kv_index=kv_index)
    if dropout_p > 0.0:
        m.seed_step, m.row_ids, m.dropout_p = seed_step, row_ids, dropout_p
        m.dropout_threshold = hashing.dropout_threshold(dropout_p)
        m.site, m.q_offset = site, q_offset
    return m


@torch.library.custom_op("blip2fast::qformer_attention", mutates_args=(), device_types=("cpu", "cuda"))
def _qformer_attention_op(
    q: Tensor, k: Tensor, v: Tensor, key_padding: Optional[Tensor], causal_prefix: Optional[int], row_offset: int,
    kv_index: Optional[Tensor], seed_step: Optional[Tensor], row_ids: Optional[Tensor], dropout_p: float,
    site: int, q_offset: int,
) -> tuple[Tensor, Tensor]:
    """Triton forward: (out (B, H, Lq, d), lse (B, H, Lq) fp32, saved for the backward)."""
    B, H, Lq, _ = q.shape
    out = _new_out(q)
    lse = q.new_empty((B, H, Lq), dtype=torch.float32)
    m = _mask_args(key_padding, causal_prefix, row_offset, kv_index, seed_step, row_ids, dropout_p, site, q_offset)
    _kernels().forward(q, k, v, m, out, lse)
    return out, lse


@_qformer_attention_op.register_fake
def _qformer_attention_fake(q, k, v, key_padding, causal_prefix, row_offset, kv_index, seed_step, row_ids,
                            dropout_p, site, q_offset):
    B, H, Lq, _ = q.shape
    return _new_out(q), q.new_empty((B, H, Lq), dtype=torch.float32)


def _kv_rows_read(q: Tensor, k: Tensor) -> int:
    """K/V rows the kernel reads: every query row reads its own (its kv_index row), so B of them."""
    return q.shape[0] * k.shape[1] * k.shape[2] * k.shape[3]


@kernel_cost.register("blip2fast::qformer_attention")
def _qformer_attention_cost(q, k, v, key_padding, causal_prefix, row_offset, kv_index, seed_step, row_ids,
                            dropout_p, site, q_offset) -> kernel_cost.KernelCost:
    # QK^T and PV over every (row, head, query, key); masks and the dropout hash are computed in-kernel (no bytes)
    B, H, Lq, d = q.shape
    kv = 2.0 * _kv_rows_read(q, k) * k.element_size()
    return kernel_cost.KernelCost(
        flops=4.0 * B * H * Lq * k.shape[2] * d,
        bytes_read=kernel_cost.nbytes(q, key_padding, kv_index, seed_step, row_ids) + kv,
        bytes_written=kernel_cost.nbytes(q) + 4.0 * B * H * Lq)  # out + lse (fp32)


@torch.library.custom_op("blip2fast::qformer_attention_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _qformer_attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, key_padding: Optional[Tensor],
    causal_prefix: Optional[int], row_offset: int, kv_index: Optional[Tensor], seed_step: Optional[Tensor],
    row_ids: Optional[Tensor], dropout_p: float, site: int, q_offset: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backward: (dq, dk, dv); dk/dv sum over the rows that read each K/V row when kv_index is given."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    m = _mask_args(key_padding, causal_prefix, row_offset, kv_index, seed_step, row_ids, dropout_p, site, q_offset)
    _kernels().backward(grad_out, q, k, v, out, lse, m, dq, dk, dv)
    return dq, dk, dv


@_qformer_attention_backward_op.register_fake
def _qformer_attention_backward_fake(grad_out, q, k, v, out, lse, key_padding, causal_prefix, row_offset, kv_index,
                                     seed_step, row_ids, dropout_p, site, q_offset):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@kernel_cost.register("blip2fast::qformer_attention_backward")
def _qformer_attention_backward_cost(grad_out, q, k, v, out, lse, key_padding, causal_prefix, row_offset, kv_index,
                                     seed_step, row_ids, dropout_p, site, q_offset) -> kernel_cost.KernelCost:
    # the reference's backward: dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q (8 B H Lq Lk d); the kernels also
    # recompute S = Q K^T (+2). Two launches: the dK/dV kernel and the dQ kernel (kernels/qformer_attention.py).
    B, H, Lq, d = q.shape
    products = 2.0 * B * H * Lq * k.shape[2] * d
    kv = 2.0 * _kv_rows_read(q, k) * k.element_size()
    return kernel_cost.KernelCost(
        flops=4 * products, extra_flops=products, launches=2,
        bytes_read=kernel_cost.nbytes(grad_out, q, out, lse, key_padding, kv_index, seed_step, row_ids) + kv,
        bytes_written=kernel_cost.nbytes(q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding, causal_prefix, row_offset, kv_index, seed_step, row_ids, dropout_p, site, q_offset = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding, kv_index, seed_step, row_ids)
    ctx.scalars = (causal_prefix, row_offset, dropout_p, site, q_offset)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding, kv_index, seed_step, row_ids = ctx.saved_tensors
    causal_prefix, row_offset, dropout_p, site, q_offset = ctx.scalars
    if grad_out is None:  # only lse was used downstream (it carries no gradient)
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _qformer_attention_backward_op(grad_out, q, k, v, out, lse, key_padding, causal_prefix, row_offset,
                                                kv_index, seed_step, row_ids, dropout_p, site, q_offset)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_qformer_attention_op.register_autograd(_backward, setup_context=_setup_context)


def qformer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding: Optional[Tensor] = None,
    causal_prefix: Optional[int] = None,
    row_offset: int = 0,
    kv_index: Optional[Tensor] = None,
    dropout: Optional[AttnDropout] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with the Q-Former's masks: the semantics of `qformer_attention_ref`.

    q: (B, H, Lq, d); k, v: (Bk, H, Lk, d) (Bk = B, or any Bk with `kv_index` (B,) int64).
    key_padding: (B, Lk) mask (nonzero = real key) or (B,) integer key lengths (keys [0, len) real).
    backend: "torch" | "triton" | None (BLIP2FAST_BACKEND if set, else automatic: torch on the CPU; on CUDA the
    order the GPU check measured fastest, torch until measured). A requested backend that cannot take the input raises with the reasons.
    Returns (B, H, Lq, d) in q's dtype (the Triton output is laid out as (B, Lq, H, d) in memory).
    """
    _check_inputs(q, k, v, key_padding, causal_prefix, kv_index, dropout)
    if dropout is not None and dropout.p == 0.0:
        dropout = None
    if _choose_backend(q, k, v, key_padding, kv_index, dropout, backend) == "torch":
        if key_padding is not None and key_padding.dim() == 1:  # lengths -> mask
            key_padding = torch.arange(k.shape[2], device=key_padding.device) < key_padding[:, None]
        if dropout is None:  # SDPA
            return qformer_attention_ref(q, k, v, key_padding=key_padding, causal_prefix=causal_prefix,
                                         row_offset=row_offset, kv_index=kv_index)
        return _dropout_attention(q, k, v, key_padding, causal_prefix, row_offset, kv_index, dropout)
    d = dropout
    out, _ = _qformer_attention_op(
        q, k, v, key_padding, causal_prefix, int(row_offset), kv_index,
        None if d is None else d.seed_step, None if d is None else d.row_ids, 0.0 if d is None else float(d.p),
        0 if d is None else int(d.site), 0 if d is None else int(d.q_offset),
    )
    return out
