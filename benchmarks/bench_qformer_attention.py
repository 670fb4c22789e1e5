"""Q-Former attention: the Triton op vs the PyTorch reference vs F.scaled_dot_product_attention with a mask.

    python -m pytest benchmarks/bench_qformer_attention.py                          # CPU: tiny sizes
    BLIP2FAST_GPU_TESTS=1 python -m pytest benchmarks/bench_qformer_attention.py \\
        --benchmark-json=out/bench_attention.json                                    # GPU: Q-Former sizes

(benchmarks/gpu/run.sh runs it in its `attention` stage.) Each call of the Q-Former is one row of SHAPES; on the
GPU at BERT-base size (batch 128, 12 heads of 64, bf16), on the CPU scaled down to batch 2, 2 heads of 16, 65 image
tokens, fp32 (the Triton op then runs under the interpreter: it is timed so that the path never rots, not to be
fast; its numbers mean nothing).

    impl "triton": blip2fast.ops.qformer_attention(backend="triton"), masks from parameters, kv_index in-kernel
         "torch":  the reference (qformer_attention_ref: builds the additive mask, gathers K/V per row)
         "sdpa":   F.scaled_dot_product_attention with a prebuilt (B, 1, Lq, Lk) additive mask (built outside the
                   timing; its bytes count in the peak memory); K/V gathered with index_select for kv_index rows
    pass "fwd" or "fwd_bwd" (forward, then dq, dk, dv by autograd.grad). "fwd" is the eval pass (scoring: no
         dropout); "fwd_bwd" is the training pass, with the paper's attention dropout (p = 0.1, BERT's
         attention_probs_dropout_prob) as training runs it: the hashed keep-mask in-kernel for Triton, built and
         applied by the reference for torch, SDPA's own dropout_p for sdpa (its random draws differ from ours, so
         its error against the reference is not computed; its time is the comparable cost).

extra_info per benchmark: median ms (CUDA events on a GPU), achieved TFLOP/s (dense: 4 B H Lq Lk d for the forward,
2.5x that for the backward, masked entries counted), peak memory above the inputs (GPU only), the speedup over
"torch" measured the same way in the same run, and the max error against the reference.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blip2fast.ops.attention import MASKED_SCORE, AttnDropout, qformer_attention, qformer_attention_ref, visibility
from op_timing import median_ms, peak_bytes, sync  # noqa: E402  (benchmarks/ is on sys.path)

# the Triton interpreter converts 1-element arrays to Python ints, which numpy>=1.25 warns of
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
B, H, D = (128, 12, 64) if GPU else (2, 2, 16)
Q, T = 32, 32  # queries, text tokens
N_IMG = 257 if GPU else 65  # image tokens (ViT-g/14 at 224 px); on the CPU two key tiles, for the interpreter's sake

# name: (query rows, Lq, K/V rows, Lk, kind)
SHAPES = {
    "query_self": (B, Q, B, Q, "none"),  # queries among themselves
    "query_cross": (B, Q, B, N_IMG, "none"),  # queries -> their image
    "text_self": (B, T, B, T, "padding"),  # text pass
    "itm_self": (3 * B, Q + T, 3 * B, Q + T, "padding"),  # ITM [queries | text], 3B pairs
    "itm_cross": (3 * B, Q, B, N_IMG, "kv_index"),  # ITM query rows -> one of B images each
    "itg": (B, T, B, Q + T, "causal"),  # text over [cached queries | text], multimodal-causal
}
IMPLS = ("triton", "torch", "sdpa")
PASSES = ("fwd", "fwd_bwd")
DROPOUT_P = {"fwd": 0.0, "fwd_bwd": 0.1}  # eval scoring vs the paper's training (attention_probs_dropout_prob)


def make_inputs(shape: str, pass_: str = "fwd"):
    Bq, Lq, Bk, Lk, kind = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(Bq, H, Lq, D, generator=g).to(DEV, DTYPE)
    k, v = (torch.randn(Bk, H, Lk, D, generator=g).to(DEV, DTYPE) for _ in range(2))
    do = torch.randn(Bq, H, Lq, D, generator=g).to(DEV, DTYPE)
    kw: dict = {}
    text_mask = (torch.arange(T)[None] < torch.randint(1, T + 1, (Bq,), generator=g)[:, None]).long()
    if kind == "padding":
        kw["key_padding"] = text_mask if Lk == T else torch.cat([torch.ones(Bq, Q, dtype=torch.long), text_mask], 1)
    elif kind == "causal":
        kw["key_padding"] = torch.cat([torch.ones(Bq, Q, dtype=torch.long), text_mask], 1)
        kw["causal_prefix"] = Q
    elif kind == "kv_index":
        kw["kv_index"] = torch.cat([torch.arange(B), torch.randperm(B, generator=g), torch.arange(B)])
    kw = {n: (x.to(DEV) if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
    if DROPOUT_P[pass_] > 0:  # text rows sit after the queries in the [queries | text] sequence of ITG / ITM
        kw["dropout"] = AttnDropout(p=DROPOUT_P[pass_], seed_step=torch.tensor([1234, 5], device=DEV), site=3,
                                    row_ids=torch.arange(Bq, device=DEV), q_offset=Q if kind == "causal" else 0)
    return q, k, v, do, kw


def make_fn(impl: str, pass_: str, q, k, v, do, kw):
    """A zero-argument callable running one pass of `impl`, and the bytes it holds outside the call (SDPA's mask)."""
    held = 0
    if impl == "triton":
        def attn(q, k, v):
            return qformer_attention(q, k, v, backend="triton", **kw)
    elif impl == "torch":
        def attn(q, k, v):
            return qformer_attention_ref(q, k, v, **kw)
    else:
        vis = visibility(q.shape[0], q.shape[2], k.shape[2], q.device, kw.get("key_padding"),
                         kw.get("causal_prefix"), 0)
        mask = None if vis is None else torch.zeros(vis.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~vis, MASKED_SCORE)
        held = 0 if mask is None else mask.numel() * mask.element_size()
        kv_index = kw.get("kv_index")
        drop = kw.get("dropout")
        p = 0.0 if drop is None else drop.p

        def attn(q, k, v):
            if kv_index is not None:
                k, v = k.index_select(0, kv_index), v.index_select(0, kv_index)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)

    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return attn(q, k, v)
    else:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]

        def run():
            out = attn(*leaves)
            return torch.autograd.grad(out, leaves, do)
    return run, held


