"""Loader of the compiled extension `blip2fast._C` (csrc/), which registers the `torch.ops.blip2fast.*` ops.

`load_extension()` imports it once and reports whether it is usable and, if not, why; nothing here raises, so
the package works (on its PyTorch fallbacks) without a compiler. It runs when this module is imported (by the
ops that have compiled backends), so never first inside a torch.compile trace: its lock cannot be traced.
Loading also registers the ops' fake (meta) implementations, so `torch.compile(fullgraph=True)`,
`torch.library.opcheck` and CUDA graphs see through them.
"""
from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass

import torch

_EXT_MODULE = "blip2fast._C"
_ITM_OP = "blip2fast::itm_sample_negatives"
_DROPOUT_OP = "blip2fast::attention_dropout_keep"


@dataclass(frozen=True)
class ExtensionStatus:
    """Truthy when the extension is loaded. `reason` says why not; `cuda` whether CUDA kernels were built in."""

    available: bool
    reason: str = ""
    cuda: bool = False

    def __bool__(self) -> bool:
        return self.available


_status: ExtensionStatus | None = None
_lock = threading.Lock()


def _register_fakes() -> None:
    @torch.library.register_fake(_ITM_OP)
    def _itm_sample_negatives_fake(sim, positive, row_ids, seed_step, stream):
        torch._check(sim.dim() == 2, lambda: f"sim must be 2-D (rows, candidates), got shape {tuple(sim.shape)}")
        neg = positive.new_empty((sim.shape[0],), dtype=torch.int64)
        n_fallback = positive.new_empty((), dtype=torch.int64)
        return neg, n_fallback

    if hasattr(torch.ops.blip2fast, "attention_dropout_keep"):  # absent from builds older than the op
        @torch.library.register_fake(_DROPOUT_OP)
        def _attention_dropout_keep_fake(seed_step, row_ids, stream, site, heads, q_len, k_len, q_offset, threshold):
            return row_ids.new_empty((row_ids.shape[0], heads, q_len, k_len), dtype=torch.bool)


def _register_costs() -> None:
    from . import kernel_cost

    @kernel_cost.register(_ITM_OP)
    def _itm_sample_negatives_cost(sim, positive, row_ids, seed_step, stream):
        # csrc: one pass over sim (hash in registers) and the fallback count
        return kernel_cost.KernelCost(bytes_read=kernel_cost.nbytes(sim, positive, row_ids, seed_step),
                                      bytes_written=8.0 * sim.shape[0] + 8.0)

    @kernel_cost.register(_DROPOUT_OP)
    def _attention_dropout_keep_cost(seed_step, row_ids, stream, site, heads, q_len, k_len, q_offset, threshold):
        # csrc (CPU, and one CUDA kernel): one bool per (row, head, query, key), hashed in registers
        return kernel_cost.KernelCost(bytes_read=kernel_cost.nbytes(seed_step, row_ids),
                                      bytes_written=float(row_ids.shape[0] * heads * q_len * k_len))


_register_costs()


def _load() -> ExtensionStatus:
    if os.environ.get("BLIP2FAST_BUILD_EXT", "").strip() == "0":
        return ExtensionStatus(False, "BLIP2FAST_BUILD_EXT=0 is set: the compiled extension is disabled")
    try:
        importlib.import_module(_EXT_MODULE)
    except ModuleNotFoundError as e:
        if e.name == _EXT_MODULE:
            return ExtensionStatus(
                False,
                "blip2fast._C is not built: install with `pip install -e . --no-build-isolation` (torch first)",
            )
        return ExtensionStatus(False, f"importing blip2fast._C failed: {type(e).__name__}: {e}")
    except Exception as e:  # a stale build against another torch shows up as ImportError / OSError here
        return ExtensionStatus(
            False,
            f"importing blip2fast._C failed: {type(e).__name__}: {e} (rebuild it against the installed torch with "
            "`pip install -e . --no-build-isolation`)",
        )
    try:
        _register_fakes()
    except Exception as e:
        return ExtensionStatus(False, f"blip2fast._C loaded but registering its fake kernels failed: {e}")
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key(_ITM_OP, "CUDA")
    return ExtensionStatus(True, "", cuda=cuda)


def load_extension() -> ExtensionStatus:
    """Import blip2fast._C once; return its status (truthy when loaded). Never raises."""
    global _status
    if _status is None:
        with _lock:
            if _status is None:
                _status = _load()
    return _status


load_extension()  # at import: see the module docstring
