"""Evaluation data: image-caption sets (annotation file + image folder, or webdataset shards) and VQAv2 questions.

Image-caption annotation files (local JSON), either layout:
  - COCO captions: {"images": [{"id", "file_name"}, ...], "annotations": [{"image_id", "caption"}, ...]}
  - Karpathy / LAVIS list (COCO and Flickr30K test splits): [{"image": "relative/path.jpg",
    "caption": str or [str, ...], "image_id": optional}, ...]; entries naming the same image are merged.
Image paths are relative to --images (absolute paths are used as they are).

Webdataset shards (`.tar`, brace patterns, "::"-joined): every sample that has an image and a caption, with *all*
of its captions (a `.txt` line each, or the `.json` "captions" list) and its key as the image id. Samples the
training pipeline would skip (no image, no caption, undecodable) are skipped and counted.

VQAv2: the official questions file ({"questions": [{"question_id", "image_id", "question"}], "data_subtype":
"val2014"}) or a list of such entries (optionally with "image": a relative path), and optionally the official
annotations file ({"annotations": [{"question_id", "answers": [{"answer"}, ...], "answer_type"}]}). A question's
image is its "image" path, else the first file that exists among COCO's names for its image id:
COCO_<subtype>_<id:012d>.jpg, <subtype>/COCO_<subtype>_<id:012d>.jpg, <id:012d>.jpg, <id>.jpg.

Images: the evaluation transform of LAVIS's BLIP-2 evaluation processors: resize to size x size (bicubic, the
aspect ratio is not kept), CLIP mean/std. `resize="crop"` gives the training pipeline's eval transform instead
(shorter side to size, centre crop).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..config import CLIP_MEAN, CLIP_STD
from ..data.captions import BadSample, sample_captions
from ..data.transforms import ImageTransform, decode_image

RESIZE_MODES = ("squash", "crop")
ImageSource = Union[str, Callable[[], bytes]]  # a file path, or a function returning the encoded bytes


# ------------------------------------------------------------------------------------------------ images
def image_transform(size: int, resize: str = "squash", mean: tuple = CLIP_MEAN,
                    std: tuple = CLIP_STD) -> Callable[[Image.Image], Tensor]:
    """The evaluation transform (picklable, for DataLoader workers): squash (both sides to `size`, bicubic: LAVIS's
    BLIP-2 eval processor) or crop (shorter side + centre crop), then the tower's normalisation."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize={resize!r}: use one of {RESIZE_MODES}")
    return ImageTransform(size=size, train=False, resize=resize, mean=tuple(mean), std=tuple(std))


def load_image(source: ImageSource) -> Image.Image:
    """RGB PIL image from a path or a bytes callable; errors name the file."""
    if isinstance(source, str):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"image {source!r} does not exist")
        with open(source, "rb") as f:
            data = f.read()
        where = source
    else:
        data, where = source(), getattr(source, "name", "a shard sample")
    try:
        return decode_image(data)
    except Exception as e:  # PIL raises many types on bad bytes
        raise ValueError(f"cannot decode image {where!r}: {type(e).__name__}: {e}") from None


class _Images(Dataset):
    def __init__(self, sources: Sequence[ImageSource], size: int, resize: str, mean: tuple, std: tuple):
        self.sources, self.transform = list(sources), image_transform(size, resize, mean, std)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> Tensor:
        return self.transform(load_image(self.sources[i]))


def image_batches(sources: Sequence[ImageSource], size: int, batch_size: int, resize: str = "squash",
                  num_workers: int = 0, mean: tuple = CLIP_MEAN, std: tuple = CLIP_STD):
    """Batches (B, 3, size, size) float32 of the images, in order (decoded in `num_workers` worker processes)."""
    return DataLoader(_Images(sources, size, resize, mean, std), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=torch.stack)


# ------------------------------------------------------------------------------------------------ captions
@dataclass
class CaptionSet:
    """Images and their reference captions (raw, as annotated)."""

    image_ids: list  # one id per image (int or str)
    images: list  # ImageSource per image
    captions: list  # list of captions per image (at least one each)
    skipped: dict = field(default_factory=dict)  # shard samples skipped, by reason

    def __post_init__(self):
        if not (len(self.image_ids) == len(self.images) == len(self.captions)):
            raise ValueError("image_ids, images and captions must have one entry per image")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int]) -> "CaptionSet":
        return CaptionSet([self.image_ids[i] for i in indices], [self.images[i] for i in indices],
                          [self.captions[i] for i in indices], dict(self.skipped))

    def limit(self, n: Optional[int]) -> "CaptionSet":
        return self if n is None else self.subset(range(min(n, len(self))))


