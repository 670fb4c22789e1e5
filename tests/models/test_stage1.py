"""Stage-1 behaviour on a random tiny model: masks, sampling edge cases, dropout reproducibility, frozen tower."""
from __future__ import annotations

import warnings

import pytest
import torch

from blip2fast import Blip2
from blip2fast.config import blip2_tiny
from blip2fast.models.qformer import DropoutContext


def make_model(seed: int = 0, **changes) -> Blip2:
    torch.manual_seed(seed)
    return Blip2(blip2_tiny().replace(**changes))


def make_batch(B: int, T: int = 16, seed: int = 1, lengths=None):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, 32, 32, generator=g)
    lengths = lengths if lengths is not None else torch.randint(2, T + 1, (B,), generator=g).tolist()
    ids = torch.randint(1000, 2000, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        ids[b, 0] = 101
        if n >= 2:
            ids[b, n - 1] = 102
    ids = ids.masked_fill(mask == 0, 0)
    return images, ids, mask


@pytest.mark.parametrize("B", [2, 3, 7])
def test_losses_finite_and_negatives_valid(B):
    m = make_model().eval()
    m.set_seed_step(5, 11)
    out = m.stage1_loss(*make_batch(B))
    for name in ("loss", "loss_itc", "loss_itm", "loss_itg"):
        assert torch.isfinite(getattr(out, name)), name
    ar = torch.arange(B)
    for neg in (out.neg_image_for_text, out.neg_text_for_image):
        assert neg.shape == (B,) and neg.dtype == torch.int64
        assert ((neg >= 0) & (neg < B)).all() and (neg != ar).all(), "a positive was drawn as its own negative"
    assert out.itm_fallback_rows.item() == 0


def test_sampling_is_a_function_of_seed_and_step():
    m = make_model().eval()
    batch = make_batch(9)
    draws = {}
    for seed, step in [(1, 0), (1, 0), (1, 1), (2, 0)]:
        m.set_seed_step(seed, step)
        with torch.no_grad():
            out = m.stage1_loss(*batch)
        draws.setdefault((seed, step), []).append(torch.cat([out.neg_image_for_text, out.neg_text_for_image]))
    assert torch.equal(draws[(1, 0)][0], draws[(1, 0)][1])
    assert not torch.equal(draws[(1, 0)][0], draws[(1, 1)][0]) or not torch.equal(draws[(1, 0)][0], draws[(2, 0)][0])


def test_batch_of_one_skips_itm_with_a_warning():
    m = make_model().eval()
    with pytest.warns(UserWarning, match="global batch of at least 2"):
        out = m.stage1_loss(*make_batch(1))
    assert out.loss_itm.item() == 0.0 and out.neg_image_for_text is None
    assert torch.isfinite(out.loss) and torch.isfinite(out.loss_itg)
    out.loss.backward()
    assert m.query_tokens.grad is not None and torch.isfinite(m.query_tokens.grad).all()


def test_single_candidate_rows_take_the_only_other_sample():
    m = make_model().eval()
    out = m.stage1_loss(*make_batch(2))
    assert out.neg_image_for_text.tolist() == [1, 0] and out.neg_text_for_image.tolist() == [1, 0]


def test_nan_image_rows_fall_back_to_uniform_draws_and_are_counted():
    m = make_model().eval()
    images, ids, mask = make_batch(5)
    images[2] = float("nan")  # image 2's features, and so its similarities, are NaN
    with torch.no_grad():
        out = m.stage1_loss(images, ids, mask)
    assert out.itm_fallback_rows.item() == 1  # image row 2 has no finite candidate text
    neg_text = out.neg_text_for_image
    assert neg_text[2] != 2 and 0 <= neg_text[2] < 5
    # text rows still have finite candidates (every image but 2): they never pick the NaN image
    assert (out.neg_image_for_text[torch.arange(5) != 2] != 2).all()


def test_all_padding_text_gives_a_defined_result():
    m = make_model().eval()
    images, ids, mask = make_batch(3)
    ids[1], mask[1] = 0, 0  # a caption with no tokens at all (a broken sample)
    out = m.stage1_loss(images, ids, mask)
    assert torch.isfinite(out.loss), "all-padding text must not produce NaN (LAVIS attends uniformly)"
    ids[:], mask[:] = 0, 0  # every caption empty: no ITG tokens anywhere -> ITG is 0, not 0/0
    out = m.stage1_loss(images, ids, mask)
    assert out.loss_itg.item() == 0.0 and torch.isfinite(out.loss)


@pytest.mark.parametrize("shape", [(2, 3, 31, 32), (2, 1, 32, 32), (3, 32, 32)])
def test_wrong_image_shape_is_a_clear_error(shape):
    m = make_model().eval()
    _, ids, mask = make_batch(2)
    with pytest.raises(ValueError, match=r"pixel_values has shape .* expected \(batch, 3, 32, 32\)"):
        m.stage1_loss(torch.randn(shape), ids, mask)


def test_mismatched_text_batch_is_a_clear_error():
    m = make_model().eval()
    images, ids, mask = make_batch(3)
    with pytest.raises(ValueError, match="2 texts for 3 images"):
        m.stage1_loss(images, ids[:2], mask[:2])
    with pytest.raises(ValueError, match="negatives must be a pair"):
        m.stage1_loss(images, ids, mask, negatives=torch.zeros(3, dtype=torch.long))


def test_itg_is_causal_and_ignores_padding():
    """Changing text token t changes ITG logits only at positions >= t; padding tokens change nothing."""
    m = make_model().eval()
    images, ids, mask = make_batch(2, lengths=[12, 5])
    with torch.no_grad():
        base = m.stage1_loss(images, ids, mask, negatives=(torch.tensor([1, 0]),) * 2, return_details=True)
        ids2 = ids.clone()
        ids2[0, 6] = 1500 if ids[0, 6] != 1500 else 1501
        ids2[1, 8] = 1234  # padding position of sample 1 (mask 0): invisible to every real row
        alt = m.stage1_loss(images, ids2, mask, negatives=(torch.tensor([1, 0]),) * 2, return_details=True)
    d = (base.itg_logits - alt.itg_logits).abs().amax(dim=-1)  # (B, T)
    assert d[0, :6].max() == 0 and d[0, 6:12].min() > 0
    assert d[1, :5].max() == 0
    # the query pass never sees text: image features identical
    assert torch.equal(base.image_feats, alt.image_feats)


def test_itc_text_pass_is_bidirectional_and_query_free():
    m = make_model().eval()
    images, ids, mask = make_batch(2, lengths=[10, 10])
    with torch.no_grad():
        f1 = m.text_features(ids, mask)
        ids2 = ids.clone()
        ids2[:, 8] = 1777
        f2 = m.text_features(ids2, mask)
        f3 = m.text_features(ids, mask)
    assert (f1 - f2).abs().max() > 0  # [CLS] sees later tokens
    assert torch.equal(f1, f3)


def test_image_kv_is_projected_once_per_step(monkeypatch):
    m = make_model().eval()
    calls = []
    orig = m.qformer.image_kv
    monkeypatch.setattr(m.qformer, "image_kv", lambda x, w=None: calls.append(x.shape[0]) or orig(x, w))
    B = 4
    m.stage1_loss(*make_batch(B))
    assert calls == [B], calls  # the ITM rows pick their image's K/V by index


def test_image_kv_of_all_layers_in_one_gemm_equals_each_layers_projection():
    """image_kv stacks every cross-attention layer's [key | value] into one GEMM: the same K/V as each layer's own
    projection, and the same gradients for the image and for each layer's weights."""
    m = make_model().double()
    cross = [l.cross_attn for l in m.qformer.layers if l.cross_attn is not None]
    assert len(cross) >= 2
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, cross[0].key.in_features, generator=g, dtype=torch.float64, requires_grad=True)
    stacked = [kv for kv in m.qformer.image_kv(x) if kv is not None]
    separate = [a.project(x) for a in cross]
    assert len(stacked) == len(separate)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64) for kv in separate for t in kv]
    params = [x] + [p for a in cross for p in (a.key.weight, a.value.bias)]
    grads = []
    for kvs in (stacked, separate):
        loss = sum((t * w).sum() for t, w in zip([t for kv in kvs for t in kv], weights))
        grads.append(torch.autograd.grad(loss, params))
    for (k1, v1), (k2, v2) in zip(stacked, separate):
        assert k1.shape == k2.shape == (3, cross[0].heads, 5, cross[0].head_dim)
        torch.testing.assert_close(k1, k2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v1, v2, rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_frozen_tower_stays_frozen_and_in_eval_mode():
    m = make_model(**{})
    m.train()
    assert not m.visual_encoder.training and m.qformer.training
    assert all(not p.requires_grad for p in m.visual_encoder.parameters())
    out = m.stage1_loss(*make_batch(3))
    out.loss.backward()
    assert all(p.grad is None for p in m.visual_encoder.parameters())
    assert m.ln_vision.weight.grad is not None and m.temp.grad is not None


def test_default_vision_dtype_is_half():
    cfg = blip2_tiny().replace(vision=blip2_tiny().vision.__class__(**{**blip2_tiny().vision.__dict__,
                                                                        "dtype": "bfloat16"}))
    m = Blip2(cfg)
    assert all(p.dtype == torch.bfloat16 for p in m.visual_encoder.parameters())
    assert m.image_embeds(torch.randn(2, 3, 32, 32)).dtype == torch.float32  # ln_vision is trainable, fp32


def test_hashed_attention_dropout_is_reproducible_and_seeded():
    m = make_model(qformer=blip2_tiny().qformer.__class__(
        **{**blip2_tiny().qformer.__dict__, "hidden_dropout": 0.0, "attention_dropout": 0.3})).train()
    batch = make_batch(3)
    neg = (torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1]))
    losses = []
    for seed, step in [(3, 4), (3, 4), (3, 5)]:
        m.set_seed_step(seed, step)
        with torch.no_grad():
            losses.append(m.stage1_loss(*batch, negatives=neg).loss)
    assert losses[0] == losses[1], "same seed and step must give the same dropout masks"
    assert losses[0] != losses[2], "a new step must draw new dropout masks"
    m.eval()
    with torch.no_grad():
        e1, e2 = m.stage1_loss(*batch, negatives=neg).loss, m.stage1_loss(*batch, negatives=neg).loss
    assert e1 == e2 and e1 != losses[0]


