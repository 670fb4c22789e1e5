"""The training loop: `Trainer(cfg).fit()`, stage 1 (ITC + ITM + ITG) and stage 2 (soft prompt -> frozen LLM).

One optimiser step (`train_step`, run by step.TrainStep: eager, --compile, or --cuda_graphs):
    for each of accum_steps micro-batches:
        seed_step <- [seed, global micro-step] on device   ITM draws and attention dropout are a function of it
        forward under bf16 autocast on CUDA (fp32 master weights; frozen towers stored in bf16/fp16, or fp8)
        gradients of loss / accum_steps (DDP syncs on the last micro-batch; compile / graphs: one all-reduce)
    clip the global grad norm, lr from the schedule evaluated on device, AdamW (tensor lr)
    -> a device tensor [loss terms..., grad norm]; the loop adds it to a device-side window and reads it (the only
       host<->device sync) every logging.every steps
No `.item()`, no host-to-device copy and no data-dependent shape inside the step (tests/training/test_step.py
compiles the whole step with fullgraph=True, and on a GPU replays it as a CUDA graph under
torch.cuda.set_sync_debug_mode("error")).

Around it (`fit`): checkpoints every checkpoint.every steps and at the end (checkpoint.py: atomic, last K kept,
everything needed for an exact resume); SIGTERM / SIGINT save a checkpoint at the next step boundary and stop
(a second Ctrl-C kills at once); SIGUSR1 saves a checkpoint and writes the transformers export at the next step
boundary and continues; held-out evaluation before / every eval.every / after (stage 1: retrieval R@k; stage 2:
the LM loss and a few captions beside their references); the model folder <run>/model and a transformers export at
the end.

Exact resume: the checkpoint holds the trainable weights, AdamW state, step, the RNG states of every rank and
each rank's data position (ShardLoader.state_dict()), so a resumed run sees the same batches, the same random
draws and (with `deterministic=True` on a CPU) bit-identical losses step for step.

Distributed: run under torchrun; each rank reads its own shards, rank 0 prints and writes the shared files, every
rank writes its own data position and RNG state into the checkpoint folder (a shared filesystem is assumed). The
trainable step module is wrapped in DistributedDataParallel (eager), or its gradients are averaged by one
all-reduce per step (--compile, --cuda_graphs); the frozen towers are replicated or, with --dist.frozen=fsdp,
FSDP2-sharded (parallel.py).

Failures: bad data that cannot feed the run (no usable shard, a loader worker that failed or died) is a one-line
DataError (data/shards.py checks the first shards before the run folder exists); after any failure the loader's
workers are stopped at once and a fresh run folder without a checkpoint is removed (a folder either holds a
usable state or is not there). Under torchrun one rank's fatal error ends every rank (failure.py).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import threading
import warnings
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import distributed as dist_utils
from ..data.captions import stable_hash
from ..data.shards import DataError
from . import checkpoint as ckpt
from . import failure
from .config import ConfigError, TrainConfig
from .data import demo_cache_root, ensure_demo_shards, heldout_batch, text_encoder, train_loader
from .evaluate import evaluate_retrieval, evaluate_stage2, format_eval, format_retrieval
from .logging import MetricLogger, peak_flops, step_flops_per_sample
from .model import absolute_paths, build_model, resolve_preprocess
from .optim import build_optimizer, lr_at
from .parallel import shard_frozen_towers_, wrap_ddp
from .step import StepModule, TrainStep

LOSS_NAMES = {1: ("loss", "itc", "itm", "itg"), 2: ("loss",)}
RUNS_ROOT = "runs"


# ------------------------------------------------------------------------------------------------ setup helpers
_started_group = False  # True when init_distributed started the process group (so a normal end destroys it)


def init_distributed(cuda_graphs: bool = False) -> tuple[int, int, int]:
    """(rank, world size, local rank); starts the process group under torchrun (WORLD_SIZE > 1)."""
    global _started_group
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_env > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        if cuda_graphs:  # captured NCCL collectives: torch's CUDA-graph notes ask for this before the group starts
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        _started_group = True
    if dist.is_available() and dist.is_initialized():
        failure.start(dist.get_rank(), dist.get_world_size())  # one rank's fatal error ends every rank
        return dist.get_rank(), dist.get_world_size(), local_rank
    return 0, 1, local_rank


def finish_distributed() -> None:
    """After a normal end: the process group this module started ends (distributed.end_process_group); a group the
    caller started stays theirs."""
    global _started_group
    if _started_group and dist.is_initialized():
        dist_utils.end_process_group()
    _started_group = False


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={name} but torch sees no CUDA GPU (torch {torch.__version__}): use --device=cpu "
                          "or --device=auto")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def _broadcast(obj, world_size: int):
    if world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def seed_everything(seed: int, rank: int) -> None:
    """Per-rank Python / NumPy / torch RNGs (torch's drives nn.Dropout): a function of (seed, rank)."""
    s = stable_hash("rng", seed, rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def resolve_run(cfg: TrainConfig, rank: int, log: Callable[[str], None]) -> tuple[str, Optional[str]]:
    """(run folder, checkpoint to resume from or None). Rank 0 decides; see CheckpointConfig.resume."""
    c = cfg.checkpoint
    resume = c.resume.strip()
    if resume and resume != "latest":
        path = os.path.abspath(ckpt.find_checkpoint(resume))
        own_run = os.path.dirname(os.path.dirname(path))
        run_dir = c.dir or own_run
        newest = ckpt.latest_checkpoint(run_dir)
        if newest is not None and os.path.abspath(newest) != path:
            raise ConfigError(f"--resume={resume!r} is not the newest checkpoint of the run folder {run_dir!r} "
                              f"(newest: {newest}); continuing there would mix two histories (and `latest` would "
                              "pick the other one): branch into a new folder with --checkpoint.dir=<new folder>")
        return run_dir, path
    if resume == "latest":
        if c.dir:
            found = ckpt.latest_checkpoint(c.dir)
            where = c.dir
        else:  # the newest run of this preset under runs/
            runs = []
            if os.path.isdir(RUNS_ROOT):
                for name in os.listdir(RUNS_ROOT):
                    if name.startswith(cfg.preset + "-"):
                        latest = ckpt.latest_checkpoint(os.path.join(RUNS_ROOT, name))
                        if latest is not None:
                            runs.append((os.path.getmtime(latest), os.path.join(RUNS_ROOT, name), latest))
            found = max(runs)[2] if runs else None
            where = os.path.join(RUNS_ROOT, cfg.preset + "-*")
        if found is not None:
            return os.path.dirname(os.path.dirname(found)), found
        if rank == 0:
            log(f"--resume=latest: no checkpoint found in {where}; starting a fresh run")
    if c.dir:
        existing = ckpt.latest_checkpoint(c.dir)
        if existing is not None:
            raise ConfigError(f"checkpoint.dir={c.dir!r} already holds checkpoints (latest: {existing}); pass "
                               "--resume=latest to continue that run, or choose another --checkpoint.dir (nothing "
                               "is overwritten)")
        return c.dir, None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = os.path.join(RUNS_ROOT, f"{cfg.preset}-{stamp}")
    n = 1
    while os.path.exists(run_dir):
        n += 1
        run_dir = os.path.join(RUNS_ROOT, f"{cfg.preset}-{stamp}-{n}")
    return run_dir, None


# ------------------------------------------------------------------------------------------------ the trainer
# The held-out shards a run evaluated on (the demo's own, or --eval.urls), read by python -m blip2fast.eval
HELDOUT_FILE = "heldout.json"


class Trainer:
    """Build everything a run needs from a TrainConfig; `fit()` trains and returns a summary dict."""

    def __init__(self, cfg: TrainConfig, print_fn: Callable[[str], None] = print):
        self.t_start = time.perf_counter()
        cfg = absolute_paths(cfg)  # config.json and checkpoints name files the same from any working directory
        self.cfg = cfg
        self.rank, self.world_size, local_rank = init_distributed(cfg.speed.cuda_graphs)
        self._print = print_fn
        if cfg.deterministic:  # before any CUDA work: cuBLAS reads this when it starts
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.device = pick_device(cfg.device, local_rank)
        check_speed_options(cfg, self.device)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=self.device.type == "cuda")
        self.stage = cfg.stage
        self.loss_names = LOSS_NAMES[cfg.stage]

        run = resolve_run(cfg, self.rank, self.log) if self.rank == 0 else None
        self.run_dir, resume_path = _broadcast(run, self.world_size)

        # model (+ fp8 / FSDP2 towers) + optimiser
        self.model, self.extra_prefixes, notes = build_model(cfg, self.device, self.log)
        self.model_config = self.model.config
        cfg, self.preprocess = resolve_preprocess(cfg, self.model_config)  # the tower's pixels, recorded in config
        self.cfg = cfg
        p = self.preprocess
        notes.append(f"pixels: {p.size} px, {p.resize} for evaluation, mean {_rounded(p.mean)}, std "
                     f"{_rounded(p.std)} ({p.source})")
        flops = step_flops_per_sample(self.model, self.model_config, cfg.stage, self._text_len())  # before fp8
        notes += self._transform_towers()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        self.mode = "cuda_graphs" if cfg.speed.cuda_graphs else "compile" if cfg.speed.compile else "eager"
        self.optimizer = build_optimizer(self.model, o.lr, o.weight_decay, o.betas, o.eps,
                                         **optimizer_flags(o.fused, self.mode, self.device))
        self.step_module: nn.Module = StepModule(self.model, cfg.stage)
        self.ddp = None
        if self.world_size > 1 and self.mode == "eager":
            self.ddp = wrap_ddp(self.step_module, self.device)
        if self.mode != "eager":
            what = (f"captured after {cfg.speed.graph_warmup} eager warm-up steps, then replayed"
                    if self.mode == "cuda_graphs" else "torch.compile of the whole step")
            notes.append(f"step: {self.mode} ({what})"
                         + ("; gradients averaged by one all-reduce per step" if self.world_size > 1 else ""))
        self.stepper: Optional[TrainStep] = None  # built once the optimiser state is final (after a resume)

        # data
        image_size = self.model_config.vision.image_size
        train_urls, eval_urls = cfg.data.urls, cfg.eval.urls
        self.demo = None
        if not train_urls:
            if self.rank == 0:
                self.demo = ensure_demo_shards(demo_cache_root(cfg), image_size, cfg.data.demo_samples, self.log)
            _barrier(self.world_size)
            self.demo = _broadcast(self.demo, self.world_size)
            train_urls = self.demo["train"]
            eval_urls = eval_urls or self.demo["eval"]
        enc_dec = cfg.stage == 2 and bool(getattr(self.model.language_model.config, "is_encoder_decoder", False))
        self.text = text_encoder(cfg, self.model_config, enc_dec)
        with warnings.catch_warnings(record=True) as data_notes:  # the shard check's reports: start-up notes
            warnings.simplefilter("always")
            self.loader = train_loader(cfg, train_urls, self.text, image_size, self.rank, self.world_size,
                                       pin_memory=self.device.type == "cuda")
            self.heldout = None
            if eval_urls and (self.rank == 0 or self.sharded):
                self.heldout = heldout_batch(eval_urls, cfg.eval.size, self.text, image_size, data=cfg.data)
        notes += [f"data: {w.message}" for w in data_notes]

        # logging
        peak = peak_flops(self.device, cfg.logging.peak_tflops)
        self._fresh_run_dir = False  # whether a failure before the first checkpoint removes what this run wrote
        if self.rank == 0:
            self._fresh_run_dir = resume_path is None and not (os.path.isdir(self.run_dir) and os.listdir(self.run_dir))
            os.makedirs(self.run_dir, exist_ok=True)
            if failure.current() is not None:
                failure.current().on_exit = self.discard_unusable_run
        self.logger = MetricLogger(self.run_dir, self.rank, cfg.schedule.steps, self.loss_names, flops,
                                   None if peak is None else peak * self.world_size, cfg.logging.jsonl,
                                   cfg.logging.tensorboard, print_fn, every=cfg.logging.every)

        # state
        self.step = 0
        seed_everything(cfg.seed, self.rank)
        self.resumed_from = None
        if resume_path is not None:
            self._load(resume_path)
        self.stepper = TrainStep(self.model, self.ddp or self.step_module, self.optimizer, seed=cfg.seed,
                                 accum=cfg.schedule.accum_steps, grad_clip=o.grad_clip,
                                 schedule=(o.lr, cfg.schedule.warmup_steps, cfg.schedule.steps, cfg.schedule.min_lr),
                                 device=self.device, world_size=self.world_size, amp=cfg.amp, mode=self.mode,
                                 graph_warmup=cfg.speed.graph_warmup)
        self.stepper.set_step(self.step)
        if self.rank == 0:
            ckpt.clean_partial(self.run_dir)
            ckpt.write_json(os.path.join(self.run_dir, "config.json"), cfg.to_dict())
            if eval_urls:  # what `python -m blip2fast.eval --model=<run>` evaluates on when given no --data
                ckpt.write_json(os.path.join(self.run_dir, HELDOUT_FILE), {"urls": eval_urls, "size": cfg.eval.size})
        self.tokenizer_dir = self._save_qformer_tokenizer() if self.rank == 0 else None
        self._describe(notes)
        self._stop: Optional[str] = None
        self._export_requested = False

    # ---------------------------------------------------------------- small helpers
    def log(self, msg: str) -> None:
        if self.rank == 0:  # through the logger once it exists: it clears a live progress bar first
            (self.logger.info if getattr(self, "logger", None) is not None else self._print)(msg)

    def _text_len(self) -> int:
        m = self.model_config
        return m.llm.max_text_len if self.stage == 2 else m.max_text_len

    def autocast(self):
        if self.device.type == "cuda" and self.cfg.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _describe(self, notes: list) -> None:
        cfg, m = self.cfg, self.model_config
        n_train = sum(p.numel() for p in self.params)
        n_all = sum(p.numel() for p in self.model.parameters())
        d = cfg.data
        global_batch = d.batch_size * cfg.schedule.accum_steps * self.world_size
        what = "demo shards " + self.demo["folder"] if self.demo else d.urls
        self.log(f"blip2fast stage-{self.stage} training ({cfg.preset}) on {self.device} x {self.world_size}: "
                 f"{n_train / 1e6:.2f}M trainable of {n_all / 1e6:.2f}M params, vision {self._tower_text()}; "
                 f"{cfg.schedule.steps} steps x batch {global_batch} "
                 f"({d.batch_size} x {cfg.schedule.accum_steps} accum x {self.world_size} ranks), peak lr "
                 f"{cfg.optim.lr:g}")
        self.log(f"  data: {what} ({d.num_workers} workers); run folder: {self.run_dir}")
        for note in notes:
            self.log("  " + note)
        if self.logger.tb_note:
            self.log("  " + self.logger.tb_note)
        if self.resumed_from:
            self.log(f"  resumed from {self.resumed_from} at step {self.step}")

    def _tower_text(self) -> str:
        """The tower as built: a transformers tower's width and blocks come from its own config (the VisionConfig
        sizes describe EVA / CLIP towers only)."""
        v, tower = self.model_config.vision, self.model.visual_encoder
        if v.kind == "hf":
            name = type(getattr(tower, "model", tower)).__name__
            return f"hf {name} {tower.out_width}w x {getattr(tower, 'blocks_run', '?')} blocks, {v.image_size} px"
        return f"{v.kind} {v.width}w x {v.depth}, {v.image_size} px"

    def _save_qformer_tokenizer(self) -> Optional[str]:
        """<run dir>/tokenizer: the Q-Former's tokenizer as a BERT folder (stage 1: the run's own, the demo's words
        included; stage 2: the stage-1 model's, where it has one), so every folder this run writes evaluates
        without a --tokenizer flag."""
        from ..checkpoint.native import TOKENIZER_DIR, find_qformer_tokenizer, has_tokenizer, save_qformer_tokenizer

        folder = os.path.join(self.run_dir, TOKENIZER_DIR)
        if self.stage == 1:
            save_qformer_tokenizer(self.text.tokenizer, folder, self.model_config)
            return folder
        source = find_qformer_tokenizer(self.cfg.weights.stage1)
        if source is None:
            return None
        if os.path.abspath(source) != os.path.abspath(folder):
            import shutil

            shutil.copytree(source, folder, dirs_exist_ok=True)
        return folder if has_tokenizer(folder) else None

    # ---------------------------------------------------------------- checkpoints
    def trainer_state(self) -> dict:
        c = self.cfg
        return {"step": self.step, "schedule": {"peak_lr": c.optim.lr, "warmup_steps": c.schedule.warmup_steps,
                                                "total_steps": c.schedule.steps, "min_lr": c.schedule.min_lr,
                                                "lr": self.lr(max(0, self.step - 1))},
                "samples_seen": self.loader.samples_seen, "skipped": self.loader.skipped,
                "world_size": self.world_size, "config": c.to_dict(), "model_config": self.model_config.to_dict(),
                "time": time.time()}

    def save(self) -> str:
        path = ckpt.save_checkpoint(self.run_dir, self.step, rank=self.rank, world_size=self.world_size,
                                    model=self.model, extra_prefixes=self.extra_prefixes, optimizer=self.optimizer,
                                    trainer_state=self.trainer_state(), data_state=self.loader.state_dict(),
                                    keep=self.cfg.checkpoint.keep, barrier=lambda: _barrier(self.world_size))
        self.logger.event("checkpoint", step=self.step, path=path, skipped=self.loader.skipped)
        self.log(f"  checkpoint: {path}")
        return path

    def _load(self, path: str) -> None:
        state = ckpt.load_checkpoint(path, self.rank, self.world_size)
        ckpt.load_model_tensors(self.model, state["model"], path)
        ckpt.load_optimizer_files(self.optimizer, *state["optimizer"])
        self.loader.load_state_dict(state["data"])
        ckpt.set_rng(*state["rng"])
        self.step = int(state["step"])
        self.resumed_from = path
        saved = state["trainer"].get("config", {})
        now = json.loads(json.dumps(self.cfg.to_dict()))  # tuples as lists, as in the saved JSON
        changed = sorted(k for k in now if k not in ("checkpoint", "logging", "preset", "speed", "dist")
                         and saved.get(k) != now[k])
        if changed:
            self.log(f"  note: the config differs from the checkpoint's in {', '.join(changed)} (resuming anyway)")

    def export(self, hf: bool = True) -> Optional[str]:
        """The run's model folders (rank 0): the native folder <run dir>/model (any towers; what eval --model and
        --weights.stage1 read), and with `hf` the transformers folder <run dir>/hf where its layout can hold the
        model (the end of a run passes checkpoint.export_hf; SIGUSR1 and export_only always ask). Returns the
        transformers folder if written, else the native one."""
        if self.rank != 0:
            return None
        if self.sharded or self.cfg.speed.fp8:
            what = "FSDP-sharded" if self.sharded else "float8"
            self.log(f"  model folder and transformers export skipped: the towers are {what} in this run; export "
                     f"from the checkpoint in one "
                     f"process without --fp8 / --dist.frozen=fsdp: --resume=<checkpoint> --checkpoint.export_only=true")
            return None
        from ..checkpoint.native import RUN_MODEL_DIR, save_native

        native = save_native(self.model, os.path.join(self.run_dir, RUN_MODEL_DIR), tokenizer_folder=self.tokenizer_dir,
                             preprocess=self.preprocess.to_dict(),
                             prompt=self.cfg.data.prompt if self.stage == 2 else None)
        self.logger.event("export", step=self.step, path=native, format="blip2fast")
        task = "retrieval" if self.stage == 1 else "caption"  # what the run's own held-out data can evaluate
        self.log(f"  model folder: {native} (python -m blip2fast.eval {task} --model={self.run_dir} ...)")
        self.model_dir = native
        if not hf:
            return native
        if self.model_config.vision.kind != "eva":
            self.log(f"  transformers export skipped: transformers' BLIP-2 layout holds an EVA tower only (this run's "
                     f"vision.kind={self.model_config.vision.kind!r}); use the model folder above")
            return native
        out = os.path.join(self.run_dir, "hf")
        path, warns = ckpt.export_hf(self.model, out, kind="retrieval" if self.stage == 1 else "generation")
        from ..checkpoint.native import has_tokenizer

        if has_tokenizer(self.tokenizer_dir):  # the Q-Former's tokenizer (eval --model=<run>/hf finds it there)
            import shutil

            shutil.copytree(self.tokenizer_dir, os.path.join(path, "qformer_tokenizer"), dirs_exist_ok=True)
        self.logger.event("export", step=self.step, path=path, notes=warns)
        self.log(f"  transformers export: {path}")
        for note in warns:
            self.log(f"    note: {note}")
        return path

    # ---------------------------------------------------------------- signals
    def _install_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {}

        def stop(signum, frame):
            self._stop = signal.Signals(signum).name
            if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
                signal.signal(signal.SIGINT, signal.default_int_handler)

        def export(signum, frame):
            self._export_requested = True

        for sig, fn in ((signal.SIGTERM, stop), (signal.SIGINT, stop), (getattr(signal, "SIGUSR1", None), export)):
            if sig is not None:
                old[sig] = signal.signal(sig, fn)
        return old

    def _agree(self, flag: bool) -> bool:
        """Whether any rank has the flag (one all-reduce; call at the same steps on every rank)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    # ---------------------------------------------------------------- the step
    def lr(self, step: int) -> float:
        c = self.cfg
        return lr_at(step, c.optim.lr, c.schedule.warmup_steps, c.schedule.steps, c.schedule.min_lr)

    def train_step(self, micro_batches: list) -> Tensor:
        """One optimiser step on `micro_batches` (schedule.accum_steps dicts from the loader); returns the device
        tensor [loss terms (mean over micro-batches)..., grad norm] without reading it (step.TrainStep: the lr,
        the seeds and the step count live on device and advance inside the step)."""
        return self.stepper(micro_batches)

    def _transform_towers(self) -> list:
        """--fp8 (float8 tower linears) or --dist.frozen=fsdp (FSDP2-sharded towers); returns notes."""
        cfg = self.cfg
        self.sharded = False
        if cfg.checkpoint.export_only:  # the export needs the towers as they are stored
            return []
        notes = []
        if cfg.speed.fp8:
            from ..models.fp8 import convert_linears_to_fp8_, require_fp8

            require_fp8(self.device)
            if "visual_encoder" in self.extra_prefixes:
                raise ConfigError("--fp8 with a random frozen tower (--weights.vision=random): checkpoints must carry "
                                  "that tower in its own precision, which the float8 swap discards; give the tower "
                                  "as a file (--weights.vision=<state dict>) or drop --fp8")
            notes += ["vision tower: " + n for n in convert_linears_to_fp8_(self.model.visual_encoder)]
            if cfg.stage == 2:
                llm = self.model.language_model
                # the output head stays: the fused LM loss reads its weight directly
                notes += ["LLM: " + n for n in convert_linears_to_fp8_(llm, skip=(llm.get_output_embeddings(),))]
        if cfg.dist.frozen == "fsdp":
            if self.world_size == 1:
                notes.append("dist.frozen=fsdp with one process: nothing to shard, the towers stay whole")
            else:
                notes += shard_frozen_towers_(self.model, self.device, self.world_size)
                self.sharded = True
        return notes

    def _batches(self):
        """Batches forever; in epoch mode (data.resampled=False) the loader is re-entered for the next epoch and
        the exact skip counts of the finished epochs are logged."""
        while True:
            got = False
            it = iter(self.loader)
            try:
                first = self._first_batch(it)
                for batch in itertools.chain(() if first is None else (first,), it):
                    got = True
                    yield batch
            finally:
                it.close()  # its workers stop now, also when this generator is closed mid-epoch
            self.logger.event("epoch_end", epochs_done=self.loader.epoch, step=self.step,
                              samples=self.loader.samples_seen, skipped=self.loader.skipped,
                              shard_errors=self.loader.shard_errors)
            self.log(f"  data: epoch {self.loader.epoch} done at step {self.step}: {self.loader.samples_seen} "
                     f"samples, skipped {_nonzero(self.loader.skipped)}, shard errors "
                     f"{_nonzero(self.loader.shard_errors)}")
            if not got:
                raise DataError(f"rank {self.rank}: the data loader yielded no batch in a whole epoch (skipped "
                                f"{_nonzero(self.loader.skipped)}, shard errors {_nonzero(self.loader.shard_errors)}): "
                                "are this rank's shards all bad?")

    def _first_batch(self, it):
        """The first batch of a loader iteration, fetched with SIGTERM / SIGINT blocked while the loader forks its
        worker processes. Workers inherit the signal mask, so a signal sent to the whole process group (torchrun
        and SLURM signal process groups, Ctrl-C reaches the terminal's) is seen by this process only: it saves a
        checkpoint at the next step boundary and stops, instead of losing its workers mid-step. The workers are
        stopped by the loader as usual (a sentinel on their queues)."""
        block = {signal.SIGTERM, signal.SIGINT}
        if (self.cfg.data.num_workers == 0 or not hasattr(signal, "pthread_sigmask")
                or threading.current_thread() is not threading.main_thread()):
            return next(it, None)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, block)
        try:
            return next(it, None)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def evaluate(self, when: str) -> Optional[dict]:
        """Held-out retrieval on rank 0 (with FSDP-sharded towers every rank runs it in lockstep, since each tower
        forward all-gathers; rank 0 logs)."""
        if self.heldout is None or (self.rank != 0 and not self.sharded):
            return None
        if self.stage == 2:  # held-out LM loss and a few captions beside their references
            m = evaluate_stage2(self.model, self.heldout, self.device, self.text.tokenizer, prompt=self.cfg.data.prompt,
                                chunk=self.cfg.data.batch_size, autocast=self.autocast())
            self.logger.event("eval", step=self.step, when=when, **m)
            return m
        m = evaluate_retrieval(self.model, self.heldout, self.device, autocast=self.autocast())
        if self.cfg.eval.rerank_k > 0:  # the paper's protocol, on this rank's copy: no ITC / ITM collectives
            from ..eval.retrieval import evaluate_retrieval as paper_protocol

            paper = paper_protocol(self.model, [self.heldout], k=self.cfg.eval.rerank_k, distributed=False)
            m.update({f"rerank_{k}": v for k, v in paper.items() if isinstance(v, (int, float))})
        self.logger.event("eval", step=self.step, when=when, **m)
        return m

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict:
        cfg = self.cfg
        total, accum, every = cfg.schedule.steps, cfg.schedule.accum_steps, cfg.logging.every
        if cfg.checkpoint.export_only:
            path = self.export()
            return {"step": self.step, "export": path, "model": getattr(self, "model_dir", None),
                    "run_dir": self.run_dir}
        self.logger.event("resume" if self.resumed_from else "start", step=self.step, path=self.resumed_from,
                          world_size=self.world_size, preset=cfg.preset)
        before = self.evaluate("before") if self.step == 0 else None
        if before is not None:
            self.log(f"  before training: {format_eval(before)}")
        old_handlers = self._install_signals()
        history: list[dict] = []
        batches = self._batches()
        window = None
        n_window, t_window = 0, time.perf_counter()
        start_step = self.step
        last_saved = self.step if self.resumed_from else -1
        try:
            while self.step < total:
                micro = [next(batches) for _ in range(accum)]
                terms = self.train_step(micro)
                self.step += 1
                self.logger.tick(self.step, accum * cfg.data.batch_size * self.world_size)  # host-side: no sync
                window = terms if window is None else window + terms
                n_window += 1
                # stop / export requests: acted on at once in one process; with several ranks, at the next log
                # step, where the ranks agree (a lone rank saving would hang the others)
                single = self.world_size == 1
                stop = single and self._stop is not None
                export_now = single and self._export_requested
                if n_window == every or self.step == total or stop:
                    values = (window / n_window).tolist()  # the sync: once per window
                    elapsed = time.perf_counter() - t_window
                    samples = n_window * accum * cfg.data.batch_size * self.world_size
                    means = dict(zip(self.loss_names, values[:-1]))
                    rec = self.logger.window(self.step, means, self.lr(self.step - 1), values[-1], n_window, samples,
                                             elapsed)
                    history.append(rec)
                    bad = [k for k, v in means.items() if not np.isfinite(v)]
                    if bad:
                        raise FloatingPointError(
                            f"non-finite {', '.join(bad)} in steps {self.step - n_window + 1}..{self.step} "
                            f"({means}); the last checkpoint is intact: resume from it with a lower --lr or "
                            "check the data")
                    window, n_window, t_window = None, 0, time.perf_counter()
                    stop = self._agree(self._stop is not None)
                    export_now = self._agree(self._export_requested)
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < total:
                    m = self.evaluate("during")
                    if m is not None:
                        self.log(f"  step {self.step}: {format_eval(m)}")
                periodic = cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0
                if periodic or self.step == total or stop or export_now:
                    self.save()
                    last_saved = self.step
                if export_now:
                    self.export()
                    self._export_requested = False
                if stop:
                    self.log(f"stopping on {self._stop} at step {self.step}: checkpoint saved; continue with "
                             f"--checkpoint.dir={self.run_dir} --resume=latest")
                    break
        except BaseException as e:
            batches.close()  # stops the loader's workers now, not at the process's exit
            self.discard_unusable_run()
            if isinstance(e, RuntimeError) and "DataLoader worker" in str(e):  # torch's SIGCHLD handler: anywhere
                raise self.loader.worker_died(e) from None
            raise
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
        if self.step == total and last_saved != self.step:
            self.save()
        result = {"history": history, "step": self.step, "run_dir": self.run_dir, "stopped": self._stop,
                  "skipped": self.loader.skipped, "shard_errors": self.loader.shard_errors,
                  "samples_seen": self.loader.samples_seen, "start_step": start_step}
        if history:
            result["first"], result["last"] = history[0], history[-1]
        self.log(f"  data: {self.loader.samples_seen} samples read by rank 0, skipped {_nonzero(self.loader.skipped)}"
                 f", shard errors {_nonzero(self.loader.shard_errors)}")
        if self._stop is None:
            after = self.evaluate("after")
            exported = self.export(hf=cfg.checkpoint.export_hf)
            self.logger.write_curves()
            if cfg.checkpoint.export_hf and exported is not None and exported != getattr(self, "model_dir", None):
                result["export"] = exported
            if getattr(self, "model_dir", None):
                result["model"] = self.model_dir
            if after is not None and self.stage == 2:
                result.update(after)
                result["before"] = before
                self.log(format_eval(after) + ("" if before is None else
                                               f"\n  before training: held-out LM loss {before['loss']:.4f}"))
            elif after is not None:
                result.update(after)
                result["before"] = before
                self.log(format_retrieval(after))
                extra = f"  R@5: i2t {after['i2t_r5']:.2f}, t2i {after['t2i_r5']:.2f}; "
                if before is not None:
                    extra += f"before training R@1: i2t {before['i2t_r1']:.3f}, t2i {before['t2i_r1']:.3f}; "
                if "rerank_i2t_r1" in after:
                    extra += (f"ITM rerank of the top {cfg.eval.rerank_k} R@1: i2t {after['rerank_i2t_r1']:.3f}, "
                              f"t2i {after['rerank_t2i_r1']:.3f}; ")
                result["wall_s"] = time.perf_counter() - self.t_start
                self.log(extra + f"wall {result['wall_s']:.0f} s")
        result["wall_s"] = time.perf_counter() - self.t_start
        self.logger.event("end", **{k: v for k, v in result.items() if k not in ("history", "first", "last")})
        self.logger.close()
        failure.stop()
        return result

    def discard_unusable_run(self) -> None:
        """After a failure: a run folder this run created that holds no checkpoint is not a usable state, so it
        goes (rank 0); a folder with a checkpoint stays as it is (resume from it)."""
        if self.rank != 0 or not getattr(self, "_fresh_run_dir", False):
            return
        if ckpt.latest_checkpoint(self.run_dir) is not None:
            return
        self._fresh_run_dir = False
        try:
            self.logger.close()
        except Exception:
            pass
        shutil.rmtree(self.run_dir, ignore_errors=True)


def check_speed_options(cfg: TrainConfig, device: torch.device) -> None:
    """Flags that need a device this run does not have fail here, naming the flag."""
    if cfg.speed.cuda_graphs and device.type != "cuda":
        raise ConfigError(f"--cuda_graphs needs a CUDA GPU, but this run is on {device} (torch "
                          f"{torch.__version__}, CUDA available: {torch.cuda.is_available()}): CUDA graphs replay "
                          "captured GPU kernels; drop --cuda_graphs (--compile works on a CPU)")
    if cfg.speed.fp8:
        from ..models.fp8 import fp8_unsupported

        reasons = fp8_unsupported(device)
        if reasons:
            raise ConfigError(f"--fp8 cannot run on {device}: " + "; ".join(reasons))


def optimizer_flags(fused: Optional[bool], mode: str, device: torch.device) -> dict:
    """AdamW's kernel choice per step mode. The step always passes a tensor lr. Eager: fused where torch has it.
    CUDA graphs: fused + capturable (step counts on device). Compile: capturable foreach, which inductor fuses
    itself (torch marks its fused AdamW `torch.compiler.disable`: a graph break)."""
    if mode == "eager":
        return {"fused": fused}
    if mode == "cuda_graphs":
        return {"fused": fused, "capturable": True}
    return {"fused": False, "capturable": True}


def _rounded(values) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


def _nonzero(counts: dict) -> dict:
    return {k: v for k, v in counts.items() if v} or "none"


def run(cfg: TrainConfig, print_fn: Callable[[str], None] = print) -> dict:
    """Build a Trainer from `cfg` and fit it. Under torchrun a fatal error on this rank is announced to the others
    (failure.py), and an error caused by another rank's failure ends this one with that rank's reason."""
    try:
        result = Trainer(cfg, print_fn=print_fn).fit()
    except Exception as e:
        watch = failure.current()
        if watch is not None:
            other = None
            for _ in range(int(2 / failure.POLL_S)):  # a collective can fail a moment before the reason is posted
                other = watch.other_failure()
                if other is not None or isinstance(e, (ConfigError, DataError, FileNotFoundError)):
                    break
                time.sleep(failure.POLL_S)
            if other is not None:
                watch.end(f"rank {watch.rank}: stopping because {other}")
            watch.announce(_one_line(e))
            if threading.current_thread() is threading.main_thread():  # torchrun now stops the other ranks and
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # signals this one too: it ends with its own error
        raise
    finish_distributed()
    return result


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, (ConfigError, DataError, FileNotFoundError)) else f"{type(e).__name__}: {text}"


__all__ = ["LOSS_NAMES", "StepModule", "Trainer", "run", "seed_everything"]
