"""Float8 (e4m3) frozen towers (blip2fast/models/fp8.py): quantisation, Fp8Linear, the EVA / CLIP tower swaps
and the input gradient (stage 2's LLM), against float64 references; and the errors on devices without FP8.

Tolerances (why): e4m3 has 3 mantissa bits, so one quantised element is within 2^-4 (6.25%) of its value (plus
the subnormal spacing, 2^-9 of the scale). A dot product of K such independent errors has a relative error of
about 2^-4 / sqrt(3) ~ 3.6% of its RMS per operand, ~5% with both operands quantised; a tower compounds a few
layers (residuals damp it). Bounds: a single product < 8% of the output RMS, a whole tower < fp8.TOWER_TOLERANCE
(10%, the number the README states).
torch._scaled_mm runs on the CPU build (tiny, slow): the numerics are tested here; the GPU cases are marked cuda.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from blip2fast.config import VisionConfig
from blip2fast.models import fp8
from blip2fast.models.fp8 import Fp8Linear, convert_linears_to_fp8_, fp8_unsupported, quantize, require_fp8
from blip2fast.models.vision import build_vision_tower, freeze_
from tests.helpers import rel_err

needs_cpu_fp8 = pytest.mark.skipif(bool(fp8_unsupported(torch.device("cpu"))),
                                   reason="this torch cannot run torch._scaled_mm on the CPU")


def _rms_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return rel_err(actual, expected)  # ||a - e|| / ||e||: relative to the output RMS


@needs_cpu_fp8
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_quantize_is_within_e4m3_rounding(granularity):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 48, generator=g) * torch.logspace(-2, 2, 37)[:, None]  # rows of very different scale
    q, scale = quantize(x, granularity)
    assert q.dtype == torch.float8_e4m3fn
    assert scale.shape == ((37, 1) if granularity == "row" else ())
    back = q.float() * scale
    # 2^-4 relative per element, plus half the subnormal spacing (2^-10 of the scale) near zero
    bound = x.abs() * 2.0 ** -4 + scale * 2.0 ** -10
    assert ((back - x).abs() <= bound + 1e-12).all()
    assert (q.float().abs().amax(dim=1 if granularity == "row" else None) <= fp8.E4M3_MAX).all()


@needs_cpu_fp8
@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("tokens", [1, 37])
def test_fp8_linear_matches_float64(granularity, tokens):
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(48, 144)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(144, 48, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(144, generator=g))
    x = torch.randn(2, tokens, 48, generator=g)
    ref = nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    f = Fp8Linear.from_linear(lin, granularity)
    assert f.weight_fp8.dtype == torch.float8_e4m3fn and not list(f.parameters())  # frozen: buffers only
    out = f(x)
    assert out.shape == (2, tokens, 144) and out.dtype == torch.float32
    # relative to the matmul part (the bias is exact)
    assert _rms_err(out - lin.bias, ref - lin.bias.double()) < 0.08
    with torch.autocast("cpu", dtype=torch.bfloat16):  # returns what nn.Linear would under autocast
        assert f(x).dtype == torch.bfloat16 and lin(x).dtype == torch.bfloat16


@needs_cpu_fp8
@pytest.mark.parametrize("kind", ["eva", "clip"])
def test_tower_output_within_tolerance_of_float(kind):
    """The frozen tower with every linear in float8 (EVA / CLIP fused-qkv attentions swapped too) vs float32,
    both against the float64 tower: < fp8.TOWER_TOLERANCE of the output RMS (see the module docstring)."""
    cfg = VisionConfig(kind=kind, image_size=32, patch_size=8, width=48, depth=2, heads=4, mlp_hidden=192,
                       layer_norm_eps=1e-6 if kind == "eva" else 1e-5, dtype="float32")
    torch.manual_seed(0)
    tower = freeze_(build_vision_tower(cfg), torch.float32)
    ref_tower = freeze_(build_vision_tower(cfg), torch.float64)
    ref_tower.load_state_dict({k: v.double() for k, v in tower.state_dict().items()})
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = ref_tower(images.double())
        fp32 = tower(images)
        notes = convert_linears_to_fp8_(tower)
        out = tower(images)
    n_linear = sum(isinstance(m, Fp8Linear) for m in tower.modules())
    assert n_linear == 2 * 4 and "8 linear layers in float8" in notes[0]  # qkv, proj, fc1, fc2 per block
    assert not any(isinstance(m, nn.Linear) for m in tower.modules())
    assert rel_err(fp32, ref) < 1e-5  # the float tower is the reference's own precision
    err = _rms_err(out, ref)
    assert 1e-4 < err < fp8.TOWER_TOLERANCE, err  # really quantised, and within tolerance


@needs_cpu_fp8
def test_input_gradient_flows_through_the_dequantised_weight():
    """Stage 2's frozen LLM passes gradients to the soft prompt: grad_x = grad_y @ dequant(W), no weight grad."""
    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(32, 64).requires_grad_(False)
    f = Fp8Linear.from_linear(lin)
    x = torch.randn(5, 32, generator=g, requires_grad=True)
    gy = torch.randn(5, 64, generator=g)
    f(x).backward(gy)
    w = f.weight_fp8.double() * f.weight_scale.double().reshape(-1, 1)
    assert rel_err(x.grad, gy.double() @ w) < 1e-6
    assert rel_err(x.grad, gy @ lin.weight) < 0.05  # and close to the float weight's


