"""The native model folder: every tensor a `Blip2` needs, whatever its towers, in blip2fast's own names.

    blip2fast_model.json   {"format": "blip2fast-model", "version": 1, "model": Blip2Config.to_dict(),
                            "preprocess": image size / resize / mean / std the tower expects,
                            "prompt": the text a stage-2 model was trained with before each caption (absent: not
                            recorded), "notes": [...]}
    model.safetensors      the state dict (blip2fast names) minus the two parts stored elsewhere:
    vision/                a transformers vision tower (vision.kind="hf"), as transformers saves it (config.json,
                           weights, and the source folder's preprocessor_config.json); EVA / CLIP towers (LAVIS
                           layout) are in model.safetensors like everything else
    tokenizer/             the Q-Former's tokenizer as a BERT tokenizer folder ([DEC] included); the demo's word
                           tokenizer is written as a vocab.txt with the same ids
    (the frozen LLM)       not copied: `model.llm.path` names its transformers folder (absolute), as at training

Why a format of our own: transformers' BLIP-2 layout holds an EVA tower only, and LAVIS's `.pth` has no config; a
run with a CLIP-layout tower, a DINOv2 / SigLIP tower or the demo tokenizer fits neither. This folder round-trips
any `Blip2` exactly (tested), and `Blip2.from_pretrained`, `python -m blip2fast.eval --model=` and
`--weights.stage1=` all read it.

The HF tower is saved as built: a tower that reads an intermediate layer (hf_feature_layer=-2, say) was cut after
that layer at load time, so the saved tower has that many blocks and the config's `hf_feature_layer` is rewritten to
its last hidden state before any final norm (the same numbers).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from typing import Any, Optional

import torch

from ..config import Blip2Config

FORMAT = "blip2fast-model"
VERSION = 1
CONFIG_FILE = "blip2fast_model.json"
WEIGHTS_FILE = "model.safetensors"
VISION_DIR = "vision"
TOKENIZER_DIR = "tokenizer"
_HF_TOWER_PREFIX = "visual_encoder.model."
_TMP = ".tmp-"


RUN_MODEL_DIR = "model"  # a training run writes its native folder here: <run>/model


def is_native_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def model_source(path: str) -> tuple[str, str]:
    """What a model path holds: ("native" | "checkpoint" | "hf" | "lavis", the folder or file to read).

    A run folder means its native folder (<run>/model) when the run wrote one, else its latest checkpoint; a
    checkpoint folder (step_*) means itself. FileNotFoundError names what was expected."""
    if os.path.isfile(path):
        return "lavis", path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    if is_native_folder(path):
        return "native", path
    if is_native_folder(os.path.join(path, RUN_MODEL_DIR)):
        return "native", os.path.join(path, RUN_MODEL_DIR)
    from .hf import is_hf_folder

    if is_hf_folder(path):
        return "hf", path
    from ..training.checkpoint import find_checkpoint

    try:
        return "checkpoint", find_checkpoint(path)
    except FileNotFoundError:
        pass
    raise FileNotFoundError(f"{path!r} holds no model: expected a blip2fast run folder (with model/ or "
                            f"checkpoints/), a model folder ({CONFIG_FILE}), a checkpoint step_* folder, a "
                            "transformers BLIP-2 folder or a LAVIS .pth file")


def read_native_meta(path: str) -> dict:
    """blip2fast_model.json, checked to be ours (ValueError naming the file otherwise)."""
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path!r} is not a blip2fast model folder (no {CONFIG_FILE})")
    try:
        with open(file, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e}): the folder was damaged; export it again") from None
    if meta.get("format") != FORMAT or not isinstance(meta.get("model"), dict):
        raise ValueError(f"{file}: format={meta.get('format')!r}, expected {FORMAT!r}")
    if int(meta.get("version", 0)) > VERSION:
        raise ValueError(f"{file}: version {meta.get('version')} is newer than this blip2fast reads ({VERSION}); "
                         "upgrade blip2fast")
    return meta


def native_config(path: str) -> Blip2Config:
    """The Blip2Config of a native folder, its tower path resolved to the folder's own `vision/`."""
    cfg = Blip2Config.from_dict(read_native_meta(path)["model"])
    if cfg.vision.kind == "hf":
        cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, hf_path=os.path.join(os.path.abspath(path),
                                                                                      VISION_DIR)))
    return cfg


