"""Shared pieces of the evaluations: the model behind wrappers, eval mode, autocast, and rank gathering.

Distributed evaluation: every rank evaluates its own part of the data and the results are gathered, so every rank
ends with the same full results (and rank 0 prints and writes them). Without an initialised process group all of
this degrades to the identity.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..distributed import world

Amp = Union[None, str, torch.dtype]


def unwrap(model: nn.Module) -> nn.Module:
    """The Blip2 inside DistributedDataParallel / FSDP-style (`.module`) and torch.compile (`._orig_mod`)
    wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module) and not hasattr(model, "qformer"):
            model = model.module
        else:
            return model


def model_device(model: nn.Module) -> torch.device:
    return model.query_tokens.device


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """model.eval() for the block, then the previous train/eval mode again (the training loop calls us mid-run)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def autocast(device: torch.device, amp: Amp):
    """amp: None (no autocast), "auto" (bfloat16 autocast on CUDA, none on the CPU: the training loop's rule), or a
    torch dtype to autocast to on any device."""
    if amp is None:
        return contextlib.nullcontext()
    if isinstance(amp, str):
        if amp != "auto":
            raise ValueError(f"amp={amp!r}: use None, 'auto' or a torch dtype (torch.bfloat16, torch.float16)")
        if device.type != "cuda":
            return contextlib.nullcontext()
        amp = torch.bfloat16
    return torch.autocast(device.type, dtype=amp)


# ------------------------------------------------------------------------------------------------ gathering
def gather_cat(x: Tensor) -> Tensor:
    """Concatenate every rank's `x` along dim 0 in rank order; the ranks' sizes along dim 0 may differ. Identity
    with one process. The result is on x's device (a CPU tensor travels through the GPU under NCCL)."""
    _, n = world()
    if n == 1:
        return x
    home = x.device
    if dist.get_backend() == "nccl" and x.device.type != "cuda":
        x = x.to(torch.device("cuda", torch.cuda.current_device()))
    size = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(n)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    top = max(sizes)
    padded = x.new_zeros((top,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(home)


def gather_objects(obj: Any) -> list:
    """[rank 0's obj, rank 1's obj, ...] (picklable objects); [obj] with one process."""
    _, n = world()
    if n == 1:
        return [obj]
    out: list = [None] * n
    dist.all_gather_object(out, obj)
    return out


def split_range(n: int, rank: Optional[int] = None, world_size: Optional[int] = None) -> tuple[int, int]:
    """[start, end) of this rank's contiguous share of n items (the first n % world ranks get one more)."""
    if rank is None or world_size is None:
        rank, world_size = world()
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
