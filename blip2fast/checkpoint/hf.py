"""transformers BLIP-2 folders (what `save_pretrained` writes) <-> blip2fast.

Two transformers layouts share the vision tower, `query_tokens` and the Q-Former's query path:

    Blip2ForImageTextRetrieval      + Q-Former text path (`embeddings.*`, text FFN `intermediate`/`output`,
                                      needs `use_qformer_text_input=True`), `vision_projection`, `text_projection`,
                                      `itm_head`
    Blip2ForConditionalGeneration   + `language_projection`, `language_model.*` (the LLM, same names as ours);
                                      no text FFN, no word embeddings, no heads

Neither keeps `temp` or the Q-Former LM head: loading leaves them freshly initialised (reported by name), saving
drops them (reported by name). Name map (ours <- transformers):

    visual_encoder.cls_token / pos_embed       vision_model.embeddings.class_embedding / position_embedding
    visual_encoder.patch_embed.proj.*          vision_model.embeddings.patch_embedding.*
    visual_encoder.blocks.N.norm1/norm2.*      vision_model.encoder.layers.N.layer_norm1/layer_norm2.*
    visual_encoder.blocks.N.attn.qkv.weight    ...layers.N.self_attn.qkv.weight
    visual_encoder.blocks.N.attn.q_bias/v_bias ...layers.N.self_attn.qkv.bias = cat(q_bias, k_bias, v_bias)
    visual_encoder.blocks.N.attn.proj.*        ...layers.N.self_attn.projection.*
    visual_encoder.blocks.N.mlp.fc1/fc2.*      ...layers.N.mlp.fc1/fc2.*
    ln_vision.*                                vision_model.post_layernorm.*
    qformer.embeddings.norm.*                  qformer.layernorm.*
    qformer.embeddings.word/position_embeddings embeddings.word/position_embeddings
    qformer.layers.N.<as in checkpoint/lavis.py, with `attention.attention.` for LAVIS's `attention.self.`>
    vision_proj / text_proj / itm_head         vision_projection / text_projection / itm_head
    language_projection, language_model.*      the same names

The k third of transformers' qkv bias is dropped on load: a key bias adds q.b_k to every score of a query row,
which softmax cancels, so the outputs are unchanged (up to rounding) whatever its value.

transformers has one `layer_norm_eps` for the vision blocks and `post_layernorm` (= our `ln_vision`); LAVIS uses
1e-6 and 1e-5. Loading sets `ln_vision_eps` to the folder's eps; saving writes the blocks' eps and warns that
`ln_vision`'s eps changes (outputs then differ by ~1e-4 relative).

transformers is imported lazily (only by the functions that need it), so importing this module is cheap.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import re
import warnings
from typing import Any, Optional, Union

import torch

from .._hf import load_pretrained
from ..config import CLIP_MEAN, CLIP_STD, Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from .keymap import rename_part, rename_state_dict
from .lavis import _LAYER_PARTS as _LAVIS_LAYER_PARTS

RETRIEVAL_ARCH = "Blip2ForImageTextRetrieval"
GENERATION_ARCH = "Blip2ForConditionalGeneration"
KINDS = {"retrieval": RETRIEVAL_ARCH, "generation": GENERATION_ARCH}
_LLM_ARCHS = (GENERATION_ARCH, "Blip2Model")  # transformers classes whose checkpoints carry `language_model.*`
IMAGE_TOKEN = "<image>"
DEFAULT_MAX_SHARD_SIZE = 5 * 1024 ** 3  # bytes per safetensors file

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PT_WEIGHTS = "pytorch_model.bin"
PT_INDEX = "pytorch_model.bin.index.json"

# transformers' defaults, for config.json files written by versions that omit default values
_HF_VISION_DEFAULTS = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                           image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True)
_HF_QFORMER_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                            attention_probs_dropout_prob=0.1, max_position_embeddings=512, layer_norm_eps=1e-12,
                            pad_token_id=0, cross_attention_frequency=2, use_qformer_text_input=False)
_T5_TYPES = ("t5", "mt5", "umt5")
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate")

# ---------------------------------------------------------------- the name table
_QF_LAYER_PARTS = {  # transformers suffix after `qformer.encoder.layer.N.` -> ours after `qformer.layers.N.`
    hf.replace("attention.self.", "attention.attention."): ours for hf, ours in _LAVIS_LAYER_PARTS.items()
}
_VIS_LAYER_PARTS = {  # transformers suffix after `vision_model.encoder.layers.N.` -> ours after `...blocks.N.`
    "layer_norm1.": "norm1.",
    "layer_norm2.": "norm2.",
    "self_attn.qkv.weight": "attn.qkv.weight",
    "self_attn.projection.": "attn.proj.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
}
_FIXED = {  # whole transformers keys -> ours
    "vision_model.embeddings.class_embedding": "visual_encoder.cls_token",
    "vision_model.embeddings.position_embedding": "visual_encoder.pos_embed",
    "vision_model.embeddings.patch_embedding.weight": "visual_encoder.patch_embed.proj.weight",
    "vision_model.embeddings.patch_embedding.bias": "visual_encoder.patch_embed.proj.bias",
    "vision_model.post_layernorm.weight": "ln_vision.weight",
    "vision_model.post_layernorm.bias": "ln_vision.bias",
    "query_tokens": "query_tokens",
    "qformer.layernorm.weight": "qformer.embeddings.norm.weight",
    "qformer.layernorm.bias": "qformer.embeddings.norm.bias",
    "embeddings.word_embeddings.weight": "qformer.embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight": "qformer.embeddings.position_embeddings.weight",
    "vision_projection.weight": "vision_proj.weight",
    "vision_projection.bias": "vision_proj.bias",
    "text_projection.weight": "text_proj.weight",
    "text_projection.bias": "text_proj.bias",
    "itm_head.weight": "itm_head.weight",
    "itm_head.bias": "itm_head.bias",
    "language_projection.weight": "language_projection.weight",
    "language_projection.bias": "language_projection.bias",
}
_FIXED_INV = {v: k for k, v in _FIXED.items()}
_REDUNDANT = {"embeddings.position_ids"}  # a buffer some versions saved
_HF_VIS_RE = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$")
_HF_QF_RE = re.compile(r"^qformer\.encoder\.layer\.(\d+)\.(.+)$")
_OUR_VIS_RE = re.compile(r"^visual_encoder\.blocks\.(\d+)\.(.+)$")
_OUR_QF_RE = re.compile(r"^qformer\.layers\.(\d+)\.(.+)$")

# our keys that only one layout has
_RETRIEVAL_ONLY = ("qformer.embeddings.word_embeddings.", "qformer.embeddings.position_embeddings.", "vision_proj.",
                   "text_proj.", "itm_head.")
_GENERATION_ONLY = ("language_projection.", "language_model.")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: must be 'retrieval' ({RETRIEVAL_ARCH}) or 'generation' ({GENERATION_ARCH})")


def hf_key_to_ours(key: str) -> Optional[str]:
    """Our name for a transformers BLIP-2 key; None for keys with no counterpart (and for the fused vision qkv bias,
    which `hf_state_dict_to_ours` splits into q_bias / v_bias)."""
    if key in _FIXED:
        return _FIXED[key]
    if key.startswith("language_model."):
        return key
    m = _HF_VIS_RE.match(key)
    if m:
        part = rename_part(_VIS_LAYER_PARTS, m.group(2))
        return None if part is None else f"visual_encoder.blocks.{m.group(1)}.{part}"
    m = _HF_QF_RE.match(key)
    if m:
        part = rename_part(_QF_LAYER_PARTS, m.group(2))
        return None if part is None else f"qformer.layers.{m.group(1)}.{part}"
    return None


def our_key_to_hf(key: str, kind: str) -> Optional[str]:
    """The transformers name of one of our keys in the `kind` layout; None when that layout has no place for it
    (`temp`, `qformer.lm_head.*`, and the other layout's parts). q_bias / v_bias map to the fused `qkv.bias`."""
    _check_kind(kind)
    if key.startswith(_RETRIEVAL_ONLY) and kind != "retrieval":
        return None
    if key.startswith(_GENERATION_ONLY) and kind != "generation":
        return None
    if key in _FIXED_INV:
        return _FIXED_INV[key]
    if key.startswith("language_model."):
        return key
    m = _OUR_VIS_RE.match(key)
    if m:
        if m.group(2) in ("attn.q_bias", "attn.v_bias"):
            return f"vision_model.encoder.layers.{m.group(1)}.self_attn.qkv.bias"
        part = rename_part(_VIS_LAYER_PARTS, m.group(2), reverse=True)
        return None if part is None else f"vision_model.encoder.layers.{m.group(1)}.{part}"
    m = _OUR_QF_RE.match(key)
    if m:
        if m.group(2).startswith("ffn.") and kind != "retrieval":
            return None  # the text FFN exists only with use_qformer_text_input=True
        part = rename_part(_QF_LAYER_PARTS, m.group(2), reverse=True)
        if part is not None:
            return f"qformer.encoder.layer.{m.group(1)}.{part}"
    return None


def hf_state_dict_to_ours(sd: dict) -> tuple[dict, list[str]]:
    """(our state dict, transformers keys with no counterpart). The fused vision qkv bias becomes q_bias / v_bias
    (its k third is dropped: softmax cancels a key bias exactly)."""
    fused, rest = {}, {}
    for k, v in sd.items():
        m = _HF_VIS_RE.match(k)
        if m and m.group(2) == "self_attn.qkv.bias":
            q_bias, _, v_bias = v.chunk(3)
            fused[f"visual_encoder.blocks.{m.group(1)}.attn.q_bias"] = q_bias
            fused[f"visual_encoder.blocks.{m.group(1)}.attn.v_bias"] = v_bias
        else:
            rest[k] = v
    ours, unused = rename_state_dict(rest, hf_key_to_ours, _REDUNDANT)
    return {**ours, **fused}, unused


def our_state_dict_to_hf(sd: dict, kind: str) -> dict:
    """Our state dict in transformers' `kind` layout ("retrieval" or "generation"). Keys that layout has no place
    for are left out (`temp`, `qformer.lm_head.*`, the other layout's parts). Tied LLM weights appear under every
    name they have; `save_hf` writes each once."""
    _check_kind(kind)
    out = {}
    for k, v in sd.items():
        m = _OUR_VIS_RE.match(k)
        if m and m.group(2) in ("attn.q_bias", "attn.v_bias"):
            if m.group(2) == "attn.q_bias":
                v_bias = sd[f"visual_encoder.blocks.{m.group(1)}.attn.v_bias"]
                out[f"vision_model.encoder.layers.{m.group(1)}.self_attn.qkv.bias"] = torch.cat(
                    [v, torch.zeros_like(v), v_bias.to(v.dtype)])
            continue
        new = our_key_to_hf(k, kind)
        if new is not None:
            out[new] = v
    return out


# ---------------------------------------------------------------- folders
def is_hf_folder(path: str) -> bool:
    """A folder written by transformers' `save_pretrained` (config.json plus weights), e.g. a BLIP-2 checkpoint."""
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        return False
    return any(os.path.isfile(os.path.join(path, f)) for f in (SAFE_WEIGHTS, SAFE_INDEX, PT_WEIGHTS, PT_INDEX))


def read_hf_config(path: str) -> dict:
    """config.json of a transformers BLIP-2 folder, checked to be one."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path!r} has no config.json: expected a folder saved by transformers' "
                                "save_pretrained (Blip2ForImageTextRetrieval or Blip2ForConditionalGeneration)")
    with open(file) as f:
        cfg = json.load(f)
    if cfg.get("model_type") != "blip-2":
        raise ValueError(f"{file}: model_type={cfg.get('model_type')!r}, expected 'blip-2' (a transformers BLIP-2 "
                         f"checkpoint; architectures={cfg.get('architectures')})")
    return cfg


def _load_weight_file(file: str) -> dict:
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(file)
    return torch.load(file, map_location="cpu", weights_only=True)


def read_hf_state_dict(path: str) -> dict:
    """All tensors of a transformers folder: model.safetensors, a sharded model.safetensors.index.json, or (old
    folders) pytorch_model.bin / pytorch_model.bin.index.json, loaded with weights_only=True."""
    single = [os.path.join(path, f) for f in (SAFE_WEIGHTS, PT_WEIGHTS)]
    for file in single:
        if os.path.isfile(file):
            return _load_weight_file(file)
    for index in (SAFE_INDEX, PT_INDEX):
        file = os.path.join(path, index)
        if not os.path.isfile(file):
            continue
        with open(file) as f:
            weight_map = json.load(f)["weight_map"]
        sd = {}
        for shard in sorted(set(weight_map.values())):
            shard_file = os.path.join(path, shard)
            if not os.path.isfile(shard_file):
                raise FileNotFoundError(f"{file} names the shard {shard!r}, which is missing from {path!r}")
            sd.update(_load_weight_file(shard_file))
        missing = sorted(set(weight_map) - set(sd))
        if missing:
            raise ValueError(f"{file} lists tensors its shards lack: {', '.join(missing)}")
        return sd
    raise FileNotFoundError(f"no weights in {path!r}: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {PT_WEIGHTS} or "
                            f"{PT_INDEX}")


# ---------------------------------------------------------------- configs
def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name}={value}: only square images/patches are supported")
        value = value[0]
    return int(value)


def _clean_text_config(text: dict) -> dict:
    """The LLM's config dict, minus bookkeeping that does not describe the model."""
    drop = ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "_commit_hash", "_attn_implementation")
    return {k: v for k, v in text.items() if k not in drop}


