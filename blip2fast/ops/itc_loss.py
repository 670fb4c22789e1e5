"""The ITC (image-text contrastive) loss as one op: max-over-queries similarities both ways against the gathered
batch and the two label-smoothed cross-entropies, forward and backward, behind `itc_loss` (bottom of this file).

Backends, chosen by argument > BLIP2FAST_BACKEND > automatic (ops/dispatch.py):
  "torch":  the reference (ops/losses.py: itc_similarities + itc_loss_ref); autograd by PyTorch. Any device, any
            float dtype; materialises the (B, Ba, Q) products.
  "triton": kernels/itc_loss.py behind the custom ops blip2fast::itc_loss_triton / itc_loss_triton_backward
            (custom_op + register_fake + register_autograd: torch.compile(fullgraph=True) and CUDA graphs see them).
            CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests); fp32/fp16/bf16 (bf16 on CUDA only);
            Q <= 64, E <= 256. Memory O(B x Ba).
  "cpp":    torch.ops.blip2fast.itc_loss_fwd / itc_loss_bwd from blip2fast._C (csrc/; schema in the ITC contract),
            with their fake kernels and autograd registered here, once the extension provides them.
Automatic: "torch" on CPU tensors; on CUDA tensors the order the GPU check script measured fastest
(dispatch.gpu_order), "torch" until a measurement is committed.

Gradients flow to every input that requires grad (image_feats, text_feat, image_all, text_all, temp) and are
computed only for those: with LAVIS's convention image_all / text_all are detached and cost nothing; with the
gradient-carrying gather they get theirs (in one process image_all IS image_feats and autograd sums both).
The returned similarities are float32 and detached (ITM negative sampling, return_details).
"""
from __future__ import annotations

import threading
from typing import Optional, Union

import torch
from torch import Tensor

from . import _extension, dispatch, kernel_cost
from .losses import itc_loss_ref, itc_similarities, upcast

BACKENDS = ("torch", "triton", "cpp")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_GRAD_NAMES = ("image_feats", "text_feat", "image_all", "text_all", "temp")


# ---------------------------------------------------------------------------------------------------------------
# Input checks (every backend; shapes and dtypes only, values are never read: no device sync)


def _check_inputs(image_feats: Tensor, text_feat: Tensor, image_all: Tensor, text_all: Tensor, temp: Tensor,
                  targets: Tensor, label_smoothing: float) -> None:
    if image_feats.dim() != 3 or image_all.dim() != 3:
        raise ValueError(f"image_feats and image_all must be 3-D (batch, queries, embed_dim); got shapes "
                         f"{tuple(image_feats.shape)} and {tuple(image_all.shape)}")
    if text_feat.dim() != 2 or text_all.dim() != 2:
        raise ValueError(f"text_feat and text_all must be 2-D (batch, embed_dim); got shapes "
                         f"{tuple(text_feat.shape)} and {tuple(text_all.shape)}")
    B, Q, E = image_feats.shape
    Ba = image_all.shape[0]
    if B < 1 or Q < 1 or E < 1:
        raise ValueError(f"image_feats has an empty dimension: shape {tuple(image_feats.shape)}")
    if Ba < 1:
        raise ValueError(f"image_all has no rows (Ba = 0): the gathered batch must hold at least this rank's "
                         f"{B} samples; got shape {tuple(image_all.shape)}")
    if image_all.shape[1:] != (Q, E):
        raise ValueError(f"image_all must have shape (Ba, {Q}, {E}) like image_feats {tuple(image_feats.shape)}; "
                         f"got {tuple(image_all.shape)}")
    if text_feat.shape != (B, E):
        raise ValueError(f"text_feat must have shape ({B}, {E}) (one text per image, same embed_dim); got "
                         f"{tuple(text_feat.shape)}")
    if text_all.shape != (Ba, E):
        raise ValueError(f"text_all must have shape ({Ba}, {E}) (as many rows as image_all); got "
                         f"{tuple(text_all.shape)}")
    feats = (image_feats, text_feat, image_all, text_all)
    dtypes = {t.dtype for t in feats}
    if len(dtypes) > 1 or not image_feats.dtype.is_floating_point:
        raise TypeError(f"image_feats, text_feat, image_all, text_all must share one floating dtype; got "
                        f"{', '.join(str(t.dtype) for t in feats)}")
    if not isinstance(temp, Tensor) or temp.numel() != 1 or not temp.dtype.is_floating_point:
        raise TypeError(f"temp must be a one-element floating tensor (the clamped temperature); got "
                        f"{type(temp).__name__} {getattr(temp, 'dtype', '')} {tuple(getattr(temp, 'shape', ()))}")
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be int64 (the global column of each row's positive); got {targets.dtype}: "
                        f"pass targets.long()")
    if targets.shape != (B,):
        raise ValueError(f"targets must have shape ({B},) (one positive column per row); got {tuple(targets.shape)}")
    devices = {t.device for t in (*feats, temp, targets)}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device; got {sorted(str(d) for d in devices)}")
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}")


