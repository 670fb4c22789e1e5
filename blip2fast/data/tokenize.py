"""Caption -> fixed-length token tensors, run inside the loader workers on a whole batch at once.

A *text encoder* is a callable `encoder(captions, batch_id) -> dict of (B, T) int64 tensors`; `batch_id` is a
unique int per batch (per rank), used only where a split is random (the encoder-decoder prefix split). Three:

- `Stage1Text`: Q-Former ids `[CLS] ... [SEP] [PAD]...` (input_ids, attention_mask), max_len tokens, truncated on
  the right, from a BERT tokenizer (`load_bert_tokenizer`: local folder only, `[DEC]` added as bos like LAVIS) or
  from any callable `texts -> (input_ids, attention_mask)` such as the demo's `WordTokenizer`.
- `DecoderOnlyText` (stage 2, OPT / Llama-style): `[BOS] prompt caption "\n"`, right-padded to max_len;
  labels = input_ids with -100 on BOS, prompt and padding (input_ids, attention_mask, labels).
- `EncoderDecoderText` (stage 2, T5 / FlanT5): the paper's prefix-LM split (`prefix_lm.prefix_lm_split_batch`);
  the prefix (+ EOS) feeds the encoder after the queries (input_ids, attention_mask), the suffix (+ EOS) is the
  decoder target (labels, -100 on padding; the model shifts them into decoder inputs).

Stage-2 encoders tokenise without the tokenizer's own special tokens and place BOS / EOS themselves, so the layout
is the one above whatever a tokenizer adds by default (OPT adds `</s>` as BOS, T5 appends `</s>`, Llama adds `<s>`):
the same ids as LAVIS for OPT and T5. Truncation keeps BOS (decoder-only) and EOS (encoder-decoder); a decoder-only
caption that is too long loses its "\n" (as in LAVIS).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from .._hf import load_pretrained
from .prefix_lm import prefix_lm_split_batch

TextEncoder = Callable[[Sequence[str], int], dict]


def load_tokenizer(path: str, **kwargs) -> Any:
    """A transformers tokenizer from a local folder (never a hub download)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder {path!r} does not exist (give a local folder with the tokenizer "
                                "files; nothing is downloaded)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the loader workers fork after the tokenizer loads
    from transformers import AutoTokenizer

    return load_pretrained(AutoTokenizer, path, **kwargs)


def load_bert_tokenizer(path: str) -> Any:
    """The Q-Former tokenizer: bert-base-uncased from a local folder, right truncation, `[DEC]` added as the bos
    token if the folder does not already have it (vocab 30522 -> 30523, `[DEC]` = 30522)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"BERT tokenizer folder {path!r} does not exist (a local bert-base-uncased "
                                "tokenizer folder, e.g. vocab.txt + tokenizer_config.json)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import BertTokenizerFast

    tok = load_pretrained(BertTokenizerFast, path, truncation_side="right")
    if tok.bos_token != "[DEC]":
        tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def _is_hf(tokenizer) -> bool:
    return hasattr(tokenizer, "convert_tokens_to_ids") and hasattr(tokenizer, "pad_token_id")


def _pad(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[Tensor, Tensor]:
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def _plain_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids without any special tokens."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _special_id(tokenizer, given: Optional[int], attr: str, what: str, required: bool = True) -> Optional[int]:
    value = given if given is not None else getattr(tokenizer, attr, None)
    if value is None and required:
        raise ValueError(f"the tokenizer has no {attr} ({what}); pass {attr}= explicitly")
    return value


class Stage1Text:
    """Q-Former text: (input_ids, attention_mask), each (B, max_len) int64, `[CLS] ... [SEP] [PAD]...`.

    `tokenizer` is a transformers BERT tokenizer (see `load_bert_tokenizer`) or any callable
    `texts -> (input_ids, attention_mask)` that already pads to max_len (the demo's `WordTokenizer`)."""

    def __init__(self, tokenizer, max_len: int = 32):
        if max_len < 2:
            raise ValueError(f"max_len={max_len} must be >= 2 ([CLS] and [SEP])")
        self.tokenizer, self.max_len, self.hf = tokenizer, max_len, _is_hf(tokenizer)

    @classmethod
    def from_folder(cls, path: str, max_len: int = 32) -> "Stage1Text":
        return cls(load_bert_tokenizer(path), max_len)

    @property
    def dec_token_id(self) -> Optional[int]:
        """The `[DEC]` id the model's `qformer.dec_token_id` must equal (None for a non-HF tokenizer)."""
        return self.tokenizer.convert_tokens_to_ids("[DEC]") if self.hf else None

    def __call__(self, captions: Sequence[str], batch_id: int = 0) -> dict:
        if self.hf:
            enc = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.max_len,
                                 return_tensors="pt")
            ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
        else:
            ids, mask = self.tokenizer(list(captions))
        if ids.shape != (len(captions), self.max_len) or mask.shape != ids.shape:
            raise ValueError(f"the tokenizer returned ids {tuple(ids.shape)} / mask {tuple(mask.shape)}; expected "
                             f"({len(captions)}, {self.max_len}) for both (set its max_len to {self.max_len})")
        return {"input_ids": ids, "attention_mask": mask}


class DecoderOnlyText:
    """Stage 2, decoder-only LLM: input_ids `[BOS] prompt caption "\\n" [PAD]...` (B, max_len), attention_mask,
    labels = input_ids with -100 on BOS, the prompt and padding (position t predicts labels[t + 1])."""

    def __init__(self, tokenizer, max_len: int = 32, prompt: str = "", bos_token_id: Optional[int] = None,
                 pad_token_id: Optional[int] = None):
        self.tokenizer, self.max_len = tokenizer, max_len
        self.bos = _special_id(tokenizer, bos_token_id, "bos_token_id", "the first input token")
        pad = _special_id(tokenizer, pad_token_id, "pad_token_id", "", required=False)
        if pad is None:  # e.g. Llama: any id will do, padding is masked and never a target
            pad = getattr(tokenizer, "eos_token_id", None) or 0
        self.pad = pad
        self.prompt_ids = _plain_ids(tokenizer, [prompt])[0] if prompt else []
        if 1 + len(self.prompt_ids) >= max_len:
            raise ValueError(f"the prompt {prompt!r} takes {len(self.prompt_ids)} tokens: with BOS it leaves no room "
                             f"for a caption in max_len={max_len}")

    def __call__(self, captions: Sequence[str], batch_id: int = 0) -> dict:
        head = [self.bos, *self.prompt_ids]
        rows = [(head + ids)[: self.max_len] for ids in _plain_ids(self.tokenizer, [c + "\n" for c in captions])]
        ids, mask = _pad(rows, self.max_len, self.pad)
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, : len(head)] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class EncoderDecoderText:
    """Stage 2, encoder-decoder LLM: each caption is cut at a random word boundary, reproducibly per
    (seed, batch_id, row). input_ids / attention_mask: `prefix [EOS] [PAD]...` (B, max_len) for the encoder (a
    one-word caption has an empty prefix: just EOS); labels: `suffix [EOS]` (B, max_output_len), -100 on padding.
    eos_token_id=None and a tokenizer without EOS: no EOS is appended."""

    def __init__(self, tokenizer, max_len: int = 32, max_output_len: int = 32, seed: int = 0,
                 eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None):
        if max_len < 1 or max_output_len < 2:
            raise ValueError(f"max_len={max_len} must be >= 1 and max_output_len={max_output_len} >= 2")
        self.tokenizer, self.max_len, self.max_output_len, self.seed = tokenizer, max_len, max_output_len, seed
        self.eos = _special_id(tokenizer, eos_token_id, "eos_token_id", "", required=False)
        self.pad = _special_id(tokenizer, pad_token_id, "pad_token_id", "the encoder's padding id")

    def _rows(self, texts: Sequence[str], length: int) -> list[list[int]]:
        tail = [] if self.eos is None else [self.eos]
        return [ids[: length - len(tail)] + tail for ids in _plain_ids(self.tokenizer, texts)]

    def __call__(self, captions: Sequence[str], batch_id: int = 0) -> dict:
        prefixes, suffixes = prefix_lm_split_batch(captions, self.seed, batch_id)
        ids, mask = _pad(self._rows(prefixes, self.max_len), self.max_len, self.pad)
        out, out_mask = _pad(self._rows(suffixes, self.max_output_len), self.max_output_len, self.pad)
        return {"input_ids": ids, "attention_mask": mask, "labels": out.masked_fill(out_mask == 0, -100)}
