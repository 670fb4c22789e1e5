"""Stages of the device check (driven by benchmarks/gpu/run.sh) and the results file they share.

    python benchmarks/gpu/check.py init --budget-s B          fresh $OUT/gpu_results.json: every stage pending, plan
    python benchmarks/gpu/check.py plan --budget-s B [--check] the stage order with limits adding up (run.sh prints it)
    python benchmarks/gpu/check.py limit --stage S            S's limit in seconds (run.sh reads it)
    python benchmarks/gpu/check.py env                        versions, GPU, commit -> stages.env.data
    python benchmarks/gpu/check.py verify-build               blip2fast._C imports (with CUDA kernels on a GPU run)
    python benchmarks/gpu/check.py fail-build                 the build forced to fail (BLIP2FAST_GPU_FORCE_BUILD_FAIL)
    python benchmarks/gpu/check.py cuda-tests                 every cuda-marked test, tests/ops first
    python benchmarks/gpu/check.py bench                      every per-op benchmark, the attention's first
    python benchmarks/gpu/check.py e2e --stage S              one end-to-end benchmark file (E2E_FILES[S])
    python benchmarks/gpu/check.py predict                    benchmarks/gpu_model.py annotate on the results file
    python benchmarks/gpu/check.py finish --stage S --rc N --started T0 --limit L --log F [--skip-reason R]

The stage table (order, limits, what each shows) is benchmarks/gpu/stages.py. Every command rewrites
$OUT/gpu_results.json (atomically), so whatever stage dies, what came before is kept. `finish` runs after each
stage, whatever its outcome: it records status/seconds and prints one line per stage. BLIP2FAST_DRY_RUN=1 runs
everything on the CPU at tiny sizes (CI uses that to keep this script from rotting). `init`, `plan`, `limit` and
`finish` import nothing heavy (no torch), so they stay instant even when a stage timed out.
Benchmark stages store their rows (benchmarks/report.py `rows_from`: "e2e_rows", "op_rows") in their stage data,
so `python benchmarks/report.py refresh gpu_results.json --readme README.md` refreshes the README tables and
blip2fast/ops/measured_backends.json from this one file. A stage's time limit reaches the commands as
BLIP2FAST_STAGE_LIMIT_S; pytest subprocesses stop a few seconds before it, so the rows of the benchmarks that
finished are still summarised. BLIP2FAST_STAGES (run.sh --stages) selects stages; the others are recorded as
"not_selected" and do not count against "ok"; neither do non-fatal stages (`predict`).
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

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH_DIR = os.path.join(ROOT, "benchmarks")
GPU_DIR = os.path.join(BENCH_DIR, "gpu")
if GPU_DIR not in sys.path:
    sys.path.insert(0, GPU_DIR)
import stages as stage_table  # noqa: E402  (benchmarks/gpu/stages.py: standard library only)

STAGES = stage_table.NAMES  # run.sh's order
COMMIT_FILE = os.path.join(GPU_DIR, "commit.txt")  # written before a run on a tree that travels without .git
# end-to-end stages: stage -> benchmark file (rows are e2e rows; bench_train_modes.py's may be either kind)
E2E_FILES = {
    "e2e_stage1": "benchmarks/bench_stage1_step.py",
    "e2e_stage2": "benchmarks/bench_stage2_step.py",
    "e2e_qformer_hf": "benchmarks/bench_qformer_hf.py",
    "train_modes": "benchmarks/bench_train_modes.py",
}
ATTENTION_BENCH = "benchmarks/bench_qformer_attention.py"
# Not run by this script: the README's main job on the CPU (it reads shards, which needs braceexpand, absent on the
# GPU machine, and it measures the demo, not the kernels); `pytest benchmarks/ --benchmark-only` runs it.
NOT_ON_GPU = {"bench_main_job.py"}


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
    results["ok"] = all(st["status"] in ("ok", "not_selected") or not st.get("fatal", True)
                        for st in results["stages"].values())
    os.makedirs(out_dir(), exist_ok=True)
    tmp = results_path() + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, results_path())


def _stage_record(name: str) -> dict:
    s = stage_table.BY_NAME.get(name)
    return {"status": "pending", "seconds": None, "limit_s": None if s is None else s.limit_s,
            "fatal": True if s is None else s.fatal, "data": {}}


def fresh(budget_s: Optional[float] = None) -> dict:
    budget_s = stage_table.DEFAULT_BUDGET_S if budget_s is None else budget_s
    return {
        "schema": 2,
        "mode": "dry-run (CPU, tiny sizes)" if dry_run() else "gpu",
        "started": now(),
        "updated": now(),
        "ok": False,
        "commit": None,  # filled by the env stage: git rev-parse HEAD, else benchmarks/gpu/commit.txt
        "budget_s": budget_s,
        "plan": stage_table.plan(budget_s, _selected()),
        "stages": {s: _stage_record(s) for s in STAGES},
    }


def _selected() -> Optional[set]:
    sel = os.environ.get("BLIP2FAST_STAGES", "").strip()
    return {x.strip() for x in sel.split(",") if x.strip()} or None


def put_data(stage: str, data: dict) -> None:
    results = load()
    results["stages"].setdefault(stage, _stage_record(stage))
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


def commit_info() -> dict:
    """The commit this tree is: `git rev-parse HEAD` (and the count of changed files) when .git is there, else what
    benchmarks/gpu/commit.txt says ("<40 hex> [changed files]", written just before the tree is sent to a machine
    that receives it without .git: `bash benchmarks/gpu/run.sh --write-commit`), else "unknown"."""
    head = _run(["git", "rev-parse", "HEAD"]) if os.path.isdir(os.path.join(ROOT, ".git")) else ""
    if re.fullmatch(r"[0-9a-f]{40}", head):
        changed = [l for l in _run(["git", "status", "--porcelain"]).splitlines()
                   if not l.endswith("benchmarks/gpu/commit.txt")]  # the stamp itself is no change
        return {"git_commit": head, "git_dirty_files": len(changed), "commit_source": "git"}
    try:
        with open(COMMIT_FILE) as f:
            words = f.read().split()
    except OSError:
        words = []
    if words and re.fullmatch(r"[0-9a-f]{40}", words[0]):
        dirty = int(words[1]) if len(words) > 1 and words[1].isdigit() else None
        return {"git_commit": words[0], "git_dirty_files": dirty, "commit_source": "benchmarks/gpu/commit.txt"}
    return {"git_commit": "unknown", "git_dirty_files": None,
            "commit_source": "none: no .git and no benchmarks/gpu/commit.txt (run.sh --write-commit before sending)"}


def cmd_write_commit(_args) -> int:
    info = commit_info()
    if info["commit_source"] != "git":
        print(f"write-commit: no git repository at {ROOT}: {info['commit_source']}", file=sys.stderr)
        return 1
    with open(COMMIT_FILE, "w") as f:
        f.write(f"{info['git_commit']} {info['git_dirty_files']}\n")
    print(f"wrote {os.path.relpath(COMMIT_FILE, ROOT)}: {info['git_commit']} ({info['git_dirty_files']} changed files)")
    return 0


def cmd_env(_args) -> int:
    data: dict = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform()}
    data.update(commit_info())
    results = load()
    results["commit"], results["dirty"] = data["git_commit"], data["git_dirty_files"]
    save(results)
    data["nvcc"] = _run(["nvcc", "--version"]).splitlines()[-1:] if shutil.which("nvcc") else "not found"
    data["gcc"] = _run(["gcc", "--version"]).splitlines()[:1]
    data["nvidia_smi"] = (
        _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"])
        if shutil.which("nvidia-smi") else "not found"
    )
    from importlib import metadata

    for pkg in ("torch", "triton", "transformers", "numpy", "setuptools", "wheel", "ninja", "pytest", "webdataset",
                "braceexpand", "pycocoevalcap"):
        try:  # the installed version without importing it (transformers alone takes seconds)
            data[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:  # a missing package is data here, not an error
            data[pkg] = "missing"
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


def cmd_fail_build(_args) -> int:
    """What the build stage runs under BLIP2FAST_GPU_FORCE_BUILD_FAIL=1: a failed build, to check that the stages
    after it still run on the Triton and torch paths (tests/benchmarks/test_gpu_script.py)."""
    put_data("build", {"loaded": False, "forced_failure": True})
    print("build: forced to fail (BLIP2FAST_GPU_FORCE_BUILD_FAIL=1): the later stages run without blip2fast._C",
          file=sys.stderr)
    return 1


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


def _outcomes(jsonl_path: str) -> dict:
    """Counts and failures from the per-test lines benchmarks/gpu/pytest_outcomes.py appended (complete even when
    pytest was killed at the stage's limit)."""
    counts: dict = {}
    failed, slowest = [], []
    if os.path.exists(jsonl_path):
        with open(jsonl_path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
                if r["outcome"] in ("failed", "error"):
                    failed.append(f"{r['nodeid']}: {r.get('message', '')}"[:400])
                slowest.append((r.get("duration", 0.0), r["nodeid"]))
    slowest.sort(reverse=True)
    return {"counts": counts, "failed": failed, "slowest": [f"{d:.1f} s {n}" for d, n in slowest[:5]]}


def cuda_test_files() -> list[str]:
    """The test files that hold cuda-marked tests, tests/ops (the kernels) first. Only these are collected: a test
    module that needs a package the GPU machine lacks (tests/data needs braceexpand) must not stop the GPU's run."""
    found = []
    for folder, _, files in os.walk(os.path.join(ROOT, "tests")):
        for f in files:
            if f.startswith("test_") and f.endswith(".py"):
                path = os.path.join(folder, f)
                with open(path, errors="replace") as fh:
                    if re.search(r"mark\.cuda\b", fh.read()):
                        found.append(os.path.relpath(path, ROOT))
    return sorted(found, key=lambda p: (not p.startswith(os.path.join("tests", "ops")), p))


def cmd_cuda_tests(_args) -> int:
    """Every cuda-marked test, tests/ops (the kernels: bf16 at the paper's shapes, no host sync, graph replay) before
    the models and the training step, each outcome recorded as it happens; a module that cannot be collected is
    an error of its own and the others still run."""
    jsonl = os.path.join(out_dir(), "cuda_tests_outcomes.jsonl")
    if os.path.exists(jsonl):
        os.remove(jsonl)
    env = {"BLIP2FAST_OUTCOMES_JSONL": jsonl,
           "PYTHONPATH": os.pathsep.join(p for p in (GPU_DIR, os.environ.get("PYTHONPATH", "")) if p)}
    files = cuda_test_files()
    rc, log = _pytest(["-p", "pytest_outcomes", "--continue-on-collection-errors", "-m", "cuda", *files],
                      timeout=_stage_limit(95), env=env)
    data = {"files": files, "pytest_rc": rc, "pytest": _pytest_summary(log), **_outcomes(jsonl)}
    if rc == 5:
        data["error"] = "pytest collected no cuda-marked tests (exit code 5)"
    put_data("cuda_tests", data)
    c = data["counts"]
    print(f"cuda_tests: {c.get('passed', 0)} passed, {c.get('failed', 0) + c.get('error', 0)} failed, "
          f"{c.get('skipped', 0)} skipped" + (" (stopped at the stage limit)" if rc == 124 else ""))
    for line in data["failed"][:10]:
        print(f"cuda_tests: FAILED {line}", file=sys.stderr)
    return 0 if rc == 0 else 1


def _stage_limit(default: float) -> float:
    """Seconds this stage may still use (run.sh passes its limit), minus a margin for summarising (more on a long
    limit: a loaded CPU in a dry run needs seconds to start the Python that writes the rows)."""
    try:
        limit = float(os.environ.get("BLIP2FAST_STAGE_LIMIT_S", default))
    except ValueError:
        limit = default
    return max(10.0, limit - 6.0 - 0.05 * limit)


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


OWN_STAGE_BENCHES = {os.path.basename(p) for p in E2E_FILES.values()}


def per_op_bench_files() -> list[str]:
    """The per-op benchmarks/bench_*.py, the Q-Former attention's first (the largest kernel, timed with the paper's
    attention dropout), then the others by name. BLIP2FAST_BENCH_FILES=a.py,b.py narrows them (tests)."""
    files = sorted(f for f in os.listdir(BENCH_DIR)
                   if f.startswith("bench_") and f.endswith(".py") and f not in OWN_STAGE_BENCHES
                   and f not in NOT_ON_GPU)
    first = os.path.basename(ATTENTION_BENCH)
    files = ([first] if first in files else []) + [f for f in files if f != first]
    only = {x.strip() for x in os.environ.get("BLIP2FAST_BENCH_FILES", "").split(",") if x.strip()}
    return [f for f in files if f in only] if only else files


def _import_origins() -> dict:
    """Where the benchmarks' Python finds blip2fast, blip2fast.kernels and blip2fast._C, in this stage's environment
    (after a failed build: the source tree, without _C)."""
    code = ("import json, blip2fast, blip2fast.kernels\n"
            "from blip2fast.ops import _extension\n"
            "s = _extension.load_extension()\n"
            "print(json.dumps({'blip2fast': blip2fast.__file__, 'blip2fast.kernels': blip2fast.kernels.__file__,"
            " 'extension': 'loaded' if s else s.reason}))")
    try:
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
        info = json.loads(p.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {k: os.path.relpath(v, ROOT) if k != "extension" else v for k, v in info.items()}


def cmd_bench(_args) -> int:
    """Every per-op benchmark file in its own pytest (a CUDA error in one cannot poison the next) under what is left
    of the stage's time; rows rewritten after each file. `all_identical`: every ITM-sampling backend timed drew the
    reference's negatives (the C++/CUDA and Triton samplers must be bit-identical)."""
    deadline = time.time() + _stage_limit(100)
    put_data("bench", {"imports": _import_origins()})
    files = per_op_bench_files()
    all_rows, results, failed = [], {}, []
    for f in files:
        left = deadline - time.time()
        if left < 10:
            results[f] = {"status": "skipped", "reason": "no time left in the stage"}
            failed.append(f)
            continue
        json_path = os.path.join(out_dir(), f"{f[:-3]}.json")
        if os.path.exists(json_path):
            os.remove(json_path)  # never summarise a previous run's numbers
        rc, log = _pytest([f"benchmarks/{f}", f"--benchmark-json={json_path}"], timeout=left)
        _, ops, source = _read_rows(json_path)
        for r in ops:
            r.setdefault("bench_file", f)
        all_rows += ops
        results[f] = {"rc": rc, "rows": len(ops), "json": source, "tests": _pytest_summary(log)}
        if rc != 0:
            failed.append(f)
        put_data("bench", {"files": results, "op_rows": all_rows})
    sampler = [r for r in all_rows if "indices_equal_reference" in r]
    identical = bool(sampler) and all(r["indices_equal_reference"] for r in sampler)
    speedups: dict = {}
    for r in all_rows:
        if r.get("speedup_vs_torch") is not None:
            speedups.setdefault(str(r.get("group")), {})[str(r.get("impl"))] = r["speedup_vs_torch"]
    put_data("bench", {"files": results, "op_rows": all_rows, "failed": failed, "all_identical": identical,
                       "sampler_impls": sorted({str(r.get("impl")) for r in sampler}),
                       "speedup_vs_torch": speedups})
    if not files:
        print("bench: no per-op benchmark files found", file=sys.stderr)
        return 1
    print(f"bench: {len(files) - len(failed)}/{len(files)} files ok, {len(all_rows)} rows; ITM samplers "
          f"{', '.join(sorted({str(r.get('impl')) for r in sampler})) or 'none'} identical to the reference: "
          f"{identical}")
    if failed:
        print(f"bench: failed or skipped: {', '.join(failed)}", file=sys.stderr)
    if not identical:
        print("bench: an ITM sampler's negatives differ from the reference (or none was timed)", file=sys.stderr)
    return 0 if not failed and identical else 1


def cmd_not_selected(args) -> int:
    results = load()
    st = results["stages"].setdefault(args.stage, _stage_record(args.stage))
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
    stage = results["stages"].setdefault(args.stage, _stage_record(args.stage))
    log = ""
    if args.log and os.path.exists(args.log):
        with open(args.log, errors="replace") as f:
            log = f.read()
    if args.skip_reason:
        status, message, args.seconds = "skipped", args.skip_reason, 0.0
    elif args.rc in (124, 137):
        status, message = "timeout", f"killed after its {args.limit} s limit"
    elif args.rc == 0:
        status, message = "ok", ""
    else:
        status, message = "failed", _last_error_line(log, args.stage)
    stage.update(status=status, rc=args.rc, seconds=round(args.seconds, 1), limit_s=args.limit, message=message)
    if args.log:
        stage["log"] = os.path.basename(args.log)
    save(results)
    line = f"stage {args.stage}: {status.upper()} ({args.seconds:.1f} s of {args.limit} s)"
    print(line + (f": {message}" if message else ""), flush=True)
    return 0


def _budget(args) -> float:
    return stage_table.DEFAULT_BUDGET_S if args.budget_s is None else args.budget_s


def cmd_init(args) -> int:
    save(fresh(_budget(args)))
    return 0


def cmd_budget(args) -> int:
    """run.sh reads the budget it enforces here: the given or default one, DRY_RUN_FACTOR times it in a dry run."""
    print(int(_budget(args) * (stage_table.DRY_RUN_FACTOR if dry_run() else 1)))
    return 0


def cmd_limit(args) -> int:
    """run.sh reads a stage's limit here (one table); a CPU dry run gets DRY_RUN_FACTOR times it."""
    limit = stage_table.BY_NAME[args.stage].limit_s
    print(limit * stage_table.DRY_RUN_FACTOR if dry_run() else limit)
    return 0


def cmd_plan(args) -> int:
    """The stage order with each limit and their running sum against the budget (the GPU's, also in a dry run).
    --check: fail when the limits do not fit the default budget (every stage must run when none finishes early)."""
    budget = _budget(args)
    unknown = sorted((_selected() or set()) - set(STAGES))
    if unknown:
        print(f"--stages: no stage named {', '.join(unknown)}; the stages are {','.join(STAGES)}", file=sys.stderr)
        return 2
    rows = stage_table.plan(budget, _selected())
    total = sum(s.limit_s for s in stage_table.STAGES)
    print(f"GPU plan: {len(rows)} stages, most valuable first; budget {budget:g} s (default "
          f"{stage_table.DEFAULT_BUDGET_S} s); a stage runs only if its whole limit fits in what is left")
    print(f"  {'#':>2}  {'stage':15s} {'limit s':>7s} {'sum s':>6s} {'H200 s (est.)':>13s}  when every earlier "
          "stage takes its whole limit")
    for r in rows:
        verdict = ("not selected" if not r["selected"] else "runs" if r["runs"] else
                   "skipped first when time is short")
        print(f"  {r['order']:>2}  {r['stage']:15s} {r['limit_s']:>7d} {r['cumulative_s']:>6d} {r['typical_s']:>13d}"
              f"  {verdict}{'' if r['fatal'] else ' (non-fatal)'}")
    print(f"  limits add up to {total} s; the default budget is {stage_table.DEFAULT_BUDGET_S} s; typical total "
          f"{sum(s.typical_s for s in stage_table.STAGES)} s (estimated)")
    if dry_run():
        print(f"  (this CPU dry run gives each stage {stage_table.DRY_RUN_FACTOR}x its limit, within "
              f"{stage_table.DRY_RUN_FACTOR}x the budget)")
    if args.check and total > stage_table.DEFAULT_BUDGET_S:
        print(f"plan: the stage limits add up to {total} s, over the default budget of "
              f"{stage_table.DEFAULT_BUDGET_S} s: shorten a limit in benchmarks/gpu/stages.py", file=sys.stderr)
        return 1
    return 0


def cmd_summary(_args) -> int:
    """One line per stage; exit code 0 iff the run is ok (every fatal selected stage ok)."""
    r = load()
    for name, s in r["stages"].items():
        print(f"  {name:15s} {s['status']:12s} {s.get('seconds')} s of {s.get('limit_s')}  {s.get('message', '')}")
    print(f"  commit {r.get('commit')} ({r.get('dirty')} changed files); ok: {r['ok']}")
    return 0 if r["ok"] else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("init", "plan", "budget"):
        q = sub.add_parser(name)
        q.add_argument("--budget-s", type=float, default=None)
        if name == "plan":
            q.add_argument("--check", action="store_true")
    for name in ("env", "write-commit", "verify-build", "fail-build", "cuda-tests", "bench", "summary"):
        sub.add_parser(name)
    for name in ("limit", "not-selected"):
        sub.add_parser(name).add_argument("--stage", required=True, choices=STAGES)
    e = sub.add_parser("e2e")
    e.add_argument("--stage", required=True, choices=sorted(E2E_FILES))
    f = sub.add_parser("finish")
    f.add_argument("--stage", required=True)
    f.add_argument("--rc", type=int, required=True)
    f.add_argument("--started", type=float, required=True, help="the stage's start, seconds since the epoch")
    f.add_argument("--limit", type=int, required=True)
    f.add_argument("--log", default="")
    f.add_argument("--skip-reason", default="")
    args = p.parse_args()
    return {"init": cmd_init, "plan": cmd_plan, "budget": cmd_budget, "limit": cmd_limit, "env": cmd_env,
            "write-commit": cmd_write_commit,
            "verify-build": cmd_verify_build, "fail-build": cmd_fail_build, "cuda-tests": cmd_cuda_tests,
            "bench": cmd_bench, "e2e": cmd_e2e, "not-selected": cmd_not_selected, "finish": cmd_finish,
            "summary": cmd_summary}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
