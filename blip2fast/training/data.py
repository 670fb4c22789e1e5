"""The run's data: the demo shards (written once to a cache folder), the text encoder for the stage, the training
ShardLoader and the held-out retrieval batch.

The demo set is `blip2fast.data.synthetic`'s procedural shapes written as ordinary webdataset shards (PNG + JSON
caption, 1024 samples per shard) by `write_samples`, so the default run exercises the same loader, workers and
resumable position as a real one. Training images follow `SyntheticShapes.train_batch`'s distribution (one
object with probability 1/3); the held-out shard holds every distinct scene once (distinct captions: one correct
answer per retrieval query), rendered from a separate generator stream. The folder name encodes what is in it
(image size, sample count, format version); `summary.json` is written last and marks a complete set, and the
whole folder is written under a temporary name and renamed, so concurrent or killed writers never leave a
half-written set behind.
"""
from __future__ import annotations

import io
import os
import shutil
from typing import Callable, Optional

import torch
from PIL import Image

from ..config import Blip2Config
from ..data.shards import DataError, ShardLoader, TextEncoderMismatch, WebDataConfig
from ..data.synthetic import _NUM_SINGLE, SCENES, WordTokenizer, _generator, caption_vocabulary, render
from ..data.tokenize import DecoderOnlyText, EncoderDecoderText, Stage1Text, load_tokenizer
from ..data.write_shards import write_samples
from .checkpoint import read_json, write_json
from .config import ConfigError, TrainConfig

CACHE_ENV = "BLIP2FAST_DEMO_CACHE"
DEMO_DATA_SEED = 0  # the demo set is fixed; --seed changes the order it is read in, not the images
DEMO_FORMAT = 1
SHARD_SIZE = 1024
_RENDER_CHUNK = 1024


# ------------------------------------------------------------------------------------------------ demo shards
def demo_cache_root(cfg: TrainConfig) -> str:
    return os.path.expanduser(os.environ.get(CACHE_ENV) or cfg.data.demo_cache)


def _png(img_u8: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img_u8.numpy()).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _render_samples(scene_ids: torch.Tensor, image_size: int, gen: torch.Generator):
    """(PNG bytes, "png", [caption], {"scene": id}) for each scene, drawn with `gen`."""
    img = (render(scene_ids, image_size, gen) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    for i, s in enumerate(scene_ids.tolist()):
        yield _png(img[i]), "png", [SCENES[s].caption()], {"scene": s}


def _train_samples(n: int, image_size: int):
    for start in range(0, n, _RENDER_CHUNK):
        b = min(_RENDER_CHUNK, n - start)
        gen = _generator(DEMO_DATA_SEED, "train", start)
        single = torch.rand(b, generator=gen) < 1 / 3  # as SyntheticShapes.train_batch
        one = torch.randint(0, _NUM_SINGLE, (b,), generator=gen)
        two = torch.randint(_NUM_SINGLE, len(SCENES), (b,), generator=gen)
        yield from _render_samples(torch.where(single, one, two), image_size, gen)


def _eval_samples(image_size: int):
    gen = _generator(DEMO_DATA_SEED, "eval", 0)
    scene_ids = torch.randperm(len(SCENES), generator=gen)  # every scene once, in a fixed random order
    for start in range(0, len(scene_ids), _RENDER_CHUNK):
        yield from _render_samples(scene_ids[start:start + _RENDER_CHUNK], image_size, gen)


def _pattern(folder: str, n_shards: int) -> str:
    if n_shards == 1:
        return os.path.join(folder, "000000.tar")
    return os.path.join(folder, "{000000..%06d}.tar" % (n_shards - 1))


def ensure_demo_shards(root: str, image_size: int, n_train: int, log: Callable[[str], None] = print) -> dict:
    """The demo shard set under `root`, written if absent: {"train": pattern, "eval": pattern, "folder",
    "written": bool}."""
    name = f"shapes-{image_size}px-{n_train}-v{DEMO_FORMAT}"
    folder = os.path.join(root, name)
    summary_path = os.path.join(folder, "summary.json")
    written = False
    if not os.path.isfile(summary_path):
        os.makedirs(root, exist_ok=True)
        tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"writing the demo data once: {n_train} + {len(SCENES)} held-out procedural images ({image_size} px) as "
            f"webdataset shards in {folder} ...")
        os.makedirs(os.path.join(tmp, "train"))
        os.makedirs(os.path.join(tmp, "eval"))
        n_tr = len(write_samples(os.path.join(tmp, "train"), _train_samples(n_train, image_size), SHARD_SIZE))
        n_ev = len(write_samples(os.path.join(tmp, "eval"), _eval_samples(image_size), SHARD_SIZE))
        write_json(os.path.join(tmp, "summary.json"), {"train_shards": n_tr, "eval_shards": n_ev,
                                                       "train_samples": n_train, "eval_samples": len(SCENES),
                                                       "image_size": image_size, "format": DEMO_FORMAT})
        try:
            os.rename(tmp, folder)
            written = True
        except OSError:  # another process finished first (or a stale incomplete folder): keep a complete one
            if os.path.isfile(summary_path):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                shutil.rmtree(folder, ignore_errors=True)
                os.rename(tmp, folder)
                written = True
    summary = read_json(summary_path)
    return {"folder": folder, "written": written,
            "train": _pattern(os.path.join(folder, "train"), summary["train_shards"]),
            "eval": _pattern(os.path.join(folder, "eval"), summary["eval_shards"])}


