"""LayerNorm(x + residual): the Triton kernels vs the PyTorch reference (and, on a GPU, torch.compile of it).

    python -m pytest benchmarks/bench_layer_norm.py                                   # CPU: tiny sizes
    BLIP2FAST_GPU_TESTS=1 python -m pytest benchmarks/bench_layer_norm.py \\
        --benchmark-json=out/bench_layer_norm.json                                     # GPU: Q-Former sizes

The Q-Former's post-LN residual blocks at BERT-base width: 128 x 64 rows ([queries | text] of a batch of 128) x
768, bf16, with the residual; on the CPU 64 x 100 fp32, where the Triton kernels run under the interpreter (timed
so that the path never rots; their numbers mean nothing).

    impl "triton":   layer_norm(backend="triton")            (kernels/layer_norm.py; one read of x and residual)
         "torch":    layer_norm_ref = F.layer_norm(x + residual)  (materialises the sum; PyTorch's fused LN)
         "inductor": torch.compile(layer_norm_ref)            (GPU only: what a compiled model would get)
    pass "fwd" or "fwd_bwd" (forward, then dx, dweight, dbias, dresidual by autograd.grad)

extra_info: median ms (CUDA events on a GPU), achieved GB/s (the bytes a fused kernel must move: forward reads x,
residual and writes y; backward reads dy, x, residual and writes d(x + residual)), peak memory above the inputs
(GPU only), the speedup over "torch" measured the same way in the same run, and the max error against it.
"""
from __future__ import annotations

import math

import pytest
import torch

from blip2fast.ops.layer_norm import layer_norm, layer_norm_ref
from op_timing import median_ms, peak_bytes, sync  # noqa: E402  (benchmarks/ is on sys.path)

# the Triton interpreter converts 1-element arrays to Python ints, which numpy>=1.25 warns of
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
ROWS, N = (128 * 64, 768) if GPU else (64, 100)
EPS = 1e-12  # BERT's
IMPLS = ("triton", "torch", "inductor") if GPU else ("triton", "torch")
PASSES = ("fwd", "fwd_bwd")


def make_inputs():
    g = torch.Generator().manual_seed(0)
    x, res, dy = (torch.randn(ROWS, N, generator=g).to(DEV, DTYPE) for _ in range(3))
    w = (1 + 0.1 * torch.randn(N, generator=g)).to(DEV, DTYPE)
    b = (0.1 * torch.randn(N, generator=g)).to(DEV, DTYPE)
    return x, res, w, b, dy


_compiled = None


def make_fn(impl: str, pass_: str, x, res, w, b, dy):
    global _compiled
    if impl == "triton":
        def ln(x, w, b, res):
            return layer_norm(x, w, b, EPS, residual=res, backend="triton")
    elif impl == "torch":
        def ln(x, w, b, res):
            return layer_norm_ref(x, w, b, EPS, res)
    else:
        if _compiled is None:
            _compiled = torch.compile(lambda x, w, b, res: layer_norm_ref(x, w, b, EPS, res))
        ln = _compiled
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return (ln(x, w, b, res),)
    else:
        leaves = [t.detach().requires_grad_() for t in (x, w, b, res)]

        def run():
            y = ln(*leaves)
            return (y, *torch.autograd.grad(y, leaves, dy))
    return run


def min_bytes(pass_: str) -> int:
    elt = torch.tensor([], dtype=DTYPE).element_size()
    fwd = 3 * ROWS * N * elt
    return fwd if pass_ == "fwd" else fwd + 4 * ROWS * N * elt


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", PASSES)
def test_layer_norm(benchmark, pass_, impl):
    x, res, w, b, dy = make_inputs()
    fn = make_fn(impl, pass_, x, res, w, b, dy)
    ref_fn = make_fn("torch", pass_, x, res, w, b, dy)
    reps, warmup = (50, 5) if GPU else ((2, 1) if impl == "triton" else (10, 2))
    ms = median_ms(fn, reps, warmup)
    ref_ms = ms if impl == "torch" else median_ms(ref_fn, max(reps, 10), 2)
    got, want = fn(), ref_fn()
    err = max(((a.float() - c.float()).abs().max() / c.float().abs().max()).item() for a, c in zip(got, want))
    peak = peak_bytes(fn)
    benchmark.group = f"layer_norm {ROWS}x{N} {pass_}"
    benchmark.extra_info.update(
        impl=impl, pass_=pass_, device=DEV, dtype=str(DTYPE).removeprefix("torch."), rows=ROWS, hidden=N,
        median_ms=round(ms, 4), gbps=round(min_bytes(pass_) / (ms * 1e-3) / 1e9, 1),
        peak_mem_mb=None if peak is None else round(peak / 2**20, 2),
        speedup_vs_torch=round(ref_ms / ms, 3), max_rel_err_vs_torch=float(f"{err:.3g}"),
    )
    benchmark.pedantic(lambda: (fn(), sync()), rounds=reps, iterations=1, warmup_rounds=0)
    # bf16: torch rounds x + residual to bf16 before normalising, the kernel does not; dweight sums 8192 rows
    tol = 0.05 if DTYPE == torch.bfloat16 else 1e-4
    assert err < tol, f"{impl} differs from the reference by {err:.3g}"
    assert math.isfinite(ms)
