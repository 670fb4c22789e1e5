"""`python -m blip2fast.data.write_shards`: a folder of images + a caption file -> webdataset shards.

    python -m blip2fast.data.write_shards --images coco/train2014 --captions coco/captions_train2014.json \\
        --out shards/coco --shard_size 1000

Caption files:
- COCO-style JSON: {"images": [{"id", "file_name"}, ...], "annotations": [{"image_id", "caption"}, ...]};
- a JSON list: [{"image": file name, "caption": str or [str, ...]}, ...];
- CSV with a header naming the columns `image` and `caption` (others are ignored).
File names are relative to --images. Every caption of an image (several annotations, entries or rows) goes into
one sample.

Output (the img2dataset layout the loader reads): `000000.tar`, `000001.tar`, ... each with up to --shard_size
samples `<key>.<jpg|png|webp>` (the image file's bytes, unchanged) + `<key>.json` ({"captions": [...], "image":
file name, and "image_id" for COCO}); keys are a running 9-digit index. Images are written in a shuffled order
(--shuffle_seed; --no_shuffle keeps the caption file's order), so no shard holds one slice of the source. Shards
are written to a temporary name and renamed, with fixed tar metadata (same inputs -> same bytes), and
`summary.json` (counts, the brace pattern of the shards) is written last: its presence means the set is complete.

Images that are missing, have an unsupported extension, have no non-empty caption (or with --verify, do not
decode) are skipped and reported; captions for unknown COCO image ids are reported.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import re
import tarfile
from typing import Callable, Iterable, Optional, Sequence

IMAGE_EXT = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
SHARD_NAME = "{:06d}.tar"
_SHARD_RE = re.compile(r"^\d{6}\.tar$")
SUMMARY = "summary.json"


# ------------------------------------------------------------------------------------------------ caption files
def _need(cond: bool, path: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{path}: {msg}")


def _add(entries: dict, name, caps, meta: dict, path: str, where: str) -> None:
    _need(isinstance(name, str) and name != "", path, f"{where}: the image name must be a non-empty string, "
                                                      f"got {name!r}")
    if isinstance(caps, str):
        caps = [caps]
    _need(isinstance(caps, list) and all(isinstance(c, str) for c in caps), path,
          f"{where}: caption must be a string or a list of strings, got {caps!r}")
    entry = entries.setdefault(name, {"captions": [], **meta})
    entry["captions"].extend(caps)


def read_caption_file(path: str) -> tuple[list[dict], dict]:
    """-> (entries in first-appearance order: {"image": name, "captions": [...], ...}, problems), where problems
    lists the COCO annotations whose image id is unknown (`unknown_image_ids`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--captions {path!r}: no such file")
    ext = os.path.splitext(path)[1].lower()
    entries: dict = {}
    problems: dict = {"unknown_image_ids": []}
    if ext == ".json":
        try:
            with open(path, encoding="utf-8-sig") as f:
                obj = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid UTF-8 JSON ({e})") from None
        if isinstance(obj, dict):
            _need("images" in obj and "annotations" in obj, path,
                  f"a JSON object must be COCO-style with 'images' and 'annotations' (found keys {sorted(obj)[:8]})")
            by_id = {}
            for i, im in enumerate(obj["images"]):
                _need(isinstance(im, dict) and "id" in im and "file_name" in im, path,
                      f"images[{i}] needs 'id' and 'file_name', got {im!r}")
                by_id[im["id"]] = im["file_name"]
                _add(entries, im["file_name"], [], {"image_id": im["id"]}, path, f"images[{i}]")
            for i, ann in enumerate(obj["annotations"]):
                _need(isinstance(ann, dict) and "image_id" in ann and "caption" in ann, path,
                      f"annotations[{i}] needs 'image_id' and 'caption', got {ann!r}")
                if ann["image_id"] not in by_id:
                    problems["unknown_image_ids"].append(ann["image_id"])
                    continue
                _add(entries, by_id[ann["image_id"]], ann["caption"], {}, path, f"annotations[{i}]")
        elif isinstance(obj, list):
            for i, item in enumerate(obj):
                _need(isinstance(item, dict) and "image" in item and ("caption" in item or "captions" in item), path,
                      f"entry [{i}] needs 'image' and 'caption', got {item!r}")
                _add(entries, item["image"], item.get("caption", item.get("captions")), {}, path, f"entry [{i}]")
        else:
            raise ValueError(f"{path}: expected a COCO-style object or a list of {{'image', 'caption'}} entries, "
                             f"got a JSON {type(obj).__name__}")
    elif ext == ".csv":
        try:
            with open(path, encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f)
                header = reader.fieldnames or []
                _need("image" in header and "caption" in header, path,
                      f"the CSV header must name the columns 'image' and 'caption', got {header}")
                for i, row in enumerate(reader):
                    _add(entries, row["image"], row["caption"] or "", {}, path, f"row {i + 2}")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 ({e})") from None
    else:
        raise ValueError(f"--captions {path!r}: unsupported extension {ext!r} (use .json or .csv)")
    return [{"image": name, **entry} for name, entry in entries.items()], problems


# ------------------------------------------------------------------------------------------------ writing
def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def shard_pattern(out: str, shard_names: Sequence[str]) -> Optional[str]:
    """The loader's address of shards written by write_samples: the one file, a brace pattern over several, or None
    when there are none."""
    n = len(shard_names)
    if n <= 1:
        return os.path.join(out, shard_names[0]) if n else None
    return os.path.join(out, "{" + f"{0:06d}..{n - 1:06d}" + "}.tar")


def write_samples(out: str, samples: Iterable[tuple], shard_size: int) -> list[str]:
    """Write (image bytes, image extension, captions, extra json fields) tuples as 000000.tar, 000001.tar, ... in
    `out` (which must exist), up to `shard_size` samples each, keys a running 9-digit index; each shard is
    written under a temporary name and renamed. Returns the shard file names. Usable on its own, e.g. to write
    generated images without going through files."""
    names: list[str] = []
    tar: Optional[tarfile.TarFile] = None
    tmp = ""
    try:
        for i, (data, ext, captions, meta) in enumerate(samples):
            if ext not in IMAGE_EXT.values():
                raise ValueError(f"image extension {ext!r} must be one of {sorted(set(IMAGE_EXT.values()))}")
            if i % shard_size == 0:
                if tar is not None:
                    tar.close()
                    tar = None
                    os.replace(tmp, os.path.join(out, names[-1]))
                names.append(SHARD_NAME.format(len(names)))
                tmp = os.path.join(out, f".{names[-1]}.tmp")
                tar = tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT)
            key = f"{i:09d}"
            _add_member(tar, f"{key}.{ext}", data)
            _add_member(tar, f"{key}.json", json.dumps({"captions": list(captions), **meta},
                                                       ensure_ascii=False).encode("utf-8"))
        if tar is not None:
            tar.close()
            tar = None
            os.replace(tmp, os.path.join(out, names[-1]))
    finally:
        if tar is not None:  # interrupted: no half-written shard is left behind
            tar.close()
            os.remove(tmp)
    return names


