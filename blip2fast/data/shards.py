"""Webdataset shards (img2dataset layout) -> batches of tensors, with exact skip counts and a resumable position.

Layout: uncompressed `.tar` files; consecutive members `<key>.<ext>` form one sample; the image is `jpg`, `jpeg`,
`png` or `webp`, the caption `txt` (one per line) or `json` (see `captions.py`). Paths are brace patterns
(`/data/{000000..000099}.tar`), several joined by "::".

Why not `webdataset.WebDataset`: its tar reader streams each shard and reports errors to a handler that does not
know which sample failed, so skips cannot be counted by reason, and its position (open tar streams, shuffle buffer)
cannot be saved. Here each shard is *indexed* when a worker opens it (member headers only, no image bytes), and
every random choice is a hash of integer counters. The format is the same: shards from img2dataset or
`write_shards` load in `webdataset.WebDataset`, and vice versa.

Streams. The loader runs S = max(1, num_workers) *streams* per rank; each builds whole batches (decode, augment,
tokenise in the worker) and the DataLoader takes them round-robin, so this rank's step s comes from stream s % S.
A stream keeps `mix_shards` shard *visits* open and draws each sample from one of them (slot = hash(seed, rank,
stream, draw) % slots); a visit reads its shard in a buffered-shuffle order (`shuffle_buffer` samples wide: the
order of the shard's n samples is a function of n and hash(seed, visit tag, shard) alone, the visit tag being
(rank, stream, visit) when resampled and the epoch otherwise).
- resampled (step-based training): visit v of (rank, stream) reads shard hash(seed, rank, stream, v) % n_shards,
  with replacement, forever (as open_clip's ResampledShards, with the seed made explicit).
- not resampled (epochs, evaluation): epoch e's shard order is a permutation seeded by (seed, e) (or the given
  order when shuffle=False), split by rank (`[rank::world]`) then by stream (`[stream::S]`): every sample is read
  exactly once per epoch across all ranks and workers (given at least world x S shards).

Data position. After each batch, its stream's state comes back with it: batches built, draws made, next visit, and
per open slot (visit, samples consumed), plus the stream's skip counters. `ShardLoader.state_dict()` holds the
latest state of every stream plus the number of batches yielded (k): a JSON-able dict of ints. Restoring re-indexes
each open slot's shard, recomputes its order and continues after `consumed` samples (no image is decoded twice),
and rotates the worker -> stream map by k % S, so the batch stream from step k is the one an uninterrupted run
yields from step k, batch for batch. Resuming needs the same shard list, seed, world size, num_workers and
shuffle settings (checked; the shards' contents are assumed unchanged). The batch size may change.
Samples keep their per-visit randomness: the caption choice and the augmentation of a sample are seeded by
(seed, its visit, its key) (by (seed, epoch, key) in epoch mode: independent of how shards are split).
In epoch mode with streams of unequal length, batches after the first stream runs dry may come in another order
after a resume (the same batches).

Bad samples never stop a run: each is skipped and counted once, by the first reason that applies:
  truncated        a member cut short by the end of the file
  missing_image    no jpg/jpeg/png/webp member
  missing_caption  no txt/json member, or a json without "caption"/"captions"
  bad_text         not UTF-8, json that does not parse, captions of the wrong type
  empty_caption    nothing left after cleaning
  bad_image        PIL cannot decode the image bytes
  untokenizable    the text encoder cannot encode the caption (e.g. a word outside the demo tokenizer's vocabulary)
and shard events, counted when a visit closes: unreadable (cannot open / not a tar), truncated (ends without the
end-of-archive block or inside a member), bad_header (a corrupt header after the first member), empty (a tar with
no sample). Counts ride with the batches, so the totals the loader reports are exact for the batches it has
yielded, with any num_workers.

Bad data never hangs a run either. The loader checks at start the shards its streams open first (a readable tar
with at least one sample; a directory, a missing path and a non-tar file each have their own message): unusable
ones are reported and later skipped and counted; none usable is a `DataError`. A stream that finds every shard
empty or unreadable stops with a `DataError`. Any failure inside a stream (in a worker or in-process) reaches the
caller as one `DataError` line naming the shard and the reason, and the workers are shut down.

No image repeats inside a batch (resampled mode: several open visits of one shard could otherwise draw the same
sample): a draw already in the batch being built is passed over (counted as `duplicates` in the stream state),
unless the shards hold fewer samples than a batch, which the loader reports at start.
"""
from __future__ import annotations

import dataclasses
import os
import random
import tarfile
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .captions import MAX_WORDS, BadSample, choose_caption, sample_captions, stable_hash
from .tokenize import TextEncoder
from ..config import CLIP_MEAN, CLIP_STD
from .transforms import ImageTransform, decode_image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample has several
SAMPLE_REASONS = ("truncated", "missing_image", "missing_caption", "bad_text", "empty_caption", "bad_image",
                  "untokenizable")
SHARD_REASONS = ("unreadable", "truncated", "bad_header", "empty")
STATE_VERSION = 1
# consecutive draws passed over as repeats before a stream accepts one: only reached when the open visits hold
# barely a batch of distinct samples; a bound, so that building a batch always ends
_MAX_REPEAT_STREAK_PER_SAMPLE = 64


