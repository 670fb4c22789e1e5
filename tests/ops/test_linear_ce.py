"""Fused linear + cross-entropy (blip2fast/ops/linear_ce.py, kernels/linear_ce.py) against the float64 unfused
reference, and wired into the stage-1 ITG loss and the stage-2 LLM loss.

Every op case runs three times: the unfused reference `hidden @ W^T + b -> token_ce_sum_ref` in float64 (the
truth), the same reference in the case's dtype (PyTorch's own error at that precision) and the backend under test;
loss sum, count, d_hidden, d_weight, d_bias. The rule is flash-attention's: the backend's max error relative to
the largest true value is at most twice PyTorch's own, or a small floor per dtype, whichever is larger.

On a CPU the Triton kernels run under the interpreter (conftest.py sets TRITON_INTERPRET=1) in fp32 and fp16;
bf16 is wrong under the interpreter, so bf16 cases are marked `cuda`. Tests assert that the kernels launched
(kernels.linear_ce.LAUNCHES), so a silent fallback cannot pass. Shapes are odd: N = 1, 7, 129 rows, V = 13, 97,
1000 (no tile or chunk divides them), H = 16, 40.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from blip2fast.kernels import linear_ce as K
from blip2fast.ops import dispatch
from blip2fast.ops.linear_ce import linear_cross_entropy, linear_cross_entropy_ref
from blip2fast.ops.losses import lm_loss_sum_ref, mean_over_global_count
from tests.helpers import assert_twice_torch, rel_max_err

# CPU tensors for the interpreted kernels; CUDA tensors when the kernels are compiled and a GPU is there
DEV = "cuda" if (torch.cuda.is_available() and not K.INTERPRETED) else "cpu"
TRITON_RUNS = K.INTERPRETED or DEV == "cuda"
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not TRITON_RUNS, reason="no Triton device"))]
CPU_DTYPES = [torch.float32, torch.float16]

# max error / max |truth|: floor per dtype (the 2x-PyTorch rule applies above it)
FLOOR = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# the interpreter converts 1-element arrays to Python ints (loop bounds loaded from memory), which numpy>=1.25 warns of
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("BLIP2FAST_BACKEND", raising=False)


def make_case(N: int, V: int, H: int, seed: int = 0, ignored: float = 0.25, device: str = DEV):
    """float64 hidden (N, H), weight (V, H), bias (V,), targets (N,) with about `ignored` of them -100 (never all,
    unless ignored=1)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (2.0 / math.sqrt(H))  # logits of std ~2
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    targets = torch.randint(0, V, (N,), generator=g)
    drop = torch.rand(N, generator=g) < ignored
    if ignored < 1.0:
        drop[0] = False
    targets[drop] = -100
    return hidden.to(device), weight.to(device), bias.to(device), targets.to(device)


def run(fn, hidden, weight, bias, targets, dtype, head: str, grad_scale: float = 1.7, **kw):
    """(loss, count, {name: grad}) of fn on inputs cast to dtype; `head`: "bias" (weight and bias trained),
    "nobias" (no bias, weight trained), "frozen" (weight and bias frozen: only hidden gets a gradient)."""
    h = hidden.to(dtype, copy=True).requires_grad_()  # fresh leaves every time
    w = weight.to(dtype, copy=True).requires_grad_(head != "frozen")
    b = None if head == "nobias" else bias.to(dtype, copy=True).requires_grad_(head != "frozen")
    loss, count = fn(h, w, b, targets, **kw)
    (loss * grad_scale).backward()  # a gradient other than 1 reaches the op
    grads = {"hidden": h.grad, "weight": w.grad}
    if b is not None:
        grads["bias"] = b.grad
    if head == "frozen":
        assert w.grad is None and b.grad is None, "a frozen weight or bias got a gradient"
        grads = {"hidden": h.grad}
    return loss.detach(), count, {n: g.double() for n, g in grads.items()}


