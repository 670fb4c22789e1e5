"""Timing helpers shared by every benchmark (bench_<op>.py and e2e_support.py): one call's milliseconds (CUDA
events on a GPU: device time, host syncs inside the call included; wall clock on a CPU), the median of repeated
calls, and the peak memory a call adds (GPU only). Not a benchmark file itself."""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

GPU = torch.cuda.is_available()


def sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def time_once_ms(fn: Callable[[], object]) -> float:
    if GPU:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def median_ms(fn: Callable[[], object], reps: int, warmup: int) -> float:
    """Median milliseconds of `reps` calls after `warmup` untimed ones (Triton / inductor compile on the first)."""
    for _ in range(warmup):
        fn()
    sync()
    times = sorted(time_once_ms(fn) for _ in range(reps))
    return times[len(times) // 2]


def peak_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Bytes allocated at the peak of one call above what was allocated before it (None on a CPU)."""
    if not GPU:
        return None
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() - base
