"""LayerNorm (+ residual): the Triton kernels (kernels/layer_norm.py) against the float64 reference.

Every case runs three times: the reference in float64 (the truth), the reference in the test dtype (PyTorch's own
error at that precision) and the kernel (backend="triton"); output and every gradient (dx, dweight, dbias,
dresidual). The rule is flash-attention's: the kernel's max error, relative to the largest true value, is at most
twice PyTorch's own error in that dtype, or a small floor per dtype (whichever is larger).

On a CPU the kernels run under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1), in fp32 and fp16;
bf16 is wrong under the interpreter, so bf16 cases are marked `cuda`. Tests assert that the kernels launched
(blip2fast.kernels.layer_norm.LAUNCHES), so a silent fallback to the reference cannot pass.
"""
from __future__ import annotations

import pytest
import torch

from blip2fast.kernels import layer_norm as K
from blip2fast.ops import dispatch
from blip2fast.ops.layer_norm import layer_norm, layer_norm_ref
from tests.helpers import assert_norms_twice_torch, assert_twice_torch, rel_max_err, triton_test_device

DEV = triton_test_device(K.INTERPRETED)

# the interpreter converts 1-element arrays to Python ints (loop bounds computed from program ids), which numpy
# >= 1.25 warns of
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")

# max error / max |truth|: floor per dtype (the 2x-PyTorch rule applies above it)
FLOOR = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
CPU_DTYPES = [torch.float32, torch.float16]
EPS = 1e-12  # the Q-Former's (BERT's) layer_norm_eps


def make_case(shape, residual: bool, seed: int):
    """(x, weight, bias, residual or None, dy) in float64 on DEV. Rows get different offsets and scales (LayerNorm
    inputs are far from zero-mean in a residual stream), weights and biases are random, nothing is zero."""
    g = torch.Generator().manual_seed(seed)
    N = shape[-1]
    offset = torch.randn(*shape[:-1], 1, generator=g, dtype=torch.float64) * 3
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + offset
    r = torch.randn(*shape, generator=g, dtype=torch.float64) if residual else None
    w = 1 + 0.5 * torch.randn(N, generator=g, dtype=torch.float64)
    b = torch.randn(N, generator=g, dtype=torch.float64)
    dy = torch.randn(*shape, generator=g, dtype=torch.float64)
    return tuple(None if t is None else t.to(DEV) for t in (x, w, b, r, dy))


def forward_backward(x, w, b, r, dy, dtype, backend, eps=EPS, dtypes=None):
    """(y, dx, dw, db[, dres]); dtypes optionally gives (x, w/b, residual) dtypes separately."""
    dx_t, dw_t, dr_t = dtypes or (dtype, dtype, dtype)
    leaves = [x.to(dx_t), w.to(dw_t), b.to(dw_t)] + ([] if r is None else [r.to(dr_t)])
    leaves = [t.detach().requires_grad_() for t in leaves]
    y = layer_norm(leaves[0], leaves[1], leaves[2], eps, residual=leaves[3] if r is not None else None,
                   backend=backend)
    grads = torch.autograd.grad(y, leaves, dy.to(y.dtype))
    return (y, *grads)


COMPARED = ("y", "dx", "dweight", "dbias", "dresidual")  # what check_against_reference compares with float64


def compared(residual: bool) -> tuple:
    """The outputs compared for a case: without a residual there is no dresidual."""
    return COMPARED if residual else COMPARED[:-1]