class DataError(ValueError):
    """The data cannot feed the run: the message is one line naming the shard(s) and the reason."""


class TextEncoderMismatch(DataError):
    """The text encoder cannot encode the captions of the data at all (checked at start)."""


def one_line(text: str, limit: int = 400) -> str:
    """`text` on one line, cut to `limit` characters (error messages from libraries can span many lines)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


@dataclass(frozen=True)
class WebDataConfig:
    """Where the shards are and how they become batches. Sizes are per rank."""

    urls: str = ""  # brace pattern(s) of local .tar shards, "::"-separated
    batch_size: int = 64  # samples per batch (per rank)
    image_size: int = 224  # output side (the vision tower's input size)
    num_workers: int = 2  # DataLoader worker processes; also the number of streams (0 -> one, in-process)
    prefetch_factor: int = 2  # batches prefetched per worker
    worker_timeout: float = 600.0  # seconds without a batch from the workers before a stuck one is an error; 0: wait
    seed: int = 0  # every shard choice, shuffle, caption choice and augmentation derives from it
    resampled: bool = True  # True: infinite stream of shards drawn with replacement; False: epochs
    shuffle: bool = True  # shuffle shard order (epochs), sample order within shards and across open shards
    shuffle_buffer: int = 1000  # buffered-shuffle width within one shard visit (>= shard size: full permutation)
    mix_shards: int = 4  # shard visits each stream draws from at once (cross-shard mixing); 1 without shuffle
    train: bool = True  # True: random crop/flip, random caption; False: resize + centre crop, first caption
    max_words: int = MAX_WORDS  # caption cleaning keeps at most this many words
    drop_last: bool = False  # epoch mode: drop each stream's last partial batch
    jpeg_draft: bool = True  # decode JPEGs at a reduced scale keeping the shorter side >= 2 x image_size
    mean: tuple = CLIP_MEAN  # pixel normalisation: the tower's statistics (data.transforms.tower_preprocess)
    std: tuple = CLIP_STD
    resize: str = "crop"  # train=False: crop (shorter side + centre crop) or squash (both sides to image_size)

    def __post_init__(self):
        errs = []
        for name in ("batch_size", "image_size", "prefetch_factor", "shuffle_buffer", "mix_shards", "max_words"):
            if getattr(self, name) < 1:
                errs.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_workers < 0:
            errs.append(f"num_workers={self.num_workers} must be >= 0")
        if not self.worker_timeout >= 0:
            errs.append(f"worker_timeout={self.worker_timeout} must be >= 0 seconds (0: wait for ever)")
        if errs:
            raise ValueError("WebDataConfig: " + "; ".join(errs))

    def replace(self, **kw) -> "WebDataConfig":
        return dataclasses.replace(self, **kw)


# ------------------------------------------------------------------------------------------------ shard lists
def expand_shards(urls: Union[str, Sequence[str]]) -> list[str]:
    """Brace-expand a pattern (several joined by "::", or a list of patterns) into existing local .tar paths.
    Missing paths (FileNotFoundError), directories and non-.tar names (DataError) are errors that list them."""
    import braceexpand  # here, not at the top: the GPU machine lacks it, and the training step imports this module

    patterns = urls.split("::") if isinstance(urls, str) else list(urls)
    paths = [p for pat in patterns if pat.strip() for p in braceexpand.braceexpand(pat.strip())]
    if not paths:
        raise DataError(f"no shards: the pattern {urls!r} is empty")

    def show(bad):
        return ", ".join(repr(p) for p in bad[:5]) + (" ..." if len(bad) > 5 else "")

    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} shard(s) from {urls!r} do not exist: {show(missing)}")
    folders = [p for p in paths if os.path.isdir(p)]
    if folders:
        raise DataError(f"{len(folders)} shard path(s) from {urls!r} are directories, not .tar shards: "
                        f"{show(folders)}; give the shard files inside, e.g. "
                        f"'{os.path.join(folders[0].rstrip(os.sep), '{000000..000009}.tar')}'")
    bad_ext = [p for p in paths if not p.endswith(".tar")]
    if bad_ext:
        raise DataError(f"{len(bad_ext)} shard path(s) are not uncompressed .tar files: {show(bad_ext)}; compressed "
                        "shards cannot be indexed: decompress them")
    not_files = [p for p in paths if not os.path.isfile(p)]
    if not_files:
        raise DataError(f"{len(not_files)} shard path(s) are not regular files: {show(not_files)}")
    return paths


def probe_shard(path: str, want: int = 1) -> tuple[int, Optional[str]]:
    """(samples seen, problem or None), reading member headers until `want` samples are seen (cheap: no data).
    A problem is a phrase: "cannot be opened (...)", "is not a tar archive", "is an empty tar (no samples)". A
    shard damaged after its first samples has no problem here: the loader skips and counts the damage."""
    try:
        fh = open(path, "rb")
    except OSError as e:
        return 0, f"cannot be opened ({e.strerror or type(e).__name__})"
    keys: set = set()
    with fh:
        try:
            tf = tarfile.open(fileobj=fh, mode="r:")
        except (tarfile.TarError, EOFError, OSError):
            return 0, "is not a tar archive"
        try:
            for _, key, _ in sample_members(tf):
                keys.add(key)
                if len(keys) >= want:
                    break
        except (tarfile.TarError, EOFError, OSError):
            if not keys:
                return 0, "is not a tar archive (no readable member)"
    return len(keys), None if keys else "is an empty tar (no samples)"


def first_captions(path: str, count: int, max_words: int) -> list[str]:
    """The first caption of each of the first `count` samples of a shard that have one (for the start-up check
    that the text encoder fits the data); [] when the shard cannot be read."""
    out: list[str] = []
    try:
        with tarfile.open(path, "r:") as tf:
            current, texts = None, {}
            for info, key, ext in sample_members(tf):
                if len(out) >= count:
                    break
                if key != current:
                    out += _first_caption(texts, max_words) if texts else []
                    current, texts = key, {}
                if ext in ("txt", "json"):
                    texts[ext] = tf.extractfile(info).read()
            if texts and len(out) < count:
                out += _first_caption(texts, max_words)
    except (OSError, tarfile.TarError, EOFError):
        pass
    return out[:count]


def _first_caption(texts: dict, max_words: int) -> list[str]:
    try:
        return sample_captions(texts, max_words)[:1]
    except BadSample:
        return []


# ------------------------------------------------------------------------------------------------ shard index
@dataclass
class RawSample:
    key: str
    members: dict  # ext -> (data offset, size)
    reason: Optional[str] = None  # set when the sample is already known to be bad (truncated)


def _split_name(name: str) -> tuple[Optional[str], Optional[str]]:
    """'dir/000001.jpg' -> ('dir/000001', 'jpg'): the key ends at the first dot of the last path component."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:
        return None, None
    return name[:dot], name[dot + 1:].lower()


