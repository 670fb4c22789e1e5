"""The paper's prefix-LM split for encoder-decoder LLMs (FlanT5): each caption is cut at a random word boundary;
the prefix feeds the encoder after the queries, the suffix is the decoder's target. (LAVIS does not implement it:
it feeds `text_input` / `text_output` as given.) Data-side: the collator calls it before tokenising.
"""
from __future__ import annotations

import random
from typing import Optional, Sequence


def prefix_lm_split(caption: str, rng: Optional[random.Random] = None) -> tuple[str, str]:
    """(prefix, suffix), both non-empty when the caption has two words or more: the cut is uniform over the
    word boundaries. A one-word caption gives ("", caption): the decoder still has a target.
    `rng` makes the cut reproducible (e.g. `random.Random(hash((seed, step, index)))`)."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    words = caption.split()
    if len(words) < 2:
        return "", " ".join(words)
    cut = (rng or random).randint(1, len(words) - 1)
    return " ".join(words[:cut]), " ".join(words[cut:])


def prefix_lm_split_batch(captions: Sequence[str], seed: int, step: int) -> tuple[list[str], list[str]]:
    """Split a batch reproducibly: the cut of caption i depends only on (seed, step, i)."""
    prefixes, suffixes = [], []
    for i, caption in enumerate(captions):
        p, s = prefix_lm_split(caption, random.Random(f"{seed}:{step}:{i}"))
        prefixes.append(p)
        suffixes.append(s)
    return prefixes, suffixes
