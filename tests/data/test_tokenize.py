"""Text encoders with the real bert-base-uncased vocabulary (shared/reference/lavis-stage1-tiny/tokenizer): stage 1
Q-Former ids, stage 2 decoder-only and encoder-decoder layouts; plus a word-level tokenizer that keeps "\\n"."""
from __future__ import annotations

import pytest
import torch

from blip2fast.data.prefix_lm import prefix_lm_split_batch
from blip2fast.data.synthetic import WordTokenizer
from blip2fast.data.tokenize import (DecoderOnlyText, EncoderDecoderText, Stage1Text, load_bert_tokenizer,
                                     load_tokenizer)

pytest.importorskip("transformers")

CAPTIONS = ["a dog running on the grass", "two cats", "sunset", "a very long caption " + "with many words " * 10]
CLS, SEP, PAD, DEC = 101, 102, 0, 30522


@pytest.fixture(scope="module")
def bert(bert_dir):
    return load_bert_tokenizer(bert_dir)


def word_ids(tok, text):
    return tok.convert_tokens_to_ids(tok.tokenize(text))


def test_bert_folder_has_dec_as_bos(bert):
    assert len(bert) == 30523 and bert.bos_token == "[DEC]" and bert.bos_token_id == DEC
    assert (bert.cls_token_id, bert.sep_token_id, bert.pad_token_id) == (CLS, SEP, PAD)
    assert Stage1Text(bert).dec_token_id == DEC


def test_bert_without_dec_gets_it_added(bert_dir, tmp_path):
    import shutil

    shutil.copy(f"{bert_dir}/vocab.txt", tmp_path / "vocab.txt")
    (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": true, "tokenizer_class": "BertTokenizer"}')
    tok = load_bert_tokenizer(str(tmp_path))
    assert tok.convert_tokens_to_ids("[DEC]") == DEC and tok.bos_token == "[DEC]" and len(tok) == 30523


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_bert_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(str(tmp_path / "nope"))


def test_stage1_ids(bert, bert_dir):
    T = 12
    out = Stage1Text.from_folder(bert_dir, max_len=T)(CAPTIONS, 0)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape == (4, T) and ids.dtype == mask.dtype == torch.long
    for row, cap in enumerate(CAPTIONS):
        words = word_ids(bert, cap)
        want = ([CLS] + words[: T - 2] + [SEP] + [PAD] * T)[:T]  # truncation on the right keeps [SEP]
        assert ids[row].tolist() == want
        assert mask[row].tolist() == [1] * min(len(words) + 2, T) + [0] * max(0, T - len(words) - 2)
    assert ids[3, -1] == SEP and mask[3].all()
    assert bert.decode(ids[0], skip_special_tokens=True) == CAPTIONS[0]


def test_stage1_accepts_the_demo_word_tokenizer():
    wt = WordTokenizer(("a", "dog", "two", "cats", "sunset"), max_len=6)
    out = Stage1Text(wt, max_len=6)(["a dog", "two cats", "sunset"])
    ref_ids, ref_mask = wt(["a dog", "two cats", "sunset"])
    assert torch.equal(out["input_ids"], ref_ids) and torch.equal(out["attention_mask"], ref_mask)
    with pytest.raises(ValueError, match="set its max_len to 8"):
        Stage1Text(wt, max_len=8)(["a dog"])


def test_decoder_only_layout(bert):
    T = 10
    enc = DecoderOnlyText(bert, max_len=T, pad_token_id=PAD)  # BERT: [DEC] is the bos, "\n" is whitespace
    out = enc(CAPTIONS, 3)
    ids, mask, labels = out["input_ids"], out["attention_mask"], out["labels"]
    assert ids.shape == mask.shape == labels.shape == (4, T)
    for row, cap in enumerate(CAPTIONS):
        want = [DEC] + word_ids(bert, cap)[: T - 1]
        assert ids[row].tolist() == want + [PAD] * (T - len(want))
        assert labels[row].tolist() == [-100] + want[1:] + [-100] * (T - len(want))
    assert torch.equal(mask.bool(), labels.ne(-100) | (torch.arange(T) == 0))
    # a prompt: its tokens are inputs, never targets
    prompted = DecoderOnlyText(bert, max_len=T, prompt="a photo of")(["a cat"])
    p = word_ids(bert, "a photo of")
    assert prompted["input_ids"][0, :6].tolist() == [DEC] + p + word_ids(bert, "a cat")
    assert prompted["labels"][0, :6].tolist() == [-100] * 4 + word_ids(bert, "a cat")
    with pytest.raises(ValueError, match="no room"):
        DecoderOnlyText(bert, max_len=4, prompt="a photo of")


def word_level_tokenizer():
    """A tiny transformers tokenizer that keeps "\\n" as a token (BERT turns it into whitespace)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", "\n", "a", "dog", "two", "cats", "photo", "of"])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
                                               pre_tokenizers.Split("\n", behavior="isolated")])
    # OPT-style: </s> is both bos and eos
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_decoder_only_appends_newline_and_truncation_drops_it():
    tok = word_level_tokenizer()
    out = DecoderOnlyText(tok, max_len=6)(["a dog", "two cats a dog", "a"])
    assert out["input_ids"].tolist() == [[1, 4, 5, 3, 0, 0], [1, 6, 7, 4, 5, 3], [1, 4, 3, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, 4, 5, 3, -100, -100], [-100, 6, 7, 4, 5, 3], [-100, 4, 3, -100, -100,
                                                                                            -100]]
    cut = DecoderOnlyText(tok, max_len=4)(["two cats a dog"])
    assert cut["input_ids"].tolist() == [[1, 6, 7, 4]]  # as LAVIS: the "\n" is lost with the overflow


def test_encoder_decoder_prefix_suffix(bert):
    enc = EncoderDecoderText(bert, max_len=8, max_output_len=6, seed=5, eos_token_id=SEP)
    caps = CAPTIONS[:3] + ["one"]
    out = enc(caps, batch_id=17)
    prefixes, suffixes = prefix_lm_split_batch(caps, 5, 17)
    assert prefixes[3] == "" and suffixes[3] == "one"
    for row in range(4):
        p = (word_ids(bert, prefixes[row])[:7] + [SEP])
        s = (word_ids(bert, suffixes[row])[:5] + [SEP])
        assert out["input_ids"][row].tolist() == p + [PAD] * (8 - len(p))
        assert out["attention_mask"][row].tolist() == [1] * len(p) + [0] * (8 - len(p))
        assert out["labels"][row].tolist() == s + [-100] * (6 - len(s))
    assert prefixes[0] and suffixes[0] and f"{prefixes[0]} {suffixes[0]}" == caps[0]
    # reproducible per (seed, batch_id); another batch id cuts differently somewhere
    assert all(torch.equal(a, b) for a, b in zip(out.values(), enc(caps, batch_id=17).values()))
    many = ["w1 w2 w3 w4 w5 w6 w7"] * 8
    assert not torch.equal(enc(many, 1)["labels"], enc(many, 2)["labels"])
    # no EOS available: none appended
    plain = EncoderDecoderText(bert, max_len=8, max_output_len=6)(["two cats"], 0)
    assert SEP not in plain["input_ids"][0].tolist() and SEP not in plain["labels"][0].tolist()
