"""Backend choice for every hot op: explicit argument > BLIP2FAST_BACKEND > automatic.

Backends (each op has a subset):
    "torch"   the pure-PyTorch reference (runs anywhere; defines correctness)
    "triton"  a Triton kernel (kernels/, installed as blip2fast.kernels); on CPU tensors only under the Triton
              interpreter (TRITON_INTERPRET=1 set before triton is imported), which is slow and for tests
    "cpp"     the compiled extension blip2fast._C (csrc/: C++ on the CPU, CUDA on the GPU)

Each op says, per backend, why it cannot take a given input (a list of reasons, empty when it can), and which
backends automatic choice may take for that input, fastest first (e.g. triton then torch on a GPU, torch alone
on the CPU). Then:
  - a backend asked for by argument or by BLIP2FAST_BACKEND is used, or the call raises with its reasons:
    a request never falls back silently;
  - an unknown name is a ValueError naming where it came from and the op's backends;
  - automatic takes the first listed backend without reasons.
The choice reads only Python state (the environment, dtypes, devices, shapes), never tensor values, so it costs
no device synchronisation and torch.compile traces it as constants.

Automatic order on a GPU is a measurement, not a guess: `gpu_order(op, unmeasured)` returns the order the GPU
check script measured fastest (blip2fast/ops/measured_backends.json, written from a committed results file by
`python benchmarks/report.py --measured`), and `unmeasured` until the op has been measured. Every op passes the
reference ("torch",) as `unmeasured` for kernels that have never run on a GPU.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

ENV = "BLIP2FAST_BACKEND"
BACKENDS = ("torch", "triton", "cpp")

Reasons = Callable[[], list]  # a backend's check: [] when it can run the input, else why not


def requested_backend(backend: Optional[str], op: Optional[str] = None,
                      has: Optional[Sequence[str]] = None) -> tuple[Optional[str], str]:
    """(name, where it came from) of an explicit request, or (None, "automatic").

    BLIP2FAST_BACKEND holds a plain name ("triton": every op that has a triton backend uses it; ops without one
    choose automatically, so one setting can drive a whole model) and/or per-op entries
    ("qformer_attention=triton,itm_sample_negatives=cpp"), which win for their op. A plain name that is no backend
    of any op stays a request, so the op reports it as unknown."""
    if backend is not None:
        return backend, "backend argument"
    entries = [e.strip() for e in os.environ.get(ENV, "").split(",") if e.strip()]
    per_op = dict((k.strip(), v.strip()) for k, v in (e.split("=", 1) for e in entries if "=" in e))
    if op is not None and op in per_op:
        return per_op[op], f"{ENV} ({op}=...)"
    for name in (e for e in entries if "=" not in e):
        if has is None or name in has or name not in BACKENDS:
            return name, ENV
    return None, "automatic"


def choose_backend(
    op: str,
    backend: Optional[str],
    checks: Mapping[str, Reasons],
    automatic: Sequence[str],
    *,
    what: Optional[str] = None,
) -> str:
    """The backend to run `op` with.

    op:        the public function's name (error messages)
    backend:   the caller's `backend=` argument (None: BLIP2FAST_BACKEND, else automatic)
    checks:    every backend the op has -> a zero-argument callable returning the reasons it cannot take the input
    automatic: the backends automatic choice may take for this input, fastest first
    what:      how to name the op's backends in the unknown-name error (default: op)
    """
    name, source = requested_backend(backend, op, tuple(checks))
    if name is None:
        for candidate in automatic:
            if not checks[candidate]():
                return candidate
        reasons = {b: checks[b]() for b in checks}
        raise RuntimeError(
            f"{op}: no backend can run this input: "
            + "; ".join(f"{b}: {', '.join(r) or 'not automatic here'}" for b, r in reasons.items())
        )
    if name not in checks:
        raise ValueError(
            f"unknown {what or op} backend {name!r} (from {source}); choose one of {tuple(checks)}"
        )
    reasons = checks[name]()
    if reasons:
        raise RuntimeError(
            f"{op}: backend {name!r} was requested ({source}) but cannot run this input: "
            + "; ".join(reasons)
            + ". Use backend='torch' or unset the request for automatic choice."
        )
    return name


MEASURED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "measured_backends.json")
_measured: Optional[dict] = None


def measured_backends() -> dict:
    """{op: {"order": [fastest backend first], "measured_on": GPU name, "source": results file, ...}} (read once).
    Missing or unreadable file: {} (nothing measured)."""
    global _measured
    if _measured is None:
        try:
            import json

            with open(MEASURED_FILE) as f:
                _measured = json.load(f).get("ops", {})
        except (OSError, ValueError):
            _measured = {}
    return _measured


@torch.compiler.assume_constant_result
def gpu_order(op: str, unmeasured: Sequence[str]) -> tuple:
    """The automatic backend order for `op` on CUDA tensors: fastest first as measured on a GPU by the check script
    (benchmarks/gpu/), else `unmeasured`. The reference "torch" always closes the list, so an input the faster
    backends cannot take still runs."""
    entry = measured_backends().get(op)
    order = list(entry["order"]) if entry and entry.get("order") else list(unmeasured)
    return tuple(order) + (() if "torch" in order else ("torch",))


measured_backends()  # read at import, never while torch.compile traces an op


_kernel_modules: dict = {}


def triton_kernels(name: str):
    """(module blip2fast.kernels.<name>, "") or (None, why it cannot be imported); imported once."""
    if name not in _kernel_modules:
        try:
            _kernel_modules[name] = (importlib.import_module(f"blip2fast.kernels.{name}"), "")
        except Exception as e:  # triton missing or broken: the op still runs its other backends
            _kernel_modules[name] = (None, f"Triton kernels unavailable: importing blip2fast.kernels.{name} failed "
                                           f"({type(e).__name__}: {e})")
    return _kernel_modules[name]


@torch.compiler.assume_constant_result
def _triton_status(name: str) -> tuple:
    """(importable, built for the interpreter, why not importable). A constant for torch.compile: the import
    happens at trace time, outside the graph (dynamo cannot trace importlib)."""
    module, why = triton_kernels(name)
    return (module is not None, bool(module is not None and module.INTERPRETED), why)


def triton_reasons(kernels: str, *tensors: Tensor, dtypes: Sequence[torch.dtype]) -> list[str]:
    """Why the Triton kernels of module blip2fast.kernels.<kernels> cannot take these tensors ([] when they can):
    triton missing, a device they do not run on (CUDA, or CPU when built for the interpreter), mixed devices, or
    a dtype outside `dtypes` (bfloat16 is refused on the CPU: the interpreter computes it wrongly)."""
    available, interpreted, why = _triton_status(kernels)
    if not available:
        return [why]
    reasons = []
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        reasons.append(f"tensors on different devices {sorted(str(d) for d in devices)}")
    for dev in devices:
        if dev.type == "cuda":
            if interpreted:
                reasons.append("the Triton kernels were built for the interpreter (TRITON_INTERPRET=1 when "
                               "blip2fast.kernels was imported) and do not run CUDA tensors; unset it")
        elif dev.type == "cpu":
            if not interpreted:
                reasons.append("Triton runs CPU tensors only under its interpreter: set TRITON_INTERPRET=1 before "
                               "triton is imported (the tests do), or use CUDA tensors")
        else:
            reasons.append(f"no Triton kernels for device type {dev.type!r} (CUDA, or CPU under the interpreter)")
    for t in tensors:
        if t.dtype not in dtypes:
            reasons.append(f"dtype {t.dtype} is not one of {', '.join(str(d) for d in dtypes)}")
            break
        if t.dtype == torch.bfloat16 and t.device.type == "cpu":
            reasons.append("bfloat16 is computed wrongly by the Triton interpreter (CPU); run bfloat16 on a GPU")
            break
    return reasons
