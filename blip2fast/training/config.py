"""Training configuration: frozen dataclasses (one per concern), presets as Python functions, and the command line.

    python -m blip2fast.train                                   # the default preset: "demo"
    python -m blip2fast.train --preset=stage1_vit_g --data.urls='/data/laion/{000000..099999}.tar' \\
        --weights.vision=/models/eva_vit_g.pth --weights.bert=/models/bert-base-uncased
    python -m blip2fast.train --checkpoint.dir=runs/x --resume=latest

Flags are derived from the dataclass fields: `--key=value` for top-level fields, `--section.key=value` (any depth,
e.g. `--model.qformer.hidden_dropout=0`) for the rest, and `--key=value` also for a field name that exists in one
section only (`--lr` is `--optim.lr`, `--steps` is `--schedule.steps`, `--resume` is `--checkpoint.resume`).
`--preset=NAME` is applied first, whatever its position. Values are type-checked against the field's annotation
(int, float, bool, str, Optional[...], tuples as "a,b", dicts as JSON; "none" for an Optional). Unknown keys, bad
types and invalid values are errors naming the key and what is accepted. `--help` lists every field with its value
in the chosen preset and its comment.

Every weight comes from a local path (`weights.*`, `model.llm.path`, `model.vision.hf_path`): nothing is
downloaded.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from ..config import Blip2Config, LLMConfig, blip2_stage1_vit_g, blip2_stage1_vit_l, blip2_tiny
from ..config import validate as validate_model

# ------------------------------------------------------------------------------------------------ sections


@dataclass(frozen=True)
class DataConfig:
    """Training data: webdataset shards (img2dataset layout) read by `blip2fast.data.shards.ShardLoader`.

    `tokenizer`: stage 1 needs the Q-Former's BERT tokenizer (a local bert-base-uncased folder; "" uses
    weights.bert's folder; "demo" is the word-level tokenizer over the demo captions); stage 2 uses the LLM's
    tokenizer ("" or "demo" = the folder of weights.llm).

    Pixels: a transformers tower's own preprocessor_config.json (its mean / std, crop or not, and its side when
    model.vision.image_size is left at the preset's), OpenAI CLIP's statistics for the EVA / CLIP towers; the
    flags below override them, and the run's config.json records what was used."""

    urls: str = ""  # shard brace pattern(s), "::"-joined; "" = the procedural demo set (written once to demo_cache)
    tokenizer: str = ""  # tokenizer folder ("" = weights.bert / the LLM's; "demo": the demo's words, stage 1)
    batch_size: int = 64  # image-caption pairs per micro-batch per rank (global batch = this x ranks x accum_steps)
    num_workers: int = 2  # loader worker processes (decode, augment, tokenise); also the number of streams
    prefetch_factor: int = 2  # batches prefetched per worker
    worker_timeout: float = 600.0  # seconds without a batch from the workers before a stuck one stops the run; 0: wait
    resampled: bool = True  # shards drawn with replacement forever (step-based training); False: epochs
    shuffle: bool = True  # shuffle shards, samples within shards and across open shards
    shuffle_buffer: int = 1000  # within-shard shuffle width (samples)
    mix_shards: int = 4  # shard visits each worker draws from at once
    augment: bool = True  # the paper's RandomResizedCrop + flip and a random caption; False: resize + centre crop
    max_words: int = 50  # captions are cut to this many words after cleaning
    prompt: str = ""  # stage 2, decoder-only LLM: text before each caption (the paper trains with none)
    demo_cache: str = "~/.cache/blip2fast/demo-shards"  # where the demo shards live (env BLIP2FAST_DEMO_CACHE wins)
    demo_samples: int = 16384  # training images in the demo set (written once, then reused)
    image_mean: Optional[tuple[float, float, float]] = None  # pixel mean; none = the tower's (below)
    image_std: Optional[tuple[float, float, float]] = None  # pixel std; none = the tower's
    resize: str = ""  # evaluation resize: crop (shorter side + centre crop) or squash; "" = the tower's


@dataclass(frozen=True)
class EvalConfig:
    """Held-out image-text retrieval (stage 1): ITC cosine R@1/R@5 against chance."""

    urls: str = ""  # held-out shards; "" = the demo's held-out set when training on the demo data, else no evaluation
    size: int = 256  # held-out pairs (the first `size` samples; captions should be distinct)
    every: int = 0  # also evaluate every N steps (0: before and after training only)
    rerank_k: int = 0  # > 0: also the paper's protocol (blip2fast.eval: ITC top-k rescored by ITM + cosine), as
    # rerank_* metrics; 0: ITC alone (cheap)


