"""`python -m blip2fast.plot runs/<run>`: the run's curves as one PNG (<run>/curves.png), drawn from metrics.jsonl.

Three panels over optimiser steps: the training loss (and its terms, means over each logging window), the
learning rate, and the held-out metric (stage 1: retrieval R@1 both ways against chance; stage 2: the held-out
LM loss). A resumed run's repeated steps keep their last record. Needs matplotlib; TensorBoard reads <run>/tb.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

from .training.logging import read_metrics

USAGE = "usage: python -m blip2fast.plot RUN_FOLDER [--out=PNG]   (default: RUN_FOLDER/curves.png)"


class PlotError(ValueError):
    """Nothing to plot, or no matplotlib; the message says what to do."""


def _last_per_step(records: list, event: str) -> list:
    by_step = {}
    for r in records:
        if r.get("event") == event and isinstance(r.get("step"), int):
            by_step[r["step"]] = r  # a resumed run logs some steps again: keep the last
    return [by_step[s] for s in sorted(by_step)]


def _schedule(folder: str) -> Optional[dict]:
    """The learning-rate schedule from <run>/config.json (None when absent or unreadable)."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)
        return {"lr": float(cfg["optim"]["lr"]), "warmup": int(cfg["schedule"]["warmup_steps"]),
                "steps": int(cfg["schedule"]["steps"]), "min_lr": float(cfg["schedule"]["min_lr"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def plot_run(run: str, out: Optional[str] = None) -> str:
    """Write the curves of the run folder (or metrics.jsonl file) `run` to `out`; returns the PNG's path."""
    path = run if run.endswith(".jsonl") else os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        raise PlotError(f"{path} does not exist: give a run folder written by python -m blip2fast.train "
                        "(runs/<preset>-<date>-<time>)")
    records = read_metrics(path)
    train = _last_per_step(records, "train")
    evals = [r for r in _last_per_step(records, "eval")]
    if not train and not evals:
        raise PlotError(f"{path} holds no training or evaluation record yet (the first comes after logging.every "
                        "steps)")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("matplotlib is not installed (pip install matplotlib); TensorBoard reads the same curves "
                        f"from {os.path.join(os.path.dirname(path), 'tb')}") from None
    folder = os.path.dirname(path) or "."
    out = out or os.path.join(folder, "curves.png")
    schedule = _schedule(folder)
    last_step = max([r["step"] for r in train + evals] + ([schedule["steps"]] if schedule else []))

    fig, (ax_loss, ax_lr, ax_eval) = plt.subplots(1, 3, figsize=(15, 4.2), dpi=100)
    steps = [r["step"] for r in train]
    terms = [k for k in ("itc", "itm", "itg") if train and all(k in r for r in train)]
    if train:
        ax_loss.plot(steps, [r["loss"] for r in train], color="black", lw=2, label="loss (total)")
        for k, colour in zip(terms, ("tab:blue", "tab:orange", "tab:green")):
            ax_loss.plot(steps, [r[k] for r in train], color=colour, lw=1.2, label=k)
        ax_loss.legend(frameon=False)
        ax_lr.plot(steps, [r["lr"] for r in train], "o", color="tab:purple", ms=4, label="logged")
    if schedule:  # the whole schedule (warmup included) from the run's config, beside the logged values
        from .training.optim import lr_at

        xs = list(range(0, schedule["steps"] + 1, max(1, schedule["steps"] // 400)))
        ax_lr.plot(xs, [lr_at(max(0, x - 1), schedule["lr"], schedule["warmup"], schedule["steps"],
                              schedule["min_lr"]) for x in xs], color="tab:purple", lw=1.5, label="schedule")
        ax_lr.legend(frameon=False)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_loss.set_title("training loss (window means)")
    ax_lr.set_title("learning rate")

    if evals and "i2t_r1" in evals[-1]:
        ev = [r for r in evals if "i2t_r1" in r]
        x = [r["step"] for r in ev]
        ax_eval.plot(x, [r["i2t_r1"] for r in ev], "o-", color="tab:blue", label="image -> text R@1")
        ax_eval.plot(x, [r["t2i_r1"] for r in ev], "s-", color="tab:orange", label="text -> image R@1")
        ax_eval.axhline(ev[-1]["chance"], color="grey", ls="--", lw=1, label=f"chance ({ev[-1]['chance']:.3g})")
        ax_eval.set_ylim(0, max(0.05, 1.15 * max(max(r["i2t_r1"], r["t2i_r1"]) for r in ev)))
        ax_eval.set_title(f"held-out retrieval R@1 (N={ev[-1]['n']})")
        ax_eval.legend(frameon=False)
    elif evals and "loss" in evals[-1]:
        ev = [r for r in evals if "loss" in r]
        ax_eval.plot([r["step"] for r in ev], [r["loss"] for r in ev], "o-", color="tab:red", label="held-out loss")
        ax_eval.set_title("held-out LM loss")
        ax_eval.legend(frameon=False)
    else:
        ax_eval.set_title("no held-out evaluation in this run")
    for ax in (ax_loss, ax_lr, ax_eval):
        ax.set_xlabel("optimiser step")
        ax.set_xlim(0, max(1, last_step) * 1.02)
        ax.grid(alpha=0.3)
    fig.suptitle(os.path.relpath(os.path.abspath(folder)) if not os.path.isabs(run) else os.path.abspath(folder))
    fig.tight_layout()
    tmp = out + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)  # never a half-written PNG
    return out


def main(argv: Optional[Sequence[str]] = None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    run, out = None, None
    for a in argv:
        if a.startswith("--out="):
            out = a.split("=", 1)[1]
        elif a.startswith("-") or run is not None:
            print(f"python -m blip2fast.plot: error: unexpected argument {a!r}; {USAGE}", file=sys.stderr)
            raise SystemExit(2)
        else:
            run = a
    if run is None:
        print(f"python -m blip2fast.plot: error: no run folder given; {USAGE}", file=sys.stderr)
        raise SystemExit(2)
    try:
        path = plot_run(run, out)
    except PlotError as e:
        print(f"python -m blip2fast.plot: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
