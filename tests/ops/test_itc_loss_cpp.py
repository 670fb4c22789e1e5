"""ITC loss, compiled op (csrc/: C++ on CPU tensors, CUDA kernels on CUDA tensors) against float64 PyTorch.

The raw ops torch.ops.blip2fast.itc_loss_fwd / itc_loss_bwd are tested directly (the contract in the ITC schema),
and through the public itc_loss(..., backend="cpp") with autograd. The C++ path shares its per-element math with
the CUDA kernels (csrc/itc_loss.h) and keeps their accumulation order, so CUDA and CPU similarities and argmax
queries must be identical, not just close. The extension is used when built; with BLIP2FAST_EXPECT_EXT=1 (CI) a
missing extension fails instead of skipping.
"""
from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

from blip2fast.ops import _extension
from blip2fast.ops.losses import itc_loss_ref, itc_similarities

EXPECT_EXT = os.environ.get("BLIP2FAST_EXPECT_EXT") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRAD_NAMES = ("image_feats", "text_feat", "image_all", "text_all", "temp")
# Error of a result relative to the largest |reference| entry. fp32 results: float32 accumulation only. fp16/bf16
# gradients are rounded once to the input dtype (2**-11, 2**-8 relative), with room for the float32 sums.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# d temp = -sum over 2 x B x Ba terms dsim * sim / temp that cancel (each row's dsim sums to 0), so |d temp| can be
# far below its terms: its error is measured against the sum of |terms| (the sum's condition), not |d temp|.
TOL_TEMP = 1e-5


def temp_condition(sim_i2t, sim_t2i, targets, eps, temp, grad_loss=1.0):
    """sum_{x, b, j} |dL/dsim_x[b, j] * sim_x[b, j]| / temp in float64: the scale of d temp's float32 rounding."""
    total = 0.0
    for sim in (sim_i2t, sim_t2i):
        sim = sim.detach().double().cpu()
        B, Ba = sim.shape
        onehot = torch.nn.functional.one_hot(targets.cpu(), Ba).double()
        dsim = grad_loss * 0.5 / B * (sim.softmax(-1) - (1 - eps) * onehot - eps / Ba)
        total += float((dsim * sim).abs().sum())
    return total / float(temp)


def grad_error(name, got, want, condition):
    """Max |got - want| relative to max |want| (to the condition for d temp; with one class, Ba = 1, d temp is 0
    and the condition too)."""
    if name == "temp":
        return abs(float(got) - float(want)) / max(condition, 1e-3)
    return max_rel_err(got, want)


def tol_for(name: str, dtype: torch.dtype) -> float:
    return TOL_TEMP if name == "temp" else TOL[dtype]


@pytest.fixture(scope="module")
def ext():
    status = _extension.load_extension()
    if not status:
        if EXPECT_EXT:
            pytest.fail(f"BLIP2FAST_EXPECT_EXT=1 but blip2fast._C is not usable: {status.reason}")
        pytest.skip(f"blip2fast._C not loaded: {status.reason}")
    if not hasattr(torch.ops.blip2fast, "itc_loss_fwd"):
        pytest.fail("blip2fast._C is loaded but has no itc_loss_fwd: rebuild with pip install -e . "
                    "--no-build-isolation")
    return status


@pytest.fixture(scope="module")
def fakes(ext):
    """The fake (meta) kernels and autograd of the raw ops live in blip2fast/ops/itc_loss.py (registered once)."""
    from blip2fast.ops import itc_loss as itc_mod

    available, _, why = itc_mod.cpp_status()
    assert available, why
    return itc_mod


def seed_of(*key) -> int:
    """A seed that is stable across processes (Python's str hash is salted per process)."""
    return zlib.crc32(repr(key).encode())


def fwd(*args):
    return torch.ops.blip2fast.itc_loss_fwd(*args)


def bwd(*args):
    return torch.ops.blip2fast.itc_loss_bwd(*args)


