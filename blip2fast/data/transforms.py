"""Image decoding and the paper's transforms with PIL + torch (no torchvision).

- train: RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(3/4, 4/3), bicubic) -> horizontal flip (p=0.5) ->
  float tensor in [0, 1] -> CLIP mean/std normalisation. The crop box follows torchvision's rule: up to 10
  tries of (area fraction ~ U(scale), log-aspect ~ U(log ratio)); a box that fits is placed uniformly; after 10
  misses, the largest centred box whose aspect is clamped into `ratio`.
- eval: resize the shorter side to `size` (bicubic; the longer side truncates, as torchvision) -> centre crop
  `size` x `size` (or, resize="squash", both sides to `size`) -> tensor -> normalisation.
- normalisation: the tower's own statistics (`tower_preprocess`: a transformers tower's preprocessor_config.json,
  OpenAI CLIP's for the EVA / CLIP towers), CLIP's by default.

Every random draw comes from the `torch.Generator` passed in, so a transform is a pure function of (image,
generator state): the pipeline seeds one generator per sample visit.

JPEG draft mode (`decode_image(..., min_side=...)`): libjpeg can decode at 1/2, 1/4 or 1/8 scale for a fraction
of the cost of a full decode. The pipeline asks for the largest reduction that keeps the shorter side at least
2 x size: the smallest training crop (area 0.5, aspect 3/4) spans at least ~0.61 of a square image's side, so
the crop is still downsampled to `size`. This changes which source pixels the bicubic filter sees (a slightly
softer image), not the crop geometry; pass min_side=None for full-resolution decoding.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..config import CLIP_MEAN, CLIP_STD

_BICUBIC = Image.Resampling.BICUBIC


def decode_image(data: bytes, min_side: Optional[int] = None) -> Image.Image:
    """Bytes -> a fully decoded RGB PIL image. With `min_side`, a JPEG is decoded in draft mode at the largest
    1/2^k reduction whose shorter side stays >= min_side. Raises whatever PIL raises on bad bytes."""
    img = Image.open(io.BytesIO(data))
    if min_side is not None and img.format == "JPEG":
        w, h = img.size
        f = min_side / min(w, h)
        if f < 1:
            img.draft("RGB", (math.ceil(w * f), math.ceil(h * f)))
    img.load()
    if img.mode != "RGB":
        # palette / greyscale / CMYK / alpha -> RGB (alpha is dropped: the colour channels are kept as they are)
        img = img.convert("RGBA").convert("RGB") if img.mode == "P" else img.convert("RGB")
    return img


def random_resized_crop_box(width: int, height: int, gen: torch.Generator, scale=(0.5, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, crop_width, crop_height) of a random crop of a width x height image (torchvision's rule)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return left, top, w, h
    in_ratio = width / height  # fallback: centre crop with the aspect clamped into `ratio`
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def to_normalized_tensor(img: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> Tensor:
    """RGB PIL image -> (3, H, W) float32, (x / 255 - mean) / std."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(m).div_(s)


