"""Q-Former initialisation from a local BERT folder (checkpoint/bert_init.py), against transformers' BERT in fp32.

Tiny random BERTs are built with transformers and saved to tmp folders; no hub access. HF BERT adds
token_type_embeddings[0] to every token while the Q-Former (like LAVIS's) has no token types, so the saved BERTs
have zero token-type embeddings and the two forward passes are directly comparable.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from blip2fast import Blip2
from blip2fast.checkpoint.bert_init import (
    BertInitReport,
    blip2_config_with_bert,
    init_qformer_from_bert,
    qformer_config_from_bert,
)
from blip2fast.config import blip2_tiny
from tests.helpers import rel_err

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


transformers = pytest.importorskip("transformers")

TOL = 1e-5
SIZES = {
    # the brief's tiny BERT
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=99),
    # narrower and shallower, odd sizes elsewhere too (MiniLM-like in spirit: smaller than base in every way)
    "narrow": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40, vocab_size=57,
                   max_position_embeddings=40, layer_norm_eps=1e-7, hidden_dropout_prob=0.05,
                   attention_probs_dropout_prob=0.02),
}


def _randomise_(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (HF inits biases to 0 and LayerNorms to 1, which would hide swaps), then zero
    token-type embeddings so HF's outputs carry no token-type term."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
        for m in model.modules():
            if hasattr(m, "token_type_embeddings"):
                m.token_type_embeddings.weight.zero_()


def make_bert(kind: str = "tiny", arch: str = "BertForMaskedLM", seed: int = 0):
    cfg = transformers.BertConfig(**SIZES[kind], attn_implementation="eager")
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg)
    _randomise_(model, seed)
    return model.eval()


@pytest.fixture(scope="module")
def berts(tmp_path_factory):
    """kind -> (folder, HF BertForMaskedLM)."""
    out = {}
    for kind in SIZES:
        hf = make_bert(kind)
        path = str(tmp_path_factory.mktemp(f"bert_{kind}"))
        save(hf, path)
        out[kind] = (path, hf)
    return out


def write_vocab(path, size: int) -> None:
    """A WordPiece vocab.txt: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4, then filler."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(size - 5)]
    with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(tokens) + "\n")


def save(hf, path: str, **kw) -> None:
    hf.save_pretrained(path, **kw)
    write_vocab(path, hf.config.vocab_size)


def build(path: str, **kw) -> Blip2:
    tiny = blip2_tiny()
    cfg = blip2_config_with_bert(path, vision=tiny.vision, num_query_tokens=8, embed_dim=32, max_text_len=16, **kw)
    torch.manual_seed(1)
    return Blip2(cfg)


def init(model: Blip2, path: str) -> BertInitReport:
    with pytest.warns(UserWarning, match="initialised the Q-Former from BERT") as rec:
        report = init_qformer_from_bert(model, path)
    assert sum("initialised the Q-Former" in str(w.message) for w in rec) == 1
    return report


def text_batch(vocab: int, B: int = 3, T: int = 11):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    lengths = torch.tensor([T, 7, 3])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def state(model: Blip2) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- config
def test_config_sized_from_bert(berts):
    path, _ = berts["narrow"]
    q = qformer_config_from_bert(path, num_query_tokens=4, cross_attention_freq=1, hidden_dropout=0.0)
    assert (q.hidden_size, q.num_layers, q.num_heads, q.intermediate_size) == (16, 1, 2, 40)
    assert (q.vocab_size, q.dec_token_id) == (58, 57)  # BERT's 57 + [DEC]
    assert q.max_position_embeddings == 40 and q.layer_norm_eps == 1e-7
    assert q.attention_dropout == 0.02 and q.hidden_dropout == 0.0  # override wins
    assert (q.num_query_tokens, q.cross_attention_freq) == (4, 1)
    assert (q.pad_token_id, q.cls_token_id, q.sep_token_id) == (0, 2, 3)  # from vocab.txt
    with pytest.raises(TypeError, match="no_such_field"):
        qformer_config_from_bert(path, no_such_field=1)


def test_config_minilm_sized_folder_with_tokenizer_files(tmp_path):
    """A MiniLM-sized config (384 wide, 6 layers) and special ids from the tokenizer files; no weights needed."""
    cfg = dict(model_type="bert", hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
               intermediate_size=1536, vocab_size=1000, max_position_embeddings=512, hidden_act="gelu",
               layer_norm_eps=1e-12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, pad_token_id=0)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    q = qformer_config_from_bert(str(tmp_path))  # no tokenizer files: config.json's pad id, default cls/sep
    assert (q.pad_token_id, q.cls_token_id, q.sep_token_id) == (0, 101, 102)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(995)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"cls_token": "[CLS]", "sep_token": "[SEP]"}))
    q = qformer_config_from_bert(str(tmp_path))
    assert (q.hidden_size, q.num_layers, q.num_heads, q.head_dim, q.intermediate_size) == (384, 6, 12, 32, 1536)
    assert (q.vocab_size, q.dec_token_id) == (1001, 1000)
    assert (q.pad_token_id, q.cls_token_id, q.sep_token_id) == (0, 2, 3)
    full = blip2_config_with_bert(str(tmp_path), embed_dim=128, num_query_tokens=16)
    assert full.embed_dim == 128 and full.qformer.num_query_tokens == 16 and full.qformer.hidden_size == 384