@dataclass(frozen=True)
class WeightsConfig:
    """Local paths of every pretrained weight ("" = not used; "random" = deliberately random).

    `vision`: an EVA / CLIP state dict (.pth/.pt/.bin via torch.load(weights_only=True), or .safetensors; LAVIS
    names, with or without the "visual_encoder." prefix), or a transformers folder for model.vision.kind="hf"."""

    vision: str = ""  # frozen tower: EVA/CLIP state dict file, or a transformers folder (model.vision.kind=hf)
    bert: str = ""  # stage 1: transformers BERT folder to initialise the Q-Former from (LAVIS's init_Qformer)
    llm: str = ""  # stage 2: transformers folder of the frozen LLM (sets model.llm.path)
    stage1: str = ""  # stage 2: a blip2fast run/checkpoint folder, a LAVIS .pth or a transformers BLIP-2 folder


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with the paper's settings."""

    lr: float = 1e-4  # peak learning rate (reached at the end of warmup)
    weight_decay: float = 0.05  # not applied to biases, norms, query tokens or the temperature
    betas: tuple[float, float] = (0.9, 0.98)  # the paper's (not torch's 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping (the norm is still logged)
    fused: Optional[bool] = None  # fused AdamW kernel; None = wherever torch supports it for the device


@dataclass(frozen=True)
class ScheduleConfig:
    """Steps and the learning-rate schedule (per optimiser step: linear warmup, then cosine to a floor)."""

    steps: int = 250_000  # optimiser steps
    warmup_steps: int = 2000  # linear warmup from 0 to optim.lr
    min_lr: float = 1e-5  # cosine floor (paper: 1e-5 stage 1, 5e-5 stage 2)
    accum_steps: int = 1  # micro-batches per optimiser step (ITC negatives stay within a micro-batch)


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints: trainable weights (safetensors) + optimiser + schedule + step + RNG + data position.

    `resume`: "" starts fresh (refused if `dir` already holds checkpoints: nothing is overwritten); "latest" takes
    the newest complete checkpoint of `dir` (or, without `dir`, of the newest runs/<preset>-* folder) and starts
    fresh with a message when there is none; a path names a checkpoint folder or a run folder (its latest)."""

    dir: str = ""  # run folder ("" = runs/<preset>-<date>-<time>); checkpoints in <dir>/checkpoints/step_<N>
    every: int = 1000  # save every N optimiser steps (and always at the end); 0 = only at the end
    keep: int = 3  # keep the newest K checkpoints
    resume: str = ""  # "" fresh; "latest" (fresh with a message if none); or a checkpoint / run folder
    export_hf: bool = True  # write a transformers folder (<dir>/hf) at the end (also on SIGUSR1)
    export_only: bool = False  # with resume: write the transformers folder and exit without training


@dataclass(frozen=True)
class LoggingConfig:
    """Rank-0 progress lines, <dir>/metrics.jsonl, TensorBoard when installed."""

    every: int = 50  # steps between progress lines (the only host<->device syncs of the loop)
    jsonl: bool = True  # write <dir>/metrics.jsonl
    tensorboard: bool = True  # write <dir>/tb when the tensorboard package is installed
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = from a table of known GPUs (no MFU on a CPU)


@dataclass(frozen=True)
class DistConfig:
    """Several GPUs / nodes (under torchrun, which sets the ranks). The trainable Q-Former is always replicated
    (DDP, or one all-reduce per step with --compile / --cuda_graphs)."""

    frozen: str = "replicate"  # frozen towers (ViT, LLM): replicate on every rank, or fsdp: FSDP2-sharded per block


@dataclass(frozen=True)
class SpeedConfig:
    """How the training step runs (the numbers do not change beyond rounding)."""

    compile: bool = False  # torch.compile the whole step (forward, backward, clipping, AdamW)
    cuda_graphs: bool = False  # capture the whole step into one CUDA graph after warm-up and replay it (CUDA only)
    graph_warmup: int = 3  # eager steps (real ones) before the CUDA-graph capture
    fp8: bool = False  # frozen towers' linear layers in float8 e4m3 (GPU compute capability >= 8.9)


@dataclass(frozen=True)
class TrainConfig:
    """One training run."""

    preset: str = "demo"  # the preset this config came from (set by --preset)
    stage: int = 1  # 1: ITC + ITM + ITG on the Q-Former; 2: soft prompt into the frozen LLM
    seed: int = 0  # model init, data order, augmentation, ITM draws and dropout all derive from it
    device: str = "auto"  # auto (cuda when available), cpu, cuda or cuda:N
    amp: bool = True  # CUDA: bfloat16 autocast with float32 master weights (the CPU always runs float32)
    cpu_fp32: bool = True  # on a CPU, frozen towers run in float32 whatever model.*.dtype says
    deterministic: bool = False  # torch.use_deterministic_algorithms: bit-identical resumes (CPU; slower on GPUs)
    model: Blip2Config = field(default_factory=Blip2Config)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    def __post_init__(self):
        errors = validate(self)
        if errors:
            raise ConfigError("invalid training config: " + "; ".join(errors))  # one line, every problem

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The inverse of to_dict (what <run dir>/config.json holds)."""
        return _from_dict(cls, d, "")


