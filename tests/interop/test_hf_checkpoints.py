"""transformers BLIP-2 folders <-> blip2fast (checkpoint/hf.py), both directions, tiny random models only.

Every parameter of each model is perturbed with seeded noise (LayerNorm scales, biases and the k third of the vision
qkv bias included), so a mis-mapped, skipped or zeroed tensor cannot hide. fp32 throughout; parity is relative error
< 1e-5, except the LAVIS checkpoint, whose ln_vision eps (1e-5) transformers cannot express (< 1e-4 there).
"""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from torch import nn

from blip2fast import Blip2
from blip2fast.config import CLIP_MEAN
from blip2fast.checkpoint.hf import (
    blip2_config_from_hf,
    is_hf_folder,
    load_hf,
    read_hf_state_dict,
    save_hf,
)
from blip2fast.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig, blip2_tiny
from tests.helpers import LAVIS_TINY, rel_err
from blip2fast._hf import load_pretrained

transformers = pytest.importorskip("transformers")

TOL = 1e-5
BATCH, IMG, PATCH, WIDTH, QUERIES, EMBED = 3, 16, 4, 32, 4, 16
QF_VOCAB = 30523  # BERT + [DEC]: stage1_loss's ITG needs the [DEC] id 30522
OPT = dict(model_type="opt", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, vocab_size=99,
           word_embed_proj_dim=32, max_position_embeddings=64)
IMAGE_TOKEN = 98
needs_stage2 = pytest.mark.skipif(not hasattr(Blip2, "stage2_loss"),
                                  reason="Blip2 stage 2 (config.llm, Blip2.stage2_loss) is not implemented yet")


# ---------------------------------------------------------------- helpers
def perturb_(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
    return model.eval()


def hf_config(kind: str, cross_freq: int):
    vision = dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMG, patch_size=PATCH)
    qformer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   cross_attention_frequency=cross_freq, max_position_embeddings=32)
    if kind == "retrieval":
        return transformers.Blip2Config(vision_config=vision, qformer_config=dict(qformer, use_qformer_text_input=True,
                                                                                  vocab_size=QF_VOCAB),
                                        num_query_tokens=QUERIES, image_text_hidden_size=EMBED)
    return transformers.Blip2Config(vision_config=vision, qformer_config=qformer, text_config=dict(OPT),
                                    num_query_tokens=QUERIES, image_token_index=IMAGE_TOKEN)


def our_config(llm=None) -> Blip2Config:
    """Sizes of the transformers tiny models above (ln_vision eps = the blocks' eps, as transformers has it)."""
    return Blip2Config(
        vision=VisionConfig(kind="eva", image_size=IMG, patch_size=PATCH, width=WIDTH, depth=2, heads=4,
                            mlp_hidden=64, layer_norm_eps=1e-6, dtype="float32"),
        qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, cross_attention_freq=2,
                              num_query_tokens=QUERIES, vocab_size=128, max_position_embeddings=32),
        embed_dim=EMBED, ln_vision_eps=1e-6, max_text_len=16, llm=llm,
    )


