"""Every weight from a local path: the frozen tower from a LAVIS file, the Q-Former from a BERT folder, stage 2 from
a LAVIS stage-1 checkpoint; real captions through the BERT tokenizer with the paper's augmentation; missing paths
are errors naming the flag, raised before a paper-size model is built."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from blip2fast.checkpoint.lavis import convert_lavis_state_dict, read_lavis_state_dict
from blip2fast.config import LLMConfig, blip2_tiny
from blip2fast.training.config import ConfigError, DataConfig, EvalConfig, WeightsConfig, parse_cli
from blip2fast.training.trainer import Trainer
from tests.helpers import LAVIS_TINY
from tests.training.conftest import tiny_config

LAVIS_PTH = os.path.join(LAVIS_TINY, "lavis_tiny.pth")
WORDS = ("a", "the", "red", "green", "blue", "big", "small", "circle", "square", "dog", "cat", "on", "grass")


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory):
    from blip2fast.data.write_shards import write_shards
    from tests.data.conftest import coco_json, make_image_folder

    root = tmp_path_factory.mktemp("real")
    names = make_image_folder(root / "images", 16)
    coco_json(root / "captions.json", names)
    summary = write_shards(str(root / "images"), str(root / "captions.json"), str(root / "shards"), shard_size=4,
                           log=lambda s: None)
    return summary["pattern"]


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = str(tmp_path_factory.mktemp("bert"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertForMaskedLM(cfg).save_pretrained(path)
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    return path


def test_stage1_from_lavis_tower_and_bert_on_real_captions(tmp_path, real_shards, bert_folder):
    base = tiny_config(tmp_path / "run", steps=3, every=3, batch=4)
    cfg = base.replace(model=blip2_tiny(dtype="bfloat16"), weights=WeightsConfig(vision=LAVIS_PTH, bert=bert_folder),
                       data=DataConfig(urls=real_shards, batch_size=4, num_workers=0, augment=True),
                       eval=EvalConfig(urls=real_shards, size=8))
    lines = []
    tr = Trainer(cfg, print_fn=lines.append)
    lavis, _ = convert_lavis_state_dict(read_lavis_state_dict(LAVIS_PTH))
    sd = tr.model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in lavis.items() if k.startswith("visual_encoder."))
    assert tr.model.config.qformer.vocab_size == len(WORDS) + 6  # sized from the BERT, plus [DEC]
    assert tr.model.config.qformer.dec_token_id == len(WORDS) + 5
    bert = __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        os.path.join(bert_folder, "model.safetensors"))
    q = next(k for k in bert if k.endswith("layer.0.attention.self.query.weight"))
    assert torch.equal(sd["qformer.layers.0.self_attn.query.weight"], bert[q])
    assert any("vision tower from" in s for s in lines) and any("initialised from the BERT" in s for s in lines)
    out = tr.fit()
    assert out["step"] == 3 and out["n"] == 8 and all(r["loss"] == r["loss"] for r in out["history"])


def test_stage2_from_a_lavis_stage1_checkpoint(tmp_path, llm_folders, demo_cache):
    base = tiny_config(tmp_path / "run", steps=2, batch=4)
    model = blip2_tiny(dtype="bfloat16").replace(llm=LLMConfig(path="", dtype="float32", max_text_len=12))
    cfg = base.replace(stage=2, model=model, weights=WeightsConfig(llm=llm_folders["opt"], stage1=LAVIS_PTH),
                       data=dataclasses.replace(base.data, tokenizer=""))
    lines = []
    tr = Trainer(cfg, print_fn=lines.append)
    lavis, _ = convert_lavis_state_dict(read_lavis_state_dict(LAVIS_PTH))
    sd = tr.model.state_dict()
    for k in ("query_tokens", "ln_vision.weight", "qformer.layers.2.cross_attn.value.weight",
              "visual_encoder.blocks.1.mlp.fc1.weight"):
        assert torch.equal(sd[k], lavis[k]), k
    assert tr.extra_prefixes == ()  # the tower came from a file: checkpoints need not carry it
    assert any("LAVIS checkpoint" in s and "with the frozen tower" in s for s in lines)
    assert tr.fit()["step"] == 2


@pytest.mark.parametrize("args,error,must_say", [
    (["--preset=stage1_vit_g"], ConfigError, ["--weights.vision", "random"]),
    (["--preset=stage1_vit_l", "--weights.vision=/nonexistent/clip.pth"], FileNotFoundError,
     ["--weights.vision='/nonexistent/clip.pth'", "nothing is downloaded"]),
    (["--preset=stage2_opt2.7b", "--weights.llm=/x"], ConfigError, ["--weights.stage1"]),
    (["--preset=stage2_flant5xl", "--weights.stage1=/nope.pth"], FileNotFoundError, ["--weights.stage1"]),
])
def test_missing_weights_are_errors_naming_the_flag(tmp_path, args, error, must_say):
    cfg = parse_cli([*args, f"--checkpoint.dir={tmp_path / 'run'}", "--device=cpu"])
    with pytest.raises(error) as e:
        Trainer(cfg, print_fn=lambda s: None)
    for s in must_say:
        assert s in str(e.value), (s, str(e.value))