def assert_close_to_truth(got, low, truth, dtype, what=""):
    """got, low (PyTorch's reference in dtype), truth (float64): (loss, count, grads)."""
    assert got[1].dtype == torch.int64 and got[1].dim() == 0 and got[1].item() == truth[1].item()
    assert got[0].dim() == 0 and got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[2].keys() == truth[2].keys()
    pairs = [("loss", got[0], low[0], truth[0])] + [(n, got[2][n], low[2][n], truth[2][n]) for n in truth[2]]
    for name, g, lo, t in pairs:
        assert_twice_torch(name, g, lo, t, FLOOR.get(dtype, 1e-12), f"{what} ({dtype})", zero=1e-12)


# (N, V, H, chunk rows): chunk None = the default (one chunk at these sizes); else a size dividing nothing
SHAPES = [(1, 13, 16, None), (7, 97, 40, 3), (129, 1000, 16, 50), (129, 97, 40, None)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("N,V,H,chunk", SHAPES)
@pytest.mark.parametrize("head", ["bias", "nobias", "frozen"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_matches_float64_reference(backend, dtype, N, V, H, chunk, head, eps):
    case = make_case(N, V, H, seed=N + V + H)
    truth = run(linear_cross_entropy_ref, *case, torch.float64, head, label_smoothing=eps)
    low = run(linear_cross_entropy_ref, *case, dtype, head, label_smoothing=eps)
    before = dict(K.LAUNCHES)
    got = run(linear_cross_entropy, *case, dtype, head, label_smoothing=eps, chunk_size=chunk, backend=backend)
    if backend == "triton":
        chunks = math.ceil(N / (chunk or N))
        assert K.LAUNCHES["fwd"] - before.get("fwd", 0) == 1, "the Triton forward did not launch"
        assert K.LAUNCHES["bwd"] - before.get("bwd", 0) == chunks, "the Triton backward did not run per chunk"
    assert_close_to_truth(got, low, truth, dtype, f"{backend} {dtype}")


def test_float64_stays_float64_on_the_torch_backend():
    case = make_case(37, 101, 24, seed=3)
    truth = run(linear_cross_entropy_ref, *case, torch.float64, "bias", label_smoothing=0.1)
    got = run(linear_cross_entropy, *case, torch.float64, "bias", label_smoothing=0.1, chunk_size=8, backend="torch")
    assert got[0].dtype == torch.float64
    assert abs(got[0].item() - truth[0].item()) <= 1e-12 * abs(truth[0].item())
    for name in truth[2]:
        assert rel_max_err(got[2][name], truth[2][name], zero=1e-12) < 1e-12, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N", [7, 0])
def test_all_targets_ignored_gives_zero_loss_count_and_gradients(backend, N):
    hidden, weight, bias, targets = make_case(max(N, 1), 97, 16, ignored=1.0)
    hidden, targets = hidden[:N], targets[:N]
    h, w, b = (t.float().requires_grad_() for t in (hidden, weight, bias))
    loss, count = linear_cross_entropy(h, w, b, targets, label_smoothing=0.1, backend=backend)
    assert count.item() == 0 and loss.item() == 0.0
    assert mean_over_global_count(loss, count, None, 1).item() == 0.0  # what the models compute: 0, not 0/0
    loss.backward()
    for t in (h, w, b):
        assert t.grad is not None and t.grad.shape == t.shape
        assert torch.isfinite(t.grad).all() and (t.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_get_exactly_zero_gradient(backend):
    hidden, weight, bias, targets = make_case(29, 97, 16, seed=5, ignored=0.5)
    h, w, b = (t.float().requires_grad_() for t in (hidden, weight, bias))
    linear_cross_entropy(h, w, b, targets, backend=backend)[0].backward()
    ignored = targets == -100
    assert ignored.any() and (h.grad[ignored] == 0).all() and (h.grad[~ignored] != 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_out_of_range_gives_nan_not_a_sync(backend):
    hidden, weight, bias, targets = make_case(7, 13, 16)
    targets[2] = 13  # == V: no such class; raising would need the host to read the targets
    loss, count = linear_cross_entropy(hidden.float(), weight.float(), bias.float(), targets, backend=backend)
    assert torch.isnan(loss) and count.item() == int((targets != -100).sum())


@pytest.mark.skipif(not TRITON_RUNS, reason="no Triton device")
@pytest.mark.parametrize("splits", ["one", "many"])
def test_vocabulary_slices_combine_to_the_same_loss(splits, monkeypatch):
    """The forward's vocabulary slices (S partial statistics per row, combined after the kernel) give the result
    of a single slice."""
    case = make_case(70, 1000, 16, seed=11)
    truth = run(linear_cross_entropy_ref, *case, torch.float64, "bias", label_smoothing=0.1)
    low = run(linear_cross_entropy_ref, *case, torch.float32, "bias", label_smoothing=0.1)
    n_splits = {"one": 1, "many": 16}[splits]
    monkeypatch.setattr(K, "num_splits", lambda n_m, n_v, device: min(n_splits, n_v))
    got = run(linear_cross_entropy, *case, torch.float32, "bias", label_smoothing=0.1, backend="triton")
    assert_close_to_truth(got, low, truth, torch.float32, f"{splits} slices")


# --------------------------------------------------------------------------------------------------------------
# Memory: no (N, V) tensor is ever saved for the backward or created on the way


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_vocabulary_sized_tensor_is_saved_or_created(backend):
    N, V, H, chunk = 257, 1000, 16, 32
    hidden, weight, bias, targets = make_case(N, V, H, seed=2)
    h, w, b = (t.float().requires_grad_() for t in (hidden, weight, bias))
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    before = K.LAUNCHES["bwd"]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), MaxNumel() as mode:
        loss, _ = linear_cross_entropy(h, w, b, targets, label_smoothing=0.1, chunk_size=chunk, backend=backend)
        loss.backward()
    assert saved, "nothing was saved for the backward?"
    assert max(math.prod(s) for s in saved) <= max(N * H, V * H), f"saved for the backward: {saved}"
    assert all(s not in ((N, V), (V, N)) for s in saved)
    if backend == "torch":  # every intermediate of the chunked path (ops inside a custom op are not visible)
        assert mode.max_numel <= chunk * V < N * V, mode.max_numel
    else:
        assert K.LAUNCHES["bwd"] - before == math.ceil(N / chunk)  # the dlogits buffer is (chunk, V)
    with MaxNumel() as unfused:  # the probe sees the unfused path's logits
        linear_cross_entropy_ref(h, w, b, targets, 0.1)[0].backward()
    assert unfused.max_numel >= N * V


# --------------------------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, dispatch, errors


def _op_args(bias: bool):
    hidden, weight, b, targets = make_case(19, 97, 16, seed=7)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    return (h, w, b.float().requires_grad_() if bias else None, targets, 0.1, 8)


@pytest.mark.skipif(not TRITON_RUNS, reason="no Triton device")
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    args = _op_args(bias)
    results = torch.library.opcheck(torch.ops.blip2fast.linear_cross_entropy.default, args)
    assert results and all(v == "SUCCESS" for v in results.values()), results
    h, w, b, targets, eps, chunk = args
    lse = torch.ops.blip2fast.linear_cross_entropy.default(*args)[1].detach()
    grad = torch.tensor(1.3, device=h.device)
    bwd_args = (grad, h.detach(), w.detach(), None if b is None else b.detach(), targets, lse, eps, chunk,
                True, True, bias)
    results = torch.library.opcheck(torch.ops.blip2fast.linear_cross_entropy_backward.default, bwd_args)
    assert results and all(v == "SUCCESS" for v in results.values()), results


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inside inductor
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_fullgraph(backend):
    """torch.compile(fullgraph=True): the Triton op through inductor (fake tensors via register_fake, backward via
    register_autograd); the chunked torch path (a Python loop inside an autograd.Function) through aot_eager, as
    inductor's C++ code generation for its per-chunk ops costs minutes on 2 cores and adds nothing to check."""
    hidden, weight, bias, targets = make_case(40, 97, 16, seed=9)
    h, w, b = (t.float().requires_grad_() for t in (hidden, weight, bias))

    def f(h, w, b):
        loss, count = linear_cross_entropy(torch.tanh(h), w, b, targets, label_smoothing=0.1, chunk_size=16,
                                           backend=backend)
        return loss / count.clamp(min=1)

    torch._dynamo.reset()
    before = dict(K.LAUNCHES)
    compiled = torch.compile(f, fullgraph=True, backend="inductor" if backend == "triton" else "aot_eager")
    loss = compiled(h, w, b)
    grads = torch.autograd.grad(loss, (h, w, b))
    if backend == "triton":
        assert K.LAUNCHES["fwd"] > before.get("fwd", 0) and K.LAUNCHES["bwd"] > before.get("bwd", 0)
    want = f(h, w, b)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-7)
    for g, w_ in zip(grads, torch.autograd.grad(want, (h, w, b))):
        torch.testing.assert_close(g, w_, rtol=1e-5, atol=1e-7)


def test_automatic_is_torch_on_cpu_and_env_forces_triton(monkeypatch):
    hidden, weight, bias, targets = (t.cpu() for t in make_case(9, 97, 16))
    hidden, weight, bias = hidden.float(), weight.float(), bias.float()
    before = dict(K.LAUNCHES)
    want = linear_cross_entropy(hidden, weight, bias, targets)
    assert K.LAUNCHES == before, "automatic choice must not run the interpreter on the CPU"
    if not K.INTERPRETED:
        return
    for setting in ("triton", "linear_cross_entropy=triton,qformer_attention=torch"):
        monkeypatch.setenv("BLIP2FAST_BACKEND", setting)
        got = linear_cross_entropy(hidden, weight, bias, targets)
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    assert K.LAUNCHES["fwd"] == before.get("fwd", 0) + 2
    monkeypatch.setenv("BLIP2FAST_BACKEND", "linear_cross_entropy=cpp")  # asked of this op by name: an error
    with pytest.raises(ValueError, match=r"unknown linear cross-entropy backend 'cpp' \(from BLIP2FAST_BACKEND"):
        linear_cross_entropy(hidden, weight, bias, targets)


def test_forced_triton_raises_with_reasons(monkeypatch):
    hidden, weight, bias, targets = make_case(5, 13, 16)
    with pytest.raises(RuntimeError, match=r"backend 'triton' was requested \(backend argument\).*float64 is not one"):
        linear_cross_entropy(hidden, weight, bias, targets, backend="triton")
    if DEV == "cpu":
        h, w = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
        with pytest.raises(RuntimeError, match="bfloat16 is computed wrongly by the Triton interpreter"):
            linear_cross_entropy(h, w, None, targets, backend="triton")
        monkeypatch.setattr(dispatch, "_triton_status", lambda name: (False, False, "simulated: no triton"))
        monkeypatch.setenv("BLIP2FAST_BACKEND", "triton")
        with pytest.raises(RuntimeError, match=r"\(BLIP2FAST_BACKEND\).*simulated: no triton"):
            linear_cross_entropy(hidden.float(), weight.float(), None, targets)


def test_bad_inputs_name_the_problem():
    hidden, weight, bias, targets = (t.float() if t.is_floating_point() else t for t in make_case(5, 13, 16))
    with pytest.raises(ValueError, match=r"hidden must be \(N, H\) and weight \(V, H\).*reshape\(-1, H\)"):
        linear_cross_entropy(hidden[None], weight, bias, targets)
    with pytest.raises(ValueError, match=r"same H"):
        linear_cross_entropy(hidden, weight[:, :8], bias, targets)
    with pytest.raises(ValueError, match=r"bias must have shape \(13,\)"):
        linear_cross_entropy(hidden, weight, bias[:5], targets)
    with pytest.raises(ValueError, match=r"targets must have shape \(5,\)"):
        linear_cross_entropy(hidden, weight, bias, targets[:4])
    with pytest.raises(ValueError, match="targets must be int64"):
        linear_cross_entropy(hidden, weight, bias, targets.float())
    with pytest.raises(ValueError, match="share one floating dtype"):
        linear_cross_entropy(hidden.half(), weight, bias, targets)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        linear_cross_entropy(hidden, weight, bias, targets, label_smoothing=1.5)
    with pytest.raises(ValueError, match="chunk_size must be a positive number of rows"):
        linear_cross_entropy(hidden, weight, bias, targets, chunk_size=0)


def test_autocast_runs_the_product_in_the_autocast_dtype_as_f_linear():
    hidden, weight, bias, targets = (t.cpu() for t in make_case(31, 97, 16, seed=4))
    hidden, weight, bias = hidden.float(), weight.float(), bias.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, _ = linear_cross_entropy_ref(hidden, weight, bias, targets, 0.1)
        got, _ = linear_cross_entropy(hidden, weight, bias, targets, 0.1, backend="torch")
    exact, _ = linear_cross_entropy_ref(hidden, weight, bias, targets, 0.1)
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    assert abs(got.item() - exact.item()) > 1e-5 * abs(exact.item()), "the product did not run in bfloat16"


def test_aot_cases_cover_every_launch():
    cases = K.launch_cases()
    labels = [c[0] for c in K.aot_cases()]
    assert len(labels) == len(set(labels)) == len(cases)
    for kernel in K.KERNEL_NAMES:
        for dtype in K.DTYPES:
            for has_bias in (True, False):
                for precision in ("highest", "high"):
                    old = torch.get_float32_matmul_precision()
                    torch.set_float32_matmul_precision(precision)
                    try:
                        key = (kernel, dtype, has_bias, K.dot_precision(dtype), K.launch_config(dtype))
                    finally:
                        torch.set_float32_matmul_precision(old)
                    assert key in cases, key
    for _, _, signature, constexprs, _, options in K.aot_cases():
        assert constexprs["BLOCK_K"] >= 16 and constexprs["BLOCK_M"] >= 16 and constexprs["BLOCK_V"] >= 16
        assert set(constexprs) == {k for k, v in signature.items() if v == "constexpr"}
        assert options["num_warps"] in (4, 8)


# --------------------------------------------------------------------------------------------------------------
# In the models: stage-1 ITG and stage-2 with the fused path equal the unfused path


def _param_grads(loss, model):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in params], retain_graph=True, allow_unused=True)
    return {n: g for (n, _), g in zip(params, grads) if g is not None}


def assert_grads_match(ours: dict, ref: dict, tol: float):
    assert ours.keys() == ref.keys() and len(ref) > 5
    scale = max(g.abs().max().item() for g in ref.values())
    for name in ref:  # some gradients are 0 in exact arithmetic (key biases: softmax is shift-invariant): noise
        err = (ours[name] - ref[name]).abs().max().item()
        assert err <= tol * max(ref[name].abs().max().item(), 1e-3 * scale), (name, err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stage1_itg_fused_equals_unfused(backend, monkeypatch):
    from tests.models.test_stage1 import make_batch, make_model

    monkeypatch.setenv("BLIP2FAST_BACKEND", f"linear_cross_entropy={backend}")
    m = make_model(seed=3).eval()  # eval: no dropout, both paths see the same states
    images, ids, mask = make_batch(3, T=12, seed=4, lengths=[12, 5, 1])  # a caption with no ITG target at all
    before = K.LAUNCHES["fwd"]
    out = m.stage1_loss(images, ids, mask, return_details=True)
    assert K.LAUNCHES["fwd"] - before == (1 if backend == "triton" else 0)
    # the unfused path on the same forward graph: LM head logits -> shifted, smoothed CE / token count
    labels = ids.clone()
    labels[:, 0] = m.config.qformer.dec_token_id
    labels = labels.masked_fill(labels == m.config.qformer.pad_token_id, -100)
    assert out.itg_logits.shape == (3, 12, m.config.qformer.vocab_size)
    ref_sum, ref_count = lm_loss_sum_ref(out.itg_logits, labels, m.config.itg_label_smoothing)
    ref = mean_over_global_count(ref_sum, ref_count, None, 1)
    assert abs(out.loss_itg.item() - ref.item()) <= 1e-6 * ref.item()
    assert_grads_match(_param_grads(out.loss_itg, m), _param_grads(ref, m), 1e-5)
    assert m.stage1_loss(images, ids, mask).itg_logits is None  # no logits unless asked for


def _stage2_configs():
    transformers = pytest.importorskip("transformers")
    from tests.models.test_stage2 import V, llm_configs

    small = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    return {
        **llm_configs(),
        "gpt2": transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                        bos_token_id=1, eos_token_id=2).to_dict(),
        "phi": transformers.PhiConfig(**{**small, "num_key_value_heads": 4}).to_dict(),  # an output bias
        "cohere": transformers.CohereConfig(**small, logit_scale=0.37).to_dict(),  # logits * logit_scale
        "granite": transformers.GraniteConfig(**small, logits_scaling=3.0).to_dict(),  # logits / logits_scaling
        "gemma2": transformers.Gemma2Config(**small, head_dim=8, final_logit_softcapping=5.0).to_dict(),
    }


@pytest.mark.parametrize("kind", ["opt", "llama", "t5", "gpt2", "phi", "cohere", "granite", "gemma2"])
def test_stage2_fused_equals_logits_path(kind, monkeypatch):
    from blip2fast import Blip2
    from blip2fast.config import LLMConfig, blip2_tiny
    from blip2fast.models.llm import output_head
    from tests.models.test_stage2 import images, text_batch

    cfg = blip2_tiny().replace(llm=LLMConfig(hf_config=_stage2_configs()[kind], dtype="float32"))
    torch.manual_seed(0)
    m = Blip2(cfg)
    with torch.no_grad():  # random, non-degenerate LLM weights (LayerNorms and biases too)
        for p in m.language_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.eval()
    lm = m.language_model
    head = output_head(lm)
    assert (head is None) == (kind == "gemma2"), "soft-capped logits cannot be fused; every other kind is"
    B = 3
    px = images(B)
    if kind == "t5":
        ids, mask, _ = text_batch(B, 6, bos=5)
        _, _, labels = text_batch(B, 5, seed=7, bos=5)
        labels[:, 0] = 7
    else:
        ids, mask, labels = text_batch(B, 7, bos=lm.config.bos_token_id)
    calls = []
    handle = lm.get_output_embeddings().register_forward_hook(lambda mod, args, out: calls.append(1))
    try:
        fused = m.stage2_loss(px, ids, mask, labels)
        assert (fused.logits is None) == (head is not None)
        assert (len(calls) == 0) == (head is not None), "the fused path must not run the output layer"
        full = m.stage2_loss(px, ids, mask, labels, return_logits=True)
    finally:
        handle.remove()
    assert full.logits is not None and full.logits.shape[-1] == lm.config.vocab_size
    assert torch.equal(fused.num_tokens, full.num_tokens)
    assert abs(fused.loss.item() - full.loss.item()) <= 1e-6 * full.loss.item()
    assert_grads_match(_param_grads(fused.loss, m), _param_grads(full.loss, m), 1e-5)
    assert all(p.grad is None for p in lm.parameters())


@pytest.mark.skipif(not K.INTERPRETED, reason="runs the interpreted kernels on the CPU")
@pytest.mark.parametrize("setting", ["linear_cross_entropy=triton", "triton"])
def test_stage2_with_the_triton_backend(monkeypatch, setting):
    """Stage-2 loss and every trainable gradient with the Triton linear-CE alone, and with every op on Triton
    (Q-Former attention and LayerNorm too), equal the torch backend's unfused logits path."""
    from blip2fast.kernels import layer_norm as LN
    from blip2fast.kernels import qformer_attention as QA
    from tests.models.test_stage2 import images, make_model, text_batch

    m = make_model("opt")
    ids, mask, labels = text_batch(2, 6, bos=m.language_model.config.bos_token_id)
    px = images(2)
    monkeypatch.setenv("BLIP2FAST_BACKEND", "torch")
    want = m.stage2_loss(px, ids, mask, labels, return_logits=True)
    monkeypatch.setenv("BLIP2FAST_BACKEND", setting)
    before, attn_before, ln_before = K.LAUNCHES["fwd"], QA.LAUNCHES["fwd"], LN.LAUNCHES["ln_fwd"]
    got = m.stage2_loss(px, ids, mask, labels)
    assert K.LAUNCHES["fwd"] == before + 1 and got.logits is None
    everything = setting == "triton"
    assert (QA.LAUNCHES["fwd"] > attn_before) == everything and (LN.LAUNCHES["ln_fwd"] > ln_before) == everything
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5 * want.loss.item()
    assert_grads_match(_param_grads(got.loss, m), _param_grads(want.loss, m), 1e-4)


# --------------------------------------------------------------------------------------------------------------
# GPU (compiled kernels): bf16, paper-like widths, CUDA graphs, no host sync, memory


def _cuda_ready():
    if K.INTERPRETED:
        pytest.skip("the kernels were built for the interpreter: run with BLIP2FAST_GPU_TESTS=1")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("N,V,H", [(7, 97, 40), (515, 5003, 768), (300, 50272, 2560)])
@pytest.mark.parametrize("head", ["bias", "frozen"])
def test_cuda_bf16_and_fp16(backend, N, V, H, head):
    _cuda_ready()
    case = make_case(N, V, H, seed=N, device="cuda")
    truth = run(linear_cross_entropy_ref, *case, torch.float64, head, label_smoothing=0.1)
    for dtype in (torch.bfloat16, torch.float16):
        low = run(linear_cross_entropy_ref, *case, dtype, head, label_smoothing=0.1)
        got = run(linear_cross_entropy, *case, dtype, head, label_smoothing=0.1, chunk_size=128, backend=backend)
        assert_close_to_truth(got, low, truth, dtype, f"{backend} {dtype}")


@pytest.mark.cuda
def test_cuda_fp32_tf32_and_ieee():
    _cuda_ready()
    case = make_case(129, 1000, 64, seed=1, device="cuda")
    truth = run(linear_cross_entropy_ref, *case, torch.float64, "bias", label_smoothing=0.1)
    old = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            low = run(linear_cross_entropy_ref, *case, torch.float32, "bias", label_smoothing=0.1)
            got = run(linear_cross_entropy, *case, torch.float32, "bias", label_smoothing=0.1, backend="triton")
            assert_close_to_truth(got, low, truth, torch.float32, precision)
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.cuda
def test_cuda_triton_without_host_sync_and_graph_replays():
    _cuda_ready()
    hidden, weight, bias, targets = make_case(256, 3001, 128, device="cuda")
    h, w, b = (t.bfloat16().requires_grad_() for t in (hidden, weight, bias))

    def step():
        loss, count = linear_cross_entropy(h, w, b, targets, label_smoothing=0.1, backend="triton")
        return loss, count, torch.autograd.grad(loss, (h, w, b))

    before = K.LAUNCHES["fwd"]
    step()  # warm-up (compiles the kernels)
    assert K.LAUNCHES["fwd"] == before + 1, "the Triton kernel ran"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, count, grads = step()
    with torch.no_grad():
        h.mul_(0.5)  # new values in the captured buffers: the replay must read them
    graph.replay()
    torch.cuda.synchronize()
    truth = run(linear_cross_entropy_ref, h.detach().double(), w.detach().double(), b.detach().double(), targets,
                torch.float64, "bias", grad_scale=1.0, label_smoothing=0.1)
    low = run(linear_cross_entropy_ref, h.detach(), w.detach(), b.detach(), targets, torch.bfloat16, "bias",
              grad_scale=1.0, label_smoothing=0.1)
    got = (loss, count, {n: g.double() for n, g in zip(("hidden", "weight", "bias"), grads)})
    assert_close_to_truth(got, low, truth, torch.bfloat16, "graph replay")


@pytest.mark.cuda
def test_cuda_peak_memory_is_far_below_the_logits():
    _cuda_ready()
    N, V, H = 4096, 50272, 1024
    hidden, weight, _, targets = make_case(N, V, H, device="cuda")
    h = hidden.bfloat16().requires_grad_()
    w = weight.bfloat16()  # frozen, as an LLM's output layer
    del hidden, weight
    for backend in ("triton", "torch"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss, _ = linear_cross_entropy(h, w, None, targets, backend=backend)
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        h.grad = None
        assert peak < N * V * 4 / 2, f"{backend}: peak {peak / 2**20:.0f} MB vs fp32 logits {N * V * 4 / 2**20:.0f} MB"


def test_cpu_autocast_casts_mixed_dtypes_before_checking():
    """Under autocast a bf16 hidden with an fp32 weight is what F.linear accepts: the op casts first, then checks."""
    hidden, weight, bias, targets = make_case(7, 13, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, count = linear_cross_entropy(hidden.bfloat16(), weight.float(), bias.float(), targets, backend="torch")
    want, _ = linear_cross_entropy_ref(hidden.bfloat16().double(), weight.bfloat16().double(),
                                       bias.bfloat16().double(), targets)
    assert int(count) == int((targets != -100).sum())
    assert abs(float(loss) - float(want)) <= 1e-2 * abs(float(want))
