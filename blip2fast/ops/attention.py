"""Q-Former attention: the pure-PyTorch reference that defines the masks, the dropout and the image indexing.

The fused kernels (later, behind this same function) take the mask as *parameters*, never as a (B, 1, L, L)
tensor: which keys a row sees is a function of
  - `key_padding` (B, Lk) bool, True = a real token (None: every key is real),
  - `causal_prefix`: None for bidirectional attention; an int P for the multimodal-causal rule of ITG and
    generation: keys [0, P) (the queries) are always visible and key P + j is visible from row i iff
    j <= i + `row_offset` (row i of the call is text position i + row_offset),
exactly LAVIS's extended masks. Masked scores get LAVIS's additive -10000 rather than -inf, so a row whose keys
are all padding attends uniformly instead of producing NaN, as in LAVIS.

Cross-attention may index its K/V per row (`kv_index`, (B,) int64): the 3B ITM rows read the K/V of the B
images that were projected once per step.

Attention dropout (training) keeps element (row, head, q, k) iff its counter hash clears the threshold
(`hashing.keep`): keys (seed, step, STREAM_ATTN_DROPOUT, site, global batch row, head, q position, k position),
so any backend and any number of ranks reproduce the mask.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import hashing

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
    """(B, heads, q_len, k_len) bool: which attention probabilities survive."""
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
    if kv_index is not None:
        k, v = k.index_select(0, kv_index), v.index_select(0, kv_index)
    B, H, Lq, d = q.shape
    Lk = k.shape[2]
    if k.shape[0] != B:
        raise ValueError(f"K/V batch {k.shape[0]} != query batch {B}; pass kv_index to pick K/V rows per query row")
    visible = visibility(B, Lq, Lk, q.device, key_padding, causal_prefix, row_offset)
    mask = None
    if visible is not None:
        mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill(~visible, MASKED_SCORE)
    if dropout is None or dropout.p == 0.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)
    if mask is not None:
        scores = scores + mask
    probs = scores.softmax(dim=-1)
    keep = dropout_keep_mask(dropout, H, Lq, Lk)
    probs = torch.where(keep, probs / (1.0 - dropout.p), torch.zeros((), dtype=probs.dtype, device=probs.device))
    return torch.matmul(probs, v)
