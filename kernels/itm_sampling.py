"""ITM hard-negative sampling in Triton: the Gumbel-max draw of blip2fast/ops/itm_sampling.py, one launch.

The semantics are `itm_sample_negatives_ref` (read it first); this kernel must give identical indices:

    neg[r] = argmax_j  float32(sim[r, j]) + gumbel(hash(seed, step, stream, row_ids[r], j))   over candidates j

  candidates  the columns j != positive[r] whose logit is finite (tested on the float32 bit pattern)
  noise       the counter hash and the float64-then-float32 Gumbel transform of kernels/_hash.py, bit-identical to
              blip2fast/ops/hashing.py; the sum with the logit is one float32 add, as the reference does
  ties        torch.argmax returns the first maximal index: inside a tile the smallest column among those equal to
              the tile's maximum; across tiles a later tile wins only with a strictly larger score
  fallback    a row with no candidate takes the argmax of the noise alone over the columns j != positive[r] (a
              uniform draw) and sets its flag in FALLBACK; the caller sums the flags (a deterministic torch sum,
              no atomics)

One program per block of BLOCK_R rows; it loops over the columns in tiles of BLOCK_C, keeping both running
argmaxes (candidates, fallback) per row. sim is read with its strides (sim_i2t may be a transposed view), in its
own dtype (fp32/fp16/bf16) and scored in fp32. Nothing is read back to the host.

Launch counts are kept in LAUNCHES (a Counter by kernel name), so tests can check that the kernel really ran.
"""
from __future__ import annotations

import collections
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._hash import combine, gumbel, seed_prefix

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAUNCHES: collections.Counter = collections.Counter()  # kernel name -> launches in this process

# Whether the kernel was built for the interpreter (TRITON_INTERPRET=1 when this module was imported): then it runs
# on CPU tensors (numpy), not on a GPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# larger than any column: "no column of this tile qualifies" in the first-index min
_NO_INDEX = tl.constexpr(2147483647)


@triton.jit
def _merge_argmax(best, best_j, score, valid, offs_c):
    """Fold one tile into a running (score, first index) per row. score: (BLOCK_R, BLOCK_C) fp32, finite where
    valid (a finite logit plus finite noise) and -inf elsewhere; best starts at -inf with best_j = -1."""
    m = tl.max(score, axis=1)
    j = tl.min(tl.where(valid & (score == m[:, None]), offs_c[None, :], _NO_INDEX), axis=1)
    # A tile without a valid column has m = -inf and never wins; a later tile wins only strictly (ties keep the
    # earlier, smaller index, as torch.argmax does).
    take = m > best
    return tl.where(take, m, best), tl.where(take, j, best_j)