def sample_members(tf: tarfile.TarFile) -> Iterator[tuple]:
    """(header, key, ext) of a tar's sample files in file order, reading headers only: directories, names without
    an extension and webdataset metadata (`__key__`-style names) are passed over. The member list is cleared as it
    goes (shards are large; the caller keeps what it needs). Tar errors reach the caller."""
    while True:
        info = tf.next()
        if info is None:
            return
        tf.members.clear()
        if not info.isreg():
            continue
        key, ext = _split_name(info.name)
        base = key.rsplit("/", 1)[-1] if key else ""
        if key is None or (base.startswith("__") and base.endswith("__")):
            continue
        yield info, key, ext


def index_shard(path: str) -> tuple[list[RawSample], Optional[str]]:
    """Read a shard's member headers: (samples in file order, shard error or None). Never raises on bad data."""
    samples: list[RawSample] = []
    try:
        size = os.path.getsize(path)
        tf = tarfile.open(path, "r:")
    except (OSError, tarfile.TarError, EOFError):
        return samples, "unreadable"
    error = None
    current: Optional[RawSample] = None
    with tf:
        try:
            for info, key, ext in sample_members(tf):
                if current is None or key != current.key:
                    if current is not None:
                        samples.append(current)
                    current = RawSample(key, {})
                if info.offset_data + info.size > size:
                    current.reason, error = "truncated", "truncated"
                    break
                current.members.setdefault(ext, (info.offset_data, info.size))
            if error is None:  # a clean end is a full zero block where the next header would be
                tf.fileobj.seek(tf.offset)
                block = tf.fileobj.read(tarfile.BLOCKSIZE)
                if len(block) < tarfile.BLOCKSIZE:
                    error = "truncated"
                elif block.count(0) != tarfile.BLOCKSIZE:
                    error = "bad_header"
        except (tarfile.TarError, EOFError, OSError):
            error = "truncated"
    if current is not None:
        samples.append(current)
    return samples, error


def buffered_order(n: int, buffer: int, rng: random.Random) -> list[int]:
    """The order a `buffer`-wide shuffle buffer emits n items in: fill the buffer; then each new item replaces a
    uniformly chosen buffered one, which is emitted; finally the rest in random order. buffer >= n: a uniform
    permutation; buffer == 1: the identity. A function of (n, buffer, rng state) only."""
    if buffer <= 1:
        return list(range(n))
    out, buf = [], []
    for i in range(n):
        if len(buf) < buffer:
            buf.append(i)
            continue
        j = rng.randrange(buffer)
        out.append(buf[j])
        buf[j] = i
    rng.shuffle(buf)
    return out + buf


