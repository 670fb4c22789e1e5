"""The cost model against GPU measurements.

annotate(results): beside every end-to-end measurement of a GPU results file (benchmarks/gpu/check.py's
    gpu_results.json, a benchmarks/results/*.json file, or a pytest-benchmark JSON) write the model's prediction of
    the same thing under "predicted": {ms, measured_over_predicted, device_ms, launches, host_syncs, hbm_bytes,
    by_region_ms, ...}; a measurement the model does not cover gets {"ms": null, "why": ...}. Per-op rows get the
    prediction of the op's own kernels (forward, or forward + backward) at the row's sizes.
refit(results): new values for the constants from the measurements (never by hand):
    matmul_bf16_flops  the bf16 matmul peak the run measured itself (rows' peak_tflops_measured);
    launch_eager_s, host_sync_s   least squares (non-negative) of (measured - predicted GPU-busy time) over the
                       eager end-to-end rows against their launches and host syncs;
    launch_graph_s     the same over the CUDA-graph rows.
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Optional

from .hardware import Gpu
from .steps import StepSpec

E2E_STEPS = {"stage1_step": 1, "stage2_step": 2}
TRAIN_MODES = {"eager": ("eager", False), "cuda_graphs": ("cuda_graphs", False), "fp8": ("eager", True),
               "fp8_cuda_graphs": ("cuda_graphs", True)}


def _load(path: str) -> dict:
    with open(path) as f:
        doc = json.load(f)
    try:
        _rows(doc)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return doc


def _rows(doc: dict) -> tuple[list, list]:
    """(e2e rows, op rows) of any results layout, as the dicts inside `doc` (annotated in place)."""
    if "stages" in doc:
        e2e, ops = [], []
        for s in doc["stages"].values():
            data = s.get("data") or {}
            e2e += data.get("e2e_rows", [])
            ops += data.get("op_rows", [])
        return e2e, ops
    if "e2e" in doc or "ops" in doc:
        return doc.get("e2e", []), doc.get("ops", [])
    if "benchmarks" in doc:
        infos = [b.setdefault("extra_info", {}) for b in doc["benchmarks"]]
        return [i for i in infos if "bench" in i], [i for i in infos if "bench" not in i and "impl" in i]
    raise ValueError("not a results file: expected 'stages' (gpu_results.json), 'e2e'/'ops' or 'benchmarks'")


def spec_for_row(row: dict) -> tuple[Optional[StepSpec], str, str]:
    """(spec, what the measurement times, why not modelled)."""
    bench, impl = row.get("bench"), str(row.get("impl"))
    size = str(row.get("size", ""))
    preset = "tiny" if "tiny" in size.lower() or "cpu" in size.lower() else "vit_g"
    cfg = row.get("config") or {}
    text_len = int(cfg.get("text_len") or 32)
    batch = int(row.get("batch") or 128)
    dropout = cfg.get("dropout")
    common = dict(preset=preset, batch=batch, text_len=text_len, backend="auto",
                  attention_dropout=None if dropout is None else float(dropout))
    if bench in E2E_STEPS:
        if impl == "transformers" and E2E_STEPS[bench] == 1:
            return None, "", "transformers has no stage-1 training"
        return StepSpec(stage=E2E_STEPS[bench], impl=impl, **common), "forward + backward", ""
    if bench == "train_step_modes" and impl in TRAIN_MODES:
        mode, fp8 = TRAIN_MODES[impl]
        return StepSpec(stage=1, impl="blip2fast", mode=mode, fp8=fp8, **common), "whole step", ""
    if bench == "train_step_compile":
        return None, "", "torch.compile (Inductor's fused kernels) is not modelled"
    return None, "", f"{bench}: inference pieces are not traced by the step model"


def _prediction(pred: dict, what: str, measured_ms: Optional[float]) -> dict:
    s = pred["summary"]
    if what == "forward + backward":  # the benchmark's step: no optimizer
        keep = {k: v for k, v in s["by_phase"].items() if k != "optimizer"}
    else:
        keep = s["by_phase"]
    ms = sum(v["time_ms"] for v in keep.values())
    out = {"ms": ms, "what": what, "device_ms": sum(v["device_ms"] for v in keep.values()),
           "launches": sum(v["launches"] for v in keep.values()),
           "host_syncs": sum(v["host_syncs"] for v in keep.values()),
           "hbm_bytes": sum(v["hbm_bytes"] for v in keep.values()),
           "mode": pred["spec"]["mode"], "label": pred["label"], "gpu": pred["gpu"]["name"],
           "constants": {k: c["value"] for k, c in pred["gpu"]["constants"].items()},
           "by_region_ms": {k: v["time_ms"] for k, v in s["by_region"].items()}}
    if measured_ms:
        out["measured_over_predicted"] = measured_ms / ms
    return out


# what one trace takes on a 2-core CPU (a paper-size step ~5-20 s, an op well under a second): a trace is started
# only when it fits in what is left of --max_seconds
STEP_TRACE_S, OP_TRACE_S = 12.0, 0.5


def measured_gpu(doc: dict) -> str:
    """"h100" / "h200" from the GPU name a results file records (env stage, rows' device), else "h200"."""
    names = [str(((doc.get("stages") or {}).get("env") or {}).get("data", {}).get("gpu", {}).get("name", "")),
             str(doc.get("device", ""))]
    try:
        e2e, ops = _rows(doc)
    except ValueError:  # not a results file: annotate / refit say so, naming it
        e2e, ops = [], []
    names += [str(r.get("device", "")) for r in e2e + ops]
    text = " ".join(names).upper()
    return "h100" if "H100" in text else "h200"


def annotate(path: str, gpu: Gpu, out: Optional[str] = None, predict=None,
             max_seconds: Optional[float] = None) -> int:
    """Write predictions beside the measurements of `path` (into `out`, default in place). Returns how many rows
    got a prediction. `predict(spec, gpu)` defaults to gpu_model.predict. Per-op rows first (a fraction of a second
    each), then the end-to-end rows (~5-20 s each); with `max_seconds`, rows not reached in time say so."""
    import time

    if predict is None:
        from gpu_model import predict
    t0 = time.perf_counter()
    doc = _load(path)
    e2e, ops = _rows(doc)
    late = {"ms": None, "why": f"not traced within --max_seconds={max_seconds}: run `python benchmarks/gpu_model.py "
                                f"annotate` on the results file (CPU is enough)"}
    from . import op_model

    def out_of_time(needs: float) -> bool:  # would a trace needing `needs` seconds overrun the budget?
        return max_seconds is not None and time.perf_counter() - t0 + needs > max_seconds

    n = 0
    for row in ops:
        if out_of_time(OP_TRACE_S):
            row["predicted"] = dict(late)
            continue
        row["predicted"] = op_model.predict_row(row, gpu)
        n += row["predicted"].get("ms") is not None
    cache: dict = {}
    for row in e2e:
        spec, what, why = spec_for_row(row)
        if spec is None:
            row["predicted"] = {"ms": None, "why": why}
            continue
        key = json.dumps(vars(spec), sort_keys=True)
        if key not in cache:
            if out_of_time(STEP_TRACE_S):
                row["predicted"] = dict(late)
                continue
            cache[key] = predict(spec, gpu)
        row["predicted"] = _prediction(cache[key], what, row.get("median_ms"))
        n += 1
    doc["cost_model"] = {"annotated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         "gpu": gpu.as_dict(), "rows_predicted": n}
    target = out or path
    tmp = target + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(tmp, target)
    return n


def _nnls2(a: list, b: list, y: list) -> tuple[float, float]:
    """min ||x a + z b - y|| over x, z >= 0 (two unknowns: closed form, then the boundary cases)."""
    saa = sum(u * u for u in a)
    sbb = sum(v * v for v in b)
    sab = sum(u * v for u, v in zip(a, b))
    say = sum(u * w for u, w in zip(a, y))
    sby = sum(v * w for v, w in zip(b, y))
    det = saa * sbb - sab * sab
    if det > 1e-30 * max(1.0, saa * sbb):
        x, z = (say * sbb - sby * sab) / det, (sby * saa - say * sab) / det
        if x >= 0 and z >= 0:
            return x, z
    cands = [(max(0.0, say / saa) if saa else 0.0, 0.0), (0.0, max(0.0, sby / sbb) if sbb else 0.0)]
    return min(cands, key=lambda c: sum((c[0] * u + c[1] * v - w) ** 2 for u, v, w in zip(a, b, y)))


def refit(path: str, gpu: Gpu, predict=None) -> dict:
    """New constant values from the measured rows of `path`. The matmul peak is the run's own measurement; the
    launch and sync costs are fitted to what the GPU-busy time predicted *with that peak* leaves unexplained (the
    rows are annotated again, in memory, whenever their predictions used other constants)."""
    import tempfile

    doc = _load(path)
    e2e, _ = _rows(doc)
    values: dict = {}
    peaks = sorted(float(r["peak_tflops_measured"]) for r in e2e if r.get("peak_tflops_measured"))
    if peaks:
        values["matmul_bf16_flops"] = peaks[len(peaks) // 2] * 1e12
    fitted_gpu = gpu.with_values(values, "measured: this results file") if values else gpu
    stale = any("predicted" not in r or (r["predicted"].get("ms") is not None and r["predicted"].get(
        "constants", {}).get("matmul_bf16_flops") != fitted_gpu["matmul_bf16_flops"]) for r in e2e)
    if stale:
        with tempfile.TemporaryDirectory() as d:
            tmp = os.path.join(d, "annotated.json")
            annotate(path, fitted_gpu, out=tmp, predict=predict)
            with open(tmp) as f:
                doc = json.load(f)
        e2e, _ = _rows(doc)
    rows = [r for r in e2e if (r.get("predicted") or {}).get("ms") and r.get("median_ms")]
    if not rows:
        raise ValueError(f"{path}: no end-to-end measurement the model predicts (stage1_step, stage2_step, "
                         "train_step_modes rows with median_ms)")
    residuals = {}
    for mode, keys in (("eager", ("launch_eager_s", "host_sync_s")), ("cuda_graphs", ("launch_graph_s", None))):
        sel = [r for r in rows if r["predicted"]["mode"] == mode]
        if not sel:
            continue
        y = [(r["median_ms"] - r["predicted"]["device_ms"]) * 1e-3 for r in sel]
        a = [float(r["predicted"]["launches"]) for r in sel]
        b = [float(r["predicted"]["host_syncs"]) for r in sel]
        if keys[1] is None or not any(b):
            x = max(0.0, sum(u * w for u, w in zip(a, y)) / sum(u * u for u in a)) if any(a) else 0.0
            values[keys[0]] = x
        else:
            values[keys[0]], values[keys[1]] = _nnls2(a, b, y)
        residuals[mode] = [{"bench": r.get("bench"), "impl": r.get("impl"), "measured_ms": r["median_ms"],
                            "device_ms": r["predicted"]["device_ms"], "launches": r["predicted"]["launches"],
                            "host_syncs": r["predicted"]["host_syncs"]} for r in sel]
    device = doc.get("device") or next((r.get("device") for r in rows if r.get("device")), "unknown")
    return {"kind": "blip2fast cost-model constants, refitted", "results": os.path.relpath(path),
            "fitted_on": f"{device}, {datetime.date.today().isoformat()}", "gpu": gpu.name, "values": values,
            "previous": {k: gpu[k] for k in values}, "rows": residuals}


def render_fit(fit: dict) -> str:
    lines = [f"refit from {fit['results']} ({fit['fitted_on']}):"]
    for k, v in fit["values"].items():
        lines.append(f"  {k:20s} {fit['previous'][k]:.4g} -> {v:.4g}")
    return "\n".join(lines)


__all__ = ["annotate", "refit", "render_fit", "spec_for_row"]
