"""Ahead-of-time lowering of the Triton kernels for Hopper (sm_90), without a GPU.

    python -m blip2fast.kernels._aot [--jobs N] [--json]                 the Q-Former attention kernels
    python -m blip2fast.kernels._aot --cases [MODULE,...] [--json]       every other kernel module

The first form lowers every launch configuration of kernels/qformer_attention.py (`all_launch_configs()`, every feature on), and
every feature variant (`feature_variants()`: all off, each off alone) at one configuration, with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`, and reports, per kernel, the shared
memory (`metadata.shared`), the registers per thread and the local-memory stack (spills) that ptxas recorded in
the cubin's .nv.info section. It must run in a process *without* TRITON_INTERPRET=1 (the interpreter replaces
the kernels by Python functions). tests/ops/test_triton_lowering.py runs it in a subprocess.

The second form is for every other kernel module (kernels/<name>.py): each exposes

    def aot_cases() -> list[tuple[str, jit_fn, signature, constexprs, attrs, options]]

one tuple per launch configuration its launchers can pick (label, the @triton.jit function, the signature dict,
the constexpr values, attributes such as divisibility, options such as num_warps), and is lowered case by case
(without MODULE names: every module in this folder that has `aot_cases`). tests/ops/test_triton_lowering_ops.py
runs it.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import struct
import sys
import time
from concurrent.futures import ProcessPoolExecutor

SM90_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)


def nv_info(cubin: bytes) -> dict:
    """Registers (EIATTR_REGCOUNT), frame size and min stack size (EIATTR_FRAME_SIZE / MIN_STACK_SIZE: local
    memory, i.e. spills) from the global .nv.info section of a cubin (one kernel per cubin, as Triton emits)."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)

    def header(i):  # name, type, flags, addr, offset, size, link, info, addralign, entsize
        return struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize)

    strtab = header(shstrndx)

    def name(off):
        start = strtab[4] + off
        return cubin[start:cubin.index(b"\0", start)].decode()

    found = {}
    attrs = {0x2F: "registers", 0x11: "frame_bytes", 0x12: "stack_bytes"}
    for i in range(shnum):
        h = header(i)
        if name(h[0]) != ".nv.info":
            continue
        data, p = cubin[h[4]:h[4] + h[5]], 0
        while p + 4 <= len(data):
            fmt, attr = data[p], data[p + 1]
            if fmt == 0x04:  # EIFMT_SVAL: u16 size, then (symbol index u32, value u32)
                size, = struct.unpack_from("<H", data, p + 2)
                if attr in attrs and size >= 8:
                    found[attrs[attr]] = struct.unpack_from("<I", data, p + 8)[0]
                p += 4 + size
            else:
                p += 4
    return found


def _lower(args) -> dict:
    kernel, d, dtype_name, prec, cfg_tuple, features = args
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from blip2fast.kernels import qformer_attention as qa

    cfg = qa.BlockConfig(*cfg_tuple)
    dtype = getattr(torch, dtype_name)
    t0 = time.perf_counter()
    fn, signature, constexprs, attrs, options = qa.aot_spec(kernel, d, dtype, cfg, dot_precision=prec,
                                                            features=features)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options=options)
    row = dict(kernel=kernel, head_dim=d, dtype=dtype_name, dot_precision=prec, block_m=cfg.block_m,
               block_n=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
               features={k: constexprs[k] for k in qa.FEATURES_ALL_ON if k in constexprs},
               shared=compiled.metadata.shared, seconds=round(time.perf_counter() - t0, 2))
    row.update(nv_info(compiled.asm["cubin"]))
    return row


VARIANT_HEAD_DIM, VARIANT_DTYPE = 64, "bfloat16"  # the feature variants are lowered for the BERT-base training case


