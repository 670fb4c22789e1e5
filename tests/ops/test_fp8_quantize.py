"""Row-wise float8 quantisation (blip2fast/ops/fp8_quantize.py): the reference keeps the values of the earlier
five-pass formulation, and the one-pass Triton kernel (kernels/fp8_quantize.py, under the interpreter here) equals
the reference bit for bit, scales included; the cost model sees the kernel as one op."""
from __future__ import annotations

import pytest
import torch

from blip2fast.ops import fp8_quantize
from blip2fast.ops.fp8_quantize import E4M3, quantize_rows, quantize_rows_ref


def _old_formulation(x):
    x32 = x.float()
    scale = (x32.abs().amax(dim=1, keepdim=True) / 448.0).clamp(min=1e-12)
    return (x32 / scale).to(E4M3), scale


def _cases(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(67, 203, generator=g) * torch.logspace(-4, 4, 67)[:, None]  # rows of very different scale
    x[5] = 0.0                                                                # an all-zero row: zero scale floor
    x[6, :] = torch.linspace(-1.0, 1.0, 203)                                  # subnormal and tie-rich values
    x[7, :3] = torch.tensor([448.0, -0.0, 1e-30])
    # values that round up into the next binade (e.g. 124.4 -> 128) after the division by the row scale
    x[8] = torch.randn(203, generator=g).sign() * torch.linspace(0.97, 1.0, 203) * 128.0
    x[8, 0] = 448.0 * 128.0 / 124.4445
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_keeps_the_values_of_the_earlier_passes(dtype):
    x = _cases(dtype)
    q, s = quantize_rows_ref(x)
    q_old, s_old = _old_formulation(x)
    assert q.dtype == E4M3 and s.dtype == torch.float32 and s.shape == (x.shape[0], 1)
    assert torch.equal(s, s_old) and torch.equal(q.view(torch.uint8), q_old.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(67, 203), (1, 16), (9, 1408)])
def test_triton_kernel_is_bit_identical_to_the_reference(dtype, shape):
    from blip2fast.kernels import fp8_quantize as kernels

    full = _cases(dtype)
    g = torch.Generator().manual_seed(shape[0] * shape[1])
    x = full[: shape[0], : shape[1]] if shape[1] <= full.shape[1] else \
        (torch.randn(shape, generator=g) * 3.0).to(dtype)
    before = kernels.LAUNCHES["quantize_rows"]
    q, s = quantize_rows(x, backend="triton")
    assert kernels.LAUNCHES["quantize_rows"] == before + 1
    want_q, want_s = quantize_rows_ref(x)
    assert torch.equal(s, want_s)
    mismatch = (q.view(torch.uint8) != want_q.view(torch.uint8)).sum().item()
    assert mismatch == 0, f"{mismatch} of {x.numel()} elements differ"
    assert q.float().abs().max() <= 448.0


def test_strided_rows_and_bad_inputs():
    x = _cases(torch.float32)[:, :200]  # a row stride of 203: the kernel reads rows with their stride
    q, s = quantize_rows(x, backend="triton")
    want_q, want_s = quantize_rows_ref(x)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)
    with pytest.raises(ValueError, match="2-D"):
        quantize_rows(torch.ones(2, 3, 4))
    with pytest.raises(RuntimeError, match="row width 20000"):
        quantize_rows(torch.ones(2, 20000), backend="triton")


def test_cost_model_sees_one_kernel():
    from blip2fast.ops import kernel_cost

    x = torch.empty(1000, 1408, dtype=torch.bfloat16, device="meta")
    q, s = fp8_quantize._quantize_rows_op(x, True, None, None, 0.0)  # the fake: shapes only
    assert q.shape == x.shape and q.dtype == E4M3 and s.shape == (1000, 1)
    c = kernel_cost.COSTS["blip2fast::fp8_quantize_rows"](x, True, None, None, 0.0)
    assert c.launches == 1 and c.bytes_read == 2 * x.numel() and c.bytes_written == x.numel() + 4 * 1000


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gelu_rows_are_quantised_from_the_activation(dtype):
    """gelu=True quantises F.gelu(x) (the FP8 MLP's fc2 input): the torch backend exactly, the Triton kernel within
    one e4m3 rounding of it (its erf may differ from torch's by an ulp, which can move a value across a rounding
    boundary or a row's amax by an ulp)."""
    from blip2fast.kernels import fp8_quantize as kernels

    g = torch.Generator().manual_seed(8)
    x = (torch.randn(33, 517, generator=g) * torch.logspace(-1, 1, 33)[:, None]).to(dtype)
    q, s = quantize_rows(x, backend="torch", gelu=True)
    want_q, want_s = quantize_rows_ref(torch.nn.functional.gelu(x))
    assert torch.equal(s, want_s) and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    before = kernels.LAUNCHES["quantize_rows"]
    tq, ts = quantize_rows(x, backend="triton", gelu=True)
    assert kernels.LAUNCHES["quantize_rows"] == before + 1
    assert ((ts - s).abs() <= 2 ** -20 * s).all()
    exact = torch.nn.functional.gelu(x.double())
    back = tq.double() * ts.double()
    assert ((back - exact).abs() <= 2 ** -4 * exact.abs() + ts.double() * 2 ** -9).all()  # one e4m3 rounding
    codes_differ = (tq.view(torch.uint8) != q.view(torch.uint8)).float().mean()
    assert codes_differ < 0.01, codes_differ  # the same codes but for ulp-level erf differences


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_norm_rows_are_quantised_from_the_layer_norm(dtype):
    """weight/bias: the rows are layer_norm(x) (the FP8 tower's qkv / fc1 input): the torch backend exactly
    quantize_rows_ref(layer_norm(x)), the Triton kernel within an ulp of x's dtype of it (its reductions are not
    aten's), so the same e4m3 codes but for a few."""
    from blip2fast.kernels import fp8_quantize as kernels

    g = torch.Generator().manual_seed(9)
    x = (torch.randn(29, 1408, generator=g) * 3 + 1).to(dtype)
    w = (1 + 0.2 * torch.randn(1408, generator=g)).to(dtype)
    b = (0.1 * torch.randn(1408, generator=g)).to(dtype)
    q, s = quantize_rows(x, backend="torch", weight=w, bias=b, eps=1e-6)
    want_q, want_s = quantize_rows_ref(torch.nn.functional.layer_norm(x, (1408,), w, b, 1e-6))
    assert torch.equal(s, want_s) and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    before = kernels.LAUNCHES["quantize_rows"]
    tq, ts = quantize_rows(x, backend="triton", weight=w, bias=b, eps=1e-6)
    assert kernels.LAUNCHES["quantize_rows"] == before + 1
    ulp = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -20
    assert ((ts - s).abs() <= ulp * s).all()
    codes_differ = (tq.view(torch.uint8) != q.view(torch.uint8)).float().mean()
    assert codes_differ < 0.01, codes_differ
    with pytest.raises(ValueError, match="both LayerNorm weight and bias"):
        quantize_rows(x, weight=w)
