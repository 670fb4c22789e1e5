"""The compiled CPU attention-dropout keep mask (csrc/dropout_mask_cpu.cpp) is bit-identical to the PyTorch
definition (ops/attention.py dropout_keep_mask_ref), is what the reference attention uses on CPU, CUDA and meta
tensors (meta: the cost model's stand-in for CUDA), and is switched off by
BLIP2FAST_BACKEND=attention_dropout_keep=torch only."""
from __future__ import annotations

import pytest
import torch

from blip2fast.ops import _extension, attention, hashing
from blip2fast.ops.attention import AttnDropout, dropout_keep_mask, dropout_keep_mask_ref, qformer_attention

pytestmark = pytest.mark.skipif(not _extension.load_extension()
                                or not hasattr(torch.ops.blip2fast, "attention_dropout_keep"),
                                reason="blip2fast._C with attention_dropout_keep is not built")


def case(seed, step, rows, p, site=7, q_offset=0):
    return AttnDropout(p=p, seed_step=torch.tensor([seed, step]), site=site, row_ids=torch.tensor(rows),
                       q_offset=q_offset)


@pytest.mark.parametrize("seed,step,rows,p,heads,q_len,k_len,q_offset", [
    (0, 0, [0], 0.1, 1, 1, 1, 0),
    (12345678901, 7, [3, 0, 9, 2**33 + 5], 0.1, 3, 7, 11, 32),     # seed_hi != 0, a row id above 2**32
    (-5, 2**31 + 3, [1, 2], 0.5, 12, 5, 37, 3),                   # negative seed, step above int32
    (99, 1, [4, 4, 4], 0.99, 2, 13, 64, 64),
    (42, 3, [0, 1, 2, 3, 4], 0.0, 4, 3, 5, 0),                     # p = 0: all kept
])
def test_compiled_mask_is_bit_identical_to_the_definition(seed, step, rows, p, heads, q_len, k_len, q_offset):
    drop = case(seed, step, rows, p, q_offset=q_offset)
    want = dropout_keep_mask_ref(drop, heads, q_len, k_len)
    got = torch.ops.blip2fast.attention_dropout_keep(drop.seed_step, drop.row_ids, hashing.STREAM_ATTN_DROPOUT,
                                                     drop.site, heads, q_len, k_len, q_offset,
                                                     hashing.dropout_threshold(p))
    assert got.dtype == torch.bool and got.shape == want.shape
    assert torch.equal(got, want)
    if p > 0 and want.numel() > 200:
        assert abs(want.float().mean().item() - (1 - p)) < 0.1  # the mask is not trivially all-kept


def test_reference_attention_uses_it_and_env_torch_switches_it_off(monkeypatch):
    drop = case(3, 4, [0, 1], 0.3)
    calls = []
    real = torch.ops.blip2fast.attention_dropout_keep
    monkeypatch.setattr(attention, "_compiled_dropout_mask", lambda: True)

    class Probe:  # counts calls of the compiled op through the namespace the module reads
        def __getattr__(self, name):
            if name == "attention_dropout_keep":
                def op(*a):
                    calls.append(a)
                    return real(*a)
                return op
            return getattr(torch.ops.blip2fast, name)

    monkeypatch.setattr(torch.ops, "blip2fast", Probe(), raising=False)
    mask = dropout_keep_mask(drop, 2, 3, 4)
    assert len(calls) == 1 and torch.equal(mask, dropout_keep_mask_ref(drop, 2, 3, 4))
    monkeypatch.undo()
    monkeypatch.setenv("BLIP2FAST_BACKEND", "attention_dropout_keep=torch")
    assert attention._compiled_dropout_mask() is False
    monkeypatch.setenv("BLIP2FAST_BACKEND", "attention_dropout_keep=cpp")
    assert attention._compiled_dropout_mask() is True
    for plain in ("torch", "triton"):  # the attention's backend: the mask stays one compiled pass (bit-identical)
        monkeypatch.setenv("BLIP2FAST_BACKEND", plain)
        assert attention._compiled_dropout_mask() is True


