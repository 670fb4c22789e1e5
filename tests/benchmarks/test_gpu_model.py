"""The GPU cost model (benchmarks/gpu_model.py, benchmarks/cost_model/) on the CPU: roofline bounds of single ops,
launches = kernels traced, FLOPs against blip2fast/flops.py and FlopCounterMode, the custom ops' formulas against
their references, annotate / refit on a synthetic results file, the README block generated from the committed
predictions, and the paper-size trace's time and memory."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

from cost_model import calibrate, hardware, report, rules  # noqa: E402
from cost_model.steps import StepSpec, build_step, model_config  # noqa: E402
from cost_model.trace import trace_step  # noqa: E402

GPU = hardware.h200()


def trace_fn(fn):
    """Events of `fn()` run inside the stand-ins ("cuda" tensors are meta)."""
    return trace_step(lambda regions, patches: fn)[0]


def kernels(events):
    return [e for e in events if e.launches > 0]


# ------------------------------------------------------------------------------------------------ roofline


def test_large_matmul_is_predicted_at_the_matmul_peak():
    # M x N tiles fill the 132 SMs exactly (wave quantisation 1.0), so the bound is FLOPs / measured peak
    M, N, K = 128 * 132, 1024, 8192
    a = torch.empty(M, K, dtype=torch.bfloat16, device="meta")
    b = torch.empty(K, N, dtype=torch.bfloat16, device="meta")
    (ev,) = kernels(trace_fn(lambda: a @ b))
    assert ev.kind == "matmul" and ev.flops == 2.0 * M * N * K
    want = 2.0 * M * N * K / GPU["matmul_bf16_flops"]
    assert rules.device_seconds(ev, GPU) == pytest.approx(want, rel=1e-12)
    assert want > (ev.bytes_read + ev.bytes_written) / GPU["copy_bw"]  # compute-bound indeed
    assert rules.kernel_seconds(ev, GPU) == pytest.approx(want + GPU["launch_eager_s"], rel=1e-12)
    assert rules.kernel_seconds(ev, GPU, cuda_graphs=True) == pytest.approx(want + GPU["launch_graph_s"], rel=1e-12)


def test_large_elementwise_op_is_predicted_at_the_copy_bandwidth():
    n = 3 * 2**27 + 5
    x = torch.empty(n, dtype=torch.bfloat16, device="meta")
    y = torch.empty(n, dtype=torch.bfloat16, device="meta")
    (ev,) = kernels(trace_fn(lambda: x * y))
    assert ev.kind == "elementwise" and ev.flops == 0
    assert ev.bytes_read == 2 * 2.0 * n and ev.bytes_written == 2.0 * n
    assert rules.device_seconds(ev, GPU) == pytest.approx(3 * 2.0 * n / GPU["copy_bw"], rel=1e-12)
    # a broadcast operand is read once, not once per row
    row = torch.empty(1, 4096, dtype=torch.float32, device="meta")
    m = torch.empty(8192, 4096, dtype=torch.float32, device="meta")
    (ev,) = kernels(trace_fn(lambda: m + row.expand(8192, 4096)))
    assert ev.bytes_read == 4.0 * (8192 * 4096 + 4096)


def test_views_and_allocations_launch_nothing_and_syncs_are_counted():
    x = torch.empty(64, 32, device="meta")

    def fn():
        t = x.view(32, 64).t()  # views
        e = torch.empty(5, device="cuda")  # an allocation ("cuda" stands for the GPU)
        s = (t + 1).sum()  # two kernels
        s.item()  # a host sync
        return e, x.tolist()  # the allocation, and a device-to-host read

    events = trace_fn(fn)
    assert sum(e.launches for e in events) == 2
    assert [e.op for e in kernels(events)] == ["aten::add", "aten::sum"]
    assert sum(e.host_syncs for e in events) == 2
    # a data-dependent output size: a kernel, then the host reads the count
    events = trace_fn(lambda: torch.nonzero(x > 0))
    assert [e.op for e in kernels(events)] == ["aten::gt", "aten::nonzero"]
    assert sum(e.host_syncs for e in events) == 1


def test_autocast_stand_in_casts_every_other_half_type_like_autocast():
    """Under bf16 autocast a linear casts float16 operands to bfloat16 too (autocast's cached_cast takes every
    floating dtype but float64), so the product is a bf16 GEMM: before, fp16 weights stayed fp16 and the mixed
    product came out float32, and the trace priced a frozen fp16 LLM's backward at fp32 GEMM speed (~2.9x slower)."""
    from cost_model.trace import Autocast

    x = torch.empty(256, 512, dtype=torch.float16, device="meta")
    w16 = torch.empty(1024, 512, dtype=torch.float16, device="meta")
    w32 = torch.empty(1024, 512, dtype=torch.float32, device="meta")

    def fn(w):
        with Autocast("cuda", dtype=torch.bfloat16):
            return torch.nn.functional.linear(x, w)

    for w in (w16, w32):
        events = kernels(trace_fn(lambda: fn(w)))
        assert [e.op for e in events] == ["aten::_to_copy", "aten::_to_copy", "aten::mm"]
        assert events[-1].dtype == "bfloat16" and events[-1].flops == 2.0 * 256 * 1024 * 512
    x16 = torch.empty(256, 512, dtype=torch.bfloat16, device="meta")
    w16b = torch.empty(1024, 512, dtype=torch.bfloat16, device="meta")
    with_bf16 = kernels(trace_fn(lambda: _linear_under_bf16(x16, w16b, Autocast)))
    assert [e.op for e in with_bf16] == ["aten::mm"]  # already the autocast dtype: nothing to cast