# ---------------------------------------------------------------------------------------------------------------
# "torch": the reference


def itc_loss_torch(image_feats: Tensor, text_feat: Tensor, image_all: Tensor, text_all: Tensor, temp: Tensor,
                   targets: Tensor, label_smoothing: float) -> tuple[Tensor, Tensor, Tensor]:
    """The reference (ops/losses.py), with the op's return convention (similarities detached, float32; float64
    stays float64)."""
    sim_i2t, sim_t2i = itc_similarities(image_feats, text_feat, image_all, text_all, temp)
    loss = itc_loss_ref(sim_i2t, sim_t2i, targets, label_smoothing)
    return loss, upcast(sim_i2t.detach()), upcast(sim_t2i.detach())


# ---------------------------------------------------------------------------------------------------------------
# "triton": custom ops over kernels/itc_loss.py


def _kernels():
    module, why = dispatch.triton_kernels("itc_loss")
    if module is None:
        raise RuntimeError(why)
    return module


@torch.library.custom_op("blip2fast::itc_loss_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _itc_triton_op(image_feats: Tensor, text_feat: Tensor, image_all: Tensor, text_all: Tensor, temp: Tensor,
                   targets: Tensor, label_smoothing: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss () f32, sims (2, B, Ba) f32 = [sim_i2t, sim_t2i], args (2, B, Ba) i32 argmax queries, stats (2, 2, B)
    f32 row max / row sum of exp(sim - max) per direction (the softmax for the backward), wsum () f32 (d temp))."""
    return _kernels().forward(image_feats, text_feat, image_all, text_all, temp, targets, label_smoothing)


@_itc_triton_op.register_fake
def _itc_triton_fake(image_feats, text_feat, image_all, text_all, temp, targets, label_smoothing):
    B, Ba = image_feats.shape[0], image_all.shape[0]
    f32 = dict(dtype=torch.float32)
    return (image_feats.new_empty((), **f32), image_feats.new_empty((2, B, Ba), **f32),
            image_feats.new_empty((2, B, Ba), dtype=torch.int32), image_feats.new_empty((2, 2, B), **f32),
            image_feats.new_empty((), **f32))


def _itc_fwd_flops(image_feats: Tensor, image_all: Tensor) -> float:
    """Both directions' similarity products over every (row, column, query): 2 x 2 B Ba Q E (the reference's two
    einsums)."""
    B, Q, E = image_feats.shape
    return 4.0 * B * image_all.shape[0] * Q * E


def _itc_bwd_flops(image_feats: Tensor, image_all: Tensor, output_mask) -> tuple[float, float]:
    """(the reference's backward products, what the kernels skip): the reference multiplies the dense
    (B, Ba, Q) gradient of each einsum into each wanted feature gradient (2 B Ba Q E each); the kernels visit only
    the argmax query of each pair (2 B Ba E each)."""
    B, Q, E = image_feats.shape
    Ba = image_all.shape[0]
    wanted = sum(bool(m) for m in list(output_mask)[:4])
    return 2.0 * B * Ba * Q * E * wanted, -2.0 * B * Ba * (Q - 1) * E * wanted


@kernel_cost.register("blip2fast::itc_loss_triton")
def _itc_triton_cost(image_feats, text_feat, image_all, text_all, temp, targets, label_smoothing):
    # two kernels (similarities + argmax, cross-entropy) and three small torch reductions (kernels/itc_loss.py)
    B, Ba = image_feats.shape[0], image_all.shape[0]
    return kernel_cost.KernelCost(
        flops=_itc_fwd_flops(image_feats, image_all), launches=5,
        bytes_read=kernel_cost.nbytes(image_feats, text_feat, image_all, text_all, temp, targets),
        bytes_written=4.0 * (2 * B * Ba * 2 + 2 * 2 * B + 2))  # sims + args, stats, loss and wsum


@torch.library.custom_op("blip2fast::itc_loss_triton_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _itc_triton_backward_op(
    grad_loss: Tensor, image_feats: Tensor, text_feat: Tensor, image_all: Tensor, text_all: Tensor, temp: Tensor,
    targets: Tensor, label_smoothing: float, sims: Tensor, args: Tensor, stats: Tensor, wsum: Tensor,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(d image_feats, d text_feat, d image_all, d text_all, d temp); an unwanted one (output_mask False) is an
    empty (0,) tensor and is not computed."""
    grads = _kernels().backward(grad_loss, image_feats, text_feat, image_all, text_all, temp, targets,
                                label_smoothing, sims, args, stats, wsum, output_mask)
    return tuple(g if g is not None else _absent_grad(x)
                 for g, x in zip(grads, (image_feats, text_feat, image_all, text_all, temp)))


def _absent_grad(x: Tensor) -> Tensor:
    return x.new_empty((0,))


def _grads_fake(image_feats, text_feat, image_all, text_all, temp, output_mask):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) if want else _absent_grad(x)
                 for want, x in zip(output_mask, (image_feats, text_feat, image_all, text_all, temp)))