@needs_cpu_fp8
def test_conversion_notes_sizes_it_cannot_take_and_refuses_trainable_modules():
    m = nn.Sequential(nn.Linear(48, 144), nn.GELU(), nn.Linear(144, 10)).requires_grad_(False)
    notes = convert_linears_to_fp8_(m)
    assert isinstance(m[0], Fp8Linear) and isinstance(m[2], nn.Linear)
    assert "1 layers kept" in notes[1] and "2 (10x144)" in notes[1]
    with pytest.raises(ValueError, match="frozen"):
        convert_linears_to_fp8_(nn.Linear(16, 16))


@needs_cpu_fp8
@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_stage2_llm_in_fp8_passes_gradients_to_the_soft_prompt(kind):
    """Stage 2 with the frozen LLM's linears in float8 (the output head kept: the fused loss reads its weight):
    the loss and the trainable gradients stay within float8 tolerance of the float model's."""
    import copy

    pytest.importorskip("transformers")
    from tests.models.test_stage2 import images, make_model, text_batch

    ref = make_model(kind)
    m = copy.deepcopy(ref)
    llm = m.language_model
    notes = convert_linears_to_fp8_(llm, skip=(llm.get_output_embeddings(),))
    assert isinstance(llm.get_output_embeddings(), nn.Linear) and "linear layers in float8" in notes[0]
    assert sum(isinstance(x, Fp8Linear) for x in llm.modules()) >= 8
    px = images(3)
    ids, mask, labels = text_batch(3, 7)
    grads = {}
    for name, model in (("ref", ref), ("fp8", m)):
        out = model.stage2_loss(px, ids, mask, labels)
        out.loss.backward()
        grads[name] = (out.loss.detach(), model.language_projection.weight.grad.clone())
    assert abs(grads["fp8"][0] - grads["ref"][0]) < 0.05 * grads["ref"][0].abs()
    # the loss moves ~0.1-0.3%, its gradient far more: on these tiny random LLMs, rounding only the *weights* to
    # e4m3 (float activations, exact backward) already moves the soft-prompt gradient by 10-15% (OPT) and 20-24%
    # (T5: encoder + decoder, cross-attention, gated FFNs) over seeds 0-2; with activations quantised too,
    # 10-13% and 24-36%. Bounds with margin: the gradient keeps its direction and scale
    bound = {"opt": 0.2, "t5": 0.45}[kind]
    assert grads["fp8"][1].norm() > 0 and rel_err(grads["fp8"][1], grads["ref"][1]) < bound