def test_attention_with_dropout_equals_the_definition_and_compiles():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 5, 16, generator=g) for _ in range(3))
    drop = case(11, 2, [6, 1], 0.2, q_offset=4)
    out = qformer_attention(q, k, v, dropout=drop, backend="torch")
    probs = (q @ k.transpose(-1, -2) / 4.0).softmax(-1)
    keep = dropout_keep_mask_ref(drop, 3, 5, 5)
    want = torch.where(keep, probs / 0.8, torch.zeros(())) @ v
    assert torch.allclose(out, want, rtol=1e-5, atol=1e-6)
    compiled = torch.compile(lambda q, k, v: qformer_attention(q, k, v, dropout=drop, backend="torch"),
                             fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(q, k, v), out, rtol=1e-6, atol=1e-7)


def test_opcheck():
    drop = case(1, 2, [0, 3], 0.25)
    result = torch.library.opcheck(torch.ops.blip2fast.attention_dropout_keep.default,
                                   (drop.seed_step, drop.row_ids, hashing.STREAM_ATTN_DROPOUT, 2, 3, 4, 5, 0,
                                    hashing.dropout_threshold(0.25)))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="seed_step must be an int64"):
        torch.ops.blip2fast.attention_dropout_keep(torch.tensor([1.0, 2.0]), torch.tensor([0]), 3, 0, 1, 1, 1, 0, 0)
    with pytest.raises(ValueError, match="threshold must be"):
        torch.ops.blip2fast.attention_dropout_keep(torch.tensor([1, 2]), torch.tensor([0]), 3, 0, 1, 1, 1, 0, -1)


def test_meta_tensors_take_the_compiled_op_as_cuda_would():
    """The cost model traces meta tensors standing in for CUDA ones: the mask must be one op there (the CUDA
    kernel), not the reference's ~190 elementwise kernels."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    drop = AttnDropout(p=0.1, seed_step=torch.empty(2, dtype=torch.int64, device="meta"), site=3,
                       row_ids=torch.empty(6, dtype=torch.int64, device="meta"), q_offset=32)
    with Ops() as ops:
        mask = dropout_keep_mask(drop, 12, 32, 257)
    assert mask.shape == (6, 12, 32, 257) and mask.dtype == torch.bool and mask.device.type == "meta"
    assert ops.names == ["blip2fast.attention_dropout_keep"]


def test_cuda_request_without_cuda_kernels_names_the_fix(monkeypatch):
    monkeypatch.setenv("BLIP2FAST_BACKEND", "attention_dropout_keep=cpp")
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: False)
    with pytest.raises(RuntimeError, match="built without CUDA kernels: reinstall it with FORCE_CUDA=1"):
        attention._cuda_dropout_mask()
    monkeypatch.delenv("BLIP2FAST_BACKEND")
    assert attention._cuda_dropout_mask() is False  # automatic: the reference runs instead


@pytest.mark.cuda
@pytest.mark.parametrize("seed,step,rows,p,heads,q_len,k_len,q_offset", [
    (12345678901, 7, [3, 0, 9, 2**33 + 5], 0.1, 3, 7, 11, 32),
    (-5, 2**31 + 3, [1, 2], 0.5, 12, 5, 37, 3),
    (99, 1, list(range(13)), 0.1, 12, 64, 257, 0),               # a cross-attention call: 257 image keys
])
def test_cuda_kernel_is_bit_identical_to_the_definition(seed, step, rows, p, heads, q_len, k_len, q_offset):
    assert attention._cuda_dropout_mask(), "blip2fast._C was built without its CUDA kernels (FORCE_CUDA=1)"
    drop = AttnDropout(p=p, seed_step=torch.tensor([seed, step], device="cuda"), site=5,
                       row_ids=torch.tensor(rows, device="cuda"), q_offset=q_offset)
    want = dropout_keep_mask_ref(drop, heads, q_len, k_len)
    got = dropout_keep_mask(drop, heads, q_len, k_len)
    assert got.device.type == "cuda" and got.dtype == torch.bool and got.shape == want.shape
    assert torch.equal(got, want)
    cpu = case(seed, step, rows, p, site=5, q_offset=q_offset)
    assert torch.equal(got.cpu(), dropout_keep_mask(cpu, heads, q_len, k_len))  # the C++ CPU op agrees too
