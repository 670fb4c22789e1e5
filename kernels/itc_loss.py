"""Fused ITC (image-text contrastive) loss in Triton: similarities with max over queries, label-smoothed
cross-entropy both ways, and the backward for all five inputs. The (B, Ba, Q) products are never stored.

The semantics are blip2fast/ops/losses.py (`itc_similarities` + `itc_loss_ref`):
    sim_i2t[b, j] = max_q <image_feats[b, q], text_all[j]> / temp        (B, Ba)
    sim_t2i[b, j] = max_q <text_feat[b], image_all[j, q]> / temp         (B, Ba)
    loss = 0.5 * (mean_b CE(sim_i2t[b], t_b) + mean_b CE(sim_t2i[b], t_b)), CE label-smoothed by eps over Ba classes

Both directions are one generic "max-sim" between a multi-vector side A (NA, Q, E) and a single-vector side C
(NC, E):  S[a, c] = max_q <A[a, q], C[c]>.  i2t: A = image_feats (a = b), C = text_all (c = j); t2i: A = image_all
(a = j), C = text_feat (c = b). The similarity matrices are stored (B, Ba) row-major either way; the kernels take
their (a, c) strides, so the t2i launch writes and reads the transpose for free.

Kernels (one launch each; `launch_config` has the block table):
  _sims_kernel        per (column block of C, split of A's blocks): the C tile (BLOCK_C, E) stays resident while
                      the program walks its A blocks; each A block is BLOCK_A rows x QP queries = one tl.dot of
                      (BLOCK_A*QP, E) x (E, BLOCK_C), then max and argmax over q. Writes sim / temp (fp32) and the
                      argmax query (int32). Every (a, c) is written by exactly one program.
  _ce_kernel          per (block of rows, direction): online logsumexp over column tiles, the target and uniform
                      terms of the smoothed CE, and w = E_p[sim] - (1-eps) sim_t - eps/C sum_j sim (for d temp),
                      both taken relative to the row's target sim (no cancellation between values ~ 1 / temp).
  _bwd_multi_kernel   dA[a, q] = sum_c [arg[a, c] == q] G[a, c] C[c]: per (A block, split of C's blocks), one
                      tl.dot of the query-expanded G (BLOCK_A*QP, BLOCK_C) x C tile (BLOCK_C, E) per column block.
  _bwd_single_kernel  dC[c] = sum_a G[a, c] A[a, arg[a, c]]: per (C block, split of A's blocks), one tl.dot of the
                      transposed expanded G (BLOCK_C, BLOCK_A*QP) x A tile (BLOCK_A*QP, E) per A block.
  G = dL/dsim / temp is recomputed from the saved sims and row statistics (max m, sum l: p = exp(sim - m) / l):
  G = g 0.5 / (B temp) (p - (1-eps) [j == t_b] - eps/Ba). The kernels multiply by the bracket (in [-1, 1], safe
  in fp16/bf16) and apply g 0.5 / (B temp) to the fp32 accumulator at the end (the scaled values would be fp16
  subnormals at Ba = 8192). Ties in the max: the lowest q gets the gradient (random inputs have none).
Long reductions (dA of i2t and dC of t2i sum over Ba) are split over programs to fill the GPU; each split writes an
fp32 partial, summed afterwards in a fixed order: deterministic, no atomics. The short ones write their output
directly. d temp = -g 0.5 / (B temp) * sum_{x, b} w_x[b] (no extra pass).

fp32 accumulation throughout; fp32/fp16/bf16 inputs (fp32 operands multiply as IEEE fp32, or TF32 when torch's
float32 matmul precision is not "highest", like the attention kernels). Q and E are padded to powers of two
(QP >= 16, EP >= 64: tl.dot needs dims >= 16) by masked loads. No host synchronisation: temp, the incoming
gradient and the targets are read on device. A target outside [0, Ba) makes that row's loss NaN (no check can
run on the host without a sync).

Launch counts are kept in LAUNCHES (a Counter by kernel name) so tests can check the kernels really ran.
`aot_cases()` lists every launch configuration for ahead-of-time lowering for sm_90.
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

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_Q = 64  # queries per image the kernels take (BLIP-2: 32)
MAX_E = 256  # feature width (BLIP-2: 256): a whole feature row is one tile
Q_PADS = (16, 32, 64)  # QP: queries padded to a power of two, at least 16
E_PADS = (64, 128, 256)  # EP: feature width padded to a power of two, at least 64
LAUNCHES: collections.Counter = collections.Counter()  # kernel name -> launches in this process

# Whether the kernels below were built for the interpreter (TRITON_INTERPRET=1 when this module was imported):
# then they run on CPU tensors (numpy), not on a GPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Programs a launch aims for when it splits a long loop over programs (None: the GPU's SM count; 1 under the
# interpreter, whose time grows with the number of programs). Tests set it to force the split paths.
PROGRAM_TARGET: Optional[int] = None

# Lengths change from call to call: one compiled kernel for all of them (by default an int equal to 1 becomes a
# constant and one divisible by 16 gets its own variant). Strides stay specialised (16-divisible strides vectorise).
_SIZES = ["NA", "NC", "Q", "E", "blocks_per_split"]


# ---------------------------------------------------------------------------------------------------------------
# Forward


@triton.jit(do_not_specialize=_SIZES)
def _sims_kernel(
    A,  # *T (NA, Q, E) multi-vector side (image features); unit stride along E
    C,  # *T (NC, E) single-vector side (text features); unit stride along E
    TEMP,  # *f32 () temperature
    SIM,  # *f32 out: max_q <A[a, q], C[c]> / temp at a * stride_sa + c * stride_sc
    ARG,  # *i32 out: the argmax query (lowest on ties), same layout as SIM
    stride_a, stride_aq,  # A strides of a row and of a query
    stride_c,  # C row stride
    stride_sa, stride_sc,  # SIM / ARG strides of a and of c
    NA, NC, Q, E,
    blocks_per_split,  # A blocks walked by one program (grid axis 1 = splits of A's blocks)
    QP: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_e = tl.arange(0, BLOCK_E)
    c_in = offs_c < NC
    e_in = offs_e < E
    c_tile = tl.load(C + offs_c[:, None].to(tl.int64) * stride_c + offs_e[None, :],
                     mask=c_in[:, None] & e_in[None, :], other=0.0)  # (BLOCK_C, BLOCK_E), resident
    c_t = tl.trans(c_tile)
    temp = tl.load(TEMP)
    r = tl.arange(0, BLOCK_A * QP)  # tile row r = (a, q) = (r // QP, r % QP)
    r_a = r // QP
    r_q = r % QP
    qv = tl.arange(0, QP)[None, :, None]
    n_blocks = tl.cdiv(NA, BLOCK_A)
    lo = pid_s * blocks_per_split
    hi = tl.minimum(lo + blocks_per_split, n_blocks)
    for ab in range(lo, hi):
        rows = ab * BLOCK_A + r_a
        row_in = (rows < NA) & (r_q < Q)
        a_tile = tl.load(A + rows[:, None].to(tl.int64) * stride_a + r_q[:, None] * stride_aq + offs_e[None, :],
                         mask=row_in[:, None] & e_in[None, :], other=0.0)
        s = tl.dot(a_tile, c_t, input_precision=DOT_PRECISION)  # (BLOCK_A * QP, BLOCK_C) fp32
        s3 = tl.reshape(s, (BLOCK_A, QP, BLOCK_C))
        s3 = tl.where(qv < Q, s3, float("-inf"))  # padded queries never win
        best = tl.max(s3, axis=1)  # (BLOCK_A, BLOCK_C)
        is_nan = s3 != s3
        # argmax = the lowest q reaching the max; NaN propagates like torch.amax (first NaN query)
        arg = tl.min(tl.where((s3 == best[:, None, :]) | is_nan, qv, QP), axis=1)
        has_nan = tl.max(is_nan.to(tl.int32), axis=1) > 0
        best = tl.where(has_nan, float("nan"), best)
        offs_a = ab * BLOCK_A + tl.arange(0, BLOCK_A)
        out = offs_a[:, None].to(tl.int64) * stride_sa + offs_c[None, :].to(tl.int64) * stride_sc
        mask = (offs_a < NA)[:, None] & c_in[None, :]
        tl.store(SIM + out, best / temp, mask=mask)
        tl.store(ARG + out, arg.to(tl.int32), mask=mask)


@triton.jit(do_not_specialize=["B", "Ba"])
def _ce_kernel(
    SIM,  # *f32 (2, B, Ba) contiguous: sim_i2t, sim_t2i
    TGT,  # *i64 (B,) the target column of each row
    ROW_MAX,  # *f32 (2, B) out: row max m
    ROW_SUM,  # *f32 (2, B) out: row sum of exp(sim - m) (softmax = exp(sim - m) / sum: see _dsim_tile)
    ROW_LOSS,  # *f32 (2, B) out: label-smoothed CE of each row
    ROW_W,  # *f32 (2, B) out: E_p[sim] - (1-eps) sim_t - eps/Ba sum_j sim (d temp = -scale * sum w)
    B, Ba,
    eps_unif,  # eps / Ba
    BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
):
    pid_r = tl.program_id(0)
    direction = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_in = offs_r < B
    t = tl.load(TGT + offs_r, mask=r_in, other=0)
    bad_target = (t < 0) | (t >= Ba)  # no host check is possible without a sync: the loss shows it as NaN
    row_base = SIM + direction.to(tl.int64) * B * Ba + offs_r.to(tl.int64) * Ba
    base = row_base[:, None]
    # The smoothed-CE terms are taken relative to the row's target sim s_t: with d_j = s_j - s_t,
    #   loss = (m - s_t) + log l - eps/Ba sum_j d_j,   w = E_p[d] - eps/Ba sum_j d_j   (sum_j (p_j - q_j) = 0).
    # Written with absolute sims, both are differences of values ~ 1 / temp that nearly cancel (a row's sims often
    # differ by percents only): fp32 rounding of ~1e-6 per row, as large as d temp's whole fp32 error (d temp is
    # ill-conditioned in the sims). The d_j are small and s_j - s_t rounds relative to them.
    s_t = tl.load(row_base + tl.where(bad_target, 0, t), mask=r_in, other=0.0)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], tl.float32)  # sum exp(s - m)
    u = tl.zeros([BLOCK_R], tl.float32)  # sum exp(s - m) * (s - s_t)
    d_sum = tl.zeros([BLOCK_R], tl.float32)  # sum (s - s_t)
    for j0 in range(0, Ba, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask = r_in[:, None] & (offs_j < Ba)[None, :]
        s = tl.load(base + offs_j[None, :], mask=mask, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padded rows: no inf - inf
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        d = tl.where(mask, s - s_t[:, None], 0.0)
        l = l * alpha + tl.sum(p, axis=1)
        u = u * alpha + tl.sum(p * d, axis=1)
        d_sum += tl.sum(d, axis=1)
        m = m_new
    l_safe = tl.where(r_in, l, 1.0)
    unif = eps_unif * d_sum
    loss = tl.where(bad_target, float("nan"), ((m - s_t) + tl.log(l_safe)) - unif)
    w = u / l_safe - unif
    out = direction * B + offs_r
    tl.store(ROW_MAX + out, m, mask=r_in)
    tl.store(ROW_SUM + out, l_safe, mask=r_in)
    tl.store(ROW_LOSS + out, loss, mask=r_in)
    tl.store(ROW_W + out, w, mask=r_in)


# ---------------------------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _dsim_tile(SIM, ARG, STATS, stride_stat, TGT, offs_a, offs_c, NA, NC, stride_sa, stride_sc, row_is_a, eps_keep,
               eps_unif):
    """(BLOCK_A, BLOCK_C) fp32 p - (1-eps)[j == t_b] - eps/Ba (0 outside the matrix) and the argmax queries (-1
    outside). The CE row b is a when row_is_a (i2t), else c (t2i); j is the other index.
    p = exp(sim - m) / l from the row max m and sum l (STATS[0], STATS[1]), not exp(sim - lse): sim - m is exact
    for the large entries, while lse ~ 1 / temp carries an absolute rounding of ~1e-6 into every p. The gradients
    sum p_j * feature_j over nearly parallel features (sum_j dsim_j = 0), so p's relative error is what they keep."""
    a2 = offs_a[:, None] + 0 * offs_c[None, :]
    c2 = offs_c[None, :] + 0 * offs_a[:, None]
    inside = (a2 < NA) & (c2 < NC)
    off = a2.to(tl.int64) * stride_sa + c2.to(tl.int64) * stride_sc
    s = tl.load(SIM + off, mask=inside, other=0.0)
    arg = tl.load(ARG + off, mask=inside, other=-1)
    b = tl.where(row_is_a != 0, a2, c2)
    j = tl.where(row_is_a != 0, c2, a2)
    m = tl.load(STATS + b, mask=inside, other=0.0)
    l = tl.load(STATS + stride_stat + b, mask=inside, other=1.0)
    t = tl.load(TGT + b, mask=inside, other=-1)
    d = tl.exp(s - m) / l - tl.where(j == t, eps_keep, 0.0) - eps_unif
    return tl.where(inside, d, 0.0), arg


