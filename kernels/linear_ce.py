"""Fused linear + cross-entropy in Triton: the loss of logits = hidden @ weight^T + bias without the (N, V) logits.

The semantics are `blip2fast.ops.linear_ce.linear_cross_entropy_ref` (read it first): the sum over the rows whose
target is not -100 of the label-smoothed cross-entropy

    loss_i = lse_i - (1 - eps) z_i[t_i] - (eps / V) sum_j z_i[j],     lse_i = log sum_j exp z_i[j]

and its gradient dz_i[j] = g (softmax(z_i)[j] - (1 - eps) [j == t_i] - eps / V) (g: the gradient of the loss sum).

Forward (`_fwd_kernel`): one program per (block of BLOCK_M rows, slice of the vocabulary). It walks its slice tile
by tile; each (BLOCK_M, BLOCK_V) logit tile is a tl.dot loop over H in BLOCK_K steps (fp32 accumulation), then
folds into per-row running statistics: max and sum of exp (online logsumexp), the target logit and the sum of the
logits (for the smoothing term). Slicing the vocabulary keeps the GPU busy when there are few row blocks (4096
rows are 32 blocks of 128 on 132 SMs); the few (S, N) partial statistics are combined by the launcher in PyTorch.
Nothing vocabulary-sized is written: the forward keeps lse (N,) fp32 for the backward.

Backward (`_bwd_kernel`), per chunk of rows: one program per (row block, vocabulary tile) recomputes its logit
tile from hidden and weight, turns it into dlogits with the saved lse and writes it, in the input dtype, into a
(chunk, V) buffer. cuBLAS then computes d_hidden = dlogits @ W and, when the weight is trainable,
d_weight += dlogits^T @ hidden (deterministic; no atomics). Why not accumulate d_hidden inside the kernel: a row
block's d_hidden accumulator is BLOCK_M x H fp32 (128 x 2560 x 4 = 1.3 MB for OPT-2.7b), far more than a program's
registers or shared memory, so an in-kernel accumulation must go through global memory: fp32 atomics (not
deterministic) or read-modify-writes of N x H fp32 once per vocabulary tile (33 GB for 4096 x 2560 x 50272 with
128-wide tiles; the same again for d_weight). The chunk buffer costs
chunk x V x 2 bytes (bf16) instead, freed after the backward, and the two GEMMs run at cuBLAS speed.

Launch counts are kept in LAUNCHES (a Counter by kernel name) so tests can check the kernels really ran.
`aot_cases()` lists every launch configuration for ahead-of-time lowering (sm_90).
"""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

IGNORE_INDEX = -100
_IGNORE = tl.constexpr(IGNORE_INDEX)  # the same, readable inside the kernels
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAUNCHES: collections.Counter = collections.Counter()  # kernel name -> launches in this process

# Built for the interpreter (TRITON_INTERPRET=1 at import): the kernels then run on CPU tensors, not on a GPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Sizes that change from call to call: not specialised (an int equal to 1, or divisible by 16, would otherwise get
# its own compiled variant). H and the strides stay specialised: with H divisible by 16 (every real model) the
# masks along H are provably uniform over 16 elements, so the operand loads become 16-byte cp.async copies and the
# H loop is software-pipelined (with H unspecialised Triton emits plain loads: 3x less shared memory in flight).
_RUNTIME_INTS = ["N", "V", "v_per_split"]


