"""The counter hash of blip2fast/ops/hashing.py as Triton device functions, shared by every kernel that draws.

hashing.py is the spec (and csrc/counter_hash.h its C++/CUDA twin); these functions must give bit-identical
values. Hash state is uint32, so the multiplications wrap mod 2**32 exactly as the spec says; an int64 key
converted with `.to(tl.uint32)` keeps its low 32 bits, which is the spec's `k mod 2**32`.

    mix32(x)                 the lowbias32 mixer
    combine(h, k)            one hash step: mix32(h ^ k)
    seed_prefix(SEED_STEP, stream)
                             hash(seed_lo, seed_hi, step, stream): the keys every stream starts with, read from
                             the (2,) int64 [seed, step] tensor on device (CUDA-graph safe: nothing on the host)
    gumbel(h)                float32(-log(-log(uniform))) evaluated in float64 and rounded once, as
                             hashing.gumbel_from_hash (tl.log of float64 lowers to libdevice's log on sm_90)

`hash_table` evaluates them on a (row id, column) grid so that tests compare them with hashing.py bit for bit.
"""
from __future__ import annotations

import triton
import triton.language as tl

GOLDEN = 0x9E3779B9  # hashing.GOLDEN: the initial state


@triton.jit
def mix32(x):
    """lowbias32 on uint32 values."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def combine(h, k):
    """h = mix32(h ^ (k mod 2**32)) for a uint32 state h and an integer key (tensor) k."""
    return mix32(h ^ k.to(tl.uint32))


@triton.jit
def seed_prefix(SEED_STEP, stream):
    """hash(seed_lo, seed_hi, step, stream) as a uint32 scalar; SEED_STEP points to int64 [seed, step]."""
    seed = tl.load(SEED_STEP)  # int64
    step = tl.load(SEED_STEP + 1)
    x = tl.full([], 0x9E3779B9, tl.uint32)
    x = combine(x, seed)  # seed_lo: int64 -> uint32 keeps the low 32 bits
    x = combine(x, seed >> 32)  # seed_hi: arithmetic shift, then the low 32 bits, as `(seed >> 32) & MASK32`
    x = combine(x, step)
    x = combine(x, stream)
    return x


@triton.jit
def gumbel(h):
    """Standard Gumbel noise from a uint32 hash: -log(-log(u)), u = ((h >> 8) + 0.5) / 2**24, in float64, then
    rounded once to float32 (hashing.gumbel_from_hash). Always finite (about [-2.85, 17.33])."""
    u = ((h >> 8).to(tl.float64) + 0.5) * (1.0 / 16777216.0)  # exact: 24 bits + 1/2, times a power of two
    return (-tl.log(-tl.log(u))).to(tl.float32)


# ---------------------------------------------------------------------------------------------------------------
# The helpers evaluated on a grid, so tests can compare them bit for bit with hashing.py (and the attention and
# ITM kernels inherit that check): hash(seed_lo, seed_hi, step, stream, row_ids[r], c) and its Gumbel noise.


@triton.jit
def _hash_table_kernel(
    SEED_STEP,  # *i64 (2,) [seed, step]
    ROW_IDS,  # *i64 (rows,) the fifth key of each row
    H,  # *i64 (rows, cols) contiguous out: the uint32 hash, zero-extended
    G,  # *f32 (rows, cols) contiguous out: gumbel(hash)
    rows, cols, stream,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (offs_r < rows)[:, None] & (offs_c < cols)[None, :]
    row_hash = combine(seed_prefix(SEED_STEP, stream), tl.load(ROW_IDS + offs_r, mask=offs_r < rows, other=0))
    h = combine(row_hash[:, None], offs_c[None, :])
    out = offs_r.to(tl.int64)[:, None] * cols + offs_c[None, :]
    tl.store(H + out, h.to(tl.int64), mask=inside)
    tl.store(G + out, gumbel(h), mask=inside)


_TABLE_BLOCKS = (16, 64)  # (BLOCK_R, BLOCK_C)


def hash_table(seed_step, stream: int, row_ids, cols: int):
    """(hash (rows, cols) int64, gumbel (rows, cols) float32) for keys (seed, step, stream, row_ids[r], c)."""
    import torch

    rows = row_ids.shape[0]
    h = torch.empty((rows, cols), dtype=torch.int64, device=row_ids.device)
    g = torch.empty((rows, cols), dtype=torch.float32, device=row_ids.device)
    br, bc = _TABLE_BLOCKS
    if rows and cols:
        _hash_table_kernel[(triton.cdiv(rows, br), triton.cdiv(cols, bc))](
            seed_step, row_ids, h, g, rows, cols, int(stream), BLOCK_R=br, BLOCK_C=bc)
    return h, g


def aot_cases() -> list:
    """(label, jit_fn, signature, constexprs, attrs, options) of the one launch configuration of hash_table."""
    signature = {"SEED_STEP": "*i64", "ROW_IDS": "*i64", "H": "*i64", "G": "*fp32", "rows": "i32", "cols": "i32",
                 "stream": "i32", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
    br, bc = _TABLE_BLOCKS
    return [("hash_table", _hash_table_kernel, signature, dict(BLOCK_R=br, BLOCK_C=bc), {}, dict(num_warps=4))]
