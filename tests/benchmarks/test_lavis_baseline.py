"""benchmarks/lavis_baseline.py: the LAVIS formulation, run on a blip2fast model's parameters, computes blip2fast's
losses, gradients and scores (float64 model, dropout off: equal to rounding), and its masks are LAVIS's."""
from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest
import torch

from blip2fast import Blip2
from blip2fast.config import LLMConfig, blip2_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("lavis_baseline", os.path.join(ROOT, "benchmarks", "lavis_baseline.py"))
lavis_baseline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lavis_baseline)


def tiny_model(llm=None, seed=0) -> Blip2:
    cfg = blip2_tiny()
    q = dataclasses.replace(cfg.qformer, vocab_size=500, dec_token_id=499, cross_attention_freq=2)
    torch.manual_seed(seed)
    m = Blip2(cfg.replace(qformer=q, llm=llm)).double()
    with torch.no_grad():  # LayerNorms and biases away from ones / zeros, so a mis-wired one shows
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias") or "q_bias" in name or "v_bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def batch(B=5, T=11, vocab=500, seed=1):
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(B, 3, 32, 32, generator=g, dtype=torch.float64)
    ids = torch.randint(5, vocab - 1, (B, T), generator=g)
    ids[:, 0] = 101
    lengths = torch.tensor([T, 1, 4, T - 2, 7][:B])  # one caption of [CLS] alone
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return px, ids * mask, mask


def test_masks_are_lavis():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    ext = lavis_baseline.extended_mask(mask, torch.float32)
    assert ext.shape == (2, 1, 1, 3) and ext[0, 0, 0].tolist() == [0, 0, -10000] and ext[1, 0, 0, 1] == -10000
    full = torch.tensor([[1, 1, 1, 1, 0]])  # 2 query keys + 3 text keys, the last one padding
    m = lavis_baseline.causal_prefix_mask(full, prefix=2, dtype=torch.float32)[0, 0]
    visible = (m == 0).long().tolist()
    assert visible == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]


def test_stage1_losses_equal_blip2fast_with_the_same_negatives():
    m = tiny_model()
    lav = lavis_baseline.LavisFormulation(m)
    px, ids, mask = batch()
    m.set_seed_step(3, 7)
    ours = m.stage1_loss(px, ids, mask)
    negatives = (ours.neg_image_for_text, ours.neg_text_for_image)
    theirs = lav.stage1_loss(px, ids, mask, negatives)
    for k in ("loss_itc", "loss_itm", "loss_itg", "loss"):
        a, b = float(getattr(ours, k).detach()), float(theirs[k].detach())
        assert abs(a - b) < 1e-9 * max(1.0, abs(b)), (k, a, b)
    # gradients too (the benchmark times backward): every trainable parameter's
    theirs["loss"].backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    m.stage1_loss(px, ids, mask, negatives=negatives).loss.backward()
    got = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert set(got) == set(want) and len(got) > 50
    for n in got:  # (atol: the key biases' true gradient is 0, softmax cancels them; both sides are rounding)
        assert torch.allclose(got[n], want[n], rtol=1e-8, atol=1e-12), (n, (got[n] - want[n]).abs().max())


def test_scores_equal_blip2fast():
    m = tiny_model(seed=2)
    lav = lavis_baseline.LavisFormulation(m)
    px, ids, mask = batch(B=4, seed=3)
    with torch.no_grad():
        assert torch.allclose(lav.itc_scores(px, ids, mask), m.itc_scores(px, ids, mask), rtol=1e-9, atol=1e-12)
        assert torch.allclose(lav.itm_logits(px, ids, mask), m.itm_logits(px, ids, mask), rtol=1e-9, atol=1e-12)
        embeds = m.image_embeds(px)
        ours = m.qformer.query_pass(m.query_tokens.expand(4, -1, -1), m.qformer.image_kv(embeds))[0]
        assert torch.allclose(lav.query_pass(embeds)[0], ours, rtol=1e-9, atol=1e-12)


def test_stage2_loss_equals_blip2fast():
    transformers = pytest.importorskip("transformers")
    opt = transformers.OPTConfig(vocab_size=90, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                                 max_position_embeddings=64, word_embed_proj_dim=32).to_dict()
    m = tiny_model(LLMConfig(hf_config=opt, dtype="float32"), seed=4)
    lav = lavis_baseline.LavisFormulation(m)
    px, _, _ = batch(B=3)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, 90, (3, 9), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    ours = m.stage2_loss(px, ids, mask, labels).loss
    theirs = lav.stage2_loss(px, ids, mask, labels)
    assert abs(float(ours.detach()) - float(theirs.detach())) < 1e-9 * float(theirs.detach())
