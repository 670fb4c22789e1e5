"""Bad data and bad values end a run cleanly (issue 19's table): one line naming the shard / key and the reason, a
non-zero exit, no traceback, no hang (every CLI run here has a timeout inside the test) and no run folder left
without a usable state. Damage that leaves usable data is skipped and counted instead."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
import time

import pytest

from blip2fast.data.captions import sample_captions
from blip2fast.data.shards import index_shard
from blip2fast.training.trainer import Trainer
from tests.training.conftest import run_cli, start_cli, tiny_config

TIMEOUT = 90  # a hang fails the test here (subprocess.TimeoutExpired), it does not stall CI


def _demo_samples(demo_cache, n):
    """n (png bytes, caption) pairs of the demo set."""
    src = demo_cache["train"].replace("{000000..000001}", "000000")
    samples, _ = index_shard(src)
    blob = open(src, "rb").read()

    def member(raw, ext):
        off, size = raw.members[ext]
        return blob[off:off + size]

    return [(member(s, "png"), sample_captions({"json": member(s, "json")})[0]) for s in samples[:n]]


def _write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for i, (png, caption) in enumerate(samples):
            for ext, data in (("png", png), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def _cli_args(run_dir, urls, *extra):
    """The base command line; a flag in `extra` replaces the base's (a flag given twice is a CLI error)."""
    base = ["--preset=demo_small", "--steps=5", f"--data.urls={urls}", f"--checkpoint.dir={run_dir}", "--eval.size=8",
            "--checkpoint.export_hf=false", "--logging.tensorboard=false", "--device=cpu"]
    given = {a.split("=", 1)[0] for a in extra}
    return [a for a in base if a.split("=", 1)[0] not in given] + list(extra)


def _assert_one_line_error(proc, *must_say):
    err = proc.stderr.strip()
    assert proc.returncode != 0, proc.stdout[-2000:] + err[-2000:]
    assert "Traceback" not in err and "Traceback" not in proc.stdout, err[-3000:]
    last = err.splitlines()[-1]
    assert last.startswith("python -m blip2fast.train: error: "), err[-3000:]
    for text in must_say:
        assert text in last, last
    return last


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    empty = root / "empty.tar"
    tarfile.open(empty, "w").close()
    text = root / "text.tar"
    text.write_text("these are not the shards you are looking for\n" * 20)
    folder = root / "shards"
    folder.mkdir()
    return {"empty": str(empty), "text": str(text), "folder": str(folder), "missing": str(root / "missing.tar")}


@pytest.mark.parametrize("case,must_say", [
    ("empty", ["no usable shard", "empty.tar' is an empty tar (no samples)"]),
    ("text", ["no usable shard", "text.tar' is not a tar archive"]),
    ("folder", ["are directories, not .tar shards", "give the shard files inside"]),
    ("missing", ["do not exist", "missing.tar"]),
    ("lr_nan", ["--optim.lr=nan: must be a finite number"]),
])
def test_bad_input_is_one_line_and_leaves_no_run_folder(tmp_path, demo_cache, bad_inputs, case, must_say):
    run_dir = tmp_path / "run"
    if case == "lr_nan":
        args = ["--preset=demo_small", "--steps=5", "--optim.lr=nan", f"--checkpoint.dir={run_dir}"]
    else:
        args = _cli_args(run_dir, bad_inputs[case])
    _assert_one_line_error(run_cli(args, timeout=TIMEOUT), *must_say)
    assert not run_dir.exists()


def test_demo_tokenizer_and_unknown_words(tmp_path, demo_cache):
    """A caption with a word the demo tokenizer does not know is a counted skip (exact count over an epoch); data
    whose captions it cannot encode at all is a start-up error that says so."""
    samples = _demo_samples(demo_cache, 40)
    unknown = {3, 17, 29}
    mixed = [(png, cap + " zebra" if i in unknown else cap) for i, (png, cap) in enumerate(samples)]
    shard = _write_shard(tmp_path / "mixed.tar", mixed)
    cfg = tiny_config(tmp_path / "run", steps=6, every=6, batch=8, workers=2)
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, urls=shard, resampled=False),
                      eval=dataclasses.replace(cfg.eval, urls=""))
    out = Trainer(cfg, print_fn=lambda s: None).fit()
    assert out["step"] == 6 and out["stopped"] is None
    events = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    first_epoch = [e for e in events if e["event"] == "epoch_end"][0]
    assert first_epoch["skipped"]["untokenizable"] == len(unknown)
    assert first_epoch["samples"] == len(samples) - len(unknown)

    foreign = _write_shard(tmp_path / "foreign.tar", [(png, "a zebra on a bicycle") for png, _ in samples[:10]])
    run_dir = tmp_path / "run2"
    last = _assert_one_line_error(run_cli(_cli_args(run_dir, foreign), timeout=TIMEOUT),
                                  "the text encoder cannot encode any of the first 8 captions", "foreign.tar",
                                  "zebra", "--data.tokenizer=<a local BERT tokenizer folder>")
    assert "\n" not in last and not run_dir.exists()


def test_empty_shard_among_good_ones_is_skipped_and_counted(tmp_path, demo_cache, bad_inputs):
    good = _write_shard(tmp_path / "good.tar", _demo_samples(demo_cache, 40))
    cfg = tiny_config(tmp_path / "run", steps=12, every=12, batch=8, workers=0)
    # epoch mode: the start-up check probes every shard of the epoch (resampled, it probes the first draws only)
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, urls=f"{good}::{bad_inputs['empty']}::{bad_inputs['text']}",
                                               resampled=False),
                      eval=dataclasses.replace(cfg.eval, urls=""))
    notes = []
    out = Trainer(cfg, print_fn=notes.append).fit()
    assert out["step"] == 12
    assert out["shard_errors"]["empty"] > 0 and out["shard_errors"]["unreadable"] > 0
    assert any("2 shard(s) checked at start are unusable" in n and "empty.tar' is an empty tar" in n
               and "text.tar' is not a tar archive" in n for n in notes), notes


def test_shard_going_bad_mid_run_ends_the_run_promptly(tmp_path, demo_cache):
    """The hang of the issue: a loader worker (started with SIGTERM blocked) finds no usable shard left. The run
    must end within seconds, with one line naming the shard and the reason, and no run folder (no checkpoint was
    written yet)."""
    shard = _write_shard(tmp_path / "only.tar", _demo_samples(demo_cache, 24))
    run_dir = tmp_path / "run"
    log = tmp_path / "log.txt"
    proc = start_cli(_cli_args(run_dir, shard, "--steps=1000", "--checkpoint.every=500", "--data.mix_shards=1",
                               "--data.num_workers=2", "--data.batch_size=4", "--logging.every=1"), log_path=log)
    try:
        metrics = run_dir / "metrics.jsonl"
        t0 = time.monotonic()
        while not (metrics.exists() and '"step": 1' in metrics.read_text()):
            assert proc.poll() is None and time.monotonic() - t0 < TIMEOUT, log.read_text()[-3000:]
            time.sleep(0.05)
        # replaced under the running loader: open visits keep reading the old file, the next visit finds garbage
        garbage = tmp_path / "garbage"
        garbage.write_text("not a tar any more\n" * 100)
        os.replace(garbage, shard)
        t_broken = time.monotonic()
        rc = proc.wait(timeout=TIMEOUT)
        took = time.monotonic() - t_broken
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert rc == 2 and "Traceback" not in out, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("python -m blip2fast.train: error: rank 0, stream "), out[-3000:]
    assert "only.tar" in last and "no usable shard left" in last and "unreadable" in last, last
    assert took < 30, took
    assert not run_dir.exists()