@_itc_triton_backward_op.register_fake
def _itc_triton_backward_fake(grad_loss, image_feats, text_feat, image_all, text_all, temp, targets,
                              label_smoothing, sims, args, stats, wsum, output_mask):
    return _grads_fake(image_feats, text_feat, image_all, text_all, temp, output_mask)


def _itc_bwd_cost(image_feats, text_feat, image_all, text_all, temp, stats, output_mask, launches):
    flops, skipped = _itc_bwd_flops(image_feats, image_all, output_mask)
    B, Ba = image_feats.shape[0], image_all.shape[0]
    wanted = [x for m, x in zip(output_mask, (image_feats, text_feat, image_all, text_all, temp)) if m]
    return kernel_cost.KernelCost(
        flops=flops, extra_flops=skipped, launches=launches,
        bytes_read=kernel_cost.nbytes(image_feats, text_feat, image_all, text_all, temp, stats) + 4.0 * 2 * B * Ba * 2,
        bytes_written=kernel_cost.nbytes(*wanted))


@kernel_cost.register("blip2fast::itc_loss_triton_backward")
def _itc_triton_backward_cost(grad_loss, image_feats, text_feat, image_all, text_all, temp, targets,
                              label_smoothing, sims, args, stats, wsum, output_mask):
    # one kernel per side wanted, plus the fixed-order sum of its split partials (kernels/itc_loss.py)
    return _itc_bwd_cost(image_feats, text_feat, image_all, text_all, temp, stats, output_mask, launches=4)


def _triton_setup_context(ctx, inputs, output):
    image_feats, text_feat, image_all, text_all, temp, targets, label_smoothing = inputs
    _, sims, args, stats, wsum = output
    ctx.save_for_backward(image_feats, text_feat, image_all, text_all, temp, targets, sims, args, stats, wsum)
    ctx.label_smoothing = label_smoothing
    ctx.mark_non_differentiable(sims, stats, wsum)  # statistics for the backward and for ITM sampling


def _triton_backward(ctx, grad_loss, *_):
    image_feats, text_feat, image_all, text_all, temp, targets, sims, args, stats, wsum = ctx.saved_tensors
    mask = [bool(m) for m in ctx.needs_input_grad[:5]]
    if not any(mask):
        return (None,) * 7
    if grad_loss is None:
        grad_loss = torch.zeros((), dtype=torch.float32, device=sims.device)
    grads = _itc_triton_backward_op(grad_loss.float(), image_feats, text_feat, image_all, text_all, temp, targets,
                                    ctx.label_smoothing, sims, args, stats, wsum, mask)
    return (*(g if m else None for g, m in zip(grads, mask)), None, None)


