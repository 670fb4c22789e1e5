"""The shard pipeline: read-back with 0 and 2 workers, node x worker splitting (every sample exactly once per epoch),
exact skip counts on a corrupt set, the resumable data position, stage-1/2 batches, errors."""
from __future__ import annotations

import json
import re
import tarfile
import time

import pytest
import torch

from blip2fast.data.captions import clean_caption
from blip2fast.data.shards import (SAMPLE_REASONS, DataError, ShardLoader, WebDataConfig, buffered_order,
                                   expand_shards, index_shard)
from blip2fast.data.synthetic import WordTokenizer
from blip2fast.data.tokenize import DecoderOnlyText, EncoderDecoderText, Stage1Text, load_bert_tokenizer
from tests.data.conftest import EXPECTED_SHARD_ERRORS, EXPECTED_SKIPS, WORDS, caption_for

S = 24  # image side: small, the tests are about the pipeline


def word_text(max_len: int = 12) -> Stage1Text:
    return Stage1Text(WordTokenizer(WORDS, max_len), max_len)


def loader(pattern, text=None, rank=0, world=1, check=True, **kw) -> ShardLoader:
    cfg = WebDataConfig(urls=pattern, image_size=S, **{"batch_size": 4, "num_workers": 0, **kw})
    return ShardLoader(cfg, text or word_text(), rank=rank, world_size=world, check=check)


def take(it, n):
    out = []
    for b in it:
        out.append(b)
        if len(out) == n:
            break
    return out


def same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)
        for x, y in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2])
def test_read_back_one_epoch(clean_shards, workers):
    L = loader(clean_shards["pattern"], num_workers=workers, resampled=False)
    batches = list(L)
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == len(set(keys)) == 24
    names = clean_shards["names"]
    for b in batches:
        n = len(b["keys"])
        assert b["pixel_values"].shape == (n, 3, S, S) and b["pixel_values"].dtype == torch.float32
        assert b["input_ids"].shape == b["attention_mask"].shape == (n, 12)
        assert (b["input_ids"][:, 0] == WordTokenizer.CLS).all()
    # each caption is one of its image's cleaned captions (json "image" -> captions of image i)
    by_key = {}
    for path in expand_shards(clean_shards["pattern"]):
        samples, err = index_shard(path)
        assert err is None
        with open(path, "rb") as f:
            for s in samples:
                f.seek(s.members["json"][0])
                meta = json.loads(f.read(s.members["json"][1]))
                i = names.index(meta["image"])
                by_key[f"{path}/{s.key}"] = [clean_caption(caption_for(i, j)) for j in range(1 + i % 3)]
    chosen = [(k, c) for b in batches for k, c in zip(b["keys"], b["captions"])]
    assert all(c in by_key[k] for k, c in chosen)
    assert L.skipped == dict.fromkeys(SAMPLE_REASONS, 0) and L.samples_seen == 24


def test_epochs_reshuffle_and_rechoose_captions(clean_shards):
    L = loader(clean_shards["pattern"], resampled=False, num_workers=2)
    e0 = [(k, c) for b in L for k, c in zip(b["keys"], b["captions"])]
    e1 = [(k, c) for b in L for k, c in zip(b["keys"], b["captions"])]
    assert sorted(k for k, _ in e0) == sorted(k for k, _ in e1) and len(e0) == 24
    assert [k for k, _ in e0] != [k for k, _ in e1]
    assert dict(e0) != dict(e1)  # some multi-caption image got another caption
    assert L.epoch == 2 and L.samples_seen == 48
    # a fresh loader replays epoch 0 exactly
    assert [(k, c) for b in loader(clean_shards["pattern"], resampled=False, num_workers=2)
            for k, c in zip(b["keys"], b["captions"])] == e0


def test_eval_mode_is_in_order_with_first_captions(clean_shards):
    L = loader(clean_shards["pattern"], resampled=False, shuffle=False, train=False, batch_size=5)
    batches = list(L)
    keys = [k for b in batches for k in b["keys"]]
    assert keys == sorted(keys)  # shard order, file order
    again = list(loader(clean_shards["pattern"], resampled=False, shuffle=False, train=False, batch_size=5))
    assert same_batches(batches, again)


