"""What a run leaves behind is usable as it is: a stage-1 run with a transformers vision tower writes its model
folder and tokenizer; `python -m blip2fast.eval` reads the run folder, its model folder and a checkpoint; stage 2
starts from the run with no size flags (the Q-Former and tower come from it) and captions; a size flag that
contradicts the stage-1 model is one line, before the LLM is loaded."""
from __future__ import annotations

import dataclasses
import json
import os
import warnings

import pytest
import torch

from blip2fast.config import VisionConfig
from blip2fast.training import checkpoint as ckpt
from blip2fast.training.config import ConfigError, WeightsConfig, parse_cli
from blip2fast.training.trainer import Trainer
from tests.training.conftest import tiny_config

transformers = pytest.importorskip("transformers")
IMG = 32  # the demo shards' image size


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    """A tiny random DINOv2 folder (a final LayerNorm, ImageNet statistics in its preprocessor_config.json)."""
    folder = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    model = transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=48, num_hidden_layers=3,
                                                               num_attention_heads=4, mlp_ratio=2, image_size=IMG,
                                                               patch_size=8))
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": IMG}, "crop_size": {"height": IMG,
         "width": IMG}, "do_center_crop": True, "image_mean": [0.485, 0.456, 0.406],
         "image_std": [0.229, 0.224, 0.225]}))
    return str(folder)


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory, demo_cache, tower):
    run_dir = tmp_path_factory.mktemp("s1") / "run"
    cfg = tiny_config(run_dir, steps=4, every=2)
    vision = VisionConfig(kind="hf", hf_path=tower, hf_feature_layer=-2, image_size=IMG, dtype="float32")
    cfg = cfg.replace(model=cfg.model.replace(vision=vision), weights=WeightsConfig(vision=tower),
                      checkpoint=dataclasses.replace(cfg.checkpoint, export_hf=True))
    lines = []
    out = Trainer(cfg, print_fn=lines.append).fit()
    assert out["step"] == 4 and out["model"] == str(run_dir / "model")
    assert "export" not in out and not os.path.exists(run_dir / "hf")  # transformers' layout: EVA towers only
    assert any("transformers export skipped" in s and "model folder" in s for s in lines), lines
    # the startup line describes the tower as built (its own width, the blocks up to the second-last layer)
    assert "vision hf Dinov2Model 48w x 2 blocks, 32 px" in lines[0], lines[0]
    assert any("pixels: 32 px, crop" in s and "0.229" in s and "preprocessor_config.json" in s for s in lines)
    return str(run_dir)


def _eval(args, capsys):
    from blip2fast.eval.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record = main(args)
    return record, capsys.readouterr()


@pytest.mark.parametrize("which", ["run", "model", "checkpoint"])
def test_eval_retrieval_reads_the_run_folder(hf_run, demo_cache, tmp_path, capsys, which):
    from blip2fast.training.checkpoint import latest_checkpoint

    path = {"run": hf_run, "model": os.path.join(hf_run, "model"), "checkpoint": latest_checkpoint(hf_run)}[which]
    record, printed = _eval(["retrieval", f"--model={path}", f"--data={demo_cache['eval']}", "--limit=12", "--k=4",
                             "--workers=0", "--device=cpu", f"--out={tmp_path / 'r.json'}"], capsys)
    m = record["metrics"]
    assert record["settings"]["resize"] == "crop"  # what the run used (the tower's preprocessor_config.json)
    assert m["n_images"] == 12 and 0 <= m["i2t_r1"] <= 1 and "retrieval: 12 images" in printed.out


def test_run_model_folder_and_checkpoint_hold_the_same_model(hf_run):
    from blip2fast import Blip2
    from blip2fast.training.checkpoint import latest_checkpoint

    a = Blip2.from_pretrained(hf_run).eval()  # the run folder: its model/ folder
    b = Blip2.from_pretrained(latest_checkpoint(hf_run)).eval()  # rebuilt from the run's config + checkpoint
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a.query_output(x), b.query_output(x), rtol=0, atol=0)
    saved = json.loads(open(os.path.join(hf_run, "config.json")).read())
    assert os.path.isabs(saved["weights"]["vision"]) and os.path.isabs(saved["checkpoint"]["dir"])
    # the run recorded the tower's pixels (DINOv2: ImageNet statistics, centre crop), and so did its model folder
    assert saved["data"]["image_std"] == [0.229, 0.224, 0.225] and saved["data"]["resize"] == "crop"
    meta = json.loads(open(os.path.join(hf_run, "model", "blip2fast_model.json")).read())
    assert meta["preprocess"]["std"] == [0.229, 0.224, 0.225] and meta["preprocess"]["size"] == IMG


