"""`python -m blip2fast.train`: BLIP-2 pre-training, stage 1 or 2, from a preset plus `--key=value` overrides.

With no arguments it runs the "demo" preset: a short stage-1 run (ITC + ITM + ITG) of a tiny BLIP-2 on procedural
shapes, written once as webdataset shards to ~/.cache/blip2fast/demo-shards (~75 MB), 600 steps (under 2 minutes on
2 idle CPU cores), ending with held-out retrieval R@1 next to chance and runs/<run>/curves.png. `--help` starts
with usage and the common commands, then every option; the pieces live in `blip2fast.training` (config, optim,
checkpoint, logging, data, model, evaluate, trainer). Errors the user can fix are one line on stderr, exit 2.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from .data.shards import DataError
from .training.config import ConfigError, parse_cli
from .training.evaluate import evaluate_retrieval, retrieval_metrics
from .training.optim import lr_at
from .training.trainer import Trainer, run

__all__ = ["Trainer", "evaluate_retrieval", "lr_at", "main", "retrieval_metrics", "run"]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse the command line, train, return the run's summary (see `Trainer.fit`)."""
    try:
        return run(parse_cli(argv))
    except (ConfigError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, DataError,
            FloatingPointError) as e:  # a bad option, a bad path, data that cannot feed the run, a diverged loss:
        # the message (one line) says what and where
        print(f"python -m blip2fast.train: error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # the second Ctrl-C (the first saves a checkpoint and stops at the next step)
        print("python -m blip2fast.train: interrupted; the newest complete checkpoint is intact (--resume=latest)",
              file=sys.stderr)
        raise SystemExit(130) from None
    except BrokenPipeError:  # `--help | head`: the reader left
        sys.stderr.close()
        raise SystemExit(0) from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())  # OSError's own "[Errno 2] ...: 'path'" included
    return text or type(e).__name__


if __name__ == "__main__":
    from .distributed import run_launched_cli

    run_launched_cli(main)
