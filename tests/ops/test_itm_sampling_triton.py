"""The Triton ITM sampler (kernels/itm_sampling.py) against the PyTorch reference (the spec) and the C++ op.

Indices and fallback counts must be identical, not close: the draw is a pure function of (seed, step, stream,
row, column), and the kernel's hash and Gumbel noise are checked bit for bit against blip2fast/ops/hashing.py.
On a CPU the kernel runs under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1) in fp32 and fp16;
bf16 is wrong under the interpreter, so bf16 cases are marked `cuda`. Every comparison asserts that the kernel
launched (blip2fast.kernels.itm_sampling.LAUNCHES), so a silent fallback to the reference cannot pass.
"""
from __future__ import annotations

import pytest
import torch

from blip2fast.kernels import _hash
from blip2fast.kernels import itm_sampling as K
from blip2fast.ops import _extension, dispatch, hashing
from blip2fast.ops import itm_sampling as itm
from blip2fast.ops.itm_sampling import itm_sample_negatives, itm_sample_negatives_ref
from tests.helpers import triton_test_device
from tests.ops.test_itm_sampling import make_inputs

DEV = triton_test_device(K.INTERPRETED)

# the interpreter converts 1-element arrays to Python ints (loop bounds loaded from memory), which numpy>=1.25 warns of
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")

CPU_DTYPES = [torch.float32, torch.float16]
SHAPES = [(1, 2), (7, 13), (33, 130), (5, 1000)]
STREAMS = (hashing.STREAM_ITM_NEG_IMAGE_FOR_TEXT, hashing.STREAM_ITM_NEG_TEXT_FOR_IMAGE)


def _cpp_available() -> bool:
    status = _extension.load_extension()
    return bool(status) and (DEV == "cpu" or status.cuda)


def triton_draw(*args):
    """backend="triton", asserting that exactly one kernel launch happened."""
    before = K.LAUNCHES["itm_sample"]
    got = itm_sample_negatives(*args, backend="triton")
    rows = args[0].shape[0]
    assert K.LAUNCHES["itm_sample"] == before + (1 if rows else 0), "the Triton kernel did not launch"
    assert got[0].device.type == DEV and got[0].dtype == torch.int64 and got[0].shape == (rows,)
    assert got[1].dtype == torch.int64 and got[1].shape == ()
    return got


def assert_identical(args, stream):
    """Triton == reference (on the CPU copy) == C++/CUDA op (when built): indices and fallback count."""
    neg, nfb = triton_draw(*args, stream)
    want_neg, want_nfb = itm_sample_negatives_ref(*(a.cpu() for a in args), stream)
    assert torch.equal(neg.cpu(), want_neg), f"indices differ:\n got {neg.tolist()}\nwant {want_neg.tolist()}"
    assert int(nfb) == int(want_nfb)
    if _cpp_available():
        cpp_neg, cpp_nfb = itm_sample_negatives(*args, stream, backend="cpp")
        assert torch.equal(neg, cpp_neg) and int(nfb) == int(cpp_nfb)
    positive = args[1]
    assert (neg != positive).all(), "a positive was drawn"
    return neg, nfb


def to_dev(args):
    return tuple(a.to(DEV) for a in args)


# --------------------------------------------------------------------------------------------------------------
# The hash itself, bit for bit


