"""benchmarks/gpu/run.sh and check.py on the CPU: the plan fits the budget, a stage that cannot fit is skipped up front,
a failed build leaves the Triton stages running, the commit is known without .git, and the dry run sees Python as
the GPU machine does. The whole dry run is CI's job (.ci/run); these run one or two stages each."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN_SH = os.path.join(ROOT, "benchmarks", "gpu", "run.sh")
LIKE_GPU_MACHINE = os.path.join(ROOT, "benchmarks", "gpu", "like_gpu_machine")


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


stages = _load("gpu_stages", os.path.join(ROOT, "benchmarks", "gpu", "stages.py"))
check = _load("gpu_check", os.path.join(ROOT, "benchmarks", "gpu", "check.py"))


def run_sh(*args: str, out: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BLIP2FAST_")}
    full_env.update({"OUT": out, "PYTHON": sys.executable, **(env or {})})
    return subprocess.run(["bash", RUN_SH, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def test_stage_order_and_limits_fit_the_default_budget():
    names = [s.name for s in stages.STAGES]
    # most valuable first: build, kernel correctness, per-op timings, the whole step, then the peers
    assert names[:5] == ["env", "build", "cuda_tests", "bench", "train_modes"]
    assert names[-1] == "predict" and not stages.BY_NAME["predict"].fatal
    assert all(n.startswith("e2e_") for n in names[5:-1])
    total = sum(s.limit_s for s in stages.STAGES)
    assert total <= stages.DEFAULT_BUDGET_S < 480  # the script under 8 minutes
    assert all(0 < s.typical_s <= s.limit_s for s in stages.STAGES)
    assert all(r["runs"] for r in stages.plan(stages.DEFAULT_BUDGET_S))


def test_a_short_budget_skips_what_does_not_fit_and_keeps_the_order():
    rows = stages.plan(290)
    used = 0
    for r in rows:  # the worst case: each stage that runs takes its whole limit
        assert r["runs"] == (290 - used >= r["limit_s"])
        used += r["limit_s"] if r["runs"] else 0
        assert r["cumulative_s"] == used <= 290
    assert [r["stage"] for r in rows] == list(stages.NAMES)
    assert not rows[3]["runs"] and rows[4]["runs"]  # bench does not fit; the shorter train_modes still does


def test_plan_command_prints_the_order_with_limits_adding_up(tmp_path):
    p = run_sh("--plan", "--budget-s", "300", out=str(tmp_path))
    assert p.returncode == 0, p.stderr
    lines = [l.split() for l in p.stdout.splitlines() if l.strip()[:1].isdigit()]
    assert [l[1] for l in lines] == list(stages.NAMES)
    limits, sums = [int(l[2]) for l in lines], [int(l[3]) for l in lines]
    runs = [" ".join(l[5:]).startswith("runs") for l in lines]
    assert sums[-1] == sum(x for x, r in zip(limits, runs) if r) <= 300
    assert "skipped first when time is short" in p.stdout
    bad = run_sh("--budget-s", "soon", out=str(tmp_path))
    assert bad.returncode == 2 and "--budget-s soon" in bad.stderr
    typo = run_sh("--plan", "--stages=env,benhc", out=str(tmp_path))
    assert typo.returncode == 2 and "no stage named benhc" in typo.stderr


def test_a_stage_that_cannot_fit_is_skipped_up_front(tmp_path):
    """Budget 3 s (18 s in a dry run): env's limit does not fit, so env is never started (no log), recorded as
    skipped with the reason, and the run is not ok."""
    p = run_sh("--dry-run", "--budget-s", "3", "--stages=env", out=str(tmp_path), timeout=60)
    assert p.returncode == 1
    r = json.loads((tmp_path / "gpu_results.json").read_text())
    env = r["stages"]["env"]
    assert env["status"] == "skipped" and "does not fit" in env["message"] and env["seconds"] == 0
    assert not (tmp_path / "env.log").exists() and not r["ok"]
    assert r["budget_s"] == 3 and r["stages"]["bench"]["status"] == "not_selected"


def test_build_failure_leaves_the_triton_stages_running(tmp_path):
    """The build forced to fail (BLIP2FAST_GPU_FORCE_BUILD_FAIL=1): the per-op stage still runs the Triton ITM
    sampler (under the interpreter here), with blip2fast and blip2fast.kernels from the source tree (no install
    mapping) and no blip2fast._C; the C++ rows skip. The build stage is failed, so the run is not ok."""
    p = run_sh("--dry-run", "--stages=env,build,bench", out=str(tmp_path), timeout=240,
               env={"BLIP2FAST_GPU_FORCE_BUILD_FAIL": "1", "BLIP2FAST_BENCH_FILES": "bench_itm_sampling.py"})
    r = json.loads((tmp_path / "gpu_results.json").read_text())
    assert r["stages"]["build"]["status"] == "failed" and r["stages"]["build"]["data"]["forced_failure"]
    bench = r["stages"]["bench"]
    assert bench["status"] == "ok", p.stdout[-3000:] + p.stderr[-3000:]
    assert bench["data"]["imports"] == {
        "blip2fast": os.path.join("blip2fast", "__init__.py"),
        "blip2fast.kernels": os.path.join("kernels", "__init__.py"),
        "extension": "BLIP2FAST_BUILD_EXT=0 is set: the compiled extension is disabled"}
    impls = {row["impl"] for row in bench["data"]["op_rows"]}
    assert impls == {"triton", "torch"} and bench["data"]["all_identical"]
    assert p.returncode == 1 and not r["ok"]
    if os.path.isdir(os.path.join(ROOT, ".git")):  # the env stage put the commit at the top of the results
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        assert r["commit"] == head == r["stages"]["env"]["data"]["git_commit"]


def test_commit_comes_from_git_else_from_the_stamp_file(tmp_path, monkeypatch):
    here = check.commit_info()
    if os.path.isdir(os.path.join(ROOT, ".git")):
        assert here["commit_source"] == "git" and len(here["git_commit"]) == 40
    monkeypatch.setattr(check, "ROOT", str(tmp_path))  # a tree without .git, as the GPU machine may get it
    stamp = tmp_path / "commit.txt"
    monkeypatch.setattr(check, "COMMIT_FILE", str(stamp))
    assert check.commit_info()["git_commit"] == "unknown"
    sha = "0123456789abcdef0123456789abcdef01234567"
    stamp.write_text(f"{sha} 3\n")
    assert check.commit_info() == {"git_commit": sha, "git_dirty_files": 3,
                                   "commit_source": "benchmarks/gpu/commit.txt"}
    stamp.write_text("not-a-commit\n")
    assert check.commit_info()["git_commit"] == "unknown"


def test_dry_run_python_lacks_what_the_gpu_machine_lacks():
    """With like_gpu_machine/ on PYTHONPATH (the dry run), webdataset, braceexpand and pycocoevalcap cannot be
    imported, and the modules on the GPU script's path import without them."""
    code = ("import importlib, json\n"
            "out = {}\n"
            "for m in ('webdataset', 'braceexpand', 'pycocoevalcap', 'blip2fast.training.step', "
            "'blip2fast.training.trainer', 'blip2fast.models.fp8', 'blip2fast.ops.attention', 'e2e_support', "
            "'transformers.models.opt.modeling_opt', 'transformers.models.blip_2.modeling_blip_2'):\n"
            "    try:\n"
            "        importlib.import_module(m); out[m] = 'ok'\n"
            "    except ImportError as e:\n"
            "        out[m] = str(e)\n"
            "print(json.dumps(out))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([LIKE_GPU_MACHINE, os.path.join(ROOT, "benchmarks")])}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    got = json.loads(p.stdout.strip().splitlines()[-1])
    for absent in ("webdataset", "braceexpand", "pycocoevalcap"):
        assert "the GPU machine does not have it" in got[absent]
    # transformers' models too: its optional-package probes (find_spec) must still see "absent", not an error
    assert {m: v for m, v in got.items() if "." in m or m == "e2e_support"} == {
        m: "ok" for m in ("blip2fast.training.step", "blip2fast.training.trainer", "blip2fast.models.fp8",
                          "blip2fast.ops.attention", "e2e_support", "transformers.models.opt.modeling_opt",
                          "transformers.models.blip_2.modeling_blip_2")}


def test_readme_stage_table_matches_the_stage_table():
    """The README's GPU stage table is generated from stages.py (report.py refresh); names, order, limits and the
    estimated H200 seconds must be the current ones (regenerate it after changing stages.py)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    block = text[text.index("<!-- gpu-stages:start -->"):text.index("<!-- gpu-stages:end -->")]
    rows = [[c.strip() for c in l.strip("|").split("|")] for l in block.splitlines() if l.startswith("| ") and "`" in l]
    assert [(r[1].strip("`"), int(r[3]), int(r[4])) for r in rows] == [
        (s.name, s.limit_s, s.typical_s) for s in stages.STAGES]
    assert f"default budget, {stages.DEFAULT_BUDGET_S} s" in block
