"""Stage 2 both ways with transformers' Blip2ForConditionalGeneration (tiny random configs, fp32):
a transformers folder loaded by us gives the same loss and greedy tokens; our save loads in transformers with no
missing or unexpected keys and gives the same loss and greedy tokens."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from blip2fast import Blip2
from tests.helpers import rel_err
from tests.models.test_stage2 import images, llm_configs, make_model, text_batch
from blip2fast._hf import load_pretrained

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("blip2fast.checkpoint.hf")


IMAGE_TOKEN = 3  # an existing, unused row of the tiny LLMs' vocabularies (text ids are drawn from 4..98), as real
# tokenizers leave spare embedding rows: saving then adds no row, so both softmaxes run over the same vocabulary


def with_image_token(m: Blip2) -> Blip2:
    m.config = m.config.replace(llm=dataclasses.replace(m.config.llm, image_token_index=IMAGE_TOKEN))
    return m


def hf_decoder_only_loss(theirs, px, h_ids, h_mask, labels):
    """transformers' own formulation (logits of the last T positions, shifted CE), computed from its logits:
    its fused loss path fails for fp32 decoder-only batches > 1 in 5.17 (a `view` on a non-contiguous slice)."""
    logits = theirs(pixel_values=px, input_ids=h_ids, attention_mask=h_mask).logits[:, -labels.shape[1]:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def hf_inputs(ids, mask, labels, Q: int, image_token: int):
    """transformers' layout: Q image placeholders before the text."""
    B = ids.shape[0]
    placeholders = torch.full((B, Q), image_token, dtype=ids.dtype)
    return (torch.cat([placeholders, ids], 1), torch.cat([torch.ones(B, Q, dtype=mask.dtype), mask], 1),
            labels)  # labels cover the text only: transformers scores logits[:, -labels.shape[1]:]


def compare(ours: Blip2, theirs, kind: str):
    Q = ours.config.qformer.num_query_tokens
    image_token = theirs.config.image_token_index
    B = 3
    px = images(B, seed=11)
    lm_cfg = ours.language_model.config
    if kind == "t5":
        ids, mask, _ = text_batch(B, 6, bos=5)
        _, _, labels = text_batch(B, 5, seed=7, bos=5)
        labels[:, 0] = 7
    else:
        ids, mask, labels = text_batch(B, 7, bos=lm_cfg.bos_token_id)
    h_ids, h_mask, h_labels = hf_inputs(ids, mask, labels, Q, image_token)
    with torch.no_grad():
        ours_loss = ours.stage2_loss(px, ids, mask, labels).loss
        if kind == "t5":
            theirs_loss = theirs(pixel_values=px, input_ids=h_ids, attention_mask=h_mask, labels=h_labels).loss
        else:
            theirs_loss = hf_decoder_only_loss(theirs, px, h_ids, h_mask, h_labels)
    assert rel_err(ours_loss, theirs_loss) < 1e-5, (ours_loss, theirs_loss)

    # transformers' Blip2 generate runs the LLM's own generation config, not the folder's suppress_tokens: pass it
    gen = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, num_beams=1)  # no early EOS: 5 to compare
    their_gen = dict(gen, suppress_tokens=[image_token])
    with torch.no_grad():
        if kind == "t5":
            ours_tokens = ours.generate(px, **gen)
            theirs_tokens = theirs.generate(pixel_values=px, input_ids=torch.full((B, Q), image_token),
                                            **their_gen)
        else:
            ours_tokens = ours.generate(px, **gen)
            start = torch.tensor([[image_token] * Q + [lm_cfg.bos_token_id]] * B)
            theirs_tokens = theirs.generate(pixel_values=px, input_ids=start, **their_gen)[:, Q + 1:]
    n = min(ours_tokens.shape[1], theirs_tokens.shape[1])
    assert n >= 2 and torch.equal(ours_tokens[:, :n], theirs_tokens[:, :n]), (ours_tokens, theirs_tokens)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_our_save_runs_in_transformers(tmp_path, kind):
    ours = with_image_token(make_model(kind, seed=21))
    with pytest.warns(UserWarning):  # ln_vision eps differs from the blocks' (LAVIS layout): said when saving
        ours.save_pretrained(str(tmp_path))
    theirs, info = load_pretrained(transformers.Blip2ForConditionalGeneration, str(tmp_path),
                                                                              output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    theirs.eval()
    # transformers' one vision eps stands for ln_vision's too: align ours to what was written, then compare
    ours.ln_vision.eps = theirs.config.vision_config.layer_norm_eps
    compare(ours, theirs, kind)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_transformers_folder_runs_in_blip2fast(tmp_path, kind):
    src = with_image_token(make_model(kind, seed=22))
    src.ln_vision.eps = src.config.vision.layer_norm_eps
    with pytest.warns(UserWarning):
        src.save_pretrained(str(tmp_path / "first"))
    theirs = load_pretrained(transformers.Blip2ForConditionalGeneration, str(tmp_path / "first")).eval()
    with torch.no_grad():  # make the transformers model differ from anything we wrote
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    theirs.save_pretrained(str(tmp_path / "hf"))
    # a generation folder has no stage-1 heads (ITC projections, ITM head, text FFNs, LM head): they are reported
    with pytest.warns(UserWarning, match=r"freshly initialised.*itm_head\.weight"):
        ours = Blip2.from_pretrained(str(tmp_path / "hf"), vision_dtype="float32", llm_dtype="float32").eval()
    assert ours.config.llm.image_token_index == IMAGE_TOKEN
    compare(ours, theirs, kind)
