"""Fixtures for the training tests: a small demo shard cache, tiny configs, a subprocess runner, a shard set with
~10% corrupt samples, and tiny OPT / T5 LLM folders with a word-level tokenizer."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from blip2fast.training.config import CheckpointConfig, EvalConfig, LoggingConfig, ScheduleConfig, demo_small

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_SAMPLES = 2048  # the demo_small preset's demo set size
# libgomp's default spin-waiting makes 2-thread CPU steps up to 20x slower when other processes share the 2 cores
# (measured here while other test runs were going); subprocesses wait passively, the test process uses one thread
SUBPROCESS_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """A demo shard cache shared by every test (and their subprocesses through BLIP2FAST_DEMO_CACHE)."""
    from blip2fast.training.data import ensure_demo_shards

    root = str(tmp_path_factory.mktemp("demo-cache"))
    shards = ensure_demo_shards(root, 32, DEMO_SAMPLES, log=lambda s: None)
    old = os.environ.get("BLIP2FAST_DEMO_CACHE")
    os.environ["BLIP2FAST_DEMO_CACHE"] = root
    yield {"root": root, **shards}
    if old is None:
        os.environ.pop("BLIP2FAST_DEMO_CACHE", None)
    else:
        os.environ["BLIP2FAST_DEMO_CACHE"] = old


def tiny_config(run_dir: str, steps: int = 8, every: int = 4, batch: int = 8, workers: int = 0, **top):
    """The demo_small preset made smaller still: few steps, small batches, no transformers export."""
    base = demo_small()
    return base.replace(
        data=dataclasses.replace(base.data, batch_size=batch, num_workers=workers),
        eval=EvalConfig(size=16),
        schedule=ScheduleConfig(steps=steps, warmup_steps=2, min_lr=2e-4),
        checkpoint=CheckpointConfig(dir=str(run_dir), every=every, keep=2, export_hf=False),
        logging=LoggingConfig(every=1, tensorboard=False),
        **top,
    )


def run_cli(args, env_extra=None, timeout=120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **SUBPROCESS_ENV,
               **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "blip2fast.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def start_cli(args, env_extra=None, log_path=None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **SUBPROCESS_ENV,
               **(env_extra or {}))
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "blip2fast.train", *args], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT)


# ------------------------------------------------------------------------------------------------ corrupt shards
def _tar_add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# Bad samples the corrupt set mixes in (one of each per shard, in this order) and the counter each must hit.
_BAD_KINDS = ("bad_image", "empty_caption", "bad_text", "missing_caption", "missing_image", "bad_text")
CORRUPT_SHARDS = 4
GOOD_PER_SHARD = 54  # 6 bad of 60 samples per shard: 10%


@pytest.fixture(scope="session")
def corrupt_shards(tmp_path_factory, demo_cache):
    """4 shards of demo images, each 54 good samples + 6 bad ones (10%), plus one file that is not a tar and one
    shard cut inside a member. Captions of good samples are demo captions (the demo tokenizer reads them)."""
    from blip2fast.data.shards import index_shard

    root = tmp_path_factory.mktemp("corrupt")
    src = demo_cache["train"].replace("{000000..000001}", "000000")
    samples, _ = index_shard(src)
    with open(src, "rb") as f:
        blob = f.read()

    def member(raw, ext):
        off, size = raw.members[ext]
        return blob[off:off + size]

    good = iter(samples)
    expected = {k: 0 for k in set(_BAD_KINDS) | {"truncated"}}
    paths = []
    key = 0
    for s in range(CORRUPT_SHARDS):
        path = str(root / f"shard-{s:02d}.tar")
        paths.append(path)
        with tarfile.open(path, "w") as tar:
            bad_at = {5 + 9 * j: kind for j, kind in enumerate(_BAD_KINDS)}
            for i in range(GOOD_PER_SHARD + len(_BAD_KINDS)):
                k = f"{key:06d}"
                key += 1
                kind = bad_at.get(i)
                raw = next(good)
                png, cap = member(raw, "png"), member(raw, "json")
                if kind is None:
                    _tar_add(tar, f"{k}.png", png)
                    _tar_add(tar, f"{k}.json", cap)
                    continue
                expected[kind] += 1
                if kind == "bad_image":
                    _tar_add(tar, f"{k}.png", png[:40])  # cut PNG
                    _tar_add(tar, f"{k}.json", cap)
                elif kind == "empty_caption":
                    _tar_add(tar, f"{k}.png", png)
                    _tar_add(tar, f"{k}.txt", b" ... !!! ")
                elif kind == "bad_text":
                    _tar_add(tar, f"{k}.png", png)
                    _tar_add(tar, f"{k}.txt" if s % 2 else f"{k}.json", b"{\xff\xfe not utf-8" if s % 2 else b"{no")
                elif kind == "missing_caption":
                    _tar_add(tar, f"{k}.png", png)
                elif kind == "missing_image":
                    _tar_add(tar, f"{k}.json", cap)
    # a shard cut inside its 3rd member: 1 good sample, then a truncated one
    path = str(root / "shard-04.tar")
    paths.append(path)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        raw = next(good)
        _tar_add(tar, "900000.png", member(raw, "png"))
        _tar_add(tar, "900000.json", member(raw, "json"))
        cut = buf.tell() + 512 + 50
        raw = next(good)
        _tar_add(tar, "900001.png", member(raw, "png"))
        _tar_add(tar, "900001.json", member(raw, "json"))
    with open(path, "wb") as f:
        f.write(buf.getvalue()[:cut])
    expected["truncated"] += 1
    path = str(root / "shard-05.tar")
    paths.append(path)
    with open(path, "wb") as f:
        f.write(b"not a tar file\n" * 64)
    total = CORRUPT_SHARDS * (GOOD_PER_SHARD + len(_BAD_KINDS)) + 2
    return {"pattern": str(root / "shard-{00..05}.tar"), "paths": paths, "expected_skips": expected,
            "expected_shard_errors": {"unreadable": 1, "truncated": 1, "bad_header": 0, "empty": 0},
            "good": CORRUPT_SHARDS * GOOD_PER_SHARD + 1, "total": total}


# ------------------------------------------------------------------------------------------------ tiny LLMs
def _word_tokenizer(folder: str, kind: str):
    """A word-level fast tokenizer over the demo captions, saved to `folder` (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from blip2fast.data.synthetic import caption_vocabulary

    specials = ["<pad>", "</s>", "<unk>"] if kind == "t5" else ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(caption_vocabulary()))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "t5":
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    else:  # OPT: </s> is both BOS and EOS, <pad> = 1
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                       unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast, len(vocab)


def make_llm_folder(folder: str, kind: str) -> str:
    import torch
    import transformers

    os.makedirs(folder, exist_ok=True)
    tok, n = _word_tokenizer(folder, kind)
    torch.manual_seed(0)
    if kind == "opt":
        cfg = transformers.OPTConfig(vocab_size=n, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                     num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
                                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                     eos_token_id=tok.eos_token_id)
        model = transformers.OPTForCausalLM(cfg)
    else:
        cfg = transformers.T5Config(vocab_size=n, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                    feed_forward_proj="gated-gelu", decoder_start_token_id=tok.pad_token_id,
                                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        model = transformers.T5ForConditionalGeneration(cfg)
    model.save_pretrained(folder)
    with open(os.path.join(folder, "made_by_test.json"), "w") as f:
        json.dump({"kind": kind}, f)
    return folder


@pytest.fixture(scope="session")
def llm_folders(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    root = tmp_path_factory.mktemp("llms")
    return {kind: make_llm_folder(str(root / kind), kind) for kind in ("opt", "t5")}