def lower_all(jobs: int = 2) -> tuple[list[dict], list[dict]]:
    """(every launch configuration, all features on; every feature variant at head dim 64, bf16)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: ahead-of-time lowering needs the compiled, not interpreted, kernels")
    import torch

    from blip2fast.kernels import qformer_attention as qa

    def item(k, d, dt, prec, c, features=None):
        return (k, d, str(dt).removeprefix("torch."), prec, (c.block_m, c.block_n, c.num_warps, c.num_stages),
                features)

    configs = [item(*row) for row in qa.all_launch_configs()]
    dtype = getattr(torch, VARIANT_DTYPE)
    variants = []
    for kernel in qa.KERNEL_NAMES:
        cfg = qa.launch_config(kernel, VARIANT_HEAD_DIM, dtype, 64)
        def own(features):  # the switches this kernel has
            return {k: v for k, v in features.items() if kernel == "bwd_dkdv" or k != "DQ_IN_KERNEL"}

        seen = {tuple(sorted(own(qa.FEATURES_ALL_ON).items()))}  # all-on is among the configs already
        for features in map(own, qa.feature_variants()):
            key = tuple(sorted(features.items()))
            if key not in seen:
                seen.add(key)
                variants.append(item(kernel, VARIANT_HEAD_DIM, dtype, "ieee", cfg, features))
    work = configs + variants
    if jobs <= 1:
        rows = [_lower(w) for w in work]
    else:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            rows = list(pool.map(_lower, work))
    return rows[: len(configs)], rows[len(configs):]


def case_modules() -> list[str]:
    """Kernel modules of this folder that expose aot_cases(), by name (the attention kernels have their own
    launch-config table above)."""
    import importlib

    folder = os.path.dirname(os.path.abspath(__file__))
    names = []
    for file in sorted(os.listdir(folder)):
        name, ext = os.path.splitext(file)
        if ext != ".py" or name.startswith("_") or name == "qformer_attention":
            continue
        if hasattr(importlib.import_module(f"blip2fast.kernels.{name}"), "aot_cases"):
            names.append(name)
    return names


def _lower_case(args) -> dict:
    module_name, index = args
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(f"blip2fast.kernels.{module_name}")
    label, fn, signature, constexprs, attrs, options = module.aot_cases()[index]
    t0 = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs or {}), target=GPUTarget("cuda", 90, 32),
                              options=options or {})
    row = dict(module=module_name, label=label, shared=compiled.metadata.shared,
               num_warps=(options or {}).get("num_warps"), seconds=round(time.perf_counter() - t0, 2))
    row.update(nv_info(compiled.asm["cubin"]))
    return row


def lower_cases(modules: list[str], jobs: int = 2) -> list[dict]:
    """Every aot_cases() entry of the named kernel modules, lowered for sm_90."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: ahead-of-time lowering needs the compiled, not interpreted, kernels")
    import importlib

    work = [(m, i) for m in modules for i in range(len(importlib.import_module(f"blip2fast.kernels.{m}").aot_cases()))]
    if jobs <= 1:
        return [_lower_case(w) for w in work]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_lower_case, work))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    p.add_argument("--cases", nargs="?", const="", default=None, metavar="MODULE,...",
                   help="lower the aot_cases() of these kernel modules (all that have them when no names are given)")
    args = p.parse_args()
    t0 = time.perf_counter()
    if args.cases is not None:
        modules = [m for m in args.cases.split(",") if m] or case_modules()
        rows = lower_cases(modules, args.jobs)
        if args.json:
            json.dump({"modules": modules, "cases": rows}, sys.stdout)
            print()
        else:
            print(f"{'module':16s} {'case':40s} {'warps':>5s} {'shared':>7s} {'regs':>4s} {'stack':>5s} {'s':>5s}")
            for r in rows:
                print(f"{r['module']:16s} {r['label'][:40]:40s} {r['num_warps'] or 0:5d} {r['shared']:7d} "
                      f"{r.get('registers', -1):4d} {r.get('stack_bytes', -1):5d} {r['seconds']:5.2f}")
            print(f"{len(rows)} cases of {len(modules)} modules in {time.perf_counter() - t0:.1f} s; "
                  f"sm_90 limit {SM90_MAX_SHARED} bytes")
        return 0 if all(r["shared"] < SM90_MAX_SHARED for r in rows) else 1
    rows, variants = lower_all(args.jobs)
    if args.json:
        json.dump({"configs": rows, "variants": variants}, sys.stdout)
        print()
    else:
        print(f"{'kernel':9s} {'d':>4s} {'dtype':9s} {'prec':5s} {'BM':>3s} {'BN':>3s} {'warps':>5s} "
              f"{'shared':>7s} {'regs':>4s} {'stack':>5s} {'s':>5s}")
        for r in rows:
            print(f"{r['kernel']:9s} {r['head_dim']:4d} {r['dtype']:9s} {r['dot_precision']:5s} {r['block_m']:3d} "
                  f"{r['block_n']:3d} {r['num_warps']:5d} {r['shared']:7d} {r.get('registers', -1):4d} "
                  f"{r.get('stack_bytes', -1):5d} {r['seconds']:5.2f}")
        for r in variants:
            print(f"variant {r['kernel']:9s} d={r['head_dim']} {r['dtype']} {r['features']}: shared {r['shared']}, "
                  f"{r.get('registers', -1)} registers, {r.get('stack_bytes', -1)} bytes stack")
        print(f"{len(rows)} configurations + {len(variants)} feature variants in {time.perf_counter() - t0:.1f} s; "
              f"sm_90 limit {SM90_MAX_SHARED} bytes")
    return 0 if all(r["shared"] < SM90_MAX_SHARED for r in rows + variants) else 1


if __name__ == "__main__":
    sys.exit(main())
