"""torch.distributed helpers that also work with no process group (one process is a world of size 1).

LAVIS needs a process group even on one GPU (LAVIS #537); here every helper degrades to the identity.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

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


def _owned(index: Tensor, source: int, rows: int, ndim: int) -> tuple[Tensor, Tensor]:
    """(local row of each requested global index in `source`'s shard (clamped into range), whether `source` owns
    it, shaped to broadcast over a (len(index), ...) tensor of `ndim` dims)."""
    local = index - source * rows
    owned = (local >= 0) & (local < rows)
    return local.clamp(0, rows - 1), owned.view((-1,) + (1,) * (ndim - 1))


def _gather_rows_forward(x: Tensor, index: Tensor) -> Tensor:
    """out[i] = (concatenation of every rank's x)[index[i]], holding at most one other rank's shard at a time."""
    rank, n = world()
    rows = x.shape[0]
    x = x.contiguous()
    out = x.new_zeros((index.shape[0],) + tuple(x.shape[1:]))
    shard = torch.empty_like(x)  # receives each other rank's shard in turn
    for source in range(n):
        src = x if source == rank else shard
        dist.broadcast(src, src=source)
        local, owned = _owned(index, source, rows, x.dim())
        out = torch.where(owned, src.index_select(0, local), out)
    return out


class _GatherRowsWithGrad(torch.autograd.Function):
    """Forward: `_gather_rows_forward`. Backward: for each source rank, the gradients of the rows picked from it
    are scattered into a (rows, ...) buffer and summed onto that rank (`dist.reduce`), which keeps the sum as the
    gradient of its own shard."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return _gather_rows_forward(x, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        rank, n = world()
        rows = ctx.rows
        grad = grad.contiguous()
        mine = None
        for source in range(n):
            local, owned = _owned(index, source, rows, grad.dim())
            part = grad.new_zeros((rows,) + tuple(grad.shape[1:]))
            part.index_add_(0, local, grad.masked_fill(~owned, 0))
            dist.reduce(part, dst=source)  # sum over the ranks that picked rows of `source`
            if source == rank:
                mine = part
        return mine, None


def _check_rows(x: Tensor, index: Tensor) -> None:
    if index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"index must be a 1-D integer tensor of global row numbers, got {index.dtype} "
                         f"{tuple(index.shape)}")
    if x.dim() < 1:
        raise ValueError("x must have a row dimension (dim 0)")


def gather_rows_with_grad(x: Tensor, index: Tensor) -> Tensor:
    """Rows `index` (global numbers: rank r's shard holds rows [r * B, (r + 1) * B)) of the concatenation of every
    rank's `x` (B, ...), with autograd: each picked row's gradient is sent back to its owner and added to the
    owner's gradient of `x`. Every rank calls it with its own `x` (same shape on all ranks) and `index` (same
    length on all ranks). One process: `x.index_select(0, index)`.

    What moves, with fixed shapes and no host synchronisation: for each source rank s, a broadcast of s's shard,
    from which every rank immediately keeps the rows it asked for (torch.where into a (len(index), ...) buffer);
    backward, for each s, a (B, ...) buffer of the gradients every rank holds for s's rows, summed onto s
    (`dist.reduce`). Peak extra memory is one shard plus the output, O(B) rows, where an all-gather holds
    world x B rows (and its backward a world x B gradient).

    Bytes on the wire are NOT reduced: every rank still receives every other rank's whole shard (the volume of an
    all-gather) and sends a whole shard-sized gradient per source (the volume of a reduce-scatter). Sending only
    the requested rows would need each pair's row count on the host before the transfer (a device-to-host sync
    per step, and data-dependent shapes); with fixed shapes the worst case (all of a rank's rows requested from one
    source) sets the size anyway. Indices outside [0, world * B) give zero rows (values are never checked: that
    would be a sync)."""
    _check_rows(x, index)
    _, n = world()
    if n == 1:
        return x.index_select(0, index)
    return _GatherRowsWithGrad.apply(x, index)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """`gather_rows_with_grad` without autograd (integer tensors such as token ids, or detached features)."""
    _check_rows(x, index)
    _, n = world()
    if n == 1:
        return x.detach().index_select(0, index)
    with torch.no_grad():
        return _gather_rows_forward(x.detach(), index)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum over ranks, out of place and without autograd (counts, statistics)."""
    _, n = world()
    if n == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


_exits_without_teardown = False  # set by run_launched_cli under torchrun: os._exit follows main(), see there


def end_process_group() -> None:
    """A normal end of a group this process started: wait for every rank, then destroy the group, unless this is a
    launched CLI that leaves with os._exit next (gloo's destroy can block once a peer rank has exited). Not for
    after an error: a rank still in a collective would block the barrier (training/failure.py ends those)."""
    dist.barrier()
    if not _exits_without_teardown:
        dist.destroy_process_group()


def run_launched_cli(main: Callable[[], object]) -> None:
    """Run a CLI's `main()`; under torchrun (WORLD_SIZE > 1) end the process with its exit code at once, skipping
    the interpreter's teardown.

    Why: after a run that succeeded (every file written and closed, the process group destroyed), gloo's worker
    threads and the async work objects of FSDP's collectives can still be torn down with the interpreter, and now
    and then that aborts the process ("terminate called without an active exception", exit -6: CI saw it about once
    in 15 two-rank runs, with or without destroy_process_group). Nothing is left to do at that point, so the
    launched process leaves with os._exit. A single process exits as usual."""
    global _exits_without_teardown
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        main()
        return
    code: object = 0
    _exits_without_teardown = True
    try:
        main()
    except SystemExit as e:
        code = e.code
    if isinstance(code, str):  # SystemExit("message"): what Python would print before exiting with 1
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if code is None else int(code))