def test_sdpa_output_is_laid_out_as_torch_kernels_write_it():
    """torch's flash / memory-efficient SDPA write (B, N, H, d) and return it as (B, H, N, d): merging the heads
    back with transpose + reshape is then a view. The stand-in had a (B, H, N, d)-contiguous output, so the trace
    charged a copy after every attention call (39 in a ViT-g forward, 7 GB at batch 128)."""
    B, H, N, d = 3, 4, 17, 8
    q, k, v = (torch.empty(B, H, N, d, dtype=torch.bfloat16, device="meta") for _ in range(3))

    def fn():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(B, N, H * d)

    assert [e.op for e in kernels(trace_fn(fn))] == ["sdpa_flash_fwd"]


def _linear_under_bf16(x, w, autocast):
    with autocast("cuda", dtype=torch.bfloat16):
        return torch.nn.functional.linear(x, w)


# ------------------------------------------------------------------------------------------------ whole steps


def tiny_spec(**kw) -> StepSpec:
    base = dict(stage=1, preset="tiny", batch=6, text_len=12, impl="blip2fast", backend="torch")
    base.update(kw)
    return StepSpec(**base)


@pytest.fixture(scope="module")
def tiny_step():
    spec = tiny_spec(attention_dropout=0.0)
    return spec, trace_step(build_step(spec))[0]


def test_fused_projection_weights_are_cast_once_per_step(tiny_step):
    """Under (stand-in) CUDA autocast the Q-Former's concatenated q/k/v weights (one per layer) and the image K/V
    weights of all cross-attention layers (one) are cast to bf16 once per step, where they are built, as on a GPU;
    a per-pass cast of them would mean the model's autocast check did not see the trace's meta tensors as CUDA
    ones (it charged 96 extra casts at paper size before)."""
    spec, events = tiny_step
    cfg = model_config(spec).qformer
    blocks = cfg.num_layers + any(cfg.has_cross_attention(i) for i in range(cfg.num_layers))
    casts = [e for e in kernels(events) if e.region == "Q-Former fused projection weights" and e.op == "aten::_to_copy"
             and e.phase == "forward"]
    assert len(casts) == 2 * blocks and all(e.dtype == "bfloat16" for e in casts)  # weight and bias per block


