"""Stages of the device check (driven by benchmarks/gpu/run.sh) and the results file they share.

    python benchmarks/gpu/check.py init                      fresh $OUT/gpu_results.json, every stage pending
    python benchmarks/gpu/check.py env                       versions, GPU, commit -> stages.env.data
    python benchmarks/gpu/check.py verify-build              blip2fast._C imports (with CUDA kernels on a GPU run)
    python benchmarks/gpu/check.py bench                     ITM sampler: torch reference vs blip2fast._C
    python benchmarks/gpu/check.py attention                 cuda-marked attention tests + the attention benchmark
    python benchmarks/gpu/check.py ops                       every per-op benchmarks/bench_*.py, one pytest each
    python benchmarks/gpu/check.py e2e --stage S             one end-to-end benchmark file (E2E_FILES[S])
    python benchmarks/gpu/check.py finish --stage S --rc N --started T0 --limit L --log F [--pytest]

Every command rewrites $OUT/gpu_results.json (atomically), so whatever stage dies, what came before is kept.
`finish` runs after each stage, whatever its outcome: it records status/seconds and prints one line per stage.
BLIP2FAST_DRY_RUN=1 runs everything on the CPU at tiny sizes (CI uses that to keep this script from rotting).
`init` and `finish` import nothing heavy (no torch), so they stay instant even when a stage timed out.
Benchmark stages store their rows (benchmarks/report.py `rows_from`: "e2e_rows", "op_rows") in their stage data,
so `python benchmarks/report.py gpu_results.json` renders the README table from this one file. A stage's time
limit reaches the commands as BLIP2FAST_STAGE_LIMIT_S; pytest subprocesses stop a few seconds before it, so the
rows of the benchmarks that finished are still summarised. BLIP2FAST_STAGES (run.sh --stages) selects stages; the
others are recorded as "not_selected" and do not count against "ok".
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
from typing import Optional

STAGES = ("env", "build", "cuda_tests", "e2e_stage1", "e2e_stage2", "e2e_qformer_hf", "train_modes", "bench",
          "attention", "ops")  # run.sh's order
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH_DIR = os.path.join(ROOT, "benchmarks")
# end-to-end stages: stage -> benchmark file (rows are e2e rows; bench_train_modes.py's may be either kind)
E2E_FILES = {
    "e2e_stage1": "benchmarks/bench_stage1_step.py",
    "e2e_stage2": "benchmarks/bench_stage2_step.py",
    "e2e_qformer_hf": "benchmarks/bench_qformer_hf.py",
    "train_modes": "benchmarks/bench_train_modes.py",
}


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
    results["ok"] = all(s["status"] in ("ok", "not_selected") for s in stages)
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


def _pytest(args: list[str], timeout: float, env: Optional[dict] = None) -> tuple[int, str]:
    """Run pytest in a subprocess (its output echoed into this stage's log); (exit code, output). 124 = timed out."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    print("$", " ".join(cmd), f"(timeout {timeout:.0f} s)", flush=True)
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env=None if env is None else {**os.environ, **env})
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
    deadline = time.time() + _stage_limit(150)
    rc_tests, log = _pytest(["-m", "cuda", ATTENTION_TESTS], timeout=max(10.0, 0.55 * (deadline - time.time())))
    tests = _pytest_summary(log)
    if rc_tests == 5:
        tests["error"] = "no cuda-marked attention tests collected"
    put_data("attention", {"tests": tests, "tests_rc": rc_tests})
    json_path = os.path.join(out_dir(), "bench_attention.json")
    if os.path.exists(json_path):
        os.remove(json_path)  # never summarise a previous run's numbers
    rc_bench, log = _pytest([ATTENTION_BENCH, f"--benchmark-json={json_path}"],
                            timeout=max(10.0, deadline - time.time()))
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
    _, op_rows, _ = _read_rows(json_path)  # the same rows in report.py's form, for the README table
    put_data("attention", {"bench": rows, "speedup_vs_torch": speedups, "bench_rc": rc_bench,
                           "bench_json": os.path.basename(json_path), "op_rows": op_rows})
    if rc_tests != 0:
        print(f"attention: cuda-marked attention tests failed (pytest exit code {rc_tests})", file=sys.stderr)
    if rc_bench != 0:
        print(f"attention: benchmark failed (pytest exit code {rc_bench})", file=sys.stderr)
    return 0 if rc_tests == 0 and rc_bench == 0 else 1


def _stage_limit(default: float) -> float:
    """Seconds this stage may still use (run.sh passes its limit), minus a margin for summarising."""
    try:
        limit = float(os.environ.get("BLIP2FAST_STAGE_LIMIT_S", default))
    except ValueError:
        limit = default
    return max(10.0, limit - 8.0)


def _report():
    """benchmarks/report.py (standard library only), for its row readers."""
    if BENCH_DIR not in sys.path:
        sys.path.insert(0, BENCH_DIR)
    import report

    return report


