"""Run under `torchrun --nproc_per_node 2` (gloo): argv[1] = task, argv[2] = output file (written by rank 0).

task "gather_rows": distributed.gather_rows_with_grad / gather_rows on per-rank inputs (tests/dist_common.py);
    saves the picked rows and each rank's gradient of its own shard.
task "fsdp_stage2": stage 2 with the LLM (OPT, T5) and the vision tower FSDP2-sharded vs the same model whole,
    on the same batch on every rank (eval mode): the loss and the trainable gradients (which flow *through* the
    sharded frozen LLM) must agree.
task "train": TRAIN_STEPS optimiser steps of the trainer's TrainStep on this rank's half of each global batch, for
    each way of averaging the gradients (DDP; the one all-reduce of --compile / --cuda_graphs; DDP with the vision
    tower FSDP2-sharded); saves per-step losses, negatives and the final trainable weights.
"""
from __future__ import annotations

import sys
import os

import torch
import torch.distributed as dist

from tests.dist_common import TRAIN_STEPS, gather_rows_case, make_model, make_stepper, shard, step_batches


def gather_all(t: torch.Tensor) -> torch.Tensor:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.stack(out)


def task_gather_rows(rank: int) -> dict:
    from blip2fast.distributed import gather_rows, gather_rows_with_grad

    x_all, index, weight, ids = gather_rows_case()
    x = x_all[rank].clone().requires_grad_(True)
    rows = gather_rows_with_grad(x, index[rank])
    (rows * weight[rank]).sum().backward()
    picked_ids = gather_rows(ids[rank], index[rank])
    return {"rows": gather_all(rows.detach()), "grads": gather_all(x.grad), "ids": gather_all(picked_ids)}


def task_train(rank: int, world: int) -> dict:
    from blip2fast.training.parallel import shard_frozen_towers_, wrap_ddp
    from blip2fast.training.step import StepModule

    results = {}
    for variant in ("ddp", "allreduce", "fsdp_ddp"):
        model = make_model(gather_with_grad=False)
        if variant == "fsdp_ddp":
            shard_frozen_towers_(model, torch.device("cpu"), world)
        module = StepModule(model, 1)
        if variant != "allreduce":
            module = wrap_ddp(module, torch.device("cpu"))
        stepper = make_stepper(model, module, world)
        losses, negatives = [], []
        for batch in step_batches():
            terms = stepper([shard(batch, rank, world)])
            losses.append(gather_all(terms).mean(0))  # every loss term is a rank mean; grad norm is global
            negatives.append(gather_all(stepper.negatives))
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        same = all(torch.equal(gather_all(w)[0], gather_all(w)[1]) for w in weights.values())
        results[variant] = {"losses": torch.stack(losses), "negatives": torch.stack(negatives), "weights": weights,
                            "ranks_agree": torch.tensor(same)}
    return results


def task_fsdp_stage2(world: int) -> dict:
    import copy

    from blip2fast.training.parallel import is_sharded, shard_frozen_towers_
    from tests.models.test_stage2 import images, make_model, text_batch

    out = {}
    for kind in ("opt", "t5"):
        whole = make_model(kind)
        sharded = copy.deepcopy(whole)
        notes = shard_frozen_towers_(sharded, torch.device("cpu"), world)
        assert is_sharded(sharded.language_model) and is_sharded(sharded.visual_encoder), notes
        px = images(3)
        ids, mask, labels = text_batch(3, 7)
        if kind == "t5":  # encoder prefix + decoder labels
            labels = torch.where(labels < 0, labels, (labels + 3) % 99)
        res = {}
        for name, m in (("whole", whole), ("sharded", sharded)):
            loss = m.stage2_loss(px, ids, mask, labels).loss
            loss.backward()
            res[name] = {"loss": loss.detach(),
                         "grads": {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}}
        out[kind] = res
    return out


def main(task: str, out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if task == "gather_rows":
        result = task_gather_rows(rank)
    elif task == "fsdp_stage2":
        result = task_fsdp_stage2(world)
    else:
        result = task_train(rank, world)
    if rank == 0:
        torch.save(result, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # no interpreter finalisation: a gloo group's teardown can block once the peer has gone (see dist_worker.py)
    sys.stdout.flush()
    os._exit(0)