def _decodes(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
        return True
    except Exception:
        return False


def _show(items: Sequence, n: int = 10) -> str:
    shown = ", ".join(str(x) for x in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def write_shards(images: str, captions: str, out: str, shard_size: int = 1000, shuffle_seed: Optional[int] = 0,
                 overwrite: bool = False, verify: bool = False, log: Callable[[str], None] = print) -> dict:
    """Write the shards; returns the summary (also written to out/summary.json). shuffle_seed=None keeps the
    caption file's order."""
    if not os.path.isdir(images):
        raise FileNotFoundError(f"--images {images!r}: not a directory")
    if shard_size < 1:
        raise ValueError(f"--shard_size {shard_size}: must be >= 1")
    entries, problems = read_caption_file(captions)
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {out!r}: exists and is not a directory")
    os.makedirs(out, exist_ok=True)
    old = sorted(f for f in os.listdir(out) if _SHARD_RE.match(f) or f == SUMMARY)
    if old and not overwrite:
        raise FileExistsError(f"--out {out!r} already holds shards ({_show(old, 3)}); pass --overwrite to replace "
                              "them")
    for f in old:
        os.remove(os.path.join(out, f))

    skipped = {"missing": [], "unsupported": [], "no_caption": [], "undecodable": []}
    todo = []
    for e in entries:
        e["captions"] = [c for c in e["captions"] if c.strip()]
        path = os.path.join(images, e["image"])
        ext = IMAGE_EXT.get(os.path.splitext(e["image"])[1].lower())
        if not e["captions"]:
            skipped["no_caption"].append(e["image"])
        elif ext is None:
            skipped["unsupported"].append(e["image"])
        elif not os.path.isfile(path):
            skipped["missing"].append(e["image"])
        elif verify and not _decodes(path):
            skipped["undecodable"].append(e["image"])
        else:
            todo.append((e, path, ext))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(todo)

    def samples():
        for e, path, ext in todo:
            with open(path, "rb") as f:
                data = f.read()
            yield data, ext, e["captions"], {k: v for k, v in e.items() if k != "captions"}

    shard_names = write_samples(out, samples(), shard_size)
    n, pattern = len(shard_names), shard_pattern(out, shard_names)
    summary = {"shards": n, "samples": len(todo), "captions": sum(len(e["captions"]) for e, _, _ in todo),
               "pattern": pattern, "shard_size": shard_size, "source_images": len(entries),
               "skipped": {k: len(v) for k, v in skipped.items()}, "skipped_files": skipped,
               "unknown_image_ids": len(problems["unknown_image_ids"])}
    tmp = os.path.join(out, f".{SUMMARY}.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(out, SUMMARY))

    log(f"write_shards: {summary['samples']} of {len(entries)} images with {summary['captions']} captions -> "
        f"{n} shard(s) in {out}" + (f"; pattern {pattern}" if pattern else ""))
    labels = {"missing": "image file(s) not found under " + images, "unsupported": "unsupported image type(s) "
              "(use .jpg/.jpeg/.png/.webp)", "no_caption": "image(s) without a non-empty caption",
              "undecodable": "image(s) that do not decode"}
    for k, names in skipped.items():
        if names:
            log(f"  skipped {len(names)} {labels[k]}: {_show(names)}")
    if problems["unknown_image_ids"]:
        log(f"  ignored {len(problems['unknown_image_ids'])} caption(s) for unknown image ids: "
            f"{_show(problems['unknown_image_ids'])}")
    return summary


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m blip2fast.data.write_shards", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", required=True, help="folder the caption file's image names are relative to")
    p.add_argument("--captions", required=True, help="COCO-style .json, a .json list, or a .csv (image,caption)")
    p.add_argument("--out", required=True, help="output folder for 000000.tar, ... and summary.json")
    p.add_argument("--shard_size", type=int, default=1000, help="samples (images) per shard")
    p.add_argument("--shuffle_seed", type=int, default=0, help="seed of the image order across shards")
    p.add_argument("--no_shuffle", action="store_true", help="keep the caption file's order")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--verify", action="store_true", help="decode every image and skip those that fail (slower)")
    args = p.parse_args(argv)
    try:
        return write_shards(args.images, args.captions, args.out, args.shard_size,
                            None if args.no_shuffle else args.shuffle_seed, args.overwrite, args.verify)
    except (ValueError, OSError) as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