def test_launch_count_is_the_kernels_traced(tiny_step):
    _, events = tiny_step
    summary = report.summarize(events, GPU, False, 6)
    plain = [e for e in events if e.kind not in ("view", "host_sync", "foreach", "custom")]
    assert all(e.launches == 1 for e in plain)
    assert summary["launches"] == sum(e.launches for e in events) == len(plain) + sum(
        e.launches for e in events if e.kind in ("foreach", "custom"))
    assert summary["kernel_ops"] == len([e for e in events if e.launches > 0])
    # forward, backward and optimizer are all there; fused AdamW is a handful of launches, not one per tensor
    phases = {e.phase for e in kernels(events)}
    assert phases == {"forward", "backward", "optimizer"}
    adam = [e for e in events if "fused_adam" in e.op]
    assert len(adam) == 2 and all(1 <= e.launches <= 4 for e in adam)  # the two parameter groups


def test_flops_equal_the_flop_model_and_the_counter(tiny_step, monkeypatch):
    """Forward + backward FLOPs of the traced step = blip2fast/flops.py = FlopCounterMode on a real CPU step."""
    from blip2fast import Blip2, flops

    spec, events = tiny_step
    traced = sum(e.flops for e in events if e.phase in ("forward", "backward"))
    cfg = model_config(spec)
    model_flops = flops.stage1_step_flops(cfg, spec.batch, spec.text_len).total
    assert traced == pytest.approx(model_flops, rel=0.02)

    monkeypatch.setenv("BLIP2FAST_BACKEND", "torch")
    torch.manual_seed(0)
    cfg32 = cfg.replace(vision=dataclasses.replace(cfg.vision, dtype="float32"))
    model = Blip2(cfg32).train()
    g = torch.Generator().manual_seed(1)
    px = torch.randn(spec.batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    ids = torch.randint(5, cfg.qformer.vocab_size - 1, (spec.batch, spec.text_len), generator=g)
    mask = torch.ones_like(ids)
    params = [p for p in model.parameters() if p.requires_grad]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss = model.stage1_loss(px, ids, mask).loss
        torch.autograd.grad(loss, params, allow_unused=True)
    assert traced == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_dropout_and_backends_change_the_kernels_not_the_flops():
    base = trace_step(build_step(tiny_spec()))[0]  # the paper's 0.1 attention dropout, PyTorch hashing
    triton = trace_step(build_step(tiny_spec(backend="triton")))[0]
    flops = [sum(e.flops for e in ev if e.phase != "optimizer") for ev in (base, triton)]
    assert flops[0] == pytest.approx(flops[1], rel=1e-9)
    ops = {e.op for e in triton}
    assert {"blip2fast::qformer_attention", "blip2fast::qformer_attention_backward", "blip2fast::itc_loss_triton",
            "blip2fast::linear_cross_entropy", "blip2fast::layer_norm"} <= ops
    launches = [sum(e.launches for e in ev) for ev in (base, triton)]
    assert launches[1] < launches[0]  # fused attention, losses and LayerNorms: fewer kernels for the same FLOPs


def test_lavis_formulation_syncs_per_sample():
    events = trace_step(build_step(tiny_spec(impl="lavis")))[0]
    # 2B multinomial(...).item() and the two .tolist() of the given negatives
    assert sum(e.host_syncs for e in events) == 2 * 6 + 2


# ------------------------------------------------------------------------------------------------ custom-op formulas


def _trace_op(fn, backend: str):
    old = os.environ.get("BLIP2FAST_BACKEND")
    os.environ["BLIP2FAST_BACKEND"] = backend
    try:
        return trace_fn(fn)
    finally:
        if old is None:
            os.environ.pop("BLIP2FAST_BACKEND")
        else:
            os.environ["BLIP2FAST_BACKEND"] = old


def _meta(*shape, dtype=torch.bfloat16, grad=False):
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)


