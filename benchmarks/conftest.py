"""Benchmarks are pytest-benchmark files named bench_<op>.py (see house style): collect them when pytest is given
this folder (`python -m pytest benchmarks`), not only when a file is named explicitly. The repository's conftest.py
(TRITON_INTERPRET=1 unless BLIP2FAST_GPU_TESTS=1) applies here too.

What the run ends with: one compact table per comparison (a benchmark group: the implementations of one op or one
step on the same inputs), at most 100 columns: median ms, samples/s (calls/s for an op), how many times faster
than each peer, peak memory above the inputs (GPU), MFU (end-to-end steps). Numbers come from each row's
extra_info, measured in the same process on the same inputs. Triton kernels on a machine without a GPU run under
Triton's CPU interpreter: those rows prove the kernels compute the right thing, their times mean nothing, so they
are listed under each table as correctness runs and never timed beside the others. pytest-benchmark's own table
(15 columns, over 200 wide) is hidden; BLIP2FAST_BENCH_TABLE=1 shows it, --benchmark-json=FILE keeps every
statistic.
"""
from __future__ import annotations

import os

import pytest
import torch

WIDTH = 100


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)


def interpreted(row: dict) -> bool:
    """A Triton implementation run by the CPU interpreter (no GPU): a correctness run, not a timing."""
    return "triton" in str(row.get("impl", "")) and (not torch.cuda.is_available()
                                                     or os.environ.get("TRITON_INTERPRET") == "1")


def _num(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if x >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def comparison_tables(rows_by_group: dict) -> list[str]:
    """The text lines of every group's table (each line <= 100 columns)."""
    lines = []
    for group, rows in rows_by_group.items():
        timed = [r for r in rows if not interpreted(r) and r.get("median_ms")]
        checked = [r for r in rows if interpreted(r)]
        first = rows[0]
        where = ", ".join(str(first[k]) for k in ("device", "size", "dtype") if first.get(k))
        lines.append("")
        lines.append((f"{group}  ({where})" if where else str(group))[:WIDTH])
        if timed:
            per_sample = all(r.get("samples_per_s") for r in timed)
            fixed = 14 + 11 + 11 + 9 + 7
            room = max(8, (WIDTH - fixed) // max(1, len(timed)) - 1)  # a peer's name shortened only if needed
            ratio_cols = [f"vs {str(r['impl'])[:room - 3]}" for r in timed]
            widths = [max(9, len(c)) + 2 for c in ratio_cols]
            head = f"{'impl':<14}{'median ms':>11}{'samples/s' if per_sample else 'calls/s':>11}"
            head += "".join(f"{c:>{w}}" for c, w in zip(ratio_cols, widths)) + f"{'peak MB':>9}{'MFU':>7}"
            lines.append(head[:WIDTH])
            for r in timed:
                ms = float(r["median_ms"])
                rate = r["samples_per_s"] if per_sample else 1e3 / ms
                line = f"{str(r['impl'])[:13]:<14}{_num(ms):>11}{_num(rate):>11}"
                for peer, w in zip(timed, widths):
                    # > 1: this row is that many times faster than the peer (same process, same inputs)
                    line += " " * w if peer is r else f"{float(peer['median_ms']) / ms:>{w - 1}.2f}x"
                mfu = r.get("mfu")
                line += f"{_num(r.get('peak_mem_mb')):>9}" + f"{'-' if mfu is None else f'{100 * mfu:.1f}%':>7}"
                lines.append(line[:WIDTH])
        if checked:
            names = ", ".join(sorted({str(r["impl"]) for r in checked}))
            lines.append(f"  {names}: Triton CPU interpreter, correctness run only (not a timing)"[:WIDTH])
    return lines


@pytest.hookimpl(hookwrapper=True)
def pytest_terminal_summary(terminalreporter):
    bs = getattr(terminalreporter.config, "_benchmarksession", None)
    wide = os.environ.get("BLIP2FAST_BENCH_TABLE") == "1"
    if bs is not None and not wide:
        def display(tr, _bs=bs):  # instead of the wide table: one line saying where it went
            if _bs.groups:
                tr.write_line("(pytest-benchmark's own 15-column table is hidden: BLIP2FAST_BENCH_TABLE=1 shows it; "
                              "--benchmark-json=FILE keeps every statistic)")
            _bs.check_regressions()
        bs.display = display
    yield
    if bs is None:
        return
    groups: dict = {}
    for bench in bs.benchmarks:
        info = dict(bench.extra_info or {})
        if info.get("impl") is None:
            continue
        groups.setdefault(bench.group or bench.name, []).append(info)
    if groups:
        terminalreporter.write_sep("=", "blip2fast comparisons (x = times faster than that peer)")
        for line in comparison_tables(groups):
            terminalreporter.write_line(line)
