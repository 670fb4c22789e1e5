"""The FLOP model (blip2fast/flops.py) against torch's FlopCounterMode on real forward and backward passes.

The counter sees matmuls, convolutions and the attention products when SDPA runs as matmuls (MATH backend) and
every op runs its PyTorch backend (custom ops count 0): BLIP2FAST_BACKEND=torch. Stage 1 and stage 2 (OPT,
Llama-style and T5 LLMs) at a tiny and a medium size, the forward alone and the training step (forward + backward);
the paper's stage 1 (ViT-g, BERT-base Q-Former, batch 4) with fake tensors, where the counter needs no compute.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from blip2fast import Blip2, flops
from blip2fast.config import (Blip2Config, LLMConfig, QFormerConfig, VisionConfig, blip2_stage1_vit_g,
                              blip2_tiny)

TOL = 0.02  # the task's bound; the model is exact on these configs (Llama's rotary matmul is its only miss)


@pytest.fixture(autouse=True)
def torch_backends(monkeypatch):
    monkeypatch.setenv("BLIP2FAST_BACKEND", "torch")


def medium() -> Blip2Config:
    """Every shape different from every other (no accidental symmetry): 65 image tokens, 6 layers (3 cross)."""
    return Blip2Config(
        vision=VisionConfig(kind="eva", image_size=64, patch_size=8, width=96, depth=3, heads=4, mlp_hidden=352,
                            dtype="float32"),
        qformer=QFormerConfig(hidden_size=80, num_layers=6, num_heads=5, intermediate_size=208,
                              cross_attention_freq=2, num_query_tokens=12, vocab_size=1500, dec_token_id=1499),
        embed_dim=40, max_text_len=24,
    )


def tiny() -> Blip2Config:
    cfg = blip2_tiny()
    return cfg.replace(qformer=dataclasses.replace(cfg.qformer, vocab_size=700, dec_token_id=699))


def inputs(cfg: Blip2Config, B: int, T: int, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    size = cfg.vision.image_size
    px = torch.randn(B, 3, size, size, generator=g)
    ids = torch.randint(200, cfg.qformer.vocab_size - 1, (B, T), generator=g)
    ids[:, 0] = cfg.qformer.cls_token_id
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return px.to(device), (ids * mask).to(device), mask.to(device)


def count(fn):
    """(result, FLOPs the counter saw while fn ran)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = fn()
    return out, counter.get_total_flops()


def count_step(model, loss_fn):
    """(forward FLOPs, forward + backward FLOPs) of one training step. The forward is counted with no gradient
    wanted (the PyTorch linear + cross-entropy computes its gradients inside its forward when they are wanted, so
    the training step's own forward would include them); the total is the training step's forward + backward."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        _, fwd = count(loss_fn)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    out, step_fwd = count(loss_fn)
    _, step_bwd = count(lambda: out.loss.backward())
    return fwd, step_fwd + step_bwd


def assert_close(model_flops: float, counted: float, what: str):
    assert counted > 0, what
    err = abs(model_flops / counted - 1)
    assert err < TOL, f"{what}: FLOP model {model_flops:.6g} vs counted {counted:.6g} ({100 * err:.3f}% off)"


@pytest.mark.parametrize("size,B,gather_with_grad", [("tiny", 3, False), ("medium", 5, True), ("tiny", 1, False)])
def test_stage1_step_matches_the_counter(size, B, gather_with_grad):
    cfg = (tiny() if size == "tiny" else medium()).replace(itc_gather_with_grad=gather_with_grad)
    torch.manual_seed(0)
    model = Blip2(cfg).train()  # dropout on: the hashed attention dropout adds no matmul
    T = cfg.max_text_len - 3
    px, ids, mask = inputs(cfg, B, T)
    negatives = None
    if B == 1:  # a batch of one has no ITM negative: give one (itself) so the ITM pass runs and is counted
        negatives = (torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    fwd, total = count_step(model, lambda: model.stage1_loss(px, ids, mask, negatives=negatives))
    est = flops.stage1_step_flops(cfg, B, T, model)
    assert_close(est.forward, fwd, f"stage-1 forward ({size}, B={B})")
    assert_close(est.total, total, f"stage-1 forward + backward ({size}, B={B})")
    # the convention: the tower runs forward only, the Q-Former passes cost 3x forward in all
    assert est.parts["vision"].backward == 0
    assert est.parts["itm_pass"].total == pytest.approx(3 * est.parts["itm_pass"].forward)
    assert est.parts["itc_sims"].backward == pytest.approx((2 if gather_with_grad else 1)
                                                           * est.parts["itc_sims"].forward)


def test_paper_stage1_with_fake_tensors():
    """ViT-g (39 blocks, 257 tokens) + BERT-base Q-Former at the paper's text length, with fake tensors (shapes
    only, no compute; built on meta, then faked as CPU tensors so that device-type checks behave as on a CPU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = blip2_stage1_vit_g()
    with torch.device("meta"):
        model = Blip2(cfg).train()
    B, T = 4, 32
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cpu")
        px = torch.randn(B, 3, 224, 224)
        ids = torch.randint(1000, 2000, (B, T))
        # the training step only (fake dispatch is slow; the forward-alone split is tested at the small sizes)
        out, fwd = count(lambda: model.stage1_loss(px, ids, torch.ones_like(ids)))
        _, bwd = count(lambda: out.loss.backward())
    est = flops.stage1_step_flops(cfg, B, T, model)
    assert_close(est.total, fwd + bwd, "paper stage-1 forward + backward")
    # ViT-g forward is ~0.52 TFLOP per image: a sanity anchor for the published size
    assert 0.50e12 < flops.vision_forward_flops(cfg.vision) < 0.53e12