def _nbytes(*ts):
    return float(sum(t.numel() * t.element_size() for t in ts if t is not None))


def _op_cases():
    """name -> (run(backend) -> callable, the op's interface tensors for the byte check)."""
    from blip2fast.ops.attention import AttnDropout, qformer_attention
    from blip2fast.ops.itc_loss import itc_loss
    from blip2fast.ops.itm_sampling import itm_sample_negatives
    from blip2fast.ops.layer_norm import layer_norm
    from blip2fast.ops.linear_ce import linear_cross_entropy

    B, H, Lq, Bk, Lk, d = 9, 3, 7, 5, 13, 32
    q, k, v = _meta(B, H, Lq, d, grad=True), _meta(Bk, H, Lk, d, grad=True), _meta(Bk, H, Lk, d, grad=True)
    kv_index = torch.empty(B, dtype=torch.long, device="meta")
    pad = torch.empty(B, Lk, dtype=torch.long, device="meta")
    drop = AttnDropout(p=0.1, seed_step=torch.empty(2, dtype=torch.long, device="meta"), site=3,
                       row_ids=torch.empty(B, dtype=torch.long, device="meta"))

    def attention():
        out = qformer_attention(q, k, v, key_padding=pad, kv_index=kv_index, dropout=drop)
        return torch.autograd.grad(out.float().sum(), (q, k, v))

    Bi, Q, E = 6, 5, 24
    feats, text = _meta(Bi, Q, E, grad=True), _meta(Bi, E, grad=True)
    temp = torch.empty((), device="meta", requires_grad=True)
    targets = torch.empty(Bi, dtype=torch.long, device="meta")

    def itc():
        loss = itc_loss(feats, text, feats.detach(), text.detach(), temp, targets, 0.1)[0]
        return torch.autograd.grad(loss, (feats, text, temp))

    x, res = _meta(11, 48, grad=True), _meta(11, 48, grad=True)
    w, b = _meta(48, dtype=torch.float32, grad=True), _meta(48, dtype=torch.float32, grad=True)

    def ln():
        return torch.autograd.grad(layer_norm(x, w.bfloat16(), b.bfloat16(), 1e-6, residual=res).float().sum(),
                                   (x, res))

    h, W = _meta(19, 40, grad=True), _meta(103, 40, grad=True)
    tgt = torch.empty(19, dtype=torch.long, device="meta")

    def lce():
        return torch.autograd.grad(linear_cross_entropy(h, W, None, tgt, 0.1, chunk_size=8)[0], (h, W))

    sim = _meta(10, 17, dtype=torch.float32)
    rows = torch.empty(10, dtype=torch.long, device="meta")

    def itm():
        return itm_sample_negatives(sim, rows, rows, torch.empty(2, dtype=torch.long, device="meta"), 1)

    return {"attention": attention, "itc": itc, "layer_norm": ln, "linear_ce": lce, "itm": itm}


@pytest.mark.parametrize("case", ["attention", "itc", "layer_norm", "linear_ce", "itm"])
def test_custom_op_formulas_agree_with_their_references(case):
    fn = _op_cases()[case]
    fused = _trace_op(fn, "triton")
    ref = _trace_op(fn, "torch")
    custom = [e for e in fused if e.op.startswith("blip2fast::")]
    assert custom, f"{case}: the Triton backend was not traced"
    # FLOPs: the formulas count what the reference's matmuls count, forward and backward
    assert sum(e.flops for e in fused) == pytest.approx(sum(e.flops for e in ref), rel=1e-9, abs=0)
    # bytes: each kernel moves at least its own output, and the fused step moves less than the reference
    for e in custom:
        assert e.bytes_read > 0 and e.bytes_written > 0 and e.launches >= 1
    fused_bytes = sum(e.bytes_read + e.bytes_written for e in fused)
    ref_bytes = sum(e.bytes_read + e.bytes_written for e in ref)
    assert fused_bytes < ref_bytes