def _read_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path!r} is not valid JSON: {e}") from None


def _join(folder: Optional[str], rel: str) -> str:
    if os.path.isabs(rel) or folder is None:
        return rel
    return os.path.join(folder, rel)


def load_caption_annotations(path: str, images_dir: Optional[str]) -> CaptionSet:
    """A COCO-captions or Karpathy/LAVIS-list annotation file (see the module docstring)."""
    if images_dir is not None and not os.path.isdir(images_dir):
        raise FileNotFoundError(f"image folder {images_dir!r} does not exist")
    obj = _read_json(path, "annotation file")
    ids, files, caps = [], [], []
    if isinstance(obj, dict) and "images" in obj and "annotations" in obj:
        index = {}
        for img in obj["images"]:
            if "id" not in img or "file_name" not in img:
                raise ValueError(f"{path!r}: every entry of 'images' needs 'id' and 'file_name'; got {img!r}")
            index[img["id"]] = len(ids)
            ids.append(img["id"])
            files.append(_join(images_dir, img["file_name"]))
            caps.append([])
        for ann in obj["annotations"]:
            if ann.get("image_id") not in index or not isinstance(ann.get("caption"), str):
                raise ValueError(f"{path!r}: annotation {ann!r} needs a known 'image_id' and a 'caption' string")
            caps[index[ann["image_id"]]].append(ann["caption"])
    elif isinstance(obj, list):
        index = {}
        for n, entry in enumerate(obj):
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or "caption" not in entry:
                raise ValueError(f"{path!r}: list entry {n} needs 'image' (a path) and 'caption' (str or list); "
                                 f"got {entry!r}")
            c = entry["caption"]
            c = [c] if isinstance(c, str) else c
            if not isinstance(c, list) or not all(isinstance(x, str) for x in c):
                raise ValueError(f"{path!r}: entry {n}'s caption must be a str or a list of str")
            key = entry["image"]
            if key not in index:
                index[key] = len(ids)
                ids.append(entry.get("image_id", key))
                files.append(_join(images_dir, key))
                caps.append([])
            caps[index[key]].extend(c)
    else:
        raise ValueError(f"{path!r} is neither COCO captions ({{'images', 'annotations'}}) nor a Karpathy/LAVIS list "
                         "of {'image', 'caption'} entries")
    empty = [i for i, c in zip(ids, caps) if not c]
    if empty:
        raise ValueError(f"{path!r}: {len(empty)} image(s) have no caption (e.g. {empty[:3]})")
    if not ids:
        raise ValueError(f"{path!r} lists no images")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(files)} images do not exist (e.g. {missing[:3]}); check "
                                f"--images={images_dir!r}")
    return CaptionSet(ids, files, caps)


class _ShardMember:
    """A picklable bytes source: one member of a shard (offset, size)."""

    def __init__(self, path: str, offset: int, size: int, key: str):
        self.path, self.offset, self.size, self.name = path, offset, size, f"{path}/{key}"

    def __call__(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


def load_caption_shards(urls: str, max_words: int = 50) -> CaptionSet:
    """Every usable sample of the shards with all of its captions (cleaned as in training); images are read
    lazily from the shard files."""
    from ..data.shards import IMAGE_EXTS, expand_shards, index_shard

    ids, images, caps = [], [], []
    skipped: Counter = Counter()
    for path in expand_shards(urls):
        samples, error = index_shard(path)
        if error is not None:
            skipped[f"shard_{error}"] += 1
        for raw in samples:
            try:
                if raw.reason is not None:
                    raise BadSample(raw.reason)
                ext = next((e for e in IMAGE_EXTS if e in raw.members), None)
                if ext is None:
                    raise BadSample("missing_image")
                texts = {}
                for t in ("txt", "json"):
                    if t in raw.members:
                        texts[t] = _ShardMember(path, *raw.members[t], raw.key)()
                caption_list = sample_captions(texts, max_words)
            except BadSample as bad:
                skipped[bad.reason] += 1
                continue
            ids.append(f"{os.path.basename(path)}/{raw.key}")
            images.append(_ShardMember(path, *raw.members[ext], raw.key))
            caps.append(caption_list)
    if not ids:
        raise ValueError(f"no usable samples in {urls!r} (skipped: {dict(skipped)})")
    return CaptionSet(ids, images, caps, dict(skipped))


def load_captions(data: str, images_dir: Optional[str], max_words: int = 50) -> CaptionSet:
    """--data: shard pattern(s) ending in .tar, or an annotation .json (with --images)."""
    if ".tar" in data and not data.endswith(".json"):
        return load_caption_shards(data, max_words)
    if data.endswith(".json"):
        if images_dir is None:
            raise ValueError(f"--data={data!r} is an annotation file: give --images=FOLDER with its images")
        return load_caption_annotations(data, images_dir)
    raise ValueError(f"--data={data!r}: give webdataset shards (a .tar path or brace pattern) or an annotation "
                     ".json file (COCO captions or a Karpathy/LAVIS list) with --images")


# ------------------------------------------------------------------------------------------------ VQA
@dataclass
class VQASet:
    question_ids: list
    questions: list  # str per question
    images: list  # ImageSource per question
    annotations: Optional[dict] = None  # question_id -> {"answers": [str], "answer_type": str}

    def __len__(self) -> int:
        return len(self.question_ids)

    def subset(self, indices: Sequence[int]) -> "VQASet":
        return VQASet([self.question_ids[i] for i in indices], [self.questions[i] for i in indices],
                      [self.images[i] for i in indices], self.annotations)

    def limit(self, n: Optional[int]) -> "VQASet":
        if n is None:
            return self
        out = self.subset(range(min(n, len(self))))
        if out.annotations is not None:
            keep = set(out.question_ids)
            out.annotations = {q: a for q, a in out.annotations.items() if q in keep}
        return out


def _coco_image(images_dir: str, image_id: Any, subtype: Optional[str]) -> str:
    names = []
    if isinstance(image_id, int) or (isinstance(image_id, str) and image_id.isdigit()):
        n = int(image_id)
        if subtype:
            names += [f"COCO_{subtype}_{n:012d}.jpg", os.path.join(subtype, f"COCO_{subtype}_{n:012d}.jpg")]
        names += [f"{n:012d}.jpg", f"{n}.jpg"]
    else:
        names.append(str(image_id))
    for name in names:
        p = os.path.join(images_dir, name)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"no image for image_id={image_id!r} in {images_dir!r} (looked for {names})")


