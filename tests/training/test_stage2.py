"""Stage 2 end to end: a short stage-1 run, then stage 2 from its checkpoint with a tiny OPT-style and a tiny
T5-style LLM (random transformers models saved to a folder with a word-level tokenizer), through the demo shards,
checkpoints, a resume and the transformers export."""
from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from blip2fast.config import LLMConfig
from blip2fast.training import checkpoint as ckpt
from blip2fast.training.config import WeightsConfig, demo_model
from blip2fast.training.trainer import Trainer
from tests.training.conftest import tiny_config


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, demo_cache):
    run_dir = tmp_path_factory.mktemp("stage1") / "run"
    out = Trainer(tiny_config(run_dir, steps=4, every=4), print_fn=lambda s: None).fit()
    assert out["step"] == 4
    return str(run_dir)


def stage2_config(run_dir, llm_dir, stage1, steps=6, lr=3e-3):
    cfg = tiny_config(run_dir, steps=steps, every=3, batch=4)
    model = demo_model().replace(llm=LLMConfig(path="", dtype="float32", max_text_len=12))
    return cfg.replace(stage=2, model=model, weights=WeightsConfig(vision="random", llm=llm_dir, stage1=stage1),
                       optim=dataclasses.replace(cfg.optim, lr=lr))


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_stage2_trains_resumes_and_exports(tmp_path, stage1_run, llm_folders, kind):
    lines = []
    cfg = stage2_config(tmp_path / "run", llm_folders[kind], stage1_run)
    trainer = Trainer(cfg, print_fn=lines.append)
    model = trainer.model
    assert model.config.llm.path == llm_folders[kind]
    # the stage-1 Q-Former (and its random tower, which the stage-1 checkpoint carried) were loaded
    s1 = ckpt.load_checkpoint(ckpt.latest_checkpoint(stage1_run), 0, 1)["model"]
    for name in ("query_tokens", "qformer.layers.0.cross_attn.key.weight", "visual_encoder.blocks.0.attn.qkv.weight",
                 "ln_vision.weight"):
        assert torch.equal(model.state_dict()[name], s1[name]), name
    # trainable: exactly what the soft prompt uses; everything trainable gets a gradient
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "language_projection.weight" in trainable and "query_tokens" in trainable
    assert not any(n.startswith(("language_model.", "visual_encoder.", "vision_proj", "text_proj", "itm_head",
                                 "qformer.lm_head", "qformer.embeddings.word")) or ".ffn." in n for n in trainable)
    batch = next(iter(trainer.loader))
    assert set(batch) >= {"pixel_values", "input_ids", "attention_mask", "labels"}
    out = trainer.step_module(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["labels"])
    out[0].backward()
    no_grad = sorted(n for n, p in model.named_parameters() if p.requires_grad and p.grad is None)
    assert not no_grad, no_grad
    trainer.optimizer.zero_grad(set_to_none=True)

    result = Trainer(stage2_config(tmp_path / "run2", llm_folders[kind], stage1_run),
                     print_fn=lines.append).fit()
    assert result["step"] == 6
    losses = [r["loss"] for r in result["history"]]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert "export" not in result  # tiny_config turns the end-of-run export off; on request below

    # resume from the step-3 checkpoint of a longer run and export on request (export_only)
    cfg = stage2_config(tmp_path / "run2", llm_folders[kind], stage1_run, steps=8)
    cfg = cfg.replace(checkpoint=dataclasses.replace(cfg.checkpoint, resume="latest"))
    resumed = Trainer(cfg, print_fn=lines.append)
    assert resumed.step == 6
    out = resumed.fit()
    assert out["step"] == 8 and out["start_step"] == 6
    cfg = cfg.replace(checkpoint=dataclasses.replace(cfg.checkpoint, export_only=True))
    exported = Trainer(cfg, print_fn=lines.append).fit()["export"]
    assert os.path.isfile(os.path.join(exported, "config.json"))
    assert any(f.endswith(".safetensors") for f in os.listdir(exported))
