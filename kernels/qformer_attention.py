"""Fused Q-Former attention in Triton: forward, and backward for dq, dk, dv. No mask tensor, no K/V copies.

The semantics are `blip2fast.ops.attention.qformer_attention_ref` (read it first); this file computes the same
thing flash-style (online softmax, fp32 statistics and accumulators, the (Lq, Lk) scores never stored):

  scores   s = q k^T / sqrt(d), computed tile by tile in fp32 (fp16/bf16 operands on tensor cores; fp32 operands
           as IEEE fp32, or TF32 when torch's float32 matmul precision is not "highest").
  masks    which keys row i of batch row b sees is a function of scalars, evaluated per tile:
             key padding: PAD_MODE 0 none, 1 per-row key lengths (B,) (keys [0, len) real),
                          2 a (B, Lk) mask (nonzero = real key; the model's int64 attention masks as they are);
             causal (IS_CAUSAL): keys [0, P) always visible, key P + j visible iff j <= i + row_offset.
           The reference adds -10000 to masked scores (BERT / LAVIS). Here a masked key gets probability exactly 0,
           unless every key of the row is masked: then the row is softmax over all its keys, which is what the
           additive mask gives (the shift cancels). The two agree to within exp(-9000) whenever a row's visible
           scores are not ~9000 below its masked ones, i.e. always; and this way is exact, where adding -10000 in
           fp32 rounds the scores of an all-masked row to ~1e-3.
  images   HAS_KV_INDEX: row b reads K/V row kv_index[b] (the 3B ITM rows read the B images' K/V, no gather).
  dropout  HAS_DROPOUT: probability (b, h, i, k) is kept iff (hash >> 8) >= threshold, the uint32 counter hash of
           blip2fast/ops/hashing.py with keys (seed_lo, seed_hi, step, STREAM_ATTN_DROPOUT=3, site, row_ids[b], h,
           i + q_offset, k): bit-identical to the reference's mask. Kept probabilities are scaled by 1 / (1 - p).

Launch counts are kept in LAUNCHES (a Counter by kernel name), so tests can check that a kernel really ran.

Block configurations: `launch_config` (the table is in its comment); `all_launch_configs()` lists every (kernel,
head dim, dtype, dot precision, blocks) the launchers can pick, and tests/ops/test_triton_lowering.py lowers
each of them for sm_90 and checks its shared memory.
"""
from __future__ import annotations

import collections
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._hash import mix32 as _mix32  # lowbias32 on uint32, shared by every kernel that hashes

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAUNCHES: collections.Counter = collections.Counter()  # kernel name -> launches in this process

# Whether the kernels below were built for the interpreter (TRITON_INTERPRET=1 when this module was imported):
# then they run on CPU tensors (numpy), not on a GPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------------------------
# Counter hash (blip2fast/ops/hashing.py, in uint32: the multiplications wrap mod 2**32 as the spec says)


@triton.jit
def _dropout_row_hash(SEED_STEP, ROW_IDS, b, h, site):
    """Hash state after the keys one (batch row, head) shares: seed_lo, seed_hi, step, stream, site, row, head."""
    seed = tl.load(SEED_STEP)  # int64
    step = tl.load(SEED_STEP + 1)
    x = tl.full([], 0x9E3779B9, tl.uint32)
    x = _mix32(x ^ seed.to(tl.uint32))  # int64 -> uint32 keeps the low 32 bits: seed & 0xFFFFFFFF
    x = _mix32(x ^ (seed >> 32).to(tl.uint32))
    x = _mix32(x ^ step.to(tl.uint32))
    x = _mix32(x ^ 3)  # hashing.STREAM_ATTN_DROPOUT
    x = _mix32(x ^ site.to(tl.uint32))
    x = _mix32(x ^ tl.load(ROW_IDS + b).to(tl.uint32))
    x = _mix32(x ^ h.to(tl.uint32))
    return x


