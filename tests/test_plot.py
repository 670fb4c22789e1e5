"""`python -m blip2fast.plot runs/<run>`: a PNG of the loss, learning-rate and held-out R@1 curves from
metrics.jsonl, and one-line errors for what it cannot plot."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from blip2fast.plot import PlotError, main, plot_run


def _write_run(folder, steps=(50, 100, 150, 200), resumed_at=None):
    folder.mkdir(parents=True, exist_ok=True)
    recs = [{"event": "start", "step": 0}, {"event": "eval", "step": 0, "when": "before", "n": 256,
                                              "chance": 1 / 256, "i2t_r1": 0.004, "t2i_r1": 0.008}]
    for s in steps:
        loss = 8.0 * math.exp(-s / 120) + 2.0
        recs.append({"event": "train", "step": s, "loss": loss, "itc": 0.4 * loss, "itm": 0.63,
                     "itg": 0.6 * loss - 0.63, "lr": 2e-3 * (1 + math.cos(math.pi * s / steps[-1])) / 2,
                     "grad_norm": 3.1})
    if resumed_at is not None:  # a resume logs a step again: the later record counts
        recs.append({"event": "resume", "step": resumed_at})
        recs.append({**recs[-2], "loss": 123.0})
    recs.append({"event": "eval", "step": steps[-1], "when": "after", "n": 256, "chance": 1 / 256, "i2t_r1": 0.31,
                 "t2i_r1": 0.29})
    with open(folder / "metrics.jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
        f.write('{"event": "train", "st')  # a torn last line from a kill is ignored


def test_plot_command_writes_a_png_of_the_curves(tmp_path, capsys):
    run = tmp_path / "runs" / "demo-1"
    _write_run(run)
    path = main([str(run)])
    assert path == str(run / "curves.png") and capsys.readouterr().out.strip() == f"wrote {path}"
    from PIL import Image

    img = Image.open(path)
    assert img.format == "PNG" and img.size == (1500, 420)
    colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # lines, text and legends drawn, not a blank canvas
    out = tmp_path / "elsewhere.png"
    assert main([str(run), f"--out={out}"]) == str(out) and out.read_bytes()[:4] == b"\x89PNG"


def test_a_resumed_step_keeps_its_last_record(tmp_path, monkeypatch):
    import matplotlib.axes

    run = tmp_path / "run"
    _write_run(run, resumed_at=150)
    plotted = []
    real_plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **k: plotted.append((list(a[0]), list(a[1]), k.get("label"))) or
                        real_plot(self, *a, **k))
    plot_run(str(run))
    total = next(p for p in plotted if p[2] == "loss (total)")
    assert total[0] == [50, 100, 150, 200] and total[1][-1] == 123.0  # step 200 re-logged after the resume
    r1 = next(p for p in plotted if p[2] == "image -> text R@1")
    assert r1 == ([0, 200], [0.004, 0.31], "image -> text R@1")


def test_what_cannot_be_plotted_is_one_line(tmp_path):
    with pytest.raises(PlotError, match="does not exist: give a run folder"):
        plot_run(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"event": "start", "step": 0}\n')
    with pytest.raises(PlotError, match="no training or evaluation record yet"):
        plot_run(str(tmp_path / "empty"))
    proc = subprocess.run([sys.executable, "-m", "blip2fast.plot", str(tmp_path / "nope")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("python -m blip2fast.plot: error: ") and "Traceback" not in proc.stderr
