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
from typing import Callable, Optional

import torch

from ..config import Blip2Config
from ..models.blip2 import Blip2
from .checkpoint import find_checkpoint, load_model_tensors, read_json, read_state_dict_file
from .config import ConfigError, TrainConfig

RANDOM = "random"
_STAGE2_FROZEN = re.compile(r"^(vision_proj|text_proj|itm_head|temp)(\.|$)|^qformer\.(lm_head|embeddings\.(word|"
                            r"position)_embeddings)\.|^qformer\.layers\.\d+\.ffn\.")


# ------------------------------------------------------------------------------------------------ paths
def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path)) if path and path != RANDOM else path


def _absolute_urls(urls: str) -> str:
    """Each "::"-joined local pattern made absolute; remote ones (scheme://, pipe:) are left as they are."""
    if not urls:
        return urls
    return "::".join(u if ("://" in u or u.startswith("pipe:")) else _absolute(u) for u in urls.split("::"))


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with every local path made absolute, so the run's config.json (and what is loaded from it later, from
    any working directory) names the same files."""
    w, m, d, e = cfg.weights, cfg.model, cfg.data, cfg.eval
    w = dataclasses.replace(w, vision=_absolute(w.vision), bert=_absolute(w.bert), llm=_absolute(w.llm),
                            stage1=_absolute(w.stage1))
    if m.vision.hf_path:
        m = m.replace(vision=dataclasses.replace(m.vision, hf_path=_absolute(m.vision.hf_path)))
    if m.llm is not None and m.llm.path:
        m = m.replace(llm=dataclasses.replace(m.llm, path=_absolute(m.llm.path)))
    tok = d.tokenizer if d.tokenizer in ("", "demo") else _absolute(d.tokenizer)
    d = dataclasses.replace(d, urls=_absolute_urls(d.urls), tokenizer=tok)
    e = dataclasses.replace(e, urls=_absolute_urls(e.urls))
    c = cfg.checkpoint
    c = dataclasses.replace(c, dir=_absolute(c.dir) if c.dir else c.dir)
    return cfg.replace(weights=w, model=m, data=d, eval=e, checkpoint=c)


# ------------------------------------------------------------------------------------------------ stage 1 -> 2
def stage1_model_config(path: str) -> Optional[Blip2Config]:
    """The Blip2Config a stage-1 model was trained with (cheap: JSON only), or None where the source does not say
    (a LAVIS .pth, or a checkpoint written before the resolved config was recorded)."""
    from ..checkpoint.native import model_source, native_config

    kind, folder = model_source(path)
    if kind == "native":
        return native_config(folder)
    if kind == "checkpoint":
        state = read_json(os.path.join(folder, "trainer.json"))
        return Blip2Config.from_dict(state["model_config"]) if state.get("model_config") else None
    if kind == "hf":
        from ..checkpoint.hf import blip2_config_from_hf, read_hf_config

        return blip2_config_from_hf(read_hf_config(folder), with_llm=False)
    return None


# what stage 2 may set differently from the stage-1 model (the rest are sizes and must agree)
_FREE = {"vision": ("dtype",), "qformer": ("hidden_dropout", "attention_dropout"), "": ()}
_TOP_SIZES = ("embed_dim", "ln_vision_eps", "max_text_len")


def adopt_stage1_config(cfg: TrainConfig, stage1: Optional[Blip2Config]) -> Blip2Config:
    """Stage 2's model config with the tower, the Q-Former and the ITC sizes of the stage-1 model it starts from.
    A field the command line changed from the preset must equal the stage-1 model's: otherwise a ConfigError naming
    each such flag (raised before any large model is loaded). Free fields (dtypes, dropout) keep what was asked."""
    from .config import PRESETS

    m = cfg.model
    if stage1 is None:
        return m
    base = PRESETS[cfg.preset]().model if cfg.preset in PRESETS else None
    clashes: list[str] = []

    def merge(section: str, ours, theirs, preset_part):
        changes = {}
        for f in dataclasses.fields(ours):
            mine, s1 = getattr(ours, f.name), getattr(theirs, f.name)
            asked = preset_part is not None and getattr(preset_part, f.name) != mine
            if f.name in _FREE[section]:
                changes[f.name] = mine if asked else s1
                continue
            if asked and mine != s1 and not (f.name == "hf_path" and section == "vision"):
                clashes.append(f"--model.{section}.{f.name}={mine} (the stage-1 model has {s1})")
            changes[f.name] = s1
        return dataclasses.replace(ours, **changes)

    vision = merge("vision", m.vision, stage1.vision, base.vision if base else None)
    if stage1.vision.kind == "hf" and m.vision.kind == "hf" and m.vision.hf_path:
        vision = dataclasses.replace(vision, hf_path=m.vision.hf_path)  # the same tower from another folder
    qformer = merge("qformer", m.qformer, stage1.qformer, base.qformer if base else None)
    top = {}
    for name in _TOP_SIZES:
        mine, s1 = getattr(m, name), getattr(stage1, name)
        if base is not None and getattr(base, name) != mine and mine != s1:
            clashes.append(f"--model.{name}={mine} (the stage-1 model has {s1})")
        top[name] = s1
    if clashes:
        raise ConfigError(f"--weights.stage1={cfg.weights.stage1!r} is a model of other sizes than this run asks for: "
                          + "; ".join(clashes) + " -- drop those flags: stage 2 takes the tower and Q-Former sizes "
                          "from the stage-1 model")
    return m.replace(vision=vision, qformer=qformer, **top)


def _tower_side(cfg: TrainConfig, vision) -> int:
    """A transformers tower's input side: its preprocessor_config.json's, unless --model.vision.image_size changed
    the preset's value (then that flag's)."""
    from ..data.transforms import read_preprocessor_config
    from .config import PRESETS

    base = PRESETS[cfg.preset]().model.vision.image_size if cfg.preset in PRESETS else None
    found = read_preprocessor_config(vision.hf_path) if os.path.isdir(vision.hf_path or "") else None
    if found is None or not found["size"] or (base is not None and vision.image_size != base):
        return vision.image_size
    return int(found["size"])


def resolve_preprocess(cfg: TrainConfig, mcfg: Blip2Config):
    """(cfg with data.image_mean / image_std / resize filled in, the Preprocess): the tower's own
    (data.transforms.tower_preprocess), each value replaced by its flag where one was given."""
    from ..data.transforms import RESIZE_MODES, Preprocess, tower_preprocess

    tower = tower_preprocess(mcfg.vision)
    d = cfg.data
    if d.resize and d.resize not in RESIZE_MODES:
        raise ConfigError(f"--data.resize={d.resize!r}: use one of {', '.join(RESIZE_MODES)} (or leave it empty for the "
                          "tower's own)")
    for name, value in (("image_mean", d.image_mean), ("image_std", d.image_std)):
        if value is not None and (len(value) != 3 or (name == "image_std" and min(value) <= 0)):
            raise ConfigError(f"--data.{name}={','.join(map(str, value))}: three comma-separated values (R,G,B)"
                              + (", each > 0" if name == "image_std" else ""))
    flags = [n for n, v in (("image_mean", d.image_mean), ("image_std", d.image_std), ("resize", d.resize)) if v]
    pre = Preprocess(mcfg.vision.image_size, d.resize or tower.resize, tuple(d.image_mean or tower.mean),
                     tuple(d.image_std or tower.std),
                     tower.source + (f", with --data.{', --data.'.join(flags)}" if flags else ""))
    data = dataclasses.replace(d, image_mean=pre.mean, image_std=pre.std, resize=pre.resize)
    return cfg.replace(data=data), pre


def _stage2_model(cfg: TrainConfig) -> Blip2Config:
    """cfg.model with the stage-1 model's sizes (`adopt_stage1_config`); a source that cannot be read is a
    ConfigError naming --weights.stage1."""
    path = cfg.weights.stage1
    if not os.path.exists(path):
        return cfg.model  # check_weight_paths names the flag
    try:
        stage1 = stage1_model_config(path)
    except (FileNotFoundError, ValueError, KeyError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"--weights.stage1={path!r}: {e}") from None
    return adopt_stage1_config(cfg, stage1)


def resolve_model_config(cfg: TrainConfig, device: torch.device) -> Blip2Config:
    """The Blip2Config the run builds: local weight paths filled in, the Q-Former sized from weights.bert (stage 1)
    or taken from the stage-1 model (stage 2, `adopt_stage1_config`), and float32 frozen towers on a CPU
    (cpu_fp32)."""
    m, w = cfg.model, cfg.weights
    if cfg.stage == 2 and w.stage1:
        m = _stage2_model(cfg)
    if m.vision.kind == "hf":
        path = w.vision if w.vision and w.vision != RANDOM else m.vision.hf_path
        if not path:
            raise ConfigError("model.vision.kind='hf' needs a transformers vision folder: --weights.vision=<folder>")
        m = m.replace(vision=dataclasses.replace(m.vision, hf_path=path))
        if not (cfg.stage == 2 and w.stage1):  # stage 2 keeps the stage-1 model's side
            m = m.replace(vision=dataclasses.replace(m.vision, image_size=_tower_side(cfg, m.vision)))
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
        from ..checkpoint.native import model_source, read_native_state_dict

        kind, folder = model_source(path)
        if kind == "native":  # an HF tower is in its vision/ folder, which the stage-2 config points at
            return read_native_state_dict(folder), f"blip2fast model folder {folder}"
        if kind == "hf":
            from ..checkpoint.hf import hf_state_dict_to_ours, read_hf_state_dict

            sd, _ = hf_state_dict_to_ours(read_hf_state_dict(folder))
            return sd, f"transformers folder {folder}"
        from safetensors.torch import load_file

        return load_file(os.path.join(folder, "model.safetensors")), f"blip2fast checkpoint {folder}"
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
        raise ConfigError(f"--weights.stage1={path!r} ({source}) does not fit the configured model: "
                          + "; ".join(bad[:8]) + " (stage 2 must use the stage-1 model's sizes: give the "
                          "--model.qformer.* / --model.vision.* values it was trained with)")
    needed = [k for k in state if k.startswith(("qformer.layers.", "query_tokens", "ln_vision."))
              and not _STAGE2_FROZEN.search(k)]
    missing = [k for k in needed if k not in take]
    if missing:
        raise ConfigError(f"--weights.stage1={path!r} ({source}) lacks stage-1 weights: {', '.join(missing[:8])} (give "
                          "a stage-1 model: a blip2fast run or model folder, a LAVIS .pth or a transformers BLIP-2 "
                          "folder)")
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
    if mcfg.vision.kind == "hf":
        folder = w.vision if w.vision and w.vision != RANDOM else mcfg.vision.hf_path
        if folder and not os.path.isdir(folder):
            raise FileNotFoundError(f"--weights.vision={folder!r}: no such folder (a transformers vision model folder "
                                    "on this machine; nothing is downloaded)")
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


def _stage1_vision_file(path: str) -> str:
    """The tower file a stage-1 blip2fast run read (its recorded weights.vision), or "" (none, or not a run)."""
    from ..checkpoint.native import model_source

    try:
        kind, folder = model_source(path)
        if kind != "checkpoint":
            return ""
        vision = read_json(os.path.join(folder, "trainer.json"))["config"]["weights"]["vision"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return ""
    return vision if vision and vision != RANDOM and os.path.isfile(vision) else ""


def _assemble(cfg: TrainConfig, mcfg: Blip2Config, bert_init: bool) -> tuple[Blip2, bool, list[str]]:
    """Blip2(mcfg) with the tower, BERT init (stage 1, if asked) and stage-1 weights (stage 2) loaded; returns
    (model on the CPU, whether the tower came from a file, notes)."""
    w = cfg.weights
    notes: list[str] = []
    torch.manual_seed(cfg.seed)  # the random parts (and a random tower) are a function of the seed
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")
        try:
            model = Blip2(mcfg)
        except (ValueError, FileNotFoundError) as e:
            if "HF vision tower" not in str(e) and "hf_feature_layer" not in str(e):
                raise
            # the folder is not a usable vision tower: the flag that named it and the loader's reason, one line
            raise ConfigError(f"--weights.vision={mcfg.vision.hf_path!r}: {' '.join(str(e).split())}") from None
    tower_from_file = mcfg.vision.kind == "hf"
    if tower_from_file:
        notes.append(f"vision tower: transformers folder {mcfg.vision.hf_path}")
    if mcfg.vision.kind != "hf" and w.vision and w.vision != RANDOM:
        notes += load_vision_weights(model, w.vision)
        notes.append(f"vision tower from {w.vision}")
        tower_from_file = True
    if cfg.stage == 1 and w.bert and bert_init:
        from ..checkpoint.bert_init import init_qformer_from_bert

        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            init_qformer_from_bert(model, w.bert)
        notes.append(f"Q-Former initialised from the BERT in {w.bert}")
    elif cfg.stage == 1 and cfg.data.tokenizer != "demo" and bert_init:
        notes.append("Q-Former: random init (the paper starts from bert-base-uncased: --weights.bert=<folder>)")
    if cfg.stage == 2:
        more, tower = load_stage1_weights(model, w.stage1, with_tower=not tower_from_file)
        notes += more
        tower_from_file = tower_from_file or tower
    return model, tower_from_file, notes


def build_model(cfg: TrainConfig, device: torch.device, log: Callable[[str], None] = print
                ) -> tuple[Blip2, tuple, list[str]]:
    """(model on `device`, the prefixes of frozen modules that checkpoints must carry, notes for the log)."""
    # before building (a paper-size model takes a while to allocate): the paths, and stage 2's sizes against the
    # stage-1 model's
    check_weight_paths(cfg, _stage2_model(cfg) if cfg.stage == 2 and cfg.weights.stage1 else cfg.model)
    mcfg = resolve_model_config(cfg, device)
    w = cfg.weights
    if cfg.stage == 2 and not w.vision and mcfg.vision.kind != "hf":
        file = _stage1_vision_file(w.stage1)  # the stage-1 run's own tower file, when its checkpoint lacks it
        if file:
            cfg = cfg.replace(weights=dataclasses.replace(w, vision=file))
            w = cfg.weights
    model, tower_from_file, notes = _assemble(cfg, mcfg, bert_init=True)
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


def model_from_checkpoint(path: str, vision_dtype: Optional[str] = None, llm_dtype: Optional[str] = None) -> Blip2:
    """The model of a blip2fast checkpoint (a step_* folder, or a run folder's latest), in eval mode on the CPU:
    the run's config (trainer.json), its tower and stage-1 weights from the paths it recorded, then the checkpoint's
    tensors. Needs those paths to exist still; a run's native folder (<run>/model) needs nothing else."""
    folder = find_checkpoint(path)
    state = read_json(os.path.join(folder, "trainer.json"))
    try:
        cfg = TrainConfig.from_dict(state["config"])
    except KeyError:
        raise ValueError(f"{folder}/trainer.json has no config: not a blip2fast training checkpoint") from None
    cpu = torch.device("cpu")
    mcfg = Blip2Config.from_dict(state["model_config"]) if state.get("model_config") else \
        resolve_model_config(cfg, cpu)
    if vision_dtype:
        mcfg = mcfg.replace(vision=dataclasses.replace(mcfg.vision, dtype=vision_dtype))
    if llm_dtype and mcfg.llm is not None:
        mcfg = mcfg.replace(llm=dataclasses.replace(mcfg.llm, dtype=llm_dtype))
    for name in ("vision", "stage1"):
        p = getattr(cfg.weights, name)
        if p and p != RANDOM and not os.path.exists(p):
            raise FileNotFoundError(f"{folder} was trained with weights.{name}={p!r}, which is gone: loading a "
                                    "checkpoint needs it; the run's native folder (<run>/model, written at the end) "
                                    "does not")
    from safetensors.torch import load_file

    model, _, _ = _assemble(cfg, mcfg, bert_init=False)
    set_trainable(model, cfg.stage)
    load_model_tensors(model, load_file(os.path.join(folder, "model.safetensors")), folder)
    return model.eval()


__all__ = ["absolute_paths", "adopt_stage1_config", "build_model", "resolve_preprocess", "check_weight_paths", "load_stage1_weights",
           "load_vision_weights", "model_from_checkpoint", "resolve_model_config", "set_trainable",
           "stage1_model_config"]
