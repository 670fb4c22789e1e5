"""The counter-based hash every backend shares: pinned values, int/tensor agreement, distribution sanity."""
from __future__ import annotations

import math

import pytest
import torch

from blip2fast.ops import hashing


def mix32_reference(x: int) -> int:
    """Straight uint32 arithmetic, written independently of the module's split multiplication."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) % 2**32
    x ^= x >> 15
    x = (x * 0x846CA68B) % 2**32
    x ^= x >> 16
    return x


def hash_reference(*keys: int) -> int:
    h = 0x9E3779B9
    for k in keys:
        h = mix32_reference(h ^ (k % 2**32))
    return h


def test_tensor_mix_equals_uint32_arithmetic_on_edge_values():
    values = [0, 1, 2, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF, 123456789, 2**31 + 12345]
    got = hashing.mix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [mix32_reference(v) for v in values]


def test_counter_hash_broadcasts_and_matches_the_scalar_definition():
    rows = torch.arange(5).view(5, 1) + 3
    cols = torch.arange(7).view(1, 7)
    h = hashing.counter_hash(42, 0, 9, hashing.STREAM_ITM_NEG_IMAGE_FOR_TEXT, rows, cols)
    assert h.shape == (5, 7)
    for r in range(5):
        for c in range(7):
            assert h[r, c].item() == hash_reference(42, 0, 9, 1, r + 3, c)


def test_constant_keys_stay_on_the_int_path_and_agree():
    assert hashing.counter_hash(1, 2, 3).item() == hash_reference(1, 2, 3)
    assert hashing.counter_hash(torch.tensor(1), 2, 3).item() == hash_reference(1, 2, 3)


def test_pinned_values_never_drift():
    # Literal values, so that the C++/CUDA/Triton twins and saved runs can rely on them: changing the hash would
    # change every draw and every dropout mask.
    assert hashing.counter_hash(0).item() == 0x01FCE552
    assert hashing.counter_hash(7, 0, 100, 2, 5, 11).item() == 0x7DC268E2
    assert hashing.counter_hash(*range(1, 10)).item() == 0x5670887C


def test_seed_keys_split_64_bit_seeds():
    ss = torch.tensor([2**40 + 5, 77], dtype=torch.int64)
    lo, hi, step = hashing.seed_keys(ss)
    assert (lo.item(), hi.item(), step.item()) == (5, 256, 77)
    with pytest.raises(ValueError, match="seed_step must be an int64 tensor of shape \\(2,\\)"):
        hashing.seed_keys(torch.tensor([1, 2, 3]))


def test_uniform_and_gumbel_distributions():
    h = hashing.counter_hash(3, 0, 1, 99, torch.arange(200_000))
    u = hashing.uniform_from_hash(h)
    assert u.dtype == torch.float32 and (u > 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 5e-3 and abs(u.var().item() - 1 / 12) < 2e-3
    g = hashing.gumbel_from_hash(h)
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    assert abs(g.mean().item() - 0.5772156649) < 0.02  # Euler-Mascheroni
    assert abs(g.var().item() - math.pi ** 2 / 6) < 0.05


def test_dropout_threshold_and_keep_rate():
    assert hashing.dropout_threshold(0.0) == 0
    assert hashing.dropout_threshold(0.5) == 2 ** 23
    with pytest.raises(ValueError, match="dropout probability must be in \\[0, 1\\), got 1.0"):
        hashing.dropout_threshold(1.0)
    h = hashing.counter_hash(1, 0, 2, hashing.STREAM_ATTN_DROPOUT, torch.arange(100_000))
    keep = (h >> 8) >= hashing.dropout_threshold(0.1)
    assert abs(keep.float().mean().item() - 0.9) < 5e-3


def test_float_keys_are_rejected():
    with pytest.raises(TypeError, match="integer tensors"):
        hashing.counter_hash(torch.tensor([1.0]))
