"""The GPU's constants, in one place: the measured ones with their source, every other one an assumption with its
reason. Nothing here is tuned to please a prediction: `calibrate.refit` replaces the constants from a committed GPU
results file (a measurement), and a prediction names the constants it used.

A constant is a `Constant(value, unit, source)`; `source` starts with "measured:" or "assumed:".
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Constant:
    value: float
    unit: str
    source: str  # "measured: <where>" or "assumed: <why>"

    @property
    def measured(self) -> bool:
        return self.source.startswith("measured")


# ------------------------------------------------------------------------------------------------ shared assumptions
# Multiplied into a measured peak (so they move with it when it is refitted). Each has its reason.
_SHARED = {
    # Nominal dense tensor-core ratios of Hopper (NVIDIA H100/H200 datasheets): fp8 = 2 x bf16, fp32 without TF32 =
    # 67 / 989 of bf16 (CUDA cores; torch leaves TF32 off for matmuls by default). Scaled from the measured bf16.
    "fp8_matmul_vs_bf16": Constant(2.0, "x", "assumed: Hopper datasheet, dense fp8 = 2x dense bf16"),
    "fp32_matmul_vs_bf16": Constant(67.0 / 989.0, "x", "assumed: Hopper datasheet, fp32 (no TF32) 67 vs bf16 989 "
                                                      "TFLOP/s; torch keeps TF32 off for matmuls by default"),
    # FlashAttention-2 (what torch's flash SDPA is) reaches ~35-40% of the dense bf16 peak on H100 for long
    # sequences (FlashAttention-3 paper, fig. 5); our sequences are short (32-289 keys), so take the low end of
    # that range relative to the *measured* matmul peak; its backward is ~0.75x as efficient (same source).
    "attention_fwd_vs_matmul": Constant(0.40, "x", "assumed: FA2 on H100 ~35-40% of nominal bf16 (FA3 paper)"),
    "attention_bwd_vs_matmul": Constant(0.30, "x", "assumed: FA2 backward ~0.75x its forward (FA3 paper)"),
    # torch's memory-efficient SDPA (taken when an additive mask is passed) is the xformers/cutlass kernel,
    # ~60-70% of FA2's throughput in its published benchmarks
    "mem_efficient_vs_flash": Constant(0.65, "x", "assumed: xformers cutlass kernel ~60-70% of FA2"),
    # Row reductions (softmax, LayerNorm, norms, cross-entropy) stream their input once or twice through shared
    # memory: ~80% of a copy's bandwidth (Triton's LayerNorm / softmax tutorials reach 75-90% on A100/H100)
    "reduction_bw_vs_copy": Constant(0.80, "x", "assumed: Triton softmax/LayerNorm tutorials, 75-90% of copy"),
    # A GEMM tile: cuBLAS's Hopper kernels use 128 x 128 (or 128 x 256) output tiles; partial tiles and the last
    # partial wave over the SMs run at the same cost as full ones (wave quantisation)
    "gemm_tile": Constant(128, "elements", "assumed: cuBLAS sm90 GEMM output tile 128x128"),
    # Per kernel: what a launch costs the step when the host issues it eagerly (PyTorch's dispatcher + the CUDA
    # launch, ~4-6 us per aten op for short kernels on a fast host), and inside a replayed CUDA graph (the
    # device-side gap between dependent kernels, ~1 us on Hopper)
    "launch_eager_s": Constant(5.0e-6, "s", "assumed: PyTorch eager dispatch + cudaLaunchKernel ~4-6 us per op"),
    "launch_graph_s": Constant(1.0e-6, "s", "assumed: kernel-to-kernel gap inside a CUDA graph ~1 us"),
    # The GPU never finishes a kernel faster than this (launch latency on the device, block scheduling)
    "min_kernel_s": Constant(2.0e-6, "s", "assumed: smallest kernel duration on Hopper ~2-3 us"),
    # A host sync (.item(), .tolist(), nonzero's size, a pageable host-to-device copy): the round trip plus the
    # queue running dry behind it (the next kernels' launch latency is exposed)
    "host_sync_s": Constant(20.0e-6, "s", "assumed: cudaStreamSynchronize round trip ~10 us + exposed launches"),
}


@dataclass
class Gpu:
    name: str
    sms: int
    constants: dict = field(default_factory=dict)  # name -> Constant

    def __getitem__(self, key: str) -> float:
        return self.constants[key].value

    def with_values(self, values: dict, source: str) -> "Gpu":
        """A copy with some constants replaced (a refit), each marked with `source`."""
        c = dict(self.constants)
        for k, v in values.items():
            c[k] = Constant(float(v), c[k].unit, source)
        return dataclasses.replace(self, constants=c)

    def as_dict(self) -> dict:
        return {"name": self.name, "sms": self.sms,
                "constants": {k: {"value": c.value, "unit": c.unit, "source": c.source}
                              for k, c in self.constants.items()}}


def h200() -> Gpu:
    c = dict(_SHARED)
    c["matmul_bf16_flops"] = Constant(783.5e12, "FLOP/s", "measured: GPU machine, H200 bf16 8192^3 matmul, 769-798 "
                                                          "TFLOP/s over runs (midpoint; issue 15)")
    c["copy_bw"] = Constant(4.3e12, "B/s", "measured: GPU machine, H200 device-to-device copy ~4.3 TB/s (bytes read "
                                           "+ written; issue 15)")
    return Gpu("H200", 132, c)


def h100() -> Gpu:
    c = dict(_SHARED)
    c["matmul_bf16_flops"] = Constant(798e12, "FLOP/s", "measured: GPU machine, H100 bf16 8192^3 matmul (issue 15)")
    c["copy_bw"] = Constant(3.0e12, "B/s", "measured: GPU machine, H100 device-to-device copy ~3.0 TB/s (issue 15)")
    return Gpu("H100", 132, c)


GPUS = {"h200": h200, "h100": h100}
FIT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fitted_constants.json")


def load_gpu(name: str, fitted: Optional[str] = None) -> Gpu:
    """The named GPU's constants; with `fitted` (a file written by `gpu_model.py refit`), its refitted values."""
    key = name.lower()
    if key not in GPUS:
        raise ValueError(f"--gpu={name!r}: one of {sorted(GPUS)}")
    gpu = GPUS[key]()
    if fitted:
        with open(fitted) as f:
            fit = json.load(f)
        gpu = gpu.with_values(fit["values"], f"measured: refit from {fit['results']} ({fit['fitted_on']})")
    return gpu
