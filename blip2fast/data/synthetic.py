"""Procedural image-caption pairs for demos and tests: coloured shapes on a noisy background, captions that say
exactly what is drawn, and a word-level tokenizer over the closed caption vocabulary.

A *scene* is one or two objects, each (colour, shape, position):

    one object:   "a red circle on the left" / "... on the right" / "... at the top" / "... at the bottom"
                  / "a red circle in the centre"
    two objects:  "a red circle to the left of a blue square"   (object 0 on the left, object 1 on the right)
                  "a red circle above a blue square"            (object 0 at the top, object 1 at the bottom)

All scenes are enumerated once (`SCENES`, a fixed order), so a scene is an index and a caption is a function of
that index. Images are drawn for a whole batch at once with tensor ops (no PIL, no Python loop over samples):
shape masks from distance fields, jittered centre/size/colour, a random grey background and Gaussian noise, then
CLIP mean/std normalisation.

Determinism: every batch comes from its own `torch.Generator`, seeded from (seed, split, index), so
`train_batch(step, B)` is the same batch whatever happened before it (resume-safe), and the held-out set is a
fixed function of the seed. The held-out set uses distinct scenes (distinct captions), so retrieval has exactly one
correct answer per query. Its *images* are never drawn for training (a separate generator stream), but its scene
descriptions do occur in training: it measures generalisation to new renderings, not to unseen combinations.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..config import CLIP_MEAN, CLIP_STD


COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
COLOUR_RGB = (
    (0.95, 0.10, 0.10),
    (0.10, 0.80, 0.15),
    (0.15, 0.25, 1.00),
    (0.95, 0.90, 0.10),
    (0.65, 0.15, 0.85),
    (0.95, 0.95, 0.95),
)
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("left", "right", "top", "bottom", "centre")
# object centre of each position, as a fraction of the image side (x, y); y grows downwards
_POSITION_XY = ((0.25, 0.5), (0.75, 0.5), (0.5, 0.25), (0.5, 0.75), (0.5, 0.5))
_POSITION_PHRASE = ("on the left", "on the right", "at the top", "at the bottom", "in the centre")
LAYOUTS = ("single", "left_right", "above_below")

NO_OBJECT = -1  # label value for the absent second object of a single-object scene


@dataclass(frozen=True)
class Scene:
    """objects: ((colour, shape, position), ...) as indices into COLOURS, SHAPES, POSITIONS."""

    layout: str
    objects: tuple

    def caption(self) -> str:
        def noun(obj):
            return f"{COLOURS[obj[0]]} {SHAPES[obj[1]]}"

        if self.layout == "single":
            return f"a {noun(self.objects[0])} {_POSITION_PHRASE[self.objects[0][2]]}"
        relation = "to the left of" if self.layout == "left_right" else "above"
        return f"a {noun(self.objects[0])} {relation} a {noun(self.objects[1])}"


def _enumerate_scenes() -> tuple[Scene, ...]:
    nouns = list(itertools.product(range(len(COLOURS)), range(len(SHAPES))))
    scenes = [Scene("single", ((c, s, p),)) for (c, s) in nouns for p in range(len(POSITIONS))]
    for layout, (p0, p1) in (("left_right", (0, 1)), ("above_below", (2, 3))):
        scenes += [Scene(layout, ((c0, s0, p0), (c1, s1, p1))) for (c0, s0) in nouns for (c1, s1) in nouns]
    return tuple(scenes)


SCENES = _enumerate_scenes()
_NUM_SINGLE = sum(s.layout == "single" for s in SCENES)
# (num_scenes, 2, 3) labels [colour, shape, position] per object, NO_OBJECT for the missing second object
_SCENE_LABELS = torch.tensor(
    [[list(o) for o in s.objects] + [[NO_OBJECT] * 3] * (2 - len(s.objects)) for s in SCENES], dtype=torch.long
)
_SCENE_LAYOUT = torch.tensor([LAYOUTS.index(s.layout) for s in SCENES], dtype=torch.long)

_SPLIT_KEYS = {"train": 0x7A11, "eval": 0xE7A1}


def _generator(seed: int, split: str, index: int) -> torch.Generator:
    # a fixed integer mix of (seed, split, index); any collision-free mapping would do
    key = (int(seed) * 1_000_003 + _SPLIT_KEYS[split]) * 1_000_000_007 + int(index)
    return torch.Generator().manual_seed(key % (2**63 - 1))


@dataclass
class Batch:
    pixel_values: Tensor  # (B, 3, S, S) float32, CLIP-normalised
    input_ids: Tensor  # (B, T) int64, BERT layout
    attention_mask: Tensor  # (B, T) int64
    captions: list  # B strings
    scene_ids: Tensor  # (B,) int64 index into SCENES
    labels: Tensor  # (B, 2, 3) int64 [colour, shape, position] per object; NO_OBJECT rows for absent objects

    def to(self, device) -> "Batch":
        return Batch(self.pixel_values.to(device), self.input_ids.to(device), self.attention_mask.to(device),
                     self.captions, self.scene_ids, self.labels)


# ------------------------------------------------------------------------------------------------ drawing
def _shape_masks(dx: Tensor, dy: Tensor, r: Tensor) -> Tensor:
    """(4, B, S, S) bool masks of each shape kind for offsets dx, dy (B, S, S) and radius r (B, 1, 1)."""
    circle = dx * dx + dy * dy <= r * r
    half = 0.8 * r
    square = (dx.abs() <= half) & (dy.abs() <= half)
    # upward triangle: apex at dy = -r, base at dy = +0.8 r with half-width r
    triangle = (dy >= -r) & (dy <= half) & (dx.abs() <= (dy + r) / 1.8)
    arm = r / 3
    cross = ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))
    return torch.stack([circle, square, triangle, cross])


def render(scene_ids: Tensor, image_size: int, gen: torch.Generator, noise_std: float = 0.06) -> Tensor:
    """Draw scenes (B,) -> (B, 3, S, S) float32 in [0, 1] (not normalised). Centres jitter by up to S/16, radii
    are S/7..S/5, colours jitter by +-0.08 per channel, the background is a random dark grey plus noise."""
    B, S = scene_ids.shape[0], image_size
    labels = _SCENE_LABELS[scene_ids]  # (B, 2, 3)
    coords = torch.arange(S, dtype=torch.float32) + 0.5
    yy, xx = coords.view(1, S, 1), coords.view(1, 1, S)
    background = torch.rand(B, 1, 1, 1, generator=gen) * 0.3
    img = background.expand(B, 3, S, S).clone()
    pos_xy = torch.tensor(_POSITION_XY, dtype=torch.float32) * S
    rgb = torch.tensor(COLOUR_RGB, dtype=torch.float32)
    for k in range(2):  # object slot k, vectorised over the batch
        colour, shape, pos = labels[:, k, 0], labels[:, k, 1], labels[:, k, 2]
        present = pos != NO_OBJECT
        centre = pos_xy[pos.clamp_min(0)] + (torch.rand(B, 2, generator=gen) * 2 - 1) * (S / 16)
        radius = (S / 7 + torch.rand(B, generator=gen) * (S / 5 - S / 7)).view(B, 1, 1)
        dx = xx - centre[:, 0].view(B, 1, 1)
        dy = yy - centre[:, 1].view(B, 1, 1)
        masks = _shape_masks(dx, dy, radius)  # (4, B, S, S)
        mask = masks[shape.clamp_min(0), torch.arange(B)] & present.view(B, 1, 1)  # (B, S, S)
        colour_rgb = (rgb[colour.clamp_min(0)] + (torch.rand(B, 3, generator=gen) * 2 - 1) * 0.08).clamp(0, 1)
        img = torch.where(mask.unsqueeze(1), colour_rgb.view(B, 3, 1, 1), img)
    img = img + torch.randn(B, 3, S, S, generator=gen) * noise_std
    return img.clamp(0.0, 1.0)


def normalize_clip(img: Tensor) -> Tensor:
    mean = torch.tensor(CLIP_MEAN, dtype=img.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=img.dtype).view(1, 3, 1, 1)
    return (img - mean) / std


# ------------------------------------------------------------------------------------------------ tokenizer
class WordTokenizer:
    """Word-level tokenizer over a closed vocabulary, BERT id layout: [PAD]=0, [CLS]=101, [SEP]=102, word i ->
    `word_offset + i` (below `vocab_size`, clear of `reserved_ids` such as [DEC]). Text is lower-cased and split on
    whitespace; a word outside the vocabulary is an error (the vocabulary is closed: an unknown word is a bug)."""

    PAD, CLS, SEP = 0, 101, 102

    def __init__(self, words: Sequence[str], max_len: int, word_offset: int = 1000, vocab_size: Optional[int] = None,
                 reserved_ids: Sequence[int] = ()):
        self.words = tuple(words)
        if len(set(self.words)) != len(self.words):
            raise ValueError("tokenizer words must be distinct")
        self.max_len = max_len
        self.word_offset = word_offset
        if vocab_size is not None and word_offset + len(self.words) > vocab_size:
            raise ValueError(f"{len(self.words)} words from id {word_offset} do not fit a vocabulary of {vocab_size}")
        if word_offset <= self.SEP:
            raise ValueError(f"word_offset={word_offset} must be above the special ids (<= {self.SEP})")
        clash = [i for i in reserved_ids if word_offset <= i < word_offset + len(self.words)]
        if clash:
            last = word_offset + len(self.words) - 1
            raise ValueError(f"word ids {word_offset}..{last} include the reserved ids {clash}")
        self._ids = {w: word_offset + i for i, w in enumerate(self.words)}

    def __call__(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """texts -> (input_ids, attention_mask), both (len(texts), max_len) int64: [CLS] words [SEP] [PAD]..."""
        ids = torch.full((len(texts), self.max_len), self.PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            words = text.lower().split()
            if len(words) + 2 > self.max_len:
                raise ValueError(f"{text!r} has {len(words)} words; at most {self.max_len - 2} fit max_len="
                                 f"{self.max_len} with [CLS] and [SEP]")
            try:
                toks = [self._ids[w] for w in words]
            except KeyError as e:
                raise ValueError(f"word {e.args[0]!r} in {text!r} is not in the tokenizer's vocabulary") from None
            ids[row, : len(toks) + 2] = torch.tensor([self.CLS, *toks, self.SEP])
        return ids, (ids != self.PAD).long()

    def decode(self, ids: Tensor) -> list[str]:
        """(B, T) ids -> B strings; special tokens and padding are dropped."""
        out = []
        for row in ids.tolist():
            words = [self.words[i - self.word_offset] for i in row
                     if self.word_offset <= i < self.word_offset + len(self.words)]
            out.append(" ".join(words))
        return out


def caption_vocabulary() -> tuple[str, ...]:
    """Every word any caption uses, sorted (the tokenizer's vocabulary)."""
    return tuple(sorted({w for s in SCENES for w in s.caption().split()}))


# ------------------------------------------------------------------------------------------------ dataset
class SyntheticShapes:
    """Procedural stage-1 data: `train_batch(step, B)` and a fixed held-out `eval_set(n)`.

    Training scenes: one object with probability 1/3, else a uniformly drawn two-object scene.
    """

    def __init__(self, image_size: int = 32, max_text_len: int = 16, seed: int = 0, vocab_size: Optional[int] = None,
                 word_offset: int = 1000, reserved_ids: Sequence[int] = ()):
        self.image_size = image_size
        self.seed = seed
        self.tokenizer = WordTokenizer(caption_vocabulary(), max_text_len, word_offset, vocab_size, reserved_ids)

    @property
    def num_scenes(self) -> int:
        return len(SCENES)

    def make_batch(self, scene_ids: Tensor, gen: torch.Generator) -> Batch:
        pixels = normalize_clip(render(scene_ids, self.image_size, gen))
        captions = [SCENES[i].caption() for i in scene_ids.tolist()]
        ids, mask = self.tokenizer(captions)
        return Batch(pixels, ids, mask, captions, scene_ids, _SCENE_LABELS[scene_ids])

    def train_batch(self, step: int, batch_size: int) -> Batch:
        gen = _generator(self.seed, "train", step)
        single = torch.rand(batch_size, generator=gen) < 1 / 3
        one = torch.randint(0, _NUM_SINGLE, (batch_size,), generator=gen)
        two = torch.randint(_NUM_SINGLE, len(SCENES), (batch_size,), generator=gen)
        return self.make_batch(torch.where(single, one, two), gen)

    def eval_set(self, n: int) -> Batch:
        """n held-out pairs with distinct scenes (so distinct captions); a fixed function of the seed."""
        if not 1 <= n <= len(SCENES):
            raise ValueError(f"eval size {n} must be in [1, {len(SCENES)}] (the number of distinct scenes)")
        gen = _generator(self.seed, "eval", 0)
        scene_ids = torch.randperm(len(SCENES), generator=gen)[:n]
        return self.make_batch(scene_ids, gen)