def test_tower_side_and_statistics_come_from_the_folder_unless_a_flag_says(tower, tmp_path):
    import shutil

    from blip2fast.training.model import resolve_model_config, resolve_preprocess

    other = tmp_path / "tower40"
    shutil.copytree(tower, other)
    pre = json.loads((other / "preprocessor_config.json").read_text())
    pre["crop_size"] = {"height": 40, "width": 40}
    (other / "preprocessor_config.json").write_text(json.dumps(pre))
    base = tiny_config(tmp_path / "run")
    vision = VisionConfig(kind="hf", hf_path=str(other), image_size=IMG, dtype="float32")
    cfg = base.replace(model=base.model.replace(vision=vision), weights=WeightsConfig(vision=str(other)))
    m = resolve_model_config(cfg, torch.device("cpu"))
    assert m.vision.image_size == 40  # the preset's side was not asked for: the tower's
    asked = cfg.replace(model=cfg.model.replace(vision=dataclasses.replace(vision, image_size=48)))
    assert resolve_model_config(asked, torch.device("cpu")).vision.image_size == 48
    flagged = cfg.replace(data=dataclasses.replace(cfg.data, image_std=(0.5, 0.5, 0.5), resize="squash"))
    out, p = resolve_preprocess(flagged, m)
    assert p.std == (0.5, 0.5, 0.5) and p.mean == (0.485, 0.456, 0.406) and p.resize == "squash"
    assert out.data.image_mean == (0.485, 0.456, 0.406) and "--data.image_std" in p.source
    with pytest.raises(ConfigError, match="data.resize"):
        resolve_preprocess(cfg.replace(data=dataclasses.replace(cfg.data, resize="stretch")), m)


def _stage2_args(run_dir, stage1, llm, *extra):
    return ["--preset=stage2_opt2.7b", f"--weights.stage1={stage1}", f"--weights.llm={llm}", "--steps=2",
            "--batch_size=4", "--data.num_workers=0", "--logging.every=1", "--logging.tensorboard=false",
            f"--checkpoint.dir={run_dir}", "--device=cpu", "--model.llm.dtype=float32", "--eval.size=8", *extra]


def test_stage2_takes_the_stage1_sizes_and_captions(hf_run, llm_folders, demo_cache, tmp_path, capsys):
    cfg = parse_cli(_stage2_args(tmp_path / "s2", hf_run, llm_folders["opt"]))
    assert cfg.model.qformer.hidden_size == 768  # the preset's; the run's model comes from stage 1
    lines = []
    trainer = Trainer(cfg, print_fn=lines.append)
    s1 = json.loads(open(os.path.join(hf_run, "model", "blip2fast_model.json")).read())["model"]
    m = trainer.model.config
    assert dataclasses.asdict(m.qformer) == s1["qformer"] and m.embed_dim == s1["embed_dim"]
    assert m.vision.kind == "hf" and m.vision.width == s1["vision"]["width"]
    out = trainer.fit()
    assert out["step"] == 2 and os.path.isdir(out["model"])
    # stage 2 evaluates on held-out pairs: the LM loss (before and after) and captions beside their references
    assert out["n"] == 8 and out["loss"] > 0 and out["before"]["loss"] > 0 and len(out["captions"]) == 3
    assert all(c["reference"] and isinstance(c["generated"], str) for c in out["captions"]), out["captions"]
    printed = "\n".join(lines)
    assert "held-out LM loss (N=8" in printed and f"(reference: {out['captions'][0]['reference']!r})" in printed
    record, printed = _eval(["caption", f"--model={tmp_path / 's2'}", f"--data={demo_cache['eval']}", "--limit=4",
                             "--workers=0", "--device=cpu", "--num_beams=1", "--max_new_tokens=4",
                             f"--out={tmp_path / 'c.json'}"], capsys)
    assert record["settings"]["decoder"] == "llm" and len(record["predictions"]) == 4
    # captions use the prompt the run trained with (none, the paper's), recorded in its model folder and checkpoints,
    # not LAVIS's "a photo of", which the soft prompt never saw
    assert record["settings"]["prompt"] == ""
    from blip2fast.checkpoint.native import CONFIG_FILE
    from blip2fast.eval.cli import default_caption_prompt

    meta_file = os.path.join(out["model"], CONFIG_FILE)
    meta = json.loads(open(meta_file).read())
    assert meta["prompt"] == ""
    assert default_caption_prompt(ckpt.latest_checkpoint(str(tmp_path / "s2")), "llm") == ""
    meta["prompt"] = "a picture of"
    open(meta_file, "w").write(json.dumps(meta))
    assert default_caption_prompt(str(tmp_path / "s2"), "llm") == "a picture of"
    assert default_caption_prompt(str(tmp_path / "s2"), "qformer") == ""
    del meta["prompt"]  # a folder written before prompts were recorded: its run's config.json says
    open(meta_file, "w").write(json.dumps(meta))
    assert default_caption_prompt(str(tmp_path / "s2"), "llm") == ""
    # the stage-2 run carries the stage-1 Q-Former tokenizer: retrieval works on it too
    record, _ = _eval(["retrieval", f"--model={tmp_path / 's2'}", f"--data={demo_cache['eval']}", "--limit=6",
                       "--k=2", "--workers=0", "--device=cpu", f"--out={tmp_path / 'r.json'}"], capsys)
    assert record["metrics"]["n_images"] == 6