def make_inputs(B, Ba, Q, E, dtype=torch.float32, *, gen, device="cpu", temp=0.07):
    """L2-normalised random features (as the model feeds them), a temperature and random positive columns."""
    def feats(*shape):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        return torch.nn.functional.normalize(x, dim=-1).to(device=device, dtype=dtype)

    image_feats, text_feat = feats(B, Q, E), feats(B, E)
    image_all, text_all = feats(Ba, Q, E), feats(Ba, E)
    targets = torch.randint(0, Ba, (B,), generator=gen).to(device)
    temp_t = torch.tensor(temp, dtype=torch.float32, device=device)
    return image_feats, text_feat, image_all, text_all, temp_t, targets


def scores64(image_feats, text_feat, image_all, text_all):
    """Float64 (B, Ba, Q) dot products of both directions (the reference materialises them; tests are small)."""
    i2t = torch.einsum("bqe,je->bjq", image_feats.double(), text_all.double())
    t2i = torch.einsum("be,jqe->bjq", text_feat.double(), image_all.double())
    return i2t, t2i


def reference_given_args(inputs, arg_i2t, arg_t2i, eps, grad_loss=1.0):
    """Float64 gradients (autograd) with the max over queries routed to the given argmax queries, and d temp's
    condition (temp_condition).

    Routing by the op's own argmax keeps the gradient comparison exact even where two queries are within float32
    rounding of each other; test_forward checks separately that the op's argmax is the float64 argmax up to such
    near-ties."""
    image_feats, text_feat, image_all, text_all, temp, targets = inputs
    leaves = [t.detach().double().requires_grad_() for t in (image_feats, text_feat, image_all, text_all, temp)]
    imf, txf, ima, txa, tmp = leaves
    B, Ba = imf.shape[0], ima.shape[0]
    rows = torch.arange(B, device=imf.device)[:, None]
    cols = torch.arange(Ba, device=imf.device)[None, :]
    sim_i2t = (imf[rows, arg_i2t.long()] * txa[None]).sum(-1) / tmp   # (B, Ba)
    sim_t2i = (ima[cols, arg_t2i.long()] * txf[:, None]).sum(-1) / tmp  # (B, Ba)
    loss = itc_loss_ref(sim_i2t, sim_t2i, targets, eps)
    grads = torch.autograd.grad(loss * grad_loss, leaves)
    return grads, temp_condition(sim_i2t, sim_t2i, targets, eps, temp, grad_loss)


def max_rel_err(got, want):
    got, want = got.double().cpu(), want.double().cpu()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def check_forward(out, inputs, eps, *, rtol_sim=2e-6):
    """out = itc_loss_fwd(*inputs, eps) against float64: sims, argmax (up to float32 near-ties), lse, loss.
    Returns the loss's absolute error."""
    loss, sim_i2t, sim_t2i, arg_i2t, arg_t2i, lse = out
    image_feats, text_feat, image_all, text_all, temp, targets = inputs
    B, Q, _ = image_feats.shape
    Ba = image_all.shape[0]
    assert loss.shape == () and loss.dtype == torch.float32
    for s in (sim_i2t, sim_t2i):
        assert s.shape == (B, Ba) and s.dtype == torch.float32
    for a in (arg_i2t, arg_t2i):
        assert a.shape == (B, Ba) and a.dtype == torch.int32
        assert int(a.min()) >= 0 and int(a.max()) < Q
    assert lse.shape == (2, B) and lse.dtype == torch.float32

    t64 = temp.double()
    s_i2t64, s_t2i64 = (x.amax(-1) / t64 for x in scores64(image_feats, text_feat, image_all, text_all))
    scale = float(max(s_i2t64.abs().max(), s_t2i64.abs().max()))
    for got, want in ((sim_i2t, s_i2t64), (sim_t2i, s_t2i64)):
        err = float((got.double() - want).abs().max())
        assert err <= rtol_sim * scale + 1e-6, f"similarity error {err:.3g} (scale {scale:.3g})"
    # The argmax query scores within float32 rounding of the float64 maximum (ties of fp32 sums may differ).
    for arg, x in zip((arg_i2t, arg_t2i), scores64(image_feats, text_feat, image_all, text_all)):
        picked = x.gather(-1, arg.long()[..., None])[..., 0]
        gap = (x.amax(-1) - picked) / t64
        assert float(gap.max()) <= rtol_sim * scale + 1e-6
        clear = (x.topk(min(2, Q), dim=-1).values[..., 0] - x.topk(min(2, Q), dim=-1).values[..., -1]) > 1e-5
        if Q > 1:
            assert torch.equal(arg.long()[clear], x.argmax(-1)[clear])
    lse64 = torch.stack([s_i2t64.logsumexp(-1), s_t2i64.logsumexp(-1)])
    assert float((lse.double() - lse64).abs().max()) <= rtol_sim * scale + 1e-5
    loss64 = itc_loss_ref(s_i2t64, s_t2i64, targets, eps)
    loss_err = abs(float(loss) - float(loss64))
    assert loss_err <= 2e-5 * max(1.0, abs(float(loss64))) + rtol_sim * scale
    return loss_err


