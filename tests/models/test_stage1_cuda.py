"""Stage 1 on a GPU: same draws and masks as the CPU, LAVIS parity in fp32, bf16 within its tolerance.

Marked `cuda`: skipped (with the reason) where no GPU is present; run by benchmarks/gpu/run.sh on the GPU machine.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from blip2fast import Blip2
from blip2fast.config import blip2_tiny
from blip2fast.ops import hashing
from blip2fast.ops.attention import AttnDropout, dropout_keep_mask
from blip2fast.ops.itm_sampling import itm_sample_negatives_ref
from tests.helpers import LAVIS_TINY, assert_itg_logits_match, rel_err
from tests.models.test_stage1 import make_batch

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def exact_fp32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_hash_and_dropout_masks_equal_the_cpu():
    for dev in ("cpu", "cuda"):
        drop = AttnDropout(p=0.1, seed_step=torch.tensor([5, 9], device=dev), site=3,
                           row_ids=torch.arange(7, device=dev) + 2, q_offset=4)
        mask = dropout_keep_mask(drop, 4, 33, 257)
        if dev == "cpu":
            cpu = mask
    assert torch.equal(cpu, mask.cpu())


@pytest.mark.parametrize("cols", [2, 129, 1024])
def test_itm_draws_equal_the_cpu(cols):
    g = torch.Generator().manual_seed(cols)
    sim = torch.randn(17, cols, generator=g) * 5
    sim[3, :] = float("nan")
    rows = torch.arange(17) + 40
    pos = rows % cols
    ss = torch.tensor([123, 45])
    for stream in (hashing.STREAM_ITM_NEG_IMAGE_FOR_TEXT, hashing.STREAM_ITM_NEG_TEXT_FOR_IMAGE):
        a = itm_sample_negatives_ref(sim, pos, rows, ss, stream)
        b = itm_sample_negatives_ref(sim.cuda(), pos.cuda(), rows.cuda(), ss.cuda(), stream)
        assert torch.equal(a[0], b[0].cpu()) and a[1].item() == b[1].item()


def test_lavis_parity_on_the_gpu_fp32():
    ref = torch.load(os.path.join(LAVIS_TINY, "reference.pt"), weights_only=True)
    m = Blip2.from_pretrained(os.path.join(LAVIS_TINY, "lavis_tiny.pth"), config=blip2_tiny()).cuda().eval()
    i = ref["inputs"]
    negs = tuple(ref[k].cuda() for k in ("itm_neg_image_for_text", "itm_neg_text_for_image"))
    with torch.no_grad():
        out = m.stage1_loss(i["images"].cuda(), i["text_input_ids"].cuda(), i["text_attention_mask"].cuda(),
                            negatives=negs, return_details=True)
    assert rel_err(out.itm_logits.cpu(), ref["itm_logits"]) < 1e-4
    assert_itg_logits_match(out.itg_logits.cpu(), ref, 1e-4)
    for ours, theirs in [("loss_itc", "loss_itc"), ("loss_itm", "loss_itm"), ("loss_itg", "loss_lm")]:
        assert rel_err(getattr(out, ours).cpu(), ref["losses"][theirs]) < 1e-4, ours


def test_bf16_stage1_close_to_fp32():
    cfg = blip2_tiny()
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, dtype="bfloat16"))
    torch.manual_seed(0)
    m = Blip2(cfg).cuda().eval()
    images, ids, mask = (t.cuda() for t in make_batch(6))
    negs = (torch.tensor([1, 2, 3, 4, 5, 0], device="cuda"),) * 2
    with torch.no_grad():
        ref = m.float().stage1_loss(images, ids, mask, negatives=negs)
        m.visual_encoder.to(torch.bfloat16)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = m.stage1_loss(images, ids, mask, negatives=negs)
    for name in ("loss_itc", "loss_itm", "loss_itg"):
        assert rel_err(getattr(low, name).float(), getattr(ref, name)) < 3e-2, name


def test_sampling_on_device_makes_no_host_sync():
    torch.manual_seed(0)
    m = Blip2(blip2_tiny()).cuda().eval()
    images, ids, mask = (t.cuda() for t in make_batch(5))
    m.stage1_loss(images, ids, mask)  # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            out = m.stage1_loss(images, ids, mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.neg_image_for_text.is_cuda and torch.isfinite(out.loss).item()
