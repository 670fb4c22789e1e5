"""LayerNorm of (x + residual) in Triton, forward and backward, with fp32 statistics.

The semantics are `blip2fast.ops.layer_norm.layer_norm_ref` (F.layer_norm(x + residual)): the Q-Former's post-LN
`LayerNorm(dense_output + input)`, one read of each operand, no materialised sum.

  forward   s = float32(x) + float32(residual) (the sum is never rounded to the input dtype), mean and
            rstd = 1 / sqrt(var + eps) (biased variance, two passes over the row held in registers),
            y = (s - mean) * rstd * w + b in fp32, stored in y's dtype; mean and rstd (fp32) are kept for the
            backward, which recomputes s from x and residual (saved by autograd anyway) instead of storing it.
  backward  x_hat = (s - mean) * rstd, g = w * dy:
              ds = rstd * (g - mean(g) - x_hat * mean(g * x_hat))     (= dx = dresidual)
              dw = sum over rows of dy * x_hat;  db = sum over rows of dy
            Each program owns a fixed, contiguous range of rows and accumulates its partial dw/db in fp32; the
            partials (programs, N) are summed by torch afterwards. No atomics: the result is deterministic.

Rows: every tensor is (..., N) with unit stride along N. Row r of X, RES and DY is read at
(r // inner) * s_outer + (r % inner) * s_inner, so a (B, L, N) view such as hidden[:, :num_queries] (the residual of
the query rows) is read in place; Y and DS are written contiguous. The whole row sits in registers: N up to
MAX_HIDDEN.

Launch counts are kept in LAUNCHES (a Counter by kernel name), so tests can check that a kernel really ran.
"""
from __future__ import annotations

import collections
import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HIDDEN = 8192  # one row in registers: at 16 warps the backward needs 127 registers and no spills (lowered for
# sm_90); 16384 spills 1.4 KB per thread
LAUNCHES: collections.Counter = collections.Counter()  # kernel name -> launches in this process

# Whether the kernels were built for the interpreter (TRITON_INTERPRET=1 when this module was imported): then they
# run on CPU tensors (numpy), not on a GPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Sizes that change from call to call (rows) or are often 1 (inner, outer strides): not specialised, so one compiled
# kernel serves every batch. N and the inner strides stay specialised (16-divisible rows vectorise loads).
_RUNTIME_INTS = ["rows", "inner", "sx_o", "sr_o", "sdy_o", "row_start_stride"]