# (B, Ba, Q, E): B = 1, primes, Ba != B (a rank's rows against the gathered batch), Ba = 1 (one class), Q = 32 and
# 7, E = 256 and 40.
SHAPES = [(1, 1, 7, 40), (1, 5, 32, 40), (3, 3, 32, 256), (5, 13, 7, 40), (13, 29, 32, 40), (7, 11, 7, 256),
          (2, 17, 1, 40)]


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Ba{}-Q{}-E{}".format(*s))
def test_forward(ext, shape, dtype, eps):
    gen = torch.Generator().manual_seed(seed_of(shape, dtype, eps))
    inputs = make_inputs(*shape, dtype, gen=gen)
    assert math.isfinite(check_forward(fwd(*inputs, eps), inputs, eps))


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Ba{}-Q{}-E{}".format(*s))
def test_backward_all_grads(ext, shape, dtype, eps):
    gen = torch.Generator().manual_seed(seed_of("bwd", shape, dtype, eps))
    inputs = make_inputs(*shape, dtype, gen=gen)
    out = fwd(*inputs, eps)
    grad_loss = torch.tensor(1.7)
    grads = bwd(grad_loss, *inputs, eps, *out[1:], [True] * 5)
    want, cond = reference_given_args(inputs, out[3], out[4], eps, grad_loss=1.7)
    for name, g, w, x in zip(GRAD_NAMES, grads, want, inputs[:5]):
        assert g.shape == x.shape and g.dtype == x.dtype, (name, g.shape, g.dtype)
        err = grad_error(name, g, w, cond)
        assert err <= tol_for(name, dtype), f"d {name}: error {err:.3g} > {tol_for(name, dtype)}"


MASKS = [
    [True, True, False, False, True],    # LAVIS: gathered features detached
    [False, False, True, True, False],   # only the gathered side
    [True, False, False, False, False],
    [False, True, False, False, False],
    [False, False, True, False, False],
    [False, False, False, True, False],
    [False, False, False, False, True],
    [False] * 5,
]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if x else "0" for x in m))
def test_backward_output_mask(ext, mask):
    """Unwanted gradients are empty (0,) tensors of the input dtype; wanted ones equal the all-True call exactly."""
    gen = torch.Generator().manual_seed(5)
    inputs = make_inputs(5, 13, 7, 40, torch.bfloat16, gen=gen)
    out = fwd(*inputs, 0.1)
    full = bwd(torch.tensor(1.0), *inputs, 0.1, *out[1:], [True] * 5)
    part = bwd(torch.tensor(1.0), *inputs, 0.1, *out[1:], mask)
    for name, want, f, p, x in zip(GRAD_NAMES, mask, full, part, inputs[:5]):
        assert p.dtype == x.dtype, name
        if want:
            assert torch.equal(p, f), name
        else:
            assert p.shape == (0,), (name, p.shape)


