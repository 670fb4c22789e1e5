"""The ITC loss op (blip2fast/ops/itc_loss.py): Triton kernels (kernels/itc_loss.py) and the C++ ops against the
float64 reference, forward (loss, both similarity matrices) and all five gradients.

Every case runs three times: the reference in float64 (the truth), the reference in the kernel's dtype (PyTorch's
own error at that precision) and the backend under test. Rule (flash-attention's): the backend's max error,
relative to the largest reference value, is at most twice PyTorch's own error in that dtype, or a small floor per
dtype, whichever is larger.

Conventions: "full" (image_all / text_all are separate leaves carrying grad: all five gradients compared),
"lavis" (image_all / text_all detached: no work may be spent on them) and "same" (the gradient-carrying gather in
one process: image_all IS image_feats, text_all IS text_feat, autograd sums both uses).

On a CPU the Triton kernels run under the interpreter (conftest.py sets TRITON_INTERPRET=1) in fp32 and fp16;
bf16 cases are marked `cuda`. Tests assert the kernels launched (LAUNCHES), so a silent fallback cannot pass.
The cpp tests skip with the reason while blip2fast._C lacks itc_loss_fwd.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blip2fast import Blip2
from blip2fast.config import blip2_tiny
from blip2fast.kernels import itc_loss as K
from blip2fast.ops import dispatch
from blip2fast.ops import itc_loss as ops
from blip2fast.ops.itc_loss import itc_loss
from tests.helpers import assert_norms_twice_torch, assert_twice_torch, itc_temp_grad_floor, triton_test_device
from tests.models.test_stage1 import make_batch

DEV = triton_test_device(K.INTERPRETED)

# max error / max |reference|: floor per dtype (the 2x-PyTorch rule applies above it)
FLOOR = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
CPU_DTYPES = [torch.float32, torch.float16]
NAMES = ("loss", "sim_i2t", "sim_t2i", "d_image_feats", "d_text_feat", "d_image_all", "d_text_all", "d_temp")

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("BLIP2FAST_BACKEND", raising=False)


def cpp_missing() -> str:
    """Why the cpp backend cannot run here ("" when it can)."""
    available, _, why = ops.cpp_status()
    return "" if available else why


def make_case(B: int, Ba: int, Q: int, E: int, seed: int = 0, device: str = DEV):
    """float64 inputs: L2-normalised features (as the model's), a temperature, targets = this rank's global rows
    (rank 1 of Ba // B when Ba > B: the positives are not the first columns)."""
    g = torch.Generator().manual_seed(seed)

    def feats(*shape):
        return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(device)

    image_feats, text_feat, image_all, text_all = feats(B, Q, E), feats(B, E), feats(Ba, Q, E), feats(Ba, E)
    offset = B if Ba >= 2 * B else 0
    targets = ((torch.arange(B) + offset) % Ba).to(device)
    temp = torch.tensor(0.05 + 0.05 * torch.rand((), generator=g, dtype=torch.float64).item(), device=device)
    return image_feats, text_feat, image_all, text_all, temp, targets


def run(case, dtype, backend, convention="full", eps=0.1):
    """(loss, sim_i2t, sim_t2i, 5 gradients) with None for gradients the convention does not produce."""
    image_feats, text_feat, image_all, text_all, temp, targets = case
    leaf = [t.detach().to(dtype).requires_grad_() for t in (image_feats, text_feat)]
    temp_leaf = temp.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    if convention == "same":
        alls = leaf
    elif convention == "full":
        alls = [t.detach().to(dtype).requires_grad_() for t in (image_all, text_all)]
    else:
        alls = [t.detach().to(dtype) for t in (image_all, text_all)]
    loss, sim_i2t, sim_t2i = itc_loss(leaf[0], leaf[1], alls[0], alls[1], temp_leaf, targets, eps, backend=backend)
    assert not sim_i2t.requires_grad and not sim_t2i.requires_grad
    assert sim_i2t.dtype == sim_t2i.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    inputs = leaf + (alls if convention == "full" else []) + [temp_leaf]
    grads = list(torch.autograd.grad(loss, inputs))
    if convention != "full":
        grads = grads[:2] + [None, None] + grads[2:]
    return [loss, sim_i2t, sim_t2i, *grads]


def compared(convention: str) -> set:
    """The outputs `check` compares for a convention: LAVIS's detached gathers have no gradient of their own."""
    return set(NAMES) - ({"d_image_all", "d_text_all"} if convention != "full" else set())


def check(case, dtype, backend="triton", convention="full", eps=0.1):
    """Runs truth, PyTorch in `dtype` and `backend`; asserts the rule, the launches and dtypes; returns the errors
    of every compared output (name -> max error relative to the truth's max)."""
    truth = run(case, torch.float64, "torch", convention, eps)
    torch_lp = run(case, dtype, "torch", convention, eps)
    before = dict(K.LAUNCHES)
    got = run(case, dtype, backend, convention, eps)
    if backend == "triton":
        launched = {k: K.LAUNCHES[k] - before.get(k, 0) for k in K.KERNEL_NAMES}
        n_bwd = 1 if convention == "lavis" else 2  # lavis: only d image_feats and d text_feat are computed
        assert launched == dict(sims=2, ce=1, bwd_multi=n_bwd, bwd_single=n_bwd), launched
    errs = {}
    for name, g, lp, want in zip(NAMES, got, torch_lp, truth):
        if want is None:
            assert g is None, name
            continue
        assert g.shape == want.shape, (name, g.shape, want.shape)
        if name.startswith("d_") and name != "d_temp":
            assert g.dtype == dtype, (name, g.dtype)
        # (one class: the loss and every gradient are exactly 0, compared absolutely)
        errs[name] = assert_twice_torch(name, g, lp, want, FLOOR[dtype], f"({dtype}, {convention})")
    return errs


# --------------------------------------------------------------------------------------------------------------
# Triton vs the float64 reference

# (B, Ba, Q, E): batch 1, primes, Ba != B, Ba = 3B, Q = 32 and 7 (and 33 -> padded to 64), E = 256 and 40, and a
# second column tile (Ba = 67 > 64)
SHAPES = [(1, 1, 7, 40), (1, 3, 32, 40), (5, 5, 32, 256), (3, 11, 7, 256), (7, 21, 7, 40), (13, 13, 7, 40),
          (2, 67, 7, 40), (3, 4, 33, 17)]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_Ba{}_Q{}_E{}".format(*s))
def test_matches_reference(shape, dtype):
    errs = check(make_case(*shape, seed=sum(shape)), dtype)
    assert set(errs) == compared("full")


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("convention", ["lavis", "same", "full"])
def test_conventions_and_label_smoothing(convention, eps):
    B, Ba = (5, 5) if convention == "same" else (5, 15)
    for dtype in CPU_DTYPES:
        errs = check(make_case(B, Ba, 32, 40, seed=3), dtype, convention=convention, eps=eps)
        assert set(errs) == compared(convention)


def test_split_reductions_are_exact_and_deterministic(monkeypatch):
    """Force the GPU's split launches (many programs, fp32 partials summed in a fixed order) under the interpreter:
    same accuracy, and bit-identical results on a rerun."""
    monkeypatch.setattr(K, "PROGRAM_TARGET", 5)
    seen = []
    splits = K._splits
    monkeypatch.setattr(K, "_splits", lambda *a: seen.append(splits(*a)) or seen[-1])
    case = make_case(3, 130, 7, 40, seed=5)
    check(case, torch.float32)
    assert max(s for s, _ in seen) > 1, seen
    first, second = run(case, torch.float16, "triton"), run(case, torch.float16, "triton")
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_every_output_element_written(monkeypatch):
    """Outputs pre-filled with NaN / -7: every element of sims, argmax, row statistics and the gradients is written; the
    argmax queries are valid."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan") if t.dtype.is_floating_point else -7)

    monkeypatch.setattr(torch, "empty", poisoned)
    image_feats, text_feat, image_all, text_all, temp, targets = (
        t.float() if t.dtype == torch.float64 else t for t in make_case(3, 70, 7, 40, seed=8))
    loss, sims, args, stats, wsum = K.forward(image_feats, text_feat, image_all, text_all, temp, targets, 0.1)
    for name, t in (("loss", loss), ("sims", sims), ("stats", stats), ("wsum", wsum)):
        assert torch.isfinite(t).all(), f"{name} has unwritten (NaN) elements"
    assert ((args >= 0) & (args < 7)).all(), "argmax queries unwritten or out of range"
    grads = K.backward(torch.tensor(1.0), image_feats, text_feat, image_all, text_all, temp, targets, 0.1, sims, args,
                       stats, wsum, [True] * 5)
    for name, g in zip(NAMES[3:], grads):
        assert torch.isfinite(g).all(), f"{name} has unwritten (NaN) elements"


def test_argmax_routes_the_gradient_to_one_query():
    """The max over queries sends each similarity's gradient to its argmax query only: image features of queries
    that never win get exactly zero gradient."""
    image_feats, text_feat, image_all, text_all, temp, targets = (
        t.float() if t.dtype == torch.float64 else t for t in make_case(4, 9, 7, 40, seed=9))
    image_feats = image_feats.clone()
    image_feats[:, 3] = -F.normalize(text_all.sum(0), dim=-1)  # query 3 points away from every text: never wins
    x = image_feats.requires_grad_()
    loss, _, _ = itc_loss(x, text_feat, image_all, text_all, temp, targets, 0.1, backend="triton")
    (grad,) = torch.autograd.grad(loss, x)
    sim = torch.einsum("bqe,je->bjq", image_feats.detach(), text_all)
    winners = torch.zeros(4, 7, dtype=torch.bool).scatter_(1, sim.argmax(-1), True)  # (b, q) winning somewhere
    assert (grad[~winners] == 0).all() and (grad[winners].abs().sum(-1) > 0).all()
    assert not winners[:, 3].any()


def test_strided_inputs():
    """Views with non-default strides (a query-major buffer, every other row of a gathered buffer, a strided
    target vector) are read through their strides."""
    image_feats, text_feat, image_all, text_all, temp, targets = (
        t.float() if t.dtype == torch.float64 else t for t in make_case(3, 10, 7, 40, seed=12))
    views = (image_feats.transpose(0, 1).contiguous().transpose(0, 1), text_feat,
             torch.stack([image_all, image_all], 1).flatten(0, 1)[::2], torch.stack([text_all, -text_all], 1)[:, 0],
             temp, torch.stack([targets, targets], 1)[:, 0])
    assert not views[0].is_contiguous() and not views[2].is_contiguous() and not views[5].is_contiguous()
    got = itc_loss(*views, 0.1, backend="triton")
    want = itc_loss(image_feats, text_feat, image_all, text_all, temp, targets, 0.1, backend="torch")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_out_of_range_target_gives_nan_not_garbage():
    image_feats, text_feat, image_all, text_all, temp, _ = make_case(2, 4, 7, 40)
    loss, _, _ = itc_loss(image_feats.float(), text_feat.float(), image_all.float(), text_all.float(), temp.float(),
                          torch.tensor([1, 4], device=DEV), 0.1, backend="triton")
    assert torch.isnan(loss)


def test_temperature_as_float_and_in_bf16_model_dtype():
    image_feats, text_feat, image_all, text_all, temp, targets = (
        t.float() if t.dtype == torch.float64 else t for t in make_case(3, 5, 7, 40))
    want = itc_loss(image_feats, text_feat, image_all, text_all, temp, targets, 0.1, backend="torch")[0]
    got = itc_loss(image_feats, text_feat, image_all, text_all, temp.item(), targets, 0.1, backend="triton")[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    t16 = temp.to(torch.bfloat16).requires_grad_()  # a bf16 model's temperature parameter
    loss = itc_loss(image_feats, text_feat, image_all, text_all, t16, targets, 0.1, backend="triton")[0]
    (g,) = torch.autograd.grad(loss, t16)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g)


# --------------------------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, dispatch, input errors


def _op_args(requires_grad=True):
    image_feats, text_feat, image_all, text_all, temp, targets = make_case(3, 7, 7, 40, seed=4)
    feats = [t.float().requires_grad_(requires_grad) for t in (image_feats, text_feat, image_all, text_all, temp)]
    return (*feats, targets, 0.1)


def test_opcheck_forward_and_backward_ops():
    results = torch.library.opcheck(torch.ops.blip2fast.itc_loss_triton.default, _op_args())
    assert results and all(v == "SUCCESS" for v in results.values()), results
    args = _op_args(requires_grad=False)
    _, sims, am, stats, wsum = torch.ops.blip2fast.itc_loss_triton(*args)
    for mask in ([True] * 5, [True, True, False, False, True]):
        bwd_args = (torch.tensor(1.5, device=DEV), *args, sims, am, stats, wsum, mask)
        results = torch.library.opcheck(torch.ops.blip2fast.itc_loss_triton_backward.default, bwd_args)
        assert results and all(v == "SUCCESS" for v in results.values()), results


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inside inductor
def test_compiles_fullgraph_with_inductor():
    args = _op_args()

    def f(image_feats, text_feat, image_all, text_all, temp, targets):
        loss, sim_i2t, sim_t2i = itc_loss(image_feats, text_feat, image_all, text_all, temp, targets, 0.1,
                                          backend="triton")
        return loss * 2.0 + (sim_i2t - sim_t2i).square().mean()

    torch._dynamo.reset()
    before = dict(K.LAUNCHES)
    compiled = torch.compile(f, fullgraph=True)
    out = compiled(*args[:6])
    grads = torch.autograd.grad(out, args[:5])
    assert K.LAUNCHES["sims"] > before.get("sims", 0) and K.LAUNCHES["bwd_multi"] > before.get("bwd_multi", 0)
    want = f(*args[:6])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, torch.autograd.grad(want, args[:5])):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_automatic_is_torch_on_cpu_and_env_forces_triton(monkeypatch):
    args = [t.cpu() for t in _op_args(requires_grad=False)[:6]]
    before = K.LAUNCHES["sims"]
    itc_loss(*args, 0.1)
    assert K.LAUNCHES["sims"] == before, "automatic choice must not run the interpreter on the CPU"
    if not K.INTERPRETED:
        return
    monkeypatch.setenv("BLIP2FAST_BACKEND", "itc_loss=triton")
    itc_loss(*args, 0.1)
    assert K.LAUNCHES["sims"] == before + 2
    monkeypatch.setenv("BLIP2FAST_BACKEND", "triton")  # a plain name drives every op that has it
    itc_loss(*args, 0.1)
    assert K.LAUNCHES["sims"] == before + 4
    monkeypatch.setenv("BLIP2FAST_BACKEND", "itc_loss=cuda")
    with pytest.raises(ValueError, match=r"unknown ITC loss backend 'cuda' \(from BLIP2FAST_BACKEND"):
        itc_loss(*args, 0.1)


def test_forced_triton_raises_without_falling_back(monkeypatch):
    args = _op_args(requires_grad=False)
    x64 = [t.double() for t in args[:5]]
    with pytest.raises(RuntimeError, match=r"backend 'triton' was requested \(backend argument\).*float64 is not"):
        itc_loss(*x64, args[5], 0.1, backend="triton")
    image_feats, text_feat, image_all, text_all, temp, targets = make_case(2, 3, 65, 300)
    f = [t.float() for t in (image_feats, text_feat, image_all, text_all)]
    with pytest.raises(RuntimeError, match=r"65 queries per image > 64.*embed_dim 300 > 256"):
        itc_loss(*f, temp.float(), targets, 0.1, backend="triton")
    if DEV != "cpu":
        return
    bf = [t.bfloat16() for t in args[:4]]
    with pytest.raises(RuntimeError, match="bfloat16 is computed wrongly by the Triton interpreter"):
        itc_loss(*bf, args[4], args[5], 0.1, backend="triton")
    monkeypatch.setattr(dispatch, "_triton_status", lambda name: (False, False, "simulated: no triton"))
    before = K.LAUNCHES["sims"]
    with pytest.raises(RuntimeError, match=r"backend 'triton' was requested.*simulated: no triton"):
        itc_loss(*args, backend="triton")
    monkeypatch.setenv("BLIP2FAST_BACKEND", "itc_loss=triton")
    with pytest.raises(RuntimeError, match=r"\(BLIP2FAST_BACKEND \(itc_loss=\.\.\.\)\).*simulated: no triton"):
        itc_loss(*args)
    assert K.LAUNCHES["sims"] == before
    monkeypatch.delenv("BLIP2FAST_BACKEND")
    loss, _, _ = itc_loss(*args)  # automatic on the CPU: the reference, whatever triton's state
    assert torch.isfinite(loss)


def test_input_errors_name_the_problem():
    image_feats, text_feat, image_all, text_all, temp, targets = _op_args(requires_grad=False)[:6]
    ok = dict(image_feats=image_feats, text_feat=text_feat, image_all=image_all, text_all=text_all, temp=temp,
              targets=targets, label_smoothing=0.1, backend="triton")
    cases = [
        (dict(image_feats=image_feats[0]), ValueError, r"image_feats and image_all must be 3-D"),
        (dict(text_feat=text_feat[:2]), ValueError, r"text_feat must have shape \(3, 40\)"),
        (dict(text_all=text_all[:5]), ValueError, r"text_all must have shape \(7, 40\)"),
        (dict(image_all=image_all[:, :3]), ValueError, r"image_all must have shape \(Ba, 7, 40\)"),
        (dict(image_all=image_all[:0], text_all=text_all[:0]), ValueError, r"image_all has no rows \(Ba = 0\)"),
        (dict(text_all=text_all.half()), TypeError, r"must share one floating dtype"),
        (dict(targets=targets.int()), TypeError, r"targets must be int64 .* got torch.int32: pass targets.long\(\)"),
        (dict(targets=targets[:2]), ValueError, r"targets must have shape \(3,\)"),
        (dict(temp=temp.expand(2)), TypeError, r"temp must be a one-element floating tensor"),
        (dict(label_smoothing=1.0), ValueError, r"label_smoothing must be in \[0, 1\); got 1.0"),
    ]
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            itc_loss(**{**ok, **change})


# --------------------------------------------------------------------------------------------------------------
# cpp backend (torch.ops.blip2fast.itc_loss_fwd / bwd from csrc/): skipped while the extension lacks the ops


def test_cpp_absent_is_reported_and_never_falls_back(monkeypatch):
    """An extension without the op (never built, or an old build): asking for cpp is an error naming why, never a
    silent fallback. Where the extension is present, its absence is simulated with an old build's status."""
    import blip2fast.ops.itc_loss as itc_module

    why = cpp_missing()
    if not why:
        why = "blip2fast._C has no itc_loss_fwd (rebuild with pip install -e . --no-build-isolation)"
        monkeypatch.setattr(itc_module, "_cpp_state", (False, False, why))
    args = _op_args(requires_grad=False)
    with pytest.raises(RuntimeError, match=r"backend 'cpp' was requested") as err:
        itc_loss(*args, backend="cpp")
    assert why in str(err.value)
    if "no itc_loss_fwd" in why:
        assert why.startswith("blip2fast._C has no itc_loss_fwd (rebuild")


@pytest.mark.parametrize("convention", ["full", "lavis", "same"])
def test_cpp_matches_reference(convention):
    if cpp_missing():
        pytest.skip(f"cpp backend unavailable: {cpp_missing()}")
    for shape in [(1, 1, 7, 40), (5, 15, 32, 40), (3, 4, 33, 17)]:
        if convention == "same":
            shape = (shape[0], shape[0], *shape[2:])
        for dtype in CPU_DTYPES:
            for eps in (0.0, 0.1):
                errs = check(make_case(*shape, seed=sum(shape)), dtype, backend="cpp", convention=convention,
                             eps=eps)
                assert set(errs) == compared(convention)


def test_cpp_opcheck_and_compile():
    if cpp_missing():
        pytest.skip(f"cpp backend unavailable: {cpp_missing()}")
    results = torch.library.opcheck(torch.ops.blip2fast.itc_loss_fwd.default, _op_args())
    assert results and all(v == "SUCCESS" for v in results.values()), results
    args = _op_args()
    compiled = torch.compile(lambda *a: itc_loss(*a, backend="cpp")[0], fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    want = itc_loss(*args, backend="torch")[0]
    torch.testing.assert_close(out, want.float(), rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out, args[:5])
    for g, w in zip(grads, torch.autograd.grad(want, args[:5])):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# The model: Blip2.stage1_loss with BLIP2FAST_BACKEND=itc_loss=triton equals the torch backend

NEGATIVES = (torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0]))  # fixed draws: the sampling is not under test here


def stage1(backend: str, monkeypatch, dtype=torch.float32, gather_with_grad=False):
    monkeypatch.setenv("BLIP2FAST_BACKEND", f"itc_loss={backend}")
    torch.manual_seed(0)
    model = Blip2(blip2_tiny().replace(itc_gather_with_grad=gather_with_grad)).to(device=DEV, dtype=dtype).eval()
    images, ids, mask = (t.to(DEV) for t in make_batch(3, seed=4))
    out = model.stage1_loss(images.to(dtype), ids, mask, negatives=tuple(n.to(DEV) for n in NEGATIVES),
                            return_details=True)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("gather_with_grad", [False, True], ids=["lavis", "gather_with_grad"])
def test_stage1_loss_triton_equals_torch(gather_with_grad, monkeypatch):
    """Losses, similarities and every parameter's gradient: |triton - fp64| <= max(2 |torch fp32 - fp64|, 1e-3
    |fp64|, 1e-7) (gradients through the ITC softmax over sim / temp are ill-conditioned in fp32 whatever computes
    them; a wiring bug moves them by percents)."""
    truth = stage1("torch", monkeypatch, torch.float64, gather_with_grad)
    torch32 = stage1("torch", monkeypatch, torch.float32, gather_with_grad)
    before = dict(K.LAUNCHES)
    got = stage1("triton", monkeypatch, torch.float32, gather_with_grad)
    assert K.LAUNCHES["sims"] - before.get("sims", 0) == 2 and K.LAUNCHES["ce"] - before.get("ce", 0) == 1
    # d image_feats; with the gradient-carrying gather (one process: image_all IS image_feats) also d image_all
    assert K.LAUNCHES["bwd_multi"] - before.get("bwd_multi", 0) == (2 if gather_with_grad else 1)
    assert got[0].sim_i2t.dtype == torch.float32 and not got[0].sim_i2t.requires_grad
    pairs = [(n, getattr(got[0], n), getattr(torch32[0], n), getattr(truth[0], n))
             for n in ("loss", "loss_itc", "loss_itm", "loss_itg", "sim_i2t", "sim_t2i")]
    assert got[1].keys() == truth[1].keys() and len(truth[1]) > 50
    pairs += [(n, got[1][n], torch32[1][n], truth[1][n]) for n in truth[1]]
    temp_floor = itc_temp_grad_floor(truth[0].sim_i2t, truth[0].sim_t2i, blip2_tiny().temp_init)
    assert_norms_twice_torch(pairs, floors={"temp": temp_floor})


# --------------------------------------------------------------------------------------------------------------
# GPU (compiled kernels): bf16, the paper's sizes, CUDA graphs, no host sync


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(5, 15, 32, 256), (13, 39, 7, 40), (1, 1, 32, 256)])
@pytest.mark.parametrize("convention", ["full", "lavis"])
def test_cuda_bf16(shape, convention):
    errs = check(make_case(*shape, seed=11), torch.bfloat16, convention=convention)
    assert set(errs) == compared(convention)