# ------------------------------------------------------------------------------------------------ one stream
class _Visit:
    """One open shard visit: its index, emission order and a file handle for reading members."""

    def __init__(self, visit: int, shard: int, path: str, order_seed: Optional[int], buffer: int, tag: str):
        self.visit, self.shard, self.path, self.tag = visit, shard, path, tag
        self.samples, self.error = index_shard(path)
        if not self.samples and self.error is None:
            self.error = "empty"
        rng = random.Random(order_seed)
        self.order = buffered_order(len(self.samples), buffer, rng) if order_seed is not None else \
            list(range(len(self.samples)))
        self.consumed = 0
        self._fh = None

    def exhausted(self) -> bool:
        return self.consumed >= len(self.order)

    def take(self) -> RawSample:
        s = self.samples[self.order[self.consumed]]
        self.consumed += 1
        return s

    def read(self, offset: int, size: int) -> bytes:
        try:
            if self._fh is None:
                self._fh = open(self.path, "rb")
            self._fh.seek(offset)
            data = self._fh.read(size)
        except OSError as e:  # the file went away or the disk failed under us: lose the sample, not the run
            raise BadSample("truncated", f"{self.path}: {e}") from None
        if len(data) != size:
            raise BadSample("truncated", f"{self.path}: member at byte {offset} is cut short")
        return data

    def close(self):
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _new_stream_state(stream: int, slots: int) -> dict:
    return {"stream": stream, "batches": 0, "draws": 0, "next_visit": 0, "slots": [[-1, 0] for _ in range(slots)],
            "bad_shards": [], "duplicates": 0, "done": False, "samples": 0,
            "skipped": dict.fromkeys(SAMPLE_REASONS, 0), "shard_errors": dict.fromkeys(SHARD_REASONS, 0)}


def _upgrade_state(state: dict) -> dict:
    """A stream state saved by an older version: the counters and fields added since start at zero."""
    state = _copy_state(state)
    state["skipped"] = {**dict.fromkeys(SAMPLE_REASONS, 0), **state["skipped"]}
    state["shard_errors"] = {**dict.fromkeys(SHARD_REASONS, 0), **state["shard_errors"]}
    state.setdefault("bad_shards", [])
    state.setdefault("duplicates", 0)
    state.pop("empty_streak", None)
    return state


def _epoch_shards(n_paths: int, cfg: WebDataConfig, rank: int, world: int, stream: int, num_streams: int,
                  epoch: int) -> list[int]:
    """Epoch mode: the shard indices stream `stream` of `rank` reads in epoch `epoch`, in order."""
    order = list(range(n_paths))
    if cfg.shuffle:
        random.Random(stable_hash("epoch", cfg.seed, epoch)).shuffle(order)
    return order[rank::world][stream::num_streams]


def _resampled_shard(n_paths: int, cfg: WebDataConfig, rank: int, stream: int, visit: int) -> int:
    """Resampled mode: the shard index of visit `visit` of (rank, stream)."""
    return stable_hash("shard", cfg.seed, rank, stream, visit) % n_paths


