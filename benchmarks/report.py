"""Benchmark results -> the README's performance table (never typed by hand).

    python benchmarks/report.py benchmarks/results/gpu-2026-12-01.json                  # print the table
    python benchmarks/report.py benchmarks/results/cpu-2026-11-28.json --readme README.md  # rewrite it in place
    python benchmarks/report.py collect out/bench_*.json --out benchmarks/results/cpu-2026-11-28.json
    python benchmarks/report.py measured benchmarks/results/gpu-2026-12-01.json    # GPU automatic backend order
    python benchmarks/report.py refresh out/gpu_results.json --readme README.md   # after a GPU run: all of it

`refresh` is the one command after a GPU run (benchmarks/gpu/run.sh): it saves the run as
benchmarks/results/<kind>-<date>.json, writes blip2fast/ops/measured_backends.json from it (GPU runs only) and
rewrites the README's performance table and GPU stage table (the last run's status and seconds per stage).

A results file is either
  - what `collect` writes from pytest-benchmark JSON files (a CPU or GPU run of the benchmarks): schema
    "blip2fast-results/1" with date, device, commit, versions, and the rows below; or
  - benchmarks/gpu/run.sh's gpu_results.json (copied under benchmarks/results/), whose env stage gives date, GPU,
    commit and versions and whose benchmark stages hold the same rows (check.py puts them there with `rows_from`).
Rows: "e2e" rows are the extra_info of bench_stage1_step.py / bench_stage2_step.py / bench_qformer_hf.py (bench,
impl, samples_per_s, speedup_vs, tflops, mfu, peak_mem_mb, ...); "ops" rows are the op benchmarks' (group, impl,
median_ms, speedup_vs_torch, ...).

`measured` turns a GPU results file's op rows into blip2fast/ops/measured_backends.json, the automatic backend
order of each op on CUDA (ops/dispatch.py gpu_order): per op, its backends ordered by the sum of their median times
over the op's benchmark groups (a backend missing from a group, or one that failed, is not ranked). A CPU results
file is refused: CPU timings say nothing about a GPU.

`--readme` replaces what lies between the lines `<!-- perf-table:start -->` and `<!-- perf-table:end -->` and
leaves every other byte of the file as it was. Standard library only (runs anywhere, imports no torch).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Iterable, Optional

SCHEMA = "blip2fast-results/1"
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
STAGES_START, STAGES_END = "<!-- gpu-stages:start -->", "<!-- gpu-stages:end -->"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("blip2fast", "lavis", "transformers")
IMPL_NAMES = {"blip2fast": "blip2fast", "lavis": "LAVIS formulation", "transformers": "transformers"}
BENCH_NAMES = {  # order of the table's rows
    "stage1_step": "stage-1 training step (ITC + ITM + ITG, fwd + bwd)",
    "stage2_step": "stage-2 training step (frozen OPT, fwd + bwd)",
    "qformer_fwd": "Q-Former forward (query pass)",
    "itc_scores": "ITC scoring (images x texts)",
    "itm_scores": "ITM scoring (image-text pairs)",
}
VERSION_PACKAGES = ("torch", "triton", "transformers")


# --------------------------------------------------------------------------------------------------------------
# reading


def rows_from(bench_json: dict) -> tuple[list, list]:
    """(e2e rows, op rows) of one pytest-benchmark JSON document."""
    e2e, ops = [], []
    for b in bench_json.get("benchmarks", []):
        info = dict(b.get("extra_info") or {})
        median = (b.get("stats") or {}).get("median")
        if "bench" in info and "samples_per_s" in info:
            info["pytest_median_ms"] = None if median is None else round(median * 1e3, 3)
            e2e.append(info)
        elif "impl" in info:
            row = {"group": b.get("group") or b.get("name"), "name": b.get("name"), **info}
            if "median_ms" not in row and median is not None:
                row["median_ms"] = round(median * 1e3, 4)
            ops.append(row)
    return e2e, ops


def _versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for pkg in VERSION_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def collect(paths: Iterable[str]) -> dict:
    """A results file from pytest-benchmark JSON files of one run (same machine, same commit)."""
    docs = []
    for p in paths:
        with open(p) as f:
            docs.append(json.load(f))
    return collect_docs(docs)


def collect_docs(docs: list) -> dict:
    """`collect` on already-parsed pytest-benchmark JSON documents."""
    e2e, ops = [], []
    for doc in docs:
        a, b = rows_from(doc)
        e2e += a
        ops += b
    if not docs:
        raise ValueError("collect: give at least one pytest-benchmark JSON file")
    first = docs[0]
    commit = first.get("commit_info") or {}
    when = first.get("datetime") or datetime.datetime.now(datetime.timezone.utc).isoformat()
    device = next((r.get("device") for r in e2e if r.get("device")), None)
    if device is None:
        cpu = (first.get("machine_info") or {}).get("cpu") or {}
        device = cpu.get("brand_raw") or (first.get("machine_info") or {}).get("processor") or "unknown"
    gpu = any("cuda" in str(r.get("device", "")).lower() or "NVIDIA" in str(r.get("device", "")) for r in e2e + ops)
    return {
        "schema": SCHEMA,
        "date": when[:10],
        "device": device,
        "kind": "gpu" if gpu else "cpu",
        "size": next((r.get("size") for r in e2e if r.get("size")), "CPU/tiny" if not gpu else "GPU"),
        "commit": commit.get("id", "unknown"),
        "dirty": commit.get("dirty"),
        "versions": _versions(),
        "peak_tflops_measured": next((r.get("peak_tflops_measured") for r in e2e), None),
        "e2e": e2e,
        "ops": ops,
    }


def from_gpu_results(doc: dict) -> dict:
    """gpu_results.json (benchmarks/gpu/run.sh) -> the results schema."""
    stages = doc.get("stages", {})
    env = (stages.get("env") or {}).get("data", {})
    e2e, ops = [], []
    for s in stages.values():
        data = s.get("data") or {}
        e2e += data.get("e2e_rows", [])
        ops += data.get("op_rows", [])
    gpu = env.get("gpu") or {}
    commit = doc.get("commit") or env.get("git_commit") or "unknown"  # schema 2 carries it at the top
    return {
        "schema": SCHEMA,
        "date": str(doc.get("started", ""))[:10],
        "device": gpu.get("name") or next((r.get("device") for r in e2e if r.get("device")), "unknown"),
        "kind": "gpu" if doc.get("mode") == "gpu" else "cpu",
        "size": next((r.get("size") for r in e2e if r.get("size")), doc.get("mode", "")),
        "commit": commit,
        "dirty": doc.get("dirty", env.get("git_dirty_files")),
        "versions": {k: env.get(k) for k in ("python", *VERSION_PACKAGES)},
        "peak_tflops_measured": next((r.get("peak_tflops_measured") for r in e2e), None),
        "e2e": e2e,
        "ops": ops,
        "stages": {k: s.get("status") for k, s in stages.items()},
        "stage_runs": {k: {"status": s.get("status"), "seconds": s.get("seconds"), "limit_s": s.get("limit_s"),
                           "message": s.get("message", "")} for k, s in stages.items()},
        "budget_s": doc.get("budget_s"),
    }


def load_results(path: str) -> dict:
    with open(path) as f:
        doc = json.load(f)
    if doc.get("schema") == SCHEMA:
        return doc
    if "stages" in doc:
        return from_gpu_results(doc)
    if "benchmarks" in doc:  # a bare pytest-benchmark JSON
        return collect([path])
    raise ValueError(f"{path}: neither a results file ({SCHEMA}), a gpu_results.json nor a pytest-benchmark JSON")


# --------------------------------------------------------------------------------------------------------------
# the table


def _num(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if x == 0:
        return "0"
    mag = abs(x)
    if mag >= 100:
        return f"{x:,.0f}"
    if mag >= 1:
        return f"{x:.{max(0, digits - len(str(int(mag))))}f}"
    return f"{x:.{digits}g}"


def _mem(mb: Optional[float]) -> str:
    return "n/a" if mb is None else (f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:.0f} MB")


def e2e_table(rows: list) -> list[str]:
    by = {}
    for r in rows:
        by.setdefault(r["bench"], {})[r["impl"]] = r
    present = [i for i in IMPLS if any(i in v for v in by.values())]
    peers = [i for i in present if i != "blip2fast"]
    memory = any(r.get("peak_mem_mb") is not None for r in rows)  # GPU runs only
    head = (["benchmark", "batch"] + [f"{IMPL_NAMES[i]} (samples/s)" for i in present]
            + [f"blip2fast vs {IMPL_NAMES[p]}" for p in peers] + ["blip2fast TFLOP/s (MFU)"]
            + (["peak memory (" + " / ".join(IMPL_NAMES[i] for i in present) + ")"] if memory else []))
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(head) - 1 - memory) + (["---"] if memory else [])) + "|"]
    order = [b for b in BENCH_NAMES if b in by] + sorted(b for b in by if b not in BENCH_NAMES)
    for bench in order:
        impls = by[bench]
        ours = impls.get("blip2fast")
        any_row = next(iter(impls.values()))
        cells = [BENCH_NAMES.get(bench, bench), str(any_row.get("batch", ""))]
        cells += [_num(impls[i]["samples_per_s"]) if i in impls else "n/a" for i in present]
        for p in peers:
            ratio = None if ours is None else (ours.get("speedup_vs") or {}).get(p)
            cells.append("n/a" if ratio is None else f"{ratio:.2f}x")
        if ours is not None:
            mfu = ours.get("mfu")
            cells.append(f"{_num(ours.get('tflops'))} ({'n/a' if mfu is None else f'{100 * mfu:.1f}%'})")
        else:
            cells.append("n/a")
        if memory:
            cells.append(" / ".join(_mem(impls[i].get("peak_mem_mb")) if i in impls else "n/a" for i in present))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def modes_table(rows: list) -> list[str]:
    """Rows whose impl is an execution mode (bench_train_modes.py: eager, cuda_graphs, fp8, ...), not a peer."""
    memory = any(r.get("peak_mem_mb") is not None for r in rows)
    lines = ["| benchmark | mode | batch | samples/s | vs eager | TFLOP/s (MFU) |" + (" peak memory |" if memory else ""),
             "|---|---|---:|---:|---:|---:|" + ("---:|" if memory else "")]
    for r in rows:
        vs = 1.0 if r["impl"] == "eager" else (r.get("speedup_vs") or {}).get("eager")
        mfu = r.get("mfu")
        cells = [str(r["bench"]), str(r["impl"]), str(r.get("batch", "")), _num(r.get("samples_per_s")),
                 "n/a" if vs is None else f"{vs:.2f}x",
                 f"{_num(r.get('tflops'))} ({'n/a' if mfu is None else f'{100 * mfu:.1f}%'})"]
        if memory:
            cells.append(_mem(r.get("peak_mem_mb")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ops_table(rows: list) -> list[str]:
    lines = ["| op benchmark | impl | median ms | speedup vs torch | throughput |", "|---|---|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (str(r.get("group")), str(r.get("impl")))):
        if r.get("tflops") is not None:
            thr = f"{_num(r['tflops'])} TFLOP/s"
        elif r.get("gbps") is not None:
            thr = f"{_num(r['gbps'])} GB/s"
        else:
            thr = "n/a"
        speed = r.get("speedup_vs_torch")
        lines.append(f"| {r.get('group')} | {r.get('impl')} | {_num(r.get('median_ms'), 4)} | "
                     f"{'n/a' if speed is None else f'{speed:.2f}x'} | {thr} |")
    return lines


def render(results: dict, source: str = "") -> str:
    """The markdown that goes between the markers."""
    v = results.get("versions") or {}
    commit = str(results.get("commit") or "unknown")
    dirty = results.get("dirty")
    dirty_note = " (uncommitted changes)" if dirty not in (None, False, 0) else ""
    versions = ", ".join(f"{k} {v[k]}" for k in ("torch", "triton", "transformers") if v.get(k))
    gpu = results.get("kind") == "gpu"
    peak = results.get("peak_tflops_measured")
    threads = next((r.get("threads") for r in results.get("e2e", []) if r.get("threads")), None)
    device = str(results.get("device")) + ("" if gpu or not threads else
                                           f", {threads} torch thread{'s' if threads > 1 else ''}")
    out = [f"<!-- generated by `python benchmarks/report.py {source or '<results.json>'} --readme README.md`; "
           "do not edit by hand -->",
           f"**{results.get('size', '')}**: {device}, {results.get('date')}, commit "
           f"`{commit[:10]}`{dirty_note}, {versions}. "
           + ("Paper sizes (EVA ViT-g/14, BERT-base Q-Former, OPT-2.7B, batch 128), random weights, bf16. "
              if gpu else
              "A tiny model with the paper's structure, fp32, so the ratios show the formulations' costs on a CPU, "
              "not GPU speed. ")
           + "Same weights, inputs and negatives for every implementation, whose losses / scores are checked equal "
             "before timing; samples/s from the median step; TFLOP/s count the minimal formulation's FLOPs "
             "(`blip2fast/flops.py`)"
           + (f", MFU against a {_num(peak)} TFLOP/s matmul measured in the same run." if peak else "."),
           ""]
    peers = [r for r in results.get("e2e", []) if r.get("impl") in IMPLS]
    modes = [r for r in results.get("e2e", []) if r.get("impl") not in IMPLS]
    if peers:
        out += e2e_table(peers)
    else:
        out.append("(no end-to-end rows in this results file)")
    if modes:
        out += ["", "Training-step execution modes (`benchmarks/bench_train_modes.py`):", ""] + modes_table(modes)
    if results.get("ops"):
        out += ["", "<details><summary>per-op benchmarks</summary>", ""] + ops_table(results["ops"]) + ["",
                                                                                                   "</details>"]
    return "\n".join(out)


def _stage_table():
    """benchmarks/gpu/stages.py (standard library only), the GPU check's stage table."""
    gpu_dir = os.path.join(ROOT, "benchmarks", "gpu")
    if gpu_dir not in sys.path:
        sys.path.insert(0, gpu_dir)
    import stages

    return stages