def test_triton_hash_and_gumbel_are_bit_identical_to_the_spec():
    """kernels/_hash.py on a grid == hashing.counter_hash / gumbel_from_hash, over 64-bit seeds (negative, above
    2**32), large steps and row ids (negative, above 2**32): every value, every bit."""
    cols = 300
    for seed, step in [(0, 0), (-1, 2**40 + 7), (2**63 - 1, 1), (-(2**63), 10**12), (123456789012345, 77)]:
        seed_step = torch.tensor([seed, step], dtype=torch.int64, device=DEV)
        row_ids = torch.tensor([0, 1, 5, 2**31, 2**32 + 3, -7, 10**15], dtype=torch.int64, device=DEV)
        for stream in (*STREAMS, 99):
            h, g = _hash.hash_table(seed_step, stream, row_ids, cols)
            seed_lo, seed_hi, step_k = hashing.seed_keys(seed_step.cpu())
            want_h = hashing.counter_hash(seed_lo, seed_hi, step_k, stream, row_ids.cpu()[:, None],
                                          torch.arange(cols)[None, :])
            assert torch.equal(h.cpu(), want_h)
            want_g = hashing.gumbel_from_hash(want_h)
            assert torch.equal(g.cpu().view(torch.int32), want_g.view(torch.int32)), "gumbel noise differs in bits"


def test_pinned_hash_value():
    """hash(7, 0, 100, 2, 5, 11) == 0x7DC268E2 (tests/ops/test_hashing.py pins it): seed 7, step 100, stream 2."""
    h, _ = _hash.hash_table(torch.tensor([7, 100], device=DEV), 2, torch.tensor([5], device=DEV), 12)
    assert int(h[0, 11]) == 0x7DC268E2


# --------------------------------------------------------------------------------------------------------------
# Draws against the reference and the C++ op


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_matches_reference(rows, cols, dtype):
    """Clean rows, rows sprinkled with NaN/inf/-inf, and row_ids of a rank > 0; both streams."""
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    for trial, nonfinite in enumerate((0.0, 0.05, 0.4)):
        args = to_dev(make_inputs(rows, cols, dtype, gen=gen, nonfinite=nonfinite, row_offset=trial * 4096))
        for stream in STREAMS:
            assert_identical(args, stream)


def test_many_seeds_and_steps():
    """One matrix, many (seed, step) pairs (64-bit, negative, beyond 2**32): identical draws each time, and the
    draws do change with the step."""
    gen = torch.Generator().manual_seed(7)
    sim, positive, row_ids, _ = make_inputs(16, 40, gen=gen, nonfinite=0.1, scale=1.0, row_offset=3)
    draws = []
    for seed in (0, -1, 2**32 - 1, 2**63 - 1, -(2**63), 123456789012345):
        for step in (0, 1, 2**32 + 5, 10**12):
            seed_step = torch.tensor([seed, step], dtype=torch.int64)
            draws.append(assert_identical(to_dev((sim, positive, row_ids, seed_step)), STREAMS[0])[0])
    assert len({tuple(d.tolist()) for d in draws}) > len(draws) // 2


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_nonfinite_rows_fall_back_and_are_counted(dtype):
    """All-NaN, all-inf, all -inf and mixed non-finite rows, a row whose only finite entry is the positive (all
    fall back: 5), and a row with exactly one finite candidate (drawn, no fallback)."""
    gen = torch.Generator().manual_seed(11)
    sim, positive, row_ids, seed_step = make_inputs(9, 70, dtype, gen=gen, row_offset=50)
    sim[0] = float("nan")
    sim[1] = float("inf")
    sim[2] = float("-inf")
    sim[3] = torch.tensor([float("nan"), float("inf"), float("-inf")] * 23 + [float("nan")], dtype=dtype)
    sim[4] = float("nan")
    sim[4, positive[4]] = 1.0
    sim[5] = float("nan")
    only = (int(positive[5]) + 33) % 70
    sim[5, only] = -3.0
    neg, nfb = assert_identical(to_dev((sim, positive, row_ids, seed_step)), STREAMS[1])
    assert int(nfb) == 5 and int(neg[5]) == only


def test_all_rows_nonfinite():
    gen = torch.Generator().manual_seed(12)
    sim, positive, row_ids, seed_step = make_inputs(33, 130, gen=gen)
    sim.fill_(float("nan"))
    neg, nfb = assert_identical(to_dev((sim, positive, row_ids, seed_step)), STREAMS[0])
    assert int(nfb) == 33


