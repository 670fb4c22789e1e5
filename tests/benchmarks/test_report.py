"""benchmarks/report.py: results files -> the README performance table; the marker replacement touches nothing else."""
from __future__ import annotations

import copy
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("bench_report", os.path.join(ROOT, "benchmarks", "report.py"))
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def e2e_info(bench, impl, sps, speedup, mfu=0.4, peak_mb=2048.0):
    return {"bench": bench, "impl": impl, "device": "NVIDIA H200", "size": "paper sizes (GPU)", "batch": 128,
            "median_ms": 128 / sps * 1e3, "samples_per_s": sps, "speedup_vs": speedup, "peak_mem_mb": peak_mb,
            "tflops": 395.5, "mfu": mfu, "peak_tflops_measured": 760.0}


# a pytest-benchmark JSON document as `--benchmark-json` writes it (the fields report.py reads)
BENCH_JSON = {
    "machine_info": {"cpu": {"brand_raw": "Some CPU"}},
    "commit_info": {"id": "0123456789abcdef0123456789abcdef01234567", "dirty": True},
    "datetime": "2026-12-01T10:00:00.000000+00:00",
    "benchmarks": [
        {"group": "stage1_step", "name": "test_stage1_step[blip2fast]", "stats": {"median": 0.25},
         "extra_info": e2e_info("stage1_step", "blip2fast", 512.0, {"lavis": 1.37})},
        {"group": "stage1_step", "name": "test_stage1_step[lavis]", "stats": {"median": 0.34},
         "extra_info": e2e_info("stage1_step", "lavis", 373.7, {"blip2fast": 0.73}, peak_mb=30000.0)},
        {"group": "itm_scores", "name": "test_qformer_hf[itm_scores-transformers]", "stats": {"median": 0.01},
         "extra_info": e2e_info("itm_scores", "transformers", 9000.0, {"blip2fast": 0.5})},
        {"group": "itm_scores", "name": "test_qformer_hf[itm_scores-blip2fast]", "stats": {"median": 0.005},
         "extra_info": e2e_info("itm_scores", "blip2fast", 18000.0, {"transformers": 2.0})},
        {"group": "layer_norm 8192x768 fwd", "name": "test_layer_norm[fwd-triton]", "stats": {"median": 1e-4},
         "extra_info": {"impl": "triton", "median_ms": 0.1, "speedup_vs_torch": 2.5, "gbps": 2500.0}},
    ],
}


def test_collect_and_table():
    results = report.collect_docs([copy.deepcopy(BENCH_JSON)])
    assert results["schema"] == report.SCHEMA and results["date"] == "2026-12-01" and results["kind"] == "gpu"
    assert results["commit"].startswith("0123456789") and results["device"] == "NVIDIA H200"
    assert len(results["e2e"]) == 4 and len(results["ops"]) == 1
    table = report.render(results, source="benchmarks/results/x.json")
    lines = table.splitlines()
    assert "commit `0123456789` (uncommitted changes)" in table and "paper sizes (GPU)" in table
    header = next(l for l in lines if l.startswith("| benchmark"))
    assert "LAVIS formulation (samples/s)" in header and "transformers (samples/s)" in header
    stage1 = next(l for l in lines if l.startswith("| stage-1"))
    cells = [c.strip() for c in stage1.strip("|").split("|")]
    # batch, samples/s ours / LAVIS / transformers, ratio vs LAVIS, vs transformers, TFLOP/s (MFU), memory
    assert cells[1:] == ["128", "512", "374", "n/a", "1.37x", "n/a", "396 (40.0%)", "2.00 GB / 29.30 GB / n/a"]
    itm = next(l for l in lines if l.startswith("| ITM scoring"))
    assert "2.00x" in itm and "18,000" in itm
    assert lines.index(stage1) < lines.index(itm)  # the fixed row order
    assert "| layer_norm 8192x768 fwd | triton | 0.1 | 2.50x | 2,500 GB/s |" in table


