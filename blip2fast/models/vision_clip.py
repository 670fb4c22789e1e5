"""OpenAI CLIP ViT laid out as LAVIS's ``clip_vit.py`` builds it for BLIP-2.

Parameter names match LAVIS's ``VisionTransformer`` so its state dicts load by name:

    conv1.weight                                   (width, 3, patch, patch), no bias
    class_embedding                                (width,)
    positional_embedding                           (1 + num_patches, width)
    ln_pre.{weight,bias}
    transformer.resblocks.N.ln_1.{weight,bias}
    transformer.resblocks.N.attn.in_proj_weight    (3*width, width), rows [q; k; v]
    transformer.resblocks.N.attn.in_proj_bias      (3*width,)
    transformer.resblocks.N.attn.out_proj.{weight,bias}
    transformer.resblocks.N.ln_2.{weight,bias}
    transformer.resblocks.N.mlp.c_fc.{weight,bias}
    transformer.resblocks.N.mlp.c_proj.{weight,bias}

There is no ``ln_post``: BLIP-2 takes the output of the last block built (``cfg.depth`` blocks, 23 of
ViT-L's 24), and ``ln_vision`` outside the tower normalises it.

Differences from LAVIS that do not change the numbers: tokens stay batch-first (LAVIS permutes to
sequence-first for ``nn.MultiheadAttention``), and attention runs through ``F.scaled_dot_product_attention``
on the fused ``in_proj_weight``. LayerNorms compute in fp32 and cast back, as LAVIS's ``LayerNorm`` does.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from blip2fast.config import VisionConfig
from blip2fast.models.vision import check_pixel_values

__all__ = ["ClipViT", "clip_state_dict_from_hf"]


class LayerNorm(nn.LayerNorm):
    """LayerNorm that normalises in fp32 and returns the input dtype (fp16/bf16 towers keep fp32 statistics)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return super().forward(x)
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class FusedSelfAttention(nn.Module):
    """Self-attention with ``nn.MultiheadAttention``'s parameter names and layout (batch-first, no mask).

    ``in_proj_weight`` stacks the q, k and v projections (each (width, width)); head h owns columns
    ``h*head_dim:(h+1)*head_dim`` of each, exactly as ``nn.MultiheadAttention`` splits them.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} is not divisible by heads={heads}")
        self.width = width
        self.heads = heads
        self.head_dim = width // heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, S, 3W)
        qkv = qkv.view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, S, Dh)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, S, Dh)
        out = out.transpose(1, 2).reshape(b, s, w)
        return self.out_proj(out)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) with a QuickGELU MLP."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, eps: float) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=eps)
        self.attn = FusedSelfAttention(width, heads)
        self.ln_2 = LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, mlp_hidden)),
                    ("gelu", QuickGELU()),
                    ("c_proj", nn.Linear(mlp_hidden, width)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    """Holds ``resblocks`` (LAVIS's name) so block parameters read ``transformer.resblocks.N.*``."""

    def __init__(self, width: int, depth: int, heads: int, mlp_hidden: int, eps: float) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_hidden, eps) for _ in range(depth)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class ClipViT(nn.Module):
    """CLIP ViT image tower (LAVIS layout, no ``ln_post``): pixels (B, 3, S, S) -> tokens (B, 1 + patches, width).

    Built from a ``VisionConfig`` with ``kind="clip"``; ``cfg.depth`` blocks are built and run.
    Attributes: ``out_width`` (= cfg.width), ``seq_len`` (= 1 + num_patches).
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.kind != "clip":
            raise ValueError(f"ClipViT needs a VisionConfig with kind='clip'; got kind={cfg.kind!r}")
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size={cfg.image_size} is not a multiple of patch_size={cfg.patch_size}")
        self.cfg = cfg
        self.image_size = cfg.image_size
        self.patch_size = cfg.patch_size
        self.grid = cfg.image_size // cfg.patch_size
        self.num_patches = self.grid * self.grid
        self.out_width = cfg.width
        self.seq_len = self.num_patches + 1

        w = cfg.width
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        scale = w ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.seq_len, w))
        self.ln_pre = LayerNorm(w, eps=cfg.layer_norm_eps)
        self.transformer = Transformer(w, cfg.depth, cfg.heads, cfg.mlp_hidden, cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        check_pixel_values(pixel_values, self.image_size)
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype))  # (B, W, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        return self.transformer(x)


# ---------------------------------------------------------------- HF -> LAVIS-CLIP weights
_HF_MARKER = "embeddings.class_embedding"
_HF_TOP = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
}
# Vision keys with no counterpart in LAVIS's tower (it has no ln_post; position_ids is a buffer).
_HF_DROP = {"post_layernorm.weight", "post_layernorm.bias", "embeddings.position_ids"}
_HF_BLOCK = {
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}
_HF_QKV = ("q_proj", "k_proj", "v_proj")


def clip_state_dict_from_hf(
    sd: Mapping[str, torch.Tensor], depth: Optional[int] = None
) -> "OrderedDict[str, torch.Tensor]":
    """Rename a transformers CLIP vision state dict to ``ClipViT`` / LAVIS ``clip_vit.py`` names.

    ``sd`` may come from ``CLIPVisionModel`` (keys ``embeddings.*``, ``encoder.layers.N.*``) or from a full
    ``CLIPModel`` / older layouts (the same keys under a prefix such as ``vision_model.``); the prefix is
    found from ``...embeddings.class_embedding`` and everything outside it (text tower, projections) is
    ignored. q/k/v projections are concatenated into ``attn.in_proj_weight`` / ``in_proj_bias`` in [q; k; v]
    order. ``post_layernorm`` is dropped (LAVIS has no ``ln_post``). With ``depth``, only blocks
    ``0..depth-1`` are kept (BLIP-2 runs 23 of ViT-L's 24). Unknown keys inside the vision prefix raise.
    """
    prefixes = sorted({k[: -len(_HF_MARKER)] for k in sd if k.endswith(_HF_MARKER)})
    if len(prefixes) != 1:
        raise ValueError(
            f"clip_state_dict_from_hf: expected exactly one '*{_HF_MARKER}' key (a CLIP vision tower); "
            f"found prefixes {prefixes}"
        )
    prefix = prefixes[0]
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    qkv: dict = {}
    unknown = []
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in _HF_TOP:
            out[_HF_TOP[name]] = value
            continue
        if name in _HF_DROP:
            continue
        parts = name.split(".", 3)
        if len(parts) == 4 and parts[0] == "encoder" and parts[1] == "layers" and parts[2].isdigit():
            idx, rest = int(parts[2]), parts[3]
            if depth is not None and idx >= depth:
                continue
            if rest in _HF_BLOCK:
                out[f"transformer.resblocks.{idx}.{_HF_BLOCK[rest]}"] = value
                continue
            sub = rest.split(".")
            if len(sub) == 3 and sub[0] == "self_attn" and sub[1] in _HF_QKV and sub[2] in ("weight", "bias"):
                qkv[(idx, sub[2], sub[1])] = value
                continue
        # keys of other towers under an empty prefix (e.g. text_model.*) are not vision keys
        if prefix == "" and not (name.startswith("embeddings.") or name.startswith("encoder.")
                                 or name.startswith("pre_layrnorm.")):
            continue
        unknown.append(key)
    if unknown:
        raise ValueError(f"clip_state_dict_from_hf: unrecognised CLIP vision keys: {sorted(unknown)[:10]}")

    layers = sorted({idx for idx, _, _ in qkv})
    for idx in layers:
        for kind, target in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            missing = [p for p in _HF_QKV if (idx, kind, p) not in qkv]
            if missing:
                raise ValueError(f"clip_state_dict_from_hf: layer {idx} lacks self_attn.{missing}.{kind}")
            out[f"transformer.resblocks.{idx}.attn.{target}"] = torch.cat([qkv[(idx, kind, p)] for p in _HF_QKV], 0)
    return out
