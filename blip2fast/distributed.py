"""torch.distributed helpers that also work with no process group (one process is a world of size 1).

LAVIS needs a process group even on one GPU (LAVIS #537); here every helper degrades to the identity.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate every rank's `x` along dim 0, detached (LAVIS's `concat_all_gather`, local shard included)."""
    x = x.detach()
    _, n = world()
    if n == 1:
        return x
    out = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous())
    return out


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate along dim 0 keeping autograd: each rank's gradient w.r.t. its shard sums over all ranks' uses."""
    _, n = world()
    if n == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum over ranks, out of place and without autograd (counts, statistics)."""
    _, n = world()
    if n == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x
