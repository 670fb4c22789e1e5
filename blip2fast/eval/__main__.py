"""`python -m blip2fast.eval {retrieval,caption,vqa} --model=PATH --data=...` (see blip2fast/eval/cli.py)."""
import sys

from ..distributed import run_launched_cli
from .cli import main

if __name__ == "__main__":
    run_launched_cli(lambda: main(sys.argv[1:]))