def load_vqa(questions_path: str, images_dir: str, annotations_path: Optional[str] = None) -> VQASet:
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"image folder {images_dir!r} does not exist")
    obj = _read_json(questions_path, "VQA questions file")
    subtype = obj.get("data_subtype") if isinstance(obj, dict) else None
    entries = obj.get("questions") if isinstance(obj, dict) else obj
    if not isinstance(entries, list):
        raise ValueError(f"{questions_path!r}: expected {{'questions': [...]}} or a list of questions")
    qids, questions, images = [], [], []
    for n, q in enumerate(entries):
        if not isinstance(q, dict) or "question_id" not in q or not isinstance(q.get("question"), str):
            raise ValueError(f"{questions_path!r}: question {n} needs 'question_id' and 'question'; got {q!r}")
        if isinstance(q.get("image"), str):
            img = _join(images_dir, q["image"])
            if not os.path.isfile(img):
                raise FileNotFoundError(f"question {q['question_id']!r}: image {img!r} does not exist")
        elif "image_id" in q:
            img = _coco_image(images_dir, q["image_id"], subtype)
        else:
            raise ValueError(f"{questions_path!r}: question {q['question_id']!r} has neither 'image' nor 'image_id'")
        qids.append(q["question_id"])
        questions.append(q["question"])
        images.append(img)
    if not qids:
        raise ValueError(f"{questions_path!r} holds no questions")
    annotations = None
    if annotations_path is not None:
        ann_obj = _read_json(annotations_path, "VQA annotations file")
        anns = ann_obj.get("annotations") if isinstance(ann_obj, dict) else ann_obj
        if not isinstance(anns, list):
            raise ValueError(f"{annotations_path!r}: expected {{'annotations': [...]}} or a list")
        annotations = {}
        for a in anns:
            answers = a.get("answers") if isinstance(a, dict) else None
            if not isinstance(answers, list) or "question_id" not in a:
                raise ValueError(f"{annotations_path!r}: annotation needs 'question_id' and 'answers'; got {a!r}")
            texts = [x["answer"] if isinstance(x, dict) else x for x in answers]
            if not texts or not all(isinstance(t, str) for t in texts):
                raise ValueError(f"{annotations_path!r}: question {a['question_id']!r} has no usable answers")
            annotations[a["question_id"]] = {"answers": texts, "answer_type": a.get("answer_type")}
        asked = set(qids)
        annotations = {q: a for q, a in annotations.items() if q in asked}
        unanswered = [q for q in qids if q not in annotations]
        if unanswered:
            raise ValueError(f"{len(unanswered)} question(s) have no annotation in {annotations_path!r} (e.g. "
                             f"{unanswered[:3]}); pass the matching annotations file")
    return VQASet(qids, questions, images, annotations)
