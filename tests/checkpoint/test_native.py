"""The native model folder: any Blip2 (EVA / CLIP LAVIS-layout towers, transformers towers read at the last or an
intermediate layer, with or without an LLM) saved and loaded back computes exactly what it computed before; the
demo's word tokenizer is saved as a BERT folder giving the same ids; damaged folders are one-line errors."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from blip2fast import Blip2
from blip2fast.checkpoint.native import (CONFIG_FILE, TOKENIZER_DIR, VISION_DIR, model_source, save_native,
                                         save_qformer_tokenizer)
from blip2fast.config import LLMConfig, VisionConfig, blip2_tiny

transformers = pytest.importorskip("transformers")
IMG, PATCH, WIDTH = 16, 4, 32
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _perturb_(model: torch.nn.Module, seed: int) -> None:
    """Every floating tensor moved off its initial value, so a tensor that is not loaded shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g).to(t.dtype) * 0.02)


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """Tiny random transformers vision folders (a plain one with a final LayerNorm, a two-tower one), each with a
    preprocessor_config.json asking for ImageNet statistics."""
    T = transformers
    root = tmp_path_factory.mktemp("towers")
    vis = dict(hidden_size=WIDTH, num_hidden_layers=3, num_attention_heads=4, image_size=IMG, patch_size=PATCH)
    text = dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
                max_position_embeddings=16)
    torch.manual_seed(0)
    built = {"dinov2": T.Dinov2Model(T.Dinov2Config(mlp_ratio=2, **vis)),
             "clip_full": T.CLIPModel(T.CLIPConfig(vision_config=dict(vis, intermediate_size=64), text_config=text))}
    out = {}
    for i, (name, model) in enumerate(built.items()):
        _perturb_(model, 10 + i)
        model.save_pretrained(root / name)
        (root / name / "preprocessor_config.json").write_text(json.dumps(
            {"image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 20},
             "do_center_crop": True, "crop_size": {"height": IMG, "width": IMG}, "resample": 3,
             "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}))
        out[name] = str(root / name)
    return out


def _llm_folder(root) -> str:
    from tests.training.conftest import make_llm_folder

    return make_llm_folder(str(root), "opt")


def _round_trip(model: Blip2, folder, **load) -> Blip2:
    save_native(model, str(folder))
    return Blip2.from_pretrained(str(folder), **load).eval()


def _pixels(n=3, seed=1) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _text(n=3, vocab=30523, length=7, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab - 1, (n, length), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


def _check_same(a: Blip2, b: Blip2) -> None:
    """Same tensors (the tower's too) and the same outputs, to the bit."""
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in sa.items():
        if k.startswith("language_model."):
            continue
        tail = k.split("visual_encoder.model.", 1)[-1]
        match = k if k in sb else next((n for n in sb if n.endswith(tail)), None)
        assert match is not None, k
        assert torch.equal(sb[match].float(), v.float()), k
    x = _pixels()
    ids, mask = _text(vocab=a.config.qformer.vocab_size)
    with torch.no_grad():
        assert torch.equal(a.image_embeds(x), b.image_embeds(x))
        assert torch.equal(a.itc_scores(x, ids, mask), b.itc_scores(x, ids, mask))
        assert torch.equal(a.itm_logits(x, ids, mask), b.itm_logits(x, ids, mask))


def _tiny(vision: VisionConfig):
    cfg = blip2_tiny()
    return cfg.replace(vision=vision)


@pytest.mark.parametrize("kind", ["eva", "clip"])
def test_lavis_layout_towers_round_trip(tmp_path, kind):
    vision = dataclasses.replace(blip2_tiny().vision, kind=kind, image_size=IMG, patch_size=PATCH,
                                 layer_norm_eps=1e-5 if kind == "clip" else 1e-6)
    torch.manual_seed(0)
    model = Blip2(_tiny(vision)).eval()
    _perturb_(model, 3)
    loaded = _round_trip(model, tmp_path / "m")
    assert loaded.config == model.config
    _check_same(model, loaded)


@pytest.mark.parametrize("name,layer", [("dinov2", -1), ("dinov2", -2), ("clip_full", -2), ("clip_full", 1)])
def test_transformers_towers_round_trip(tmp_path, towers, name, layer):
    vision = VisionConfig(kind="hf", hf_path=towers[name], hf_feature_layer=layer, image_size=IMG, dtype="float32")
    torch.manual_seed(0)
    model = Blip2(_tiny(vision)).eval()
    _perturb_(model.qformer, 4)
    loaded = _round_trip(model, tmp_path / "m")
    # the tower lives in the folder (the source folder could be deleted), with its preprocessing file
    assert loaded.config.vision.hf_path == str(tmp_path / "m" / VISION_DIR)
    assert os.path.isfile(tmp_path / "m" / VISION_DIR / "preprocessor_config.json")
    assert loaded.visual_encoder.blocks_run == model.visual_encoder.blocks_run
    _check_same(model, loaded)


def test_stage2_model_round_trips_and_names_its_llm(tmp_path, towers):
    llm = _llm_folder(tmp_path / "llm")
    vision = VisionConfig(kind="hf", hf_path=towers["dinov2"], hf_feature_layer=-2, image_size=IMG, dtype="float32")
    cfg = _tiny(vision).replace(llm=LLMConfig(path=llm, dtype="float32", max_text_len=8))
    torch.manual_seed(0)
    model = Blip2(cfg).eval()
    _perturb_(model.language_projection, 5)
    loaded = _round_trip(model, tmp_path / "m")
    _check_same(model, loaded)
    x = _pixels(2)
    with torch.no_grad():
        assert torch.equal(model.generate(x, max_new_tokens=4, num_beams=1, do_sample=False),
                           loaded.generate(x, max_new_tokens=4, num_beams=1, do_sample=False))
    weights = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(tmp_path / "m" /
                                                                                     "model.safetensors"))
    assert not any(k.startswith("language_model.") for k in weights)  # named by path, not copied
    meta = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    meta["model"]["llm"]["path"] = str(tmp_path / "gone")
    (tmp_path / "m" / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError) as e:
        Blip2.from_pretrained(str(tmp_path / "m"))
    assert "gone" in str(e.value) and "llm.path" in str(e.value) and "\n" not in str(e.value)


def test_demo_tokenizer_saves_as_a_bert_folder_with_the_same_ids(tmp_path):
    from blip2fast.data.synthetic import SCENES
    from blip2fast.data.tokenize import Stage1Text, load_bert_tokenizer
    from blip2fast.training.config import demo_model
    from blip2fast.training.data import demo_tokenizer

    cfg = demo_model()
    words = demo_tokenizer(cfg)
    save_qformer_tokenizer(words, str(tmp_path / "tok"), cfg)
    bert = load_bert_tokenizer(str(tmp_path / "tok"))
    captions = [s.caption() for s in SCENES]
    ours, theirs = Stage1Text(words, cfg.max_text_len)(captions), Stage1Text(bert, cfg.max_text_len)(captions)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert Stage1Text(bert, cfg.max_text_len).dec_token_id == cfg.qformer.dec_token_id
    assert len(bert) == cfg.qformer.vocab_size


def test_damaged_folders_are_one_line_errors(tmp_path):
    torch.manual_seed(0)
    model = Blip2(blip2_tiny()).eval()
    save_native(model, str(tmp_path / "m"))
    assert model_source(str(tmp_path / "m")) == ("native", str(tmp_path / "m"))
    sd = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(tmp_path / "m" / "model.safetensors"))
    sd.pop("query_tokens")
    __import__("safetensors.torch", fromlist=["save_file"]).save_file(sd, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        Blip2.from_pretrained(str(tmp_path / "m"))
    assert "query_tokens" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "m" / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError) as e:
        Blip2.from_pretrained(str(tmp_path / "m"))
    assert CONFIG_FILE in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        model_source(str(tmp_path))  # a folder holding no model
    assert "holds no model" in str(e.value)


def test_tokenizer_object_is_saved_in_the_folder(tmp_path):
    from blip2fast.training.config import demo_model
    from blip2fast.training.data import demo_tokenizer

    cfg = demo_model().replace(vision=dataclasses.replace(demo_model().vision, dtype="float32", image_size=IMG,
                                                          patch_size=PATCH))
    torch.manual_seed(0)
    model = Blip2(cfg).eval()
    model.save_pretrained(str(tmp_path / "m"), kind="native", tokenizer=demo_tokenizer(cfg))
    assert os.path.isfile(tmp_path / "m" / TOKENIZER_DIR / "vocab.txt")
    _check_same(model, Blip2.from_pretrained(str(tmp_path / "m")).eval())
