"""The train command line as a user meets it: --help, flags given twice, flag order, and errors that are one line
on stderr (no traceback) with a non-zero exit."""
from __future__ import annotations

import pytest
import torch

from blip2fast.training.config import ConfigError, parse_cli

from .conftest import run_cli


def test_a_flag_given_twice_is_an_error_naming_both_values():
    with pytest.raises(ConfigError) as e:
        parse_cli(["--optim.lr=1e-3", "--steps=5", "--lr=3e-4"])  # --lr is --optim.lr
    msg = str(e.value)
    assert "--optim.lr given 2 times ('1e-3', '3e-4')" in msg and "give it once" in msg and "\n" not in msg


def test_an_unquoted_brace_pattern_expanded_by_bash_is_caught_with_the_fix():
    # what bash makes of --data.urls=/data/{0..3}.tar without quotes: four flags, the last would silently win
    argv = [f"--data.urls=/data/{i}.tar" for i in range(4)]
    with pytest.raises(ConfigError) as e:
        parse_cli(argv)
    msg = str(e.value)
    assert "--data.urls given 4 times ('/data/0.tar', '/data/1.tar', '/data/2.tar', '/data/3.tar')" in msg
    assert "quote it" in msg and "--data.urls='/data/{" in msg
    # the space-separated form expands into stray arguments: the same reminder
    with pytest.raises(ConfigError, match="unexpected argument '/data/1.tar'.*quote it"):
        parse_cli(["--data.urls", "/data/0.tar", "/data/1.tar"])


@pytest.mark.parametrize("argv", [["--weights.vision=/models/dinov2", "--model.vision.kind=hf"],
                                  ["--model.vision.kind=hf", "--weights.vision=/models/dinov2"]])
def test_flags_are_validated_after_all_are_applied(argv):
    """weights.vision names a transformers tower's folder; which of the two flags comes first does not matter."""
    cfg = parse_cli(argv)
    assert cfg.model.vision.kind == "hf" and cfg.model.vision.hf_path == "/models/dinov2"
    assert cfg.weights.vision == "/models/dinov2"
    with pytest.raises(ConfigError, match="--model.vision.kind=hf needs .*--weights.vision=<folder>"):
        parse_cli(["--model.vision.kind=hf"])
    # a cross-field check sees the final values whatever the order (min_lr above lr until lr is raised)
    assert parse_cli(["--schedule.min_lr=5e-3", "--optim.lr=1e-2"]).schedule.min_lr == 5e-3
    assert parse_cli(["--optim.lr=1e-2", "--schedule.min_lr=5e-3"]).optim.lr == 1e-2


def test_every_problem_is_listed_in_one_line():
    with pytest.raises(ConfigError) as e:
        parse_cli(["--data.batch_size=0", "--model.qformer.hidden_dropout=1.5", "--device=tpu"])
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("--data.batch_size=0: must be >= 1", "--model.qformer.hidden_dropout=1.5", "--device='tpu'"):
        assert part in msg, (part, msg)


def test_help_starts_with_usage_and_the_common_commands(capsys):
    with pytest.raises(SystemExit) as e:
        parse_cli(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m blip2fast.train")
    commands = out.index("common commands:")
    assert out.index("python -m blip2fast.train --preset=stage1_vit_g") > commands
    assert out.index("--resume=latest") > commands
    assert commands < out.index("presets (--preset=NAME): demo, demo_small") < out.index("fields (values of")
    assert out.index("fields (values of") < out.index("--optim.lr=")


def test_the_old_preset_name_still_works_with_a_note(capsys):
    cfg = parse_cli(["--preset=tiny"])
    assert cfg.preset == "demo_small"
    assert "--preset=tiny is now --preset=demo_small" in capsys.readouterr().err


CLI_ERRORS = [
    (["--optim.lrr=1"], ["--optim.lrr", "did you mean --optim.lr"]),
    ([f"--data.urls=/data/{i}.tar" for i in range(3)], ["--data.urls given 3 times", "quote it"]),
    (["--steps=10", "--steps=20"], ["--schedule.steps given 2 times ('10', '20')"]),
    (["--preset=nope"], ["'nope' is not a preset"]),
    (["--data.batch_size=1"], ["stage 1 needs >= 2"]),
]
NO_GPU = (["--device=cuda"], ["--device=cuda but torch sees no CUDA GPU", "use --device=cpu"])
if not torch.cuda.is_available():
    CLI_ERRORS.append(NO_GPU)


def _assert_one_line(code, out: str, err: str, must_say) -> None:
    assert code == 2, (code, err[-2000:])
    err = err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("python -m blip2fast.train: error: "), err
    for text in must_say:
        assert text in err, (text, err)
    assert out == ""  # nothing started: no run folder line, no progress


@pytest.mark.parametrize("argv,must_say", CLI_ERRORS, ids=[" ".join(a)[:40] for a, _ in CLI_ERRORS])
def test_user_errors_are_one_line_on_stderr_with_exit_2(argv, must_say, capsys, tmp_path, monkeypatch):
    from blip2fast.train import main

    monkeypatch.chdir(tmp_path)  # nothing may be written; if it were, not into the checkout
    with pytest.raises(SystemExit) as e:
        main(argv)
    captured = capsys.readouterr()
    _assert_one_line(e.value.code, captured.out, captured.err, must_say)
    assert list(tmp_path.iterdir()) == []


SUBPROCESS_CASES = [CLI_ERRORS[1]] + ([NO_GPU] if not torch.cuda.is_available() else [])


@pytest.mark.parametrize("argv,must_say", SUBPROCESS_CASES, ids=[a[0][:20] for a, _ in SUBPROCESS_CASES])
def test_the_real_command_prints_no_traceback(argv, must_say):
    """`python -m blip2fast.train` itself (a process each: the two errors issue 17 met as tracebacks or silence)."""
    proc = run_cli(argv, timeout=180)
    _assert_one_line(proc.returncode, proc.stdout, proc.stderr, must_say)