class ConfigError(ValueError):
    """A bad command line or config value; the message names the key."""


def _numbers(obj, prefix: str = ""):
    """(dotted key, value) of every int / float field of a config tree, tuple elements as key[i]; bools and dict
    fields (a transformers config) are not numbers here."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, key + ".")
        elif isinstance(value, tuple):
            for i, x in enumerate(value):
                if isinstance(x, (int, float)) and not isinstance(x, bool):
                    yield f"{key}[{i}]", x
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, value


# Ranges of the numeric fields (beyond the ones checked below with their own wording). Every float must also be
# finite: a NaN passes every comparison and would surface as a traceback deep in the optimiser or the model.
_POSITIVE = ("optim.eps", "model.ln_vision_eps", "model.temp_init", "model.vision.layer_norm_eps",
             "model.qformer.layer_norm_eps", "model.vision.image_size", "model.vision.patch_size",
             "model.vision.width", "model.vision.depth", "model.vision.heads", "model.vision.mlp_hidden",
             "model.qformer.hidden_size", "model.qformer.num_layers", "model.qformer.num_heads",
             "model.qformer.intermediate_size", "model.qformer.num_query_tokens", "model.qformer.vocab_size",
             "model.qformer.max_position_embeddings", "model.embed_dim", "model.max_text_len",
             "model.llm.max_text_len", "eval.size")
_NON_NEGATIVE = ("eval.rerank_k", "model.qformer.pad_token_id", "model.qformer.cls_token_id",
                 "model.qformer.sep_token_id", "model.qformer.dec_token_id")
_UNIT_INTERVAL = ("model.itc_label_smoothing", "model.itg_label_smoothing", "model.qformer.hidden_dropout",
                  "model.qformer.attention_dropout")  # [0, 1)


def _numeric_errors(cfg: TrainConfig) -> list[str]:
    values = dict(_numbers(cfg))
    errs = [f"{k}={v}: must be a finite number" for k, v in values.items()
            if isinstance(v, float) and not math.isfinite(v)]
    bad = {k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)}
    for keys, ok, what in ((_POSITIVE, lambda v: v > 0, "> 0"), (_NON_NEGATIVE, lambda v: v >= 0, ">= 0"),
                           (_UNIT_INTERVAL, lambda v: 0 <= v < 1, "in [0, 1)")):
        errs += [f"{k}={values[k]}: must be {what}" for k in keys if k in values and k not in bad and not ok(values[k])]
    return errs


def validate(cfg: TrainConfig) -> list[str]:
    errs = _numeric_errors(cfg)
    if cfg.stage not in (1, 2):
        errs.append(f"stage={cfg.stage}: must be 1 or 2")
    if cfg.stage == 2 and cfg.model.llm is None:
        errs.append("stage=2 needs model.llm (use a stage-2 preset, e.g. --preset=stage2_opt2.7b)")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        errs.append(f"device={cfg.device!r}: must be auto, cpu, cuda or cuda:N")
    positive = {"data.batch_size": cfg.data.batch_size, "data.prefetch_factor": cfg.data.prefetch_factor,
                "data.shuffle_buffer": cfg.data.shuffle_buffer, "data.mix_shards": cfg.data.mix_shards,
                "data.max_words": cfg.data.max_words, "data.demo_samples": cfg.data.demo_samples,
                "eval.size": cfg.eval.size, "schedule.accum_steps": cfg.schedule.accum_steps,
                "checkpoint.keep": cfg.checkpoint.keep, "logging.every": cfg.logging.every}
    errs += [f"{k}={v}: must be >= 1" for k, v in positive.items() if v < 1]  # eval.size: also in _POSITIVE
    non_negative = {"data.num_workers": cfg.data.num_workers, "data.worker_timeout": cfg.data.worker_timeout,
                    "schedule.steps": cfg.schedule.steps,
                    "schedule.warmup_steps": cfg.schedule.warmup_steps, "eval.every": cfg.eval.every,
                    "checkpoint.every": cfg.checkpoint.every, "optim.lr": cfg.optim.lr,
                    "schedule.min_lr": cfg.schedule.min_lr, "optim.weight_decay": cfg.optim.weight_decay,
                    "optim.grad_clip": cfg.optim.grad_clip, "logging.peak_tflops": cfg.logging.peak_tflops}
    errs += [f"{k}={v}: must be >= 0" for k, v in non_negative.items() if v < 0]
    if cfg.schedule.min_lr > cfg.optim.lr:
        errs.append(f"schedule.min_lr={cfg.schedule.min_lr} is above optim.lr={cfg.optim.lr}")
    if all(math.isfinite(b) for b in cfg.optim.betas) and not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        errs.append(f"optim.betas={cfg.optim.betas}: each must be in [0, 1)")
    if cfg.stage == 1 and cfg.data.batch_size == 1:
        errs.append(f"data.batch_size={cfg.data.batch_size}: stage 1 needs >= 2 (ITM draws a negative from the "
                    "batch)")
    sp = cfg.speed
    if cfg.dist.frozen not in ("replicate", "fsdp"):
        errs.append(f"dist.frozen={cfg.dist.frozen!r}: must be replicate (every rank holds the frozen towers) or "
                    "fsdp (FSDP2-sharded over the ranks)")
    if sp.cuda_graphs and cfg.device == "cpu":
        errs.append("speed.cuda_graphs=true needs a CUDA GPU (device=cpu): CUDA graphs replay captured GPU "
                    "kernels; drop --cuda_graphs on a CPU (--compile works there)")
    if sp.cuda_graphs and sp.compile:
        errs.append("speed.cuda_graphs and speed.compile together: choose one (capturing a compiled step is not "
                    "supported here)")
    if cfg.dist.frozen == "fsdp" and sp.cuda_graphs:
        errs.append("dist.frozen=fsdp with speed.cuda_graphs: FSDP2's all-gathers cannot be captured here; use "
                    "dist.frozen=replicate (or --fp8 to shrink the towers) with CUDA graphs")
    if cfg.dist.frozen == "fsdp" and sp.fp8:
        errs.append("dist.frozen=fsdp with speed.fp8: the float8 towers are buffers, which FSDP2 does not shard; "
                    "choose one (fp8 already halves a bf16 tower)")
    if sp.graph_warmup < 1:
        errs.append(f"speed.graph_warmup={sp.graph_warmup}: must be >= 1 (the capture needs warmed-up state)")
    if cfg.checkpoint.export_only and not cfg.checkpoint.resume:
        errs.append("checkpoint.export_only needs checkpoint.resume (latest or a checkpoint folder) to export from")
    return errs


# ------------------------------------------------------------------------------------------------ presets
# The demo's changes to `blip2_tiny()`, each measured on the 2-core CPU (batch 64, 256 held-out pairs, R@1 i2t/t2i):
# - vocabulary cut to 1088 ids (BERT's special ids kept, words at 1000.., [DEC] = 1087): the 30523-way LM head and
#   its tied embedding were ~3/4 of a CPU step (0.76 -> 0.20 CPU s/step);
# - frozen random ViT width 48 -> 96: R@1 0.16/0.14 -> 0.29/0.27 (600 steps, lr 2e-3; width 192: 0.29/0.25);
# - Q-Former dropout 0.1 -> 0: R@1 0.04/0.04 -> 0.15/0.15 (600 steps, lr 1e-3, width 48), and ~25% less CPU time.
DEMO_VOCAB = 1088
DEMO_VIT_WIDTH = 96
DEMO_DROPOUT = 0.0


def demo_model() -> Blip2Config:
    """`blip2_tiny()` with the three demo changes above; still every BLIP-2 piece and all three losses. The frozen
    ViT is stored in bfloat16 on a GPU (float32 on the CPU, see TrainConfig.cpu_fp32)."""
    cfg = blip2_tiny(dtype="bfloat16")
    vision = dataclasses.replace(cfg.vision, width=DEMO_VIT_WIDTH, mlp_hidden=4 * DEMO_VIT_WIDTH)
    qformer = dataclasses.replace(cfg.qformer, vocab_size=DEMO_VOCAB, dec_token_id=DEMO_VOCAB - 1,
                                  hidden_dropout=DEMO_DROPOUT, attention_dropout=DEMO_DROPOUT)
    return cfg.replace(vision=vision, qformer=qformer)


def demo() -> TrainConfig:
    """The default: a stage-1 run of a tiny BLIP-2 on procedural shapes written once as webdataset shards, ending
    with held-out retrieval R@1 against chance; under 2 minutes of training on 2 idle CPU cores (600 steps: the
    width-96 measurement above reached R@1 0.29 / 0.27 in 600 steps, 70x chance; 1000 steps gave 0.375 / 0.359 for
    ~70% more time). No augmentation: a flip would swap "left" and "right" in the captions and a crop can cut an
    object out of a 32-pixel image."""
    return TrainConfig(
        preset="demo",
        model=demo_model(),
        weights=WeightsConfig(vision="random"),
        data=DataConfig(tokenizer="demo", batch_size=64, num_workers=2, augment=False, shuffle_buffer=1024),
        eval=EvalConfig(size=256),
        optim=OptimConfig(lr=2e-3),
        schedule=ScheduleConfig(steps=600, warmup_steps=30, min_lr=2e-4),
        checkpoint=CheckpointConfig(every=200, keep=2),
        logging=LoggingConfig(every=50),
    )


def demo_small() -> TrainConfig:
    """The demo at smoke-test size (seconds on a CPU): 40 steps of batch 16, 64 held-out pairs. (Called "tiny"
    before; renamed because `blip2_tiny()` and eval's --config=tiny are a different, smaller model.)"""
    d = demo()
    return d.replace(preset="demo_small", data=dataclasses.replace(d.data, batch_size=16, demo_samples=2048),
                     eval=EvalConfig(size=64), schedule=ScheduleConfig(steps=40, warmup_steps=4, min_lr=2e-4),
                     checkpoint=CheckpointConfig(every=20, keep=2), logging=LoggingConfig(every=10))


def tiny() -> TrainConfig:
    """Deprecated name of `demo_small` (kept for old imports)."""
    import warnings

    warnings.warn("blip2fast.training.config.tiny() is now demo_small()", DeprecationWarning, stacklevel=2)
    return demo_small()


def _paper_stage1(model: Blip2Config, name: str, batch_per_rank: int) -> TrainConfig:
    return TrainConfig(
        preset=name,
        model=model,
        data=DataConfig(batch_size=batch_per_rank, num_workers=8, prefetch_factor=4),
        optim=OptimConfig(lr=1e-4),
        schedule=ScheduleConfig(steps=250_000, warmup_steps=2000, min_lr=1e-5),
        checkpoint=CheckpointConfig(every=2000, keep=3),
        logging=LoggingConfig(every=50),
    )


def stage1_vit_g() -> TrainConfig:
    """Paper stage 1, EVA ViT-g/14: 250k steps, global batch 1680 (105 per rank on 16 GPUs). Needs
    --weights.vision (EVA-CLIP ViT-g state dict), --weights.bert (bert-base-uncased folder) and --data.urls."""
    return _paper_stage1(blip2_stage1_vit_g(), "stage1_vit_g", 105)


def stage1_vit_l() -> TrainConfig:
    """Paper stage 1, CLIP ViT-L/14: 250k steps, global batch 2320 (145 per rank on 16 GPUs)."""
    return _paper_stage1(blip2_stage1_vit_l(), "stage1_vit_l", 145)


def _paper_stage2(name: str, llm_dtype: str, batch_per_rank: int) -> TrainConfig:
    # llm.path="" passes Blip2Config's validation and is filled from --weights.llm when the model is built
    # stage 1's recipe (data, optimiser, checkpoints, logging) with the LLM, 80k steps and the paper's floor 5e-5
    model = blip2_stage1_vit_g().replace(llm=LLMConfig(path="", dtype=llm_dtype, max_text_len=32))
    return _paper_stage1(model, name, batch_per_rank).replace(
        stage=2, schedule=ScheduleConfig(steps=80_000, warmup_steps=2000, min_lr=5e-5))


# The OPT presets store the LLM in bfloat16 although OPT ships (and LAVIS runs it) in float16: the step autocasts to
# bfloat16, so an fp16 LLM is recast on every call (autocast caches casts of trainable leaves only) and its fp16
# residual stream plus the bf16 sublayer outputs promote to float32 (cost model, stage 2 ViT-g + OPT-2.7B b128 on an
# H200, triton + CUDA graphs: 454 -> 461 samples/s, 3,527 -> 3,204 launches, 424 -> 408 GB). Every GEMM sees the
# same bf16 weights either way; --model.llm.dtype=float16 restores LAVIS's storage.
def stage2_opt2_7b() -> TrainConfig:
    """Paper stage 2 with OPT-2.7B (stored in bf16, see above): 80k steps, global batch 1920 (120 per rank on 16
    GPUs). Needs --weights.llm (OPT folder with tokenizer), --weights.stage1 (a stage-1 checkpoint),
    --weights.vision."""
    return _paper_stage2("stage2_opt2.7b", "bfloat16", 120)


def stage2_opt6_7b() -> TrainConfig:
    """Paper stage 2 with OPT-6.7B (stored in bf16)."""
    return _paper_stage2("stage2_opt6.7b", "bfloat16", 120)


def stage2_flant5xl() -> TrainConfig:
    """Paper stage 2 with FlanT5-XL (bf16, exact GELU, prefix-LM split): global batch 1520 (95 per rank)."""
    return _paper_stage2("stage2_flant5xl", "bfloat16", 95)


def stage2_flant5xxl() -> TrainConfig:
    """Paper stage 2 with FlanT5-XXL (bf16)."""
    return _paper_stage2("stage2_flant5xxl", "bfloat16", 95)


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "demo": demo,
    "demo_small": demo_small,
    "stage1_vit_g": stage1_vit_g,
    "stage1_vit_l": stage1_vit_l,
    "stage2_opt2.7b": stage2_opt2_7b,
    "stage2_opt6.7b": stage2_opt6_7b,
    "stage2_flant5xl": stage2_flant5xl,
    "stage2_flant5xxl": stage2_flant5xxl,
}


