"""Held-out evaluation during training. Stage 1: image<->text retrieval, recall@k ranked by ITC cosine, against
chance. Stage 2 (`evaluate_stage2`): the language-modelling loss on held-out pairs and a few greedy captions beside
their references.

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


# ------------------------------------------------------------------------------------------------ stage 2
def _references(tokenizer, batch: dict, rows: int) -> list[str]:
    """The held-out captions as the model saw them: decoder-only, the label tokens (the caption after BOS and any
    prompt); encoder-decoder, the encoder's prefix then the decoder's suffix."""
    out = []
    for i in range(rows):
        labels = batch["labels"][i]
        target = tokenizer.decode(labels[labels != -100].tolist(), skip_special_tokens=True).strip()
        if labels.shape != batch["input_ids"][i].shape:  # encoder-decoder: the prefix went to the encoder
            ids = batch["input_ids"][i][batch["attention_mask"][i].bool()]
            target = (tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip() + " " + target).strip()
        out.append(target)
    return out


@torch.no_grad()
def evaluate_stage2(model, batch: dict, device: torch.device, tokenizer, prompt: str = "", captions: int = 3,
                    chunk: int = 16, max_new_tokens: int = 20,
                    autocast: Optional[contextlib.AbstractContextManager] = None) -> dict:
    """Stage 2 on a held-out batch dict (`pixel_values`, `input_ids`, `attention_mask`, `labels` from the stage-2
    text encoder): the language-modelling loss over all its label tokens (computed `chunk` rows at a time, weighted
    by tokens), and greedy captions of the first `captions` images beside their references. The model's train/eval
    mode is kept."""
    from ..eval.captioning import llm_generate_text

    was_training = getattr(model, "training", False)
    model.eval()
    try:
        total, tokens = 0.0, 0
        n = batch["pixel_values"].shape[0]
        with autocast if autocast is not None else contextlib.nullcontext():
            for s in range(0, n, chunk):
                part = {k: batch[k][s:s + chunk].to(device) for k in ("pixel_values", "input_ids", "attention_mask",
                                                                      "labels")}
                out = model.stage2_loss(part["pixel_values"], part["input_ids"], part["attention_mask"],
                                        part["labels"])
                count = int(out.num_tokens)
                total += float(out.loss) * count
                tokens += count
        k = min(captions, n)
        generated = llm_generate_text(model, batch["pixel_values"][:k].to(device), tokenizer, [prompt] * k,
                                      num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=1,
                                      length_penalty=1.0) if k else []
    finally:
        model.train(was_training)
    pairs = [{"generated": g, "reference": r} for g, r in zip(generated, _references(tokenizer, batch, k))]
    return {"n": n, "loss": total / max(tokens, 1), "tokens": tokens, "captions": pairs}


def format_stage2(m: dict) -> str:
    """The held-out loss, then one line per caption: generated <- reference."""
    lines = [f"held-out LM loss (N={m['n']}, {m['tokens']} tokens) = {m['loss']:.4f}"]
    lines += [f"    {c['generated']!r}  (reference: {c['reference']!r})" for c in m["captions"]]
    return "\n".join(lines)


def format_eval(m: dict) -> str:
    """Either evaluation's report (stage 1: retrieval; stage 2: loss and captions)."""
    return format_retrieval(m) if "i2t_r1" in m else format_stage2(m)


__all__ = ["evaluate_retrieval", "evaluate_stage2", "format_eval", "format_retrieval", "format_stage2",
           "retrieval_metrics"]
