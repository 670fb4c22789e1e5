"""FLOP and HBM-byte formulas of the custom ops, for the GPU cost model (benchmarks/cost_model/).

Each custom op (a Triton kernel or a blip2fast._C kernel behind torch.library) is opaque to a tracer: it sees one
call with its fake outputs. Its cost is written beside its fake implementation, in the op's own file, with
`@register("namespace::op")`: a function of the op's own arguments (tensors are meta/fake, only shapes and dtypes
are read) returning a `KernelCost`.

Conventions (tests/benchmarks/test_gpu_model.py checks them against the ops' PyTorch references):
  flops          the matrix-product FLOPs the op's *reference* computes (2 per multiply-add; what
                 torch.utils.flop_counter.FlopCounterMode counts on the reference), so totals compare with
                 blip2fast/flops.py whatever the backend;
  extra_flops    products the kernel executes beyond those (a backward that recomputes the scores) or, negative,
                 those it skips (an ITC backward that only visits the argmax query); time uses flops + extra_flops;
  bytes_read     HBM bytes the kernel reads: each input once (the interface of the op, nothing materialised);
  bytes_written  HBM bytes of its outputs (+ any scratch it writes and reads back, named where it is added);
  launches       kernels one call launches (the Triton kernel plus any small torch ops its wrapper runs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor


@dataclass(frozen=True)
class KernelCost:
    flops: float = 0.0
    bytes_read: float = 0.0
    bytes_written: float = 0.0
    launches: int = 1
    extra_flops: float = 0.0
    kind: str = "custom"  # the roofline class its FLOPs run at: "custom" (CUDA cores) or "matmul" (tensor cores)


COSTS: dict[str, Callable[..., KernelCost]] = {}


def register(op_name: str) -> Callable:
    """Register the cost formula of custom op `op_name` ("blip2fast::qformer_attention")."""

    def wrap(fn: Callable[..., KernelCost]) -> Callable[..., KernelCost]:
        COSTS[op_name] = fn
        return fn

    return wrap


def nbytes(*tensors: Optional[Tensor]) -> float:
    """Bytes of the tensors' elements (None and empty tensors are 0)."""
    return float(sum(t.numel() * t.element_size() for t in tensors if t is not None))


__all__ = ["COSTS", "KernelCost", "nbytes", "register"]
