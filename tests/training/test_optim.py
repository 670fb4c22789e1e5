"""The optimiser: the paper's AdamW groups, fused where available, clipping, and gradient accumulation."""
from __future__ import annotations

import dataclasses

import torch

from blip2fast.models.blip2 import Blip2
from blip2fast.training.config import demo_model
from blip2fast.training.optim import build_optimizer, clip_grad_norm, lr_at
from blip2fast.training import step as step_mod
from blip2fast.training.trainer import Trainer
from tests.training.conftest import tiny_config


def test_no_decay_on_biases_norms_query_tokens_and_temperature():
    model = Blip2(demo_model())
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    decay, plain = opt.param_groups
    assert decay["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0 and opt.defaults["betas"] == (0.9, 0.98)
    assert "query_tokens" in plain["names"] and "temp" in plain["names"]
    assert "qformer.layers.0.self_attn.query.bias" in plain["names"]
    assert "qformer.layers.0.ffn.norm.weight" in plain["names"] and "ln_vision.weight" in plain["names"]
    assert "qformer.layers.0.self_attn.query.weight" in decay["names"] and "itm_head.weight" in decay["names"]
    assert all(p.ndim >= 2 for p in decay["params"])
    assert not any(n.startswith("visual_encoder.") for g in opt.param_groups for n in g["names"])  # frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(decay["names"]) | set(plain["names"]) == trainable
    assert opt.defaults["fused"] is True  # torch has a fused CPU AdamW


def test_schedule_and_clipping():
    lrs = [lr_at(s, 1.0, 10, 100, 0.1) for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert abs(lr_at(100, 1.0, 10, 100, 0.1) - 0.1) < 1e-12 and lr_at(500, 1.0, 10, 100, 0.1) == 0.1
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    norm = clip_grad_norm([p], 1.0)
    assert torch.is_tensor(norm) and abs(norm.item() - 5.0) < 1e-6 and abs(p.grad.norm().item() - 1.0) < 1e-5
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert abs(clip_grad_norm([p], 0.0).item() - 5.0) < 1e-6 and p.grad[1] == 4.0  # 0: measure, do not clip


def test_accumulation_averages_the_micro_batch_gradients(tmp_path, demo_cache, monkeypatch):
    cfg = tiny_config(tmp_path / "run", steps=2, batch=4)
    cfg = cfg.replace(schedule=dataclasses.replace(cfg.schedule, accum_steps=2),
                      optim=dataclasses.replace(cfg.optim, grad_clip=0.0))
    tr = Trainer(cfg, print_fn=lambda s: None)
    it = iter(tr.loader)
    b1, b2 = next(it), next(it)
    params = [p for p in tr.model.parameters() if p.requires_grad]
    ref, losses = [torch.zeros_like(p) for p in params], []
    for i, b in enumerate((b1, b2)):  # what the step must do: micro-step seeds 0 and 1, mean of the gradients
        tr.model.set_seed_step(cfg.seed, i)
        out = tr.model.stage1_loss(b["pixel_values"], b["input_ids"], b["attention_mask"])
        for r, g in zip(ref, torch.autograd.grad(out.loss, params, allow_unused=True)):
            if g is not None:
                r += g / 2
        losses.append(out.loss.detach())
    captured = []
    # the step hands its (clipped: grad_clip=0 here) gradients to the AdamW update: capture them there
    monkeypatch.setattr(step_mod, "adamw_step_", lambda opt, ps, gs: captured.append(
        {id(p): g.clone() for p, g in zip(ps, gs) if g is not None}))
    terms = tr.train_step([b1, b2])
    assert torch.allclose(terms[0], (losses[0] + losses[1]) / 2, rtol=1e-6)
    assert len(captured) == 1 and len(captured[0]) > 0
    for r, p in zip(ref, params):  # a parameter without a gradient has none in the reference either
        g = captured[0].get(id(p), torch.zeros_like(p))
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-8)
    assert all(p.grad is None for p in params)  # gradients live in the step, never in .grad