def render_stages(results: Optional[dict] = None) -> str:
    """The README's GPU stage table: order, what each stage shows, its limit, its estimated H200 time, and (given a
    GPU run's results) that run's status and seconds per stage."""
    stages = _stage_table()
    runs = (results or {}).get("stage_runs") or {}
    gpu_run = bool(runs) and (results or {}).get("kind") == "gpu"
    last = (f"last GPU run ({results.get('device')}, {results.get('date')}, commit `{str(results.get('commit'))[:10]}`)"
            if gpu_run else "last GPU run")
    lines = ["<!-- generated from benchmarks/gpu/stages.py by `python benchmarks/report.py refresh <gpu_results.json> "
             "--readme README.md`; do not edit by hand -->",
             f"| # | stage | what it shows | limit (s) | typical on an H200 (s, estimated) | {last} |",
             "|---:|---|---|---:|---:|---|"]
    for i, s in enumerate(stages.STAGES, 1):
        run = runs.get(s.name) if gpu_run else None
        if run is None:
            seen = "not run yet" if not gpu_run else "not in this run"
        else:
            seen = f"{run.get('status')}" + ("" if run.get("seconds") is None else f", {run['seconds']:g} s")
        lines.append(f"| {i} | `{s.name}` | {s.shows}{'' if s.fatal else ' (non-fatal)'} | {s.limit_s} | "
                     f"{s.typical_s} | {seen} |")
    lines += ["", f"The limits add up to the default budget, {stages.DEFAULT_BUDGET_S} s (the script stays under 8 "
                  f"minutes; typical total about {sum(s.typical_s for s in stages.STAGES)} s, estimated). A stage "
                  "starts only when its whole limit fits in what is left of the budget, else it is skipped up front; "
                  "with a smaller `--budget-s` the stages at the bottom are skipped first (a later, shorter stage "
                  "still runs when it fits). `bash benchmarks/gpu/run.sh --plan --budget-s N` prints the plan."]
    return "\n".join(lines)