def test_dropout_context_sites_differ_per_pass_layer_and_kind():
    ctx = DropoutContext(seed_step=torch.tensor([0, 0]), row_ids=torch.arange(2), pass_id=2)
    sites = {ctx.at(0.1, layer, cross).site for layer in range(12) for cross in (False, True)}
    other = DropoutContext(seed_step=torch.tensor([0, 0]), row_ids=torch.arange(2), pass_id=3)
    assert len(sites) == 24 and not sites & {other.at(0.1, l, c).site for l in range(12) for c in (False, True)}


def test_no_warning_for_normal_batches():
    m = make_model().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = m.stage1_loss(*make_batch(4))
    assert not [str(w.message) for w in caught]
    assert out.neg_image_for_text is not None and out.loss_itm.item() > 0


def _stage1_smoke(cfg, image_size: int):
    torch.manual_seed(0)
    m = Blip2(cfg)
    images = torch.randn(3, 3, image_size, image_size)
    _, ids, mask = make_batch(3)
    out = m.stage1_loss(images, ids, mask)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is None for p in m.visual_encoder.parameters())
    assert m.query_tokens.grad is not None and m.ln_vision.weight.grad is not None
    return m


def test_stage1_with_the_clip_layout_tower():
    from blip2fast.config import VisionConfig
    cfg = blip2_tiny().replace(vision=VisionConfig(kind="clip", image_size=32, patch_size=8, width=48, depth=2,
                                                   heads=4, mlp_hidden=192, layer_norm_eps=1e-5, dtype="float32"))
    m = _stage1_smoke(cfg, 32)
    assert m.image_embeds(torch.randn(2, 3, 32, 32)).shape == (2, 17, 48)


