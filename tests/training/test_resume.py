"""Work is never lost: `python -m blip2fast.train` killed with SIGKILL at a random step, and again while a
checkpoint is half written, then resumed with --resume=latest, logs the same losses step for step as an
uninterrupted run and ends with bit-identical weights (num_workers=2, shuffling on, deterministic CPU mode)."""
from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from blip2fast.training import checkpoint as ckpt
from blip2fast.training.logging import read_metrics
from tests.training.conftest import run_cli, start_cli

STEPS, EVERY = 24, 6


def _args(run_dir, *extra):
    return ["--preset=demo_small", f"--checkpoint.dir={run_dir}", f"--schedule.steps={STEPS}", "--warmup_steps=3",
            f"--checkpoint.every={EVERY}", "--checkpoint.keep=2", "--checkpoint.export_hf=false",
            "--logging.every=1", "--logging.tensorboard=false", "--data.batch_size=8", "--data.num_workers=2",
            "--data.shuffle=true", "--data.mix_shards=2", "--data.shuffle_buffer=64", "--eval.size=16",
            "--deterministic=true", "--device=cpu", *extra]


def _losses(run_dir) -> dict:
    """step -> every record logged for it (a step run before a kill and again after the resume appears twice)."""
    out: dict = {}
    for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")):
        if r.get("event") == "train":
            out.setdefault(r["step"], []).append((r["loss"], r["itc"], r["itm"], r["itg"], r["grad_norm"]))
    return out


