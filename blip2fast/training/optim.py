"""The optimiser and the learning-rate schedule (the paper's recipe, spec section 4), all on device.

- AdamW, betas (0.9, 0.98), weight decay 0.05 except on biases, norms (every 1-D parameter), the query tokens and
  the temperature; the fused kernel wherever torch has one for the device.
- Per-step schedule: linear warmup from 0 to the peak over `warmup` steps, then cosine from the peak down to a floor
  at the last step (LAVIS steps its schedule per epoch; per step is the paper's). `lr_at` evaluates it on the host
  (logs, checkpoints); `lr_at_tensor` evaluates the same formula on device from a step *tensor*, so a compiled step
  or a replayed CUDA graph computes each step's learning rate itself (a host float baked into a captured graph would
  stay the capture step's value forever).
- The learning rate lives in one float32 device tensor shared by every parameter group (`install_lr_tensor`):
  the training step writes it in place; AdamW reads it on device (fused / capturable paths take a tensor lr).
- Clipping of the global gradient norm without a host sync (foreach norms, no `error_if_nonfinite`); the norm comes
  back as a device tensor.
- `adamw_step_`: the AdamW update on an explicit gradient list through torch's functional AdamW, with the
  optimiser's own state and hyperparameters, so the whole training step (forward, backward, clipping, update) can
  be traced into one graph (`Optimizer.step` inserts graph breaks and reads `.grad`). Same state layout as
  `optimizer.step()`: checkpoints do not change.
- Gradient accumulation lives in the training step (`schedule.accum_steps` micro-batches per optimiser step).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

NO_DECAY_NAMES = ("query_tokens", "temp")


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms (every 1-D parameter), the query tokens and the temperature are not weight-decayed."""
    return param.ndim < 2 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES or name in NO_DECAY_NAMES


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the parameters that require grad: decayed and not. Each group also carries the
    parameter names (`names`), which the checkpoint uses to save optimiser state by name."""
    decay, plain = ([], []), ([], [])
    for name, p in model.named_parameters():
        if p.requires_grad:
            params, names = plain if no_decay(name, p) else decay
            params.append(p)
            names.append(name)
    return [{"params": decay[0], "names": decay[1], "weight_decay": weight_decay},
            {"params": plain[0], "names": plain[1], "weight_decay": 0.0}]


def fused_supported(device: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for float32 parameters on `device`."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        return device.type in _get_fused_kernels_supported_devices()
    except ImportError:  # private helper moved: CUDA always had one
        return device.type == "cuda"


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05, betas=(0.9, 0.98), eps: float = 1e-8,
                    fused: Optional[bool] = None, capturable: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters with the no-decay rule. fused=None: fused where supported.

    capturable=True (CUDA graphs, and traced steps) keeps the step counts on device; without a fused kernel it
    selects torch's foreach capturable path, which also accepts a tensor learning rate."""
    groups = param_groups(model, weight_decay)
    if not any(g["params"] for g in groups):
        raise ValueError("no parameter requires grad: nothing to train")
    device = next(p for g in groups for p in g["params"]).device
    if fused is None:
        fused = fused_supported(device)
    if fused:
        kw = {"fused": True, "capturable": capturable}
    else:
        kw = {"foreach": device.type == "cuda" or capturable, "capturable": capturable}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kw)


