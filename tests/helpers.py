"""Shared test utilities."""
from __future__ import annotations

import os

import pytest
import torch

# LAVIS's own stage-1 outputs on a tiny model, and the BERT tokenizer they used: in the repository (see its README)
LAVIS_TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "lavis-stage1-tiny")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_itg_logits_match(logits: torch.Tensor, ref: dict, tol: float) -> None:
    """Our (B, T, V) ITG logits against the LAVIS reference's compact record of its logits (the fixture keeps the
    log-sum-exp over the vocabulary at every position and the logits at a fixed set of vocabulary columns: every
    label id plus seeded random ones; tests/fixtures/lavis-stage1-tiny/compact.py)."""
    assert tuple(logits.shape) == tuple(ref["itg_logits_shape"].tolist())
    lse = torch.logsumexp(logits.detach().double(), dim=-1)
    assert rel_err(lse, ref["itg_logits_lse"]) < tol
    assert rel_err(logits[..., ref["itg_logit_columns"]], ref["itg_logits_at_columns"]) < tol


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


def rel_max_err(actual: torch.Tensor, expected: torch.Tensor, zero: float = 1e-9) -> float:
    """max |actual - expected| / max |expected| in float64, or the absolute error where the truth's max is below
    `zero` (a gradient that is exactly 0, where both PyTorch and a kernel return rounding noise)."""
    scale = expected.abs().max().item()
    return (actual.double() - expected.double()).abs().max().item() / (scale if scale > zero else 1.0)


def assert_twice_torch(name: str, got: torch.Tensor, low: torch.Tensor, truth: torch.Tensor, floor: float,
                       what: str = "", zero: float = 1e-9) -> float:
    """The kernels' accuracy rule (flash-attention's): finite, and max error against the float64 truth at most
    twice PyTorch's own in the same dtype (`low`), or `floor`, whichever is larger. Returns the error."""
    assert torch.isfinite(got).all(), f"{what} {name}: non-finite values"
    err, err_torch = rel_max_err(got, truth, zero), rel_max_err(low, truth, zero)
    bound = max(2 * err_torch, floor)
    assert err <= bound, f"{what} {name}: error {err:.2e} > {bound:.2e} (PyTorch's own {err_torch:.2e})"
    return err


def itc_temp_grad_floor(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, temp: float) -> float:
    """What fp32 rounding alone can put on d loss / d temp: twice fp32's epsilon times the sum of the magnitudes of
    the terms that the gradient adds up, |(p - y) * logit| / temp over both directions, averaged as the loss is
    (one-hot targets on the diagonal: a magnitude, not the exact smoothed value). The gradient is a tiny difference
    of those terms (measured on the tiny model: -1.8e-3 from terms summing to 120 in magnitude, a condition number
    near 7e4), so fp32 rounding of its inputs moves it by ~7e-6 whatever computes it, and PyTorch's own error in one
    run (1.3e-6 with torch 2.11, 1.8e-6 with 2.13 on the same test) is one draw of that noise, not a bound."""
    total = 0.0
    for logits in (sim_i2t.detach().double(), sim_t2i.detach().double()):
        rows = logits.shape[0]
        target = torch.zeros_like(logits)
        target[torch.arange(rows), torch.arange(rows)] = 1.0
        total += ((logits.softmax(-1) - target) * logits).abs().sum().item() / (temp * 2 * rows)
    return 2 * torch.finfo(torch.float32).eps * total


def assert_norms_twice_torch(pairs, floors: dict | None = None) -> None:
    """Whole-model rule for (name, kernel fp32, PyTorch fp32, float64 truth) pairs (losses, every parameter's
    gradient): ||kernel - fp64|| <= max(2 ||torch fp32 - fp64||, 1e-3 ||fp64||, 1e-7). Twice PyTorch's own fp32
    error, or 0.1% of the value: some gradients are ill-conditioned in fp32 whatever computes them, and the key
    biases have a true gradient of 0 (softmax is shift-invariant), so only rounding noise is compared there; a
    wiring bug (a wrong mask, dropout site, index) moves gradients by percents."""
    for name, g, t, w in pairs:
        err, err_torch = (g.double() - w).norm().item(), (t.double() - w).norm().item()
        bound = max(2 * err_torch, 1e-3 * w.norm().item(), 1e-7, (floors or {}).get(name, 0.0))
        assert err <= bound, f"{name}: |kernel - fp64| {err:.2e} > {bound:.2e} (torch fp32: {err_torch:.2e})"