def flops(shape: str, pass_: str) -> float:
    Bq, Lq, _, Lk, _ = SHAPES[shape]
    fwd = 4.0 * Bq * H * Lq * Lk * D
    return fwd if pass_ == "fwd" else 3.5 * fwd


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_qformer_attention(benchmark, shape, pass_, impl):
    q, k, v, do, kw = make_inputs(shape, pass_)
    fn, held = make_fn(impl, pass_, q, k, v, do, kw)
    ref_fn, _ = make_fn("torch", pass_, q, k, v, do, kw)
    reps, warmup = (20, 3) if GPU else ((1, 1) if impl == "triton" else (5, 2))
    ms = median_ms(fn, reps, warmup)
    ref_ms = ms if impl == "torch" else median_ms(ref_fn, max(reps, 5), 2)
    got, want = fn(), ref_fn()
    if pass_ == "fwd":
        got, want = (got,), (want,)
    err = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(got, want))
    comparable = impl != "sdpa" or "dropout" not in kw  # SDPA's dropout draws its own mask
    peak = peak_bytes(fn)
    benchmark.group = f"{shape} {pass_}" + (f" p={DROPOUT_P[pass_]:g}" if DROPOUT_P[pass_] else "")
    benchmark.extra_info.update(
        shape=shape, pass_=pass_, impl=impl, device=DEV, dtype=str(DTYPE).removeprefix("torch."),
        dropout_p=DROPOUT_P[pass_],
        dims=dict(zip(("rows", "Lq", "kv_rows", "Lk"), SHAPES[shape][:4]), heads=H, head_dim=D),
        median_ms=round(ms, 4), tflops=round(flops(shape, pass_) / (ms * 1e-3) / 1e12, 3),
        peak_mem_mb=None if peak is None else round((peak + held) / 2**20, 2),
        speedup_vs_torch=round(ref_ms / ms, 3), max_rel_err_vs_torch=float(f"{err:.3g}") if comparable else None,
    )
    benchmark.pedantic(lambda: (fn(), sync()), rounds=reps, iterations=1, warmup_rounds=0)
    tol = 0.05 if DTYPE == torch.bfloat16 else 1e-3
    assert err < tol or impl == "torch" or not comparable, f"{impl} differs from the reference by {err:.3g}"
    if impl == "triton":
        assert math.isfinite(ms)
