"""The training step (blip2fast/training/step.py) has no host synchronisation and no data-dependent shape:

- CPU: the whole step (forward, torch.autograd.grad, clipping, AdamW with the device lr, the device step counter)
  compiles with torch.compile(fullgraph=True), which refuses any .item(), host read or data-dependent shape, and
  the compiled step trains like the eager one (losses, negatives, weights over 3 steps);
- CPU: the device lr schedule equals the host one; flags that need a GPU fail with errors naming the flag;
- CUDA (H200, marked): a captured CUDA graph replays the step under torch.cuda.set_sync_debug_mode("error"), equal
  to eager step by step, with fresh negatives every replay; in fp32 and under bf16 autocast with a bf16 tower.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from blip2fast import Blip2
from blip2fast.config import blip2_tiny
from blip2fast.training.config import ConfigError
from blip2fast.training.optim import build_optimizer, lr_at, lr_at_tensor
from blip2fast.training.step import StepModule, TrainStep
from blip2fast.training.trainer import Trainer, optimizer_flags
from tests.helpers import rel_err
from tests.training.conftest import tiny_config

SCHEDULE = (1e-3, 2, 10, 1e-4)  # peak, warmup, total, floor: the lr changes every step


def _model(seed: int = 0, **qformer) -> Blip2:
    cfg = blip2_tiny()
    q = dataclasses.replace(cfg.qformer, hidden_dropout=0.0, attention_dropout=0.1, **qformer)
    torch.manual_seed(seed)
    return Blip2(cfg.replace(qformer=q)).train()


def _batches(n: int, B: int = 5, device="cpu") -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(1000, 3000, (B, 16), generator=g)
        ids[:, 0] = 101
        lengths = torch.randint(4, 17, (B,), generator=g)
        mask = (torch.arange(16)[None] < lengths[:, None]).long()
        out.append({"pixel_values": torch.randn(B, 3, 32, 32, generator=g).to(device),
                    "input_ids": ids.masked_fill(mask == 0, 0).to(device), "attention_mask": mask.to(device)})
    return out


def _stepper(model, mode: str, device, accum: int = 1, **kw) -> TrainStep:
    opt = build_optimizer(model, SCHEDULE[0], **optimizer_flags(None, mode, torch.device(device)))
    return TrainStep(model, StepModule(model, 1), opt, seed=3, accum=accum, grad_clip=1.0, schedule=SCHEDULE,
                     device=torch.device(device), mode=mode, **kw)


def test_device_lr_schedule_equals_the_host_schedule():
    for step in list(range(12)) + [100, 10 ** 6]:
        t = lr_at_tensor(torch.tensor(step), 2e-3, 4, 10, 2e-4)
        assert t.dtype == torch.float32 and t.dim() == 0
        assert abs(t.item() - lr_at(step, 2e-3, 4, 10, 2e-4)) <= 2e-3 * 2 ** -23  # float32 rounding of the peak


def test_whole_step_compiles_in_one_graph_and_trains_like_eager(tmp_path, monkeypatch):
    """fullgraph=True: Dynamo raises on any graph break, so the step has no host sync (.item(), host reads of
    device values) and no data-dependent shape. The aot_eager backend traces forward + backward through AOT
    autograd exactly as inductor would see them, without inductor's C++ code generation (minutes on 2 CPU cores;
    benchmarks/bench_train_modes.py compiles with inductor)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    model = _model()
    twin = copy.deepcopy(model)
    eager = _stepper(model, "eager", "cpu")
    compiled = _stepper(twin, "compile", "cpu", fullgraph=True, backend="aot_eager")
    assert compiled.fullgraph and compiled.optimizer.param_groups[0]["capturable"]
    negatives = []
    for batch in _batches(3):
        a, b = eager([batch]), compiled([batch])
        assert rel_err(b, a) < 1e-5, (a, b)  # losses + grad norm (fp32; fused vs foreach AdamW, fused kernels)
        assert torch.equal(eager.negatives, compiled.negatives)
        negatives.append(compiled.negatives)
    assert not torch.equal(negatives[0], negatives[1])  # the device step counter moved the draws
    assert int(compiled.step_t) == 3 and abs(compiled.lr_t.item() - lr_at(2, *SCHEDULE)) < 1e-9
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.requires_grad:  # floor: the key biases get only rounding noise (softmax ignores them), ~1e-7
            assert (q - p).norm() <= 1e-5 * p.norm() + 1e-6, name