# old preset names -> current ones (a one-line note on stderr when used)
RENAMED_PRESETS = {"tiny": "demo_small"}


def preset(name: str) -> TrainConfig:
    if name in RENAMED_PRESETS:
        print(f"note: --preset={name} is now --preset={RENAMED_PRESETS[name]} (renamed: blip2_tiny() is a different "
              "model); the old name will go away", file=sys.stderr)
        name = RENAMED_PRESETS[name]
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"--preset={name!r} is not a preset{hint}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


# ------------------------------------------------------------------------------------------------ field access
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_config(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp):
    """Optional[X] -> (X, True); X -> (X, False)."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _leaves(cls, prefix: str = "") -> dict:
    """{dotted key: annotation} for every settable field, nested configs flattened (Optional[Config] included)."""
    out = {}
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        inner, _ = _unwrap_optional(tp)
        if _is_config(inner):
            out.update(_leaves(inner, prefix + f.name + "."))
        else:
            out[prefix + f.name] = tp
    return out


def all_keys() -> dict:
    """Every CLI key -> its annotation."""
    return _leaves(TrainConfig)


def _type_name(tp) -> str:
    inner, optional = _unwrap_optional(tp)
    origin = typing.get_origin(inner)
    if origin is tuple:
        name = "tuple of " + ",".join(_type_name(a) for a in typing.get_args(inner) if a is not Ellipsis)
    elif inner is tuple:
        name = "tuple (a,b,...)"
    elif isinstance(inner, type):
        name = inner.__name__
    else:
        name = str(inner)
    return f"{name} or none" if optional else name


def _parse_scalar(text: str, tp, key: str):
    what = f"--{key}={text!r}"
    if tp is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{what}: expected a bool (true/false, yes/no, 1/0)")
    if tp is int:
        try:
            return int(text.strip())
        except ValueError:
            raise ConfigError(f"{what}: expected an int") from None
    if tp is float:
        try:
            return float(text.strip())
        except ValueError:
            raise ConfigError(f"{what}: expected a float") from None
    if tp is str:
        return text
    raise ConfigError(f"--{key} has type {_type_name(tp)}, which cannot be set from the command line")


def parse_value(text: str, tp, key: str):
    """The command-line string `text` as a value of annotation `tp` (errors name `key`)."""
    inner, optional = _unwrap_optional(tp)
    if optional and text.strip().lower() in ("none", "null"):
        return None
    origin = typing.get_origin(inner)
    if origin is tuple or inner is tuple:
        args = [a for a in typing.get_args(inner) if a is not Ellipsis]
        parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
        if args and Ellipsis not in typing.get_args(inner) and len(parts) != len(args):
            raise ConfigError(f"--{key}={text!r}: expected {len(args)} comma-separated values ({_type_name(tp)})")
        if args:
            types = args if Ellipsis not in typing.get_args(inner) else [args[0]] * len(parts)
            return tuple(_parse_scalar(p, t, key) for p, t in zip(parts, types))
        out = []
        for p in parts:  # bare `tuple`: numbers
            try:
                out.append(int(p))
            except ValueError:
                out.append(_parse_scalar(p, float, key))
        return tuple(out)
    if inner is dict or typing.get_origin(inner) is dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--{key}: expected a JSON object ({e})") from None
        if not isinstance(value, dict):
            raise ConfigError(f"--{key}: expected a JSON object, got {type(value).__name__}")
        return value
    return _parse_scalar(text, inner, key)


def get(cfg, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def set_key(cfg, key: str, value, _done: str = ""):
    """A copy of `cfg` with the dotted `key` set to `value` (nested frozen dataclasses are rebuilt)."""
    head, _, rest = key.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    child = getattr(cfg, head)
    where = _done + head
    if child is None:
        raise ConfigError(f"--{where}.{rest}: {where} is not set in this config (none); "
                          + ("model.llm exists in stage-2 presets only (e.g. --preset=stage2_opt2.7b)"
                             if where == "model.llm" else "set it in a preset first"))
    return dataclasses.replace(cfg, **{head: set_key(child, rest, value, where + ".")})


def resolve_key(key: str, keys: dict) -> str:
    """A CLI key -> the dotted field key; a bare name that exists in one section only is accepted."""
    if key in keys:
        return key
    if "." not in key:
        matches = [k for k in keys if k.rsplit(".", 1)[-1] == key]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ConfigError(f"--{key} is ambiguous: it could be any of {', '.join('--' + m for m in matches)}; "
                              "write the full key")
    section, _, name = key.rpartition(".")
    if section and any(k.startswith(section + ".") for k in keys):
        accepted = sorted(k[len(section) + 1:] for k in keys if k.startswith(section + ".") and
                          "." not in k[len(section) + 1:])
        close = difflib.get_close_matches(name, accepted, n=1)
        hint = f" (did you mean --{section}.{close[0]}?)" if close else ""
        raise ConfigError(f"unknown option --{key}{hint}: {section} has {', '.join(accepted)}")
    top = sorted({k.split(".")[0] for k in keys})
    close = difflib.get_close_matches(key, list(keys) + top, n=1)
    hint = f" (did you mean --{close[0]}?)" if close else ""
    raise ConfigError(f"unknown option --{key}{hint}: accepted keys are the top-level fields and sections "
                      f"{', '.join(top)} (--section.field=value; --help lists them all)")


def override(cfg: TrainConfig, key: str, text: str) -> TrainConfig:
    """`cfg` with `--key=text` applied (type-checked; the config's own validation runs too)."""
    keys = all_keys()
    full = resolve_key(key, keys)
    if full == "preset":
        raise ConfigError("--preset selects the starting config; it cannot be combined with itself")
    return apply_overrides(cfg, {full: parse_value(text, keys[full], full)})


def apply_overrides(cfg: TrainConfig, values: dict) -> TrainConfig:
    """`cfg` with every {dotted key: parsed value} set at once, then validated once: checks that involve several
    fields (vision.kind=hf needs a folder, min_lr <= lr, ...) see the final values, so flag order never matters.
    `weights.vision` is the folder of a transformers tower (model.vision.kind=hf) and fills model.vision.hf_path."""
    d = cfg.to_dict()
    for key, value in values.items():
        node, parts = d, key.split(".")
        for i, part in enumerate(parts[:-1]):
            if node[part] is None:
                where = ".".join(parts[:i + 1])
                raise ConfigError(f"--{key}: {where} is not set in this config (none); "
                                  + ("model.llm exists in stage-2 presets only (e.g. --preset=stage2_opt2.7b)"
                                     if where == "model.llm" else "set it in a preset first"))
            node = node[part]
        node[parts[-1]] = value
    vision, weights = d["model"]["vision"], d["weights"]
    if vision["kind"] == "hf" and not vision["hf_path"]:
        if not weights["vision"] or weights["vision"] == "random":
            raise ConfigError("--model.vision.kind=hf needs the tower's transformers folder: add "
                              "--weights.vision=<folder>")
        vision["hf_path"] = weights["vision"]
    return _checked_config(d)


def _checked_config(d: dict) -> TrainConfig:
    """TrainConfig from its dict; every problem in one line, each naming its flag."""
    unchecked = _unchecked(TrainConfig, d)  # the values as given, so that every problem is listed at once
    errors = ["--model." + e for e in validate_model(unchecked.model)] + ["--" + e for e in validate(unchecked)]
    if errors:
        raise ConfigError("; ".join(dict.fromkeys(errors)))  # (a few checks exist in both lists)
    return _from_dict(TrainConfig, d, "")


def _unchecked(cls, d: dict):
    """An instance of the config dataclass `cls` from its dict, built without running any __post_init__."""
    obj = object.__new__(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        value = d[f.name]
        inner, _ = _unwrap_optional(hints[f.name])
        if value is not None and _is_config(inner):
            value = _unchecked(inner, value)
        elif value is not None and (typing.get_origin(inner) is tuple or inner is tuple):
            value = tuple(value)
        object.__setattr__(obj, f.name, value)
    return obj


BRACE_HINT = ("bash expands an unquoted brace pattern into one flag per shard: quote it, "
              "--data.urls='/data/{000000..000099}.tar'")


def _duplicate_error(key: str, texts: list) -> ConfigError:
    given = f"--{key} given {len(texts)} times ({', '.join(repr(t) for t in texts)})"
    if key.endswith("urls"):
        return ConfigError(f"{given}: {BRACE_HINT} (several patterns: one flag, joined by '::')")
    return ConfigError(f"{given}: give it once")


def split_args(argv: Sequence[str]) -> list[tuple[str, str]]:
    """["--a=1", "--b", "2", "--flag"] -> [("a", "1"), ("b", "2"), ("flag", "true")]."""
    out, i = [], 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            hint = f"; {BRACE_HINT}" if out and out[-1][0].endswith("urls") else ""  # `--data.urls /d/{0..3}.tar`
            raise ConfigError(f"unexpected argument {arg!r}: options are --key=value (see --help){hint}")
        body = arg[2:]
        if "=" in body:
            k, v = body.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            k, v = body, argv[i + 1]
            i += 1
        else:
            k, v = body, "true"  # a bare flag: a bool set to true (a non-bool then fails its type check)
        out.append((k.replace("-", "_") if k != "help" else k, v))
        i += 1
    return out


def parse_cli(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """The TrainConfig of a command line: the preset (default "demo") with every override applied at once. A key
    given twice is an error (bash expands an unquoted brace pattern into one flag per item: the last would win)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        name = next((v for k, v in _safe_split(argv) if k == "preset"), "demo")
        print(help_text(preset(name)))
        raise SystemExit(0)
    pairs = split_args(argv)
    names = [v for k, v in pairs if k == "preset"]
    if len(names) > 1:
        raise ConfigError(f"--preset given {len(names)} times ({', '.join(names)}); give one")
    cfg = preset(names[0] if names else "demo")
    keys = all_keys()
    given: dict[str, list[str]] = {}
    for k, v in pairs:
        if k != "preset":
            given.setdefault(resolve_key(k, keys), []).append(v)
    for key, texts in given.items():
        if len(texts) > 1:
            raise _duplicate_error(key, texts)
    return apply_overrides(cfg, {key: parse_value(texts[0], keys[key], key) for key, texts in given.items()})


def _safe_split(argv):
    try:
        return split_args([a for a in argv if a not in ("-h", "--help")])
    except ConfigError:
        return []


# ------------------------------------------------------------------------------------------------ help / dicts
def _comments(cls) -> dict:
    """Field name -> its trailing `# comment` in the class source (the help text)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out = {}
    for line in src.splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


USAGE = """usage: python -m blip2fast.train [--preset=NAME] [--section.key=value ...]

common commands:
  python -m blip2fast.train                       # the demo: a tiny BLIP-2 on generated shapes, ~2 min on a CPU
  python -m blip2fast.train --preset=stage1_vit_g --data.urls='/data/laion/{00000..09999}.tar' \\
      --weights.vision=/models/eva_vit_g.pth --weights.bert=/models/bert-base-uncased   # the paper's stage 1
  python -m blip2fast.train --resume=latest       # continue the newest run after a crash or Ctrl-C

flags: --key=value or --key value; --section.key=value for nested fields (--model.qformer.hidden_dropout=0);
a field name found in one section only works alone (--lr, --steps, --resume); bools also as bare --flag;
"none" for an optional value; tuples as a,b; quote brace patterns ('{0..9}') so bash leaves them alone.
Each key once; flags are checked together after all are read, so their order never matters."""


def help_text(cfg: TrainConfig) -> str:
    lines = [USAGE, "", "presets (--preset=NAME): " + ", ".join(PRESETS), "",
             f"fields (values of preset {cfg.preset!r}):"]

    def walk(obj, cls, prefix):
        comments = _comments(cls)
        for f in dataclasses.fields(cls):
            tp = _hints(cls)[f.name]
            inner, _ = _unwrap_optional(tp)
            value = getattr(obj, f.name) if obj is not None else None
            if _is_config(inner):
                if value is None:
                    lines.append(f"  --{prefix}{f.name}.*  (not set in this preset)")
                else:
                    walk(value, inner, prefix + f.name + ".")
                continue
            note = comments.get(f.name, "")
            lines.append(f"  --{prefix}{f.name}={_show(value)}  [{_type_name(tp)}]" + (f"  {note}" if note else ""))

    walk(cfg, TrainConfig, "")
    return "\n".join(lines)


def _show(v) -> str:
    if isinstance(v, tuple):
        return ",".join(str(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v)
    return str(v).lower() if isinstance(v, bool) else str(v)


def _from_dict(cls, d: dict, where: str):
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"config{where}: unknown field(s) {unknown}; accepted: {sorted(names)}")
    kw = {}
    for name, value in d.items():
        inner, _ = _unwrap_optional(hints[name])
        if value is not None and _is_config(inner):
            value = _from_dict(inner, value, f"{where}.{name}")
        elif value is not None and (typing.get_origin(inner) is tuple or inner is tuple):
            value = tuple(value)
        kw[name] = value
    return cls(**kw)


def blip2_from_dict(d: dict) -> Blip2Config:
    return _from_dict(Blip2Config, d, ".model")


__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "DistConfig", "EvalConfig", "LoggingConfig", "OptimConfig",
    "PRESETS", "ScheduleConfig", "SpeedConfig", "TrainConfig", "WeightsConfig", "all_keys", "demo", "demo_model",
    "help_text", "override", "parse_cli", "preset", "stage1_vit_g", "stage1_vit_l", "stage2_flant5xl",
    "stage2_flant5xxl", "stage2_opt2_7b", "stage2_opt6_7b", "demo_small", "apply_overrides",
]
