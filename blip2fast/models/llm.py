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
from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor, nn

from .._hf import load_pretrained
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
        hf_cfg = load_pretrained(AutoConfig, cfg.path)
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
        return load_pretrained(auto, cfg.path, config=hf_cfg, dtype=dtype)
    return auto.from_config(hf_cfg, dtype=dtype)


def is_encoder_decoder(llm: nn.Module) -> bool:
    return bool(getattr(llm.config, "is_encoder_decoder", False))


def input_width(llm: nn.Module) -> int:
    """Width of the LLM's input embeddings: what the soft prompt must have (OPT-350m's differs from hidden_size)."""
    return llm.get_input_embeddings().embedding_dim


def takes_logits_to_keep(llm: nn.Module) -> bool:
    """Whether the causal LM can restrict its head to given positions (transformers' `logits_to_keep`)."""
    return "logits_to_keep" in inspect.signature(llm.forward).parameters


# ---------------------------------------------------------------------------------------------------------------
# The output layer apart from the trunk, for the fused head + loss of stage 2 (ops.linear_cross_entropy): the
# (tokens, vocabulary) logits are never materialised.

# model_type -> the submodule (attribute path) whose last_hidden_state <Arch>ForCausalLM.forward passes to its
# lm_head (read in transformers 5.17). Their forwards do nothing else to the logits, except the scalings that
# `output_head` reads from the config (Cohere's logit_scale, Granite's logits_scaling) and Gemma-2's final
# soft-capping, which the fused path cannot express (tanh(z / c) c is not linear in z). Any other model type takes
# the logits path of stage2_loss.
CAUSAL_TRUNKS = {
    "opt": "model.decoder",  # OPTForCausalLM calls the decoder directly (final norm and project_out inside it)
    "llama": "model", "mistral": "model", "mixtral": "model", "qwen2": "model", "qwen3": "model",
    "gemma": "model", "gemma2": "model", "phi": "model", "phi3": "model", "cohere": "model", "granite": "model",
    "gpt2": "transformer", "gpt_neox": "gpt_neox",
}
SEQ2SEQ_FUSED = ("t5",)  # T5 / FlanT5: encoder and decoder stacks, optional d_model**-0.5 before the lm_head


@dataclass
class OutputHead:
    """logits = (hidden * scale) @ weight^T + bias: what the LLM computes from its last hidden states."""

    weight: Tensor  # (V, D), the output layer's (frozen) weight, tied to the input embeddings where the model ties
    bias: Optional[Tensor]  # (V,) or None (OPT, Llama, T5 have none; Phi has one)
    scale: Optional[float]  # None = 1. T5's d_model**-0.5 (tied embeddings) multiplies the hidden states; Cohere's
    #                         logit_scale and Granite's 1 / logits_scaling multiply the logits of a bias-free head,
    #                         which is the same thing


def output_head(llm: nn.Module) -> Optional[OutputHead]:
    """The LLM's output layer when `trunk_hidden_states` + `OutputHead` reproduce its logits exactly, else None
    (an unknown architecture, final logit soft-capping, a head that is not a plain Linear): the caller then
    materialises the logits through the model's own forward."""
    cfg = llm.config
    head = llm.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return None
    kind = cfg.model_type
    if is_encoder_decoder(llm):
        if kind not in SEQ2SEQ_FUSED:
            return None
        # transformers 5.x names the rule scale_decoder_outputs; earlier versions tied it to tie_word_embeddings
        rescale = getattr(cfg, "scale_decoder_outputs", getattr(cfg, "tie_word_embeddings", True))
        return OutputHead(head.weight, head.bias, cfg.d_model ** -0.5 if rescale else None)
    if kind not in CAUSAL_TRUNKS or getattr(cfg, "final_logit_softcapping", None) is not None:
        return None
    scale = None
    if kind == "cohere":
        scale = float(cfg.logit_scale)
    elif kind == "granite":
        scale = 1.0 / float(cfg.logits_scaling)
    if scale is not None and head.bias is not None:
        return None  # a logit scale does not commute with a bias
    return OutputHead(head.weight, head.bias, scale)


def trunk_hidden_states(llm: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor,
                        decoder_input_ids: Optional[Tensor] = None) -> Tensor:
    """The last hidden states the LLM's output layer reads: (B, L, D) over every input position for a causal LM
    (a type in CAUSAL_TRUNKS), (B, L_dec, D) over the decoder positions for T5 (`decoder_input_ids` required),
    before any scaling. Only for LLMs that `output_head` accepts."""
    if is_encoder_decoder(llm):
        if decoder_input_ids is None:
            raise ValueError("an encoder-decoder LLM needs decoder_input_ids")
        encoded = llm.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        return llm.decoder(input_ids=decoder_input_ids, encoder_hidden_states=encoded,
                           encoder_attention_mask=attention_mask, use_cache=False).last_hidden_state
    trunk = llm
    for name in CAUSAL_TRUNKS[llm.config.model_type].split("."):
        trunk = getattr(trunk, name)
    return trunk(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
