"""Stage 2 (soft prompt -> frozen LLM) against a straightforward formulation written here, for a decoder-only
(OPT, Llama-style) and an encoder-decoder (T5) LLM: loss, gradients, frozen parts, logits only where needed,
greedy generation token for token."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F

from blip2fast import Blip2
from blip2fast.config import LLMConfig, blip2_tiny
from blip2fast.data.prefix_lm import prefix_lm_split, prefix_lm_split_batch
from tests.helpers import rel_err
from blip2fast._hf import load_pretrained

transformers = pytest.importorskip("transformers")

V = 99


def llm_configs():
    return {
        "opt": transformers.OPTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                      num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                      dropout=0.1, attention_dropout=0.1).to_dict(),
        "llama": transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          bos_token_id=1, eos_token_id=2).to_dict(),
        "t5": transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                    feed_forward_proj="gated-gelu", decoder_start_token_id=0,
                                    dropout_rate=0.1).to_dict(),
    }


def make_model(kind: str, seed: int = 0) -> Blip2:
    cfg = blip2_tiny().replace(llm=LLMConfig(hf_config=llm_configs()[kind], dtype="float32"))
    torch.manual_seed(seed)
    m = Blip2(cfg)
    with torch.no_grad():  # random, non-degenerate LLM weights (LayerNorms and biases too)
        for p in m.language_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def text_batch(B: int, T: int, seed: int = 1, bos: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (B, T), generator=g)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    ids[:, 0] = bos
    ids = ids.masked_fill(mask == 0, 1)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100  # the BOS is never a target
    return ids, mask, labels


def images(B: int, seed: int = 2):
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def straightforward_decoder_only_loss(m: Blip2, px, ids, mask, labels):
    """Everything spelled out: full logits over [queries | text], shifted CE over the text positions."""
    prompt = m.language_projection(m.query_output(px))
    lm = m.language_model
    embeds = torch.cat([prompt, lm.get_input_embeddings()(ids)], 1)
    full_mask = torch.cat([torch.ones(ids.shape[0], prompt.shape[1], dtype=torch.long), mask], 1)
    logits = lm(inputs_embeds=embeds, attention_mask=full_mask).logits  # (B, Q+T, V)
    Q = prompt.shape[1]
    text_logits = logits[:, Q:]  # position Q+t predicts text token t+1
    return F.cross_entropy(text_logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("kind,B,T", [("opt", 3, 9), ("opt", 1, 5), ("llama", 2, 7)])
def test_decoder_only_loss_and_gradients_match_the_straightforward_formulation(kind, B, T):
    m = make_model(kind)
    px = images(B)
    ids, mask, labels = text_batch(B, T, bos=m.language_model.config.bos_token_id)
    out = m.stage2_loss(px, ids, mask, labels)
    assert out.logits is None, "the output layer is fused with the loss: no logits by default"
    with torch.no_grad():
        full = m.stage2_loss(px, ids, mask, labels, return_logits=True)
    assert full.logits.shape == (B, T - 1, V), "logits only for the positions that predict a label"
    assert rel_err(full.loss, out.loss) < 1e-6
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    ref = straightforward_decoder_only_loss(m, px, ids, mask, labels)
    ref.backward()
    assert rel_err(out.loss, ref) < 1e-6
    assert out.num_tokens.item() == int((labels[:, 1:] != -100).sum())
    scale = max(g.abs().max().item() for g in ours.values())
    for name, p in m.named_parameters():
        if p.grad is not None:  # the key biases' true gradient is 0 (softmax is shift-invariant): rounding noise
            assert rel_err(ours[name], p.grad) < 1e-5 or (ours[name] - p.grad).abs().max() < 1e-9 * scale, name
    assert {n.split(".")[0] for n in ours} <= {"qformer", "query_tokens", "language_projection", "ln_vision"}
    assert "language_projection.weight" in ours and "query_tokens" in ours


def test_frozen_llm_gets_no_weight_gradient_and_stays_in_eval_mode():
    m = make_model("opt").train()
    assert not m.language_model.training and not m.visual_encoder.training and m.qformer.training
    ids, mask, labels = text_batch(2, 6)
    m.stage2_loss(images(2), ids, mask, labels).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in m.language_model.parameters())
    assert all(p.grad is None for p in m.visual_encoder.parameters())
    assert m.language_projection.weight.grad is not None and m.query_tokens.grad.abs().sum() > 0


def test_lm_head_sees_only_label_predicting_positions():
    m = make_model("opt")
    B, T = 2, 8
    seen = []
    head = m.language_model.get_output_embeddings()
    handle = head.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    try:
        ids, mask, labels = text_batch(B, T)
        m.stage2_loss(images(B), ids, mask, labels)
        assert seen == [], "the fused path never runs the output layer"
        m.stage2_loss(images(B), ids, mask, labels, return_logits=True)
    finally:
        handle.remove()
    assert seen == [torch.Size([B, T - 1, 32])], seen  # not Q + T rows


def test_encoder_decoder_loss_matches_t5_own_loss_and_uses_exact_gelu():
    m = make_model("t5")
    lm = m.language_model
    assert lm.config.dense_act_fn == "gelu"
    x = torch.randn(64)
    ff = lm.encoder.block[0].layer[-1].DenseReluDense
    torch.testing.assert_close(ff.act(x), F.gelu(x), rtol=0, atol=0)
    B = 3
    px = images(B)
    ids, mask, _ = text_batch(B, 6, bos=5)  # encoder prefix after the queries
    _, _, labels = text_batch(B, 5, seed=7, bos=5)  # decoder targets
    labels[:, 0] = 7  # T5 targets start with a real token
    out = m.stage2_loss(px, ids, mask, labels)
    assert out.logits is None
    with torch.no_grad():
        assert m.stage2_loss(px, ids, mask, labels, return_logits=True).logits.shape == (B, 5, V)
    prompt = m.language_projection(m.query_output(px))
    embeds = torch.cat([prompt, lm.get_input_embeddings()(ids)], 1)
    full_mask = torch.cat([torch.ones(B, prompt.shape[1], dtype=torch.long), mask], 1)
    ref = lm(inputs_embeds=embeds, attention_mask=full_mask, labels=labels).loss
    assert rel_err(out.loss, ref) < 1e-6
    out.loss.backward()
    assert all(p.grad is None for p in lm.parameters()) and m.query_tokens.grad is not None


def greedy_reference(m: Blip2, px, ids, steps: int):
    """Greedy decoding written out: re-run the whole [queries | text] sequence each step, no cache."""
    prompt = m.language_projection(m.query_output(px))
    lm = m.language_model
    out = []
    for _ in range(steps):
        embeds = torch.cat([prompt, lm.get_input_embeddings()(ids)], 1)
        nxt = lm(inputs_embeds=embeds).logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        ids = torch.cat([ids, nxt], 1)
    return torch.cat(out, 1)


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_decoder_only_greedy_generation_token_for_token(kind):
    m = make_model(kind, seed=3)
    px = images(2)
    bos = m.language_model.config.bos_token_id
    with torch.no_grad():
        ours = m.generate(px, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        ref = greedy_reference(m, px, torch.full((2, 1), bos), 6)
    assert torch.equal(ours, ref), (ours, ref)
    prompt = torch.tensor([[bos, 11, 12], [bos, 13, 14]])
    with torch.no_grad():
        ours = m.generate(px, input_ids=prompt, max_new_tokens=4, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
        ref = greedy_reference(m, px, prompt, 4)
    assert torch.equal(ours, ref)


def test_encoder_decoder_greedy_generation_token_for_token():
    m = make_model("t5", seed=4)
    px = images(2)
    lm = m.language_model
    with torch.no_grad():
        ours = m.generate(px, max_new_tokens=5, do_sample=False, eos_token_id=None)
        prompt = m.language_projection(m.query_output(px))
        dec = torch.zeros(2, 1, dtype=torch.long)
        for _ in range(5):
            nxt = lm(inputs_embeds=prompt, decoder_input_ids=dec).logits[:, -1].argmax(-1, keepdim=True)
            dec = torch.cat([dec, nxt], 1)
    assert torch.equal(ours, dec), (ours, dec)


def test_stage2_errors_name_the_problem():
    m = Blip2(blip2_tiny())
    with pytest.raises(RuntimeError, match="this model has no LLM"):
        m.stage2_loss(images(1), *text_batch(1, 4))
    m = make_model("opt")
    ids, mask, labels = text_batch(2, 5)
    with pytest.raises(ValueError, match="labels must align"):
        m.stage2_loss(images(2), ids, mask, labels[:, :4])
    with pytest.raises(ValueError, match="batch sizes differ"):
        m.stage2_loss(images(3), ids, mask, labels)


def test_config_needs_exactly_one_llm_source():
    with pytest.raises(ValueError, match="exactly one of llm.path"):
        blip2_tiny().replace(llm=LLMConfig())
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        Blip2(blip2_tiny().replace(llm=LLMConfig(path="/nonexistent/llm")))


def test_llm_loads_from_a_local_folder(tmp_path):
    cfg = transformers.OPTConfig(**{k: v for k, v in llm_configs()["opt"].items() if k != "model_type"})
    torch.manual_seed(5)
    transformers.OPTForCausalLM(cfg).save_pretrained(tmp_path)
    m = Blip2(blip2_tiny().replace(llm=LLMConfig(path=str(tmp_path), dtype="float32")))
    ref = load_pretrained(transformers.OPTForCausalLM, tmp_path)
    for (n, p), (_, q) in zip(m.language_model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n
    assert next(m.language_model.parameters()).dtype == torch.float32
    half = Blip2(blip2_tiny().replace(llm=LLMConfig(path=str(tmp_path))))
    assert next(half.language_model.parameters()).dtype == torch.float16  # frozen LLM in half by default


def test_prefix_lm_split():
    rng = random.Random(0)
    for caption in ["a dog runs on the beach", "two cats", "  spaced   words here "]:
        for _ in range(20):
            p, s = prefix_lm_split(caption, rng)
            assert p and s and f"{p} {s}" == " ".join(caption.split())
    assert prefix_lm_split("dog") == ("", "dog")
    assert prefix_lm_split("") == ("", "")
    a = prefix_lm_split_batch(["a b c d e f"] * 8, seed=1, step=2)
    assert a == prefix_lm_split_batch(["a b c d e f"] * 8, seed=1, step=2)
    assert len({p for p in a[0]}) > 1, "cuts must vary across the batch"
    with pytest.raises(TypeError, match="caption must be a str"):
        prefix_lm_split(None)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_half_precision_llm_on_the_gpu_close_to_fp32(kind):
    ref_model = make_model(kind).cuda()
    cfg = ref_model.config.replace(llm=dataclasses.replace(ref_model.config.llm, dtype="bfloat16"))
    low = Blip2(cfg).cuda().eval()
    low.load_state_dict(ref_model.state_dict())
    px = images(3).cuda()
    if kind == "t5":
        ids, mask, _ = text_batch(3, 6, bos=5)
        _, _, labels = text_batch(3, 5, seed=7, bos=5)
        labels[:, 0] = 7
    else:
        ids, mask, labels = text_batch(3, 7, bos=ref_model.language_model.config.bos_token_id)
    ids, mask, labels = ids.cuda(), mask.cuda(), labels.cuda()
    with torch.no_grad():
        a = ref_model.stage2_loss(px, ids, mask, labels).loss
        with torch.autocast("cuda", dtype=torch.bfloat16):
            b = low.stage2_loss(px, ids, mask, labels).loss
    assert rel_err(b.float(), a) < 3e-2
