"""Model configuration: frozen dataclasses with a comment on every default, plus the paper's presets.

Sizes only; nothing here imports torch modules or transformers, so configs are cheap to build and print.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

VISION_KINDS = ("eva", "clip", "hf")
# OpenAI CLIP pixel normalisation, used by BLIP-2 for every tower (the spec's preprocessing)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class VisionConfig:
    """The frozen image encoder. `kind` picks the layout:

    - "eva":  EVA-CLIP ViT as in LAVIS (`eva_vit.py`): q/v-only qkv bias, pre-LN, exact GELU, abs. positions.
    - "clip": OpenAI CLIP ViT as in LAVIS (`clip_vit.py`): `ln_pre`, QuickGELU, fused in_proj, no `ln_post`.
    - "hf":   any transformers vision model in a local folder (`hf_path`) returning `last_hidden_state`
              (CLIP, SigLIP, Dinov2, ...); `hf_feature_layer` picks the hidden state (-2 = second-last layer).
    `depth` counts the blocks actually built: BLIP-2 uses the second-last layer, so ViT-g has 39 of 40.
    """

    kind: str = "eva"
    image_size: int = 224  # input resolution; inputs of another size are an error
    patch_size: int = 14
    width: int = 1408  # token width Dv
    depth: int = 39  # blocks built and run (ViT-g/14 has 40; BLIP-2 drops the last)
    heads: int = 16
    mlp_hidden: int = 6144  # int(1408 * 4.3637) for ViT-g
    layer_norm_eps: float = 1e-6  # EVA blocks use 1e-6; OpenAI CLIP uses 1e-5
    dtype: str = "float16"  # storage + compute dtype of the frozen tower ("float32" for parity tests)
    hf_path: Optional[str] = None  # local folder for kind="hf"
    hf_feature_layer: int = -1  # which hidden state of an HF tower; -2 reproduces BLIP-2's second-last rule

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_len(self) -> int:
        """Tokens the tower outputs: patches + CLS (HF towers may differ; they report their own)."""
        return self.num_patches + 1


@dataclass(frozen=True)
class QFormerConfig:
    """The trainable Q-Former: a BERT with learned queries and cross-attention to the image every few layers."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_freq: int = 2  # layers 0, freq, 2*freq, ... cross-attend the image
    num_query_tokens: int = 32
    vocab_size: int = 30523  # bert-base-uncased + [DEC]
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1  # after attention/FFN output projections and embeddings (torch dropout)
    attention_dropout: float = 0.1  # on attention probabilities (counter-based hash, reproducible)
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    dec_token_id: int = 30522  # [DEC]: replaces [CLS] as the first token for ITG / generation

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_freq == 0


@dataclass(frozen=True)
class LLMConfig:
    """The frozen LLM of stage 2, any transformers causal LM (OPT, Llama, ...) or T5/FlanT5 encoder-decoder.

    Give `path` (a local folder saved by transformers: config + weights, tokenizer files optional) or `hf_config`
    (the LLM's config.json as a dict: the model is built with random weights, for tests and for loading a whole
    BLIP-2 checkpoint whose weights carry the LLM). Never a hub name: nothing is downloaded.
    """

    path: Optional[str] = None
    hf_config: Optional[dict] = None
    dtype: str = "float16"  # storage + compute dtype of the frozen LLM (the paper: fp16 OPT, bf16 FlanT5)
    max_text_len: int = 32  # tokens of caption (decoder-only) or of prefix/suffix (encoder-decoder)
    exact_gelu: bool = True  # T5/FlanT5: exact GELU in the FFN instead of the tanh approximation (the paper)
    image_token_index: Optional[int] = None  # transformers' image placeholder in the LLM vocabulary, when the LLM
    # came from (or was saved as) a transformers BLIP-2 folder; never generated


@dataclass(frozen=True)
class Blip2Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: Optional[LLMConfig] = None  # stage 2 only: projection + frozen LLM
    embed_dim: int = 256  # ITC projection width
    ln_vision_eps: float = 1e-5  # LAVIS uses 1e-5; transformers' post_layernorm 1e-6 (the loader sets it)
    max_text_len: int = 32  # captions are tokenised to this many tokens in the data loader
    temp_init: float = 0.07
    temp_clamp: Optional[tuple] = (0.001, 0.5)  # LAVIS never clamps; None reproduces it exactly
    itc_label_smoothing: float = 0.1
    itg_label_smoothing: float = 0.1
    itc_gather_with_grad: bool = False  # False: LAVIS's convention (gathered features detached, local too)

    def __post_init__(self) -> None:
        errors = validate(self)
        if errors:
            raise ValueError("invalid Blip2Config: " + "; ".join(errors))  # one line, every problem

    def replace(self, **changes: Any) -> "Blip2Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Blip2Config":
        d = dict(d)
        vision = VisionConfig(**d.pop("vision", {}))
        qformer = QFormerConfig(**d.pop("qformer", {}))
        llm = d.pop("llm", None)
        if d.get("temp_clamp") is not None:
            d["temp_clamp"] = tuple(d["temp_clamp"])
        return cls(vision=vision, qformer=qformer, llm=None if llm is None else LLMConfig(**llm), **d)