RESIZE_MODES = ("crop", "squash")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # transformers' defaults for processors without their own statistics
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How a tower wants its pixels: the side, the resize of evaluation images (crop: shorter side to `size` then
    centre crop; squash: both sides to `size`, LAVIS's BLIP-2 evaluation) and the normalisation."""

    size: int
    resize: str
    mean: tuple
    std: tuple
    source: str  # where these came from (a preprocessor_config.json, "EVA/CLIP statistics", a flag), for the log

    def to_dict(self) -> dict:
        return {"size": self.size, "resize": self.resize, "mean": list(self.mean), "std": list(self.std),
                "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(int(d["size"]), str(d["resize"]), tuple(d["mean"]), tuple(d["std"]), str(d.get("source", "")))


def _side(value) -> Optional[int]:
    """A square side from a transformers size entry ({"height", "width"}, {"shortest_edge"}, or an int)."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "height" in value and "width" in value and value["height"] == value["width"]:
            return int(value["height"])
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
    return None


def read_preprocessor_config(folder: str) -> Optional[dict]:
    """{"size", "resize", "mean", "std"} from a transformers folder's preprocessor_config.json (None: no file).
    size: crop_size where the processor centre-crops, else size; a missing mean / std is transformers' default
    (ImageNet's)."""
    import json
    import os

    file = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as f:
        d = json.load(f)
    crop = bool(d.get("do_center_crop", False))
    size = _side(d.get("crop_size")) if crop else None
    size = size or _side(d.get("size"))
    mean, std = d.get("image_mean") or IMAGENET_MEAN, d.get("image_std") or IMAGENET_STD
    if isinstance(mean, (int, float)):
        mean = [mean] * 3
    if isinstance(std, (int, float)):
        std = [std] * 3
    return {"size": size, "resize": "crop" if crop else "squash", "mean": tuple(float(x) for x in mean),
            "std": tuple(float(x) for x in std), "file": file}


def tower_preprocess(vision) -> Preprocess:
    """What the tower of `vision` (a VisionConfig) expects: a transformers tower's own preprocessor_config.json
    (CLIP's statistics and LAVIS's squash when the folder has none); EVA / CLIP towers in LAVIS's layout: the
    statistics both were trained with (OpenAI CLIP's) and LAVIS's evaluation resize (squash)."""
    if vision.kind == "hf" and vision.hf_path:
        found = read_preprocessor_config(vision.hf_path)
        if found is not None:
            return Preprocess(vision.image_size, found["resize"], found["mean"], found["std"], found["file"])
        return Preprocess(vision.image_size, "squash", CLIP_MEAN, CLIP_STD,
                          f"CLIP statistics (no preprocessor_config.json in {vision.hf_path})")
    return Preprocess(vision.image_size, "squash", CLIP_MEAN, CLIP_STD, "EVA/CLIP statistics")


@dataclass(frozen=True)
class ImageTransform:
    """`transform(img, gen)` -> (3, size, size) float32, normalised with `mean` / `std` (CLIP's by default).
    train=True: the paper's augmentation; train=False: `resize` ("crop": shorter side + centre crop; "squash":
    both sides to `size`), the generator is not used."""

    size: int = 224  # output side in pixels
    train: bool = True  # RandomResizedCrop + flip (True) or resize + centre crop (False)
    scale: tuple = (0.5, 1.0)  # RandomResizedCrop area fraction range (the paper's)
    ratio: tuple = (3 / 4, 4 / 3)  # RandomResizedCrop aspect range (torchvision's default)
    flip_p: float = 0.5  # horizontal flip probability (train only)
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    resize: str = "crop"  # evaluation resize (train=False)

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"image size={self.size} must be >= 1")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize={self.resize!r}: use one of {RESIZE_MODES}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean={self.mean} / std={self.std}: three values each, std > 0")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale={self.scale} must satisfy 0 < low <= high <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio={self.ratio} must satisfy 0 < low <= high")
        if not 0 <= self.flip_p <= 1:
            raise ValueError(f"flip_p={self.flip_p} must be in [0, 1]")

    @property
    def draft_side(self) -> int:
        """The shorter side a JPEG is decoded at, at least (see the module docstring)."""
        return 2 * self.size

    def __call__(self, img: Image.Image, gen: Optional[torch.Generator] = None) -> Tensor:
        S = self.size
        if self.train:
            if gen is None:
                raise ValueError("the training transform needs a torch.Generator (its random draws come from it)")
            left, top, w, h = random_resized_crop_box(img.width, img.height, gen, self.scale, self.ratio)
            out = img.resize((S, S), _BICUBIC, box=(left, top, left + w, top + h))
            if float(torch.rand((), generator=gen, dtype=torch.float64)) < self.flip_p:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        elif self.resize == "squash":
            out = img.resize((S, S), _BICUBIC)
        else:
            w, h = img.size
            if w <= h:
                nw, nh = S, int(S * h / w)
            else:
                nw, nh = int(S * w / h), S
            out = img.resize((nw, nh), _BICUBIC)
            left, top = int(round((nw - S) / 2.0)), int(round((nh - S) / 2.0))
            out = out.crop((left, top, left + S, top + S))
        return to_normalized_tensor(out, self.mean, self.std)
