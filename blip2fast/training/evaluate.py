"""Held-out image<->text retrieval during training (stage 1): recall@k ranked by ITC cosine, against chance.

The full protocol (top-k ITC candidates re-scored by ITM, COCO / Flickr splits) belongs to `blip2fast.eval`; this is
the quick check a training run prints: N held-out pairs (image i, caption i) with distinct captions, each query
has exactly one correct answer, chance R@1 = 1/N.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import Tensor


def retrieval_metrics(scores: Tensor, ks: Sequence[int] = (1, 5)) -> dict:
    """Recall@k both ways from an (N, N) image x text score matrix whose diagonal holds the correct pairs. The rank
    of the correct item counts every other item scoring at least as high: ties (a collapsed model scoring every
    pair alike) and NaN count against the query, never for it."""
    n = scores.shape[0]
    target = torch.arange(n, device=scores.device)
    diag = scores[target, target]
    i2t_rank = (~(scores < diag[:, None])).sum(1) - 1
    t2i_rank = (~(scores < diag[None, :])).sum(0) - 1
    out = {"n": n, "chance": 1.0 / n}
    for k in ks:
        out[f"i2t_r{k}"] = (i2t_rank < k).float().mean().item()
        out[f"t2i_r{k}"] = (t2i_rank < k).float().mean().item()
    return out


@torch.no_grad()
def evaluate_retrieval(model, batch: dict, device: torch.device, ks: Sequence[int] = (1, 5),
                       autocast: Optional[contextlib.AbstractContextManager] = None) -> dict:
    """Retrieval metrics of `model` (anything with `itc_scores(pixel_values, input_ids, attention_mask)`) on a
    held-out batch dict (`pixel_values`, `input_ids`, `attention_mask`); the model's train/eval mode is kept."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with autocast if autocast is not None else contextlib.nullcontext():
            scores = model.itc_scores(batch["pixel_values"].to(device), batch["input_ids"].to(device),
                                      batch["attention_mask"].to(device)).float()
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
    return retrieval_metrics(scores, ks)


def format_retrieval(m: dict) -> str:
    """The line every run ends with."""
    return (f"held-out retrieval (N={m['n']}): i2t R@1 = {m['i2t_r1']:.3f}, t2i R@1 = {m['t2i_r1']:.3f}, "
            f"chance = {m['chance']:.3f}")


__all__ = ["evaluate_retrieval", "format_retrieval", "retrieval_metrics"]