def test_gpu_results_file_is_read_like_a_results_file():
    e2e, ops = report.rows_from(BENCH_JSON)
    gpu = {"schema": 1, "mode": "gpu", "started": "2026-12-02T09:00:00+00:00", "ok": True,
           "stages": {"env": {"status": "ok", "data": {"git_commit": "f" * 40, "git_dirty_files": 0,
                                                       "torch": "2.11.0+cu130", "triton": "3.6.0",
                                                       "transformers": "5.17.0", "python": "3.12.3",
                                                       "gpu": {"name": "NVIDIA H200"}}},
                      "e2e_stage1": {"status": "ok", "data": {"e2e_rows": e2e[:2]}},
                      "ops": {"status": "ok", "data": {"op_rows": ops}}}}
    r = report.from_gpu_results(gpu)
    assert r["date"] == "2026-12-02" and r["device"] == "NVIDIA H200" and r["kind"] == "gpu"
    assert r["versions"]["torch"] == "2.11.0+cu130" and len(r["e2e"]) == 2 and len(r["ops"]) == 1
    assert "torch 2.11.0+cu130, triton 3.6.0, transformers 5.17.0" in report.render(r)


README = ("# title\r\n\r\nSome text with unicode — é ✓ and trailing spaces   \n"
          "<!-- perf-table:start -->\nold table line 1\nold | table\n<!-- perf-table:end -->\n"
          "after the table\n\nno newline at the end")


def test_marker_replacement_keeps_everything_else_byte_identical():
    new = report.replace_between_markers(README, "| a | b |\n|---|---|")
    i, j = README.index(report.START) + len(report.START), README.index(report.END)
    assert new.startswith(README[:i]) and new.endswith(README[j:])
    assert new[len(README[:i]):len(new) - len(README[j:])] == "\n| a | b |\n|---|---|\n"
    assert "old table" not in new
    again = report.replace_between_markers(new, "| a | b |\n|---|---|")
    assert again == new  # idempotent
    with pytest.raises(ValueError, match="marker"):
        report.replace_between_markers("# no markers\n", "x")
    with pytest.raises(ValueError, match="more than once"):
        report.replace_between_markers(README + "\n" + report.START + "\n", "x")


def test_command_line_writes_only_between_the_markers(tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(BENCH_JSON))
    results = tmp_path / "results" / "gpu.json"
    assert report.main(["collect", str(bench), "--out", str(results)]) == 0
    readme = tmp_path / "README.md"
    readme.write_bytes(README.encode())
    assert report.main([str(results), "--readme", str(readme)]) == 0
    text = readme.read_bytes().decode()
    i, j = README.index(report.START) + len(report.START), README.index(report.END)
    assert text.startswith(README[:i]) and text.endswith(README[j:])
    assert "| stage-1 training step" in text and "1.37x" in text


def test_cpu_rows_and_execution_modes():
    """CPU rows have no peak memory (the column goes); rows whose impl is an execution mode get their own table."""
    cpu = {k: v for k, v in e2e_info("stage2_step", "blip2fast", 600.0, {"lavis": 0.7}).items()}
    cpu.update(device="2-core CPU (X)", size="CPU/tiny", peak_mem_mb=None, threads=1)
    modes = [dict(cpu, bench="train_step_modes", impl="eager", samples_per_s=160.0, speedup_vs={"fp8": 0.8}),
             dict(cpu, bench="train_step_modes", impl="fp8", samples_per_s=200.0, speedup_vs={"eager": 1.25})]
    doc = {"commit_info": {"id": "abc", "dirty": False}, "datetime": "2026-11-28T00:00:00",
           "benchmarks": [{"group": r["bench"], "name": r["impl"], "stats": {"median": 0.01}, "extra_info": r}
                          for r in [cpu] + modes]}
    results = report.collect_docs([doc])
    assert results["kind"] == "cpu" and results["size"] == "CPU/tiny"
    table = report.render(results)
    assert "peak memory" not in table and "1 torch thread" in table and "(uncommitted" not in table
    assert "| train_step_modes | fp8 | 128 | 200 | 1.25x |" in table
    assert "| train_step_modes | eager | 128 | 160 | 1.00x |" in table
    stage2 = next(l for l in table.splitlines() if l.startswith("| stage-2"))
    assert stage2 == "| stage-2 training step (frozen OPT, fwd + bwd) | 128 | 600 | 396 (40.0%) |"  # no peer rows:
    assert "LAVIS" not in table  # no peer columns


