"""ITM hard-negative sampling: Gumbel-max over the masked similarity softmax, batched, on device, NaN-safe.

LAVIS draws each negative with `torch.multinomial(softmax(sim)).item()` in a Python loop: 2B host syncs a step,
and a crash when a row of weights holds NaN (LAVIS #107). Here one call draws a whole direction:

    neg[r] = argmax_j  sim[r, j] + gumbel(hash(seed, step, stream, row_ids[r], j))   over candidates j

Gumbel-max over the logits draws from softmax(sim) exactly (log-softmax differs from sim by a per-row constant),
so there is no softmax to overflow. Candidates are the finite entries of the row other than its positive.
A row with no finite candidate (all NaN/inf) draws uniformly among all columns but its positive and is counted
in `n_fallback`. A matrix with fewer than two columns has no negative at all: that is an error (callers skip
ITM instead). Everything stays on device; nothing here synchronises with the host.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _extension, dispatch, hashing, kernel_cost


def _check(sim: Tensor, positive: Tensor, row_ids: Tensor, seed_step: Tensor | None = None) -> None:
    if seed_step is not None and (seed_step.shape != (2,) or seed_step.dtype != torch.int64):
        raise ValueError(
            f"seed_step must be an int64 tensor of shape (2,) holding [seed, step]; got dtype {seed_step.dtype} "
            f"shape {tuple(seed_step.shape)}"
        )
    if sim.dim() != 2:
        raise ValueError(f"sim must be 2-D (rows, candidates), got shape {tuple(sim.shape)}")
    if not sim.dtype.is_floating_point:
        raise TypeError(f"sim must be a floating-point tensor, got {sim.dtype}")
    rows, cols = sim.shape
    if cols < 2:
        raise ValueError(
            f"ITM negative sampling needs at least 2 candidates per row (the positive and one other); got {cols} "
            "columns. Use a global batch of 2 or more, or skip ITM for this step."
        )
    for name, t in (("positive", positive), ("row_ids", row_ids)):
        if t.shape != (rows,) or t.dtype != torch.int64:
            raise ValueError(f"{name} must be int64 of shape ({rows},), got {t.dtype} {tuple(t.shape)}")


def itm_sample_negatives_ref(
    sim: Tensor, positive: Tensor, row_ids: Tensor, seed_step: Tensor, stream: int
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch reference. Returns (negative column per row (int64), number of fallback rows (int64 scalar)).

    sim:       (R, C) similarity logits (any float dtype; scored in float32)
    positive:  (R,) column of each row's positive, excluded from the draw
    row_ids:   (R,) global row index of each row (the hash coordinate, so every rank draws what one process would)
    seed_step: (2,) int64 [seed, step]
    stream:    hashing.STREAM_ITM_* (keeps the two directions independent)
    """
    _check(sim, positive, row_ids)
    neg, fallback = _draw_ref(sim[None], positive, row_ids, seed_step, stream)
    return neg[0], fallback


def _draw_ref(sims: Tensor, positive: Tensor, row_ids: Tensor, seed_step: Tensor, first_stream: int
              ) -> tuple[Tensor, Tensor]:
    """S draws at once: sims (S, R, C), draw s with stream first_stream + s; returns ((S, R) columns, fallback
    rows over all S). One hash over (S, R, C) instead of S: the (seed, step) keys and every mixing op are shared."""
    S, _, C = sims.shape
    dev = sims.device
    seed_lo, seed_hi, step = hashing.seed_keys(seed_step)
    streams = torch.arange(first_stream, first_stream + S, device=dev)  # on device: no copy in a CUDA graph
    cols = torch.arange(C, device=dev)
    h = hashing.counter_hash(seed_lo, seed_hi, step, streams.view(S, 1, 1), row_ids.view(1, -1, 1),
                             cols.view(1, 1, C))
    g = hashing.gumbel_from_hash(h)
    not_positive = cols.view(1, 1, C) != positive.view(1, -1, 1)
    logits = sims.to(torch.float32)
    candidate = torch.isfinite(logits) & not_positive
    neg_inf = logits.new_full((), float("-inf"))  # a fill, not a host-to-device copy (CUDA-graph safe)
    drawn = torch.where(candidate, logits + g, neg_inf).argmax(dim=-1)
    uniform = torch.where(not_positive, g, neg_inf).argmax(dim=-1)
    has_candidate = candidate.any(dim=-1)
    return torch.where(has_candidate, drawn, uniform), (~has_candidate).sum()