def test_two_columns_single_candidate():
    """cols = 2: the only negative is the other column, whatever its logit (a fallback when it is not finite)."""
    gen = torch.Generator().manual_seed(13)
    sim, positive, row_ids, seed_step = make_inputs(31, 2, gen=gen, nonfinite=0.3)
    neg, nfb = assert_identical(to_dev((sim, positive, row_ids, seed_step)), STREAMS[0])
    assert torch.equal(neg.cpu(), 1 - positive)
    other = sim.gather(1, (1 - positive)[:, None])[:, 0]
    assert int(nfb) == int((~torch.isfinite(other)).sum())


def test_ties_go_to_the_first_column_within_and_across_tiles():
    """Logits of 2**30 (float32 spacing 128) absorb the noise: every candidate scores exactly 2**30, so the draw is
    the first candidate, as torch.argmax gives. Row 0: one tile; rows 1-2: the finite candidates start in the second
    and third of three 1024-column tiles (the earlier columns are NaN), so ties are settled across tiles too."""
    cols = 2500
    sim = torch.full((3, cols), 2.0**30)
    sim[1, :1100] = float("nan")
    sim[2, :2100] = float("nan")
    positive = torch.tensor([0, 1100, 5])
    args = to_dev((sim, positive, torch.arange(3) + 9, torch.tensor([3, 4])))
    neg, nfb = assert_identical(args, STREAMS[0])
    assert neg.tolist() == [1, 1101, 2100] and int(nfb) == 0


def test_rank_slice_equals_full_matrix():
    """A rank holding rows [lo, hi) with their global row_ids draws what one process draws for those rows."""
    gen = torch.Generator().manual_seed(15)
    sim, positive, row_ids, seed_step = to_dev(make_inputs(24, 24, gen=gen, nonfinite=0.05, row_offset=1000))
    full, _ = triton_draw(sim, positive, row_ids, seed_step, STREAMS[0])
    for lo, hi in ((0, 6), (6, 12), (12, 24), (5, 6)):
        part, _ = triton_draw(sim[lo:hi], positive[lo:hi], row_ids[lo:hi], seed_step, STREAMS[0])
        assert torch.equal(part, full[lo:hi])


def test_noncontiguous_sim():
    """A transposed sim (sim_i2t as sim_t2i.T) and a strided slice are read with their strides."""
    gen = torch.Generator().manual_seed(16)
    sim, positive, row_ids, seed_step = make_inputs(33, 31, gen=gen, nonfinite=0.1)
    sim_t = sim.t()
    assert not sim_t.is_contiguous()
    assert_identical(to_dev((sim_t, positive[:31] % 33, row_ids[:31], seed_step)), STREAMS[1])
    strided = sim[::2, ::3]
    n = strided.shape[0]
    assert_identical(to_dev((strided, positive[:n] % strided.shape[1], row_ids[:n], seed_step)), STREAMS[0])


def test_empty_rows():
    sim, positive, row_ids, seed_step = to_dev(make_inputs(0, 5, gen=torch.Generator().manual_seed(0)))
    neg, nfb = triton_draw(sim, positive, row_ids, seed_step, STREAMS[0])
    assert neg.shape == (0,) and int(nfb) == 0


def test_one_column_and_bad_inputs_are_errors():
    sim = torch.randn(4, 1, device=DEV)
    pos, ids, ss = (torch.zeros(4, dtype=torch.int64, device=DEV), torch.arange(4, device=DEV),
                    torch.tensor([1, 2], device=DEV))
    with pytest.raises(ValueError, match="at least 2 candidates per row"):
        itm_sample_negatives(sim, pos, ids, ss, STREAMS[0], backend="triton")
    with pytest.raises(ValueError, match=r"positive must be int64 of shape \(4,\)"):
        itm_sample_negatives(torch.randn(4, 3, device=DEV), pos.int(), ids, ss, STREAMS[0], backend="triton")
    with pytest.raises(ValueError, match=r"seed_step must be an int64 tensor of shape \(2,\)"):
        itm_sample_negatives(torch.randn(4, 3, device=DEV), pos, ids, ss[:1], STREAMS[0], backend="triton")


