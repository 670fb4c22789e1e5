"""How a run spreads over ranks: replicated or FSDP2-sharded frozen towers, and the DDP wrapper of the trainable
step.

dist.frozen="replicate" (default): every rank holds the whole frozen vision tower (and LLM); DDP averages the
trainable gradients. dist.frozen="fsdp": the frozen towers are sharded with FSDP2 (`fully_shard`) for runs whose
towers do not fit on one GPU next to the activations: each transformer block is its own FSDP unit (all-gathered
just before it runs, freed after), and the module that holds the blocks (the trunk) is the root unit. The parts
outside the trunk (patch / token embeddings, output heads) stay replicated: the model calls some of them directly
(the LLM's input embeddings for the soft prompt, its output head in the fused loss), where FSDP's forward hooks
would not gather them. The trainable Q-Former stays replicated under DDP, which is told to ignore the frozen
(sharded) parameters.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

FROZEN_LAYOUTS = ("replicate", "fsdp")


def block_lists(module: nn.Module) -> Iterator[tuple[nn.Module, nn.ModuleList]]:
    """(parent, list) for every outermost nn.ModuleList of >= 2 modules under `module` (the transformer block
    lists: EVA `blocks`, CLIP `transformer.resblocks`, HF `encoder.layer`, OPT `decoder.layers`, T5 `block`)."""
    for child in module.children():
        if isinstance(child, nn.ModuleList) and len(child) >= 2:
            yield module, child
        else:
            yield from block_lists(child)


def shard_frozen_(tower: nn.Module, mesh, keep_whole: tuple = ()) -> int:
    """FSDP2-shard `tower` in place: every block of each block list, then each list's parent (the trunk) with
    the parameters of `keep_whole` modules left out (replicated). Returns the number of blocks sharded."""
    from torch.distributed.fsdp import fully_shard

    whole = {p for m in keep_whole if m is not None for p in m.parameters()}
    blocks = 0
    for parent, blocks_list in list(block_lists(tower)):
        for block in blocks_list:
            fully_shard(block, mesh=mesh)
            blocks += 1
        ignored = {p for p in parent.parameters() if p in whole}
        fully_shard(parent, mesh=mesh, **({"ignored_params": ignored} if ignored else {}))
    return blocks


def shard_frozen_towers_(model: nn.Module, device: torch.device, world_size: int) -> list[str]:
    """Shard the Blip2's frozen towers over all ranks (see the module docstring); returns notes for the log."""
    from torch.distributed.device_mesh import init_device_mesh

    if not any(True for _ in block_lists(model.visual_encoder)):
        raise RuntimeError(f"dist.frozen=fsdp found no transformer block list (nn.ModuleList) in the vision tower "
                           f"{type(model.visual_encoder).__name__} to shard; use --dist.frozen=replicate")
    mesh = init_device_mesh(device.type, (world_size,))
    notes = []
    n = shard_frozen_(model.visual_encoder, mesh)
    notes.append(f"dist.frozen=fsdp: vision tower sharded over {world_size} ranks ({n} FSDP2 blocks)")
    llm = getattr(model, "language_model", None)
    if llm is not None:
        keep = (llm.get_input_embeddings(), llm.get_output_embeddings())
        n = shard_frozen_(llm, mesh, keep_whole=keep)
        notes.append(f"dist.frozen=fsdp: LLM sharded over {world_size} ranks ({n} FSDP2 blocks; embeddings and "
                     "output head replicated)")
    return notes


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of `module` is an FSDP2 / DTensor shard."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(p, DTensor) for p in module.parameters())


def wrap_ddp(step_module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel over the trainable parameters of `step_module` (frozen parameters and all buffers
    ignored: nothing to average, and sharded towers must not be touched by DDP)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    ignore = [n for n, p in step_module.named_parameters() if not p.requires_grad]
    ignore += [n for n, _ in step_module.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(step_module, ignore)
    ids = [device.index] if device.type == "cuda" else None
    # every rank builds the same model from the same seed and files: no start-up broadcast (init_sync);
    # seed_step is set identically on every rank: no buffer syncing either
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                      inspect.signature(DDP.__init__).parameters else {"broadcast_buffers": False})
    return DDP(step_module, device_ids=ids, init_sync=False, **no_buffer_sync)


__all__ = ["FROZEN_LAYOUTS", "block_lists", "is_sharded", "shard_frozen_", "shard_frozen_towers_", "wrap_ddp"]
