"""Shared test utilities."""
from __future__ import annotations

import os

import torch

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared")
LAVIS_TINY = os.path.normpath(os.path.join(SHARED, "reference", "lavis-stage1-tiny"))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()