_itc_triton_op.register_autograd(_triton_backward, setup_context=_triton_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# "cpp": torch.ops.blip2fast.itc_loss_fwd / itc_loss_bwd (csrc/), registered here when the extension has them

_CPP_FWD, _CPP_BWD = "blip2fast::itc_loss_fwd", "blip2fast::itc_loss_bwd"
_cpp_lock = threading.Lock()
_cpp_state: Optional[tuple] = None  # (available, cuda kernels, why not)


def _cpp_fwd_fake(image_feats, text_feat, image_all, text_all, temp, targets, label_smoothing):
    B, Ba = image_feats.shape[0], image_all.shape[0]
    f32 = dict(dtype=torch.float32)
    return (image_feats.new_empty((), **f32), image_feats.new_empty((B, Ba), **f32),
            image_feats.new_empty((B, Ba), **f32), image_feats.new_empty((B, Ba), dtype=torch.int32),
            image_feats.new_empty((B, Ba), dtype=torch.int32), image_feats.new_empty((2, B), **f32))


def _cpp_bwd_fake(grad_loss, image_feats, text_feat, image_all, text_all, temp, targets, label_smoothing, sim_i2t,
                  sim_t2i, arg_i2t, arg_t2i, lse, output_mask):
    return _grads_fake(image_feats, text_feat, image_all, text_all, temp, output_mask)


@kernel_cost.register(_CPP_FWD)
def _cpp_fwd_cost(image_feats, text_feat, image_all, text_all, temp, targets, label_smoothing):
    # csrc ITC: a similarity/argmax kernel and a cross-entropy kernel
    B, Ba = image_feats.shape[0], image_all.shape[0]
    return kernel_cost.KernelCost(
        flops=_itc_fwd_flops(image_feats, image_all), launches=2,
        bytes_read=kernel_cost.nbytes(image_feats, text_feat, image_all, text_all, temp, targets),
        bytes_written=4.0 * (2 * B * Ba * 2 + 2 * B + 1))  # two sims + two argmax maps, lse, loss


@kernel_cost.register(_CPP_BWD)
def _cpp_bwd_cost(grad_loss, image_feats, text_feat, image_all, text_all, temp, targets, label_smoothing, sim_i2t,
                  sim_t2i, arg_i2t, arg_t2i, lse, output_mask):
    return _itc_bwd_cost(image_feats, text_feat, image_all, text_all, temp, lse, output_mask, launches=2)


def _cpp_setup_context(ctx, inputs, output):
    image_feats, text_feat, image_all, text_all, temp, targets, label_smoothing = inputs
    _, sim_i2t, sim_t2i, arg_i2t, arg_t2i, lse = output
    ctx.save_for_backward(image_feats, text_feat, image_all, text_all, temp, targets, sim_i2t, sim_t2i, arg_i2t,
                          arg_t2i, lse)
    ctx.label_smoothing = label_smoothing
    ctx.mark_non_differentiable(sim_i2t, sim_t2i, lse)


def _cpp_backward(ctx, grad_loss, *_):
    saved = ctx.saved_tensors
    mask = [bool(m) for m in ctx.needs_input_grad[:5]]
    if not any(mask):
        return (None,) * 7
    if grad_loss is None:
        grad_loss = torch.zeros((), dtype=torch.float32, device=saved[0].device)
    (image_feats, text_feat, image_all, text_all, temp, targets, sim_i2t, sim_t2i, arg_i2t, arg_t2i, lse) = saved
    grads = torch.ops.blip2fast.itc_loss_bwd(grad_loss.float(), image_feats, text_feat, image_all, text_all, temp,
                                             targets, ctx.label_smoothing, sim_i2t, sim_t2i, arg_i2t, arg_t2i, lse,
                                             mask)
    return (*(g if m else None for g, m in zip(grads, mask)), None, None)


def _load_cpp() -> tuple:

    status = _extension.load_extension()
    if not status:
        return (False, False, status.reason)
    if not (hasattr(torch.ops.blip2fast, "itc_loss_fwd") and hasattr(torch.ops.blip2fast, "itc_loss_bwd")):
        return (False, False, "blip2fast._C has no itc_loss_fwd (rebuild: pip install -e . --no-build-isolation)")
    try:
        torch.library.register_fake(_CPP_FWD)(_cpp_fwd_fake)
        torch.library.register_fake(_CPP_BWD)(_cpp_bwd_fake)
        torch.library.register_autograd(_CPP_FWD, _cpp_backward, setup_context=_cpp_setup_context)
    except Exception as e:  # e.g. the C++ side registered its own Meta/Autograd kernels
        return (False, False, f"blip2fast._C has itc_loss_fwd but registering its fake/autograd kernels failed "
                              f"({type(e).__name__}: {e})")
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key(_CPP_FWD, "CUDA")
    return (True, cuda, "")


@torch.compiler.assume_constant_result
def cpp_status() -> tuple:
    """(available, built with CUDA kernels, why not available); loads and registers once. A constant for
    torch.compile (the import and registration happen at trace time, outside the graph)."""
    global _cpp_state
    if _cpp_state is None:
        with _cpp_lock:
            if _cpp_state is None:
                _cpp_state = _load_cpp()
    return _cpp_state


# ---------------------------------------------------------------------------------------------------------------
# Backend choice


def _triton_unsupported(image_feats: Tensor, text_feat: Tensor, image_all: Tensor, text_all: Tensor) -> list[str]:
    """Why the Triton kernels cannot take this input ([] when they can)."""
    # devices of temp and targets: _check_inputs has put everything on one device
    reasons = dispatch.triton_reasons("itc_loss", image_feats, text_feat, image_all, text_all, dtypes=KERNEL_DTYPES)
    if reasons:
        return reasons
    _, Q, E = image_feats.shape
    module = _kernels()
    if Q > module.MAX_Q:
        reasons.append(f"{Q} queries per image > {module.MAX_Q}, the most the kernels take")
    if E > module.MAX_E:
        reasons.append(f"embed_dim {E} > {module.MAX_E}, the widest feature row the kernels hold in one tile")
    return reasons


def _cpp_unsupported(image_feats: Tensor) -> list[str]:
    available, cuda, why = cpp_status()
    if not available:
        return [why]
    reasons = []
    if image_feats.dtype not in KERNEL_DTYPES:
        reasons.append(f"dtype {image_feats.dtype} is not one of float32/float16/bfloat16")
    dev = image_feats.device
    if dev.type == "cuda" and not cuda:
        reasons.append("blip2fast._C was built without CUDA (CPU-only torch or no nvcc at build time)")
    elif dev.type not in ("cpu", "cuda"):
        reasons.append(f"no kernel for device type {dev.type!r} (CPU and CUDA only)")
    return reasons


def _choose_backend(image_feats, text_feat, image_all, text_all, backend: Optional[str]) -> str:
    # Automatic order on CUDA: what benchmarks/bench_itc_loss.py (run by the GPU check script) measured fastest at
    # the paper's sizes (dispatch.gpu_order), the reference until a measurement is committed.
    automatic = dispatch.gpu_order("itc_loss", ("torch",)) if image_feats.device.type == "cuda" else ("torch",)
    return dispatch.choose_backend(
        "itc_loss", backend,
        {
            "torch": lambda: [],
            "triton": lambda: _triton_unsupported(image_feats, text_feat, image_all, text_all),
            "cpp": lambda: _cpp_unsupported(image_feats),
        },
        automatic=automatic,
        what="ITC loss",
    )


# ---------------------------------------------------------------------------------------------------------------
# Public op


def itc_loss(
    image_feats: Tensor,
    text_feat: Tensor,
    image_all: Tensor,
    text_all: Tensor,
    temp: Union[Tensor, float],
    targets: Tensor,
    label_smoothing: float,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """ITC loss of this rank's rows against the gathered batch: (loss, sim_i2t, sim_t2i).

    image_feats (B, Q, E), text_feat (B, E): this rank's L2-normalised features; image_all (Ba, Q, E),
    text_all (Ba, E): the gathered batch (detached for LAVIS's convention, or carrying grad); one float dtype.
    temp: the (clamped) temperature, a one-element tensor (a float is taken as a constant).
    targets (B,) int64: the global column of each row's positive, 0 <= t < Ba (not checked on the host: that
    would synchronise; the kernels return a NaN loss for a target out of range).
    label_smoothing: eps in [0, 1) over the Ba classes.
    backend: "torch" | "triton" | "cpp" | None (BLIP2FAST_BACKEND if set, else automatic: torch on the CPU;
    on CUDA the measured fastest, torch until measured). A requested backend that cannot take the input raises with the reasons.
    Returns loss () (float32, or the input dtype's upcast for torch), sim_i2t and sim_t2i (B, Ba) float32,
    detached: max_q <image_feats[b, q], text_all[j]> / temp and max_q <text_feat[b], image_all[j, q]> / temp.
    """
    if not isinstance(temp, Tensor):
        temp = torch.full((), float(temp), dtype=torch.float32, device=image_feats.device)
    _check_inputs(image_feats, text_feat, image_all, text_all, temp, targets, label_smoothing)
    name = _choose_backend(image_feats, text_feat, image_all, text_all, backend)
    if name == "torch":
        return itc_loss_torch(image_feats, text_feat, image_all, text_all, temp, targets, label_smoothing)
    temp32 = temp.reshape(()).float()  # the kernels' contract: a 0-dim float32 temperature
    if name == "triton":
        loss, sims, _, _, _ = _itc_triton_op(image_feats, text_feat, image_all, text_all, temp32, targets,
                                             float(label_smoothing))
        return loss, sims[0], sims[1]
    feats = [t.contiguous() for t in (image_feats, text_feat, image_all, text_all)]
    loss, sim_i2t, sim_t2i, _, _, _ = torch.ops.blip2fast.itc_loss_fwd(*feats, temp32, targets.contiguous(),
                                                                       float(label_smoothing))
    return loss, sim_i2t, sim_t2i
