"""The frozen LLM of stage 2: any transformers causal LM (OPT, Llama-style, ...) or a T5/FlanT5 encoder-decoder.

Built from a local folder or a config dict (never a hub name), frozen (eval mode, no weight gradients; gradients
still flow *through* it to the soft prompt) and stored in half precision by default. transformers is imported
here only, lazily, so `import blip2fast` stays cheap.

T5/FlanT5 use the tanh-approximated GELU ("gated-gelu" maps to gelu_new); the paper (and LAVIS) force the exact
GELU. `exact_gelu=True` does that here; a checkpoint we save spells it `gelu_python` (exact, erf-based), a name
transformers keeps as is on reload (it rewrites plain "gated-gelu" back to the approximation).
"""
from __future__ import annotations

import inspect
import os
from typing import Any

from torch import nn

from ..config import LLMConfig

T5_EXACT_GELU = "gelu"  # what our model runs (torch's exact GELU)
T5_EXACT_GELU_SAVED = "gelu_python"  # the same function under a name transformers does not rewrite on reload


def load_llm_config(cfg: LLMConfig) -> Any:
    """The transformers config of the LLM, with the exact-GELU rule applied."""
    from transformers import AutoConfig

    if cfg.path is not None:
        if not os.path.isfile(os.path.join(cfg.path, "config.json")):
            raise FileNotFoundError(f"llm.path={cfg.path!r} holds no config.json: give a local folder saved by "
                                    "transformers (save_pretrained) with the LLM's weights")
        hf_cfg = AutoConfig.from_pretrained(cfg.path, local_files_only=True)
    else:
        d = dict(cfg.hf_config)
        if "model_type" not in d:
            raise ValueError("llm.hf_config needs 'model_type' (e.g. 'opt', 'llama', 't5')")
        hf_cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    if cfg.exact_gelu and hf_cfg.model_type in ("t5", "mt5", "umt5") and "gelu" in str(hf_cfg.dense_act_fn):
        hf_cfg.dense_act_fn = T5_EXACT_GELU
    return hf_cfg


def build_llm(cfg: LLMConfig, dtype) -> nn.Module:
    """The LLM with weights from `cfg.path`, or randomly initialised from `cfg.hf_config`."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    hf_cfg = load_llm_config(cfg)
    auto = AutoModelForSeq2SeqLM if hf_cfg.is_encoder_decoder else AutoModelForCausalLM
    if cfg.path is not None:
        return auto.from_pretrained(cfg.path, config=hf_cfg, dtype=dtype, local_files_only=True)
    return auto.from_config(hf_cfg, dtype=dtype)


def is_encoder_decoder(llm: nn.Module) -> bool:
    return bool(getattr(llm.config, "is_encoder_decoder", False))


def input_width(llm: nn.Module) -> int:
    """Width of the LLM's input embeddings: what the soft prompt must have (OPT-350m's differs from hidden_size)."""
    return llm.get_input_embeddings().embedding_dim


def takes_logits_to_keep(llm: nn.Module) -> bool:
    """Whether the causal LM can restrict its head to given positions (transformers' `logits_to_keep`)."""
    return "logits_to_keep" in inspect.signature(llm.forward).parameters