# --------------------------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, backend choice


def test_opcheck():
    gen = torch.Generator().manual_seed(21)
    args = to_dev(make_inputs(7, 33, gen=gen, nonfinite=0.1))
    results = torch.library.opcheck(torch.ops.blip2fast.itm_sample_negatives_triton.default, (*args, STREAMS[0]))
    assert results and all(v == "SUCCESS" for v in results.values()), results


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inside inductor
def test_torch_compile_fullgraph():
    """Both directions, backend="triton", in one compiled graph (the op has a fake kernel; dispatch is Python)."""

    def step(sim, positive, row_ids, seed_step):
        neg_i, n1 = itm_sample_negatives(sim, positive, row_ids, seed_step, STREAMS[0], backend="triton")
        neg_t, n2 = itm_sample_negatives(sim.t(), positive, row_ids, seed_step, STREAMS[1], backend="triton")
        return neg_i, neg_t, n1 + n2

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    gen = torch.Generator().manual_seed(22)
    sim, positive, row_ids, seed_step = to_dev(make_inputs(9, 9, gen=gen, nonfinite=0.2))
    before = K.LAUNCHES["itm_sample"]
    got = compiled(sim, positive, row_ids, seed_step)
    assert K.LAUNCHES["itm_sample"] == before + 2
    want = (itm_sample_negatives_ref(sim, positive, row_ids, seed_step, STREAMS[0]),
            itm_sample_negatives_ref(sim.t(), positive, row_ids, seed_step, STREAMS[1]))
    assert torch.equal(got[0], want[0][0]) and torch.equal(got[1], want[1][0])
    assert int(got[2]) == int(want[0][1]) + int(want[1][1])


def test_automatic_choice(monkeypatch):
    """CPU: cpp, then torch (never the interpreter); CUDA: the measured order (dispatch.gpu_order), torch until
    a measurement is committed."""
    monkeypatch.delenv("BLIP2FAST_BACKEND", raising=False)
    sim = torch.randn(3, 4)
    assert itm._choose_backend(sim, None) == ("cpp" if _extension.load_extension() else "torch")
    missing = _extension.ExtensionStatus(False, "simulated: blip2fast._C is not built")
    monkeypatch.setattr(_extension, "load_extension", lambda: missing)
    assert itm._choose_backend(sim, None) == "torch"
    if DEV == "cuda":
        assert itm._choose_backend(sim.cuda(), None) == dispatch.gpu_order("itm_sample_negatives", ("torch",))[0]


def test_env_selects_triton_per_op(monkeypatch):
    gen = torch.Generator().manual_seed(24)
    args = to_dev(make_inputs(5, 6, gen=gen))
    monkeypatch.setenv("BLIP2FAST_BACKEND", "itm_sample_negatives=triton")
    before = K.LAUNCHES["itm_sample"]
    got = itm_sample_negatives(*args, STREAMS[0])
    assert K.LAUNCHES["itm_sample"] == before + 1
    assert torch.equal(got[0], itm_sample_negatives_ref(*args, STREAMS[0])[0])


def test_forced_triton_raises_with_reasons(monkeypatch):
    monkeypatch.delenv("BLIP2FAST_BACKEND", raising=False)
    gen = torch.Generator().manual_seed(23)
    args = to_dev(make_inputs(3, 5, gen=gen))
    with pytest.raises(RuntimeError, match=r"backend 'triton' was requested \(backend argument\).*float64"):
        itm_sample_negatives(args[0].double(), *args[1:], STREAMS[0], backend="triton")
    monkeypatch.setattr(dispatch, "_triton_status", lambda name: (False, False, "simulated: no triton"))
    with pytest.raises(RuntimeError, match=r"backend 'triton' was requested \(backend argument\).*simulated"):
        itm_sample_negatives(*args, STREAMS[0], backend="triton")
    monkeypatch.setenv("BLIP2FAST_BACKEND", "itm_sample_negatives=triton")
    with pytest.raises(RuntimeError, match=r"requested \(BLIP2FAST_BACKEND \(itm_sample_negatives=\.\.\.\)\).*"
                                           r"simulated"):
        itm_sample_negatives(*args, STREAMS[0])
    monkeypatch.delenv("BLIP2FAST_BACKEND")
    want = itm_sample_negatives_ref(*args, STREAMS[0])
    assert torch.equal(itm_sample_negatives(*args, STREAMS[0])[0], want[0])  # automatic: never triton here


