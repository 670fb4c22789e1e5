"""The table `pytest benchmarks/ --benchmark-only` ends with (benchmarks/conftest.py): <= 100 columns, ratios
against each peer from the same run, interpreter-run Triton rows listed as correctness runs and never timed."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks",
                     "conftest.py")
_spec = importlib.util.spec_from_file_location("benchmarks_conftest", _PATH)
bench_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_conftest)


def test_one_compact_table_per_comparison(monkeypatch):
    monkeypatch.setattr(bench_conftest.torch.cuda, "is_available", lambda: True)  # GPU rows: Triton is timed
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rows = {"stage2_step": [dict(impl=n, median_ms=ms, samples_per_s=round(128 / ms * 1e3, 1), mfu=m,
                                 peak_mem_mb=mb, device="NVIDIA H100 80GB HBM3", size="paper sizes (GPU)")
                            for n, ms, m, mb in (("blip2fast", 10.0, 0.412, 2048.0), ("lavis", 25.0, 0.165, 4096.0),
                                                 ("transformers", 31.0, 0.133, 5120.0))],
            "itc Ba=1024 lavis": [dict(impl=n, median_ms=ms) for n, ms in (("triton", 0.1), ("torch", 0.35))]}
    lines = bench_conftest.comparison_tables(rows)
    assert all(len(line) <= 100 for line in lines), [len(line) for line in lines]
    text = "\n".join(lines)
    head = next(line for line in lines if line.startswith("impl") and "samples/s" in line)
    for col in ("median ms", "vs blip2fast", "vs lavis", "vs transformers", "peak MB", "MFU"):
        assert col in head, (col, head)
    ours = next(line for line in lines if line.startswith("blip2fast"))
    assert ours.split() == ["blip2fast", "10", "12,800", "2.50x", "3.10x", "2,048", "41.2%"], ours
    assert "calls/s" in text and next(line for line in lines if line.startswith("triton")).split()[3] == "3.50x"


def test_interpreter_rows_are_correctness_runs_not_timings(monkeypatch):
    monkeypatch.setattr(bench_conftest.torch.cuda, "is_available", lambda: False)
    rows = {"layer_norm 64x100 fwd": [dict(impl="triton", median_ms=900.0), dict(impl="torch", median_ms=0.2)]}
    lines = bench_conftest.comparison_tables(rows)
    assert not any(line.startswith("triton") for line in lines)  # no time, no ratio beside the real timing
    assert "  triton: Triton CPU interpreter, correctness run only (not a timing)" in lines
    assert not any("x" in line.split()[-1] for line in lines if line.startswith("torch"))  # no ratio vs triton


TOY_BENCH = """
import pytest

@pytest.mark.parametrize("impl,ms", [("fast", 1.0), ("slow", 4.0)])
def test_x(benchmark, impl, ms):
    benchmark.group = "toy"
    benchmark.extra_info.update(impl=impl, median_ms=ms, samples_per_s=8 / ms * 1e3)
    benchmark.pedantic(lambda: None, rounds=2)
"""


@pytest.mark.parametrize("wide", ["0", "1"])
def test_the_benchmark_entry_point_hides_the_wide_table(tmp_path, wide):
    """A real `pytest --benchmark-only` run through this conftest: the comparison table comes last, and
    pytest-benchmark's own table only when asked for."""
    (tmp_path / "conftest.py").write_text(open(_PATH).read())
    (tmp_path / "bench_x.py").write_text(TOY_BENCH)
    env = dict(os.environ, BLIP2FAST_BENCH_TABLE=wide, COLUMNS="100")
    proc = subprocess.run([sys.executable, "-m", "pytest", "--benchmark-only", "-p", "no:cacheprovider", "bench_x.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-2000:]
    tail = out[out.index("blip2fast comparisons"):]
    assert "toy" in tail and "vs slow" in tail and "4.00x" in tail
    assert ("Min " in out) == (wide == "1") and ("own 15-column table is hidden" in out) == (wide == "0")