def check_against_reference(x, w, b, r, dy, dtype):
    """Runs the three versions, asserts the rule and that both kernels launched; returns the kernel's errors."""
    truth = forward_backward(x, w, b, r, dy, torch.float64, "torch")
    torch_lp = forward_backward(x, w, b, r, dy, dtype, "torch")
    before = dict(K.LAUNCHES)
    got = forward_backward(x, w, b, r, dy, dtype, "triton")
    assert K.LAUNCHES["ln_fwd"] == before.get("ln_fwd", 0) + 1, "the Triton forward did not launch"
    assert K.LAUNCHES["ln_bwd"] == before.get("ln_bwd", 0) + 1, "the Triton backward did not launch"
    errs = {}
    for name, g, lp, want in zip(COMPARED, got, torch_lp, truth):
        assert g.dtype == dtype and g.shape == want.shape, name
        errs[name] = assert_twice_torch(name, g, lp, want, FLOOR[dtype], f"({dtype})")
    return errs


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("N", [40, 100, 768])
@pytest.mark.parametrize("rows", [1, 7, 129])
def test_matches_reference(rows, N, residual, dtype):
    errs = check_against_reference(*make_case((rows, N), residual, seed=rows * 1000 + N), dtype)
    assert tuple(errs) == compared(residual)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_qformer_shapes_and_eps(residual):
    """(B, L, N) inputs as the Q-Former passes them, BERT's eps 1e-12 and LAVIS's vision eps 1e-6, and
    low-variance rows (where eps matters)."""
    x, w, b, r, dy = make_case((3, 11, 64), residual, seed=5)
    x = x.clone()
    x[1] = x[1] * 1e-4 + 2.0  # variance ~1e-8: still far above eps
    for eps in (1e-12, 1e-6):
        truth = forward_backward(x, w, b, r, dy, torch.float64, "torch", eps=eps)
        got = forward_backward(x, w, b, r, dy, torch.float32, "triton", eps=eps)
        lp = forward_backward(x, w, b, r, dy, torch.float32, "torch", eps=eps)
        for g, l, t in zip(got, lp, truth):
            assert rel_max_err(g, t) <= max(2 * rel_max_err(l, t), FLOOR[torch.float32])


def test_views_are_read_in_place():
    """The residual of the query rows is hidden[:, :Q] (a strided view), the gradient can be a strided view too
    (the backward of torch.cat), and 4-D inputs are accepted: results equal the contiguous run exactly."""
    g = torch.Generator().manual_seed(3)
    B, L, Q, N = 3, 13, 5, 40
    hidden = torch.randn(B, L, N, generator=g).to(DEV)
    x = torch.randn(B, Q, N, generator=g).to(DEV)
    w, b = torch.randn(N, generator=g).to(DEV), torch.randn(N, generator=g).to(DEV)
    dy_full = torch.randn(B, L, N, generator=g).to(DEV)
    res = hidden[:, :Q]
    dy = dy_full[:, 2:2 + Q]
    assert not res.is_contiguous() and not dy.is_contiguous()

    def run(x, res, dy):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        res_leaf = res.detach().requires_grad_()  # keeps the view's strides
        y = layer_norm(leaves[0], leaves[1], leaves[2], 1e-5, residual=res_leaf, backend="triton")
        return (y, *torch.autograd.grad(y, [*leaves, res_leaf], dy))

    strided = run(x, res, dy)
    dense = run(x, res.contiguous(), dy.contiguous())
    for a, c in zip(strided, dense):
        assert torch.equal(a, c)
    want = layer_norm_ref(x.double(), w.double(), b.double(), 1e-5, res.double())
    assert rel_max_err(strided[0], want) < 1e-6
    y4 = layer_norm(x.view(B, 1, Q, N), w, b, 1e-5, residual=res.unsqueeze(1), backend="triton")
    assert torch.equal(y4, strided[0].view(B, 1, Q, N))


def test_mixed_dtypes_follow_type_promotion():
    """fp16 dense output + fp32 residual with fp32 parameters (the autocast training case): y is fp32 (the dtype of
    x + residual), dx fp16, dresidual fp32, dweight fp32; values as the float64 reference allows."""
    x, w, b, r, dy = make_case((7, 100), True, seed=9)
    dtypes = (torch.float16, torch.float32, torch.float32)
    got = forward_backward(x, w, b, r, dy, None, "triton", dtypes=dtypes)
    lp = forward_backward(x, w, b, r, dy, None, "torch", dtypes=dtypes)
    truth = forward_backward(x.half().double(), w, b, r, dy, torch.float64, "torch")  # x as the kernel sees it
    assert [t.dtype for t in got] == [t.dtype for t in lp] == [torch.float32, torch.float16, torch.float32,
                                                               torch.float32, torch.float32]
    for name, g, l, t in zip(("y", "dx", "dw", "db", "dres"), got, lp, truth):
        floor = FLOOR[torch.float16] if name == "dx" else FLOOR[torch.float32]
        assert rel_max_err(g, t) <= max(2 * rel_max_err(l, t), floor), name


