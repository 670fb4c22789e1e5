"""LAVIS checkpoints (`.pth` holding `{"model": state_dict}`) <-> blip2fast parameter names.

LAVIS names the Q-Former like HF BERT (`Qformer.bert.encoder.layer.N.attention.self.query`); blip2fast uses
shorter names (`qformer.layers.N.self_attn.query`). The vision tower, `ln_vision`, `query_tokens`, the heads and
`temp` keep LAVIS's names. The mapping is a table, used in both directions.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Optional

import torch

from ..config import Blip2Config, QFormerConfig, VisionConfig
from .keymap import rename_part, rename_state_dict

_LAYER_PARTS = {  # LAVIS suffix after `Qformer.bert.encoder.layer.N.` -> ours after `qformer.layers.N.`
    "attention.self.": "self_attn.",
    "attention.output.dense.": "self_attn.dense.",
    "attention.output.LayerNorm.": "self_attn.norm.",
    "crossattention.self.": "cross_attn.",
    "crossattention.output.dense.": "cross_attn.dense.",
    "crossattention.output.LayerNorm.": "cross_attn.norm.",
    "intermediate.dense.": "ffn.up.",
    "output.dense.": "ffn.down.",
    "output.LayerNorm.": "ffn.norm.",
    "intermediate_query.dense.": "ffn_query.up.",
    "output_query.dense.": "ffn_query.down.",
    "output_query.LayerNorm.": "ffn_query.norm.",
}
_FIXED = {  # whole keys
    "Qformer.bert.embeddings.word_embeddings.weight": "qformer.embeddings.word_embeddings.weight",
    "Qformer.bert.embeddings.position_embeddings.weight": "qformer.embeddings.position_embeddings.weight",
    "Qformer.bert.embeddings.LayerNorm.weight": "qformer.embeddings.norm.weight",
    "Qformer.bert.embeddings.LayerNorm.bias": "qformer.embeddings.norm.bias",
    "Qformer.cls.predictions.transform.dense.weight": "qformer.lm_head.dense.weight",
    "Qformer.cls.predictions.transform.dense.bias": "qformer.lm_head.dense.bias",
    "Qformer.cls.predictions.transform.LayerNorm.weight": "qformer.lm_head.norm.weight",
    "Qformer.cls.predictions.transform.LayerNorm.bias": "qformer.lm_head.norm.bias",
    "Qformer.cls.predictions.bias": "qformer.lm_head.bias",
}
# Present in LAVIS checkpoints but carrying nothing of their own: a buffer, and the LM decoder tied to the word
# embeddings (weight) and to `predictions.bias` (bias).
_REDUNDANT = {
    "Qformer.bert.embeddings.position_ids",
    "Qformer.cls.predictions.decoder.weight",
    "Qformer.cls.predictions.decoder.bias",
}
_SAME_PREFIXES = ("visual_encoder.", "ln_vision.", "query_tokens", "vision_proj.", "text_proj.", "itm_head.", "temp")
_LAYER_RE = re.compile(r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(.+)$")
_OUR_LAYER_RE = re.compile(r"^qformer\.layers\.(\d+)\.(.+)$")


def lavis_key_to_ours(key: str) -> Optional[str]:
    """Our name for a LAVIS key; None for keys with no blip2fast counterpart."""
    if key in _FIXED:
        return _FIXED[key]
    m = _LAYER_RE.match(key)
    if m:
        part = rename_part(_LAYER_PARTS, m.group(2))
        return None if part is None else f"qformer.layers.{m.group(1)}.{part}"
    if key.startswith(_SAME_PREFIXES):
        return key
    return None


def our_key_to_lavis(key: str) -> Optional[str]:
    inverse = {v: k for k, v in _FIXED.items()}
    if key in inverse:
        return inverse[key]
    m = _OUR_LAYER_RE.match(key)
    if m:
        part = rename_part(_LAYER_PARTS, m.group(2), reverse=True)
        return None if part is None else f"Qformer.bert.encoder.layer.{m.group(1)}.{part}"
    return key if key.startswith(_SAME_PREFIXES) else None


def read_lavis_state_dict(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no LAVIS checkpoint at {path!r} (expected a .pth file saved by LAVIS)")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not any(k.startswith("Qformer.") for k in sd):
        raise ValueError(f"{path!r} does not look like a LAVIS BLIP-2 checkpoint: expected a dict with 'model' "
                         "holding Qformer.* / visual_encoder.* tensors")
    return sd


_KNOWN_HEADS = {1408: 16, 1024: 16, 768: 12}  # widths of the paper's towers / Q-Former -> heads


def _heads(width: int, what: str) -> int:
    if width not in _KNOWN_HEADS:
        raise ValueError(f"cannot infer the head count of a {what} of width {width} from tensor shapes; pass "
                         "config=Blip2Config(...) with the sizes of this checkpoint")
    return _KNOWN_HEADS[width]


def infer_config(sd: dict, vision_dtype: str = "float16") -> Blip2Config:
    """Sizes from the tensor shapes (the paper's EVA ViT-g / CLIP ViT-L + BERT-base layouts)."""
    layer_ids = {int(m.group(1)) for k in sd for m in [_LAYER_RE.match(k)] if m}
    cross = sorted(i for i in layer_ids if f"Qformer.bert.encoder.layer.{i}.crossattention.self.query.weight" in sd)
    hidden = sd["Qformer.bert.embeddings.word_embeddings.weight"].shape[1]
    qcfg = QFormerConfig(
        hidden_size=hidden, num_layers=len(layer_ids), num_heads=_heads(hidden, "Q-Former"),
        intermediate_size=sd["Qformer.bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
        cross_attention_freq=cross[1] - cross[0] if len(cross) > 1 else max(len(layer_ids), 1),
        num_query_tokens=sd["query_tokens"].shape[1],
        vocab_size=sd["Qformer.bert.embeddings.word_embeddings.weight"].shape[0],
        max_position_embeddings=sd["Qformer.bert.embeddings.position_embeddings.weight"].shape[0],
    )
    if "visual_encoder.blocks.0.attn.q_bias" in sd:
        width = sd["visual_encoder.cls_token"].shape[-1]
        patch = sd["visual_encoder.patch_embed.proj.weight"].shape[-1]
        n = sd["visual_encoder.pos_embed"].shape[1] - 1
        depth = len({k.split(".")[2] for k in sd if k.startswith("visual_encoder.blocks.")})
        vcfg = VisionConfig(kind="eva", image_size=int(round(n ** 0.5)) * patch, patch_size=patch, width=width,
                            depth=depth, heads=_heads(width, "vision tower"),
                            mlp_hidden=sd["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0], layer_norm_eps=1e-6,
                            dtype=vision_dtype)
    elif "visual_encoder.transformer.resblocks.0.attn.in_proj_weight" in sd:
        width = sd["visual_encoder.class_embedding"].shape[-1]
        patch = sd["visual_encoder.conv1.weight"].shape[-1]
        n = sd["visual_encoder.positional_embedding"].shape[0] - 1
        depth = len({k.split(".")[3] for k in sd if k.startswith("visual_encoder.transformer.resblocks.")})
        vcfg = VisionConfig(kind="clip", image_size=int(round(n ** 0.5)) * patch, patch_size=patch, width=width,
                            depth=depth, heads=_heads(width, "vision tower"),
                            mlp_hidden=sd["visual_encoder.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                            layer_norm_eps=1e-5, dtype=vision_dtype)
    else:
        raise ValueError("the checkpoint has no EVA (visual_encoder.blocks.*) or CLIP (visual_encoder.transformer.*) "
                         "vision tower; pass config=... describing it")
    return Blip2Config(vision=vcfg, qformer=qcfg, embed_dim=sd["vision_proj.weight"].shape[0])


def convert_lavis_state_dict(sd: dict) -> tuple[dict, list[str]]:
    """(our state dict, LAVIS keys with no counterpart)."""
    return rename_state_dict(sd, lavis_key_to_ours, _REDUNDANT)


def load_lavis(cls, path: str, config: Optional[Blip2Config] = None, strict: bool = False,
               vision_dtype: str = "float16"):
    sd = read_lavis_state_dict(path)
    config = config or infer_config(sd, vision_dtype=vision_dtype)
    model = cls(config)
    ours, unused = convert_lavis_state_dict(sd)
    expected = model.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
           for k, v in ours.items() if k in expected and expected[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path!r} does not match the config's sizes:\n  " + "\n  ".join(bad)
                         + "\nPass the matching config=..., or none to infer it from the shapes.")
    result = model.load_state_dict(ours, strict=False)
    problems = []
    if unused or result.unexpected_keys:
        problems.append("unused checkpoint keys: " + ", ".join(unused + list(result.unexpected_keys)))
    if result.missing_keys:
        problems.append("freshly initialised (absent from the checkpoint): " + ", ".join(result.missing_keys))
    if problems:
        msg = f"loading {path!r}: " + "; ".join(problems)
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=3)
    return model
