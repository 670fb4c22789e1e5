"""What a run reports: rank-0 progress lines, a JSONL metrics file, TensorBoard when installed, and throughput
with MFU from an analytic FLOP estimate of the configured model.

Progress, at most 100 columns. Every `logging.every` steps one line with the means over those steps:

    step  500/1000  loss 3.593 (itc 1.59 itm 0.58 itg 1.43)  lr 1.2e-03  612 samples/s  ETA 1m12s  |g| 1.21

and on a terminal, below those lines, a bar redrawn every step from the first one:

    [==========>         ] 512/1000  51%  598 samples/s  ETA 0m49s  loss 3.593

Without a terminal (a pipe, a job log) the first step prints one line instead of the bar. TensorBoard event
files go to <run>/tb (train/* and eval/* scalars); <run>/curves.png is drawn at the end (blip2fast.plot).

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


def _bar(frac: float, width: int = 20) -> str:
    filled = min(width, int(frac * width))
    return "[" + "=" * filled + (">" if filled < width else "") + " " * max(0, width - filled - 1) + "]"


LINE_WIDTH = 100  # progress lines and the live bar fit a 100-column terminal


def _fit(required: list, optional: list, width: int = LINE_WIDTH) -> str:
    """The required parts joined by two spaces, plus each optional part (in order) that still fits in `width`."""
    parts = list(required)
    for extra in optional:
        if len("  ".join(parts + [extra])) <= width:
            parts.append(extra)
    return "  ".join(parts)


def progress_mode(print_fn: Callable[[str], None], rank: int) -> str:
    """"bar": a live progress bar redrawn every step (rank 0 printing to a terminal); "lines": one plain line per
    logging window (a file, a pipe, a job log: no carriage returns); BLIP2FAST_PROGRESS=bar|lines overrides."""
    forced = os.environ.get("BLIP2FAST_PROGRESS", "").strip().lower()
    if forced in ("bar", "lines"):
        return forced
    return "bar" if rank == 0 and print_fn is print and sys.stdout.isatty() else "lines"


class MetricLogger:
    """Rank 0 prints and writes; other ranks' calls do nothing.

    Progress: `tick(step, samples)` after every optimiser step (host-side timing only: it reads nothing from the
    device). On a terminal a live bar (steps, samples/s over the recent steps, ETA, the last window's loss) is
    redrawn at most 10 times a second below the permanent lines; otherwise the first step prints one line (so a
    job log shows the run started and how long a step takes) and every window prints one plain line."""

    def __init__(self, run_dir: Optional[str], rank: int, total_steps: int, loss_names: tuple,
                 flops_per_sample: float = 0.0, peak: Optional[float] = None, jsonl: bool = True,
                 tensorboard: bool = True, print_fn: Callable[[str], None] = print, every: int = 0,
                 progress: Optional[str] = None):
        self.rank, self.total_steps, self.loss_names = rank, total_steps, loss_names
        self.flops_per_sample, self.peak = flops_per_sample, peak
        self.print = print_fn
        self.every = every
        self.mode = progress or progress_mode(print_fn, rank)
        self.t0 = time.perf_counter()
        self._t_loop = self.t0  # when the training loop began (reset by the start / before-training events)
        self._ticks: list = []  # recent (time, step, samples so far) for the bar's rate
        self._samples = 0
        self._first_step_shown = False
        self._bar_shown = False
        self._bar_drawn_at = 0.0
        self._last_loss: Optional[float] = None
        self._jsonl = None
        self._tb = None
        self.tb_note = ""
        self.run_dir = run_dir
        if rank != 0 or run_dir is None:
            return
        os.makedirs(run_dir, exist_ok=True)
        if jsonl:
            self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            except ImportError:
                self.tb_note = ("TensorBoard is not installed (pip install tensorboard): no event files; metrics.jsonl "
                                "and python -m blip2fast.plot still work")
            else:
                self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
                self.tb_note = f"TensorBoard: tensorboard --logdir {os.path.join(run_dir, 'tb')}"

    @property
    def active(self) -> bool:
        return self.rank == 0

    # ---------------------------------------------------------------- printing around the live bar
    def _clear_bar(self) -> None:
        if self._bar_shown:
            sys.stdout.write("\r\033[K")
            self._bar_shown = False

    def _emit(self, msg: str) -> None:
        self._clear_bar()
        self.print(msg)
        sys.stdout.flush()

    def info(self, msg: str) -> None:
        if self.rank == 0:
            self._emit(msg)

    def tick(self, step: int, samples: int) -> None:
        """Optimiser step `step` (1-based) is done; `samples` went through it (all ranks)."""
        if self.rank != 0:
            return
        now = time.perf_counter()
        self._samples += samples
        self._ticks.append((now, step, self._samples))
        if len(self._ticks) > 50:
            del self._ticks[0]
        if not self._first_step_shown:
            self._first_step_shown = True
            if self.mode == "lines":
                took = now - self._t_loop
                nxt = f"; a line every {self.every} steps" if self.every and self.every < self.total_steps else ""
                self._emit(f"step {step}/{self.total_steps} done ({samples} samples in {took:.1f} s){nxt}")
        if self.mode == "bar" and (now - self._bar_drawn_at >= 0.1 or step == self.total_steps):
            self._bar_drawn_at = now
            sys.stdout.write("\r" + self._bar_line(now, step) + "\033[K")
            sys.stdout.flush()
            self._bar_shown = True

    def _bar_line(self, now: float, step: int) -> str:
        (t_a, step_a, n_a), (t_b, step_b, n_b) = self._ticks[0], self._ticks[-1]
        if t_b > t_a:
            rate, step_rate = (n_b - n_a) / (t_b - t_a), (step_b - step_a) / (t_b - t_a)
        else:  # one tick so far: the first step, timed from the start of the loop
            dt = max(now - self._t_loop, 1e-9)
            rate, step_rate = n_b / dt, step_b / dt
        eta = (self.total_steps - step) / step_rate if step_rate > 0 else 0.0
        frac = step / max(1, self.total_steps)
        required = [f"{_bar(frac)} {step}/{self.total_steps} {100 * frac:3.0f}%", f"{_rate(rate)} samples/s",
                    f"ETA {_duration(eta)}"]
        optional = [f"loss {self._last_loss:.3f}"] if self._last_loss is not None else []
        return _fit(required, optional)

    # ---------------------------------------------------------------- records
    def event(self, kind: str, **fields) -> None:
        if kind in ("start", "resume") or (kind == "eval" and fields.get("when") == "before"):
            self._t_loop = time.perf_counter()  # the loop starts after these: the first step is timed from here
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"event": kind, **fields}, default=_json_default) + "\n")
            self._jsonl.flush()
        if self._tb is not None and kind == "eval" and "step" in fields:
            for k, v in fields.items():
                if isinstance(v, float):
                    self._tb.add_scalar(f"eval/{k}", v, fields["step"])

    def window(self, step: int, means: dict, lr: float, grad_norm: float, n_steps: int, n_samples: int,
               elapsed: float) -> dict:
        """Log the window that ended at `step` (1-based count of optimiser steps done): a progress line (at most
        100 columns), one JSONL record, TensorBoard scalars. Returns the record."""
        rate = n_samples / max(elapsed, 1e-9)
        step_rate = n_steps / max(elapsed, 1e-9)
        tflops = rate * self.flops_per_sample / 1e12
        rec = {"step": step, **means, "lr": lr, "grad_norm": grad_norm, "samples_per_s": rate,
               "steps_per_s": step_rate, "tflops_est": tflops,
               "mfu_est": (tflops * 1e12 / self.peak) if self.peak else None,
               "elapsed_s": time.perf_counter() - self.t0}
        if self.rank != 0:
            return rec
        self._last_loss = means["loss"]
        terms = " ".join(f"{k} {means[k]:.2f}" for k in self.loss_names[1:])
        eta = (self.total_steps - step) / step_rate if step_rate > 0 else 0.0
        loss = f"loss {means['loss']:.3f}"
        required = [f"step {step:{len(str(self.total_steps))}d}/{self.total_steps}",
                    loss + (f" ({terms})" if terms else ""), f"lr {lr:.1e}", f"{_rate(rate)} samples/s",
                    f"ETA {_duration(eta)}"]
        if len("  ".join(required)) > LINE_WIDTH:  # huge step counts / losses: the terms go first
            required[1] = loss
        optional = [f"MFU {100 * rec['mfu_est']:.1f}%"] if rec["mfu_est"] is not None else []
        optional += [f"|g| {grad_norm:.2f}"]
        self._emit(_fit(required, optional))
        self.event("train", **rec)
        if self._tb is not None:
            for k, v in rec.items():
                if isinstance(v, float):
                    self._tb.add_scalar(f"train/{k}", v, step)
        return rec

    def write_curves(self) -> Optional[str]:
        """<run dir>/curves.png from metrics.jsonl (loss, learning rate, held-out metric); prints where it went, or
        why there is none (matplotlib missing). Rank 0."""
        if self.rank != 0 or self.run_dir is None or self._jsonl is None:
            return None
        from ..plot import PlotError, plot_run

        try:
            path = plot_run(self.run_dir)
        except PlotError as e:
            self._emit(f"  curves: not written ({e})")
            return None
        self._emit(f"  curves: {path} (again any time: python -m blip2fast.plot {self.run_dir})")
        return path

    def close(self) -> None:
        self._clear_bar()
        sys.stdout.flush()
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
