"""Two gloo processes under torchrun give the same losses, gradients and negatives as one process on the whole
batch: ITC gathers, the counter-based ITM draw, the global ITG token count and the hashed attention dropout all
make the split invisible."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.dist_common import GLOBAL_BATCH, SEED_STEP, global_batch, make_model
from tests.helpers import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def single_process(gather_with_grad: bool):
    model = make_model(gather_with_grad)
    model.set_seed_step(*SEED_STEP)
    out = model(*global_batch())
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def torchrun(module: str, *args: str, timeout: int = 240) -> str:
    """Run `python -m module args` under torchrun with 2 gloo processes; returns the output (fails on error)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", module,
           *args]
    # own process group, so a timeout kills torchrun *and* its workers (none is left spinning on the machine)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"2-process run timed out after {timeout} s:\n" + output[-3000:])
    assert proc.returncode == 0, output[-6000:]
    return output


@pytest.mark.parametrize("gather_with_grad", [False, True], ids=["lavis_detached", "full_grad"])
def test_two_processes_equal_one(tmp_path, gather_with_grad):
    out_path = str(tmp_path / "rank0.pt")
    torchrun("tests.dist_worker", out_path, "1" if gather_with_grad else "0")
    dist = torch.load(out_path, weights_only=True)

    out, grads = single_process(gather_with_grad)
    assert torch.equal(dist["neg_image_for_text"], out.neg_image_for_text)
    assert torch.equal(dist["neg_text_for_image"], out.neg_text_for_image)
    expected = torch.stack([out.loss, out.loss_itc, out.loss_itm, out.loss_itg]).detach()
    assert rel_err(dist["losses"], expected) < 1e-12, (dist["losses"], expected)
    assert set(dist["grads"]) == set(grads)
    # per parameter, relative to its own norm, with a floor for gradients that are zero in exact arithmetic
    # (the key biases: softmax is invariant to them, so both sides hold only rounding noise)
    scale = max(g.norm().item() for g in grads.values())
    for name, g in grads.items():
        err = (dist["grads"][name] - g).norm().item()
        assert err <= 1e-10 * g.norm().item() + 1e-13 * scale, (name, err, g.norm().item())
    # the batch really is split and sampled: negatives come from both halves
    negs = torch.cat([out.neg_image_for_text, out.neg_text_for_image])
    assert GLOBAL_BATCH == 6 and (negs < 3).any() and (negs >= 3).any()


def test_gather_rows_equals_all_gather_and_index_select(tmp_path):
    """distributed.gather_rows_with_grad on 2 ranks: the picked rows, and each rank's gradient of its own shard,
    equal a plain all-gather + index_select (float64, exact up to summation order)."""
    from tests.dist_common import gather_rows_case

    out_path = str(tmp_path / "rows.pt")
    torchrun("tests.dist_train_worker", "gather_rows", out_path)
    got = torch.load(out_path, weights_only=True)
    x_all, index, weight, ids = gather_rows_case()
    X = x_all.reshape(6, 4, 5).clone().requires_grad_(True)  # the concatenation of both ranks' shards
    loss = sum((X.index_select(0, index[r]) * weight[r]).sum() for r in range(2))
    loss.backward()
    for r in range(2):
        assert torch.equal(got["rows"][r], X.detach().index_select(0, index[r]))
        assert torch.equal(got["ids"][r], ids.reshape(6, 7).index_select(0, index[r]))
    # rank r's gradient is rows 3r..3r+2 of the all-gather's; rows picked twice (global 4 by rank 0, 1 by rank 1)
    # and rows picked by both ranks (every one here) sum their contributions
    assert rel_err(got["grads"].reshape(6, 4, 5), X.grad) < 1e-15
    assert (X.grad.reshape(6, -1).abs().sum(1) > 0).all()  # every row was picked by someone: a real check


