"""The model of a run: a `Blip2` built from the config with every pretrained weight read from a local path.

    weights.vision   the frozen tower: an EVA / CLIP state dict file (LAVIS names, with or without the
                     "visual_encoder." prefix; extra blocks such as ViT-g's 40th are reported and dropped), or a
                     transformers folder for model.vision.kind="hf" (sets model.vision.hf_path); "random" keeps
                     the random init (then the checkpoints carry the tower, since no file can rebuild it)
    weights.bert     stage 1: the Q-Former is sized from this BERT and initialised from it (LAVIS's init)
    weights.llm      stage 2: the frozen LLM's transformers folder (sets model.llm.path)
    weights.stage1   stage 2: the stage-1 Q-Former (+ ln_vision, query tokens, and the tower when the stage-1
                     checkpoint carries it): a blip2fast run / checkpoint folder, a LAVIS .pth or a transformers
                     BLIP-2 folder

Trainable: stage 1, everything except the frozen tower; stage 2, the parts the soft prompt uses (`ln_vision`,
query tokens, the Q-Former's query path, `language_projection`). The Q-Former's text-only parts (word and
position embeddings, text FFNs, LM head) and the ITC/ITM heads are frozen in stage 2: nothing reaches them.
"""
from __future__ import annotations

import dataclasses
import os
import re
import warnings
from typing import Callable

import torch

from ..config import Blip2Config
from ..models.blip2 import Blip2
from .checkpoint import find_checkpoint, read_state_dict_file
from .config import ConfigError, TrainConfig

RANDOM = "random"
_STAGE2_FROZEN = re.compile(r"^(vision_proj|text_proj|itm_head|temp)(\.|$)|^qformer\.(lm_head|embeddings\.(word|"
                            r"position)_embeddings)\.|^qformer\.layers\.\d+\.ffn\.")


def resolve_model_config(cfg: TrainConfig, device: torch.device) -> Blip2Config:
    """The Blip2Config the run builds: local weight paths filled in, the Q-Former sized from weights.bert, and
    float32 frozen towers on a CPU (cpu_fp32)."""
    m, w = cfg.model, cfg.weights
    if m.vision.kind == "hf":
        path = w.vision if w.vision and w.vision != RANDOM else m.vision.hf_path
        if not path:
            raise ConfigError("model.vision.kind='hf' needs a transformers vision folder: --weights.vision=<folder>")
        m = m.replace(vision=dataclasses.replace(m.vision, hf_path=path))
    if cfg.stage == 1 and w.bert:
        from ..checkpoint.bert_init import qformer_config_from_bert

        q = m.qformer
        m = m.replace(qformer=qformer_config_from_bert(w.bert, num_query_tokens=q.num_query_tokens,
                                                       cross_attention_freq=q.cross_attention_freq,
                                                       hidden_dropout=q.hidden_dropout,
                                                       attention_dropout=q.attention_dropout))
    if cfg.stage == 2:
        path = w.llm or m.llm.path
        if not path:
            raise ConfigError("stage 2 needs the frozen LLM: --weights.llm=<local transformers folder> (nothing is "
                             "downloaded)")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"weights.llm={path!r} is not a folder (a transformers save_pretrained folder)")
        m = m.replace(llm=dataclasses.replace(m.llm, path=path))
    if device.type == "cpu" and cfg.cpu_fp32:
        m = m.replace(vision=dataclasses.replace(m.vision, dtype="float32"))
        if m.llm is not None:
            m = m.replace(llm=dataclasses.replace(m.llm, dtype="float32"))
    return m


def _strip(sd: dict, prefix: str) -> dict:
    if any(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def load_vision_weights(model: Blip2, path: str) -> list[str]:
    """Load an EVA / CLIP tower state dict into model.visual_encoder; returns notes (unused keys)."""
    sd = _strip(read_state_dict_file(path), "visual_encoder.")
    tower = model.visual_encoder
    expected = tower.state_dict()
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}" for k, v in sd.items()
           if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    missing = sorted(k for k in expected if k not in sd)
    if bad or missing:
        raise ValueError(f"weights.vision={path!r} does not fit model.vision ({model.config.vision.kind}, width "
                         f"{model.config.vision.width}, depth {model.config.vision.depth}): "
                         + "; ".join((["missing: " + ", ".join(missing[:8])] if missing else []) + bad[:8]))
    unused = sorted(k for k in sd if k not in expected)
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(sd[k])
    return [f"{len(unused)} unused tensors in {path} (e.g. {unused[0]})"] if unused else []


def read_stage1_weights(path: str) -> tuple[dict, str]:
    """Our-named tensors of a stage-1 model: (state dict, description of the source)."""
    if os.path.isdir(path):
        from ..checkpoint.hf import hf_state_dict_to_ours, is_hf_folder, read_hf_state_dict

        if is_hf_folder(path):
            sd, _ = hf_state_dict_to_ours(read_hf_state_dict(path))
            return sd, f"transformers folder {path}"
        ckpt = find_checkpoint(path)
        from safetensors.torch import load_file

        return load_file(os.path.join(ckpt, "model.safetensors")), f"blip2fast checkpoint {ckpt}"
    from ..checkpoint.lavis import convert_lavis_state_dict, read_lavis_state_dict

    sd, _ = convert_lavis_state_dict(read_lavis_state_dict(path))
    return sd, f"LAVIS checkpoint {path}"


