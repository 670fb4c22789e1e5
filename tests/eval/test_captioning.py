"""Captioning: the stage-1 Q-Former decoder against straightforward decoding loops, the LLM path's prompt layout
and stop tokens, and a COCO caption metric on a known pair."""
from __future__ import annotations

import pytest
import torch

from blip2fast.eval import captioning
from blip2fast.eval.captioning import (CaptionConfig, caption_metrics, caption_metrics_available, llm_captions,
                                       llm_prompt_inputs, llm_stop_ids, qformer_generate)
from blip2fast.eval.vqa import PROMPTS, VQAConfig, prompt_for, vqa_answers
from tests.eval.helpers import SMALL_VOCAB, images, tiny_model, tiny_stage2_model, word_tokenizer

EOS, DEC = 102, SMALL_VOCAB - 1


@pytest.fixture(scope="module")
def model():
    m = tiny_model(seed=11, vocab=SMALL_VOCAB, dtype=torch.float64)
    with torch.no_grad():  # sharper next-token distributions, so greedy / beam choices are far from ties
        m.qformer.lm_head.bias.mul_(20)
        m.qformer.embeddings.word_embeddings.weight.mul_(5)
    return m


def next_log_probs(model, pixels: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
    """log p(next | image, [DEC] + seq) from scratch: ViT, query pass, ITG pass over the whole text, LM head."""
    embeds = model.image_embeds(pixels)
    _, cache = model.qformer.query_pass(model.query_tokens.expand(embeds.shape[0], -1, -1),
                                        model.qformer.image_kv(embeds))
    ids = torch.cat([torch.full((seqs.shape[0], 1), DEC), seqs], dim=1)
    states = model.qformer.itg_pass(ids, torch.ones_like(ids), cache)
    return torch.log_softmax(model.qformer.lm_head(states[:, -1]).double(), dim=-1)


@torch.no_grad()
def test_greedy_equals_a_straightforward_loop(model):
    pixels = images(3, seed=12, dtype=torch.float64)
    got = qformer_generate(model, pixels, num_beams=1, max_new_tokens=12, min_new_tokens=2)
    for b in range(3):
        seq = []
        for t in range(12):
            logp = next_log_probs(model, pixels[b:b + 1], torch.tensor([seq], dtype=torch.long).view(1, -1))
            if t < 2:
                logp[0, EOS] = float("-inf")
            seq.append(int(logp.argmax()))
            if seq[-1] == EOS:
                break
        row = got[b].tolist()
        assert row[: len(seq)] == seq and all(x == 0 for x in row[len(seq):]), (b, row, seq)
    assert len({tuple(r) for r in got.tolist()}) > 1  # the images matter


@torch.no_grad()
def test_one_beam_is_greedy(model):
    pixels = images(2, seed=13, dtype=torch.float64)
    greedy = qformer_generate(model, pixels, num_beams=1, max_new_tokens=10)
    start = torch.tensor([DEC])
    memory = captioning._query_memory(model, pixels, 1)
    beam = captioning._beam(model, memory, start, 2, 1, 10, 0, 1.0, EOS, 0)
    assert torch.equal(beam, greedy[:, : beam.shape[1]]) and (greedy[:, beam.shape[1]:] == 0).all()


@torch.no_grad()
def test_beam_search_with_every_token_kept_is_exhaustive(model):
    """With num_beams = vocabulary size and two new tokens at most, beam search sees every sequence: its answer is
    the best of [EOS] and all (t1, t2), t1 != EOS, by summed log-probability (length_penalty 0)."""
    pixels = images(2, seed=14, dtype=torch.float64)
    got = qformer_generate(model, pixels, num_beams=SMALL_VOCAB, max_new_tokens=2, length_penalty=0.0)
    V = SMALL_VOCAB
    for b in range(2):
        first = next_log_probs(model, pixels[b:b + 1], torch.empty(1, 0, dtype=torch.long))[0]  # (V,)
        second = next_log_probs(model, pixels[b:b + 1].expand(V, -1, -1, -1), torch.arange(V)[:, None])  # (V, V)
        total = first[:, None] + second
        total[EOS] = float("-inf")
        t1, t2 = divmod(int(total.argmax()), V)
        best = [EOS] if first[EOS] > total.max() else [t1, t2]
        assert got[b].tolist()[: len(best)] == best


def test_generation_argument_checks(model):
    with pytest.raises(ValueError, match="min_new_tokens"):
        qformer_generate(model, images(1, dtype=torch.float64), max_new_tokens=3, min_new_tokens=4)
    with pytest.raises(ValueError, match="num_beams"):
        CaptionConfig(num_beams=0)


# ------------------------------------------------------------------------------------------------ LLM
def test_prompt_layout_decoder_only_and_encoder_decoder():
    opt = word_tokenizer("opt")
    ids, mask = llm_prompt_inputs(opt, ["a photo of", "Question: what colour is it? Answer:"], False)
    words = lambda s: opt(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    long = [2] + words("Question: what colour is it? Answer:")
    assert ids[1].tolist() == long and mask[1].all()
    short = [2] + words("a photo of")  # BOS first, left-padded with <pad>
    assert ids[0].tolist() == [1] * (len(long) - len(short)) + short
    assert mask[0].tolist() == [0] * (len(long) - len(short)) + [1] * len(short)
    t5 = word_tokenizer("t5")
    ids, mask = llm_prompt_inputs(t5, ["a photo", "Question: how many Short answer:"], True)
    assert ids[0].tolist()[:3] == t5("a photo", add_special_tokens=False)["input_ids"] + [1]  # prompt + EOS,
    assert mask[0].tolist() == [1, 1, 1] + [0] * (ids.shape[1] - 3)  # right-padded
    assert llm_stop_ids(t5, True) == [1] and llm_stop_ids(opt, False) == [2]  # no "\n" token in these vocabularies


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_llm_captions_and_vqa_prompts(family):
    model = tiny_stage2_model(family, seed=21)
    tok = word_tokenizer(family)
    pixels = images(2, seed=22)
    caps = llm_captions(model, pixels, tok, CaptionConfig(num_beams=3, max_new_tokens=5, min_new_tokens=2))
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    # the same generation through transformers directly, with our documented inputs
    ids, mask = llm_prompt_inputs(tok, ["a photo of"] * 2, family == "t5")
    with torch.no_grad():
        out = model.generate(pixels, input_ids=ids, attention_mask=mask, num_beams=3, max_new_tokens=5,
                             min_new_tokens=2, length_penalty=1.0, do_sample=False,
                             eos_token_id=llm_stop_ids(tok, family == "t5"), pad_token_id=tok.pad_token_id)
    assert caps == [c.strip() for c in tok.batch_decode(out, skip_special_tokens=True)]
    key = "encoder_decoder" if family == "t5" else "decoder_only"
    assert prompt_for(model) == PROMPTS[key]
    answers = vqa_answers(model, pixels, ["what colour is it?", "how many"], tok, VQAConfig(num_beams=2))
    assert len(answers) == 2
    with pytest.raises(ValueError, match="questions for"):
        vqa_answers(model, pixels, ["one question"], tok)


# ------------------------------------------------------------------------------------------------ metrics
@pytest.mark.skipif(caption_metrics_available() is not None, reason=str(caption_metrics_available()))
def test_caption_metrics_known_pair():
    """Hand-computed BLEU and ROUGE-L (PTB tokenisation lower-cases and drops the period). Image a: hypothesis
    "the cat sat on the mat" vs reference "the cat sat on a mat": clipped n-gram matches 5/6, 3/5, 2/4, 1/3; image
    b: identical 6-word captions (6/6, 5/5, 4/4, 3/3). Corpus BLEU-n = geometric mean of the summed precisions
    (equal lengths: no brevity penalty); ROUGE-L: LCS 5 of 6 words (F = 5/6) and 1."""
    refs = {"a": ["The cat sat on a mat."], "b": ["a dog runs in the park"]}
    preds = {"a": "the cat sat on the mat", "b": "a dog runs in the park"}
    m = caption_metrics(refs, preds, spice=False)
    p = [11 / 12, 8 / 10, 6 / 8, 4 / 6]
    for n in range(1, 5):
        want = 1.0
        for x in p[:n]:
            want *= x
        assert m[f"Bleu_{n}"] == pytest.approx(want ** (1 / n), abs=1e-6)
    assert m["ROUGE_L"] == pytest.approx((5 / 6 + 1) / 2, abs=1e-9)
    assert 0 < m["METEOR"] < 1 and m["CIDEr"] > 0
    assert m["skipped"] == {"SPICE": "SPICE not requested"}
    with pytest.raises(ValueError, match="different images"):
        caption_metrics(refs, {"a": "x"})