def replace_between_markers(text: str, table: str, start: str = START, end: str = END) -> str:
    """text with the lines between the two marker lines replaced by `table`; every other byte unchanged."""
    i, j = text.find(start), text.find(end)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"the README needs the marker lines {start!r} and {end!r} (in that order) around the place "
                         "of the table")
    if text.find(start, i + 1) >= 0 or text.find(end, j + 1) >= 0:
        raise ValueError(f"the README holds a table marker ({start!r} / {end!r}) more than once")
    head = text[: i + len(start)]
    tail = text[j:]
    return head + "\n" + table + "\n" + tail


# --------------------------------------------------------------------------------------------------------------
# command line


# op benchmark group prefix -> (op name in ops/dispatch.py, the op's backends: peers such as "sdpa" or "full"
# logits are reported in the table but are no backend of the op)
OP_GROUPS = {
    "itc ": ("itc_loss", ("torch", "triton", "cpp")),
    "itm_sampling ": ("itm_sample_negatives", ("torch", "triton", "cpp")),
    "layer_norm ": ("layer_norm", ("torch", "triton")),
    "linear_ce ": ("linear_cross_entropy", ("torch", "triton")),
}
ATTENTION = ("qformer_attention", ("torch", "triton"))  # groups "<shape> <pass>" of bench_qformer_attention.py


