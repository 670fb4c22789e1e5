"""Captions: the paper's cleaning, reading one or several captions from a sample's `.txt` / `.json`, and the
reproducible choice of one caption per visit of a sample.

Cleaning (spec section 4, as LAVIS's `pre_caption`): lower-case; each of `.!"()*#:;~` becomes a space; every run of
whitespace becomes one space, leading/trailing whitespace goes; at most 50 words are kept. One deliberate
difference: LAVIS collapses only runs of two or more whitespace characters, so a single tab or newline survives
inside its captions; here every whitespace run (tabs, newlines included) becomes one space.

Sources, as written by img2dataset and by `python -m blip2fast.data.write_shards`:
- `.txt`: UTF-8, one caption per non-blank line;
- `.json`: UTF-8 object with "captions" (list of str) or "caption" (str or list of str); "captions" wins.
A sample with both uses the `.txt` (img2dataset writes the same caption to both).

A sample that cannot give a caption raises `BadSample(reason)` with reason "missing_caption" (no caption field),
"bad_text" (not UTF-8, not JSON, wrong types) or "empty_caption" (nothing left after cleaning).
"""
from __future__ import annotations

import hashlib
import json
from typing import Optional, Sequence

MAX_WORDS = 50  # the paper's cap on caption length, in words
_PUNCT_TO_SPACE = str.maketrans({c: " " for c in '.!"()*#:;~'})


class BadSample(Exception):
    """A sample the pipeline skips and counts; `reason` is the counter's key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def stable_hash(*parts) -> int:
    """A 64-bit hash of the parts' `str()` that is the same in every process and run (Python's `hash` of a str is
    salted per process, so it cannot seed anything that must survive a restart)."""
    data = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def clean_caption(caption: str, max_words: int = MAX_WORDS) -> str:
    """The paper's caption cleaning: lower-case, `.!"()*#:;~` -> space, collapse whitespace, first `max_words`
    words. May return "" (a caption of only punctuation and spaces)."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    if max_words < 1:
        raise ValueError(f"max_words={max_words} must be >= 1")
    words = caption.lower().translate(_PUNCT_TO_SPACE).split()
    return " ".join(words[:max_words])


def _utf8(data: bytes, ext: str) -> str:
    try:
        return data.decode("utf-8-sig")  # a BOM is not part of the caption
    except UnicodeDecodeError as e:
        raise BadSample("bad_text", f".{ext} is not UTF-8 ({e.reason} at byte {e.start})") from None


def captions_from_txt(data: bytes) -> list[str]:
    """`.txt` bytes -> the raw captions, one per non-blank line."""
    return [line for line in _utf8(data, "txt").splitlines() if line.strip()]


def captions_from_json(data: bytes) -> list[str]:
    """`.json` bytes -> the raw captions from "captions" (list) or "caption" (str or list)."""
    try:
        obj = json.loads(_utf8(data, "json"))
    except json.JSONDecodeError as e:
        raise BadSample("bad_text", f".json does not parse: {e}") from None
    if not isinstance(obj, dict):
        raise BadSample("bad_text", f".json holds a {type(obj).__name__}, not an object")
    value = obj.get("captions", obj.get("caption"))
    if value is None:
        raise BadSample("missing_caption", ".json has no 'captions' or 'caption'")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise BadSample("bad_text", ".json caption(s) must be a str or a list of str")
    return value


def sample_captions(members: dict, max_words: int = MAX_WORDS) -> list[str]:
    """A sample's cleaned, non-empty captions from its `txt` or `json` member bytes (`members` maps extension ->
    bytes). Raises BadSample("missing_caption" | "bad_text" | "empty_caption")."""
    if "txt" in members:
        raw = captions_from_txt(members["txt"])
    elif "json" in members:
        raw = captions_from_json(members["json"])
    else:
        raise BadSample("missing_caption", "no .txt or .json member")
    cleaned = [c for c in (clean_caption(r, max_words) for r in raw) if c]
    if not cleaned:
        raise BadSample("empty_caption", f"{len(raw)} caption(s), all empty after cleaning")
    return cleaned


def choose_caption(captions: Sequence[str], seed: Optional[int], *tag) -> str:
    """One caption: uniform over `captions`, a pure function of (seed, *tag) (e.g. tag = (visit, sample key), so
    a sample seen again in a later epoch / shard visit may get another caption). seed=None: the first caption
    (evaluation)."""
    if not captions:
        raise ValueError("choose_caption needs at least one caption")
    if seed is None or len(captions) == 1:
        return captions[0]
    return captions[stable_hash("caption", seed, *tag) % len(captions)]