def inputs(seed: int = 0, vocab: int = QF_VOCAB, image_size: int = IMG):
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(BATCH, 3, image_size, image_size, generator=g)
    ids = torch.randint(1000 if vocab > 2000 else 5, vocab - 1, (BATCH, 7), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return pixel_values, ids * mask, mask


def hf_query_output(hf, pixel_values):
    embeds = hf.vision_model(pixel_values).last_hidden_state
    return hf.qformer(query_embeds=hf.query_tokens.expand(pixel_values.shape[0], -1, -1),
                      encoder_hidden_states=embeds,
                      encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).last_hidden_state


def hf_itc_itm(hf, pixel_values, ids, mask):
    itc = hf(pixel_values, ids, mask, use_image_text_matching_head=False).logits_per_image
    itm = hf(pixel_values, ids, mask, use_image_text_matching_head=True).logits_per_image
    return itc, itm


def load_recording(path, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_hf(Blip2, path, vision_dtype="float32", **kw)
    return model.eval(), " | ".join(str(w.message) for w in caught)


def from_pretrained_checked(cls, path):
    model, info = load_pretrained(cls, path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


# ---------------------------------------------------------------- transformers retrieval folder -> ours
@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    """(transformers Blip2ForImageTextRetrieval, its folder, our model loaded from it, the load warnings)."""
    torch.manual_seed(0)
    hf = perturb_(transformers.Blip2ForImageTextRetrieval(hf_config("retrieval", cross_freq=2)), seed=1)
    path = str(tmp_path_factory.mktemp("hf_retrieval"))
    hf.save_pretrained(path)
    model, warned = load_recording(path)
    return hf, path, model, warned


def test_folder_detection_and_config(retrieval):
    hf, path, model, _ = retrieval
    assert is_hf_folder(path) and not is_hf_folder(os.path.dirname(path))
    cfg = model.config
    assert cfg.llm is None and cfg.vision.kind == "eva" and cfg.vision.depth == 2 and cfg.vision.width == WIDTH
    assert cfg.qformer.cross_attention_freq == 2 and cfg.qformer.num_query_tokens == QUERIES
    assert cfg.embed_dim == EMBED and cfg.ln_vision_eps == cfg.vision.layer_norm_eps == 1e-6


def test_image_embeds_and_query_output(retrieval):
    hf, _, model, _ = retrieval
    pixel_values, _, _ = inputs()
    with torch.no_grad():
        assert rel_err(model.image_embeds(pixel_values), hf.vision_model(pixel_values).last_hidden_state) < TOL
        assert rel_err(model.query_output(pixel_values), hf_query_output(hf, pixel_values)) < TOL


def test_itc_scores_and_itm_logits(retrieval):
    hf, _, model, _ = retrieval
    assert hf.config.image_token_index is None  # then input_ids are plain Q-Former text ids
    pixel_values, ids, mask = inputs()
    with torch.no_grad():
        itc, itm = hf_itc_itm(hf, pixel_values, ids, mask)
        assert rel_err(model.itc_scores(pixel_values, ids, mask), itc) < TOL
        assert rel_err(model.itm_logits(pixel_values, ids, mask), itm) < TOL


def test_fresh_parameters_are_named_and_stage1_still_runs(retrieval):
    _, _, model, warned = retrieval
    for name in ("temp", "qformer.lm_head.dense.weight", "qformer.lm_head.bias", "qformer.lm_head.norm.weight"):
        assert name in warned
    assert "unused" not in warned and "visual_encoder" not in warned and "qformer.layers" not in warned
    pixel_values, ids, mask = inputs()
    with torch.no_grad():
        out = model.stage1_loss(pixel_values, ids, mask)
    assert torch.isfinite(out.loss) and out.loss_itg > 0


def test_sharded_safetensors_and_pytorch_bin_folders(retrieval, tmp_path):
    hf, path, model, _ = retrieval
    single = read_hf_state_dict(path)
    sharded = str(tmp_path / "sharded")
    hf.save_pretrained(sharded, max_shard_size="200KB")
    index = os.path.join(sharded, "model.safetensors.index.json")
    assert os.path.isfile(index) and len(set(json.load(open(index))["weight_map"].values())) >= 2
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    torch.save(hf.state_dict(), old / "pytorch_model.bin")
    pixel_values, ids, mask = inputs()
    with torch.no_grad():
        expected = model.itm_logits(pixel_values, ids, mask)
    for folder in (sharded, str(old)):
        sd = read_hf_state_dict(folder)
        assert set(sd) == set(single) and all(torch.equal(sd[k], single[k]) for k in single)
        other, _ = load_recording(folder)
        with torch.no_grad():
            assert torch.equal(other.itm_logits(pixel_values, ids, mask), expected)


def test_round_trip_transformers_ours_transformers(retrieval, tmp_path):
    hf, _, model, _ = retrieval
    with pytest.warns(UserWarning, match="not written.*temp"):
        save_hf(model, str(tmp_path), kind="retrieval")
    back = from_pretrained_checked(transformers.Blip2ForImageTextRetrieval, str(tmp_path))
    original, restored = hf.state_dict(), back.state_dict()
    assert set(original) == set(restored)
    for k, v in original.items():
        if k.endswith("self_attn.qkv.bias"):  # the k third is dropped (softmax cancels it): zero after the trip
            d = v.shape[0] // 3
            assert torch.equal(restored[k][:d], v[:d]) and torch.equal(restored[k][2 * d:], v[2 * d:])
            assert not restored[k][d:2 * d].any()
        else:
            assert torch.equal(restored[k], v), k
    pixel_values, ids, mask = inputs()
    with torch.no_grad():
        for a, b in zip(hf_itc_itm(back, pixel_values, ids, mask), hf_itc_itm(hf, pixel_values, ids, mask)):
            assert rel_err(a, b) < TOL


# ---------------------------------------------------------------- ours -> transformers retrieval folder
@pytest.mark.parametrize("shard", [False, True])
def test_our_model_saved_for_transformers_retrieval(tmp_path, shard):
    torch.manual_seed(2)
    model = perturb_(Blip2(our_config()), seed=3)
    with pytest.warns(UserWarning, match=r"not written.*temp.*qformer\.lm_head"):
        save_hf(model, str(tmp_path), kind="retrieval", **({"max_shard_size": "100KB"} if shard else {}))
    assert os.path.isfile(tmp_path / "model.safetensors.index.json") == shard
    config = json.load(open(tmp_path / "config.json"))
    assert config["architectures"] == ["Blip2ForImageTextRetrieval"]
    assert config["qformer_config"]["use_qformer_text_input"] is True and config["image_token_index"] is None
    hf = from_pretrained_checked(transformers.Blip2ForImageTextRetrieval, str(tmp_path))
    pixel_values, ids, mask = inputs(vocab=128)
    with torch.no_grad():
        itc, itm = hf_itc_itm(hf, pixel_values, ids, mask)
        assert rel_err(itc, model.itc_scores(pixel_values, ids, mask)) < TOL
        assert rel_err(itm, model.itm_logits(pixel_values, ids, mask)) < TOL
        assert rel_err(hf.vision_model(pixel_values).last_hidden_state, model.image_embeds(pixel_values)) < TOL


def test_lavis_checkpoint_saved_for_transformers(tmp_path):
    model = Blip2.from_pretrained(os.path.join(LAVIS_TINY, "lavis_tiny.pth"), config=blip2_tiny()).eval()
    ref = torch.load(os.path.join(LAVIS_TINY, "reference.pt"), weights_only=True)["inputs"]
    images, ids, mask = ref["images"], ref["text_input_ids"], ref["text_attention_mask"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_hf(model, str(tmp_path), kind="retrieval")
    warned = " | ".join(str(w.message) for w in caught)
    assert "ln_vision's LayerNorm eps changes from 1e-05 to 1e-06" in warned and "has no place for them): temp" in warned
    hf = from_pretrained_checked(transformers.Blip2ForImageTextRetrieval, str(tmp_path))
    with torch.no_grad():
        itc, itm = hf_itc_itm(hf, images, ids, mask)
        ours_itc, ours_itm = model.itc_scores(images, ids, mask), model.itm_logits(images, ids, mask)
        assert rel_err(itc, ours_itc) < 1e-4 and rel_err(itm, ours_itm) < 1e-4
        model.ln_vision.eps = 1e-6  # with transformers' eps the outputs agree to rounding: eps is the only change
        assert rel_err(itc, model.itc_scores(images, ids, mask)) < TOL
        assert rel_err(itm, model.itm_logits(images, ids, mask)) < TOL


# ---------------------------------------------------------------- configs (no transformers models)
def test_config_defaults_and_t5_gelu():
    cfg = blip2_config_from_hf({"model_type": "blip-2", "architectures": ["Blip2ForImageTextRetrieval"],
                                "qformer_config": {"use_qformer_text_input": True, "vocab_size": 30522}})
    assert cfg.vision.depth == 39 and cfg.vision.width == 1408 and cfg.vision.mlp_hidden == 6144
    assert cfg.qformer.vocab_size == 30523 and cfg.embed_dim == 256 and cfg.ln_vision_eps == 1e-6 and cfg.llm is None
    t5 = {"model_type": "t5", "feed_forward_proj": "gated-gelu", "d_model": 32}
    gen = blip2_config_from_hf({"architectures": ["Blip2ForConditionalGeneration"], "text_config": t5,
                                "image_token_index": 7}, llm_dtype="bfloat16")
    assert gen.llm.exact_gelu is False and gen.llm.dtype == "bfloat16" and gen.llm.hf_config["d_model"] == 32
    assert getattr(gen.llm, "image_token_index", 7) == 7
    exact = blip2_config_from_hf({"architectures": ["Blip2ForConditionalGeneration"],
                                  "text_config": dict(t5, feed_forward_proj="gated-gelu_python")})
    assert exact.llm.exact_gelu is True
    with pytest.raises(ValueError, match="vision_config.hidden_act"):
        blip2_config_from_hf({"vision_config": {"hidden_act": "quick_gelu"}})


# ---------------------------------------------------------------- generation folders
@pytest.fixture(scope="module")
def generation(tmp_path_factory):
    torch.manual_seed(4)
    hf = perturb_(transformers.Blip2ForConditionalGeneration(hf_config("generation", cross_freq=1)), seed=5)
    path = str(tmp_path_factory.mktemp("hf_generation"))
    hf.save_pretrained(path)
    return hf, path


@needs_stage2
def test_generation_folder_loads(generation):
    hf, path = generation
    model, warned = load_recording(path, llm_dtype="float32")
    cfg = model.config
    assert cfg.llm is not None and cfg.llm.hf_config["vocab_size"] == 99 and cfg.qformer.cross_attention_freq == 1
    assert getattr(cfg.llm, "image_token_index", IMAGE_TOKEN) == IMAGE_TOKEN
    for name in ("temp", "qformer.embeddings.word_embeddings.weight", "qformer.layers.0.ffn.up.weight",
                 "qformer.layers.1.ffn.norm.bias", "itm_head.weight", "vision_proj.weight", "text_proj.bias",
                 "qformer.lm_head.dense.weight"):
        assert name in warned
    assert "unused" not in warned and "language_" not in warned and "ffn_query" not in warned
    pixel_values, _, _ = inputs()
    with torch.no_grad():
        assert rel_err(model.image_embeds(pixel_values), hf.vision_model(pixel_values).last_hidden_state) < TOL
        assert rel_err(model.query_output(pixel_values), hf_query_output(hf, pixel_values)) < TOL
    theirs, ours = hf.state_dict(), model.state_dict()
    lm_keys = [k for k in theirs if k.startswith(("language_model.", "language_projection."))]
    assert "language_projection.weight" in lm_keys and "language_model.lm_head.weight" in lm_keys
    for k in lm_keys:
        assert torch.equal(ours[k], theirs[k]), k


@needs_stage2
def test_generation_round_trip(generation, tmp_path):
    hf, path = generation
    model, _ = load_recording(path, llm_dtype="float32")
    with pytest.warns(UserWarning, match="not written"):
        save_hf(model, str(tmp_path))  # generation: the default for a stage-2 model
    back = from_pretrained_checked(transformers.Blip2ForConditionalGeneration, str(tmp_path))
    assert back.config.image_token_index == IMAGE_TOKEN and back.config.text_config.vocab_size == 99
    assert back.generation_config.suppress_tokens == [IMAGE_TOKEN]
    pixel_values, _, _ = inputs()
    ids = torch.tensor([[IMAGE_TOKEN] * QUERIES + [2, 5, 17, 40]] * BATCH)
    with torch.no_grad():
        assert rel_err(back(pixel_values=pixel_values, input_ids=ids).logits,
                       hf(pixel_values=pixel_values, input_ids=ids).logits) < TOL


@needs_stage2
def test_stage2_model_saved_with_a_new_image_token(tmp_path):
    torch.manual_seed(6)
    model = perturb_(Blip2(our_config(LLMConfig(hf_config=dict(OPT), dtype="float32"))), seed=7)
    with pytest.warns(UserWarning, match="not written"):
        save_hf(model, str(tmp_path), max_shard_size="100KB")
    hf = from_pretrained_checked(transformers.Blip2ForConditionalGeneration, str(tmp_path))
    new = OPT["vocab_size"]  # no tokenizer: the image token is a new last row
    assert hf.config.image_token_index == new and hf.config.text_config.vocab_size == new + 1
    emb = hf.language_model.get_input_embeddings().weight
    ours = model.language_model.get_input_embeddings().weight
    assert torch.equal(emb[:new], ours) and torch.allclose(emb[new], ours.mean(0))
    # transformers' forward == our LLM on [soft prompt | text] (the new row is never an input)
    pixel_values, _, _ = inputs()
    text = torch.tensor([[2, 5, 17, 40]] * BATCH)
    with torch.no_grad():
        theirs = hf(pixel_values=pixel_values, input_ids=torch.cat([torch.full((BATCH, QUERIES), new), text], 1))
        prompt = model.language_projection(model.query_output(pixel_values))
        embeds = torch.cat([prompt, model.language_model.get_input_embeddings()(text)], 1)
        expected = model.language_model(inputs_embeds=embeds).logits
        assert rel_err(theirs.logits[..., :new], expected) < TOL
        # the image token is never generated: its mean row never wins a greedy step, and the folder's
        # generation config suppresses it even when its logit is made the largest
        greedy = dict(max_new_tokens=4, do_sample=False)
        assert not (hf.generate(pixel_values=pixel_values, **greedy)[:, QUERIES + 1:] == new).any()
        first = hf.generate(pixel_values=pixel_values, max_new_tokens=1, do_sample=False)[:, -1]
        emb[new] = 10 * emb[first[0]]
        assert (hf.generate(pixel_values=pixel_values, **greedy)[0, QUERIES + 1:] == new).any()  # precondition
        out = hf.generate(pixel_values=pixel_values, generation_config=hf.generation_config, **greedy)
        assert not (out[:, QUERIES + 1:] == new).any()


@needs_stage2
def test_tokenizer_and_processor_saved(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(97 + i) for i in range(26)] + ["the", "cat", "photo"]
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    llm_dir = str(tmp_path / "llm")
    tokenizer.save_pretrained(llm_dir)
    opt = {k: v for k, v in OPT.items() if k != "model_type"}
    transformers.OPTForCausalLM(transformers.OPTConfig(**dict(opt, vocab_size=50, pad_token_id=0, bos_token_id=2,
                                                              eos_token_id=3))).save_pretrained(llm_dir)
    model = Blip2(our_config(LLMConfig(path=llm_dir, dtype="float32"))).eval()
    out = str(tmp_path / "blip2")
    with pytest.warns(UserWarning, match="not written"):
        save_hf(model, out)
    image_token = len(words)  # "<image>" appended to the tokenizer; the LLM's 50 rows already include it
    hf = from_pretrained_checked(transformers.Blip2ForConditionalGeneration, out)
    assert hf.config.image_token_index == image_token and hf.config.text_config.vocab_size == 50
    processor = load_pretrained(transformers.AutoProcessor, out)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == image_token
    assert list(processor.image_processor.image_mean) == pytest.approx(list(CLIP_MEAN))
    from PIL import Image

    image = Image.new("RGB", (20, 24), (200, 30, 90))
    batch = processor(images=image, text="the cat", return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, IMG, IMG)
    assert batch["input_ids"][0, :QUERIES].tolist() == [image_token] * QUERIES
    with torch.no_grad():
        assert torch.isfinite(hf(**batch).logits).all()