# ------------------------------------------------------------------------------------------------ tokenizers
def save_qformer_tokenizer(tokenizer: Any, folder: str, config: Blip2Config) -> None:
    """The Q-Former tokenizer as a BERT tokenizer folder: a transformers tokenizer is saved as is; the demo's
    `WordTokenizer` becomes a vocab.txt giving every word, [PAD], [CLS], [SEP] and [DEC] the ids it used."""
    os.makedirs(folder, exist_ok=True)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
        return
    words = getattr(tokenizer, "words", None)
    offset = getattr(tokenizer, "word_offset", None)
    if words is None or offset is None:
        raise TypeError(f"cannot save a {type(tokenizer).__name__} as a tokenizer folder (a transformers tokenizer or "
                        "the demo's WordTokenizer)")
    q = config.qformer
    size = max(q.vocab_size, offset + len(words), q.dec_token_id + 1)
    vocab = [f"[unused{i}]" for i in range(size)]
    special = {q.pad_token_id: "[PAD]", 100: "[UNK]", q.cls_token_id: "[CLS]", q.sep_token_id: "[SEP]",
               103: "[MASK]", q.dec_token_id: "[DEC]"}
    for i, w in enumerate(words):
        vocab[offset + i] = w
    for i, tok in special.items():
        if offset <= i < offset + len(words):
            raise ValueError(f"the demo tokenizer's word ids {offset}..{offset + len(words) - 1} overlap the special "
                             f"id {i} ({tok})")
        vocab[i] = tok
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": config.max_text_len,
                   "bos_token": "[DEC]", "unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                   "sep_token": "[SEP]", "mask_token": "[MASK]"}, f, indent=1)


def has_tokenizer(folder: Optional[str]) -> bool:
    return bool(folder) and any(os.path.isfile(os.path.join(folder, n)) for n in ("vocab.txt", "tokenizer.json"))


QFORMER_TOKENIZER_HF = "qformer_tokenizer"  # inside a transformers export (its top level is the LLM's tokenizer)


def find_qformer_tokenizer(path: str) -> Optional[str]:
    """The Q-Former tokenizer folder that goes with a model path (run, native, checkpoint or transformers folder),
    or None."""
    try:
        kind, where = model_source(path)
    except FileNotFoundError:
        return None
    if kind == "native":
        run = os.path.dirname(where) if os.path.basename(where) == RUN_MODEL_DIR else where
        candidates = [os.path.join(where, TOKENIZER_DIR), os.path.join(run, TOKENIZER_DIR)]
    elif kind == "checkpoint":  # <run>/checkpoints/step_N
        candidates = [os.path.join(os.path.dirname(os.path.dirname(where)), TOKENIZER_DIR)]
    elif kind == "hf":
        candidates = [os.path.join(where, QFORMER_TOKENIZER_HF)]
        try:
            with open(os.path.join(where, "config.json"), encoding="utf-8") as f:
                if "Blip2ForImageTextRetrieval" in (json.load(f).get("architectures") or []):
                    candidates.append(where)  # a retrieval folder's own tokenizer is the Q-Former's
        except (OSError, ValueError):
            pass
    else:
        candidates = []
    return next((c for c in candidates if has_tokenizer(c)), None)


