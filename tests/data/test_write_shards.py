"""`python -m blip2fast.data.write_shards`: COCO JSON, JSON list and CSV inputs -> img2dataset-layout shards;
counts, missing files, reproducible bytes, errors that name the bad value, readable by webdataset itself."""
from __future__ import annotations

import csv
import glob
import json
import os
import subprocess
import sys
import tarfile

import braceexpand
import pytest

from blip2fast.data.write_shards import main, read_caption_file, write_shards
from tests.data.conftest import caption_for, coco_json, make_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_tars(pattern: str) -> dict:
    """{image name: (member extensions, captions)} over every shard of the pattern."""
    out = {}
    for path in braceexpand.braceexpand(pattern):
        with tarfile.open(path) as tar:
            members = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key, mem in members.items():
            meta = json.loads(mem["json"])
            out[meta["image"]] = (sorted(mem), meta["captions"], key)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("ws")
    return root, make_image_folder(root / "images", 12)


def test_coco_json(images, tmp_path, capsys):
    root, names = images
    coco = coco_json(tmp_path / "c.json", names, missing=["lost_1.jpg", "lost_2.png"], unknown_ids=[7, 8, 9])
    coco["images"].append({"id": 5000, "file_name": "no_caption.png"})
    coco["annotations"].append({"image_id": 5000, "caption": "   "})
    coco["images"].append({"id": 5001, "file_name": "readme.txt"})
    coco["annotations"].append({"image_id": 5001, "caption": "not an image"})
    (tmp_path / "c.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    s = write_shards(str(root / "images"), str(tmp_path / "c.json"), str(out), shard_size=5)
    log = capsys.readouterr().out
    assert s["samples"] == 12 and s["shards"] == 3 and s["source_images"] == 16
    assert s["skipped"] == {"missing": 2, "unsupported": 1, "no_caption": 1, "undecodable": 0}
    assert s["unknown_image_ids"] == 3
    assert "12 of 16 images" in log and "lost_1.jpg, lost_2.png" in log and "no_caption.png" in log
    assert "readme.txt" in log and "unknown image ids: 7, 8, 9" in log
    assert sorted(os.listdir(out)) == ["000000.tar", "000001.tar", "000002.tar", "summary.json"]
    assert s["pattern"] == str(out / "{000000..000002}.tar")
    assert json.loads((out / "summary.json").read_text())["samples"] == 12
    got = read_tars(s["pattern"])
    assert sorted(got) == sorted(names)
    for i, name in enumerate(names):
        exts, caps, _ = got[name]
        assert exts == sorted(["json", "jpg" if name.endswith(".jpg") else "png"])
        assert caps == [caption_for(i, j) for j in range(1 + i % 3)]  # every caption, in annotation order
    # keys: a running index over the shards; the order is shuffled (not the caption file's)
    keys = sorted(k for _, _, k in got.values())
    assert keys == [f"{i:09d}" for i in range(12)]
    assert [n for n, _ in sorted(got.items(), key=lambda kv: kv[1][2])] != names


def test_list_json_and_csv_merge_captions_per_image(images, tmp_path):
    root, names = images
    entries = [{"image": names[0], "caption": "first"}, {"image": names[1], "caption": ["x", "y"]},
               {"image": names[0], "caption": "second"}]
    (tmp_path / "l.json").write_text(json.dumps(entries))
    with open(tmp_path / "c.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["caption", "image", "extra"])
        w.writerows([["first, with comma", names[2], "1"], ["second", names[2], "2"], ["third", names[3], "3"]])
    s1 = write_shards(str(root / "images"), str(tmp_path / "l.json"), str(tmp_path / "o1"), 10, log=lambda s: None)
    s2 = write_shards(str(root / "images"), str(tmp_path / "c.csv"), str(tmp_path / "o2"), 1, shuffle_seed=None,
                      log=lambda s: None)
    assert s1["samples"] == 2 and s1["captions"] == 4 and s1["pattern"] == str(tmp_path / "o1" / "000000.tar")
    assert {k: v[1] for k, v in read_tars(s1["pattern"]).items()} == {names[0]: ["first", "second"],
                                                                     names[1]: ["x", "y"]}
    got = read_tars(s2["pattern"])
    assert {k: v[1] for k, v in got.items()} == {names[2]: ["first, with comma", "second"], names[3]: ["third"]}
    assert got[names[2]][2] == "000000000"  # --no_shuffle keeps the file's order


def test_same_inputs_same_bytes_and_overwrite(images, tmp_path):
    root, names = images
    coco_json(tmp_path / "c.json", names)
    a = write_shards(str(root / "images"), str(tmp_path / "c.json"), str(tmp_path / "a"), 4, log=lambda s: None)
    b = write_shards(str(root / "images"), str(tmp_path / "c.json"), str(tmp_path / "b"), 4, log=lambda s: None)
    for pa, pb in zip(braceexpand.braceexpand(a["pattern"]), braceexpand.braceexpand(b["pattern"])):
        assert open(pa, "rb").read() == open(pb, "rb").read()
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_shards(str(root / "images"), str(tmp_path / "c.json"), str(tmp_path / "a"), 4, log=lambda s: None)
    c = write_shards(str(root / "images"), str(tmp_path / "c.json"), str(tmp_path / "a"), 6, overwrite=True,
                     log=lambda s: None)
    assert c["shards"] == 2 and sorted(glob.glob(str(tmp_path / "a" / "*.tar"))) == [
        str(tmp_path / "a" / "000000.tar"), str(tmp_path / "a" / "000001.tar")]


def test_verify_skips_undecodable_images(images, tmp_path):
    root, names = images
    bad = root / "images" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    try:
        (tmp_path / "l.json").write_text(json.dumps([{"image": n, "caption": "c"} for n in names[:3] + ["broken.jpg"]]))
        s = write_shards(str(root / "images"), str(tmp_path / "l.json"), str(tmp_path / "o"), 10, verify=True,
                         log=lambda s: None)
        assert s["samples"] == 3 and s["skipped_files"]["undecodable"] == ["broken.jpg"]
    finally:
        bad.unlink()


def test_shards_load_in_webdataset(images, tmp_path):
    wds = pytest.importorskip("webdataset")
    root, names = images
    coco_json(tmp_path / "c.json", names)
    s = write_shards(str(root / "images"), str(tmp_path / "c.json"), str(tmp_path / "o"), 5, log=lambda s: None)
    samples = list(wds.WebDataset(s["pattern"], shardshuffle=False))
    assert len(samples) == 12 and all(("jpg" in x) != ("png" in x) and "json" in x for x in samples)


@pytest.mark.parametrize("case,match", [
    ("no_images_dir", "--images '.*nowhere': not a directory"),
    ("no_captions", "--captions '.*missing.json': no such file"),
    ("txt_captions", "unsupported extension '.txt'"),
    ("shard_size", "--shard_size 0: must be >= 1"),
    ("csv_columns", "must name the columns 'image' and 'caption', got \\['file', 'text'\\]"),
    ("coco_keys", "annotations\\[1\\] needs 'image_id' and 'caption'"),
    ("caption_type", "entry \\[0\\]: caption must be a string or a list of strings, got 5"),
    ("bad_json", "not valid UTF-8 JSON"),
    ("json_kind", "got a JSON str"),
])
def test_bad_arguments_are_errors_naming_the_value(images, tmp_path, capsys, case, match):
    root, names = images
    args = {"images": str(root / "images"), "captions": str(tmp_path / "c.json"), "shard_size": "5"}
    coco_json(tmp_path / "c.json", names[:2])
    if case == "no_images_dir":
        args["images"] = str(tmp_path / "nowhere")
    elif case == "no_captions":
        args["captions"] = str(tmp_path / "missing.json")
    elif case == "txt_captions":
        (tmp_path / "c.txt").write_text("x")
        args["captions"] = str(tmp_path / "c.txt")
    elif case == "shard_size":
        args["shard_size"] = "0"
    elif case == "csv_columns":
        (tmp_path / "c.csv").write_text("file,text\na.jpg,hello\n")
        args["captions"] = str(tmp_path / "c.csv")
    elif case == "coco_keys":
        (tmp_path / "c.json").write_text(json.dumps({"images": [{"id": 1, "file_name": names[0]}], "annotations": [
            {"image_id": 1, "caption": "ok"}, {"image_id": 1, "text": "no"}]}))
    elif case == "caption_type":
        (tmp_path / "c.json").write_text(json.dumps([{"image": names[0], "caption": 5}]))
    elif case == "bad_json":
        (tmp_path / "c.json").write_text("{not json")
    elif case == "json_kind":
        (tmp_path / "c.json").write_text('"just a string"')
    argv = [f"--{k}={v}" for k, v in args.items()] + [f"--out={tmp_path / 'out'}"]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    import re

    assert re.search(match, capsys.readouterr().err), case


def test_command_line(images, tmp_path):
    root, names = images
    coco_json(tmp_path / "c.json", names, missing=["gone.jpg"])
    cmd = [sys.executable, "-m", "blip2fast.data.write_shards", "--images", str(root / "images"), "--captions",
           str(tmp_path / "c.json"), "--out", str(tmp_path / "o"), "--shard_size", "7"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "12 of 13 images" in r.stdout and "1 image file(s) not found" in r.stdout and "gone.jpg" in r.stdout
    assert sorted(os.listdir(tmp_path / "o")) == ["000000.tar", "000001.tar", "summary.json"]
    r = subprocess.run(cmd[:-2] + ["--shard_size", "-3"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--shard_size -3" in r.stderr


def test_read_caption_file_reports_unknown_ids(tmp_path):
    coco_json(tmp_path / "c.json", ["a.jpg"], unknown_ids=[42])
    entries, problems = read_caption_file(str(tmp_path / "c.json"))
    assert [e["image"] for e in entries] == ["a.jpg"] and entries[0]["image_id"] == 1000
    assert problems["unknown_image_ids"] == [42]


def test_write_samples_from_memory(tmp_path):
    from blip2fast.data.shards import ShardLoader, WebDataConfig
    from blip2fast.data.synthetic import WordTokenizer
    from blip2fast.data.tokenize import Stage1Text
    from blip2fast.data.write_shards import write_samples
    from tests.data.conftest import encode, make_image

    samples = [(encode(make_image(i), "PNG"), "png", [f"a dog {i % 3}"], {"n": i}) for i in range(7)]
    assert write_samples(str(tmp_path), iter(samples), 3) == ["000000.tar", "000001.tar", "000002.tar"]
    text = Stage1Text(WordTokenizer(("a", "dog", "0", "1", "2"), 6), 6)
    L = ShardLoader(WebDataConfig(urls=str(tmp_path / "{000000..000002}.tar"), batch_size=7, image_size=16,
                                  num_workers=0, resampled=False, shuffle=False, train=False), text, 0, 1)
    (batch,) = list(L)
    assert batch["captions"] == [f"a dog {i % 3}" for i in range(7)]
    with pytest.raises(ValueError, match="'gif'"):
        write_samples(str(tmp_path / "x"), iter([(b"", "gif", ["c"], {})]), 3)
    assert not (tmp_path / "x").exists() or not os.listdir(tmp_path / "x")


def test_interrupted_write_leaves_no_partial_shard(tmp_path):
    from blip2fast.data.write_shards import write_samples

    def boom():
        yield b"x" * 10, "jpg", ["c"], {}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_samples(str(tmp_path), boom(), 5)
    assert os.listdir(tmp_path) == []
