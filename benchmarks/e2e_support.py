"""What the end-to-end benchmarks (bench_stage1_step.py, bench_stage2_step.py, bench_qformer_hf.py) share: sizes per
device, model construction, timing, peak memory, the peak FLOP/s measured in the same run, the transformers peers
built from our weights, and the extra_info row every benchmark reports. A support module: pytest does not collect
it (only bench_*.py files are benchmarks).

Sizes: on a GPU the paper's (EVA ViT-g/14 with 39 blocks, BERT-base Q-Former with 32 queries, OPT-2.7B for stage 2,
batch 128, 32 text tokens), random weights, built directly on the GPU; frozen towers and the LLM in bf16, the
trainable parts fp32 under bf16 autocast (the trainer's recipe). On a CPU a tiny model at the same structure (fp32,
no autocast), so the files never rot; its numbers are labelled CPU/tiny.

Every implementation of a benchmark runs the same inputs and the same weights in the same process; before any
timing the benchmark asserts that they compute the same thing (losses or scores) within a dtype tolerance.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import platform
from typing import Callable, Optional

import torch

from blip2fast import Blip2
from blip2fast.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig, blip2_stage1_vit_g
from op_timing import median_ms, peak_bytes, sync, time_once_ms
from blip2fast._hf import load_pretrained

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE_LABEL = "paper sizes (GPU)" if GPU else "CPU/tiny"

# transformers peers load our weights through an export (save_hf, then from_pretrained on the CPU): ~7.6 GB through
# host memory and disk at the stage-2 paper size. BLIP2FAST_BENCH_HF_EXPORT=0 (the GPU check) leaves them out; the
# exports themselves are tested at small size on the CPU (tests/interop/test_hf_checkpoints.py).
HF_EXPORT = os.environ.get("BLIP2FAST_BENCH_HF_EXPORT", "1") != "0"

# losses / scores of two implementations agree within this relative error before anything is timed
EQUAL_TOL = 3e-2 if GPU else 1e-4

# ---------------------------------------------------------------------------------------------------------------
# sizes


@dataclasses.dataclass(frozen=True)
class Sizes:
    batch: int
    text_len: int
    reps: int  # timed steps per implementation (median reported)
    warmup: int


STAGE1 = Sizes(batch=128, text_len=32, reps=5, warmup=2) if GPU else Sizes(batch=8, text_len=16, reps=5, warmup=1)
STAGE2 = Sizes(batch=128, text_len=32, reps=5, warmup=2) if GPU else Sizes(batch=8, text_len=12, reps=5, warmup=1)
SCORING = Sizes(batch=128, text_len=32, reps=10, warmup=2) if GPU else Sizes(batch=8, text_len=16, reps=7, warmup=1)

# OPT-2.7B (facebook/opt-2.7b's config.json: 32 layers, width 2560, 32 heads, FFN 10240, 50272 rows); random weights
OPT_2_7B = dict(model_type="opt", hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
                vocab_size=50272, word_embed_proj_dim=2560, max_position_embeddings=2048, do_layer_norm_before=True,
                dropout=0.1, attention_dropout=0.0, activation_function="relu", bos_token_id=2, eos_token_id=2,
                pad_token_id=1)
OPT_TINY = dict(model_type="opt", hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
                vocab_size=1000, word_embed_proj_dim=64, max_position_embeddings=128, dropout=0.1, bos_token_id=2,
                eos_token_id=2, pad_token_id=1)


def stage1_config() -> Blip2Config:
    """The paper's stage-1 model on a GPU, a tiny one on a CPU. ln_vision's eps equals the tower's (1e-6) so the
    transformers export (one vision eps) computes exactly what we do."""
    if GPU:
        cfg = blip2_stage1_vit_g()
        return cfg.replace(vision=dataclasses.replace(cfg.vision, dtype="bfloat16"), ln_vision_eps=1e-6)
    return Blip2Config(
        vision=VisionConfig(kind="eva", image_size=32, patch_size=8, width=96, depth=2, heads=4, mlp_hidden=384,
                            layer_norm_eps=1e-6, dtype="float32"),
        qformer=QFormerConfig(hidden_size=64, num_layers=4, num_heads=4, intermediate_size=256, num_query_tokens=8,
                              vocab_size=1088, dec_token_id=1087),
        embed_dim=32, max_text_len=STAGE1.text_len, ln_vision_eps=1e-6,
    )


def stage2_config() -> Blip2Config:
    base = stage1_config()
    llm = LLMConfig(hf_config=dict(OPT_2_7B if GPU else OPT_TINY), dtype="bfloat16" if GPU else "float32",
                    max_text_len=STAGE2.text_len)
    return base.replace(llm=llm)


def build_model(cfg: Blip2Config, seed: int = 0) -> Blip2:
    """Random weights, initialised on the target device (seconds at paper size: no CPU init, no copy)."""
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model = Blip2(cfg)
    return model.to(DEVICE)


def autocast():
    """bf16 autocast on a GPU (fp32 master weights), nothing on a CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if GPU else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------------