def _t5_runs_exact_gelu(text: dict) -> bool:
    """Whether a T5-family config runs the exact GELU (transformers maps "gated-gelu" to the tanh approximation)."""
    proj = str(text.get("feed_forward_proj", "relu"))
    act = "gelu_new" if proj == "gated-gelu" else proj.split("-")[-1]
    return act not in _TANH_GELUS


def blip2_config_from_hf(hf_config: Union[dict, Any], vision_dtype: str = "float16", llm_dtype: str = "float16",
                         with_llm: Optional[bool] = None, llm_exact_gelu: Optional[bool] = None) -> Blip2Config:
    """Our config for a transformers BLIP-2 config (the config.json dict, or a transformers Blip2Config).

    The vision tower is our "eva" layout (transformers' Blip2VisionModel is EVA-style: q/v-only qkv bias, pre-LN,
    exact GELU); `depth` = num_hidden_layers (transformers' checkpoints already hold 39 of ViT-g's 40 blocks).
    `ln_vision_eps` = the vision layer_norm_eps (transformers uses one eps for all vision LayerNorms).
    `with_llm`: whether to build the LLM (stage 2); None decides from `architectures`
    (Blip2ForConditionalGeneration / Blip2Model). `llm_exact_gelu`: for T5-family LLMs; None follows the folder
    (transformers' "gated-gelu" is the tanh approximation, so exact_gelu=False reproduces transformers' outputs).
    The Q-Former vocabulary gets a [DEC] row (id 30522) when the folder has none: a folder without the text path
    (generation) or with exactly BERT's 30522 rows. Such rows start fresh (load_hf reports them).
    """
    d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    if d.get("model_type", "blip-2") != "blip-2":
        raise ValueError(f"model_type={d.get('model_type')!r}: not a transformers BLIP-2 config")
    vc = {**_HF_VISION_DEFAULTS, **(d.get("vision_config") or {})}
    qc = {**_HF_QFORMER_DEFAULTS, **(d.get("qformer_config") or {})}
    if vc["hidden_act"] != "gelu":
        raise ValueError(f"vision_config.hidden_act={vc['hidden_act']!r}: our EVA tower runs the exact GELU ('gelu')")
    if qc["hidden_act"] != "gelu":
        raise ValueError(f"qformer_config.hidden_act={qc['hidden_act']!r}: our Q-Former runs the exact GELU ('gelu')")
    vision = VisionConfig(
        kind="eva", image_size=_square(vc["image_size"], "vision_config.image_size"),
        patch_size=_square(vc["patch_size"], "vision_config.patch_size"), width=vc["hidden_size"],
        depth=vc["num_hidden_layers"], heads=vc["num_attention_heads"], mlp_hidden=vc["intermediate_size"],
        layer_norm_eps=vc["layer_norm_eps"], dtype=vision_dtype,
    )
    dec = QFormerConfig.dec_token_id
    vocab = qc["vocab_size"]
    if not qc["use_qformer_text_input"] or vocab == dec:
        vocab = max(vocab, dec + 1)
    qformer = QFormerConfig(
        hidden_size=qc["hidden_size"], num_layers=qc["num_hidden_layers"], num_heads=qc["num_attention_heads"],
        intermediate_size=qc["intermediate_size"], cross_attention_freq=qc["cross_attention_frequency"],
        num_query_tokens=d.get("num_query_tokens", 32), vocab_size=vocab,
        max_position_embeddings=qc["max_position_embeddings"], layer_norm_eps=qc["layer_norm_eps"],
        hidden_dropout=qc["hidden_dropout_prob"], attention_dropout=qc["attention_probs_dropout_prob"],
        pad_token_id=0 if qc["pad_token_id"] is None else qc["pad_token_id"],
    )
    if with_llm is None:
        with_llm = any(a in _LLM_ARCHS for a in d.get("architectures") or [])
    llm = None
    if with_llm:
        text = _clean_text_config(d.get("text_config") or {"model_type": "opt"})  # transformers' default: OPT
        text.setdefault("model_type", "opt")
        exact = llm_exact_gelu
        if exact is None:
            exact = _t5_runs_exact_gelu(text) if text["model_type"] in _T5_TYPES else True
        llm = LLMConfig(hf_config=text, dtype=llm_dtype, exact_gelu=exact)
        if d.get("image_token_index") is not None and hasattr(llm, "image_token_index"):
            llm = dataclasses.replace(llm, image_token_index=int(d["image_token_index"]))
    return Blip2Config(
        vision=vision, qformer=qformer, llm=llm, embed_dim=d.get("image_text_hidden_size", 256),
        ln_vision_eps=vision.layer_norm_eps, max_text_len=min(Blip2Config.max_text_len,
                                                               qformer.max_position_embeddings),
    )