def test_non_gelu_activation_is_a_clear_error(tmp_path):
    hf = make_bert()
    hf.config.hidden_act = "gelu_new"
    save(hf, str(tmp_path))
    with pytest.raises(ValueError, match="hidden_act='gelu_new'"):
        qformer_config_from_bert(str(tmp_path))
    model = build_from_sizes("tiny")
    with pytest.raises(ValueError, match="exact GELU"):
        init_qformer_from_bert(model, str(tmp_path))


def build_from_sizes(kind: str) -> Blip2:
    from blip2fast.config import QFormerConfig

    s = SIZES[kind]
    q = QFormerConfig(hidden_size=s["hidden_size"], num_layers=s["num_hidden_layers"],
                      num_heads=s["num_attention_heads"], intermediate_size=s["intermediate_size"],
                      vocab_size=s["vocab_size"] + 1, dec_token_id=s["vocab_size"], num_query_tokens=8,
                      max_position_embeddings=s.get("max_position_embeddings", 512),
                      layer_norm_eps=s.get("layer_norm_eps", 1e-12))
    return Blip2(blip2_tiny().replace(qformer=q))


def test_missing_folder_and_missing_weights(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        qformer_config_from_bert(missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        init_qformer_from_bert(build_from_sizes("tiny"), missing)
    make_bert().config.save_pretrained(str(tmp_path))  # config.json only
    with pytest.raises(FileNotFoundError, match="no BERT weights"):
        init_qformer_from_bert(build_from_sizes("tiny"), str(tmp_path))


# ---------------------------------------------------------------- parity with transformers
@pytest.mark.parametrize("kind", list(SIZES))
def test_text_pass_and_lm_head_match_bert(berts, kind):
    path, hf = berts[kind]
    model = build(path).eval()
    report = init(model, path)
    V = SIZES[kind]["vocab_size"]
    ids, mask = text_batch(V)
    with torch.no_grad():
        ours = model.qformer.text_pass(ids, mask)
        ref = hf.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        assert rel_err(ours, ref) < TOL
        logits = model.qformer.lm_head(ours)
        assert logits.shape[-1] == V + 1
        assert rel_err(logits[..., :V], hf(input_ids=ids, attention_mask=mask).logits) < TOL
    assert report.unused == ["bert.embeddings.token_type_embeddings.weight"]
    assert report.files == ["model.safetensors"]


def test_query_ffn_is_a_copy_and_fresh_parts_are_untouched(berts):
    path, hf = berts["tiny"]
    model = build(path)
    before = state(model)
    report = init(model, path)
    after = model.state_dict()
    V = SIZES["tiny"]["vocab_size"]
    for layer in model.qformer.layers:
        for (n1, p1), (n2, p2) in zip(layer.ffn.named_parameters(), layer.ffn_query.named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2)
    i = 0
    hf_ffn = hf.bert.encoder.layer[i]
    assert torch.equal(model.qformer.layers[i].ffn_query.up.weight, hf_ffn.intermediate.dense.weight)
    assert torch.equal(model.qformer.layers[i].ffn.norm.bias, hf_ffn.output.LayerNorm.bias)

    word = after["qformer.embeddings.word_embeddings.weight"]
    assert torch.equal(word[:V], hf.bert.embeddings.word_embeddings.weight)
    assert torch.equal(word[V], before["qformer.embeddings.word_embeddings.weight"][V])  # [DEC] row: fresh
    bias = after["qformer.lm_head.bias"]
    assert torch.equal(bias[:V], hf.cls.predictions.bias) and bias[V].item() == 0.0

    cross = [k for k in after if ".cross_attn." in k]
    assert cross and report.fresh == cross  # exactly the cross-attention is left fresh
    for k in cross:
        assert torch.equal(after[k], before[k]), k
    # everything outside the Q-Former is untouched too
    for k in after:
        if not k.startswith("qformer."):
            assert torch.equal(after[k], before[k]), k
    assert set(report.partial) == {"qformer.embeddings.word_embeddings.weight", "qformer.lm_head.bias"}
    q_params = {"qformer." + n for n, _ in model.qformer.named_parameters()}
    assert set(report.loaded) | set(report.fresh) == q_params and not set(report.loaded) & set(report.fresh)


def _params(model: Blip2) -> dict:
    return {k: v for k, v in model.state_dict().items() if k.startswith("qformer.")}


def _assert_same_init(path_a: str, path_b: str) -> tuple[BertInitReport, BertInitReport]:
    a, b = build(path_a), build(path_a)
    ra, rb = init(a, path_a), init(b, path_b)
    pa, pb = _params(a), _params(b)
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    return ra, rb


def test_sharded_safetensors(berts, tmp_path):
    path, hf = berts["tiny"]
    save(hf, str(tmp_path), max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    _, report = _assert_same_init(path, str(tmp_path))
    assert len(report.files) > 1


def test_pytorch_model_bin_with_tied_decoder(berts, tmp_path):
    """A full BertForMaskedLM state dict (tied decoder weight and bias included), as older transformers saved."""
    path, hf = berts["tiny"]
    hf.config.save_pretrained(str(tmp_path))
    write_vocab(str(tmp_path), hf.config.vocab_size)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    _, report = _assert_same_init(path, str(tmp_path))
    assert report.files == ["pytorch_model.bin"]
    assert report.unused == ["bert.embeddings.token_type_embeddings.weight"]


def test_bert_for_pretraining_and_legacy_bert_model_bin(tmp_path):
    """BertForPreTraining (pooler, seq_relationship: unused) in safetensors, and a prefix-less BertModel .bin with
    the original release's LayerNorm gamma/beta names and a position_ids buffer (no LM head: it stays fresh)."""
    pre = make_bert(arch="BertForPreTraining", seed=3)
    pre_dir = str(tmp_path / "pre")
    pre.save_pretrained(pre_dir)  # no tokenizer files: the default cls/sep ids do not fit the vocab of 99
    with pytest.warns(UserWarning, match=r"defaults cls=101, sep=102 are outside its vocabulary of 99"):
        model = build(pre_dir).eval()
    assert model.config.qformer.cls_token_id == 101
    assert build(pre_dir, cls_token_id=2, sep_token_id=3).config.qformer.sep_token_id == 3  # no warning
    report = init(model, pre_dir)
    assert report.unused == sorted([
        "bert.embeddings.token_type_embeddings.weight", "bert.pooler.dense.bias", "bert.pooler.dense.weight",
        "cls.seq_relationship.bias", "cls.seq_relationship.weight",
    ])
    ids, mask = text_batch(SIZES["tiny"]["vocab_size"])
    with torch.no_grad():
        ref = pre.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        assert rel_err(model.qformer.text_pass(ids, mask), ref) < TOL

    legacy_dir = tmp_path / "legacy"
    legacy_dir.mkdir()
    pre.config.save_pretrained(str(legacy_dir))
    write_vocab(str(legacy_dir), pre.config.vocab_size)
    sd = {}
    for k, v in pre.bert.state_dict().items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        sd[k] = v
    sd["embeddings.position_ids"] = torch.arange(512)[None]
    torch.save(sd, legacy_dir / "pytorch_model.bin")
    legacy = build(str(legacy_dir)).eval()
    before = state(legacy)
    rep = init(legacy, str(legacy_dir))
    lm = [k for k in _params(legacy) if k.startswith("qformer.lm_head.")]
    assert set(lm) <= set(rep.fresh) and "qformer.lm_head.bias" not in rep.partial
    for k in lm:
        assert torch.equal(legacy.state_dict()[k], before[k])
    assert rep.unused == ["embeddings.token_type_embeddings.weight", "pooler.dense.bias", "pooler.dense.weight"]
    with torch.no_grad():
        assert rel_err(legacy.qformer.text_pass(ids, mask), ref) < TOL


# ---------------------------------------------------------------- size errors
def test_size_mismatch_names_key_and_shapes(berts):
    big_path, _ = berts["tiny"]
    small_path, _ = berts["narrow"]
    model = build(small_path)
    before = state(model)
    with pytest.raises(ValueError) as e:
        init_qformer_from_bert(model, big_path)
    msg = str(e.value)
    assert "bert.embeddings.position_embeddings.weight: folder (512, 32) vs model" in msg
    assert "(40, 16)" in msg and "layers: the folder has 2 encoder layers, the model 1" in msg
    assert "qformer_config_from_bert" in msg
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in after)  # nothing was changed

    # same sizes except the vocabulary: the model's is smaller than BERT's
    path, _ = berts["tiny"]
    small_vocab = build(path, vocab_size=50, dec_token_id=49)
    with pytest.raises(ValueError, match=r"word_embeddings.weight: folder \(99, 32\) vs model "
                                         r"qformer.embeddings.word_embeddings.weight \(50, 32\)"):
        init_qformer_from_bert(small_vocab, path)
    # heads differ (shapes cannot tell): config.json is checked
    other_heads = build(path, num_heads=8)
    with pytest.raises(ValueError, match="num_attention_heads=4 vs model num_heads=8"):
        init_qformer_from_bert(other_heads, path)


def test_stage1_runs_after_init(berts):
    """The BERT-sized config is a working Blip2: one stage-1 step with [DEC] (= BERT's vocab size) is finite."""
    path, _ = berts["narrow"]
    model = build(path)
    init(model, path)
    q = model.config.qformer
    ids, mask = text_batch(SIZES["narrow"]["vocab_size"])
    ids[:, 0] = q.cls_token_id
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = model.train().stage1_loss(images, ids, mask)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.qformer.layers[0].ffn_query.up.weight.grad is not None
