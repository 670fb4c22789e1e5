"""Tiny random models and data for the evaluation tests."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from blip2fast import Blip2
from blip2fast.config import Blip2Config, blip2_tiny

SMALL_VOCAB = 120  # a Q-Former vocabulary small enough for exhaustive decoding checks ([DEC] = 119)


def perturb_(model: nn.Module, seed: int, scale: float = 0.1) -> nn.Module:
    """Seeded noise on every parameter (LayerNorms and biases included), so that images and texts matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    return model


def tiny_config(vocab: int | None = None) -> Blip2Config:
    cfg = blip2_tiny()
    if vocab is not None:
        cfg = cfg.replace(qformer=dataclasses.replace(cfg.qformer, vocab_size=vocab, dec_token_id=vocab - 1))
    return cfg


def tiny_model(seed: int = 0, vocab: int | None = None, dtype=torch.float32) -> Blip2:
    torch.manual_seed(seed)
    return perturb_(Blip2(tiny_config(vocab)), seed + 1).to(dtype).eval()


def texts(n: int, seed: int = 0, length: int = 16, vocab: int = 3000, lo: int = 1000):
    """(ids, mask) in the BERT layout with varied lengths: [CLS] words [SEP] [PAD]..."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = torch.randint(lo, vocab, (n, length), generator=g).masked_fill(mask == 0, 0)
    ids[:, 0] = 101
    ids[torch.arange(n), lengths - 1] = 102
    return ids, mask


def images(n: int, seed: int = 0, size: int = 32, dtype=torch.float32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------------------ tiny LLM
OPT = dict(model_type="opt", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, vocab_size=99,
           word_embed_proj_dim=32, max_position_embeddings=64)
T5 = dict(model_type="t5", d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
          vocab_size=99, feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
WORDS = ("Question: Answer: Short answer: a photo of what colour is the it? how many are there dog cat red blue "
         "green yes no one two three four in on and with").split()


def word_tokenizer(family: str = "opt"):
    """A word-level transformers tokenizer (built offline) with OPT's or T5's special-token layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if family == "opt":  # <s>=0 <pad>=1 </s>=2 (bos = eos = </s>, as OPT's tokenizer)
        specials = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
        kw = dict(bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    else:  # T5: <pad>=0 </s>=1 <unk>=2, no bos
        specials = {"<pad>": 0, "</s>": 1, "<unk>": 2}
        kw = dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    vocab = dict(specials)
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


def tiny_stage2_model(family: str = "opt", seed: int = 0) -> Blip2:
    from blip2fast.config import LLMConfig

    cfg = tiny_config().replace(llm=LLMConfig(hf_config=dict(OPT if family == "opt" else T5), dtype="float32"))
    torch.manual_seed(seed)
    return perturb_(Blip2(cfg), seed + 1).eval()
