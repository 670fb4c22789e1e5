"""`run_launched_cli` (blip2fast/distributed.py): under torchrun a CLI process ends with its own exit code and
without the interpreter's teardown (where gloo's threads now and then aborted a finished two-rank run with -6);
a single process exits as usual."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# main() registers an exit handler: it runs only when the interpreter tears down normally
SCRIPT = """
import atexit, sys
from blip2fast.distributed import run_launched_cli

def main():
    atexit.register(lambda: print("teardown ran", flush=True))
    print("main ran", flush=True)
    how = sys.argv[1]
    if how == "message":
        raise SystemExit("--flag=x: a one-line error")
    if how == "code":
        raise SystemExit(2)

run_launched_cli(main)
"""


@pytest.mark.parametrize("world,how,code,err", [
    ("2", "ok", 0, ""), ("2", "code", 2, ""), ("2", "message", 1, "--flag=x: a one-line error"),
    ("1", "ok", 0, ""), ("1", "message", 1, "--flag=x: a one-line error"),
])
def test_exit_code_and_teardown(world, how, code, err):
    env = dict(os.environ, WORLD_SIZE=world, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, how], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "main ran" in proc.stdout and err in proc.stderr
    # launched (WORLD_SIZE > 1): no teardown at all; one process: the interpreter's usual exit
    assert ("teardown ran" in proc.stdout) == (world == "1"), proc.stdout
