"""Initialise the Q-Former from a pre-trained BERT in a local folder, the way LAVIS does (`init_Qformer`).

A transformers BERT folder (`config.json` plus `model.safetensors`, sharded safetensors with
`model.safetensors.index.json`, or `pytorch_model.bin`) gives:

    embeddings       word embeddings -> the first V rows (row V, `[DEC]`, keeps its fresh normal(0, 0.02) init),
                     position embeddings, embedding LayerNorm
    every layer      self-attention (query/key/value, output dense, LayerNorm), text FFN (intermediate/output),
                     and the query FFN (`ffn_query`) as a *copy* of the text FFN
    LM head          `cls.predictions.*` when the folder has it (BertForMaskedLM / BertForPreTraining): transform
                     dense + LayerNorm, bias (extended by a zero for `[DEC]`); the decoder stays tied to the word
                     embeddings
    stays fresh      cross-attention (its key/value read the image width, which BERT never saw)
    unused           token_type_embeddings, pooler, cls.seq_relationship (reported by name)

BERT names are LAVIS's Q-Former names without the `Qformer.` prefix, so the name mapping is
`checkpoint/lavis.py`'s table; nothing here repeats it.

Nothing here imports transformers: config.json and the tokenizer files are read as plain JSON / text.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..config import Blip2Config, QFormerConfig, VisionConfig
from .lavis import _LAYER_RE, _REDUNDANT, lavis_key_to_ours

__all__ = [
    "BertInitReport",
    "blip2_config_with_bert",
    "init_qformer_from_bert",
    "qformer_config_from_bert",
    "read_bert_config",
    "read_bert_state_dict",
]

_DEFAULT_SPECIAL = {"pad": ("[PAD]", 0), "cls": ("[CLS]", 101), "sep": ("[SEP]", 102)}
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
             "max_position_embeddings")
# Non-persistent buffers that older transformers versions saved; they carry nothing.
_BUFFERS = {"embeddings.position_ids", "embeddings.token_type_ids"}
_WORD = "qformer.embeddings.word_embeddings.weight"
_LM_BIAS = "qformer.lm_head.bias"


@dataclass
class BertInitReport:
    """What `init_qformer_from_bert` did. Names are blip2fast names (`qformer.*`) except `unused` (the folder's)."""

    path: str
    files: list[str]  # weight files read
    loaded: list[str]  # Q-Former parameters now holding BERT values (`ffn_query.*` included: copies of `ffn.*`)
    unused: list[str]  # folder keys with no Q-Former counterpart (token_type_embeddings, pooler, seq_relationship)
    fresh: list[str]  # Q-Former parameters left at their fresh initialisation (cross-attention, LM head if absent)
    partial: dict[str, str] = field(default_factory=dict)  # parameters only partly from BERT: which rows

    def summary(self) -> str:
        lines = [f"initialised the Q-Former from BERT at {self.path!r}: {len(self.loaded)} parameters loaded"]
        if self.unused:
            lines.append("unused BERT keys: " + ", ".join(self.unused))
        if self.fresh:
            lines.append("left at their fresh initialisation: " + ", ".join(self.fresh))
        for name, what in self.partial.items():
            lines.append(f"{name}: {what}")
        return "\n  ".join(lines)


# ---------------------------------------------------------------- reading the folder
def _check_folder(path: str) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no BERT folder at {path!r} (expected a local folder saved by transformers' "
                                "save_pretrained: config.json + model.safetensors or pytorch_model.bin)")
    return path


def _read_json(file: str) -> Any:
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def read_bert_config(path: str) -> dict:
    """The folder's config.json as a dict, checked: a post-LN BERT with exact GELU and absolute positions."""
    path = _check_folder(path)
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json in the BERT folder {path!r}")
    cfg = _read_json(file)
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"{file!r} lacks {', '.join(missing)}: not a BERT config")
    model_type = cfg.get("model_type", "bert")
    if model_type != "bert":
        raise ValueError(f"{file!r} has model_type={model_type!r}: only BERT ('bert') can initialise the Q-Former "
                         "(other encoders differ in position offsets, normalisation or names)")
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{file!r} has hidden_act={act!r}: the Q-Former's FFN and LM head use exact GELU "
                         "(hidden_act='gelu'), so this BERT's weights would compute something else")
    pos = cfg.get("position_embedding_type", "absolute")
    if pos not in (None, "absolute"):
        raise ValueError(f"{file!r} has position_embedding_type={pos!r}: the Q-Former has absolute positions only")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError(f"{file!r}: hidden_size={cfg['hidden_size']} is not divisible by "
                         f"num_attention_heads={cfg['num_attention_heads']}")
    return cfg


