"""Fixtures for the data tests: small generated images, caption files, clean and corrupt shard sets."""
from __future__ import annotations

import io
import json
import os
import random
import tarfile

import pytest
from PIL import Image, ImageDraw

from blip2fast.data.write_shards import write_shards
from tests.helpers import LAVIS_TINY

BERT_DIR = os.path.join(LAVIS_TINY, "tokenizer")
WORDS = ("red", "green", "blue", "big", "small", "circle", "square", "dog", "cat", "on", "a", "the", "grass")


def make_image(seed: int, size=(48, 40)) -> Image.Image:
    """A noisy background with a coloured rectangle and ellipse: not constant, different per seed."""
    rng = random.Random(seed)
    img = Image.effect_noise(size, 40).convert("RGB")
    d = ImageDraw.Draw(img)
    w, h = size
    d.rectangle([rng.randrange(w // 2), rng.randrange(h // 2), w - rng.randrange(w // 3), h - 1],
                fill=tuple(rng.randrange(256) for _ in range(3)))
    d.ellipse([0, 0, rng.randrange(w // 4, w), rng.randrange(h // 4, h)], outline=(255, 255, 255))
    return img


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


def caption_for(i: int, j: int) -> str:
    rng = random.Random(i * 100 + j)
    return "A " + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 7))) + "."


def make_image_folder(root, n: int) -> list[str]:
    """n images, alternately PNG and JPEG, with varied sizes; returns the file names."""
    os.makedirs(root, exist_ok=True)
    names = []
    for i in range(n):
        ext, fmt = (".png", "PNG") if i % 2 else (".jpg", "JPEG")
        name = f"img_{i:03d}{ext}"
        make_image(i, (40 + 3 * (i % 7), 32 + 5 * (i % 5))).save(os.path.join(root, name), format=fmt)
        names.append(name)
    return names


def coco_json(path, names, missing=(), unknown_ids=()) -> dict:
    """COCO-style captions: image i has 1 + i % 3 captions; `missing` names are listed but not on disk."""
    images = [{"id": 1000 + i, "file_name": n} for i, n in enumerate(list(names) + list(missing))]
    anns = [{"image_id": im["id"], "caption": caption_for(i, j)} for i, im in enumerate(images)
            for j in range(1 + i % 3)]
    anns += [{"image_id": u, "caption": "orphan caption"} for u in unknown_ids]
    obj = {"images": images, "annotations": anns}
    with open(path, "w") as f:
        json.dump(obj, f)
    return obj


def tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def bert_dir() -> str:
    return BERT_DIR


@pytest.fixture(scope="session")
def clean_shards(tmp_path_factory) -> dict:
    """24 images (PNG + JPEG) with 1-3 COCO captions each -> 5 shards of up to 5 samples."""
    root = tmp_path_factory.mktemp("clean")
    names = make_image_folder(root / "images", 24)
    coco_json(root / "captions.json", names)
    summary = write_shards(str(root / "images"), str(root / "captions.json"), str(root / "shards"), shard_size=5,
                           log=lambda s: None)
    return {"root": root, "names": names, "summary": summary, "pattern": summary["pattern"]}


# The corrupt set: 4 shards of good samples with bad ones mixed in, one shard cut inside a member, and one file
# that is not a tar at all. EXPECTED_SKIPS / EXPECTED_SHARD_ERRORS are what one epoch must count.
GOOD_PER_SHARD = 18
EXPECTED_SKIPS = {"truncated": 1, "missing_image": 1, "missing_caption": 1, "bad_text": 2, "empty_caption": 2,
                  "bad_image": 2, "untokenizable": 0}
EXPECTED_SHARD_ERRORS = {"unreadable": 1, "truncated": 1, "bad_header": 0, "empty": 0}


@pytest.fixture(scope="session")
def corrupt_shards(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("corrupt")
    good, bad = [], []
    key = 0

    def add_good(tar, shard, multi=False):
        nonlocal key
        k = f"{key:06d}"
        key += 1
        img = make_image(key, (36 + key % 5, 30 + key % 3))
        tar_add(tar, f"{k}.jpg", encode(img, "JPEG"))
        if multi:
            tar_add(tar, f"{k}.json", json.dumps({"captions": [caption_for(key, 0), caption_for(key, 1)]}).encode())
        else:
            tar_add(tar, f"{k}.txt", caption_for(key, 0).encode())
        good.append(f"{shard}/{k}")

    def add_bad(tar, shard, reason, members):
        nonlocal key
        k = f"{key:06d}"
        key += 1
        for ext, data in members:
            tar_add(tar, f"{k}.{ext}", data)
        bad.append((f"{shard}/{k}", reason))

    jpg = encode(make_image(7), "JPEG")
    bad_members = [
        ("bad_image", [("jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg"), ("txt", b"a fine caption")]),
        ("empty_caption", [("png", encode(make_image(8), "PNG")), ("txt", b"  ...  !!! ")]),
        ("bad_text", [("jpg", jpg), ("txt", "un chat \xe9t\xe9".encode("latin-1"))]),
        ("missing_caption", [("jpg", jpg)]),
        ("bad_image", [("png", encode(make_image(9), "PNG")[:60]), ("txt", b"a cut png")]),
        ("empty_caption", [("jpg", jpg), ("json", json.dumps({"captions": ["", "  ", ";;"]}).encode())]),
        ("bad_text", [("jpg", jpg), ("json", b"{not json")]),
        ("missing_image", [("txt", b"caption without an image")]),
    ]
    paths = []
    for s in range(4):
        path = str(root / f"shard-{s:02d}.tar")
        paths.append(path)
        with tarfile.open(path, "w") as tar:
            for i in range(GOOD_PER_SHARD):
                add_good(tar, path, multi=i % 3 == 0)
                if i % 5 == 2 and bad_members:
                    reason, members = bad_members.pop(0)
                    add_bad(tar, path, reason, members)
    # shard 4: three good samples, then one whose image member is cut mid-data (the file ends there)
    path = str(root / "shard-04.tar")
    paths.append(path)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for _ in range(3):
            add_good(tar, path)
        cut_at = buf.tell() + 512 + 100  # the next header, then 100 bytes of its data
        add_bad(tar, path, "truncated", [("jpg", jpg), ("txt", b"never complete")])
    with open(path, "wb") as f:
        f.write(buf.getvalue()[:cut_at])
    path = str(root / "shard-05.tar")  # not a tar at all
    paths.append(path)
    with open(path, "wb") as f:
        f.write(b"this is not a tar file\n" * 50)
    n_bad = len(bad)
    assert not bad_members and n_bad == sum(EXPECTED_SKIPS.values())
    return {"pattern": str(root / "shard-{00..05}.tar"), "good": good, "bad": bad, "paths": paths}