def test_gathered_side_is_this_batch(ext):
    """One process with the gradient-carrying gather: image_all IS image_feats (and text_all IS text_feat), the
    targets are the diagonal; the op's four feature gradients summed pairwise equal autograd's."""
    gen = torch.Generator().manual_seed(6)
    image_feats, text_feat, _, _, temp, _ = make_inputs(11, 11, 32, 40, gen=gen)
    targets = torch.arange(11)
    inputs = (image_feats, text_feat, image_feats, text_feat, temp, targets)
    out = fwd(*inputs, 0.1)
    g = bwd(torch.tensor(1.0), *inputs, 0.1, *out[1:], [True] * 5)

    leaves = [t.double().requires_grad_() for t in (image_feats, text_feat, temp)]
    s_i2t, s_t2i = itc_similarities(leaves[0], leaves[1], leaves[0], leaves[1], leaves[2])
    loss = itc_loss_ref(s_i2t, s_t2i, targets, 0.1)
    d_img, d_txt, d_temp = torch.autograd.grad(loss, leaves)
    assert abs(float(out[0]) - float(loss.detach())) < 1e-5
    assert max_rel_err(g[0].double() + g[2].double(), d_img) <= TOL[torch.float32]
    assert max_rel_err(g[1].double() + g[3].double(), d_txt) <= TOL[torch.float32]
    assert grad_error("temp", g[4], d_temp, temp_condition(out[1], out[2], targets, 0.1, temp)) <= TOL_TEMP


def test_deterministic_and_repeatable(ext):
    gen = torch.Generator().manual_seed(7)
    inputs = make_inputs(13, 29, 32, 40, torch.float16, gen=gen)
    a = fwd(*inputs, 0.1)
    b = fwd(*inputs, 0.1)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    ga = bwd(torch.tensor(1.0), *inputs, 0.1, *a[1:], [True] * 5)
    gb = bwd(torch.tensor(1.0), *inputs, 0.1, *a[1:], [True] * 5)
    for x, y in zip(ga, gb):
        assert torch.equal(x, y)


def test_ties_route_to_lowest_query(ext):
    """Identical queries: every similarity ties across q, the argmax is query 0, and all its gradient goes there."""
    gen = torch.Generator().manual_seed(8)
    image_feats, text_feat, image_all, text_all, temp, targets = make_inputs(3, 5, 7, 40, gen=gen)
    image_feats = image_feats[:, :1].expand(-1, 7, -1).contiguous()
    image_all = image_all[:, :1].expand(-1, 7, -1).contiguous()
    inputs = (image_feats, text_feat, image_all, text_all, temp, targets)
    out = fwd(*inputs, 0.0)
    assert int(out[3].abs().max()) == 0 and int(out[4].abs().max()) == 0
    g = bwd(torch.tensor(1.0), *inputs, 0.0, *out[1:], [True] * 5)
    assert float(g[0][:, 1:].abs().max()) == 0.0 and float(g[0][:, 0].abs().max()) > 0
    assert float(g[2][:, 1:].abs().max()) == 0.0 and float(g[2][:, 0].abs().max()) > 0


# --------------------------------------------------------------------------------------------------------------
# Input checks