def _token_text(value: Any) -> Optional[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _tokenizer_vocab(path: str) -> tuple[dict[str, str], dict[str, int]]:
    """(special token texts by role, token -> id) from whichever tokenizer files the folder has."""
    texts = {role: text for role, (text, _) in _DEFAULT_SPECIAL.items()}
    vocab: dict[str, int] = {}
    vocab_txt = os.path.join(path, "vocab.txt")
    if os.path.isfile(vocab_txt):
        with open(vocab_txt, encoding="utf-8") as f:
            for i, line in enumerate(f):
                vocab.setdefault(line.rstrip("\n"), i)
    tok_json = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tok_json):
        tok = _read_json(tok_json)
        model_vocab = (tok.get("model") or {}).get("vocab")
        if isinstance(model_vocab, dict):
            vocab.update({k: int(v) for k, v in model_vocab.items()})
        for added in tok.get("added_tokens") or []:
            if isinstance(added, dict) and "content" in added and "id" in added:
                vocab[added["content"]] = int(added["id"])
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        tc = _read_json(file)
        for role in texts:
            text = _token_text(tc.get(f"{role}_token"))
            if text is not None:
                texts[role] = text
        for tid, added in (tc.get("added_tokens_decoder") or {}).items():
            text = _token_text(added)
            if text is not None:
                vocab[text] = int(tid)
    return texts, vocab


def _special_ids(path: str, cfg: dict, given: frozenset = frozenset()) -> dict[str, int]:
    """pad/cls/sep ids: the tokenizer files first (the data loader tokenises with them), then config.json's
    `<role>_token_id`, then bert-base-uncased's 0/101/102."""
    texts, vocab = _tokenizer_vocab(path)
    V = cfg["vocab_size"]
    ids, defaulted = {}, []
    for role, (_, default) in _DEFAULT_SPECIAL.items():
        if f"{role}_token_id" in given:  # the caller overrides it
            continue
        from_cfg = cfg.get(f"{role}_token_id")
        if texts[role] in vocab:
            ids[role], source = vocab[texts[role]], "the tokenizer files"
            if from_cfg is not None and from_cfg != ids[role]:
                warnings.warn(f"{path!r}: the tokenizer has {texts[role]}={ids[role]} but config.json has "
                              f"{role}_token_id={from_cfg}; using the tokenizer's", stacklevel=3)
        elif from_cfg is not None:
            ids[role], source = int(from_cfg), "config.json"
        else:
            ids[role], source = default, None
        if not 0 <= ids[role] < V:
            if source is not None:
                raise ValueError(f"{path!r}: {role} token id {ids[role]} (from {source}) is outside the "
                                 f"vocabulary of {V}")
            defaulted.append(f"{role}={ids[role]}")
    if defaulted:
        # A tokenizer-less folder (e.g. a tiny random test BERT): keep bert-base-uncased's ids, but say so.
        warnings.warn(f"{path!r}: neither tokenizer files nor config.json give these special token ids, and the "
                      f"defaults {', '.join(defaulted)} are outside its vocabulary of {V}; pass e.g. cls_token_id=... "
                      "to qformer_config_from_bert with the ids the data loader uses", stacklevel=3)
    return ids


