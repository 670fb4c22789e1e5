"""The stage-1 demo (`python -m blip2fast.train`, the "demo" preset) and its procedural data."""
from __future__ import annotations

import math
import os

import torch

from blip2fast.config import blip2_tiny
from blip2fast.data.synthetic import (
    COLOURS, NO_OBJECT, POSITIONS, SCENES, SHAPES, SyntheticShapes, WordTokenizer, caption_vocabulary, render,
)
from blip2fast.train import lr_at, main
from blip2fast.training.config import parse_cli


def test_main_demo_run_learns_and_reports_retrieval(capsys, tmp_path, monkeypatch):
    """The default command's path end to end, shortened: demo shards written to the cache folder, read back by the
    loader's workers, training, checkpoints, the transformers export and the final retrieval line."""
    monkeypatch.setenv("BLIP2FAST_DEMO_CACHE", str(tmp_path / "cache"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the test process may share its cores (see tests/training/conftest.py)
    try:
        m = main(["--steps", "24", "--batch_size", "16", "--lr", "2e-3", "--eval.size", "32", "--logging.every", "6",
                  "--device", "cpu", "--data.demo_samples=1024", f"--checkpoint.dir={tmp_path / 'run'}",
                  "--checkpoint.every=12", "--eval.rerank_k=8"])
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    assert "writing the demo data once" in out and "held-out retrieval (N=32)" in out and "chance = 0.031" in out
    assert out.rstrip().splitlines()[-2].startswith("held-out retrieval (N=32): i2t R@1 = ")
    assert len(m["history"]) == 4
    for rec in m["history"]:
        for k in ("loss", "itc", "itm", "itg"):
            assert math.isfinite(rec[k]), rec
        assert abs(rec["loss"] - (rec["itc"] + rec["itm"] + rec["itg"])) < 1e-3 * rec["loss"]
    assert m["last"]["loss"] < m["first"]["loss"], m["history"]
    for k in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"):
        assert 0.0 <= m[k] <= 1.0
    assert m["n"] == 32 and m["chance"] == 1 / 32
    # the paper's protocol ran too (ITC top-8 rescored by ITM + cosine), on the same held-out pairs
    for k in ("rerank_i2t_r1", "rerank_t2i_r1", "rerank_i2t_r5", "rerank_t2i_r10"):
        assert 0.0 <= m[k] <= 1.0, k
    assert m["step"] == 24 and m["skipped"] == dict.fromkeys(m["skipped"], 0)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step_00000012", "step_00000024"]
    assert os.path.isfile(tmp_path / "run" / "hf" / "config.json") and m["export"] == str(tmp_path / "run" / "hf")
    assert os.path.isfile(tmp_path / "run" / "metrics.jsonl") and os.path.isfile(tmp_path / "run" / "config.json")
    # progress without a terminal: a line right after the first step, then one per window, each <= 100 columns
    progress = [line for line in out.splitlines() if line.startswith("step ")]
    assert progress[0].startswith("step 1/24 done (16 samples in ") and len(progress) == 5, progress
    assert [line.split()[1] for line in progress[1:]] == ["6/24", "12/24", "18/24", "24/24"], progress
    assert all(len(line) <= 100 for line in progress) and "\r" not in out
    # the curves: TensorBoard event files by default, and a PNG drawn at the end
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "run" / "tb"))
    with open(tmp_path / "run" / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"curves: {tmp_path / 'run' / 'curves.png'}" in out


def test_default_command_is_the_demo_preset():
    cfg = parse_cli([])
    assert cfg.preset == "demo" and cfg.data.urls == "" and cfg.data.tokenizer == "demo"
    assert (cfg.schedule.steps, cfg.data.batch_size, cfg.optim.lr, cfg.data.num_workers) == (600, 64, 2e-3, 2)
    assert cfg.device == "auto" and cfg.model.qformer.vocab_size == 1088 and cfg.eval.size == 256


def test_lr_schedule_warmup_then_cosine_to_floor():
    lrs = [lr_at(s, 1.0, 10, 100, 0.1) for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0  # linear warmup reaches the peak at the last warmup step
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then never increases
    assert abs(lr_at(100, 1.0, 10, 100, 0.1) - 0.1) < 1e-12


def _caption_from_labels(objs) -> str:
    """An independent restatement of the caption grammar, from the structured labels."""
    (c0, s0, p0), (c1, s1, p1) = objs
    first = f"a {COLOURS[c0]} {SHAPES[s0]}"
    if p1 == NO_OBJECT:
        where = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                 "centre": "in the centre"}[POSITIONS[p0]]
        return f"{first} {where}"
    relation = {("left", "right"): "to the left of", ("top", "bottom"): "above"}[(POSITIONS[p0], POSITIONS[p1])]
    return f"{first} {relation} a {COLOURS[c1]} {SHAPES[s1]}"


def test_captions_describe_what_is_drawn():
    data = SyntheticShapes(image_size=32, max_text_len=16, seed=3)
    batch = data.train_batch(0, 64)
    assert batch.pixel_values.shape == (64, 3, 32, 32) and batch.pixel_values.dtype == torch.float32
    for caption, objs in zip(batch.captions, batch.labels.tolist()):
        assert caption == _caption_from_labels(objs)

    # the pixels: around each object's position, the bright (non-background) pixels are mostly its colour
    img = render(batch.scene_ids, 32, torch.Generator().manual_seed(0), noise_std=0.0)
    centres = {"left": (16, 8), "right": (16, 24), "top": (8, 16), "bottom": (24, 16), "centre": (16, 16)}
    rgb = torch.tensor([[0.95, 0.10, 0.10], [0.10, 0.80, 0.15], [0.15, 0.25, 1.00], [0.95, 0.90, 0.10],
                        [0.65, 0.15, 0.85], [0.95, 0.95, 0.95]])
    for b, objs in enumerate(batch.labels.tolist()):
        drawn = 0
        for colour, _, pos in objs:
            if pos == NO_OBJECT:
                continue
            y, x = centres[POSITIONS[pos]]
            window = img[b, :, y - 4:y + 5, x - 4:x + 5].reshape(3, -1).T  # (81, 3), clear of the other object
            bright = window[window.max(dim=1).values > 0.5]  # the background is grey <= 0.3
            assert len(bright) >= 8, (batch.captions[b], POSITIONS[pos])
            nearest = (bright[:, None, :] - rgb[None]).norm(dim=-1).argmin(dim=1)
            assert (nearest == colour).float().mean() > 0.9, (batch.captions[b], POSITIONS[pos])
            drawn += 1
        assert drawn == (2 if objs[1][2] != NO_OBJECT else 1)
        assert img[b, :, :3, :3].max() <= 0.3 + 1e-6, batch.captions[b]  # corners: background only


def test_shapes_differ_in_pixels_and_data_is_deterministic():
    a = SyntheticShapes(seed=1)
    b1, b2 = a.train_batch(5, 8), SyntheticShapes(seed=1).train_batch(5, 8)
    assert torch.equal(b1.pixel_values, b2.pixel_values) and b1.captions == b2.captions
    assert not torch.equal(a.train_batch(6, 8).pixel_values, b1.pixel_values)
    e1, e2 = a.eval_set(100), SyntheticShapes(seed=1).eval_set(100)
    assert torch.equal(e1.pixel_values, e2.pixel_values)
    assert len(set(e1.captions)) == 100  # distinct captions: one correct answer per retrieval query
    # the four shapes at the same place, colour and size cover different pixel sets
    single = [i for i, s in enumerate(SCENES) if s.layout == "single" and s.objects[0][0] == 0
              and s.objects[0][2] == POSITIONS.index("centre")]
    masks = render(torch.tensor(single), 32, torch.Generator().manual_seed(0), noise_std=0.0)[:, 0] > 0.5
    assert len({m.numpy().tobytes() for m in masks}) == len(SHAPES)


def test_tokenizer_bert_layout_and_round_trip():
    cfg = blip2_tiny()
    tok = SyntheticShapes(max_text_len=cfg.max_text_len, vocab_size=cfg.qformer.vocab_size).tokenizer
    captions = [s.caption() for s in SCENES]
    ids, mask = tok(captions)
    assert ids.shape == (len(SCENES), cfg.max_text_len) and ids.dtype == torch.int64
    assert (ids[:, 0] == 101).all()
    lengths = mask.sum(1)
    assert (ids[torch.arange(len(ids)), lengths - 1] == 102).all()  # [SEP] closes every caption
    assert torch.equal(mask, (ids != 0).long())
    words = ids[(ids != 0) & (ids != 101) & (ids != 102)]
    assert words.min() >= 1000 and words.max() < 1000 + len(caption_vocabulary()) < cfg.qformer.dec_token_id
    assert tok.decode(ids) == captions
    try:
        tok(["a red hexagon"])
    except ValueError as e:
        assert "hexagon" in str(e)
    else:
        raise AssertionError("an out-of-vocabulary word must be an error")
    assert WordTokenizer(["x", "y"], max_len=4).decode(torch.tensor([[101, 1001, 1000, 102]])) == ["y x"]


def test_retrieval_counts_ties_and_nan_as_misses():
    from blip2fast.train import evaluate_retrieval

    class Fixed(torch.nn.Module):
        def __init__(self, scores):
            super().__init__()
            self.scores = scores

        def itc_scores(self, *args):
            return self.scores

    data = SyntheticShapes()
    eval_set = data.eval_set(4)
    batch = {"pixel_values": eval_set.pixel_values, "input_ids": eval_set.input_ids,
             "attention_mask": eval_set.attention_mask}
    assert evaluate_retrieval(Fixed(torch.eye(4)), batch, torch.device("cpu"))["i2t_r1"] == 1.0
    collapsed = evaluate_retrieval(Fixed(torch.ones(4, 4)), batch, torch.device("cpu"))
    assert collapsed["i2t_r1"] == 0.0 and collapsed["t2i_r1"] == 0.0 and collapsed["i2t_r5"] == 1.0
    nan = evaluate_retrieval(Fixed(torch.full((4, 4), float("nan"))), batch, torch.device("cpu"))
    assert nan["i2t_r1"] == 0.0 and nan["t2i_r1"] == 0.0
    shifted = torch.eye(4).roll(1, dims=1)  # image i's best text is i + 1
    r = evaluate_retrieval(Fixed(shifted), batch, torch.device("cpu"))
    assert r["i2t_r1"] == 0.0 and r["t2i_r1"] == 0.0
