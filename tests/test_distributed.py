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


@pytest.mark.parametrize("gather_with_grad", [False, True], ids=["lavis_detached", "full_grad"])
def test_two_processes_equal_one(tmp_path, gather_with_grad):
    out_path = str(tmp_path / "rank0.pt")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.dist_worker", out_path, "1" if gather_with_grad else "0"]
    # own process group, so a timeout kills torchrun *and* its workers (none is left spinning on the machine)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail("2-process run timed out after 240 s:\n" + output[-3000:])
    assert proc.returncode == 0, output[-6000:]
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