# ---------------------------------------------------------------------------------------------------------------
# Public entry point: one function, backends chosen by argument > BLIP2FAST_BACKEND > automatic.
#   "torch":  itm_sample_negatives_ref above (any device, any float dtype)
#   "cpp":    the compiled op torch.ops.blip2fast.itm_sample_negatives (csrc/: C++ on CPU tensors, CUDA kernel on
#             CUDA tensors); fp32/fp16/bf16 sims. Identical indices to the reference.
#   "triton": kernels/itm_sampling.py behind the custom op blip2fast::itm_sample_negatives_triton (custom_op +
#             register_fake, so torch.compile(fullgraph=True) and CUDA graphs see it; no autograd: the outputs are
#             indices); CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests); fp32/fp16/bf16 sims (bf16 on
#             CUDA only). Identical indices to the reference.
# Automatic: on the CPU cpp, then torch (the interpreter is for tests); on CUDA the order the GPU check script
# measured fastest (dispatch.gpu_order), torch until a measurement is committed.
# A backend that was asked for (argument or environment) and cannot run the input raises with the reasons; it
# never falls back silently (ops/dispatch.py).

BACKENDS = ("torch", "cpp", "triton")
_CPP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cpp_unsupported(sim: Tensor) -> list[str]:
    """Why the compiled op cannot take this input ([] when it can)."""

    status = _extension.load_extension()
    if not status:
        return [status.reason]
    reasons = []
    if sim.dtype not in _CPP_DTYPES:
        reasons.append(f"sim dtype {sim.dtype} is not one of float32/float16/bfloat16")
    if sim.device.type == "cuda":
        if not status.cuda:
            reasons.append("blip2fast._C was built without CUDA (CPU-only torch or no nvcc at build time)")
    elif sim.device.type != "cpu":
        reasons.append(f"no kernel for device type {sim.device.type!r} (CPU and CUDA only)")
    return reasons


def _triton_unsupported(sim: Tensor, positive: Tensor, row_ids: Tensor, seed_step: Tensor) -> list[str]:
    """Why the Triton kernel cannot take this input ([] when it can)."""
    reasons = dispatch.triton_reasons("itm_sampling", sim, dtypes=TRITON_DTYPES)
    devices = {t.device for t in (sim, positive, row_ids, seed_step)}
    if len(devices) > 1:
        reasons.append(f"sim, positive, row_ids, seed_step on {sorted(str(d) for d in devices)}: put them on one "
                       "device")
    if max(sim.shape, default=0) >= 2**31 or max(sim.stride(), default=0) >= 2**31:
        reasons.append(f"sim of shape {tuple(sim.shape)} / strides {sim.stride()} needs 64-bit sizes (the kernel "
                       "takes 32-bit ones)")
    return reasons


def _choose_backend(sim: Tensor, backend: str | None, positive: Tensor | None = None,
                    row_ids: Tensor | None = None, seed_step: Tensor | None = None) -> str:
    """argument > BLIP2FAST_BACKEND > automatic (see the table above)."""
    extra = [t if t is not None else sim for t in (positive, row_ids, seed_step)]
    # CPU: the C++ op (measured ~20x the reference at 8 x 64). CUDA: the order the GPU check measured fastest
    # (benchmarks/bench_itm_sampling.py, 128 x 8192 sims; ops/dispatch.py gpu_order), the reference until then.
    automatic = ("cpp", "torch") if sim.device.type == "cpu" else dispatch.gpu_order("itm_sample_negatives",
                                                                                      ("torch",))
    return dispatch.choose_backend(
        "itm_sample_negatives", backend,
        {"torch": lambda: [], "cpp": lambda: _cpp_unsupported(sim),
         "triton": lambda: _triton_unsupported(sim, *extra)},
        automatic=automatic, what="ITM sampling",
    )


def _kernels():
    module, why = dispatch.triton_kernels("itm_sampling")
    if module is None:
        raise RuntimeError(why)
    return module


@torch.library.custom_op("blip2fast::itm_sample_negatives_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _itm_sample_negatives_triton(
    sim: Tensor, positive: Tensor, row_ids: Tensor, seed_step: Tensor, stream: int
) -> tuple[Tensor, Tensor]:
    """The Triton draw: (negative column per row (int64), number of fallback rows (int64 scalar))."""
    _check(sim, positive, row_ids, seed_step)
    rows = sim.shape[0]
    neg = torch.empty((rows,), dtype=torch.int64, device=sim.device)
    flags = torch.empty((rows,), dtype=torch.int32, device=sim.device)  # the kernel writes every row
    _kernels().sample(sim, positive, row_ids, seed_step, int(stream), neg, flags)
    return neg, flags.sum(dtype=torch.int64)  # a fixed-order torch reduction: deterministic, no atomics


