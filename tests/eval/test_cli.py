"""`python -m blip2fast.eval` end to end on tiny folders: images + a COCO json (or a webdataset shard, or VQAv2
questions/annotations) written here, LAVIS's tiny stage-1 checkpoint (shared/reference) or a tiny stage-2
transformers folder; the table is printed and the JSON written. Plus the errors that name bad values."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import warnings

import numpy as np
import pytest
from PIL import Image

from blip2fast.eval import captioning
from blip2fast.eval.cli import main
from tests.eval.helpers import tiny_stage2_model, word_tokenizer
from tests.helpers import LAVIS_TINY

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAVIS_PTH = os.path.join(LAVIS_TINY, "lavis_tiny.pth")
BERT = os.path.join(LAVIS_TINY, "tokenizer")
CAPTIONS = [["a dog runs on the grass.", "A brown dog in a park"], ["two cats sleep on a red sofa"],
            ["a man rides a bicycle", "someone cycling down the street", "a bike on a road"],
            ["a plate of food with rice"]]


def image_bytes(seed: int, fmt: str, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A folder of images and a COCO-captions json (4 images, 1-3 captions each, one nested file name)."""
    root = tmp_path_factory.mktemp("coco")
    os.makedirs(root / "images" / "val", exist_ok=True)
    images, anns = [], []
    for i, caps in enumerate(CAPTIONS):
        name = f"val/{i:03d}.jpg" if i % 2 else f"{i:03d}.png"
        (root / "images" / name).write_bytes(image_bytes(i, "JPEG" if i % 2 else "PNG", (40 + 7 * i, 30)))
        images.append({"id": 100 + i, "file_name": name})
        anns += [{"image_id": 100 + i, "caption": c} for c in caps]
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root


