"""Predictions for the per-op benchmark rows (benchmarks/bench_*.py): the same call the benchmark times, traced on
meta tensors of the row's sizes (`dims` / `rows` / `cols` in its extra_info), through the benchmark's own
`make_fn`, so the prediction times exactly what was measured. Rows of an op or an impl not listed here get
{"ms": null, "why": ...}."""
from __future__ import annotations

from typing import Callable

import torch

from . import report
from .hardware import Gpu
from .trace import trace_step

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class NotModelled(Exception):
    pass


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _itc(row: dict) -> Callable:
    import bench_itc_loss as b

    d, dt = row["dims"], DTYPES[row["dtype"]]
    B, Ba, Q, E = d["B"], d["Ba"], d["Q"], d["E"]
    inputs = (_meta(B, Q, E, dtype=dt), _meta(B, E, dtype=dt), _meta(Ba, Q, E, dtype=dt), _meta(Ba, E, dtype=dt),
              _meta((), dtype=torch.float32), torch.empty(B, dtype=torch.long, device="meta"))
    return b.make_fn(row["impl"], row["convention"], inputs)


def _linear_ce(row: dict) -> Callable:
    import bench_linear_ce as b

    d, dt = row["dims"], DTYPES[row["dtype"]]
    N, H, V = d["tokens"], d["hidden"], d["vocab"]
    return b.make_fn(row["impl"], row["pass_"], row["weight"], _meta(N, H, dtype=dt), _meta(V, H, dtype=dt),
                     torch.empty(N, dtype=torch.long, device="meta"))


def _layer_norm(row: dict) -> Callable:
    from blip2fast.ops.layer_norm import layer_norm, layer_norm_ref

    if row["impl"] not in ("torch", "triton"):
        raise NotModelled(f"layer_norm impl {row['impl']!r} (torch.compile) is not modelled")
    dt = DTYPES[row["dtype"]]
    x, res, dy = (_meta(row["rows"], row["hidden"], dtype=dt) for _ in range(3))
    w, bias = _meta(row["hidden"], dtype=dt), _meta(row["hidden"], dtype=dt)

    def fwd(x, w, bias, res):
        if row["impl"] == "triton":
            return layer_norm(x, w, bias, 1e-6, residual=res, backend="triton")
        return layer_norm_ref(x, w, bias, 1e-6, res)

    if row["pass_"] == "fwd":
        return lambda: fwd(x, w, bias, res)
    leaves = [t.requires_grad_() for t in (x, w, bias, res)]
    return lambda: torch.autograd.grad(fwd(*leaves), leaves, dy)


def _itm(row: dict) -> Callable:
    from blip2fast.ops.itm_sampling import itm_sample_negatives

    sim = _meta(row["rows"], row["cols"], dtype=DTYPES[row["dtype"]])
    rows = torch.empty(row["rows"], dtype=torch.long, device="meta")
    seed = torch.empty(2, dtype=torch.long, device="meta")
    return lambda: itm_sample_negatives(sim, rows, rows, seed, 1, backend=row["impl"])


def _attention(row: dict) -> Callable:
    import bench_qformer_attention as b
    from blip2fast.ops.attention import AttnDropout

    d, dt = row["dims"], DTYPES[row["dtype"]]
    Bq, Lq, Bk, Lk, H, D = d["rows"], d["Lq"], d["kv_rows"], d["Lk"], d["heads"], d["head_dim"]
    kind = b.SHAPES[row["shape"]][4]
    q, do = _meta(Bq, H, Lq, D, dtype=dt), _meta(Bq, H, Lq, D, dtype=dt)
    k, v = _meta(Bk, H, Lk, D, dtype=dt), _meta(Bk, H, Lk, D, dtype=dt)
    kw: dict = {}
    pad = torch.empty(Bq, Lk, dtype=torch.long, device="meta")
    if kind in ("padding", "causal"):
        kw["key_padding"] = pad
    if kind == "causal":
        kw["causal_prefix"] = Lk - Lq
    if kind == "kv_index":
        kw["kv_index"] = torch.empty(Bq, dtype=torch.long, device="meta")
    if row.get("dropout_p"):
        kw["dropout"] = AttnDropout(p=row["dropout_p"], seed_step=torch.empty(2, dtype=torch.long, device="meta"),
                                    site=3, row_ids=torch.empty(Bq, dtype=torch.long, device="meta"),
                                    q_offset=Lk - Lq if kind == "causal" else 0)
    return b.make_fn(row["impl"], row["pass_"], q, k, v, do, kw)[0]


def _builder(row: dict) -> Callable[[dict], Callable]:
    if "convention" in row and "dims" in row:
        return _itc
    if "weight" in row and "dims" in row:
        return _linear_ce
    if "shape" in row and "dims" in row:
        return _attention
    if "hidden" in row and "rows" in row:
        return _layer_norm
    if "cols" in row and "rows" in row:
        return _itm
    raise NotModelled(f"op benchmark {row.get('group') or row.get('name')!r} is not modelled")


def predict_row(row: dict, gpu: Gpu) -> dict:
    try:
        make = _builder(row)
        events = trace_step(lambda regions, patches: make(row))[0]
    except NotModelled as e:
        return {"ms": None, "why": str(e)}
    except (KeyError, TypeError, ValueError, RuntimeError, NotImplementedError) as e:
        return {"ms": None, "why": f"not traced: {type(e).__name__}: {e}"}
    s = report.summarize(events, gpu, False, 1)
    out = {"ms": s["step_ms"], "device_ms": s["device_ms"], "launches": s["launches"], "hbm_bytes": s["hbm_bytes"],
           "host_syncs": s["host_syncs"], "gpu": gpu.name, "top_ops": [r["op"] for r in s["top_ops"][:5]]}
    if row.get("median_ms"):
        out["measured_over_predicted"] = row["median_ms"] / s["step_ms"]
    return out
