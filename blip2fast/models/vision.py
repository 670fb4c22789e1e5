"""Frozen image encoders: the EVA-CLIP ViT layout, and `build_vision_tower` choosing among all layouts.

Every tower maps pixel_values (B, 3, H, W) -> tokens (B, N, Dv) and exposes `out_width` (Dv) and `seq_len` (N).
Freezing (eval mode, no grad, half precision) is applied by `freeze_` so every layout gets the same treatment.
Attention runs through `F.scaled_dot_product_attention`, which picks FlashAttention / memory-efficient kernels on
GPUs (and uses the math path on the CPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import VisionConfig


def check_pixel_values(pixel_values: Tensor, image_size: int, channels: int = 3) -> None:
    """A wrong image size or layout fails here, naming the value, not deep inside a conv or a reshape.
    Every tower calls it, so the message is the same whichever layout the model uses."""
    if not isinstance(pixel_values, Tensor) or not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be a floating-point tensor, got {type(pixel_values).__name__}"
                        + (f" of dtype {pixel_values.dtype}" if isinstance(pixel_values, Tensor) else ""))
    expected = (channels, image_size, image_size)
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise ValueError(
            f"pixel_values has shape {tuple(pixel_values.shape)}; expected (batch, {expected[0]}, {expected[1]}, "
            f"{expected[2]}) for this model's vision.image_size={image_size}. Resize or crop the images to "
            f"{image_size}x{image_size} in the data pipeline."
        )
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values has batch size 0")


class EvaAttention(nn.Module):
    """EVA self-attention: fused qkv weight without bias, separate q and v biases (the k bias is zero)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class EvaMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TowerLayerNorm(nn.LayerNorm):
    """nn.LayerNorm that keeps a half-precision tower's dtype under autocast. Autocast runs layer_norm in float32:
    it casts x, weight and bias up and returns float32, which the next linear casts back down (or an FP8 linear
    quantises from float32), three extra passes over the activations. Here the norm runs with autocast off on the
    tower's own tensors: the kernel still computes its statistics and the affine transform in float32 and rounds
    once to the tower's dtype, which is what the next linear's cast would have produced. Float32 towers (CPU,
    parity tests) and runs without autocast take nn.LayerNorm unchanged. (Cost model, stage 1 ViT-g b128 on an
    H200: about 40 GB of HBM traffic and 234 launches per step less.)"""

    def forward(self, x: Tensor) -> Tensor:
        half = x.dtype in (torch.float16, torch.bfloat16) and self.weight is not None and x.dtype == self.weight.dtype
        if half and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return super().forward(x)


class EvaBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = TowerLayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = EvaAttention(cfg.width, cfg.heads)
        self.norm2 = TowerLayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = EvaMlp(cfg.width, cfg.mlp_hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, num_patches, width)


class EvaViT(nn.Module):
    """EVA-CLIP ViT with LAVIS's parameter names (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.*`), so a
    LAVIS `visual_encoder.*` state dict loads by name. No final norm: BLIP-2 applies its own `ln_vision`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.out_width = cfg.width
        self.seq_len = cfg.seq_len
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.seq_len, cfg.width))
        self.blocks = nn.ModuleList(EvaBlock(cfg) for _ in range(cfg.depth))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, pixel_values: Tensor) -> Tensor:
        check_pixel_values(pixel_values, self.cfg.image_size)
        x = self.patch_embed(pixel_values)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x  # (B, 1 + num_patches, width)


def build_vision_tower(cfg: VisionConfig) -> nn.Module:
    if cfg.kind == "eva":
        return EvaViT(cfg)
    if cfg.kind == "clip":
        from .vision_clip import ClipViT

        return ClipViT(cfg)
    if cfg.kind == "hf":
        from .vision_hf import HFVisionTower

        return HFVisionTower(cfg)
    raise ValueError(f"vision.kind={cfg.kind!r} is not one of 'eva', 'clip', 'hf'")


def freeze_(tower: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Frozen = eval mode, no parameter needs grad, stored in `dtype`. The owner keeps it in eval mode across
    `train()` calls (see `Blip2.train`)."""
    tower.eval()
    tower.requires_grad_(False)
    return tower.to(dtype)