def test_stage2_size_flag_against_the_stage1_model_is_one_line_before_the_llm(hf_run, llm_folders, tmp_path,
                                                                               monkeypatch, capsys):
    from blip2fast.models import llm as llm_module
    from blip2fast.train import main

    def no_llm(*a, **k):
        raise AssertionError("the LLM was loaded before the size check")

    monkeypatch.setattr(llm_module, "build_llm", no_llm)
    args = _stage2_args(tmp_path / "s2", hf_run, llm_folders["opt"], "--model.qformer.num_query_tokens=4")
    with pytest.raises(ConfigError) as e:
        Trainer(parse_cli(args), print_fn=lambda s: None)
    msg = str(e.value)
    assert "--model.qformer.num_query_tokens=4" in msg and "stage-1 model has 8" in msg and "\n" not in msg
    with pytest.raises(SystemExit):
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_query_tokens" in err[0], err


def test_eval_errors_are_one_line(hf_run, demo_cache, tmp_path, capsys):
    from blip2fast.eval.cli import main

    bad = tmp_path / "empty"
    bad.mkdir()
    for args in ([f"--model={bad}"], [f"--model={tmp_path / 'nothing'}"], [f"--model={hf_run}", "--k=0"]):
        with pytest.raises(SystemExit):
            main(["retrieval", f"--data={demo_cache['eval']}", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error:" in err[0], err


def test_bad_transformers_tower_folders_are_one_line_train_errors(tmp_path, capsys):
    from blip2fast.train import main

    not_vision = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                   intermediate_size=64, vocab_size=64)).save_pretrained(not_vision)
    capsys.readouterr()  # transformers' own progress output while saving
    for folder, says in ((not_vision, "not a vision model"), (tmp_path / "missing", "no such folder")):
        with pytest.raises(SystemExit):
            main([f"--model.vision.hf_path={folder}", "--model.vision.kind=hf", f"--checkpoint.dir={tmp_path / 'r'}",
                  "--device=cpu", "--steps=1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and str(folder) in err[0], err


def test_demo_run_and_its_transformers_export_evaluate_without_flags(tmp_path, demo_cache, capsys):
    """The demo preset's model (EVA layout, the demo's word tokenizer): the run folder, its model folder and its
    transformers export all evaluate with --model alone; the tokenizer travels with each."""
    cfg = tiny_config(tmp_path / "run", steps=2, every=2)
    cfg = cfg.replace(checkpoint=dataclasses.replace(cfg.checkpoint, export_hf=True))
    out = Trainer(cfg, print_fn=lambda s: None).fit()
    assert out["export"] == str(tmp_path / "run" / "hf") and out["model"] == str(tmp_path / "run" / "model")
    recalls = []
    checkpoint = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    # no --data: each folder of the run evaluates on the held-out shards the run recorded (<run>/heldout.json)
    for path in (tmp_path / "run", tmp_path / "run" / "model", tmp_path / "run" / "hf", checkpoint):
        record, _ = _eval(["retrieval", f"--model={path}", "--limit=10", "--k=3", "--workers=0", "--device=cpu",
                           f"--out={tmp_path / 'r.json'}"], capsys)
        recalls.append(record["metrics"]["itc_i2t_r1"])
    assert recalls[0] == recalls[1] == recalls[3]  # the same weights; the transformers export changes ln_vision's eps
    assert abs(recalls[2] - recalls[0]) <= 0.1
    # a folder from no run: --data is required, in one line
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(SystemExit) as stop:
        _eval(["retrieval", f"--model={tmp_path / 'not_a_run'}", "--device=cpu"], capsys)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data is required" in err[0], err
