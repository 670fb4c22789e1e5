"""Any transformers vision model in a local folder as the frozen BLIP-2 image tower (``VisionConfig.kind="hf"``).

``HFVisionTower(cfg)`` loads ``cfg.hf_path`` offline (``local_files_only=True``). A folder holding a
two-tower model (``CLIPModel``, ``SiglipModel``: its config has a ``vision_config``) loads only the vision
sub-model class (``CLIPVisionModel``, ``SiglipVisionModel``); a plain vision model (``Dinov2Model``, ...)
loads as itself. The forward returns ``hidden_states[cfg.hf_feature_layer]`` of that model, or its
``last_hidden_state`` when ``hf_feature_layer == -1``.

Speed: for an intermediate layer (e.g. BLIP-2's ``-2``) the blocks after it are removed at load time and
the layer's output is read by a forward hook, so the tower neither runs the unused blocks nor keeps
every hidden state. Where the block list cannot be found unambiguously, it falls back to
``output_hidden_states=True`` (same numbers, more work).

Only ``cfg.image_size``, ``cfg.hf_path``, ``cfg.hf_feature_layer`` and ``cfg.dtype`` (the dtype the
weights load in) are read; width, patch size and depth come from the model's own config.
transformers is imported inside functions only.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Optional, Tuple

import torch
from torch import nn

from blip2fast._hf import load_pretrained
from blip2fast.config import VisionConfig
from blip2fast.models.vision import check_pixel_values

__all__ = ["HFVisionTower", "load_hf_vision_model"]

# Embedding parameters that each add one token in front of the patch tokens.
_PREFIX_TOKEN_PARAMS = ("class_embedding", "cls_token", "distillation_token")


def _pair(v: Any) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def load_hf_vision_model(path: Optional[str], dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Load the vision model stored in a local transformers folder (the vision half of a two-tower model).

    Raises FileNotFoundError for a missing folder or one without ``config.json``, and ValueError when the
    folder holds something that is not a vision model or lacks the vision weights; each message names
    the path and what was found there.
    """
    if not path:
        raise ValueError("HFVisionTower needs VisionConfig.hf_path: a local folder saved by transformers")
    path = os.fspath(path)
    if not os.path.isdir(path):
        what = "a file" if os.path.exists(path) else "nothing"
        raise FileNotFoundError(f"HF vision tower folder {path!r} does not exist (found {what} at that path)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        found = sorted(os.listdir(path))
        raise FileNotFoundError(
            f"HF vision tower folder {path!r} has no config.json, so it is not a transformers model folder; "
            f"found {found[:20]}{' ...' if len(found) > 20 else ''}"
        )

    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        config = load_pretrained(AutoConfig, path)
    except Exception as e:  # unknown model_type, malformed json, ...
        raise ValueError(f"HF vision tower folder {path!r}: transformers cannot read its config.json ({e})") from e
    sub = getattr(config, "vision_config", None)
    sub = sub if sub is not None else config
    found = f"model_type={config.model_type!r} ({type(config).__name__}"
    found += f", vision_config model_type={sub.model_type!r})" if sub is not config else ")"
    try:
        cls = MODEL_MAPPING[type(sub)]
    except KeyError:
        raise ValueError(
            f"HF vision tower folder {path!r} holds {found}, for which transformers has no AutoModel class; "
            "expected a vision model such as CLIP, SigLIP or Dinov2"
        ) from None
    if getattr(cls, "main_input_name", None) != "pixel_values":
        raise ValueError(
            f"HF vision tower folder {path!r} holds {found}: {cls.__name__} takes "
            f"{getattr(cls, 'main_input_name', None)!r}, not pixel_values, so it is not a vision model"
        )

    kwargs: dict = dict(config=sub, output_loading_info=True)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if getattr(cls, "_supports_sdpa", False):
        kwargs["attn_implementation"] = "sdpa"
    model, info = load_pretrained(cls, path, **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(
            f"HF vision tower folder {path!r} holds {found}, but its weights lack {len(missing)} tensors of "
            f"{cls.__name__} (e.g. {missing[:5]}); refusing to run a partly random tower"
        )
    return model


def _find_block_list(model: nn.Module, num_layers: int) -> Optional[Tuple[nn.Module, str, nn.ModuleList]]:
    """The ModuleList of the encoder's blocks (``encoder.layers`` / ``encoder.layer``), or None if ambiguous."""
    block_cls = (getattr(model, "_can_record_outputs", None) or {}).get("hidden_states")
    found = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) != num_layers or num_layers == 0:
            continue
        kinds = {type(m) for m in mod}
        if len(kinds) != 1:
            continue
        if isinstance(block_cls, type) and not issubclass(next(iter(kinds)), block_cls):
            continue
        parent_name, _, attr = name.rpartition(".")
        found.append((model.get_submodule(parent_name) if parent_name else model, attr, mod))
    return found[0] if len(found) == 1 else None


class HFVisionTower(nn.Module):
    """A transformers vision model as an image tower: pixels (B, C, S, S) -> tokens (B, seq_len, out_width).

    Attributes: ``model`` (the transformers module), ``out_width`` (its hidden size), ``seq_len`` (tokens
    out at ``cfg.image_size``: patches + CLS/distillation tokens + register tokens: CLIP 1 + patches,
    SigLIP patches, Dinov2 1 + patches (+ registers)), ``feature_layer`` (= cfg.hf_feature_layer),
    ``blocks_run`` (encoder blocks actually executed).
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.kind != "hf":
            raise ValueError(f"HFVisionTower needs a VisionConfig with kind='hf'; got kind={cfg.kind!r}")
        self.cfg = cfg
        self.model = load_hf_vision_model(cfg.hf_path, getattr(torch, cfg.dtype) if cfg.dtype else None)
        hc = self.model.config

        self.out_width = int(hc.hidden_size)
        self.num_channels = int(getattr(hc, "num_channels", 3))
        self.image_size = int(cfg.image_size)
        ph, pw = _pair(hc.patch_size)
        self.num_patches = (self.image_size // ph) * (self.image_size // pw)
        self.num_prefix_tokens = self._count_prefix_tokens()
        self.seq_len = self.num_patches + self.num_prefix_tokens

        # Inputs at another size than the checkpoint's: ask for position interpolation where the model
        # takes the flag (CLIP, SigLIP); Dinov2 always interpolates.
        self._forward_kwargs: dict = {}
        native = getattr(hc, "image_size", None)
        if native is not None and _pair(native) != (self.image_size, self.image_size):
            if "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters:
                self._forward_kwargs["interpolate_pos_encoding"] = True

        self.feature_layer = int(cfg.hf_feature_layer)
        self._setup_feature_layer(int(hc.num_hidden_layers))

    # ------------------------------------------------------------ setup helpers
    def _count_prefix_tokens(self) -> int:
        emb = getattr(self.model, "embeddings", None)
        if emb is None:
            emb = getattr(getattr(self.model, "vision_model", None), "embeddings", None)
        n = 0
        if emb is not None:
            n += sum(1 for p in _PREFIX_TOKEN_PARAMS if getattr(emb, p, None) is not None)
            reg = getattr(emb, "register_tokens", None)
            if isinstance(reg, torch.Tensor):
                n += reg.shape[-2] if reg.dim() >= 2 else 0
                return n
        return n + int(getattr(self.model.config, "num_register_tokens", 0) or 0)

    def _setup_feature_layer(self, num_layers: int) -> None:
        idx = self.feature_layer
        self._mode = "last"
        self._captured: Optional[torch.Tensor] = None
        self.blocks_run = num_layers
        if idx == -1:
            return
        if not -(num_layers + 1) <= idx <= num_layers:
            raise ValueError(
                f"hf_feature_layer={idx} is out of range for {type(self.model).__name__} with {num_layers} "
                f"layers (hidden_states has {num_layers + 1} entries: -{num_layers + 1}..{num_layers})"
            )
        keep = idx if idx >= 0 else num_layers + 1 + idx  # hidden_states[keep] = output of block keep-1
        found = _find_block_list(self.model, num_layers) if 0 < keep < num_layers else None
        if found is None:
            self._mode = "hidden_states"
            return
        parent, attr, blocks = found
        setattr(parent, attr, nn.ModuleList(list(blocks)[:keep]))
        if hasattr(self.model.config, "num_hidden_layers"):
            self.model.config.num_hidden_layers = keep
        getattr(parent, attr)[keep - 1].register_forward_hook(self._capture_hook)
        self._mode = "hook"
        self.blocks_run = keep

    def _capture_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self._captured = output[0] if isinstance(output, (tuple, list)) else output

    # ------------------------------------------------------------ forward
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        check_pixel_values(pixel_values, self.image_size, self.num_channels)
        pixel_values = pixel_values.to(next(self.model.parameters()).dtype)
        if self._mode == "last":
            return self.model(pixel_values=pixel_values, **self._forward_kwargs).last_hidden_state
        if self._mode == "hidden_states":
            out = self.model(pixel_values=pixel_values, output_hidden_states=True, **self._forward_kwargs)
            return out.hidden_states[self.feature_layer]
        self._captured = None
        try:
            self.model(pixel_values=pixel_values, **self._forward_kwargs)
            feats = self._captured
        finally:
            self._captured = None
        if feats is None:
            raise RuntimeError("HFVisionTower: the feature-layer hook did not fire")
        return feats