@triton.jit
def _expand_queries(d, arg, QP: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr):
    """(BLOCK_A * QP, BLOCK_C): row (a, q) holds d[a, c] where arg[a, c] == q, else 0 (the max routes the
    gradient to its argmax query only)."""
    qv = tl.arange(0, QP)[None, :, None]
    g3 = tl.where(arg[:, None, :] == qv, d[:, None, :], 0.0)
    return tl.reshape(g3, (BLOCK_A * QP, BLOCK_C))


@triton.jit(do_not_specialize=_SIZES + ["B", "row_is_a"])
def _bwd_multi_kernel(
    C,  # *T (NC, E) single-vector side; unit stride along E
    SIM,  # *f32 similarities (from the forward), element (a, c) at a * stride_sa + c * stride_sc
    ARG,  # *i32 argmax queries, same layout as SIM
    STATS,  # *f32 (2, B) of this direction: row max m, row sum of exp(sim - m) at + stride_stat; unit stride in B
    TGT,  # *i64 (B,) target columns
    GRAD,  # *f32 () incoming gradient of the loss
    TEMP,  # *f32 () temperature
    DA,  # *T (NA, Q, E) out, or *f32 (splits, NA, Q, E) partials; unit stride along E
    stride_c,
    stride_sa, stride_sc,
    stride_stat,
    stride_dsplit, stride_da, stride_daq,  # DA strides of a split (0 when unsplit), a row, a query
    NA, NC, Q, E,
    B,  # rows of the loss (the mean's divisor)
    row_is_a,  # 1: the CE row is a (i2t), 0: it is c (t2i)
    eps_keep, eps_unif,
    blocks_per_split,  # C blocks summed by one program (grid axis 1 = splits of C's blocks)
    QP: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_a = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_e = tl.arange(0, BLOCK_E)
    e_in = offs_e < E
    acc = tl.zeros([BLOCK_A * QP, BLOCK_E], tl.float32)
    n_blocks = tl.cdiv(NC, BLOCK_C)
    lo = pid_s * blocks_per_split
    hi = tl.minimum(lo + blocks_per_split, n_blocks)
    for cb in range(lo, hi):
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        d, arg = _dsim_tile(SIM, ARG, STATS, stride_stat, TGT, offs_a, offs_c, NA, NC, stride_sa, stride_sc, row_is_a,
                            eps_keep, eps_unif)
        c_tile = tl.load(C + offs_c[:, None].to(tl.int64) * stride_c + offs_e[None, :],
                         mask=(offs_c < NC)[:, None] & e_in[None, :], other=0.0)
        g = _expand_queries(d, arg, QP, BLOCK_A, BLOCK_C).to(c_tile.dtype)
        acc += tl.dot(g, c_tile, input_precision=DOT_PRECISION)
    scale = tl.load(GRAD) * 0.5 / (B * tl.load(TEMP))
    r = tl.arange(0, BLOCK_A * QP)
    rows = pid_a * BLOCK_A + r // QP
    r_q = r % QP
    row_in = (rows < NA) & (r_q < Q)
    out = DA + pid_s.to(tl.int64) * stride_dsplit + rows[:, None].to(tl.int64) * stride_da \
        + r_q[:, None] * stride_daq + offs_e[None, :]
    tl.store(out, (acc * scale).to(DA.dtype.element_ty), mask=row_in[:, None] & e_in[None, :])


@triton.jit(do_not_specialize=_SIZES + ["B", "row_is_a"])
def _bwd_single_kernel(
    A,  # *T (NA, Q, E) multi-vector side; unit stride along E
    SIM,  # *f32 similarities, element (a, c) at a * stride_sa + c * stride_sc
    ARG,  # *i32 argmax queries, same layout as SIM
    STATS,  # *f32 (2, B) of this direction: row max m, row sum of exp(sim - m) at + stride_stat; unit stride in B
    TGT,  # *i64 (B,) target columns
    GRAD,  # *f32 () incoming gradient of the loss
    TEMP,  # *f32 () temperature
    DC,  # *T (NC, E) out, or *f32 (splits, NC, E) partials; unit stride along E
    stride_a, stride_aq,
    stride_sa, stride_sc,
    stride_stat,
    stride_dsplit, stride_dc,  # DC strides of a split (0 when unsplit) and of a row
    NA, NC, Q, E,
    B,
    row_is_a,
    eps_keep, eps_unif,
    blocks_per_split,  # A blocks summed by one program (grid axis 1 = splits of A's blocks)
    QP: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_e = tl.arange(0, BLOCK_E)
    e_in = offs_e < E
    r = tl.arange(0, BLOCK_A * QP)
    r_a = r // QP
    r_q = r % QP
    acc = tl.zeros([BLOCK_C, BLOCK_E], tl.float32)
    n_blocks = tl.cdiv(NA, BLOCK_A)
    lo = pid_s * blocks_per_split
    hi = tl.minimum(lo + blocks_per_split, n_blocks)
    for ab in range(lo, hi):
        offs_a = ab * BLOCK_A + tl.arange(0, BLOCK_A)
        d, arg = _dsim_tile(SIM, ARG, STATS, stride_stat, TGT, offs_a, offs_c, NA, NC, stride_sa, stride_sc, row_is_a,
                            eps_keep, eps_unif)
        rows = ab * BLOCK_A + r_a
        row_in = (rows < NA) & (r_q < Q)
        a_tile = tl.load(A + rows[:, None].to(tl.int64) * stride_a + r_q[:, None] * stride_aq + offs_e[None, :],
                         mask=row_in[:, None] & e_in[None, :], other=0.0)
        g = _expand_queries(d, arg, QP, BLOCK_A, BLOCK_C).to(a_tile.dtype)
        acc += tl.dot(tl.trans(g), a_tile, input_precision=DOT_PRECISION)
    scale = tl.load(GRAD) * 0.5 / (B * tl.load(TEMP))
    out = DC + pid_s.to(tl.int64) * stride_dsplit + offs_c[:, None].to(tl.int64) * stride_dc + offs_e[None, :]
    tl.store(out, (acc * scale).to(DC.dtype.element_ty), mask=(offs_c < NC)[:, None] & e_in[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Block configurations


@dataclass(frozen=True)
class BlockConfig:
    qp: int  # queries padded (constexpr QP)
    block_a: int  # A rows per tile (BLOCK_A * QP = the dot's M or K)
    block_c: int  # C rows per tile
    block_e: int  # feature width padded (the whole row)
    num_warps: int = 4
    num_stages: int = 2


KERNEL_NAMES = ("sims", "ce", "bwd_multi", "bwd_single")
CE_BLOCK_R, CE_BLOCK_J = 4, 256  # _ce_kernel: rows per program, columns per step


def _pad(n: int, pads: tuple) -> int:
    for p in pads:
        if n <= p:
            return p
    raise ValueError(f"{n} exceeds the largest padded size {pads[-1]}")


# The launchers' whole choice (every entry is lowered for sm_90 by aot_cases(); see the module docstring):
#   QP = Q padded to 16 / 32 / 64; BLOCK_A = 64 // QP, so BLOCK_A * QP = 64 (a wgmma-sized M, the K of bwd_single)
#   BLOCK_C = 64 (the N of sims, the K of bwd_multi, the M of bwd_single); 32 for fp32 sims: with 64, fp32 at
#             QP = 64 spilled 9 KB per thread (IEEE fp32 dots run on FMA units, operands in registers), 8 bytes now;
#             16 for fp32 sims at E = 256: with 32, triton 3.9 (ptxas 13.x for sm_90) gave the IEEE case 32
#             registers and a 4 KB stack, while 16 lowers without stack on triton 3.6 and 3.9 alike
#   BLOCK_E = E padded to 64 / 128 / 256: a whole feature row per tile (sims keeps its C tile resident)
#   warps: 4 for half-precision sims; 8 for fp32 sims and for the backward kernels (their (64, BLOCK_E) fp32
#          accumulators; fp32 ones use 255 registers with <= 48 bytes of stack, half ones <= 209 and none).
#   Lowered for sm_90 (triton 3.6 and 3.9): shared memory <= 148 KB (fp32 tf32 sims, E = 256), bf16/fp16 <= 64 KB.
# Not measured on a GPU yet: the GPU benchmark (benchmarks/bench_itc_loss.py) is where this table gets tuned.
def launch_config(kernel: str, q: int, e: int, dtype: torch.dtype) -> BlockConfig:
    if kernel not in KERNEL_NAMES:
        raise ValueError(f"unknown kernel {kernel!r}; one of {KERNEL_NAMES}")
    qp, ep = _pad(q, Q_PADS), _pad(e, E_PADS)
    fp32 = dtype == torch.float32
    block_c = (16 if ep == 256 else 32) if kernel == "sims" and fp32 else 64
    warps = 8 if kernel != "sims" or fp32 else 4
    return BlockConfig(qp=qp, block_a=64 // qp, block_c=block_c, block_e=ep, num_warps=warps)


def dot_precisions(dtype: torch.dtype) -> tuple[str, ...]:
    """The DOT_PRECISION values a launch may use for this dtype (the option only matters for fp32)."""
    return ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands: IEEE unless torch allows TF32 for float32 matmuls (the reference then uses TF32 too)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


# ---------------------------------------------------------------------------------------------------------------
# Launchers (plain functions; the torch.library ops live in blip2fast/ops/itc_loss.py)

_sm_counts: dict = {}


def _program_target(device: torch.device) -> int:
    if PROGRAM_TARGET is not None:
        return PROGRAM_TARGET
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def _splits(out_blocks: int, loop_blocks: int, device: torch.device) -> tuple[int, int]:
    """(splits, blocks per split) of a loop over `loop_blocks` in each of `out_blocks` programs: enough splits to
    reach the program target, never an empty split."""
    splits = max(1, min(loop_blocks, _program_target(device) // max(1, out_blocks)))
    per = triton.cdiv(loop_blocks, splits)
    return triton.cdiv(loop_blocks, per), per


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_sims(A: Tensor, C: Tensor, temp: Tensor, sim: Tensor, arg: Tensor, stride_sa: int,
                 stride_sc: int) -> None:
    NA, Q, E = A.shape
    NC = C.shape[0]
    cfg = launch_config("sims", Q, E, A.dtype)
    c_blocks = triton.cdiv(NC, cfg.block_c)
    splits, per = _splits(c_blocks, triton.cdiv(NA, cfg.block_a), A.device)
    _sims_kernel[(c_blocks, splits)](
        A, C, temp, sim, arg, A.stride(0), A.stride(1), C.stride(0), stride_sa, stride_sc, NA, NC, Q, E, per,
        QP=cfg.qp, BLOCK_A=cfg.block_a, BLOCK_C=cfg.block_c, BLOCK_E=cfg.block_e,
        DOT_PRECISION=_dot_precision(A.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    LAUNCHES["sims"] += 1


def forward(image_feats: Tensor, text_feat: Tensor, image_all: Tensor, text_all: Tensor, temp: Tensor,
            targets: Tensor, label_smoothing: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss () f32, sims (2, B, Ba) f32 = [sim_i2t, sim_t2i], args (2, B, Ba) i32 argmax queries, stats (2, 2, B)
    f32 = [row max, row sum of exp(sim - max)] x [i2t, t2i] (softmax for the backward; lse = max + log(sum)), wsum
    () f32 = sum of the rows' w, for d temp)."""
    image_feats, text_feat, image_all, text_all = (_unit_last(t) for t in (image_feats, text_feat, image_all,
                                                                            text_all))
    targets = targets.contiguous()
    B, Ba = image_feats.shape[0], image_all.shape[0]
    dev = image_feats.device
    sims = torch.empty((2, B, Ba), dtype=torch.float32, device=dev)
    args = torch.empty((2, B, Ba), dtype=torch.int32, device=dev)
    _launch_sims(image_feats, text_all, temp, sims[0], args[0], Ba, 1)  # a = b, c = j
    _launch_sims(image_all, text_feat, temp, sims[1], args[1], 1, Ba)  # a = j, c = b
    rows = torch.empty((4, 2, B), dtype=torch.float32, device=dev)  # row max, row sum, row loss, row w
    eps = float(label_smoothing)
    _ce_kernel[(triton.cdiv(B, CE_BLOCK_R), 2)](
        sims, targets, rows[0], rows[1], rows[2], rows[3], B, Ba, eps / Ba,
        BLOCK_R=CE_BLOCK_R, BLOCK_J=CE_BLOCK_J, num_warps=4,
    )
    LAUNCHES["ce"] += 1
    loss = rows[2].sum() * (0.5 / B)
    return loss, sims, args, rows[:2].clone(), rows[3].sum()


def _grad_multi(A: Tensor, C: Tensor, sim: Tensor, arg: Tensor, stats: Tensor, targets: Tensor, grad: Tensor,
                temp: Tensor, stride_sa: int, stride_sc: int, row_is_a: bool, B: int, eps: float) -> Tensor:
    """dA (NA, Q, E) in A's dtype."""
    NA, Q, E = A.shape
    NC = C.shape[0]
    cfg = launch_config("bwd_multi", Q, E, A.dtype)
    a_blocks = triton.cdiv(NA, cfg.block_a)
    splits, per = _splits(a_blocks, triton.cdiv(NC, cfg.block_c), A.device)
    dA = torch.empty((NA, Q, E), dtype=A.dtype, device=A.device)
    out = dA if splits == 1 else torch.empty((splits, NA, Q, E), dtype=torch.float32, device=A.device)
    _bwd_multi_kernel[(a_blocks, splits)](
        C, sim, arg, stats, targets, grad, temp, out,
        C.stride(0), stride_sa, stride_sc, stats.stride(0), 0 if splits == 1 else out.stride(0), Q * E, E,
        NA, NC, Q, E, B, int(row_is_a), 1.0 - eps, eps / sim.shape[-1], per,  # sim is (B, Ba) both ways
        QP=cfg.qp, BLOCK_A=cfg.block_a, BLOCK_C=cfg.block_c, BLOCK_E=cfg.block_e,
        DOT_PRECISION=_dot_precision(A.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    LAUNCHES["bwd_multi"] += 1
    if splits > 1:
        dA.copy_(out.sum(0))  # the splits in a fixed order: deterministic
    return dA


def _grad_single(A: Tensor, C: Tensor, sim: Tensor, arg: Tensor, stats: Tensor, targets: Tensor, grad: Tensor,
                 temp: Tensor, stride_sa: int, stride_sc: int, row_is_a: bool, B: int, eps: float) -> Tensor:
    """dC (NC, E) in C's dtype."""
    NA, Q, E = A.shape
    NC = C.shape[0]
    cfg = launch_config("bwd_single", Q, E, A.dtype)
    c_blocks = triton.cdiv(NC, cfg.block_c)
    splits, per = _splits(c_blocks, triton.cdiv(NA, cfg.block_a), A.device)
    dC = torch.empty((NC, E), dtype=C.dtype, device=C.device)
    out = dC if splits == 1 else torch.empty((splits, NC, E), dtype=torch.float32, device=C.device)
    _bwd_single_kernel[(c_blocks, splits)](
        A, sim, arg, stats, targets, grad, temp, out,
        A.stride(0), A.stride(1), stride_sa, stride_sc, stats.stride(0), 0 if splits == 1 else out.stride(0), E,
        NA, NC, Q, E, B, int(row_is_a), 1.0 - eps, eps / sim.shape[-1], per,  # sim is (B, Ba) both ways
        QP=cfg.qp, BLOCK_A=cfg.block_a, BLOCK_C=cfg.block_c, BLOCK_E=cfg.block_e,
        DOT_PRECISION=_dot_precision(A.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    LAUNCHES["bwd_single"] += 1
    if splits > 1:
        dC.copy_(out.sum(0))
    return dC


def backward(grad: Tensor, image_feats: Tensor, text_feat: Tensor, image_all: Tensor, text_all: Tensor,
             temp: Tensor, targets: Tensor, label_smoothing: float, sims: Tensor, args: Tensor, stats: Tensor,
             wsum: Tensor, output_mask) -> tuple[Optional[Tensor], ...]:
    """(d image_feats, d text_feat, d image_all, d text_all, d temp); None where output_mask is False (not
    computed). grad: () f32 gradient of the loss."""
    image_feats, text_feat, image_all, text_all = (_unit_last(t) for t in (image_feats, text_feat, image_all,
                                                                            text_all))
    targets = targets.contiguous()
    B, Ba = image_feats.shape[0], image_all.shape[0]
    eps = float(label_smoothing)
    want_if, want_tf, want_ia, want_ta, want_temp = (bool(m) for m in output_mask)
    # i2t: A = image_feats (a = b), C = text_all (c = j); t2i: A = image_all (a = j), C = text_feat (c = b)
    i2t = (sims[0], args[0], stats[:, 0], targets, grad, temp, Ba, 1, True, B, eps)
    t2i = (sims[1], args[1], stats[:, 1], targets, grad, temp, 1, Ba, False, B, eps)
    d_if = _grad_multi(image_feats, text_all, *i2t) if want_if else None
    d_ta = _grad_single(image_feats, text_all, *i2t) if want_ta else None
    d_ia = _grad_multi(image_all, text_feat, *t2i) if want_ia else None
    d_tf = _grad_single(image_all, text_feat, *t2i) if want_tf else None
    d_temp = (grad * wsum * (-0.5 / B) / temp).reshape(()) if want_temp else None
    return d_if, d_tf, d_ia, d_ta, d_temp


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time lowering: triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90,
# 32), options=options) for every launch configuration, with the specialisation a real launch gets (16-byte
# aligned pointers; strides divisible by 16 where the launchers' strides are: Q * E, E for EP >= 64 and E % 16 == 0
# is the common case, so they are declared divisible; smaller or odd E only drops a hint).

_TL_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_KERNELS = {"sims": _sims_kernel, "ce": _ce_kernel, "bwd_multi": _bwd_multi_kernel, "bwd_single": _bwd_single_kernel}
_F32_PTRS = ("TEMP", "SIM", "STATS", "GRAD", "ROW_MAX", "ROW_SUM", "ROW_LOSS", "ROW_W")
_F32_ARGS = ("eps_keep", "eps_unif")


def all_launch_configs() -> list[tuple[str, torch.dtype, str, str, BlockConfig]]:
    """Every (kernel, input dtype, output pointer type, dot precision, block config) the launchers can launch.
    The backward kernels write their output directly (the input dtype) or fp32 partials (split launches)."""
    out = []
    for kernel in ("sims", "bwd_multi", "bwd_single"):
        for dtype in DTYPES:
            outs = ("",) if kernel == "sims" else tuple(dict.fromkeys((_TL_TYPES[dtype], "fp32")))
            for q in Q_PADS:
                for e in E_PADS:
                    cfg = launch_config(kernel, q, e, dtype)
                    for prec in dot_precisions(dtype):
                        out.extend((kernel, dtype, o, prec, cfg) for o in outs)
    out.append(("ce", torch.float32, "", "ieee", BlockConfig(qp=0, block_a=CE_BLOCK_R, block_c=CE_BLOCK_J,
                                                              block_e=0, num_warps=4)))
    return out


def aot_spec(kernel: str, dtype: torch.dtype, out_type: str, dot_precision: str, cfg: BlockConfig):
    """(fn, signature, constexprs, attrs, options) for one launch configuration. Listing works anywhere; lowering
    (triton.compile) needs a process without TRITON_INTERPRET=1 (kernels/_aot.py runs one)."""
    fn = _KERNELS[kernel]
    if kernel == "ce":
        constexprs = dict(BLOCK_R=cfg.block_a, BLOCK_J=cfg.block_c)
    else:
        constexprs = dict(QP=cfg.qp, BLOCK_A=cfg.block_a, BLOCK_C=cfg.block_c, BLOCK_E=cfg.block_e,
                          DOT_PRECISION=dot_precision)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.isupper() and name not in ("NA", "NC", "Q", "E", "B"):  # pointers are in capitals
            if name == "TGT":
                signature[name] = "*i64"
            elif name == "ARG":
                signature[name] = "*i32"
            elif name in _F32_PTRS:
                signature[name] = "*fp32"
            elif name in ("DA", "DC"):
                signature[name] = "*" + out_type
            else:
                signature[name] = "*" + _TL_TYPES[dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _F32_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in ("stride_a", "stride_c", "stride_da", "stride_dc", "stride_dsplit"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return fn, signature, constexprs, attrs, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def aot_cases() -> list[tuple[str, object, dict, dict, dict, dict]]:
    """(label, jit_fn, signature, constexprs, attrs, options) for every launch configuration the launchers can
    pick (each dtype, output pointer type, dot precision, padded Q and E)."""
    cases = []
    for kernel, dtype, out_type, prec, cfg in all_launch_configs():
        label = (f"itc_loss.{kernel} {str(dtype).removeprefix('torch.')} "
                 + (f"out={out_type} " if out_type else "") + f"{prec} QP={cfg.qp} A={cfg.block_a} C={cfg.block_c} "
                 f"E={cfg.block_e} w={cfg.num_warps} s={cfg.num_stages}")
        cases.append((label, *aot_spec(kernel, dtype, out_type, prec, cfg)))
    return cases
