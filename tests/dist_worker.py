"""Run under `torchrun --nproc_per_node N`: stage 1 on this rank's shard of a fixed global batch, under DDP (gloo).

Writes, from rank 0, the rank-averaged losses, the DDP-averaged gradients and the gathered negatives to
argv[1]; tests/test_distributed.py compares them with one process on the whole batch.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from tests.dist_common import GLOBAL_BATCH, SEED_STEP, global_batch, make_model


def main(out_path: str, gather_with_grad: bool) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model(gather_with_grad)
    model.set_seed_step(*SEED_STEP)
    ddp = DDP(model)
    B = GLOBAL_BATCH // world
    images, ids, mask = (t[rank * B:(rank + 1) * B] for t in global_batch())
    out = ddp(images, ids, mask)
    out.loss.backward()  # DDP averages gradients over ranks
    losses = torch.stack([out.loss, out.loss_itc, out.loss_itm, out.loss_itg]).detach()
    dist.all_reduce(losses)
    negs = torch.cat([out.neg_image_for_text, out.neg_text_for_image])
    gathered = [torch.empty_like(negs) for _ in range(world)]
    dist.all_gather(gathered, negs)
    if rank == 0:
        torch.save({
            "losses": losses / world,
            "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            "neg_image_for_text": torch.cat([g[:B] for g in gathered]),
            "neg_text_for_image": torch.cat([g[B:] for g in gathered]),
        }, out_path)
    # no destroy_process_group(): the gloo teardown can block once the peer rank has gone (seen under load in CI);
    # the process exits below without finalisation, everything it owes already on disk


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "1")
    # Leave without interpreter finalisation: a gloo process group's teardown at exit can block forever once the
    # peer rank has gone (seen under load in CI), and everything this worker owes is already on disk.
    sys.stdout.flush()
    os._exit(0)