# inputs


def images(B: int, image_size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, image_size, image_size, generator=g).to(DEVICE)


def qformer_text(B: int, T: int, vocab: int, cls_id: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Q-Former ids ([CLS] first, padded with 0 after a random length >= 4) and their mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if vocab > 2000 else 5, vocab - 1, (B, T), generator=g)
    ids[:, 0] = cls_id
    lengths = torch.randint(min(4, T), T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return (ids * mask).to(DEVICE), mask.to(DEVICE)


def llm_text(B: int, T: int, vocab: int, bos: int, pad: int, avoid: int, seed: int = 2):
    """LLM ids (BOS first, right padding), mask and labels (-100 on BOS and padding); no id equals `avoid` (the
    image placeholder of the transformers export)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab - 1, (B, T), generator=g)
    ids = torch.where(ids == avoid, torch.full_like(ids, 4), ids)
    ids[:, 0] = bos
    lengths = torch.randint(min(4, T), T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, pad)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    return ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)


# ---------------------------------------------------------------------------------------------------------------
# measuring


def peak_mem_mb(fn: Callable[[], object]) -> Optional[float]:
    """GPU: the peak allocated memory while fn runs, above what was allocated before (activations, gradients,
    temporaries; not the weights). CPU: None (tracemalloc does not see torch's allocator)."""
    peak = peak_bytes(fn)
    return None if peak is None else round(peak / 2**20, 1)


@functools.lru_cache(maxsize=None)
def measured_peak_flops() -> dict:
    """The peak this run can reach, for MFU: a large bf16 matmul on a GPU (8192^3), an fp32 matmul on a CPU
    (1024^3, all cores). Also the nominal dense bf16 peak from the GPU table (training/logging.py), when known."""
    from blip2fast.training.logging import peak_flops

    n, dtype = (8192, torch.bfloat16) if GPU else (1024, torch.float32)
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    ms = median_ms(lambda: a @ b, reps=10 if GPU else 5, warmup=3 if GPU else 1)
    measured = 2.0 * n ** 3 / (ms * 1e-3)
    return {"measured_flops": measured, "matmul": f"{n}^3 {str(dtype).removeprefix('torch.')}",
            "nominal_flops": peak_flops(DEVICE)}


def device_name() -> str:
    if GPU:
        return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), model)
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({model})"


@dataclasses.dataclass
class Measured:
    ms: float
    peak_mb: Optional[float]