def test_autocast_output_dtype_matches_the_module():
    """The op returns the dtype F.layer_norm returns under autocast: float32 on CUDA (its autocast runs layer_norm
    in float32), the input dtype on the CPU (CPU autocast leaves layer_norm alone)."""
    x, w, b, r, _ = make_case((5, 40), True, seed=10)
    x16, r16 = x.half(), r.half()
    with torch.autocast(DEV, dtype=torch.float16 if DEV == "cuda" else torch.bfloat16):
        want = layer_norm_ref(x16, w.float(), b.float(), 1e-5, r16)
        got = layer_norm(x16, w.float(), b.float(), 1e-5, residual=r16, backend="triton")
    assert want.dtype == got.dtype == (torch.float32 if DEV == "cuda" else torch.float16)
    err = rel_max_err(got, layer_norm_ref(x16.double(), w, b, 1e-5, r16.double()))
    assert err < (1e-6 if DEV == "cuda" else FLOOR[torch.float16])


def test_backward_is_deterministic_and_writes_everything():
    """Launcher level, outputs pre-filled with NaN: every element of y, mean, rstd, ds is written; dweight/dbias
    are bitwise identical across runs (fixed per-program row ranges, no atomics)."""
    x, w, b, r, dy = (t.float() for t in make_case((129, 100), True, seed=11))
    y = torch.full_like(x, float("nan"))
    mean = torch.full((129,), float("nan"), device=DEV)
    rstd = torch.full_like(mean, float("nan"))
    K.forward(x, w, b, r, EPS, y, mean, rstd)
    runs = []
    for _ in range(2):
        ds = torch.full_like(x, float("nan"))
        dw, db = K.backward(dy, x, w, r, mean, rstd, ds)
        runs.append((ds, dw, db))
    for name, t in (("y", y), ("mean", mean), ("rstd", rstd), ("ds", runs[0][0])):
        assert torch.isfinite(t).all(), f"{name} has unwritten (NaN) elements"
    for a, c in zip(*runs):
        assert torch.equal(a, c)
    programs, per_program = K._bwd_programs(129, K.launch_config(100)[0], x.device)
    assert programs > 1 and programs * per_program >= 129, "the test must exercise several partial sums"


def test_torch_backend_is_the_module_bit_for_bit():
    """The LAVIS parity tests rely on it: backend="torch" is nn.LayerNorm(x + residual), same bits."""
    x, w, b, r, _ = (t.float() for t in make_case((7, 40), True, seed=12))
    ln = torch.nn.LayerNorm(40, eps=EPS).to(DEV)
    with torch.no_grad():
        ln.weight.copy_(w)
        ln.bias.copy_(b)
    assert torch.equal(layer_norm(x, ln.weight, ln.bias, ln.eps, residual=r, backend="torch"), ln(x + r))
    assert torch.equal(layer_norm(x, ln.weight, ln.bias, ln.eps, backend="torch"), ln(x))