def test_measured_backend_order_ranks_only_the_ops_backends(tmp_path):
    """`measured` ranks each op's backends by summed median over its groups (peers like SDPA or full logits are
    not backends; a backend missing from a group is not ranked), refuses CPU results, and writes what
    ops/dispatch.py reads."""
    def op(group, impl, ms):
        return {"group": group, "impl": impl, "median_ms": ms}

    results = {"schema": report.SCHEMA, "kind": "gpu", "device": "NVIDIA H200", "date": "2026-12-01",
               "commit": "abc", "e2e": [], "ops": [
                   op("itc Ba=128 lavis", "triton", 0.2), op("itc Ba=128 lavis", "torch", 0.5),
                   op("itc Ba=128 lavis", "cpp", 0.3), op("itc Ba=8192 lavis", "triton", 2.0),
                   op("itc Ba=8192 lavis", "torch", 1.0), op("itc Ba=8192 lavis", "cpp", 4.0),
                   op("linear_ce fwd_bwd frozen", "full", 0.1), op("linear_ce fwd_bwd frozen", "torch", 3.0),
                   op("linear_ce fwd_bwd frozen", "triton", 2.0),
                   op("itm_cross fwd", "sdpa", 0.01), op("itm_cross fwd", "torch", 0.3),
                   op("itm_cross fwd", "triton", 0.2), op("itg fwd", "torch", 0.4),  # triton missing from "itg"
                   op("something else", "triton", 0.1)]}
    orders = report.measured_orders(results)
    assert orders["itc_loss"]["order"] == ["torch", "triton", "cpp"]  # 1.5 < 2.2 < 4.3 ms
    assert orders["itc_loss"]["groups"] == 2
    assert orders["linear_cross_entropy"]["order"] == ["triton", "torch"]  # "full" is no backend
    assert orders["qformer_attention"]["order"] == ["torch"]  # triton was not timed in every group
    assert set(orders) == {"itc_loss", "linear_cross_entropy", "qformer_attention"}
    src = tmp_path / "gpu.json"
    src.write_text(json.dumps(results))
    out = tmp_path / "measured.json"
    assert report.main(["measured", str(src), "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["ops"]["itc_loss"]["order"] == ["torch", "triton", "cpp"] and written["source"] == "gpu.json"
    with pytest.raises(ValueError, match="not a GPU run"):
        report.measured_orders(dict(results, kind="cpu"))


README_WITH_BOTH = ("# title\n\nintro — é\n<!-- gpu-stages:start -->\nold stage table\n<!-- gpu-stages:end -->\n"
                    "middle text\n<!-- perf-table:start -->\nold perf\n<!-- perf-table:end -->\nend, no newline")


def synthetic_gpu_results(commit: str = "f" * 40) -> dict:
    """What benchmarks/gpu/run.sh writes (schema 2) after a GPU run, with rows of every kind."""
    e2e, ops = report.rows_from(BENCH_JSON)

    def op(group, impl, ms, **kw):
        return {"group": group, "impl": impl, "median_ms": ms, "speedup_vs_torch": None, **kw}

    attention = [op("itm_cross fwd_bwd p=0.1", "triton", 0.9), op("itm_cross fwd_bwd p=0.1", "torch", 2.7),
                 op("itm_cross fwd_bwd p=0.1", "sdpa", 1.1), op("query_self fwd", "triton", 0.05),
                 op("query_self fwd", "torch", 0.04)]
    sampler = [op("itm_sampling 128x8192 bfloat16", "cpp", 0.02, indices_equal_reference=True),
               op("itm_sampling 128x8192 bfloat16", "triton", 0.03, indices_equal_reference=True),
               op("itm_sampling 128x8192 bfloat16", "torch", 0.4, indices_equal_reference=True)]
    modes = [dict(e2e[0], bench="train_step_modes", impl=m, samples_per_s=s, speedup_vs={})
             for m, s in (("eager", 400.0), ("cuda_graphs", 480.0), ("fp8", 520.0))]

    def stage(status, seconds, limit, **data):
        return {"status": status, "seconds": seconds, "limit_s": limit, "fatal": True, "message": "", "data": data}

    return {"schema": 2, "mode": "gpu", "started": "2026-12-08T09:00:00+00:00", "ok": False, "commit": commit,
            "dirty": 0, "budget_s": 460,
            "stages": {"env": stage("ok", 3.9, 10, git_commit=commit, git_dirty_files=0, torch="2.11.0+cu130",
                                    triton="3.6.0", transformers="5.17.0", python="3.12.3",
                                    gpu={"name": "NVIDIA H200"}),
                       "build": stage("failed", 104.0, 105, loaded=False),
                       "cuda_tests": stage("ok", 63.2, 95),
                       "bench": stage("ok", 58.0, 90, op_rows=attention + sampler + ops, all_identical=True),
                       "train_modes": stage("ok", 30.1, 55, e2e_rows=modes),
                       "e2e_stage1": stage("ok", 21.0, 35, e2e_rows=e2e[:2]),
                       "e2e_stage2": stage("timeout", 40.0, 40),
                       "e2e_qformer_hf": stage("skipped", 0.0, 20),
                       "predict": dict(stage("skipped", 0.0, 10), fatal=False)}}


def test_refresh_updates_measured_order_and_both_readme_tables_in_one_command(tmp_path):
    """`report.py refresh gpu_results.json --readme README.md`: the run saved under the results folder, the measured
    backend order written from its op rows (dropout groups included), the performance table citing the saved file
    and the commit, the stage table with the run's status and seconds; every byte outside the markers kept."""
    src = tmp_path / "gpu_results.json"
    src.write_text(json.dumps(synthetic_gpu_results()))
    readme = tmp_path / "README.md"
    readme.write_bytes(README_WITH_BOTH.encode())
    results_dir, measured = tmp_path / "results", tmp_path / "measured_backends.json"
    assert report.main(["refresh", str(src), "--readme", str(readme), "--results-dir", str(results_dir),
                        "--measured-out", str(measured)]) == 0
    saved = results_dir / "gpu-2026-12-08.json"
    again = report.load_results(str(saved))  # the saved file reproduces the table on its own
    assert again["commit"] == "f" * 40 and again["kind"] == "gpu" and len(again["ops"]) == 9
    orders = json.loads(measured.read_text())
    assert orders["source"] == "gpu-2026-12-08.json"
    # summed over its groups (the dropout one included): triton 0.95 ms, torch 2.74 ms; SDPA is no backend
    assert orders["ops"]["qformer_attention"]["order"] == ["triton", "torch"]
    assert orders["ops"]["qformer_attention"]["total_ms"] == {"triton": 0.95, "torch": 2.74}
    assert orders["ops"]["itm_sample_negatives"]["order"] == ["cpp", "triton", "torch"]
    text = readme.read_bytes().decode()
    assert text.startswith("# title\n\nintro — é\n<!-- gpu-stages:start -->\n")
    assert "\nmiddle text\n<!-- perf-table:start -->\n" in text
    assert text.endswith("<!-- perf-table:end -->\nend, no newline")
    assert "old stage table" not in text and "old perf" not in text
    assert "report.py results/gpu-2026-12-08.json --readme" in text and "commit `ffffffffff`" in text
    assert "| train_step_modes | cuda_graphs | 128 | 480 |" in text and "| itm_cross fwd_bwd p=0.1 | sdpa |" in text
    stage_lines = [l for l in text.splitlines() if l.startswith("| ") and "`" in l.split("|")[2]]
    assert [l.split("|")[2].strip(" `") for l in stage_lines] == [s["stage"] for s in report._stage_table().plan(460)]
    assert "| failed, 104 s |" in stage_lines[1] and "| ok, 63.2 s |" in stage_lines[2]
    assert "| timeout, 40 s |" in stage_lines[6] and "NVIDIA H200, 2026-12-08, commit `ffffffffff`" in text


def test_refresh_of_a_cpu_run_leaves_the_gpu_order_alone(tmp_path):
    doc = synthetic_gpu_results()
    doc["mode"] = "dry-run (CPU, tiny sizes)"
    src = tmp_path / "gpu_results.json"
    src.write_text(json.dumps(doc))
    measured = tmp_path / "measured_backends.json"
    measured.write_text("{}\n")
    readme = tmp_path / "README.md"
    readme.write_bytes(README_WITH_BOTH.encode())
    report.main(["refresh", str(src), "--readme", str(readme), "--results-dir", str(tmp_path / "r"),
                 "--measured-out", str(measured)])
    assert measured.read_text() == "{}\n" and (tmp_path / "r" / "cpu-2026-12-08.json").exists()
    assert "not run yet" in readme.read_text()  # a CPU run is no GPU run of the stages