@triton.jit
def _dropout_keep(row_hash, offs_m, offs_n, q_offset, threshold):
    """(BLOCK_M, BLOCK_N) bool: which probabilities of these query rows / key columns survive."""
    hq = _mix32(row_hash ^ (offs_m + q_offset).to(tl.uint32))
    hk = _mix32(hq[:, None] ^ offs_n.to(tl.uint32)[None, :])
    return (hk >> 8) >= threshold.to(tl.uint32)


# ---------------------------------------------------------------------------------------------------------------
# Masks


@triton.jit
def _first_real_key(KEY_PAD, b, stride_pb, Lk, PAD_MODE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Index of the first non-padding key of batch row b (Lk when there is none)."""
    if PAD_MODE == 0:
        first = tl.zeros([], tl.int32)
    elif PAD_MODE == 1:
        first = tl.where(tl.load(KEY_PAD + b) > 0, 0, Lk).to(tl.int32)
    else:
        first = tl.zeros([], tl.int32) + Lk  # an int32 tensor: the loop below carries it
        for start in range(0, Lk, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            real = tl.load(KEY_PAD + b.to(tl.int64) * stride_pb + offs, mask=offs < Lk, other=0) != 0
            first = tl.minimum(first, tl.min(tl.where(real, offs, Lk), axis=0))
    return first


@triton.jit
def _visible(offs_m, offs_n, Lq, Lk, KEY_PAD, b, stride_pb, key_len, first_real, causal_prefix, row_offset,
             PAD_MODE: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: key offs_n gets a nonzero probability in row offs_m (see the module docstring)."""
    in_k = offs_n < Lk
    if PAD_MODE == 0:
        real = in_k
    elif PAD_MODE == 1:
        real = offs_n < key_len
    else:
        real = tl.load(KEY_PAD + b.to(tl.int64) * stride_pb + offs_n, mask=in_k, other=0) != 0
    ok = real[None, :] & (offs_m[:, None] >= 0)  # broadcast to (BLOCK_M, BLOCK_N)
    if IS_CAUSAL:
        text_key = offs_n[None, :] - causal_prefix  # j of key P + j
        ok = ok & ((text_key < 0) | (text_key <= offs_m[:, None] + row_offset))
        # causally visible keys are [0, limit): the row is all-masked iff none of them is real
        limit = tl.minimum(tl.maximum(causal_prefix + offs_m + row_offset + 1, causal_prefix), Lk)
    else:
        limit = offs_m * 0 + Lk
    all_masked = first_real >= limit  # (BLOCK_M,)
    return (ok | all_masked[:, None]) & in_k[None, :] & (offs_m[:, None] < Lq)


# ---------------------------------------------------------------------------------------------------------------
# Forward

# Integer arguments Triton must not specialise (by default an int equal to 1 becomes a constant and one divisible
# by 16 gets its own compiled variant): lengths and mask/dropout parameters change from call to call, and one
# compiled kernel per feature set is enough (strides stay specialised: 16-divisible strides vectorise loads).
_RUNTIME_INTS = ["H", "Lq", "Lk", "causal_prefix", "row_offset", "drop_threshold", "site", "q_offset"]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _fwd_kernel(
    Q,  # *T (B, H, Lq, D) queries; any batch/head/row strides, unit stride along D
    K,  # *T (Bk, H, Lk, D) keys (Bk = B unless HAS_KV_INDEX); unit stride along D
    V,  # *T (Bk, H, Lk, D) values; unit stride along D
    KV_IDX,  # *i64 (B,) K/V batch row read by each query row (HAS_KV_INDEX only)
    KEY_PAD,  # *int (B,) key lengths (PAD_MODE 1) or (B, Lk) mask, nonzero = real key, unit key stride (PAD_MODE 2)
    SEED_STEP,  # *i64 (2,) [seed, step] of the dropout hash (HAS_DROPOUT only)
    ROW_IDS,  # *i64 (B,) global batch row of each row, a dropout hash key (HAS_DROPOUT only)
    O,  # *T (B, H, Lq, D) output; unit stride along D
    LSE,  # *f32 (B, H, Lq) contiguous: log2 of each row's softmax normaliser, in log2-scaled score units
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_pb,  # KEY_PAD batch stride (PAD_MODE 2)
    H, Lq, Lk,
    sm_scale,  # 1 / sqrt(D)
    causal_prefix, row_offset,  # IS_CAUSAL: P and the position of row 0 among the text rows
    drop_threshold,  # keep iff (hash >> 8) >= drop_threshold = round(p * 2**24)
    drop_scale,  # 1 / (1 - p)
    site, q_offset,  # dropout hash keys: call site; position of row 0 in the [queries | text] sequence
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAD_MODE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KV_INDEX: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # batch row x head on axis 0 (2**31 programs; axis 1 stops at 65535)
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    b64 = b.to(tl.int64)
    kb = tl.load(KV_IDX + b).to(tl.int64) if HAS_KV_INDEX else b64

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = offs_m < Lq
    q = tl.load(Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_in[:, None], other=0.0)
    k_base = K + kb * stride_kb + h * stride_kh
    v_base = V + kb * stride_vb + h * stride_vh
    key_len = tl.load(KEY_PAD + b) if PAD_MODE == 1 else Lk
    first_real = _first_real_key(KEY_PAD, b, stride_pb, Lk, PAD_MODE, BLOCK_N)
    if HAS_DROPOUT:
        row_hash = _dropout_row_hash(SEED_STEP, ROW_IDS, b, h, site)
    qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_k = offs_n < Lk
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=in_k[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        vis = _visible(offs_m, offs_n, Lq, Lk, KEY_PAD, b, stride_pb, key_len, first_real, causal_prefix,
                       row_offset, PAD_MODE, IS_CAUSAL)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet: no inf - inf
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_DROPOUT:
            keep = _dropout_keep(row_hash, offs_m, offs_n, q_offset, drop_threshold)
            p = tl.where(keep, p * drop_scale, 0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=in_k[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    l_safe = tl.where(row_in, l_i, 1.0)
    acc = acc / l_safe[:, None]
    tl.store(O + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=row_in[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, m_i + tl.log2(l_safe), mask=row_in)


# ---------------------------------------------------------------------------------------------------------------
# Backward
#
#   P = softmax(S) (recomputed from the saved LSE), Pd = P * keep / (1 - p), O = Pd V
#   dV = Pd^T dO;  dPd = dO V^T;  dP = dPd * keep / (1 - p);  dS = P * (dP - D), D = rowsum(dO * O)
#   dQ = dS K / sqrt(d);  dK = dS^T Q / sqrt(d)
#
# _bwd_dkdv_kernel: one program per (K/V batch row, head, key block); it loops over the query rows that read
# this K/V (with kv_index, the CSR list ROW_ORDER[ROW_START[kb] : ROW_START[kb + 1]], so dK/dV of an image read
# by several rows are summed in a fixed order, with no atomics) and over their query blocks. D is recomputed
# from dO and O there (no extra launch). When all keys fit in one block (every self-attention of the Q-Former),
# each (row, head, query block) is seen by exactly one program, which then also writes dQ (DQ_IN_KERNEL): the
# whole backward is one launch. Otherwise _bwd_dq_kernel computes dQ, one program per (row, head, query block).


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _bwd_dkdv_kernel(
    Q,  # *T (B, H, Lq, D) queries; unit stride along D
    K,  # *T (Bk, H, Lk, D) keys; unit stride along D
    V,  # *T (Bk, H, Lk, D) values; unit stride along D
    O,  # *T (B, H, Lq, D) forward output; unit stride along D
    DO,  # *T (B, H, Lq, D) gradient of the output; unit stride along D
    LSE,  # *f32 (B, H, Lq) contiguous, from the forward
    KV_IDX,  # *i64 (B,) K/V batch row of each query row (HAS_KV_INDEX only)
    ROW_ORDER,  # *i64 (B,) query rows sorted by kv_index (stable) (HAS_KV_INDEX only)
    ROW_START,  # *i64 (Bk + 1,) rows of K/V row kb are ROW_ORDER[ROW_START[kb] : ROW_START[kb + 1]] (HAS_KV_INDEX)
    KEY_PAD,  # *int (B,) key lengths (PAD_MODE 1) or (B, Lk) mask, nonzero = real key (PAD_MODE 2)
    SEED_STEP,  # *i64 (2,) [seed, step] (HAS_DROPOUT only)
    ROW_IDS,  # *i64 (B,) global batch rows, a dropout hash key (HAS_DROPOUT only)
    DQ,  # *T (B, H, Lq, D) gradient of q, written when DQ_IN_KERNEL; unit stride along D
    DK,  # *T (Bk, H, Lk, D) gradient of k; unit stride along D
    DV,  # *T (Bk, H, Lk, D) gradient of v; unit stride along D
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_pb,
    H, Lq, Lk,
    sm_scale, causal_prefix, row_offset, drop_threshold, drop_scale, site, q_offset,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAD_MODE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KV_INDEX: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DQ_IN_KERNEL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_kh = tl.program_id(0)  # K/V batch row x head
    pid_n = tl.program_id(1)
    kb = pid_kh // H
    h = pid_kh % H
    kb64 = kb.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_k = offs_n < Lk
    k = tl.load(K + kb64 * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=in_k[:, None], other=0.0)
    v = tl.load(V + kb64 * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=in_k[:, None], other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    if HAS_KV_INDEX:
        r_lo = tl.load(ROW_START + kb).to(tl.int32)
        r_hi = tl.load(ROW_START + kb + 1).to(tl.int32)
    else:
        r_lo = kb
        r_hi = kb + 1
    for r in range(r_lo, r_hi):
        if HAS_KV_INDEX:
            b = tl.load(ROW_ORDER + r).to(tl.int32)
        else:
            b = r
        b64 = b.to(tl.int64)
        key_len = tl.load(KEY_PAD + b) if PAD_MODE == 1 else Lk
        first_real = _first_real_key(KEY_PAD, b, stride_pb, Lk, PAD_MODE, BLOCK_N)
        if HAS_DROPOUT:
            row_hash = _dropout_row_hash(SEED_STEP, ROW_IDS, b, h, site)
        for start_m in range(0, Lq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_in = offs_m < Lq
            q = tl.load(Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                        mask=row_in[:, None], other=0.0)
            do = tl.load(DO + b64 * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                         mask=row_in[:, None], other=0.0)
            o = tl.load(O + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                        mask=row_in[:, None], other=0.0)
            lse = tl.load(LSE + (b64 * H + h) * Lq + offs_m, mask=row_in, other=0.0)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)  # D = rowsum(dO * O)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            vis = _visible(offs_m, offs_n, Lq, Lk, KEY_PAD, b, stride_pb, key_len, first_real, causal_prefix,
                           row_offset, PAD_MODE, IS_CAUSAL)
            p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
            dpd = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # dO V^T
            if HAS_DROPOUT:
                keep = _dropout_keep(row_hash, offs_m, offs_n, q_offset, drop_threshold)
                pd = tl.where(keep, p * drop_scale, 0.0)
                dp = tl.where(keep, dpd * drop_scale, 0.0)
            else:
                pd = p
                dp = dpd
            dv += tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
            if DQ_IN_KERNEL:
                dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION) * sm_scale
                tl.store(DQ + b64 * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
                         dq.to(DQ.dtype.element_ty), mask=row_in[:, None])
    tl.store(DK + kb64 * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=in_k[:, None])
    tl.store(DV + kb64 * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=in_k[:, None])


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _bwd_dq_kernel(
    Q,  # *T (B, H, Lq, D) queries; unit stride along D
    K,  # *T (Bk, H, Lk, D) keys; unit stride along D
    V,  # *T (Bk, H, Lk, D) values; unit stride along D
    O,  # *T (B, H, Lq, D) forward output; unit stride along D
    DO,  # *T (B, H, Lq, D) gradient of the output; unit stride along D
    LSE,  # *f32 (B, H, Lq) contiguous, from the forward
    KV_IDX,  # *i64 (B,) K/V batch row of each query row (HAS_KV_INDEX only)
    KEY_PAD,  # *int (B,) key lengths (PAD_MODE 1) or (B, Lk) mask, nonzero = real key (PAD_MODE 2)
    SEED_STEP,  # *i64 (2,) [seed, step] (HAS_DROPOUT only)
    ROW_IDS,  # *i64 (B,) global batch rows, a dropout hash key (HAS_DROPOUT only)
    DQ,  # *T (B, H, Lq, D) gradient of q; unit stride along D
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_pb,
    H, Lq, Lk,
    sm_scale, causal_prefix, row_offset, drop_threshold, drop_scale, site, q_offset,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAD_MODE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KV_INDEX: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    b64 = b.to(tl.int64)
    kb = tl.load(KV_IDX + b).to(tl.int64) if HAS_KV_INDEX else b64
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = offs_m < Lq
    q = tl.load(Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_in[:, None], other=0.0)
    do = tl.load(DO + b64 * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=row_in[:, None], other=0.0)
    o = tl.load(O + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                mask=row_in[:, None], other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * Lq + offs_m, mask=row_in, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    k_base = K + kb * stride_kb + h * stride_kh
    v_base = V + kb * stride_vb + h * stride_vh
    key_len = tl.load(KEY_PAD + b) if PAD_MODE == 1 else Lk
    first_real = _first_real_key(KEY_PAD, b, stride_pb, Lk, PAD_MODE, BLOCK_N)
    if HAS_DROPOUT:
        row_hash = _dropout_row_hash(SEED_STEP, ROW_IDS, b, h, site)
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_k = offs_n < Lk
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=in_k[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=in_k[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        vis = _visible(offs_m, offs_n, Lq, Lk, KEY_PAD, b, stride_pb, key_len, first_real, causal_prefix,
                       row_offset, PAD_MODE, IS_CAUSAL)
        p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(row_hash, offs_m, offs_n, q_offset, drop_threshold)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(DQ + b64 * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_in[:, None])


# ---------------------------------------------------------------------------------------------------------------
# Block configurations


@dataclass(frozen=True)
class BlockConfig:
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int = 4
    num_stages: int = 2


# The launchers' whole choice (every entry is lowered for sm_90 in CI by tests/ops/test_triton_lowering.py, which
# also reports shared memory, registers and spills; numbers measured with triton 3.6 for sm_90a):
#   BLOCK_N = 64 for head dims <= 64, so every Q-Former self-attention (<= 64 keys) is one key tile and the
#             backward one launch (257 image tokens take 5 tiles); 32 for head dim 128, where 64-key fp32 tiles
#             overflow the 227 KB of shared memory in the backward (263 KB with TF32).
#   BLOCK_M = fwd and dq: 32 for up to 32 query rows (the 32 queries, 32 text tokens, a decoding step) and for
#             fp32; 64 for more rows in fp16/bf16 (the 64 [queries | text] ITM rows: one tile, wgmma-sized).
#             dkdv: 32 (it loops over query tiles; 64 only adds live registers: 200-288 bytes of spills).
#   warps   = 8 for fp32 (4 warps need 255 registers and spill up to 1.5 KB with IEEE fp32 dots) and for dkdv
#             (its dK/dV accumulators, K, V and five score-sized tiles are live at once); else 4.
#   stages  = 2 everywhere. fp32 operands are multiplied as IEEE fp32, or TF32 when torch allows it.
KERNEL_NAMES = ("fwd", "bwd_dkdv", "bwd_dq")


def launch_config(kernel: str, head_dim: int, dtype: torch.dtype, Lq: int) -> BlockConfig:
    if kernel not in KERNEL_NAMES:
        raise ValueError(f"unknown kernel {kernel!r}; one of {KERNEL_NAMES}")
    fp32 = dtype == torch.float32
    block_n = 64 if head_dim <= 64 else 32
    if kernel == "bwd_dkdv":
        return BlockConfig(32, block_n, num_warps=8)
    block_m = 32 if Lq <= 32 or fp32 else 64
    return BlockConfig(block_m, block_n, num_warps=8 if fp32 else 4)


def dot_precisions(dtype: torch.dtype) -> tuple[str, ...]:
    """The DOT_PRECISION values a launch may use for this dtype (the option only matters for fp32)."""
    return ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)


def all_launch_configs() -> list[tuple[str, int, torch.dtype, str, BlockConfig]]:
    """Every (kernel, head dim, dtype, dot precision, block config) the launchers below can launch."""
    out = []
    for kernel in KERNEL_NAMES:
        for d in HEAD_DIMS:
            for dtype in DTYPES:
                cfgs = sorted({launch_config(kernel, d, dtype, Lq) for Lq in (1, 32, 33, 64, 1000)},
                              key=lambda c: c.block_m)
                for prec in dot_precisions(dtype):
                    out.extend((kernel, d, dtype, prec, cfg) for cfg in cfgs)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Launchers (plain functions; the torch.library op lives in blip2fast/ops/attention.py)


@dataclass
class MaskArgs:
    """The mask and dropout parameters shared by the forward and backward launchers."""

    key_padding: Optional[Tensor] = None  # (B,) int lengths or (B, Lk) mask (nonzero = real)
    causal_prefix: Optional[int] = None
    row_offset: int = 0
    kv_index: Optional[Tensor] = None  # (B,) int64
    seed_step: Optional[Tensor] = None  # (2,) int64
    row_ids: Optional[Tensor] = None  # (B,) int64
    dropout_threshold: int = 0  # round(p * 2**24); 0 = no dropout
    dropout_p: float = 0.0
    site: int = 0
    q_offset: int = 0


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands: IEEE unless torch allows TF32 for float32 matmuls (the reference then uses TF32 too)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _common(q: Tensor, m: MaskArgs):
    B, H, Lq, D = q.shape
    dummy = q.new_empty((1,), dtype=torch.int64)  # stands for an absent pointer argument (never read)
    pad_mode, pad, stride_pb = 0, dummy, 0
    if m.key_padding is not None:
        if m.key_padding.dim() == 1:
            pad_mode, pad = 1, m.key_padding
        else:
            pad_mode, pad = 2, _unit_last(m.key_padding)
            stride_pb = pad.stride(0)
    has_drop = m.dropout_p > 0.0
    flags = dict(
        PAD_MODE=pad_mode,
        IS_CAUSAL=m.causal_prefix is not None,
        HAS_KV_INDEX=m.kv_index is not None,
        HAS_DROPOUT=has_drop,
        DOT_PRECISION=_dot_precision(q.dtype),
    )
    scalars = (
        1.0 / math.sqrt(D),
        int(m.causal_prefix or 0), int(m.row_offset),
        int(m.dropout_threshold), (1.0 / (1.0 - m.dropout_p)) if has_drop else 1.0,
        int(m.site), int(m.q_offset),
    )
    ptrs = dict(
        kv_idx=m.kv_index if m.kv_index is not None else dummy,
        pad=pad,
        seed_step=m.seed_step if has_drop else dummy,
        row_ids=m.row_ids if has_drop else dummy,
    )
    return flags, scalars, ptrs, stride_pb


def forward(q: Tensor, k: Tensor, v: Tensor, m: MaskArgs, out: Tensor, lse: Tensor) -> None:
    """Writes out (B, H, Lq, D) and lse (B, H, Lq) fp32 (contiguous)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    cfg = launch_config("fwd", D, q.dtype, Lq)
    flags, scalars, ptrs, stride_pb = _common(q, m)
    grid = (B * H, triton.cdiv(Lq, cfg.block_m))
    _fwd_kernel[grid](
        q, k, v, ptrs["kv_idx"], ptrs["pad"], ptrs["seed_step"], ptrs["row_ids"], out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        stride_pb, H, Lq, Lk, *scalars,
        HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **flags,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    LAUNCHES["fwd"] += 1


def backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, m: MaskArgs,
             dq: Tensor, dk: Tensor, dv: Tensor) -> None:
    """Writes dq, dk, dv (every element). kv_index rows are grouped per K/V row on device (no host sync)."""
    do, q, k, v, out = (_unit_last(t) for t in (do, q, k, v, out))
    B, H, Lq, D = q.shape
    Bk, _, Lk, _ = k.shape
    cfg = launch_config("bwd_dkdv", D, q.dtype, Lq)
    flags, scalars, ptrs, stride_pb = _common(q, m)
    if m.kv_index is not None:
        sorted_idx, row_order = torch.sort(m.kv_index, stable=True)
        row_start = torch.searchsorted(sorted_idx, torch.arange(Bk + 1, device=q.device, dtype=sorted_idx.dtype))
    else:
        row_order = row_start = ptrs["kv_idx"]
    dq_in_kernel = triton.cdiv(Lk, cfg.block_n) == 1
    _bwd_dkdv_kernel[(Bk * H, triton.cdiv(Lk, cfg.block_n))](
        q, k, v, out, do, lse, ptrs["kv_idx"], row_order, row_start, ptrs["pad"], ptrs["seed_step"],
        ptrs["row_ids"], dq, dk, dv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        stride_pb, H, Lq, Lk, *scalars,
        HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DQ_IN_KERNEL=dq_in_kernel, **flags,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    LAUNCHES["bwd_dkdv"] += 1
    if dq_in_kernel:
        return
    cfg = launch_config("bwd_dq", D, q.dtype, Lq)
    _bwd_dq_kernel[(B * H, triton.cdiv(Lq, cfg.block_m))](
        q, k, v, out, do, lse, ptrs["kv_idx"], ptrs["pad"], ptrs["seed_step"], ptrs["row_ids"], dq,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        stride_pb, H, Lq, Lk, *scalars,
        HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **flags,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    LAUNCHES["bwd_dq"] += 1


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time lowering (kernels/_aot.py, tests/ops/test_triton_lowering.py): the arguments of
# triton.compile(ASTSource(...)) for one launch configuration, by default with every feature switched on (mask
# tensor, causal, kv_index, dropout, dq in the dkdv kernel) and the specialisation a real launch gets (16-byte
# aligned pointers, strides divisible by 16).

_TL_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_KERNELS = {"fwd": _fwd_kernel, "bwd_dkdv": _bwd_dkdv_kernel, "bwd_dq": _bwd_dq_kernel}
_I64_POINTERS = ("KV_IDX", "ROW_ORDER", "ROW_START", "KEY_PAD", "SEED_STEP", "ROW_IDS")  # KEY_PAD: the int64 mask
_F32_ARGS = ("sm_scale", "drop_scale")


FEATURES_ALL_ON = dict(PAD_MODE=2, IS_CAUSAL=True, HAS_KV_INDEX=True, HAS_DROPOUT=True, DQ_IN_KERNEL=True)


def feature_variants() -> list[dict]:
    """Feature switches that reach every branch of the kernels: all on, all off, and each switched off (or to its
    other value) alone. `all_launch_configs()` are lowered all-on; these are lowered for one block config."""
    off = dict(PAD_MODE=0, IS_CAUSAL=False, HAS_KV_INDEX=False, HAS_DROPOUT=False, DQ_IN_KERNEL=False)
    variants = [dict(FEATURES_ALL_ON), off, dict(FEATURES_ALL_ON, PAD_MODE=1)]
    variants += [dict(FEATURES_ALL_ON, **{name: value}) for name, value in off.items()]
    return variants


def aot_spec(kernel: str, head_dim: int, dtype: torch.dtype, cfg: BlockConfig, dot_precision: str = "ieee",
             features: Optional[dict] = None):
    """(fn, signature, constexprs, attrs, options) for triton.compile(ASTSource(fn, signature, constexprs, attrs),
    target=..., options=options). features: the switches (default FEATURES_ALL_ON)."""
    if INTERPRETED:
        raise RuntimeError("aot_spec needs the compiled kernels: run it in a process without TRITON_INTERPRET=1")
    fn = _KERNELS[kernel]
    features = dict(FEATURES_ALL_ON if features is None else features)
    if kernel != "bwd_dkdv":
        features.pop("DQ_IN_KERNEL", None)
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_PRECISION=dot_precision,
                      **features)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.isupper() and name != "H":  # a pointer (arguments in capitals, H aside)
            signature[name] = "*i64" if name in _I64_POINTERS else "*fp32" if name == "LSE" else "*" + _TL_TYPES[dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _F32_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return fn, signature, constexprs, attrs, options
