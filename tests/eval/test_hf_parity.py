"""The retrieval numbers of a model loaded from a transformers folder equal transformers'
`Blip2ForImageTextRetrieval` on the same inputs: the ITC matrix, the ITM logits of every pair, and the reranked
scores (ITM class-1 logit + cosine) with k = N."""
from __future__ import annotations

import warnings

import pytest
import torch

from blip2fast import Blip2
from blip2fast.eval.retrieval import (RetrievalFeatures, encode_images, encode_texts, itm_pair_logits,
                                      retrieval_from_features)
from tests.eval.helpers import perturb_

transformers = pytest.importorskip("transformers")

N_IMG, N_TXT, IMG = 3, 5, 16


def hf_config():
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMG,
                  patch_size=4)
    qformer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   cross_attention_frequency=2, max_position_embeddings=32, use_qformer_text_input=True,
                   vocab_size=30523)
    return transformers.Blip2Config(vision_config=vision, qformer_config=qformer, num_query_tokens=4,
                                    image_text_hidden_size=16)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    hf = perturb_(transformers.Blip2ForImageTextRetrieval(hf_config()), seed=1).eval()
    path = str(tmp_path_factory.mktemp("hf_retrieval"))
    hf.save_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # temp and the Q-Former LM head are not in the folder (named in a warning)
        ours = Blip2.from_pretrained(path, vision_dtype="float32").eval()
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(N_IMG, 3, IMG, IMG, generator=g)
    ids = torch.randint(1000, 30000, (N_TXT, 7), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    return hf, ours, pixels, ids * mask, mask


@torch.no_grad()
def test_itc_and_itm_equal_transformers(pair):
    hf, ours, pixels, ids, mask = pair
    f, e = encode_images(ours, pixels)
    feats = RetrievalFeatures(f, e, encode_texts(ours, ids, mask), ids, mask, torch.tensor([0, 1, 2, 0, 1]))
    # ITC: transformers' image-text cosine (max over queries) for all pairs at once
    hf_itc = hf(pixels, ids, mask, use_image_text_matching_head=False).logits_per_image  # (N_img, N_txt)
    res = retrieval_from_features(ours, feats, k=N_TXT, itm_batch=4)
    torch.testing.assert_close(res.sim, hf_itc, rtol=1e-5, atol=1e-5)
    # ITM: transformers scores pairs (image b, text b); give it every pair
    ii = torch.arange(N_IMG).repeat_interleave(N_TXT)
    tt = torch.arange(N_TXT).repeat(N_IMG)
    hf_itm = hf(pixels[ii], ids[tt], mask[tt], use_image_text_matching_head=True).logits_per_image  # (P, 2)
    torch.testing.assert_close(itm_pair_logits(ours, feats, ii, tt, itm_batch=6), hf_itm, rtol=1e-5, atol=1e-5)
    # the reranked scores are transformers' ITM class-1 logit + its cosine
    brute = hf_itm[:, 1].view(N_IMG, N_TXT) + hf_itc
    torch.testing.assert_close(res.i2t_scores, brute.gather(1, res.i2t_index), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.t2i_scores, brute.t().gather(1, res.t2i_index), rtol=1e-5, atol=1e-5)