class _Stream:
    """Builds the batches of one stream from its state (see the module docstring)."""

    def __init__(self, paths: list[str], cfg: WebDataConfig, text: TextEncoder, rank: int, world: int,
                 stream: int, num_streams: int, epoch: int, state: Optional[dict], allow_repeats: bool = False):
        self.paths, self.cfg, self.text = paths, cfg, text
        self.rank, self.world, self.stream, self.num_streams, self.epoch = rank, world, stream, num_streams, epoch
        self.allow_repeats = allow_repeats
        self.reading: Optional[str] = None  # the shard of the sample in hand (named when something fails)
        self.num_slots = cfg.mix_shards if cfg.shuffle else 1
        self.state = _upgrade_state(state) if state is not None else _new_stream_state(stream, self.num_slots)
        self.transform = ImageTransform(cfg.image_size, train=cfg.train, mean=tuple(cfg.mean), std=tuple(cfg.std),
                                        resize=cfg.resize)
        if cfg.resampled:
            self.epoch_shards = None
        else:
            self.epoch_shards = _epoch_shards(len(paths), cfg, rank, world, stream, num_streams, epoch)
        self.open: list[Optional[_Visit]] = [None] * self.num_slots
        for k, (visit, consumed) in enumerate(self.state["slots"]):
            if visit >= 0:  # restore: re-index and skip what was consumed
                self.open[k] = self._open_visit(visit)
                self.open[k].consumed = consumed

    # -- shard visits
    def _visit_shard(self, visit: int) -> Optional[int]:
        if self.epoch_shards is None:
            return _resampled_shard(len(self.paths), self.cfg, self.rank, self.stream, visit)
        return self.epoch_shards[visit] if visit < len(self.epoch_shards) else None

    def _open_visit(self, visit: int) -> _Visit:
        cfg = self.cfg
        if self.epoch_shards is None:
            tag = f"r{self.rank}.s{self.stream}.v{visit}"
        else:
            tag = f"e{self.epoch}"  # each sample is visited once per epoch: (seed, epoch, key) is enough
        shard = self._visit_shard(visit)
        order_seed = stable_hash("order", cfg.seed, tag, shard) if cfg.shuffle else None
        self.reading = self.paths[shard]
        return _Visit(visit, shard, self.paths[shard], order_seed, cfg.shuffle_buffer, tag)

    def _close(self, k: int) -> None:
        v = self.open[k]
        if v.error is not None:
            self.state["shard_errors"][v.error] += 1
        v.close()
        self.open[k] = None
        self.state["slots"][k] = [-1, 0]

    def _refill(self, k: int) -> bool:
        """Give slot k an unexhausted visit; False when the epoch has no shards left for it."""
        st = self.state
        while self.open[k] is None or self.open[k].exhausted():
            if self.open[k] is not None:
                self._close(k)
            visit = st["next_visit"]
            if self._visit_shard(visit) is None:
                st["slots"][k] = [-2, 0]  # dead for the rest of the epoch
                return False
            st["next_visit"] = visit + 1
            v = self.open[k] = self._open_visit(visit)
            if v.exhausted():  # empty or unreadable: skipped (counted when it closes, above)
                if v.shard not in st["bad_shards"]:
                    st["bad_shards"] = sorted(st["bad_shards"] + [v.shard])
                if self.epoch_shards is None and len(st["bad_shards"]) == len(self.paths):
                    self._close(k)
                    raise DataError(f"no usable shard left: all {len(self.paths)} shard(s) are empty or unreadable "
                                    f"(last: {v.path!r}, {v.error})")
        return True

    def _draw(self) -> Optional[tuple[_Visit, RawSample]]:
        st = self.state
        while True:
            live = [k for k in range(self.num_slots) if st["slots"][k][0] != -2]
            if not live:
                return None
            k = live[stable_hash("slot", self.cfg.seed, self.rank, self.stream, st["draws"]) % len(live)]
            if self._refill(k):
                break
        visit = self.open[k]
        raw = visit.take()
        st["slots"][k] = [visit.visit, visit.consumed]
        st["draws"] += 1
        return visit, raw

    # -- samples and batches
    def _decode(self, visit: _Visit, raw: RawSample):
        if raw.reason is not None:
            raise BadSample(raw.reason)
        ext = next((e for e in IMAGE_EXTS if e in raw.members), None)
        if ext is None:
            raise BadSample("missing_image", f"members {sorted(raw.members)}")
        text_ext = "txt" if "txt" in raw.members else "json" if "json" in raw.members else None
        texts = {text_ext: visit.read(*raw.members[text_ext])} if text_ext else {}
        captions = sample_captions(texts, self.cfg.max_words)
        seed = self.cfg.seed if self.cfg.train else None
        caption = choose_caption(captions, seed, visit.tag, raw.key)
        data = visit.read(*raw.members[ext])
        try:
            img = decode_image(data, self.transform.draft_side if self.cfg.jpeg_draft else None)
        except Exception as e:  # PIL raises many types on bad bytes; any of them means "skip this image"
            raise BadSample("bad_image", f"{type(e).__name__}: {e}") from None
        gen = torch.Generator().manual_seed(stable_hash("augment", self.cfg.seed, visit.tag, raw.key) >> 1)
        return self.transform(img, gen), caption, f"{visit.path}/{raw.key}"

    def _batch_id(self) -> int:
        return stable_hash("batch", self.cfg.seed, self.epoch, self.rank, self.stream, self.state["batches"]) >> 1

    def _encode(self, captions: list) -> tuple[Optional[dict], list[int]]:
        """(the text encoder's tensors, []) or, when it fails on the batch, (None, rows it cannot encode alone).
        A failure that no single caption reproduces is the encoder's own: a DataError."""
        try:
            return self.text(captions, self._batch_id()), []
        except Exception as batch_error:  # tokenizers raise many types; find the captions that cause it
            bad = []
            for i, caption in enumerate(captions):
                try:
                    self.text([caption], 0)
                except Exception:
                    bad.append(i)
            if not bad:
                raise DataError(f"the text encoder fails on a batch of {len(captions)} captions (from "
                                f"{self.reading!r}) that it encodes one by one: "
                                f"{type(batch_error).__name__}: {one_line(batch_error)}") from None
            return None, bad

    def _emit(self, images, captions, keys, text: dict) -> dict:
        out = {"pixel_values": torch.stack(images), **text, "captions": captions, "keys": keys}
        self.state["batches"] += 1
        self.state["samples"] += len(captions)
        out["_state"] = _copy_state(self.state)
        return out

    def batches(self) -> Iterator[dict]:
        try:
            yield from self._batches()
        finally:  # a consumer that stops early (the held-out batch) closes the shards' files now, not at GC
            for visit in self.open:
                if visit is not None:
                    visit.close()

    def _batches(self) -> Iterator[dict]:
        st = self.state
        if st["done"]:
            return
        B = self.cfg.batch_size
        images, captions, keys = [], [], []
        repeat_streak, max_repeat_streak = 0, _MAX_REPEAT_STREAK_PER_SAMPLE * B

        def encoded():
            """The batch's text tensors, or None after dropping (and counting) captions the encoder refuses."""
            text, bad = self._encode(captions)
            for i in reversed(bad):
                st["skipped"]["untokenizable"] += 1
                del images[i], captions[i], keys[i]
            return text

        while True:
            drawn = self._draw()
            if drawn is None:
                break
            visit, raw = drawn
            self.reading = visit.path
            if (not self.allow_repeats and f"{visit.path}/{raw.key}" in keys
                    and repeat_streak < max_repeat_streak):
                st["duplicates"] += 1  # the same sample from another open visit of its shard: not in this batch
                repeat_streak += 1
                continue
            repeat_streak = 0
            try:
                image, caption, key = self._decode(visit, raw)
            except BadSample as bad:
                st["skipped"][bad.reason] += 1
                continue
            images.append(image)
            captions.append(caption)
            keys.append(key)
            if len(images) == B:
                text = encoded()
                if text is not None:
                    yield self._emit(images, captions, keys, text)
                    images, captions, keys = [], [], []
        # epoch mode only: the stream ran dry
        while images and not self.cfg.drop_last:
            text = encoded()
            if text is not None:
                yield self._emit(images, captions, keys, text)
                break
        st["done"] = True
        yield {"_state": _copy_state(st)}  # the final counts; the loader consumes it, it is not a batch


