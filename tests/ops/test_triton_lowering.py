"""Every block configuration the Triton launchers can pick lowers for Hopper (sm_90) without a GPU.

A subprocess without TRITON_INTERPRET (the interpreter replaces kernels by Python functions) runs
`python -m blip2fast.kernels._aot --json`: triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)) for each
(kernel, head dim, dtype, dot precision, block config) of `all_launch_configs()`, with every feature switched on
(mask tensor, causal, kv_index, dropout), plus every feature variant (all off, each off alone: every branch of
the kernels) at head dim 64 in bf16. Each must fit the 227 KB of shared memory a block may use on sm_90.
Registers and spills (from the cubin's .nv.info) are printed with -s and guarded against large regressions.
The Triton cache goes to a temporary folder, so every run really compiles (85 kernels, ~25 s on 2 idle cores).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from blip2fast.kernels import _aot
from blip2fast.kernels import qformer_attention as K

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_launchers_only_pick_listed_configs():
    listed = {(k, d, dt, c) for k, d, dt, _, c in K.all_launch_configs()}
    for kernel in K.KERNEL_NAMES:
        for d in K.HEAD_DIMS:
            for dtype in K.DTYPES:
                for Lq in list(range(1, 130)) + [257, 1000]:
                    assert (kernel, d, dtype, K.launch_config(kernel, d, dtype, Lq)) in listed
    precisions = {(dt, p) for _, _, dt, p, _ in K.all_launch_configs()}
    for dtype in K.DTYPES:
        for precision in ("highest", "high"):
            old = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(precision)
            try:
                assert (dtype, K._dot_precision(dtype)) in precisions
            finally:
                torch.set_float32_matmul_precision(old)


def test_every_launch_config_lowers_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run(
        [sys.executable, "-m", "blip2fast.kernels._aot", "--json", "--jobs", str(min(2, os.cpu_count() or 1))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode in (0, 1), f"lowering failed:\n{proc.stderr[-4000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows, variants = result["configs"], result["variants"]
    expected = [(k, d, str(dt).removeprefix("torch."), p, c.block_m, c.block_n, c.num_warps, c.num_stages)
                for k, d, dt, p, c in K.all_launch_configs()]
    got = [(r["kernel"], r["head_dim"], r["dtype"], r["dot_precision"], r["block_m"], r["block_n"], r["num_warps"],
            r["num_stages"]) for r in rows]
    assert got == expected
    print(f"\n{'kernel':9s} {'d':>4s} {'dtype':9s} {'prec':5s} {'BM':>3s} {'BN':>3s} {'warps':>5s} {'shared':>7s} "
          f"{'regs':>4s} {'stack':>5s}")
    for r in rows:
        print(f"{r['kernel']:9s} {r['head_dim']:4d} {r['dtype']:9s} {r['dot_precision']:5s} {r['block_m']:3d} "
              f"{r['block_n']:3d} {r['num_warps']:5d} {r['shared']:7d} {r.get('registers', -1):4d} "
              f"{r.get('stack_bytes', -1):5d}")
    for r in variants:
        print(f"variant {r['kernel']:9s} d={r['head_dim']} {r['dtype']} {r['features']}: shared {r['shared']}, "
              f"{r.get('registers', -1)} registers, {r.get('stack_bytes', -1)} bytes stack")
    # every branch of every kernel lowered: all-off, each switch off alone (and PAD_MODE 1), for each kernel
    assert len(variants) == 6 + 7 + 6, [(r["kernel"], r["features"]) for r in variants]
    rows = rows + variants
    too_big = [r for r in rows if r["shared"] >= _aot.SM90_MAX_SHARED]
    assert not too_big, f"shared memory over the sm_90 limit of {_aot.SM90_MAX_SHARED} bytes: {too_big}"
    assert all(0 < r.get("registers", 0) <= 255 for r in rows), "register counts missing from the cubins"
    spilling = [r for r in rows if r.get("stack_bytes", 0) > 512]  # 4 warps spilled up to 1.5 KB before the table
    assert not spilling, f"configs spilling more than 512 bytes per thread: {spilling}"


@pytest.mark.parametrize("name", ["_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"])
def test_pointer_arguments_are_commented(name):
    """House style: every pointer argument of a kernel carries a comment saying what it points to."""
    import inspect

    src = inspect.getsource(getattr(K, name).fn if hasattr(getattr(K, name), "fn") else getattr(K, name))
    header = src[src.index("(") + 1: src.index("):")]
    for line in header.splitlines():
        arg = line.strip().split(",")[0]
        if arg.isupper() and arg != "H":
            assert "#" in line, f"{name}: pointer argument {arg} has no comment"