@triton.jit(do_not_specialize=["rows", "cols", "stream"])
def _itm_sample_kernel(
    SIM,  # *T (rows, cols) similarity logits (fp32/fp16/bf16), strides stride_r, stride_c
    POS,  # *i64 (rows,) column of each row's positive (excluded from the draw)
    ROW_IDS,  # *i64 (rows,) global row index of each row: a hash key
    SEED_STEP,  # *i64 (2,) [seed, step]: hash keys, read on device
    NEG,  # *i64 (rows,) out: the drawn negative column of each row
    FALLBACK,  # *i32 (rows,) out: 1 where the row had no finite candidate (uniform draw), else 0
    rows, cols,
    stride_r, stride_c,  # element strides of SIM
    stream,  # hashing.STREAM_ITM_*: keeps the two directions independent
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = offs_r < rows
    pos = tl.load(POS + offs_r, mask=row_in, other=-1)
    row_hash = combine(seed_prefix(SEED_STEP, stream), tl.load(ROW_IDS + offs_r, mask=row_in, other=0))
    row_ptr = SIM + offs_r.to(tl.int64) * stride_r

    best = tl.full([BLOCK_R], float("-inf"), tl.float32)  # candidates: max of logit + noise
    best_j = tl.full([BLOCK_R], -1, tl.int32)
    fb = tl.full([BLOCK_R], float("-inf"), tl.float32)  # fallback: max of the noise alone
    fb_j = tl.full([BLOCK_R], -1, tl.int32)
    for start in range(0, cols, BLOCK_C):
        offs_c = start + tl.arange(0, BLOCK_C)
        inside = row_in[:, None] & (offs_c < cols)[None, :]
        x = tl.load(row_ptr[:, None] + offs_c.to(tl.int64)[None, :] * stride_c, mask=inside, other=0.0)
        x = x.to(tl.float32)  # fp16/bf16 upcast exactly, inf and NaN preserved
        g = gumbel(combine(row_hash[:, None], offs_c[None, :]))  # (BLOCK_R, BLOCK_C) fp32
        not_pos = inside & (offs_c[None, :].to(tl.int64) != pos[:, None])
        finite = (x.to(tl.uint32, bitcast=True) & 0x7F800000) != 0x7F800000  # immune to fast-math assumptions
        cand = not_pos & finite
        best, best_j = _merge_argmax(best, best_j, tl.where(cand, x + g, float("-inf")), cand, offs_c)
        fb, fb_j = _merge_argmax(fb, fb_j, tl.where(not_pos, g, float("-inf")), not_pos, offs_c)
    has = best_j >= 0
    tl.store(NEG + offs_r, tl.where(has, best_j, fb_j).to(tl.int64), mask=row_in)
    tl.store(FALLBACK + offs_r, tl.where(has, 0, 1).to(tl.int32), mask=row_in)


# ---------------------------------------------------------------------------------------------------------------
# Block configurations
#
# A tile holds 1024 logits (with 4 warps, 8 per thread, each with two float64 logs of noise): BLOCK_C is the
# column count rounded up to a power of two, between 64 and 1024, and BLOCK_R = 1024 // BLOCK_C rows share a
# program. At the paper's size (128 local rows x 8192 global columns) that is one row per program, 128 programs
# (the H200 has 132 SMs), 8 column tiles each; small batches pack several rows into one program.

NUM_WARPS = 4
TILE = 1024
MIN_BLOCK_C = 64


def launch_config(cols: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) for a matrix with `cols` columns."""
    block_c = min(TILE, max(MIN_BLOCK_C, triton.next_power_of_2(max(cols, 1))))
    return TILE // block_c, block_c


def all_launch_configs() -> list[tuple[int, int]]:
    """Every (BLOCK_R, BLOCK_C) launch_config can return."""
    return sorted({launch_config(c) for c in (1, 64, 128, 256, 512, 1024, 10**6)})


# ---------------------------------------------------------------------------------------------------------------
# Launcher (a plain function; the torch.library op lives in blip2fast/ops/itm_sampling.py)


def sample(sim: Tensor, positive: Tensor, row_ids: Tensor, seed_step: Tensor, stream: int,
           neg: Tensor, fallback: Tensor) -> None:
    """Writes neg (rows,) int64 and fallback (rows,) int32 flags. Inputs are checked by the caller (ops/)."""
    rows, cols = sim.shape
    if rows == 0:
        return
    block_r, block_c = launch_config(cols)
    _itm_sample_kernel[(triton.cdiv(rows, block_r),)](
        sim, positive, row_ids, seed_step, neg, fallback,
        rows, cols, sim.stride(0), sim.stride(1), int(stream),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=NUM_WARPS,
    )
    LAUNCHES["itm_sample"] += 1


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time lowering for sm_90 (see kernels/_aot.py): every dtype x block configuration the launcher can pick.

_TL_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_cases() -> list[tuple[str, object, dict, dict, dict, dict]]:
    """(label, jit_fn, signature, constexprs, attrs, options) for every launch configuration the launcher can pick
    (each sim dtype x (BLOCK_R, BLOCK_C)), with a real launch's specialisation (16-byte aligned pointers)."""
    names = _itm_sample_kernel.arg_names
    cases = []
    for dtype, tl_type in _TL_TYPES.items():
        for block_r, block_c in all_launch_configs():
            # contiguous rows (stride_c == 1, which Triton specialises to a constant) at every block config; any
            # strides (a transposed sim) at the widest
            for unit_stride in (True, False) if block_c == TILE else (True,):
                signature = {"SIM": "*" + tl_type, "POS": "*i64", "ROW_IDS": "*i64", "SEED_STEP": "*i64",
                             "NEG": "*i64", "FALLBACK": "*i32", "rows": "i32", "cols": "i32", "stride_r": "i32",
                             "stride_c": "constexpr" if unit_stride else "i32", "stream": "i32",
                             "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
                assert list(signature) == list(names), names
                constexprs = dict(BLOCK_R=block_r, BLOCK_C=block_c)
                if unit_stride:
                    constexprs["stride_c"] = 1
                attrs = {(names.index(p),): [["tt.divisibility", 16]]
                         for p in ("SIM", "POS", "ROW_IDS", "SEED_STEP", "NEG", "FALLBACK", "stride_r")}
                label = f"itm_sample {tl_type} BLOCK_R={block_r} BLOCK_C={block_c} stride_c={1 if unit_stride else 'n'}"
                cases.append((label, _itm_sample_kernel, signature, constexprs, attrs, dict(num_warps=NUM_WARPS)))
    return cases