def _copy_state(s: dict) -> dict:
    return {**s, "slots": [list(x) for x in s["slots"]], "skipped": dict(s["skipped"]),
            "shard_errors": dict(s["shard_errors"]), "bad_shards": list(s.get("bad_shards", []))}


# ------------------------------------------------------------------------------------------------ dataset
class _ShardIterable(IterableDataset):
    """What each DataLoader worker iterates: the stream (worker + rotation) % S, from its saved state."""

    def __init__(self, paths, cfg, text, rank, world, num_streams, epoch, rotation, states, allow_repeats):
        self.paths, self.cfg, self.text = paths, cfg, text
        self.rank, self.world, self.num_streams, self.epoch = rank, world, num_streams, epoch
        self.rotation, self.states, self.allow_repeats = rotation, states, allow_repeats

    def __iter__(self):
        info = get_worker_info()
        worker = 0 if info is None else info.id
        stream = (worker + self.rotation) % self.num_streams
        s = None
        try:
            s = _Stream(self.paths, self.cfg, self.text, self.rank, self.world, stream, self.num_streams,
                        self.epoch, self.states[stream], self.allow_repeats)
            yield from s.batches()
        except Exception as e:  # one line for the main process, which stops the loader and raises it there
            where = f"rank {self.rank}, stream {stream}" + ("" if info is None else f" (loader worker {worker})")
            shard = None if s is None else s.reading
            reason = str(e) if isinstance(e, DataError) else f"{type(e).__name__}: {e}"
            yield {"_error": one_line(f"{where}" + (f", reading {shard!r}" if shard else "") + f": {reason}",
                                      1000)}


def _identity(x):
    return x