def test_cuda_graphs_and_fp8_need_a_gpu_and_say_so(tmp_path, demo_cache):
    cfg = tiny_config(tmp_path / "a")
    if not torch.cuda.is_available():  # device=auto resolves to the CPU here: the Trainer names the flag
        with pytest.raises(ConfigError, match=r"--cuda_graphs needs a CUDA GPU, but this run is on cpu"):
            Trainer(cfg.replace(device="auto", speed=dataclasses.replace(cfg.speed, cuda_graphs=True)),
                    print_fn=lambda s: None)
    with pytest.raises(ConfigError, match=r"speed\.cuda_graphs=true needs a CUDA GPU \(device=cpu\)"):
        cfg.replace(device="cpu", speed=dataclasses.replace(cfg.speed, cuda_graphs=True))
    with pytest.raises(ConfigError, match="dist.frozen='bogus'"):
        cfg.replace(dist=dataclasses.replace(cfg.dist, frozen="bogus"))
    with pytest.raises(ConfigError, match="choose one"):
        cfg.replace(speed=dataclasses.replace(cfg.speed, cuda_graphs=True, compile=True))
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        _stepper(_model(), "cuda_graphs", "cpu")


def test_fp8_with_a_random_tower_is_refused_with_the_fix(tmp_path, demo_cache):
    from blip2fast.models.fp8 import fp8_unsupported

    if fp8_unsupported(torch.device("cpu")):
        pytest.skip("this torch cannot run float8 matmuls on the CPU")
    cfg = tiny_config(tmp_path / "b")
    with pytest.raises(ConfigError, match=r"--fp8 with a random frozen tower.*--weights\.vision=<state dict>"):
        Trainer(cfg.replace(device="cpu", speed=dataclasses.replace(cfg.speed, fp8=True)), print_fn=lambda s: None)