def test_attention_formula_bytes_are_its_interface():
    """The fused attention reads q, each row's K/V, the mask inputs, and writes out + lse: exactly."""
    from blip2fast.ops import kernel_cost

    B, H, Lq, Bk, Lk, d = 9, 3, 7, 5, 13, 32
    q, k, v = _meta(B, H, Lq, d), _meta(Bk, H, Lk, d), _meta(Bk, H, Lk, d)
    kv_index, pad = torch.empty(B, dtype=torch.long, device="meta"), torch.empty(B, Lk, dtype=torch.bool,
                                                                                   device="meta")
    c = kernel_cost.COSTS["blip2fast::qformer_attention"](q, k, v, pad, None, 0, kv_index, None, None, 0.0, 0, 0)
    assert c.flops == 2 * (2.0 * B * H * Lq * Lk * d)
    assert c.bytes_read == _nbytes(q, pad, kv_index) + 2 * 2.0 * B * H * Lk * d
    assert c.bytes_written == _nbytes(q) + 4.0 * B * H * Lq


# ------------------------------------------------------------------------------------------------ calibration


def test_annotate_and_refit_recover_the_constants(tmp_path):
    import gpu_model

    # a synthetic GPU: what it "measures" is the model with other constants than hardware.py's
    true = {"launch_eager_s": 9.0e-6, "host_sync_s": 31.0e-6, "matmul_bf16_flops": 700.0e12}
    synthetic = GPU.with_values(true, "synthetic")
    rows = []
    for impl in ("blip2fast", "lavis"):
        spec = StepSpec(stage=1, preset="tiny", batch=6, text_len=12, impl=impl, backend="auto")
        pred = gpu_model.predict(spec, synthetic)
        phases = pred["summary"]["by_phase"]
        ms = sum(v["time_ms"] for k, v in phases.items() if k != "optimizer")  # the benchmark's fwd + bwd
        rows.append({"bench": "stage1_step", "impl": impl, "size": "CPU/tiny", "batch": 6,
                     "config": {"text_len": 12}, "median_ms": ms, "peak_tflops_measured": 700.0})
    rows.append({"bench": "itc_scores", "impl": "blip2fast", "size": "CPU/tiny", "batch": 6, "median_ms": 1.0})
    op_rows = [
        {"impl": "triton", "convention": "lavis", "dtype": "bfloat16", "dims": {"B": 6, "Ba": 12, "Q": 5, "E": 24},
         "median_ms": 0.05},
        {"impl": "sdpa", "shape": "itm_cross", "pass_": "fwd_bwd", "dropout_p": 0.1, "dtype": "bfloat16",
         "dims": {"rows": 9, "Lq": 5, "kv_rows": 3, "Lk": 11, "heads": 2, "head_dim": 16}, "median_ms": 0.1},
        {"impl": "triton", "pass_": "fwd_bwd", "dtype": "bfloat16", "rows": 40, "hidden": 24, "median_ms": 0.02},
        {"impl": "torch", "pass_": "fwd_bwd", "weight": "trained", "dtype": "bfloat16",
         "dims": {"tokens": 17, "hidden": 24, "vocab": 101}, "median_ms": 0.2},
        {"impl": "cpp", "dtype": "float32", "rows": 8, "cols": 30, "median_ms": 0.01},
        {"group": "something new", "impl": "torch", "median_ms": 1.0},
    ]
    path = tmp_path / "gpu_results.json"
    doc = {"stages": {"e2e_stage1": {"data": {"e2e_rows": rows, "op_rows": []}}, "ops": {"data": {"op_rows": op_rows}},
                      "env": {"data": {"gpu": {"name": "NVIDIA H100 80GB HBM3"}}}}}
    path.write_text(json.dumps(doc))
    assert calibrate.measured_gpu(doc) == "h100"
    # out of time: nothing traced, every row says why and how to finish on the CPU
    late = tmp_path / "late.json"
    assert calibrate.annotate(str(path), GPU, out=str(late), max_seconds=0.0) == 0
    late_rows = json.loads(late.read_text())["stages"]["e2e_stage1"]["data"]["e2e_rows"]
    assert all("max_seconds" in r["predicted"]["why"] for r in late_rows[:2])

    n = calibrate.annotate(str(path), GPU)
    doc = json.loads(path.read_text())
    got = doc["stages"]["e2e_stage1"]["data"]["e2e_rows"]
    assert n == 2 + 5 and got[2]["predicted"]["ms"] is None and "inference" in got[2]["predicted"]["why"]
    ops = doc["stages"]["ops"]["data"]["op_rows"]
    for r in ops[:5]:
        assert r["predicted"]["ms"] > 0 and r["predicted"]["launches"] >= 1, r
    assert ops[5]["predicted"]["ms"] is None and "not modelled" in ops[5]["predicted"]["why"]
    for r in got[:2]:
        p = r["predicted"]
        assert p["ms"] > 0 and p["launches"] > 0 and p["by_region_ms"]
        assert p["measured_over_predicted"] > 1  # the synthetic GPU launches slower than the assumed 5 us

    fit = calibrate.refit(str(path), GPU)
    assert fit["values"]["matmul_bf16_flops"] == 700.0e12
    assert fit["values"]["launch_eager_s"] == pytest.approx(true["launch_eager_s"], rel=1e-6)
    assert fit["values"]["host_sync_s"] == pytest.approx(true["host_sync_s"], rel=1e-6)
    # the fitted file is what --constants reads
    out = tmp_path / "fit.json"
    out.write_text(json.dumps(fit))
    refit_gpu = hardware.load_gpu("h200", str(out))
    assert refit_gpu["launch_eager_s"] == pytest.approx(true["launch_eager_s"]) and refit_gpu.constants[
        "launch_eager_s"].measured
    assert gpu_model.main(["refit", str(path), "--out", str(tmp_path / "fit2.json")]) == 0
    assert json.loads((tmp_path / "fit2.json").read_text())["values"] == fit["values"]


