"""ITM hard-negative sampler: the compiled op (C++ on CPU, CUDA on GPU) against the PyTorch reference (the spec).

Indices must be identical, not close: the draw is a pure function of (seed, step, stream, row, column).
The extension is used when built; with BLIP2FAST_EXPECT_EXT=1 (CI) a missing extension fails instead of skipping.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from blip2fast.ops import _extension, dispatch, hashing
from blip2fast.ops import itm_sampling as itm
from blip2fast.ops.itm_sampling import itm_sample_negatives, itm_sample_negatives_ref

EXPECT_EXT = os.environ.get("BLIP2FAST_EXPECT_EXT") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STREAM = hashing.STREAM_ITM_NEG_IMAGE_FOR_TEXT


@pytest.fixture(scope="module")
def ext():
    status = _extension.load_extension()
    if not status:
        if EXPECT_EXT:
            pytest.fail(f"BLIP2FAST_EXPECT_EXT=1 but blip2fast._C is not usable: {status.reason}")
        pytest.skip(f"blip2fast._C not loaded: {status.reason}")
    return status


@pytest.fixture
def no_backend_env(monkeypatch):
    monkeypatch.delenv("BLIP2FAST_BACKEND", raising=False)


def op(*args):
    return torch.ops.blip2fast.itm_sample_negatives(*args)


def make_inputs(rows, cols, dtype=torch.float32, *, gen, device="cpu", nonfinite=0.0, scale=3.0, row_offset=0):
    """Random logits (optionally sprinkled with NaN/inf/-inf), positives, row ids and [seed, step]."""
    sim = torch.randn(rows, cols, generator=gen) * scale
    if nonfinite:
        mask = torch.rand(rows, cols, generator=gen) < nonfinite
        pick = torch.randint(0, 3, (rows, cols), generator=gen)
        bad = torch.tensor([float("nan"), float("inf"), float("-inf")])[pick]
        sim = torch.where(mask, bad, sim)
    positive = torch.randint(0, cols, (rows,), generator=gen)
    row_ids = torch.arange(rows) + row_offset
    seed = int(torch.randint(-(2**62), 2**62, (1,), generator=gen))
    step = int(torch.randint(0, 2**40, (1,), generator=gen))
    seed_step = torch.tensor([seed, step], dtype=torch.int64)
    to = dict(device=device)
    return sim.to(dtype=dtype, **to), positive.to(**to), row_ids.to(**to), seed_step.to(**to)


def assert_same(got, want):
    neg, nfb = got
    neg_ref, nfb_ref = want
    assert neg.dtype == torch.int64 and nfb.dtype == torch.int64 and nfb.shape == ()
    assert torch.equal(neg.cpu(), neg_ref.cpu()), f"indices differ:\n got {neg.tolist()}\nwant {neg_ref.tolist()}"
    assert int(nfb) == int(nfb_ref)


# --------------------------------------------------------------------------------------------------------------
# Extension (C++ on CPU) against the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cols", [2, 5, 33, 257])
@pytest.mark.parametrize("rows", [1, 3, 7, 31])
def test_matches_reference(ext, rows, cols, dtype):
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    for trial in range(6):
        nonfinite = (0.0, 0.05, 0.3)[trial % 3]
        args = make_inputs(rows, cols, dtype, gen=gen, nonfinite=nonfinite, row_offset=trial * 97)
        for stream in (hashing.STREAM_ITM_NEG_IMAGE_FOR_TEXT, hashing.STREAM_ITM_NEG_TEXT_FOR_IMAGE):
            want = itm_sample_negatives_ref(*args, stream)
            assert_same(op(*args, stream), want)
            assert_same(itm_sample_negatives(*args, stream, backend="cpp"), want)


def test_many_seeds_and_steps(ext):
    """One fixed matrix, many (seed, step) pairs: every draw identical (the hash is bit-exact)."""
    gen = torch.Generator().manual_seed(7)
    sim, positive, row_ids, _ = make_inputs(16, 40, gen=gen, nonfinite=0.1, scale=1.0)
    for seed in (0, 1, -1, 2**32 - 1, 2**32, 2**63 - 1, -(2**63), 123456789012345):
        for step in (0, 1, 2**31, 2**32 + 5, 10**12):
            seed_step = torch.tensor([seed, step], dtype=torch.int64)
            assert_same(op(sim, positive, row_ids, seed_step, STREAM),
                        itm_sample_negatives_ref(sim, positive, row_ids, seed_step, STREAM))


def test_draws_depend_on_seed_step_and_stream(ext):
    gen = torch.Generator().manual_seed(8)
    sim, positive, row_ids, seed_step = make_inputs(64, 64, gen=gen, scale=0.0)  # uniform over 63 columns
    base = op(sim, positive, row_ids, seed_step, STREAM)[0]
    other_step = op(sim, positive, row_ids, seed_step + torch.tensor([0, 1]), STREAM)[0]
    other_stream = op(sim, positive, row_ids, seed_step, hashing.STREAM_ITM_NEG_TEXT_FOR_IMAGE)[0]
    assert (base != other_step).sum() > 32 and (base != other_stream).sum() > 32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_rows_fall_back(ext, dtype):
    """Rows with no finite candidate draw uniformly among non-positive columns and are counted."""
    gen = torch.Generator().manual_seed(11)
    sim, positive, row_ids, seed_step = make_inputs(9, 6, dtype, gen=gen)
    sim[0] = float("nan")
    sim[1] = float("inf")
    sim[2] = float("-inf")
    sim[3] = torch.tensor([float("nan"), float("inf"), float("-inf")] * 2, dtype=dtype)
    sim[4] = float("nan")
    sim[4, positive[4]] = 1.0  # only the positive is finite: still no candidate
    sim[5] = float("nan")
    only = (int(positive[5]) + 2) % 6
    sim[5, only] = -3.0  # exactly one finite candidate: it must be drawn, no fallback
    neg, nfb = op(sim, positive, row_ids, seed_step, STREAM)
    assert_same((neg, nfb), itm_sample_negatives_ref(sim, positive, row_ids, seed_step, STREAM))
    assert int(nfb) == 5
    assert int(neg[5]) == only
    assert (neg != positive).all() and ((neg >= 0) & (neg < 6)).all()


def test_all_rows_nonfinite(ext):
    gen = torch.Generator().manual_seed(12)
    sim, positive, row_ids, seed_step = make_inputs(31, 33, gen=gen)
    sim.fill_(float("nan"))
    neg, nfb = op(sim, positive, row_ids, seed_step, STREAM)
    assert_same((neg, nfb), itm_sample_negatives_ref(sim, positive, row_ids, seed_step, STREAM))
    assert int(nfb) == 31 and (neg != positive).all()


def test_two_columns_single_candidate(ext):
    """cols=2: the only negative is the other column, whatever the logits (fallback when it is not finite)."""
    gen = torch.Generator().manual_seed(13)
    sim, positive, row_ids, seed_step = make_inputs(31, 2, gen=gen, nonfinite=0.3)
    neg, nfb = op(sim, positive, row_ids, seed_step, STREAM)
    assert_same((neg, nfb), itm_sample_negatives_ref(sim, positive, row_ids, seed_step, STREAM))
    assert torch.equal(neg, 1 - positive)
    other = sim.gather(1, (1 - positive)[:, None])[:, 0]
    assert int(nfb) == int((~torch.isfinite(other)).sum())


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_one_column_is_an_error(backend, request):
    if backend == "cpp":
        request.getfixturevalue("ext")
    sim = torch.randn(4, 1)
    ids = torch.arange(4)
    with pytest.raises(ValueError, match="at least 2 candidates per row"):
        itm_sample_negatives(sim, torch.zeros(4, dtype=torch.int64), ids, torch.tensor([1, 2]), STREAM,
                             backend=backend)


def test_positive_never_drawn(ext):
    """Even when the positive holds by far the largest logit (the usual case: it is the matching pair)."""
    gen = torch.Generator().manual_seed(14)
    for cols in (2, 3, 17, 64):
        sim, positive, row_ids, seed_step = make_inputs(200, cols, gen=gen, nonfinite=0.1)
        sim[torch.arange(200), positive] = 1e4
        neg, _ = op(sim, positive, row_ids, seed_step, STREAM)
        assert (neg != positive).all()
        assert_same((neg, _), itm_sample_negatives_ref(sim, positive, row_ids, seed_step, STREAM))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_rank_slice_equals_full_matrix(backend, request):
    """A rank that holds rows [lo, hi) with their global row_ids draws what one process draws for those rows."""
    if backend == "cpp":
        request.getfixturevalue("ext")
    gen = torch.Generator().manual_seed(15)
    sim, positive, row_ids, seed_step = make_inputs(24, 24, gen=gen, nonfinite=0.05, row_offset=1000)
    full_neg, _ = itm_sample_negatives(sim, positive, row_ids, seed_step, STREAM, backend=backend)
    for lo, hi in ((0, 6), (6, 12), (12, 24), (5, 6)):
        neg, _ = itm_sample_negatives(sim[lo:hi], positive[lo:hi], row_ids[lo:hi], seed_step, STREAM,
                                      backend=backend)
        assert torch.equal(neg, full_neg[lo:hi])


def test_noncontiguous_sim(ext):
    """Strided rows and columns (e.g. sim_i2t = sim_t2i.T) read correctly."""
    gen = torch.Generator().manual_seed(16)
    sim, positive, row_ids, seed_step = make_inputs(33, 31, gen=gen, nonfinite=0.1)
    sim_t = sim.t()  # (31, 33), column stride 31
    pos_t = positive[:31] % 33
    ids_t = row_ids[:31]
    assert not sim_t.is_contiguous()
    assert_same(op(sim_t, pos_t, ids_t, seed_step, STREAM),
                itm_sample_negatives_ref(sim_t, pos_t, ids_t, seed_step, STREAM))
    strided = sim[::2, ::3]
    p, i = positive[: strided.shape[0]] % strided.shape[1], row_ids[: strided.shape[0]]
    assert_same(op(strided, p, i, seed_step, STREAM), itm_sample_negatives_ref(strided, p, i, seed_step, STREAM))


def test_empty_rows(ext):
    sim, positive, row_ids, seed_step = make_inputs(0, 5, gen=torch.Generator().manual_seed(0))
    neg, nfb = op(sim, positive, row_ids, seed_step, STREAM)
    assert neg.shape == (0,) and int(nfb) == 0


def test_draw_frequencies_follow_softmax(ext):
    """Gumbel-max draws from softmax(sim) over the candidates: chi-square on 20k identical rows (fixed seed).

    The bound is loose (the 99.9999th percentile of chi2 with 4 dof is ~33), so the test only catches a wrong
    distribution, e.g. a biased hash, an off-by-one column or the positive / a NaN column leaking in.
    """
    rows = 20000
    logits = torch.tensor([4.0, 1.0, 0.5, float("nan"), 0.0, -0.5, -1.0])  # positive: column 0; column 3 is NaN
    sim = logits.expand(rows, -1).contiguous()
    positive = torch.zeros(rows, dtype=torch.int64)
    row_ids = torch.arange(rows) * 3 + 5
    seed_step = torch.tensor([2024, 77], dtype=torch.int64)
    neg, nfb = itm_sample_negatives(sim, positive, row_ids, seed_step, STREAM, backend="cpp")
    assert int(nfb) == 0
    counts = torch.bincount(neg, minlength=7).double()
    assert counts[0] == 0 and counts[3] == 0
    cand = [1, 2, 4, 5, 6]
    p = torch.softmax(logits[cand].double(), dim=0)
    expected = p * rows
    chi2 = float(((counts[cand] - expected) ** 2 / expected).sum())
    assert chi2 < 35.0, f"chi2 = {chi2:.1f} over 4 dof; counts {counts[cand].tolist()} expected {expected.tolist()}"


# --------------------------------------------------------------------------------------------------------------
# The op's registration: input checks, opcheck, torch.compile


def test_cpp_input_checks_name_bad_values(ext):
    sim = torch.randn(3, 4)
    pos = torch.zeros(3, dtype=torch.int64)
    ids = torch.arange(3)
    ss = torch.tensor([1, 2])
    with pytest.raises(TypeError, match="Double"):
        op(sim.double(), pos, ids, ss, STREAM)
    with pytest.raises(ValueError, match="2-D"):
        op(torch.randn(3, 4, 1), pos, ids, ss, STREAM)
    with pytest.raises(ValueError, match="positive must be int64 of shape \\(3,\\)"):
        op(sim, pos.int(), ids, ss, STREAM)
    with pytest.raises(ValueError, match="row_ids must be int64 of shape \\(3,\\)"):
        op(sim, pos, ids[:2], ss, STREAM)
    with pytest.raises(ValueError, match="seed_step must be an int64 tensor of shape \\(2,\\)"):
        op(sim, pos, ids, torch.tensor([1, 2, 3]), STREAM)
    with pytest.raises(ValueError, match="at least 2 candidates per row.*got 1 columns"):
        op(torch.randn(3, 1), pos, ids, ss, STREAM)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(ext, dtype):
    gen = torch.Generator().manual_seed(21)
    args = make_inputs(7, 33, dtype, gen=gen, nonfinite=0.1)
    results = torch.library.opcheck(torch.ops.blip2fast.itm_sample_negatives.default, (*args, STREAM))
    assert results and all(v == "SUCCESS" for v in results.values()), results


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inside inductor
def test_torch_compile_fullgraph(ext):
    """The public function, backend="cpp", compiles into one graph (the op has a fake kernel; dispatch is Python)."""

    def step(sim, positive, row_ids, seed_step):
        neg_i, n1 = itm_sample_negatives(sim, positive, row_ids, seed_step, hashing.STREAM_ITM_NEG_IMAGE_FOR_TEXT,
                                         backend="cpp")
        neg_t, n2 = itm_sample_negatives(sim.t(), positive, row_ids, seed_step,
                                         hashing.STREAM_ITM_NEG_TEXT_FOR_IMAGE, backend="cpp")
        return neg_i, neg_t, n1 + n2

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    gen = torch.Generator().manual_seed(22)
    sim, positive, row_ids, seed_step = make_inputs(9, 9, gen=gen, nonfinite=0.2)
    got = compiled(sim, positive, row_ids, seed_step)
    want = step(sim, positive, row_ids, seed_step)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


# --------------------------------------------------------------------------------------------------------------
# Backend choice


def test_auto_prefers_extension(ext, no_backend_env):
    sim = torch.randn(2, 3)
    assert itm._choose_backend(sim, None) == "cpp"
    assert itm._choose_backend(sim.double(), None) == "torch"  # fp64 is reference-only
    with pytest.raises(RuntimeError, match="float64"):
        itm._choose_backend(sim.double(), "cpp")


def test_env_backend(monkeypatch):
    sim = torch.randn(2, 3)
    monkeypatch.setenv("BLIP2FAST_BACKEND", "torch")
    assert itm._choose_backend(sim, None) == "torch"
    assert itm._choose_backend(sim, "torch") == "torch"
    monkeypatch.setenv("BLIP2FAST_BACKEND", "triton")  # the sampler has a triton backend: a plain name selects it
    if dispatch.triton_kernels("itm_sampling")[0] is not None:
        assert itm._choose_backend(sim, None) == "triton"
    monkeypatch.setenv("BLIP2FAST_BACKEND", "qformer_attention=triton")  # another op's entry: automatic here
    assert itm._choose_backend(sim, None) in ("torch", "cpp")
    monkeypatch.setenv("BLIP2FAST_BACKEND", "trition")
    with pytest.raises(ValueError, match="unknown ITM sampling backend 'trition' \\(from BLIP2FAST_BACKEND\\)"):
        itm._choose_backend(sim, None)
    with pytest.raises(ValueError, match="unknown ITM sampling backend 'cuda' \\(from backend argument\\)"):
        itm._choose_backend(sim, "cuda")


def test_forced_cpp_without_extension_raises(monkeypatch, no_backend_env):
    missing = _extension.ExtensionStatus(False, "simulated: blip2fast._C is not built")
    monkeypatch.setattr(_extension, "load_extension", lambda: missing)
    gen = torch.Generator().manual_seed(23)
    args = make_inputs(3, 5, gen=gen)
    with pytest.raises(RuntimeError, match="backend 'cpp' was requested \\(backend argument\\).*simulated"):
        itm_sample_negatives(*args, STREAM, backend="cpp")
    monkeypatch.setenv("BLIP2FAST_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="backend 'cpp' was requested \\(BLIP2FAST_BACKEND\\).*simulated"):
        itm_sample_negatives(*args, STREAM)
    monkeypatch.delenv("BLIP2FAST_BACKEND")
    assert_same(itm_sample_negatives(*args, STREAM), itm_sample_negatives_ref(*args, STREAM))  # auto: torch


def test_loader_honours_build_ext_0(monkeypatch):
    monkeypatch.setattr(_extension, "_status", None)
    monkeypatch.setenv("BLIP2FAST_BUILD_EXT", "0")
    status = _extension.load_extension()
    assert not status and "BLIP2FAST_BUILD_EXT=0" in status.reason


def test_extension_expected(ext):
    """CI sets BLIP2FAST_EXPECT_EXT=1: then the `ext` fixture fails (not skips) when blip2fast._C is missing."""
    assert ext.available


# --------------------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_reference(ext, dtype):
    if not ext.cuda:
        pytest.fail("a CUDA GPU is present but blip2fast._C was built without CUDA kernels; rebuild with a CUDA "
                    "torch and nvcc (FORCE_CUDA=1 makes that an error at build time)")
    gen = torch.Generator().manual_seed(31)
    shapes = [(1, 2), (3, 5), (7, 33), (31, 257), (128, 1024), (64, 8193), (5, 40000)]
    for rows, cols in shapes:
        for nonfinite in (0.0, 0.2):
            args = make_inputs(rows, cols, dtype, gen=gen, nonfinite=nonfinite, device="cuda", row_offset=rows)
            want = itm_sample_negatives_ref(*(a.cpu() for a in args), STREAM)
            torch.cuda.set_sync_debug_mode("error")  # the op must not synchronise with the host
            try:
                got = itm_sample_negatives(*args, STREAM, backend="cpp")
            finally:
                torch.cuda.set_sync_debug_mode(0)
            assert got[0].is_cuda
            assert_same(got, want)
    sim, positive, row_ids, seed_step = make_inputs(40, 33, dtype, gen=gen, device="cuda", nonfinite=0.1)
    sim[3] = float("nan")
    want = itm_sample_negatives_ref(sim.t().cpu(), positive[:33].cpu(), row_ids[:33].cpu(), seed_step.cpu(), STREAM)
    got = op(sim.t(), positive[:33], row_ids[:33], seed_step, STREAM)
    assert_same(got, want)


@pytest.mark.cuda
def test_cuda_graph_replay_draws_fresh_step(ext):
    """seed_step is read on device: a captured graph replays with new steps written into the same tensor."""
    gen = torch.Generator().manual_seed(32)
    sim, positive, row_ids, seed_step = make_inputs(32, 64, gen=gen, device="cuda")
    op(sim, positive, row_ids, seed_step, STREAM)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        neg, nfb = op(sim, positive, row_ids, seed_step, STREAM)
    for step in (3, 4, 1000):
        seed_step[1] = step
        graph.replay()
        want = itm_sample_negatives_ref(sim.cpu(), positive.cpu(), row_ids.cpu(), seed_step.cpu(), STREAM)
        assert_same((neg, nfb), want)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("rows,cols,nonfinite", [(5, 5, 0.0), (7, 21, 0.3), (3, 13, 1.0)])
def test_pair_is_the_two_directions(backend, rows, cols, nonfinite, request):
    """itm_sample_negative_pair (training's call: the torch backend draws both directions in one stacked pass)
    returns exactly the two single-direction draws with their streams, fallback rows included (nonfinite=1.0:
    every row falls back)."""
    if backend == "cpp":
        request.getfixturevalue("ext")
    gen = torch.Generator().manual_seed(rows * 100 + cols)
    sim_t2i, positive, row_ids, seed_step = make_inputs(rows, cols, gen=gen, nonfinite=nonfinite, row_offset=11)
    sim_i2t = make_inputs(rows, cols, gen=gen, nonfinite=nonfinite)[0]
    neg_image, neg_text, fallback = itm.itm_sample_negative_pair(sim_t2i, sim_i2t, positive, row_ids, seed_step,
                                                                 backend=backend)
    want_image, n1 = itm_sample_negatives_ref(sim_t2i, positive, row_ids, seed_step,
                                              hashing.STREAM_ITM_NEG_IMAGE_FOR_TEXT)
    want_text, n2 = itm_sample_negatives_ref(sim_i2t, positive, row_ids, seed_step,
                                             hashing.STREAM_ITM_NEG_TEXT_FOR_IMAGE)
    assert torch.equal(neg_image, want_image) and torch.equal(neg_text, want_text)
    assert int(fallback) == int(n1 + n2) == (rows * 2 if nonfinite == 1.0 else int(fallback))
    with pytest.raises(ValueError, match="same shape"):
        itm.itm_sample_negative_pair(sim_t2i, sim_i2t[:, :-1], positive, row_ids, seed_step, backend=backend)
