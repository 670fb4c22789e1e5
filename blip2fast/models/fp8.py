"""Float8 (e4m3) matmuls for the frozen towers: a module swap, `convert_linears_to_fp8_(tower)`.

Every nn.Linear of the tower (and the fused-qkv attention layouts of the EVA and CLIP towers, which call
F.linear on raw weights) becomes an `Fp8Linear`:

    weight   quantised once at conversion: w_fp8 = e4m3(w / s_w), s_w = amax|w| / 448 per output row ("row") or
             for the whole matrix ("tensor"); kept as buffers (frozen: no parameter, no optimiser state)
    input    quantised per call (dynamic scaling): s_x = amax|x| / 448 per token row ("row": one fused pass,
             blip2fast/ops/fp8_quantize.py, a Triton kernel on the GPU) or per tensor
    product  torch._scaled_mm(x_fp8, w_fp8^T, s_x, s_w, bias) accumulates in fp32 and returns the tower's dtype
             (bf16 for row-wise scales on CUDA, cast back if the tower is fp16); the bias is added in the GEMM's
             epilogue when the product comes out in the tower's dtype (after the cast otherwise). `fast_accum`
             asks cuBLAS for Hopper's fast float8 accumulation (use_fast_accum; off by default: its accuracy is
             checked by the GPU test against the same bound before it may be turned on)
    backward gradients flow to the input only (stage 2's frozen LLM passes gradients to the soft prompt), through
             the dequantised weight in the gradient's dtype; the weights never get one

Error: e4m3 keeps 3 mantissa bits (relative rounding <= 2^-4 per element); with per-row scales a K-long dot
product of independent rounding errors lands around 2-4% of its RMS, and a whole tower stays within
TOWER_TOLERANCE (10%) of the output RMS of the full-precision tower (tests/models/test_fp8.py checks that bound,
on the CPU and on the GPU; measured on the CPU: EVA 2.7%, CLIP 1.7%).

Needs float8 matmul hardware: compute capability >= 8.9 (Ada L4/L40, Hopper H100/H200, Blackwell). The CPU build
of torch also runs `_scaled_mm` (slowly; tests); `fp8_unsupported(device)` says why a device cannot.
Matrices whose inner or output size is not a multiple of 16 (a `_scaled_mm` rule) stay in their dtype and are
reported by the conversion.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite e4m3fn value
GRANULARITIES = ("row", "tensor")
_TINY = 1e-12  # floor of a scale: an all-zero row quantises to zeros instead of NaN
TOWER_TOLERANCE = 0.10  # a float8 tower's output vs full precision, relative to its RMS (README, tests)


# ------------------------------------------------------------------------------------------------ support
@functools.lru_cache(maxsize=None)
def _cpu_scaled_mm_reason() -> str:
    try:
        a = torch.ones(16, 16).to(E4M3)
        one = torch.ones((), dtype=torch.float32)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    except Exception as e:  # an old torch without the CPU kernel
        return f"torch {torch.__version__} cannot run torch._scaled_mm on the CPU ({type(e).__name__}: {e})"
    return ""


def fp8_unsupported(device: torch.device) -> list[str]:
    """Why float8 matmuls cannot run on `device` ([] when they can)."""
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return [f"torch {torch.__version__} has no float8 matmul (torch._scaled_mm / float8_e4m3fn): torch >= 2.4 "
                "is needed"]
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return ["no CUDA GPU is visible"]
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            return [f"{torch.cuda.get_device_name(device)} is compute capability {cap[0]}.{cap[1]}; float8 matmuls "
                    "need 8.9 or newer (Ada L4/L40, Hopper H100/H200, Blackwell)"]
        return []
    if device.type == "cpu":
        reason = _cpu_scaled_mm_reason()
        return [reason] if reason else []
    return [f"no float8 matmul for device type {device.type!r} (CUDA with compute capability >= 8.9, or the CPU)"]


def require_fp8(device: torch.device, what: str = "--fp8") -> None:
    reasons = fp8_unsupported(device)
    if reasons:
        raise RuntimeError(f"{what}: float8 matmuls cannot run on {device}: " + "; ".join(reasons))


# ------------------------------------------------------------------------------------------------ quantisation
def quantize(x: Tensor, granularity: str) -> tuple[Tensor, Tensor]:
    """(e4m3 tensor, float32 scale) with x ~= q * scale; x is 2-D (rows, K). Scale shape: (rows, 1) for "row",
    () for "tensor". Row-wise: ops/fp8_quantize.py (one pass; the same values as the passes below)."""
    if granularity == "row":
        from ..ops.fp8_quantize import quantize_rows

        return quantize_rows(x)
    x32 = x.float()
    if granularity == "row":
        amax = x32.abs().amax(dim=1, keepdim=True)
    else:
        amax = x32.abs().amax()
    scale = (amax / E4M3_MAX).clamp(min=_TINY)
    return (x32 / scale).to(E4M3), scale


def _mm(x2: Tensor, w_fp8: Tensor, w_scale: Tensor, bias: Optional[Tensor], granularity: str,
        out_dtype: torch.dtype, fast_accum: bool = False) -> Tensor:
    xq, x_scale = quantize(x2, granularity)
    return _quantized_mm(xq, x_scale, w_fp8, w_scale, bias, granularity, out_dtype, fast_accum)


@functools.lru_cache(maxsize=None)
def _cpu_rowwise_scaled_mm() -> bool:
    """Whether this torch's CPU `_scaled_mm` takes row-wise scales (torch 2.11's takes only per-tensor ones)."""
    try:
        a = torch.ones(16, 16).to(E4M3)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except Exception:  # RuntimeError "only supports per-tensor scaling for CPU backend"
        return False
    return True


def _dequantized_mm(xq: Tensor, x_scale: Tensor, w_fp8: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                    out_dtype: torch.dtype) -> Tensor:
    """The product `_scaled_mm` defines, (q_x * s_x) @ (q_w * s_w)^T (+ bias), computed in fp32 from the e4m3 values
    (each exact in fp32). Only for a CPU torch whose `_scaled_mm` lacks row-wise scales: CPU runs are for tests."""
    x = xq.to(torch.float32) * x_scale.to(torch.float32)
    w = w_fp8.to(torch.float32) * w_scale.to(torch.float32).reshape(-1, 1)
    out = x @ w.t()
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


def _quantized_mm(xq: Tensor, x_scale: Tensor, w_fp8: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                  granularity: str, out_dtype: torch.dtype, fast_accum: bool) -> Tensor:
    if xq.device.type == "cpu" and x_scale.numel() > 1 and not _cpu_rowwise_scaled_mm():
        return _dequantized_mm(xq, x_scale, w_fp8, w_scale, bias, out_dtype)
    # row-wise scaled_mm on CUDA returns bf16 only; the tower's own dtype comes back with one cast
    mm_dtype = torch.bfloat16 if (granularity == "row" and xq.device.type in ("cuda", "meta")) else out_dtype
    in_gemm = bias is not None and mm_dtype == out_dtype  # else added after the cast, in the tower's dtype
    out = torch._scaled_mm(xq, w_fp8.t(), scale_a=x_scale, scale_b=w_scale,
                           bias=bias.to(mm_dtype) if in_gemm else None, out_dtype=mm_dtype,
                           use_fast_accum=fast_accum)
    out = out if out.dtype == out_dtype else out.to(out_dtype)
    return out + bias.to(out_dtype) if bias is not None and not in_gemm else out


class _Fp8Matmul(torch.autograd.Function):
    """x @ W^T in float8; backward: grad_x = grad @ dequant(W) (W is frozen: no weight gradient)."""

    @staticmethod
    def forward(ctx, x2: Tensor, w_fp8: Tensor, w_scale: Tensor, bias: Optional[Tensor], granularity: str,
                out_dtype: torch.dtype, fast_accum: bool) -> Tensor:
        ctx.save_for_backward(w_fp8, w_scale)
        ctx.in_dtype = x2.dtype
        return _mm(x2, w_fp8, w_scale, bias, granularity, out_dtype, fast_accum)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w_fp8, w_scale = ctx.saved_tensors
        w = w_fp8.to(grad.dtype) * w_scale.reshape(-1, 1).to(grad.dtype)  # (N, K) dequantised
        return (grad @ w).to(ctx.in_dtype), None, None, None, None, None, None


class Fp8Linear(nn.Module):
    """A frozen Linear whose weight is stored in e4m3 with float32 scales; y = x W^T + b via torch._scaled_mm."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], granularity: str = "row", fast_accum: bool = False):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity={granularity!r}: one of {GRANULARITIES}")
        self.out_features, self.in_features = weight.shape
        self.granularity = granularity
        self.fast_accum = bool(fast_accum)
        self.weight_dtype = weight.dtype
        w_fp8, w_scale = quantize(weight.detach(), granularity)
        self.register_buffer("weight_fp8", w_fp8)
        # _scaled_mm takes the second operand's scales as (1, N) (row) or a scalar (tensor)
        self.register_buffer("weight_scale", w_scale.reshape(1, -1) if granularity == "row" else w_scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def weight(self) -> Tensor:
        """A data-less stand-in with the original weight's shape and dtype, for code that inspects a layer
        (transformers' T5 casts its FFN input to `wo.weight.dtype`). Computing with it fails loudly (meta)."""
        return torch.empty((self.out_features, self.in_features), dtype=self.weight_dtype, device="meta")

    @classmethod
    def from_linear(cls, linear: nn.Linear, granularity: str = "row", fast_accum: bool = False) -> "Fp8Linear":
        return cls(linear.weight, linear.bias, granularity, fast_accum)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        # the dtype nn.Linear would return: autocast's when it is on (e.g. bf16 after an fp32 LayerNorm), else x's
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        if torch.is_grad_enabled() and x.requires_grad:
            y = _Fp8Matmul.apply(x2, self.weight_fp8, self.weight_scale, self.bias, self.granularity, out_dtype,
                                 self.fast_accum)
        else:
            y = _mm(x2, self.weight_fp8, self.weight_scale, self.bias, self.granularity, out_dtype, self.fast_accum)
        return y.reshape(*lead, self.out_features)

    def forward_quantized(self, xq: Tensor, x_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
        """The product from an input its caller quantised row-wise ((rows, K) e4m3, (rows, 1) scales): no
        gradient (frozen inference path)."""
        return _quantized_mm(xq, x_scale, self.weight_fp8, self.weight_scale, self.bias, self.granularity, out_dtype,
                             self.fast_accum)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"e4m3 {self.granularity}-wise scales" + (", fast accumulation" if self.fast_accum else ""))


def fits_scaled_mm(out_features: int, in_features: int) -> bool:
    """torch._scaled_mm needs the inner and output sizes to be multiples of 16."""
    return out_features % 16 == 0 and in_features % 16 == 0


# ------------------------------------------------------------------------------------------------ attention swaps
class Fp8EvaAttention(nn.Module):
    """EvaAttention with its qkv (q/v biases folded into one bias, k's is zero) and proj in float8."""

    def __init__(self, attn: nn.Module, granularity: str, fast_accum: bool = False):
        super().__init__()
        self.heads = attn.heads
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        self.qkv = Fp8Linear(attn.qkv.weight, bias, granularity, fast_accum)
        self.proj = Fp8Linear.from_linear(attn.proj, granularity, fast_accum)

    def forward(self, x: Tensor, qkv: Optional[Tensor] = None) -> Tensor:
        """qkv: the qkv product when the caller computed it (Fp8EvaBlock, from its fused norm + quantisation)."""
        B, N, D = x.shape
        qkv = self.qkv(x) if qkv is None else qkv
        q, k, v = qkv.view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Fp8ClipAttention(nn.Module):
    """CLIP's FusedSelfAttention (in_proj_weight / in_proj_bias, out_proj) in float8."""

    def __init__(self, attn: nn.Module, granularity: str, fast_accum: bool = False):
        super().__init__()
        self.heads, self.head_dim = attn.heads, attn.head_dim
        self.in_proj = Fp8Linear(attn.in_proj_weight, attn.in_proj_bias, granularity, fast_accum)
        self.out_proj = Fp8Linear.from_linear(attn.out_proj, granularity, fast_accum)

    def forward(self, x: Tensor) -> Tensor:
        b, s, w = x.shape
        qkv = self.in_proj(x).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.out_proj(out.transpose(1, 2).reshape(b, s, w))


def _fused_norm_input(norm: nn.Module, x: Tensor, linear: "Fp8Linear") -> Optional[Tensor]:
    """linear(norm(x)) with the norm computed inside the row quantisation (one pass over x; the norm's output is
    never written), or None where that does not apply: the fused kernel is not the backend in use (the torch
    backend keeps the exact composition), the norm is not the half-precision tower's autocast path
    (vision.TowerLayerNorm), scales are per tensor, or a gradient is wanted."""
    from ..ops import fp8_quantize

    dev = x.device.type
    if linear.granularity != "row" or (torch.is_grad_enabled() and x.requires_grad) or norm.weight is None:
        return None
    if not (x.dtype in (torch.float16, torch.bfloat16) and x.dtype == norm.weight.dtype
            and torch.is_autocast_enabled(dev)):
        return None
    x2 = x.reshape(-1, x.shape[-1])
    if fp8_quantize._choose_backend(x2, None) != "triton":
        return None
    xq, x_scale = fp8_quantize.quantize_rows(x2, weight=norm.weight, bias=norm.bias, eps=norm.eps)
    y = linear.forward_quantized(xq, x_scale, torch.get_autocast_dtype(dev))  # what linear(norm(x)) returns
    return y.reshape(*x.shape[:-1], linear.out_features)


class Fp8EvaBlock(nn.Module):
    """EvaBlock with its attention and MLP in float8 (Fp8EvaAttention, Fp8EvaMlp) and the same norms. With the
    Triton quantiser in use, each norm runs inside the quantisation of the linear it feeds (qkv, fc1)."""

    def __init__(self, block: nn.Module, granularity: str, fast_accum: bool = False):
        super().__init__()
        self.norm1, self.norm2 = block.norm1, block.norm2
        self.attn = Fp8EvaAttention(block.attn, granularity, fast_accum)
        self.mlp = Fp8EvaMlp(block.mlp, granularity, fast_accum)

    def forward(self, x: Tensor) -> Tensor:
        qkv = _fused_norm_input(self.norm1, x, self.attn.qkv)
        x = x + (self.attn(self.norm1(x)) if qkv is None else self.attn(x, qkv=qkv))
        h = _fused_norm_input(self.norm2, x, self.mlp.fc1)
        return x + (self.mlp(self.norm2(x)) if h is None else self.mlp(x, h=h))


class Fp8EvaMlp(nn.Module):
    """EvaMlp (fc1, exact GELU, fc2) in float8. With row-wise scales and no gradient wanted (the frozen tower's
    forward), fc2's input is quantised straight from fc1's output with the GELU applied in the same pass
    (ops/fp8_quantize.py gelu=True): the activation is never written in the tower's dtype. The torch backend
    gives exactly fc2(gelu(fc1(x))) of two Fp8Linears; otherwise that composition runs."""

    def __init__(self, mlp: nn.Module, granularity: str, fast_accum: bool = False):
        super().__init__()
        self.fc1 = Fp8Linear.from_linear(mlp.fc1, granularity, fast_accum)
        self.fc2 = Fp8Linear.from_linear(mlp.fc2, granularity, fast_accum)

    def forward(self, x: Tensor, h: Optional[Tensor] = None) -> Tensor:
        """h: fc1's output when the caller computed it (Fp8EvaBlock, from its fused norm + quantisation)."""
        h = self.fc1(x) if h is None else h
        if self.fc2.granularity != "row" or (torch.is_grad_enabled() and h.requires_grad):
            return self.fc2(F.gelu(h))
        from ..ops.fp8_quantize import quantize_rows

        hq, h_scale = quantize_rows(h.reshape(-1, self.fc2.in_features), gelu=True)
        y = self.fc2.forward_quantized(hq, h_scale, h.dtype)  # the dtype fc2 would return: gelu keeps h's
        return y.reshape(*h.shape[:-1], self.fc2.out_features)


def _module_swap(module: nn.Module, granularity: str, fast_accum: bool) -> Optional[nn.Module]:
    from .vision import EvaAttention, EvaBlock, EvaMlp
    from .vision_clip import FusedSelfAttention

    if isinstance(module, EvaBlock) and all(fits_scaled_mm(*w.shape) for w in (
            module.attn.qkv.weight, module.attn.proj.weight, module.mlp.fc1.weight, module.mlp.fc2.weight)):
        return Fp8EvaBlock(module, granularity, fast_accum)

    if isinstance(module, EvaMlp) and fits_scaled_mm(*module.fc1.weight.shape) and \
            fits_scaled_mm(*module.fc2.weight.shape):
        return Fp8EvaMlp(module, granularity, fast_accum)

    if isinstance(module, EvaAttention) and fits_scaled_mm(*module.qkv.weight.shape):
        return Fp8EvaAttention(module, granularity, fast_accum)
    if isinstance(module, FusedSelfAttention) and fits_scaled_mm(*module.in_proj_weight.shape):
        return Fp8ClipAttention(module, granularity, fast_accum)
    return None


# ------------------------------------------------------------------------------------------------ the swap
def convert_linears_to_fp8_(tower: nn.Module, granularity: str = "row", skip: tuple = (),
                            fast_accum: bool = False) -> list[str]:
    """Replace, in place, every nn.Linear of `tower` (and EVA / CLIP fused attentions) by its float8 version;
    modules in `skip` (e.g. an LLM's output head, read directly by a fused loss) are left alone. Returns notes:
    how many layers were converted and which stayed in their dtype (sizes not multiples of 16). The tower must
    be frozen: weights are copied into float8 buffers and the originals dropped."""
    if any(p.requires_grad for p in tower.parameters()):
        raise ValueError("convert_linears_to_fp8_ takes a frozen module (no parameter may require grad): the "
                         "float8 copies are inference-only")
    skip_ids = {id(m) for m in skip if m is not None}
    converted, kept = 0, []

    def visit(parent: nn.Module, prefix: str) -> None:
        nonlocal converted
        for name, child in list(parent.named_children()):
            path = f"{prefix}{name}"
            if id(child) in skip_ids:
                continue
            swap = _module_swap(child, granularity, fast_accum)
            if swap is not None:
                setattr(parent, name, swap)
                converted += sum(isinstance(m, Fp8Linear) for m in swap.modules())
                continue
            if isinstance(child, nn.Linear):
                if fits_scaled_mm(child.out_features, child.in_features):
                    setattr(parent, name, Fp8Linear.from_linear(child, granularity, fast_accum))
                    converted += 1
                else:
                    kept.append(f"{path} ({child.out_features}x{child.in_features})")
                continue
            visit(child, path + ".")

    visit(tower, "")
    notes = [f"fp8: {converted} linear layers in float8 e4m3 ({granularity}-wise scales)"]
    if kept:
        notes.append(f"fp8: {len(kept)} layers kept in their dtype (sizes not multiples of 16): "
                     + ", ".join(kept[:6]) + (" ..." if len(kept) > 6 else ""))
    return notes


__all__ = ["E4M3_MAX", "Fp8ClipAttention", "Fp8EvaAttention", "Fp8EvaBlock", "Fp8EvaMlp", "Fp8Linear", "GRANULARITIES", "TOWER_TOLERANCE",
           "convert_linears_to_fp8_", "fits_scaled_mm", "fp8_unsupported", "quantize", "require_fp8"]