def test_forced_triton_refuses_bf16_on_the_interpreter(monkeypatch):
    if DEV != "cpu":
        pytest.skip("interpreter only")
    args = make_inputs(3, 5, torch.bfloat16, gen=torch.Generator().manual_seed(25))
    with pytest.raises(RuntimeError, match="bfloat16 is computed wrongly by the Triton interpreter"):
        itm_sample_negatives(*args, STREAMS[0], backend="triton")


# --------------------------------------------------------------------------------------------------------------
# Stage 1: the model's negatives with the Triton sampler equal the torch sampler's


def test_stage1_negatives_triton_equal_torch(monkeypatch):
    from tests.models.test_stage1 import make_batch, make_model

    m = make_model().eval().to(DEV)
    images, ids, mask = (t.to(DEV) for t in make_batch(7))
    images[4] = float("nan")  # image 4's similarities are NaN: its row falls back, no text row picks it
    outs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("BLIP2FAST_BACKEND", f"itm_sample_negatives={backend}")
        for seed, step in ((3, 0), (3, 1), (2**40 + 1, 12345)):
            m.set_seed_step(seed, step)
            before = K.LAUNCHES["itm_sample"]
            with torch.no_grad():
                out = m.stage1_loss(images, ids, mask)
            assert K.LAUNCHES["itm_sample"] - before == (2 if backend == "triton" else 0)
            outs[backend, seed, step] = (out.neg_image_for_text, out.neg_text_for_image, int(out.itm_fallback_rows))
    for (backend, seed, step), got in outs.items():
        want = outs["torch", seed, step]
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2] == 1


# --------------------------------------------------------------------------------------------------------------
# GPU (compiled kernel): bf16, the paper's size, CUDA graphs, no host sync


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_matches_reference_and_cpp(dtype):
    gen = torch.Generator().manual_seed(31)
    for rows, cols in [*SHAPES, (128, 8192), (64, 8193), (3, 40000)]:
        for nonfinite in (0.0, 0.2):
            args = to_dev(make_inputs(rows, cols, dtype, gen=gen, nonfinite=nonfinite, row_offset=rows * 5))
            torch.cuda.set_sync_debug_mode("error")  # the op must not synchronise with the host
            try:
                triton_draw(*args, STREAMS[0])
            finally:
                torch.cuda.set_sync_debug_mode(0)
            assert_identical(args, STREAMS[0])


@pytest.mark.cuda
def test_cuda_graph_replay_draws_fresh_step():
    """seed_step is read on device: a captured graph replays with new steps written into the same tensor."""
    gen = torch.Generator().manual_seed(32)
    sim, positive, row_ids, seed_step = to_dev(make_inputs(32, 300, gen=gen, nonfinite=0.1))
    itm_sample_negatives(sim, positive, row_ids, seed_step, STREAMS[0], backend="triton")  # compile outside
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        neg, nfb = itm_sample_negatives(sim, positive, row_ids, seed_step, STREAMS[0], backend="triton")
    for step in (3, 4, 1000):
        seed_step[1] = step
        graph.replay()
        want = itm_sample_negatives_ref(sim.cpu(), positive.cpu(), row_ids.cpu(), seed_step.cpu(), STREAMS[0])
        assert torch.equal(neg.cpu(), want[0]) and int(nfb) == int(want[1])
