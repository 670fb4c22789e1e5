"""The Q-Former attention reference against LAVIS-style extended masks built independently, in float64."""
from __future__ import annotations

import math

import pytest
import torch

from blip2fast.ops import hashing
from blip2fast.ops.attention import AttnDropout, dropout_keep_mask, qformer_attention_ref


def lavis_extended_mask(padding: torch.Tensor, causal_text_len: int | None) -> torch.Tensor:
    """LAVIS's get_extended_attention_mask, rewritten: (B, 1, Lq, Lk) additive (0 / -10000).
    causal_text_len=None: padding only (B,1,1,Lk). Otherwise rows are the text positions; keys = prefix + text."""
    B, Lk = padding.shape
    if causal_text_len is None:
        return (1.0 - padding[:, None, None, :].double()) * -10000.0
    T = causal_text_len
    seq = torch.arange(T)
    causal = (seq[None, :] <= seq[:, None]).double()  # (T, T)
    prefix = Lk - T
    causal = torch.cat([torch.ones(T, prefix, dtype=torch.float64), causal], dim=1)  # (T, Lk)
    ext = causal[None, None] * padding[:, None, None, :].double()
    return (1.0 - ext) * -10000.0


def attention_explicit(q, k, v, mask):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    return scores.softmax(-1) @ v


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("B,H,Lq,d", [(1, 1, 1, 16), (3, 2, 7, 32), (2, 4, 13, 64)])
def test_bidirectional_with_padding(B, H, Lq, d):
    q, k, v = rand(B, H, Lq, d), rand(B, H, Lq, d), rand(B, H, Lq, d)
    lengths = torch.randint(1, Lq + 1, (B,))
    padding = (torch.arange(Lq)[None] < lengths[:, None]).long()
    out = qformer_attention_ref(q, k, v, key_padding=padding)
    ref = attention_explicit(q, k, v, lavis_extended_mask(padding, None))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("Q,T", [(1, 1), (8, 5), (32, 17)])
def test_multimodal_causal_matches_lavis_prefix_mask(Q, T):
    B, H, d = 3, 2, 16
    q, k, v = rand(B, H, T, d), rand(B, H, Q + T, d), rand(B, H, Q + T, d)
    lengths = torch.randint(1, T + 1, (B,))
    text_pad = (torch.arange(T)[None] < lengths[:, None]).long()
    padding = torch.cat([torch.ones(B, Q, dtype=torch.long), text_pad], 1)
    out = qformer_attention_ref(q, k, v, key_padding=padding, causal_prefix=Q)
    ref = attention_explicit(q, k, v, lavis_extended_mask(padding, T))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_row_offset_gives_the_rows_of_a_longer_call():
    """Decoding with a K/V cache: rows [t0, T) called alone equal those rows of the full causal call."""
    B, H, d, Q, T, t0 = 2, 2, 16, 4, 9, 6
    q, k, v = rand(B, H, T, d), rand(B, H, Q + T, d), rand(B, H, Q + T, d)
    full = qformer_attention_ref(q, k, v, causal_prefix=Q)
    part = qformer_attention_ref(q[:, :, t0:], k, v, causal_prefix=Q, row_offset=t0)
    torch.testing.assert_close(part, full[:, :, t0:], rtol=1e-12, atol=1e-12)


def test_all_padding_row_attends_uniformly_like_lavis():
    B, H, L, d = 2, 1, 5, 16
    q, k, v = rand(B, H, L, d), rand(B, H, L, d), rand(B, H, L, d)
    padding = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    out = qformer_attention_ref(q, k, v, key_padding=padding)
    assert torch.isfinite(out).all()
    ref = attention_explicit(q, k, v, lavis_extended_mask(padding, None))
    torch.testing.assert_close(out, ref)


def test_kv_index_reads_the_chosen_images_without_copies_by_the_caller():
    B_img, R, H, Lq, N, d = 3, 7, 2, 4, 11, 16
    q = rand(R, H, Lq, d)
    k, v = rand(B_img, H, N, d), rand(B_img, H, N, d)
    idx = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    out = qformer_attention_ref(q, k, v, kv_index=idx)
    torch.testing.assert_close(out, attention_explicit(q, k[idx], v[idx], None), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="pass kv_index"):
        qformer_attention_ref(q, k, v)


def test_hashed_dropout_is_the_documented_mask():
    B, H, Lq, Lk, d, p = 3, 2, 5, 9, 16, 0.25
    q, k, v = rand(B, H, Lq, d), rand(B, H, Lk, d), rand(B, H, Lk, d)
    drop = AttnDropout(p=p, seed_step=torch.tensor([11, 4]), site=37, row_ids=torch.tensor([4, 0, 9]), q_offset=2)
    out = qformer_attention_ref(q, k, v, dropout=drop)
    # the mask written out from the hash definition, element by element
    keep = torch.zeros(B, H, Lq, Lk, dtype=torch.bool)
    for b, row in enumerate([4, 0, 9]):
        for h in range(H):
            for i in range(Lq):
                for j in range(Lk):
                    hv = hashing.counter_hash(11, 0, 4, hashing.STREAM_ATTN_DROPOUT, 37, row, h, i + 2, j).item()
                    keep[b, h, i, j] = (hv >> 8) >= round(p * 2 ** 24)
    assert torch.equal(dropout_keep_mask(drop, H, Lq, Lk), keep)
    probs = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
    ref = (probs * keep / (1 - p)) @ v
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert 0 < (~keep).sum() < keep.numel()


def test_dropout_rate_and_independence_across_sites_and_steps():
    shape = (4, 4, 32, 64)
    base = AttnDropout(p=0.1, seed_step=torch.tensor([1, 1]), site=0, row_ids=torch.arange(4))
    m0 = dropout_keep_mask(base, *shape[1:])
    assert abs(m0.float().mean().item() - 0.9) < 0.01
    for other in (AttnDropout(0.1, torch.tensor([1, 2]), 0, torch.arange(4)),
                  AttnDropout(0.1, torch.tensor([1, 1]), 1, torch.arange(4)),
                  AttnDropout(0.1, torch.tensor([1, 1]), 0, torch.arange(4) + 4)):
        m1 = dropout_keep_mask(other, *shape[1:])
        agreement = (m0 == m1).float().mean().item()
        assert abs(agreement - (0.9 ** 2 + 0.1 ** 2)) < 0.01  # independent masks agree at the chance rate
