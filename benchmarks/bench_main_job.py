"""The main job as a user runs it: `python -m blip2fast.train` (the demo preset), wall time and held-out R@1.

    python -m pytest benchmarks/bench_main_job.py --benchmark-only        # ~2 minutes on 2 idle CPU cores

One run in a subprocess, exactly the README's first command, with a fresh demo-data cache (the first run's cost,
writing the shards included) unless BLIP2FAST_MAIN_JOB_CACHE names a cache to reuse. Reported (extra_info and the
comparison table): wall seconds of the whole command, the CPU seconds it and its loader workers used (on a shared
machine wall time grows with the other load; CPU seconds / cores is the idle-machine floor), the load average
around the run, the training throughput from metrics.jsonl, and R@1 both ways against chance. The run must learn:
R@1 at least 10x chance both ways (the README's run is ~70x).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main_job(workdir: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)  # the user's environment: no interpreter (nothing Triton runs on a CPU)
    env["BLIP2FAST_DEMO_CACHE"] = os.environ.get("BLIP2FAST_MAIN_JOB_CACHE") or os.path.join(workdir, "cache")
    run_dir = os.path.join(workdir, "run")
    load_before = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "blip2fast.train", f"--checkpoint.dir={run_dir}"], cwd=workdir,
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    after = [r for r in records if r.get("event") == "eval" and r.get("when") == "after"][-1]
    train = [r for r in records if r.get("event") == "train"]
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "cores": os.cpu_count(),
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
            "train_samples_per_s": round(sum(r["samples_per_s"] for r in train) / len(train), 1),
            "i2t_r1": after["i2t_r1"], "t2i_r1": after["t2i_r1"], "chance": after["chance"], "n": after["n"],
            "steps": train[-1]["step"], "stdout_tail": proc.stdout.splitlines()[-3:]}


def test_main_job(benchmark, tmp_path):
    result = {}
    benchmark.pedantic(lambda: result.update(run_main_job(str(tmp_path))), rounds=1, iterations=1, warmup_rounds=0)
    benchmark.group = "main job (python -m blip2fast.train)"
    samples = result["steps"] * 64
    benchmark.extra_info.update(impl="demo preset", median_ms=result["wall_s"] * 1e3,
                                samples_per_s=round(samples / result["wall_s"], 1), **result)
    print(f"\nmain job: {result['wall_s']:.0f} s wall, {result['cpu_s']:.0f} CPU s on {result['cores']} cores "
          f"(load {result['load_before'][0]:.1f} -> {result['load_after'][0]:.1f}); R@1 i2t {result['i2t_r1']:.3f} "
          f"t2i {result['t2i_r1']:.3f} vs chance {result['chance']:.4f}")
    assert min(result["i2t_r1"], result["t2i_r1"]) >= 10 * result["chance"], result