def measure(fns: dict, sizes: Sizes) -> dict:
    """impl -> Measured. Each impl is warmed up, then the timed steps are interleaved (impl A, B, C, A, B, C, ...)
    so that a slow phase of a shared machine hits every impl alike; the median per impl is reported."""
    for fn in fns.values():
        for _ in range(sizes.warmup):
            fn()
    sync()
    times = {impl: [] for impl in fns}
    for _ in range(sizes.reps):
        for impl, fn in fns.items():
            times[impl].append(time_once_ms(fn))
    out = {}
    for impl, fn in fns.items():
        ts = sorted(times[impl])
        out[impl] = Measured(ms=ts[len(ts) // 2], peak_mb=peak_mem_mb(fn))
    return out


def extra_info(bench: str, impl: str, measured: dict, flops: float, batch: int, config: dict,
               checks: Optional[dict] = None) -> dict:
    """The row a benchmark reports (benchmarks/report.py reads these keys). `flops` is the minimal formulation's
    count (blip2fast.flops) for the step: the same number for every impl, so TFLOP/s and MFU measure *useful*
    work and their ratios equal the speed ratios."""
    me = measured[impl]
    peak = measured_peak_flops()
    achieved = flops / (me.ms * 1e-3)
    return {
        "bench": bench, "impl": impl, "device": device_name(), "size": SIZE_LABEL,
        "dtype": "bf16 autocast (fp32 trainable, bf16 frozen)" if GPU else "float32",
        "batch": batch, "config": config, "threads": None if GPU else torch.get_num_threads(),
        "median_ms": round(me.ms, 3),
        "samples_per_s": round(batch / (me.ms * 1e-3), 2),
        # other impl -> how many times faster this impl is (> 1: this one is faster)
        "speedup_vs": {other: round(m.ms / me.ms, 3) for other, m in measured.items() if other != impl},
        "peak_mem_mb": me.peak_mb,
        "flops_per_step": flops,
        "tflops": round(achieved / 1e12, 4),
        "mfu": round(achieved / peak["measured_flops"], 4),
        "mfu_nominal": None if not peak["nominal_flops"] else round(achieved / peak["nominal_flops"], 4),
        "peak_tflops_measured": round(peak["measured_flops"] / 1e12, 3), "peak_matmul": peak["matmul"],
        "checks": checks or {},
    }


def record(row: dict) -> None:
    """Append the row to $BLIP2FAST_ROWS_JSONL when set (benchmarks/gpu/check.py): rows of the benchmarks that
    finished survive a stage stopped at its time limit, before pytest-benchmark writes its JSON."""
    path = os.environ.get("BLIP2FAST_ROWS_JSONL")
    if path:
        import json

        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def report(benchmark, bench: str, impl: str, fn: Callable[[], object], measured: dict, flops: float, batch: int,
           config: dict, checks: dict, reps: int, extra: Optional[dict] = None) -> dict:
    """One benchmark row: the extra_info of `impl` from the interleaved measurement (plus `extra`), recorded for the
    GPU check, then pytest-benchmark's own timing of `fn`. Returns the row."""
    info = extra_info(bench, impl, measured, flops, batch, config, checks)
    info.update(extra or {})
    benchmark.group = bench
    benchmark.extra_info.update(info)
    record(info)
    benchmark.pedantic(lambda: (fn(), sync()), rounds=max(2, reps // 2), iterations=1, warmup_rounds=0)
    return info


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_equal(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = EQUAL_TOL) -> float:
    err = rel_err(got, want)
    assert err < tol, f"{name}: relative error {err:.3g} >= {tol:g}: the implementations do not compute the same thing"
    return float(f"{err:.3g}")


# ---------------------------------------------------------------------------------------------------------------
# transformers peers: our weights exported with save_hf, loaded by transformers (as tests/interop do)


TRAINABLE_HF_PARTS = ("qformer.", "query_tokens", "language_projection.", "vision_projection.", "text_projection.",
                      "itm_head.", "embeddings.", "vision_model.post_layernorm.")  # fp32 + trainable, as in ours


def transformers_peer(model: Blip2, kind: str, folder: str, image_token_index: Optional[int] = None,
                      load_dtype: Optional[torch.dtype] = None):
    """transformers' Blip2ForImageTextRetrieval ("retrieval") or Blip2ForConditionalGeneration ("generation") loaded
    from `save_hf(model, folder)`: the same weights, in our dtype layout. It loads in `load_dtype` (bf16 on a GPU:
    the frozen tower and LLM are stored so, nothing converts) and the parts trainable in ours (Q-Former, query
    tokens, projections, heads, post_layernorm = our ln_vision) become fp32 again with our exact fp32 values (the
    export's own tensors, renamed by checkpoint.hf.our_state_dict_to_hf), so no weight differs by a rounding. The
    frozen parts have no gradients and stay in eval mode (set_train_mode), as ours."""
    import warnings

    import transformers

    from blip2fast.checkpoint.hf import our_state_dict_to_hf, save_hf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not written: temp, qformer.lm_head" is expected for both layouts
        save_hf(model, folder, kind=kind, image_token_index=image_token_index)
    cls = {"retrieval": transformers.Blip2ForImageTextRetrieval,
           "generation": transformers.Blip2ForConditionalGeneration}[kind]
    if load_dtype is None:
        load_dtype = torch.bfloat16 if GPU else torch.float32
    # loaded on the CPU, then moved: a device_map needs accelerate, which the GPU machine may not have
    theirs, info = load_pretrained(cls, folder, dtype=load_dtype, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, f"transformers did not load every weight of the export: {bad}"
    theirs.to(DEVICE)
    theirs.requires_grad_(False)
    exact = our_state_dict_to_hf({k: v.detach() for k, v in model.state_dict().items()}, kind)
    restored = 0
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.startswith(TRAINABLE_HF_PARTS):
                if name not in exact:
                    raise KeyError(f"{name}: trainable in transformers' {kind} model but not in our export")
                p.data = exact[name].to(device=DEVICE, dtype=torch.float32).clone()
                p.requires_grad_(True)
                restored += 1
    assert restored > 0, "no trainable part found in the transformers model"
    return theirs


def set_train_mode(theirs) -> None:
    """Trainable parts in train mode (dropout), frozen ones in eval mode: what our model does."""
    theirs.train()
    theirs.vision_model.eval()
    if hasattr(theirs, "language_model"):
        theirs.language_model.eval()


def clear_grads(*modules) -> None:
    for m in modules:
        for p in m.parameters():
            p.grad = None