@pytest.mark.parametrize("world,workers", [(2, 0), (2, 2), (3, 1)])
def test_node_and_worker_split_cover_every_sample_once(clean_shards, world, workers):
    seen = []
    for rank in range(world):
        L = loader(clean_shards["pattern"], rank=rank, world=world, num_workers=workers, resampled=False)
        seen += [k for b in L for k in b["keys"]]
    assert len(seen) == len(set(seen)) == 24


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 2)])
def test_corrupt_set_exact_skip_counts(corrupt_shards, world, workers):
    keys, skipped, shard_errors = [], dict.fromkeys(EXPECTED_SKIPS, 0), dict.fromkeys(EXPECTED_SHARD_ERRORS, 0)
    for rank in range(world):
        L = loader(corrupt_shards["pattern"], rank=rank, world=world, num_workers=workers, resampled=False,
                   batch_size=5)
        keys += [k for b in L for k in b["keys"]]
        for k, v in L.skipped.items():
            skipped[k] += v
        for k, v in L.shard_errors.items():
            shard_errors[k] += v
    assert skipped == EXPECTED_SKIPS and shard_errors == EXPECTED_SHARD_ERRORS
    assert sorted(keys) == sorted(corrupt_shards["good"])  # every good sample, once


def test_resampled_corrupt_set_runs_and_counts_every_draw(corrupt_shards):
    L = loader(corrupt_shards["pattern"], num_workers=2, shuffle_buffer=4, batch_size=6)
    batches = take(L, 30)
    assert all(b["pixel_values"].shape == (6, 3, S, S) for b in batches)
    assert all(k in set(corrupt_shards["good"]) for b in batches for k in b["keys"])
    st = L.state_dict()
    draws = sum(s["draws"] for s in st["streams"])
    repeats = sum(s["duplicates"] for s in st["streams"])  # a sample already in the batch being built
    assert draws == L.samples_seen + sum(L.skipped.values()) + repeats and L.samples_seen == 180
    assert all(len(set(b["keys"])) == len(b["keys"]) for b in batches)
    assert L.skipped["bad_image"] > 0 and L.shard_errors["unreadable"] > 0


@pytest.mark.parametrize("k", [3, 4])
def test_resume_from_step_k_gives_the_same_batches(corrupt_shards, k):
    """Batches k.. after restoring the state saved at step k == batches k.. of an uninterrupted run (2 workers,
    shuffling, resampling, skips on the way); the state survives a JSON round trip."""
    kw = dict(num_workers=2, shuffle_buffer=6, batch_size=5)
    n = 9
    ref = loader(corrupt_shards["pattern"], **kw)
    full = take(ref, n)
    first = loader(corrupt_shards["pattern"], **kw)
    take(first, k)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["step"] == k
    resumed = loader(corrupt_shards["pattern"], **kw)
    resumed.load_state_dict(state)
    rest = take(resumed, n - k)
    assert same_batches(full[k:], rest)
    assert resumed.skipped == ref.skipped and resumed.shard_errors == ref.shard_errors
    assert resumed.state_dict() == ref.state_dict()


def test_resume_epoch_mode_single_stream(corrupt_shards):
    kw = dict(resampled=False, batch_size=4)
    full = list(loader(corrupt_shards["pattern"], **kw))
    first = loader(corrupt_shards["pattern"], **kw)
    take(first, 5)
    resumed = loader(corrupt_shards["pattern"], **kw)
    resumed.load_state_dict(first.state_dict())
    assert same_batches(full[5:], list(resumed))
    assert resumed.skipped == EXPECTED_SKIPS and resumed.epoch == 1


def test_iterating_again_continues_from_the_position(clean_shards):
    full = take(loader(clean_shards["pattern"], num_workers=2), 6)
    L = loader(clean_shards["pattern"], num_workers=2)
    part = take(L, 3) + take(L, 3)  # a new iter() picks up where the last batch left off
    assert same_batches(full, part)