def run_cli(args, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record = main(args)
    return record, capsys.readouterr().out


def test_retrieval_cli_subprocess(coco, tmp_path):
    """The real command: `python -m blip2fast.eval retrieval` with the LAVIS .pth."""
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "blip2fast.eval", "retrieval", f"--model={LAVIS_PTH}", "--config=tiny",
           f"--data={coco / 'captions.json'}", f"--images={coco / 'images'}", f"--tokenizer={BERT}", "--k=3",
           "--workers=0", "--batch_size=3", f"--out={out}", "--device=cpu"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "image->text" in proc.stdout and "text->image" in proc.stdout and "R@10" in proc.stdout
    rec = json.loads(out.read_text())
    m = rec["metrics"]
    assert rec["task"] == "retrieval" and m["n_images"] == 4 and m["n_texts"] == 7 and m["k"] == 3
    assert all(0.0 <= m[f"{d}_r{k}"] <= 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert m["i2t_r5"] == 1.0 and m["t2i_r5"] == 1.0  # 4 images: every image query is within 5
    assert m["chance_t2i_r1"] == pytest.approx(0.25)


def write_shard(path, samples):
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_retrieval_cli_on_shards(tmp_path, capsys):
    samples = [(f"{i:04d}", {"jpg": image_bytes(10 + i, "JPEG"), "txt": "\n".join(c).encode()})
               for i, c in enumerate(CAPTIONS)]
    samples.append(("9999", {"txt": b"no image here"}))  # skipped and counted
    write_shard(tmp_path / "s-0.tar", samples[:2])
    write_shard(tmp_path / "s-1.tar", samples[2:])
    out = tmp_path / "r.json"
    rec, printed = run_cli(["retrieval", f"--model={LAVIS_PTH}", "--config=tiny", "--data",
                            str(tmp_path / "s-{0..1}.tar"), f"--tokenizer={BERT}", "--workers=0",
                            f"--out={out}", "--device=cpu", "--resize=crop"], capsys)
    assert rec["metrics"]["n_images"] == 4 and rec["metrics"]["n_texts"] == 7
    assert "retrieval: 4 images, 7 texts" in printed and json.loads(out.read_text())["settings"]["resize"] == "crop"


def test_caption_cli_qformer_decoder(coco, tmp_path, capsys, monkeypatch):
    """Stage-1 captioning; the metric call is replaced (pycocoevalcap has its own test) to check what it gets."""
    seen = {}

    def fake_metrics(refs, preds, spice=True, log=print):
        seen.update(refs=refs, preds=preds)
        return {"Bleu_4": 0.25, "CIDEr": 1.5, "skipped": {"SPICE": "offline"}}

    monkeypatch.setattr(captioning, "caption_metrics", fake_metrics)
    monkeypatch.setattr(captioning, "caption_metrics_available", lambda: None)
    out = tmp_path / "c.json"
    rec, printed = run_cli(["caption", f"--model={LAVIS_PTH}", "--config=tiny", "--decoder=qformer",
                            f"--data={coco / 'captions.json'}", f"--images={coco / 'images'}", f"--tokenizer={BERT}",
                            "--num_beams=2", "--max_new_tokens=6", "--min_new_tokens=2", "--workers=0",
                            f"--out={out}", "--device=cpu"], capsys)
    preds = json.loads(out.read_text())["predictions"]
    assert [p["image_id"] for p in preds] == [100, 101, 102, 103]
    assert seen["refs"]["102"] == CAPTIONS[2] and set(seen["preds"]) == {"100", "101", "102", "103"}
    assert "Bleu_4" in printed and "25.00" in printed and "SPICE      skipped: offline" in printed
    assert rec["settings"]["decoder"] == "qformer" and rec["settings"]["num_beams"] == 2


@pytest.fixture(scope="module")
def stage2_folder(tmp_path_factory):
    """A tiny OPT-based stage-2 model saved as a transformers generation folder, with its tokenizer."""
    path = str(tmp_path_factory.mktemp("stage2"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_stage2_model("opt", seed=31).save_pretrained(path)
    word_tokenizer("opt").save_pretrained(path)
    return path


def test_caption_cli_llm(stage2_folder, coco, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(captioning, "caption_metrics_available", lambda: "pretend pycocoevalcap is missing")
    out = tmp_path / "c.json"
    rec, printed = run_cli(["caption", f"--model={stage2_folder}", f"--data={coco / 'captions.json'}",
                            f"--images={coco / 'images'}", "--num_beams=2", "--max_new_tokens=4", "--workers=0",
                            f"--out={out}", "--device=cpu"], capsys)
    saved = json.loads(out.read_text())
    assert saved["settings"]["prompt"] == "a photo of"
    assert saved["settings"]["min_new_tokens"] == 4  # the default 8, clamped to --max_new_tokens
    assert len(saved["predictions"]) == 4 and all(isinstance(p["caption"], str) for p in saved["predictions"])
    # without the metrics library the captions are still written and the reason is shown
    assert saved["metrics"]["skipped"] == {"all metrics": "pretend pycocoevalcap is missing"}
    assert "skipped: pretend pycocoevalcap is missing" in printed


def test_vqa_cli(stage2_folder, tmp_path, capsys):
    images = tmp_path / "val2014"
    images.mkdir()
    for i in (1, 2):
        (images / f"COCO_val2014_{i:012d}.jpg").write_bytes(image_bytes(40 + i, "JPEG"))
    questions = {"data_subtype": "val2014", "questions": [
        {"question_id": 11, "image_id": 1, "question": "what colour is the dog?"},
        {"question_id": 12, "image_id": 2, "question": "how many cats are there?"},
        {"question_id": 13, "image_id": 1, "question": "is it red?"}]}
    answers = {"annotations": [
        {"question_id": 11, "answer_type": "other", "answers": [{"answer": "red"}] * 10},
        {"question_id": 12, "answer_type": "number", "answers": [{"answer": "2"}] * 10},
        {"question_id": 13, "answer_type": "yes/no", "answers": [{"answer": "yes"}] * 5 + [{"answer": "no"}] * 5}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(answers))
    out = tmp_path / "v.json"
    rec, printed = run_cli(["vqa", f"--model={stage2_folder}", f"--data={tmp_path / 'q.json'}",
                            f"--images={images}", f"--annotations={tmp_path / 'a.json'}", "--num_beams=2",
                            "--workers=0", "--batch_size=2", f"--out={out}", "--device=cpu"], capsys)
    saved = json.loads(out.read_text())
    assert [p["question_id"] for p in saved["predictions"]] == [11, 12, 13]
    assert saved["settings"]["prompt"] == "Question: {} Answer:" and saved["settings"]["length_penalty"] == -1.0
    assert saved["settings"]["max_new_tokens"] == 10 and saved["settings"]["num_beams"] == 2
    m = saved["metrics"]
    assert m["n_questions"] == 3 and 0.0 <= m["accuracy"] <= 1.0 and set(m["per_answer_type"]) == {
        "other", "number", "yes/no"}
    assert "VQA: 3 questions" in printed and "accuracy" in printed


@pytest.mark.parametrize("args, message", [
    (["--k=0"], "--k=0 must be >= 1"),
    (["--model=/nonexistent/model.pth"], "--model='/nonexistent/model.pth' does not exist"),
    (["--config=nope"], "--config='nope' is neither a preset"),
    (["--images=/nonexistent"], "--images='/nonexistent' is not a folder"),
    (["--annotations=x.json"], "--annotations is for vqa"),
])
def test_cli_errors_name_the_bad_value(coco, capsys, args, message):
    base = ["retrieval", f"--model={LAVIS_PTH if os.path.isfile(LAVIS_PTH) else __file__}",
            f"--data={coco / 'captions.json'}", f"--images={coco / 'images'}"]
    with pytest.raises(SystemExit):
        main(base + args)
    assert message in capsys.readouterr().err


def test_data_errors_name_the_bad_value(coco, tmp_path):
    with pytest.raises(SystemExit, match="give --images"):
        main(["retrieval", f"--model={__file__}", f"--data={coco / 'captions.json'}"])
    (tmp_path / "bad.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "missing.jpg"}],
                                                   "annotations": [{"image_id": 1, "caption": "x"}]}))
    with pytest.raises(SystemExit, match="missing.jpg"):
        main(["retrieval", f"--model={__file__}", f"--data={tmp_path / 'bad.json'}", f"--images={tmp_path}"])
    with pytest.raises(SystemExit, match="do not exist"):
        main(["retrieval", f"--model={__file__}", f"--data={tmp_path / 'none-{0..1}.tar'}"])