# ---------------------------------------------------------------- loading
def _alias_groups(model: torch.nn.Module) -> dict:
    """state-dict key -> an id shared by all keys naming the same tensor (tied weights)."""
    groups = {}
    for k, v in model.state_dict(keep_vars=True).items():
        groups[k] = (v.data_ptr(), tuple(v.shape)) if v.numel() else ("empty", k)
    return groups


def _fill_checkpoint_rows(ours: dict, expected: dict, notes: list) -> None:
    """A checkpoint's Q-Former vocabulary may lack rows our config has (the [DEC] row): keep our fresh rows."""
    key = "qformer.embeddings.word_embeddings.weight"
    if key in ours and key in expected:
        have, want = ours[key], expected[key]
        if have.dim() == 2 and have.shape[1] == want.shape[1] and have.shape[0] < want.shape[0]:
            merged = want.detach().clone()
            merged[: have.shape[0]] = have.to(merged.dtype)
            ours[key] = merged
            notes.append(f"{key} rows {have.shape[0]}..{want.shape[0] - 1} (absent from the checkpoint; "
                         f"[DEC] is id {QFormerConfig.dec_token_id})")


def load_hf(cls, path: str, config: Optional[Blip2Config] = None, strict: bool = False,
            vision_dtype: str = "float16", llm_dtype: str = "float16"):
    """Build `cls(config)` and load a transformers BLIP-2 folder into it.

    config: None derives it from config.json (`blip2_config_from_hf`; the LLM is built when the weights hold
    `language_model.*`), with the vision tower in `vision_dtype` and the LLM in `llm_dtype`.
    Keys not used and parameters left at their fresh initialisation are reported by name: a warning, or a
    ValueError with strict=True. A retrieval folder leaves `temp` and `qformer.lm_head.*` fresh (stage1_loss works);
    a generation folder also leaves the Q-Former text path (word/position embeddings, text FFN) and the
    ITC/ITM heads fresh. The folder's `image_token_index` goes to `config.llm.image_token_index` (our generate
    suppresses it; save_hf reuses it).
    """
    hf_cfg = read_hf_config(path)
    sd = read_hf_state_dict(path)
    has_llm = any(k.startswith("language_model.") for k in sd)
    if config is None:
        config = blip2_config_from_hf(hf_cfg, vision_dtype=vision_dtype, llm_dtype=llm_dtype, with_llm=has_llm)
    folder_image_token = hf_cfg.get("image_token_index")
    if (config.llm is not None and folder_image_token is not None and hasattr(config.llm, "image_token_index")
            and config.llm.image_token_index is None):
        config = config.replace(llm=dataclasses.replace(config.llm, image_token_index=int(folder_image_token)))
    if config.vision.kind != "eva":
        raise ValueError(f"config.vision.kind={config.vision.kind!r}: a transformers BLIP-2 folder holds an EVA-style "
                         "tower (vision.kind='eva')")
    ours, unused = hf_state_dict_to_ours(sd)
    if not (hf_cfg.get("vision_config") or {}).get("qkv_bias", True):  # no q/v bias at all: they are zero
        for i in range(config.vision.depth):
            for b in ("q_bias", "v_bias"):
                ours.setdefault(f"visual_encoder.blocks.{i}.attn.{b}", torch.zeros(config.vision.width))
    model = cls(config)
    expected = model.state_dict()
    notes: list = []
    _fill_checkpoint_rows(ours, expected, notes)
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
           for k, v in ours.items() if k in expected and expected[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path!r} does not match the config's sizes:\n  " + "\n  ".join(bad)
                         + "\nPass the matching config=..., or none to derive it from config.json.")
    result = model.load_state_dict(ours, strict=False)
    groups = _alias_groups(model)
    loaded = {groups[k] for k in ours if k in groups}
    fresh = [k for k in result.missing_keys if groups.get(k) not in loaded]
    if config.llm is not None and config.llm.path is not None and not has_llm:
        fresh = [k for k in fresh if not k.startswith("language_model.")]  # those came from llm.path
    problems = []
    if unused or result.unexpected_keys:
        problems.append("unused checkpoint keys: " + ", ".join(unused + list(result.unexpected_keys)))
    if fresh or notes:
        problems.append("freshly initialised (absent from the checkpoint): " + ", ".join(fresh + notes))
    if problems:
        msg = f"loading transformers folder {path!r}: " + "; ".join(problems)
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=2)
    return model


