"""The model and global batch shared by the distributed worker and the single-process side of the test."""
from __future__ import annotations

import dataclasses

import torch

from blip2fast import Blip2
from blip2fast.config import blip2_tiny

GLOBAL_BATCH = 6
SEED_STEP = (1234, 17)


def make_model(gather_with_grad: bool) -> Blip2:
    cfg = blip2_tiny()
    # hidden dropout uses torch's generator (rank-dependent); attention dropout is the counter hash, so it stays
    # on and the test covers it
    qcfg = dataclasses.replace(cfg.qformer, hidden_dropout=0.0, attention_dropout=0.1)
    torch.manual_seed(0)
    # float64 throughout: then any difference is a real one, not summation order (some gradients, e.g. temp's,
    # are sums with heavy cancellation whose fp32 rounding alone is ~1e-4 relative)
    return Blip2(cfg.replace(qformer=qcfg, itc_gather_with_grad=gather_with_grad)).double().train()


def global_batch():
    g = torch.Generator().manual_seed(99)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g, dtype=torch.float64)
    T = 16
    lengths = torch.randint(3, T + 1, (GLOBAL_BATCH,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1000, 3000, (GLOBAL_BATCH, T), generator=g).masked_fill(mask == 0, 0)
    ids[:, 0] = 101
    ids[torch.arange(GLOBAL_BATCH), lengths - 1] = 102
    return images, ids, mask