def test_state_mismatch_is_an_error(clean_shards, corrupt_shards):
    L = loader(clean_shards["pattern"], num_workers=2)
    take(L, 1)
    state = L.state_dict()
    with pytest.raises(ValueError, match="num_streams=2 .*num_workers.* has 1"):
        loader(clean_shards["pattern"], num_workers=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=0"):
        loader(clean_shards["pattern"], num_workers=2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="shard list"):
        loader(corrupt_shards["pattern"], num_workers=2).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size=1"):
        loader(clean_shards["pattern"], num_workers=2, rank=0, world=2).load_state_dict(state)


def test_stage2_batches(clean_shards, bert_dir):
    bert = load_bert_tokenizer(bert_dir)
    dec = take(loader(clean_shards["pattern"], DecoderOnlyText(bert, max_len=10, pad_token_id=0), num_workers=2), 2)
    for b in dec:
        assert b["labels"].shape == b["input_ids"].shape == (4, 10)
        assert (b["input_ids"][:, 0] == bert.bos_token_id).all() and (b["labels"][:, 0] == -100).all()
    encdec = EncoderDecoderText(bert, max_len=8, max_output_len=10, eos_token_id=102)
    b1 = take(loader(clean_shards["pattern"], encdec, num_workers=2), 3)
    b2 = take(loader(clean_shards["pattern"], encdec, num_workers=2), 3)
    assert same_batches(b1, b2)  # the prefix split is reproducible too
    for b in b1:
        assert b["input_ids"].shape == (4, 8) and b["labels"].shape == (4, 10)
        for row, cap in enumerate(b["captions"]):  # prefix + suffix give back the caption
            p = bert.decode([t for t in b["input_ids"][row].tolist() if t not in (0, 102)])
            s = bert.decode([t for t in b["labels"][row].tolist() if t not in (-100, 102)])
            assert " ".join(x for x in (p, s) if x) == cap
    s1 = take(loader(clean_shards["pattern"], Stage1Text(bert, 16), num_workers=0), 1)[0]
    assert (s1["input_ids"][:, 0] == 101).all() and s1["input_ids"].shape == (4, 16)


def test_all_broken_shards_stop_with_an_error(corrupt_shards):
    broken = corrupt_shards["paths"][5]  # not a tar
    with pytest.raises(DataError, match=r"^no usable shard: .*shard-05.tar. is not a tar archive$"):
        loader(broken)
    # found only while reading (the start-up check skipped): resampled mode stops once every shard is known bad
    with pytest.raises(DataError, match=r"no usable shard left: all 1 shard\(s\) are empty or unreadable"):
        take(loader(broken, check=False), 1)
    L = loader(broken, resampled=False, check=False)
    assert list(L) == [] and L.shard_errors["unreadable"] == 1


def test_shard_list_and_config_errors(clean_shards, tmp_path):
    paths = expand_shards(clean_shards["pattern"])
    assert len(paths) == 5 and expand_shards(f"{paths[0]}::{paths[1]}") == paths[:2]
    assert expand_shards(paths[:2]) == paths[:2]
    with pytest.raises(FileNotFoundError, match="2 of 3 shard.*nope-1.tar"):
        expand_shards(f"{paths[0]}::{tmp_path}/nope-{{1..2}}.tar")
    (tmp_path / "x.tar.gz").write_bytes(b"gzip")
    with pytest.raises(ValueError, match="tar.gz"):
        expand_shards(f"{tmp_path}/x.tar.gz")
    with pytest.raises(ValueError, match="batch_size=0"):
        WebDataConfig(urls="x", batch_size=0)
    with pytest.raises(ValueError, match="epoch mode needs at least one shard per rank"):
        loader(paths[0], rank=0, world=2, resampled=False)
    with pytest.raises(ValueError, match="rank=2"):
        loader(paths[0], rank=2, world=2)


def test_buffered_order():
    import random

    assert buffered_order(10, 1, random.Random(0)) == list(range(10))
    full = buffered_order(50, 100, random.Random(0))
    assert sorted(full) == list(range(50)) and full != list(range(50))
    local = buffered_order(1000, 10, random.Random(1))
    assert sorted(local) == list(range(1000))
    assert all(i < pos + 10 for pos, i in enumerate(local))  # an item comes out after it went in


def _tar_bytes(members) -> bytes:
    import io
    import tarfile

    from tests.data.conftest import tar_add

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            if name.endswith("/"):
                info = tarfile.TarInfo(name.rstrip("/"))
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                tar_add(tar, name, data)
    return buf.getvalue()


def test_index_shard_layouts_and_damage(tmp_path):
    members = [("d/", b""), ("__meta__", b"x"), ("d/0001.JPG", b"a" * 700), ("d/0001.txt", b"t"),
               ("d/0002.png", b"b" * 10), ("d/0002.json", b"{}"), ("d/0002.png", b"dup"), ("noext", b"n")]
    data = _tar_bytes(members)
    path = tmp_path / "s.tar"
    path.write_bytes(data)
    samples, err = index_shard(str(path))
    assert err is None and [(s.key, sorted(s.members)) for s in samples] == [("d/0001", ["jpg", "txt"]),
                                                                             ("d/0002", ["json", "png"])]
    assert samples[1].members["png"][1] == 10  # a duplicate member does not replace the first
    # cut at a member boundary (no end-of-archive block): samples kept, the shard counts as truncated
    end = samples[1].members["json"][0] + 512
    path.write_bytes(data[:end])
    samples, err = index_shard(str(path))
    assert err == "truncated" and [s.reason for s in samples] == [None, None]
    # cut inside the first image: that sample is "truncated"
    path.write_bytes(data[:samples[0].members["jpg"][0] + 100])
    samples, err = index_shard(str(path))
    assert err == "truncated" and [(s.key, s.reason) for s in samples] == [("d/0001", "truncated")]
    # garbage where the third header should be: the samples before it are kept
    bad = bytearray(data)
    at = end - 512 - 512  # the header of d/0002.json
    bad[at:at + 512] = b"\x07" * 512
    path.write_bytes(bytes(bad))
    samples, err = index_shard(str(path))
    assert err == "bad_header" and [(s.key, sorted(s.members)) for s in samples] == [("d/0001", ["jpg", "txt"]),
                                                                                    ("d/0002", ["png"])]
    path.write_bytes(b"")
    assert index_shard(str(path)) == ([], "unreadable")
    assert index_shard(str(tmp_path / "gone.tar")) == ([], "unreadable")


def test_one_shard_mixed_four_ways_never_repeats_an_image_in_a_batch(clean_shards, tmp_path):
    """Issue 18 item 5: one shard and mix_shards=4 (four open visits of the same shard) used to put the same
    image twice into a batch (false negatives for ITC / ITM). A draw already in the batch is passed over now,
    unless the data holds fewer samples than a batch, which is reported at start."""
    from blip2fast.data.write_shards import write_shards

    root = clean_shards["root"]
    one = write_shards(str(root / "images"), str(root / "captions.json"), str(tmp_path / "one"), shard_size=100,
                       log=lambda s: None)["pattern"]
    L = loader(one, batch_size=8, mix_shards=4, shuffle_buffer=4)
    batches = take(L, 30)
    assert all(len(set(b["keys"])) == 8 for b in batches)
    assert sum(s["duplicates"] for s in L.state_dict()["streams"]) > 0  # the case arose and was handled
    with pytest.warns(UserWarning, match="hold only 24 sample.*fewer than a batch of 32.*repeats images"):
        small = loader(one, batch_size=32, mix_shards=4)
    assert small.allow_repeats and take(small, 2)[1]["pixel_values"].shape[0] == 32


class _FailingText:
    """A text encoder that fails on whole batches only (no single caption reproduces it), or kills the worker
    process it runs in: the two ways a loader worker can fail that are not bad samples."""

    def __init__(self, how: str):
        self.how, self.inner = how, word_text()

    def __call__(self, captions, batch_id=0):
        if len(captions) > 1 and self.how == "raise":
            raise RuntimeError("tokenizer state corrupted\nsecond line of the message")
        if len(captions) > 1 and self.how == "die":
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        if len(captions) > 1 and self.how == "hang":  # alive but stuck, as on a hung filesystem read
            time.sleep(3600)
        return self.inner(captions, batch_id)


@pytest.mark.parametrize("how,says", [
    ("raise", r"^rank 0, stream \d \(loader worker \d\), reading '.*\.tar': the text encoder fails on a batch of 4 "
              r"captions .* RuntimeError: tokenizer state corrupted second line of the message$"),
    ("die", r"^rank 0: a data loader worker failed \(open shards: '.*\.tar'.*\): DataLoader worker \(pid.*(killed|exited)"),
])
def test_worker_failure_is_one_line_and_stops_every_worker(clean_shards, how, says):
    import multiprocessing

    L = loader(clean_shards["pattern"], text=_FailingText(how), num_workers=2)
    t0 = time.monotonic()
    with pytest.raises(DataError) as e:
        take(L, 3)
    assert re.match(says, str(e.value)) and "\n" not in str(e.value), str(e.value)
    assert time.monotonic() - t0 < 30
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]  # nothing left to wait for at exit