def op_of(group: str) -> Optional[tuple]:
    for prefix, op in OP_GROUPS.items():
        if group.startswith(prefix):
            return op
    if group.split(" ")[0] in ("query_self", "query_cross", "text_self", "itm_self", "itm_cross", "itg"):
        return ATTENTION
    return None


def measured_orders(results: dict) -> dict:
    """{op: {"order": backends fastest first, "total_ms": {backend: summed median ms}, "groups": n, ...}} from the
    op rows of a GPU results file. Only backends timed in every group of their op are ranked."""
    if results.get("kind") != "gpu":
        raise ValueError(f"measured: {results.get('device')!r} is not a GPU run (kind={results.get('kind')!r}); "
                         "the automatic order on CUDA must come from a GPU measurement")
    per_op: dict = {}
    for r in results.get("ops", []):
        op = op_of(str(r.get("group", "")))
        if op is None or r.get("impl") not in op[1] or r.get("median_ms") is None:
            continue
        groups = per_op.setdefault(op[0], {})
        groups.setdefault(r["group"], {})[r["impl"]] = float(r["median_ms"])
    out = {}
    for op, groups in sorted(per_op.items()):
        ranked = set.intersection(*(set(g) for g in groups.values()))
        totals = {b: round(sum(g[b] for g in groups.values()), 4) for b in ranked}
        out[op] = {"order": sorted(totals, key=totals.get), "total_ms": totals, "groups": len(groups),
                   "measured_on": results.get("device"), "date": results.get("date"),
                   "commit": results.get("commit")}
    return out


