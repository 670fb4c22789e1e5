"""pytest plugin for the GPU check (`-p pytest_outcomes` with benchmarks/gpu on PYTHONPATH): each test's outcome is
appended to $BLIP2FAST_OUTCOMES_JSONL as soon as it is known, so a stage stopped at its time limit still knows which
tests passed and which failed (pytest's own summary is printed only at the end)."""
from __future__ import annotations

import json
import os


def pytest_runtest_logreport(report):
    path = os.environ.get("BLIP2FAST_OUTCOMES_JSONL")
    if not path:
        return
    # one line per test: its call, or the setup / teardown that failed or skipped it
    if report.when != "call" and report.passed:
        return
    outcome = report.outcome if report.when == "call" else ("skipped" if report.skipped else "error")
    message = ""
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr)[-300:]
    elif report.skipped and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2])
    with open(path, "a") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "outcome": outcome,
                            "duration": round(report.duration, 3), "message": message[:300]}) + "\n")


def pytest_collectreport(report):
    """A module that cannot be imported is one error line (its tests never run)."""
    path = os.environ.get("BLIP2FAST_OUTCOMES_JSONL")
    if not path or not report.failed:
        return
    crash = getattr(report.longrepr, "reprcrash", None)
    message = crash.message if crash is not None else str(report.longrepr).strip().splitlines()[-1:]
    with open(path, "a") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "when": "collect", "outcome": "error", "duration": 0.0,
                            "message": str(message)[:300]}) + "\n")
