"""One stage-1 training step (ITC + ITM + ITG, forward + backward): blip2fast vs the LAVIS formulation.

    python -m pytest benchmarks/bench_stage1_step.py                              # CPU: tiny model, batch 8
    BLIP2FAST_GPU_TESTS=1 python -m pytest benchmarks/bench_stage1_step.py \\
        --benchmark-json=out/bench_stage1_step.json                              # GPU: the paper's sizes

    impl "blip2fast": Blip2.stage1_loss + backward, every op on its automatic backend (the fastest measured for
                      the device), negatives drawn on device
         "lavis":     benchmarks/lavis_baseline.py on the same parameters (eager attention, materialised masks,
                      image K/V recomputed per pass, the multinomial loop, full ITG logits), fed blip2fast's
                      negatives so the losses are the same
transformers has no stage-1 training (transformers #22645, #34019), so there is no third peer here.

Sizes (benchmarks/e2e_support.py): GPU, EVA ViT-g/14 (39 blocks, bf16, frozen) + BERT-base Q-Former (fp32 weights,
bf16 autocast), batch 128, 32 text tokens, dropout as configured (0.1); CPU, a tiny model, batch 8. Before timing,
in eval mode (no dropout), the two compute the same ITC, ITM and ITG losses (asserted). A step = zero grads,
forward, backward (no optimizer: the same for both). extra_info (e2e_support.extra_info): median ms, samples/s,
speedup over the other impl, peak memory above the weights (GPU), TFLOP/s and MFU of the minimal formulation's
FLOPs (blip2fast.flops, the same number for both) against a matmul peak measured in this run.
"""
from __future__ import annotations

import math

import pytest
import torch

import e2e_support as E
from blip2fast import flops
from lavis_baseline import LavisFormulation

IMPLS = ("blip2fast", "lavis")


@pytest.fixture(scope="module")
def suite():
    cfg = E.stage1_config()
    S = E.STAGE1
    model = E.build_model(cfg)
    lavis = LavisFormulation(model)
    q = cfg.qformer
    px = E.images(S.batch, cfg.vision.image_size)
    ids, mask = E.qformer_text(S.batch, S.text_len, q.vocab_size, q.cls_token_id)
    model.set_seed_step(seed=0, step=1)

    # the same losses, dropout off: blip2fast draws the negatives, LAVIS's formulation is given them
    model.eval()
    with torch.no_grad(), E.autocast():
        ours = model.stage1_loss(px, ids, mask)
        negatives = (ours.neg_image_for_text, ours.neg_text_for_image)
        theirs = lavis.stage1_loss(px, ids, mask, negatives)
    checks = {f"rel_err_{k}": E.assert_equal(f"stage-1 {k} (blip2fast vs LAVIS formulation)",
                                             getattr(ours, k), theirs[k])
              for k in ("loss_itc", "loss_itm", "loss_itg")}
    checks["loss"] = round(float(ours.loss), 4)
    model.train()

    def step_ours():
        E.clear_grads(model)
        with E.autocast():
            out = model.stage1_loss(px, ids, mask)
        out.loss.backward()

    def step_lavis():
        E.clear_grads(model)
        with E.autocast():
            out = lavis.stage1_loss(px, ids, mask, negatives)
        out["loss"].backward()

    fns = {"blip2fast": step_ours, "lavis": step_lavis}
    measured = E.measure(fns, S)
    step_flops = flops.stage1_step_flops(cfg, S.batch, S.text_len, model).total
    config = {"vision": f"EVA {cfg.vision.width}x{cfg.vision.depth}, {cfg.vision.seq_len} tokens",
              "qformer": f"{q.hidden_size}x{q.num_layers}, {q.num_query_tokens} queries", "text_len": S.text_len,
              "dropout": q.attention_dropout}
    return {"fns": fns, "measured": measured, "flops": step_flops, "config": config, "checks": checks,
            "batch": S.batch, "reps": S.reps}


@pytest.mark.parametrize("impl", IMPLS)
def test_stage1_step(benchmark, suite, impl):
    info = E.report(benchmark, "stage1_step", impl, suite["fns"][impl], suite["measured"], suite["flops"],
                    suite["batch"], suite["config"], suite["checks"], suite["reps"])
    assert math.isfinite(info["median_ms"]) and info["samples_per_s"] > 0