def write_measured(results: dict, source: str, out: str) -> dict:
    """measured_backends.json (what ops/dispatch.py reads) from a GPU results file; returns the orders."""
    orders = measured_orders(results)
    with open(out, "w") as f:
        json.dump({"source": os.path.basename(source), "ops": orders}, f, indent=1)
        f.write("\n")
    for op, e in orders.items():
        print(f"{op}: {' > '.join(e['order'])}  ({', '.join(f'{b} {t} ms' for b, t in e['total_ms'].items())})")
    print(f"wrote {out}")
    return orders


def refresh(results_path: str, readme: Optional[str], results_dir: str, measured_out: str) -> dict:
    """After a run: the results saved under `results_dir` (what the README table then cites), the measured backend
    order (GPU runs), and the README's performance and stage tables, in that order. Returns what was written."""
    results = load_results(results_path)
    if results.get("kind") == "gpu" and str(results.get("commit", "unknown")) == "unknown":
        print(f"refresh: {results_path} does not say which commit it measured (no .git and no "
              "benchmarks/gpu/commit.txt on the GPU machine); its numbers are kept but cite no commit", file=sys.stderr)
    os.makedirs(results_dir, exist_ok=True)
    saved = os.path.join(results_dir, f"{results.get('kind', 'run')}-{results.get('date') or 'undated'}.json")
    with open(saved, "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    print(f"wrote {saved}: {len(results.get('e2e', []))} end-to-end rows, {len(results.get('ops', []))} op rows")
    written = {"results": saved}
    if results.get("kind") == "gpu":
        write_measured(results, saved, measured_out)
        written["measured"] = measured_out
    else:
        print(f"measured: {measured_out} left as it is: {results.get('device')!r} is no GPU run")
    if readme:
        with open(readme, newline="") as f:
            text = f.read()
        rel = os.path.relpath(saved, os.path.dirname(os.path.abspath(readme)))
        new = replace_between_markers(text, render(results, source=rel))
        new = replace_between_markers(new, render_stages(results), STAGES_START, STAGES_END)
        with open(readme, "w", newline="") as f:
            f.write(new)
        print(f"{readme}: performance and GPU stage tables {'updated' if new != text else 'unchanged'}")
        written["readme"] = readme
    return written


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "refresh":
        p = argparse.ArgumentParser(prog="report.py refresh",
                                    description="after a run: results saved, measured backend order, README tables")
        p.add_argument("results", help="benchmarks/gpu/run.sh's gpu_results.json (or any results file)")
        p.add_argument("--readme", help="rewrite the performance and GPU stage tables of this file")
        p.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
        p.add_argument("--measured-out", default=os.path.join(ROOT, "blip2fast", "ops", "measured_backends.json"))
        a = p.parse_args(argv[1:])
        refresh(a.results, a.readme, a.results_dir, a.measured_out)
        return 0
    if argv and argv[0] == "measured":
        p = argparse.ArgumentParser(prog="report.py measured",
                                    description="a GPU results file -> the automatic backend order per op")
        p.add_argument("results")
        p.add_argument("--out", default=os.path.join(ROOT, "blip2fast", "ops", "measured_backends.json"))
        a = p.parse_args(argv[1:])
        write_measured(load_results(a.results), a.results, a.out)
        return 0
    if argv and argv[0] == "collect":
        p = argparse.ArgumentParser(prog="report.py collect",
                                    description="pytest-benchmark JSON files -> one results file")
        p.add_argument("bench_json", nargs="+")
        p.add_argument("--out", required=True)
        a = p.parse_args(argv[1:])
        results = collect(a.bench_json)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
        print(f"wrote {a.out}: {len(results['e2e'])} end-to-end rows, {len(results['ops'])} op rows")
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="a results file (benchmarks/results/*.json)")
    p.add_argument("--readme", help="rewrite the table between the perf-table markers of this file")
    a = p.parse_args(argv)
    results = load_results(a.results)
    table = render(results, source=a.results)
    if not a.readme:
        print(table)
        return 0
    with open(a.readme, newline="") as f:
        text = f.read()
    new = replace_between_markers(text, table)
    with open(a.readme, "w", newline="") as f:
        f.write(new)
    print(f"{a.readme}: performance table {'updated' if new != text else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
