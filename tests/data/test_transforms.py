"""Image decoding and transforms: shapes, determinism, the crop rule, flips, centre crop, normalisation, and the
pixels a tower asks for (its preprocessor_config.json, or CLIP statistics)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from blip2fast.config import CLIP_MEAN, CLIP_STD
from blip2fast.data.transforms import (ImageTransform, decode_image, random_resized_crop_box,
                                       to_normalized_tensor)
from tests.data.conftest import encode, make_image

MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("size", [(61, 37), (37, 61), (5, 3), (224, 224)])
def test_shapes_dtype_and_range(train, size):
    t = ImageTransform(32, train=train)
    x = t(make_image(1, size), gen(0))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    assert bool(((x >= lo - 1e-6) & (x <= hi + 1e-6)).all())


def test_train_transform_is_a_function_of_the_generator():
    t = ImageTransform(24)
    img = make_image(3, (57, 43))
    a, b = t(img, gen(11)), t(img, gen(11))
    assert torch.equal(a, b)
    outs = [t(img, gen(s)) for s in range(8)]
    assert len({o.sum().item() for o in outs}) == 8  # different draws, different crops
    with pytest.raises(ValueError, match="Generator"):
        t(img)


def test_eval_transform_is_deterministic_and_a_centre_crop():
    S = 16
    t = ImageTransform(S, train=False)
    wide = make_image(4, (2 * S, S))  # shorter side already S: no resize, crop columns S/2 .. 3S/2
    assert torch.equal(t(wide), to_normalized_tensor(wide.crop((S // 2, 0, S // 2 + S, S))))
    tall = make_image(5, (S, 3 * S))
    assert torch.equal(t(tall), to_normalized_tensor(tall.crop((0, S, S, 2 * S))))
    square = make_image(6, (S, S))
    assert torch.equal(t(square, gen(0)), t(square, gen(1)))
    assert torch.equal(t(square), to_normalized_tensor(square))
    big = make_image(7, (4 * S, 2 * S))  # resize to (2S, S) bicubic, then the centre S x S
    ref = big.resize((2 * S, S), Image.Resampling.BICUBIC).crop((S // 2, 0, S // 2 + S, S))
    assert torch.equal(t(big), to_normalized_tensor(ref))


def test_crop_boxes_follow_the_random_resized_crop_rule():
    W, H = 100, 80
    g = gen(0)
    areas, aspects = [], []
    for _ in range(2000):
        left, top, w, h = random_resized_crop_box(W, H, g)
        assert 0 <= left and left + w <= W and 0 <= top and top + h <= H and w > 0 and h > 0
        areas.append(w * h / (W * H))
        aspects.append(w / h)
    # rounding to whole pixels moves the bounds by about one pixel's worth
    assert min(areas) >= 0.5 - 0.03 and max(areas) <= 1.0
    assert min(aspects) >= 3 / 4 - 0.03 and max(aspects) <= 4 / 3 + 0.03
    assert min(areas) < 0.53 and max(areas) > 0.95  # the whole range is used
    assert sum(a < 0.75 for a in areas) / len(areas) > 0.3  # roughly uniform in area
    # fallback (no box fits a very wide image with ratio near 1): centred, aspect clamped to 4/3
    left, top, w, h = random_resized_crop_box(400, 10, gen(1), scale=(0.9, 1.0), ratio=(1.0, 4 / 3))
    assert (w, h) == (13, 10) and left == (400 - 13) // 2 and top == 0


def test_full_crop_equals_a_plain_resize_and_flip_is_half_the_time():
    S = 20
    img = make_image(8, (50, 40))
    t = ImageTransform(S, scale=(1.0, 1.0), ratio=(50 / 40, 50 / 40))
    plain = to_normalized_tensor(img.resize((S, S), Image.Resampling.BICUBIC))
    flipped = plain.flip(-1)
    n_flip = 0
    for s in range(200):
        x = t(img, gen(s))
        if torch.equal(x, flipped):
            n_flip += 1
        else:
            assert torch.equal(x, plain)
    assert 70 < n_flip < 130
    never = ImageTransform(S, scale=(1.0, 1.0), ratio=(50 / 40, 50 / 40), flip_p=0.0)
    assert all(torch.equal(never(img, gen(s)), plain) for s in range(20))


def test_normalisation_statistics():
    mean_rgb = tuple(round(m * 255) for m in CLIP_MEAN)
    x = ImageTransform(16)(Image.new("RGB", (30, 20), mean_rgb), gen(0))
    assert x.abs().max() < 1 / 255 / min(CLIP_STD)  # the CLIP mean colour maps to ~0
    white = ImageTransform(16, train=False)(Image.new("RGB", (16, 16), (255, 255, 255)))
    assert torch.allclose(white, ((1 - MEAN) / STD).expand(3, 16, 16))
    # uniform noise: per-channel mean and std follow (0.5 - m) / s and (1/sqrt(12)) / s
    noise = Image.frombytes("RGB", (256, 256), torch.randint(0, 256, (256 * 256 * 3,), generator=gen(2),
                                                             dtype=torch.uint8).numpy().tobytes())
    y = to_normalized_tensor(noise)
    for c in range(3):
        assert math.isclose(y[c].mean().item(), (0.5 - CLIP_MEAN[c]) / CLIP_STD[c], abs_tol=0.02)
        assert math.isclose(y[c].std().item(), (1 / math.sqrt(12)) / CLIP_STD[c], rel_tol=0.02)


def test_decode_image_modes_and_jpeg_draft():
    rgb = make_image(9, (40, 30))
    for mode in ("L", "RGBA", "P", "CMYK"):
        fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
        img = decode_image(encode(rgb.convert(mode), fmt))
        assert img.mode == "RGB" and img.size == (40, 30)
    assert decode_image(encode(rgb, "WEBP")).size == (40, 30)
    big = encode(make_image(10, (800, 600)), "JPEG")
    full = decode_image(big)
    small = decode_image(big, min_side=64)
    assert full.size == (800, 600)
    assert small.size == (100, 75)  # 1/8 scale: the largest reduction with the shorter side >= 64
    assert decode_image(big, min_side=500).size == (800, 600)
    assert decode_image(encode(rgb, "PNG"), min_side=8).size == (40, 30)  # draft is JPEG-only
    with pytest.raises(Exception):
        decode_image(b"\x89PNG\r\n\x1a\n garbage")


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="scale=\\(0.0, 1.0\\)"):
        ImageTransform(scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="size=0"):
        ImageTransform(0)
    with pytest.raises(ValueError, match="flip_p=2"):
        ImageTransform(flip_p=2)


# ------------------------------------------------------------------------------------------------ the tower's pixels
def test_squash_resize_and_the_given_statistics():
    from blip2fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    rng = np.random.default_rng(5)
    img = Image.fromarray(rng.integers(0, 255, (23, 41, 3), dtype=np.uint8))
    t = ImageTransform(16, train=False, resize="squash", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    ref = torch.from_numpy(np.array(img.resize((16, 16), Image.Resampling.BICUBIC), dtype=np.float64)).permute(2, 0, 1)
    ref = (ref / 255 - torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    torch.testing.assert_close(t(img).double(), ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="resize"):
        ImageTransform(16, resize="stretch")


def test_tower_preprocess_reads_the_folder_or_uses_clip_statistics(tmp_path):
    import json

    from blip2fast.config import VisionConfig
    from blip2fast.data.transforms import tower_preprocess

    eva = tower_preprocess(VisionConfig(kind="eva", image_size=224))
    assert (eva.mean, eva.std, eva.resize, eva.size) == (CLIP_MEAN, CLIP_STD, "squash", 224)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"do_center_crop": True, "crop_size": {"height": 196, "width": 196}, "size": {"shortest_edge": 256},
         "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}))
    hf = tower_preprocess(VisionConfig(kind="hf", hf_path=str(tmp_path), image_size=196))
    assert (hf.mean, hf.std, hf.resize, hf.size) == ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "crop", 196)
    assert hf.source.endswith("preprocessor_config.json")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_center_crop": False, "size": {
        "height": 64, "width": 64}, "image_mean": 0.5, "image_std": 0.5}))
    flat = tower_preprocess(VisionConfig(kind="hf", hf_path=str(tmp_path), image_size=64))
    assert (flat.mean, flat.std, flat.resize) == ((0.5,) * 3, (0.5,) * 3, "squash")