# ---------------------------------------------------------------- saving
def _parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size={size!r}: give bytes (int) or a string like '500MB', '5GB'")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}[unit]
    return int(float(m.group(1)) * scale)


def _write_safetensors(tensors: dict, path: str, max_shard_size: Union[int, str]) -> list[str]:
    """model.safetensors, or shards + model.safetensors.index.json when over max_shard_size. Returns the files."""
    from safetensors.torch import save_file

    limit = _parse_size(max_shard_size)
    for f in os.listdir(path):  # stale weights of an earlier save would confuse transformers
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json", f):
            os.remove(os.path.join(path, f))
    seen, prepared = set(), {}
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        storage = v.untyped_storage().data_ptr()
        if storage in seen and v.numel():
            v = v.clone()  # safetensors refuses tensors sharing memory
        seen.add(v.untyped_storage().data_ptr())
        prepared[k] = v
    shards, current, size = [], {}, 0
    for k, v in prepared.items():
        n = v.numel() * v.element_size()
        if current and size + n > limit:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += n
    shards.append(current)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, SAFE_WEIGHTS), metadata=meta)
        return [SAFE_WEIGHTS]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata=meta)
        names.append(name)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in prepared.values())
    with open(os.path.join(path, SAFE_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return names + [SAFE_INDEX]


def _collapse_layers(keys: list[str]) -> list[str]:
    out = []
    for k in keys:
        k = re.sub(r"\.\d+\.", ".N.", k)
        if k not in out:
            out.append(k)
    return out


def _tokenizer_files(folder: Optional[str]) -> bool:
    if not folder or not os.path.isdir(folder):
        return False
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model", "tokenizer.model")
    return any(os.path.isfile(os.path.join(folder, n)) for n in names)


def _load_tokenizer(folder: str):
    from transformers import AddedToken, AutoTokenizer

    try:
        tok = load_pretrained(AutoTokenizer, folder)
    except Exception as e:  # noqa: BLE001 - a broken tokenizer should not stop the weights from being saved
        warnings.warn(f"save_hf: could not load the tokenizer in llm.path={folder!r} ({e}); no tokenizer or "
                      "processor is saved", stacklevel=3)
        return None
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    return tok


def _param_name(module: torch.nn.Module, tensor: torch.Tensor) -> Optional[str]:
    for name, p in module.named_parameters(remove_duplicate=False):
        if p is tensor:
            return name
    return None


def _extend_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """New rows = the mean of the existing ones (the image token's output logit is then the mean of all logits:
    never above the largest, so greedy decoding never picks it even where suppress_tokens is not applied)."""
    extra = t.float().mean(dim=0, keepdim=True).to(t.dtype).expand(rows - t.shape[0], *t.shape[1:])
    return torch.cat([t, extra], dim=0)


def _image_processor(image_size: int):
    import transformers

    kwargs = dict(size={"height": image_size, "width": image_size}, image_mean=list(CLIP_MEAN),
                  image_std=list(CLIP_STD), do_convert_rgb=True)
    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, "BlipImageProcessorPil"):
        return transformers.BlipImageProcessorPil(**kwargs)
    return transformers.BlipImageProcessor(**kwargs)


def hf_blip2_config(cfg: Blip2Config, text_config: Any = None, image_token_index: Optional[int] = None,
                    qformer_text_input: bool = False) -> Any:
    """transformers' Blip2Config for our sizes: the layout `save_hf` writes (and the cost model traces)."""
    from transformers import Blip2Config as HFBlip2Config

    v, q = cfg.vision, cfg.qformer
    return HFBlip2Config(
        vision_config=dict(hidden_size=v.width, intermediate_size=v.mlp_hidden, num_hidden_layers=v.depth,
                           num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                           hidden_act="gelu", layer_norm_eps=v.layer_norm_eps, attention_dropout=0.0, qkv_bias=True),
        qformer_config=dict(vocab_size=q.vocab_size, hidden_size=q.hidden_size, num_hidden_layers=q.num_layers,
                            num_attention_heads=q.num_heads, intermediate_size=q.intermediate_size, hidden_act="gelu",
                            hidden_dropout_prob=q.hidden_dropout, attention_probs_dropout_prob=q.attention_dropout,
                            max_position_embeddings=q.max_position_embeddings, layer_norm_eps=q.layer_norm_eps,
                            pad_token_id=q.pad_token_id, cross_attention_frequency=q.cross_attention_freq,
                            encoder_hidden_size=v.width, use_qformer_text_input=qformer_text_input),
        text_config=None if text_config is None else text_config.to_dict(),
        num_query_tokens=q.num_query_tokens,
        image_text_hidden_size=cfg.embed_dim,
        image_token_index=image_token_index,
    )

def save_hf(model, path: str, kind: Optional[str] = None, max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
            image_token_index: Optional[int] = None) -> str:
    """Write `model` as a transformers BLIP-2 folder that transformers 5.x loads with no missing keys.

    kind: "retrieval" (Blip2ForImageTextRetrieval; use_qformer_text_input=True) or "generation"
    (Blip2ForConditionalGeneration; the default when model.config.llm is set). Parameters the layout has no place
    for (`temp`, `qformer.lm_head.*`; for generation also the Q-Former text path and ITC/ITM heads) are left out
    and named in a warning. Weights: model.safetensors, sharded past `max_shard_size` (bytes or "5GB"), tied LLM
    weights written once, each tensor in its own dtype.

    Generation: transformers marks the soft prompt's place with `num_query_tokens` copies of an image token. Its
    id is `image_token_index` if given, else `config.llm.image_token_index` (set when loaded from such a folder),
    else "<image>" of the LLM's tokenizer (added if absent; llm.path with tokenizer files: OPT and T5 tokenizers are
    shorter than their embeddings, so no row is added), else the LLM's embedding row count. Embeddings (and untied
    output embeddings) grow to include it; new rows are the mean row. A new output row joins the softmax: the
    saved model's LM loss differs from ours by ~1e-3 relative (none when the id is an existing row).
    generation_config.json sets `suppress_tokens` to it. With a tokenizer, the folder also gets it (with
    "<image>") and a Blip2Processor (BlipImageProcessor at the vision image size, bicubic, CLIP mean/std).
    Note: transformers 5.17's Blip2ForConditionalGeneration.generate runs `language_model.generate` with the LLM's
    own generation config, so the folder's `suppress_tokens` applies when passed
    (`generate(..., generation_config=model.generation_config)`); a mean row's logit is the mean of all logits, so
    greedy search never picks it regardless.
    """
    cfg = model.config
    kind = kind or ("generation" if cfg.llm is not None else "retrieval")
    _check_kind(kind)
    if kind == "generation" and cfg.llm is None:
        raise ValueError("kind='generation' needs a stage-2 model (config.llm set): this model has no LLM; save it "
                         "with kind='retrieval'")
    v, q = cfg.vision, cfg.qformer
    if v.kind != "eva":
        raise ValueError(f"config.vision.kind={v.kind!r}: transformers' Blip2VisionModel is the EVA layout; only "
                         "vision.kind='eva' models can be saved as a transformers BLIP-2 folder")
    if cfg.ln_vision_eps != v.layer_norm_eps:
        warnings.warn(f"save_hf: ln_vision's LayerNorm eps changes from {cfg.ln_vision_eps:g} to "
                      f"{v.layer_norm_eps:g}: transformers has one vision layer_norm_eps (blocks and post_layernorm = "
                      "ln_vision); outputs differ by ~1e-4 relative", stacklevel=2)
    os.makedirs(path, exist_ok=True)
    sd = {k: t.detach() for k, t in model.state_dict().items()}
    hf = our_state_dict_to_hf(sd, kind)
    left_out = [k for k in sd if our_key_to_hf(k, kind) is None]
    if left_out:
        warnings.warn(f"save_hf({kind!r}): not written (transformers' {KINDS[kind]} has no place for them): "
                      + ", ".join(_collapse_layers(left_out)), stacklevel=2)

    text_config, tokenizer = None, None
    if kind == "generation":
        llm = model.language_model
        prefix = "language_model."
        tied = dict(getattr(llm, "all_tied_weights_keys", None) or {})  # target -> source (transformers 5)
        for target, source in tied.items():
            if prefix + source in hf:
                hf.pop(prefix + target, None)
        seen = {}
        for k in [k for k in hf if k.startswith(prefix)]:  # any other alias: keep the first name only
            key = (hf[k].data_ptr(), tuple(hf[k].shape))
            if hf[k].numel() and key in seen:
                hf.pop(k)
            else:
                seen[key] = k
        if _tokenizer_files(cfg.llm.path):
            tokenizer = _load_tokenizer(cfg.llm.path)
        if image_token_index is None:
            image_token_index = getattr(cfg.llm, "image_token_index", None)
        if image_token_index is None and tokenizer is not None:
            image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        in_emb = llm.get_input_embeddings().weight
        rows = in_emb.shape[0]
        if image_token_index is None:
            image_token_index = rows
        text_config = copy.deepcopy(llm.config)
        if image_token_index >= rows:
            new_rows = image_token_index + 1
            names = [_param_name(llm, in_emb)]
            out = llm.get_output_embeddings()
            if out is not None and out.weight is not in_emb:
                names.append(_param_name(llm, out.weight))
                if getattr(out, "bias", None) is not None:
                    names.append(_param_name(llm, out.bias))
            for name in names:
                if name is not None and prefix + name in hf:
                    hf[prefix + name] = _extend_rows(hf[prefix + name], new_rows)
            text_config.vocab_size = new_rows
        if text_config.model_type in _T5_TYPES and str(getattr(text_config, "dense_act_fn", "")) in ("gelu",
                                                                                                     "gelu_python"):
            from ..models import llm as llm_module

            exact = getattr(llm_module, "T5_EXACT_GELU_SAVED", "gelu_python")
            gated = bool(getattr(text_config, "is_gated_act", False))
            text_config.feed_forward_proj = ("gated-" if gated else "") + exact
            text_config.dense_act_fn = exact

    hcfg = hf_blip2_config(cfg, text_config, image_token_index if kind == "generation" else None,
                           qformer_text_input=kind == "retrieval")
    hcfg.architectures = [KINDS[kind]]
    hcfg.dtype = cfg.llm.dtype if kind == "generation" else "float32"
    hcfg.save_pretrained(path)
    _write_safetensors(hf, path, max_shard_size)

    if kind == "generation":
        from transformers import GenerationConfig

        base = getattr(model.language_model, "generation_config", None)
        gen = copy.deepcopy(base) if base is not None else GenerationConfig.from_model_config(text_config)
        gen.suppress_tokens = sorted(set(gen.suppress_tokens or []) | {int(image_token_index)})
        gen.save_pretrained(path)
        if tokenizer is not None:
            from transformers import Blip2Processor

            processor = Blip2Processor(image_processor=_image_processor(v.image_size), tokenizer=tokenizer,
                                       num_query_tokens=q.num_query_tokens)
            processor.save_pretrained(path)
    return path