def test_unsupported_gpu_names_the_capability_needed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    reasons = fp8_unsupported(torch.device("cuda:0"))
    assert len(reasons) == 1 and "A100" in reasons[0] and "8.0" in reasons[0] and "8.9" in reasons[0]
    with pytest.raises(RuntimeError, match=r"--fp8: .*8\.9 or newer"):
        require_fp8(torch.device("cuda:0"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert fp8_unsupported(torch.device("cuda:0")) == []
    assert "device type" in fp8_unsupported(torch.device("meta"))[0]


# ------------------------------------------------------------------------------------------------ GPU (H200)
@pytest.mark.cuda
@pytest.mark.parametrize("granularity,fast_accum,backend", [("row", False, "torch"), ("tensor", False, "torch"),
                                                          ("row", False, "triton"), ("row", True, "triton")])
def test_fp8_tower_on_gpu(granularity, fast_accum, backend, monkeypatch):
    """bf16 EVA tower (demo width, 4 blocks) with float8 linears on the GPU vs the same tower in float64:
    within fp8.TOWER_TOLERANCE of the output RMS, and the bf16 tower's own error is far smaller; with the
    one-pass Triton quantisation and with Hopper's fast float8 accumulation too."""
    monkeypatch.setenv("BLIP2FAST_BACKEND", f"fp8_quantize_rows={backend}")
    assert not fp8_unsupported(torch.device("cuda")), fp8_unsupported(torch.device("cuda"))
    cfg = VisionConfig(kind="eva", image_size=224, patch_size=14, width=96 * 4, depth=4, heads=8,
                       mlp_hidden=4 * 384, dtype="bfloat16")
    torch.manual_seed(0)
    tower = freeze_(build_vision_tower(cfg), torch.bfloat16).cuda()
    ref_tower = freeze_(build_vision_tower(dataclasses.replace(cfg, dtype="float32")), torch.float64).cuda()
    ref_tower.load_state_dict({k: v.double() for k, v in tower.state_dict().items()})
    images = torch.randn(5, 3, 224, 224, device="cuda")
    with torch.no_grad():
        ref = ref_tower(images.double())
        bf16 = tower(images.bfloat16())
        convert_linears_to_fp8_(tower, granularity, fast_accum=fast_accum)
        # as the training step runs it (bf16 autocast): with the Triton quantiser the norms run inside it
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = tower(images.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_err(bf16, ref) < 0.02
    assert rel_err(out, ref) < fp8.TOWER_TOLERANCE


@needs_cpu_fp8
def test_fp8_mlp_quantises_fc2_input_in_the_gelu_pass(monkeypatch):
    """Fp8EvaMlp's fused path (fc2's input quantised from fc1's output with the GELU in the same pass) is exactly
    fc2(gelu(fc1(x))) of its two Fp8Linears on the torch backend, and within e4m3 rounding on the Triton kernel;
    with a gradient wanted it takes the composition (the input gradient flows)."""
    from blip2fast.models.fp8 import Fp8EvaMlp
    from blip2fast.models.vision import EvaMlp

    torch.manual_seed(6)
    mlp = Fp8EvaMlp(EvaMlp(48, 192).requires_grad_(False), "row")
    x = torch.randn(3, 11, 48)
    composed = mlp.fc2(nn.functional.gelu(mlp.fc1(x)))
    with torch.no_grad():
        fused = mlp(x)
        monkeypatch.setenv("BLIP2FAST_BACKEND", "fp8_quantize_rows=triton")
        fused_triton = mlp(x)
        monkeypatch.delenv("BLIP2FAST_BACKEND")
    assert fused.shape == (3, 11, 48) and torch.equal(fused, composed)
    assert rel_err(fused_triton, composed) < 0.02
    xg = x.clone().requires_grad_()
    mlp(xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


@needs_cpu_fp8
def test_fp8_block_runs_its_norms_inside_the_quantisation(monkeypatch):
    """Fp8EvaBlock in a half-precision tower under autocast: with the Triton quantiser each norm runs inside the
    quantisation of qkv / fc1 (the kernel really launches with the norm, the norms' own forward is not called),
    within e4m3 rounding of the composition the torch backend runs (exactly the unfused block's); with a gradient
    wanted or on the torch backend the composition runs."""
    from blip2fast.kernels import fp8_quantize as kernels
    from blip2fast.models.fp8 import Fp8EvaBlock
    from blip2fast.models.vision import EvaBlock

    cfg = VisionConfig(kind="eva", image_size=32, patch_size=8, width=64, depth=1, heads=4, mlp_hidden=256,
                       layer_norm_eps=1e-6, dtype="float16")
    torch.manual_seed(7)
    block = Fp8EvaBlock(EvaBlock(cfg).half().requires_grad_(False), "row")
    x = torch.randn(2, 17, 64).half()
    calls = []
    monkeypatch.setattr(type(block.norm1), "forward",
                        lambda self, t, _f=type(block.norm1).forward: calls.append(1) or _f(self, t))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        composed = block(x)  # automatic on the CPU: the torch backend, the norms called
        assert len(calls) == 2
        monkeypatch.setenv("BLIP2FAST_BACKEND", "fp8_quantize_rows=triton")
        before = kernels.LAUNCHES["quantize_rows"]
        fused = block(x)
        assert len(calls) == 2 and kernels.LAUNCHES["quantize_rows"] == before + 4  # qkv+norm, proj, fc1+norm, fc2
    assert fused.dtype == composed.dtype == torch.float16 and torch.isfinite(fused).all()
    assert rel_err(fused.float(), composed.float()) < 0.02
