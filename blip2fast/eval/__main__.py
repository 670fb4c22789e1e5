"""`python -m blip2fast.eval {retrieval,caption,vqa} --model=PATH --data=...` (see blip2fast/eval/cli.py)."""
import sys

from .cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