def test_trainer_compile_flag_trains_like_eager(tmp_path, demo_cache, monkeypatch):
    """--compile through the Trainer (one process: the whole step in one graph, capturable foreach AdamW) gives
    the eager run's losses. Compiled with the aot_eager backend (see the test above for why)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **{**kw, "backend": "aot_eager"}))
    torch._dynamo.reset()
    runs = {}
    for flag in (False, True):
        cfg = tiny_config(tmp_path / f"run{int(flag)}", steps=2, every=2, batch=4)
        cfg = cfg.replace(device="cpu", eval=dataclasses.replace(cfg.eval, urls="", size=8),
                          speed=dataclasses.replace(cfg.speed, compile=flag))
        tr = Trainer(cfg, print_fn=lambda s: None)
        assert tr.mode == ("compile" if flag else "eager") and tr.stepper.fullgraph == flag
        runs[flag] = [r["loss"] for r in tr.fit()["history"]]
    assert len(runs[True]) == 2 and max(abs(a - b) / abs(b) for a, b in zip(runs[True], runs[False])) < 1e-5


def test_trainer_runs_with_fp8_tower_from_a_file(tmp_path, demo_cache):
    """--fp8 end to end (CPU: torch._scaled_mm runs there): the tower from a state-dict file is swapped to float8,
    the step trains (finite losses that differ from step to step) and the export is skipped with the way out."""
    from safetensors.torch import save_file

    from blip2fast.models.fp8 import Fp8Linear, fp8_unsupported
    from blip2fast.training.config import demo_model

    if fp8_unsupported(torch.device("cpu")):
        pytest.skip("this torch cannot run float8 matmuls on the CPU")
    torch.manual_seed(5)
    tower = Blip2(demo_model()).visual_encoder.float()
    path = str(tmp_path / "tower.safetensors")
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, path)
    cfg = tiny_config(tmp_path / "run", steps=3, every=3)
    cfg = cfg.replace(device="cpu", weights=dataclasses.replace(cfg.weights, vision=path),
                      speed=dataclasses.replace(cfg.speed, fp8=True),
                      checkpoint=dataclasses.replace(cfg.checkpoint, export_hf=True))
    lines = []
    tr = Trainer(cfg, print_fn=lines.append)
    assert sum(isinstance(m, Fp8Linear) for m in tr.model.visual_encoder.modules()) == 2 * 4
    out = tr.fit()
    text = "\n".join(lines)
    assert "vision tower: fp8: 8 linear layers in float8 e4m3" in text
    assert "transformers export skipped: the towers are float8" in text
    losses = [r["loss"] for r in out["history"]]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))) and len(set(losses)) == 3


# ------------------------------------------------------------------------------------------------ GPU (H200)
@pytest.mark.cuda
@pytest.mark.parametrize("accum", [1, 2])
def test_cuda_graph_replay_equals_eager_without_syncs(accum):
    """Warm-up steps, one capture, then replays under set_sync_debug_mode("error") (any host sync raises): every
    step's losses, grad norm and negatives equal the eager step's (fp32 model, no autocast: the graph replays the
    same kernels), the negatives differ from replay to replay, and the weights agree at the end."""
    model = _model()
    twin = copy.deepcopy(model)
    model.cuda()
    twin.cuda()
    eager = _stepper(model, "eager", "cuda", accum=accum, amp=False)
    graphed = _stepper(twin, "cuda_graphs", "cuda", accum=accum, amp=False, graph_warmup=2)
    steps = 6
    batches = _batches(steps * accum, device="cuda")
    seen = []
    for s in range(steps):
        micro = batches[s * accum:(s + 1) * accum]
        a = eager(micro)
        if graphed._graph is not None:
            torch.cuda.set_sync_debug_mode("error")
        try:
            b = graphed(micro)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.allclose(b, a, rtol=2e-5, atol=1e-6), (s, a, b)
        assert torch.equal(graphed.negatives, eager.negatives), s
        seen.append(graphed.negatives)
    assert graphed._graph is not None  # steps 3.. were replays
    replays = seen[2:]
    assert all(not torch.equal(x, y) for x, y in zip(replays, replays[1:]))  # fresh draws every replay
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.requires_grad:
            assert (q - p).norm() <= 1e-4 * p.norm() + 1e-6, name
    assert int(graphed.step_t) == steps


@pytest.mark.cuda
def test_cuda_graph_replay_under_bf16_autocast_equals_eager():
    """The step as the paper presets run it: bf16 autocast (amp=True), the frozen tower stored in bf16, attention
    dropout on (the hashed mask: the CUDA kernel of blip2fast::attention_dropout_keep in the torch attention).
    Captured and replayed under set_sync_debug_mode("error"), every step equals the eager autocast step: the
    replay runs the same kernels on the same values (autocast's weight cache only changes when a cast is made,
    not its result), so the bound is bf16 kernel nondeterminism (atomics in index_add), far below a step's change."""
    model = _model()
    model.visual_encoder.to(torch.bfloat16)
    twin = copy.deepcopy(model)
    model.cuda()
    twin.cuda()
    eager = _stepper(model, "eager", "cuda", amp=True)
    graphed = _stepper(twin, "cuda_graphs", "cuda", amp=True, graph_warmup=2)
    assert eager.amp and graphed.amp
    steps = 6
    for s, batch in enumerate(_batches(steps, device="cuda")):
        a = eager([batch])
        if graphed._graph is not None:
            torch.cuda.set_sync_debug_mode("error")
        try:
            b = graphed([batch])
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.isfinite(b).all(), (s, b)
        assert rel_err(b, a) < 2e-3, (s, a, b)
        assert torch.equal(graphed.negatives, eager.negatives), s
    assert graphed._graph is not None and int(graphed.step_t) == steps  # steps 3.. were replays


@pytest.mark.cuda
def test_cuda_graph_shape_change_is_a_clear_error():
    model = _model().cuda()
    graphed = _stepper(model, "cuda_graphs", "cuda", graph_warmup=1)
    for batch in _batches(2, device="cuda"):
        graphed([batch])
    with pytest.raises(ValueError, match="CUDA graphs replay fixed shapes"):
        graphed(_batches(1, B=4, device="cuda"))
