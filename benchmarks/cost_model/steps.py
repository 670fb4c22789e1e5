"""The training steps the cost model traces, each built on `meta` (no weights, no memory) and run inside the CUDA
stand-ins of trace.py:

  blip2fast      blip2fast.training.step.TrainStep's own body: seed/step counters, the forward under bf16 autocast
                 (StepModule), torch.autograd.grad, clipping (foreach), the lr schedule on device and fused AdamW
                 (what build_optimizer picks on CUDA). Backend setting via BLIP2FAST_BACKEND; mode eager or
                 cuda_graphs (same kernels, replay cost, no autocast weight cache, as under capture).
  lavis          benchmarks/lavis_baseline.py's formulation on the same model, fed the same negatives (its multinomial
                 loop still runs: 2B host syncs), then the same gradient, clipping and AdamW code, so the difference
                 is the formulation (as in the end-to-end benchmarks).
  transformers   stage 2 only (transformers has no stage-1 training): Blip2ForConditionalGeneration built from an
                 equivalent transformers config on meta, its forward over [image placeholders | text] and the
                 shifted cross-entropy of bench_stage2_step.py, then the same gradient / clipping / AdamW.

Sizes: the end-to-end benchmarks' GPU sizes (EVA ViT-g/14 in bf16, BERT-base Q-Former fp32 under bf16 autocast,
OPT-2.7B in bf16 for stage 2, 32 text tokens); any batch; or the tiny CPU sizes (tests).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from blip2fast.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig

from .trace import OUTSIDE, Regions

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if BENCH_DIR not in sys.path:  # lavis_baseline / e2e_support live beside this package
    sys.path.insert(0, BENCH_DIR)

IMPLS = ("blip2fast", "lavis", "transformers")
MODES = ("eager", "cuda_graphs")
# OPT-2.7B (facebook/opt-2.7b's config.json), written out in benchmarks/e2e_support.py: shared, not copied
PRESETS = ("vit_g", "vit_l", "tiny")


@dataclass
class StepSpec:
    stage: int = 1
    preset: str = "vit_g"
    batch: int = 128
    text_len: int = 32
    impl: str = "blip2fast"
    backend: str = "torch"  # BLIP2FAST_BACKEND value: torch | triton | cpp | per-op list | auto
    mode: str = "eager"
    fp8: bool = False
    attention_dropout: Optional[float] = None  # None: the preset's (0.1, the paper's)
    hidden_dropout: Optional[float] = None

    def label(self) -> str:
        bits = [self.impl]
        if self.impl == "blip2fast":
            bits += [f"backend={self.backend}", self.mode] + (["fp8"] if self.fp8 else [])
        if self.attention_dropout is not None:
            bits.append(f"attn_dropout={self.attention_dropout}")
        return " ".join(bits)


def model_config(spec: StepSpec) -> Blip2Config:
    """The training preset's GPU model (its storage dtypes: bf16 tower, bf16 LLM), ln_vision eps as the tower's,
    dropout as asked, and OPT-2.7B for stage 2 (tiny: the CPU benchmark sizes)."""
    import e2e_support as E

    if spec.preset == "tiny":
        cfg = Blip2Config(
            vision=VisionConfig(kind="eva", image_size=32, patch_size=8, width=96, depth=2, heads=4, mlp_hidden=384,
                                layer_norm_eps=1e-6, dtype="float32"),
            qformer=QFormerConfig(hidden_size=64, num_layers=4, num_heads=4, intermediate_size=256,
                                  num_query_tokens=8, vocab_size=1088, dec_token_id=1087),
            embed_dim=32, max_text_len=spec.text_len, ln_vision_eps=1e-6)
        llm = dict(E.OPT_TINY)
        llm_dtype = "float32"
    else:
        from blip2fast.training.config import stage1_vit_g, stage1_vit_l, stage2_opt2_7b

        # the storage dtypes the training presets use (a frozen tower / LLM whose dtype differs from autocast's is
        # recast on every call: the trace must see what a user's run does)
        base = (stage1_vit_g() if spec.preset == "vit_g" else stage1_vit_l()).model
        cfg = base.replace(ln_vision_eps=1e-6, max_text_len=spec.text_len)
        llm = dict(E.OPT_2_7B)
        llm_dtype = stage2_opt2_7b().model.llm.dtype
    q = cfg.qformer
    q = dataclasses.replace(
        q, attention_dropout=q.attention_dropout if spec.attention_dropout is None else spec.attention_dropout,
        hidden_dropout=q.hidden_dropout if spec.hidden_dropout is None else spec.hidden_dropout)
    cfg = cfg.replace(qformer=q)
    if spec.stage == 2:
        cfg = cfg.replace(llm=LLMConfig(hf_config=llm, dtype=llm_dtype, max_text_len=spec.text_len))
    return cfg


@contextlib.contextmanager
def backend_env(backend: str):
    """BLIP2FAST_BACKEND for the trace. "auto": what automatic choice picks on CUDA, i.e. the fastest backend the
    GPU check measured per op (blip2fast/ops/measured_backends.json), torch for an op never measured (on meta
    tensors the ops' own automatic rule would take the CPU branch)."""
    old = os.environ.get("BLIP2FAST_BACKEND")
    if backend == "auto":
        from blip2fast.ops.dispatch import measured_backends

        picks = [f"{op}={e['order'][0]}" for op, e in measured_backends().items() if e.get("order")]
        os.environ["BLIP2FAST_BACKEND"] = ",".join(picks) if picks else "torch"
    else:
        os.environ["BLIP2FAST_BACKEND"] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("BLIP2FAST_BACKEND", None)
        else:
            os.environ["BLIP2FAST_BACKEND"] = old


def _build_meta(cfg: Blip2Config):
    from blip2fast import Blip2

    with torch.device("meta"):
        model = Blip2(cfg)
    return model


def _inputs(spec: StepSpec, cfg: Blip2Config, model) -> dict:
    dev = torch.device("meta")
    B, T = spec.batch, spec.text_len
    batch = {"pixel_values": torch.empty(B, 3, cfg.vision.image_size, cfg.vision.image_size, device=dev),
             "input_ids": torch.empty(B, T, dtype=torch.long, device=dev),
             "attention_mask": torch.empty(B, T, dtype=torch.long, device=dev)}
    if spec.stage == 2:
        batch["labels"] = torch.empty(B, T, dtype=torch.long, device=dev)
    return batch


def _optimizer(model, mode: str):
    """build_optimizer as on CUDA: fused AdamW (capturable under CUDA graphs). torch refuses fused=True for meta
    parameters, so the groups are built unfused and then marked fused, which is what adamw_step_ reads."""
    from blip2fast.training.optim import build_optimizer

    opt = build_optimizer(model, lr=1e-4, fused=False, capturable=mode == "cuda_graphs")
    for g in opt.param_groups:
        g["fused"], g["foreach"] = True, False
    return opt


def _mark_regions(model, regions: Regions, patches: list, lavis=None) -> None:
    """The parts of the step the report breaks down by (methods run inside a named region)."""
    import blip2fast.models.blip2 as blip2_module

    w = regions.wrap
    w(model, "image_embeds", "frozen tower + ln_vision", patches)
    w(model.visual_encoder, "forward", "frozen tower + ln_vision", patches)
    qf = model.qformer
    for attr, name in (("projection_weights", "Q-Former fused projection weights"),
                       ("image_kv", "Q-Former image K/V"), ("query_pass", "Q-Former query pass"),
                       ("text_pass", "Q-Former text pass"), ("itm_pass", "Q-Former ITM pass"),
                       ("itg_pass", "Q-Former ITG pass"), ("query_itg_pass", "Q-Former query + ITG pass")):
        if hasattr(qf, attr):
            w(qf, attr, name, patches)
    w(qf.lm_head, "forward", "LM head (ITG)", patches)
    w(qf.lm_head, "transform", "LM head (ITG)", patches)
    w(blip2_module, "linear_cross_entropy", "LM head (ITG)" if model.config.llm is None else "LM head (LLM)",
      patches)
    w(blip2_module, "itc_loss", "losses (ITC)", patches)
    w(blip2_module, "itm_sample_negative_pair", "losses (ITM sampling)", patches)
    w(model, "_itm_head", "losses (ITM head)", patches)
    if getattr(model, "language_model", None) is not None:
        _mark_llm(model.language_model, regions, patches)
    if lavis is not None:
        bert = lavis.bert

        def bert_regions(*a, decoder=False, **k):  # LAVIS's ITG pass is its BertModel call with decoder=True
            if not decoder:
                return bert(*a, **k)
            with regions.region("Q-Former ITG pass"):
                return bert(*a, decoder=True, **k)

        lavis.bert = bert_regions
        w(lavis, "vit", "frozen tower + ln_vision", patches)
        w(lavis, "image_embeds", "frozen tower + ln_vision", patches)
        w(lavis, "query_pass", "Q-Former query pass", patches)
        w(lavis, "text_feat", "Q-Former text pass", patches)
        w(lavis, "itm_logits_from_embeds", "Q-Former ITM pass", patches)
        w(lavis, "_similarities", "losses (ITC)", patches)


def _mark_llm(llm, regions: Regions, patches: list) -> None:
    """The frozen LLM's trunk (its modules down to the decoder stack), whichever entry point the code calls; its
    output head is the "LM head" region."""
    head = llm.get_output_embeddings()
    for name, mod in llm.named_modules():
        if name.count(".") <= 1 and mod is not head:
            regions.wrap(mod, "forward", "frozen LLM", patches)
    if head is not None:
        regions.wrap(head, "forward", "LM head (LLM)", patches)


def _grads_clip_update(step_body: Callable, model, opt, regions: Regions, grad_clip: float = 1.0):
    """blip2fast's clipping + lr + AdamW after `step_body()` returned the loss (the LAVIS / transformers steps)."""
    from blip2fast.training.optim import adamw_step_, clip_grads_, init_state_, install_lr_tensor, lr_at_tensor

    params = [p for g in opt.param_groups for p in g["params"]]
    lr_t = torch.zeros((), dtype=torch.float32, device="cuda")
    step_t = torch.zeros((), dtype=torch.int64, device="cuda")
    install_lr_tensor(opt, lr_t)
    init_state_(opt)

    def run():
        loss = step_body()
        regions.fill_from([loss.grad_fn])
        with regions.phase_as("backward"):
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        with regions.phase_as("optimizer"), regions.region("optimizer"):
            clip_grads_(torch.device("cuda"), [g for g in grads if g is not None], grad_clip)
            with torch.no_grad():
                lr_t.copy_(lr_at_tensor(step_t, 1e-4, 2000, 100000, 1e-5))
            adamw_step_(opt, params, list(grads))
            with torch.no_grad():
                step_t.add_(1)

    return run


def build_step(spec: StepSpec) -> Callable[[Regions, list], Callable[[], None]]:
    """For trace.trace_step: builds the model and the step inside the stand-ins."""
    if spec.impl not in IMPLS:
        raise ValueError(f"impl={spec.impl!r}: one of {IMPLS}")
    if spec.mode not in MODES:
        raise ValueError(f"mode={spec.mode!r}: one of {MODES}")
    if spec.impl == "transformers" and spec.stage == 1:
        raise ValueError("transformers has no stage-1 training (transformers #22645, #34019): use --stage=2")

    def build(regions: Regions, patches: list) -> Callable[[], None]:
        cfg = model_config(spec)
        model = _build_meta(cfg)
        if spec.fp8:
            _to_fp8(model)
        model.train()
        batch = _inputs(spec, cfg, model)
        if spec.impl == "blip2fast":
            return _blip2fast_step(spec, model, batch, regions, patches)
        if spec.impl == "lavis":
            return _lavis_step(spec, model, batch, regions, patches)
        return _transformers_step(spec, cfg, model, batch, regions, patches)

    return build


def _blip2fast_step(spec, model, batch, regions, patches):
    from blip2fast.training.step import StepModule, TrainStep

    _mark_regions(model, regions, patches)
    opt = _optimizer(model, spec.mode)
    ts = TrainStep(model, StepModule(model, spec.stage), opt, seed=0, accum=1, grad_clip=1.0,
                   schedule=(1e-4, 2000, 100000, 1e-5), device=torch.device("cuda"), mode=spec.mode)

    # TrainStep._body with the phases marked: the module call is the forward, autograd.grad the backward, the rest
    # the optimizer. Both are wrapped, the body itself runs unchanged.
    module_call = ts.module.forward
    grad = torch.autograd.grad

    def forward(*a, **k):
        with regions.phase_as("forward"):
            out = module_call(*a, **k)
        return out

    def grad_in_backward(loss, *a, **k):
        from .trace import _tensors

        regions.fill_from([t.grad_fn for t in _tensors(loss)])
        with regions.phase_as("backward"):
            g = grad(loss, *a, **k)
        regions.phase = "optimizer"
        regions.stack.append("optimizer")
        return g

    ts.module.forward = forward
    patches.append((ts.module, "forward", _missing()))
    patches.append((torch.autograd, "grad", grad))
    torch.autograd.grad = grad_in_backward

    if spec.mode == "cuda_graphs":  # what code that asks "am I being captured?" hears under capture
        _set_capturing(patches)

    def run():
        with backend_env(spec.backend):
            ts._body([batch])
        regions.stack[:] = [OUTSIDE]
        regions.phase = "forward"

    return run


def _set_capturing(patches: list) -> None:
    """torch.cuda.is_current_stream_capturing() -> True (and transformers' copy of the check), as inside
    torch.cuda.graph: transformers then skips its host-side padding-mask checks, as it does under capture."""
    patches.append((torch.cuda, "is_current_stream_capturing", torch.cuda.is_current_stream_capturing))
    torch.cuda.is_current_stream_capturing = lambda: True
    try:
        from transformers.utils import import_utils
    except ImportError:
        return
    patches.append((import_utils, "is_cuda_stream_capturing", import_utils.is_cuda_stream_capturing))
    import_utils.is_cuda_stream_capturing = lambda: True


def _missing():
    from .trace import _MISSING

    return _MISSING


def _lavis_step(spec, model, batch, regions, patches):
    from lavis_baseline import LavisFormulation

    lavis = LavisFormulation(model)
    _mark_regions(model, regions, patches, lavis)
    opt = _optimizer(model, "eager")
    B = spec.batch
    negatives = (torch.empty(B, dtype=torch.long, device="cuda"), torch.empty(B, dtype=torch.long, device="cuda"))
    from .trace import Autocast

    def body():
        with Autocast("cuda", dtype=torch.bfloat16):
            if spec.stage == 1:
                return lavis.stage1_loss(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                         negatives)["loss"]
            return lavis.stage2_loss(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                     batch["labels"])

    return _grads_clip_update(body, model, opt, regions)


def _hf_config(cfg: Blip2Config, llm_config) -> object:
    """transformers' Blip2Config with our sizes, as checkpoint/hf.py save_hf writes it for generation."""
    from blip2fast.checkpoint.hf import hf_blip2_config

    return hf_blip2_config(cfg, llm_config, image_token_index=llm_config.vocab_size - 1)


def _transformers_step(spec, cfg, model, batch, regions, patches):
    """bench_stage2_step.py's transformers peer: frozen tower and LLM in bf16 without gradients (eval mode), the
    Q-Former, query tokens and projection fp32 and trainable (train mode)."""
    import transformers

    from bench_stage2_step import transformers_loss

    hcfg = _hf_config(cfg, model.language_model.config)
    with torch.device("meta"):
        theirs = transformers.Blip2ForConditionalGeneration(hcfg)
    theirs.requires_grad_(False)
    theirs.to(torch.bfloat16)
    trainable = ("qformer", "query_tokens", "language_projection")
    for name, p in theirs.named_parameters():
        if name.startswith(trainable):
            p.data = p.data.float()
            p.requires_grad_(True)
    theirs.train()
    theirs.vision_model.eval()
    theirs.language_model.eval()
    w = regions.wrap
    w(theirs.vision_model, "forward", "frozen tower + ln_vision", patches)
    w(theirs.qformer, "forward", "Q-Former query pass", patches)
    _mark_llm(theirs.language_model, regions, patches)
    opt = _optimizer(theirs, "eager")
    from .trace import Autocast

    Q = cfg.qformer.num_query_tokens

    def body():
        with Autocast("cuda", dtype=torch.bfloat16):
            return transformers_loss(theirs, batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                     batch["labels"], Q, hcfg.image_token_index)

    return _grads_clip_update(body, theirs, opt, regions)


def _to_fp8(model) -> None:
    """--fp8: the frozen towers' Linears in float8 (blip2fast/models/fp8.py), as the trainer does."""
    from blip2fast.models.fp8 import convert_linears_to_fp8_

    convert_linears_to_fp8_(model.visual_encoder)
    llm = getattr(model, "language_model", None)
    if llm is not None:
        convert_linears_to_fp8_(llm, skip=(llm.get_output_embeddings(),))