def test_forward_input_checks_name_bad_values(ext):
    gen = torch.Generator().manual_seed(9)
    imf, txf, ima, txa, temp, tg = make_inputs(3, 5, 7, 40, gen=gen)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16, got Double"):
        fwd(imf.double(), txf.double(), ima.double(), txa.double(), temp, tg, 0.1)
    with pytest.raises(TypeError, match="text_all is BFloat16 but image_feats is Float"):
        fwd(imf, txf, ima, txa.bfloat16(), temp, tg, 0.1)
    with pytest.raises(ValueError, match="image_feats must be 3-D"):
        fwd(imf[0], txf, ima, txa, temp, tg, 0.1)
    with pytest.raises(ValueError, match="text_feat must be \\(B, E\\) = \\(3, 40\\)"):
        fwd(imf, txf[:2], ima, txa, temp, tg, 0.1)
    with pytest.raises(ValueError, match="image_all must be \\(Ba, Q, E\\) with Ba >= 1 and Q = 7, E = 40"):
        fwd(imf, txf, ima[:, :6], txa, temp, tg, 0.1)
    with pytest.raises(ValueError, match="text_all must be \\(Ba, E\\) = \\(5, 40\\)"):
        fwd(imf, txf, ima, txa[:4], temp, tg, 0.1)
    with pytest.raises(ValueError, match="image_all must be contiguous"):
        fwd(imf, txf, ima.transpose(0, 1).contiguous().transpose(0, 1), txa, temp, tg, 0.1)
    with pytest.raises(ValueError, match="temp must be a 0-dim float32 tensor"):
        fwd(imf, txf, ima, txa, temp.reshape(1), tg, 0.1)
    with pytest.raises(ValueError, match="temp must be a 0-dim float32 tensor"):
        fwd(imf, txf, ima, txa, temp.double(), tg, 0.1)
    with pytest.raises(ValueError, match="targets must be int64 of shape \\(3,\\)"):
        fwd(imf, txf, ima, txa, temp, tg.int(), 0.1)
    with pytest.raises(ValueError, match="targets\\[1\\] = 5 is outside \\[0, Ba = 5\\)"):
        fwd(imf, txf, ima, txa, temp, torch.tensor([0, 5, 1]), 0.1)
    with pytest.raises(ValueError, match="targets\\[0\\] = -1"):
        fwd(imf, txf, ima, txa, temp, torch.tensor([-1, 0, 1]), 0.1)
    with pytest.raises(ValueError, match="label_smoothing must be in \\[0, 1\\], got 1.5"):
        fwd(imf, txf, ima, txa, temp, tg, 1.5)
    with pytest.raises(ValueError, match="B, Q, E >= 1"):
        fwd(imf[:0], txf[:0], ima, txa, temp, tg[:0], 0.1)


def test_backward_input_checks_name_bad_values(ext):
    gen = torch.Generator().manual_seed(10)
    inputs = make_inputs(3, 5, 7, 40, gen=gen)
    out = list(fwd(*inputs, 0.1))
    g = torch.tensor(1.0)
    with pytest.raises(ValueError, match="output_mask must hold 5 bools"):
        bwd(g, *inputs, 0.1, *out[1:], [True] * 4)
    with pytest.raises(ValueError, match="grad_loss must be a 0-dim float32 tensor"):
        bwd(g.reshape(1), *inputs, 0.1, *out[1:], [True] * 5)
    with pytest.raises(ValueError, match="sim_t2i must be Float of shape \\[3, 5\\]"):
        bwd(g, *inputs, 0.1, out[1], out[2][:, :4], *out[3:], [True] * 5)
    with pytest.raises(ValueError, match="arg_i2t must be Int of shape \\[3, 5\\]"):
        bwd(g, *inputs, 0.1, out[1], out[2], out[3].long(), *out[4:], [True] * 5)
    with pytest.raises(ValueError, match="lse must be Float of shape \\[2, 3\\]"):
        bwd(g, *inputs, 0.1, *out[1:5], out[5][:1], [True] * 5)
    bad_arg = out[4].clone()
    bad_arg[1, 2] = 7
    with pytest.raises(ValueError, match="arg_t2i holds 7 at flat index 7, outside \\[0, Q = 7\\)"):
        bwd(g, *inputs, 0.1, *out[1:4], bad_arg, out[5], [True] * 5)


# --------------------------------------------------------------------------------------------------------------
# Registration: opcheck (schema, fake kernels, dynamic shapes) and the public function


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(fakes, dtype):
    gen = torch.Generator().manual_seed(11)
    inputs = make_inputs(5, 13, 7, 40, dtype, gen=gen)
    results = torch.library.opcheck(torch.ops.blip2fast.itc_loss_fwd.default, (*inputs, 0.1))
    assert results and all(v == "SUCCESS" for v in results.values()), results
    out = fwd(*inputs, 0.1)
    for mask in ([True] * 5, [True, True, False, False, True], [False, False, True, True, False]):
        results = torch.library.opcheck(torch.ops.blip2fast.itc_loss_bwd.default,
                                        (torch.tensor(1.0), *inputs, 0.1, *out[1:], mask))
        assert results and all(v == "SUCCESS" for v in results.values()), (mask, results)


