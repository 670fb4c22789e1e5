"""Logs: the progress line, metrics.jsonl, and the FLOP estimate behind throughput and MFU."""
from __future__ import annotations

import dataclasses
import os

import torch
from torch.utils.flop_counter import FlopCounterMode

from blip2fast.models.blip2 import Blip2
from blip2fast.training.config import demo_model
from blip2fast.flops import vision_flops
from blip2fast.training.logging import MetricLogger, peak_flops, read_metrics, step_flops_per_sample


def test_progress_line_and_jsonl(tmp_path):
    lines = []
    log = MetricLogger(str(tmp_path), 0, 100, ("loss", "itc", "itm", "itg"), flops_per_sample=2e9, peak=1e12,
                       tensorboard=False, print_fn=lines.append)
    rec = log.window(50, {"loss": 3.0, "itc": 1.0, "itm": 0.5, "itg": 1.5}, 1e-4, 2.5, 10, 640, 2.0)
    log.event("checkpoint", step=50, path="x")
    log.close()
    line = lines[-1]
    for s in ("step  50/100", "loss 3.0000", "itc 1.000", "itm 0.500", "itg 1.500", "lr 1.00e-04", "|g| 2.50",
              "320 samples/s", "0.64 TFLOP/s (est.)", "MFU 64.0% (est.)", "ETA 10s", "[=====>"):
        assert s in line, (s, line)
    recs = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["event"] for r in recs] == ["train", "checkpoint"]
    assert recs[0]["samples_per_s"] == rec["samples_per_s"] == 320 and abs(recs[0]["mfu_est"] - 0.64) < 1e-9
    other_rank = MetricLogger(str(tmp_path / "r1"), 1, 100, ("loss",), print_fn=lines.append)
    n = len(lines)
    other_rank.window(1, {"loss": 1.0}, 0.1, 1.0, 1, 8, 1.0)
    assert len(lines) == n and not os.path.exists(tmp_path / "r1")  # only rank 0 prints and writes


def test_peak_flops_table_and_override():
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), override_tflops=2.0) == 2e12


def test_flop_estimate_matches_a_counted_vision_forward_and_counts_stage1():
    m = demo_model()
    model = Blip2(m.replace(vision=dataclasses.replace(m.vision, dtype="float32"))).eval()
    cfg = model.config
    px = torch.randn(2, 3, 32, 32)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model.visual_encoder(px)
    counted = fc.get_total_flops() / 2
    est = vision_flops(model, cfg)
    assert 0.8 < est / counted < 1.25, (est, counted)  # the estimate leaves out elementwise work only
    per_sample = step_flops_per_sample(model, cfg, stage=1, text_len=cfg.max_text_len)
    assert per_sample > est  # the Q-Former's passes (x3 for backward) come on top of the tower's forward


def test_low_sample_rates_keep_their_digits():
    from blip2fast.training.logging import _rate

    assert [_rate(x) for x in (0.4123, 1.26, 7.349, 41.23, 320.4)] == ["0.412", "1.26", "7.35", "41.2", "320"]
