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


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient for this rank's shard.

    Written here rather than taken from `torch.distributed.nn.functional.all_gather`, whose gloo backward (an
    all-to-all emulation of reduce-scatter) gave wrong gradients in our two-process test (torch 2.13)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, n = world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        out = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            shard = torch.empty((ctx.rows,) + tuple(grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(shard, grad)
            return shard
        grad = grad.clone()  # gloo has no reduce-scatter: all-reduce and keep our rows
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate along dim 0 keeping autograd: each rank's gradient w.r.t. its shard sums over all ranks' uses."""
    _, n = world()
    if n == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum over ranks, out of place and without autograd (counts, statistics)."""
    _, n = world()
    if n == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x
