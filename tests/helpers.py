"""Shared test utilities."""
from __future__ import annotations

import os

import pytest
import torch

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared")
LAVIS_TINY = os.path.normpath(os.path.join(SHARED, "reference", "lavis-stage1-tiny"))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def triton_test_device(interpreted: bool) -> str:
    """Where a Triton kernel test module runs: "cpu" when the kernels were built for the interpreter (CI), "cuda"
    when they are compiled and a GPU is present (the GPU check, BLIP2FAST_GPU_TESTS=1); compiled kernels without
    a GPU have nowhere to run, so the calling module is skipped."""
    if interpreted:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("Triton kernels compiled (TRITON_INTERPRET unset) but no CUDA GPU: nothing can run them",
                allow_module_level=True)
