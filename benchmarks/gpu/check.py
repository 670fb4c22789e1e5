"""Stages of the device check (driven by benchmarks/gpu/run.sh) and the results file they share.

    python benchmarks/gpu/check.py init                      fresh $OUT/gpu_results.json, every stage pending
    python benchmarks/gpu/check.py env                       versions, GPU, commit -> stages.env.data
    python benchmarks/gpu/check.py verify-build              blip2fast._C imports (with CUDA kernels on a GPU run)
    python benchmarks/gpu/check.py bench                     ITM sampler: torch reference vs blip2fast._C
    python benchmarks/gpu/check.py attention                 cuda-marked attention tests + the attention benchmark
    python benchmarks/gpu/check.py finish --stage S --rc N --started T0 --limit L --log F [--pytest]

Every command rewrites $OUT/gpu_results.json (atomically), so whatever stage dies, what came before is kept.
`finish` runs after each stage, whatever its outcome: it records status/seconds and prints one line per stage.
BLIP2FAST_DRY_RUN=1 runs everything on the CPU at tiny sizes (CI uses that to keep this script from rotting).
`init` and `finish` import nothing heavy (no torch), so they stay instant even when a stage timed out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

STAGES = ("env", "build", "cuda_tests", "bench", "attention")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def dry_run() -> bool:
    return os.environ.get("BLIP2FAST_DRY_RUN", "0") == "1"


def out_dir() -> str:
    return os.environ.get("OUT") or os.path.join(ROOT, "out")


def results_path() -> str:
    return os.path.join(out_dir(), "gpu_results.json")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def load() -> dict:
    try:
        with open(results_path()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return fresh()


def save(results: dict) -> None:
    results["updated"] = now()
    stages = results["stages"].values()
    results["ok"] = all(s["status"] == "ok" for s in stages)
    os.makedirs(out_dir(), exist_ok=True)
    tmp = results_path() + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, results_path())


def fresh() -> dict:
    return {
        "schema": 1,
        "mode": "dry-run (CPU, tiny sizes)" if dry_run() else "gpu",
        "started": now(),
        "updated": now(),
        "ok": False,
        "stages": {s: {"status": "pending", "seconds": None, "data": {}} for s in STAGES},
    }


def put_data(stage: str, data: dict) -> None:
    results = load()
    results["stages"].setdefault(stage, {"status": "pending", "seconds": None, "data": {}})
    results["stages"][stage]["data"].update(data)
    save(results)


def _run(cmd: list[str], timeout: float = 20) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        return (p.stdout + p.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({type(e).__name__}: {e})"


# --------------------------------------------------------------------------------------------------------------
# Stages


def cmd_env(_args) -> int:
    data: dict = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform()}
    commit = _run(["git", "rev-parse", "HEAD"])
    data["git_commit"] = commit if re.fullmatch(r"[0-9a-f]{40}", commit) else "unknown"
    known = data["git_commit"] != "unknown"
    data["git_dirty_files"] = len(_run(["git", "status", "--porcelain"]).splitlines()) if known else None
    data["nvcc"] = _run(["nvcc", "--version"]).splitlines()[-1:] if shutil.which("nvcc") else "not found"
    data["gcc"] = _run(["gcc", "--version"]).splitlines()[:1]
    data["nvidia_smi"] = (
        _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"])
        if shutil.which("nvidia-smi") else "not found"
    )
    for mod in ("torch", "triton", "transformers", "numpy", "setuptools", "wheel", "ninja", "pytest", "webdataset"):
        try:
            m = __import__(mod)
            data[mod] = getattr(m, "__version__", "present")
        except Exception as e:  # a missing package is data here, not an error
            data[mod] = f"missing ({type(e).__name__})"
    import torch

    data["torch_cuda"] = torch.version.cuda
    data["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        data["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                       "memory_gib": round(p.total_memory / 2**30, 1)}
    put_data("env", data)
    print(json.dumps(data, indent=1))
    if not dry_run() and not torch.cuda.is_available():
        print("env: torch sees no CUDA GPU on a GPU run", file=sys.stderr)
        return 1
    return 0


def cmd_verify_build(_args) -> int:
    sys.path.insert(0, ROOT)
    import torch

    from blip2fast.ops import _extension

    status = _extension.load_extension()
    data = {"loaded": status.available, "reason": status.reason, "cuda_kernels": status.cuda}
    if status.available:
        import blip2fast._C as C

        data["so"] = os.path.relpath(C.__file__, ROOT)
    put_data("build", data)
    print(json.dumps(data))
    if not status.available:
        print(f"build: blip2fast._C is not usable: {status.reason}", file=sys.stderr)
        return 1
    if torch.cuda.is_available() and not status.cuda:
        print("build: a GPU is present but blip2fast._C has no CUDA kernels (built without CUDA?)", file=sys.stderr)
        return 1
    return 0


def _time_ms(fn, device: str, reps: int, inner: int) -> float:
    """Median over `reps` batches of `inner` calls, per call, in ms (CUDA events on a GPU, perf_counter on a CPU)."""
    import torch

    for _ in range(3):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / inner)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / inner)
    times.sort()
    return times[len(times) // 2]


def cmd_bench(_args) -> int:
    sys.path.insert(0, ROOT)
    import torch

    from blip2fast.ops import _extension, hashing
    from blip2fast.ops.itm_sampling import itm_sample_negatives, itm_sample_negatives_ref

    status = _extension.load_extension()
    if not status:
        put_data("bench", {"error": f"blip2fast._C not loaded: {status.reason}"})
        print(f"bench: blip2fast._C not loaded: {status.reason}", file=sys.stderr)
        return 1
    device = "cpu" if dry_run() else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        put_data("bench", {"error": "no CUDA GPU"})
        print("bench: no CUDA GPU", file=sys.stderr)
        return 1
    rows, col_list, reps, inner = (8, (16, 64), 3, 2) if dry_run() else (128, (128, 1024, 8192), 15, 20)
    dtypes = (torch.float32,) if dry_run() else (torch.float32, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    results, all_identical = [], True
    for dtype in dtypes:
        for cols in col_list:
            sim = (torch.randn(rows, cols, generator=gen) * 3).to(device=device, dtype=dtype)
            sim[0, : cols // 2] = float("nan")  # keep the non-finite path in the timed work
            positive = torch.randint(0, cols, (rows,), generator=gen).to(device)
            row_ids = torch.arange(rows, device=device)
            seed_step = torch.tensor([1234, 5], dtype=torch.int64, device=device)
            stream = hashing.STREAM_ITM_NEG_IMAGE_FOR_TEXT
            ref = itm_sample_negatives_ref(sim, positive, row_ids, seed_step, stream)
            ext = itm_sample_negatives(sim, positive, row_ids, seed_step, stream, backend="cpp")
            identical = bool(torch.equal(ref[0].cpu(), ext[0].cpu()) and int(ref[1]) == int(ext[1]))
            all_identical &= identical
            t_ref = _time_ms(lambda: itm_sample_negatives_ref(sim, positive, row_ids, seed_step, stream), device,
                             reps, inner)
            t_ext = _time_ms(lambda: itm_sample_negatives(sim, positive, row_ids, seed_step, stream, backend="cpp"),
                             device, reps, inner)
            row = {
                "dtype": str(dtype).removeprefix("torch."), "rows": rows, "cols": cols, "device": device,
                "identical_to_reference": identical,
                "ref_ms": round(t_ref, 4), "ext_ms": round(t_ext, 4), "speedup": round(t_ref / t_ext, 2),
                # sim is read once: bytes / time against the HBM roofline (~4.8 TB/s on an H200)
                "ext_GBps": round(sim.numel() * sim.element_size() / (t_ext * 1e-3) / 1e9, 2),
                "ext_Gelem_per_s": round(sim.numel() / (t_ext * 1e-3) / 1e9, 3),
            }
            results.append(row)
            print(json.dumps(row))
            put_data("bench", {"results": results, "timing": f"median of {reps} batches of {inner} calls"})
    put_data("bench", {"all_identical": all_identical})
    if not all_identical:
        print("bench: blip2fast._C indices differ from the reference", file=sys.stderr)
        return 1
    return 0


ATTENTION_TESTS = "tests/ops/test_qformer_attention_triton.py"
ATTENTION_BENCH = "benchmarks/bench_qformer_attention.py"


def _pytest(args: list[str], timeout: float) -> tuple[int, str]:
    """Run pytest in a subprocess (its output echoed into this stage's log); (exit code, output). 124 = timed out."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    print("$", " ".join(cmd), flush=True)
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, out = 124, out + f"\n(killed after {timeout:.0f} s)"
    print(out[-6000:], flush=True)
    return rc, out


def cmd_attention(_args) -> int:
    """The Q-Former attention on the device: its cuda-marked tests (bf16, Q-Former shapes at batch 128, CUDA-graph
    replay without host syncs), then benchmarks/bench_qformer_attention.py (Triton vs reference vs SDPA; time,
    TFLOP/s, peak memory, speedups) with its JSON summarised into stages.attention.data. Dry run: the tests are
    collected and skip (no GPU), the benchmark runs at CPU sizes."""
    rc_tests, log = _pytest(["-m", "cuda", ATTENTION_TESTS], timeout=90 if not dry_run() else 120)
    tests = _pytest_summary(log)
    if rc_tests == 5:
        tests["error"] = "no cuda-marked attention tests collected"
    put_data("attention", {"tests": tests, "tests_rc": rc_tests})
    json_path = os.path.join(out_dir(), "bench_attention.json")
    if os.path.exists(json_path):
        os.remove(json_path)  # never summarise a previous run's numbers
    rc_bench, log = _pytest([ATTENTION_BENCH, f"--benchmark-json={json_path}"], timeout=55 if not dry_run() else 120)
    rows, speedups = [], {}
    try:
        with open(json_path) as f:
            bench = json.load(f)
        for b in bench.get("benchmarks", []):
            info = b.get("extra_info", {})
            rows.append({k: info.get(k) for k in ("shape", "pass_", "impl", "device", "dtype", "median_ms", "tflops",
                                                  "peak_mem_mb", "speedup_vs_torch", "max_rel_err_vs_torch")})
            key = f"{info.get('shape')} {info.get('pass_')}"
            speedups.setdefault(key, {})[info.get("impl")] = info.get("speedup_vs_torch")
    except (OSError, ValueError) as e:
        rows = [{"error": f"no benchmark JSON ({type(e).__name__}: {e})"}]
    put_data("attention", {"bench": rows, "speedup_vs_torch": speedups, "bench_rc": rc_bench,
                           "bench_json": os.path.basename(json_path)})
    if rc_tests != 0:
        print(f"attention: cuda-marked attention tests failed (pytest exit code {rc_tests})", file=sys.stderr)
    if rc_bench != 0:
        print(f"attention: benchmark failed (pytest exit code {rc_bench})", file=sys.stderr)
    return 0 if rc_tests == 0 and rc_bench == 0 else 1


# --------------------------------------------------------------------------------------------------------------
# Bookkeeping


def _pytest_summary(log: str) -> dict:
    counts = {}
    for line in reversed(log.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", line)
        if found and ("in " in line or "no tests ran" in line):
            counts = {k if k != "error" else "errors": int(v) for v, k in found}
            counts["summary"] = line.strip("= ")
            break
    return counts


def _last_error_line(log: str, stage: str) -> str:
    lines = [l.strip() for l in log.splitlines() if l.strip()]
    for l in reversed(lines):  # our own one-line verdicts first ("bench: ...")
        if l.startswith(f"{stage}: "):
            return l[:300]
    for l in reversed(lines):
        if re.search(r"error|Error|FAILED|failed|Traceback|No such|not found", l):
            return l[:300]
    return lines[-1][:300] if lines else "(no output)"


def cmd_finish(args) -> int:
    args.seconds = max(0.0, time.time() - args.started)
    results = load()
    stage = results["stages"].setdefault(args.stage, {"status": "pending", "seconds": None, "data": {}})
    log = ""
    if args.log and os.path.exists(args.log):
        with open(args.log, errors="replace") as f:
            log = f.read()
    if args.skip_reason:
        status, message = "skipped", args.skip_reason
    elif args.rc in (124, 137):
        status, message = "timeout", f"killed after its {args.limit} s limit"
    elif args.rc == 0:
        status, message = "ok", ""
    else:
        status, message = "failed", _last_error_line(log, args.stage)
    if args.pytest:
        summary = _pytest_summary(log)
        stage["data"]["pytest"] = summary
        if args.rc == 5:
            message = "pytest collected no tests (exit code 5)"
    stage.update(status=status, rc=args.rc, seconds=round(args.seconds, 1), limit_s=args.limit, message=message)
    if args.log:
        stage["log"] = os.path.basename(args.log)
    save(results)
    line = f"stage {args.stage}: {status.upper()} ({args.seconds:.1f} s of {args.limit} s)"
    print(line + (f": {message}" if message else ""), flush=True)
    return 0


def cmd_init(_args) -> int:
    save(fresh())
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("init")
    sub.add_parser("env")
    sub.add_parser("verify-build")
    sub.add_parser("bench")
    sub.add_parser("attention")
    f = sub.add_parser("finish")
    f.add_argument("--stage", required=True)
    f.add_argument("--rc", type=int, required=True)
    f.add_argument("--started", type=float, required=True, help="the stage's start, seconds since the epoch")
    f.add_argument("--limit", type=int, required=True)
    f.add_argument("--log", default="")
    f.add_argument("--pytest", action="store_true", help="parse a pytest summary from the log")
    f.add_argument("--skip-reason", default="")
    args = p.parse_args()
    return {"init": cmd_init, "env": cmd_env, "verify-build": cmd_verify_build, "bench": cmd_bench,
            "attention": cmd_attention, "finish": cmd_finish}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