@pytest.mark.parametrize("detached", [False, True], ids=["gather-with-grad", "lavis-detached"])
def test_public_function_backend_cpp(fakes, monkeypatch, detached):
    """itc_loss(..., backend="cpp") runs the compiled ops (counted) and their autograd: loss, sims and every
    gradient that is asked for match the float64 reference; detached gathered features get none."""
    gen = torch.Generator().manual_seed(12)
    inputs = make_inputs(5, 13, 32, 40, gen=gen)
    leaves = [t.clone().requires_grad_(not (detached and i in (2, 3))) for i, t in enumerate(inputs[:5])]
    calls = {"fwd": 0, "bwd": []}
    real_fwd, real_bwd = torch.ops.blip2fast.itc_loss_fwd, torch.ops.blip2fast.itc_loss_bwd

    def count_fwd(*args):
        calls["fwd"] += 1
        return real_fwd(*args)

    def count_bwd(*args):
        calls["bwd"].append(list(args[-1]))
        return real_bwd(*args)

    monkeypatch.setattr(torch.ops.blip2fast, "itc_loss_fwd", count_fwd)
    monkeypatch.setattr(torch.ops.blip2fast, "itc_loss_bwd", count_bwd)
    loss, sim_i2t, sim_t2i = fakes.itc_loss(*leaves, inputs[5], 0.1, backend="cpp")
    loss.backward()
    monkeypatch.undo()
    assert calls["fwd"] == 1
    assert calls["bwd"] == [[True, True, not detached, not detached, True]]  # no work for detached inputs

    out = fwd(*inputs, 0.1)
    assert torch.equal(loss.detach(), out[0]) and torch.equal(sim_i2t, out[1]) and torch.equal(sim_t2i, out[2])
    want, cond = reference_given_args(inputs, out[3], out[4], 0.1)
    for name, leaf, w in zip(GRAD_NAMES, leaves, want):
        if detached and name in ("image_all", "text_all"):
            assert leaf.grad is None
        else:
            assert grad_error(name, leaf.grad, w, cond) <= tol_for(name, torch.float32), name


# --------------------------------------------------------------------------------------------------------------
# CUDA: the kernels against the C++ path (identical sims / argmax) and the float64 reference


def _need_cuda_kernels(ext):
    if not ext.cuda:
        pytest.fail("a CUDA GPU is present but blip2fast._C was built without CUDA kernels; rebuild with a CUDA "
                    "torch and nvcc (FORCE_CUDA=1 makes that an error at build time)")


def _compare_cuda_cpu(inputs_cuda, eps, dtype, mask=(True,) * 5):
    inputs_cpu = tuple(t.cpu() for t in inputs_cuda)
    grad_loss = torch.ones((), device="cuda")
    torch.cuda.set_sync_debug_mode("error")  # the ops must not synchronise with the host
    try:
        out = fwd(*inputs_cuda, eps)
        grads = bwd(grad_loss, *inputs_cuda, eps, *out[1:], list(mask))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    out_cpu = fwd(*inputs_cpu, eps)
    compared = []  # the gradients checked against the C++ path and the float64 reference
    # Same fmaf chains on both sides: similarities and argmax queries are bit-identical.
    for i in (1, 2, 3, 4):
        assert torch.equal(out[i].cpu(), out_cpu[i]), f"forward output {i} differs from the C++ path"
    assert max_rel_err(out[5], out_cpu[5]) <= 1e-6
    assert abs(float(out[0]) - float(out_cpu[0])) <= 1e-5 * max(1.0, abs(float(out_cpu[0])))
    check_forward(tuple(t.cpu() for t in out), inputs_cpu, eps)
    grads_cpu = bwd(torch.tensor(1.0), *inputs_cpu, eps, *out_cpu[1:], list(mask))
    want, cond = reference_given_args(inputs_cuda, out[3], out[4], eps)
    for name, m, g, gc, w in zip(GRAD_NAMES, mask, grads, grads_cpu, want):
        if not m:
            assert g.shape == (0,)
            continue
        assert g.is_cuda and g.dtype == (torch.float32 if name == "temp" else dtype)
        assert grad_error(name, g, gc, cond) <= tol_for(name, dtype), f"d {name}: CUDA vs C++"
        assert grad_error(name, g, w, cond) <= tol_for(name, dtype), f"d {name}: CUDA vs float64 reference"
        compared.append(name)
    return compared


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_odd_shapes(ext, dtype):
    _need_cuda_kernels(ext)
    gen = torch.Generator().manual_seed(21)
    for shape in SHAPES + [(17, 67, 32, 256), (64, 200, 9, 72), (3, 7, 400, 40)]:  # Q = 400: > 48 KiB smem
        for eps in (0.0, 0.1):
            assert _compare_cuda_cpu(make_inputs(*shape, dtype, gen=gen, device="cuda"), eps, dtype) == list(GRAD_NAMES)


