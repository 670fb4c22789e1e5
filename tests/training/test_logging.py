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
    for s in ("step  50/100", "loss 3.000", "itc 1.00", "itm 0.50", "itg 1.50", "lr 1.0e-04", "320 samples/s",
              "MFU 64.0%", "ETA 10s"):
        assert s in line, (s, line)
    assert len(line) <= 100, line
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


def _logger(tmp_path, lines, total=250_000, tensorboard=False, **kw):
    return MetricLogger(str(tmp_path), 0, total, ("loss", "itc", "itm", "itg"), tensorboard=tensorboard,
                        print_fn=lines.append, **kw)


def test_progress_lines_fit_100_columns_and_drop_optional_parts_first(tmp_path):
    """Even at the paper's step counts, large losses, a GPU's MFU and a slow rate, a window line fits 100 columns;
    the gradient norm is shown whenever it fits (here: no MFU)."""
    lines = []
    big = _logger(tmp_path / "a", lines, flops_per_sample=1e12, peak=1e15, progress="lines")
    big.window(123_456, {"loss": 123.456, "itc": 45.678, "itm": 0.693, "itg": 77.085}, 1.234e-4, 1234.5, 50, 5,
               4321.0)
    cpu = _logger(tmp_path / "b", lines, total=600, progress="lines")
    cpu.window(50, {"loss": 3.0, "itc": 1.0, "itm": 0.5, "itg": 1.5}, 2e-3, 2.5, 50, 3200, 40.0)
    assert all(len(line) <= 100 for line in lines), [len(line) for line in lines]
    assert "step 123456/250000" in lines[0] and "MFU" in lines[0] and "0.00116 samples/s" in lines[0]
    assert "|g| 2.50" in lines[1] and " 80 samples/s" in lines[1]


def test_without_a_terminal_the_first_step_and_every_window_print_plain_lines(tmp_path, monkeypatch):
    """Not a terminal (a pipe, a job log): one line right after the first step (so the run is visibly alive), then
    one per window; no carriage return or escape code anywhere."""
    monkeypatch.delenv("BLIP2FAST_PROGRESS", raising=False)
    lines = []
    log = _logger(tmp_path, lines, total=20, every=10)
    assert log.mode == "lines"  # print_fn is not print: never a bar
    log.event("start", step=0)
    for step in range(1, 21):
        log.tick(step, 64)
        if step % 10 == 0:
            log.window(step, {"loss": 5.0 - step / 10, "itc": 1.0, "itm": 0.5, "itg": 1.5}, 1e-3, 1.0, 10, 640, 2.0)
    log.close()
    assert len(lines) == 3, lines
    assert lines[0].startswith("step 1/20 done (64 samples in ") and "a line every 10 steps" in lines[0]
    assert lines[1].startswith("step 10/20") and lines[2].startswith("step 20/20") and "loss 3.000" in lines[2]
    assert not any("\r" in line or "\033" in line for line in lines)


def test_on_a_terminal_a_bar_is_redrawn_from_the_first_step(tmp_path, capsys):
    lines = []
    log = _logger(tmp_path, lines, total=5, every=5, progress="bar")
    log.event("start", step=0)
    log.tick(1, 64)
    bar = capsys.readouterr().out
    assert bar.startswith("\r[") and "1/5" in bar and "samples/s" in bar and "ETA" in bar and not lines
    assert len(bar.replace("\r", "").replace("\033[K", "")) <= 100, bar
    log.info("  checkpoint: somewhere")  # a message clears the bar's line first
    assert capsys.readouterr().out == "\r\033[K" and lines == ["  checkpoint: somewhere"]
    log.close()


def test_tensorboard_event_files_by_default_and_a_clear_note_without_it(tmp_path, monkeypatch):
    log = _logger(tmp_path / "with", [], total=10, tensorboard=True)
    log.window(10, {"loss": 3.0, "itc": 1.0, "itm": 0.5, "itg": 1.5}, 1e-3, 1.0, 10, 640, 2.0)
    log.close()
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "with" / "tb"))
    assert log.tb_note.startswith("TensorBoard: tensorboard --logdir ")
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)  # as if not installed
    bare = _logger(tmp_path / "without", [], total=10, tensorboard=True)
    assert bare._tb is None and "pip install tensorboard" in bare.tb_note and "blip2fast.plot" in bare.tb_note
    bare.close()
