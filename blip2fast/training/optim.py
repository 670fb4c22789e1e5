"""The optimiser and the learning-rate schedule (the paper's recipe, spec section 4).

- AdamW, betas (0.9, 0.98), weight decay 0.05 except on biases, norms (every 1-D parameter), the query tokens and
  the temperature; the fused kernel wherever torch has one for the device.
- Per-step schedule: linear warmup from 0 to the peak over `warmup` steps, then cosine from the peak down to a floor
  at the last step (LAVIS steps its schedule per epoch; per step is the paper's).
- Clipping of the global gradient norm; the norm comes back as a device tensor (no host sync).
- Gradient accumulation lives in the trainer (`schedule.accum_steps` micro-batches per optimiser step).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

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
                    fused: Optional[bool] = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters with the no-decay rule. fused=None: fused where supported."""
    groups = param_groups(model, weight_decay)
    if not any(g["params"] for g in groups):
        raise ValueError("no parameter requires grad: nothing to train")
    device = next(p for g in groups for p in g["params"]).device
    if fused is None:
        fused = fused_supported(device)
    kw = {"fused": True} if fused else {"foreach": device.type == "cuda"}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kw)


def lr_at(step: int, peak: float, warmup: int, total: int, floor: float) -> float:
    """The learning rate of optimiser step `step` (0-based): linear warmup reaching `peak` at step warmup - 1,
    then cosine from `peak` to `floor` at step `total` (and `floor` after)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, t)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def clip_grad_norm(params: Iterable[Tensor], max_norm: float) -> Tensor:
    """Clip the global gradient norm to `max_norm` (0 = no clipping) and return the norm before clipping, as a
    device tensor (reading it is the caller's choice, so the step never waits for the device)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params])