@pytest.mark.cuda
@pytest.mark.parametrize("B, Ba", [(128, 128), (64, 1024), (16, 8192)])
def test_cuda_paper_sizes_bf16(ext, B, Ba):
    """BLIP-2 sizes (Q = 32, E = 256), bf16, gathered batches of 128 to 8192, LAVIS's and the gather-with-grad
    masks."""
    _need_cuda_kernels(ext)
    gen = torch.Generator().manual_seed(22)
    inputs = make_inputs(B, Ba, 32, 256, torch.bfloat16, gen=gen, device="cuda")
    assert _compare_cuda_cpu(inputs, 0.1, torch.bfloat16) == list(GRAD_NAMES)
    lavis = (True, True, False, False, True)
    assert _compare_cuda_cpu(inputs, 0.1, torch.bfloat16, mask=lavis) == [n for n, m in zip(GRAD_NAMES, lavis) if m]


@pytest.mark.cuda
def test_cuda_deterministic_and_graph_safe(ext):
    """Bit-identical results run to run (no atomics), and a CUDA graph replays with a new temperature and
    grad_loss written into the same tensors (both are read on device)."""
    _need_cuda_kernels(ext)
    gen = torch.Generator().manual_seed(23)
    inputs = make_inputs(32, 512, 32, 256, torch.bfloat16, gen=gen, device="cuda")
    a = fwd(*inputs, 0.1)
    b = fwd(*inputs, 0.1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    grad_loss = torch.tensor(1.0, device="cuda")
    ga = bwd(grad_loss, *inputs, 0.1, *a[1:], [True] * 5)
    gb = bwd(grad_loss, *inputs, 0.1, *a[1:], [True] * 5)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))

    temp = inputs[4]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fwd(*inputs, 0.1)
        grads = bwd(grad_loss, *inputs, 0.1, *out[1:], [True] * 5)
    for t, gl in ((0.05, 1.0), (0.1, 0.5)):
        temp.fill_(t)
        grad_loss.fill_(gl)
        graph.replay()
        want = fwd(*inputs, 0.1)
        want_g = bwd(grad_loss, *inputs, 0.1, *want[1:], [True] * 5)
        assert all(torch.equal(x, y) for x, y in zip(out, want))
        assert all(torch.equal(x, y) for x, y in zip(grads, want_g))


@pytest.mark.cuda
def test_cuda_errors(ext):
    _need_cuda_kernels(ext)
    gen = torch.Generator().manual_seed(24)
    imf, txf, ima, txa, temp, tg = make_inputs(3, 5, 7, 40, gen=gen, device="cuda")
    with pytest.raises(ValueError, match="targets is on cpu but image_feats is on cuda"):
        fwd(imf, txf, ima, txa, temp, tg.cpu(), 0.1)
    with pytest.raises(ValueError, match="temp is on cpu but image_feats is on cuda"):
        fwd(imf, txf, ima, txa, temp.cpu(), tg, 0.1)
    # A target out of range cannot be checked without a sync: the kernels make the loss NaN instead.
    loss = fwd(imf, txf, ima, txa, temp, torch.tensor([0, 5, 1], device="cuda"), 0.1)[0]
    assert torch.isnan(loss).item()