@triton.jit
def _row_offsets(offs_m, inner, s_outer, s_inner):
    """Element offset (int64) of each row r: (r // inner) * s_outer + (r % inner) * s_inner."""
    r = offs_m.to(tl.int64)
    return (r // inner) * s_outer + (r % inner) * s_inner


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _ln_fwd_kernel(
    X,  # *T (rows, N) through the row mapping; unit stride along N
    RES,  # *T (rows, N) residual, same mapping with its own strides (HAS_RESIDUAL only)
    W,  # *T (N,) weight
    B,  # *T (N,) bias
    Y,  # *T (rows, N) contiguous out
    MEAN,  # *f32 (rows,) out: mean of x + residual
    RSTD,  # *f32 (rows,) out: 1 / sqrt(var + eps)
    rows, N, inner,
    sx_o, sx_i,  # X row strides (outer, inner)
    sr_o, sr_i,  # RES row strides
    eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    row_in = offs_m < rows
    col_in = offs_n < N
    mask = row_in[:, None] & col_in[None, :]
    s = tl.load(X + _row_offsets(offs_m, inner, sx_o, sx_i)[:, None] + offs_n[None, :], mask=mask, other=0.0)
    s = s.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(RES + _row_offsets(offs_m, inner, sr_o, sr_i)[:, None] + offs_n[None, :], mask=mask, other=0.0)
        s += r.to(tl.float32)
    mean = tl.sum(s, axis=1) / N
    centred = tl.where(mask, s - mean[:, None], 0.0)
    # IEEE sqrt and division (tl.sqrt and `/` are the approximate PTX forms); once per row, so free
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(centred * centred, axis=1) / N + eps))
    w = tl.load(W + offs_n, mask=col_in, other=0.0).to(tl.float32)
    b = tl.load(B + offs_n, mask=col_in, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + offs_m, mean, mask=row_in)
    tl.store(RSTD + offs_m, rstd, mask=row_in)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _ln_bwd_kernel(
    DY,  # *T (rows, N) gradient of y, through the row mapping; unit stride along N
    X,  # *T (rows, N) forward input, row mapping
    RES,  # *T (rows, N) forward residual, row mapping (HAS_RESIDUAL only)
    W,  # *T (N,) weight
    MEAN,  # *f32 (rows,) from the forward
    RSTD,  # *f32 (rows,) from the forward
    DS,  # *T (rows, N) contiguous out: gradient of x + residual (= dx = dresidual)
    DW_PART,  # *f32 (programs, N) contiguous out: this program's sum of dy * x_hat
    DB_PART,  # *f32 (programs, N) contiguous out: this program's sum of dy
    rows, N, inner,
    sdy_o, sdy_i, sx_o, sx_i, sr_o, sr_i,
    row_start_stride,  # rows per program (a multiple of BLOCK_M): program p owns [p * it, (p + 1) * it)
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = tl.arange(0, BLOCK_N)
    col_in = offs_n < N
    w = tl.load(W + offs_n, mask=col_in, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    first = pid * row_start_stride
    last = tl.minimum(first + row_start_stride, rows)
    for start in range(first, last, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        row_in = offs_m < last
        mask = row_in[:, None] & col_in[None, :]
        s = tl.load(X + _row_offsets(offs_m, inner, sx_o, sx_i)[:, None] + offs_n[None, :], mask=mask, other=0.0)
        s = s.to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(RES + _row_offsets(offs_m, inner, sr_o, sr_i)[:, None] + offs_n[None, :], mask=mask,
                        other=0.0)
            s += r.to(tl.float32)
        dy = tl.load(DY + _row_offsets(offs_m, inner, sdy_o, sdy_i)[:, None] + offs_n[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        mean = tl.load(MEAN + offs_m, mask=row_in, other=0.0)
        rstd = tl.load(RSTD + offs_m, mask=row_in, other=0.0)
        x_hat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]  # zero outside the row (dy loaded as 0 there)
        c_hat = tl.sum(g * x_hat, axis=1) / N
        c_one = tl.sum(g, axis=1) / N
        ds = (g - c_one[:, None] - x_hat * c_hat[:, None]) * rstd[:, None]
        tl.store(DS + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], ds.to(DS.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * x_hat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(DW_PART + pid.to(tl.int64) * N + offs_n, dw, mask=col_in)
    tl.store(DB_PART + pid.to(tl.int64) * N + offs_n, db, mask=col_in)


# ---------------------------------------------------------------------------------------------------------------
# Block configurations
#
# BLOCK_N = N rounded up to a power of two (at least 16); BLOCK_M rows per tile so that a tile holds 4096 values
# (BERT-base, N = 768: 4 rows of 1024), or one row when N > 4096. Warps: one per 512 values of the tile, 4 to 16
# (8 at N = 768: 16 values per thread per live array). The forward launches one program per tile; the backward
# runs at most BWD_PROGRAMS_PER_SM programs per SM (on the CPU 4), each looping over a contiguous range of tiles,
# so its dw/db partials are (programs, N) floats however many rows there are.

TILE = 4096
BWD_PROGRAMS_PER_SM = 2


def launch_config(N: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for hidden size N (1 <= N <= MAX_HIDDEN)."""
    if not 1 <= N <= MAX_HIDDEN:
        raise ValueError(f"hidden size {N} is outside the Triton LayerNorm's range [1, {MAX_HIDDEN}]")
    block_n = max(16, triton.next_power_of_2(N))
    block_m = max(1, TILE // block_n)
    return block_m, block_n, min(16, max(4, block_m * block_n // 512))


def all_launch_configs() -> list[tuple[int, int, int]]:
    """Every (BLOCK_M, BLOCK_N, num_warps) launch_config can return."""
    return sorted({launch_config(min(2**k, MAX_HIDDEN)) for k in range(0, 14)}, key=lambda c: c[1])


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _bwd_programs(rows: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """(programs, rows per program) of the backward; a function of the shape and device only (deterministic)."""
    tiles = triton.cdiv(rows, block_m)
    target = 4 if device.type != "cuda" else BWD_PROGRAMS_PER_SM * _sm_count(
        device.index if device.index is not None else torch.cuda.current_device())
    per_program = triton.cdiv(tiles, min(tiles, target)) * block_m
    return triton.cdiv(rows, per_program), per_program


# ---------------------------------------------------------------------------------------------------------------
# Launchers (plain functions; the torch.library ops live in blip2fast/ops/layer_norm.py)


def _rows(t: Tensor, N: int) -> tuple[Tensor, int, int, int]:
    """(t, inner, outer stride, inner stride) such that row r of t (..., N) starts at (r // inner) * outer +
    (r % inner) * inner_stride. Views with unit stride along N and collapsible leading dims are read in place.
    Tensors of equal shape get equal `inner`, so x, residual and dy of one call share the row grouping."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 1:
        return t, 1, 0, N
    if t.dim() == 2:
        return t, max(t.shape[0], 1), 0, t.stride(0)
    t = t.reshape(-1, t.shape[-2], N)  # a view when the leading dims collapse (a copy only when they cannot)
    return t, max(t.shape[1], 1), t.stride(0), t.stride(1)


def forward(x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor | None, eps: float,
            y: Tensor, mean: Tensor, rstd: Tensor) -> None:
    """Writes y (x.shape, contiguous), mean and rstd (rows,) fp32. Inputs are checked by the caller (ops/)."""
    N = x.shape[-1]
    rows = x.numel() // N if N else 0
    if rows == 0:
        return
    block_m, block_n, warps = launch_config(N)
    xv, inner, sx_o, sx_i = _rows(x, N)
    if residual is not None:
        rv, _, sr_o, sr_i = _rows(residual, N)
    else:
        rv, sr_o, sr_i = xv, 0, 0
    _ln_fwd_kernel[(triton.cdiv(rows, block_m),)](
        xv, rv, weight, bias, y, mean, rstd, rows, N, inner, sx_o, sx_i, sr_o, sr_i, float(eps),
        HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    LAUNCHES["ln_fwd"] += 1


def backward(dy: Tensor, x: Tensor, weight: Tensor, residual: Tensor | None, mean: Tensor, rstd: Tensor,
             ds: Tensor) -> tuple[Tensor, Tensor]:
    """Writes ds (x.shape, contiguous); returns (dw, db) as fp32 (N,) sums of the per-program partials."""
    N = x.shape[-1]
    rows = x.numel() // N if N else 0
    if rows == 0:
        zero = torch.zeros(N, dtype=torch.float32, device=x.device)
        return zero, zero.clone()
    block_m, block_n, warps = launch_config(N)
    programs, per_program = _bwd_programs(rows, block_m, x.device)
    dw_part = torch.empty((programs, N), dtype=torch.float32, device=x.device)
    db_part = torch.empty((programs, N), dtype=torch.float32, device=x.device)
    dyv, inner, sdy_o, sdy_i = _rows(dy, N)
    xv, _, sx_o, sx_i = _rows(x, N)
    if residual is not None:
        rv, _, sr_o, sr_i = _rows(residual, N)
    else:
        rv, sr_o, sr_i = xv, 0, 0
    _ln_bwd_kernel[(programs,)](
        dyv, xv, rv, weight, mean, rstd, ds, dw_part, db_part,
        rows, N, inner, sdy_o, sdy_i, sx_o, sx_i, sr_o, sr_i, per_program,
        HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    LAUNCHES["ln_bwd"] += 1
    return dw_part.sum(0), db_part.sum(0)


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time lowering for sm_90 (kernels/_aot.py): every block configuration (bf16, residual on), every dtype
# combination the op can launch (at the BERT-base block, N = 768), each with and without the residual, and one
# launch whose N and strides are not multiples of 16 (no vectorised loads).

_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_F32, _F16, _BF16 = torch.float32, torch.float16, torch.bfloat16
# (x, residual, weight/bias, y): same dtype everywhere; autocast (a low-precision dense output plus an fp32 or a
# low-precision residual, fp32 parameters, fp32 output); low-precision activations with fp32 parameters
DTYPE_COMBOS = [(_F32, _F32, _F32, _F32), (_F16, _F16, _F16, _F16), (_BF16, _BF16, _BF16, _BF16),
                (_BF16, _F32, _F32, _F32), (_F16, _F32, _F32, _F32), (_BF16, _BF16, _F32, _F32),
                (_BF16, _BF16, _F32, _BF16)]


def _aot_case(kernel: str, combo, cfg, has_residual: bool, aligned: bool = True):
    x, res, w, y = (_TL[d] for d in combo)
    ds = _TL[torch.promote_types(combo[0], combo[1])]
    block_m, block_n, warps = cfg
    if kernel == "fwd":
        fn = _ln_fwd_kernel
        types = dict(X=x, RES=res, W=w, B=w, Y=y, MEAN="fp32", RSTD="fp32")
        aligned_ints = ("N", "sx_i", "sr_i")
    else:
        fn = _ln_bwd_kernel
        types = dict(DY=y, X=x, RES=res, W=w, MEAN="fp32", RSTD="fp32", DS=ds, DW_PART="fp32", DB_PART="fp32")
        aligned_ints = ("N", "sdy_i", "sx_i", "sr_i")
    constexprs = dict(HAS_RESIDUAL=has_residual, BLOCK_M=block_m, BLOCK_N=block_n)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = "*" + types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name == "eps" else "i32"
            if aligned and name in aligned_ints:
                attrs[(i,)] = [["tt.divisibility", 16]]
    label = (f"ln_{kernel} x={x} res={res} w={w} y={y} residual={has_residual} BLOCK_M={block_m} "
             f"BLOCK_N={block_n} warps={warps}{'' if aligned else ' unaligned'}")
    return label, fn, signature, constexprs, attrs, dict(num_warps=warps)


def aot_cases() -> list[tuple[str, object, dict, dict, dict, dict]]:
    """(label, jit_fn, signature, constexprs, attrs, options) for the launch configurations described above."""
    bert = launch_config(768)
    bf16 = (_BF16, _BF16, _BF16, _BF16)
    cases = []
    for kernel in ("fwd", "bwd"):
        cases += [_aot_case(kernel, bf16, cfg, True) for cfg in all_launch_configs()]
        cases += [_aot_case(kernel, combo, bert, has_res) for combo in DTYPE_COMBOS for has_res in (True, False)]
        cases.append(_aot_case(kernel, bf16, bert, True, aligned=False))
    return cases
