"""Counter-based random numbers shared by every backend (torch, Triton, CUDA, C++).

Why a hash and not torch's generator: the ITM negative draw and the attention-dropout masks must come out
the same in every backend, on any number of ranks, and under CUDA-graph replay. A pure function of integer
counters gives that: the value for (seed, step, stream, ...) does not depend on launch order, thread layout,
world size or which process computes it.

The definition (every backend implements exactly this; `csrc/counter_hash.h` is the C++/CUDA twin):

    mix32(x):   x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16   (uint32 wrap)
    hash(k0, k1, ..., kn):  h = 0x9E3779B9; for k in keys: h = mix32(h ^ (k mod 2**32))
    uniform(h) = ((h >> 8) + 0.5) / 2**24          24 random bits, strictly inside (0, 1), exact in fp32
    gumbel(h)  = float32(-log(-log(uniform(h))))   evaluated in float64, rounded once to float32
    keep(h, p) = (h >> 8) >= round(p * 2**24)      dropout decision as an integer compare (bit-exact)

Keys are, in order: seed_lo, seed_hi, step, stream, then the stream's own coordinates (see STREAM_*).
Gumbel noise is evaluated in float64 and rounded once so that backends whose float32 `log` differ by an ulp
still agree on every draw (a float64 result that straddles a float32 rounding boundary is the only way to
disagree, which is vanishingly rare).

The torch code here keeps the uint32 arithmetic in int64 tensors: products are split into 16-bit halves so
nothing ever exceeds 2**49 (no signed overflow, which torch does not define).
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
MIX_C1 = 0x7FEB352D
MIX_C2 = 0x846CA68B

# Streams keep unrelated uses of the same (seed, step) independent.
STREAM_ITM_NEG_IMAGE_FOR_TEXT = 1  # coordinates: (global text row, global image column)
STREAM_ITM_NEG_TEXT_FOR_IMAGE = 2  # coordinates: (global image row, global text column)
STREAM_ATTN_DROPOUT = 3  # coordinates: (site, global batch row, head, query position, key position)

IntLike = Union[int, Tensor]


def _mulmod32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for int64 tensors holding values in [0, 2**32) and a constant c < 2**32."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def mix32(x: Tensor) -> Tensor:
    """The lowbias32 integer mixer (a bijection of uint32), on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mulmod32(x, MIX_C1)
    x = x ^ (x >> 15)
    x = _mulmod32(x, MIX_C2)
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    """mix32 on a Python int (for keys that are all constants)."""
    x ^= x >> 16
    x = (x * MIX_C1) & MASK32
    x ^= x >> 15
    x = (x * MIX_C2) & MASK32
    return x ^ (x >> 16)


def _as_key(k: IntLike) -> IntLike:
    if isinstance(k, Tensor):
        if k.dtype.is_floating_point or k.dtype == torch.bool:
            raise TypeError(f"hash keys must be integer tensors, got {k.dtype}")
        return k.to(torch.int64) & MASK32
    return int(k) & MASK32


def counter_hash(*keys: IntLike, device: torch.device | None = None) -> Tensor:
    """hash(k0, ..., kn) as int64 values in [0, 2**32); tensor keys broadcast against each other.

    Constant keys stay Python ints until the first tensor key, so no host-to-device copy is made (none is
    allowed inside a captured CUDA graph)."""
    h: IntLike = GOLDEN
    for k in keys:
        k = _as_key(k)
        h = h ^ k
        h = _mix32_int(h) if isinstance(h, int) else mix32(h)
    if isinstance(h, int):
        return torch.tensor(h, dtype=torch.int64, device=device)
    return h


def seed_keys(seed_step: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Split a (2,) int64 tensor [seed, step] into the leading keys (seed_lo, seed_hi, step), on device."""
    if seed_step.shape != (2,) or seed_step.dtype != torch.int64:
        raise ValueError(
            f"seed_step must be an int64 tensor of shape (2,) holding [seed, step]; got dtype {seed_step.dtype} "
            f"shape {tuple(seed_step.shape)}"
        )
    seed, step = seed_step[0], seed_step[1]
    return seed & MASK32, (seed >> 32) & MASK32, step & MASK32


def uniform_from_hash(h: Tensor) -> Tensor:
    """24-bit uniform in (0, 1) as float32."""
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)


def gumbel_from_hash(h: Tensor) -> Tensor:
    """Standard Gumbel noise, evaluated in float64 and rounded once to float32 (see the module docstring)."""
    u = ((h >> 8).to(torch.float64) + 0.5) * (1.0 / 16777216.0)
    return (-torch.log(-torch.log(u))).to(torch.float32)


def dropout_threshold(p: float) -> int:
    """Integer threshold on the 24 random bits: an element is kept iff (h >> 8) >= threshold."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return int(round(p * 16777216.0))
