"""ITC loss, forward + backward: the Triton op vs the PyTorch reference (and the C++/CUDA op when built).

    python -m pytest benchmarks/bench_itc_loss.py                                    # CPU: tiny sizes
    BLIP2FAST_GPU_TESTS=1 python -m pytest benchmarks/bench_itc_loss.py \\
        --benchmark-json=out/bench_itc_loss.json                                       # GPU: the paper's sizes

On the GPU: B = 128 rows per rank against Ba in {128, 1024, 8192} gathered columns (1, 8, 64 ranks), Q = 32
queries, E = 256, bf16. On the CPU: B = 4, Ba in {4, 12}, Q = 4, E = 16, fp32 (the Triton op then runs under the
interpreter: timed so that the path never rots, its numbers mean nothing). The result decides the automatic
backend order on CUDA (blip2fast/ops/itc_loss.py `_choose_backend`: triton, cpp, torch until measured).

    impl "triton": blip2fast.ops.itc_loss(backend="triton")
         "torch":  the reference (itc_similarities + itc_loss_ref: (B, Ba, Q) products, amax, cross-entropy)
         "cpp":    backend="cpp" (torch.ops.blip2fast.itc_loss_fwd / bwd), skipped with the reason when not built
    convention "lavis": image_all / text_all detached (the training default: grads for image_feats, text_feat, temp)
               "full":  image_all / text_all carry grad too (the gradient-carrying gather)

extra_info per benchmark: median ms (CUDA events on a GPU), the speedup over "torch" measured the same way in the
same run, peak memory above the inputs (GPU), the max error against the reference (loss and gradients), and the
roofline: `min_bytes` (what a fused implementation must move: the inputs read by the forward and again by the
backward, sims + argmax written once and read back by the cross-entropy and by each gradient kernel, gradients
written), `flops` (2 B Ba Q E per product: two in the forward, one per gradient in the backward), achieved GB/s
against the H200's ~4.8 TB/s and TFLOP/s against its ~989 dense bf16 TFLOP/s, and `roofline_fraction` = the
roofline time max(bytes / 4.8 TB/s, flops / 989 TFLOP/s) over the measured time.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blip2fast.ops import itc_loss as ops
from op_timing import median_ms, peak_bytes, sync  # noqa: E402  (benchmarks/ is on sys.path)

# the Triton interpreter converts 1-element arrays to Python ints, which numpy>=1.25 warns of
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
B, Q, E = (128, 32, 256) if GPU else (4, 4, 16)
BA = (128, 1024, 8192) if GPU else (4, 12)
IMPLS = ("triton", "torch", "cpp")
CONVENTIONS = ("lavis", "full")
HBM_BYTES_PER_S = 4.8e12  # H200 HBM3e
PEAK_FLOPS = 989e12  # H200 dense bf16 tensor cores


def make_inputs(Ba: int):
    g = torch.Generator().manual_seed(Ba)

    def feats(*shape):
        return F.normalize(torch.randn(*shape, generator=g), dim=-1).to(DEV, DTYPE)

    targets = (torch.arange(B) + (B if Ba >= 2 * B else 0)).to(DEV)  # rank 1's rows when there are several ranks
    return feats(B, Q, E), feats(B, E), feats(Ba, Q, E), feats(Ba, E), torch.tensor(0.07, device=DEV), targets


def make_fn(impl: str, convention: str, inputs):
    """A zero-argument callable: forward, then the gradients of the convention's inputs (autograd.grad)."""
    image_feats, text_feat, image_all, text_all, temp, targets = inputs
    leaves = [image_feats.detach().requires_grad_(), text_feat.detach().requires_grad_()]
    alls = [image_all, text_all]
    if convention == "full":
        alls = [t.detach().requires_grad_() for t in alls]
        leaves += alls
    temp = temp.detach().requires_grad_()
    leaves.append(temp)

    def run():
        loss, _, _ = ops.itc_loss(leaves[0], leaves[1], alls[0], alls[1], temp, targets, 0.1, backend=impl)
        return (loss, *torch.autograd.grad(loss, leaves))
    return run


def roofline(Ba: int, convention: str) -> tuple[float, float]:
    """(min bytes, flops) of the fused forward + backward (see the module docstring)."""
    el = torch.finfo(DTYPE).bits // 8
    inputs = (B * Q * E + B * E + Ba * Q * E + Ba * E) * el
    n_grads = 4 if convention == "full" else 2
    grads = (B * Q * E + B * E + (Ba * Q * E + Ba * E if convention == "full" else 0)) * el
    sims_args = 2 * B * Ba * (4 + 4)  # float32 sims + int32 argmax, both directions
    min_bytes = 2 * inputs + grads + sims_args * (1 + n_grads / 2) + 2 * B * Ba * 4  # + the CE's read of the sims
    flops = 2.0 * B * Ba * Q * E * (2 + n_grads)
    return min_bytes, flops


def max_rel_err(got, want) -> float:
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()
               for a, b in zip(got, want))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("Ba", BA)
def test_itc_loss(benchmark, Ba, convention, impl):
    if impl == "cpp" and not ops.cpp_status()[0]:
        pytest.skip(f"cpp backend unavailable: {ops.cpp_status()[2]}")
    if impl == "cpp" and GPU and not ops.cpp_status()[1]:
        pytest.skip("blip2fast._C was built without CUDA kernels")
    inputs = make_inputs(Ba)
    fn = make_fn(impl, convention, inputs)
    ref_fn = make_fn("torch", convention, inputs)
    reps, warmup = (20, 3) if GPU else ((1, 1) if impl == "triton" else (5, 2))
    ms = median_ms(fn, reps, warmup)
    ref_ms = ms if impl == "torch" else median_ms(ref_fn, max(reps, 5), 2)
    err = max_rel_err(fn(), ref_fn())
    peak = peak_bytes(fn)
    min_bytes, flops = roofline(Ba, convention)
    ideal_s = max(min_bytes / HBM_BYTES_PER_S, flops / PEAK_FLOPS)
    benchmark.group = f"itc Ba={Ba} {convention}"
    benchmark.extra_info.update(
        impl=impl, convention=convention, device=DEV, dtype=str(DTYPE).removeprefix("torch."),
        dims=dict(B=B, Ba=Ba, Q=Q, E=E), median_ms=round(ms, 4), speedup_vs_torch=round(ref_ms / ms, 3),
        peak_mem_mb=None if peak is None else round(peak / 2**20, 2), max_rel_err_vs_torch=float(f"{err:.3g}"),
        min_bytes=int(min_bytes), flops=flops, achieved_gb_s=round(min_bytes / (ms * 1e-3) / 1e9, 1),
        hbm_fraction=round(min_bytes / (ms * 1e-3) / HBM_BYTES_PER_S, 4),
        tflops=round(flops / (ms * 1e-3) / 1e12, 3), roofline_fraction=round(ideal_s / (ms * 1e-3), 4),
    )
    benchmark.pedantic(lambda: (fn(), sync()), rounds=reps, iterations=1, warmup_rounds=0)
    tol = 0.05 if DTYPE == torch.bfloat16 else 1e-3
    assert err < tol or impl == "torch", f"{impl} differs from the reference by {err:.3g}"
    assert math.isfinite(ms)