# ------------------------------------------------------------------------------------------------ text
def demo_tokenizer(model: Blip2Config) -> WordTokenizer:
    """Word-level tokenizer over the shapes captions, BERT id layout, clear of the model's [DEC] id."""
    q = model.qformer
    return WordTokenizer(caption_vocabulary(), model.max_text_len, vocab_size=q.vocab_size,
                         reserved_ids=(q.dec_token_id,))


def text_encoder(cfg: TrainConfig, model_cfg: Blip2Config, llm_is_encoder_decoder: bool = False):
    """The loader-side text encoder for the run's stage (see blip2fast.data.tokenize)."""
    d = cfg.data
    if cfg.stage == 1:
        if d.tokenizer == "demo":
            return Stage1Text(demo_tokenizer(model_cfg), max_len=model_cfg.max_text_len)
        folder = d.tokenizer or cfg.weights.bert
        if not folder:
            raise ConfigError("stage 1 needs the Q-Former's BERT tokenizer: --data.tokenizer=<local bert-base-uncased "
                             "folder> (or --weights.bert=..., whose folder is used); --data.tokenizer=demo only "
                             "fits the demo captions")
        text = Stage1Text.from_folder(folder, max_len=model_cfg.max_text_len)
        q = model_cfg.qformer
        if text.dec_token_id != q.dec_token_id or len(text.tokenizer) > q.vocab_size:
            raise ValueError(f"the tokenizer in {folder!r} ({len(text.tokenizer)} ids, [DEC]={text.dec_token_id}) does "
                             f"not fit the Q-Former (vocab_size={q.vocab_size}, dec_token_id={q.dec_token_id}); "
                             "size the Q-Former from the same BERT (--weights.bert)")
        return text
    folder = model_cfg.llm.path if d.tokenizer in ("", "demo") else d.tokenizer  # the demo's words: stage 1 only
    if not folder:
        raise ConfigError("stage 2 needs the LLM's tokenizer: --weights.llm=<folder with tokenizer files> or "
                         "--data.tokenizer=<folder>")
    tok = load_tokenizer(folder)
    n = model_cfg.llm.max_text_len
    if llm_is_encoder_decoder:
        return EncoderDecoderText(tok, max_len=n, max_output_len=n, seed=cfg.seed)
    return DecoderOnlyText(tok, max_len=n, prompt=d.prompt)


# ------------------------------------------------------------------------------------------------ loaders
def web_config(cfg: TrainConfig, urls: str, image_size: int) -> WebDataConfig:
    d = cfg.data
    return WebDataConfig(urls=urls, batch_size=d.batch_size, image_size=image_size, num_workers=d.num_workers,
                         prefetch_factor=d.prefetch_factor, worker_timeout=d.worker_timeout, seed=cfg.seed,
                         resampled=d.resampled, shuffle=d.shuffle, shuffle_buffer=d.shuffle_buffer, mix_shards=d.mix_shards, train=d.augment,
                         max_words=d.max_words, **_pixels(d),
                         drop_last=cfg.speed.cuda_graphs)  # a replayed CUDA graph takes one batch shape


def _pixels(d) -> dict:
    """The run's resolved preprocessing (Trainer fills data.image_mean / image_std / resize from the tower)."""
    out = {}
    if d.image_mean is not None:
        out["mean"] = tuple(d.image_mean)
    if d.image_std is not None:
        out["std"] = tuple(d.image_std)
    if d.resize:
        out["resize"] = d.resize
    return out


def train_loader(cfg: TrainConfig, urls: str, text, image_size: int, rank: int, world_size: int,
                 pin_memory: bool = False) -> ShardLoader:
    try:
        return ShardLoader(web_config(cfg, urls, image_size), text, rank, world_size, pin_memory=pin_memory)
    except TextEncoderMismatch as e:
        if cfg.stage == 1 and cfg.data.tokenizer == "demo":
            raise DataError(f"{e}; --data.tokenizer=demo knows only the demo captions' words: give "
                            "--data.tokenizer=<a local BERT tokenizer folder> for other data") from None
        raise


def heldout_batch(urls: str, size: int, text, image_size: int, data=None) -> Optional[dict]:
    """The first `size` samples of `urls` (file order, the evaluation resize, first caption) as one batch; `data`
    (a DataConfig) brings the run's preprocessing."""
    wcfg = WebDataConfig(urls=urls, batch_size=size, image_size=image_size, num_workers=0, resampled=False,
                         shuffle=False, train=False, mix_shards=1, **(_pixels(data) if data is not None else {}))
    batches = iter(ShardLoader(wcfg, text, 0, 1))
    try:
        return next(batches, None)
    finally:  # close the reader now: a suspended one keeps its tar open until garbage collection (ResourceWarning)
        close = getattr(batches, "close", None)
        if close is not None:
            close()


__all__ = ["demo_cache_root", "demo_tokenizer", "ensure_demo_shards", "heldout_batch", "text_encoder",
           "train_loader", "web_config"]
