"""What a run reports: rank-0 progress lines, a JSONL metrics file, TensorBoard when installed, and throughput
with MFU from an analytic FLOP estimate of the configured model.

Progress line (every `logging.every` steps, the means over those steps):

    [=====>    ] step   500/1000  loss 3.593 (itc 1.586 itm 0.577 itg 1.430)  lr 1.18e-03  |g| 1.21
        612 samples/s  0.05 TFLOP/s (est.)  ETA 1m12s

metrics.jsonl: one JSON object per line; `{"event": "train", "step", <loss terms>, "lr", "grad_norm",
"samples_per_s", "tflops_est", "mfu_est", "elapsed_s"}` per window, plus events (`start`, `resume`, `eval`,
`checkpoint`, `epoch_end`, `export`, `end`) with their fields. A resumed run appends: a step logged before a
kill and again after the resume has the same values (deterministic mode) and readers keep the last record.

FLOPs are an *estimate*: matmul and attention-score FLOPs of every pass, counted analytically from the config
(x3 for the trainable Q-Former: forward + backward; x1 for the frozen tower; x2 for a frozen LLM that gradients
flow through). It ignores norms, softmax, elementwise ops and padding-skipping, so MFU is approximate.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Optional

import torch


# Dense bf16 tensor-core peaks (no sparsity) of common GPUs, FLOP/s, matched against torch.cuda.get_device_name.
GPU_PEAK_BF16 = (
    ("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("A10G", 70e12), ("A10", 125e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12),
)


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> Optional[float]:
    """Per-device peak FLOP/s for MFU: the override, else the table for a known GPU, else None (CPUs)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in GPU_PEAK_BF16:
        if key in name:
            return value
    return None


# ------------------------------------------------------------------------------------------------ FLOP estimate
# The FLOP model lives in blip2fast/flops.py (what counts, the backward convention, tested against torch's
# FlopCounterMode); these names stay importable from here for the trainer.
from ..flops import step_flops_per_sample  # noqa: E402,F401


# ------------------------------------------------------------------------------------------------ the logger
def _rate(per_s: float) -> str:
    """Three significant digits below 100 ("0.412", "7.35", "41.2"), whole numbers above: a slow CPU run's 0.4
    samples/s never shows as 0 or 1."""
    return f"{per_s:.0f}" if per_s >= 100 else f"{per_s:.3g}"


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _bar(frac: float, width: int = 10) -> str:
    filled = int(frac * width)
    return "[" + "=" * filled + (">" if filled < width else "") + " " * max(0, width - filled - 1) + "]"


class MetricLogger:
    """Rank 0 prints and writes; other ranks' calls do nothing."""

    def __init__(self, run_dir: Optional[str], rank: int, total_steps: int, loss_names: tuple,
                 flops_per_sample: float = 0.0, peak: Optional[float] = None, jsonl: bool = True,
                 tensorboard: bool = True, print_fn: Callable[[str], None] = print):
        self.rank, self.total_steps, self.loss_names = rank, total_steps, loss_names
        self.flops_per_sample, self.peak = flops_per_sample, peak
        self.print = print_fn
        self.t0 = time.perf_counter()
        self._jsonl = None
        self._tb = None
        self.tb_note = ""
        if rank != 0 or run_dir is None:
            return
        os.makedirs(run_dir, exist_ok=True)
        if jsonl:
            self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            except ImportError:
                self.tb_note = "TensorBoard not installed (pip install tensorboard): metrics.jsonl only"
            else:
                self._tb = SummaryWriter(os.path.join(run_dir, "tb"))

    @property
    def active(self) -> bool:
        return self.rank == 0

    def info(self, msg: str) -> None:
        if self.rank == 0:
            self.print(msg)
            sys.stdout.flush()

    def event(self, kind: str, **fields) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"event": kind, **fields}, default=_json_default) + "\n")
            self._jsonl.flush()
        if self._tb is not None and kind == "eval" and "step" in fields:
            for k, v in fields.items():
                if isinstance(v, float):
                    self._tb.add_scalar(f"eval/{k}", v, fields["step"])

    def window(self, step: int, means: dict, lr: float, grad_norm: float, n_steps: int, n_samples: int,
               elapsed: float) -> dict:
        """Log the window that ended at `step` (1-based count of optimiser steps done): a progress line, one
        JSONL record, TensorBoard scalars. Returns the record."""
        rate = n_samples / max(elapsed, 1e-9)
        step_rate = n_steps / max(elapsed, 1e-9)
        tflops = rate * self.flops_per_sample / 1e12
        rec = {"step": step, **means, "lr": lr, "grad_norm": grad_norm, "samples_per_s": rate,
               "steps_per_s": step_rate, "tflops_est": tflops,
               "mfu_est": (tflops * 1e12 / self.peak) if self.peak else None,
               "elapsed_s": time.perf_counter() - self.t0}
        if self.rank != 0:
            return rec
        terms = " ".join(f"{k} {means[k]:.3f}" for k in self.loss_names[1:])
        eta = (self.total_steps - step) / step_rate if step_rate > 0 else 0.0
        mfu = f"  MFU {100 * rec['mfu_est']:.1f}% (est.)" if rec["mfu_est"] is not None else ""
        frac = step / max(1, self.total_steps)
        self.print(f"{_bar(frac)} step {step:{len(str(self.total_steps))}d}/{self.total_steps}  loss "
                   f"{means['loss']:.4f}" + (f" ({terms})" if terms else "") + f"  lr {lr:.2e}  |g| {grad_norm:.2f}  "
                   f"{_rate(rate)} samples/s  {tflops:.3g} TFLOP/s (est.){mfu}  ETA {_duration(eta)}")
        sys.stdout.flush()
        self.event("train", **rec)
        if self._tb is not None:
            for k, v in rec.items():
                if isinstance(v, float):
                    self._tb.add_scalar(f"train/{k}", v, step)
        return rec

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _json_default(o):
    if torch.is_tensor(o):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file (a torn last line from a kill is ignored)."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


__all__ = ["GPU_PEAK_BF16", "MetricLogger", "peak_flops", "read_metrics", "step_flops_per_sample"]
