"""Two ranks under torchrun (gloo, CPU): DDP training, per-rank data positions and RNG in one checkpoint folder,
a SIGTERM that every rank agrees on, and a resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from blip2fast.training import checkpoint as ckpt
from blip2fast.training.logging import read_metrics
from tests.training.conftest import ROOT, SUBPROCESS_ENV


def _torchrun(args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               **SUBPROCESS_ENV)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "blip2fast.train", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, **kw)


def test_two_ranks_checkpoint_stop_and_resume(tmp_path, demo_cache):
    run_dir = str(tmp_path / "run")
    args = ["--preset=demo_small", f"--checkpoint.dir={run_dir}", "--steps=1000", "--checkpoint.every=3",
            "--checkpoint.export_hf=false", "--logging.every=1", "--logging.tensorboard=false", "--batch_size=4",
            "--num_workers=1", "--eval.size=8", "--device=cpu"]
    log = open(tmp_path / "log.txt", "w")
    proc = _torchrun(args, stdout=log, stderr=subprocess.STDOUT)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    t0 = time.monotonic()
    while not (os.path.exists(metrics) and any(r.get("step", 0) >= 4 for r in read_metrics(metrics))):
        assert proc.poll() is None and time.monotonic() - t0 < 120, open(tmp_path / "log.txt").read()[-3000:]
        time.sleep(0.05)
    # torchrun signals each rank's whole process group (loader workers too); the ranks agree on a step, save and
    # exit cleanly; torchrun itself then exits non-zero, as it does whenever it is signalled
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    out = open(tmp_path / "log.txt").read()
    assert "stopping on SIGTERM" in out and "DataLoader worker" not in out and "[rank" not in out, out[-3000:]
    path = ckpt.latest_checkpoint(run_dir)
    meta = json.load(open(os.path.join(path, "meta.json")))
    assert meta["world_size"] == 2
    for r in (0, 1):
        assert {f"data_rank{r}.json", f"rng_rank{r}.json", f"rng_rank{r}.safetensors"} <= set(meta["files"])
    d0, d1 = (json.load(open(os.path.join(path, f"data_rank{r}.json"))) for r in (0, 1))
    assert (d0["rank"], d1["rank"]) == (0, 1) and d0["step"] == d1["step"] == meta["step"]
    stopped_at = meta["step"]

    # resume on two ranks to a nearby end
    args[args.index("--steps=1000")] = f"--steps={stopped_at + 2}"
    proc = _torchrun([*args, "--resume=latest"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, text[-3000:]
    assert f"resumed from {path} at step {stopped_at}" in text
    assert ckpt.latest_checkpoint(run_dir).endswith(ckpt.checkpoint_name(stopped_at + 2))


def test_two_ranks_with_fsdp_sharded_tower_checkpoint_and_resume(tmp_path, demo_cache):
    """--dist.frozen=fsdp through the real CLI: the (random) tower is FSDP2-sharded, every rank runs the held-out
    evaluation in lockstep, the checkpoint carries the tower whole (gathered from the shards) and a resume loads it
    back into the shards; the transformers export is skipped with the way to get one."""
    from safetensors import safe_open

    run_dir = str(tmp_path / "run")
    args = ["--preset=demo_small", f"--checkpoint.dir={run_dir}", "--steps=4", "--checkpoint.every=2",
            "--logging.every=2", "--logging.tensorboard=false", "--batch_size=4", "--num_workers=0",
            "--eval.size=8", "--device=cpu", "--dist.frozen=fsdp"]
    proc = _torchrun(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    text = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, text[-4000:]
    assert "dist.frozen=fsdp: vision tower sharded over 2 ranks (2 FSDP2 blocks)" in text, text[-3000:]
    assert "held-out retrieval (N=8)" in text and "transformers export skipped: the towers are FSDP-sharded" in text
    path = ckpt.latest_checkpoint(run_dir)
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes["visual_encoder.blocks.0.mlp.fc1.weight"] == (384, 96)  # whole, not a 2-way shard
    args[args.index("--steps=4")] = "--steps=6"
    proc = _torchrun([*args, "--resume=latest"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    text = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, text[-4000:]
    assert f"resumed from {path} at step 4" in text
    assert ckpt.latest_checkpoint(run_dir).endswith(ckpt.checkpoint_name(6))


def test_finish_distributed_destroys_only_the_group_blip2fast_started(tmp_path, monkeypatch):
    """A run that succeeds waits for every rank and destroys the process group it started, except in a launched CLI,
    which ends with os._exit right after (test_launched_exit.py); a group the caller started stays theirs."""
    import torch.distributed as dist

    from blip2fast import distributed as dist_utils
    from blip2fast.training import trainer

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        monkeypatch.setattr(trainer, "_started_group", False)
        trainer.finish_distributed()
        assert dist.is_initialized()  # the caller's group
        monkeypatch.setattr(trainer, "_started_group", True)
        monkeypatch.setattr(dist_utils, "_exits_without_teardown", True)  # a launched CLI: os._exit follows
        trainer.finish_distributed()
        assert dist.is_initialized() and trainer._started_group is False
        monkeypatch.setattr(trainer, "_started_group", True)
        monkeypatch.setattr(dist_utils, "_exits_without_teardown", False)  # called from Python
        trainer.finish_distributed()
        assert not dist.is_initialized() and trainer._started_group is False
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