# --------------------------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, dispatch


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_opcheck(residual):
    x, w, b, r, _ = (None if t is None else t.float().requires_grad_() for t in make_case((7, 40), residual, 13))
    results = torch.library.opcheck(torch.ops.blip2fast.layer_norm.default, (x, w, b, r, 1e-5, torch.float32))
    assert results and all(v == "SUCCESS" for v in results.values()), results
    mean = torch.randn(7, device=DEV)
    rstd = torch.rand(7, device=DEV) + 0.5
    args = (torch.randn(7, 40, device=DEV), x.detach(), w.detach(), b.detach(), None if r is None else r.detach(),
            mean, rstd)
    results = torch.library.opcheck(torch.ops.blip2fast.layer_norm_backward.default, args)
    assert results and all(v == "SUCCESS" for v in results.values()), results


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inside inductor
def test_torch_compile_fullgraph():
    """Forward and backward of a residual block compile into one graph (inductor) and match eager."""
    x, w, b, r, _ = (t.float() for t in make_case((7, 100), True, seed=14))

    def f(x, w, b, r):
        h = layer_norm(x * 1.5, w, b, 1e-5, residual=r, backend="triton")
        return layer_norm(h, w, b, 1e-5, backend="triton").square().sum()

    leaves = [t.detach().requires_grad_() for t in (x, w, b, r)]
    torch._dynamo.reset()
    before = dict(K.LAUNCHES)
    loss = torch.compile(f, fullgraph=True)(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    assert K.LAUNCHES["ln_fwd"] - before.get("ln_fwd", 0) == 2
    assert K.LAUNCHES["ln_bwd"] - before.get("ln_bwd", 0) == 2
    want_loss = f(*leaves)
    want = torch.autograd.grad(want_loss, leaves)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    for g, w_ in zip(grads, want):
        torch.testing.assert_close(g, w_, rtol=1e-5, atol=1e-6)


def test_automatic_is_torch_on_cpu_and_env_selects_triton(monkeypatch):
    x, w, b, r, _ = (t.float().cpu() for t in make_case((3, 40), True, seed=15))
    monkeypatch.delenv("BLIP2FAST_BACKEND", raising=False)
    before = K.LAUNCHES["ln_fwd"]
    layer_norm(x, w, b, 1e-5, residual=r)
    assert K.LAUNCHES["ln_fwd"] == before, "automatic choice must not run the interpreter on the CPU"
    if not K.INTERPRETED:
        return
    for env in ("triton", "layer_norm=triton"):
        monkeypatch.setenv("BLIP2FAST_BACKEND", env)
        layer_norm(x, w, b, 1e-5, residual=r)
    assert K.LAUNCHES["ln_fwd"] == before + 2
    monkeypatch.setenv("BLIP2FAST_BACKEND", "layer_norm=cpp")
    with pytest.raises(ValueError, match=r"unknown LayerNorm backend 'cpp' \(from BLIP2FAST_BACKEND"):
        layer_norm(x, w, b, 1e-5, residual=r)


def test_forced_triton_raises_with_reasons(monkeypatch):
    monkeypatch.delenv("BLIP2FAST_BACKEND", raising=False)
    x, w, b, r, _ = make_case((3, 40), True, seed=16)
    with pytest.raises(RuntimeError, match=r"backend 'triton' was requested \(backend argument\).*float64"):
        layer_norm(x, w, b, 1e-5, residual=r, backend="triton")
    x, w, b, r = (t.float() for t in (x, w, b, r))
    with pytest.raises(RuntimeError, match="needs both weight and bias"):
        layer_norm(x, w, None, 1e-5, backend="triton")
    big = torch.randn(2, 8193, device=DEV)
    with pytest.raises(RuntimeError, match="hidden size 8193 > 8192"):
        layer_norm(big, torch.ones(8193, device=DEV), torch.zeros(8193, device=DEV), 1e-5, backend="triton")
    if DEV == "cpu":
        with pytest.raises(RuntimeError, match="bfloat16 is computed wrongly by the Triton interpreter"):
            layer_norm(x.bfloat16(), w.bfloat16(), b.bfloat16(), 1e-5, backend="triton")
    monkeypatch.setattr(dispatch, "_triton_status", lambda name: (False, False, "simulated: no triton"))
    with pytest.raises(RuntimeError, match=r"backend 'triton' was requested \(backend argument\).*simulated"):
        layer_norm(x, w, b, 1e-5, residual=r, backend="triton")
    monkeypatch.setenv("BLIP2FAST_BACKEND", "layer_norm=triton")
    with pytest.raises(RuntimeError, match=r"\(BLIP2FAST_BACKEND \(layer_norm=\.\.\.\)\).*simulated"):
        layer_norm(x, w, b, 1e-5, residual=r)
    monkeypatch.delenv("BLIP2FAST_BACKEND")
    torch.testing.assert_close(layer_norm(x, w, b, 1e-5, residual=r), layer_norm_ref(x, w, b, 1e-5, r))


def test_shape_errors_name_the_problem():
    x = torch.randn(3, 40, device=DEV)
    w = torch.ones(40, device=DEV)
    with pytest.raises(ValueError, match=r"weight must have shape \(40,\)"):
        layer_norm(x, w[:39], w, 1e-5, backend="triton")
    with pytest.raises(ValueError, match=r"residual must have the shape of x \(3, 40\)"):
        layer_norm(x, w, w, 1e-5, residual=x[:1], backend="triton")
    with pytest.raises(ValueError, match="N >= 1"):
        layer_norm(torch.randn(3, 0, device=DEV), w[:0], w[:0], 1e-5, backend="triton")


# --------------------------------------------------------------------------------------------------------------
# The Q-Former: stage-1 loss and gradients with the Triton LayerNorm at every residual site == the torch backend


def test_stage1_loss_triton_layer_norm_equals_torch(monkeypatch):
    """Train mode (hashed attention dropout, torch's hidden dropout re-seeded): loss and every parameter's gradient
    within twice PyTorch's own fp32 error of the float64 run, or 1e-3 of the gradient's norm (the rule of the
    attention kernel's stage-1 test). Every residual LayerNorm runs the kernel: 4 layers x (query + text + ITM +
    ITG) x (attention + FFN), plus 2 cross-attention layers x (query + ITM), the ITM pass's query and text FFNs
    being separate calls."""
    from blip2fast import Blip2
    from blip2fast.config import blip2_tiny
    from tests.models.test_stage1 import make_batch

    def run(backend, dtype):
        monkeypatch.setenv("BLIP2FAST_BACKEND", f"layer_norm={backend}")
        torch.manual_seed(0)
        model = Blip2(blip2_tiny()).to(device=DEV, dtype=dtype).train()
        model.set_seed_step(9, 4)
        images, ids, mask = (t.to(DEV) for t in make_batch(2, seed=2))
        torch.manual_seed(1)
        loss = model.stage1_loss(images.to(dtype), ids, mask, negatives=(torch.tensor([1, 0]).to(DEV),) * 2).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    truth = run("torch", torch.float64)
    torch32 = run("torch", torch.float32)
    before = dict(K.LAUNCHES)
    got = run("triton", torch.float32)
    # query + ITG (one pass) 4 x 3 + 2 cross, text 4 x 2, ITM 4 x 3 + 2 cross: 36 residual LayerNorms per step
    calls = 4 * 3 + 2 + 4 * 2 + 4 * 3 + 2
    assert K.LAUNCHES["ln_fwd"] - before.get("ln_fwd", 0) == calls
    assert K.LAUNCHES["ln_bwd"] - before.get("ln_bwd", 0) == calls
    assert got[1].keys() == truth[1].keys() and len(truth[1]) > 50
    pairs = [("loss", got[0], torch32[0], truth[0])] + [(n, got[1][n], torch32[1][n], truth[1][n]) for n in truth[1]]
    assert_norms_twice_torch(pairs)


# --------------------------------------------------------------------------------------------------------------
# GPU (compiled kernels): bf16, the Q-Former's size, CUDA graphs, no host sync


@pytest.mark.cuda
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("N", [40, 100, 768, 8192])
@pytest.mark.parametrize("rows", [1, 7, 129, 128 * 64])
def test_cuda_bf16(rows, N, residual):
    if rows * N > 2**24:
        pytest.skip("large enough at smaller sizes")
    errs = check_against_reference(*make_case((rows, N), residual, seed=rows + N), torch.bfloat16)
    assert tuple(errs) == compared(residual)


@pytest.mark.cuda
def test_cuda_autocast_training_case():
    """bf16 dense output + fp32 residual, fp32 parameters, under autocast: fp32 out, grads in their dtypes."""
    x, w, b, r, dy = make_case((128 * 64, 768), True, seed=21)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = forward_backward(x, w, b, r, dy, None, "triton", dtypes=(torch.bfloat16, torch.float32, torch.float32))
        lp = forward_backward(x, w, b, r, dy, None, "torch", dtypes=(torch.bfloat16, torch.float32, torch.float32))
    truth = forward_backward(x.bfloat16().double(), w, b, r, dy, torch.float64, "torch")
    assert [t.dtype for t in got] == [t.dtype for t in lp]
    for g, l, t in zip(got, lp, truth):
        assert rel_max_err(g, t) <= max(2 * rel_max_err(l, t), FLOOR[g.dtype])


@pytest.mark.cuda
def test_cuda_graph_replay_and_no_host_sync():
    x, w, b, r, dy = (t.bfloat16() for t in make_case((1000, 768), True, seed=22))
    leaves = [t.detach().requires_grad_() for t in (x, w, b, r)]

    def step():
        y = layer_norm(leaves[0], leaves[1], leaves[2], 1e-12, residual=leaves[3], backend="triton")
        return (y, *torch.autograd.grad(y, leaves, dy))

    torch.cuda.set_sync_debug_mode("error")
    try:
        step()  # warm-up (compiles the kernels)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        leaves[0].mul_(1.5)
    graph.replay()
    for a, c in zip(captured, step()):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