def test_stage1_with_a_transformers_vision_tower(tmp_path):
    transformers = pytest.importorskip("transformers")
    from blip2fast.config import VisionConfig
    hf_cfg = transformers.CLIPVisionConfig(hidden_size=40, intermediate_size=80, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=24, patch_size=6)
    torch.manual_seed(0)
    transformers.CLIPVisionModel(hf_cfg).save_pretrained(tmp_path)
    cfg = blip2_tiny().replace(vision=VisionConfig(kind="hf", hf_path=str(tmp_path), hf_feature_layer=-2,
                                                   image_size=24, dtype="float32"))
    m = _stage1_smoke(cfg, 24)
    assert m.image_embeds(torch.randn(2, 3, 24, 24)).shape == (2, 17, 40)


def test_packed_query_itg_pass_equals_the_two_passes():
    """Training's one pass over [queries | [DEC] text] (QFormer.query_itg_pass) computes what the query pass and
    the ITG pass on its K/V cache compute (float64, dropout off; padded rows of odd lengths)."""
    m = make_model().double().eval()
    images, ids, mask = make_batch(3, T=11, lengths=[11, 4, 7])
    dec = ids.clone()
    dec[:, 0] = m.config.qformer.dec_token_id
    with torch.no_grad():
        embeds = m.image_embeds(images.double())
        kv = m.qformer.image_kv(embeds)
        queries = m._queries(3)
        q_sep, cache = m.qformer.query_pass(queries, kv)
        t_sep = m.qformer.itg_pass(dec, mask, cache)
        q_packed, t_packed = m.qformer.query_itg_pass(queries, dec, mask, kv)
    assert q_packed.shape == q_sep.shape and t_packed.shape == t_sep.shape
    torch.testing.assert_close(q_packed, q_sep, rtol=1e-12, atol=1e-12)
    real = mask.bool()  # padded text rows are never read (labels -100); compare the real ones
    torch.testing.assert_close(t_packed[real], t_sep[real], rtol=1e-12, atol=1e-12)
    assert (q_sep - t_sep[:, :1]).abs().max() > 1e-3  # the two outputs differ: the comparison can fail

