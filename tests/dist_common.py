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


# ------------------------------------------------------------------------------------------------ training steps
TRAIN_STEPS = 3  # optimiser steps compared between 1 and 2 processes
LR = 1e-3


def step_batches():
    """One global batch per optimiser step (different images and texts each step)."""
    out = []
    for s in range(TRAIN_STEPS):
        images, ids, mask = global_batch()
        g = torch.Generator().manual_seed(1000 + s)
        perm = torch.randperm(GLOBAL_BATCH, generator=g)
        out.append({"pixel_values": images[perm] + 0.1 * s, "input_ids": ids[perm], "attention_mask": mask[perm]})
    return out


def make_stepper(model, module, world_size: int):
    """The trainer's own step (blip2fast.training.step.TrainStep) with AdamW, clipping and the device lr schedule
    (warmup 2 of 10 steps: the lr changes every step)."""
    from blip2fast.training.optim import build_optimizer
    from blip2fast.training.step import TrainStep

    opt = build_optimizer(model, LR, weight_decay=0.05)  # fused where torch has it, as the trainer
    return TrainStep(model, module, opt, seed=SEED_STEP[0], accum=1, grad_clip=1.0, schedule=(LR, 2, 10, LR / 10),
                     device=torch.device("cpu"), world_size=world_size, amp=False)


def shard(batch: dict, rank: int, world: int) -> dict:
    B = GLOBAL_BATCH // world
    return {k: v[rank * B:(rank + 1) * B] for k, v in batch.items()}


def gather_rows_case():
    """Per-rank inputs of the gather_rows test: x (3, 4, 5) per rank, 4 requested global rows per rank (both
    shards, a repeat), and a weight per rank for a scalar loss over the picked rows."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)  # [rank] -> that rank's shard
    index = torch.tensor([[4, 0, 4, 2], [1, 5, 3, 1]])  # [rank] -> requested global rows (0..5)
    weight = torch.randn(2, 4, 4, 5, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 1000, (2, 3, 7), generator=g)
    return x, index, weight, ids