# ------------------------------------------------------------------------------------------------ learning rate
def lr_at(step: int, peak: float, warmup: int, total: int, floor: float) -> float:
    """The learning rate of optimiser step `step` (0-based): linear warmup reaching `peak` at step warmup - 1,
    then cosine from `peak` to `floor` at step `total` (and `floor` after)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, t)))


def lr_at_tensor(step: Tensor, peak: float, warmup: int, total: int, floor: float) -> Tensor:
    """`lr_at` on device: `step` is an integer tensor (0-dim); returns a float32 tensor on its device. Evaluated in
    float64 (equal to `lr_at` to float64 rounding) and rounded once to float32, the dtype the fused AdamW kernels
    read. Only kernels with the constants as scalars: no host-to-device copy (capturable)."""
    s = step.to(torch.float64)
    warm = (s + 1.0) * (peak / max(1, warmup))
    t = ((s - warmup) / max(1, total - warmup)).clamp(max=1.0)
    cosine = floor + 0.5 * (peak - floor) * (1.0 + torch.cos(math.pi * t))
    return torch.where(s < warmup, warm, cosine).to(torch.float32)


def install_lr_tensor(opt: torch.optim.Optimizer, lr: Tensor) -> None:
    """Make every parameter group read the learning rate from the one device tensor `lr` (float32, 0-dim).
    Call again after `opt.load_state_dict` (which deep-copies the groups' values)."""
    if lr.dtype != torch.float32 or lr.dim() != 0:
        raise ValueError(f"the lr tensor must be a float32 scalar (the fused AdamW kernels read float32), got "
                         f"{lr.dtype} {tuple(lr.shape)}")
    for g in opt.param_groups:
        g["lr"] = lr


# ------------------------------------------------------------------------------------------------ clipping
def clip_grad_norm(params: Iterable[Tensor], max_norm: float) -> Tensor:
    """Clip the global gradient norm of `params`' `.grad` to `max_norm` (0 = no clipping) and return the norm
    before clipping, as a device tensor (reading it is the caller's choice, so the step never waits for the device)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    return clip_grads_(params[0].device, [p.grad for p in params], max_norm)


def clip_grads_(device: torch.device, grads: Sequence[Tensor], max_norm: float) -> Tensor:
    """Scale `grads` in place so that their global L2 norm is at most `max_norm` (0 = measure only); returns the
    norm before clipping (float32 device tensor). torch.nn.utils.clip_grad_norm_'s formula (coefficient
    max_norm / (norm + 1e-6), clamped to 1), with foreach kernels and no non-finite check: nothing reads the device."""
    if not grads:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm(list(grads), 2.0)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2.0)
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(list(grads), coef)
    return total


# ------------------------------------------------------------------------------------------------ the update
def init_state_(opt: torch.optim.AdamW) -> None:
    """Create AdamW's per-parameter state as `optimizer.step()` would on its first call (zero moments, a step
    count on device for fused / capturable groups), so the first traced or captured step finds it in place."""
    from torch.optim.optimizer import _get_scalar_dtype

    for g in opt.param_groups:
        on_device = g.get("capturable", False) or g.get("fused", False)
        for p in g["params"]:
            st = opt.state[p]
            if len(st) == 0:
                st["step"] = torch.zeros((), dtype=_get_scalar_dtype(is_fused=g.get("fused", False)),
                                         device=p.device if on_device else "cpu")
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def adamw_step_(opt: torch.optim.AdamW, params: Sequence[Tensor], grads: Sequence[Optional[Tensor]]) -> None:
    """One AdamW update of `params` with `grads` (None = no gradient: the parameter is left alone, as
    `optimizer.step()` does with `.grad` None), using `opt`'s state and per-group hyperparameters (lr may be the
    device tensor). Call `init_state_(opt)` once first."""
    from torch.optim.adamw import adamw

    grad_of = {id(p): g for p, g in zip(params, grads)}
    with torch.no_grad():
        for group in opt.param_groups:
            ps, gs = [], []
            for p in group["params"]:
                g = grad_of.get(id(p))
                if g is not None:
                    ps.append(p)
                    gs.append(g)
            if not ps:
                continue
            st = [opt.state[p] for p in ps]
            beta1, beta2 = group["betas"]
            adamw(ps, gs, [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st], [], [s["step"] for s in st],
                  foreach=group.get("foreach"), capturable=group.get("capturable", False),
                  differentiable=False, fused=group.get("fused"), grad_scale=None, found_inf=None,
                  has_complex=False, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                  weight_decay=group["weight_decay"], eps=group["eps"], maximize=group.get("maximize", False))


__all__ = ["adamw_step_", "build_optimizer", "clip_grad_norm", "clip_grads_", "init_state_", "install_lr_tensor",
           "lr_at", "lr_at_tensor", "no_decay", "param_groups"]
