"""Every launch configuration of every Triton kernel module other than the attention (which has its own table in
test_triton_lowering.py) lowers for Hopper (sm_90) without a GPU.

Each module kernels/<name>.py exposes `aot_cases()`: one (label, jit fn, signature, constexprs, attrs, options) per
configuration its launchers can pick. A subprocess without TRITON_INTERPRET runs
`python -m blip2fast.kernels._aot --cases <name> --json` (triton.compile(..., target=GPUTarget("cuda", 90, 32)));
every case must fit the 227 KB of shared memory a block may use on sm_90, and ptxas must report registers and at
most a small stack (spills). Registers/shared per case are printed with -s.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from blip2fast.kernels import _aot

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULES = _aot.case_modules()


def test_kernel_modules_expose_aot_cases():
    """Every kernel module in kernels/ (bar the attention, lowered by its own test) is lowered here: a new module
    without aot_cases() would silently escape the sm_90 check."""
    folder = os.path.join(ROOT, "kernels")
    kernel_files = sorted(f[:-3] for f in os.listdir(folder)  # _helpers.py hold jit helpers, no kernels
                          if f.endswith(".py") and not f.startswith("_") and f != "qformer_attention.py")
    missing = sorted(set(kernel_files) - set(MODULES))
    assert kernel_files == MODULES, f"kernel modules without aot_cases(): {missing}"


@pytest.mark.parametrize("module", MODULES or [pytest.param(None, marks=pytest.mark.skip(reason="no module yet"))])
def test_every_case_lowers_for_sm90(module, tmp_path):
    from importlib import import_module

    cases = import_module(f"blip2fast.kernels.{module}").aot_cases()
    assert cases, f"kernels/{module}.py: aot_cases() is empty"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run(
        [sys.executable, "-m", "blip2fast.kernels._aot", "--cases", module, "--json",
         "--jobs", str(min(2, os.cpu_count() or 1))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode in (0, 1), f"lowering kernels/{module}.py failed:\n{proc.stderr[-4000:]}"
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["cases"]
    assert [r["label"] for r in rows] == [c[0] for c in cases]
    for r in rows:
        print(f"{module:14s} {r['label']:48s} warps {r['num_warps']} shared {r['shared']:6d} "
              f"regs {r.get('registers', -1):3d} stack {r.get('stack_bytes', -1)}")
    too_big = [r["label"] for r in rows if r["shared"] >= _aot.SM90_MAX_SHARED]
    assert not too_big, f"{module}: shared memory over the sm_90 limit of {_aot.SM90_MAX_SHARED} bytes: {too_big}"
    assert all(0 < r.get("registers", 0) <= 255 for r in rows), f"{module}: register counts missing from the cubins"
    spilling = [(r["label"], r["stack_bytes"]) for r in rows if r.get("stack_bytes", 0) > 512]
    assert not spilling, f"{module}: cases spilling more than 512 bytes per thread: {spilling}"