def qformer_config_from_bert(path: str, num_query_tokens: int = 32, cross_attention_freq: int = 2,
                             **overrides: Any) -> QFormerConfig:
    """A QFormerConfig sized like the BERT in the local folder `path` (any width/depth, e.g. MiniLM's 384 x 6).

    The vocabulary is BERT's plus `[DEC]` (dec_token_id = BERT's vocab size). pad/cls/sep ids come from the
    tokenizer files or config.json when present (else 0/101/102). `overrides` replace any QFormerConfig field
    (e.g. hidden_dropout=0.0)."""
    cfg = read_bert_config(path)
    ids = _special_ids(os.fspath(path), cfg, frozenset(overrides))
    fields = dict(
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        intermediate_size=cfg["intermediate_size"],
        cross_attention_freq=cross_attention_freq,
        num_query_tokens=num_query_tokens,
        vocab_size=cfg["vocab_size"] + 1,
        max_position_embeddings=cfg["max_position_embeddings"],
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
        hidden_dropout=cfg.get("hidden_dropout_prob", 0.1),
        attention_dropout=cfg.get("attention_probs_dropout_prob", 0.1),
        **{f"{role}_token_id": i for role, i in ids.items()},
        dec_token_id=cfg["vocab_size"],
    )
    known = {f.name for f in dataclasses.fields(QFormerConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown QFormerConfig field(s) {unknown}; known: {sorted(known)}")
    fields.update(overrides)
    return QFormerConfig(**fields)


def blip2_config_with_bert(bert_path: str, vision: Optional[VisionConfig] = None, **kw: Any) -> Blip2Config:
    """A Blip2Config whose Q-Former is sized from the BERT at `bert_path`. `kw` holds Blip2Config fields
    (embed_dim, max_text_len, ...) and QFormerConfig fields (num_query_tokens, cross_attention_freq, dropouts, ...);
    `vision` defaults to the paper's EVA ViT-g."""
    blip_fields = {f.name for f in dataclasses.fields(Blip2Config)} - {"vision", "qformer"}
    blip_kw = {k: v for k, v in kw.items() if k in blip_fields}
    q_kw = {k: v for k, v in kw.items() if k not in blip_fields}
    qcfg = qformer_config_from_bert(bert_path, **q_kw)
    return Blip2Config(vision=vision if vision is not None else VisionConfig(), qformer=qcfg, **blip_kw)


def read_bert_state_dict(path: str) -> tuple[dict, list[str]]:
    """(state dict, files read) from model.safetensors, sharded safetensors (model.safetensors.index.json),
    pytorch_model.bin or a sharded .bin (pytorch_model.bin.index.json), in that order of preference."""
    path = _check_folder(path)

    def shards(index_name: str) -> list[str]:
        index = _read_json(os.path.join(path, index_name))
        files = sorted(set((index.get("weight_map") or {}).values()))
        if not files:
            raise ValueError(f"{os.path.join(path, index_name)!r} has an empty weight_map")
        for f in files:
            if not os.path.isfile(os.path.join(path, f)):
                raise FileNotFoundError(f"shard {f!r} listed in {index_name} is missing from {path!r}")
        return files

    def load_st(files: list[str]) -> dict:
        from safetensors.torch import load_file

        sd = {}
        for f in files:
            sd.update(load_file(os.path.join(path, f), device="cpu"))
        return sd

    def load_bin(files: list[str]) -> dict:
        sd = {}
        for f in files:
            obj = torch.load(os.path.join(path, f), map_location="cpu", weights_only=True)
            if not isinstance(obj, dict):
                raise ValueError(f"{os.path.join(path, f)!r} does not hold a state dict")
            sd.update(obj)
        return sd

    if os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
        return load_st(files), files
    if os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        files = shards("model.safetensors.index.json")
        return load_st(files), files
    if os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        files = ["pytorch_model.bin"]
        return load_bin(files), files
    if os.path.isfile(os.path.join(path, "pytorch_model.bin.index.json")):
        files = shards("pytorch_model.bin.index.json")
        return load_bin(files), files
    raise FileNotFoundError(f"no BERT weights in {path!r}: expected model.safetensors, model.safetensors.index.json "
                            "or pytorch_model.bin")


# ---------------------------------------------------------------- mapping BERT keys onto the Q-Former
def _normalise_key(key: str) -> str:
    """Drop the `bert.` prefix (BertForMaskedLM / BertForPreTraining) and rename the original release's
    LayerNorm `gamma`/`beta` to `weight`/`bias`."""
    if key.startswith("bert."):
        key = key[len("bert."):]
    if "LayerNorm." in key:
        key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
    return key


def _as_lavis(key: str) -> str:
    """LAVIS's Q-Former is `Qformer.bert.*` (the encoder) and `Qformer.cls.*` (the LM head)."""
    return "Qformer." + key if key.startswith("cls.") else "Qformer.bert." + key


def _targets(lavis_key: str) -> list[str]:
    """Our parameter names a LAVIS-style key initialises: the text FFN also initialises the query FFN."""
    ours = lavis_key_to_ours(lavis_key)
    if ours is None or not ours.startswith("qformer."):
        return []
    out = [ours]
    m = _LAYER_RE.match(lavis_key)
    if m:
        part = m.group(2)
        for text_part in ("intermediate.", "output."):
            if part.startswith(text_part):  # `attention.output.*` does not start with "output."
                query_key = (f"Qformer.bert.encoder.layer.{m.group(1)}."
                             f"{text_part[:-1]}_query.{part[len(text_part):]}")
                query = lavis_key_to_ours(query_key)
                if query is not None:
                    out.append(query)
    return out


def _layer_count(keys) -> int:
    ids = {int(m.group(1)) for k in keys for m in [_LAYER_RE.match(_as_lavis(k))] if m}
    return max(ids) + 1 if ids else 0


def init_qformer_from_bert(model, path: str) -> BertInitReport:
    """Copy the BERT in the local folder `path` into `model.qformer` (a Blip2, or a QFormer itself) as LAVIS does.

    Sizes must match the model's Q-Former config (build it with `qformer_config_from_bert`); a mismatch is a
    ValueError naming each key with both shapes, raised before any parameter changes. Returns a BertInitReport
    and emits one warning naming the unused folder keys and the parameters left at their fresh initialisation.
    """
    qformer = getattr(model, "qformer", model)
    qcfg: QFormerConfig = qformer.cfg
    path = _check_folder(path)
    bert_cfg = read_bert_config(path)
    raw, files = read_bert_state_dict(path)

    sd, original = {}, {}  # normalised key -> tensor / the folder's own key (reports use the folder's names)
    for k, v in raw.items():
        n = _normalise_key(k)
        if n in sd:
            raise ValueError(f"{path!r} holds both {original[n]!r} and {k!r}: ambiguous BERT weights")
        sd[n], original[n] = v, k
    # Newer checkpoints may keep the LM bias only as the (tied) decoder bias.
    if "cls.predictions.bias" not in sd and "cls.predictions.decoder.bias" in sd:
        sd["cls.predictions.bias"] = sd.pop("cls.predictions.decoder.bias")
        original["cls.predictions.bias"] = original.pop("cls.predictions.decoder.bias")

    errors = []
    if bert_cfg["num_attention_heads"] != qcfg.num_heads:
        errors.append(f"heads: config.json num_attention_heads={bert_cfg['num_attention_heads']} vs model "
                      f"num_heads={qcfg.num_heads}")
    n_bert = _layer_count(sd)
    if n_bert != qcfg.num_layers:
        errors.append(f"layers: the folder has {n_bert} encoder layers, the model {qcfg.num_layers}")
    eps = bert_cfg.get("layer_norm_eps", 1e-12)
    notes = []
    if eps != qcfg.layer_norm_eps:
        notes.append(f"config.json layer_norm_eps={eps} but the model uses {qcfg.layer_norm_eps}")

    params = {"qformer." + n: p for n, p in qformer.named_parameters()}
    plan: list[tuple[str, str, torch.Tensor]] = []  # (our name, folder key, tensor)
    unused = []
    for key, value in sd.items():
        lavis_key = _as_lavis(key)
        if key in _BUFFERS or lavis_key in _REDUNDANT:
            if key == "cls.predictions.decoder.weight" and "embeddings.word_embeddings.weight" in sd:
                if not torch.equal(value, sd["embeddings.word_embeddings.weight"]):
                    notes.append("cls.predictions.decoder.weight differs from the word embeddings (untied in the "
                                 "folder); the Q-Former ties its LM decoder to the word embeddings, as LAVIS does")
            continue
        # token_type_embeddings: HF BERT adds token_type_embeddings[token_type_ids] (row 0 for single
        # sentences) to every word + position embedding; LAVIS's Q-Former has no token types and simply drops
        # this tensor, so a BERT's row 0 is lost rather than folded into the position embeddings. We follow
        # LAVIS (the paper's model) and report it as unused.
        targets = _targets(lavis_key)
        if not targets:
            unused.append(original[key])
            continue
        for ours in targets:
            if ours not in params:
                if n_bert == qcfg.num_layers:  # layer-count mismatches are already reported once above
                    errors.append(f"{original[key]}: maps to {ours}, which the model does not have")
                continue
            want = tuple(params[ours].shape)
            got = tuple(value.shape)
            if ours in (_WORD, _LM_BIAS):  # the model's vocabulary is BERT's + [DEC]
                ok = len(got) == len(want) and got[1:] == want[1:] and got[0] <= want[0]
            else:
                ok = got == want
            if not ok:
                errors.append(f"{original[key]}: folder {got} vs model {ours} {want}")
            plan.append((ours, key, value))
    if errors:
        raise ValueError(f"the BERT at {path!r} does not match the model's Q-Former config:\n  "
                         + "\n  ".join(errors)
                         + "\nBuild the model with qformer_config_from_bert(path) (or blip2_config_with_bert) "
                           "so the sizes agree.")

    loaded, partial = [], {}
    with torch.no_grad():
        for ours, key, value in plan:
            p = params[ours]
            value = value.to(device=p.device, dtype=p.dtype)
            if ours in (_WORD, _LM_BIAS) and value.shape[0] < p.shape[0]:
                n = value.shape[0]
                p[:n].copy_(value)
                if ours == _LM_BIAS:
                    p[n:].zero_()  # the [DEC] logit starts with zero bias
                    partial[ours] = f"entries 0..{n - 1} from BERT, {n}..{p.shape[0] - 1} zero ([DEC])"
                else:  # the [DEC] row keeps its fresh normal(0, 0.02) initialisation, as in LAVIS
                    partial[ours] = f"rows 0..{n - 1} from BERT, {n}..{p.shape[0] - 1} fresh ([DEC])"
            else:
                p.copy_(value)
            loaded.append(ours)
    loaded = sorted(set(loaded), key=list(params).index)
    fresh = [n for n in params if n not in set(loaded)]
    unused.sort()

    report = BertInitReport(path=path, files=files, loaded=loaded, unused=unused, fresh=fresh, partial=partial)
    message = report.summary()
    if notes:
        message += "\n  " + "\n  ".join(notes)
    warnings.warn(message, stacklevel=2)
    return report