def test_epoch_mode_checks_each_ranks_own_shards(clean_shards, tmp_path):
    """Epoch mode splits the shards by rank: a rank whose shards are all unusable fails at start (the other
    ranks' shards cannot feed it), naming the rank."""
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    urls = f"{expand_shards(clean_shards['pattern'])[0]}::{empty}"
    outcomes = []
    for rank in (0, 1):
        try:
            loader(urls, rank=rank, world=2, resampled=False)
            outcomes.append("ok")
        except DataError as e:
            outcomes.append(str(e))
    assert sorted(outcomes)[1] == "ok", outcomes
    assert re.match(rf"^no usable shard among the 1 that rank \d reads in epoch 1 of '.*': '{empty}' is an empty tar "
                    r"\(no samples\)$", sorted(outcomes)[0]), outcomes


def test_a_stuck_worker_is_one_line_after_the_timeout(clean_shards):
    """A worker that stays alive but never delivers ends the loop after data.worker_timeout seconds with one line
    naming the open shards and the flag, and no worker is left behind (before: the step blocked for ever)."""
    import multiprocessing

    L = loader(clean_shards["pattern"], text=_FailingText("hang"), num_workers=2, worker_timeout=2)
    t0 = time.monotonic()
    with pytest.raises(DataError) as e:
        take(L, 3)
    waited = time.monotonic() - t0
    assert re.match(r"^rank 0: no batch from the data loader workers in 2 s: a worker is stuck .*open shards: '.*\.tar'"
                    r".*raise --data.worker_timeout \(0: wait for ever\)$", str(e.value)), str(e.value)
    assert 2 <= waited < 30
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]
    with pytest.raises(ValueError, match="worker_timeout=-1 must be >= 0"):
        loader(clean_shards["pattern"], worker_timeout=-1)
