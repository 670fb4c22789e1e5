"""Every numeric config value is checked for range and finiteness when the config is built: a bad value is one
ConfigError line naming the key (before this, `--optim.lr=nan` passed and failed as a traceback in the optimiser)."""
from __future__ import annotations

import pytest

from blip2fast.training.config import ConfigError, parse_cli

# (flag, bad value, what the one-line error must say besides the key)
BAD_VALUES = [
    ("optim.lr", "nan", "must be a finite number"),
    ("optim.lr", "inf", "must be a finite number"),
    ("optim.lr", "-1e-4", "must be >= 0"),
    ("schedule.min_lr", "nan", "must be a finite number"),
    ("schedule.min_lr", "-1", "must be >= 0"),
    ("optim.betas", "0.9,nan", "must be a finite number"),
    ("optim.betas", "0.9,1.0", "each must be in [0, 1)"),
    ("optim.betas", "-0.1,0.98", "each must be in [0, 1)"),
    ("optim.eps", "0", "must be > 0"),
    ("optim.eps", "nan", "must be a finite number"),
    ("optim.weight_decay", "-0.05", "must be >= 0"),
    ("optim.weight_decay", "inf", "must be a finite number"),
    ("optim.grad_clip", "-1", "must be >= 0"),
    ("optim.grad_clip", "nan", "must be a finite number"),
    ("model.qformer.hidden_dropout", "1.0", "[0, 1)"),
    ("model.qformer.hidden_dropout", "nan", "[0, 1)"),
    ("model.qformer.attention_dropout", "-0.1", "[0, 1)"),
    ("model.temp_init", "0", "must be > 0"),
    ("model.temp_init", "nan", "must be a finite number"),
    ("model.temp_clamp", "0.5,0.001", "0 < low < high"),
    ("model.itc_label_smoothing", "1.0", "[0, 1)"),
    ("model.itg_label_smoothing", "nan", "must be a finite number"),
    ("model.ln_vision_eps", "0", "must be > 0"),
    ("model.qformer.layer_norm_eps", "-1e-12", "must be > 0"),
    ("model.embed_dim", "0", "must be > 0"),
    ("model.qformer.num_query_tokens", "0", "must be > 0"),
    ("data.batch_size", "0", "must be >= 1"),
    ("data.batch_size", "1", "stage 1 needs >= 2"),
    ("data.num_workers", "-1", "must be >= 0"),
    ("data.worker_timeout", "-5", "must be >= 0"),
    ("data.mix_shards", "0", "must be >= 1"),
    ("data.shuffle_buffer", "0", "must be >= 1"),
    ("data.max_words", "0", "must be >= 1"),
    ("eval.size", "0", "must be >= 1"),
    ("eval.rerank_k", "-1", "must be >= 0"),
    ("schedule.steps", "-1", "must be >= 0"),
    ("schedule.warmup_steps", "-5", "must be >= 0"),
    ("schedule.accum_steps", "0", "must be >= 1"),
    ("checkpoint.keep", "0", "must be >= 1"),
    ("logging.every", "0", "must be >= 1"),
    ("logging.peak_tflops", "nan", "must be a finite number"),
]


@pytest.mark.parametrize("key,value,must_say", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_bad_numeric_value_is_one_line_naming_the_key(key, value, must_say):
    with pytest.raises(ConfigError) as e:
        parse_cli(["--preset=demo_small", f"--{key}={value}"])
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert key.split(".")[-1] in msg and must_say in msg, msg


@pytest.mark.parametrize("key,value,expected,other", [
    ("optim.grad_clip", "0", 0.0, "1.0"), ("optim.weight_decay", "0", 0.0, "0.05"),
    ("model.qformer.hidden_dropout", "0", 0.0, "0.1"), ("optim.betas", "0,0.999", (0.0, 0.999), "0.9,0.999"),
    ("model.temp_clamp", "none", None, "0.001,0.5"), ("data.num_workers", "0", 0, "2")])
def test_edge_values_that_mean_something_are_accepted(key, value, expected, other):
    """Edge values with a meaning (0 = off, none = no clamp) pass validation and reach the config as given; an
    ordinary value of the same key parses to something else, so the comparison can tell them apart."""
    def field(cfg):
        for part in key.split("."):
            cfg = getattr(cfg, part)
        return cfg

    assert field(parse_cli(["--preset=demo_small", f"--{key}={value}"])) == expected
    assert field(parse_cli(["--preset=demo_small", f"--{key}={other}"])) != expected


def test_every_float_field_rejects_nan():
    """Whatever the key: a NaN in any float field (tuples included) is refused, naming it."""
    from blip2fast.training.config import _numbers, demo_small

    floats = [k for k, v in _numbers(demo_small()) if isinstance(v, float)]
    assert len(floats) >= 15
    for key in floats:
        flag = key.split("[")[0]
        value = "nan"
        if "[" in key:  # one element of a tuple
            i = int(key.split("[")[1].rstrip("]"))
            parts = [str(x) for x in _tuple_of(demo_small(), flag)]
            parts[i] = "nan"
            value = ",".join(parts)
        with pytest.raises(ConfigError) as e:
            parse_cli(["--preset=demo_small", f"--{flag}={value}"])
        assert flag.split(".")[-1] in str(e.value) and "\n" not in str(e.value), (key, str(e.value))


def _tuple_of(cfg, dotted):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
