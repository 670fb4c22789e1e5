"""ITM hard-negative sampling: the Triton kernel vs the compiled C++/CUDA op vs the PyTorch reference.

    python -m pytest benchmarks/bench_itm_sampling.py                                 # CPU: tiny sizes
    BLIP2FAST_GPU_TESTS=1 python -m pytest benchmarks/bench_itm_sampling.py \\
        --benchmark-json=out/bench_itm_sampling.json                                   # GPU: paper sizes

One call draws one direction for this rank's rows: sim is (local rows, global columns). On the GPU the paper's
size, 128 rows x 8192 columns (a global batch of 8192 over 64 ranks), fp32 and bf16 similarities; on the CPU 8 x 64
fp32, where the Triton kernel runs under the interpreter (timed so that the path never rots; its numbers mean
nothing). 2% of the logits are NaN/inf, so the candidate masks are exercised.

    impl "triton": itm_sample_negatives(backend="triton")   (kernels/itm_sampling.py)
         "cpp":    itm_sample_negatives(backend="cpp")      (csrc/: CUDA kernel on the GPU, C++ on the CPU)
         "torch":  itm_sample_negatives_ref                 (the spec: hash table, Gumbel noise, two argmaxes)

extra_info: median ms (CUDA events on a GPU), achieved GB/s on the logits read, peak memory above the inputs (GPU
only), the speedup over "torch" measured the same way in the same run, and whether the indices equal the
reference's (they must). This is the measurement that orders cpp / triton in the automatic choice on CUDA
(blip2fast/ops/itm_sampling.py).
"""
from __future__ import annotations

import math

import pytest
import torch

from blip2fast.ops import _extension, hashing
from blip2fast.ops.itm_sampling import itm_sample_negatives, itm_sample_negatives_ref
from op_timing import median_ms, peak_bytes, sync  # noqa: E402  (benchmarks/ is on sys.path)

# the Triton interpreter converts 1-element arrays to Python ints, which numpy>=1.25 warns of
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
ROWS, COLS = (128, 8192) if GPU else (8, 64)
DTYPES = (torch.float32, torch.bfloat16) if GPU else (torch.float32,)
IMPLS = ("triton", "cpp", "torch")
STREAM = hashing.STREAM_ITM_NEG_IMAGE_FOR_TEXT


def make_inputs(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(ROWS, COLS, generator=g) * 5
    bad = torch.rand(ROWS, COLS, generator=g) < 0.02
    sim = torch.where(bad, torch.tensor(float("nan")), sim)
    sim[0] = float("inf")  # one row without a finite candidate: the fallback path
    positive = torch.randint(0, COLS, (ROWS,), generator=g)
    row_ids = torch.arange(ROWS) + 3 * ROWS  # rank 3's rows
    seed_step = torch.tensor([1234, 56789], dtype=torch.int64)
    return sim.to(DEV, dtype), positive.to(DEV), row_ids.to(DEV), seed_step.to(DEV)


def make_fn(impl: str, args):
    if impl == "torch":
        return lambda: itm_sample_negatives_ref(*args, STREAM)
    return lambda: itm_sample_negatives(*args, STREAM, backend=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_itm_sampling(benchmark, dtype, impl):
    if impl == "cpp":
        status = _extension.load_extension()
        if not status or (GPU and not status.cuda):
            pytest.skip(f"blip2fast._C not usable here: {status.reason or 'built without CUDA'}")
    args = make_inputs(dtype)
    fn, ref_fn = make_fn(impl, args), make_fn("torch", args)
    reps, warmup = (50, 5) if GPU else ((2, 1) if impl == "triton" else (10, 2))
    ms = median_ms(fn, reps, warmup)
    ref_ms = ms if impl == "torch" else median_ms(ref_fn, max(reps, 10), 2)
    (neg, nfb), (want, want_nfb) = fn(), ref_fn()
    same = bool(torch.equal(neg, want)) and int(nfb) == int(want_nfb)
    peak = peak_bytes(fn)
    benchmark.group = f"itm_sampling {ROWS}x{COLS} {str(dtype).removeprefix('torch.')}"
    benchmark.extra_info.update(
        impl=impl, device=DEV, dtype=str(dtype).removeprefix("torch."), rows=ROWS, cols=COLS,
        median_ms=round(ms, 4), gbps=round(ROWS * COLS * args[0].element_size() / (ms * 1e-3) / 1e9, 2),
        peak_mem_mb=None if peak is None else round(peak / 2**20, 3),
        speedup_vs_torch=round(ref_ms / ms, 3), indices_equal_reference=same,
    )
    benchmark.pedantic(lambda: (fn(), sync()), rounds=reps, iterations=1, warmup_rounds=0)
    assert same, f"{impl}: indices or fallback count differ from the reference"
    assert int(nfb) >= 1 and math.isfinite(ms)
