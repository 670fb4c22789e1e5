"""Per-op cost rules: which dispatched ops are kernels, their FLOPs and HBM bytes, and the roofline time of each.

An op's cost (`cost_of`, at trace time, from shapes and dtypes only):
  - views and metadata (aliases of their input, allocations, `detach`): no kernel, no bytes;
  - a custom op with a formula in blip2fast/ops (`kernel_cost.COSTS`): that formula;
  - the SDPA stand-in (trace.py): one flash / memory-efficient kernel forward, one backward;
  - foreach ops and fused AdamW: one kernel per multi-tensor-apply launch (torch's per-launch tensor and block
    limits, below);
  - every other aten op: one kernel; FLOPs from torch.utils.flop_counter's own formulas (so totals equal
    FlopCounterMode's), bytes = each tensor argument read once + each output written once (a broadcast operand
    counts its distinct elements).
Time (`kernel_seconds`): max(FLOPs / attainable FLOP/s of its class and dtype, bytes / attainable bandwidth,
launches x the shortest kernel), plus per launch the eager launch cost or the CUDA-graph replay cost; a host sync
costs hardware's `host_sync_s`.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch.utils.flop_counter import flop_registry
from torch.utils._pytree import tree_leaves

from blip2fast.ops import kernel_cost

from .hardware import Gpu

KINDS = ("matmul", "attention_fwd", "attention_bwd", "custom", "reduction", "elementwise", "foreach", "host_sync",
         "view")

# metadata / allocation ops that launch nothing (besides func.is_view ops)
NO_KERNEL = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
             "aten::detach", "aten::alias", "aten::lift_fresh", "aten::_unsafe_view", "aten::set_", "aten::resize_",
             "aten::_reshape_alias", "aten::sym_size", "aten::sym_stride", "aten::sym_numel", "aten::_version",
             "aten::record_stream", "aten::_assert_async", "aten::_assert_tensor_metadata", "aten::is_same_size",
             "aten::_has_compatible_shallow_copy_type", "aten::result_type", "aten::sym_storage_offset"}
# reductions and normalisations: bandwidth at hardware's reduction_bw_vs_copy
REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "any", "all", "prod", "_softmax",
              "_log_softmax", "_softmax_backward_data", "_log_softmax_backward_data", "native_layer_norm",
              "native_layer_norm_backward", "nll_loss_forward", "nll_loss_backward", "nll_loss2d_forward",
              "logsumexp", "linalg_vector_norm", "norm", "cumsum", "topk", "sort", "var_mean", "std_mean",
              "embedding_dense_backward",
              "index_add", "scatter_add", "_foreach_norm", "native_group_norm", "native_group_norm_backward",
              "native_batch_norm"}
# torch's multi_tensor_apply limits (ATen/native/cuda/MultiTensorApply.cuh): tensors per launch by list depth,
# 320 blocks of 65536 elements per launch
_MTA_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
_MTA_BLOCKS, _MTA_CHUNK = 320, 65536


def op_name(func) -> str:
    return func._schema.name


def _bytes(t: torch.Tensor) -> float:
    """Distinct elements of t x element size (an expanded, stride-0 dimension is read once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return float(n * t.element_size()) if t.numel() else 0.0


def _tensor_leaves(x: Any) -> list:
    return [t for t in tree_leaves(x) if isinstance(t, torch.Tensor)]


def _dtype(args, out) -> str:
    """The precision an op computes in: its largest floating output, else its largest floating input (for
    matmuls and fused kernels the caller passes no output: their inputs' precision, not a scalar loss's)."""
    for group in (_tensor_leaves(out), _tensor_leaves(args)):
        floats = [t for t in group if t.is_floating_point()]
        if floats:
            return str(max(floats, key=lambda t: t.numel()).dtype).removeprefix("torch.")
    ts = _tensor_leaves(out) + _tensor_leaves(args)
    return str(ts[0].dtype).removeprefix("torch.") if ts else ""


def _mta_launches(lists: list) -> int:
    """Launches of one multi-tensor-apply call over `lists` (tensor lists of equal length)."""
    if not lists or not lists[0]:
        return 0
    depth = min(len(lists), max(_MTA_TENSORS))
    tensors = len(lists[0])
    chunks = sum(math.ceil(t.numel() / _MTA_CHUNK) for t in lists[0])
    return max(math.ceil(tensors / _MTA_TENSORS[depth]), math.ceil(chunks / _MTA_BLOCKS), 1)


def _gemm_dims(name: str, args, out) -> Optional[tuple]:
    """(batch, M, N, K) of a matmul-class aten op, for wave quantisation."""
    short = name.split("::")[-1]
    try:
        if short in ("mm", "addmm", "_scaled_mm"):
            a, b = (args[1], args[2]) if short == "addmm" else (args[0], args[1])
            return (1, a.shape[0], b.shape[1], a.shape[1])
        if short in ("bmm", "baddbmm"):
            a, b = (args[1], args[2]) if short == "baddbmm" else (args[0], args[1])
            return (a.shape[0], a.shape[1], b.shape[2], a.shape[2])
    except (AttributeError, IndexError):
        return None
    return None


def _sdpa_cost(name: str, args: tuple) -> tuple[str, float, float, float, float]:
    """(kind, flops, extra_flops, bytes_read, bytes_written) of the SDPA stand-in."""
    if name == "cost_model::sdpa":
        q, k, v, mask = args[:4]
        lead = math.prod(q.shape[:-2])
        products = 2.0 * lead * q.shape[-2] * k.shape[-2] * q.shape[-1]
        return ("attention_fwd", 2 * products, 0.0, sum(_bytes(t) for t in (q, k, v) if t is not None)
                + (_bytes(mask) if mask is not None else 0.0), _bytes(q) + 4.0 * lead * q.shape[-2])
    grad, q, k, v, out, lse, mask = args[:7]
    lead = math.prod(q.shape[:-2])
    products = 2.0 * lead * q.shape[-2] * k.shape[-2] * q.shape[-1]
    read = sum(_bytes(t) for t in (grad, q, k, v, out, lse)) + (_bytes(mask) if mask is not None else 0.0)
    return "attention_bwd", 4 * products, products, read, _bytes(q) + _bytes(k) + _bytes(v)


def sdpa_variant_of(name: str, args: tuple) -> str:
    from .trace import _sdpa_variant

    q, mask = (args[0], args[3]) if name == "cost_model::sdpa" else (args[1], args[6])
    return _sdpa_variant(q, mask is not None)


def cost_of(func, args: tuple, kwargs: dict, out: Any, phase: str, region: str):
    """The Event of one dispatched op."""
    from .trace import Event

    name = op_name(func)
    dtype = _dtype(args, out)
    if name in kernel_cost.COSTS:
        dtype = _dtype(args, None)  # a fused kernel computes in its inputs' precision
        c = kernel_cost.COSTS[name](*args, **kwargs)
        return Event(name, phase, region, c.kind, flops=c.flops, extra_flops=c.extra_flops, bytes_read=c.bytes_read,
                     bytes_written=c.bytes_written, launches=c.launches, dtype=dtype)
    if name in ("cost_model::sdpa", "cost_model::sdpa_backward"):
        dtype = _dtype(args, None)
        kind, fl, extra, rd, wr = _sdpa_cost(name, args)
        label = f"sdpa_{sdpa_variant_of(name, args)}_{'fwd' if kind == 'attention_fwd' else 'bwd'}"
        return Event(label, phase, region, kind, flops=fl, extra_flops=extra, bytes_read=rd, bytes_written=wr,
                     launches=1, dtype=dtype)
    if func.is_view or name in NO_KERNEL:
        return Event(name, phase, region, "view", dtype=dtype)
    short = name.split("::")[-1]
    ins = _tensor_leaves((args, kwargs))
    outs = _tensor_leaves(out)
    read = sum(_bytes(t) for t in ins)
    if short.startswith("_foreach_") or short.startswith("_fused_adam"):
        lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
        launches = _mta_launches(lists) + (1 if short == "_foreach_norm" else 0)  # + the norm's final reduction
        mutated = sum(_bytes(t) for a, r in zip(args, func._schema.arguments)
                      if r.alias_info is not None and r.alias_info.is_write for t in _tensor_leaves(a))
        return Event(name, phase, region, "foreach", bytes_read=read, bytes_written=mutated + sum(map(_bytes, outs)),
                     launches=launches, dtype=dtype)
    written = sum(_bytes(t) for t in outs)
    flops = 0.0
    packet = func.overloadpacket
    kind = "reduction" if short in REDUCTIONS else "elementwise"
    if packet in flop_registry:
        flops = float(flop_registry[packet](*args, **kwargs, out_val=out))
        kind = "matmul"
        # a matmul runs at its operands' precision (float8 in, bf16 out for torch._scaled_mm)
        dtype = _dtype(args, None)
    ev = Event(name, phase, region, kind, flops=flops, bytes_read=read, bytes_written=written, launches=1,
               dtype=dtype)
    if kind == "matmul":
        ev.gemm = _gemm_dims(name, args, out)
    return ev


# ------------------------------------------------------------------------------------------------ time


def _wave_efficiency(gemm: Optional[tuple], gpu: Gpu) -> float:
    """Useful fraction of a GEMM's tile work: partial 128x128 tiles and a partial last wave over the SMs cost as
    much as full ones."""
    if not gemm:
        return 1.0
    batch, M, N, _ = gemm
    tile = gpu["gemm_tile"]
    tiles = batch * math.ceil(M / tile) * math.ceil(N / tile)
    if tiles == 0:
        return 1.0
    fill = (batch * M * N) / (tiles * tile * tile)
    waves = math.ceil(tiles / gpu.sms)
    return fill * tiles / (waves * gpu.sms)


def compute_rate(ev, gpu: Gpu) -> float:
    """Attainable FLOP/s for the event's class and dtype."""
    peak = gpu["matmul_bf16_flops"]
    if ev.kind == "matmul":
        if "float8" in ev.dtype:
            peak *= gpu["fp8_matmul_vs_bf16"]
        elif ev.dtype in ("float32", "float64"):
            peak *= gpu["fp32_matmul_vs_bf16"]
        return peak * _wave_efficiency(getattr(ev, "gemm", None), gpu)
    scale = gpu["attention_bwd_vs_matmul"] if ev.kind == "attention_bwd" else gpu["attention_fwd_vs_matmul"]
    if "efficient" in ev.op:
        scale *= gpu["mem_efficient_vs_flash"]
    if ev.dtype in ("float32", "float64"):
        scale *= gpu["fp32_matmul_vs_bf16"]
    return peak * scale


def bandwidth(ev, gpu: Gpu) -> float:
    bw = gpu["copy_bw"]
    return bw * gpu["reduction_bw_vs_copy"] if ev.kind == "reduction" else bw


def device_seconds(ev, gpu: Gpu) -> float:
    """The kernel's time on the GPU (no launch cost): the roofline bound, at least the shortest kernel."""
    if ev.kind == "view" or ev.launches == 0:
        return 0.0
    if ev.kind == "host_sync":
        return 0.0
    flops = max(0.0, ev.flops + ev.extra_flops)
    t_compute = flops / compute_rate(ev, gpu) if flops else 0.0
    t_memory = (ev.bytes_read + ev.bytes_written) / bandwidth(ev, gpu)
    return max(t_compute, t_memory, ev.launches * gpu["min_kernel_s"])


def overhead_seconds(ev, gpu: Gpu, cuda_graphs: bool) -> float:
    """Launch (eager) or replay (CUDA graph) cost of the event's kernels, and its host syncs."""
    per = gpu["launch_graph_s"] if cuda_graphs else gpu["launch_eager_s"]
    if ev.kind == "host_sync":
        return ev.host_syncs * gpu["host_sync_s"]
    return ev.launches * per


def kernel_seconds(ev, gpu: Gpu, cuda_graphs: bool = False) -> float:
    return device_seconds(ev, gpu) + overhead_seconds(ev, gpu, cuda_graphs)