@pytest.mark.cuda
@pytest.mark.parametrize("Ba", [128, 1024])
def test_cuda_paper_sizes(Ba):
    """B = 128, Q = 32, E = 256 in bf16 and fp16 (split launches on the GPU), both conventions."""
    case = make_case(128, Ba, 32, 256, seed=Ba)
    for dtype in (torch.bfloat16, torch.float16):
        errs = check(case, dtype, convention="full")
        assert set(errs) == compared("full")
    errs = check(case, torch.bfloat16, convention="lavis")
    assert set(errs) == compared("lavis")


@pytest.mark.cuda
def test_cuda_graph_replay_and_no_host_sync():
    """Forward + backward capture in a CUDA graph (no host sync anywhere); replays recompute for new inputs."""
    image_feats, text_feat, image_all, text_all, temp, targets = make_case(16, 48, 32, 256, seed=2)
    leaves = [t.bfloat16().requires_grad_() for t in (image_feats, text_feat, image_all, text_all)]
    temp = temp.float().requires_grad_()

    def step():
        loss, sim_i2t, sim_t2i = itc_loss(*leaves, temp, targets, 0.1, backend="triton")
        return (loss, sim_i2t, sim_t2i, *torch.autograd.grad(loss, [*leaves, temp]))

    torch.cuda.set_sync_debug_mode("error")
    try:
        step()  # warm-up: compiles the kernels
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        leaves[1].copy_(F.normalize(torch.randn_like(leaves[1], dtype=torch.float32), dim=-1).bfloat16())
    graph.replay()
    want = step()
    for a, b in zip(captured, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_forced_triton_runs_the_kernels():
    image_feats, text_feat, image_all, text_all, temp, targets = make_case(4, 8, 32, 256)
    before = K.LAUNCHES["sims"]
    loss, _, _ = itc_loss(*(t.bfloat16() for t in (image_feats, text_feat, image_all, text_all)), temp.float(),
                          targets, 0.1, backend="triton")
    assert K.LAUNCHES["sims"] == before + 2 and math.isfinite(loss.item())