def recorded_preprocess(path: str, config: Blip2Config):
    """The pixels a model was trained with: its native folder's record, its run's config (a checkpoint), else what
    its tower asks for (data.transforms.tower_preprocess)."""
    from ..data.transforms import Preprocess, tower_preprocess

    try:
        kind, where = model_source(path)
    except FileNotFoundError:
        kind, where = None, path
    try:
        if kind == "native" and read_native_meta(where).get("preprocess"):
            return Preprocess.from_dict(read_native_meta(where)["preprocess"])
        data = _run_data_config(where) if kind == "checkpoint" else {}
        if data.get("image_mean") and data.get("image_std") and data.get("resize"):
            return Preprocess(config.vision.image_size, data["resize"], tuple(data["image_mean"]),
                              tuple(data["image_std"]), f"the run's config ({where})")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return tower_preprocess(config.vision)


def _run_data_config(where: str) -> dict:
    """The `data` section of the training config behind a checkpoint folder (its trainer.json) or a run's model/
    folder (the run's config.json beside it); {} when there is none. Raises what reading a bad file raises."""
    trainer_file = os.path.join(where, "trainer.json")
    if os.path.isfile(trainer_file):
        with open(trainer_file, encoding="utf-8") as f:
            return json.load(f)["config"]["data"]
    run_config = os.path.join(os.path.dirname(os.path.abspath(where)), "config.json")
    if os.path.isfile(run_config):
        with open(run_config, encoding="utf-8") as f:
            return json.load(f)["data"]
    return {}


def recorded_prompt(path: str) -> Optional[str]:
    """The caption prompt a stage-2 model was trained with: its native folder's record, or its run's config (a
    checkpoint, or a run's model/ written before prompts were recorded); None when nothing records one (a LAVIS or
    transformers checkpoint)."""
    try:
        kind, where = model_source(path)
    except FileNotFoundError:
        return None
    if kind not in ("native", "checkpoint"):
        return None
    try:
        prompt = read_native_meta(where).get("prompt") if kind == "native" else None
        if prompt is None:
            prompt = _run_data_config(where).get("prompt")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return prompt if isinstance(prompt, str) else None


# ------------------------------------------------------------------------------------------------ save
def _forget_stages(config_file: str) -> None:
    """A tower cut after its feature layer has fewer layers than its backbone stage list (DINOv2 & co. record
    `stage_names` / `out_features` per layer): drop them, so transformers derives them from the new depth."""
    with open(config_file, encoding="utf-8") as f:
        cfg = json.load(f)
    if any(k in cfg for k in ("stage_names", "out_features", "out_indices")):
        for k in ("stage_names", "out_features", "out_indices"):
            cfg.pop(k, None)
        with open(config_file, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)


def save_native(model, path: str, tokenizer: Any = None, tokenizer_folder: Optional[str] = None,
                preprocess: Optional[dict] = None, notes: Optional[list] = None, prompt: Optional[str] = None) -> str:
    """Write `model` as a native folder at `path`, atomically (a temp folder renamed over any old one).

    tokenizer: the Q-Former tokenizer object (transformers or the demo's), or tokenizer_folder: a folder to copy
    (e.g. the stage-1 run's, for a stage-2 model). preprocess: what the images were prepared with (recorded).
    prompt: a stage-2 model's training prompt (recorded; evaluation captions with it by default)."""
    cfg: Blip2Config = model.config
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, _TMP + os.path.basename(path))
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("language_model.")}
    saved_cfg = cfg
    if cfg.vision.kind == "hf":
        tower = model.visual_encoder
        sd = {k: v for k, v in sd.items() if not k.startswith(_HF_TOWER_PREFIX)}
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a "Writing model shards" bar in the middle of the run's log
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tower.model.save_pretrained(os.path.join(tmp, VISION_DIR))
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        _forget_stages(os.path.join(tmp, VISION_DIR, "config.json"))
        source = os.path.join(cfg.vision.hf_path or "", "preprocessor_config.json")
        if os.path.isfile(source):
            shutil.copy2(source, os.path.join(tmp, VISION_DIR, "preprocessor_config.json"))
        # the saved tower ends at the block that was read: its last hidden state before any final norm is that
        # block's output (hidden_states[blocks_run]); -1 (last_hidden_state) stays -1
        layer = cfg.vision.hf_feature_layer if tower.feature_layer == -1 or tower._mode == "hidden_states" \
            else tower.blocks_run
        saved_cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, hf_path=VISION_DIR, hf_feature_layer=layer))
    from safetensors.torch import save_file

    # tied / shared storage (none today, but safetensors refuses it): every tensor gets its own copy
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()},
              os.path.join(tmp, WEIGHTS_FILE), metadata={"format": FORMAT})
    if tokenizer is not None:
        save_qformer_tokenizer(tokenizer, os.path.join(tmp, TOKENIZER_DIR), cfg)
    elif has_tokenizer(tokenizer_folder):
        shutil.copytree(tokenizer_folder, os.path.join(tmp, TOKENIZER_DIR))
    meta = {"format": FORMAT, "version": VERSION, "model": saved_cfg.to_dict(), "preprocess": preprocess,
            "notes": list(notes or [])}
    if prompt is not None:
        meta["prompt"] = prompt
    with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.rename(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------ load
def _with_dtypes(cfg: Blip2Config, vision_dtype: Optional[str], llm_dtype: Optional[str]) -> Blip2Config:
    if vision_dtype:
        cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, dtype=vision_dtype))
    if llm_dtype and cfg.llm is not None:
        cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, dtype=llm_dtype))
    return cfg


