"""A shard set with ~10% corrupt samples (and a truncated shard and a non-tar file) trains to the end, and the
run reports the exact skip counts: per finished epoch against the known corruption, and at the end against an
independent loader reading the same number of batches."""
from __future__ import annotations

import dataclasses

from blip2fast.data.shards import ShardLoader
from blip2fast.training.data import demo_tokenizer, web_config
from blip2fast.data.tokenize import Stage1Text
from blip2fast.training.logging import read_metrics
from blip2fast.training.trainer import Trainer
from tests.training.conftest import tiny_config


def test_corrupt_samples_are_skipped_and_counted_exactly(tmp_path, corrupt_shards):
    cfg = tiny_config(tmp_path / "run", steps=34, every=17, batch=8, workers=2)
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, urls=corrupt_shards["pattern"], resampled=False,
                                               shuffle=True, shuffle_buffer=16))
    out = Trainer(cfg, print_fn=lambda s: None).fit()
    assert out["step"] == 34 and out["stopped"] is None
    losses = [r["loss"] for r in out["history"]]
    assert all(x == x for x in losses) and losses[-1] < losses[0]

    events = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    epoch_ends = [e for e in events if e["event"] == "epoch_end"]
    assert epoch_ends, "34 batches of 8 cover more than one epoch of 217 good samples"
    first = epoch_ends[0]
    expected = {k: corrupt_shards["expected_skips"].get(k, 0) for k in first["skipped"]}
    assert first["skipped"] == expected
    assert first["shard_errors"] == corrupt_shards["expected_shard_errors"]
    assert first["samples"] == corrupt_shards["good"]
    assert sum(expected.values()) / corrupt_shards["total"] >= 0.09

    # the final report equals an independent loader's count after the same 34 batches
    text = Stage1Text(demo_tokenizer(cfg.model), max_len=cfg.model.max_text_len)
    loader = ShardLoader(web_config(cfg, corrupt_shards["pattern"], 32), text, 0, 1)
    n = 0
    while n < 34:
        for _ in loader:
            n += 1
            if n == 34:
                break
    assert out["skipped"] == loader.skipped and out["shard_errors"] == loader.shard_errors
    assert out["samples_seen"] == loader.samples_seen
    end = [e for e in events if e["event"] == "end"][-1]
    assert end["skipped"] == loader.skipped
