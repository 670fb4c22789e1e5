"""The torch backend's attention with dropout on (`_dropout_attention`, a hand-written autograd Function) against
the definition `qformer_attention_ref` (autograd through plain PyTorch): equal in float64, as accurate in low
precision, the same under autocast, and fewer kernels per call than the definition."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from blip2fast.ops import attention
from blip2fast.ops.attention import AttnDropout, qformer_attention, qformer_attention_ref
from tests.helpers import assert_twice_torch

FLOOR = {torch.float32: 2e-6, torch.bfloat16: 1.6e-2}


def case(mode: str, seed: int, d: int = 16, p: float = 0.3):
    """q, k, v, grad_out (float64) and the mask / index / dropout arguments of one kind of Q-Former call."""
    g = torch.Generator().manual_seed(seed)
    H, Q = 3, 4
    kw = {}
    if mode == "padded":  # text self-attention; row 2's keys are all padding (LAVIS: attends over all of them)
        B, Lq = 3, 9
        Lk, Bk = Lq, B
        kw["key_padding"] = torch.tensor([[1] * 9, [1] * 4 + [0] * 5, [0] * 9], dtype=torch.bool)
    elif mode == "itg":  # multimodal-causal rows t0.. of the text, keys = queries + text
        B, T, t0 = 2, 7, 2
        Lq, Lk, Bk = T - t0, Q + T, B
        text = torch.arange(T)[None] < torch.tensor([[7], [3]])
        kw["key_padding"] = torch.cat([torch.ones(B, Q, dtype=torch.bool), text], 1)
        kw["causal_prefix"], kw["row_offset"] = Q, t0
    elif mode == "cross":  # ITM rows reading the K/V of 3 images by index; image 1 is read by no row
        B, Bk, Lq, Lk = 5, 3, Q, 19
        kw["kv_index"] = torch.tensor([2, 0, 2, 2, 0])
    else:
        raise ValueError(mode)
    kw["dropout"] = AttnDropout(p=p, seed_step=torch.tensor([987654321, 12]), site=5,
                                row_ids=torch.arange(B) * 3 + 1,
                                q_offset=Q + kw.get("row_offset", 0) if mode == "itg" else 0)
    q = torch.randn(B, H, Lq, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(Bk, H, Lk, d, generator=g, dtype=torch.float64) for _ in range(2))
    grad_out = torch.randn(B, H, Lq, d, generator=g, dtype=torch.float64)
    return q, k, v, grad_out, kw


def run(fn, q, k, v, grad_out, kw, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **kw)
    return (out, *torch.autograd.grad(out, leaves, grad_out.to(out.dtype)))


def lean(q, k, v, **kw):
    return qformer_attention(q, k, v, backend="torch", **kw)


MODES = ["padded", "itg", "cross"]


@pytest.mark.parametrize("d", [16, 24])  # 24: 1/sqrt(d) is not a power of two
@pytest.mark.parametrize("mode", MODES)
def test_float64_equals_the_definition(mode, d):
    args = case(mode, seed=MODES.index(mode) + d, d=d)
    got = run(lean, *args, torch.float64)
    want = run(qformer_attention_ref, *args, torch.float64)
    assert got[0].grad_fn is not None and "DropoutAttention" in type(got[0].grad_fn).__name__
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert got[3].abs().sum() > 0  # dropout left some probability mass
    if mode == "cross":  # the unread image gets no gradient
        assert not got[2][1].any() and not got[3][1].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_is_as_accurate_as_the_definition(mode, dtype):
    args = case(mode, seed=10 + MODES.index(mode), d=32, p=0.1)
    truth = run(qformer_attention_ref, *args, torch.float64)
    got = run(lean, *args, dtype)
    ref = run(qformer_attention_ref, *args, dtype)
    for name, a, r, t in zip(("out", "dq", "dk", "dv"), got, ref, truth):
        assert a.dtype == dtype
        assert_twice_torch(name, a, r, t, FLOOR[dtype], f"({mode}, {dtype})")


def test_under_autocast_computes_in_the_autocast_dtype():
    """fp32 leaves under bf16 autocast (the Q-Former's projections come out bf16; a caller may pass fp32): the
    result is bf16 like the definition's matmul under autocast, with bf16-level error."""
    q, k, v, grad_out, kw = case("itg", seed=3, d=32, p=0.1)
    truth = run(qformer_attention_ref, q, k, v, grad_out, kw, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(lean, q, k, v, grad_out, kw, torch.float32)
        ref = run(qformer_attention_ref, q, k, v, grad_out, kw, torch.float32)
    assert got[0].dtype == ref[0].dtype == torch.bfloat16
    for name, a, r, t in zip(("out", "dq", "dk", "dv"), got, ref, truth):
        assert a.dtype == (torch.bfloat16 if name == "out" else torch.float32)  # gradients in the leaves' dtype
        assert_twice_torch(name, a, r, t, FLOOR[torch.bfloat16], "(autocast)")


class ScorePasses(TorchDispatchMode):
    """Counts the kernels that write a tensor the size of the attention scores (B, H, Lq, Lk): the passes that
    cost HBM traffic at the Q-Former's sizes."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.passes = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and isinstance(out, torch.Tensor) and out.numel() == self.numel:
            self.passes.append(func.overloadpacket.__name__)
        return out


def score_passes(fn, args) -> list:
    q, k, v, grad_out, kw = args
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    with ScorePasses(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]) as counter:
        out = fn(*leaves, **kw)
        torch.autograd.grad(out, leaves, grad_out.float())
    return counter.passes


@pytest.mark.parametrize("mode", ["padded", "itg"])
def test_fewer_passes_over_the_scores_than_the_definition(mode):
    """What the Function is for: both scales inside the GEMMs and a hand-written backward (8 passes over the
    scores where autograd through the definition makes 12, more under autocast's fp32 softmax and its casts).
    The cost model shows the bytes at paper size: benchmarks/gpu_model.py."""
    args = case(mode, seed=1)
    ours, definition = score_passes(lean, args), score_passes(qformer_attention_ref, args)
    assert len(ours) <= len(definition) - 4, (ours, definition)
    assert "div" not in ours and "div" in definition


def test_dropout_off_still_runs_sdpa():
    q, k, v, _, kw = case("padded", seed=2)
    kw["dropout"] = AttnDropout(p=0.0, seed_step=kw["dropout"].seed_step, site=1, row_ids=kw["dropout"].row_ids)
    out = qformer_attention(q.float(), k.float(), v.float(), backend="torch", **kw)
    assert out.grad_fn is None or "DropoutAttention" not in type(out.grad_fn).__name__
    kw.pop("dropout")
    torch.testing.assert_close(out, qformer_attention_ref(q.float(), k.float(), v.float(), **kw))
    assert attention._DropoutAttention is not None


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["itm_self", "itm_cross"])
def test_cuda_bf16_autocast_at_the_paper_sizes(mode):
    """What the pure-PyTorch GPU step runs: fp32-master projections under bf16 autocast, 12 heads of 64, the
    paper's dropout 0.1; ITM-like self-attention (64 keys, padded text) or cross-attention (257 image keys picked
    by index). Accuracy against float64 on the GPU: at most twice the definition's own under autocast."""
    g = torch.Generator().manual_seed(7)
    B, H, d = 12, 12, 64
    if mode == "itm_self":
        Lq = Lk = 64
        Bk, kw = B, {"key_padding": torch.arange(Lk)[None] < torch.randint(33, 65, (B, 1), generator=g)}
    else:
        Lq, Lk, Bk = 32, 257, 4
        kw = {"kv_index": torch.randint(0, Bk, (B,), generator=g)}
    kw["dropout"] = AttnDropout(p=0.1, seed_step=torch.tensor([2024, 9]), site=3, row_ids=torch.arange(B))
    q = torch.randn(B, H, Lq, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(Bk, H, Lk, d, generator=g, dtype=torch.float64) for _ in range(2))
    grad_out = torch.randn(B, H, Lq, d, generator=g, dtype=torch.float64)
    q, k, v, grad_out = (t.cuda() for t in (q, k, v, grad_out))
    kw = {name: (val.cuda() if isinstance(val, torch.Tensor) else
                 AttnDropout(val.p, val.seed_step.cuda(), val.site, val.row_ids.cuda())) for name, val in kw.items()}
    truth = run(qformer_attention_ref, q, k, v, grad_out, kw, torch.float64)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = run(lean, q, k, v, grad_out, kw, torch.float32)
        ref = run(qformer_attention_ref, q, k, v, grad_out, kw, torch.float32)
    assert got[0].dtype == torch.bfloat16 and "DropoutAttention" in type(got[0].grad_fn).__name__
    for name, a, r, t in zip(("out", "dq", "dk", "dv"), got, ref, truth):
        assert_twice_torch(name, a, r, t, FLOOR[torch.bfloat16], f"(cuda {mode})")