def test_two_processes_train_like_one(tmp_path):
    """TRAIN_STEPS optimiser steps of the trainer's step (AdamW with the device lr schedule, clipping, ITM
    sampling and hashed attention dropout on) on 2 gloo ranks, each holding half of every global batch, equal one
    process on the whole batches: per-step losses, negatives and the trained weights, for DDP, for the single
    all-reduce used with --compile / --cuda_graphs, and for DDP with the vision tower FSDP2-sharded.
    The model runs in float64 and the step reports its loss terms in float32, so losses agree to float32 rounding
    (< 3e-7 relative); the float64 weights agree to 1e-10 of each parameter's norm (AdamW divides by
    sqrt(v) + eps, which can amplify rounding noise in near-zero gradients)."""
    from blip2fast.training.step import StepModule
    from tests.dist_common import TRAIN_STEPS, make_stepper, step_batches

    out_path = str(tmp_path / "train.pt")
    torchrun("tests.dist_train_worker", "train", out_path, timeout=400)
    got = torch.load(out_path, weights_only=True)

    model = make_model(gather_with_grad=False)
    stepper = make_stepper(model, StepModule(model, 1), 1)
    losses, negatives = [], []
    for batch in step_batches():
        losses.append(stepper([batch]))
        negatives.append(stepper.negatives)
    losses, negatives = torch.stack(losses), torch.stack(negatives)
    weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert TRAIN_STEPS >= 3 and len(set(losses[:, 0].tolist())) == TRAIN_STEPS  # the weights really moved
    B = GLOBAL_BATCH // 2
    for variant in ("ddp", "allreduce", "fsdp_ddp"):
        d = got[variant]
        assert bool(d["ranks_agree"]), variant
        # [neg image per text | neg text per image] per rank -> the global order of one process
        neg = d["negatives"]  # (steps, ranks, 2B)
        glob = torch.cat([neg[:, :, :B].reshape(TRAIN_STEPS, -1), neg[:, :, B:].reshape(TRAIN_STEPS, -1)], 1)
        assert torch.equal(glob, negatives), variant
        # the step reports its terms in float32 (StepModule): equal to float32 rounding (2^-23 = 1.2e-7)
        assert rel_err(d["losses"][:, :4], losses[:, :4]) < 3e-7, (variant, d["losses"], losses)
        assert rel_err(d["losses"][:, 4], losses[:, 4]) < 3e-7, variant  # the global grad norm
        assert set(d["weights"]) == set(weights)
        for name, w in weights.items():
            err = (d["weights"][name] - w).norm().item()
            assert err <= 1e-10 * w.norm().item() + 1e-14, (variant, name, err)
    assert not torch.equal(negatives[0], negatives[1])  # fresh draws every step


def test_fsdp_sharded_llm_passes_the_same_gradients(tmp_path):
    """--dist.frozen=fsdp in stage 2: the frozen LLM (OPT decoder-only, T5 encoder-decoder) and the vision tower
    sharded with FSDP2 over 2 ranks (embeddings and head whole: the model calls them directly) compute the same loss
    and the same trainable gradients as the whole model; those gradients flow through the sharded LLM."""
    pytest.importorskip("transformers")
    out_path = str(tmp_path / "fsdp.pt")
    torchrun("tests.dist_train_worker", "fsdp_stage2", out_path)
    got = torch.load(out_path, weights_only=True)
    for kind in ("opt", "t5"):
        whole, sharded = got[kind]["whole"], got[kind]["sharded"]
        assert rel_err(sharded["loss"], whole["loss"]) < 1e-6, kind
        assert set(sharded["grads"]) == set(whole["grads"]) and "language_projection.weight" in whole["grads"]
        assert not any(n.startswith(("language_model.", "visual_encoder.")) for n in whole["grads"])
        for name, g in whole["grads"].items():
            assert (sharded["grads"][name] - g).norm() <= 1e-5 * g.norm() + 1e-8, (kind, name)
