"""The whole stage-1 training step (forward, backward, clipping, AdamW with the device lr) in each execution mode of
blip2fast/training/step.py: samples/s, the ratio to eager measured in the same run, peak memory.

    python -m pytest benchmarks/bench_train_modes.py                               # CPU: tiny model, eager
    BLIP2FAST_GPU_TESTS=1 python -m pytest benchmarks/bench_train_modes.py \\
        --benchmark-json=out/bench_train_modes.json                               # GPU: paper sizes
    BLIP2FAST_BENCH_COMPILE=1 ...                                                  # also the compile suite

Suites (each mode has its own copy of the same initial weights; timed steps are interleaved across modes):
    "paper"    GPU: EVA ViT-g/14 (39 blocks, bf16, frozen) + BERT-base Q-Former (fp32 weights, bf16 autocast),
               batch 128, 32 text tokens, random weights (benchmarks/e2e_support.py sizes); CPU: the tiny model.
               modes (GPU): eager | cuda_graphs (captured after 2 warm-up steps, replayed) | fp8 (the tower's
               linears in float8 e4m3, row-wise scales) | fp8_cuda_graphs. CPU: eager only (graphs and fp8 speed
               are GPU matters; their numerics are tested in tests/).
    "compile"  eager | compile (torch.compile of the whole step, inductor), on a model small enough to compile
               quickly: GPU ViT-g width with 2 blocks + BERT-base width with 2 Q-Former layers; CPU the tiny model
               with 1 block / 2 layers. Opt-in (BLIP2FAST_BENCH_COMPILE=1): a cold inductor compile of the whole
               step is slow where it is measured: the tiny model's forward + backward alone took 450 s on this
               project's 2-core CPU machine; a paper-size compile on the GPU is not attempted here.

Before timing, the fp8 tower's stage-1 loss is checked against the bf16 tower's (eval mode, same negatives):
within 5% (float8 rounding, see blip2fast/models/fp8.py). extra_info (e2e_support.extra_info): median ms,
samples/s, speedup over each other mode, peak memory above the weights (GPU; a CUDA graph's private pool is
allocated at capture, so its "peak" is what the replay adds), TFLOP/s and MFU of the step's FLOPs.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os

import pytest
import torch

import e2e_support as E
from blip2fast import flops
from blip2fast.models.fp8 import convert_linears_to_fp8_, fp8_unsupported
from blip2fast.training.optim import build_optimizer
from blip2fast.training.step import StepModule, TrainStep
from blip2fast.training.trainer import optimizer_flags

GPU = E.GPU
GRAPH_WARMUP = 2
PAPER_MODES = ("eager", "cuda_graphs", "fp8", "fp8_cuda_graphs") if GPU else ("eager",)
COMPILE_MODES = ("eager", "compile")
RUN_COMPILE = os.environ.get("BLIP2FAST_BENCH_COMPILE") == "1"
SCHEDULE = (1e-4, 10, 1000, 1e-5)  # (peak lr, warmup, total, floor): the schedule runs on device every step


def compile_config():
    cfg = E.stage1_config()
    depth, layers = (2, 2) if GPU else (1, 2)
    return cfg.replace(vision=dataclasses.replace(cfg.vision, depth=depth),
                       qformer=dataclasses.replace(cfg.qformer, num_layers=layers))


def _stepper(model, mode: str) -> TrainStep:
    step_mode = {"fp8": "eager", "fp8_cuda_graphs": "cuda_graphs"}.get(mode, mode)
    opt = build_optimizer(model, SCHEDULE[0], **optimizer_flags(None, step_mode, E.DEVICE))
    return TrainStep(model, StepModule(model, 1), opt, seed=0, accum=1, grad_clip=1.0, schedule=SCHEDULE,
                     device=E.DEVICE, amp=GPU, mode=step_mode, graph_warmup=GRAPH_WARMUP)


def _build(cfg, modes: tuple) -> dict:
    S = E.STAGE1
    base = E.build_model(cfg)
    base.train()
    q = cfg.qformer
    px = E.images(S.batch, cfg.vision.image_size)
    ids, mask = E.qformer_text(S.batch, S.text_len, q.vocab_size, q.cls_token_id)
    batch = {"pixel_values": px, "input_ids": ids, "attention_mask": mask}
    models, fns, checks = {}, {}, {}
    for mode in modes:
        model = base if mode == modes[0] else copy.deepcopy(base)
        if mode.startswith("fp8"):
            reasons = fp8_unsupported(E.DEVICE)
            if reasons:
                pytest.skip("fp8: " + "; ".join(reasons))
            convert_linears_to_fp8_(model.visual_encoder)
        models[mode] = model
        stepper = _stepper(model, mode)
        fns[mode] = (lambda st: lambda: st([batch]))(stepper)
    if "fp8" in models:  # the float8 tower computes the same losses within its rounding
        with torch.no_grad(), E.autocast():
            for m in (models["eager"], models["fp8"]):
                m.eval()
            ref = models["eager"].stage1_loss(px, ids, mask)
            negatives = (ref.neg_image_for_text, ref.neg_text_for_image)
            got = models["fp8"].stage1_loss(px, ids, mask, negatives=negatives)
            for m in (models["eager"], models["fp8"]):
                m.train()
        checks["rel_err_fp8_loss"] = E.assert_equal("stage-1 loss, fp8 tower vs bf16 tower", got.loss, ref.loss,
                                                    tol=0.05)
    for fn in fns.values():  # every graphed mode captures on its (GRAPH_WARMUP + 1)-th step
        for _ in range(GRAPH_WARMUP + 1):
            fn()
    measured = E.measure(fns, S)
    step_flops = flops.stage1_step_flops(cfg, S.batch, S.text_len, base).total
    config = {"vision": f"EVA {cfg.vision.width}x{cfg.vision.depth}, {cfg.vision.seq_len} tokens",
              "qformer": f"{q.hidden_size}x{q.num_layers}, {q.num_query_tokens} queries", "text_len": S.text_len,
              "step": "forward + backward + clip + AdamW (device lr)"}
    return {"fns": fns, "measured": measured, "flops": step_flops, "config": config, "checks": checks,
            "batch": S.batch, "reps": S.reps}


@pytest.fixture(scope="module")
def paper():
    return _build(E.stage1_config(), PAPER_MODES)


@pytest.fixture(scope="module")
def compiled():
    return _build(compile_config(), COMPILE_MODES)


def _report(benchmark, suite, bench: str, mode: str) -> dict:
    vs_eager = round(suite["measured"]["eager"].ms / suite["measured"][mode].ms, 3)
    info = E.report(benchmark, bench, mode, suite["fns"][mode], suite["measured"], suite["flops"], suite["batch"],
                    suite["config"], suite["checks"], suite["reps"], extra={"samples_per_s_vs_eager": vs_eager})
    assert math.isfinite(info["median_ms"]) and info["samples_per_s"] > 0
    return info


@pytest.mark.parametrize("mode", PAPER_MODES)
def test_train_step_modes(benchmark, paper, mode):
    _report(benchmark, paper, "train_step_modes", mode)


if RUN_COMPILE:  # opt-in: a cold inductor compile of the whole step takes minutes (450 s for the tiny model on 2 cores)
    @pytest.mark.parametrize("mode", COMPILE_MODES)
    def test_train_step_compile(benchmark, compiled, mode):
        _report(benchmark, compiled, "train_step_compile", mode)