def llm_config(kind: str, size: str) -> dict:
    transformers = pytest.importorskip("transformers")
    w, layers, ffn, heads, vocab = (32, 2, 64, 4, 99) if size == "tiny" else (96, 3, 272, 6, 1203)
    if kind == "opt":
        return transformers.OPTConfig(vocab_size=vocab, hidden_size=w, num_hidden_layers=layers, ffn_dim=ffn,
                                      num_attention_heads=heads, max_position_embeddings=128,
                                      word_embed_proj_dim=w).to_dict()
    if kind == "llama":
        return transformers.LlamaConfig(vocab_size=vocab, hidden_size=w, intermediate_size=ffn, num_hidden_layers=layers,
                                        num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=128,
                                        bos_token_id=1, eos_token_id=2).to_dict()
    return transformers.T5Config(vocab_size=vocab, d_model=w, d_kv=w // heads, d_ff=ffn, num_layers=layers,
                                 num_decoder_layers=layers + 1, num_heads=heads, feed_forward_proj="gated-gelu",
                                 decoder_start_token_id=0).to_dict()


@pytest.mark.parametrize("kind,size", [("opt", "tiny"), ("opt", "medium"), ("llama", "tiny"), ("t5", "tiny"),
                                       ("t5", "medium")])
def test_stage2_step_matches_the_counter(kind, size):
    base = tiny() if size == "tiny" else medium()
    cfg = base.replace(llm=LLMConfig(hf_config=llm_config(kind, size), dtype="float32"))
    torch.manual_seed(1)
    model = Blip2(cfg).train()
    vocab = model.language_model.config.vocab_size
    B, T, T_dec = (3, 7, 5) if size == "tiny" else (4, 19, 11)
    px, _, _ = inputs(cfg, B, T)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, vocab, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[0, T // 2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    if kind == "t5":
        labels = torch.randint(4, vocab, (B, T_dec), generator=g)
    fwd, total = count_step(model, lambda: model.stage2_loss(px, ids, mask, labels))
    est = flops.stage2_step_flops(model, B, T, decoder_len=labels.shape[1])
    assert_close(est.forward, fwd, f"stage-2 forward ({kind}, {size})")
    assert_close(est.total, total, f"stage-2 forward + backward ({kind}, {size})")
    if kind == "opt":  # the frozen LLM's Linears: input gradients only (1x forward)
        assert est.parts["llm_linears"].backward == pytest.approx(est.parts["llm_linears"].forward)


@pytest.mark.parametrize("size", ["tiny", "medium"])
def test_inference_pieces_match_the_counter(size):
    """The forward-only FLOPs the benchmarks use: Q-Former query pass, ITC scores, ITM logits."""
    cfg = tiny() if size == "tiny" else medium()
    torch.manual_seed(2)
    model = Blip2(cfg).eval().requires_grad_(False)  # (no torch.no_grad: the counter's module hooks want grad mode)
    B, T = 3, cfg.max_text_len - 1
    px, ids, mask = inputs(cfg, B, T)
    if True:
        embeds = model.image_embeds(px)
        _, n = count(lambda: model.qformer.query_pass(model.query_tokens.expand(B, -1, -1),
                                                      model.qformer.image_kv(embeds)))
        assert_close(flops.qformer_query_forward_flops(cfg, B), n, "query pass")
        _, n = count(lambda: model.itc_scores(px, ids[:2], mask[:2]))
        assert_close(flops.itc_scoring_flops(cfg, B, 2, T, model), n, "itc_scores")
        _, n = count(lambda: model.itm_logits(px, ids, mask))
        assert_close(flops.itm_scoring_flops(cfg, B, T, model), n, "itm_logits")


def test_trainer_api_is_the_model():
    """training/logging.py's names are the flops module's, and per sample = the step / B."""
    from blip2fast.training import logging as train_logging

    assert train_logging.step_flops_per_sample is flops.step_flops_per_sample
    cfg = medium()
    model = Blip2(cfg)
    per = flops.step_flops_per_sample(model, cfg, stage=1, text_len=20, batch=6)
    assert per == pytest.approx(flops.stage1_step_flops(cfg, 6, 20, model).total / 6)
    fwd = flops.qformer_flops(cfg, cfg.vision.seq_len, cfg.vision.width, 20, stage=1)
    assert fwd == pytest.approx(sum(p.forward for k, p in flops.stage1_step_flops(cfg, 1, 20, model).parts.items()
                                    if k != "vision"))


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_hf_vision_tower_matches_the_counter(tmp_path, feature_layer):
    """A transformers tower (CLIP layout) read through hidden_states[k]: the layers it does not run are not counted."""
    transformers = pytest.importorskip("transformers")
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=48, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4, image_size=32,
        patch_size=8)).save_pretrained(str(tmp_path))
    cfg = tiny().replace(vision=VisionConfig(kind="hf", hf_path=str(tmp_path), image_size=32,
                                             hf_feature_layer=feature_layer, dtype="float32"))
    model = Blip2(cfg).eval().requires_grad_(False)
    B = 2
    _, n = count(lambda: model.visual_encoder(torch.randn(B, 3, 32, 32)))
    assert_close(B * flops.vision_forward_flops(cfg.vision, model), n, f"HF tower, hidden_states[{feature_layer}]")
