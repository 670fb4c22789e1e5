"""The retrieval protocol on a tiny random model: k = N equals brute-force ITM + cosine over all pairs; k < N
rescales only the candidates and ranks the rest by ITC; the training-loop entry point."""
from __future__ import annotations

import pytest
import torch

from blip2fast.data.synthetic import Batch
from blip2fast.eval.retrieval import (RetrievalFeatures, encode_images, encode_pairs, encode_texts,
                                      evaluate_retrieval, i2t_ranks, itm_pair_logits, metrics_from_ranks,
                                      rank_of_first_correct, retrieval_from_features, t2i_ranks)
from tests.eval.helpers import images, texts, tiny_model

N_IMG, N_TXT = 6, 11  # several captions per image, one image with 3


@pytest.fixture(scope="module")
def setup():
    model = tiny_model(seed=3, dtype=torch.float64)
    pixels = images(N_IMG, seed=4, dtype=torch.float64)
    ids, mask = texts(N_TXT, seed=5)
    text_image = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 5])
    f, e = encode_images(model, pixels)
    feats = RetrievalFeatures(f, e, encode_texts(model, ids, mask), ids, mask, text_image)
    # brute force: every pair through the model's own public pair API, one pair per row
    ii = torch.arange(N_IMG).repeat_interleave(N_TXT)
    tt = torch.arange(N_TXT).repeat(N_IMG)
    with torch.no_grad():
        itm = model.itm_logits(pixels[ii], ids[tt], mask[tt]).view(N_IMG, N_TXT, 2)
        sim = model.itc_scores(pixels, ids, mask)
    return model, feats, itm, sim


def test_itc_matrix_and_itm_pairs_match_the_model_api(setup):
    model, feats, itm, sim = setup
    res = retrieval_from_features(model, feats, k=N_TXT, itm_batch=4)
    torch.testing.assert_close(res.sim, sim.float(), rtol=1e-6, atol=1e-6)
    img = torch.tensor([5, 0, 0, 3, 5, 2, 1])  # unsorted, repeated images across batches
    txt = torch.tensor([10, 0, 4, 3, 2, 9, 1])
    got = itm_pair_logits(model, feats, img, txt, itm_batch=3)
    torch.testing.assert_close(got, itm[img, txt].float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("itm_batch", [1, 7, 1000])
def test_rerank_with_k_equal_n_is_brute_force(setup, itm_batch):
    model, feats, itm, sim = setup
    res = retrieval_from_features(model, feats, k=max(N_IMG, N_TXT), itm_batch=itm_batch)
    brute = (itm[..., 1] + sim).float()  # (N_img, N_txt): ITM class-1 logit + cosine
    assert res.i2t_index.shape == (N_IMG, N_TXT) and res.t2i_index.shape == (N_TXT, N_IMG)
    torch.testing.assert_close(res.i2t_scores, brute.gather(1, res.i2t_index), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(res.t2i_scores, brute.t().gather(1, res.t2i_index), rtol=1e-6, atol=1e-6)
    text_image = feats.text_image
    want_i2t = i2t_ranks(text_image, N_IMG, brute)
    want_t2i = t2i_ranks(text_image, N_IMG, brute.t())
    assert torch.equal(res.i2t_ranks, want_i2t) and torch.equal(res.t2i_ranks, want_t2i)
    want = metrics_from_ranks(want_i2t, want_t2i)
    assert {k: res.metrics[k] for k in want} == want
    assert res.metrics["itm_pairs"] == N_IMG * N_TXT


def test_rerank_with_small_k(setup):
    model, feats, itm, sim = setup
    k = 3
    res = retrieval_from_features(model, feats, k=k, itm_batch=5)
    brute = (itm[..., 1] + sim).float()
    simf = sim.float()
    # candidates are each query's top k by ITC, rescored by ITM + ITC
    assert torch.equal(res.i2t_index, simf.sort(dim=1, descending=True, stable=True).indices[:, :k])
    assert torch.equal(res.t2i_index, simf.t().sort(dim=1, descending=True, stable=True).indices[:, :k])
    torch.testing.assert_close(res.i2t_scores, brute.gather(1, res.i2t_index), rtol=1e-6, atol=1e-6)
    # an independent two-tier order per query: candidates by rerank score, then the rest by ITC
    for i in range(N_IMG):
        cands = res.i2t_index[i].tolist()
        order = sorted(cands, key=lambda t: -brute[i, t].item()) + sorted(
            [t for t in range(N_TXT) if t not in cands], key=lambda t: -simf[i, t].item())
        first = next(p for p, t in enumerate(order) if feats.text_image[t] == i)
        assert res.i2t_ranks[i].item() == first
    for t in range(N_TXT):
        cands = res.t2i_index[t].tolist()
        order = sorted(cands, key=lambda i: -brute[i, t].item()) + sorted(
            [i for i in range(N_IMG) if i not in cands], key=lambda i: -simf[i, t].item())
        assert res.t2i_ranks[t].item() == order.index(int(feats.text_image[t]))
    # the ITC-only metrics are the plain ITC ranking
    r, _ = rank_of_first_correct(simf.t(), torch.arange(N_IMG)[None, :] == feats.text_image[:, None])
    assert res.metrics["itc_t2i_r1"] == pytest.approx((r < 1).float().mean().item())
    assert res.metrics["chance_t2i_r1"] == pytest.approx(1 / N_IMG)
    assert res.metrics["chance_i2t_r1"] == pytest.approx((N_TXT / N_IMG) / N_TXT)


def test_evaluate_retrieval_on_batches_restores_mode():
    model = tiny_model(seed=7).train()
    pixels = images(8, seed=8)
    ids, mask = texts(8, seed=9)
    batches = [{"pixel_values": pixels[:5], "input_ids": ids[:5], "attention_mask": mask[:5]},
               Batch(pixels[5:], ids[5:], mask[5:], [""] * 3, torch.zeros(3), torch.zeros(3, 2, 3))]
    m = evaluate_retrieval(model, batches, k=4)
    assert model.training  # put back as it was
    assert m["n_images"] == m["n_texts"] == 8 and m["k"] == 4
    # the same as the pieces on one batch of all pairs
    with torch.no_grad():
        model.eval()
        feats = encode_pairs(model, [{"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}])
        want = retrieval_from_features(model, feats, k=4).metrics
    assert m == want
    assert evaluate_retrieval(model, iter(batches * 5), k=4, max_batches=2) == want


def test_evaluate_retrieval_errors():
    model = tiny_model(seed=7)

    class Resampled(list):
        class cfg:
            resampled = True

    with pytest.raises(ValueError, match="max_batches"):
        evaluate_retrieval(model, Resampled())
    with pytest.raises(ValueError, match="no batches"):
        evaluate_retrieval(model, [])
    with pytest.raises(ValueError, match="missing"):
        evaluate_retrieval(model, [{"pixel_values": images(2)}])
    with pytest.raises(ValueError, match="k=0"):
        evaluate_retrieval(model, [{"pixel_values": images(2), "input_ids": texts(2)[0],
                                    "attention_mask": texts(2)[1]}], k=0)