@triton.jit
def _logit_tile(X, W, BIAS, offs_m, offs_v, row_in, v_in, H, stride_xn, stride_wv,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_V) fp32 logits of rows offs_m against vocabulary entries offs_v (0 outside)."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
    x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xn
    w_rows = W + offs_v.to(tl.int64)[:, None] * stride_wv
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < H
        x = tl.load(x_rows + offs_k[None, :], mask=row_in[:, None] & k_in[None, :], other=0.0)
        w = tl.load(w_rows + offs_k[None, :], mask=v_in[:, None] & k_in[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_v, mask=v_in, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _fwd_kernel(
    X,  # *T (N, H) hidden states; unit stride along H
    W,  # *T (V, H) output-layer weight; unit stride along H
    BIAS,  # *T (V,) bias (HAS_BIAS only)
    TGT,  # *i64 (N,) targets, IGNORE_INDEX (-100) = no loss
    PART,  # *f32 (4, S, N) contiguous, written: per split s and row: max logit, sum exp(z - max), target logit
    #        (0 when the target is outside the split), sum of the logits
    N, V, H,
    stride_xn,  # X row stride
    stride_wv,  # W row stride
    v_per_split,  # vocabulary entries per split (a multiple of BLOCK_V); split s covers [s v_per_split, ...)
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)  # row blocks vary fastest: programs in flight share their weight tiles in L2
    pid_s = tl.program_id(1)
    num_s = tl.num_programs(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = offs_m < N
    tgt = tl.load(TGT + offs_m, mask=row_in, other=_IGNORE)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)  # the launcher makes every split non-empty

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    z_tgt = tl.zeros([BLOCK_M], tl.float32)
    z_sum = tl.zeros([BLOCK_M], tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_in = offs_v < v_hi
        z = _logit_tile(X, W, BIAS, offs_m, offs_v, row_in, v_in, H, stride_xn, stride_wv,
                        HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
        z_tgt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
        z_sum += tl.sum(tl.where(v_in[None, :], z, 0.0), axis=1)
        z = tl.where(v_in[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))  # finite: every tile holds at least one real entry
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
    out = PART + pid_s.to(tl.int64) * N + offs_m
    plane = num_s.to(tl.int64) * N
    tl.store(out, m_i, mask=row_in)
    tl.store(out + plane, l_i, mask=row_in)
    tl.store(out + 2 * plane, z_tgt, mask=row_in)
    tl.store(out + 3 * plane, z_sum, mask=row_in)


@triton.jit(do_not_specialize=["N", "V"])
def _bwd_kernel(
    X,  # *T (N, H) hidden states of this chunk; unit stride along H
    W,  # *T (V, H) output-layer weight; unit stride along H
    BIAS,  # *T (V,) bias (HAS_BIAS only)
    TGT,  # *i64 (N,) targets of this chunk
    LSE,  # *f32 (N,) log-sum-exp of each row's logits (from the forward)
    GRAD,  # *f32 (1,) gradient of the loss sum (read on device: no host synchronisation)
    G,  # *T (N, V) written: dlogits of this chunk; unit stride along V
    N, V, H,
    stride_xn, stride_wv,
    stride_gm,  # G row stride
    smooth,  # eps / V: the smoothed target's mass on every entry
    target_weight,  # 1 - eps: the extra mass on the target entry
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_in = offs_m < N
    v_in = offs_v < V
    z = _logit_tile(X, W, BIAS, offs_m, offs_v, row_in, v_in, H, stride_xn, stride_wv,
                    HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION)
    tgt = tl.load(TGT + offs_m, mask=row_in, other=_IGNORE)
    lse = tl.load(LSE + offs_m, mask=row_in, other=0.0)
    g = tl.load(GRAD)
    d = tl.exp(z - lse[:, None]) - smooth - tl.where(offs_v[None, :] == tgt[:, None], target_weight, 0.0)
    # ignored rows get exactly 0 (a NaN in their hidden state or lse must not leak into the weight gradient)
    d = tl.where((tgt != _IGNORE)[:, None], d * g, 0.0)
    tl.store(G + offs_m.to(tl.int64)[:, None] * stride_gm + offs_v[None, :], d.to(G.dtype.element_ty),
             mask=row_in[:, None] & v_in[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Block configurations


@dataclass(frozen=True)
class BlockConfig:
    block_m: int  # rows per tile
    block_v: int  # vocabulary entries per tile
    block_k: int  # hidden features per tl.dot step (>= 16: sm_90's minimum K)
    num_warps: int = 4
    num_stages: int = 2


# The launchers' whole choice (each entry is in aot_cases(), lowered for sm_90 in CI):
#   fp16/bf16: 128 x 128 tiles, K steps of 64, 8 warps, 3 stages: a wgmma-sized GEMM tile (64 fp32 accumulator
#              registers per thread) with 96 KB of pipelined operand buffers; the epilogue (max, exp, sums) is
#              cheap next to the H-long dot loop (H = 768 for the Q-Former, 2560 for OPT-2.7b).
#   fp32:      64 x 64 tiles, K steps of 32, 4 warps, 2 stages (IEEE fp32 or TF32 dots, 2x the bytes per element).
KERNEL_NAMES = ("fwd", "bwd")
_CONFIGS = {
    torch.float16: BlockConfig(128, 128, 64, num_warps=8, num_stages=3),
    torch.bfloat16: BlockConfig(128, 128, 64, num_warps=8, num_stages=3),
    torch.float32: BlockConfig(64, 64, 32, num_warps=4, num_stages=2),
}


def launch_config(dtype: torch.dtype) -> BlockConfig:
    if dtype not in _CONFIGS:
        raise ValueError(f"no Triton linear cross-entropy for dtype {dtype}; one of {DTYPES}")
    return _CONFIGS[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands: IEEE unless torch allows TF32 for float32 matmuls (its own GEMMs then use TF32 too)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def dot_precisions(dtype: torch.dtype) -> tuple[str, ...]:
    return ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)


_sm_counts: dict = {}  # device -> number of SMs (a host-side property query, once)


def num_splits(n_row_blocks: int, n_vocab_tiles: int, device: torch.device) -> int:
    """Vocabulary slices of the forward. On a GPU: as many as fit in 4 waves of programs over the SMs, rounded down
    so that the last wave is (nearly) full (one 128 x 128 bf16 program per SM at a time: 250 registers x 256
    threads; 4096 rows = 32 row blocks -> 16 slices, 512 programs = 3.9 waves on 132 SMs), at most one slice per
    vocabulary tile. Under the interpreter 4 programs, so the tests exercise the combination of slices."""
    if device.type == "cuda":
        if device not in _sm_counts:
            _sm_counts[device] = torch.cuda.get_device_properties(device).multi_processor_count
        target = 4 * _sm_counts[device]
    else:
        target = 4
    return max(1, min(n_vocab_tiles, target // n_row_blocks))


def default_chunk_rows(n_rows: int, vocab: int, dtype: torch.dtype, budget_bytes: int = 256 << 20) -> int:
    """Rows per backward chunk: the (chunk, V) dlogits buffer within `budget_bytes`, a multiple of the row block."""
    block_m = launch_config(dtype).block_m
    rows = budget_bytes // max(1, vocab * dtype.itemsize)
    rows = max(block_m, rows // block_m * block_m)
    return max(1, min(n_rows, rows))


# ---------------------------------------------------------------------------------------------------------------
# Launchers (plain functions; the torch.library ops live in blip2fast/ops/linear_ce.py)


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
            label_smoothing: float) -> tuple[Tensor, Tensor]:
    """(loss sum fp32 0-dim, lse (N,) fp32). A target outside [0, V) that is not -100 makes the loss NaN (it
    cannot raise without a host synchronisation)."""
    hidden, weight, targets = _unit_last(hidden), _unit_last(weight), targets.contiguous()
    N, H = hidden.shape
    V = weight.shape[0]
    eps = float(label_smoothing)
    if N == 0:
        return hidden.new_zeros((), dtype=torch.float32), hidden.new_empty((0,), dtype=torch.float32)
    cfg = launch_config(hidden.dtype)
    n_m, n_v = triton.cdiv(N, cfg.block_m), triton.cdiv(V, cfg.block_v)
    splits = num_splits(n_m, n_v, hidden.device)
    v_per_split = triton.cdiv(n_v, splits) * cfg.block_v
    splits = triton.cdiv(V, v_per_split)  # no empty slice
    part = hidden.new_empty((4, splits, N), dtype=torch.float32)
    _fwd_kernel[(n_m, splits)](
        hidden, weight, bias if bias is not None else hidden, targets, part,
        N, V, H, hidden.stride(0), weight.stride(0), v_per_split,
        HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
        DOT_PRECISION=dot_precision(hidden.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    LAUNCHES["fwd"] += 1
    m, l, z_tgt, z_sum = part.unbind(0)  # (S, N) each
    if splits == 1:
        lse = m[0] + torch.log(l[0])
    else:
        top = m.amax(dim=0)
        lse = top + torch.log((l * torch.exp(m - top)).sum(dim=0))
    rows = lse - (1.0 - eps) * z_tgt.sum(dim=0)
    if eps != 0.0:
        rows = rows - (eps / V) * z_sum.sum(dim=0)
    valid = targets != IGNORE_INDEX
    bad = valid & ((targets < 0) | (targets >= V))
    rows = torch.where(bad, torch.full_like(rows, float("nan")), rows)
    loss = torch.where(valid, rows, torch.zeros_like(rows)).sum()
    return loss, lse


def backward(grad: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor,
             label_smoothing: float, chunk_rows: int, need_hidden: bool, need_weight: bool,
             need_bias: bool) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(d_hidden, d_weight, d_bias), each None unless asked for. Rows go through in chunks of `chunk_rows`; the
    (chunk, V) dlogits buffer (input dtype) is the only vocabulary-sized tensor."""
    hidden, weight, targets = _unit_last(hidden), _unit_last(weight), targets.contiguous()
    N, H = hidden.shape
    V = weight.shape[0]
    eps = float(label_smoothing)
    d_hidden = torch.empty_like(hidden) if need_hidden else None
    d_weight = (torch.zeros_like(weight) if N == 0 else None) if need_weight else None
    d_bias = torch.zeros(V, dtype=torch.float32, device=hidden.device) if need_bias else None
    if N == 0 or not (need_hidden or need_weight or need_bias):
        return d_hidden, d_weight, None if d_bias is None else d_bias.to(bias.dtype)
    cfg = launch_config(hidden.dtype)
    chunk = max(1, min(int(chunk_rows), N))
    buf = hidden.new_empty((chunk, V))
    g = grad.detach().to(torch.float32).reshape(1).contiguous()
    for r0 in range(0, N, chunk):
        c = min(chunk, N - r0)
        x, dl = hidden[r0:r0 + c], buf[:c]
        _bwd_kernel[(triton.cdiv(c, cfg.block_m), triton.cdiv(V, cfg.block_v))](
            x, weight, bias if bias is not None else hidden, targets[r0:r0 + c], lse[r0:r0 + c], g, dl,
            c, V, H, x.stride(0), weight.stride(0), dl.stride(0), eps / V, 1.0 - eps,
            HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
            DOT_PRECISION=dot_precision(hidden.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        LAUNCHES["bwd"] += 1
        if need_hidden:
            torch.mm(dl, weight, out=d_hidden[r0:r0 + c])
        if need_weight:
            # first chunk writes, later ones accumulate (beta = 1) in the weight's dtype, as a single GEMM would
            d_weight = torch.mm(dl.t(), x) if d_weight is None else d_weight.addmm_(dl.t(), x)
        if need_bias:
            d_bias += dl.sum(dim=0, dtype=torch.float32)
    return d_hidden, d_weight, None if d_bias is None else d_bias.to(bias.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time lowering: triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90,
# 32), options=options) for every launch configuration, with the specialisation a real launch gets (16-byte aligned
# pointers, 16-divisible strides: H and V multiples of 16, as every real model has).

_TL_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_KERNELS = {"fwd": _fwd_kernel, "bwd": _bwd_kernel}


def _signature(kernel: str, dtype: torch.dtype) -> tuple[dict, dict]:
    fn = _KERNELS[kernel]
    t = "*" + _TL_TYPES[dtype]
    types = dict(X=t, W=t, BIAS=t, TGT="*i64", PART="*fp32", LSE="*fp32", GRAD="*fp32", G=t,
                 smooth="fp32", target_weight="fp32")
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in ("HAS_BIAS", "BLOCK_M", "BLOCK_V", "BLOCK_K", "DOT_PRECISION"):
            signature[name] = "constexpr"
            continue
        signature[name] = types.get(name, "i32")
        if signature[name].startswith("*") or name.startswith("stride_") or name == "H":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def launch_cases() -> list[tuple[str, torch.dtype, bool, str, BlockConfig]]:
    """Every (kernel, dtype, has_bias, dot precision, block config) the launchers above can launch."""
    return [(k, dt, has_bias, prec, launch_config(dt))
            for k in KERNEL_NAMES for dt in DTYPES for has_bias in (True, False) for prec in dot_precisions(dt)]


def aot_cases() -> list[tuple[str, object, dict, dict, dict, dict]]:
    """(label, jit_fn, signature, constexprs, attrs, options) for every launch configuration the launchers can
    pick (each dtype, with and without bias, each dot precision); lower them in a process without
    TRITON_INTERPRET=1."""
    cases = []
    for kernel, dtype, has_bias, prec, cfg in launch_cases():
        signature, attrs = _signature(kernel, dtype)
        constexprs = dict(HAS_BIAS=has_bias, BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
                          DOT_PRECISION=prec)
        label = (f"linear_ce.{kernel} {_TL_TYPES[dtype]} bias={int(has_bias)} {prec} "
                 f"{cfg.block_m}x{cfg.block_v}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}")
        cases.append((label, _KERNELS[kernel], signature, constexprs, attrs,
                      dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)))
    return cases
