"""The command line: presets, --key=value overrides with type checks, errors that name the key."""
from __future__ import annotations

import pytest

from blip2fast.training.config import (PRESETS, ConfigError, TrainConfig, all_keys, help_text, parse_cli, preset)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves_and_round_trips(name):
    cfg = parse_cli([f"--preset={name}"])
    assert cfg.preset == name and cfg == preset(name)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    if name.startswith("stage2"):
        assert cfg.stage == 2 and cfg.model.llm is not None and cfg.schedule.min_lr == 5e-5
    if name.startswith("stage1"):
        assert cfg.stage == 1 and cfg.schedule.steps == 250_000 and cfg.optim.betas == (0.9, 0.98)


def test_paper_recipe_in_the_presets():
    g, t5 = preset("stage1_vit_g"), preset("stage2_flant5xxl")
    assert (g.optim.lr, g.optim.weight_decay, g.schedule.warmup_steps, g.schedule.min_lr) == (1e-4, 0.05, 2000, 1e-5)
    assert g.model.vision.width == 1408 and preset("stage1_vit_l").model.vision.kind == "clip"
    assert t5.model.llm.dtype == "bfloat16" and preset("stage2_opt6.7b").model.llm.dtype == "bfloat16"
    assert t5.schedule.steps == 80_000


def test_default_is_the_demo_and_flags_override_it():
    cfg = parse_cli([])
    assert cfg.preset == "demo" and cfg.stage == 1 and cfg.schedule.steps == 600 and cfg.data.urls == ""
    cfg = parse_cli(["--optim.lr=3e-4", "--schedule.steps", "12", "--data.shuffle=false", "--seed=7",
                     "--optim.betas=0.8,0.9", "--model.qformer.hidden_dropout=0.2", "--resume=latest",
                     "--checkpoint.dir=/tmp/x", "--deterministic"])
    assert cfg.optim.lr == 3e-4 and cfg.schedule.steps == 12 and cfg.data.shuffle is False and cfg.seed == 7
    assert cfg.optim.betas == (0.8, 0.9) and cfg.model.qformer.hidden_dropout == 0.2
    assert cfg.checkpoint.resume == "latest" and cfg.deterministic is True
    # shorthand for a field name that exists in one section only; the preset applies first wherever it is
    cfg = parse_cli(["--lr=1e-3", "--steps=5", "--preset=demo_small", "--fused=none", "--batch_size=4"])
    assert cfg.preset == "demo_small" and cfg.optim.lr == 1e-3 and cfg.schedule.steps == 5 and cfg.optim.fused is None
    assert cfg.data.batch_size == 4


@pytest.mark.parametrize("args,must_say", [
    (["--optim.lrr=1"], ["--optim.lrr", "did you mean --optim.lr", "weight_decay"]),
    (["--nope=1"], ["--nope", "data", "optim", "schedule", "checkpoint"]),
    (["--data.batch_size=abc"], ["--data.batch_size", "'abc'", "expected an int"]),
    (["--schedule.steps=1.5"], ["--schedule.steps", "expected an int"]),
    (["--optim.lr=fast"], ["--optim.lr", "expected a float"]),
    (["--data.shuffle=maybe"], ["--data.shuffle", "expected a bool"]),
    (["--optim.betas=0.9"], ["--optim.betas", "2 comma-separated"]),
    (["--urls=/x.tar"], ["--urls", "ambiguous", "--data.urls", "--eval.urls"]),
    (["--model.llm.dtype=float16"], ["--model.llm.dtype", "stage-2 presets"]),
    (["--preset=stage3"], ["stage3", "presets:", "stage1_vit_g"]),
    (["--model.qformer.hidden_dropout=1.5"], ["--model.qformer.hidden_dropout", "[0, 1)"]),
    (["--data.batch_size=0"], ["--data.batch_size", "data.batch_size=0", ">= 1"]),
    (["--device=tpu"], ["--device", "auto, cpu, cuda"]),
    (["steps=3"], ["'steps=3'", "--key=value"]),
])
def test_bad_flags_are_errors_naming_the_key(args, must_say):
    with pytest.raises(ConfigError) as e:
        parse_cli(args)
    for s in must_say:
        assert s in str(e.value), (s, str(e.value))


def test_main_reports_config_errors_on_stderr_with_exit_2(capsys):
    from blip2fast.train import main

    with pytest.raises(SystemExit) as e:
        main(["--optim.lr=oops"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "--optim.lr" in err


def test_help_lists_every_key_with_its_comment(capsys):
    with pytest.raises(SystemExit) as e:
        parse_cli(["--preset=stage2_opt2.7b", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for key in all_keys():
        if not key.startswith("model.llm.") or "model.llm" in out:
            assert f"--{key}=" in out, key
    assert "peak learning rate" in out and "stage2_flant5xxl" in out
    assert "--model.llm.*" not in help_text(preset("stage2_opt2.7b"))
    assert "--model.llm.*  (not set in this preset)" in help_text(preset("demo"))


def test_speed_and_dist_flags():
    cfg = parse_cli(["--compile", "--fp8"])  # bare names: each exists in one section only
    assert cfg.speed.compile is True and cfg.speed.fp8 is True and cfg.speed.cuda_graphs is False
    cfg = parse_cli(["--cuda_graphs", "--graph_warmup=5", "--fp8"])
    assert cfg.speed.cuda_graphs and cfg.speed.graph_warmup == 5 and cfg.speed.fp8
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    cfg = parse_cli(["--dist.frozen=fsdp", "--compile"])
    assert cfg.dist.frozen == "fsdp" and TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert parse_cli([]).dist.frozen == "replicate" and not parse_cli([]).speed.compile
    for argv, match in ((["--dist.frozen=zero3"], "dist.frozen='zero3'"),
                        (["--cuda_graphs", "--device=cpu"], r"cuda_graphs=true needs a CUDA GPU \(device=cpu\)"),
                        (["--cuda_graphs", "--compile"], "choose one"),
                        (["--dist.frozen=fsdp", "--fp8"], "FSDP2 does not shard"),
                        (["--dist.frozen=fsdp", "--cuda_graphs"], "cannot be captured"),
                        (["--graph_warmup=0"], "graph_warmup=0")):
        with pytest.raises(ConfigError, match=match):
            parse_cli(argv)
    assert "--speed.cuda_graphs=false" in help_text(preset("demo")) and "--dist.frozen=replicate" in help_text(
        preset("demo"))