def load_stage1_weights(model: Blip2, path: str, with_tower: bool) -> tuple[list[str], bool]:
    """Copy the stage-1 parts (and the frozen tower when `with_tower` and present) into a stage-2 model.
    Returns (notes, whether the tower came from it)."""
    sd, source = read_stage1_weights(path)
    state = model.state_dict()
    take = {k: v for k, v in sd.items() if k in state and not k.startswith(("language_model.",
                                                                             "language_projection."))}
    if not with_tower:
        take = {k: v for k, v in take.items() if not k.startswith("visual_encoder.")}
    bad = [f"{k}: {tuple(v.shape)} vs model {tuple(state[k].shape)}" for k, v in take.items()
           if tuple(v.shape) != tuple(state[k].shape)]
    if bad:
        raise ValueError(f"weights.stage1={path!r} ({source}) does not fit the configured model: " + "; ".join(bad[:8])
                         + " (stage 2 must use the stage-1 model's sizes)")
    needed = [k for k in state if k.startswith(("qformer.layers.", "query_tokens", "ln_vision."))
              and not _STAGE2_FROZEN.search(k)]
    missing = [k for k in needed if k not in take]
    if missing:
        raise ValueError(f"weights.stage1={path!r} ({source}) lacks stage-1 weights: {', '.join(missing[:8])}")
    with torch.no_grad():
        for k, v in take.items():
            state[k].copy_(v)
    tower = any(k.startswith("visual_encoder.") for k in take)
    return [f"stage-1 weights from {source} ({len(take)} tensors{', with the frozen tower' if tower else ''})"], tower


def set_trainable(model: Blip2, stage: int) -> None:
    """requires_grad per the module docstring (the frozen tower and LLM are frozen by the model itself)."""
    if stage == 2:
        for name, p in model.named_parameters():
            if _STAGE2_FROZEN.search(name):
                p.requires_grad_(False)


def check_weight_paths(cfg: TrainConfig, mcfg: Blip2Config) -> None:
    """Every weight the run needs is named and exists (ConfigError / FileNotFoundError naming the flag)."""
    w = cfg.weights
    if cfg.stage == 2 and not w.stage1:
        raise ConfigError("stage 2 starts from a stage-1 model: --weights.stage1=<blip2fast run or checkpoint "
                          "folder, LAVIS .pth or transformers BLIP-2 folder>")
    if mcfg.vision.kind != "hf" and not w.vision and not (cfg.stage == 2 and w.stage1):
        raise ConfigError(f"preset {cfg.preset!r}: no weights for the frozen {mcfg.vision.kind} tower; give "
                          "--weights.vision=<state dict file> (or --weights.vision=random to train on a random "
                          "tower on purpose)")
    for flag, path, folder in (("weights.vision", w.vision if mcfg.vision.kind != "hf" else "", False),
                               ("weights.bert", w.bert if cfg.stage == 1 else "", True),
                               ("weights.stage1", w.stage1 if cfg.stage == 2 else "", None)):
        if not path or path == RANDOM:
            continue
        ok = os.path.isdir(path) if folder else os.path.isfile(path) if folder is False else os.path.exists(path)
        if not ok:
            want = "a folder" if folder else "a file" if folder is False else "a file or folder"
            raise FileNotFoundError(f"--{flag}={path!r}: no such {want.split()[-1]} (give {want} on this machine; "
                                    "nothing is downloaded)")


def build_model(cfg: TrainConfig, device: torch.device, log: Callable[[str], None] = print
                ) -> tuple[Blip2, tuple, list[str]]:
    """(model on `device`, the prefixes of frozen modules that checkpoints must carry, notes for the log)."""
    check_weight_paths(cfg, cfg.model)  # before building: a paper-size model takes a while to allocate
    mcfg = resolve_model_config(cfg, device)
    w = cfg.weights
    notes: list[str] = []
    torch.manual_seed(cfg.seed)  # the random parts (and a random tower) are a function of the seed
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")
        model = Blip2(mcfg)
    tower_from_file = mcfg.vision.kind == "hf"
    if mcfg.vision.kind != "hf" and w.vision and w.vision != RANDOM:
        notes += load_vision_weights(model, w.vision)
        notes.append(f"vision tower from {w.vision}")
        tower_from_file = True
    if cfg.stage == 1 and w.bert:
        from ..checkpoint.bert_init import init_qformer_from_bert

        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            init_qformer_from_bert(model, w.bert)
        notes.append(f"Q-Former initialised from the BERT in {w.bert}")
    elif cfg.stage == 1 and cfg.data.tokenizer != "demo":
        notes.append("Q-Former: random init (the paper starts from bert-base-uncased: --weights.bert=<folder>)")
    if cfg.stage == 2:
        more, tower = load_stage1_weights(model, w.stage1, with_tower=not tower_from_file)
        notes += more
        tower_from_file = tower_from_file or tower
    if not tower_from_file:
        if w.vision != RANDOM:
            raise ConfigError(f"weights.stage1={w.stage1!r} holds no frozen tower: give --weights.vision=<state dict "
                              "file> (or --weights.vision=random to train on a random tower on purpose)")
        notes.append("frozen tower: random init (carried in the checkpoints)")
    set_trainable(model, cfg.stage)
    model.to(device)
    model.train()
    extra = () if tower_from_file else ("visual_encoder",)
    return model, extra, notes


__all__ = ["build_model", "check_weight_paths", "load_stage1_weights", "load_vision_weights", "resolve_model_config",
           "set_trainable"]