def _stop_workers(it) -> None:
    """Shut a DataLoader iterator's worker processes down now; any that do not stop (busy, or deaf to SIGTERM)
    are killed: they hold nothing that needs saving."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for w in getattr(it, "_workers", None) or []:
        if w.is_alive():
            w.kill()
            w.join(timeout=5)


def to_device(batch: dict, device, non_blocking: bool = True) -> dict:
    """A batch with its tensors on `device` (pin_memory=True makes non_blocking copies asynchronous); captions and
    keys stay as they are."""
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}


class ShardLoader:
    """Iterable of batches: dicts with `pixel_values` (B, 3, S, S) float32, the text encoder's tensors
    (`input_ids`, `attention_mask`, and `labels` for stage 2), `captions` (B str) and `keys` (B "shard/key").

    Resampled: iteration never ends. Epoch mode: one iteration = the rest of the current epoch; the next
    iteration starts the next epoch. `state_dict()` / `load_state_dict()` save and restore the position after
    the last batch yielded; `skipped` / `shard_errors` are this rank's exact counts up to that batch."""

    def __init__(self, cfg: WebDataConfig, text: TextEncoder, rank: Optional[int] = None,
                 world_size: Optional[int] = None, pin_memory: bool = False, check: bool = True):
        if (rank is None) != (world_size is None):
            raise ValueError(f"give both rank and world_size or neither (got rank={rank}, world_size={world_size})")
        if rank is None:
            from ..distributed import world

            rank, world_size = world()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.cfg, self.text, self.rank, self.world_size, self.pin_memory = cfg, text, rank, world_size, pin_memory
        self.paths = expand_shards(cfg.urls)
        self.num_streams = max(1, cfg.num_workers)
        if not cfg.resampled:
            if len(self.paths) < world_size:
                raise ValueError(f"{len(self.paths)} shard(s) for world_size={world_size}: epoch mode needs at least "
                                 "one shard per rank (write smaller shards, or use resampled=True)")
            if len(self.paths) < world_size * self.num_streams:
                warnings.warn(f"{len(self.paths)} shard(s) for {world_size} rank(s) x {self.num_streams} worker(s): "
                              "some workers get no shard (write smaller shards for full parallelism)")
        self._fingerprint = stable_hash("shards", *self.paths)
        self.epoch, self.step, self.epoch_step = 0, 0, 0
        self.allow_repeats = False
        if check:
            self._check_shards()
        self.streams: list[Optional[dict]] = [None] * self.num_streams  # latest state of each stream
        self._past = _new_past()  # counts of finished epochs

    # -- start-up checks
    def _first_shards(self) -> list[int]:
        """The shards this rank's streams open first (fresh start), each once, in order of first use."""
        cfg, n, S = self.cfg, len(self.paths), self.num_streams
        slots = cfg.mix_shards if cfg.shuffle else 1
        out: list[int] = []
        for visit in range(slots):
            for stream in range(S):
                if cfg.resampled:
                    shard = _resampled_shard(n, cfg, self.rank, stream, visit)
                else:
                    mine = _epoch_shards(n, cfg, self.rank, self.world_size, stream, S, self.epoch)
                    shard = mine[visit] if visit < len(mine) else None
                if shard is not None and shard not in out:
                    out.append(shard)
        return out

    def _check_shards(self) -> None:
        """Probe the shards opened first (a readable tar with >= 1 sample). Unusable ones are reported (a warning)
        and skipped later; none usable (after probing the others too) is a DataError. In resampled mode, also
        count samples up to a batch: fewer distinct samples than a batch means batches must repeat images."""
        B, first = self.cfg.batch_size, self._first_shards()
        if self.cfg.resampled:
            pool = range(len(self.paths))
        else:  # this rank's shards of the first epoch (the others belong to other ranks)
            pool = [i for stream in range(self.num_streams) for i in
                    _epoch_shards(len(self.paths), self.cfg, self.rank, self.world_size, stream, self.num_streams,
                                  self.epoch)]
        order = first + [i for i in pool if i not in set(first)]
        problems: dict[int, str] = {}
        usable, counted = [], 0
        for probed, i in enumerate(order, 1):
            n, problem = probe_shard(self.paths[i], max(1, B - counted) if self.cfg.resampled else 1)
            if problem is not None:
                problems[i] = problem
            else:
                usable.append(i)
                counted += n
            if probed >= len(first) and usable and (counted >= B or not self.cfg.resampled):
                break
        if not usable:
            show = "; ".join(f"{self.paths[i]!r} {p}" for i, p in list(problems.items())[:3])
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            if len(self.paths) == 1:
                where = ""
            elif self.cfg.resampled or self.world_size == 1:
                where = f" among the {len(order)} of {self.cfg.urls!r}"
            else:
                where = f" among the {len(order)} that rank {self.rank} reads in epoch 1 of {self.cfg.urls!r}"
            raise DataError(f"no usable shard{where}: {show}{more}")
        if problems:
            show = ", ".join(f"{self.paths[i]!r} {p}" for i, p in list(problems.items())[:3])
            warnings.warn(f"{len(problems)} shard(s) checked at start are unusable and will be skipped and counted: "
                          f"{show}" + (" ..." if len(problems) > 3 else ""), stacklevel=3)
        if self.cfg.resampled and counted < B:
            self.allow_repeats = True
            warnings.warn(f"the shards in {self.cfg.urls!r} hold only {counted} sample(s), fewer than a batch of "
                          f"{B}: every batch repeats images (false negatives for ITC / ITM); add data or lower "
                          "the batch size", stacklevel=3)
        self._check_text(self.paths[usable[0]])

    def _check_text(self, path: str, count: int = 8) -> None:
        """The text encoder must encode at least one of the shard's first captions; a word or two it does not
        know is a counted skip later, but refusing every caption means it does not fit this data."""
        captions = first_captions(path, count, self.cfg.max_words)
        errors = []
        for caption in captions:
            try:
                self.text([caption], 0)
                return
            except Exception as e:  # tokenizers raise many types
                errors.append((caption, e))
        if errors:
            caption, e = errors[0]
            raise TextEncoderMismatch(f"the text encoder cannot encode any of the first {len(errors)} captions of "
                                      f"{path!r} (e.g. {caption!r}: {type(e).__name__}: {one_line(e, 200)})")

    # -- counts
    def _totals(self, field: str, names) -> dict:
        out = {k: self._past[field].get(k, 0) for k in names}
        for st in self.streams:
            if st is not None:
                for k, v in st[field].items():
                    out[k] += v
        return out

    @property
    def skipped(self) -> dict:
        """Skipped samples by reason (this rank, cumulative over epochs, up to the last batch yielded)."""
        return self._totals("skipped", SAMPLE_REASONS)

    @property
    def shard_errors(self) -> dict:
        """Shard events by kind (unreadable / truncated / bad_header), as `skipped`."""
        return self._totals("shard_errors", SHARD_REASONS)

    @property
    def samples_seen(self) -> int:
        """Good samples in the batches yielded so far (this rank, cumulative)."""
        return self._past["samples"] + sum(st["samples"] for st in self.streams if st is not None)

    # -- position
    def _order_key(self) -> list:
        """The settings that fix the sample order within a stream (a resume must not change them)."""
        return [self.cfg.shuffle, self.cfg.shuffle_buffer, self.cfg.mix_shards]

    def state_dict(self) -> dict:
        """The position after the last batch yielded: JSON-able (ints, strs, lists, dicts)."""
        return {"version": STATE_VERSION, "fingerprint": self._fingerprint, "seed": self.cfg.seed,
                "rank": self.rank, "world_size": self.world_size, "num_streams": self.num_streams,
                "resampled": self.cfg.resampled, "order": self._order_key(), "epoch": self.epoch, "step": self.step,
                "epoch_step": self.epoch_step, "past": _copy_past(self._past),
                "streams": [None if s is None else _copy_state(s) for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from `state_dict()` of a loader with the same shards, seed, world size and
        num_workers); call before iterating."""
        expect = {"version": STATE_VERSION, "fingerprint": self._fingerprint, "seed": self.cfg.seed,
                  "rank": self.rank, "world_size": self.world_size, "num_streams": self.num_streams,
                  "resampled": self.cfg.resampled, "order": self._order_key()}
        what = {"fingerprint": "shard list", "num_streams": "max(1, num_workers)",
                "order": "[shuffle, shuffle_buffer, mix_shards]"}
        for k, v in expect.items():
            if state.get(k) != v:
                raise ValueError(f"data position mismatch: saved {k}={state.get(k)!r} ({what.get(k, k)}), this loader "
                                 f"has {v!r}; resume with the same shards, seed, world size, num_workers and "
                                 "shuffle settings, or start the data stream afresh")
        self.epoch, self.step, self.epoch_step = state["epoch"], state["step"], state["epoch_step"]
        self._past = _copy_past(state["past"])
        self.streams = [None if s is None else _copy_state(s) for s in state["streams"]]

    # -- iteration
    def __iter__(self) -> Iterator[dict]:
        if not self.cfg.resampled and self.streams and all(s is not None and s["done"] for s in self.streams):
            self._next_epoch()
        ds = _ShardIterable(self.paths, self.cfg, self.text, self.rank, self.world_size, self.num_streams,
                            self.epoch, self.epoch_step % self.num_streams, list(self.streams), self.allow_repeats)
        w = self.cfg.num_workers
        # timeout: a worker that is alive but stuck (a hung network-filesystem read, a deadlocked decoder) would
        # otherwise block the step for ever with nothing said; torch raises after that many seconds without a batch
        loader = DataLoader(ds, batch_size=None, num_workers=w, collate_fn=_identity, pin_memory=self.pin_memory,
                            prefetch_factor=self.cfg.prefetch_factor if w > 0 else None, persistent_workers=False,
                            timeout=float(self.cfg.worker_timeout) if w > 0 else 0.0)
        it = iter(loader)
        try:
            while True:
                try:
                    item = next(it)
                except StopIteration:
                    break
                except (RuntimeError, OSError) as e:  # the loader's own failure: a worker died (killed, out of
                    # memory), seen by torch's check or as a broken connection while a batch was in transfer
                    raise self.worker_died(e) from None
                if "_error" in item:
                    raise DataError(item["_error"])
                st = item.pop("_state")
                self.streams[st["stream"]] = st
                if "pixel_values" not in item:
                    continue  # a stream's end-of-epoch counts
                self.step += 1
                self.epoch_step += 1
                yield item
        finally:
            # explicitly: a pending exception's traceback keeps the iterator alive, and its workers (started with
            # SIGTERM blocked by the trainer) would then outlive the process's exit, which waits for them
            _stop_workers(it)
            del it
        if not self.cfg.resampled:
            self._next_epoch()

    def worker_died(self, error: BaseException) -> DataError:
        """A one-line DataError for a loader worker that died, naming the shards its stream had open (from the
        last state each stream sent)."""
        open_shards = []
        slots = self.cfg.mix_shards if self.cfg.shuffle else 1
        for stream, st in enumerate(self.streams):
            if st is None:  # no batch from it yet: the shards it opens first
                st = {"stream": stream, "slots": [[v, 0] for v in range(slots)]}
            for visit, _ in st["slots"]:
                if visit >= 0:
                    if self.cfg.resampled:
                        shard = _resampled_shard(len(self.paths), self.cfg, self.rank, st["stream"], visit)
                    else:
                        mine = _epoch_shards(len(self.paths), self.cfg, self.rank, self.world_size, st["stream"],
                                             self.num_streams, self.epoch)
                        shard = mine[visit] if visit < len(mine) else None
                    if shard is not None and self.paths[shard] not in open_shards:
                        open_shards.append(self.paths[shard])
        where = f" (open shards: {', '.join(repr(p) for p in open_shards[:4])})" if open_shards else ""
        if "timed out" in str(error):
            return DataError(f"rank {self.rank}: no batch from the data loader workers in {self.cfg.worker_timeout:g} "
                             f"s: a worker is stuck (a hung filesystem read?){where}; if batches are just that slow "
                             "to make, raise --data.worker_timeout (0: wait for ever)")
        return DataError(f"rank {self.rank}: a data loader worker failed{where}: {one_line(error)}")

    def _next_epoch(self) -> None:
        for st in self.streams:
            if st is not None:
                for field in ("skipped", "shard_errors"):
                    for k, v in st[field].items():
                        self._past[field][k] = self._past[field].get(k, 0) + v
                self._past["samples"] += st["samples"]
        self.epoch += 1
        self.epoch_step = 0
        self.streams = [None] * self.num_streams


def _new_past() -> dict:
    return {"skipped": dict.fromkeys(SAMPLE_REASONS, 0), "shard_errors": dict.fromkeys(SHARD_REASONS, 0), "samples": 0}


def _copy_past(p: dict) -> dict:
    return {"skipped": dict(p["skipped"]), "shard_errors": dict(p["shard_errors"]), "samples": p["samples"]}
