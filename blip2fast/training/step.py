"""One optimiser step on device, run eagerly, compiled, or captured once and replayed as a CUDA graph.

The step (`TrainStep._body`), for `accum` micro-batches:

    for micro-batch i:
        model.seed_step <- [seed, step_t * accum + i]       on device: ITM draws and attention dropout follow it
        forward (bf16 autocast on CUDA)                      StepModule: stacked loss terms + drawn negatives
        gradients of loss / accum                            DDP: .backward() (all-reduce overlapped, eager only);
                                                             otherwise torch.autograd.grad, summed over micro-batches
    world > 1 without DDP: one all-reduce (mean) of the flattened gradients
    clip the global norm (foreach, no non-finite check: nothing reads the device)
    lr_t <- schedule(step_t); AdamW update (torch's functional AdamW, the optimiser's own state)
    step_t += 1
    -> [loss terms (mean over micro-batches)..., grad norm], a device tensor nobody reads here

`step_t` (int64), `lr_t` (float32) and `seed_step` are device tensors updated in place by the step itself, so the
same code is correct when traced or replayed: nothing in it reads the device or copies a host value. The host keeps
its own step count (`Trainer.step`) in lockstep; `set_step` re-aligns the device counter after a resume.

Modes:
    eager        the body as Python; DDP (when world > 1) wraps the step module and overlaps the gradient
                 all-reduce with the backward.
    compile      torch.compile of the whole body (forward, backward, clipping, update). With one process on
                 torch >= 2.13 (`trace_autograd_ops`) it is one graph (`fullgraph=True`); elsewhere Dynamo may
                 split it. No DDP: gradients are averaged by the one all-reduce above.
    cuda_graphs  the first `warmup` steps run eagerly on a side stream (real steps: they train), then the body is
                 captured into one CUDA graph with static input buffers; every later step copies its batch into
                 those buffers and replays. Fresh negatives and dropout masks each replay come from seed_step, which
                 the graph itself advances from step_t. No DDP (its reducer's bucket rebuilds and hooks are not made
                 for capture): the flat gradient all-reduce is captured with the forward's collectives (NCCL >= 2.9.6
                 captures collectives; TORCH_NCCL_ASYNC_ERROR_HANDLING=0 is set for the run, as torch's CUDA-graph
                 notes ask). Autocast runs with cache_enabled=False (required inside a capture).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..data.shards import to_device
from .optim import adamw_step_, clip_grads_, init_state_, install_lr_tensor, lr_at_tensor

MODES = ("eager", "compile", "cuda_graphs")
INPUTS = ("pixel_values", "input_ids", "attention_mask", "labels")


class StepModule(nn.Module):
    """One micro-batch -> (stacked loss terms, drawn ITM negatives [neg image per text | neg text per image] or
    None). What DDP wraps, so it sees one forward per micro-batch."""

    def __init__(self, model: nn.Module, stage: int):
        super().__init__()
        self.model, self.stage = model, stage

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor,
                labels: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        if self.stage == 1:
            out = self.model.stage1_loss(pixel_values, input_ids, attention_mask)
            negatives = None
            if out.neg_image_for_text is not None:
                negatives = torch.cat([out.neg_image_for_text, out.neg_text_for_image])
            return torch.stack([out.loss, out.loss_itc, out.loss_itm, out.loss_itg]).float(), negatives
        out = self.model.stage2_loss(pixel_values, input_ids, attention_mask, labels)
        return out.loss.float().reshape(1), None


def all_reduce_mean_(grads: list, world_size: int) -> list:
    """The rank-mean of each gradient (None stays None) through one all-reduce of a flat buffer (what DDP's
    averaging computes, as one collective)."""
    present = [g for g in grads if g is not None]
    if world_size == 1 or not present:
        return grads
    flat = torch.cat([g.reshape(-1) for g in present])
    dist.all_reduce(flat)
    flat.div_(world_size)
    pieces = iter(flat.split([g.numel() for g in present]))
    return [None if g is None else next(pieces).view_as(g) for g in grads]


def _graph_options() -> contextlib.AbstractContextManager:
    """Dynamo settings for tracing the whole step: torch.autograd.grad traced in-graph where torch has the switch
    (`trace_autograd_ops`, torch >= 2.13); older torch splits the graph there instead."""
    import torch._dynamo

    if hasattr(torch._dynamo.config, "trace_autograd_ops"):
        return torch._dynamo.config.patch(trace_autograd_ops=True)
    return contextlib.nullcontext()


class TrainStep:
    """forward + backward + clip + AdamW for one optimiser step; see the module docstring for the modes.

    model:      the Blip2 (its `seed_step` buffer is written in place)
    module:     what runs the forward: a StepModule, or DDP around one (eager mode only)
    optimizer:  AdamW from optim.build_optimizer (capturable=True for compile / cuda_graphs)
    schedule:   (peak lr, warmup steps, total steps, floor lr)
    """

    def __init__(self, model: nn.Module, module: nn.Module, optimizer: torch.optim.AdamW, *, seed: int, accum: int,
                 grad_clip: float, schedule: tuple, device: torch.device, world_size: int = 1, amp: bool = True,
                 mode: str = "eager", graph_warmup: int = 3, fullgraph: Optional[bool] = None,
                 backend: str = "inductor"):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: one of {MODES}")
        if mode == "cuda_graphs" and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.ddp = module if hasattr(module, "no_sync") else None
        if self.ddp is not None and mode != "eager":
            raise ValueError(f"mode={mode!r} averages gradients itself: pass the plain step module, not DDP")
        self.model, self.module, self.optimizer = model, module, optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.accum, self.grad_clip, self.schedule = accum, grad_clip, tuple(schedule)
        self.device, self.world_size, self.mode = device, world_size, mode
        self.amp = amp and device.type == "cuda"
        self.graph_warmup = max(1, graph_warmup)
        # the device-side counters the body advances itself (created here, outside any capture)
        self.step_t = torch.zeros((), dtype=torch.int64, device=device)
        self.seed_t = torch.full((), seed, dtype=torch.int64, device=device)
        self.lr_t = torch.zeros((), dtype=torch.float32, device=device)
        install_lr_tensor(optimizer, self.lr_t)
        init_state_(optimizer)
        self.negatives: Optional[Tensor] = None  # the last step's draws (last micro-batch), for tests
        self.calls = 0
        self._graph = None
        self._static_in: Optional[list] = None
        self._static_out = None
        self._compiled: Optional[Callable] = None
        self.fullgraph = False
        if mode == "compile":
            import importlib

            importlib.import_module("torch._dynamo")  # for its config below (a local `import torch._dynamo` would
            # make `torch` a local name of this function)

            if fullgraph is None:
                fullgraph = world_size == 1 and hasattr(torch._dynamo.config, "trace_autograd_ops")
            self.fullgraph = fullgraph
            self._compiled = torch.compile(self._body, fullgraph=fullgraph, backend=backend)

    # ------------------------------------------------------------------ host-side control (outside the step)
    def set_step(self, step: int) -> None:
        """Align the device step counter with the host's (after a resume; build the TrainStep after
        `optimizer.load_state_dict`, which replaces the groups' lr with copies)."""
        self.step_t.fill_(step)

    # ------------------------------------------------------------------ the step
    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        # a capture may not use autocast's weight-cast cache (torch's CUDA-graph notes)
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=self.mode != "cuda_graphs")

    def _body(self, batches: list) -> tuple[Tensor, Optional[Tensor]]:
        accum = len(batches)
        terms, grads, negatives = None, None, None
        for i, batch in enumerate(batches):
            with torch.no_grad():
                self.model.seed_step.copy_(torch.stack([self.seed_t, self.step_t * accum + i]))
            last = i == accum - 1
            sync = self.ddp.no_sync() if (self.ddp is not None and not last) else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    out, negatives = self.module(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                                 batch.get("labels"))
                loss = out[0] / accum
                if self.ddp is not None:
                    loss.backward()
                else:
                    g = torch.autograd.grad(loss, self.params, allow_unused=True)
                    grads = list(g) if grads is None else [a if b is None else b if a is None else a + b
                                                           for a, b in zip(grads, g)]
            out = out.detach()
            terms = out if terms is None else terms + out
        if self.ddp is not None:
            grads = [p.grad for p in self.params]
        else:
            grads = all_reduce_mean_(grads, self.world_size)
        norm = clip_grads_(self.device, [g for g in grads if g is not None], self.grad_clip)
        with torch.no_grad():
            self.lr_t.copy_(lr_at_tensor(self.step_t, *self.schedule))
        adamw_step_(self.optimizer, self.params, grads)
        if self.ddp is not None:
            for p in self.params:
                p.grad = None
        with torch.no_grad():
            self.step_t.add_(1)
        return torch.cat([terms / accum, norm.detach().float().reshape(1)]), negatives

    def __call__(self, micro_batches: list) -> Tensor:
        """One optimiser step; returns [loss terms..., grad norm] (a device tensor the caller may keep)."""
        if len(micro_batches) != self.accum:
            raise ValueError(f"{len(micro_batches)} micro-batches for accum_steps={self.accum}")
        self.calls += 1
        if self.mode == "cuda_graphs":
            return self._graph_step(micro_batches)
        batches = [_inputs(to_device(b, self.device)) for b in micro_batches]
        if self._compiled is not None:
            with _graph_options():
                metrics, self.negatives = self._compiled(batches)
        else:
            metrics, self.negatives = self._body(batches)
        return metrics

    # ------------------------------------------------------------------ CUDA graphs
    def _graph_step(self, micro_batches: list) -> Tensor:
        if self._graph is not None:  # the usual case: straight into the static buffers (pinned host: async)
            self._fill_static([_inputs(b) for b in micro_batches])
            return self._replay()
        batches = [_inputs(to_device(b, self.device)) for b in micro_batches]
        if self.calls <= self.graph_warmup:
            # warm-up: real steps, on a side stream (allocator and cuBLAS/NCCL setup happen here, not in the capture)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                metrics, negatives = self._body(batches)
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(side)
            for t in (metrics, negatives):  # made on the side stream, used on the main one
                if t is not None:
                    t.record_stream(main)
            self.negatives = negatives
            return metrics
        # capture this step's body (recorded, not run), then replay it to run this step
        self._static_in = [{k: v.clone() for k, v in b.items()} for b in batches]
        graph = torch.cuda.CUDAGraph()
        # thread_local: the data loader's pin-memory thread and NCCL's watchdog may call CUDA meanwhile
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._static_out = self._body(self._static_in)
        self._graph = graph
        return self._replay()

    def _fill_static(self, batches: list) -> None:
        for static, b in zip(self._static_in, batches):
            for k, v in static.items():
                if k not in b or b[k].shape != v.shape or b[k].dtype != v.dtype:
                    raise ValueError(
                        f"CUDA graphs replay fixed shapes: batch {k} is "
                        f"{tuple(b[k].shape) if k in b else 'missing'} but the captured step took "
                        f"{tuple(v.shape)} {v.dtype}; keep every batch the same size (resampled data, or "
                        "drop_last in epoch mode) or run without --cuda_graphs")
                v.copy_(b[k], non_blocking=True)

    def _replay(self) -> Tensor:
        self._graph.replay()
        metrics, negatives = self._static_out
        self.negatives = None if negatives is None else negatives.clone()
        return metrics.clone()  # the next replay overwrites the static output


def _inputs(batch: dict) -> dict:
    """The tensors the step reads (captions and keys stay behind)."""
    return {k: batch[k] for k in INPUTS if k in batch and torch.is_tensor(batch[k])}


__all__ = ["MODES", "StepModule", "TrainStep", "all_reduce_mean_"]