@_itm_sample_negatives_triton.register_fake
def _itm_sample_negatives_triton_fake(sim, positive, row_ids, seed_step, stream):
    torch._check(sim.dim() == 2, lambda: f"sim must be 2-D (rows, candidates), got shape {tuple(sim.shape)}")
    return sim.new_empty((sim.shape[0],), dtype=torch.int64), sim.new_empty((), dtype=torch.int64)


@kernel_cost.register("blip2fast::itm_sample_negatives_triton")
def _itm_sample_negatives_triton_cost(sim, positive, row_ids, seed_step, stream):
    # one pass over sim hashing each (row, column) in registers; the wrapper's flags.sum is a second launch
    rows = sim.shape[0]
    return kernel_cost.KernelCost(launches=2, bytes_read=kernel_cost.nbytes(sim, positive, row_ids, seed_step)
                                  + 4.0 * rows, bytes_written=8.0 * rows + 4.0 * rows + 8.0)


def itm_sample_negatives(
    sim: Tensor, positive: Tensor, row_ids: Tensor, seed_step: Tensor, stream: int, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """Draw one hard negative per row; same arguments and results as `itm_sample_negatives_ref`.

    backend: "torch" | "cpp" | "triton" | None (BLIP2FAST_BACKEND if set, else automatic: the compiled op on
    the CPU; on CUDA what the GPU check measured fastest, torch until then). Every backend returns identical indices (the reference is
    the spec).
    """
    chosen = _choose_backend(sim, backend, positive, row_ids, seed_step)
    if chosen == "cpp":
        return torch.ops.blip2fast.itm_sample_negatives(sim, positive, row_ids, seed_step, int(stream))
    if chosen == "triton":
        _check(sim, positive, row_ids, seed_step)  # clear errors before the op (also under torch.compile)
        return _itm_sample_negatives_triton(sim, positive, row_ids, seed_step, int(stream))
    return itm_sample_negatives_ref(sim, positive, row_ids, seed_step, stream)


# The two directions of a step use consecutive streams, so one torch draw covers both (itm_sample_negative_pair).
assert hashing.STREAM_ITM_NEG_TEXT_FOR_IMAGE == hashing.STREAM_ITM_NEG_IMAGE_FOR_TEXT + 1


def itm_sample_negative_pair(
    sim_t2i: Tensor, sim_i2t: Tensor, positive: Tensor, row_ids: Tensor, seed_step: Tensor,
    backend: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Both ITM draws of a training step: (negative image per text row, negative text per image row, fallback rows
    of both). Identical to `itm_sample_negatives` on sim_t2i with STREAM_ITM_NEG_IMAGE_FOR_TEXT and on sim_i2t with
    STREAM_ITM_NEG_TEXT_FOR_IMAGE; the torch backend draws both in one pass (~120 small kernels instead of ~300,
    most of them the integer hash), the compiled backends are one kernel per direction already."""
    if sim_t2i.shape != sim_i2t.shape:
        raise ValueError(f"sim_t2i and sim_i2t must have the same shape, got {tuple(sim_t2i.shape)} and "
                         f"{tuple(sim_i2t.shape)}")
    chosen = _choose_backend(sim_t2i, backend, positive, row_ids, seed_step)
    if chosen != "torch":
        neg_image, n1 = itm_sample_negatives(sim_t2i, positive, row_ids, seed_step,
                                             hashing.STREAM_ITM_NEG_IMAGE_FOR_TEXT, backend=chosen)
        neg_text, n2 = itm_sample_negatives(sim_i2t, positive, row_ids, seed_step,
                                            hashing.STREAM_ITM_NEG_TEXT_FOR_IMAGE, backend=chosen)
        return neg_image, neg_text, n1 + n2
    _check(sim_t2i, positive, row_ids)
    neg, fallback = _draw_ref(torch.stack([sim_t2i, sim_i2t]), positive, row_ids, seed_step,
                              hashing.STREAM_ITM_NEG_IMAGE_FOR_TEXT)
    return neg[0], neg[1], fallback
