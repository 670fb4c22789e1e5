"""Under torchrun, one rank's fatal data error ends every rank within seconds, each with a non-zero exit and one
line (rank 0 names the rank that failed and its reason), instead of rank 0 waiting in a collective."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from blip2fast.training.logging import read_metrics
from tests.training.test_ddp import _torchrun

TIMEOUT = 150


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def _rank_of(pid: int):
    try:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc to find the loader worker")
def test_one_ranks_worker_dies_and_both_ranks_end_within_seconds(tmp_path, demo_cache):
    run_dir = str(tmp_path / "run")
    args = ["--preset=demo_small", f"--checkpoint.dir={run_dir}", "--steps=1000", "--checkpoint.every=500",
            "--checkpoint.export_hf=false", "--logging.every=1", "--logging.tensorboard=false", "--batch_size=4",
            "--num_workers=1", "--eval.size=8", "--device=cpu"]
    log = tmp_path / "log.txt"
    proc = _torchrun(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        metrics = os.path.join(run_dir, "metrics.jsonl")
        t0 = time.monotonic()
        while not (os.path.exists(metrics) and any(r.get("step", 0) >= 2 for r in read_metrics(metrics))):
            assert proc.poll() is None and time.monotonic() - t0 < TIMEOUT, log.read_text()[-3000:]
            time.sleep(0.05)
        ranks = {_rank_of(p): p for p in _children(proc.pid)}
        workers = _children(ranks[1])  # rank 1's DataLoader worker (num_workers=1)
        assert workers, ranks
        os.kill(workers[0], signal.SIGKILL)
        t_kill = time.monotonic()
        proc.wait(timeout=60)
        took = time.monotonic() - t_kill
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = log.read_text()
    assert proc.returncode != 0 and took < 30, (took, out[-4000:])
    assert "[rank" not in out, out[-4000:]  # torchrun prefixes the ranks' tracebacks so: none, only our lines
    failed = [ln for ln in out.splitlines() if "error: rank 1: a data loader worker failed" in ln]
    assert len(failed) == 1 and "open shards" in failed[0] and ".tar" in failed[0], out[-4000:]
    assert re.search(r"rank 0: stopping because rank 1 failed: rank 1: a data loader worker failed", out), out[-4000:]
    # torchrun's summary: both ranks ended with an exit code of their own (not torchrun's SIGTERM / SIGKILL)
    codes, rank = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*rank\s*:\s*(\d+) \(local_rank", line)
        rank = m.group(1) if m else rank
        m = re.match(r"\s*exitcode\s*:\s*(-?\d+)", line)
        if m and rank is not None:
            codes[rank] = int(m.group(1))
    assert set(codes) == {"0", "1"} and all(c > 0 for c in codes.values()), (codes, out[-4000:])
    assert not os.path.exists(run_dir)  # no checkpoint was written: no half-written run folder