def test_cli_reports_bad_input_in_one_line(capsys, tmp_path):
    import gpu_model

    assert gpu_model.main(["--stage=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--stage=3" in err[0]
    assert gpu_model.main(["--impl=transformers"]) == 2
    assert gpu_model.main(["refit", "/nonexistent/results.json"]) == 2
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    bad.write_text('{"x": 1}')
    for command in ("annotate", "refit", "readme"):
        assert gpu_model.main([command, str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(bad) in err[0], err


# ------------------------------------------------------------------------------------------------ README, paper size


def test_readme_block_is_generated_from_the_committed_predictions():
    path = os.path.join(ROOT, "benchmarks", "results", "predicted-h200.json")
    with open(path) as f:
        preds = json.load(f)["predictions"]
    block = report.readme_table(preds, os.path.relpath(path, ROOT))
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert block in readme, "README's predicted table differs from `python benchmarks/gpu_model.py readme ...`"
    assert {p["spec"]["stage"] for p in preds} == {1, 2}


def test_paper_size_stage1_trace_is_fast_and_small(tmp_path):
    """ViT-g + BERT-base Q-Former, batch 128, the whole step: under 3 minutes and 4 GB (measured ~10 s, 0.4 GB)."""
    out = tmp_path / "p.json"
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_model.py"), f"--out={out}"], capture_output=True,
                          text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pred = json.loads(out.read_text())
    assert pred["trace"]["seconds"] < 180 and pred["trace"]["peak_rss_mb"] < 4096
    s = pred["summary"]
    assert s["launches"] > 5000 and s["hbm_bytes"] > 1e11 and s["host_syncs"] == 0
    assert {"frozen tower + ln_vision", "Q-Former query + ITG pass", "Q-Former ITM pass", "optimizer"} <= set(
        s["by_region"])