def _read_rows(json_path: str, jsonl_path: Optional[str] = None) -> tuple[list, list, str]:
    """(e2e rows, op rows, source) from a pytest-benchmark JSON, else from the rows the tests appended one by one
    to `jsonl_path` (what is left when pytest was stopped before writing its JSON)."""
    report = _report()
    try:
        with open(json_path) as f:
            e2e, ops = report.rows_from(json.load(f))
        return e2e, ops, os.path.basename(json_path)
    except (OSError, ValueError):
        pass
    rows = []
    if jsonl_path and os.path.exists(jsonl_path):
        with open(jsonl_path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    e2e = [r for r in rows if "bench" in r and "samples_per_s" in r]
    ops = [r for r in rows if r not in e2e]
    return e2e, ops, (os.path.basename(jsonl_path) + " (partial)") if rows else "none"


def _e2e_summary(rows: list) -> str:
    """One line: each benchmark's blip2fast samples/s, speedups and MFU."""
    parts = []
    ours = [r for r in rows if r.get("impl") == "blip2fast"]
    for r in ours or rows:  # bench_train_modes.py's rows are modes (eager, cuda_graphs, ...), not blip2fast vs peers
        sp = ", ".join(f"{v:.2f}x vs {k}" for k, v in (r.get("speedup_vs") or {}).items())
        mfu = r.get("mfu")
        name = r["bench"] if ours else f"{r['bench']}[{r.get('impl')}]"
        parts.append(f"{name}: {r['samples_per_s']:.4g} samples/s" + (f" ({sp})" if sp else "")
                     + ("" if mfu is None else f", MFU {100 * mfu:.1f}%"))
    return "; ".join(parts)


def cmd_e2e(args) -> int:
    """One end-to-end benchmark file (E2E_FILES[stage]) in a pytest subprocess; its rows into the stage's data."""
    stage = args.stage
    rel = E2E_FILES[stage]
    if not os.path.exists(os.path.join(ROOT, rel)):  # e.g. bench_train_modes.py before it lands: nothing to run
        put_data(stage, {"skipped": f"{rel} not found"})
        print(f"{stage}: {rel} not found, nothing to run")
        return 0
    json_path = os.path.join(out_dir(), f"bench_{stage}.json")
    jsonl_path = os.path.join(out_dir(), f"rows_{stage}.jsonl")
    for p in (json_path, jsonl_path):
        if os.path.exists(p):
            os.remove(p)  # never summarise a previous run's numbers
    rc, log = _pytest([rel, f"--benchmark-json={json_path}"], timeout=_stage_limit(300),
                      env={"BLIP2FAST_ROWS_JSONL": jsonl_path})
    e2e, ops, source = _read_rows(json_path, jsonl_path)
    summary = _e2e_summary(e2e)
    put_data(stage, {"e2e_rows": e2e, "op_rows": ops, "rows_from": source, "tests": _pytest_summary(log),
                     "pytest_rc": rc, "summary": summary})
    print(f"{stage} rows: {summary or 'none'}")
    if rc != 0:
        print(f"{stage}: pytest exit code {rc} ({'stopped at the stage limit' if rc == 124 else 'see the log'}); "
              f"{len(e2e) + len(ops)} rows kept", file=sys.stderr)
    return 0 if rc == 0 else 1


OWN_STAGE_BENCHES = {os.path.basename(p) for p in E2E_FILES.values()} | {os.path.basename(ATTENTION_BENCH)}


def cmd_ops(_args) -> int:
    """Every other benchmarks/bench_*.py (the per-op benchmarks: ITC loss, ITM sampling, LayerNorm, linear CE, ...),
    each in its own pytest under what is left of the stage's time, rows rewritten after each file."""
    files = sorted(f for f in os.listdir(BENCH_DIR)
                   if f.startswith("bench_") and f.endswith(".py") and f not in OWN_STAGE_BENCHES)
    deadline = time.time() + _stage_limit(300)
    all_rows, results, failed = [], {}, []
    for f in files:
        left = deadline - time.time()
        if left < 10:
            results[f] = {"status": "skipped", "reason": "no time left in the stage"}
            failed.append(f)
            continue
        stem = f[:-3]
        json_path = os.path.join(out_dir(), f"{stem}.json")
        if os.path.exists(json_path):
            os.remove(json_path)
        rc, log = _pytest([f"benchmarks/{f}", f"--benchmark-json={json_path}"], timeout=left)
        _, ops, source = _read_rows(json_path)
        for r in ops:
            r.setdefault("bench_file", f)
        all_rows += ops
        results[f] = {"rc": rc, "rows": len(ops), "json": source, "tests": _pytest_summary(log)}
        if rc != 0:
            failed.append(f)
        put_data("ops", {"files": results, "op_rows": all_rows})
    put_data("ops", {"files": results, "op_rows": all_rows, "failed": failed})
    if not files:
        print("ops: no per-op benchmark files found", file=sys.stderr)
        return 1
    print(f"ops: {len(files) - len(failed)}/{len(files)} files ok, {len(all_rows)} rows")
    if failed:
        print(f"ops: failed or skipped: {', '.join(failed)}", file=sys.stderr)
    return 0 if not failed else 1


def cmd_not_selected(args) -> int:
    results = load()
    st = results["stages"].setdefault(args.stage, {"status": "pending", "seconds": None, "data": {}})
    st.update(status="not_selected", message="not in BLIP2FAST_STAGES")
    save(results)
    print(f"stage {args.stage}: not selected")
    return 0


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
    sub.add_parser("ops")
    e = sub.add_parser("e2e")
    e.add_argument("--stage", required=True, choices=sorted(E2E_FILES))
    n = sub.add_parser("not-selected")
    n.add_argument("--stage", required=True)
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
            "attention": cmd_attention, "ops": cmd_ops, "e2e": cmd_e2e, "not-selected": cmd_not_selected,
            "finish": cmd_finish}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