def read_native_state_dict(path: str) -> dict:
    """The tensors of model.safetensors (no tower for an HF tower, no LLM)."""
    from safetensors.torch import load_file

    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path!r} has {CONFIG_FILE} but no {WEIGHTS_FILE}: the folder is incomplete; export "
                                "it again")
    return load_file(file)


def load_native(cls, path: str, config: Optional[Blip2Config] = None, vision_dtype: Optional[str] = None,
                llm_dtype: Optional[str] = None):
    """`cls(config)` with every tensor of the folder loaded. config: None = the folder's (the usual case; the
    dtypes still apply). The LLM is built from `llm.path`; a missing LLM folder is a FileNotFoundError naming it.
    Any missing, unexpected or mis-shaped tensor is a ValueError: a native folder is exact."""
    path = os.path.abspath(path)
    cfg = _with_dtypes(config or native_config(path), vision_dtype, llm_dtype)
    if cfg.llm is not None and cfg.llm.path and not os.path.isdir(cfg.llm.path):
        raise FileNotFoundError(f"the model in {path!r} uses the frozen LLM at llm.path={cfg.llm.path!r}, which is not "
                                f"a folder on this machine: put the LLM there, or edit model.llm.path in "
                                f"{os.path.join(path, CONFIG_FILE)}")
    sd = read_native_state_dict(path)
    model = cls(cfg)
    expected = {k: v for k, v in model.state_dict().items()
                if not k.startswith("language_model.") and not (cfg.vision.kind == "hf" and k.startswith(
                    _HF_TOWER_PREFIX))}
    missing = sorted(set(expected) - set(sd))
    unknown = sorted(set(sd) - set(expected))
    bad = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
           if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unknown or bad:
        parts = ([f"missing {', '.join(missing[:6])}"] if missing else []) + (
            [f"unexpected {', '.join(unknown[:6])}"] if unknown else []) + bad[:6]
        raise ValueError(f"{path!r} does not fit its own config ({'; '.join(parts)}); was {CONFIG_FILE} edited? "
                         "export the model again")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(sd[k])
    return model


__all__ = ["CONFIG_FILE", "QFORMER_TOKENIZER_HF", "RUN_MODEL_DIR", "find_qformer_tokenizer", "model_source", "recorded_preprocess", "recorded_prompt", "TOKENIZER_DIR", "VISION_DIR", "has_tokenizer", "is_native_folder", "load_native",
           "native_config", "read_native_meta", "read_native_state_dict", "save_native", "save_qformer_tokenizer"]