def _wait_for(cond, proc, timeout=90.0, what=""):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _last_step(run_dir) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    steps = [r["step"] for r in read_metrics(path) if r.get("event") == "train"]
    return max(steps, default=0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_cache):
    run_dir = str(tmp_path_factory.mktemp("reference") / "run")
    proc = run_cli(_args(run_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def test_sigkill_anywhere_then_resume_latest_gives_the_same_losses(tmp_path, reference):
    rng = random.Random(os.environ.get("BLIP2FAST_TEST_SEED", time.time_ns()))
    kill_at = rng.randrange(EVERY + 1, 2 * EVERY)  # after one checkpoint, before the next
    why = f"(killed after step {kill_at}; BLIP2FAST_TEST_SEED reproduces the draw)"
    run_dir = str(tmp_path / "run")
    log = str(tmp_path / "log.txt")

    # 1. a random moment: once the run has logged step `kill_at`, plus a random few milliseconds
    proc = start_cli(_args(run_dir), log_path=log)
    _wait_for(lambda: _last_step(run_dir) >= kill_at, proc, what=f"step {kill_at} {why}")
    time.sleep(rng.random() * 0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.latest_checkpoint(run_dir) is not None, why

    # 2. resume, and kill while the next checkpoint is being written (the test hook sleeps inside the write)
    done_before = ckpt.latest_checkpoint(run_dir)
    proc = start_cli(_args(run_dir, "--resume=latest"), env_extra={ckpt.SLEEP_ENV: "60"}, log_path=log)
    root = os.path.join(run_dir, "checkpoints")
    partial = lambda: any(n.startswith(".tmp-") and os.path.exists(os.path.join(root, n, "model.safetensors"))  # noqa
                          for n in os.listdir(root))
    _wait_for(partial, proc, what="a checkpoint write " + why)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    tmp_dirs = [n for n in os.listdir(root) if n.startswith(".tmp-")]
    assert tmp_dirs, "the kill should have left the half-written checkpoint behind"
    assert ckpt.latest_checkpoint(run_dir) == done_before, "a half-written checkpoint must never be 'latest'"

    # 3. resume again and finish
    proc = run_cli(_args(run_dir, "--resume=latest"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and done_before in proc.stdout
    assert "the config differs" not in proc.stdout  # the same flags plus --resume: the same run
    assert not [n for n in os.listdir(root) if n.startswith(".tmp-")], "leftovers of the killed writer are removed"

    ref, got = _losses(reference), _losses(run_dir)
    assert sorted(ref) == list(range(1, STEPS + 1)) and sorted(got) == sorted(ref), why
    for step, records in got.items():
        assert len(ref[step]) == 1
        for rec in records:  # bit-identical, including steps that ran twice (before the kill and after)
            assert rec == ref[step][0], (step, rec, ref[step][0], why)
    assert any(len(r) > 1 for r in got.values()), "some steps should have run twice"
    a = load_file(os.path.join(ckpt.latest_checkpoint(reference), "model.safetensors"))
    b = load_file(os.path.join(ckpt.latest_checkpoint(run_dir), "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), why
    # the loss falls in this short run, too
    assert ref[STEPS][0][0] < ref[1][0][0]


def test_resume_latest_without_checkpoint_starts_fresh_with_a_message(tmp_path, demo_cache):
    run_dir = str(tmp_path / "new")
    proc = run_cli(["--preset=demo_small", f"--checkpoint.dir={run_dir}", "--resume=latest", "--steps=2",
                    "--checkpoint.export_hf=false", "--eval.size=8", "--batch_size=4", "--num_workers=0"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"--resume=latest: no checkpoint found in {run_dir}; starting a fresh run" in proc.stdout
    assert ckpt.latest_checkpoint(run_dir).endswith("step_00000002")
    # a fresh start in a folder that holds checkpoints is refused: nothing is overwritten
    proc = run_cli(["--preset=demo_small", f"--checkpoint.dir={run_dir}", "--steps=2", "--num_workers=0"])
    assert proc.returncode != 0 and "--resume=latest" in proc.stderr and "already holds checkpoints" in proc.stderr


def test_sigusr1_exports_and_sigterm_saves_then_stops(tmp_path, demo_cache):
    run_dir = str(tmp_path / "run")
    args = _args(run_dir)
    args[args.index(f"--schedule.steps={STEPS}")] = "--schedule.steps=100000"
    proc = start_cli(args, log_path=str(tmp_path / "log.txt"))
    _wait_for(lambda: _last_step(run_dir) >= 2, proc, what="step 2")
    proc.send_signal(signal.SIGUSR1)  # on request: a checkpoint and the transformers export, then go on
    _wait_for(lambda: os.path.isfile(os.path.join(run_dir, "hf", "config.json")), proc, what="the export")
    proc.send_signal(signal.SIGTERM)  # preemption: save at the step boundary and stop
    assert proc.wait(timeout=60) == 0
    log = open(tmp_path / "log.txt").read()
    stopped = [line for line in log.splitlines() if line.startswith("stopping on SIGTERM at step ")]
    assert stopped and "--resume=latest" in stopped[0], log[-2000:]
    step = int(stopped[0].split("at step ")[1].split(":")[0])
    assert ckpt.latest_checkpoint(run_dir).endswith(ckpt.checkpoint_name(step))
    assert _last_step(run_dir) == step < 100000


def test_resume_from_an_older_checkpoint_must_branch_into_a_new_folder(tmp_path, demo_cache):
    import dataclasses

    from blip2fast.training.config import ConfigError
    from blip2fast.training.trainer import Trainer
    from tests.training.conftest import tiny_config

    cfg = tiny_config(tmp_path / "run", steps=4, every=2)
    Trainer(cfg, print_fn=lambda s: None).fit()
    older = ckpt.list_checkpoints(str(tmp_path / "run"))[0][1]
    assert older.endswith("step_00000002")
    again = cfg.replace(checkpoint=dataclasses.replace(cfg.checkpoint, resume=older))
    with pytest.raises(ConfigError, match="--checkpoint.dir=<new folder>"):
        Trainer(again, print_fn=lambda s: None)
    branch = again.replace(checkpoint=dataclasses.replace(again.checkpoint, dir=str(tmp_path / "branch")))
    t = Trainer(branch, print_fn=lambda s: None)
    assert t.step == 2 and t.run_dir == str(tmp_path / "branch")
    assert t.fit()["step"] == 4 and ckpt.latest_checkpoint(str(tmp_path / "branch")).endswith("step_00000004")