def validate(cfg: Blip2Config) -> list[str]:
    """Every problem with a config, each naming the field, its value and a fix."""
    v, q, errs = cfg.vision, cfg.qformer, []
    if v.kind not in VISION_KINDS:
        errs.append(f"vision.kind={v.kind!r}: must be one of {VISION_KINDS}")
    if v.dtype not in DTYPES:
        errs.append(f"vision.dtype={v.dtype!r}: must be one of {DTYPES}")
    if v.kind == "hf" and not v.hf_path:
        errs.append("vision.kind='hf' needs vision.hf_path: a local folder saved by transformers")
    if v.kind != "hf":
        if v.image_size % v.patch_size:
            errs.append(f"vision.image_size={v.image_size} is not a multiple of vision.patch_size={v.patch_size}")
        if v.width % v.heads:
            errs.append(f"vision.width={v.width} is not divisible by vision.heads={v.heads}")
    if q.hidden_size % q.num_heads:
        errs.append(f"qformer.hidden_size={q.hidden_size} is not divisible by qformer.num_heads={q.num_heads}")
    if q.cross_attention_freq < 1:
        errs.append(f"qformer.cross_attention_freq={q.cross_attention_freq}: must be >= 1")
    for name in ("hidden_dropout", "attention_dropout"):
        p = getattr(q, name)
        if not 0.0 <= p < 1.0:
            errs.append(f"qformer.{name}={p}: must be in [0, 1)")
    if cfg.max_text_len > q.max_position_embeddings:
        errs.append(
            f"max_text_len={cfg.max_text_len} exceeds qformer.max_position_embeddings={q.max_position_embeddings}"
        )
    if cfg.llm is not None:
        if (cfg.llm.path is None) == (cfg.llm.hf_config is None):
            errs.append("llm: give exactly one of llm.path (a local transformers folder) or llm.hf_config (a dict)")
        if cfg.llm.dtype not in DTYPES:
            errs.append(f"llm.dtype={cfg.llm.dtype!r}: must be one of {DTYPES}")
    if cfg.temp_clamp is not None and not (0 < cfg.temp_clamp[0] < cfg.temp_clamp[1]):
        errs.append(f"temp_clamp={cfg.temp_clamp}: must be (low, high) with 0 < low < high, or None")
    return errs


# ---------------------------------------------------------------- presets
# The paper presets store the frozen ViT in bfloat16, the dtype the GPU step computes in (bf16 autocast): an fp16
# tower (LAVIS's choice under fp16 autocast) would be recast to bf16, every weight on every call, since autocast
# caches casts of trainable leaves only (cost model, stage 1 ViT-g b128 on an H200: tower 154 -> 128 ms per step).
# LAVIS's fp16 checkpoints are converted on load (copy_).
def eva_vit_g(dtype: str = "bfloat16") -> VisionConfig:
    """EVA-CLIP ViT-g/14 as BLIP-2 uses it: 39 of 40 blocks, width 1408, 16 heads of 88."""
    return VisionConfig(kind="eva", image_size=224, patch_size=14, width=1408, depth=39, heads=16,
                        mlp_hidden=6144, layer_norm_eps=1e-6, dtype=dtype)


def clip_vit_l(dtype: str = "bfloat16") -> VisionConfig:
    """OpenAI CLIP ViT-L/14 as LAVIS builds it for BLIP-2: 23 of 24 blocks, QuickGELU, no ln_post."""
    return VisionConfig(kind="clip", image_size=224, patch_size=14, width=1024, depth=23, heads=16,
                        mlp_hidden=4096, layer_norm_eps=1e-5, dtype=dtype)


def qformer_base(num_query_tokens: int = 32) -> QFormerConfig:
    """bert-base-uncased Q-Former (the paper's)."""
    return QFormerConfig(num_query_tokens=num_query_tokens)


def blip2_stage1_vit_g() -> Blip2Config:
    return Blip2Config(vision=eva_vit_g(), qformer=qformer_base())


def blip2_stage1_vit_l() -> Blip2Config:
    return Blip2Config(vision=clip_vit_l(), qformer=qformer_base())


def blip2_tiny(dtype: str = "float32") -> Blip2Config:
    """The size of LAVIS's tiny reference model (shared/reference/lavis-stage1-tiny): CPU tests and demos."""
    return Blip2Config(
        vision=VisionConfig(kind="eva", image_size=32, patch_size=8, width=48, depth=2, heads=4, mlp_hidden=192,
                            layer_norm_eps=1e-6, dtype=dtype),
        qformer=QFormerConfig(hidden_size=64, num_layers=4, num_heads=4, intermediate_size=128,
                              cross_attention_freq=2, num_query_tokens=8),
        embed_dim=32,
        max_text_len=16,
    )


PRESETS = {
    "stage1_vit_g": blip2_stage1_vit_g,
    "stage1_vit_l": blip2_stage1_vit_l,
    "tiny": blip2_tiny,
}
