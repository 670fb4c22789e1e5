"""Fused linear + cross-entropy: the Triton op vs the chunked PyTorch op vs full logits + F.cross_entropy.

    python -m pytest benchmarks/bench_linear_ce.py                                  # CPU: tiny sizes
    BLIP2FAST_GPU_TESTS=1 python -m pytest benchmarks/bench_linear_ce.py \\
        --benchmark-json=out/bench_linear_ce.json                                   # GPU: OPT-2.7b's head

On the GPU: N = 4096 tokens, H = 2560, V = 50272 (OPT-2.7b's output layer), bf16. On the CPU: N = 256, H = 64,
V = 1000, fp32 (the Triton op then runs under the interpreter: timed so that the path never rots, not to be fast;
its numbers mean nothing).

    impl   "triton": linear_cross_entropy(backend="triton"): fused forward, chunked dlogits + cuBLAS backward
           "torch":  linear_cross_entropy(backend="torch"): chunked PyTorch, gradients computed in the forward
           "full":   F.linear -> (N, V) logits -> token_ce_sum_ref (F.cross_entropy on the fp32-upcast logits)
    pass   "fwd" (no autograd) or "fwd_bwd" (forward, then the gradients by autograd.grad)
    weight "frozen" (stage 2: the LLM's output layer; gradient for hidden only) or "trained" (stage 1: the
           Q-Former's tied decoder; gradients for hidden and weight)

extra_info per benchmark: median ms (CUDA events on a GPU), achieved TFLOP/s counting the useful GEMMs only
(2NVH for the logits, 2NVH more for d_hidden and for d_weight; the Triton backward's recomputation is not
counted), peak memory above the inputs (GPU only), the speedup over "full" measured the same way in the same run,
and the relative error of the loss against "full".
"""
from __future__ import annotations

import math

import pytest
import torch

from blip2fast.ops.linear_ce import linear_cross_entropy, linear_cross_entropy_ref
from op_timing import median_ms, peak_bytes, sync  # noqa: E402  (benchmarks/ is on sys.path)

# the Triton interpreter converts 1-element arrays to Python ints, which numpy>=1.25 warns of
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
N, H, V = (4096, 2560, 50272) if GPU else (256, 64, 1000)
IMPLS = ("triton", "torch", "full")
# (pass, weights) measured: the forward does not depend on which weights are trained, so it is measured once
CASES = [("fwd", "frozen"), ("fwd_bwd", "frozen"), ("fwd_bwd", "trained")]


def make_inputs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(DEV, DTYPE)
    weight = (torch.randn(V, H, generator=g) / math.sqrt(H)).to(DEV, DTYPE)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < 0.1] = -100  # some padding, as in a real batch
    return hidden, weight, targets.to(DEV)


def make_fn(impl: str, pass_: str, weight_mode: str, hidden, weight, targets):
    def loss_of(h, w):
        if impl == "full":
            return linear_cross_entropy_ref(h, w, None, targets)[0]
        return linear_cross_entropy(h, w, None, targets, backend=impl)[0]

    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return (loss_of(hidden, weight),)
        return run
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_(weight_mode == "trained")
    leaves = (h, w) if weight_mode == "trained" else (h,)

    def run():
        loss = loss_of(h, w)
        return (loss.detach(), *torch.autograd.grad(loss, leaves))
    return run


def useful_flops(pass_: str, weight_mode: str) -> float:
    gemm = 2.0 * N * V * H
    if pass_ == "fwd":
        return gemm
    return gemm * (3 if weight_mode == "trained" else 2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("pass_", "weight_mode"), CASES)
def test_linear_cross_entropy(benchmark, pass_, weight_mode, impl):
    hidden, weight, targets = make_inputs()
    fn = make_fn(impl, pass_, weight_mode, hidden, weight, targets)
    ref_fn = make_fn("full", pass_, weight_mode, hidden, weight, targets)
    reps, warmup = (10, 2) if GPU else ((1, 1) if impl == "triton" else (5, 2))
    ms = median_ms(fn, reps, warmup)
    ref_ms = ms if impl == "full" else median_ms(ref_fn, max(reps, 5), 2)
    got, want = fn()[0].float(), ref_fn()[0].float()
    err = ((got - want).abs() / want.abs()).item()
    peak = peak_bytes(fn)
    benchmark.group = f"linear_ce {pass_} {weight_mode}"
    benchmark.extra_info.update(
        impl=impl, pass_=pass_, weight=weight_mode, device=DEV, dtype=str(DTYPE).removeprefix("torch."),
        dims=dict(tokens=N, hidden=H, vocab=V),
        median_ms=round(ms, 4), tflops=round(useful_flops(pass_, weight_mode) / (ms * 1e-3) / 1e12, 3),
        peak_mem_mb=None if peak is None else round(peak / 2**20, 1),
        logits_fp32_mb=round(N * V * 4 / 2**20, 1),
        speedup_vs_full=round(ref_ms / ms, 3), loss_rel_err_vs_full=float(f"{err:.3g}"),
    )
    benchmark.pedantic(lambda: (fn(), sync()), rounds=reps, iterations=1, warmup_rounds=0)
    tol = 2e-2 if DTYPE == torch.bfloat16 else 1e-5
    assert err < tol, f"{impl} loss differs from the full-logits loss by {err:.3g}"
    if peak is not None and impl != "full":
        assert peak < N * V * 4, f"{impl}: peak {peak / 2**20:.0f} MB is not below the fp32 logits"
